//! Upgrades of the agent itself: the controller orders one with an `AGENT_UPGRADE`
//! command; the agent answers with `AGENT_UPGRADE_STATUS` events through its outbox.
//!
//! - **In the command's transaction** (`apply_command`): the manifest is judged first — its
//!   signature against the agent's own `release_keys`, then platform, downgrade (refused unless
//!   the rollout allows it), and whether this agent can replace its binary at all (an agent run
//!   inside another program cannot) — and the upgrade is recorded in `upgrades` (pending, or
//!   failed with the reason and reported at once: nothing is downloaded). The command is
//!   acknowledged right after, so the session never waits for a transfer.
//! - **In the background** (`run`, beside the session, on its own connection): the newest open
//!   upgrade is downloaded with `FetchRelease` into `data_dir/upgrade/staged.partial`, resumed
//!   from its length after a cut, checked against the manifest's size and SHA-256 (a mismatch
//!   fails the upgrade and removes the files) and renamed to `staged`. While `now <
//!   switch_before` (the agent's clock) the agent switches (`switch`); otherwise it keeps
//!   `staged` and waits for a later `AGENT_UPGRADE` of the same release, which switches without
//!   downloading again.
//! - **After a switch** the new binary reports `healthy` once its session is established (the
//!   watchdog reads that from `state.json`); after a rollback the previous binary reports
//!   `rolled_back` with the watchdog's reason. Each phase is queued once per rollout
//!   (`upgrades.reported`).
//!
//! `AGENT_UPGRADE_CANCEL` drops an upgrade that is pending, downloading or staged (its files
//! are removed); it has no effect after the switch.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use meridian_shared::backoff::BackoffPolicy;
use meridian_shared::commands::UpgradeCommand;
use meridian_shared::events::{AgentEvent, MAX_UPGRADE_REASON, UpgradePhase, UpgradeStatus};
use meridian_shared::releases::{self, PublicKey, ReleaseManifest};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Context;
use crate::error::{Error, Result};
use crate::link::LinkSettings;
use crate::store::queries;

pub mod download;
pub mod files;
pub mod switch;

pub use download::{ChunkStream, DownloadError, Downloaded, FetchError, ReleaseSource};
pub use files::{SwitchState, UpgradeDir};
pub use switch::{
    Boot, Exit, SUPERVISED_ENV, SwitchPlan, Upgrader, Watchdog, WatchdogEnd, WatchdogLimits, boot,
    forward_signals, install,
};

/// How often the upgrader looks for work without being woken.
const IDLE_POLL: Duration = Duration::from_secs(30);

/// What the agent judges an `AGENT_UPGRADE` by: the release signers it trusts, its platform
/// and version, and whether it can replace its binary.
#[derive(Debug, Clone)]
pub struct Gate {
    keys: Vec<PublicKey>,
    platform: String,
    running: String,
    upgrader: Option<Upgrader>,
}

/// The judgement of an `AGENT_UPGRADE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Download, stage and switch.
    Proceed,
    /// This agent already runs the release's version: nothing to do, report healthy.
    AlreadyRunning,
    /// Refused with the reason (reported as `failed`); nothing is downloaded.
    Refuse(String),
}

impl Gate {
    /// The agent's gate: `release_keys` from its settings (`ed25519:<base64>`; a malformed key
    /// is a configuration error), this build's platform and version.
    pub fn new(release_keys: &[String], upgrader: Option<Upgrader>) -> Result<Gate> {
        let keys = release_keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                PublicKey::parse(k)
                    .map_err(|e| Error::Validation(format!("release_keys[{i}]: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Gate::with(keys, releases::current_platform(), crate::VERSION.to_owned(), upgrader))
    }

    /// A gate with explicit facts (tests pretend another platform or version).
    pub fn with(
        keys: Vec<PublicKey>,
        platform: String,
        running: String,
        upgrader: Option<Upgrader>,
    ) -> Gate {
        Gate { keys, platform, running, upgrader }
    }

    /// A gate that trusts no key and cannot replace anything.
    pub fn none() -> Gate {
        Gate::with(Vec::new(), releases::current_platform(), crate::VERSION.to_owned(), None)
    }

    pub fn upgrader(&self) -> Option<&Upgrader> {
        self.upgrader.as_ref()
    }

    /// The version this agent reports.
    pub fn running(&self) -> &str {
        &self.running
    }

    /// Judges `cmd`: the signature first, then the platform, the version and the capability.
    pub fn judge(&self, cmd: &UpgradeCommand) -> Verdict {
        let release = &cmd.release;
        if let Err(e) = releases::verify_manifest(release, &self.keys) {
            return Verdict::Refuse(format!("the release manifest is refused: {e}"));
        }
        if release.platform != self.platform {
            return Verdict::Refuse(format!(
                "the release is built for {}, this agent runs on {}",
                release.platform, self.platform
            ));
        }
        match releases::compare_versions(&release.version, &self.running) {
            Err(e) => return Verdict::Refuse(format!("cannot compare the versions: {e}")),
            Ok(std::cmp::Ordering::Equal) => return Verdict::AlreadyRunning,
            Ok(std::cmp::Ordering::Less) if !cmd.allow_downgrade => {
                return Verdict::Refuse(format!(
                    "downgrade from {} to {} refused: the rollout does not allow downgrades",
                    self.running, release.version
                ));
            }
            Ok(_) => {}
        }
        if self.upgrader.is_none() {
            return Verdict::Refuse(
                "this agent cannot replace its binary: it runs inside another program (tests, \
                 `meridian dev`, `meridian agent`); run the meridian-agent executable to upgrade"
                    .into(),
            );
        }
        Verdict::Proceed
    }
}

/// The agent's upgrade machinery, held by `Context`.
#[derive(Debug)]
pub struct Upgrades {
    pub gate: Gate,
    pub dir: UpgradeDir,
    /// Health timeout when the command does not name one (`upgrade_health_timeout_ms`).
    pub health_timeout: Duration,
    pub limits: WatchdogLimits,
    /// Signalled when an upgrade command was recorded (start, supersede, cancel).
    pub requested: Notify,
}

impl Upgrades {
    pub fn new(settings: &crate::Settings, upgrader: Option<Upgrader>) -> Result<Upgrades> {
        Ok(Upgrades {
            gate: Gate::new(&settings.release_keys, upgrader)?,
            dir: UpgradeDir::new(&settings.data_dir),
            health_timeout: Duration::from_millis(settings.upgrade_health_timeout_ms.max(1)),
            limits: WatchdogLimits::new(settings.upgrade_max_crashes),
            requested: Notify::new(),
        })
    }
}

// ---------- the command log ----------

/// Records an `AGENT_UPGRADE` (command `seq`) in the command's transaction, judged by `gate`;
/// a refusal (or "already running it") is reported at once. A newer command supersedes an
/// open upgrade of another rollout. Returns whether the background task has work.
pub fn apply_command(
    conn: &Connection,
    gate: &Gate,
    seq: u64,
    cmd: &UpgradeCommand,
    now: DateTime<Utc>,
) -> Result<bool> {
    let id = cmd.rollout_id;
    let verdict = gate.judge(cmd);
    let open: Vec<(String, String)> = conn
        .prepare_cached(
            "SELECT rollout_id, version FROM upgrades \
             WHERE state IN ('pending', 'downloading', 'staged') AND rollout_id <> ?1",
        )?
        .query_map([id.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (other, version) in open {
        let reason = format!("superseded by rollout {id}");
        set_state(conn, &other, "superseded", Some(&reason), now)?;
        if let Ok(other) = other.parse() {
            report(conn, other, &version, UpgradePhase::Failed, Some(&reason), now)?;
        }
    }
    let existing: Option<(String, String)> = conn
        .prepare_cached("SELECT state, sha256 FROM upgrades WHERE rollout_id = ?1")?
        .query_row([id.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let manifest =
        serde_json::to_string(&cmd.release).map_err(|e| Error::Internal(e.to_string()))?;
    let same_release_open = existing.as_ref().is_some_and(|(state, sha)| {
        matches!(state.as_str(), "pending" | "downloading" | "staged")
            && sha.eq_ignore_ascii_case(&cmd.release.sha256)
    });
    let (state, reason) = match &verdict {
        Verdict::Refuse(r) => ("failed", Some(r.clone())),
        Verdict::AlreadyRunning => {
            ("healthy", Some(format!("this agent already runs {}", cmd.release.version)))
        }
        Verdict::Proceed => ("pending", None),
    };
    if same_release_open && verdict == Verdict::Proceed {
        // The same release again (a later window): keep what was downloaded and reported.
        conn.prepare_cached(
            "UPDATE upgrades SET command_seq = ?2, manifest = ?3, allow_downgrade = ?4, \
             switch_before = ?5, health_timeout_s = ?6, received_at = ?7, updated_at = ?7 \
             WHERE rollout_id = ?1",
        )?
        .execute(params![
            id.to_string(),
            seq as i64,
            manifest,
            cmd.allow_downgrade,
            cmd.switch_before.to_rfc3339(),
            i64::from(cmd.health_timeout_s),
            now.to_rfc3339()
        ])?;
        return Ok(true);
    }
    conn.prepare_cached(
        "INSERT INTO upgrades (rollout_id, command_seq, version, platform, sha256, manifest, \
         allow_downgrade, switch_before, health_timeout_s, state, reason, reported, attempts, \
         resumed, received_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, NULL, 0, 0, ?12, ?12) \
         ON CONFLICT (rollout_id) DO UPDATE SET command_seq = excluded.command_seq, \
         version = excluded.version, platform = excluded.platform, sha256 = excluded.sha256, \
         manifest = excluded.manifest, allow_downgrade = excluded.allow_downgrade, \
         switch_before = excluded.switch_before, health_timeout_s = excluded.health_timeout_s, \
         state = excluded.state, reason = excluded.reason, reported = NULL, attempts = 0, \
         resumed = 0, received_at = excluded.received_at, updated_at = excluded.updated_at",
    )?
    .execute(params![
        id.to_string(),
        seq as i64,
        cmd.release.version,
        cmd.release.platform,
        cmd.release.sha256.to_ascii_lowercase(),
        manifest,
        cmd.allow_downgrade,
        cmd.switch_before.to_rfc3339(),
        i64::from(cmd.health_timeout_s),
        state,
        reason,
        now.to_rfc3339()
    ])?;
    match verdict {
        Verdict::Refuse(r) => {
            report(conn, id, &cmd.release.version, UpgradePhase::Failed, Some(&r), now)?;
            Ok(true)
        }
        Verdict::AlreadyRunning => {
            report(conn, id, &cmd.release.version, UpgradePhase::Healthy, reason.as_deref(), now)?;
            Ok(false)
        }
        Verdict::Proceed => Ok(true),
    }
}

/// Records an `AGENT_UPGRADE_CANCEL`: an upgrade of `rollout_id` that is pending, downloading
/// or staged is dropped (the background task removes its files). Returns whether one was.
pub fn cancel(conn: &Connection, rollout_id: Uuid, now: DateTime<Utc>) -> Result<bool> {
    let n = conn
        .prepare_cached(
            "UPDATE upgrades SET state = 'cancelled', reason = 'cancelled by the controller', \
             updated_at = ?2 WHERE rollout_id = ?1 AND state IN ('pending', 'downloading', 'staged')",
        )?
        .execute(params![rollout_id.to_string(), now.to_rfc3339()])?;
    Ok(n > 0)
}

fn set_state(
    conn: &Connection,
    rollout_id: &str,
    state: &str,
    reason: Option<&str>,
    now: DateTime<Utc>,
) -> Result<()> {
    conn.prepare_cached(
        "UPDATE upgrades SET state = ?2, reason = ?3, updated_at = ?4 WHERE rollout_id = ?1",
    )?
    .execute(params![rollout_id, state, reason, now.to_rfc3339()])?;
    Ok(())
}

/// Queues `AGENT_UPGRADE_STATUS` for `phase` unless it was queued for this rollout already.
fn report(
    conn: &Connection,
    rollout_id: Uuid,
    version: &str,
    phase: UpgradePhase,
    reason: Option<&str>,
    now: DateTime<Utc>,
) -> Result<()> {
    let reported: Option<Option<String>> = conn
        .prepare_cached("SELECT reported FROM upgrades WHERE rollout_id = ?1")?
        .query_row([rollout_id.to_string()], |r| r.get(0))
        .optional()?;
    if reported.flatten().as_deref() == Some(phase.as_str()) {
        return Ok(());
    }
    let status = UpgradeStatus {
        rollout_id,
        version: cut(version, meridian_shared::events::MAX_VERSION_TEXT),
        running_version: crate::VERSION.to_owned(),
        phase,
        reason: reason.map(|r| cut(r, MAX_UPGRADE_REASON)),
        at: now,
    };
    queries::append_event(conn, &AgentEvent::UpgradeStatus(status), now)?;
    conn.prepare_cached("UPDATE upgrades SET reported = ?2 WHERE rollout_id = ?1")?
        .execute(params![rollout_id.to_string(), phase.as_str()])?;
    Ok(())
}

fn cut(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Moves an upgrade to `state` and reports `phase` (with `reason`) in one transaction.
fn transition(
    conn: &Connection,
    rollout_id: Uuid,
    version: &str,
    state: &str,
    phase: UpgradePhase,
    reason: Option<&str>,
    now: DateTime<Utc>,
) -> Result<()> {
    set_state(conn, &rollout_id.to_string(), state, reason, now)?;
    report(conn, rollout_id, version, phase, reason, now)
}

// ---------- state, as the branch and the tests see it ----------

/// One upgrade as recorded at the agent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UpgradeRecord {
    pub rollout_id: Uuid,
    pub version: String,
    pub platform: String,
    pub state: String,
    pub reason: Option<String>,
    pub reported: Option<String>,
    pub switch_before: DateTime<Utc>,
    pub attempts: u32,
    pub resumed: u32,
    #[serde(skip)]
    pub release: ReleaseManifest,
    #[serde(skip)]
    pub health_timeout_s: u32,
}

fn corrupt(what: &str) -> Error {
    Error::Internal(format!("corrupt value in upgrades.{what}"))
}

type Row =
    (String, String, String, String, Option<String>, Option<String>, String, i64, i64, String, i64);

fn record_of(r: Row) -> Result<UpgradeRecord> {
    Ok(UpgradeRecord {
        rollout_id: r.0.parse().map_err(|_| corrupt("rollout_id"))?,
        version: r.1,
        platform: r.2,
        state: r.3,
        reason: r.4,
        reported: r.5,
        switch_before: DateTime::parse_from_rfc3339(&r.6)
            .map_err(|_| corrupt("switch_before"))?
            .with_timezone(&Utc),
        attempts: r.7.max(0) as u32,
        resumed: r.8.max(0) as u32,
        release: serde_json::from_str(&r.9).map_err(|_| corrupt("manifest"))?,
        health_timeout_s: u32::try_from(r.10.max(0)).unwrap_or(u32::MAX),
    })
}

const COLUMNS: &str = "rollout_id, version, platform, state, reason, reported, switch_before, \
                       attempts, resumed, manifest, health_timeout_s";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
    ))
}

/// The upgrades recorded here, newest first.
pub fn list(conn: &Connection, limit: u32) -> Result<Vec<UpgradeRecord>> {
    let rows = conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM upgrades ORDER BY received_at DESC, rollout_id DESC LIMIT ?1"
        ))?
        .query_map([i64::from(limit)], row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(record_of).collect()
}

/// The upgrade to work on: the newest that is pending, downloading or staged.
pub fn open_upgrade(conn: &Connection) -> Result<Option<UpgradeRecord>> {
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM upgrades WHERE state IN ('pending', 'downloading', 'staged') \
         ORDER BY received_at DESC, rollout_id DESC LIMIT 1"
    ))?
    .query_row([], row)
    .optional()?
    .map(record_of)
    .transpose()
}

// ---------- the background task ----------

/// The controller's `FetchRelease`, on a connection of its own beside the session.
pub struct GatewaySource {
    ctx: Arc<Context>,
    settings: LinkSettings,
}

impl GatewaySource {
    pub fn new(ctx: Arc<Context>, settings: LinkSettings) -> Self {
        GatewaySource { ctx, settings }
    }
}

impl ReleaseSource for GatewaySource {
    async fn fetch(
        &mut self,
        release: &ReleaseManifest,
        offset: u64,
    ) -> std::result::Result<ChunkStream, FetchError> {
        let identity = self
            .ctx
            .db
            .read(queries::identity)
            .await
            .map_err(|e| FetchError::Transient(e.to_string()))?
            .ok_or_else(|| FetchError::Transient("not enrolled yet".into()))?;
        let mut client = crate::link::connect(&self.settings, self.settings.heartbeat)
            .await
            .map_err(|e| FetchError::Transient(e.to_string()))?;
        let mut request = tonic::Request::new(meridian_proto::FetchReleaseRequest {
            version: release.version.clone(),
            platform: release.platform.clone(),
            offset,
        });
        let auth = format!("Bearer {}", identity.credential).parse().map_err(|_| {
            FetchError::Transient("stored credential is not a valid header value".into())
        })?;
        request.metadata_mut().insert("authorization", auth);
        let stream = client.fetch_release(request).await.map_err(status_error)?.into_inner();
        Ok(stream.map(|m| m.map_err(status_error)).boxed())
    }
}

fn status_error(s: tonic::Status) -> FetchError {
    match s.code() {
        tonic::Code::NotFound | tonic::Code::InvalidArgument | tonic::Code::OutOfRange => {
            FetchError::Refused(format!("the controller refused the download: {}", s.message()))
        }
        _ => FetchError::Transient(format!("{:?}: {}", s.code(), s.message())),
    }
}

/// What one look at the upgrades did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pass {
    /// Nothing to do until woken.
    Idle,
    /// Look again after this long (or when woken): a cut download, a closed window, a new
    /// binary not yet reported healthy.
    Wait(Duration),
    /// Something changed meanwhile (a new command): look again now.
    Again,
    /// The agent is stopping.
    Stopped,
    /// Switch: stop the services and install this.
    Switch(SwitchPlan),
}

/// Reports what `state.json` says happened to the last switch, once: `healthy` when this is
/// the new binary and its session is established, `rolled_back` / `failed` when this is the
/// binary that runs after it. Returns whether a switch still waits for its health report
/// (no new switch starts meanwhile).
pub async fn settle(ctx: &Context) -> Result<bool> {
    let dir = &ctx.upgrades.dir;
    let state = dir.read_state().map_err(io_error)?;
    let now = ctx.clock.now();
    // A switch recorded here that `state.json` does not know was never installed (the agent
    // stopped in between): it failed.
    let installed = state.as_ref().map(|s| s.rollout_id);
    let abandoned = ctx.db.write(move |c| abandon_switches(c, installed, now)).await?;
    if abandoned > 0 {
        ctx.changed();
    }
    let Some(mut state) = state else { return Ok(false) };
    match state.phase {
        UpgradePhase::Switching => {
            if state.to_version != ctx.upgrades.gate.running() {
                // Not the binary the switch installed: it never reports healthy, and the
                // watchdog rolls back at the deadline.
                return Ok(true);
            }
            if !ctx.link.borrow().connected {
                return Ok(true);
            }
            let (id, version) = (state.rollout_id, state.to_version.clone());
            ctx.db
                .write(move |c| {
                    transition(c, id, &version, "healthy", UpgradePhase::Healthy, None, now)
                })
                .await?;
            ctx.changed();
            state.phase = UpgradePhase::Healthy;
            state.reported = true;
            dir.write_state(&state).map_err(io_error)?;
            tracing::info!(version = %state.to_version, "upgrade healthy: reported");
            Ok(false)
        }
        UpgradePhase::RolledBack | UpgradePhase::Failed if !state.reported => {
            let (id, version, phase, reason) =
                (state.rollout_id, state.to_version.clone(), state.phase, state.reason.clone());
            let db_state = if phase == UpgradePhase::Failed { "failed" } else { "rolled_back" };
            ctx.db
                .write(move |c| {
                    transition(c, id, &version, db_state, phase, reason.as_deref(), now)
                })
                .await?;
            ctx.changed();
            state.reported = true;
            dir.write_state(&state).map_err(io_error)?;
            tracing::warn!(version = %state.to_version, reason = ?state.reason, phase = phase.as_str(), "upgrade did not happen: reported");
            Ok(false)
        }
        _ => Ok(false),
    }
}

/// Fails the upgrades left `switching` other than `installed`; returns how many.
fn abandon_switches(
    conn: &Connection,
    installed: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<usize> {
    let except = installed.map(|id| id.to_string()).unwrap_or_default();
    let stale: Vec<(String, String)> = conn
        .prepare_cached(
            "SELECT rollout_id, version FROM upgrades WHERE state = 'switching' AND rollout_id <> ?1",
        )?
        .query_map([except], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let reason = "the agent stopped before the new binary was installed";
    for (id, version) in &stale {
        let id: Uuid = id.parse().map_err(|_| corrupt("rollout_id"))?;
        transition(conn, id, version, "failed", UpgradePhase::Failed, Some(reason), now)?;
    }
    Ok(stale.len())
}

fn io_error(e: std::io::Error) -> Error {
    Error::Internal(format!("upgrade files: {e}"))
}

/// One look at the upgrades: download, stage, and decide whether to switch now.
pub async fn pass<S: ReleaseSource>(
    ctx: &Context,
    source: &mut S,
    stop: &CancellationToken,
) -> Result<Pass> {
    let health_pending = settle(ctx).await?;
    let up = &ctx.upgrades;
    let Some(u) = ctx.db.read(open_upgrade).await? else {
        // Nothing open (done, cancelled, superseded): no download is kept.
        if up.dir.partial().exists() || up.dir.staged().exists() {
            up.dir.discard_staged().map_err(io_error)?;
        }
        return Ok(Pass::Idle);
    };
    let (id, version) = (u.rollout_id, u.version.clone());
    let Some(upgrader) = up.gate.upgrader().cloned() else {
        let v = version.clone();
        let reason = "this agent cannot replace its binary".to_owned();
        let now = ctx.clock.now();
        ctx.db
            .write(move |c| {
                transition(c, id, &v, "failed", UpgradePhase::Failed, Some(&reason), now)
            })
            .await?;
        ctx.changed();
        return Ok(Pass::Again);
    };
    if u.state == "staged" && ctx.clock.now() >= u.switch_before {
        // Staged, window closed: wait for a later command of the same release (no re-check of
        // the file until then).
        return Ok(Pass::Idle);
    }
    if u.state == "pending" {
        let v = version.clone();
        let now = ctx.clock.now();
        ctx.db
            .write(move |c| {
                c.prepare_cached(
                    "UPDATE upgrades SET attempts = attempts + 1 WHERE rollout_id = ?1",
                )?
                .execute([id.to_string()])?;
                transition(c, id, &v, "downloading", UpgradePhase::Downloading, None, now)
            })
            .await?;
        ctx.changed();
    }
    let downloaded = tokio::select! {
        d = download::download(&up.dir, &u.release, source) => d,
        _ = up.requested.notified() => return Ok(Pass::Again),
        _ = stop.cancelled() => return Ok(Pass::Stopped),
    };
    let now = ctx.clock.now();
    match downloaded {
        Ok(d) => {
            if u.state != "staged" {
                let v = version.clone();
                let resumed = i64::from(d.resumed_from > 0);
                ctx.db
                    .write(move |c| {
                        c.prepare_cached(
                            "UPDATE upgrades SET resumed = resumed + ?2 WHERE rollout_id = ?1",
                        )?
                        .execute(params![id.to_string(), resumed])?;
                        transition(c, id, &v, "staged", UpgradePhase::Staged, None, now)
                    })
                    .await?;
                ctx.changed();
                tracing::info!(version = %version, resumed_from = d.resumed_from, "upgrade staged");
            }
        }
        Err(DownloadError::Transient(e)) => {
            tracing::warn!(version = %version, error = %e, "upgrade download interrupted; will resume");
            ctx.db
                .write(move |c| {
                    c.prepare_cached(
                        "UPDATE upgrades SET attempts = attempts + 1 WHERE rollout_id = ?1",
                    )?
                    .execute([id.to_string()])?;
                    Ok(())
                })
                .await?;
            return Ok(Pass::Wait(retry_delay(u.attempts)));
        }
        Err(e @ (DownloadError::Refused(_) | DownloadError::Io(_))) => {
            let reason = e.to_string();
            tracing::error!(version = %version, error = %reason, "upgrade refused; nothing replaced");
            up.dir.discard_staged().map_err(io_error)?;
            let v = version.clone();
            ctx.db
                .write(move |c| {
                    transition(c, id, &v, "failed", UpgradePhase::Failed, Some(&reason), now)
                })
                .await?;
            ctx.changed();
            return Ok(Pass::Again);
        }
    }
    if health_pending {
        return Ok(Pass::Wait(IDLE_POLL));
    }
    if now >= u.switch_before {
        tracing::info!(version = %version, switch_before = %u.switch_before, "upgrade staged; its window is closed, waiting for a new one");
        return Ok(Pass::Idle);
    }
    // Keep the running binary aside before anything stops: if that fails, nothing changes.
    let (from, to) = (upgrader.exe().to_owned(), up.dir.previous_new());
    let kept = tokio::task::spawn_blocking(move || files::copy_executable(&from, &to))
        .await
        .map_err(|e| Error::Internal(format!("copy task: {e}")))?;
    if let Err(e) = kept {
        let reason = format!("cannot keep the running binary as the previous one: {e}");
        let v = version.clone();
        ctx.db
            .write(move |c| {
                transition(c, id, &v, "failed", UpgradePhase::Failed, Some(&reason), now)
            })
            .await?;
        ctx.changed();
        return Ok(Pass::Again);
    }
    let v = version.clone();
    ctx.db
        .write(move |c| transition(c, id, &v, "switching", UpgradePhase::Switching, None, now))
        .await?;
    ctx.changed();
    // Let the controller hear `switching` before the agent goes quiet (briefly: the outbox
    // keeps it for the next binary otherwise).
    drain_outbox(ctx, SWITCH_DRAIN).await?;
    let health_timeout = if u.health_timeout_s > 0 {
        Duration::from_secs(u64::from(u.health_timeout_s))
    } else {
        up.health_timeout
    };
    Ok(Pass::Switch(SwitchPlan {
        rollout_id: id,
        from_version: up.gate.running().to_owned(),
        to_version: version,
        health_timeout,
    }))
}

/// How long a switch waits for the controller to acknowledge what the agent queued.
const SWITCH_DRAIN: Duration = Duration::from_secs(3);

/// Waits (at most `patience`, and only while the link is up) until the controller has
/// acknowledged every event queued so far.
async fn drain_outbox(ctx: &Context, patience: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + patience;
    let (high, _) = ctx.db.read(queries::outbox_state).await?;
    while ctx.link.borrow().connected && tokio::time::Instant::now() < deadline {
        let (_, acked) = ctx.db.read(queries::outbox_state).await?;
        if acked >= high {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn retry_delay(attempts: u32) -> Duration {
    let backoff = BackoffPolicy { base: Duration::from_secs(1), cap: Duration::from_secs(60) };
    backoff.delay(attempts.min(16), &mut rand::rng())
}

/// Runs upgrades until `stop`: woken by a new command or the link coming up. Returns the
/// switch to install when it decided one (having cancelled `stop` so the agent's services
/// wind down).
pub async fn run<S: ReleaseSource>(
    ctx: Arc<Context>,
    mut source: S,
    stop: CancellationToken,
) -> Option<SwitchPlan> {
    let mut link = ctx.link.subscribe();
    loop {
        let wait = match pass(&ctx, &mut source, &stop).await {
            Ok(Pass::Switch(plan)) => {
                stop.cancel();
                return Some(plan);
            }
            Ok(Pass::Stopped) => return None,
            Ok(Pass::Again) => continue,
            Ok(Pass::Idle) => IDLE_POLL,
            Ok(Pass::Wait(d)) => d,
            Err(e) => {
                tracing::warn!(error = %e, "upgrade task failed; retrying");
                retry_delay(4)
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = ctx.upgrades.requested.notified() => {}
            _ = link.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
