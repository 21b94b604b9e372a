//! An injectable clock, so business days, nightly jobs and retries are testable without
//! waiting.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// How far an agent's clock may be from the trusted time, in ms, before the agent stops using
/// it and both sides raise an alert (the agent's `clock_tolerance_ms` and the controller's
/// `clock_skew_tolerance_ms` default to it).
pub const DEFAULT_SKEW_TOLERANCE_MS: u64 = 120_000;

/// Whether a measured skew (a clock minus the reference, in ms, either sign) is beyond
/// `tolerance`.
pub fn skew_beyond(skew_ms: i64, tolerance: Duration) -> bool {
    u128::from(skew_ms.unsigned_abs()) > tolerance.as_millis()
}

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock tests set by hand.
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn new(at: DateTime<Utc>) -> Self {
        Self(Mutex::new(at))
    }

    pub fn set(&self, at: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }

    pub fn advance(&self, by: chrono::Duration) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *t += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_beyond_is_symmetric_and_strict() {
        let t = Duration::from_millis(1_000);
        let check = |skew, expected| assert_eq!(skew_beyond(skew, t), expected, "{skew}");
        check(0, false);
        check(1_000, false);
        check(-1_000, false);
        check(1_001, true);
        check(-1_001, true);
        check(i64::MIN, true);
        check(i64::MAX, true);
    }
}
