//! Reconnect backoff: exponential with full jitter, capped (the "Full Jitter" scheme), so a
//! fleet that lost its controller does not reconnect in lock-step.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self { base: Duration::from_millis(200), cap: Duration::from_secs(30) }
    }
}

impl BackoffPolicy {
    /// The ceiling for attempt `n` (0-based): `min(cap, base * 2^n)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A delay drawn uniformly from `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt).as_millis() as u64;
        Duration::from_millis(rng.random_range(0..=ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    #[test]
    fn ceiling_doubles_then_caps() {
        let p = BackoffPolicy { base: Duration::from_millis(100), cap: Duration::from_secs(5) };
        let got: Vec<u64> = (0..10).map(|n| p.ceiling(n).as_millis() as u64).collect();
        assert_eq!(got, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]);
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(5));
    }

    proptest! {
        #[test]
        fn delay_stays_within_ceiling(attempt in 0u32..100, seed in any::<u64>()) {
            let p = BackoffPolicy::default();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let d = p.delay(attempt, &mut rng);
            prop_assert!(d <= p.ceiling(attempt));
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let p = BackoffPolicy::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let delays: std::collections::BTreeSet<_> = (0..50).map(|_| p.delay(6, &mut rng)).collect();
        assert!(delays.len() > 40, "full jitter should rarely repeat: {}", delays.len());
    }
}
