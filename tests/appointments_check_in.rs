//! End to end: check-in at an offline branch. A real controller on PostgreSQL, a real agent
//! process and the fault-injecting TCP proxy between them. Today's appointment reaches the
//! branch; with the link cut the customer checks in by booking reference, is called, served and
//! ended — all at the branch alone; after the link returns central shows the appointment
//! completed. The conflict rules end to end: an appointment cancelled, and one rescheduled,
//! centrally while its customer was already checked in at the offline branch keep the arrival
//! (the visit stays in the queue) and are flagged on both sides.

mod support;

use std::time::Duration;

use chrono::{Timelike, Utc};
use reqwest::Method;
use serde_json::{Value, json};
use support::*;

/// How long the test waits for anything that crosses the link before it fails.
const WAIT: Duration = Duration::from_secs(20);

/// The first slot start (`YYYY-MM-DDTHH:MM`, site time) at least a minute from now, plus
/// `extra` quarter hours: within the 30-minute early check-in window when `extra` is 0.
fn next_slot(offset: i64, extra: i64) -> String {
    let local = Utc::now() + chrono::Duration::hours(offset) + chrono::Duration::minutes(1);
    let minutes = i64::from(local.hour() * 60 + local.minute());
    let slot = (minutes + 14) / 15 * 15 + 15 * extra;
    format!("{}T{:02}:{:02}", local.date_naive(), slot / 60, slot % 60)
}

async fn branch(
    agent: &AgentProc,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("{}{path}", agent.url))
        .bearer_auth(CONNECTOR_KEY);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("branch request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn branch_ok(agent: &AgentProc, method: Method, path: &str, body: Option<Value>) -> Value {
    let (status, v) = branch(agent, method.clone(), path, body).await;
    assert!((200..300).contains(&status), "{method} {path} -> {status}: {v}");
    v
}

async fn at_branch(agent: &AgentProc, id: &str) -> Option<Value> {
    branch_ok(agent, Method::GET, "/api/v1/appointments", None)
        .await
        .as_array()?
        .iter()
        .find(|a| a["id"] == id)
        .cloned()
}

#[tokio::test]
async fn a_customer_checks_in_and_is_served_offline_and_central_shows_it_completed() {
    let (zone, offset) = noon_zone();
    let db = fresh_postgres_url().await;
    let root = temp_dir("meridian-appointments-check-in");
    let controller = ControllerProc::start(&root.join("controller"), &db).await;
    let admin = controller.client();
    let mut resources = appointment_site(&zone, 3);
    resources
        .push(json!({"kind": "service_point", "site": "SFO", "code": "C1", "name": "Counter 1"}));
    admin.ok(Method::POST, "/api/v1/apply", Some(json!({ "resources": resources }))).await;
    let (proxy, agent) = start_site_agent(&root.join("agent"), &controller).await;

    // Three of today's appointments, booked centrally, reach the branch live.
    let slot = next_slot(offset, 0);
    let book = |name: &str| {
        json!({"site": "SFO", "service": "ACC", "start": slot, "customer_name": name,
               "external_ref": format!("CRM-{name}")})
    };
    let ann = admin.ok(Method::POST, "/api/v1/appointments", Some(book("Ann"))).await;
    let cy = admin.ok(Method::POST, "/api/v1/appointments", Some(book("Cy"))).await;
    let ria = admin.ok(Method::POST, "/api/v1/appointments", Some(book("Ria"))).await;
    let id = |a: &Value| a["id"].as_str().expect("id").to_owned();
    let (ann_id, cy_id, ria_id) = (id(&ann), id(&cy), id(&ria));
    let reference = ann["reference"].as_str().expect("the booking shows its reference").to_owned();
    assert_eq!(reference.len(), 9, "XXXX-XXXX: {reference}");
    assert_eq!(ann["state"], "created");
    for a in [&ann_id, &cy_id, &ria_id] {
        wait_for("today's appointments at the branch", WAIT, || at_branch(&agent, a)).await;
    }

    // The link goes down; the branch works alone.
    proxy.set(Fault::Cut);
    agent.wait_status("agent notices the cut", |s| s["connected"] == false).await;

    // Ann checks in at the kiosk with her reference, is called, served and ended.
    let done = branch_ok(
        &agent,
        Method::POST,
        "/api/v1/appointments/check-in",
        Some(json!({"reference": reference.to_lowercase()})),
    )
    .await;
    assert_eq!(done["appointment"]["attendance"], "arrived");
    let visit = done["visit"]["id"].as_str().expect("visit").to_owned();
    // Cy and Ria check in too (by QR text and by external reference).
    let cy_in = branch_ok(
        &agent,
        Method::POST,
        "/api/v1/appointments/check-in",
        Some(json!({"reference": format!("MERIDIAN:APPT:{}", cy["reference"].as_str().expect("ref"))})),
    )
    .await;
    let ria_in = branch_ok(
        &agent,
        Method::POST,
        "/api/v1/appointments/check-in",
        Some(json!({"reference": "CRM-Ria"})),
    )
    .await;
    branch_ok(&agent, Method::POST, "/api/v1/service-points/C1/open", None).await;
    let called = branch_ok(&agent, Method::POST, "/api/v1/service-points/C1/call-next", None).await;
    assert_eq!(
        called["id"],
        visit.as_str(),
        "the first one checked in for the slot is called first"
    );
    branch_ok(&agent, Method::POST, &format!("/api/v1/visits/{visit}/start-serving"), None).await;
    branch_ok(&agent, Method::POST, &format!("/api/v1/visits/{visit}/end"), None).await;
    assert_eq!(at_branch(&agent, &ann_id).await.expect("ann")["attendance"], "completed");

    // Meanwhile central cancels Cy's appointment and moves Ria's: it has not heard of the
    // check-ins, so it accepts both.
    admin.ok(Method::POST, &format!("/api/v1/appointments/{cy_id}/cancel"), None).await;
    admin
        .ok(
            Method::POST,
            &format!("/api/v1/appointments/{ria_id}/reschedule"),
            Some(json!({"start": next_slot(offset, 2), "expected_revision": 1})),
        )
        .await;
    let central = admin.ok(Method::GET, &format!("/api/v1/appointments/{ann_id}"), None).await;
    assert_eq!(central["state"], "created", "central knows nothing yet");

    // The link returns: central shows Ann's appointment completed.
    proxy.set(Fault::Pass);
    let completed = wait_for("central shows the appointment completed", WAIT, || async {
        let a = admin.ok(Method::GET, &format!("/api/v1/appointments/{ann_id}"), None).await;
        (a["state"] == "completed").then_some(a)
    })
    .await;
    assert_eq!(completed["attendance"], "completed");
    assert_eq!(completed["visit_id"], visit.as_str());
    assert_eq!(completed["ticket"], done["visit"]["ticket"]);
    assert!(completed["conflict"].is_null(), "{completed}");
    // Now that central knows, it refuses to move or cancel it.
    let (status, refused) =
        admin.call(Method::POST, &format!("/api/v1/appointments/{ann_id}/cancel"), None).await;
    assert_eq!((status, refused["code"].as_str()), (409, Some("already_attended")), "{refused}");

    // Rule (a): cancelled centrally while checked in offline — the arrival wins on both sides.
    let cy_central = wait_for("central flags the cancelled arrival", WAIT, || async {
        let a = admin.ok(Method::GET, &format!("/api/v1/appointments/{cy_id}"), None).await;
        (a["conflict"] == "cancelled_after_arrival").then_some(a)
    })
    .await;
    assert_eq!(
        (&cy_central["status"], &cy_central["state"]),
        (&json!("cancelled"), &json!("arrived"))
    );
    let cy_branch = wait_for("the branch records the cancel as a conflict", WAIT, || async {
        let a = at_branch(&agent, &cy_id).await?;
        (a["status"] == "cancelled").then_some(a)
    })
    .await;
    assert_eq!(
        (&cy_branch["attendance"], &cy_branch["conflict"]),
        (&json!("arrived"), &json!("cancelled_after_arrival"))
    );
    // Rule (b): rescheduled centrally after the check-in — likewise.
    let ria_central = wait_for("central flags the moved arrival", WAIT, || async {
        let a = admin.ok(Method::GET, &format!("/api/v1/appointments/{ria_id}"), None).await;
        (a["conflict"] == "rescheduled_after_arrival").then_some(a)
    })
    .await;
    assert_eq!(ria_central["state"], "arrived");
    let ria_branch = wait_for("the branch records the move as a conflict", WAIT, || async {
        let a = at_branch(&agent, &ria_id).await?;
        (a["revision"] == 2).then_some(a)
    })
    .await;
    assert_eq!(
        (&ria_branch["attendance"], &ria_branch["conflict"]),
        (&json!("arrived"), &json!("rescheduled_after_arrival"))
    );
    // Both visits are still waiting in the queue.
    let waiting: Vec<String> =
        branch_ok(&agent, Method::GET, "/api/v1/visits?status=waiting", None)
            .await
            .as_array()
            .expect("visits")
            .iter()
            .map(|v| v["id"].as_str().unwrap_or_default().to_owned())
            .collect();
    assert_eq!(waiting, [id(&cy_in["visit"]), id(&ria_in["visit"])]);
    // Admins find the flagged ones.
    let flagged: Vec<String> = admin
        .ok(Method::GET, "/api/v1/appointments?conflict=true", None)
        .await
        .as_array()
        .expect("list")
        .iter()
        .map(|a| a["customer_name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(flagged, ["Cy", "Ria"]);
}
