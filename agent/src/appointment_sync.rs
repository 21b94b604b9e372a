//! The nightly bulk sync of appointments at the branch. The controller asks with an
//! `APPOINTMENTS_SYNC` command (recorded by `record_request` in the command's transaction, so
//! the session never waits for the transfer); `run` then fetches the sync's snapshot with the
//! `FetchAppointments` RPC on its own connection, beside the session:
//!
//! - every chunk is checked (SHA-256, decodes, repeats the sync's manifest, is the next index,
//!   holds only appointments of this site and of the sync's days) and staged in
//!   `appointment_sync_chunks` before the next is read, so a cut transfer resumes after the
//!   last staged chunk with exactly the chunks it missed (the controller keeps the snapshot);
//! - when every chunk is staged, one transaction replaces the appointments of the sync's days
//!   (`replace`), records the watermark (`appointment_sync_state`) and queues
//!   `APPOINTMENTS_SYNCED` for the controller;
//! - a chunk that fails a check ends the sync as failed (`APPOINTMENTS_SYNC_FAILED`), drops
//!   what was staged and leaves the previous set in force.
//!
//! Only the newest requested sync runs; a newer request supersedes older ones.
//!
//! **Replace rule:** every appointment of the snapshot is stored unless the branch holds a
//! higher revision (sent live after the snapshot); an appointment of the sync's days that the
//! snapshot lacks is removed, unless a live command after the snapshot wrote it
//! (`source_seq > as_of_command_seq`) or the branch has recorded its attendance (the branch's
//! arrival wins; see `check_in`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use meridian_proto::AppointmentChunk;
use meridian_shared::appointments::{AppointmentSnapshot, decode_chunk};
use meridian_shared::backoff::BackoffPolicy;
use meridian_shared::commands::SyncRequest;
use meridian_shared::events::{AgentEvent, AppointmentSyncFailed, AppointmentsSynced};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Context;
use crate::error::{Error, Result};
use crate::link::LinkSettings;
use crate::store::queries;

/// Chunks staged per store write (a cut loses at most these, which are fetched again).
const STAGE_BATCH: usize = 8;
/// How often the syncer looks for work without being woken.
const IDLE_POLL: Duration = Duration::from_secs(30);

/// Records the controller's request in the command's transaction; supersedes older open ones.
pub fn record_request(conn: &Connection, req: &SyncRequest, now: DateTime<Utc>) -> Result<()> {
    let id = req.sync_id.to_string();
    let open: Vec<String> = conn
        .prepare_cached(
            "SELECT sync_id FROM appointment_sync_requests \
             WHERE state IN ('pending', 'fetching') AND sync_id <> ?1",
        )?
        .query_map([&id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for old in open {
        end_request(conn, &old, "superseded", Some("a newer sync was requested"), now)?;
    }
    conn.prepare_cached(
        "INSERT INTO appointment_sync_requests (sync_id, reason, requested_at, received_at, state) \
         VALUES (?1, ?2, ?3, ?4, 'pending') ON CONFLICT (sync_id) DO NOTHING",
    )?
    .execute(params![
        id,
        req.reason.chars().take(40).collect::<String>(),
        req.requested_at.to_rfc3339(),
        now.to_rfc3339()
    ])?;
    Ok(())
}

/// Stores a live `APPOINTMENT_UPSERT` (command `seq`) by the revision rule and notes its source.
pub fn apply_live(
    conn: &Connection,
    snap: &AppointmentSnapshot,
    seq: u64,
    now: DateTime<Utc>,
) -> Result<bool> {
    let applied = crate::appointments::apply_from(conn, snap, now, seq)?;
    if applied {
        crate::closures::flag_if_closed(conn, snap, now)?;
    }
    Ok(applied)
}

fn end_request(
    conn: &Connection,
    id: &str,
    state: &str,
    error: Option<&str>,
    now: DateTime<Utc>,
) -> Result<()> {
    conn.prepare_cached(
        "UPDATE appointment_sync_requests SET state = ?2, error = ?3, finished_at = ?4 \
         WHERE sync_id = ?1",
    )?
    .execute(params![id, state, error, now.to_rfc3339()])?;
    conn.prepare_cached("DELETE FROM appointment_sync_chunks WHERE sync_id = ?1")?.execute([id])?;
    Ok(())
}

/// A sync as the branch sees it (`GET /api/v1/appointments/sync`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyncRequestState {
    pub sync_id: Uuid,
    pub reason: String,
    pub state: String,
    pub requested_at: String,
    pub total_chunks: Option<u32>,
    pub staged_chunks: u32,
    pub total_appointments: Option<u64>,
    pub from_day: Option<NaiveDate>,
    pub to_day: Option<NaiveDate>,
    pub attempts: u32,
    /// Fetches that resumed a cut transfer after staged chunks.
    pub resumed: u32,
    pub finished_at: Option<String>,
    pub error: Option<String>,
}

/// The set in force: which sync, which days, how many appointments, when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Watermark {
    pub sync_id: Uuid,
    pub from_day: NaiveDate,
    pub to_day: NaiveDate,
    pub as_of_command_seq: u64,
    pub appointments: u64,
    pub applied_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyncStatus {
    pub watermark: Option<Watermark>,
    /// The latest requests, newest first.
    pub requests: Vec<SyncRequestState>,
}

fn corrupt(what: &str, value: &str) -> Error {
    Error::Internal(format!(
        "corrupt value in {what}: {:?}",
        value.chars().take(40).collect::<String>()
    ))
}

fn day(what: &str, v: Option<String>) -> Result<Option<NaiveDate>> {
    v.map(|d| d.parse().map_err(|_| corrupt(what, &d))).transpose()
}

/// The watermark and the latest `limit` requests.
pub fn status(conn: &Connection, limit: u32) -> Result<SyncStatus> {
    let watermark = conn
        .prepare_cached(
            "SELECT sync_id, from_day, to_day, as_of_command_seq, appointments, applied_at \
             FROM appointment_sync_state WHERE id = 1",
        )?
        .query_row([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, String>(5)?,
            ))
        })
        .optional()?
        .map(|(id, from, to, as_of, n, at)| -> Result<Watermark> {
            Ok(Watermark {
                sync_id: id.parse().map_err(|_| corrupt("appointment_sync_state.sync_id", &id))?,
                from_day: from
                    .parse()
                    .map_err(|_| corrupt("appointment_sync_state.from_day", &from))?,
                to_day: to.parse().map_err(|_| corrupt("appointment_sync_state.to_day", &to))?,
                as_of_command_seq: as_of.max(0) as u64,
                appointments: n.max(0) as u64,
                applied_at: at,
            })
        })
        .transpose()?;
    let mut stmt = conn.prepare_cached(
        "SELECT r.sync_id, r.reason, r.state, r.requested_at, r.total_chunks, \
         (SELECT COUNT(*) FROM appointment_sync_chunks c WHERE c.sync_id = r.sync_id), \
         r.total_appointments, r.from_day, r.to_day, r.attempts, r.resumed, r.finished_at, r.error \
         FROM appointment_sync_requests r ORDER BY r.received_at DESC, r.sync_id DESC LIMIT ?1",
    )?;
    let rows = stmt
        .query_map([i64::from(limit)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, Option<i64>>(6)?,
                r.get::<_, Option<String>>(7)?,
                r.get::<_, Option<String>>(8)?,
                r.get::<_, i64>(9)?,
                r.get::<_, i64>(10)?,
                r.get::<_, Option<String>>(11)?,
                r.get::<_, Option<String>>(12)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let requests = rows
        .into_iter()
        .map(|r| -> Result<SyncRequestState> {
            Ok(SyncRequestState {
                sync_id: r
                    .0
                    .parse()
                    .map_err(|_| corrupt("appointment_sync_requests.sync_id", &r.0))?,
                reason: r.1,
                state: r.2,
                requested_at: r.3,
                total_chunks: r.4.map(|n| n.max(0) as u32),
                staged_chunks: r.5.max(0) as u32,
                total_appointments: r.6.map(|n| n.max(0) as u64),
                from_day: day("appointment_sync_requests.from_day", r.7)?,
                to_day: day("appointment_sync_requests.to_day", r.8)?,
                attempts: r.9.max(0) as u32,
                resumed: r.10.max(0) as u32,
                finished_at: r.11,
                error: r.12,
            })
        })
        .collect::<Result<_>>()?;
    Ok(SyncStatus { watermark, requests })
}

/// The manifest a sync's chunks repeat.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Manifest {
    total_chunks: u32,
    total_appointments: u64,
    from_day: NaiveDate,
    to_day: NaiveDate,
    as_of_command_seq: u64,
}

/// The sync to run next: the newest open request, with its manifest (if a fetch began) and the
/// number of chunks staged.
struct Work {
    id: Uuid,
    manifest: Option<Manifest>,
    staged: u32,
    attempts: u32,
}

fn next_work(conn: &Connection) -> Result<Option<Work>> {
    let row = conn
        .prepare_cached(
            "SELECT sync_id, total_chunks, total_appointments, from_day, to_day, as_of_command_seq, \
             attempts, (SELECT COUNT(*) FROM appointment_sync_chunks c WHERE c.sync_id = r.sync_id) \
             FROM appointment_sync_requests r WHERE state IN ('pending', 'fetching') \
             ORDER BY received_at DESC, sync_id DESC LIMIT 1",
        )?
        .query_row([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<i64>>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, Option<i64>>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
            ))
        })
        .optional()?;
    let Some((id, total, n, from, to, as_of, attempts, staged)) = row else {
        return Ok(None);
    };
    let manifest = match (total, n, day("from_day", from)?, day("to_day", to)?, as_of) {
        (Some(total), Some(n), Some(from_day), Some(to_day), Some(as_of)) => Some(Manifest {
            total_chunks: total.max(0) as u32,
            total_appointments: n.max(0) as u64,
            from_day,
            to_day,
            as_of_command_seq: as_of.max(0) as u64,
        }),
        _ => None,
    };
    Ok(Some(Work {
        id: id.parse().map_err(|_| corrupt("appointment_sync_requests.sync_id", &id))?,
        manifest,
        staged: staged.max(0) as u32,
        attempts: attempts.max(0) as u32,
    }))
}

/// Why a sync stops.
#[derive(Debug)]
enum SyncError {
    /// Try again later from the staged chunks (link down, controller unavailable).
    Transient(String),
    /// The controller no longer serves it (superseded, unknown): drop it quietly.
    Gone(String),
    /// The data is wrong: the sync fails, is reported, and the previous set stays.
    Refused(String),
    Store(Error),
}

impl From<Error> for SyncError {
    fn from(e: Error) -> Self {
        SyncError::Store(e)
    }
}

/// Checks one received chunk against the manifest and the site; returns its appointments.
fn check_chunk(
    chunk: &AppointmentChunk,
    expected_index: u32,
    manifest: &Manifest,
    site: &str,
) -> std::result::Result<Vec<AppointmentSnapshot>, String> {
    let got = Manifest {
        total_chunks: chunk.total_chunks,
        total_appointments: chunk.total_appointments,
        from_day: chunk
            .from_day
            .parse()
            .map_err(|_| format!("chunk {} names no day", chunk.index))?,
        to_day: chunk.to_day.parse().map_err(|_| format!("chunk {} names no day", chunk.index))?,
        as_of_command_seq: chunk.as_of_command_seq,
    };
    if &got != manifest {
        return Err(format!(
            "chunk {} does not belong to the snapshot being received",
            chunk.index
        ));
    }
    if chunk.index != expected_index {
        return Err(format!("chunk {} arrived where chunk {expected_index} was due", chunk.index));
    }
    let rows =
        decode_chunk(chunk.index, &chunk.payload, &chunk.sha256).map_err(|e| e.to_string())?;
    for a in &rows {
        if a.site.as_str() != site {
            return Err(format!("chunk {} holds an appointment of site {}", chunk.index, a.site));
        }
        if a.local_day < manifest.from_day || a.local_day > manifest.to_day {
            return Err(format!(
                "chunk {} holds an appointment on {} outside {}..{}",
                chunk.index, a.local_day, manifest.from_day, manifest.to_day
            ));
        }
    }
    Ok(rows)
}

/// Replaces the appointments of the manifest's days with `rows` (see the module's replace
/// rule), records the watermark and queues `APPOINTMENTS_SYNCED`; returns how many were stored.
fn replace(
    conn: &Connection,
    id: Uuid,
    manifest: &Manifest,
    rows: &[AppointmentSnapshot],
    now: DateTime<Utc>,
) -> Result<u64> {
    let mut seen = HashSet::with_capacity(rows.len());
    let mut stored = 0u64;
    let closures = crate::closures::open_between(conn, manifest.from_day, manifest.to_day)?;
    for snap in rows {
        if crate::appointments::apply_from(conn, snap, now, manifest.as_of_command_seq)? {
            crate::closures::flag_if_closed_in(conn, snap, &closures, now)?;
            stored += 1;
        }
        seen.insert(snap.id.to_string());
    }
    let as_of = i64::try_from(manifest.as_of_command_seq).unwrap_or(i64::MAX);
    let local: Vec<String> = conn
        .prepare_cached(
            "SELECT id FROM appointments WHERE local_day >= ?1 AND local_day <= ?2 \
             AND source_seq <= ?3 AND attendance IS NULL",
        )?
        .query_map(
            params![manifest.from_day.to_string(), manifest.to_day.to_string(), as_of],
            |r| r.get(0),
        )?
        .collect::<rusqlite::Result<_>>()?;
    let mut delete = conn.prepare_cached("DELETE FROM appointments WHERE id = ?1")?;
    for gone in local.iter().filter(|id| !seen.contains(*id)) {
        delete.execute([gone])?;
    }
    conn.prepare_cached(
        "INSERT INTO appointment_sync_state (id, sync_id, from_day, to_day, as_of_command_seq, \
         appointments, applied_at) VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6) \
         ON CONFLICT (id) DO UPDATE SET sync_id = excluded.sync_id, from_day = excluded.from_day, \
         to_day = excluded.to_day, as_of_command_seq = excluded.as_of_command_seq, \
         appointments = excluded.appointments, applied_at = excluded.applied_at",
    )?
    .execute(params![
        id.to_string(),
        manifest.from_day.to_string(),
        manifest.to_day.to_string(),
        as_of,
        rows.len() as i64,
        now.to_rfc3339()
    ])?;
    Ok(stored)
}

/// The chunks of a sync staged before chunk `before`, in order.
fn staged(conn: &Connection, id: Uuid, before: u32) -> Result<Vec<Vec<u8>>> {
    let payloads = conn
        .prepare_cached(
            "SELECT payload FROM appointment_sync_chunks WHERE sync_id = ?1 AND idx < ?2 \
             ORDER BY idx",
        )?
        .query_map(params![id.to_string(), i64::from(before)], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(payloads)
}

/// Decodes the `before` chunks staged by earlier attempts (off the store thread; they were
/// checked when received).
fn decode_staged(
    id: Uuid,
    manifest: &Manifest,
    before: u32,
    payloads: &[Vec<u8>],
) -> Result<Vec<AppointmentSnapshot>> {
    if payloads.len() as u32 != before {
        return Err(Error::Internal(format!(
            "sync {id}: {} chunks staged, {before} expected",
            payloads.len()
        )));
    }
    let mut rows = Vec::with_capacity(manifest.total_appointments as usize);
    for p in payloads {
        let chunk: Vec<AppointmentSnapshot> = serde_json::from_slice(p)
            .map_err(|e| Error::Internal(format!("staged chunk of sync {id}: {e}")))?;
        rows.extend(chunk);
    }
    Ok(rows)
}

/// Applies a fully staged, decoded sync in one transaction (skipped if it was superseded
/// meanwhile).
fn apply_staged(
    conn: &Connection,
    id: Uuid,
    manifest: &Manifest,
    rows: &[AppointmentSnapshot],
    now: DateTime<Utc>,
) -> Result<()> {
    let sid = id.to_string();
    // Superseded while the chunks were decoded: nothing to apply.
    let open: bool = conn
        .prepare_cached(
            "SELECT COUNT(*) > 0 FROM appointment_sync_requests \
             WHERE sync_id = ?1 AND state IN ('pending', 'fetching')",
        )?
        .query_row([&sid], |r| r.get(0))?;
    if !open {
        return Ok(());
    }
    if rows.len() as u64 != manifest.total_appointments {
        return Err(Error::Validation(format!(
            "sync {id} announced {} appointments and carried {}",
            manifest.total_appointments,
            rows.len()
        )));
    }
    replace(conn, id, manifest, rows, now)?;
    let resumed: i64 = conn
        .prepare_cached("SELECT resumed FROM appointment_sync_requests WHERE sync_id = ?1")?
        .query_row([&sid], |r| r.get(0))?;
    end_request(conn, &sid, "applied", None, now)?;
    queries::append_event(
        conn,
        &AgentEvent::AppointmentsSynced(AppointmentsSynced {
            sync_id: id,
            from_day: manifest.from_day,
            to_day: manifest.to_day,
            appointments: rows.len() as u64,
            chunks: manifest.total_chunks,
            resumed: resumed.max(0) as u32,
            at: now,
        }),
        now,
    )?;
    Ok(())
}

/// Ends a sync as failed and reports it; the previous set stays in force.
fn fail(conn: &Connection, id: Uuid, error: &str, now: DateTime<Utc>) -> Result<()> {
    end_request(conn, &id.to_string(), "failed", Some(error), now)?;
    queries::append_event(
        conn,
        &AgentEvent::AppointmentSyncFailed(AppointmentSyncFailed {
            sync_id: id,
            error: error.to_owned(),
            at: now,
        }),
        now,
    )?;
    Ok(())
}

/// Fetches the rest of `work` and applies it.
async fn fetch(
    ctx: &Context,
    settings: &LinkSettings,
    work: &Work,
) -> std::result::Result<(), SyncError> {
    let identity = ctx
        .db
        .read(queries::identity)
        .await?
        .ok_or_else(|| SyncError::Transient("not enrolled yet".into()))?;
    let mut client = crate::link::connect(settings, settings.heartbeat)
        .await
        .map_err(|e| SyncError::Transient(e.to_string()))?;
    let (id, from) = (work.id, work.staged);
    let resumed = from > 0;
    ctx.db
        .write(move |c| {
            c.prepare_cached(
                "UPDATE appointment_sync_requests SET state = 'fetching', attempts = attempts + 1, \
                 resumed = resumed + ?2 WHERE sync_id = ?1",
            )?
            .execute(params![id.to_string(), i64::from(resumed)])?;
            Ok(())
        })
        .await?;
    let mut request = tonic::Request::new(meridian_proto::AppointmentSyncRequest {
        sync_id: work.id.to_string(),
        from_chunk: from,
    });
    let auth = format!("Bearer {}", identity.credential).parse().map_err(|_| {
        SyncError::Transient("stored credential is not a valid header value".into())
    })?;
    request.metadata_mut().insert("authorization", auth);
    let mut stream = match client.fetch_appointments(request).await {
        Ok(r) => r.into_inner(),
        Err(s) => return Err(status_error(s)),
    };
    let mut manifest = work.manifest.clone();
    let mut next = from;
    let mut fresh: Vec<AppointmentSnapshot> = Vec::new();
    let mut batch: Vec<(u32, Vec<u8>)> = Vec::new();
    let site = identity.site.clone();
    loop {
        let message = stream.message().await;
        let chunk = match message {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(s) => {
                stage(ctx, work.id, None, &mut batch).await?;
                return Err(status_error(s));
            }
        };
        let m = match &manifest {
            Some(m) => m.clone(),
            None => {
                let parse = |d: &str| d.parse::<NaiveDate>().ok();
                let (Some(from_day), Some(to_day)) = (parse(&chunk.from_day), parse(&chunk.to_day))
                else {
                    return Err(SyncError::Refused(format!(
                        "chunk {} names no valid days",
                        chunk.index
                    )));
                };
                let m = Manifest {
                    total_chunks: chunk.total_chunks,
                    total_appointments: chunk.total_appointments,
                    from_day,
                    to_day,
                    as_of_command_seq: chunk.as_of_command_seq,
                };
                if m.total_chunks == 0 || m.from_day > m.to_day {
                    return Err(SyncError::Refused("the sync's manifest is impossible".into()));
                }
                manifest = Some(m.clone());
                stage(ctx, work.id, Some(&m), &mut batch).await?;
                m
            }
        };
        match check_chunk(&chunk, next, &m, &site) {
            Ok(rows) => fresh.extend(rows),
            Err(e) => return Err(SyncError::Refused(e)),
        }
        batch.push((chunk.index, chunk.payload));
        next += 1;
        if batch.len() >= STAGE_BATCH || next == m.total_chunks {
            stage(ctx, work.id, None, &mut batch).await?;
        }
        if next == m.total_chunks {
            break;
        }
    }
    let Some(m) = manifest.filter(|m| next == m.total_chunks) else {
        stage(ctx, work.id, None, &mut batch).await?;
        return Err(SyncError::Transient(format!("the transfer ended after chunk {next}")));
    };
    // This fetch's chunks are decoded already; those staged by earlier, cut attempts are read
    // back and decoded off the store thread.
    let decoded = if from == 0 {
        fresh
    } else {
        let payloads = ctx.db.read(move |c| staged(c, id, from)).await?;
        let m = m.clone();
        let mut rows = tokio::task::spawn_blocking(move || decode_staged(id, &m, from, &payloads))
            .await
            .map_err(|e| SyncError::Store(Error::Internal(format!("decoding task: {e}"))))??;
        rows.extend(fresh);
        rows
    };
    let now = ctx.clock.now();
    let result = ctx.db.write(move |c| apply_staged(c, id, &m, &decoded, now)).await;
    match result {
        Ok(()) => {
            ctx.changed();
            Ok(())
        }
        Err(Error::Validation(e)) => Err(SyncError::Refused(e)),
        Err(e) => Err(SyncError::Store(e)),
    }
}

/// Writes the staged `batch` (and the manifest, at the first chunk) in one transaction.
async fn stage(
    ctx: &Context,
    id: Uuid,
    manifest: Option<&Manifest>,
    batch: &mut Vec<(u32, Vec<u8>)>,
) -> Result<()> {
    if batch.is_empty() && manifest.is_none() {
        return Ok(());
    }
    let chunks = std::mem::take(batch);
    let manifest = manifest.cloned();
    ctx.db
        .write(move |c| {
            let sid = id.to_string();
            // A sync superseded meanwhile stages nothing.
            let open: bool = c
                .prepare_cached(
                    "SELECT COUNT(*) > 0 FROM appointment_sync_requests \
                     WHERE sync_id = ?1 AND state IN ('pending', 'fetching')",
                )?
                .query_row([&sid], |r| r.get(0))?;
            if !open {
                return Ok(());
            }
            if let Some(m) = manifest {
                c.prepare_cached(
                    "UPDATE appointment_sync_requests SET total_chunks = ?2, total_appointments = ?3, \
                     from_day = ?4, to_day = ?5, as_of_command_seq = ?6 WHERE sync_id = ?1",
                )?
                .execute(params![
                    sid,
                    i64::from(m.total_chunks),
                    i64::try_from(m.total_appointments).unwrap_or(i64::MAX),
                    m.from_day.to_string(),
                    m.to_day.to_string(),
                    i64::try_from(m.as_of_command_seq).unwrap_or(i64::MAX)
                ])?;
            }
            let mut insert = c.prepare_cached(
                "INSERT INTO appointment_sync_chunks (sync_id, idx, payload) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (sync_id, idx) DO NOTHING",
            )?;
            for (idx, payload) in &chunks {
                insert.execute(params![sid, i64::from(*idx), payload])?;
            }
            Ok(())
        })
        .await
}

fn status_error(s: tonic::Status) -> SyncError {
    match s.code() {
        tonic::Code::NotFound | tonic::Code::FailedPrecondition => {
            SyncError::Gone(s.message().to_owned())
        }
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => {
            SyncError::Refused(format!("the controller refused the fetch: {}", s.message()))
        }
        _ => SyncError::Transient(format!("{:?}: {}", s.code(), s.message())),
    }
}

/// Runs syncs until `shutdown`: woken by a new request (`Context::sync_requested`) or the link
/// coming up, retrying a cut transfer with backoff from its staged chunks.
pub async fn run(ctx: Arc<Context>, settings: LinkSettings, shutdown: CancellationToken) {
    let backoff = BackoffPolicy { base: settings.backoff.base, cap: settings.backoff.cap };
    let mut link = ctx.link.subscribe();
    let mut failures = 0u32;
    loop {
        let work = match ctx.db.read(next_work).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read appointment sync requests");
                None
            }
        };
        let wait = match work {
            None => IDLE_POLL,
            Some(work) if !link.borrow().connected && work.attempts > 0 => {
                // Offline: wait for the link rather than burn attempts.
                IDLE_POLL
            }
            Some(work) => {
                let result = fetch(&ctx, &settings, &work).await;
                let now = ctx.clock.now();
                match result {
                    Ok(()) => {
                        failures = 0;
                        tracing::info!(sync = %work.id, "applied an appointment sync");
                        continue;
                    }
                    Err(SyncError::Transient(e)) => {
                        failures = failures.saturating_add(1);
                        tracing::warn!(sync = %work.id, error = %e, "appointment sync interrupted; will resume");
                        backoff.delay(failures.min(16), &mut rand::rng())
                    }
                    Err(SyncError::Gone(e)) => {
                        let id = work.id.to_string();
                        let ended = ctx
                            .db
                            .write(move |c| end_request(c, &id, "superseded", Some(&e), now))
                            .await;
                        if let Err(e) = ended {
                            tracing::warn!(error = %e, "cannot record an abandoned sync");
                        }
                        continue;
                    }
                    Err(SyncError::Refused(e)) => {
                        tracing::error!(sync = %work.id, error = %e, "appointment sync refused; the previous set stays in force");
                        let id = work.id;
                        match ctx.db.write(move |c| fail(c, id, &e, now)).await {
                            Ok(()) => ctx.changed(),
                            Err(e) => tracing::warn!(error = %e, "cannot record a failed sync"),
                        }
                        continue;
                    }
                    Err(SyncError::Store(e)) => {
                        failures = failures.saturating_add(1);
                        tracing::error!(sync = %work.id, error = %e, "appointment sync: local store failure");
                        backoff.delay(failures.min(16), &mut rand::rng())
                    }
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ctx.sync_requested.notified() => {}
            _ = link.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use meridian_shared::appointments::{AppointmentStatus, encode_chunk};
    use meridian_shared::{AppointmentId, Code, SiteCode};

    use super::*;

    fn db() -> Connection {
        let mut conn = Connection::open_in_memory().expect("db");
        crate::store::migrate(&mut conn).expect("migrate");
        conn
    }

    fn snap(n: u128, day: &str, revision: u64) -> AppointmentSnapshot {
        let id: AppointmentId =
            format!("01937a4e-1d2c-7000-8000-{n:012}").parse().expect("appointment id");
        let local =
            chrono::NaiveDateTime::parse_from_str(&format!("{day}T09:00"), "%Y-%m-%dT%H:%M")
                .expect("start");
        AppointmentSnapshot {
            id,
            site: SiteCode::parse("SFO").expect("site"),
            service: Code::parse("ACC").expect("service"),
            queue: Some(Code::parse("accounts").expect("queue")),
            start: format!("{day}T09:00"),
            starts_at: Utc.from_utc_datetime(&local) + chrono::Duration::hours(8),
            local_day: local.date(),
            duration_minutes: 15,
            customer_name: format!("Customer {n}"),
            customer_contact: None,
            notes: None,
            external_ref: None,
            status: AppointmentStatus::Booked,
            revision,
            updated_at: Utc.with_ymd_and_hms(2026, 3, 8, 12, 0, 0).unwrap(),
        }
    }

    fn manifest(total_chunks: u32, total_appointments: u64, as_of: u64) -> Manifest {
        Manifest {
            total_chunks,
            total_appointments,
            from_day: "2026-03-09".parse().unwrap(),
            to_day: "2026-03-10".parse().unwrap(),
            as_of_command_seq: as_of,
        }
    }

    fn ids(conn: &Connection) -> Vec<(String, i64)> {
        conn.prepare("SELECT id, revision FROM appointments ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    #[test]
    fn replace_keeps_newer_live_changes_and_other_days_and_drops_the_rest() {
        let conn = db();
        let now = Utc.with_ymd_and_hms(2026, 3, 9, 10, 0, 0).unwrap();
        // Stored before the sync: 1 (older revision), 2 (not in the snapshot: moved away),
        // 3 (sent live after the snapshot, seq 9 > as_of 5), 4 (another day, kept).
        apply_live(&conn, &snap(1, "2026-03-09", 1), 2, now).unwrap();
        apply_live(&conn, &snap(2, "2026-03-09", 1), 3, now).unwrap();
        apply_live(&conn, &snap(3, "2026-03-10", 4), 9, now).unwrap();
        apply_live(&conn, &snap(4, "2026-03-12", 1), 4, now).unwrap();
        let rows =
            vec![snap(1, "2026-03-09", 2), snap(3, "2026-03-10", 3), snap(5, "2026-03-10", 1)];
        let id = Uuid::now_v7();
        replace(&conn, id, &manifest(1, 3, 5), &rows, now).unwrap();
        let got = ids(&conn);
        let names: Vec<_> = got.iter().map(|(id, rev)| (&id[24..], *rev)).collect();
        assert_eq!(
            names,
            vec![
                ("000000000001", 2),
                ("000000000003", 4),
                ("000000000004", 1),
                ("000000000005", 1)
            ]
        );
        let st = status(&conn, 5).unwrap();
        assert_eq!(st.watermark.map(|w| (w.sync_id, w.appointments)), Some((id, 3)));
    }

    #[test]
    fn a_chunk_must_match_its_digest_manifest_order_site_and_days() {
        let m = manifest(2, 2, 5);
        let (payload, sha256) = encode_chunk(&[snap(1, "2026-03-09", 1)]);
        let good = AppointmentChunk {
            sync_id: Uuid::now_v7().to_string(),
            index: 0,
            total_chunks: 2,
            total_appointments: 2,
            from_day: "2026-03-09".into(),
            to_day: "2026-03-10".into(),
            as_of_command_seq: 5,
            payload,
            sha256,
        };
        assert_eq!(check_chunk(&good, 0, &m, "SFO").map(|r| r.len()), Ok(1));
        let mut flipped = good.clone();
        flipped.payload[3] ^= 0x20;
        assert!(check_chunk(&flipped, 0, &m, "SFO").unwrap_err().contains("SHA-256"));
        assert!(check_chunk(&good, 1, &m, "SFO").unwrap_err().contains("was due"));
        assert!(check_chunk(&good, 0, &m, "CHI").unwrap_err().contains("site SFO"));
        let mut other = good.clone();
        other.as_of_command_seq = 6;
        assert!(check_chunk(&other, 0, &m, "SFO").unwrap_err().contains("snapshot"));
        let (payload, sha256) = encode_chunk(&[snap(1, "2026-03-11", 1)]);
        let outside = AppointmentChunk { payload, sha256, ..good };
        assert!(check_chunk(&outside, 0, &m, "SFO").unwrap_err().contains("outside"));
    }

    #[test]
    fn a_newer_request_supersedes_and_a_failure_keeps_the_set() {
        let conn = db();
        let now = Utc.with_ymd_and_hms(2026, 3, 9, 10, 0, 0).unwrap();
        let req = |reason: &str| SyncRequest {
            sync_id: Uuid::now_v7(),
            reason: reason.into(),
            requested_at: now,
        };
        let (a, b) = (req("scheduled"), req("manual"));
        record_request(&conn, &a, now).unwrap();
        conn.execute(
            "INSERT INTO appointment_sync_chunks (sync_id, idx, payload) VALUES (?1, 0, x'5b5d')",
            [a.sync_id.to_string()],
        )
        .unwrap();
        record_request(&conn, &b, now + chrono::Duration::seconds(1)).unwrap();
        // Replayed: no second row.
        record_request(&conn, &b, now + chrono::Duration::seconds(2)).unwrap();
        let st = status(&conn, 5).unwrap();
        let states: Vec<_> = st.requests.iter().map(|r| (r.sync_id, r.state.as_str())).collect();
        assert_eq!(states, vec![(b.sync_id, "pending"), (a.sync_id, "superseded")]);
        assert_eq!(st.requests[1].staged_chunks, 0);
        assert_eq!(next_work(&conn).unwrap().map(|w| w.id), Some(b.sync_id));
        apply_live(&conn, &snap(1, "2026-03-09", 1), 2, now).unwrap();
        fail(&conn, b.sync_id, "chunk 0 failed its SHA-256 check", now).unwrap();
        assert_eq!(ids(&conn).len(), 1);
        assert!(next_work(&conn).unwrap().is_none());
        let st = status(&conn, 5).unwrap();
        assert_eq!(st.requests[0].state, "failed");
        assert!(st.watermark.is_none());
    }
}
