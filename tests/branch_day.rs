//! A full business day at a branch cut off from central: 2,000 visits across 5 queues served by
//! 6 counters through the connector API; after the link returns, central holds every event
//! exactly once.

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::*;

const QUEUES: [(&str, &str); 5] = [("q1", "B"), ("q2", "C"), ("q3", "D"), ("q4", "E"), ("q5", "F")];
const COUNTERS: usize = 6;
const VISITS: usize = 2_000;

#[tokio::test]
async fn a_full_offline_day_reaches_central_exactly_once() {
    let db = fresh_postgres_url().await;
    let root = temp_dir("meridian-day");
    let controller = ControllerProc::start(&root.join("controller"), &db).await;
    let admin = controller.client();
    admin.seed_site("LAX").await;
    let mut resources = Vec::new();
    for (i, (q, letter)) in QUEUES.iter().enumerate() {
        resources
            .push(json!({"kind": "queue", "site": "LAX", "code": q, "name": q, "letter": letter}));
        resources.push(json!({"kind": "service", "site": "LAX", "code": format!("S{i}"), "name": q, "queue": q}));
    }
    for c in 1..=COUNTERS {
        resources.push(json!({"kind": "service_point", "site": "LAX", "code": format!("C{c}"), "name": format!("Counter {c}")}));
    }
    let report =
        admin.ok(Method::POST, "/api/v1/apply", Some(json!({ "resources": resources }))).await;
    let revision = report["revision"].as_u64().expect("revision");
    let token = admin.enrollment_token("LAX").await;
    let proxy = FaultProxy::start(controller.gateway).await;
    let agent = AgentProc::start(&root.join("agent"), proxy.addr, &token).await;
    let s = agent
        .wait_status("agent configured", |s| {
            s["connected"] == true && s["config_revision"].as_u64() >= Some(revision)
        })
        .await;
    let agent_id = s["agent_id"].as_str().expect("id").to_owned();

    proxy.set(Fault::Cut);
    agent.wait_status("agent offline", |s| s["connected"] == false).await;

    let http = reqwest::Client::new();
    let base = agent.url.clone();
    let client = http.clone();
    let post = move |path: String| {
        let http = client.clone();
        let url = format!("{base}{path}");
        async move {
            let resp = http.post(&url).bearer_auth(CONNECTOR_KEY).send().await.expect("request");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    for c in 1..=COUNTERS {
        assert_eq!(post(format!("/api/v1/service-points/C{c}/open")).await.0, 200);
    }
    // Arrivals: 2,000 tickets spread over the five services, 8 kiosks at once.
    let arrivals: Vec<_> = (0..8)
        .map(|k| {
            let http = http.clone();
            let url = format!("{}/api/v1/visits", agent.url);
            tokio::spawn(async move {
                for n in (k..VISITS).step_by(8) {
                    let resp = http
                        .post(&url)
                        .bearer_auth(CONNECTOR_KEY)
                        .json(&json!({"service": format!("S{}", n % QUEUES.len())}))
                        .send()
                        .await
                        .expect("ticket");
                    assert_eq!(resp.status(), 201);
                }
            })
        })
        .collect();
    for a in arrivals {
        a.await.expect("arrivals");
    }
    // Six counters work the queues until nobody waits; every 10th called customer is a no-show.
    let counters: Vec<_> = (1..=COUNTERS)
        .map(|c| {
            let post = post.clone();
            tokio::spawn(async move {
                let (mut served, mut no_shows) = (0usize, 0usize);
                loop {
                    let (status, v) = post(format!("/api/v1/service-points/C{c}/call-next")).await;
                    if status == 404 {
                        return (served, no_shows);
                    }
                    assert_eq!(status, 200, "{v}");
                    let id = v["id"].as_str().expect("id").to_owned();
                    if (served + no_shows) % 10 == 9 {
                        assert_eq!(post(format!("/api/v1/visits/{id}/no-show")).await.0, 200);
                        no_shows += 1;
                    } else {
                        assert_eq!(post(format!("/api/v1/visits/{id}/start-serving")).await.0, 200);
                        assert_eq!(post(format!("/api/v1/visits/{id}/end")).await.0, 200);
                        served += 1;
                    }
                }
            })
        })
        .collect();
    let (mut served, mut no_shows) = (0, 0);
    for c in counters {
        let (s, n) = c.await.expect("counter");
        served += s;
        no_shows += n;
    }
    assert_eq!(served + no_shows, VISITS, "every visit ended exactly once");
    let s = agent.status().await;
    assert_eq!(s["connected"], false, "the whole day ran offline");

    proxy.set(Fault::Pass);
    let s = agent
        .wait_status("the day syncs", |s| s["connected"] == true && s["outbox_pending"] == 0)
        .await;
    let high = s["outbox_high_water"].as_i64().expect("high water");
    let pool = sqlx::PgPool::connect(&db).await.expect("db");
    let counts: Vec<(String, i64)> = wait_for("central to hold the day", Duration::from_secs(60), || {
        let pool = pool.clone();
        let agent_id = agent_id.clone();
        async move {
            let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE agent_id = $1")
                .bind(&agent_id)
                .fetch_one(&pool)
                .await
                .ok()?;
            if total < high {
                return None;
            }
            sqlx::query_as("SELECT kind, COUNT(*) FROM events WHERE agent_id = $1 GROUP BY kind ORDER BY kind")
                .bind(&agent_id)
                .fetch_all(&pool)
                .await
                .ok()
        }
    })
    .await;
    let count =
        |k: &str| counts.iter().find(|(kind, _)| kind == k).map(|(_, n)| *n as usize).unwrap_or(0);
    assert_eq!(count("VISIT_CREATED"), VISITS);
    assert_eq!(count("VISIT_CALLED"), VISITS);
    assert_eq!(count("VISIT_SERVING"), served);
    assert_eq!(count("VISIT_ENDED"), served);
    assert_eq!(count("VISIT_NO_SHOW"), no_shows);
    assert_eq!(count("SERVICE_POINT_OPENED"), COUNTERS);
    let c = central_events(&db, &agent_id).await;
    assert_eq!((c.0, c.3, c.1, c.2), (high, high, 1, high), "gapless, exactly once");
    // Every visit reached exactly one outcome centrally.
    let outcomes: i64 = sqlx::query_scalar(
        "SELECT COUNT(DISTINCT payload->>'visit_id') FROM events WHERE agent_id = $1 AND kind IN ('VISIT_ENDED', 'VISIT_NO_SHOW')",
    )
    .bind(&agent_id)
    .fetch_one(&pool)
    .await
    .expect("outcomes");
    assert_eq!(outcomes as usize, VISITS);
    // Central statistics derive one fact per visit, each with its one outcome.
    let (ended, no_show_facts): (i64, i64) = wait_for("visit facts", Duration::from_secs(60), || {
        let pool = pool.clone();
        let agent_id = agent_id.clone();
        async move {
            let row: (i64, i64) = sqlx::query_as(
                "SELECT COUNT(*) FILTER (WHERE outcome IS NOT NULL), COUNT(*) FILTER (WHERE outcome = 'no_show') \
                 FROM visit_facts WHERE agent_id = $1",
            )
            .bind(&agent_id)
            .fetch_one(&pool)
            .await
            .ok()?;
            (row.0 >= VISITS as i64).then_some(row)
        }
    })
    .await;
    assert_eq!((ended as usize, no_show_facts as usize), (VISITS, no_shows));
}
