//! Summaries of timed samples.

use std::time::Duration;

/// Timed samples, sorted.
#[derive(Debug, Clone)]
pub(crate) struct Samples(Vec<Duration>);

impl Samples {
    pub(crate) fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Self(samples)
    }

    /// The `q` quantile (0 < q ≤ 1) by nearest rank; zero without samples.
    pub(crate) fn quantile(&self, q: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let rank = (q * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    pub(crate) fn median(&self) -> Duration {
        self.quantile(0.5)
    }

    pub(crate) fn p99(&self) -> Duration {
        self.quantile(0.99)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

/// GiB/s of moving `bytes` in `elapsed`.
pub(crate) fn gib_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / (1u64 << 30) as f64 / elapsed.as_secs_f64().max(1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(v: &[u64]) -> Samples {
        Samples::new(v.iter().map(|&u| Duration::from_micros(u)).collect())
    }

    #[test]
    fn nearest_rank_quantiles() {
        let s = us(&(1..=100).rev().collect::<Vec<_>>());
        assert_eq!(s.median(), Duration::from_micros(50));
        assert_eq!(s.p99(), Duration::from_micros(99));
        assert_eq!(s.quantile(1.0), Duration::from_micros(100));
        assert_eq!(us(&[7]).p99(), Duration::from_micros(7));
        assert_eq!(us(&[]).median(), Duration::ZERO);
    }

    #[test]
    fn throughput() {
        let r = gib_per_s(1 << 30, Duration::from_millis(500));
        assert!((r - 2.0).abs() < 1e-9, "{r}");
    }
}
