//! The gRPC shell around the sans-IO [`Server`]: the `ControlPlane` service data planes
//! attach to, and the `Admin` service operators use.
//!
//! One task (the actor) owns the `Server`. Data-plane streams and admin calls send it
//! commands; it reads the clock, feeds the state machine, and routes what comes out:
//! responses and bind requests to the data plane and worker that own the client's
//! 5-tuple, table changes (in versioned batches) to the data plane that owns the
//! allocation, lifecycle and usage events to every watcher.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use subtle::ConstantTimeEq;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};
use turnpike_api::convert::{
    At, allocation_view_to_api, down_to_api, event_to_api, hello_from_api, stats_to_api,
    up_from_api,
};
use turnpike_api::v1::{
    self, admin_server::Admin, control_plane_server::ControlPlane, data_plane_message,
};
use turnpike_controlplane::cluster::{Cluster, ClusterOutput, ConnId, DrainState, SeamStats};
use turnpike_controlplane::server::Server;
use turnpike_controlplane::types::{AllocationId, Millis};
use turnpike_controlplane::{fleet, server};
use turnpike_plane::{Clock, Datagram, Down, Hello, Transport, Up};

/// Most commands handled in one turn of the actor (bounds what one turn buffers).
const TURN_COMMANDS: usize = 32;
/// The largest message a data plane may send (its table goes in chunks well below this).
pub const MAX_CONTROL_MESSAGE: usize = 4 << 20;
/// The largest Admin request.
pub const MAX_ADMIN_MESSAGE: usize = 64 << 10;

/// The link to one data plane (a gRPC stream or the in-process link), and the bytes of
/// UDP replies queued on it.
#[derive(Clone)]
struct Tx {
    tx: mpsc::Sender<Down>,
    queued: Arc<Queued>,
    /// Batches the link may hold (`--plane-queue`).
    max_batches: usize,
}

/// What waits on one data plane's link: the bytes of UDP replies and the batches.
#[derive(Debug, Default)]
struct Queued {
    replies: AtomicUsize,
    batches: AtomicUsize,
}

impl Queued {
    /// `m` was taken off the link.
    fn taken(&self, m: &Down) {
        match m {
            Down::Batch(_) => self.batches.fetch_sub(1, Ordering::Relaxed),
            _ => self
                .replies
                .fetch_sub(queued_reply_bytes(m), Ordering::Relaxed),
        };
    }
}

/// Messages queued towards one data plane at most, and by default the batches among
/// them (`--plane-queue` sets those). A full queue drops what does not fit: datagrams
/// (clients retransmit) are counted as shed; a numbered batch dropped is seen by the
/// data plane as a gap, or by the cluster as a silence, and sent again (see
/// [`Cluster`]), so no table change or bind is lost.
pub const DOWN_QUEUE: usize = 8192;

/// UDP replies queued towards one data plane beyond which more are shed (counted as
/// `replies_shed`): under a flood of spoofed requests the data plane cannot send 401s
/// as fast as they are made, and a queue of 8192 messages of them held tens of MiB
/// (issue #25 N4). UDP clients retransmit; replies on TCP/TLS, and table changes, are
/// never shed by this rule.
const QUEUED_REPLY_BYTES: usize = 512 * 1024;

/// Messages of one data plane read off its stream and not yet handled by the actor. A
/// message may be a batch of 64 punted requests: 4096 of them (the actor's queue) held
/// a flood's requests by the hundred thousand. Beyond this the stream is not read, HTTP/2
/// flow control holds the data plane's sender, and its punt queue (bounded, counted as
/// drops) sheds the rest (issue #25 N4).
pub const UP_IN_FLIGHT: usize = 32;

/// What a queued UDP reply is charged: its bytes and its bookkeeping.
fn reply_cost(d: &Datagram) -> usize {
    d.data.len() + 96
}

fn is_udp(d: &Datagram) -> bool {
    d.tuple.transport == Transport::Udp
}

/// The UDP replies' cost in a message to a data plane (0 for other messages).
fn queued_reply_bytes(m: &Down) -> usize {
    match m {
        Down::Send { datagrams, .. } => {
            datagrams.iter().filter(|d| is_udp(d)).map(reply_cost).sum()
        }
        _ => 0,
    }
}

enum Cmd {
    Attach {
        hello: Hello,
        tx: Tx,
        /// `None`: refused, this control plane no longer leads.
        reply: oneshot::Sender<Option<ConnId>>,
    },
    Up {
        conn: ConnId,
        msg: Up,
        /// Held until the actor has handled the message (see [`UP_IN_FLIGHT`]).
        _slot: Option<tokio::sync::OwnedSemaphorePermit>,
    },
    /// A data plane was refused for claiming an id its certificate does not name.
    IdentityRefused,
    Detach {
        conn: ConnId,
    },
    List {
        user: String,
        data_plane: String,
        reply: oneshot::Sender<Vec<v1::AllocationInfo>>,
    },
    Revoke {
        id: u64,
        reason: String,
        reply: oneshot::Sender<Option<v1::AllocationInfo>>,
    },
    RevokeUser {
        user: String,
        reason: String,
        reply: oneshot::Sender<u64>,
    },
    Stats {
        reply: oneshot::Sender<v1::GetStatsResponse>,
    },
    Drain {
        data_plane: String,
        draining: bool,
        reply: oneshot::Sender<Result<u64, Status>>,
    },
    Rotate {
        secrets: Vec<String>,
        reply: oneshot::Sender<u32>,
    },
    ServerStats {
        reply: oneshot::Sender<server::Stats>,
    },
    SeamStats {
        reply: oneshot::Sender<SeamStats>,
    },
    Export {
        data_plane: String,
        reply: oneshot::Sender<Vec<turnpike_plane::AllocationSnapshot>>,
    },
    Adopt {
        data_plane: String,
        rows: Vec<turnpike_plane::AllocationSnapshot>,
        reply: oneshot::Sender<usize>,
    },
    Fleet {
        draining: bool,
        alternates: Option<fleet::Alternates>,
        on_drain: Option<fleet::Alternates>,
        users: Option<HashMap<String, u32>>,
    },
    SelfDrain {
        draining: bool,
    },
    HeavyUsers {
        min: u32,
        reply: oneshot::Sender<Vec<(String, u32)>>,
    },
    Shared {
        shared: fleet::SharedConfig,
    },
    Revoked {
        users: Vec<String>,
        reply: oneshot::Sender<u64>,
    },
    StepDown {
        reply: oneshot::Sender<()>,
    },
}

/// The task that owns the cell: the gRPC plumbing around [`Cluster`]. It reads the clock
/// once per turn, feeds the cluster, and carries out what comes out.
struct Actor {
    cluster: Cluster,
    /// The control plane's one clock.
    clock: Clock,
    txs: HashMap<ConnId, Tx>,
    events: broadcast::Sender<v1::Event>,
    /// Read again when a data plane attaches: a stream that arrives after
    /// [`ControlPlaneHandle::step_down`] is refused.
    leadership: Arc<Leadership>,
    /// The cluster's drain state, published after every turn.
    drain_state: tokio::sync::watch::Sender<DrainState>,
}

/// Handles to the running control plane.
#[derive(Debug, Clone)]
pub struct ControlPlaneHandle {
    tx: mpsc::Sender<Cmd>,
    clock: Clock,
    /// Messages queued towards each data plane (see [`DOWN_QUEUE`]).
    down_queue: usize,
    /// The quotas in force (the fleet may replace the configured ones).
    quotas: Arc<std::sync::Mutex<(u32, u32)>>,
    configured_quotas: (u32, u32),
    events: broadcast::Sender<v1::Event>,
    /// Whether this control plane leads its cell (always, without an election): data
    /// planes may attach only to the leader.
    leadership: Arc<Leadership>,
    /// Whether it takes new allocations (see [`ControlPlaneHandle::drain_state`]).
    drain_state: tokio::sync::watch::Receiver<DrainState>,
}

/// Whether a control plane leads its cell, and who does when it does not.
#[derive(Debug)]
struct Leadership {
    leading: std::sync::atomic::AtomicBool,
    /// The leader's URL as last seen by a follower (for its refusals).
    leader: std::sync::Mutex<Option<String>>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cmd")
    }
}

impl ControlPlaneHandle {
    /// Starts the actor owning `server` on the current tokio runtime, with a clock of
    /// its own.
    pub fn spawn(server: Server) -> ControlPlaneHandle {
        ControlPlaneHandle::spawn_with_clock(server, Clock::new())
    }

    /// As [`ControlPlaneHandle::spawn`], on `clock` (`serve` gives both planes one).
    pub fn spawn_with_clock(server: Server, clock: Clock) -> ControlPlaneHandle {
        let quotas = (server.config().user_quota, server.config().total_quota);
        let (tx, rx) = mpsc::channel(4096);
        let (events, _) = broadcast::channel(4096);
        let leadership = Arc::new(Leadership {
            leading: std::sync::atomic::AtomicBool::new(true),
            leader: std::sync::Mutex::new(None),
        });
        let (drain_tx, drain_state) = tokio::sync::watch::channel(Default::default());
        let actor = Actor {
            cluster: Cluster::new(server),
            clock,
            txs: HashMap::new(),
            events: events.clone(),
            leadership: leadership.clone(),
            drain_state: drain_tx,
        };
        tokio::spawn(actor.run(rx));
        ControlPlaneHandle {
            tx,
            clock,
            down_queue: DOWN_QUEUE,
            quotas: Arc::new(std::sync::Mutex::new(quotas)),
            configured_quotas: quotas,
            events,
            leadership,
            drain_state,
        }
    }

    /// Queues `n` messages towards each data plane (default [`DOWN_QUEUE`]): for the data
    /// planes that attach from now on.
    pub fn with_down_queue(mut self, n: usize) -> ControlPlaneHandle {
        self.down_queue = n.max(1);
        self
    }

    /// The seam's counters: batches dropped by a full queue and sent again, punted
    /// requests held back from a data plane far behind.
    pub async fn seam_stats(&self) -> Result<SeamStats, Status> {
        self.ask(|reply| Cmd::SeamStats { reply }).await
    }

    /// Every allocation of data plane `data_plane`, worker and usage included, for the
    /// process that takes over from this one (`SIGUSR2`).
    pub async fn export(
        &self,
        data_plane: &str,
    ) -> Result<Vec<turnpike_plane::AllocationSnapshot>, Status> {
        let data_plane = data_plane.to_owned();
        self.ask(|reply| Cmd::Export { data_plane, reply }).await
    }

    /// Takes over allocations of data plane `data_plane` from the process this one
    /// upgrades; they are handed back to it when it attaches. Returns how many.
    pub async fn adopt(
        &self,
        data_plane: &str,
        rows: Vec<turnpike_plane::AllocationSnapshot>,
    ) -> Result<usize, Status> {
        let data_plane = data_plane.to_owned();
        self.ask(|reply| Cmd::Adopt {
            data_plane,
            rows,
            reply,
        })
        .await
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
        *self.quotas.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state machine's counters (for metrics).
    pub async fn server_stats(&self) -> Result<server::Stats, Status> {
        self.ask(|reply| Cmd::ServerStats { reply }).await
    }

    /// Sets whether this control plane leads its cell: a follower refuses data planes
    /// and Admin calls (`unavailable`, naming the leader), so that both go to the leader.
    /// Data planes already attached stay: see [`ControlPlaneHandle::step_down`].
    pub fn set_leader(&self, leader: bool) {
        self.leadership
            .leading
            .store(leader, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether this control plane leads its cell.
    pub fn is_leader(&self) -> bool {
        self.leadership
            .leading
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Records the URL of the cell's leader (`None`: no leader), which a follower's
    /// refusals name.
    pub fn set_known_leader(&self, url: Option<String>) {
        if let Ok(mut l) = self.leadership.leader.lock() {
            *l = url;
        }
    }

    /// The URL of the cell's leader as last seen by this follower.
    pub fn known_leader(&self) -> Option<String> {
        self.leadership.leader.lock().ok().and_then(|l| l.clone())
    }

    /// Stops leading at once: refuses new data planes and closes the streams of those
    /// attached (they keep relaying headless and attach to the next leader). Returns when
    /// the streams are closed.
    pub async fn step_down(&self) {
        self.set_leader(false);
        self.set_known_leader(None);
        let _ = self.ask(|reply| Cmd::StepDown { reply }).await;
    }

    /// `Ok` on the leader; on a follower, the refusal that names the leader.
    fn leading(&self) -> Result<(), Status> {
        if self.is_leader() {
            return Ok(());
        }
        let leader = self.leadership.leader.lock().ok().and_then(|l| l.clone());
        Err(Status::unavailable(match leader {
            Some(url) => format!("not the leader of its cell; the leader is {url}"),
            None => "not the leader of its cell; no leader is elected yet".to_owned(),
        }))
    }

    /// The cell's statistics (what `ctl stats` shows).
    pub async fn stats(&self) -> Result<v1::GetStatsResponse, Status> {
        self.ask(|reply| Cmd::Stats { reply }).await
    }

    /// Replaces the TURN REST secrets (newest first); returns how many are in force.
    pub async fn rotate_secrets(&self, secrets: Vec<String>) -> Result<u32, Status> {
        self.ask(|reply| Cmd::Rotate { secrets, reply }).await
    }

    /// Revokes every allocation of `user`; returns how many.
    pub async fn revoke_user(&self, user: &str, reason: &str) -> Result<u64, Status> {
        let (user, reason) = (user.to_owned(), reason.to_owned());
        self.ask(|reply| Cmd::RevokeUser {
            user,
            reason,
            reply,
        })
        .await
    }

    /// Applies the configuration shared through the fleet (see
    /// [`Cluster::set_shared_config`]).
    pub async fn set_shared_config(&self, shared: fleet::SharedConfig) -> Result<(), Status> {
        *self.quotas.lock().unwrap_or_else(|p| p.into_inner()) =
            shared.quotas.unwrap_or(self.configured_quotas);
        self.tx
            .send(Cmd::Shared { shared })
            .await
            .map_err(|_| Status::unavailable("control plane stopped"))
    }

    /// The users holding at least `min` allocations here (the heaviest first).
    pub async fn heavy_users(&self, min: u32) -> Result<Vec<(String, u32)>, Status> {
        self.ask(|reply| Cmd::HeavyUsers { min, reply }).await
    }

    /// The per-user allocation quota (0: unlimited).
    pub fn user_quota(&self) -> u32 {
        self.quotas().0
    }

    /// Replaces the users revoked fleet-wide (see [`Cluster::set_revoked_users`]);
    /// returns how many allocations ended.
    pub async fn set_revoked_users(&self, users: Vec<String>) -> Result<u64, Status> {
        self.ask(|reply| Cmd::Revoked { users, reply }).await
    }

    /// The fleet's decision for this instance (see [`Cluster::set_fleet`]), and the
    /// allocations each user holds on the other instances (`None`: unchanged).
    pub async fn set_fleet(
        &self,
        draining: bool,
        alternates: Option<fleet::Alternates>,
        on_drain: Option<fleet::Alternates>,
        users: Option<HashMap<String, u32>>,
    ) -> Result<(), Status> {
        self.tx
            .send(Cmd::Fleet {
                draining,
                alternates,
                on_drain,
                users,
            })
            .await
            .map_err(|_| Status::unavailable("control plane stopped"))
    }

    /// Drains the instance itself (see [`Cluster::set_self_draining`]).
    pub async fn set_self_draining(&self, draining: bool) -> Result<(), Status> {
        self.tx
            .send(Cmd::SelfDrain { draining })
            .await
            .map_err(|_| Status::unavailable("control plane stopped"))
    }

    /// Whether this instance takes new allocations now, and why not (updated after
    /// every turn of the actor).
    pub fn drain_state(&self) -> DrainState {
        *self.drain_state.borrow()
    }

    /// A receiver that sees every change of [`ControlPlaneHandle::drain_state`].
    pub fn watch_drain_state(&self) -> tokio::sync::watch::Receiver<DrainState> {
        self.drain_state.clone()
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

/// What a data plane's certificate name starts with (`turnpike ctl certs` names data
/// plane `ID` `turnpike-dataplane-ID`).
pub const DATA_PLANE_PREFIX: &str = "turnpike-dataplane-";

/// Whether certificate `der` (already verified against the fleet CA by the TLS layer)
/// names data plane `id`: a DNS name `turnpike-dataplane-ID`, or `ID` itself for a PKI
/// that names data planes by their id. The common name is not consulted (RFC 9525: a
/// name is a subjectAltName), the same check rustls applies to a server's name.
pub fn certificate_names(der: &[u8], id: &str) -> bool {
    let der = rustls_pki_types::CertificateDer::from(der);
    let Ok(cert) = webpki::EndEntityCert::try_from(&der) else {
        return false;
    };
    [format!("{DATA_PLANE_PREFIX}{id}"), id.to_owned()]
        .into_iter()
        .filter_map(|n| rustls_pki_types::ServerName::try_from(n).ok())
        // An IP address is not a data-plane id.
        .filter(|n| matches!(n, rustls_pki_types::ServerName::DnsName(_)))
        .any(|n| cert.verify_is_valid_for_subject_name(&n).is_ok())
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
        let given = bearer_token(req.metadata().get_all("authorization").iter())
            .map(|t| -> [u8; 32] { Sha256::digest(t).into() });
        let ok = given.as_ref().is_ok_and(|g| {
            self.tokens
                .iter()
                .fold(subtle::Choice::from(0), |acc, t| acc | t.ct_eq(g))
                .into()
        });
        if ok {
            Ok(req)
        } else {
            let why = match given {
                Err(e) => e.to_string(),
                Ok(_) => "wrong token".to_owned(),
            };
            tracing::warn!(peer = ?req.remote_addr(), %why, "Admin call without a valid token refused");
            Err(Status::unauthenticated(
                "Admin needs authorization: Bearer TOKEN (turnpike ctl --token or TURNPIKE_ADMIN_TOKEN)",
            ))
        }
    }
}

/// Why an `authorization` header was not a bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum BadAuthorization {
    /// No `authorization` header.
    #[error("no authorization header")]
    Missing,
    /// More than one: which one decides would depend on who reads it (a proxy may
    /// check one and forward both), so none does.
    #[error("more than one authorization header")]
    Repeated,
    /// Not `Bearer` followed by one space and the token.
    #[error("authorization is not `Bearer TOKEN`")]
    NotBearer,
    /// An empty token, or one with whitespace or control characters in it: a token
    /// that only matches after trimming is not the token.
    #[error("malformed bearer token")]
    Malformed,
}

/// The token of exactly one `authorization: Bearer TOKEN` header, read strictly: the
/// scheme case-insensitively (RFC 7235 §2.1), then exactly one space, then a token with
/// no whitespace or control characters.
fn bearer_token<'a>(
    mut values: impl Iterator<Item = &'a tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
) -> Result<&'a [u8], BadAuthorization> {
    let value = values.next().ok_or(BadAuthorization::Missing)?;
    if values.next().is_some() {
        return Err(BadAuthorization::Repeated);
    }
    let bytes = value.as_bytes();
    let (scheme, token) = bytes
        .split_at_checked(7)
        .ok_or(BadAuthorization::NotBearer)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return Err(BadAuthorization::NotBearer);
    }
    if token.is_empty() || token.iter().any(|b| !b.is_ascii_graphic()) {
        return Err(BadAuthorization::Malformed);
    }
    Ok(token)
}

// ----- the actor ------------------------------------------------------------------------

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        loop {
            let wait = self
                .cluster
                .poll_timeout()
                .map(|t| Duration::from_millis(t.remaining(self.clock.now())))
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            let cmd = tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => Some(cmd),
                    None => return,
                },
                _ = tokio::time::sleep(wait) => None,
            };
            // The one clock read of this turn (and the wall clock, for TURN REST
            // usernames only).
            let now = self.clock.now();
            self.cluster.set_wall(now, self.clock.wall());
            if let Some(cmd) = cmd {
                self.command(now, cmd);
                // Whatever else is queued joins this turn, so that its answers and table
                // changes go out in as few stream messages as possible.
                for _ in 0..TURN_COMMANDS {
                    match rx.try_recv() {
                        Ok(cmd) => self.command(now, cmd),
                        Err(_) => break,
                    }
                }
            }
            self.cluster.handle_timeout(now);
            self.flush();
            let state = self.cluster.drain_state();
            self.drain_state.send_if_modified(|s| {
                let changed = *s != state;
                *s = state;
                changed
            });
        }
    }

    fn command(&mut self, now: Millis, cmd: Cmd) {
        let c = &mut self.cluster;
        match cmd {
            Cmd::Attach { hello, tx, reply } => {
                if !self
                    .leadership
                    .leading
                    .load(std::sync::atomic::Ordering::SeqCst)
                {
                    let _ = reply.send(None);
                    return;
                }
                let conn = c.attach(now, hello);
                // A stream replaced by this one (same data plane id) is closed by
                // dropping its sender.
                self.txs.retain(|k, _| c.is_attached(*k));
                self.txs.insert(conn, tx);
                let _ = reply.send(Some(conn));
            }
            Cmd::Up { conn, msg, _slot } => c.handle_message(now, conn, msg),
            Cmd::IdentityRefused => c.count_identity_refused(),
            Cmd::Detach { conn } => {
                c.detach(now, conn);
                self.txs.remove(&conn);
            }
            Cmd::List {
                user,
                data_plane,
                reply,
            } => {
                let at = At::of(&self.clock);
                let list = c.list(&user, &data_plane);
                let _ = reply.send(list.iter().map(|v| allocation_view_to_api(v, at)).collect());
            }
            Cmd::Revoke { id, reason, reply } => {
                let at = At::of(&self.clock);
                let v = c.revoke(now, AllocationId(id), &reason);
                let _ = reply.send(v.map(|v| allocation_view_to_api(&v, at)));
            }
            Cmd::RevokeUser {
                user,
                reason,
                reply,
            } => {
                let _ = reply.send(c.revoke_user(now, &user, &reason));
            }
            Cmd::Stats { reply } => {
                let _ = reply.send(stats_to_api(&c.stats(), At::of(&self.clock)));
            }
            Cmd::Drain {
                data_plane,
                draining,
                reply,
            } => {
                let r = c
                    .drain(now, &data_plane, draining)
                    .map_err(|e| Status::not_found(e.to_string()));
                let _ = reply.send(r);
            }
            Cmd::ServerStats { reply } => {
                let _ = reply.send(c.server().stats());
            }
            Cmd::SeamStats { reply } => {
                let _ = reply.send(c.seam_stats());
            }
            Cmd::Export { data_plane, reply } => {
                let _ = reply.send(c.export(&data_plane));
            }
            Cmd::Adopt {
                data_plane,
                rows,
                reply,
            } => {
                let _ = reply.send(c.adopt(now, &data_plane, rows));
            }
            Cmd::Rotate { secrets, reply } => {
                let _ = reply.send(c.rotate_secrets(secrets));
            }
            Cmd::Fleet {
                draining,
                alternates,
                on_drain,
                users,
            } => {
                c.set_fleet(draining, alternates, on_drain);
                if let Some(u) = users {
                    c.set_fleet_user_counts(u);
                }
            }
            Cmd::SelfDrain { draining } => c.set_self_draining(draining),
            Cmd::Shared { shared } => c.set_shared_config(&shared),
            Cmd::HeavyUsers { min, reply } => {
                let _ = reply.send(c.server().heavy_users(min, fleet::MAX_PUBLISHED_USERS));
            }
            Cmd::Revoked { users, reply } => {
                let _ = reply.send(c.set_revoked_users(now, users));
            }
            Cmd::StepDown { reply } => {
                // Dropping a stream's sender ends it: the data plane attaches elsewhere.
                for (conn, _) in self.txs.drain() {
                    c.detach(now, conn);
                }
                let _ = reply.send(());
            }
        }
    }

    /// Carries out what the cluster produced: messages onto data-plane links (never
    /// blocking: see [`DOWN_QUEUE`]), events to watchers.
    fn flush(&mut self) {
        let (mut batches_dropped, mut shed_now) = (0u64, 0u64);
        let mut at = None;
        while let Some(o) = self.cluster.poll_output() {
            match o {
                ClusterOutput::Send { conn, mut msg } => {
                    let Some(tx) = self.txs.get(&conn) else {
                        continue;
                    };
                    if let Down::Send { datagrams: d, .. } = &mut msg {
                        let mut queued = tx.queued.replies.load(Ordering::Relaxed);
                        let before = d.len();
                        d.retain(|d| {
                            if !is_udp(d) {
                                return true;
                            }
                            queued += reply_cost(d);
                            queued <= QUEUED_REPLY_BYTES
                        });
                        let shed = before - d.len();
                        if shed > 0 {
                            self.cluster.count_replies_shed(shed as u64);
                            shed_now += shed as u64;
                        }
                        if d.is_empty() {
                            continue;
                        }
                    }
                    // Charged before it can be taken off the queue, so that the
                    // link's discharge never comes first.
                    let batch = matches!(msg, Down::Batch(_));
                    if batch && tx.queued.batches.fetch_add(1, Ordering::Relaxed) >= tx.max_batches
                    {
                        tx.queued.batches.fetch_sub(1, Ordering::Relaxed);
                        batches_dropped += 1;
                        self.cluster.batch_dropped(conn);
                        continue;
                    }
                    let cost = queued_reply_bytes(&msg);
                    tx.queued.replies.fetch_add(cost, Ordering::Relaxed);
                    if let Err(e) = tx.tx.try_send(msg) {
                        let m = e.into_inner();
                        if batch {
                            tx.queued.batches.fetch_sub(1, Ordering::Relaxed);
                        }
                        tx.queued.replies.fetch_sub(cost, Ordering::Relaxed);
                        match m {
                            Down::Batch(_) => {
                                batches_dropped += 1;
                                self.cluster.batch_dropped(conn);
                            }
                            Down::Send { datagrams: d, .. } => {
                                self.cluster.count_replies_shed(d.len() as u64);
                                shed_now += d.len() as u64;
                            }
                        }
                    }
                }
                ClusterOutput::Event(e) => {
                    let at = *at.get_or_insert_with(|| At::of(&self.clock));
                    let _ = self.events.send(event_to_api(&e, at));
                }
            }
        }
        if batches_dropped > 0 {
            tracing::debug!(
                batches_dropped,
                "data plane link full; its batches will be sent again"
            );
        }
        if shed_now > 0 {
            tracing::debug!(shed = shed_now, "replies shed: the data plane is behind");
        }
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
        self.leading()?;
        // The leaf of the verified chain.
        let leaf = request
            .peer_certs()
            .and_then(|c| c.first().map(|c| c.as_ref().to_vec()));
        let peer = request.remote_addr();
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
        // Without a certificate there is nothing to bind: `control_plane_service` puts
        // RequireClientCert in front, which refuses such a call before it gets here
        // (only tests mount the bare service, over plain HTTP/2).
        if let Some(c) = leaf.as_deref()
            && !certificate_names(c, &hello.data_plane_id)
        {
            // Refused before the cluster sees it: an impostor must not displace the data
            // plane whose id it claims (that one stays attached, no flap).
            let _ = self.tx.send(Cmd::IdentityRefused).await;
            tracing::warn!(?peer, claimed = %hello.data_plane_id, "data plane claimed an id its certificate does not name; refused");
            return Err(Status::permission_denied(format!(
                "the client certificate does not name data plane {:?} (expected {DATA_PLANE_PREFIX}ID or ID as a DNS name)",
                hello.data_plane_id
            )));
        }
        let hello = hello_from_api(&hello, At::of(&self.clock));
        let (conn, rx, queued) = self.attach_link(hello, self.down_queue).await?;
        let cmds = self.tx.clone();
        let clock = self.clock;
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(UP_IN_FLIGHT));
            while let Ok(Some(m)) = up.message().await {
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    break;
                };
                // Durations become deadlines on this plane's clock as they arrive.
                let msg = match up_from_api(&m, At::of(&clock)) {
                    Ok(msg) => msg,
                    Err(e) => {
                        tracing::warn!(error = %e, ?peer, "invalid message from a data plane; ignored");
                        continue;
                    }
                };
                if cmds
                    .send(Cmd::Up {
                        conn,
                        msg,
                        _slot: Some(slot),
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
            let _ = cmds.send(Cmd::Detach { conn }).await;
        });
        // Deadlines leave as durations, measured as each message is taken for sending.
        let out = ReceiverStream::new(rx).map(move |m| {
            queued.taken(&m);
            Ok(down_to_api(m, At::of(&clock)))
        });
        Ok(Response::new(Box::pin(out)))
    }
}

impl ControlPlaneHandle {
    /// Attaches a data plane whose link holds at most `batches` batches; returns its
    /// connection, the link's receiving end and what waits on it.
    async fn attach_link(
        &self,
        hello: Hello,
        batches: usize,
    ) -> Result<(ConnId, mpsc::Receiver<Down>, Arc<Queued>), Status> {
        let (tx, rx) = mpsc::channel(DOWN_QUEUE.max(batches));
        let queued = Arc::new(Queued::default());
        let tx = Tx {
            tx,
            queued: Arc::clone(&queued),
            max_batches: batches,
        };
        let conn = self.ask(|reply| Cmd::Attach { hello, tx, reply }).await?;
        let Some(conn) = conn else {
            // It stepped down while this data plane said Hello.
            self.leading()?;
            return Err(Status::unavailable("not the leader of its cell"));
        };
        Ok((conn, rx, queued))
    }

    /// Attaches a data plane in this process (`serve`): no socket, no TLS, no encoding.
    /// Messages travel as the plane contract's values on the same clock; `depth` bounds
    /// the queue down (see [`DOWN_QUEUE`]: a full queue loses nothing for good). The
    /// data plane is detached when both halves of the link are dropped.
    pub async fn attach_local(&self, hello: Hello) -> Result<(LocalUp, LocalDown), Status> {
        self.leading()?;
        let (conn, rx, queued) = self.attach_link(hello, self.down_queue).await?;
        let guard = Arc::new(Detach {
            conn,
            cmds: self.tx.clone(),
        });
        Ok((
            LocalUp {
                conn,
                cmds: self.tx.clone(),
                slots: Arc::new(tokio::sync::Semaphore::new(UP_IN_FLIGHT)),
                _guard: Arc::clone(&guard),
            },
            LocalDown {
                down: rx,
                queued,
                _guard: guard,
            },
        ))
    }
}

/// Why a message up was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalRefused {
    /// The data plane has [`UP_IN_FLIGHT`] punt messages waiting for the actor: these
    /// are dropped (the clients retransmit), as a gRPC stream's flow control would.
    Full,
    /// The control plane has stopped, or detached this data plane.
    Closed,
}

/// The sending half of a data plane's in-process link.
#[derive(Debug, Clone)]
pub struct LocalUp {
    conn: ConnId,
    cmds: mpsc::Sender<Cmd>,
    slots: Arc<tokio::sync::Semaphore>,
    _guard: Arc<Detach>,
}

impl LocalUp {
    /// Queues punted requests without waiting: at most [`UP_IN_FLIGHT`] messages of
    /// them wait for the actor (the bound a gRPC stream has).
    pub fn try_punts(&self, p: Vec<turnpike_plane::Punted>) -> Result<(), LocalRefused> {
        let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            return Err(LocalRefused::Full);
        };
        self.cmds
            .try_send(Cmd::Up {
                conn: self.conn,
                msg: Up::Punted(p),
                _slot: Some(slot),
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => LocalRefused::Full,
                mpsc::error::TrySendError::Closed(_) => LocalRefused::Closed,
            })
    }

    /// Sends a message that must not be lost; waits while the actor's queue is full.
    pub async fn send(&self, msg: Up) -> Result<(), LocalRefused> {
        self.cmds
            .send(Cmd::Up {
                conn: self.conn,
                msg,
                _slot: None,
            })
            .await
            .map_err(|_| LocalRefused::Closed)
    }
}

/// The receiving half of a data plane's in-process link.
#[derive(Debug)]
pub struct LocalDown {
    down: mpsc::Receiver<Down>,
    queued: Arc<Queued>,
    _guard: Arc<Detach>,
}

impl LocalDown {
    /// The next message down; `None` when the control plane has detached this data
    /// plane (it stepped down, or another attached under the same id).
    pub async fn recv(&mut self) -> Option<Down> {
        let m = self.down.recv().await?;
        self.queued.taken(&m);
        Some(m)
    }
}

/// Detaches an in-process data plane when the last half of its link is dropped.
#[derive(Debug)]
struct Detach {
    conn: ConnId,
    cmds: mpsc::Sender<Cmd>,
}

impl Drop for Detach {
    fn drop(&mut self) {
        let (cmds, conn) = (self.cmds.clone(), self.conn);
        if cmds.try_send(Cmd::Detach { conn }).is_err()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = cmds.send(Cmd::Detach { conn }).await;
            });
        }
    }
}

#[tonic::async_trait]
impl Admin for ControlPlaneHandle {
    async fn list_allocations(
        &self,
        request: Request<v1::ListAllocationsRequest>,
    ) -> Result<Response<v1::ListAllocationsResponse>, Status> {
        self.leading()?;
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
        self.leading()?;
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
        self.leading()?;
        let r = request.into_inner();
        let (id, reason) = (r.allocation_id, r.reason);
        match self.ask(|reply| Cmd::Revoke { id, reason, reply }).await? {
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
        self.leading()?;
        let r = request.into_inner();
        let (user, reason) = (r.user_id, r.reason);
        if user.is_empty() {
            return Err(Status::invalid_argument("user_id is required"));
        }
        let revoked = self
            .ask(|reply| Cmd::RevokeUser {
                user,
                reason,
                reply,
            })
            .await?;
        Ok(Response::new(v1::RevokeUserAllocationsResponse { revoked }))
    }

    async fn get_stats(
        &self,
        _: Request<v1::GetStatsRequest>,
    ) -> Result<Response<v1::GetStatsResponse>, Status> {
        self.leading()?;
        Ok(Response::new(self.ask(|reply| Cmd::Stats { reply }).await?))
    }

    async fn drain_data_plane(
        &self,
        request: Request<v1::DrainDataPlaneRequest>,
    ) -> Result<Response<v1::DrainDataPlaneResponse>, Status> {
        self.leading()?;
        let r = request.into_inner();
        let res = self
            .ask(|reply| Cmd::Drain {
                data_plane: r.data_plane_id,
                draining: !r.undrain,
                reply,
            })
            .await??;
        Ok(Response::new(v1::DrainDataPlaneResponse {
            draining: !r.undrain,
            allocations: res,
        }))
    }

    async fn rotate_secrets(
        &self,
        request: Request<v1::RotateSecretsRequest>,
    ) -> Result<Response<v1::RotateSecretsResponse>, Status> {
        self.leading()?;
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
        self.leading()?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tonic::metadata::MetadataMap;

    use super::*;

    const TOKEN: &str = "a-token-of-twenty-chars";

    fn call(values: &[&str]) -> Result<Request<()>, Status> {
        let mut req = Request::new(());
        let md: &mut MetadataMap = req.metadata_mut();
        for v in values {
            md.append("authorization", v.parse().unwrap());
        }
        AdminAuth::new(&[TOKEN.to_owned()]).call(req)
    }

    fn leaf(names: &[&str]) -> Vec<u8> {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    /// Issue 25, N5: the id a data plane claims must be a DNS name of its certificate.
    #[test]
    fn a_certificate_names_only_its_own_data_plane() {
        let dp1 = leaf(&["turnpike-dataplane-dp1"]);
        assert!(certificate_names(&dp1, "dp1"));
        assert!(!certificate_names(&dp1, "dp2"));
        assert!(!certificate_names(&dp1, ""));
        assert!(!certificate_names(&dp1, "turnpike-dataplane-dp1.evil"));
        // A PKI that names data planes by their id.
        let edge = leaf(&["edge-3.example"]);
        assert!(certificate_names(&edge, "edge-3.example"));
        assert!(!certificate_names(&edge, "edge-4.example"));
        // An IP is not an id, and garbage is no certificate.
        let ip = leaf(&["127.0.0.1"]);
        assert!(!certificate_names(&ip, "127.0.0.1"));
        assert!(!certificate_names(b"garbage", "dp1"));
    }

    #[test]
    fn the_exact_bearer_header_is_accepted() {
        assert!(call(&[&format!("Bearer {TOKEN}")]).is_ok());
        // The scheme is case-insensitive (RFC 7235 §2.1).
        assert!(call(&[&format!("bearer {TOKEN}")]).is_ok());
        assert!(call(&[&format!("BEARER {TOKEN}")]).is_ok());
    }

    /// Issue 25, N7: extra whitespace, a second header, another scheme: all refused.
    #[test]
    fn lenient_authorization_headers_are_refused() {
        let refused = |values: &[&str]| matches!(call(values), Err(s) if s.code() == tonic::Code::Unauthenticated);
        assert!(refused(&[]));
        assert!(refused(&[&format!("Bearer  {TOKEN}")]), "two spaces");
        assert!(refused(&[&format!("Bearer {TOKEN} ")]), "trailing space");
        assert!(refused(&[&format!("Bearer\t{TOKEN}")]), "a tab");
        assert!(refused(&[&format!("Bearer {TOKEN}\t")]), "a trailing tab");
        assert!(refused(&[&format!("Basic {TOKEN}")]));
        assert!(refused(&[TOKEN]));
        assert!(refused(&["Bearer "]));
        assert!(refused(&["Bearer"]));
        assert!(refused(&["Bearer wrong-token-of-20-chars"]));
        // Two headers, even when both or the first carry the token.
        assert!(refused(&[&format!("Bearer {TOKEN}"), "Bearer other"]));
        assert!(refused(&[
            &format!("Bearer {TOKEN}"),
            &format!("Bearer {TOKEN}")
        ]));
    }
}
