//! The data plane's side of the control-plane stream: dials the control plane, says
//! Hello (with its whole relay table after a reconnect), forwards punted requests and
//! reports, and applies what comes down. When the control plane goes away, the data plane
//! keeps forwarding and expiring entries at their deadlines, and this agent reconnects.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use turnpike_proto::api::v1::{
    self, control_plane_client::ControlPlaneClient, control_plane_message, data_plane_message,
    table_change,
};
use turnpike_proto::api::{ip_from_bytes, ip_to_bytes};

use crate::{AllocationSnapshot, Change, ControlSink, DataPlaneHandle, Punted, Tuple};

/// Queues punted requests for the agent; drops (and counts) when the queue is full, as
/// a router drops rather than blocks its forwarding path.
#[derive(Debug)]
pub struct PuntQueue {
    tx: mpsc::Sender<Punted>,
    /// Requests dropped because the queue was full.
    pub dropped: AtomicU64,
}

impl PuntQueue {
    /// A queue of `depth` requests and its receiving end.
    pub fn new(depth: usize) -> (Arc<PuntQueue>, mpsc::Receiver<Punted>) {
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

impl ControlSink for PuntQueue {
    fn punt(&self, p: Punted) {
        if self.tx.try_send(p).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Who this data plane is.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Its id.
    pub id: String,
    /// Its listening addresses.
    pub listen: Vec<SocketAddr>,
    /// Its relay IPs.
    pub relay_ips: Vec<IpAddr>,
}

fn tuple_api(t: &Tuple) -> v1::FiveTuple {
    v1::FiveTuple {
        transport: v1::Transport::Udp as i32,
        client: Some(t.client.into()),
        server: Some(t.local.into()),
    }
}

fn tuple_from(t: Option<&v1::FiveTuple>) -> Option<Tuple> {
    let t = t?;
    Some(Tuple {
        client: SocketAddr::try_from(t.client.as_ref()?).ok()?,
        local: SocketAddr::try_from(t.server.as_ref()?).ok()?,
    })
}

fn usage_api(u: &crate::Usage) -> v1::Usage {
    v1::Usage {
        client_to_peer: Some(v1::TrafficCounters {
            packets: u.to_peer_packets,
            bytes: u.to_peer_bytes,
        }),
        peer_to_client: Some(v1::TrafficCounters {
            packets: u.to_client_packets,
            bytes: u.to_client_bytes,
        }),
    }
}

fn snapshot_api(s: &AllocationSnapshot) -> v1::AllocationState {
    v1::AllocationState {
        allocation: Some(v1::Allocation {
            allocation_id: s.id,
            worker_id: s.worker as u32,
            five_tuple: Some(tuple_api(&s.tuple)),
            relay_addresses: s.relays.iter().map(|r| (*r).into()).collect(),
            deadline_unix_millis: s.deadline,
            bandwidth_limit_bytes_per_second: s.bandwidth,
            user_id: s.user.clone(),
            dont_fragment: false,
            // A control plane rebuilding from this table keeps the 441 check.
            username: s.username.clone(),
        }),
        permissions: s
            .permissions
            .iter()
            .map(|(ip, t)| v1::Permission {
                peer_ip: ip_to_bytes(*ip),
                deadline_unix_millis: *t,
            })
            .collect(),
        channels: s
            .channels
            .iter()
            .map(|(c, p, t)| v1::Channel {
                channel_number: u32::from(*c),
                peer: Some((*p).into()),
                deadline_unix_millis: *t,
            })
            .collect(),
    }
}

fn change_from(c: v1::TableChange) -> Option<Change> {
    use table_change::Change as C;
    Some(match c.change? {
        C::AllocationAdd(a) => {
            let a = a.allocation?;
            Change::AllocationAdd {
                id: a.allocation_id,
                tuple: tuple_from(a.five_tuple.as_ref())?,
                relays: a
                    .relay_addresses
                    .iter()
                    .filter_map(|r| SocketAddr::try_from(r).ok())
                    .collect(),
                deadline: a.deadline_unix_millis,
                bandwidth: a.bandwidth_limit_bytes_per_second,
                user: a.user_id,
                username: a.username,
            }
        }
        C::AllocationRefresh(r) => Change::AllocationRefresh {
            id: r.allocation_id,
            deadline: r.deadline_unix_millis,
        },
        C::AllocationRemove(r) => Change::AllocationRemove {
            id: r.allocation_id,
        },
        C::PermissionAdd(p) => {
            let perm = p.permission?;
            Change::PermissionSet {
                id: p.allocation_id,
                peer: ip_from_bytes(&perm.peer_ip).ok()?,
                deadline: perm.deadline_unix_millis,
            }
        }
        C::PermissionRemove(p) => Change::PermissionRemove {
            id: p.allocation_id,
            peer: ip_from_bytes(&p.peer_ip).ok()?,
        },
        C::ChannelAdd(c) => {
            let ch = c.channel?;
            Change::ChannelSet {
                id: c.allocation_id,
                channel: u16::try_from(ch.channel_number).ok()?,
                peer: SocketAddr::try_from(ch.peer.as_ref()?).ok()?,
                deadline: ch.deadline_unix_millis,
            }
        }
        C::ChannelRemove(c) => Change::ChannelRemove {
            id: c.allocation_id,
            channel: u16::try_from(c.channel_number).ok()?,
        },
    })
}

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
        allocations: dp.snapshot().iter().map(snapshot_api).collect(),
        complete: true,
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
    mut punted: mpsc::Receiver<Punted>,
    queue: Arc<PuntQueue>,
    control: Endpoint,
    me: Identity,
    attached: watch::Sender<bool>,
) {
    let mut version = 0u64;
    let mut backoff = Duration::from_millis(100);
    let target = control.uri().to_string();
    // HTTP/2 keepalives notice a control plane that vanished without closing the
    // connection (a crashed host, a partition) within a few seconds.
    let control = control
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true);
    loop {
        let channel = control.connect().await;
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "control plane unreachable; retrying");
                // Nobody answers punted requests meanwhile: drop them, clients retransmit.
                while punted.try_recv().is_ok() {}
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
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
        let hello = v1::Hello {
            data_plane_id: me.id.clone(),
            listening_addresses: me
                .listen
                .iter()
                .map(|a| v1::ListeningAddress {
                    transport: v1::Transport::Udp as i32,
                    address: Some((*a).into()),
                })
                .collect(),
            relay_ips: me
                .relay_ips
                .iter()
                .map(|ip| v1::RelayIp {
                    ip: ip_to_bytes(*ip),
                })
                .collect(),
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
        let mut down = match client.attach(ReceiverStream::new(up_rx)).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                tracing::warn!(error = %e, "attach refused; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        tracing::info!(control = %target, "attached to control plane");
        let _ = attached.send(true);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                m = down.message() => match m {
                    Ok(Some(m)) => apply(&dp, &up, m, &mut version).await,
                    _ => break,
                },
                Some(p) = punted.recv() => {
                    let m = v1::PuntedRequest {
                        worker_id: p.worker as u32,
                        five_tuple: Some(tuple_api(&p.tuple)),
                        datagram: p.data.into(),
                    };
                    // Never block the loop on the stream: a dead control plane would stall
                    // it. A request dropped here is retransmitted by its client.
                    match up.try_send(msg(data_plane_message::Message::PuntedRequest(m))) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            queue.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => break,
                    }
                }
                _ = tick.tick() => report(&dp, &up).await,
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
        M::SendDatagram(s) => {
            if let Some(t) = tuple_from(s.five_tuple.as_ref()) {
                dp.send(s.worker_id as usize, t, s.datagram.to_vec());
            }
        }
        M::BindRequest(b) => {
            let relays: Vec<SocketAddr> = b
                .relay_addresses
                .iter()
                .filter_map(|r| SocketAddr::try_from(r).ok())
                .collect();
            let id = b.request_id;
            let up = up.clone();
            let Some(tuple) = tuple_from(b.five_tuple.as_ref()) else {
                let _ = up.try_send(bind_ack(
                    id,
                    Err("bind request without 5-tuple".into()),
                    &relays,
                ));
                return;
            };
            let first = relays.clone();
            dp.bind(
                b.worker_id as usize,
                tuple,
                relays,
                Box::new(move |r| {
                    let _ = up.try_send(bind_ack(id, r, &first));
                }),
            );
        }
        M::TableChanges(batch) => {
            let changes: Vec<Change> = batch.changes.into_iter().filter_map(change_from).collect();
            dp.apply(changes);
            *version = batch.table_version;
            let _ = up.try_send(msg(data_plane_message::Message::TableAck(v1::TableAck {
                table_version: batch.table_version,
            })));
        }
        M::Drain(d) => {
            tracing::info!(draining = d.draining, "drain state from control plane");
        }
    }
}

fn bind_ack(id: u64, r: Result<(), String>, relays: &[SocketAddr]) -> v1::DataPlaneMessage {
    let outcome = match r {
        Ok(()) => v1::bind_ack::Outcome::Success(v1::BindSuccess {}),
        Err(reason) => v1::bind_ack::Outcome::Error(v1::BindError {
            code: v1::BindErrorCode::AddressInUse as i32,
            reason,
        }),
    };
    msg(data_plane_message::Message::BindAck(v1::BindAck {
        request_id: id,
        outcome: Some(outcome),
    }))
}

async fn report(dp: &DataPlaneHandle, up: &mpsc::Sender<v1::DataPlaneMessage>) {
    let counters = dp.counters();
    // The snapshot waits for every worker's answer: off the async threads.
    let dp2 = dp.clone();
    let Ok(snapshot) = tokio::task::spawn_blocking(move || dp2.snapshot()).await else {
        return;
    };
    let mut traffic = crate::Usage::default();
    for c in &counters {
        traffic.to_peer_packets += c.to_peer_packets;
        traffic.to_peer_bytes += c.to_peer_bytes;
        traffic.to_client_packets += c.to_client_packets;
        traffic.to_client_bytes += c.to_client_bytes;
    }
    let load = v1::LoadReport {
        sampled_unix_millis: unix_millis(),
        allocations: snapshot.len() as u64,
        traffic: Some(usage_api(&traffic)),
        drops: Vec::new(),
        workers: Vec::new(),
    };
    let _ = up
        .send(msg(data_plane_message::Message::LoadReport(load)))
        .await;
    let usage = v1::UsageReport {
        allocations: snapshot
            .iter()
            .map(|s| v1::AllocationUsage {
                allocation_id: s.id,
                usage: Some(usage_api(&s.usage)),
            })
            .collect(),
    };
    let _ = up
        .send(msg(data_plane_message::Message::UsageReport(usage)))
        .await;
}
