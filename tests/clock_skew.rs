//! A branch agent's clock jumps while it runs: libfaketime moves the real agent process's wall
//! clock (not its monotonic clock) a day ahead, then two hours behind the real time, then back.
//! The site's local time is just after midnight, so without the guard either jump would change
//! the business day. Nothing happens at the branch because of it: no waiting visit is ended,
//! the business day and the ticket numbering go on, events and central statistics carry the
//! real day; the alert is raised at the agent (`/api/v1/status`) and at the controller
//! (`/api/v1/agents`, `/metrics`), and cleared on both once the clock is right again.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{NaiveDate, Timelike, Utc};
use reqwest::Method;
use serde_json::{Value, json};
use support::*;

const DAY_MS: i64 = 86_400_000;
const WAITING: usize = 320;

/// libfaketime's multi-threaded build (`tests/provision-faketime.sh` installs it), or the
/// library `MERIDIAN_TEST_LIBFAKETIME` names. Fails the test when it is missing.
fn libfaketime() -> PathBuf {
    if let Ok(p) = std::env::var("MERIDIAN_TEST_LIBFAKETIME") {
        return PathBuf::from(p);
    }
    let mut dirs =
        vec![PathBuf::from("/usr/lib/faketime"), PathBuf::from("/usr/local/lib/faketime")];
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        dirs.extend(entries.flatten().map(|e| e.path().join("faketime")));
    }
    dirs.into_iter().map(|d| d.join("libfaketimeMT.so.1")).find(|p| p.is_file()).unwrap_or_else(
        || panic!("libfaketime is not installed: run `bash tests/provision-faketime.sh` (apt-get install faketime) or set MERIDIAN_TEST_LIBFAKETIME"),
    )
}

/// A fixed-offset zone (Etc/GMT-N is UTC+N) in which the local hour is now `hour`.
fn zone_at_local_hour(hour: i64) -> String {
    let mut offset = (hour - i64::from(Utc::now().hour())).rem_euclid(24);
    if offset > 14 {
        offset -= 24;
    }
    match offset {
        0 => "Etc/GMT".to_owned(),
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    }
}

/// Moves the agent's wall clock: libfaketime reads the offset from this file at every call, so
/// it is replaced in one rename (never seen empty or half written).
fn set_offset(file: &Path, offset: &str) {
    let next = file.with_extension("next");
    std::fs::write(&next, offset).expect("write the faketime offset");
    std::fs::rename(&next, file).expect("replace the faketime offset");
}

async fn waiting(agent: &AgentProc) -> Vec<Value> {
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/visits?status=waiting", agent.url))
        .bearer_auth(CONNECTOR_KEY)
        .send()
        .await
        .expect("list waiting visits");
    resp.json::<Vec<Value>>().await.expect("visits json")
}

async fn ticket(agent: &AgentProc) -> Value {
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/visits", agent.url))
        .bearer_auth(CONNECTOR_KEY)
        .json(&json!({"service": "GEN"}))
        .send()
        .await
        .expect("take a ticket");
    assert_eq!(resp.status(), 201);
    resp.json().await.expect("visit json")
}

/// Waits until the agent reports a skew within 30 s of `skew_ms` and untrusted (or trusted for
/// 0), then until the end-of-day sweep has run twice more on that clock; returns the status.
async fn agent_sees(agent: &AgentProc, skew_ms: i64) -> Value {
    let what = format!("the agent to see a clock skew of {skew_ms} ms");
    let s = agent
        .wait_status(&what, |s| {
            let skew = s["clock"]["skew_ms"].as_i64().unwrap_or(i64::MIN);
            (skew - skew_ms).abs() < 30_000 && s["clock"]["trusted"] == (skew_ms == 0)
        })
        .await;
    let runs = s["end_of_day"]["runs"].as_u64().expect("sweep runs");
    agent
        .wait_status("two end-of-day sweeps on this clock", |s| {
            s["end_of_day"]["runs"].as_u64() >= Some(runs + 2)
        })
        .await
}

/// Waits until the controller's agent row shows a skew within 30 s of `skew_ms` and
/// `clock_alert` as expected.
async fn controller_sees(admin: &AdminClient, agent_id: &str, skew_ms: i64, alert: bool) -> Value {
    wait_for(
        &format!("the controller to see a skew of {skew_ms} ms"),
        Duration::from_secs(30),
        || async {
            let agents = admin.ok(Method::GET, "/api/v1/agents", None).await;
            let row = agents.as_array()?.iter().find(|a| a["id"] == agent_id)?.clone();
            let skew = row["clock_skew_ms"].as_i64()?;
            ((skew - skew_ms).abs() < 30_000 && row["clock_alert"] == alert).then_some(row)
        },
    )
    .await
}

async fn skewed_gauge(controller: &ControllerProc) -> String {
    let text = reqwest::Client::new()
        .get(format!("{}/metrics", controller.api))
        .bearer_auth(&controller.token)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find(|l| l.starts_with("meridian_controller_agents_clock_skewed "))
        .unwrap_or("missing")
        .to_owned()
}

#[tokio::test]
async fn an_agent_clock_jump_ends_no_visit_moves_no_day_and_alerts_both_sides() {
    let faketime = libfaketime();
    let db = fresh_postgres_url().await;
    let root = temp_dir("meridian-clock");
    let controller = ControllerProc::start(&root.join("controller"), &db).await;
    let admin = controller.client();
    // 00:xx at the site: two hours back is yesterday there, a day ahead tomorrow.
    let zone = zone_at_local_hour(0);
    let every_day: serde_json::Map<String, Value> =
        ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
            .iter()
            .map(|d| (d.to_string(), json!(["00:00-23:45"])))
            .collect();
    let resources = json!([
        {"kind": "site", "code": "SFO", "name": "Site SFO", "time_zone": zone,
         "business_hours": every_day},
        {"kind": "queue", "site": "SFO", "code": "general", "name": "General", "letter": "A",
         "last_number": 9999},
        {"kind": "service", "site": "SFO", "code": "GEN", "name": "General", "queue": "general"},
        {"kind": "connector_key", "site": "SFO", "code": "e2e", "name": "E2E tests",
         "key_hash": meridian_controller::auth::hash_secret(CONNECTOR_KEY)},
    ]);
    admin.ok(Method::POST, "/api/v1/apply", Some(json!({ "resources": resources }))).await;

    let offset = root.join("faketime-offset");
    set_offset(&offset, "+0");
    let env = [
        ("LD_PRELOAD", faketime.display().to_string()),
        ("FAKETIME_TIMESTAMP_FILE", offset.display().to_string()),
        ("FAKETIME_NO_CACHE", "1".to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
        ("MERIDIAN_AGENT_END_OF_DAY_SWEEP_MS", "200".to_owned()),
    ];
    let token = admin.enrollment_token("SFO").await;
    let agent = AgentProc::spawn_with(
        &root.join("agent"),
        &format!("http://{}", controller.gateway),
        &token,
        &env,
    )
    .await;
    let s = agent
        .wait_status("agent enrolled, configured and connected", |s| {
            s["connected"] == true && s["config_revision"].as_u64() > Some(0)
        })
        .await;
    let agent_id = s["agent_id"].as_str().expect("agent id").to_owned();
    assert_eq!(
        (&s["clock"]["guarded"], &s["clock"]["trusted"], &s["clock"]["alert"]),
        (&json!(true), &json!(true), &Value::Null),
        "{s}"
    );

    agent.issue_tickets("GEN", WAITING).await;
    let day = ticket(&agent).await["business_day"].clone();
    let today: NaiveDate = serde_json::from_value(day.clone()).expect("business day");
    assert_eq!(waiting(&agent).await.len(), WAITING + 1);
    controller_sees(&admin, &agent_id, 0, false).await;
    let mut next = WAITING + 2;

    // A day ahead, then two hours behind the real time, with the real time going on.
    for (jump, skew_ms) in [("+1d", DAY_MS), ("-2h", -7_200_000)] {
        set_offset(&offset, jump);
        let s = agent_sees(&agent, skew_ms).await;
        let alert = s["clock"]["alert"].as_str().unwrap_or_default();
        assert!(alert.contains("the controller's time"), "{s}");
        assert_eq!(s["clock"]["alerts_raised"], 1, "one episode for both jumps: {s}");
        assert_eq!(s["end_of_day"]["last_ended"], 0, "{s}");
        let v = ticket(&agent).await;
        assert_eq!(
            (&v["ticket"], &v["business_day"]),
            (&json!(format!("A{next:03}")), &day),
            "{v}"
        );
        next += 1;
        assert_eq!(waiting(&agent).await.len(), next - 1, "no waiting visit ended ({jump})");
        let row = controller_sees(&admin, &agent_id, skew_ms, true).await;
        assert_eq!(row["connected"], true, "{row}");
        assert_eq!(skewed_gauge(&controller).await, "meridian_controller_agents_clock_skewed 1");
    }

    // The clock is right again: both alerts clear by themselves.
    set_offset(&offset, "+0");
    let s = agent_sees(&agent, 0).await;
    assert_eq!(s["clock"]["alert"], Value::Null, "{s}");
    controller_sees(&admin, &agent_id, 0, false).await;
    assert_eq!(skewed_gauge(&controller).await, "meridian_controller_agents_clock_skewed 0");
    let v = ticket(&agent).await;
    assert_eq!((&v["ticket"], &v["business_day"]), (&json!(format!("A{next:03}")), &day), "{v}");
    let visits = next;
    assert_eq!(waiting(&agent).await.len(), visits, "every visit still waiting");

    // Central: every event arrived, none dated in the future, every visit on the real day.
    agent.wait_status("outbox drained", |s| s["outbox_pending"] == 0).await;
    let pool = sqlx::PgPool::connect(&db).await.expect("connect");
    let (created, ended, latest_ms, days): (i64, i64, i64, Vec<String>) = {
        let row: (i64, i64, i64) = sqlx::query_as(
            "SELECT COUNT(*) FILTER (WHERE kind = 'VISIT_CREATED'), \
                    COUNT(*) FILTER (WHERE kind LIKE 'VISIT_%' AND kind <> 'VISIT_CREATED'), \
                    (EXTRACT(EPOCH FROM MAX(occurred_at)) * 1000)::BIGINT \
             FROM events WHERE agent_id = $1",
        )
        .bind(&agent_id)
        .fetch_one(&pool)
        .await
        .expect("central events");
        let days: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT payload->>'business_day' FROM events \
             WHERE agent_id = $1 AND kind = 'VISIT_CREATED'",
        )
        .bind(&agent_id)
        .fetch_all(&pool)
        .await
        .expect("business days");
        (row.0, row.1, row.2, days.into_iter().map(|(d,)| d).collect())
    };
    pool.close().await;
    assert_eq!(created, visits as i64);
    assert_eq!(ended, 0, "no visit event but creation");
    assert!(latest_ms <= Utc::now().timestamp_millis() + 5_000, "an event dated in the future");
    assert_eq!(days, [today.to_string()]);
    let rows = wait_for("central statistics of every visit", Duration::from_secs(30), || async {
        let path = format!(
            "/api/v1/stats/visits?site=SFO&group_by=day&from={}&to={}",
            today.pred_opt().expect("yesterday"),
            today.succ_opt().expect("tomorrow"),
        );
        let rows = admin.ok(Method::GET, &path, None).await;
        let total: u64 = rows.as_array()?.iter().filter_map(|r| r["visits"].as_u64()).sum();
        (total == visits as u64).then_some(rows)
    })
    .await;
    let stat_days: Vec<&str> =
        rows.as_array().expect("rows").iter().filter_map(|r| r["interval"].as_str()).collect();
    assert_eq!(stat_days, [today.to_string()], "{rows}");
}
