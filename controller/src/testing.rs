//! Helpers for tests of the controller and of the whole system: fresh PostgreSQL databases and
//! SQLite files. A test that needs PostgreSQL fails loudly when it cannot reach it; `make test`
//! provisions the server.

use std::path::PathBuf;

use sqlx::Connection;

/// The server tests use: `MERIDIAN_TEST_DATABASE_URL`, else the local cluster on 127.0.0.1.
pub fn postgres_admin_url() -> String {
    std::env::var("MERIDIAN_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Creates an empty database `meridian_t_<random>` and returns its URL. Panics with a clear
/// message when PostgreSQL is unreachable.
pub async fn fresh_postgres_url() -> String {
    let admin = postgres_admin_url();
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is required for this test and is not reachable at {admin}: {e}. \
             Run the tests with `make test`, which starts or installs it, or set \
             MERIDIAN_TEST_DATABASE_URL."
        )
    });
    let name = format!("meridian_t_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
    let (base, _) = admin.rsplit_once('/').unwrap_or((admin.as_str(), ""));
    format!("{base}/{name}")
}

/// A fresh, empty directory under the system temp dir.
pub fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// A fresh SQLite database URL in a temp dir.
pub fn fresh_sqlite_url() -> String {
    format!("sqlite://{}/controller.db", temp_dir("meridian-sqlite").display())
}

/// One visit's events for tests: created at `created_at` in queue `general` (service `GEN`)
/// at counter `C1` by `alice`, then each `(kind, minutes after creation, outcome, service ms)`.
pub fn visit_events(
    visit: meridian_shared::VisitId,
    created_at: chrono::DateTime<chrono::Utc>,
    steps: &[(
        meridian_shared::events::VisitEventKind,
        i64,
        Option<meridian_shared::visits::Outcome>,
        Option<i64>,
    )],
) -> Vec<meridian_shared::events::AgentEvent> {
    use meridian_shared::Code;
    use meridian_shared::events::{AgentEvent, VisitChanged, VisitCreated};
    let code = |s: &str| Code::parse(s).unwrap_or_else(|e| panic!("test code {s}: {e}"));
    let mut events = vec![AgentEvent::VisitCreated(VisitCreated {
        visit_id: visit,
        ticket: "A001".into(),
        service: code("GEN"),
        queue: code("general"),
        business_day: created_at.date_naive(),
        created_at,
        customer: None,
    })];
    for (kind, minutes, outcome, service_ms) in steps {
        events.push(AgentEvent::Visit(
            *kind,
            VisitChanged {
                visit_id: visit,
                ticket: "A001".into(),
                service: code("GEN"),
                queue: code("general"),
                business_day: created_at.date_naive(),
                counter: Some(code("C1")),
                staff: Some(code("alice")),
                to: None,
                outcome: *outcome,
                at: created_at + chrono::Duration::minutes(*minutes),
                waiting_ms: None,
                service_ms: *service_ms,
                recalls: 0,
                marks: vec![],
            },
        ));
    }
    events
}

/// `events` as the gateway would hand them to the store, numbered from `first_seq`.
pub fn incoming(
    events: &[meridian_shared::events::AgentEvent],
    first_seq: u64,
    occurred_at: chrono::DateTime<chrono::Utc>,
) -> Vec<crate::store::IncomingEvent> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| crate::store::IncomingEvent {
            seq: first_seq + i as u64,
            kind: e.kind().into(),
            occurred_at,
            payload: String::from_utf8(e.payload()).unwrap_or_default(),
            quarantine: None,
        })
        .collect()
}

/// Enrolls an agent for `site` (already configured) directly through the store, as the gateway
/// would after a valid enrollment token: for tests that feed events without a real agent.
pub async fn enroll_agent(
    store: &dyn crate::store::Store,
    site: &str,
) -> crate::error::Result<crate::store::AgentRecord> {
    use chrono::{Duration, Utc};
    let code = meridian_shared::SiteCode::parse(site)?;
    let token_hash = format!("test-token-{site}-{}", uuid::Uuid::new_v4());
    store
        .insert_enrollment_token(&crate::store::EnrollmentToken {
            id: token_hash.clone(),
            site: code.clone(),
            token_hash: token_hash.clone(),
            created_at: Utc::now(),
            expires_at: Utc::now() + Duration::hours(1),
            used_at: None,
            used_by_agent: None,
        })
        .await?;
    let (revision, payload) = crate::config_admin::current_snapshot(store, &code)
        .await?
        .ok_or_else(|| crate::error::Error::Internal(format!("site {site} is not configured")))?;
    store
        .enroll(crate::store::Enrollment {
            token_hash,
            agent_id: meridian_shared::AgentId::new(),
            credential_hash: format!("test-credential-{}", uuid::Uuid::new_v4()),
            hostname: site.to_owned(),
            version: "test".into(),
            expected_revision: revision,
            initial_config: payload,
            sync_appointments: false,
            at: Utc::now(),
        })
        .await
}

/// Sends one request with bearer `token` (and `body` as JSON) through an in-process `router`;
/// answers the status and the body as JSON (a string when it is not JSON).
pub async fn call_router(
    router: &axum::Router,
    method: axum::http::Method,
    path: &str,
    token: &str,
    body: Option<serde_json::Value>,
) -> (axum::http::StatusCode, serde_json::Value) {
    use axum::body::Body;
    use axum::http::{Request, header};
    use tower::ServiceExt;
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"));
    let body = match body {
        Some(v) => {
            req = req.header(header::CONTENT_TYPE, "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let resp = router.clone().oneshot(req.body(body).expect("request")).await.expect("response");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22).await.expect("body");
    let v = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
    });
    (status, v)
}

/// A console session opened through the sign-in form, as a browser opens one: the cookie to
/// send and the CSRF token the session's forms carry.
#[derive(Debug, Clone)]
pub struct ConsoleSignIn {
    /// `meridian_console=…`, for a `Cookie` header.
    pub cookie: String,
    pub csrf: String,
}

impl ConsoleSignIn {
    /// A `GET` of `path` in this session.
    pub fn get(&self, path: &str) -> axum::http::Request<axum::body::Body> {
        axum::http::Request::get(path)
            .header(axum::http::header::COOKIE, &self.cookie)
            .body(axum::body::Body::empty())
            .expect("request")
    }

    /// A form post of `fields` (URL-encoded, without the CSRF token, which is added) to
    /// `path` in this session.
    pub fn post(&self, path: &str, fields: &str) -> axum::http::Request<axum::body::Body> {
        let body = if fields.is_empty() {
            format!("csrf={}", self.csrf)
        } else {
            format!("{fields}&csrf={}", self.csrf)
        };
        axum::http::Request::post(path)
            .header(axum::http::header::COOKIE, &self.cookie)
            .header(axum::http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(axum::body::Body::from(body))
            .expect("request")
    }
}

/// The value of the first hidden field `name` in a page.
pub fn hidden_field(html: &str, name: &str) -> Option<String> {
    let start = html.find(&format!("name=\"{name}\" value=\""))? + name.len() + 15;
    html[start..].split('"').next().map(str::to_owned)
}

/// `name=value` of the cookie `name` a response sets.
pub fn set_cookie(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next())
        .find(|c| c.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

/// Signs in to the console through an in-process `router` (one that includes
/// `console::router`) with the API token `token`, the way a browser does: the sign-in page,
/// its form posted back with the one-time value, the fleet page for the session's CSRF token.
pub async fn console_sign_in(router: &axum::Router, token: &str) -> ConsoleSignIn {
    use axum::body::Body;
    use axum::http::{Request, StatusCode, header};
    use tower::ServiceExt;
    let body = |resp: axum::response::Response| async move {
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22).await.expect("body");
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let page = router
        .clone()
        .oneshot(Request::get("/console/login").body(Body::empty()).expect("request"))
        .await
        .expect("sign-in page");
    let login_cookie = set_cookie(page.headers(), "meridian_console_login").expect("login cookie");
    let nonce = hidden_field(&body(page).await, "csrf").expect("the form's one-time value");
    let req = Request::post("/console/login")
        .header(header::COOKIE, login_cookie)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!("token={token}&csrf={nonce}")))
        .expect("request");
    let resp = router.clone().oneshot(req).await.expect("sign in");
    assert_eq!(resp.status(), StatusCode::SEE_OTHER, "signing in with {token:.12}…");
    let cookie = set_cookie(resp.headers(), "meridian_console").expect("session cookie");
    let fleet = router
        .clone()
        .oneshot(
            Request::get("/console")
                .header(header::COOKIE, &cookie)
                .body(Body::empty())
                .expect("r"),
        )
        .await
        .expect("fleet page");
    let csrf = hidden_field(&body(fleet).await, "csrf").expect("the session's CSRF token");
    ConsoleSignIn { cookie, csrf }
}
