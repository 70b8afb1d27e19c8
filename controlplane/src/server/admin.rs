//! What operators and the cluster ask of the server besides requests: settings changed at
//! run time, drain, counters, queries of allocations, revocation, the fleet's user counts
//! and restore from a data plane's table.

use std::net::{IpAddr, SocketAddr};

use ahash::AHashMap;

use super::timers::Timer;
use super::{Allocation, Server, ServerConfig};
use crate::auth::Credentials;
use crate::policy::PeerPolicy;
use crate::types::{AllocationId, AllocationSnapshot, EndReason, FiveTuple, Millis, Output};

/// A summary of one allocation, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationInfo {
    /// The allocation.
    pub id: AllocationId,
    /// The client 5-tuple.
    pub tuple: FiveTuple,
    /// The username it authenticated with.
    pub username: String,
    /// The user it is accounted to.
    pub account: String,
    /// Relayed addresses.
    pub relays: Vec<SocketAddr>,
    /// When it was created.
    pub created_at: Millis,
    /// When it expires.
    pub expires: Millis,
    /// Permitted peer IPs.
    pub permissions: Vec<(IpAddr, Millis)>,
    /// Bound channels.
    pub channels: Vec<(u16, SocketAddr, Millis)>,
}

/// Counters of the control plane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Live allocations.
    pub allocations: u64,
    /// Live permissions.
    pub permissions: u64,
    /// Live channels.
    pub channels: u64,
    /// Requests that failed authentication (401 after integrity was tried, 441).
    pub auth_failures: u64,
    /// Unauthenticated requests dropped by the rate limiter.
    pub rate_limited: u64,
    /// Peers refused by the peer policy (403 on CreatePermission or ChannelBind).
    pub policy_denied: u64,
    /// Allocates refused by a quota (486 per user, 508 in total).
    pub quota_rejected: u64,
    /// Requests answered 438 Stale Nonce (a steady rate is normal; a jump points at
    /// clock or secret trouble between control planes).
    pub stale_nonces: u64,
    /// Requests answered.
    pub requests: u64,
    /// Relay binds the data plane refused (each retried on other ports, then 508).
    pub bind_failures: u64,
    /// Replies to UDP clients shed because the data plane was too far behind to send
    /// them (a flood: the clients retransmit).
    pub replies_shed: u64,
}

impl Server {
    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// The credentials (for rotating REST secrets).
    pub fn credentials_mut(&mut self) -> &mut Credentials {
        &mut self.creds
    }

    /// Replaces the peer policy.
    pub fn set_policy(&mut self, policy: PeerPolicy) {
        self.cfg.policy = policy;
    }

    /// Replaces the allocation quotas: per user and in all (0: unlimited).
    pub fn set_quotas(&mut self, user: u32, total: u32) {
        self.cfg.user_quota = user;
        self.cfg.total_quota = total;
    }

    /// Counts replies the caller shed instead of queueing them (see [`Stats::replies_shed`]).
    pub fn count_replies_shed(&mut self, n: u64) {
        self.stats.replies_shed += n;
    }

    /// The wall clock read at `now` (unix milliseconds): what TURN REST usernames, whose
    /// expiry is a wall-clock time, are checked against. Nothing else depends on it, so
    /// a step of the wall clock changes no lifetime. Until set, the plane's clock is
    /// taken for the wall clock (it starts at the wall time of the process's start).
    pub fn set_wall(&mut self, now: Millis, wall: u64) {
        self.wall_offset = (wall as i64).saturating_sub(now.0 as i64);
    }

    /// Stops accepting new allocations: new Allocates get 300 Try Alternate towards
    /// `alternate` if given, else 508. Existing allocations carry on.
    pub fn set_draining(&mut self, draining: bool, alternate: Option<SocketAddr>) {
        self.draining = draining;
        self.alternate = alternate;
    }

    /// Whether the server is draining.
    pub fn draining(&self) -> bool {
        self.draining
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats;
        s.allocations = self.allocations.len() as u64;
        s.permissions = self
            .allocations
            .values()
            .map(|a| a.permissions.len() as u64)
            .sum();
        s.channels = self
            .allocations
            .values()
            .map(|a| a.channels.len() as u64)
            .sum();
        s
    }

    /// Every allocation, summarized.
    pub fn allocations(&self) -> impl Iterator<Item = AllocationInfo> + '_ {
        self.allocations.iter().map(|(id, a)| Self::info(*id, a))
    }

    /// One allocation, summarized.
    pub fn allocation(&self, id: AllocationId) -> Option<AllocationInfo> {
        self.allocations.get(&id).map(|a| Self::info(id, a))
    }

    /// The user an allocation is accounted to (cheap: no summary is built).
    pub fn account_of(&self, id: AllocationId) -> Option<&str> {
        self.allocations.get(&id).map(|a| a.account.as_str())
    }

    /// When an allocation expires.
    pub fn expiry_of(&self, id: AllocationId) -> Option<Millis> {
        self.allocations.get(&id).map(|a| a.expires)
    }

    /// The allocation of a 5-tuple.
    pub fn allocation_of(&self, tuple: &FiveTuple) -> Option<AllocationId> {
        self.by_tuple.get(tuple).copied()
    }

    fn info(id: AllocationId, a: &Allocation) -> AllocationInfo {
        let mut permissions: Vec<_> = a.permissions.iter().map(|(k, v)| (*k, *v)).collect();
        permissions.sort();
        let mut channels: Vec<_> = a.channels.iter().map(|(c, (p, t))| (*c, *p, *t)).collect();
        channels.sort();
        AllocationInfo {
            id,
            tuple: a.tuple,
            username: a.username.clone(),
            account: a.account.clone(),
            relays: a.relays.clone(),
            created_at: a.created_at,
            expires: a.expires,
            permissions,
            channels,
        }
    }

    /// Allocation `id` as a data plane's table holds it (on `worker`, with no usage):
    /// what a data plane that lost it is handed again.
    pub fn snapshot_of(&self, id: AllocationId, worker: u32) -> Option<AllocationSnapshot> {
        let a = self.allocations.get(&id)?;
        let mut permissions: Vec<_> = a.permissions.iter().map(|(k, v)| (*k, *v)).collect();
        permissions.sort();
        let mut channels: Vec<_> = a.channels.iter().map(|(c, (p, t))| (*c, *p, *t)).collect();
        channels.sort();
        Some(AllocationSnapshot {
            id,
            worker,
            tuple: a.tuple,
            relays: a.relays.clone(),
            deadline: a.expires,
            bandwidth: self.cfg.bandwidth_limit,
            user: a.account.clone(),
            username: a.username.clone(),
            dont_fragment: a.dont_fragment,
            permissions,
            channels,
            usage: Default::default(),
        })
    }

    /// Revokes one allocation (admin). Returns whether it existed.
    pub fn revoke(&mut self, id: AllocationId, out: &mut Vec<Output>) -> bool {
        let existed = self.allocations.contains_key(&id);
        self.remove_allocation(id, EndReason::Revoked, out);
        existed
    }

    /// The client's TCP or TLS connection of allocation `id` closed: the allocation
    /// ends (RFC 8656 §3.1).
    pub fn connection_closed(&mut self, id: AllocationId, out: &mut Vec<Output>) {
        self.remove_allocation(id, EndReason::ConnectionClosed, out);
    }

    /// The allocations each user holds on the other instances of the fleet, replacing
    /// the previous counts: the per-user quota counts them with this server's own.
    pub fn set_fleet_user_counts(&mut self, counts: impl IntoIterator<Item = (String, u32)>) {
        self.fleet_users = counts.into_iter().collect();
    }

    /// The users holding at least `min` allocations here, with their counts, at most
    /// `limit` of them, the largest first (what this instance tells the fleet).
    pub fn heavy_users(&self, min: u32, limit: usize) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = self
            .per_user
            .iter()
            .filter(|(_, n)| **n >= min.max(1))
            .map(|(u, n)| (u.clone(), *n))
            .collect();
        v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(limit);
        v
    }

    /// Users refused from now on, whatever their credentials (username or accounting
    /// user), replacing the previous set; their allocations are revoked separately
    /// ([`Server::revoke_user`]).
    pub fn set_revoked_users(&mut self, users: impl IntoIterator<Item = String>) {
        self.revoked = users.into_iter().collect();
    }

    /// Revokes every allocation of a user (admin). Returns how many.
    pub fn revoke_user(&mut self, account: &str, out: &mut Vec<Output>) -> usize {
        let ids: Vec<_> = self
            .allocations
            .iter()
            .filter(|(_, a)| a.account == account || a.username == account)
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            self.remove_allocation(*id, EndReason::Revoked, out);
        }
        ids.len()
    }

    /// Rebuilds an allocation a data plane reported after a control-plane restart. Its
    /// ports are marked used and its timers armed; ids above it are not reused. An empty
    /// `username` is unknown (a data plane from before usernames were kept): then the
    /// first authenticated request of the same accounting user sets it.
    pub fn restore(&mut self, r: AllocationSnapshot) {
        if self.allocations.contains_key(&r.id) || self.by_tuple.contains_key(&r.tuple) {
            return;
        }
        self.next_id = self.next_id.max(r.id.0 + 1);
        for addr in &r.relays {
            self.ports.take(*addr);
        }
        let mut a = Allocation {
            tuple: r.tuple,
            username: r.username,
            account: r.user.clone(),
            relays: r.relays,
            expires: r.deadline,
            created_at: Millis(0),
            dont_fragment: r.dont_fragment,
            permissions: AHashMap::new(),
            channels: AHashMap::new(),
            peer_channel: AHashMap::new(),
            allocate_tid: None,
            allocate_response: Vec::new(),
        };
        self.timers.insert((r.deadline, Timer::Allocation(r.id)));
        for (ip, t) in r.permissions {
            a.permissions.insert(ip, t);
            self.timers.insert((t, Timer::Permission(r.id, ip)));
        }
        for (c, p, t) in r.channels {
            a.channels.insert(c, (p, t));
            a.peer_channel.insert(p, c);
            self.timers.insert((t, Timer::Channel(r.id, c)));
        }
        *self.per_user.entry(r.user).or_insert(0) += 1;
        self.by_tuple.insert(r.tuple, r.id);
        self.allocations.insert(r.id, a);
    }

    /// A fresh nonce for `client` (for tests and tools).
    pub fn mint_nonce(&self, now: Millis, client: &SocketAddr) -> String {
        self.nonces.mint(now.secs(), client)
    }

    /// The peer policy.
    pub fn policy(&self) -> &PeerPolicy {
        &self.cfg.policy
    }

    /// The realm.
    pub fn realm(&self) -> &str {
        self.creds.realm()
    }
}
