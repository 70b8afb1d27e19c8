//! The side-by-side harness: starts turnpike, coturn and the bare forwarder pinned to
//! the server core, drives each from this process pinned to the other core, and writes
//! a markdown report, JSON and SVG charts.
//!
//! Runs are interleaved (for each repetition, size and load, every target in turn) so
//! that ratios compare runs made minutes apart at most; the report quotes medians over
//! the repetitions and medians of the per-repetition ratios.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;
use turnpike_proto::client::{AllocateOptions, Client, Event};

use crate::certs;
use crate::hs;
use crate::proc;
use crate::relay::{self, Mode};
use crate::stream;
use crate::stream::Transport;
use crate::svg::{self, Chart, Series};
use crate::{ServerArgs, check_loopback};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum Suite {
    /// turnpike vs coturn vs the forwarder: load sweep, CPU, latency, allocations/s,
    /// idle memory.
    Coturn,
    /// turnpike's data plane (both backends, ChannelData and Send, GSO on and off) vs
    /// the forwarder, at max load.
    Dataplane,
    /// Allocations per second only: turnpike vs coturn, fresh servers each repetition.
    Alloc,
    /// TURN over TCP and TLS: turnpike vs coturn, relayed packets/s at ≤ 1 % loss
    /// (ChannelData over the stream, UDP peers) and new connections + Allocate per
    /// second.
    Streams,
}

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// Which comparison to run.
    #[arg(long, value_enum, default_value_t = Suite::Coturn)]
    pub suite: Suite,
    /// The turnpike binary (default: next to this one).
    #[arg(long, overrides_with = "turnpike")]
    pub turnpike: Option<PathBuf>,
    /// coturn's server binary.
    #[arg(long, default_value = "turnserver")]
    pub turnserver: PathBuf,
    /// Output directory (the last one given counts).
    #[arg(long, default_value = "bench/out", overrides_with = "out")]
    pub out: PathBuf,
    /// Repetitions (medians are quoted).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 1.2)]
    pub duration: f64,
    /// Warm-up seconds per run.
    #[arg(long, default_value_t = 0.5)]
    pub warmup: f64,
    /// Offered loads, packets/s per direction (0: as fast as possible). Default:
    /// 25000,50000,100000,200000,0 (coturn suite), 100000,200000,0 (dataplane suite).
    #[arg(long, value_delimiter = ',')]
    pub loads: Vec<u64>,
    /// Payload sizes, bytes.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    pub sizes: Vec<usize>,
    /// Flows (allocations) per run.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Packets per flow sent back to back.
    #[arg(long, default_value_t = 8)]
    pub burst: usize,
    /// The equal offered load (packets/s per direction) at which server CPU is compared.
    #[arg(long, default_value_t = 50_000)]
    pub cpu_load: u64,
    /// The core the servers run on.
    #[arg(long, default_value_t = 0)]
    pub server_cpu: usize,
    /// The core the load generator runs on.
    #[arg(long, default_value_t = 1)]
    pub gen_cpu: usize,
    /// Handshakes per allocations/s run.
    #[arg(long, default_value_t = 5000)]
    pub alloc_count: usize,
    /// Idle allocations for the memory figure.
    #[arg(long, default_value_t = 10_000)]
    pub idle_count: usize,
    /// turnpike's I/O backend in the coturn suite.
    #[arg(long, default_value = "uring")]
    pub backend: String,
    /// Wait (polling every 30 s, at most this many seconds) until the 1-minute load
    /// average is below --max-load before starting.
    #[arg(long, default_value_t = 600)]
    pub wait_load_secs: u64,
    /// The load average considered quiet.
    #[arg(long, default_value_t = 0.8)]
    pub max_load: f64,
    /// Less output (no per-run lines).
    #[arg(long)]
    pub quiet: bool,
    /// Most loss per direction (a fraction) of a run that carried its load. Default:
    /// 0.005, and 0.01 with --suite streams.
    #[arg(long)]
    pub max_loss: Option<f64>,
    /// Connections per connection-rate run (streams suite).
    #[arg(long, default_value_t = 5000)]
    pub conn_count: usize,
    /// Connections in flight at once in a connection-rate run (streams suite).
    #[arg(long, default_value_t = 64)]
    pub conn_window: usize,
}

impl CompareArgs {
    fn max_loss(&self) -> f64 {
        self.max_loss.unwrap_or(if self.suite == Suite::Streams {
            0.01
        } else {
            LOSSLESS
        })
    }
}

/// A process started by the harness, stopped when dropped.
pub(crate) struct Proc {
    name: String,
    child: Child,
    pub(crate) pid: u32,
    pub(crate) addr: SocketAddr,
    /// TURN over TCP and over TLS, when the server listens for them.
    pub(crate) tcp: Option<SocketAddr>,
    pub(crate) tls: Option<SocketAddr>,
}

impl Proc {
    /// The server's address for `transport`.
    fn addr_for(&self, transport: Transport) -> Result<SocketAddr> {
        match transport {
            Transport::Udp => Ok(self.addr),
            Transport::Tcp => self
                .tcp
                .with_context(|| format!("{} does not listen on TCP", self.name)),
            Transport::Tls => self
                .tls
                .with_context(|| format!("{} does not listen on TLS", self.name)),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} did not stop on SIGTERM; killing pid {}",
            self.name, self.pid
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback UDP port (bound and released; good enough on a quiet loopback).
fn free_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts `cmd` and waits for a stdout line starting with `ready`, whose
/// `listen=ADDR` names the address.
pub(crate) fn start_with_ready_line(name: &str, mut cmd: Command, ready: &str) -> Result<Proc> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    let pid = child.id();
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    let ready = ready.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with(&ready) {
                let _ = tx.send(line);
            }
        }
    });
    let line = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(l) => l,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{name} did not report ready");
        }
    };
    let field = |k: &str| -> Option<SocketAddr> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|a| a.split(',').next())
            .and_then(|a| a.parse().ok())
    };
    let addr = field("listen=").context("no listen= in the ready line")?;
    Ok(Proc {
        name: name.to_owned(),
        child,
        pid,
        addr,
        tcp: field("tcp="),
        tls: field("tls="),
    })
}

struct Env<'a> {
    a: &'a CompareArgs,
    turnpike: PathBuf,
    me: PathBuf,
    /// The test PKI both servers use for TLS, and the client configuration trusting
    /// it (streams suite).
    pki: Option<certs::TestPki>,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The server command lines used, for the report.
    cmds: RefCell<BTreeMap<String, String>>,
}

impl Env<'_> {
    fn taskset(&self, bin: &Path) -> Command {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(self.a.server_cpu.to_string()).arg(bin);
        c
    }

    fn turnpike(&self, name: &str, backend: &str, ports: &str) -> Result<Proc> {
        self.turnpike_with(name, backend, ports, None)
    }

    /// turnpike, with TCP and TLS listeners on ephemeral loopback ports when `pki`
    /// is given.
    fn turnpike_with(
        &self,
        name: &str,
        backend: &str,
        ports: &str,
        pki: Option<&certs::TestPki>,
    ) -> Result<Proc> {
        let log = std::fs::File::create(self.a.out.join(format!("{name}.log")))?;
        let mut c = self.taskset(&self.turnpike);
        c.args(serve_args(ports))
            .args([
                "--io-backend",
                backend,
                // Every client of the benchmark comes from 127.0.0.1; coturn has no such limit.
                "--unauth-rate",
                "0",
            ])
            .env("RUST_LOG", "warn")
            .stderr(log);
        if let Some(p) = pki {
            // Explicit ports: turnpike refuses two listeners on 127.0.0.1:0 ("listed
            // twice").
            let [tcp, tls] = free_tcp_ports::<2>()?;
            c.arg("--listen-tcp")
                .arg(format!("127.0.0.1:{tcp}"))
                .arg("--listen-tls")
                .arg(format!("127.0.0.1:{tls}"))
                .arg("--tls-cert")
                .arg(&p.cert)
                .arg("--tls-key")
                .arg(&p.key);
        }
        self.note_cmd("turnpike", &c);
        let p = start_with_ready_line(name, c, "turnpike ready:")?;
        if pki.is_some() && (p.tcp.is_none() || p.tls.is_none()) {
            bail!("{name} reported no TCP or TLS listener; see its log");
        }
        Ok(p)
    }

    fn note_cmd(&self, key: &str, c: &Command) {
        let line = std::iter::once(c.get_program())
            .chain(c.get_args())
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        self.cmds.borrow_mut().insert(key.to_owned(), line);
    }

    fn coturn(&self, name: &str, ports: (u16, u16)) -> Result<Proc> {
        self.coturn_with(name, ports, None)
    }

    /// coturn, with TCP on its listening port and TLS on another when `pki` is given
    /// (otherwise TCP and TLS are off).
    fn coturn_with(
        &self,
        name: &str,
        ports: (u16, u16),
        pki: Option<&certs::TestPki>,
    ) -> Result<Proc> {
        let port = free_port()?;
        let log = self.a.out.join(format!("{name}.log"));
        let pidfile = self.a.out.join(format!("{name}.pid"));
        let mut c = self.taskset(&self.a.turnserver);
        c.args([
            "-n",
            "--listening-ip",
            "127.0.0.1",
            "--relay-ip",
            "127.0.0.1",
        ])
        .arg("--listening-port")
        .arg(port.to_string())
        .arg("--min-port")
        .arg(ports.0.to_string())
        .arg("--max-port")
        .arg(ports.1.to_string())
        .args([
            "--realm",
            "bench",
            "--user",
            "bench:bench",
            "--lt-cred-mech",
            "--allow-loopback-peers",
            "--no-cli",
            "--no-dtls",
            "--no-tcp-relay",
            "--relay-threads=1",
            "--simple-log",
            "--no-stdout-log",
        ]);
        let tls_port = match pki {
            Some(p) => {
                let [tls_port] = free_tcp_ports::<1>()?;
                c.arg("--tls-listening-port")
                    .arg(tls_port.to_string())
                    .arg("--cert")
                    .arg(&p.cert)
                    .arg("--pkey")
                    .arg(&p.key);
                Some(tls_port)
            }
            None => {
                c.args(["--no-tls", "--no-tcp"]);
                None
            }
        };
        c.arg("--log-file")
            .arg(&log)
            .arg("--pidfile")
            .arg(&pidfile)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.note_cmd("coturn", &c);
        let child = c.spawn().context("cannot start coturn (turnserver)")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let p = Proc {
            name: name.to_owned(),
            pid: child.id(),
            child,
            addr,
            tcp: tls_port.map(|_| addr),
            tls: tls_port.map(|t| SocketAddr::from(([127, 0, 0, 1], t))),
        };
        wait_turn_ready(addr, Duration::from_secs(15))
            .with_context(|| format!("coturn did not answer; see {}", log.display()))?;
        for a in [p.tcp, p.tls].into_iter().flatten() {
            wait_tcp_listening(a, Duration::from_secs(15))
                .with_context(|| format!("coturn does not listen on {a}; see {}", log.display()))?;
        }
        Ok(p)
    }

    fn forwarder(&self, name: &str, to: SocketAddr, gso: bool) -> Result<Proc> {
        let mut c = self.taskset(&self.me);
        c.args([
            "forwarder",
            "--listen",
            "127.0.0.1:0",
            "--max-seconds",
            "1800",
        ])
        .arg("--to")
        .arg(to.to_string());
        if gso {
            c.arg("--gso");
        }
        start_with_ready_line(name, c, "forwarder ready:")
    }
}

/// `N` distinct free loopback TCP ports (bound together, then released).
fn free_tcp_ports<const N: usize>() -> Result<[u16; N]> {
    let ls = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut ports = [0u16; N];
    for (p, l) in ports.iter_mut().zip(&ls) {
        *p = l.local_addr()?.port();
    }
    Ok(ports)
}

/// Connects until `addr` accepts a TCP connection.
fn wait_tcp_listening(addr: SocketAddr, limit: Duration) -> Result<()> {
    check_loopback(addr)?;
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on {addr}")
}

/// Sends Allocates until one is answered (a 401 challenge).
fn wait_turn_ready(addr: SocketAddr, limit: Duration) -> Result<()> {
    check_loopback(addr)?;
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.connect(addr)?;
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    let t0 = Instant::now();
    let mut c = Client::new("probe", "probe", 1);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 2048];
    while t0.elapsed() < limit {
        c.allocate(
            t0.elapsed().as_millis() as u64,
            AllocateOptions::default(),
            &mut out,
        )?;
        let _ = s.send(&out);
        if let Ok(n) = s.recv(&mut buf) {
            let ev = c.handle(t0.elapsed().as_millis() as u64, &buf[..n], &mut out);
            if matches!(ev, Event::Retry | Event::Failed { .. }) {
                return Ok(());
            }
        }
    }
    bail!("no answer from {addr}")
}

/// What a run drives.
#[derive(Debug, Clone, Copy)]
struct Target {
    key: &'static str,
    label: &'static str,
    server: &'static str,
    mode: Mode,
    alternate: bool,
    transport: Transport,
}

const fn t(
    key: &'static str,
    label: &'static str,
    server: &'static str,
    mode: Mode,
    alternate: bool,
) -> Target {
    Target {
        key,
        label,
        server,
        mode,
        alternate,
        transport: Transport::Udp,
    }
}

/// A ChannelData target with clients over a stream.
const fn ts(
    key: &'static str,
    label: &'static str,
    server: &'static str,
    transport: Transport,
) -> Target {
    Target {
        key,
        label,
        server,
        mode: Mode::Channel,
        alternate: false,
        transport,
    }
}

/// Most run-queue wait (share of the window) of the generator's thread in a clean
/// run: it is alone on its core, so any wait means another task was there.
const MAX_RQ_WAIT: f64 = 0.03;
/// Most run-queue wait of the server's threads in a clean run. A saturated server
/// makes its own idle threads (control plane, timers) wait behind its busy one, so
/// only a larger share means another task.
const MAX_SERVER_RQ_WAIT: f64 = 0.15;

/// Whether another task competed for the server's or the generator's core.
fn contended(r: &relay::Report) -> bool {
    r.generator_rq_wait > MAX_RQ_WAIT || r.server_rq_wait > MAX_SERVER_RQ_WAIT
}
/// Attempts at a run before a contended one is kept.
const MAX_ATTEMPTS: usize = 4;
/// Pause before measuring a contended run again.
const RETRY_PAUSE: Duration = Duration::from_secs(15);

/// One run's record.
#[derive(Debug, Clone, Serialize)]
struct Run {
    phase: &'static str,
    rep: usize,
    target: &'static str,
    size: usize,
    offered: u64,
    load1: f64,
    /// Measurements made (more than one when others competed for a core).
    attempts: usize,
    report: relay::Report,
}

#[derive(Debug, Clone, Serialize)]
struct RepValue<T> {
    rep: usize,
    server: &'static str,
    value: T,
}

#[derive(Debug, Default, Serialize)]
struct Output {
    suite: Option<Suite>,
    date: String,
    machine: String,
    load_before: f64,
    load_after: f64,
    settings: BTreeMap<String, String>,
    runs: Vec<Run>,
    capacity: Vec<Capacity>,
    alloc: Vec<RepValue<hs::AllocReport>>,
    idle: Vec<RepValue<hs::IdleReport>>,
    conns: Vec<RepValue<stream::ConnReport>>,
}

/// The median of the finite values of `v` (the mean of the middle two for an even count).
pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_default();
    format!(
        "{} CPUs ({model}), {}, Linux {}",
        sh("nproc", &[]),
        sh("sh", &["-c", "free -g | awk '/Mem:/ {print $2 \" GiB\"}'"]),
        sh("uname", &["-r"])
    )
}

fn wait_quiet(a: &CompareArgs) -> f64 {
    let t0 = Instant::now();
    loop {
        let l = proc::loadavg();
        if l <= a.max_load || t0.elapsed() >= Duration::from_secs(a.wait_load_secs) {
            eprintln!("load average {l:.2} (waited {} s)", t0.elapsed().as_secs());
            return l;
        }
        eprintln!("load average {l:.2} > {}: waiting 30 s", a.max_load);
        std::thread::sleep(Duration::from_secs(30));
    }
}

pub fn run(a: &CompareArgs) -> Result<()> {
    let mut a = a.clone();
    if a.loads.is_empty() {
        a.loads = match a.suite {
            Suite::Coturn => vec![25_000, 50_000, 100_000, 200_000, 0],
            Suite::Dataplane | Suite::Alloc => vec![100_000, 200_000, 0],
            Suite::Streams => vec![25_000, 50_000, 100_000, 200_000, 0],
        };
    }
    let a = &a;
    proc::raise_nofile()?;
    std::fs::create_dir_all(&a.out)?;
    let me = std::env::current_exe()?;
    let turnpike = match &a.turnpike {
        Some(p) => p.clone(),
        None => me.with_file_name("turnpike"),
    };
    if !turnpike.exists() {
        bail!(
            "no turnpike binary at {} (build it with cargo build --release -p turnpike, or pass --turnpike)",
            turnpike.display()
        );
    }
    let (pki, tls) = if a.suite == Suite::Streams {
        let p = certs::make(&a.out.join("pki"))?;
        // Pinned, without the handshake signature check: see pinned_client_config.
        let c = certs::pinned_client_config(&p.cert)?;
        (Some(p), Some(c))
    } else {
        (None, None)
    };
    let env = Env {
        a,
        turnpike,
        me: me.clone(),
        pki,
        tls,
        cmds: RefCell::new(BTreeMap::new()),
    };
    let mut o = Output {
        suite: Some(a.suite),
        machine: machine(),
        ..Output::default()
    };
    o.load_before = wait_quiet(a);
    o.date = sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    for (k, v) in [
        ("reps", a.reps.to_string()),
        ("duration_s", a.duration.to_string()),
        ("warmup_s", a.warmup.to_string()),
        ("clients", a.clients.to_string()),
        ("burst", a.burst.to_string()),
        ("server_cpu", a.server_cpu.to_string()),
        ("gen_cpu", a.gen_cpu.to_string()),
        ("backend", a.backend.clone()),
        (
            "coturn",
            sh(&a.turnserver.to_string_lossy(), &["--version"]),
        ),
        ("rustc", sh("rustc", &["--version"])),
    ] {
        o.settings.insert(k.to_owned(), v);
    }
    // The generator (this thread) on its core; servers are started with taskset.
    proc::pin_to(a.gen_cpu)?;
    let t0 = Instant::now();
    let name = match a.suite {
        Suite::Coturn => {
            coturn_suite(&env, &mut o)?;
            "compare"
        }
        Suite::Dataplane => {
            dataplane_suite(&env, &mut o)?;
            "dataplane"
        }
        Suite::Alloc => {
            alloc_runs(&env, &mut o)?;
            "alloc"
        }
        Suite::Streams => {
            streams_suite(&env, &mut o)?;
            "streams"
        }
    };
    for (k, v) in env.cmds.borrow().iter() {
        o.settings.insert(format!("{k}_cmd"), v.clone());
    }
    o.load_after = proc::loadavg();
    eprintln!("done in {:.0} s", t0.elapsed().as_secs_f64());
    let json = a.out.join(format!("{name}.json"));
    std::fs::write(&json, serde_json::to_string_pretty(&o)?)?;
    let md = match a.suite {
        Suite::Coturn => coturn_markdown(a, &o),
        Suite::Dataplane => dataplane_markdown(a, &o),
        Suite::Alloc => alloc_markdown(a, &o),
        Suite::Streams => streams_markdown(a, &o),
    };
    let mdp = a.out.join(format!("{name}.md"));
    std::fs::write(&mdp, &md)?;
    println!("{md}");
    eprintln!("wrote {} and {}", json.display(), mdp.display());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn one_run(
    env: &Env<'_>,
    o: &mut Output,
    phase: &'static str,
    rep: usize,
    tg: &Target,
    srv: &Proc,
    peer: Option<SocketAddr>,
    size: usize,
    offered: u64,
) -> Result<Option<relay::Report>> {
    let a = env.a;
    let cfg = relay::Config {
        source: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        server: ServerArgs {
            server: srv.addr_for(tg.transport)?,
            user: "bench".into(),
            password: "bench".into(),
            realm: "bench".into(),
        },
        mode: tg.mode,
        transport: tg.transport,
        tls: if tg.transport == Transport::Tls {
            env.tls.clone()
        } else {
            None
        },
        clients: a.clients,
        hairpin: false,
        size,
        alternate: tg.alternate,
        rate: offered,
        duration: Duration::from_secs_f64(a.duration),
        warmup: Duration::from_secs_f64(a.warmup),
        burst: a.burst,
        peer: peer.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
        gen_gso: true,
        gro: true,
        buffer: 8 << 20,
        server_pid: Some(srv.pid),
        server_cpu: a.server_cpu,
        gen_cpu: Some(a.gen_cpu),
        progress: false,
        nap: Duration::ZERO,
        label: tg.key.to_owned(),
    };
    let load1 = proc::loadavg();
    // A run during which something else competed for the server's or the generator's
    // core is measured again, after a pause (bounded).
    let mut attempt = 0;
    let r = loop {
        attempt += 1;
        let r = match relay::run(&cfg) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{} {size}B {offered}: failed: {e:#}", tg.key);
                return Ok(None);
            }
        };
        let busy = r.server_rq_wait.max(r.generator_rq_wait);
        if !contended(&r) || attempt >= MAX_ATTEMPTS {
            break r;
        }
        eprintln!(
            "{} {size}B {offered}: run-queue wait {:.0}% (server {:.0}%, generator {:.0}%): another task shared a core; again in {} s",
            tg.key,
            busy * 100.0,
            r.server_rq_wait * 100.0,
            r.generator_rq_wait * 100.0,
            RETRY_PAUSE.as_secs()
        );
        std::thread::sleep(RETRY_PAUSE);
    };
    if !a.quiet {
        eprintln!("rep {rep} {}", r.summary());
    }
    o.runs.push(Run {
        phase,
        rep,
        target: tg.key,
        size,
        offered,
        load1,
        attempts: attempt,
        report: r.clone(),
    });
    Ok(Some(r))
}

const TP_CD: Target = t(
    "turnpike-cd",
    "turnpike ChannelData",
    "turnpike",
    Mode::Channel,
    false,
);
const TP_CD_NOGSO: Target = t(
    "turnpike-cd-nogso",
    "turnpike ChannelData, no GSO",
    "turnpike",
    Mode::Channel,
    true,
);
const TP_SI: Target = t(
    "turnpike-si",
    "turnpike Send ind.",
    "turnpike",
    Mode::Indication,
    false,
);
const CO_CD: Target = t(
    "coturn-cd",
    "coturn ChannelData",
    "coturn",
    Mode::Channel,
    false,
);
const CO_SI: Target = t(
    "coturn-si",
    "coturn Send ind.",
    "coturn",
    Mode::Indication,
    false,
);
const FWD: Target = t("fwd", "forwarder", "fwd", Mode::Forwarder, true);
const FWD_GSO: Target = t(
    "fwd-gso",
    "forwarder + GSO",
    "fwd-gso",
    Mode::Forwarder,
    false,
);

fn coturn_suite(env: &Env<'_>, o: &mut Output) -> Result<()> {
    let a = env.a;
    let peer_fwd = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let peer_fwd_gso = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    {
        let tp = env.turnpike("turnpike", &a.backend, "10000-20999")?;
        let co = env.coturn("coturn", (21000, 31999))?;
        let fwd = env.forwarder("forwarder", peer_fwd, false)?;
        let fwd_gso = env.forwarder("forwarder-gso", peer_fwd_gso, true)?;
        let pick = |s: &str| -> (&Proc, Option<SocketAddr>) {
            match s {
                "turnpike" => (&tp, None),
                "coturn" => (&co, None),
                "fwd" => (&fwd, Some(peer_fwd)),
                _ => (&fwd_gso, Some(peer_fwd_gso)),
            }
        };
        let full = [TP_CD, TP_CD_NOGSO, CO_CD, FWD];
        for rep in 1..=a.reps {
            for &size in &a.sizes {
                for &load in &a.loads {
                    let mut targets: Vec<Target> = full.to_vec();
                    if load == 0 {
                        targets.extend([TP_SI, CO_SI, FWD_GSO]);
                    } else if load == a.cpu_load {
                        targets.extend([TP_SI, CO_SI]);
                    }
                    for tg in &targets {
                        let (srv, peer) = pick(tg.server);
                        one_run(env, o, "sweep", rep, tg, srv, peer, size, load)?;
                    }
                }
            }
        }
        // Lossless capacity of the main targets, bracketed by the sweep, then bisected.
        for rep in 1..=a.reps {
            for &size in &a.sizes {
                for tg in CAP_TARGETS {
                    let (srv, peer) = pick(tg.server);
                    let c = capacity(env, o, rep, &tg, srv, peer, size)?;
                    eprintln!(
                        "rep {rep} {} {size}B: capacity {:.0}k/dir ({})",
                        tg.key,
                        c.pps as f64 / 1000.0,
                        c.bound
                    );
                    o.capacity.push(c);
                }
            }
        }
        // Latency at half of coturn's lossless capacity (median over repetitions).
        for rep in 1..=a.reps {
            for &size in &a.sizes {
                let cap = cap_median(o, CO_CD.key, size).unwrap_or(0.0);
                let half = ((cap / 2.0) / 1000.0).round() as u64 * 1000;
                if half == 0 {
                    continue;
                }
                for tg in [TP_CD, CO_CD, TP_SI, CO_SI] {
                    let (srv, peer) = pick(tg.server);
                    one_run(env, o, "half", rep, &tg, srv, peer, size, half)?;
                }
            }
        }
    }
    alloc_runs(env, o)?;
    // Idle memory, once per server (it varies little between runs).
    for srv in ["turnpike", "coturn"] {
        let p = if srv == "turnpike" {
            env.turnpike("turnpike-idle", &a.backend, "10000-31999")?
        } else {
            env.coturn("coturn-idle", (10000, 31999))?
        };
        std::thread::sleep(Duration::from_millis(500));
        let server = ServerArgs {
            server: p.addr,
            user: "bench".into(),
            password: "bench".into(),
            realm: "bench".into(),
        };
        let r = hs::idle_rss(
            &server,
            p.pid,
            a.idle_count,
            256,
            Duration::from_secs(1),
            Duration::from_secs(60),
        )?;
        eprintln!("{srv}: {}", r.summary());
        o.idle.push(RepValue {
            rep: 1,
            server: if srv == "turnpike" {
                "turnpike"
            } else {
                "coturn"
            },
            value: r,
        });
    }
    Ok(())
}

/// Targets whose lossless capacity is searched.
const CAP_TARGETS: [Target; 4] = [TP_CD, TP_CD_NOGSO, CO_CD, FWD];
/// Most loss (each direction) of a run that counts as lossless.
const LOSSLESS: f64 = 0.005;
/// Bisection probes after the bracket.
const PROBES: usize = 3;

/// The highest offered load (packets/s per direction) a target carried without loss.
#[derive(Debug, Clone, Serialize)]
struct Capacity {
    rep: usize,
    target: &'static str,
    size: usize,
    pps: u64,
    /// "server": a higher probe lost packets at the server; "generator": the generator
    /// could not offer more, so this is a lower bound.
    bound: &'static str,
}

/// Whether a run carried its offered load: both directions offered in full (or the
/// generator is the limit) and delivered with at most [`LOSSLESS`] loss.
///
/// Over a stream the generator cannot lose what it sends up, but the server can stop
/// reading: a shortfall caused by the connection's full backlog is the server's, and a
/// run whose window delivered less than it sent (by more than `max_loss`) did not keep
/// up even if the drain after it caught up.
fn verdict_of(r: &relay::Report, max_loss: f64) -> (bool, bool) {
    let offered = r.offered_pps as f64;
    let offered_ok = r.up.sent_pps >= 0.97 * offered && r.down.sent_pps >= 0.97 * offered;
    let lossless = r.up.loss <= max_loss && r.down.loss <= max_loss;
    match &r.stream {
        None => (lossless, offered_ok),
        Some(st) => {
            let kept_up = r.up.delivered_pps >= (1.0 - max_loss) * r.up.sent_pps
                && r.down.delivered_pps >= (1.0 - max_loss) * r.down.sent_pps;
            let backpressure = st.blocked_bursts > 0;
            (
                offered_ok && lossless && kept_up && st.closed == 0,
                offered_ok || backpressure,
            )
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn capacity(
    env: &Env<'_>,
    o: &mut Output,
    rep: usize,
    tg: &Target,
    srv: &Proc,
    peer: Option<SocketAddr>,
    size: usize,
) -> Result<Capacity> {
    let sweep: Vec<relay::Report> = o
        .runs
        .iter()
        .filter(|r| r.phase == "sweep" && r.rep == rep && r.target == tg.key && r.size == size)
        .map(|r| r.report.clone())
        .collect();
    let mut lo = 0u64;
    let mut hi: Option<u64> = None;
    let mut gen_ceiling = u64::MAX;
    for r in &sweep {
        if r.offered_pps == 0 {
            // As fast as possible: what the generator managed to offer.
            gen_ceiling = r.up.sent_pps.min(r.down.sent_pps) as u64;
            continue;
        }
        let (lossless, gen_ok) = verdict_of(r, env.a.max_loss());
        if lossless && gen_ok {
            lo = lo.max(r.offered_pps);
        } else if gen_ok {
            hi = Some(hi.map_or(r.offered_pps, |h| h.min(r.offered_pps)));
        }
    }
    // Why the current upper bound failed.
    let mut bound = "server";
    let mut hi = match hi {
        Some(h) => h,
        None => {
            // Nothing failed in the sweep: try the most the generator offered.
            let top = (gen_ceiling / 1000 * 1000).max(lo + 1000);
            if let Some(r) = one_run(env, o, "capacity", rep, tg, srv, peer, size, top)? {
                let (lossless, gen_ok) = verdict_of(&r, env.a.max_loss());
                if lossless && gen_ok {
                    return Ok(Capacity {
                        rep,
                        target: tg.key,
                        size,
                        pps: top,
                        bound: "generator",
                    });
                }
                if !gen_ok {
                    bound = "generator";
                }
            }
            top
        }
    };
    let probes = if env.a.suite == Suite::Streams {
        PROBES + 1
    } else {
        PROBES
    };
    for _ in 0..probes {
        let mid = ((lo + hi) / 2) / 1000 * 1000;
        if mid <= lo || mid >= hi {
            break;
        }
        let Some(r) = one_run(env, o, "capacity", rep, tg, srv, peer, size, mid)? else {
            break;
        };
        let (lossless, gen_ok) = verdict_of(&r, env.a.max_loss());
        if !gen_ok {
            bound = "generator";
            hi = mid;
        } else if lossless {
            lo = mid;
        } else {
            bound = "server";
            hi = mid;
        }
    }
    Ok(Capacity {
        rep,
        target: tg.key,
        size,
        pps: lo,
        bound,
    })
}

fn cap_median(o: &Output, target: &str, size: usize) -> Option<f64> {
    median(
        o.capacity
            .iter()
            .filter(|c| c.target == target && c.size == size)
            .map(|c| c.pps as f64)
            .collect(),
    )
}

/// Median over repetitions of the ratio of two targets' capacities.
fn cap_ratio(o: &Output, num: &str, den: &str, size: usize) -> Option<f64> {
    median(
        o.capacity
            .iter()
            .filter(|c| c.target == num && c.size == size)
            .filter_map(|n| {
                o.capacity
                    .iter()
                    .find(|d| d.target == den && d.size == size && d.rep == n.rep)
                    .map(|d| n.pps as f64 / d.pps as f64)
            })
            .collect(),
    )
}

fn runs<'a>(
    o: &'a Output,
    phase: &'a str,
    target: &'a str,
    size: usize,
    offered: u64,
) -> impl Iterator<Item = &'a Run> + 'a {
    o.runs.iter().filter(move |r| {
        r.phase == phase && r.target == target && r.size == size && r.offered == offered
    })
}

/// Median over repetitions of a figure of one target.
fn med(
    o: &Output,
    phase: &str,
    target: &str,
    size: usize,
    offered: u64,
    f: fn(&Run) -> f64,
) -> Option<f64> {
    median(runs(o, phase, target, size, offered).map(f).collect())
}

/// Median over repetitions of the ratio of a figure between two targets in the same
/// repetition.
#[allow(clippy::too_many_arguments)]
fn ratio(
    o: &Output,
    phase: &str,
    num: &str,
    den: &str,
    size: usize,
    offered: u64,
    f: fn(&Run) -> f64,
) -> Option<f64> {
    let v: Vec<f64> = runs(o, phase, num, size, offered)
        .filter_map(|n| {
            runs(o, phase, den, size, offered)
                .find(|d| d.rep == n.rep)
                .map(|d| f(n) / f(d))
        })
        .collect();
    median(v)
}

fn fmt_pps(v: Option<f64>) -> String {
    v.map(|x| format!("{:.0}k", x / 1000.0))
        .unwrap_or_else(|| "–".into())
}

fn fmt_f(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

fn load_label(l: u64) -> String {
    if l == 0 {
        "max".into()
    } else {
        format!("{}k", l / 1000)
    }
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "–",
    }
}

fn delivered(r: &Run) -> f64 {
    r.report.delivered_pps
}
fn cpu(r: &Run) -> f64 {
    r.report.server_cpu_cores.unwrap_or(f64::NAN)
}
fn p50(r: &Run) -> f64 {
    r.report.p50_us
}
fn p99(r: &Run) -> f64 {
    r.report.p99_us
}
fn loss(r: &Run) -> f64 {
    (r.report.up.loss + r.report.down.loss) / 2.0
}

fn header(a: &CompareArgs, o: &Output, title: &str, cmd: &str) -> String {
    let repeated = o.runs.iter().filter(|r| r.attempts > 1).count();
    let contended = o.runs.iter().filter(|r| contended(&r.report)).count();
    let wait = median(
        o.runs
            .iter()
            .map(|r| r.report.server_rq_wait.max(r.report.generator_rq_wait))
            .collect(),
    )
    .unwrap_or(0.0);
    format!(
        "{}- Interference: {} runs; {repeated} were measured again because another task shared a core (run-queue wait of the generator's thread above {:.0}% of the window, or of the server's threads above {:.0}%), {contended} kept contended after {MAX_ATTEMPTS} attempts; median run-queue wait {:.1}%.\n",
        header_base(a, o, title, cmd),
        o.runs.len(),
        MAX_RQ_WAIT * 100.0,
        MAX_SERVER_RQ_WAIT * 100.0,
        wait * 100.0
    )
}

fn header_base(a: &CompareArgs, o: &Output, title: &str, cmd: &str) -> String {
    format!(
        "# {title}\n\n- Command: `{cmd}`\n- Date: {}\n- Machine: {}\n- Load average (1 min) before: {:.2}, after: {:.2}\n- Servers pinned to cpu {} (taskset), the generator to cpu {}; {} flows (allocations), bursts of {} packets per flow, {} s measured after {} s warm-up, {} repetitions interleaved; medians quoted, ratios are medians of per-repetition ratios.\n- coturn {}; {}\n",
        o.date,
        o.machine,
        o.load_before,
        o.load_after,
        a.server_cpu,
        a.gen_cpu,
        a.clients,
        a.burst,
        a.duration,
        a.warmup,
        a.reps,
        o.settings.get("coturn").cloned().unwrap_or_default(),
        o.settings.get("rustc").cloned().unwrap_or_default(),
    )
}

fn coturn_markdown(a: &CompareArgs, o: &Output) -> String {
    let mut m = header(
        a,
        o,
        "turnpike vs coturn vs the bare forwarder",
        "bench/compare.sh",
    );
    let all = [TP_CD, TP_CD_NOGSO, TP_SI, CO_CD, CO_SI, FWD, FWD_GSO];
    m.push_str("\nTargets: ");
    m.push_str(
        &all.iter()
            .map(|t| format!("`{}` = {}", t.key, t.label))
            .collect::<Vec<_>>()
            .join("; "),
    );
    m.push_str(". \"no GSO\" alternates payload sizes SIZE and SIZE+4 so the server never sees two equal-size datagrams in a row (turnpike has no switch to turn GSO off); the plain forwarder is driven with the same pattern.\n");
    for &size in &a.sizes {
        m.push_str(&format!(
            "\n## Delivered packets/s per direction, {size}-byte payload (median)\n\n| offered/dir |"
        ));
        let cols = [TP_CD, TP_CD_NOGSO, TP_SI, CO_CD, CO_SI, FWD, FWD_GSO];
        for c in &cols {
            m.push_str(&format!(" {} |", c.key));
        }
        m.push_str(" loss tp-cd / coturn-cd |\n|---|");
        for _ in &cols {
            m.push_str("---:|");
        }
        m.push_str("---:|\n");
        for &l in &a.loads {
            m.push_str(&format!("| {} |", load_label(l)));
            for c in &cols {
                m.push_str(&format!(
                    " {} |",
                    fmt_pps(med(o, "sweep", c.key, size, l, delivered))
                ));
            }
            m.push_str(&format!(
                " {}% / {}% |\n",
                fmt_f(
                    med(o, "sweep", TP_CD.key, size, l, loss).map(|x| x * 100.0),
                    2
                ),
                fmt_f(
                    med(o, "sweep", CO_CD.key, size, l, loss).map(|x| x * 100.0),
                    2
                )
            ));
        }
        // Details at max load.
        m.push_str(&format!(
            "\nAt max load, {size} B: | target | delivered/dir | up / down | p50 µs | p99 µs | server CPU (cores) | server core busy | server GSO share (down) | drops at server / generator sockets |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        ));
        for c in &cols {
            let rs: Vec<&Run> = runs(o, "sweep", c.key, size, 0).collect();
            if rs.is_empty() {
                continue;
            }
            let mf = |f: fn(&Run) -> f64| median(rs.iter().map(|r| f(r)).collect());
            m.push_str(&format!(
                "| {} | {} | {} / {} | {} | {} | {} | {}% | {}% | {} / {} |\n",
                c.key,
                fmt_pps(mf(delivered)),
                fmt_pps(mf(|r| r.report.up.delivered_pps)),
                fmt_pps(mf(|r| r.report.down.delivered_pps)),
                fmt_f(mf(p50), 0),
                fmt_f(mf(p99), 0),
                fmt_f(mf(cpu), 2),
                fmt_f(mf(|r| r.report.server_core_busy * 100.0), 0),
                fmt_f(mf(|r| r.report.down.coalesced * 100.0), 0),
                fmt_f(mf(|r| r.report.server_socket_drops as f64), 0),
                fmt_f(mf(|r| r.report.generator_socket_drops as f64), 0),
            ));
        }
    }

    // Lossless capacity per repetition.
    m.push_str(&format!(
        "\n## Lossless capacity (highest offered packets/s per direction with ≤ {}% loss each way)\n\n| target | payload | per repetition | median |\n|---|---|---|---:|\n",
        LOSSLESS * 100.0
    ));
    for &size in &a.sizes {
        for tg in CAP_TARGETS {
            let per: Vec<String> = o
                .capacity
                .iter()
                .filter(|c| c.target == tg.key && c.size == size)
                .map(|c| {
                    format!(
                        "{:.0}k{}",
                        c.pps as f64 / 1000.0,
                        if c.bound == "generator" { " (gen)" } else { "" }
                    )
                })
                .collect();
            m.push_str(&format!(
                "| {} | {size} B | {} | {} |\n",
                tg.key,
                per.join(", "),
                fmt_pps(cap_median(o, tg.key, size))
            ));
        }
    }
    m.push_str("\n\"(gen)\": the generator could not offer more without loss at its own sockets or in its loop, so the figure is a lower bound.\n");
    // The five figures and the targets.
    m.push_str("\n## Figures against the targets\n\n| figure | payload | turnpike | coturn / reference | ratio (median of per-run ratios) | target | verdict |\n|---|---|---:|---:|---:|---|---|\n");
    for &size in &a.sizes {
        let row = |m: &mut String,
                   name: &str,
                   num: &Target,
                   den: &Target,
                   f: fn(&Run) -> f64,
                   load: u64,
                   target: &str,
                   ok: fn(f64) -> bool,
                   fmtv: fn(Option<f64>) -> String| {
            let r = ratio(o, "sweep", num.key, den.key, size, load, f);
            m.push_str(&format!(
                "| {name} | {size} B | {} | {} | {} | {target} | {} |\n",
                fmtv(med(o, "sweep", num.key, size, load, f)),
                fmtv(med(o, "sweep", den.key, size, load, f)),
                fmt_f(r, 2),
                verdict(r.map(ok))
            ));
        };
        let cap_row = |m: &mut String,
                       name: &str,
                       num: &Target,
                       den: &Target,
                       target: &str,
                       ok: fn(f64) -> bool| {
            let r = cap_ratio(o, num.key, den.key, size);
            let bound = |k: &str| {
                if o.capacity
                    .iter()
                    .any(|c| c.target == k && c.size == size && c.bound == "generator")
                {
                    " (≥, generator-bound)"
                } else {
                    ""
                }
            };
            m.push_str(&format!(
                "| {name} | {size} B | {}{} | {}{} | {} | {target} | {} |\n",
                fmt_pps(cap_median(o, num.key, size)),
                bound(num.key),
                fmt_pps(cap_median(o, den.key, size)),
                bound(den.key),
                fmt_f(r, 2),
                verdict(r.map(ok))
            ));
        };
        cap_row(
            &mut m,
            "lossless capacity/dir: turnpike no-GSO vs forwarder",
            &TP_CD_NOGSO,
            &FWD,
            "≥ 0.90",
            |r| r >= 0.9,
        );
        cap_row(
            &mut m,
            "lossless capacity/dir: forwarder vs coturn",
            &FWD,
            &CO_CD,
            "≥ 1.5",
            |r| r >= 1.5,
        );
        cap_row(
            &mut m,
            "lossless capacity/dir: turnpike (GSO) vs coturn",
            &TP_CD,
            &CO_CD,
            "≥ 2.5",
            |r| r >= 2.5,
        );
        row(
            &mut m,
            "overload (max offered), delivered/dir: turnpike (GSO) vs coturn",
            &TP_CD,
            &CO_CD,
            delivered,
            0,
            "(info)",
            |_| true,
            fmt_pps,
        );
        row(
            &mut m,
            "overload, delivered/dir: turnpike (GSO) vs forwarder + GSO",
            &TP_CD,
            &FWD_GSO,
            delivered,
            0,
            "(info)",
            |_| true,
            fmt_pps,
        );
        row(
            &mut m,
            "overload, delivered/dir: turnpike Send vs coturn Send",
            &TP_SI,
            &CO_SI,
            delivered,
            0,
            "(info)",
            |_| true,
            fmt_pps,
        );
        let cpu_fmt: fn(Option<f64>) -> String = |v| fmt_f(v, 3);
        row(
            &mut m,
            &format!(
                "server CPU (cores) at {}k pps/dir, ChannelData",
                a.cpu_load / 1000
            ),
            &TP_CD,
            &CO_CD,
            cpu,
            a.cpu_load,
            "≤ 0.5",
            |r| r <= 0.5,
            cpu_fmt,
        );
        if a.loads.contains(&100_000) && a.cpu_load != 100_000 {
            row(
                &mut m,
                "server CPU (cores) at 100k pps/dir, ChannelData (coturn near its limit)",
                &TP_CD,
                &CO_CD,
                cpu,
                100_000,
                "(info)",
                |_| true,
                cpu_fmt,
            );
        }
        row(
            &mut m,
            &format!(
                "server CPU (cores) at {}k pps/dir, Send ind.",
                a.cpu_load / 1000
            ),
            &TP_SI,
            &CO_SI,
            cpu,
            a.cpu_load,
            "≤ 0.5",
            |r| r <= 0.5,
            cpu_fmt,
        );
    }
    for &size in &a.sizes {
        let half = o
            .runs
            .iter()
            .find(|r| r.phase == "half" && r.size == size)
            .map(|r| r.offered)
            .unwrap_or(0);
        for (num, den) in [(TP_CD, CO_CD), (TP_SI, CO_SI)] {
            for (name, f) in [("p50 µs", p50 as fn(&Run) -> f64), ("p99 µs", p99)] {
                let r = ratio(o, "half", num.key, den.key, size, half, f);
                let target = if name.starts_with("p99") {
                    "≤ 1"
                } else {
                    "(info)"
                };
                m.push_str(&format!(
                    "| {name} at 50 % of coturn's capacity ({}k/dir), {} | {size} B | {} | {} | {} | {target} | {} |\n",
                    half / 1000,
                    if num.mode == Mode::Channel { "ChannelData" } else { "Send ind." },
                    fmt_f(med(o, "half", num.key, size, half, f), 1),
                    fmt_f(med(o, "half", den.key, size, half, f), 1),
                    fmt_f(r, 2),
                    verdict(r.map(|r| !name.starts_with("p99") || r <= 1.0))
                ));
            }
        }
    }
    let (tp_alloc, co_alloc, alloc_ratio) = alloc_medians(o);
    m.push_str(&format!(
        "| allocations/s (Allocate with 401 + CreatePermission + ChannelBind, 256 in flight) | – | {} | {} | {} | ≥ 10 | {} |\n",
        fmt_f(tp_alloc, 0),
        fmt_f(co_alloc, 0),
        fmt_f(alloc_ratio, 1),
        verdict(alloc_ratio.map(|r| r >= 10.0))
    ));
    let idle = |s: &str| {
        o.idle
            .iter()
            .find(|x| x.server == s)
            .map(|x| x.value.mib_per_10k)
    };
    let idle_ratio = idle("turnpike").zip(idle("coturn")).map(|(t, c)| t / c);
    m.push_str(&format!(
        "| RSS per 10k idle allocations (MiB) | – | {} | {} | {} | (info) | – |\n",
        fmt_f(idle("turnpike"), 1),
        fmt_f(idle("coturn"), 1),
        fmt_f(idle_ratio, 2),
    ));
    m.push_str("\nAllocations/s per run: ");
    m.push_str(
        &o.alloc
            .iter()
            .map(|x| {
                format!(
                    "{} rep {}: {:.0}/s ({} failed)",
                    x.server, x.rep, x.value.per_second, x.value.failed
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
    );
    m.push_str(".\nIdle: ");
    m.push_str(
        &o.idle
            .iter()
            .map(|x| format!("{}: {}", x.server, x.value.summary()))
            .collect::<Vec<_>>()
            .join("; "),
    );
    m.push('\n');
    // Charts.
    for &size in &a.sizes {
        let ticks: Vec<(f64, String)> = a
            .loads
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as f64, load_label(l)))
            .collect();
        let series = [TP_CD, TP_CD_NOGSO, CO_CD, FWD]
            .iter()
            .map(|tg| Series {
                name: tg.label.to_owned(),
                points: a
                    .loads
                    .iter()
                    .enumerate()
                    .filter_map(|(i, &l)| {
                        med(o, "sweep", tg.key, size, l, delivered).map(|v| (i as f64, v))
                    })
                    .collect(),
                dashed: tg.server.starts_with("fwd"),
            })
            .collect();
        let c = Chart {
            title: format!("Delivered vs offered, {size}-byte payload (per direction, median)"),
            x_label: "offered packets/s per direction".into(),
            y_label: "delivered packets/s per direction".into(),
            x_log: false,
            x_ticks: Some(ticks),
            y_range: None,
            series,
        };
        let p = a.out.join(format!("delivered_{size}B.svg"));
        let _ = std::fs::write(&p, svg::render(&c));
        let half = o
            .runs
            .iter()
            .find(|r| r.phase == "half" && r.size == size)
            .map(|r| r.offered)
            .unwrap_or(0);
        // The CDF of the run with the median p99 of each target.
        let series = [TP_CD, TP_SI, CO_CD, CO_SI]
            .iter()
            .filter_map(|tg| {
                let mut rs: Vec<&Run> = runs(o, "half", tg.key, size, half).collect();
                rs.sort_by(|x, y| x.report.p99_us.total_cmp(&y.report.p99_us));
                let r = rs.get(rs.len() / 2)?;
                Some(Series {
                    name: tg.label.to_owned(),
                    points: r.report.cdf.iter().map(|&(f, us)| (us, f)).collect(),
                    dashed: tg.server == "coturn",
                })
            })
            .collect();
        let c = Chart {
            title: format!(
                "Latency CDF at {}k pps/dir (50 % of coturn), {size} B",
                half / 1000
            ),
            x_label: "one-way latency through the relay, µs (log)".into(),
            y_label: "fraction of packets".into(),
            x_log: true,
            x_ticks: None,
            y_range: Some((0.0, 1.0)),
            series,
        };
        let p = a.out.join(format!("latency_cdf_{size}B.svg"));
        let _ = std::fs::write(&p, svg::render(&c));
    }
    m.push_str("\nCharts: ");
    m.push_str(
        &a.sizes
            .iter()
            .map(|s| format!("`delivered_{s}B.svg`, `latency_cdf_{s}B.svg`"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    m.push('\n');
    m
}

const DP_TARGETS: [Target; 11] = [
    t(
        "uring-cd",
        "uring ChannelData, GSO",
        "tp-uring",
        Mode::Channel,
        false,
    ),
    t(
        "uring-cd-nogso",
        "uring ChannelData, no GSO",
        "tp-uring",
        Mode::Channel,
        true,
    ),
    t(
        "uring-si",
        "uring Send ind., GSO",
        "tp-uring",
        Mode::Indication,
        false,
    ),
    t(
        "uring-si-nogso",
        "uring Send ind., no GSO",
        "tp-uring",
        Mode::Indication,
        true,
    ),
    t(
        "mmsg-cd",
        "mmsg ChannelData, GSO",
        "tp-mmsg",
        Mode::Channel,
        false,
    ),
    t(
        "mmsg-cd-nogso",
        "mmsg ChannelData, no GSO",
        "tp-mmsg",
        Mode::Channel,
        true,
    ),
    t(
        "mmsg-si",
        "mmsg Send ind., GSO",
        "tp-mmsg",
        Mode::Indication,
        false,
    ),
    t(
        "mmsg-si-nogso",
        "mmsg Send ind., no GSO",
        "tp-mmsg",
        Mode::Indication,
        true,
    ),
    t(
        "fwd-nogso",
        "forwarder, no GSO (alternating sizes)",
        "fwd",
        Mode::Forwarder,
        true,
    ),
    t(
        "fwd",
        "forwarder, no GSO (equal sizes)",
        "fwd",
        Mode::Forwarder,
        false,
    ),
    t(
        "fwd-gso",
        "forwarder + GSO",
        "fwd-gso",
        Mode::Forwarder,
        false,
    ),
];

fn dataplane_suite(env: &Env<'_>, o: &mut Output) -> Result<()> {
    let a = env.a;
    let peer_fwd = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let peer_fwd_gso = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let uring = env.turnpike("turnpike-uring", "uring", "10000-20999")?;
    let mmsg = env.turnpike("turnpike-mmsg", "mmsg", "21000-31999")?;
    let fwd = env.forwarder("forwarder", peer_fwd, false)?;
    let fwd_gso = env.forwarder("forwarder-gso", peer_fwd_gso, true)?;
    let pick = |s: &str| -> (&Proc, Option<SocketAddr>) {
        match s {
            "tp-uring" => (&uring, None),
            "tp-mmsg" => (&mmsg, None),
            "fwd" => (&fwd, Some(peer_fwd)),
            _ => (&fwd_gso, Some(peer_fwd_gso)),
        }
    };
    for rep in 1..=a.reps {
        for &size in &a.sizes {
            for &load in &a.loads {
                for tg in &DP_TARGETS {
                    let (srv, peer) = pick(tg.server);
                    one_run(env, o, "sweep", rep, tg, srv, peer, size, load)?;
                }
            }
            for tg in &DP_TARGETS {
                let (srv, peer) = pick(tg.server);
                let c = capacity(env, o, rep, tg, srv, peer, size)?;
                eprintln!(
                    "rep {rep} {} {size}B: capacity {:.0}k/dir ({})",
                    tg.key,
                    c.pps as f64 / 1000.0,
                    c.bound
                );
                o.capacity.push(c);
            }
        }
    }
    Ok(())
}

fn dataplane_markdown(a: &CompareArgs, o: &Output) -> String {
    let mut m = header(
        a,
        o,
        "turnpike data plane vs the bare forwarder",
        "bench/compare.sh --suite dataplane",
    );
    m.push_str("\nEach turnpike target is compared with the forwarder on the same packet pattern: no-GSO targets (payload sizes alternate SIZE/SIZE+4, so no two consecutive datagrams of a flow can be merged) with `fwd-nogso`, GSO targets (equal sizes, bursts of 8 per flow) with `fwd-gso`. `fwd` (no GSO, equal sizes) shows what the pattern alone changes.\n");
    let reference = |tg: &Target| {
        if tg.alternate || tg.key == "fwd" {
            "fwd-nogso"
        } else {
            "fwd-gso"
        }
    };
    let l0 = a.loads.first().copied().unwrap_or(0);
    for &s in &a.sizes {
        m.push_str(&format!(
            "\n## {s}-byte payload\n\n| target | lossless capacity/dir (per rep) | median | vs forwarder (median of per-rep ratios) | server CPU at {}k/dir (cores) | relayed packets per server CPU-second at {}k/dir | overload: delivered/dir, up / down | GSO share (down, overload) |\n|---|---|---:|---:|---:|---:|---:|---:|\n",
            l0 / 1000,
            l0 / 1000,
        ));
        for tg in &DP_TARGETS {
            let per: Vec<String> = o
                .capacity
                .iter()
                .filter(|c| c.target == tg.key && c.size == s)
                .map(|c| {
                    format!(
                        "{:.0}k{}",
                        c.pps as f64 / 1000.0,
                        if c.bound == "generator" { " (gen)" } else { "" }
                    )
                })
                .collect();
            let r = cap_ratio(o, tg.key, reference(tg), s);
            let eff = med(o, "sweep", tg.key, s, l0, |r| {
                (r.report.up.delivered_pps + r.report.down.delivered_pps)
                    / r.report.server_cpu_cores.unwrap_or(f64::NAN)
            });
            m.push_str(&format!(
                "| {} | {} | {} | {} ({}) | {} | {} | {} / {} | {}% |\n",
                tg.label,
                per.join(", "),
                fmt_pps(cap_median(o, tg.key, s)),
                fmt_f(r.map(|x| x * 100.0), 0) + "%",
                reference(tg),
                fmt_f(med(o, "sweep", tg.key, s, l0, cpu), 2),
                fmt_pps(eff),
                fmt_pps(med(o, "sweep", tg.key, s, 0, |r| r.report.up.delivered_pps)),
                fmt_pps(med(o, "sweep", tg.key, s, 0, |r| r
                    .report
                    .down
                    .delivered_pps)),
                fmt_f(
                    med(o, "sweep", tg.key, s, 0, |r| r.report.down.coalesced
                        * 100.0),
                    0
                ),
            ));
        }
    }
    m.push_str("\n\"(gen)\": the generator could not offer more, so the figure is a lower bound. Overload = offered as fast as the generator goes (equal rates both ways); the up direction (one listening socket) loses first.\n");
    m
}

/// The `turnpike serve` flags every benchmark run uses: loopback, one unpinned worker
/// (the harness pins the process), relay ports `ports`, the user bench:bench, loopback
/// peers allowed, no quotas (the benchmark's one user holds thousands of allocations),
/// and no plane listener (its data plane is attached in process).
pub(crate) fn serve_args(ports: &str) -> Vec<&str> {
    vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--relay-ports",
        ports,
        "--user",
        "bench:bench",
        "--realm",
        "bench",
        "--allow-peer",
        "127.0.0.0/8",
        "--admin-listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--no-pin",
        "--user-quota",
        "0",
        "--total-quota",
        "0",
    ]
}

/// Allocations per second, each repetition on fresh servers, turnpike and coturn
/// interleaved.
fn alloc_runs(env: &Env<'_>, o: &mut Output) -> Result<()> {
    let a = env.a;
    for rep in 1..=a.reps {
        for srv in ["turnpike", "coturn"] {
            let p = if srv == "turnpike" {
                env.turnpike("turnpike-alloc", &a.backend, "10000-31999")?
            } else {
                env.coturn("coturn-alloc", (10000, 31999))?
            };
            let server = ServerArgs {
                server: p.addr,
                user: "bench".into(),
                password: "bench".into(),
                realm: "bench".into(),
            };
            let r = hs::alloc_rate(&server, a.alloc_count, 256, Duration::from_secs(20))?;
            eprintln!("rep {rep} {srv}: {}", r.summary());
            o.alloc.push(RepValue {
                rep,
                server: if srv == "turnpike" {
                    "turnpike"
                } else {
                    "coturn"
                },
                value: r,
            });
        }
    }
    Ok(())
}

/// The median allocation rate of `server` over the repetitions, and turnpike/coturn (the
/// median of per-repetition ratios).
fn alloc_medians(o: &Output) -> (Option<f64>, Option<f64>, Option<f64>) {
    let alloc = |s: &str| {
        median(
            o.alloc
                .iter()
                .filter(|x| x.server == s)
                .map(|x| x.value.per_second)
                .collect(),
        )
    };
    let ratio = median(
        o.alloc
            .iter()
            .filter(|x| x.server == "turnpike")
            .filter_map(|t| {
                o.alloc
                    .iter()
                    .find(|c| c.server == "coturn" && c.rep == t.rep)
                    .map(|c| t.value.per_second / c.value.per_second)
            })
            .collect(),
    );
    (alloc("turnpike"), alloc("coturn"), ratio)
}

fn alloc_markdown(a: &CompareArgs, o: &Output) -> String {
    let (tp, co, ratio) = alloc_medians(o);
    let mut m = format!(
        "# Allocations per second: turnpike vs coturn\n\n- Date: {}\n- Machine: {}\n- coturn: {}\n- Servers pinned to cpu {}, the generator to cpu {}; {} handshakes per run (new socket: Allocate, 401, Allocate, CreatePermission, ChannelBind), 256 in flight, {} repetitions on fresh servers.\n\n| rep | turnpike/s | coturn/s |\n|---|---|---|\n",
        o.date,
        o.machine,
        o.settings.get("coturn").cloned().unwrap_or_default(),
        a.server_cpu,
        a.gen_cpu,
        a.alloc_count,
        a.reps
    );
    for rep in 1..=a.reps {
        let v = |s: &str| {
            o.alloc
                .iter()
                .find(|x| x.server == s && x.rep == rep)
                .map(|x| x.value.per_second)
        };
        m.push_str(&format!(
            "| {rep} | {} | {} |\n",
            fmt_f(v("turnpike"), 0),
            fmt_f(v("coturn"), 0)
        ));
    }
    m.push_str(&format!(
        "\nMedians: turnpike {}/s, coturn {}/s, ratio {} (target ≥ 10).\n",
        fmt_f(tp, 0),
        fmt_f(co, 0),
        fmt_f(ratio, 2)
    ));
    m
}

const TP_TCP: Target = ts("tp-tcp", "turnpike TCP", "turnpike", Transport::Tcp);
const TP_TLS: Target = ts("tp-tls", "turnpike TLS", "turnpike", Transport::Tls);
const CO_TCP: Target = ts("co-tcp", "coturn TCP", "coturn", Transport::Tcp);
const CO_TLS: Target = ts("co-tls", "coturn TLS", "coturn", Transport::Tls);
/// The streams suite's relay targets, in the order they run.
const STREAM_TARGETS: [Target; 4] = [TP_TCP, CO_TCP, TP_TLS, CO_TLS];

/// The benchmark's credentials for a server at `addr`.
fn bench_user(addr: SocketAddr) -> ServerArgs {
    ServerArgs {
        server: addr,
        user: "bench".into(),
        password: "bench".into(),
        realm: "bench".into(),
    }
}

/// TURN over TCP and TLS: the relay sweep and lossless capacity of each target (one
/// turnpike and one coturn serve all of them), then connection rates on fresh servers.
fn streams_suite(env: &Env<'_>, o: &mut Output) -> Result<()> {
    let a = env.a;
    let pki = env
        .pki
        .as_ref()
        .context("the streams suite needs its test PKI")?;
    {
        let tp = env.turnpike_with("turnpike", &a.backend, "10000-20999", Some(pki))?;
        let co = env.coturn_with("coturn", (21000, 31999), Some(pki))?;
        let pick = |s: &str| if s == "turnpike" { &tp } else { &co };
        for rep in 1..=a.reps {
            for &size in &a.sizes {
                for &load in &a.loads {
                    for tg in &STREAM_TARGETS {
                        one_run(env, o, "sweep", rep, tg, pick(tg.server), None, size, load)?;
                    }
                }
                for tg in &STREAM_TARGETS {
                    let c = capacity(env, o, rep, tg, pick(tg.server), None, size)?;
                    eprintln!(
                        "rep {rep} {} {size}B: capacity {:.0}k/dir ({})",
                        tg.key,
                        c.pps as f64 / 1000.0,
                        c.bound
                    );
                    o.capacity.push(c);
                }
            }
        }
    }
    conn_runs(env, o, pki)
}

/// New connections + Allocate per second over TCP and TLS, each repetition on fresh
/// servers, turnpike and coturn interleaved.
fn conn_runs(env: &Env<'_>, o: &mut Output, pki: &certs::TestPki) -> Result<()> {
    let a = env.a;
    for rep in 1..=a.reps {
        for srv in ["turnpike", "coturn"] {
            let p = if srv == "turnpike" {
                env.turnpike_with("turnpike-conn", &a.backend, "10000-31999", Some(pki))?
            } else {
                env.coturn_with("coturn-conn", (10000, 31999), Some(pki))?
            };
            for tr in [Transport::Tcp, Transport::Tls] {
                let addr = p.addr_for(tr)?;
                let tls = if tr == Transport::Tls {
                    env.tls.clone()
                } else {
                    None
                };
                // Only the generator's run-queue wait tells of another task here: a
                // server busy with handshakes makes its own threads wait behind each
                // other.
                let mut attempt = 0;
                let mut r = loop {
                    attempt += 1;
                    let r = stream::conn_rate(
                        addr,
                        &bench_user(addr),
                        tls.clone(),
                        a.conn_count,
                        a.conn_window,
                        Duration::from_secs(30),
                        Some(p.pid),
                    )?;
                    if r.generator_rq_wait <= MAX_RQ_WAIT || attempt >= MAX_ATTEMPTS {
                        break r;
                    }
                    eprintln!(
                        "conn {srv} {}: generator run-queue wait {:.0}%: another task shared its core; again in {} s",
                        tr.name(),
                        r.generator_rq_wait * 100.0,
                        RETRY_PAUSE.as_secs()
                    );
                    std::thread::sleep(RETRY_PAUSE);
                };
                // Every connection was closed by the client: a second later the
                // server should hold none of them.
                std::thread::sleep(Duration::from_secs(1));
                r.server_sockets_after = proc::tcp_states(addr.port())?;
                eprintln!("rep {rep} {srv}: {}", r.summary());
                o.conns.push(RepValue {
                    rep,
                    server: if srv == "turnpike" {
                        "turnpike"
                    } else {
                        "coturn"
                    },
                    value: r,
                });
            }
        }
    }
    Ok(())
}

/// Median connection rate of `server` over `transport`, and turnpike/coturn (median
/// of per-repetition ratios).
fn conn_medians(o: &Output, transport: Transport) -> (Option<f64>, Option<f64>, Option<f64>) {
    let of = |s: &str| -> Vec<&RepValue<stream::ConnReport>> {
        o.conns
            .iter()
            .filter(|x| x.server == s && x.value.transport == transport)
            .collect()
    };
    let rate = |s: &str| median(of(s).iter().map(|x| x.value.per_second).collect());
    let ratio = median(
        of("turnpike")
            .iter()
            .filter_map(|t| {
                of("coturn")
                    .iter()
                    .find(|c| c.rep == t.rep)
                    .map(|c| t.value.per_second / c.value.per_second)
            })
            .collect(),
    );
    (rate("turnpike"), rate("coturn"), ratio)
}

fn streams_markdown(a: &CompareArgs, o: &Output) -> String {
    let ml = a.max_loss();
    let mut m = header(
        a,
        o,
        "TURN over TCP and TLS: turnpike vs coturn",
        "turnpike-bench compare --suite streams",
    );
    m.push_str(&format!(
        "- Clients over TCP or TLS (RFC 8656 §3.1), ChannelData padded to 4 bytes both ways, framed by length; peers are the generator's UDP socket. Both directions offered at the same rate; a run carried its load when the generator offered ≥ 97 % of it each way and each direction lost ≤ {:.1} % (over the run, and delivered/sent over the measured window, so that a server falling behind into its socket buffers counts), and no connection closed. A shortfall because a connection's send backlog was full (the server did not read) counts against the server; capacity is bracketed by the sweep and bisected ({} probes).\n- Connection rate: {} connections per run, {} in flight, from 250 loopback addresses (127.0.0.2-251); each: connect, TLS handshake (full: resumption off; the client pins the server's certificate and skips the handshake signature check, so that its core does not spend on ECDSA verification what the server spends on the handshake), Allocate, 401, Allocate with credentials, success, close (close_notify for TLS). Fresh servers each repetition.\n",
        ml * 100.0,
        PROBES + 1,
        a.conn_count,
        a.conn_window
    ));
    let tls_of = |server: &str| -> String {
        o.runs
            .iter()
            .filter(|r| {
                r.report.transport == Transport::Tls
                    && STREAM_TARGETS
                        .iter()
                        .any(|t| t.key == r.target && t.server == server)
            })
            .find_map(|r| r.report.stream.as_ref().and_then(|s| s.tls.clone()))
            .or_else(|| {
                o.conns
                    .iter()
                    .find(|c| c.server == server && c.value.tls.is_some())
                    .and_then(|c| c.value.tls.clone())
            })
            .unwrap_or_else(|| "–".into())
    };
    m.push_str(&format!(
        "- TLS negotiated (client: rustls with ring, offering TLS 1.3 and 1.2, AES-128-GCM first as browsers do, X25519 first; ECDSA P-256 server certificate from a test CA): turnpike {}; coturn {}.\n",
        tls_of("turnpike"),
        tls_of("coturn")
    ));
    // Lossless capacity.
    m.push_str(&format!(
        "\n## Relayed packets/s per direction at ≤ {:.0} % loss (lossless capacity)\n\n| target | payload | per repetition | median |\n|---|---|---|---:|\n",
        ml * 100.0
    ));
    for &size in &a.sizes {
        for tg in STREAM_TARGETS {
            let per: Vec<String> = o
                .capacity
                .iter()
                .filter(|c| c.target == tg.key && c.size == size)
                .map(|c| {
                    format!(
                        "{:.0}k{}",
                        c.pps as f64 / 1000.0,
                        if c.bound == "generator" { " (gen)" } else { "" }
                    )
                })
                .collect();
            m.push_str(&format!(
                "| {} | {size} B | {} | {} |\n",
                tg.label,
                per.join(", "),
                fmt_pps(cap_median(o, tg.key, size))
            ));
        }
    }
    m.push_str(
        "\n\"(gen)\": the generator could not offer more, so the figure is a lower bound.\n",
    );
    // Figures against the targets.
    m.push_str("\n## Figures against the targets\n\n| figure | payload | turnpike | coturn | ratio (median of per-rep ratios) | target | verdict |\n|---|---|---:|---:|---:|---|---|\n");
    for &size in &a.sizes {
        for (num, den) in [(TP_TCP, CO_TCP), (TP_TLS, CO_TLS)] {
            let r = cap_ratio(o, num.key, den.key, size);
            let lower = |k: &str| {
                if o.capacity
                    .iter()
                    .any(|c| c.target == k && c.size == size && c.bound == "generator")
                {
                    " (≥)"
                } else {
                    ""
                }
            };
            m.push_str(&format!(
                "| relayed packets/s per direction at ≤ {:.0} % loss, one core, {} | {size} B | {}{} | {}{} | {} | ≥ 2 | {} |\n",
                ml * 100.0,
                num.transport.name(),
                fmt_pps(cap_median(o, num.key, size)),
                lower(num.key),
                fmt_pps(cap_median(o, den.key, size)),
                lower(den.key),
                fmt_f(r, 2),
                verdict(r.map(|r| r >= 2.0))
            ));
        }
    }
    for (tr, target, ok) in [
        (Transport::Tcp, "(info)", None),
        (Transport::Tls, "≥ 5", Some(5.0)),
    ] {
        let (tp, co, r) = conn_medians(o, tr);
        m.push_str(&format!(
            "| new {} connections + Allocate per second | – | {} | {} | {} | {target} | {} |\n",
            tr.name(),
            fmt_f(tp, 0),
            fmt_f(co, 0),
            fmt_f(r, 2),
            match ok {
                Some(x) => verdict(r.map(|r| r >= x)),
                None => "–",
            }
        ));
    }
    // Overload and CPU.
    let l0 = a.loads.iter().copied().find(|&l| l > 0).unwrap_or(0);
    m.push_str(&format!(
        "\n## Overload and CPU\n\n| target | payload | overload (max offered): delivered/dir up / down | p50 / p99 µs at overload | server CPU at {}k/dir (cores) | server CPU µs per relayed packet at {}k/dir | p50 / p99 µs at {}k/dir |\n|---|---|---:|---:|---:|---:|---:|\n",
        l0 / 1000,
        l0 / 1000,
        l0 / 1000
    ));
    for &size in &a.sizes {
        for tg in STREAM_TARGETS {
            let per_pkt = med(o, "sweep", tg.key, size, l0, |r| {
                r.report.server_cpu_cores.unwrap_or(f64::NAN) * 1e6
                    / (r.report.up.delivered_pps + r.report.down.delivered_pps)
            });
            m.push_str(&format!(
                "| {} | {size} B | {} / {} | {} / {} | {} | {} | {} / {} |\n",
                tg.label,
                fmt_pps(med(o, "sweep", tg.key, size, 0, |r| r
                    .report
                    .up
                    .delivered_pps)),
                fmt_pps(med(o, "sweep", tg.key, size, 0, |r| r
                    .report
                    .down
                    .delivered_pps)),
                fmt_f(med(o, "sweep", tg.key, size, 0, p50), 0),
                fmt_f(med(o, "sweep", tg.key, size, 0, p99), 0),
                fmt_f(med(o, "sweep", tg.key, size, l0, cpu), 2),
                fmt_f(per_pkt, 2),
                fmt_f(med(o, "sweep", tg.key, size, l0, p50), 0),
                fmt_f(med(o, "sweep", tg.key, size, l0, p99), 0),
            ));
        }
    }
    // Connection runs.
    m.push_str("\n## Connection runs\n\n| rep | server | transport | connections/s | failed | connect→allocated p50 / p99 µs | server CPU µs per connection | generator CPU µs per connection (share of its core) | server's sockets 1 s later | first error |\n|---|---|---|---:|---:|---:|---:|---:|---|---|\n");
    for c in &o.conns {
        let v = &c.value;
        m.push_str(&format!(
            "| {} | {} | {} | {:.0} | {} | {} / {} | {} | {} ({:.0} %) | {} | {} |\n",
            c.rep,
            c.server,
            v.transport.name(),
            v.per_second,
            v.failed,
            v.latency_p50_us,
            v.latency_p99_us,
            fmt_f(v.server_cpu_us_per_conn, 0),
            fmt_f(v.generator_cpu_us_per_conn, 0),
            v.generator_cpu_cores * 100.0,
            if v.server_sockets_after.is_empty() {
                "none".to_owned()
            } else {
                v.server_sockets_after
                    .iter()
                    .map(|(k, n)| format!("{n} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            v.first_error.as_deref().unwrap_or("–")
        ));
    }
    // What went wrong on connections during relay runs.
    let trouble: Vec<String> = o
        .runs
        .iter()
        .filter_map(|r| {
            let s = r.report.stream.as_ref()?;
            (s.closed > 0 || s.first_error.is_some()).then(|| {
                format!(
                    "rep {} {} {} B at {}: {} connection(s) lost ({})",
                    r.rep,
                    r.target,
                    r.size,
                    load_label(r.offered),
                    s.closed,
                    s.first_error.as_deref().unwrap_or("?")
                )
            })
        })
        .collect();
    m.push_str(&format!(
        "\nConnections lost during relay runs: {}.\n",
        if trouble.is_empty() {
            "none".to_owned()
        } else {
            trouble.join("; ")
        }
    ));
    m.push_str("\n## Server commands\n\n```sh\n");
    for k in ["turnpike_cmd", "coturn_cmd"] {
        if let Some(c) = o.settings.get(k) {
            m.push_str(c);
            m.push('\n');
        }
    }
    m.push_str("```\n");
    m
}
