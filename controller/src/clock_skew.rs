//! Agents' clocks as the controller sees them: every Hello and Status carries the agent's
//! system time, the gateway measures the skew against its own clock (stored as the agent's
//! `clock_skew_ms`) and a session's `SkewWatch` raises an alert when it passes
//! `clock_skew_tolerance_ms`: one WARN line per episode, the `agents_clock_skewed` gauge and
//! the `agent_clock_skew_alerts` counter. `GET /api/v1/agents` and the console's fleet view
//! show `clock_alert` from the stored skew (`alert`).
//!
//! **Invariant:** `agents_clock_skewed` counts exactly the sessions of this replica whose last
//! measured skew is beyond the tolerance (a watch that ends in alert takes itself off).

use std::sync::Arc;
use std::time::Duration;

use meridian_shared::AgentId;
use meridian_shared::clock::skew_beyond;

use crate::metrics::Metrics;

/// Whether a stored skew is beyond the tolerance (what the API and the console show).
pub fn alert(clock_skew_ms: i64, tolerance: Duration) -> bool {
    skew_beyond(clock_skew_ms, tolerance)
}

/// One session's view of its agent's clock.
pub struct SkewWatch {
    metrics: Arc<Metrics>,
    tolerance: Duration,
    agent: AgentId,
    site: String,
    skewed: bool,
}

impl SkewWatch {
    pub fn new(metrics: Arc<Metrics>, tolerance: Duration, agent: AgentId, site: &str) -> Self {
        SkewWatch { metrics, tolerance, agent, site: site.to_owned(), skewed: false }
    }

    /// Judges one measured skew (agent minus controller, ms); logs, counts and sets the gauge
    /// when it passes the tolerance or comes back within it.
    pub fn observe(&mut self, skew_ms: i64) {
        let beyond = skew_beyond(skew_ms, self.tolerance);
        if beyond == self.skewed {
            return;
        }
        self.skewed = beyond;
        let tolerance_ms = u64::try_from(self.tolerance.as_millis()).unwrap_or(u64::MAX);
        if beyond {
            self.metrics.agents_clock_skewed.inc();
            self.metrics.agent_clock_skew_alerts.inc();
            tracing::warn!(
                agent = %self.agent,
                site = %self.site,
                skew_ms,
                tolerance_ms,
                "agent clock beyond the tolerance of the controller's clock"
            );
        } else {
            self.metrics.agents_clock_skewed.dec();
            tracing::info!(
                agent = %self.agent,
                site = %self.site,
                skew_ms,
                tolerance_ms,
                "agent clock within the tolerance of the controller's clock again"
            );
        }
    }

    pub fn skewed(&self) -> bool {
        self.skewed
    }
}

impl Drop for SkewWatch {
    fn drop(&mut self) {
        if self.skewed {
            self.metrics.agents_clock_skewed.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge_and_alerts(m: &Metrics) -> (i64, u64) {
        (m.agents_clock_skewed.get(), m.agent_clock_skew_alerts.get())
    }

    #[test]
    fn a_watch_counts_each_episode_once_and_leaves_the_gauge_when_dropped() {
        let metrics = Arc::new(Metrics::default());
        let tolerance = Duration::from_secs(120);
        let mut a = SkewWatch::new(metrics.clone(), tolerance, AgentId::new(), "SFO");
        let mut b = SkewWatch::new(metrics.clone(), tolerance, AgentId::new(), "CHI");
        let steps: [(i64, bool, (i64, u64)); 6] = [
            (-120_000, false, (0, 0)),
            (86_400_000, true, (1, 1)),
            (86_400_500, true, (1, 1)),
            (-7_200_000, true, (1, 1)),
            (300, false, (0, 1)),
            (120_001, true, (1, 2)),
        ];
        for (skew, skewed, want) in steps {
            a.observe(skew);
            assert_eq!((a.skewed(), gauge_and_alerts(&metrics)), (skewed, want), "{skew}");
        }
        b.observe(-200_000);
        assert_eq!(gauge_and_alerts(&metrics), (2, 3));
        drop(a);
        assert_eq!(gauge_and_alerts(&metrics), (1, 3));
        b.observe(0);
        drop(b);
        assert_eq!(gauge_and_alerts(&metrics), (0, 3));
        let text = metrics.render();
        assert!(text.contains("meridian_controller_agents_clock_skewed 0"), "{text}");
        assert!(text.contains("meridian_controller_agent_clock_skew_alerts_total 3"), "{text}");
    }

    #[test]
    fn alert_follows_the_tolerance() {
        let t = Duration::from_millis(120_000);
        assert!(!alert(0, t) && !alert(-120_000, t) && !alert(120_000, t));
        assert!(alert(120_001, t) && alert(-86_400_000, t));
    }
}
