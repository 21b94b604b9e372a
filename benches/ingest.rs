//! Central ingest benchmark.
//!
//! Starts a controller in-process on a fresh PostgreSQL database, creates one site per
//! simulated agent, enrolls the agents over gRPC and lets each stream its events through a real
//! `Session` (batches of 500, up to 10 batches unacknowledged, as the real agent pipelines
//! its outbox). The rate is measured from the first batch until every event is acknowledged
//! and folded into the statistics (visit facts, transaction facts, rollups). The
//! baseline, measured in the same run: the same rows loaded into a fresh copy of the `events`
//! table with `COPY … FROM STDIN`.
//! Optionally the session part runs again on the embedded SQLite store (no baseline there).
//!
//! `cargo bench --bench ingest` runs the full benchmark; `-- --smoke` (or
//! `MERIDIAN_BENCH_SMOKE=1`) runs a small one, for CI to check that it still works.
//! Two workloads, each on its own database with its own baseline: whole visit lifecycles as
//! agents stream them (the figure the goal is judged on), and creations only (every event a new
//! visit: the worst case for fact maintenance, reported for information).
//! Parameters: `MERIDIAN_BENCH_AGENTS` (default 100), `MERIDIAN_BENCH_EVENTS` (events per agent,
//! default 2000), `MERIDIAN_BENCH_WORKLOAD` (`lifecycles`, `creations` or `both`, the default),
//! `MERIDIAN_BENCH_SQLITE` (`0` skips the SQLite run, `1` forces it in smoke mode).

#[allow(dead_code)]
mod common;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use chrono::{DateTime, SecondsFormat, Utc};
use common::{
    Controller, EnrolledAgent, ThreadCpu, drop_database, enroll, enrollment_token, env_flag,
    env_number, filesystem_of, init_tracing, machine_info, stat_cpu_seconds,
};
use meridian_controller::config_admin::{self, ChangeMode, ResourceInput};
use meridian_controller::store::Store;
use meridian_controller::testing;
use meridian_proto::agent_gateway_client::AgentGatewayClient;
use meridian_proto::{
    AgentFrame, ControllerFrame, Event, EventBatch, agent_frame, controller_frame,
};
use meridian_shared::business_day::format_ticket;
use meridian_shared::events::{AgentEvent, VisitChanged, VisitCreated, VisitEventKind};
use meridian_shared::visits::Outcome;
use meridian_shared::{Code, VisitId};
use sqlx::Connection;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout_at};
use tonic::Streaming;

/// Events per batch frame (the real agent's batch size).
const BATCH_EVENTS: u64 = 500;
/// Batches sent but not yet acknowledged, at most, per agent (the real agent allows 10,000
/// events, i.e. 20 batches).
const BATCHES_IN_FLIGHT: u64 = 10;
/// Largest gRPC message either side accepts (the gateway's limit).
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ingest benchmark FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Params {
    smoke: bool,
    agents: usize,
    events_per_agent: u64,
    sqlite: bool,
    /// The event streams to run, each with its own database and baseline.
    workloads: Vec<WorkloadKind>,
    /// Bound on each phase (setup, streaming, baseline).
    phase_limit: Duration,
}

impl Params {
    fn from_env() -> Result<Self> {
        let smoke = std::env::args().any(|a| a == "--smoke") || env_flag("MERIDIAN_BENCH_SMOKE")?;
        let (agents, events, limit) = if smoke { (4, 1_000, 60) } else { (100, 2_000, 600) };
        let agents = env_number("MERIDIAN_BENCH_AGENTS")?.unwrap_or(agents);
        let events_per_agent = env_number("MERIDIAN_BENCH_EVENTS")?.unwrap_or(events);
        ensure!((1..=999).contains(&agents), "MERIDIAN_BENCH_AGENTS must be 1..=999");
        ensure!(events_per_agent >= 1, "MERIDIAN_BENCH_EVENTS must be at least 1");
        let sqlite = match std::env::var("MERIDIAN_BENCH_SQLITE") {
            Ok(v) => v == "1",
            Err(_) => !smoke,
        };
        let workloads = match std::env::var("MERIDIAN_BENCH_WORKLOAD").as_deref() {
            Ok("lifecycles") => vec![WorkloadKind::Lifecycles],
            Ok("creations") => vec![WorkloadKind::Creations],
            Ok("both") | Err(_) => vec![WorkloadKind::Lifecycles, WorkloadKind::Creations],
            Ok(other) => bail!(
                "MERIDIAN_BENCH_WORKLOAD must be lifecycles, creations or both, not {other:?}"
            ),
        };
        Ok(Params {
            smoke,
            workloads,
            agents,
            events_per_agent: events_per_agent as u64,
            sqlite,
            phase_limit: Duration::from_secs(limit),
        })
    }

    fn total_events(&self) -> u64 {
        self.agents as u64 * self.events_per_agent
    }
}

async fn run() -> Result<()> {
    let params = Params::from_env()?;
    println!(
        "Meridian central ingest benchmark{}",
        if params.smoke { " (smoke mode)" } else { "" }
    );
    println!("machine: {}", machine_info());
    println!(
        "parameters: {} agents x {} events = {} events; batches of {BATCH_EVENTS}, up to \
         {BATCHES_IN_FLIGHT} batches in flight per agent; controller, simulated agents and \
         PostgreSQL share this machine",
        params.agents,
        params.events_per_agent,
        params.total_events(),
    );
    for kind in &params.workloads {
        let workload = Workload::new(*kind)?;
        println!();
        println!("workload: {}", workload.describe(params.events_per_agent));
        run_workload(&params, &workload).await?;
    }
    Ok(())
}

/// The session run on PostgreSQL, its COPY baseline and the ratio, then optionally SQLite.
async fn run_workload(params: &Params, workload: &Workload) -> Result<()> {
    let pg_url = testing::fresh_postgres_url().await;
    let db_name = pg_url.rsplit('/').next().unwrap_or_default().to_owned();
    let mut pg = sqlx::PgConnection::connect(&pg_url)
        .await
        .with_context(|| format!("cannot connect to the benchmark database {db_name}"))?;
    println!("postgresql: {}", postgres_info(&mut pg).await?);

    let sessions = ingest_over_sessions(&pg_url, params, workload, Some(&db_name)).await?;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&mut pg)
        .await
        .context("counting the events table")?;
    ensure!(
        stored as u64 == params.total_events(),
        "the events table holds {stored} rows, expected exactly {}",
        params.total_events()
    );
    sessions.print("PostgreSQL, sessions", "events");
    println!(
        "  verified: events table holds exactly {stored} rows; every agent acknowledged up to \
         its last event; one visit fact per created visit, nothing quarantined"
    );

    let copy = copy_baseline(&mut pg, &sessions.agents, params, workload, &db_name).await?;
    copy.print("PostgreSQL, COPY baseline", "rows");
    let ratio = sessions.rate() / copy.rate();
    println!(
        "ratio sessions incl. fact maintenance/COPY ({}): {ratio:.2} (goal >= 0.40: {})",
        workload.kind.name(),
        match (params.smoke, workload.kind, ratio >= 0.4) {
            (true, _, _) => "not judged in smoke mode",
            (false, WorkloadKind::Creations, _) => "worst case, for information",
            (false, WorkloadKind::Lifecycles, true) => "met",
            (false, WorkloadKind::Lifecycles, false) => "NOT met",
        }
    );

    if params.sqlite {
        let sqlite_url = testing::fresh_sqlite_url();
        let sessions = ingest_over_sessions(&sqlite_url, params, workload, None).await?;
        let mut conn = sqlx::SqliteConnection::connect(&sqlite_url)
            .await
            .context("cannot open the controller's SQLite database")?;
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&mut conn)
            .await
            .context("counting the SQLite events table")?;
        ensure!(
            stored as u64 == params.total_events(),
            "the SQLite events table holds {stored} rows, expected exactly {}",
            params.total_events()
        );
        sessions.print("SQLite (for information), sessions", "events");
        println!("  verified: events table holds exactly {stored} rows");
        conn.close().await.context("closing the SQLite database")?;
        remove_sqlite_dir(&sqlite_url)?;
    }
    pg.close().await.context("closing the benchmark database")?;
    drop_database(&db_name).await
}

/// Removes the temporary directory of a `testing::fresh_sqlite_url()` database.
fn remove_sqlite_dir(url: &str) -> Result<()> {
    let file = std::path::Path::new(url.trim_start_matches("sqlite://"));
    let dir = file.parent().context("the SQLite URL names no directory")?;
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

// ---------- the session run ----------

/// A finished, timed phase.
struct Measured {
    rows: u64,
    elapsed: Duration,
    cpu: Cpu,
    threads: ThreadCpu,
    /// PostgreSQL figures (CPU of its processes, WAL) apply.
    on_postgres: bool,
    wal_bytes: Option<u64>,
    setup: String,
    /// When the individual agents finished, for the session runs.
    spread: Option<String>,
    /// The enrolled agents (agent id, site), for the baseline's rows.
    agents: Vec<(String, String)>,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64()
    }

    fn print(&self, title: &str, unit: &str) {
        println!(
            "{title}: {} {unit} in {:.3} s = {:.0} {unit}/s",
            self.rows,
            self.elapsed.as_secs_f64(),
            self.rate()
        );
        if !self.setup.is_empty() {
            println!("  setup: {}", self.setup);
        }
        if let Some(spread) = &self.spread {
            println!("  {spread}");
        }
        let per_row = |s: f64| s * 1e6 / self.rows as f64;
        println!(
            "  CPU while timed, this process: {:.2} s ({:.1} us/row); by thread: {}",
            self.cpu.process,
            per_row(self.cpu.process),
            describe_threads(&self.threads),
        );
        if self.on_postgres {
            println!(
                "  CPU while timed, PostgreSQL: backends of this database {:.2} s ({:.1} us/row), \
                 background processes {:.2} s, other databases' backends {:.2} s",
                self.cpu.pg_ours,
                per_row(self.cpu.pg_ours),
                self.cpu.pg_background,
                self.cpu.pg_other,
            );
        }
        if let Some(wal) = self.wal_bytes {
            println!(
                "  WAL written (whole cluster): {:.1} MiB = {:.0} bytes/row",
                wal as f64 / (1024.0 * 1024.0),
                wal as f64 / self.rows as f64
            );
        }
    }
}

/// Runs the controller on `db_url`, enrolls `params.agents` simulated agents and times their
/// sessions streaming every event; verifies every agent's acknowledgement.
async fn ingest_over_sessions(
    db_url: &str,
    params: &Params,
    workload: &Workload,
    pg_db: Option<&str>,
) -> Result<Measured> {
    let setup_started = Instant::now();
    let deadline = setup_started + params.phase_limit;
    let controller = Controller::start(db_url).await?;
    let sites: Vec<String> = (1..=params.agents).map(|i| format!("S{i:03}")).collect();
    create_sites(controller.store.as_ref(), &sites).await?;
    let config_done = setup_started.elapsed();

    let mut agents = Vec::with_capacity(sites.len());
    for (index, site) in sites.iter().enumerate() {
        let token = enrollment_token(controller.store.as_ref(), site).await?;
        let agent = timeout_at(deadline, enroll(&controller.gateway_url, index, &token))
            .await
            .map_err(|_| anyhow!("timed out enrolling agent {index}"))??;
        ensure!(&agent.site == site, "agent {index} enrolled for {} instead of {site}", agent.site);
        agents.push(agent);
    }
    let enroll_done = setup_started.elapsed();

    let (ready_tx, mut ready_rx) = mpsc::channel::<usize>(agents.len());
    let (go_tx, go_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let identities: Vec<(String, String)> =
        agents.iter().map(|a| (a.agent_id.clone(), a.site.clone())).collect();
    for agent in agents {
        let batches = workload.batches(agent.index, params.events_per_agent);
        let run = simulated_agent(
            agent,
            batches,
            params.events_per_agent,
            ready_tx.clone(),
            go_rx.clone(),
            deadline,
        );
        tasks.spawn(run);
    }
    drop(ready_tx);
    let mut ready = 0;
    while ready < identities.len() {
        tokio::select! {
            r = ready_rx.recv() => match r {
                Some(_) => ready += 1,
                None => bail!("the simulated agents stopped before all sessions were ready"),
            },
            Some(done) = tasks.join_next() => {
                tasks.abort_all();
                done.context("a simulated agent panicked")??;
                bail!("a simulated agent finished before the start signal");
            }
            _ = tokio::time::sleep_until(deadline) => {
                bail!("timed out: {ready} of {} sessions ready", identities.len());
            }
        }
    }
    let sessions_done = setup_started.elapsed();

    let lsn_before = match pg_db {
        Some(_) => Some(checkpoint_and_wal_lsn(db_url).await?),
        None => None,
    };
    let cpu_before = Cpu::sample(pg_db);
    let threads_before = ThreadCpu::sample();
    let start = Instant::now();
    go_tx.send_replace(true);
    let mut finished = Vec::with_capacity(identities.len());
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(at)) => finished.push(at - start),
            Ok(Err(e)) => {
                tasks.abort_all();
                return Err(e);
            }
            Err(e) => {
                tasks.abort_all();
                bail!("a simulated agent panicked: {e}");
            }
        }
    }
    finished.sort_unstable();
    let last_ack = finished.last().copied().unwrap_or_default();
    // Ingest counts as done when statistics are current too: every event folded into facts and
    // every touched site-day's rollups recomputed (the controller's projector works during the
    // run; this finishes whatever is left).
    let shutdown = tokio_util::sync::CancellationToken::new();
    loop {
        meridian_controller::stats::catch_up(controller.store.as_ref(), &shutdown)
            .await
            .context("projecting facts")?;
        let lag = controller.store.projection_lag().await.context("projection lag")?;
        let pending = controller.store.pending_rollups().await.context("pending rollups")?;
        if lag == 0 && pending == 0 {
            break;
        }
        ensure!(start.elapsed() < params.phase_limit, "statistics did not catch up in time");
    }
    let elapsed = start.elapsed();
    let cpu = Cpu::sample(pg_db) - cpu_before;
    let threads = ThreadCpu::sample().since(&threads_before);
    let facts = controller
        .store
        .visit_facts(&Default::default())
        .await
        .context("reading visit facts")?
        .len() as u64;
    let created = workload.created_visits(params.agents, params.events_per_agent);
    ensure!(facts == created, "{facts} visit facts for {created} VISIT_CREATED events");
    let quarantined = controller.store.quarantined(10).await.context("reading quarantine")?;
    ensure!(quarantined.is_empty(), "events were quarantined: {quarantined:?}");
    let spread = format!(
        "agents acknowledged after: first {:.3} s, median {:.3} s, last {:.3} s; statistics \
         current (facts folded, rollups recomputed) after {:.3} s",
        finished.first().copied().unwrap_or_default().as_secs_f64(),
        finished.get(finished.len() / 2).copied().unwrap_or_default().as_secs_f64(),
        last_ack.as_secs_f64(),
        elapsed.as_secs_f64(),
    );
    let wal_bytes = match lsn_before {
        Some(before) => Some(wal_since(db_url, &before).await?),
        None => None,
    };

    let enrolled = controller.store.list_agents().await.context("listing agents")?;
    ensure!(
        enrolled.len() == identities.len(),
        "the controller lists {} agents, {} were enrolled",
        enrolled.len(),
        identities.len()
    );
    for agent in enrolled {
        ensure!(
            agent.acked_seq == params.events_per_agent,
            "agent {} of {} is acknowledged up to {}, expected {}",
            agent.id,
            agent.site,
            agent.acked_seq,
            params.events_per_agent
        );
    }
    controller.stop().await?;
    Ok(Measured {
        rows: params.total_events(),
        elapsed,
        cpu,
        threads,
        on_postgres: pg_db.is_some(),
        wal_bytes,
        spread: Some(spread),
        setup: format!(
            "{} sites configured in {:.2} s, agents enrolled in {:.2} s, sessions opened and \
             configured in {:.2} s",
            identities.len(),
            config_done.as_secs_f64(),
            (enroll_done - config_done).as_secs_f64(),
            (sessions_done - enroll_done).as_secs_f64(),
        ),
        agents: identities,
    })
}

/// One site per agent, each with a queue and a service, in one configuration change.
async fn create_sites(store: &dyn Store, sites: &[String]) -> Result<()> {
    let mut inputs = Vec::with_capacity(sites.len() * 3);
    for site in sites {
        for json in [
            serde_json::json!({"kind": "site", "code": site, "name": format!("Branch {site}"), "time_zone": "America/Los_Angeles"}),
            serde_json::json!({"kind": "queue", "site": site, "code": "A", "name": "General", "letter": "A"}),
            serde_json::json!({"kind": "service", "site": site, "code": "GEN", "name": "General", "queue": "A"}),
        ] {
            inputs.push(serde_json::from_value::<ResourceInput>(json).context("resource JSON")?);
        }
    }
    config_admin::change(store, "bench", inputs, vec![], ChangeMode::Upsert)
        .await
        .context("creating the sites")?;
    Ok(())
}

fn frame(body: agent_frame::Body) -> AgentFrame {
    AgentFrame { body: Some(body) }
}

/// One simulated agent: opens a session, acknowledges its configuration command, reports
/// ready, waits for `go`, streams `batches` with a bounded window and returns when everything
/// up to `last_seq` is acknowledged.
async fn simulated_agent(
    agent: EnrolledAgent,
    batches: Vec<EventBatch>,
    last_seq: u64,
    ready: mpsc::Sender<usize>,
    mut go: watch::Receiver<bool>,
    deadline: Instant,
) -> Result<Instant> {
    let index = agent.index;
    let mut client = AgentGatewayClient::new(agent.channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (out, mut out_rx) = mpsc::channel::<AgentFrame>(64);
    out.send(frame(agent_frame::Body::Hello(meridian_proto::Hello {
        agent_id: agent.agent_id.clone(),
        site_code: agent.site.clone(),
        version: meridian_shared::VERSION.to_owned(),
        config_revision: 0,
        last_applied_command_seq: 0,
        outbox_high_water: last_seq,
        agent_time_ms: Utc::now().timestamp_millis(),
        ..Default::default()
    })))
    .await
    .map_err(|_| anyhow!("agent {index}: outbound stream closed"))?;
    let mut request = tonic::Request::new(futures::stream::poll_fn(move |cx| out_rx.poll_recv(cx)));
    let bearer = format!("Bearer {}", agent.credential)
        .parse()
        .map_err(|_| anyhow!("agent {index}: the credential is not a valid header value"))?;
    request.metadata_mut().insert("authorization", bearer);
    let mut inbound = timeout_at(deadline, client.session(request))
        .await
        .map_err(|_| anyhow!("agent {index}: timed out opening the session"))?
        .with_context(|| format!("agent {index}: session refused"))?
        .into_inner();
    let welcome = timeout_at(deadline, inbound.message())
        .await
        .map_err(|_| anyhow!("agent {index}: timed out waiting for Welcome"))?
        .with_context(|| format!("agent {index}: session failed before Welcome"))?;
    match welcome {
        Some(ControllerFrame { body: Some(controller_frame::Body::Welcome(w)) }) => {
            ensure!(
                w.acked_event_seq == 0,
                "agent {index}: fresh agent welcomed with ack {}",
                w.acked_event_seq
            );
        }
        other => bail!("agent {index}: expected Welcome, got {other:?}"),
    }

    let (acked_tx, mut acked) = watch::channel(0u64);
    let (command_tx, mut commands) = watch::channel(0u64);
    let reader = tokio::spawn(read_frames(inbound, out.clone(), acked_tx, command_tx));
    timeout_at(deadline, commands.wait_for(|seq| *seq >= 1))
        .await
        .map_err(|_| anyhow!("agent {index}: timed out waiting for its configuration command"))?
        .map_err(|_| anyhow!("agent {index}: session ended before its configuration command"))?;
    ready.send(index).await.map_err(|_| anyhow!("agent {index}: the benchmark stopped"))?;
    timeout_at(deadline, go.wait_for(|go| *go))
        .await
        .map_err(|_| anyhow!("agent {index}: timed out waiting for the start"))?
        .map_err(|_| anyhow!("agent {index}: the benchmark stopped"))?;

    let window = BATCHES_IN_FLIGHT * BATCH_EVENTS;
    let mut batches = batches.into_iter();
    let mut sent_up_to = 0u64;
    loop {
        let acked_up_to = *acked.borrow_and_update();
        if acked_up_to >= last_seq {
            break;
        }
        while sent_up_to < acked_up_to + window {
            let Some(batch) = batches.next() else { break };
            sent_up_to = batch.events.last().map_or(sent_up_to, |e| e.seq);
            out.send(frame(agent_frame::Body::Events(batch)))
                .await
                .map_err(|_| anyhow!("agent {index}: outbound stream closed"))?;
        }
        match timeout_at(deadline, acked.changed()).await {
            Err(_) => bail!(
                "agent {index}: timed out with {acked_up_to} of {last_seq} events acknowledged"
            ),
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                let ended =
                    reader.await.with_context(|| format!("agent {index}: reader panicked"))?;
                ended.with_context(|| format!("agent {index}: session failed"))?;
                bail!("agent {index}: the controller closed the session at ack {acked_up_to}");
            }
        }
    }
    let finished = Instant::now();
    reader.abort();
    Ok(finished)
}

/// Reads controller frames: publishes event acks and applied commands, answers commands and
/// pings. Ends when the controller closes the stream.
async fn read_frames(
    mut inbound: Streaming<ControllerFrame>,
    out: mpsc::Sender<AgentFrame>,
    acked: watch::Sender<u64>,
    commands: watch::Sender<u64>,
) -> Result<()> {
    use controller_frame::Body;
    while let Some(f) = inbound.message().await.context("session stream failed")? {
        let reply = match f.body {
            Some(Body::EventAck(ack)) => {
                acked.send_replace(ack.up_to_seq);
                None
            }
            Some(Body::Command(cmd)) => {
                commands.send_replace(cmd.seq);
                Some(agent_frame::Body::CommandAck(meridian_proto::CommandAck {
                    up_to_seq: cmd.seq,
                    error: String::new(),
                }))
            }
            Some(Body::Ping(p)) => Some(agent_frame::Body::Pong(meridian_proto::Pong {
                nonce: p.nonce,
                sent_at_ms: p.sent_at_ms,
            })),
            Some(Body::Pong(_)) => None,
            Some(Body::Error(e)) => bail!("controller protocol error {}: {}", e.code, e.message),
            Some(Body::Welcome(_)) | None => bail!("unexpected frame from the controller"),
        };
        if let Some(body) = reply
            && out.send(frame(body)).await.is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}

// ---------- events ----------

/// What the simulated agents stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WorkloadKind {
    /// Whole visits as a branch's agent reports them, overlapping in time: created, called,
    /// serving, ended (85 %), or created, called, no-show (15 %). A visit's events often span
    /// two batches, so the projector also looks up and updates stored facts.
    Lifecycles,
    /// Only creations: every event makes a new visit fact and a new transaction fact, the worst
    /// case for fact maintenance per event.
    Creations,
}

impl WorkloadKind {
    fn name(self) -> &'static str {
        match self {
            WorkloadKind::Lifecycles => "visit lifecycles",
            WorkloadKind::Creations => "creations only",
        }
    }
}

/// One generated event of an agent's stream.
struct GenEvent {
    seq: u64,
    kind: &'static str,
    at: DateTime<Utc>,
    payload: Vec<u8>,
}

/// Deterministic event streams; the baseline loads the same rows.
struct Workload {
    kind: WorkloadKind,
    service: Code,
    queue: Code,
    counter: Code,
    staff: Code,
    base: DateTime<Utc>,
}

impl Workload {
    fn new(kind: WorkloadKind) -> Result<Self> {
        Ok(Workload {
            kind,
            service: Code::parse("GEN")?,
            queue: Code::parse("A")?,
            counter: Code::parse("C1")?,
            staff: Code::parse("alice")?,
            base: Utc::now(),
        })
    }

    fn describe(&self, events_per_agent: u64) -> String {
        let sample = self.events(0, events_per_agent);
        let bytes: usize = sample.iter().map(|e| e.payload.len()).sum();
        let created = sample.iter().filter(|e| e.kind == "VISIT_CREATED").count().max(1);
        format!(
            "{} ({:.1} events per visit, payloads {} bytes on average)",
            self.kind.name(),
            sample.len() as f64 / created as f64,
            bytes / sample.len().max(1),
        )
    }

    /// The first `n` events of agent `agent`'s stream, numbered 1..=n.
    fn events(&self, agent: usize, n: u64) -> Vec<GenEvent> {
        let mut timed: Vec<(DateTime<Utc>, AgentEvent)> = Vec::with_capacity(n as usize + 8);
        let mut visit = 0u64;
        // Visits arrive every 30 s and last at most ~26 min, so once a visit's creation is past
        // the n-th event in time, no later visit can add an earlier one.
        let mut horizon = None;
        while horizon.is_none_or(|h| self.created_at(visit) <= h) {
            timed.extend(self.visit(agent, visit));
            visit += 1;
            if horizon.is_none() && timed.len() as u64 >= n + 64 {
                timed.sort_by_key(|(at, _)| *at);
                horizon = timed.get(n as usize - 1).map(|(at, _)| *at);
            }
        }
        timed.sort_by_key(|(at, _)| *at);
        timed
            .into_iter()
            .take(n as usize)
            .enumerate()
            .map(|(i, (at, event))| GenEvent {
                seq: i as u64 + 1,
                kind: event.kind(),
                at,
                payload: event.payload(),
            })
            .collect()
    }

    fn created_at(&self, visit: u64) -> DateTime<Utc> {
        self.base + chrono::Duration::seconds(visit as i64 * 30)
    }

    /// Visit `visit` of agent `agent`: its events with their times.
    fn visit(&self, agent: usize, visit: u64) -> Vec<(DateTime<Utc>, AgentEvent)> {
        let id = VisitId(uuid::Uuid::from_u128(((agent as u128) << 64) | u128::from(visit)));
        let ticket = format_ticket("A", (visit % 999) as u32 + 1);
        let created = self.created_at(visit);
        let business_day = created.date_naive();
        let created_event = AgentEvent::VisitCreated(VisitCreated {
            visit_id: id,
            ticket: ticket.clone(),
            service: self.service.clone(),
            queue: self.queue.clone(),
            business_day,
            created_at: created,
            customer: None,
        });
        if self.kind == WorkloadKind::Creations {
            return vec![(created, created_event)];
        }
        // A cheap deterministic spread per visit.
        let h = (visit.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ agent as u64).rotate_left(17);
        let wait_ms = (h % 900) as i64 * 1_000;
        let no_show = h % 100 < 15;
        let called = created + chrono::Duration::milliseconds(wait_ms);
        let changed =
            |at: DateTime<Utc>, outcome: Option<Outcome>, waiting, service| VisitChanged {
                visit_id: id,
                ticket: ticket.clone(),
                service: self.service.clone(),
                queue: self.queue.clone(),
                business_day,
                counter: Some(self.counter.clone()),
                staff: Some(self.staff.clone()),
                to: None,
                outcome,
                at,
                waiting_ms: waiting,
                service_ms: service,
                recalls: 0,
                marks: vec![],
            };
        let mut out = vec![
            (created, created_event),
            (
                called,
                AgentEvent::Visit(
                    VisitEventKind::Called,
                    changed(called, None, Some(wait_ms), None),
                ),
            ),
        ];
        if no_show {
            let at = called + chrono::Duration::seconds(60);
            out.push((
                at,
                AgentEvent::Visit(
                    VisitEventKind::NoShow,
                    changed(at, Some(Outcome::NoShow), None, None),
                ),
            ));
        } else {
            let serving = called + chrono::Duration::seconds(20);
            let service_ms = (120 + (h >> 20) % 600) as i64 * 1_000;
            let ended = serving + chrono::Duration::milliseconds(service_ms);
            out.push((
                serving,
                AgentEvent::Visit(VisitEventKind::Serving, changed(serving, None, None, None)),
            ));
            out.push((
                ended,
                AgentEvent::Visit(
                    VisitEventKind::Ended,
                    changed(ended, Some(Outcome::Served), None, Some(service_ms)),
                ),
            ));
        }
        out
    }

    /// How many visits the streams of `agents` agents with `n` events each create.
    fn created_visits(&self, agents: usize, n: u64) -> u64 {
        (0..agents)
            .map(|a| self.events(a, n).iter().filter(|e| e.kind == "VISIT_CREATED").count() as u64)
            .sum()
    }

    fn batches(&self, agent: usize, n: u64) -> Vec<EventBatch> {
        let events = self.events(agent, n);
        events
            .chunks(BATCH_EVENTS as usize)
            .map(|chunk| EventBatch {
                events: chunk
                    .iter()
                    .map(|e| Event {
                        seq: e.seq,
                        kind: e.kind.to_owned(),
                        occurred_at_ms: e.at.timestamp_millis(),
                        payload: e.payload.clone(),
                    })
                    .collect(),
            })
            .collect()
    }
}

// ---------- the COPY baseline ----------

/// Loads the same rows into `events_copy` (a fresh copy of `events`) with one
/// `COPY … FROM STDIN` in text format, timed from the first byte to the committed end.
async fn copy_baseline(
    pg: &mut sqlx::PgConnection,
    agents: &[(String, String)],
    params: &Params,
    workload: &Workload,
    db_name: &str,
) -> Result<Measured> {
    sqlx::query("CREATE TABLE events_copy (LIKE events INCLUDING ALL)")
        .execute(&mut *pg)
        .await
        .context("creating events_copy")?;
    let received_at = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
    let mut text = String::with_capacity(params.total_events() as usize * 300);
    for (index, (agent_id, site)) in agents.iter().enumerate() {
        for event in workload.events(index, params.events_per_agent) {
            let payload = std::str::from_utf8(&event.payload).context("payload is not UTF-8")?;
            let at = event.at.to_rfc3339_opts(SecondsFormat::Millis, true);
            for (i, field) in [
                agent_id.as_str(),
                &event.seq.to_string(),
                site,
                event.kind,
                &at,
                &received_at,
                payload,
            ]
            .into_iter()
            .enumerate()
            {
                if i > 0 {
                    text.push('\t');
                }
                push_copy_text(&mut text, field);
            }
            text.push('\n');
        }
    }
    sqlx::query("CHECKPOINT").execute(&mut *pg).await.context("CHECKPOINT")?;

    let cpu_before = Cpu::sample(Some(db_name));
    let threads_before = ThreadCpu::sample();
    let lsn_before: String =
        sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&mut *pg).await?;
    let start = Instant::now();
    let load = async {
        let mut copy = pg
            .copy_in_raw(
                "COPY events_copy (agent_id, seq, site, kind, occurred_at, received_at, payload) FROM STDIN",
            )
            .await
            .context("starting COPY")?;
        for chunk in text.as_bytes().chunks(1 << 20) {
            copy.send(chunk).await.context("sending COPY data")?;
        }
        copy.finish().await.context("finishing COPY")
    };
    let rows = tokio::time::timeout(params.phase_limit, load)
        .await
        .map_err(|_| anyhow!("COPY did not finish within {:?}", params.phase_limit))??;
    let elapsed = start.elapsed();
    let cpu = Cpu::sample(Some(db_name)) - cpu_before;
    let threads = ThreadCpu::sample().since(&threads_before);
    let wal: i64 =
        sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::bigint")
            .bind(&lsn_before)
            .fetch_one(&mut *pg)
            .await?;
    ensure!(
        rows == params.total_events(),
        "COPY loaded {rows} rows, expected {}",
        params.total_events()
    );
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events_copy").fetch_one(&mut *pg).await?;
    ensure!(stored as u64 == rows, "events_copy holds {stored} rows after COPY of {rows}");
    Ok(Measured {
        rows,
        elapsed,
        cpu,
        threads,
        on_postgres: true,
        wal_bytes: Some(wal as u64),
        spread: None,
        setup: format!(
            "one COPY stream, text format, {:.1} MiB",
            text.len() as f64 / (1024.0 * 1024.0)
        ),
        agents: Vec::new(),
    })
}

/// Appends `s` escaped for COPY's text format.
fn push_copy_text(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

async fn checkpoint_and_wal_lsn(db_url: &str) -> Result<String> {
    let mut conn = sqlx::PgConnection::connect(db_url).await?;
    sqlx::query("CHECKPOINT").execute(&mut conn).await.context("CHECKPOINT")?;
    Ok(sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&mut conn).await?)
}

async fn wal_since(db_url: &str, lsn: &str) -> Result<u64> {
    let mut conn = sqlx::PgConnection::connect(db_url).await?;
    let bytes: i64 =
        sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::bigint")
            .bind(lsn)
            .fetch_one(&mut conn)
            .await?;
    Ok(bytes as u64)
}

// ---------- where the CPU goes ----------

/// CPU seconds (user + system) consumed so far, from /proc.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    /// This process: the controller, the simulated agents (or the COPY client).
    process: f64,
    /// PostgreSQL backends connected to the benchmark database (incl. autovacuum there).
    pg_ours: f64,
    /// PostgreSQL backends of other databases (other people's tests: noise).
    pg_other: f64,
    /// PostgreSQL's own processes (WAL writer, checkpointer, …).
    pg_background: f64,
}

impl Cpu {
    fn sample(db_name: Option<&str>) -> Cpu {
        let mut cpu = Cpu { process: proc_cpu_seconds("self").unwrap_or(0.0), ..Cpu::default() };
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return cpu;
        };
        for entry in entries.flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() != "postgres" {
                continue;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            let seconds = proc_cpu_seconds(&pid).unwrap_or(0.0);
            if db_name.is_some_and(|db| cmdline.contains(db)) {
                cpu.pg_ours += seconds;
            } else if cmdline.contains("127.0.0.1(")
                || cmdline.contains("[local]")
                || cmdline.contains("::1(")
            {
                cpu.pg_other += seconds;
            } else {
                cpu.pg_background += seconds;
            }
        }
        cpu
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, before: Cpu) -> Cpu {
        Cpu {
            process: self.process - before.process,
            pg_ours: self.pg_ours - before.pg_ours,
            pg_other: (self.pg_other - before.pg_other).max(0.0),
            pg_background: self.pg_background - before.pg_background,
        }
    }
}

/// The four threads that used the most CPU, busiest first.
fn describe_threads(threads: &ThreadCpu) -> String {
    let mut threads: Vec<(&String, &f64)> = threads.0.iter().collect();
    threads.sort_by(|a, b| b.1.total_cmp(a.1));
    let parts: Vec<String> =
        threads.iter().take(4).map(|(name, s)| format!("{name} {s:.2} s")).collect();
    if parts.is_empty() { "-".into() } else { parts.join(", ") }
}

/// utime + stime of `/proc/<pid>/stat`, in seconds.
fn proc_cpu_seconds(pid: &str) -> Option<f64> {
    stat_cpu_seconds(std::path::Path::new(&format!("/proc/{pid}/stat")))
}

// ---------- environment ----------

async fn postgres_info(pg: &mut sqlx::PgConnection) -> Result<String> {
    let version: String = sqlx::query_scalar("SHOW server_version").fetch_one(&mut *pg).await?;
    let mut settings = Vec::new();
    for name in ["synchronous_commit", "fsync", "shared_buffers", "max_wal_size", "wal_compression"]
    {
        let value: String =
            sqlx::query_scalar("SELECT current_setting($1)").bind(name).fetch_one(&mut *pg).await?;
        settings.push(format!("{name}={value}"));
    }
    let data_dir: Option<String> = sqlx::query_scalar("SELECT current_setting('data_directory')")
        .fetch_one(&mut *pg)
        .await
        .ok();
    let fs = data_dir.as_deref().map(filesystem_of).unwrap_or_else(|| "unknown".into());
    Ok(format!("{version} on the same machine ({}; data directory on {fs})", settings.join(", ")))
}
