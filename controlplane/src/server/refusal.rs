//! Refusals: where a request's processing stops with an error response, and the sampled
//! log and counters of the refusals worth an operator's attention.

use std::net::SocketAddr;

use turnpike_proto::DecodeError;

use super::Server;
use super::auth::Authed;
use crate::types::{FiveTuple, Millis};

/// Refusal log lines written per second and kind; the rest are summarized once a second.
pub(super) const REFUSAL_LOGS_PER_SEC: u32 = 5;
/// Users whose first 486 is remembered as logged (a bound on memory). The first 486 of
/// a user is always logged, whatever the sampler says: a platform that hands one
/// username to every client learns from it why allocations stop.
const QUOTA_LOGGED_USERS: usize = 10_000;

/// Kinds of refusal that are logged (sampled: see [`REFUSAL_LOGS_PER_SEC`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Unknown user, expired or wrong credentials, wrong realm, 441.
    Auth,
    /// Dropped by the rate limiter.
    RateLimited,
    /// A peer denied by the policy.
    Policy,
    /// A quota reached.
    Quota,
    /// A relay bind the data plane refused.
    Bind,
}

impl Refusal {
    pub(super) const COUNT: usize = 5;
    pub(super) const ALL: [Refusal; Refusal::COUNT] = [
        Refusal::Auth,
        Refusal::RateLimited,
        Refusal::Policy,
        Refusal::Quota,
        Refusal::Bind,
    ];

    fn index(self) -> usize {
        self as usize
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Refusal::Auth => "authentication failure",
            Refusal::RateLimited => "rate-limited request",
            Refusal::Policy => "peer denied by policy",
            Refusal::Quota => "allocation quota reached",
            Refusal::Bind => "relay bind failure",
        }
    }
}

/// Where a request's processing stopped with an error response.
pub(super) struct Reject {
    /// The ERROR-CODE; its phrase comes from [`reason_phrase`].
    pub(super) code: u16,
    /// What to count and log about it, beyond the response.
    pub(super) note: Note,
}

/// Why a refusal is worth counting and logging.
#[derive(Debug, Clone, Copy)]
pub(super) enum Note {
    None,
    /// The peer policy denied this peer.
    Policy(SocketAddr),
    /// A quota (per user or in total) was reached.
    Quota,
}

pub(super) fn reject(code: u16) -> Reject {
    Reject {
        code,
        note: Note::None,
    }
}

impl From<DecodeError> for Reject {
    fn from(_: DecodeError) -> Reject {
        reject(400)
    }
}

impl Server {
    /// Whether a refusal line of `kind` may be logged now (sampled, so that floods cannot
    /// fill the disk; what is held back is summarized by [`Server::handle_timeout`]).
    pub(super) fn sample(&mut self, kind: Refusal, now: Millis) -> bool {
        self.refusal_logs
            .get_mut(kind.index())
            .is_some_and(|l| l.admit(now))
    }

    /// Counts and logs the policy and quota refusals of an authenticated request.
    pub(super) fn note_refusal(
        &mut self,
        now: Millis,
        tuple: FiveTuple,
        auth: &Authed,
        r: &Reject,
    ) {
        match r.note {
            Note::None => {}
            Note::Policy(peer) => {
                self.stats.policy_denied += 1;
                if self.sample(Refusal::Policy, now) {
                    tracing::warn!(client = %tuple.client, user = %auth.account, %peer, "peer denied by policy (403)");
                }
            }
            Note::Quota => {
                self.stats.quota_rejected += 1;
                if r.code == 486 && !self.quota_logged.contains(&auth.account) {
                    if self.quota_logged.len() >= QUOTA_LOGGED_USERS {
                        self.quota_logged.clear();
                    }
                    self.quota_logged.insert(auth.account.clone());
                    let quota = self.cfg.user_quota;
                    tracing::warn!(
                        client = %tuple.client,
                        user = %auth.account,
                        quota,
                        "user {:?} reached the per-user allocation quota ({quota}): Allocate refused with 486; \
                         raise it with user_quota (--user-quota, TURNPIKE_USER_QUOTA; 0: unlimited). \
                         Further refusals are counted in turnpike_quota_rejected_total and logged sampled",
                        auth.account
                    );
                } else if self.sample(Refusal::Quota, now) {
                    let setting = if r.code == 486 {
                        "user_quota (--user-quota)"
                    } else {
                        "total_quota (--total-quota)"
                    };
                    tracing::warn!(client = %tuple.client, user = %auth.account, code = r.code, setting, "allocation quota reached");
                }
            }
        }
    }
}
