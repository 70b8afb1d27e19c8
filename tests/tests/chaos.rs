//! Chaos on the plane link (issue #19, item 4): split mode across two network namespaces
//! joined by a bad link, 5,000 allocations made across it, and every one of them checked
//! to relay both ways afterwards.
//!
//! ```text
//!   control (C)                                 data (D)
//!   turnpike controlplane                       turnpike dataplane --workers 2, 127.0.0.1:3478
//!   gRPC 10.91.0.1:7443 ── vc ═══ vd ── 10.91.0.2 ── delaying proxy (127.0.0.1) ── its agent
//!                       bad link                 clients 127.0.1.x, peers 127.0.2.x (loopback)
//! ```
//!
//! The link: 1 Mbit/s (tbf on both veth ends), 5 % loss of the plane's TCP segments in
//! both directions (an nftables `numgen` rule in C), and 100 ms each way: this kernel has
//! no netem, so the data plane dials a proxy in D that holds every chunk of the gRPC
//! connection 100 ms in each direction, in order, before passing it on across the link.
//! Segmentation offloads are off on the veth pair, so that a lost "packet" is one segment
//! and not a 64 KiB burst. TURN clients and peers reach the data plane over D's loopback,
//! off the bad link.
//!
//! The flows: 5,000 clients (sans-IO `turnpike_proto::client`), each allocating, then
//! permitting and binding a channel to a peer, with up to [`IN_FLIGHT`] of them under way
//! at once (`TURNPIKE_CHAOS_IN_FLIGHT=N` to change it) and RFC retransmissions. Then every
//! flow sends ChannelData to its peer, which answers through the relay: a bounded number
//! of tries per flow, every failure counted and named. The figures (time to allocate, retransmissions, errors, bytes on the link,
//! relay result) go to stderr (`--nocapture`).
//!
//! Needs root, `ip`, `tc` (tbf), `nft` and `ethtool`; reports `SKIPPED: reason` without
//! them, or fails when `CI` is set.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::netns;
use common::{Certs, Proc};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use turnpike_proto::client::{AllocateOptions, Client, Event};

/// Allocations made across the bad link.
const FLOWS: usize = 5000;
/// Flows setting up at once (each with one transaction outstanding) unless
/// `TURNPIKE_CHAOS_IN_FLIGHT` says otherwise: enough to fill the link (the retransmissions
/// come from its queue), which 5,000 in a row over a 200 ms round trip would not do in
/// many minutes. More turns it into an overload test, where the link's queue outgrows
/// the agent's HTTP/2 keepalive timeout (3 s) or the control plane's bind timeout (5 s).
/// On the code of December 2026, 256 at once passes; 512 at once lost the stream 5 times
/// and left 124 flows that the control plane had answered (Allocate, CreatePermission,
/// ChannelBind all successful) relaying nothing; 1,000 at once got 2,840 508s (late bind
/// acks); 5,000 at once lost the stream and left 43-54 such flows. The proxy's loopback
/// leg may queue more than a real link would, which makes keepalive timeouts likelier.
const IN_FLIGHT: usize = 256;
/// [`IN_FLIGHT`], or `TURNPIKE_CHAOS_IN_FLIGHT`.
fn in_flight() -> usize {
    std::env::var("TURNPIKE_CHAOS_IN_FLIGHT")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(IN_FLIGHT)
        .clamp(1, FLOWS)
}

/// How long all the flows may take to set up (each transaction is bounded by the
/// client's own 7 sends, 63.5 s).
const SETUP_BUDGET: Duration = Duration::from_secs(150);
/// The link's delay, each way.
const DELAY: Duration = Duration::from_millis(100);
/// The link's loss, in percent of segments, each way.
const LOSS_PERCENT: u32 = 5;
/// The link's rate, as tc spells it.
const RATE: &str = "1mbit";

const CONTROL_IP: &str = "10.91.0.1";
const DATA_IP: &str = "10.91.0.2";
/// A fixed port is safe here: C is the test's own namespace, where nothing else listens.
const GRPC_PORT: u16 = 7443;
/// The data plane's TURN address, in D.
const LISTEN: &str = "127.0.0.1:3478";
/// Clients come from 127.0.1.1..=CLIENT_IPS, 100 per address: under the per-IP limit of
/// unauthenticated answers (200/s), which would otherwise throttle the first Allocates.
const CLIENT_IPS: usize = 50;
/// Peers are 127.0.2.1..=PEERS (one socket each), shared by the flows in turn.
const PEERS: usize = 50;
const CHANNEL: u16 = 0x4000;
/// Each plane's metrics, on its own namespace's loopback.
const METRICS: &str = "127.0.0.1:9100";
/// Tries of the relay check per flow, and how long each waits for the answer.
const RELAY_TRIES: u32 = 5;
const RELAY_WAIT: Duration = Duration::from_millis(400);

fn in_ci() -> bool {
    common::etcd::in_ci()
}

/// Why the test cannot run here, if it cannot.
fn unusable() -> Option<String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !root {
        return Some("not root (network namespaces, tc and nft need it)".into());
    }
    ["ip", "tc", "nft", "ethtool"].into_iter().find_map(|tool| {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        (!ok).then(|| format!("{tool} is missing"))
    })
}

/// Open files this process and the data plane (which inherits the limit) need: a socket
/// per client and per relay, with room to spare.
const OPEN_FILES: u64 = 12_000;

/// Raises the soft open-files limit to [`OPEN_FILES`] if it is lower; `Err` when the
/// hard limit does not allow it.
fn raise_open_files() -> Result<(), String> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| e.to_string())?;
    if soft >= OPEN_FILES {
        return Ok(());
    }
    if hard < OPEN_FILES {
        return Err(format!(
            "the open-files limit is {hard}, below the {OPEN_FILES} needed"
        ));
    }
    setrlimit(Resource::RLIMIT_NOFILE, OPEN_FILES, hard).map_err(|e| e.to_string())
}

/// Reports a skip, or fails under CI.
fn skip(why: &str) {
    assert!(!in_ci(), "the chaos test cannot run under CI: {why}");
    eprintln!("SKIPPED: {why}");
}

// ----- the bad link ---------------------------------------------------------------------

/// Namespaces C and D and the bad link between them; removed on drop (also when the
/// test panics), after the processes in them are gone.
struct PlaneLink {
    control: String,
    data: String,
}

/// What the nftables counters in C saw of the plane's TCP connection (IP bytes).
#[derive(Debug, Default)]
struct LinkCounters {
    /// Data plane → control plane: (packets, bytes) that reached C's input hook, and the
    /// packets of them dropped.
    up: (u64, u64),
    up_lost: u64,
    /// Control plane → data plane: (packets, bytes) at C's output hook, and dropped.
    down: (u64, u64),
    down_lost: u64,
}

impl PlaneLink {
    fn new() -> Result<PlaneLink, String> {
        let base = format!("tpc-{}", std::process::id());
        let link = PlaneLink {
            control: format!("{base}-c"),
            data: format!("{base}-d"),
        };
        link.setup()?;
        Ok(link)
    }

    fn setup(&self) -> Result<(), String> {
        let (c, d) = (self.control.as_str(), self.data.as_str());
        netns::run("ip", &["netns", "add", c])?;
        netns::run("ip", &["netns", "add", d])?;
        netns::run(
            "ip",
            &[
                "link", "add", "vc", "netns", c, "type", "veth", "peer", "name", "vd", "netns", d,
            ],
        )?;
        let control_cidr = format!("{CONTROL_IP}/24");
        let data_cidr = format!("{DATA_IP}/24");
        for (ns, args) in [
            (c, vec!["addr", "add", control_cidr.as_str(), "dev", "vc"]),
            (d, vec!["addr", "add", data_cidr.as_str(), "dev", "vd"]),
            (c, vec!["link", "set", "vc", "up"]),
            (d, vec!["link", "set", "vd", "up"]),
            (c, vec!["link", "set", "lo", "up"]),
            (d, vec!["link", "set", "lo", "up"]),
        ] {
            let mut a = vec!["-n", ns];
            a.extend(args);
            netns::run("ip", &a)?;
        }
        for (ns, dev) in [(c, "vc"), (d, "vd")] {
            netns::run(
                "ip",
                &[
                    "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro",
                    "off",
                ],
            )?;
            netns::run(
                "ip",
                &[
                    "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                    RATE, "burst", "32kbit", "latency", "400ms",
                ],
            )?;
        }
        // Counted before the loss rule, so that `up`/`down` see every segment offered.
        let rules = format!(
            "table inet chaos {{
  counter up {{}}
  counter up_lost {{}}
  counter down {{}}
  counter down_lost {{}}
  chain input {{ type filter hook input priority 0; policy accept;
    iifname \"vc\" tcp dport {GRPC_PORT} counter name \"up\"
    iifname \"vc\" tcp dport {GRPC_PORT} numgen random mod 100 < {LOSS_PERCENT} counter name \"up_lost\" drop
  }}
  chain output {{ type filter hook output priority 0; policy accept;
    oifname \"vc\" tcp sport {GRPC_PORT} counter name \"down\"
    oifname \"vc\" tcp sport {GRPC_PORT} numgen random mod 100 < {LOSS_PERCENT} counter name \"down_lost\" drop
  }}
}}
"
        );
        netns::nft(c, &rules)
    }

    /// A command line run in `ns` by `ip netns exec` (which execs it: the child's pid is
    /// the command's).
    fn command(ns: &str, args: &[String]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(common::bin())
            .args(args);
        cmd
    }

    fn counters(&self) -> LinkCounters {
        let read = |name: &str| -> (u64, u64) {
            let out = netns::run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &self.control,
                    "nft",
                    "list",
                    "counter",
                    "inet",
                    "chaos",
                    name,
                ],
            )
            .unwrap_or_default();
            let words: Vec<&str> = out.split_whitespace().collect();
            let after = |key: &str| {
                words
                    .iter()
                    .position(|w| *w == key)
                    .and_then(|i| words.get(i + 1)?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            (after("packets"), after("bytes"))
        };
        LinkCounters {
            up: read("up"),
            up_lost: read("up_lost").0,
            down: read("down"),
            down_lost: read("down_lost").0,
        }
    }
}

impl Drop for PlaneLink {
    fn drop(&mut self) {
        let _ = netns::run("ip", &["netns", "del", &self.control]);
        let _ = netns::run("ip", &["netns", "del", &self.data]);
    }
}

// ----- the delay ------------------------------------------------------------------------

/// A TCP proxy in D that forwards each connection to the control plane, holding every
/// chunk for [`DELAY`] in each direction, in order. Its threads end when it is dropped
/// (every connection is shut down) or when either side closes.
struct DelayProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Both ends of every connection, to shut them down on drop.
    streams: Arc<Mutex<Vec<TcpStream>>>,
    /// Connections accepted (a data plane that reattaches makes a new one).
    accepted: Arc<AtomicU64>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl DelayProxy {
    fn start(ns: &str, upstream: SocketAddr) -> DelayProxy {
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel();
        let ns = ns.to_owned();
        let (stop2, streams2, accepted2) = (stop.clone(), streams.clone(), accepted.clone());
        let accept = std::thread::spawn(move || {
            netns::enter(&ns);
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            while !stop2.load(Ordering::Relaxed) {
                let Ok((down, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                // Dropping `down` on failure closes it: the data plane dials again.
                let Ok(up) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) else {
                    continue;
                };
                down.set_nonblocking(false).unwrap();
                let _ = down.set_nodelay(true);
                let _ = up.set_nodelay(true);
                {
                    let mut s = streams2.lock().unwrap();
                    s.push(down.try_clone().unwrap());
                    s.push(up.try_clone().unwrap());
                }
                pipe(down.try_clone().unwrap(), up.try_clone().unwrap());
                pipe(up, down);
                accepted2.fetch_add(1, Ordering::Relaxed);
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        DelayProxy {
            addr,
            stop,
            streams,
            accepted,
            accept: Some(accept),
        }
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.streams.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
    }
}

/// Copies `from` to `to` on two threads: each chunk is written [`DELAY`] after it was
/// read, in the order read. The queue between them is bounded (64 chunks of at most 16
/// KiB), so that the proxy holds about what a link with this delay would, and a full
/// queue pushes back on the sender as a slow link does.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(64);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + DELAY, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    std::thread::spawn(move || {
        while let Ok((at, chunk)) = rx.recv() {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

// ----- the flows ------------------------------------------------------------------------

/// What one kind of transaction went through, over all flows.
#[derive(Default)]
struct MethodStats {
    transactions: AtomicU64,
    /// Requests sent again after a timeout (the client's RFC 8489 backoff).
    retransmissions: AtomicU64,
    /// 401/438 challenges answered with a new request.
    challenges: AtomicU64,
    /// Transactions that got no answer in the client's 7 sends.
    timeouts: AtomicU64,
    /// Error responses by code.
    errors: Mutex<BTreeMap<u16, u64>>,
}

impl MethodStats {
    fn line(&self, name: &str) -> String {
        let errors = self.errors.lock().unwrap();
        let errors = if errors.is_empty() {
            "none".to_owned()
        } else {
            errors
                .iter()
                .map(|(c, n)| format!("{c}x{n}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        format!(
            "{name:<16} transactions {:>5}, retransmissions {:>5}, challenges {:>5}, timeouts {:>4}, errors {errors}",
            self.transactions.load(Ordering::Relaxed),
            self.retransmissions.load(Ordering::Relaxed),
            self.challenges.load(Ordering::Relaxed),
            self.timeouts.load(Ordering::Relaxed),
        )
    }
}

#[derive(Default)]
struct Stats {
    allocate: MethodStats,
    permission: MethodStats,
    bind: MethodStats,
}

/// One client, its peer, and (once allocated) its relayed address.
struct Flow {
    index: usize,
    sock: UdpSocket,
    client: Client,
    peer: SocketAddr,
    relayed: Option<SocketAddr>,
}

enum Done {
    Allocated(SocketAddr),
    Ok,
    Failed(u16, String),
    TimedOut,
}

impl std::fmt::Display for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Done::Allocated(r) => write!(f, "allocated {r}"),
            Done::Ok => write!(f, "succeeded"),
            Done::Failed(code, reason) => write!(f, "error {code} {reason}"),
            Done::TimedOut => write!(f, "timed out (7 sends)"),
        }
    }
}

fn server() -> SocketAddr {
    LISTEN.parse().unwrap()
}

/// Milliseconds since `start`: the clients' clock.
fn ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

/// Runs the transaction whose first request is `req` to its end: retransmitted when the
/// client's timer says so, re-sent with credentials after a challenge.
async fn transact(flow: &mut Flow, start: Instant, req: &[u8], stats: &MethodStats) -> Done {
    stats.transactions.fetch_add(1, Ordering::Relaxed);
    // A send that fails is a lost datagram: the retransmission timer covers it.
    let _ = flow.sock.send_to(req, server()).await;
    let mut buf = [0u8; 2048];
    let mut out = Vec::new();
    loop {
        let Some(at) = flow.client.poll_timeout() else {
            return Done::Failed(0, "no transaction outstanding".into());
        };
        let wait = Duration::from_millis(at.saturating_sub(ms(start)));
        match tokio::time::timeout(wait, flow.sock.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => match flow.client.handle(ms(start), &buf[..n], &mut out) {
                Event::Retry => {
                    stats.challenges.fetch_add(1, Ordering::Relaxed);
                    let _ = flow.sock.send_to(&out, server()).await;
                }
                Event::Allocated { relayed, .. } => {
                    return match relayed.first() {
                        Some(r) => Done::Allocated(*r),
                        None => Done::Failed(0, "no relayed address".into()),
                    };
                }
                Event::PermissionCreated | Event::ChannelBound { .. } => return Done::Ok,
                Event::Failed { code, reason, .. } => {
                    *stats.errors.lock().unwrap().entry(code).or_default() += 1;
                    return Done::Failed(code, reason);
                }
                Event::TimedOut { .. } => {
                    stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    return Done::TimedOut;
                }
                _ => {}
            },
            // An ICMP error of an earlier send: the timer still bounds the wait.
            Ok(Err(_)) => {}
            Err(_) => match flow.client.handle_timeout(ms(start), &mut out) {
                Event::Retry => {
                    stats.retransmissions.fetch_add(1, Ordering::Relaxed);
                    let _ = flow.sock.send_to(&out, server()).await;
                }
                Event::TimedOut { .. } => {
                    stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    return Done::TimedOut;
                }
                _ => {}
            },
        }
    }
}

/// Allocate, CreatePermission for the flow's peer, ChannelBind of [`CHANNEL`] to it.
async fn set_up(flow: &mut Flow, start: Instant, stats: &Stats) -> Result<(), String> {
    let mut req = Vec::new();
    flow.client
        .allocate(ms(start), AllocateOptions::default(), &mut req)
        .unwrap();
    match transact(flow, start, &req, &stats.allocate).await {
        Done::Allocated(r) => flow.relayed = Some(r),
        other => return Err(format!("Allocate: {other}")),
    }
    let peer = flow.peer;
    flow.client
        .create_permission(ms(start), &[peer], &mut req)
        .unwrap();
    match transact(flow, start, &req, &stats.permission).await {
        Done::Ok => {}
        other => return Err(format!("CreatePermission: {other}")),
    }
    flow.client
        .channel_bind(ms(start), CHANNEL, peer, &mut req)
        .unwrap();
    match transact(flow, start, &req, &stats.bind).await {
        Done::Ok => Ok(()),
        other => Err(format!("ChannelBind: {other}")),
    }
}

/// A peer: answers every `c2p N` from a relay with `p2c N`, and records which flows
/// reached it from the relayed address they were given.
async fn peer(sock: UdpSocket, relayed: Arc<Vec<Option<SocketAddr>>>, reached: Arc<Reached>) {
    let mut buf = [0u8; 2048];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let Some(i) = std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(|s| s.strip_prefix("c2p "))
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|i| *i < FLOWS)
        else {
            continue;
        };
        if relayed[i] == Some(from) {
            reached.flows[i].store(true, Ordering::Relaxed);
        } else {
            reached.strays.fetch_add(1, Ordering::Relaxed);
        }
        let _ = sock.send_to(format!("p2c {i}").as_bytes(), from).await;
    }
}

/// Which flows' ChannelData reached their peer from the right relayed address.
struct Reached {
    flows: Vec<AtomicBool>,
    /// Datagrams that came from another address than the flow's relayed one.
    strays: AtomicU64,
}

/// Sends ChannelData on the flow's channel until the peer's answer comes back, at most
/// [`RELAY_TRIES`] times; the tries it took.
async fn relay_check(flow: &mut Flow, reached: &Reached) -> Result<u32, String> {
    let mut frame = [0u8; 64];
    let n = Client::channel_data(
        CHANNEL,
        format!("c2p {}", flow.index).as_bytes(),
        &mut frame,
    )
    .unwrap();
    let want = format!("p2c {}", flow.index);
    let mut buf = [0u8; 2048];
    let mut out = Vec::new();
    for attempt in 1..=RELAY_TRIES {
        let _ = flow.sock.send_to(&frame[..n], server()).await;
        let deadline = tokio::time::Instant::now() + RELAY_WAIT;
        while let Ok(Ok((len, _))) =
            tokio::time::timeout_at(deadline, flow.sock.recv_from(&mut buf)).await
        {
            if let Event::ChannelData { data, .. } | Event::Data { data, .. } =
                flow.client.handle(0, &buf[..len], &mut out)
                && data == want.as_bytes()
            {
                return Ok(attempt);
            }
        }
    }
    Err(if reached.flows[flow.index].load(Ordering::Relaxed) {
        "set up, but peer→client lost (the peer got the client's data)".into()
    } else {
        "set up, but client→peer lost".into()
    })
}

/// "3, 7-9, 12" for a sorted list of flow numbers.
fn ranges(v: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}-{}", v[i], v[j])
        });
        i = j + 1;
    }
    out.join(", ")
}

/// The sum of the values of the metric lines starting with `name`, scraped from the
/// process whose metrics listen on [`METRICS`] in namespace `ns` (`None`: no answer).
fn metric(ns: &str, name: &str) -> Option<f64> {
    let text = netns::in_ns(ns, || {
        let mut s =
            TcpStream::connect_timeout(&METRICS.parse().unwrap(), Duration::from_secs(3)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        Some(text)
    })?;
    Some(
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// Lines of a process's output seen so far (waits a moment for late ones).
fn drain_lines(p: &mut Proc) -> Vec<String> {
    while let Ok(l) = p.lines.recv_timeout(Duration::from_millis(200)) {
        p.seen.push(l);
    }
    p.seen.clone()
}

#[test]
fn five_thousand_allocations_over_a_bad_plane_link_all_relay() {
    let test_start = Instant::now();
    if let Some(why) = unusable() {
        skip(&why);
        return;
    }
    if let Err(why) = raise_open_files() {
        skip(&why);
        return;
    }
    let link = match PlaneLink::new() {
        Ok(l) => l,
        Err(e) => {
            skip(&format!("the bad link cannot be made here: {e}"));
            return;
        }
    };
    let certs = Certs::new("chaos");
    let grpc: SocketAddr = format!("{CONTROL_IP}:{GRPC_PORT}").parse().unwrap();

    let mut cp_args: Vec<String> = [
        "controlplane",
        "--grpc-listen",
        &grpc.to_string(),
        "--user",
        "u:p",
        "--user-quota",
        "0",
        "--allow-peer",
        "127.0.2.0/24",
        "--relay-ports",
        "20000-40000",
        "--metrics-listen",
        METRICS,
    ]
    .map(String::from)
    .to_vec();
    cp_args.extend(certs.control_plane());
    let spawned = Instant::now();
    let mut cp = Proc::spawn_command(PlaneLink::command(&link.control, &cp_args));
    cp.wait_for("control plane ready", Duration::from_secs(20));

    let proxy = DelayProxy::start(&link.data, grpc);
    let mut dp_args: Vec<String> = [
        "dataplane",
        "--control",
        &format!("https://{}", proxy.addr),
        "--listen",
        LISTEN,
        "--no-tcp",
        "--workers",
        "2",
        "--relay-ports",
        "20000-40000",
        "--metrics-listen",
        METRICS,
    ]
    .map(String::from)
    .to_vec();
    dp_args.extend(certs.data_plane("dp1"));
    let mut dp = Proc::spawn_command(PlaneLink::command(&link.data, &dp_args));
    dp.wait_for("turnpike ready", Duration::from_secs(20));
    dp.wait_for("attached to control plane", Duration::from_secs(30));
    let started = spawned.elapsed();
    let before = link.counters();

    // Every socket is made in D (clients and peers live there, beside the data plane).
    let (client_socks, peer_socks) = netns::in_ns(&link.data, || {
        let bind = |ip: Ipv4Addr| {
            let s = std::net::UdpSocket::bind((ip, 0)).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        };
        let clients: Vec<_> = (0..FLOWS)
            .map(|i| bind(Ipv4Addr::new(127, 0, 1, 1 + (i % CLIENT_IPS) as u8)))
            .collect();
        let peers: Vec<_> = (0..PEERS)
            .map(|i| bind(Ipv4Addr::new(127, 0, 2, 1 + i as u8)))
            .collect();
        (clients, peers)
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let peer_addrs: Vec<SocketAddr> = peer_socks.iter().map(|s| s.local_addr().unwrap()).collect();
    let seed = u64::from(std::process::id()) << 32;
    let flows: Vec<Flow> = client_socks
        .into_iter()
        .enumerate()
        .map(|(index, s)| Flow {
            index,
            sock: UdpSocket::from_std(s).unwrap(),
            client: Client::new("u", "p", seed + index as u64 * 7919),
            peer: peer_addrs[index % PEERS],
            relayed: None,
        })
        .collect();

    // ----- 5,000 allocations across the bad link ---------------------------------------
    let stats = Arc::new(Stats::default());
    let in_flight = in_flight();
    let start = Instant::now();
    let (ready, setup_failed, setup_time) = rt.block_on(async {
        let gate = Arc::new(Semaphore::new(in_flight));
        let mut tasks = tokio::task::JoinSet::new();
        for mut flow in flows {
            let (gate, stats) = (gate.clone(), stats.clone());
            tasks.spawn(async move {
                let _permit = gate.acquire_owned().await.unwrap();
                let r = set_up(&mut flow, start, &stats).await;
                (flow, r)
            });
        }
        let mut ready = Vec::new();
        let mut failed: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let deadline = tokio::time::Instant::now() + SETUP_BUDGET;
        let mut done = vec![false; FLOWS];
        while let Ok(Some(joined)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {
            let (flow, r) = joined.unwrap();
            done[flow.index] = true;
            match r {
                Ok(()) => ready.push(flow),
                Err(why) => failed.entry(why).or_default().push(flow.index),
            }
        }
        tasks.abort_all();
        let unfinished: Vec<usize> = (0..FLOWS).filter(|i| !done[*i]).collect();
        if !unfinished.is_empty() {
            failed.insert(
                format!("set-up unfinished after {SETUP_BUDGET:?}"),
                unfinished,
            );
        }
        (ready, failed, start.elapsed())
    });
    let after = link.counters();
    let set_up_count = ready.len();

    // ----- every relay, both ways -------------------------------------------------------
    let mut relayed = vec![None; FLOWS];
    for f in &ready {
        relayed[f.index] = f.relayed;
    }
    let relayed = Arc::new(relayed);
    let reached = Arc::new(Reached {
        flows: (0..FLOWS).map(|_| AtomicBool::new(false)).collect(),
        strays: AtomicU64::new(0),
    });
    let check_start = Instant::now();
    let (relay_ok, mut failed, retried) = rt.block_on(async {
        let peers: Vec<_> = peer_socks
            .into_iter()
            .map(|s| {
                tokio::spawn(peer(
                    UdpSocket::from_std(s).unwrap(),
                    relayed.clone(),
                    reached.clone(),
                ))
            })
            .collect();
        let gate = Arc::new(Semaphore::new(500));
        let mut tasks = tokio::task::JoinSet::new();
        for mut flow in ready {
            let (gate, reached) = (gate.clone(), reached.clone());
            tasks.spawn(async move {
                let _permit = gate.acquire_owned().await.unwrap();
                (flow.index, relay_check(&mut flow, &reached).await)
            });
        }
        let (mut ok, mut retried) = (0usize, 0usize);
        let mut failed = setup_failed;
        while let Some(joined) = tasks.join_next().await {
            let (index, r) = joined.unwrap();
            match r {
                Ok(tries) => {
                    ok += 1;
                    retried += usize::from(tries > 1);
                }
                Err(why) => failed.entry(why).or_default().push(index),
            }
        }
        for p in peers {
            p.abort();
        }
        (ok, failed, retried)
    });
    let check_time = check_start.elapsed();

    // ----- the figures -----------------------------------------------------------------
    let cp_lines = drain_lines(&mut cp);
    let dp_lines = drain_lines(&mut dp);
    let dropped: u64 = cp_lines
        .iter()
        .filter(|l| l.contains("messages dropped"))
        .map(|l| common::field(l, "dropped").parse::<u64>().unwrap_or(0))
        .sum();
    let dropped_lines = cp_lines
        .iter()
        .filter(|l| l.contains("messages dropped"))
        .count();
    let lost_streams = dp_lines
        .iter()
        .filter(|l| l.contains("control plane stream lost"))
        .count();
    let up_bytes = after.up.1 - before.up.1;
    let down_bytes = after.down.1 - before.down.1;
    let secs = setup_time.as_secs_f64().max(0.001);
    eprintln!("chaos: plane link {RATE}, {LOSS_PERCENT} % loss each way, {DELAY:?} each way");
    eprintln!(
        "chaos: {} of {FLOWS} flows set up (allocation, permission, channel) in {:.1} s, {in_flight} at once",
        set_up_count, secs
    );
    eprintln!("chaos: {}", stats.allocate.line("Allocate"));
    eprintln!("chaos: {}", stats.permission.line("CreatePermission"));
    eprintln!("chaos: {}", stats.bind.line("ChannelBind"));
    eprintln!(
        "chaos: plane link during set-up: up {} segments, {} KiB ({} dropped), down {} segments, {} KiB ({} dropped); {:.0} kbit/s up, {:.0} kbit/s down",
        after.up.0 - before.up.0,
        up_bytes / 1024,
        after.up_lost - before.up_lost,
        after.down.0 - before.down.0,
        down_bytes / 1024,
        after.down_lost - before.down_lost,
        up_bytes as f64 * 8.0 / 1000.0 / secs,
        down_bytes as f64 * 8.0 / 1000.0 / secs,
    );
    eprintln!(
        "chaos: control plane: {dropped} messages dropped for a full data-plane stream ({dropped_lines} warnings); data plane: {lost_streams} streams lost, {} proxy connections",
        proxy.accepted.load(Ordering::Relaxed)
    );
    let m = |ns: &str, name: &str| metric(ns, name).map_or_else(|| "?".into(), |v| v.to_string());
    let c = link.control.as_str();
    eprintln!(
        "chaos: control plane metrics: allocations {}, permissions {}, channels {}; replies shed {}, rate limited {}, stale nonces {}, relay bind failures {}",
        m(c, "turnpike_allocations"),
        m(c, "turnpike_permissions"),
        m(c, "turnpike_channels"),
        m(c, "turnpike_replies_shed_total"),
        m(c, "turnpike_rate_limited_total"),
        m(c, "turnpike_stale_nonces_total"),
        m(c, "turnpike_relay_bind_failures_total"),
    );
    eprintln!(
        "chaos: data plane metrics: punts dropped {}, packets dropped {}",
        m(&link.data, "turnpike_punt_queue_dropped_total"),
        m(&link.data, "turnpike_dropped_packets_total"),
    );
    eprintln!(
        "chaos: the planes started and attached in {:.1} s; the whole test took {:.1} s (with the check that the binary is up to date)",
        started.as_secs_f64(),
        test_start.elapsed().as_secs_f64()
    );
    let failed_count: usize = failed.values().map(Vec::len).sum();
    eprintln!(
        "chaos: relay check in {:.1} s: {relay_ok}/{FLOWS} relayed both ways ({retried} needed more than one try), {} of those set up do not relay, {} datagrams from unexpected relay addresses",
        check_time.as_secs_f64(),
        set_up_count - relay_ok,
        reached.strays.load(Ordering::Relaxed)
    );
    for v in failed.values_mut() {
        v.sort_unstable();
    }
    let report: Vec<String> = failed
        .iter()
        .map(|(why, flows)| format!("{} × {why}: flows {}", flows.len(), ranges(flows)))
        .collect();
    assert!(
        failed_count == 0 && relay_ok == FLOWS,
        "{relay_ok}/{FLOWS} relayed; {failed_count} failed: {}",
        report.join("; ")
    );
}
