//! The embedded SQLite backend (evaluation and small single-replica installs). Shared SQL lives
//! in `sql_common`; here: connection (WAL, durable commits), migrations, `BEGIN IMMEDIATE`
//! write transactions (SQLite has no row locks; one writer at a time) and the event insert.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use super::IncomingEvent;
use super::sql_common::{Backend, impl_store};
use super::stats_sql::JsonTable;
use crate::error::Result;

pub struct SqliteStore {
    pool: SqlitePool,
}

impl Backend for SqliteStore {
    type Db = Sqlite;
    const JSON_IDS: &'static str = "SELECT value FROM json_each($1)";
    // `BEGIN IMMEDIATE` already makes every write transaction the only writer.
    const SITE_LOCK: &'static str = "SELECT $1";

    fn upsert_json(table: &JsonTable) -> String {
        let values: Vec<String> =
            table.cols.iter().map(|(c, _)| format!("json_extract(value, '$.{c}')")).collect();
        format!(
            "INSERT INTO {} ({}) SELECT {} FROM json_each($1) WHERE true {}",
            table.name,
            table.col_list(),
            values.join(", "),
            table.on_conflict(),
        )
    }
}

impl SqliteStore {
    pub async fn connect(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
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

    async fn watch_commands_impl(
        &self,
        _wake: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
        _shutdown: tokio_util::sync::CancellationToken,
    ) {
    }

    async fn tx(&self) -> Result<Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
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
