//! The turnpike binary: `serve` (control plane and data plane in one process, joined by
//! the same gRPC stream as in split mode), `controlplane`, `dataplane`, `ctl`, and `probe`
//! (checks a deployment end to end, as a client would).
#![forbid(unsafe_code)]

mod config;
mod ctl;
mod drain;
mod fleet;
mod leader;
mod listener;
mod local;
mod metrics;
mod notify;
mod probe;
mod run;
mod tls;
mod tls_clients;
mod turn_tls;
mod upgrade;

use clap::{Parser, Subcommand};

/// turnpike: a TURN relay (RFC 8656) for WebRTC platforms and relay fleets.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Control plane and data plane in one process. With no options: a development
    /// server on 127.0.0.1:3478 with a generated credential, printed at start.
    Serve(config::Flags),
    /// The control plane alone: data planes attach to --grpc-listen.
    Controlplane(config::Flags),
    /// A data plane attached to a control plane: the one given, or the elected leader of
    /// its cell (with --etcd and no --control).
    Dataplane {
        /// The control plane's gRPC address, e.g. https://10.0.0.1:3479.
        #[arg(long, env = "TURNPIKE_CONTROL")]
        control: Option<String>,
        #[command(flatten)]
        flags: config::Flags,
    },
    /// The admin client.
    Ctl(ctl::CtlArgs),
    /// Checks a TURN deployment end to end: reachability, TLS certificate, authentication,
    /// Allocate, CreatePermission, ChannelBind, a relayed echo with RTT, loss and jitter,
    /// the largest datagram. Exits 1 naming the first check that failed.
    Probe(probe::ProbeArgs),
    /// Attaches a test program of the XDP fast path (`pass`: puts the far end of a
    /// test veth in NAPI mode; `reflect`: sends UDP to port 7 back, the benchmark's
    /// floor) to an interface until SIGTERM or SIGINT. For tests and benchmarks.
    #[command(hide = true)]
    XdpTool {
        /// `pass` or `reflect`.
        program: String,
        /// The interface.
        iface: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let format = match &cli.cmd {
        Cmd::Serve(f) | Cmd::Controlplane(f) | Cmd::Dataplane { flags: f, .. } => {
            f.log_format.clone()
        }
        Cmd::Ctl(_) | Cmd::Probe(_) | Cmd::XdpTool { .. } => None,
    };
    init_logging(format.as_deref());
    let result = match cli.cmd {
        Cmd::Serve(flags) => load(&flags).and_then(|c| run::serve(c, run::Control::Embedded)),
        Cmd::Controlplane(flags) => load(&flags).and_then(run::controlplane),
        Cmd::Dataplane { control, flags } => load(&flags).and_then(|c| {
            let control = match control {
                Some(url) => run::Control::Fixed(url),
                None if c.fleet.is_some() => run::Control::Elected,
                None => {
                    eprintln!(
                        "turnpike: invalid configuration: control (--control): a data plane needs its \
                         control plane's address, or --etcd to follow its cell's elected leader"
                    );
                    std::process::exit(64);
                }
            };
            run::serve(c, control)
        }),
        Cmd::Ctl(args) => ctl::run(args),
        Cmd::Probe(args) => std::process::exit(probe::run(args)),
        Cmd::XdpTool { program, iface } => xdp_tool(&program, &iface),
    };
    if let Err(e) = result {
        eprintln!("turnpike: {e:#}");
        std::process::exit(1);
    }
}

/// Logs to stderr, level from `RUST_LOG` (default info). Colour only on a terminal: a
/// file or journald gets no escape codes. `json` writes one JSON object per line.
fn init_logging(format: Option<&str>) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format.unwrap_or("text") {
        "json" => builder.json().with_ansi(false).init(),
        "text" => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        other => {
            eprintln!(
                "turnpike: invalid configuration: --log-format: {other:?}: expected text or json"
            );
            std::process::exit(64);
        }
    }
}

fn load(flags: &config::Flags) -> anyhow::Result<config::Config> {
    match config::Config::load(flags) {
        Ok(c) => Ok(c),
        Err(e) => {
            eprintln!("turnpike: {e}");
            std::process::exit(64);
        }
    }
}

/// `turnpike xdp-tool PROGRAM IFACE`: attached until SIGTERM or SIGINT; a line on stdout
/// once it is.
fn xdp_tool(program: &str, iface: &str) -> anyhow::Result<()> {
    use turnpike_dataplane::xdp::{FastPath, PASS_PROGRAM, REFLECT_PROGRAM};
    let name = match program {
        "pass" => PASS_PROGRAM,
        "reflect" => REFLECT_PROGRAM,
        other => anyhow::bail!("unknown XDP tool {other:?} (pass or reflect)"),
    };
    let _attached = FastPath::attach_tool(name, iface)?;
    println!("attached {name} to {iface}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        anyhow::Ok(())
    })
}
