//! Starting the processes: `serve`, `controlplane` and `dataplane`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use turnpike_controlplane::{AdminAuth, ControlPlaneHandle, Credentials, Server};
use turnpike_dataplane::agent::{self, Identity, PuntQueue};
use turnpike_dataplane::{DataPlane, DataPlaneConfig, Transport};

use crate::config::Config;
use crate::listener::{self, Limits};
use crate::metrics;
use crate::tls::{self, Pems};

/// The async runtime of the control side: gRPC, the control plane's actor, the data
/// plane's agent. `threads` is 1 where a data plane runs in the same process: the
/// forwarding happens on the workers, and one thread keeps the seam's hand-offs
/// (worker → agent → actor and back) free of cross-thread wake-ups (measured: about 1.6×
/// the allocation rate of two threads on one core; bench/RESULTS.md). A control plane
/// alone gets 2, for the TLS and HTTP/2 work of many data planes.
fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("turnpike-ctl")
        .enable_all()
        .build()?)
}

fn random_string(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// Where the control plane serves, once started.
struct Started {
    cp: ControlPlaneHandle,
    /// The ControlPlane service's address.
    grpc: SocketAddr,
    /// The certificates of that port (a data plane in the same process uses them too).
    pems: Pems,
}

fn listener_limits(cfg: &Config) -> Limits {
    Limits {
        max_connections: cfg.max_connections,
        idle: cfg.idle_timeout,
    }
}

async fn bind(addr: SocketAddr, what: &str, option: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for {what} on {addr} (set {option})"))
}

/// Starts the control plane: the actor, the ControlPlane service (mutual TLS) and the
/// Admin service (bearer token; TLS when certificates are configured, else plain
/// HTTP/2 on loopback only).
async fn start_control_plane(cfg: &mut Config, embedded: bool) -> anyhow::Result<Started> {
    if cfg.users.is_empty() && cfg.secrets.is_empty() {
        let password = random_string(20);
        cfg.users.push(("turnpike".to_owned(), password.clone()));
        let mut urls: Vec<String> = cfg
            .listen
            .first()
            .map(|a| format!("turn:{a}?transport=udp"))
            .into_iter()
            .collect();
        if let Some(s) = cfg.streams.iter().find(|s| !s.tls) {
            urls.push(format!("turn:{}?transport=tcp", s.addr));
        }
        if let Some(s) = cfg.streams.iter().find(|s| s.tls) {
            urls.push(format!("turns:{}?transport=tcp", s.addr));
        }
        let url = urls.join(" ");
        println!(
            "turnpike dev credential: {url} username=turnpike password={password} realm={}",
            cfg.realm
        );
    }
    let pems = match &cfg.grpc_tls {
        Some(t) => Pems::load(&t.ca, &t.cert, &t.key)?,
        None if embedded => tls::ephemeral()?.0,
        None => {
            eprintln!(
                "turnpike: invalid configuration: grpc_ca, grpc_cert, grpc_key (--grpc-ca, --grpc-cert, --grpc-key): \
                 required by the control plane (mutual TLS with its data planes; `turnpike ctl certs --out DIR` makes them)"
            );
            std::process::exit(64);
        }
    };
    let token = match &cfg.admin_token {
        Some(t) => t.clone(),
        None => {
            let t = random_string(32);
            println!("turnpike admin token: {t} (turnpike ctl --token, or TURNPIKE_ADMIN_TOKEN)");
            t
        }
    };
    let auth = AdminAuth::new(std::slice::from_ref(&token));
    let creds = Credentials::new(&cfg.realm, &cfg.users, &cfg.secrets);
    let mut secret = [0u8; 32];
    rand::rng().fill(&mut secret);
    let server = Server::new(cfg.server.clone(), creds, secret, rand::rng().random());
    let cp = ControlPlaneHandle::spawn(server);

    let default_grpc = if embedded {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        SocketAddr::from(([127, 0, 0, 1], 3479))
    };
    let grpc_addr = cfg.grpc_listen.unwrap_or(default_grpc);
    let admin_addr = match cfg.admin_listen {
        Some(a) => Some(a),
        None if embedded => Some(SocketAddr::from(([127, 0, 0, 1], 3479))),
        None => None,
    };
    let limits = listener_limits(cfg);
    let grpc = bind(grpc_addr, "gRPC", "--grpc-listen").await?;
    let grpc_local = grpc.local_addr()?;
    let (incoming, _) = listener::accept(grpc, limits, "grpc");
    let mut router = tonic::transport::Server::builder()
        .tls_config(pems.server())
        .context("gRPC TLS configuration")?
        .max_concurrent_streams(64)
        .add_service(cp.control_plane_service());
    if admin_addr.is_none() {
        router = router.add_service(cp.admin_service(auth.clone()));
    }
    tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming(ReceiverStream::new(incoming))
            .await
        {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });
    tracing::info!(%grpc_local, "gRPC ControlPlane (mutual TLS) listening");
    println!("turnpike grpc listening on {grpc_local}");
    let admin_local = match admin_addr {
        None => grpc_local,
        Some(addr) => {
            let tls = cfg.grpc_tls.is_some();
            if !tls && !addr.ip().is_loopback() {
                eprintln!(
                    "turnpike: invalid configuration: admin_listen (--admin-listen): {addr}: \
                     without certificates (--grpc-ca/--grpc-cert/--grpc-key) Admin listens on loopback only"
                );
                std::process::exit(64);
            }
            let l = bind(addr, "Admin", "--admin-listen").await?;
            let local = l.local_addr()?;
            let (incoming, _) = listener::accept(l, limits, "admin");
            let mut b = tonic::transport::Server::builder();
            if tls {
                b = b
                    .tls_config(pems.server())
                    .context("Admin TLS configuration")?;
            }
            let router = b
                .max_concurrent_streams(64)
                .add_service(cp.admin_service(auth));
            tokio::spawn(async move {
                if let Err(e) = router
                    .serve_with_incoming(ReceiverStream::new(incoming))
                    .await
                {
                    tracing::error!(error = %e, "Admin server failed");
                }
            });
            local
        }
    };
    let scheme = if admin_addr.is_some() && cfg.grpc_tls.is_none() {
        "http"
    } else {
        "https"
    };
    tracing::info!(%admin_local, "gRPC Admin listening");
    println!("turnpike admin listening on {scheme}://{admin_local}");
    Ok(Started {
        cp,
        grpc: grpc_local,
        pems,
    })
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// `serve` (with a control plane in process) or `dataplane` (attached to `control`).
pub fn serve(mut cfg: Config, control: Option<String>) -> anyhow::Result<()> {
    runtime(1)?.block_on(async move {
        let mut cp = None;
        let (control, pems) = match control {
            Some(c) => {
                let Some(t) = &cfg.grpc_tls else {
                    eprintln!(
                        "turnpike: invalid configuration: grpc_ca, grpc_cert, grpc_key (--grpc-ca, --grpc-cert, --grpc-key): \
                         required by a data plane (mutual TLS with its control plane; `turnpike ctl certs` makes them)"
                    );
                    std::process::exit(64);
                };
                (c, Pems::load(&t.ca, &t.cert, &t.key)?)
            }
            None => {
                let started = start_control_plane(&mut cfg, true).await?;
                cp = Some(started.cp);
                (format!("https://{}", started.grpc), started.pems)
            }
        };
        let url = match control.strip_prefix("http://") {
            Some(rest) => format!("https://{rest}"),
            None => control.clone(),
        };
        let endpoint = Endpoint::from_shared(url)
            .with_context(|| format!("bad control plane address {control:?}"))?
            .tls_config(pems.client(&cfg.grpc_server_name))
            .context("gRPC TLS configuration")?;
        let (queue, punted) = PuntQueue::new(16384);
        let tls = crate::turn_tls::start(&cfg)?;
        let dp = DataPlane::start(
            DataPlaneConfig {
                listen: cfg.listen.clone(),
                workers: cfg.workers,
                backend: cfg.backend,
                pin: cfg.pin,
                denied_peers: cfg.server.policy.own_sockets().to_vec(),
                legacy_channel_numbers: cfg.server.legacy_channel_numbers,
                streams: cfg.streams.clone(),
                tls,
                stream_limits: cfg.stream_limits,
                ..DataPlaneConfig::default()
            },
            queue.clone(),
        )
        .context("cannot start the data plane")?;
        let listen = dp.local_addrs();
        let stream_addrs: Vec<(Transport, std::net::SocketAddr)> = dp
            .stream_addrs()
            .iter()
            .map(|s| (if s.tls { Transport::Tls } else { Transport::Tcp }, s.addr))
            .collect();
        let (attached_tx, mut attached) = watch::channel(false);
        tokio::spawn(agent::run(
            dp.handle(),
            punted,
            queue.clone(),
            endpoint,
            Identity {
                id: cfg.data_plane_id.clone(),
                listen: listen.clone(),
                streams: stream_addrs.clone(),
                relay_ips: cfg.relay_ips.clone(),
            },
            attached_tx,
        ));
        if let Some(addr) = cfg.metrics_listen {
            metrics::spawn(addr, listener_limits(&cfg), cp.clone(), Some(dp.handle()), queue.clone())
                .await?;
        }
        // `wait_for` returns a guard on the watched value: drop it at once, or the
        // agent's next update would block on it.
        let ready = tokio::time::timeout(Duration::from_secs(10), attached.wait_for(|a| *a))
            .await
            .is_ok_and(|r| r.is_ok());
        if !ready {
            tracing::warn!(%control, "not attached to a control plane yet; relaying existing allocations only");
        }
        let listen_s: Vec<String> = listen.iter().map(ToString::to_string).collect();
        let tcp_s: Vec<String> = stream_addrs
            .iter()
            .filter(|(t, _)| *t == Transport::Tcp)
            .map(|(_, a)| a.to_string())
            .collect();
        let tls_s: Vec<String> = stream_addrs
            .iter()
            .filter(|(t, _)| *t == Transport::Tls)
            .map(|(_, a)| a.to_string())
            .collect();
        println!(
            "turnpike ready: listen={} tcp={} tls={} backend={:?} workers={} control={control}",
            listen_s.join(","),
            tcp_s.join(","),
            tls_s.join(","),
            dp.backend(),
            dp.handle().workers()
        );
        shutdown_signal().await;
        tracing::info!("shutting down");
        tokio::task::spawn_blocking(move || dp.shutdown()).await?;
        Ok(())
    })
}

/// `controlplane`: the control plane alone.
pub fn controlplane(mut cfg: Config) -> anyhow::Result<()> {
    runtime(2)?.block_on(async move {
        let started = start_control_plane(&mut cfg, false).await?;
        if let Some(m) = cfg.metrics_listen {
            let (q, _rx) = PuntQueue::new(1);
            metrics::spawn(m, listener_limits(&cfg), Some(started.cp.clone()), None, q).await?;
        }
        println!("turnpike control plane ready: grpc={}", started.grpc);
        shutdown_signal().await;
        Ok(())
    })
}
