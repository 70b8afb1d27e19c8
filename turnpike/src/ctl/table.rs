//! `turnpike ctl`'s output for people: aligned columns under a header row (as `kubectl
//! get` prints them), a `key: value` page for one allocation, human byte counts and
//! durations. Drawn from the values of [`super::view`], so what a table shows is what
//! `--output json` holds.
//!
//! Sans-IO: each function returns the text; the caller prints it.

use std::fmt::Write as _;

use super::view::{
    Allocation, Channel, DataPlane, Event, FastPath, FleetStats, Instance, Permission, Stats,
    Traffic, What,
};

/// Columns are this many spaces apart.
const GAP: usize = 3;

/// `rows` under `header`, each column as wide as its widest cell; no trailing spaces.
fn grid(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let head: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for r in std::iter::once(&head).chain(rows) {
        line(&mut out, r, &widths);
    }
    out
}

/// One row of cells padded to `widths`, the last one unpadded.
fn line(out: &mut String, cells: &[String], widths: &[usize]) {
    let mut l = String::new();
    for (i, c) in cells.iter().enumerate() {
        l.push_str(c);
        if i + 1 < cells.len() {
            let w = widths.get(i).copied().unwrap_or(0);
            let pad = w.saturating_sub(c.chars().count()) + GAP;
            l.extend(std::iter::repeat_n(' ', pad));
        }
    }
    out.push_str(l.trim_end());
    out.push('\n');
}

/// A byte count in binary units with one decimal: `512 B`, `1.2 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// A duration in its two largest units, as `kubectl` shows ages: `42s`, `4m12s`,
/// `3h5m`, `2d4h`.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// A remaining lifetime: `in 4m12s`, `expired`, or `-` when unset.
fn expires(in_s: Option<u64>) -> String {
    match in_s {
        None => "-".into(),
        Some(0) => "expired".into(),
        Some(s) => format!("in {}", duration(s)),
    }
}

/// An age: `4m12s`, or `-` when unknown.
fn age(s: Option<u64>) -> String {
    s.map_or_else(|| "-".into(), duration)
}

fn or_dash(s: Option<&str>) -> String {
    match s {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => "-".into(),
    }
}

fn list_or_dash(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

/// `udp:1.2.3.4:5000`.
fn client(a: &Allocation) -> String {
    format!("{}:{}", a.transport, or_dash(a.client.as_deref()))
}

/// `ctl list` (and `ctl fleet list`, with an INSTANCE column first): one line per
/// allocation.
pub fn allocations(list: &[Allocation]) -> String {
    if list.is_empty() {
        return "no allocations\n".into();
    }
    let fleet = list.iter().any(|a| a.instance.is_some());
    let mut header = vec![
        "ID",
        "USER",
        "CLIENT",
        "RELAYED",
        "PEERS",
        "CHANNELS",
        "UP",
        "DOWN",
        "AGE",
        "EXPIRES",
        "DATA PLANE",
    ];
    if fleet {
        header.insert(0, "INSTANCE");
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|a| {
            let mut r = vec![
                a.id.to_string(),
                or_dash(Some(&a.user)),
                client(a),
                list_or_dash(&a.relayed),
                a.permissions.len().to_string(),
                a.channels.len().to_string(),
                bytes(a.traffic.up.bytes),
                bytes(a.traffic.down.bytes),
                age(a.age_s),
                expires(a.expires_in_s),
                or_dash(Some(&a.data_plane)),
            ];
            if fleet {
                r.insert(0, or_dash(a.instance.as_deref()));
            }
            r
        })
        .collect();
    grid(&header, &rows)
}

/// `key: value` lines with the values aligned.
fn fields(pairs: &[(&str, String)]) -> String {
    let w = pairs
        .iter()
        .map(|(k, _)| k.chars().count() + 1)
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let key = format!("{k}:");
        let _ = writeln!(out, "{key:<w$} {v}");
    }
    out
}

fn traffic_line(c: super::view::Counters) -> String {
    format!("{} in {} packets", bytes(c.bytes), c.packets)
}

/// `in 4m12s (2026-06-01T12:04:12.000Z)`.
fn expires_at(in_s: Option<u64>, at: Option<&str>) -> String {
    match at {
        Some(at) => format!("{} ({at})", expires(in_s)),
        None => "-".into(),
    }
}

/// `ctl get`: one allocation, its permissions and its channels.
pub fn allocation(a: &Allocation) -> String {
    let mut pairs = Vec::new();
    if let Some(i) = &a.instance {
        pairs.push(("Instance", i.clone()));
    }
    pairs.extend([
        ("ID", a.id.to_string()),
        ("User", or_dash(Some(&a.user))),
        ("Username", or_dash(Some(&a.username))),
        (
            "Data plane",
            format!("{} (worker {})", or_dash(Some(&a.data_plane)), a.worker),
        ),
        ("Client", client(a)),
        ("Server", or_dash(a.server.as_deref())),
        ("Relayed", list_or_dash(&a.relayed)),
        (
            "Created",
            match &a.created_at {
                Some(at) => format!("{} ago ({at})", age(a.age_s)),
                None => "-".into(),
            },
        ),
        (
            "Expires",
            expires_at(a.expires_in_s, a.expires_at.as_deref()),
        ),
        (
            "Bandwidth",
            if a.bandwidth_limit_bytes_per_s == 0 {
                "unlimited".into()
            } else {
                format!("{}/s per direction", bytes(a.bandwidth_limit_bytes_per_s))
            },
        ),
        (
            "Don't fragment",
            if a.dont_fragment { "yes" } else { "no" }.into(),
        ),
        ("Traffic up", traffic_line(a.traffic.up)),
        ("Traffic down", traffic_line(a.traffic.down)),
    ]);
    let mut out = fields(&pairs);
    out.push_str(&permissions(&a.permissions));
    out.push_str(&channels(&a.channels));
    out
}

fn permissions(p: &[Permission]) -> String {
    let mut out = format!("\nPermissions ({}):\n", p.len());
    if p.is_empty() {
        out.push_str("  none\n");
    } else {
        let rows: Vec<Vec<String>> = p
            .iter()
            .map(|p| {
                vec![
                    p.peer.clone(),
                    expires_at(p.expires_in_s, p.expires_at.as_deref()),
                ]
            })
            .collect();
        indent(&mut out, &grid(&["PEER", "EXPIRES"], &rows));
    }
    out
}

fn channels(c: &[Channel]) -> String {
    let mut out = format!("\nChannels ({}):\n", c.len());
    if c.is_empty() {
        out.push_str("  none\n");
    } else {
        let rows: Vec<Vec<String>> = c
            .iter()
            .map(|c| {
                vec![
                    format!("{:#06x}", c.number),
                    or_dash(c.peer.as_deref()),
                    expires_at(c.expires_in_s, c.expires_at.as_deref()),
                ]
            })
            .collect();
        indent(&mut out, &grid(&["CHANNEL", "PEER", "EXPIRES"], &rows));
    }
    out
}

fn indent(out: &mut String, text: &str) {
    for l in text.lines() {
        let _ = writeln!(out, "  {l}");
    }
}

fn drops(d: &std::collections::BTreeMap<String, u64>) -> String {
    if d.is_empty() {
        return "none".into();
    }
    d.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `ctl stats`: the counters as `key: value` lines (scripts grep them: the keys are the
/// JSON field names), a table of the data planes, then each one's relay paths.
pub fn stats(s: &Stats) -> String {
    let t = &s.totals;
    let mut out = String::new();
    let counters: [(&str, String); 14] = [
        ("allocations", t.allocations.to_string()),
        ("users", t.users.to_string()),
        ("data_planes_attached", t.data_planes_attached.to_string()),
        ("user_quota", t.user_quota.to_string()),
        ("total_quota", t.total_quota.to_string()),
        ("punted_requests", t.punted_requests.to_string()),
        ("auth_failures", t.auth_failures.to_string()),
        ("rate_limited", t.rate_limited.to_string()),
        ("policy_denied", t.policy_denied.to_string()),
        ("quota_rejected", t.quota_rejected.to_string()),
        ("ownership_violations", t.ownership_violations.to_string()),
        ("traffic_up", traffic_line(t.traffic.up)),
        ("traffic_down", traffic_line(t.traffic.down)),
        ("drops", drops(&t.drops)),
    ];
    for (k, v) in counters {
        let _ = writeln!(out, "{k}: {v}");
    }
    out.push('\n');
    if s.data_planes.is_empty() {
        out.push_str("no data planes\n");
        return out;
    }
    let rows: Vec<Vec<String>> = s
        .data_planes
        .iter()
        .map(|d| {
            let traffic = d.load.as_ref().map(|l| l.traffic);
            vec![
                d.id.clone(),
                state(d),
                age(d.attached_changed_age_s),
                d.load
                    .as_ref()
                    .map_or_else(|| "-".into(), |l| l.allocations.to_string()),
                d.workers.to_string(),
                traffic.map_or_else(|| "-".into(), |t| bytes(t.up.bytes)),
                traffic.map_or_else(|| "-".into(), |t| bytes(t.down.bytes)),
                d.acked_table_version.to_string(),
                or_dash(Some(&d.version)),
                d.started_age_s.map_or_else(|| "-".into(), |s| age(Some(s))),
                list_or_dash(
                    &d.listening
                        .iter()
                        .map(|l| format!("{}:{}", l.transport, or_dash(l.address.as_deref())))
                        .collect::<Vec<_>>(),
                ),
            ]
        })
        .collect();
    out.push_str(&grid(
        &[
            "DATA PLANE",
            "STATE",
            "SINCE",
            "ALLOCS",
            "WORKERS",
            "UP",
            "DOWN",
            "TABLE",
            "VERSION",
            "STARTED",
            "LISTENING",
        ],
        &rows,
    ));
    let paths: Vec<String> = s.data_planes.iter().filter_map(paths_line).collect();
    if !paths.is_empty() {
        out.push('\n');
        for p in paths {
            out.push_str(&p);
            out.push('\n');
        }
    }
    out
}

/// `attached`, `detached`, with `,draining`.
fn state(d: &DataPlane) -> String {
    let s = if d.attached { "attached" } else { "detached" };
    if d.draining {
        format!("{s},draining")
    } else {
        s.into()
    }
}

/// What a data plane's XDP fast path relayed and what its socket path relayed (the
/// load's traffic is both). The wording is grepped by tests and scripts: keep it.
fn paths_line(d: &DataPlane) -> Option<String> {
    let load = d.load.as_ref()?;
    let (up, down) = (load.traffic.up.packets, load.traffic.down.packets);
    Some(match &load.fast_path {
        None => format!(
            "{}: socket path {up} packets to peers, {down} to clients; XDP not asked for",
            d.id
        ),
        Some(FastPath {
            on: false,
            off_reason,
            ..
        }) => format!(
            "{}: socket path {up} packets to peers, {down} to clients; XDP off: {}",
            d.id,
            off_reason.as_deref().unwrap_or("")
        ),
        Some(f) => {
            let Traffic { up: xu, down: xd } = f.traffic;
            let passed: u64 = f.passed.values().sum();
            format!(
                "{}: XDP on {} relayed {} packets to peers, {} to clients, passed {passed} frames to the workers; socket path {} to peers, {} to clients",
                d.id,
                f.interfaces.join(", "),
                xu.packets,
                xd.packets,
                up.saturating_sub(xu.packets),
                down.saturating_sub(xd.packets)
            )
        }
    })
}

/// Column widths of `ctl watch` (a stream: fixed, not measured); a wider value pushes the
/// rest of its line along.
const EVENT_COLUMNS: [(&str, usize); 6] = [
    ("TIME", 24),
    ("ALLOCATION", 10),
    ("USER", 12),
    ("DATA PLANE", 10),
    ("EVENT", 16),
    ("DETAIL", 0),
];

/// The header of `ctl watch`; `fleet`: with an INSTANCE column first.
pub fn event_header(fleet: bool) -> String {
    let mut cells = Vec::new();
    let mut widths = Vec::new();
    if fleet {
        cells.push("INSTANCE".to_owned());
        widths.push(INSTANCE_WIDTH);
    }
    for (h, w) in EVENT_COLUMNS {
        cells.push(h.to_owned());
        widths.push(w);
    }
    let mut out = String::new();
    line(&mut out, &cells, &widths);
    out
}

const INSTANCE_WIDTH: usize = 12;

/// One line of `ctl watch`.
pub fn event(e: &Event) -> String {
    let (kind, detail) = match &e.what {
        What::Created {
            transport,
            client,
            relayed,
            expires_in_s,
            ..
        } => (
            "created",
            format!(
                "client {transport}:{} relayed {}, expires {}",
                or_dash(client.as_deref()),
                list_or_dash(relayed),
                expires(*expires_in_s)
            ),
        ),
        What::Refreshed { expires_in_s, .. } => {
            ("refreshed", format!("expires {}", expires(*expires_in_s)))
        }
        What::PermissionAdded { permission } => (
            "permission_added",
            permission.as_ref().map_or_else(String::new, |p| {
                format!("peer {}, expires {}", p.peer, expires(p.expires_in_s))
            }),
        ),
        What::ChannelAdded { channel } => (
            "channel_added",
            channel.as_ref().map_or_else(String::new, |c| {
                format!(
                    "{:#06x} to {}, expires {}",
                    c.number,
                    or_dash(c.peer.as_deref()),
                    expires(c.expires_in_s)
                )
            }),
        ),
        What::Deleted {
            reason,
            detail,
            traffic,
        } => (
            "deleted",
            format!(
                "{reason}{}{}, up {}, down {}",
                if detail.is_empty() { "" } else { ": " },
                detail,
                bytes(traffic.up.bytes),
                bytes(traffic.down.bytes)
            ),
        ),
        What::Usage { traffic, delta } => (
            "usage",
            format!(
                "up {} (+{}), down {} (+{})",
                bytes(traffic.up.bytes),
                bytes(delta.up.bytes),
                bytes(traffic.down.bytes),
                bytes(delta.down.bytes)
            ),
        ),
        What::Unknown => ("unknown", String::new()),
    };
    let mut cells = Vec::new();
    let mut widths = Vec::new();
    if let Some(i) = &e.instance {
        cells.push(i.clone());
        widths.push(INSTANCE_WIDTH);
    }
    for (v, (_, w)) in [
        or_dash(e.at.as_deref()),
        e.allocation_id.to_string(),
        or_dash(Some(&e.user)),
        or_dash(Some(&e.data_plane)),
        kind.to_owned(),
        detail,
    ]
    .into_iter()
    .zip(EVENT_COLUMNS)
    {
        cells.push(v);
        widths.push(w);
    }
    let mut out = String::new();
    line(&mut out, &cells, &widths);
    out
}

fn instance_state(i: &Instance) -> &'static str {
    if i.draining { "draining" } else { "open" }
}

fn addresses(i: &Instance) -> String {
    let all: Vec<String> = i
        .udp
        .iter()
        .map(|a| format!("udp:{a}"))
        .chain(i.tcp.iter().map(|a| format!("tcp:{a}")))
        .chain(i.tls.iter().map(|a| format!("tls:{a}")))
        .collect();
    list_or_dash(&all)
}

/// `ctl fleet instances`: the live instances with their load and addresses.
pub fn instances(list: &[Instance]) -> String {
    if list.is_empty() {
        return "no live instances\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            vec![
                i.id.clone(),
                or_dash(Some(&i.region)),
                i.allocations.to_string(),
                i.capacity.to_string(),
                format!("{:.2}", i.load),
                i.packets_per_s.to_string(),
                format!("{:.1}", i.cpu * 100.0),
                instance_state(i).into(),
                age(i.updated_age_s),
                addresses(i),
            ]
        })
        .collect();
    grid(
        &[
            "INSTANCE",
            "REGION",
            "ALLOCS",
            "CAPACITY",
            "LOAD",
            "PKTS/S",
            "CPU%",
            "STATE",
            "UPDATED",
            "ADDRESSES",
        ],
        &rows,
    )
}

/// `ctl fleet stats`: the instances' load, then the fleet's sums.
pub fn fleet_stats(s: &FleetStats) -> String {
    let mut out = String::new();
    if !s.instances.is_empty() {
        let rows: Vec<Vec<String>> = s
            .instances
            .iter()
            .map(|i| {
                vec![
                    i.id.clone(),
                    i.allocations.to_string(),
                    i.capacity.to_string(),
                    format!("{:.2}", i.load),
                    i.packets_per_s.to_string(),
                    format!("{:.1}", i.cpu * 100.0),
                    instance_state(i).into(),
                ]
            })
            .collect();
        out.push_str(&grid(
            &[
                "INSTANCE", "ALLOCS", "CAPACITY", "LOAD", "PKTS/S", "CPU%", "STATE",
            ],
            &rows,
        ));
        out.push('\n');
    }
    let t = &s.totals;
    let _ = writeln!(
        out,
        "fleet: {} instances, allocations {} of {}, {} packets/s, {} draining",
        t.instances, t.allocations, t.capacity, t.packets_per_s, t.draining
    );
    out
}

#[cfg(test)]
mod tests {
    //! Snapshots: fixed Admin API answers and a fixed `now` give exactly this text. A
    //! change here is a change users and their scripts see.
    #![allow(clippy::unwrap_used)]

    use turnpike_api::v1;

    use super::*;
    use crate::ctl::view::{self, Now};

    /// 2026-06-01T12:00:00.000Z.
    const NOW: u64 = 1_780_315_200_000;

    fn sa(s: &str) -> Option<v1::SocketAddress> {
        Some(s.parse::<std::net::SocketAddr>().unwrap().into())
    }

    fn usage(up: (u64, u64), down: (u64, u64)) -> Option<v1::Usage> {
        Some(v1::Usage {
            client_to_peer: Some(v1::TrafficCounters {
                packets: up.0,
                bytes: up.1,
            }),
            peer_to_client: Some(v1::TrafficCounters {
                packets: down.0,
                bytes: down.1,
            }),
        })
    }

    /// Allocation 17 of alice over UDP, 5m3s old, with two permissions and two
    /// channels; allocation 18 of bob over TLS, dual stack, idle.
    fn fixture() -> Vec<v1::AllocationInfo> {
        vec![
            v1::AllocationInfo {
                data_plane_id: "dp1".into(),
                state: Some(v1::AllocationState {
                    allocation: Some(v1::Allocation {
                        allocation_id: 17,
                        worker_id: 1,
                        five_tuple: Some(v1::FiveTuple {
                            transport: v1::Transport::Udp as i32,
                            client: sa("198.51.100.7:50123"),
                            server: sa("203.0.113.1:3478"),
                        }),
                        relay_addresses: vec![sa("203.0.113.1:49152").unwrap()],
                        deadline_unix_millis: NOW + 252_000,
                        remaining_millis: 0,
                        bandwidth_limit_bytes_per_second: 0,
                        user_id: "alice".into(),
                        dont_fragment: false,
                        username: "1780400000:alice".into(),
                    }),
                    permissions: vec![
                        v1::Permission {
                            peer_ip: vec![192, 0, 2, 10],
                            deadline_unix_millis: NOW + 299_400,
                            remaining_millis: 0,
                        },
                        v1::Permission {
                            peer_ip: "2001:db8::5"
                                .parse::<std::net::Ipv6Addr>()
                                .unwrap()
                                .octets()
                                .to_vec(),
                            deadline_unix_millis: NOW + 61_000,
                            remaining_millis: 0,
                        },
                    ],
                    channels: vec![
                        v1::Channel {
                            channel_number: 0x4000,
                            peer: sa("192.0.2.10:40000"),
                            deadline_unix_millis: NOW + 598_000,
                            remaining_millis: 0,
                        },
                        v1::Channel {
                            channel_number: 0x4001,
                            peer: sa("[2001:db8::5]:5004"),
                            deadline_unix_millis: NOW - 500,
                            remaining_millis: 0,
                        },
                    ],
                }),
                usage: usage((1234, 1_288_490), (5678, 12_884_901_888)),
                created_unix_millis: NOW - 303_000,
            },
            v1::AllocationInfo {
                data_plane_id: "dp2".into(),
                state: Some(v1::AllocationState {
                    allocation: Some(v1::Allocation {
                        allocation_id: 18,
                        worker_id: 0,
                        five_tuple: Some(v1::FiveTuple {
                            transport: v1::Transport::Tls as i32,
                            client: sa("[2001:db8:1::2]:61000"),
                            server: sa("[2001:db8::1]:5349"),
                        }),
                        relay_addresses: vec![
                            sa("203.0.113.1:49153").unwrap(),
                            sa("[2001:db8::1]:49153").unwrap(),
                        ],
                        deadline_unix_millis: NOW + 3_600_000,
                        remaining_millis: 0,
                        bandwidth_limit_bytes_per_second: 1_048_576,
                        user_id: "bob".into(),
                        dont_fragment: true,
                        username: "bob".into(),
                    }),
                    permissions: vec![],
                    channels: vec![],
                }),
                usage: None,
                created_unix_millis: NOW - 90_061_000,
            },
        ]
    }

    fn views() -> Vec<Allocation> {
        fixture()
            .iter()
            .filter_map(|a| Allocation::new(a, Now(NOW)))
            .collect()
    }

    fn stats_fixture() -> v1::GetStatsResponse {
        v1::GetStatsResponse {
            totals: Some(v1::ServerStats {
                allocations: 2,
                users: 2,
                data_planes_attached: 1,
                traffic: usage((6912, 1_288_490), (5678, 12_884_901_888)),
                drops: vec![
                    v1::DropCount {
                        reason: v1::DropReason::NoPermission as i32,
                        packets: 3,
                    },
                    v1::DropCount {
                        reason: v1::DropReason::Malformed as i32,
                        packets: 1,
                    },
                ],
                punted_requests: 40,
                auth_failures: 2,
                rate_limited: 0,
                policy_denied: 1,
                quota_rejected: 0,
                ownership_violations: 0,
                user_quota: 100,
                total_quota: 15000,
            }),
            data_planes: vec![
                v1::DataPlaneStats {
                    data_plane_id: "dp1".into(),
                    version: "0.3.0".into(),
                    started_unix_millis: NOW - 10_800_000,
                    attached: true,
                    draining: false,
                    worker_count: 2,
                    listening_addresses: vec![
                        v1::ListeningAddress {
                            transport: v1::Transport::Udp as i32,
                            address: sa("203.0.113.1:3478"),
                        },
                        v1::ListeningAddress {
                            transport: v1::Transport::Tcp as i32,
                            address: sa("203.0.113.1:3478"),
                        },
                    ],
                    acked_table_version: 42,
                    load: Some(v1::LoadReport {
                        sampled_unix_millis: NOW - 1_500,
                        allocations: 2,
                        traffic: usage((6912, 1_288_490), (5678, 12_884_901_888)),
                        drops: vec![],
                        workers: vec![v1::WorkerLoad {
                            worker_id: 0,
                            allocations: 2,
                            received_packets: 7000,
                        }],
                        fast_path: Some(v1::FastPathReport {
                            interfaces: vec!["vs (native)".into()],
                            off_reason: String::new(),
                            traffic: usage((6000, 1_000_000), (5000, 1_000_000)),
                            relayed: vec![v1::PathCount {
                                name: "channel_up".into(),
                                packets: 6000,
                            }],
                            passed: vec![
                                v1::PathCount {
                                    name: "no_entry".into(),
                                    packets: 7,
                                },
                                v1::PathCount {
                                    name: "stun".into(),
                                    packets: 5,
                                },
                            ],
                            allocations: 2,
                        }),
                    }),
                    attached_changed_unix_millis: NOW - 7_380_000,
                    relay_ips: vec![v1::RelayIp {
                        ip: vec![10, 0, 0, 5],
                        advertised_ip: vec![203, 0, 113, 1],
                    }],
                },
                v1::DataPlaneStats {
                    data_plane_id: "dp2".into(),
                    version: "0.3.0".into(),
                    started_unix_millis: 0,
                    attached: false,
                    draining: true,
                    worker_count: 4,
                    listening_addresses: vec![],
                    acked_table_version: 7,
                    load: None,
                    attached_changed_unix_millis: NOW - 42_000,
                    relay_ips: vec![],
                },
            ],
        }
    }

    fn record(
        id: &str,
        allocations: u64,
        draining: bool,
    ) -> turnpike_controlplane::fleet::InstanceRecord {
        turnpike_controlplane::fleet::InstanceRecord {
            id: id.into(),
            region: "eu".into(),
            zone: "eu-1a".into(),
            udp: vec!["203.0.113.1:3478".parse().unwrap()],
            tcp: vec!["203.0.113.1:3478".parse().unwrap()],
            tls: vec![],
            tls_domain: None,
            relay_ips: vec!["203.0.113.1".parse().unwrap()],
            allocations,
            capacity: 10,
            packets_per_sec: 1200,
            cpu: 0.125,
            draining,
            admin: Some("http://127.0.0.1:3479".into()),
            users: std::collections::BTreeMap::new(),
            updated_ms: NOW - 2_000,
        }
    }

    fn event(sequence: u64, body: v1::event::Body) -> v1::Event {
        v1::Event {
            sequence,
            timestamp_unix_millis: NOW - 250,
            allocation_id: 17,
            user_id: "alice".into(),
            data_plane_id: "dp1".into(),
            body: Some(body),
        }
    }

    #[test]
    fn units_read_as_people_write_them() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.0 KiB");
        assert_eq!(bytes(1_288_490), "1.2 MiB");
        assert_eq!(bytes(u64::MAX), "16.0 EiB");
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(59), "59s");
        assert_eq!(duration(252), "4m12s");
        assert_eq!(duration(3600), "1h0m");
        assert_eq!(duration(90_061), "1d1h");
        assert_eq!(view::rfc3339(0), None);
        assert_eq!(
            view::rfc3339(1).as_deref(),
            Some("1970-01-01T00:00:00.001Z")
        );
        assert_eq!(
            view::rfc3339(951_782_400_000).as_deref(),
            Some("2000-02-29T00:00:00.000Z")
        );
        assert_eq!(
            view::rfc3339(NOW + 123).as_deref(),
            Some("2026-06-01T12:00:00.123Z")
        );
        assert_eq!(
            view::rfc3339(253_402_300_799_999).as_deref(),
            Some("9999-12-31T23:59:59.999Z")
        );
    }

    #[test]
    fn list_is_one_aligned_line_per_allocation() {
        let expected = r#"ID   USER    CLIENT                      RELAYED                                 PEERS   CHANNELS   UP        DOWN       AGE    EXPIRES    DATA PLANE
17   alice   udp:198.51.100.7:50123      203.0.113.1:49152                       2       2          1.2 MiB   12.0 GiB   5m3s   in 4m12s   dp1
18   bob     tls:[2001:db8:1::2]:61000   203.0.113.1:49153,[2001:db8::1]:49153   0       0          0 B       0 B        1d1h   in 1h0m    dp2
"#;
        assert_eq!(allocations(&views()), expected);
    }

    #[test]
    fn get_shows_one_allocation_with_its_permissions_and_channels() {
        let expected = r#"ID:             17
User:           alice
Username:       1780400000:alice
Data plane:     dp1 (worker 1)
Client:         udp:198.51.100.7:50123
Server:         203.0.113.1:3478
Relayed:        203.0.113.1:49152
Created:        5m3s ago (2026-06-01T11:54:57.000Z)
Expires:        in 4m12s (2026-06-01T12:04:12.000Z)
Bandwidth:      unlimited
Don't fragment: no
Traffic up:     1.2 MiB in 1234 packets
Traffic down:   12.0 GiB in 5678 packets

Permissions (2):
  PEER          EXPIRES
  192.0.2.10    in 4m59s (2026-06-01T12:04:59.400Z)
  2001:db8::5   in 1m1s (2026-06-01T12:01:01.000Z)

Channels (2):
  CHANNEL   PEER                 EXPIRES
  0x4000    192.0.2.10:40000     in 9m58s (2026-06-01T12:09:58.000Z)
  0x4001    [2001:db8::5]:5004   expired (2026-06-01T11:59:59.500Z)
"#;
        assert_eq!(allocation(&views()[0]), expected);
    }

    #[test]
    fn get_of_an_idle_dual_stack_allocation() {
        let expected = r#"ID:             18
User:           bob
Username:       bob
Data plane:     dp2 (worker 0)
Client:         tls:[2001:db8:1::2]:61000
Server:         [2001:db8::1]:5349
Relayed:        203.0.113.1:49153,[2001:db8::1]:49153
Created:        1d1h ago (2026-05-31T10:58:59.000Z)
Expires:        in 1h0m (2026-06-01T13:00:00.000Z)
Bandwidth:      1.0 MiB/s per direction
Don't fragment: yes
Traffic up:     0 B in 0 packets
Traffic down:   0 B in 0 packets

Permissions (0):
  none

Channels (0):
  none
"#;
        assert_eq!(allocation(&views()[1]), expected);
    }

    #[test]
    fn stats_keeps_key_value_counters_and_tabulates_data_planes() {
        let expected = r#"allocations: 2
users: 2
data_planes_attached: 1
user_quota: 100
total_quota: 15000
punted_requests: 40
auth_failures: 2
rate_limited: 0
policy_denied: 1
quota_rejected: 0
ownership_violations: 0
traffic_up: 1.2 MiB in 6912 packets
traffic_down: 12.0 GiB in 5678 packets
drops: malformed 1, no_permission 3

DATA PLANE   STATE               SINCE   ALLOCS   WORKERS   UP        DOWN       TABLE   VERSION   STARTED   LISTENING
dp1          attached            2h3m    2        2         1.2 MiB   12.0 GiB   42      0.3.0     3h0m      udp:203.0.113.1:3478,tcp:203.0.113.1:3478
dp2          detached,draining   42s     -        4         -         -          7       0.3.0     -         -

dp1: XDP on vs (native) relayed 6000 packets to peers, 5000 to clients, passed 12 frames to the workers; socket path 912 to peers, 678 to clients
"#;
        assert_eq!(
            stats(&view::Stats::new(&stats_fixture(), Now(NOW))),
            expected
        );
    }

    #[test]
    fn watch_prints_a_header_and_one_line_per_event() {
        use v1::event::Body;
        let events = [
            event(
                1,
                Body::Created(v1::AllocationCreated {
                    five_tuple: fixture()[0]
                        .state
                        .as_ref()
                        .and_then(|s| s.allocation.as_ref())
                        .and_then(|a| a.five_tuple.clone()),
                    relay_addresses: vec![sa("203.0.113.1:49152").unwrap()],
                    deadline_unix_millis: NOW + 600_000,
                }),
            ),
            event(
                2,
                Body::ChannelAdded(v1::ChannelAdded {
                    channel: Some(v1::Channel {
                        channel_number: 0x4000,
                        peer: sa("192.0.2.10:40000"),
                        deadline_unix_millis: NOW + 600_000,
                        remaining_millis: 0,
                    }),
                }),
            ),
            event(
                3,
                Body::Deleted(v1::AllocationDeleted {
                    reason: v1::DeletionReason::Revoked as i32,
                    detail: "ctl".into(),
                    usage: usage((10, 2048), (20, 4096)),
                }),
            ),
        ];
        let mut text = event_header(false);
        for e in &events {
            text.push_str(&super::event(&view::Event::new(e, None, Now(NOW))));
        }
        text.push_str(&event_header(true));
        text.push_str(&super::event(&view::Event::new(
            &events[0],
            Some("i2"),
            Now(NOW),
        )));
        let expected = r#"TIME                       ALLOCATION   USER           DATA PLANE   EVENT              DETAIL
2026-06-01T11:59:59.750Z   17           alice          dp1          created            client udp:198.51.100.7:50123 relayed 203.0.113.1:49152, expires in 10m0s
2026-06-01T11:59:59.750Z   17           alice          dp1          channel_added      0x4000 to 192.0.2.10:40000, expires in 10m0s
2026-06-01T11:59:59.750Z   17           alice          dp1          deleted            revoked: ctl, up 2.0 KiB, down 4.0 KiB
INSTANCE       TIME                       ALLOCATION   USER           DATA PLANE   EVENT              DETAIL
i2             2026-06-01T11:59:59.750Z   17           alice          dp1          created            client udp:198.51.100.7:50123 relayed 203.0.113.1:49152, expires in 10m0s
"#;
        assert_eq!(text, expected);
    }

    #[test]
    fn fleet_instances_stats_and_list() {
        let now = Now(NOW);
        let all = vec![
            view::Instance::new(&record("i2", 3, false), false, now),
            view::Instance::new(&record("i3", 0, false), true, now),
        ];
        let mut text = instances(&all);
        text.push_str(&fleet_stats(&view::FleetStats::new(all)));
        let mut listed = views();
        for a in &mut listed {
            a.instance = Some("i2".into());
        }
        text.push_str(&allocations(&listed));
        let expected = r#"INSTANCE   REGION   ALLOCS   CAPACITY   LOAD   PKTS/S   CPU%   STATE      UPDATED   ADDRESSES
i2         eu       3        10         0.30   1200     12.5   open       2s        udp:203.0.113.1:3478,tcp:203.0.113.1:3478
i3         eu       0        10         0.12   1200     12.5   draining   2s        udp:203.0.113.1:3478,tcp:203.0.113.1:3478
INSTANCE   ALLOCS   CAPACITY   LOAD   PKTS/S   CPU%   STATE
i2         3        10         0.30   1200     12.5   open
i3         0        10         0.12   1200     12.5   draining

fleet: 2 instances, allocations 3 of 20, 2400 packets/s, 1 draining
INSTANCE   ID   USER    CLIENT                      RELAYED                                 PEERS   CHANNELS   UP        DOWN       AGE    EXPIRES    DATA PLANE
i2         17   alice   udp:198.51.100.7:50123      203.0.113.1:49152                       2       2          1.2 MiB   12.0 GiB   5m3s   in 4m12s   dp1
i2         18   bob     tls:[2001:db8:1::2]:61000   203.0.113.1:49153,[2001:db8::1]:49153   0       0          0 B       0 B        1d1h   in 1h0m    dp2
"#;
        assert_eq!(text, expected);
    }

    #[test]
    fn nothing_to_show_says_so() {
        assert_eq!(allocations(&[]), "no allocations\n");
        assert_eq!(instances(&[]), "no live instances\n");
    }

    /// The JSON schema of turnpike/CTL.md, field by field.
    #[test]
    fn json_schema_of_an_allocation() {
        let doc = view::Document::new(
            "allocation",
            Now(NOW),
            view::AllocationDoc {
                allocation: views().remove(0),
            },
        );
        let expected = r#"{
  "schema": "turnpike.ctl/v1",
  "kind": "allocation",
  "now": "2026-06-01T12:00:00.000Z",
  "allocation": {
    "id": 17,
    "data_plane": "dp1",
    "worker": 1,
    "user": "alice",
    "username": "1780400000:alice",
    "transport": "udp",
    "client": "198.51.100.7:50123",
    "server": "203.0.113.1:3478",
    "relayed": [
      "203.0.113.1:49152"
    ],
    "created_at": "2026-06-01T11:54:57.000Z",
    "age_s": 303,
    "expires_at": "2026-06-01T12:04:12.000Z",
    "expires_in_s": 252,
    "bandwidth_limit_bytes_per_s": 0,
    "dont_fragment": false,
    "permissions": [
      {
        "peer": "192.0.2.10",
        "expires_at": "2026-06-01T12:04:59.400Z",
        "expires_in_s": 299
      },
      {
        "peer": "2001:db8::5",
        "expires_at": "2026-06-01T12:01:01.000Z",
        "expires_in_s": 61
      }
    ],
    "channels": [
      {
        "number": 16384,
        "peer": "192.0.2.10:40000",
        "expires_at": "2026-06-01T12:09:58.000Z",
        "expires_in_s": 598
      },
      {
        "number": 16385,
        "peer": "[2001:db8::5]:5004",
        "expires_at": "2026-06-01T11:59:59.500Z",
        "expires_in_s": 0
      }
    ],
    "traffic": {
      "up": {
        "packets": 1234,
        "bytes": 1288490
      },
      "down": {
        "packets": 5678,
        "bytes": 12884901888
      }
    }
  }
}"#;
        assert_eq!(serde_json::to_string_pretty(&doc).unwrap(), expected);
    }

    /// The JSON schema of `ctl stats`, field by field.
    #[test]
    fn json_schema_of_stats() {
        let doc = view::Document::new(
            "stats",
            Now(NOW),
            view::Stats::new(&stats_fixture(), Now(NOW)),
        );
        let expected = r#"{
  "schema": "turnpike.ctl/v1",
  "kind": "stats",
  "now": "2026-06-01T12:00:00.000Z",
  "totals": {
    "allocations": 2,
    "users": 2,
    "data_planes_attached": 1,
    "user_quota": 100,
    "total_quota": 15000,
    "punted_requests": 40,
    "auth_failures": 2,
    "rate_limited": 0,
    "policy_denied": 1,
    "quota_rejected": 0,
    "ownership_violations": 0,
    "traffic": {
      "up": {
        "packets": 6912,
        "bytes": 1288490
      },
      "down": {
        "packets": 5678,
        "bytes": 12884901888
      }
    },
    "drops": {
      "malformed": 1,
      "no_permission": 3
    }
  },
  "data_planes": [
    {
      "id": "dp1",
      "version": "0.3.0",
      "started_at": "2026-06-01T09:00:00.000Z",
      "started_age_s": 10800,
      "attached": true,
      "draining": false,
      "attached_changed_at": "2026-06-01T09:57:00.000Z",
      "attached_changed_age_s": 7380,
      "workers": 2,
      "listening": [
        {
          "transport": "udp",
          "address": "203.0.113.1:3478"
        },
        {
          "transport": "tcp",
          "address": "203.0.113.1:3478"
        }
      ],
      "relay_ips": [
        {
          "ip": "10.0.0.5",
          "advertised": "203.0.113.1"
        }
      ],
      "acked_table_version": 42,
      "load": {
        "sampled_at": "2026-06-01T11:59:58.500Z",
        "sampled_age_s": 1,
        "allocations": 2,
        "traffic": {
          "up": {
            "packets": 6912,
            "bytes": 1288490
          },
          "down": {
            "packets": 5678,
            "bytes": 12884901888
          }
        },
        "drops": {},
        "workers": [
          {
            "id": 0,
            "allocations": 2,
            "received_packets": 7000
          }
        ],
        "fast_path": {
          "on": true,
          "interfaces": [
            "vs (native)"
          ],
          "off_reason": null,
          "traffic": {
            "up": {
              "packets": 6000,
              "bytes": 1000000
            },
            "down": {
              "packets": 5000,
              "bytes": 1000000
            }
          },
          "relayed": {
            "channel_up": 6000
          },
          "passed": {
            "no_entry": 7,
            "stun": 5
          },
          "allocations": 2
        }
      }
    },
    {
      "id": "dp2",
      "version": "0.3.0",
      "started_at": null,
      "started_age_s": null,
      "attached": false,
      "draining": true,
      "attached_changed_at": "2026-06-01T11:59:18.000Z",
      "attached_changed_age_s": 42,
      "workers": 4,
      "listening": [],
      "relay_ips": [],
      "acked_table_version": 7,
      "load": null
    }
  ]
}"#;
        assert_eq!(serde_json::to_string_pretty(&doc).unwrap(), expected);
    }
}
