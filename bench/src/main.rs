//! turnpike load generator and side-by-side benchmark harness.
//!
//! Every subcommand speaks TURN through `turnpike_proto::client::Client`, so it works
//! against any TURN server; `forwarder` is the bare UDP forwarder used as the physical
//! reference, and `compare` runs turnpike, coturn and the forwarder side by side.
//! Traffic goes to loopback only, and every load loop is bounded in count and time.
#![forbid(unsafe_code)]

mod certs;
mod compare;
mod forwarder;
mod front;
mod hs;
mod net;
mod payload;
mod proc;
mod relay;
mod soak;
mod stream;
mod svg;
mod xdp;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};

/// turnpike-bench: TURN load generator and benchmark harness.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Relay traffic through a TURN server (or the bare forwarder) in both directions
    /// and report delivered packets/s, loss and latency.
    Relay(relay::RelayArgs),
    /// Complete authenticated Allocate + CreatePermission + ChannelBind handshakes as
    /// fast as the server answers them.
    Alloc(AllocArgs),
    /// New client connections per second over TCP or TLS: connect, TLS handshake,
    /// Allocate (401, then with credentials), close.
    Conn(ConnArgs),
    /// Make a test CA and a server certificate for 127.0.0.1 and localhost (PEM files
    /// ca.pem, server.pem, server.key) for TURN over TLS.
    Certs {
        /// The directory to write them to.
        #[arg(long)]
        dir: std::path::PathBuf,
    },
    /// Keep K allocations alive with refreshes and report the server's RSS per
    /// allocation.
    Idle(IdleArgs),
    /// A bare recvmmsg/sendmmsg UDP forwarder (no TURN), the physical reference.
    Forwarder(forwarder::ForwarderArgs),
    /// The front door's web pass-through (splice) against a direct connection to the
    /// same backend: throughput, connection latency and round trip, in one run.
    Front(front::FrontArgs),
    /// turnpike vs coturn vs the bare forwarder, side by side, on pinned cores.
    Compare(compare::CompareArgs),
    /// A short soak (not in CI): allocation churn plus a spoofed-source flood while a
    /// legitimate client keeps allocating and relaying; starts `turnpike serve` itself.
    Soak(soak::SoakArgs),
    /// The XDP fast path vs turnpike's socket path, coturn and a bare XDP reflector,
    /// through a veth pair between two network namespaces it makes (root; Linux).
    Xdp(xdp::XdpArgs),
}

/// How to reach a TURN server.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// The TURN server's UDP address (loopback only).
    #[arg(long, default_value = "127.0.0.1:3478")]
    pub server: SocketAddr,
    /// Long-term credential user name.
    #[arg(long, default_value = "bench")]
    pub user: String,
    /// Long-term credential password.
    #[arg(long, default_value = "bench")]
    pub password: String,
    /// Realm (informational: the client learns it from the server's 401).
    #[arg(long, default_value = "bench")]
    pub realm: String,
}

#[derive(Debug, Args)]
struct AllocArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Handshakes to complete (each on a new client socket).
    #[arg(long, default_value_t = 5000)]
    count: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 30.0)]
    max_seconds: f64,
    /// Pin the generator to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
struct ConnArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    stream: stream::StreamArgs,
    /// Connections to complete.
    #[arg(long, default_value_t = 3000)]
    count: usize,
    /// Connections in flight at once.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 30.0)]
    max_seconds: f64,
    /// The server's pid: its CPU time per connection is reported.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Pin the generator to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
struct IdleArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The server's pid, whose VmRSS is read before and after.
    #[arg(long)]
    server_pid: u32,
    /// Allocations to create and keep alive.
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Seconds to hold the allocations (one Refresh round each, then hold).
    #[arg(long, default_value_t = 2.0)]
    hold_seconds: f64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    max_seconds: f64,
    /// Pin the generator to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Relay(a) => {
            if let Some(c) = a.cpu {
                proc::pin_to(c)?;
            }
            let r = relay::run(&a.to_config()?)?;
            println!("{}", r.summary());
            if let Some(p) = &a.json {
                std::fs::write(p, serde_json::to_string_pretty(&r)?)?;
            }
        }
        Cmd::Alloc(a) => {
            if let Some(c) = a.cpu {
                proc::pin_to(c)?;
            }
            proc::raise_nofile()?;
            let r = hs::alloc_rate(
                &a.server,
                a.count,
                a.window,
                Duration::from_secs_f64(a.max_seconds),
            )?;
            println!("{}", r.summary());
            if let Some(p) = &a.json {
                std::fs::write(p, serde_json::to_string_pretty(&r)?)?;
            }
        }
        Cmd::Conn(a) => {
            if a.stream.transport == stream::Transport::Udp {
                bail!("conn: --transport tcp or tls");
            }
            if let Some(c) = a.cpu {
                proc::pin_to(c)?;
            }
            proc::raise_nofile()?;
            let r = stream::conn_rate(
                a.server.server,
                &a.server,
                a.stream.client_config()?,
                a.count,
                a.window,
                Duration::from_secs_f64(a.max_seconds),
                a.server_pid,
            )?;
            println!("{}", r.summary());
            if let Some(p) = &a.json {
                std::fs::write(p, serde_json::to_string_pretty(&r)?)?;
            }
        }
        Cmd::Certs { dir } => {
            let p = certs::make(&dir)?;
            println!(
                "ca={} cert={} key={}",
                p.ca.display(),
                p.cert.display(),
                p.key.display()
            );
        }
        Cmd::Idle(a) => {
            if let Some(c) = a.cpu {
                proc::pin_to(c)?;
            }
            proc::raise_nofile()?;
            let r = hs::idle_rss(
                &a.server,
                a.server_pid,
                a.count,
                a.window,
                Duration::from_secs_f64(a.hold_seconds),
                Duration::from_secs_f64(a.max_seconds),
            )?;
            println!("{}", r.summary());
            if let Some(p) = &a.json {
                std::fs::write(p, serde_json::to_string_pretty(&r)?)?;
            }
        }
        Cmd::Forwarder(a) => forwarder::run(&a)?,
        Cmd::Compare(a) => compare::run(&a)?,
        Cmd::Soak(a) => soak::run(&a)?,
        Cmd::Xdp(a) => xdp::run(&a)?,
        Cmd::Front(a) => front::run(&a)?,
    }
    Ok(())
}

/// Only loopback targets: this tool must never send load anywhere else.
pub fn check_loopback(a: SocketAddr) -> Result<()> {
    if !a.ip().is_loopback() && !in_own_netns() {
        bail!(
            "{a} is not a loopback address: turnpike-bench only sends to 127.0.0.0/8, or \
             anywhere inside a network namespace of its own (`turnpike-bench xdp` makes them)"
        );
    }
    Ok(())
}

/// Whether this process runs in a named network namespace (`ip netns add`, as
/// `turnpike-bench xdp` makes), whose traffic stays on its own veth pairs.
pub fn in_own_netns() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(me) = std::fs::metadata("/proc/self/ns/net") else {
        return false;
    };
    std::fs::read_dir("/run/netns").is_ok_and(|d| {
        d.flatten().any(|e| {
            e.metadata()
                .is_ok_and(|m| m.ino() == me.ino() && m.dev() == me.dev())
        })
    })
}
