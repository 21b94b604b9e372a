//! Central booking: appointments for a site's service at a start in the site's own time zone,
//! validated against the configuration (the service's `AppointmentPolicy`, business hours,
//! closed dates, daylight-saving changes: see `slots`) and the clock, then written by the
//! store, which checks the slot's capacity in the same transaction.
//!
//! **Boundary:** the API (`api::appointments`) hands requests in as they arrived (strings);
//! everything is validated here, every problem of a request reported at once with its field
//! (`Error::Validation`, HTTP 422). A request that is well formed but meets a state that does
//! not allow it (slot full, stale revision, already cancelled, external reference taken) is an
//! `Error::Appointment` (HTTP 409); an unknown appointment is `Error::NotFound`. Nothing is
//! written unless every check passed.
//!
//! **Same-day live sync:** each change names the site's current business day by the injected
//! clock (`LiveSync`), and the store sends a change that touches that day to the site's agents
//! in the change's own transaction (`Changed::sent_live` tells the caller to wake the gateway
//! sessions). Appointments of later days are left to the nightly bulk sync (`sync`). A
//! change committed in the instant the site's day rolls over may be judged against the day
//! before; the nightly sync covers the new day either way.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use meridian_shared::clock::Clock;
use meridian_shared::config::{
    AppointmentPolicy, ConfigSet, Resource, ResourceKey, ResourceKind, Site,
};
use meridian_shared::{AppointmentId, Code, SiteCode, ValidationErrors};
use serde::{Deserialize, Serialize};

use crate::error::{AppointmentRefusal, Error, Result};
use crate::store::Store;
use crate::store::appointments::{
    Appointment, AppointmentFilter, AppointmentStatus, LOCAL_START_FORMAT, LiveSync,
    NewAppointment, Placement, seats_taken,
};

pub mod slots;
pub mod sync;

/// Longest customer name, in characters.
pub const MAX_CUSTOMER_NAME: usize = 120;
/// Longest customer contact (a phone number or an e-mail address), in characters.
pub const MAX_CUSTOMER_CONTACT: usize = 254;
/// Longest note or cancellation reason, in characters.
pub const MAX_NOTES: usize = 500;
/// Longest external reference, in characters.
pub const MAX_EXTERNAL_REF: usize = 100;
/// How far ahead an appointment may be booked.
pub const MAX_DAYS_AHEAD: i64 = 366;
/// Most appointments one listing returns (and its default).
pub const MAX_LIST: u32 = 5000;
pub const DEFAULT_LIST: u32 = 1000;

/// `POST /api/v1/appointments`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BookRequest {
    pub site: String,
    pub service: String,
    /// `YYYY-MM-DDTHH:MM` in the site's time zone.
    pub start: String,
    pub customer_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_contact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    /// A reference of the system that booked it (unique per site).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_ref: Option<String>,
}

/// `POST /api/v1/appointments/{id}/reschedule`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RescheduleRequest {
    pub start: String,
    pub expected_revision: u64,
}

/// `POST /api/v1/appointments/{id}/cancel`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_revision: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `GET /api/v1/appointments`: site-local days, inclusive.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub site: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub status: Option<String>,
    /// `true`: only appointments flagged with a conflict (`false`: only those without).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<bool>,
    pub limit: Option<u32>,
}

/// `GET /api/v1/appointments/slots`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SlotsQuery {
    pub site: String,
    pub service: String,
    pub date: String,
}

/// The slots of one service on one day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DaySlots {
    #[schema(value_type = String)]
    pub site: SiteCode,
    #[schema(value_type = String)]
    pub service: Code,
    pub date: NaiveDate,
    pub time_zone: String,
    pub slot_minutes: u32,
    pub slots: Vec<SlotView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SlotView {
    /// `YYYY-MM-DDTHH:MM` in the site's time zone.
    pub start: String,
    pub starts_at: DateTime<Utc>,
    pub capacity: u32,
    pub booked: u32,
    pub remaining: u32,
    /// Whether it can be booked now: not started yet, a seat left, not closed by the branch.
    pub bookable: bool,
    /// The branch closed this time (`BRANCH_CLOSED`).
    #[serde(default)]
    pub closed_at_branch: bool,
}

/// An appointment after a change, and whether the change went to the site's agents (the
/// caller then wakes the gateway sessions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    pub appointment: Appointment,
    pub sent_live: bool,
}

impl Changed {
    fn new(appointment: Appointment, live: Option<&LiveSync>, before: Option<NaiveDate>) -> Self {
        let sent_live = live.is_some_and(|l| l.concerns(before, appointment.local_day));
        Changed { appointment, sent_live }
    }
}

/// Books an appointment.
pub async fn book(store: &dyn Store, clock: &dyn Clock, req: BookRequest) -> Result<Changed> {
    let set = config(store).await?;
    let now = clock.now();
    let mut errs = ValidationErrors::default();
    let target = service_of(&set, &req.site, &req.service, &mut errs);
    let local = parse_local(&req.start, "start", &mut errs);
    let customer_name = text(
        Some(req.customer_name.as_str()),
        "customer_name",
        MAX_CUSTOMER_NAME,
        false,
        &mut errs,
    );
    if customer_name.is_none() && !errs.0.iter().any(|e| e.field == "customer_name") {
        errs.push("customer_name", "must not be empty");
    }
    let customer_contact = text(
        req.customer_contact.as_deref(),
        "customer_contact",
        MAX_CUSTOMER_CONTACT,
        false,
        &mut errs,
    );
    let notes = text(req.notes.as_deref(), "notes", MAX_NOTES, true, &mut errs);
    let external_ref =
        text(req.external_ref.as_deref(), "external_ref", MAX_EXTERNAL_REF, false, &mut errs);
    let placement = match (&target, local) {
        (Some(t), Some(local)) => placement(t, local, now, "start", &mut errs),
        _ => None,
    };
    errs.into_result()?;
    let (Some(target), Some(placement), Some(customer_name)) = (target, placement, customer_name)
    else {
        return Err(Error::Internal("booking validated without a placement".into()));
    };
    let live = target.live(now);
    let new = NewAppointment {
        id: AppointmentId::new(),
        site: target.site.code.clone(),
        service: target.service,
        placement,
        customer_name,
        customer_contact,
        notes,
        external_ref,
        at: now,
    };
    let booked = store.book_appointment(&new, Some(&live)).await?;
    Ok(Changed::new(booked, Some(&live), None))
}

/// Moves an appointment to another slot of its service.
pub async fn reschedule(
    store: &dyn Store,
    clock: &dyn Clock,
    id: &str,
    req: RescheduleRequest,
) -> Result<Changed> {
    let current = get(store, id).await?;
    if current.status == AppointmentStatus::Cancelled {
        return Err(AppointmentRefusal::AlreadyCancelled.into());
    }
    let set = config(store).await?;
    let now = clock.now();
    let mut errs = ValidationErrors::default();
    let target = service_of(&set, current.site.as_str(), current.service.as_str(), &mut errs);
    let local = parse_local(&req.start, "start", &mut errs);
    let placement = match (&target, local) {
        (Some(t), Some(local)) => placement(t, local, now, "start", &mut errs),
        _ => None,
    };
    errs.into_result()?;
    let (Some(target), Some(placement)) = (target, placement) else {
        return Err(Error::Internal("reschedule validated without a placement".into()));
    };
    let live = target.live(now);
    let moved = store
        .reschedule_appointment(current.id, req.expected_revision, &placement, now, Some(&live))
        .await?;
    // Only the wake-up hint depends on `before`; the store judges the day under its lock.
    Ok(Changed::new(moved, Some(&live), Some(current.local_day)))
}

/// Cancels an appointment; its seat is free at once.
pub async fn cancel(
    store: &dyn Store,
    clock: &dyn Clock,
    id: &str,
    req: CancelRequest,
) -> Result<Changed> {
    let mut errs = ValidationErrors::default();
    let reason = text(req.reason.as_deref(), "reason", MAX_NOTES, true, &mut errs);
    errs.into_result()?;
    let current = get(store, id).await?;
    let now = clock.now();
    let live = live_for(&config(store).await?, &current, now);
    let cancelled = store
        .cancel_appointment(
            current.id,
            req.expected_revision,
            reason.as_deref(),
            now,
            live.as_ref(),
        )
        .await?;
    Ok(Changed::new(cancelled, live.as_ref(), None))
}

/// The live sync of a change to `a` at `now`, from the current configuration: `None` when its
/// site is no longer configured (its agent has nothing to show it in).
fn live_for(set: &ConfigSet, a: &Appointment, now: DateTime<Utc>) -> Option<LiveSync> {
    let site = set.site(&a.site)?;
    let tz = site.tz().ok()?;
    let key = ResourceKey {
        kind: ResourceKind::Service,
        site: Some(a.site.clone()),
        code: a.service.to_string(),
    };
    let queue = match set.get(&key) {
        Some(Resource::Service(svc)) => Some(svc.queue.clone()),
        _ => None,
    };
    Some(LiveSync { today: meridian_shared::business_day::business_day(tz, now), queue })
}

/// One appointment; `NotFound` for an unknown or malformed id.
pub async fn get(store: &dyn Store, id: &str) -> Result<Appointment> {
    let id = parse_id(id)?;
    store.appointment(id).await?.ok_or_else(|| Error::NotFound(format!("appointment {id}")))
}

/// Appointments by start, filtered.
pub async fn list(store: &dyn Store, q: &ListQuery) -> Result<Vec<Appointment>> {
    let mut errs = ValidationErrors::default();
    let site = match q.site.as_deref() {
        None => None,
        Some(s) => match SiteCode::parse(s) {
            Ok(code) => {
                if config(store).await?.site(&code).is_none() {
                    errs.push("site", format!("unknown site {code}"));
                }
                Some(code)
            }
            Err(e) => {
                errs.push("site", e.message);
                None
            }
        },
    };
    let from_day = q.from.as_deref().and_then(|d| parse_day(d, "from", &mut errs));
    let to_day = q.to.as_deref().and_then(|d| parse_day(d, "to", &mut errs));
    if let (Some(from), Some(to)) = (from_day, to_day)
        && to < from
    {
        errs.push("to", "the range ends before it starts");
    }
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => {
            let parsed = AppointmentStatus::parse(s);
            if parsed.is_none() {
                let known: Vec<&str> = AppointmentStatus::ALL.iter().map(|s| s.as_str()).collect();
                errs.push("status", format!("unknown status {s:?}: use {}", known.join(" or ")));
            }
            parsed
        }
    };
    let limit = q.limit.unwrap_or(DEFAULT_LIST);
    if !(1..=MAX_LIST).contains(&limit) {
        errs.push("limit", format!("between 1 and {MAX_LIST}"));
    }
    errs.into_result()?;
    let conflict = q.conflict;
    store
        .list_appointments(&AppointmentFilter { site, from_day, to_day, status, conflict, limit })
        .await
}

/// The slots of a service on one site-local day, with what each has left.
pub async fn day_slots(store: &dyn Store, clock: &dyn Clock, q: &SlotsQuery) -> Result<DaySlots> {
    let set = config(store).await?;
    let mut errs = ValidationErrors::default();
    let target = service_of(&set, &q.site, &q.service, &mut errs);
    let date = parse_day(&q.date, "date", &mut errs);
    errs.into_result()?;
    let (Some(target), Some(date)) = (target, date) else {
        return Err(Error::Internal("slots validated without a service".into()));
    };
    let held = store.held_seats(&target.site.code, &target.service, date).await?;
    let closures = store.site_closures(Some(&target.site.code), date, date).await?;
    let now = clock.now();
    let minutes = chrono::Duration::minutes(i64::from(target.policy.slot_minutes));
    let slots = slots::day_slots(&target.site, target.tz, &target.policy, date)
        .into_iter()
        .map(|slot| {
            let booked = seats_taken(&held, slot.starts_at, slot.starts_at + minutes);
            let remaining = target.policy.capacity.saturating_sub(booked);
            let placement = crate::store::appointments::Placement {
                starts_at: slot.starts_at,
                local_start: slot.local_start,
                duration_minutes: target.policy.slot_minutes,
                capacity: target.policy.capacity,
            };
            let closed = crate::store::appointments::closed_by(&closures, &placement).is_some();
            SlotView {
                start: slot.local_start.format(LOCAL_START_FORMAT).to_string(),
                starts_at: slot.starts_at,
                capacity: target.policy.capacity,
                booked,
                remaining,
                bookable: remaining > 0 && slot.starts_at >= now && !closed,
                closed_at_branch: closed,
            }
        })
        .collect();
    Ok(DaySlots {
        site: target.site.code.clone(),
        service: target.service,
        date,
        time_zone: target.site.time_zone.clone(),
        slot_minutes: target.policy.slot_minutes,
        slots,
    })
}

/// A bookable service: its site, the site's zone and the service's policy.
struct Target {
    site: Site,
    tz: chrono_tz::Tz,
    service: Code,
    queue: Code,
    policy: AppointmentPolicy,
}

impl Target {
    /// The live sync of a change to this service's appointments at `now`.
    fn live(&self, now: DateTime<Utc>) -> LiveSync {
        LiveSync {
            today: meridian_shared::business_day::business_day(self.tz, now),
            queue: Some(self.queue.clone()),
        }
    }
}

async fn config(store: &dyn Store) -> Result<ConfigSet> {
    let (_, resources) = store.load_config().await?;
    Ok(ConfigSet::from_resources(resources))
}

/// Resolves `site` and `service` to a bookable service, or records why not.
fn service_of(
    set: &ConfigSet,
    site: &str,
    service: &str,
    errs: &mut ValidationErrors,
) -> Option<Target> {
    let site = match SiteCode::parse(site) {
        Ok(code) => match set.site(&code) {
            Some(site) => Some(site.clone()),
            None => {
                errs.push("site", format!("unknown site {code}"));
                None
            }
        },
        Err(e) => {
            errs.push("site", e.message);
            None
        }
    };
    let code = match Code::parse(service) {
        Ok(code) => Some(code),
        Err(e) => {
            errs.push("service", e.message);
            None
        }
    };
    let (site, code) = (site?, code?);
    let key = ResourceKey {
        kind: ResourceKind::Service,
        site: Some(site.code.clone()),
        code: code.to_string(),
    };
    let Some(Resource::Service(svc)) = set.get(&key) else {
        errs.push("service", format!("unknown service {code} at site {}", site.code));
        return None;
    };
    let Some(policy) = svc.appointments else {
        errs.push(
            "service",
            format!(
                "service {code} at site {} takes no appointments (it has no appointments policy)",
                site.code
            ),
        );
        return None;
    };
    let tz = match site.tz() {
        Ok(tz) => tz,
        Err(e) => {
            errs.push("site", e);
            return None;
        }
    };
    Some(Target { site, tz, service: code, queue: svc.queue.clone(), policy })
}

/// The placement of a wall-clock start, checked against the slots and the clock.
fn placement(
    t: &Target,
    local: NaiveDateTime,
    now: DateTime<Utc>,
    field: &str,
    errs: &mut ValidationErrors,
) -> Option<Placement> {
    let slot = match slots::place(&t.site, t.tz, &t.policy, local) {
        Ok(slot) => slot,
        Err(message) => {
            errs.push(field, message);
            return None;
        }
    };
    if slot.starts_at < now {
        errs.push(
            field,
            format!(
                "{} is in the past (it is {} at the site)",
                local.format("%Y-%m-%d %H:%M"),
                now.with_timezone(&t.tz).format("%Y-%m-%d %H:%M")
            ),
        );
        return None;
    }
    if slot.starts_at > now + chrono::Duration::days(MAX_DAYS_AHEAD) {
        errs.push(field, format!("appointments are booked at most {MAX_DAYS_AHEAD} days ahead"));
        return None;
    }
    Some(Placement {
        starts_at: slot.starts_at,
        local_start: slot.local_start,
        duration_minutes: t.policy.slot_minutes,
        capacity: t.policy.capacity,
    })
}

fn parse_local(s: &str, field: &str, errs: &mut ValidationErrors) -> Option<NaiveDateTime> {
    let parsed = NaiveDateTime::parse_from_str(s.trim(), LOCAL_START_FORMAT).ok();
    if parsed.is_none() {
        errs.push(
            field,
            format!("{s:?} is not a local time YYYY-MM-DDTHH:MM in the site's time zone"),
        );
    }
    parsed
}

fn parse_day(s: &str, field: &str, errs: &mut ValidationErrors) -> Option<NaiveDate> {
    let parsed = NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d").ok();
    if parsed.is_none() {
        errs.push(field, format!("{s:?} is not a date YYYY-MM-DD"));
    }
    parsed
}

fn parse_id(id: &str) -> Result<AppointmentId> {
    id.parse().map_err(|_| Error::NotFound(format!("appointment {id:?}")))
}

/// Free text: trimmed, empty as absent, at most `max` characters, no control characters
/// (line breaks and tabs allowed where `multiline`).
fn text(
    value: Option<&str>,
    field: &str,
    max: usize,
    multiline: bool,
    errs: &mut ValidationErrors,
) -> Option<String> {
    let v = value?.trim();
    if v.is_empty() {
        return None;
    }
    if v.chars().count() > max {
        errs.push(field, format!("at most {max} characters"));
        return None;
    }
    if v.chars().any(|c| c.is_control() && !(multiline && matches!(c, '\n' | '\t' | '\r'))) {
        errs.push(field, "must not contain control characters");
        return None;
    }
    Some(v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_text_is_checked() {
        let check = |value: Option<&str>, multiline: bool, expected: Result<Option<&str>, &str>| {
            let mut errs = ValidationErrors::default();
            let got = text(value, "f", 5, multiline, &mut errs);
            match expected {
                Ok(want) => {
                    assert!(errs.is_empty(), "{value:?}: {errs}");
                    assert_eq!(got.as_deref(), want);
                }
                Err(want) => assert!(errs.to_string().contains(want), "{value:?}: {errs}"),
            }
        };
        check(None, false, Ok(None));
        check(Some("  "), false, Ok(None));
        check(Some(" Ann "), false, Ok(Some("Ann")));
        check(Some("Ann Lee"), false, Err("at most 5 characters"));
        check(Some("a\nb"), false, Err("control characters"));
        check(Some("a\nb"), true, Ok(Some("a\nb")));
        check(Some("a\u{0}b"), true, Err("control characters"));
    }
}
