//! Branch agent benchmark: durable tickets through `POST /api/v1/visits`.
//!
//! Starts a controller in-process on the embedded SQLite store and one real agent in-process,
//! enrolled and configured over the real gateway. Then:
//! (a) throughput — 32 concurrent keep-alive HTTP clients issue a fixed number of tickets;
//! (b) latency — open loop at a fixed rate, each request scheduled at its intended send time
//!     and its latency measured from that time (no coordinated omission).
//! Every ticket is a durable commit in the agent's store (visit + outbox event), so afterwards
//! the outbox high water must equal the tickets issued plus the configuration events, and the
//! controller must have received all of them.
//!
//! `cargo bench --bench agent_tickets` runs the full benchmark; `-- --smoke` (or
//! `MERIDIAN_BENCH_SMOKE=1`) runs a small one, for CI to check that it still works.
//! Parameters: `MERIDIAN_BENCH_TICKETS` (default 20000), `MERIDIAN_BENCH_CLIENTS` (32),
//! `MERIDIAN_BENCH_RATE` (requests/s, 500), `MERIDIAN_BENCH_LATENCY_REQUESTS` (5000).

#[allow(dead_code)]
mod common;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use common::{
    Controller, ThreadCpu, enrollment_token, env_flag, env_number, filesystem_of, init_tracing,
    machine_info,
};
use meridian_agent::branch_api::StatusView;
use meridian_controller::config_admin::{self, ChangeMode, ResourceInput};
use meridian_controller::store::Store;
use meridian_controller::{auth, testing};
use meridian_shared::AgentId;
use meridian_shared::clock::SystemClock;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;

/// Outbox events that are not tickets: the agent applies exactly one configuration revision
/// here, which records one `CONFIG_APPLIED` event.
const CONFIG_EVENTS: u64 = 1;
/// The connector API key the load clients present (configured centrally as its hash).
const CONNECTOR_KEY: &str = "mrd_ck_benchmark_connector_key";
/// How often conditions are polled while waiting for them.
const POLL: Duration = Duration::from_millis(20);

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent_tickets benchmark FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Params {
    smoke: bool,
    tickets: usize,
    clients: usize,
    rate: u32,
    latency_requests: usize,
    /// Bound on each phase.
    phase_limit: Duration,
}

impl Params {
    fn from_env() -> Result<Self> {
        let smoke = std::env::args().any(|a| a == "--smoke") || env_flag("MERIDIAN_BENCH_SMOKE")?;
        let (tickets, latency_requests, limit) =
            if smoke { (500, 250, 60) } else { (20_000, 5_000, 300) };
        let params = Params {
            smoke,
            tickets: env_number("MERIDIAN_BENCH_TICKETS")?.unwrap_or(tickets),
            clients: env_number("MERIDIAN_BENCH_CLIENTS")?.unwrap_or(32),
            rate: env_number("MERIDIAN_BENCH_RATE")?.unwrap_or(500) as u32,
            latency_requests: env_number("MERIDIAN_BENCH_LATENCY_REQUESTS")?
                .unwrap_or(latency_requests),
            phase_limit: Duration::from_secs(limit),
        };
        ensure!(params.clients >= 1, "MERIDIAN_BENCH_CLIENTS must be at least 1");
        ensure!((1..=100_000).contains(&params.rate), "MERIDIAN_BENCH_RATE must be 1..=100000");
        ensure!(
            params.latency_requests <= 100_000,
            "MERIDIAN_BENCH_LATENCY_REQUESTS is at most 100000"
        );
        Ok(params)
    }
}

async fn run() -> Result<()> {
    let params = Params::from_env()?;
    println!("Meridian agent ticket benchmark{}", if params.smoke { " (smoke mode)" } else { "" });
    let data_dir = testing::temp_dir("meridian-bench-agent");
    println!("machine: {}", machine_info());
    println!(
        "storage: agent store on {} ({}), fsync of a 4 KiB write there: {}",
        filesystem_of(&data_dir.to_string_lossy()),
        data_dir.display(),
        fsync_probe(&data_dir).unwrap_or_else(|e| format!("unmeasured ({e})")),
    );
    println!(
        "parameters: (a) {} tickets with {} concurrent keep-alive clients; (b) open loop at {} \
         requests/s, {} requests ({:.1} s); controller (SQLite store), agent and clients share \
         this process and machine",
        params.tickets,
        params.clients,
        params.rate,
        params.latency_requests,
        params.latency_requests as f64 / f64::from(params.rate),
    );

    let setup_started = Instant::now();
    let controller_url = testing::fresh_sqlite_url();
    let controller = Controller::start(&controller_url).await?;
    create_site(controller.store.as_ref()).await?;
    let token = enrollment_token(controller.store.as_ref(), "SFO").await?;
    let agent = Agent::start(&controller.gateway_url, data_dir.clone(), token).await?;
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let configured = wait_for_status(
        &http,
        &agent.base_url,
        setup_started + params.phase_limit,
        "configured",
        |s| s.connected && s.config_revision > 0,
    )
    .await?;
    ensure!(
        configured.outbox_high_water == CONFIG_EVENTS,
        "a freshly configured agent has {} outbox events, expected {CONFIG_EVENTS} (CONFIG_APPLIED)",
        configured.outbox_high_water
    );
    println!(
        "setup: controller started, agent enrolled and configured (revision {}) in {:.2} s",
        configured.config_revision,
        setup_started.elapsed().as_secs_f64()
    );
    let visits_url = format!("{}/api/v1/visits", agent.base_url);

    // (a) throughput
    let threads_before = ThreadCpu::sample();
    let throughput =
        closed_loop(&visits_url, params.tickets, params.clients, params.phase_limit).await?;
    let threads = ThreadCpu::sample().since(&threads_before);
    println!(
        "(a) throughput: {} tickets in {:.3} s = {:.0} tickets/s ({} clients; per-request latency {})",
        params.tickets,
        throughput.elapsed.as_secs_f64(),
        params.tickets as f64 / throughput.elapsed.as_secs_f64(),
        params.clients,
        summary(&throughput.latencies),
    );
    println!("    CPU by thread while timed: {}", describe_threads(&threads, throughput.elapsed));
    let drain_started = Instant::now();
    wait_for_status(
        &http,
        &agent.base_url,
        drain_started + params.phase_limit,
        "outbox drained",
        |s| s.outbox_pending == 0,
    )
    .await?;
    println!(
        "    outbox drained to the controller {:.2} s after the last ticket",
        drain_started.elapsed().as_secs_f64()
    );

    // (b) latency
    let latency =
        open_loop(&visits_url, params.rate, params.latency_requests, params.phase_limit).await?;
    println!(
        "(b) latency, open loop at {} requests/s for {:.1} s ({} requests), from intended send time: {}",
        params.rate,
        latency.elapsed.as_secs_f64(),
        params.latency_requests,
        summary(&latency.latencies),
    );
    println!(
        "    for comparison, from actual send time: {}; the load generator sent late by {}",
        summary(&latency.from_send),
        summary(&latency.send_lag),
    );

    // verification
    let issued = (params.tickets + params.latency_requests) as u64;
    let status = fetch_status(&http, &agent.base_url).await?;
    ensure!(
        status.outbox_high_water == issued + CONFIG_EVENTS,
        "the agent's outbox high water is {}, expected {issued} tickets + {CONFIG_EVENTS} configuration event(s)",
        status.outbox_high_water
    );
    let drained = wait_for_status(
        &http,
        &agent.base_url,
        Instant::now() + params.phase_limit,
        "outbox drained",
        |s| s.outbox_pending == 0,
    )
    .await?;
    let agent_id: AgentId = drained
        .agent_id
        .as_deref()
        .ok_or_else(|| anyhow!("the agent reports no agent id"))?
        .parse()
        .context("the agent's id is not a UUID")?;
    let central =
        controller.store.count_events(agent_id).await.context("counting central events")?;
    ensure!(
        central == drained.outbox_high_water,
        "the controller stored {central} events of this agent, the agent's high water is {}",
        drained.outbox_high_water
    );
    println!(
        "verified: outbox high water {} = {issued} tickets + {CONFIG_EVENTS} configuration event; \
         the controller stored all {central}",
        status.outbox_high_water
    );

    agent.stop().await?;
    controller.stop().await?;
    // Kept on failure, for a look at what happened.
    let controller_dir = std::path::Path::new(controller_url.trim_start_matches("sqlite://"))
        .parent()
        .context("the SQLite URL names no directory")?
        .to_owned();
    for dir in [data_dir, controller_dir] {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

// ---------- load ----------

struct Measured {
    elapsed: Duration,
    /// Per request, from its intended send time (closed loop: its send time) to the response.
    latencies: Vec<Duration>,
    /// Open loop: per request, from the moment it was actually sent to the response.
    from_send: Vec<Duration>,
    /// Open loop: per request, how late the load generator sent it.
    send_lag: Vec<Duration>,
}

/// Issues `count` tickets with `clients` concurrent clients, each on its own keep-alive
/// connection, each sending its next request when the previous one answered.
async fn closed_loop(url: &str, count: usize, clients: usize, limit: Duration) -> Result<Measured> {
    let next = Arc::new(AtomicUsize::new(0));
    let http_clients = (0..clients)
        .map(|_| {
            reqwest::Client::builder()
                .tcp_nodelay(true)
                .timeout(Duration::from_secs(30))
                .build()
                .context("building an HTTP client")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut workers = JoinSet::new();
    let start = Instant::now();
    for client in http_clients {
        let (next, url) = (next.clone(), url.to_owned());
        workers.spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let sent = Instant::now();
                create_visit(&client, &url).await?;
                latencies.push(sent.elapsed());
            }
            anyhow::Ok((latencies, Instant::now()))
        });
    }
    let results = join_all(workers, start + limit).await?;
    let elapsed = results.iter().map(|(_, finished)| *finished - start).max().unwrap_or_default();
    let latencies: Vec<Duration> = results.into_iter().flat_map(|(l, _)| l).collect();
    ensure!(latencies.len() == count, "{} of {count} tickets issued", latencies.len());
    Ok(Measured { elapsed, latencies, from_send: Vec::new(), send_lag: Vec::new() })
}

/// Sends `count` requests at `rate` per second, each at its intended time whether or not the
/// earlier ones answered; latency runs from the intended send time to the full response.
///
/// The schedule is kept by a plain thread: its sleeps are precise to tens of microseconds,
/// where tokio's timer rounds up to the next millisecond and would add that to every latency.
async fn open_loop(url: &str, rate: u32, count: usize, limit: Duration) -> Result<Measured> {
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let interval = Duration::from_secs(1) / rate;
    let duration = interval * count as u32;
    ensure!(duration < limit, "the open loop would run past its time limit");
    let start = Instant::now() + Duration::from_millis(10);
    let (due_tx, mut due) = tokio::sync::mpsc::channel::<Instant>(count.max(1));
    let schedule = std::thread::Builder::new()
        .name("bench-schedule".into())
        .spawn(move || {
            for i in 0..count {
                let intended = start + interval * i as u32;
                std::thread::sleep(intended.saturating_duration_since(Instant::now()));
                if due_tx.blocking_send(intended).is_err() {
                    return;
                }
            }
        })
        .context("starting the schedule thread")?;
    let mut requests = JoinSet::new();
    while let Some(intended) = due.recv().await {
        let (client, url) = (client.clone(), url.to_owned());
        requests.spawn(async move {
            let sent = Instant::now();
            create_visit(&client, &url).await?;
            let done = Instant::now();
            anyhow::Ok((done - intended, done - sent, sent - intended))
        });
    }
    schedule.join().map_err(|_| anyhow!("the schedule thread panicked"))?;
    let results = join_all(requests, start + limit).await?;
    ensure!(results.len() == count, "{} of {count} requests sent", results.len());
    Ok(Measured {
        elapsed: start.elapsed(),
        latencies: results.iter().map(|r| r.0).collect(),
        from_send: results.iter().map(|r| r.1).collect(),
        send_lag: results.iter().map(|r| r.2).collect(),
    })
}

/// Waits for every task (until `deadline`); the first failure aborts the rest.
async fn join_all<T: 'static>(mut tasks: JoinSet<Result<T>>, deadline: Instant) -> Result<Vec<T>> {
    let mut results = Vec::with_capacity(tasks.len());
    loop {
        let next = match timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(next)) => next,
            Ok(None) => return Ok(results),
            Err(_) => {
                tasks.abort_all();
                bail!("timed out with {} requests or clients unfinished", tasks.len());
            }
        };
        match next {
            Ok(Ok(value)) => results.push(value),
            Ok(Err(e)) => {
                tasks.abort_all();
                return Err(e);
            }
            Err(e) => {
                tasks.abort_all();
                bail!("a load task panicked: {e}");
            }
        }
    }
}

/// One durable ticket; anything but `201 Created` with a ticket is a failure.
async fn create_visit(client: &reqwest::Client, url: &str) -> Result<()> {
    let response = client
        .post(url)
        .bearer_auth(CONNECTOR_KEY)
        .json(&serde_json::json!({"service": "GEN"}))
        .send()
        .await
        .context("POST /api/v1/visits failed")?;
    let status = response.status();
    let body = response.bytes().await.context("reading the visit response")?;
    if status != reqwest::StatusCode::CREATED {
        bail!("POST /api/v1/visits answered {status}: {}", String::from_utf8_lossy(&body));
    }
    let visit: serde_json::Value =
        serde_json::from_slice(&body).context("the visit response is not JSON")?;
    ensure!(
        visit.get("ticket").is_some_and(|t| t.is_string()),
        "the visit response has no ticket: {visit}"
    );
    Ok(())
}

fn summary(latencies: &[Duration]) -> String {
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let pct = |q: f64| {
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
        sorted.get(rank - 1).copied().unwrap_or_default()
    };
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(pct(0.50)),
        ms(pct(0.90)),
        ms(pct(0.99)),
        ms(sorted.last().copied().unwrap_or_default()),
    )
}

// ---------- the system under test ----------

/// The real agent, in-process, with its branch server on loopback, port 0.
struct Agent {
    base_url: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<meridian_agent::Result<()>>,
}

impl Agent {
    async fn start(
        gateway_url: &str,
        data_dir: std::path::PathBuf,
        token: String,
    ) -> Result<Agent> {
        let settings = meridian_agent::Settings {
            controller_url: gateway_url.to_owned(),
            data_dir,
            enrollment_token: token,
            ..Default::default()
        };
        let ctx = meridian_agent::Context::open(&settings, Arc::new(SystemClock))
            .await
            .context("opening the agent's store")?;
        let http = TcpListener::bind("127.0.0.1:0").await.context("binding the branch server")?;
        let base_url = format!("http://{}", http.local_addr()?);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(meridian_agent::run_with(ctx, settings, http, shutdown.clone()));
        Ok(Agent { base_url, shutdown, task })
    }

    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        let served = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("the agent did not stop within 30 s")?
            .context("the agent task panicked")?;
        served.context("the agent failed")
    }
}

async fn create_site(store: &dyn Store) -> Result<()> {
    let inputs = [
        serde_json::json!({"kind": "site", "code": "SFO", "name": "San Francisco", "time_zone": "America/Los_Angeles"}),
        serde_json::json!({"kind": "queue", "site": "SFO", "code": "A", "name": "General", "letter": "A"}),
        serde_json::json!({"kind": "service", "site": "SFO", "code": "GEN", "name": "General", "queue": "A"}),
        serde_json::json!({"kind": "connector_key", "site": "SFO", "code": "bench", "name": "Benchmark",
                           "key_hash": auth::hash_secret(CONNECTOR_KEY)}),
    ]
    .into_iter()
    .map(|json| serde_json::from_value::<ResourceInput>(json).context("resource JSON"))
    .collect::<Result<Vec<_>>>()?;
    config_admin::change(store, "bench", inputs, vec![], ChangeMode::Upsert)
        .await
        .context("creating the site")?;
    Ok(())
}

async fn fetch_status(http: &reqwest::Client, base_url: &str) -> Result<StatusView> {
    let response = http
        .get(format!("{base_url}/api/v1/status"))
        .send()
        .await
        .context("GET /api/v1/status failed")?;
    ensure!(response.status().is_success(), "GET /api/v1/status answered {}", response.status());
    response.json().await.context("the agent status is not the expected JSON")
}

/// Polls the agent's status until `done` holds, or fails at `deadline`.
async fn wait_for_status(
    http: &reqwest::Client,
    base_url: &str,
    deadline: Instant,
    what: &str,
    done: impl Fn(&StatusView) -> bool,
) -> Result<StatusView> {
    loop {
        let status = fetch_status(http, base_url).await?;
        if done(&status) {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            bail!("timed out waiting for the agent to be {what}; last status: {status:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---------- where the CPU goes ----------

/// Total CPU of the threads against `wall`, and the five busiest, busiest first.
fn describe_threads(threads: &ThreadCpu, wall: Duration) -> String {
    let total: f64 = threads.0.values().sum();
    let mut threads: Vec<(&String, &f64)> = threads.0.iter().collect();
    threads.sort_by(|a, b| b.1.total_cmp(a.1));
    let parts: Vec<String> = threads
        .iter()
        .take(5)
        .map(|(name, s)| {
            format!("{name} {s:.2} s ({:.0}% of wall)", *s * 100.0 / wall.as_secs_f64())
        })
        .collect();
    format!("total {total:.2} s over {:.2} s wall; {}", wall.as_secs_f64(), parts.join(", "))
}

// ---------- environment ----------

/// Median time of 50 appends of 4 KiB, each followed by `fdatasync`, in `dir`.
fn fsync_probe(dir: &std::path::Path) -> std::io::Result<String> {
    let path = dir.join("fsync-probe");
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    let block = [0u8; 4096];
    let mut times = Vec::with_capacity(50);
    for _ in 0..50 {
        let started = std::time::Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        times.push(started.elapsed());
    }
    drop(file);
    std::fs::remove_file(&path)?;
    times.sort_unstable();
    Ok(format!("median {:.2} ms", times[times.len() / 2].as_secs_f64() * 1e3))
}
