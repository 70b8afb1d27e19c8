//! `turnpike-bench front`: the front door's web pass-through (issue #23) against a
//! direct connection to the same backend, in one run.
//!
//! The bench runs its own backend on loopback with two ports: one that expects a PROXY
//! protocol v2 header (turnpike's `--http-backend` with `--backend-proxy-protocol`) and
//! one without (direct). It speaks just enough HTTP/1.x for the front door to route it:
//! `GET /bytes/N` answers N bytes and closes; `ECHO /` echoes what follows. It starts
//! `turnpike serve` with a TCP listener in front of the first port, then measures, in
//! interleaved rounds, direct and through turnpike:
//! - throughput: one connection downloading `--bytes` bytes;
//! - connection latency: connect, send `ECHO /` and 64 bytes, until they come back, on
//!   `--connections` fresh connections (the front door's routing, its connection to the
//!   backend and the PROXY header are in it);
//! - round trip: `--pings` 64-byte ping-pongs on one established connection (the
//!   spliced path alone).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use hdrhistogram::Histogram;

/// Arguments of `front`.
#[derive(Debug, Args)]
pub struct FrontArgs {
    /// The turnpike binary.
    #[arg(long, default_value = "target/release/turnpike")]
    pub turnpike: std::path::PathBuf,
    /// Bytes downloaded per throughput sample.
    #[arg(long, default_value_t = 1 << 30)]
    pub bytes: u64,
    /// Fresh connections per connection-latency sample.
    #[arg(long, default_value_t = 500)]
    pub connections: usize,
    /// Ping-pongs per round-trip sample.
    #[arg(long, default_value_t = 5000)]
    pub pings: usize,
    /// Interleaved rounds (direct, then through turnpike, each round).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

const PING: [u8; 64] = [0x5a; 64];
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The backend: `proxied` expects a PROXY v2 header first, `direct` does not.
fn backend() -> Result<(SocketAddr, SocketAddr)> {
    let mut addrs = Vec::new();
    for proxied in [true, false] {
        let l = TcpListener::bind("127.0.0.1:0")?;
        addrs.push(l.local_addr()?);
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = serve(c, proxied);
                });
            }
        });
    }
    Ok((addrs[0], addrs[1]))
}

fn serve(c: TcpStream, proxied: bool) -> Result<()> {
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut w = c.try_clone()?;
    let mut r = BufReader::new(c);
    if proxied {
        let mut h = [0u8; 16];
        r.read_exact(&mut h)?;
        if &h[..12] != b"\r\n\r\n\0\r\nQUIT\n" {
            bail!("no PROXY v2 header");
        }
        let mut block = vec![0u8; u16::from_be_bytes([h[14], h[15]]) as usize];
        r.read_exact(&mut block)?;
    }
    let mut line = String::new();
    r.read_line(&mut line)?;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
    }
    if let Some(n) = line.strip_prefix("GET /bytes/") {
        let n: u64 = n.split_whitespace().next().unwrap_or("0").parse()?;
        let chunk = vec![0xa5u8; 256 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len() as u64) as usize;
            w.write_all(&chunk[..k])?;
            left -= k as u64;
        }
    } else if line.starts_with("ECHO ") {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n])?;
        }
    }
    Ok(())
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok(c)
}

/// Bytes per second downloading `bytes`.
fn throughput(addr: SocketAddr, bytes: u64) -> Result<f64> {
    let mut c = connect(addr)?;
    let t = Instant::now();
    c.write_all(format!("GET /bytes/{bytes} HTTP/1.1\r\nHost: bench\r\n\r\n").as_bytes())?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < bytes {
        let n = c.read(&mut buf)?;
        if n == 0 {
            bail!("closed after {got} of {bytes} bytes");
        }
        got += n as u64;
    }
    Ok(bytes as f64 / t.elapsed().as_secs_f64())
}

/// One ping-pong on `c`.
fn ping(c: &mut TcpStream) -> Result<()> {
    c.write_all(&PING)?;
    let mut back = [0u8; 64];
    c.read_exact(&mut back)?;
    Ok(())
}

/// Microseconds from connect to the first echo, per fresh connection.
fn connection_latency(addr: SocketAddr, n: usize) -> Result<Histogram<u64>> {
    let mut h = Histogram::new(3)?;
    for _ in 0..n {
        let t = Instant::now();
        let mut c = connect(addr)?;
        let mut first = b"ECHO / HTTP/1.1\r\n\r\n".to_vec();
        first.extend_from_slice(&PING);
        c.write_all(&first)?;
        let mut back = [0u8; 64];
        c.read_exact(&mut back)?;
        h.record(t.elapsed().as_micros() as u64)?;
    }
    Ok(h)
}

/// Microseconds per ping-pong on one established connection.
fn round_trips(addr: SocketAddr, n: usize) -> Result<Histogram<u64>> {
    let mut c = connect(addr)?;
    c.write_all(b"ECHO / HTTP/1.1\r\n\r\n")?;
    for _ in 0..100 {
        ping(&mut c)?;
    }
    let mut h = Histogram::new(3)?;
    for _ in 0..n {
        let t = Instant::now();
        ping(&mut c)?;
        h.record(t.elapsed().as_micros() as u64)?;
    }
    Ok(h)
}

/// `turnpike serve` in front of the backend; killed on drop.
struct Turnpike(Child);

impl Drop for Turnpike {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_turnpike(bin: &std::path::Path, backend: SocketAddr) -> Result<(Turnpike, SocketAddr)> {
    let probe = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let udp = probe.local_addr()?;
    drop(probe);
    let mut child = Command::new(bin)
        .args([
            "serve",
            "--listen",
            &udp.to_string(),
            "--listen-tcp",
            "127.0.0.1:0",
            "--http-backend",
            &backend.to_string(),
            "--backend-proxy-protocol",
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--user",
            "u:p",
            "--workers",
            "1",
            "--no-pin",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let out = child.stdout.take().context("stdout")?;
    let tp = Turnpike(child);
    let mut lines = BufReader::new(out).lines();
    let ready = loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("turnpike ready:") => break l,
            Some(Ok(_)) => {}
            _ => bail!("turnpike exited before it was ready"),
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    let tcp = ready
        .split_whitespace()
        .find_map(|f| f.strip_prefix("tcp="))
        .context("no tcp= in the ready line")?
        .parse()?;
    Ok((tp, tcp))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs the comparison and prints the table.
pub fn run(a: &FrontArgs) -> Result<()> {
    let (proxied, direct) = backend()?;
    let (_tp, front) = start_turnpike(&a.turnpike, proxied)?;
    println!(
        "front door pass-through vs direct: backend {direct} (direct), {proxied} (PROXY v2) behind turnpike {front}"
    );
    // Per path (direct, turnpike): throughput, and the p50 and p99 of each latency.
    let mut gbps = [Vec::new(), Vec::new()];
    let mut conn = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    let mut rtt = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    for round in 0..a.rounds {
        for (i, addr) in [direct, front].into_iter().enumerate() {
            let t = throughput(addr, a.bytes)? * 8.0 / 1e9;
            let c = connection_latency(addr, a.connections)?;
            let r = round_trips(addr, a.pings)?;
            let name = ["direct", "turnpike"][i];
            println!(
                "round {round} {name:8}: {t:.2} Gbit/s; connect to first echo p50 {} us p99 {} us; round trip p50 {} us p99 {} us",
                c.value_at_quantile(0.5),
                c.value_at_quantile(0.99),
                r.value_at_quantile(0.5),
                r.value_at_quantile(0.99)
            );
            gbps[i].push(t);
            for (k, q) in [0.5, 0.99].into_iter().enumerate() {
                conn[i][k].push(c.value_at_quantile(q) as f64);
                rtt[i][k].push(r.value_at_quantile(q) as f64);
            }
        }
    }
    println!(
        "| path | throughput (Gbit/s) | connect to first echo p50 / p99 (us) | round trip p50 / p99 (us) |"
    );
    println!("| --- | ---: | ---: | ---: |");
    for (i, name) in ["direct to the backend", "through turnpike (splice)"]
        .iter()
        .enumerate()
    {
        let [c50, c99] = &mut conn[i];
        let [r50, r99] = &mut rtt[i];
        println!(
            "| {name} | {:.2} | {:.0} / {:.0} | {:.0} / {:.0} |",
            median(&mut gbps[i]),
            median(c50),
            median(c99),
            median(r50),
            median(r99)
        );
    }
    println!("(medians over {} rounds)", a.rounds);
    Ok(())
}
