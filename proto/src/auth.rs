//! Credentials and message authentication: long-term keys (RFC 8489 §9.2.2), the
//! HMACs of MESSAGE-INTEGRITY and MESSAGE-INTEGRITY-SHA256, FINGERPRINT, USERHASH, and a
//! constant-time comparison.
//!
//! The RFC asks for the OpaqueString profile (RFC 8265) of username, realm and password
//! before hashing. turnpike hashes the bytes as given: for ASCII credentials, which is
//! what TURN deployments use, the two agree.

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;
use sha2::Sha256;
use std::net::SocketAddr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use subtle::ConstantTimeEq;

use crate::stun::HEADER_LEN;

/// The XOR constant of FINGERPRINT ("STUN" in ASCII).
pub const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// A key for message integrity, and which attribute it is used with. The attribute does
/// not follow from the key: a long-term key of either PASSWORD-ALGORITHM (MD5 or SHA-256)
/// may sign either attribute, whichever the request carried.
#[derive(Clone, PartialEq, Eq)]
pub enum IntegrityKey {
    /// MESSAGE-INTEGRITY (HMAC-SHA1) with a long-term key or a short-term password.
    Sha1(Vec<u8>),
    /// MESSAGE-INTEGRITY-SHA256 (HMAC-SHA256) with a long-term key or a short-term
    /// password.
    Sha256(Vec<u8>),
}

impl std::fmt::Debug for IntegrityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        match self {
            IntegrityKey::Sha1(_) => f.write_str("IntegrityKey::Sha1(..)"),
            IntegrityKey::Sha256(_) => f.write_str("IntegrityKey::Sha256(..)"),
        }
    }
}

/// The long-term key for MESSAGE-INTEGRITY: MD5(username ":" realm ":" password).
pub fn long_term_key_md5(username: &str, realm: &str, password: &str) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().into()
}

/// The long-term key for PASSWORD-ALGORITHM SHA-256: SHA-256(username ":" realm ":" password).
pub fn long_term_key_sha256(username: &str, realm: &str, password: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().into()
}

/// USERHASH: SHA-256(username ":" realm).
pub fn userhash(username: &str, realm: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.finalize().into()
}

/// HMAC-SHA1 over a message prefix `covered` (header and attributes before
/// MESSAGE-INTEGRITY) with the header's length field replaced by `length`, the length
/// that counts up to the end of MESSAGE-INTEGRITY (RFC 8489 §14.5). No copy is made.
pub fn hmac_sha1_stun(key: &[u8], covered: &[u8], length: usize) -> [u8; 20] {
    // new_from_slice accepts any key length for HMAC.
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(key) else {
        return [0; 20];
    };
    feed(&mut mac, covered, length);
    mac.finalize().into_bytes().into()
}

/// HMAC-SHA256, as [`hmac_sha1_stun`], for MESSAGE-INTEGRITY-SHA256 (§14.6).
pub fn hmac_sha256_stun(key: &[u8], covered: &[u8], length: usize) -> [u8; 32] {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return [0; 32];
    };
    feed(&mut mac, covered, length);
    mac.finalize().into_bytes().into()
}

fn feed<M: Mac>(mac: &mut M, covered: &[u8], length: usize) {
    let (header, body) = covered.split_at(HEADER_LEN.min(covered.len()));
    let len16 = u16::try_from(length).unwrap_or(u16::MAX);
    mac.update(header.get(..2).unwrap_or_default());
    mac.update(&len16.to_be_bytes());
    mac.update(header.get(4..).unwrap_or_default());
    mac.update(body);
}

/// FINGERPRINT: CRC-32 of the message before the attribute, with the length field set to
/// `length` (counting the FINGERPRINT attribute), XOR 0x5354554e (RFC 8489 §14.7).
pub fn fingerprint(covered: &[u8], length: usize) -> u32 {
    let (header, body) = covered.split_at(HEADER_LEN.min(covered.len()));
    let len16 = u16::try_from(length).unwrap_or(u16::MAX);
    let mut h = crc32fast::Hasher::new();
    h.update(header.get(..2).unwrap_or_default());
    h.update(&len16.to_be_bytes());
    h.update(header.get(4..).unwrap_or_default());
    h.update(body);
    h.finalize() ^ FINGERPRINT_XOR
}

/// Compares two byte strings in time independent of where they differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The nonce cookie of RFC 8489 §9.2 ("obMatJos2") followed by the base64 of the 24-bit
/// security feature set: password algorithms and username anonymity (0xC00000).
pub const NONCE_PREFIX: &str = "obMatJos2wAAA";

/// How far ahead of the checking clock a nonce's timestamp may be (see
/// [`NonceKey::check`]).
pub const NONCE_AHEAD_SECS: u64 = 2;

/// The password algorithms a server offers in PASSWORD-ALGORITHMS, preferred first.
pub const OFFERED_ALGORITHMS: [crate::attr::PasswordAlgorithmId; 2] = [
    crate::attr::PasswordAlgorithmId::SHA256,
    crate::attr::PasswordAlgorithmId::MD5,
];

/// What a nonce check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    /// Minted by us, for this client, and fresh.
    Valid,
    /// Not valid (expired, for another client, or forged): answer 438 with a new one.
    Stale,
}

/// Mints and checks stateless nonces: `NONCE_PREFIX` + base64url(timestamp ‖ MAC) where
/// the MAC (HMAC-SHA256, truncated to 96 bits) covers the timestamp and the client's
/// address under a server secret. Unauthenticated clients thus create no state.
#[derive(Clone)]
pub struct NonceKey {
    secret: [u8; 32],
    lifetime_secs: u64,
}

impl std::fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceKey")
            .field("lifetime_secs", &self.lifetime_secs)
            .finish_non_exhaustive()
    }
}

impl NonceKey {
    /// A key from 32 secret bytes; nonces live `lifetime_secs`.
    pub fn new(secret: [u8; 32], lifetime_secs: u64) -> NonceKey {
        NonceKey {
            secret,
            lifetime_secs,
        }
    }

    /// The secret and the lifetime, to hand a data plane that mints nonces too.
    pub fn parts(&self) -> ([u8; 32], u64) {
        (self.secret, self.lifetime_secs)
    }

    fn mac(&self, ts: u64, client: &SocketAddr) -> [u8; 12] {
        let mut out = [0u8; 12];
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.secret) else {
            return out;
        };
        mac.update(&ts.to_be_bytes());
        match client.ip() {
            std::net::IpAddr::V4(ip) => mac.update(&ip.octets()),
            std::net::IpAddr::V6(ip) => mac.update(&ip.octets()),
        }
        mac.update(&client.port().to_be_bytes());
        out.copy_from_slice(&mac.finalize().into_bytes()[..12]);
        out
    }

    /// A nonce for `client` minted at `now_secs` (seconds of the minting plane's clock).
    pub fn mint(&self, now_secs: u64, client: &SocketAddr) -> String {
        let ts = now_secs;
        let mut raw = [0u8; 20];
        raw[..8].copy_from_slice(&ts.to_be_bytes());
        raw[8..].copy_from_slice(&self.mac(ts, client));
        let mut s = String::with_capacity(NONCE_PREFIX.len() + 27);
        s.push_str(NONCE_PREFIX);
        URL_SAFE_NO_PAD.encode_string(raw, &mut s);
        s
    }

    /// Checks a nonce a client sent back.
    pub fn check(&self, nonce: &str, now_secs: u64, client: &SocketAddr) -> NonceCheck {
        let Some(body) = nonce.strip_prefix(NONCE_PREFIX) else {
            return NonceCheck::Stale;
        };
        let mut raw = [0u8; 20];
        match URL_SAFE_NO_PAD.decode_slice(body, &mut raw) {
            Ok(20) => {}
            _ => return NonceCheck::Stale,
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&raw[..8]);
        let ts = u64::from_be_bytes(ts);
        let mac_ok = ct_eq(&self.mac(ts, client), &raw[8..]);
        // A nonce minted up to NONCE_AHEAD_SECS "in the future" is taken: a data plane
        // mints on a clock of its own, which may read a second boundary a moment before
        // the control plane's. Refusing it would let a retransmission of the same
        // request succeed a moment later, after its client had moved on (437).
        let fresh = ts <= now_secs.saturating_add(NONCE_AHEAD_SECS)
            && now_secs.saturating_sub(ts) < self.lifetime_secs;
        if mac_ok && fresh {
            NonceCheck::Valid
        } else {
            NonceCheck::Stale
        }
    }
}

#[cfg(test)]
mod nonce_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_nonce_is_fresh_for_its_lifetime_and_a_little_ahead() {
        let k = NonceKey::new([9; 32], 600);
        let c: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let n = k.mint(1_000, &c);
        assert!(n.starts_with(NONCE_PREFIX));
        assert_eq!(k.check(&n, 1_000, &c), NonceCheck::Valid);
        assert_eq!(k.check(&n, 1_599, &c), NonceCheck::Valid);
        assert_eq!(k.check(&n, 1_600, &c), NonceCheck::Stale);
        // Minted on a clock a second or two ahead (a data plane's): taken.
        assert_eq!(k.check(&n, 998, &c), NonceCheck::Valid);
        assert_eq!(k.check(&n, 997, &c), NonceCheck::Stale);
        // Another client, or another key: stale.
        let other: SocketAddr = "192.0.2.1:4001".parse().unwrap();
        assert_eq!(k.check(&n, 1_000, &other), NonceCheck::Stale);
        assert_eq!(
            NonceKey::new([8; 32], 600).check(&n, 1_000, &c),
            NonceCheck::Stale
        );
    }
}
