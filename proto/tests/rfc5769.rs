//! The test vectors of RFC 5769 ("Test Vectors for STUN"), byte for byte.
#![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]

use std::net::SocketAddr;

use turnpike_proto::DecodeError;
use turnpike_proto::attr::{
    IceControlled, Nonce, Priority, Realm, Software, Username, XorMappedAddress,
};
use turnpike_proto::auth::long_term_key_md5;
use turnpike_proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).expect("ascii"), 16).expect("hex"))
        .collect()
}

const SHORT_TERM_PASSWORD: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";

/// §2.1 Sample Request (USERNAME and SOFTWARE padded with spaces, as the RFC prints it).
const SAMPLE_REQUEST: &str = "
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf";

/// §2.2 Sample IPv4 Response.
const SAMPLE_IPV4_RESPONSE: &str = "
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96";

/// §2.3 Sample IPv6 Response.
const SAMPLE_IPV6_RESPONSE: &str = "
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c";

/// §2.4 Sample Request with Long-Term Authentication.
const SAMPLE_LONG_TERM: &str = "
    00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
    00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41
    00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66";

#[test]
fn sample_request() {
    let bytes = hex(SAMPLE_REQUEST);
    let m = Message::parse(&bytes).expect("parses");
    assert_eq!(m.method(), Method::BINDING);
    assert_eq!(m.class(), Class::Request);
    assert_eq!(
        m.transaction_id().0,
        hex("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae").as_slice()
    );
    assert_eq!(
        m.attr::<Software>().unwrap(),
        Some(Software("STUN test client"))
    );
    assert_eq!(m.attr::<Username>().unwrap(), Some(Username("evtj:h6vY")));
    assert_eq!(m.attr::<Priority>().unwrap(), Some(Priority(0x6e0001ff)));
    assert_eq!(
        m.attr::<IceControlled>().unwrap(),
        Some(IceControlled(0x932ff9b151263b36))
    );
    m.verify_integrity(SHORT_TERM_PASSWORD).expect("integrity");
    assert_eq!(
        m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBT"),
        Err(DecodeError::IntegrityMismatch)
    );
    assert_eq!(m.verify_fingerprint(), Ok(true));
}

#[test]
fn sample_ipv4_response() {
    let bytes = hex(SAMPLE_IPV4_RESPONSE);
    let m = Message::parse(&bytes).expect("parses");
    assert_eq!((m.method(), m.class()), (Method::BINDING, Class::Success));
    assert_eq!(m.attr::<Software>().unwrap(), Some(Software("test vector")));
    let want: SocketAddr = "192.0.2.1:32853".parse().unwrap();
    assert_eq!(
        m.attr::<XorMappedAddress>().unwrap(),
        Some(XorMappedAddress(want))
    );
    m.verify_integrity(SHORT_TERM_PASSWORD).expect("integrity");
    assert_eq!(m.verify_fingerprint(), Ok(true));
}

#[test]
fn sample_ipv6_response() {
    let bytes = hex(SAMPLE_IPV6_RESPONSE);
    let m = Message::parse(&bytes).expect("parses");
    let want: SocketAddr = "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
        .parse()
        .unwrap();
    assert_eq!(
        m.attr::<XorMappedAddress>().unwrap(),
        Some(XorMappedAddress(want))
    );
    m.verify_integrity(SHORT_TERM_PASSWORD).expect("integrity");
    assert_eq!(m.verify_fingerprint(), Ok(true));
}

/// Our writer reproduces the two responses up to the SOFTWARE padding, which the RFC fills
/// with a space and we with zero (both are allowed; the padding is covered by the MAC and
/// the CRC, so those differ, and must still verify).
#[test]
fn writer_rebuilds_responses() {
    for (vector, addr) in [
        (SAMPLE_IPV4_RESPONSE, "192.0.2.1:32853"),
        (
            SAMPLE_IPV6_RESPONSE,
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853",
        ),
    ] {
        let want = hex(vector);
        let tid = TransactionId(
            hex("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")
                .try_into()
                .unwrap(),
        );
        let mut buf = [0u8; 256];
        let mut w = MessageWriter::new(&mut buf, Method::BINDING, Class::Success, tid).unwrap();
        w.add(&Software("test vector")).unwrap();
        w.add(&XorMappedAddress(addr.parse().unwrap())).unwrap();
        w.add_integrity(SHORT_TERM_PASSWORD).unwrap();
        w.add_fingerprint().unwrap();
        let n = w.finish();
        assert_eq!(n, want.len());
        // Identical up to the padding byte of SOFTWARE.
        assert_eq!(&buf[..35], &want[..35]);
        assert_eq!(buf[35], 0);
        assert_eq!(&buf[36..52], &want[36..52]);
        let m = Message::parse(&buf[..n]).unwrap();
        m.verify_integrity(SHORT_TERM_PASSWORD).unwrap();
        assert_eq!(m.verify_fingerprint(), Ok(true));
    }
}

#[test]
fn sample_long_term_request() {
    let bytes = hex(SAMPLE_LONG_TERM);
    let m = Message::parse(&bytes).expect("parses");
    let user = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
    assert_eq!(m.attr::<Username>().unwrap(), Some(Username(user)));
    assert_eq!(
        m.attr::<Nonce>().unwrap(),
        Some(Nonce("f//499k954d6OL34oL9FSTvy64sA"))
    );
    assert_eq!(m.attr::<Realm>().unwrap(), Some(Realm("example.org")));
    assert_eq!(m.verify_fingerprint(), Ok(false));
    // The password "TheMatrIX" is the OpaqueString form of "TheMªtrⅨ".
    let key = long_term_key_md5(user, "example.org", "TheMatrIX");
    m.verify_integrity(&key).expect("integrity");
    let wrong = long_term_key_md5(user, "example.org", "thematrix");
    assert_eq!(
        m.verify_integrity(&wrong),
        Err(DecodeError::IntegrityMismatch)
    );

    // Rebuilt from its parts, it comes out byte for byte.
    let mut buf = [0u8; 256];
    let mut w = MessageWriter::new(
        &mut buf,
        Method::BINDING,
        Class::Request,
        m.transaction_id(),
    )
    .unwrap();
    w.add(&Username(user)).unwrap();
    w.add(&Nonce("f//499k954d6OL34oL9FSTvy64sA")).unwrap();
    w.add(&Realm("example.org")).unwrap();
    w.add_integrity(&key).unwrap();
    let n = w.finish();
    assert_eq!(&buf[..n], bytes.as_slice());
}
