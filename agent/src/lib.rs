//! The Meridian branch agent: keeps the site's configuration and runtime data in SQLite, serves
//! the branch LAN (HTTP), and keeps a link to the controller that streams the outbox and applies
//! commands. Everything the branch does works from the local store, with or without the link.
#![forbid(unsafe_code)]

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use meridian_shared::backoff::BackoffPolicy;
use meridian_shared::clock::Clock;
use meridian_shared::config::SiteConfig;
use meridian_shared::private_files;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

pub mod appointment_sync;
pub mod appointments;
pub mod auth;
pub mod backup;
pub mod branch_api;
pub mod check_in;
pub mod clock;
pub mod closures;
pub mod distribution;
pub mod error;
pub mod link;
pub mod metrics;
pub mod openapi;
pub mod request_rules;
pub mod requests;
pub mod settings;
pub mod store;
pub mod terminals;
pub mod tls;
pub mod upgrade;
pub mod visits;
pub mod webhooks;

pub use error::{Error, Result};
pub use settings::Settings;

/// The version this agent reports (the session's Hello, enrollment, upgrade status events).
/// A build with `MERIDIAN_AGENT_VERSION` set reports that instead of the crate's version, so
/// tests can build a second agent binary that differs only in its version
/// (`make upgrade-fixture`).
pub const VERSION: &str = match option_env!("MERIDIAN_AGENT_VERSION") {
    Some(v) => v,
    None => meridian_shared::VERSION,
};

/// How long the branch server may take to close its connections at shutdown (live feeds stay
/// open otherwise) before it is dropped.
const SERVER_GRACE: Duration = Duration::from_secs(5);

/// State shared by the branch server and the link.
pub struct Context {
    pub db: store::Db,
    /// The applied configuration, swapped atomically when a new revision is applied.
    pub config: watch::Sender<Option<Arc<SiteConfig>>>,
    pub link: watch::Sender<link::LinkStatus>,
    /// Signalled after every commit that appended to the outbox.
    pub outbox_changed: Notify,
    /// Bumped after every committed change at the branch (terminals refresh on it).
    pub activity: watch::Sender<u64>,
    /// The time everything at the branch uses.
    pub clock: Arc<dyn Clock>,
    /// The guard behind `clock` when the agent runs on a guarded clock (`open_on` with
    /// `ClockSource::Guarded`, as `run` does); `None` for an injected clock.
    pub clock_guard: Option<Arc<clock::GuardedClock>>,
    /// What the end-of-day sweep has done since start.
    pub end_of_day: watch::Sender<visits::EndOfDaySweeps>,
    /// Signalled when the controller asks for a bulk appointment sync.
    pub sync_requested: Notify,
    /// The distribution rules of the applied configuration, compiled.
    pub rules: request_rules::RuleCache,
    /// Upgrades of the agent's own binary: who signs releases, where they are staged, whether
    /// this process can replace its binary at all.
    pub upgrades: upgrade::Upgrades,
    /// How long acknowledged events stay in the outbox (`Settings::local_retention_s`).
    pub local_retention: chrono::Duration,
    /// Prometheus metrics (`/metrics` on `metrics_listen`).
    pub metrics: metrics::Metrics,
    /// The branch server speaks HTTPS (`tls_cert` and `tls_key`): cookies are `Secure`.
    secure_cookies: bool,
    /// Staff password checks: bounded, queued briefly, refused beyond (`auth::gate`).
    pub logins: auth::PasswordGate,
    /// The live feeds the branch server holds open (`max_live_feeds`).
    pub live_feeds: meridian_shared::http_guard::LiveFeeds,
    /// Origins that may frame `/display` (`display_frame_ancestors`, checked).
    pub display_frame_ancestors: Vec<String>,
}

impl Context {
    /// Opens the agent's store with `clock` used as it is (unguarded: tests that move time on
    /// purpose); an agent opened this way runs inside another program and cannot replace its
    /// binary (`open_with` takes the capability).
    pub async fn open(settings: &Settings, clock: Arc<dyn Clock>) -> Result<Arc<Context>> {
        Self::open_with(settings, clock, None).await
    }

    /// Like `open`, with the capability to replace the binary (the `meridian-agent` executable
    /// passes its `Upgrader`).
    pub async fn open_with(
        settings: &Settings,
        clock: Arc<dyn Clock>,
        upgrader: Option<upgrade::Upgrader>,
    ) -> Result<Arc<Context>> {
        Self::open_on(settings, clock::ClockSource::Injected(clock), upgrader).await
    }

    /// Opens the agent's store on `source`: `ClockSource::system()` is the guarded wall clock
    /// `run` uses; a guarded clock starts from the last good wall time the store kept.
    pub async fn open_on(
        settings: &Settings,
        source: clock::ClockSource,
        upgrader: Option<upgrade::Upgrader>,
    ) -> Result<Arc<Context>> {
        let upgrades = upgrade::Upgrades::new(settings, upgrader)?;
        let display_frame_ancestors =
            settings.display_frame_ancestors().map_err(Error::Internal)?;
        // The store holds the agent's credential and customers' data: owner only (0700/0600).
        let private = |path: &std::path::Path, r: std::io::Result<()>| {
            r.map_err(|e| Error::Internal(format!("cannot create {}: {e}", path.display())))
        };
        private(&settings.data_dir, private_files::create_dir(&settings.data_dir))?;
        let db_path = settings.data_dir.join(store::DB_FILE);
        private(&db_path, private_files::sqlite_database(&db_path))?;
        let db = store::Db::open(&db_path)?;
        let config = db.read(store::queries::site_config).await?;
        let metrics = metrics::Metrics::new(settings.data_dir.clone(), db.failures().clone());
        let (clock, clock_guard): (Arc<dyn Clock>, _) = match source {
            clock::ClockSource::Injected(clock) => (clock, None),
            clock::ClockSource::Guarded { system, monotonic, boot_id } => {
                let last = db.read(store::queries::clock_last_good).await?;
                let guard = Arc::new(clock::GuardedClock::new(
                    system,
                    monotonic,
                    boot_id,
                    settings.clock_tolerance(),
                    last.as_ref(),
                ));
                (guard.clone(), Some(guard))
            }
        };
        Ok(Arc::new(Context {
            db,
            config: watch::Sender::new(config.map(Arc::new)),
            link: watch::Sender::new(link::LinkStatus::default()),
            outbox_changed: Notify::new(),
            activity: watch::Sender::new(0),
            clock,
            clock_guard,
            end_of_day: watch::Sender::new(visits::EndOfDaySweeps::default()),
            sync_requested: Notify::new(),
            rules: request_rules::RuleCache::default(),
            upgrades,
            local_retention: chrono::Duration::seconds(
                i64::try_from(settings.local_retention_s).unwrap_or(i64::MAX / 1_000),
            ),
            metrics,
            secure_cookies: settings.tls_cert.is_some() && settings.tls_key.is_some(),
            logins: auth::PasswordGate::for_machine(),
            live_feeds: meridian_shared::http_guard::LiveFeeds::new(settings.max_live_feeds),
            display_frame_ancestors,
        }))
    }
}

impl Context {
    /// The applied configuration, or `NotConfigured` before the first sync.
    pub fn site_config(&self) -> Result<Arc<SiteConfig>> {
        self.config.borrow().clone().ok_or(Error::NotConfigured)
    }

    /// Runs a state-changing store job against the current configuration, then wakes the link
    /// and the live terminals.
    pub async fn change<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&rusqlite::Connection, &SiteConfig, chrono::DateTime<chrono::Utc>) -> Result<R>
            + Send
            + 'static,
    {
        let config = self.site_config()?;
        let now = self.clock.now();
        let result = self.db.write(move |c| f(c, &config, now)).await?;
        self.changed();
        Ok(result)
    }

    /// Whether the cookies the terminals set carry `Secure` (the branch server speaks HTTPS).
    pub fn secure_cookies(&self) -> bool {
        self.secure_cookies
    }

    /// The clock's health (skew, trusted, alert) as of its last reading.
    pub fn clock_health(&self) -> clock::ClockHealth {
        match &self.clock_guard {
            Some(guard) => guard.health(),
            None => clock::ClockHealth::unguarded(),
        }
    }

    /// The system's wall clock, unguarded: what the agent reports to the controller, so that
    /// central measures the machine's real skew.
    pub fn system_time(&self) -> chrono::DateTime<chrono::Utc> {
        match &self.clock_guard {
            Some(guard) => guard.system_now(),
            None => self.clock.now(),
        }
    }

    /// The controller's time from a session's Welcome (ms since the epoch; 0 when the
    /// controller did not say): the guarded clock's reference from now on.
    pub fn controller_time(&self, ms: i64) {
        if let (Some(guard), Some(at)) =
            (&self.clock_guard, chrono::DateTime::from_timestamp_millis(ms).filter(|_| ms > 0))
        {
            guard.controller_time(at);
        }
    }

    /// Wakes the link (new outbox events) and the live terminals.
    pub fn changed(&self) {
        self.outbox_changed.notify_one();
        self.activity.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Runs the time-triggered distribution rules (schedules, close of business) when due.
async fn escalation_sweep(ctx: Arc<Context>, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(config) = ctx.site_config() else { continue };
        let rules = ctx.rules.get(&config);
        if rules.is_empty() {
            continue;
        }
        match ctx
            .change(move |c, config, now| request_rules::run_escalations(c, config, &rules, now))
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(operations = n, "time-triggered distribution rules fired"),
            Err(e) => tracing::warn!(error = %e, "distribution rule sweep failed; retrying"),
        }
    }
}

/// Ends visits left open when their business day is over (see `EndOfDay`), every `every`.
async fn end_of_day_sweep(ctx: Arc<Context>, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if ctx.site_config().is_err() {
            continue;
        }
        let swept = ctx
            .change(|c, config, now| Ok((visits::close_finished_days(c, config, now)?, now)))
            .await;
        match swept {
            Ok((ended, at)) => {
                if ended > 0 {
                    tracing::info!(
                        visits = ended,
                        "ended visits left open at the end of their business day"
                    );
                }
                ctx.end_of_day.send_modify(|s| s.record(at, ended));
            }
            Err(e) => tracing::warn!(error = %e, "end-of-day sweep failed; retrying"),
        }
    }
}

/// Runs an agent until `shutdown`: the branch server on `http`, the link in the background.
/// It runs inside the calling program, so it cannot replace its binary: an `AGENT_UPGRADE` is
/// answered with `failed` (`run_upgradable` is the executable's entry point).
pub async fn run(settings: Settings, http: TcpListener, shutdown: CancellationToken) -> Result<()> {
    let ctx = Context::open_on(&settings, clock::ClockSource::system(), None).await?;
    run_with(ctx, settings, http, shutdown).await
}

/// Like `run`, with an already opened context (tests inject a clock).
pub async fn run_with(
    ctx: Arc<Context>,
    settings: Settings,
    http: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    serve(ctx, settings, http, shutdown).await.map(|_| ())
}

/// The `meridian-agent` executable's agent: like `run`, and it may switch to a new release.
/// When it does, it stops its services, closes the store and installs the release; the caller
/// then becomes the new binary's watchdog (`upgrade::Exit`).
pub async fn run_upgradable(
    settings: Settings,
    http: TcpListener,
    shutdown: CancellationToken,
    upgrader: upgrade::Upgrader,
) -> Result<upgrade::Exit> {
    let ctx =
        Context::open_on(&settings, clock::ClockSource::system(), Some(upgrader.clone())).await?;
    let limits = ctx.upgrades.limits;
    let dir = ctx.upgrades.dir.clone();
    match serve(ctx.clone(), settings, http, shutdown).await? {
        None => Ok(upgrade::Exit::Stopped),
        Some(plan) => {
            // Everything is stopped; the database is closed before another binary opens it.
            ctx.db.close().await;
            Ok(upgrade::install(&dir, &plan, &upgrader, limits))
        }
    }
}

/// Binds the metrics listener (`metrics_listen`; empty = no metrics). It is unauthenticated:
/// an address other than loopback is served, with a warning.
async fn bind_metrics(addr: &str) -> Result<Option<TcpListener>> {
    let addr = addr.trim();
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Internal(format!("metrics_listen {addr}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::Internal(format!("metrics_listen {addr}: {e}")))?;
    if local.ip().is_loopback() {
        tracing::info!(addr = %local, "metrics listening");
    } else {
        tracing::warn!(addr = %local, "metrics listening on a non-loopback address without authentication; keep it off the branch LAN");
    }
    Ok(Some(listener))
}

/// Runs the agent's services until `shutdown`, or until the upgrader decides to switch (then
/// returns its plan with everything stopped).
async fn serve(
    ctx: Arc<Context>,
    settings: Settings,
    http: TcpListener,
    shutdown: CancellationToken,
) -> Result<Option<upgrade::SwitchPlan>> {
    // The agent's own services: stopped by `shutdown` or by a switch.
    let services = shutdown.child_token();
    let ca_cert = match &settings.ca_cert {
        Some(p) => Some(
            std::fs::read(p)
                .map_err(|e| Error::Internal(format!("ca_cert {}: {e}", p.display())))?,
        ),
        None => None,
    };
    // Before any task starts: a metrics address that cannot be bound stops the agent here.
    let metrics_listener = bind_metrics(&settings.metrics_listen).await?;
    // So does a transport the settings do not allow (plaintext off loopback, a bad
    // certificate) or a controller URL they do not allow.
    let http_addr = http.local_addr().map_err(|e| Error::Internal(format!("http_listen: {e}")))?;
    let (handshake, server_tls) = tls::prepare(&settings, http_addr)?;
    let link_settings = link::LinkSettings {
        controller_url: settings.controller_url.clone(),
        ca_cert,
        enrollment_token: settings.enrollment_token.clone(),
        heartbeat: Duration::from_millis(settings.heartbeat_ms.max(100)),
        backoff: BackoffPolicy {
            base: Duration::from_millis(settings.backoff_base_ms.max(1)),
            cap: Duration::from_millis(
                settings.backoff_cap_ms.max(settings.backoff_base_ms.max(1)),
            ),
        },
    };
    let sync_task =
        tokio::spawn(appointment_sync::run(ctx.clone(), link_settings.clone(), services.clone()));
    let upgrade_task = tokio::spawn(upgrade::run(
        ctx.clone(),
        upgrade::GatewaySource::new(ctx.clone(), link_settings.clone()),
        services.clone(),
    ));
    let link_task = tokio::spawn(link::run(ctx.clone(), link_settings, services.clone()));
    let sweep_task = tokio::spawn(end_of_day_sweep(
        ctx.clone(),
        Duration::from_millis(settings.end_of_day_sweep_ms.max(10)),
        services.clone(),
    ));
    let clock_task = tokio::spawn(clock::keep_last_good(ctx.clone(), services.clone()));
    let escalation_task = tokio::spawn(escalation_sweep(
        ctx.clone(),
        Duration::from_millis(settings.rule_sweep_ms.max(10)),
        services.clone(),
    ));
    let no_show_task = tokio::spawn(check_in::run_no_show_sweep(ctx.clone(), services.clone()));
    let webhook_settings = webhooks::WebhookSettings {
        backoff: BackoffPolicy {
            base: Duration::from_millis(settings.webhook_backoff_base_ms.max(1)),
            cap: Duration::from_millis(
                settings.webhook_backoff_cap_ms.max(settings.webhook_backoff_base_ms.max(1)),
            ),
        },
        timeout: Duration::from_secs(10),
    };
    let webhook_task = tokio::spawn(webhooks::run(ctx.clone(), webhook_settings, services.clone()));
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    let addr = http_addr.to_string();
    tracing::info!(%addr, tls = server_tls.is_some(), "branch server listening");
    let reload_task = server_tls.map(|server_tls| {
        tokio::spawn(tls::keep_reloaded(server_tls, tls::RELOAD_EVERY, services.clone()))
    });
    if let Some(file) = &settings.ready_file {
        let ready = serde_json::json!({ "http": addr, "metrics": metrics_addr });
        private_files::write(file, ready.to_string().as_bytes())
            .map_err(|e| Error::Internal(format!("{}: {e}", file.display())))?;
    }
    let metrics_task = metrics_listener.map(|listener| {
        let stop = services.clone();
        tokio::spawn(
            axum::serve(listener, metrics::router(ctx.clone()))
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .into_future(),
        )
    });
    let server_shutdown = services.clone();
    let mut server = Box::pin(meridian_shared::http_guard::serve_with(
        http,
        branch_api::router(ctx.clone()).merge(terminals::router(ctx)),
        settings.http_limits(),
        handshake,
        async move { server_shutdown.cancelled().await },
    ));
    let served = tokio::select! {
        served = &mut server => served,
        _ = async {
            services.cancelled().await;
            tokio::time::sleep(SERVER_GRACE).await;
        } => {
            // Open live feeds would hold the server forever: drop it (and the listener).
            tracing::warn!("branch connections still open after the grace period; closing the server");
            Ok(())
        }
    };
    // Closes the listener (a new binary binds the same address).
    drop(server);
    services.cancel();
    if let Some(mut task) = metrics_task {
        // A scrape in progress gets the grace period; then the listener is closed regardless.
        if tokio::time::timeout(SERVER_GRACE, &mut task).await.is_err() {
            task.abort();
            let _ = task.await;
        }
    }
    let _ = link_task.await;
    if let Some(task) = reload_task {
        let _ = task.await;
    }
    let _ = sync_task.await;
    let _ = sweep_task.await;
    let _ = clock_task.await;
    let _ = escalation_task.await;
    let _ = no_show_task.await;
    let _ = webhook_task.await;
    let plan = upgrade_task.await.ok().flatten();
    if plan.is_none() {
        shutdown.cancel();
    }
    served.map_err(|e| Error::Internal(format!("branch server: {e}")))?;
    Ok(plan)
}
