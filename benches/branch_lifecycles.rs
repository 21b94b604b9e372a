//! Branch operations benchmark (issue: branch operations): complete visit lifecycles per second
//! — create → call → serve → end, each a durable SQLite transaction — through the connector API
//! of one in-process agent over loopback HTTP, and the latency of call-next at a fixed 200
//! requests/s (open loop, measured from the intended send time, so a stall is not hidden).
//!
//! `cargo bench --bench branch_lifecycles`; `-- --smoke` runs a small version.

// Only `machine_info` is used here; the other shared helpers serve `ingest` and `agent_tickets`.
#[allow(dead_code)]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_agent::store::queries;
use meridian_agent::{Context, Settings};
use meridian_shared::clock::SystemClock;
use serde_json::{Value, json};

const KEY: &str = "mrd_ck_bench";
const COUNTERS: usize = 16;

fn config() -> meridian_shared::config::SiteConfig {
    let points: Vec<Value> = (1..=40)
        .map(|n| json!({"site": "SFO", "code": format!("C{n}"), "name": format!("Counter {n}")}))
        .collect();
    serde_json::from_value(json!({
        "revision": 1,
        "site": {"code": "SFO", "name": "San Francisco", "time_zone": "America/Los_Angeles"},
        "services": [{"site": "SFO", "code": "GEN", "name": "General", "queue": "general"}],
        "queues": [{"site": "SFO", "code": "general", "name": "General", "letter": "A", "last_number": 9999}],
        "service_points": points,
        "work_profiles": [],
        "staff": [],
        "connector_keys": [{"site": "SFO", "code": "bench", "name": "Bench", "key_hash": meridian_agent::auth::hash(KEY)}]
    }))
    .expect("config")
}

async fn start_branch() -> String {
    let dir =
        std::env::temp_dir().join(format!("meridian-bench-{}", uuid::Uuid::new_v4().simple()));
    let settings = Settings { data_dir: dir, ..Settings::default() };
    let ctx = Context::open(&settings, Arc::new(SystemClock)).await.expect("open agent store");
    let config = config();
    let applied = config.clone();
    let now = ctx.clock.now();
    ctx.db.write(move |c| queries::apply_config(c, &applied, now)).await.expect("apply config");
    ctx.config.send_replace(Some(Arc::new(config)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let router = meridian_agent::branch_api::router(ctx);
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

async fn post(http: &reqwest::Client, url: &str) -> (u16, Value) {
    post_json(http, url, None).await
}

async fn post_json(http: &reqwest::Client, url: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = http.post(url).bearer_auth(KEY);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke")
        || std::env::var("MERIDIAN_BENCH_SMOKE").is_ok_and(|v| v == "1");
    let (lifecycles, latency_calls) = if smoke { (400, 200) } else { (10_000, 2_000) };
    let machine = common::machine_info();
    let base = start_branch().await;
    let http = reqwest::Client::new();
    for n in 1..=40 {
        assert_eq!(post(&http, &format!("{base}/api/v1/service-points/C{n}/open")).await.0, 200);
    }

    // (a) Throughput: 16 counters, each running create → call-next → start-serving → end.
    let started = Instant::now();
    let per = lifecycles / COUNTERS;
    let workers: Vec<_> = (1..=COUNTERS)
        .map(|c| {
            let (http, base) = (http.clone(), base.clone());
            tokio::spawn(async move {
                for _ in 0..per {
                    let (s, _) = post_json(
                        &http,
                        &format!("{base}/api/v1/visits"),
                        Some(json!({"service": "GEN"})),
                    )
                    .await;
                    assert_eq!(s, 201);
                    let (s, v) =
                        post(&http, &format!("{base}/api/v1/service-points/C{c}/call-next")).await;
                    assert_eq!(s, 200, "{v}");
                    let id = v["id"].as_str().expect("id").to_owned();
                    assert_eq!(
                        post(&http, &format!("{base}/api/v1/visits/{id}/start-serving")).await.0,
                        200
                    );
                    assert_eq!(post(&http, &format!("{base}/api/v1/visits/{id}/end")).await.0, 200);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
    let elapsed = started.elapsed();
    let done = per * COUNTERS;
    let rate = done as f64 / elapsed.as_secs_f64();

    // (b) call-next latency at 200 requests/s, open loop, counters C17..C40 in rotation.
    for _ in 0..latency_calls {
        assert_eq!(
            post_json(&http, &format!("{base}/api/v1/visits"), Some(json!({"service": "GEN"})))
                .await
                .0,
            201
        );
    }
    let interval = Duration::from_millis(5);
    let t0 = Instant::now() + Duration::from_millis(50);
    let calls: Vec<_> = (0..latency_calls)
        .map(|i| {
            let (http, base) = (http.clone(), base.clone());
            let intended = t0 + interval * i as u32;
            let counter = 17 + (i % 24);
            tokio::spawn(async move {
                tokio::time::sleep_until(intended.into()).await;
                // One counter serves one customer at a time: free it before calling again.
                let (s, v) =
                    post(&http, &format!("{base}/api/v1/service-points/C{counter}/call-next"))
                        .await;
                let latency = intended.elapsed();
                (s, v, latency)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(latency_calls);
    let mut refused = 0;
    for c in calls {
        let (s, v, latency) = c.await.expect("call");
        if s == 200 {
            latencies.push(latency);
            let id = v["id"].as_str().expect("id").to_owned();
            post(&http, &format!("{base}/api/v1/visits/{id}/end")).await;
        } else {
            refused += 1;
        }
    }
    latencies.sort();
    println!("Meridian branch lifecycle benchmark{}", if smoke { " (smoke)" } else { "" });
    println!("machine: {machine}");
    println!(
        "lifecycles: {done} complete (create, call, serve, end = 4 durable transactions each) in {:.2} s with {COUNTERS} counters",
        elapsed.as_secs_f64()
    );
    println!(
        "  => {rate:.0} lifecycles/s ({:.0} transactions/s); goal >= 1000 lifecycles/s",
        rate * 4.0
    );
    println!(
        "call-next at 200/s: {} calls (+{refused} refused: counter still busy), p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; goal p99 < 10 ms",
        latencies.len(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
}
