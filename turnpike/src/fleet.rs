//! The fleet on etcd (`--etcd URL`): this instance's record in the registry, the
//! configuration every instance shares, and the redirection of new allocations.
//!
//! Keys, under `/turnpike/<fleet>/`:
//! - `instances/<id>`: this instance's [`InstanceRecord`] (JSON), attached to a lease of
//!   [`LEASE_TTL`] seconds kept alive, rewritten every [`REPORT`] with its measured load;
//!   a dead instance's record goes when its lease expires;
//! - `config/secrets`: the TURN REST secrets (JSON array, newest first);
//! - `config/revoked/<user>`: users refused everywhere (the value is the reason);
//! - `config/users` (JSON array of "name:password", valid next to the configured users),
//!   `config/policy` (`{"allow": [CIDR...], "deny": [CIDR...]}`, replacing the
//!   configured lists) and `config/quotas` (`{"user": N, "total": N}`, replacing the
//!   configured quotas): removing a key brings the configured values back;
//! - `drain/<id>`: present while an operator drains instance `<id>`.
//!
//! Everything is watched: a change reaches every instance as fast as etcd delivers it.
//! When etcd is unreachable the instance keeps serving with the last configuration it
//! had, keeps its allocations, and stops redirecting (it cannot see the others); it
//! registers again when etcd is back.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::sync::watch;
use turnpike_controlplane::Cidr;
use turnpike_controlplane::fleet::{
    FleetView, InstanceRecord, RedirectConfig, SharedConfig, heavy_threshold,
};
use turnpike_controlplane_runtime::ControlPlaneHandle;
use turnpike_controlplane_runtime::etcd::{Etcd, EtcdError, LeaseId, WatchEvent};
use turnpike_dataplane::DataPlaneHandle;
use turnpike_plane::{RelayIp, advertised_addr};

/// Seconds a record outlives its instance.
pub const LEASE_TTL: i64 = 10;
/// How often the record is rewritten with fresh load figures.
pub const REPORT: Duration = Duration::from_secs(2);

/// What the fleet task needs to know.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// etcd endpoints.
    pub etcd: Vec<String>,
    /// The fleet's name (the key prefix).
    pub fleet: String,
    /// This instance's id.
    pub id: String,
    /// When to redirect.
    pub redirect: RedirectConfig,
}

impl FleetSettings {
    /// `/turnpike/<fleet>/`.
    pub fn prefix(&self) -> String {
        prefix(&self.fleet)
    }
}

/// The key prefix of fleet `fleet`.
pub fn prefix(fleet: &str) -> String {
    format!("/turnpike/{fleet}/")
}

/// The unix time in milliseconds (records carry it; the registry loop is I/O).
#[allow(clippy::disallowed_methods)]
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// CPU seconds used so far by the data-plane worker threads (`turnpike-dp-*`).
fn worker_cpu_secs() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    // /proc counts CPU time in clock ticks of USER_HZ, 100 per second on Linux.
    let ticks_per_sec = 100.0;
    let mut total = 0u64;
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("turnpike-dp-") {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        total += num(11) + num(12);
    }
    total as f64 / ticks_per_sec
}

/// Measures this instance's load between two reports.
struct Meter {
    last_at: tokio::time::Instant,
    last_packets: u64,
    last_cpu: f64,
}

impl Meter {
    fn new(dp: Option<&DataPlaneHandle>) -> Meter {
        Meter {
            last_at: tokio::time::Instant::now(),
            last_packets: packets(dp),
            last_cpu: worker_cpu_secs(),
        }
    }

    /// (packets/s, busy fraction of the workers' cores) since the last call.
    fn sample(&mut self, dp: Option<&DataPlaneHandle>) -> (u64, f64) {
        let now = tokio::time::Instant::now();
        let secs = now.duration_since(self.last_at).as_secs_f64().max(0.001);
        let p = packets(dp);
        let cpu = worker_cpu_secs();
        let workers = dp.map_or(1, DataPlaneHandle::workers).max(1) as f64;
        let pps = (p.saturating_sub(self.last_packets) as f64 / secs) as u64;
        let busy = ((cpu - self.last_cpu).max(0.0) / secs / workers).clamp(0.0, 1.0);
        self.last_at = now;
        self.last_packets = p;
        self.last_cpu = cpu;
        (pps, busy)
    }
}

fn packets(dp: Option<&DataPlaneHandle>) -> u64 {
    dp.map_or(0, |d| {
        d.counters()
            .iter()
            .map(|c| c.to_peer_packets + c.to_client_packets)
            .sum()
    })
}

/// The shared configuration as last read from etcd.
#[derive(Debug, Default, Clone)]
struct Shared {
    secrets: Option<Vec<String>>,
    revoked: BTreeSet<String>,
    drained: bool,
    config: SharedConfig,
}

/// `config/policy`: the peer policy's operator lists.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PolicyLists {
    /// Ranges allowed despite the default deny list.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Ranges always denied.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// `config/quotas`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Quotas {
    /// Allocations per user (0: unlimited).
    pub user: u32,
    /// Allocations in all (0: unlimited).
    pub total: u32,
}

/// Runs the fleet task forever: registers `base` (this instance's addresses and labels)
/// and keeps the control plane's fleet state current. `draining` is set on SIGTERM.
pub async fn run(
    settings: FleetSettings,
    cp: ControlPlaneHandle,
    dp: Option<DataPlaneHandle>,
    base: InstanceRecord,
    mut draining: watch::Receiver<bool>,
) {
    let mut view = FleetView::new(&settings.id, settings.redirect);
    let mut shared = Shared::default();
    let mut backoff = Duration::from_millis(200);
    let mut meter = Meter::new(dp.as_ref());
    loop {
        let r = session(
            &settings,
            &cp,
            dp.as_ref(),
            &base,
            &mut draining,
            &mut view,
            &mut shared,
            &mut meter,
            &mut backoff,
        )
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "fleet registry unavailable: serving with the last configuration, not redirecting");
        }
        // Nobody can be seen: serve locally (or refuse, if drained).
        view.clear();
        let drained = *draining.borrow() || shared.drained;
        // Allocations elsewhere are unknown too: the per-user quota counts only local
        // ones until the registry is back.
        let _ = cp
            .set_fleet(drained, None, None, Some(Default::default()))
            .await;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    settings: &FleetSettings,
    cp: &ControlPlaneHandle,
    dp: Option<&DataPlaneHandle>,
    base: &InstanceRecord,
    draining: &mut watch::Receiver<bool>,
    view: &mut FleetView,
    shared: &mut Shared,
    meter: &mut Meter,
    backoff: &mut Duration,
) -> anyhow::Result<()> {
    // A control plane of a cell with an election registers the cell only while it
    // leads it (a follower exits when it loses the leadership, so this is a one-way
    // wait).
    while !cp.is_leader() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let etcd = Etcd::connect(&settings.etcd).await?;
    let prefix = settings.prefix();
    let me_key = format!("{prefix}instances/{}", settings.id);
    let lease = etcd.lease_grant(LEASE_TTL).await?;
    let mut keep = etcd.keep_alive(lease).await?;
    let listing = etcd.get_prefix(&prefix).await?;
    view.clear();
    let mut fresh = Shared::default();
    for (k, v) in &listing.entries {
        apply(&prefix, &settings.id, k, Some(v), view, &mut fresh);
    }
    push_shared(cp, shared, fresh).await;
    let mut events = etcd.watch_prefix(&prefix, listing.revision + 1).await?;
    tracing::info!(endpoint = %etcd.endpoint(), lease = %lease, instances = view.others().count() + 1, "registered in the fleet");
    *backoff = Duration::from_millis(200);
    let mut tick = tokio::time::interval(REPORT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // `ctl drain` drains the cell: published at once, like `ctl fleet drain`.
    let mut cell = cp.watch_drain_state();
    let mut cell_drained = cell.borrow_and_update().cell_drained;
    loop {
        tokio::select! {
            loss = keep.lost() => {
                anyhow::bail!("registry lease lost: {loss}");
            }
            ev = events.recv() => {
                let mut next = shared.clone();
                match ev {
                    Some(WatchEvent::Put { key, value, .. }) => {
                        apply(&prefix, &settings.id, &key, Some(&value), view, &mut next);
                    }
                    Some(WatchEvent::Delete { key, .. }) => {
                        apply(&prefix, &settings.id, &key, None, view, &mut next);
                    }
                    Some(WatchEvent::Compacted { .. }) | None => {
                        anyhow::bail!("registry watch ended; reading the registry again");
                    }
                }
                let drained_changed = next.drained != shared.drained;
                push_shared(cp, shared, next).await;
                if drained_changed {
                    report(&etcd, cp, dp, base, draining, view, shared, meter, &me_key, lease).await?;
                }
            }
            _ = tick.tick() => {
                report(&etcd, cp, dp, base, draining, view, shared, meter, &me_key, lease).await?;
            }
            _ = draining.changed() => {
                report(&etcd, cp, dp, base, draining, view, shared, meter, &me_key, lease).await?;
            }
            Ok(()) = cell.changed() => {
                let drained = cell.borrow_and_update().cell_drained;
                if drained != cell_drained {
                    cell_drained = drained;
                    report(&etcd, cp, dp, base, draining, view, shared, meter, &me_key, lease).await?;
                }
            }
        }
    }
}

/// Writes this instance's record and hands the control plane the fleet's decision.
#[allow(clippy::too_many_arguments)]
async fn report(
    etcd: &Etcd,
    cp: &ControlPlaneHandle,
    dp: Option<&DataPlaneHandle>,
    base: &InstanceRecord,
    draining: &watch::Receiver<bool>,
    view: &mut FleetView,
    shared: &Shared,
    meter: &mut Meter,
    me_key: &str,
    lease: LeaseId,
) -> Result<(), EtcdError> {
    let stats = cp.stats().await.unwrap_or_default();
    let (pps, cpu) = meter.sample(dp);
    let now = unix_ms();
    let users = cp
        .heavy_users(heavy_threshold(cp.user_quota()))
        .await
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut base = base.clone();
    if dp.is_none() {
        // A control plane alone: the cell's addresses are its attached data planes'.
        for d in stats.data_planes.iter().filter(|d| d.attached) {
            // Clients are sent to its public addresses when it is behind a 1:1 NAT.
            let relays: Vec<RelayIp> = d
                .relay_ips
                .iter()
                .filter_map(|r| RelayIp::try_from(r).ok())
                .collect();
            for r in &relays {
                if !base.relay_ips.contains(&r.advertised) {
                    base.relay_ips.push(r.advertised);
                }
            }
            for l in &d.listening_addresses {
                let Some(Ok(a)) = l.address.as_ref().map(std::net::SocketAddr::try_from) else {
                    continue;
                };
                let a = advertised_addr(&relays, a);
                let list = match turnpike_api::v1::Transport::try_from(l.transport) {
                    Ok(turnpike_api::v1::Transport::Tcp) => &mut base.tcp,
                    Ok(turnpike_api::v1::Transport::Tls) => &mut base.tls,
                    _ => &mut base.udp,
                };
                if !list.contains(&a) {
                    list.push(a);
                }
            }
        }
    }
    let me = InstanceRecord {
        users,
        allocations: stats.totals.as_ref().map_or(0, |t| t.allocations),
        capacity: u64::from(cp.quotas().1),
        packets_per_sec: pps,
        cpu,
        // Drained by SIGTERM, `ctl fleet drain`, or `ctl drain` of the whole cell.
        draining: *draining.borrow() || shared.drained || cp.drain_state().cell_drained,
        updated_ms: now,
        ..base
    };
    let json = serde_json::to_vec(&me).unwrap_or_default();
    etcd.put(me_key, &json, Some(lease)).await?;
    let alternates = view.decide(&me, now);
    let on_drain = view.drain_target(&me, now);
    let _ = cp
        .set_fleet(
            me.draining,
            alternates,
            on_drain,
            Some(view.user_counts(now)),
        )
        .await;
    Ok(())
}

/// Applies one key of the fleet prefix (its value, or `None` once deleted).
fn apply(
    prefix: &str,
    me: &str,
    key: &str,
    value: Option<&[u8]>,
    view: &mut FleetView,
    shared: &mut Shared,
) {
    let Some(rest) = key.strip_prefix(prefix) else {
        return;
    };
    if let Some(id) = rest.strip_prefix("instances/") {
        match value.map(serde_json::from_slice::<InstanceRecord>) {
            Some(Ok(r)) if r.id == id => view.upsert(r),
            Some(Ok(_)) | Some(Err(_)) => {
                tracing::warn!(key, "unreadable instance record ignored");
            }
            None => view.remove(id),
        }
    } else if rest == "config/secrets" {
        shared.secrets = match value.map(serde_json::from_slice::<Vec<String>>) {
            Some(Ok(s)) if !s.is_empty() && s.iter().all(|x| !x.is_empty()) => Some(s),
            Some(_) => {
                tracing::warn!(key, "unreadable or empty secret list ignored");
                shared.secrets.clone()
            }
            None => None,
        };
    } else if let Some(user) = rest.strip_prefix("config/revoked/") {
        if value.is_some() {
            shared.revoked.insert(user.to_owned());
        } else {
            shared.revoked.remove(user);
        }
    } else if rest.strip_prefix("drain/") == Some(me) {
        shared.drained = value.is_some();
    } else if rest == "config/users" {
        shared.config.users = match value.map(serde_json::from_slice::<Vec<String>>) {
            Some(Ok(list)) => list
                .iter()
                .filter_map(|u| u.split_once(':'))
                .filter(|(n, p)| !n.is_empty() && !p.is_empty())
                .map(|(n, p)| (n.to_owned(), p.to_owned()))
                .collect(),
            Some(Err(_)) => {
                tracing::warn!(key, "unreadable user list ignored");
                shared.config.users.clone()
            }
            None => Vec::new(),
        };
    } else if rest == "config/policy" {
        shared.config.policy = match value.map(serde_json::from_slice::<PolicyLists>) {
            Some(Ok(p)) => {
                let parse = |v: &[String]| -> Option<Vec<Cidr>> {
                    v.iter().map(|c| c.parse::<Cidr>().ok()).collect()
                };
                match (parse(&p.allow), parse(&p.deny)) {
                    (Some(a), Some(d)) => Some((a, d)),
                    _ => {
                        tracing::warn!(key, "peer policy with a bad range ignored");
                        shared.config.policy.clone()
                    }
                }
            }
            Some(Err(_)) => {
                tracing::warn!(key, "unreadable peer policy ignored");
                shared.config.policy.clone()
            }
            None => None,
        };
    } else if rest == "config/quotas" {
        shared.config.quotas = match value.map(serde_json::from_slice::<Quotas>) {
            Some(Ok(q)) => Some((q.user, q.total)),
            Some(Err(_)) => {
                tracing::warn!(key, "unreadable quotas ignored");
                shared.config.quotas
            }
            None => None,
        };
    }
}

/// Hands the control plane what changed in the shared configuration.
async fn push_shared(cp: &ControlPlaneHandle, current: &mut Shared, next: Shared) {
    if next.secrets != current.secrets
        && let Some(s) = &next.secrets
    {
        match cp.rotate_secrets(s.clone()).await {
            Ok(n) => tracing::info!(secrets = n, "TURN REST secrets from the fleet"),
            Err(e) => tracing::warn!(error = %e, "secrets from the fleet not applied"),
        }
    }
    if next.revoked != current.revoked {
        match cp
            .set_revoked_users(next.revoked.iter().cloned().collect())
            .await
        {
            Ok(ended) => tracing::info!(
                users = next.revoked.len(),
                ended,
                "revoked users from the fleet"
            ),
            Err(e) => tracing::warn!(error = %e, "revoked users from the fleet not applied"),
        }
    }
    if next.drained != current.drained {
        tracing::info!(drained = next.drained, "drain from the fleet");
    }
    if next.config != current.config {
        match cp.set_shared_config(next.config.clone()).await {
            Ok(()) => tracing::info!(
                users = next.config.users.len(),
                policy = next.config.policy.is_some(),
                quotas = ?next.config.quotas,
                "shared configuration from the fleet"
            ),
            Err(e) => tracing::warn!(error = %e, "shared configuration not applied"),
        }
    }
    *current = next;
}

/// Reads the fleet's shared configuration (TURN REST secrets, revoked users) once and
/// hands it to `cp`. A control plane elected to lead its cell does this before it
/// accepts data planes, so that it never answers with less than the fleet's secrets; its
/// registry task ([`run`]) watches them from then on.
pub async fn load_shared(
    etcd: &Etcd,
    fleet: &str,
    cp: &ControlPlaneHandle,
) -> Result<(), EtcdError> {
    let prefix = prefix(fleet);
    let listing = etcd.get_prefix(&format!("{prefix}config/")).await?;
    let mut view = FleetView::new("", RedirectConfig::default());
    let mut shared = Shared::default();
    for (k, v) in &listing.entries {
        apply(&prefix, "", k, Some(v), &mut view, &mut shared);
    }
    push_shared(cp, &mut Shared::default(), shared).await;
    Ok(())
}
