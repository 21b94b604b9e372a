//! End to end, conflict rule 3: booked centrally into a time the branch closed. A real
//! controller on PostgreSQL, a real agent process and the fault proxy. With the link cut, staff
//! close part of today at the branch and central, not knowing, books an appointment into it:
//! the booking stands. After reconnect both sides flag it `slot_closed_at_branch` (central for
//! admins to rebook or cancel, the branch in today's list), central refuses further bookings
//! into the closed time (409 `slot_closed`) and shows those slots closed; when the branch
//! withdraws the closure, central takes bookings there again.

mod support;

use std::time::Duration;

use chrono::Utc;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::*;

const WAIT: Duration = Duration::from_secs(15);

async fn branch(
    agent: &AgentProc,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("{}{path}", agent.url))
        .bearer_auth(CONNECTOR_KEY);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("branch request");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn central(
    admin: &AdminClient,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    admin.call(method, path, body).await
}

#[tokio::test]
async fn a_booking_into_a_time_the_offline_branch_closed_is_flagged_on_both_sides() {
    let (zone, offset) = noon_zone();
    let today = (Utc::now() + chrono::Duration::hours(offset)).date_naive().to_string();
    let db = fresh_postgres_url().await;
    let root = temp_dir("meridian-appointments-closures");
    let controller = ControllerProc::start(&root.join("controller"), &db).await;
    let admin = controller.client();
    let resources = appointment_site(&zone, 3);
    admin.ok(Method::POST, "/api/v1/apply", Some(json!({ "resources": resources }))).await;
    let (proxy, agent) = start_site_agent(&root.join("agent"), &controller).await;

    // Offline: the branch closes 20:00-22:00 today; central books 20:30, not knowing.
    proxy.set(Fault::Cut);
    agent.wait_status("agent offline", |s| s["connected"] == false).await;
    let (status, closure) = branch(
        &agent,
        Method::POST,
        "/api/v1/closures",
        Some(json!({"from": "20:00", "to": "22:00", "reason": "two staff ill"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{closure}");
    assert_eq!(closure["day"], today.as_str());
    let book = |start: &str| {
        json!({"site": "SFO", "service": "ACC", "start": format!("{today}T{start}"),
               "customer_name": "Dee", "customer_contact": "+1 555 0101"})
    };
    let booked = admin.ok(Method::POST, "/api/v1/appointments", Some(book("20:30"))).await;
    let id = booked["id"].as_str().expect("id").to_owned();
    assert!(booked["conflict"].is_null(), "central cannot know yet: {booked}");

    // Back online: the closure reaches central, the booking reaches the branch; both flag it.
    proxy.set(Fault::Pass);
    let flagged = wait_for("central flags the booking", WAIT, || async {
        let a = admin.ok(Method::GET, &format!("/api/v1/appointments/{id}"), None).await;
        (a["conflict"] == "slot_closed_at_branch").then_some(a)
    })
    .await;
    assert_eq!(flagged["status"], "booked", "the booking stands: {flagged}");
    let listed = admin.ok(Method::GET, "/api/v1/appointments?site=SFO&conflict=true", None).await;
    assert_eq!(listed.as_array().map(|l| l.len()), Some(1), "{listed}");
    wait_for("the branch flags the booking", WAIT, || async {
        let (_, list) = branch(&agent, Method::GET, "/api/v1/appointments", None).await;
        list.as_array()?
            .iter()
            .find(|a| a["id"] == id.as_str() && a["conflict"] == "slot_closed_at_branch")
            .cloned()
    })
    .await;

    // Central now refuses the closed time and shows it closed; outside it books as usual.
    let (status, body) =
        central(&admin, Method::POST, "/api/v1/appointments", Some(book("21:00"))).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "slot_closed");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("20:00-22:00")), "{body}");
    let slots = admin
        .ok(
            Method::GET,
            &format!("/api/v1/appointments/slots?site=SFO&service=ACC&date={today}"),
            None,
        )
        .await;
    let closed: Vec<&str> = slots["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .filter(|s| s["closed_at_branch"] == true)
        .map(|s| s["start"].as_str().expect("start"))
        .collect();
    assert_eq!(closed.len(), 8, "20:00 to 21:45: {closed:?}");
    assert_eq!((closed[0], closed[7]), (&*format!("{today}T20:00"), &*format!("{today}T21:45")));
    admin.ok(Method::POST, "/api/v1/appointments", Some(book("22:00"))).await;
    let closures = admin.ok(Method::GET, "/api/v1/appointments/closures?site=SFO", None).await;
    assert_eq!(closures[0]["id"], closure["id"]);

    // The branch withdraws the closure: central takes bookings there again.
    let closure_id = closure["id"].as_str().expect("closure id");
    let (status, reopened) =
        branch(&agent, Method::DELETE, &format!("/api/v1/closures/{closure_id}"), None).await;
    assert_eq!(status, StatusCode::OK, "{reopened}");
    let (status, _) =
        branch(&agent, Method::DELETE, &format!("/api/v1/closures/{closure_id}"), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "withdrawn once");
    wait_for("central takes bookings in the reopened time", WAIT, || async {
        let (status, body) =
            central(&admin, Method::POST, "/api/v1/appointments", Some(book("21:00"))).await;
        (status == 201).then_some(body)
    })
    .await;
    let still = admin.ok(Method::GET, &format!("/api/v1/appointments/{id}"), None).await;
    assert_eq!(still["conflict"], "slot_closed_at_branch", "the flag stays for admins");
}
