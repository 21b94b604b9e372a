//! Check-in of appointments at the branch, through the connector API, the kiosk and the
//! reception workstation (`Router::oneshot`, no controller), on a `ManualClock`: typed refusals,
//! the ticket, the attendance shown to reception and the events queued for central.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use chrono::{DateTime, TimeZone, Utc};
use meridian_agent::store::queries;
use meridian_agent::{Context, Settings};
use meridian_shared::appointments::AppointmentSnapshot;
use meridian_shared::clock::ManualClock;
use meridian_shared::config::SiteConfig;
use serde_json::{Value, json};
use tower::ServiceExt;

const KEY: &str = "mrd_ck_test-key";
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
            {"site": "SFO", "code": "GEN", "name": "General", "queue": "accounts"},
            {"site": "SFO", "code": "ACC", "name": "Accounts", "queue": "accounts",
             "appointments": {"slot_minutes": 15, "capacity": 2,
                              "check_in_early_minutes": 30, "check_in_late_minutes": 15}}
        ],
        "queues": [{"site": "SFO", "code": "accounts", "name": "Accounts", "letter": "B"}],
        "service_points": [{"site": "SFO", "code": "C1", "name": "Counter 1"}],
        "work_profiles": [],
        "connector_keys": [
            {"site": "SFO", "code": "kiosk", "name": "Kiosk", "key_hash": meridian_agent::auth::hash(KEY)}
        ],
        "staff": [
            {"username": "alice", "name": "Alice", "roles": ["staff"], "sites": ["SFO"],
             "password_hash": password_hash()}
        ]
    }))
    .expect("site config")
}

/// 2026-03-09 at `h:m` in San Francisco (UTC-7 that day).
fn sf(h: u32, m: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 9, h + 7, m, 0).unwrap()
}

struct Branch {
    ctx: Arc<Context>,
    clock: Arc<ManualClock>,
    api: Router,
    terminals: Router,
}

async fn branch() -> Branch {
    let dir =
        std::env::temp_dir().join(format!("meridian-check-in-{}", uuid::Uuid::new_v4().simple()));
    let settings = Settings { data_dir: dir, ..Settings::default() };
    let clock = Arc::new(ManualClock::new(sf(8, 0)));
    let ctx = Context::open(&settings, clock.clone()).await.expect("open");
    let config = site_config();
    let applied = config.clone();
    let now = ctx.clock.now();
    ctx.db.write(move |c| queries::apply_config(c, &applied, now)).await.expect("apply config");
    ctx.config.send_replace(Some(Arc::new(config)));
    Branch {
        api: meridian_agent::branch_api::router(ctx.clone()),
        terminals: meridian_agent::terminals::router(ctx.clone()),
        ctx,
        clock,
    }
}

/// Stores an appointment the way the link applies `APPOINTMENT_UPSERT`; returns its id.
async fn synced(b: &Branch, day: &str, hh_mm: &str, name: &str, status: &str) -> String {
    let id = uuid::Uuid::now_v7().to_string();
    let local: chrono::NaiveDateTime =
        chrono::NaiveDateTime::parse_from_str(&format!("{day}T{hh_mm}"), "%Y-%m-%dT%H:%M")
            .expect("start");
    let snap: AppointmentSnapshot = serde_json::from_value(json!({
        "id": id, "site": "SFO", "service": "ACC", "queue": "accounts",
        "start": format!("{day}T{hh_mm}"),
        "starts_at": (Utc.from_utc_datetime(&local) + chrono::Duration::hours(7)).to_rfc3339(),
        "local_day": day, "duration_minutes": 15, "customer_name": name,
        "external_ref": format!("CRM-{name}"), "status": status,
        "revision": 1, "updated_at": "2026-03-09T13:00:00Z"}))
    .expect("snapshot");
    let now = b.ctx.clock.now();
    b.ctx
        .db
        .write(move |c| meridian_agent::appointments::apply(c, &snap, now))
        .await
        .expect("apply");
    id
}

async fn call(
    router: &Router,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
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
    let resp = router.clone().oneshot(req.body(body).expect("request")).await.expect("response");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn statuses(ctx: &Context) -> Vec<String> {
    ctx.db
        .read(|c| {
            Ok(queries::outbox_after(c, 0, 10_000)?
                .into_iter()
                .filter(|e| e.kind == "APPOINTMENT_STATUS")
                .map(|e| {
                    let p: Value = serde_json::from_slice(&e.payload).unwrap_or_default();
                    p["status"].as_str().unwrap_or_default().to_owned()
                })
                .collect())
        })
        .await
        .expect("outbox")
}

#[tokio::test]
async fn the_connector_api_checks_in_by_reference_and_refuses_with_typed_errors() {
    let b = branch().await;
    let ann = synced(&b, "2026-03-09", "10:00", "Ann", "booked").await;
    let bo = synced(&b, "2026-03-09", "10:15", "Bo", "cancelled").await;
    let cy = synced(&b, "2026-03-10", "10:00", "Cy", "booked").await;
    let reference = ann.parse::<meridian_shared::AppointmentId>().expect("id").reference();
    let by_text = |text: String| {
        let api = b.api.clone();
        async move {
            call(
                &api,
                Method::POST,
                "/api/v1/appointments/check-in",
                Some(json!({"reference": text})),
            )
            .await
        }
    };
    let check = |(status, body): (StatusCode, Value), expected: StatusCode, code: &str| {
        assert_eq!((status, body["code"].as_str()), (expected, Some(code)), "{body}");
        body
    };
    // The listing shows the booking reference.
    let (_, listed) = call(&b.api, Method::GET, "/api/v1/appointments", None).await;
    assert_eq!(listed[0]["reference"], reference.to_string());
    assert_eq!(listed[0]["attendance"], Value::Null);

    check(by_text("ZZZZ-ZZZZ".into()).await, StatusCode::NOT_FOUND, "unknown_appointment");
    let early = check(by_text(reference.to_string()).await, StatusCode::CONFLICT, "too_early");
    assert!(early["message"].as_str().expect("message").contains("09:30-10:15"), "{early}");
    b.clock.set(sf(10, 16));
    let late = check(by_text(reference.to_string()).await, StatusCode::CONFLICT, "too_late");
    assert!(late["message"].as_str().expect("message").contains("closed at 10:15"), "{late}");
    b.clock.set(sf(9, 40));
    check(by_text(bo.clone()).await, StatusCode::CONFLICT, "appointment_cancelled");
    check(by_text("CRM-Cy".into()).await, StatusCode::CONFLICT, "not_today");
    check(by_text("  ".into()).await, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    let (status, _) =
        call(&b.api, Method::POST, "/api/v1/appointments/check-in", Some(json!({"ref": "x"})))
            .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    check(
        call(&b.api, Method::POST, "/api/v1/appointments/not-an-id/check-in", None).await,
        StatusCode::NOT_FOUND,
        "unknown_appointment",
    );
    assert!(statuses(&b.ctx).await.is_empty(), "refusals write nothing");

    // Scanned QR text, lower case, without the dash.
    let qr = format!("meridian:appt:{}", reference.to_string().replace('-', "").to_lowercase());
    let (status, done) = by_text(qr).await;
    assert_eq!(status, StatusCode::CREATED, "{done}");
    assert_eq!(done["appointment"]["attendance"], "arrived");
    assert_eq!(done["visit"]["queue"], "accounts");
    let ticket = done["visit"]["ticket"].as_str().expect("ticket").to_owned();
    assert_eq!(done["appointment"]["ticket"], ticket);
    let again = check(
        call(&b.api, Method::POST, &format!("/api/v1/appointments/{ann}/check-in"), None).await,
        StatusCode::CONFLICT,
        "already_checked_in",
    );
    assert_eq!(again["visit"]["ticket"], ticket, "the existing ticket: {again}");
    assert_eq!(statuses(&b.ctx).await, ["arrived"]);
    // Reception checks Cy in by id on the day.
    b.clock.set(sf(9, 40) + chrono::Duration::days(1));
    let (status, cy_done) =
        call(&b.api, Method::POST, &format!("/api/v1/appointments/{cy}/check-in"), None).await;
    assert_eq!(status, StatusCode::CREATED, "{cy_done}");
}

#[tokio::test]
async fn the_kiosk_and_reception_check_customers_in() {
    let b = branch().await;
    let ann = synced(&b, "2026-03-09", "10:00", "Ann", "booked").await;
    let bo = synced(&b, "2026-03-09", "10:30", "Bo", "booked").await;
    b.clock.set(sf(9, 45));
    let form = |path: &str, cookies: &str, body: String| {
        Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("cookie", cookies)
            .body(Body::from(body))
            .expect("request")
    };
    let get = |path: String, cookies: String| {
        let terminals = b.terminals.clone();
        async move {
            let req = Request::builder().uri(path).header("cookie", cookies);
            let resp = terminals.oneshot(req.body(Body::empty()).expect("request")).await;
            let resp = resp.expect("page");
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
            (status, String::from_utf8(body.to_vec()).expect("html"))
        }
    };
    let (_, kiosk) = get("/kiosk".into(), String::new()).await;
    assert!(kiosk.contains(r#"action="/kiosk/check-in""#), "{kiosk}");

    // The kiosk: a scanned QR code gives the ticket.
    let reference = ann.parse::<meridian_shared::AppointmentId>().expect("id").reference();
    let scanned = b
        .terminals
        .clone()
        .oneshot(form("/kiosk/check-in", "", format!("reference=MERIDIAN%3AAPPT%3A{reference}")))
        .await
        .expect("check in");
    assert_eq!(scanned.status(), StatusCode::SEE_OTHER);
    let location = scanned.headers()["location"].to_str().expect("location").to_owned();
    assert!(location.starts_with("/kiosk/tickets/"), "{location}");
    let (status, ticket) = get(location, String::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(ticket.contains(r#"id="ticket-number">B001<"#), "{ticket}");
    // A refusal is clear and has its status.
    let refused = b
        .terminals
        .clone()
        .oneshot(form("/kiosk/check-in", "", format!("reference={reference}")))
        .await
        .expect("again");
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    let body = axum::body::to_bytes(refused.into_body(), 1 << 20).await.expect("body");
    assert!(String::from_utf8_lossy(&body).contains("already checked in with ticket B001"));

    // Reception: today's appointments with their status and a "Check in" button.
    let login = b
        .terminals
        .clone()
        .oneshot(form(
            "/workstation/login",
            "",
            "username=alice&password=correct+horse&counter=C1".into(),
        ))
        .await
        .expect("login");
    let cookies = login
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next().map(str::to_owned))
        .collect::<Vec<_>>()
        .join("; ");
    let (_, page) = get("/workstation".into(), cookies.clone()).await;
    assert!(page.contains(&format!(r#"data-appointment="{ann}""#)), "{page}");
    assert!(page.contains(">arrived<"), "Ann is shown as arrived: {page}");
    assert!(page.contains(&format!(r#"name="appointment" value="{bo}""#)), "Bo can be checked in");
    // Bo is too early at 09:45 (window opens 10:00); reception sees why.
    let early = b
        .terminals
        .clone()
        .oneshot(form("/workstation/check-in", &cookies, format!("appointment={bo}")))
        .await
        .expect("check in");
    let location = early.headers()["location"].to_str().expect("location").to_owned();
    assert!(location.contains("too+early"), "{location}");
    b.clock.set(sf(10, 5));
    let done = b
        .terminals
        .clone()
        .oneshot(form("/workstation/check-in", &cookies, format!("appointment={bo}")))
        .await
        .expect("check in");
    let location = done.headers()["location"].to_str().expect("location").to_owned();
    assert!(location.contains("Checked+in+Bo%3A+ticket+B002"), "{location}");
    // Without a session, no check-in.
    let anonymous = b
        .terminals
        .clone()
        .oneshot(form("/workstation/check-in", "", format!("appointment={bo}")))
        .await
        .expect("anonymous");
    assert_eq!(anonymous.headers()["location"], "/workstation?msg=Please+log+in");
    assert_eq!(statuses(&b.ctx).await, ["arrived", "arrived"]);
    // Calling the next customer at the workstation calls Ann first (10:00 before 10:30).
    b.terminals
        .clone()
        .oneshot(form("/workstation/action", &cookies, "action=call-next".into()))
        .await
        .expect("call next");
    let (_, page) = get("/workstation".into(), cookies).await;
    assert!(page.contains(r#"id="current-ticket">B001<"#), "{page}");
    assert_eq!(statuses(&b.ctx).await, ["arrived", "arrived", "called"]);
}
