//! Branch operations through the connector API (`Router::oneshot`, no controller): the visit
//! lifecycle, counters, work profiles, illegal transitions and concurrent counters, customer
//! fields and the personal data rule.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use meridian_agent::store::queries;
use meridian_agent::{Context, Settings};
use meridian_shared::clock::SystemClock;
use meridian_shared::config::SiteConfig;
use serde_json::{Value, json};
use tower::ServiceExt;

/// The connector key the tests' local systems use.
const KEY: &str = "mrd_ck_test-key";
/// The demo staff password (its argon2 hash is in the config below).
const PASSWORD: &str = "correct horse";

fn password_hash() -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(b"0123456789abcdef").expect("salt");
    argon2::Argon2::default().hash_password(PASSWORD.as_bytes(), &salt).expect("hash").to_string()
}

fn site_config() -> SiteConfig {
    serde_json::from_value(json!({
        "revision": 1,
        "site": {"code": "SFO", "name": "San Francisco", "time_zone": "America/Los_Angeles"},
        "services": [
            {"site": "SFO", "code": "GEN", "name": "General", "queue": "general"},
            {"site": "SFO", "code": "ACC", "name": "Accounts", "queue": "accounts"}
        ],
        "queues": [
            {"site": "SFO", "code": "general", "name": "General", "letter": "A"},
            {"site": "SFO", "code": "accounts", "name": "Accounts", "letter": "B"}
        ],
        "service_points": [
            {"site": "SFO", "code": "C1", "name": "Counter 1", "work_profile": "accounts-first"},
            {"site": "SFO", "code": "C2", "name": "Counter 2", "work_profile": "general-first"}
        ],
        "work_profiles": [
            {"site": "SFO", "code": "accounts-first", "name": "Accounts first",
             "queues": [{"queue": "accounts"}, {"queue": "general"}]},
            {"site": "SFO", "code": "general-first", "name": "General first",
             "queues": [{"queue": "general"}, {"queue": "accounts"}]}
        ],
        "connector_keys": [
            {"site": "SFO", "code": "kiosk", "name": "Kiosk", "key_hash": meridian_agent::auth::hash(KEY)}
        ],
        "webhooks": [
            {"site": "SFO", "code": "crm", "url": "http://127.0.0.1:9/unused", "secret": "0123456789abcdef-secret",
             "kinds": ["VISIT_CREATED", "VISIT_CALLED"]}
        ],
        "staff": [
            {"username": "alice", "name": "Alice", "roles": ["staff"], "sites": ["SFO"],
             "password_hash": password_hash()}
        ],
        "request_types": [
            {"code": "REPAIR", "name": "Furniture repair", "fields": [
                {"name": "summary", "type": "text", "max_length": 80, "required": true},
                {"name": "category", "type": "enum", "values": ["chair", "table"], "required": true},
                {"name": "pieces", "type": "number", "min": 1, "integer": true, "default": 1}
            ]}
        ]
    }))
    .expect("site config")
}

async fn branch() -> (Arc<Context>, Router) {
    let dir =
        std::env::temp_dir().join(format!("meridian-branch-{}", uuid::Uuid::new_v4().simple()));
    let settings = Settings { data_dir: dir, ..Settings::default() };
    let ctx = Context::open(&settings, Arc::new(SystemClock)).await.expect("open");
    let config = site_config();
    let applied = config.clone();
    let now = ctx.clock.now();
    ctx.db.write(move |c| queries::apply_config(c, &applied, now)).await.expect("apply config");
    ctx.config.send_replace(Some(Arc::new(config)));
    let router = meridian_agent::branch_api::router(ctx.clone());
    (ctx, router)
}

async fn call(
    router: &Router,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    call_as(router, Some(KEY), method, path, body).await
}

async fn call_as(
    router: &Router,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Body::from(b.to_string())
        }
        None => Body::empty(),
    };
    let resp = router.clone().oneshot(req.body(body).expect("request")).await.expect("response");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn ok(router: &Router, method: Method, path: &str, body: Option<Value>) -> Value {
    let (status, v) = call(router, method.clone(), path, body).await;
    assert!(status.is_success(), "{method} {path} -> {status}: {v}");
    v
}

/// Logs the demo staff member in through the API; returns the session token.
async fn log_in_alice(r: &Router) -> String {
    let (status, session) = call_as(
        r,
        None,
        Method::POST,
        "/api/v1/sessions",
        Some(json!({"username": "alice", "password": PASSWORD})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{session}");
    session["token"].as_str().expect("token").to_owned()
}

async fn outbox_kinds(ctx: &Context) -> Vec<String> {
    ctx.db
        .read(|c| Ok(queries::outbox_after(c, 0, 10_000)?.into_iter().map(|e| e.kind).collect()))
        .await
        .expect("outbox")
}

#[tokio::test]
async fn a_visit_lives_through_call_serve_and_end_with_an_event_per_step() {
    let (ctx, r) = branch().await;
    ok(&r, Method::POST, "/api/v1/service-points/C1/open", Some(json!({"staff": "alice"}))).await;
    let a = ok(&r, Method::POST, "/api/v1/visits", Some(json!({"service": "GEN"}))).await;
    let b = ok(&r, Method::POST, "/api/v1/visits", Some(json!({"service": "ACC"}))).await;
    assert_eq!((a["ticket"].as_str(), b["ticket"].as_str()), (Some("A001"), Some("B001")));

    // C1's profile calls accounts first.
    let called = ok(&r, Method::POST, "/api/v1/service-points/C1/call-next", None).await;
    assert_eq!(called["ticket"], "B001");
    assert_eq!(
        (called["status"].as_str(), called["counter"].as_str(), called["staff"].as_str()),
        (Some("called"), Some("C1"), Some("alice"))
    );
    let id = called["id"].as_str().expect("id");
    ok(&r, Method::POST, &format!("/api/v1/visits/{id}/recall"), None).await;
    let serving = ok(&r, Method::POST, &format!("/api/v1/visits/{id}/start-serving"), None).await;
    assert_eq!(serving["status"], "serving");
    let ended = ok(
        &r,
        Method::POST,
        &format!("/api/v1/visits/{id}/end"),
        Some(json!({"marks": ["new account"]})),
    )
    .await;
    assert_eq!(
        (ended["status"].as_str(), ended["outcome"].as_str()),
        (Some("ended"), Some("served"))
    );

    let queues = ok(&r, Method::GET, "/api/v1/queues", None).await;
    assert_eq!(queues[0]["waiting"], 1, "{queues}");
    let points = ok(&r, Method::GET, "/api/v1/service-points", None).await;
    assert_eq!(
        (points[0]["open"].as_bool(), points[0]["staff"].as_str()),
        (Some(true), Some("alice"))
    );
    assert!(points[0].get("current").is_none());

    assert_eq!(
        outbox_kinds(&ctx).await,
        [
            "CONFIG_APPLIED",
            "SERVICE_POINT_OPENED",
            "STAFF_LOGGED_IN",
            "VISIT_CREATED",
            "VISIT_CREATED",
            "VISIT_CALLED",
            "VISIT_RECALLED",
            "VISIT_SERVING",
            "VISIT_ENDED"
        ]
    );
}

#[tokio::test]
async fn recycle_park_transfer_and_walk_in() {
    let (_ctx, r) = branch().await;
    ok(&r, Method::POST, "/api/v1/service-points/C1/open", Some(json!({"staff": "alice"}))).await;
    ok(&r, Method::POST, "/api/v1/service-points/C2/open", None).await;
    for _ in 0..3 {
        ok(&r, Method::POST, "/api/v1/visits", Some(json!({"service": "GEN"}))).await;
    }
    let first = ok(&r, Method::POST, "/api/v1/service-points/C1/call-next", None).await;
    assert_eq!(first["ticket"], "A001");
    let id = first["id"].as_str().expect("id").to_owned();
    let recycled = ok(&r, Method::POST, &format!("/api/v1/visits/{id}/recycle"), None).await;
    assert_eq!(recycled["location"], json!({"kind": "queue", "code": "general"}));
    assert_eq!(
        ok(&r, Method::POST, "/api/v1/service-points/C1/call-next", None).await["ticket"],
        "A002",
        "recycled goes to the back"
    );
    let second = ok(&r, Method::GET, "/api/v1/visits?status=called", None).await[0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let parked = ok(&r, Method::POST, &format!("/api/v1/visits/{second}/park"), None).await;
    assert_eq!(parked["location"], json!({"kind": "staff_pool", "code": "alice"}));
    assert_eq!(
        ok(&r, Method::POST, "/api/v1/service-points/C1/call-next", None).await["ticket"],
        "A002",
        "own pool first"
    );
    ok(
        &r,
        Method::POST,
        &format!("/api/v1/visits/{second}/transfer"),
        Some(json!({"to": {"kind": "queue", "code": "accounts"}, "position": "first"})),
    )
    .await;
    assert_eq!(
        ok(&r, Method::POST, "/api/v1/service-points/C2/call-next", None).await["ticket"],
        "A003",
        "C2 prefers general"
    );
    let walk = ok(
        &r,
        Method::POST,
        "/api/v1/service-points/C1/walk-direct",
        Some(json!({"service": "ACC"})),
    )
    .await;
    assert_eq!((walk["status"].as_str(), walk["ticket"].as_str()), (Some("serving"), Some("B001")));
}

#[tokio::test]
async fn illegal_operations_are_refused_and_change_nothing() {
    let (ctx, r) = branch().await;
    let v = ok(&r, Method::POST, "/api/v1/visits", Some(json!({"service": "GEN"}))).await;
    let id = v["id"].as_str().expect("id").to_owned();
    let before = outbox_kinds(&ctx).await.len();
    let cases: Vec<(Method, String, Option<Value>, StatusCode, &str)> = vec![
        (Method::POST, format!("/api/v1/visits/{id}/end"), None, StatusCode::CONFLICT, "conflict"),
        (
            Method::POST,
            format!("/api/v1/visits/{id}/recall"),
            None,
            StatusCode::CONFLICT,
            "conflict",
        ),
        (
            Method::POST,
            format!("/api/v1/visits/{id}/no-show"),
            None,
            StatusCode::CONFLICT,
            "conflict",
        ),
        (Method::POST, format!("/api/v1/visits/{id}/park"), None, StatusCode::CONFLICT, "conflict"),
        (
            Method::POST,
            format!("/api/v1/visits/{id}/fly"),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (Method::POST, "/api/v1/visits/nope/end".into(), None, StatusCode::NOT_FOUND, "not_found"),
        (
            Method::POST,
            "/api/v1/service-points/C1/call-next".into(),
            None,
            StatusCode::CONFLICT,
            "conflict",
        ),
        (
            Method::POST,
            "/api/v1/service-points/C9/open".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::POST,
            "/api/v1/service-points/C1/open".into(),
            Some(json!({"staff": "mallory"})),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::POST,
            "/api/v1/visits".into(),
            Some(json!({"service": "NOPE"})),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::POST,
            "/api/v1/visits".into(),
            Some(json!({"service": ""})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/visits".into(),
            Some(json!({"service": "GEN", "extra": 1})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            Method::POST,
            format!("/api/v1/visits/{id}/transfer"),
            Some(json!({"to": {"kind": "queue", "code": "nowhere"}})),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::POST,
            format!("/api/v1/visits/{id}/transfer"),
            Some(json!({"to": "queue"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            Method::GET,
            "/api/v1/visits?status=sleeping".into(),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let (got, v) = call(&r, method.clone(), &path, body).await;
        assert_eq!((got, v["code"].as_str()), (status, Some(code)), "{method} {path}: {v}");
        assert!(v["message"].is_string());
    }
    // Two counters, one visit: the second call is refused.
    ok(&r, Method::POST, "/api/v1/service-points/C1/open", None).await;
    ok(&r, Method::POST, "/api/v1/service-points/C2/open", None).await;
    ok(&r, Method::POST, "/api/v1/service-points/C1/call", Some(json!({"ticket": "A001"}))).await;
    let (status, _) =
        call(&r, Method::POST, "/api/v1/service-points/C2/call", Some(json!({"visit_id": id})))
            .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = call(&r, Method::POST, "/api/v1/service-points/C1/close", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "a counter with a customer cannot close");
    let kinds = outbox_kinds(&ctx).await;
    assert_eq!(
        &kinds[before..],
        ["SERVICE_POINT_OPENED", "SERVICE_POINT_OPENED", "VISIT_CALLED"],
        "refusals recorded nothing"
    );
}

#[tokio::test]
async fn two_counters_calling_at_once_never_get_the_same_visit() {
    let (_ctx, r) = branch().await;
    ok(&r, Method::POST, "/api/v1/service-points/C1/open", None).await;
    ok(&r, Method::POST, "/api/v1/service-points/C2/open", None).await;
    let mut issued = Vec::new();
    for i in 0..200 {
        let service = if i % 2 == 0 { "GEN" } else { "ACC" };
        issued.push(
            ok(&r, Method::POST, "/api/v1/visits", Some(json!({"service": service}))).await["id"]
                .as_str()
                .expect("id")
                .to_owned(),
        );
    }
    let counter = |name: &'static str| {
        let r = r.clone();
        tokio::spawn(async move {
            let mut served = Vec::new();
            loop {
                let (status, v) = call(
                    &r,
                    Method::POST,
                    &format!("/api/v1/service-points/{name}/call-next"),
                    None,
                )
                .await;
                if status == StatusCode::NOT_FOUND {
                    return served;
                }
                assert_eq!(status, StatusCode::OK, "{v}");
                let id = v["id"].as_str().expect("id").to_owned();
                ok(&r, Method::POST, &format!("/api/v1/visits/{id}/end"), None).await;
                served.push(id);
            }
        })
    };
    let (a, b) = tokio::join!(counter("C1"), counter("C2"));
    let (a, b) = (a.expect("C1"), b.expect("C2"));
    assert!(!a.is_empty() && !b.is_empty(), "both counters worked: {} / {}", a.len(), b.len());
    let mut all: Vec<String> = a.iter().chain(b.iter()).cloned().collect();
    all.sort();
    let before = all.len();
    all.dedup();
    assert_eq!(all.len(), before, "a visit was served twice");
    issued.sort();
    assert_eq!(all, issued, "every visit served exactly once");
}

#[tokio::test]
async fn only_this_sites_keys_and_live_staff_sessions_get_in() {
    let (ctx, r) = branch().await;
    let before = outbox_kinds(&ctx).await.len();
    let visits = "/api/v1/visits";
    let body = || Some(json!({"service": "GEN"}));
    let check = |token: Option<&'static str>, code: &'static str| {
        let r = r.clone();
        async move {
            let (status, v) =
                call_as(&r, token, Method::POST, "/api/v1/visits", Some(json!({"service": "GEN"})))
                    .await;
            assert_eq!(
                (status, v["code"].as_str()),
                (StatusCode::UNAUTHORIZED, Some(code)),
                "{token:?}: {v}"
            );
        }
    };
    check(None, "unauthenticated").await;
    check(Some("mrd_ck_forged"), "invalid_credentials").await;
    // Another branch's key is not in this site's configuration.
    check(Some("mrd_ck_key-of-CHI"), "invalid_credentials").await;
    let (status, _) = call_as(&r, Some(KEY), Method::POST, visits, body()).await;
    assert_eq!(status, StatusCode::CREATED);

    // Staff sessions: wrong password and unknown user are refused alike.
    for (user, pw) in [("alice", "wrong horse"), ("mallory", PASSWORD)] {
        let (status, v) = call_as(
            &r,
            None,
            Method::POST,
            "/api/v1/sessions",
            Some(json!({"username": user, "password": pw})),
        )
        .await;
        assert_eq!(
            (status, v["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("invalid_credentials")),
            "{user}"
        );
    }
    let token = log_in_alice(&r).await;
    let (status, _) = call_as(&r, Some(&token), Method::GET, visits, None).await;
    assert_eq!(status, StatusCode::OK);
    // Logout ends the session.
    let (status, _) =
        call_as(&r, Some(&token), Method::DELETE, "/api/v1/sessions/current", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, v) = call_as(&r, Some(&token), Method::GET, visits, None).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_credentials"))
    );
    // An expired session is told so.
    let now = ctx.clock.now().timestamp_millis();
    let alice = site_config().staff.into_iter().find(|u| u.username.as_str() == "alice");
    let (old, _) = ctx
        .db
        .write(move |c| {
            meridian_agent::auth::create_session(
                c,
                &alice.expect("alice"),
                None,
                now - meridian_agent::auth::SESSION_TTL.num_milliseconds() - 1,
            )
        })
        .await
        .expect("session");
    let (status, v) = call_as(&r, Some(&old), Method::GET, visits, None).await;
    assert_eq!((status, v["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("session_expired")));
    // Oversize bodies.
    let huge = json!({"service": "x".repeat(100 * 1024)});
    let (status, v) = call(&r, Method::POST, visits, Some(huge)).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );
    // A key removed centrally stops working as soon as the new configuration is applied.
    let mut revoked = site_config();
    revoked.revision = 2;
    revoked.connector_keys.clear();
    ctx.config.send_replace(Some(Arc::new(revoked)));
    check(Some(KEY), "invalid_credentials").await;
    assert_eq!(
        outbox_kinds(&ctx).await.len(),
        before + 1,
        "only the one admitted ticket was recorded"
    );
}

#[tokio::test]
async fn visits_left_open_are_closed_when_their_day_is_over() {
    let (ctx, r) = branch().await;
    ok(&r, Method::POST, "/api/v1/service-points/C1/open", None).await;
    ok(&r, Method::POST, "/api/v1/visits", Some(json!({"service": "GEN"}))).await;
    ok(&r, Method::POST, "/api/v1/visits", Some(json!({"service": "GEN"}))).await;
    ok(&r, Method::POST, "/api/v1/service-points/C1/call-next", None).await;
    // Nothing is over yet today (the test site has no opening hours; only the date rolls over).
    let ended = ctx.change(meridian_agent::visits::close_finished_days).await.expect("sweep");
    assert_eq!(ended, 0);
    let tomorrow = ctx.clock.now() + chrono::Duration::days(1);
    let ended = ctx
        .change(move |c, config, _| {
            meridian_agent::visits::close_finished_days(c, config, tomorrow)
        })
        .await
        .expect("sweep");
    assert_eq!(ended, 2, "the waiting and the called visit are both ended");
    let done = ok(&r, Method::GET, "/api/v1/visits?status=ended", None).await;
    assert!(done.as_array().expect("list").iter().all(|v| v["outcome"] == "closed_at_end_of_day"));
    let kinds = outbox_kinds(&ctx).await;
    assert_eq!(kinds.iter().filter(|k| *k == "VISIT_CLOSED_AT_END_OF_DAY").count(), 2);
    let points = ok(&r, Method::GET, "/api/v1/service-points", None).await;
    assert!(points[0].get("current").is_none(), "the counter is free again");
}

/// Reads SSE events (`id`, `event`) from a streaming response until `n` arrived.
async fn sse_events(
    router: &Router,
    path: &str,
    last_event_id: Option<&str>,
    n: usize,
) -> Vec<(String, String)> {
    sse_events_with_data(router, path, last_event_id, n)
        .await
        .into_iter()
        .map(|(id, kind, _)| (id, kind))
        .collect()
}

/// Reads SSE events (`id`, `event`, `data` as JSON) until `n` arrived.
async fn sse_events_with_data(
    router: &Router,
    path: &str,
    last_event_id: Option<&str>,
    n: usize,
) -> Vec<(String, String, Value)> {
    use futures::StreamExt;
    let mut req = Request::builder().uri(path).header("authorization", format!("Bearer {KEY}"));
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let resp =
        router.clone().oneshot(req.body(Body::empty()).expect("request")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body().into_data_stream();
    let mut text = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while events.len() < n {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("events in time")
            .expect("stream open")
            .expect("chunk");
        text.push_str(std::str::from_utf8(&chunk).expect("utf8"));
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let field = |name: &str| {
                block.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned())
            };
            if let (Some(id), Some(kind)) = (field("id:"), field("event:")) {
                let data = field("data:")
                    .map_or(Value::Null, |d| serde_json::from_str(&d).expect("event data is JSON"));
                events.push((id, kind, data));
            }
        }
    }
    events
}

#[tokio::test]
async fn the_live_event_feed_resumes_from_a_cursor_and_streams_new_events() {
    let (ctx, r) = branch().await;
    for _ in 0..3 {
        ok(&r, Method::POST, "/api/v1/visits", Some(json!({"service": "GEN"}))).await;
    }
    let all = sse_events(&r, "/api/v1/events?after=0", None, 4).await;
    let ids: Vec<&str> = all.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["1", "2", "3", "4"]);
    assert_eq!(all[0].1, "CONFIG_APPLIED");
    assert_eq!(all[1].1, "VISIT_CREATED");
    let resumed = sse_events(&r, "/api/v1/events", Some("2"), 2).await;
    assert_eq!(resumed.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["3", "4"]);

    // Live: a subscriber caught up to the end receives the next event as it happens.
    let live = {
        let r = r.clone();
        tokio::spawn(async move { sse_events(&r, "/api/v1/events?after=4", None, 1).await })
    };
    ok(&r, Method::POST, "/api/v1/service-points/C1/open", None).await;
    let got = live.await.expect("live");
    assert_eq!(got, [("5".to_owned(), "SERVICE_POINT_OPENED".to_owned())]);

    // Bad and expired cursors.
    let (status, v) = call(&r, Method::GET, "/api/v1/events?after=999", None).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("validation_failed"))
    );
    let later = ctx.clock.now() + chrono::Duration::days(2);
    ctx.db
        .write(move |c| queries::ack_outbox(c, 5, later, chrono::Duration::hours(24)))
        .await
        .expect("ack and prune");
    let (status, v) = call(&r, Method::GET, "/api/v1/events?after=0", None).await;
    assert_eq!((status, v["code"].as_str()), (StatusCode::GONE, Some("cursor_expired")));
}

#[tokio::test]
async fn webhooks_deliver_signed_in_order_and_retry_until_accepted() {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Receiver {
        refuse_first: AtomicUsize,
        accepted: Mutex<Vec<Value>>,
        attempts: Mutex<Vec<String>>,
    }
    let receiver = Arc::new(Receiver { refuse_first: AtomicUsize::new(2), ..Default::default() });
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(rx): axum::extract::State<Arc<Receiver>>,
                 headers: axum::http::HeaderMap,
                 body: String| async move {
                    let header = |n: &str| {
                        headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
                    };
                    rx.attempts.lock().unwrap().push(header("x-meridian-delivery"));
                    let sig = header("x-meridian-signature");
                    let (t, v1) = sig.split_once(",v1=").expect("signature format");
                    let ts: i64 = t.trim_start_matches("t=").parse().expect("timestamp");
                    assert_eq!(
                        v1,
                        meridian_agent::webhooks::sign("0123456789abcdef-secret", ts, &body),
                        "valid HMAC"
                    );
                    if rx.refuse_first.load(Ordering::SeqCst) > 0 {
                        rx.refuse_first.fetch_sub(1, Ordering::SeqCst);
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    rx.accepted
                        .lock()
                        .unwrap()
                        .push(serde_json::from_str(&body).expect("json body"));
                    StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let (ctx, r) = branch().await;
    let mut config = site_config();
    config.webhooks[0].url = url;
    ctx.config.send_replace(Some(Arc::new(config)));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let settings = meridian_agent::webhooks::WebhookSettings {
        backoff: meridian_shared::backoff::BackoffPolicy {
            base: std::time::Duration::from_millis(20),
            cap: std::time::Duration::from_millis(100),
        },
        timeout: std::time::Duration::from_secs(5),
    };
    tokio::spawn(meridian_agent::webhooks::run(ctx.clone(), settings, shutdown.clone()));
    // The webhook starts at the events recorded from now on; wait for its cursor.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let n: i64 = ctx
            .db
            .read(|c| Ok(c.query_row("SELECT COUNT(*) FROM webhook_cursors", [], |r| r.get(0))?))
            .await
            .expect("cursor");
        if n == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the webhook never started");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    ok(&r, Method::POST, "/api/v1/service-points/C1/open", None).await;
    // A webhook is a local integration: it receives the customer fields the controller does not.
    ok(&r, Method::POST, "/api/v1/visits", Some(json!({"service": "GEN", "customer": ada()})))
        .await;
    for _ in 0..2 {
        ok(&r, Method::POST, "/api/v1/visits", Some(json!({"service": "GEN"}))).await;
    }
    ok(&r, Method::POST, "/api/v1/service-points/C1/call-next", None).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while receiver.accepted.lock().unwrap().len() < 4 {
        assert!(tokio::time::Instant::now() < deadline, "webhook deliveries did not arrive");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    let accepted = receiver.accepted.lock().unwrap().clone();
    let kinds: Vec<&str> =
        accepted.iter().map(|v| v["kind"].as_str().unwrap_or_default()).collect();
    assert_eq!(
        kinds,
        ["VISIT_CREATED", "VISIT_CREATED", "VISIT_CREATED", "VISIT_CALLED"],
        "filtered by kind, in order"
    );
    assert_eq!(accepted[0]["payload"]["customer"], ada(), "{}", accepted[0]);
    assert!(accepted[1]["payload"].get("customer").is_none(), "{}", accepted[1]);
    let seqs: Vec<u64> = accepted.iter().map(|v| v["seq"].as_u64().unwrap_or_default()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    let attempts = receiver.attempts.lock().unwrap().clone();
    assert_eq!(
        &attempts[..3],
        [attempts[0].clone(), attempts[0].clone(), attempts[0].clone()],
        "the first event was retried until accepted"
    );
    assert_eq!(attempts.len(), 6, "each later event delivered once: {attempts:?}");
}

/// Service requests through the connector API: created against their type with a human id of
/// the site, read by id or human id, edited with optimistic concurrency; every bad input a
/// typed 4xx that changes nothing; one outbox event per change.
#[tokio::test]
async fn service_requests_are_created_and_edited_through_the_connector_api() {
    let (ctx, r) = branch().await;
    let before = outbox_kinds(&ctx).await.len();
    let made = ok(
        &r,
        Method::POST,
        "/api/v1/requests",
        Some(json!({"type": "REPAIR", "fields": {"summary": "Wobbly leg", "category": "chair"}})),
    )
    .await;
    assert_eq!(made["human_id"], "SFO-000001");
    assert_eq!(made["fields"]["pieces"], 1);
    assert_eq!(made["distribution"]["master"], true);
    assert_eq!(made["distribution"]["current_site"], "SFO");
    let id = made["id"].as_str().expect("id").to_owned();
    assert_eq!(ok(&r, Method::GET, "/api/v1/requests/SFO-000001", None).await["id"], id.as_str());
    let changed = ok(
        &r,
        Method::PATCH,
        &format!("/api/v1/requests/{id}"),
        Some(json!({"fields": {"category": "table"}, "expected_revision": 1})),
    )
    .await;
    assert_eq!(
        (changed["revision"].as_u64(), changed["fields"]["category"].as_str()),
        (Some(2), Some("table"))
    );

    let refusals = [
        (Method::POST, "/api/v1/requests".to_owned(), json!({"type": "NOPE"}), 422, "type"),
        (
            Method::POST,
            "/api/v1/requests".to_owned(),
            json!({"type": "REPAIR", "fields": {"summary": "x", "category": "sofa", "colour": 1}}),
            422,
            "fields.category",
        ),
        (
            Method::PATCH,
            format!("/api/v1/requests/{id}"),
            json!({"fields": {"category": "chair"}, "expected_revision": 1}),
            409,
            "",
        ),
        (
            Method::PATCH,
            format!("/api/v1/requests/{id}"),
            json!({"fields": {"summary": null}}),
            422,
            "fields.summary",
        ),
        (
            Method::PATCH,
            "/api/v1/requests/SFO-000099".to_owned(),
            json!({"fields": {"pieces": 2}}),
            404,
            "",
        ),
        (
            Method::POST,
            "/api/v1/requests".to_owned(),
            json!({"type": "REPAIR", "extra": true}),
            422,
            "",
        ),
    ];
    for (method, path, body, status, field) in refusals {
        let (got, v) = call(&r, method.clone(), &path, Some(body.clone())).await;
        assert_eq!(got.as_u16(), status, "{method} {path} {body}: {v}");
        if !field.is_empty() {
            let fields: Vec<&str> = v["details"]
                .as_array()
                .expect("details")
                .iter()
                .filter_map(|d| d["field"].as_str())
                .collect();
            assert!(fields.contains(&field), "{v}");
        }
    }
    let (status, _) = call(&r, Method::GET, "/api/v1/requests/SFO-000099", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let listed = ok(&r, Method::GET, "/api/v1/requests?type=REPAIR", None).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    let (status, _) = call(&r, Method::GET, "/api/v1/requests?limit=0", None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let kinds = outbox_kinds(&ctx).await;
    assert_eq!(kinds[before..], ["REQUEST_CREATED", "REQUEST_UPDATED"]);
}

#[tokio::test]
async fn the_openapi_document_describes_routes_that_exist() {
    let (_ctx, r) = branch().await;
    let (status, doc) = call_as(&r, None, Method::GET, "/api/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    assert_eq!(
        paths.values().map(|p| p.as_object().expect("ops").len()).sum::<usize>(),
        meridian_agent::openapi::OPERATIONS.len()
    );
    for (method, path, ..) in meridian_agent::openapi::OPERATIONS {
        if *path == "/api/v1/events" {
            continue; // a stream; exercised by the feed test
        }
        let concrete = path.replace("{id}", "no-such-visit").replace("{code}", "C1");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
        let (status, v) = call(&r, method.clone(), &concrete, None).await;
        let unrouted = status == StatusCode::METHOD_NOT_ALLOWED
            || (status == StatusCode::NOT_FOUND && v["message"] == "no such endpoint");
        assert!(!unrouted, "{method} {path} is documented but not routed ({status}: {v})");
    }
}

#[tokio::test]
async fn a_configuration_change_applies_live_without_emptying_queues_or_logging_staff_out() {
    let (ctx, r) = branch().await;
    let token = log_in_alice(&r).await;
    ok(&r, Method::POST, "/api/v1/service-points/C1/open", Some(json!({"staff": "alice"}))).await;
    for _ in 0..3 {
        ok(&r, Method::POST, "/api/v1/visits", Some(json!({"service": "GEN"}))).await;
    }
    let called = ok(&r, Method::POST, "/api/v1/service-points/C1/call-next", None).await;

    // A new revision renames a queue and adds a service, applied the way the link applies it.
    let mut next = site_config();
    next.revision = 2;
    next.queues[0].name = "General enquiries".into();
    next.services.push(
        serde_json::from_value(json!(
            {"site": "SFO", "code": "NEW", "name": "New service", "queue": "general"}
        ))
        .expect("service"),
    );
    let applied = next.clone();
    let now = ctx.clock.now();
    assert!(ctx.db.write(move |c| queries::apply_config(c, &applied, now)).await.expect("apply"));
    ctx.config.send_replace(Some(Arc::new(next)));

    let (status, _) = call_as(&r, Some(&token), Method::GET, "/api/v1/visits", None).await;
    assert_eq!(status, StatusCode::OK, "the staff session survived the change");
    let waiting = ok(&r, Method::GET, "/api/v1/visits?status=waiting", None).await;
    assert_eq!(waiting.as_array().expect("list").len(), 2, "the queue was not emptied");
    let points = ok(&r, Method::GET, "/api/v1/service-points", None).await;
    assert_eq!(points[0]["staff"], "alice", "the counter keeps its staff");
    assert_eq!(
        points[0]["current"]["id"], called["id"],
        "the called visit is still at the counter"
    );
    let queues = ok(&r, Method::GET, "/api/v1/queues", None).await;
    assert_eq!(queues[0]["name"], "General enquiries");
    let new = ok(&r, Method::POST, "/api/v1/visits", Some(json!({"service": "NEW"}))).await;
    assert_eq!(new["ticket"], "A004", "numbering continues in the same queue and day");
}

/// Customer fields used by the personal-data tests; every value is distinctive, so finding
/// any of them in a serialized payload means it leaked.
fn ada() -> Value {
    json!({"name": "Ada Quixotica Lovelace", "phone": "+1 415 555 0199",
           "email": "ada.quixotica@example.org", "note": "prefers the step-free entrance"})
}

/// The `VISIT_CREATED` payloads in the outbox (what the link streams to the controller), as
/// raw text, oldest first.
async fn created_payloads(ctx: &Context) -> Vec<String> {
    ctx.db
        .read(|c| {
            Ok(queries::outbox_after(c, 0, 10_000)?
                .into_iter()
                .filter(|e| e.kind == "VISIT_CREATED")
                .map(|e| String::from_utf8(e.payload).expect("utf8 payload"))
                .collect())
        })
        .await
        .expect("outbox")
}

/// Applies the next revision of the test configuration with `share_customer_data` set, the
/// way the link applies a snapshot.
async fn share_customer_data(ctx: &Context, share: bool) {
    let mut next = site_config();
    next.revision = ctx.site_config().expect("config").revision + 1;
    next.site.share_customer_data = share;
    let applied = next.clone();
    let now = ctx.clock.now();
    assert!(ctx.db.write(move |c| queries::apply_config(c, &applied, now)).await.expect("apply"));
    ctx.config.send_replace(Some(Arc::new(next)));
}

#[tokio::test]
async fn customer_fields_stay_at_the_site_unless_its_configuration_shares_them() {
    let (ctx, r) = branch().await;
    let customer = ada();
    let secrets: Vec<String> = customer
        .as_object()
        .expect("object")
        .values()
        .map(|v| v.as_str().expect("text").to_owned())
        .collect();

    // Not shared (the default): the visit keeps its customer fields at the branch...
    let kept = ok(
        &r,
        Method::POST,
        "/api/v1/visits",
        Some(json!({"service": "GEN", "customer": customer})),
    )
    .await;
    assert_eq!(kept["customer"], customer, "{kept}");
    let id = kept["id"].as_str().expect("id").to_owned();
    assert_eq!(ok(&r, Method::GET, &format!("/api/v1/visits/{id}"), None).await["customer"], ada());
    // ...but the event queued for the controller carries none of them.
    let payloads = created_payloads(&ctx).await;
    assert_eq!(payloads.len(), 1);
    let event: Value = serde_json::from_str(&payloads[0]).expect("payload");
    assert_eq!(event["visit_id"], kept["id"]);
    assert!(event.get("customer").is_none(), "{event}");
    for secret in &secrets {
        assert!(!payloads[0].contains(secret.as_str()), "{secret:?} leaked into {}", payloads[0]);
    }
    // The site's own live feed is a local integration: it shows the customer.
    let feed = sse_events_with_data(&r, "/api/v1/events?after=0", None, 2).await;
    assert_eq!(feed[1].1, "VISIT_CREATED");
    assert_eq!(feed[1].2["payload"]["customer"], ada(), "{}", feed[1].2);

    // Shared: the event carries them. The rule is applied when the event is recorded, so the
    // earlier event stays as it was.
    share_customer_data(&ctx, true).await;
    let shared = ok(
        &r,
        Method::POST,
        "/api/v1/visits",
        Some(json!({"service": "ACC", "customer": {"name": "Grace Hopper", "email": ""}})),
    )
    .await;
    assert_eq!(shared["customer"], json!({"name": "Grace Hopper"}), "empty fields are dropped");
    let payloads = created_payloads(&ctx).await;
    assert_eq!(payloads.len(), 2);
    let event: Value = serde_json::from_str(&payloads[1]).expect("payload");
    assert_eq!(event["visit_id"], shared["id"]);
    assert_eq!(event["customer"], json!({"name": "Grace Hopper"}));
    assert!(!payloads[0].contains(secrets[0].as_str()), "recorded events are not rewritten");
    ok(&r, Method::POST, "/api/v1/service-points/C1/open", None).await;
    let walk_in = ok(
        &r,
        Method::POST,
        "/api/v1/service-points/C1/walk-direct",
        Some(json!({"service": "GEN", "customer": customer})),
    )
    .await;
    let payloads = created_payloads(&ctx).await;
    let event: Value = serde_json::from_str(&payloads[2]).expect("payload");
    assert_eq!((&event["visit_id"], &event["customer"]), (&walk_in["id"], &ada()));

    // Sharing switched off again: back to nothing.
    share_customer_data(&ctx, false).await;
    ok(&r, Method::POST, "/api/v1/visits", Some(json!({"service": "GEN", "customer": customer})))
        .await;
    let payloads = created_payloads(&ctx).await;
    assert_eq!(payloads.len(), 4);
    assert!(!payloads[3].contains("customer") && !payloads[3].contains(secrets[0].as_str()));
    // A visit without customer fields shows none.
    let plain = ok(&r, Method::POST, "/api/v1/visits", Some(json!({"service": "GEN"}))).await;
    assert!(plain.get("customer").is_none(), "{plain}");
}

#[tokio::test]
async fn bad_customer_fields_are_refused_field_by_field_and_create_nothing() {
    let (ctx, r) = branch().await;
    ok(&r, Method::POST, "/api/v1/service-points/C1/open", None).await;
    let before = outbox_kinds(&ctx).await;
    let long_name = "x".repeat(meridian_shared::customer::MAX_CUSTOMER_NAME + 1);
    let cases: Vec<(&str, Value, &str, &[&str])> = vec![
        (
            "/api/v1/visits",
            json!({"service": "GEN", "customer": {"name": long_name, "email": "ada@"}}),
            "validation_failed",
            &["customer.name", "customer.email"],
        ),
        (
            "/api/v1/visits",
            json!({"service": "GEN", "customer": {"email": "not an address"}}),
            "validation_failed",
            &["customer.email"],
        ),
        (
            "/api/v1/service-points/C1/walk-direct",
            json!({"service": "GEN", "customer": {"note": "n".repeat(501)}}),
            "validation_failed",
            &["customer.note"],
        ),
        (
            "/api/v1/visits",
            json!({"service": "GEN", "customer": {"name": "Ada", "birthday": "1815-12-10"}}),
            "invalid_body",
            &[],
        ),
        ("/api/v1/visits", json!({"service": "GEN", "customer": "Ada"}), "invalid_body", &[]),
    ];
    for (path, body, code, fields) in cases {
        let (status, v) = call(&r, Method::POST, path, Some(body.clone())).await;
        assert_eq!((status, v["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some(code)));
        let got: Vec<&str> = v["details"]
            .as_array()
            .map(|d| d.iter().map(|e| e["field"].as_str().expect("field")).collect())
            .unwrap_or_default();
        assert_eq!(got, fields, "{body}: {v}");
        assert!(v["message"].is_string());
    }
    assert_eq!(outbox_kinds(&ctx).await, before, "no event recorded");
    for status in ["waiting", "serving"] {
        let listed = ok(&r, Method::GET, &format!("/api/v1/visits?status={status}"), None).await;
        assert_eq!(listed, json!([]), "no visit created");
    }
}

/// The `name=value` pairs a response sets as cookies.
fn set_cookies(resp: &axum::response::Response) -> String {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next().map(str::to_owned))
        .collect::<Vec<_>>()
        .join("; ")
}

#[tokio::test]
async fn the_workstation_shows_staff_the_current_customers_name_and_the_display_does_not() {
    let (ctx, r) = branch().await;
    let terminals = meridian_agent::terminals::router(ctx.clone());
    ok(&r, Method::POST, "/api/v1/visits", Some(json!({"service": "ACC", "customer": ada()})))
        .await;
    let form = |path: &str, cookies: &str, body: &str| {
        Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("cookie", cookies)
            .body(Body::from(body.to_owned()))
            .expect("request")
    };
    let login = terminals
        .clone()
        .oneshot(form("/workstation/login", "", "username=alice&password=correct+horse&counter=C1"))
        .await
        .expect("login");
    assert_eq!(login.status(), StatusCode::SEE_OTHER);
    let cookies = set_cookies(&login);
    let page = |cookies: String| {
        let terminals = terminals.clone();
        async move {
            let req = Request::builder().uri("/workstation").header("cookie", cookies);
            let resp = terminals.oneshot(req.body(Body::empty()).expect("request")).await;
            let body = axum::body::to_bytes(resp.expect("page").into_body(), 1 << 20).await;
            String::from_utf8(body.expect("body").to_vec()).expect("html")
        }
    };
    assert!(!page(cookies.clone()).await.contains("Ada Quixotica"), "nobody called yet");
    let called = terminals
        .clone()
        .oneshot(form("/workstation/action", &cookies, "action=call-next"))
        .await
        .expect("call next");
    assert_eq!(called.headers()["location"], "/workstation", "called without a message");
    let html = page(cookies).await;
    assert!(
        html.contains(r#"id="current-customer-name">Ada Quixotica Lovelace<"#),
        "the name is shown: {html}"
    );
    assert!(html.contains("prefers the step-free entrance"), "and the note");
    // The public "now serving" display shows tickets, never names.
    let board = terminals
        .oneshot(Request::builder().uri("/display/board").body(Body::empty()).expect("request"))
        .await
        .expect("board");
    let board = axum::body::to_bytes(board.into_body(), 1 << 20).await.expect("body");
    let board = String::from_utf8(board.to_vec()).expect("html");
    assert!(board.contains("B001") && !board.contains("Ada"), "{board}");
}

#[tokio::test]
async fn the_branch_lists_a_days_synced_appointments_and_refuses_a_bad_date() {
    use meridian_shared::appointments::AppointmentSnapshot;
    let (ctx, r) = branch().await;
    let tz: chrono_tz::Tz = "America/Los_Angeles".parse().expect("zone");
    let today = meridian_shared::business_day::business_day(tz, ctx.clock.now());
    let tomorrow = today.succ_opt().expect("tomorrow");
    let snapshot = |day: chrono::NaiveDate, hour: u32, name: &str, revision: u64| {
        serde_json::from_value::<AppointmentSnapshot>(json!({
            "id": uuid::Uuid::now_v7().to_string(), "site": "SFO", "service": "ACC",
            "queue": "accounts", "start": format!("{day}T{hour:02}:00"),
            "starts_at": format!("{day}T{:02}:00:00Z", hour + 8), "local_day": day.to_string(),
            "duration_minutes": 15, "customer_name": name, "status": "booked",
            "revision": revision, "updated_at": "2026-03-09T15:00:00Z"}))
        .expect("snapshot")
    };
    // Applied the way the link applies an APPOINTMENT_UPSERT; later first, to check the order.
    let snaps = [
        snapshot(today, 15, "Bo", 2),
        snapshot(today, 9, "Ann", 1),
        snapshot(tomorrow, 9, "Cy", 1),
    ];
    let now = ctx.clock.now();
    ctx.db
        .write(move |c| {
            for s in &snaps {
                assert!(meridian_agent::appointments::apply(c, s, now)?);
            }
            Ok(())
        })
        .await
        .expect("apply");

    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .expect("list")
            .iter()
            .map(|a| a["customer_name"].as_str().expect("name").to_owned())
            .collect()
    };
    let listed = ok(&r, Method::GET, "/api/v1/appointments", None).await;
    assert_eq!(names(&listed), ["Ann", "Bo"], "today's, by start");
    assert_eq!(listed[0]["queue"], "accounts");
    assert_eq!(listed[1]["revision"], 2);
    let other = ok(&r, Method::GET, &format!("/api/v1/appointments?date={tomorrow}"), None).await;
    assert_eq!(names(&other), ["Cy"]);

    let (status, err) = call(&r, Method::GET, "/api/v1/appointments?date=31.12.2026", None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(err["details"][0]["field"], "date");
    let (status, _) = call_as(&r, None, Method::GET, "/api/v1/appointments", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the connector API needs a key");
}

/// Every documented operation × who calls it: no credential is refused (except the public
/// ones), a plain staff session is refused exactly the supervisor operations, a supervisor and a
/// connector key are refused none.
#[tokio::test]
async fn every_operation_admits_exactly_the_roles_the_document_gives_it() {
    let (ctx, r) = branch().await;
    let staff = log_in_alice(&r).await;
    let supervisor = {
        let mut config = site_config();
        let mut sam = config.staff[0].clone();
        sam.username = meridian_shared::Code::parse("sam").expect("code");
        sam.roles = vec![meridian_shared::config::StaffRole::Supervisor];
        config.staff.push(sam);
        config.revision += 1;
        let applied = config.clone();
        let now = ctx.clock.now();
        ctx.db.write(move |c| queries::apply_config(c, &applied, now)).await.expect("apply");
        ctx.config.send_replace(Some(Arc::new(config)));
        let (status, session) = call_as(
            &r,
            None,
            Method::POST,
            "/api/v1/sessions",
            Some(json!({"username": "sam", "password": PASSWORD})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{session}");
        session["token"].as_str().expect("token").to_owned()
    };
    let public = ["/api/v1/status", "/api/v1/sessions", "/api/v1/openapi.json"];
    for (method, path, ..) in meridian_agent::openapi::OPERATIONS {
        if *path == "/api/v1/events" || *path == "/api/v1/sessions/current" {
            continue; // a live feed that never ends, and sign-out (both checked elsewhere)
        }
        let concrete = path
            .replace("{id}", "00000000-0000-0000-0000-000000000000")
            .replace("{code}", "C1")
            .replace("{subject}", "user")
            .replace("{name}", "nobody");
        let method: Method = method.to_uppercase().parse().expect("method");
        let body = matches!(method, Method::POST | Method::PATCH).then(|| json!({}));
        let supervising = meridian_agent::openapi::SUPERVISOR_ONLY
            .contains(&(method.as_str().to_lowercase().as_str(), path));
        let (status, v) = call_as(&r, None, method.clone(), &concrete, body.clone()).await;
        if !public.contains(path) {
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} without credentials: {v}"
            );
        }
        let (status, v) = call_as(&r, Some(&staff), method.clone(), &concrete, body.clone()).await;
        if supervising {
            assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path} as plain staff: {v}");
            assert_eq!(v["code"], "forbidden");
        } else {
            assert_ne!(status, StatusCode::FORBIDDEN, "{method} {path} as plain staff: {v}");
            assert_ne!(status, StatusCode::UNAUTHORIZED, "{method} {path} as plain staff: {v}");
        }
        for who in [supervisor.as_str(), KEY] {
            let (status, v) = call_as(&r, Some(who), method.clone(), &concrete, body.clone()).await;
            assert!(
                status != StatusCode::FORBIDDEN && status != StatusCode::UNAUTHORIZED,
                "{method} {path} as a supervisor or connector: {status} {v}"
            );
        }
    }
}
