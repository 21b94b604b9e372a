//! What the start of a session reconciles (migration 0014): each agent's outbox lineage, the
//! repairs decided by `meridian_shared::lineage` when either end's store came back from a
//! backup, and the incidents that make them visible. Both backends implement `SessionStore`
//! with the SQL of `impl_session_store!`, which `impl_store!` expands.
//!
//! Invariants every backend keeps:
//! - a repair is written under the agent's ingest lock, only if the agent's acknowledgement is
//!   still the one the plan was made from, together with its incidents — all or nothing;
//! - a gap moves the acknowledgement past events the controller will never have only together
//!   with the incident that records it, which stays open until an admin acknowledges it.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use meridian_shared::AgentId;
use meridian_shared::lineage::{Gap, Segment};
use serde::Serialize;

use crate::error::Result;

/// What the controller holds for an agent when its session starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    /// The gapless high-water mark of its stored events.
    pub acked: u64,
    /// Its lineage from the segment covering `floor + 1` on.
    pub lineage: Vec<Segment>,
    /// Gaps recorded for it above `floor`.
    pub gaps: Vec<Gap>,
    /// The last sequence of its command log.
    pub command_seq: u64,
    /// The nonces of its logged commands at the sequences asked for.
    pub nonces: std::collections::BTreeMap<u64, u64>,
}

/// The kinds of incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IncidentKind {
    /// The agent's store came back from a backup; its unsent events were renumbered.
    AgentRestored,
    /// The controller's database came back from a dump; the agent's commands and
    /// configuration were brought in line.
    ControllerRestored,
    /// Events the controller will never have (the agent had pruned them).
    EventGap,
    /// Repeated failed staff sign-ins locked a user or an address at the branch
    /// (`STAFF_LOGIN_LOCKED`): someone may be guessing passwords.
    SignInLocked,
}

impl IncidentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IncidentKind::AgentRestored => "agent_restored",
            IncidentKind::ControllerRestored => "controller_restored",
            IncidentKind::EventGap => "event_gap",
            IncidentKind::SignInLocked => "sign_in_locked",
        }
    }

    pub fn parse(s: &str) -> Option<IncidentKind> {
        [
            IncidentKind::AgentRestored,
            IncidentKind::ControllerRestored,
            IncidentKind::EventGap,
            IncidentKind::SignInLocked,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// Something the start of a session found and repaired, for admins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Incident {
    pub id: String,
    pub agent_id: String,
    pub site: String,
    pub kind: IncidentKind,
    /// One sentence, e.g. "restored from backup: resequenced 300 events".
    pub summary: String,
    /// The written-off range of an `event_gap`: `{"first", "last"}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub gap: Option<Gap>,
    pub occurred_at: DateTime<Utc>,
    pub acknowledged_at: Option<DateTime<Utc>>,
    pub acknowledged_by: Option<String>,
}

impl Incident {
    pub fn new(
        agent: AgentId,
        site: &str,
        kind: IncidentKind,
        summary: String,
        at: DateTime<Utc>,
    ) -> Incident {
        Incident {
            id: uuid::Uuid::now_v7().to_string(),
            agent_id: agent.to_string(),
            site: site.to_owned(),
            kind,
            summary,
            gap: None,
            occurred_at: at,
            acknowledged_at: None,
            acknowledged_by: None,
        }
    }
}

/// The incidents a batch of events raises: one per `STAFF_LOGIN_LOCKED`.
pub fn sign_in_lock_incidents(
    agent_id: &str,
    site: &str,
    events: &[&crate::store::IncomingEvent],
) -> Vec<Incident> {
    use meridian_shared::events::{AgentEvent, LockedSubject, STAFF_LOGIN_LOCKED};
    events
        .iter()
        .filter(|e| e.kind == STAFF_LOGIN_LOCKED && e.quarantine.is_none())
        .filter_map(|e| match AgentEvent::decode(&e.kind, e.payload.as_bytes()) {
            Ok(Some(AgentEvent::LoginLocked(l))) => Some(l),
            _ => None,
        })
        .map(|l| {
            let what = match l.subject {
                LockedSubject::User => format!("user {:?}", l.name),
                LockedSubject::Address => format!("address {}", l.name),
            };
            Incident {
                id: uuid::Uuid::now_v7().to_string(),
                agent_id: agent_id.to_owned(),
                site: site.to_owned(),
                kind: IncidentKind::SignInLocked,
                summary: format!(
                    "sign-in locked for {what} after {} failed attempts, until {}",
                    l.failures,
                    l.until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
                gap: None,
                occurred_at: l.at,
                acknowledged_at: None,
                acknowledged_by: None,
            }
        })
        .collect()
}

/// The writes of a session's reconciliation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRepair {
    /// The acknowledgement the plan was made from; nothing is written if it moved.
    pub expected_acked: u64,
    /// The acknowledgement from now on (moved past a gap).
    pub acked: u64,
    /// The lineage from this sequence on is replaced by `lineage`.
    pub lineage_from: u64,
    pub lineage: Vec<Segment>,
    pub incidents: Vec<Incident>,
}

/// Which incidents to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IncidentFilter {
    pub agent: Option<String>,
    pub open_only: bool,
    pub limit: u32,
}

/// The last ticket of a queue on a business day, as stored centrally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketFloor {
    pub queue: String,
    pub business_day: String,
    pub ticket: String,
}

#[async_trait]
pub trait SessionStore: Send + Sync {
    /// What the controller holds for `agent`: its lineage from the segment covering
    /// `floor + 1`, its gaps above `floor`, and the nonces of its logged commands at `seqs`.
    async fn session_state(&self, agent: AgentId, floor: u64, seqs: &[u64])
    -> Result<SessionState>;

    /// Writes `repair` under the agent's ingest lock; false (and nothing written) when the
    /// agent's acknowledgement is no longer `repair.expected_acked`.
    async fn repair_session(&self, agent: AgentId, repair: &SessionRepair) -> Result<bool>;

    /// The last ticket per (queue, business day) among `agent`'s stored `VISIT_CREATED` events
    /// after `after_seq` that occurred since `since`.
    async fn ticket_floors(
        &self,
        agent: AgentId,
        after_seq: u64,
        since: DateTime<Utc>,
    ) -> Result<Vec<TicketFloor>>;

    /// Newest first.
    async fn incidents(&self, filter: &IncidentFilter) -> Result<Vec<Incident>>;

    /// Marks incident `id` acknowledged by `by`; false when unknown or already acknowledged.
    async fn acknowledge_incident(&self, id: &str, by: &str, at: DateTime<Utc>) -> Result<bool>;
}

#[derive(sqlx::FromRow)]
pub(crate) struct LineageRow {
    first_seq: i64,
    segment_id: i64,
    origin_keep_through: Option<i64>,
    origin_base: Option<i64>,
    origin_moved_head: Option<i64>,
}

impl From<LineageRow> for Segment {
    fn from(r: LineageRow) -> Segment {
        let origin = match (r.origin_keep_through, r.origin_base) {
            (Some(k), Some(b)) => Some(meridian_shared::lineage::Origin {
                keep_through: k as u64,
                base: b as u64,
                moved_head: r.origin_moved_head.unwrap_or(0) as u64,
            }),
            _ => None,
        };
        Segment { id: r.segment_id as u64, first_seq: r.first_seq as u64, origin }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct IncidentRow {
    id: String,
    agent_id: String,
    site: String,
    kind: String,
    summary: String,
    gap_first: Option<i64>,
    gap_last: Option<i64>,
    occurred_at: DateTime<Utc>,
    acknowledged_at: Option<DateTime<Utc>>,
    acknowledged_by: Option<String>,
}

impl TryFrom<IncidentRow> for Incident {
    type Error = crate::error::Error;
    fn try_from(r: IncidentRow) -> Result<Self> {
        let kind = IncidentKind::parse(&r.kind).ok_or_else(|| {
            crate::error::Error::Internal(format!("unknown incident kind {:?}", r.kind))
        })?;
        let gap = match (r.gap_first, r.gap_last) {
            (Some(f), Some(l)) => Some(Gap { first: f as u64, last: l as u64 }),
            _ => None,
        };
        Ok(Incident {
            id: r.id,
            agent_id: r.agent_id,
            site: r.site,
            kind,
            summary: r.summary,
            gap,
            occurred_at: r.occurred_at,
            acknowledged_at: r.acknowledged_at,
            acknowledged_by: r.acknowledged_by,
        })
    }
}

/// The last ticket per (queue, day) of `VISIT_CREATED` payloads read in sequence order.
pub(crate) fn last_tickets(payloads: &[String]) -> Vec<TicketFloor> {
    let mut last: std::collections::BTreeMap<(String, String), String> = Default::default();
    for p in payloads {
        if let Ok(v) = serde_json::from_str::<meridian_shared::events::VisitCreated>(p) {
            last.insert((v.queue.to_string(), v.business_day.to_string()), v.ticket);
        }
    }
    last.into_iter()
        .map(|((queue, business_day), ticket)| TicketFloor { queue, business_day, ticket })
        .collect()
}

macro_rules! impl_session_store {
    ($ty:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::sessions::SessionStore for $ty {
            async fn session_state(
                &self,
                agent: meridian_shared::AgentId,
                floor: u64,
                seqs: &[u64],
            ) -> $crate::error::Result<$crate::store::sessions::SessionState> {
                let id = $crate::store::sql_common::agent_key(agent);
                let mut tx = self.pool.begin().await?;
                let (acked, command_seq): (i64, i64) = sqlx::query_as(
                    "SELECT acked_seq, command_seq FROM agents WHERE id = $1",
                )
                .bind(&id)
                .fetch_one(&mut *tx)
                .await?;
                let lineage: Vec<$crate::store::sessions::LineageRow> = sqlx::query_as(
                    "SELECT first_seq, segment_id, origin_keep_through, origin_base, \
                     origin_moved_head FROM agent_lineage WHERE agent_id = $1 \
                     AND first_seq >= COALESCE((SELECT MAX(first_seq) FROM agent_lineage \
                     WHERE agent_id = $1 AND first_seq <= $2), 0) ORDER BY first_seq",
                )
                .bind(&id)
                .bind((floor as i64).saturating_add(1))
                .fetch_all(&mut *tx)
                .await?;
                let gaps: Vec<(i64, i64)> = sqlx::query_as(
                    "SELECT gap_first, gap_last FROM agent_incidents WHERE agent_id = $1 \
                     AND kind = 'event_gap' AND gap_last > $2 ORDER BY gap_first",
                )
                .bind(&id)
                .bind(floor as i64)
                .fetch_all(&mut *tx)
                .await?;
                let mut nonces = std::collections::BTreeMap::new();
                for &seq in seqs {
                    let nonce: Option<i64> = sqlx::query_scalar(
                        "SELECT nonce FROM agent_commands WHERE agent_id = $1 AND seq = $2",
                    )
                    .bind(&id)
                    .bind(seq as i64)
                    .fetch_optional(&mut *tx)
                    .await?;
                    if let Some(n) = nonce {
                        nonces.insert(seq, n as u64);
                    }
                }
                tx.commit().await?;
                Ok($crate::store::sessions::SessionState {
                    acked: acked as u64,
                    lineage: lineage.into_iter().map(Into::into).collect(),
                    gaps: gaps
                        .into_iter()
                        .map(|(f, l)| meridian_shared::lineage::Gap { first: f as u64, last: l as u64 })
                        .collect(),
                    command_seq: command_seq as u64,
                    nonces,
                })
            }

            async fn repair_session(
                &self,
                agent: meridian_shared::AgentId,
                r: &$crate::store::sessions::SessionRepair,
            ) -> $crate::error::Result<bool> {
                let id = $crate::store::sql_common::agent_key(agent);
                let mut tx = self.tx().await?;
                sqlx::query(<$ty as $crate::store::sql_common::Backend>::INGEST_LOCK)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
                let acked: Option<i64> =
                    sqlx::query_scalar("SELECT acked_seq FROM agents WHERE id = $1")
                        .bind(&id)
                        .fetch_optional(&mut *tx)
                        .await?;
                if acked != Some(r.expected_acked as i64) {
                    return Ok(false);
                }
                sqlx::query("DELETE FROM agent_lineage WHERE agent_id = $1 AND first_seq >= $2")
                    .bind(&id)
                    .bind(r.lineage_from as i64)
                    .execute(&mut *tx)
                    .await?;
                for s in &r.lineage {
                    sqlx::query(
                        "INSERT INTO agent_lineage (agent_id, first_seq, segment_id, \
                         origin_keep_through, origin_base, origin_moved_head) \
                         VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(&id)
                    .bind(s.first_seq as i64)
                    .bind(s.id as i64)
                    .bind(s.origin.map(|o| o.keep_through as i64))
                    .bind(s.origin.map(|o| o.base as i64))
                    .bind(s.origin.map(|o| o.moved_head as i64))
                    .execute(&mut *tx)
                    .await?;
                }
                for i in &r.incidents {
                    sqlx::query(
                        "INSERT INTO agent_incidents (id, agent_id, site, kind, summary, gap_first, \
                         gap_last, occurred_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    )
                    .bind(&i.id)
                    .bind(&i.agent_id)
                    .bind(&i.site)
                    .bind(i.kind.as_str())
                    .bind(&i.summary)
                    .bind(i.gap.map(|g| g.first as i64))
                    .bind(i.gap.map(|g| g.last as i64))
                    .bind(i.occurred_at)
                    .execute(&mut *tx)
                    .await?;
                }
                if r.acked != r.expected_acked {
                    sqlx::query("UPDATE agents SET acked_seq = $2 WHERE id = $1")
                        .bind(&id)
                        .bind(r.acked as i64)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(true)
            }

            async fn ticket_floors(
                &self,
                agent: meridian_shared::AgentId,
                after_seq: u64,
                since: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<Vec<$crate::store::sessions::TicketFloor>> {
                let payloads: Vec<String> = sqlx::query_scalar(
                    "SELECT CAST(payload AS TEXT) FROM events WHERE agent_id = $1 AND seq > $2 \
                     AND kind = 'VISIT_CREATED' AND occurred_at >= $3 ORDER BY seq",
                )
                .bind($crate::store::sql_common::agent_key(agent))
                .bind(after_seq as i64)
                .bind(since)
                .fetch_all(&self.pool)
                .await?;
                Ok($crate::store::sessions::last_tickets(&payloads))
            }

            async fn incidents(
                &self,
                f: &$crate::store::sessions::IncidentFilter,
            ) -> $crate::error::Result<Vec<$crate::store::sessions::Incident>> {
                let rows: Vec<$crate::store::sessions::IncidentRow> = sqlx::query_as(
                    "SELECT id, agent_id, site, kind, summary, gap_first, gap_last, occurred_at, \
                     acknowledged_at, acknowledged_by FROM agent_incidents \
                     WHERE ($1 IS NULL OR agent_id = $1) AND (NOT $2 OR acknowledged_at IS NULL) \
                     ORDER BY occurred_at DESC, id DESC LIMIT $3",
                )
                .bind(f.agent.as_deref())
                .bind(f.open_only)
                .bind(i64::from(f.limit))
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            async fn acknowledge_incident(
                &self,
                id: &str,
                by: &str,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<bool> {
                let done = sqlx::query(
                    "UPDATE agent_incidents SET acknowledged_at = $2, acknowledged_by = $3 \
                     WHERE id = $1 AND acknowledged_at IS NULL",
                )
                .bind(id)
                .bind(at)
                .bind(by)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() > 0)
            }
        }
    };
}
pub(crate) use impl_session_store;
