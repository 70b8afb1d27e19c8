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

use turnpike_plane::admin::{
    AdminEvent, AllocationView, CellStats, DataPlaneView, EventBody, Totals,
};
use turnpike_plane::{
    Batch, Bind, Datagram, Down, DropReason, Hello, LoadReport, Punted, RelayIp, Snapshot,
    Transport, Up, Usage, advertised_addr,
};

use crate::server::{AllocationInfo, Server};
use crate::types::{
    AllocationId, AllocationSnapshot, BindError, Event, FiveTuple, Millis, Output, TableChange,
};

/// How long a bind's route is kept without an acknowledgement (the state machine gives
/// up after 5 s and answers 508).
const BIND_ROUTE_MS: u64 = 10_000;

/// Pool binds are numbered from here, apart from the TURN server's binds (from 1).
const POOL_BIND_IDS: u64 = 1 << 63;

/// Binds added to batches sent again on a new link are numbered from here (below the
/// pool's): their results concern nobody.
const REPLAY_BIND_IDS: u64 = 1 << 62;

/// How long a data plane may leave batches unacknowledged, making no progress, before
/// they are sent again: a batch lost with nothing after it (so no gap to see) is
/// recovered by this.
const RESEND_AFTER_MS: u64 = 2_000;

/// Table changes and binds a data plane may leave unacknowledged. Beyond, its punted
/// requests are shed (counted; clients retransmit) until it catches up: what makes
/// changes is held back instead of queueing them without bound.
pub const UNACKED_MAX: usize = 65_536;

/// One data plane's stream, as the cluster numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// The seam's counters (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeamStats {
    /// Batches the shell could not queue (a full link): each was sent again.
    pub batches_dropped: u64,
    /// Batches sent again, after the data plane saw a gap or stayed silent.
    pub batches_resent: u64,
    /// Punted requests shed because their data plane was [`UNACKED_MAX`] changes behind.
    pub punts_held_back: u64,
    /// Allocations handed back to their data plane when it came back without them (it
    /// restarted): bound again on the same relayed addresses, with their permissions
    /// and channels.
    pub allocations_handed_back: u64,
    /// Allocations ended because their data plane came back without them and they
    /// could not be handed back (a TCP or TLS client, whose connection went with the
    /// process; a relayed address that could not be bound again).
    pub allocations_lost: u64,
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterOutput {
    /// Send `msg` on data plane `conn`'s stream.
    Send {
        /// The stream.
        conn: ConnId,
        /// The message.
        msg: Down,
    },
    /// Tell the admin watchers.
    Event(AdminEvent),
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
    hello: Hello,
    /// The last batch version sent.
    version: u64,
    /// The last batch version it acknowledged.
    acked: u64,
    /// Batches sent and not yet acknowledged, oldest first: sent again when the data
    /// plane reports a gap, or makes no progress for [`RESEND_AFTER_MS`].
    unacked: VecDeque<Batch>,
    /// Binds and changes in `unacked`.
    unacked_items: usize,
    /// When it last acknowledged something, or the batches were last sent again.
    progress_at: Millis,
    /// A batch to it was dropped (its link was full): what it has not acknowledged is
    /// sent again as soon as it acknowledges something (its link is moving again).
    dropped: bool,
    draining: bool,
    load: Option<(LoadReport, Millis)>,
    attached_at: Millis,
    /// The worker each allocation was on under this id's previous link (see `Gone`).
    workers_before: HashMap<AllocationId, u32>,
}

/// A data plane that has gone away: kept for stats.
#[derive(Debug)]
struct Gone {
    hello: Hello,
    at: Millis,
    /// The batches it had not acknowledged when its link went: sent again if it comes
    /// back with the table they continue (a link lost under load must not lose them).
    unacked: VecDeque<Batch>,
    /// The worker each of its allocations was on: one it comes back without (it
    /// restarted) is handed back to the same worker.
    workers: HashMap<AllocationId, u32>,
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
    usage: HashMap<AllocationId, Usage>,
    allocation_dp: HashMap<AllocationId, String>,
    sequence: u64,
    punted: u64,
    out: VecDeque<ClusterOutput>,
    /// The operator's reason for a revocation in progress, for its Ended event.
    revoke_reasons: HashMap<AllocationId, String>,
    /// This turn's binds and table changes per data plane, sent as one numbered batch
    /// by `flush`.
    pending_tables: HashMap<ConnId, Batch>,
    /// This turn's datagrams, sent per data plane as one message by `flush`.
    pending_sends: Vec<(ConnId, Datagram)>,
    /// Punted requests shed because their data plane had [`UNACKED_MAX`] changes
    /// unacknowledged.
    punts_held_back: u64,
    /// Batches sent again (after a gap or a silence).
    batches_resent: u64,
    /// Batches the shell could not queue.
    batches_dropped: u64,
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
    next_replay_bind: u64,
    /// Binds of allocations handed back to a restarted data plane, by bind id: one that
    /// fails ends its allocation.
    handbacks: HashMap<u64, AllocationId>,
    /// Usage counted before an allocation was handed back (its data plane counts from
    /// zero again): added to what it reports, so that totals stay continuous.
    usage_base: HashMap<AllocationId, Usage>,
    allocations_handed_back: u64,
    allocations_lost: u64,
    /// Allocations taken over from the previous process of this instance (an upgrade),
    /// by data plane id, with their workers: handed back when that data plane attaches.
    adopted: HashMap<String, HashMap<AllocationId, u32>>,
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
            punts_held_back: 0,
            batches_resent: 0,
            batches_dropped: 0,
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
            next_replay_bind: 0,
            handbacks: HashMap::new(),
            usage_base: HashMap::new(),
            allocations_handed_back: 0,
            allocations_lost: 0,
            adopted: HashMap::new(),
            scratch_out: Vec::new(),
            scratch_ips: Vec::new(),
        }
    }

    /// The wall clock at `now` (see [`Server::set_wall`]): TURN REST usernames are
    /// checked against it, and nothing else.
    pub fn set_wall(&mut self, now: Millis, wall: u64) {
        self.server.set_wall(now, wall);
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
            self.resend_stale(now);
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
            for worker in 0..c.hello.workers {
                let ready = self.pools.get(&(conn, worker));
                for ip in c.hello.relay_ips.iter().map(|r| &r.ip) {
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
            self.pending_tables
                .entry(conn)
                .or_default()
                .binds
                .push(Bind {
                    id,
                    worker,
                    relays: vec![addr],
                    tuple: None,
                });
        }
    }

    /// A data plane said Hello: it is attached as the returned connection. Its table (in
    /// the Hello, and in TableSnapshot messages after it) is restored; a data plane
    /// reconnecting under the same id replaces its old stream.
    pub fn attach(&mut self, now: Millis, mut hello: Hello) -> ConnId {
        self.now = now;
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let id = hello.id.clone();
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
        let version = table.as_ref().map(|t| t.version).unwrap_or(0);
        tracing::info!(data_plane = %id, workers = hello.workers, restored = table.as_ref().map(|t| t.allocations.len()).unwrap_or(0), "data plane attached");
        // What it had not acknowledged before its link went, if its table is where that
        // continues: sent again below, in order.
        let (mut replay, mut workers) = self
            .gone
            .remove(&id)
            .map(|g| (g.unacked, g.workers))
            .unwrap_or_default();
        workers.extend(self.adopted.remove(&id).unwrap_or_default());
        replay.retain(|b| b.version > version);
        if replay.front().is_some_and(|b| b.version != version + 1) {
            tracing::warn!(data_plane = %id, version, first = replay.front().map(|b| b.version), "the data plane's table does not continue the batches it missed; they are not sent again");
            replay.clear();
        }
        // Its listening sockets are never a peer (ChannelBind to a data plane's own
        // socket would loop the server into itself), nor their public forms behind a
        // 1:1 NAT (the loop would then go out through the NAT and back).
        let own: Vec<SocketAddr> = hello
            .listening
            .iter()
            .flat_map(|&(_, a)| [a, advertised_addr(&hello.relay_ips, a)])
            .collect();
        let mut policy = self.server.config().policy.clone();
        policy.add_own_sockets(own);
        self.server.set_policy(policy);
        let complete = table.as_ref().is_none_or(|t| t.complete);
        self.conns.insert(
            conn,
            Conn {
                id: id.clone(),
                hello,
                version: replay.back().map_or(version, |b| b.version),
                acked: version,
                unacked_items: replay.iter().map(|b| b.binds.len() + b.changes.len()).sum(),
                unacked: VecDeque::new(),
                progress_at: now,
                dropped: false,
                draining: false,
                load: None,
                attached_at: now,
                workers_before: workers,
            },
        );
        if let Some(table) = table {
            self.restore(conn, &id, table);
        }
        if !replay.is_empty() {
            tracing::info!(data_plane = %id, batches = replay.len(), "sending again the batches the data plane missed when its link went");
            for b in &replay {
                for (worker, change) in &b.changes {
                    if let TableChange::AllocationAdd { id: a, tuple, .. } = change
                        && self.server.allocation_of(tuple) == Some(*a)
                    {
                        self.tuple_owner.insert(*tuple, (conn, *worker));
                        self.alloc_owner.insert(*a, (conn, *worker, *tuple));
                        self.allocation_dp.insert(*a, id.clone());
                    }
                }
            }
            // A data plane closes its pooled sockets when it attaches: an allocation
            // that took one, in a batch it never applied, needs its socket bound again
            // (a socket still held for its 5-tuple makes the bind fail, harmlessly, and
            // the allocation claims the one it has).
            let mut bound: std::collections::HashSet<SocketAddr> = Default::default();
            for b in &mut replay {
                bound.extend(b.binds.iter().flat_map(|x| x.relays.iter().copied()));
                let mut extra = Vec::new();
                for (worker, change) in &b.changes {
                    if let TableChange::AllocationAdd { tuple, relays, .. } = change
                        && !relays.iter().all(|r| bound.contains(r))
                    {
                        self.next_replay_bind += 1;
                        extra.push(Bind {
                            id: REPLAY_BIND_IDS + self.next_replay_bind,
                            worker: *worker,
                            relays: relays.clone(),
                            tuple: Some(*tuple),
                        });
                        bound.extend(relays.iter().copied());
                    }
                }
                // Before the batch's own binds and changes.
                extra.append(&mut b.binds);
                b.binds = extra;
            }
            if let Some(c) = self.conns.get_mut(&conn) {
                c.unacked_items = replay.iter().map(|b| b.binds.len() + b.changes.len()).sum();
                c.unacked = replay.clone();
            }
            self.batches_resent += replay.len() as u64;
            for b in replay {
                self.send(conn, Down::Batch(b));
            }
        }
        if complete {
            self.hand_back(conn);
        }
        // It answers the first request of a handshake itself from now on.
        let challenge = self.server.challenge_config();
        self.pending_tables.entry(conn).or_default().challenge = Some(challenge);
        self.refill_pools();
        conn
    }

    /// Data plane `conn` has told its whole table. Allocations this cell placed on it
    /// that it does not have (it restarted, or their batches were lost with a previous
    /// link) are handed back: bound again on the same relayed addresses, on the same
    /// worker, with their permissions, channels and remaining lifetimes, so that their
    /// clients keep relaying on the addresses they were given. Those that cannot be
    /// (a TCP or TLS client: its connection went with the process; a listening address
    /// or relay IP the data plane no longer has) end now, so that the two agree instead
    /// of holding quota while relaying nothing.
    fn hand_back(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let id = c.id.clone();
        let workers_before = std::mem::take(&mut c.workers_before);
        let workers = c.hello.workers.max(1);
        let listens: Vec<SocketAddr> = c.hello.listening.iter().map(|l| l.1).collect();
        let relay_ips: Vec<std::net::IpAddr> = c.hello.relay_ips.iter().map(|r| r.ip).collect();
        let mut orphans: Vec<AllocationId> = self
            .allocation_dp
            .iter()
            .filter(|(a, dp)| **dp == id && self.alloc_owner.get(a).is_none_or(|o| o.0 != conn))
            .map(|(a, _)| *a)
            .collect();
        if orphans.is_empty() {
            return;
        }
        orphans.sort();
        let mut ended = Vec::new();
        let mut handed = 0u64;
        for a in orphans {
            let worker = workers_before.get(&a).copied().unwrap_or(0) % workers;
            let Some(snap) = self.server.snapshot_of(a, worker) else {
                // Ended here meanwhile (expired, revoked).
                self.allocation_dp.remove(&a);
                continue;
            };
            let on_listen = listens.iter().any(|l| {
                *l == snap.tuple.server
                    || (l.ip().is_unspecified() && l.port() == snap.tuple.server.port())
            });
            let on_relays =
                relay_ips.is_empty() || snap.relays.iter().all(|r| relay_ips.contains(&r.ip()));
            let why = if snap.tuple.transport != Transport::Udp {
                Some("its TCP or TLS connection went with its data plane")
            } else if !on_listen || !on_relays {
                Some("its data plane came back without its listening address or relay IP")
            } else {
                None
            };
            if let Some(why) = why {
                ended.push((a, why));
                continue;
            }
            self.next_replay_bind += 1;
            let bind = REPLAY_BIND_IDS + self.next_replay_bind;
            self.handbacks.insert(bind, a);
            self.tuple_owner.insert(snap.tuple, (conn, worker));
            self.alloc_owner.insert(a, (conn, worker, snap.tuple));
            // What it reported last already includes an earlier base.
            if let Some(u) = self.usage.remove(&a) {
                self.usage_base.insert(a, u);
            }
            let pending = self.pending_tables.entry(conn).or_default();
            pending.binds.push(Bind {
                id: bind,
                worker,
                relays: snap.relays.clone(),
                tuple: Some(snap.tuple),
            });
            pending.changes.push((
                worker,
                TableChange::AllocationAdd {
                    id: a,
                    tuple: snap.tuple,
                    relays: snap.relays,
                    deadline: snap.deadline,
                    bandwidth: snap.bandwidth,
                    user: snap.user,
                    username: snap.username,
                    dont_fragment: snap.dont_fragment,
                },
            ));
            for (peer, deadline) in snap.permissions {
                pending.changes.push((
                    worker,
                    TableChange::PermissionSet {
                        id: a,
                        peer,
                        deadline,
                    },
                ));
            }
            for (channel, peer, deadline) in snap.channels {
                pending.changes.push((
                    worker,
                    TableChange::ChannelSet {
                        id: a,
                        channel,
                        peer,
                        deadline,
                        // Its client was answered before the data plane restarted.
                        confirmed: true,
                    },
                ));
            }
            handed += 1;
        }
        if handed > 0 {
            self.allocations_handed_back += handed;
            tracing::info!(data_plane = %id, allocations = handed, "allocations handed back to the data plane (bound again on their relayed addresses)");
        }
        if !ended.is_empty() {
            tracing::warn!(data_plane = %id, allocations = ended.len(), "allocations missing from the data plane's table ended");
        }
        for (a, why) in ended {
            self.end_lost(a, why);
        }
    }

    /// Every UDP allocation of data plane `dp` as its table holds it (worker and usage
    /// included): what this process hands to the one that takes over from it. TCP and
    /// TLS allocations stay with this process, which serves their connections until
    /// they close.
    pub fn export(&self, dp: &str) -> Vec<AllocationSnapshot> {
        let mut rows: Vec<AllocationSnapshot> = self
            .allocation_dp
            .iter()
            .filter(|(_, d)| d.as_str() == dp)
            .filter(|(a, _)| {
                self.alloc_owner
                    .get(a)
                    .is_none_or(|o| o.2.transport == Transport::Udp)
            })
            .filter_map(|(a, _)| {
                let worker = self
                    .alloc_owner
                    .get(a)
                    .map(|o| o.1)
                    .or_else(|| self.gone.get(dp).and_then(|g| g.workers.get(a).copied()))
                    .or_else(|| self.adopted.get(dp).and_then(|w| w.get(a).copied()))
                    .unwrap_or(0);
                let mut row = self.server.snapshot_of(*a, worker)?;
                row.usage = self
                    .usage
                    .get(a)
                    .or_else(|| self.usage_base.get(a))
                    .copied()
                    .unwrap_or_default();
                Some(row)
            })
            .collect();
        rows.sort_by_key(|r| r.id);
        rows
    }

    /// Takes over the allocations of data plane `dp` from the process this one
    /// upgrades: they are this cell's as if `dp` had gone away with them, and are handed
    /// back to it (bound again on their relayed addresses, with their permissions and
    /// channels) when it attaches. Usage counts on from the rows'.
    pub fn adopt(&mut self, now: Millis, dp: &str, rows: Vec<AllocationSnapshot>) -> usize {
        self.now = now;
        let mut workers = HashMap::new();
        for row in rows {
            let (id, worker, usage, tuple) = (row.id, row.worker, row.usage, row.tuple);
            if self.server.allocation_of(&tuple).is_some() {
                continue;
            }
            self.server.restore(row);
            if self.server.allocation_of(&tuple) != Some(id) {
                continue;
            }
            self.allocation_dp.insert(id, dp.to_owned());
            if usage != Usage::default() {
                self.usage_base.insert(id, usage);
            }
            workers.insert(id, worker);
        }
        let n = workers.len();
        self.adopted
            .entry(dp.to_owned())
            .or_default()
            .extend(workers);
        n
    }

    /// Ends allocation `a`, which its data plane lost, with `why` in its Deleted event.
    fn end_lost(&mut self, a: AllocationId, why: &str) {
        self.allocations_lost += 1;
        let mut out = Vec::new();
        self.revoke_reasons.insert(a, why.to_owned());
        self.server.revoke(a, &mut out);
        self.route(&mut out, None);
        self.revoke_reasons.remove(&a);
        self.allocation_dp.remove(&a);
        self.usage_base.remove(&a);
    }

    /// Data plane `conn`'s stream ended. Its allocations keep relaying headless; their
    /// routes come back with its table when it reattaches.
    pub fn detach(&mut self, now: Millis, conn: ConnId) {
        self.now = now;
        let workers: HashMap<AllocationId, u32> = self
            .alloc_owner
            .iter()
            .filter(|(_, o)| o.0 == conn)
            .map(|(a, o)| (*a, o.1))
            .collect();
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
                    unacked: c.unacked,
                    workers,
                },
            );
        }
    }

    /// A message on data plane `conn`'s stream.
    pub fn handle_message(&mut self, now: Millis, conn: ConnId, msg: Up) {
        self.now = now;
        self.up(conn, msg);
        if std::mem::take(&mut self.pool_taken) {
            self.refill_pools();
        }
    }

    /// Every allocation, for the admin API, filtered by user (account or username) and
    /// data plane id (empty: any).
    pub fn list(&self, user: &str, data_plane: &str) -> Vec<AllocationView> {
        self.server
            .allocations()
            .filter(|a| user.is_empty() || a.account == user || a.username == user)
            .map(|a| self.view(&a))
            .filter(|i| data_plane.is_empty() || i.data_plane == data_plane)
            .collect()
    }

    /// One allocation, for the admin API.
    pub fn allocation(&self, id: AllocationId) -> Option<AllocationView> {
        self.server.allocation(id).map(|a| self.view(&a))
    }

    /// Revokes an allocation for `reason` (logged, and the detail of its Ended event);
    /// returns it as it was.
    pub fn revoke(
        &mut self,
        now: Millis,
        id: AllocationId,
        reason: &str,
    ) -> Option<AllocationView> {
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
    /// least loaded open data plane (508 when none is open). Returns how many allocations
    /// those data planes hold.
    pub fn drain(
        &mut self,
        now: Millis,
        data_plane: &str,
        draining: bool,
    ) -> Result<u64, DrainError> {
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
            self.pending_tables.entry(conn).or_default().drain = Some(draining);
        }
        self.cell_drained = !self.conns.values().any(|c| !c.draining);
        self.update_draining();
        Ok(self
            .allocation_dp
            .values()
            .filter(|d| **d == data_plane || data_plane.is_empty())
            .count() as u64)
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
        self.conns
            .iter()
            .filter(|(id, c)| **id != conn && !c.draining)
            .filter_map(|(_, c)| {
                let &(_, a) = c.hello.listening.iter().find(|l| l.0 == transport)?;
                // Clients are sent where they can reach it: its public address
                // behind a 1:1 NAT.
                let a = advertised_addr(&c.hello.relay_ips, a);
                Some((c.load.as_ref().map(|l| l.0.allocations).unwrap_or(0), a))
            })
            .min_by_key(|&(load, _)| load)
            .map(|(_, a)| a)
    }

    /// Rebuilds allocations from a data plane's table, keeping only what that data plane
    /// can own: 5-tuples on its own listening addresses, relays on its own relay IPs, and
    /// allocations no other attached data plane owns.
    fn restore(&mut self, conn: ConnId, dp: &str, table: Snapshot) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let listens: Vec<SocketAddr> = c.hello.listening.iter().map(|l| l.1).collect();
        // Relay sockets bind the private IPs: the table holds those.
        let relay_ips: Vec<std::net::IpAddr> = c.hello.relay_ips.iter().map(|r| r.ip).collect();
        for r in table.allocations {
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
    fn punted_request(&mut self, conn: ConnId, p: Punted) {
        let tuple = p.tuple;
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        // Back-pressure: a data plane far behind on its table gets no new changes.
        if c.unacked_items >= UNACKED_MAX {
            self.punts_held_back += 1;
            return;
        }
        self.punted += 1;
        let relay_ips = std::mem::take(&mut self.scratch_ips);
        let mut relay_ips = relay_ips;
        relay_ips.clear();
        relay_ips.extend_from_slice(&c.hello.relay_ips);
        let key = (conn, p.worker);
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
            .handle_via(self.now, tuple, &p.data, &via, &mut out);
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
        self.route(&mut out, Some((tuple, conn, p.worker)));
        self.scratch_out = out;
    }

    fn up(&mut self, conn: ConnId, msg: Up) {
        match msg {
            Up::Punted(batch) => {
                for p in batch {
                    self.punted_request(conn, p);
                }
            }
            Up::BindResult { id, result } if (REPLAY_BIND_IDS..POOL_BIND_IDS).contains(&id) => {
                match (self.handbacks.remove(&id), result) {
                    (Some(a), Err(e)) if self.alloc_owner.get(&a).is_some_and(|o| o.0 == conn) => {
                        tracing::warn!(allocation = a.0, error = %e, "an allocation handed back could not bind its relayed address again; it ends");
                        self.end_lost(a, "its relayed address could not be bound again");
                    }
                    (_, result) => tracing::debug!(id, ?result, "bind of a batch sent again"),
                }
            }
            Up::BindResult { id, result } if id >= POOL_BIND_IDS => {
                let Some(&(asked, worker, addr)) = self.pool_binds.get(&id) else {
                    return;
                };
                if asked != conn {
                    self.ownership_violations += 1;
                    tracing::warn!(
                        request = id,
                        "pool bind acknowledged by another data plane; ignored"
                    );
                    return;
                }
                self.pool_binds.remove(&id);
                match result {
                    Ok(()) => self.pools.entry((conn, worker)).or_default().push(addr),
                    Err(e) => {
                        tracing::debug!(%addr, error = %e, "pool bind failed; the port is released");
                        self.server.release_relay(addr);
                    }
                }
            }
            Up::BindResult { id, result } => {
                match self.binds.get(&id) {
                    Some(&(asked, _, _)) if asked == conn => {
                        self.binds.remove(&id);
                    }
                    _ => {
                        self.ownership_violations += 1;
                        tracing::warn!(
                            request = id,
                            "bind acknowledgement for a bind not asked of this data plane; ignored"
                        );
                        return;
                    }
                }
                let mut out = Vec::new();
                self.server
                    .handle_bind_result(self.now, id, result, &mut out);
                self.route(&mut out, None);
            }
            Up::TableAck { version } => self.acked(conn, version),
            Up::Resync { applied } => {
                self.acked(conn, applied);
                let now = self.now;
                if let Some(c) = self.conns.get(&conn) {
                    tracing::info!(data_plane = %c.id, applied, missing = c.unacked.len(), "data plane missed a batch; sending again what followed");
                }
                self.resend(conn, now);
            }
            Up::Load(l) => {
                let now = self.now;
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.load = Some((l, now));
                }
            }
            Up::Usage(u) => self.usage_report(conn, u),
            Up::Snapshot(t) => {
                let complete = t.complete;
                if complete {
                    tracing::info!(data_plane = %self.conns.get(&conn).map(|c| c.id.as_str()).unwrap_or("?"), "table snapshot complete");
                }
                let dp = self
                    .conns
                    .get(&conn)
                    .map(|c| c.id.clone())
                    .unwrap_or_default();
                self.restore(conn, &dp, t);
                if complete {
                    self.hand_back(conn);
                }
            }
            Up::ConnectionClosed { worker: _, tuple } => self.connection_closed(conn, tuple),
            Up::Hello(_) => {}
        }
    }

    /// Data plane `conn` has applied every batch up to `version`.
    fn acked(&mut self, conn: ConnId, version: u64) {
        let now = self.now;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let progress = version > c.acked;
        if progress {
            c.acked = version;
            c.progress_at = now;
        }
        while let Some(b) = c.unacked.front() {
            if b.version > c.acked {
                break;
            }
            c.unacked_items -= b.binds.len() + b.changes.len();
            c.unacked.pop_front();
        }
        if progress && std::mem::take(&mut c.dropped) && !c.unacked.is_empty() {
            self.resend(conn, now);
        }
    }

    /// Sends again every batch data plane `conn` has not acknowledged, in order.
    fn resend(&mut self, conn: ConnId, now: Millis) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.progress_at = now;
        let again: Vec<Batch> = c.unacked.iter().cloned().collect();
        self.batches_resent += again.len() as u64;
        for b in again {
            self.send(conn, Down::Batch(b));
        }
    }

    /// Data planes silent about batches for [`RESEND_AFTER_MS`] get them again.
    fn resend_stale(&mut self, now: Millis) {
        let stale: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                !c.unacked.is_empty() && now.0 >= c.progress_at.0.saturating_add(RESEND_AFTER_MS)
            })
            .map(|(k, _)| *k)
            .collect();
        for conn in stale {
            if let Some(c) = self.conns.get(&conn) {
                tracing::info!(data_plane = %c.id, unacknowledged = c.unacked.len(), acked = c.acked, "batches unacknowledged; sending them again");
            }
            self.resend(conn, now);
        }
    }

    /// A client connection of data plane `conn` closed: its allocation ends (the data
    /// plane removed it already; the removal it is sent is a no-op there).
    fn connection_closed(&mut self, conn: ConnId, tuple: FiveTuple) {
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

    fn usage_report(&mut self, conn: ConnId, u: Vec<(AllocationId, Usage)>) {
        let dp = self
            .conns
            .get(&conn)
            .map(|c| c.id.clone())
            .unwrap_or_default();
        for (id, total) in u {
            if !self.owns(conn, id, "usage report") {
                continue;
            }
            let mut total = total;
            if let Some(base) = self.usage_base.get(&id) {
                total.add(base);
            }
            let prev = self.usage.insert(id, total).unwrap_or_default();
            let delta = total.since(&prev);
            if delta == Usage::default() {
                continue;
            }
            let user = self.server.account_of(id).unwrap_or_default().to_owned();
            self.emit(id, &user, &dp, EventBody::Usage { total, delta });
        }
    }

    fn emit(&mut self, id: AllocationId, user: &str, dp: &str, body: EventBody) {
        self.sequence += 1;
        self.out.push_back(ClusterOutput::Event(AdminEvent {
            sequence: self.sequence,
            at: self.now,
            allocation: id,
            user: user.to_owned(),
            data_plane: dp.to_owned(),
            body,
        }));
    }

    fn send(&mut self, conn: ConnId, msg: Down) {
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
                        self.pending_tables
                            .entry(conn)
                            .or_default()
                            .binds
                            .push(Bind {
                                id: b.id,
                                worker,
                                relays: b.relays,
                                tuple: Some(b.tuple),
                            });
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
                        .changes
                        .push((worker, change));
                }
                Output::Event(e) => self.lifecycle(e),
            }
        }
        for (tuple, data) in transmits {
            if let Some((conn, worker)) = owner_of(self, &tuple) {
                self.pending_sends.push((
                    conn,
                    Datagram {
                        worker,
                        tuple,
                        data,
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
        let mut tables: Vec<(ConnId, Batch)> = self.pending_tables.drain().collect();
        tables.sort_by_key(|(c, _)| *c);
        for (conn, mut batch) in tables {
            let Some(c) = self.conns.get_mut(&conn) else {
                continue;
            };
            if batch.is_empty() {
                continue;
            }
            c.version += 1;
            batch.version = c.version;
            if c.unacked.is_empty() {
                c.progress_at = self.now;
            }
            c.unacked_items += batch.binds.len() + batch.changes.len();
            c.unacked.push_back(batch.clone());
            self.send(conn, Down::Batch(batch));
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
            let after = self.conns.get(&conn).map_or(0, |c| c.version);
            self.send(
                conn,
                Down::Send {
                    after,
                    datagrams: batch,
                },
            );
        }
    }

    fn lifecycle(&mut self, e: Event) {
        let (id, body) = match &e {
            Event::Created {
                id, tuple, relays, ..
            } => (
                *id,
                EventBody::Created {
                    tuple: *tuple,
                    relays: relays.clone(),
                    deadline: self.server.expiry_of(*id),
                },
            ),
            Event::Refreshed { id, deadline } => (
                *id,
                EventBody::Refreshed {
                    deadline: *deadline,
                },
            ),
            Event::PermissionAdded { id, peer, deadline } => (
                *id,
                EventBody::PermissionAdded {
                    peer: *peer,
                    deadline: *deadline,
                },
            ),
            Event::ChannelBound {
                id,
                channel,
                peer,
                deadline,
            } => (
                *id,
                EventBody::ChannelAdded {
                    channel: *channel,
                    peer: *peer,
                    deadline: *deadline,
                },
            ),
            Event::Ended { id, reason } => (
                *id,
                EventBody::Deleted {
                    reason: *reason,
                    detail: self.revoke_reasons.remove(id).unwrap_or_default(),
                    usage: {
                        let base = self.usage_base.remove(id);
                        self.usage.remove(id).or(base)
                    },
                },
            ),
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

    fn view(&self, a: &AllocationInfo) -> AllocationView {
        let worker = self.alloc_owner.get(&a.id).map(|o| o.1).unwrap_or(0);
        AllocationView {
            data_plane: self.allocation_dp.get(&a.id).cloned().unwrap_or_default(),
            row: AllocationSnapshot {
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
            },
            usage: self.usage.get(&a.id).copied(),
            created: a.created_at,
        }
    }

    /// Counts UDP replies the shell shed because this data plane's queue was full of them.
    pub fn count_replies_shed(&mut self, n: u64) {
        self.server.count_replies_shed(n);
    }

    /// Statistics of the cell, for the admin API.
    pub fn stats(&self) -> CellStats {
        let s = self.server.stats();
        let mut traffic = Usage::default();
        let mut drops: std::collections::BTreeMap<DropReason, u64> = Default::default();
        let mut data_planes = Vec::new();
        for c in self.conns.values() {
            if let Some((l, _)) = &c.load {
                traffic.add(&l.traffic);
                for &(reason, n) in &l.drops {
                    *drops.entry(reason).or_default() += n;
                }
            }
            data_planes.push(DataPlaneView {
                id: c.id.clone(),
                version: c.hello.version.clone(),
                attached: true,
                draining: c.draining,
                workers: c.hello.workers,
                listening: c.hello.listening.clone(),
                acked_version: c.acked,
                load: c.load.clone(),
                changed: c.attached_at,
                relay_ips: c.hello.relay_ips.clone(),
                started: c.hello.started,
            });
        }
        for (id, g) in &self.gone {
            data_planes.push(DataPlaneView {
                id: id.clone(),
                version: g.hello.version.clone(),
                attached: false,
                workers: g.hello.workers,
                changed: g.at,
                started: g.hello.started,
                ..Default::default()
            });
        }
        let users: std::collections::HashSet<String> =
            self.server.allocations().map(|a| a.account).collect();
        CellStats {
            totals: Totals {
                allocations: s.allocations,
                users: users.len() as u64,
                data_planes_attached: self.conns.len() as u32,
                traffic,
                drops: drops.into_iter().collect(),
                punted_requests: self.punted,
                auth_failures: s.auth_failures,
                rate_limited: s.rate_limited,
                policy_denied: s.policy_denied,
                quota_rejected: s.quota_rejected,
                ownership_violations: self.ownership_violations,
                user_quota: self.server.config().user_quota,
                total_quota: self.server.config().total_quota,
            },
            data_planes,
        }
    }

    /// The shell could not queue a batch for data plane `conn` (its link was full): what
    /// that data plane has not acknowledged is sent again when it next acknowledges
    /// something (or after a silence, or when it sees the gap).
    pub fn batch_dropped(&mut self, conn: ConnId) {
        self.batches_dropped += 1;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.dropped = true;
        }
    }

    /// The seam's counters: batches sent again (after a gap or a silence) and punted
    /// requests held back because a data plane was [`UNACKED_MAX`] changes behind.
    pub fn seam_stats(&self) -> SeamStats {
        SeamStats {
            batches_dropped: self.batches_dropped,
            batches_resent: self.batches_resent,
            punts_held_back: self.punts_held_back,
            allocations_handed_back: self.allocations_handed_back,
            allocations_lost: self.allocations_lost,
        }
    }
}
