//! Starting the processes: `serve`, `controlplane` and `dataplane`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use turnpike_controlplane::{Credentials, Server};
use turnpike_controlplane_runtime::{AdminAuth, ControlPlaneHandle};
use turnpike_dataplane::agent::grpc::Grpc;
use turnpike_dataplane::agent::{self, Identity, PuntQueue};
use turnpike_dataplane::{DataPlane, DataPlaneConfig, Transport};
use turnpike_plane::advertised_addr;

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
    /// The ControlPlane service's address; `None` for `serve` without `--grpc-listen`
    /// (its data plane is attached in process).
    grpc: Option<SocketAddr>,
    /// The Admin API's URL.
    admin: String,
}

/// The id of `serve`'s own data plane unless `data_plane_id` is set.
const LOCAL_DATA_PLANE: &str = "local";

fn listener_limits(cfg: &Config) -> Limits {
    Limits {
        max_connections: cfg.max_connections,
        max_per_source: cfg.max_connections_per_ip,
        idle: cfg.idle_timeout,
        first_byte: cfg.first_byte_timeout,
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
        // The URLs clients use: public addresses behind a 1:1 NAT.
        let relays = cfg.relays();
        let public = |a: SocketAddr| advertised_addr(&relays, a);
        let mut urls: Vec<String> = cfg
            .listen
            .first()
            .map(|a| format!("turn:{}?transport=udp", public(*a)))
            .into_iter()
            .collect();
        if let Some(s) = cfg.streams.iter().find(|s| !s.tls) {
            urls.push(format!("turn:{}?transport=tcp", public(s.addr)));
        }
        if let Some(s) = cfg.streams.iter().find(|s| s.tls) {
            urls.push(format!("turns:{}?transport=tcp", public(s.addr)));
        }
        let url = urls.join(" ");
        println!(
            "turnpike dev credential: {url} username=turnpike password={password} realm={}",
            cfg.realm
        );
    }
    // `serve` attaches its own data plane in process: it listens for data planes only
    // when asked to (`--grpc-listen`), for other hosts' data planes.
    let plane_listener = !embedded || cfg.grpc_listen.is_some();
    let pems = match &cfg.grpc_tls {
        Some(t) => Some(Pems::load(&t.ca, &t.cert, &t.key)?),
        // Without the fleet's certificates, a listener of `serve` gets a certificate of
        // its own (no data plane can attach there without the fleet's CA).
        None if embedded && plane_listener => Some(tls::ephemeral()?),
        None if embedded => None,
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
    let unlimited = |q: u32| {
        if q == 0 {
            "unlimited".to_owned()
        } else {
            q.to_string()
        }
    };
    println!(
        "turnpike quotas: {} allocations per user, {} in all (--user-quota, --total-quota; \
         user_quota, total_quota in the config; 0: unlimited)",
        unlimited(cfg.server.user_quota),
        unlimited(cfg.server.total_quota)
    );
    let auth = AdminAuth::new(std::slice::from_ref(&token));
    let creds = Credentials::new(&cfg.realm, &cfg.users, &cfg.secrets);
    let mut secret = [0u8; 32];
    rand::rng().fill(&mut secret);
    let server = Server::new(cfg.server.clone(), creds, secret, rand::rng().random());
    let cp = ControlPlaneHandle::spawn_with_clock(server, turnpike_plane::Clock::new())
        .with_down_queue(cfg.plane_queue);
    if !embedded && cfg.fleet.is_some() {
        // Elected through etcd: no data plane attaches before the election is won.
        cp.set_leader(false);
    }

    let grpc_addr = cfg
        .grpc_listen
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 3479)));
    let admin_addr = match cfg.admin_listen {
        Some(a) => Some(a),
        None if embedded => Some(SocketAddr::from(([127, 0, 0, 1], 3479))),
        None => None,
    };
    let limits = listener_limits(cfg);
    let mut grpc_local = None;
    if let (true, Some(pems)) = (plane_listener, &pems) {
        let grpc = bind(grpc_addr, "gRPC", "--grpc-listen").await?;
        let local = grpc.local_addr()?;
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
        tracing::info!(grpc_local = %local, "gRPC ControlPlane (mutual TLS) listening");
        println!("turnpike grpc listening on {local}");
        grpc_local = Some(local);
    }
    let admin_local = match (admin_addr, grpc_local) {
        (None, Some(grpc_local)) => grpc_local,
        (None, None) => anyhow::bail!("the Admin API needs admin_listen or grpc_listen"),
        (Some(addr), _) => {
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
            if let (true, Some(pems)) = (tls, &pems) {
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
        admin: format!("{scheme}://{admin_local}"),
    })
}

/// How `serve`'s or `dataplane`'s agent reaches its control plane.
enum Link {
    /// In process (`serve`).
    Local(crate::local::Local),
    /// Over gRPC with mutual TLS.
    Grpc(Box<Grpc>),
}

/// Which control plane a data plane attaches to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// The one started in this process (`serve`).
    Embedded,
    /// The one at this address (`dataplane --control URL`).
    Fixed(String),
    /// The elected leader of the cell, followed through etcd (`dataplane --etcd`).
    Elected,
}

/// An endpoint for a control plane's URL, with the planes' mutual TLS.
fn control_endpoint(url: &str, pems: &Pems, server_name: &str) -> anyhow::Result<Endpoint> {
    let https = match url.strip_prefix("http://") {
        Some(rest) => format!("https://{rest}"),
        None => url.to_owned(),
    };
    Endpoint::from_shared(https)
        .with_context(|| format!("bad control plane address {url:?}"))?
        .tls_config(pems.client(server_name))
        .context("gRPC TLS configuration")
}

/// Relay sockets bind the relay IPs: one that is not an address of this host would fail
/// every Allocate with 508, so it is refused at start, naming the option. The usual cause
/// is a cloud host's public address, which sits on a 1:1 NAT in front of the host.
fn check_relay_ips(cfg: &Config) {
    for ip in &cfg.relay_ips {
        if let Err(e) = std::net::UdpSocket::bind((*ip, 0)) {
            let hint = if e.kind() == std::io::ErrorKind::AddrNotAvailable {
                "; it is not an address of this host: behind a 1:1 NAT, give the private address \
                 here and the public one with --external-ip PUBLIC/PRIVATE"
            } else {
                ""
            };
            eprintln!(
                "turnpike: invalid configuration: relay_ips (--relay-ip): cannot bind {ip}: {e}{hint}"
            );
            std::process::exit(64);
        }
    }
}

/// What clients are given for each relay IP, for the start-up lines.
fn relay_line(cfg: &Config) -> String {
    cfg.relays()
        .iter()
        .map(|r| {
            if r.is_nat() {
                format!("{}(advertised {})", r.ip, r.advertised)
            } else {
                r.ip.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `serve` (with a control plane in process) or `dataplane` (attached to `control`).
/// Every 10 s, hands the allocator's free memory back to the kernel: after a flood, the
/// queues and tables it filled are freed, but glibc keeps the pages in its arenas, and a
/// process that once held 50 MiB for a few seconds would show it forever (issue #25 N4).
fn spawn_memory_release() {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            turnpike_dataplane::release_free_memory();
        }
    });
}

pub fn serve(mut cfg: Config, control: Control) -> anyhow::Result<()> {
    check_relay_ips(&cfg);
    runtime(1)?.block_on(async move {
        spawn_memory_release();
        let mut cp = None;
        let mut admin_url = None;
        let pems = match control {
            Control::Fixed(_) | Control::Elected => {
                let Some(t) = &cfg.grpc_tls else {
                    eprintln!(
                        "turnpike: invalid configuration: grpc_ca, grpc_cert, grpc_key (--grpc-ca, --grpc-cert, --grpc-key): \
                         required by a data plane (mutual TLS with its control plane; `turnpike ctl certs` makes them)"
                    );
                    std::process::exit(64);
                };
                let pems = Pems::load(&t.ca, &t.cert, &t.key)?;
                if cfg.data_plane_id.is_none() {
                    // The control plane only accepts the id its certificate names.
                    let Some(id) = tls::data_plane_id_of(&pems.cert) else {
                        eprintln!(
                            "turnpike: invalid configuration: data_plane_id: not set, and {} names no data plane \
                             (a DNS name turnpike-dataplane-ID; `turnpike ctl certs --data-plane ID` makes them)",
                            t.cert.display()
                        );
                        std::process::exit(64);
                    };
                    cfg.data_plane_id = Some(id);
                }
                Some(pems)
            }
            Control::Embedded => {
                let started = start_control_plane(&mut cfg, true).await?;
                cp = Some(started.cp);
                admin_url = Some(started.admin);
                None
            }
        };
        let data_plane_id = cfg
            .data_plane_id
            .clone()
            .unwrap_or_else(|| LOCAL_DATA_PLANE.to_owned());
        // Where the agent attaches: in process, one address, or the cell's leader as
        // etcd says.
        let (control_name, link) = match (&control, &pems, &cp) {
            (Control::Embedded, _, Some(cp)) => (
                "in-process".to_owned(),
                Link::Local(crate::local::Local::new(cp.clone())),
            ),
            (Control::Fixed(url), Some(pems), _) => (
                url.clone(),
                Link::Grpc(Box::new(Grpc::fixed(control_endpoint(
                    url,
                    pems,
                    &cfg.grpc_server_name,
                )?))),
            ),
            (_, Some(pems), _) => {
                let Some(f) = cfg.fleet.clone() else {
                    anyhow::bail!("following an elected control plane needs --etcd");
                };
                let (control_tx, control_rx) = watch::channel(None);
                let (pems, name) = (pems.clone(), cfg.grpc_server_name.clone());
                tokio::spawn(crate::leader::follow(f, control_tx, move |url: &str| {
                    control_endpoint(url, &pems, &name)
                }));
                (
                    "the elected leader".to_owned(),
                    Link::Grpc(Box::new(Grpc::following(control_rx))),
                )
            }
            _ => anyhow::bail!("no control plane to attach to"),
        };
        // Punted requests waiting for the agent: bounded (a flood's are dropped and
        // counted beyond), and small, since the agent takes them every turn.
        let (queue, punted) = PuntQueue::new(4096);
        // Set while draining (SIGTERM): the fleet registry publishes it.
        let (draining, _) = watch::channel(false);
        let tls = crate::turn_tls::start(&cfg)?;
        let dp = DataPlane::start(
            DataPlaneConfig {
                listen: cfg.listen.clone(),
                workers: cfg.workers,
                backend: cfg.backend,
                pin: cfg.pin,
                hairpin: cfg.hairpin,
                denied_peers: cfg.server.policy.own_sockets().to_vec(),
                legacy_channel_numbers: cfg.server.legacy_channel_numbers,
                streams: cfg.streams.clone(),
                tls,
                stream_limits: cfg.stream_limits,
                xdp: cfg.xdp.clone(),
                alt_ip: cfg.alt_ip,
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
        let me = Identity {
            id: data_plane_id,
            listen: listen.clone(),
            streams: stream_addrs.clone(),
            relay_ips: cfg.relays(),
        };
        let (h, q) = (dp.handle(), queue.clone());
        match link {
            Link::Local(l) => tokio::spawn(agent::run(h, punted, q, l, me, attached_tx)),
            Link::Grpc(g) => tokio::spawn(agent::run(h, punted, q, *g, me, attached_tx)),
        };
        if let Some(addr) = cfg.metrics_listen {
            let health = metrics::Health {
                cp: cp.clone(),
                dp: Some(dp.handle()),
                attached: Some(attached.clone()),
                stopping: draining.subscribe(),
                elected: false,
            };
            metrics::spawn(addr, listener_limits(&cfg), health, queue.clone()).await?;
        }
        if let (Some(f), Some(cp)) = (&cfg.fleet, &cp) {
            // Other instances send clients here (ALTERNATE-SERVER): behind a 1:1 NAT,
            // to the public addresses.
            let relays = cfg.relays();
            let public = |a: &std::net::SocketAddr| advertised_addr(&relays, *a);
            let base = turnpike_controlplane::fleet::InstanceRecord {
                id: f.instance_id.clone(),
                region: f.region.clone(),
                zone: f.zone.clone(),
                udp: listen.iter().map(public).collect(),
                tcp: stream_addrs
                    .iter()
                    .filter(|(t, _)| *t == Transport::Tcp)
                    .map(|(_, a)| public(a))
                    .collect(),
                tls: stream_addrs
                    .iter()
                    .filter(|(t, _)| *t == Transport::Tls)
                    .map(|(_, a)| public(a))
                    .collect(),
                tls_domain: f.tls_domain.clone(),
                relay_ips: relays.iter().map(|r| r.advertised).collect(),
                admin: admin_url.clone(),
                ..Default::default()
            };
            let settings = crate::fleet::FleetSettings {
                etcd: f.etcd.clone(),
                fleet: f.name.clone(),
                id: f.instance_id.clone(),
                redirect: f.redirect,
            };
            tokio::spawn(crate::fleet::run(
                settings,
                cp.clone(),
                Some(dp.handle()),
                base,
                draining.subscribe(),
            ));
        }
        // `wait_for` returns a guard on the watched value: drop it at once, or the
        // agent's next update would block on it.
        let ready = tokio::time::timeout(Duration::from_secs(10), attached.wait_for(|a| *a))
            .await
            .is_ok_and(|r| r.is_ok());
        if !ready {
            tracing::warn!(control = %control_name, "not attached to a control plane yet; relaying existing allocations only");
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
            "turnpike ready: listen={} tcp={} tls={} relay={} backend={:?} workers={} control={control_name}",
            listen_s.join(","),
            tcp_s.join(","),
            tls_s.join(","),
            relay_line(&cfg),
            dp.backend(),
            dp.handle().workers()
        );
        let stop = crate::drain::signal().await;
        if let (crate::drain::Stop::Drain, Some(cp)) = (stop, &cp)
            && !cfg.drain_grace.is_zero()
        {
            crate::drain::drain(cp, cfg.drain_grace, &draining).await;
        }
        tracing::info!("shutting down");
        tokio::task::spawn_blocking(move || dp.shutdown()).await?;
        Ok(())
    })
}

/// `controlplane`: the control plane alone.
pub fn controlplane(mut cfg: Config) -> anyhow::Result<()> {
    runtime(2)?.block_on(async move {
        spawn_memory_release();
        let started = start_control_plane(&mut cfg, false).await?;
        let Some(grpc) = started.grpc else {
            anyhow::bail!("a control plane alone listens for its data planes");
        };
        let held = crate::leader::Held::default();
        let (draining, _) = watch::channel(false);
        if let Some(m) = cfg.metrics_listen {
            let (q, _rx) = PuntQueue::new(1);
            let health = metrics::Health {
                cp: Some(started.cp.clone()),
                dp: None,
                attached: None,
                stopping: draining.subscribe(),
                elected: cfg.fleet.is_some(),
            };
            metrics::spawn(m, listener_limits(&cfg), health, q).await?;
        }
        if let Some(f) = cfg.fleet.clone() {
            // The cell registers in the fleet while this control plane leads it.
            let base = turnpike_controlplane::fleet::InstanceRecord {
                id: f.instance_id.clone(),
                region: f.region.clone(),
                zone: f.zone.clone(),
                tls_domain: f.tls_domain.clone(),
                admin: Some(started.admin.clone()),
                ..Default::default()
            };
            tokio::spawn(crate::fleet::run(
                crate::fleet::FleetSettings {
                    etcd: f.etcd.clone(),
                    fleet: f.name.clone(),
                    id: f.instance_id.clone(),
                    redirect: f.redirect,
                },
                started.cp.clone(),
                None,
                base,
                draining.subscribe(),
            ));
            let url = match &f.advertise_grpc {
                Some(u) => u.clone(),
                None if grpc.ip().is_unspecified() => {
                    eprintln!(
                        "turnpike: invalid configuration: advertise_grpc (--advertise-grpc): required \
                         with --etcd when grpc_listen is a wildcard address"
                    );
                    std::process::exit(64);
                }
                None => format!("https://{grpc}"),
            };
            tokio::spawn(crate::leader::campaign(
                f,
                url,
                started.cp.clone(),
                held.clone(),
            ));
        }
        println!("turnpike control plane ready: grpc={grpc}");
        if crate::drain::signal().await == crate::drain::Stop::Drain && !cfg.drain_grace.is_zero() {
            crate::drain::drain(&started.cp, cfg.drain_grace, &draining).await;
        }
        crate::leader::resign(&held, &started.cp).await;
        Ok(())
    })
}
