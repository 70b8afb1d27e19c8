//! `soak`: a short soak against one `turnpike serve` on loopback (issue #10). For
//! `--seconds`, three loads run at once from the generator's core:
//!
//! - churn: authenticated allocations made and released (Refresh, lifetime 0) in
//!   paced batches from many client sockets, `--churn` in all;
//! - a spoofed-source flood: unauthenticated 20-byte Allocate/Refresh headers from
//!   many 127.x.y.z addresses and ports at `--flood-pps`, never answering a challenge;
//! - a legitimate client that allocates, binds a channel to a local echo peer, relays
//!   a few ChannelData round trips and releases, again and again, timing each step.
//!
//! The server's RSS is read before and after. Not part of CI: it takes a minute and
//! wants two quiet cores. Every loop is bounded in count and time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use hdrhistogram::Histogram;
use turnpike_proto::client::{AllocateOptions, Client, Event};

use crate::ServerArgs;
use crate::compare::{Proc, start_with_ready_line};
use crate::hs::{self, CHANNEL, Plan};
use crate::proc;

#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// The turnpike binary.
    #[arg(long, default_value = "target/release/turnpike")]
    pub turnpike: PathBuf,
    /// How long the loads run.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Allocations to make and release over the run (churn).
    #[arg(long, default_value_t = 10_000)]
    pub churn: usize,
    /// Churn handshakes in flight at once.
    #[arg(long, default_value_t = 64)]
    pub churn_window: usize,
    /// Spoofed-source flood rate, packets per second.
    #[arg(long, default_value_t = 20_000)]
    pub flood_pps: u64,
    /// Distinct flood sources (each its own 127.1.x.y address and port).
    #[arg(long, default_value_t = 1024)]
    pub flood_sources: usize,
    /// Pause between the legitimate client's cycles, in ms.
    #[arg(long, default_value_t = 100)]
    pub legit_interval_ms: u64,
    /// ChannelData round trips per legitimate cycle.
    #[arg(long, default_value_t = 5)]
    pub rtts: usize,
    /// The core the server runs on.
    #[arg(long, default_value_t = 0)]
    pub server_cpu: usize,
    /// The core the generator runs on.
    #[arg(long, default_value_t = 1)]
    pub generator_cpu: usize,
    /// Relay port range of the server.
    #[arg(long, default_value = "10000-31999")]
    pub relay_ports: String,
    /// The server's log (stderr).
    #[arg(long, default_value = "target/soak-server.log")]
    pub server_log: PathBuf,
}

fn hist() -> Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// VmHWM (peak RSS) of a process in KiB.
fn hwm_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in s.lines() {
        if let Some(v) = line.strip_prefix("VmHWM:") {
            return Ok(v.trim().trim_end_matches("kB").trim().parse()?);
        }
    }
    bail!("no VmHWM for pid {pid}")
}

fn start_server(a: &SoakArgs) -> Result<Proc> {
    if let Some(dir) = a.server_log.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    let log = std::fs::File::create(&a.server_log)
        .with_context(|| format!("create {}", a.server_log.display()))?;
    let mut c = Command::new("taskset");
    c.arg("-c")
        .arg(a.server_cpu.to_string())
        .arg(&a.turnpike)
        // The unauthenticated rate limits keep their defaults: the flood is what they
        // are for.
        .args(crate::compare::serve_args(&a.relay_ports))
        .env("RUST_LOG", "warn")
        .stderr(log);
    start_with_ready_line("turnpike", c, "turnpike ready:")
}

#[derive(Debug, Default)]
struct ChurnResult {
    allocated: usize,
    released: usize,
    failed: usize,
    first_error: Option<String>,
}

/// Allocations made and released in batches paced to reach `total` by `deadline`. The
/// client sockets bind 127.0.0.2-127.0.0.17 in turn (the legitimate client has
/// 127.0.0.1 to itself, the flood 127.1.0.0/16).
fn churn(
    server: &ServerArgs,
    total: usize,
    window: usize,
    t0: Instant,
    run: Duration,
) -> Result<ChurnResult> {
    let mut r = ChurnResult::default();
    let mut attempted = 0usize;
    let mut round = 0u8;
    while attempted < total {
        let elapsed = t0.elapsed();
        if elapsed >= run {
            break;
        }
        // Due by now on a straight line to `total` at the end of the run.
        let due = ((total as f64) * (elapsed.as_secs_f64() + 0.25) / run.as_secs_f64()) as usize;
        let batch = due.min(total).saturating_sub(attempted).min(window * 4);
        if batch == 0 {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let plan = Plan {
            peer: None,
            channel: false,
            count: batch,
            window,
            limit: (run - elapsed).min(Duration::from_secs(10)),
            keep: true,
            buffer: 0,
            source: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + round % 16)),
        };
        round = round.wrapping_add(1);
        attempted += batch;
        let mut o = hs::handshakes(server, &plan)?;
        r.allocated += o.completed;
        r.failed += o.failed;
        if r.first_error.is_none() {
            r.first_error = o.first_error.take();
        }
        let (ok, bad) = hs::refresh_all(&mut o.sessions, 0, window, Duration::from_secs(10))?;
        r.released += ok;
        r.failed += bad;
    }
    Ok(r)
}

#[derive(Debug, Default)]
struct FloodResult {
    sent: u64,
    send_errors: u64,
    sources: usize,
}

/// Unauthenticated 20-byte Allocate and Refresh headers from `sources` sockets on
/// distinct 127.1.x.y addresses, at `pps`, until `deadline`; answers are never read.
fn flood(target: SocketAddr, sources: usize, pps: u64, deadline: Instant) -> Result<FloodResult> {
    let mut socks = Vec::with_capacity(sources);
    for i in 0..sources {
        let ip = Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8);
        let s = UdpSocket::bind(SocketAddr::from((ip, 0))).with_context(|| format!("bind {ip}"))?;
        s.set_nonblocking(true)?;
        socks.push(s);
    }
    let mut r = FloodResult {
        sources: socks.len(),
        ..Default::default()
    };
    if socks.is_empty() || pps == 0 {
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        return Ok(r);
    }
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut pkt = [0u8; 20];
    pkt[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
    let t0 = Instant::now();
    let mut n = 0u64;
    let mut next_sock = 0usize;
    while Instant::now() < deadline {
        let due = (t0.elapsed().as_secs_f64() * pps as f64) as u64;
        while n < due {
            // Allocate (0x0003) or Refresh (0x0004), length 0, a fresh transaction id.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            pkt[0..2].copy_from_slice(&(if x & 1 == 0 { 3u16 } else { 4u16 }).to_be_bytes());
            pkt[8..16].copy_from_slice(&x.to_le_bytes());
            pkt[16..20].copy_from_slice(&(n as u32).to_le_bytes());
            match socks[next_sock].send_to(&pkt, target) {
                Ok(_) => r.sent += 1,
                Err(_) => r.send_errors += 1,
            }
            next_sock = (next_sock + 1) % socks.len();
            n += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(r)
}

/// A UDP echo on 127.0.0.1 until `stop`.
fn echo_peer(stop: Arc<AtomicBool>) -> Result<(SocketAddr, std::thread::JoinHandle<()>)> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    let addr = s.local_addr()?;
    let h = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        }
    });
    Ok((addr, h))
}

#[derive(Debug)]
struct LegitResult {
    cycles: usize,
    ok: usize,
    handshake_fail: usize,
    rtt_lost: usize,
    release_fail: usize,
    handshake_us: Histogram<u64>,
    rtt_us: Histogram<u64>,
    first_error: Option<String>,
}

/// What a control transaction ended in.
enum Outcome {
    Allocated(Option<SocketAddr>),
    Done,
    Fail(String),
}

/// Waits for the outstanding transaction of `c` (retransmitting as the client asks).
fn finish(
    sock: &UdpSocket,
    c: &mut Client,
    t0: Instant,
    out: &mut Vec<u8>,
    buf: &mut [u8],
) -> Outcome {
    let ms = || t0.elapsed().as_millis() as u64;
    // At most 7 sends of up to ~40 s in all: bounded by the client's own timeout.
    loop {
        let wait = c
            .poll_timeout()
            .map(|t| t.saturating_sub(ms()).max(1))
            .unwrap_or(1);
        let _ = sock.set_read_timeout(Some(Duration::from_millis(wait)));
        let ev = match sock.recv(buf) {
            Ok(n) => c.handle(ms(), &buf[..n], out),
            Err(_) => c.handle_timeout(ms(), out),
        };
        match ev {
            Event::Retry => {
                let _ = sock.send(out);
            }
            Event::Allocated { relayed, .. } => {
                return Outcome::Allocated(relayed.into_iter().find(SocketAddr::is_ipv4));
            }
            Event::PermissionCreated | Event::ChannelBound { .. } | Event::Refreshed { .. } => {
                return Outcome::Done;
            }
            Event::Failed {
                method,
                code,
                reason,
            } => return Outcome::Fail(format!("{method:?} failed: {code} {reason}")),
            Event::TimedOut { method } => return Outcome::Fail(format!("{method:?} timed out")),
            _ if c.poll_timeout().is_none() => return Outcome::Fail("no transaction".into()),
            _ => {}
        }
    }
}

/// One legitimate cycle: Allocate, CreatePermission, ChannelBind to `peer`, `rtts`
/// ChannelData round trips, Refresh 0.
fn legit_cycle(
    server: SocketAddr,
    peer: SocketAddr,
    rtts: usize,
    seed: u64,
    r: &mut LegitResult,
) -> Result<()> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.connect(server)?;
    let t0 = Instant::now();
    let ms = || t0.elapsed().as_millis() as u64;
    let mut c = Client::new("bench", "bench", seed);
    let mut out = Vec::with_capacity(1500);
    let mut buf = vec![0u8; 2048];
    r.cycles += 1;
    let fail = |r: &mut LegitResult, e: String| {
        r.first_error.get_or_insert(e);
    };
    c.allocate(ms(), AllocateOptions::default(), &mut out)?;
    let _ = sock.send(&out);
    match finish(&sock, &mut c, t0, &mut out, &mut buf) {
        Outcome::Allocated(Some(_)) => {}
        Outcome::Allocated(None) | Outcome::Done => {
            r.handshake_fail += 1;
            fail(r, "Allocate: no IPv4 relayed address".into());
            return Ok(());
        }
        Outcome::Fail(e) => {
            r.handshake_fail += 1;
            fail(r, e);
            return Ok(());
        }
    }
    c.create_permission(ms(), &[peer], &mut out)?;
    let _ = sock.send(&out);
    if let Outcome::Fail(e) = finish(&sock, &mut c, t0, &mut out, &mut buf) {
        r.handshake_fail += 1;
        fail(r, e);
        return Ok(());
    }
    c.channel_bind(ms(), CHANNEL, peer, &mut out)?;
    let _ = sock.send(&out);
    if let Outcome::Fail(e) = finish(&sock, &mut c, t0, &mut out, &mut buf) {
        r.handshake_fail += 1;
        fail(r, e);
        return Ok(());
    }
    r.handshake_us
        .saturating_record(t0.elapsed().as_micros() as u64);
    let mut all_rtts = true;
    let mut frame = [0u8; 64];
    for k in 0..rtts {
        let mut payload = [0u8; 32];
        payload[..8].copy_from_slice(&seed.to_le_bytes());
        payload[8..16].copy_from_slice(&(k as u64).to_le_bytes());
        let n = Client::channel_data(CHANNEL, &payload, &mut frame)?;
        let sent = Instant::now();
        let _ = sock.send(&frame[..n]);
        let mut got = false;
        while sent.elapsed() < Duration::from_secs(1) {
            let left = Duration::from_secs(1).saturating_sub(sent.elapsed());
            let _ = sock.set_read_timeout(Some(left.max(Duration::from_millis(1))));
            let Ok(len) = sock.recv(&mut buf) else { break };
            if let Event::ChannelData { data, .. } = c.handle(ms(), &buf[..len], &mut out)
                && data == payload
            {
                r.rtt_us
                    .saturating_record(sent.elapsed().as_micros() as u64);
                got = true;
                break;
            }
        }
        if !got {
            r.rtt_lost += 1;
            all_rtts = false;
            fail(r, "ChannelData round trip lost".into());
        }
    }
    c.refresh(ms(), 0, &mut out)?;
    let _ = sock.send(&out);
    let released = match finish(&sock, &mut c, t0, &mut out, &mut buf) {
        Outcome::Fail(e) => {
            r.release_fail += 1;
            fail(r, e);
            false
        }
        _ => true,
    };
    if all_rtts && released {
        r.ok += 1;
    }
    Ok(())
}

fn legit(
    server: SocketAddr,
    peer: SocketAddr,
    rtts: usize,
    interval: Duration,
    deadline: Instant,
) -> Result<LegitResult> {
    let mut r = LegitResult {
        cycles: 0,
        ok: 0,
        handshake_fail: 0,
        rtt_lost: 0,
        release_fail: 0,
        handshake_us: hist()?,
        rtt_us: hist()?,
        first_error: None,
    };
    let mut seed = 0x5EED_0000u64;
    while Instant::now() < deadline {
        seed += 1;
        legit_cycle(server, peer, rtts, seed, &mut r)?;
        std::thread::sleep(interval);
    }
    Ok(r)
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

pub fn run(a: &SoakArgs) -> Result<()> {
    proc::raise_nofile()?;
    let srv = start_server(a)?;
    crate::check_loopback(srv.addr)?;
    proc::pin_to(a.generator_cpu)?;
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = proc::rss_kib(srv.pid)?;
    let server = ServerArgs {
        server: srv.addr,
        user: "bench".into(),
        password: "bench".into(),
        realm: "bench".into(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (peer, echo) = echo_peer(stop.clone())?;
    let run = Duration::from_secs(a.seconds);
    let t0 = Instant::now();
    let deadline = t0 + run;
    eprintln!(
        "soak: server pid {} on {} (core {}), {} s: churn {}, flood {} pps from {} sources, legit every {} ms",
        srv.pid,
        srv.addr,
        a.server_cpu,
        a.seconds,
        a.churn,
        a.flood_pps,
        a.flood_sources,
        a.legit_interval_ms
    );
    let (flood_h, legit_h) = {
        let (sources, pps, target) = (a.flood_sources, a.flood_pps, srv.addr);
        let f = std::thread::spawn(move || flood(target, sources, pps, deadline));
        let (rtts, interval) = (a.rtts, Duration::from_millis(a.legit_interval_ms));
        let l = std::thread::spawn(move || legit(target, peer, rtts, interval, deadline));
        (f, l)
    };
    let churn_r = churn(&server, a.churn, a.churn_window.max(1), t0, run);
    let flood_r = flood_h
        .join()
        .map_err(|_| anyhow::anyhow!("flood thread panicked"))?;
    let legit_r = legit_h
        .join()
        .map_err(|_| anyhow::anyhow!("legit thread panicked"))?;
    let elapsed = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = proc::rss_kib(srv.pid).context("server gone after the soak")?;
    let hwm = hwm_kib(srv.pid).unwrap_or(0);
    let churn_r = churn_r?;
    let flood_r = flood_r?;
    let legit_r = legit_r?;

    let rate = if legit_r.cycles == 0 {
        0.0
    } else {
        legit_r.ok as f64 * 100.0 / legit_r.cycles as f64
    };
    println!(
        "## Soak: {} s, churn + spoofed flood + a legitimate client\n",
        a.seconds
    );
    println!("| measure | value |");
    println!("| --- | ---: |");
    println!("| run time | {:.1} s |", elapsed.as_secs_f64());
    println!(
        "| legitimate cycles ok / attempted (Allocate, CreatePermission, ChannelBind, {} ChannelData round trips, Refresh 0) | {} / {} = **{:.2} %** |",
        a.rtts, legit_r.ok, legit_r.cycles, rate
    );
    println!(
        "| legitimate failures: handshake / round trips lost / release | {} / {} / {} |",
        legit_r.handshake_fail, legit_r.rtt_lost, legit_r.release_fail
    );
    println!(
        "| legitimate handshake latency (Allocate incl. 401 .. ChannelBound) p50 / p99 / max | {} / {} / {} |",
        ms(legit_r.handshake_us.value_at_quantile(0.5)),
        ms(legit_r.handshake_us.value_at_quantile(0.99)),
        ms(legit_r.handshake_us.max())
    );
    println!(
        "| relay round trip (ChannelData via echo peer, {} samples) p50 / p99 / max | {} / {} / {} |",
        legit_r.rtt_us.len(),
        ms(legit_r.rtt_us.value_at_quantile(0.5)),
        ms(legit_r.rtt_us.value_at_quantile(0.99)),
        ms(legit_r.rtt_us.max())
    );
    println!(
        "| churn allocations made / released / failed (target {}) | {} / {} / {} |",
        a.churn, churn_r.allocated, churn_r.released, churn_r.failed
    );
    println!(
        "| flood packets sent (send errors) from {} sources, target {} pps | {} ({}) = {:.0} pps |",
        flood_r.sources,
        a.flood_pps,
        flood_r.sent,
        flood_r.send_errors,
        flood_r.sent as f64 / elapsed.as_secs_f64()
    );
    println!(
        "| server RSS before / after (1 s after the run) / peak | {} KiB / {} KiB / {} KiB |",
        rss_before, rss_after, hwm
    );
    if let Some(e) = &legit_r.first_error {
        println!("\nlegitimate client, first error: {e}");
    }
    if let Some(e) = &churn_r.first_error {
        println!("churn, first error: {e}");
    }
    drop(srv);
    Ok(())
}
