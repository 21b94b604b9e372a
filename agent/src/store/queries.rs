//! Statements against the agent store, each taking the connection of a running job so callers
//! compose them into one transaction (a state change and its outbox event commit together).

use chrono::{DateTime, Utc};
use meridian_shared::config::SiteConfig;
use meridian_shared::events::AgentEvent;
use meridian_shared::lineage::{AppliedHead, Gap, Origin, Segment, Step};
use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{Error, Result};

// ---------- identity ----------

/// Who this agent is, once enrolled. `Debug` hides the credential.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub agent_id: String,
    pub site: String,
    pub credential: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("agent_id", &self.agent_id)
            .field("site", &self.site)
            .field("credential", &"***")
            .finish()
    }
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
    crate::auth::end_sessions_ended_by(conn, snapshot)?;
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
    Ok(applied_head(conn)?.seq)
}

/// The last applied command's sequence and nonce (0, 0 when none).
pub fn applied_head(conn: &Connection) -> Result<AppliedHead> {
    let head: Option<(i64, i64)> = conn
        .prepare_cached("SELECT seq, nonce FROM applied_commands ORDER BY seq DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (seq, nonce) = head.unwrap_or((0, 0));
    Ok(AppliedHead { seq: seq as u64, nonce: nonce as u64 })
}

pub fn record_command(
    conn: &Connection,
    seq: u64,
    nonce: u64,
    kind: &str,
    error: Option<&str>,
    now: DateTime<Utc>,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO applied_commands (seq, kind, applied_at, error, nonce) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![seq as i64, kind, now.to_rfc3339(), error, nonce as i64])?;
    Ok(())
}

/// Sets aside the commands applied after `to` (the controller's log no longer holds them as
/// the agent applied them: its database came back from a dump), keeping their nonces so the
/// same command streamed again is recorded without being applied twice. Returns how many.
pub fn set_aside_commands(conn: &Connection, to: u64, now: DateTime<Utc>) -> Result<u64> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO set_aside_commands (nonce, seq, kind, set_aside_at) \
         SELECT nonce, seq, kind, ?2 FROM applied_commands WHERE seq > ?1 AND nonce != 0",
    )?
    .execute(params![to as i64, now.to_rfc3339()])?;
    let n =
        conn.prepare_cached("DELETE FROM applied_commands WHERE seq > ?1")?.execute([to as i64])?;
    Ok(n as u64)
}

/// Whether a command with `nonce` was applied before and set aside; if so it is taken out of
/// the set (it is recorded again under its new sequence).
pub fn take_set_aside(conn: &Connection, nonce: u64) -> Result<bool> {
    if nonce == 0 {
        return Ok(false);
    }
    let n = conn
        .prepare_cached("DELETE FROM set_aside_commands WHERE nonce = ?1")?
        .execute([nonce as i64])?;
    Ok(n > 0)
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

/// Records a cumulative acknowledgement (never backwards, never past the high-water mark) and
/// prunes acknowledged events older than `retention` (`Settings::local_retention_s`: the live
/// event feed and webhooks resume from them).
pub fn ack_outbox(
    conn: &Connection,
    up_to: u64,
    now: DateTime<Utc>,
    retention: chrono::Duration,
) -> Result<()> {
    conn.prepare_cached(
        "UPDATE outbox_state SET acked_seq = ?1 WHERE id = 1 AND acked_seq < ?1 AND ?1 < next_seq",
    )?
    .execute([up_to as i64])?;
    conn.prepare_cached(
        "DELETE FROM outbox WHERE seq <= (SELECT acked_seq FROM outbox_state WHERE id = 1) \
         AND occurred_at_ms < ?1",
    )?
    .execute([(now - retention).timestamp_millis()])?;
    Ok(())
}

/// Sets the central acknowledgement to exactly `acked` (the Welcome's: lower than the one held
/// when the controller's database came back from a dump, so nothing it lacks is pruned).
pub fn set_acked(conn: &Connection, acked: u64) -> Result<()> {
    conn.prepare_cached("UPDATE outbox_state SET acked_seq = ?1 WHERE id = 1 AND ?1 < next_seq")?
        .execute([acked as i64])?;
    Ok(())
}

// ---------- lineage (see meridian_shared::lineage) ----------

/// Starts a new segment of the outbox at the next sequence; called each time the store opens.
pub fn open_segment(conn: &Connection) -> Result<()> {
    let next: i64 =
        conn.query_row("SELECT next_seq FROM outbox_state WHERE id = 1", [], |r| r.get(0))?;
    let mut lineage = lineage(conn)?;
    meridian_shared::lineage::open_segment(
        &mut lineage,
        meridian_shared::lineage::new_nonce(),
        next as u64,
    );
    write_lineage(conn, &lineage)
}

fn lineage(conn: &Connection) -> Result<Vec<Segment>> {
    let mut stmt = conn.prepare_cached(
        "SELECT first_seq, segment_id, origin_keep_through, origin_base, origin_moved_head \
         FROM outbox_lineage ORDER BY first_seq",
    )?;
    let rows = stmt.query_map([], |r| {
        let origin = match (r.get::<_, Option<i64>>(2)?, r.get::<_, Option<i64>>(3)?) {
            (Some(k), Some(b)) => Some(Origin {
                keep_through: k as u64,
                base: b as u64,
                moved_head: r.get::<_, Option<i64>>(4)?.unwrap_or(0) as u64,
            }),
            _ => None,
        };
        Ok(Segment {
            first_seq: r.get::<_, i64>(0)? as u64,
            id: r.get::<_, i64>(1)? as u64,
            origin,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

fn write_lineage(conn: &Connection, lineage: &[Segment]) -> Result<()> {
    conn.execute("DELETE FROM outbox_lineage", [])?;
    let mut insert = conn.prepare_cached(
        "INSERT INTO outbox_lineage (first_seq, segment_id, origin_keep_through, origin_base, \
         origin_moved_head) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for s in lineage {
        insert.execute(params![
            s.first_seq as i64,
            s.id as i64,
            s.origin.map(|o| o.keep_through as i64),
            s.origin.map(|o| o.base as i64),
            s.origin.map(|o| o.moved_head as i64),
        ])?;
    }
    Ok(())
}

fn holes(conn: &Connection) -> Result<Vec<Gap>> {
    let mut stmt =
        conn.prepare_cached("SELECT first_seq, last_seq FROM outbox_holes ORDER BY first_seq")?;
    let rows = stmt.query_map([], |r| {
        Ok(Gap { first: r.get::<_, i64>(0)? as u64, last: r.get::<_, i64>(1)? as u64 })
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// Nonces of the applied commands at the checkpoints below `head`
/// (`meridian_shared::lineage::checkpoints`).
pub fn applied_checkpoints(conn: &Connection, head: u64) -> Result<Vec<(u64, u64)>> {
    let mut stmt = conn.prepare_cached("SELECT nonce FROM applied_commands WHERE seq = ?1")?;
    let mut out = Vec::new();
    for seq in meridian_shared::lineage::checkpoints(head) {
        if let Some(nonce) = stmt.query_row([seq as i64], |r| r.get::<_, i64>(0)).optional()? {
            out.push((seq, nonce as u64));
        }
    }
    Ok(out)
}

/// What the agent reports about its outbox in Hello: the acknowledgement, high water, oldest
/// event held and the segments covering everything above the lower of the first and the one
/// before the oldest (older segments are dropped: nothing can ask for them again).
pub fn outbox_report(conn: &Connection) -> Result<meridian_shared::lineage::AgentOutbox> {
    let (high_water, acked) = outbox_state(conn)?;
    let oldest_retained = oldest_retained(conn)?.unwrap_or(high_water + 1);
    let floor = acked.min(oldest_retained - 1);
    let all = lineage(conn)?;
    let lineage = meridian_shared::lineage::above(&all, floor).to_vec();
    if lineage.len() < all.len() {
        conn.prepare_cached("DELETE FROM outbox_lineage WHERE first_seq < ?1")?
            .execute([lineage.first().map_or(0, |s| s.first_seq) as i64])?;
    }
    let holes = holes(conn)?;
    Ok(meridian_shared::lineage::AgentOutbox { acked, high_water, oldest_retained, lineage, holes })
}

/// The ticket number a queue last issued on a business day, as the controller holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketFloor {
    pub queue: String,
    pub business_day: String,
    pub last_number: u32,
}

/// The store came back from a backup older than what the controller holds: applies one
/// renumbering (`meridian_shared::lineage::Step`): every event after `keep_through` moves to
/// follow `base` (none is lost, no sequence is reused), the lineage follows
/// (`shift_lineage`), the skipped range is remembered as a hole, and local subscribers'
/// cursors move with the events. Returns how many events moved.
pub fn resequence(conn: &Connection, step: &Step, now: DateTime<Utc>) -> Result<u64> {
    let shift = step.base.saturating_sub(step.keep_through) as i64;
    let keep = step.keep_through as i64;
    // Through negative numbers, so no two rows ever hold the same sequence mid-statement.
    let moved =
        conn.execute("UPDATE outbox SET seq = -(seq + ?2) WHERE seq > ?1", [keep, shift])?;
    conn.execute("UPDATE outbox SET seq = -seq WHERE seq < 0", [])?;
    conn.execute(
        "UPDATE outbox_state SET next_seq = MAX(next_seq, ?1 + 1) + ?2, acked_seq = ?1 + ?2 \
         WHERE id = 1",
        [keep, shift],
    )?;
    conn.execute("UPDATE webhook_cursors SET seq = seq + ?2 WHERE seq > ?1", [keep, shift])?;
    let lineage = meridian_shared::lineage::shift_lineage(&lineage(conn)?, step);
    write_lineage(conn, &lineage)?;
    conn.execute("DELETE FROM outbox_holes WHERE last_seq > ?1", [keep])?;
    conn.execute(
        "INSERT INTO outbox_holes (first_seq, last_seq) VALUES (?1, ?2)",
        [keep + 1, step.base as i64],
    )?;
    note(
        conn,
        "agent_restored",
        &format!(
            "restored from backup: {moved} unsent events renumbered after {}, which the \
             controller already held",
            step.base
        ),
        now,
    )?;
    Ok(moved as u64)
}

/// Raises ticket counters to the last tickets the controller saw issued, so a restored
/// branch issues no ticket number twice on a business day.
pub fn raise_ticket_counters(conn: &Connection, floors: &[TicketFloor]) -> Result<()> {
    for f in floors {
        conn.prepare_cached(
            "INSERT INTO ticket_counters (queue, business_day, last_number) VALUES (?1, ?2, ?3) \
             ON CONFLICT (queue, business_day) DO UPDATE \
             SET last_number = MAX(last_number, excluded.last_number)",
        )?
        .execute(params![f.queue, f.business_day, f.last_number])?;
    }
    Ok(())
}

/// Records what a session's start found, for the branch status page.
pub fn note(conn: &Connection, kind: &str, message: &str, now: DateTime<Utc>) -> Result<()> {
    conn.prepare_cached("INSERT INTO store_notices (kind, message, at) VALUES (?1, ?2, ?3)")?
        .execute(params![kind, message, now.to_rfc3339()])?;
    Ok(())
}

/// The newest notice, if any: (kind, message, at).
pub fn last_notice(conn: &Connection) -> Result<Option<(String, String, String)>> {
    Ok(conn
        .prepare_cached("SELECT kind, message, at FROM store_notices ORDER BY id DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?)
}

/// The oldest event still held locally (`None` when the outbox is empty).
pub fn oldest_retained(conn: &Connection) -> Result<Option<u64>> {
    let min: Option<i64> =
        conn.prepare_cached("SELECT MIN(seq) FROM outbox")?.query_row([], |r| r.get(0))?;
    Ok(min.map(|m| m as u64))
}
