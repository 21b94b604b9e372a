//! The PostgreSQL backend (production). Shared SQL lives in `sql_common`; here: connection,
//! migrations, row locking (`FOR UPDATE`) and the batched event insert.

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};

use super::IncomingEvent;
use super::sql_common::{Backend, impl_store};
use super::stats_sql::{Col, JsonTable};
use crate::error::Result;

pub struct PgStore {
    pool: PgPool,
}

impl Backend for PgStore {
    type Db = Postgres;
    const JSON_IDS: &'static str = "SELECT jsonb_array_elements_text(CAST($1 AS jsonb))";
    const SITE_LOCK: &'static str =
        "SELECT pg_advisory_xact_lock(hashtext('meridian_rollup:' || $1))";

    fn upsert_json(table: &JsonTable) -> String {
        let types: Vec<String> = table
            .cols
            .iter()
            .map(|(c, t)| {
                let ty = match t {
                    Col::Text => "text",
                    Col::Int => "bigint",
                    Col::Time => "timestamptz",
                };
                format!("{c} {ty}")
            })
            .collect();
        format!(
            "INSERT INTO {} ({cols}) SELECT {cols} FROM jsonb_to_recordset(CAST($1 AS jsonb)) AS j({}) {}",
            table.name,
            types.join(", "),
            table.on_conflict(),
            cols = table.col_list(),
        )
    }
}

impl PgStore {
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
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

    async fn watch_commands_impl(
        &self,
        wake: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
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
                    listener.recv().await?;
                    attempt = 0;
                    wake.send_modify(|n| *n = n.wrapping_add(1));
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

    /// Inserts events the caller has already filtered to `seq > acked_seq` while holding the
    /// agent's row lock, so no row can conflict; the primary key still refuses a duplicate
    /// loudly should that invariant ever break (no `ON CONFLICT`, which costs ~30% of ingest).
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
