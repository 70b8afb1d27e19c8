//! `turnpike ctl`: the admin client.

use clap::{Args, Subcommand};
use tonic::transport::Endpoint;
use turnpike_proto::api::v1::{self, admin_client::AdminClient};

/// Admin client options.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The control plane's gRPC address.
    #[arg(long, env = "TURNPIKE_SERVER", default_value = "http://127.0.0.1:3479")]
    server: String,
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
}

/// Runs one admin command.
pub fn run(args: CtlArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let channel = Endpoint::from_shared(args.server.clone())?
            .connect()
            .await?;
        let mut admin = AdminClient::new(channel);
        match args.cmd {
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
                println!("{:#?}", r.allocations);
            }
            CtlCmd::Get { id } => {
                let r = admin
                    .get_allocation(v1::GetAllocationRequest { allocation_id: id })
                    .await?;
                println!("{:#?}", r.into_inner().allocation);
            }
            CtlCmd::Revoke { id } => {
                admin
                    .revoke_allocation(v1::RevokeAllocationRequest {
                        allocation_id: id,
                        reason: "ctl".into(),
                    })
                    .await?;
                println!("revoked {id}");
            }
            CtlCmd::RevokeUser { user } => {
                let r = admin
                    .revoke_user_allocations(v1::RevokeUserAllocationsRequest {
                        user_id: user,
                        reason: "ctl".into(),
                    })
                    .await?;
                println!("revoked {}", r.into_inner().revoked);
            }
            CtlCmd::Stats => {
                println!(
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
                println!("draining={} allocations={}", r.draining, r.allocations);
            }
            CtlCmd::RotateSecrets { secrets } => {
                let r = admin
                    .rotate_secrets(v1::RotateSecretsRequest {
                        secrets: secrets.into_iter().map(|s| s.into_bytes()).collect(),
                    })
                    .await?;
                println!("{} secrets", r.into_inner().secret_count);
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
                    println!("{e:?}");
                }
            }
        }
        Ok(())
    })
}
