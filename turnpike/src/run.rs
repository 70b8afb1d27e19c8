//! Starting the processes: `serve`, `controlplane` and `dataplane`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use turnpike_controlplane::{ControlPlaneHandle, Credentials, Server};
use turnpike_dataplane::agent::{self, Identity, PuntQueue};
use turnpike_dataplane::{DataPlane, DataPlaneConfig};

use crate::config::Config;
use crate::metrics;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
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

/// Starts the control plane (actor and gRPC server); returns its handle and address.
async fn start_control_plane(cfg: &mut Config) -> anyhow::Result<(ControlPlaneHandle, SocketAddr)> {
    if cfg.users.is_empty() && cfg.secrets.is_empty() {
        let password = random_string(20);
        cfg.users.push(("turnpike".to_owned(), password.clone()));
        let url = cfg
            .listen
            .first()
            .map(|a| format!("turn:{a}?transport=udp"))
            .unwrap_or_default();
        println!(
            "turnpike dev credential: {url} username=turnpike password={password} realm={}",
            cfg.realm
        );
    }
    let creds = Credentials::new(&cfg.realm, &cfg.users, &cfg.secrets);
    let mut secret = [0u8; 32];
    rand::rng().fill(&mut secret);
    let server = Server::new(cfg.server.clone(), creds, secret, rand::rng().random());
    let cp = ControlPlaneHandle::spawn(server);
    let addr = cfg
        .grpc_listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 3479)));
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for gRPC on {addr} (set --grpc-listen)"))?;
    let local = listener.local_addr()?;
    let router = tonic::transport::Server::builder()
        .add_service(cp.control_plane_service())
        .add_service(cp.admin_service());
    // Small messages on a long-lived stream: without TCP_NODELAY each would wait for
    // Nagle and the peer's delayed ACK (tens of milliseconds a hop).
    let incoming = TcpListenerStream::new(listener).map(|s| {
        s.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    });
    tokio::spawn(async move {
        if let Err(e) = router.serve_with_incoming(incoming).await {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });
    tracing::info!(%local, "gRPC (ControlPlane, Admin) listening");
    println!("turnpike grpc listening on {local}");
    Ok((cp, local))
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
    runtime()?.block_on(async move {
        let mut cp = None;
        let control = match control {
            Some(c) => c,
            None => {
                let (handle, addr) = start_control_plane(&mut cfg).await?;
                cp = Some(handle);
                format!("http://{addr}")
            }
        };
        let (queue, punted) = PuntQueue::new(16384);
        let dp = DataPlane::start(
            DataPlaneConfig {
                listen: cfg.listen.clone(),
                workers: cfg.workers,
                backend: cfg.backend,
                pin: cfg.pin,
                denied_peers: cfg.server.policy.own_sockets().to_vec(),
                legacy_channel_numbers: cfg.server.legacy_channel_numbers,
                ..DataPlaneConfig::default()
            },
            queue.clone(),
        )
        .context("cannot start the data plane")?;
        let listen = dp.local_addrs();
        let (attached_tx, mut attached) = watch::channel(false);
        tokio::spawn(agent::run(
            dp.handle(),
            punted,
            control.clone(),
            Identity {
                id: cfg.data_plane_id.clone(),
                listen: listen.clone(),
                relay_ips: cfg.relay_ips.clone(),
            },
            attached_tx,
        ));
        if let Some(addr) = cfg.metrics_listen {
            metrics::spawn(addr, cp.clone(), Some(dp.handle()), queue.clone()).await?;
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
        println!(
            "turnpike ready: listen={} backend={:?} workers={} control={control}",
            listen_s.join(","),
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
    runtime()?.block_on(async move {
        if cfg.grpc_listen.is_none() {
            cfg.grpc_listen = Some(SocketAddr::from(([0, 0, 0, 0], 3479)));
        }
        let (cp, addr) = start_control_plane(&mut cfg).await?;
        if let Some(m) = cfg.metrics_listen {
            let (q, _rx) = PuntQueue::new(1);
            metrics::spawn(m, Some(cp.clone()), None, q).await?;
        }
        println!("turnpike control plane ready: grpc={addr}");
        shutdown_signal().await;
        Ok(())
    })
}
