//! The data plane's side of the seam, in three parts:
//!
//! - [`session`]: the state of one attachment without I/O (the Hello and its table
//!   parts, the table version with its gap check, punt batching);
//! - [`run`]: the loop that drives it, generic over how the control plane is reached
//!   ([`Connect`]): it applies what comes down on the workers, forwards what the workers
//!   punt, reports load and usage, and attaches again when the link is lost;
//! - [`grpc`]: the gRPC adapter (split mode: mutual TLS to a fixed or elected control
//!   plane). `serve` uses the in-process link instead (`turnpike/src/run.rs`), which
//!   carries the same [`Up`] and [`Down`] values with no encoding.
//!
//! When the control plane goes away, the data plane keeps forwarding and expiring
//! entries at their deadlines, and the agent attaches again, sending its whole table.

pub mod grpc;
pub mod session;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use turnpike_plane::{
    BindError, Clock, Down, DropReason, FastPathReport, Hello, LoadReport, Punted, RelayIp,
    Traffic, Up, Usage, WorkerLoad,
};

use crate::xdp::XdpState;
use crate::{AllocationSnapshot, ControlSink, DataPlaneHandle, FiveTuple, WorkerCounters};
use session::{PuntBatch, Session, Verdict};

/// Queues punted requests for the agent; drops (and counts) when the queue is full, as
/// a router drops rather than blocks its forwarding path.
#[derive(Debug)]
pub struct PuntQueue {
    tx: mpsc::Sender<Upward>,
    /// Requests dropped because a queue towards the control plane was full.
    pub dropped: AtomicU64,
    /// Set while the process hands over to a new one (`SIGUSR2`): requests from UDP
    /// clients are dropped (they retransmit them, to the new process), so that no
    /// allocation handed over changes after its state was copied. TCP and TLS clients'
    /// requests are still answered: their allocations stay with this process.
    frozen: std::sync::atomic::AtomicBool,
}

impl PuntQueue {
    /// A queue of `depth` requests and its receiving end.
    pub fn new(depth: usize) -> (Arc<PuntQueue>, mpsc::Receiver<Upward>) {
        let (tx, rx) = mpsc::channel(depth);
        (
            Arc::new(PuntQueue {
                tx,
                dropped: AtomicU64::new(0),
                frozen: std::sync::atomic::AtomicBool::new(false),
            }),
            rx,
        )
    }
}

/// What the workers hand the agent for the control plane.
#[derive(Debug)]
pub enum Upward {
    /// A punted request.
    Punt(crate::Punted),
    /// A client connection closed (its allocation ended).
    Closed {
        /// The worker.
        worker: usize,
        /// The connection's 5-tuple.
        tuple: FiveTuple,
    },
}

impl PuntQueue {
    /// Drops requests from now on (`true`), or takes them again.
    pub fn freeze(&self, on: bool) {
        self.frozen.store(on, Ordering::SeqCst);
    }
}

impl ControlSink for PuntQueue {
    fn punt(&self, p: crate::Punted) {
        let frozen =
            self.frozen.load(Ordering::Relaxed) && p.tuple.transport == crate::Transport::Udp;
        if frozen || self.tx.try_send(Upward::Punt(p)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn connection_closed(&self, worker: usize, tuple: FiveTuple) {
        // Dropped only when the queue is full: the control plane then ends the
        // allocation at its expiry instead (its relay sockets are closed already).
        if self.tx.try_send(Upward::Closed { worker, tuple }).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Who this data plane is.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Its id.
    pub id: String,
    /// Its UDP listening addresses.
    pub listen: Vec<SocketAddr>,
    /// Its TCP and TLS listening addresses.
    pub streams: Vec<(crate::Transport, SocketAddr)>,
    /// Its relay IPs, each with the address clients are given for it (1:1 NAT).
    pub relay_ips: Vec<RelayIp>,
}

impl Identity {
    fn hello(&self, workers: u32) -> Hello {
        Hello {
            id: self.id.clone(),
            listening: self
                .listen
                .iter()
                .map(|a| (crate::Transport::Udp, *a))
                .chain(self.streams.iter().copied())
                .collect(),
            relay_ips: self.relay_ips.clone(),
            workers,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            table: None,
            started: started_unix_millis(),
        }
    }
}

/// When this process started, unix milliseconds (for display).
fn started_unix_millis() -> u64 {
    Clock::new().started_unix_millis()
}

/// Why a message up was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The link is full: the message is dropped (punted requests only; counted).
    Full,
    /// The attachment has ended.
    Closed,
}

/// Why an attachment could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachError {
    /// The control plane could not be reached.
    Unreachable(String),
    /// It was reached and refused (not the leader, a certificate it does not accept).
    Refused(String),
}

/// The sending half of an attachment.
pub trait UpLink: Send + Sync + 'static {
    /// Queues punted requests without waiting (a flood is shed here, not queued).
    fn try_punts(&self, p: Vec<Punted>) -> Result<(), Refused>;
    /// Sends a message that must not be lost, waiting while the link is full.
    fn send(&self, m: Up) -> impl Future<Output = Result<(), Refused>> + Send;
}

/// The receiving half of an attachment.
pub trait DownLink: Send + 'static {
    /// The next message down; `None` when the attachment has ended.
    fn recv(&mut self) -> impl Future<Output = Option<Down>> + Send;
}

/// How the agent reaches its control plane.
pub trait Connect: Send + 'static {
    /// The sending half.
    type Up: UpLink;
    /// The receiving half.
    type Down: DownLink;
    /// The control plane to attach to now, for logs; `None` while none is known.
    fn target(&mut self) -> Option<String>;
    /// Attaches, sending `opening` (the Hello, then the rest of the table) first.
    fn attach(
        &mut self,
        opening: Vec<Up>,
    ) -> impl Future<Output = Result<(Self::Up, Self::Down), AttachError>> + Send;
    /// Resolves when another control plane is to be attached to (never, for a fixed
    /// one).
    fn changed(&mut self) -> impl Future<Output = ()> + Send;
    /// Waits before the next attempt after a failure (cut short by a change).
    fn backoff(&mut self) -> impl Future<Output = ()> + Send;
    /// An attempt succeeded: the next failure waits the least again.
    fn attached(&mut self);
}

/// A [`Connect`] that can be held detached: while `suspended` says so, the agent ends
/// its attachment and attaches to nothing (a data plane handing over to the process that
/// upgrades it, which attaches under the same id); when it says so no more, the agent
/// attaches again (the upgrade failed).
#[derive(Debug)]
pub struct Suspendable<C> {
    inner: C,
    suspended: watch::Receiver<bool>,
}

impl<C> Suspendable<C> {
    /// `inner`, held detached while `suspended` is true.
    pub fn new(inner: C, suspended: watch::Receiver<bool>) -> Suspendable<C> {
        Suspendable { inner, suspended }
    }
}

impl<C: Connect + Sync> Connect for Suspendable<C> {
    type Up = C::Up;
    type Down = C::Down;

    fn target(&mut self) -> Option<String> {
        if *self.suspended.borrow_and_update() {
            None
        } else {
            self.inner.target()
        }
    }

    async fn attach(&mut self, opening: Vec<Up>) -> Result<(C::Up, C::Down), AttachError> {
        self.inner.attach(opening).await
    }

    async fn changed(&mut self) {
        tokio::select! {
            _ = self.inner.changed() => {}
            r = self.suspended.changed() => {
                if r.is_err() {
                    // The sender is gone: never suspended again.
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    async fn backoff(&mut self) {
        self.inner.backoff().await
    }

    fn attached(&mut self) {
        self.inner.attached();
    }
}

/// Runs the agent forever: attaches through `connect`, then applies and forwards until
/// the attachment ends, and attaches again. `attached` turns true while attached.
pub async fn run<C: Connect>(
    dp: DataPlaneHandle,
    mut punted: mpsc::Receiver<Upward>,
    queue: Arc<PuntQueue>,
    mut connect: C,
    me: Identity,
    attached: watch::Sender<bool>,
) {
    let clock = Clock::new();
    let mut version = 0u64;
    // Bind results come from the workers; each is tagged with its attachment, since a
    // new control plane knows nothing of the binds of the previous one.
    let (results_tx, mut results) = mpsc::unbounded_channel::<(u64, Up)>();
    let mut generation = 0u64;
    loop {
        let Some(target) = connect.target() else {
            // Nobody answers punted requests meanwhile: drop them, clients retransmit.
            while punted.try_recv().is_ok() {}
            connect.changed().await;
            continue;
        };
        let dp2 = dp.clone();
        let table = tokio::task::spawn_blocking(move || dp2.snapshot())
            .await
            .unwrap_or_default();
        // Pooled relay sockets are known only to the control plane that reserved their
        // ports: a (re)attach starts with empty pools, which the control plane refills.
        dp.clear_pool();
        let opening = session::opening(me.hello(dp.workers() as u32), version, table);
        let (up, mut down) = match connect.attach(opening).await {
            Ok(link) => link,
            Err(AttachError::Unreachable(e)) => {
                tracing::debug!(error = %e, control = %target, "control plane unreachable; retrying");
                while punted.try_recv().is_ok() {}
                connect.backoff().await;
                continue;
            }
            Err(AttachError::Refused(e)) => {
                tracing::warn!(error = %e, control = %target, "attach refused; retrying");
                while punted.try_recv().is_ok() {}
                connect.backoff().await;
                continue;
            }
        };
        connect.attached();
        generation += 1;
        tracing::info!(control = %target, "attached to control plane");
        // A new attachment starts undrained: the control plane says so again if not.
        dp.set_drained(false);
        let _ = attached.send(true);
        let mut session = Session::new(version);
        let mut batch = PuntBatch::default();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                m = down.recv() => match m {
                    Some(Down::Batch(b)) => {
                        let reply = match session.on_batch(b.version, clock.now()) {
                            Verdict::Apply => {
                                for bind in b.binds {
                                    let (id, tx, g) = (bind.id, results_tx.clone(), generation);
                                    let done: Box<dyn FnOnce(Result<(), BindError>) + Send> =
                                        Box::new(move |result| {
                                            let _ = tx.send((g, Up::BindResult { id, result }));
                                        });
                                    match bind.tuple {
                                        // No 5-tuple: a socket for the worker's pool.
                                        None => dp.bind_pool(bind.worker as usize, bind.relays, done),
                                        Some(t) => dp.bind(bind.worker as usize, t, bind.relays, done),
                                    }
                                }
                                dp.apply(b.changes);
                                if let Some(c) = &b.challenge {
                                    dp.set_challenge(Some(c));
                                }
                                if let Some(draining) = b.drain {
                                    tracing::info!(draining, "drain state from control plane");
                                    dp.set_drained(draining);
                                }
                                version = b.version;
                                let ack = session.applied_now(b.version);
                                for d in session.release() {
                                    dp.send(d.worker as usize, d.tuple, d.data);
                                }
                                Some(ack)
                            }
                            Verdict::Repeat(m) => Some(m),
                            Verdict::Gap(m) => {
                                if m.is_some() {
                                    tracing::info!(applied = session.applied(), received = b.version, "a table batch was lost; asking for it again");
                                }
                                m
                            }
                        };
                        if let Some(m) = reply
                            && up.send(m).await.is_err()
                        {
                            break;
                        }
                    }
                    Some(Down::Send { after, datagrams }) => {
                        let before = session.held_dropped();
                        for d in session.answers(after, datagrams) {
                            dp.send(d.worker as usize, d.tuple, d.data);
                        }
                        queue
                            .dropped
                            .fetch_add(session.held_dropped() - before, Ordering::Relaxed);
                    }
                    None => break,
                },
                Some(p) = punted.recv() => {
                    // Whatever else is queued goes in the same message; a closed
                    // connection goes in a message of its own, in order.
                    let mut closed = None;
                    let mut next = Some(p);
                    let mut full = Vec::new();
                    while let Some(p) = next.take() {
                        match p {
                            Upward::Punt(p) => {
                                let p = Punted { worker: p.worker as u32, tuple: p.tuple, data: p.data };
                                full.extend(batch.push(p));
                            }
                            Upward::Closed { worker, tuple } => {
                                closed = Some(Up::ConnectionClosed { worker: worker as u32, tuple });
                                break;
                            }
                        }
                        if full.is_empty() {
                            next = punted.try_recv().ok();
                        }
                    }
                    full.extend(batch.take());
                    let mut ended = false;
                    for b in full {
                        let n = b.len() as u64;
                        match up.try_punts(b) {
                            Ok(()) => {}
                            // A request dropped here is retransmitted by its client.
                            Err(Refused::Full) => {
                                queue.dropped.fetch_add(n, Ordering::Relaxed);
                            }
                            Err(Refused::Closed) => ended = true,
                        }
                    }
                    if let Some(m) = closed
                        && up.send(m).await.is_err()
                    {
                        ended = true;
                    }
                    if ended {
                        break;
                    }
                }
                Some((g, m)) = results.recv() => {
                    if g == generation && up.send(m).await.is_err() {
                        break;
                    }
                }
                _ = tick.tick() => {
                    let (load, usage) = report(&dp, &queue).await;
                    if up.send(Up::Load(load)).await.is_err()
                        || up.send(Up::Usage(usage)).await.is_err()
                    {
                        break;
                    }
                }
                _ = connect.changed() => {
                    tracing::info!(from = %target, "the control plane changed; attaching to the new one");
                    break;
                }
            }
        }
        let _ = attached.send(false);
        // Another control plane may have another nonce key: punt until it says.
        dp.set_challenge(None);
        tracing::warn!(
            "control plane stream lost: existing allocations keep relaying; reconnecting"
        );
    }
}

/// Drop counts by reason, summed over `counters` plus the punted requests dropped
/// because the queue to the control plane was full; reasons with no drop are left out.
fn drop_counts(counters: &[WorkerCounters], punts_dropped: u64) -> Vec<(DropReason, u64)> {
    let mut total = crate::Drops::default();
    for c in counters {
        let d = &c.dropped;
        total.malformed += d.malformed;
        total.unexpected += d.unexpected;
        total.no_allocation += d.no_allocation;
        total.no_permission += d.no_permission;
        total.no_channel += d.no_channel;
        total.bandwidth += d.bandwidth;
        total.denied_peer += d.denied_peer;
        total.send_error += d.send_error;
        total.expired += d.expired;
        total.rate_limited += d.rate_limited;
    }
    // `unexpected` (well-formed, not for the data plane) and `expired` (an entry past its
    // deadline) have no reason of their own: they count as other.
    [
        (DropReason::Malformed, total.malformed),
        (DropReason::NoAllocation, total.no_allocation),
        (DropReason::NoPermission, total.no_permission),
        (DropReason::NoChannel, total.no_channel),
        (DropReason::Bandwidth, total.bandwidth),
        (DropReason::PeerPolicy, total.denied_peer),
        (DropReason::RateLimited, total.rate_limited),
        (DropReason::QueueFull, punts_dropped),
        (DropReason::SendError, total.send_error),
        (DropReason::Other, total.unexpected + total.expired),
    ]
    .into_iter()
    .filter(|&(_, n)| n > 0)
    .collect()
}

/// Each worker's load: its allocations (counted in `snapshot`) and received datagrams.
fn worker_loads(counters: &[WorkerCounters], snapshot: &[AllocationSnapshot]) -> Vec<WorkerLoad> {
    let mut allocations = vec![0u64; counters.len()];
    for s in snapshot {
        if let Some(n) = allocations.get_mut(s.worker as usize) {
            *n += 1;
        }
    }
    counters
        .iter()
        .zip(allocations)
        .map(|(c, allocations)| WorkerLoad {
            allocations,
            received_packets: c.received_packets,
        })
        .collect()
}

/// The XDP fast path's part of a load report; `None` when it was not asked for.
fn fast_path_report(dp: &DataPlaneHandle, counters: &[WorkerCounters]) -> Option<FastPathReport> {
    match dp.xdp_status() {
        XdpState::NotAsked => None,
        XdpState::Off(why) => Some(FastPathReport {
            off_reason: why,
            ..Default::default()
        }),
        XdpState::On(attached) => {
            let s = dp.xdp_stats().unwrap_or_default();
            let count = |(name, packets): (&str, u64)| (name.to_owned(), packets);
            Some(FastPathReport {
                interfaces: attached
                    .iter()
                    .map(|a| format!("{} ({})", a.iface, a.mode))
                    .collect(),
                off_reason: String::new(),
                traffic: Usage {
                    to_peer: Traffic {
                        packets: s.to_peer_packets(),
                        bytes: s.to_peer_bytes(),
                    },
                    to_client: Traffic {
                        packets: s.to_client_packets(),
                        bytes: s.to_client_bytes(),
                    },
                },
                relayed: s.relayed().map(count).collect(),
                passed: s.passed().filter(|&(_, n)| n > 0).map(count).collect(),
                allocations: counters.iter().map(|c| c.xdp_allocations).sum(),
            })
        }
    }
}

/// The periodic reports: load, and every allocation's usage.
async fn report(
    dp: &DataPlaneHandle,
    queue: &PuntQueue,
) -> (LoadReport, Vec<(turnpike_plane::AllocationId, Usage)>) {
    let counters = dp.counters();
    // The snapshot waits for every worker's answer: off the async threads.
    let dp2 = dp.clone();
    let snapshot = tokio::task::spawn_blocking(move || dp2.snapshot())
        .await
        .unwrap_or_default();
    let mut traffic = Usage::default();
    for c in &counters {
        traffic.to_peer.packets += c.to_peer_packets;
        traffic.to_peer.bytes += c.to_peer_bytes;
        traffic.to_client.packets += c.to_client_packets;
        traffic.to_client.bytes += c.to_client_bytes;
    }
    let fast_path = fast_path_report(dp, &counters);
    if let Some(f) = &fast_path {
        traffic.add(&f.traffic);
    }
    let load = LoadReport {
        allocations: snapshot.len() as u64,
        traffic,
        drops: drop_counts(&counters, queue.dropped.load(Ordering::Relaxed)),
        workers: worker_loads(&counters, &snapshot),
        fast_path,
    };
    let usage = snapshot.iter().map(|s| (s.id, s.usage)).collect();
    (load, usage)
}
