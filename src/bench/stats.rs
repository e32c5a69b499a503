//! Latency statistics for one benchmark case: throughput and nearest-rank percentiles.
//! Pure arithmetic over recorded round-trip times; nothing here measures or prints.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Summary of one case: every request's latency folded into a few numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests completed (warm-up excluded).
    pub requests: u64,
    /// Wall time from the first client starting to the last one finishing.
    pub elapsed_s: f64,
    /// `requests / elapsed_s`, all clients together.
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub mean_us: f64,
    pub min_us: f64,
    pub max_us: f64,
}

/// The `q`-quantile (0 < q ≤ 1) of sorted values, nearest-rank definition: the smallest value
/// such that at least `q` of all values are ≤ it. `None` for no values.
pub fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    let rank = (q * n as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

impl Stats {
    /// Summarise latencies in nanoseconds (any order; sorted in place) over `elapsed`.
    pub fn from_latencies(latencies_ns: &mut [u64], elapsed: Duration) -> Stats {
        latencies_ns.sort_unstable();
        let us = |ns: Option<u64>| ns.map_or(0.0, |v| v as f64 / 1000.0);
        let n = latencies_ns.len();
        let elapsed_s = elapsed.as_secs_f64();
        let sum: u128 = latencies_ns.iter().map(|&v| u128::from(v)).sum();
        Stats {
            requests: n as u64,
            elapsed_s,
            ops_per_sec: if elapsed_s > 0.0 {
                n as f64 / elapsed_s
            } else {
                0.0
            },
            p50_us: us(percentile(latencies_ns, 0.50)),
            p90_us: us(percentile(latencies_ns, 0.90)),
            p99_us: us(percentile(latencies_ns, 0.99)),
            p999_us: us(percentile(latencies_ns, 0.999)),
            mean_us: if n == 0 {
                0.0
            } else {
                sum as f64 / n as f64 / 1000.0
            },
            min_us: us(latencies_ns.first().copied()),
            max_us: us(latencies_ns.last().copied()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&v, 0.001), Some(1));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile(&[], 0.5), None);
        // Ten values: p50 is the 5th, p99 the 10th.
        let v: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile(&v, 0.5), Some(5));
        assert_eq!(percentile(&v, 0.99), Some(10));
    }

    #[test]
    fn stats_from_unsorted_latencies() {
        let mut v: Vec<u64> = (1..=1000).rev().map(|i| i * 1000).collect();
        let s = Stats::from_latencies(&mut v, Duration::from_millis(500));
        assert_eq!(s.requests, 1000);
        assert!((s.ops_per_sec - 2000.0).abs() < 1e-9);
        assert_eq!(s.p50_us, 500.0);
        assert_eq!(s.p99_us, 990.0);
        assert_eq!(s.p999_us, 999.0);
        assert_eq!(s.min_us, 1.0);
        assert_eq!(s.max_us, 1000.0);
        assert!((s.mean_us - 500.5).abs() < 1e-9);
        let empty = Stats::from_latencies(&mut [], Duration::ZERO);
        assert_eq!(empty.requests, 0);
        assert_eq!(empty.ops_per_sec, 0.0);
    }
}
