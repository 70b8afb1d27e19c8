//! The stable model behind `turnpike ctl`'s output: the Admin API's answers and the fleet
//! registry's records turned into plain values, with addresses as `ip:port`, points in
//! time as RFC 3339 (UTC, milliseconds) and lifetimes and ages as whole seconds from
//! `now`. `--output json` prints these values as they are (the schema is documented in
//! `turnpike/CTL.md`, and a change to a field there is a breaking change); the tables
//! of [`super::table`] are drawn from the same values, so the two never disagree.
//!
//! Sans-IO: every constructor takes the API types and a [`Now`], and reads no clock.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use turnpike_api::{ip_from_bytes, v1};

/// The schema name every JSON document carries; bumped only on a breaking change.
pub const SCHEMA: &str = "turnpike.ctl/v1";

/// The time the output describes, unix milliseconds: read once by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now(pub u64);

impl Now {
    /// `t` as unix milliseconds (0 before the epoch).
    pub fn from_system(t: SystemTime) -> Self {
        Self(
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }

    /// Whole seconds from now until `deadline_ms` (0 once it has passed); `None` for an
    /// unset (0) deadline.
    fn until(self, deadline_ms: u64) -> Option<u64> {
        (deadline_ms != 0).then(|| deadline_ms.saturating_sub(self.0) / 1000)
    }

    /// Whole seconds from `since_ms` until now; `None` for an unset (0) time.
    fn since(self, since_ms: u64) -> Option<u64> {
        (since_ms != 0).then(|| self.0.saturating_sub(since_ms) / 1000)
    }
}

/// Unix milliseconds as RFC 3339 in UTC with milliseconds (`2026-06-01T12:00:00.123Z`);
/// `None` for 0 (unset, in the Admin API).
pub fn rfc3339(ms: u64) -> Option<String> {
    if ms == 0 {
        return None;
    }
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (never negative here).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    Some(format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    ))
}

/// Every JSON document: the schema, what it holds and when it was taken, around the
/// command's own fields.
#[derive(Debug, Serialize)]
pub struct Document<T: Serialize> {
    /// Always [`SCHEMA`].
    pub schema: &'static str,
    /// What the document holds: `allocation_list`, `allocation`, `stats`, `event`,
    /// `instance_list`, `fleet_stats`.
    pub kind: &'static str,
    /// When the output was made (RFC 3339): the `*_in_s` and `*_age_s` fields count from it.
    pub now: Option<String>,
    /// The command's fields.
    #[serde(flatten)]
    pub body: T,
}

impl<T: Serialize> Document<T> {
    /// `body` as a document of `kind` taken at `now`.
    pub fn new(kind: &'static str, now: Now, body: T) -> Self {
        Self {
            schema: SCHEMA,
            kind,
            now: rfc3339(now.0),
            body,
        }
    }
}

/// `ctl list`.
#[derive(Debug, Serialize)]
pub struct AllocationList {
    /// In ascending id order (per instance, for `ctl fleet list`).
    pub allocations: Vec<Allocation>,
    /// Instances that could not be asked (`ctl fleet list` only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<InstanceError>,
}

/// An instance `ctl fleet list` could not list.
#[derive(Debug, Serialize)]
pub struct InstanceError {
    /// The instance.
    pub instance: String,
    /// Why.
    pub error: String,
}

/// `ctl get`.
#[derive(Debug, Serialize)]
pub struct AllocationDoc {
    /// The allocation.
    pub allocation: Allocation,
}

/// A packet and a byte count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Packets (datagrams, or ChannelData/Send/Data messages on streams).
    pub packets: u64,
    /// Payload bytes.
    pub bytes: u64,
}

/// Relayed traffic in both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    /// From the client through the relay to peers.
    pub up: Counters,
    /// From peers to the client.
    pub down: Counters,
}

impl Traffic {
    fn new(u: Option<&v1::Usage>) -> Self {
        let c = |t: Option<&v1::TrafficCounters>| {
            t.map_or(Counters::default(), |t| Counters {
                packets: t.packets,
                bytes: t.bytes,
            })
        };
        u.map_or(Self::default(), |u| Self {
            up: c(u.client_to_peer.as_ref()),
            down: c(u.peer_to_client.as_ref()),
        })
    }
}

/// An allocation: the same object in `ctl list`, `ctl get` and `ctl fleet list`.
#[derive(Debug, Clone, Serialize)]
pub struct Allocation {
    /// The fleet instance it lives on (`ctl fleet list` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The id `ctl get` and `ctl revoke` take.
    pub id: u64,
    /// The data plane it lives on.
    pub data_plane: String,
    /// The data-plane worker that owns it.
    pub worker: u32,
    /// The accounting user.
    pub user: String,
    /// The username it authenticated with.
    pub username: String,
    /// `udp`, `tcp` or `tls`.
    pub transport: String,
    /// The client's address as the server sees it.
    pub client: Option<String>,
    /// The server address the client talks to.
    pub server: Option<String>,
    /// The relayed addresses (one, or two for dual stack).
    pub relayed: Vec<String>,
    /// When it was created.
    pub created_at: Option<String>,
    /// Seconds since it was created.
    pub age_s: Option<u64>,
    /// When it expires unless refreshed.
    pub expires_at: Option<String>,
    /// Seconds until then (0: expired, about to be removed).
    pub expires_in_s: Option<u64>,
    /// Relayed bytes per second per direction; 0: no limit.
    pub bandwidth_limit_bytes_per_s: u64,
    /// The client asked for DONT-FRAGMENT.
    pub dont_fragment: bool,
    /// Its permissions, one per peer IP.
    pub permissions: Vec<Permission>,
    /// Its channels.
    pub channels: Vec<Channel>,
    /// Relayed since it was created, as last reported by its data plane.
    pub traffic: Traffic,
}

/// A permission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Permission {
    /// The peer IP (any port).
    pub peer: String,
    /// When it expires.
    pub expires_at: Option<String>,
    /// Seconds until then.
    pub expires_in_s: Option<u64>,
}

impl Permission {
    fn new(p: &v1::Permission, now: Now) -> Self {
        Self {
            peer: ip(&p.peer_ip),
            expires_at: rfc3339(p.deadline_unix_millis),
            expires_in_s: now.until(p.deadline_unix_millis),
        }
    }
}

/// A channel binding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Channel {
    /// The channel number (16384 to 20479, 0x4000 to 0x4FFF).
    pub number: u32,
    /// The peer address it is bound to.
    pub peer: Option<String>,
    /// When it expires.
    pub expires_at: Option<String>,
    /// Seconds until then.
    pub expires_in_s: Option<u64>,
}

impl Channel {
    fn new(c: &v1::Channel, now: Now) -> Self {
        Self {
            number: c.channel_number,
            peer: c.peer.as_ref().map(addr),
            expires_at: rfc3339(c.deadline_unix_millis),
            expires_in_s: now.until(c.deadline_unix_millis),
        }
    }
}

/// An IP address from its wire bytes.
fn ip(bytes: &[u8]) -> String {
    ip_from_bytes(bytes).map_or_else(
        |_| format!("invalid({} bytes)", bytes.len()),
        |ip| ip.to_string(),
    )
}

/// `ip:port` (`[v6]:port`).
fn addr(a: &v1::SocketAddress) -> String {
    SocketAddr::try_from(a).map_or_else(|e| format!("invalid({e})"), |a| a.to_string())
}

/// `udp`, `tcp`, `tls`, or `unspecified`.
fn transport(t: i32) -> String {
    match v1::Transport::try_from(t) {
        Ok(v1::Transport::Udp) => "udp".into(),
        Ok(v1::Transport::Tcp) => "tcp".into(),
        Ok(v1::Transport::Tls) => "tls".into(),
        _ => "unspecified".into(),
    }
}

/// A proto enum's name without its prefix, in lower case (`DROP_REASON_NO_PERMISSION`
/// → `no_permission`).
fn enum_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

impl Allocation {
    /// The view of `info` at `now`; `None` when the answer holds no allocation.
    pub fn new(info: &v1::AllocationInfo, now: Now) -> Option<Self> {
        let state = info.state.as_ref()?;
        let a = state.allocation.as_ref()?;
        let ft = a.five_tuple.as_ref();
        Some(Self {
            instance: None,
            id: a.allocation_id,
            data_plane: info.data_plane_id.clone(),
            worker: a.worker_id,
            user: a.user_id.clone(),
            username: a.username.clone(),
            transport: transport(ft.map_or(0, |f| f.transport)),
            client: ft.and_then(|f| f.client.as_ref()).map(addr),
            server: ft.and_then(|f| f.server.as_ref()).map(addr),
            relayed: a.relay_addresses.iter().map(addr).collect(),
            created_at: rfc3339(info.created_unix_millis),
            age_s: now.since(info.created_unix_millis),
            expires_at: rfc3339(a.deadline_unix_millis),
            expires_in_s: now.until(a.deadline_unix_millis),
            bandwidth_limit_bytes_per_s: a.bandwidth_limit_bytes_per_second,
            dont_fragment: a.dont_fragment,
            permissions: state
                .permissions
                .iter()
                .map(|p| Permission::new(p, now))
                .collect(),
            channels: state
                .channels
                .iter()
                .map(|c| Channel::new(c, now))
                .collect(),
            traffic: Traffic::new(info.usage.as_ref()),
        })
    }
}

/// `ctl stats`.
#[derive(Debug, Serialize)]
pub struct Stats {
    /// Over the whole control plane.
    pub totals: Totals,
    /// One per known data plane, attached or not, in id order.
    pub data_planes: Vec<DataPlane>,
}

/// Totals over the data planes of a control plane.
#[derive(Debug, Serialize)]
pub struct Totals {
    /// Live allocations.
    pub allocations: u64,
    /// Users with at least one.
    pub users: u64,
    /// Data planes attached now.
    pub data_planes_attached: u32,
    /// Allocations per user (0: unlimited).
    pub user_quota: u32,
    /// Allocations in all (0: unlimited).
    pub total_quota: u32,
    /// STUN requests handled by the control plane since it started.
    pub punted_requests: u64,
    /// Refused: wrong or unknown credentials.
    pub auth_failures: u64,
    /// Dropped by the unauthenticated rate limit.
    pub rate_limited: u64,
    /// Peers refused by the peer policy.
    pub policy_denied: u64,
    /// Refused by a quota or the capacity.
    pub quota_rejected: u64,
    /// Data-plane messages that touched what the data plane does not own.
    pub ownership_violations: u64,
    /// Relayed, cumulative.
    pub traffic: Traffic,
    /// Dropped packets by reason (the non-zero ones), cumulative.
    pub drops: BTreeMap<String, u64>,
}

/// A listening address.
#[derive(Debug, Serialize)]
pub struct Listening {
    /// `udp`, `tcp` or `tls`.
    pub transport: String,
    /// `ip:port`.
    pub address: Option<String>,
}

/// A relay IP and what clients are told it is (behind a 1:1 NAT).
#[derive(Debug, Serialize)]
pub struct RelayIp {
    /// The local address.
    pub ip: String,
    /// The advertised (public) one; `null` when clients reach `ip` itself.
    pub advertised: Option<String>,
}

/// A data plane of a control plane.
#[derive(Debug, Serialize)]
pub struct DataPlane {
    /// Its id.
    pub id: String,
    /// Its version.
    pub version: String,
    /// When its process started (an upgrade starts a new one); `null` when not said.
    pub started_at: Option<String>,
    /// Seconds since then.
    pub started_age_s: Option<u64>,
    /// Its stream to the control plane is open.
    pub attached: bool,
    /// It takes no new allocations.
    pub draining: bool,
    /// When it last attached or detached.
    pub attached_changed_at: Option<String>,
    /// Seconds since then.
    pub attached_changed_age_s: Option<u64>,
    /// Its worker threads.
    pub workers: u32,
    /// Where clients reach it.
    pub listening: Vec<Listening>,
    /// Its relay IPs.
    pub relay_ips: Vec<RelayIp>,
    /// The last table version it acknowledged.
    pub acked_table_version: u64,
    /// Its last load report; `null` before the first.
    pub load: Option<Load>,
}

/// A data plane's last load report.
#[derive(Debug, Serialize)]
pub struct Load {
    /// When it was taken.
    pub sampled_at: Option<String>,
    /// Seconds since then.
    pub sampled_age_s: Option<u64>,
    /// Allocations in its table.
    pub allocations: u64,
    /// Relayed since it started (both paths).
    pub traffic: Traffic,
    /// Dropped since it started, by reason.
    pub drops: BTreeMap<String, u64>,
    /// Per worker.
    pub workers: Vec<Worker>,
    /// The XDP fast path; `null` when it was not asked for.
    pub fast_path: Option<FastPath>,
}

/// A data-plane worker's load.
#[derive(Debug, Serialize)]
pub struct Worker {
    /// The worker.
    pub id: u32,
    /// Allocations it owns.
    pub allocations: u64,
    /// Packets it received since the start.
    pub received_packets: u64,
}

/// The XDP fast path of a data plane.
#[derive(Debug, Serialize)]
pub struct FastPath {
    /// Attached to at least one interface.
    pub on: bool,
    /// The interfaces, as `name (mode)`.
    pub interfaces: Vec<String>,
    /// Why it is off; `null` when on.
    pub off_reason: Option<String>,
    /// Relayed by the program (included in the load's `traffic`).
    pub traffic: Traffic,
    /// Packets relayed by path.
    pub relayed: BTreeMap<String, u64>,
    /// Frames passed to the workers, by reason.
    pub passed: BTreeMap<String, u64>,
    /// Allocations with entries in the program's maps.
    pub allocations: u64,
}

fn drops(d: &[v1::DropCount]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for c in d {
        let name = v1::DropReason::try_from(c.reason).map_or_else(
            |_| format!("reason_{}", c.reason),
            |r| enum_name(r.as_str_name(), "DROP_REASON_"),
        );
        *m.entry(name).or_default() += c.packets;
    }
    m
}

fn paths(p: &[v1::PathCount]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for c in p {
        *m.entry(c.name.clone()).or_default() += c.packets;
    }
    m
}

impl Stats {
    /// The view of `s` at `now`.
    pub fn new(s: &v1::GetStatsResponse, now: Now) -> Self {
        let t = s.totals.clone().unwrap_or_default();
        Self {
            totals: Totals {
                allocations: t.allocations,
                users: t.users,
                data_planes_attached: t.data_planes_attached,
                user_quota: t.user_quota,
                total_quota: t.total_quota,
                punted_requests: t.punted_requests,
                auth_failures: t.auth_failures,
                rate_limited: t.rate_limited,
                policy_denied: t.policy_denied,
                quota_rejected: t.quota_rejected,
                ownership_violations: t.ownership_violations,
                traffic: Traffic::new(t.traffic.as_ref()),
                drops: drops(&t.drops),
            },
            data_planes: s
                .data_planes
                .iter()
                .map(|d| DataPlane {
                    id: d.data_plane_id.clone(),
                    version: d.version.clone(),
                    started_at: (d.started_unix_millis > 0)
                        .then(|| rfc3339(d.started_unix_millis))
                        .flatten(),
                    started_age_s: (d.started_unix_millis > 0)
                        .then(|| now.since(d.started_unix_millis))
                        .flatten(),
                    attached: d.attached,
                    draining: d.draining,
                    attached_changed_at: rfc3339(d.attached_changed_unix_millis),
                    attached_changed_age_s: now.since(d.attached_changed_unix_millis),
                    workers: d.worker_count,
                    listening: d
                        .listening_addresses
                        .iter()
                        .map(|l| Listening {
                            transport: transport(l.transport),
                            address: l.address.as_ref().map(addr),
                        })
                        .collect(),
                    relay_ips: d
                        .relay_ips
                        .iter()
                        .map(|r| RelayIp {
                            ip: ip(&r.ip),
                            advertised: (!r.advertised_ip.is_empty()).then(|| ip(&r.advertised_ip)),
                        })
                        .collect(),
                    acked_table_version: d.acked_table_version,
                    load: d.load.as_ref().map(|l| Load {
                        sampled_at: rfc3339(l.sampled_unix_millis),
                        sampled_age_s: now.since(l.sampled_unix_millis),
                        allocations: l.allocations,
                        traffic: Traffic::new(l.traffic.as_ref()),
                        drops: drops(&l.drops),
                        workers: l
                            .workers
                            .iter()
                            .map(|w| Worker {
                                id: w.worker_id,
                                allocations: w.allocations,
                                received_packets: w.received_packets,
                            })
                            .collect(),
                        fast_path: l.fast_path.as_ref().map(|f| FastPath {
                            on: !f.interfaces.is_empty(),
                            interfaces: f.interfaces.clone(),
                            off_reason: (!f.off_reason.is_empty()).then(|| f.off_reason.clone()),
                            traffic: Traffic::new(f.traffic.as_ref()),
                            relayed: paths(&f.relayed),
                            passed: paths(&f.passed),
                            allocations: f.allocations,
                        }),
                    }),
                })
                .collect(),
        }
    }
}

/// An event of `ctl watch` (one JSON document per line).
#[derive(Debug, Serialize)]
pub struct Event {
    /// The fleet instance it comes from (`ctl fleet watch` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Increases by one with every event of the control plane (gaps: events filtered
    /// out or missed).
    pub sequence: u64,
    /// When it happened.
    pub at: Option<String>,
    /// The allocation.
    pub allocation_id: u64,
    /// Its user.
    pub user: String,
    /// Its data plane.
    pub data_plane: String,
    /// What happened, in `event`, with its own fields.
    #[serde(flatten)]
    pub what: What,
}

/// What happened to an allocation; the `event` field names the variant.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum What {
    /// It was created.
    Created {
        /// `udp`, `tcp` or `tls`.
        transport: String,
        /// The client's address.
        client: Option<String>,
        /// The server address the client talks to.
        server: Option<String>,
        /// The relayed addresses.
        relayed: Vec<String>,
        /// When it expires unless refreshed.
        expires_at: Option<String>,
        /// Seconds from `now` until then.
        expires_in_s: Option<u64>,
    },
    /// It was refreshed.
    Refreshed {
        /// Its new expiry.
        expires_at: Option<String>,
        /// Seconds from `now` until then.
        expires_in_s: Option<u64>,
    },
    /// A permission was installed.
    PermissionAdded {
        /// The permission.
        permission: Option<Permission>,
    },
    /// A channel was bound.
    ChannelAdded {
        /// The channel.
        channel: Option<Channel>,
    },
    /// It ended.
    Deleted {
        /// `released`, `expired`, `revoked`, `connection_closed` or `unspecified`.
        reason: String,
        /// A detail (the reason given to a revocation).
        detail: String,
        /// Its final traffic.
        traffic: Traffic,
    },
    /// Its traffic counters moved.
    Usage {
        /// Since it was created.
        traffic: Traffic,
        /// Since its previous usage event.
        delta: Traffic,
    },
    /// An event kind this version of ctl does not know.
    Unknown,
}

impl Event {
    /// The view of `e` at `now`, from `instance` if in a fleet.
    pub fn new(e: &v1::Event, instance: Option<&str>, now: Now) -> Self {
        use v1::event::Body;
        let what = match &e.body {
            Some(Body::Created(c)) => {
                let ft = c.five_tuple.as_ref();
                What::Created {
                    transport: transport(ft.map_or(0, |f| f.transport)),
                    client: ft.and_then(|f| f.client.as_ref()).map(addr),
                    server: ft.and_then(|f| f.server.as_ref()).map(addr),
                    relayed: c.relay_addresses.iter().map(addr).collect(),
                    expires_at: rfc3339(c.deadline_unix_millis),
                    expires_in_s: now.until(c.deadline_unix_millis),
                }
            }
            Some(Body::Refreshed(r)) => What::Refreshed {
                expires_at: rfc3339(r.deadline_unix_millis),
                expires_in_s: now.until(r.deadline_unix_millis),
            },
            Some(Body::PermissionAdded(p)) => What::PermissionAdded {
                permission: p.permission.as_ref().map(|p| Permission::new(p, now)),
            },
            Some(Body::ChannelAdded(c)) => What::ChannelAdded {
                channel: c.channel.as_ref().map(|c| Channel::new(c, now)),
            },
            Some(Body::Deleted(d)) => What::Deleted {
                reason: v1::DeletionReason::try_from(d.reason).map_or_else(
                    |_| format!("reason_{}", d.reason),
                    |r| enum_name(r.as_str_name(), "DELETION_REASON_"),
                ),
                detail: d.detail.clone(),
                traffic: Traffic::new(d.usage.as_ref()),
            },
            Some(Body::Usage(u)) => What::Usage {
                traffic: Traffic::new(u.total.as_ref()),
                delta: Traffic::new(u.delta.as_ref()),
            },
            None => What::Unknown,
        };
        Self {
            instance: instance.map(str::to_owned),
            sequence: e.sequence,
            at: rfc3339(e.timestamp_unix_millis),
            allocation_id: e.allocation_id,
            user: e.user_id.clone(),
            data_plane: e.data_plane_id.clone(),
            what,
        }
    }
}

/// `ctl fleet instances`.
#[derive(Debug, Serialize)]
pub struct InstanceList {
    /// The live instances, in id order.
    pub instances: Vec<Instance>,
}

/// A live instance of a fleet, from its registry record.
#[derive(Debug, Serialize)]
pub struct Instance {
    /// Its id.
    pub id: String,
    /// Its region label.
    pub region: String,
    /// Its zone label.
    pub zone: String,
    /// Takes no new allocations (its own record says so, or `ctl fleet drain`).
    pub draining: bool,
    /// Live allocations.
    pub allocations: u64,
    /// Its total quota (0: unlimited).
    pub capacity: u64,
    /// 0.0 (idle) to 1.0 (full): the larger of allocation fill and CPU.
    pub load: f64,
    /// Packets relayed per second, both directions.
    pub packets_per_s: u64,
    /// Busy fraction of its workers' cores, 0.0 to 1.0.
    pub cpu: f64,
    /// UDP addresses clients reach it at.
    pub udp: Vec<String>,
    /// TCP addresses.
    pub tcp: Vec<String>,
    /// TLS addresses.
    pub tls: Vec<String>,
    /// The name of its TLS certificate.
    pub tls_domain: Option<String>,
    /// Its relay IPs.
    pub relay_ips: Vec<String>,
    /// Its Admin API.
    pub admin: Option<String>,
    /// When it last wrote its record.
    pub updated_at: Option<String>,
    /// Seconds since then.
    pub updated_age_s: Option<u64>,
}

impl Instance {
    /// The view of `r` at `now`; `drained`: a drain key names it.
    pub fn new(r: &turnpike_controlplane::fleet::InstanceRecord, drained: bool, now: Now) -> Self {
        let strings = |v: &[SocketAddr]| v.iter().map(ToString::to_string).collect();
        Self {
            id: r.id.clone(),
            region: r.region.clone(),
            zone: r.zone.clone(),
            draining: r.draining || drained,
            allocations: r.allocations,
            capacity: r.capacity,
            load: r.load(),
            packets_per_s: r.packets_per_sec,
            cpu: r.cpu,
            udp: strings(&r.udp),
            tcp: strings(&r.tcp),
            tls: strings(&r.tls),
            tls_domain: r.tls_domain.clone(),
            relay_ips: r.relay_ips.iter().map(ToString::to_string).collect(),
            admin: r.admin.clone(),
            updated_at: rfc3339(r.updated_ms),
            updated_age_s: now.since(r.updated_ms),
        }
    }
}

/// `ctl fleet stats`.
#[derive(Debug, Serialize)]
pub struct FleetStats {
    /// The live instances, in id order.
    pub instances: Vec<Instance>,
    /// Sums over them.
    pub totals: FleetTotals,
}

/// Sums over a fleet's instances.
#[derive(Debug, Serialize)]
pub struct FleetTotals {
    /// Live instances.
    pub instances: usize,
    /// Draining ones among them.
    pub draining: usize,
    /// Live allocations.
    pub allocations: u64,
    /// The sum of their capacities.
    pub capacity: u64,
    /// Packets relayed per second.
    pub packets_per_s: u64,
}

impl FleetStats {
    /// Sums `instances` up.
    pub fn new(instances: Vec<Instance>) -> Self {
        let totals = FleetTotals {
            instances: instances.len(),
            draining: instances.iter().filter(|i| i.draining).count(),
            allocations: instances.iter().map(|i| i.allocations).sum(),
            capacity: instances.iter().map(|i| i.capacity).sum(),
            packets_per_s: instances.iter().map(|i| i.packets_per_s).sum(),
        };
        Self { instances, totals }
    }
}
