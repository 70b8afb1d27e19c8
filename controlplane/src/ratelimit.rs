//! Rate limiting of unauthenticated requests, and sampling of refusal log lines, in bounded
//! memory. Time is passed in; nothing here reads a clock.

use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};

use ahash::AHashMap;

use crate::types::Millis;

/// 8 bytes, as a table of 65,536 of them is what a flood fills: the tokens, and the time
/// of the last refill as the low 32 bits of its milliseconds (a bucket idle for weeks is
/// swept long before they wrap, after 49 days).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f32,
    at: u32,
}

/// The low 32 bits of `now`, as a bucket keeps it.
fn stamp(now: Millis) -> u32 {
    now.0 as u32
}

impl Bucket {
    fn full(burst: f64, now: Millis) -> Bucket {
        Bucket {
            tokens: burst as f32,
            at: stamp(now),
        }
    }

    /// Seconds since the last refill.
    fn idle(&self, now: Millis) -> f64 {
        f64::from(stamp(now).wrapping_sub(self.at)) / 1000.0
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Millis) {
        self.tokens = (f64::from(self.tokens) + self.idle(now) * rate).min(burst) as f32;
        self.at = stamp(now);
    }
}

/// One tier of token buckets keyed by `K`, at most `max` of them. Sources beyond `max`
/// share one overflow bucket (with the same rate and burst) until a sweep frees room, so a
/// flood of spoofed sources cannot grow memory, and admission never scans the table.
///
/// A source is kept as a 64-bit keyed hash of its address, not the address (8 bytes, not
/// 32 for a `SocketAddr`): a full table of 65,536 sources is about 3 MiB, not 6. Two
/// sources whose hashes collide share a bucket, which is harmless; the key is random per
/// process, so nobody can aim for a collision.
#[derive(Debug, Clone)]
struct Tier<K> {
    rate: f64,
    burst: f64,
    max: usize,
    keys: ahash::RandomState,
    buckets: AHashMap<u64, Bucket>,
    overflow: Bucket,
    _key: std::marker::PhantomData<K>,
}

impl<K: Hash + Eq + Copy> Tier<K> {
    fn new(rate: u32, burst: u32, max: usize) -> Tier<K> {
        let burst = f64::from(burst.max(1));
        Tier {
            rate: f64::from(rate),
            burst,
            max,
            keys: ahash::RandomState::new(),
            _key: std::marker::PhantomData,
            buckets: AHashMap::new(),
            overflow: Bucket::full(burst, Millis(0)),
        }
    }

    fn enabled(&self) -> bool {
        self.rate > 0.0
    }

    /// The bucket of `key`, refilled to `now` (created full, or the overflow bucket).
    fn bucket(&mut self, key: K, now: Millis) -> &mut Bucket {
        let key = self.keys.hash_one(key);
        let (rate, burst) = (self.rate, self.burst);
        let full = self.buckets.len() >= self.max;
        let b = if full && !self.buckets.contains_key(&key) {
            &mut self.overflow
        } else {
            self.buckets.entry(key).or_insert(Bucket::full(burst, now))
        };
        b.refill(rate, burst, now);
        b
    }

    /// Drops buckets that have refilled completely: their sources have been quiet for
    /// `burst / rate` seconds, and a new full bucket would behave the same.
    fn sweep(&mut self, now: Millis) {
        let (rate, burst) = (self.rate, self.burst);
        self.buckets
            .retain(|_, b| f64::from(b.tokens) + b.idle(now) * rate < burst);
        // After a flood the table is mostly empty: give its memory back.
        if self.buckets.capacity() > 1024 && self.buckets.len() < self.buckets.capacity() / 4 {
            let keep = self.buckets.len() * 2;
            self.buckets.shrink_to(keep);
        }
    }
}

/// Token buckets for unauthenticated requests on two levels:
///
/// * per client transport address (IP and port, the 5-tuple's client side), the tight
///   limit: one client, one bucket. Spoofed packets starve a victim only if they carry its
///   exact port.
/// * per client IP, a much higher cap: many clients behind one NAT address share it
///   without being throttled, while one host cycling through source ports is still
///   bounded.
///
/// A request is admitted when both buckets have a token, and then takes one from each.
/// Both tables are bounded by `max_sources`; beyond it new sources share an overflow
/// bucket per level until [`RateLimiter::sweep`] (called on a timer) drops idle ones.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    by_addr: Tier<SocketAddr>,
    by_ip: Tier<IpAddr>,
}

impl RateLimiter {
    /// `rate` requests per second per client address with bursts of `burst`, and `ip_rate`
    /// per client IP with bursts of `ip_burst`, tracking at most `max_sources` of each. A
    /// rate of 0 disables that level.
    pub fn new(
        rate: u32,
        burst: u32,
        ip_rate: u32,
        ip_burst: u32,
        max_sources: usize,
    ) -> RateLimiter {
        RateLimiter {
            by_addr: Tier::new(rate, burst, max_sources),
            by_ip: Tier::new(ip_rate, ip_burst, max_sources),
        }
    }

    /// Whether one more unauthenticated request from `client` may be answered now.
    pub fn allow(&mut self, client: SocketAddr, now: Millis) -> bool {
        // Check both before taking from either, so a request refused by one level does
        // not use up the other's tokens.
        let addr_ok = !self.by_addr.enabled() || self.by_addr.bucket(client, now).tokens >= 1.0;
        let ip_ok = !self.by_ip.enabled() || self.by_ip.bucket(client.ip(), now).tokens >= 1.0;
        if !(addr_ok && ip_ok) {
            return false;
        }
        if self.by_addr.enabled() {
            self.by_addr.bucket(client, now).tokens -= 1.0;
        }
        if self.by_ip.enabled() {
            self.by_ip.bucket(client.ip(), now).tokens -= 1.0;
        }
        true
    }

    /// Drops buckets that have refilled (their sources have been quiet). O(tracked): call
    /// it on a timer, not per request.
    pub fn sweep(&mut self, now: Millis) {
        self.by_addr.sweep(now);
        self.by_ip.sweep(now);
    }

    /// Buckets tracked now (both levels).
    pub fn tracked(&self) -> usize {
        self.by_addr.buckets.len() + self.by_ip.buckets.len()
    }
}

/// Samples log lines of one kind so a flood cannot fill the disk: at most `per_sec` lines
/// in each second of `now`; the rest are counted, and the count is handed out by
/// [`LogSampler::take_suppressed`] for one summary line.
#[derive(Debug, Clone)]
pub struct LogSampler {
    per_sec: u32,
    second: u64,
    written: u32,
    suppressed: u64,
}

impl LogSampler {
    /// At most `per_sec` lines per second.
    pub fn new(per_sec: u32) -> LogSampler {
        LogSampler {
            per_sec,
            second: 0,
            written: 0,
            suppressed: 0,
        }
    }

    /// Whether a line may be written at `now`; if not, it is counted as suppressed.
    pub fn admit(&mut self, now: Millis) -> bool {
        if now.secs() != self.second {
            self.second = now.secs();
            self.written = 0;
        }
        if self.written < self.per_sec {
            self.written += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// The number of lines suppressed since the last call, if any.
    pub fn take_suppressed(&mut self) -> Option<u64> {
        (self.suppressed > 0).then(|| std::mem::take(&mut self.suppressed))
    }

    /// Whether suppressed lines wait to be summarized.
    pub fn has_suppressed(&self) -> bool {
        self.suppressed > 0
    }
}
