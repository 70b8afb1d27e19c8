//! What a flood can make either plane do, bounded: one token bucket, one two-level limiter
//! over bounded tables (per source IP and port, and per source IP), and one sampler of
//! refusal log lines. The control plane limits its unauthenticated answers with them, the
//! data plane its Binding answers. Sans-IO: time comes in as [`Millis`].

use std::hash::Hash;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};

use ahash::AHashMap;

use crate::Millis;

/// Milli-tokens per token: refills are exact at millisecond steps.
const MILLI: u64 = 1000;
/// The largest burst a bucket holds: its milli-tokens fit 32 bits.
const MAX_BURST: u32 = u32::MAX / MILLI as u32;
/// Past this many milliseconds since a bucket's refill, `now` is taken to be behind it (a
/// stamp is the low 32 bits of a time): the bucket gains nothing rather than a refill of
/// days. Sweeps drop quiet buckets long before.
const MAX_GAP_MS: u32 = i32::MAX as u32;

/// A rate in tokens per second with a burst (at least 1, at most about 4 million).
/// A rate of 0 turns a level of [`TwoLevelLimiter`] off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    per_sec: u32,
    burst: u32,
}

impl Rate {
    /// `per_sec` tokens a second, holding at most `burst`.
    pub fn new(per_sec: u32, burst: u32) -> Rate {
        Rate {
            per_sec,
            burst: burst.clamp(1, MAX_BURST),
        }
    }

    /// Tokens a second.
    pub fn per_sec(self) -> u32 {
        self.per_sec
    }

    /// The burst, in tokens.
    pub fn burst(self) -> u32 {
        self.burst
    }

    fn full_milli(self) -> u64 {
        u64::from(self.burst) * MILLI
    }
}

/// A token bucket in 8 bytes, as a table of tens of thousands of them is what a flood
/// fills: milli-tokens, and the low 32 bits of the millisecond of its last refill. Its
/// [`Rate`] is the table's, passed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    milli: u32,
    at: u32,
}

/// The low 32 bits of `now`, as a bucket keeps it.
fn stamp(now: Millis) -> u32 {
    now.0 as u32
}

impl TokenBucket {
    /// A bucket holding its whole burst at `now`.
    pub fn full(rate: Rate, now: Millis) -> TokenBucket {
        TokenBucket {
            // At most MAX_BURST * MILLI, which fits.
            milli: rate.full_milli() as u32,
            at: stamp(now),
        }
    }

    /// Milliseconds since the last refill; 0 when `now` is behind it.
    fn elapsed(&self, now: Millis) -> u32 {
        let d = stamp(now).wrapping_sub(self.at);
        if d > MAX_GAP_MS { 0 } else { d }
    }

    /// The milli-tokens held at `now`.
    fn level(&self, rate: Rate, now: Millis) -> u64 {
        let gained = u64::from(rate.per_sec) * u64::from(self.elapsed(now));
        rate.full_milli()
            .min(u64::from(self.milli).saturating_add(gained))
    }

    /// Brings the bucket to `now`; a `now` behind its last refill changes nothing.
    pub fn refill(&mut self, rate: Rate, now: Millis) {
        if self.elapsed(now) > 0 {
            // At most the burst, which fits.
            self.milli = self.level(rate, now) as u32;
            self.at = stamp(now);
        }
    }

    /// Whether the bucket holds a whole token (refill it first).
    pub fn has_token(&self) -> bool {
        u64::from(self.milli) >= MILLI
    }

    /// Takes a token if there is one (refill it first).
    pub fn take(&mut self) -> bool {
        let ok = self.has_token();
        if ok {
            self.milli -= MILLI as u32;
        }
        ok
    }

    /// Whether the bucket would be full at `now`: its source has been quiet long enough
    /// that a new bucket behaves the same.
    pub fn is_full(&self, rate: Rate, now: Millis) -> bool {
        self.level(rate, now) >= rate.full_milli()
    }
}

/// One level of limiting: a bucket per key, at most `max` of them; keys beyond share one
/// overflow bucket (with the same rate), so a flood of spoofed sources cannot grow memory,
/// and admission never scans the table.
///
/// A key is kept as its 64-bit keyed hash (8 bytes, not 32 for a `SocketAddr`): a full
/// table of 65,536 is about 3 MiB. Two keys that collide share a bucket, which is
/// harmless; the hash key is random per table, so nobody can aim for a collision.
#[derive(Debug, Clone)]
struct Level<K> {
    rate: Rate,
    keys: ahash::RandomState,
    buckets: AHashMap<u64, TokenBucket>,
    overflow: TokenBucket,
    _key: PhantomData<fn(K)>,
}

impl<K: Hash> Level<K> {
    fn new(rate: Rate) -> Level<K> {
        Level {
            rate,
            keys: ahash::RandomState::new(),
            buckets: AHashMap::new(),
            overflow: TokenBucket::full(rate, Millis(0)),
            _key: PhantomData,
        }
    }

    fn on(&self) -> bool {
        self.rate.per_sec > 0
    }

    /// The key's bucket refilled to `now`, created full if there is room, else the
    /// overflow bucket.
    fn bucket(&mut self, key: K, max: usize, now: Millis) -> &mut TokenBucket {
        let key = self.keys.hash_one(key);
        let rate = self.rate;
        let b = if self.buckets.len() >= max && !self.buckets.contains_key(&key) {
            &mut self.overflow
        } else {
            self.buckets
                .entry(key)
                .or_insert_with(|| TokenBucket::full(rate, now))
        };
        b.refill(rate, now);
        b
    }

    /// Forgets the keys whose buckets are full again (quiet sources).
    fn sweep(&mut self, now: Millis) {
        let rate = self.rate;
        self.buckets.retain(|_, b| !b.is_full(rate, now));
        // After a flood the table is mostly empty: give its memory back.
        if self.buckets.capacity() > 1024 && self.buckets.len() < self.buckets.capacity() / 4 {
            let keep = self.buckets.len() * 2;
            self.buckets.shrink_to(keep);
        }
    }
}

/// The settings of a [`TwoLevelLimiter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Per source IP and port; a rate of 0 turns this level off.
    pub source: Rate,
    /// Per source IP, all its ports together; a rate of 0 turns this level off.
    pub ip: Rate,
    /// Sources, and separately IPs, tracked at most.
    pub max_sources: usize,
    /// When a table is full, [`TwoLevelLimiter::allow`] sweeps it of quiet sources, at
    /// most this often (milliseconds; a sweep walks the table), before new sources fall
    /// into the overflow bucket. `None`: only [`TwoLevelLimiter::sweep`] frees room.
    pub sweep_when_full: Option<u64>,
}

/// Token buckets per source IP:port and per source IP:
///
/// * per source (IP and port), the tight limit: one client, one bucket. Spoofed packets
///   starve a victim only if they carry its exact port.
/// * per IP, a much higher cap: many clients behind one NAT address share it without
///   being throttled, while one host cycling through source ports is still bounded.
///
/// A request is admitted when both buckets have a token, and then takes one from each (a
/// request refused by one level uses up nothing of the other). Each table holds at most
/// [`Limits::max_sources`] entries; beyond, new sources share an overflow bucket per level
/// until a sweep drops quiet ones. Call [`TwoLevelLimiter::sweep`] on a timer.
#[derive(Debug, Clone)]
pub struct TwoLevelLimiter {
    max: usize,
    sources: Level<SocketAddr>,
    ips: Level<IpAddr>,
    sweep_when_full: Option<u64>,
    last_full_sweep: Millis,
}

impl TwoLevelLimiter {
    /// A limiter tracking nothing yet.
    pub fn new(limits: Limits) -> TwoLevelLimiter {
        TwoLevelLimiter {
            max: limits.max_sources,
            sources: Level::new(limits.source),
            ips: Level::new(limits.ip),
            sweep_when_full: limits.sweep_when_full,
            last_full_sweep: Millis(0),
        }
    }

    /// Whether one more request from `src` may be answered at `now`; takes its tokens if
    /// so.
    pub fn allow(&mut self, src: SocketAddr, now: Millis) -> bool {
        let (by_src, by_ip) = (self.sources.on(), self.ips.on());
        if !by_src && !by_ip {
            return true;
        }
        if let Some(every) = self.sweep_when_full {
            let full = self.sources.buckets.len() >= self.max || self.ips.buckets.len() >= self.max;
            if full && now >= self.last_full_sweep.plus_ms(every) {
                self.last_full_sweep = now;
                self.sweep(now);
            }
        }
        let max = self.max;
        // Check both before taking from either.
        let s_ok = !by_src || self.sources.bucket(src, max, now).has_token();
        let i_ok = !by_ip || self.ips.bucket(src.ip(), max, now).has_token();
        if !(s_ok && i_ok) {
            return false;
        }
        if by_src {
            self.sources.bucket(src, max, now).take();
        }
        if by_ip {
            self.ips.bucket(src.ip(), max, now).take();
        }
        true
    }

    /// Forgets quiet sources (their buckets have refilled). O(tracked): call it on a
    /// timer, not per request.
    pub fn sweep(&mut self, now: Millis) {
        self.sources.sweep(now);
        self.ips.sweep(now);
    }

    /// Sources and IPs tracked now.
    pub fn tracked(&self) -> (usize, usize) {
        (self.sources.buckets.len(), self.ips.buckets.len())
    }
}

/// Samples log lines of one kind so that a flood cannot flood the log: at most `lines`
/// lines in a window of `window_ms`, the window opening at the first line after the last
/// one closed (so any span of that length holds at most `lines` of them); the rest are
/// counted. The count goes out either in the next line written
/// ([`RefusalLog::admit_counting`]) or in a summary line
/// ([`RefusalLog::take_suppressed`]), as the caller prefers.
#[derive(Debug, Clone)]
pub struct RefusalLog {
    lines: u32,
    window_ms: u64,
    opened: Option<Millis>,
    written: u32,
    suppressed: u64,
}

impl RefusalLog {
    /// At most `lines_per_sec` lines a second.
    pub fn new(lines_per_sec: u32) -> RefusalLog {
        RefusalLog::with_window(lines_per_sec, 1000)
    }

    /// At most `lines` lines in `window_ms` milliseconds.
    pub fn with_window(lines: u32, window_ms: u64) -> RefusalLog {
        RefusalLog {
            lines,
            window_ms,
            opened: None,
            written: 0,
            suppressed: 0,
        }
    }

    /// Whether a line may be written at `now`; if not, it is counted as suppressed.
    pub fn admit(&mut self, now: Millis) -> bool {
        let open = self
            .opened
            .is_some_and(|t| now.0.saturating_sub(t.0) < self.window_ms);
        if !open {
            self.opened = Some(now);
            self.written = 0;
        }
        if self.written < self.lines {
            self.written += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// As [`RefusalLog::admit`]; when admitted, with how many lines were suppressed since
    /// the count was last taken, for the line to say.
    pub fn admit_counting(&mut self, now: Millis) -> Option<u64> {
        self.admit(now)
            .then(|| std::mem::take(&mut self.suppressed))
    }

    /// The number of lines suppressed since the count was last taken, if any.
    pub fn take_suppressed(&mut self) -> Option<u64> {
        (self.suppressed > 0).then(|| std::mem::take(&mut self.suppressed))
    }

    /// Whether suppressed lines wait to be summarized.
    pub fn has_suppressed(&self) -> bool {
        self.suppressed > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| unreachable!())
    }

    fn limit(rate: u32, burst: u32, ip_rate: u32, ip_burst: u32, max: usize) -> TwoLevelLimiter {
        TwoLevelLimiter::new(Limits {
            source: Rate::new(rate, burst),
            ip: Rate::new(ip_rate, ip_burst),
            max_sources: max,
            sweep_when_full: Some(10),
        })
    }

    fn passed(l: &mut TwoLevelLimiter, src: &str, n: usize, now: u64) -> usize {
        (0..n).filter(|_| l.allow(a(src), Millis(now))).count()
    }

    #[test]
    fn a_bucket_is_eight_bytes() {
        assert_eq!(std::mem::size_of::<TokenBucket>(), 8);
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
    fn bounded_table_swept_when_full() {
        let mut l = limit(1, 1, 1, 1, 4);
        for i in 0..1000u32 {
            let src = SocketAddr::from(([10, (i >> 8) as u8, i as u8, 1], 1000));
            l.allow(src, Millis(0));
        }
        assert_eq!(l.tracked(), (4, 4));
        // The overflow bucket is shared: it had one token.
        assert!(!l.allow(a("192.0.2.1:1"), Millis(0)));
        // Once quiet sources have refilled, they are forgotten and new ones get room.
        assert!(l.allow(a("192.0.2.1:1"), Millis(2_000)));
        assert_eq!(l.tracked(), (1, 1));
    }

    #[test]
    fn bounded_table_without_sweep_when_full_waits_for_the_sweep() {
        let mut l = TwoLevelLimiter::new(Limits {
            source: Rate::new(1, 1),
            ip: Rate::new(1, 1),
            max_sources: 4,
            sweep_when_full: None,
        });
        for i in 0..1000u32 {
            let src = SocketAddr::from(([10, (i >> 8) as u8, i as u8, 1], 1000));
            l.allow(src, Millis(0));
        }
        assert_eq!(l.tracked(), (4, 4));
        // Full: a new source takes the overflow bucket (refilled by now) ...
        assert!(l.allow(a("192.0.2.1:1"), Millis(2_000)));
        assert!(!l.allow(a("192.0.2.2:1"), Millis(2_000)));
        assert_eq!(l.tracked(), (4, 4));
        // ... until the sweep drops the quiet ones.
        l.sweep(Millis(2_000));
        assert_eq!(l.tracked(), (0, 0));
        assert!(l.allow(a("192.0.2.2:1"), Millis(2_000)));
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let mut l = limit(0, 0, 0, 0, 4);
        assert_eq!(passed(&mut l, "192.0.2.1:1", 1000, 0), 1000);
        assert_eq!(l.tracked(), (0, 0));
    }

    #[test]
    fn a_clock_behind_the_bucket_refills_nothing() {
        let mut l = limit(10, 1, 0, 0, 16);
        assert_eq!(passed(&mut l, "192.0.2.1:1", 5, 1_000_000), 1);
        assert_eq!(passed(&mut l, "192.0.2.1:1", 5, 1_000), 0);
        // Forward again: 100 ms is one token at 10/s.
        assert_eq!(passed(&mut l, "192.0.2.1:1", 5, 1_000_100), 1);
    }

    #[test]
    fn a_full_table_shrinks_after_a_flood() {
        let mut l = limit(1, 1, 0, 0, 100_000);
        for i in 0..20_000u32 {
            let src = SocketAddr::from(([10, (i >> 8) as u8, i as u8, 1], 1000));
            l.allow(src, Millis(0));
        }
        let before = l.sources.buckets.capacity();
        l.sweep(Millis(5_000));
        assert_eq!(l.tracked(), (0, 0));
        assert!(l.sources.buckets.capacity() < before);
    }

    #[test]
    fn refusal_log_admits_a_few_lines_per_second_and_counts_the_rest() {
        let mut s = RefusalLog::new(3);
        let t = Millis(1_000_000);
        let admitted = (0..10).filter(|_| s.admit(t)).count();
        assert_eq!(admitted, 3);
        assert!(s.has_suppressed());
        assert_eq!(s.take_suppressed(), Some(7));
        assert_eq!(s.take_suppressed(), None);
        // Later in the same second: still suppressed.
        assert!(!s.admit(t.plus_ms(999)));
        // The next second opens a new allowance.
        let admitted = (0..10).filter(|_| s.admit(t.plus_ms(1000))).count();
        assert_eq!(admitted, 3);
        assert_eq!(s.take_suppressed(), Some(8));
    }

    #[test]
    fn refusal_log_window_opens_at_a_line_not_at_a_round_second() {
        let mut s = RefusalLog::new(1);
        assert!(s.admit(Millis(1_999)));
        // A round second later by the clock, but 1 ms after the line.
        assert!(!s.admit(Millis(2_000)));
        assert!(s.admit(Millis(2_999)));
    }

    #[test]
    fn refusal_log_carries_the_count_in_the_next_line() {
        let mut s = RefusalLog::with_window(1, 5_000);
        assert_eq!(s.admit_counting(Millis(0)), Some(0));
        assert_eq!(s.admit_counting(Millis(1)), None);
        assert_eq!(s.admit_counting(Millis(4_999)), None);
        assert_eq!(s.admit_counting(Millis(5_000)), Some(2));
        assert_eq!(s.admit_counting(Millis(5_001)), None);
        assert_eq!(s.take_suppressed(), Some(1));
    }
}
