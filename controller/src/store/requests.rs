//! The distributed-request ledger: every cross-site operation with its state, who
//! holds each request's master, which sites hold read-only copies. Written once for both
//! backends (`impl_request_store!`), like the rest of the store.
//!
//! Events from agents are applied in their ingest transaction (`apply_request_events`), so
//! each is applied exactly once. Commands the ledger decides for agents are *staged* in that
//! transaction and moved into the agents' command logs right after its commit
//! (`flush_request_commands`, one agent per transaction): an ingest then never locks another
//! agent's row, and two agents' ingests cannot deadlock on each other.
//!
//! **Invariants.** A request's owner row names its master site, or no site while exactly one
//! operation (`in_flight_op`) moves it, or no site once deleted. The ownership leaves a site
//! only by that site's own `REQUEST_OPERATION`, and comes back to it only in the transaction
//! that fails, times out or cancels that operation (which sends it `REQUEST_RESULT`); it
//! reaches the target only in the transaction that ingests the target's staged outcome
//! (which sends `REQUEST_COMMIT`). An operation id is recorded once: a replayed or forged
//! operation is refused, shown in the ledger with the reason, and moves nothing.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::{Error, Result};

/// Open statuses (the operation still has work to do).
pub const OPEN: [&str; 3] = ["queued", "pending", "retry"];

/// One operation towards one target site, as the ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct LedgerOp {
    pub op_id: uuid::Uuid,
    pub target_site: String,
    pub kind: String,
    pub mode: Option<String>,
    /// `site` (a site asked) or `controller` (updates and deletes the ledger sends to copies).
    pub origin: String,
    pub request_id: String,
    pub human_id: String,
    pub source_site: String,
    pub pool: String,
    pub mapping: Option<String>,
    pub rule: Option<String>,
    pub update_policy: String,
    pub keep_copy: bool,
    /// queued, pending, retry, applied, failed, superseded.
    pub status: String,
    /// For failed operations: failure, timeout or cancelled.
    pub result: Option<String>,
    pub reason: Option<String>,
    pub attempt: u32,
    pub agent_id: Option<String>,
    pub command_seq: Option<u64>,
    /// Whether the target's agent acknowledged the current attempt's command.
    pub delivered: bool,
    pub target_request_id: Option<String>,
    pub requested_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    /// The `REQUEST_APPLY` the ledger (re)sends.
    #[serde(skip)]
    pub(crate) payload: String,
}

#[derive(sqlx::FromRow)]
pub(crate) struct LedgerRow {
    op_id: String,
    target_site: String,
    kind: String,
    mode: Option<String>,
    origin: String,
    request_id: String,
    human_id: String,
    source_site: String,
    pool: String,
    mapping: Option<String>,
    rule: Option<String>,
    update_policy: String,
    keep_copy: bool,
    status: String,
    result: Option<String>,
    reason: Option<String>,
    attempt: i32,
    agent_id: Option<String>,
    command_seq: Option<i64>,
    delivered: bool,
    target_request_id: Option<String>,
    requested_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    next_attempt_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    payload: String,
}

macro_rules! ledger_select {
    () => {
        "SELECT o.op_id, o.target_site, o.kind, o.mode, o.origin, o.request_id, o.human_id, \
         o.source_site, o.pool, o.mapping, o.rule, o.update_policy, o.keep_copy, o.status, \
         o.result, o.reason, o.attempt, o.agent_id, o.command_seq, \
         (o.command_seq IS NOT NULL AND COALESCE(a.command_acked_seq, 0) >= o.command_seq) AS delivered, \
         o.target_request_id, o.requested_at, o.created_at, o.updated_at, o.next_attempt_at, \
         o.completed_at, o.payload FROM request_ops o LEFT JOIN agents a ON a.id = o.agent_id"
    };
}
pub(crate) use ledger_select;

impl TryFrom<LedgerRow> for LedgerOp {
    type Error = Error;
    fn try_from(r: LedgerRow) -> Result<Self> {
        Ok(LedgerOp {
            op_id: r.op_id.parse().map_err(|_| {
                Error::Internal(format!("corrupt value in request_ops.op_id: {:?}", r.op_id))
            })?,
            target_site: r.target_site,
            kind: r.kind,
            mode: r.mode,
            origin: r.origin,
            request_id: r.request_id,
            human_id: r.human_id,
            source_site: r.source_site,
            pool: r.pool,
            mapping: r.mapping,
            rule: r.rule,
            update_policy: r.update_policy,
            keep_copy: r.keep_copy,
            status: r.status,
            result: r.result,
            reason: r.reason,
            attempt: r.attempt.max(0) as u32,
            agent_id: r.agent_id,
            command_seq: r.command_seq.map(|s| s.max(0) as u64),
            delivered: r.delivered,
            target_request_id: r.target_request_id,
            requested_at: r.requested_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
            next_attempt_at: r.next_attempt_at,
            completed_at: r.completed_at,
            payload: r.payload,
        })
    }
}

/// Which operations to list.
#[derive(Debug, Clone, Default)]
pub struct OpsFilter {
    /// A status, or `open` for queued, pending and retry.
    pub status: Option<String>,
    /// Source or target site.
    pub site: Option<String>,
    pub pool: Option<String>,
    /// A request id or human id.
    pub request: Option<String>,
    pub limit: u32,
}

/// Who holds a request, as the ledger knows it (the repair view).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ownership {
    pub request_id: String,
    pub human_id: String,
    pub request_type: String,
    /// The master's site; none while in flight or once deleted.
    pub master_site: Option<String>,
    pub in_flight_op: Option<String>,
    pub revision: u64,
    pub deleted_at: Option<DateTime<Utc>>,
    pub copies: Vec<CopyInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct CopyInfo {
    pub site: String,
    pub update_policy: String,
    pub mapping: Option<String>,
    pub dirty: bool,
    pub last_sent_at: Option<DateTime<Utc>>,
}

/// The backlog of one lane (pool × target site).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LaneBacklog {
    pub pool: String,
    pub target_site: String,
    pub open: u64,
    pub retrying: u64,
    pub oldest_open_at: Option<DateTime<Utc>>,
    /// Seconds since the oldest open operation was recorded.
    pub oldest_age_seconds: f64,
}

/// What one ledger sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    pub timed_out: u32,
    pub retried: u32,
    pub dispatched: u32,
    pub scheduled_updates: u32,
}

/// Timeouts per pool (minutes), for the sweep.
#[derive(Debug, Clone)]
pub struct PoolTimeouts {
    pub default_minutes: u32,
    pub by_pool: std::collections::BTreeMap<String, u32>,
}

impl PoolTimeouts {
    pub fn minutes(&self, pool: &str) -> u32 {
        self.by_pool.get(pool).copied().unwrap_or(self.default_minutes)
    }
}

impl Default for PoolTimeouts {
    fn default() -> Self {
        PoolTimeouts { default_minutes: 24 * 60, by_pool: Default::default() }
    }
}

/// Delay before retrying an operation the target refused for now (attempt 1, 2, …): 5 s
/// doubling to 10 minutes.
pub fn retry_delay(attempt: u32) -> chrono::Duration {
    let secs = 5i64.saturating_mul(1i64 << attempt.saturating_sub(1).min(7));
    chrono::Duration::seconds(secs.min(600))
}

/// The event kinds the ledger applies at ingest.
pub const REQUEST_EVENT_KINDS: [&str; 5] = [
    "REQUEST_CREATED",
    "REQUEST_UPDATED",
    meridian_shared::transfers::REQUEST_OPERATION,
    meridian_shared::transfers::REQUEST_OP_OUTCOME,
    meridian_shared::transfers::REQUEST_DELETED,
];

pub fn has_request_events(events: &[crate::store::IncomingEvent]) -> bool {
    events.iter().any(|e| REQUEST_EVENT_KINDS.contains(&e.kind.as_str()))
}

/// The ledger's operations for admins (API, `meridianctl`, console).
/// The command log, written a flush's batch at a time.
pub(crate) const AGENT_COMMANDS: crate::store::stats_sql::Table = crate::store::stats_sql::Table {
    name: "agent_commands",
    cols: &[
        ("agent_id", crate::store::stats_sql::Col::Text),
        ("seq", crate::store::stats_sql::Col::Int),
        ("kind", crate::store::stats_sql::Col::Text),
        ("payload", crate::store::stats_sql::Col::Text),
        ("created_at", crate::store::stats_sql::Col::Time),
        ("nonce", crate::store::stats_sql::Col::Int),
    ],
    key: &["agent_id", "seq"],
    update: false,
};

#[async_trait::async_trait]
pub trait RequestStore: Send + Sync {
    /// Moves staged commands into the agents' command logs (one agent per transaction).
    /// Returns how many were moved.
    async fn flush_request_commands(&self) -> Result<u64> {
        Ok(self.flush_request_commands_by_agent().await?.iter().map(|(_, n)| n).sum())
    }

    /// As `flush_request_commands`, naming the agents (store keys) whose logs got commands and
    /// how many, so that only their sessions are woken.
    async fn flush_request_commands_by_agent(&self) -> Result<Vec<(String, u64)>>;
    /// Times out, retries and dispatches open operations and sends the hourly and daily
    /// updates that are due.
    async fn sweep_request_ops(
        &self,
        now: DateTime<Utc>,
        timeouts: &PoolTimeouts,
    ) -> Result<SweepReport>;
    async fn list_request_ops(&self, filter: &OpsFilter) -> Result<Vec<LedgerOp>>;
    async fn request_op(&self, op_id: &str, target_site: &str) -> Result<Option<LedgerOp>>;
    /// Cancels an open operation (`Conflict` otherwise); an ownership transfer's request goes
    /// back to its source.
    async fn cancel_request_op(
        &self,
        op_id: &str,
        target_site: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<LedgerOp>;
    /// Sends an operation again now: one waiting to retry, or a failed copy, update or delete.
    async fn retry_request_op(
        &self,
        op_id: &str,
        target_site: &str,
        now: DateTime<Utc>,
    ) -> Result<LedgerOp>;
    async fn request_ownership(&self, request: &str) -> Result<Option<Ownership>>;
    async fn request_backlog(&self, now: DateTime<Utc>) -> Result<Vec<LaneBacklog>>;
}

/// Expands to the ledger's transaction helpers and `impl RequestStore for $ty`.
macro_rules! impl_request_store {
    ($ty:ty, lock = $lock:literal) => {
        impl $ty {
            /// Applies the batch's request events from an agent of `site`, inside its ingest
            /// transaction.
            pub(crate) async fn apply_request_events(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                agent_id: &str,
                site: &str,
                events: &[&$crate::store::IncomingEvent],
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<()> {
                use meridian_shared::events::{AgentEvent, RequestEventKind};
                for e in events.iter().filter(|e| e.quarantine.is_none()) {
                    if !$crate::store::requests::REQUEST_EVENT_KINDS.contains(&e.kind.as_str()) {
                        continue;
                    }
                    match AgentEvent::decode(&e.kind, e.payload.as_bytes()) {
                        Ok(Some(AgentEvent::Request(RequestEventKind::Created, ev))) => {
                            Self::req_created(tx, site, &ev, at).await?
                        }
                        Ok(Some(AgentEvent::Request(RequestEventKind::Updated, ev))) => {
                            Self::req_updated(tx, site, &ev, at).await?
                        }
                        Ok(Some(AgentEvent::RequestOperation(op))) => {
                            Self::req_operation(tx, site, &op, at).await?
                        }
                        Ok(Some(AgentEvent::RequestOperationOutcome(o))) => {
                            Self::req_outcome(tx, agent_id, site, &o, at).await?
                        }
                        Ok(Some(AgentEvent::RequestDeleted(d))) => {
                            Self::req_deleted(tx, site, &d, at).await?
                        }
                        other => tracing::warn!(kind = %e.kind, seq = e.seq, decoded = ?other.err(), "request event not applied"),
                    }
                }
                Ok(())
            }

            async fn req_created(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                site: &str,
                ev: &meridian_shared::events::RequestChanged,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<()> {
                let state = meridian_shared::transfers::RequestState {
                    request_id: ev.request_id,
                    human_id: ev.human_id.clone(),
                    request_type: ev.request_type.clone(),
                    fields: ev.fields.clone(),
                    revision: ev.revision,
                    created_at: ev.at,
                    history: vec![],
                };
                sqlx::query(
                    "INSERT INTO request_owners (request_id, human_id, request_type, master_site, \
                     revision, state, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                     ON CONFLICT (request_id) DO NOTHING",
                )
                .bind(ev.request_id.to_string())
                .bind(&ev.human_id)
                .bind(ev.request_type.as_str())
                .bind(site)
                .bind(ev.revision as i64)
                .bind($crate::store::requests::to_json(&state)?)
                .bind(at)
                .execute(&mut **tx)
                .await?;
                Ok(())
            }

            /// The master's change: kept as the request's state, and sent to the copies whose
            /// policy is `immediately` (the others are marked to be sent later).
            async fn req_updated(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                site: &str,
                ev: &meridian_shared::events::RequestChanged,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<()> {
                let id = ev.request_id.to_string();
                let row: Option<(Option<String>, i64, String)> = sqlx::query_as(concat!(
                    "SELECT master_site, revision, state FROM request_owners WHERE request_id = $1",
                    $lock
                ))
                .bind(&id)
                .fetch_optional(&mut **tx)
                .await?;
                let Some((Some(master), revision, state)) = row else { return Ok(()) };
                if master != site || ev.revision as i64 <= revision {
                    tracing::warn!(request = %ev.human_id, site, %master, "a change from a site that is not the master (or an old revision); ignored");
                    return Ok(());
                }
                let mut state = $crate::store::requests::state_of(&state)?;
                state.fields = ev.fields.clone();
                state.revision = ev.revision;
                state.request_type = ev.request_type.clone();
                sqlx::query(
                    "UPDATE request_owners SET state = $2, revision = $3, request_type = $4, \
                     updated_at = $5 WHERE request_id = $1",
                )
                .bind(&id)
                .bind($crate::store::requests::to_json(&state)?)
                .bind(ev.revision as i64)
                .bind(ev.request_type.as_str())
                .bind(at)
                .execute(&mut **tx)
                .await?;
                let copies: Vec<(String, String, Option<String>)> = sqlx::query_as(
                    "SELECT site, update_policy, mapping FROM request_copies \
                     WHERE request_id = $1 ORDER BY site",
                )
                .bind(&id)
                .fetch_all(&mut **tx)
                .await?;
                for (copy_site, policy, mapping) in copies {
                    match policy.as_str() {
                        "immediately" => {
                            Self::req_send_update(tx, &state, site, &copy_site, &policy, mapping.as_deref(), at)
                                .await?
                        }
                        "never" => {}
                        _ => {
                            sqlx::query(
                                "UPDATE request_copies SET dirty = TRUE WHERE request_id = $1 AND site = $2",
                            )
                            .bind(&id)
                            .bind(&copy_site)
                            .execute(&mut **tx)
                            .await?;
                        }
                    }
                }
                Ok(())
            }

            /// A new update operation of `state` to the copy at `target`, replacing (collapsing)
            /// any update of the same request to the same site still open.
            async fn req_send_update(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                state: &meridian_shared::transfers::RequestState,
                master: &str,
                target: &str,
                policy: &str,
                mapping: Option<&str>,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<()> {
                Self::req_supersede_updates(tx, &state.request_id.to_string(), Some(target), at).await?;
                Self::req_new_controller_op(
                    tx,
                    meridian_shared::transfers::OpKind::Update,
                    state,
                    master,
                    target,
                    policy,
                    mapping,
                    at,
                )
                .await?;
                sqlx::query(
                    "UPDATE request_copies SET dirty = FALSE, last_sent_at = $3 WHERE request_id = $1 AND site = $2",
                )
                .bind(state.request_id.to_string())
                .bind(target)
                .bind(at)
                .execute(&mut **tx)
                .await?;
                Ok(())
            }

            /// Marks open updates of `request` (to `target`, or to every site) superseded and
            /// withdraws their commands.
            async fn req_supersede_updates(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                request: &str,
                target: Option<&str>,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<()> {
                let open: Vec<(String, String, Option<String>, Option<i64>)> = sqlx::query_as(
                    "SELECT op_id, target_site, agent_id, command_seq FROM request_ops \
                     WHERE request_id = $1 AND kind = 'update' AND origin = 'controller' \
                     AND status IN ('queued', 'pending', 'retry') AND ($2 IS NULL OR target_site = $2)",
                )
                .bind(request)
                .bind(target)
                .fetch_all(&mut **tx)
                .await?;
                for (op, site, agent, seq) in open {
                    sqlx::query(
                        "UPDATE request_ops SET status = 'superseded', completed_at = $3, updated_at = $3, \
                         reason = 'a newer update replaced it' WHERE op_id = $1 AND target_site = $2",
                    )
                    .bind(&op)
                    .bind(&site)
                    .bind(at)
                    .execute(&mut **tx)
                    .await?;
                    Self::req_withdraw(tx, &op, &site, agent.as_deref(), seq, "superseded").await?;
                }
                Ok(())
            }

            /// Withdraws an operation's command: unstaged if not yet in the log, else
            /// rewritten to `REQUEST_WITHDRAWN` if its agent has not acknowledged it.
            async fn req_withdraw(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                op: &str,
                target: &str,
                agent: Option<&str>,
                seq: Option<i64>,
                reason: &str,
            ) -> $crate::error::Result<()> {
                let unstaged = sqlx::query(
                    "DELETE FROM staged_commands WHERE op_id = $1 AND target_site = $2",
                )
                .bind(op)
                .bind(target)
                .execute(&mut **tx)
                .await?
                .rows_affected();
                if unstaged > 0 {
                    return Ok(());
                }
                let (Some(agent), Some(seq)) = (agent, seq) else { return Ok(()) };
                let payload = meridian_shared::commands::ControllerCommand::Withdrawn(
                    meridian_shared::transfers::Withdrawn {
                        op_id: op.parse().unwrap_or_default(),
                        reason: reason.to_owned(),
                    },
                )
                .payload();
                sqlx::query(
                    "UPDATE agent_commands SET kind = $3, payload = $4 WHERE agent_id = $1 AND seq = $2 \
                     AND seq > (SELECT command_acked_seq FROM agents WHERE id = $1)",
                )
                .bind(agent)
                .bind(seq)
                .bind(meridian_shared::commands::REQUEST_WITHDRAWN)
                .bind(String::from_utf8_lossy(&payload).into_owned())
                .execute(&mut **tx)
                .await?;
                Ok(())
            }

            /// Records an operation the ledger itself starts (updates and deletes of copies).
            #[allow(clippy::too_many_arguments)]
            async fn req_new_controller_op(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                kind: meridian_shared::transfers::OpKind,
                state: &meridian_shared::transfers::RequestState,
                master: &str,
                target: &str,
                policy: &str,
                mapping: Option<&str>,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<()> {
                let op_id = uuid::Uuid::now_v7();
                let source = meridian_shared::SiteCode::parse(master)
                    .map_err(|_| $crate::error::Error::Internal(format!("bad site code {master:?}")))?;
                let apply = meridian_shared::transfers::ApplyOperation {
                    op_id,
                    attempt: 1,
                    kind,
                    mode: None,
                    source_site: source,
                    mapping: mapping.and_then(|m| meridian_shared::Code::parse(m).ok()),
                    request: state.clone(),
                };
                Self::req_insert_op(
                    tx,
                    &$crate::store::requests::NewOp {
                        apply: &apply,
                        target,
                        origin: "controller",
                        pool: $crate::store::requests::DEFAULT_POOL,
                        rule: None,
                        update_policy: policy,
                        keep_copy: false,
                        requested_at: at,
                    },
                    at,
                )
                .await
            }

            /// Inserts an operation row and sends it, or queues it behind a retry in its lane.
            async fn req_insert_op(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                op: &$crate::store::requests::NewOp<'_>,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<()> {
                let blocked: Option<(i32,)> = sqlx::query_as(
                    "SELECT 1 FROM request_ops WHERE pool = $1 AND target_site = $2 \
                     AND status IN ('retry', 'queued') LIMIT 1",
                )
                .bind(op.pool)
                .bind(op.target)
                .fetch_optional(&mut **tx)
                .await?;
                let a = op.apply;
                sqlx::query(
                    "INSERT INTO request_ops (op_id, target_site, kind, mode, origin, request_id, \
                     human_id, source_site, pool, mapping, rule, update_policy, keep_copy, status, \
                     attempt, payload, requested_at, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 1, $15, $16, $17, $17)",
                )
                .bind(a.op_id.to_string())
                .bind(op.target)
                .bind(a.kind.as_str())
                .bind(a.mode.map(|m| m.as_str()))
                .bind(op.origin)
                .bind(a.request.request_id.to_string())
                .bind(&a.request.human_id)
                .bind(a.source_site.as_str())
                .bind(op.pool)
                .bind(a.mapping.as_ref().map(|m| m.to_string()))
                .bind(op.rule)
                .bind(op.update_policy)
                .bind(op.keep_copy)
                .bind(if blocked.is_some() { "queued" } else { "pending" })
                .bind($crate::store::requests::to_json(a)?)
                .bind(op.requested_at)
                .bind(at)
                .execute(&mut **tx)
                .await?;
                if blocked.is_none() {
                    Self::req_dispatch(tx, &a.op_id.to_string(), op.target, 1, Some(a), at).await?;
                }
                Ok(())
            }

            /// Sends attempt `attempt` of an operation to its target's agent (staged), or
            /// leaves it pending without an agent until the site has one.
            async fn req_dispatch(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                op: &str,
                target: &str,
                attempt: u32,
                known: Option<&meridian_shared::transfers::ApplyOperation>,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<()> {
                let mut apply = match known {
                    Some(apply) => apply.clone(),
                    None => {
                        let (payload,): (String,) = sqlx::query_as(
                            "SELECT payload FROM request_ops WHERE op_id = $1 AND target_site = $2",
                        )
                        .bind(op)
                        .bind(target)
                        .fetch_one(&mut **tx)
                        .await?;
                        serde_json::from_str::<meridian_shared::transfers::ApplyOperation>(&payload)
                            .map_err(|e| {
                                $crate::error::Error::Internal(format!("corrupt request_ops.payload: {e}"))
                            })?
                    }
                };
                apply.attempt = attempt;
                let command = meridian_shared::commands::ControllerCommand::ApplyOperation(Box::new(apply));
                let payload = String::from_utf8_lossy(&command.payload()).into_owned();
                let agent = Self::req_stage_at_site(tx, target, command.kind(), &payload, Some((op, target)), at).await?;
                sqlx::query(
                    "UPDATE request_ops SET status = 'pending', attempt = $3, agent_id = $4, \
                     command_seq = NULL, payload = $5, next_attempt_at = NULL, updated_at = $6 \
                     WHERE op_id = $1 AND target_site = $2",
                )
                .bind(op)
                .bind(target)
                .bind(attempt as i32)
                .bind(agent)
                .bind(payload)
                .bind(at)
                .execute(&mut **tx)
                .await?;
                Ok(())
            }

            /// The active agent of `site`.
            async fn req_agent_of(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                site: &str,
            ) -> $crate::error::Result<Option<String>> {
                Ok(sqlx::query_scalar(
                    "SELECT id FROM agents WHERE site = $1 AND revoked_at IS NULL \
                     ORDER BY enrolled_at DESC LIMIT 1",
                )
                .bind(site)
                .fetch_optional(&mut **tx)
                .await?)
            }

            /// Stages `command` for `agent` (moved into its log after the commit).
            async fn req_stage(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                agent: &str,
                command: &meridian_shared::commands::ControllerCommand,
                op: Option<(&str, &str)>,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<()> {
                sqlx::query(
                    "INSERT INTO staged_commands (agent_id, kind, payload, op_id, target_site, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(agent)
                .bind(command.kind())
                .bind(String::from_utf8_lossy(&command.payload()).into_owned())
                .bind(op.map(|o| o.0))
                .bind(op.map(|o| o.1))
                .bind(at)
                .execute(&mut **tx)
                .await?;
                Ok(())
            }

            /// Stages a command for the active agent of `site` in one statement; returns that
            /// agent, or `None` when the site has none.
            async fn req_stage_at_site(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                site: &str,
                kind: &str,
                payload: &str,
                op: Option<(&str, &str)>,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<Option<String>> {
                Ok(sqlx::query_scalar(
                    "INSERT INTO staged_commands (agent_id, kind, payload, op_id, target_site, created_at) \
                     SELECT id, $2, $3, $4, $5, $6 FROM agents WHERE site = $1 AND revoked_at IS NULL \
                     ORDER BY enrolled_at DESC LIMIT 1 RETURNING agent_id",
                )
                .bind(site)
                .bind(kind)
                .bind(payload)
                .bind(op.map(|o| o.0))
                .bind(op.map(|o| o.1))
                .bind(at)
                .fetch_optional(&mut **tx)
                .await?)
            }

            /// Stages `command` for the active agent of `site`, if it has one.
            async fn req_stage_for_site(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                site: &str,
                command: &meridian_shared::commands::ControllerCommand,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<()> {
                let payload = String::from_utf8_lossy(&command.payload()).into_owned();
                match Self::req_stage_at_site(tx, site, command.kind(), &payload, None, at).await? {
                    Some(_) => Ok(()),
                    None => {
                        tracing::warn!(site, kind = command.kind(), "no active agent to tell; the site learns it when one enrols");
                        Ok(())
                    }
                }
            }

            /// The sites of the configuration with their tags.
            async fn req_sites(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
            ) -> $crate::error::Result<Vec<(String, Vec<String>)>> {
                let bodies: Vec<(String,)> =
                    sqlx::query_as("SELECT body FROM config_resources WHERE kind = 'site' ORDER BY code")
                        .fetch_all(&mut **tx)
                        .await?;
                Ok(bodies
                    .into_iter()
                    .filter_map(|(b,)| serde_json::from_str::<meridian_shared::config::Resource>(&b).ok())
                    .filter_map(|r| match r {
                        meridian_shared::config::Resource::Site(s) => Some((s.code.to_string(), s.tags)),
                        _ => None,
                    })
                    .collect())
            }

            /// A site's `REQUEST_OPERATION`.
            async fn req_operation(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                site: &str,
                op: &meridian_shared::transfers::OperationRequested,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<()> {
                use meridian_shared::transfers::{OpTarget, ResultStatus, TransferMode};
                let op_id = op.op_id.to_string();
                let request = op.request.request_id.to_string();
                let seen: Option<(i32,)> =
                    sqlx::query_as("SELECT 1 FROM request_ops WHERE op_id = $1 LIMIT 1")
                        .bind(&op_id)
                        .fetch_optional(&mut **tx)
                        .await?;
                if seen.is_some() {
                    tracing::warn!(op = %op_id, site, "operation recorded before: a replay, refused");
                    return Ok(());
                }
                let owner: Option<(Option<String>, Option<String>, Option<chrono::DateTime<chrono::Utc>>)> =
                    sqlx::query_as(concat!(
                        "SELECT master_site, in_flight_op, deleted_at FROM request_owners WHERE request_id = $1",
                        $lock
                    ))
                    .bind(&request)
                    .fetch_optional(&mut **tx)
                    .await?;
                let moves = op.mode == Some(TransferMode::Ownership);
                // Whether the ledger agrees this site holds the master; if not, the operation
                // is forged or stale and must move nothing (not even back to this site).
                let not_master = match &owner {
                    None => Some(format!("the ledger does not know request {}", op.request.human_id)),
                    Some((_, _, Some(_))) => Some(format!("request {} was deleted", op.request.human_id)),
                    Some((_, Some(f), _)) => Some(format!("request {} is already in flight under operation {f}", op.request.human_id)),
                    Some((Some(m), None, None)) if m != site => {
                        Some(format!("{site} is not the master of {} (the ledger has it at {m})", op.request.human_id))
                    }
                    Some((None, None, None)) => Some(format!("request {} has no master", op.request.human_id)),
                    Some(_) => None,
                };
                let (targets, unknown): (Vec<String>, Option<String>) = match &op.target {
                    // One site: only whether it is configured (not every site's body).
                    OpTarget::Site(s) => {
                        let known: Option<(i32,)> = sqlx::query_as(
                            "SELECT 1 FROM config_resources WHERE kind = 'site' AND code = $1",
                        )
                        .bind(s.as_str())
                        .fetch_optional(&mut **tx)
                        .await?;
                        let targets: Vec<String> =
                            [s.to_string()].into_iter().filter(|t| t != site).collect();
                        let unknown = known.is_none().then(|| s.to_string()).filter(|_| !targets.is_empty());
                        (targets, unknown)
                    }
                    OpTarget::Group(g) => {
                        let sites = Self::req_sites(tx).await?;
                        let targets = sites.into_iter().filter(|(c, tags)| tags.contains(g) && c != site).map(|(c, _)| c).collect();
                        (targets, None)
                    }
                    OpTarget::AllSites => {
                        let sites = Self::req_sites(tx).await?;
                        (sites.into_iter().map(|(c, _)| c).filter(|c| c != site).collect(), None)
                    }
                };
                let problem = not_master.clone().or_else(|| {
                    if targets.is_empty() {
                        Some("no other site matches the target".to_owned())
                    } else if moves && targets.len() != 1 {
                        Some("an ownership transfer goes to exactly one site".to_owned())
                    } else {
                        unknown.map(|t| format!("unknown site {t}"))
                    }
                });
                let source = meridian_shared::SiteCode::parse(site)
                    .map_err(|_| $crate::error::Error::Internal(format!("bad site code {site:?}")))?;
                let apply = meridian_shared::transfers::ApplyOperation {
                    op_id: op.op_id,
                    attempt: 1,
                    kind: op.kind,
                    mode: op.mode,
                    source_site: source,
                    mapping: op.mapping.clone(),
                    request: op.request.clone(),
                };
                let base = $crate::store::requests::NewOp {
                    apply: &apply,
                    target: "",
                    origin: "site",
                    pool: op.pool.as_str(),
                    rule: op.rule.as_ref().map(|r| r.as_str()),
                    update_policy: op.update.as_str(),
                    keep_copy: op.source_keeps_copy,
                    requested_at: op.at,
                };
                if let Some(reason) = problem {
                    tracing::warn!(op = %op_id, site, %reason, "operation refused by the ledger");
                    let target = targets.first().cloned().unwrap_or_else(|| match &op.target {
                        OpTarget::Site(s) => s.to_string(),
                        OpTarget::Group(g) => format!("group:{g}"),
                        OpTarget::AllSites => "all_sites".to_owned(),
                    });
                    let row = $crate::store::requests::NewOp { target: &target, ..base };
                    let a = row.apply;
                    sqlx::query(
                        "INSERT INTO request_ops (op_id, target_site, kind, mode, origin, request_id, \
                         human_id, source_site, pool, mapping, rule, update_policy, keep_copy, status, \
                         result, reason, attempt, payload, requested_at, created_at, updated_at, completed_at) \
                         VALUES ($1, $2, $3, $4, 'site', $5, $6, $7, $8, $9, $10, $11, $12, 'failed', 'failure', \
                         $13, 1, $14, $15, $16, $16, $16)",
                    )
                    .bind(&op_id)
                    .bind(&target)
                    .bind(a.kind.as_str())
                    .bind(a.mode.map(|m| m.as_str()))
                    .bind(&request)
                    .bind(&op.request.human_id)
                    .bind(site)
                    .bind(row.pool)
                    .bind(a.mapping.as_ref().map(|m| m.to_string()))
                    .bind(row.rule)
                    .bind(row.update_policy)
                    .bind(row.keep_copy)
                    .bind(&reason)
                    .bind($crate::store::requests::to_json(a)?)
                    .bind(op.at)
                    .bind(at)
                    .execute(&mut **tx)
                    .await?;
                    // The source gave the ownership up for this operation: give it back, unless
                    // the ledger never had it from this site.
                    if not_master.is_none() || !moves {
                        let result = meridian_shared::commands::ControllerCommand::OperationResult(
                            meridian_shared::transfers::OperationResult {
                                op_id: op.op_id,
                                request_id: op.request.request_id,
                                target_site: meridian_shared::SiteCode::parse(&target).unwrap_or_else(|_| apply.source_site.clone()),
                                status: ResultStatus::Failure,
                                target_request_id: None,
                                reason: Some(reason),
                                keep_copy: true,
                            },
                        );
                        Self::req_stage_for_site(tx, site, &result, at).await?;
                    }
                    return Ok(());
                }
                if moves {
                    sqlx::query(
                        "UPDATE request_owners SET master_site = NULL, in_flight_op = $2, updated_at = $3 \
                         WHERE request_id = $1",
                    )
                    .bind(&request)
                    .bind(&op_id)
                    .bind(at)
                    .execute(&mut **tx)
                    .await?;
                }
                for target in &targets {
                    Self::req_insert_op(tx, &$crate::store::requests::NewOp { target, ..base }, at).await?;
                }
                Ok(())
            }

            /// The target's `REQUEST_OP_OUTCOME`.
            async fn req_outcome(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                agent_id: &str,
                site: &str,
                o: &meridian_shared::transfers::OperationOutcome,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<()> {
                use meridian_shared::transfers::Outcome;
                let row: Option<$crate::store::requests::LedgerRow> = sqlx::query_as(concat!(
                    $crate::store::requests::ledger_select!(),
                    " WHERE o.op_id = $1 AND o.target_site = $2"
                ))
                .bind(o.op_id.to_string())
                .bind(site)
                .fetch_optional(&mut **tx)
                .await?;
                let Some(row) = row else {
                    tracing::warn!(op = %o.op_id, site, "outcome of an operation the ledger does not have; ignored");
                    return Ok(());
                };
                let op: $crate::store::requests::LedgerOp = row.try_into()?;
                if o.attempt != op.attempt {
                    return Ok(());
                }
                let moves = op.mode.as_deref() == Some("ownership");
                match (op.status.as_str(), &o.outcome) {
                    ("pending", Outcome::Applied { request_id, .. }) => {
                        Self::req_settle_applied(tx, &op, agent_id, &request_id.to_string(), at).await
                    }
                    ("pending", Outcome::Rejected { reason, retryable: true }) => {
                        sqlx::query(
                            "UPDATE request_ops SET status = 'retry', reason = $3, next_attempt_at = $4, \
                             updated_at = $5 WHERE op_id = $1 AND target_site = $2",
                        )
                        .bind(op.op_id.to_string())
                        .bind(site)
                        .bind(reason)
                        .bind(at + $crate::store::requests::retry_delay(op.attempt))
                        .bind(at)
                        .execute(&mut **tx)
                        .await?;
                        Ok(())
                    }
                    ("pending", Outcome::Rejected { reason, retryable: false }) => {
                        Self::req_settle_failed(tx, &op, "failure", reason, at).await
                    }
                    ("failed" | "superseded", Outcome::Applied { .. }) if moves => {
                        // Cancelled or timed out after the target staged it: the ownership went
                        // back to the source, so the staged copy is dropped.
                        let abort = meridian_shared::commands::ControllerCommand::AbortOperation(
                            meridian_shared::transfers::Decision {
                                op_id: op.op_id,
                                request_id: op.request_id.parse().unwrap_or_default(),
                            },
                        );
                        Self::req_stage(tx, agent_id, &abort, None, at).await
                    }
                    ("failed", Outcome::Applied { request_id, .. }) => {
                        // A copy applied before the cancel reached the site: it is there.
                        let note = format!(
                            "{}; the target had applied it before the cancel reached it",
                            op.reason.clone().unwrap_or_default()
                        );
                        sqlx::query("UPDATE request_ops SET reason = $3 WHERE op_id = $1 AND target_site = $2")
                            .bind(op.op_id.to_string())
                            .bind(site)
                            .bind(note)
                            .execute(&mut **tx)
                            .await?;
                        if op.kind == "transfer" && op.mode.as_deref() == Some("data_only") || op.kind == "update" {
                            Self::req_record_copy(tx, &op, &request_id.to_string(), at).await?;
                        }
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }

            async fn req_record_copy(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                op: &$crate::store::requests::LedgerOp,
                request: &str,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<()> {
                let revision = $crate::store::requests::payload_revision(op);
                sqlx::query(
                    "INSERT INTO request_copies (request_id, site, update_policy, mapping, sent_revision, dirty, last_sent_at) \
                     VALUES ($1, $2, $3, $4, $5, FALSE, $6) ON CONFLICT (request_id, site) DO UPDATE SET \
                     sent_revision = excluded.sent_revision, last_sent_at = excluded.last_sent_at, \
                     update_policy = CASE WHEN $7 THEN excluded.update_policy ELSE request_copies.update_policy END, \
                     mapping = CASE WHEN $7 THEN excluded.mapping ELSE request_copies.mapping END",
                )
                .bind(request)
                .bind(&op.target_site)
                .bind(&op.update_policy)
                .bind(&op.mapping)
                .bind(revision)
                .bind(at)
                .bind(op.origin == "site")
                .execute(&mut **tx)
                .await?;
                Ok(())
            }

            /// The target applied (or staged) the operation.
            async fn req_settle_applied(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                op: &$crate::store::requests::LedgerOp,
                agent_id: &str,
                target_request: &str,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<()> {
                use meridian_shared::commands::ControllerCommand;
                use meridian_shared::transfers::{Decision, OperationResult, ResultStatus};
                let op_uuid = op.op_id;
                let request_uuid: uuid::Uuid = op.request_id.parse().unwrap_or_default();
                sqlx::query(
                    "UPDATE request_ops SET status = 'applied', target_request_id = $3, reason = NULL, \
                     completed_at = $4, updated_at = $4 WHERE op_id = $1 AND target_site = $2",
                )
                .bind(op_uuid.to_string())
                .bind(&op.target_site)
                .bind(target_request)
                .bind(at)
                .execute(&mut **tx)
                .await?;
                let moves = op.mode.as_deref() == Some("ownership");
                if moves {
                    let payload: meridian_shared::transfers::ApplyOperation =
                        $crate::store::requests::apply_of(op)?;
                    sqlx::query(
                        "UPDATE request_owners SET master_site = $2, in_flight_op = NULL, state = $4, \
                         updated_at = $5 WHERE request_id = $1 AND in_flight_op = $3",
                    )
                    .bind(&op.request_id)
                    .bind(&op.target_site)
                    .bind(op_uuid.to_string())
                    .bind($crate::store::requests::to_json(&payload.request)?)
                    .bind(at)
                    .execute(&mut **tx)
                    .await?;
                    let commit = ControllerCommand::CommitOperation(Decision { op_id: op_uuid, request_id: request_uuid });
                    Self::req_stage(tx, agent_id, &commit, None, at).await?;
                    Self::req_drop_copy(tx, &op.request_id, &op.target_site).await?;
                    if op.keep_copy {
                        sqlx::query(
                            "INSERT INTO request_copies (request_id, site, update_policy, mapping, sent_revision, dirty, last_sent_at) \
                             VALUES ($1, $2, $3, NULL, $4, FALSE, $5) ON CONFLICT (request_id, site) DO UPDATE SET \
                             update_policy = excluded.update_policy, sent_revision = excluded.sent_revision, dirty = FALSE",
                        )
                        .bind(&op.request_id)
                        .bind(&op.source_site)
                        .bind(&op.update_policy)
                        .bind(payload.request.revision as i64)
                        .bind(at)
                        .execute(&mut **tx)
                        .await?;
                    } else {
                        Self::req_drop_copy(tx, &op.request_id, &op.source_site).await?;
                    }
                    if op.kind == "return" {
                        // Copies waiting for the return get the request's state now.
                        let waiting: Vec<(String, String, Option<String>)> = sqlx::query_as(
                            "SELECT site, update_policy, mapping FROM request_copies WHERE request_id = $1 \
                             AND update_policy = 'on_return' AND dirty AND site <> $2",
                        )
                        .bind(&op.request_id)
                        .bind(&op.target_site)
                        .fetch_all(&mut **tx)
                        .await?;
                        for (copy_site, policy, mapping) in waiting {
                            Self::req_send_update(tx, &payload.request, &op.target_site, &copy_site, &policy, mapping.as_deref(), at)
                                .await?;
                        }
                    }
                } else if op.kind == "delete" {
                    Self::req_drop_copy(tx, &op.request_id, &op.target_site).await?;
                } else if op.mode.as_deref() != Some("independent_copy") {
                    Self::req_record_copy(tx, op, &op.request_id, at).await?;
                }
                if op.origin == "site" {
                    let result = ControllerCommand::OperationResult(OperationResult {
                        op_id: op_uuid,
                        request_id: request_uuid,
                        target_site: $crate::store::requests::site_code(&op.target_site)?,
                        status: ResultStatus::Success,
                        target_request_id: target_request.parse().ok(),
                        reason: None,
                        keep_copy: op.keep_copy,
                    });
                    Self::req_stage_for_site(tx, &op.source_site, &result, at).await?;
                }
                Self::req_release_lane(tx, &op.pool, &op.target_site, at).await
            }

            /// The operation ended without being applied (`result`: failure, timeout,
            /// cancelled): an ownership transfer's request goes back to its source.
            async fn req_settle_failed(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                op: &$crate::store::requests::LedgerOp,
                result: &str,
                reason: &str,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<()> {
                use meridian_shared::commands::ControllerCommand;
                use meridian_shared::transfers::{OperationResult, ResultStatus};
                sqlx::query(
                    "UPDATE request_ops SET status = 'failed', result = $3, reason = $4, \
                     next_attempt_at = NULL, completed_at = $5, updated_at = $5 \
                     WHERE op_id = $1 AND target_site = $2",
                )
                .bind(op.op_id.to_string())
                .bind(&op.target_site)
                .bind(result)
                .bind(reason)
                .bind(at)
                .execute(&mut **tx)
                .await?;
                Self::req_withdraw(
                    tx,
                    &op.op_id.to_string(),
                    &op.target_site,
                    op.agent_id.as_deref(),
                    op.command_seq.map(|s| s as i64),
                    reason,
                )
                .await?;
                if op.mode.as_deref() == Some("ownership") {
                    sqlx::query(
                        "UPDATE request_owners SET master_site = $2, in_flight_op = NULL, updated_at = $4 \
                         WHERE request_id = $1 AND in_flight_op = $3",
                    )
                    .bind(&op.request_id)
                    .bind(&op.source_site)
                    .bind(op.op_id.to_string())
                    .bind(at)
                    .execute(&mut **tx)
                    .await?;
                }
                if op.origin == "site" {
                    let status = match result {
                        "timeout" => ResultStatus::Timeout,
                        "cancelled" => ResultStatus::Cancelled,
                        _ => ResultStatus::Failure,
                    };
                    let cmd = ControllerCommand::OperationResult(OperationResult {
                        op_id: op.op_id,
                        request_id: op.request_id.parse().unwrap_or_default(),
                        target_site: $crate::store::requests::site_code(&op.target_site)?,
                        status,
                        target_request_id: None,
                        reason: Some(reason.to_owned()),
                        keep_copy: true,
                    });
                    Self::req_stage_for_site(tx, &op.source_site, &cmd, at).await?;
                } else if op.kind == "update" && result == "failure" {
                    // The copy is gone at that site (deleted alone): stop updating it.
                    Self::req_drop_copy(tx, &op.request_id, &op.target_site).await?;
                }
                Self::req_release_lane(tx, &op.pool, &op.target_site, at).await
            }

            /// Forgets the read-only copy of `request` at `site` (no more updates go there).
            async fn req_drop_copy(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                request: &str,
                site: &str,
            ) -> $crate::error::Result<()> {
                sqlx::query("DELETE FROM request_copies WHERE request_id = $1 AND site = $2")
                    .bind(request)
                    .bind(site)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }

            /// Sends the lane's queued operations, in order, once nothing in it waits to retry.
            async fn req_release_lane(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                pool: &str,
                target: &str,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<()> {
                // One look at the lane (the partial index holds only retry and queued rows).
                let held: Vec<(String, i32, String)> = sqlx::query_as(
                    "SELECT op_id, attempt, status FROM request_ops WHERE pool = $1 AND target_site = $2 \
                     AND status IN ('retry', 'queued') ORDER BY created_at, op_id",
                )
                .bind(pool)
                .bind(target)
                .fetch_all(&mut **tx)
                .await?;
                if held.iter().any(|(_, _, status)| status == "retry") {
                    return Ok(());
                }
                for (op, attempt, _) in held {
                    Self::req_dispatch(tx, &op, target, attempt.max(1) as u32, None, at).await?;
                }
                Ok(())
            }

            /// A site deleted a request: a master's copies are deleted down the chain; a copy
            /// deleted alone is no longer updated.
            async fn req_deleted(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                site: &str,
                d: &meridian_shared::transfers::RequestDeleted,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<()> {
                let id = d.request_id.to_string();
                if !d.was_master {
                    Self::req_drop_copy(tx, &id, site).await?;
                    return Ok(());
                }
                let row: Option<(Option<String>, String)> = sqlx::query_as(concat!(
                    "SELECT master_site, state FROM request_owners WHERE request_id = $1",
                    $lock
                ))
                .bind(&id)
                .fetch_optional(&mut **tx)
                .await?;
                let Some((Some(master), state)) = row else { return Ok(()) };
                if master != site {
                    tracing::warn!(request = %d.human_id, site, %master, "a delete from a site that is not the master; ignored");
                    return Ok(());
                }
                sqlx::query(
                    "UPDATE request_owners SET master_site = NULL, deleted_at = $2, updated_at = $2 WHERE request_id = $1",
                )
                .bind(&id)
                .bind(at)
                .execute(&mut **tx)
                .await?;
                Self::req_supersede_updates(tx, &id, None, at).await?;
                let state = $crate::store::requests::state_of(&state)?;
                let copies: Vec<(String,)> = sqlx::query_as(
                    "SELECT site FROM request_copies WHERE request_id = $1 AND site <> $2 ORDER BY site",
                )
                .bind(&id)
                .bind(site)
                .fetch_all(&mut **tx)
                .await?;
                for (copy_site,) in copies {
                    Self::req_new_controller_op(
                        tx,
                        meridian_shared::transfers::OpKind::Delete,
                        &state,
                        site,
                        &copy_site,
                        "never",
                        None,
                        at,
                    )
                    .await?;
                }
                Ok(())
            }

            /// Moves `agent`'s staged commands into its log in one transaction; 0 when there
            /// were none or another flusher holds the agent (it looks again after its commit).
            async fn flush_agent_commands(&self, agent: &str) -> $crate::error::Result<u64> {
                let mut tx = self.tx().await?;
                let mine: bool = sqlx::query_scalar(<$ty as $crate::store::sql_common::Backend>::FLUSH_LOCK)
                    .bind(agent)
                    .fetch_one(&mut *tx)
                    .await?;
                if !mine {
                    return Ok(0);
                }
                let rows: Vec<(i64, String, String, Option<String>, Option<String>, chrono::DateTime<chrono::Utc>)> =
                    sqlx::query_as(
                        "SELECT id, kind, payload, op_id, target_site, created_at FROM staged_commands \
                         WHERE agent_id = $1 ORDER BY id",
                    )
                    .bind(agent)
                    .fetch_all(&mut *tx)
                    .await?;
                if rows.is_empty() {
                    return Ok(0);
                }
                // One sequence bump for the batch; a revoked agent's commands are dropped (its
                // operations are re-sent to the site's new agent by the sweep).
                let last: Option<i64> = sqlx::query_scalar(
                    "UPDATE agents SET command_seq = command_seq + $2 WHERE id = $1 AND revoked_at IS NULL \
                     RETURNING command_seq",
                )
                .bind(agent)
                .bind(rows.len() as i64)
                .fetch_optional(&mut *tx)
                .await?;
                let mut seq = last.map(|l| l - rows.len() as i64);
                let mut log = $crate::store::stats_sql::Rows::new(&$crate::store::requests::AGENT_COMMANDS);
                for (_, kind, payload, op, target, created_at) in &rows {
                    if let Some(s) = seq.as_mut() {
                        *s += 1;
                        use $crate::store::stats_sql::Cell;
                        log.push(&[
                            Cell::Text(Some(agent)),
                            Cell::Int(Some(*s)),
                            Cell::Text(Some(kind)),
                            Cell::Text(Some(payload)),
                            Cell::Time(Some(*created_at)),
                            Cell::Int(Some(meridian_shared::lineage::new_nonce() as i64)),
                        ])?;
                        if let (Some(op), Some(target)) = (op, target) {
                            sqlx::query(
                                "UPDATE request_ops SET command_seq = $3 WHERE op_id = $1 AND target_site = $2 AND agent_id = $4",
                            )
                            .bind(op)
                            .bind(target)
                            .bind(*s)
                            .bind(agent)
                            .execute(&mut *tx)
                            .await?;
                        }
                    }
                }
                // The whole batch in one statement.
                Self::write_rows(&mut tx, &log, $crate::store::stats_sql::Write::Insert).await?;
                // Exactly the rows read (not a range: a row staged meanwhile with a lower id
                // commits after this read and waits for the next flush).
                let moved: Vec<String> = rows.iter().map(|r| r.0.to_string()).collect();
                let moved: Vec<&str> = moved.iter().map(String::as_str).collect();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM staged_commands WHERE agent_id = $2 AND {}",
                    <$ty as $crate::store::sql_common::Backend>::in_ids("CAST(id AS TEXT)")
                )))
                .bind(<$ty as $crate::store::sql_common::Backend>::ids(&moved))
                .bind(agent)
                .execute(&mut *tx)
                .await?;
                if seq.is_some() {
                    Self::notify_agent_commands(&mut tx, agent).await?;
                }
                tx.commit().await?;
                Ok(if seq.is_some() { rows.len() as u64 } else { 0 })
            }

            async fn req_open_op(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                op_id: &str,
                target: &str,
            ) -> $crate::error::Result<$crate::store::requests::LedgerOp> {
                let row: Option<$crate::store::requests::LedgerRow> = sqlx::query_as(concat!(
                    $crate::store::requests::ledger_select!(),
                    " WHERE o.op_id = $1 AND o.target_site = $2"
                ))
                .bind(op_id)
                .bind(target)
                .fetch_optional(&mut **tx)
                .await?;
                row.map(TryInto::try_into)
                    .transpose()?
                    .ok_or_else(|| $crate::error::Error::NotFound(format!("operation {op_id} to {target}")))
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::requests::RequestStore for $ty {
            async fn flush_request_commands_by_agent(&self) -> $crate::error::Result<Vec<(String, u64)>> {
                let agents: Vec<(String,)> =
                    sqlx::query_as("SELECT DISTINCT agent_id FROM staged_commands ORDER BY agent_id")
                        .fetch_all(&self.pool)
                        .await?;
                let mut flushed = Vec::new();
                for (agent,) in agents {
                    // Until nothing is left: rows another session staged while this one held
                    // the agent's flush lock (and so skipped) are moved on the next round.
                    let mut moved = 0u64;
                    loop {
                        let n = self.flush_agent_commands(&agent).await?;
                        if n == 0 {
                            break;
                        }
                        moved += n;
                    }
                    if moved > 0 {
                        flushed.push((agent, moved));
                    }
                }
                Ok(flushed)
            }

            async fn sweep_request_ops(
                &self,
                now: chrono::DateTime<chrono::Utc>,
                timeouts: &$crate::store::requests::PoolTimeouts,
            ) -> $crate::error::Result<$crate::store::requests::SweepReport> {
                let mut report = $crate::store::requests::SweepReport::default();
                // Most ticks find nothing to do: say so without a write transaction (on
                // SQLite that would take the single writer's lock every tick).
                let work: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM request_ops WHERE status IN ('queued', 'pending', 'retry')) \
                     OR EXISTS (SELECT 1 FROM request_copies WHERE dirty)",
                )
                .fetch_one(&self.pool)
                .await?;
                if !work {
                    return Ok(report);
                }
                let mut tx = self.tx().await?;
                let mine: bool = sqlx::query_scalar(<$ty as $crate::store::sql_common::Backend>::LEDGER_LOCK)
                    .fetch_one(&mut *tx)
                    .await?;
                if !mine {
                    return Ok(report);
                }
                let open: Vec<$crate::store::requests::LedgerRow> = sqlx::query_as(concat!(
                    $crate::store::requests::ledger_select!(),
                    " WHERE o.status IN ('queued', 'pending', 'retry') ORDER BY o.created_at, o.op_id"
                ))
                .fetch_all(&mut *tx)
                .await?;
                for row in open {
                    let op: $crate::store::requests::LedgerOp = row.try_into()?;
                    let minutes = timeouts.minutes(&op.pool);
                    if op.created_at + chrono::Duration::minutes(i64::from(minutes)) <= now {
                        let reason = format!(
                            "no outcome from {} within {minutes} minutes{}",
                            op.target_site,
                            op.reason.as_deref().map(|r| format!(" (last refusal: {r})")).unwrap_or_default()
                        );
                        Self::req_settle_failed(&mut tx, &op, "timeout", &reason, now).await?;
                        report.timed_out += 1;
                        continue;
                    }
                    let due = op.status == "retry" && op.next_attempt_at.is_none_or(|t| t <= now);
                    let stranded = op.status == "pending" && !op.delivered && {
                        let current = Self::req_agent_of(&mut tx, &op.target_site).await?;
                        current.is_some() && current != op.agent_id
                    };
                    if due || stranded {
                        Self::req_dispatch(&mut tx, &op.op_id.to_string(), &op.target_site, op.attempt + 1, None, now).await?;
                        if due {
                            Self::req_release_lane(&mut tx, &op.pool, &op.target_site, now).await?;
                            report.retried += 1;
                        } else {
                            report.dispatched += 1;
                        }
                    }
                }
                let dirty: Vec<(String, String, String, Option<String>, Option<String>, String)> = sqlx::query_as(
                    "SELECT c.request_id, c.site, c.update_policy, c.mapping, o.master_site, o.state \
                     FROM request_copies c JOIN request_owners o ON o.request_id = c.request_id \
                     WHERE c.dirty AND c.update_policy IN ('hourly', 'daily') AND o.master_site IS NOT NULL \
                     AND (c.last_sent_at IS NULL OR c.last_sent_at <= $1 AND c.update_policy = 'hourly' \
                          OR c.last_sent_at <= $2)",
                )
                .bind(now - chrono::Duration::hours(1))
                .bind(now - chrono::Duration::days(1))
                .fetch_all(&mut *tx)
                .await?;
                for (_, copy_site, policy, mapping, master, state) in dirty {
                    let state = $crate::store::requests::state_of(&state)?;
                    let master = master.unwrap_or_default();
                    Self::req_send_update(&mut tx, &state, &master, &copy_site, &policy, mapping.as_deref(), now).await?;
                    report.scheduled_updates += 1;
                }
                tx.commit().await?;
                Ok(report)
            }

            async fn list_request_ops(
                &self,
                f: &$crate::store::requests::OpsFilter,
            ) -> $crate::error::Result<Vec<$crate::store::requests::LedgerOp>> {
                let rows: Vec<$crate::store::requests::LedgerRow> = sqlx::query_as(concat!(
                    $crate::store::requests::ledger_select!(),
                    " WHERE ($1 IS NULL OR o.status = $1 OR ($1 = 'open' AND o.status IN ('queued', 'pending', 'retry'))) \
                     AND ($2 IS NULL OR o.source_site = $2 OR o.target_site = $2) \
                     AND ($3 IS NULL OR o.pool = $3) \
                     AND ($4 IS NULL OR o.request_id = $4 OR o.human_id = $4) \
                     ORDER BY o.created_at DESC, o.op_id DESC, o.target_site LIMIT $5"
                ))
                .bind(f.status.as_deref())
                .bind(f.site.as_deref())
                .bind(f.pool.as_deref())
                .bind(f.request.as_deref())
                .bind(i64::from(f.limit.clamp(1, 10_000)))
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            async fn request_op(
                &self,
                op_id: &str,
                target_site: &str,
            ) -> $crate::error::Result<Option<$crate::store::requests::LedgerOp>> {
                let row: Option<$crate::store::requests::LedgerRow> = sqlx::query_as(concat!(
                    $crate::store::requests::ledger_select!(),
                    " WHERE o.op_id = $1 AND o.target_site = $2"
                ))
                .bind(op_id)
                .bind(target_site)
                .fetch_optional(&self.pool)
                .await?;
                row.map(TryInto::try_into).transpose()
            }

            async fn cancel_request_op(
                &self,
                op_id: &str,
                target_site: &str,
                reason: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<$crate::store::requests::LedgerOp> {
                let mut tx = self.tx().await?;
                sqlx::query(concat!("SELECT op_id FROM request_ops WHERE op_id = $1 AND target_site = $2", $lock))
                    .bind(op_id)
                    .bind(target_site)
                    .fetch_optional(&mut *tx)
                    .await?;
                let op = Self::req_open_op(&mut tx, op_id, target_site).await?;
                if !$crate::store::requests::OPEN.contains(&op.status.as_str()) {
                    return Err($crate::error::Error::Conflict(format!(
                        "operation {op_id} to {target_site} is {}; only queued, pending or retrying operations can be cancelled",
                        op.status
                    )));
                }
                Self::req_settle_failed(&mut tx, &op, "cancelled", reason, now).await?;
                let op = Self::req_open_op(&mut tx, op_id, target_site).await?;
                tx.commit().await?;
                Ok(op)
            }

            async fn retry_request_op(
                &self,
                op_id: &str,
                target_site: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<$crate::store::requests::LedgerOp> {
                let mut tx = self.tx().await?;
                sqlx::query(concat!("SELECT op_id FROM request_ops WHERE op_id = $1 AND target_site = $2", $lock))
                    .bind(op_id)
                    .bind(target_site)
                    .fetch_optional(&mut *tx)
                    .await?;
                let op = Self::req_open_op(&mut tx, op_id, target_site).await?;
                let moves = op.mode.as_deref() == Some("ownership");
                match op.status.as_str() {
                    "retry" => {}
                    "failed" if !moves && op.kind != "update" => {}
                    "failed" if op.kind == "update" => {
                        return Err($crate::error::Error::Conflict(format!(
                            "operation {op_id} was an update; the master's next change sends the current state"
                        )));
                    }
                    "failed" => {
                        return Err($crate::error::Error::Conflict(format!(
                            "operation {op_id} moved the ownership, which is back at {}; transfer the request again from there",
                            op.source_site
                        )));
                    }
                    other => {
                        return Err($crate::error::Error::Conflict(format!(
                            "operation {op_id} to {target_site} is {other}; only failed copies and deletes or retrying operations can be retried"
                        )));
                    }
                }
                sqlx::query("UPDATE request_ops SET result = NULL, completed_at = NULL WHERE op_id = $1 AND target_site = $2")
                    .bind(op_id)
                    .bind(target_site)
                    .execute(&mut *tx)
                    .await?;
                Self::req_dispatch(&mut tx, op_id, target_site, op.attempt + 1, None, now).await?;
                let op = Self::req_open_op(&mut tx, op_id, target_site).await?;
                tx.commit().await?;
                Ok(op)
            }

            async fn request_ownership(
                &self,
                request: &str,
            ) -> $crate::error::Result<Option<$crate::store::requests::Ownership>> {
                let row: Option<(String, String, String, Option<String>, Option<String>, i64, Option<chrono::DateTime<chrono::Utc>>)> =
                    sqlx::query_as(
                        "SELECT request_id, human_id, request_type, master_site, in_flight_op, revision, deleted_at \
                         FROM request_owners WHERE request_id = $1 OR human_id = $1 ORDER BY updated_at DESC LIMIT 1",
                    )
                    .bind(request)
                    .fetch_optional(&self.pool)
                    .await?;
                let Some((request_id, human_id, request_type, master_site, in_flight_op, revision, deleted_at)) = row else {
                    return Ok(None);
                };
                let copies: Vec<$crate::store::requests::CopyInfo> = sqlx::query_as(
                    "SELECT site, update_policy, mapping, dirty, last_sent_at FROM request_copies \
                     WHERE request_id = $1 ORDER BY site",
                )
                .bind(&request_id)
                .fetch_all(&self.pool)
                .await?;
                Ok(Some($crate::store::requests::Ownership {
                    request_id,
                    human_id,
                    request_type,
                    master_site,
                    in_flight_op,
                    revision: revision.max(0) as u64,
                    deleted_at,
                    copies,
                }))
            }

            async fn request_backlog(
                &self,
                now: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<Vec<$crate::store::requests::LaneBacklog>> {
                let rows: Vec<(String, String, i64, i64, Option<chrono::DateTime<chrono::Utc>>)> = sqlx::query_as(
                    "SELECT pool, target_site, COUNT(*), \
                     SUM(CASE WHEN status = 'retry' THEN 1 ELSE 0 END), MIN(created_at) \
                     FROM request_ops WHERE status IN ('queued', 'pending', 'retry') \
                     GROUP BY pool, target_site ORDER BY pool, target_site",
                )
                .fetch_all(&self.pool)
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|(pool, target_site, open, retrying, oldest)| $crate::store::requests::LaneBacklog {
                        pool,
                        target_site,
                        open: open.max(0) as u64,
                        retrying: retrying.max(0) as u64,
                        oldest_open_at: oldest,
                        oldest_age_seconds: oldest
                            .map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0)
                            .unwrap_or(0.0),
                    })
                    .collect())
            }
        }
    };
}
pub(crate) use impl_request_store;

pub(crate) use meridian_shared::rules::DEFAULT_POOL;

/// A new operation row.
#[derive(Clone, Copy)]
pub(crate) struct NewOp<'a> {
    pub apply: &'a meridian_shared::transfers::ApplyOperation,
    pub target: &'a str,
    pub origin: &'a str,
    pub pool: &'a str,
    pub rule: Option<&'a str>,
    pub update_policy: &'a str,
    pub keep_copy: bool,
    pub requested_at: DateTime<Utc>,
}

pub(crate) fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Internal(e.to_string()))
}

pub(crate) fn state_of(s: &str) -> Result<meridian_shared::transfers::RequestState> {
    serde_json::from_str(s)
        .map_err(|e| Error::Internal(format!("corrupt request_owners.state: {e}")))
}

pub(crate) fn apply_of(op: &LedgerOp) -> Result<meridian_shared::transfers::ApplyOperation> {
    serde_json::from_str(&op.payload)
        .map_err(|e| Error::Internal(format!("corrupt request_ops.payload of {}: {e}", op.op_id)))
}

/// The request revision an operation carries (0 if its payload does not decode).
pub(crate) fn payload_revision(op: &LedgerOp) -> i64 {
    apply_of(op).map_or(0, |a| i64::try_from(a.request.revision).unwrap_or(i64::MAX))
}

pub(crate) fn site_code(s: &str) -> Result<meridian_shared::SiteCode> {
    meridian_shared::SiteCode::parse(s)
        .map_err(|_| Error::Internal(format!("corrupt site code {s:?} in the ledger")))
}
