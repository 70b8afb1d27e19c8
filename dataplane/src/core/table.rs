//! A worker's shard of the relay table: its sockets' roles, allocations with their
//! permissions, channels and bandwidth buckets, relay sockets bound but not yet claimed,
//! and their expiry. Changes come from the control plane as [`TableChange`]s; what the
//! sockets must do about them (close, DONT-FRAGMENT) goes out as [`Output`]s.

use std::net::{IpAddr, SocketAddr};

use ahash::{AHashMap, AHashSet};

use crate::core::Token;
use crate::core::counters::{Counters, bump};
use crate::core::{Output, UNCLAIMED_BIND_MS};
use crate::{AllocationId, AllocationSnapshot, FiveTuple, Millis, TableChange, Transport, Usage};

/// Who a relay socket belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// Bound, not yet claimed by an `AllocationAdd`.
    Pending,
    /// Claimed by this allocation.
    Alloc(AllocationId),
}

/// What a socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A listening socket clients send to, on this address.
    Listen(SocketAddr),
    /// A relay socket peers send to.
    Relay(Owner),
    /// A companion of a listening socket for NAT behaviour discovery (RFC 5780), on this
    /// address: it answers Binding requests and nothing else.
    Companion(SocketAddr),
}

/// The four addresses of one RFC 5780 group, indexed by `2 × ip + port` where `ip` and
/// `port` are 1 for the alternate IP and port: [IP1:P1, IP1:P2, IP2:P1, IP2:P2], the
/// first being a listening address.
pub(crate) type NatGroup = [SocketAddr; 4];

/// A token bucket in milli-bytes, so that refills are exact at millisecond steps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    milli: u64,
    last: u64,
}

impl Bucket {
    pub(crate) fn full(rate: u64, now: u64) -> Bucket {
        Bucket {
            milli: rate.saturating_mul(1000),
            last: now,
        }
    }

    /// Takes `n` bytes at `rate` bytes/s (burst one second's worth); `false` when empty.
    pub(crate) fn take(&mut self, rate: u64, now: u64, n: usize) -> bool {
        if rate == 0 {
            return true;
        }
        let cap = rate.saturating_mul(1000);
        let elapsed = now.saturating_sub(self.last);
        self.milli = cap.min(self.milli.saturating_add(rate.saturating_mul(elapsed)));
        self.last = self.last.max(now);
        let want = (n as u64).saturating_mul(1000);
        if self.milli >= want {
            self.milli -= want;
            true
        } else {
            false
        }
    }
}

/// One allocation. Deadlines are unix milliseconds, compared with the `now` of each
/// input.
#[derive(Debug)]
pub(crate) struct Alloc {
    pub(crate) tuple: FiveTuple,
    pub(crate) relays: Vec<SocketAddr>,
    relay_tokens: Vec<Token>,
    relay_v4: Option<Token>,
    relay_v6: Option<Token>,
    /// The listening socket the client uses.
    pub(crate) listen: Option<Token>,
    pub(crate) deadline: u64,
    pub(crate) bandwidth: u64,
    user: String,
    username: String,
    /// DONT-FRAGMENT was asked: its relay sockets send with DF set.
    pub(crate) dont_fragment: bool,
    pub(crate) perms: AHashMap<IpAddr, u64>,
    /// Bound channels by number; see [`Channel`] for when the peer → client direction
    /// may use them.
    pub(crate) channels: AHashMap<u16, Channel>,
    pub(crate) peer_channel: AHashMap<SocketAddr, u16>,
    pub(crate) up: Bucket,
    pub(crate) down: Bucket,
    pub(crate) usage: Usage,
}

/// A bound channel.
///
/// Client → peer, a channel forwards as soon as it is installed. Peer → client, a
/// channel installed by a new [`TableChange::ChannelSet`] starts unconfirmed and the
/// peer's data goes out as Data indications (which every client accepts) until the
/// worker has sent this allocation's client a ChannelBind success response; then it goes
/// out as ChannelData. Some clients (libnice) drop ChannelData on a channel whose bind
/// they have not seen confirmed, and the control plane installs the channel before it
/// answers, so forwarding ChannelData at once would lose the first burst of a call. A
/// `ChannelSet` for the same number and the same peer (a refresh) keeps the state; a
/// channel already in the table when the data plane reattaches to a control plane stays
/// as it was (those the control plane restores from the `Hello` are not reinstalled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Channel {
    pub(crate) peer: SocketAddr,
    pub(crate) deadline: u64,
    /// The client has been sent a ChannelBind success response since it was installed.
    pub(crate) confirmed: bool,
}

impl Alloc {
    /// Whether a permission for `ip` is installed and live; counts the drop if not.
    pub(crate) fn permits(&self, ip: &IpAddr, now: u64, ctr: &Counters) -> bool {
        match self.perms.get(ip) {
            None => {
                bump(&ctr.no_permission, 1);
                false
            }
            Some(&d) if now >= d => {
                bump(&ctr.expired, 1);
                false
            }
            Some(_) => true,
        }
    }

    /// The relay socket that sends to `peer` (of the peer's family).
    pub(crate) fn relay_for(&self, peer: &SocketAddr) -> Option<Token> {
        match peer {
            SocketAddr::V4(_) => self.relay_v4,
            SocketAddr::V6(_) => self.relay_v6,
        }
    }

    /// The relayed address that sends to `peer` (of the peer's family), as the peer
    /// sees it: the source of what this allocation relays there.
    pub(crate) fn relayed_addr_for(&self, peer: &SocketAddr) -> Option<SocketAddr> {
        self.relays
            .iter()
            .map(|r| canonical(*r))
            .find(|r| r.is_ipv4() == peer.is_ipv4())
    }
}

/// Relay sockets bound for a 5-tuple, waiting for their `AllocationAdd`.
#[derive(Debug)]
struct PendingBind {
    relays: Vec<(SocketAddr, Token)>,
    since: u64,
}

/// Peers the data plane never relays to.
#[derive(Debug, Default)]
pub(crate) struct Denied {
    exact: AHashSet<SocketAddr>,
    /// (is IPv6, port) of denied wildcard addresses: any IP of that family on that port.
    any_ip: Vec<(bool, u16)>,
}

impl Denied {
    pub(crate) fn new(addrs: impl IntoIterator<Item = SocketAddr>) -> Denied {
        let mut d = Denied::default();
        for a in addrs {
            let a = canonical(a);
            if a.ip().is_unspecified() {
                d.any_ip.push((a.is_ipv6(), a.port()));
            } else {
                d.exact.insert(a);
            }
        }
        d
    }

    /// Whether `a` (canonical) is one of the denied addresses as written (wildcards
    /// not expanded): the server's own sockets with a concrete address.
    pub(crate) fn has_exact(&self, a: &SocketAddr) -> bool {
        self.exact.contains(a)
    }

    /// The ports of the denied addresses, exact or wildcard, of both families.
    pub(crate) fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.exact
            .iter()
            .map(|a| a.port())
            .chain(self.any_ip.iter().map(|&(_, p)| p))
    }

    /// Whether `a` (canonical) is denied. An unspecified IP (0.0.0.0, ::) is always
    /// denied: sent to, it reaches this host.
    pub(crate) fn contains(&self, a: &SocketAddr) -> bool {
        a.ip().is_unspecified()
            || self.exact.contains(a)
            || self
                .any_ip
                .iter()
                .any(|&(v6, port)| v6 == a.is_ipv6() && port == a.port())
    }
}

/// The address with an IPv4-mapped IPv6 IP turned into IPv4.
pub(crate) fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// A worker's relay table.
#[derive(Debug, Default)]
pub(crate) struct Table {
    /// The role of every socket the core knows, by token.
    roles: Vec<Option<Role>>,
    listens: Vec<(SocketAddr, Token)>,
    /// The RFC 5780 groups (none without an alternate address).
    nat: Vec<NatGroup>,
    /// Client connections (TCP or TLS) by their 5-tuple: the socket their allocation's
    /// traffic and the control plane's answers go out on.
    conns: AHashMap<FiveTuple, Token>,
    pub(crate) allocs: AHashMap<AllocationId, Alloc>,
    by_tuple: AHashMap<FiveTuple, AllocationId>,
    /// The allocations of this worker by relayed address (canonical): a datagram to one
    /// of them from another allocation of this worker is delivered without the kernel
    /// (the hairpin, `path.rs`).
    by_relay: AHashMap<SocketAddr, AllocationId>,
    pending: AHashMap<FiveTuple, Vec<PendingBind>>,
    /// Relay sockets bound in advance for no 5-tuple yet: the control plane hands one to
    /// a plain Allocate and names it in the `AllocationAdd`. Never closed by the sweep;
    /// closed when the data plane reattaches (a new control plane does not know them).
    pool: AHashMap<SocketAddr, Token>,
    /// Record the allocations each call changes, in `touched` (the XDP fast path mirrors
    /// them).
    pub(crate) track: bool,
    /// Allocations changed (or removed) since the worker last looked.
    pub(crate) touched: Vec<AllocationId>,
}

impl Table {
    fn set_role(&mut self, t: Token, role: Option<Role>) {
        let i = t.0 as usize;
        if self.roles.len() <= i {
            self.roles.resize(i + 1, None);
        }
        if let Some(r) = self.roles.get_mut(i) {
            *r = role;
        }
    }

    /// What socket `t` is for; `None` for a socket the core has closed or never knew.
    pub(crate) fn role(&self, t: Token) -> Option<Role> {
        self.roles.get(t.0 as usize).copied().flatten()
    }

    pub(crate) fn add_listen(&mut self, t: Token, local: SocketAddr) {
        self.set_role(t, Some(Role::Listen(local)));
        self.listens.push((local, t));
    }

    /// Socket `t` is the NAT discovery companion on `local`.
    pub(crate) fn add_companion(&mut self, t: Token, local: SocketAddr) {
        self.set_role(t, Some(Role::Companion(local)));
        self.listens.push((local, t));
    }

    pub(crate) fn add_nat_group(&mut self, group: NatGroup) {
        self.nat.push(group);
    }

    /// For a Binding request that reached `local`, with CHANGE-REQUEST's flags
    /// (`change_ip`, `change_port`): the socket to answer from, its address
    /// (RESPONSE-ORIGIN) and OTHER-ADDRESS; `None` if `local` is in no RFC 5780 group.
    pub(crate) fn nat_answer(
        &self,
        local: &SocketAddr,
        change_ip: bool,
        change_port: bool,
    ) -> Option<(Token, SocketAddr, SocketAddr)> {
        self.nat.iter().find_map(|g| {
            let i = g.iter().position(|a| a == local)?;
            let j = i ^ (usize::from(change_ip) << 1) ^ usize::from(change_port);
            let origin = *g.get(j)?;
            let other = *g.get(i ^ 3)?;
            Some((self.listen_token(&origin)?, origin, other))
        })
    }

    pub(crate) fn listen_token(&self, local: &SocketAddr) -> Option<Token> {
        self.listens
            .iter()
            .find(|(a, _)| a == local)
            .map(|&(_, t)| t)
    }

    /// The socket a client's traffic goes out on: the listening socket of a UDP
    /// 5-tuple, or the connection of a TCP/TLS one.
    pub(crate) fn client_token(&self, tuple: &FiveTuple) -> Option<Token> {
        match tuple.transport {
            Transport::Udp => self.listen_token(&tuple.server),
            Transport::Tcp | Transport::Tls => self.conns.get(tuple).copied(),
        }
    }

    /// A client connection was established with this 5-tuple; `false` (and nothing
    /// changed) if another connection has it (two proxied connections claiming one
    /// client address).
    pub(crate) fn add_conn(&mut self, tuple: FiveTuple, t: Token) -> bool {
        match self.conns.entry(tuple) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(t);
                true
            }
        }
    }

    /// A client connection closed: its allocation, if any, is removed at once (RFC 8656
    /// §3.1: the allocation of a TCP/TLS 5-tuple ends with its connection), its relay
    /// sockets closed. Returns the allocation removed.
    pub(crate) fn remove_conn(
        &mut self,
        tuple: &FiveTuple,
        t: Token,
        out: &mut Vec<Output>,
    ) -> Option<AllocationId> {
        if self.conns.get(tuple) != Some(&t) {
            return None;
        }
        self.conns.remove(tuple);
        let id = self.by_tuple.get(tuple).copied()?;
        self.remove_alloc(id, out);
        Some(id)
    }

    /// Whether `tuple` has a live allocation.
    pub(crate) fn has_live_allocation(&self, tuple: &FiveTuple, now: u64) -> bool {
        self.by_tuple
            .get(tuple)
            .and_then(|id| self.allocs.get(id))
            .is_some_and(|a| now < a.deadline)
    }

    /// Relay sockets were bound for `tuple`; a later `AllocationAdd` claims them.
    pub(crate) fn relays_bound(
        &mut self,
        now: u64,
        tuple: FiveTuple,
        relays: Vec<(SocketAddr, Token)>,
    ) {
        for &(_, t) in &relays {
            self.set_role(t, Some(Role::Relay(Owner::Pending)));
        }
        self.pending
            .entry(tuple)
            .or_default()
            .push(PendingBind { relays, since: now });
    }

    /// The live allocation of a 5-tuple, counted as a drop if it is missing or expired.
    pub(crate) fn live_by_tuple(
        &self,
        tuple: &FiveTuple,
        now: u64,
        ctr: &Counters,
    ) -> Option<&Alloc> {
        let Some(a) = self.by_tuple.get(tuple).and_then(|id| self.allocs.get(id)) else {
            bump(&ctr.no_allocation, 1);
            return None;
        };
        if now >= a.deadline {
            bump(&ctr.expired, 1);
            return None;
        }
        Some(a)
    }

    /// The allocation of this worker whose relayed address is `relay` (canonical).
    pub(crate) fn by_relay(&self, relay: &SocketAddr) -> Option<AllocationId> {
        self.by_relay.get(relay).copied()
    }

    pub(crate) fn by_tuple_mut(&mut self, tuple: &FiveTuple) -> Option<&mut Alloc> {
        self.by_tuple
            .get(tuple)
            .and_then(|id| self.allocs.get_mut(id))
    }

    /// Forgets socket `t` and asks for it to be closed.
    fn close(&mut self, t: Token, out: &mut Vec<Output>) {
        if self.role(t).is_some() {
            self.set_role(t, None);
            out.push(Output::Close(t));
        }
    }

    fn touch(&mut self, id: AllocationId) {
        if self.track {
            self.touched.push(id);
        }
    }

    fn remove_alloc(&mut self, id: AllocationId, out: &mut Vec<Output>) {
        if let Some(a) = self.allocs.remove(&id) {
            self.touch(id);
            if self.by_tuple.get(&a.tuple) == Some(&id) {
                self.by_tuple.remove(&a.tuple);
            }
            for r in &a.relays {
                let r = canonical(*r);
                if self.by_relay.get(&r) == Some(&id) {
                    self.by_relay.remove(&r);
                }
            }
            for t in a.relay_tokens {
                self.close(t, out);
            }
        }
    }

    /// Relay sockets were bound in advance, for the pool.
    pub(crate) fn pool_bound(&mut self, relays: Vec<(SocketAddr, Token)>) {
        for (a, t) in relays {
            self.set_role(t, Some(Role::Relay(Owner::Pending)));
            self.pool.insert(a, t);
        }
    }

    /// Closes every pooled socket.
    pub(crate) fn clear_pool(&mut self, out: &mut Vec<Output>) {
        let pooled: Vec<Token> = self.pool.drain().map(|(_, t)| t).collect();
        for t in pooled {
            self.close(t, out);
        }
    }

    /// Relay sockets in the pool.
    pub(crate) fn pooled(&self) -> usize {
        self.pool.len()
    }

    /// Takes the pending relay sockets bound for `tuple` with exactly these addresses, or
    /// else the pooled sockets of these addresses.
    fn claim(&mut self, tuple: &FiveTuple, relays: &[SocketAddr]) -> Vec<(SocketAddr, Token)> {
        if !self.pending.contains_key(tuple)
            && !relays.is_empty()
            && relays.iter().all(|r| self.pool.contains_key(r))
        {
            return relays
                .iter()
                .filter_map(|r| Some((*r, self.pool.remove(r)?)))
                .collect();
        }
        let Some(list) = self.pending.get_mut(tuple) else {
            return Vec::new();
        };
        let same = |p: &PendingBind| {
            p.relays.len() == relays.len()
                && relays.iter().all(|r| p.relays.iter().any(|(a, _)| a == r))
        };
        let claimed = match list.iter().position(same) {
            Some(i) => list.swap_remove(i).relays,
            None => Vec::new(),
        };
        if list.is_empty() {
            self.pending.remove(tuple);
        }
        claimed
    }

    /// Applies a change from the control plane at `now`.
    pub(crate) fn apply(
        &mut self,
        worker: usize,
        now: u64,
        change: TableChange,
        denied: &Denied,
        ctr: &Counters,
        out: &mut Vec<Output>,
    ) {
        self.touch(change.allocation());
        match change {
            TableChange::AllocationAdd {
                id,
                tuple,
                relays,
                deadline,
                bandwidth,
                user,
                username,
                dont_fragment,
            } => {
                self.remove_alloc(id, out);
                if let Some(&old) = self.by_tuple.get(&tuple) {
                    self.remove_alloc(old, out);
                }
                let claimed = self.claim(&tuple, &relays);
                if claimed.is_empty() && !relays.is_empty() {
                    tracing::warn!(
                        worker,
                        id = id.0,
                        ?tuple,
                        ?relays,
                        "AllocationAdd without bound relay sockets"
                    );
                }
                let mut relay_v4 = None;
                let mut relay_v6 = None;
                for &(local, t) in &claimed {
                    self.set_role(t, Some(Role::Relay(Owner::Alloc(id))));
                    match local {
                        SocketAddr::V4(_) => relay_v4 = Some(t),
                        SocketAddr::V6(_) => relay_v6 = Some(t),
                    }
                    if dont_fragment {
                        out.push(Output::DontFragment(t));
                    }
                }
                let listen = self.client_token(&tuple);
                if listen.is_none() {
                    tracing::warn!(
                        worker,
                        id = id.0,
                        ?tuple,
                        "AllocationAdd for a local address not listened on or a connection already closed"
                    );
                }
                self.by_tuple.insert(tuple, id);
                // Only relayed addresses whose socket this worker holds: the others are
                // reached through the kernel.
                for &(local, _) in &claimed {
                    self.by_relay.insert(canonical(local), id);
                }
                self.allocs.insert(
                    id,
                    Alloc {
                        tuple,
                        relays,
                        relay_tokens: claimed.iter().map(|&(_, t)| t).collect(),
                        relay_v4,
                        relay_v6,
                        listen,
                        deadline: deadline.0,
                        bandwidth,
                        user,
                        username,
                        dont_fragment,
                        perms: AHashMap::new(),
                        channels: AHashMap::new(),
                        peer_channel: AHashMap::new(),
                        up: Bucket::full(bandwidth, now),
                        down: Bucket::full(bandwidth, now),
                        usage: Usage::default(),
                    },
                );
            }
            TableChange::AllocationRefresh { id, deadline } => {
                if let Some(a) = self.allocs.get_mut(&id) {
                    a.deadline = deadline.0;
                }
            }
            TableChange::AllocationRemove { id } => self.remove_alloc(id, out),
            TableChange::PermissionSet { id, peer, deadline } => {
                if let Some(a) = self.allocs.get_mut(&id) {
                    a.perms.insert(peer.to_canonical(), deadline.0);
                }
            }
            TableChange::PermissionRemove { id, peer } => {
                if let Some(a) = self.allocs.get_mut(&id) {
                    a.perms.remove(&peer.to_canonical());
                }
            }
            TableChange::ChannelSet {
                id,
                channel,
                peer,
                deadline,
                confirmed: answered,
            } => {
                let peer = canonical(peer);
                if denied.contains(&peer) {
                    bump(&ctr.channels_refused, 1);
                    tracing::warn!(
                        worker,
                        id = id.0,
                        channel,
                        %peer,
                        "channel to a denied peer (one of the server's own sockets) refused"
                    );
                } else if let Some(a) = self.allocs.get_mut(&id) {
                    // A refresh (same number, same peer) keeps its confirmation; one
                    // handed back after a restart comes confirmed.
                    let confirmed = answered
                        || a.channels
                            .get(&channel)
                            .is_some_and(|c| c.peer == peer && c.confirmed);
                    let new = Channel {
                        peer,
                        deadline: deadline.0,
                        confirmed,
                    };
                    if let Some(old) = a.channels.insert(channel, new)
                        && old.peer != peer
                        && a.peer_channel.get(&old.peer) == Some(&channel)
                    {
                        a.peer_channel.remove(&old.peer);
                    }
                    // A peer is bound to one channel at most: the newest wins.
                    if let Some(old) = a.peer_channel.insert(peer, channel)
                        && old != channel
                    {
                        a.channels.remove(&old);
                    }
                }
            }
            TableChange::ChannelRemove { id, channel } => {
                if let Some(a) = self.allocs.get_mut(&id)
                    && let Some(Channel { peer, .. }) = a.channels.remove(&channel)
                    && a.peer_channel.get(&peer) == Some(&channel)
                {
                    a.peer_channel.remove(&peer);
                }
            }
        }
    }

    /// The relay sockets of allocations whose client is on TCP or TLS.
    pub(crate) fn stream_relay_tokens(&self) -> Vec<Token> {
        self.allocs
            .values()
            .filter(|a| a.tuple.transport != crate::Transport::Udp)
            .flat_map(|a| a.relay_tokens.iter().copied())
            .collect()
    }

    /// The client of `tuple` has been sent a ChannelBind success response: its
    /// allocation's channels may carry ChannelData to it from now on.
    pub(crate) fn confirm_channels(&mut self, tuple: &FiveTuple) {
        if let Some(&id) = self.by_tuple.get(tuple) {
            self.touch(id);
        }
        if let Some(a) = self.by_tuple_mut(tuple) {
            for ch in a.channels.values_mut() {
                ch.confirmed = true;
            }
        }
    }

    /// Drops expired allocations (closing their sockets), permissions and channels, and
    /// closes relay sockets never claimed.
    pub(crate) fn sweep(&mut self, now: u64, out: &mut Vec<Output>) {
        let expired: Vec<AllocationId> = self
            .allocs
            .iter()
            .filter(|(_, a)| now >= a.deadline)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            self.remove_alloc(id, out);
        }
        for (&id, a) in self.allocs.iter_mut() {
            let before = a.perms.len() + a.channels.len();
            a.perms.retain(|_, &mut d| now < d);
            a.channels.retain(|_, c| now < c.deadline);
            let channels = &a.channels;
            a.peer_channel.retain(|_, c| channels.contains_key(c));
            if self.track && a.perms.len() + a.channels.len() != before {
                self.touched.push(id);
            }
        }
        let mut stale = Vec::new();
        self.pending.retain(|_, list| {
            list.retain(|p| {
                let keep = now.saturating_sub(p.since) < UNCLAIMED_BIND_MS;
                if !keep {
                    stale.extend(p.relays.iter().map(|&(_, t)| t));
                }
                keep
            });
            !list.is_empty()
        });
        for t in stale {
            self.close(t, out);
        }
    }

    /// Every allocation, as the control plane rebuilds its state from it.
    pub(crate) fn snapshot(&self, worker: usize) -> Vec<AllocationSnapshot> {
        self.allocs
            .iter()
            .map(|(&id, a)| AllocationSnapshot {
                id,
                worker: worker as u32,
                tuple: a.tuple,
                relays: a.relays.clone(),
                deadline: Millis(a.deadline),
                bandwidth: a.bandwidth,
                user: a.user.clone(),
                username: a.username.clone(),
                dont_fragment: a.dont_fragment,
                permissions: a.perms.iter().map(|(&ip, &d)| (ip, Millis(d))).collect(),
                channels: a
                    .channels
                    .iter()
                    .map(|(&c, ch)| (c, ch.peer, Millis(ch.deadline)))
                    .collect(),
                usage: a.usage,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_exactly() {
        let mut b = Bucket::full(1000, 0);
        assert!(b.take(1000, 0, 1000));
        assert!(!b.take(1000, 0, 1));
        // 1 ms at 1000 B/s is one byte.
        assert!(b.take(1000, 1, 1));
        assert!(!b.take(1000, 1, 1));
        assert!(b.take(1000, 500, 499));
        // Burst is capped at one second's worth.
        assert!(!b.take(1000, 10_000, 1001));
        assert!(b.take(1000, 10_000, 1000));
        // Unlimited.
        assert!(b.take(0, 0, usize::MAX));
    }

    #[test]
    fn denied_wildcards() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap_or_else(|_| unreachable!());
        let d = Denied::new([a("10.0.0.1:3478"), a("0.0.0.0:5349")]);
        assert!(d.contains(&a("10.0.0.1:3478")));
        assert!(!d.contains(&a("10.0.0.1:3479")));
        assert!(d.contains(&a("192.0.2.1:5349")));
        assert!(!d.contains(&a("[2001:db8::1]:5349")));
        // Unspecified IPs reach this host, whatever the port.
        assert!(d.contains(&a("0.0.0.0:1")));
        assert!(d.contains(&a("[::]:1")));
    }
}
