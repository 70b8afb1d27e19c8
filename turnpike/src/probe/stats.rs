//! What the relayed echo measured: round-trip times, loss and jitter. Pure arithmetic
//! over the per-packet results, so that it is tested without a network.

use std::time::Duration;

/// The summary of an echo run over `sent` packets.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EchoStats {
    /// Packets sent.
    pub sent: usize,
    /// Packets that came back.
    pub received: usize,
    /// Lost packets as a percentage of those sent.
    pub loss_percent: f64,
    /// Median round-trip time, milliseconds (nearest rank).
    pub rtt_p50_ms: Option<f64>,
    /// 99th percentile round-trip time, milliseconds (nearest rank).
    pub rtt_p99_ms: Option<f64>,
    /// Smallest round-trip time, milliseconds.
    pub rtt_min_ms: Option<f64>,
    /// Largest round-trip time, milliseconds.
    pub rtt_max_ms: Option<f64>,
    /// Interarrival jitter as RFC 3550 §6.4.1 estimates it (J += (|D| - J) / 16, with D
    /// the difference between consecutive packets' round-trip times), milliseconds.
    pub jitter_ms: Option<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The nearest-rank percentile `p` (0-100) of `sorted`, which is not empty.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted.get(rank.clamp(1, n) - 1).copied()
}

impl EchoStats {
    /// Summarises per-packet results in sending order: the round-trip time of each
    /// packet that came back, `None` for each lost one.
    pub fn from_rtts(rtts: &[Option<Duration>]) -> EchoStats {
        let got: Vec<f64> = rtts.iter().flatten().map(|d| ms(*d)).collect();
        let mut jitter: Option<f64> = None;
        for pair in got.windows(2) {
            if let [a, b] = pair {
                let d = (b - a).abs();
                let j = jitter.unwrap_or(0.0);
                jitter = Some(j + (d - j) / 16.0);
            }
        }
        let mut sorted = got.clone();
        sorted.sort_by(f64::total_cmp);
        let sent = rtts.len();
        let received = got.len();
        EchoStats {
            sent,
            received,
            loss_percent: if sent == 0 {
                0.0
            } else {
                100.0 * (sent - received) as f64 / sent as f64
            },
            rtt_p50_ms: percentile(&sorted, 50.0),
            rtt_p99_ms: percentile(&sorted, 99.0),
            rtt_min_ms: sorted.first().copied(),
            rtt_max_ms: sorted.last().copied(),
            jitter_ms: jitter,
        }
    }

    /// One line for people: "100/100 back, rtt p50 0.21 ms p99 0.40 ms, loss 0.0 %, jitter 0.02 ms".
    pub fn line(&self) -> String {
        let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2} ms"));
        format!(
            "{}/{} back, rtt p50 {} p99 {}, loss {:.1} %, jitter {}",
            self.received,
            self.sent,
            f(self.rtt_p50_ms),
            f(self.rtt_p99_ms),
            self.loss_percent,
            f(self.jitter_ms),
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn d(ms: u64) -> Option<Duration> {
        Some(Duration::from_millis(ms))
    }

    #[test]
    fn percentiles_loss_and_jitter() {
        // 1..=100 ms, with packets 10 and 20 lost.
        let rtts: Vec<_> = (1..=100)
            .map(|i| if i % 10 == 0 && i <= 20 { None } else { d(i) })
            .collect();
        let s = EchoStats::from_rtts(&rtts);
        assert_eq!((s.sent, s.received), (100, 98));
        assert!((s.loss_percent - 2.0).abs() < 1e-9);
        assert_eq!(s.rtt_min_ms, Some(1.0));
        assert_eq!(s.rtt_max_ms, Some(100.0));
        // 98 values: rank ceil(49) = the 49th smallest, 51 (10 and 20 are missing below it).
        assert_eq!(s.rtt_p50_ms, Some(51.0));
        assert_eq!(s.rtt_p99_ms, Some(100.0));
        assert!(s.jitter_ms.unwrap() > 0.9 && s.jitter_ms.unwrap() < 2.0);
    }

    #[test]
    fn steady_rtt_has_no_jitter_and_nothing_back_has_no_rtt() {
        let s = EchoStats::from_rtts(&[d(5), d(5), d(5)]);
        assert_eq!(s.jitter_ms, Some(0.0));
        assert_eq!(s.rtt_p50_ms, Some(5.0));
        let s = EchoStats::from_rtts(&[None, None]);
        assert_eq!((s.received, s.loss_percent), (0, 100.0));
        assert_eq!((s.rtt_p50_ms, s.jitter_ms), (None, None));
        assert!(s.line().contains("0/2 back"));
        let s = EchoStats::from_rtts(&[d(3)]);
        assert_eq!((s.rtt_p99_ms, s.jitter_ms), (Some(3.0), None));
    }

    #[test]
    fn jitter_follows_rfc3550() {
        // Alternating 10/20 ms: |D| = 10 each time; J converges towards 10 by 1/16 steps.
        let s = EchoStats::from_rtts(&[d(10), d(20)]);
        assert!((s.jitter_ms.unwrap() - 10.0 / 16.0).abs() < 1e-9);
    }
}
