//! The nightly bulk sync of appointments, as stored: one `appointment_syncs` row per sync of
//! one agent, its snapshot in `appointment_sync_chunks`, and each site's next due time in
//! `appointment_sync_schedule`. Both backends implement it with the SQL of
//! `impl_appointment_sync_store!`, which `impl_store!` expands.
//!
//! Invariants every backend keeps:
//! - requesting a sync writes the row and the agent's `APPOINTMENTS_SYNC` command in one
//!   transaction, and supersedes (and forgets the snapshot of) the agent's unfinished syncs;
//!   locks are taken in one order everywhere — site booking lock, agent row, sync rows — so a
//!   request, a fetch and an agent's report never deadlock;
//! - a sync's snapshot is taken once, at its first fetch, under the site's booking lock
//!   (`Backend::BOOKING_LOCK`, taken before the sync's row, as ingest does), together with the agent's command log high-water mark: no
//!   booking change of the site commits between the two, so every appointment change the
//!   snapshot misses is in the agent's log after `as_of_command_seq`. Every later fetch (a
//!   resumed transfer) reads the same chunks;
//! - a site's scheduled run happens once: the scheduler moves the site's `next_due_at` forward
//!   in the transaction that requests the syncs (and on PostgreSQL holds a transaction-scoped
//!   advisory lock, `Backend::SCHEDULE_LOCK`, so replicas ticking at once skip rather than
//!   queue);
//! - a sync ends once, by the agent's report (`APPOINTMENTS_SYNCED` / `_FAILED`, in the
//!   ingest transaction of the event), and its chunks are deleted when it ends.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use meridian_shared::appointments::{AppointmentSnapshot, AppointmentStatus, encode_chunk};
use meridian_shared::{AgentId, Code, SiteCode};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};

/// Where a sync is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    /// The command is in the agent's log; nothing fetched yet.
    Requested,
    /// The snapshot is taken; the agent is fetching it.
    Sending,
    /// The agent replaced its appointments with the snapshot.
    Completed,
    /// The agent refused the snapshot (see `error`); its previous set stays in force.
    Failed,
    /// A newer sync of the same agent replaced it before it completed.
    Superseded,
}

impl SyncState {
    pub const ALL: [SyncState; 5] = [
        SyncState::Requested,
        SyncState::Sending,
        SyncState::Completed,
        SyncState::Failed,
        SyncState::Superseded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::Requested => "requested",
            SyncState::Sending => "sending",
            SyncState::Completed => "completed",
            SyncState::Failed => "failed",
            SyncState::Superseded => "superseded",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_open(self) -> bool {
        matches!(self, SyncState::Requested | SyncState::Sending)
    }
}

/// One sync of one agent, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SyncRecord {
    pub id: Uuid,
    #[schema(value_type = String)]
    pub site: SiteCode,
    #[schema(value_type = String)]
    pub agent_id: AgentId,
    /// `scheduled` or `manual`.
    pub reason: String,
    pub state: SyncState,
    pub requested_at: DateTime<Utc>,
    /// When the snapshot was taken (the agent's first fetch).
    pub snapshot_at: Option<DateTime<Utc>>,
    pub from_day: Option<NaiveDate>,
    pub to_day: Option<NaiveDate>,
    pub as_of_command_seq: Option<u64>,
    pub chunks: Option<u32>,
    pub appointments: Option<u64>,
    /// Chunks asked for by the agent's fetches (a resumed fetch asks for the rest again).
    pub chunks_served: u64,
    /// Fetches that resumed a cut transfer (as the controller saw them).
    pub resumed: u32,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

/// What a fetch needs to take a sync's snapshot: the site's current day (by the injected
/// clock in its time zone), how many days after it the sync covers, the queue of each
/// bookable service, and the chunk size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPlan {
    pub today: NaiveDate,
    pub days_ahead: u32,
    pub queues: BTreeMap<Code, Code>,
    pub chunk_size: usize,
    pub at: DateTime<Utc>,
}

impl SnapshotPlan {
    pub fn to_day(&self) -> NaiveDate {
        self.today + chrono::Days::new(u64::from(self.days_ahead))
    }
}

/// The manifest every chunk of a sync repeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncManifest {
    pub id: Uuid,
    pub from_day: NaiveDate,
    pub to_day: NaiveDate,
    pub as_of_command_seq: u64,
    pub chunks: u32,
    pub appointments: u64,
}

/// One stored chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredChunk {
    pub index: u32,
    pub payload: Vec<u8>,
    pub sha256: Vec<u8>,
}

/// One site's scheduled run: when it is next due after this run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SitePlan {
    pub site: SiteCode,
    /// The first scheduled time strictly after now.
    pub next_due: DateTime<Utc>,
}

/// How an agent's report ends a sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncReport {
    Completed { sync_id: Uuid, appointments: u64, resumed: u32, at: DateTime<Utc> },
    Failed { sync_id: Uuid, error: String, at: DateTime<Utc> },
}

#[async_trait]
pub trait AppointmentSyncStore: Send + Sync {
    /// Requests a sync for every active agent of `site`: one row and one `APPOINTMENTS_SYNC`
    /// command each, in one transaction; the agents' unfinished syncs are superseded.
    async fn request_appointment_sync(
        &self,
        site: &SiteCode,
        reason: &str,
        at: DateTime<Utc>,
    ) -> Result<Vec<SyncRecord>>;
    /// One scheduler tick at `now`: for each planned site, a first sight only records
    /// `next_due`; a due site gets its syncs requested (reason `scheduled`) and `next_due`
    /// recorded, in one transaction. Returns the syncs requested; nothing when another
    /// replica is running a tick at this moment.
    async fn run_sync_schedule(
        &self,
        plans: &[SitePlan],
        now: DateTime<Utc>,
    ) -> Result<Vec<SyncRecord>>;
    /// Each site's next due time, by site.
    async fn sync_schedule(&self) -> Result<Vec<(SiteCode, DateTime<Utc>)>>;
    /// The manifest of sync `id` for `agent`, taking its snapshot by `plan` at the first
    /// fetch. `NotFound` for an unknown sync or one of another agent; `Conflict` when it has
    /// ended (completed, failed, superseded). Counts a fetch from `from_chunk` > 0 as a resume.
    async fn fetch_appointment_sync(
        &self,
        id: Uuid,
        agent: AgentId,
        plan: &SnapshotPlan,
        from_chunk: u32,
    ) -> Result<SyncManifest>;
    /// Chunks `from..from + limit` of a sync's snapshot, by index.
    async fn appointment_sync_chunks(
        &self,
        id: Uuid,
        from: u32,
        limit: u32,
    ) -> Result<Vec<StoredChunk>>;
    async fn appointment_sync(&self, id: Uuid) -> Result<Option<SyncRecord>>;
    /// Newest first; at most `limit`.
    async fn list_appointment_syncs(
        &self,
        site: Option<&SiteCode>,
        limit: u32,
    ) -> Result<Vec<SyncRecord>>;
}

/// Cuts `rows` into chunks of `size` (always at least one, possibly empty, so the agent
/// always gets a manifest).
pub fn chunked(rows: &[AppointmentSnapshot], size: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    if rows.is_empty() {
        return vec![encode_chunk(&[])];
    }
    rows.chunks(size.max(1)).map(encode_chunk).collect()
}

/// The sync columns, for `concat!`-built queries.
macro_rules! sync_select {
    () => {
        "SELECT id, site, agent_id, reason, state, requested_at, snapshot_at, from_day, to_day, \
         as_of_command_seq, chunks, appointments, chunks_served, resumed, finished_at, error \
         FROM appointment_syncs"
    };
}
pub(crate) use sync_select;

/// The central fields of one appointment, as a snapshot reads them.
pub(crate) const SNAPSHOT_ROWS: &str = "SELECT id, site, service, starts_at, local_start, \
     local_day, duration_minutes, customer_name, customer_contact, notes, external_ref, status, \
     revision, updated_at FROM appointments WHERE site = $1 AND local_day >= $2 AND local_day <= $3 \
     ORDER BY local_day, local_start, id";

#[derive(sqlx::FromRow)]
pub(crate) struct SyncRow {
    id: String,
    site: String,
    agent_id: String,
    reason: String,
    state: String,
    requested_at: DateTime<Utc>,
    snapshot_at: Option<DateTime<Utc>>,
    from_day: Option<String>,
    to_day: Option<String>,
    as_of_command_seq: Option<i64>,
    chunks: Option<i32>,
    appointments: Option<i64>,
    chunks_served: i64,
    resumed: i32,
    finished_at: Option<DateTime<Utc>>,
    error: Option<String>,
}

fn corrupt(what: &str, value: &str) -> Error {
    Error::Internal(format!(
        "corrupt value in {what}: {:?}",
        value.chars().take(40).collect::<String>()
    ))
}

impl TryFrom<SyncRow> for SyncRecord {
    type Error = Error;
    fn try_from(r: SyncRow) -> Result<Self> {
        let day = |what: &str, v: Option<String>| {
            v.map(|d| d.parse::<NaiveDate>().map_err(|_| corrupt(what, &d))).transpose()
        };
        Ok(SyncRecord {
            id: r.id.parse().map_err(|_| corrupt("appointment_syncs.id", &r.id))?,
            site: SiteCode::parse(&r.site)
                .map_err(|_| corrupt("appointment_syncs.site", &r.site))?,
            agent_id: r
                .agent_id
                .parse()
                .map_err(|_| corrupt("appointment_syncs.agent_id", &r.agent_id))?,
            reason: r.reason,
            state: SyncState::parse(&r.state)
                .ok_or_else(|| corrupt("appointment_syncs.state", &r.state))?,
            requested_at: r.requested_at,
            snapshot_at: r.snapshot_at,
            from_day: day("appointment_syncs.from_day", r.from_day)?,
            to_day: day("appointment_syncs.to_day", r.to_day)?,
            as_of_command_seq: r.as_of_command_seq.map(|s| s.max(0) as u64),
            chunks: r.chunks.map(|c| c.max(0) as u32),
            appointments: r.appointments.map(|a| a.max(0) as u64),
            chunks_served: r.chunks_served.max(0) as u64,
            resumed: r.resumed.max(0) as u32,
            finished_at: r.finished_at,
            error: r.error,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct SnapshotRow {
    id: String,
    site: String,
    service: String,
    starts_at: DateTime<Utc>,
    local_start: String,
    local_day: String,
    duration_minutes: i32,
    customer_name: String,
    customer_contact: Option<String>,
    notes: Option<String>,
    external_ref: Option<String>,
    status: String,
    revision: i64,
    updated_at: DateTime<Utc>,
}

impl SnapshotRow {
    pub(crate) fn into_snapshot(
        self,
        queues: &BTreeMap<Code, Code>,
    ) -> Result<AppointmentSnapshot> {
        let service = Code::parse(&self.service)
            .map_err(|_| corrupt("appointments.service", &self.service))?;
        Ok(AppointmentSnapshot {
            id: self.id.parse().map_err(|_| corrupt("appointments.id", &self.id))?,
            site: SiteCode::parse(&self.site)
                .map_err(|_| corrupt("appointments.site", &self.site))?,
            queue: queues.get(&service).cloned(),
            service,
            starts_at: self.starts_at,
            local_day: self
                .local_day
                .parse()
                .map_err(|_| corrupt("appointments.local_day", &self.local_day))?,
            start: self.local_start,
            duration_minutes: u32::try_from(self.duration_minutes).map_err(|_| {
                corrupt("appointments.duration_minutes", &self.duration_minutes.to_string())
            })?,
            customer_name: self.customer_name,
            customer_contact: self.customer_contact,
            notes: self.notes,
            external_ref: self.external_ref,
            status: AppointmentStatus::parse(&self.status)
                .ok_or_else(|| corrupt("appointments.status", &self.status))?,
            revision: self.revision.max(0) as u64,
            updated_at: self.updated_at,
        })
    }
}

/// Expands to the sync helpers and `#[async_trait] impl AppointmentSyncStore for $ty`.
macro_rules! impl_appointment_sync_store {
    ($ty:ty, lock = $lock:literal) => {
        impl $ty {
            /// Requests a sync of every active agent of `site` inside `tx`.
            async fn request_syncs_in(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                site: &str,
                reason: &str,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<Vec<$crate::store::appointment_sync::SyncRecord>> {
                let agents: Vec<(String,)> = sqlx::query_as(
                    "SELECT id FROM agents WHERE site = $1 AND revoked_at IS NULL ORDER BY id",
                )
                .bind(site)
                .fetch_all(&mut **tx)
                .await?;
                let mut ids = Vec::with_capacity(agents.len());
                for (agent_id,) in agents {
                    // The new sync and its command first: `enqueue_command` locks the agent's
                    // row before any sync row is touched, the order ingest takes them in (an
                    // agent's report ends a sync under its row lock), so the two never deadlock.
                    let id = uuid::Uuid::now_v7();
                    sqlx::query(
                        "INSERT INTO appointment_syncs (id, site, agent_id, reason, state, requested_at) \
                         VALUES ($1, $2, $3, $4, 'requested', $5)",
                    )
                    .bind(id.to_string())
                    .bind(site)
                    .bind(&agent_id)
                    .bind(reason)
                    .bind(at)
                    .execute(&mut **tx)
                    .await?;
                    let command = meridian_shared::commands::ControllerCommand::SyncAppointments(
                        meridian_shared::commands::SyncRequest {
                            sync_id: id,
                            reason: reason.to_owned(),
                            requested_at: at,
                        },
                    );
                    Self::enqueue_command(tx, &agent_id, command.kind(), &command.payload(), at)
                        .await?;
                    let open: Vec<(String,)> = sqlx::query_as(
                        "SELECT id FROM appointment_syncs WHERE agent_id = $1 AND id <> $2 \
                         AND state IN ('requested', 'sending')",
                    )
                    .bind(&agent_id)
                    .bind(id.to_string())
                    .fetch_all(&mut **tx)
                    .await?;
                    for (old,) in open {
                        sqlx::query(
                            "UPDATE appointment_syncs SET state = 'superseded', finished_at = $2 \
                             WHERE id = $1",
                        )
                        .bind(&old)
                        .bind(at)
                        .execute(&mut **tx)
                        .await?;
                        sqlx::query("DELETE FROM appointment_sync_chunks WHERE sync_id = $1")
                            .bind(&old)
                            .execute(&mut **tx)
                            .await?;
                    }
                    ids.push(id.to_string());
                }
                let mut records = Vec::with_capacity(ids.len());
                for id in ids {
                    let row: $crate::store::appointment_sync::SyncRow = sqlx::query_as(concat!(
                        $crate::store::appointment_sync::sync_select!(),
                        " WHERE id = $1"
                    ))
                    .bind(&id)
                    .fetch_one(&mut **tx)
                    .await?;
                    records.push(row.try_into()?);
                }
                Ok(records)
            }

            /// Ends sync `id` of `agent` as the agent reported, inside `tx` (the ingest
            /// transaction of the report). A sync that already ended is left alone.
            async fn end_sync_in(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                agent_id: &str,
                report: &$crate::store::appointment_sync::SyncReport,
            ) -> $crate::error::Result<()> {
                use $crate::store::appointment_sync::SyncReport;
                let (id, state, appointments, resumed, error, at) = match report {
                    SyncReport::Completed { sync_id, appointments, resumed, at } => (
                        sync_id,
                        "completed",
                        Some(*appointments as i64),
                        Some(*resumed as i32),
                        None,
                        *at,
                    ),
                    SyncReport::Failed { sync_id, error, at } => {
                        (sync_id, "failed", None, None, Some(error.as_str()), *at)
                    }
                };
                let ended = sqlx::query(
                    "UPDATE appointment_syncs SET state = $3, finished_at = $4, \
                     appointments = COALESCE($5, appointments), \
                     resumed = CASE WHEN $6 IS NULL THEN resumed ELSE $6 END, error = $7 \
                     WHERE id = $1 AND agent_id = $2 AND state IN ('requested', 'sending')",
                )
                .bind(id.to_string())
                .bind(agent_id)
                .bind(state)
                .bind(at)
                .bind(appointments)
                .bind(resumed)
                .bind(error)
                .execute(&mut **tx)
                .await?
                .rows_affected();
                if ended > 0 {
                    sqlx::query("DELETE FROM appointment_sync_chunks WHERE sync_id = $1")
                        .bind(id.to_string())
                        .execute(&mut **tx)
                        .await?;
                }
                Ok(())
            }

            /// Ends the syncs the fresh events of an ingest batch report, inside `tx`.
            async fn apply_sync_reports(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                agent_id: &str,
                events: &[&$crate::store::IncomingEvent],
            ) -> $crate::error::Result<()> {
                use meridian_shared::events::{
                    APPOINTMENTS_SYNCED, APPOINTMENTS_SYNC_FAILED, AgentEvent,
                };
                use $crate::store::appointment_sync::SyncReport;
                for e in events {
                    if e.kind != APPOINTMENTS_SYNCED && e.kind != APPOINTMENTS_SYNC_FAILED {
                        continue;
                    }
                    let report = match AgentEvent::decode(&e.kind, e.payload.as_bytes()) {
                        Ok(Some(AgentEvent::AppointmentsSynced(s))) => SyncReport::Completed {
                            sync_id: s.sync_id,
                            appointments: s.appointments,
                            resumed: s.resumed,
                            at: s.at,
                        },
                        Ok(Some(AgentEvent::AppointmentSyncFailed(f))) => SyncReport::Failed {
                            sync_id: f.sync_id,
                            error: f.error.chars().take(500).collect(),
                            at: f.at,
                        },
                        // Validated at the gateway; anything else is not a report.
                        _ => continue,
                    };
                    Self::end_sync_in(tx, agent_id, &report).await?;
                }
                Ok(())
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::appointment_sync::AppointmentSyncStore for $ty {
            async fn request_appointment_sync(
                &self,
                site: &meridian_shared::SiteCode,
                reason: &str,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<Vec<$crate::store::appointment_sync::SyncRecord>> {
                let mut tx = self.tx().await?;
                let records = Self::request_syncs_in(&mut tx, site.as_str(), reason, at).await?;
                tx.commit().await?;
                Ok(records)
            }

            async fn run_sync_schedule(
                &self,
                plans: &[$crate::store::appointment_sync::SitePlan],
                now: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<Vec<$crate::store::appointment_sync::SyncRecord>> {
                use $crate::store::sql_common::Backend;
                let mut tx = self.tx().await?;
                let locked: bool = sqlx::query_scalar(<$ty as Backend>::SCHEDULE_LOCK)
                    .fetch_one(&mut *tx)
                    .await?;
                if !locked {
                    return Ok(Vec::new());
                }
                let mut requested = Vec::new();
                for plan in plans {
                    let due: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(concat!(
                        "SELECT next_due_at FROM appointment_sync_schedule WHERE site = $1",
                        $lock
                    ))
                    .bind(plan.site.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
                    match due {
                        None => {
                            sqlx::query(
                                "INSERT INTO appointment_sync_schedule (site, next_due_at) \
                                 VALUES ($1, $2)",
                            )
                            .bind(plan.site.as_str())
                            .bind(plan.next_due)
                            .execute(&mut *tx)
                            .await?;
                        }
                        Some(due) if due <= now => {
                            requested.extend(
                                Self::request_syncs_in(&mut tx, plan.site.as_str(), "scheduled", now)
                                    .await?,
                            );
                            sqlx::query(
                                "UPDATE appointment_sync_schedule SET next_due_at = $2, \
                                 last_run_at = $3 WHERE site = $1",
                            )
                            .bind(plan.site.as_str())
                            .bind(plan.next_due)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        }
                        // The site's sync time changed: the next run follows the new time.
                        Some(due) if due != plan.next_due => {
                            sqlx::query(
                                "UPDATE appointment_sync_schedule SET next_due_at = $2 WHERE site = $1",
                            )
                            .bind(plan.site.as_str())
                            .bind(plan.next_due)
                            .execute(&mut *tx)
                            .await?;
                        }
                        Some(_) => {}
                    }
                }
                tx.commit().await?;
                Ok(requested)
            }

            async fn sync_schedule(
                &self,
            ) -> $crate::error::Result<Vec<(meridian_shared::SiteCode, chrono::DateTime<chrono::Utc>)>>
            {
                let rows: Vec<(String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
                    "SELECT site, next_due_at FROM appointment_sync_schedule ORDER BY site",
                )
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter()
                    .map(|(site, due)| {
                        meridian_shared::SiteCode::parse(&site).map(|s| (s, due)).map_err(|_| {
                            $crate::error::Error::Internal(format!(
                                "corrupt site in appointment_sync_schedule: {site:?}"
                            ))
                        })
                    })
                    .collect()
            }

            async fn fetch_appointment_sync(
                &self,
                id: uuid::Uuid,
                agent: meridian_shared::AgentId,
                plan: &$crate::store::appointment_sync::SnapshotPlan,
                from_chunk: u32,
            ) -> $crate::error::Result<$crate::store::appointment_sync::SyncManifest> {
                use $crate::store::appointment_sync::{SyncManifest, SyncRecord, SyncState};
                use $crate::store::sql_common::Backend;
                let mut tx = self.tx().await?;
                // The site's booking lock before the sync's row: the order ingest takes them
                // (booking lock, agent row, sync row), so the two never deadlock. A sync's site
                // never changes, so it may be read first.
                let site: Option<String> =
                    sqlx::query_scalar("SELECT site FROM appointment_syncs WHERE id = $1")
                        .bind(id.to_string())
                        .fetch_optional(&mut *tx)
                        .await?;
                let Some(site) = site else {
                    return Err($crate::error::Error::NotFound(format!("sync {id}")));
                };
                sqlx::query(<$ty as Backend>::BOOKING_LOCK).bind(&site).execute(&mut *tx).await?;
                let row: Option<$crate::store::appointment_sync::SyncRow> =
                    sqlx::query_as(concat!(
                        $crate::store::appointment_sync::sync_select!(),
                        " WHERE id = $1",
                        $lock
                    ))
                    .bind(id.to_string())
                    .fetch_optional(&mut *tx)
                    .await?;
                let record: SyncRecord = match row {
                    Some(row) => row.try_into()?,
                    None => return Err($crate::error::Error::NotFound(format!("sync {id}"))),
                };
                if record.agent_id != agent {
                    return Err($crate::error::Error::NotFound(format!("sync {id}")));
                }
                let manifest = match record.state {
                    SyncState::Requested => {
                        let as_of: i64 =
                            sqlx::query_scalar("SELECT command_seq FROM agents WHERE id = $1")
                                .bind(agent.to_string())
                                .fetch_one(&mut *tx)
                                .await?;
                        let to_day = plan.to_day();
                        let rows: Vec<$crate::store::appointment_sync::SnapshotRow> =
                            sqlx::query_as($crate::store::appointment_sync::SNAPSHOT_ROWS)
                                .bind(record.site.as_str())
                                .bind(plan.today.to_string())
                                .bind(to_day.to_string())
                                .fetch_all(&mut *tx)
                                .await?;
                        let snapshots = rows
                            .into_iter()
                            .map(|r| r.into_snapshot(&plan.queues))
                            .collect::<$crate::error::Result<Vec<_>>>()?;
                        let chunks =
                            $crate::store::appointment_sync::chunked(&snapshots, plan.chunk_size);
                        for (i, (payload, sha)) in chunks.iter().enumerate() {
                            sqlx::query(
                                "INSERT INTO appointment_sync_chunks (sync_id, idx, payload, sha256) \
                                 VALUES ($1, $2, $3, $4)",
                            )
                            .bind(id.to_string())
                            .bind(i as i32)
                            .bind(payload.as_slice())
                            .bind(sha.as_slice())
                            .execute(&mut *tx)
                            .await?;
                        }
                        sqlx::query(
                            "UPDATE appointment_syncs SET state = 'sending', snapshot_at = $2, \
                             from_day = $3, to_day = $4, as_of_command_seq = $5, chunks = $6, \
                             appointments = $7 WHERE id = $1",
                        )
                        .bind(id.to_string())
                        .bind(plan.at)
                        .bind(plan.today.to_string())
                        .bind(to_day.to_string())
                        .bind(as_of)
                        .bind(chunks.len() as i32)
                        .bind(snapshots.len() as i64)
                        .execute(&mut *tx)
                        .await?;
                        SyncManifest {
                            id,
                            from_day: plan.today,
                            to_day,
                            as_of_command_seq: as_of.max(0) as u64,
                            chunks: chunks.len() as u32,
                            appointments: snapshots.len() as u64,
                        }
                    }
                    SyncState::Sending => {
                        let (Some(from_day), Some(to_day), Some(as_of), Some(chunks), Some(n)) = (
                            record.from_day,
                            record.to_day,
                            record.as_of_command_seq,
                            record.chunks,
                            record.appointments,
                        ) else {
                            return Err($crate::error::Error::Internal(format!(
                                "sync {id} is sending without a snapshot"
                            )));
                        };
                        SyncManifest {
                            id,
                            from_day,
                            to_day,
                            as_of_command_seq: as_of,
                            chunks,
                            appointments: n,
                        }
                    }
                    ended => {
                        return Err($crate::error::Error::Conflict(format!(
                            "sync {id} is {}",
                            ended.as_str()
                        )));
                    }
                };
                let served = i64::from(manifest.chunks.saturating_sub(from_chunk));
                sqlx::query(
                    "UPDATE appointment_syncs SET chunks_served = chunks_served + $2, \
                     resumed = resumed + $3 WHERE id = $1",
                )
                .bind(id.to_string())
                .bind(served)
                .bind(i32::from(from_chunk > 0))
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(manifest)
            }

            async fn appointment_sync_chunks(
                &self,
                id: uuid::Uuid,
                from: u32,
                limit: u32,
            ) -> $crate::error::Result<Vec<$crate::store::appointment_sync::StoredChunk>> {
                let rows: Vec<(i32, Vec<u8>, Vec<u8>)> = sqlx::query_as(
                    "SELECT idx, payload, sha256 FROM appointment_sync_chunks \
                     WHERE sync_id = $1 AND idx >= $2 ORDER BY idx LIMIT $3",
                )
                .bind(id.to_string())
                .bind(from as i32)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|(idx, payload, sha256)| $crate::store::appointment_sync::StoredChunk {
                        index: idx.max(0) as u32,
                        payload,
                        sha256,
                    })
                    .collect())
            }

            async fn appointment_sync(
                &self,
                id: uuid::Uuid,
            ) -> $crate::error::Result<Option<$crate::store::appointment_sync::SyncRecord>> {
                let row: Option<$crate::store::appointment_sync::SyncRow> =
                    sqlx::query_as(concat!(
                        $crate::store::appointment_sync::sync_select!(),
                        " WHERE id = $1"
                    ))
                    .bind(id.to_string())
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(TryInto::try_into).transpose()
            }

            async fn list_appointment_syncs(
                &self,
                site: Option<&meridian_shared::SiteCode>,
                limit: u32,
            ) -> $crate::error::Result<Vec<$crate::store::appointment_sync::SyncRecord>> {
                let rows: Vec<$crate::store::appointment_sync::SyncRow> =
                    sqlx::query_as(concat!(
                        $crate::store::appointment_sync::sync_select!(),
                        " WHERE ($1 IS NULL OR site = $1) ORDER BY requested_at DESC, id DESC LIMIT $2"
                    ))
                    .bind(site.map(|s| s.as_str().to_owned()))
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }
        }
    };
}

pub(crate) use impl_appointment_sync_store;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_an_empty_set_is_one_chunk() {
        for s in SyncState::ALL {
            assert_eq!(SyncState::parse(s.as_str()), Some(s));
        }
        assert!(SyncState::Sending.is_open() && !SyncState::Superseded.is_open());
        assert_eq!(chunked(&[], 10).len(), 1);
    }
}
