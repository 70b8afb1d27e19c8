//! Long-term credentials: static users, TURN REST API ephemeral credentials, and the
//! stateless nonce.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha1::Sha1;

use turnpike_proto::attr::PasswordAlgorithmId;
use turnpike_proto::auth::{long_term_key_md5, long_term_key_sha256, userhash};

use crate::types::Millis;

/// Stateless nonces, minted and checked alike by both planes (the data plane answers the
/// first request of a handshake with its 401).
pub use turnpike_proto::auth::{NONCE_PREFIX, NonceCheck, NonceKey};

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
