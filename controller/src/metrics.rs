//! Prometheus metrics, each emitted from one place, rendered on `/metrics`: on the API
//! listener with a bearer API token (`api::router`), without one on `metrics_listen`
//! (`router`).

use prometheus_client::encoding::text::encode;
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub struct Metrics {
    registry: Registry,
    pub sessions_active: Gauge,
    pub sessions_opened: Counter,
    pub events_ingested: Counter,
    pub event_batches_refused: Counter,
    pub events_quarantined: Counter,
    pub commands_sent: Counter,
    pub enrollments: Counter,
    pub enrollments_refused: Counter,
    /// Restored stores found at the start of sessions, by `kind` (agent_restored,
    /// controller_restored, event_gap).
    pub store_incidents: Family<Vec<(String, String)>, Counter>,
    /// Events a restored agent renumbered above the controller's mark.
    pub events_resequenced: Counter,
    /// Events recorded as a gap (the agent no longer held them).
    pub events_in_gaps: Counter,
    /// Agents in session on this replica whose clock is beyond `clock_skew_tolerance_ms`.
    pub agents_clock_skewed: Gauge,
    /// Times an agent's clock went beyond the tolerance (once per episode per session).
    pub agent_clock_skew_alerts: Counter,
    /// Open operations of the request ledger per lane (`pool`, `target`).
    pub request_ops_open: Family<Lane, Gauge>,
    /// Age of each lane's oldest open operation.
    pub request_ops_oldest_age_seconds: Family<Lane, Gauge<f64, AtomicU64>>,
    /// Operations seen failing since start-up, by `result` (failure, timeout, cancelled).
    pub request_ops_failed: Family<Vec<(String, String)>, Counter>,
    /// Bytes of release artifacts sent to agents (`FetchRelease`).
    pub release_bytes_served: Counter,
    /// Releases stored by `POST /api/v1/releases`.
    pub releases_uploaded: Counter,
    /// Release uploads refused, by the error `code`.
    pub release_uploads_refused: Family<Vec<(String, String)>, Counter>,
    /// The lanes last set, so a lane that emptied is removed rather than left stale.
    lanes_shown: Mutex<BTreeSet<(String, String)>>,
    /// Rollouts per `state` (running, paused, halted, aborted, completed).
    pub rollouts: Family<Vec<(String, String)>, Gauge>,
    /// Sites of each unfinished rollout per `state` (labels `rollout`, `state`).
    pub rollout_sites: Family<Vec<(String, String)>, Gauge>,
    /// The (rollout, state) pairs last set, so a finished rollout's gauges are removed.
    rollout_sites_shown: Mutex<BTreeSet<(String, String)>>,
}

/// The labels of one ledger lane.
pub type Lane = Vec<(String, String)>;

fn lane(pool: &str, target: &str) -> Lane {
    vec![("pool".to_owned(), pool.to_owned()), ("target".to_owned(), target.to_owned())]
}

fn rollout_labels((rollout, state): &(String, String)) -> Vec<(String, String)> {
    vec![("rollout".to_owned(), rollout.clone()), ("state".to_owned(), state.clone())]
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("meridian_controller");
        let m = Metrics {
            sessions_active: Gauge::default(),
            sessions_opened: Counter::default(),
            events_ingested: Counter::default(),
            event_batches_refused: Counter::default(),
            events_quarantined: Counter::default(),
            commands_sent: Counter::default(),
            enrollments: Counter::default(),
            enrollments_refused: Counter::default(),
            store_incidents: Family::default(),
            events_resequenced: Counter::default(),
            events_in_gaps: Counter::default(),
            agents_clock_skewed: Gauge::default(),
            agent_clock_skew_alerts: Counter::default(),
            request_ops_open: Family::default(),
            request_ops_oldest_age_seconds: Family::default(),
            request_ops_failed: Family::default(),
            release_bytes_served: Counter::default(),
            releases_uploaded: Counter::default(),
            release_uploads_refused: Family::default(),
            lanes_shown: Mutex::default(),
            rollouts: Family::default(),
            rollout_sites: Family::default(),
            rollout_sites_shown: Mutex::default(),
            registry: Registry::default(),
        };
        registry.register("sessions_active", "Open agent sessions", m.sessions_active.clone());
        registry.register("sessions_opened", "Agent sessions opened", m.sessions_opened.clone());
        registry.register("events_ingested", "Agent events stored", m.events_ingested.clone());
        registry.register(
            "event_batches_refused",
            "Event batches refused (gaps, malformed)",
            m.event_batches_refused.clone(),
        );
        registry.register(
            "events_quarantined",
            "Malformed events set aside at ingest (acknowledged, kept with the reason)",
            m.events_quarantined.clone(),
        );
        registry.register("commands_sent", "Commands sent to agents", m.commands_sent.clone());
        registry.register("enrollments", "Agents enrolled", m.enrollments.clone());
        registry.register(
            "release_bytes_served",
            "Bytes of release artifacts sent to agents",
            m.release_bytes_served.clone(),
        );
        registry.register(
            "releases_uploaded",
            "Agent releases uploaded and stored",
            m.releases_uploaded.clone(),
        );
        registry.register(
            "release_uploads_refused",
            "Agent release uploads refused, by error code",
            m.release_uploads_refused.clone(),
        );
        registry.register(
            "enrollments_refused",
            "Enrollment attempts refused",
            m.enrollments_refused.clone(),
        );
        registry.register(
            "store_incidents",
            "Restored stores found at the start of agent sessions, by kind",
            m.store_incidents.clone(),
        );
        registry.register(
            "events_resequenced",
            "Events a restored agent renumbered above the controller's acknowledgement",
            m.events_resequenced.clone(),
        );
        registry.register(
            "events_in_gaps",
            "Events recorded as a gap: acknowledged by the controller, never stored",
            m.events_in_gaps.clone(),
        );
        registry.register(
            "agents_clock_skewed",
            "Agents in session whose clock is beyond clock_skew_tolerance_ms of the controller's",
            m.agents_clock_skewed.clone(),
        );
        registry.register(
            "agent_clock_skew_alerts",
            "Times an agent's clock went beyond clock_skew_tolerance_ms (once per episode)",
            m.agent_clock_skew_alerts.clone(),
        );
        registry.register(
            "request_ops_open",
            "Open operations of the distributed-request ledger per pool and target site",
            m.request_ops_open.clone(),
        );
        registry.register(
            "request_ops_oldest_age_seconds",
            "Age of the oldest open ledger operation per pool and target site",
            m.request_ops_oldest_age_seconds.clone(),
        );
        registry.register(
            "request_ops_failed",
            "Ledger operations that ended failed, by result (failure, timeout, cancelled)",
            m.request_ops_failed.clone(),
        );
        registry.register("rollouts", "Agent upgrade rollouts per state", m.rollouts.clone());
        registry.register(
            "rollout_sites",
            "Sites of each unfinished agent upgrade rollout per state",
            m.rollout_sites.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Counts a refused release upload under its error code.
    pub fn release_upload_refused(&self, code: &str) {
        self.release_uploads_refused
            .get_or_create(&vec![("code".to_owned(), code.to_owned())])
            .inc();
    }

    /// Sets the ledger's lane gauges from its backlog; lanes no longer open are removed.
    pub fn set_request_backlog(&self, lanes: &[crate::store::requests::LaneBacklog]) {
        let now: BTreeSet<(String, String)> =
            lanes.iter().map(|l| (l.pool.clone(), l.target_site.clone())).collect();
        for l in lanes {
            let labels = lane(&l.pool, &l.target_site);
            self.request_ops_open
                .get_or_create(&labels)
                .set(i64::try_from(l.open).unwrap_or(i64::MAX));
            self.request_ops_oldest_age_seconds.get_or_create(&labels).set(l.oldest_age_seconds);
        }
        let mut shown = self.lanes_shown.lock().unwrap_or_else(|p| p.into_inner());
        for (pool, target) in shown.difference(&now) {
            let labels = lane(pool, target);
            self.request_ops_open.remove(&labels);
            self.request_ops_oldest_age_seconds.remove(&labels);
        }
        *shown = now;
    }

    /// Counts `n` more operations that ended failed with `result`.
    pub fn count_request_ops_failed(&self, result: &str, n: u64) {
        self.request_ops_failed
            .get_or_create(&vec![("result".to_owned(), result.to_owned())])
            .inc_by(n);
    }

    /// Sets the rollout gauges from a summary; a finished rollout's site gauges are removed.
    pub fn set_rollout_summary(&self, summary: &crate::store::rollouts::RolloutSummary) {
        for (state, n) in &summary.rollouts {
            self.rollouts
                .get_or_create(&vec![("state".to_owned(), state.as_str().to_owned())])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        let mut now = BTreeSet::new();
        for (rollout, state, n) in &summary.sites {
            let key = (rollout.to_string(), state.as_str().to_owned());
            self.rollout_sites
                .get_or_create(&rollout_labels(&key))
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
            now.insert(key);
        }
        // Every state of a shown rollout is set, zeros included, so a site that moved on
        // leaves no stale count behind.
        let rollouts: BTreeSet<&String> = now.iter().map(|(r, _)| r).collect();
        let mut zeros = Vec::new();
        for r in rollouts {
            for state in crate::rollouts::SiteState::ALL {
                let key = (r.clone(), state.as_str().to_owned());
                if !now.contains(&key) {
                    self.rollout_sites.get_or_create(&rollout_labels(&key)).set(0);
                    zeros.push(key);
                }
            }
        }
        now.extend(zeros);
        let mut shown = self.rollout_sites_shown.lock().unwrap_or_else(|p| p.into_inner());
        for key in shown.difference(&now) {
            self.rollout_sites.remove(&rollout_labels(key));
        }
        *shown = now;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The scrape answer.
pub fn scrape(metrics: &Metrics) -> axum::response::Response {
    use axum::response::IntoResponse;
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics.render())
        .into_response()
}

/// `GET /metrics` without authentication, for the listener of its own (`metrics_listen`).
pub fn router(metrics: std::sync::Arc<Metrics>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(move || async move { scrape(&metrics) }))
}
