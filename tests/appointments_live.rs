//! End to end: same-day live sync of appointments. A real controller on PostgreSQL, a real
//! agent process and the fault-injecting TCP proxy between them. A change to one of today's
//! appointments reaches a connected agent within 2 s; changes made while the agent is offline
//! arrive after reconnect, each command applied exactly once; appointments of later days are
//! left to the nightly bulk sync (no command).

mod support;

use std::time::{Duration, Instant};

use chrono::Utc;
use reqwest::Method;
use serde_json::{Value, json};
use support::*;

/// The acceptance point: a same-day change reaches a connected agent within this.
const LIVE: Duration = Duration::from_secs(2);
/// How long the test waits before it fails (the assertion on `LIVE` comes after).
const WAIT: Duration = Duration::from_secs(10);

/// `YYYY-MM-DDTHH:00` in the site's zone, `days` from its today, at `hour`.
fn local_start(offset: i64, days: i64, hour: u32) -> String {
    let local = Utc::now() + chrono::Duration::hours(offset) + chrono::Duration::days(days);
    format!("{}T{hour:02}:00", local.date_naive())
}

async fn branch_appointments(agent: &AgentProc, date: Option<&str>) -> Vec<Value> {
    let query = date.map(|d| format!("?date={d}")).unwrap_or_default();
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/appointments{query}", agent.url))
        .bearer_auth(CONNECTOR_KEY)
        .send()
        .await
        .expect("branch appointments");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("json")
}

/// Waits until the branch shows appointment `id` at `revision`; returns it and how long it took.
async fn wait_branch(agent: &AgentProc, id: &str, revision: u64) -> (Value, Duration) {
    let began = Instant::now();
    let found = wait_for(
        &format!("appointment {id} at revision {revision} at the branch"),
        WAIT,
        || async {
            branch_appointments(agent, None)
                .await
                .into_iter()
                .find(|a| a["id"] == id && a["revision"].as_u64() == Some(revision))
        },
    )
    .await;
    (found, began.elapsed())
}

/// (APPOINTMENT_UPSERT commands in the controller's log for the agent, distinct sequences).
async fn central_upserts(database_url: &str, agent_id: &str) -> (i64, i64) {
    let pool = sqlx::PgPool::connect(database_url).await.expect("connect");
    let row: (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COUNT(DISTINCT seq) FROM agent_commands \
         WHERE agent_id = $1 AND kind = 'APPOINTMENT_UPSERT'",
    )
    .bind(agent_id)
    .fetch_one(&pool)
    .await
    .expect("count commands");
    pool.close().await;
    row
}

/// (APPOINTMENT_UPSERT commands the agent recorded as applied, distinct, with an error).
async fn branch_applied(agent: &AgentProc) -> (i64, i64, i64) {
    let url = format!("sqlite://{}?mode=ro", agent.dir.join("agent.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.expect("open the agent's database");
    let row: (i64, i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COUNT(DISTINCT seq), COUNT(error) FROM applied_commands \
         WHERE kind = 'APPOINTMENT_UPSERT'",
    )
    .fetch_one(&pool)
    .await
    .expect("count applied commands");
    pool.close().await;
    row
}

#[tokio::test]
async fn same_day_changes_reach_the_branch_live_and_after_an_outage_exactly_once() {
    let (zone, offset) = noon_zone();
    let db = fresh_postgres_url().await;
    let root = temp_dir("meridian-appointments-live");
    let controller = ControllerProc::start(&root.join("controller"), &db).await;
    let admin = controller.client();
    let mut resources = appointment_site(&zone, 2);
    resources.push(json!({"kind": "queue", "site": "SFO", "code": "general", "name": "General", "letter": "A"}));
    resources.push(json!({"kind": "service", "site": "SFO", "code": "GEN", "name": "General", "queue": "general"}));
    admin.ok(Method::POST, "/api/v1/apply", Some(json!({ "resources": resources }))).await;
    let (proxy, agent) = start_site_agent(&root.join("agent"), &controller).await;
    let status = agent.status().await;
    let agent_id = status["agent_id"].as_str().expect("agent id").to_owned();
    let book = |start: String, name: &str, reference: &str| {
        json!({"site": "SFO", "service": "ACC", "start": start, "customer_name": name,
               "customer_contact": "+1 555 0100", "notes": "bring ID", "external_ref": reference})
    };

    // Connected: a booking for today is at the branch within 2 s, with every field.
    let today = local_start(offset, 0, 14);
    let a = admin
        .ok(Method::POST, "/api/v1/appointments", Some(book(today.clone(), "Ann", "CRM-1")))
        .await;
    let id = a["id"].as_str().expect("id").to_owned();
    let (at_branch, took) = wait_branch(&agent, &id, 1).await;
    assert!(took < LIVE, "a booking took {took:?} to reach the branch");
    assert_eq!(at_branch["start"], today.as_str());
    assert_eq!(at_branch["status"], "booked");
    assert_eq!(
        (&at_branch["service"], &at_branch["queue"], &at_branch["customer_name"]),
        (&json!("ACC"), &json!("accounts"), &json!("Ann"))
    );
    assert_eq!(
        (&at_branch["customer_contact"], &at_branch["notes"], &at_branch["external_ref"]),
        (&json!("+1 555 0100"), &json!("bring ID"), &json!("CRM-1"))
    );
    assert_eq!(at_branch["starts_at"], a["starts_at"]);
    assert_eq!(at_branch["duration_minutes"], 15);

    // Reschedule within today, then cancel: the branch follows each within 2 s.
    let later_today = local_start(offset, 0, 15);
    let moved = admin
        .ok(
            Method::POST,
            &format!("/api/v1/appointments/{id}/reschedule"),
            Some(json!({"start": later_today, "expected_revision": 1})),
        )
        .await;
    assert_eq!(moved["revision"], 2);
    let (at_branch, took) = wait_branch(&agent, &id, 2).await;
    assert!(took < LIVE, "a reschedule took {took:?} to reach the branch");
    assert_eq!(at_branch["start"], later_today.as_str());
    admin
        .ok(
            Method::POST,
            &format!("/api/v1/appointments/{id}/cancel"),
            Some(json!({"reason": "ill"})),
        )
        .await;
    let (at_branch, took) = wait_branch(&agent, &id, 3).await;
    assert!(took < LIVE, "a cancellation took {took:?} to reach the branch");
    assert_eq!(at_branch["status"], "cancelled");

    // A booking for tomorrow produces no command: the nightly bulk sync carries it.
    let before = central_upserts(&controller.database_url, &agent_id).await;
    assert_eq!(before, (3, 3));
    let tomorrow = local_start(offset, 1, 14);
    let t = admin
        .ok(Method::POST, "/api/v1/appointments", Some(book(tomorrow.clone(), "Tom", "CRM-2")))
        .await;
    assert_eq!(central_upserts(&controller.database_url, &agent_id).await, before);
    let tomorrow_day = &tomorrow[..10];
    assert!(branch_appointments(&agent, Some(tomorrow_day)).await.is_empty());

    // Offline: book one for today, move tomorrow's to today and move it again.
    proxy.set(Fault::Cut);
    agent.wait_status("agent notices the cut", |s| s["connected"] == false).await;
    let b = admin
        .ok(
            Method::POST,
            "/api/v1/appointments",
            Some(book(local_start(offset, 0, 16), "Bo", "CRM-3")),
        )
        .await;
    let t_id = t["id"].as_str().expect("id").to_owned();
    admin
        .ok(
            Method::POST,
            &format!("/api/v1/appointments/{t_id}/reschedule"),
            Some(json!({"start": local_start(offset, 0, 17), "expected_revision": 1})),
        )
        .await;
    let final_start = local_start(offset, 0, 18);
    admin
        .ok(
            Method::POST,
            &format!("/api/v1/appointments/{t_id}/reschedule"),
            Some(json!({"start": final_start, "expected_revision": 2})),
        )
        .await;
    assert_eq!(central_upserts(&controller.database_url, &agent_id).await, (6, 6));
    let offline = branch_appointments(&agent, None).await;
    assert_eq!(offline.len(), 1, "nothing arrives while offline: {offline:?}");

    // Reconnect: everything arrives, in order, each command applied exactly once.
    proxy.set(Fault::Pass);
    let b_id = b["id"].as_str().expect("id").to_owned();
    wait_branch(&agent, &b_id, 1).await;
    let (moved_in, _) = wait_branch(&agent, &t_id, 3).await;
    assert_eq!(moved_in["start"], final_start.as_str());
    assert_eq!(moved_in["customer_name"], "Tom");
    let view = wait_for("the agent acknowledges every command", WAIT, || async {
        let v = admin.agent(&agent_id).await;
        (v["command_acked_seq"] == v["command_seq"]).then_some(v)
    })
    .await;
    assert!(view["command_error"].is_null(), "{view}");
    assert_eq!(branch_applied(&agent).await, (6, 6, 0), "six changes, each applied once");
    let names: Vec<(String, String, String)> = branch_appointments(&agent, None)
        .await
        .iter()
        .map(|a| {
            let s = |k: &str| a[k].as_str().unwrap_or_default().to_owned();
            (s("customer_name"), s("status"), a["revision"].to_string())
        })
        .collect();
    assert_eq!(
        names,
        [
            ("Ann".to_owned(), "cancelled".to_owned(), "3".to_owned()),
            ("Bo".to_owned(), "booked".to_owned(), "1".to_owned()),
            ("Tom".to_owned(), "booked".to_owned(), "3".to_owned()),
        ],
        "today's appointments by start"
    );
}
