//! Expiry: every deadline (allocations, permissions, channels, binds, reservations) is a
//! timer in one ordered set, and the rate limiter's sweep runs from the same entry point.

use std::net::IpAddr;

use turnpike_plane::limit::RefusalLog;

use super::Server;
use super::refusal::Refusal;
use crate::types::{AllocationId, EndReason, Event, Millis, Output, TableChange};

/// How often idle rate-limiter buckets are dropped and suppressed refusal log lines are
/// summarized.
const SWEEP_INTERVAL_MS: u64 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timer {
    Bind(u64),
    Allocation(AllocationId),
    Permission(AllocationId, IpAddr),
    Channel(AllocationId, u16),
    Reservation([u8; 8]),
}

impl Server {
    /// The next instant [`Server::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let timer = self.timers.first().map(|(t, _)| *t);
        // The sweep only matters while there is something to sweep or summarize; an idle
        // server is not woken every second.
        let housekeeping = self.limiter.tracked() != (0, 0)
            || self.refusal_logs.iter().any(RefusalLog::has_suppressed);
        let sweep = housekeeping.then_some(self.next_sweep);
        match (timer, sweep) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Expires everything whose deadline is at or before `now`.
    pub fn handle_timeout(&mut self, now: Millis, out: &mut Vec<Output>) {
        while let Some(&(at, timer)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            match timer {
                Timer::Allocation(id) => self.remove_allocation(id, EndReason::Expired, out),
                Timer::Permission(id, ip) => {
                    if let Some(a) = self.allocations.get_mut(&id) {
                        a.permissions.remove(&ip);
                        out.push(Output::Table(TableChange::PermissionRemove {
                            id,
                            peer: ip,
                        }));
                    }
                }
                Timer::Channel(id, channel) => {
                    if let Some(a) = self.allocations.get_mut(&id) {
                        if let Some((peer, _)) = a.channels.remove(&channel) {
                            a.peer_channel.remove(&peer);
                        }
                        out.push(Output::Table(TableChange::ChannelRemove { id, channel }));
                    }
                }
                Timer::Bind(id) => {
                    if let Some(p) = self.pending.remove(&id) {
                        self.pending_by_tuple.remove(&p.tuple);
                        for a in &p.relays {
                            self.ports.release(a);
                        }
                        self.fail_pending(&p, 508, out);
                    }
                }
                Timer::Reservation(t) => {
                    if let Some((addr, _)) = self.reservations.remove(&t) {
                        self.ports.release(&addr);
                    }
                }
            }
        }
        if now >= self.next_sweep {
            self.next_sweep = now.plus_ms(SWEEP_INTERVAL_MS);
            self.limiter.sweep(now);
            for (kind, log) in Refusal::ALL.iter().zip(self.refusal_logs.iter_mut()) {
                if let Some(n) = log.take_suppressed() {
                    tracing::warn!(
                        kind = kind.name(),
                        suppressed = n,
                        "{n} similar refusal log lines suppressed"
                    );
                }
            }
        }
    }

    pub(super) fn remove_allocation(
        &mut self,
        id: AllocationId,
        reason: EndReason,
        out: &mut Vec<Output>,
    ) {
        let Some(a) = self.allocations.remove(&id) else {
            return;
        };
        self.timers.remove(&(a.expires, Timer::Allocation(id)));
        for (ip, t) in &a.permissions {
            self.timers.remove(&(*t, Timer::Permission(id, *ip)));
        }
        for (c, (_, t)) in &a.channels {
            self.timers.remove(&(*t, Timer::Channel(id, *c)));
        }
        for r in &a.relays {
            self.ports.release(r);
        }
        self.by_tuple.remove(&a.tuple);
        if let Some(n) = self.per_user.get_mut(&a.account) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_user.remove(&a.account);
            }
        }
        out.push(Output::Table(TableChange::AllocationRemove { id }));
        out.push(Output::Event(Event::Ended { id, reason }));
    }
}
