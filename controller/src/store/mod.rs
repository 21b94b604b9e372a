//! Persistence. One `Store` trait, two backends chosen by URL scheme: PostgreSQL
//! (`postgres://…`, production, several controller replicas) and SQLite (`sqlite://…`,
//! embedded, one replica). Both run their own migrations at start-up and pass the same
//! conformance suite (`conformance`).
//!
//! Invariants every backend keeps:
//! - events are stored at most once per (agent, seq) and `agents.acked_seq` is the highest
//!   sequence such that every event up to it is stored (gapless), advanced in the same
//!   transaction as the insert;
//! - a configuration commit is atomic with the commands that publish it: resources, revision,
//!   site revisions and one `APPLY_CONFIG` command per active agent of each changed site;
//! - an enrollment token is consumed, the site's previous agents revoked and the new agent
//!   created (with its first configuration command) in one transaction.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use meridian_shared::config::{Resource, ResourceKey};
use meridian_shared::{AgentId, SiteCode};
use serde::Serialize;

use crate::error::{EnrollError, Error, Result};

pub mod appointment_sync;
pub mod appointments;
pub mod conformance;
pub mod console_sessions;
pub mod maintenance;
mod postgres;
pub mod releases;
pub mod requests;
pub mod rollouts;
pub mod sessions;
mod sql_common;
mod sqlite;
pub mod stats;
mod stats_sql;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Opens the store named by `url` and runs its migrations.
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::connect(url).await?))
    } else if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url).await?))
    } else {
        Err(Error::BadRequest(format!(
            "unsupported database URL scheme in {:?}: use postgres:// or sqlite://",
            url.split(':').next().unwrap_or_default()
        )))
    }
}

/// A configuration change, committed atomically if the stored revision still equals
/// `expected_revision`; the new revision is `expected_revision + 1`.
#[derive(Debug, Clone)]
pub struct ConfigCommit {
    pub expected_revision: u64,
    /// Commit at this revision instead of `expected_revision + 1` (must be above it): to bring
    /// the revision above what an agent applied from a controller database later restored
    /// from a dump.
    pub revision_floor: Option<u64>,
    pub actor: String,
    pub summary: String,
    pub upserts: Vec<Resource>,
    pub deletes: Vec<ResourceKey>,
    /// Sites whose snapshot changed, each with its new snapshot (an `APPLY_CONFIG` payload
    /// stamped with the new revision) to enqueue for every active agent of the site.
    pub publish: Vec<(SiteCode, Vec<u8>)>,
    pub at: DateTime<Utc>,
}

impl ConfigCommit {
    /// The revision this commit creates.
    pub fn revision(&self) -> u64 {
        let next = self.expected_revision + 1;
        self.revision_floor.map_or(next, |f| f.max(next))
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct RevisionInfo {
    pub revision: u64,
    pub created_at: DateTime<Utc>,
    pub actor: String,
    pub summary: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ApiToken {
    pub id: String,
    pub name: String,
    pub role: Role,
    #[serde(skip)]
    pub token_hash: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct EnrollmentToken {
    pub id: String,
    #[schema(value_type = String)]
    pub site: SiteCode,
    #[serde(skip)]
    pub token_hash: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub used_at: Option<DateTime<Utc>>,
    pub used_by_agent: Option<String>,
}

/// An enrollment: consume `token_hash`, create `agent` for the token's site, enqueue
/// `initial_config` (built at `expected_revision`) as its first command.
#[derive(Debug, Clone)]
pub struct Enrollment {
    pub token_hash: String,
    pub agent_id: AgentId,
    pub credential_hash: String,
    pub hostname: String,
    pub version: String,
    pub expected_revision: u64,
    pub initial_config: Vec<u8>,
    /// Also request a bulk appointment sync for the new agent (its site takes appointments),
    /// so a new or replaced branch has today's and the coming days' appointments at once.
    pub sync_appointments: bool,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AgentRecord {
    pub id: AgentId,
    pub site: SiteCode,
    pub hostname: String,
    #[serde(skip)]
    pub credential_hash: String,
    pub enrolled_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub version: String,
    pub connected: bool,
    pub last_seen: Option<DateTime<Utc>>,
    pub config_revision: u64,
    pub acked_seq: u64,
    pub command_seq: u64,
    pub command_acked_seq: u64,
    pub command_error: Option<String>,
    pub outbox_pending: u64,
    pub clock_skew_ms: i64,
    pub store_error: Option<String>,
    /// The latest revision of the site's configuration (what `config_revision` should reach).
    pub site_revision: u64,
    /// Incidents of this agent no admin has acknowledged yet (see `sessions`).
    pub open_incidents: u64,
    /// The newest of them, as a sentence.
    pub incident: Option<String>,
}

/// What a session reports about its agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentStatusUpdate {
    pub connected: bool,
    pub last_seen: Option<DateTime<Utc>>,
    pub version: Option<String>,
    pub config_revision: Option<u64>,
    pub outbox_pending: Option<u64>,
    pub clock_skew_ms: Option<i64>,
    /// `Some("")` clears it.
    pub store_error: Option<String>,
}

/// An event as received from an agent, validated at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingEvent {
    pub seq: u64,
    pub kind: String,
    pub occurred_at: DateTime<Utc>,
    /// A JSON object, UTF-8 (for a quarantined event: whatever arrived, lossily decoded).
    pub payload: String,
    /// Why the edge refused the event's content: it is acknowledged like any other (so it never
    /// blocks the agent's stream) but kept in `quarantined_events` instead of `events`.
    pub quarantine: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredEvent {
    pub agent_id: String,
    pub seq: u64,
    pub site: String,
    pub kind: String,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub payload: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRecord {
    pub seq: u64,
    pub kind: String,
    pub payload: Vec<u8>,
    pub created_at: DateTime<Utc>,
    /// Random, fixed when logged (0 for commands logged before nonces existed).
    pub nonce: u64,
}

/// Why an event batch was refused (the agent resends from the acknowledged sequence).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    #[error("batch starts at {first} but only {acked} is stored: events are missing in between")]
    Gap { first: u64, acked: u64 },
    #[error("batch is not contiguous at sequence {0}")]
    NotContiguous(u64),
    #[error("unknown or revoked agent")]
    UnknownAgent,
}

#[async_trait]
pub trait Store:
    stats::StatsStore
    + appointments::AppointmentStore
    + appointment_sync::AppointmentSyncStore
    + requests::RequestStore
    + rollouts::RolloutStore
    + releases::ReleaseStore
    + sessions::SessionStore
    + console_sessions::ConsoleSessionStore
    + Send
    + Sync
    + 'static
{
    /// `postgres` or `sqlite`.
    fn backend(&self) -> &'static str;

    // --- configuration ---
    /// The current revision and every resource.
    async fn load_config(&self) -> Result<(u64, Vec<Resource>)>;
    /// The current revision alone (cheap: for caches of the configuration).
    async fn config_revision(&self) -> Result<u64>;
    /// Commits `commit`; `Error::RevisionConflict` when the revision moved meanwhile.
    async fn commit_config(&self, commit: ConfigCommit) -> Result<u64>;
    /// Newest first.
    async fn config_revisions(&self, limit: u32) -> Result<Vec<RevisionInfo>>;

    // --- admin API tokens ---
    async fn insert_api_token(&self, token: &ApiToken) -> Result<()>;
    async fn api_token_by_hash(&self, token_hash: &str) -> Result<Option<ApiToken>>;
    async fn list_api_tokens(&self) -> Result<Vec<ApiToken>>;
    async fn delete_api_token(&self, id: &str) -> Result<bool>;

    // --- enrollment ---
    async fn insert_enrollment_token(&self, token: &EnrollmentToken) -> Result<()>;
    async fn enrollment_token_by_hash(&self, token_hash: &str) -> Result<Option<EnrollmentToken>>;
    async fn list_enrollment_tokens(&self) -> Result<Vec<EnrollmentToken>>;
    /// Consumes the token and creates the agent; refuses unknown, expired or used tokens and
    /// `Error::RevisionConflict` when the configuration moved since `expected_revision`.
    async fn enroll(&self, enrollment: Enrollment) -> Result<AgentRecord>;

    // --- agents ---
    async fn agent(&self, id: AgentId) -> Result<Option<AgentRecord>>;
    async fn agent_by_credential(&self, credential_hash: &str) -> Result<Option<AgentRecord>>;
    async fn list_agents(&self) -> Result<Vec<AgentRecord>>;
    /// Returns false when the agent is unknown or already revoked.
    async fn revoke_agent(&self, id: AgentId, at: DateTime<Utc>) -> Result<bool>;
    async fn update_agent_status(&self, id: AgentId, status: &AgentStatusUpdate) -> Result<()>;

    // --- events ---
    /// Stores a contiguous batch idempotently and returns the new cumulative acknowledgement.
    async fn ingest_events(
        &self,
        agent: AgentId,
        events: &[IncomingEvent],
        received_at: DateTime<Utc>,
    ) -> Result<std::result::Result<u64, IngestError>>;
    async fn events_after(
        &self,
        agent: AgentId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>>;
    async fn count_events(&self, agent: AgentId) -> Result<u64>;

    // --- commands ---
    async fn commands_after(
        &self,
        agent: AgentId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<CommandRecord>>;
    /// Bumps `wake` whenever any controller replica commits new commands for every session or
    /// revokes an agent, and wakes the one agent in `agents` when a replica appended commands
    /// to that agent's log alone, until `shutdown`. PostgreSQL uses LISTEN/NOTIFY (the payload
    /// names the agent, or is empty); the single-replica SQLite store returns at once (its own
    /// replica wakes sessions directly). Sessions also poll as a fallback.
    async fn watch_commands(
        &self,
        wake: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
        agents: std::sync::Arc<crate::wake::AgentWakes>,
        shutdown: tokio_util::sync::CancellationToken,
    );

    /// Records a cumulative command acknowledgement (never moves backwards).
    async fn ack_commands(&self, agent: AgentId, up_to_seq: u64, error: Option<&str>)
    -> Result<()>;

    // --- maintenance (see `maintenance`) ---
    /// Creates the monthly time partitions for the month of `now` and the next two
    /// (PostgreSQL; SQLite is not partitioned). Idempotent, safe on several replicas at once;
    /// returns the partitions it created.
    async fn prepare_partitions(&self, now: DateTime<Utc>) -> Result<Vec<String>>;
    /// Removes raw events, facts and quarantined events older than `policy` allows at `now`
    /// (whole UTC months, `maintenance::cutoff`), never an event the statistics projector has
    /// not consumed yet. Rollups are kept.
    async fn apply_retention(
        &self,
        policy: &maintenance::RetentionPolicy,
        now: DateTime<Utc>,
    ) -> Result<maintenance::RetentionReport>;
}

pub(crate) fn enroll_error(e: EnrollError) -> Error {
    Error::Enrollment(e)
}
