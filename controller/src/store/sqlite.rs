//! The embedded SQLite backend (evaluation and small single-replica installs). Shared SQL lives
//! in `sql_common`; here: connection (WAL, durable commits), migrations, `BEGIN IMMEDIATE`
//! write transactions (SQLite has no row locks; one writer at a time), the event insert and
//! retention by `DELETE` (no partitions).

use std::str::FromStr;

use chrono::{DateTime, Utc};
use meridian_shared::private_files;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use super::IncomingEvent;
use super::maintenance::{self, RetentionPolicy, RetentionReport};
use super::sql_common::{Backend, Query, impl_store};
use super::stats_sql::{Rows, Table, Write};
use crate::error::{Error, Result};

pub struct SqliteStore {
    pool: SqlitePool,
}

impl Backend for SqliteStore {
    type Db = Sqlite;
    /// A JSON array of strings.
    type Ids = String;
    fn in_ids(column: &str) -> String {
        format!("{column} IN (SELECT value FROM json_each($1))")
    }
    fn ids(ids: &[&str]) -> String {
        serde_json::Value::from(ids.to_vec()).to_string()
    }
    // `BEGIN IMMEDIATE` already makes every write transaction the only writer.
    const LOCK_OR_SKIP: &'static str = "";
    const SITE_LOCK: &'static str = "SELECT $1";
    const BOOKING_LOCK: &'static str = "SELECT $1";
    const SCHEDULE_LOCK: &'static str = "SELECT TRUE";
    const LEDGER_LOCK: &'static str = "SELECT TRUE";
    const ROLLOUT_LOCK: &'static str = "SELECT TRUE";
    const FLUSH_LOCK: &'static str = "SELECT $1 IS NOT NULL";
    const INGEST_LOCK: &'static str = "SELECT $1";

    fn insert_rows(table: &Table, write: Write) -> String {
        let values: Vec<String> =
            table.cols.iter().map(|(c, _)| format!("json_extract(value, '$.{c}')")).collect();
        format!(
            "INSERT INTO {} ({}) SELECT {} FROM json_each($1) WHERE true {}",
            table.name,
            table.col_list(),
            values.join(", "),
            table.conflict_clause(write),
        )
    }

    fn bind_rows<'q>(query: Query<'q, Sqlite>, rows: &Rows) -> Query<'q, Sqlite> {
        query.bind(rows.to_json())
    }
}

impl SqliteStore {
    pub async fn connect(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?;
        // The database is the owner's only (SQLite would create it 0644, and its -wal and -shm
        // files like it).
        let file = options.get_filename();
        let in_memory = url.contains(":memory:")
            || url.contains("mode=memory")
            || file.to_string_lossy().starts_with("file:");
        if !in_memory {
            private_files::sqlite_database(file)
                .map_err(|e| Error::Internal(format!("{}: {e}", file.display())))?;
        }
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        sqlx::migrate!("../migrations/controller-sqlite").run(&pool).await?;
        Ok(Self { pool })
    }

    /// One replica only: its own sessions are woken directly.
    async fn notify_commands(_tx: &mut Transaction<'static, Sqlite>) -> Result<()> {
        Ok(())
    }

    async fn notify_agent_commands(
        _tx: &mut Transaction<'static, Sqlite>,
        _agent: &str,
    ) -> Result<()> {
        Ok(())
    }

    async fn watch_commands_impl(
        &self,
        _wake: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
        _agents: std::sync::Arc<crate::wake::AgentWakes>,
        _shutdown: tokio_util::sync::CancellationToken,
    ) {
    }

    async fn tx(&self) -> Result<Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// SQLite is not partitioned.
    async fn prepare_partitions_impl(&self, _now: DateTime<Utc>) -> Result<Vec<String>> {
        Ok(vec![])
    }

    /// Deletes old rows in one write transaction. Times are compared as text: the cut-off is a
    /// whole second (a month start) and both stored formats (sqlx's RFC 3339 and the facts'
    /// `…Z`) start with the same `YYYY-MM-DDTHH:MM:SS`, so text order is time order here.
    async fn apply_retention_impl(
        &self,
        policy: &RetentionPolicy,
        now: DateTime<Utc>,
    ) -> Result<RetentionReport> {
        let mut report = RetentionReport::default();
        let mut tx = self.tx().await?;
        if let Some(cut) = maintenance::cutoff(now, policy.events_days) {
            let kept: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(
                maintenance::count_unprojected_events("events"),
            ))
            .bind(cut)
            .fetch_one(&mut *tx)
            .await?;
            report.unprojected_kept = kept as u64;
            report.events_removed =
                sqlx::query(sqlx::AssertSqlSafe(maintenance::delete_projected_events("events")))
                    .bind(cut)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
        }
        if let Some(cut) = maintenance::cutoff(now, policy.facts_days) {
            for statement in [
                "DELETE FROM visit_facts WHERE created_at < $1",
                "DELETE FROM transaction_facts WHERE entered_at < $1",
                "DELETE FROM session_facts WHERE opened_at < $1 AND closed_at IS NOT NULL",
                "DELETE FROM quarantined_events WHERE received_at < $1",
            ] {
                report.facts_removed +=
                    sqlx::query(statement).bind(cut).execute(&mut *tx).await?.rows_affected();
            }
        }
        tx.commit().await?;
        Ok(report)
    }

    async fn insert_events(
        tx: &mut Transaction<'static, Sqlite>,
        agent_id: &str,
        site: &str,
        events: &[&IncomingEvent],
        received_at: DateTime<Utc>,
    ) -> Result<()> {
        for e in events {
            sqlx::query(
                "INSERT INTO events (agent_id, seq, site, kind, occurred_at, received_at, payload) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (agent_id, seq) DO NOTHING",
            )
            .bind(agent_id)
            .bind(e.seq as i64)
            .bind(site)
            .bind(&e.kind)
            .bind(e.occurred_at)
            .bind(received_at)
            .bind(&e.payload)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }
}

impl_store!(SqliteStore, backend = "sqlite", lock = "");
