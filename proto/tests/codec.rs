//! Codec behaviour beyond the RFC vectors: malformed input, placement rules of the
//! integrity attributes, round trips of generated messages, ChannelData and framing.
#![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]

use std::net::{IpAddr, SocketAddr};

use proptest::prelude::*;
use turnpike_proto::DecodeError;
use turnpike_proto::attr::{
    self, AttrType, ChannelNumber, Data, DontFragment, ErrorCode, EvenPort, Family, Lifetime,
    PasswordAlgorithm, PasswordAlgorithmId, PasswordAlgorithms, RequestedAddressFamily,
    RequestedTransport, ReservationToken, Software, UnknownAttributes, Username, XorPeerAddress,
    XorRelayedAddress,
};
use turnpike_proto::auth::{long_term_key_sha256, userhash};
use turnpike_proto::channel::{ChannelData, Frame, next_frame};
use turnpike_proto::demux::{PacketKind, classify};
use turnpike_proto::stun::{
    Class, ClassicBindingRequest, ClassicTransactionId, HEADER_LEN, MAX_ATTRIBUTES, Message,
    MessageWriter, Method, TransactionId,
};
use turnpike_proto::turn::{
    SendIndication, data_indication_header_len, write_classic_binding_response,
    write_data_indication_header,
};

const TID: TransactionId = TransactionId([7; 12]);

fn binding_with_software() -> Vec<u8> {
    let mut buf = [0u8; 128];
    let mut w = MessageWriter::new(&mut buf, Method::BINDING, Class::Request, TID).unwrap();
    w.add(&Software("abc")).unwrap();
    let n = w.finish();
    buf[..n].to_vec()
}

#[test]
fn truncated_header() {
    let good = binding_with_software();
    for cut in 0..HEADER_LEN {
        assert_eq!(
            Message::parse(&good[..cut]).unwrap_err(),
            DecodeError::Truncated
        );
    }
    // The header announces more than the datagram holds.
    assert_eq!(
        Message::parse(&good[..good.len() - 4]).unwrap_err(),
        DecodeError::Truncated
    );
}

#[test]
fn length_not_multiple_of_four() {
    let mut m = binding_with_software();
    m[3] = 6;
    assert_eq!(
        Message::parse(&m).unwrap_err(),
        DecodeError::UnalignedLength
    );
}

#[test]
fn attribute_overrunning_message() {
    let mut m = binding_with_software();
    // SOFTWARE claims 9 bytes; only 4 (with padding) are there.
    m[23] = 9;
    assert_eq!(
        Message::parse(&m).unwrap_err(),
        DecodeError::AttributeOverrun
    );
    // A header cut in the middle of an attribute.
    let mut m = binding_with_software();
    m[3] = 4;
    assert_eq!(
        Message::parse(&m).unwrap_err(),
        DecodeError::AttributeOverrun
    );
}

#[test]
fn bad_cookie_and_top_bits() {
    let mut m = binding_with_software();
    m[4] ^= 1;
    assert_eq!(Message::parse(&m).unwrap_err(), DecodeError::BadMagicCookie);
    let mut m = binding_with_software();
    m[0] |= 0x80;
    assert_eq!(Message::parse(&m).unwrap_err(), DecodeError::NotStun);
}

#[test]
fn bad_fingerprint_and_wrong_integrity() {
    let mut buf = [0u8; 256];
    let mut w = MessageWriter::new(&mut buf, Method::ALLOCATE, Class::Request, TID).unwrap();
    w.add(&RequestedTransport(attr::PROTOCOL_UDP)).unwrap();
    w.add_integrity(b"key").unwrap();
    w.add_fingerprint().unwrap();
    let n = w.finish();
    let good = buf[..n].to_vec();
    let m = Message::parse(&good).unwrap();
    m.verify_integrity(b"key").unwrap();
    assert_eq!(m.verify_fingerprint(), Ok(true));
    assert_eq!(
        m.verify_integrity(b"kez"),
        Err(DecodeError::IntegrityMismatch)
    );

    let mut bad_fp = good.clone();
    *bad_fp.last_mut().unwrap() ^= 0xFF;
    let m = Message::parse(&bad_fp).unwrap();
    assert_eq!(
        m.verify_fingerprint(),
        Err(DecodeError::FingerprintMismatch)
    );
    m.verify_integrity(b"key").unwrap();

    // A flipped bit in a covered attribute breaks both.
    let mut flipped = good.clone();
    flipped[24] ^= 1;
    let m = Message::parse(&flipped).unwrap();
    assert_eq!(
        m.verify_integrity(b"key"),
        Err(DecodeError::IntegrityMismatch)
    );
    assert_eq!(
        m.verify_fingerprint(),
        Err(DecodeError::FingerprintMismatch)
    );

    // No integrity at all.
    let plain = binding_with_software();
    assert_eq!(
        Message::parse(&plain).unwrap().verify_integrity(b"key"),
        Err(DecodeError::MissingIntegrity)
    );
}

#[test]
fn huge_attribute_counts() {
    // 2000 empty attributes: valid framing, far too many to be a real message.
    let n = 2000;
    let mut m = vec![0u8; HEADER_LEN + 4 * n];
    m[..2].copy_from_slice(&[0, 1]);
    m[2..4].copy_from_slice(&((4 * n) as u16).to_be_bytes());
    m[4..8].copy_from_slice(&0x2112A442u32.to_be_bytes());
    for i in 0..n {
        let at = HEADER_LEN + 4 * i;
        m[at..at + 2].copy_from_slice(&0x8022u16.to_be_bytes());
    }
    assert_eq!(
        Message::parse(&m).unwrap_err(),
        DecodeError::TooManyAttributes
    );
    // Exactly the limit is accepted.
    let k = MAX_ATTRIBUTES;
    let mut ok = m[..HEADER_LEN + 4 * k].to_vec();
    ok[2..4].copy_from_slice(&((4 * k) as u16).to_be_bytes());
    assert_eq!(Message::parse(&ok).unwrap().raw_attributes().count(), k);
}

#[test]
fn attributes_after_integrity_are_ignored() {
    let mut buf = [0u8; 256];
    let mut w = MessageWriter::new(&mut buf, Method::ALLOCATE, Class::Request, TID).unwrap();
    w.add(&Lifetime(600)).unwrap();
    w.add_integrity(b"k").unwrap();
    let n = w.finish();
    // Append DATA after MESSAGE-INTEGRITY, then SHA256 integrity and FINGERPRINT.
    let mut m = buf[..n].to_vec();
    m.extend_from_slice(&[0x00, 0x13, 0x00, 0x04, 1, 2, 3, 4]);
    let len = (m.len() - HEADER_LEN) as u16;
    m[2..4].copy_from_slice(&len.to_be_bytes());
    let msg = Message::parse(&m).unwrap();
    assert!(!msg.has(AttrType(attr::DATA)));
    assert_eq!(msg.attr::<Lifetime>().unwrap(), Some(Lifetime(600)));
    msg.verify_integrity(b"k").unwrap();

    // MESSAGE-INTEGRITY-SHA256 and FINGERPRINT after MESSAGE-INTEGRITY do count.
    let mut buf = [0u8; 256];
    let mut w = MessageWriter::new(&mut buf, Method::ALLOCATE, Class::Request, TID).unwrap();
    w.add(&Lifetime(600)).unwrap();
    w.add_integrity(b"k1").unwrap();
    w.add_integrity_sha256(b"k2").unwrap();
    w.add_fingerprint().unwrap();
    let n = w.finish();
    let msg = Message::parse(&buf[..n]).unwrap();
    msg.verify_integrity(b"k1").unwrap();
    msg.verify_integrity_sha256(b"k2").unwrap();
    assert_eq!(
        msg.verify_integrity_sha256(b"k1"),
        Err(DecodeError::IntegrityMismatch)
    );
    assert_eq!(msg.verify_fingerprint(), Ok(true));

    // The writer refuses attributes after integrity.
    let mut buf = [0u8; 256];
    let mut w = MessageWriter::new(&mut buf, Method::ALLOCATE, Class::Request, TID).unwrap();
    w.add_integrity(b"k").unwrap();
    assert!(w.add(&Lifetime(1)).is_err());
}

#[test]
fn nothing_may_follow_fingerprint() {
    let mut buf = [0u8; 256];
    let mut w = MessageWriter::new(&mut buf, Method::BINDING, Class::Request, TID).unwrap();
    w.add_fingerprint().unwrap();
    let n = w.finish();
    let mut m = buf[..n].to_vec();
    m.extend_from_slice(&[0x80, 0x22, 0x00, 0x00]);
    let len = (m.len() - HEADER_LEN) as u16;
    m[2..4].copy_from_slice(&len.to_be_bytes());
    assert_eq!(
        Message::parse(&m).unwrap_err(),
        DecodeError::AfterFingerprint
    );
}

#[test]
fn truncated_sha256_integrity_verifies() {
    let mut buf = [0u8; 256];
    let mut w = MessageWriter::new(&mut buf, Method::BINDING, Class::Request, TID).unwrap();
    w.add(&Software("x")).unwrap();
    w.add_integrity_sha256(b"key").unwrap();
    let n = w.finish();
    // Truncate the 32-byte MAC to 16 bytes and fix both length fields.
    let mut m = buf[..n - 16].to_vec();
    let mi_at = n - 36;
    m[mi_at + 2..mi_at + 4].copy_from_slice(&16u16.to_be_bytes());
    let len = (m.len() - HEADER_LEN) as u16;
    m[2..4].copy_from_slice(&len.to_be_bytes());
    // The MAC covers the length field: recompute over the truncated framing.
    let mac = turnpike_proto::auth::hmac_sha256_stun(b"key", &m[..mi_at], m.len() - HEADER_LEN);
    m[mi_at + 4..].copy_from_slice(&mac[..16]);
    Message::parse(&m)
        .unwrap()
        .verify_integrity_sha256(b"key")
        .unwrap();
}

#[test]
fn unknown_comprehension_required_reported() {
    let mut buf = [0u8; 256];
    let mut w = MessageWriter::new(&mut buf, Method::ALLOCATE, Class::Request, TID).unwrap();
    w.add_raw(AttrType(0x7777), b"zz").unwrap();
    w.add_raw(AttrType(0xC057), b"opt!").unwrap();
    let n = w.finish();
    let m = Message::parse(&buf[..n]).unwrap();
    assert_eq!(m.unknown_required(), &[0x7777]);
    // Unknown attributes are kept.
    assert_eq!(m.raw(AttrType(0xC057)), Some(&b"opt!"[..]));
    assert_eq!(m.raw(AttrType(0x7777)), Some(&b"zz"[..]));
}

#[test]
fn channel_number_is_strict() {
    let mut buf = [0u8; 64];
    let mut w = MessageWriter::new(&mut buf, Method::CHANNEL_BIND, Class::Request, TID).unwrap();
    w.add_raw(AttrType(attr::CHANNEL_NUMBER), &[0x3F, 0xFF, 0, 0])
        .unwrap();
    let n = w.finish();
    let m = Message::parse(&buf[..n]).unwrap();
    assert!(m.attr::<ChannelNumber>().is_err());
    let mut buf = [0u8; 64];
    let mut w = MessageWriter::new(&mut buf, Method::CHANNEL_BIND, Class::Request, TID).unwrap();
    w.add(&ChannelNumber(0x4FFF)).unwrap();
    let n = w.finish();
    let m = Message::parse(&buf[..n]).unwrap();
    assert_eq!(
        m.attr::<ChannelNumber>().unwrap(),
        Some(ChannelNumber(0x4FFF))
    );
}

#[test]
fn channel_data_framing() {
    let mut out = [0u8; 64];
    let n = ChannelData {
        channel: 0x4001,
        payload: b"hello",
    }
    .encode(&mut out, false)
    .unwrap();
    assert_eq!(n, 9);
    assert_eq!(
        ChannelData::parse(&out[..n]).unwrap(),
        ChannelData {
            channel: 0x4001,
            payload: b"hello"
        }
    );
    // Padded (as over TCP, allowed over UDP).
    let n = ChannelData {
        channel: 0x4FFF,
        payload: b"hello",
    }
    .encode(&mut out, true)
    .unwrap();
    assert_eq!(n, 12);
    assert_eq!(&out[9..12], &[0, 0, 0]);
    assert_eq!(ChannelData::parse(&out[..n]).unwrap().payload, b"hello");
    // Length field larger than the datagram.
    assert_eq!(ChannelData::parse(&out[..8]), Err(DecodeError::Truncated));
    // Datagram longer than the length field plus padding.
    let mut long = out[..12].to_vec();
    long.extend_from_slice(&[0; 4]);
    assert_eq!(
        ChannelData::parse(&long),
        Err(DecodeError::ChannelLengthMismatch)
    );
    // Channel numbers outside the range.
    assert_eq!(
        ChannelData::parse(&[0x50, 0, 0, 0]),
        Err(DecodeError::BadChannelNumber)
    );
    assert_eq!(
        ChannelData::parse(&[0x3F, 0xFF, 0, 0]),
        Err(DecodeError::BadChannelNumber)
    );
    assert!(
        ChannelData {
            channel: 0x3FFF,
            payload: b""
        }
        .encode(&mut out, false)
        .is_err()
    );
    // Empty payload.
    assert_eq!(ChannelData::parse(&[0x40, 0, 0, 0]).unwrap().payload, b"");
}

#[test]
fn stream_framing() {
    let stun = binding_with_software();
    let mut cd = [0u8; 16];
    let cdn = ChannelData {
        channel: 0x4002,
        payload: b"abcde",
    }
    .encode(&mut cd, true)
    .unwrap();
    let mut stream = cd[..cdn].to_vec();
    stream.extend_from_slice(&stun);
    assert_eq!(next_frame(&stream), Ok(Frame::Complete(12)));
    assert_eq!(next_frame(&stream[12..]), Ok(Frame::Complete(stun.len())));
    assert_eq!(
        next_frame(&stream[12..20]),
        Ok(Frame::Incomplete(stun.len()))
    );
    assert_eq!(next_frame(&[0x40, 0x00]), Ok(Frame::Incomplete(4)));
    assert_eq!(next_frame(&[0x40, 0, 0, 5, 1]), Ok(Frame::Incomplete(12)));
    assert_eq!(next_frame(&[0x80, 0, 0, 0]), Err(DecodeError::NotTurn));
    assert_eq!(
        next_frame(&[0, 1, 0, 2, 0x21, 0x12, 0xa4, 0x42]),
        Err(DecodeError::UnalignedLength)
    );
    assert_eq!(
        next_frame(&[0, 1, 0, 0, 1, 2, 3, 4]),
        Err(DecodeError::BadMagicCookie)
    );
}

#[test]
fn demultiplexing() {
    assert_eq!(classify(&[0x00]), PacketKind::Stun);
    assert_eq!(classify(&[0x03]), PacketKind::Stun);
    assert_eq!(classify(&[0x04]), PacketKind::Other);
    assert_eq!(classify(&[16]), PacketKind::Zrtp);
    assert_eq!(classify(&[20]), PacketKind::Dtls);
    assert_eq!(classify(&[63]), PacketKind::Dtls);
    assert_eq!(classify(&[0x40]), PacketKind::ChannelData);
    assert_eq!(classify(&[0x4F]), PacketKind::ChannelData);
    assert_eq!(classify(&[0x50]), PacketKind::Other);
    assert_eq!(classify(&[128]), PacketKind::Rtp);
    assert_eq!(classify(&[191]), PacketKind::Rtp);
    assert_eq!(classify(&[192]), PacketKind::Other);
    assert_eq!(classify(&[]), PacketKind::Other);
}

#[test]
fn data_indication_in_place() {
    for peer in ["198.51.100.7:4000", "[2001:db8::9]:65000"] {
        let peer: SocketAddr = peer.parse().unwrap();
        for payload in [&b""[..], b"x", b"hello world!", &[0xAB; 1400]] {
            let h = data_indication_header_len(&peer);
            assert!(h <= turnpike_proto::turn::MAX_DATA_INDICATION_HEADER);
            let mut buf = vec![0u8; h + payload.len() + 3];
            buf[h..h + payload.len()].copy_from_slice(payload);
            write_data_indication_header(&mut buf[..h], TID, &peer, payload.len()).unwrap();
            let total = h + turnpike_proto::stun::padded(payload.len());
            let m = Message::parse(&buf[..total]).unwrap();
            assert_eq!((m.method(), m.class()), (Method::DATA, Class::Indication));
            assert_eq!(
                m.attr::<XorPeerAddress>().unwrap(),
                Some(XorPeerAddress(peer))
            );
            assert_eq!(m.attr::<Data>().unwrap(), Some(Data(payload)));
        }
    }
}

#[test]
fn send_indication_fields() {
    let peer: SocketAddr = "203.0.113.5:999".parse().unwrap();
    let mut buf = [0u8; 128];
    let mut w = MessageWriter::new(&mut buf, Method::SEND, Class::Indication, TID).unwrap();
    w.add(&XorPeerAddress(peer)).unwrap();
    w.add(&DontFragment).unwrap();
    w.add(&Data(b"payload")).unwrap();
    let n = w.finish();
    let m = Message::parse(&buf[..n]).unwrap();
    let s = SendIndication::from_message(&m).unwrap();
    assert_eq!(
        s,
        SendIndication {
            peer,
            data: b"payload",
            dont_fragment: true
        }
    );
    // DATA missing.
    let mut w = MessageWriter::new(&mut buf, Method::SEND, Class::Indication, TID).unwrap();
    w.add(&XorPeerAddress(peer)).unwrap();
    let n = w.finish();
    assert!(SendIndication::from_message(&Message::parse(&buf[..n]).unwrap()).is_err());
}

#[test]
fn password_algorithms_and_userhash() {
    let offered = [PasswordAlgorithmId::SHA256, PasswordAlgorithmId::MD5];
    let mut buf = [0u8; 256];
    let mut w = MessageWriter::new(&mut buf, Method::ALLOCATE, Class::Error, TID).unwrap();
    w.add(&ErrorCode {
        code: 401,
        reason: "Unauthorized",
    })
    .unwrap();
    w.add(&PasswordAlgorithms::new(&offered)).unwrap();
    w.add(&PasswordAlgorithm {
        algorithm: PasswordAlgorithmId::SHA256,
        params: &[],
    })
    .unwrap();
    let n = w.finish();
    let m = Message::parse(&buf[..n]).unwrap();
    let pa = m.attr::<PasswordAlgorithms>().unwrap().unwrap();
    let ids: Vec<_> = pa.algorithms().map(|a| a.algorithm).collect();
    assert_eq!(ids, offered);
    assert_eq!(pa.raw(), &[0, 2, 0, 0, 0, 1, 0, 0]);
    assert_eq!(
        m.attr::<ErrorCode>().unwrap(),
        Some(ErrorCode {
            code: 401,
            reason: "Unauthorized"
        })
    );
    assert_eq!(userhash("u", "r").len(), 32);
    assert_ne!(
        long_term_key_sha256("u", "r", "p"),
        long_term_key_sha256("u", "r", "q")
    );
}

fn arb_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
    ]
}

#[derive(Debug, Clone)]
enum GenAttr {
    Username(String),
    Software(String),
    Lifetime(u32),
    Peer(SocketAddr),
    Relayed(SocketAddr),
    Data(Vec<u8>),
    Channel(u16),
    Error(u16, String),
    Even(bool),
    Family(u8),
    Token([u8; 8]),
    Unknown(Vec<u16>),
}

fn arb_attr() -> impl Strategy<Value = GenAttr> {
    prop_oneof![
        "[a-zA-Z0-9:@.]{0,64}".prop_map(GenAttr::Username),
        "\\PC{0,40}".prop_map(GenAttr::Software),
        any::<u32>().prop_map(GenAttr::Lifetime),
        arb_addr().prop_map(GenAttr::Peer),
        arb_addr().prop_map(GenAttr::Relayed),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(GenAttr::Data),
        (0x4000u16..=0x4FFF).prop_map(GenAttr::Channel),
        (300u16..700, "[a-zA-Z ]{0,30}").prop_map(|(c, r)| GenAttr::Error(c, r)),
        any::<bool>().prop_map(GenAttr::Even),
        prop_oneof![Just(1u8), Just(2u8)].prop_map(GenAttr::Family),
        any::<[u8; 8]>().prop_map(GenAttr::Token),
        proptest::collection::vec(any::<u16>(), 0..6).prop_map(GenAttr::Unknown),
    ]
}

fn write(w: &mut MessageWriter<'_>, a: &GenAttr) {
    match a {
        GenAttr::Username(s) => w.add(&Username(s)),
        GenAttr::Software(s) => w.add(&Software(s)),
        GenAttr::Lifetime(v) => w.add(&Lifetime(*v)),
        GenAttr::Peer(p) => w.add(&XorPeerAddress(*p)),
        GenAttr::Relayed(p) => w.add(&XorRelayedAddress(*p)),
        GenAttr::Data(d) => w.add(&Data(d)),
        GenAttr::Channel(c) => w.add(&ChannelNumber(*c)),
        GenAttr::Error(c, r) => w.add(&ErrorCode {
            code: *c,
            reason: r,
        }),
        GenAttr::Even(r) => w.add(&EvenPort { reserve: *r }),
        GenAttr::Family(f) => w.add(&RequestedAddressFamily(if *f == 1 {
            Family::V4
        } else {
            Family::V6
        })),
        GenAttr::Token(t) => w.add(&ReservationToken(*t)),
        GenAttr::Unknown(l) => w.add(&UnknownAttributes::new(l)),
    }
    .map(|_| ())
    .unwrap();
}

fn check(m: &Message<'_>, a: &GenAttr, raw: &[u8]) {
    let tid = m.transaction_id();
    use turnpike_proto::attr::Attribute;
    match a {
        GenAttr::Username(s) => assert_eq!(Username::decode(raw, &tid).unwrap().0, s),
        GenAttr::Software(s) => assert_eq!(Software::decode(raw, &tid).unwrap().0, s),
        GenAttr::Lifetime(v) => assert_eq!(Lifetime::decode(raw, &tid).unwrap().0, *v),
        GenAttr::Peer(p) => assert_eq!(XorPeerAddress::decode(raw, &tid).unwrap().0, *p),
        GenAttr::Relayed(p) => assert_eq!(XorRelayedAddress::decode(raw, &tid).unwrap().0, *p),
        GenAttr::Data(d) => assert_eq!(Data::decode(raw, &tid).unwrap().0, d.as_slice()),
        GenAttr::Channel(c) => assert_eq!(ChannelNumber::decode(raw, &tid).unwrap().0, *c),
        GenAttr::Error(c, r) => {
            let e = ErrorCode::decode(raw, &tid).unwrap();
            assert_eq!((e.code, e.reason), (*c, r.as_str()));
        }
        GenAttr::Even(r) => assert_eq!(EvenPort::decode(raw, &tid).unwrap().reserve, *r),
        GenAttr::Family(f) => {
            let want = if *f == 1 { Family::V4 } else { Family::V6 };
            assert_eq!(RequestedAddressFamily::decode(raw, &tid).unwrap().0, want)
        }
        GenAttr::Token(t) => assert_eq!(ReservationToken::decode(raw, &tid).unwrap().0, *t),
        GenAttr::Unknown(l) => {
            let got: Vec<u16> = UnknownAttributes::decode(raw, &tid)
                .unwrap()
                .types()
                .collect();
            assert_eq!(&got, l)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn round_trip(
        method in 0u16..0x1000,
        class in 0u8..4,
        tid in any::<[u8; 12]>(),
        attrs in proptest::collection::vec(arb_attr(), 0..12),
        integrity in proptest::option::of(proptest::collection::vec(any::<u8>(), 1..40)),
        sha256 in any::<bool>(),
        fingerprint in any::<bool>(),
    ) {
        let class = [Class::Request, Class::Indication, Class::Success, Class::Error][class as usize];
        let mut buf = vec![0u8; 8192];
        let mut w = MessageWriter::new(&mut buf, Method(method), class, TransactionId(tid)).unwrap();
        for a in &attrs {
            write(&mut w, a);
        }
        if let Some(k) = &integrity {
            w.add_integrity(k).unwrap();
            if sha256 {
                w.add_integrity_sha256(k).unwrap();
            }
        }
        if fingerprint {
            w.add_fingerprint().unwrap();
        }
        let n = w.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        prop_assert_eq!(m.method(), Method(method));
        prop_assert_eq!(m.class(), class);
        prop_assert_eq!(m.transaction_id(), TransactionId(tid));
        let extra = integrity.is_some() as usize + (integrity.is_some() && sha256) as usize + fingerprint as usize;
        let raws: Vec<_> = m.raw_attributes().collect();
        prop_assert_eq!(raws.len(), attrs.len() + extra);
        for (a, r) in attrs.iter().zip(&raws) {
            check(&m, a, r.value);
        }
        if let Some(k) = &integrity {
            prop_assert!(m.verify_integrity(k).is_ok());
            if sha256 {
                prop_assert!(m.verify_integrity_sha256(k).is_ok());
            }
        }
        prop_assert_eq!(m.verify_fingerprint(), Ok(fingerprint));
    }

    /// Arbitrary bytes, and arbitrary bytes behind a valid header, never panic.
    #[test]
    fn garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..600), valid_header in any::<bool>(), classic in any::<bool>()) {
        let mut buf = body.clone();
        if valid_header && buf.len() >= 20 {
            let len = ((buf.len() - 20) & !3) as u16;
            buf[0] &= 0x3F;
            buf[2..4].copy_from_slice(&len.to_be_bytes());
            if classic {
                // A classic Binding request's header, attributes of random bytes.
                buf[..2].copy_from_slice(&[0x00, 0x01]);
                buf.truncate(20 + usize::from(len));
            } else {
                buf[4..8].copy_from_slice(&0x2112A442u32.to_be_bytes());
            }
        }
        if let Ok(m) = Message::parse(&buf) {
            for a in m.raw_attributes() {
                prop_assert!(a.value.len() <= buf.len());
            }
            let _ = m.verify_integrity(b"k");
            let _ = m.verify_integrity_sha256(b"k");
            let _ = m.verify_fingerprint();
            let _ = m.attr::<XorPeerAddress>();
            let _ = m.attr::<ErrorCode>();
            let _ = m.attr::<PasswordAlgorithms>().map(|p| p.map(|p| p.algorithms().count()));
            let _ = m.attr::<UnknownAttributes>().map(|u| u.map(|u| u.types().count()));
            let _ = SendIndication::from_message(&m);
        }
        if let Some(c) = ClassicBindingRequest::parse(&buf) {
            prop_assert!(Message::parse(&buf).is_err());
            let mut out = [0u8; 44];
            for n in 0..=out.len() {
                let _ = write_classic_binding_response(&mut out[..n], &c, "[::1]:9".parse().unwrap());
            }
        }
        let _ = ChannelData::parse(&buf);
        let _ = next_frame(&buf);
        let _ = classify(&buf);
    }
}

/// A classic RFC 3489 Binding request, built by hand: no magic cookie, a 16-byte
/// transaction id, and a CHANGE-REQUEST (0x0003) asking for nothing, as `stun`-style
/// clients send in their first test.
fn classic_binding_request() -> Vec<u8> {
    let mut req = vec![0x00, 0x01, 0x00, 0x08];
    req.extend(0xA0u8..0xB0);
    req.extend([0x00, 0x03, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00]);
    req
}

#[test]
fn classic_binding_answered_with_mapped_address() {
    let req = classic_binding_request();
    assert_eq!(
        Message::parse(&req).unwrap_err(),
        DecodeError::BadMagicCookie
    );
    let c = ClassicBindingRequest::parse(&req).unwrap();
    let tid: [u8; 16] = core::array::from_fn(|i| 0xA0 + i as u8);
    assert_eq!(c.transaction_id(), ClassicTransactionId(tid));

    let mut out = [0xEEu8; 64];
    let n =
        write_classic_binding_response(&mut out, &c, "192.0.2.1:32853".parse().unwrap()).unwrap();
    let mut want = vec![0x01, 0x01, 0x00, 0x0C];
    want.extend(tid);
    want.extend([0x00, 0x01, 0x00, 0x08, 0x00, 0x01, 0x80, 0x55, 192, 0, 2, 1]);
    assert_eq!(&out[..n], &want[..]);

    let v6: SocketAddr = "[2001:db8::1:2]:3478".parse().unwrap();
    let n = write_classic_binding_response(&mut out, &c, v6).unwrap();
    let mut want = vec![0x01, 0x01, 0x00, 0x18];
    want.extend(tid);
    want.extend([0x00, 0x01, 0x00, 0x14, 0x00, 0x02, 0x0D, 0x96]);
    want.extend([
        0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0, 0x02,
    ]);
    assert_eq!(&out[..n], &want[..]);
    // MAPPED-ADDRESS reads back with the codec's own decoder.
    let value = &out[HEADER_LEN + 4..n];
    assert_eq!(
        <attr::MappedAddress as attr::Attribute>::decode(value, &TID)
            .unwrap()
            .0,
        v6
    );

    for short in 0..n {
        assert!(write_classic_binding_response(&mut out[..short], &c, v6).is_err());
    }
}

#[test]
fn only_classic_binding_requests_are_classic() {
    let req = classic_binding_request();
    // Without attributes, as RFC 3489 clients also send it.
    assert!(ClassicBindingRequest::parse(&[&[0, 1, 0, 0][..], &[9; 16]].concat()).is_some());
    // Truncated anywhere, or with bytes the length does not account for.
    for n in 0..req.len() {
        assert_eq!(ClassicBindingRequest::parse(&req[..n]), None, "{n} bytes");
    }
    assert_eq!(
        ClassicBindingRequest::parse(&[&req[..], &[0; 4]].concat()),
        None
    );
    let with = |at: usize, b: &[u8]| {
        let mut r = req.clone();
        r[at..at + b.len()].copy_from_slice(b);
        ClassicBindingRequest::parse(&r)
    };
    // A length that is not a multiple of 4.
    assert_eq!(with(2, &[0x00, 0x07]), None);
    // Other methods and classes without the cookie: an Allocate request, a Binding
    // indication and success response, and a type with the top bits set.
    for typ in [[0x00, 0x03], [0x00, 0x11], [0x01, 0x01], [0xC0, 0x01]] {
        assert_eq!(with(0, &typ), None, "{typ:02x?}");
    }
    // With the cookie it is a modern request, for `Message::parse`.
    assert_eq!(with(4, &0x2112A442u32.to_be_bytes()), None);
    assert!(ClassicBindingRequest::parse(&binding_with_software()).is_none());
}

#[test]
fn legacy_channel_range_is_opt_in() {
    let frame = [0x59, 0x60, 0, 2, 0xAB, 0xCD];
    assert_eq!(
        ChannelData::parse(&frame),
        Err(DecodeError::BadChannelNumber)
    );
    let cd = ChannelData::parse_up_to(&frame, attr::CHANNEL_MAX_LEGACY).unwrap();
    assert_eq!((cd.channel, cd.payload), (0x5960, &[0xAB, 0xCD][..]));
    assert_eq!(
        ChannelData::parse_up_to(&[0x80, 0, 0, 0], 0xFFFF),
        Err(DecodeError::BadChannelNumber)
    );
    assert_eq!(
        attr::legacy_channel_number(&[0x7F, 0xFF, 0, 0]),
        Some(0x7FFF)
    );
    assert_eq!(attr::legacy_channel_number(&[0x80, 0x00, 0, 0]), None);
}

#[test]
fn rfc5780_attributes_round_trip() {
    use turnpike_proto::attr::{ChangeRequest, OtherAddress, ResponseOrigin};
    let origin: SocketAddr = "192.0.2.2:3479".parse().unwrap();
    let other: SocketAddr = "[2001:db8::2]:3479".parse().unwrap();
    for (change_ip, change_port) in [(false, false), (true, false), (false, true), (true, true)] {
        let cr = ChangeRequest {
            change_ip,
            change_port,
        };
        let mut buf = [0u8; 256];
        let mut w = MessageWriter::new(&mut buf, Method::BINDING, Class::Request, TID).unwrap();
        w.add(&cr).unwrap();
        w.add(&ResponseOrigin(origin)).unwrap();
        w.add(&OtherAddress(other)).unwrap();
        let n = w.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(m.attr::<ChangeRequest>().unwrap(), Some(cr));
        assert_eq!(
            m.attr::<ResponseOrigin>().unwrap(),
            Some(ResponseOrigin(origin))
        );
        assert_eq!(m.attr::<OtherAddress>().unwrap(), Some(OtherAddress(other)));
        // CHANGE-REQUEST is comprehension-required and left to the server to understand.
        assert_eq!(m.unknown_required(), &[attr::CHANGE_REQUEST]);
    }
    // The wire form of RFC 5780 §7.2: change-IP is 0x4, change-port 0x2, other bits ignored.
    let mut buf = [0u8; 64];
    let mut w = MessageWriter::new(&mut buf, Method::BINDING, Class::Request, TID).unwrap();
    w.add_raw(AttrType(attr::CHANGE_REQUEST), &[0, 0, 0, 0x4 | 0x1])
        .unwrap();
    let n = w.finish();
    assert_eq!(&buf[20..24], &[0x00, 0x03, 0x00, 0x04]);
    let m = Message::parse(&buf[..n]).unwrap();
    assert_eq!(
        m.attr::<ChangeRequest>().unwrap(),
        Some(ChangeRequest {
            change_ip: true,
            change_port: false
        })
    );
    // A value of the wrong length is an error, not a guess.
    let mut w = MessageWriter::new(&mut buf, Method::BINDING, Class::Request, TID).unwrap();
    w.add_raw(AttrType(attr::CHANGE_REQUEST), &[0, 0, 4])
        .unwrap();
    let n = w.finish();
    assert!(
        Message::parse(&buf[..n])
            .unwrap()
            .attr::<ChangeRequest>()
            .is_err()
    );
}
