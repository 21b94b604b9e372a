//! `/api/v1/stats/visits` over projected facts with known answers, on SQLite and PostgreSQL.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use chrono::{TimeZone, Utc};
use meridian_controller::api::ApiState;
use meridian_controller::config_admin::{self, ChangeMode, ResourceInput};
use meridian_controller::metrics::Metrics;
use meridian_controller::store::{self, Store};
use meridian_controller::testing;
use meridian_shared::VisitId;
use meridian_shared::events::VisitEventKind;
use meridian_shared::visits::Outcome;
use serde_json::{Value, json};
use std::future::IntoFuture;

use tower::ServiceExt;

async fn seeded(store: Arc<dyn Store>) -> (axum::Router, String) {
    let token = meridian_controller::server::ensure_bootstrap_token(store.as_ref(), None)
        .await
        .expect("token")
        .expect("first");
    let resources = [
        json!({"kind": "site", "code": "SFO", "name": "San Francisco", "time_zone": "America/Los_Angeles"}),
        json!({"kind": "queue", "site": "SFO", "code": "general", "name": "General", "letter": "A"}),
        json!({"kind": "service", "site": "SFO", "code": "GEN", "name": "General", "queue": "general", "kpi_wait_minutes": 10}),
    ];
    let inputs: Vec<ResourceInput> =
        resources.into_iter().map(|r| serde_json::from_value(r).expect("resource")).collect();
    config_admin::change(store.as_ref(), "test", inputs, vec![], ChangeMode::Upsert)
        .await
        .expect("config");
    let t0 = Utc.with_ymd_and_hms(2026, 11, 2, 17, 0, 0).unwrap();
    let agent = testing::enroll_agent(store.as_ref(), "SFO").await.expect("enroll");
    // Four visits: waits 2, 4 and 30 minutes served (5 min each), one no-show after 6 minutes.
    let mut events = Vec::new();
    for (wait, served) in [(2, true), (4, true), (30, true), (6, false)] {
        let end = if served {
            (VisitEventKind::Ended, wait + 5, Some(Outcome::Served), Some(300_000))
        } else {
            (VisitEventKind::NoShow, wait + 1, Some(Outcome::NoShow), None)
        };
        events.extend(testing::visit_events(
            VisitId::new(),
            t0,
            &[(VisitEventKind::Called, wait, None, None), end],
        ));
    }
    let incoming = testing::incoming(&events, 1, t0);
    store.ingest_events(agent.id, &incoming, Utc::now()).await.expect("store").expect("ingest");
    meridian_controller::stats::catch_up(store.as_ref(), &Default::default())
        .await
        .expect("project");
    let state = ApiState {
        store,
        metrics: Arc::new(Metrics::default()),
        commands_changed: Arc::new(tokio::sync::watch::channel(0).0),
        clock_skew_tolerance: meridian_controller::Settings::default().clock_skew_tolerance(),
    };
    (meridian_controller::api::router(state, 1 << 20), token)
}

async fn get(router: &axum::Router, token: &str, path: &str) -> (StatusCode, String) {
    let req = Request::get(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .expect("req");
    let resp = router.clone().oneshot(req).await.expect("resp");
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn check(store: Arc<dyn Store>) {
    let (router, token) = seeded(store).await;
    let (status, body) = get(&router, &token, "/api/v1/stats/visits?group_by=service").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let rows: Value = serde_json::from_str(&body).expect("json");
    let r = &rows[0];
    assert_eq!(r["group"], "SFO/GEN");
    assert_eq!(
        (r["visits"].as_u64(), r["served"].as_u64(), r["no_shows"].as_u64()),
        (Some(4), Some(3), Some(1))
    );
    assert_eq!(r["no_show_pct"], 25.0);
    assert_eq!(r["waiting_ms"]["p50"], 4 * 60_000);
    assert_eq!(r["waiting_ms"]["max"], 30 * 60_000);
    assert_eq!(r["waiting_ms"]["mean"], 10.5 * 60_000.0);
    assert_eq!(r["service_ms_mean"], 300_000.0);
    let sl = r["service_level_pct"].as_f64().expect("service level");
    assert!((sl - 200.0 / 3.0).abs() < 1e-9, "{sl}");

    let (status, csv) = get(&router, &token, "/api/v1/stats/visits?group_by=site&format=csv").await;
    assert_eq!(status, StatusCode::OK);
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("group,interval,visits,served,no_shows"));
    assert!(
        lines[1].starts_with("SFO,,4,3,1,25.0,630000.0,240000,1800000,1800000,300000.0,66.7"),
        "{}",
        lines[1]
    );

    // The same through meridianctl's client, over a real listener.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(axum::serve(listener, router.clone()).into_future());
    let client =
        meridian_controller::ctl::Client::new(&server, Some(token.clone())).expect("client");
    let filter = meridian_controller::ctl::StatsFilter {
        group_by: "day",
        site: Some("SFO"),
        from: Some("2026-11-02"),
        ..Default::default()
    };
    let rows = meridian_controller::ctl::visit_stats(&client, &filter).await.expect("ctl stats");
    assert_eq!(
        (rows.len(), rows[0].interval.as_deref(), rows[0].visits),
        (1, Some("2026-11-02"), 4)
    );
    let table =
        meridian_controller::ctl::render_stats(&rows, meridian_controller::ctl::Output::Table)
            .expect("table");
    assert!(
        table.contains("2026-11-02") && table.contains("66.7%") && table.contains("1 (25.0%)"),
        "{table}"
    );
    let planet = meridian_controller::ctl::StatsFilter { group_by: "planet", ..Default::default() };
    let bad = meridian_controller::ctl::visit_stats(&client, &planet).await;
    assert!(bad.is_err());

    let (_, empty) = get(&router, &token, "/api/v1/stats/visits?from=2026-11-03").await;
    assert_eq!(empty, "[]", "the date filter excludes the day");
    for bad in [
        "group_by=planet",
        "from=yesterday",
        "format=xml",
        "from=2026-11-05&to=2026-11-01",
        "site=sfo",
        "site=LAX",
        "service=NOPE",
        "interval=hour",
        "interval=fortnight",
        "interval=15m&from=2026-01-01&to=2026-11-02",
        "from=2000-01-01&to=2026-11-02",
    ] {
        let (status, body) = get(&router, &token, &format!("/api/v1/stats/visits?{bad}")).await;
        assert!(status.is_client_error(), "{bad}: {status}");
        let v: Value = serde_json::from_str(&body).expect("typed error");
        assert!(v["code"].is_string() && v["message"].is_string(), "{bad}: {body}");
    }
}

#[tokio::test]
async fn visit_statistics_have_known_answers_on_sqlite() {
    check(store::open(&meridian_controller::testing::fresh_sqlite_url()).await.expect("sqlite"))
        .await;
}

#[tokio::test]
async fn visit_statistics_have_known_answers_on_postgres() {
    let url = meridian_controller::testing::fresh_postgres_url().await;
    check(store::open(&url).await.expect("postgres")).await;
}
