//! The turnpike binary: `serve` (control plane and data plane in one process, joined by
//! the same gRPC stream as in split mode), `controlplane`, `dataplane`, and `ctl`.
#![forbid(unsafe_code)]

mod config;
mod ctl;
mod metrics;
mod run;

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
    /// A data plane attached to a control plane.
    Dataplane {
        /// The control plane's gRPC address, e.g. http://10.0.0.1:3479.
        #[arg(long, env = "TURNPIKE_CONTROL")]
        control: String,
        #[command(flatten)]
        flags: config::Flags,
    },
    /// The admin client.
    Ctl(ctl::CtlArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve(flags) => load(&flags).and_then(|c| run::serve(c, None)),
        Cmd::Controlplane(flags) => load(&flags).and_then(run::controlplane),
        Cmd::Dataplane { control, flags } => {
            load(&flags).and_then(|c| run::serve(c, Some(control)))
        }
        Cmd::Ctl(args) => ctl::run(args),
    };
    if let Err(e) = result {
        eprintln!("turnpike: {e:#}");
        std::process::exit(1);
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
