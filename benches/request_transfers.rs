//! Distributed service request transfers benchmark.
//!
//! Two parts, each with a controller in-process on its own fresh PostgreSQL database (dropped
//! at the end; kept on failure):
//!
//! 1. **Transfer latency between two connected agents** (goal p50 < 50 ms): two REAL agents
//!    in-process (SFO and CHI: enrolled over the gateway, their own SQLite stores and branch
//!    servers, connected over loopback). N requests are created at SFO through the connector
//!    API; then, one at a time, each is (a) edited at SFO (`PATCH /api/v1/requests/{id}`),
//!    timed from the PATCH until SFO's outbox cursor shows the controller acknowledged the
//!    `REQUEST_UPDATED` event (the baseline: one event round trip agent → controller →
//!    agent), then (b) transferred with ownership to CHI (`POST /api/v1/requests/{id}/
//!    operations`), timed from the POST until CHI's connector API (`GET /api/v1/requests/{id}`)
//!    shows the request with `master: true`. Both are polled every `POLL` (1 ms; the tokio
//!    timer's resolution, so figures are up to ~1-2 ms late). Before the next request the
//!    benchmark waits (untimed) until SFO applied the `REQUEST_RESULT`, so transfers do not
//!    overlap. A transfer is five hops and two agent store writes more than an edit: source
//!    outbox → controller ingest (ledger) → flush of `REQUEST_APPLY` → target stages and
//!    answers `REQUEST_OP_OUTCOME` → controller ingest (commit) → flush of `REQUEST_COMMIT` →
//!    target becomes master.
//! 2. **Sustained transfers per second through one controller** (goal >= 1,000/s): SIMULATED
//!    agents (enrolled over gRPC, real `Session` streams, the shared event and command types)
//!    in pairs; every site creates `per_site` requests (`REQUEST_CREATED`), then each request
//!    moves back and forth within its pair with ownership: the master sends `REQUEST_OPERATION`,
//!    the target answers each `REQUEST_APPLY` with an Applied `REQUEST_OP_OUTCOME`, becomes
//!    master on `REQUEST_COMMIT` and at once transfers the request back; sources take
//!    `REQUEST_RESULT`. Every command is acknowledged one by one and events go up in batches
//!    of what is ready (at most 500), as the real agent's link does. Counted centrally: ledger
//!    operations `applied` (the ownership committed in the same transaction) during the timed
//!    window, after a warm-up. Then no new transfer is started, everything drains, and the
//!    ledger is checked: every operation applied, every request has a master and nothing in
//!    flight, and the ledger's master of each request is the site that holds it.
//!    The baseline, run first in the same sessions with the same number of requests per
//!    session: plain `REQUEST_UPDATED` events, each request sending its next edit once its
//!    previous one was acknowledged (a closed loop like the transfers'), counted centrally
//!    from the agents' acknowledged cursors. Ratio = transfers/s / events/s.
//!    While timed, `pg_stat_activity` of the benchmark database is sampled every 100 ms (a
//!    poor man's profile of where the database time goes).
//!
//! `cargo bench --bench request_transfers` runs the full benchmark; `-- --quick` (or
//! `MERIDIAN_BENCH_QUICK=1`) runs a small one in well under 30 s, for CI-like checks.
//! Parameters: `MERIDIAN_BENCH_REQUESTS` (part 1, default 300), `MERIDIAN_BENCH_PAIRS` (part
//! 2, default 4), `MERIDIAN_BENCH_PER_SITE` (part 2, default 250), `MERIDIAN_BENCH_SECONDS`
//! (part 2's timed window, default 20), `MERIDIAN_BENCH_PART` (`latency`, `throughput` or
//! `both`, the default).

#[allow(dead_code)]
mod common;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use chrono::Utc;
use common::{
    Controller, EnrolledAgent, ThreadCpu, describe_threads, drop_database, enroll,
    enrollment_token, env_flag, env_number, init_tracing, machine_info, pg_backend_cpu,
};
use futures::{FutureExt, StreamExt};
use meridian_controller::config_admin::{self, ChangeMode, ResourceInput};
use meridian_controller::store::Store;
use meridian_controller::testing;
use meridian_proto::agent_gateway_client::AgentGatewayClient;
use meridian_proto::{
    AgentFrame, ControllerFrame, Event, EventBatch, agent_frame, controller_frame,
};
use meridian_shared::clock::SystemClock;
use meridian_shared::commands::ControllerCommand;
use meridian_shared::events::{AgentEvent, RequestChanged, RequestEventKind};
use meridian_shared::transfers::{
    Move, OpKind, OpTarget, OperationOutcome, OperationRequested, Outcome, RequestState,
    ResultStatus, TransferMode, UpdatePolicy,
};
use meridian_shared::{Code, SiteCode};
use sqlx::Connection;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, timeout_at};
use tokio_util::sync::CancellationToken;
use tonic::Streaming;

/// The connector API key of both real agents (configured centrally as its hash).
const CONNECTOR_KEY: &str = "mrd_ck_benchmark_request_transfers";
/// How often part 1 polls the agents.
const POLL: Duration = Duration::from_millis(1);
/// Events per batch frame and the in-flight window, as the real agent's link.
const BATCH: usize = 500;
const MAX_IN_FLIGHT: u64 = 10_000;
/// Enrollments in flight at once (part 2's setup).
const ENROLL_CONCURRENCY: usize = 4;
/// `pg_stat_activity` sampling period while part 2 is timed.
const PG_SAMPLE: Duration = Duration::from_millis(100);

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("request_transfers benchmark FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Params {
    quick: bool,
    /// Part 1: requests transferred one at a time.
    requests: usize,
    /// Part 2: pairs of sites, requests per site, timed window, warm-ups.
    pairs: usize,
    per_site: usize,
    baseline: Duration,
    warmup: Duration,
    window: Duration,
    latency: bool,
    throughput: bool,
    /// Bound on each phase (setup, a timed run, the drain).
    phase_limit: Duration,
}

impl Params {
    fn from_env() -> Result<Self> {
        let quick = std::env::args().any(|a| a == "--quick" || a == "--smoke")
            || env_flag("MERIDIAN_BENCH_QUICK")?
            || env_flag("MERIDIAN_BENCH_SMOKE")?;
        let (requests, pairs, per_site, baseline, warmup, window, limit) =
            if quick { (30, 2, 20, 2, 1, 3, 60) } else { (300, 4, 250, 8, 4, 20, 300) };
        let requests = env_number("MERIDIAN_BENCH_REQUESTS")?.unwrap_or(requests);
        let pairs = env_number("MERIDIAN_BENCH_PAIRS")?.unwrap_or(pairs);
        let per_site = env_number("MERIDIAN_BENCH_PER_SITE")?.unwrap_or(per_site);
        let window = env_number("MERIDIAN_BENCH_SECONDS")?.map_or(window, |s| s as u64);
        ensure!((1..=10_000).contains(&requests), "MERIDIAN_BENCH_REQUESTS must be 1..=10000");
        ensure!((1..=50).contains(&pairs), "MERIDIAN_BENCH_PAIRS must be 1..=50");
        ensure!((1..=5_000).contains(&per_site), "MERIDIAN_BENCH_PER_SITE must be 1..=5000");
        ensure!((1..=600).contains(&window), "MERIDIAN_BENCH_SECONDS must be 1..=600");
        let (latency, throughput) = match std::env::var("MERIDIAN_BENCH_PART").as_deref() {
            Ok("latency") => (true, false),
            Ok("throughput") => (false, true),
            Ok("both") | Err(_) => (true, true),
            Ok(other) => {
                bail!("MERIDIAN_BENCH_PART must be latency, throughput or both, not {other:?}")
            }
        };
        Ok(Params {
            quick,
            requests,
            pairs,
            per_site,
            baseline: Duration::from_secs(baseline),
            warmup: Duration::from_secs(warmup),
            window: Duration::from_secs(window),
            latency,
            throughput,
            phase_limit: Duration::from_secs(limit),
        })
    }

    fn goal(&self, met: bool) -> &'static str {
        match (self.quick, met) {
            (true, _) => "not judged in quick mode",
            (false, true) => "met",
            (false, false) => "NOT met",
        }
    }
}

async fn run() -> Result<()> {
    let params = Params::from_env()?;
    println!(
        "Meridian distributed request transfers benchmark{}",
        if params.quick { " (quick mode)" } else { "" }
    );
    println!(
        "parameters: part 1: {} ownership transfers SFO -> CHI between two real agents, one at \
         a time; part 2: {} pairs of simulated agents x {} requests per site, baseline {} s, \
         warm-up {} s, timed {} s; controller, agents and PostgreSQL share this machine",
        params.requests,
        params.pairs,
        params.per_site,
        params.baseline.as_secs(),
        params.warmup.as_secs(),
        params.window.as_secs(),
    );
    if params.latency {
        println!();
        println!("machine: {}", machine_info());
        with_database("part 1", |url, db| latency(url, db, &params)).await?;
    }
    if params.throughput {
        println!();
        println!("machine: {}", machine_info());
        with_database("part 2", |url, db| throughput(url, db, &params)).await?;
    }
    Ok(())
}

/// Runs `part` on a fresh PostgreSQL database, dropped afterwards (kept on failure).
async fn with_database<F, Fut>(what: &str, part: F) -> Result<()>
where
    F: FnOnce(String, String) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let url = testing::fresh_postgres_url().await;
    let db_name = url.rsplit('/').next().unwrap_or_default().to_owned();
    part(url, db_name.clone())
        .await
        .with_context(|| format!("{what} failed (database {db_name} kept for inspection)"))?;
    drop_database(&db_name).await
}

// ---------- configuration ----------

/// Sites (with connector keys when `keys`) and the `REPAIR` request type, in one change.
async fn configure(store: &dyn Store, sites: &[String], keys: bool) -> Result<()> {
    let mut inputs: Vec<serde_json::Value> = vec![];
    for site in sites {
        inputs.push(serde_json::json!({"kind": "site", "code": site,
            "name": format!("Branch {site}"), "time_zone": "Europe/Paris"}));
        if keys {
            inputs.push(serde_json::json!({"kind": "connector_key", "site": site, "code": "bench",
                "name": "Benchmark", "key_hash": meridian_controller::auth::hash_secret(CONNECTOR_KEY)}));
        }
    }
    inputs.push(serde_json::json!({"kind": "request_type", "code": "REPAIR", "name": "Repair",
    "fields": [
        {"name": "summary", "type": "text", "max_length": 80, "required": true},
        {"name": "category", "type": "enum", "values": ["chair", "table"], "required": true}
    ]}));
    let inputs = inputs
        .into_iter()
        .map(|j| serde_json::from_value::<ResourceInput>(j).context("resource JSON"))
        .collect::<Result<Vec<_>>>()?;
    config_admin::change(store, "bench", inputs, vec![], ChangeMode::Upsert)
        .await
        .context("configuring the sites")?;
    Ok(())
}

// ---------- part 1: latency between two real agents ----------

/// A real agent in-process, with its branch server on loopback, port 0.
struct RealAgent {
    ctx: Arc<meridian_agent::Context>,
    base_url: String,
    data_dir: std::path::PathBuf,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<meridian_agent::Result<()>>,
}

impl RealAgent {
    async fn start(gateway_url: &str, site: &str, token: String) -> Result<RealAgent> {
        let data_dir = std::env::temp_dir()
            .join(format!("meridian-bench-transfers-{site}-{}", uuid::Uuid::new_v4().simple()));
        let settings = meridian_agent::Settings {
            controller_url: gateway_url.to_owned(),
            data_dir: data_dir.clone(),
            http_listen: "127.0.0.1:0".into(),
            enrollment_token: token,
            ..Default::default()
        };
        let ctx = meridian_agent::Context::open(&settings, Arc::new(SystemClock))
            .await
            .with_context(|| format!("opening {site}'s agent store"))?;
        let http = TcpListener::bind("127.0.0.1:0").await.context("binding the branch server")?;
        let base_url = format!("http://{}", http.local_addr()?);
        let shutdown = CancellationToken::new();
        let task =
            tokio::spawn(meridian_agent::run_with(ctx.clone(), settings, http, shutdown.clone()));
        Ok(RealAgent { ctx, base_url, data_dir, shutdown, task })
    }

    fn ready(&self) -> bool {
        let connected = self.ctx.link.borrow().connected;
        let typed = self.ctx.config.borrow().as_ref().is_some_and(|c| {
            c.request_types.iter().any(|t| t.code.as_str() == "REPAIR")
                && !c.connector_keys.is_empty()
        });
        connected && typed
    }

    /// (outbox high water, acknowledged by the controller).
    async fn outbox(&self) -> Result<(u64, u64)> {
        Ok(self.ctx.db.read(meridian_agent::store::queries::outbox_state).await?)
    }

    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        let served = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("the agent did not stop within 30 s")?
            .context("the agent task panicked")?;
        let removed = std::fs::remove_dir_all(&self.data_dir).with_context(|| {
            format!("removing the agent's data directory {}", self.data_dir.display())
        });
        served.context("the agent failed")?;
        removed
    }
}

async fn latency(pg_url: String, db_name: String, params: &Params) -> Result<()> {
    println!(
        "part 1: transfer latency between two connected real agents, {} requests SFO -> CHI \
         (goal p50 < 50 ms)",
        params.requests
    );
    let setup_started = Instant::now();
    let deadline = setup_started + params.phase_limit;
    let controller = Controller::start(&pg_url).await?;
    let store = controller.store.clone();
    configure(store.as_ref(), &["SFO".into(), "CHI".into()], true).await?;
    let sfo_token = enrollment_token(store.as_ref(), "SFO").await?;
    let chi_token = enrollment_token(store.as_ref(), "CHI").await?;
    let sfo = RealAgent::start(&controller.gateway_url, "SFO", sfo_token).await?;
    let chi = RealAgent::start(&controller.gateway_url, "CHI", chi_token).await?;
    let result = async {
        wait_until(deadline, "both agents to connect and be configured", || async {
            Ok(sfo.ready() && chi.ready())
        })
        .await?;
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .context("building the HTTP client")?;
        let mut ids = Vec::with_capacity(params.requests);
        for i in 0..params.requests {
            let body = serde_json::json!({"type": "REPAIR",
                "fields": {"summary": format!("bench {i}"), "category": "chair"}});
            let made: serde_json::Value =
                call(&http, reqwest::Method::POST, &format!("{}/api/v1/requests", sfo.base_url), Some(body), 201)
                    .await?
                    .context("POST /api/v1/requests answered no body")?;
            ids.push(made["id"].as_str().context("the created request has no id")?.to_owned());
        }
        // Central knows every request before the timing starts.
        wait_until(deadline, "SFO's REQUEST_CREATED events to be acknowledged", || async {
            let (high, acked) = sfo.outbox().await?;
            Ok(high == acked)
        })
        .await?;
        println!(
            "  setup: controller, two agents enrolled, connected and configured, {} requests \
             created at SFO and acknowledged centrally in {:.2} s; CHI is polled through its \
             connector API (GET /api/v1/requests/{{id}}) and SFO's outbox cursor through its \
             store every {} ms (the resolution of the figures)",
            ids.len(),
            setup_started.elapsed().as_secs_f64(),
            POLL.as_millis()
        );

        let threads_before = ThreadCpu::sample();
        let pg_before = pg_backend_cpu(&db_name);
        let started = Instant::now();
        let mut edits = Vec::with_capacity(ids.len());
        let mut transfers = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            let limit = Instant::now() + Duration::from_secs(30);
            // Baseline: an edit at SFO until the controller acknowledged its event.
            let t0 = Instant::now();
            let body = serde_json::json!({"fields": {"summary": format!("edited {i}")}});
            call(&http, reqwest::Method::PATCH, &format!("{}/api/v1/requests/{id}", sfo.base_url), Some(body), 200)
                .await?;
            let (seq, _) = sfo.outbox().await?;
            loop {
                let (_, acked) = sfo.outbox().await?;
                if acked >= seq {
                    break;
                }
                ensure!(Instant::now() < limit, "request {id}: the edit was not acknowledged within 30 s");
                sleep(POLL).await;
            }
            edits.push(t0.elapsed());

            // The transfer, until CHI holds the master.
            let t0 = Instant::now();
            let body = serde_json::json!({"action": "transfer", "mode": "ownership",
                "target": {"site": "CHI"}});
            call(&http, reqwest::Method::POST, &format!("{}/api/v1/requests/{id}/operations", sfo.base_url), Some(body), 202)
                .await?;
            let chi_url = format!("{}/api/v1/requests/{id}", chi.base_url);
            loop {
                let response = http.get(&chi_url).bearer_auth(CONNECTOR_KEY).send().await?;
                if response.status() == reqwest::StatusCode::OK {
                    let r: serde_json::Value = response.json().await?;
                    if r["distribution"]["master"] == true {
                        break;
                    }
                } else {
                    ensure!(
                        response.status() == reqwest::StatusCode::NOT_FOUND,
                        "GET {chi_url} answered {}",
                        response.status()
                    );
                }
                ensure!(Instant::now() < limit, "request {id}: CHI did not become master within 30 s");
                sleep(POLL).await;
            }
            transfers.push(t0.elapsed());

            // Untimed: SFO applied the result, so the next transfer does not overlap this one.
            let sfo_url = format!("{}/api/v1/requests/{id}", sfo.base_url);
            loop {
                let r: serde_json::Value =
                    call(&http, reqwest::Method::GET, &sfo_url, None, 200).await?.unwrap_or_default();
                let d = &r["distribution"];
                if d["pending_operation"].is_null() {
                    ensure!(
                        d["transfer_status"] == "Success" && d["master"] == false,
                        "request {id} at SFO after the transfer: {d}"
                    );
                    break;
                }
                ensure!(Instant::now() < limit, "request {id}: SFO got no result within 30 s");
                sleep(POLL).await;
            }
        }
        let elapsed = started.elapsed();
        let cpu = ThreadCpu::sample().since(&threads_before);
        let pg_cpu = pg_backend_cpu(&db_name) - pg_before;

        let e = Percentiles::of(&edits);
        let t = Percentiles::of(&transfers);
        println!(
            "  baseline, edit at SFO (PATCH) until the controller acknowledged its event: {}",
            e.describe()
        );
        println!("  ownership transfer SFO -> CHI (POST) until CHI holds the master: {}", t.describe());
        println!(
            "  transfer / edit round trip (p50): {:.1}x; p50 {:.1} ms (goal < 50 ms: {}); {} \
             transfers + edits in {:.1} s",
            t.p50 / e.p50.max(1e-9),
            t.p50 * 1e3,
            params.goal(t.p50 < 0.050),
            transfers.len(),
            elapsed.as_secs_f64()
        );
        println!(
            "  CPU while timed: this process (controller + agents + polling) by thread: {}; \
             PostgreSQL backends of this database {pg_cpu:.2} s",
            describe_threads(&cpu)
        );

        // The ledger agrees: every transfer applied, every request's master at CHI.
        let mut pg = sqlx::PgConnection::connect(&pg_url).await?;
        let applied: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM request_ops WHERE status = 'applied' AND mode = 'ownership' \
             AND source_site = 'SFO' AND target_site = 'CHI'",
        )
        .fetch_one(&mut pg)
        .await?;
        let others: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM request_ops WHERE NOT (status = 'applied' AND mode = 'ownership')",
        )
        .fetch_one(&mut pg)
        .await?;
        let at_chi: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM request_owners WHERE master_site = 'CHI' AND in_flight_op IS NULL",
        )
        .fetch_one(&mut pg)
        .await?;
        let n = ids.len() as i64;
        ensure!(
            applied == n && others == 0 && at_chi == n,
            "ledger: {applied} applied ownership transfers, {others} other operations, {at_chi} \
             requests mastered at CHI; expected {n}, 0, {n}"
        );
        pg.close().await?;
        println!(
            "  verified: the ledger holds exactly {n} applied ownership transfers SFO -> CHI and \
             every request's master at CHI; CHI answered master for each, SFO recorded Success"
        );
        Ok(())
    }
    .await;
    let stopped = (sfo.stop().await, chi.stop().await);
    result?;
    stopped.0?;
    stopped.1?;
    controller.stop().await
}

/// Calls the branch API with the connector key; `Some(body)` unless the answer has none.
async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<serde_json::Value>,
    expected: u16,
) -> Result<Option<serde_json::Value>> {
    let mut request = http.request(method.clone(), url).bearer_auth(CONNECTOR_KEY);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.with_context(|| format!("{method} {url} failed"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    ensure!(status.as_u16() == expected, "{method} {url} answered {status}: {text}");
    Ok(if text.is_empty() { None } else { Some(serde_json::from_str(&text)?) })
}

struct Percentiles {
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Percentiles {
    fn of(samples: &[Duration]) -> Percentiles {
        let mut v: Vec<f64> = samples.iter().map(Duration::as_secs_f64).collect();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1)) - 1;
            v.get(i).copied().unwrap_or_default()
        };
        Percentiles {
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: at(1.0),
            mean: v.iter().sum::<f64>() / v.len().max(1) as f64,
        }
    }

    fn describe(&self) -> String {
        format!(
            "p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms (mean {:.1} ms)",
            self.p50 * 1e3,
            self.p95 * 1e3,
            self.p99 * 1e3,
            self.max * 1e3,
            self.mean * 1e3
        )
    }
}

// ---------- part 2: throughput through one controller, simulated agents ----------

/// What the simulated agents are asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Create the requests, report ready once central acknowledged them.
    Setup,
    /// Edit every request in a closed loop (`REQUEST_UPDATED`).
    Baseline,
    /// Transfer every request held as master to the partner, again on each commit.
    Transfer,
    /// Start nothing new; answer what comes.
    Drain,
    /// Return what is held.
    Stop,
}

#[derive(Default)]
struct Stats {
    applies: AtomicU64,
    commits: AtomicU64,
    results_ok: AtomicU64,
    results_failed: AtomicU64,
    /// Commands other than the protocol's happy path (aborts, withdrawals, refusals).
    unexpected: AtomicU64,
    /// Largest batch frame sent, and batch frames / events sent in the transfer phase.
    transfer_batches: AtomicU64,
    transfer_events: AtomicU64,
}

/// What a simulated agent holds at the end.
struct Held {
    site: String,
    masters: Vec<(uuid::Uuid, usize)>,
    staged: usize,
    in_flight: usize,
}

async fn throughput(pg_url: String, db_name: String, params: &Params) -> Result<()> {
    let sites_n = params.pairs * 2;
    let total_requests = sites_n * params.per_site;
    println!(
        "part 2: sustained ownership transfers through one controller: {sites_n} simulated \
         agents in {} pairs, {} requests per site ({total_requests} in all) moving back and \
         forth within their pair (goal >= 1,000 transfers/s)",
        params.pairs, params.per_site
    );
    let setup_started = Instant::now();
    let deadline = setup_started + params.phase_limit;
    let controller = Controller::start(&pg_url).await?;
    let store = controller.store.clone();
    let sites: Vec<String> = (1..=sites_n).map(|i| format!("T{i:02}")).collect();
    configure(store.as_ref(), &sites, false).await?;
    let gateway_url = controller.gateway_url.clone();
    let enrolled: Vec<Result<EnrolledAgent>> = futures::stream::iter(sites.iter().enumerate())
        .map(|(index, site)| {
            let (store, gateway_url) = (store.clone(), gateway_url.clone());
            async move {
                let token = enrollment_token(store.as_ref(), site).await?;
                let agent = timeout_at(deadline, enroll(&gateway_url, index, &token))
                    .await
                    .map_err(|_| anyhow!("timed out enrolling agent {index}"))??;
                ensure!(&agent.site == site, "agent {index} enrolled for {}", agent.site);
                Ok(agent)
            }
        })
        .buffered(ENROLL_CONCURRENCY)
        .collect()
        .await;
    let agents = enrolled.into_iter().collect::<Result<Vec<_>>>()?;

    let stats = Arc::new(Stats::default());
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let (ready_tx, mut ready_rx) = mpsc::channel::<usize>(sites_n);
    let mut tasks = JoinSet::new();
    for agent in agents {
        let partner = sites[agent.index ^ 1].clone();
        tasks.spawn(simulated_agent(
            agent,
            partner,
            params.per_site,
            phase_rx.clone(),
            ready_tx.clone(),
            stats.clone(),
        ));
    }
    drop(ready_tx);
    let mut ready = 0;
    while ready < sites_n {
        tokio::select! {
            r = ready_rx.recv() => match r {
                Some(_) => ready += 1,
                None => bail!("the simulated agents stopped before all were ready"),
            },
            Some(done) = tasks.join_next() => {
                tasks.abort_all();
                done.context("a simulated agent panicked")??;
                bail!("a simulated agent finished during the setup");
            }
            _ = tokio::time::sleep_until(deadline) => {
                tasks.abort_all();
                bail!("timed out: {ready} of {sites_n} agents ready");
            }
        }
    }
    let mut pg = sqlx::PgConnection::connect(&pg_url)
        .await
        .with_context(|| format!("cannot connect to the benchmark database {db_name}"))?;
    let known: i64 =
        sqlx::query_scalar("SELECT count(*) FROM request_owners").fetch_one(&mut pg).await?;
    ensure!(known == total_requests as i64, "the ledger knows {known} requests");
    println!(
        "  setup: {sites_n} agents enrolled, sessions open and configured, {total_requests} \
         requests created (REQUEST_CREATED) and acknowledged in {:.2} s",
        setup_started.elapsed().as_secs_f64()
    );

    let outcome = async {
        // Baseline: plain REQUEST_UPDATED events.
        phase_tx.send_replace(Phase::Baseline);
        let warm = params.warmup.min(Duration::from_secs(2));
        watch_agents(&mut tasks, warm).await?;
        let (e0, t0) = (acked_events(&mut pg).await?, Instant::now());
        watch_agents(&mut tasks, params.baseline).await?;
        let (e1, t1) = (acked_events(&mut pg).await?, Instant::now());
        let events_per_s = (e1 - e0) as f64 / (t1 - t0).as_secs_f64();
        println!(
            "  baseline: {} REQUEST_UPDATED events ingested in {:.2} s = {events_per_s:.0} \
             events/s ({} requests per session each sending its next edit once the previous was \
             acknowledged; load average now {})",
            e1 - e0,
            (t1 - t0).as_secs_f64(),
            params.per_site,
            load_average()
        );

        // Transfers: warm-up, then the timed window.
        phase_tx.send_replace(Phase::Transfer);
        watch_agents(&mut tasks, params.warmup).await?;
        let threads_before = ThreadCpu::sample();
        let pg_before = pg_backend_cpu(&db_name);
        let (c0, w0) = (applied_transfers(&mut pg).await?, Utc::now());
        let t0 = Instant::now();
        let batches0 = stats.transfer_batches.load(Ordering::Relaxed);
        let events0 = stats.transfer_events.load(Ordering::Relaxed);
        let profile = tokio::spawn(sample_pg_activity(pg_url.clone(), db_name.clone(), t0 + params.window));
        watch_agents(&mut tasks, params.window).await?;
        let (c1, w1) = (applied_transfers(&mut pg).await?, Utc::now());
        let elapsed = t0.elapsed();
        let cpu = ThreadCpu::sample().since(&threads_before);
        let pg_cpu = pg_backend_cpu(&db_name) - pg_before;
        let batches = stats.transfer_batches.load(Ordering::Relaxed) - batches0;
        let events = stats.transfer_events.load(Ordering::Relaxed) - events0;
        let samples = profile.await.context("the profiler panicked")??;
        let transfers_per_s = (c1 - c0) as f64 / elapsed.as_secs_f64();
        let load = load_average();

        // Ledger-side latency of the transfers completed in the window (recorded -> applied).
        let (p50, p95, p99): (Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d), \
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY d), \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY d) \
             FROM (SELECT EXTRACT(EPOCH FROM completed_at - created_at)::float8 AS d \
                   FROM request_ops WHERE status = 'applied' AND completed_at > $1 \
                   AND completed_at <= $2) s",
        )
        .bind(w0)
        .bind(w1)
        .fetch_one(&mut pg)
        .await?;
        let (p50, p95, p99) = (p50.unwrap_or(0.0), p95.unwrap_or(0.0), p99.unwrap_or(0.0));

        // Drain: nothing new; everything in flight settles.
        phase_tx.send_replace(Phase::Drain);
        let drain_started = Instant::now();
        let drain_deadline = drain_started + params.phase_limit;
        loop {
            let (open, in_flight, unacked, staged): (i64, i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM request_ops WHERE status IN ('queued', 'pending', 'retry')), \
                        (SELECT count(*) FROM request_owners WHERE in_flight_op IS NOT NULL), \
                        (SELECT count(*) FROM agents WHERE command_acked_seq < command_seq), \
                        (SELECT count(*) FROM staged_commands)",
            )
            .fetch_one(&mut pg)
            .await?;
            let ops: i64 = sqlx::query_scalar("SELECT count(*) FROM request_ops")
                .fetch_one(&mut pg)
                .await?;
            let results = stats.results_ok.load(Ordering::Relaxed)
                + stats.results_failed.load(Ordering::Relaxed);
            if open == 0 && in_flight == 0 && unacked == 0 && staged == 0 && results == ops as u64 {
                break;
            }
            ensure!(
                Instant::now() < drain_deadline,
                "the drain did not settle: {open} open operations, {in_flight} requests in \
                 flight, {unacked} agents with unacknowledged commands, {staged} staged commands, \
                 {results} results of {ops} operations"
            );
            watch_agents(&mut tasks, Duration::from_millis(100)).await?;
        }
        let drained = drain_started.elapsed();

        println!(
            "  transfers: {} ownership transfers applied (ledger) in {:.2} s = {transfers_per_s:.0} \
             transfers/s (goal >= 1,000/s: {}); load average at the end {load}",
            c1 - c0,
            elapsed.as_secs_f64(),
            params.goal(transfers_per_s >= 1000.0),
        );
        println!(
            "  ratio transfers/s / REQUEST_UPDATED events/s: {:.3} (a transfer costs {:.1} \
             baseline events)",
            transfers_per_s / events_per_s.max(1e-9),
            events_per_s / transfers_per_s.max(1e-9)
        );
        println!(
            "  ledger latency of the timed transfers (REQUEST_OPERATION ingested -> outcome \
             committed): p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms; agents sent {events} events \
             in {batches} batch frames ({:.1} per frame); drain {:.2} s",
            p50 * 1e3,
            p95 * 1e3,
            p99 * 1e3,
            events as f64 / batches.max(1) as f64,
            drained.as_secs_f64()
        );
        println!(
            "  CPU while timed ({:.1} s wall, {} cores): this process (controller + simulated \
             agents) {:.2} s by thread: {}; PostgreSQL backends of this database {pg_cpu:.2} s",
            elapsed.as_secs_f64(),
            cores(),
            cpu.0.values().sum::<f64>(),
            describe_threads(&cpu)
        );
        print_profile(&samples);
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if let Err(e) = outcome {
        tasks.abort_all();
        return Err(e);
    }

    // Verify: the agents' view and the ledger's agree.
    phase_tx.send_replace(Phase::Stop);
    let mut held = Vec::new();
    while let Some(done) = timeout_at(Instant::now() + Duration::from_secs(30), tasks.join_next())
        .await
        .map_err(|_| anyhow!("the simulated agents did not stop"))?
    {
        held.push(done.context("a simulated agent panicked")??);
    }
    let failed = stats.results_failed.load(Ordering::Relaxed);
    let unexpected = stats.unexpected.load(Ordering::Relaxed);
    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM request_ops GROUP BY status ORDER BY status")
            .fetch_all(&mut pg)
            .await?;
    let not_applied: i64 = statuses.iter().filter(|(s, _)| s != "applied").map(|(_, n)| n).sum();
    let applied: i64 = statuses.iter().filter(|(s, _)| s == "applied").map(|(_, n)| n).sum();
    ensure!(
        not_applied == 0 && failed == 0 && unexpected == 0,
        "not every transfer applied: ledger {statuses:?}, {failed} failure results, \
         {unexpected} unexpected commands"
    );
    let owners: Vec<(String, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT request_id, master_site, in_flight_op FROM request_owners")
            .fetch_all(&mut pg)
            .await?;
    let ledger: HashMap<String, Option<String>> = owners
        .iter()
        .map(|(id, m, f)| (id.clone(), if f.is_some() { None } else { m.clone() }))
        .collect();
    let mut masters = 0usize;
    let mut moves = 0usize;
    for h in &held {
        ensure!(
            h.staged == 0 && h.in_flight == 0,
            "{} still has staged or in-flight requests",
            h.site
        );
        for (id, history) in &h.masters {
            masters += 1;
            moves += history;
            let at = ledger.get(&id.to_string()).cloned().flatten();
            ensure!(
                at.as_deref() == Some(h.site.as_str()),
                "{id} is master at {}, the ledger says {at:?}",
                h.site
            );
        }
    }
    ensure!(
        masters == total_requests && ledger.len() == total_requests,
        "{masters} masters held, {} in the ledger, {total_requests} created",
        ledger.len()
    );
    let results = stats.results_ok.load(Ordering::Relaxed);
    ensure!(results == applied as u64, "{results} success results for {applied} applied transfers");
    println!(
        "  verified: all {applied} operations in the ledger applied (ownership transfers), \
         {results} Success results at the sources, every one of the {total_requests} requests \
         has exactly one master, where the ledger says, nothing in flight or staged; {:.1} moves \
         per request on average in its history",
        moves as f64 / masters.max(1) as f64
    );
    pg.close().await.context("closing the benchmark database")?;
    controller.stop().await
}

/// Waits `d` while no simulated agent fails.
async fn watch_agents(tasks: &mut JoinSet<Result<Held>>, d: Duration) -> Result<()> {
    let until = Instant::now() + d;
    tokio::select! {
            Some(done) = tasks.join_next() => {
                tasks.abort_all();
                done.context("a simulated agent panicked")??;
                bail!("a simulated agent stopped early");
            }
            _ = tokio::time::sleep_until(until) => Ok(()),
    }
}

async fn acked_events(pg: &mut sqlx::PgConnection) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT COALESCE(sum(acked_seq), 0)::bigint FROM agents")
        .fetch_one(pg)
        .await?)
}

async fn applied_transfers(pg: &mut sqlx::PgConnection) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM request_ops WHERE status = 'applied' AND mode = 'ownership'",
    )
    .fetch_one(pg)
    .await?)
}

/// Samples the non-idle backends of the database until `until`: (what they run or wait for,
/// how many times seen), and the number of samples.
async fn sample_pg_activity(
    url: String,
    db_name: String,
    until: Instant,
) -> Result<(BTreeMap<String, u64>, u64)> {
    let mut pg = sqlx::PgConnection::connect(&url).await?;
    let mut seen = BTreeMap::new();
    let mut samples = 0;
    while Instant::now() < until {
        let rows: Vec<(Option<String>, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT state, wait_event_type || ':' || wait_event, left(regexp_replace(query, '\\s+', ' ', 'g'), 90) \
             FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() \
             AND state IS NOT NULL AND state <> 'idle'",
        )
        .bind(&db_name)
        .fetch_all(&mut pg)
        .await?;
        samples += 1;
        for (state, wait, query) in rows {
            let key = format!(
                "[{}{}] {}",
                state.unwrap_or_default(),
                wait.map(|w| format!(", {w}")).unwrap_or_default(),
                query.unwrap_or_default()
            );
            *seen.entry(key).or_insert(0) += 1;
        }
        sleep(PG_SAMPLE).await;
    }
    pg.close().await?;
    Ok((seen, samples))
}

fn print_profile((seen, samples): &(BTreeMap<String, u64>, u64)) {
    let mut top: Vec<(&String, &u64)> = seen.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1));
    let busy: u64 = seen.values().sum();
    println!(
        "  PostgreSQL backends busy (pg_stat_activity, {samples} samples every {} ms): {:.2} \
         busy backends on average; most seen:",
        PG_SAMPLE.as_millis(),
        busy as f64 / (*samples).max(1) as f64
    );
    for (what, n) in top.into_iter().take(12) {
        println!("    {:5.1}%  {what}", 100.0 * *n as f64 / (*samples).max(1) as f64);
    }
}

/// One simulated agent: opens a session, acknowledges every command, creates its requests,
/// then does what the phase says.
async fn simulated_agent(
    agent: EnrolledAgent,
    partner: String,
    per_site: usize,
    mut phase: watch::Receiver<Phase>,
    ready: mpsc::Sender<usize>,
    stats: Arc<Stats>,
) -> Result<Held> {
    let index = agent.index;
    let site = SiteCode::parse(&agent.site)?;
    let partner = SiteCode::parse(&partner)?;
    let bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
        format!("Bearer {}", agent.credential)
            .parse()
            .map_err(|_| anyhow!("agent {index}: the credential is not a valid header value"))?;
    let mut client = AgentGatewayClient::new(agent.channel);
    let (out, mut out_rx) = mpsc::channel::<AgentFrame>(MAX_IN_FLIGHT as usize);
    out.send(frame(agent_frame::Body::Hello(meridian_proto::Hello {
        agent_id: agent.agent_id.clone(),
        site_code: agent.site.clone(),
        version: meridian_shared::VERSION.to_owned(),
        config_revision: 0,
        last_applied_command_seq: 0,
        outbox_high_water: 0,
        agent_time_ms: Utc::now().timestamp_millis(),
        ..Default::default()
    })))
    .await
    .map_err(|_| anyhow!("agent {index}: outbound stream closed"))?;
    let mut request = tonic::Request::new(futures::stream::poll_fn(move |cx| out_rx.poll_recv(cx)));
    request.metadata_mut().insert("authorization", bearer);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut inbound = timeout_at(deadline, client.session(request))
        .await
        .map_err(|_| anyhow!("agent {index}: timed out opening the session"))?
        .with_context(|| format!("agent {index}: session refused"))?
        .into_inner();
    match timeout_at(deadline, inbound.message())
        .await
        .map_err(|_| anyhow!("agent {index}: timed out waiting for Welcome"))?
        .with_context(|| format!("agent {index}: session failed before Welcome"))?
    {
        Some(ControllerFrame { body: Some(controller_frame::Body::Welcome(_)) }) => {}
        other => bail!("agent {index}: expected Welcome, got {other:?}"),
    }
    let mut sim = Sim {
        site,
        partner,
        out,
        next_seq: 1,
        sent: 0,
        acked: 0,
        pending: VecDeque::new(),
        masters: HashMap::new(),
        staged: HashMap::new(),
        in_flight: HashMap::new(),
        edits: VecDeque::new(),
        created_up_to: None,
        phase: Phase::Setup,
        stats,
        ready: Some(ready),
        per_site,
    };
    let result = sim.run(&mut inbound, &mut phase).await;
    result.with_context(|| format!("simulated agent {index} ({})", agent.site))
}

struct Sim {
    site: SiteCode,
    partner: SiteCode,
    out: mpsc::Sender<AgentFrame>,
    /// The outbox: the next sequence number, sent and acknowledged cursors, not yet sent.
    next_seq: u64,
    sent: u64,
    acked: u64,
    pending: VecDeque<Event>,
    /// Requests held as master, by id.
    masters: HashMap<uuid::Uuid, RequestState>,
    /// Staged incoming ownership transfers, by operation id.
    staged: HashMap<uuid::Uuid, RequestState>,
    /// Ownership transfers this site started, awaiting their result, by operation id.
    in_flight: HashMap<uuid::Uuid, RequestState>,
    /// Baseline edits sent: (event seq, request).
    edits: VecDeque<(u64, uuid::Uuid)>,
    /// The last REQUEST_CREATED event's seq, once created.
    created_up_to: Option<u64>,
    phase: Phase,
    stats: Arc<Stats>,
    ready: Option<mpsc::Sender<usize>>,
    per_site: usize,
}

impl Sim {
    async fn run(
        &mut self,
        inbound: &mut Streaming<ControllerFrame>,
        phase: &mut watch::Receiver<Phase>,
    ) -> Result<Held> {
        loop {
            tokio::select! {
                changed = phase.changed() => {
                    if changed.is_err() {
                        bail!("the benchmark stopped");
                    }
                    let now = *phase.borrow_and_update();
                    self.enter(now);
                    if now == Phase::Stop {
                        return Ok(self.held());
                    }
                }
                msg = inbound.message() => {
                    let Some(f) = msg.context("session stream failed")? else {
                        bail!("the controller closed the session");
                    };
                    self.handle(f).await?;
                    // Whatever else already arrived, before the events go up (the real agent
                    // batches what its outbox holds when the pump runs).
                    for _ in 0..256 {
                        match inbound.next().now_or_never() {
                            Some(Some(f)) => self.handle(f.context("session stream failed")?).await?,
                            Some(None) => bail!("the controller closed the session"),
                            None => break,
                        }
                    }
                }
            }
            self.pump().await?;
        }
    }

    fn held(&self) -> Held {
        Held {
            site: self.site.to_string(),
            masters: self.masters.iter().map(|(id, s)| (*id, s.history.len())).collect(),
            staged: self.staged.len(),
            in_flight: self.in_flight.len(),
        }
    }

    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        match phase {
            Phase::Baseline => {
                let ids: Vec<uuid::Uuid> = self.masters.keys().copied().collect();
                for id in ids {
                    self.edit(id);
                }
            }
            Phase::Transfer => {
                let ids: Vec<uuid::Uuid> = self.masters.keys().copied().collect();
                for id in ids {
                    self.transfer(id);
                }
            }
            Phase::Setup | Phase::Drain | Phase::Stop => {}
        }
    }

    fn push(&mut self, event: AgentEvent) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.push_back(Event {
            seq,
            kind: event.kind().to_owned(),
            occurred_at_ms: Utc::now().timestamp_millis(),
            payload: event.payload(),
        });
        seq
    }

    fn create_requests(&mut self) {
        let now = Utc::now();
        let mut last = 0;
        for n in 1..=self.per_site {
            let state = RequestState {
                request_id: uuid::Uuid::now_v7(),
                human_id: meridian_shared::requests::human_id(&self.site, n as u64),
                request_type: Code::parse("REPAIR").expect("valid code"),
                fields: fields("created"),
                revision: 1,
                created_at: now,
                history: vec![],
            };
            last = self.push(AgentEvent::Request(RequestEventKind::Created, changed(&state)));
            self.masters.insert(state.request_id, state);
        }
        self.created_up_to = Some(last);
    }

    fn edit(&mut self, id: uuid::Uuid) {
        let Some(state) = self.masters.get_mut(&id) else { return };
        state.revision += 1;
        state.fields = fields(&format!("edit {}", state.revision));
        let event = AgentEvent::Request(RequestEventKind::Updated, changed(state));
        let seq = self.push(event);
        self.edits.push_back((seq, id));
    }

    /// Gives the ownership of `id` up to the partner (as `distribution::start` does).
    fn transfer(&mut self, id: uuid::Uuid) {
        let Some(mut state) = self.masters.remove(&id) else { return };
        let op_id = uuid::Uuid::now_v7();
        let now = Utc::now();
        state.history.push(Move {
            at: now,
            op_id,
            kind: OpKind::Transfer,
            mode: Some(TransferMode::Ownership),
            from_site: self.site.clone(),
            to_site: self.partner.clone(),
            mapping: None,
            rule: None,
        });
        self.push(AgentEvent::RequestOperation(OperationRequested {
            op_id,
            kind: OpKind::Transfer,
            mode: Some(TransferMode::Ownership),
            target: OpTarget::Site(self.partner.clone()),
            mapping: None,
            pool: Code::parse("default").expect("valid code"),
            update: UpdatePolicy::Immediately,
            rule: None,
            request: state.clone(),
            source_keeps_copy: true,
            at: now,
        }));
        self.in_flight.insert(op_id, state);
    }

    async fn send(&self, body: agent_frame::Body) -> Result<()> {
        self.out.send(frame(body)).await.map_err(|_| anyhow!("outbound stream closed"))
    }

    /// Sends pending events in batches while the in-flight window allows.
    async fn pump(&mut self) -> Result<()> {
        while !self.pending.is_empty() && self.sent < self.acked + MAX_IN_FLIGHT {
            let n = self.pending.len().min(BATCH);
            let events: Vec<Event> = self.pending.drain(..n).collect();
            self.sent = events.last().map_or(self.sent, |e| e.seq);
            if self.phase == Phase::Transfer {
                self.stats.transfer_batches.fetch_add(1, Ordering::Relaxed);
                self.stats.transfer_events.fetch_add(n as u64, Ordering::Relaxed);
            }
            self.send(agent_frame::Body::Events(EventBatch { events })).await?;
        }
        Ok(())
    }

    async fn handle(&mut self, f: ControllerFrame) -> Result<()> {
        use controller_frame::Body;
        match f.body {
            Some(Body::EventAck(ack)) => {
                ensure!(
                    ack.up_to_seq <= self.sent,
                    "acknowledged {} beyond what was sent",
                    ack.up_to_seq
                );
                if ack.up_to_seq < self.acked {
                    bail!("the controller acknowledged {} after {}", ack.up_to_seq, self.acked);
                }
                self.acked = ack.up_to_seq;
                while self.edits.front().is_some_and(|(seq, _)| *seq <= self.acked) {
                    let (_, id) = self.edits.pop_front().expect("checked");
                    if self.phase == Phase::Baseline {
                        self.edit(id);
                    }
                }
                if let Some(up_to) = self.created_up_to
                    && self.acked >= up_to
                    && let Some(ready) = self.ready.take()
                {
                    ready.send(0).await.map_err(|_| anyhow!("the benchmark stopped"))?;
                }
                Ok(())
            }
            Some(Body::Command(cmd)) => {
                let mut error = String::new();
                match ControllerCommand::decode(&cmd.kind, &cmd.payload) {
                    Ok(ControllerCommand::ApplyConfig(_)) => {
                        if self.created_up_to.is_none() {
                            self.create_requests();
                        }
                    }
                    Ok(ControllerCommand::ApplyOperation(apply)) => {
                        self.stats.applies.fetch_add(1, Ordering::Relaxed);
                        if apply.mode != Some(TransferMode::Ownership) {
                            self.stats.unexpected.fetch_add(1, Ordering::Relaxed);
                        }
                        let request = apply.request;
                        self.push(AgentEvent::RequestOperationOutcome(OperationOutcome {
                            op_id: apply.op_id,
                            attempt: apply.attempt,
                            outcome: Outcome::Applied {
                                request_id: request.request_id,
                                human_id: request.human_id.clone(),
                            },
                            at: Utc::now(),
                        }));
                        self.staged.insert(apply.op_id, request);
                    }
                    Ok(ControllerCommand::CommitOperation(d)) => {
                        self.stats.commits.fetch_add(1, Ordering::Relaxed);
                        match self.staged.remove(&d.op_id) {
                            Some(state) => {
                                self.masters.insert(state.request_id, state);
                                if self.phase == Phase::Transfer {
                                    self.transfer(d.request_id);
                                }
                            }
                            None => {
                                self.stats.unexpected.fetch_add(1, Ordering::Relaxed);
                                error = format!("nothing staged for operation {}", d.op_id);
                            }
                        }
                    }
                    Ok(ControllerCommand::OperationResult(r)) => {
                        match self.in_flight.remove(&r.op_id) {
                            Some(state) => {
                                if r.status == ResultStatus::Success {
                                    self.stats.results_ok.fetch_add(1, Ordering::Relaxed);
                                } else {
                                    // The ownership comes back.
                                    self.stats.results_failed.fetch_add(1, Ordering::Relaxed);
                                    eprintln!(
                                        "{}: operation {} ended {:?}: {:?}",
                                        self.site, r.op_id, r.status, r.reason
                                    );
                                    self.masters.insert(state.request_id, state);
                                }
                            }
                            None => {
                                self.stats.unexpected.fetch_add(1, Ordering::Relaxed);
                                error = format!("no operation {} in flight", r.op_id);
                            }
                        }
                    }
                    Ok(
                        ControllerCommand::SyncAppointments(_)
                        | ControllerCommand::UpsertAppointment(_),
                    ) => {}
                    Ok(other) => {
                        self.stats.unexpected.fetch_add(1, Ordering::Relaxed);
                        eprintln!("{}: unexpected command {}", self.site, other.kind());
                    }
                    Err(e) => {
                        self.stats.unexpected.fetch_add(1, Ordering::Relaxed);
                        error = e.to_string();
                    }
                }
                self.send(agent_frame::Body::CommandAck(meridian_proto::CommandAck {
                    up_to_seq: cmd.seq,
                    error,
                }))
                .await
            }
            Some(Body::Ping(p)) => {
                self.send(agent_frame::Body::Pong(meridian_proto::Pong {
                    nonce: p.nonce,
                    sent_at_ms: p.sent_at_ms,
                }))
                .await
            }
            Some(Body::Pong(_)) => Ok(()),
            Some(Body::Error(e)) => bail!("controller protocol error {}: {}", e.code, e.message),
            Some(Body::Welcome(_)) | None => bail!("unexpected frame from the controller"),
        }
    }
}

fn fields(summary: &str) -> meridian_shared::requests::Values {
    [
        ("summary".to_owned(), serde_json::json!(summary)),
        ("category".to_owned(), serde_json::json!("chair")),
    ]
    .into_iter()
    .collect()
}

fn changed(state: &RequestState) -> RequestChanged {
    RequestChanged {
        request_id: state.request_id,
        human_id: state.human_id.clone(),
        request_type: state.request_type.clone(),
        revision: state.revision,
        fields: state.fields.clone(),
        at: Utc::now(),
    }
}

fn frame(body: agent_frame::Body) -> AgentFrame {
    AgentFrame { body: Some(body) }
}

// ---------- helpers ----------

async fn wait_until<F, Fut>(deadline: Instant, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    loop {
        if check().await? {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

fn load_average() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}
