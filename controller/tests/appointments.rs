//! Central booking through `/api/v1/appointments` on SQLite and PostgreSQL, with a manual
//! clock: slot numbers, every bad input refused with its 4xx and nothing written, optimistic
//! concurrency on reschedule and cancel, capacity under concurrent bookings, daylight-saving
//! changes in Los Angeles; and meridianctl's appointment commands over a real listener.

use std::future::IntoFuture;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use chrono::{TimeZone, Utc};
use meridian_controller::api::{self, ApiState};
use meridian_controller::config_admin::{self, ChangeMode, ResourceInput};
use meridian_controller::metrics::Metrics;
use meridian_controller::store::{self, Role, Store};
use meridian_controller::testing::{fresh_postgres_url, fresh_sqlite_url};
use meridian_shared::clock::ManualClock;
use serde_json::{Value, json};
use tower::ServiceExt;

struct Api {
    router: axum::Router,
    admin: String,
    viewer: String,
}

/// SFO (Los Angeles): weekdays 09:00-12:00 and 13:00-17:00, Sundays 00:00-04:00 (a night desk,
/// to meet both daylight-saving changes), closed on 2026-03-10. ACC: 15-minute slots for 2;
/// ONE: 30-minute slots for 1; GEN takes no appointments. The clock: 2026-03-01 12:00 UTC.
async fn api(store: Arc<dyn Store>) -> Api {
    let admin = meridian_controller::server::ensure_bootstrap_token(store.as_ref(), None)
        .await
        .expect("token")
        .expect("first token");
    let (token, viewer) = api::new_api_token("viewer", Role::Viewer);
    store.insert_api_token(&token).await.expect("viewer token");
    let weekday = json!(["09:00-12:00", "13:00-17:00"]);
    let resources = [
        json!({"kind": "site", "code": "SFO", "name": "San Francisco", "time_zone": "America/Los_Angeles",
               "business_hours": {"mon": weekday, "tue": weekday, "wed": weekday, "thu": weekday,
                                  "fri": weekday, "sun": ["00:00-04:00"]},
               "closed_dates": ["2026-03-10"]}),
        json!({"kind": "queue", "site": "SFO", "code": "general", "name": "General", "letter": "A"}),
        json!({"kind": "service", "site": "SFO", "code": "ACC", "name": "Accounts", "queue": "general",
               "appointments": {"slot_minutes": 15, "capacity": 2}}),
        json!({"kind": "service", "site": "SFO", "code": "ONE", "name": "Advice", "queue": "general",
               "appointments": {"slot_minutes": 30, "capacity": 1}}),
        json!({"kind": "service", "site": "SFO", "code": "GEN", "name": "General", "queue": "general"}),
    ];
    let inputs: Vec<ResourceInput> =
        resources.into_iter().map(|r| serde_json::from_value(r).expect("resource")).collect();
    config_admin::change(store.as_ref(), "test", inputs, vec![], ChangeMode::Upsert)
        .await
        .expect("config");
    let state = ApiState {
        store,
        metrics: Arc::new(Metrics::default()),
        commands_changed: Arc::new(tokio::sync::watch::channel(0).0),
        clock_skew_tolerance: meridian_controller::Settings::default().clock_skew_tolerance(),
    };
    let clock = Arc::new(ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()));
    Api { router: api::router_with_clock(state, 1 << 20, clock), admin, viewer }
}

impl Api {
    async fn call(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(body.map(|b| Body::from(b.to_owned())).unwrap_or_else(Body::empty))
            .expect("request");
        let resp = self.router.clone().oneshot(req).await.expect("response");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            panic!("{method} {path}: not JSON: {}", String::from_utf8_lossy(&bytes))
        });
        (status, value)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(&self.viewer, "GET", path, None).await
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.call(&self.admin, "POST", path, Some(&body.to_string())).await
    }

    async fn book(&self, service: &str, start: &str, name: &str) -> (StatusCode, Value) {
        let body =
            json!({"site": "SFO", "service": service, "start": start, "customer_name": name});
        self.post("/api/v1/appointments", &body).await
    }

    /// Every appointment, in start order.
    async fn all(&self) -> Value {
        let (status, list) = self.get("/api/v1/appointments").await;
        assert_eq!(status, StatusCode::OK, "{list}");
        list
    }

    async fn slots(&self, service: &str, date: &str) -> Value {
        let (status, day) = self
            .get(&format!("/api/v1/appointments/slots?site=SFO&service={service}&date={date}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{day}");
        day
    }

    /// The slot of `day` starting at local `start`: (booked, remaining, UTC start).
    async fn slot(&self, service: &str, start: &str) -> (u64, u64, String) {
        let day = self.slots(service, &start[..10]).await;
        let slot = day["slots"]
            .as_array()
            .expect("slots")
            .iter()
            .find(|s| s["start"] == start)
            .unwrap_or_else(|| panic!("no slot {start} in {day}"))
            .clone();
        (
            slot["booked"].as_u64().expect("booked"),
            slot["remaining"].as_u64().expect("remaining"),
            slot["starts_at"].as_str().expect("starts_at").to_owned(),
        )
    }
}

/// Asserts a typed error body with `code` (and `field` among its details, when given).
fn refused(resp: &(StatusCode, Value), status: StatusCode, code: &str, field: Option<&str>) {
    let (got, body) = resp;
    assert_eq!(*got, status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(body["message"].is_string(), "{body}");
    if let Some(field) = field {
        let fields: Vec<&str> = body["details"]
            .as_array()
            .map(|d| d.iter().filter_map(|e| e["field"].as_str()).collect())
            .unwrap_or_default();
        assert!(fields.contains(&field), "{field} not in {body}");
    }
}

async fn booking_and_bad_input(store: Arc<dyn Store>) {
    let api = api(store).await;

    // An empty Monday: 12 + 16 slots of 15 minutes, 2 seats each, 09:00 PDT = 16:00 UTC.
    let day = api.slots("ACC", "2026-03-09").await;
    let slots = day["slots"].as_array().expect("slots");
    assert_eq!(slots.len(), 28);
    assert_eq!(
        (day["time_zone"].as_str(), day["slot_minutes"].as_u64()),
        (Some("America/Los_Angeles"), Some(15))
    );
    assert_eq!(slots[0]["start"], "2026-03-09T09:00");
    assert_eq!(slots[0]["starts_at"], "2026-03-09T16:00:00Z");
    assert_eq!(slots[12]["start"], "2026-03-09T13:00");
    assert!(slots.iter().all(|s| s["capacity"] == 2
        && s["booked"] == 0
        && s["remaining"] == 2
        && s["bookable"] == true));

    // Two bookings fill 09:15; the third is refused.
    let (status, first) = api.book("ACC", "2026-03-09T09:15", "Ann Lee").await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(
        (&first["start"], &first["starts_at"], &first["local_day"], &first["duration_minutes"]),
        (
            &json!("2026-03-09T09:15"),
            &json!("2026-03-09T16:15:00Z"),
            &json!("2026-03-09"),
            &json!(15)
        )
    );
    assert_eq!((&first["status"], &first["revision"]), (&json!("booked"), &json!(1)));
    assert_eq!(api.slot("ACC", "2026-03-09T09:15").await, (1, 1, "2026-03-09T16:15:00Z".into()));
    let (status, second) = api.book("ACC", "2026-03-09T09:15", "Bo Chen").await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    refused(
        &api.book("ACC", "2026-03-09T09:15", "Cy Diaz").await,
        StatusCode::CONFLICT,
        "slot_full",
        None,
    );
    assert_eq!(api.slot("ACC", "2026-03-09T09:15").await.0, 2);
    let (status, shown) =
        api.get(&format!("/api/v1/appointments/{}", first["id"].as_str().expect("id"))).await;
    assert_eq!((status, &shown), (StatusCode::OK, &first));
    let with_ref = json!({"site": "SFO", "service": "ACC", "start": "2026-03-09T10:00", "customer_name": "Dee",
                          "customer_contact": "+1 415 555 0100", "notes": "wheelchair\naccess", "external_ref": "CRM-1"});
    let (status, third) = api.post("/api/v1/appointments", &with_ref).await;
    assert_eq!(status, StatusCode::CREATED, "{third}");
    assert_eq!(
        (&third["external_ref"], &third["notes"]),
        (&json!("CRM-1"), &json!("wheelchair\naccess"))
    );
    let before = api.all().await;
    assert_eq!(before.as_array().map(Vec::len), Some(3));

    // Every bad input: its 4xx, and nothing written.
    let base = json!({"site": "SFO", "service": "ACC", "start": "2026-03-09T11:00", "customer_name": "Eve"});
    let with = |field: &str, value: Value| {
        let mut body = base.clone();
        body[field] = value;
        body
    };
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    let cases: Vec<(Value, StatusCode, &str, Option<&str>)> = vec![
        (with("site", json!("LAX")), unprocessable, "validation_failed", Some("site")),
        (with("site", json!("sfo")), unprocessable, "validation_failed", Some("site")),
        (with("service", json!("NOPE")), unprocessable, "validation_failed", Some("service")),
        (with("service", json!("GEN")), unprocessable, "validation_failed", Some("service")),
        (
            with("start", json!("2026-03-09 11:00")),
            unprocessable,
            "validation_failed",
            Some("start"),
        ),
        (
            with("start", json!("2026-03-09T12:15")),
            unprocessable,
            "validation_failed",
            Some("start"),
        ),
        (
            with("start", json!("2026-03-09T08:45")),
            unprocessable,
            "validation_failed",
            Some("start"),
        ),
        (
            with("start", json!("2026-03-09T11:10")),
            unprocessable,
            "validation_failed",
            Some("start"),
        ),
        (
            with("start", json!("2026-03-10T11:00")),
            unprocessable,
            "validation_failed",
            Some("start"),
        ),
        (
            with("start", json!("2026-03-14T11:00")),
            unprocessable,
            "validation_failed",
            Some("start"),
        ),
        (
            with("start", json!("2026-02-27T11:00")),
            unprocessable,
            "validation_failed",
            Some("start"),
        ),
        (
            with("start", json!("2027-03-15T11:00")),
            unprocessable,
            "validation_failed",
            Some("start"),
        ),
        // Spring forward in Los Angeles: 02:00-02:59 on 2026-03-08 does not exist.
        (
            with("start", json!("2026-03-08T02:30")),
            unprocessable,
            "validation_failed",
            Some("start"),
        ),
        (
            with("customer_name", json!("  ")),
            unprocessable,
            "validation_failed",
            Some("customer_name"),
        ),
        (
            with("customer_name", json!("x".repeat(121))),
            unprocessable,
            "validation_failed",
            Some("customer_name"),
        ),
        (
            with("customer_contact", json!("x".repeat(255))),
            unprocessable,
            "validation_failed",
            Some("customer_contact"),
        ),
        (with("notes", json!("x".repeat(501))), unprocessable, "validation_failed", Some("notes")),
        (
            with("external_ref", json!("a\u{7}b")),
            unprocessable,
            "validation_failed",
            Some("external_ref"),
        ),
        (with("external_ref", json!("CRM-1")), StatusCode::CONFLICT, "external_ref_taken", None),
        (with("planet", json!("Mars")), unprocessable, "invalid_body", None),
        (json!({"site": "SFO"}), unprocessable, "invalid_body", None),
    ];
    for (body, status, code, field) in &cases {
        let resp = api.post("/api/v1/appointments", body).await;
        refused(&resp, *status, code, *field);
    }
    // ONE has 30-minute slots: 11:45 is off its grid.
    let mut off_grid = with("service", json!("ONE"));
    off_grid["start"] = json!("2026-03-09T11:45");
    refused(
        &api.post("/api/v1/appointments", &off_grid).await,
        unprocessable,
        "validation_failed",
        Some("start"),
    );
    // The DST gap says why.
    let (_, gap) =
        api.post("/api/v1/appointments", &with("start", json!("2026-03-08T02:30"))).await;
    assert!(
        gap["details"][0]["message"].as_str().is_some_and(|m| m.contains("does not exist")),
        "{gap}"
    );
    // Several problems at once are all reported.
    let (_, many) = api
        .post(
            "/api/v1/appointments",
            &json!({"site": "SFO", "service": "ACC", "start": "soon", "customer_name": ""}),
        )
        .await;
    assert_eq!(many["details"].as_array().map(Vec::len), Some(2), "{many}");
    let malformed = api.call(&api.admin, "POST", "/api/v1/appointments", Some("{\"site\": ")).await;
    refused(&malformed, StatusCode::BAD_REQUEST, "malformed_json", None);
    let viewer =
        api.call(&api.viewer, "POST", "/api/v1/appointments", Some(&base.to_string())).await;
    refused(&viewer, StatusCode::FORBIDDEN, "forbidden", None);
    assert_eq!(api.all().await, before, "nothing was written");

    // Reads: unknown ids are 404; bad filters and slot queries are 422.
    for id in ["0190f0f0-0000-7000-8000-000000000000", "not-an-id"] {
        refused(
            &api.get(&format!("/api/v1/appointments/{id}")).await,
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        );
    }
    for (query, field) in [
        ("site=LAX", "site"),
        ("from=yesterday", "from"),
        ("from=2026-03-10&to=2026-03-09", "to"),
        ("status=lost", "status"),
        ("limit=0", "limit"),
        ("colour=red", "query"),
        ("conflict=maybe", "query"),
    ] {
        refused(
            &api.get(&format!("/api/v1/appointments?{query}")).await,
            unprocessable,
            "validation_failed",
            Some(field),
        );
    }
    for (query, field) in [
        ("site=LAX&service=ACC&date=2026-03-09", "site"),
        ("site=SFO&service=GEN&date=2026-03-09", "service"),
        ("site=SFO&service=ACC&date=09.03.2026", "date"),
        ("site=SFO&service=ACC", "query"),
    ] {
        refused(
            &api.get(&format!("/api/v1/appointments/slots?{query}")).await,
            unprocessable,
            "validation_failed",
            Some(field),
        );
    }
    let closed = api.slots("ACC", "2026-03-10").await;
    assert_eq!(closed["slots"], json!([]), "closed date");

    // Filters.
    let (_, day) =
        api.get("/api/v1/appointments?site=SFO&from=2026-03-09&to=2026-03-09&status=booked").await;
    assert_eq!(day, before);
    let (_, none) = api.get("/api/v1/appointments?from=2026-03-10").await;
    assert_eq!(none, json!([]));
    let (_, flagged) = api.get("/api/v1/appointments?conflict=true").await;
    assert_eq!(flagged, json!([]), "nothing is flagged without a branch");
    // Every booking shows its booking reference and its state.
    let first = &before[0];
    let id: meridian_shared::AppointmentId = first["id"].as_str().expect("id").parse().expect("id");
    assert_eq!(first["reference"], id.reference().to_string());
    assert_eq!((&first["state"], &first["attendance"]), (&json!("created"), &Value::Null));
}

async fn reschedule_and_cancel(store: Arc<dyn Store>) {
    let api = api(store).await;
    let (_, a) = api.book("ACC", "2026-03-09T09:15", "Ann").await;
    let (_, b) = api.book("ACC", "2026-03-09T09:15", "Bo").await;
    let (_, c) = api.book("ACC", "2026-03-09T09:30", "Cy").await;
    let id = |v: &Value| v["id"].as_str().expect("id").to_owned();
    let path = |v: &Value, action: &str| format!("/api/v1/appointments/{}/{action}", id(v));

    // A moves to 10:00: revision 2, the seat at 09:15 is free again.
    let (status, moved) = api
        .post(
            &path(&a, "reschedule"),
            &json!({"start": "2026-03-09T10:00", "expected_revision": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{moved}");
    assert_eq!(
        (&moved["start"], &moved["starts_at"], &moved["revision"]),
        (&json!("2026-03-09T10:00"), &json!("2026-03-09T17:00:00Z"), &json!(2))
    );
    assert_eq!(api.slot("ACC", "2026-03-09T09:15").await.0, 1);
    assert_eq!(api.slot("ACC", "2026-03-09T10:00").await.0, 1);

    // A stale revision changes nothing.
    let stale = api
        .post(
            &path(&a, "reschedule"),
            &json!({"start": "2026-03-09T11:00", "expected_revision": 1}),
        )
        .await;
    refused(&stale, StatusCode::CONFLICT, "stale_revision", None);
    let (_, shown) = api.get(&format!("/api/v1/appointments/{}", id(&a))).await;
    assert_eq!(shown, moved);

    // Into a full slot: refused, unchanged. Into its own full slot: fine (it keeps its seat).
    let (_, d) = api.book("ACC", "2026-03-09T09:15", "Dee").await;
    assert_eq!(api.slot("ACC", "2026-03-09T09:15").await.0, 2);
    let full = api
        .post(
            &path(&a, "reschedule"),
            &json!({"start": "2026-03-09T09:15", "expected_revision": 2}),
        )
        .await;
    refused(&full, StatusCode::CONFLICT, "slot_full", None);
    let (_, shown) = api.get(&format!("/api/v1/appointments/{}", id(&a))).await;
    assert_eq!(shown, moved);
    let (status, same) = api
        .post(
            &path(&b, "reschedule"),
            &json!({"start": "2026-03-09T09:15", "expected_revision": 1}),
        )
        .await;
    assert_eq!((status, &same["revision"]), (StatusCode::OK, &json!(2)), "{same}");
    // Bad reschedules: 422 with the field, 404 for an unknown appointment.
    for start in ["2026-03-09T12:30", "2026-03-10T09:00", "2026-02-27T09:00", "later"] {
        let bad = api
            .post(&path(&c, "reschedule"), &json!({"start": start, "expected_revision": 1}))
            .await;
        refused(&bad, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", Some("start"));
    }
    let unknown = api
        .post(
            "/api/v1/appointments/0190f0f0-0000-7000-8000-000000000000/reschedule",
            &json!({"start": "2026-03-09T11:00", "expected_revision": 1}),
        )
        .await;
    refused(&unknown, StatusCode::NOT_FOUND, "not_found", None);
    let (_, shown) = api.get(&format!("/api/v1/appointments/{}", id(&c))).await;
    assert_eq!(shown, c, "C is unchanged");

    // Cancel: a stale revision is refused; then cancelled with its reason; again is refused.
    let stale = api.post(&path(&d, "cancel"), &json!({"expected_revision": 7})).await;
    refused(&stale, StatusCode::CONFLICT, "stale_revision", None);
    let (status, cancelled) = api
        .post(&path(&d, "cancel"), &json!({"expected_revision": 1, "reason": "customer called"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(
        (&cancelled["status"], &cancelled["revision"], &cancelled["cancel_reason"]),
        (&json!("cancelled"), &json!(2), &json!("customer called"))
    );
    refused(
        &api.post(&path(&d, "cancel"), &json!({})).await,
        StatusCode::CONFLICT,
        "already_cancelled",
        None,
    );
    let moved_cancelled = api
        .post(
            &path(&d, "reschedule"),
            &json!({"start": "2026-03-09T11:00", "expected_revision": 2}),
        )
        .await;
    refused(&moved_cancelled, StatusCode::CONFLICT, "already_cancelled", None);
    // A cancel without a body works too; its seat is free at once.
    let (status, _) = api.call(&api.admin, "POST", &path(&c, "cancel"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(api.slot("ACC", "2026-03-09T09:15").await, (1, 1, "2026-03-09T16:15:00Z".into()));
    let (status, _) = api.book("ACC", "2026-03-09T09:15", "Eve").await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, cancelled_list) = api.get("/api/v1/appointments?status=cancelled").await;
    let names: Vec<&str> = cancelled_list
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|a| a["customer_name"].as_str())
        .collect();
    assert_eq!(names, ["Dee", "Cy"]);
}

async fn daylight_saving(store: Arc<dyn Store>) {
    let api = api(store).await;
    // Spring forward (2026-03-08): 02:00-02:59 is skipped, so no slots there.
    let day = api.slots("ACC", "2026-03-08").await;
    let starts: Vec<&str> = day["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .filter_map(|s| s["start"].as_str())
        .collect();
    assert_eq!(starts.len(), 12);
    assert!(!starts.iter().any(|s| s.contains("T02:")), "{starts:?}");
    assert_eq!(api.slot("ACC", "2026-03-08T01:45").await.2, "2026-03-08T09:45:00Z");
    assert_eq!(api.slot("ACC", "2026-03-08T03:00").await.2, "2026-03-08T10:00:00Z");
    let (status, after_gap) = api.book("ACC", "2026-03-08T03:00", "Ann").await;
    assert_eq!(
        (status, &after_gap["starts_at"]),
        (StatusCode::CREATED, &json!("2026-03-08T10:00:00Z"))
    );

    // Fall back (2026-11-01): 01:30 happens twice; the booking takes the earlier (PDT) instant.
    let (status, twice) = api.book("ACC", "2026-11-01T01:30", "Bo").await;
    assert_eq!(status, StatusCode::CREATED, "{twice}");
    assert_eq!(
        (&twice["start"], &twice["starts_at"]),
        (&json!("2026-11-01T01:30"), &json!("2026-11-01T08:30:00Z"))
    );
    let day = api.slots("ACC", "2026-11-01").await;
    let slots = day["slots"].as_array().expect("slots");
    assert_eq!(slots.len(), 16, "each wall-clock slot once");
    assert_eq!(api.slot("ACC", "2026-11-01T01:30").await, (1, 1, "2026-11-01T08:30:00Z".into()));
    assert_eq!(api.slot("ACC", "2026-11-01T02:00").await.2, "2026-11-01T10:00:00Z");
    let (_, listed) = api.get("/api/v1/appointments?from=2026-11-01&to=2026-11-01").await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
}

/// Eight bookings race for the last seat of each of six slots (48 at once): exactly one per
/// slot gets it.
async fn racing_for_the_last_seat(store: Arc<dyn Store>) {
    let api = Arc::new(api(store).await);
    let starts = ["09:00", "09:30", "10:00", "10:30", "11:00", "11:30"];
    let mut tasks = Vec::new();
    for i in 0..8 {
        for start in starts {
            let api = api.clone();
            tasks.push(tokio::spawn(async move {
                let resp =
                    api.book("ONE", &format!("2026-03-09T{start}"), &format!("Racer {i}")).await;
                (start, resp)
            }));
        }
    }
    let mut created = std::collections::BTreeMap::new();
    for task in tasks {
        let (start, resp) = task.await.expect("task");
        if resp.0 == StatusCode::CREATED {
            *created.entry(start).or_insert(0) += 1;
        } else {
            refused(&resp, StatusCode::CONFLICT, "slot_full", None);
        }
    }
    assert_eq!(created, starts.iter().map(|s| (*s, 1)).collect());
    assert_eq!(api.slot("ONE", "2026-03-09T09:00").await, (1, 0, "2026-03-09T16:00:00Z".into()));
    assert_eq!(api.all().await.as_array().map(Vec::len), Some(starts.len()));
}

#[tokio::test]
async fn booking_and_bad_input_on_sqlite() {
    booking_and_bad_input(store::open(&fresh_sqlite_url()).await.expect("sqlite")).await;
}

#[tokio::test]
async fn booking_and_bad_input_on_postgres() {
    booking_and_bad_input(store::open(&fresh_postgres_url().await).await.expect("postgres")).await;
}

#[tokio::test]
async fn reschedule_and_cancel_on_sqlite() {
    reschedule_and_cancel(store::open(&fresh_sqlite_url()).await.expect("sqlite")).await;
}

#[tokio::test]
async fn reschedule_and_cancel_on_postgres() {
    reschedule_and_cancel(store::open(&fresh_postgres_url().await).await.expect("postgres")).await;
}

#[tokio::test]
async fn daylight_saving_on_sqlite() {
    daylight_saving(store::open(&fresh_sqlite_url()).await.expect("sqlite")).await;
}

#[tokio::test]
async fn daylight_saving_on_postgres() {
    daylight_saving(store::open(&fresh_postgres_url().await).await.expect("postgres")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_for_the_last_seat_on_sqlite() {
    racing_for_the_last_seat(store::open(&fresh_sqlite_url()).await.expect("sqlite")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_for_the_last_seat_on_postgres() {
    racing_for_the_last_seat(store::open(&fresh_postgres_url().await).await.expect("postgres"))
        .await;
}

/// meridianctl's appointment commands against the API on a real listener.
#[tokio::test]
async fn meridianctl_books_lists_and_cancels() {
    use meridian_controller::appointments::{BookRequest, CancelRequest};
    use meridian_controller::ctl::{Client, CtlError, Output, appointments as appt};
    let api = api(store::open(&fresh_sqlite_url()).await.expect("sqlite")).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(axum::serve(listener, api.router.clone()).into_future());
    let client = Client::new(&server, Some(api.admin.clone())).expect("client");

    let req = BookRequest {
        site: "SFO".into(),
        service: "ONE".into(),
        start: "2026-03-09T09:30".into(),
        customer_name: "Ann Lee".into(),
        external_ref: Some("CRM-7".into()),
        ..Default::default()
    };
    let booked = appt::book(&client, &req).await.expect("book");
    let shown = appt::render_one(&booked, Output::Table).expect("render");
    assert!(shown.contains("2026-03-09 09:30 (site time)") && shown.contains("CRM-7"), "{shown}");
    match appt::book(&client, &req).await {
        Err(CtlError::Api(f)) => assert_eq!(f.code, "external_ref_taken"),
        other => panic!("expected a refusal, got {other:?}"),
    }

    let filter =
        appt::ListFilter { site: Some("SFO"), from: Some("2026-03-09"), ..Default::default() };
    let listed = appt::list(&client, &filter).await.expect("list");
    let table = appt::render_list(&listed, Output::Table).expect("table");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(lines[0].starts_with("ID") && lines[0].contains("START (LOCAL)"), "{table}");
    assert!(
        lines[1].contains("2026-03-09 09:30")
            && lines[1].contains("Ann Lee")
            && lines[1].contains("booked"),
        "{table}"
    );

    let day = appt::slots(&client, "SFO", "ONE", "2026-03-09").await.expect("slots");
    let table = appt::render_slots(&day, Output::Table).expect("slots table");
    assert!(
        table.starts_with("SFO ONE on 2026-03-09 (America/Los_Angeles, 30-minute slots)\nSTART"),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.starts_with("09:30")
            && l.contains("2026-03-09 16:30Z")
            && l.ends_with("no")),
        "{table}"
    );

    let id = booked.id.to_string();
    let moved = appt::reschedule(&client, &id, "2026-03-09T10:00", None).await.expect("reschedule");
    assert_eq!((moved.start.as_str(), moved.revision), ("2026-03-09T10:00", 2));
    let req = CancelRequest { expected_revision: Some(2), reason: Some("ill".into()) };
    let cancelled = appt::cancel(&client, &id, &req).await.expect("cancel");
    assert_eq!(cancelled.status.as_str(), "cancelled");
    assert!(
        appt::render_list(&[cancelled], Output::Json)
            .expect("json")
            .contains("\"cancel_reason\": \"ill\"")
    );
    // The binary: tables on success, the typed error with its field and exit 1 on failure.
    let ctl = |args: &'static [&'static str]| {
        let (server, token) = (server.clone(), api.admin.clone());
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meridianctl"))
                .args(["--server", &server, "--token", &token, "appointments"])
                .args(args)
                .env_remove("MERIDIAN_SERVER")
                .env_remove("MERIDIAN_TOKEN")
                .output()
                .await
                .expect("run meridianctl");
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            (out.status.code(), text(&out.stdout), text(&out.stderr))
        }
    };
    let (code, stdout, _) = ctl(&[
        "book",
        "--site",
        "SFO",
        "--service",
        "ACC",
        "--start",
        "2026-03-09T11:45",
        "--customer",
        "Bo Chen",
        "--contact",
        "bo@example.com",
    ])
    .await;
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("customer:")
            && stdout.contains("Bo Chen")
            && stdout.contains("bo@example.com"),
        "{stdout}"
    );
    let (code, stdout, _) = ctl(&["list", "--site", "SFO", "--status", "booked"]).await;
    assert_eq!(code, Some(0));
    assert!(
        stdout.lines().nth(1).is_some_and(|l| l.contains("2026-03-09 11:45") && l.contains("ACC")),
        "{stdout}"
    );
    // The booking reference, the state in the vocabulary and the branch's side.
    let header = stdout.lines().next().unwrap_or_default();
    for column in ["BOOKING REF", "STATE", "TICKET", "CONFLICT"] {
        assert!(header.contains(column), "{header}");
    }
    assert!(stdout.lines().nth(1).is_some_and(|l| l.contains(" created ")), "{stdout}");
    let (code, stdout, _) = ctl(&["list", "--site", "SFO", "--conflict"]).await;
    assert_eq!(code, Some(0));
    assert_eq!(stdout.lines().count(), 1, "nothing flagged: {stdout}");
    let (code, stdout, _) =
        ctl(&["slots", "--site", "SFO", "--service", "ACC", "--date", "2026-03-09"]).await;
    assert_eq!(code, Some(0));
    assert!(
        stdout.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
            == ["11:45", "2026-03-09", "18:45Z", "2", "1", "1", "yes"]),
        "{stdout}"
    );
    let (code, _, stderr) = ctl(&[
        "book",
        "--site",
        "SFO",
        "--service",
        "ACC",
        "--start",
        "2026-03-09T12:15",
        "--customer",
        "Cy",
    ])
    .await;
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("validation_failed")
            && stderr.contains("start: 12:15 is outside business hours"),
        "{stderr}"
    );

    match appt::show(&client, "nope").await {
        Err(CtlError::Api(f)) => assert_eq!((f.status, f.code.as_str()), (404, "not_found")),
        other => panic!("expected 404, got {other:?}"),
    }
}
