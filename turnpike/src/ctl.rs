//! `turnpike ctl`: the admin client, and the certificate helper.
//!
//! What it prints is made without I/O by [`view`] (the values, which `--output json`
//! prints as they are) and [`table`] (the same values as text for people).

mod table;
mod view;

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use turnpike_api::v1::{self, admin_client::AdminClient};

/// Writes a line to stdout; a reader that went away (`ctl list | head`) ends the program
/// quietly, as a command-line tool should.
macro_rules! out {
    ($($t:tt)*) => { emit(format_args!("{}\n", format_args!($($t)*))) };
}

/// Writes `text` (whole lines) to stdout, as [`out!`] does.
fn print(text: &str) {
    emit(format_args!("{text}"));
}

/// How `list`, `get`, `stats`, `watch` and `fleet instances|stats|list|watch` print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Aligned columns under a header row, for people.
    Table,
    /// JSON in the schema of turnpike/CTL.md, for scripts (`watch`: one document a line).
    Json,
}

/// Prints `body` as a JSON document of `kind`: pretty, or on one line for a stream.
fn print_json<T: serde::Serialize>(kind: &'static str, now: view::Now, body: T, one_line: bool) {
    let doc = view::Document::new(kind, now, body);
    let text = if one_line {
        serde_json::to_string(&doc)
    } else {
        serde_json::to_string_pretty(&doc)
    };
    // Plain structs with string keys (serde_json writes a non-finite float as null):
    // serializing them cannot fail.
    let text = text.unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    out!("{text}");
}

/// The wall clock, read once per answer: the views count lifetimes from it.
fn now() -> view::Now {
    view::Now::from_system(std::time::SystemTime::now())
}

fn emit(a: std::fmt::Arguments<'_>) {
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(a).and_then(|()| o.flush()) {
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
    /// Output format of list, get, stats, watch and fleet instances|stats|list|watch:
    /// `table` for people, `json` for scripts (schema: turnpike/CTL.md).
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
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
    /// Show one allocation with its permissions and channels.
    Get {
        /// Allocation id, as `ctl list` prints it.
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
    /// The fleet on etcd: instances, drain, shared secrets and revoked users. Talks to
    /// etcd directly (no Admin token: etcd's own access control applies).
    Fleet {
        /// etcd endpoint, repeatable.
        #[arg(
            long = "etcd",
            env = "TURNPIKE_ETCD",
            value_delimiter = ',',
            required = true
        )]
        etcd: Vec<String>,
        /// The fleet's name.
        #[arg(long, env = "TURNPIKE_FLEET", default_value = "default")]
        fleet: String,
        #[command(subcommand)]
        cmd: FleetCmd,
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

/// Fleet commands (through etcd).
#[derive(Debug, Subcommand)]
enum FleetCmd {
    /// The live instances with their load.
    Instances,
    /// Statistics per instance and for the fleet.
    Stats,
    /// Allocations on every instance (through each one's Admin API; needs the token).
    List {
        /// Only this user's.
        #[arg(long, default_value = "")]
        user: String,
    },
    /// Lifecycle events from every instance, merged (needs the token).
    Watch {
        /// Only this user's.
        #[arg(long, default_value = "")]
        user: String,
    },
    /// Drain an instance (no new allocations: redirected elsewhere in the fleet).
    Drain {
        /// Instance id.
        instance: String,
        /// Undo.
        #[arg(long)]
        undrain: bool,
    },
    /// Replace the TURN REST API secrets of every instance (newest first).
    RotateSecrets {
        /// The secrets.
        #[arg(required = true)]
        secrets: Vec<String>,
    },
    /// Refuse a user everywhere and end its allocations.
    RevokeUser {
        /// The user (username or accounting user).
        user: String,
        /// Why (kept with the revocation).
        #[arg(long, default_value = "revoked by an operator")]
        reason: String,
    },
    /// Take a user off the revoked list.
    UnrevokeUser {
        /// The user.
        user: String,
    },
    /// Users valid on every instance, next to their configured ones (replaces the
    /// fleet's list; none: clear it).
    SetUsers {
        /// NAME:PASSWORD.
        users: Vec<String>,
    },
    /// The peer policy's allow and deny lists on every instance, replacing their
    /// configured ones (`--clear`: back to the configured ones).
    SetPolicy {
        /// A range allowed despite the default deny list, repeatable.
        #[arg(long = "allow")]
        allow: Vec<String>,
        /// A range always denied, repeatable.
        #[arg(long = "deny")]
        deny: Vec<String>,
        /// Remove the fleet's lists.
        #[arg(long)]
        clear: bool,
    },
    /// The allocation quotas on every instance (`--clear`: back to the configured ones).
    SetQuotas {
        /// Allocations per user (0: unlimited).
        #[arg(long = "user", default_value_t = 100)]
        user: u32,
        /// Allocations in all (0: unlimited).
        #[arg(long = "total", default_value_t = 15000)]
        total: u32,
        /// Remove the fleet's quotas.
        #[arg(long)]
        clear: bool,
    },
}

/// How to reach the instances' Admin APIs (their URLs come from the registry).
struct AdminOpts {
    token: Option<String>,
    token_file: Option<PathBuf>,
    ca: Option<PathBuf>,
    server_name: String,
}

/// The live instances' records, by id.
async fn instances(
    e: &turnpike_controlplane_runtime::etcd::Etcd,
    prefix: &str,
) -> anyhow::Result<Vec<turnpike_controlplane::fleet::InstanceRecord>> {
    let listing = e.get_prefix(&format!("{prefix}instances/")).await?;
    Ok(listing
        .entries
        .iter()
        .filter_map(|(_, v)| serde_json::from_slice(v).ok())
        .collect())
}

/// The live instances in id order, drained as their records or a drain key say, and
/// when they were read.
async fn live_instances(
    e: &turnpike_controlplane_runtime::etcd::Etcd,
    prefix: &str,
) -> anyhow::Result<(view::Now, Vec<view::Instance>)> {
    use turnpike_controlplane::fleet::InstanceRecord;
    let listing = e.get_prefix(&format!("{prefix}instances/")).await?;
    let drains = e.get_prefix(&format!("{prefix}drain/")).await?;
    let now = now();
    let mut all: Vec<view::Instance> = listing
        .entries
        .iter()
        .filter_map(|(_, v)| serde_json::from_slice::<InstanceRecord>(v).ok())
        .map(|r| {
            let drained = drains
                .entries
                .iter()
                .any(|(k, _)| k.ends_with(&format!("/{}", r.id)));
            view::Instance::new(&r, drained, now)
        })
        .collect();
    all.sort_by(|a, b| a.id.cmp(&b.id));
    Ok((now, all))
}

async fn fleet_cmd(
    etcd: &[String],
    fleet: &str,
    cmd: FleetCmd,
    admin: &AdminOpts,
    output: Output,
) -> anyhow::Result<()> {
    use turnpike_controlplane_runtime::etcd::Etcd;
    let e = Etcd::connect(etcd).await?;
    let prefix = crate::fleet::prefix(fleet);
    match cmd {
        FleetCmd::Instances => {
            let (now, instances) = live_instances(&e, &prefix).await?;
            match output {
                Output::Table => print(&table::instances(&instances)),
                Output::Json => {
                    print_json(
                        "instance_list",
                        now,
                        view::InstanceList { instances },
                        false,
                    );
                }
            }
        }
        FleetCmd::Stats => {
            let (now, instances) = live_instances(&e, &prefix).await?;
            let stats = view::FleetStats::new(instances);
            match output {
                Output::Table => print(&table::fleet_stats(&stats)),
                Output::Json => print_json("fleet_stats", now, stats, false),
            }
        }
        FleetCmd::List { user } => {
            let bearer = bearer(admin.token.as_deref(), admin.token_file.as_deref())?;
            let mut allocations = Vec::new();
            let mut errors = Vec::new();
            for r in instances(&e, &prefix).await? {
                let mut fail = |error: String| {
                    if output == Output::Table {
                        eprintln!("turnpike: instance {}: {error}", r.id);
                    }
                    errors.push(view::InstanceError {
                        instance: r.id.clone(),
                        error,
                    });
                };
                let Some(url) = r.admin.clone() else {
                    fail("no Admin URL in its record".into());
                    continue;
                };
                let mut a = match connect_admin(
                    &url,
                    &admin.server_name,
                    admin.ca.as_deref(),
                    bearer.clone(),
                )
                .await
                {
                    Ok(a) => a,
                    Err(err) => {
                        fail(format!("{err:#}"));
                        continue;
                    }
                };
                match list_all(&mut a, &user, "").await {
                    Ok(l) => {
                        let now = now();
                        allocations.extend(l.iter().filter_map(|info| {
                            let mut v = view::Allocation::new(info, now)?;
                            v.instance = Some(r.id.clone());
                            Some(v)
                        }));
                    }
                    Err(err) => fail(err.message().to_owned()),
                }
            }
            match output {
                Output::Table => print(&table::allocations(&allocations)),
                Output::Json => print_json(
                    "allocation_list",
                    now(),
                    view::AllocationList {
                        allocations,
                        errors,
                    },
                    false,
                ),
            }
        }
        FleetCmd::Watch { user } => {
            let bearer = bearer(admin.token.as_deref(), admin.token_file.as_deref())?;
            let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, v1::Event)>(1024);
            for r in instances(&e, &prefix).await? {
                let Some(url) = r.admin.clone() else { continue };
                let mut a = connect_admin(
                    &url,
                    &admin.server_name,
                    admin.ca.as_deref(),
                    bearer.clone(),
                )
                .await
                .with_context(|| format!("instance {}", r.id))?;
                let tx = tx.clone();
                let user = user.clone();
                tokio::spawn(async move {
                    let s = a
                        .watch_events(v1::WatchEventsRequest {
                            kinds: vec![],
                            user_id: user,
                            data_plane_id: String::new(),
                        })
                        .await;
                    let Ok(s) = s else { return };
                    let mut s = s.into_inner();
                    while let Ok(Some(ev)) = s.message().await {
                        if tx.send((r.id.clone(), ev)).await.is_err() {
                            return;
                        }
                    }
                });
            }
            drop(tx);
            if output == Output::Table {
                print(&table::event_header(true));
            }
            while let Some((instance, ev)) = rx.recv().await {
                print_event(&view::Event::new(&ev, Some(&instance), now()), output);
            }
        }
        FleetCmd::Drain { instance, undrain } => {
            let key = format!("{prefix}drain/{instance}");
            if undrain {
                e.delete(&key).await?;
                out!("{instance}: open");
            } else {
                e.put(&key, b"1", None).await?;
                out!("{instance}: draining");
            }
        }
        FleetCmd::RotateSecrets { secrets } => {
            if secrets.iter().any(String::is_empty) {
                anyhow::bail!("a secret may not be empty");
            }
            let json = serde_json::to_vec(&secrets)?;
            e.put(&format!("{prefix}config/secrets"), &json, None)
                .await?;
            out!("{} secret(s) in force fleet-wide", secrets.len());
        }
        FleetCmd::RevokeUser { user, reason } => {
            e.put(
                &format!("{prefix}config/revoked/{user}"),
                reason.as_bytes(),
                None,
            )
            .await?;
            out!("{user}: revoked fleet-wide");
        }
        FleetCmd::SetUsers { users } => {
            let key = format!("{prefix}config/users");
            if users.is_empty() {
                e.delete(&key).await?;
                out!("fleet users cleared");
            } else {
                if let Some(bad) = users.iter().find(|u| {
                    !u.split_once(':')
                        .is_some_and(|(n, p)| !n.is_empty() && !p.is_empty())
                }) {
                    anyhow::bail!("{bad:?}: expected NAME:PASSWORD");
                }
                e.put(&key, &serde_json::to_vec(&users)?, None).await?;
                out!("{} fleet user(s)", users.len());
            }
        }
        FleetCmd::SetPolicy { allow, deny, clear } => {
            let key = format!("{prefix}config/policy");
            if clear {
                e.delete(&key).await?;
                out!("fleet peer policy cleared: configured lists in force");
            } else {
                for c in allow.iter().chain(&deny) {
                    c.parse::<turnpike_controlplane::Cidr>()
                        .map_err(|err| anyhow::anyhow!("{c:?}: {err}"))?;
                }
                let p = crate::fleet::PolicyLists { allow, deny };
                e.put(&key, &serde_json::to_vec(&p)?, None).await?;
                out!("fleet peer policy set");
            }
        }
        FleetCmd::SetQuotas { user, total, clear } => {
            let key = format!("{prefix}config/quotas");
            if clear {
                e.delete(&key).await?;
                out!("fleet quotas cleared: configured quotas in force");
            } else {
                let q = crate::fleet::Quotas { user, total };
                e.put(&key, &serde_json::to_vec(&q)?, None).await?;
                out!("fleet quotas: {user} per user, {total} in all");
            }
        }
        FleetCmd::UnrevokeUser { user } => {
            e.delete(&format!("{prefix}config/revoked/{user}")).await?;
            out!("{user}: no longer revoked");
        }
    }
    Ok(())
}

/// The `authorization` header value for the Admin token.
fn bearer(
    token: Option<&str>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<MetadataValue<tonic::metadata::Ascii>> {
    let token = match (token, file) {
        (Some(t), _) => t.to_owned(),
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
    format!("Bearer {token}")
        .parse()
        .context("the token has characters a header cannot carry")
}

/// Adds the bearer token to a call.
type AddToken =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

type Admin = AdminClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, AddToken>,
>;

/// An Admin client of `server` (http:// on loopback, or https:// verified against `ca`
/// for `server_name`) that sends `bearer` with every call.
async fn connect_admin(
    server: &str,
    server_name: &str,
    ca: Option<&std::path::Path>,
    bearer: MetadataValue<tonic::metadata::Ascii>,
) -> anyhow::Result<Admin> {
    let mut endpoint = Endpoint::from_shared(server.to_owned())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if server.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().domain_name(server_name.to_owned());
        if let Some(ca) = ca {
            let pem = std::fs::read_to_string(ca)
                .with_context(|| format!("cannot read {}", ca.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach {server}"))?;
    let auth: AddToken = Box::new(move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", bearer.clone());
        Ok(req)
    });
    Ok(AdminClient::with_interceptor(channel, auth))
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
    if let CtlCmd::Fleet { etcd, fleet, cmd } = args.cmd {
        let admin = AdminOpts {
            token: args.token.clone(),
            token_file: args.token_file.clone(),
            ca: args.ca.clone(),
            server_name: args.server_name.clone(),
        };
        return rt.block_on(fleet_cmd(&etcd, &fleet, cmd, &admin, args.output));
    }
    let bearer = bearer(args.token.as_deref(), args.token_file.as_deref())?;
    rt.block_on(async move {
        let mut admin =
            connect_admin(&args.server, &args.server_name, args.ca.as_deref(), bearer).await?;
        match args.cmd {
            CtlCmd::Certs { .. } | CtlCmd::Fleet { .. } => {}
            CtlCmd::List { user, data_plane } => {
                let all = list_all(&mut admin, &user, &data_plane).await?;
                let now = now();
                let allocations: Vec<view::Allocation> = all
                    .iter()
                    .filter_map(|a| view::Allocation::new(a, now))
                    .collect();
                match args.output {
                    Output::Table => print(&table::allocations(&allocations)),
                    Output::Json => print_json(
                        "allocation_list",
                        now,
                        view::AllocationList {
                            allocations,
                            errors: vec![],
                        },
                        false,
                    ),
                }
            }
            CtlCmd::Get { id } => {
                let r = admin
                    .get_allocation(v1::GetAllocationRequest { allocation_id: id })
                    .await?
                    .into_inner();
                let now = now();
                let allocation = r
                    .allocation
                    .as_ref()
                    .and_then(|a| view::Allocation::new(a, now))
                    .with_context(|| format!("the server sent no allocation {id}"))?;
                match args.output {
                    Output::Table => print(&table::allocation(&allocation)),
                    Output::Json => {
                        print_json("allocation", now, view::AllocationDoc { allocation }, false);
                    }
                }
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
                let stats = admin.get_stats(v1::GetStatsRequest {}).await?.into_inner();
                let now = now();
                let stats = view::Stats::new(&stats, now);
                match args.output {
                    Output::Table => print(&table::stats(&stats)),
                    Output::Json => print_json("stats", now, stats, false),
                }
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
                if args.output == Output::Table {
                    print(&table::event_header(false));
                }
                while let Some(e) = s.message().await? {
                    print_event(&view::Event::new(&e, None, now()), args.output);
                }
            }
        }
        Ok(())
    })
}

/// Prints one event of `ctl watch` or `ctl fleet watch`.
fn print_event(e: &view::Event, output: Output) {
    match output {
        Output::Table => print(&table::event(e)),
        Output::Json => print_json("event", now(), e, true),
    }
}

/// Every allocation (`user`, `data_plane`: filters, empty for all), page after page.
async fn list_all(
    admin: &mut Admin,
    user: &str,
    data_plane: &str,
) -> Result<Vec<v1::AllocationInfo>, tonic::Status> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let r = admin
            .list_allocations(v1::ListAllocationsRequest {
                user_id: user.to_owned(),
                data_plane_id: data_plane.to_owned(),
                page_size: 0,
                page_token,
            })
            .await?
            .into_inner();
        all.extend(r.allocations);
        if r.next_page_token.is_empty() {
            return Ok(all);
        }
        page_token = r.next_page_token;
    }
}
