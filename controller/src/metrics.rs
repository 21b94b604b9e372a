//! Prometheus metrics, each emitted from one place, rendered on `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
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
            "enrollments_refused",
            "Enrollment attempts refused",
            m.enrollments_refused.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
