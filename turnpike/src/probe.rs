//! `turnpike probe`: checks a TURN deployment end to end, as a client on the user's side
//! of the network would use it, and names the first thing that fails.
//!
//! For each target (a `turn:`/`turns:` URL, or every transport of every instance a
//! fleet registered in etcd) it opens two allocations A and B of its own and checks, in
//! order, stopping at the first failure: name resolution, reachability (a STUN Binding
//! over UDP, a TCP connection otherwise), the TLS certificate (chain, name, days to
//! expiry) and ALPN, authentication, Allocate, CreatePermission (A permits B's relayed
//! address, B permits A's), ChannelBind (A binds a channel to B), a relayed echo of N
//! packets (A→B as ChannelData, which B receives as a Data indication; B→A as a Send
//! indication, which A receives on its channel) with RTT percentiles, loss and jitter,
//! and the largest payload that makes the round trip. See [`report`] for the output.
//!
//! Exit status: 0 when every check passed (warnings allowed), 1 when one failed (named
//! on stderr), 64 for bad arguments.

mod conn;
pub mod nat;
pub mod report;
pub mod stats;
pub mod tls;
pub mod url;

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use rustls::ClientConfig;

use conn::{Link, Outcome, Session};
use report::{Check, Progress, Report, Status, TargetReport, TlsReport};
use stats::EchoStats;
use tls::{SeenChain, TlsFailure, Trust};
use url::{Transport, TurnUrl};

/// Exit status when a check failed.
pub const EXIT_FAILED: i32 = 1;
/// Exit status for bad arguments (as for a bad configuration).
pub const EXIT_USAGE: i32 = 64;

/// The channel A binds to B's relayed address.
const CHANNEL: u16 = 0x4000;
/// Payload size of the echo packets (a typical audio packet with headroom).
const ECHO_SIZE: usize = 200;
/// Payload sizes tried for the largest datagram, largest first: a full Ethernet
/// payload less IPv4 and UDP headers, then sizes below common tunnel MTUs.
const DATAGRAM_SIZES: &[usize] = &[1472, 1400, 1280, 1200, 1000, 500];
/// After this many lost packets at the start of the echo, the path is dead: stop.
const DEAD_AFTER: usize = 3;

/// `turnpike probe` options.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  turnpike probe turn:turn.example.com:3478 --user alice --password s3cret
  turnpike probe turn:turn.example.com?transport=tcp turns:turn.example.com:443 --secret REST_SECRET
  turnpike probe --etcd http://10.0.0.5:2379 --fleet prod --secret REST_SECRET --json")]
pub struct ProbeArgs {
    /// TURN URLs: turn:HOST:PORT?transport=udp|tcp (UDP unless tcp is asked; port 3478
    /// if none) or turns:HOST:PORT (TLS; port 5349 if none).
    urls: Vec<String>,
    /// Username (with --password), or the user part of a TURN REST username (with --secret).
    #[arg(long, env = "TURNPIKE_PROBE_USER")]
    user: Option<String>,
    /// Password of --user.
    #[arg(long, env = "TURNPIKE_PROBE_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// TURN REST API shared secret: the probe makes a username `EXPIRY[:USER]` and its
    /// password base64(HMAC-SHA1(secret, username)), as turnpike and coturn accept.
    #[arg(long, env = "TURNPIKE_PROBE_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Lifetime of a REST credential made from --secret, seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
    /// Trust only the CA certificates in this PEM file for turns: (default: the system's
    /// CA bundle, or SSL_CERT_FILE).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Do not verify the TLS certificate (reported as a warning).
    #[arg(long, conflicts_with = "ca")]
    insecure: bool,
    /// The name to verify in the TLS certificate and send as SNI (default: the URL's host).
    #[arg(long)]
    tls_name: Option<String>,
    /// Echo packets to send through the relay.
    #[arg(long, short = 'n', default_value_t = 100)]
    count: usize,
    /// How long one step may wait for an answer, seconds.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
    /// Loss above this percentage fails the echo.
    #[arg(long, default_value_t = 10.0)]
    max_loss: f64,
    /// Warn when the certificate expires within this many days.
    #[arg(long, default_value_t = 14)]
    warn_days: i64,
    /// Print the report as JSON (its schema: turnpike/src/probe/report.rs).
    #[arg(long)]
    json: bool,
    /// etcd endpoints of a fleet: probe every transport of every registered instance.
    #[arg(long, env = "TURNPIKE_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// The fleet's name (with --etcd).
    #[arg(long, env = "TURNPIKE_FLEET", default_value = "default")]
    fleet: String,
}

/// One thing to probe.
#[derive(Debug, Clone)]
struct Target {
    url: TurnUrl,
    /// The name the certificate must carry (TLS).
    tls_name: Option<String>,
    /// The fleet instance.
    instance: Option<String>,
    /// The instance is drained: a 300 to Allocate is what it should answer.
    draining: bool,
}

/// What every target shares.
#[derive(Debug)]
struct Ctx {
    user: String,
    password: String,
    /// The user as typed, for messages.
    shown_user: String,
    tls: Option<(Arc<ClientConfig>, SeenChain, String)>,
    insecure: bool,
    count: usize,
    timeout: Duration,
    max_loss: f64,
    warn_days: i64,
    progress: Progress,
}

/// Runs the probe; returns the exit status.
pub fn run(args: ProbeArgs) -> i32 {
    match prepare(&args) {
        Ok((ctx, targets)) => {
            let reports = targets.iter().map(|t| probe(t, &ctx)).collect();
            let report = Report::new(reports);
            print(&report, args.json);
            if report.ok { 0 } else { EXIT_FAILED }
        }
        Err(Usage(msg)) => {
            eprintln!("turnpike probe: {msg}");
            EXIT_USAGE
        }
    }
}

/// A bad argument.
#[derive(Debug)]
struct Usage(String);

fn prepare(args: &ProbeArgs) -> Result<(Ctx, Vec<Target>), Usage> {
    let (user, password, shown_user) = credential(args)?;
    let mut targets = Vec::new();
    for u in &args.urls {
        let url: TurnUrl = u.parse().map_err(|e| Usage(format!("{e}")))?;
        targets.push(Target {
            tls_name: (url.transport == Transport::Tls)
                .then(|| args.tls_name.clone().unwrap_or_else(|| url.host.clone())),
            url,
            instance: None,
            draining: false,
        });
    }
    if !args.etcd.is_empty() {
        targets.extend(fleet_targets(&args.etcd, &args.fleet).map_err(|e| {
            Usage(format!(
                "cannot read fleet {:?} from etcd: {e:#}",
                args.fleet
            ))
        })?);
    }
    if targets.is_empty() {
        return Err(Usage(
            "nothing to probe: give turn:/turns: URLs, or --etcd with a fleet that has instances"
                .into(),
        ));
    }
    if args.count == 0 || args.count > 100_000 {
        return Err(Usage("--count: 1 to 100000 packets".into()));
    }
    if args.timeout == 0 || args.timeout > 300 {
        return Err(Usage("--timeout: 1 to 300 seconds".into()));
    }
    let tls = if targets.iter().any(|t| t.url.transport == Transport::Tls) {
        let trust = match (&args.ca, args.insecure) {
            (_, true) => Trust::Insecure,
            (Some(p), false) => Trust::File(p.clone()),
            (None, false) => Trust::System,
        };
        Some(tls::client_config(&trust).map_err(|e| Usage(format!("{e:#}")))?)
    } else {
        None
    };
    Ok((
        Ctx {
            user,
            password,
            shown_user,
            tls,
            insecure: args.insecure,
            count: args.count,
            timeout: Duration::from_secs(args.timeout),
            max_loss: args.max_loss,
            warn_days: args.warn_days,
            progress: Progress::new(args.json),
        },
        targets,
    ))
}

/// (username, password, the user for messages) from the flags.
fn credential(args: &ProbeArgs) -> Result<(String, String, String), Usage> {
    match (&args.user, &args.password, &args.secret) {
        (Some(u), Some(p), None) => Ok((u.clone(), p.clone(), u.clone())),
        (u, None, Some(secret)) => {
            #[allow(clippy::disallowed_methods)] // TURN REST usernames carry a wall-clock expiry.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let expiry = now.saturating_add(args.ttl);
            let name = match u {
                Some(u) => format!("{expiry}:{u}"),
                None => expiry.to_string(),
            };
            let password = turnpike_controlplane::auth::rest_password(secret, &name);
            Ok((name.clone(), password, name))
        }
        (_, Some(_), Some(_)) => Err(Usage("--password and --secret: give one".into())),
        (None, Some(_), None) => Err(Usage("--password needs --user".into())),
        (_, None, None) => Err(Usage(
            "a credential is needed: --user U --password P, or --secret S (TURN REST)".into(),
        )),
    }
}

/// Every transport of every instance registered in the fleet.
fn fleet_targets(etcd: &[String], fleet: &str) -> anyhow::Result<Vec<Target>> {
    use turnpike_controlplane::fleet::InstanceRecord;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let records: Vec<InstanceRecord> = rt.block_on(async {
        let e = turnpike_controlplane_runtime::etcd::Etcd::connect(etcd).await?;
        let listing = e
            .get_prefix(&format!("{}instances/", crate::fleet::prefix(fleet)))
            .await?;
        anyhow::Ok(
            listing
                .entries
                .iter()
                .filter_map(|(_, v)| serde_json::from_slice(v).ok())
                .collect(),
        )
    })?;
    let mut targets = Vec::new();
    for r in records {
        let url = |a: &SocketAddr, transport| TurnUrl {
            host: a.ip().to_string(),
            port: a.port(),
            transport,
        };
        let each = [
            (&r.udp, Transport::Udp),
            (&r.tcp, Transport::Tcp),
            (&r.tls, Transport::Tls),
        ];
        for (addrs, transport) in each {
            for a in addrs {
                targets.push(Target {
                    url: url(a, transport),
                    tls_name: (transport == Transport::Tls)
                        .then(|| r.tls_domain.clone().unwrap_or_else(|| a.ip().to_string())),
                    instance: Some(r.id.clone()),
                    draining: r.draining,
                });
            }
        }
    }
    Ok(targets)
}

fn print(report: &Report, json: bool) {
    use std::io::Write as _;
    let text = if json {
        serde_json::to_string_pretty(report).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
            + "\n"
    } else {
        report.table()
    };
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes()).and_then(|()| o.flush());
    for t in &report.targets {
        for c in t.checks.iter().filter(|c| c.status == Status::Fail) {
            eprintln!("FAIL {}: {} ({})", c.step, c.detail, t.url);
            if let Some(h) = &c.hint {
                eprintln!("  hint: {h}");
            }
        }
    }
}

/// A failed check ended the target's run.
struct Stop;

/// Records checks of one target as they happen.
struct Recorder<'a> {
    r: TargetReport,
    progress: &'a Progress,
}

impl Recorder<'_> {
    fn push(
        &mut self,
        step: &'static str,
        status: Status,
        detail: String,
        hint: Option<String>,
        ms: Option<f64>,
    ) {
        let c = Check {
            step,
            status,
            detail,
            hint,
            ms,
        };
        self.progress.check(&self.r.url, &c);
        self.r.checks.push(c);
    }

    fn pass(&mut self, step: &'static str, detail: String, since: Option<Instant>) {
        self.push(step, Status::Pass, detail, None, since.map(elapsed_ms));
    }

    fn warn(&mut self, step: &'static str, detail: String, hint: Option<String>) {
        self.push(step, Status::Warn, detail, hint, None);
    }

    fn fail(&mut self, step: &'static str, detail: String, hint: Option<String>) -> Stop {
        self.push(step, Status::Fail, detail, hint, None);
        Stop
    }
}

fn elapsed_ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// Probes one target.
fn probe(t: &Target, ctx: &Ctx) -> TargetReport {
    let mut rec = Recorder {
        r: TargetReport {
            url: t.url.to_string(),
            transport: t.url.transport,
            instance: t.instance.clone(),
            address: None,
            software: None,
            realm: None,
            mapped: None,
            relayed: Vec::new(),
            tls: None,
            nat: None,
            echo: None,
            max_datagram: None,
            checks: Vec::new(),
            ok: false,
        },
        progress: &ctx.progress,
    };
    let _ = steps(t, ctx, &mut rec);
    let mut r = rec.r;
    r.ok = r.checks.iter().all(|c| c.status != Status::Fail);
    r
}

fn seed() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

fn steps(t: &Target, ctx: &Ctx, rec: &mut Recorder<'_>) -> Result<(), Stop> {
    // resolve
    let started = Instant::now();
    let addr = match (t.url.host.as_str(), t.url.port).to_socket_addrs() {
        Ok(mut it) => match it.next() {
            Some(a) => a,
            None => {
                return Err(rec.fail("resolve", format!("{} has no address", t.url.host), None));
            }
        },
        Err(e) => {
            return Err(rec.fail(
                "resolve",
                format!("cannot resolve {}: {e}", t.url.host),
                Some("check the host name and this machine's DNS".into()),
            ));
        }
    };
    rec.r.address = Some(addr.to_string());
    if t.url.host.parse::<std::net::IpAddr>().is_err() {
        rec.pass(
            "resolve",
            format!("{} is {}", t.url.host, addr.ip()),
            Some(started),
        );
    }

    // reachability, TLS, Binding: allocation A's connection.
    let mut a = connect(t, ctx, addr, rec, true)?;

    // NAT behaviour, when the server offers its discovery (RFC 5780; UDP only).
    if t.url.transport == Transport::Udp {
        let started = Instant::now();
        if let Ok(Some(nat)) = nat::discover(addr) {
            rec.pass(
                "nat",
                format!(
                    "{} mapping, {} filtering (RFC 5780, other address {})",
                    nat.mapping, nat.filtering, nat.other_address
                ),
                Some(started),
            );
            rec.r.nat = Some(nat);
        }
    }

    // authentication, allocate
    let started = Instant::now();
    let (a_relayed, lifetime) = match a.allocate() {
        Outcome::Allocated {
            relayed,
            mapped,
            lifetime,
        } => {
            rec.r.realm = a.realm().map(str::to_owned);
            auth_passed(&a, ctx, rec);
            if let Some(m) = mapped {
                rec.r.mapped = Some(m.to_string());
            }
            (relayed, lifetime)
        }
        other => {
            rec.r.realm = a.realm().map(str::to_owned);
            rec.r.software = a.software.clone().or(rec.r.software.take());
            return Err(allocate_failed(t, &a, ctx, rec, other, "Allocate"));
        }
    };
    rec.r.software = a.software.clone().or(rec.r.software.take());
    let Some(a_rel) = a_relayed.first().copied() else {
        return Err(rec.fail(
            "allocate",
            "the Allocate response has no XOR-RELAYED-ADDRESS".into(),
            None,
        ));
    };
    let mut b = connect(t, ctx, addr, rec, false)?;
    let b_relayed = match b.allocate() {
        Outcome::Allocated { relayed, .. } => relayed,
        other => {
            return Err(allocate_failed(
                t,
                &b,
                ctx,
                rec,
                other,
                "the second Allocate",
            ));
        }
    };
    let Some(b_rel) = b_relayed
        .iter()
        .find(|r| r.is_ipv4() == a_rel.is_ipv4())
        .copied()
    else {
        return Err(rec.fail(
            "allocate",
            format!("the two allocations have no relayed address of the same family: {a_relayed:?} {b_relayed:?}"),
            None,
        ));
    };
    rec.r.relayed = vec![a_rel.to_string(), b_rel.to_string()];
    rec.pass(
        "allocate",
        format!("relayed {a_rel} and {b_rel}, lifetime {lifetime} s"),
        Some(started),
    );

    let result = relay_steps(ctx, rec, &mut a, &mut b, a_rel, b_rel);
    // Release both allocations; what the server answers does not matter any more.
    let _ = a.refresh(0);
    let _ = b.refresh(0);
    result
}

/// CreatePermission, ChannelBind, the echo and the largest datagram.
fn relay_steps(
    ctx: &Ctx,
    rec: &mut Recorder<'_>,
    a: &mut Session,
    b: &mut Session,
    a_rel: SocketAddr,
    b_rel: SocketAddr,
) -> Result<(), Stop> {
    let started = Instant::now();
    for (who, s, peer) in [("A", &mut *a, b_rel), ("B", &mut *b, a_rel)] {
        match s.create_permission(peer) {
            Outcome::Done => {}
            Outcome::Failed { code: 403, reason } => {
                return Err(rec.fail(
                    "create-permission",
                    format!("403 {reason}: the server refuses peer {peer} (allocation {who})"),
                    Some(format!(
                        "the server refuses this peer; its relayed addresses are {a_rel} and {b_rel} — \
                         allow them as peers (turnpike: --allow-peer CIDR; coturn: --allowed-peer-ip, \
                         --allow-loopback-peers) or probe from outside"
                    )),
                ));
            }
            other => {
                return Err(rec.fail(
                    "create-permission",
                    format!("for peer {peer} (allocation {who}): {}", describe(&other)),
                    None,
                ));
            }
        }
    }
    rec.pass(
        "create-permission",
        format!("A permits {b_rel}, B permits {a_rel}"),
        Some(started),
    );

    let started = Instant::now();
    match a.channel_bind(CHANNEL, b_rel) {
        Outcome::Done => rec.pass(
            "channel-bind",
            format!("channel 0x{CHANNEL:04X} to {b_rel}"),
            Some(started),
        ),
        other => {
            return Err(rec.fail(
                "channel-bind",
                format!("channel 0x{CHANNEL:04X} to {b_rel}: {}", describe(&other)),
                None,
            ));
        }
    }

    // The echo.
    let started = Instant::now();
    let per_packet = ctx.timeout.min(Duration::from_secs(1));
    let budget = Instant::now() + ctx.timeout * 4;
    let (rtts, how) = echo(a, b, a_rel, ctx.count, ECHO_SIZE, per_packet, budget);
    let stats = EchoStats::from_rtts(&rtts);
    rec.r.echo = Some(stats.clone());
    let line = format!("{}{}", stats.line(), how.note());
    if stats.received == 0 {
        return Err(rec.fail(
            "echo",
            line,
            Some(format!(
                "nothing came back through the relay: is UDP between the relayed addresses \
                 ({a_rel}, {b_rel}) blocked, or is the relay address not the one the server \
                 can send from (1:1 NAT: --external-ip)?{}",
                how.where_lost()
            )),
        ));
    }
    if stats.loss_percent > ctx.max_loss {
        return Err(rec.fail(
            "echo",
            line,
            Some(format!(
                "loss above --max-loss {} %{}",
                ctx.max_loss,
                how.where_lost()
            )),
        ));
    }
    rec.pass("echo", line, Some(started));

    // The largest datagram.
    let started = Instant::now();
    let mut largest = None;
    let mut tried = Vec::new();
    'sizes: for &size in DATAGRAM_SIZES {
        for attempt in 0..2 {
            let seq = 1_000_000 + (size * 4 + attempt) as u32;
            if echo_one(a, b, a_rel, seq, size, per_packet, &mut EchoPath::default()).is_some() {
                largest = Some(size);
                break 'sizes;
            }
        }
        tried.push(size.to_string());
    }
    rec.r.max_datagram = largest;
    match largest {
        Some(n) if tried.is_empty() => rec.pass(
            "max-datagram",
            format!("{n} bytes of payload come back (the largest tried)"),
            Some(started),
        ),
        Some(n) if n >= 1200 => rec.pass(
            "max-datagram",
            format!("{n} bytes of payload come back ({} did not)", tried.join(", ")),
            Some(started),
        ),
        Some(n) => rec.warn(
            "max-datagram",
            format!("only {n} bytes of payload come back ({} did not)", tried.join(", ")),
            Some("WebRTC sends up to about 1200 bytes per packet: look for a small MTU or a filter on the path".into()),
        ),
        None => {
            return Err(rec.fail(
                "max-datagram",
                format!("no payload of {} bytes came back", tried.join(", ")),
                None,
            ));
        }
    }
    Ok(())
}

/// Opens a connection for an allocation (A: recording every check; B: failures only).
fn connect(
    t: &Target,
    ctx: &Ctx,
    addr: SocketAddr,
    rec: &mut Recorder<'_>,
    first: bool,
) -> Result<Session, Stop> {
    let which = if first { "" } else { " (second connection)" };
    let started = Instant::now();
    let unreachable_hint = || {
        Some(format!(
            "is the server listening on {} {addr}, and does a firewall let it through?",
            t.url.transport
        ))
    };
    let link = match t.url.transport {
        Transport::Udp => Link::udp(addr).map_err(|e| {
            rec.fail(
                "reachability",
                format!("cannot open a UDP socket to {addr}: {e}"),
                None,
            )
        })?,
        Transport::Tcp => {
            let link = Link::tcp(addr, ctx.timeout).map_err(|e| {
                rec.fail(
                    "reachability",
                    format!("cannot connect to {addr} over TCP{which}: {e}"),
                    unreachable_hint(),
                )
            })?;
            if first {
                rec.pass(
                    "reachability",
                    format!("TCP connection to {addr} accepted"),
                    Some(started),
                );
            }
            link
        }
        Transport::Tls => {
            let Some((cfg, seen, trust)) = &ctx.tls else {
                return Err(rec.fail("tls-handshake", "no TLS configuration".into(), None));
            };
            let name = t.tls_name.clone().unwrap_or_else(|| t.url.host.clone());
            let server_name = tls::server_name(&name)
                .map_err(|e| rec.fail("tls-name", format!("not a valid name: {e}"), None))?;
            if let Ok(mut s) = seen.lock() {
                s.clear();
            }
            let tcp = Link::tls(addr, cfg.clone(), server_name, ctx.timeout).map_err(|e| {
                rec.fail(
                    "reachability",
                    format!("cannot connect to {addr} over TCP{which}: {e}"),
                    unreachable_hint(),
                )
            })?;
            if first {
                rec.pass(
                    "reachability",
                    format!("TCP connection to {addr} accepted"),
                    Some(started),
                );
            }
            let chain = seen.lock().map(|s| s.clone()).unwrap_or_default();
            let info = tls::describe(&chain, unix_now());
            if first {
                rec.r.tls = Some(TlsReport {
                    trust: trust.clone(),
                    certificate: info.clone(),
                    ..TlsReport::default()
                });
            }
            match tcp {
                Ok(link) => {
                    if first {
                        tls_checks(ctx, rec, &link, &name, info.as_ref(), trust);
                        if let Some(tr) = rec.r.tls.as_mut() {
                            tr.version = link.tls_version();
                            tr.alpn = link
                                .alpn()
                                .map(|a| String::from_utf8_lossy(&a).into_owned());
                        }
                    }
                    link
                }
                Err(e) => return Err(tls_failed(rec, &e, &name, info.as_ref(), trust)),
            }
        }
    };
    let mut s = Session::new(link, &ctx.user, &ctx.password, ctx.timeout, seed());
    let started_binding = Instant::now();
    match s.binding() {
        Ok(mapped) => {
            rec.r.software = s.software.clone().or(rec.r.software.take());
            if first {
                if let Some(m) = mapped {
                    rec.r.mapped = Some(m.to_string());
                }
                let m = mapped.map_or(String::new(), |m| format!("; mapped address {m}"));
                match t.url.transport {
                    Transport::Udp => rec.pass(
                        "reachability",
                        format!("STUN Binding answered by {addr}{m}"),
                        Some(started),
                    ),
                    _ => rec.pass(
                        "binding",
                        format!("STUN Binding answered{m}"),
                        Some(started_binding),
                    ),
                }
            }
            Ok(s)
        }
        Err(e) => {
            let step = match t.url.transport {
                Transport::Udp => "reachability",
                _ => "binding",
            };
            Err(rec.fail(step, format!("{addr}{which}: {e}"), unreachable_hint()))
        }
    }
}

#[allow(clippy::disallowed_methods)] // Certificate validity is wall-clock time.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn names_of(info: Option<&tls::CertInfo>) -> String {
    match info {
        Some(i) if !i.names.is_empty() => i.names.join(", "),
        Some(i) => format!("subject {} (no subjectAltName)", i.subject),
        None => "an unreadable certificate".into(),
    }
}

/// The checks of a completed handshake.
fn tls_checks(
    ctx: &Ctx,
    rec: &mut Recorder<'_>,
    link: &Link,
    name: &str,
    info: Option<&tls::CertInfo>,
    trust: &str,
) {
    let version = link.tls_version().unwrap_or_default();
    rec.pass("tls-handshake", format!("{version} with {name}"), None);
    let chain_len = info.map_or(0, |i| i.chain_len);
    let issuer = info.map_or(String::new(), |i| format!(", issued by {}", i.issuer));
    if ctx.insecure {
        rec.warn(
            "tls-chain",
            format!("not verified (--insecure): {chain_len} certificate(s){issuer}"),
            Some(
                "clients verify it: check it without --insecure (--ca FILE for a private CA)"
                    .into(),
            ),
        );
        let names = names_of(info);
        rec.warn(
            "tls-name",
            format!("not verified (--insecure): certificate is for {names}"),
            None,
        );
    } else {
        rec.pass(
            "tls-chain",
            format!("verified against {trust}: {chain_len} certificate(s){issuer}"),
            None,
        );
        rec.pass(
            "tls-name",
            format!("certificate is for {}", names_of(info)),
            None,
        );
    }
    match info {
        Some(i) if i.days_to_expiry < 0 => {
            rec.push(
                "tls-expiry",
                Status::Fail,
                format!(
                    "certificate expired {} days ago ({})",
                    -i.days_to_expiry, i.not_after
                ),
                Some("renew the certificate".into()),
                None,
            );
        }
        Some(i) if i.days_to_expiry < ctx.warn_days => rec.warn(
            "tls-expiry",
            format!(
                "certificate expires in {} days ({})",
                i.days_to_expiry, i.not_after
            ),
            Some("renew the certificate soon".into()),
        ),
        Some(i) => rec.pass(
            "tls-expiry",
            format!(
                "certificate expires in {} days ({})",
                i.days_to_expiry, i.not_after
            ),
            None,
        ),
        None => rec.warn(
            "tls-expiry",
            "cannot read the certificate's validity".into(),
            None,
        ),
    }
    match link.alpn() {
        Some(p) if p == tls::ALPN_TURN => rec.pass("tls-alpn", "stun.turn negotiated".into(), None),
        Some(p) => rec.warn(
            "tls-alpn",
            format!(
                "the server chose {:?}, not stun.turn",
                String::from_utf8_lossy(&p)
            ),
            None,
        ),
        None => rec.warn(
            "tls-alpn",
            "none: the server did not select stun.turn (RFC 7443)".into(),
            Some(
                "fine for most clients; a server sharing port 443 with a web site routes by it"
                    .into(),
            ),
        ),
    }
}

/// The check a failed handshake failed.
fn tls_failed(
    rec: &mut Recorder<'_>,
    e: &std::io::Error,
    name: &str,
    info: Option<&tls::CertInfo>,
    trust: &str,
) -> Stop {
    match tls::classify(e) {
        TlsFailure::Name => rec.fail(
            "tls-name",
            format!("certificate is for {}, not {name}", names_of(info)),
            Some("connect with the name in the certificate (--tls-name, or the URL's host), or get a certificate for this name".into()),
        ),
        TlsFailure::Chain => rec.fail(
            "tls-chain",
            format!("certificate not trusted: {e} (trusting {trust})"),
            Some("serve the whole chain (leaf and intermediates); for a private CA: --ca FILE".into()),
        ),
        TlsFailure::Expiry => rec.fail(
            "tls-expiry",
            format!(
                "certificate not valid now: {e}{}",
                info.map_or(String::new(), |i| format!(" (notAfter {})", i.not_after))
            ),
            Some("renew the certificate, and check this machine's clock".into()),
        ),
        TlsFailure::Handshake => rec.fail("tls-handshake", format!("TLS handshake failed: {e}"), None),
    }
}

/// Records authentication after a successful Allocate.
fn auth_passed(s: &Session, ctx: &Ctx, rec: &mut Recorder<'_>) {
    if s.challenged {
        let realm = s.realm().unwrap_or("?");
        rec.pass(
            "authentication",
            format!("user {:?} accepted in realm {realm:?}", ctx.shown_user),
            None,
        );
    } else {
        rec.warn(
            "authentication",
            "the server allocated without asking for credentials".into(),
            Some("an open relay is abused: require long-term credentials".into()),
        );
    }
}

/// Records why an Allocate failed (authentication or the allocation itself).
fn allocate_failed(
    t: &Target,
    s: &Session,
    ctx: &Ctx,
    rec: &mut Recorder<'_>,
    o: Outcome,
    what: &str,
) -> Stop {
    match o {
        Outcome::Failed { code: 401, reason } => rec.fail(
            "authentication",
            format!(
                "401 {reason}: the server refused user {:?}{}",
                ctx.shown_user,
                s.realm().map_or(String::new(), |r| format!(" in realm {r:?}"))
            ),
            Some("check --user/--password (or --secret against the server's REST secret; the clocks must agree)".into()),
        ),
        other => {
            if s.challenged {
                auth_passed(s, ctx, rec);
            }
            if t.draining && matches!(other, Outcome::Failed { code: 300, .. }) {
                rec.warn(
                    "allocate",
                    format!("{what}: 300: the instance is drained and redirects new allocations"),
                    Some("undrain it to probe its relay (turnpike ctl fleet drain --undrain)".into()),
                );
                return Stop;
            }
            let hint = match &other {
                Outcome::Failed { code: 486, .. } => Some("this user's allocation quota is used up (turnpike: --user-quota)".into()),
                Outcome::Failed { code: 508, .. } => Some("the server has no relay capacity (ports or --total-quota)".into()),
                Outcome::Failed { code: 300, .. } => Some("the server redirects new allocations (draining or loaded): probe the others".into()),
                Outcome::Failed { code: 437, .. } => Some("an allocation of this 5-tuple exists already".into()),
                Outcome::TimedOut if !s.challenged => Some("the server answered Binding but not Allocate: is it a TURN server?".into()),
                _ => None,
            };
            rec.fail("allocate", format!("{what}: {}", describe(&other)), hint)
        }
    }
}

fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Allocated { .. } | Outcome::Done => "succeeded".into(),
        Outcome::Failed { code, reason } => format!("{code} {reason}"),
        Outcome::TimedOut => "no answer in time".into(),
        Outcome::Io(e) => format!("connection failed: {e}"),
    }
}

/// How the echo's packets travelled, and where lost ones stopped.
#[derive(Debug, Default)]
struct EchoPath {
    /// B received from A as a Data indication / as ChannelData.
    b_data: usize,
    b_channel: usize,
    /// A received from B on its channel / as a Data indication.
    a_channel: usize,
    a_data: usize,
    /// Lost on the way A→B (B never saw them) / B→A.
    lost_to_b: usize,
    lost_to_a: usize,
    /// An I/O error that ended the echo.
    error: Option<String>,
}

impl EchoPath {
    fn note(&self) -> String {
        let mut s = String::new();
        if self.b_data + self.b_channel > 0 {
            s += &format!(
                "; A→B as ChannelData, B got {}",
                if self.b_channel > 0 {
                    "ChannelData"
                } else {
                    "Data indications"
                }
            );
        }
        if self.a_channel + self.a_data > 0 {
            s += &format!(
                "; B→A as Send indications, A got {}",
                if self.a_data > 0 {
                    "Data indications"
                } else {
                    "ChannelData"
                }
            );
        }
        if let Some(e) = &self.error {
            s += &format!("; stopped: {e}");
        }
        s
    }

    fn where_lost(&self) -> String {
        if self.lost_to_b + self.lost_to_a == 0 {
            return String::new();
        }
        format!(
            " ({} lost on the way A→B via ChannelData, {} on the way B→A via Send)",
            self.lost_to_b, self.lost_to_a
        )
    }
}

/// Payload `seq` of `size` bytes: a tag, the sequence number, then a pattern.
fn payload(seq: u32, size: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..size)
        .map(|k| (k as u8).wrapping_mul(7) ^ (seq as u8))
        .collect();
    let head = [b"TPRB".as_slice(), &seq.to_be_bytes()].concat();
    for (d, s) in p.iter_mut().zip(head) {
        *d = s;
    }
    p
}

/// Sends `count` packets A→B on the channel, B echoing each back with a Send
/// indication; the round-trip time of each (`None`: lost).
fn echo(
    a: &mut Session,
    b: &mut Session,
    a_rel: SocketAddr,
    count: usize,
    size: usize,
    per_packet: Duration,
    budget: Instant,
) -> (Vec<Option<Duration>>, EchoPath) {
    let mut path = EchoPath::default();
    let mut rtts = Vec::with_capacity(count);
    for i in 0..count {
        let dead = rtts.len() >= DEAD_AFTER && rtts.iter().all(Option::is_none);
        if dead || Instant::now() >= budget || path.error.is_some() {
            rtts.resize(count, None);
            break;
        }
        let seq = u32::try_from(i).unwrap_or(u32::MAX);
        rtts.push(echo_one(a, b, a_rel, seq, size, per_packet, &mut path));
    }
    (rtts, path)
}

/// One round trip of packet `seq`; its RTT if it came back.
fn echo_one(
    a: &mut Session,
    b: &mut Session,
    a_rel: SocketAddr,
    seq: u32,
    size: usize,
    per_packet: Duration,
    path: &mut EchoPath,
) -> Option<Duration> {
    let p = payload(seq, size);
    let sent = Instant::now();
    let deadline = sent + per_packet;
    if let Err(e) = a.send_channel(CHANNEL, &p) {
        path.error = Some(format!("A cannot send: {e}"));
        return None;
    }
    // B waits for it (skipping stale packets of earlier rounds).
    let got = loop {
        match b.recv_relayed(deadline) {
            Ok(Some(r)) if r.data == p => break Some(r),
            Ok(Some(_)) => continue,
            Ok(None) => break None,
            Err(e) => {
                path.error = Some(format!("B: {e}"));
                break None;
            }
        }
    };
    let Some(r) = got else {
        path.lost_to_b += 1;
        return None;
    };
    if r.channel {
        path.b_channel += 1;
    } else {
        path.b_data += 1;
    }
    if let Err(e) = b.send_indication(a_rel, &p) {
        path.error = Some(format!("B cannot send: {e}"));
        return None;
    }
    loop {
        match a.recv_relayed(deadline) {
            Ok(Some(r)) if r.data == p => {
                if r.channel {
                    path.a_channel += 1;
                } else {
                    path.a_data += 1;
                }
                return Some(sent.elapsed());
            }
            Ok(Some(_)) => continue,
            Ok(None) => {
                path.lost_to_a += 1;
                return None;
            }
            Err(e) => {
                path.error = Some(format!("A: {e}"));
                return None;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_tagged_and_distinct() {
        let p = payload(5, 200);
        assert_eq!(p.len(), 200);
        assert_eq!(&p[..8], b"TPRB\0\0\0\x05");
        assert_ne!(payload(5, 200), payload(6, 200));
        assert_eq!(payload(1, 3), b"TPR");
    }

    fn args(extra: &[&str]) -> ProbeArgs {
        #[derive(Debug, clap::Parser)]
        struct P {
            #[command(flatten)]
            a: ProbeArgs,
        }
        use clap::Parser as _;
        let mut v = vec!["probe"];
        v.extend_from_slice(extra);
        P::try_parse_from(v).unwrap().a
    }

    #[test]
    fn credentials_from_flags_or_a_rest_secret() {
        let (u, p, _) = credential(&args(&["--user", "u", "--password", "p"])).unwrap();
        assert_eq!((u.as_str(), p.as_str()), ("u", "p"));
        let (u, p, _) = credential(&args(&["--user", "alice", "--secret", "s"])).unwrap();
        let (expiry, user) = u.split_once(':').unwrap();
        assert_eq!(user, "alice");
        assert!(expiry.parse::<u64>().unwrap() > 1_700_000_000);
        assert_eq!(p, turnpike_controlplane::auth::rest_password("s", &u));
        assert!(credential(&args(&[])).is_err());
        assert!(credential(&args(&["--password", "p"])).is_err());
        assert!(credential(&args(&["--user", "u", "--password", "p", "--secret", "s"])).is_err());
    }

    #[test]
    fn bad_urls_are_usage_errors() {
        let e = prepare(&args(&["stun:h", "--user", "u", "--password", "p"])).unwrap_err();
        assert!(e.0.contains("not a turn"), "{}", e.0);
        let e = prepare(&args(&["--user", "u", "--password", "p"])).unwrap_err();
        assert!(e.0.contains("nothing to probe"), "{}", e.0);
    }
}
