//! The agent's `/metrics` (its own listener, `metrics_listen`) and `/healthz`, on a real agent
//! (`run_with`, real listeners) whose controller is unreachable: every metric is named, the
//! outbox and webhook backlogs grow with the tickets issued, the oldest unacknowledged event
//! ages by the agent's clock, reconnects are counted; a store failure (SQLite's page limit
//! makes the store full, on the agent's own connection) turns `/healthz` to 503 and the store
//! gauges on, until a ticket commits again.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meridian_agent::store::queries;
use meridian_agent::{Context, Settings};
use meridian_shared::clock::{Clock, ManualClock};
use meridian_shared::config::SiteConfig;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const KEY: &str = "mrd_ck_metrics-test";

/// Every metric the agent exposes (counters with their `_total`).
const NAMES: &[&str] = &[
    "meridian_agent_outbox_backlog",
    "meridian_agent_outbox_oldest_unacked_age_seconds",
    "meridian_agent_outbox_acked_seq",
    "meridian_agent_outbox_high_water",
    "meridian_agent_store_errors_total",
    "meridian_agent_store_unhealthy",
    "meridian_agent_data_dir_free_bytes",
    "meridian_agent_link_connected",
    "meridian_agent_link_reconnects_total",
    "meridian_agent_commands_rejected_total",
    "meridian_agent_webhook_backlog{webhook=\"crm\"}",
];

fn site_config(closed: SocketAddr) -> SiteConfig {
    serde_json::from_value(json!({
        "revision": 1,
        "site": {"code": "SFO", "name": "San Francisco", "time_zone": "America/Los_Angeles"},
        "services": [{"site": "SFO", "code": "GEN", "name": "General", "queue": "general"}],
        "queues": [{"site": "SFO", "code": "general", "name": "General", "letter": "A"}],
        "service_points": [],
        "work_profiles": [],
        "staff": [],
        "connector_keys": [
            {"site": "SFO", "code": "kiosk", "name": "Kiosk", "key_hash": meridian_agent::auth::hash(KEY)}
        ],
        "webhooks": [
            {"site": "SFO", "code": "crm", "url": format!("http://{closed}/hook"),
             "secret": "0123456789abcdef-secret"}
        ]
    }))
    .expect("site config")
}

/// A loopback port nothing listens on.
fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the sample `name` (with its labels, if any) in a scrape.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

struct Agent {
    ctx: Arc<Context>,
    clock: Arc<ManualClock>,
    http: String,
    metrics: String,
    client: reqwest::Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<meridian_agent::Result<()>>,
}

impl Agent {
    async fn start(dir: &Path) -> Agent {
        let closed = closed_port();
        let ready = dir.join("ready.json");
        let settings = Settings {
            data_dir: dir.to_owned(),
            controller_url: format!("http://{closed}"),
            metrics_listen: "127.0.0.1:0".into(),
            ready_file: Some(ready.clone()),
            backoff_base_ms: 10,
            backoff_cap_ms: 50,
            ..Settings::default()
        };
        let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
        let ctx = Context::open(&settings, clock.clone()).await.expect("open");
        let config = site_config(closed);
        let now = clock.now();
        ctx.db
            .write(move |c| {
                // Enrolled, so the link keeps dialling the (unreachable) controller.
                queries::save_identity(
                    c,
                    &queries::Identity {
                        agent_id: "0190f0e0-0000-7000-8000-000000000001".into(),
                        site: "SFO".into(),
                        credential: "x.y".into(),
                    },
                )?;
                queries::apply_config(c, &config, now)
            })
            .await
            .expect("configure");
        let config = ctx.db.read(queries::site_config).await.expect("read config");
        ctx.config.send_replace(config.map(Arc::new));
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let shutdown = CancellationToken::new();
        let task =
            tokio::spawn(meridian_agent::run_with(ctx.clone(), settings, http, shutdown.clone()));
        let r: Value = wait_for("the ready file", || {
            let ready = ready.clone();
            async move {
                std::fs::read_to_string(&ready).ok().and_then(|s| serde_json::from_str(&s).ok())
            }
        })
        .await;
        Agent {
            ctx,
            clock,
            http: format!("http://{}", r["http"].as_str().expect("http")),
            metrics: format!("http://{}/metrics", r["metrics"].as_str().expect("metrics addr")),
            client: reqwest::Client::new(),
            shutdown,
            task,
        }
    }

    async fn scrape(&self) -> String {
        let resp = self.client.get(&self.metrics).send().await.expect("scrape");
        assert_eq!(resp.status(), 200);
        let ct = resp.headers()["content-type"].to_str().expect("ct").to_owned();
        assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
        resp.text().await.expect("body")
    }

    async fn value(&self, name: &str) -> f64 {
        let text = self.scrape().await;
        sample(&text, name).unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    async fn healthz(&self) -> (u16, Value) {
        let resp = self.client.get(format!("{}/healthz", self.http)).send().await.expect("healthz");
        (resp.status().as_u16(), resp.json().await.expect("healthz json"))
    }

    async fn ticket(&self) -> u16 {
        self.client
            .post(format!("{}/api/v1/visits", self.http))
            .bearer_auth(KEY)
            .json(&json!({"service": "GEN"}))
            .send()
            .await
            .expect("post visit")
            .status()
            .as_u16()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("join").expect("agent ran");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_backlog_while_the_controller_is_unreachable() {
    let dir =
        std::env::temp_dir().join(format!("meridian-metrics-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let agent = Agent::start(&dir).await;

    let first = agent.scrape().await;
    for name in NAMES {
        assert!(sample(&first, name).is_some(), "{name} missing in\n{first}");
    }
    assert!(!first.contains("clock_skew"), "absent until the link measures it: {first}");
    // Configured: CONFIG_APPLIED is the one event, never acknowledged.
    assert_eq!(sample(&first, "meridian_agent_outbox_high_water"), Some(1.0));
    assert_eq!(sample(&first, "meridian_agent_outbox_acked_seq"), Some(0.0));
    assert_eq!(sample(&first, "meridian_agent_link_connected"), Some(0.0));
    assert_eq!(sample(&first, "meridian_agent_store_unhealthy"), Some(0.0));
    assert!(sample(&first, "meridian_agent_data_dir_free_bytes").is_some_and(|b| b > 0.0));
    assert_eq!(agent.healthz().await, (200, json!({"status": "ok"})));

    // The webhook starts from the high water of its first round; then it cannot deliver.
    let db = agent.ctx.db.clone();
    wait_for("the webhook's cursor", || {
        let db = db.clone();
        async move {
            let n: i64 = db
                .read(
                    |c| Ok(c.query_row("SELECT COUNT(*) FROM webhook_cursors", [], |r| r.get(0))?),
                )
                .await
                .expect("cursors");
            (n == 1).then_some(())
        }
    })
    .await;
    for _ in 0..5 {
        assert_eq!(agent.ticket().await, 201);
    }
    agent.clock.advance(chrono::Duration::seconds(90));
    let text = agent.scrape().await;
    assert_eq!(sample(&text, "meridian_agent_outbox_backlog"), Some(6.0), "{text}");
    assert_eq!(sample(&text, "meridian_agent_outbox_high_water"), Some(6.0));
    assert_eq!(sample(&text, "meridian_agent_outbox_acked_seq"), Some(0.0));
    assert_eq!(sample(&text, "meridian_agent_outbox_oldest_unacked_age_seconds"), Some(90.0));
    assert_eq!(sample(&text, "meridian_agent_webhook_backlog{webhook=\"crm\"}"), Some(5.0));
    wait_for("reconnects to be counted", || async {
        (agent.value("meridian_agent_link_reconnects_total").await >= 2.0).then_some(())
    })
    .await;
    assert_eq!(agent.value("meridian_agent_link_connected").await, 0.0);

    // The store refuses a change: /healthz and the gauges say so until a change commits.
    agent
        .ctx
        .db
        .write(|c| {
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            c.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
            Ok(())
        })
        .await
        .expect("limit pages");
    let big = "x".repeat(256 * 1024);
    let full = agent
        .ctx
        .db
        .write(move |c| {
            c.execute("INSERT INTO meta (key, value) VALUES ('big', ?1)", [big])?;
            Ok(())
        })
        .await;
    let full = full.expect_err("the page limit must refuse the write");
    assert!(full.to_string().contains("full"), "{full}");
    let (status, body) = agent.healthz().await;
    assert_eq!((status, body["status"].as_str()), (503, Some("degraded")), "{body}");
    assert!(body["store_error"].as_str().is_some_and(|e| e.contains("full")), "{body}");
    let text = agent.scrape().await;
    assert_eq!(sample(&text, "meridian_agent_store_unhealthy"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "meridian_agent_store_errors_total"), Some(1.0));
    // Reads (this scrape, the link's) do not clear it.
    assert_eq!(agent.healthz().await.0, 503);

    agent
        .ctx
        .db
        .write(|c| {
            c.query_row("PRAGMA max_page_count = 1073741823", [], |_| Ok(()))?;
            Ok(())
        })
        .await
        .expect("lift the limit");
    assert_eq!(agent.healthz().await.0, 503, "nothing has committed yet");
    assert_eq!(agent.ticket().await, 201);
    assert_eq!(agent.healthz().await, (200, json!({"status": "ok"})));
    let text = agent.scrape().await;
    assert_eq!(sample(&text, "meridian_agent_store_unhealthy"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "meridian_agent_store_errors_total"), Some(1.0));
    assert_eq!(sample(&text, "meridian_agent_outbox_backlog"), Some(7.0));

    agent.stop().await;
}
