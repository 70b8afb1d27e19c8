//! Relay port bookkeeping: which relay transport addresses are in use or reserved.

use std::net::{IpAddr, SocketAddr};

use ahash::AHashSet;
use rand::Rng;

/// The relay ports in use, over a configured range and a set of relay IPs.
#[derive(Debug, Clone)]
pub struct Ports {
    min: u16,
    max: u16,
    used: AHashSet<SocketAddr>,
}

impl Ports {
    /// Ports `min..=max` on any relay IP.
    pub fn new(min: u16, max: u16) -> Ports {
        Ports {
            min,
            max,
            used: AHashSet::new(),
        }
    }

    /// Whether `addr` is free.
    pub fn is_free(&self, addr: &SocketAddr) -> bool {
        !self.used.contains(addr)
    }

    /// Marks `addr` used (binding, bound, or reserved).
    pub fn take(&mut self, addr: SocketAddr) {
        self.used.insert(addr);
    }

    /// Frees `addr`.
    pub fn release(&mut self, addr: &SocketAddr) {
        self.used.remove(addr);
    }

    /// Ports in use on `ip`.
    pub fn used_on(&self, ip: &IpAddr) -> usize {
        self.used.iter().filter(|a| a.ip() == *ip).count()
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
