//! Relay port bookkeeping: which relay transport addresses are in use or reserved.

use std::net::{IpAddr, SocketAddr};

use ahash::{AHashMap, AHashSet};
use rand::Rng;

/// The relay ports in use, over a configured range and a set of relay IPs.
#[derive(Debug, Clone)]
pub struct Ports {
    min: u16,
    max: u16,
    used: AHashSet<SocketAddr>,
    /// Ports in use per relay IP (to pick the least used IP without a scan).
    per_ip: AHashMap<IpAddr, usize>,
}

impl Ports {
    /// Ports `min..=max` on any relay IP.
    pub fn new(min: u16, max: u16) -> Ports {
        Ports {
            min,
            max,
            used: AHashSet::new(),
            per_ip: AHashMap::new(),
        }
    }

    /// Whether `addr` is free.
    pub fn is_free(&self, addr: &SocketAddr) -> bool {
        !self.used.contains(addr)
    }

    /// Marks `addr` used (binding, bound, or reserved).
    pub fn take(&mut self, addr: SocketAddr) {
        if self.used.insert(addr) {
            *self.per_ip.entry(addr.ip()).or_insert(0) += 1;
        }
    }

    /// Frees `addr`.
    pub fn release(&mut self, addr: &SocketAddr) {
        if self.used.remove(addr)
            && let Some(n) = self.per_ip.get_mut(&addr.ip())
        {
            *n = n.saturating_sub(1);
        }
    }

    /// Ports in use on `ip`.
    pub fn used_on(&self, ip: &IpAddr) -> usize {
        self.per_ip.get(ip).copied().unwrap_or(0)
    }

    /// Ports in use in all.
    pub fn used(&self) -> usize {
        self.used.len()
    }

    /// Picks a free port on `ip` at random: even if `even`, with `port + 1` free as well
    /// if `pair`. Random probes first, then a scan from a random point, so a nearly full
    /// range still finds its last free port. Does not mark it used.
    pub fn pick<R: Rng>(&self, rng: &mut R, ip: IpAddr, even: bool, pair: bool) -> Option<u16> {
        let ok = |p: u16| {
            (!even || p.is_multiple_of(2))
                && self.is_free(&SocketAddr::new(ip, p))
                && (!pair || (p < self.max && self.is_free(&SocketAddr::new(ip, p + 1))))
        };
        let span = u32::from(self.max) - u32::from(self.min) + 1;
        for _ in 0..16 {
            let p = self.min + (rng.random_range(0..span) as u16);
            if ok(p) {
                return Some(p);
            }
        }
        let start = rng.random_range(0..span);
        (0..span)
            .map(|i| self.min + ((start + i) % span) as u16)
            .find(|p| ok(*p))
    }
}
