//! The operations console's fleet view: sign-in with an API token, every site listed with its
//! agent's status (a clock alert beyond the skew tolerance), and no way in without a valid
//! token.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use chrono::Utc;
use meridian_controller::api::ApiState;
use meridian_controller::config_admin::{self, ChangeMode, ResourceInput};
use meridian_controller::metrics::Metrics;
use meridian_controller::store::{self, AgentStatusUpdate, Enrollment, EnrollmentToken, Store};
use meridian_controller::testing;
use meridian_shared::{AgentId, SiteCode};
use serde_json::json;
use tower::ServiceExt;

async fn console() -> (Arc<dyn Store>, Router, String) {
    let store =
        store::open(&meridian_controller::testing::fresh_sqlite_url()).await.expect("store");
    let token = meridian_controller::server::ensure_bootstrap_token(store.as_ref(), None)
        .await
        .expect("token")
        .expect("first token");
    let state = ApiState {
        store: store.clone(),
        metrics: Arc::new(Metrics::default()),
        commands_changed: Arc::new(tokio::sync::watch::channel(0).0),
        clock_skew_tolerance: meridian_controller::Settings::default().clock_skew_tolerance(),
    };
    (store, meridian_controller::console::router(state), token)
}

async fn get(
    router: &Router,
    path: &str,
    cookie: Option<&str>,
) -> (StatusCode, Option<String>, String) {
    let mut req = Request::builder().uri(path);
    if let Some(c) = cookie {
        req = req.header(header::COOKIE, c);
    }
    send(router, req.body(Body::empty()).expect("request")).await
}

async fn send(router: &Router, req: Request<Body>) -> (StatusCode, Option<String>, String) {
    let resp = router.clone().oneshot(req).await.expect("response");
    let status = resp.status();
    let location =
        resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let set_cookie =
        resp.headers().get(header::SET_COOKIE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
    // A redirect that sets a cookie reports the cookie; other redirects their target.
    (status, set_cookie.or(location), String::from_utf8_lossy(&body).into_owned())
}

/// Posts the sign-in form as a browser does (with the one-time value of the page it came from).
async fn login(router: &Router, token: &str) -> (StatusCode, Option<String>, String) {
    let page = router
        .clone()
        .oneshot(Request::get("/console/login").body(Body::empty()).expect("request"))
        .await
        .expect("sign-in page");
    let cookie = testing::set_cookie(page.headers(), "meridian_console_login").expect("cookie");
    let html = axum::body::to_bytes(page.into_body(), 1 << 20).await.expect("body");
    let nonce = testing::hidden_field(&String::from_utf8_lossy(&html), "csrf").expect("nonce");
    let req = Request::post("/console/login")
        .header(header::COOKIE, cookie)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!("token={token}&csrf={nonce}")))
        .expect("request");
    send(router, req).await
}

#[tokio::test]
async fn the_fleet_view_lists_every_site_with_its_agent_status_behind_sign_in() {
    let (store, router, token) = console().await;
    let resources = [
        json!({"kind": "site", "code": "SFO", "name": "San Francisco", "time_zone": "America/Los_Angeles"}),
        json!({"kind": "site", "code": "CHI", "name": "Chicago", "time_zone": "America/Chicago"}),
        json!({"kind": "site", "code": "TYO", "name": "Tokyo", "time_zone": "Asia/Tokyo"}),
    ];
    let inputs: Vec<ResourceInput> =
        resources.into_iter().map(|r| serde_json::from_value(r).expect("resource")).collect();
    config_admin::change(store.as_ref(), "test", inputs, vec![], ChangeMode::Upsert)
        .await
        .expect("sites");
    // SFO: connected, current, its clock 90 s ahead (within the tolerance); CHI: enrolled but
    // offline with a backlog, its clock a day ahead when last seen; TYO: no agent.
    for (site, connected, backlog, skew) in
        [("SFO", true, 0, 90_000), ("CHI", false, 42, 86_400_000)]
    {
        let now = Utc::now();
        store
            .insert_enrollment_token(&EnrollmentToken {
                id: format!("t-{site}"),
                site: SiteCode::parse(site).expect("site"),
                token_hash: format!("h-{site}"),
                created_at: now,
                expires_at: now + chrono::Duration::hours(1),
                used_at: None,
                used_by_agent: None,
            })
            .await
            .expect("token");
        let (revision, payload) =
            config_admin::current_snapshot(store.as_ref(), &SiteCode::parse(site).expect("site"))
                .await
                .expect("snapshot")
                .expect("site exists");
        let agent = store
            .enroll(Enrollment {
                token_hash: format!("h-{site}"),
                agent_id: AgentId::new(),
                credential_hash: format!("c-{site}"),
                hostname: "branch".into(),
                version: "1.2.3".into(),
                expected_revision: revision,
                initial_config: payload,
                sync_appointments: false,
                at: now,
            })
            .await
            .expect("enroll");
        let status = AgentStatusUpdate {
            connected,
            last_seen: Some(now - chrono::Duration::minutes(if connected { 0 } else { 10 })),
            config_revision: Some(if connected { revision } else { 0 }),
            outbox_pending: Some(backlog),
            clock_skew_ms: Some(skew),
            ..Default::default()
        };
        store.update_agent_status(agent.id, &status).await.expect("status");
    }

    // Not signed in: sent to the sign-in page; a wrong token is refused.
    let (status, location, _) = get(&router, "/console", None).await;
    assert_eq!((status, location.as_deref()), (StatusCode::SEE_OTHER, Some("/console/login")));
    let (status, _, body) = login(&router, "mrd_at_wrong").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("Unknown API token"));
    let (status, _, _) = get(&router, "/console", Some("meridian_console=mrd_at_wrong")).await;
    assert_eq!(status, StatusCode::SEE_OTHER);

    let (status, cookie, _) = login(&router, &token).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let cookie = cookie.expect("cookie");
    let cookie = cookie.split(';').next().expect("pair");
    assert!(cookie.starts_with("meridian_console="));
    // The cookie holds a session id, not the token (nor its hash).
    assert!(!cookie.contains(&token), "{cookie}");
    assert!(!cookie.contains(&meridian_controller::auth::hash_secret(&token)), "{cookie}");
    let (status, _, page) = get(&router, "/console", Some(cookie)).await;
    assert_eq!(status, StatusCode::OK);
    let row = |site: &str| {
        let start = page.find(&format!("data-site=\"{site}\"")).expect("site row");
        let end = page[start..].find("</tr>").map(|e| start + e).expect("row end");
        page[start..end].to_owned()
    };
    assert!(row("SFO").contains("connected") && row("SFO").contains("1.2.3"), "{}", row("SFO"));
    assert!(row("CHI").contains("offline") && row("CHI").contains("since"), "{}", row("CHI"));
    assert!(row("CHI").contains("behind") && row("CHI").contains(">42<"), "{}", row("CHI"));
    assert!(row("TYO").contains("no agent enrolled"), "{}", row("TYO"));
    assert!(
        row("SFO").contains("+90000 ms") && !row("SFO").contains("clock alert"),
        "{}",
        row("SFO")
    );
    assert!(
        row("CHI").contains("+86400000 ms") && row("CHI").contains("clock alert"),
        "{}",
        row("CHI")
    );
}
