//! A viewer token reads no secret and no secret's hash, on any route that answers it: every
//! readable route of the admin API (resources, the export, revisions, tokens, agents, reports)
//! and every console page is checked against every secret and hash the controller holds
//! (connector keys, webhook secrets, staff password hashes, API, enrollment and agent
//! credential hashes). An admin reads connector `key_hash` (it tells keys apart), never a
//! password hash or a webhook secret.

use std::sync::Arc;

use axum::Router;
use axum::http::{Method, StatusCode};
use meridian_controller::api::{self, ApiState};
use meridian_controller::auth;
use meridian_controller::config_admin;
use meridian_controller::metrics::Metrics;
use meridian_controller::store::{self, Enrollment, Role, Store};
use meridian_controller::testing::{self, call_router, console_sign_in};
use meridian_shared::{AgentId, SiteCode};
use serde_json::{Value, json};
use tower::ServiceExt;

struct Fixture {
    store: Arc<dyn Store>,
    router: Router,
    admin: String,
    viewer: String,
}

async fn fixture() -> Fixture {
    let store = store::open(&testing::fresh_sqlite_url()).await.expect("store");
    let admin = meridian_controller::server::ensure_bootstrap_token(store.as_ref(), None)
        .await
        .expect("token")
        .expect("first token");
    let (token, viewer) = api::new_api_token("dashboard", Role::Viewer);
    store.insert_api_token(&token).await.expect("viewer token");
    let state = ApiState {
        store: store.clone(),
        metrics: Arc::new(Metrics::default()),
        commands_changed: Arc::new(tokio::sync::watch::channel(0).0),
        clock_skew_tolerance: meridian_controller::Settings::default().clock_skew_tolerance(),
    };
    let router =
        api::router(state.clone(), 1 << 20).merge(meridian_controller::console::router(state));
    Fixture { store, router, admin, viewer }
}

impl Fixture {
    async fn call(&self, token: &str, method: Method, path: &str, body: Option<Value>) -> Value {
        let (status, v) = call_router(&self.router, method, path, token, body).await;
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    /// Every secret and hash the controller holds now.
    async fn secrets(&self, shown_once: &[String]) -> Vec<String> {
        let mut all: Vec<String> = shown_once.to_vec();
        let (_, resources) = self.store.load_config().await.expect("config");
        for r in resources {
            let v = serde_json::to_value(&r).expect("json");
            for field in ["key_hash", "password_hash", "secret"] {
                if let Some(s) = v.get(field).and_then(Value::as_str) {
                    all.push(s.to_owned());
                }
            }
        }
        for t in self.store.list_api_tokens().await.expect("tokens") {
            all.push(t.token_hash);
        }
        for t in self.store.list_enrollment_tokens().await.expect("enrollment tokens") {
            all.push(t.token_hash);
        }
        for a in self.store.list_agents().await.expect("agents") {
            all.push(a.credential_hash);
        }
        all.sort();
        all.dedup();
        all
    }
}

#[tokio::test]
async fn a_viewer_reads_no_secret_or_hash_on_any_route() {
    let f = fixture().await;
    let admin = f.admin.clone();
    let site = json!({"code": "SFO", "name": "San Francisco", "time_zone": "America/Los_Angeles"});
    f.call(&admin, Method::POST, "/api/v1/sites", Some(site)).await;
    let key = f
        .call(
            &admin,
            Method::POST,
            "/api/v1/sites/SFO/connector-keys",
            Some(json!({"code": "kiosk", "name": "Entrance kiosk"})),
        )
        .await;
    let key_secret = key["secret"].as_str().expect("generated secret").to_owned();
    let hook = json!({"code": "crm", "url": "https://crm.example.com/meridian", "secret": "a-long-shared-secret-0042"});
    f.call(&admin, Method::POST, "/api/v1/sites/SFO/webhooks", Some(hook)).await;
    let staff = json!({"username": "alice", "name": "Alice", "roles": ["staff"], "sites": ["SFO"],
                       "password": "correct horse battery"});
    f.call(&admin, Method::POST, "/api/v1/staff", Some(staff)).await;
    let enrollment = f
        .call(&admin, Method::POST, "/api/v1/enrollment-tokens", Some(json!({"site": "SFO"})))
        .await;
    let enrollment = enrollment["token"].as_str().expect("enrollment token").to_owned();
    // An agent enrolled with that token (its hash is not its id, unlike `testing::enroll_agent`).
    let sfo = SiteCode::parse("SFO").expect("site");
    let (revision, payload) = config_admin::current_snapshot(f.store.as_ref(), &sfo)
        .await
        .expect("snapshot")
        .expect("site exists");
    let agent = f
        .store
        .enroll(Enrollment {
            token_hash: auth::hash_secret(&enrollment),
            agent_id: AgentId::new(),
            credential_hash: auth::hash_secret(&auth::new_secret("mrd_ag_")),
            hostname: "branch".into(),
            version: "1.2.3".into(),
            expected_revision: revision,
            initial_config: payload,
            sync_appointments: false,
            at: chrono::Utc::now(),
        })
        .await
        .expect("enroll");
    let secrets = f
        .secrets(&[
            key_secret.clone(),
            enrollment.clone(),
            auth::hash_secret(&enrollment),
            admin.clone(),
            f.viewer.clone(),
        ])
        .await;
    // What the check looks for: a connector key hash, a webhook secret, a password hash, ...
    assert!(secrets.contains(&auth::hash_secret(&key_secret)), "{secrets:?}");
    assert!(secrets.contains(&"a-long-shared-secret-0042".to_owned()));
    assert!(secrets.iter().any(|s| s.starts_with("$argon2")), "{secrets:?}");
    assert!(secrets.contains(&agent.credential_hash));

    let id = agent.id.to_string();
    let routes = [
        "/api/v1/sites".to_owned(),
        "/api/v1/sites/SFO".into(),
        "/api/v1/sites/SFO/connector-keys".into(),
        "/api/v1/sites/SFO/connector-keys/kiosk".into(),
        "/api/v1/sites/SFO/webhooks".into(),
        "/api/v1/sites/SFO/webhooks/crm".into(),
        "/api/v1/sites/SFO/services".into(),
        "/api/v1/staff".into(),
        "/api/v1/staff/alice".into(),
        "/api/v1/request-types".into(),
        "/api/v1/config".into(),
        "/api/v1/config/revisions".into(),
        "/api/v1/enrollment-tokens".into(),
        "/api/v1/api-tokens".into(),
        "/api/v1/agents".into(),
        format!("/api/v1/agents/{id}"),
        "/api/v1/incidents".into(),
        "/api/v1/stats/live".into(),
        "/api/v1/stats/status".into(),
        "/api/v1/rollouts".into(),
        "/api/v1/releases".into(),
        "/api/v1/request-ops".into(),
    ];
    for path in &routes {
        let (status, body) = call_router(&f.router, Method::GET, path, &f.viewer, None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        let text = body.to_string();
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "{path} shows a viewer {secret:.12}…: {text}");
        }
        for field in api::redact::SECRET_FIELDS {
            assert!(!text.contains(&format!("\"{field}\"")), "{path} has {field}: {text}");
        }
    }

    // Admins tell connector keys apart by their hash; password hashes and webhook secrets
    // they never read either.
    let keys = f.call(&admin, Method::GET, "/api/v1/sites/SFO/connector-keys", None).await;
    assert_eq!(keys[0]["key_hash"], auth::hash_secret(&key_secret));
    let export = f.call(&admin, Method::GET, "/api/v1/config", None).await.to_string();
    assert!(!export.contains("password_hash") && !export.contains("a-long-shared-secret-0042"));

    // The console's pages, for the viewer.
    let session = console_sign_in(&f.router, &f.viewer).await;
    for path in [
        "/console",
        "/console/live",
        "/console/stats",
        "/console/quarantine",
        "/console/requests",
        "/console/rollouts",
    ] {
        let resp = f.router.clone().oneshot(session.get(path)).await.expect("page");
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let html = axum::body::to_bytes(resp.into_body(), 1 << 22).await.expect("body");
        let html = String::from_utf8_lossy(&html);
        for secret in &secrets {
            assert!(!html.contains(secret.as_str()), "{path} shows a viewer {secret:.12}…");
        }
    }
}
