//! Prometheus metrics over a minimal HTTP endpoint: control-plane state and per-worker
//! data-plane counters. No per-user labels.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use turnpike_controlplane::ControlPlaneHandle;
use turnpike_dataplane::DataPlaneHandle;

use turnpike_dataplane::agent::PuntQueue;

use crate::listener::{self, Limits};

/// Serves `/metrics` on `addr`.
pub async fn spawn(
    addr: SocketAddr,
    limits: Limits,
    cp: Option<ControlPlaneHandle>,
    dp: Option<DataPlaneHandle>,
    queue: Arc<PuntQueue>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    println!("turnpike metrics listening on {}", listener.local_addr()?);
    let (mut incoming, _) = listener::accept(listener, limits, "metrics");
    tokio::spawn(async move {
        while let Some(sock) = incoming.recv().await {
            let Ok(mut sock) = sock else {
                continue;
            };
            let (cp, dp, queue) = (cp.clone(), dp.clone(), queue.clone());
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
                let body = render(cp.as_ref(), dp.as_ref(), &queue).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
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
    let _ = writeln!(o, "turnpike_xdp_enabled {}", u8::from(status.is_ok()));
    let (Ok(attached), Some(stats)) = (status, dp.xdp_stats()) else {
        return;
    };
    metric(
        o,
        "turnpike_xdp_attached",
        "gauge",
        "Interfaces the XDP program is attached to, with the mode (native, generic).",
    );
    for a in &attached {
        let _ = writeln!(
            o,
            "turnpike_xdp_attached{{interface=\"{}\",mode=\"{}\"}} 1",
            a.iface, a.mode
        );
    }
    metric(
        o,
        "turnpike_xdp_relayed_packets_total",
        "counter",
        "Packets relayed by the XDP program, by path (channel_up, send_up, channel_down, data_down); not in turnpike_relayed_packets_total.",
    );
    for (path, v) in stats.relayed() {
        let _ = writeln!(
            o,
            "turnpike_xdp_relayed_packets_total{{path=\"{path}\"}} {v}"
        );
    }
    metric(
        o,
        "turnpike_xdp_relayed_bytes_total",
        "counter",
        "Payload bytes relayed by the XDP program, by direction.",
    );
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
    metric(
        o,
        "turnpike_xdp_passed_total",
        "counter",
        "Frames the XDP program passed to the socket path, by reason.",
    );
    for (reason, v) in stats.passed() {
        let _ = writeln!(o, "turnpike_xdp_passed_total{{reason=\"{reason}\"}} {v}");
    }
    metric(
        o,
        "turnpike_xdp_checksums_completed_total",
        "counter",
        "Partial UDP checksums (senders on this host, veth transmit offload) the XDP program completed.",
    );
    let _ = writeln!(
        o,
        "turnpike_xdp_checksums_completed_total {}",
        stats.completed_checksums()
    );
    metric(
        o,
        "turnpike_xdp_allocations",
        "gauge",
        "Allocations with entries in the XDP program's maps, by worker.",
    );
    for (w, c) in workers.iter().enumerate() {
        let _ = writeln!(
            o,
            "turnpike_xdp_allocations{{worker=\"{w}\"}} {}",
            c.xdp_allocations
        );
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

async fn render(
    cp: Option<&ControlPlaneHandle>,
    dp: Option<&DataPlaneHandle>,
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
        ] {
            metric(&mut o, name, kind, help);
            let _ = writeln!(o, "{name} {v}");
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
            "Client connections open, by transport (tcp, tls) and worker.",
        );
        for (w, c) in workers.iter().enumerate() {
            let _ = writeln!(
                o,
                "turnpike_connections{{transport=\"tcp\",worker=\"{w}\"}} {}",
                c.streams.open_tcp
            );
            let _ = writeln!(
                o,
                "turnpike_connections{{transport=\"tls\",worker=\"{w}\"}} {}",
                c.streams.open_tls
            );
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
