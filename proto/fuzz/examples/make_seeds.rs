//! Writes the seed corpus: the RFC 5769 vectors and one message of each kind a TURN
//! server handles, authenticated with the password the fuzz target tries.
//!
//! `cargo run --example make_seeds -- seeds` (from proto/fuzz) rewrites `seeds/`; the
//! output is deterministic, so a diff shows what changed.

use std::net::SocketAddr;
use std::path::PathBuf;

use turnpike_proto::attr::{
    AdditionalAddressFamily, AddressErrorCode, AlternateDomain, AlternateServer, AttrType,
    ChannelNumber, Data, DontFragment, ErrorCode, EvenPort, Family, IceControlling, Icmp, Lifetime,
    MappedAddress, Nonce, PROTOCOL_UDP, PasswordAlgorithm, PasswordAlgorithmId, PasswordAlgorithms,
    Priority, Realm, RequestedAddressFamily, RequestedTransport, ReservationToken, Software,
    UnknownAttributes, UseCandidate, Userhash, Username, XorMappedAddress, XorPeerAddress,
    XorRelayedAddress,
};
use turnpike_proto::auth::{long_term_key_md5, long_term_key_sha256, userhash};
use turnpike_proto::channel::ChannelData;
use turnpike_proto::stun::{Class, MessageWriter, Method, TransactionId};
use turnpike_proto::turn::{data_indication_header_len, write_data_indication_header};

// The credentials must be the fuzz target's SEED_CREDENTIALS, and the ICE password one
// of its SHORT_TERM passwords.
const USER: &str = "alice";
const REALM: &str = "turnpike.example";
const PASSWORD: &str = "fuzz-password";
const NONCE: &str = "obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA";
const TID: TransactionId = TransactionId(*b"fuzz-seed-01");

/// RFC 5769 §2.1 to §2.4, as the RFC prints them.
const RFC5769: [(&str, &str); 4] = [
    (
        "rfc5769-request",
        "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74\
         002400046e0001ff80290008932ff9b151263b36000600096576746a3a68367659202020\
         000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf",
    ),
    (
        "rfc5769-ipv4-response",
        "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220\
         002000080001a147e112a643000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7\
         80280004c07d4c96",
    ),
    (
        "rfc5769-ipv6-response",
        "010100482112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220\
         002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d900080014a382954e4be67bf1\
         1784c97c8292c275bfe3ed4180280004c8fb0b4c",
    ),
    (
        "rfc5769-long-term",
        "000100602112a44278ad3433c6ad72c029da412e00060012e3839ee38388e383aae38383e382afe382b90000\
         0015001c662f2f3439396b39353464364f4c33346f4c39465354767936347341\
         0014000b6578616d706c652e6f726700\
         00080014f67024656dd64a3e02b8e0712e85c9a28ca89666",
    ),
];

fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).expect("ascii"), 16).expect("hex"))
        .collect()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address literal")
}

/// Builds one message; `body` adds the attributes.
fn build(
    method: Method,
    class: Class,
    body: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), turnpike_proto::EncodeError>,
) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let mut w = MessageWriter::new(&mut buf, method, class, TID).expect("header fits");
    body(&mut w).expect("seed message fits");
    let n = w.finish();
    buf.truncate(n);
    buf
}

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "seeds".into()));
    std::fs::create_dir_all(&dir)?;
    let md5 = long_term_key_md5(USER, REALM, PASSWORD);
    let sha256 = long_term_key_sha256(USER, REALM, PASSWORD);
    let peer4 = addr("198.51.100.7:49152");
    let peer6 = addr("[2001:db8::7]:49153");

    let mut seeds: Vec<(String, Vec<u8>)> = RFC5769
        .iter()
        .map(|(name, h)| (name.to_string(), hex(h)))
        .collect();

    let allocate = build(Method::ALLOCATE, Class::Request, |w| {
        w.add(&Username(USER))?;
        w.add(&Realm(REALM))?;
        w.add(&Nonce(NONCE))?;
        w.add(&RequestedTransport(PROTOCOL_UDP))?;
        w.add(&Lifetime(600))?;
        w.add_integrity(&md5)?;
        w.add_fingerprint()?;
        Ok(())
    });
    seeds.push(("allocate-request-md5".into(), allocate));

    let algorithms = [PasswordAlgorithmId::SHA256, PasswordAlgorithmId::MD5];
    seeds.push((
        "allocate-request-sha256".into(),
        build(Method::ALLOCATE, Class::Request, |w| {
            w.add(&Userhash(userhash(USER, REALM)))?;
            w.add(&Realm(REALM))?;
            w.add(&Nonce(NONCE))?;
            w.add(&PasswordAlgorithms::new(&algorithms))?;
            w.add(&PasswordAlgorithm {
                algorithm: PasswordAlgorithmId::SHA256,
                params: &[],
            })?;
            w.add(&RequestedTransport(PROTOCOL_UDP))?;
            w.add(&RequestedAddressFamily(Family::V6))?;
            w.add(&EvenPort { reserve: true })?;
            w.add(&DontFragment)?;
            w.add_integrity_sha256(&sha256)?;
            w.add_fingerprint()?;
            Ok(())
        }),
    ));

    seeds.push((
        "allocate-success".into(),
        build(Method::ALLOCATE, Class::Success, |w| {
            w.add(&XorRelayedAddress(addr("203.0.113.1:50000")))?;
            w.add(&XorRelayedAddress(addr("[2001:db8::1]:50002")))?;
            w.add(&XorMappedAddress(addr("192.0.2.9:3478")))?;
            w.add(&Lifetime(600))?;
            w.add(&ReservationToken(*b"reserved"))?;
            w.add(&Software("turnpike"))?;
            w.add_integrity(&md5)?;
            w.add_fingerprint()?;
            Ok(())
        }),
    ));

    seeds.push((
        "allocate-401".into(),
        build(Method::ALLOCATE, Class::Error, |w| {
            w.add(&ErrorCode {
                code: 401,
                reason: "Unauthorized",
            })?;
            w.add(&Realm(REALM))?;
            w.add(&Nonce(NONCE))?;
            w.add(&PasswordAlgorithms::new(&algorithms))?;
            w.add(&Software("turnpike"))?;
            w.add_fingerprint()?;
            Ok(())
        }),
    ));

    let unknown = [0x7F01, 0x7F02];
    seeds.push((
        "allocate-error-assorted".into(),
        build(Method::ALLOCATE, Class::Error, |w| {
            w.add(&ErrorCode {
                code: 420,
                reason: "Unknown Attribute",
            })?;
            w.add(&UnknownAttributes::new(&unknown))?;
            w.add(&AddressErrorCode {
                family: Family::V6,
                code: 440,
                reason: "Address Family not Supported",
            })?;
            w.add(&AlternateServer(addr("192.0.2.200:3478")))?;
            w.add(&AlternateDomain("turn.example"))?;
            w.add(&MappedAddress(addr("192.0.2.9:3478")))?;
            w.add(&AdditionalAddressFamily(Family::V6))?;
            w.add_raw(AttrType(0x7F01), b"??")?;
            Ok(())
        }),
    ));

    seeds.push((
        "refresh-request".into(),
        build(Method::REFRESH, Class::Request, |w| {
            w.add(&Username(USER))?;
            w.add(&Realm(REALM))?;
            w.add(&Nonce(NONCE))?;
            w.add(&Lifetime(0))?;
            w.add_integrity(&md5)?;
            Ok(())
        }),
    ));

    seeds.push((
        "create-permission".into(),
        build(Method::CREATE_PERMISSION, Class::Request, |w| {
            w.add(&XorPeerAddress(peer4))?;
            w.add(&XorPeerAddress(peer6))?;
            w.add(&Username(USER))?;
            w.add(&Realm(REALM))?;
            w.add(&Nonce(NONCE))?;
            w.add_integrity(&md5)?;
            w.add_fingerprint()?;
            Ok(())
        }),
    ));

    seeds.push((
        "channel-bind".into(),
        build(Method::CHANNEL_BIND, Class::Request, |w| {
            w.add(&ChannelNumber(0x4001))?;
            w.add(&XorPeerAddress(peer4))?;
            w.add(&Username(USER))?;
            w.add(&Realm(REALM))?;
            w.add(&Nonce(NONCE))?;
            w.add_integrity(&md5)?;
            Ok(())
        }),
    ));

    let send = build(Method::SEND, Class::Indication, |w| {
        w.add(&XorPeerAddress(peer4))?;
        w.add(&DontFragment)?;
        w.add(&Data(b"hello, peer"))?;
        Ok(())
    });
    seeds.push(("send-indication".into(), send.clone()));
    seeds.push((
        "send-indication-v6".into(),
        build(Method::SEND, Class::Indication, |w| {
            w.add(&XorPeerAddress(peer6))?;
            w.add(&Data(&[0xAB; 33]))?;
            Ok(())
        }),
    ));

    let payload = b"hello, client";
    let h = data_indication_header_len(&peer4);
    let mut data_ind = vec![0u8; h + turnpike_proto::stun::padded(payload.len())];
    data_ind[h..h + payload.len()].copy_from_slice(payload);
    write_data_indication_header(&mut data_ind[..h], TID, &peer4, payload.len())
        .expect("header fits");
    seeds.push(("data-indication".into(), data_ind));

    seeds.push((
        "data-indication-icmp".into(),
        build(Method::DATA, Class::Indication, |w| {
            w.add(&XorPeerAddress(peer4))?;
            w.add(&Icmp {
                typ: 3,
                code: 4,
                data: 1280,
            })?;
            Ok(())
        }),
    ));

    seeds.push((
        "binding-ice".into(),
        build(Method::BINDING, Class::Request, |w| {
            w.add(&Username("abcd:efgh"))?;
            w.add(&Priority(0x6E00_01FF))?;
            w.add(&UseCandidate)?;
            w.add(&IceControlling(0x0123_4567_89AB_CDEF))?;
            w.add_integrity(b"ice-password")?;
            w.add_fingerprint()?;
            Ok(())
        }),
    ));

    let mut channel = vec![0u8; 4 + 100];
    let n = ChannelData {
        channel: 0x4001,
        payload: &[0x5A; 100],
    }
    .encode(&mut channel, false)
    .expect("fits");
    channel.truncate(n);
    seeds.push(("channel-data".into(), channel));

    let mut odd = vec![0u8; 4 + 8];
    let n = ChannelData {
        channel: 0x4FFF,
        payload: b"seven b",
    }
    .encode(&mut odd, true)
    .expect("fits");
    odd.truncate(n);
    seeds.push(("channel-data-padded".into(), odd.clone()));

    // A TCP stream: a Send indication, then a padded ChannelData frame, then half a frame.
    let mut stream = send;
    stream.extend_from_slice(&odd);
    stream.extend_from_slice(&odd[..5]);
    seeds.push(("stream".into(), stream));

    for (name, bytes) in &seeds {
        std::fs::write(dir.join(name), bytes)?;
    }
    println!("wrote {} seeds to {}", seeds.len(), dir.display());
    Ok(())
}
