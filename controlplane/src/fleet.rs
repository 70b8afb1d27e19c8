//! The fleet as one instance sees it, sans I/O: the records every instance keeps in the
//! registry (etcd, under a lease), and the redirection decision made from them.
//!
//! An instance redirects new allocations (300 Try Alternate) when it is drained, or when
//! its measured load is at or above [`RedirectConfig::high`]; once redirecting for load,
//! it serves locally again only when its load falls to [`RedirectConfig::low`]
//! (hysteresis). It redirects to the least-loaded live instance of its region that is
//! not drained, not itself overloaded, and — unless this instance is drained — lighter
//! than this one by at least [`RedirectConfig::margin`], so that two instances near the
//! threshold never send clients back and forth. With no such instance it serves
//! locally. A record not refreshed for [`RedirectConfig::stale_ms`] counts as dead even
//! before its lease expires.

use std::collections::HashMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::types::Transport;

/// What an instance publishes about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct InstanceRecord {
    /// The instance's id, unique in the fleet.
    pub id: String,
    /// Region label (redirects stay within a region).
    pub region: String,
    /// Zone label.
    pub zone: String,
    /// Where clients reach it over UDP.
    pub udp: Vec<SocketAddr>,
    /// Over TCP.
    pub tcp: Vec<SocketAddr>,
    /// Over TLS.
    pub tls: Vec<SocketAddr>,
    /// The name its TLS certificate is for (ALTERNATE-DOMAIN for TLS redirects).
    pub tls_domain: Option<String>,
    /// Relay IPs.
    pub relay_ips: Vec<std::net::IpAddr>,
    /// Live allocations.
    pub allocations: u64,
    /// Allocations it takes at most (its total quota; 0: unlimited).
    pub capacity: u64,
    /// Packets relayed per second (both directions), over the last report interval.
    pub packets_per_sec: u64,
    /// Busy fraction of its data-plane workers' cores (0.0 to 1.0), over the last report
    /// interval.
    pub cpu: f64,
    /// Drained: takes no new allocations.
    pub draining: bool,
    /// Its Admin API (`http://` on loopback or `https://`), for fleet-wide admin.
    #[serde(default)]
    pub admin: Option<String>,
    /// Its users holding at least [`heavy_threshold`] allocations, with their counts: the
    /// other instances count them against the per-user quota.
    #[serde(default)]
    pub users: std::collections::BTreeMap<String, u32>,
    /// When it wrote this record, unix milliseconds.
    pub updated_ms: u64,
}

impl InstanceRecord {
    /// Its load, 0.0 (idle) to 1.0 (full): the larger of its allocation fill and its
    /// workers' CPU.
    pub fn load(&self) -> f64 {
        let fill = if self.capacity == 0 {
            0.0
        } else {
            self.allocations as f64 / self.capacity as f64
        };
        fill.max(self.cpu).clamp(0.0, 1.0)
    }

    /// Its first address for `transport`.
    pub fn address(&self, transport: Transport) -> Option<SocketAddr> {
        match transport {
            Transport::Udp => self.udp.first(),
            Transport::Tcp => self.tcp.first(),
            Transport::Tls => self.tls.first(),
        }
        .copied()
    }
}

/// The smallest local count of a user that an instance publishes: a tenth of the
/// per-user quota (at least 1). A user below it on every instance can exceed the quota
/// fleet-wide by at most `threshold - 1` allocations per instance.
pub fn heavy_threshold(user_quota: u32) -> u32 {
    (user_quota / 10).max(1)
}

/// How many users a record lists at most (the heaviest).
pub const MAX_PUBLISHED_USERS: usize = 1000;

/// Configuration shared through the fleet (etcd), replacing the configured values
/// while present.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SharedConfig {
    /// Users valid on every instance (name, password), next to the configured ones.
    pub users: Vec<(String, String)>,
    /// The peer policy's allow and deny lists (`None`: the configured ones).
    pub policy: Option<(Vec<crate::Cidr>, Vec<crate::Cidr>)>,
    /// The allocation quotas, per user and in all (`None`: the configured ones).
    pub quotas: Option<(u32, u32)>,
}

/// When an instance redirects.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RedirectConfig {
    /// Redirect new allocations at or above this load.
    pub high: f64,
    /// Stop redirecting at or below this load.
    pub low: f64,
    /// A target must be lighter than this instance by this much.
    pub margin: f64,
    /// A record older than this is ignored (milliseconds).
    pub stale_ms: u64,
}

impl Default for RedirectConfig {
    fn default() -> Self {
        RedirectConfig {
            high: 0.85,
            low: 0.70,
            margin: 0.10,
            stale_ms: 15_000,
        }
    }
}

/// Where a redirected client goes, per transport.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Alternates {
    /// The instance chosen.
    pub instance: String,
    /// Its UDP address.
    pub udp: Option<SocketAddr>,
    /// Its TCP address.
    pub tcp: Option<SocketAddr>,
    /// Its TLS address.
    pub tls: Option<SocketAddr>,
    /// The name of its TLS certificate, for ALTERNATE-DOMAIN.
    pub tls_domain: Option<String>,
}

impl Alternates {
    /// The address for a client on `transport`.
    pub fn for_transport(&self, transport: Transport) -> Option<SocketAddr> {
        match transport {
            Transport::Udp => self.udp,
            Transport::Tcp => self.tcp,
            Transport::Tls => self.tls,
        }
    }
}

/// The registry's view from one instance, and its redirection state.
#[derive(Debug, Clone)]
pub struct FleetView {
    me: String,
    cfg: RedirectConfig,
    others: HashMap<String, InstanceRecord>,
    overloaded: bool,
}

impl FleetView {
    /// The view of instance `me`.
    pub fn new(me: &str, cfg: RedirectConfig) -> FleetView {
        FleetView {
            me: me.to_owned(),
            cfg,
            others: HashMap::new(),
            overloaded: false,
        }
    }

    /// A record was written (or read at start).
    pub fn upsert(&mut self, r: InstanceRecord) {
        if r.id != self.me {
            self.others.insert(r.id.clone(), r);
        }
    }

    /// An instance's record went away (its lease expired, or it left).
    pub fn remove(&mut self, id: &str) {
        self.others.remove(id);
    }

    /// Forgets every other instance (the registry is being read again).
    pub fn clear(&mut self) {
        self.others.clear();
    }

    /// The other instances known, live or not.
    pub fn others(&self) -> impl Iterator<Item = &InstanceRecord> {
        self.others.values()
    }

    /// Whether this instance redirects for load now.
    pub fn overloaded(&self) -> bool {
        self.overloaded
    }

    /// The allocations each user holds on the other live instances (records fresher
    /// than [`RedirectConfig::stale_ms`]).
    pub fn user_counts(&self, now_ms: u64) -> std::collections::HashMap<String, u32> {
        let mut m = std::collections::HashMap::new();
        for r in self.others.values() {
            if now_ms.saturating_sub(r.updated_ms) >= self.cfg.stale_ms {
                continue;
            }
            for (u, n) in &r.users {
                *m.entry(u.clone()).or_insert(0) += *n;
            }
        }
        m
    }

    /// Updates the redirection state from this instance's own record at `now`; returns
    /// where new allocations go, or `None` to serve them here.
    pub fn decide(&mut self, me: &InstanceRecord, now_ms: u64) -> Option<Alternates> {
        let load = me.load();
        if load >= self.cfg.high {
            self.overloaded = true;
        } else if load <= self.cfg.low {
            self.overloaded = false;
        }
        if !me.draining && !self.overloaded {
            return None;
        }
        self.pick(me, me.draining, now_ms)
    }

    /// Where new allocations would go were this instance drained now: the least loaded
    /// live, open, not overloaded instance of its region (`None`: there is none, they
    /// would get 508). Leaves the redirection state as it is.
    pub fn drain_target(&self, me: &InstanceRecord, now_ms: u64) -> Option<Alternates> {
        self.pick(me, true, now_ms)
    }

    fn pick(&self, me: &InstanceRecord, drained: bool, now_ms: u64) -> Option<Alternates> {
        let load = me.load();
        let region = &me.region;
        self.others
            .values()
            .filter(|r| &r.region == region)
            .filter(|r| !r.draining)
            .filter(|r| now_ms.saturating_sub(r.updated_ms) < self.cfg.stale_ms)
            .filter(|r| r.load() < self.cfg.high)
            .filter(|r| drained || r.load() + self.cfg.margin <= load)
            .filter(|r| !r.udp.is_empty() || !r.tcp.is_empty() || !r.tls.is_empty())
            .min_by(|a, b| a.load().total_cmp(&b.load()).then_with(|| a.id.cmp(&b.id)))
            .map(|r| Alternates {
                instance: r.id.clone(),
                udp: r.address(Transport::Udp),
                tcp: r.address(Transport::Tcp),
                tls: r.address(Transport::Tls),
                tls_domain: r.tls_domain.clone(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, allocations: u64, now: u64) -> InstanceRecord {
        InstanceRecord {
            id: id.into(),
            region: "eu".into(),
            udp: vec![
                format!("192.0.2.{}:3478", id.len())
                    .parse()
                    .unwrap_or_else(|_| unreachable!()),
            ],
            allocations,
            capacity: 100,
            updated_ms: now,
            ..InstanceRecord::default()
        }
    }

    #[test]
    fn serves_locally_until_loaded_then_redirects_to_the_least_loaded_with_hysteresis() {
        let now = 1_000_000;
        let mut v = FleetView::new("a", RedirectConfig::default());
        v.upsert(rec("bb", 40, now));
        v.upsert(rec("ccc", 20, now));
        let mut me = rec("a", 50, now);
        assert_eq!(v.decide(&me, now), None);
        me.allocations = 90;
        assert_eq!(v.decide(&me, now).map(|a| a.instance), Some("ccc".into()));
        // Between low and high: still redirecting (hysteresis).
        me.allocations = 80;
        assert!(v.decide(&me, now).is_some());
        me.allocations = 70;
        assert_eq!(v.decide(&me, now), None);
        // And between low and high again: serving locally until high.
        me.allocations = 84;
        assert_eq!(v.decide(&me, now), None);
    }

    #[test]
    fn never_to_a_dead_drained_overloaded_foreign_or_not_lighter_instance() {
        let now = 1_000_000;
        let cfg = RedirectConfig::default();
        let mut v = FleetView::new("a", cfg);
        let mut stale = rec("stale", 0, now - cfg.stale_ms);
        stale.capacity = 100;
        v.upsert(stale);
        let mut drained = rec("drained", 0, now);
        drained.draining = true;
        v.upsert(drained);
        v.upsert(rec("full", 95, now));
        let mut foreign = rec("foreign", 0, now);
        foreign.region = "us".into();
        v.upsert(foreign);
        v.upsert(rec("close", 82, now));
        let me = rec("a", 90, now);
        // Overloaded, but no instance qualifies ("close" is not lighter by the margin).
        assert_eq!(v.decide(&me, now), None);
        assert!(v.overloaded());
        // Were it drained, "close" would do: a drain redirects at once.
        assert_eq!(
            v.drain_target(&me, now).map(|a| a.instance),
            Some("close".into())
        );
        // Drained, this instance takes any live, open, not overloaded one.
        let mut me = me;
        me.draining = true;
        assert_eq!(v.decide(&me, now).map(|a| a.instance), Some("close".into()));
        v.remove("close");
        assert_eq!(v.decide(&me, now), None);
    }

    #[test]
    fn two_loaded_instances_do_not_bounce_clients() {
        let now = 1_000_000;
        let (mut va, mut vb) = (
            FleetView::new("a", RedirectConfig::default()),
            FleetView::new("b", RedirectConfig::default()),
        );
        let (a, b) = (rec("a", 88, now), rec("b", 86, now));
        va.upsert(b.clone());
        vb.upsert(a.clone());
        assert_eq!(va.decide(&a, now), None);
        assert_eq!(vb.decide(&b, now), None);
    }

    #[test]
    fn cpu_counts_as_load_and_addresses_follow_the_transport() {
        let now = 1_000_000;
        let mut v = FleetView::new("a", RedirectConfig::default());
        let mut b = rec("b", 0, now);
        b.tcp = vec!["192.0.2.9:3478".parse().unwrap_or_else(|_| unreachable!())];
        b.tls = vec!["192.0.2.9:443".parse().unwrap_or_else(|_| unreachable!())];
        b.tls_domain = Some("b.turn.example".into());
        v.upsert(b);
        let mut me = rec("a", 0, now);
        me.cpu = 0.95;
        let alt = v.decide(&me, now).unwrap_or_default();
        assert_eq!(
            alt.for_transport(Transport::Tls),
            "192.0.2.9:443".parse().ok()
        );
        assert_eq!(alt.tls_domain.as_deref(), Some("b.turn.example"));
    }
}
