//! The PostgreSQL backend (production). Shared SQL lives in `sql_common`; here: connection,
//! migrations, row locking (`FOR UPDATE`), the batched event insert, and maintenance of the
//! monthly time partitions of `events`, `visit_facts` and `transaction_facts` (creation ahead
//! of time, retention by dropping whole partitions; see `maintenance`).

use chrono::{DateTime, Utc};
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};

use super::IncomingEvent;
use super::maintenance::{self, RetentionPolicy, RetentionReport};
use super::sql_common::{Backend, Query, impl_store};
use super::stats_sql::{Col, Column, Rows, Table, Write};
use crate::error::Result;

/// How long maintenance waits for a table lock before giving up until its next run: while it
/// waits, ingest and projection queue behind it.
const LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '10s'";

pub struct PgStore {
    pool: PgPool,
}

impl Backend for PgStore {
    type Db = Postgres;
    type Ids = Vec<String>;
    fn in_ids(column: &str) -> String {
        format!("{column} = ANY($1)")
    }
    fn ids(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| (*s).to_owned()).collect()
    }
    const LOCK_OR_SKIP: &'static str = " FOR UPDATE SKIP LOCKED";
    const SITE_LOCK: &'static str =
        "SELECT pg_advisory_xact_lock(hashtext('meridian_rollup:' || $1))";
    const BOOKING_LOCK: &'static str =
        "SELECT pg_advisory_xact_lock(hashtext('meridian_booking:' || $1))";
    const SCHEDULE_LOCK: &'static str =
        "SELECT pg_try_advisory_xact_lock(hashtext('meridian_appointment_sync_schedule'))";
    const LEDGER_LOCK: &'static str =
        "SELECT pg_try_advisory_xact_lock(hashtext('meridian_request_ledger'))";
    const ROLLOUT_LOCK: &'static str =
        "SELECT pg_try_advisory_xact_lock(hashtext('meridian_rollouts'))";
    const FLUSH_LOCK: &'static str =
        "SELECT pg_try_advisory_xact_lock(hashtext('meridian_request_flush:' || $1))";
    const INGEST_LOCK: &'static str =
        "SELECT pg_advisory_xact_lock(hashtext('meridian_ingest:' || $1))";

    fn insert_rows(table: &Table, write: Write) -> String {
        let arrays: Vec<String> = table
            .cols
            .iter()
            .enumerate()
            .map(|(i, (_, t))| {
                let ty = match t {
                    Col::Text => "text",
                    Col::Int => "bigint",
                    Col::Time => "timestamptz",
                };
                format!("${}::{ty}[]", i + 1)
            })
            .collect();
        format!(
            "INSERT INTO {} ({}) SELECT * FROM UNNEST({}) {}",
            table.name,
            table.col_list(),
            arrays.join(", "),
            table.conflict_clause(write),
        )
    }

    fn bind_rows<'q>(mut query: Query<'q, Postgres>, rows: &Rows) -> Query<'q, Postgres> {
        for column in &rows.columns {
            query = match column {
                Column::Text(v) => query.bind(v),
                Column::Int(v) => query.bind(v),
                Column::Time(v) => query.bind(v),
            };
        }
        query
    }
}

impl PgStore {
    pub async fn connect(url: &str) -> Result<Self> {
        // No JIT: the controller runs short OLTP statements, whose planned cost can still cross
        // the JIT threshold on large tables and then pay 100+ ms of compilation per statement.
        let options = PgConnectOptions::from_str(url)?.options([("jit", "off")]);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_with(options)
            .await?;
        sqlx::migrate!("../migrations/controller-postgres").run(&pool).await?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Tells every replica (on commit) that commands were enqueued or an agent revoked.
    async fn notify_commands(tx: &mut Transaction<'static, Postgres>) -> Result<()> {
        sqlx::query("SELECT pg_notify('meridian_commands', '')").execute(&mut **tx).await?;
        Ok(())
    }

    /// Tells every replica (on commit) that commands were appended to `agent`'s log alone.
    async fn notify_agent_commands(
        tx: &mut Transaction<'static, Postgres>,
        agent: &str,
    ) -> Result<()> {
        sqlx::query("SELECT pg_notify('meridian_commands', $1)")
            .bind(agent)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn watch_commands_impl(
        &self,
        wake: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
        agents: std::sync::Arc<crate::wake::AgentWakes>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let backoff = meridian_shared::backoff::BackoffPolicy::default();
        let mut attempt = 0u32;
        loop {
            let listened = async {
                let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
                listener.listen("meridian_commands").await?;
                // Commands may have been committed while we were not listening.
                wake.send_modify(|n| *n = n.wrapping_add(1));
                loop {
                    let note = listener.recv().await?;
                    attempt = 0;
                    match note.payload() {
                        "" => wake.send_modify(|n| *n = n.wrapping_add(1)),
                        agent => agents.wake(agent),
                    }
                }
                #[allow(unreachable_code)]
                Ok::<(), sqlx::Error>(())
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                result = listened => {
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "LISTEN for commands failed; sessions poll meanwhile");
                    }
                }
            }
            let delay = backoff.delay(attempt, &mut rand::rng());
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn tx(&self) -> Result<Transaction<'static, Postgres>> {
        Ok(self.pool.begin().await?)
    }

    /// Creates the missing partitions of the months ahead through `meridian_month_partition`
    /// (migration 0004), one replica at a time.
    async fn prepare_partitions_impl(&self, now: DateTime<Utc>) -> Result<Vec<String>> {
        let mut tx = self.tx().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('meridian_partitions'))")
            .execute(&mut *tx)
            .await?;
        // Creating a partition locks its parent: never queue ingest behind it for long.
        sqlx::query(LOCK_TIMEOUT).execute(&mut *tx).await?;
        let mut created = Vec::new();
        for (table, column) in maintenance::PARTITIONED {
            for month in maintenance::months_ahead(now) {
                let name: Option<String> =
                    sqlx::query_scalar("SELECT meridian_month_partition($1, $2, $3)")
                        .bind(table)
                        .bind(column)
                        .bind(month)
                        .fetch_one(&mut *tx)
                        .await?;
                created.extend(name);
            }
        }
        tx.commit().await?;
        Ok(created)
    }

    async fn apply_retention_impl(
        &self,
        policy: &RetentionPolicy,
        now: DateTime<Utc>,
    ) -> Result<RetentionReport> {
        let mut report = RetentionReport::default();
        if let Some(cut) = maintenance::cutoff(now, policy.events_days) {
            for name in self.expired_partitions("events", cut).await? {
                // One scan outside any lock: the size for the report and whether the projector
                // is done with the partition.
                let (rows, unprojected): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT COUNT(*), COUNT(*) FILTER (WHERE e.seq > COALESCE(c.seq, 0))                      FROM {name} e LEFT JOIN fact_cursors c ON c.agent_id = e.agent_id"
                )))
                .fetch_one(&self.pool)
                .await?;
                if unprojected > 0 {
                    tracing::warn!(partition = %name, events = unprojected, "retention keeps a partition: the statistics projector has not consumed all its events yet");
                    report.unprojected_kept += unprojected as u64;
                    continue;
                }
                // Under the parent's lock (taken first, as ingest does) nothing new can land in
                // the partition between the last check and the drop.
                let mut tx = self.tx().await?;
                sqlx::query(LOCK_TIMEOUT).execute(&mut *tx).await?;
                sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE").execute(&mut *tx).await?;
                let late: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT EXISTS (SELECT 1 FROM agents a LEFT JOIN fact_cursors c ON c.agent_id = a.id                      WHERE EXISTS (SELECT 1 FROM {name} e WHERE e.agent_id = a.id AND e.seq > COALESCE(c.seq, 0)))"
                )))
                .fetch_one(&mut *tx)
                .await?;
                if late {
                    tracing::warn!(partition = %name, "retention keeps a partition: unprojected events arrived meanwhile");
                    continue;
                }
                sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {name}")))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                report.events_removed += rows as u64;
                report.partitions_dropped.push(name);
            }
            let kept: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(
                maintenance::count_unprojected_events("events_default"),
            ))
            .bind(cut)
            .fetch_one(&self.pool)
            .await?;
            report.unprojected_kept += kept as u64;
            report.events_removed += sqlx::query(sqlx::AssertSqlSafe(
                maintenance::delete_projected_events("events_default"),
            ))
            .bind(cut)
            .execute(&self.pool)
            .await?
            .rows_affected();
        }
        if let Some(cut) = maintenance::cutoff(now, policy.facts_days) {
            for (table, column) in &maintenance::PARTITIONED[1..] {
                for name in self.expired_partitions(table, cut).await? {
                    let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                        "SELECT COUNT(*) FROM {name}"
                    )))
                    .fetch_one(&self.pool)
                    .await?;
                    let mut tx = self.tx().await?;
                    sqlx::query(LOCK_TIMEOUT).execute(&mut *tx).await?;
                    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {name}")))
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    report.facts_removed += rows as u64;
                    report.partitions_dropped.push(name);
                }
                report.facts_removed += sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM {table}_default WHERE {column} < $1"
                )))
                .bind(cut)
                .execute(&self.pool)
                .await?
                .rows_affected();
            }
            for statement in [
                "DELETE FROM session_facts WHERE opened_at < $1 AND closed_at IS NOT NULL",
                "DELETE FROM quarantined_events WHERE received_at < $1",
            ] {
                report.facts_removed +=
                    sqlx::query(statement).bind(cut).execute(&self.pool).await?.rows_affected();
            }
        }
        Ok(report)
    }

    /// `table`'s monthly partitions whose whole month lies before `cut`, oldest first.
    async fn expired_partitions(&self, table: &str, cut: DateTime<Utc>) -> Result<Vec<String>> {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = CAST($1 AS regclass) ORDER BY c.relname",
        )
        .bind(table)
        .fetch_all(&self.pool)
        .await?;
        Ok(names
            .into_iter()
            .filter(|name| {
                maintenance::partition_month(table, name)
                    .is_some_and(|month| maintenance::partition_expired(month, cut))
            })
            .collect())
    }

    /// Inserts events the caller has already filtered to `seq > acked_seq` while holding the
    /// agent's row lock, so no row can conflict; the primary key (agent, seq, occurred_at: it
    /// must contain the partition key) still refuses a resent duplicate, which carries the same
    /// occurred_at, loudly should that invariant ever break (no `ON CONFLICT`, which costs ~30%
    /// of ingest).
    async fn insert_events(
        tx: &mut Transaction<'static, Postgres>,
        agent_id: &str,
        site: &str,
        events: &[&IncomingEvent],
        received_at: DateTime<Utc>,
    ) -> Result<()> {
        let seqs: Vec<i64> = events.iter().map(|e| e.seq as i64).collect();
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        let times: Vec<DateTime<Utc>> = events.iter().map(|e| e.occurred_at).collect();
        let payloads: Vec<&str> = events.iter().map(|e| e.payload.as_str()).collect();
        sqlx::query(
            "INSERT INTO events (agent_id, seq, site, kind, occurred_at, received_at, payload) \
             SELECT $1, t.seq, $2, t.kind, t.occurred_at, $3, t.payload::jsonb \
             FROM UNNEST($4::bigint[], $5::text[], $6::timestamptz[], $7::text[]) \
               AS t(seq, kind, occurred_at, payload)",
        )
        .bind(agent_id)
        .bind(site)
        .bind(received_at)
        .bind(&seqs)
        .bind(&kinds)
        .bind(&times)
        .bind(&payloads)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

impl_store!(PgStore, backend = "postgres", lock = " FOR UPDATE");
