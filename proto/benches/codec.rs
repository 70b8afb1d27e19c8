//! Codec microbenchmarks: the per-packet work of the relay's hot paths (ChannelData and
//! Send/Data indications) and the per-request work of the control path (integrity of an
//! authenticated Allocate, building its response).
//!
//! `taskset -c 1 cargo bench -p turnpike-proto --bench codec`; results in bench/RESULTS.md.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use turnpike_proto::attr::{
    Data, DontFragment, Lifetime, Nonce, PROTOCOL_UDP, Realm, RequestedTransport, Software,
    Username, XorMappedAddress, XorPeerAddress, XorRelayedAddress,
};
use turnpike_proto::auth::long_term_key_md5;
use turnpike_proto::channel::{CHANNEL_HEADER_LEN, ChannelData};
use turnpike_proto::stun::{Class, Message, MessageWriter, Method, TransactionId, padded};
use turnpike_proto::turn::{
    MAX_DATA_INDICATION_HEADER, SendIndication, data_indication_header_len,
    write_data_indication_header,
};

/// A typical small media packet (an Opus frame with RTP header is about this size).
const PAYLOAD_LEN: usize = 100;
const TID: TransactionId = TransactionId(*b"bench-tid-01");
const USER: &str = "1735689600:alice";
const REALM: &str = "turnpike.example";
const PASSWORD: &str = "correct horse battery staple";
const NONCE: &str = "obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA";

fn peer() -> SocketAddr {
    "198.51.100.7:49152".parse().expect("address literal")
}

fn channel_data_frame() -> Vec<u8> {
    let payload = [0x5A; PAYLOAD_LEN];
    let mut buf = vec![0u8; CHANNEL_HEADER_LEN + PAYLOAD_LEN];
    let cd = ChannelData {
        channel: 0x4001,
        payload: &payload,
    };
    let n = cd.encode(&mut buf, false).expect("frame fits");
    buf.truncate(n);
    buf
}

fn send_indication() -> Vec<u8> {
    let mut buf = vec![0u8; 256];
    let mut w =
        MessageWriter::new(&mut buf, Method::SEND, Class::Indication, TID).expect("header fits");
    w.add(&XorPeerAddress(peer())).expect("fits");
    w.add(&DontFragment).expect("fits");
    w.add(&Data(&[0x5A; PAYLOAD_LEN])).expect("fits");
    let n = w.finish();
    buf.truncate(n);
    buf
}

/// The second Allocate of RFC 8656 §3.1's exchange, after the 401: what a client sends.
fn authenticated_allocate(key: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    let mut w =
        MessageWriter::new(&mut buf, Method::ALLOCATE, Class::Request, TID).expect("header fits");
    w.add(&Username(USER)).expect("fits");
    w.add(&Realm(REALM)).expect("fits");
    w.add(&Nonce(NONCE)).expect("fits");
    w.add(&RequestedTransport(PROTOCOL_UDP)).expect("fits");
    w.add(&Lifetime(600)).expect("fits");
    w.add_integrity(key).expect("fits");
    w.add_fingerprint().expect("fits");
    let n = w.finish();
    buf.truncate(n);
    buf
}

fn bench(c: &mut Criterion) {
    let frame = channel_data_frame();
    c.bench_function("channeldata_parse_100B", |b| {
        b.iter(|| {
            let cd = ChannelData::parse(black_box(&frame)).expect("valid frame");
            black_box((cd.channel, cd.payload.len()))
        })
    });

    let send = send_indication();
    c.bench_function("send_indication_parse_100B", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(&send)).expect("valid message");
            let s = SendIndication::from_message(&m).expect("valid Send indication");
            black_box((s.peer, s.data.len()))
        })
    });

    // The server derives the key once per user and caches it: the per-request cost is
    // the HMAC, measured alone and with the parse and FINGERPRINT check around it.
    let key = long_term_key_md5(USER, REALM, PASSWORD);
    let allocate = authenticated_allocate(&key);
    let parsed = Message::parse(&allocate).expect("valid message");
    c.bench_function("allocate_verify_integrity", |b| {
        b.iter(|| black_box(&parsed).verify_integrity(black_box(&key)))
    });
    c.bench_function("allocate_parse_fingerprint_integrity", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(&allocate)).expect("valid message");
            m.verify_fingerprint().expect("valid fingerprint");
            m.verify_integrity(black_box(&key))
        })
    });

    // The payload sits where recvmmsg put it, after MAX_DATA_INDICATION_HEADER bytes of
    // headroom; the header goes right in front of it.
    let peer = peer();
    let h = data_indication_header_len(&peer);
    let mut packet = vec![0u8; MAX_DATA_INDICATION_HEADER + padded(PAYLOAD_LEN)];
    let at = MAX_DATA_INDICATION_HEADER - h;
    c.bench_function("data_indication_header_write", |b| {
        b.iter(|| {
            let header = &mut packet[at..MAX_DATA_INDICATION_HEADER];
            write_data_indication_header(header, black_box(TID), black_box(&peer), PAYLOAD_LEN)
                .expect("header fits");
            black_box(&packet);
        })
    });

    let relayed: SocketAddr = "203.0.113.1:50000".parse().expect("address literal");
    let mapped: SocketAddr = "192.0.2.9:3478".parse().expect("address literal");
    let mut out = [0u8; 512];
    c.bench_function("allocate_success_build", |b| {
        b.iter(|| {
            let mut w = MessageWriter::new(&mut out, Method::ALLOCATE, Class::Success, TID)
                .expect("header fits");
            w.add(&XorRelayedAddress(black_box(relayed))).expect("fits");
            w.add(&XorMappedAddress(black_box(mapped))).expect("fits");
            w.add(&Lifetime(600)).expect("fits");
            w.add(&Software("turnpike")).expect("fits");
            w.add_integrity(black_box(&key)).expect("fits");
            w.add_fingerprint().expect("fits");
            black_box(w.finish())
        })
    });
}

criterion_group! {
    name = benches;
    // Short measurements: the whole run takes about a minute.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
