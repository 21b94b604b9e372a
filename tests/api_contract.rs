//! Both HTTP APIs against their OpenAPI documents, with real processes holding real data (a
//! controller on SQLite, an enrolled agent for SFO with services, a staff user, a request type
//! and a connector key): Schemathesis sends a bounded number of generated requests to every
//! documented operation and checks each answer — never a 5xx, a documented status, a documented
//! content type, a body that matches its schema. And every error either API gives, including
//! those axum gives by itself (extractor rejections, 405, body limit), is the documented JSON
//! error body.
//!
//! Schemathesis comes from `make provision` (`tests/provision-schemathesis.sh`): the test runs
//! `$MERIDIAN_TEST_SCHEMATHESIS`, default `~/.cache/meridian-schemathesis/bin/schemathesis`,
//! and fails when it is missing.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::*;

/// Generated requests per operation and phase.
const EXAMPLES_PER_OPERATION: &str = "20";
/// The longest one Schemathesis run may take (it is killed after, and the test fails).
const RUN_DEADLINE: Duration = Duration::from_secs(130);

fn schemathesis() -> PathBuf {
    let path =
        std::env::var_os("MERIDIAN_TEST_SCHEMATHESIS").map(PathBuf::from).unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_default();
            PathBuf::from(home).join(".cache/meridian-schemathesis/bin/schemathesis")
        });
    assert!(
        path.is_file(),
        "Schemathesis is not installed at {} (MERIDIAN_TEST_SCHEMATHESIS): run `make provision` \
         or `bash tests/provision-schemathesis.sh`",
        path.display()
    );
    path
}

/// A controller with data and an enrolled, configured agent for SFO.
async fn fleet() -> (ControllerProc, AgentProc) {
    let root = temp_dir("meridian-contract");
    let controller = ControllerProc::start(
        &root.join("controller"),
        &meridian_controller::testing::fresh_sqlite_url(),
    )
    .await;
    let admin = controller.client();
    admin.seed_site("SFO").await;
    let more = json!([
        {"kind": "staff_user", "username": "alice", "name": "Alice", "roles": ["staff"],
         "sites": ["SFO"], "password": "correct horse battery"},
        {"kind": "service_point", "site": "SFO", "code": "C1", "name": "Counter 1"},
        {"kind": "request_type", "code": "REPAIR", "name": "Repair", "fields": [
            {"name": "summary", "type": "text", "max_length": 80, "required": true}]},
    ]);
    admin.ok(Method::POST, "/api/v1/apply", Some(json!({ "resources": more }))).await;
    let (_proxy, agent) = start_site_agent(&root.join("agent"), &controller).await;
    agent.issue_tickets("GEN", 16).await;
    (controller, agent)
}

/// Runs Schemathesis against `base` (its document at `{base}/api/v1/openapi.json`) with
/// `token`; answers its report on any finding.
async fn run_schemathesis(name: &str, base: &str, token: &str, exclude: &[&str]) -> Option<String> {
    let report = temp_dir("meridian-schemathesis").join(format!("{name}.txt"));
    let mut child = tokio::process::Command::new(schemathesis())
        .args([
            "run",
            &format!("{base}/api/v1/openapi.json"),
            "--url",
            base,
            "--header",
            &format!("Authorization: Bearer {token}"),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_schema_conformance",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            EXAMPLES_PER_OPERATION,
            "--seed",
            "20261207",
            "--workers",
            "2",
            "--request-timeout",
            "20",
            "--suppress-health-check",
            "all",
        ])
        .args(exclude.iter().flat_map(|path| ["--exclude-path", path]))
        .env("NO_COLOR", "1")
        // Hypothesis keeps its example database in the working directory.
        .current_dir(report.parent().expect("report dir"))
        .stdout(std::fs::File::create(&report).expect("report file"))
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start schemathesis");
    let status = match tokio::time::timeout(RUN_DEADLINE, child.wait()).await {
        Ok(status) => status.expect("schemathesis"),
        Err(_) => {
            let _ = child.kill().await;
            let out = std::fs::read_to_string(&report).unwrap_or_default();
            panic!("Schemathesis against the {name} API took longer than {RUN_DEADLINE:?}:\n{out}");
        }
    };
    let out = std::fs::read_to_string(&report).unwrap_or_default();
    if status.success() {
        eprintln!("{out}");
        return None;
    }
    Some(format!("Schemathesis found contract mismatches in the {name} API:\n{out}"))
}

#[tokio::test]
async fn schemathesis_finds_no_contract_mismatch_in_either_api() {
    schemathesis();
    let (controller, agent) = fleet().await;
    // Deleting API tokens would delete the one the run authenticates with (Schemathesis takes
    // ids from earlier answers); `controller/tests/admin_api.rs` covers that operation.
    let controller = run_schemathesis(
        "controller",
        &controller.api,
        &controller.token,
        &["/api/v1/api-tokens/{id}"],
    )
    .await;
    // The live feed is a stream that does not end; `agent/tests/branch_operations.rs` covers it.
    let branch = run_schemathesis("branch", &agent.url, CONNECTOR_KEY, &["/api/v1/events"]).await;
    let found: Vec<String> = [controller, branch].into_iter().flatten().collect();
    assert!(found.is_empty(), "{}", found.join("\n\n"));
}

/// Sends a raw request; answers status, content type, `Allow` and the body as JSON.
async fn raw(
    method: Method,
    url: &str,
    token: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, String, String, Value) {
    let mut req = reqwest::Client::new().request(method, url).bearer_auth(token).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let resp = req.send().await.expect("request");
    let header = |name: &str| {
        resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
    };
    let (status, content_type, allow) =
        (resp.status().as_u16(), header("content-type"), header("allow"));
    let text = resp.text().await.unwrap_or_default();
    (status, content_type, allow, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// What is sent (what, method, url, token, content type, body) and the status and `code`
/// expected.
type Case<'a> = (&'a str, Method, String, &'a str, Option<&'a str>, Vec<u8>, u16, &'a str);

#[tokio::test]
async fn every_error_of_both_apis_is_the_json_body_and_405_names_the_allowed_methods() {
    let (controller, agent) = fleet().await;
    let json_ct = Some("application/json");
    let c = |p: &str| format!("{}{p}", controller.api);
    let b = |p: &str| format!("{}{p}", agent.url);
    let (ct, bt) = (controller.token.as_str(), CONNECTOR_KEY);
    let big = |n: usize| format!("{{\"x\":\"{}\"}}", "a".repeat(n)).into_bytes();
    // (what, method, url, token, content type, body, status, code)
    let cases: Vec<Case> = vec![
        (
            "path not UTF-8",
            Method::GET,
            c("/api/v1/sites/%FF"),
            ct,
            None,
            vec![],
            400,
            "bad_request",
        ),
        (
            "path not UTF-8",
            Method::GET,
            b("/api/v1/visits/%FF"),
            bt,
            None,
            vec![],
            400,
            "bad_request",
        ),
        (
            "bad query",
            Method::GET,
            c("/api/v1/config/revisions?limit=x"),
            ct,
            None,
            vec![],
            400,
            "bad_request",
        ),
        (
            "bad query",
            Method::GET,
            b("/api/v1/events?after=x"),
            bt,
            None,
            vec![],
            400,
            "bad_request",
        ),
        (
            "JSON syntax",
            Method::POST,
            c("/api/v1/apply"),
            ct,
            json_ct,
            b"{".to_vec(),
            400,
            "malformed_json",
        ),
        (
            "JSON syntax",
            Method::POST,
            b("/api/v1/visits"),
            bt,
            json_ct,
            b"{".to_vec(),
            400,
            "malformed_json",
        ),
        (
            "no content type",
            Method::POST,
            c("/api/v1/apply"),
            ct,
            None,
            b"{}".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "no content type",
            Method::POST,
            b("/api/v1/visits"),
            bt,
            None,
            b"{}".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "optional body not JSON",
            Method::POST,
            b("/api/v1/visits/no-such/end"),
            bt,
            Some("text/plain"),
            b"x".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "body over the limit",
            Method::POST,
            c("/api/v1/apply"),
            ct,
            json_ct,
            big(2 << 20),
            413,
            "payload_too_large",
        ),
        (
            "raw body over the limit",
            Method::POST,
            c("/api/v1/appointments/no-such/cancel"),
            ct,
            json_ct,
            big(2 << 20),
            413,
            "payload_too_large",
        ),
        (
            "body over the limit",
            Method::POST,
            b("/api/v1/visits"),
            bt,
            json_ct,
            big(100_000),
            413,
            "payload_too_large",
        ),
        ("unknown endpoint", Method::GET, c("/api/v1/nothing"), ct, None, vec![], 404, "not_found"),
        ("unknown endpoint", Method::GET, b("/api/v1/nothing"), bt, None, vec![], 404, "not_found"),
        ("no token", Method::GET, c("/api/v1/sites"), "", None, vec![], 401, "unauthenticated"),
        ("no token", Method::GET, b("/api/v1/visits"), "", None, vec![], 401, "unauthenticated"),
    ];
    for (what, method, url, token, content_type, body, status, code) in cases {
        let (got, got_ct, _, v) = raw(method.clone(), &url, token, content_type, body).await;
        let case = format!("{what}: {method} {url} -> {got} {got_ct} {v}");
        assert_eq!((got, v["code"].as_str()), (status, Some(code)), "{case}");
        assert!(got_ct.starts_with("application/json"), "{case}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{case}");
    }
    for (url, token, method, allowed) in [
        (c("/api/v1/sites"), ct, Method::PATCH, ["GET", "POST"]),
        (b("/api/v1/visits"), bt, Method::PUT, ["GET", "POST"]),
    ] {
        let (got, got_ct, allow, v) = raw(method.clone(), &url, token, None, vec![]).await;
        let case = format!("{method} {url} -> {got} {got_ct} allow={allow:?} {v}");
        assert_eq!((got, v["code"].as_str()), (405, Some("method_not_allowed")), "{case}");
        assert!(got_ct.starts_with("application/json"), "{case}");
        for m in allowed {
            assert!(allow.split(',').any(|a| a.trim() == m), "{case}");
        }
    }
}
