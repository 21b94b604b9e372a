//! Nightly bulk appointment sync benchmark.
//!
//! Two parts, each with a controller in-process on its own fresh PostgreSQL database (dropped
//! at the end; kept on failure), appointments seeded with one bulk `INSERT … SELECT` (status
//! `booked`, revision 1, over the site's current day and the next, as a sync with
//! `days_ahead: 1` covers them):
//!
//! 1. **One agent, many appointments** (goal < 5 s for 100,000): one site and one REAL agent
//!    in-process (enrolled over the gateway, its own temporary data directory and SQLite
//!    store), connected and configured. Timed from `request_appointment_sync(site, "manual",
//!    now)` until (a) the agent's watermark names the sync (polled every 5 ms) and (b) the
//!    central sync is `completed` (polled every 10 ms). The split comes from the records (the
//!    central `snapshot_at`) and from watching the agent's request (command received, first and
//!    last chunk staged, timed when the agent's store thread read them; the watermark when its
//!    batch committed). A real agent, so the cost of staging and applying the set in SQLite is
//!    in the figure.
//! 2. **Many sites from one controller** (goal < 60 s for 1,000 sites x 200): every site due in
//!    `appointment_sync_schedule`, then one `appointments::sync::tick` (the scheduler's path).
//!    Timed from the tick until every sync is `completed` centrally. The agents are SIMULATED
//!    (enrolled over gRPC, a real `Session`, a real `FetchAppointments` with the agent's
//!    credential, every chunk checked with `decode_chunk`, one `APPOINTMENTS_SYNCED` event):
//!    1,000 real agents with their own SQLite stores and HTTP servers on this machine would
//!    measure the agents, not the controller's side, which is what this part is about. The
//!    sync each agent is sent when it enrolls is only acknowledged (the tick supersedes it, so
//!    the timed tick also supersedes 1,000 open syncs: slightly more work than a usual night).
//!    In part 1 the appointments are seeded after the agent applied its (empty) enrollment
//!    sync, so the timed sync is the one that brings them.
//!
//! The in-process controller runs its own scheduler (every 30 s by default); if it claims the
//! due sites before the benchmark's tick does, the benchmark says so and still times from its
//! tick. Sessions are woken by PostgreSQL NOTIFY when commands are written, so no command poll
//! delay (2 s) should appear in the figures.
//!
//! `cargo bench --bench appointment_sync` runs the full benchmark; `-- --smoke` (or
//! `MERIDIAN_BENCH_SMOKE=1`) runs a small one, for CI to check that it still works.
//! Parameters: `MERIDIAN_BENCH_APPOINTMENTS` (part 1, default 100000), `MERIDIAN_BENCH_SITES`
//! (part 2, default 1000), `MERIDIAN_BENCH_PER_SITE` (part 2, default 200),
//! `MERIDIAN_BENCH_PART` (`one`, `many` or `both`, the default).

#[allow(dead_code)]
mod common;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use chrono::{DateTime, NaiveDate, Utc};
use common::{
    Controller, EnrolledAgent, ThreadCpu, describe_threads, drop_database, enroll,
    enrollment_token, env_flag, env_number, filesystem_of, init_tracing, machine_info,
    pg_backend_cpu,
};
use futures::StreamExt;
use meridian_controller::config_admin::{self, ChangeMode, ResourceInput};
use meridian_controller::store::Store;
use meridian_controller::store::appointment_sync::{SyncRecord, SyncState};
use meridian_controller::testing;
use meridian_proto::agent_gateway_client::AgentGatewayClient;
use meridian_proto::{
    AgentFrame, AppointmentSyncRequest, ControllerFrame, Event, EventBatch, agent_frame,
    controller_frame,
};
use meridian_shared::SiteCode;
use meridian_shared::appointments::decode_chunk;
use meridian_shared::clock::SystemClock;
use meridian_shared::commands::{APPOINTMENTS_SYNC, ControllerCommand, SyncRequest};
use meridian_shared::events::{AgentEvent, AppointmentsSynced};
use sqlx::Connection;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, timeout_at};
use tokio_util::sync::CancellationToken;
use tonic::Streaming;

/// The sites' time zone (the seeded days are its current day and the next).
const TIME_ZONE: &str = "Europe/Paris";
/// How often the real agent's store is polled for the watermark.
const AGENT_POLL: Duration = Duration::from_millis(5);
/// How often the central sync state is polled.
const CENTRAL_POLL: Duration = Duration::from_millis(10);
/// Enrollments in flight at once (part 2's setup).
const ENROLL_CONCURRENCY: usize = 8;
/// Largest gRPC message either side accepts (the gateway's limit).
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("appointment_sync benchmark FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Params {
    smoke: bool,
    /// Part 1: appointments synced to the one real agent.
    appointments: usize,
    /// Part 2: sites (one simulated agent each) and appointments per site.
    sites: usize,
    per_site: usize,
    one: bool,
    many: bool,
    /// Bound on each phase (setup, the timed run).
    phase_limit: Duration,
}

impl Params {
    fn from_env() -> Result<Self> {
        let smoke = std::env::args().any(|a| a == "--smoke") || env_flag("MERIDIAN_BENCH_SMOKE")?;
        let (appointments, sites, per_site, limit) =
            if smoke { (2_000, 10, 50, 60) } else { (100_000, 1_000, 200, 600) };
        let appointments = env_number("MERIDIAN_BENCH_APPOINTMENTS")?.unwrap_or(appointments);
        let sites = env_number("MERIDIAN_BENCH_SITES")?.unwrap_or(sites);
        let per_site = env_number("MERIDIAN_BENCH_PER_SITE")?.unwrap_or(per_site);
        ensure!(appointments >= 1, "MERIDIAN_BENCH_APPOINTMENTS must be at least 1");
        ensure!((1..=9_999).contains(&sites), "MERIDIAN_BENCH_SITES must be 1..=9999");
        ensure!(per_site >= 1, "MERIDIAN_BENCH_PER_SITE must be at least 1");
        let (one, many) = match std::env::var("MERIDIAN_BENCH_PART").as_deref() {
            Ok("one") => (true, false),
            Ok("many") => (false, true),
            Ok("both") | Err(_) => (true, true),
            Ok(other) => bail!("MERIDIAN_BENCH_PART must be one, many or both, not {other:?}"),
        };
        Ok(Params {
            smoke,
            appointments,
            sites,
            per_site,
            one,
            many,
            phase_limit: Duration::from_secs(limit),
        })
    }

    fn goal(&self, met: bool) -> &'static str {
        match (self.smoke, met) {
            (true, _) => "not judged in smoke mode",
            (false, true) => "met",
            (false, false) => "NOT met",
        }
    }
}

async fn run() -> Result<()> {
    let params = Params::from_env()?;
    println!(
        "Meridian nightly appointment sync benchmark{}",
        if params.smoke { " (smoke mode)" } else { "" }
    );
    println!("machine: {}", machine_info());
    println!(
        "parameters: part 1: {} appointments to one real agent; part 2: {} sites x {} \
         appointments = {} appointments to {} simulated agents; days: the site's current day and \
         the next ({TIME_ZONE}); controller, agents and PostgreSQL share this machine",
        params.appointments,
        params.sites,
        params.per_site,
        params.sites * params.per_site,
        params.sites,
    );
    if params.one {
        println!();
        with_database("part 1", |url, db| one_agent(url, db, &params)).await?;
    }
    if params.many {
        println!();
        with_database("part 2", |url, db| many_sites(url, db, &params)).await?;
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

// ---------- part 1: one real agent ----------

async fn one_agent(pg_url: String, db_name: String, params: &Params) -> Result<()> {
    println!(
        "part 1: {} appointments to one real agent (goal < 5 s for 100,000)",
        params.appointments
    );
    let setup_started = Instant::now();
    let deadline = setup_started + params.phase_limit;
    let controller = Controller::start(&pg_url).await?;
    let store = controller.store.clone();
    let site = "SYNC1".to_owned();
    create_sites(store.as_ref(), std::slice::from_ref(&site)).await?;
    let mut pg = sqlx::PgConnection::connect(&pg_url)
        .await
        .with_context(|| format!("cannot connect to the benchmark database {db_name}"))?;

    // The agent first, so the sync it gets at enrollment is of an empty set and the timed sync
    // is the first to bring it the appointments (as a new branch's first nightly sync).
    let token = enrollment_token(store.as_ref(), &site).await?;
    let data_dir =
        std::env::temp_dir().join(format!("meridian-bench-sync-{}", uuid::Uuid::new_v4().simple()));
    let agent = RealAgent::start(&controller.gateway_url, data_dir.clone(), token).await?;
    let result = async {
        let a = &agent;
        wait_until(
            deadline,
            "the agent to connect, be configured and apply its enrollment sync",
            move || async move {
                let connected = a.ctx.link.borrow().connected;
                let synced = a
                    .ctx
                    .db
                    .read(|c| meridian_agent::appointment_sync::status(c, 1))
                    .await?
                    .watermark
                    .is_some();
                Ok(connected && a.ctx.config.borrow().is_some() && synced)
            },
        )
        .await?;
        let enrolled_in = setup_started.elapsed();
        let seeded = seed_appointments(&mut pg, std::slice::from_ref(&site), params.appointments)
            .await
            .context("seeding the appointments")?;
        let setup = setup_started.elapsed();
        println!(
            "  setup: agent enrolled, connected, configured and its (empty) enrollment sync \
             applied in {:.2} s (its SQLite store on {}); {seeded} appointments seeded in {:.2} s",
            enrolled_in.as_secs_f64(),
            filesystem_of(&data_dir.to_string_lossy()),
            (setup - enrolled_in).as_secs_f64(),
        );
        let timed = time_one_sync(store.as_ref(), &agent, &site, &db_name, params).await?;
        timed.print(params);
        verify_one(store.as_ref(), &agent, &timed, params.appointments).await
    }
    .await;
    let stopped = agent.stop().await;
    let removed = std::fs::remove_dir_all(&data_dir)
        .with_context(|| format!("removing the agent's data directory {}", data_dir.display()));
    result?;
    stopped?;
    removed?;
    pg.close().await.context("closing the benchmark database")?;
    controller.stop().await
}

/// What part 1 observed, relative to the request.
struct OneSync {
    id: uuid::Uuid,
    record: SyncRecord,
    requested_at: DateTime<Utc>,
    /// The agent recorded the command.
    received: Option<Duration>,
    first_staged: Option<Duration>,
    all_staged: Option<Duration>,
    watermark: Duration,
    completed: Duration,
    cpu: ThreadCpu,
    pg_cpu: f64,
    appointments: u64,
}

impl OneSync {
    fn print(&self, params: &Params) {
        let s = |d: Duration| d.as_secs_f64();
        let obs =
            |d: Option<Duration>| d.map_or("not observed".into(), |d| format!("{:.3} s", s(d)));
        let last = self.watermark.max(self.completed);
        println!(
            "  {} appointments: agent's watermark names the sync after {:.3} s; central sync \
             completed after {:.3} s ({:.0} appointments/s; goal < 5 s: {})",
            self.appointments,
            s(self.watermark),
            s(self.completed),
            self.appointments as f64 / s(last),
            params.goal(last < Duration::from_secs(5)),
        );
        let snapshot =
            self.record.snapshot_at.map(|at| (at - self.requested_at).to_std().unwrap_or_default());
        println!(
            "  split (from the request): command recorded at the agent {}; snapshot taken (central \
             snapshot_at) {}; first chunk staged {}; all {} chunks staged {}; applied \
             (watermark) {:.3} s; completed centrally {:.3} s",
            obs(self.received),
            obs(snapshot),
            obs(self.first_staged),
            self.record.chunks.unwrap_or(0),
            obs(self.all_staged),
            s(self.watermark),
            s(self.completed),
        );
        if let (Some(snap), Some(first)) = (snapshot, self.first_staged) {
            // The last chunk's staging and the apply are consecutive store jobs: a poll only
            // sometimes falls between them.
            let rest = match self.all_staged {
                Some(all) => format!(
                    "transfer + staging of the rest {:.3} s; apply {:.3} s",
                    s(all.saturating_sub(first)),
                    s(self.watermark.saturating_sub(all)),
                ),
                None => format!(
                    "transfer + staging of the rest + apply {:.3} s (the boundary was not observed)",
                    s(self.watermark.saturating_sub(first)),
                ),
            };
            println!(
                "  phases: command delivery + fetch start {:.3} s; snapshot + first chunk {:.3} s; \
                 {rest}; report to central {:.3} s",
                s(snap),
                s(first.saturating_sub(snap)),
                s(self.completed.saturating_sub(self.watermark)),
            );
        }
        println!(
            "  CPU while timed: this process (controller + agent) by thread: {}; PostgreSQL \
             backends of this database {:.2} s",
            describe_threads(&self.cpu),
            self.pg_cpu
        );
        if let Some(snap) = snapshot
            && snap > Duration::from_millis(1_500)
        {
            println!(
                "  NOTE: the snapshot was taken {:.3} s after the request: the agent's session \
                 was not woken at once (command poll?)",
                s(snap)
            );
        }
    }
}

async fn time_one_sync(
    store: &dyn Store,
    agent: &RealAgent,
    site: &str,
    db_name: &str,
    params: &Params,
) -> Result<OneSync> {
    let site_code = SiteCode::parse(site)?;
    let threads_before = ThreadCpu::sample();
    let pg_before = pg_backend_cpu(db_name);
    let start = Instant::now();
    let deadline = start + params.phase_limit;
    let requested_at = Utc::now();
    let requested = store
        .request_appointment_sync(&site_code, "manual", requested_at)
        .await
        .context("requesting the sync")?;
    let [sync] = requested.as_slice() else {
        bail!("requesting the sync of {site} made {} syncs, expected 1", requested.len());
    };
    let id = sync.id;

    let (mut received, mut first_staged, mut all_staged) = (None, None, None);
    let (mut watermark, mut completed) = (None, None);
    let mut next_central = start;
    while watermark.is_none() || completed.is_none() {
        ensure!(
            Instant::now() < deadline,
            "timed out after {:?}: watermark {watermark:?}, completed {completed:?}",
            params.phase_limit
        );
        if watermark.is_none() {
            // The agent's store thread commits jobs in batches and answers after the commit,
            // so a staging step is timed when the read ran, the watermark when it was
            // committed (the answer).
            let (status, read_at) = agent
                .ctx
                .db
                .read(|c| {
                    let status = meridian_agent::appointment_sync::status(c, 1)?;
                    Ok((status, std::time::Instant::now()))
                })
                .await
                .context("reading the agent's sync status")?;
            let seen = Instant::from_std(read_at).saturating_duration_since(start);
            let now = start.elapsed();
            if let Some(r) = status.requests.first().filter(|r| r.sync_id == id) {
                received.get_or_insert(seen);
                ensure!(
                    r.state != "failed",
                    "the agent refused the sync: {}",
                    r.error.as_deref().unwrap_or("no error recorded")
                );
                if r.staged_chunks >= 1 {
                    first_staged.get_or_insert(seen);
                }
                if r.total_chunks.is_some_and(|t| t > 0 && r.staged_chunks == t) {
                    all_staged.get_or_insert(seen);
                }
            }
            if status.watermark.as_ref().is_some_and(|w| w.sync_id == id) {
                watermark = Some(now);
            }
        }
        if completed.is_none() && Instant::now() >= next_central {
            next_central = Instant::now() + CENTRAL_POLL;
            let record = store.appointment_sync(id).await.context("reading the sync")?;
            let state = record.map(|r| r.state);
            ensure!(
                state.is_none_or(|s| s.is_open() || s == SyncState::Completed),
                "the central sync ended {state:?}"
            );
            if state == Some(SyncState::Completed) {
                completed = Some(start.elapsed());
            }
        }
        sleep(if watermark.is_none() { AGENT_POLL } else { CENTRAL_POLL }).await;
    }
    let cpu = ThreadCpu::sample().since(&threads_before);
    let pg_cpu = pg_backend_cpu(db_name) - pg_before;
    let record = store.appointment_sync(id).await?.context("the sync disappeared")?;
    Ok(OneSync {
        id,
        appointments: record.appointments.unwrap_or(0),
        record,
        requested_at,
        received,
        first_staged,
        all_staged,
        watermark: watermark.unwrap_or_default(),
        completed: completed.unwrap_or_default(),
        cpu,
        pg_cpu,
    })
}

/// The branch holds exactly the seeded set, and central agrees.
async fn verify_one(
    store: &dyn Store,
    agent: &RealAgent,
    timed: &OneSync,
    expected: usize,
) -> Result<()> {
    let status = agent.ctx.db.read(|c| meridian_agent::appointment_sync::status(c, 1)).await?;
    let w = status.watermark.context("the agent has no watermark")?;
    ensure!(w.sync_id == timed.id, "the watermark names {}", w.sync_id);
    ensure!(w.appointments == expected as u64, "the watermark counts {}", w.appointments);
    let (from, to) = (w.from_day, w.to_day);
    let held = agent
        .ctx
        .db
        .read(move |c| {
            let mut n = 0;
            let mut day = from;
            while day <= to {
                n += meridian_agent::appointments::of_day(c, day)?.len();
                match day.succ_opt() {
                    Some(next) => day = next,
                    None => break,
                }
            }
            Ok(n)
        })
        .await?;
    ensure!(
        held == expected,
        "the agent holds {held} appointments of {from}..{to}, expected {expected}"
    );
    ensure!(
        timed.record.appointments == Some(expected as u64),
        "central records {:?} appointments",
        timed.record.appointments
    );
    let chunks = store.appointment_sync_chunks(timed.id, 0, 1).await?;
    ensure!(chunks.is_empty(), "the completed sync's snapshot was not dropped");
    println!(
        "  verified: the agent holds exactly {held} appointments of {from}..{to} and its \
         watermark names the sync; central says completed with {expected}; snapshot dropped"
    );
    Ok(())
}

/// The real agent, in-process, with its branch server on loopback, port 0.
struct RealAgent {
    ctx: Arc<meridian_agent::Context>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<meridian_agent::Result<()>>,
}

impl RealAgent {
    async fn start(
        gateway_url: &str,
        data_dir: std::path::PathBuf,
        token: String,
    ) -> Result<RealAgent> {
        let settings = meridian_agent::Settings {
            controller_url: gateway_url.to_owned(),
            data_dir,
            http_listen: "127.0.0.1:0".into(),
            enrollment_token: token,
            ..Default::default()
        };
        let ctx = meridian_agent::Context::open(&settings, Arc::new(SystemClock))
            .await
            .context("opening the agent's store")?;
        let http = TcpListener::bind("127.0.0.1:0").await.context("binding the branch server")?;
        let shutdown = CancellationToken::new();
        let task =
            tokio::spawn(meridian_agent::run_with(ctx.clone(), settings, http, shutdown.clone()));
        Ok(RealAgent { ctx, shutdown, task })
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

// ---------- part 2: many sites, simulated agents ----------

async fn many_sites(pg_url: String, db_name: String, params: &Params) -> Result<()> {
    let total = params.sites * params.per_site;
    println!(
        "part 2: {} sites x {} appointments = {total} appointments, {} simulated agents, one \
         scheduler tick (goal < 60 s for 1,000 x 200)",
        params.sites, params.per_site, params.sites
    );
    let setup_started = Instant::now();
    let deadline = setup_started + params.phase_limit;
    let controller = Controller::start(&pg_url).await?;
    let store = controller.store.clone();
    let sites: Vec<String> = (1..=params.sites).map(|i| format!("S{i:04}")).collect();
    create_sites(store.as_ref(), &sites).await?;
    let config_done = setup_started.elapsed();
    let mut pg = sqlx::PgConnection::connect(&pg_url)
        .await
        .with_context(|| format!("cannot connect to the benchmark database {db_name}"))?;
    let seeded = seed_appointments(&mut pg, &sites, params.per_site)
        .await
        .context("seeding the appointments")?;
    let seed_done = setup_started.elapsed();

    let gateway_url = controller.gateway_url.clone();
    let enrolled: Vec<Result<EnrolledAgent>> = futures::stream::iter(sites.iter().enumerate())
        .map(|(index, site)| {
            let (store, gateway_url) = (store.clone(), gateway_url.clone());
            async move {
                let token = enrollment_token(store.as_ref(), site).await?;
                let agent = timeout_at(deadline, enroll(&gateway_url, index, &token))
                    .await
                    .map_err(|_| anyhow!("timed out enrolling agent {index}"))??;
                ensure!(
                    &agent.site == site,
                    "agent {index} enrolled for {} instead of {site}",
                    agent.site
                );
                Ok(agent)
            }
        })
        .buffer_unordered(ENROLL_CONCURRENCY)
        .collect()
        .await;
    let agents = enrolled.into_iter().collect::<Result<Vec<_>>>()?;
    let enroll_done = setup_started.elapsed();

    let (ready_tx, mut ready_rx) = mpsc::channel::<usize>(agents.len());
    let (go_tx, go_rx) = watch::channel(None::<Instant>);
    let mut tasks = JoinSet::new();
    for agent in agents {
        tasks.spawn(simulated_agent(
            agent,
            params.per_site as u64,
            ready_tx.clone(),
            go_rx.clone(),
            deadline,
        ));
    }
    drop(ready_tx);
    let mut ready = 0;
    while ready < sites.len() {
        tokio::select! {
            r = ready_rx.recv() => match r {
                Some(_) => ready += 1,
                None => bail!("the simulated agents stopped before all sessions were ready"),
            },
            Some(done) = tasks.join_next() => {
                tasks.abort_all();
                done.context("a simulated agent panicked")??;
                bail!("a simulated agent finished before the syncs were requested");
            }
            _ = tokio::time::sleep_until(deadline) => bail!("timed out: {ready} of {} sessions ready", sites.len()),
        }
    }
    let sessions_done = setup_started.elapsed();
    println!(
        "  setup: {} sites configured in {:.2} s, {seeded} appointments seeded in {:.2} s, agents \
         enrolled in {:.2} s, sessions opened and configured in {:.2} s",
        sites.len(),
        config_done.as_secs_f64(),
        (seed_done - config_done).as_secs_f64(),
        (enroll_done - seed_done).as_secs_f64(),
        (sessions_done - enroll_done).as_secs_f64(),
    );

    // Every site due a minute ago; the tick below requests them all.
    let due = Utc::now() - chrono::Duration::minutes(1);
    sqlx::query(
        "INSERT INTO appointment_sync_schedule (site, next_due_at) \
         SELECT s, $2 FROM unnest($1::text[]) AS s \
         ON CONFLICT (site) DO UPDATE SET next_due_at = excluded.next_due_at",
    )
    .bind(&sites)
    .bind(due)
    .execute(&mut pg)
    .await
    .context("making every site due")?;

    let threads_before = ThreadCpu::sample();
    let pg_before = pg_backend_cpu(&db_name);
    let start = Instant::now();
    let deadline = start + params.phase_limit;
    go_tx.send_replace(Some(start));
    let requested = meridian_controller::appointments::sync::tick(store.as_ref(), Utc::now())
        .await
        .context("the scheduler tick")?;
    let tick_took = start.elapsed();
    ensure!(
        requested.iter().all(|r| r.reason == "scheduled"),
        "the tick requested a sync that is not scheduled"
    );
    let mut completed = 0i64;
    let mut finished = Vec::with_capacity(sites.len());
    while completed < sites.len() as i64 {
        tokio::select! {
            Some(done) = tasks.join_next() => match done {
                Ok(Ok(t)) => finished.push(t),
                Ok(Err(e)) => { tasks.abort_all(); return Err(e); }
                Err(e) => { tasks.abort_all(); bail!("a simulated agent panicked: {e}"); }
            },
            _ = sleep(CENTRAL_POLL) => {
                completed = sqlx::query_scalar(
                    "SELECT count(*) FROM appointment_syncs WHERE state = 'completed'",
                )
                .fetch_one(&mut pg)
                .await
                .context("counting completed syncs")?;
                if Instant::now() >= deadline {
                    tasks.abort_all();
                    bail!("timed out: {completed} of {} syncs completed", sites.len());
                }
            }
        }
    }
    let elapsed = start.elapsed();
    let cpu = ThreadCpu::sample().since(&threads_before);
    let pg_cpu = pg_backend_cpu(&db_name) - pg_before;
    while let Some(done) = timeout_at(deadline, tasks.join_next())
        .await
        .map_err(|_| anyhow!("the simulated agents did not finish after their syncs completed"))?
    {
        finished.push(done.context("a simulated agent panicked")??);
    }

    let secs = elapsed.as_secs_f64();
    println!(
        "  {} syncs of {} appointments completed centrally in {secs:.3} s = {:.0} syncs/s, \
         {:.0} appointments/s (goal < 60 s: {})",
        sites.len(),
        params.per_site,
        sites.len() as f64 / secs,
        total as f64 / secs,
        params.goal(elapsed < Duration::from_secs(60)),
    );
    let by_tick = requested.len();
    println!(
        "  the tick requested {by_tick} syncs in {:.3} s{}",
        tick_took.as_secs_f64(),
        if by_tick < sites.len() {
            format!(
                "; the controller's own scheduler requested the other {}",
                sites.len() - by_tick
            )
        } else {
            String::new()
        }
    );
    let pct = |f: fn(&Timeline) -> Duration, q: f64| {
        let mut v: Vec<Duration> = finished.iter().map(f).collect();
        v.sort_unstable();
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1)) - 1;
        v.get(i).copied().unwrap_or_default().as_secs_f64()
    };
    println!(
        "  per agent, from the tick (median / p90 / last): command received {:.3} / {:.3} / \
         {:.3} s; snapshot fetched and checked {:.3} / {:.3} / {:.3} s; report acknowledged \
         {:.3} / {:.3} / {:.3} s",
        pct(|t| t.command, 0.5),
        pct(|t| t.command, 0.9),
        pct(|t| t.command, 1.0),
        pct(|t| t.fetched, 0.5),
        pct(|t| t.fetched, 0.9),
        pct(|t| t.fetched, 1.0),
        pct(|t| t.acked, 0.5),
        pct(|t| t.acked, 0.9),
        pct(|t| t.acked, 1.0),
    );
    println!(
        "  CPU while timed: this process (controller + simulated agents) by thread: {}; \
         PostgreSQL backends of this database {pg_cpu:.2} s",
        describe_threads(&cpu)
    );

    let good: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM appointment_syncs WHERE state = 'completed' AND appointments = $1 \
         AND reason = 'scheduled'",
    )
    .bind(params.per_site as i64)
    .fetch_one(&mut pg)
    .await?;
    // Besides them only the enrollment syncs, superseded by the tick.
    let all: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM appointment_syncs WHERE NOT (reason = 'enrollment' AND state = 'superseded')",
    )
    .fetch_one(&mut pg)
    .await?;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM appointment_sync_chunks")
        .fetch_one(&mut pg)
        .await?;
    ensure!(
        good == sites.len() as i64 && all == good,
        "{good} of {all} syncs completed with {} appointments, expected {}",
        params.per_site,
        sites.len()
    );
    ensure!(left == 0, "{left} snapshot chunks left after every sync completed");
    println!(
        "  verified: exactly {good} syncs, all scheduled and completed with {} appointments; every \
         agent checked every chunk (SHA-256, decode, site) and its count; no snapshot chunk left",
        params.per_site
    );
    pg.close().await.context("closing the benchmark database")?;
    controller.stop().await
}

/// When a simulated agent got there, from the tick.
struct Timeline {
    command: Duration,
    fetched: Duration,
    acked: Duration,
}

fn frame(body: agent_frame::Body) -> AgentFrame {
    AgentFrame { body: Some(body) }
}

/// One simulated agent: opens a session, acknowledges its configuration command, reports
/// ready; then, on its `APPOINTMENTS_SYNC` command, fetches the snapshot, checks every chunk
/// and the count, reports `APPOINTMENTS_SYNCED` (outbox seq 1) and waits for its ack.
async fn simulated_agent(
    agent: EnrolledAgent,
    expected: u64,
    ready: mpsc::Sender<usize>,
    mut go: watch::Receiver<Option<Instant>>,
    deadline: Instant,
) -> Result<Timeline> {
    let index = agent.index;
    let bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
        format!("Bearer {}", agent.credential)
            .parse()
            .map_err(|_| anyhow!("agent {index}: the credential is not a valid header value"))?;
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
        outbox_high_water: 0,
        agent_time_ms: Utc::now().timestamp_millis(),
        ..Default::default()
    })))
    .await
    .map_err(|_| anyhow!("agent {index}: outbound stream closed"))?;
    let mut request = tonic::Request::new(futures::stream::poll_fn(move |cx| out_rx.poll_recv(cx)));
    request.metadata_mut().insert("authorization", bearer.clone());
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

    let (acked_tx, mut acked) = watch::channel(0u64);
    let (command_tx, mut commands) = watch::channel(0u64);
    // At most one sync is asked for; a second waits (the reader blocks) until this one is read.
    let (sync_tx, mut sync_rx) = mpsc::channel::<SyncRequest>(1);
    let reader = tokio::spawn(read_frames(inbound, out.clone(), acked_tx, command_tx, sync_tx));
    let result = async {
        timeout_at(deadline, commands.wait_for(|seq| *seq >= 1))
            .await
            .map_err(|_| anyhow!("timed out waiting for the configuration command"))?
            .map_err(|_| anyhow!("session ended before the configuration command"))?;
        ready.send(index).await.map_err(|_| anyhow!("the benchmark stopped"))?;
        let start = *timeout_at(deadline, go.wait_for(Option::is_some))
            .await
            .map_err(|_| anyhow!("timed out waiting for the start"))?
            .map_err(|_| anyhow!("the benchmark stopped"))?;
        let start = start.unwrap_or_else(Instant::now);
        let sync = timeout_at(deadline, sync_rx.recv())
            .await
            .map_err(|_| anyhow!("timed out waiting for the APPOINTMENTS_SYNC command"))?
            .ok_or_else(|| anyhow!("session ended before the APPOINTMENTS_SYNC command"))?;
        let command = start.elapsed();

        let mut fetch = tonic::Request::new(AppointmentSyncRequest {
            sync_id: sync.sync_id.to_string(),
            from_chunk: 0,
        });
        fetch.metadata_mut().insert("authorization", bearer);
        let mut chunks = timeout_at(deadline, client.fetch_appointments(fetch))
            .await
            .map_err(|_| anyhow!("timed out starting the fetch"))?
            .context("fetch refused")?
            .into_inner();
        let (mut count, mut next) = (0u64, 0u32);
        let mut manifest: Option<(u32, u64, String, String)> = None;
        while let Some(chunk) = timeout_at(deadline, chunks.message())
            .await
            .map_err(|_| anyhow!("timed out fetching chunk {next}"))?
            .with_context(|| format!("fetch failed at chunk {next}"))?
        {
            ensure!(chunk.sync_id == sync.sync_id.to_string(), "chunk of sync {}", chunk.sync_id);
            ensure!(chunk.index == next, "chunk {} arrived where {next} was due", chunk.index);
            let this = (chunk.total_chunks, chunk.total_appointments, chunk.from_day, chunk.to_day);
            ensure!(
                manifest.as_ref().is_none_or(|m| *m == this),
                "chunk {next} repeats another manifest"
            );
            let rows = decode_chunk(chunk.index, &chunk.payload, &chunk.sha256)
                .map_err(|e| anyhow!("chunk refused: {e}"))?;
            ensure!(
                rows.iter().all(|a| a.site.as_str() == agent.site),
                "chunk {next} holds another site's appointment"
            );
            count += rows.len() as u64;
            next += 1;
            manifest = Some(this);
        }
        let (total_chunks, total, from_day, to_day) =
            manifest.ok_or_else(|| anyhow!("the fetch sent no chunk"))?;
        ensure!(next == total_chunks, "{next} chunks of {total_chunks} received");
        ensure!(
            count == total && count == expected,
            "{count} appointments received, manifest says {total}, seeded {expected}"
        );
        let fetched = start.elapsed();

        let day = |d: &str| d.parse::<NaiveDate>().with_context(|| format!("bad day {d:?}"));
        let event = AgentEvent::AppointmentsSynced(AppointmentsSynced {
            sync_id: sync.sync_id,
            from_day: day(&from_day)?,
            to_day: day(&to_day)?,
            appointments: count,
            chunks: total_chunks,
            resumed: 0,
            at: Utc::now(),
        });
        let batch = EventBatch {
            events: vec![Event {
                seq: 1,
                kind: event.kind().to_owned(),
                occurred_at_ms: Utc::now().timestamp_millis(),
                payload: event.payload(),
            }],
        };
        out.send(frame(agent_frame::Body::Events(batch)))
            .await
            .map_err(|_| anyhow!("outbound stream closed"))?;
        timeout_at(deadline, acked.wait_for(|seq| *seq >= 1))
            .await
            .map_err(|_| anyhow!("timed out waiting for the report's ack"))?
            .map_err(|_| anyhow!("session ended before the report's ack"))?;
        Ok(Timeline { command, fetched, acked: start.elapsed() })
    }
    .await;
    reader.abort();
    result.with_context(|| format!("simulated agent {index} ({})", agent.site))
}

/// Reads controller frames: publishes event acks, applied commands and sync requests, answers
/// commands and pings. Ends when the controller closes the stream.
async fn read_frames(
    mut inbound: Streaming<ControllerFrame>,
    out: mpsc::Sender<AgentFrame>,
    acked: watch::Sender<u64>,
    commands: watch::Sender<u64>,
    syncs: mpsc::Sender<SyncRequest>,
) -> Result<()> {
    use controller_frame::Body;
    while let Some(f) = inbound.message().await.context("session stream failed")? {
        let reply = match f.body {
            Some(Body::EventAck(ack)) => {
                acked.send_replace(ack.up_to_seq);
                None
            }
            Some(Body::Command(cmd)) => {
                let mut error = String::new();
                if cmd.kind == APPOINTMENTS_SYNC {
                    match ControllerCommand::decode(&cmd.kind, &cmd.payload) {
                        // The sync every agent gets at enrollment is only acknowledged: the
                        // timed tick supersedes it.
                        Ok(ControllerCommand::SyncAppointments(req))
                            if req.reason == "enrollment" => {}
                        Ok(ControllerCommand::SyncAppointments(req)) => {
                            if syncs.send(req).await.is_err() {
                                return Ok(());
                            }
                        }
                        Ok(_) => error = "not a sync request".into(),
                        Err(e) => error = e.to_string(),
                    }
                }
                commands.send_replace(cmd.seq);
                Some(agent_frame::Body::CommandAck(meridian_proto::CommandAck {
                    up_to_seq: cmd.seq,
                    error,
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

// ---------- configuration and data ----------

/// One site per code, each open 08:00-20:00 every day, with a queue and a bookable service, in
/// one configuration change.
async fn create_sites(store: &dyn Store, sites: &[String]) -> Result<()> {
    let hours = serde_json::json!(["08:00-20:00"]);
    let week = serde_json::json!({"mon": hours, "tue": hours, "wed": hours, "thu": hours,
        "fri": hours, "sat": hours, "sun": hours});
    let mut inputs = Vec::with_capacity(sites.len() * 3);
    for site in sites {
        for json in [
            serde_json::json!({"kind": "site", "code": site, "name": format!("Branch {site}"),
                "time_zone": TIME_ZONE, "business_hours": week,
                "appointment_sync": {"at": "02:00", "days_ahead": 1}}),
            serde_json::json!({"kind": "queue", "site": site, "code": "A", "name": "General", "letter": "A"}),
            serde_json::json!({"kind": "service", "site": site, "code": "GEN", "name": "General",
                "queue": "A", "appointments": {"slot_minutes": 15, "capacity": 1000}}),
        ] {
            inputs.push(serde_json::from_value::<ResourceInput>(json).context("resource JSON")?);
        }
    }
    config_admin::change(store, "bench", inputs, vec![], ChangeMode::Upsert)
        .await
        .context("creating the sites")?;
    Ok(())
}

/// `per_site` booked appointments for each site in one statement, alternating between the
/// site's current day and the next, a minute apart from 08:00; returns how many the sync's
/// days hold.
async fn seed_appointments(
    pg: &mut sqlx::PgConnection,
    sites: &[String],
    per_site: usize,
) -> Result<i64> {
    sqlx::query(
        "INSERT INTO appointments (id, site, service, starts_at, local_start, local_day, \
         duration_minutes, customer_name, status, revision, created_at, updated_at) \
         SELECT gen_random_uuid()::text, s.site, 'GEN', t.local AT TIME ZONE $3, \
                to_char(t.local, 'YYYY-MM-DD\"T\"HH24:MI'), to_char(t.local, 'YYYY-MM-DD'), 15, \
                'Customer ' || g, 'booked', 1, now(), now() \
         FROM unnest($1::text[]) AS s(site), generate_series(0, $2 - 1) AS g, \
         LATERAL (SELECT (now() AT TIME ZONE $3)::date + (g % 2)::int + time '08:00' \
                  + make_interval(mins => ((g / 2) % 720)::int)) AS t(local)",
    )
    .bind(sites)
    .bind(per_site as i64)
    .bind(TIME_ZONE)
    .execute(&mut *pg)
    .await?;
    sqlx::query("ANALYZE appointments").execute(&mut *pg).await?;
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM appointments WHERE local_day IN \
         (to_char((now() AT TIME ZONE $1)::date, 'YYYY-MM-DD'), \
          to_char((now() AT TIME ZONE $1)::date + 1, 'YYYY-MM-DD'))",
    )
    .bind(TIME_ZONE)
    .fetch_one(&mut *pg)
    .await?;
    let expected = (sites.len() * per_site) as i64;
    ensure!(held == expected, "{held} appointments on the sync's days, expected {expected}");
    Ok(held)
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
