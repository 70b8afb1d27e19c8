//! Prometheus metrics over a minimal HTTP endpoint: control-plane state and per-worker
//! data-plane counters. No per-user labels.
//!
//! The same listener answers `/healthz` (200 while the process serves) and `/readyz`
//! (200 when the instance should be sent traffic, 503 when not), each with the reason
//! in a one-line text body; see [`Health::readiness`].

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use turnpike_controlplane_runtime::ControlPlaneHandle;
use turnpike_dataplane::DataPlaneHandle;

use turnpike_dataplane::agent::PuntQueue;
use turnpike_dataplane::xdp::XdpState;

use crate::listener::{self, Limits};

/// What readiness is decided from.
#[derive(Debug, Clone)]
pub struct Health {
    /// The control plane in this process, if any.
    pub cp: Option<ControlPlaneHandle>,
    /// The data plane in this process, if any.
    pub dp: Option<DataPlaneHandle>,
    /// Whether the data plane's stream to its control plane is up (`None`: no data
    /// plane here).
    pub attached: Option<watch::Receiver<bool>>,
    /// Set on SIGTERM with a drain grace.
    pub stopping: watch::Receiver<bool>,
    /// A control plane alone that is elected through etcd (`--etcd`).
    pub elected: bool,
    /// The front door's counters, when TURN listeners share their ports with a web
    /// server.
    pub front: Option<turnpike_dataplane::FrontStatsHandle>,
}

impl Health {
    /// Whether the instance is ready for traffic, and why (one line).
    ///
    /// - A data plane (`serve`, `dataplane`) is ready when attached to its control
    ///   plane, not draining (SIGTERM, `ctl drain`, `ctl fleet drain`) and below its
    ///   redirect load. Not ready, it still relays the allocations it has; readiness
    ///   only says "send no new clients here".
    /// - A control plane alone is ready when it leads its cell, or when it runs without
    ///   an election. A standby answers 503: data planes may only attach to the leader,
    ///   and its Admin API refuses calls naming the leader, so it serves nothing a
    ///   Service should route to; it is healthy (`/healthz`) and takes over when the
    ///   leader's lease ends.
    pub fn readiness(&self) -> (bool, String) {
        if *self.stopping.borrow() {
            return (
                false,
                "draining: stopping (SIGTERM); new allocations are redirected".into(),
            );
        }
        if let Some(a) = &self.attached
            && !*a.borrow()
        {
            return (false, "not attached to a control plane".into());
        }
        if self.dp.as_ref().is_some_and(DataPlaneHandle::drained) {
            return (
                false,
                "draining: drained by its control plane (ctl drain)".into(),
            );
        }
        let Some(cp) = &self.cp else {
            return (true, "ready: attached to its control plane".into());
        };
        if self.dp.is_none() {
            if !cp.is_leader() {
                let leader = cp
                    .known_leader()
                    .unwrap_or_else(|| "not elected yet".into());
                return (
                    false,
                    format!("standby: not the leader of its cell (leader: {leader})"),
                );
            }
            return if self.elected {
                (true, "ready: leader of its cell".into())
            } else {
                (true, "ready: control plane (no election)".into())
            };
        }
        let st = cp.drain_state();
        if st.draining {
            return (
                false,
                "draining: new allocations are redirected (or refused)".into(),
            );
        }
        if st.redirecting {
            return (
                false,
                "at redirect load: new allocations go to other instances".into(),
            );
        }
        (true, "ready".into())
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr`.
pub async fn spawn(
    addr: SocketAddr,
    limits: Limits,
    health: Health,
    queue: Arc<PuntQueue>,
) -> anyhow::Result<()> {
    let listener = crate::run::listen_tcp(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    println!("turnpike metrics listening on {}", listener.local_addr()?);
    let (mut incoming, _) = listener::accept(listener, limits, "metrics");
    tokio::spawn(async move {
        while let Some(sock) = incoming.recv().await {
            let Ok(mut sock) = sock else {
                continue;
            };
            let (health, queue) = (health.clone(), queue.clone());
            tokio::spawn(async move {
                let mut req = [0u8; 4096];
                let mut n = 0;
                // Read the request head, bounded in size and time.
                let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                    while n < req.len() {
                        match sock.read(&mut req[n..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => n += k,
                        }
                        if req[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                })
                .await;
                if read.is_err() {
                    return;
                }
                let path = std::str::from_utf8(&req[..n])
                    .ok()
                    .and_then(|r| r.split_whitespace().nth(1))
                    .map(|p| p.split('?').next().unwrap_or(p));
                let (status, kind, body) = match path {
                    Some("/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
                    Some("/readyz") => {
                        let (ready, why) = health.readiness();
                        let status = if ready {
                            "200 OK"
                        } else {
                            "503 Service Unavailable"
                        };
                        (status, "text/plain", format!("{why}\n"))
                    }
                    _ => (
                        "200 OK",
                        "text/plain; version=0.0.4",
                        render(
                            health.cp.as_ref(),
                            health.dp.as_ref(),
                            health.front.as_ref(),
                            &queue,
                        )
                        .await,
                    ),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
            });
        }
    });
    Ok(())
}

/// The XDP fast path: whether it is on, what it relayed by path, what it passed to the
/// socket path by reason, and the allocations it serves.
fn render_xdp(
    o: &mut String,
    dp: &DataPlaneHandle,
    workers: &[turnpike_dataplane::WorkerCounters],
) {
    metric(
        o,
        "turnpike_xdp_enabled",
        "gauge",
        "1 when the XDP fast path is attached (see the interface and mode labels of turnpike_xdp_attached).",
    );
    let status = dp.xdp_status();
    let _ = writeln!(
        o,
        "turnpike_xdp_enabled {}",
        u8::from(matches!(status, XdpState::On(_)))
    );
    let (XdpState::On(attached), Some(stats)) = (status, dp.xdp_stats()) else {
        // Off: the families are declared all the same (no samples), so that dashboards
        // and alerts can name them whatever the host.
        for (name, kind, help) in XDP_FAMILIES {
            metric(o, name, kind, help);
        }
        return;
    };
    let [
        attached_h,
        packets_h,
        bytes_h,
        passed_h,
        checksums_h,
        allocations_h,
    ] = XDP_FAMILIES;
    let family =
        |o: &mut String, (name, kind, help): (&str, &str, &str)| metric(o, name, kind, help);
    family(o, attached_h);
    for a in &attached {
        let _ = writeln!(
            o,
            "turnpike_xdp_attached{{interface=\"{}\",mode=\"{}\"}} 1",
            a.iface, a.mode
        );
    }
    family(o, packets_h);
    for (path, v) in stats.relayed() {
        let _ = writeln!(
            o,
            "turnpike_xdp_relayed_packets_total{{path=\"{path}\"}} {v}"
        );
    }
    family(o, bytes_h);
    let _ = writeln!(
        o,
        "turnpike_xdp_relayed_bytes_total{{direction=\"to_peer\"}} {}",
        stats.to_peer_bytes()
    );
    let _ = writeln!(
        o,
        "turnpike_xdp_relayed_bytes_total{{direction=\"to_client\"}} {}",
        stats.to_client_bytes()
    );
    family(o, passed_h);
    for (reason, v) in stats.passed() {
        let _ = writeln!(o, "turnpike_xdp_passed_total{{reason=\"{reason}\"}} {v}");
    }
    family(o, checksums_h);
    let _ = writeln!(
        o,
        "turnpike_xdp_checksums_completed_total {}",
        stats.completed_checksums()
    );
    family(o, allocations_h);
    for (w, c) in workers.iter().enumerate() {
        let _ = writeln!(
            o,
            "turnpike_xdp_allocations{{worker=\"{w}\"}} {}",
            c.xdp_allocations
        );
    }
}

/// The XDP program's metric families (name, type, help), in the order they are written.
const XDP_FAMILIES: [(&str, &str, &str); 6] = [
    (
        "turnpike_xdp_attached",
        "gauge",
        "Interfaces the XDP program is attached to, with the mode (native, generic).",
    ),
    (
        "turnpike_xdp_relayed_packets_total",
        "counter",
        "Packets relayed by the XDP program, by path (channel_up, send_up, channel_down, data_down, and hairpin_channel, hairpin_data: one client to another of this relay, counted once); not in turnpike_relayed_packets_total.",
    ),
    (
        "turnpike_xdp_relayed_bytes_total",
        "counter",
        "Payload bytes relayed by the XDP program, by direction.",
    ),
    (
        "turnpike_xdp_passed_total",
        "counter",
        "Frames the XDP program passed to the socket path, by reason.",
    ),
    (
        "turnpike_xdp_checksums_completed_total",
        "counter",
        "Partial UDP checksums (senders on this host, veth transmit offload) the XDP program completed.",
    ),
    (
        "turnpike_xdp_allocations",
        "gauge",
        "Allocations with entries in the XDP program's maps, by worker.",
    ),
];

/// The front door's counters (the web connections' gauge is with the others).
fn render_front(o: &mut String, f: &turnpike_dataplane::FrontStats) {
    metric(
        o,
        "turnpike_front_door_events_total",
        "counter",
        "Connections on ports shared with a web server: accepted by transport, refused \
         (connection caps), timeout (no route within the handshake timeout), closed_early \
         (closed before a route), turn, web, unknown (neither: closed), backend_error \
         (web backend unreachable: closed cleanly), handoff_error.",
    );
    for (event, v) in [
        ("accepted_tcp", f.accepted_tcp),
        ("accepted_tls", f.accepted_tls),
        ("refused", f.refused),
        ("timeout", f.timeouts),
        ("closed_early", f.closed_early),
        ("turn", f.to_turn),
        ("web", f.to_web),
        ("unknown", f.unknown),
        ("backend_error", f.backend_errors),
        ("handoff_error", f.handoff_errors),
    ] {
        let _ = writeln!(
            o,
            "turnpike_front_door_events_total{{event=\"{event}\"}} {v}"
        );
    }
    metric(
        o,
        "turnpike_front_door_web_bytes_total",
        "counter",
        "Bytes passed through to and from web backends.",
    );
    let _ = writeln!(o, "turnpike_front_door_web_bytes_total {}", f.web_bytes);
    metric(
        o,
        "turnpike_front_door_routing",
        "gauge",
        "Connections whose route (TURN or web) is being decided.",
    );
    let _ = writeln!(o, "turnpike_front_door_routing {}", f.routing);
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

async fn render(
    cp: Option<&ControlPlaneHandle>,
    dp: Option<&DataPlaneHandle>,
    front: Option<&turnpike_dataplane::FrontStatsHandle>,
    queue: &PuntQueue,
) -> String {
    let mut o = String::new();
    if let Some(cp) = cp
        && let Ok(s) = cp.server_stats().await
    {
        for (name, kind, help, v) in [
            (
                "turnpike_allocations",
                "gauge",
                "Live allocations.",
                s.allocations,
            ),
            (
                "turnpike_permissions",
                "gauge",
                "Live permissions.",
                s.permissions,
            ),
            (
                "turnpike_channels",
                "gauge",
                "Live channel bindings.",
                s.channels,
            ),
            (
                "turnpike_requests_total",
                "counter",
                "STUN requests handled by the control plane.",
                s.requests,
            ),
            (
                "turnpike_auth_failures_total",
                "counter",
                "Requests that failed authentication.",
                s.auth_failures,
            ),
            (
                "turnpike_rate_limited_total",
                "counter",
                "Unauthenticated requests dropped by the rate limiter.",
                s.rate_limited,
            ),
            (
                "turnpike_policy_denied_total",
                "counter",
                "Requests refused by the peer policy (403).",
                s.policy_denied,
            ),
            (
                "turnpike_quota_rejected_total",
                "counter",
                "Allocations refused by a quota or capacity limit (486, 508).",
                s.quota_rejected,
            ),
            (
                "turnpike_stale_nonces_total",
                "counter",
                "Requests answered 438 Stale Nonce.",
                s.stale_nonces,
            ),
            (
                "turnpike_relay_bind_failures_total",
                "counter",
                "Relay binds the data plane refused (retried on other ports, then 508).",
                s.bind_failures,
            ),
            (
                "turnpike_replies_shed_total",
                "counter",
                "Replies to UDP clients shed because the data plane was too far behind (a flood).",
                s.replies_shed,
            ),
            (
                "turnpike_upgrades_total",
                "counter",
                "Binary upgrades (SIGUSR2) this instance has been through, counted on by each new process.",
                crate::upgrade::UPGRADES.load(std::sync::atomic::Ordering::Relaxed),
            ),
            (
                "turnpike_upgrades_failed_total",
                "counter",
                "Upgrades this process attempted that failed (it carried on serving).",
                crate::upgrade::UPGRADES_FAILED.load(std::sync::atomic::Ordering::Relaxed),
            ),
        ] {
            metric(&mut o, name, kind, help);
            let _ = writeln!(o, "{name} {v}");
        }
        if let Ok(seam) = cp.seam_stats().await {
            for (name, help, v) in [
                (
                    "turnpike_plane_batches_dropped_total",
                    "Table-change batches a full queue towards a data plane dropped (each sent again: none is lost).",
                    seam.batches_dropped,
                ),
                (
                    "turnpike_plane_batches_resent_total",
                    "Table-change batches sent again, after a data plane saw a gap or stayed silent.",
                    seam.batches_resent,
                ),
                (
                    "turnpike_plane_punts_held_back_total",
                    "Punted requests shed because their data plane was too many table changes behind.",
                    seam.punts_held_back,
                ),
                (
                    "turnpike_plane_allocations_handed_back_total",
                    "Allocations handed back to a data plane that came back without them (it restarted): bound again on their relayed addresses.",
                    seam.allocations_handed_back,
                ),
                (
                    "turnpike_plane_allocations_lost_total",
                    "Allocations ended because their data plane came back without them and they could not be handed back (TCP/TLS clients, a relayed address that could not be bound again).",
                    seam.allocations_lost,
                ),
            ] {
                metric(&mut o, name, "counter", help);
                let _ = writeln!(o, "{name} {v}");
            }
        }
        let (user_quota, total_quota) = cp.quotas();
        metric(
            &mut o,
            "turnpike_quota_allocations",
            "gauge",
            "Allocation quotas in force (0: unlimited).",
        );
        let _ = writeln!(
            o,
            "turnpike_quota_allocations{{scope=\"user\"}} {user_quota}"
        );
        let _ = writeln!(
            o,
            "turnpike_quota_allocations{{scope=\"total\"}} {total_quota}"
        );
    }
    if let Some(dp) = dp {
        let workers = dp.counters();
        metric(
            &mut o,
            "turnpike_relayed_packets_total",
            "counter",
            "Packets relayed, by direction and worker.",
        );
        for (w, c) in workers.iter().enumerate() {
            let _ = writeln!(
                o,
                "turnpike_relayed_packets_total{{direction=\"to_peer\",worker=\"{w}\"}} {}",
                c.to_peer_packets
            );
            let _ = writeln!(
                o,
                "turnpike_relayed_packets_total{{direction=\"to_client\",worker=\"{w}\"}} {}",
                c.to_client_packets
            );
        }
        metric(
            &mut o,
            "turnpike_relayed_bytes_total",
            "counter",
            "Payload bytes relayed, by direction and worker.",
        );
        for (w, c) in workers.iter().enumerate() {
            let _ = writeln!(
                o,
                "turnpike_relayed_bytes_total{{direction=\"to_peer\",worker=\"{w}\"}} {}",
                c.to_peer_bytes
            );
            let _ = writeln!(
                o,
                "turnpike_relayed_bytes_total{{direction=\"to_client\",worker=\"{w}\"}} {}",
                c.to_client_bytes
            );
        }
        metric(
            &mut o,
            "turnpike_dropped_packets_total",
            "counter",
            "Packets dropped, by reason and worker.",
        );
        for (w, c) in workers.iter().enumerate() {
            for (reason, v) in c.drops() {
                let _ = writeln!(
                    o,
                    "turnpike_dropped_packets_total{{reason=\"{reason}\",worker=\"{w}\"}} {v}"
                );
            }
        }
        metric(
            &mut o,
            "turnpike_punted_total",
            "counter",
            "STUN requests handed to the control plane, by worker.",
        );
        for (w, c) in workers.iter().enumerate() {
            let _ = writeln!(o, "turnpike_punted_total{{worker=\"{w}\"}} {}", c.punted);
        }
        metric(
            &mut o,
            "turnpike_challenged_total",
            "counter",
            "Unauthenticated Allocates answered by the worker with the control plane's 401, by worker.",
        );
        for (w, c) in workers.iter().enumerate() {
            let _ = writeln!(
                o,
                "turnpike_challenged_total{{worker=\"{w}\"}} {}",
                c.challenged
            );
        }
        metric(
            &mut o,
            "turnpike_hairpinned_total",
            "counter",
            "Datagrams from a client to another allocation's relayed address on the same worker, delivered without the kernel's round trip (the hairpin), by worker.",
        );
        for (w, c) in workers.iter().enumerate() {
            let _ = writeln!(
                o,
                "turnpike_hairpinned_total{{worker=\"{w}\"}} {}",
                c.hairpinned
            );
        }
        render_xdp(&mut o, dp, &workers);
        metric(
            &mut o,
            "turnpike_relay_pool_sockets",
            "gauge",
            "Relay sockets bound in advance for the next allocations, by worker.",
        );
        for (w, c) in workers.iter().enumerate() {
            let _ = writeln!(
                o,
                "turnpike_relay_pool_sockets{{worker=\"{w}\"}} {}",
                c.relay_pool
            );
        }
        metric(
            &mut o,
            "turnpike_connections",
            "gauge",
            "Client connections open, by transport (tcp, tls), kind (turn; web: passed \
             through by the front door) and worker (front: the front door).",
        );
        for (w, c) in workers.iter().enumerate() {
            let _ = writeln!(
                o,
                "turnpike_connections{{transport=\"tcp\",kind=\"turn\",worker=\"{w}\"}} {}",
                c.streams.open_tcp
            );
            let _ = writeln!(
                o,
                "turnpike_connections{{transport=\"tls\",kind=\"turn\",worker=\"{w}\"}} {}",
                c.streams.open_tls
            );
        }
        if let Some(f) = front {
            let f = f.stats();
            let _ = writeln!(
                o,
                "turnpike_connections{{transport=\"tcp\",kind=\"web\",worker=\"front\"}} {}",
                f.web_open_tcp
            );
            let _ = writeln!(
                o,
                "turnpike_connections{{transport=\"tls\",kind=\"web\",worker=\"front\"}} {}",
                f.web_open_tls
            );
            render_front(&mut o, &f);
        }
        metric(
            &mut o,
            "turnpike_connection_events_total",
            "counter",
            "Client connection events (accepted by transport, closed, refused, TLS \
             handshakes and failures, framing errors, oversize messages, send-buffer drops, \
             idle closes), by worker.",
        );
        for (w, c) in workers.iter().enumerate() {
            for (event, v) in c.streams.counters() {
                let _ = writeln!(
                    o,
                    "turnpike_connection_events_total{{event=\"{event}\",worker=\"{w}\"}} {v}"
                );
            }
        }
        metric(
            &mut o,
            "turnpike_tls_reloads_total",
            "counter",
            "TURN-over-TLS certificate reloads, by outcome.",
        );
        for (outcome, v) in [
            ("ok", &crate::tls_clients::TLS_RELOADS),
            ("failed", &crate::tls_clients::TLS_RELOAD_FAILURES),
        ] {
            let _ = writeln!(
                o,
                "turnpike_tls_reloads_total{{outcome=\"{outcome}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        metric(
            &mut o,
            "turnpike_punt_queue_dropped_total",
            "counter",
            "Punted requests dropped because the queue to the control plane was full.",
        );
        let _ = writeln!(
            o,
            "turnpike_punt_queue_dropped_total {}",
            queue.dropped.load(Ordering::Relaxed)
        );
    }
    o
}
