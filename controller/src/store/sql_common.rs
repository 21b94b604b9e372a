//! The SQL both backends share, written once. `impl_store!` expands to the whole `Store`
//! implementation for a backend type; the backend supplies only what truly differs:
//! `tx()` (how a write transaction starts and locks), the `FOR UPDATE` suffix, and
//! `insert_events` (PostgreSQL inserts a batch with one `UNNEST`, SQLite row by row), and
//! maintenance (`prepare_partitions_impl`, `apply_retention_impl`: PostgreSQL partitions by
//! month, SQLite is not partitioned).

use chrono::{DateTime, Utc};
use meridian_shared::{AgentId, SiteCode};

use super::{AgentRecord, ApiToken, CommandRecord, EnrollmentToken, Role, StoredEvent};
use crate::error::{Error, Result};

/// The agent columns (with the site's newest revision) for `concat!`-built queries.
macro_rules! agent_select {
    () => {
        "SELECT a.id, a.site, a.hostname, a.credential_hash, \
         a.enrolled_at, a.revoked_at, a.version, a.connected, a.last_seen, a.config_revision, \
         a.acked_seq, a.command_seq, a.command_acked_seq, a.command_error, a.outbox_pending, \
         a.clock_skew_ms, a.store_error, COALESCE(sr.revision, 0) AS site_revision, \
         (SELECT COUNT(*) FROM agent_incidents i \
          WHERE i.agent_id = a.id AND i.acknowledged_at IS NULL) AS open_incidents, \
         (SELECT i.summary FROM agent_incidents i WHERE i.agent_id = a.id \
          AND i.acknowledged_at IS NULL \
          ORDER BY CASE WHEN i.kind = 'event_gap' THEN 0 ELSE 1 END, i.occurred_at DESC, i.id DESC \
          LIMIT 1) AS incident \
         FROM agents a LEFT JOIN site_revisions sr ON sr.site = a.site"
    };
}
pub(crate) use agent_select;

#[derive(sqlx::FromRow)]
pub(super) struct AgentRow {
    id: String,
    site: String,
    hostname: String,
    credential_hash: String,
    enrolled_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
    version: String,
    connected: bool,
    last_seen: Option<DateTime<Utc>>,
    config_revision: i64,
    acked_seq: i64,
    command_seq: i64,
    command_acked_seq: i64,
    command_error: Option<String>,
    outbox_pending: i64,
    clock_skew_ms: i64,
    store_error: Option<String>,
    site_revision: i64,
    open_incidents: i64,
    incident: Option<String>,
}

impl TryFrom<AgentRow> for AgentRecord {
    type Error = Error;
    fn try_from(r: AgentRow) -> Result<Self> {
        Ok(AgentRecord {
            id: r.id.parse().map_err(|_| corrupt("agents.id", &r.id))?,
            site: SiteCode::parse(&r.site).map_err(|_| corrupt("agents.site", &r.site))?,
            hostname: r.hostname,
            credential_hash: r.credential_hash,
            enrolled_at: r.enrolled_at,
            revoked_at: r.revoked_at,
            version: r.version,
            connected: r.connected,
            last_seen: r.last_seen,
            config_revision: r.config_revision as u64,
            acked_seq: r.acked_seq as u64,
            command_seq: r.command_seq as u64,
            command_acked_seq: r.command_acked_seq as u64,
            command_error: r.command_error,
            outbox_pending: r.outbox_pending as u64,
            clock_skew_ms: r.clock_skew_ms,
            store_error: r.store_error,
            site_revision: r.site_revision as u64,
            open_incidents: r.open_incidents.max(0) as u64,
            incident: r.incident,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct ApiTokenRow {
    id: String,
    name: String,
    role: String,
    token_hash: String,
    created_at: DateTime<Utc>,
}

impl TryFrom<ApiTokenRow> for ApiToken {
    type Error = Error;
    fn try_from(r: ApiTokenRow) -> Result<Self> {
        Ok(ApiToken {
            role: Role::parse(&r.role).ok_or_else(|| corrupt("api_tokens.role", &r.role))?,
            id: r.id,
            name: r.name,
            token_hash: r.token_hash,
            created_at: r.created_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct EnrollmentTokenRow {
    id: String,
    site: String,
    token_hash: String,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    used_at: Option<DateTime<Utc>>,
    used_by_agent: Option<String>,
}

impl TryFrom<EnrollmentTokenRow> for EnrollmentToken {
    type Error = Error;
    fn try_from(r: EnrollmentTokenRow) -> Result<Self> {
        Ok(EnrollmentToken {
            site: SiteCode::parse(&r.site)
                .map_err(|_| corrupt("enrollment_tokens.site", &r.site))?,
            id: r.id,
            token_hash: r.token_hash,
            created_at: r.created_at,
            expires_at: r.expires_at,
            used_at: r.used_at,
            used_by_agent: r.used_by_agent,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct EventRow {
    agent_id: String,
    seq: i64,
    site: String,
    kind: String,
    occurred_at: DateTime<Utc>,
    received_at: DateTime<Utc>,
    payload: String,
}

impl EventRow {
    pub(super) fn seq(&self) -> i64 {
        self.seq
    }

    pub(super) fn into_parts(self) -> EventParts {
        EventParts {
            seq: self.seq,
            site: self.site,
            kind: self.kind,
            occurred_at: self.occurred_at,
            received_at: self.received_at,
            payload: self.payload,
        }
    }
}

/// A stored event's columns, for the statistics projector.
pub struct EventParts {
    pub seq: i64,
    pub site: String,
    pub kind: String,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub payload: String,
}

impl TryFrom<EventRow> for StoredEvent {
    type Error = Error;
    fn try_from(r: EventRow) -> Result<Self> {
        Ok(StoredEvent {
            payload: serde_json::from_str(&r.payload)
                .map_err(|_| corrupt("events.payload", &r.payload))?,
            agent_id: r.agent_id,
            seq: r.seq as u64,
            site: r.site,
            kind: r.kind,
            occurred_at: r.occurred_at,
            received_at: r.received_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct CommandRow {
    seq: i64,
    kind: String,
    payload: String,
    created_at: DateTime<Utc>,
    nonce: i64,
}

impl From<CommandRow> for CommandRecord {
    fn from(r: CommandRow) -> Self {
        CommandRecord {
            seq: r.seq as u64,
            kind: r.kind,
            payload: r.payload.into_bytes(),
            created_at: r.created_at,
            nonce: r.nonce as u64,
        }
    }
}

fn corrupt(what: &str, value: &str) -> Error {
    Error::Internal(format!(
        "corrupt value in {what}: {:?}",
        value.chars().take(40).collect::<String>()
    ))
}

pub(super) fn agent_key(id: AgentId) -> String {
    id.to_string()
}

/// Expands to `#[async_trait] impl Store for $ty`, with the SQL shared by both backends.
macro_rules! impl_store {
    ($ty:ty, backend = $backend:literal, lock = $lock:literal) => {
        $crate::store::stats_sql::impl_stats_store!($ty);
        $crate::store::appointments::impl_appointment_store!($ty);
        $crate::store::appointment_sync::impl_appointment_sync_store!($ty, lock = $lock);
        $crate::store::requests::impl_request_store!($ty, lock = $lock);
        $crate::store::rollouts::impl_rollout_store!($ty, lock = $lock);
        $crate::store::releases::impl_release_store!($ty, lock = $lock);
        $crate::store::sessions::impl_session_store!($ty);
        $crate::store::console_sessions::impl_console_session_store!($ty);

        impl $ty {
            /// Appends a command to an agent's log inside `tx`; returns its sequence.
            async fn enqueue_command(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                agent_id: &str,
                kind: &str,
                payload: &[u8],
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<u64> {
                let seq: i64 = sqlx::query_scalar(
                    "UPDATE agents SET command_seq = command_seq + 1 WHERE id = $1 RETURNING command_seq",
                )
                .bind(agent_id)
                .fetch_one(&mut **tx)
                .await?;
                sqlx::query(
                    "INSERT INTO agent_commands (agent_id, seq, kind, payload, created_at, nonce) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(agent_id)
                .bind(seq)
                .bind(kind)
                .bind(String::from_utf8_lossy(payload).into_owned())
                .bind(at)
                .bind(meridian_shared::lineage::new_nonce() as i64)
                .execute(&mut **tx)
                .await?;
                Self::notify_commands(tx).await?;
                Ok(seq as u64)
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::Store for $ty {
            fn backend(&self) -> &'static str {
                $backend
            }

            async fn config_revision(&self) -> $crate::error::Result<u64> {
                let revision: i64 =
                    sqlx::query_scalar("SELECT revision FROM config_state WHERE id = 1")
                        .fetch_one(&self.pool)
                        .await?;
                Ok(revision.max(0) as u64)
            }

            async fn load_config(
                &self,
            ) -> $crate::error::Result<(u64, Vec<meridian_shared::config::Resource>)> {
                let mut tx = self.tx().await?;
                let revision: i64 =
                    sqlx::query_scalar("SELECT revision FROM config_state WHERE id = 1")
                        .fetch_one(&mut *tx)
                        .await?;
                let bodies: Vec<(String,)> = sqlx::query_as(
                    "SELECT body FROM config_resources ORDER BY kind, site, code",
                )
                .fetch_all(&mut *tx)
                .await?;
                tx.commit().await?;
                let resources = bodies
                    .into_iter()
                    .map(|(b,)| {
                        serde_json::from_str(&b).map_err(|e| {
                            $crate::error::Error::Internal(format!("corrupt configuration resource: {e}"))
                        })
                    })
                    .collect::<$crate::error::Result<Vec<_>>>()?;
                Ok((revision as u64, resources))
            }

            async fn commit_config(
                &self,
                commit: $crate::store::ConfigCommit,
            ) -> $crate::error::Result<u64> {
                let mut tx = self.tx().await?;
                let current: i64 = sqlx::query_scalar(concat!(
                    "SELECT revision FROM config_state WHERE id = 1",
                    $lock
                ))
                .fetch_one(&mut *tx)
                .await?;
                if current as u64 != commit.expected_revision {
                    return Err($crate::error::Error::RevisionConflict);
                }
                let revision = commit.revision() as i64;
                for res in &commit.upserts {
                    let key = res.key();
                    let body = serde_json::to_string(res)
                        .map_err(|e| $crate::error::Error::Internal(e.to_string()))?;
                    sqlx::query(
                        "INSERT INTO config_resources (kind, site, code, body, updated_revision) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (kind, site, code) \
                         DO UPDATE SET body = excluded.body, updated_revision = excluded.updated_revision",
                    )
                    .bind(key.kind.as_str())
                    .bind(key.site.as_ref().map(|s| s.to_string()).unwrap_or_default())
                    .bind(&key.code)
                    .bind(body)
                    .bind(revision)
                    .execute(&mut *tx)
                    .await?;
                }
                for key in &commit.deletes {
                    sqlx::query("DELETE FROM config_resources WHERE kind = $1 AND site = $2 AND code = $3")
                        .bind(key.kind.as_str())
                        .bind(key.site.as_ref().map(|s| s.to_string()).unwrap_or_default())
                        .bind(&key.code)
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query("UPDATE config_state SET revision = $1 WHERE id = 1")
                    .bind(revision)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO config_revisions (revision, created_at, actor, summary) VALUES ($1, $2, $3, $4)",
                )
                .bind(revision)
                .bind(commit.at)
                .bind(&commit.actor)
                .bind(&commit.summary)
                .execute(&mut *tx)
                .await?;
                for (site, payload) in &commit.publish {
                    sqlx::query(
                        "INSERT INTO site_revisions (site, revision) VALUES ($1, $2) \
                         ON CONFLICT (site) DO UPDATE SET revision = excluded.revision",
                    )
                    .bind(site.as_str())
                    .bind(revision)
                    .execute(&mut *tx)
                    .await?;
                    let agents: Vec<(String,)> = sqlx::query_as(
                        "SELECT id FROM agents WHERE site = $1 AND revoked_at IS NULL ORDER BY id",
                    )
                    .bind(site.as_str())
                    .fetch_all(&mut *tx)
                    .await?;
                    for (agent_id,) in agents {
                        Self::enqueue_command(
                            &mut tx,
                            &agent_id,
                            meridian_shared::commands::APPLY_CONFIG,
                            payload,
                            commit.at,
                        )
                        .await?;
                    }
                }
                tx.commit().await?;
                Ok(revision as u64)
            }

            async fn config_revisions(
                &self,
                limit: u32,
            ) -> $crate::error::Result<Vec<$crate::store::RevisionInfo>> {
                let rows: Vec<(i64, chrono::DateTime<chrono::Utc>, String, String)> = sqlx::query_as(
                    "SELECT revision, created_at, actor, summary FROM config_revisions ORDER BY revision DESC LIMIT $1",
                )
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|(revision, created_at, actor, summary)| $crate::store::RevisionInfo {
                        revision: revision as u64,
                        created_at,
                        actor,
                        summary,
                    })
                    .collect())
            }

            async fn insert_api_token(
                &self,
                t: &$crate::store::ApiToken,
            ) -> $crate::error::Result<()> {
                sqlx::query(
                    "INSERT INTO api_tokens (id, name, role, token_hash, created_at) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&t.id)
                .bind(&t.name)
                .bind(t.role.as_str())
                .bind(&t.token_hash)
                .bind(t.created_at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn api_token_by_hash(
                &self,
                token_hash: &str,
            ) -> $crate::error::Result<Option<$crate::store::ApiToken>> {
                let row: Option<$crate::store::sql_common::ApiTokenRow> = sqlx::query_as(
                    "SELECT id, name, role, token_hash, created_at FROM api_tokens WHERE token_hash = $1",
                )
                .bind(token_hash)
                .fetch_optional(&self.pool)
                .await?;
                row.map(TryInto::try_into).transpose()
            }

            async fn list_api_tokens(&self) -> $crate::error::Result<Vec<$crate::store::ApiToken>> {
                let rows: Vec<$crate::store::sql_common::ApiTokenRow> = sqlx::query_as(
                    "SELECT id, name, role, token_hash, created_at FROM api_tokens ORDER BY created_at, id",
                )
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            async fn delete_api_token(&self, id: &str) -> $crate::error::Result<bool> {
                let done = sqlx::query("DELETE FROM api_tokens WHERE id = $1")
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn insert_enrollment_token(
                &self,
                t: &$crate::store::EnrollmentToken,
            ) -> $crate::error::Result<()> {
                sqlx::query(
                    "INSERT INTO enrollment_tokens (id, site, token_hash, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&t.id)
                .bind(t.site.as_str())
                .bind(&t.token_hash)
                .bind(t.created_at)
                .bind(t.expires_at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn enrollment_token_by_hash(
                &self,
                token_hash: &str,
            ) -> $crate::error::Result<Option<$crate::store::EnrollmentToken>> {
                let row: Option<$crate::store::sql_common::EnrollmentTokenRow> = sqlx::query_as(
                    "SELECT id, site, token_hash, created_at, expires_at, used_at, used_by_agent \
                     FROM enrollment_tokens WHERE token_hash = $1",
                )
                .bind(token_hash)
                .fetch_optional(&self.pool)
                .await?;
                row.map(TryInto::try_into).transpose()
            }

            async fn list_enrollment_tokens(
                &self,
            ) -> $crate::error::Result<Vec<$crate::store::EnrollmentToken>> {
                let rows: Vec<$crate::store::sql_common::EnrollmentTokenRow> = sqlx::query_as(
                    "SELECT id, site, token_hash, created_at, expires_at, used_at, used_by_agent \
                     FROM enrollment_tokens ORDER BY created_at, id",
                )
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            async fn enroll(
                &self,
                e: $crate::store::Enrollment,
            ) -> $crate::error::Result<$crate::store::AgentRecord> {
                use $crate::error::EnrollError;
                let mut tx = self.tx().await?;
                let token: Option<$crate::store::sql_common::EnrollmentTokenRow> =
                    sqlx::query_as(concat!(
                        "SELECT id, site, token_hash, created_at, expires_at, used_at, used_by_agent \
                         FROM enrollment_tokens WHERE token_hash = $1",
                        $lock
                    ))
                    .bind(&e.token_hash)
                    .fetch_optional(&mut *tx)
                    .await?;
                let token: $crate::store::EnrollmentToken = match token {
                    Some(t) => t.try_into()?,
                    None => return Err($crate::store::enroll_error(EnrollError::Unknown)),
                };
                if token.used_at.is_some() {
                    return Err($crate::store::enroll_error(EnrollError::AlreadyUsed));
                }
                if token.expires_at <= e.at {
                    return Err($crate::store::enroll_error(EnrollError::Expired));
                }
                let current: i64 = sqlx::query_scalar(concat!(
                    "SELECT revision FROM config_state WHERE id = 1",
                    $lock
                ))
                .fetch_one(&mut *tx)
                .await?;
                if current as u64 != e.expected_revision {
                    return Err($crate::error::Error::RevisionConflict);
                }
                let agent_id = $crate::store::sql_common::agent_key(e.agent_id);
                sqlx::query("UPDATE agents SET revoked_at = $1, connected = FALSE WHERE site = $2 AND revoked_at IS NULL")
                    .bind(e.at)
                    .bind(token.site.as_str())
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO agents (id, site, hostname, credential_hash, enrolled_at, version) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&agent_id)
                .bind(token.site.as_str())
                .bind(&e.hostname)
                .bind(&e.credential_hash)
                .bind(e.at)
                .bind(&e.version)
                .execute(&mut *tx)
                .await?;
                sqlx::query("UPDATE enrollment_tokens SET used_at = $1, used_by_agent = $2 WHERE id = $3")
                    .bind(e.at)
                    .bind(&agent_id)
                    .bind(&token.id)
                    .execute(&mut *tx)
                    .await?;
                Self::enqueue_command(
                    &mut tx,
                    &agent_id,
                    meridian_shared::commands::APPLY_CONFIG,
                    &e.initial_config,
                    e.at,
                )
                .await?;
                // The revoked agents' unfinished syncs can never complete.
                let stale: Vec<(String,)> = sqlx::query_as(
                    "SELECT id FROM appointment_syncs WHERE site = $1 AND agent_id <> $2 \
                     AND state IN ('requested', 'sending')",
                )
                .bind(token.site.as_str())
                .bind(&agent_id)
                .fetch_all(&mut *tx)
                .await?;
                for (sync,) in stale {
                    sqlx::query("UPDATE appointment_syncs SET state = 'superseded', finished_at = $2, \
                                 error = 'the agent was replaced' WHERE id = $1")
                        .bind(&sync)
                        .bind(e.at)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("DELETE FROM appointment_sync_chunks WHERE sync_id = $1")
                        .bind(&sync)
                        .execute(&mut *tx)
                        .await?;
                }
                if e.sync_appointments {
                    Self::request_syncs_in(&mut tx, token.site.as_str(), "enrollment", e.at).await?;
                }
                let row: $crate::store::sql_common::AgentRow = sqlx::query_as(concat!($crate::store::sql_common::agent_select!(), " WHERE a.id = $1"))
                .bind(&agent_id)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                row.try_into()
            }

            async fn agent(
                &self,
                id: meridian_shared::AgentId,
            ) -> $crate::error::Result<Option<$crate::store::AgentRecord>> {
                let row: Option<$crate::store::sql_common::AgentRow> = sqlx::query_as(concat!($crate::store::sql_common::agent_select!(), " WHERE a.id = $1"))
                .bind($crate::store::sql_common::agent_key(id))
                .fetch_optional(&self.pool)
                .await?;
                row.map(TryInto::try_into).transpose()
            }

            async fn agent_by_credential(
                &self,
                credential_hash: &str,
            ) -> $crate::error::Result<Option<$crate::store::AgentRecord>> {
                let row: Option<$crate::store::sql_common::AgentRow> = sqlx::query_as(concat!($crate::store::sql_common::agent_select!(), " WHERE a.credential_hash = $1"))
                .bind(credential_hash)
                .fetch_optional(&self.pool)
                .await?;
                row.map(TryInto::try_into).transpose()
            }

            async fn list_agents(&self) -> $crate::error::Result<Vec<$crate::store::AgentRecord>> {
                let rows: Vec<$crate::store::sql_common::AgentRow> = sqlx::query_as(concat!($crate::store::sql_common::agent_select!(), " ORDER BY a.site, a.enrolled_at, a.id"))
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            async fn revoke_agent(
                &self,
                id: meridian_shared::AgentId,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<bool> {
                let done = sqlx::query(
                    "UPDATE agents SET revoked_at = $1, connected = FALSE WHERE id = $2 AND revoked_at IS NULL",
                )
                .bind(at)
                .bind($crate::store::sql_common::agent_key(id))
                .execute(&self.pool)
                .await?;
                if done.rows_affected() > 0 {
                    let mut tx = self.tx().await?;
                    Self::notify_commands(&mut tx).await?;
                    tx.commit().await?;
                }
                Ok(done.rows_affected() > 0)
            }

            async fn watch_commands(
                &self,
                wake: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
                agents: std::sync::Arc<$crate::wake::AgentWakes>,
                shutdown: tokio_util::sync::CancellationToken,
            ) {
                self.watch_commands_impl(wake, agents, shutdown).await
            }

            async fn prepare_partitions(
                &self,
                now: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<Vec<String>> {
                self.prepare_partitions_impl(now).await
            }

            async fn apply_retention(
                &self,
                policy: &$crate::store::maintenance::RetentionPolicy,
                now: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<$crate::store::maintenance::RetentionReport> {
                self.apply_retention_impl(policy, now).await
            }

            async fn update_agent_status(
                &self,
                id: meridian_shared::AgentId,
                s: &$crate::store::AgentStatusUpdate,
            ) -> $crate::error::Result<()> {
                sqlx::query(
                    "UPDATE agents SET connected = $2, last_seen = COALESCE($3, last_seen), \
                     version = COALESCE($4, version), config_revision = COALESCE($5, config_revision), \
                     outbox_pending = COALESCE($6, outbox_pending), clock_skew_ms = COALESCE($7, clock_skew_ms), \
                     store_error = CASE WHEN $8 IS NULL THEN store_error WHEN $8 = '' THEN NULL ELSE $8 END \
                     WHERE id = $1",
                )
                .bind($crate::store::sql_common::agent_key(id))
                .bind(s.connected)
                .bind(s.last_seen)
                .bind(s.version.as_deref())
                .bind(s.config_revision.map(|r| r as i64))
                .bind(s.outbox_pending.map(|r| r as i64))
                .bind(s.clock_skew_ms)
                .bind(s.store_error.as_deref())
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn ingest_events(
                &self,
                agent: meridian_shared::AgentId,
                events: &[$crate::store::IncomingEvent],
                received_at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<Result<u64, $crate::store::IngestError>> {
                use $crate::store::IngestError;
                let agent_id = $crate::store::sql_common::agent_key(agent);
                let mut tx = self.tx().await?;
                let appointment_events =
                    $crate::store::appointments::has_appointment_events(events);
                if appointment_events {
                    // Appointment events change appointments: take the site's booking lock
                    // before the agent's row, in the order booking changes take them (booking
                    // lock, then agents through `enqueue_command`), so the two never deadlock
                    // and a cancel or reschedule sees the attendance committed before it.
                    let site: Option<String> =
                        sqlx::query_scalar("SELECT site FROM agents WHERE id = $1")
                            .bind(&agent_id)
                            .fetch_optional(&mut *tx)
                            .await?;
                    if let Some(site) = site {
                        sqlx::query(<$ty as $crate::store::sql_common::Backend>::BOOKING_LOCK)
                            .bind(&site)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                // One ingest per agent at a time; the agent's row itself is only written by the
                // last statement, so flushes of commands to this agent do not wait for the batch.
                sqlx::query(<$ty as $crate::store::sql_common::Backend>::INGEST_LOCK)
                    .bind(&agent_id)
                    .execute(&mut *tx)
                    .await?;
                let row: Option<(i64, String, Option<chrono::DateTime<chrono::Utc>>)> =
                    sqlx::query_as("SELECT acked_seq, site, revoked_at FROM agents WHERE id = $1")
                        .bind(&agent_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                let (acked, site) = match row {
                    Some((acked, site, None)) => (acked as u64, site),
                    _ => return Ok(Err(IngestError::UnknownAgent)),
                };
                let Some(first) = events.first() else {
                    return Ok(Ok(acked));
                };
                let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
                if meridian_shared::lineage::out_of_place(acked, &seqs, &[]).is_some() {
                    // Only a recorded gap (events the controller will never have) may be
                    // stepped over.
                    let gaps: Vec<(i64, i64)> = sqlx::query_as(
                        "SELECT gap_first, gap_last FROM agent_incidents WHERE agent_id = $1 \
                         AND kind = 'event_gap' AND gap_last > $2",
                    )
                    .bind(&agent_id)
                    .bind(acked as i64)
                    .fetch_all(&mut *tx)
                    .await?;
                    let gaps: Vec<meridian_shared::lineage::Gap> = gaps
                        .into_iter()
                        .map(|(f, l)| meridian_shared::lineage::Gap { first: f as u64, last: l as u64 })
                        .collect();
                    if let Some(seq) = meridian_shared::lineage::out_of_place(acked, &seqs, &gaps) {
                        return Ok(Err(if seq == first.seq {
                            IngestError::Gap { first: first.seq, acked }
                        } else {
                            IngestError::NotContiguous(seq)
                        }));
                    }
                }
                let fresh: Vec<&$crate::store::IncomingEvent> =
                    events.iter().filter(|e| e.seq > acked).collect();
                let Some(last) = fresh.last() else {
                    return Ok(Ok(acked));
                };
                let new_acked = last.seq;
                let (refused, fresh): (Vec<_>, Vec<_>) =
                    fresh.into_iter().partition(|e| e.quarantine.is_some());
                if !fresh.is_empty() {
                    Self::insert_events(&mut tx, &agent_id, &site, &fresh, received_at).await?;
                    if appointment_events {
                        Self::apply_appointment_events(&mut tx, &site, &fresh).await?;
                    }
                    Self::apply_sync_reports(&mut tx, &agent_id, &fresh).await?;
                    Self::apply_request_events(&mut tx, &agent_id, &site, &fresh, received_at).await?;
                    Self::apply_upgrade_reports(&mut tx, &agent_id, &site, &fresh, received_at).await?;
                    for i in $crate::store::sessions::sign_in_lock_incidents(&agent_id, &site, &fresh) {
                        sqlx::query(
                            "INSERT INTO agent_incidents (id, agent_id, site, kind, summary, occurred_at) \
                             VALUES ($1, $2, $3, $4, $5, $6)",
                        )
                        .bind(&i.id)
                        .bind(&i.agent_id)
                        .bind(&i.site)
                        .bind(i.kind.as_str())
                        .bind(&i.summary)
                        .bind(i.occurred_at)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                let mut rows = $crate::store::stats_sql::Rows::new(&$crate::store::stats_sql::QUARANTINE);
                for e in &refused {
                    let q = $crate::stats::facts::Quarantined {
                        agent_id: agent_id.clone(),
                        seq: e.seq,
                        site: site.clone(),
                        kind: e.kind.clone(),
                        reason: e.quarantine.clone().unwrap_or_default(),
                    };
                    rows.push(&$crate::store::stats_sql::quarantine_cells(&q, "ingest", &e.payload, Some(e.occurred_at), received_at))?;
                }
                Self::write_rows(&mut tx, &rows, $crate::store::stats_sql::Write::Upsert).await?;
                // Revoked meanwhile (this transaction does not hold the row): nothing is kept.
                let moved = sqlx::query(
                    "UPDATE agents SET acked_seq = $2 WHERE id = $1 AND revoked_at IS NULL",
                )
                .bind(&agent_id)
                .bind(new_acked as i64)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if moved == 0 {
                    return Ok(Err(IngestError::UnknownAgent));
                }
                tx.commit().await?;
                Ok(Ok(new_acked))
            }

            async fn events_after(
                &self,
                agent: meridian_shared::AgentId,
                after_seq: u64,
                limit: u32,
            ) -> $crate::error::Result<Vec<$crate::store::StoredEvent>> {
                let rows: Vec<$crate::store::sql_common::EventRow> = sqlx::query_as(
                    "SELECT agent_id, seq, site, kind, occurred_at, received_at, CAST(payload AS TEXT) AS payload \
                     FROM events WHERE agent_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                )
                .bind($crate::store::sql_common::agent_key(agent))
                .bind(after_seq as i64)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            async fn count_events(&self, agent: meridian_shared::AgentId) -> $crate::error::Result<u64> {
                let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE agent_id = $1")
                    .bind($crate::store::sql_common::agent_key(agent))
                    .fetch_one(&self.pool)
                    .await?;
                Ok(n as u64)
            }

            async fn commands_after(
                &self,
                agent: meridian_shared::AgentId,
                after_seq: u64,
                limit: u32,
            ) -> $crate::error::Result<Vec<$crate::store::CommandRecord>> {
                let rows: Vec<$crate::store::sql_common::CommandRow> = sqlx::query_as(
                    "SELECT seq, kind, payload, created_at, nonce FROM agent_commands \
                     WHERE agent_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                )
                .bind($crate::store::sql_common::agent_key(agent))
                .bind(after_seq as i64)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            async fn ack_commands(
                &self,
                agent: meridian_shared::AgentId,
                up_to_seq: u64,
                error: Option<&str>,
            ) -> $crate::error::Result<()> {
                sqlx::query(
                    "UPDATE agents SET command_acked_seq = $2, command_error = $3 \
                     WHERE id = $1 AND command_acked_seq <= $2 AND $2 <= command_seq",
                )
                .bind($crate::store::sql_common::agent_key(agent))
                .bind(up_to_seq as i64)
                .bind(error)
                .execute(&self.pool)
                .await?;
                Ok(())
            }
        }
    };
}

pub(crate) use impl_store;

/// A statement being built for backend `DB`.
pub type Query<'q, DB> = sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments>;

/// What differs between the backends' SQL: the sqlx database type, how a list of ids or a batch
/// of rows is bound (PostgreSQL: arrays; SQLite: JSON), and how a refresher takes a per-site lock.
pub trait Backend {
    type Db: sqlx::Database;
    /// A list of ids bound as one parameter (see `in_ids`).
    type Ids: for<'e> sqlx::Encode<'e, Self::Db> + sqlx::Type<Self::Db> + Send;
    /// A predicate: `column` is one of the ids bound as `$1` (written so the planner uses the
    /// column's index).
    fn in_ids(column: &str) -> String;
    /// `ids` as the parameter `in_ids` expects.
    fn ids(ids: &[&str]) -> Self::Ids;
    /// Appended to a `SELECT … FOR` a row this transaction will change: lock it, or skip it when
    /// another transaction holds it (empty where writers are serialized anyway).
    const LOCK_OR_SKIP: &'static str;
    /// Takes a transaction-scoped lock named by `$1` (a no-op where writers are serialized).
    const SITE_LOCK: &'static str;
    /// Takes the transaction-scoped lock under which site `$1`'s appointments are booked,
    /// rescheduled and cancelled (a no-op where writers are serialized).
    const BOOKING_LOCK: &'static str;
    /// Returns whether this transaction may run the nightly sync scheduler's tick now (one
    /// replica at a time; the others skip their tick).
    const SCHEDULE_LOCK: &'static str;
    /// Returns whether this transaction may sweep the request ledger now (one replica at a
    /// time; the others skip their tick).
    const LEDGER_LOCK: &'static str;
    /// Returns whether this transaction may drive the rollouts now (one replica at a time;
    /// the others skip their tick).
    const ROLLOUT_LOCK: &'static str;
    /// Returns whether this transaction may move agent `$1`'s staged commands (one flusher per
    /// agent at a time; another that finds it taken leaves the rows to the holder, which looks
    /// again after its commit).
    const FLUSH_LOCK: &'static str;
    /// Takes the transaction-scoped lock under which agent `$1`'s events are ingested (one
    /// ingest per agent at a time, without holding the agent's row: the command log's head on
    /// that row stays free for other agents' flushes while the batch is applied). A no-op where
    /// writers are serialized.
    const INGEST_LOCK: &'static str;
    /// `INSERT` into `table` of the rows `bind_rows` binds, meeting stored rows as `write` says.
    fn insert_rows(table: &super::stats_sql::Table, write: super::stats_sql::Write) -> String;
    /// Binds `rows` to a statement from `insert_rows`.
    fn bind_rows<'q>(
        query: Query<'q, Self::Db>,
        rows: &super::stats_sql::Rows,
    ) -> Query<'q, Self::Db>;
}
