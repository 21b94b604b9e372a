//! Closures the branch decides on its own: staff close part of a site-local day (an emergency,
//! too few staff) at the branch, with or without the link. `close` records it and queues
//! `BRANCH_CLOSED` in one store job, and flags every appointment of that time still expected
//! (booked, nobody checked in) `slot_closed_at_branch`; `reopen` withdraws it
//! (`BRANCH_REOPENED`). An appointment that reaches the branch later (live or by the bulk sync)
//! inside an open closure is flagged the same way (`flag_if_closed`): central booked it before
//! it knew. The flag is for admins and reception; it does not stop a check-in. Central flags
//! its copy when it receives the closure, and refuses bookings into it from then on.

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use meridian_shared::appointments::{AppointmentSnapshot, AppointmentStatus};
use meridian_shared::business_day::business_day;
use meridian_shared::check_in::Conflict;
use meridian_shared::closures::{BranchClosed, BranchReopened, Closure, hh_mm};
use meridian_shared::config::SiteConfig;
use meridian_shared::events::AgentEvent;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::queries::append_event;

/// A closure as staff enter it (`POST /api/v1/closures`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewClosure {
    /// Site-local day, `YYYY-MM-DD`; today when absent.
    pub date: Option<String>,
    /// `HH:MM`, site wall clock.
    pub from: String,
    /// `HH:MM` (exclusive; `24:00` for the end of the day).
    pub to: String,
    pub reason: String,
}

/// A stored closure, with the appointments it flagged when it was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BranchClosure {
    #[serde(flatten)]
    pub closure: Closure,
    pub created_at: DateTime<Utc>,
    pub reopened_at: Option<DateTime<Utc>>,
    /// Appointments flagged `slot_closed_at_branch` when the closure was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flagged: Option<u32>,
}

/// Validates and records a closure, flags the appointments it hits, queues `BRANCH_CLOSED`.
pub fn close(
    conn: &Connection,
    config: &SiteConfig,
    input: &NewClosure,
    now: DateTime<Utc>,
) -> Result<BranchClosure> {
    let tz = config.site.tz().map_err(Error::Internal)?;
    let today = business_day(tz, now);
    let mut errs = meridian_shared::ValidationErrors::default();
    let day = match input.date.as_deref() {
        None => Some(today),
        Some(raw) => raw.parse::<NaiveDate>().ok().or_else(|| {
            errs.push("date", format!("{raw:?} is not a date YYYY-MM-DD"));
            None
        }),
    };
    let mut time = |name: &str, raw: &str| match hh_mm::parse(raw) {
        Ok(t) => Some(t),
        Err(e) => {
            errs.push(name, e);
            None
        }
    };
    let (from, to) = (time("from", &input.from), time("to", &input.to));
    let (Some(day), Some(from), Some(to)) = (day, from, to) else {
        return Err(Error::InvalidFields(errs));
    };
    let closure =
        Closure { id: uuid::Uuid::now_v7(), day, from, to, reason: input.reason.trim().to_owned() };
    closure.validate(today, now.with_timezone(&tz).naive_local()).map_err(Error::InvalidFields)?;
    conn.prepare_cached(
        "INSERT INTO branch_closures (id, day, from_time, to_time, reason, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        closure.id.to_string(),
        day.to_string(),
        from.format("%H:%M").to_string(),
        to.format("%H:%M").to_string(),
        closure.reason,
        now.to_rfc3339()
    ])?;
    let expected: Vec<(String, String, i64)> = conn
        .prepare_cached(
            "SELECT id, local_start, duration_minutes FROM appointments \
             WHERE local_day = ?1 AND status = 'booked' AND attendance IS NULL AND conflict IS NULL",
        )?
        .query_map([day.to_string()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut flagged = 0u32;
    for (id, local_start, minutes) in expected {
        if start_time(&local_start)
            .is_some_and(|t| closure.overlaps(day, t, u32::try_from(minutes).unwrap_or(0)))
        {
            set_flag(conn, &id, now)?;
            flagged += 1;
        }
    }
    append_event(
        conn,
        &AgentEvent::BranchClosed(BranchClosed { closure: closure.clone(), at: now }),
        now,
    )?;
    tracing::warn!(closure = %closure.id, day = %day, from = %input.from, to = %input.to, flagged, "part of the day closed at the branch");
    Ok(BranchClosure { closure, created_at: now, reopened_at: None, flagged: Some(flagged) })
}

/// Withdraws an open closure (flags already set stay for admins); queues `BRANCH_REOPENED`.
pub fn reopen(conn: &Connection, id: &str, now: DateTime<Utc>) -> Result<BranchClosure> {
    let found = get(conn, id)?.ok_or_else(|| Error::NotFound(format!("closure {id}")))?;
    if found.reopened_at.is_some() {
        return Err(Error::Conflict(format!("closure {id} is already withdrawn")));
    }
    conn.prepare_cached("UPDATE branch_closures SET reopened_at = ?2 WHERE id = ?1")?
        .execute(params![id, now.to_rfc3339()])?;
    append_event(
        conn,
        &AgentEvent::BranchReopened(BranchReopened { closure_id: found.closure.id, at: now }),
        now,
    )?;
    Ok(BranchClosure { reopened_at: Some(now), ..found })
}

/// Flags `snap` if it is a booked appointment inside an open closure and nothing else is
/// flagged on it yet (called whenever the branch stores a newer central snapshot).
pub fn flag_if_closed(
    conn: &Connection,
    snap: &AppointmentSnapshot,
    now: DateTime<Utc>,
) -> Result<bool> {
    if snap.status != AppointmentStatus::Booked {
        return Ok(false);
    }
    flag_if_closed_in(conn, snap, &open_on(conn, snap.local_day)?, now)
}

/// `flag_if_closed` against closures read once (`open_between`) for many snapshots.
pub fn flag_if_closed_in(
    conn: &Connection,
    snap: &AppointmentSnapshot,
    closures: &[Closure],
    now: DateTime<Utc>,
) -> Result<bool> {
    if snap.status != AppointmentStatus::Booked {
        return Ok(false);
    }
    let Some(start) = start_time(&snap.start) else { return Ok(false) };
    if !closures.iter().any(|c| c.overlaps(snap.local_day, start, snap.duration_minutes)) {
        return Ok(false);
    }
    let changed = conn
        .prepare_cached(
            "UPDATE appointments SET conflict = ?2, conflict_at = ?3 \
             WHERE id = ?1 AND attendance IS NULL AND conflict IS NULL",
        )?
        .execute(params![
            snap.id.to_string(),
            Conflict::SlotClosedAtBranch.as_str(),
            now.to_rfc3339()
        ])?;
    if changed > 0 {
        tracing::warn!(appointment = %snap.id, start = %snap.start, "central booked an appointment into a time the branch closed");
    }
    Ok(changed > 0)
}

fn set_flag(conn: &Connection, id: &str, now: DateTime<Utc>) -> Result<()> {
    conn.prepare_cached("UPDATE appointments SET conflict = ?2, conflict_at = ?3 WHERE id = ?1")?
        .execute(params![id, Conflict::SlotClosedAtBranch.as_str(), now.to_rfc3339()])?;
    Ok(())
}

/// `HH:MM` of a local start `YYYY-MM-DDTHH:MM`.
fn start_time(local_start: &str) -> Option<NaiveTime> {
    local_start.get(11..16).and_then(|t| NaiveTime::parse_from_str(t, "%H:%M").ok())
}

type Row = (String, String, String, String, String, String, Option<String>);

fn decode(r: Row) -> Result<BranchClosure> {
    let corrupt = |what: &str, v: &str| {
        Error::Internal(format!(
            "corrupt value in branch_closures.{what}: {:?}",
            v.chars().take(40).collect::<String>()
        ))
    };
    let instant = |what: &str, v: &str| {
        DateTime::parse_from_rfc3339(v).map(|t| t.with_timezone(&Utc)).map_err(|_| corrupt(what, v))
    };
    Ok(BranchClosure {
        closure: Closure {
            id: r.0.parse().map_err(|_| corrupt("id", &r.0))?,
            day: r.1.parse().map_err(|_| corrupt("day", &r.1))?,
            from: hh_mm::parse(&r.2).map_err(|_| corrupt("from_time", &r.2))?,
            to: hh_mm::parse(&r.3).map_err(|_| corrupt("to_time", &r.3))?,
            reason: r.4,
        },
        created_at: instant("created_at", &r.5)?,
        reopened_at: r.6.as_deref().map(|v| instant("reopened_at", v)).transpose()?,
        flagged: None,
    })
}

const SELECT: &str =
    "SELECT id, day, from_time, to_time, reason, created_at, reopened_at FROM branch_closures";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
}

fn get(conn: &Connection, id: &str) -> Result<Option<BranchClosure>> {
    conn.prepare_cached(&format!("{SELECT} WHERE id = ?1"))?
        .query_row([id], row)
        .optional()?
        .map(decode)
        .transpose()
}

fn open_on(conn: &Connection, day: NaiveDate) -> Result<Vec<Closure>> {
    open_between(conn, day, day)
}

/// The open closures of `from` to `to` (site-local days, inclusive).
pub fn open_between(conn: &Connection, from: NaiveDate, to: NaiveDate) -> Result<Vec<Closure>> {
    let rows = conn
        .prepare_cached(&format!("{SELECT} WHERE day >= ?1 AND day <= ?2 AND reopened_at IS NULL"))?
        .query_map([from.to_string(), to.to_string()], row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(|r| decode(r).map(|c| c.closure)).collect()
}

/// Closures of `from` and later days (withdrawn ones too, with `reopened_at`), by day and time.
pub fn list(conn: &Connection, from: NaiveDate) -> Result<Vec<BranchClosure>> {
    let rows = conn
        .prepare_cached(&format!("{SELECT} WHERE day >= ?1 ORDER BY day, from_time, id"))?
        .query_map([from.to_string()], row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(decode).collect()
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use meridian_shared::{AppointmentId, Code, SiteCode};

    use super::*;

    fn db() -> Connection {
        let mut conn = Connection::open_in_memory().expect("db");
        crate::store::migrate(&mut conn).expect("migrate");
        conn
    }

    fn config() -> SiteConfig {
        serde_json::from_value(serde_json::json!({
            "revision": 1,
            "site": {"code": "SFO", "name": "SF", "time_zone": "UTC"},
            "services": [], "queues": [], "service_points": [], "work_profiles": [],
            "staff": [], "connector_keys": [], "webhooks": []
        }))
        .expect("config")
    }

    fn snap(n: u32, start: &str, status: AppointmentStatus) -> AppointmentSnapshot {
        let local = chrono::NaiveDateTime::parse_from_str(start, "%Y-%m-%dT%H:%M").expect("start");
        AppointmentSnapshot {
            id: format!("01937a4e-1d2c-7000-8000-{n:012}").parse::<AppointmentId>().expect("id"),
            site: SiteCode::parse("SFO").expect("site"),
            service: Code::parse("ACC").expect("service"),
            queue: None,
            start: start.into(),
            starts_at: Utc.from_utc_datetime(&local),
            local_day: local.date(),
            duration_minutes: 15,
            customer_name: format!("C{n}"),
            customer_contact: None,
            notes: None,
            external_ref: None,
            status,
            revision: 1,
            updated_at: Utc.with_ymd_and_hms(2026, 3, 9, 8, 0, 0).unwrap(),
        }
    }

    fn conflicts(conn: &Connection) -> Vec<(String, Option<String>)> {
        conn.prepare("SELECT local_start, conflict FROM appointments ORDER BY local_start")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    #[test]
    fn a_closure_flags_what_it_hits_then_and_later_and_is_sent_to_central() {
        let conn = db();
        let now = Utc.with_ymd_and_hms(2026, 3, 9, 9, 0, 0).unwrap();
        for (n, start, status) in [
            (1, "2026-03-09T13:45", AppointmentStatus::Booked),
            (2, "2026-03-09T14:00", AppointmentStatus::Booked),
            (3, "2026-03-09T15:00", AppointmentStatus::Cancelled),
            (4, "2026-03-10T14:30", AppointmentStatus::Booked),
        ] {
            crate::appointments::apply(&conn, &snap(n, start, status), now).unwrap();
        }
        let input = NewClosure {
            date: None,
            from: "14:00".into(),
            to: "16:00".into(),
            reason: "two staff ill".into(),
        };
        let made = close(&conn, &config(), &input, now).unwrap();
        assert_eq!(made.flagged, Some(1));
        // A later central booking into the closure is flagged when it arrives; one outside is not.
        let late = snap(5, "2026-03-09T15:30", AppointmentStatus::Booked);
        crate::appointments::apply(&conn, &late, now).unwrap();
        assert!(flag_if_closed(&conn, &late, now).unwrap());
        let outside = snap(6, "2026-03-09T16:00", AppointmentStatus::Booked);
        crate::appointments::apply(&conn, &outside, now).unwrap();
        assert!(!flag_if_closed(&conn, &outside, now).unwrap());
        let flag = Some("slot_closed_at_branch".to_owned());
        assert_eq!(
            conflicts(&conn),
            [
                ("2026-03-09T13:45".to_owned(), None),
                ("2026-03-09T14:00".to_owned(), flag.clone()),
                ("2026-03-09T15:00".to_owned(), None),
                ("2026-03-09T15:30".to_owned(), flag),
                ("2026-03-09T16:00".to_owned(), None),
                ("2026-03-10T14:30".to_owned(), None),
            ]
        );
        // Withdrawn: later arrivals are no longer flagged; a second withdrawal is refused.
        let id = made.closure.id.to_string();
        reopen(&conn, &id, now).unwrap();
        assert!(matches!(reopen(&conn, &id, now), Err(Error::Conflict(_))));
        let after = snap(7, "2026-03-09T14:30", AppointmentStatus::Booked);
        crate::appointments::apply(&conn, &after, now).unwrap();
        assert!(!flag_if_closed(&conn, &after, now).unwrap());
        let listed = list(&conn, "2026-03-09".parse().unwrap()).unwrap();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].reopened_at.is_some());
        let kinds: Vec<String> = conn
            .prepare("SELECT kind FROM outbox ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(
            kinds.ends_with(&["BRANCH_CLOSED".to_owned(), "BRANCH_REOPENED".to_owned()]),
            "{kinds:?}"
        );
    }

    #[test]
    fn bad_closures_are_refused_field_by_field_and_change_nothing() {
        let conn = db();
        let now = Utc.with_ymd_and_hms(2026, 3, 9, 9, 0, 0).unwrap();
        let bad = |date: Option<&str>, from: &str, to: &str, reason: &str| {
            let input = NewClosure {
                date: date.map(Into::into),
                from: from.into(),
                to: to.into(),
                reason: reason.into(),
            };
            match close(&conn, &config(), &input, now) {
                Err(Error::InvalidFields(errs)) => {
                    errs.0.into_iter().map(|e| e.field).collect::<Vec<_>>()
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        };
        assert_eq!(bad(Some("yesterday"), "9", "10:00", "x"), ["date", "from"]);
        assert_eq!(bad(None, "16:00", "14:00", ""), ["to", "reason"]);
        assert_eq!(bad(Some("2026-03-08"), "14:00", "16:00", "late"), ["date"]);
        // At most 366 days ahead: 2027-03-10 is day 366, 2027-03-11 is beyond.
        assert_eq!(bad(Some("2027-03-11"), "08:00", "09:00", "far"), ["date"]);
        assert_eq!(bad(Some("+200000-01-01"), "08:00", "09:00", "far"), ["date"]);
        assert!(list(&conn, "2026-01-01".parse().unwrap()).unwrap().is_empty());
        let events: i64 = conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0)).unwrap();
        assert_eq!(events, 0);
    }
}
