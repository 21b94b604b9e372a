//! The distributed-request ledger as admins see and repair it, on SQLite and
//! PostgreSQL: the admin API (`/api/v1/request-ops…`, `/api/v1/requests/{id}/ownership`)
//! through `Router::oneshot`, the ledger's metrics, the console page `/console/requests`, and
//! the `meridianctl requests …` binary against a served controller. Ledger rows come from real
//! agent events ingested through the store: SFO creates two requests, moves the ownership of
//! the first to CHI and copies the second to TYO (which has no agent; the operation waits,
//! pending, for one).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use chrono::{DateTime, Duration, TimeZone, Utc};
use meridian_controller::api::{self, ApiState};
use meridian_controller::config_admin::{self, ChangeMode, ResourceInput};
use meridian_controller::metrics::Metrics;
use meridian_controller::server::ensure_bootstrap_token;
use meridian_controller::store::{AgentRecord, Role, Store};
use meridian_controller::testing::{
    self, ConsoleSignIn, enroll_agent, fresh_postgres_url, fresh_sqlite_url,
};
use meridian_shared::clock::{Clock, ManualClock};
use meridian_shared::commands::ControllerCommand;
use meridian_shared::events::{AgentEvent, RequestChanged, RequestEventKind};
use meridian_shared::transfers::{
    OpKind, OpTarget, OperationRequested, RequestState, ResultStatus, TransferMode, UpdatePolicy,
};
use meridian_shared::{Code, SiteCode};
use serde_json::{Value, json};
use tower::ServiceExt;
use uuid::Uuid;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 8, 0, 0).unwrap()
}

/// A controller with sites SFO, CHI (agents enrolled) and TYO (no agent), request type REPAIR,
/// and the two operations described above, recorded at `t0`.
struct Ledger {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    router: Router,
    clock: Arc<ManualClock>,
    admin: String,
    viewer: String,
    sfo: AgentRecord,
    chi: AgentRecord,
    /// Ownership transfer of SFO-000001 to CHI, pool `default`.
    transfer: Uuid,
    /// Data-only copy of SFO-000002 to TYO, pool `parts`.
    copy: Uuid,
    request_a: Uuid,
}

fn inputs() -> Vec<ResourceInput> {
    let mut v: Vec<Value> = ["SFO", "CHI", "TYO"]
        .iter()
        .map(|c| json!({"kind": "site", "code": c, "name": format!("Site {c}"), "time_zone": "Europe/Paris"}))
        .collect();
    v.push(json!({"kind": "request_type", "code": "REPAIR", "name": "Repair", "fields": [
        {"name": "summary", "type": "text", "max_length": 80, "required": true}
    ]}));
    v.into_iter().map(|j| serde_json::from_value(j).expect("resource")).collect()
}

fn state(id: Uuid, human_id: &str) -> RequestState {
    RequestState {
        request_id: id,
        human_id: human_id.into(),
        request_type: Code::parse("REPAIR").expect("code"),
        fields: [("summary".to_owned(), json!("broken chair"))].into_iter().collect(),
        revision: 1,
        created_at: t0(),
        history: vec![],
    }
}

fn created(s: &RequestState) -> AgentEvent {
    AgentEvent::Request(
        RequestEventKind::Created,
        RequestChanged {
            request_id: s.request_id,
            human_id: s.human_id.clone(),
            request_type: s.request_type.clone(),
            revision: s.revision,
            fields: s.fields.clone(),
            at: t0(),
        },
    )
}

fn operation(
    op_id: Uuid,
    mode: TransferMode,
    target: &str,
    pool: &str,
    request: RequestState,
) -> AgentEvent {
    AgentEvent::RequestOperation(OperationRequested {
        op_id,
        kind: OpKind::Transfer,
        mode: Some(mode),
        target: OpTarget::Site(SiteCode::parse(target).expect("site")),
        mapping: None,
        pool: Code::parse(pool).expect("pool"),
        update: UpdatePolicy::Immediately,
        rule: None,
        request,
        source_keeps_copy: true,
        at: t0(),
    })
}

impl Ledger {
    async fn start(url: &str) -> Ledger {
        let store: Arc<dyn Store> = meridian_controller::store::open(url).await.expect("store");
        config_admin::change(store.as_ref(), "test", inputs(), vec![], ChangeMode::Upsert)
            .await
            .expect("config");
        let sfo = enroll_agent(store.as_ref(), "SFO").await.expect("enroll SFO");
        let chi = enroll_agent(store.as_ref(), "CHI").await.expect("enroll CHI");
        let admin =
            ensure_bootstrap_token(store.as_ref(), None).await.expect("bootstrap").expect("fresh");
        let (token, viewer) = api::new_api_token("dashboard", Role::Viewer);
        store.insert_api_token(&token).await.expect("viewer token");

        let (request_a, request_b) = (Uuid::now_v7(), Uuid::now_v7());
        let (transfer, copy) = (Uuid::now_v7(), Uuid::now_v7());
        let (a, b) = (state(request_a, "SFO-000001"), state(request_b, "SFO-000002"));
        let events = [
            created(&a),
            created(&b),
            operation(transfer, TransferMode::Ownership, "CHI", "default", a),
            operation(copy, TransferMode::DataOnly, "TYO", "parts", b),
        ];
        store
            .ingest_events(sfo.id, &testing::incoming(&events, 1, t0()), t0())
            .await
            .expect("ingest")
            .expect("accepted");
        store.flush_request_commands().await.expect("flush");

        let metrics = Arc::new(Metrics::default());
        let clock = Arc::new(ManualClock::new(t0() + Duration::minutes(10)));
        let api_state = ApiState {
            store: store.clone(),
            metrics: metrics.clone(),
            commands_changed: Arc::new(tokio::sync::watch::channel(0).0),
            clock_skew_tolerance: meridian_controller::Settings::default().clock_skew_tolerance(),
        };
        let router = api::router_with_clock(api_state.clone(), 1 << 20, clock.clone())
            .merge(meridian_controller::console::router(api_state));
        Ledger { store, metrics, router, clock, admin, viewer, sfo, chi, transfer, copy, request_a }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        testing::call_router(&self.router, method, path, token, body).await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, &self.admin, None).await
    }

    /// The op ids a listing answered, in order.
    async fn listed(&self, query: &str) -> Vec<String> {
        let (status, v) = self.get(&format!("/api/v1/request-ops{query}")).await;
        assert_eq!(status, StatusCode::OK, "{query}: {v}");
        v.as_array()
            .expect("list")
            .iter()
            .map(|o| o["op_id"].as_str().expect("op_id").to_owned())
            .collect()
    }

    /// The kinds of the commands in `agent`'s log.
    async fn commands(&self, agent: &AgentRecord) -> Vec<ControllerCommand> {
        self.store
            .commands_after(agent.id, 0, 1000)
            .await
            .expect("commands")
            .into_iter()
            .map(|c| ControllerCommand::decode(&c.kind, &c.payload).expect("decodes"))
            .collect()
    }
}

fn ids(ops: &[Uuid]) -> Vec<String> {
    ops.iter().map(Uuid::to_string).collect()
}

/// The whole admin story on one backend.
async fn the_ledger_is_listed_inspected_cancelled_and_retried(url: &str) {
    let l = Ledger::start(url).await;
    let (transfer, copy) = (l.transfer.to_string(), l.copy.to_string());

    // The target agent was sent the transfer.
    assert!(
        l.commands(&l.chi)
            .await
            .iter()
            .any(|c| matches!(c, ControllerCommand::ApplyOperation(a) if a.op_id == l.transfer)),
        "CHI's command log holds the REQUEST_APPLY"
    );

    // Listings and their filters (newest first: the copy was recorded after the transfer).
    let both = ids(&[l.copy, l.transfer]);
    for (query, want) in [
        ("", both.clone()),
        ("?status=open", both.clone()),
        ("?status=pending", both.clone()),
        ("?status=queued", vec![]),
        ("?status=failed", vec![]),
        ("?site=TYO", vec![copy.clone()]),
        ("?site=sfo", both.clone()),
        ("?pool=parts", vec![copy.clone()]),
        ("?request=SFO-000001", vec![transfer.clone()]),
        (&format!("?request={}", l.request_a), vec![transfer.clone()]),
        ("?limit=1", vec![copy.clone()]),
        ("?status=open&site=CHI&pool=default", vec![transfer.clone()]),
    ] {
        assert_eq!(l.listed(query).await, want, "{query}");
    }
    for (query, field, message) in [
        ("?status=bogus", "status", "open, queued, pending, retry, applied, failed, superseded"),
        ("?limit=0", "limit", "1-1000"),
        ("?limit=1001", "limit", "1-1000"),
    ] {
        let (status, v) = l.get(&format!("/api/v1/request-ops{query}")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {v}");
        assert_eq!(v["code"], "validation_failed", "{v}");
        assert_eq!(v["details"][0]["field"], field, "{v}");
        assert!(v["details"][0]["message"].as_str().unwrap_or_default().contains(message), "{v}");
    }
    let (status, v) = l.get("/api/v1/request-ops?colour=red").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "unknown query field: {v}");

    // One operation; unknown ones are a typed 404.
    let (status, op) = l.get(&format!("/api/v1/request-ops/{transfer}/CHI")).await;
    assert_eq!(status, StatusCode::OK, "{op}");
    assert_eq!(
        (
            op["human_id"].as_str(),
            op["status"].as_str(),
            op["mode"].as_str(),
            op["source_site"].as_str()
        ),
        (Some("SFO-000001"), Some("pending"), Some("ownership"), Some("SFO"))
    );
    for path in [
        format!("/api/v1/request-ops/{}/CHI", Uuid::now_v7()),
        format!("/api/v1/request-ops/{transfer}/TYO"),
        "/api/v1/request-ops/not-a-uuid/CHI".to_owned(),
    ] {
        let (status, v) = l.get(&path).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "{path}: {v}"
        );
    }
    let (status, v) = l
        .call(
            Method::POST,
            &format!("/api/v1/request-ops/{}/CHI/cancel", Uuid::now_v7()),
            &l.admin,
            None,
        )
        .await;
    assert_eq!((status, v["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{v}");

    // The backlog per lane, ten minutes later by the API's clock.
    let (status, backlog) = l.get("/api/v1/request-ops/backlog").await;
    assert_eq!(status, StatusCode::OK, "{backlog}");
    let lanes: Vec<(String, String, u64, u64, f64)> = backlog["lanes"]
        .as_array()
        .expect("lanes")
        .iter()
        .map(|x| {
            (
                x["pool"].as_str().unwrap_or_default().to_owned(),
                x["target_site"].as_str().unwrap_or_default().to_owned(),
                x["open"].as_u64().unwrap_or(99),
                x["retrying"].as_u64().unwrap_or(99),
                x["oldest_age_seconds"].as_f64().unwrap_or(-1.0),
            )
        })
        .collect();
    assert_eq!(
        lanes,
        vec![
            ("default".into(), "CHI".into(), 1, 0, 600.0),
            ("parts".into(), "TYO".into(), 1, 0, 600.0)
        ]
    );
    assert_eq!(
        (
            &backlog["totals"]["open"],
            &backlog["totals"]["retrying"],
            &backlog["totals"]["oldest_age_seconds"]
        ),
        (&json!(2), &json!(0), &json!(600.0))
    );

    // The ledger's metrics, refreshed as the ledger loop does after a tick.
    let mut watch = meridian_controller::distribution::FailedWatch::default();
    meridian_controller::distribution::refresh_metrics(
        l.store.as_ref(),
        &l.metrics,
        &mut watch,
        l.clock.now(),
        true,
    )
    .await
    .expect("metrics");
    let text = l.metrics.render();
    for line in [
        r#"meridian_controller_request_ops_open{pool="default",target="CHI"} 1"#,
        r#"meridian_controller_request_ops_open{pool="parts",target="TYO"} 1"#,
        r#"meridian_controller_request_ops_oldest_age_seconds{pool="parts",target="TYO"} 600"#,
    ] {
        assert!(text.lines().any(|x| x.starts_with(line)), "{line} missing from\n{text}");
    }

    // The ownership is in flight under the transfer.
    let (status, owner) = l.get("/api/v1/requests/SFO-000001/ownership").await;
    assert_eq!(status, StatusCode::OK, "{owner}");
    assert_eq!(
        (&owner["master_site"], owner["in_flight_op"].as_str()),
        (&Value::Null, Some(transfer.as_str()))
    );

    // A viewer cannot cancel; an admin can, once.
    let cancel = format!("/api/v1/request-ops/{transfer}/CHI/cancel");
    let (status, v) = l.call(Method::POST, &cancel, &l.viewer, Some(json!({"reason": "no"}))).await;
    assert_eq!((status, v["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{v}");
    assert_eq!(l.listed("?status=pending").await, both, "the viewer changed nothing");
    let (status, op) =
        l.call(Method::POST, &cancel, &l.admin, Some(json!({"reason": "customer withdrew"}))).await;
    assert_eq!(status, StatusCode::OK, "{op}");
    assert_eq!(
        (op["status"].as_str(), op["result"].as_str(), op["reason"].as_str()),
        (Some("failed"), Some("cancelled"), Some("customer withdrew"))
    );
    let (_, owner) = l.get(&format!("/api/v1/requests/{}/ownership", l.request_a)).await;
    assert_eq!(
        (owner["master_site"].as_str(), &owner["in_flight_op"], owner["human_id"].as_str()),
        (Some("SFO"), &Value::Null, Some("SFO-000001")),
        "the master is back at the source: {owner}"
    );
    let owner_ops: Vec<&str> = owner["operations"]
        .as_array()
        .expect("operations")
        .iter()
        .filter_map(|o| o["op_id"].as_str())
        .collect();
    assert_eq!(owner_ops, vec![transfer.as_str()]);
    let results: Vec<_> = l
        .commands(&l.sfo)
        .await
        .into_iter()
        .filter_map(|c| match c {
            ControllerCommand::OperationResult(r) => Some((r.op_id, r.status)),
            _ => None,
        })
        .collect();
    assert_eq!(
        results,
        vec![(l.transfer, ResultStatus::Cancelled)],
        "SFO was told (flushed by the API)"
    );

    let (status, v) = l.call(Method::POST, &cancel, &l.admin, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(
        v["message"].as_str().unwrap_or_default().contains("only queued, pending or retrying"),
        "{v}"
    );
    let (status, v) = l
        .call(Method::POST, &format!("/api/v1/request-ops/{transfer}/CHI/retry"), &l.admin, None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("back at SFO; transfer the request again"),
        "{v}"
    );
    let (status, v) = l
        .call(Method::POST, &format!("/api/v1/request-ops/{transfer}/CHI/retry"), &l.viewer, None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");

    // A cancelled copy can be retried; without a body the reason names the token.
    let (status, op) = l
        .call(Method::POST, &format!("/api/v1/request-ops/{copy}/TYO/cancel"), &l.admin, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{op}");
    assert_eq!(op["reason"], "cancelled by bootstrap");
    let (status, v) = l
        .call(
            Method::POST,
            &format!("/api/v1/request-ops/{copy}/TYO/cancel"),
            &l.admin,
            Some(json!({"why": 1})),
        )
        .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_body")),
        "{v}"
    );
    assert_eq!(l.listed("?status=failed").await, both);
    let (status, op) = l
        .call(Method::POST, &format!("/api/v1/request-ops/{copy}/TYO/retry"), &l.admin, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{op}");
    assert_eq!(
        (op["status"].as_str(), op["attempt"].as_u64(), &op["result"]),
        (Some("pending"), Some(2), &Value::Null)
    );

    let (_, backlog) = l.get("/api/v1/request-ops/backlog").await;
    assert_eq!(backlog["lanes"].as_array().map(Vec::len), Some(1), "{backlog}");
    assert_eq!(backlog["totals"]["open"], 1);

    // New failures are counted by result; the emptied lane leaves the gauges.
    let mut watch = meridian_controller::distribution::FailedWatch::default();
    meridian_controller::distribution::refresh_metrics(
        l.store.as_ref(),
        &l.metrics,
        &mut watch,
        l.clock.now(),
        true,
    )
    .await
    .expect("metrics");
    let text = l.metrics.render();
    assert!(!text.contains(r#"request_ops_open{pool="default",target="CHI"}"#), "{text}");

    for path in [
        "/api/v1/requests/SFO-999999/ownership",
        &format!("/api/v1/requests/{}/ownership", Uuid::now_v7()),
    ] {
        let (status, v) = l.get(path).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "{path}: {v}"
        );
    }
}

#[tokio::test]
async fn the_ledger_is_listed_inspected_cancelled_and_retried_on_sqlite() {
    the_ledger_is_listed_inspected_cancelled_and_retried(&fresh_sqlite_url()).await;
}

#[tokio::test]
async fn the_ledger_is_listed_inspected_cancelled_and_retried_on_postgres() {
    the_ledger_is_listed_inspected_cancelled_and_retried(&fresh_postgres_url().await).await;
}

#[tokio::test]
async fn failures_are_counted_once_by_result_since_start_up() {
    use meridian_controller::distribution::{FailedWatch, refresh_metrics};
    let l = Ledger::start(&fresh_sqlite_url()).await;
    let now = l.clock.now();
    let cancel = |op: Uuid, target: &'static str| {
        let store = l.store.clone();
        async move {
            store.cancel_request_op(&op.to_string(), target, "test", now).await.expect("cancel");
        }
    };
    let failed = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|x| x.starts_with("meridian_controller_request_ops_failed_total{"))
            .map(str::to_owned)
            .collect()
    };
    // A failure before the first look is not counted: the counter counts since start-up.
    cancel(l.copy, "TYO").await;
    let mut watch = FailedWatch::default();
    refresh_metrics(l.store.as_ref(), &l.metrics, &mut watch, now, true).await.expect("metrics");
    assert_eq!(failed(&l.metrics.render()), Vec::<String>::new());
    cancel(l.transfer, "CHI").await;
    for _ in 0..2 {
        refresh_metrics(l.store.as_ref(), &l.metrics, &mut watch, now, true)
            .await
            .expect("metrics");
        assert_eq!(
            failed(&l.metrics.render()),
            vec![
                r#"meridian_controller_request_ops_failed_total{result="cancelled"} 1"#.to_owned()
            ],
            "counted once"
        );
    }
    // Retried and failing again counts again.
    l.store.retry_request_op(&l.copy.to_string(), "TYO", now).await.expect("retry");
    cancel(l.copy, "TYO").await;
    refresh_metrics(l.store.as_ref(), &l.metrics, &mut watch, now, true).await.expect("metrics");
    assert_eq!(
        failed(&l.metrics.render()),
        vec![r#"meridian_controller_request_ops_failed_total{result="cancelled"} 2"#.to_owned()]
    );
}

/// Signs in to the console with `token`; returns the cookie.
async fn sign_in(router: &Router, token: &str) -> ConsoleSignIn {
    meridian_controller::testing::console_sign_in(router, token).await
}

async fn console(router: &Router, req: Request<Body>) -> (StatusCode, Option<String>, String) {
    let resp = router.clone().oneshot(req).await.expect("response");
    let status = resp.status();
    let location =
        resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 22).await.expect("body");
    (status, location, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_console_shows_the_ledger_and_lets_admins_cancel() {
    let l = Ledger::start(&fresh_sqlite_url()).await;
    let page = |session: &ConsoleSignIn| session.get("/console/requests");
    let (status, location, _) =
        console(&l.router, Request::get("/console/requests").body(Body::empty()).expect("request"))
            .await;
    assert_eq!((status, location.as_deref()), (StatusCode::SEE_OTHER, Some("/console/login")));

    let viewer = sign_in(&l.router, &l.viewer).await;
    let (status, _, html) = console(&l.router, page(&viewer)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("SFO-000001") && html.contains("SFO-000002"), "{html}");
    assert!(html.contains(r#"href="/console/requests""#), "nav link: {html}");
    assert!(html.contains(r#"id="backlog""#) && html.contains(r#"data-pool="parts""#), "{html}");
    assert!(!html.contains("/console/requests/cancel"), "no buttons for viewers: {html}");
    let form = |session: &ConsoleSignIn, action: &str, op: Uuid, target: &str| {
        session.post(&format!("/console/requests/{action}"), &format!("op_id={op}&target={target}"))
    };
    let (status, _, _) = console(&l.router, form(&viewer, "cancel", l.transfer, "CHI")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let admin = sign_in(&l.router, &l.admin).await;
    let (_, _, html) = console(&l.router, page(&admin)).await;
    assert!(
        html.contains(&format!(r#"value="{}""#, l.transfer)) && html.contains("Cancel"),
        "{html}"
    );
    let (status, location, _) = console(&l.router, form(&admin, "cancel", l.transfer, "CHI")).await;
    assert_eq!(
        (status, location.as_deref()),
        (StatusCode::SEE_OTHER, Some("/console/requests?done=cancelled"))
    );
    let op = l.store.request_op(&l.transfer.to_string(), "CHI").await.expect("op").expect("exists");
    assert_eq!((op.status.as_str(), op.result.as_deref()), ("failed", Some("cancelled")));
    let (status, _, html) = console(&l.router, form(&admin, "retry", l.transfer, "CHI")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(html.contains("transfer the request again"), "{html}");
    let (_, _, html) = console(&l.router, page(&admin)).await;
    assert!(
        html.contains(r#"id="failed-ops""#) && html.contains("cancelled by bootstrap (console)"),
        "{html}"
    );
}

#[tokio::test]
async fn meridianctl_requests_commands_against_a_served_controller() {
    let l = Ledger::start(&fresh_sqlite_url()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = format!("http://{}", listener.local_addr().expect("addr"));
    let router = l.router.clone();
    let task = tokio::spawn(async move { axum::serve(listener, router).await });
    let dir = testing::temp_dir("meridianctl-requests");
    let token_file = dir.join("token");
    std::fs::write(&token_file, &l.admin).expect("token file");
    let run = |args: Vec<String>| {
        let (server, token_file) = (server.clone(), token_file.clone());
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meridianctl"))
                .args(["--server", &server, "--token-file"])
                .arg(&token_file)
                .args(&args)
                .env_remove("MERIDIAN_SERVER")
                .env_remove("MERIDIAN_TOKEN")
                .output()
                .await
                .expect("run meridianctl");
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let args = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    let (transfer, copy) = (l.transfer.to_string(), l.copy.to_string());

    let (code, out, err) = run(args("requests ops --status open")).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("OP") && lines[0].contains("REQUEST") && lines[0].contains("AGE"),
        "{out}"
    );
    assert!(
        lines[1].starts_with(&copy)
            && lines[1].contains("SFO → TYO")
            && lines[1].contains("pending"),
        "{out}"
    );
    assert!(lines[2].starts_with(&transfer) && lines[2].contains("SFO-000001"), "{out}");
    assert_eq!(lines.len(), 3, "{out}");

    let (code, out, _) = run(args("requests ops --pool parts -o json")).await;
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{out}");
    assert_eq!(v[0]["op_id"], copy.as_str());

    let (code, out, _) = run(args("requests backlog")).await;
    assert_eq!(code, 0);
    assert!(
        out.lines().any(|x| x.starts_with("parts") && x.contains("TYO") && x.ends_with("10m")),
        "{out}"
    );
    assert!(out.lines().last().is_some_and(|x| x.starts_with("TOTAL")), "{out}");

    let (code, out, _) = run(args(&format!("requests op {transfer} CHI"))).await;
    assert_eq!(code, 0);
    assert!(out.contains("SFO-000001") && out.contains("pending"), "{out}");

    let (code, out, err) = run(vec![
        "requests".into(),
        "cancel".into(),
        transfer.clone(),
        "CHI".into(),
        "--reason".into(),
        "wrong branch".into(),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cancelled") && out.contains("wrong branch"), "{out}");

    let (code, _, err) = run(args(&format!("requests retry {transfer} CHI"))).await;
    assert_eq!(code, 1);
    assert!(err.contains("transfer the request again"), "{err}");

    let (code, out, _) = run(args("requests owner SFO-000001")).await;
    assert_eq!(code, 0);
    assert!(out.lines().any(|x| x.starts_with("master:") && x.ends_with("SFO")), "{out}");
    assert!(out.contains(&transfer), "{out}");

    let (code, _, err) = run(args("requests owner SFO-424242")).await;
    assert_eq!(code, 1);
    assert!(err.contains("not found"), "{err}");

    task.abort();
}
