//! Per-source-address rate limiting of unauthenticated requests, in bounded memory.

use std::net::IpAddr;

use ahash::AHashMap;

use crate::types::Millis;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Millis,
}

/// A token bucket per source IP. The table is bounded: when full, buckets that have
/// refilled completely (idle sources) are dropped; if none has, new sources share one
/// overflow bucket, so a flood of spoofed sources cannot grow memory.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    max_sources: usize,
    buckets: AHashMap<IpAddr, Bucket>,
    overflow: Bucket,
}

impl RateLimiter {
    /// `rate` requests per second per source with bursts of `burst`, tracking at most
    /// `max_sources` sources. A rate of 0 disables limiting.
    pub fn new(rate: u32, burst: u32, max_sources: usize) -> RateLimiter {
        RateLimiter {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            max_sources,
            buckets: AHashMap::new(),
            overflow: Bucket {
                tokens: f64::from(burst.max(1)),
                at: Millis(0),
            },
        }
    }

    fn take(rate: f64, burst: f64, b: &mut Bucket, now: Millis) -> bool {
        let dt = now.0.saturating_sub(b.at.0) as f64 / 1000.0;
        b.tokens = (b.tokens + dt * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether one more unauthenticated request from `ip` may be answered now.
    pub fn allow(&mut self, ip: IpAddr, now: Millis) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let (rate, burst) = (self.rate, self.burst);
        if let Some(b) = self.buckets.get_mut(&ip) {
            return Self::take(rate, burst, b, now);
        }
        if self.buckets.len() >= self.max_sources {
            self.sweep(now);
        }
        if self.buckets.len() >= self.max_sources {
            return Self::take(rate, burst, &mut self.overflow, now);
        }
        let mut b = Bucket {
            tokens: burst,
            at: now,
        };
        let ok = Self::take(rate, burst, &mut b, now);
        self.buckets.insert(ip, b);
        ok
    }

    /// Drops buckets that have refilled (their sources have been quiet).
    pub fn sweep(&mut self, now: Millis) {
        let (rate, burst) = (self.rate, self.burst);
        self.buckets.retain(|_, b| {
            let dt = now.0.saturating_sub(b.at.0) as f64 / 1000.0;
            b.tokens + dt * rate < burst
        });
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}
