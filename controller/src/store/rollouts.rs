//! Remote upgrade rollouts (migration 0013, both backends): each rollout and each of
//! its target sites with their state. Written once for both backends
//! (`impl_rollout_store!`), like the rest of the store; the decisions are pure functions in
//! `crate::rollouts`, applied here in one transaction each.
//!
//! **Invariants.** A site is `active` in at most one rollout (a unique partial index; a create
//! checks it in its transaction and names the sites); a rollout's sites turn inactive in the
//! transaction that finishes it. A rollout exists only for a stored release (version,
//! platform). Every `AGENT_UPGRADE` and `AGENT_UPGRADE_CANCEL` is appended to an agent's
//! command log in the transaction that records it on the site's row (`command_seq`,
//! `cancel_seq`). Transactions that change a rollout lock its row, then the rows of its sites'
//! agents (by site and id, as configuration commits do), then its sites' rows; an agent's
//! `AGENT_UPGRADE_STATUS` is applied in its ingest transaction after locking the agent's row,
//! so a driver step never decides on a site row that a report is changing.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::rollouts::{Decision, PlannedSite, RolloutSpec, RolloutState, SiteState};

/// A rollout and how many of its sites are in each state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rollout {
    pub id: Uuid,
    pub version: String,
    pub platform: String,
    pub targets: Value,
    pub waves: Value,
    /// Waves with sites, numbered from 1.
    pub wave_count: u32,
    pub wave_pause_s: u64,
    pub max_failures: u32,
    /// `{"start", "end"}` in each site's time, or null: outside the site's business hours.
    pub window: Value,
    pub allow_downgrade: bool,
    /// Null: the controller's `rollout_health_timeout_s`.
    pub health_timeout_s: Option<u32>,
    pub state: RolloutState,
    /// The wave being upgraded (from 1; 0 when the rollout has no site to upgrade).
    pub current_wave: u32,
    /// When the next wave starts (the current one is done and its pause runs).
    pub next_wave_at: Option<DateTime<Utc>>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Why it halted, or who aborted it and why.
    pub halted_reason: Option<String>,
    /// Sites per state (every state present, zeros included).
    pub site_counts: BTreeMap<SiteState, u64>,
}

/// One target site of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutSite {
    pub rollout_id: Uuid,
    pub site: String,
    /// Order in the rollout, from 1.
    pub position: u32,
    /// From 1; none for a site skipped at planning.
    pub wave: Option<u32>,
    /// The agent its upgrade went (or would go) to.
    pub agent_id: Option<String>,
    pub state: SiteState,
    pub reason: Option<String>,
    pub from_version: Option<String>,
    pub to_version: String,
    /// Its latest `AGENT_UPGRADE` in the agent's command log; none: never commanded.
    pub command_seq: Option<u64>,
    /// Whether the agent acknowledged that command.
    pub delivered: bool,
    pub commanded_at: Option<DateTime<Utc>>,
    /// The end of the window the latest command was sent for.
    pub switch_before: Option<DateTime<Utc>>,
    /// The `AGENT_UPGRADE_CANCEL` sent when the rollout stopped before the site switched.
    pub cancel_seq: Option<u64>,
    pub updated_at: DateTime<Utc>,
}

/// A rollout with its sites (by position).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutDetail {
    #[serde(flatten)]
    pub rollout: Rollout,
    pub sites: Vec<RolloutSite>,
}

/// A planned rollout to create.
#[derive(Debug, Clone)]
pub struct NewRollout {
    pub id: Uuid,
    pub spec: RolloutSpec,
    pub sites: Vec<PlannedSite>,
    pub created_by: String,
    pub at: DateTime<Utc>,
}

/// Which rollouts to list (newest first).
#[derive(Debug, Clone, Default)]
pub struct RolloutFilter {
    pub state: Option<RolloutState>,
    pub limit: u32,
}

/// What an admin does to a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutAction {
    /// Running → paused: nothing more is sent (what was sent runs its course).
    Pause,
    /// Paused → running.
    Resume,
    /// Running or paused → aborted: what has not switched is cancelled, sites never
    /// commanded are left alone.
    Abort { reason: String },
}

/// For the metrics: rollouts per state, and the sites of unfinished rollouts per state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RolloutSummary {
    pub rollouts: BTreeMap<RolloutState, u64>,
    pub sites: Vec<(Uuid, SiteState, u64)>,
}

/// The decision a driver step takes on the rollout as held under its locks, given each target
/// site's current agent.
pub type DecideFn<'a> =
    dyn Fn(&RolloutDetail, &BTreeMap<String, String>) -> Decision + Send + Sync + 'a;

#[async_trait::async_trait]
pub trait RolloutStore: Send + Sync {
    /// Creates the rollout in one transaction, after checking that its release exists for its
    /// platform (422 otherwise: `Error::Validation` on `version` or `platform`) and that none
    /// of its sites to upgrade is in another unfinished rollout (`Error::Conflict` naming
    /// them).
    async fn create_rollout(&self, new: &NewRollout) -> Result<RolloutDetail>;
    async fn list_rollouts(&self, filter: &RolloutFilter) -> Result<Vec<Rollout>>;
    async fn rollout(&self, id: Uuid) -> Result<Option<RolloutDetail>>;
    /// Running rollouts with their sites (a plain read, for the driver's first look).
    async fn running_rollouts(&self) -> Result<Vec<RolloutDetail>>;
    /// One driver step: on this replica only if it holds the driver's lock, and only while the
    /// rollout runs. Takes the rollout's locks, decides with `decide` on what it holds, applies
    /// the decision (commands with their rows) and commits. `None` when nothing was done.
    async fn drive_rollout(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
        default_health_timeout_s: u32,
        decide: &DecideFn<'_>,
    ) -> Result<Option<Decision>>;
    /// Pause, resume or abort; `Error::Conflict` when the rollout's state does not allow it,
    /// `Error::NotFound` for an unknown rollout.
    async fn change_rollout(
        &self,
        id: Uuid,
        action: &RolloutAction,
        now: DateTime<Utc>,
    ) -> Result<RolloutDetail>;
    async fn rollout_summary(&self) -> Result<RolloutSummary>;
}

#[derive(sqlx::FromRow)]
pub(crate) struct RolloutRow {
    pub(crate) id: String,
    version: String,
    platform: String,
    targets: String,
    waves: String,
    wave_count: i64,
    wave_pause_s: i64,
    max_failures: i64,
    maintenance_window: Option<String>,
    allow_downgrade: bool,
    health_timeout_s: Option<i64>,
    state: String,
    current_wave: i64,
    next_wave_at: Option<DateTime<Utc>>,
    created_by: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    halted_reason: Option<String>,
}

macro_rules! rollout_select {
    () => {
        "SELECT id, version, platform, targets, waves, wave_count, wave_pause_s, max_failures, \
         maintenance_window, allow_downgrade, health_timeout_s, state, current_wave, next_wave_at, \
         created_by, created_at, updated_at, halted_reason FROM rollouts"
    };
}
pub(crate) use rollout_select;

impl RolloutRow {
    pub(crate) fn into_rollout(self, sites: BTreeMap<SiteState, u64>) -> Result<Rollout> {
        let json =
            |what: &str, s: &str| serde_json::from_str::<Value>(s).map_err(|_| corrupt(what, s));
        Ok(Rollout {
            id: self.id.parse().map_err(|_| corrupt("rollouts.id", &self.id))?,
            targets: json("rollouts.targets", &self.targets)?,
            waves: json("rollouts.waves", &self.waves)?,
            window: match &self.maintenance_window {
                Some(w) => json("rollouts.maintenance_window", w)?,
                None => Value::Null,
            },
            state: RolloutState::parse(&self.state)
                .ok_or_else(|| corrupt("rollouts.state", &self.state))?,
            version: self.version,
            platform: self.platform,
            wave_count: self.wave_count.clamp(0, i64::from(u32::MAX)) as u32,
            wave_pause_s: self.wave_pause_s.max(0) as u64,
            max_failures: self.max_failures.clamp(0, i64::from(u32::MAX)) as u32,
            allow_downgrade: self.allow_downgrade,
            health_timeout_s: self.health_timeout_s.map(|t| t.clamp(0, i64::from(u32::MAX)) as u32),
            current_wave: self.current_wave.clamp(0, i64::from(u32::MAX)) as u32,
            next_wave_at: self.next_wave_at,
            created_by: self.created_by,
            created_at: self.created_at,
            updated_at: self.updated_at,
            halted_reason: self.halted_reason,
            site_counts: with_every_state(sites),
        })
    }
}

/// `counts` with a zero for every state it lacks.
pub(crate) fn with_every_state(counts: BTreeMap<SiteState, u64>) -> BTreeMap<SiteState, u64> {
    let mut all: BTreeMap<SiteState, u64> = SiteState::ALL.iter().map(|s| (*s, 0)).collect();
    all.extend(counts);
    all
}

#[derive(sqlx::FromRow)]
pub(crate) struct RolloutSiteRow {
    rollout_id: String,
    site: String,
    position: i64,
    wave: Option<i64>,
    agent_id: Option<String>,
    state: String,
    reason: Option<String>,
    from_version: Option<String>,
    to_version: String,
    command_seq: Option<i64>,
    delivered: bool,
    commanded_at: Option<DateTime<Utc>>,
    switch_before: Option<DateTime<Utc>>,
    cancel_seq: Option<i64>,
    updated_at: DateTime<Utc>,
}

macro_rules! rollout_site_select {
    () => {
        "SELECT rs.rollout_id, rs.site, rs.position, rs.wave, rs.agent_id, rs.state, rs.reason, \
         rs.from_version, rs.to_version, rs.command_seq, \
         (rs.command_seq IS NOT NULL AND COALESCE(a.command_acked_seq, 0) >= rs.command_seq) AS delivered, \
         rs.commanded_at, rs.switch_before, rs.cancel_seq, rs.updated_at \
         FROM rollout_sites rs LEFT JOIN agents a ON a.id = rs.agent_id"
    };
}
pub(crate) use rollout_site_select;

impl TryFrom<RolloutSiteRow> for RolloutSite {
    type Error = Error;
    fn try_from(r: RolloutSiteRow) -> Result<Self> {
        let small = |v: i64| v.clamp(0, i64::from(u32::MAX)) as u32;
        Ok(RolloutSite {
            rollout_id: r
                .rollout_id
                .parse()
                .map_err(|_| corrupt("rollout_sites.rollout_id", &r.rollout_id))?,
            state: SiteState::parse(&r.state)
                .ok_or_else(|| corrupt("rollout_sites.state", &r.state))?,
            site: r.site,
            position: small(r.position),
            wave: r.wave.map(small),
            agent_id: r.agent_id,
            reason: r.reason,
            from_version: r.from_version,
            to_version: r.to_version,
            command_seq: r.command_seq.map(|s| s.max(0) as u64),
            delivered: r.delivered,
            commanded_at: r.commanded_at,
            switch_before: r.switch_before,
            cancel_seq: r.cancel_seq.map(|s| s.max(0) as u64),
            updated_at: r.updated_at,
        })
    }
}

/// Sites per state of `sites`.
pub(crate) fn count_states(sites: &[RolloutSite]) -> BTreeMap<SiteState, u64> {
    let mut counts = BTreeMap::new();
    for s in sites {
        *counts.entry(s.state).or_insert(0) += 1;
    }
    counts
}

pub(crate) fn corrupt(what: &str, value: &str) -> Error {
    Error::Internal(format!(
        "corrupt value in {what}: {:?}",
        value.chars().take(40).collect::<String>()
    ))
}

/// The release's manifest from its stored row (through JSON, so fields a newer manifest adds
/// keep their defaults).
pub(crate) fn manifest(
    row: (String, String, String, i64, String, String, Option<String>),
) -> Result<meridian_shared::releases::ReleaseManifest> {
    let (version, platform, sha256, size, key_id, signature, notes) = row;
    serde_json::from_value(serde_json::json!({
        "version": version,
        "platform": platform,
        "sha256": sha256,
        "size": size.max(0),
        "key_id": key_id,
        "signature": signature,
        "notes": notes.unwrap_or_default(),
    }))
    .map_err(|e| Error::Internal(format!("a stored release does not form a manifest: {e}")))
}

/// Expands to the rollout helpers (ingest, driver) and `impl RolloutStore for $ty`.
macro_rules! impl_rollout_store {
    ($ty:ty, lock = $lock:literal) => {
        impl $ty {
            /// Applies the batch's `AGENT_UPGRADE_STATUS` events from an agent of `site`,
            /// inside its ingest transaction. A report for an unknown rollout, from a site not
            /// in it (or never sent it), or about another version changes nothing and is kept
            /// in `quarantined_events` (stage `rollout`) with the reason.
            pub(crate) async fn apply_upgrade_reports(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                agent_id: &str,
                site: &str,
                events: &[&$crate::store::IncomingEvent],
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<()> {
                use meridian_shared::events::{AGENT_UPGRADE_STATUS, AgentEvent};
                use $crate::rollouts::StatusEffect;
                let mut locked = false;
                for e in events
                    .iter()
                    .filter(|e| e.kind == AGENT_UPGRADE_STATUS && e.quarantine.is_none())
                {
                    let status = match AgentEvent::decode(&e.kind, e.payload.as_bytes()) {
                        Ok(Some(AgentEvent::UpgradeStatus(s))) => s,
                        // Validated at the gateway: anything else is not a report.
                        _ => continue,
                    };
                    if !locked {
                        // The agent's row before its rollout sites' rows: the order in which
                        // the driver takes them.
                        let _: Option<(String,)> = sqlx::query_as(concat!(
                            "SELECT id FROM agents WHERE id = $1",
                            $lock
                        ))
                        .bind(agent_id)
                        .fetch_optional(&mut **tx)
                        .await?;
                        locked = true;
                    }
                    let id = status.rollout_id.to_string();
                    let version: Option<String> =
                        sqlx::query_scalar("SELECT version FROM rollouts WHERE id = $1")
                            .bind(&id)
                            .fetch_optional(&mut **tx)
                            .await?;
                    let row: Option<$crate::store::rollouts::RolloutSiteRow> =
                        sqlx::query_as(concat!(
                            $crate::store::rollouts::rollout_site_select!(),
                            " WHERE rs.rollout_id = $1 AND rs.site = $2"
                        ))
                        .bind(&id)
                        .bind(site)
                        .fetch_optional(&mut **tx)
                        .await?;
                    let refusal = match (version, row) {
                        (None, _) => Some(format!("unknown rollout {id}")),
                        (Some(_), None) => Some(format!("site {site} is not part of rollout {id}")),
                        (Some(version), Some(row)) => {
                            let current: $crate::store::rollouts::RolloutSite = row.try_into()?;
                            match $crate::rollouts::apply_status(&current, &version, &status) {
                                StatusEffect::Apply { state, reason } => {
                                    sqlx::query(
                                        "UPDATE rollout_sites SET state = $3, reason = $4, updated_at = $5 \
                                         WHERE rollout_id = $1 AND site = $2",
                                    )
                                    .bind(&id)
                                    .bind(site)
                                    .bind(state.as_str())
                                    .bind(reason)
                                    .bind(at)
                                    .execute(&mut **tx)
                                    .await?;
                                    tracing::info!(rollout = %id, site, state = state.as_str(), "upgrade status");
                                    None
                                }
                                StatusEffect::Ignore(why) => {
                                    tracing::debug!(rollout = %id, site, phase = status.phase.as_str(), %why, "upgrade status changes nothing");
                                    None
                                }
                                StatusEffect::Refuse(why) => Some(why),
                            }
                        }
                    };
                    if let Some(reason) = refusal {
                        tracing::warn!(rollout = %id, site, seq = e.seq, %reason, "upgrade status refused");
                        sqlx::query(
                            "INSERT INTO quarantined_events (agent_id, seq, site, kind, stage, reason, \
                             payload, occurred_at, received_at) VALUES ($1, $2, $3, $4, 'rollout', $5, $6, $7, $8) \
                             ON CONFLICT (agent_id, seq) DO NOTHING",
                        )
                        .bind(agent_id)
                        .bind(e.seq as i64)
                        .bind(site)
                        .bind(&e.kind)
                        .bind(reason)
                        .bind(&e.payload)
                        .bind(e.occurred_at)
                        .bind(at)
                        .execute(&mut **tx)
                        .await?;
                    }
                }
                Ok(())
            }

            /// A rollout and its sites; with `lock`, the rollout's row is locked for `tx`.
            async fn ro_load(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                id: &str,
                lock: bool,
            ) -> $crate::error::Result<Option<$crate::store::rollouts::RolloutDetail>> {
                let sql = if lock {
                    concat!($crate::store::rollouts::rollout_select!(), " WHERE id = $1", $lock)
                } else {
                    concat!($crate::store::rollouts::rollout_select!(), " WHERE id = $1")
                };
                let row: Option<$crate::store::rollouts::RolloutRow> =
                    sqlx::query_as(sql).bind(id).fetch_optional(&mut **tx).await?;
                let Some(row) = row else { return Ok(None) };
                let sites = Self::ro_sites(tx, id).await?;
                let counts = $crate::store::rollouts::count_states(&sites);
                Ok(Some($crate::store::rollouts::RolloutDetail {
                    rollout: row.into_rollout(counts)?,
                    sites,
                }))
            }

            async fn ro_sites(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                id: &str,
            ) -> $crate::error::Result<Vec<$crate::store::rollouts::RolloutSite>> {
                let rows: Vec<$crate::store::rollouts::RolloutSiteRow> = sqlx::query_as(concat!(
                    $crate::store::rollouts::rollout_site_select!(),
                    " WHERE rs.rollout_id = $1 ORDER BY rs.position"
                ))
                .bind(id)
                .fetch_all(&mut **tx)
                .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            /// Locks the rows of every agent (current or not) of the rollout's sites, by site
            /// and id (the order a configuration commit takes them in), and returns each site's
            /// current agent.
            async fn ro_lock_agents(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                detail: &$crate::store::rollouts::RolloutDetail,
            ) -> $crate::error::Result<std::collections::BTreeMap<String, String>> {
                use $crate::store::sql_common::Backend;
                let sites: Vec<&str> = detail.sites.iter().map(|s| s.site.as_str()).collect();
                let rows: Vec<(String, String, chrono::DateTime<chrono::Utc>, Option<chrono::DateTime<chrono::Utc>>)> =
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT id, site, enrolled_at, revoked_at FROM agents WHERE {} ORDER BY site, id{}",
                        <$ty as Backend>::in_ids("site"),
                        $lock
                    )))
                    .bind(<$ty as Backend>::ids(&sites))
                    .fetch_all(&mut **tx)
                    .await?;
                let mut newest: std::collections::BTreeMap<String, (chrono::DateTime<chrono::Utc>, String)> =
                    Default::default();
                for (id, site, enrolled_at, revoked_at) in rows {
                    if revoked_at.is_some() {
                        continue;
                    }
                    let e = newest.entry(site).or_insert((enrolled_at, id.clone()));
                    if enrolled_at > e.0 {
                        *e = (enrolled_at, id);
                    }
                }
                Ok(newest.into_iter().map(|(site, (_, id))| (site, id)).collect())
            }

            /// The stored release of the rollout as a manifest; `None` when it is gone.
            async fn ro_release(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                version: &str,
                platform: &str,
            ) -> $crate::error::Result<Option<meridian_shared::releases::ReleaseManifest>> {
                let row: Option<(String, String, String, i64, String, String, Option<String>)> =
                    sqlx::query_as(
                        "SELECT version, platform, sha256, size, key_id, signature, notes \
                         FROM releases WHERE version = $1 AND platform = $2",
                    )
                    .bind(version)
                    .bind(platform)
                    .fetch_optional(&mut **tx)
                    .await?;
                row.map($crate::store::rollouts::manifest).transpose()
            }

            /// Applies `d` to rollout `r` (whose locks `tx` holds): commands with their rows,
            /// skips, and the rollout's own columns.
            async fn ro_apply(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                r: &$crate::store::rollouts::RolloutDetail,
                d: &$crate::rollouts::Decision,
                now: chrono::DateTime<chrono::Utc>,
                default_health_timeout_s: u32,
            ) -> $crate::error::Result<()> {
                let id = r.rollout.id.to_string();
                if !d.sends.is_empty() {
                    let release = Self::ro_release(tx, &r.rollout.version, &r.rollout.platform)
                        .await?
                        .ok_or_else(|| $crate::error::Error::Internal(format!(
                            "release {} for {} is gone", r.rollout.version, r.rollout.platform
                        )))?;
                    for s in &d.sends {
                        let (kind, payload) = $crate::rollouts::upgrade_command(
                            &r.rollout,
                            release.clone(),
                            s.switch_before,
                            default_health_timeout_s,
                        );
                        let seq = Self::enqueue_command(tx, &s.agent_id, kind, &payload, now).await?;
                        sqlx::query(
                            "UPDATE rollout_sites SET agent_id = $3, command_seq = $4, commanded_at = $5, \
                             switch_before = $6, updated_at = $5, reason = NULL \
                             WHERE rollout_id = $1 AND site = $2",
                        )
                        .bind(&id)
                        .bind(&s.site)
                        .bind(&s.agent_id)
                        .bind(seq as i64)
                        .bind(now)
                        .bind(s.switch_before)
                        .execute(&mut **tx)
                        .await?;
                    }
                }
                for c in &d.cancels {
                    let (kind, payload) = $crate::rollouts::cancel_command(r.rollout.id);
                    let seq = Self::enqueue_command(tx, &c.agent_id, kind, &payload, now).await?;
                    sqlx::query(
                        "UPDATE rollout_sites SET state = 'skipped', reason = $3, cancel_seq = $4, \
                         updated_at = $5 WHERE rollout_id = $1 AND site = $2",
                    )
                    .bind(&id)
                    .bind(&c.site)
                    .bind(&c.reason)
                    .bind(seq as i64)
                    .bind(now)
                    .execute(&mut **tx)
                    .await?;
                }
                for (site, reason) in &d.skips {
                    sqlx::query(
                        "UPDATE rollout_sites SET state = 'skipped', reason = $3, updated_at = $4 \
                         WHERE rollout_id = $1 AND site = $2",
                    )
                    .bind(&id)
                    .bind(site)
                    .bind(reason)
                    .bind(now)
                    .execute(&mut **tx)
                    .await?;
                }
                for (site, reason) in &d.untouched {
                    sqlx::query(
                        "UPDATE rollout_sites SET reason = $3, updated_at = $4 \
                         WHERE rollout_id = $1 AND site = $2",
                    )
                    .bind(&id)
                    .bind(site)
                    .bind(reason)
                    .bind(now)
                    .execute(&mut **tx)
                    .await?;
                }
                if let Some(u) = &d.rollout {
                    sqlx::query(
                        "UPDATE rollouts SET state = $2, current_wave = $3, next_wave_at = $4, \
                         halted_reason = COALESCE($5, halted_reason), updated_at = $6 WHERE id = $1",
                    )
                    .bind(&id)
                    .bind(u.state.as_str())
                    .bind(i64::from(u.current_wave))
                    .bind(u.next_wave_at)
                    .bind(u.halted_reason.as_deref())
                    .bind(now)
                    .execute(&mut **tx)
                    .await?;
                    if u.state.is_finished() {
                        sqlx::query("UPDATE rollout_sites SET active = FALSE WHERE rollout_id = $1")
                            .bind(&id)
                            .execute(&mut **tx)
                            .await?;
                    }
                }
                Ok(())
            }

            async fn ro_list(
                &self,
                state: Option<&str>,
                limit: u32,
            ) -> $crate::error::Result<Vec<$crate::store::rollouts::Rollout>> {
                use $crate::store::sql_common::Backend;
                let rows: Vec<$crate::store::rollouts::RolloutRow> = sqlx::query_as(concat!(
                    $crate::store::rollouts::rollout_select!(),
                    " WHERE ($1 IS NULL OR state = $1) ORDER BY created_at DESC, id DESC LIMIT $2"
                ))
                .bind(state)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
                let counts: Vec<(String, String, i64)> = if ids.is_empty() {
                    vec![]
                } else {
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT rollout_id, state, COUNT(*) FROM rollout_sites WHERE {} \
                         GROUP BY rollout_id, state",
                        <$ty as Backend>::in_ids("rollout_id")
                    )))
                    .bind(<$ty as Backend>::ids(&ids))
                    .fetch_all(&self.pool)
                    .await?
                };
                let mut by_rollout: std::collections::BTreeMap<String, std::collections::BTreeMap<$crate::rollouts::SiteState, u64>> =
                    Default::default();
                for (rollout, state, n) in counts {
                    let state = $crate::rollouts::SiteState::parse(&state)
                        .ok_or_else(|| $crate::store::rollouts::corrupt("rollout_sites.state", &state))?;
                    by_rollout.entry(rollout).or_default().insert(state, n.max(0) as u64);
                }
                rows.into_iter()
                    .map(|r| {
                        let counts = by_rollout.remove(&r.id).unwrap_or_default();
                        r.into_rollout(counts)
                    })
                    .collect()
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::rollouts::RolloutStore for $ty {
            async fn create_rollout(
                &self,
                new: &$crate::store::rollouts::NewRollout,
            ) -> $crate::error::Result<$crate::store::rollouts::RolloutDetail> {
                use $crate::store::sql_common::Backend;
                use meridian_shared::ValidationError;
                let spec = &new.spec;
                let version = spec.version.to_string();
                let id = new.id.to_string();
                let mut tx = self.tx().await?;
                // Locked, as a release delete locks it: neither commits past the other.
                let platforms: Vec<String> = sqlx::query_scalar(concat!(
                    "SELECT platform FROM releases WHERE version = $1 ORDER BY platform",
                    $lock
                ))
                .bind(&version)
                .fetch_all(&mut *tx)
                .await?;
                if platforms.is_empty() {
                    return Err(ValidationError::new(
                        "version",
                        format!("unknown version {version}: no release of it was uploaded"),
                    )
                    .into());
                }
                if !platforms.contains(&spec.platform) {
                    return Err(ValidationError::new(
                        "platform",
                        format!(
                            "no release of {version} for platform {} (it has {})",
                            spec.platform,
                            platforms.join(", ")
                        ),
                    )
                    .into());
                }
                let upgrading: Vec<&str> = new
                    .sites
                    .iter()
                    .filter(|s| s.state != $crate::rollouts::SiteState::Skipped)
                    .map(|s| s.site.as_str())
                    .collect();
                if !upgrading.is_empty() {
                    let taken: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT site, rollout_id FROM rollout_sites WHERE active AND {} ORDER BY site",
                        <$ty as Backend>::in_ids("site")
                    )))
                    .bind(<$ty as Backend>::ids(&upgrading))
                    .fetch_all(&mut *tx)
                    .await?;
                    if !taken.is_empty() {
                        let list: Vec<String> =
                            taken.iter().map(|(s, r)| format!("{s} (rollout {r})")).collect();
                        return Err($crate::error::Error::Conflict(format!(
                            "site(s) already in an unfinished rollout: {}; wait for it to finish or abort it",
                            list.join(", ")
                        )));
                    }
                }
                let wave_count = new.sites.iter().filter_map(|s| s.wave).max().unwrap_or(0);
                let window = spec.window.to_json();
                sqlx::query(
                    "INSERT INTO rollouts (id, version, platform, targets, waves, wave_count, \
                     wave_pause_s, max_failures, maintenance_window, allow_downgrade, health_timeout_s, \
                     state, current_wave, next_wave_at, created_by, created_at, updated_at, halted_reason) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'running', $12, NULL, $13, $14, $14, NULL)",
                )
                .bind(&id)
                .bind(&version)
                .bind(&spec.platform)
                .bind(spec.targets.to_json().to_string())
                .bind(spec.waves_json().to_string())
                .bind(i64::from(wave_count))
                .bind(i64::try_from(spec.wave_pause_s).unwrap_or(i64::MAX))
                .bind(i64::from(spec.max_failures))
                .bind((!window.is_null()).then(|| window.to_string()))
                .bind(spec.allow_downgrade)
                .bind(spec.health_timeout_s.map(i64::from))
                .bind(i64::from(wave_count.min(1)))
                .bind(&new.created_by)
                .bind(new.at)
                .execute(&mut *tx)
                .await?;
                for s in &new.sites {
                    let inserted = sqlx::query(
                        "INSERT INTO rollout_sites (rollout_id, site, position, wave, agent_id, state, \
                         reason, from_version, to_version, command_seq, commanded_at, switch_before, \
                         cancel_seq, active, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, NULL, NULL, NULL, $10, $11)",
                    )
                    .bind(&id)
                    .bind(s.site.as_str())
                    .bind(i64::from(s.position))
                    .bind(s.wave.map(i64::from))
                    .bind(s.agent_id.as_deref())
                    .bind(s.state.as_str())
                    .bind(s.reason.as_deref())
                    .bind(s.from_version.as_deref())
                    .bind(&version)
                    .bind(s.state != $crate::rollouts::SiteState::Skipped)
                    .bind(new.at)
                    .execute(&mut *tx)
                    .await;
                    match inserted {
                        Ok(_) => {}
                        // A rollout created concurrently took the site (the unique index on
                        // active sites).
                        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                            return Err($crate::error::Error::Conflict(format!(
                                "site {} was just put in another unfinished rollout; retry to see which",
                                s.site
                            )));
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                let detail = Self::ro_load(&mut tx, &id, false)
                    .await?
                    .ok_or_else(|| $crate::error::Error::Internal("created rollout not found".into()))?;
                match tx.commit().await {
                    Ok(()) => Ok(detail),
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                        Err($crate::error::Error::Conflict(
                            "a site was just put in another unfinished rollout; retry to see which".into(),
                        ))
                    }
                    Err(e) => Err(e.into()),
                }
            }

            async fn list_rollouts(
                &self,
                filter: &$crate::store::rollouts::RolloutFilter,
            ) -> $crate::error::Result<Vec<$crate::store::rollouts::Rollout>> {
                self.ro_list(filter.state.map(|s| s.as_str()), filter.limit).await
            }

            async fn rollout(
                &self,
                id: uuid::Uuid,
            ) -> $crate::error::Result<Option<$crate::store::rollouts::RolloutDetail>> {
                let mut tx = self.pool.begin().await?;
                let detail = Self::ro_load(&mut tx, &id.to_string(), false).await?;
                tx.commit().await?;
                Ok(detail)
            }

            async fn running_rollouts(
                &self,
            ) -> $crate::error::Result<Vec<$crate::store::rollouts::RolloutDetail>> {
                let ids: Vec<String> = sqlx::query_scalar(
                    "SELECT id FROM rollouts WHERE state = 'running' ORDER BY created_at, id",
                )
                .fetch_all(&self.pool)
                .await?;
                let mut out = Vec::with_capacity(ids.len());
                if ids.is_empty() {
                    return Ok(out);
                }
                let mut tx = self.pool.begin().await?;
                for id in ids {
                    if let Some(d) = Self::ro_load(&mut tx, &id, false).await? {
                        out.push(d);
                    }
                }
                tx.commit().await?;
                Ok(out)
            }

            async fn drive_rollout(
                &self,
                id: uuid::Uuid,
                now: chrono::DateTime<chrono::Utc>,
                default_health_timeout_s: u32,
                decide: &$crate::store::rollouts::DecideFn<'_>,
            ) -> $crate::error::Result<Option<$crate::rollouts::Decision>> {
                use $crate::rollouts::RolloutState;
                let key = id.to_string();
                let mut tx = self.tx().await?;
                let mine: bool =
                    sqlx::query_scalar(<$ty as $crate::store::sql_common::Backend>::ROLLOUT_LOCK)
                        .fetch_one(&mut *tx)
                        .await?;
                if !mine {
                    return Ok(None);
                }
                let Some(held) = Self::ro_load(&mut tx, &key, true).await? else {
                    return Ok(None);
                };
                if held.rollout.state != RolloutState::Running {
                    return Ok(None);
                }
                let agents = Self::ro_lock_agents(&mut tx, &held).await?;
                // Read again under the agents' locks: a report committed meanwhile is seen.
                let mut held = held;
                held.sites = Self::ro_sites(&mut tx, &key).await?;
                let mut decision = decide(&held, &agents);
                if decision.is_empty() {
                    return Ok(None);
                }
                if !decision.sends.is_empty()
                    && Self::ro_release(&mut tx, &held.rollout.version, &held.rollout.platform)
                        .await?
                        .is_none()
                {
                    decision = $crate::rollouts::stop(
                        &held,
                        RolloutState::Halted,
                        &format!(
                            "release {} for {} is no longer stored",
                            held.rollout.version, held.rollout.platform
                        ),
                    );
                }
                Self::ro_apply(&mut tx, &held, &decision, now, default_health_timeout_s).await?;
                tx.commit().await?;
                Ok(Some(decision))
            }

            async fn change_rollout(
                &self,
                id: uuid::Uuid,
                action: &$crate::store::rollouts::RolloutAction,
                now: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<$crate::store::rollouts::RolloutDetail> {
                use $crate::rollouts::RolloutState;
                use $crate::store::rollouts::RolloutAction;
                let key = id.to_string();
                let mut tx = self.tx().await?;
                let Some(held) = Self::ro_load(&mut tx, &key, true).await? else {
                    return Err($crate::error::Error::NotFound(format!("rollout {id}")));
                };
                let state = held.rollout.state;
                let refuse = |what: &str| {
                    $crate::error::Error::Conflict(format!(
                        "rollout {id} is {}: {what}",
                        state.as_str()
                    ))
                };
                let decision = match action {
                    RolloutAction::Pause if state == RolloutState::Running => None,
                    RolloutAction::Pause => return Err(refuse("only a running rollout can be paused")),
                    RolloutAction::Resume if state == RolloutState::Paused => None,
                    RolloutAction::Resume => return Err(refuse("only a paused rollout can be resumed")),
                    RolloutAction::Abort { .. } if state.is_finished() => {
                        return Err(refuse("it is finished already"));
                    }
                    RolloutAction::Abort { reason } => {
                        Self::ro_lock_agents(&mut tx, &held).await?;
                        let mut held = held.clone();
                        held.sites = Self::ro_sites(&mut tx, &key).await?;
                        Some((
                            $crate::rollouts::stop(&held, RolloutState::Aborted, reason),
                            held,
                        ))
                    }
                };
                match decision {
                    Some((d, held)) => Self::ro_apply(&mut tx, &held, &d, now, 0).await?,
                    None => {
                        let to = match action {
                            RolloutAction::Pause => RolloutState::Paused,
                            _ => RolloutState::Running,
                        };
                        sqlx::query("UPDATE rollouts SET state = $2, updated_at = $3 WHERE id = $1")
                            .bind(&key)
                            .bind(to.as_str())
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                let detail = Self::ro_load(&mut tx, &key, false)
                    .await?
                    .ok_or_else(|| $crate::error::Error::NotFound(format!("rollout {id}")))?;
                tx.commit().await?;
                Ok(detail)
            }

            async fn rollout_summary(
                &self,
            ) -> $crate::error::Result<$crate::store::rollouts::RolloutSummary> {
                use $crate::rollouts::{RolloutState, SiteState};
                let by_state: Vec<(String, i64)> =
                    sqlx::query_as("SELECT state, COUNT(*) FROM rollouts GROUP BY state")
                        .fetch_all(&self.pool)
                        .await?;
                let mut summary = $crate::store::rollouts::RolloutSummary::default();
                for s in RolloutState::ALL {
                    summary.rollouts.insert(s, 0);
                }
                for (state, n) in by_state {
                    if let Some(s) = RolloutState::parse(&state) {
                        summary.rollouts.insert(s, n.max(0) as u64);
                    }
                }
                let sites: Vec<(String, String, i64)> = sqlx::query_as(
                    "SELECT rs.rollout_id, rs.state, COUNT(*) FROM rollout_sites rs \
                     JOIN rollouts r ON r.id = rs.rollout_id WHERE r.state IN ('running', 'paused') \
                     GROUP BY rs.rollout_id, rs.state ORDER BY rs.rollout_id, rs.state",
                )
                .fetch_all(&self.pool)
                .await?;
                for (rollout, state, n) in sites {
                    if let (Ok(id), Some(state)) = (rollout.parse(), SiteState::parse(&state)) {
                        summary.sites.push((id, state, n.max(0) as u64));
                    }
                }
                Ok(summary)
            }
        }
    };
}

pub(crate) use impl_rollout_store;
