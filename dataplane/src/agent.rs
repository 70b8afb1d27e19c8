//! The data plane's side of the control-plane stream: dials the control plane, says
//! Hello (with its whole relay table after a reconnect), forwards punted requests and
//! reports, and applies what comes down. When the control plane goes away, the data plane
//! keeps forwarding and expiring entries at their deadlines, and this agent reconnects.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use turnpike_api::v1::{
    self, control_plane_client::ControlPlaneClient, control_plane_message, data_plane_message,
};
use turnpike_api::{table_change_from_api, tuple_from_api};
use turnpike_plane::{BindError, RelayIp, Usage};

use crate::{
    AllocationSnapshot, ControlSink, DataPlaneHandle, Drops, FiveTuple, Punted, WorkerCounters,
};

/// Queues punted requests for the agent; drops (and counts) when the queue is full, as
/// a router drops rather than blocks its forwarding path.
#[derive(Debug)]
pub struct PuntQueue {
    tx: mpsc::Sender<Upward>,
    /// Requests dropped because the queue was full.
    pub dropped: AtomicU64,
}

impl PuntQueue {
    /// A queue of `depth` requests and its receiving end.
    pub fn new(depth: usize) -> (Arc<PuntQueue>, mpsc::Receiver<Upward>) {
        let (tx, rx) = mpsc::channel(depth);
        (
            Arc::new(PuntQueue {
                tx,
                dropped: AtomicU64::new(0),
            }),
            rx,
        )
    }
}

/// What the workers hand the agent for the control plane.
#[derive(Debug)]
pub enum Upward {
    /// A punted request.
    Punt(Punted),
    /// A client connection closed (its allocation ended).
    Closed {
        /// The worker.
        worker: usize,
        /// The connection's 5-tuple.
        tuple: FiveTuple,
    },
}

impl ControlSink for PuntQueue {
    fn punt(&self, p: Punted) {
        if self.tx.try_send(Upward::Punt(p)).is_err() {
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

// The report timestamps: the agent is the data plane's I/O shell, not its core.
#[allow(clippy::disallowed_methods)]
fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn msg(m: data_plane_message::Message) -> v1::DataPlaneMessage {
    v1::DataPlaneMessage { message: Some(m) }
}

fn table(dp: &DataPlaneHandle, version: u64) -> v1::TableSnapshot {
    v1::TableSnapshot {
        table_version: version,
        allocations: dp
            .snapshot()
            .iter()
            .map(v1::AllocationState::from)
            .collect(),
        complete: true,
    }
}

/// The first wait before attaching again.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The first wait after a change of control plane: a new leader refuses until it knows
/// it leads (it reads the fleet's configuration first), which takes milliseconds.
const BACKOFF_AFTER_CHANGE: Duration = Duration::from_millis(25);
/// The longest wait before attaching again.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Waits `backoff` before the next attempt, or less if `control` names another control
/// plane meanwhile; then sets the next wait. A new control plane (a new leader) is
/// tried at once and, if it refuses (it may not know yet that it leads), again after
/// [`BACKOFF_AFTER_CHANGE`]: the backoff built up against the previous one does not
/// carry over.
async fn wait_or_change(
    control: &mut watch::Receiver<Option<Endpoint>>,
    backoff: &mut Duration,
    follow: &mut bool,
) {
    let wait = *backoff;
    *backoff = (wait * 2).min(BACKOFF_MAX);
    if !*follow {
        tokio::time::sleep(wait).await;
        return;
    }
    let start = tokio::time::Instant::now();
    match tokio::time::timeout(wait, control.changed()).await {
        Ok(Ok(())) => *backoff = BACKOFF_AFTER_CHANGE,
        Ok(Err(_)) => {
            *follow = false;
            tokio::time::sleep_until(start + wait).await;
        }
        Err(_) => {}
    }
}

/// Allocations per table message: a large table goes as a Hello and several
/// TableSnapshot messages, each far below the control plane's message size cap.
const TABLE_CHUNK: usize = 2000;

/// Runs the agent forever. `control` is the control plane's endpoint, with its TLS
/// configuration (the control plane refuses a stream without a client certificate).
/// `attached` turns true while a control plane stream is up.
pub async fn run(
    dp: DataPlaneHandle,
    punted: mpsc::Receiver<Upward>,
    queue: Arc<PuntQueue>,
    control: Endpoint,
    me: Identity,
    attached: watch::Sender<bool>,
) {
    let (_keep, control) = watch::channel(Some(control));
    run_following(dp, punted, queue, control, me, attached).await;
}

/// As [`run`], attached to whichever control plane `control` names (the leader of the
/// cell, followed through etcd): when it changes, the stream to the previous one is
/// dropped and the agent attaches to the new one at once, sending its whole table.
/// `None`: no control plane is known; existing allocations keep relaying.
pub async fn run_following(
    dp: DataPlaneHandle,
    mut punted: mpsc::Receiver<Upward>,
    queue: Arc<PuntQueue>,
    mut control: watch::Receiver<Option<Endpoint>>,
    me: Identity,
    attached: watch::Sender<bool>,
) {
    let mut version = 0u64;
    let mut backoff = BACKOFF_MIN;
    // Whether `control` can still change (its sender is alive).
    let mut follow = true;
    loop {
        let current = control.borrow_and_update().clone();
        let Some(endpoint) = current else {
            // Nobody answers punted requests meanwhile: drop them, clients retransmit.
            while punted.try_recv().is_ok() {}
            if control.changed().await.is_err() {
                return;
            }
            continue;
        };
        let target = endpoint.uri().to_string();
        // HTTP/2 keepalives notice a control plane that vanished without closing the
        // connection (a crashed host, a partition) within a few seconds.
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true);
        let channel = endpoint.connect().await;
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "control plane unreachable; retrying");
                // Nobody answers punted requests meanwhile: drop them, clients retransmit.
                while punted.try_recv().is_ok() {}
                // A new control plane named meanwhile is tried at once.
                wait_or_change(&mut control, &mut backoff, &mut follow).await;
                continue;
            }
        };
        let (up, up_rx) = mpsc::channel::<v1::DataPlaneMessage>(8192);
        let (dp2, v) = (dp.clone(), version);
        let snapshot = tokio::task::spawn_blocking(move || table(&dp2, v))
            .await
            .ok();
        let mut chunks = Vec::new();
        let snapshot = snapshot.map(|mut t| {
            while t.allocations.len() > TABLE_CHUNK {
                let rest = t.allocations.split_off(TABLE_CHUNK);
                chunks.push(std::mem::replace(&mut t.allocations, rest));
            }
            let last = std::mem::take(&mut t.allocations);
            chunks.push(last);
            let first = chunks.remove(0);
            v1::TableSnapshot {
                table_version: t.table_version,
                allocations: first,
                complete: chunks.is_empty(),
            }
        });
        // Pooled relay sockets are known only to the control plane that reserved their
        // ports: a (re)attach starts with empty pools, which the control plane refills.
        dp.clear_pool();
        let hello = v1::Hello {
            data_plane_id: me.id.clone(),
            listening_addresses: me
                .listen
                .iter()
                .map(|a| v1::ListeningAddress {
                    transport: v1::Transport::Udp as i32,
                    address: Some((*a).into()),
                })
                .chain(me.streams.iter().map(|(t, a)| v1::ListeningAddress {
                    transport: v1::Transport::from(*t) as i32,
                    address: Some((*a).into()),
                }))
                .collect(),
            relay_ips: me.relay_ips.iter().map(v1::RelayIp::from).collect(),
            worker_count: dp.workers() as u32,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            table: snapshot,
        };
        let _ = up
            .send(msg(data_plane_message::Message::Hello(hello)))
            .await;
        let n = chunks.len();
        for (i, allocations) in chunks.into_iter().enumerate() {
            let _ = up
                .send(msg(data_plane_message::Message::TableSnapshot(
                    v1::TableSnapshot {
                        table_version: version,
                        allocations,
                        complete: i + 1 == n,
                    },
                )))
                .await;
        }
        let mut client = ControlPlaneClient::new(channel).max_decoding_message_size(16 << 20);
        // Punt messages on the stream's queue and not yet taken by the transport: capped
        // (PUNTS_QUEUED), so that a flood is shed here, counted, instead of filling the
        // 8192-message queue with half a million requests (issue #25 N4).
        let punts_queued = Arc::new(AtomicUsize::new(0));
        let taken = Arc::clone(&punts_queued);
        let up_stream = ReceiverStream::new(up_rx).map(move |m| {
            if is_punt(&m) {
                taken.fetch_sub(1, Ordering::Relaxed);
            }
            m
        });
        let mut down = match client.attach(up_stream).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                tracing::warn!(error = %e, "attach refused; retrying");
                wait_or_change(&mut control, &mut backoff, &mut follow).await;
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        tracing::info!(control = %target, "attached to control plane");
        // A new stream starts undrained: the control plane says so again if not.
        dp.set_drained(false);
        let _ = attached.send(true);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                m = down.message() => match m {
                    Ok(Some(m)) => apply(&dp, &up, m, &mut version).await,
                    _ => break,
                },
                Some(p) = punted.recv() => {
                    // Whatever else is queued goes in the same stream message; a closed
                    // connection goes in a message of its own, in order.
                    let mut batch = Vec::new();
                    let mut closed = None;
                    match p {
                        Upward::Punt(p) => batch.push(punted_api(p)),
                        Upward::Closed { worker, tuple } => closed = Some((worker, tuple)),
                    }
                    while closed.is_none() && batch.len() < PUNT_BATCH {
                        match punted.try_recv() {
                            Ok(Upward::Punt(p)) => batch.push(punted_api(p)),
                            Ok(Upward::Closed { worker, tuple }) => closed = Some((worker, tuple)),
                            Err(_) => break,
                        }
                    }
                    if let Some((worker, tuple)) = closed {
                        let m = msg(data_plane_message::Message::ConnectionClosed(
                            v1::ConnectionClosed {
                                worker_id: worker as u32,
                                five_tuple: Some((&tuple).into()),
                            },
                        ));
                        if !batch.is_empty() {
                            let b = std::mem::take(&mut batch);
                            punts_queued.fetch_add(1, Ordering::Relaxed);
                            if up.try_send(msg(data_plane_message::Message::PuntedRequests(
                                v1::PuntedRequests { requests: b },
                            ))).is_err() {
                                punts_queued.fetch_sub(1, Ordering::Relaxed);
                                queue.dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        if up.try_send(m).is_err() {
                            queue.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    let n = batch.len() as u64;
                    let m = if batch.len() == 1 {
                        data_plane_message::Message::PuntedRequest(batch.remove(0))
                    } else {
                        data_plane_message::Message::PuntedRequests(v1::PuntedRequests {
                            requests: batch,
                        })
                    };
                    // Never block the loop on the stream: a dead control plane would stall
                    // it. A request dropped here is retransmitted by its client.
                    if punts_queued.load(Ordering::Relaxed) >= PUNTS_QUEUED {
                        queue.dropped.fetch_add(n, Ordering::Relaxed);
                        continue;
                    }
                    punts_queued.fetch_add(1, Ordering::Relaxed);
                    match up.try_send(msg(m)) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            punts_queued.fetch_sub(1, Ordering::Relaxed);
                            queue.dropped.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => break,
                    }
                }
                _ = tick.tick() => report(&dp, &queue, &up).await,
                changed = control.changed(), if follow => {
                    if changed.is_err() {
                        follow = false;
                    } else if control.borrow().as_ref().map(|e| e.uri().to_string()) != Some(target.clone()) {
                        tracing::info!(from = %target, "the control plane changed; attaching to the new one");
                        backoff = BACKOFF_AFTER_CHANGE;
                        break;
                    }
                }
            }
        }
        let _ = attached.send(false);
        tracing::warn!(
            "control plane stream lost: existing allocations keep relaying; reconnecting"
        );
    }
}

async fn apply(
    dp: &DataPlaneHandle,
    up: &mpsc::Sender<v1::DataPlaneMessage>,
    m: v1::ControlPlaneMessage,
    version: &mut u64,
) {
    use control_plane_message::Message as M;
    let Some(m) = m.message else {
        return;
    };
    match m {
        M::SendDatagram(s) => send_datagram(dp, s),
        M::SendDatagrams(batch) => {
            for s in batch.datagrams {
                send_datagram(dp, s);
            }
        }
        M::BindRequest(b) => {
            let id = b.request_id;
            let up = up.clone();
            let relays = b
                .relay_addresses
                .iter()
                .map(SocketAddr::try_from)
                .collect::<Result<Vec<_>, _>>();
            let Ok(relays) = relays else {
                let e = BindError::Invalid("invalid relay address".into());
                let _ = up.try_send(bind_ack(id, Err(e)));
                return;
            };
            let done: Box<dyn FnOnce(Result<(), BindError>) + Send> = Box::new(move |r| {
                let _ = up.try_send(bind_ack(id, r));
            });
            match b.five_tuple.as_ref() {
                // No 5-tuple: a socket for the worker's pool.
                None => dp.bind_pool(b.worker_id as usize, relays, done),
                Some(t) => match tuple_from_api(Some(t)) {
                    Ok(tuple) => dp.bind(b.worker_id as usize, tuple, relays, done),
                    Err(e) => done(Err(BindError::Invalid(e.to_string()))),
                },
            }
        }
        M::TableChanges(batch) => {
            let changes = batch
                .changes
                .iter()
                .filter_map(|c| match table_change_from_api(c) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "invalid table change dropped");
                        None
                    }
                });
            dp.apply(changes);
            *version = batch.table_version;
            let _ = up.try_send(msg(data_plane_message::Message::TableAck(v1::TableAck {
                table_version: batch.table_version,
            })));
        }
        M::Drain(d) => {
            tracing::info!(draining = d.draining, "drain state from control plane");
            dp.set_drained(d.draining);
        }
    }
}

/// Most punted requests in one stream message.
const PUNT_BATCH: usize = 64;
/// Punt messages (each up to [`PUNT_BATCH`] requests) queued towards the control plane
/// at most; beyond, punts are dropped and counted as the queue's drops.
const PUNTS_QUEUED: usize = 32;

/// Whether `m` carries punted requests (see [`PUNTS_QUEUED`]).
fn is_punt(m: &v1::DataPlaneMessage) -> bool {
    matches!(
        m.message,
        Some(data_plane_message::Message::PuntedRequest(_))
            | Some(data_plane_message::Message::PuntedRequests(_))
    )
}

fn punted_api(p: Punted) -> v1::PuntedRequest {
    v1::PuntedRequest {
        worker_id: p.worker as u32,
        five_tuple: Some((&p.tuple).into()),
        datagram: p.data.into(),
    }
}

fn send_datagram(dp: &DataPlaneHandle, s: v1::SendDatagram) {
    match tuple_from_api(s.five_tuple.as_ref()) {
        Ok(t) => dp.send(s.worker_id as usize, t, s.datagram.to_vec()),
        Err(e) => tracing::warn!(error = %e, "SendDatagram dropped"),
    }
}

fn bind_ack(id: u64, r: Result<(), BindError>) -> v1::DataPlaneMessage {
    let outcome = match r {
        Ok(()) => v1::bind_ack::Outcome::Success(v1::BindSuccess {}),
        Err(e) => v1::bind_ack::Outcome::Error(v1::BindError::from(&e)),
    };
    msg(data_plane_message::Message::BindAck(v1::BindAck {
        request_id: id,
        outcome: Some(outcome),
    }))
}

/// Drop counts by the reasons of the API, summed over `counters` plus the punted
/// requests dropped because the queue to the control plane was full; reasons with no
/// drop are left out.
fn drop_counts(counters: &[WorkerCounters], punts_dropped: u64) -> Vec<v1::DropCount> {
    use v1::DropReason as R;
    let mut total = Drops::default();
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
    // deadline) have no reason of their own in the API: they count as unspecified.
    let reasons = [
        (R::Malformed, total.malformed),
        (R::NoAllocation, total.no_allocation),
        (R::NoPermission, total.no_permission),
        (R::NoChannel, total.no_channel),
        (R::BandwidthLimit, total.bandwidth),
        (R::PeerPolicy, total.denied_peer),
        (R::RateLimited, total.rate_limited),
        (R::QueueFull, punts_dropped),
        (R::SendError, total.send_error),
        (R::Unspecified, total.unexpected + total.expired),
    ];
    reasons
        .into_iter()
        .filter(|&(_, n)| n > 0)
        .map(|(reason, packets)| v1::DropCount {
            reason: reason as i32,
            packets,
        })
        .collect()
}

/// Each worker's load: its allocations (counted in `snapshot`) and received datagrams.
fn worker_loads(
    counters: &[WorkerCounters],
    snapshot: &[AllocationSnapshot],
) -> Vec<v1::WorkerLoad> {
    let mut allocations = vec![0u64; counters.len()];
    for s in snapshot {
        if let Some(n) = allocations.get_mut(s.worker as usize) {
            *n += 1;
        }
    }
    counters
        .iter()
        .zip(allocations)
        .enumerate()
        .map(|(w, (c, allocations))| v1::WorkerLoad {
            worker_id: w as u32,
            allocations,
            received_packets: c.received_packets,
        })
        .collect()
}

/// The XDP fast path's part of a load report; `None` when it was not asked for.
fn fast_path_report(
    dp: &DataPlaneHandle,
    counters: &[crate::WorkerCounters],
) -> Option<v1::FastPathReport> {
    match dp.xdp_status() {
        Err(why) if dp.xdp_stats().is_none() && why.starts_with("not asked") => None,
        Err(why) => Some(v1::FastPathReport {
            off_reason: why,
            ..Default::default()
        }),
        Ok(attached) => {
            let s = dp.xdp_stats().unwrap_or_default();
            let count = |(name, packets): (&str, u64)| v1::PathCount {
                name: name.to_owned(),
                packets,
            };
            Some(v1::FastPathReport {
                interfaces: attached
                    .iter()
                    .map(|a| format!("{} ({})", a.iface, a.mode))
                    .collect(),
                off_reason: String::new(),
                traffic: Some(
                    Usage {
                        to_peer: crate::Traffic {
                            packets: s.to_peer_packets(),
                            bytes: s.to_peer_bytes(),
                        },
                        to_client: crate::Traffic {
                            packets: s.to_client_packets(),
                            bytes: s.to_client_bytes(),
                        },
                    }
                    .into(),
                ),
                relayed: s.relayed().map(count).collect(),
                passed: s.passed().filter(|&(_, n)| n > 0).map(count).collect(),
                allocations: counters.iter().map(|c| c.xdp_allocations).sum(),
            })
        }
    }
}

async fn report(dp: &DataPlaneHandle, queue: &PuntQueue, up: &mpsc::Sender<v1::DataPlaneMessage>) {
    let counters = dp.counters();
    // The snapshot waits for every worker's answer: off the async threads.
    let dp2 = dp.clone();
    let Ok(snapshot) = tokio::task::spawn_blocking(move || dp2.snapshot()).await else {
        return;
    };
    let mut traffic = Usage::default();
    for c in &counters {
        traffic.to_peer.packets += c.to_peer_packets;
        traffic.to_peer.bytes += c.to_peer_bytes;
        traffic.to_client.packets += c.to_client_packets;
        traffic.to_client.bytes += c.to_client_bytes;
    }
    let fast_path = fast_path_report(dp, &counters);
    if fast_path.is_some()
        && let Some(s) = dp.xdp_stats()
    {
        traffic.to_peer.packets += s.to_peer_packets();
        traffic.to_peer.bytes += s.to_peer_bytes();
        traffic.to_client.packets += s.to_client_packets();
        traffic.to_client.bytes += s.to_client_bytes();
    }
    let load = v1::LoadReport {
        sampled_unix_millis: unix_millis(),
        allocations: snapshot.len() as u64,
        traffic: Some(traffic.into()),
        drops: drop_counts(&counters, queue.dropped.load(Ordering::Relaxed)),
        workers: worker_loads(&counters, &snapshot),
        fast_path,
    };
    let _ = up
        .send(msg(data_plane_message::Message::LoadReport(load)))
        .await;
    let usage = v1::UsageReport {
        allocations: snapshot
            .iter()
            .map(|s| v1::AllocationUsage {
                allocation_id: s.id.0,
                usage: Some(s.usage.into()),
            })
            .collect(),
    };
    let _ = up
        .send(msg(data_plane_message::Message::UsageReport(usage)))
        .await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]
    use super::*;

    fn endpoint(port: u16) -> Endpoint {
        Endpoint::from_shared(format!("https://127.0.0.1:{port}")).unwrap()
    }

    #[tokio::test]
    async fn a_new_control_plane_cuts_the_wait_and_resets_the_backoff() {
        let (tx, mut rx) = watch::channel(Some(endpoint(1)));
        rx.borrow_and_update();
        let (mut backoff, mut follow) = (BACKOFF_MAX, true);
        let started = tokio::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx.send(Some(endpoint(2)));
            // Keep the sender: the agent still follows.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        wait_or_change(&mut rx, &mut backoff, &mut follow).await;
        assert!(started.elapsed() < BACKOFF_MAX / 2);
        assert_eq!(backoff, BACKOFF_AFTER_CHANGE);
        assert!(follow);
    }

    #[tokio::test]
    async fn without_a_change_the_backoff_doubles_up_to_its_bound() {
        let (_tx, mut rx) = watch::channel(Some(endpoint(1)));
        rx.borrow_and_update();
        let (mut backoff, mut follow) = (Duration::from_millis(10), true);
        wait_or_change(&mut rx, &mut backoff, &mut follow).await;
        assert_eq!(backoff, Duration::from_millis(20));
        let mut backoff = Duration::from_millis(1500);
        wait_or_change(&mut rx, &mut backoff, &mut follow).await;
        assert_eq!(backoff, BACKOFF_MAX);
    }

    #[tokio::test]
    async fn a_fixed_control_plane_just_waits() {
        let (tx, mut rx) = watch::channel(Some(endpoint(1)));
        drop(tx);
        let (mut backoff, mut follow) = (Duration::from_millis(10), true);
        let started = tokio::time::Instant::now();
        wait_or_change(&mut rx, &mut backoff, &mut follow).await;
        assert!(started.elapsed() >= Duration::from_millis(10));
        assert!(!follow);
        assert_eq!(backoff, Duration::from_millis(20));
    }
}
