//! Appointments at the branch: the site's appointments as the controller sent them
//! (`APPOINTMENT_UPSERT`: every change to an appointment of the current business day, live),
//! kept in the `appointments` table and listed by the connector API
//! (`GET /api/v1/appointments`). Check-in and attendance live in `check_in`.
//!
//! **Invariants:** a stored appointment is only ever replaced by a higher revision, so a
//! replayed, duplicated or late snapshot changes nothing (`apply` is idempotent); a snapshot
//! updates only the central columns, never the branch's check-in columns.

use chrono::{DateTime, NaiveDate, Utc};
use meridian_shared::appointments::{AppointmentSnapshot, AppointmentStatus};
use meridian_shared::check_in::Reference;
use meridian_shared::{AppointmentId, Code};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::check_in::CheckInState;
use crate::error::{Error, Result};

/// An appointment as the branch holds and shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchAppointment {
    pub id: AppointmentId,
    pub service: Code,
    /// The queue of its service when it was last changed (`None` if the service was gone).
    pub queue: Option<Code>,
    /// The start in the site's time zone, `YYYY-MM-DDTHH:MM`.
    pub start: String,
    pub starts_at: DateTime<Utc>,
    pub local_day: NaiveDate,
    pub duration_minutes: u32,
    pub customer_name: String,
    pub customer_contact: Option<String>,
    pub notes: Option<String>,
    pub external_ref: Option<String>,
    pub status: AppointmentStatus,
    pub revision: u64,
    /// When the controller made the change.
    pub updated_at: DateTime<Utc>,
    /// The short booking reference (`XXXX-XXXX`, from the id).
    pub reference: Reference,
    /// What the branch recorded (check-in, attendance, conflict); never changed by `apply`.
    #[serde(flatten)]
    pub check_in: CheckInState,
}

/// Stores `snap` if its revision is newer than the stored one (or none is stored); returns
/// whether it did. Only the central columns change: the branch's attendance stays, and a
/// cancel or reschedule that meets a check-in is recorded as a conflict
/// (`check_in::after_snapshot`).
pub fn apply(conn: &Connection, snap: &AppointmentSnapshot, now: DateTime<Utc>) -> Result<bool> {
    apply_from(conn, snap, now, 0)
}

/// `apply`, recording in `source_seq` which command (or bulk sync mark) wrote the row (see
/// `appointment_sync`).
pub fn apply_from(
    conn: &Connection,
    snap: &AppointmentSnapshot,
    now: DateTime<Utc>,
    source_seq: u64,
) -> Result<bool> {
    let stored: Option<i64> = conn
        .prepare_cached("SELECT revision FROM appointments WHERE id = ?1")?
        .query_row([snap.id.to_string()], |r| r.get(0))
        .optional()?;
    let revision = revision_i64(snap.revision)?;
    if stored.is_some_and(|rev| rev >= revision) {
        return Ok(false);
    }
    let before = match stored {
        Some(_) => crate::check_in::before_snapshot(conn, &snap.id)?,
        None => None,
    };
    conn.prepare_cached(
        "INSERT INTO appointments (id, service, queue, local_start, local_day, starts_at, \
         duration_minutes, customer_name, customer_contact, notes, external_ref, status, revision, \
         updated_at, received_at, source_seq) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16) \
         ON CONFLICT (id) DO UPDATE SET service = excluded.service, queue = excluded.queue, \
         local_start = excluded.local_start, local_day = excluded.local_day, \
         starts_at = excluded.starts_at, duration_minutes = excluded.duration_minutes, \
         customer_name = excluded.customer_name, customer_contact = excluded.customer_contact, \
         notes = excluded.notes, external_ref = excluded.external_ref, status = excluded.status, \
         revision = excluded.revision, updated_at = excluded.updated_at, \
         received_at = excluded.received_at, source_seq = excluded.source_seq",
    )?
    .execute(params![
        snap.id.to_string(),
        snap.service.as_str(),
        snap.queue.as_ref().map(Code::as_str),
        snap.start,
        snap.local_day.to_string(),
        snap.starts_at.to_rfc3339(),
        i64::from(snap.duration_minutes),
        snap.customer_name,
        snap.customer_contact,
        snap.notes,
        snap.external_ref,
        snap.status.as_str(),
        revision,
        snap.updated_at.to_rfc3339(),
        now.to_rfc3339(),
        i64::try_from(source_seq).unwrap_or(i64::MAX),
    ])?;
    crate::check_in::after_snapshot(conn, before.as_ref(), snap, now)?;
    Ok(true)
}

/// The appointments of site-local `day` (cancelled ones too, with their status), by start;
/// with them, any appointment checked in on `day` that central has moved since.
pub fn of_day(conn: &Connection, day: NaiveDate) -> Result<Vec<BranchAppointment>> {
    select(
        conn,
        "WHERE a.local_day = ?1 OR a.arrived_day = ?1 ORDER BY a.local_start, a.starts_at, a.id",
        [day.to_string()],
    )
}

/// One appointment by id.
pub fn by_id(conn: &Connection, id: &AppointmentId) -> Result<Option<BranchAppointment>> {
    Ok(select(conn, "WHERE a.id = ?1", [id.to_string()])?.pop())
}

/// The appointments matching `filter` (over `appointments a`, with `v` its visit).
pub(crate) fn select(
    conn: &Connection,
    filter: &str,
    p: impl rusqlite::Params,
) -> Result<Vec<BranchAppointment>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT a.id, a.service, a.queue, a.local_start, a.local_day, a.starts_at, \
         a.duration_minutes, a.customer_name, a.customer_contact, a.notes, a.external_ref, \
         a.status, a.revision, a.updated_at, a.attendance, a.visit_id, v.ticket, a.arrived_at, \
         a.attendance_at, a.conflict, a.conflict_at \
         FROM appointments a LEFT JOIN visits v ON v.id = a.visit_id {filter}"
    ))?;
    let rows = stmt.query_map(p, |r| {
        Ok(Row {
            id: r.get(0)?,
            service: r.get(1)?,
            queue: r.get(2)?,
            start: r.get(3)?,
            local_day: r.get(4)?,
            starts_at: r.get(5)?,
            duration_minutes: r.get(6)?,
            customer_name: r.get(7)?,
            customer_contact: r.get(8)?,
            notes: r.get(9)?,
            external_ref: r.get(10)?,
            status: r.get(11)?,
            revision: r.get(12)?,
            updated_at: r.get(13)?,
            check_in: crate::check_in::StoredCheckIn::read(r, 14)?,
        })
    })?;
    rows.map(|row| row.map_err(Error::from).and_then(BranchAppointment::try_from)).collect()
}

fn revision_i64(revision: u64) -> Result<i64> {
    i64::try_from(revision).map_err(|_| Error::Validation(format!("revision {revision} too large")))
}

struct Row {
    id: String,
    service: String,
    queue: Option<String>,
    start: String,
    local_day: String,
    starts_at: String,
    duration_minutes: i64,
    customer_name: String,
    customer_contact: Option<String>,
    notes: Option<String>,
    external_ref: Option<String>,
    status: String,
    revision: i64,
    updated_at: String,
    check_in: crate::check_in::StoredCheckIn,
}

impl TryFrom<Row> for BranchAppointment {
    type Error = Error;
    fn try_from(r: Row) -> Result<Self> {
        let corrupt = |what: &str, value: &str| {
            Error::Internal(format!(
                "corrupt value in appointments.{what}: {:?}",
                value.chars().take(40).collect::<String>()
            ))
        };
        let instant = |what: &str, value: &str| {
            DateTime::parse_from_rfc3339(value)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| corrupt(what, value))
        };
        let id: AppointmentId = r.id.parse().map_err(|_| corrupt("id", &r.id))?;
        Ok(BranchAppointment {
            id,
            reference: id.reference(),
            check_in: r.check_in.decode()?,
            service: Code::parse(&r.service).map_err(|_| corrupt("service", &r.service))?,
            queue: r
                .queue
                .as_deref()
                .map(|q| Code::parse(q).map_err(|_| corrupt("queue", q)))
                .transpose()?,
            starts_at: instant("starts_at", &r.starts_at)?,
            local_day: r.local_day.parse().map_err(|_| corrupt("local_day", &r.local_day))?,
            start: r.start,
            duration_minutes: u32::try_from(r.duration_minutes)
                .map_err(|_| corrupt("duration_minutes", &r.duration_minutes.to_string()))?,
            customer_name: r.customer_name,
            customer_contact: r.customer_contact,
            notes: r.notes,
            external_ref: r.external_ref,
            status: AppointmentStatus::parse(&r.status)
                .ok_or_else(|| corrupt("status", &r.status))?,
            revision: u64::try_from(r.revision)
                .map_err(|_| corrupt("revision", &r.revision.to_string()))?,
            updated_at: instant("updated_at", &r.updated_at)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use meridian_shared::SiteCode;

    use super::*;

    fn db() -> Connection {
        let mut conn = Connection::open_in_memory().expect("db");
        crate::store::migrate(&mut conn).expect("migrate");
        conn
    }

    fn snap(revision: u64, start: &str, status: AppointmentStatus) -> AppointmentSnapshot {
        let id: AppointmentId =
            "01937a4e-1d2c-7000-8000-000000000001".parse().expect("appointment id");
        let local = chrono::NaiveDateTime::parse_from_str(start, "%Y-%m-%dT%H:%M").expect("start");
        AppointmentSnapshot {
            id,
            site: SiteCode::parse("SFO").expect("site"),
            service: Code::parse("ACC").expect("service"),
            queue: Some(Code::parse("accounts").expect("queue")),
            start: start.into(),
            starts_at: Utc.from_utc_datetime(&local) + chrono::Duration::hours(8),
            local_day: local.date(),
            duration_minutes: 15,
            customer_name: "Ann".into(),
            customer_contact: Some("ann@example.com".into()),
            notes: None,
            external_ref: Some("CRM-1".into()),
            status,
            revision,
            updated_at: Utc.with_ymd_and_hms(2026, 3, 9, 15, revision as u32, 0).unwrap(),
        }
    }

    fn day(s: &str) -> NaiveDate {
        s.parse().expect("day")
    }

    #[test]
    fn only_a_newer_revision_replaces_the_stored_one() {
        let conn = db();
        let now = Utc.with_ymd_and_hms(2026, 3, 9, 16, 0, 0).unwrap();
        let booked = snap(1, "2026-03-09T09:00", AppointmentStatus::Booked);
        let moved = snap(2, "2026-03-09T10:30", AppointmentStatus::Booked);
        let cancelled = snap(3, "2026-03-09T10:30", AppointmentStatus::Cancelled);
        let check = |snapshot: &AppointmentSnapshot,
                     applied: bool,
                     expected: (u64, &str, AppointmentStatus)| {
            assert_eq!(apply(&conn, snapshot, now).expect("apply"), applied, "{snapshot:?}");
            let all = of_day(&conn, day("2026-03-09")).expect("list");
            assert_eq!(all.len(), 1);
            assert_eq!((all[0].revision, all[0].start.as_str(), all[0].status), expected);
        };
        check(&booked, true, (1, "2026-03-09T09:00", AppointmentStatus::Booked));
        check(&booked, false, (1, "2026-03-09T09:00", AppointmentStatus::Booked));
        check(&moved, true, (2, "2026-03-09T10:30", AppointmentStatus::Booked));
        // An older revision arriving late (or replayed) moves nothing back.
        check(&booked, false, (2, "2026-03-09T10:30", AppointmentStatus::Booked));
        check(&cancelled, true, (3, "2026-03-09T10:30", AppointmentStatus::Cancelled));
        check(&moved, false, (3, "2026-03-09T10:30", AppointmentStatus::Cancelled));
        check(&cancelled, false, (3, "2026-03-09T10:30", AppointmentStatus::Cancelled));
    }

    #[test]
    fn a_day_lists_its_own_appointments_by_start_with_every_field() {
        let conn = db();
        let now = Utc.with_ymd_and_hms(2026, 3, 9, 16, 0, 0).unwrap();
        let today = snap(4, "2026-03-09T11:00", AppointmentStatus::Booked);
        apply(&conn, &today, now).expect("apply");
        let mut tomorrow = snap(1, "2026-03-10T09:00", AppointmentStatus::Booked);
        tomorrow.id = AppointmentId::new();
        apply(&conn, &tomorrow, now).expect("apply");
        let listed = of_day(&conn, day("2026-03-09")).expect("list");
        assert_eq!(
            listed,
            [BranchAppointment {
                id: today.id,
                service: today.service.clone(),
                queue: today.queue.clone(),
                start: today.start.clone(),
                starts_at: today.starts_at,
                local_day: today.local_day,
                duration_minutes: 15,
                customer_name: "Ann".into(),
                customer_contact: today.customer_contact.clone(),
                notes: None,
                external_ref: today.external_ref.clone(),
                status: AppointmentStatus::Booked,
                revision: 4,
                updated_at: today.updated_at,
                reference: today.id.reference(),
                check_in: CheckInState::default(),
            }]
        );
        assert_eq!(of_day(&conn, day("2026-03-10")).expect("list").len(), 1);
        assert!(of_day(&conn, day("2026-03-11")).expect("list").is_empty());
    }
}
