//! Long-term credentials (RFC 8489 §9.2.4): stateless nonces, password algorithms,
//! MESSAGE-INTEGRITY(-SHA256), revoked users, and the 401, 438 and 441 answers.

use turnpike_proto::DecodeError;
use turnpike_proto::attr::{
    Nonce, PasswordAlgorithm, PasswordAlgorithmId, PasswordAlgorithms, Realm, Userhash, Username,
};
use turnpike_proto::auth::IntegrityKey;
use turnpike_proto::stun::Message;

use super::Server;
use super::refusal::{Refusal, Reject, reject};
use crate::auth::{AuthError, NonceCheck};
use crate::types::{FiveTuple, Millis, Output};

/// The password algorithms offered, in order of preference (RFC 8489 §9.2.1).
use turnpike_proto::auth::OFFERED_ALGORITHMS;

/// The outcome of a successful authentication.
#[derive(Debug, Clone)]
pub(super) struct Authed {
    pub(super) username: String,
    pub(super) account: String,
    /// The key that verified the request, for the integrity attribute it came with:
    /// responses are sealed with the same one.
    pub(super) key: IntegrityKey,
}

impl Server {
    /// As [`Server::limit`], for the answers of the authentication step. A 5-tuple that
    /// holds an allocation, or awaits one, is always answered when it tries to
    /// authenticate: a 438 on Refresh that went unanswered would cost it the allocation,
    /// and spoofed floods in its name must not be able to cause that. Only requests that
    /// carry an integrity attribute qualify: those are at least 44 bytes and, to reach a
    /// 401/438, also carry USERNAME, REALM and NONCE, so the unlimited answers stay within
    /// about twice the request's size and make a poor reflection amplifier.
    fn limit_auth(&mut self, tuple: FiveTuple, msg: &Message<'_>, now: Millis) -> bool {
        let signed = msg.has_integrity() || msg.has_integrity_sha256();
        let holder =
            self.by_tuple.contains_key(&tuple) || self.pending_by_tuple.contains_key(&tuple);
        (signed && holder) || self.limit(tuple.client, now)
    }

    /// Counts and logs an authentication failure.
    fn auth_failed(&mut self, now: Millis, tuple: FiveTuple, username: &str, why: &str) {
        self.stats.auth_failures += 1;
        if self.sample(Refusal::Auth, now) {
            // Debug formatting escapes control characters: the username is the client's.
            tracing::warn!(client = %tuple.client, username = ?username, reason = why, "authentication failed");
        }
    }

    /// Checks long-term credentials (RFC 8489 §9.2.4). On failure the error response is
    /// pushed and `None` returned.
    pub(super) fn authenticate(
        &mut self,
        now: Millis,
        tuple: FiveTuple,
        msg: &Message<'_>,
        out: &mut Vec<Output>,
    ) -> Option<Authed> {
        if !msg.has_integrity() && !msg.has_integrity_sha256() {
            self.challenge(now, tuple, msg, 401, out);
            return None;
        }
        let parts = (|| -> Result<_, DecodeError> {
            let user = match msg.attr::<Username>()? {
                Some(u) => Some(u.0.to_owned()),
                None => match msg.attr::<Userhash>()? {
                    Some(h) => Some(self.creds.user_by_hash(&h.0).unwrap_or("").to_owned()),
                    None => None,
                },
            };
            Ok((user, msg.attr::<Realm>()?, msg.attr::<Nonce>()?))
        })();
        let (user, realm, nonce) = match parts {
            Ok((Some(u), Some(r), Some(n))) => (u, r, n),
            _ => {
                if self.limit_auth(tuple, msg, now) {
                    self.respond_error(tuple, msg, None, reject(400), out, |_| Ok(()));
                }
                return None;
            }
        };
        if self.nonces.check(nonce.0, now.secs(), &tuple.client) != NonceCheck::Valid {
            self.stats.stale_nonces += 1;
            self.challenge(now, tuple, msg, 438, out);
            return None;
        }
        let algorithm = match self.negotiated_algorithm(msg) {
            Ok(a) => a,
            Err(r) => {
                if self.limit_auth(tuple, msg, now) {
                    self.respond_error(tuple, msg, None, r, out, |_| Ok(()));
                }
                return None;
            }
        };
        // RFC 8489 §9.2.4: the key is "the password associated with the username ... in
        // the REALM attribute". We serve one realm and know no password in any other, so
        // another REALM is an invalid credential: 401 carrying our REALM and a NONCE, as
        // for an unknown username (not 400, which is for a REALM that is missing).
        if realm.0 != self.creds.realm() {
            self.auth_failed(now, tuple, &user, "wrong realm");
            self.challenge(now, tuple, msg, 401, out);
            return None;
        }
        // MESSAGE-INTEGRITY-SHA256 is checked when present, even next to MESSAGE-INTEGRITY.
        let integrity_key = if msg.has_integrity_sha256() {
            IntegrityKey::Sha256
        } else {
            IntegrityKey::Sha1
        };
        // TURN REST usernames carry a wall-clock expiry: checked against the wall clock.
        let wall = Millis(now.0.saturating_add_signed(self.wall_offset));
        let candidates = match self.creds.candidates(&user, algorithm, wall) {
            Ok(c) => c,
            Err(e) => {
                let why = match e {
                    AuthError::UnknownUser => "unknown user",
                    AuthError::Expired => "credential expired",
                };
                self.auth_failed(now, tuple, &user, why);
                self.challenge(now, tuple, msg, 401, out);
                return None;
            }
        };
        let key = candidates
            .keys
            .into_iter()
            .map(integrity_key)
            .find(|k| msg.verify(k).is_ok());
        let Some(key) = key else {
            self.auth_failed(now, tuple, &user, "wrong password");
            self.challenge(now, tuple, msg, 401, out);
            return None;
        };
        // A revoked user (by username or accounting user) is refused like a wrong
        // credential, whatever it signed with.
        if !self.revoked.is_empty()
            && (self.revoked.contains(&user) || self.revoked.contains(&candidates.account))
        {
            self.auth_failed(now, tuple, &user, "revoked user");
            self.challenge(now, tuple, msg, 401, out);
            return None;
        }
        let authed = Authed {
            username: user,
            account: candidates.account,
            key,
        };
        // An allocation's later requests must come with the same credentials (RFC 8656
        // §5). An allocation restored from a data plane that did not keep usernames has
        // none: the first request of its accounting user re-establishes it.
        if let Some(id) = self.by_tuple.get(&tuple)
            && let Some(a) = self.allocations.get_mut(id)
        {
            let same = if a.username.is_empty() {
                a.account == authed.account
            } else {
                a.username == authed.username
            };
            if !same {
                self.auth_failed(now, tuple, &authed.username, "other credentials (441)");
                self.respond_error(tuple, msg, Some(&authed), reject(441), out, |_| Ok(()));
                return None;
            }
            if a.username.is_empty() {
                a.username.clone_from(&authed.username);
            }
        }
        Some(authed)
    }

    fn negotiated_algorithm(&self, msg: &Message<'_>) -> Result<PasswordAlgorithmId, Reject> {
        let chosen = msg.attr::<PasswordAlgorithm>()?;
        let offered = msg.attr::<PasswordAlgorithms>()?;
        match (chosen, offered) {
            (None, None) => Ok(PasswordAlgorithmId::MD5),
            (Some(c), Some(o)) => {
                let mut ours = [0u8; 8];
                let mut w_ok = true;
                for (i, a) in OFFERED_ALGORITHMS.iter().enumerate() {
                    match ours.get_mut(i * 4..i * 4 + 2) {
                        Some(s) => s.copy_from_slice(&a.0.to_be_bytes()),
                        None => w_ok = false,
                    }
                }
                let echoed_right = w_ok && o.raw() == ours;
                if echoed_right && OFFERED_ALGORITHMS.contains(&c.algorithm) && c.params.is_empty()
                {
                    Ok(c.algorithm)
                } else {
                    Err(reject(400))
                }
            }
            _ => Err(reject(400)),
        }
    }

    /// 401 or 438 with REALM, a fresh NONCE and PASSWORD-ALGORITHMS; rate-limited.
    fn challenge(
        &mut self,
        now: Millis,
        tuple: FiveTuple,
        msg: &Message<'_>,
        code: u16,
        out: &mut Vec<Output>,
    ) {
        if !self.limit_auth(tuple, msg, now) {
            return;
        }
        let nonce = self.nonces.mint(now.secs(), &tuple.client);
        let mut buf = [0u8; 512];
        if let Ok(n) =
            turnpike_proto::turn::write_challenge(&mut buf, msg, code, self.creds.realm(), &nonce)
        {
            out.push(Output::Transmit {
                tuple,
                data: buf[..n].to_vec(),
            });
        }
    }

    /// What a data plane needs to answer unauthenticated Allocates as this server would.
    pub fn challenge_config(&self) -> turnpike_plane::Challenge {
        let (nonce_secret, nonce_lifetime_secs) = self.nonces.parts();
        turnpike_plane::Challenge {
            realm: self.creds.realm().to_owned(),
            nonce_secret,
            nonce_lifetime_secs,
            per_source: turnpike_plane::limit::Rate::new(
                self.cfg.unauth_rate,
                self.cfg.unauth_burst,
            ),
            per_ip: turnpike_plane::limit::Rate::new(
                self.cfg.unauth_ip_rate,
                self.cfg.unauth_ip_burst,
            ),
        }
    }
}
