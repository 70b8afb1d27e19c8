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
use turnpike_dataplane::{DataPlane, DataPlaneConfig, FrontDoor, FrontDoorConfig, Transport};
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
    /// What a process taking over from this one needs to carry on as it (`SIGUSR2`).
    carried: Carried,
}

/// The generated values a new process takes over in an upgrade.
#[derive(Debug, Clone)]
struct Carried {
    admin_token: String,
    dev_users: Vec<(String, String)>,
    nonce_secret: [u8; 32],
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
    listen_tcp(addr)
        .await
        .with_context(|| format!("cannot listen for {what} on {addr} (set {option})"))
}

/// A TCP listener for the Admin, gRPC or metrics service on `addr` (as configured): the
/// one the process this one upgrades handed over for that address if there is one, else
/// a new one. A duplicate is kept for the next upgrade.
pub(crate) async fn listen_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = match crate::upgrade::take_tcp(addr) {
        Some(l) => {
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)?
        }
        None => TcpListener::bind(addr).await?,
    };
    crate::upgrade::keep_tcp(addr, &l);
    Ok(l)
}

/// Starts the control plane: the actor, the ControlPlane service (mutual TLS) and the
/// Admin service (bearer token; TLS when certificates are configured, else plain
/// HTTP/2 on loopback only).
async fn start_control_plane(
    cfg: &mut Config,
    embedded: bool,
    handed: Option<&crate::upgrade::Header>,
) -> anyhow::Result<Started> {
    let mut dev_users = Vec::new();
    if let Some(h) = handed.filter(|h| !h.dev_users.is_empty())
        && cfg.users.is_empty()
        && cfg.secrets.is_empty()
    {
        // The dev credential of the process this one upgrades: its clients keep it.
        cfg.users.extend(h.dev_users.iter().cloned());
        dev_users = h.dev_users.clone();
    }
    if cfg.users.is_empty() && cfg.secrets.is_empty() {
        let password = random_string(20);
        dev_users.push(("turnpike".to_owned(), password.clone()));
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
    let token = match (&cfg.admin_token, handed) {
        (Some(t), _) => t.clone(),
        (None, Some(h)) => h.admin_token.clone(),
        (None, None) => {
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
    let token_kept = token.clone();
    let creds = Credentials::new(&cfg.realm, &cfg.users, &cfg.secrets);
    let mut secret = [0u8; 32];
    match handed.map(|h| h.nonce_secret.as_slice()) {
        // Nonces the old process minted stay valid.
        Some(s) if s.len() == 32 => secret.copy_from_slice(s),
        _ => rand::rng().fill(&mut secret),
    }
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
        carried: Carried {
            admin_token: token_kept,
            dev_users,
            nonce_secret: secret,
        },
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

/// Descriptors kept aside from the relay sockets: listeners, rings, eventfds, the
/// control side's connections, a new process's during an upgrade.
const RESERVED_FDS: u64 = 64;

/// Raises the soft open-files limit to the hard one and says how many relay sockets fit
/// (one per allocation and address family; each TCP/TLS client takes one more). With
/// the control plane in this process, the total quota is capped there: an Allocate
/// beyond gets 508 and counts as refused, rather than a bind failing in the kernel.
fn open_files_capacity(cfg: &mut Config, embedded: bool) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    let workers = match cfg.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    } as u64;
    let pool = cfg.server.relay_pool as u64 * workers * cfg.relay_ips.len().max(1) as u64;
    let capacity = limit.saturating_sub(open + RESERVED_FDS + pool + 4 * workers);
    tracing::info!(
        limit,
        capacity,
        "open files: room for about {capacity} relay sockets (one per allocation and family)"
    );
    if !embedded {
        return;
    }
    let cap = u32::try_from(capacity).unwrap_or(u32::MAX);
    let quota = cfg.server.total_quota;
    if quota == 0 {
        tracing::info!(
            limit,
            capped = cap,
            "total quota unlimited: capped at {cap} allocations by the open-files limit"
        );
        cfg.server.total_quota = cap.max(1);
    } else if quota > cap {
        tracing::warn!(
            limit,
            total_quota = quota,
            capped = cap,
            "the open-files limit holds fewer allocations than the total quota: allocations beyond {cap} get 508 (raise LimitNOFILE)"
        );
        println!(
            "turnpike open files: limit {limit}, total quota capped at {cap} allocations (LimitNOFILE)"
        );
        cfg.server.total_quota = cap.max(1);
    }
}

pub fn serve(mut cfg: Config, control: Control) -> anyhow::Result<()> {
    check_relay_ips(&cfg);
    open_files_capacity(&mut cfg, control == Control::Embedded);
    // Started by an upgrade (`SIGUSR2` to the previous process): its state and sockets.
    let handed =
        crate::upgrade::inherit(turnpike_api::convert::At::of(&turnpike_plane::Clock::new()))
            .context("taking over from the process being upgraded")?;
    if let Some(h) = &handed {
        tracing::info!(
            from = h.header.pid,
            allocations = h.rows.len(),
            "taking over from the process being upgraded"
        );
    }
    runtime(1)?.block_on(async move {
        let mut signals = crate::drain::Signals::new().context("cannot watch signals")?;
        spawn_memory_release();
        let mut cp = None;
        let mut admin_url = None;
        let mut carried = None;
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
                let started =
                    start_control_plane(&mut cfg, true, handed.as_ref().map(|h| &h.header))
                        .await?;
                cp = Some(started.cp);
                admin_url = Some(started.admin);
                carried = Some(started.carried);
                None
            }
        };
        let data_plane_id = cfg
            .data_plane_id
            .clone()
            .unwrap_or_else(|| LOCAL_DATA_PLANE.to_owned());
        // The allocations of the process this one upgrades: handed back to this data
        // plane when it attaches, on the sockets it inherits.
        let mut adopted = handed.as_ref().map_or(0, |h| h.header.udp_allocations);
        if let (Some(h), Some(cp)) = (&handed, &cp) {
            adopted = cp
                .adopt(&data_plane_id, h.rows.clone())
                .await
                .map_err(|e| anyhow::anyhow!("taking over the allocations: {}", e.message()))?;
        }
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
        // The front door binds the shared ports before the data plane starts: they are
        // the server's own addresses, never a peer.
        let front_listens = cfg.front_listens();
        let front = if front_listens.is_empty() {
            None
        } else {
            Some(
                FrontDoor::bind(FrontDoorConfig {
                    listen: front_listens,
                    rules: cfg.front.rules.clone(),
                    limits: cfg.stream_limits,
                })
                .context("cannot start the front door")?,
            )
        };
        let front_local = front.as_ref().map(FrontDoor::local).unwrap_or_default();
        let mut denied_peers = cfg.server.policy.own_sockets().to_vec();
        denied_peers.extend(front_local.iter().map(|f| f.addr));
        let dp = DataPlane::start(
            DataPlaneConfig {
                listen: cfg.listen.clone(),
                workers: cfg.workers,
                backend: cfg.backend,
                pin: cfg.pin,
                hairpin: cfg.hairpin,
                denied_peers,
                legacy_channel_numbers: cfg.server.legacy_channel_numbers,
                streams: cfg.worker_streams(),
                tls,
                stream_limits: cfg.stream_limits,
                xdp: {
                    // Taking over: the old process's links are swapped over, not attached.
                    let mut x = cfg.xdp.clone();
                    if let Some(h) = &handed {
                        x.adopt = h
                            .header
                            .xdp_links
                            .iter()
                            .map(|(i, m, p)| {
                                (i.clone(), if m == "generic" { "generic" } else { "native" }, p.clone())
                            })
                            .collect();
                    }
                    x
                },
                alt_ip: cfg.alt_ip,
                inherited: handed.as_ref().map(|h| h.inherited.clone()),
                ..DataPlaneConfig::default()
            },
            queue.clone(),
        )
        .context("cannot start the data plane")?;
        let listen = dp.local_addrs();
        let transport = |tls: bool| if tls { Transport::Tls } else { Transport::Tcp };
        let stream_addrs: Vec<(Transport, std::net::SocketAddr)> = dp
            .stream_addrs()
            .iter()
            .map(|s| (transport(s.tls), s.addr))
            .chain(front_local.iter().map(|f| (transport(f.tls), f.addr)))
            .collect();
        let front_stats = front.as_ref().map(FrontDoor::stats);
        if let Some(front) = front {
            front.spawn(dp.handle()).context("cannot start the front door")?;
        }
        let (attached_tx, mut attached) = watch::channel(false);
        let me_id = data_plane_id.clone();
        // Set while a data plane hands over to the process that upgrades it: its agent
        // detaches, so that the new one attaches under the same id.
        let (suspend_tx, suspend_rx) = watch::channel(false);
        let me = Identity {
            id: data_plane_id,
            listen: listen.clone(),
            streams: stream_addrs.clone(),
            relay_ips: cfg.relays(),
        };
        let (h, q) = (dp.handle(), queue.clone());
        match link {
            Link::Local(l) => tokio::spawn(agent::run(h, punted, q, l, me, attached_tx)),
            Link::Grpc(g) => tokio::spawn(agent::run(
                h,
                punted,
                q,
                agent::Suspendable::new(*g, suspend_rx),
                me,
                attached_tx,
            )),
        };
        if let Some(addr) = cfg.metrics_listen {
            let health = metrics::Health {
                cp: cp.clone(),
                dp: Some(dp.handle()),
                attached: Some(attached.clone()),
                stopping: draining.subscribe(),
                elected: false,
                front: front_stats.clone(),
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
        if let Some(h) = &handed {
            // Ready once the allocations taken over are in this data plane's table, on
            // the inherited sockets: then the old process stops.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let handle = dp.handle();
            loop {
                let h2 = handle.clone();
                let have = tokio::task::spawn_blocking(move || h2.snapshot().len()).await?;
                if have >= adopted || tokio::time::Instant::now() >= deadline {
                    if have < adopted {
                        tracing::warn!(have, adopted, "not every allocation taken over is in the table yet");
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Its XDP program takes the old one's place on each link, atomically, its
            // maps filled with the table; its workers read the inherited sockets from
            // now on (the old process until it stops: each datagram is read by one of
            // the two).
            let swapped = handle
                .xdp_take_over()
                .context("taking over the XDP links")?;
            if swapped > 0 {
                tracing::info!(interfaces = swapped, "XDP program replaced on its links");
            }
            handle.resume();
            let unclaimed = h.inherited.release_unclaimed();
            crate::upgrade::release_tcp();
            // systemd learns the new main process before the old one exits.
            crate::notify::notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
            h.ready().context("telling the process being upgraded that this one is ready")?;
            tracing::info!(from = h.header.pid, allocations = adopted, unclaimed_sockets = unclaimed, upgrades = h.header.upgrades + 1, "upgrade complete: this process serves now");
            println!(
                "turnpike upgraded: took over {adopted} allocations from pid {}",
                h.header.pid
            );
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
        if handed.is_none() {
            crate::notify::notify("READY=1");
        }
        let stop = loop {
            match signals.next().await {
                crate::drain::Stop::Upgrade => {
                    let Some(cp) = &cp else {
                        // `dataplane`: its control plane hands the allocations back to
                        // the new process when it attaches under the same id.
                        let _ = suspend_tx.send(true);
                        match upgrade(None, &dp, &queue, None, &me_id).await {
                            Ok(pid) => {
                                tracing::info!(successor = pid, "upgrade: the new process serves; this one stops");
                                println!("turnpike handed over to pid {pid}");
                                break crate::drain::Stop::Now;
                            }
                            Err(e) => {
                                crate::upgrade::UPGRADES_FAILED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                dp.handle().xdp_unpin();
                                queue.freeze(false);
                                let _ = suspend_tx.send(false);
                                tracing::error!(error = %format!("{e:#}"), "upgrade failed; this process carries on");
                            }
                        }
                        continue;
                    };
                    match upgrade(Some(cp), &dp, &queue, carried.as_ref(), &me_id).await {
                        Ok(pid) => {
                            tracing::info!(successor = pid, "upgrade: the new process serves; this one stops");
                            println!("turnpike handed over to pid {pid}");
                            // The new process reads the UDP sockets and accepts
                            // connections; this one serves its open TCP/TLS connections
                            // (requests on them too) until they close or the drain grace
                            // passes.
                            dp.handle().retire();
                            queue.freeze(false);
                            serve_open_streams(&dp, cfg.drain_grace).await;
                            break crate::drain::Stop::Now;
                        }
                        Err(e) => {
                            crate::upgrade::UPGRADES_FAILED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            dp.handle().xdp_unpin();
                            queue.freeze(false);
                            tracing::error!(error = %format!("{e:#}"), "upgrade failed; this process carries on");
                        }
                    }
                }
                s => break s,
            }
        };
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

/// After an upgrade: waits until this process's TCP/TLS connections have closed, the
/// drain grace has passed, or a signal arrives.
async fn serve_open_streams(dp: &DataPlane, grace: Duration) {
    let open = || -> u64 {
        dp.handle()
            .counters()
            .iter()
            .map(|c| c.streams.open_tcp + c.streams.open_tls)
            .sum()
    };
    let n = open();
    if n == 0 || grace.is_zero() {
        if n > 0 {
            tracing::warn!(
                connections = n,
                "upgrade: closing open TCP/TLS connections (no --drain-grace)"
            );
        }
        return;
    }
    tracing::info!(
        connections = n,
        grace_secs = grace.as_secs(),
        "upgrade: serving the open TCP/TLS connections until they close"
    );
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(connections = open(), "upgrade: drain grace over; closing the remaining connections");
                return;
            }
            _ = crate::drain::signal() => return,
        }
        if open() == 0 {
            tracing::info!("upgrade: the last TCP/TLS connection closed");
            return;
        }
    }
}

/// Hands this `serve` over to a new process of the binary at its path: stops taking
/// requests, copies the control plane's allocations and the data plane's sockets to it,
/// and waits until it is ready. On failure the new process is stopped; the caller takes
/// requests again.
async fn upgrade(
    cp: Option<&ControlPlaneHandle>,
    dp: &DataPlane,
    queue: &PuntQueue,
    carried: Option<&Carried>,
    data_plane: &str,
) -> anyhow::Result<u32> {
    tracing::info!("SIGUSR2: upgrading: starting the binary at this one's path");
    queue.freeze(true);
    // `serve` hands its control plane's allocations over; a data plane alone gets them
    // back from its control plane.
    let rows = match cp {
        Some(cp) => cp
            .export(data_plane)
            .await
            .map_err(|e| anyhow::anyhow!("reading the allocations: {}", e.message()))?,
        None => Vec::new(),
    };
    let handle = dp.handle();
    let (socks, udp_allocations) = tokio::task::spawn_blocking(move || {
        let udp = handle
            .snapshot()
            .iter()
            .filter(|a| a.tuple.transport == Transport::Udp)
            .count();
        handle.handover().map(|s| (s, udp))
    })
    .await?
    .context("duplicating the sockets")?;
    // The XDP program's links, pinned for the new process to swap its program into.
    let xdp_links = dp
        .handle()
        .xdp_pin_links(std::path::Path::new(crate::upgrade::BPF_FS))
        .context("pinning the XDP links (is a BPF file system mounted at /sys/fs/bpf?)")?
        .into_iter()
        .map(|(i, m, p)| (i, m.to_owned(), p))
        .collect();
    let header = crate::upgrade::Header {
        xdp_links,
        pid: std::process::id(),
        upgrades: crate::upgrade::UPGRADES.load(std::sync::atomic::Ordering::Relaxed),
        admin_token: carried.map(|c| c.admin_token.clone()).unwrap_or_default(),
        dev_users: carried.map(|c| c.dev_users.clone()).unwrap_or_default(),
        nonce_secret: carried.map(|c| c.nonce_secret.to_vec()).unwrap_or_default(),
        data_plane: data_plane.to_owned(),
        workers: dp.handle().workers(),
        udp_allocations,
    };
    let at = turnpike_api::convert::At::of(&turnpike_plane::Clock::new());
    tracing::info!(allocations = rows.len(), "upgrade: handing over");
    tokio::task::spawn_blocking(move || crate::upgrade::start_successor(&header, &rows, socks, at))
        .await?
}

/// `controlplane`: the control plane alone.
pub fn controlplane(mut cfg: Config) -> anyhow::Result<()> {
    runtime(2)?.block_on(async move {
        let mut signals = crate::drain::Signals::new().context("cannot watch signals")?;
        spawn_memory_release();
        let started = start_control_plane(&mut cfg, false, None).await?;
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
                front: None,
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
        crate::notify::notify("READY=1");
        let stop = loop {
            match signals.next().await {
                crate::drain::Stop::Upgrade => {
                    tracing::warn!("SIGUSR2: binary upgrades are for `serve`; not yet for `controlplane`");
                }
                s => break s,
            }
        };
        if stop == crate::drain::Stop::Drain && !cfg.drain_grace.is_zero() {
            crate::drain::drain(&started.cp, cfg.drain_grace, &draining).await;
        }
        crate::leader::resign(&held, &started.cp).await;
        Ok(())
    })
}
