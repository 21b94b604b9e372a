//! Store maintenance: time partitions (PostgreSQL) and retention (both backends), run by the
//! controller at start-up and hourly (`run_maintenance`).
//!
//! On PostgreSQL `events` (by `occurred_at`), `visit_facts` (by `created_at`) and
//! `transaction_facts` (by `entered_at`) are partitioned by UTC calendar month
//! (`<table>_pYYYY_MM`, migration 0004) with a DEFAULT partition each. `prepare_partitions`
//! creates the partitions of the current month and the next two ahead of time, so new rows
//! never pile up in the DEFAULT partition (a partition cannot be created while the DEFAULT one
//! holds rows of its range; should that happen anyway — a controller down for months, an agent
//! clock far off — the rows are moved into the new partition under a lock).
//!
//! Retention works in whole UTC months on both backends: with `days` configured, a row goes
//! once its whole month lies before `now - days` ([`cutoff`]). PostgreSQL drops such monthly
//! partitions and deletes the DEFAULT partition's old rows; SQLite deletes rows. Raw events the
//! statistics projector has not consumed yet (`seq` above the agent's `fact_cursors` entry) are
//! never removed: a PostgreSQL partition holding any is kept whole until the next run after
//! they are projected, and the count is logged.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Datelike, Months, NaiveDate, TimeZone, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::Store;
use crate::error::Result;

/// How often the controller runs maintenance (and once at start-up).
pub const MAINTENANCE_EVERY: Duration = Duration::from_secs(3600);

/// Months of partitions created ahead: the current month and the next two.
pub const MONTHS_AHEAD: u32 = 3;

/// The partitioned tables (PostgreSQL) and the column each is partitioned by.
pub const PARTITIONED: [(&str, &str); 3] =
    [("events", "occurred_at"), ("visit_facts", "created_at"), ("transaction_facts", "entered_at")];

/// Days to keep per kind of table; 0 keeps forever. Rollups are always kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Raw events (`events`).
    pub events_days: u32,
    /// `visit_facts`, `transaction_facts`, `session_facts` (closed sessions) and
    /// `quarantined_events`.
    pub facts_days: u32,
}

/// What one retention run removed and kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetentionReport {
    /// Raw events removed (rows deleted plus rows of dropped partitions).
    pub events_removed: u64,
    /// Fact and quarantine rows removed (likewise).
    pub facts_removed: u64,
    /// PostgreSQL partitions dropped.
    pub partitions_dropped: Vec<String>,
    /// Old raw events kept because the projector has not consumed them yet.
    pub unprojected_kept: u64,
}

impl RetentionReport {
    pub fn is_empty(&self) -> bool {
        self == &RetentionReport::default()
    }
}

/// The retention cut-off for `days` at `now`: the start of the UTC month that contains
/// `now - days`; rows before it are removed. `None` (keep forever) when `days` is 0.
pub fn cutoff(now: DateTime<Utc>, days: u32) -> Option<DateTime<Utc>> {
    if days == 0 {
        return None;
    }
    let day = (now - chrono::Duration::days(i64::from(days))).date_naive();
    Some(month_start(first_of_month(day)))
}

/// The first days of the months `prepare_partitions` makes sure exist at `now`.
pub fn months_ahead(now: DateTime<Utc>) -> Vec<NaiveDate> {
    let first = first_of_month(now.date_naive());
    (0..MONTHS_AHEAD).filter_map(|k| first.checked_add_months(Months::new(k))).collect()
}

/// The month of a partition of `table` named by migration 0004's scheme (`events_p2026_11`),
/// `None` for other names (the DEFAULT partition, anything not ours).
pub fn partition_month(table: &str, name: &str) -> Option<NaiveDate> {
    let rest = name.strip_prefix(table)?.strip_prefix("_p")?;
    let (year, month) = rest.split_once('_')?;
    if year.len() != 4 || month.len() != 2 {
        return None;
    }
    NaiveDate::from_ymd_opt(year.parse().ok()?, month.parse().ok()?, 1)
}

/// Whether every row of the partition for `month` lies before `cutoff`.
pub fn partition_expired(month: NaiveDate, cutoff: DateTime<Utc>) -> bool {
    month.checked_add_months(Months::new(1)).is_some_and(|end| month_start(end) <= cutoff)
}

/// Deletes `table`'s rows before `$1` whose event the projector has already consumed (the
/// same statement for SQLite's `events` and PostgreSQL's DEFAULT partition).
pub fn delete_projected_events(table: &str) -> String {
    format!(
        "DELETE FROM {table} WHERE occurred_at < $1 AND seq <= COALESCE(\
         (SELECT c.seq FROM fact_cursors c WHERE c.agent_id = {table}.agent_id), 0)"
    )
}

/// Counts `table`'s rows before `$1` that the projector has not consumed yet.
pub fn count_unprojected_events(table: &str) -> String {
    format!(
        "SELECT COUNT(*) FROM {table} WHERE occurred_at < $1 AND seq > COALESCE(\
         (SELECT c.seq FROM fact_cursors c WHERE c.agent_id = {table}.agent_id), 0)"
    )
}

/// One maintenance pass: partitions ahead, then retention. Logs what it did.
pub async fn maintain(
    store: &dyn Store,
    policy: &RetentionPolicy,
    now: DateTime<Utc>,
) -> Result<RetentionReport> {
    let created = store.prepare_partitions(now).await?;
    if !created.is_empty() {
        tracing::info!(partitions = ?created, "created time partitions");
    }
    let report = store.apply_retention(policy, now).await?;
    if report.unprojected_kept > 0 {
        tracing::warn!(
            events = report.unprojected_kept,
            "retention kept old raw events the statistics projector has not consumed yet"
        );
    }
    if report.events_removed > 0
        || report.facts_removed > 0
        || !report.partitions_dropped.is_empty()
    {
        tracing::info!(
            events = report.events_removed,
            facts = report.facts_removed,
            partitions = ?report.partitions_dropped,
            "retention removed old rows"
        );
    }
    Ok(report)
}

/// Runs `maintain` at once and then every `every` until `shutdown`; a failed pass is logged
/// and retried at the next tick.
pub async fn run_maintenance(
    store: Arc<dyn Store>,
    policy: RetentionPolicy,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = maintain(store.as_ref(), &policy, Utc::now()).await {
            tracing::warn!(error = %e, "store maintenance (partitions, retention) failed; retrying");
        }
    }
}

fn first_of_month(day: NaiveDate) -> NaiveDate {
    day.with_day(1).unwrap_or(day)
}

fn month_start(first: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&first.and_time(chrono::NaiveTime::MIN))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).single().expect("valid time")
    }

    fn date(y: i32, m: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, 1).expect("valid date")
    }

    #[test]
    fn cutoff_is_the_start_of_the_month_of_now_minus_days() {
        let check = |now, days, expected: Option<DateTime<Utc>>| {
            assert_eq!(cutoff(now, days), expected, "{now} - {days} days");
        };
        check(at(2026, 11, 21), 0, None);
        check(at(2026, 11, 21), 1, Some(month_start(date(2026, 11))));
        check(at(2026, 11, 21), 21, Some(month_start(date(2026, 10))));
        check(at(2026, 11, 21), 400, Some(month_start(date(2025, 10))));
        check(at(2026, 3, 1), 1, Some(month_start(date(2026, 2))));
    }

    #[test]
    fn partitions_are_made_for_this_month_and_the_next_two() {
        assert_eq!(months_ahead(at(2026, 11, 30)), [date(2026, 11), date(2026, 12), date(2027, 1)]);
    }

    #[test]
    fn partition_names_follow_the_migration() {
        assert_eq!(partition_month("events", "events_p2026_11"), Some(date(2026, 11)));
        assert_eq!(partition_month("visit_facts", "visit_facts_p1999_01"), Some(date(1999, 1)));
        assert_eq!(partition_month("events", "events_default"), None);
        assert_eq!(partition_month("events", "visit_facts_p2026_11"), None);
        assert_eq!(partition_month("events", "events_p2026_13"), None);
        assert_eq!(partition_month("events", "events_p26_1"), None);
    }

    #[test]
    fn a_partition_expires_when_its_whole_month_is_before_the_cutoff() {
        let cut = month_start(date(2026, 7));
        assert!(partition_expired(date(2026, 6), cut));
        assert!(!partition_expired(date(2026, 7), cut));
        assert!(!partition_expired(date(2026, 8), cut));
    }
}
