//! Per-source rate limiting of the Binding requests a worker answers, in bounded memory.

use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};

use ahash::AHashMap;

use crate::BindingLimit;

/// Milli-tokens per token: refills are exact at millisecond steps.
const MILLI: u64 = 1000;
/// When a table is full, it is swept at most this often (a sweep walks the table).
const FULL_SWEEP_MS: u64 = 10;

/// A token bucket in milli-tokens.
#[derive(Debug, Clone, Copy)]
struct Tokens {
    milli: u64,
    last: u64,
}

impl Tokens {
    fn full(burst: u64, now: u64) -> Tokens {
        Tokens {
            milli: burst.saturating_mul(MILLI),
            last: now,
        }
    }

    /// The milli-tokens held at `now`, with `rate` tokens/s up to `burst`.
    fn level(&self, rate: u64, burst: u64, now: u64) -> u64 {
        let elapsed = now.saturating_sub(self.last);
        burst
            .saturating_mul(MILLI)
            .min(self.milli.saturating_add(rate.saturating_mul(elapsed)))
    }

    fn refill(&mut self, rate: u64, burst: u64, now: u64) {
        self.milli = self.level(rate, burst, now);
        self.last = self.last.max(now);
    }
}

/// One level of limiting: a bucket per key, bounded; when the table is full, new keys
/// share one overflow bucket.
///
/// A key is kept as its 64-bit keyed hash (8 bytes, not 32 for a `SocketAddr`); two keys
/// that collide share a bucket, which is harmless, and the hash key is random per worker.
#[derive(Debug)]
struct Level<K> {
    rate: u64,
    burst: u64,
    keys: ahash::RandomState,
    buckets: AHashMap<u64, Tokens>,
    overflow: Tokens,
    _key: std::marker::PhantomData<K>,
}

impl<K: Hash + Eq> Level<K> {
    fn new(rate: u32, burst: u32) -> Level<K> {
        let burst = u64::from(burst.max(1));
        Level {
            rate: u64::from(rate),
            burst,
            keys: ahash::RandomState::new(),
            buckets: AHashMap::new(),
            overflow: Tokens::full(burst, 0),
            _key: std::marker::PhantomData,
        }
    }

    fn on(&self) -> bool {
        self.rate > 0
    }

    /// The key's bucket refilled to `now`, created full if there is room.
    fn bucket(&mut self, key: K, max: usize, now: u64) -> &mut Tokens {
        let key = self.keys.hash_one(key);
        let (rate, burst) = (self.rate, self.burst);
        let t = if self.buckets.len() >= max && !self.buckets.contains_key(&key) {
            &mut self.overflow
        } else {
            self.buckets
                .entry(key)
                .or_insert_with(|| Tokens::full(burst, now))
        };
        t.refill(rate, burst, now);
        t
    }

    /// Forgets the keys whose buckets are full again (quiet sources).
    fn sweep(&mut self, now: u64) {
        let (rate, burst) = (self.rate, self.burst);
        self.buckets
            .retain(|_, t| t.level(rate, burst, now) < burst.saturating_mul(MILLI));
        // After a flood the table is mostly empty: give its memory back.
        if self.buckets.capacity() > 1024 && self.buckets.len() < self.buckets.capacity() / 4 {
            let keep = self.buckets.len() * 2;
            self.buckets.shrink_to(keep);
        }
    }
}

/// Token buckets per source IP:port and per source IP; an answer takes a token from
/// both. Each table holds at most `max_sources` entries: when one is full it is swept
/// of idle sources (at most every 10 ms), and sources that still find no room share an
/// overflow bucket, so spoofed floods cost neither memory nor much time.
#[derive(Debug)]
pub(crate) struct Limiter {
    max: usize,
    sources: Level<SocketAddr>,
    ips: Level<IpAddr>,
    last_full_sweep: u64,
}

impl Limiter {
    pub(crate) fn new(cfg: &BindingLimit) -> Limiter {
        Limiter {
            max: cfg.max_sources,
            sources: Level::new(cfg.rate, cfg.burst),
            ips: Level::new(cfg.ip_rate, cfg.ip_burst),
            last_full_sweep: 0,
        }
    }

    /// Whether a request from `src` may be answered at `now` (unix millis); takes its
    /// tokens if so.
    pub(crate) fn allow(&mut self, src: SocketAddr, now: u64) -> bool {
        let (by_src, by_ip) = (self.sources.on(), self.ips.on());
        if !by_src && !by_ip {
            return true;
        }
        let full = self.sources.buckets.len() >= self.max || self.ips.buckets.len() >= self.max;
        if full && now >= self.last_full_sweep.saturating_add(FULL_SWEEP_MS) {
            self.last_full_sweep = now;
            self.sweep(now);
        }
        let max = self.max;
        let s_ok = !by_src || self.sources.bucket(src, max, now).milli >= MILLI;
        let i_ok = !by_ip || self.ips.bucket(src.ip(), max, now).milli >= MILLI;
        if !(s_ok && i_ok) {
            return false;
        }
        if by_src {
            let t = self.sources.bucket(src, max, now);
            t.milli -= MILLI;
        }
        if by_ip {
            let t = self.ips.bucket(src.ip(), max, now);
            t.milli -= MILLI;
        }
        true
    }

    /// Forgets quiet sources.
    pub(crate) fn sweep(&mut self, now: u64) {
        self.sources.sweep(now);
        self.ips.sweep(now);
    }

    /// Sources and IPs tracked.
    #[cfg(test)]
    fn tracked(&self) -> (usize, usize) {
        (self.sources.buckets.len(), self.ips.buckets.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| unreachable!())
    }

    fn limit(rate: u32, burst: u32, ip_rate: u32, ip_burst: u32, max: usize) -> Limiter {
        Limiter::new(&BindingLimit {
            rate,
            burst,
            ip_rate,
            ip_burst,
            max_sources: max,
        })
    }

    fn passed(l: &mut Limiter, src: &str, n: usize, now: u64) -> usize {
        (0..n).filter(|_| l.allow(a(src), now)).count()
    }

    #[test]
    fn per_source_burst_then_rate() {
        let mut l = limit(50, 100, 0, 0, 16);
        assert_eq!(passed(&mut l, "192.0.2.1:1", 300, 0), 100);
        // 50/s: one every 20 ms.
        assert_eq!(passed(&mut l, "192.0.2.1:1", 10, 19), 0);
        assert_eq!(passed(&mut l, "192.0.2.1:1", 10, 20), 1);
        assert_eq!(passed(&mut l, "192.0.2.1:1", 100, 1020), 50);
        // Another port has its own bucket.
        assert_eq!(passed(&mut l, "192.0.2.1:2", 300, 1020), 100);
    }

    #[test]
    fn per_ip_cap_across_ports() {
        let mut l = limit(50, 100, 10, 150, 1024);
        let mut n = 0;
        for port in 1..=100 {
            n += passed(&mut l, &format!("192.0.2.1:{port}"), 10, 0);
        }
        assert_eq!(n, 150);
        assert_eq!(passed(&mut l, "192.0.2.2:1", 10, 0), 10);
        // A denied request takes no token from the other level.
        assert_eq!(passed(&mut l, "192.0.2.1:1", 1, 100), 1);
    }

    #[test]
    fn bounded_table() {
        let mut l = limit(1, 1, 1, 1, 4);
        for i in 0..1000u32 {
            let src = SocketAddr::from(([10, (i >> 8) as u8, i as u8, 1], 1000));
            l.allow(src, 0);
        }
        assert_eq!(l.tracked(), (4, 4));
        // The overflow bucket is shared: it had one token.
        assert!(!l.allow(a("192.0.2.1:1"), 0));
        // Once quiet sources have refilled, they are forgotten and new ones get room.
        assert!(l.allow(a("192.0.2.1:1"), 2_000));
        assert_eq!(l.tracked(), (1, 1));
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let mut l = limit(0, 0, 0, 0, 4);
        assert_eq!(passed(&mut l, "192.0.2.1:1", 1000, 0), 1000);
    }
}
