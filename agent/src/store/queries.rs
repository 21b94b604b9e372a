//! Statements against the agent store, each taking the connection of a running job so callers
//! compose them into one transaction (a state change and its outbox event commit together).

use chrono::{DateTime, Utc};
use meridian_shared::config::SiteConfig;
use meridian_shared::events::AgentEvent;
use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{Error, Result};

// ---------- identity ----------

/// Who this agent is, once enrolled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub agent_id: String,
    pub site: String,
    pub credential: String,
}

fn meta_get(conn: &Connection, key: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?)
}

fn meta_set(conn: &Connection, key: &str, value: &str) -> Result<()> {
    conn.prepare_cached("INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value")?.execute([key, value],
    )?;
    Ok(())
}

pub fn identity(conn: &Connection) -> Result<Option<Identity>> {
    let (Some(agent_id), Some(site), Some(credential)) =
        (meta_get(conn, "agent_id")?, meta_get(conn, "site")?, meta_get(conn, "credential")?)
    else {
        return Ok(None);
    };
    Ok(Some(Identity { agent_id, site, credential }))
}

pub fn save_identity(conn: &Connection, id: &Identity) -> Result<()> {
    meta_set(conn, "agent_id", &id.agent_id)?;
    meta_set(conn, "site", &id.site)?;
    meta_set(conn, "credential", &id.credential)
}

// ---------- clock ----------

/// The last good wall time the guarded clock kept (`clock::keep_last_good`); a value this
/// version cannot read counts as none.
pub fn clock_last_good(conn: &Connection) -> Result<Option<crate::clock::LastGood>> {
    Ok(meta_get(conn, "clock_last_good")?.and_then(|v| serde_json::from_str(&v).ok()))
}

pub fn save_clock_last_good(conn: &Connection, last: &crate::clock::LastGood) -> Result<()> {
    let value = serde_json::to_string(last).map_err(|e| Error::Internal(e.to_string()))?;
    meta_set(conn, "clock_last_good", &value)
}

// ---------- configuration and commands ----------

pub fn site_config(conn: &Connection) -> Result<Option<SiteConfig>> {
    let body: Option<String> = conn
        .prepare_cached("SELECT body FROM site_config WHERE id = 1")?
        .query_row([], |r| r.get(0))
        .optional()?;
    body.map(|b| {
        serde_json::from_str(&b)
            .map_err(|e| Error::Internal(format!("stored configuration is unreadable: {e}")))
    })
    .transpose()
}

pub fn config_revision(conn: &Connection) -> Result<u64> {
    let rev: Option<i64> = conn
        .query_row("SELECT revision FROM site_config WHERE id = 1", [], |r| r.get(0))
        .optional()?;
    Ok(rev.unwrap_or(0) as u64)
}

/// Replaces the configuration when `snapshot` is newer, recording `CONFIG_APPLIED`. Runtime
/// data (visits, counters) is untouched. Returns whether it was applied.
pub fn apply_config(conn: &Connection, snapshot: &SiteConfig, now: DateTime<Utc>) -> Result<bool> {
    let current = config_revision(conn)?;
    if snapshot.revision <= current {
        return Ok(false);
    }
    let body = serde_json::to_string(snapshot).map_err(|e| Error::Internal(e.to_string()))?;
    conn.prepare_cached("INSERT INTO site_config (id, revision, body, applied_at) VALUES (1, ?1, ?2, ?3) \
         ON CONFLICT (id) DO UPDATE SET revision = excluded.revision, body = excluded.body, applied_at = excluded.applied_at")?.execute(params![snapshot.revision as i64, body, now.to_rfc3339()],
    )?;
    append_event(
        conn,
        &AgentEvent::ConfigApplied(meridian_shared::events::ConfigApplied {
            revision: snapshot.revision,
            previous_revision: current,
        }),
        now,
    )?;
    Ok(true)
}

pub fn last_applied_command(conn: &Connection) -> Result<u64> {
    let seq: Option<i64> = conn
        .prepare_cached("SELECT MAX(seq) FROM applied_commands")?
        .query_row([], |r| r.get(0))?;
    Ok(seq.unwrap_or(0) as u64)
}

pub fn record_command(
    conn: &Connection,
    seq: u64,
    kind: &str,
    error: Option<&str>,
    now: DateTime<Utc>,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO applied_commands (seq, kind, applied_at, error) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![seq as i64, kind, now.to_rfc3339(), error])?;
    Ok(())
}

// ---------- outbox ----------

/// One event waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    pub seq: u64,
    pub kind: String,
    pub occurred_at_ms: i64,
    pub payload: Vec<u8>,
}

/// Appends `event` with the next gapless sequence; call inside the job that makes the change.
pub fn append_event(conn: &Connection, event: &AgentEvent, now: DateTime<Utc>) -> Result<u64> {
    let seq: i64 = conn
        .prepare_cached(
            "UPDATE outbox_state SET next_seq = next_seq + 1 WHERE id = 1 RETURNING next_seq - 1",
        )?
        .query_row([], |r| r.get(0))?;
    conn.prepare_cached(
        "INSERT INTO outbox (seq, kind, occurred_at_ms, payload) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![seq, event.kind(), now.timestamp_millis(), event.payload()])?;
    Ok(seq as u64)
}

/// `(high_water, acked)`: the last sequence assigned and the last acknowledged centrally.
pub fn outbox_state(conn: &Connection) -> Result<(u64, u64)> {
    let (next, acked): (i64, i64) = conn
        .prepare_cached("SELECT next_seq, acked_seq FROM outbox_state WHERE id = 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(((next - 1) as u64, acked as u64))
}

pub fn outbox_after(conn: &Connection, after: u64, limit: u32) -> Result<Vec<OutboxEvent>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, kind, occurred_at_ms, payload FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after as i64, limit], |r| {
        Ok(OutboxEvent {
            seq: r.get::<_, i64>(0)? as u64,
            kind: r.get(1)?,
            occurred_at_ms: r.get(2)?,
            payload: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// How long acknowledged events stay in the outbox for local subscribers (the live event feed
/// and webhooks resume from it).
pub const LOCAL_RETENTION: chrono::Duration = chrono::Duration::hours(24);

/// Records a cumulative acknowledgement (never backwards, never past the high-water mark) and
/// prunes acknowledged events older than `LOCAL_RETENTION`.
pub fn ack_outbox(conn: &Connection, up_to: u64, now: DateTime<Utc>) -> Result<()> {
    conn.prepare_cached(
        "UPDATE outbox_state SET acked_seq = ?1 WHERE id = 1 AND acked_seq < ?1 AND ?1 < next_seq",
    )?
    .execute([up_to as i64])?;
    conn.prepare_cached(
        "DELETE FROM outbox WHERE seq <= (SELECT acked_seq FROM outbox_state WHERE id = 1) \
         AND occurred_at_ms < ?1",
    )?
    .execute([(now - LOCAL_RETENTION).timestamp_millis()])?;
    Ok(())
}

/// The oldest event still held locally (`None` when the outbox is empty).
pub fn oldest_retained(conn: &Connection) -> Result<Option<u64>> {
    let min: Option<i64> =
        conn.prepare_cached("SELECT MIN(seq) FROM outbox")?.query_row([], |r| r.get(0))?;
    Ok(min.map(|m| m as u64))
}
