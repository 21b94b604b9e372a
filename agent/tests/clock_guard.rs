//! The guarded clock at a branch, in process: the system clock jumps a day ahead, then two
//! hours behind, while the controller's time and the monotonic clock go on. Waiting visits
//! stay waiting, the business day and ticket numbering go on, events carry the trusted time,
//! `/api/v1/status` shows the alert until the clock is fixed, and a restart on the same boot
//! with the clock still wrong starts from the last good time.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use chrono::{DateTime, NaiveDate, TimeDelta, TimeZone, Utc};
use meridian_agent::clock::{ClockSource, ManualMonotonic};
use meridian_agent::store::queries;
use meridian_agent::{Context, Settings, visits};
use meridian_shared::clock::ManualClock;
use meridian_shared::config::SiteConfig;
use serde_json::{Value, json};
use tower::ServiceExt;

const KEY: &str = "mrd_ck_clock-test";
const DAY_MS: i64 = 86_400_000;

/// Monday 2026-03-09 10:00 in San Francisco (PDT, UTC-7).
fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 9, 17, 0, 0).unwrap()
}

fn monday() -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 3, 9).expect("date")
}

fn site_config() -> SiteConfig {
    serde_json::from_value(json!({
        "revision": 1,
        "site": {"code": "SFO", "name": "San Francisco", "time_zone": "America/Los_Angeles",
                 "business_hours": {"mon": ["09:00-17:00"], "tue": ["09:00-17:00"]}},
        "services": [{"site": "SFO", "code": "GEN", "name": "General", "queue": "general"}],
        "queues": [{"site": "SFO", "code": "general", "name": "General", "letter": "A"}],
        "service_points": [], "work_profiles": [], "staff": [],
        "connector_keys": [
            {"site": "SFO", "code": "kiosk", "name": "Kiosk", "key_hash": meridian_agent::auth::hash(KEY)}
        ]
    }))
    .expect("site config")
}

struct Branch {
    ctx: Arc<Context>,
    router: Router,
    system: Arc<ManualClock>,
    mono: Arc<ManualMonotonic>,
}

impl Branch {
    async fn open(
        settings: &Settings,
        system: Arc<ManualClock>,
        mono: Arc<ManualMonotonic>,
    ) -> Self {
        let source = ClockSource::Guarded {
            system: system.clone(),
            monotonic: mono.clone(),
            boot_id: Some("boot-a".into()),
        };
        let ctx = Context::open_on(settings, source, None).await.expect("open");
        let config = site_config();
        let applied = config.clone();
        let now = ctx.clock.now();
        ctx.db.write(move |c| queries::apply_config(c, &applied, now)).await.expect("config");
        ctx.config.send_replace(Some(Arc::new(config)));
        let router = meridian_agent::branch_api::router(ctx.clone());
        Branch { ctx, router, system, mono }
    }

    /// Real time passes: both clocks move on.
    fn pass(&self, ms: i64) {
        self.mono.advance(Duration::from_millis(ms as u64));
        self.system.advance(TimeDelta::milliseconds(ms));
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {KEY}"));
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Body::from(b.to_string())
            }
            None => Body::empty(),
        };
        let resp =
            self.router.clone().oneshot(req.body(body).expect("request")).await.expect("response");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn ticket(&self) -> Value {
        let (status, v) =
            self.call(Method::POST, "/api/v1/visits", Some(json!({"service": "GEN"}))).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        v
    }

    async fn clock_status(&self) -> Value {
        let (status, v) = self.call(Method::GET, "/api/v1/status", None).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v["clock"].clone()
    }

    async fn sweep(&self) -> usize {
        self.ctx.change(visits::close_finished_days).await.expect("end-of-day sweep")
    }

    async fn waiting(&self) -> usize {
        let (_, v) = self.call(Method::GET, "/api/v1/visits?status=waiting", None).await;
        v.as_array().expect("visits").len()
    }
}

fn temp_settings() -> Settings {
    let dir =
        std::env::temp_dir().join(format!("meridian-clock-{}", uuid::Uuid::new_v4().simple()));
    Settings { data_dir: dir, ..Settings::default() }
}

#[tokio::test]
async fn a_clock_jump_moves_neither_the_business_day_nor_the_end_of_day_sweep() {
    let settings = temp_settings();
    let system = Arc::new(ManualClock::new(t0()));
    let mono = Arc::new(ManualMonotonic::default());
    mono.advance(Duration::from_secs(3_600));
    let b = Branch::open(&settings, system.clone(), mono.clone()).await;
    // A session's Welcome: the controller agrees with the system clock.
    b.ctx.controller_time(t0().timestamp_millis());
    for n in 1..=5 {
        assert_eq!(b.ticket().await["ticket"], format!("A00{n}"));
    }
    let clock = b.clock_status().await;
    assert_eq!(
        (&clock["guarded"], &clock["trusted"], &clock["alert"], &clock["reference"]),
        (&json!(true), &json!(true), &Value::Null, &json!("controller")),
        "{clock}"
    );

    // A minute later the system clock jumps a day ahead.
    b.pass(60_000);
    b.system.advance(TimeDelta::milliseconds(DAY_MS));
    assert_eq!(b.ctx.clock.now(), t0() + TimeDelta::milliseconds(60_000));
    assert_eq!(b.sweep().await, 0, "no visit is ended by a clock jump");
    let v = b.ticket().await;
    assert_eq!((&v["ticket"], &v["business_day"]), (&json!("A006"), &json!(monday())), "{v}");
    let clock = b.clock_status().await;
    assert_eq!(clock["trusted"], false, "{clock}");
    assert_eq!(clock["skew_ms"], DAY_MS, "{clock}");
    assert_eq!(clock["alerts_raised"], 1, "{clock}");
    assert!(clock["alert"].as_str().expect("alert").contains("1d ahead of the controller's time"));

    // Then two hours behind the real time.
    b.pass(60_000);
    b.system.set(t0() + TimeDelta::milliseconds(120_000 - 7_200_000));
    assert_eq!(b.sweep().await, 0);
    assert_eq!(b.ticket().await["ticket"], "A007");
    let clock = b.clock_status().await;
    assert_eq!((&clock["trusted"], &clock["skew_ms"]), (&json!(false), &json!(-7_200_000)));
    assert_eq!(clock["alerts_raised"], 1, "one episode: {clock}");
    assert_eq!(b.waiting().await, 7);

    // Every event carries the trusted time: nothing dated on another day.
    let events = b.ctx.db.read(|c| queries::outbox_after(c, 0, 1_000)).await.expect("outbox");
    assert!(!events.is_empty());
    for e in &events {
        let at = DateTime::from_timestamp_millis(e.occurred_at_ms).expect("time");
        assert!(at >= t0() && at <= t0() + TimeDelta::milliseconds(120_000), "{} at {at}", e.kind);
    }

    // Fixed: the system clock again, the alert cleared.
    b.system.set(t0() + TimeDelta::milliseconds(120_500));
    assert_eq!(b.ticket().await["ticket"], "A008");
    let clock = b.clock_status().await;
    assert_eq!((&clock["trusted"], &clock["alert"]), (&json!(true), &Value::Null), "{clock}");

    // The real end of the day still ends what is left (17:00 close + 30 min grace).
    b.pass(7 * 3_600_000 + 31 * 60_000);
    assert_eq!(b.sweep().await, 8);
    assert_eq!(b.waiting().await, 0);
}

#[tokio::test]
async fn a_restart_on_the_same_boot_with_a_wrong_clock_starts_from_the_last_good_time() {
    let settings = temp_settings();
    let system = Arc::new(ManualClock::new(t0()));
    let mono = Arc::new(ManualMonotonic::default());
    let b = Branch::open(&settings, system.clone(), mono.clone()).await;
    b.ctx.controller_time(t0().timestamp_millis());
    b.ticket().await;
    let guard = b.ctx.clock_guard.clone().expect("guarded");
    let last = guard.last_good();
    b.ctx.db.write(move |c| queries::save_clock_last_good(c, &last)).await.expect("keep");
    b.ctx.db.close().await;
    drop(b);

    // Ten minutes later the agent starts again, the system clock a day ahead.
    mono.advance(Duration::from_secs(600));
    system.set(t0() + TimeDelta::milliseconds(600_000 + DAY_MS));
    let b = Branch::open(&settings, system, mono).await;
    assert_eq!(b.ctx.clock.now(), t0() + TimeDelta::milliseconds(600_000));
    let clock = b.clock_status().await;
    assert_eq!(
        (&clock["trusted"], &clock["reference"], &clock["skew_ms"]),
        (&json!(false), &json!("last_good"), &json!(DAY_MS)),
        "{clock}"
    );
    assert_eq!(b.sweep().await, 0);
    let v = b.ticket().await;
    assert_eq!((&v["ticket"], &v["business_day"]), (&json!("A002"), &json!(monday())), "{v}");
}

#[tokio::test]
async fn an_injected_clock_is_not_guarded() {
    let settings = temp_settings();
    let ctx = Context::open(&settings, Arc::new(ManualClock::new(t0()))).await.expect("open");
    let h = ctx.clock_health();
    assert!(!h.guarded && h.trusted && h.alert.is_none(), "{h:?}");
    // The Welcome's time changes nothing, and the system time reported is the clock's.
    ctx.controller_time(t0().timestamp_millis() + DAY_MS);
    assert_eq!(ctx.clock.now(), t0());
    assert_eq!(ctx.system_time(), t0());
}
