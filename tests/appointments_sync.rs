//! End to end: the bulk appointment sync with a real controller on PostgreSQL, a real agent
//! process and the fault-injecting TCP proxy. A new agent gets a sync when it enrolls. A sync
//! requested while the agent is offline (as
//! the nightly job requests it, through the same command log) reaches it when it reconnects;
//! the transfer, cut in the middle by the proxy, resumes after the chunks the agent had staged;
//! the branch ends with exactly the controller's appointments of the sync's days (none twice,
//! none missing, today's live copy kept) and the controller records the sync completed once.

mod support;

use std::time::Duration;

use chrono::Utc;
use reqwest::Method;
use serde_json::{Value, json};
use support::*;

/// How long the test waits for each step before it fails.
const WAIT: Duration = Duration::from_secs(15);

/// The site-local day `days` from today.
fn local_day(offset: i64, days: i64) -> String {
    (Utc::now() + chrono::Duration::hours(offset) + chrono::Duration::days(days))
        .date_naive()
        .to_string()
}

async fn branch_get(agent: &AgentProc, path: &str) -> Value {
    let resp = reqwest::Client::new()
        .get(format!("{}{path}", agent.url))
        .bearer_auth(CONNECTOR_KEY)
        .send()
        .await
        .expect("branch request");
    assert_eq!(resp.status(), 200, "{path}");
    resp.json().await.expect("json")
}

fn ids(list: &Value) -> Vec<String> {
    let mut v: Vec<String> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|a| a["id"].as_str().expect("id").to_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn an_offline_agent_gets_its_sync_on_reconnect_and_a_cut_transfer_resumes_without_duplicates()
{
    let (zone, offset) = noon_zone();
    let db = fresh_postgres_url().await;
    let root = temp_dir("meridian-appointments-sync");
    // Four appointments per chunk, so the transfer has many chunks to cut between.
    let controller = ControllerProc::start_with(
        &root.join("controller"),
        &db,
        &[("MERIDIAN_CONTROLLER_APPOINTMENT_SYNC_CHUNK", "4".into())],
    )
    .await;
    let admin = controller.client();
    let mut resources = appointment_site(&zone, 5);
    resources[0]["appointment_sync"] = json!({"at": "02:00", "days_ahead": 1});
    admin.ok(Method::POST, "/api/v1/apply", Some(json!({ "resources": resources }))).await;
    let (today, tomorrow) = (local_day(offset, 0), local_day(offset, 1));
    let book = |start: String, n: usize| {
        json!({"site": "SFO", "service": "ACC", "start": start,
               "customer_name": format!("Customer {n}"), "customer_contact": "+1 555 0100"})
    };
    // Booked before the branch has an agent: a new (or replaced) agent gets a sync at once.
    let early = admin
        .ok(Method::POST, "/api/v1/appointments", Some(book(format!("{tomorrow}T07:00"), 999)))
        .await;
    let (proxy, agent) = start_site_agent(&root.join("agent"), &controller).await;
    let tomorrow_path = format!("/api/v1/appointments?date={tomorrow}");
    let early_id = early["id"].as_str().expect("id").to_owned();
    wait_for("the enrollment sync applied", WAIT, || async {
        let status = branch_get(&agent, "/api/v1/appointments/sync").await;
        let applied = status["requests"]
            .as_array()?
            .iter()
            .any(|r| r["reason"] == "enrollment" && r["state"] == "applied");
        applied.then_some(())
    })
    .await;
    assert_eq!(ids(&branch_get(&agent, &tomorrow_path).await), std::slice::from_ref(&early_id));

    // One appointment today (sent live) and 120 more tomorrow (left to the bulk sync).
    let live = admin
        .ok(Method::POST, "/api/v1/appointments", Some(book(format!("{today}T23:00"), 0)))
        .await;
    let mut n = 0;
    for hour in 8..14 {
        for minute in [0, 15, 30, 45] {
            for _ in 0..5 {
                n += 1;
                let start = format!("{tomorrow}T{hour:02}:{minute:02}");
                admin.ok(Method::POST, "/api/v1/appointments", Some(book(start, n))).await;
            }
        }
    }
    assert_eq!(n, 120);
    let branch_today = wait_for("today's booking at the branch", WAIT, || async {
        let list = branch_get(&agent, "/api/v1/appointments").await;
        (ids(&list) == [live["id"].as_str().expect("id").to_owned()]).then_some(list)
    })
    .await;
    assert_eq!(branch_today[0]["customer_name"], "Customer 0");
    assert_eq!(ids(&branch_get(&agent, &tomorrow_path).await), [early_id], "not sent live");

    // Offline when the sync is requested: it waits in the agent's command log.
    proxy.set(Fault::Cut);
    agent.wait_status("agent offline", |s| s["connected"] == false).await;
    let requested =
        admin.ok(Method::POST, "/api/v1/appointments/sync", Some(json!({"site": "SFO"}))).await;
    let sync_id = requested["syncs"][0]["id"].as_str().expect("sync id").to_owned();
    assert_eq!(requested["syncs"][0]["state"], "requested");

    // Back online, but the first connection to carry 25 kB towards the agent is cut: the
    // transfer (about 45 kB in 31 chunks) breaks after the agent staged some chunks and must
    // resume after them.
    proxy.set(Fault::CutOnceAfterDownstream(25_000));
    let done = wait_for("the sync completed centrally", WAIT * 3, || async {
        let s = admin.ok(Method::GET, &format!("/api/v1/appointments/syncs/{sync_id}"), None).await;
        (s["state"] == "completed").then_some(s)
    })
    .await;
    assert!(proxy.tripped(), "the proxy cut a connection mid-transfer");
    assert_eq!(done["appointments"], 122);
    assert_eq!(done["chunks"], 31);
    assert!(done["resumed"].as_u64() >= Some(1), "{done}");

    let status = branch_get(&agent, "/api/v1/appointments/sync").await;
    assert_eq!(status["watermark"]["sync_id"], sync_id.as_str());
    assert_eq!(status["watermark"]["from_day"], today.as_str());
    assert_eq!(status["watermark"]["to_day"], tomorrow.as_str());
    let request = &status["requests"][0];
    assert_eq!(request["state"], "applied");
    assert!(request["resumed"].as_u64() >= Some(1), "{status}");
    assert!(request["staged_chunks"] == 0, "staging is cleared: {status}");

    // Exactly the controller's set, each once.
    let central = admin
        .ok(
            Method::GET,
            &format!("/api/v1/appointments?site=SFO&from={tomorrow}&to={tomorrow}&limit=1000"),
            None,
        )
        .await;
    let branch = branch_get(&agent, &tomorrow_path).await;
    assert_eq!(ids(&branch).len(), 121);
    assert_eq!(ids(&branch), ids(&central));
    let branch_today = branch_get(&agent, "/api/v1/appointments").await;
    assert_eq!(ids(&branch_today), [live["id"].as_str().expect("id").to_owned()]);

    // The report reached the controller once.
    let pool = sqlx::PgPool::connect(&db).await.expect("connect");
    let reports: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM events WHERE kind = 'APPOINTMENTS_SYNCED' AND payload->>'sync_id' = $1",
    )
    .bind(&sync_id)
    .fetch_one(&pool)
    .await
    .expect("count reports");
    assert_eq!(reports, 1);
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM appointment_sync_chunks")
        .fetch_one(&pool)
        .await
        .expect("count chunks");
    assert_eq!(left, 0, "the snapshot is dropped once the sync completed");
    pool.close().await;
}
