//! The gRPC shell around the sans-IO [`Server`]: the `ControlPlane` service data planes
//! attach to, and the `Admin` service operators use.
//!
//! One task (the actor) owns the `Server`. Data-plane streams and admin calls send it
//! commands; it reads the clock, feeds the state machine, and routes what comes out:
//! responses and bind requests to the data plane and worker that own the client's
//! 5-tuple, table changes (in versioned batches) to the data plane that owns the
//! allocation, lifecycle and usage events to every watcher.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};
use turnpike_proto::api::v1::{
    self, admin_server::Admin, control_plane_message, control_plane_server::ControlPlane,
    data_plane_message,
};
use turnpike_proto::api::{ip_from_bytes, ip_to_bytes};
use turnpike_proto::plane::tuple_from_api;

use crate::server::{AllocationInfo, Server};
use crate::types::{
    AllocationId, AllocationSnapshot, BindError, EndReason, Event, FiveTuple, Millis, Output,
    TableChange,
};

/// The wall clock, read only here: the core is given `now`.
#[allow(clippy::disallowed_methods)]
fn now() -> Millis {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Millis(d.as_millis() as u64)
}

/// How long a bind's route is kept without an acknowledgement (the state machine gives
/// up after 5 s and answers 508).
const BIND_ROUTE_MS: u64 = 10_000;
/// The largest message a data plane may send (its table goes in chunks well below this).
pub const MAX_CONTROL_MESSAGE: usize = 4 << 20;
/// The largest Admin request.
pub const MAX_ADMIN_MESSAGE: usize = 64 << 10;

type Tx = mpsc::Sender<Result<v1::ControlPlaneMessage, Status>>;

enum Cmd {
    Attach {
        hello: v1::Hello,
        tx: Tx,
        reply: oneshot::Sender<u64>,
    },
    Up {
        conn: u64,
        msg: data_plane_message::Message,
    },
    Detach {
        conn: u64,
    },
    List {
        user: String,
        data_plane: String,
        reply: oneshot::Sender<Vec<v1::AllocationInfo>>,
    },
    Revoke {
        id: u64,
        reply: oneshot::Sender<Option<v1::AllocationInfo>>,
    },
    RevokeUser {
        user: String,
        reply: oneshot::Sender<u64>,
    },
    Stats {
        reply: oneshot::Sender<v1::GetStatsResponse>,
    },
    Drain {
        data_plane: String,
        draining: bool,
        reply: oneshot::Sender<Result<v1::DrainDataPlaneResponse, Status>>,
    },
    Rotate {
        secrets: Vec<String>,
        reply: oneshot::Sender<u32>,
    },
    ServerStats {
        reply: oneshot::Sender<crate::server::Stats>,
    },
}

struct Conn {
    id: String,
    tx: Tx,
    hello: v1::Hello,
    version: u64,
    acked: u64,
    draining: bool,
    load: Option<v1::LoadReport>,
    attached_at: Millis,
}

/// A data plane that has gone away: kept for stats.
struct Gone {
    hello: v1::Hello,
    at: Millis,
}

struct Actor {
    server: Server,
    conns: HashMap<u64, Conn>,
    gone: HashMap<String, Gone>,
    next_conn: u64,
    /// Where responses for a 5-tuple go: only 5-tuples with a live allocation or a bind
    /// in flight, so memory is bounded by allocations, never by what unauthenticated
    /// sources send (a request's own answer goes back to where it came from).
    tuple_owner: HashMap<FiveTuple, (u64, u32)>,
    /// The data plane connection and worker owning each allocation, and its 5-tuple.
    alloc_owner: HashMap<AllocationId, (u64, u32, FiveTuple)>,
    /// Binds sent and not yet acknowledged: the connection asked, the 5-tuple, when.
    binds: HashMap<u64, (u64, FiveTuple, Millis)>,
    next_sweep: Millis,
    ownership_violations: u64,
    usage: HashMap<AllocationId, v1::Usage>,
    allocation_dp: HashMap<AllocationId, String>,
    events: broadcast::Sender<v1::Event>,
    sequence: u64,
    punted: u64,
}

/// Handles to the running control plane.
#[derive(Debug, Clone)]
pub struct ControlPlaneHandle {
    tx: mpsc::Sender<Cmd>,
    quotas: (u32, u32),
    events: broadcast::Sender<v1::Event>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cmd")
    }
}

impl ControlPlaneHandle {
    /// Starts the actor owning `server` on the current tokio runtime.
    pub fn spawn(server: Server) -> ControlPlaneHandle {
        let quotas = (server.config().user_quota, server.config().total_quota);
        let (tx, rx) = mpsc::channel(4096);
        let (events, _) = broadcast::channel(4096);
        let actor = Actor {
            server,
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
            events: events.clone(),
            sequence: 0,
            punted: 0,
        };
        tokio::spawn(actor.run(rx));
        ControlPlaneHandle { tx, quotas, events }
    }

    /// The `ControlPlane` gRPC service. Serve it over TLS that verifies client
    /// certificates against the fleet CA: a stream without a verified client certificate
    /// is refused with `Unauthenticated`. Messages above [`MAX_CONTROL_MESSAGE`] are
    /// refused.
    pub fn control_plane_service(
        &self,
    ) -> InterceptedService<v1::control_plane_server::ControlPlaneServer<Self>, RequireClientCert>
    {
        InterceptedService::new(
            v1::control_plane_server::ControlPlaneServer::new(self.clone())
                .max_decoding_message_size(MAX_CONTROL_MESSAGE),
            RequireClientCert,
        )
    }

    /// The `Admin` gRPC service: every call must carry `authorization: Bearer TOKEN`
    /// with one of `auth`'s tokens.
    pub fn admin_service(
        &self,
        auth: AdminAuth,
    ) -> InterceptedService<v1::admin_server::AdminServer<Self>, AdminAuth> {
        InterceptedService::new(
            v1::admin_server::AdminServer::new(self.clone())
                .max_decoding_message_size(MAX_ADMIN_MESSAGE),
            auth,
        )
    }

    /// The allocation quotas in force: per user, in all (0: unlimited).
    pub fn quotas(&self) -> (u32, u32) {
        self.quotas
    }

    /// The state machine's counters (for metrics).
    pub async fn server_stats(&self) -> Result<crate::server::Stats, Status> {
        self.ask(|reply| Cmd::ServerStats { reply }).await
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, Status> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| Status::unavailable("control plane stopped"))?;
        rx.await
            .map_err(|_| Status::unavailable("control plane stopped"))
    }
}

// ----- authentication -------------------------------------------------------------------

/// Refuses a call unless the TLS layer verified a client certificate (against the CA
/// the server's TLS configuration trusts).
#[derive(Debug, Clone, Copy)]
pub struct RequireClientCert;

impl Interceptor for RequireClientCert {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        if req.peer_certs().is_some_and(|c| !c.is_empty()) {
            Ok(req)
        } else {
            tracing::warn!(peer = ?req.remote_addr(), "ControlPlane call without a client certificate refused");
            Err(Status::unauthenticated(
                "a data plane must present a client certificate from the fleet CA",
            ))
        }
    }
}

/// Bearer tokens that may call Admin. Compared in constant time (over SHA-256 digests,
/// so that lengths leak nothing either).
#[derive(Clone)]
pub struct AdminAuth {
    tokens: Arc<Vec<[u8; 32]>>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AdminAuth({} tokens)", self.tokens.len())
    }
}

impl AdminAuth {
    /// Accepts any of `tokens` (empty tokens are ignored; with none, every call fails).
    pub fn new(tokens: &[String]) -> AdminAuth {
        AdminAuth {
            tokens: Arc::new(
                tokens
                    .iter()
                    .filter(|t| !t.is_empty())
                    .map(|t| Sha256::digest(t.as_bytes()).into())
                    .collect(),
            ),
        }
    }
}

impl Interceptor for AdminAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| -> [u8; 32] { Sha256::digest(t.trim().as_bytes()).into() });
        let ok = given.is_some_and(|g| {
            self.tokens
                .iter()
                .fold(subtle::Choice::from(0), |acc, t| acc | t.ct_eq(&g))
                .into()
        });
        if ok {
            Ok(req)
        } else {
            tracing::warn!(peer = ?req.remote_addr(), "Admin call without a valid token refused");
            Err(Status::unauthenticated(
                "Admin needs authorization: Bearer TOKEN (turnpike ctl --token or TURNPIKE_ADMIN_TOKEN)",
            ))
        }
    }
}

// ----- conversions ----------------------------------------------------------------------

fn sa(a: SocketAddr) -> v1::SocketAddress {
    v1::SocketAddress::from(a)
}

// ----- the actor ------------------------------------------------------------------------

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        loop {
            let wait = self
                .server
                .poll_timeout()
                .map(|t| Duration::from_millis(t.0.saturating_sub(now().0)))
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => return,
                },
                _ = tokio::time::sleep(wait) => {}
            }
            let now = now();
            let mut out = Vec::new();
            self.server.handle_timeout(now, &mut out);
            self.route(out, None);
            if now >= self.next_sweep {
                self.sweep(now);
                self.next_sweep = now.plus_secs(1);
            }
        }
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

    /// Whether `conn` owns allocation `id` (a data plane may only touch its own).
    fn owns(&mut self, conn: u64, id: AllocationId, what: &str) -> bool {
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

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Attach { hello, tx, reply } => {
                let conn = self.next_conn;
                self.next_conn += 1;
                let id = hello.data_plane_id.clone();
                // A data plane reconnecting before its old stream was noticed dead
                // replaces it.
                let stale: Vec<u64> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.id == id)
                    .map(|(k, _)| *k)
                    .collect();
                for old in stale {
                    self.command(Cmd::Detach { conn: old });
                }
                let mut hello = hello;
                let table = hello.table.take();
                let version = table.as_ref().map(|t| t.table_version).unwrap_or(0);
                tracing::info!(data_plane = %id, workers = hello.worker_count, restored = table.as_ref().map(|t| t.allocations.len()).unwrap_or(0), "data plane attached");
                self.gone.remove(&id);
                self.conns.insert(
                    conn,
                    Conn {
                        id: id.clone(),
                        tx,
                        hello,
                        version,
                        acked: version,
                        draining: false,
                        load: None,
                        attached_at: now(),
                    },
                );
                // Its listening sockets are never a peer (finding: ChannelBind to a data
                // plane's own socket looped the server into itself).
                if let Some(c) = self.conns.get(&conn) {
                    let own: Vec<SocketAddr> = c
                        .hello
                        .listening_addresses
                        .iter()
                        .filter_map(|l| SocketAddr::try_from(l.address.as_ref()?).ok())
                        .collect();
                    let mut policy = self.server.config().policy.clone();
                    policy.add_own_sockets(own);
                    self.server.set_policy(policy);
                }
                if let Some(table) = &table {
                    self.restore(conn, &id, table);
                }
                let _ = reply.send(conn);
            }
            Cmd::Up { conn, msg } => self.up(conn, msg),
            Cmd::Detach { conn } => {
                // Its allocations keep relaying headless; their routes come back with its
                // table when it reattaches.
                self.alloc_owner.retain(|_, o| o.0 != conn);
                self.tuple_owner.retain(|_, o| o.0 != conn);
                self.binds.retain(|_, b| b.0 != conn);
                if let Some(c) = self.conns.remove(&conn) {
                    tracing::warn!(data_plane = %c.id, "data plane detached");
                    self.gone.insert(
                        c.id.clone(),
                        Gone {
                            hello: c.hello,
                            at: now(),
                        },
                    );
                }
            }
            Cmd::List {
                user,
                data_plane,
                reply,
            } => {
                let list = self
                    .server
                    .allocations()
                    .filter(|a| user.is_empty() || a.account == user || a.username == user)
                    .map(|a| self.info_to_api(&a))
                    .filter(|i| data_plane.is_empty() || i.data_plane_id == data_plane)
                    .collect();
                let _ = reply.send(list);
            }
            Cmd::Revoke { id, reply } => {
                let info = self
                    .server
                    .allocation(AllocationId(id))
                    .map(|a| self.info_to_api(&a));
                let mut out = Vec::new();
                self.server.revoke(AllocationId(id), &mut out);
                self.route(out, None);
                let _ = reply.send(info);
            }
            Cmd::RevokeUser { user, reply } => {
                let mut out = Vec::new();
                let n = self.server.revoke_user(&user, &mut out);
                self.route(out, None);
                let _ = reply.send(n as u64);
            }
            Cmd::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            Cmd::Drain {
                data_plane,
                draining,
                reply,
            } => {
                let mut found = false;
                for c in self.conns.values_mut() {
                    if c.id == data_plane || data_plane.is_empty() {
                        found = true;
                        c.draining = draining;
                        let _ = c.tx.try_send(Ok(v1::ControlPlaneMessage {
                            message: Some(control_plane_message::Message::Drain(v1::Drain {
                                draining,
                            })),
                        }));
                    }
                }
                // New allocations go elsewhere; with every data plane draining, 508.
                let any_open = self.conns.values().any(|c| !c.draining);
                self.server.set_draining(!any_open, None);
                let allocations = self
                    .allocation_dp
                    .values()
                    .filter(|d| **d == data_plane || data_plane.is_empty())
                    .count() as u64;
                let _ = reply.send(if found {
                    Ok(v1::DrainDataPlaneResponse {
                        draining,
                        allocations,
                    })
                } else {
                    Err(Status::not_found(format!(
                        "no data plane {data_plane:?} attached"
                    )))
                });
            }
            Cmd::ServerStats { reply } => {
                let _ = reply.send(self.server.stats());
            }
            Cmd::Rotate { secrets, reply } => {
                let n = secrets.len() as u32;
                self.server.credentials_mut().set_secrets(secrets);
                let _ = reply.send(n);
            }
        }
    }

    /// Where new allocations arriving at data plane `conn` should go instead: nowhere if
    /// it is open; else the least loaded open data plane's first listening address.
    fn alternate_for(&self, conn: u64) -> Option<SocketAddr> {
        if !self.conns.get(&conn)?.draining {
            return None;
        }
        self.conns
            .iter()
            .filter(|(id, c)| **id != conn && !c.draining)
            .min_by_key(|(_, c)| c.load.as_ref().map(|l| l.allocations).unwrap_or(0))
            .and_then(|(_, c)| {
                let l = c.hello.listening_addresses.first()?;
                let a = l.advertised.as_ref().or(l.address.as_ref())?;
                SocketAddr::try_from(a).ok()
            })
    }

    /// Rebuilds allocations from a data plane's table, keeping only what that data plane
    /// can own: 5-tuples on its own listening addresses, relays on its own relay IPs, and
    /// allocations no other attached data plane owns.
    fn restore(&mut self, conn: u64, dp: &str, table: &v1::TableSnapshot) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let listens: Vec<SocketAddr> = c
            .hello
            .listening_addresses
            .iter()
            .filter_map(|l| SocketAddr::try_from(l.address.as_ref()?).ok())
            .collect();
        let relay_ips: Vec<std::net::IpAddr> = c
            .hello
            .relay_ips
            .iter()
            .filter_map(|r| ip_from_bytes(&r.ip).ok())
            .collect();
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

    fn up(&mut self, conn: u64, msg: data_plane_message::Message) {
        use data_plane_message::Message as M;
        match msg {
            M::PuntedRequest(p) => {
                let Ok(tuple) = tuple_from_api(p.five_tuple.as_ref()) else {
                    return;
                };
                self.punted += 1;
                let alternate = self.alternate_for(conn);
                let relay_ips: Vec<std::net::IpAddr> = self
                    .conns
                    .get(&conn)
                    .map(|c| {
                        c.hello
                            .relay_ips
                            .iter()
                            .filter_map(|r| ip_from_bytes(&r.ip).ok())
                            .collect()
                    })
                    .unwrap_or_default();
                let via = crate::server::Via {
                    relay_ips: &relay_ips,
                    alternate,
                };
                let mut out = Vec::new();
                self.server
                    .handle_via(now(), tuple, &p.datagram, &via, &mut out);
                self.route(out, Some((tuple, conn, p.worker_id)));
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
                    .handle_bind_result(now(), ack.request_id, result, &mut out);
                self.route(out, None);
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
                let dp = self
                    .conns
                    .get(&conn)
                    .map(|c| c.id.clone())
                    .unwrap_or_default();
                self.restore(conn, &dp, &t);
            }
            M::Hello(_) => {}
        }
    }

    fn usage_report(&mut self, conn: u64, u: v1::UsageReport) {
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
        let _ = self.events.send(v1::Event {
            sequence: self.sequence,
            timestamp_unix_millis: now().0,
            allocation_id: id.0,
            user_id: user.to_owned(),
            data_plane_id: dp.to_owned(),
            body: Some(body),
        });
    }

    fn send(&self, conn: u64, msg: control_plane_message::Message) {
        if let Some(c) = self.conns.get(&conn)
            && c.tx
                .try_send(Ok(v1::ControlPlaneMessage { message: Some(msg) }))
                .is_err()
        {
            tracing::warn!(data_plane = %c.id, "data plane stream full; message dropped");
        }
    }

    /// Routes what the state machine produced. Table changes go out before the
    /// responses: a client that has read "ChannelBind succeeded" may send on the channel
    /// at once, and the data plane must know the channel by then.
    ///
    /// `origin` is the punted request being answered, if any: its own responses go back to
    /// the connection and worker it came from without leaving any state behind.
    fn route(&mut self, out: Vec<Output>, origin: Option<(FiveTuple, u64, u32)>) {
        let owner_of = |me: &Self, t: &FiveTuple| match origin {
            Some((o, conn, worker)) if o == *t => Some((conn, worker)),
            _ => me.tuple_owner.get(t).copied(),
        };
        let mut batches: HashMap<u64, Vec<v1::TableChange>> = HashMap::new();
        let mut transmits = Vec::new();
        for o in out {
            match o {
                Output::Transmit { tuple, data } => transmits.push((tuple, data)),
                Output::Bind(b) => {
                    if let Some((conn, worker)) = owner_of(self, &b.tuple) {
                        self.tuple_owner.insert(b.tuple, (conn, worker));
                        self.binds.insert(b.id, (conn, b.tuple, now()));
                        self.send(
                            conn,
                            control_plane_message::Message::BindRequest(v1::BindRequest {
                                request_id: b.id,
                                worker_id: worker,
                                relay_addresses: b.relays.iter().map(|r| sa(*r)).collect(),
                                five_tuple: Some((&b.tuple).into()),
                                claim_deadline_unix_millis: now().plus_secs(30).0,
                                ..Default::default()
                            }),
                        );
                    } else {
                        let mut sink = Vec::new();
                        self.server.handle_bind_result(
                            now(),
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
                    batches.entry(conn).or_default().push(change.to_api(worker));
                }
                Output::Event(e) => self.lifecycle(e),
            }
        }
        for (conn, changes) in batches {
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
        for (tuple, data) in transmits {
            if let Some((conn, worker)) = owner_of(self, &tuple) {
                self.send(
                    conn,
                    control_plane_message::Message::SendDatagram(v1::SendDatagram {
                        worker_id: worker,
                        five_tuple: Some((&tuple).into()),
                        datagram: data.into(),
                    }),
                );
            }
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
            Event::PermissionAdded { id, peer } => (
                *id,
                Body::PermissionAdded(v1::PermissionAdded {
                    permission: Some(v1::Permission {
                        peer_ip: ip_to_bytes(*peer),
                        deadline_unix_millis: 0,
                    }),
                }),
            ),
            Event::ChannelBound { id, channel, peer } => (
                *id,
                Body::ChannelAdded(v1::ChannelAdded {
                    channel: Some(v1::Channel {
                        channel_number: u32::from(*channel),
                        peer: Some(sa(*peer)),
                        deadline_unix_millis: 0,
                    }),
                }),
            ),
            Event::Ended { id, reason } => {
                let reason = match reason {
                    EndReason::Deleted => v1::DeletionReason::Released,
                    EndReason::Expired => v1::DeletionReason::Expired,
                    EndReason::Revoked => v1::DeletionReason::Revoked,
                };
                (
                    *id,
                    Body::Deleted(v1::AllocationDeleted {
                        reason: reason as i32,
                        detail: String::new(),
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
            state: Some(v1::AllocationState {
                allocation: Some(v1::Allocation {
                    allocation_id: a.id.0,
                    worker_id: worker,
                    five_tuple: Some((&a.tuple).into()),
                    relay_addresses: a.relays.iter().map(|r| sa(*r)).collect(),
                    deadline_unix_millis: a.expires.0,
                    bandwidth_limit_bytes_per_second: self.server.config().bandwidth_limit,
                    user_id: a.account.clone(),
                    dont_fragment: false,
                    username: a.username.clone(),
                }),
                permissions: a
                    .permissions
                    .iter()
                    .map(|(ip, t)| v1::Permission {
                        peer_ip: ip_to_bytes(*ip),
                        deadline_unix_millis: t.0,
                    })
                    .collect(),
                channels: a
                    .channels
                    .iter()
                    .map(|(c, p, t)| v1::Channel {
                        channel_number: u32::from(*c),
                        peer: Some(sa(*p)),
                        deadline_unix_millis: t.0,
                    })
                    .collect(),
            }),
            usage: self.usage.get(&a.id).copied(),
            created_unix_millis: a.created_at.0,
        }
    }

    fn stats(&self) -> v1::GetStatsResponse {
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

// ----- the services ---------------------------------------------------------------------

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ControlPlane for ControlPlaneHandle {
    type AttachStream = BoxStream<v1::ControlPlaneMessage>;

    async fn attach(
        &self,
        request: Request<Streaming<v1::DataPlaneMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut up = request.into_inner();
        let first = up
            .message()
            .await?
            .ok_or_else(|| Status::failed_precondition("stream ended before Hello"))?;
        let Some(data_plane_message::Message::Hello(hello)) = first.message else {
            return Err(Status::failed_precondition(
                "the first message must be Hello",
            ));
        };
        let (tx, rx) = mpsc::channel(8192);
        let conn = self
            .ask(|reply| Cmd::Attach {
                hello,
                tx: tx.clone(),
                reply,
            })
            .await?;
        let cmds = self.tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = up.message().await {
                if let Some(msg) = m.message
                    && cmds.send(Cmd::Up { conn, msg }).await.is_err()
                {
                    break;
                }
            }
            let _ = cmds.send(Cmd::Detach { conn }).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl Admin for ControlPlaneHandle {
    async fn list_allocations(
        &self,
        request: Request<v1::ListAllocationsRequest>,
    ) -> Result<Response<v1::ListAllocationsResponse>, Status> {
        let r = request.into_inner();
        let mut all = self
            .ask(|reply| Cmd::List {
                user: r.user_id,
                data_plane: r.data_plane_id,
                reply,
            })
            .await?;
        all.sort_by_key(|a| {
            a.state
                .as_ref()
                .and_then(|s| s.allocation.as_ref())
                .map(|a| a.allocation_id)
        });
        let start: usize = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse()
                .map_err(|_| Status::invalid_argument("bad page_token"))?
        };
        let size = if r.page_size == 0 {
            1000
        } else {
            r.page_size as usize
        };
        let end = (start + size).min(all.len());
        let next = if end < all.len() {
            end.to_string()
        } else {
            String::new()
        };
        let page = all.get(start..end).map(<[_]>::to_vec).unwrap_or_default();
        Ok(Response::new(v1::ListAllocationsResponse {
            allocations: page,
            next_page_token: next,
        }))
    }

    async fn get_allocation(
        &self,
        request: Request<v1::GetAllocationRequest>,
    ) -> Result<Response<v1::GetAllocationResponse>, Status> {
        let id = request.into_inner().allocation_id;
        let all = self
            .ask(|reply| Cmd::List {
                user: String::new(),
                data_plane: String::new(),
                reply,
            })
            .await?;
        let found = all.into_iter().find(|a| {
            a.state
                .as_ref()
                .and_then(|s| s.allocation.as_ref())
                .is_some_and(|x| x.allocation_id == id)
        });
        match found {
            Some(a) => Ok(Response::new(v1::GetAllocationResponse {
                allocation: Some(a),
            })),
            None => Err(Status::not_found(format!("no allocation {id}"))),
        }
    }

    async fn revoke_allocation(
        &self,
        request: Request<v1::RevokeAllocationRequest>,
    ) -> Result<Response<v1::RevokeAllocationResponse>, Status> {
        let id = request.into_inner().allocation_id;
        match self.ask(|reply| Cmd::Revoke { id, reply }).await? {
            Some(a) => Ok(Response::new(v1::RevokeAllocationResponse {
                allocation: Some(a),
            })),
            None => Err(Status::not_found(format!("no allocation {id}"))),
        }
    }

    async fn revoke_user_allocations(
        &self,
        request: Request<v1::RevokeUserAllocationsRequest>,
    ) -> Result<Response<v1::RevokeUserAllocationsResponse>, Status> {
        let user = request.into_inner().user_id;
        if user.is_empty() {
            return Err(Status::invalid_argument("user_id is required"));
        }
        let revoked = self.ask(|reply| Cmd::RevokeUser { user, reply }).await?;
        Ok(Response::new(v1::RevokeUserAllocationsResponse { revoked }))
    }

    async fn get_stats(
        &self,
        _: Request<v1::GetStatsRequest>,
    ) -> Result<Response<v1::GetStatsResponse>, Status> {
        Ok(Response::new(self.ask(|reply| Cmd::Stats { reply }).await?))
    }

    async fn drain_data_plane(
        &self,
        request: Request<v1::DrainDataPlaneRequest>,
    ) -> Result<Response<v1::DrainDataPlaneResponse>, Status> {
        let r = request.into_inner();
        let res = self
            .ask(|reply| Cmd::Drain {
                data_plane: r.data_plane_id,
                draining: !r.undrain,
                reply,
            })
            .await??;
        Ok(Response::new(res))
    }

    async fn rotate_secrets(
        &self,
        request: Request<v1::RotateSecretsRequest>,
    ) -> Result<Response<v1::RotateSecretsResponse>, Status> {
        let secrets = request
            .into_inner()
            .secrets
            .into_iter()
            .map(|s| {
                String::from_utf8(s.to_vec())
                    .map_err(|_| Status::invalid_argument("secrets must be UTF-8"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let secret_count = self.ask(|reply| Cmd::Rotate { secrets, reply }).await?;
        Ok(Response::new(v1::RotateSecretsResponse { secret_count }))
    }

    type WatchEventsStream = BoxStream<v1::Event>;

    async fn watch_events(
        &self,
        request: Request<v1::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let r = request.into_inner();
        let kinds: Vec<i32> = r.kinds;
        let rx = self.events.subscribe();
        let stream = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |e| {
            let e = match e {
                Ok(e) => e,
                Err(_) => {
                    return Some(Err(Status::data_loss(
                        "watcher fell behind; events were dropped",
                    )));
                }
            };
            let kind = match e.body {
                Some(v1::event::Body::Usage(_)) => v1::EventKind::Usage as i32,
                _ => v1::EventKind::Lifecycle as i32,
            };
            let keep = (kinds.is_empty() || kinds.contains(&kind))
                && (r.user_id.is_empty() || e.user_id == r.user_id)
                && (r.data_plane_id.is_empty() || e.data_plane_id == r.data_plane_id);
            keep.then_some(Ok(e))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
