//! The statistics half of the store: facts projected from the raw events, rollups, the live
//! state behind the branch panel and the quarantine. Both backends implement it with the shared
//! SQL in `stats_sql`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use meridian_shared::AgentId;
use serde::Serialize;

use crate::error::Result;
use crate::stats::facts::{SessionFact, TransactionFact, VisitFact, Zones};
use crate::stats::report::{Dims, Tally};

/// Which facts to read; days are site-local business days, inclusive.
#[derive(Debug, Clone, Default)]
pub struct FactFilter {
    pub site: Option<String>,
    pub service: Option<String>,
    pub from_day: Option<String>,
    pub to_day: Option<String>,
}

/// The period of a rollup row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Grain {
    /// `YYYY-MM-DD` bounds.
    #[default]
    Day,
    /// Keyed by the Monday (`YYYY-MM-DD`); kept by service only.
    Week,
    /// `YYYY-MM` bounds.
    Month,
}

/// A family of rollups: which dimensions its rows keep (besides site and period).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Family {
    /// Service, queue, counter and staff (daily and monthly).
    #[default]
    Fine,
    /// Service and queue only (daily, weekly, monthly): far fewer rows, enough unless counters
    /// or staff are asked for.
    Service,
    /// Service and counter (monthly): statistics per counter over whole months.
    Counter,
    /// Service and staff member (monthly).
    Staff,
}

/// Which rollup rows to read.
#[derive(Debug, Clone, Default)]
pub struct RollupQuery {
    pub grain: Grain,
    pub family: Family,
    pub site: Option<String>,
    pub service: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
}

/// One rollup row: the tally of a site's visits for one day or month and one combination of
/// service, queue, counter and staff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollupRow {
    pub dims: Dims,
    /// `YYYY-MM-DD` or `YYYY-MM`.
    pub period: String,
    pub tally: Tally,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct QuarantinedEvent {
    pub agent_id: String,
    pub seq: u64,
    pub site: String,
    pub kind: String,
    pub reason: String,
    pub payload: String,
    pub occurred_at: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
}

#[async_trait]
pub trait StatsStore: Send + Sync {
    /// Projects up to `limit` of `agent`'s events after its fact cursor into facts, in one
    /// transaction with the cursor (so each event counts once), quarantining what cannot be
    /// folded and marking the site-days whose rollups must be recomputed. Returns how many events
    /// it consumed (0: caught up, or another projector is working on this agent right now).
    async fn project_facts(&self, agent: AgentId, limit: u32, zones: &Zones) -> Result<usize>;
    /// Recomputes the rollups of up to `limit` marked site-days (and their months) from the
    /// facts; returns how many it recomputed.
    async fn refresh_rollups(&self, limit: u32) -> Result<usize>;
    /// Site-days waiting for their rollups to be recomputed.
    async fn pending_rollups(&self) -> Result<u64>;
    /// How far the projection is behind: events stored but not yet projected, over all agents.
    async fn projection_lag(&self) -> Result<u64>;
    async fn visit_facts(&self, filter: &FactFilter) -> Result<Vec<VisitFact>>;
    async fn transaction_facts(&self, filter: &FactFilter) -> Result<Vec<TransactionFact>>;
    /// Sessions opened on the filter's site-local days (service filter ignored).
    async fn session_facts(&self, filter: &FactFilter) -> Result<Vec<SessionFact>>;
    /// Transactions still open (waiting, called or being served).
    async fn open_transactions(&self, site: Option<&str>) -> Result<Vec<TransactionFact>>;
    /// Service points open and staff logged in now.
    async fn open_sessions(&self, site: Option<&str>) -> Result<Vec<SessionFact>>;
    async fn rollups(&self, query: &RollupQuery) -> Result<Vec<RollupRow>>;
    /// The newest quarantined events first.
    async fn quarantined(&self, limit: u32) -> Result<Vec<QuarantinedEvent>>;
    /// Drops every fact, rollup and cursor (and what the projector quarantined), so the next
    /// projection rebuilds them from the raw events.
    async fn reset_facts(&self) -> Result<()>;
}
