//! `turnpike-bench xdp`: the XDP fast path against turnpike's socket path, coturn and a
//! bare XDP reflector, through a veth pair between two network namespaces the run
//! makes (and removes).
//!
//! ```text
//!   netns tpb-c (generator, cpu 1)            netns tpb-s (server, cpu 0)
//!   10.99.0.2 clients, 10.99.0.3 peer  vc <-> vs  10.99.0.1 TURN :3478, reflector :7
//! ```
//!
//! Each target runs alone, pinned to cpu 0; the generator (`turnpike-bench relay` inside
//! tpb-c) to cpu 1. On a veth the receive side of a frame, XDP included, runs in the
//! softirq of the sending CPU, so the figure compared is the whole machine's CPU per
//! relayed packet at one offered load for all targets, plus the XDP program's own run
//! time from `kernel.bpf_stats_enabled`. The lossless rate is the highest offered rate
//! of a sweep with at most 1 % loss; where the generator could not send what was
//! offered, the figure is a lower bound, and says so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

const NS_S: &str = "tpb-s";
const NS_C: &str = "tpb-c";
const SERVER_IP: &str = "10.99.0.1";
const CLIENT_IP: &str = "10.99.0.2";
const PEER_IP: &str = "10.99.0.3";

#[derive(Debug, Args)]
pub struct XdpArgs {
    /// The turnpike binary (built with clang, so that it has the XDP program).
    #[arg(long, default_value = "target/release/turnpike")]
    pub turnpike: PathBuf,
    /// coturn's turnserver, newest (../shared/anchors/build-coturn.sh).
    #[arg(long, default_value = "/opt/coturn-4.17.1/bin/turnserver")]
    pub coturn: PathBuf,
    /// Debian's turnserver (4.6.1, the old anchor); skipped when missing.
    #[arg(long, default_value = "/usr/bin/turnserver")]
    pub coturn_old: PathBuf,
    /// Payload bytes per packet.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Flows (allocations).
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Offered packets/s per direction of the lossless-rate sweep, ascending.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "20000,40000,60000,80000,100000,130000,160000,200000"
    )]
    pub rates: Vec<u64>,
    /// Offered packets/s per direction at which CPU per packet is compared.
    #[arg(long, default_value_t = 50000)]
    pub equal_rate: u64,
    /// Which targets: any of xdp, xdp-send, socket, socket-send, coturn, coturn-old,
    /// reflector, and the hairpin (both ends of each flow clients of the server):
    /// xdp-hairpin, socket-hairpin, kernel-hairpin (`--no-hairpin`, today's path before
    /// the hairpin), coturn-hairpin.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "reflector,xdp,xdp-send,socket,socket-send,coturn,coturn-old"
    )]
    pub targets: Vec<String>,
    /// Where the report (xdp.md, xdp.json) and logs go.
    #[arg(long, default_value = "bench/out/xdp")]
    pub out: PathBuf,
    /// Equal-load runs per target, interleaved (a round runs every target once): the
    /// report gives medians and, for "above the floor", the median over rounds of each
    /// target's difference from the reflector's run of the same round.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
}

/// One run of the generator against one target.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub offered_pps: u64,
    /// Packets/s per direction the generator managed to send.
    pub sent_pps: f64,
    /// Packets/s delivered, both directions together.
    pub delivered_pps: f64,
    pub loss: f64,
    /// Busy share of cpu 0 (server) and cpu 1 (generator, and veth receive softirqs).
    pub cpu0: f64,
    pub cpu1: f64,
    /// Whole-machine CPU nanoseconds per delivered packet.
    pub machine_ns_per_packet: f64,
    /// The server process's own CPU (all its threads), in cores.
    pub server_process_cores: f64,
    /// The XDP program's own run time per run, nanoseconds (bpf_stats), when one ran.
    pub prog_ns_per_run: Option<f64>,
    pub prog_runs: Option<u64>,
    /// Share of delivered packets the XDP program relayed (turnpike with XDP).
    pub xdp_share: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    pub name: String,
    pub what: String,
    /// The median of `equal_runs` by machine CPU per packet.
    pub equal_load: Option<Run>,
    /// Every equal-load run, one per round.
    pub equal_runs: Vec<Run>,
    /// Packets/s per direction delivered by the highest offered rate with at most 1 %
    /// loss.
    pub lossless_pps: Option<u64>,
    /// The generator sent less than 95 % of that rate: the figure is a lower bound.
    pub generator_bound: bool,
    pub sweep: Vec<Run>,
    pub error: Option<String>,
}

fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {cmd}"))?;
    if !o.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The two namespaces and their veth pair; removed on drop.
struct Topology {
    pass: Option<Child>,
}

impl Topology {
    fn new(turnpike: &Path) -> Result<Topology> {
        let _ = sh("ip", &["netns", "del", NS_S]);
        let _ = sh("ip", &["netns", "del", NS_C]);
        sh("ip", &["netns", "add", NS_S])?;
        let mut t = Topology { pass: None };
        sh("ip", &["netns", "add", NS_C])?;
        sh(
            "ip",
            &[
                "link", "add", "vs", "netns", NS_S, "type", "veth", "peer", "name", "vc", "netns",
                NS_C,
            ],
        )?;
        let s_addr = format!("{SERVER_IP}/24");
        let c_addr = format!("{CLIENT_IP}/24");
        let p_addr = format!("{PEER_IP}/24");
        for (ns, args) in [
            (NS_S, vec!["addr", "add", s_addr.as_str(), "dev", "vs"]),
            (NS_C, vec!["addr", "add", c_addr.as_str(), "dev", "vc"]),
            (NS_C, vec!["addr", "add", p_addr.as_str(), "dev", "vc"]),
            (NS_S, vec!["link", "set", "vs", "up"]),
            (NS_C, vec!["link", "set", "vc", "up"]),
            (NS_S, vec!["link", "set", "lo", "up"]),
            (NS_C, vec!["link", "set", "lo", "up"]),
        ] {
            let mut a = vec!["-n", ns];
            a.extend(args);
            sh("ip", &a)?;
        }
        // Complete checksums, as from senders across a wire (real NICs deliver those):
        // with offload on, the program would also complete each partial checksum,
        // which is correct (tests/tests/xdp.rs) but measures a same-host sender.
        sh(
            "ip",
            &["netns", "exec", NS_S, "ethtool", "-K", "vs", "tx", "off"],
        )?;
        sh(
            "ip",
            &["netns", "exec", NS_C, "ethtool", "-K", "vc", "tx", "off"],
        )?;
        // bpf_fib_lookup answers only on an interface that forwards.
        sh(
            "ip",
            &[
                "netns",
                "exec",
                NS_S,
                "sysctl",
                "-qw",
                "net.ipv4.conf.vs.forwarding=1",
            ],
        )?;
        // XDP_TX into a veth reaches its far end only in NAPI mode: any XDP program there.
        let mut pass = Command::new("ip")
            .args(["netns", "exec", NS_C])
            .arg(turnpike)
            .args(["xdp-tool", "pass", "vc"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start turnpike xdp-tool")?;
        wait_line(&mut pass, "attached")?;
        t.pass = Some(pass);
        Ok(t)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(mut p) = self.pass.take() {
            stop(&mut p);
        }
        let _ = sh("ip", &["netns", "del", NS_S]);
        let _ = sh("ip", &["netns", "del", NS_C]);
    }
}

/// Waits (5 s at most) for a line containing `needle` on the child's stdout.
fn wait_line(c: &mut Child, needle: &str) -> Result<()> {
    use std::io::BufRead;
    let out = c.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let want = needle.to_owned();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if line.contains(&want) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .map_err(|_| anyhow::anyhow!("no {needle:?} line in 5 s"))
}

/// SIGTERM, then SIGKILL after 2 s.
fn stop(c: &mut Child) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// A server under test, pinned to cpu 0 inside tpb-s.
struct Server {
    child: Child,
    /// Where the generator sends, and how.
    addr: String,
    extra: Vec<&'static str>,
    /// The XDP program whose run time is read.
    prog: Option<&'static str>,
    /// turnpike's metrics address (to read the XDP share).
    metrics: Option<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn spawn_ns(args: &[String], log: &Path) -> Result<Child> {
    let f = std::fs::File::create(log)?;
    Command::new("ip")
        .args(["netns", "exec", NS_S, "taskset", "-c", "0"])
        .args(args)
        .stdout(Stdio::from(f.try_clone()?))
        .stderr(Stdio::from(f))
        .spawn()
        .with_context(|| format!("cannot start {}", args[0]))
}

fn start(a: &XdpArgs, target: &str) -> Result<Server> {
    let log = a.out.join(format!("{target}.log"));
    let turnpike = a.turnpike.to_string_lossy().into_owned();
    let turn = |xdp: bool| -> Vec<String> {
        let mut v: Vec<String> = [
            turnpike.as_str(),
            "serve",
            "--listen",
            "10.99.0.1:3478",
            "--no-tcp",
            "--relay-ports",
            "40000-49999",
            "--realm",
            "bench",
            "--user",
            "bench:bench",
            "--allow-peer",
            "10.99.0.0/24",
            "--workers",
            "1",
            "--no-pin",
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "10.99.0.1:9109",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if xdp {
            v.extend(["--xdp", "vs", "--xdp-mode", "native"].map(String::from));
        }
        v
    };
    let coturn = |bin: &Path| -> Vec<String> {
        [
            &*bin.to_string_lossy(),
            "-n",
            "--listening-ip",
            SERVER_IP,
            "--relay-ip",
            SERVER_IP,
            "--listening-port",
            "3478",
            "--min-port",
            "40000",
            "--max-port",
            "49999",
            "--realm",
            "bench",
            "--user",
            "bench:bench",
            "--lt-cred-mech",
            "--allowed-peer-ip=10.99.0.0-10.99.0.255",
            "--no-cli",
            "--no-dtls",
            "--no-tls",
            "--no-tcp",
            "--no-tcp-relay",
            "--relay-threads=1",
            "--simple-log",
            "--no-stdout-log",
            "--log-file",
            "/dev/null",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let (args, addr, extra, prog, metrics, ready): (
        Vec<String>,
        &str,
        Vec<&'static str>,
        Option<&'static str>,
        bool,
        Duration,
    ) = match target {
        "xdp" => (
            turn(true),
            "10.99.0.1:3478",
            vec![],
            Some("turnpike_relay"),
            true,
            Duration::from_millis(1500),
        ),
        "xdp-send" => (
            turn(true),
            "10.99.0.1:3478",
            vec!["--send-indications"],
            Some("turnpike_relay"),
            true,
            Duration::from_millis(1500),
        ),
        "socket" => (
            turn(false),
            "10.99.0.1:3478",
            vec![],
            None,
            true,
            Duration::from_millis(1500),
        ),
        "socket-send" => (
            turn(false),
            "10.99.0.1:3478",
            vec!["--send-indications"],
            None,
            true,
            Duration::from_millis(1500),
        ),
        "coturn" => (
            coturn(&a.coturn),
            "10.99.0.1:3478",
            vec![],
            None,
            false,
            Duration::from_secs(2),
        ),
        // The hairpin: both ends of each flow are clients of the server (the generator's
        // `--hairpin`), on one worker.
        "xdp-hairpin" => (
            turn(true),
            "10.99.0.1:3478",
            vec!["--hairpin"],
            Some("turnpike_relay"),
            true,
            Duration::from_millis(1500),
        ),
        "socket-hairpin" => (
            turn(false),
            "10.99.0.1:3478",
            vec!["--hairpin"],
            None,
            true,
            Duration::from_millis(1500),
        ),
        "kernel-hairpin" => (
            {
                let mut v = turn(false);
                v.push("--no-hairpin".into());
                v
            },
            "10.99.0.1:3478",
            vec!["--hairpin"],
            None,
            true,
            Duration::from_millis(1500),
        ),
        "coturn-hairpin" => (
            coturn(&a.coturn),
            "10.99.0.1:3478",
            vec!["--hairpin"],
            None,
            false,
            Duration::from_secs(2),
        ),
        "coturn-old" => (
            coturn(&a.coturn_old),
            "10.99.0.1:3478",
            vec![],
            None,
            false,
            Duration::from_secs(2),
        ),
        "reflector" => (
            vec![
                turnpike.clone(),
                "xdp-tool".into(),
                "reflect".into(),
                "vs".into(),
            ],
            "10.99.0.1:7",
            vec!["--echo"],
            Some("turnpike_reflect"),
            false,
            Duration::from_millis(700),
        ),
        other => bail!("unknown target {other}"),
    };
    let child = spawn_ns(&args, &log)?;
    std::thread::sleep(ready);
    let mut s = Server {
        child,
        addr: addr.to_owned(),
        extra,
        prog,
        metrics: metrics.then(|| "10.99.0.1:9109".to_owned()),
    };
    if let Ok(Some(status)) = s.child.try_wait() {
        bail!("{target} exited at start ({status}); see {}", log.display());
    }
    if prog == Some("turnpike_relay") {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if !text.contains("XDP fast path attached") {
            s.child.kill().ok();
            bail!("turnpike did not attach XDP; see {}", log.display());
        }
    }
    Ok(s)
}

/// The run time and run count of the XDP program `name` (bpf_stats), summed over its
/// instances.
fn prog_stats(name: &str) -> Option<(u64, u64)> {
    let out = sh("bpftool", &["prog", "show", "--json"]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let mut t = (0, 0);
    for p in v.as_array()? {
        if p.get("name").and_then(|n| n.as_str()) == Some(name) {
            t.0 += p.get("run_time_ns").and_then(|x| x.as_u64()).unwrap_or(0);
            t.1 += p.get("run_cnt").and_then(|x| x.as_u64()).unwrap_or(0);
        }
    }
    Some(t)
}

/// The XDP program's relayed packets and the socket path's, from turnpike's metrics
/// (scraped from inside tpb-c).
fn relayed_split(metrics: &str) -> Option<(f64, f64)> {
    let out = sh(
        "ip",
        &[
            "netns",
            "exec",
            NS_C,
            "curl",
            "-s",
            "--max-time",
            "2",
            &format!("http://{metrics}/metrics"),
        ],
    )
    .ok()?;
    let sum = |prefix: &str| -> f64 {
        out.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    // A hairpin is one packet to the program and two to the workers (out of one
    // allocation, into another): counted twice here, as the workers count it.
    Some((
        sum("turnpike_xdp_relayed_packets_total")
            + sum("turnpike_xdp_relayed_packets_total{path=\"hairpin_"),
        sum("turnpike_relayed_packets_total"),
    ))
}

fn generate(a: &XdpArgs, s: &Server, rate: u64, label: &str) -> Result<Run> {
    let json = a.out.join(format!("{label}-{rate}.json"));
    let me = std::env::current_exe()?;
    let mut c = Command::new("ip");
    c.args(["netns", "exec", NS_C, "taskset", "-c", "1"])
        .arg(&me)
        .args(["relay", "--server", &s.addr, "--source", CLIENT_IP])
        .args(["--peer", &format!("{PEER_IP}:0")])
        .args(["--clients", &a.clients.to_string()])
        .args(["--size", &a.size.to_string()])
        .args(["--rate", &rate.to_string()])
        .args(["--duration", &a.duration.to_string(), "--warmup", "1"])
        .args([
            "--cpu",
            "1",
            "--server-cpu",
            "0",
            "--quiet",
            "--nap-us",
            "100",
        ])
        .args(["--server-pid", &s.child.id().to_string()])
        .args(&s.extra)
        .arg("--json")
        .arg(&json);
    let before = s.prog.and_then(prog_stats);
    let split0 = s.metrics.as_deref().and_then(relayed_split);
    let o = c.output().context("cannot run the generator")?;
    if !o.status.success() {
        bail!(
            "generator failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let after = s.prog.and_then(prog_stats);
    let split1 = s.metrics.as_deref().and_then(relayed_split);
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    let f = |k: &[&str]| -> f64 {
        let mut v = &r;
        for key in k {
            v = &v[*key];
        }
        v.as_f64().unwrap_or(0.0)
    };
    let delivered = f(&["up", "delivered_pps"]) + f(&["down", "delivered_pps"]);
    let sent = (f(&["up", "sent_pps"]) + f(&["down", "sent_pps"])) / 2.0;
    let loss = (f(&["up", "loss"]) + f(&["down", "loss"])) / 2.0;
    let (cpu0, cpu1) = (f(&["server_core_busy"]), f(&["generator_core_busy"]));
    let (prog_ns, runs) = match (before, after) {
        (Some(b), Some(e)) if e.1 > b.1 => (
            Some((e.0 - b.0) as f64 / (e.1 - b.1) as f64),
            Some(e.1 - b.1),
        ),
        _ => (None, None),
    };
    let xdp_share = match (split0, split1) {
        (Some((x0, s0)), Some((x1, s1))) if (x1 - x0) + (s1 - s0) > 0.0 => {
            Some((x1 - x0) / ((x1 - x0) + (s1 - s0)))
        }
        _ => None,
    };
    Ok(Run {
        offered_pps: rate,
        sent_pps: sent,
        delivered_pps: delivered,
        loss,
        cpu0,
        cpu1,
        machine_ns_per_packet: if delivered > 0.0 {
            (cpu0 + cpu1) * 1e9 / delivered
        } else {
            f64::NAN
        },
        server_process_cores: f(&["server_cpu_cores"]),
        prog_ns_per_run: prog_ns,
        prog_runs: runs,
        xdp_share,
    })
}

fn what(target: &str) -> &'static str {
    match target {
        "xdp" => "turnpike, XDP fast path, ChannelData",
        "xdp-send" => "turnpike, XDP fast path, Send/Data indications",
        "socket" => "turnpike, socket path (io_uring), ChannelData",
        "socket-send" => "turnpike, socket path (io_uring), Send/Data indications",
        "coturn" => "coturn 4.17.1 (newest), ChannelData",
        "coturn-old" => "coturn 4.6.1 (Debian, old anchor), ChannelData",
        "xdp-hairpin" => "turnpike, hairpin in the XDP program, ChannelData client to client",
        "socket-hairpin" => {
            "turnpike, hairpin in the worker (XDP off), ChannelData client to client"
        }
        "kernel-hairpin" => {
            "turnpike --no-hairpin (XDP off): through the kernel as before, ChannelData client to client"
        }
        "coturn-hairpin" => "coturn 4.17.1 (newest), ChannelData client to client",
        "reflector" => "bare XDP reflector (XDP_TX back to the sender): the floor",
        _ => "?",
    }
}

fn report(a: &XdpArgs, target: &str) -> TargetReport {
    let mut rep = TargetReport {
        name: target.to_owned(),
        what: what(target).to_owned(),
        equal_load: None,
        equal_runs: Vec::new(),
        lossless_pps: None,
        generator_bound: false,
        sweep: Vec::new(),
        error: None,
    };
    let bin = match target {
        "coturn" | "coturn-hairpin" => Some(&a.coturn),
        "coturn-old" => Some(&a.coturn_old),
        _ => None,
    };
    if let Some(b) = bin
        && !b.exists()
    {
        rep.error = Some(format!("{} not found", b.display()));
    }
    rep
}

/// A fresh server per run: allocations of one run do not linger into the next.
fn run_once(a: &XdpArgs, target: &str, rate: u64, label: &str) -> Result<Run> {
    let s = start(a, target)?;
    generate(a, &s, rate, label)
}

/// One equal-load run of round `round`.
fn equal_round(a: &XdpArgs, rep: &mut TargetReport, round: usize) {
    if rep.error.is_some() {
        return;
    }
    match run_once(
        a,
        &rep.name,
        a.equal_rate,
        &format!("{}-equal-{round}", rep.name),
    ) {
        Ok(r) => {
            eprintln!(
                "xdp bench: {} round {round} at {}/s: {:.0} machine ns/packet, program {}",
                rep.name,
                a.equal_rate,
                r.machine_ns_per_packet,
                r.prog_ns_per_run
                    .map_or("-".into(), |v| format!("{v:.0} ns/run"))
            );
            rep.equal_runs.push(r);
        }
        Err(e) => rep.error = Some(format!("{e:#}")),
    }
}

/// The equal-load run with the median machine CPU per packet (the lower one of the
/// middle two for an even count).
fn median_run(runs: &[Run]) -> Option<Run> {
    let mut v: Vec<&Run> = runs.iter().collect();
    v.sort_by(|x, y| x.machine_ns_per_packet.total_cmp(&y.machine_ns_per_packet));
    v.get(v.len().saturating_sub(1) / 2).map(|r| (*r).clone())
}

fn sweep(a: &XdpArgs, rep: &mut TargetReport) {
    if rep.error.is_some() {
        return;
    }
    let target = rep.name.clone();
    let res = (|| -> Result<()> {
        for &rate in &a.rates {
            let r = run_once(a, &target, rate, &target)?;
            eprintln!(
                "xdp bench: {target} offered {rate}/s: sent {:.0}/s, delivered {:.0}/s, loss {:.2} %",
                r.sent_pps,
                r.delivered_pps,
                r.loss * 100.0
            );
            let ok = r.loss <= 0.01;
            let bound = r.sent_pps < 0.95 * rate as f64;
            let delivered = r.delivered_pps;
            rep.sweep.push(r);
            if !ok {
                break;
            }
            // What was delivered per direction, not what was offered: a generator that
            // falls short of the offer makes the figure a lower bound.
            rep.lossless_pps = Some((delivered / 2.0) as u64);
            rep.generator_bound = bound;
            if bound {
                break;
            }
        }
        Ok(())
    })();
    if let Err(e) = res {
        rep.error = Some(format!("{e:#}"));
    }
}

pub fn run(a: &XdpArgs) -> Result<()> {
    if sh("id", &["-u"])?.trim() != "0" {
        bail!("turnpike-bench xdp needs root (network namespaces, XDP)");
    }
    for tool in ["ip", "ethtool", "bpftool", "taskset", "curl"] {
        sh("sh", &["-c", &format!("command -v {tool}")])
            .with_context(|| format!("{tool} is needed"))?;
    }
    std::fs::create_dir_all(&a.out)?;
    let a = XdpArgs {
        turnpike: std::fs::canonicalize(&a.turnpike)
            .with_context(|| format!("{} not found", a.turnpike.display()))?,
        out: std::fs::canonicalize(&a.out)?,
        coturn: a.coturn.clone(),
        coturn_old: a.coturn_old.clone(),
        rates: a.rates.clone(),
        targets: a.targets.clone(),
        ..*a
    };
    let _topo = Topology::new(&a.turnpike)?;
    let stats_before = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .unwrap_or_else(|_| "0".into());
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("cannot enable kernel.bpf_stats_enabled")?;
    let mut reports: Vec<TargetReport> = a.targets.iter().map(|t| report(&a, t)).collect();
    for round in 0..a.repeat.max(1) {
        for rep in &mut reports {
            equal_round(&a, rep, round);
        }
    }
    for rep in &mut reports {
        rep.equal_load = median_run(&rep.equal_runs);
        sweep(&a, rep);
    }
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_before.trim());
    let md = markdown(&a, &reports);
    std::fs::write(a.out.join("xdp.md"), &md)?;
    std::fs::write(
        a.out.join("xdp.json"),
        serde_json::to_string_pretty(&reports)?,
    )?;
    println!("{md}");
    Ok(())
}

fn markdown(a: &XdpArgs, reps: &[TargetReport]) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "XDP bench: {} flows, {} B payloads, {} s per run, server on cpu 0, generator on cpu 1, veth between two namespaces.\n",
        a.clients, a.size, a.duration
    );
    let _ = writeln!(
        o,
        "At equal offered load ({} packets/s per direction):\n",
        a.equal_rate
    );
    let _ = writeln!(
        o,
        "| target | delivered pps | loss | cpu0 busy | cpu1 busy | server process | machine CPU ns/packet | above the floor | XDP program ns/run | relayed by XDP |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    // The reflector's machine CPU per packet (the generator's own cost plus one XDP
    // pass), round by round: each target's run is compared with the reflector's run of
    // the same round, and the median of those differences reported.
    let floor_runs: Vec<f64> = reps
        .iter()
        .find(|r| r.name == "reflector")
        .map(|r| {
            r.equal_runs
                .iter()
                .map(|e| e.machine_ns_per_packet)
                .collect()
        })
        .unwrap_or_default();
    let rounds = reps.iter().map(|r| r.equal_runs.len()).max().unwrap_or(0);
    for r in reps {
        match &r.equal_load {
            Some(e) => {
                let ns: Vec<f64> = r
                    .equal_runs
                    .iter()
                    .map(|e| e.machine_ns_per_packet)
                    .collect();
                let machine = if rounds > 1 {
                    let lo = ns.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = ns.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    format!("{:.0} ({lo:.0}–{hi:.0})", e.machine_ns_per_packet)
                } else {
                    format!("{:.0}", e.machine_ns_per_packet)
                };
                let above = crate::compare::median(
                    ns.iter().zip(&floor_runs).map(|(t, f)| t - f).collect(),
                );
                let prog = crate::compare::median(
                    r.equal_runs
                        .iter()
                        .filter_map(|e| e.prog_ns_per_run)
                        .collect(),
                );
                let _ = writeln!(
                    o,
                    "| {} | {:.0} | {:.2} % | {:.0} % | {:.0} % | {:.0} % | {} | {} | {} | {} |",
                    r.what,
                    e.delivered_pps,
                    e.loss * 100.0,
                    e.cpu0 * 100.0,
                    e.cpu1 * 100.0,
                    e.server_process_cores * 100.0,
                    machine,
                    above.map_or("-".into(), |v| format!("{v:.0}")),
                    prog.map_or("-".into(), |v| format!("{v:.0}")),
                    e.xdp_share
                        .map_or("-".into(), |v| format!("{:.1} %", v * 100.0)),
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "| {} | error: {} | | | | | | | | |",
                    r.what,
                    r.error.as_deref().unwrap_or("?")
                );
            }
        }
    }
    if rounds > 1 {
        let _ = writeln!(
            o,
            "\n{rounds} interleaved rounds: the row is the run with the median machine CPU per packet (range in brackets); \"above the floor\" and the program's run time are medians over the rounds."
        );
    }
    let _ = writeln!(
        o,
        "\nLossless rate (packets/s per direction delivered at the highest offered rate with ≤ 1 % loss; ≥ marks a lower bound where the generator could not send what was offered):\n"
    );
    let _ = writeln!(
        o,
        "| target | lossless pps per direction | sweep (offered: loss) |"
    );
    let _ = writeln!(o, "|---|---:|---|");
    for r in reps {
        let sweep: Vec<String> = r
            .sweep
            .iter()
            .map(|s| format!("{}: {:.2} %", s.offered_pps, s.loss * 100.0))
            .collect();
        let _ = writeln!(
            o,
            "| {} | {}{} | {} |",
            r.what,
            if r.generator_bound { "≥ " } else { "" },
            r.lossless_pps
                .map_or_else(|| "< first rate".to_string(), |v| v.to_string()),
            if let Some(e) = &r.error {
                format!("error: {e}")
            } else {
                sweep.join(", ")
            }
        );
    }
    o
}
