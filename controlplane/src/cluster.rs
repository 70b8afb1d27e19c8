//! The cell: the data planes attached to this control plane and who owns what, as a
//! sans-IO state machine around the TURN [`Server`] (in the spirit of quinn-proto's
//! `Endpoint` routing beside its `Connection`s).
//!
//! It knows which data plane connection and worker own each allocation and each bind in
//! flight, numbers table-change batches per data plane, drains data planes and picks
//! alternates, and rebuilds allocations from a data plane's table after a (re)attach.
//! Routes exist only for live allocations and binds in flight: a punted request's own
//! answers go back to the connection and worker it came from, so an unauthenticated
//! request leaves no state behind. A data plane may only touch what it owns.
//!
//! Call order: every entry point takes `now` (the caller reads the clock once per turn);
//! [`Cluster::attach`], [`Cluster::handle_message`], [`Cluster::detach`] and the admin
//! calls feed it; [`Cluster::handle_timeout`] when [`Cluster::poll_timeout`] says so; after
//! each, drain [`Cluster::poll_output`]: messages to send on a data plane's stream, and
//! events for watchers. Nothing here reads a clock or does I/O.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use turnpike_api::ip_to_bytes;
use turnpike_api::v1::{self, control_plane_message, data_plane_message};
use turnpike_api::{table_change_to_api, tuple_from_api};
use turnpike_plane::{RelayIp, Transport, advertised_addr};

use crate::server::{AllocationInfo, Server};
use crate::types::{
    AllocationId, AllocationSnapshot, BindError, EndReason, Event, FiveTuple, Millis, Output,
    TableChange,
};

/// How long a bind's route is kept without an acknowledgement (the state machine gives
/// up after 5 s and answers 508).
const BIND_ROUTE_MS: u64 = 10_000;

/// Pool binds are numbered from here, apart from the TURN server's binds (from 1).
const POOL_BIND_IDS: u64 = 1 << 63;

/// One data plane's stream, as the cluster numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// What the caller must do.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterOutput {
    /// Send `msg` on data plane `conn`'s stream.
    Send {
        /// The stream.
        conn: ConnId,
        /// The message.
        msg: control_plane_message::Message,
    },
    /// Tell the admin watchers.
    Event(v1::Event),
}

/// Whether an instance takes new allocations (for readiness, and for the fleet
/// registry, which publishes a drained instance as draining).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainState {
    /// New allocations are not taken here (drained by `ctl drain`, `ctl fleet drain`
    /// or SIGTERM): they are redirected, or refused with 508.
    pub draining: bool,
    /// Every data plane of the cell is drained (`ctl drain`).
    pub cell_drained: bool,
    /// Not drained, but new allocations are redirected: the instance is at its
    /// redirect load.
    pub redirecting: bool,
}

/// Why a drain could not be done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrainError {
    /// No attached data plane has that id.
    #[error("no data plane {0:?} attached")]
    NotAttached(String),
}

#[derive(Debug)]
struct Conn {
    id: String,
    hello: v1::Hello,
    /// Its relay IPs (from the Hello): new allocations arriving there relay from them,
    /// and clients are given their advertised addresses.
    relay_ips: Vec<RelayIp>,
    version: u64,
    acked: u64,
    draining: bool,
    load: Option<v1::LoadReport>,
    attached_at: Millis,
}

/// A data plane that has gone away: kept for stats.
#[derive(Debug)]
struct Gone {
    hello: v1::Hello,
    at: Millis,
}

/// The cell. See the module docs for the call order.
#[derive(Debug)]
pub struct Cluster {
    server: Server,
    now: Millis,
    conns: HashMap<ConnId, Conn>,
    gone: HashMap<String, Gone>,
    next_conn: u64,
    /// Where responses for a 5-tuple go: only 5-tuples with a live allocation or a bind
    /// in flight, so memory is bounded by allocations, never by what unauthenticated
    /// sources send.
    tuple_owner: HashMap<FiveTuple, (ConnId, u32)>,
    /// The data plane connection and worker owning each allocation, and its 5-tuple.
    alloc_owner: HashMap<AllocationId, (ConnId, u32, FiveTuple)>,
    /// Binds sent and not yet acknowledged: the connection asked, the 5-tuple, when.
    binds: HashMap<u64, (ConnId, FiveTuple, Millis)>,
    next_sweep: Millis,
    ownership_violations: u64,
    usage: HashMap<AllocationId, v1::Usage>,
    allocation_dp: HashMap<AllocationId, String>,
    sequence: u64,
    punted: u64,
    out: VecDeque<ClusterOutput>,
    /// The operator's reason for a revocation in progress, for its Ended event.
    revoke_reasons: HashMap<AllocationId, String>,
    /// This turn's table changes per data plane, sent as one batch by `flush`.
    pending_tables: HashMap<ConnId, Vec<v1::TableChange>>,
    /// This turn's datagrams, sent per data plane as one message by `flush`.
    pending_sends: Vec<(ConnId, v1::SendDatagram)>,
    /// Relay sockets each worker of each data plane holds bound in advance, ready for a
    /// plain Allocate (see [`crate::Via::pool`]).
    pools: HashMap<(ConnId, u32), Vec<SocketAddr>>,
    /// Where the fleet says new allocations go instead (this instance is drained or
    /// loaded; see `fleet.rs`), if anywhere.
    fleet: Option<crate::fleet::Alternates>,
    /// The fleet drained this instance.
    fleet_draining: bool,
    /// Where new allocations go should this instance be drained (by `ctl drain`, or
    /// SIGTERM before the fleet has heard of it): the fleet's choice, kept current
    /// whether or not this instance redirects now, so that a drain redirects at once.
    fleet_on_drain: Option<crate::fleet::Alternates>,
    /// The process itself is draining (SIGTERM with a grace).
    self_draining: bool,
    /// Users revoked fleet-wide.
    revoked_users: std::collections::HashSet<String>,
    /// The configured peer lists and quotas, kept when the fleet's replace them.
    #[allow(clippy::type_complexity)]
    configured: Option<((Vec<crate::Cidr>, Vec<crate::Cidr>), (u32, u32))>,
    /// Every data plane of the cell is drained.
    cell_drained: bool,
    /// A pooled socket was taken during this message: refill at its end.
    pool_taken: bool,
    /// Pool binds in flight: the worker asked and the address.
    pool_binds: HashMap<u64, (ConnId, u32, SocketAddr)>,
    next_pool_bind: u64,
    /// Reused buffers of the per-request path.
    scratch_out: Vec<Output>,
    scratch_ips: Vec<RelayIp>,
}

impl Cluster {
    /// A cell around `server`, with no data plane attached yet.
    pub fn new(server: Server) -> Cluster {
        Cluster {
            server,
            now: Millis(0),
            conns: HashMap::new(),
            gone: HashMap::new(),
            next_conn: 1,
            tuple_owner: HashMap::new(),
            alloc_owner: HashMap::new(),
            binds: HashMap::new(),
            next_sweep: Millis(0),
            ownership_violations: 0,
            usage: HashMap::new(),
            allocation_dp: HashMap::new(),
            sequence: 0,
            punted: 0,
            out: VecDeque::new(),
            revoke_reasons: HashMap::new(),
            pending_tables: HashMap::new(),
            pending_sends: Vec::new(),
            pools: HashMap::new(),
            fleet: None,
            fleet_draining: false,
            fleet_on_drain: None,
            self_draining: false,
            revoked_users: std::collections::HashSet::new(),
            configured: None,
            cell_drained: false,
            pool_taken: false,
            pool_binds: HashMap::new(),
            next_pool_bind: POOL_BIND_IDS,
            scratch_out: Vec::new(),
            scratch_ips: Vec::new(),
        }
    }

    /// The TURN state machine (for counters and configuration).
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Whether data plane stream `conn` is attached.
    pub fn is_attached(&self, conn: ConnId) -> bool {
        self.conns.contains_key(&conn)
    }

    /// The next output, if any. The table changes and datagrams of everything handled
    /// since the last drain go out together: one table batch and one datagram message per
    /// data plane.
    pub fn poll_output(&mut self) -> Option<ClusterOutput> {
        if self.out.is_empty() {
            self.flush();
        }
        self.out.pop_front()
    }

    /// The next time [`Cluster::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let sweep =
            (!self.binds.is_empty() || !self.tuple_owner.is_empty()).then_some(self.next_sweep);
        match (self.server.poll_timeout(), sweep) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Routes and 5-tuples kept (bounded by live allocations and binds in flight).
    pub fn routes(&self) -> usize {
        self.tuple_owner.len() + self.binds.len()
    }

    /// Expires what is due: allocations, permissions, channels and binds in the TURN
    /// state machine, and routes nothing needs any more.
    pub fn handle_timeout(&mut self, now: Millis) {
        self.now = now;
        let mut out = Vec::new();
        self.server.handle_timeout(now, &mut out);
        self.route(&mut out, None);
        if now >= self.next_sweep {
            self.sweep(now);
            self.refill_pools();
            self.next_sweep = now.plus_secs(1);
        }
    }

    /// Relay sockets held bound in advance by all data planes (for metrics and tests).
    pub fn pooled(&self) -> usize {
        self.pools.values().map(Vec::len).sum()
    }

    /// Asks every worker whose pool is below the configured size for more sockets: a
    /// port is reserved in the TURN server's bookkeeping and bound by the worker.
    fn refill_pools(&mut self) {
        let per_ip = self.server.config().relay_pool;
        if per_ip == 0 {
            return;
        }
        let mut asks = Vec::new();
        for (&conn, c) in &self.conns {
            if c.draining {
                continue;
            }
            for worker in 0..c.hello.worker_count {
                let ready = self.pools.get(&(conn, worker));
                for ip in c.relay_ips.iter().map(|r| &r.ip) {
                    let have = ready.map_or(0, |r| r.iter().filter(|a| a.ip() == *ip).count())
                        + self
                            .pool_binds
                            .values()
                            .filter(|(k, w, a)| *k == conn && *w == worker && a.ip() == *ip)
                            .count();
                    for _ in have..per_ip {
                        asks.push((conn, worker, *ip));
                    }
                }
            }
        }
        for (conn, worker, ip) in asks {
            let Some(addr) = self.server.reserve_relay(ip) else {
                return;
            };
            let id = self.next_pool_bind;
            self.next_pool_bind += 1;
            self.pool_binds.insert(id, (conn, worker, addr));
            self.send(
                conn,
                control_plane_message::Message::BindRequest(v1::BindRequest {
                    request_id: id,
                    worker_id: worker,
                    relay_addresses: vec![sa(addr)],
                    five_tuple: None,
                }),
            );
        }
    }

    /// A data plane said Hello: it is attached as the returned connection. Its table (in
    /// the Hello, and in TableSnapshot messages after it) is restored; a data plane
    /// reconnecting under the same id replaces its old stream.
    pub fn attach(&mut self, now: Millis, mut hello: v1::Hello) -> ConnId {
        self.now = now;
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let id = hello.data_plane_id.clone();
        let stale: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.id == id)
            .map(|(k, _)| *k)
            .collect();
        for old in stale {
            self.detach(now, old);
        }
        let table = hello.table.take();
        let version = table.as_ref().map(|t| t.table_version).unwrap_or(0);
        tracing::info!(data_plane = %id, workers = hello.worker_count, restored = table.as_ref().map(|t| t.allocations.len()).unwrap_or(0), "data plane attached");
        self.gone.remove(&id);
        let relay_ips: Vec<RelayIp> = hello
            .relay_ips
            .iter()
            .filter_map(|r| RelayIp::try_from(r).ok())
            .collect();
        // Its listening sockets are never a peer (ChannelBind to a data plane's own
        // socket would loop the server into itself), nor their public forms behind a
        // 1:1 NAT (the loop would then go out through the NAT and back).
        let own: Vec<SocketAddr> = hello
            .listening_addresses
            .iter()
            .filter_map(|l| SocketAddr::try_from(l.address.as_ref()?).ok())
            .flat_map(|a| [a, advertised_addr(&relay_ips, a)])
            .collect();
        let mut policy = self.server.config().policy.clone();
        policy.add_own_sockets(own);
        self.server.set_policy(policy);
        self.conns.insert(
            conn,
            Conn {
                id: id.clone(),
                relay_ips,
                hello,
                version,
                acked: version,
                draining: false,
                load: None,
                attached_at: now,
            },
        );
        if let Some(table) = &table {
            self.restore(conn, &id, table);
        }
        self.refill_pools();
        conn
    }

    /// Data plane `conn`'s stream ended. Its allocations keep relaying headless; their
    /// routes come back with its table when it reattaches.
    pub fn detach(&mut self, now: Millis, conn: ConnId) {
        self.now = now;
        self.alloc_owner.retain(|_, o| o.0 != conn);
        self.tuple_owner.retain(|_, o| o.0 != conn);
        self.binds.retain(|_, b| b.0 != conn);
        // Its pooled sockets go with the stream (the data plane closes them when it
        // reattaches): their ports are free again.
        let mut freed: Vec<SocketAddr> = Vec::new();
        self.pools.retain(|(k, _), ready| {
            if *k == conn {
                freed.append(ready);
            }
            *k != conn
        });
        self.pool_binds.retain(|_, (k, _, a)| {
            if *k == conn {
                freed.push(*a);
            }
            *k != conn
        });
        for a in freed {
            self.server.release_relay(a);
        }
        if let Some(c) = self.conns.remove(&conn) {
            tracing::warn!(data_plane = %c.id, "data plane detached");
            self.gone.insert(
                c.id.clone(),
                Gone {
                    hello: c.hello,
                    at: now,
                },
            );
        }
    }

    /// A message on data plane `conn`'s stream.
    pub fn handle_message(&mut self, now: Millis, conn: ConnId, msg: data_plane_message::Message) {
        self.now = now;
        self.up(conn, msg);
        if std::mem::take(&mut self.pool_taken) {
            self.refill_pools();
        }
    }

    /// Every allocation, for the admin API, filtered by user (account or username) and
    /// data plane id (empty: any).
    pub fn list(&self, user: &str, data_plane: &str) -> Vec<v1::AllocationInfo> {
        self.server
            .allocations()
            .filter(|a| user.is_empty() || a.account == user || a.username == user)
            .map(|a| self.info_to_api(&a))
            .filter(|i| data_plane.is_empty() || i.data_plane_id == data_plane)
            .collect()
    }

    /// One allocation, for the admin API.
    pub fn allocation(&self, id: AllocationId) -> Option<v1::AllocationInfo> {
        self.server.allocation(id).map(|a| self.info_to_api(&a))
    }

    /// Revokes an allocation for `reason` (logged, and the detail of its Ended event);
    /// returns it as it was.
    pub fn revoke(
        &mut self,
        now: Millis,
        id: AllocationId,
        reason: &str,
    ) -> Option<v1::AllocationInfo> {
        self.now = now;
        let info = self.allocation(id)?;
        tracing::info!(
            allocation = id.0,
            reason,
            "allocation revoked by an operator"
        );
        self.revoke_reasons.insert(id, reason.to_owned());
        let mut out = Vec::new();
        self.server.revoke(id, &mut out);
        self.route(&mut out, None);
        self.revoke_reasons.remove(&id);
        Some(info)
    }

    /// Revokes every allocation of `user` for `reason`; returns how many.
    pub fn revoke_user(&mut self, now: Millis, user: &str, reason: &str) -> u64 {
        self.now = now;
        let ids: Vec<AllocationId> = self
            .server
            .allocations()
            .filter(|a| a.account == user)
            .map(|a| a.id)
            .collect();
        tracing::info!(
            user,
            reason,
            allocations = ids.len(),
            "user's allocations revoked by an operator"
        );
        for id in &ids {
            self.revoke_reasons.insert(*id, reason.to_owned());
        }
        let mut out = Vec::new();
        let n = self.server.revoke_user(user, &mut out);
        self.route(&mut out, None);
        for id in &ids {
            self.revoke_reasons.remove(id);
        }
        n as u64
    }

    /// Drains (or undrains) data plane `data_plane` (empty: all): it keeps relaying its
    /// allocations, and new Allocates arriving there get 300 Try Alternate towards the
    /// least loaded open data plane (508 when none is open).
    pub fn drain(
        &mut self,
        now: Millis,
        data_plane: &str,
        draining: bool,
    ) -> Result<v1::DrainDataPlaneResponse, DrainError> {
        self.now = now;
        let targets: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.id == data_plane || data_plane.is_empty())
            .map(|(k, _)| *k)
            .collect();
        if targets.is_empty() {
            return Err(DrainError::NotAttached(data_plane.to_owned()));
        }
        for conn in targets {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.draining = draining;
            }
            self.send(
                conn,
                control_plane_message::Message::Drain(v1::Drain { draining }),
            );
        }
        self.cell_drained = !self.conns.values().any(|c| !c.draining);
        self.update_draining();
        let allocations = self
            .allocation_dp
            .values()
            .filter(|d| **d == data_plane || data_plane.is_empty())
            .count() as u64;
        Ok(v1::DrainDataPlaneResponse {
            draining,
            allocations,
        })
    }

    /// The fleet's decision for this instance: `draining` (take no new allocations:
    /// they get 300 to `alternates`, or 508 without one), where new allocations go
    /// instead while it redirects (`alternates`, set for a drained or loaded instance),
    /// and where they would go were it drained (`on_drain`: used when the instance is
    /// drained by `ctl drain` or SIGTERM before the fleet has published it).
    pub fn set_fleet(
        &mut self,
        draining: bool,
        alternates: Option<crate::fleet::Alternates>,
        on_drain: Option<crate::fleet::Alternates>,
    ) {
        if draining != self.fleet_draining {
            tracing::info!(draining, "instance drain state from the fleet");
        }
        if alternates.as_ref().map(|a| &a.instance) != self.fleet.as_ref().map(|a| &a.instance) {
            tracing::info!(to = ?alternates.as_ref().map(|a| a.instance.as_str()), "new allocations redirected");
        }
        self.fleet_draining = draining;
        self.fleet = alternates;
        self.fleet_on_drain = on_drain;
        self.update_draining();
    }

    /// Drains (or undrains) the instance itself (SIGTERM with a grace): new allocations
    /// are redirected as for a drain by the fleet, to the instance the fleet last chose.
    pub fn set_self_draining(&mut self, draining: bool) {
        self.self_draining = draining;
        self.update_draining();
    }

    /// Whether new allocations are taken, and why not.
    pub fn drain_state(&self) -> DrainState {
        DrainState {
            draining: self.server.draining(),
            cell_drained: self.cell_drained && !self.conns.is_empty(),
            redirecting: self.fleet.is_some() && !self.server.draining(),
        }
    }

    fn update_draining(&mut self) {
        self.server.set_draining(
            self.cell_drained || self.fleet_draining || self.self_draining,
            None,
        );
    }

    /// Applies the configuration shared through the fleet: its users next to the
    /// configured ones, its peer lists and quotas instead of the configured ones (which
    /// come back when the fleet's are removed).
    pub fn set_shared_config(&mut self, shared: &crate::fleet::SharedConfig) {
        let configured = self
            .configured
            .get_or_insert_with(|| {
                let c = self.server.config();
                (c.policy.lists(), (c.user_quota, c.total_quota))
            })
            .clone();
        self.server.credentials_mut().set_fleet_users(&shared.users);
        let (allow, deny) = shared.policy.clone().unwrap_or(configured.0);
        let policy = self.server.config().policy.with_lists(allow, deny);
        self.server.set_policy(policy);
        let (user, total) = shared.quotas.unwrap_or(configured.1);
        self.server.set_quotas(user, total);
    }

    /// The allocations each user holds on the other instances of the fleet (counted
    /// against the per-user quota).
    pub fn set_fleet_user_counts(&mut self, counts: std::collections::HashMap<String, u32>) {
        self.server.set_fleet_user_counts(counts);
    }

    /// Replaces the set of revoked users (refused whatever their credentials); the
    /// allocations of each user newly in the set are revoked now. Returns how many.
    pub fn set_revoked_users(&mut self, now: Millis, users: Vec<String>) -> u64 {
        let mut ended = 0;
        for u in &users {
            if !self.revoked_users.contains(u) {
                ended += self.revoke_user(now, u, "user revoked");
            }
        }
        self.revoked_users = users.iter().cloned().collect();
        self.server.set_revoked_users(users);
        ended
    }

    /// Replaces the TURN REST secrets; returns how many are in force.
    pub fn rotate_secrets(&mut self, secrets: Vec<String>) -> u32 {
        let n = secrets.len() as u32;
        self.server.credentials_mut().set_secrets(secrets);
        n
    }

    /// Forgets routes nothing needs any more: binds never acknowledged (the state machine
    /// has timed them out) and 5-tuples without an allocation or a bind in flight.
    fn sweep(&mut self, now: Millis) {
        self.binds
            .retain(|_, (_, _, at)| now.0 < at.0.saturating_add(BIND_ROUTE_MS));
        let binding: std::collections::HashSet<FiveTuple> =
            self.binds.values().map(|(_, t, _)| *t).collect();
        let server = &self.server;
        self.tuple_owner
            .retain(|t, _| binding.contains(t) || server.allocation_of(t).is_some());
    }

    /// Counts a data plane refused before it attached because its certificate does not
    /// name the id it claimed: claiming another data plane's id is an attempt on what
    /// that one owns, so it shows in `ownership_violations`.
    pub fn count_identity_refused(&mut self) {
        self.ownership_violations += 1;
    }

    /// Whether `conn` owns allocation `id` (a data plane may only touch its own).
    fn owns(&mut self, conn: ConnId, id: AllocationId, what: &str) -> bool {
        match self.alloc_owner.get(&id) {
            Some(o) if o.0 == conn => return true,
            // Ended a moment ago (its last usage report crossed the removal): not a
            // violation, just too late.
            None if self.server.account_of(id).is_none() => return false,
            _ => {}
        }
        self.ownership_violations += 1;
        let dp = self.conns.get(&conn).map(|c| c.id.as_str()).unwrap_or("?");
        tracing::warn!(data_plane = %dp, allocation = id.0, what, "data plane touched an allocation it does not own; ignored");
        false
    }

    /// Where new allocations arriving at data plane `conn` over `transport` should go
    /// instead: nowhere if it is open; else the least loaded open data plane that listens
    /// on that transport, its first address for it (a client keeps its transport when it
    /// follows ALTERNATE-SERVER, RFC 8489 §10).
    fn alternate_for(&self, conn: ConnId, transport: Transport) -> Option<SocketAddr> {
        if !self.conns.get(&conn)?.draining {
            return None;
        }
        let want = v1::Transport::from(transport) as i32;
        self.conns
            .iter()
            .filter(|(id, c)| **id != conn && !c.draining)
            .filter_map(|(_, c)| {
                let l = c
                    .hello
                    .listening_addresses
                    .iter()
                    .find(|l| l.transport == want)?;
                let a = SocketAddr::try_from(l.address.as_ref()?).ok()?;
                // Clients are sent where they can reach it: its public address
                // behind a 1:1 NAT.
                let a = advertised_addr(&c.relay_ips, a);
                Some((c.load.as_ref().map(|l| l.allocations).unwrap_or(0), a))
            })
            .min_by_key(|&(load, _)| load)
            .map(|(_, a)| a)
    }

    /// Rebuilds allocations from a data plane's table, keeping only what that data plane
    /// can own: 5-tuples on its own listening addresses, relays on its own relay IPs, and
    /// allocations no other attached data plane owns.
    fn restore(&mut self, conn: ConnId, dp: &str, table: &v1::TableSnapshot) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let listens: Vec<SocketAddr> = c
            .hello
            .listening_addresses
            .iter()
            .filter_map(|l| SocketAddr::try_from(l.address.as_ref()?).ok())
            .collect();
        // Relay sockets bind the private IPs: the table holds those.
        let relay_ips: Vec<std::net::IpAddr> = c.relay_ips.iter().map(|r| r.ip).collect();
        for s in &table.allocations {
            let Ok(r) = AllocationSnapshot::try_from(s) else {
                continue;
            };
            let worker = r.worker;
            let on_listen = listens.iter().any(|l| {
                *l == r.tuple.server
                    || (l.ip().is_unspecified() && l.port() == r.tuple.server.port())
            });
            let on_relays =
                relay_ips.is_empty() || r.relays.iter().all(|a| relay_ips.contains(&a.ip()));
            let taken = self
                .alloc_owner
                .get(&r.id)
                .is_some_and(|o| o.0 != conn && self.conns.contains_key(&o.0))
                || self
                    .server
                    .allocation_of(&r.tuple)
                    .is_some_and(|id| id != r.id);
            if !on_listen || !on_relays || taken {
                self.ownership_violations += 1;
                tracing::warn!(data_plane = %dp, allocation = r.id.0, on_listen, on_relays, taken, "restored allocation refused");
                continue;
            }
            self.tuple_owner.insert(r.tuple, (conn, worker));
            self.alloc_owner.insert(r.id, (conn, worker, r.tuple));
            self.allocation_dp.insert(r.id, dp.to_owned());
            self.server.restore(r);
        }
    }

    /// A STUN request a worker of `conn` punted: answered (through the TURN state
    /// machine) back to that connection and worker.
    fn punted_request(&mut self, conn: ConnId, p: v1::PuntedRequest) {
        let Ok(tuple) = tuple_from_api(p.five_tuple.as_ref()) else {
            return;
        };
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        self.punted += 1;
        let relay_ips = std::mem::take(&mut self.scratch_ips);
        let mut relay_ips = relay_ips;
        relay_ips.clear();
        relay_ips.extend_from_slice(&c.relay_ips);
        let key = (conn, p.worker_id);
        let mut pool = self.pools.remove(&key).unwrap_or_default();
        // A drained data plane sends its clients to another of the cell; an instance
        // that redirects (drained, or loaded: see `fleet.rs`) to another of the fleet.
        let (alternate, domain) = match self.alternate_for(conn, tuple.transport) {
            Some(a) => (Some(a), None),
            None => {
                // Drained here (`ctl drain`, SIGTERM) before the fleet has published
                // it: to where the fleet would send a drained instance's clients.
                let drained = self.server.draining();
                match self
                    .fleet
                    .as_ref()
                    .or(self.fleet_on_drain.as_ref().filter(|_| drained))
                {
                    Some(f) => (f.for_transport(tuple.transport), f.tls_domain.as_deref()),
                    None => (None, None),
                }
            }
        };
        let via = crate::server::Via {
            relay_ips: &relay_ips,
            alternate,
            alternate_domain: domain,
            pool: &pool,
        };
        let mut out = std::mem::take(&mut self.scratch_out);
        self.server
            .handle_via(self.now, tuple, &p.datagram, &via, &mut out);
        self.scratch_ips = relay_ips;
        // A pooled socket an allocation took leaves the pool, and is replaced at the end
        // of this message (off the allocation's path).
        let before = pool.len();
        for o in &out {
            if let Output::Table(TableChange::AllocationAdd { relays, .. }) = o {
                pool.retain(|a| !relays.contains(a));
            }
        }
        self.pool_taken |= pool.len() < before;
        if !pool.is_empty() {
            self.pools.insert(key, pool);
        }
        self.route(&mut out, Some((tuple, conn, p.worker_id)));
        self.scratch_out = out;
    }

    fn up(&mut self, conn: ConnId, msg: data_plane_message::Message) {
        use data_plane_message::Message as M;
        match msg {
            M::PuntedRequest(p) => self.punted_request(conn, p),
            M::PuntedRequests(batch) => {
                for p in batch.requests {
                    self.punted_request(conn, p);
                }
            }
            M::BindAck(ack) if ack.request_id >= POOL_BIND_IDS => {
                let Some(&(asked, worker, addr)) = self.pool_binds.get(&ack.request_id) else {
                    return;
                };
                if asked != conn {
                    self.ownership_violations += 1;
                    tracing::warn!(
                        request = ack.request_id,
                        "pool bind acknowledged by another data plane; ignored"
                    );
                    return;
                }
                self.pool_binds.remove(&ack.request_id);
                match ack.outcome {
                    Some(v1::bind_ack::Outcome::Success(_)) => {
                        self.pools.entry((conn, worker)).or_default().push(addr);
                    }
                    other => {
                        tracing::debug!(%addr, outcome = ?other, "pool bind failed; the port is released");
                        self.server.release_relay(addr);
                    }
                }
            }
            M::BindAck(ack) => {
                match self.binds.get(&ack.request_id) {
                    Some(&(asked, _, _)) if asked == conn => {
                        self.binds.remove(&ack.request_id);
                    }
                    _ => {
                        self.ownership_violations += 1;
                        tracing::warn!(
                            request = ack.request_id,
                            "bind acknowledgement for a bind not asked of this data plane; ignored"
                        );
                        return;
                    }
                }
                let result = match ack.outcome {
                    Some(v1::bind_ack::Outcome::Success(_)) => Ok(()),
                    Some(v1::bind_ack::Outcome::Error(e)) => Err(BindError::from(&e)),
                    None => Err(BindError::Invalid("empty bind acknowledgement".to_owned())),
                };
                let mut out = Vec::new();
                self.server
                    .handle_bind_result(self.now, ack.request_id, result, &mut out);
                self.route(&mut out, None);
            }
            M::TableAck(a) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.acked = c.acked.max(a.table_version);
                }
            }
            M::LoadReport(l) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.load = Some(l);
                }
            }
            M::UsageReport(u) => self.usage_report(conn, u),
            M::TableSnapshot(t) => {
                if t.complete {
                    tracing::info!(data_plane = %self.conns.get(&conn).map(|c| c.id.as_str()).unwrap_or("?"), "table snapshot complete");
                }
                let dp = self
                    .conns
                    .get(&conn)
                    .map(|c| c.id.clone())
                    .unwrap_or_default();
                self.restore(conn, &dp, &t);
            }
            M::ConnectionClosed(c) => self.connection_closed(conn, &c),
            M::Hello(_) => {}
        }
    }

    /// A client connection of data plane `conn` closed: its allocation ends (the data
    /// plane removed it already; the removal it is sent is a no-op there).
    fn connection_closed(&mut self, conn: ConnId, c: &v1::ConnectionClosed) {
        let tuple = match tuple_from_api(c.five_tuple.as_ref()) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "ConnectionClosed without a valid 5-tuple; ignored");
                return;
            }
        };
        let Some(id) = self.server.allocation_of(&tuple) else {
            return;
        };
        if !self.owns(conn, id, "connection closed") {
            return;
        }
        let mut out = Vec::new();
        self.server.connection_closed(id, &mut out);
        self.route(&mut out, None);
    }

    fn usage_report(&mut self, conn: ConnId, u: v1::UsageReport) {
        let dp = self
            .conns
            .get(&conn)
            .map(|c| c.id.clone())
            .unwrap_or_default();
        for a in u.allocations {
            let id = AllocationId(a.allocation_id);
            if !self.owns(conn, id, "usage report") {
                continue;
            }
            let total = a.usage.unwrap_or_default();
            let prev = self.usage.insert(id, total).unwrap_or_default();
            let delta = usage_delta(&total, &prev);
            if delta == v1::Usage::default() {
                continue;
            }
            let user = self.server.account_of(id).unwrap_or_default().to_owned();
            self.emit(
                id,
                &user,
                &dp,
                v1::event::Body::Usage(v1::UsageUpdate {
                    total: Some(total),
                    delta: Some(delta),
                }),
            );
        }
    }

    fn emit(&mut self, id: AllocationId, user: &str, dp: &str, body: v1::event::Body) {
        self.sequence += 1;
        self.out.push_back(ClusterOutput::Event(v1::Event {
            sequence: self.sequence,
            timestamp_unix_millis: self.now.0,
            allocation_id: id.0,
            user_id: user.to_owned(),
            data_plane_id: dp.to_owned(),
            body: Some(body),
        }));
    }

    fn send(&mut self, conn: ConnId, msg: control_plane_message::Message) {
        if self.conns.contains_key(&conn) {
            self.out.push_back(ClusterOutput::Send { conn, msg });
        }
    }

    /// Routes what the state machine produced. Table changes go out before the
    /// responses: a client that has read "ChannelBind succeeded" may send on the channel
    /// at once, and the data plane must know the channel by then.
    ///
    /// `origin` is the punted request being answered, if any: its own responses go back to
    /// the connection and worker it came from without leaving any state behind.
    fn route(&mut self, out: &mut Vec<Output>, origin: Option<(FiveTuple, ConnId, u32)>) {
        let owner_of = |me: &Self, t: &FiveTuple| match origin {
            Some((o, conn, worker)) if o == *t => Some((conn, worker)),
            _ => me.tuple_owner.get(t).copied(),
        };
        let mut transmits = Vec::new();
        for o in out.drain(..) {
            match o {
                Output::Transmit { tuple, data } => transmits.push((tuple, data)),
                Output::Bind(b) => {
                    if let Some((conn, worker)) = owner_of(self, &b.tuple) {
                        self.tuple_owner.insert(b.tuple, (conn, worker));
                        self.binds.insert(b.id, (conn, b.tuple, self.now));
                        self.send(
                            conn,
                            control_plane_message::Message::BindRequest(v1::BindRequest {
                                request_id: b.id,
                                worker_id: worker,
                                relay_addresses: b.relays.iter().map(|r| sa(*r)).collect(),
                                five_tuple: Some((&b.tuple).into()),
                            }),
                        );
                    } else {
                        let mut sink = Vec::new();
                        self.server.handle_bind_result(
                            self.now,
                            b.id,
                            Err(BindError::NoDataPlane),
                            &mut sink,
                        );
                    }
                }
                Output::Table(change) => {
                    let id = change.allocation();
                    if let TableChange::AllocationAdd { tuple, .. } = &change
                        && let Some((conn, worker)) = owner_of(self, tuple)
                    {
                        self.tuple_owner.insert(*tuple, (conn, worker));
                        self.alloc_owner.insert(id, (conn, worker, *tuple));
                        if let Some(c) = self.conns.get(&conn) {
                            self.allocation_dp.insert(id, c.id.clone());
                        }
                    }
                    let Some(&(conn, worker, tuple)) = self.alloc_owner.get(&id) else {
                        continue;
                    };
                    if let TableChange::AllocationRemove { .. } = change {
                        self.alloc_owner.remove(&id);
                        self.tuple_owner.remove(&tuple);
                    }
                    self.pending_tables
                        .entry(conn)
                        .or_default()
                        .push(table_change_to_api(&change, worker));
                }
                Output::Event(e) => self.lifecycle(e),
            }
        }
        for (tuple, data) in transmits {
            if let Some((conn, worker)) = owner_of(self, &tuple) {
                self.pending_sends.push((
                    conn,
                    v1::SendDatagram {
                        worker_id: worker,
                        five_tuple: Some((&tuple).into()),
                        datagram: data.into(),
                    },
                ));
            }
        }
    }

    /// Ends a turn (the caller drains the outputs): each data plane gets the table changes of the turn as one numbered
    /// batch, then the datagrams of the turn as one message. Table changes go out before
    /// the responses: a client that has read "ChannelBind succeeded" may send on the
    /// channel at once, and the data plane must know the channel by then.
    fn flush(&mut self) {
        let mut tables: Vec<(ConnId, Vec<v1::TableChange>)> = self.pending_tables.drain().collect();
        tables.sort_by_key(|(c, _)| *c);
        for (conn, changes) in tables {
            let Some(c) = self.conns.get_mut(&conn) else {
                continue;
            };
            c.version += 1;
            let version = c.version;
            self.send(
                conn,
                control_plane_message::Message::TableChanges(v1::TableChangeBatch {
                    table_version: version,
                    changes,
                }),
            );
        }
        let mut sends = std::mem::take(&mut self.pending_sends);
        // Memory follows the load: what a burst needed is not kept.
        self.scratch_out.shrink_to(64);
        // Stable: each data plane's datagrams keep their order.
        sends.sort_by_key(|(c, _)| *c);
        let mut it = sends.into_iter().peekable();
        while let Some((conn, first)) = it.next() {
            let mut batch = vec![first];
            while let Some((_, d)) = it.next_if(|(c, _)| *c == conn) {
                batch.push(d);
            }
            let msg = if batch.len() == 1 {
                control_plane_message::Message::SendDatagram(batch.remove(0))
            } else {
                control_plane_message::Message::SendDatagrams(v1::SendDatagrams {
                    datagrams: batch,
                })
            };
            self.send(conn, msg);
        }
    }

    fn lifecycle(&mut self, e: Event) {
        use v1::event::Body;
        let (id, body) = match &e {
            Event::Created {
                id, tuple, relays, ..
            } => (
                *id,
                Body::Created(v1::AllocationCreated {
                    five_tuple: Some(tuple.into()),
                    relay_addresses: relays.iter().map(|r| sa(*r)).collect(),
                    deadline_unix_millis: self.server.expiry_of(*id).map(|t| t.0).unwrap_or(0),
                }),
            ),
            Event::Refreshed { id, deadline } => (
                *id,
                Body::Refreshed(v1::AllocationRefreshed {
                    deadline_unix_millis: deadline.0,
                }),
            ),
            Event::PermissionAdded { id, peer, deadline } => (
                *id,
                Body::PermissionAdded(v1::PermissionAdded {
                    permission: Some(v1::Permission {
                        peer_ip: ip_to_bytes(*peer),
                        deadline_unix_millis: deadline.0,
                    }),
                }),
            ),
            Event::ChannelBound {
                id,
                channel,
                peer,
                deadline,
            } => (
                *id,
                Body::ChannelAdded(v1::ChannelAdded {
                    channel: Some(v1::Channel {
                        channel_number: u32::from(*channel),
                        peer: Some(sa(*peer)),
                        deadline_unix_millis: deadline.0,
                    }),
                }),
            ),
            Event::Ended { id, reason } => {
                let reason = match reason {
                    EndReason::Deleted => v1::DeletionReason::Released,
                    EndReason::Expired => v1::DeletionReason::Expired,
                    EndReason::Revoked => v1::DeletionReason::Revoked,
                    EndReason::ConnectionClosed => v1::DeletionReason::ConnectionClosed,
                };
                (
                    *id,
                    Body::Deleted(v1::AllocationDeleted {
                        reason: reason as i32,
                        detail: self.revoke_reasons.remove(id).unwrap_or_default(),
                        usage: self.usage.remove(id),
                    }),
                )
            }
        };
        let user = match &e {
            Event::Created { user, .. } => user.clone(),
            _ => self.server.account_of(id).unwrap_or_default().to_owned(),
        };
        let dp = if matches!(e, Event::Ended { .. }) {
            self.allocation_dp.remove(&id).unwrap_or_default()
        } else {
            self.allocation_dp.get(&id).cloned().unwrap_or_default()
        };
        self.emit(id, &user, &dp, body);
    }

    fn info_to_api(&self, a: &AllocationInfo) -> v1::AllocationInfo {
        let worker = self.alloc_owner.get(&a.id).map(|o| o.1).unwrap_or(0);
        v1::AllocationInfo {
            data_plane_id: self.allocation_dp.get(&a.id).cloned().unwrap_or_default(),
            state: Some(v1::AllocationState::from(&AllocationSnapshot {
                id: a.id,
                worker,
                tuple: a.tuple,
                relays: a.relays.clone(),
                deadline: a.expires,
                bandwidth: self.server.config().bandwidth_limit,
                user: a.account.clone(),
                username: a.username.clone(),
                dont_fragment: false,
                permissions: a.permissions.clone(),
                channels: a.channels.clone(),
                usage: Default::default(),
            })),
            usage: self.usage.get(&a.id).copied(),
            created_unix_millis: a.created_at.0,
        }
    }

    /// Counts UDP replies the shell shed because this data plane's queue was full of them.
    pub fn count_replies_shed(&mut self, n: u64) {
        self.server.count_replies_shed(n);
    }

    /// Statistics of the cell, for the admin API.
    pub fn stats(&self) -> v1::GetStatsResponse {
        let s = self.server.stats();
        let mut traffic = v1::Usage::default();
        let mut drops: HashMap<i32, u64> = HashMap::new();
        let mut data_planes = Vec::new();
        for c in self.conns.values() {
            if let Some(l) = &c.load {
                add_usage(&mut traffic, l.traffic.as_ref());
                for d in &l.drops {
                    *drops.entry(d.reason).or_default() += d.packets;
                }
            }
            data_planes.push(v1::DataPlaneStats {
                data_plane_id: c.id.clone(),
                version: c.hello.version.clone(),
                attached: true,
                draining: c.draining,
                worker_count: c.hello.worker_count,
                listening_addresses: c.hello.listening_addresses.clone(),
                acked_table_version: c.acked,
                load: c.load.clone(),
                attached_changed_unix_millis: c.attached_at.0,
                relay_ips: c.hello.relay_ips.clone(),
            });
        }
        for (id, g) in &self.gone {
            data_planes.push(v1::DataPlaneStats {
                data_plane_id: id.clone(),
                version: g.hello.version.clone(),
                attached: false,
                worker_count: g.hello.worker_count,
                attached_changed_unix_millis: g.at.0,
                ..Default::default()
            });
        }
        let users: std::collections::HashSet<String> =
            self.server.allocations().map(|a| a.account).collect();
        v1::GetStatsResponse {
            totals: Some(v1::ServerStats {
                allocations: s.allocations,
                users: users.len() as u64,
                data_planes_attached: self.conns.len() as u32,
                traffic: Some(traffic),
                drops: drops
                    .into_iter()
                    .map(|(reason, packets)| v1::DropCount { reason, packets })
                    .collect(),
                punted_requests: self.punted,
                auth_failures: s.auth_failures,
                rate_limited: s.rate_limited,
                policy_denied: s.policy_denied,
                quota_rejected: s.quota_rejected,
                ownership_violations: self.ownership_violations,
                user_quota: self.server.config().user_quota,
                total_quota: self.server.config().total_quota,
            }),
            data_planes,
        }
    }
}

fn add_usage(total: &mut v1::Usage, u: Option<&v1::Usage>) {
    let Some(u) = u else {
        return;
    };
    let add = |t: &mut Option<v1::TrafficCounters>, x: &Option<v1::TrafficCounters>| {
        let x = x.unwrap_or_default();
        let t = t.get_or_insert_with(Default::default);
        t.packets += x.packets;
        t.bytes += x.bytes;
    };
    add(&mut total.client_to_peer, &u.client_to_peer);
    add(&mut total.peer_to_client, &u.peer_to_client);
}

fn usage_delta(now: &v1::Usage, prev: &v1::Usage) -> v1::Usage {
    let d = |a: &Option<v1::TrafficCounters>, b: &Option<v1::TrafficCounters>| {
        let (a, b) = (a.unwrap_or_default(), b.unwrap_or_default());
        Some(v1::TrafficCounters {
            packets: a.packets.saturating_sub(b.packets),
            bytes: a.bytes.saturating_sub(b.bytes),
        })
    };
    v1::Usage {
        client_to_peer: d(&now.client_to_peer, &prev.client_to_peer),
        peer_to_client: d(&now.peer_to_client, &prev.peer_to_client),
    }
}

fn sa(a: SocketAddr) -> v1::SocketAddress {
    v1::SocketAddress::from(a)
}
