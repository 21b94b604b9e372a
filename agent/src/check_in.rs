//! Check-in of appointments at the branch, entirely from the local store: the kiosk or an
//! integration checks a customer in by what they show (booking reference, QR text, appointment
//! id or external reference), reception by the appointment's id. A check-in creates a visit in
//! the appointment's queue (the service's queue in the applied configuration) placed by the
//! appointment's start, and records the attendance on the appointment; the visit's lifecycle then
//! drives it (called, completed, no-show), and appointments nobody checked in for become no-shows
//! when their window closes (`sweep_no_shows`). Every attendance change appends
//! `APPOINTMENT_STATUS` in the same store job, so central learns it exactly once.
//!
//! **Conflict rules** (an outage let central change an appointment the branch had already
//! received): the branch's arrival wins. A cancel or reschedule snapshot that arrives after a
//! check-in updates only the central columns (`appointments::apply`), keeps the attendance and
//! the visit, and records `cancelled_after_arrival` / `rescheduled_after_arrival` on the row. A
//! no-show by the sweep is no arrival: a reschedule clears it, the new start gets its own window.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use meridian_shared::appointments::{AppointmentSnapshot, AppointmentStatus};
use meridian_shared::business_day::business_day;
use meridian_shared::check_in::{Attendance, CheckInText, CheckInWindow, Conflict, WindowCheck};
use meridian_shared::config::{AppointmentPolicy, SiteConfig};
use meridian_shared::customer::Customer;
use meridian_shared::events::{AgentEvent, AppointmentStatusChanged};
use meridian_shared::visits::{Outcome, VisitStatus};
use meridian_shared::{AppointmentId, VisitId};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::Context;
use crate::appointments::{self, BranchAppointment};
use crate::error::{Error, Result};
use crate::store::queries::append_event;
use crate::visits::{self, Visit};

/// What the branch recorded of an appointment (all empty until a check-in or the no-show
/// sweep).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckInState {
    pub attendance: Option<Attendance>,
    pub visit_id: Option<String>,
    /// The ticket of the check-in's visit.
    pub ticket: Option<String>,
    pub arrived_at: Option<DateTime<Utc>>,
    pub attendance_at: Option<DateTime<Utc>>,
    /// A central change that met the arrival (the arrival won).
    pub conflict: Option<Conflict>,
    pub conflict_at: Option<DateTime<Utc>>,
}

/// The check-in columns as stored (`attendance, visit_id, ticket, arrived_at, attendance_at,
/// conflict, conflict_at`), decoded by `decode`.
pub(crate) struct StoredCheckIn {
    attendance: Option<String>,
    visit_id: Option<String>,
    ticket: Option<String>,
    arrived_at: Option<String>,
    attendance_at: Option<String>,
    conflict: Option<String>,
    conflict_at: Option<String>,
}

impl StoredCheckIn {
    pub(crate) fn read(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Self> {
        Ok(StoredCheckIn {
            attendance: r.get(first)?,
            visit_id: r.get(first + 1)?,
            ticket: r.get(first + 2)?,
            arrived_at: r.get(first + 3)?,
            attendance_at: r.get(first + 4)?,
            conflict: r.get(first + 5)?,
            conflict_at: r.get(first + 6)?,
        })
    }

    pub(crate) fn decode(self) -> Result<CheckInState> {
        let corrupt = |what: &str, value: &str| {
            Error::Internal(format!(
                "corrupt value in appointments.{what}: {:?}",
                value.chars().take(40).collect::<String>()
            ))
        };
        let instant = |what: &str, value: Option<String>| {
            value
                .map(|v| {
                    DateTime::parse_from_rfc3339(&v)
                        .map(|t| t.with_timezone(&Utc))
                        .map_err(|_| corrupt(what, &v))
                })
                .transpose()
        };
        Ok(CheckInState {
            attendance: self
                .attendance
                .map(|a| Attendance::parse(&a).ok_or_else(|| corrupt("attendance", &a)))
                .transpose()?,
            visit_id: self.visit_id,
            ticket: self.ticket,
            arrived_at: instant("arrived_at", self.arrived_at)?,
            attendance_at: instant("attendance_at", self.attendance_at)?,
            conflict: self
                .conflict
                .map(|c| Conflict::parse(&c).ok_or_else(|| corrupt("conflict", &c)))
                .transpose()?,
            conflict_at: instant("conflict_at", self.conflict_at)?,
        })
    }
}

/// Why a check-in was refused (nothing was written). Each has a stable code and HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum CheckInRefusal {
    #[error("no appointment matches {0:?}; check the booking reference or ask at reception")]
    Unknown(String),
    #[error("this appointment was cancelled")]
    Cancelled,
    #[error("already checked in with ticket {}", visit.ticket)]
    AlreadyCheckedIn { visit: Box<Visit> },
    #[error("this appointment is on {day}, not today ({today})")]
    NotToday { day: NaiveDate, today: NaiveDate },
    #[error(
        "too early: check-in for the {start} appointment opens at {opens} (window {opens}-{closes})"
    )]
    TooEarly { start: String, opens: String, closes: String },
    #[error(
        "too late: check-in for the {start} appointment closed at {closes} (window {opens}-{closes}); please ask at reception"
    )]
    TooLate { start: String, opens: String, closes: String },
    #[error("the service {0} of this appointment is no longer offered at this branch")]
    ServiceUnavailable(String),
}

impl CheckInRefusal {
    /// The stable error code clients see.
    pub fn code(&self) -> &'static str {
        match self {
            CheckInRefusal::Unknown(_) => "unknown_appointment",
            CheckInRefusal::Cancelled => "appointment_cancelled",
            CheckInRefusal::AlreadyCheckedIn { .. } => "already_checked_in",
            CheckInRefusal::NotToday { .. } => "not_today",
            CheckInRefusal::TooEarly { .. } => "too_early",
            CheckInRefusal::TooLate { .. } => "too_late",
            CheckInRefusal::ServiceUnavailable(_) => "service_unavailable",
        }
    }

    /// 404 for an unknown appointment, 409 for every refusal by the appointment's state.
    pub fn http_status(&self) -> u16 {
        match self {
            CheckInRefusal::Unknown(_) => 404,
            _ => 409,
        }
    }
}

impl From<CheckInRefusal> for Error {
    fn from(r: CheckInRefusal) -> Self {
        Error::CheckIn(Box::new(r))
    }
}

/// A completed check-in: the appointment as it is now and its visit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckedIn {
    pub appointment: BranchAppointment,
    pub visit: Visit,
}

/// The check-in window when the service has no appointment policy any more.
const DEFAULT_POLICY: AppointmentPolicy = AppointmentPolicy {
    slot_minutes: 15,
    capacity: 1,
    check_in_early_minutes: 30,
    check_in_late_minutes: 15,
};

fn window(config: &SiteConfig, a: &BranchAppointment) -> CheckInWindow {
    let policy = config.service(a.service.as_str()).and_then(|s| s.appointments);
    CheckInWindow::of(a.starts_at, policy.as_ref().unwrap_or(&DEFAULT_POLICY))
}

/// The appointment `text` names (a kiosk scan or typed text: id, booking reference,
/// `MERIDIAN:APPT:<reference>` or external reference); among several with one reference or
/// external reference, today's.
pub fn resolve(conn: &Connection, text: &str, today: NaiveDate) -> Result<AppointmentId> {
    let unknown = || Error::from(CheckInRefusal::Unknown(text.trim().chars().take(100).collect()));
    let scanned = CheckInText::parse(text).ok_or_else(unknown)?;
    let today = today.to_string();
    let pick = |sql: &str, key: &str| -> Result<Option<AppointmentId>> {
        let found: Option<String> =
            conn.prepare_cached(sql)?.query_row(params![key, today], |r| r.get(0)).optional()?;
        found
            .map(|id| {
                id.parse().map_err(|_| Error::Internal(format!("stored appointment id {id:?}")))
            })
            .transpose()
    };
    if let Some(id) = scanned.id {
        let known: Option<i64> = conn
            .prepare_cached("SELECT 1 FROM appointments WHERE id = ?1")?
            .query_row([id.to_string()], |r| r.get(0))
            .optional()?;
        if known.is_some() {
            return Ok(id);
        }
    }
    if let Some(reference) = scanned.reference
        && let Some(id) = pick(
            "SELECT id FROM appointments WHERE substr(id, 27) = ?1 \
             ORDER BY local_day = ?2 DESC, local_day DESC LIMIT 1",
            &reference.id_suffix(),
        )?
    {
        return Ok(id);
    }
    if let Some(external) = scanned.external_ref
        && let Some(id) = pick(
            "SELECT id FROM appointments WHERE external_ref = ?1 \
             ORDER BY local_day = ?2 DESC, local_day DESC LIMIT 1",
            &external,
        )?
    {
        return Ok(id);
    }
    Err(unknown())
}

/// Checks in what `text` names (see `resolve`).
pub fn check_in_text(
    conn: &Connection,
    config: &SiteConfig,
    text: &str,
    now: DateTime<Utc>,
) -> Result<CheckedIn> {
    let tz = config.site.tz().map_err(Error::Internal)?;
    let id = resolve(conn, text, business_day(tz, now))?;
    check_in(conn, config, &id, now)
}

/// Checks in appointment `id` at `now`: refuses unknown, cancelled, already checked-in, other
/// days' appointments, a service gone from the configuration and `now` outside the check-in
/// window; otherwise creates the visit (placed by the appointment's start), records the
/// arrival and appends `APPOINTMENT_STATUS` — all in the caller's store job.
pub fn check_in(
    conn: &Connection,
    config: &SiteConfig,
    id: &AppointmentId,
    now: DateTime<Utc>,
) -> Result<CheckedIn> {
    let tz = config.site.tz().map_err(Error::Internal)?;
    let today = business_day(tz, now);
    let a =
        appointments::by_id(conn, id)?.ok_or_else(|| CheckInRefusal::Unknown(id.to_string()))?;
    let local = |t: DateTime<Utc>| t.with_timezone(&tz).format("%H:%M").to_string();
    let w = window(config, &a);
    let times =
        || (a.start.get(11..).unwrap_or(&a.start).to_owned(), local(w.opens), local(w.closes));
    if a.check_in.attendance.is_some() {
        if let Some(visit_id) = &a.check_in.visit_id {
            let visit = visits::get(conn, visit_id)?;
            return Err(CheckInRefusal::AlreadyCheckedIn { visit: Box::new(visit) }.into());
        }
        // The sweep marked it a no-show: its window has closed.
        let (start, opens, closes) = times();
        return Err(CheckInRefusal::TooLate { start, opens, closes }.into());
    }
    if a.status == AppointmentStatus::Cancelled {
        return Err(CheckInRefusal::Cancelled.into());
    }
    if a.local_day != today {
        return Err(CheckInRefusal::NotToday { day: a.local_day, today }.into());
    }
    let Some(service) = config.service(a.service.as_str()) else {
        return Err(CheckInRefusal::ServiceUnavailable(a.service.to_string()).into());
    };
    match w.check(now) {
        WindowCheck::Open => {}
        WindowCheck::TooEarly => {
            let (start, opens, closes) = times();
            return Err(CheckInRefusal::TooEarly { start, opens, closes }.into());
        }
        WindowCheck::TooLate => {
            let (start, opens, closes) = times();
            return Err(CheckInRefusal::TooLate { start, opens, closes }.into());
        }
    }
    let customer =
        Customer { name: Some(a.customer_name.chars().take(120).collect()), ..Default::default() };
    let visit = visits::create_for_appointment(
        conn,
        config,
        service.code.as_str(),
        Some(&customer),
        a.starts_at,
        now,
    )?;
    conn.prepare_cached(
        "UPDATE appointments SET attendance = 'arrived', visit_id = ?2, arrived_at = ?3, \
         arrived_day = ?4, attendance_at = ?3 WHERE id = ?1",
    )?
    .execute(params![id.to_string(), visit.id, now.to_rfc3339(), today.to_string()])?;
    append_status(conn, id, Attendance::Arrived, Some(&visit), a.revision, now)?;
    let appointment = appointments::by_id(conn, id)?
        .ok_or_else(|| Error::Internal(format!("appointment {id} vanished")))?;
    Ok(CheckedIn { appointment, visit })
}

fn append_status(
    conn: &Connection,
    id: &AppointmentId,
    status: Attendance,
    visit: Option<&Visit>,
    revision: u64,
    now: DateTime<Utc>,
) -> Result<()> {
    let visit_id = visit
        .map(|v| v.id.parse::<VisitId>())
        .transpose()
        .map_err(|_| Error::Internal("stored visit id".into()))?;
    let event = AppointmentStatusChanged {
        appointment_id: *id,
        status,
        visit_id,
        ticket: visit.map(|v| v.ticket.clone()),
        revision,
        at: now,
    };
    append_event(conn, &AgentEvent::AppointmentStatus(event), now)?;
    Ok(())
}

/// Follows visit `v` (just changed, in the same store job) on its appointment, if it has one:
/// called or serving → `called`, served and ended → `completed`, ended as a no-show →
/// `no_show`; other changes (recycle, transfer, removal, end of day) leave the attendance.
pub(crate) fn on_visit_change(conn: &Connection, v: &Visit, now: DateTime<Utc>) -> Result<()> {
    let row: Option<(String, i64, Option<String>)> = conn
        .prepare_cached("SELECT id, revision, attendance FROM appointments WHERE visit_id = ?1")?
        .query_row([&v.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((id, revision, current)) = row else {
        return Ok(());
    };
    let next = match (v.status, v.outcome) {
        (VisitStatus::Called | VisitStatus::Serving, _) => Attendance::Called,
        (VisitStatus::Ended, Some(Outcome::Served)) => Attendance::Completed,
        (VisitStatus::Ended, Some(Outcome::NoShow)) => Attendance::NoShow,
        _ => return Ok(()),
    };
    if current.as_deref() == Some(next.as_str()) {
        return Ok(());
    }
    conn.prepare_cached(
        "UPDATE appointments SET attendance = ?2, attendance_at = ?3 WHERE id = ?1",
    )?
    .execute(params![id, next.as_str(), now.to_rfc3339()])?;
    let id: AppointmentId =
        id.parse().map_err(|_| Error::Internal(format!("stored appointment id {id:?}")))?;
    append_status(conn, &id, next, Some(v), revision.max(0) as u64, now)
}

/// Marks every booked appointment nobody checked in for as `no_show` once its check-in window
/// has closed (by the service's policy; the default window if it has none any more); returns
/// how many. Cancelled appointments are left alone.
pub fn sweep_no_shows(conn: &Connection, config: &SiteConfig, now: DateTime<Utc>) -> Result<usize> {
    let tz = config.site.tz().map_err(Error::Internal)?;
    let today = business_day(tz, now);
    // Only today's and earlier days' appointments can have a closed window (a window closes at
    // most four hours after the start, within the day or the next one).
    let due = appointments::select(
        conn,
        "WHERE a.attendance IS NULL AND a.status = 'booked' AND a.local_day <= ?1 \
         ORDER BY a.starts_at, a.id",
        [today.to_string()],
    )?;
    let mut marked = 0;
    for a in due.iter().filter(|a| window(config, a).no_show_due(now)) {
        conn.prepare_cached(
            "UPDATE appointments SET attendance = 'no_show', attendance_at = ?2 \
             WHERE id = ?1 AND attendance IS NULL",
        )?
        .execute(params![a.id.to_string(), now.to_rfc3339()])?;
        append_status(conn, &a.id, Attendance::NoShow, None, a.revision, now)?;
        marked += 1;
    }
    Ok(marked)
}

/// How often the no-show rule is checked.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Runs `sweep_no_shows` every `SWEEP_EVERY` by the agent's clock until `shutdown`; wakes the
/// link and the terminals only when it marked something.
pub async fn run_no_show_sweep(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(config) = ctx.site_config() else {
            continue;
        };
        let now = ctx.clock.now();
        match ctx.db.write(move |c| sweep_no_shows(c, &config, now)).await {
            Ok(0) => {}
            Ok(n) => {
                ctx.changed();
                tracing::info!(appointments = n, "appointments not checked in became no-shows")
            }
            Err(e) => tracing::warn!(error = %e, "no-show sweep failed; retrying"),
        }
    }
}

/// What `after_snapshot` needs of the row a snapshot replaces.
pub(crate) struct Before {
    status: String,
    starts_at: String,
    attendance: Option<String>,
    visit_id: Option<String>,
}

/// Reads the row `apply` is about to update.
pub(crate) fn before_snapshot(conn: &Connection, id: &AppointmentId) -> Result<Option<Before>> {
    Ok(conn
        .prepare_cached(
            "SELECT status, starts_at, attendance, visit_id FROM appointments WHERE id = ?1",
        )?
        .query_row([id.to_string()], |r| {
            Ok(Before {
                status: r.get(0)?,
                starts_at: r.get(1)?,
                attendance: r.get(2)?,
                visit_id: r.get(3)?,
            })
        })
        .optional()?)
}

/// The conflict rules, after `apply` stored `snap` over `before`: a cancel or a move of an
/// appointment the customer was already checked in for is recorded as a conflict (the visit
/// and the attendance stay); a move of a swept no-show clears the no-show.
pub(crate) fn after_snapshot(
    conn: &Connection,
    before: Option<&Before>,
    snap: &AppointmentSnapshot,
    now: DateTime<Utc>,
) -> Result<()> {
    let Some(b) = before else {
        return Ok(());
    };
    let Some(attendance) = b.attendance.as_deref() else {
        return Ok(());
    };
    let moved = DateTime::parse_from_rfc3339(&b.starts_at)
        .map(|t| t.with_timezone(&Utc) != snap.starts_at)
        .unwrap_or(true);
    let cancelled = snap.status == AppointmentStatus::Cancelled;
    if b.visit_id.is_some() {
        let conflict = if cancelled && b.status != AppointmentStatus::Cancelled.as_str() {
            Conflict::CancelledAfterArrival
        } else if moved && !cancelled {
            Conflict::RescheduledAfterArrival
        } else {
            return Ok(());
        };
        conn.prepare_cached(
            "UPDATE appointments SET conflict = ?2, conflict_at = ?3 WHERE id = ?1",
        )?
        .execute(params![snap.id.to_string(), conflict.as_str(), now.to_rfc3339()])?;
        tracing::warn!(appointment = %snap.id, conflict = conflict.as_str(), attendance, "central changed an appointment after the customer checked in; the arrival stands");
    } else if attendance == Attendance::NoShow.as_str() && moved && !cancelled {
        conn.prepare_cached(
            "UPDATE appointments SET attendance = NULL, attendance_at = NULL WHERE id = ?1",
        )?
        .execute([snap.id.to_string()])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use meridian_shared::SiteCode;
    use meridian_shared::visits::Op;

    use super::*;

    fn config() -> SiteConfig {
        serde_json::from_value(serde_json::json!({
            "revision": 1,
            "site": {"code": "SFO", "name": "SF", "time_zone": "America/Los_Angeles"},
            "services": [
                {"site": "SFO", "code": "GEN", "name": "General", "queue": "accounts"},
                {"site": "SFO", "code": "ACC", "name": "Accounts", "queue": "accounts",
                 "appointments": {"slot_minutes": 15, "capacity": 2,
                                  "check_in_early_minutes": 30, "check_in_late_minutes": 10}}
            ],
            "queues": [
                {"site": "SFO", "code": "accounts", "name": "Accounts", "letter": "B", "first_number": 100, "last_number": 999}
            ],
            "service_points": [{"site": "SFO", "code": "C1", "name": "Counter 1"}],
            "work_profiles": [], "staff": []
        }))
        .expect("config")
    }

    fn db() -> Connection {
        let mut conn = Connection::open_in_memory().expect("db");
        crate::store::migrate(&mut conn).expect("migrate");
        conn
    }

    /// 2026-03-09 at `h:m` in San Francisco (UTC-7 that day).
    fn sf(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 9, h + 7, m, 0).unwrap()
    }

    fn snap(
        id: &str,
        hh_mm: &str,
        revision: u64,
        status: AppointmentStatus,
    ) -> AppointmentSnapshot {
        let (h, m) = hh_mm.split_once(':').expect("hh:mm");
        let (h, m): (u32, u32) = (h.parse().expect("h"), m.parse().expect("m"));
        AppointmentSnapshot {
            id: id.parse().expect("id"),
            site: SiteCode::parse("SFO").expect("site"),
            service: meridian_shared::Code::parse("ACC").expect("service"),
            queue: Some(meridian_shared::Code::parse("accounts").expect("queue")),
            start: format!("2026-03-09T{hh_mm}"),
            starts_at: sf(h, m),
            local_day: "2026-03-09".parse().expect("day"),
            duration_minutes: 15,
            customer_name: "Ann Lee".into(),
            customer_contact: None,
            notes: None,
            external_ref: Some(format!("CRM-{}", &id[id.len() - 4..])),
            status,
            revision,
            updated_at: sf(6, 0),
        }
    }

    const A: &str = "01937a4e-1d2c-7000-8000-00000000a001";
    const B: &str = "01937a4e-1d2c-7000-8000-00000000b002";

    fn outbox_kinds(conn: &Connection) -> Vec<(String, serde_json::Value)> {
        let mut stmt = conn.prepare("SELECT kind, payload FROM outbox ORDER BY seq").expect("q");
        stmt.query_map([], |r| {
            let payload: Vec<u8> = r.get(1)?;
            Ok((r.get::<_, String>(0)?, serde_json::from_slice(&payload).unwrap_or_default()))
        })
        .expect("rows")
        .collect::<rusqlite::Result<_>>()
        .expect("outbox")
    }

    fn statuses(conn: &Connection) -> Vec<String> {
        outbox_kinds(conn)
            .into_iter()
            .filter(|(k, _)| k == "APPOINTMENT_STATUS")
            .map(|(_, p)| p["status"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn refusal(r: Result<CheckedIn>) -> &'static str {
        match r {
            Err(Error::CheckIn(r)) => r.code(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn check_in_refuses_outside_the_window_and_for_the_wrong_state() {
        let conn = db();
        let config = config();
        let id: AppointmentId = A.parse().expect("id");
        appointments::apply(&conn, &snap(A, "10:00", 1, AppointmentStatus::Booked), sf(6, 0))
            .expect("apply");
        let reference = id.reference().to_string();
        let check = |text: &str, now: DateTime<Utc>, expected: &str| {
            assert_eq!(refusal(check_in_text(&conn, &config, text, now)), expected, "{text} {now}");
        };
        check("ZZZZ-ZZZZ", sf(9, 45), "unknown_appointment");
        check("nonsense that is no reference", sf(9, 45), "unknown_appointment");
        check(&reference, sf(9, 29), "too_early");
        check(&reference, sf(10, 11), "too_late");
        match check_in_text(&conn, &config, &reference, sf(9, 29)) {
            Err(e) => assert!(e.to_string().contains("opens at 09:30"), "{e}"),
            Ok(_) => panic!("checked in early"),
        }
        // Nothing was written by the refusals.
        assert!(outbox_kinds(&conn).is_empty());
        // Another day.
        check(&reference, sf(9, 45) + chrono::Duration::days(1), "not_today");
        // The service is gone from the configuration.
        let mut without = config.clone();
        without.services.retain(|s| s.code.as_str() != "ACC");
        assert_eq!(
            refusal(check_in_text(&conn, &without, &reference, sf(9, 45))),
            "service_unavailable"
        );
        // Opens inclusive: by the QR text, lower case.
        let done = check_in_text(
            &conn,
            &config,
            &format!("meridian:appt:{}", reference.to_lowercase()),
            sf(9, 30),
        )
        .expect("check in");
        assert_eq!(done.appointment.check_in.attendance, Some(Attendance::Arrived));
        assert_eq!(done.appointment.check_in.ticket.as_deref(), Some(done.visit.ticket.as_str()));
        assert_eq!(done.visit.queue, "accounts");
        assert_eq!(done.visit.customer.as_ref().and_then(|c| c.name.as_deref()), Some("Ann Lee"));
        // A second check-in returns the existing ticket.
        match check_in(&conn, &config, &id, sf(9, 31)) {
            Err(Error::CheckIn(r)) => match *r {
                CheckInRefusal::AlreadyCheckedIn { visit } => assert_eq!(visit.id, done.visit.id),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        assert_eq!(statuses(&conn), ["arrived"]);
        // Cancelled ones are refused.
        appointments::apply(&conn, &snap(B, "10:00", 2, AppointmentStatus::Cancelled), sf(6, 0))
            .expect("apply");
        assert_eq!(refusal(check_in_text(&conn, &config, B, sf(9, 45))), "appointment_cancelled");
    }

    #[test]
    fn every_accepted_text_finds_the_appointment() {
        let config = config();
        let id: AppointmentId = A.parse().expect("id");
        let r = id.reference().to_string();
        for text in [
            r.clone(),
            r.to_lowercase(),
            r.replace('-', ""),
            format!("MERIDIAN:APPT:{r}"),
            A.to_owned(),
            "CRM-a001".to_owned(),
        ] {
            let conn = db();
            appointments::apply(&conn, &snap(A, "10:00", 1, AppointmentStatus::Booked), sf(6, 0))
                .expect("apply");
            let done = check_in_text(&conn, &config, &text, sf(9, 50)).expect(&text);
            assert_eq!(done.appointment.id, id, "{text}");
        }
    }

    #[test]
    fn appointment_visits_are_placed_by_their_start_among_walk_ins() {
        let conn = db();
        let config = config();
        appointments::apply(&conn, &snap(A, "10:00", 1, AppointmentStatus::Booked), sf(6, 0))
            .expect("apply");
        appointments::apply(&conn, &snap(B, "09:45", 1, AppointmentStatus::Booked), sf(6, 0))
            .expect("apply");
        // 09:40 walk-in; the 10:00 appointment checks in early at 09:41; 09:42 walk-in; the
        // 09:45 appointment checks in late at 09:50; 09:52 walk-in.
        let w1 = visits::create(&conn, &config, "GEN", None, sf(9, 40)).expect("w1");
        let a = check_in(&conn, &config, &A.parse().expect("id"), sf(9, 41)).expect("a");
        let w2 = visits::create(&conn, &config, "GEN", None, sf(9, 42)).expect("w2");
        let b = check_in(&conn, &config, &B.parse().expect("id"), sf(9, 50)).expect("b");
        let w3 = visits::create(&conn, &config, "GEN", None, sf(9, 52)).expect("w3");
        let order: Vec<String> = visits::list(&conn, VisitStatus::Waiting)
            .expect("list")
            .into_iter()
            .map(|v| v.id)
            .collect();
        assert_eq!(order, [w1.id, w2.id, b.visit.id, w3.id, a.visit.id]);
    }

    #[test]
    fn the_visit_drives_the_attendance_and_each_change_is_one_event() {
        let conn = db();
        let config = config();
        visits::open_counter(&conn, &config, "C1", None, sf(9, 0)).expect("open");
        appointments::apply(&conn, &snap(A, "10:00", 1, AppointmentStatus::Booked), sf(6, 0))
            .expect("apply");
        let done = check_in(&conn, &config, &A.parse().expect("id"), sf(9, 55)).expect("in");
        let called = visits::call_next(&conn, &config, "C1", sf(10, 0)).expect("call").expect("v");
        assert_eq!(called.id, done.visit.id);
        for op in [Op::Recall, Op::StartServing, Op::End] {
            visits::transition(&conn, &config, &called.id, op, vec![], sf(10, 5)).expect("op");
        }
        assert_eq!(statuses(&conn), ["arrived", "called", "completed"]);
        let a = appointments::by_id(&conn, &A.parse().expect("id")).expect("get").expect("a");
        assert_eq!(a.check_in.attendance, Some(Attendance::Completed));
        let events = outbox_kinds(&conn);
        let last = &events.last().expect("event").1;
        assert_eq!(last["visit_id"], serde_json::json!(done.visit.id));
        assert_eq!(last["ticket"], serde_json::json!(done.visit.ticket));
        assert_eq!(last["revision"], serde_json::json!(1));

        // A called visit that does not come to the counter: no-show.
        appointments::apply(&conn, &snap(B, "10:15", 1, AppointmentStatus::Booked), sf(6, 0))
            .expect("apply");
        check_in(&conn, &config, &B.parse().expect("id"), sf(10, 6)).expect("in");
        let v = visits::call_next(&conn, &config, "C1", sf(10, 15)).expect("call").expect("v");
        visits::transition(&conn, &config, &v.id, Op::NoShow, vec![], sf(10, 17)).expect("ns");
        assert_eq!(
            statuses(&conn),
            ["arrived", "called", "completed", "arrived", "called", "no_show"]
        );
    }

    #[test]
    fn the_sweep_marks_appointments_not_arrived_by_the_end_of_their_window() {
        let conn = db();
        let config = config();
        for (id, at, status) in [
            (A, "10:00", AppointmentStatus::Booked),
            (B, "10:30", AppointmentStatus::Booked),
            ("01937a4e-1d2c-7000-8000-00000000c003", "10:00", AppointmentStatus::Cancelled),
        ] {
            appointments::apply(&conn, &snap(id, at, 1, status), sf(6, 0)).expect("apply");
        }
        assert_eq!(sweep_no_shows(&conn, &config, sf(10, 10)).expect("sweep"), 0);
        assert_eq!(sweep_no_shows(&conn, &config, sf(10, 11)).expect("sweep"), 1);
        assert_eq!(sweep_no_shows(&conn, &config, sf(10, 12)).expect("sweep"), 0);
        check_in(&conn, &config, &B.parse().expect("id"), sf(10, 35)).expect("b arrives");
        assert_eq!(sweep_no_shows(&conn, &config, sf(12, 0)).expect("sweep"), 0);
        assert_eq!(statuses(&conn), ["no_show", "arrived"]);
        let a = appointments::by_id(&conn, &A.parse().expect("id")).expect("get").expect("a");
        assert_eq!((a.check_in.attendance, a.check_in.visit_id), (Some(Attendance::NoShow), None));
        assert_eq!(refusal(check_in(&conn, &config, &a.id, sf(10, 12))), "too_late");
        // Central moves the missed appointment (it did not know of the no-show): the new time
        // gets its own window.
        appointments::apply(&conn, &snap(A, "11:00", 2, AppointmentStatus::Booked), sf(10, 20))
            .expect("apply");
        let a = appointments::by_id(&conn, &a.id).expect("get").expect("a");
        assert_eq!(a.check_in, CheckInState::default());
        check_in(&conn, &config, &a.id, sf(10, 45)).expect("checks in for the new time");
    }

    #[test]
    fn a_later_snapshot_keeps_the_arrival_and_records_the_conflict() {
        let config = config();
        let id: AppointmentId = A.parse().expect("id");
        for (change, conflict) in [
            (snap(A, "10:00", 2, AppointmentStatus::Cancelled), Conflict::CancelledAfterArrival),
            (snap(A, "11:30", 2, AppointmentStatus::Booked), Conflict::RescheduledAfterArrival),
        ] {
            let conn = db();
            appointments::apply(&conn, &snap(A, "10:00", 1, AppointmentStatus::Booked), sf(6, 0))
                .expect("apply");
            let done = check_in(&conn, &config, &id, sf(9, 50)).expect("in");
            assert!(appointments::apply(&conn, &change, sf(9, 55)).expect("apply"));
            let a = appointments::by_id(&conn, &id).expect("get").expect("a");
            // Central fields follow the snapshot ...
            assert_eq!((a.revision, a.status, a.start.clone()), (2, change.status, change.start));
            // ... the branch's columns stay, with the conflict.
            assert_eq!(a.check_in.attendance, Some(Attendance::Arrived));
            assert_eq!(a.check_in.visit_id.as_deref(), Some(done.visit.id.as_str()));
            assert_eq!(a.check_in.arrived_at, Some(sf(9, 50)));
            assert_eq!(a.check_in.conflict, Some(conflict));
            assert_eq!(a.check_in.conflict_at, Some(sf(9, 55)));
            // The visit continues, still in today's list.
            let v = visits::get(&conn, &done.visit.id).expect("visit");
            assert_eq!(v.status, VisitStatus::Waiting);
            assert_eq!(
                appointments::of_day(&conn, "2026-03-09".parse().expect("d")).expect("l").len(),
                1
            );
            // A replay of an older snapshot changes nothing.
            assert!(
                !appointments::apply(
                    &conn,
                    &snap(A, "10:00", 1, AppointmentStatus::Booked),
                    sf(9, 56)
                )
                .expect("apply")
            );
        }
    }
}
