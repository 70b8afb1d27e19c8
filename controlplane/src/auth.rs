//! Long-term credentials: static users, TURN REST API ephemeral credentials, and the
//! stateless nonce.

use std::collections::HashMap;
use std::net::SocketAddr;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;
use turnpike_proto::attr::PasswordAlgorithmId;
use turnpike_proto::auth::{long_term_key_md5, long_term_key_sha256, userhash};

use crate::types::Millis;

/// The nonce cookie of RFC 8489 §9.2 ("obMatJos2") followed by the base64 of the 24-bit
/// security feature set: password algorithms and username anonymity (0xC00000).
pub const NONCE_PREFIX: &str = "obMatJos2wAAA";

/// Why a credential was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No such user, or no REST secret configured for an ephemeral username.
    #[error("unknown user")]
    UnknownUser,
    /// A REST username whose expiry time has passed.
    #[error("credential expired")]
    Expired,
}

/// The keys that may have signed a request for a user: one for a static user, one per
/// configured secret for a REST username (secrets rotate, so several are valid at once).
#[derive(Debug, Clone)]
pub struct Candidates {
    /// The user to account allocations to (the part after `:` of a REST username).
    pub account: String,
    /// Keys to try, newest secret first.
    pub keys: Vec<Vec<u8>>,
}

/// Where users and their keys come from.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    realm: String,
    users: HashMap<String, ([u8; 16], [u8; 32])>,
    hashes: HashMap<[u8; 32], String>,
    /// Users shared through the fleet (etcd), next to the configured ones.
    fleet_users: HashMap<String, ([u8; 16], [u8; 32])>,
    fleet_hashes: HashMap<[u8; 32], String>,
    rest_secrets: Vec<String>,
}

impl Credentials {
    /// Credentials for `realm` with static `users` (name, password) and REST `secrets`
    /// (newest first). Keys are derived once here.
    pub fn new(realm: &str, users: &[(String, String)], secrets: &[String]) -> Credentials {
        let mut c = Credentials {
            realm: realm.to_owned(),
            ..Credentials::default()
        };
        for (u, p) in users {
            c.users.insert(
                u.clone(),
                (
                    long_term_key_md5(u, realm, p),
                    long_term_key_sha256(u, realm, p),
                ),
            );
            c.hashes.insert(userhash(u, realm), u.clone());
        }
        c.rest_secrets = secrets.to_vec();
        c
    }

    /// The realm.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// Replaces the users shared through the fleet (name, password): they are valid next
    /// to the configured ones (which win on a name in both).
    pub fn set_fleet_users(&mut self, users: &[(String, String)]) {
        self.fleet_users.clear();
        self.fleet_hashes.clear();
        for (u, p) in users {
            self.fleet_users.insert(
                u.clone(),
                (
                    long_term_key_md5(u, &self.realm, p),
                    long_term_key_sha256(u, &self.realm, p),
                ),
            );
            self.fleet_hashes
                .insert(userhash(u, &self.realm), u.clone());
        }
    }

    /// Replaces the REST secrets (newest first).
    pub fn set_secrets(&mut self, secrets: Vec<String>) {
        self.rest_secrets = secrets;
    }

    /// The REST secrets.
    pub fn secrets(&self) -> &[String] {
        &self.rest_secrets
    }

    /// The username a USERHASH stands for (static users only: a REST username embeds a
    /// time and cannot be recovered from its hash).
    pub fn user_by_hash(&self, hash: &[u8; 32]) -> Option<&str> {
        self.hashes
            .get(hash)
            .or_else(|| self.fleet_hashes.get(hash))
            .map(String::as_str)
    }

    /// The candidate keys for `username` under `algorithm` at `now`.
    pub fn candidates(
        &self,
        username: &str,
        algorithm: PasswordAlgorithmId,
        now: Millis,
    ) -> Result<Candidates, AuthError> {
        let sha = algorithm == PasswordAlgorithmId::SHA256;
        if let Some((md5, sha256)) = self
            .users
            .get(username)
            .or_else(|| self.fleet_users.get(username))
        {
            return Ok(Candidates {
                account: username.to_owned(),
                keys: vec![if sha { sha256.to_vec() } else { md5.to_vec() }],
            });
        }
        if self.rest_secrets.is_empty() {
            return Err(AuthError::UnknownUser);
        }
        let (expiry, account) = match username.split_once(':') {
            Some((t, u)) => (t, u),
            None => (username, username),
        };
        let expiry: u64 = expiry.parse().map_err(|_| AuthError::UnknownUser)?;
        if expiry <= now.secs() {
            return Err(AuthError::Expired);
        }
        let keys = self
            .rest_secrets
            .iter()
            .map(|secret| {
                let password = rest_password(secret, username);
                if sha {
                    long_term_key_sha256(username, &self.realm, &password).to_vec()
                } else {
                    long_term_key_md5(username, &self.realm, &password).to_vec()
                }
            })
            .collect();
        Ok(Candidates {
            account: account.to_owned(),
            keys,
        })
    }
}

/// The TURN REST API password for `username`: base64(HMAC-SHA1(secret, username)).
pub fn rest_password(secret: &str, username: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(username.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

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

    /// A nonce for `client` minted at `now`.
    pub fn mint(&self, now: Millis, client: &SocketAddr) -> String {
        let ts = now.secs();
        let mut raw = [0u8; 20];
        raw[..8].copy_from_slice(&ts.to_be_bytes());
        raw[8..].copy_from_slice(&self.mac(ts, client));
        let mut s = String::with_capacity(NONCE_PREFIX.len() + 27);
        s.push_str(NONCE_PREFIX);
        URL_SAFE_NO_PAD.encode_string(raw, &mut s);
        s
    }

    /// Checks a nonce a client sent back.
    pub fn check(&self, nonce: &str, now: Millis, client: &SocketAddr) -> NonceCheck {
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
        let mac_ok = turnpike_proto::auth::ct_eq(&self.mac(ts, client), &raw[8..]);
        let fresh = ts <= now.secs() && now.secs() - ts < self.lifetime_secs;
        if mac_ok && fresh {
            NonceCheck::Valid
        } else {
            NonceCheck::Stale
        }
    }
}
