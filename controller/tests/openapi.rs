//! The admin API's OpenAPI document against its router: served without a token, bearer
//! authentication declared, every documented operation routed, and every routed operation
//! documented (no other method answers on a documented path, and every route the API's
//! sources register is a documented path).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use meridian_controller::api::{self, ApiState};
use meridian_controller::metrics::Metrics;
use meridian_controller::server::ensure_bootstrap_token;
use meridian_controller::store::Store;
use serde_json::Value;
use tower::ServiceExt;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

async fn api() -> (Router, String) {
    let store: Arc<dyn Store> =
        meridian_controller::store::open(&meridian_controller::testing::fresh_sqlite_url())
            .await
            .expect("open store");
    let admin =
        ensure_bootstrap_token(store.as_ref(), None).await.expect("bootstrap").expect("fresh");
    let state = ApiState {
        store,
        metrics: Arc::new(Metrics::default()),
        commands_changed: Arc::new(tokio::sync::watch::channel(0).0),
        clock_skew_tolerance: meridian_controller::Settings::default().clock_skew_tolerance(),
    };
    (api::router(state, 1 << 20), admin)
}

async fn send(
    router: &Router,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method(Method::from_bytes(method.to_uppercase().as_bytes()).expect("method"))
        .uri(path);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp =
        router.clone().oneshot(req.body(Body::empty()).expect("request")).await.expect("response");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24).await.expect("body");
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Whether the router has no route for this method and path.
fn unrouted(status: StatusCode, body: &Value) -> bool {
    status == StatusCode::METHOD_NOT_ALLOWED
        || (status == StatusCode::NOT_FOUND && body["message"] == "no such endpoint")
}

/// A path of the template with every parameter filled in (`{kind}` with a real collection).
fn concrete(template: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}').expect("closing brace") + open;
        out.push_str(&rest[..open]);
        out.push_str(match &rest[open + 1..close] {
            "kind" => "services",
            _ => "no-such-thing",
        });
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// The paths every `.route("…"` of the API's sources registers, with `/api/v1` before the
/// nested ones (`mod.rs` holds the unnested routes).
fn routes_in_sources() -> BTreeSet<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api");
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("src/api") {
        let path = entry.expect("entry").path();
        let source = std::fs::read_to_string(&path).expect("source");
        let nested = path.file_name().is_some_and(|n| n != "mod.rs");
        for (i, _) in source.match_indices(".route(") {
            let after = source[i + ".route(".len()..].trim_start();
            let Some(literal) = after.strip_prefix('"') else {
                panic!("{}: a route whose path is not a literal: {}", path.display(), &after[..40]);
            };
            let route = &literal[..literal.find('"').expect("end of literal")];
            found.insert(if nested { format!("/api/v1{route}") } else { route.to_owned() });
        }
    }
    found
}

#[tokio::test]
async fn the_document_is_served_without_a_token_and_declares_bearer_authentication() {
    let (router, _) = api().await;
    let (status, doc) = send(&router, "get", "/api/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    assert_eq!(doc["security"][0]["bearer"], serde_json::json!([]));
    assert!(doc["components"]["schemas"]["Error"]["required"].as_array().is_some());
    let (status, _) = send(&router, "get", "/api/v1/sites", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the API itself still needs a token");
}

#[tokio::test]
async fn every_documented_operation_is_routed_and_every_routed_one_is_documented() {
    let (router, admin) = api().await;
    let doc = api::openapi::document();
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() > 50, "{} paths", paths.len());
    let mut problems = Vec::new();
    for (template, item) in paths {
        let path = concrete(template);
        for method in METHODS {
            let documented = item.get(method).is_some();
            let (status, body) = send(&router, method, &path, Some(&admin)).await;
            match (documented, unrouted(status, &body)) {
                (true, true) => {
                    problems.push(format!("{method} {template}: documented, not routed"))
                }
                (false, false) => problems.push(format!(
                    "{method} {template}: routed ({status}: {body}), not documented"
                )),
                _ => {}
            }
            if documented {
                let op = &item[method];
                for status in ["401", "503"] {
                    if op["responses"].get(status).is_none() {
                        problems.push(format!("{method} {template}: no {status} response"));
                    }
                }
            }
        }
    }
    let non_api: BTreeSet<&str> = ["/healthz", "/metrics", "/api/v1/openapi.json"].into();
    for route in routes_in_sources() {
        if !paths.contains_key(&route) && !non_api.contains(route.as_str()) {
            problems.push(format!("{route} is routed but not documented"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
