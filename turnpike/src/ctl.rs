//! `turnpike ctl`: the admin client, and the certificate helper.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use turnpike_proto::api::v1::{self, admin_client::AdminClient};

/// Writes a line to stdout; a reader that went away (`ctl list | head`) ends the program
/// quietly, as a command-line tool should.
macro_rules! out {
    ($($t:tt)*) => { emit(format_args!($($t)*)) };
}

fn emit(a: std::fmt::Arguments<'_>) {
    let mut o = std::io::stdout().lock();
    if let Err(e) = writeln!(o, "{a}").and_then(|()| o.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("turnpike: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// Admin client options.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The Admin API's address: http:// (loopback `serve`) or https:// (TLS).
    #[arg(long, env = "TURNPIKE_SERVER", default_value = "http://127.0.0.1:3479")]
    server: String,
    /// The Admin bearer token (`serve` prints one at start when none is configured).
    #[arg(long, env = "TURNPIKE_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the Admin bearer token.
    #[arg(long, env = "TURNPIKE_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify an https:// server with.
    #[arg(long, env = "TURNPIKE_CTL_CA")]
    ca: Option<PathBuf>,
    /// The name expected in the server's certificate.
    #[arg(long, env = "TURNPIKE_CTL_SERVER_NAME", default_value = crate::tls::CONTROL_PLANE_NAME)]
    server_name: String,
    #[command(subcommand)]
    cmd: CtlCmd,
}

#[derive(Debug, Subcommand)]
enum CtlCmd {
    /// List allocations.
    List {
        /// Only this user's.
        #[arg(long, default_value = "")]
        user: String,
        /// Only this data plane's.
        #[arg(long, default_value = "")]
        data_plane: String,
    },
    /// Show one allocation.
    Get {
        /// Allocation id.
        id: u64,
    },
    /// Revoke one allocation.
    Revoke {
        /// Allocation id.
        id: u64,
    },
    /// Revoke every allocation of a user.
    RevokeUser {
        /// The user.
        user: String,
    },
    /// Server and per-data-plane statistics.
    Stats,
    /// Stop new allocations on a data plane (or all, with an empty id).
    Drain {
        /// Data-plane id.
        #[arg(default_value = "")]
        data_plane: String,
        /// Undo.
        #[arg(long)]
        undrain: bool,
    },
    /// Replace the TURN REST API secrets (newest first).
    RotateSecrets {
        /// The secrets.
        #[arg(required = true)]
        secrets: Vec<String>,
    },
    /// Stream lifecycle and usage events.
    Watch {
        /// Only this user's.
        #[arg(long, default_value = "")]
        user: String,
    },
    /// Make the fleet's certificates: a CA (kept if DIR has one), a control-plane
    /// certificate and one per data plane. Needs no server.
    Certs {
        /// Directory to write PEM files to (keys with mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Extra names or IPs for the control plane's certificate, repeatable.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// A data plane id to issue a certificate for, repeatable.
        #[arg(long = "data-plane")]
        data_planes: Vec<String>,
    },
}

/// Runs one admin command.
pub fn run(args: CtlArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if let CtlCmd::Certs {
        out,
        sans,
        data_planes,
    } = &args.cmd
    {
        for p in crate::tls::write_set(out, sans, data_planes)? {
            out!("wrote {}", p.display());
        }
        return Ok(());
    }
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned(),
        (None, None) => anyhow::bail!(
            "the Admin API needs a token: --token, --token-file or TURNPIKE_ADMIN_TOKEN"
        ),
    };
    let bearer: MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .context("the token has characters a header cannot carry")?;
    rt.block_on(async move {
        let mut endpoint = Endpoint::from_shared(args.server.clone())?
            .http2_keep_alive_interval(std::time::Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if args.server.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().domain_name(args.server_name.clone());
            if let Some(ca) = &args.ca {
                let pem = std::fs::read_to_string(ca)
                    .with_context(|| format!("cannot read {}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls)?;
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach {}", args.server))?;
        let mut admin =
            AdminClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", bearer.clone());
                Ok(req)
            });
        match args.cmd {
            CtlCmd::Certs { .. } => {}
            CtlCmd::List { user, data_plane } => {
                let r = admin
                    .list_allocations(v1::ListAllocationsRequest {
                        user_id: user,
                        data_plane_id: data_plane,
                        page_size: 0,
                        page_token: String::new(),
                    })
                    .await?
                    .into_inner();
                out!("{:#?}", r.allocations);
            }
            CtlCmd::Get { id } => {
                let r = admin
                    .get_allocation(v1::GetAllocationRequest { allocation_id: id })
                    .await?;
                out!("{:#?}", r.into_inner().allocation);
            }
            CtlCmd::Revoke { id } => {
                admin
                    .revoke_allocation(v1::RevokeAllocationRequest {
                        allocation_id: id,
                        reason: "ctl".into(),
                    })
                    .await?;
                out!("revoked {id}");
            }
            CtlCmd::RevokeUser { user } => {
                let r = admin
                    .revoke_user_allocations(v1::RevokeUserAllocationsRequest {
                        user_id: user,
                        reason: "ctl".into(),
                    })
                    .await?;
                out!("revoked {}", r.into_inner().revoked);
            }
            CtlCmd::Stats => {
                out!(
                    "{:#?}",
                    admin.get_stats(v1::GetStatsRequest {}).await?.into_inner()
                );
            }
            CtlCmd::Drain {
                data_plane,
                undrain,
            } => {
                let r = admin
                    .drain_data_plane(v1::DrainDataPlaneRequest {
                        data_plane_id: data_plane,
                        undrain,
                    })
                    .await?
                    .into_inner();
                out!("draining={} allocations={}", r.draining, r.allocations);
            }
            CtlCmd::RotateSecrets { secrets } => {
                let r = admin
                    .rotate_secrets(v1::RotateSecretsRequest {
                        secrets: secrets.into_iter().map(|s| s.into_bytes()).collect(),
                    })
                    .await?;
                out!("{} secrets", r.into_inner().secret_count);
            }
            CtlCmd::Watch { user } => {
                let mut s = admin
                    .watch_events(v1::WatchEventsRequest {
                        kinds: vec![],
                        user_id: user,
                        data_plane_id: String::new(),
                    })
                    .await?
                    .into_inner();
                while let Some(e) = s.message().await? {
                    out!("{e:?}");
                }
            }
        }
        Ok(())
    })
}
