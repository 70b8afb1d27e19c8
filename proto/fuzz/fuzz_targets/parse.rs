//! Feeds one input to every parser of turnpike-proto, as a UDP datagram and as the front
//! of a TCP stream, and checks what must hold of what they return.
//!
//! Beyond "no panic", the oracles are:
//! - every typed attribute that decodes encodes back to the same value;
//! - a parsed message rebuilt from its raw attributes parses to the same attributes;
//! - a parsed Send indication relayed as a Data indication (the data plane's fast path)
//!   carries the same peer and payload;
//! - what `Message::parse` or `ChannelData::parse` accepts, `next_frame` and `classify`
//!   agree with, and every complete frame `next_frame` cuts is one the parsers can read
//!   without running out of bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use turnpike_proto::DecodeError;
use turnpike_proto::attr::{
    AdditionalAddressFamily, AddressErrorCode, AlternateDomain, AlternateServer, Attribute,
    ChannelNumber, Data, DontFragment, ErrorCode, EvenPort, Fingerprint, IceControlled,
    IceControlling, Icmp, Lifetime, MappedAddress, MessageIntegrity, MessageIntegritySha256, Nonce,
    PasswordAlgorithm, PasswordAlgorithms, Priority, Realm, RequestedAddressFamily,
    RequestedTransport, ReservationToken, Software, UnknownAttributes, UseCandidate, Userhash,
    Username, XorMappedAddress, XorPeerAddress, XorRelayedAddress,
};
use turnpike_proto::auth::{IntegrityKey, long_term_key_md5, long_term_key_sha256};
use turnpike_proto::channel::{CHANNEL_HEADER_LEN, ChannelData, Frame, next_frame};
use turnpike_proto::demux::{PacketKind, classify};
use turnpike_proto::stun::{
    Class, HEADER_LEN, Message, MessageWriter, Method, TransactionId, padded,
};
use turnpike_proto::turn::{
    MAX_DATA_INDICATION_HEADER, SendIndication, data_indication_header_len,
    write_data_indication_header,
};

// The keys tried are those of the seeds (`examples/make_seeds.rs`), so that inputs derived
// from them reach the "integrity matches" paths too.

/// Short-term passwords: the RFC 5769 one and the seeds' ICE one.
const SHORT_TERM: [&[u8]; 2] = [b"VOkJxbRl1RmTxUk/WvJxBt", b"ice-password"];
/// Passwords tried as long-term credentials with the message's own USERNAME and REALM,
/// the way a server derives its key: the RFC 5769 one and the seeds' one.
const PASSWORDS: [&str; 2] = ["TheMatrIX", "fuzz-password"];
/// The seeds' credentials, for messages that carry no USERNAME (responses, and requests
/// that send USERHASH instead).
const SEED_CREDENTIALS: (&str, &str, &str) = ("alice", "turnpike.example", "fuzz-password");

/// Most frames cut from one input read as a stream; bounds the work per input.
const MAX_STREAM_FRAMES: usize = 16;

fuzz_target!(|data: &[u8]| {
    datagram(data);
    stream(data);
});

/// The input as one UDP datagram, the way the server's receive path sees it.
fn datagram(data: &[u8]) {
    let kind = classify(data);
    if let Ok(m) = Message::parse(data) {
        let len = m.as_bytes().len();
        assert_eq!(next_frame(data), Ok(Frame::Complete(len)));
        assert!(len >= HEADER_LEN && len <= data.len() && (len - HEADER_LEN).is_multiple_of(4));
        message(&m);
    }
    match ChannelData::parse(data) {
        Ok(cd) => {
            assert_eq!(kind, PacketKind::ChannelData);
            channel_data(data, &cd);
        }
        Err(DecodeError::BadChannelNumber) => assert_ne!(kind, PacketKind::ChannelData),
        Err(_) => {}
    }
}

/// The input as the first bytes of a TCP stream: cut frames until one is incomplete.
fn stream(mut data: &[u8]) {
    for _ in 0..MAX_STREAM_FRAMES {
        let n = match next_frame(data) {
            Ok(Frame::Complete(n)) => n,
            Ok(Frame::Incomplete(need)) => {
                assert!(need > data.len(), "incomplete with enough bytes");
                return;
            }
            Err(_) => return,
        };
        assert!(n > 0 && n <= data.len());
        let (frame, rest) = data.split_at(n);
        if classify(frame) == PacketKind::ChannelData {
            // The framer counts the padding, which the UDP parser allows.
            let cd = ChannelData::parse(frame).expect("a framed ChannelData parses");
            assert_eq!(padded(CHANNEL_HEADER_LEN + cd.payload.len()), n);
        } else {
            match Message::parse(frame) {
                Ok(m) => {
                    assert_eq!(m.as_bytes().len(), n);
                    message(&m);
                }
                Err(e) => assert!(
                    !matches!(
                        e,
                        DecodeError::Truncated
                            | DecodeError::NotStun
                            | DecodeError::BadMagicCookie
                            | DecodeError::UnalignedLength
                    ),
                    "framed STUN message rejected by its header: {e:?}"
                ),
            }
        }
        data = rest;
    }
}

fn channel_data(data: &[u8], cd: &ChannelData<'_>) {
    let end = CHANNEL_HEADER_LEN + cd.payload.len();
    assert!(end <= data.len() && data.len() <= padded(end));
    let mut out = vec![0u8; padded(end)];
    assert_eq!(cd.encode(&mut out, false), Ok(end));
    assert_eq!(&out[..end], &data[..end]);
    assert_eq!(cd.encode(&mut out, true), Ok(padded(end)));
}

fn message(m: &Message<'_>) {
    let _ = format!("{m:?}");
    let _ = (m.method(), m.class(), m.transaction_id());
    for a in m.raw_attributes() {
        assert!(m.has(a.typ));
    }
    assert!(m.unknown_required().iter().all(|t| *t < 0x8000));

    lookups(m);
    integrity(m);
    rebuild(m);

    if let Ok(send) = SendIndication::from_message(m) {
        relay(m.transaction_id(), &send);
    }
}

/// Looks up attribute type `$t` in `$m`, first and all occurrences: each value that
/// decodes is written alone into a fresh message, which must give it back. Evaluates to
/// the first occurrence, if it decodes. A macro, not a generic function, because the
/// copy's value borrows a shorter-lived buffer: `Username<'input>` and `Username<'copy>`
/// are different types that only a path without lifetimes names both of.
macro_rules! lookup {
    ($m:expr, $t:ident) => {{
        let m: &Message<'_> = $m;
        let tid = m.transaction_id();
        for v in m.attrs::<$t>().flatten() {
            let mut buf = vec![0u8; HEADER_LEN + 4 + padded(v.encoded_len())];
            let mut w = MessageWriter::new(&mut buf, Method::BINDING, Class::Request, tid)
                .expect("header fits");
            w.add(&v).expect("a decoded value encodes");
            assert_eq!(w.finish(), buf.len());
            let copy = Message::parse(&buf).expect("an encoded value parses");
            assert_eq!(copy.attr::<$t>(), Ok(Some(v)), "round trip");
        }
        let first = m.attr::<$t>();
        assert_eq!(
            first.is_ok(),
            m.attrs::<$t>().next().is_none_or(|r| r.is_ok())
        );
        first.ok().flatten()
    }};
}

/// Every typed lookup.
fn lookups(m: &Message<'_>) {
    lookup!(m, MappedAddress);
    lookup!(m, XorMappedAddress);
    lookup!(m, XorPeerAddress);
    lookup!(m, XorRelayedAddress);
    lookup!(m, AlternateServer);
    lookup!(m, Username);
    lookup!(m, Realm);
    lookup!(m, Nonce);
    lookup!(m, Software);
    lookup!(m, AlternateDomain);
    lookup!(m, Userhash);
    lookup!(m, ReservationToken);
    lookup!(m, Lifetime);
    lookup!(m, Fingerprint);
    lookup!(m, Priority);
    lookup!(m, IceControlled);
    lookup!(m, IceControlling);
    lookup!(m, DontFragment);
    lookup!(m, UseCandidate);
    lookup!(m, MessageIntegrity);
    lookup!(m, MessageIntegritySha256);
    lookup!(m, Data);
    lookup!(m, ErrorCode);
    lookup!(m, ChannelNumber);
    lookup!(m, RequestedAddressFamily);
    lookup!(m, AdditionalAddressFamily);
    lookup!(m, EvenPort);
    lookup!(m, RequestedTransport);
    lookup!(m, PasswordAlgorithm);
    lookup!(m, AddressErrorCode);
    lookup!(m, Icmp);
    if let Some(u) = lookup!(m, UnknownAttributes) {
        assert_eq!(u.types().count() * 2, u.encoded_len());
    }
    if let Some(p) = lookup!(m, PasswordAlgorithms) {
        // The last algorithm's padding may be cut off at the end of the value.
        let listed: usize = p.algorithms().map(|a| 4 + padded(a.params.len())).sum();
        assert!(listed >= p.raw().len() && listed <= p.raw().len() + 3);
    }
}

/// Verifies integrity and fingerprint with every key the seeds use.
fn integrity(m: &Message<'_>) {
    let fp = m.verify_fingerprint();
    assert_eq!(fp == Ok(false), !m.has_fingerprint());

    let user = m.attr::<Username<'_>>().ok().flatten().map_or("", |u| u.0);
    let realm = m.attr::<Realm<'_>>().ok().flatten().map_or("", |r| r.0);
    let mut keys = Vec::new();
    for p in SHORT_TERM {
        keys.push(IntegrityKey::Sha1(p.to_vec()));
        keys.push(IntegrityKey::Sha256(p.to_vec()));
    }
    let long_term = PASSWORDS
        .iter()
        .map(|p| (user, realm, *p))
        .chain([SEED_CREDENTIALS]);
    for (u, r, p) in long_term {
        keys.push(IntegrityKey::Sha1(long_term_key_md5(u, r, p).to_vec()));
        keys.push(IntegrityKey::Sha256(long_term_key_sha256(u, r, p).to_vec()));
    }
    for key in &keys {
        let r = m.verify(key);
        match key {
            IntegrityKey::Sha1(k) => {
                assert_eq!(r, m.verify_integrity(k));
                assert_eq!(r == Err(DecodeError::MissingIntegrity), !m.has_integrity());
            }
            IntegrityKey::Sha256(k) => {
                assert_eq!(r, m.verify_integrity_sha256(k));
                assert_eq!(
                    r == Err(DecodeError::MissingIntegrity),
                    !m.has_integrity_sha256()
                );
            }
        }
    }
}

/// Rebuilds the message from its raw attributes (dropping the ignored ones and zeroing
/// padding); the copy must parse to the same attributes.
fn rebuild(m: &Message<'_>) {
    let mut buf = vec![0u8; m.as_bytes().len()];
    let mut w = MessageWriter::new(&mut buf, m.method(), m.class(), m.transaction_id())
        .expect("header fits");
    for a in m.raw_attributes() {
        w.add_raw(a.typ, a.value)
            .expect("fits in the original's size");
    }
    let n = w.finish();
    let copy = Message::parse(&buf[..n]).expect("a rebuilt message parses");
    assert_eq!((copy.method(), copy.class()), (m.method(), m.class()));
    assert_eq!(copy.transaction_id(), m.transaction_id());
    assert!(copy.raw_attributes().eq(m.raw_attributes()));
    assert_eq!(copy.unknown_required(), m.unknown_required());
    assert_eq!(copy.has_integrity(), m.has_integrity());
    assert_eq!(copy.has_integrity_sha256(), m.has_integrity_sha256());
    assert_eq!(copy.has_fingerprint(), m.has_fingerprint());
}

/// The data plane's fast path: a Send indication's payload goes back out to the peer's
/// side as a Data indication whose header is written in front of the payload in place.
fn relay(tid: TransactionId, send: &SendIndication<'_>) {
    let h = data_indication_header_len(&send.peer);
    assert!(h <= MAX_DATA_INDICATION_HEADER);
    let total = h + padded(send.data.len());
    let mut buf = vec![0u8; total];
    buf[h..h + send.data.len()].copy_from_slice(send.data);
    let (header, _) = buf.split_at_mut(h);
    // The Data indication carries the same two attributes as the Send indication it
    // came from and nothing else, so it is never longer and always fits.
    write_data_indication_header(header, tid, &send.peer, send.data.len())
        .expect("a Data indication is no longer than its Send indication");
    let m = Message::parse(&buf).expect("a Data indication parses");
    assert_eq!(
        m.attr::<XorPeerAddress>(),
        Ok(Some(XorPeerAddress(send.peer)))
    );
    assert_eq!(m.attr::<Data<'_>>(), Ok(Some(Data(send.data))));
}
