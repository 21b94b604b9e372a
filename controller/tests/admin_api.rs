//! The admin API under bad input: every refusal is a 4xx with the typed JSON error body
//! (`{"code", "message"}`), never a 5xx, and none of them changes the configuration.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use meridian_controller::api::{self, ApiState};
use meridian_controller::metrics::Metrics;
use meridian_controller::server::ensure_bootstrap_token;
use meridian_controller::store::{Role, Store};
use serde_json::{Value, json};
use tower::ServiceExt;

/// The body limit the router under test is built with.
const LIMIT: usize = 4096;

struct Api {
    router: Router,
    admin: String,
    viewer: String,
}

#[derive(Clone, Copy, Debug)]
enum Token {
    None,
    Admin,
    Viewer,
    Wrong,
    /// An `Authorization` header with another scheme.
    Basic,
}

#[derive(Debug)]
enum In {
    Empty,
    Json(Value),
    /// Raw bytes with this content type (`None`: no content type).
    Raw(Option<&'static str>, Vec<u8>),
}

impl Api {
    async fn start() -> Self {
        let url = meridian_controller::testing::fresh_sqlite_url();
        let store: Arc<dyn Store> =
            meridian_controller::store::open(&url).await.expect("open store");
        let admin = ensure_bootstrap_token(store.as_ref(), None)
            .await
            .expect("bootstrap")
            .expect("fresh store");
        let (token, viewer) = api::new_api_token("dashboard", Role::Viewer);
        store.insert_api_token(&token).await.expect("viewer token");
        let state = ApiState {
            store,
            metrics: Arc::new(Metrics::default()),
            commands_changed: Arc::new(tokio::sync::watch::channel(0).0),
            clock_skew_tolerance: meridian_controller::Settings::default().clock_skew_tolerance(),
        };
        Api { router: api::router(state, LIMIT), admin, viewer }
    }

    /// Sends one request; returns the status and the body (JSON, or the raw text as a string).
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Token,
        body: In,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        match token {
            Token::None => {}
            Token::Admin => {
                req = req.header(header::AUTHORIZATION, format!("Bearer {}", self.admin))
            }
            Token::Viewer => {
                req = req.header(header::AUTHORIZATION, format!("Bearer {}", self.viewer))
            }
            Token::Wrong => {
                req = req.header(header::AUTHORIZATION, "Bearer mrd_at_0123456789abcdef")
            }
            Token::Basic => req = req.header(header::AUTHORIZATION, "Basic YWRtaW46YWRtaW4="),
        }
        let body = match body {
            In::Empty => Body::empty(),
            In::Json(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            In::Raw(content_type, bytes) => {
                if let Some(ct) = content_type {
                    req = req.header(header::CONTENT_TYPE, ct);
                }
                Body::from(bytes)
            }
        };
        let resp = self
            .router
            .clone()
            .oneshot(req.body(body).expect("request"))
            .await
            .expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("body");
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            Value::String(format!("NOT JSON: {}", String::from_utf8_lossy(&bytes)))
        });
        (status, value)
    }

    async fn config(&self) -> Value {
        let (status, body) =
            self.send(Method::GET, "/api/v1/config", Token::Admin, In::Empty).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }
}

/// One bad request: the expected status and error code, a never-5xx status, and the typed body.
async fn check(
    api: &Api,
    method: &str,
    path: &str,
    token: Token,
    body: In,
    expected_status: u16,
    expected_code: &str,
) {
    let what = format!("{method} {path} ({token:?}, {})", describe(&body));
    let method = Method::from_bytes(method.as_bytes()).expect("method");
    let (status, body) = api.send(method, path, token, body).await;
    assert!(!status.is_server_error(), "{what}: server error {status}: {body}");
    assert!(
        body.get("code").is_some_and(Value::is_string)
            && body.get("message").is_some_and(Value::is_string),
        "{what}: {status}: the body is not an API error: {body}"
    );
    assert_eq!(
        (status.as_u16(), body["code"].as_str().unwrap_or_default()),
        (expected_status, expected_code),
        "{what}: {body}"
    );
    if let Some(details) = body.get("details") {
        let ok = details.as_array().is_some_and(|d| {
            d.iter().all(|e| {
                e.get("field").is_some_and(Value::is_string)
                    && e.get("message").is_some_and(Value::is_string)
            })
        });
        assert!(ok, "{what}: details must be [{{field, message}}]: {body}");
    }
}

fn describe(body: &In) -> String {
    let s = match body {
        In::Empty => "no body".to_owned(),
        In::Json(v) => v.to_string(),
        In::Raw(ct, bytes) => format!("{ct:?}, {} bytes", bytes.len()),
    };
    s.chars().take(120).collect()
}

fn site(code: &str, hours: Value) -> Value {
    json!({"code": code, "name": format!("Site {code}"), "time_zone": "America/Los_Angeles",
           "business_hours": hours})
}

fn json_text(s: &str) -> In {
    In::Raw(Some("application/json"), s.as_bytes().to_vec())
}

#[tokio::test]
async fn bad_requests_are_refused_with_typed_errors_and_change_nothing() {
    let api = Api::start().await;
    let seed = json!({"resources": [
        {"kind": "site", "code": "SFO", "name": "San Francisco", "time_zone": "America/Los_Angeles",
         "business_hours": {"mon": ["09:00-17:00"]}},
        {"kind": "queue", "site": "SFO", "code": "A", "name": "General", "letter": "A"},
        {"kind": "service", "site": "SFO", "code": "ACC", "name": "Accounts", "queue": "A"},
        {"kind": "staff_user", "username": "alice", "name": "Alice", "sites": ["SFO"],
         "password": "correct horse"}
    ]});
    let (status, report) =
        api.send(Method::POST, "/api/v1/apply", Token::Admin, In::Json(seed)).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let seeded = api.config().await;
    assert_eq!(seeded["revision"], 1);
    // The viewer token works for reading, so the 403s below are about its role.
    let (status, _) = api.send(Method::GET, "/api/v1/sites", Token::Viewer, In::Empty).await;
    assert_eq!(status, StatusCode::OK);

    use In::{Empty, Json as J};
    use Token::{Admin, Basic, None as NoToken, Viewer, Wrong};
    let lax = || site("LAX", json!({}));
    let five_periods =
        json!({"mon": ["08:00-09:00", "10:00-11:00", "12:00-13:00", "14:00-15:00", "16:00-17:00"]});
    let too_big = json!({"resources": [], "padding": "x".repeat(LIMIT * 2)});
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let agent = "/api/v1/agents/0b7e8a52-1f7e-4c1a-9d0e-8a1b2c3d4e5f";
    let revoke = format!("{agent}/revoke");
    let apply = |resources: Value| J(json!({"resources": resources}));
    let delete_keys = |keys: Value| J(json!({"resources": keys}));
    let password = "correct horse";

    #[rustfmt::skip]
    let cases: Vec<(&str, &str, Token, In, u16, &str)> = vec![
        // Authentication and authorisation.
        ("GET", "/api/v1/sites", NoToken, Empty, 401, "unauthenticated"),
        ("GET", "/api/v1/sites", Wrong, Empty, 401, "unauthenticated"),
        ("GET", "/api/v1/sites", Basic, Empty, 401, "unauthenticated"),
        ("POST", "/api/v1/sites", NoToken, J(lax()), 401, "unauthenticated"),
        ("POST", "/api/v1/sites", Viewer, J(lax()), 403, "forbidden"),
        ("PUT", "/api/v1/sites/LAX", Viewer, J(lax()), 403, "forbidden"),
        ("DELETE", "/api/v1/sites/SFO", Viewer, Empty, 403, "forbidden"),
        ("POST", "/api/v1/apply", Viewer, apply(json!([])), 403, "forbidden"),
        ("POST", "/api/v1/api-tokens", Viewer, J(json!({"name": "x", "role": "admin"})), 403, "forbidden"),

        // Sites.
        ("PUT", "/api/v1/sites/LAX", Admin, J(json!({"code": "LAX", "name": "LA", "time_zone": "Mars/Olympus_Mons"})), 422, "validation_failed"),
        ("PUT", "/api/v1/sites/LAX", Admin, J(site("LAX", json!({"mon": ["09:00-12:00", "11:30-13:00"]}))), 422, "validation_failed"),
        ("PUT", "/api/v1/sites/LAX", Admin, J(site("LAX", five_periods)), 422, "validation_failed"),
        ("PUT", "/api/v1/sites/LAX", Admin, J(site("LAX", json!({"mon": ["17:00-09:00"]}))), 422, "validation_failed"),
        ("PUT", "/api/v1/sites/LAX", Admin, J(site("LAX", json!({"someday": ["09:00-10:00"]}))), 422, "validation_failed"),
        ("PUT", "/api/v1/sites/LAX", Admin, J(json!({"code": "LAX", "name": "LA", "time_zone": "UTC", "closed_dates": ["2025-12-25", "2025-12-25"]})), 422, "validation_failed"),
        ("PUT", "/api/v1/sites/LAX", Admin, J(json!({"code": "LAX", "name": "LA", "time_zone": "UTC", "closed_dates": ["2025-02-30"]})), 422, "validation_failed"),
        ("PUT", "/api/v1/sites/LAX", Admin, J(json!({"code": "LAX", "name": "x".repeat(201), "time_zone": "UTC"})), 422, "validation_failed"),
        ("POST", "/api/v1/sites", Admin, J(site("SFO", json!({}))), 409, "conflict"),
        ("POST", "/api/v1/sites", Admin, J(site("sfo", json!({}))), 422, "validation_failed"),
        ("PUT", "/api/v1/sites/SFO", Admin, J(lax()), 400, "bad_request"),
        ("GET", "/api/v1/sites/sfo", Admin, Empty, 422, "validation_failed"),
        ("PUT", "/api/v1/sites/sfo", Admin, J(site("sfo", json!({}))), 422, "validation_failed"),
        ("GET", "/api/v1/sites/TOOLONGCODE", Admin, Empty, 422, "validation_failed"),
        ("GET", "/api/v1/sites/LAX", Admin, Empty, 404, "not_found"),

        // Site-scoped resources: references, uniqueness, the path and the body agree.
        ("POST", "/api/v1/sites/SFO/queues", Admin, J(json!({"code": "B", "name": "Second", "letter": "A"})), 422, "validation_failed"),
        ("POST", "/api/v1/sites/SFO/queues", Admin, J(json!({"code": "B", "name": "Second", "letter": "b"})), 422, "validation_failed"),
        ("POST", "/api/v1/sites/SFO/queues", Admin, J(json!({"code": "B", "name": "Second", "letter": "B", "first_number": 50, "last_number": 10})), 422, "validation_failed"),
        ("POST", "/api/v1/sites/SFO/queues", Admin, J(json!({"code": "B", "name": "Second", "letter": "B", "colour": "red"})), 422, "validation_failed"),
        ("POST", "/api/v1/sites/SFO/queues", Admin, J(json!({"code": "with space", "name": "Second", "letter": "B"})), 422, "validation_failed"),
        ("POST", "/api/v1/sites/SFO/queues", Admin, J(json!({"site": "LAX", "code": "B", "name": "Second", "letter": "B"})), 400, "bad_request"),
        ("POST", "/api/v1/sites/SFO/queues", Admin, J(json!({"kind": "service", "code": "B", "name": "Second", "letter": "B"})), 400, "bad_request"),
        ("PUT", "/api/v1/sites/SFO/queues/A", Admin, J(json!({"code": "B", "name": "General", "letter": "A"})), 400, "bad_request"),
        ("POST", "/api/v1/sites/LAX/queues", Admin, J(json!({"code": "A", "name": "General", "letter": "A"})), 422, "validation_failed"),
        ("POST", "/api/v1/sites/SFO/services", Admin, J(json!({"code": "LN", "name": "Loans", "queue": "Z"})), 422, "validation_failed"),
        ("POST", "/api/v1/sites/SFO/service-points", Admin, J(json!({"code": "C1", "name": "Counter 1", "work_profile": "NOPE"})), 422, "validation_failed"),
        ("POST", "/api/v1/sites/SFO/work-profiles", Admin, J(json!({"code": "W", "name": "Empty", "queues": []})), 422, "validation_failed"),
        ("GET", "/api/v1/sites/SFO/widgets", Admin, Empty, 404, "not_found"),
        ("POST", "/api/v1/sites/SFO/widgets", Admin, J(json!({"code": "X"})), 404, "not_found"),
        ("GET", "/api/v1/sites/SFO/queues/ZZ", Admin, Empty, 404, "not_found"),

        // Staff.
        ("POST", "/api/v1/staff", Admin, J(json!({"username": "bob", "name": "Bob", "sites": ["NYC"], "password": password})), 422, "validation_failed"),
        ("POST", "/api/v1/staff", Admin, J(json!({"username": "bob", "name": "Bob", "sites": ["SFO"], "password": "short"})), 422, "validation_failed"),
        ("POST", "/api/v1/staff", Admin, J(json!({"username": "bob", "name": "Bob", "sites": ["SFO"]})), 422, "validation_failed"),
        ("POST", "/api/v1/staff", Admin, J(json!({"username": "bob", "name": "Bob", "password_hash": "$argon2id$v=19$m=19456,t=2,p=1$x$y"})), 422, "validation_failed"),
        ("POST", "/api/v1/staff", Admin, J(json!({"username": "bob", "name": "Bob", "roles": ["root"], "password": password})), 422, "validation_failed"),
        ("POST", "/api/v1/staff", Admin, J(json!({"username": "alice", "name": "Alice", "password": password})), 409, "conflict"),
        ("DELETE", "/api/v1/staff/nobody", Admin, Empty, 404, "not_found"),

        // Declarative apply and delete.
        ("POST", "/api/v1/apply", Admin, apply(json!([{"kind": "widget", "code": "X"}])), 422, "validation_failed"),
        ("POST", "/api/v1/apply", Admin, apply(json!([{"code": "X"}])), 422, "validation_failed"),
        ("POST", "/api/v1/apply", Admin, apply(json!([{"kind": "queue", "site": "SFO", "code": "B", "name": "B", "letter": "B"}, {"kind": "queue", "site": "SFO", "code": "B", "name": "B", "letter": "B"}])), 422, "validation_failed"),
        ("POST", "/api/v1/apply", Admin, apply(json!([{"kind": "service", "site": "SFO", "code": "ACC", "name": "Accounts", "queue": "Z"}])), 422, "validation_failed"),
        ("POST", "/api/v1/apply", Admin, J(json!({"resources": {}})), 422, "invalid_body"),
        ("POST", "/api/v1/apply", Admin, J(json!({"resources": [], "force": true})), 422, "invalid_body"),
        ("POST", "/api/v1/apply", Admin, J(json!({})), 422, "invalid_body"),
        ("POST", "/api/v1/delete", Admin, delete_keys(json!([{"kind": "site", "site": null, "code": "LAX"}])), 404, "not_found"),
        ("POST", "/api/v1/delete", Admin, delete_keys(json!([{"kind": "widget", "site": null, "code": "LAX"}])), 422, "invalid_body"),
        ("POST", "/api/v1/delete", Admin, delete_keys(json!([{"kind": "queue", "site": "SFO", "code": "A"}])), 422, "validation_failed"),
        ("DELETE", "/api/v1/sites/SFO", Admin, Empty, 422, "validation_failed"),
        ("DELETE", "/api/v1/sites/SFO/queues/A", Admin, Empty, 422, "validation_failed"),
        ("DELETE", "/api/v1/sites/SFO/services/NOPE", Admin, Empty, 404, "not_found"),
        ("DELETE", "/api/v1/sites/LAX", Admin, Empty, 404, "not_found"),

        // Enrollment tokens, agents, API tokens.
        ("POST", "/api/v1/enrollment-tokens", Admin, J(json!({"site": "LAX"})), 422, "validation_failed"),
        ("POST", "/api/v1/enrollment-tokens", Admin, J(json!({"site": "sfo"})), 422, "validation_failed"),
        ("POST", "/api/v1/enrollment-tokens", Admin, J(json!({"site": "SFO", "ttl_seconds": 0})), 422, "validation_failed"),
        ("POST", "/api/v1/enrollment-tokens", Admin, J(json!({"site": "SFO", "ttl_seconds": 365 * 86_400})), 422, "validation_failed"),
        ("POST", "/api/v1/enrollment-tokens", Admin, J(json!({"site": "SFO", "ttl_seconds": -1})), 422, "invalid_body"),
        ("GET", "/api/v1/agents/not-an-id", Admin, Empty, 400, "bad_request"),
        ("POST", "/api/v1/agents/not-an-id/revoke", Admin, Empty, 400, "bad_request"),
        ("GET", agent, Admin, Empty, 404, "not_found"),
        ("POST", &revoke, Admin, Empty, 404, "not_found"),
        ("POST", "/api/v1/api-tokens", Admin, J(json!({"name": " ", "role": "admin"})), 422, "validation_failed"),
        ("POST", "/api/v1/api-tokens", Admin, J(json!({"name": "x", "role": "root"})), 422, "invalid_body"),
        ("DELETE", "/api/v1/api-tokens/nope", Admin, Empty, 404, "not_found"),

        // Malformed requests and unknown endpoints.
        ("POST", "/api/v1/sites", Admin, json_text("{\"code\": \"LAX\","), 400, "malformed_json"),
        ("POST", "/api/v1/sites", Admin, json_text(""), 400, "malformed_json"),
        ("POST", "/api/v1/sites", Admin, json_text(&deep), 400, "malformed_json"),
        ("POST", "/api/v1/sites", Admin, J(json!(["LAX"])), 400, "malformed_json"),
        ("POST", "/api/v1/apply", Admin, json_text("resources: []"), 400, "malformed_json"),
        ("POST", "/api/v1/sites", Admin, In::Raw(Some("text/plain"), b"{}".to_vec()), 415, "unsupported_media_type"),
        ("POST", "/api/v1/sites", Admin, In::Raw(None, b"{}".to_vec()), 415, "unsupported_media_type"),
        ("POST", "/api/v1/apply", Admin, J(too_big), 413, "payload_too_large"),
        ("GET", "/api/v1/nope", Admin, Empty, 404, "not_found"),
        ("GET", "/nope", NoToken, Empty, 404, "not_found"),
        ("PATCH", "/api/v1/sites", Admin, J(json!({})), 405, "method_not_allowed"),
        ("GET", "/api/v1/apply", Admin, Empty, 405, "method_not_allowed"),
        ("DELETE", agent, Admin, Empty, 405, "method_not_allowed"),
        ("GET", "/api/v1/config/revisions?limit=abc", Admin, Empty, 400, "bad_request"),
        ("GET", "/api/v1/sites/%FF", Admin, Empty, 400, "bad_request"),
        ("DELETE", "/api/v1/staff/%FF", Admin, Empty, 400, "bad_request"),
    ];
    for (method, path, token, body, status, code) in cases {
        check(&api, method, path, token, body, status, code).await;
    }

    // None of the above changed the configuration.
    assert_eq!(api.config().await, seeded);
}

/// Request types: created, read, replaced and deleted at `/api/v1/request-types`,
/// part of every site's configuration snapshot; a bad schema is a 422 naming each bad field,
/// viewers read only, and nothing is written by a refused change.
#[tokio::test]
async fn request_types_are_managed_centrally_and_bad_schemas_are_refused() {
    let api = Api::start().await;
    let repair = json!({"code": "REPAIR", "name": "Furniture repair", "fields": [
        {"name": "summary", "type": "text", "max_length": 80, "required": true},
        {"name": "category", "type": "enum", "values": ["chair", "table"]}
    ]});
    let (status, body) = api
        .send(Method::POST, "/api/v1/request-types", Token::Admin, In::Json(repair.clone()))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) =
        api.send(Method::GET, "/api/v1/request-types/REPAIR", Token::Viewer, In::Empty).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["fields"][1]["values"], json!(["chair", "table"]));
    let revision = api.config().await["revision"].clone();

    let bad = json!({"code": "BAD", "name": "Bad", "fields": [
        {"name": "Summary", "type": "text", "max_length": 0},
        {"name": "flag", "type": "boolean", "default": "no"}
    ]});
    let (status, body) =
        api.send(Method::POST, "/api/v1/request-types", Token::Admin, In::Json(bad)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let fields: Vec<&str> = body["details"]
        .as_array()
        .expect("details")
        .iter()
        .filter_map(|d| d["field"].as_str())
        .collect();
    for f in ["fields[0].name", "fields[0].max_length", "fields[1].default"] {
        assert!(fields.iter().any(|x| x.ends_with(f)), "{f} in {body}");
    }
    check(
        &api,
        "POST",
        "/api/v1/request-types",
        Token::Admin,
        In::Json(json!({"code": "TYPO", "name": "T", "fields": [
            {"name": "a", "type": "text", "max_length": 5, "requried": true}
        ]})),
        422,
        "validation_failed",
    )
    .await;
    check(
        &api,
        "POST",
        "/api/v1/request-types",
        Token::Viewer,
        In::Json(repair.clone()),
        403,
        "forbidden",
    )
    .await;
    check(&api, "POST", "/api/v1/request-types", Token::Admin, In::Json(repair), 409, "conflict")
        .await;
    assert_eq!(api.config().await["revision"], revision, "refusals wrote nothing");

    // A mapping is checked against both types when saved, and again whenever a type changes.
    let upholstery = json!({"code": "UPHOLSTERY", "name": "Upholstery", "fields": [
        {"name": "summary", "type": "text", "max_length": 120, "required": true},
        {"name": "item", "type": "enum", "values": ["chair", "table", "sofa"], "required": true}
    ]});
    let (status, body) =
        api.send(Method::POST, "/api/v1/request-types", Token::Admin, In::Json(upholstery)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mapping = json!({"code": "TO_UPH", "name": "To upholstery", "source_type": "REPAIR",
        "target_type": "UPHOLSTERY", "fields": {"item": {"from": "category"}}});
    let (status, body) =
        api.send(Method::POST, "/api/v1/request-mappings", Token::Admin, In::Json(mapping)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let backwards = json!({"code": "BACK", "name": "Back", "source_type": "UPHOLSTERY",
        "target_type": "REPAIR", "fields": {"category": {"from": "item"}}});
    let (status, body) =
        api.send(Method::POST, "/api/v1/request-mappings", Token::Admin, In::Json(backwards)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("values sofa are not allowed in category"), "{body}");
    assert!(message.contains("text of up to 120 characters does not fit summary"), "{body}");
    // Drift is caught at configuration time: turning the category the mapping reads into text
    // would break TO_UPH, so the type change is refused and names the mapping's field.
    let narrowed = json!({"code": "REPAIR", "name": "Furniture repair", "fields": [
        {"name": "summary", "type": "text", "max_length": 80, "required": true},
        {"name": "category", "type": "text", "max_length": 20}
    ]});
    let (status, body) = api
        .send(Method::PUT, "/api/v1/request-types/REPAIR", Token::Admin, In::Json(narrowed))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let fields: Vec<&str> = body["details"]
        .as_array()
        .expect("details")
        .iter()
        .filter_map(|d| d["field"].as_str())
        .collect();
    assert!(fields.iter().any(|f| f.contains("TO_UPH") && f.ends_with("fields.item")), "{body}");

    let (status, _) =
        api.send(Method::DELETE, "/api/v1/request-mappings/TO_UPH", Token::Admin, In::Empty).await;
    assert!(status.is_success());
    let (status, _) =
        api.send(Method::DELETE, "/api/v1/request-types/REPAIR", Token::Admin, In::Empty).await;
    assert!(status.is_success());
    check(&api, "GET", "/api/v1/request-types/REPAIR", Token::Admin, In::Empty, 404, "not_found")
        .await;
}

/// Distribution rules and pools at `/api/v1/request-rules` and
/// `/api/v1/request-pools`: a good pool and rule are saved; a rule whose condition does not
/// parse or does not type-check against its request type, that names an unknown site, mapping
/// or pool, whose mapping is for another type, or that would move requests in a loop with
/// another rule is a 422 naming the rule's field, and none of those refusals changes anything.
#[tokio::test]
async fn distribution_rules_are_validated_when_saved() {
    let api = Api::start().await;
    let seed = json!({"resources": [
        {"kind": "site", "code": "SFO", "name": "San Francisco", "time_zone": "America/Los_Angeles"},
        {"kind": "site", "code": "CHI", "name": "Chicago", "time_zone": "America/Chicago"},
        {"kind": "request_type", "code": "REPAIR", "name": "Furniture repair", "fields": [
            {"name": "summary", "type": "text", "max_length": 80, "required": true},
            {"name": "category", "type": "enum", "values": ["chair", "table"]},
            {"name": "upholstery", "type": "boolean"}
        ]},
        {"kind": "request_type", "code": "UPHOLSTERY", "name": "Upholstery", "fields": [
            {"name": "summary", "type": "text", "max_length": 120, "required": true}
        ]},
        {"kind": "request_mapping", "code": "R2R", "name": "Repair to repair",
         "source_type": "REPAIR", "target_type": "REPAIR"},
        {"kind": "request_mapping", "code": "U2U", "name": "Upholstery to upholstery",
         "source_type": "UPHOLSTERY", "target_type": "UPHOLSTERY"}
    ]});
    let (status, report) =
        api.send(Method::POST, "/api/v1/apply", Token::Admin, In::Json(seed)).await;
    assert_eq!(status, StatusCode::OK, "{report}");

    let pool = json!({"code": "chairs", "name": "Chairs", "timeout_minutes": 120});
    let (status, body) =
        api.send(Method::POST, "/api/v1/request-pools", Token::Admin, In::Json(pool)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let rule = |code: &str, changes: Value| {
        let mut r = json!({"code": code, "name": format!("Rule {code}"),
            "request_type": "REPAIR", "sites": ["SFO"], "trigger": {"on": "create"},
            "condition": "fields.category == 'chair' && fields.upholstery",
            "action": "transfer", "mode": "ownership", "mapping": "R2R", "pool": "chairs",
            "target": {"site": "CHI"}});
        for (k, v) in changes.as_object().expect("object") {
            r[k] = v.clone();
        }
        r
    };
    let (status, body) = api
        .send(
            Method::POST,
            "/api/v1/request-rules",
            Token::Admin,
            In::Json(rule("TO_CHI", json!({}))),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) =
        api.send(Method::GET, "/api/v1/request-rules/TO_CHI", Token::Viewer, In::Empty).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["bounce_limit"].clone(), body["update"].clone()),
        (json!(3), json!("immediately"))
    );
    let revision = api.config().await["revision"].clone();

    // (the rule's changes, the field the refusal names, a fragment of its message)
    let refusals = [
        (json!({"condition": "fields.category == 'chair' &&"}), "condition", "does not parse"),
        (
            json!({"condition": "fields.category + 1 == 2"}),
            "condition",
            "fails on a sample REPAIR request",
        ),
        (
            json!({"condition": "fields.colour == 'red'"}),
            "condition",
            "request type REPAIR has no field colour",
        ),
        (json!({"condition": "fields.summary"}), "condition", "not a boolean"),
        (json!({"target": {"site": "LON"}}), "target.site", "unknown site LON"),
        (json!({"mapping": "NOPE"}), "mapping", "unknown request mapping NOPE"),
        (json!({"pool": "NOPE"}), "pool", "unknown request pool NOPE"),
        (
            json!({"mapping": "U2U"}),
            "mapping",
            "mapping U2U maps requests of type UPHOLSTERY, not REPAIR",
        ),
        (json!({"mode": null}), "mode", "a transfer needs a mode"),
    ];
    for (changes, field, fragment) in refusals {
        let bad = rule("BAD", changes.clone());
        let (status, body) =
            api.send(Method::POST, "/api/v1/request-rules", Token::Admin, In::Json(bad)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{changes}: {body}");
        assert_eq!(body["code"], "validation_failed", "{changes}: {body}");
        let named = body["details"].as_array().is_some_and(|d| {
            d.iter().any(|e| {
                e["field"].as_str().is_some_and(|f| f.ends_with(&format!("BAD.{field}")))
                    && e["message"].as_str().is_some_and(|m| m.contains(fragment))
            })
        });
        assert!(named, "{changes}: expected {field}: {fragment} in {body}");
    }

    // Two arrival rules that hand a request back and forth: the second one saved closes the
    // loop and is refused, naming both rules and the sites.
    let arrival = |code: &str, at: &str, to: &str| {
        rule(
            code,
            json!({"trigger": {"on": "arrival"}, "sites": [at], "target": {"site": to},
                          "condition": null}),
        )
    };
    let (status, body) = api
        .send(
            Method::POST,
            "/api/v1/request-rules",
            Token::Admin,
            In::Json(arrival("A", "SFO", "CHI")),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let revision_with_a = api.config().await["revision"].clone();
    assert_ne!(revision_with_a, revision);
    let (status, body) = api
        .send(
            Method::POST,
            "/api/v1/request-rules",
            Token::Admin,
            In::Json(arrival("B", "CHI", "SFO")),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("rules A and B would move a request in a loop: SFO → CHI → SFO"),
        "{body}"
    );

    // Nothing was changed by the refusals.
    assert_eq!(api.config().await["revision"], revision_with_a, "refusals wrote nothing");
    let (status, body) =
        api.send(Method::GET, "/api/v1/request-rules", Token::Admin, In::Empty).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let codes: Vec<&str> =
        body.as_array().expect("list").iter().filter_map(|r| r["code"].as_str()).collect();
    assert_eq!(codes, ["A", "TO_CHI"], "{body}");
    let (status, body) =
        api.send(Method::GET, "/api/v1/request-pools", Token::Admin, In::Empty).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body.as_array().map(Vec::len), Some(1), "{body}");
}
