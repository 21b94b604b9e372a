//! The agent's Prometheus metrics, rendered on `/metrics` of the `metrics_listen` listener (off
//! by default; unauthenticated, so bind it to loopback or a management network, never to the
//! branch LAN).
//!
//! Counters are counted where their event happens: store failures in the store thread
//! (`Db::failures`), reconnects and rejected commands in the link. Gauges are read at scrape
//! time: the outbox cursors, the oldest unacknowledged event, the webhook cursors and the free
//! space of the data dir's filesystem in one store read job (so neither SQLite nor `statvfs`
//! runs on an async worker), the link state and the store health from memory. The clock skew
//! gauge is set by whoever measures it (`set_clock_skew_ms`) and absent until then.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use rusqlite::OptionalExtension;

use crate::Context;
use crate::error::Result;
use crate::store::queries;

/// Labels of a metric family (`webhook`).
type Labels = Vec<(String, String)>;

/// The OpenMetrics text format `prometheus-client` writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub struct Metrics {
    registry: Registry,
    /// One scrape at a time (a scrape sets the gauges, then renders them).
    scrape: tokio::sync::Mutex<()>,
    data_dir: PathBuf,
    outbox_backlog: Gauge,
    outbox_oldest_unacked_age_seconds: Gauge<f64, AtomicU64>,
    outbox_acked_seq: Gauge,
    outbox_high_water: Gauge,
    store_unhealthy: Gauge,
    data_dir_free_bytes: Gauge,
    link_connected: Gauge,
    webhook_backlog: Family<Labels, Gauge>,
    clock_skew_ms: ClockSkew,
    /// Times the link to the controller went down (or could not be opened) and was retried.
    pub link_reconnects: Counter,
    /// Commands from the controller the agent rejected (recorded and acknowledged with the
    /// error).
    pub commands_rejected: Counter,
}

impl Metrics {
    /// Metrics of the agent whose data dir is `data_dir`, counting `store_failures` (the
    /// store's `Db::failures`).
    pub fn new(data_dir: PathBuf, store_failures: Counter) -> Metrics {
        let mut registry = Registry::with_prefix("meridian_agent");
        let m = Metrics {
            registry: Registry::default(),
            scrape: tokio::sync::Mutex::new(()),
            data_dir,
            outbox_backlog: Gauge::default(),
            outbox_oldest_unacked_age_seconds: Gauge::default(),
            outbox_acked_seq: Gauge::default(),
            outbox_high_water: Gauge::default(),
            store_unhealthy: Gauge::default(),
            data_dir_free_bytes: Gauge::default(),
            link_connected: Gauge::default(),
            webhook_backlog: Family::default(),
            clock_skew_ms: ClockSkew::default(),
            link_reconnects: Counter::default(),
            commands_rejected: Counter::default(),
        };
        registry.register(
            "outbox_backlog",
            "Events committed at the branch and not yet acknowledged by the controller",
            m.outbox_backlog.clone(),
        );
        registry.register(
            "outbox_oldest_unacked_age_seconds",
            "Age of the oldest event not yet acknowledged by the controller (0 when none)",
            m.outbox_oldest_unacked_age_seconds.clone(),
        );
        registry.register(
            "outbox_acked_seq",
            "Last event sequence the controller acknowledged",
            m.outbox_acked_seq.clone(),
        );
        registry.register(
            "outbox_high_water",
            "Last event sequence committed at the branch",
            m.outbox_high_water.clone(),
        );
        registry.register(
            "store_errors",
            "Store-level failures (disk full, I/O error, corruption): batches not recorded",
            store_failures,
        );
        registry.register(
            "store_unhealthy",
            "1 while the last store-level failure has not been followed by a committed change",
            m.store_unhealthy.clone(),
        );
        registry.register(
            "data_dir_free_bytes",
            "Bytes available to the agent on the filesystem of its data dir",
            m.data_dir_free_bytes.clone(),
        );
        registry.register_collector(Box::new(m.clock_skew_ms.clone()));
        registry.register(
            "link_connected",
            "1 while the session with the controller is established",
            m.link_connected.clone(),
        );
        registry.register(
            "link_reconnects",
            "Times the link to the controller went down or could not be opened, and was retried",
            m.link_reconnects.clone(),
        );
        registry.register(
            "commands_rejected",
            "Commands from the controller the agent rejected (acknowledged with their error)",
            m.commands_rejected.clone(),
        );
        registry.register(
            "webhook_backlog",
            "Events after each configured webhook's delivery cursor",
            m.webhook_backlog.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Sets the clock skew gauge (agent minus controller, ms).
    pub fn set_clock_skew_ms(&self, skew_ms: i64) {
        *self.clock_skew_ms.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(skew_ms);
    }

    /// Reads the gauges (one store job), then renders every metric. A failed store read is
    /// logged and the store gauges keep their previous values (`store_unhealthy` tells).
    pub async fn render(&self, ctx: &Context) -> String {
        let _one_at_a_time = self.scrape.lock().await;
        let dir = self.data_dir.clone();
        let now_ms = ctx.clock.now().timestamp_millis();
        match ctx.db.read(move |c| read_gauges(c, &dir)).await {
            Ok(g) => {
                self.outbox_backlog.set(int(g.high_water.saturating_sub(g.acked)));
                self.outbox_acked_seq.set(int(g.acked));
                self.outbox_high_water.set(int(g.high_water));
                let age_ms = g.oldest_unacked_ms.map_or(0, |at| now_ms.saturating_sub(at).max(0));
                self.outbox_oldest_unacked_age_seconds.set(age_ms as f64 / 1000.0);
                match g.free_bytes {
                    Ok(bytes) => {
                        self.data_dir_free_bytes.set(int(bytes));
                    }
                    Err(e) => {
                        tracing::warn!(dir = %self.data_dir.display(), error = %e, "cannot read the free space of the data dir");
                    }
                }
                let configured: Vec<String> = ctx
                    .config
                    .borrow()
                    .as_ref()
                    .map(|c| c.webhooks.iter().map(|w| w.code.to_string()).collect())
                    .unwrap_or_default();
                self.webhook_backlog.clear();
                for code in configured {
                    let cursor = g.webhook_cursors.iter().find(|(c, _)| *c == code);
                    // A webhook without a cursor starts at the high water on its first round.
                    let backlog = cursor.map_or(0, |(_, seq)| g.high_water.saturating_sub(*seq));
                    self.webhook_backlog
                        .get_or_create(&vec![("webhook".to_owned(), code)])
                        .set(int(backlog));
                }
            }
            Err(e) => tracing::warn!(error = %e, "metrics: cannot read the store"),
        }
        self.store_unhealthy.set(i64::from(ctx.db.health().is_some()));
        self.link_connected.set(i64::from(ctx.link.borrow().connected));
        let clock = ctx.clock_health();
        if clock.reference.is_some() {
            self.set_clock_skew_ms(clock.skew_ms);
        }
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode the metrics");
            out.clear();
        }
        out
    }
}

/// `GET /metrics`.
pub fn router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(ctx)
}

async fn scrape(State(ctx): State<Arc<Context>>) -> Response {
    let body = ctx.metrics.render(&ctx).await;
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

/// `clock_skew_ms`, rendered only once set: a gauge reading 0 before anything was measured
/// would claim the clocks agree.
#[derive(Debug, Clone, Default)]
struct ClockSkew(Arc<Mutex<Option<i64>>>);

impl Collector for ClockSkew {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let Some(skew) = *self.0.lock().unwrap_or_else(|p| p.into_inner()) else { return Ok(()) };
        let gauge = ConstGauge::new(skew);
        let metric = encoder.encode_descriptor(
            "clock_skew_ms",
            "Agent clock minus controller clock in milliseconds, once measured",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

/// What a scrape reads in the store job.
struct Gauges {
    high_water: u64,
    acked: u64,
    /// When the first unacknowledged event happened (agent clock, ms).
    oldest_unacked_ms: Option<i64>,
    webhook_cursors: Vec<(String, u64)>,
    free_bytes: std::result::Result<u64, nix::Error>,
}

fn read_gauges(c: &rusqlite::Connection, dir: &std::path::Path) -> Result<Gauges> {
    let (high_water, acked) = queries::outbox_state(c)?;
    let oldest_unacked_ms = c
        .prepare_cached("SELECT occurred_at_ms FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT 1")?
        .query_row([acked as i64], |r| r.get(0))
        .optional()?;
    let webhook_cursors = c
        .prepare_cached("SELECT code, seq FROM webhook_cursors")?
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    // On the store thread too: a slow or hung filesystem must not block an async worker.
    let free_bytes = nix::sys::statvfs::statvfs(dir).map(|s| available_bytes(&s));
    Ok(Gauges { high_water, acked, oldest_unacked_ms, webhook_cursors, free_bytes })
}

/// Blocks available to unprivileged users times the fragment size (what `df` shows as free).
#[allow(
    clippy::useless_conversion,
    reason = "the field types are u64 on 64-bit Linux but 32 bits on some other targets"
)]
fn available_bytes(s: &nix::sys::statvfs::Statvfs) -> u64 {
    u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size()))
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_skew_is_absent_until_measured() {
        let m = Metrics::new(std::env::temp_dir(), Counter::default());
        let render = |m: &Metrics| {
            let mut out = String::new();
            encode(&mut out, &m.registry).expect("encode");
            out
        };
        let before = render(&m);
        assert!(!before.contains("clock_skew"), "{before}");
        m.set_clock_skew_ms(-250);
        let after = render(&m);
        assert!(after.contains("\nmeridian_agent_clock_skew_ms -250\n"), "{after}");
    }
}
