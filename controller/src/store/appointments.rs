//! The appointments half of the store: appointments booked centrally, with the capacity check
//! and the write in one transaction. Both backends implement it with the SQL of
//! `impl_appointment_store!`, which `impl_store!` expands.
//!
//! Invariants every backend keeps:
//! - the seats taken in a slot never exceed the capacity the booking or reschedule was checked
//!   against: the check and the write share one transaction, and the writes of one site are
//!   serialised (PostgreSQL: a transaction-scoped advisory lock per site,
//!   `Backend::BOOKING_LOCK`; SQLite: `BEGIN IMMEDIATE`, one writer at a time);
//! - every change bumps `revision` by one; a reschedule or cancel that names a revision other
//!   than the stored one changes nothing;
//! - an external reference names at most one appointment per site (unique index);
//! - a change to an appointment of the site's current business day (`LiveSync::today`; for a
//!   reschedule the day it leaves or the day it moves to) appends one `APPOINTMENT_UPSERT`
//!   command with the appointment's new state to the log of every active agent of the site in
//!   the same transaction, so the branch gets every such change exactly once and in order.
//!   Changes to later days append nothing: the nightly bulk sync (a later step) carries them;
//! - the branch's attendance (`APPOINTMENT_STATUS`, applied in the ingest transaction by
//!   `apply_appointment_events`) never bumps `revision`; once it is known, reschedule and
//!   cancel are refused (`AlreadyAttended`).

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use meridian_shared::appointments::AppointmentSnapshot;
use meridian_shared::check_in::{AppointmentState, Attendance, Conflict, Reference};
use meridian_shared::commands::ControllerCommand;
use meridian_shared::{AppointmentId, Code, SiteCode};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The wall-clock format of an appointment's local start: `YYYY-MM-DDTHH:MM`.
pub const LOCAL_START_FORMAT: &str = "%Y-%m-%dT%H:%M";

pub use meridian_shared::appointments::AppointmentStatus;

/// An appointment as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Appointment {
    #[schema(value_type = String)]
    pub id: AppointmentId,
    #[schema(value_type = String)]
    pub site: SiteCode,
    #[schema(value_type = String)]
    pub service: Code,
    /// The start in the site's time zone, `YYYY-MM-DDTHH:MM` (what the customer was told).
    pub start: String,
    /// The start as an instant.
    pub starts_at: DateTime<Utc>,
    /// The site-local day of the start.
    pub local_day: NaiveDate,
    pub duration_minutes: u32,
    pub customer_name: String,
    pub customer_contact: Option<String>,
    pub notes: Option<String>,
    pub external_ref: Option<String>,
    /// booked or cancelled.
    #[schema(value_type = String)]
    pub status: AppointmentStatus,
    pub cancel_reason: Option<String>,
    /// Bumped on every change; reschedule and cancel may name the revision they expect.
    pub revision: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The short booking reference (`XXXX-XXXX`, from the id) the customer shows at the branch.
    #[schema(value_type = String)]
    pub reference: Reference,
    /// Whether it was ever rescheduled.
    #[serde(default)]
    pub rescheduled: bool,
    /// What the branch reported of the customer's attendance (`APPOINTMENT_STATUS` events).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub attendance: Option<Attendance>,
    #[serde(default)]
    pub attendance_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub arrived_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub visit_id: Option<String>,
    #[serde(default)]
    pub ticket: Option<String>,
    /// A central change that met an arrival at the (offline) branch; the arrival won.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub conflict: Option<Conflict>,
    #[serde(default)]
    pub conflict_at: Option<DateTime<Utc>>,
    /// created, rescheduled, cancelled, arrived, called, completed or no_show
    /// (`AppointmentState::of`).
    #[schema(value_type = String)]
    pub state: AppointmentState,
}

/// How one `APPOINTMENT_STATUS` event changes a central appointment (`attendance_update`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttendanceUpdate {
    pub attendance: Attendance,
    /// The conflict to record now, if the event reveals one.
    pub conflict: Option<Conflict>,
}

/// The rule central applies to an attendance event from the branch, given the appointment's
/// central `status`, `revision` and whether it was rescheduled:
/// - the branch's attendance is recorded whatever central did meanwhile (the arrival wins);
/// - an appointment cancelled centrally gets `cancelled_after_arrival`;
/// - an event recorded against an older revision of an appointment central has rescheduled gets
///   `rescheduled_after_arrival`;
/// - a no-show by the branch's sweep (no visit) that central has since cancelled or moved is
///   stale (the sweep judged a time that no longer holds) and changes nothing (`None`).
pub fn attendance_update(
    status: AppointmentStatus,
    revision: u64,
    rescheduled: bool,
    event: &meridian_shared::events::AppointmentStatusChanged,
) -> Option<AttendanceUpdate> {
    let stale = event.revision < revision;
    let cancelled = status == AppointmentStatus::Cancelled;
    let arrived = event.visit_id.is_some() || event.status != Attendance::NoShow;
    if !arrived && (cancelled || stale) {
        return None;
    }
    let conflict = if cancelled {
        Some(Conflict::CancelledAfterArrival)
    } else if stale && rescheduled {
        Some(Conflict::RescheduledAfterArrival)
    } else {
        None
    };
    Some(AttendanceUpdate { attendance: event.status, conflict })
}

/// Event kinds that change central appointments in the ingest transaction
/// (`apply_appointment_events`).
pub const APPOINTMENT_EVENT_KINDS: &[&str] = &[
    meridian_shared::events::APPOINTMENT_STATUS,
    meridian_shared::events::BRANCH_CLOSED,
    meridian_shared::events::BRANCH_REOPENED,
];

/// A closure a branch decided on its own (`BRANCH_CLOSED`), as central keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteClosure {
    pub site: SiteCode,
    #[serde(flatten)]
    pub closure: meridian_shared::closures::Closure,
    pub closed_at: DateTime<Utc>,
    pub reopened_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct ClosureRow {
    id: String,
    site: String,
    day: String,
    from_time: String,
    to_time: String,
    reason: String,
    closed_at: DateTime<Utc>,
    reopened_at: Option<DateTime<Utc>>,
}

impl TryFrom<ClosureRow> for SiteClosure {
    type Error = Error;
    fn try_from(r: ClosureRow) -> Result<Self> {
        use meridian_shared::closures::hh_mm;
        let corrupt = |what: &str, value: &str| {
            Error::Internal(format!(
                "corrupt value in site_closures.{what}: {:?}",
                value.chars().take(40).collect::<String>()
            ))
        };
        Ok(SiteClosure {
            site: SiteCode::parse(&r.site).map_err(|_| corrupt("site", &r.site))?,
            closure: meridian_shared::closures::Closure {
                id: r.id.parse().map_err(|_| corrupt("id", &r.id))?,
                day: r.day.parse().map_err(|_| corrupt("day", &r.day))?,
                from: hh_mm::parse(&r.from_time).map_err(|_| corrupt("from_time", &r.from_time))?,
                to: hh_mm::parse(&r.to_time).map_err(|_| corrupt("to_time", &r.to_time))?,
                reason: r.reason,
            },
            closed_at: r.closed_at,
            reopened_at: r.reopened_at,
        })
    }
}

/// The closure columns, for `concat!`-built queries.
macro_rules! closure_select {
    () => {
        "SELECT id, site, day, from_time, to_time, reason, closed_at, reopened_at FROM site_closures"
    };
}
pub(crate) use closure_select;

/// The open closure of `closures` that `placement` (site wall clock) overlaps, if any.
pub fn closed_by<'a>(
    closures: &'a [SiteClosure],
    placement: &Placement,
) -> Option<&'a SiteClosure> {
    closures.iter().filter(|c| c.reopened_at.is_none()).find(|c| {
        c.closure.overlaps(
            placement.local_start.date(),
            placement.local_start.time(),
            placement.duration_minutes,
        )
    })
}

/// Whether a batch holds an event for `apply_appointment_events` (the hot path skips it).
pub fn has_appointment_events<'a>(
    events: impl IntoIterator<Item = &'a crate::store::IncomingEvent>,
) -> bool {
    events
        .into_iter()
        .any(|e| e.quarantine.is_none() && APPOINTMENT_EVENT_KINDS.contains(&e.kind.as_str()))
}

/// What the store needs to send a change live to the site's agents: the site's current
/// business day (by the injected clock, in the site's time zone) and the queue of the
/// appointment's service (`None` if the service is no longer configured).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSync {
    pub today: NaiveDate,
    pub queue: Option<Code>,
}

impl LiveSync {
    /// Whether a change that leaves `before` (a reschedule's old day) and lands on `after`
    /// goes to the agents now.
    pub fn concerns(&self, before: Option<NaiveDate>, after: NaiveDate) -> bool {
        after == self.today || before == Some(self.today)
    }

    /// The command carrying `a`'s current state.
    pub fn command(&self, a: &Appointment) -> ControllerCommand {
        ControllerCommand::UpsertAppointment(Box::new(AppointmentSnapshot {
            id: a.id,
            site: a.site.clone(),
            service: a.service.clone(),
            queue: self.queue.clone(),
            start: a.start.clone(),
            starts_at: a.starts_at,
            local_day: a.local_day,
            duration_minutes: a.duration_minutes,
            customer_name: a.customer_name.clone(),
            customer_contact: a.customer_contact.clone(),
            notes: a.notes.clone(),
            external_ref: a.external_ref.clone(),
            status: a.status,
            revision: a.revision,
            updated_at: a.updated_at,
        }))
    }
}

/// A validated slot an appointment is placed in, with the capacity it was checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub starts_at: DateTime<Utc>,
    /// The start in the site's time zone.
    pub local_start: NaiveDateTime,
    pub duration_minutes: u32,
    /// Appointments the slot takes (the service's policy).
    pub capacity: u32,
}

impl Placement {
    pub fn ends_at(&self) -> DateTime<Utc> {
        self.starts_at + chrono::Duration::minutes(i64::from(self.duration_minutes))
    }
}

/// A booking, validated by `crate::appointments`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAppointment {
    pub id: AppointmentId,
    pub site: SiteCode,
    pub service: Code,
    pub placement: Placement,
    pub customer_name: String,
    pub customer_contact: Option<String>,
    pub notes: Option<String>,
    pub external_ref: Option<String>,
    pub at: DateTime<Utc>,
}

/// Which appointments to list; days are site-local, inclusive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppointmentFilter {
    pub site: Option<SiteCode>,
    pub from_day: Option<NaiveDate>,
    pub to_day: Option<NaiveDate>,
    pub status: Option<AppointmentStatus>,
    /// Only those with (`true`) or without (`false`) a conflict.
    pub conflict: Option<bool>,
    pub limit: u32,
}

/// Seats held by appointments of one service that start at `starts_at` and last
/// `duration_minutes` (a slot, unless the policy changed since they were booked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldSeats {
    pub starts_at: DateTime<Utc>,
    pub duration_minutes: u32,
    pub count: u32,
}

/// The seats of `held` whose time overlaps `[start, end)`: what a slot has left is its
/// capacity minus this (appointments booked under an older slot length count where they
/// overlap).
pub fn seats_taken(held: &[HeldSeats], start: DateTime<Utc>, end: DateTime<Utc>) -> u32 {
    held.iter()
        .filter(|h| {
            let h_end = h.starts_at + chrono::Duration::minutes(i64::from(h.duration_minutes));
            h.starts_at < end && start < h_end
        })
        .map(|h| h.count)
        .sum()
}

#[async_trait]
pub trait AppointmentStore: Send + Sync {
    /// Books `new` if its slot still has a seat (`AppointmentRefusal::SlotFull`) and its
    /// external reference is free (`ExternalRefTaken`), in one transaction serialised per site.
    /// With `live`, a booking for today is sent to the site's agents in the same transaction.
    async fn book_appointment(
        &self,
        new: &NewAppointment,
        live: Option<&LiveSync>,
    ) -> Result<Appointment>;
    /// Moves an appointment to `placement` if it is at `expected_revision` (`StaleRevision`),
    /// not cancelled (`AlreadyCancelled`) and the new slot has a seat besides its own
    /// (`SlotFull`). `Error::NotFound` for an unknown id. With `live`, a move from or to
    /// today is sent to the site's agents in the same transaction.
    async fn reschedule_appointment(
        &self,
        id: AppointmentId,
        expected_revision: u64,
        placement: &Placement,
        at: DateTime<Utc>,
        live: Option<&LiveSync>,
    ) -> Result<Appointment>;
    /// Cancels an appointment (at `expected_revision` when given), keeping `reason`. With
    /// `live`, cancelling one of today's appointments is sent to the site's agents in the same
    /// transaction.
    async fn cancel_appointment(
        &self,
        id: AppointmentId,
        expected_revision: Option<u64>,
        reason: Option<&str>,
        at: DateTime<Utc>,
        live: Option<&LiveSync>,
    ) -> Result<Appointment>;
    async fn appointment(&self, id: AppointmentId) -> Result<Option<Appointment>>;
    /// By start, then id; at most `filter.limit`.
    async fn list_appointments(&self, filter: &AppointmentFilter) -> Result<Vec<Appointment>>;
    /// The closures branches reported (open and withdrawn) of `site` (or every site) from
    /// `from` to `to` (site-local days, inclusive), by day and time.
    async fn site_closures(
        &self,
        site: Option<&SiteCode>,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<SiteClosure>>;
    /// The seats held (every status but cancelled) in `service` at `site` on local `day`,
    /// grouped by start and length.
    async fn held_seats(
        &self,
        site: &SiteCode,
        service: &Code,
        day: NaiveDate,
    ) -> Result<Vec<HeldSeats>>;
}

/// The appointment columns, for `concat!`-built queries.
macro_rules! appointment_select {
    () => {
        "SELECT id, site, service, starts_at, local_start, local_day, duration_minutes, \
         customer_name, customer_contact, notes, external_ref, status, cancel_reason, revision, \
         created_at, updated_at, rescheduled, attendance, attendance_at, arrived_at, visit_id, \
         ticket, conflict, conflict_at FROM appointments"
    };
}
pub(crate) use appointment_select;

/// The held-seats query: `$1` site, `$2` service, `$3` day, `$4` an id to leave out.
pub(crate) const HELD_SEATS: &str = "SELECT starts_at, duration_minutes, COUNT(*) AS n \
     FROM appointments WHERE site = $1 AND service = $2 AND local_day = $3 \
     AND status <> 'cancelled' AND id <> $4 GROUP BY starts_at, duration_minutes";

#[derive(sqlx::FromRow)]
pub(crate) struct AppointmentRow {
    id: String,
    site: String,
    service: String,
    starts_at: DateTime<Utc>,
    local_start: String,
    local_day: String,
    duration_minutes: i32,
    customer_name: String,
    customer_contact: Option<String>,
    notes: Option<String>,
    external_ref: Option<String>,
    status: String,
    cancel_reason: Option<String>,
    revision: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    rescheduled: bool,
    attendance: Option<String>,
    attendance_at: Option<DateTime<Utc>>,
    arrived_at: Option<DateTime<Utc>>,
    visit_id: Option<String>,
    ticket: Option<String>,
    conflict: Option<String>,
    conflict_at: Option<DateTime<Utc>>,
}

impl TryFrom<AppointmentRow> for Appointment {
    type Error = Error;
    fn try_from(r: AppointmentRow) -> Result<Self> {
        let corrupt = |what: &str, value: &str| {
            Error::Internal(format!(
                "corrupt value in appointments.{what}: {:?}",
                value.chars().take(40).collect::<String>()
            ))
        };
        NaiveDateTime::parse_from_str(&r.local_start, LOCAL_START_FORMAT)
            .map_err(|_| corrupt("local_start", &r.local_start))?;
        let id: AppointmentId = r.id.parse().map_err(|_| corrupt("id", &r.id))?;
        let status =
            AppointmentStatus::parse(&r.status).ok_or_else(|| corrupt("status", &r.status))?;
        let attendance = r
            .attendance
            .as_deref()
            .map(|a| Attendance::parse(a).ok_or_else(|| corrupt("attendance", a)))
            .transpose()?;
        Ok(Appointment {
            id,
            reference: id.reference(),
            state: AppointmentState::of(status, r.rescheduled, attendance),
            rescheduled: r.rescheduled,
            attendance,
            attendance_at: r.attendance_at,
            arrived_at: r.arrived_at,
            visit_id: r.visit_id,
            ticket: r.ticket,
            conflict: r
                .conflict
                .as_deref()
                .map(|c| Conflict::parse(c).ok_or_else(|| corrupt("conflict", c)))
                .transpose()?,
            conflict_at: r.conflict_at,
            site: SiteCode::parse(&r.site).map_err(|_| corrupt("site", &r.site))?,
            service: Code::parse(&r.service).map_err(|_| corrupt("service", &r.service))?,
            local_day: r.local_day.parse().map_err(|_| corrupt("local_day", &r.local_day))?,
            start: r.local_start,
            starts_at: r.starts_at,
            duration_minutes: u32::try_from(r.duration_minutes)
                .map_err(|_| corrupt("duration_minutes", &r.duration_minutes.to_string()))?,
            customer_name: r.customer_name,
            customer_contact: r.customer_contact,
            notes: r.notes,
            external_ref: r.external_ref,
            status,
            cancel_reason: r.cancel_reason,
            revision: r.revision as u64,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct HeldRow {
    starts_at: DateTime<Utc>,
    duration_minutes: i32,
    n: i64,
}

impl From<HeldRow> for HeldSeats {
    fn from(r: HeldRow) -> Self {
        HeldSeats {
            starts_at: r.starts_at,
            duration_minutes: r.duration_minutes.max(0) as u32,
            count: r.n.clamp(0, i64::from(u32::MAX)) as u32,
        }
    }
}

/// Expands to `#[async_trait] impl AppointmentStore for $ty`.
macro_rules! impl_appointment_store {
    ($ty:ty) => {
        impl $ty {
            /// Seats held on the placement's day, less `exclude`'s, inside `tx`.
            async fn held_seats_in(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                site: &str,
                service: &str,
                day: &str,
                exclude: &str,
            ) -> $crate::error::Result<Vec<$crate::store::appointments::HeldSeats>> {
                let rows: Vec<$crate::store::appointments::HeldRow> =
                    sqlx::query_as($crate::store::appointments::HELD_SEATS)
                        .bind(site)
                        .bind(service)
                        .bind(day)
                        .bind(exclude)
                        .fetch_all(&mut **tx)
                        .await?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            /// Refuses when the branch closed the time of `placement` (`BRANCH_CLOSED`).
            async fn check_closures(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                site: &str,
                placement: &$crate::store::appointments::Placement,
            ) -> $crate::error::Result<()> {
                let rows: Vec<$crate::store::appointments::ClosureRow> = sqlx::query_as(concat!(
                    $crate::store::appointments::closure_select!(),
                    " WHERE site = $1 AND day = $2 AND reopened_at IS NULL"
                ))
                .bind(site)
                .bind(placement.local_start.date().to_string())
                .fetch_all(&mut **tx)
                .await?;
                let closures = rows
                    .into_iter()
                    .map(TryInto::try_into)
                    .collect::<$crate::error::Result<Vec<$crate::store::appointments::SiteClosure>>>()?;
                if let Some(c) = $crate::store::appointments::closed_by(&closures, placement) {
                    return Err($crate::error::AppointmentRefusal::SlotClosed {
                        from: c.closure.from.format("%H:%M").to_string(),
                        to: c.closure.to.format("%H:%M").to_string(),
                        reason: c.closure.reason.clone(),
                    }
                    .into());
                }
                Ok(())
            }

            /// Refuses when `placement` has no seat left besides `exclude`'s.
            async fn check_capacity(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                site: &str,
                service: &str,
                placement: &$crate::store::appointments::Placement,
                exclude: &str,
            ) -> $crate::error::Result<()> {
                let day = placement.local_start.date().to_string();
                let held = Self::held_seats_in(tx, site, service, &day, exclude).await?;
                let taken = $crate::store::appointments::seats_taken(
                    &held,
                    placement.starts_at,
                    placement.ends_at(),
                );
                if taken >= placement.capacity {
                    return Err($crate::error::AppointmentRefusal::SlotFull {
                        capacity: placement.capacity,
                    }
                    .into());
                }
                Ok(())
            }

            /// Locks the site of appointment `id` for booking changes and reads the
            /// appointment; `NotFound` when there is none.
            async fn lock_appointment(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                id: &str,
            ) -> $crate::error::Result<$crate::store::appointments::Appointment> {
                use $crate::store::sql_common::Backend;
                // The site of an appointment never changes, so it may be read before the lock.
                let site: Option<String> =
                    sqlx::query_scalar("SELECT site FROM appointments WHERE id = $1")
                        .bind(id)
                        .fetch_optional(&mut **tx)
                        .await?;
                let Some(site) = site else {
                    return Err($crate::error::Error::NotFound(format!("appointment {id}")));
                };
                sqlx::query(<$ty as Backend>::BOOKING_LOCK).bind(&site).execute(&mut **tx).await?;
                Self::reread_appointment(tx, id).await
            }

            /// Appends `a`'s new state to the command log of every active agent of its site
            /// when the change concerns today (`before`: the day a reschedule leaves).
            async fn send_live(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                live: Option<&$crate::store::appointments::LiveSync>,
                before: Option<chrono::NaiveDate>,
                a: &$crate::store::appointments::Appointment,
            ) -> $crate::error::Result<()> {
                let Some(live) = live.filter(|l| l.concerns(before, a.local_day)) else {
                    return Ok(());
                };
                let command = live.command(a);
                let payload = command.payload();
                let agents: Vec<(String,)> = sqlx::query_as(
                    "SELECT id FROM agents WHERE site = $1 AND revoked_at IS NULL ORDER BY id",
                )
                .bind(a.site.as_str())
                .fetch_all(&mut **tx)
                .await?;
                for (agent_id,) in agents {
                    Self::enqueue_command(tx, &agent_id, command.kind(), &payload, a.updated_at)
                        .await?;
                }
                Ok(())
            }

            /// Applies the batch's appointment events (`APPOINTMENT_EVENT_KINDS`) from an agent
            /// of `site` to the central appointments, inside the ingest transaction `tx` (so
            /// exactly once, with the events). A small dispatcher by kind.
            pub(crate) async fn apply_appointment_events(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                site: &str,
                events: &[&$crate::store::IncomingEvent],
            ) -> $crate::error::Result<()> {
                use meridian_shared::events::AgentEvent;
                for e in events.iter().filter(|e| e.quarantine.is_none()) {
                    if !$crate::store::appointments::APPOINTMENT_EVENT_KINDS.contains(&e.kind.as_str()) {
                        continue;
                    }
                    match AgentEvent::decode(&e.kind, e.payload.as_bytes()) {
                        Ok(Some(AgentEvent::AppointmentStatus(ev))) => {
                            Self::apply_attendance(tx, site, &ev).await?
                        }
                        Ok(Some(AgentEvent::BranchClosed(ev))) => {
                            Self::apply_closure(tx, site, &ev).await?
                        }
                        Ok(Some(AgentEvent::BranchReopened(ev))) => {
                            sqlx::query(
                                "UPDATE site_closures SET reopened_at = $3 \
                                 WHERE id = $1 AND site = $2 AND reopened_at IS NULL",
                            )
                            .bind(ev.closure_id.to_string())
                            .bind(site)
                            .bind(ev.at)
                            .execute(&mut **tx)
                            .await?;
                        }
                        // The edge validated it; a payload that does not decode here is kept
                        // as an event and changes nothing.
                        other => tracing::warn!(kind = %e.kind, seq = e.seq, decoded = ?other.err(), "appointment event not applied"),
                    }
                }
                Ok(())
            }

            /// One `BRANCH_CLOSED`: keep the closure and flag every appointment of the site in
            /// it that is still expected (booked, no attendance, no other conflict)
            /// `slot_closed_at_branch` — central booked it before it knew of the closure.
            async fn apply_closure(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                site: &str,
                ev: &meridian_shared::closures::BranchClosed,
            ) -> $crate::error::Result<()> {
                let c = &ev.closure;
                let inserted = sqlx::query(
                    "INSERT INTO site_closures (id, site, day, from_time, to_time, reason, closed_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                )
                .bind(c.id.to_string())
                .bind(site)
                .bind(c.day.to_string())
                .bind(c.from.format("%H:%M").to_string())
                .bind(c.to.format("%H:%M").to_string())
                .bind(&c.reason)
                .bind(ev.at)
                .execute(&mut **tx)
                .await?
                .rows_affected();
                if inserted == 0 {
                    return Ok(());
                }
                let expected: Vec<(String, String, i32)> = sqlx::query_as(
                    "SELECT id, local_start, duration_minutes FROM appointments \
                     WHERE site = $1 AND local_day = $2 AND status <> 'cancelled' \
                     AND attendance IS NULL AND conflict IS NULL",
                )
                .bind(site)
                .bind(c.day.to_string())
                .fetch_all(&mut **tx)
                .await?;
                for (id, local_start, minutes) in expected {
                    let start = chrono::NaiveDateTime::parse_from_str(
                        &local_start,
                        $crate::store::appointments::LOCAL_START_FORMAT,
                    );
                    let Ok(start) = start else { continue };
                    if !c.overlaps(start.date(), start.time(), minutes.max(0) as u32) {
                        continue;
                    }
                    tracing::warn!(appointment = %id, site, start = %local_start, "booked into a time the branch closed; flagged for admins");
                    sqlx::query(
                        "UPDATE appointments SET conflict = $2, conflict_at = $3 WHERE id = $1",
                    )
                    .bind(&id)
                    .bind(meridian_shared::check_in::Conflict::SlotClosedAtBranch.as_str())
                    .bind(ev.at)
                    .execute(&mut **tx)
                    .await?;
                }
                Ok(())
            }

            /// One `APPOINTMENT_STATUS`: the branch's attendance, and any conflict it reveals
            /// (`attendance_update`). An appointment of another site or unknown here is left
            /// alone.
            async fn apply_attendance(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                site: &str,
                ev: &meridian_shared::events::AppointmentStatusChanged,
            ) -> $crate::error::Result<()> {
                let id = ev.appointment_id.to_string();
                let row: Option<(String, i64, bool, Option<String>)> = sqlx::query_as(
                    "SELECT status, revision, rescheduled, conflict FROM appointments \
                     WHERE id = $1 AND site = $2",
                )
                .bind(&id)
                .bind(site)
                .fetch_optional(&mut **tx)
                .await?;
                let Some((status, revision, rescheduled, conflict)) = row else {
                    tracing::warn!(appointment = %id, site, "attendance for an appointment this site does not have; ignored");
                    return Ok(());
                };
                let status = $crate::store::appointments::AppointmentStatus::parse(&status)
                    .unwrap_or($crate::store::appointments::AppointmentStatus::Booked);
                let Some(update) = $crate::store::appointments::attendance_update(
                    status,
                    revision.max(0) as u64,
                    rescheduled,
                    ev,
                ) else {
                    return Ok(());
                };
                let new_conflict = update
                    .conflict
                    .map(|c| c.as_str())
                    .filter(|c| conflict.as_deref() != Some(*c));
                if let Some(c) = new_conflict {
                    tracing::warn!(appointment = %id, site, conflict = c, "central changed an appointment the branch had checked in; the arrival stands");
                }
                let arrived_at = (ev.status == meridian_shared::check_in::Attendance::Arrived).then_some(ev.at);
                sqlx::query(
                    "UPDATE appointments SET attendance = $2, attendance_at = $3, \
                     arrived_at = COALESCE(arrived_at, $4), visit_id = COALESCE($5, visit_id), \
                     ticket = COALESCE($6, ticket), conflict = COALESCE($7, conflict), \
                     conflict_at = CASE WHEN $7 IS NULL THEN conflict_at ELSE $3 END \
                     WHERE id = $1",
                )
                .bind(&id)
                .bind(update.attendance.as_str())
                .bind(ev.at)
                .bind(arrived_at)
                .bind(ev.visit_id.map(|v| v.to_string()))
                .bind(ev.ticket.as_deref())
                .bind(new_conflict)
                .execute(&mut **tx)
                .await?;
                Ok(())
            }

            async fn reread_appointment(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                id: &str,
            ) -> $crate::error::Result<$crate::store::appointments::Appointment> {
                let row: $crate::store::appointments::AppointmentRow = sqlx::query_as(concat!(
                    $crate::store::appointments::appointment_select!(),
                    " WHERE id = $1"
                ))
                .bind(id)
                .fetch_one(&mut **tx)
                .await?;
                row.try_into()
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::appointments::AppointmentStore for $ty {
            async fn book_appointment(
                &self,
                new: &$crate::store::appointments::NewAppointment,
                live: Option<&$crate::store::appointments::LiveSync>,
            ) -> $crate::error::Result<$crate::store::appointments::Appointment> {
                use $crate::store::sql_common::Backend;
                use $crate::store::appointments::LOCAL_START_FORMAT;
                let id = new.id.to_string();
                let mut tx = self.tx().await?;
                sqlx::query(<$ty as Backend>::BOOKING_LOCK)
                    .bind(new.site.as_str())
                    .execute(&mut *tx)
                    .await?;
                if let Some(reference) = &new.external_ref {
                    let taken: Option<String> = sqlx::query_scalar(
                        "SELECT id FROM appointments WHERE site = $1 AND external_ref = $2",
                    )
                    .bind(new.site.as_str())
                    .bind(reference)
                    .fetch_optional(&mut *tx)
                    .await?;
                    if taken.is_some() {
                        return Err($crate::error::AppointmentRefusal::ExternalRefTaken(
                            reference.clone(),
                        )
                        .into());
                    }
                }
                Self::check_closures(&mut tx, new.site.as_str(), &new.placement).await?;
                Self::check_capacity(&mut tx, new.site.as_str(), new.service.as_str(), &new.placement, "")
                    .await?;
                let p = &new.placement;
                sqlx::query(
                    "INSERT INTO appointments (id, site, service, starts_at, local_start, local_day, \
                     duration_minutes, customer_name, customer_contact, notes, external_ref, status, \
                     cancel_reason, revision, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'booked', NULL, 1, $12, $12)",
                )
                .bind(&id)
                .bind(new.site.as_str())
                .bind(new.service.as_str())
                .bind(p.starts_at)
                .bind(p.local_start.format(LOCAL_START_FORMAT).to_string())
                .bind(p.local_start.date().to_string())
                .bind(p.duration_minutes as i32)
                .bind(&new.customer_name)
                .bind(new.customer_contact.as_deref())
                .bind(new.notes.as_deref())
                .bind(new.external_ref.as_deref())
                .bind(new.at)
                .execute(&mut *tx)
                .await?;
                let booked = Self::reread_appointment(&mut tx, &id).await?;
                Self::send_live(&mut tx, live, None, &booked).await?;
                tx.commit().await?;
                Ok(booked)
            }

            async fn reschedule_appointment(
                &self,
                id: meridian_shared::AppointmentId,
                expected_revision: u64,
                placement: &$crate::store::appointments::Placement,
                at: chrono::DateTime<chrono::Utc>,
                live: Option<&$crate::store::appointments::LiveSync>,
            ) -> $crate::error::Result<$crate::store::appointments::Appointment> {
                use $crate::error::AppointmentRefusal;
                use $crate::store::appointments::{AppointmentStatus, LOCAL_START_FORMAT};
                let id = id.to_string();
                let mut tx = self.tx().await?;
                let current = Self::lock_appointment(&mut tx, &id).await?;
                if let Some(attendance) = current.attendance {
                    return Err(AppointmentRefusal::AlreadyAttended(attendance).into());
                }
                if current.status == AppointmentStatus::Cancelled {
                    return Err(AppointmentRefusal::AlreadyCancelled.into());
                }
                if current.revision != expected_revision {
                    return Err(AppointmentRefusal::StaleRevision {
                        expected: expected_revision,
                        current: current.revision,
                    }
                    .into());
                }
                Self::check_closures(&mut tx, current.site.as_str(), placement).await?;
                Self::check_capacity(
                    &mut tx,
                    current.site.as_str(),
                    current.service.as_str(),
                    placement,
                    &id,
                )
                .await?;
                sqlx::query(
                    "UPDATE appointments SET starts_at = $2, local_start = $3, local_day = $4, \
                     duration_minutes = $5, revision = revision + 1, updated_at = $6, \
                     rescheduled = TRUE WHERE id = $1",
                )
                .bind(&id)
                .bind(placement.starts_at)
                .bind(placement.local_start.format(LOCAL_START_FORMAT).to_string())
                .bind(placement.local_start.date().to_string())
                .bind(placement.duration_minutes as i32)
                .bind(at)
                .execute(&mut *tx)
                .await?;
                let moved = Self::reread_appointment(&mut tx, &id).await?;
                Self::send_live(&mut tx, live, Some(current.local_day), &moved).await?;
                tx.commit().await?;
                Ok(moved)
            }

            async fn cancel_appointment(
                &self,
                id: meridian_shared::AppointmentId,
                expected_revision: Option<u64>,
                reason: Option<&str>,
                at: chrono::DateTime<chrono::Utc>,
                live: Option<&$crate::store::appointments::LiveSync>,
            ) -> $crate::error::Result<$crate::store::appointments::Appointment> {
                use $crate::error::AppointmentRefusal;
                use $crate::store::appointments::AppointmentStatus;
                let id = id.to_string();
                let mut tx = self.tx().await?;
                let current = Self::lock_appointment(&mut tx, &id).await?;
                if let Some(attendance) = current.attendance {
                    return Err(AppointmentRefusal::AlreadyAttended(attendance).into());
                }
                if current.status == AppointmentStatus::Cancelled {
                    return Err(AppointmentRefusal::AlreadyCancelled.into());
                }
                if let Some(expected) = expected_revision
                    && current.revision != expected
                {
                    return Err(AppointmentRefusal::StaleRevision {
                        expected,
                        current: current.revision,
                    }
                    .into());
                }
                sqlx::query(
                    "UPDATE appointments SET status = 'cancelled', cancel_reason = $2, \
                     revision = revision + 1, updated_at = $3 WHERE id = $1",
                )
                .bind(&id)
                .bind(reason)
                .bind(at)
                .execute(&mut *tx)
                .await?;
                let cancelled = Self::reread_appointment(&mut tx, &id).await?;
                Self::send_live(&mut tx, live, None, &cancelled).await?;
                tx.commit().await?;
                Ok(cancelled)
            }

            async fn appointment(
                &self,
                id: meridian_shared::AppointmentId,
            ) -> $crate::error::Result<Option<$crate::store::appointments::Appointment>> {
                let row: Option<$crate::store::appointments::AppointmentRow> =
                    sqlx::query_as(concat!(
                        $crate::store::appointments::appointment_select!(),
                        " WHERE id = $1"
                    ))
                    .bind(id.to_string())
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(TryInto::try_into).transpose()
            }

            async fn list_appointments(
                &self,
                f: &$crate::store::appointments::AppointmentFilter,
            ) -> $crate::error::Result<Vec<$crate::store::appointments::Appointment>> {
                let rows: Vec<$crate::store::appointments::AppointmentRow> =
                    sqlx::query_as(concat!(
                        $crate::store::appointments::appointment_select!(),
                        " WHERE ($1 IS NULL OR site = $1) AND ($2 IS NULL OR local_day >= $2) \
                         AND ($3 IS NULL OR local_day <= $3) AND ($4 IS NULL OR status = $4) \
                         AND ($6 IS NULL OR (conflict IS NOT NULL) = $6) \
                         ORDER BY starts_at, id LIMIT $5"
                    ))
                    .bind(f.site.as_ref().map(|s| s.as_str().to_owned()))
                    .bind(f.from_day.map(|d| d.to_string()))
                    .bind(f.to_day.map(|d| d.to_string()))
                    .bind(f.status.map(|s| s.as_str()))
                    .bind(i64::from(f.limit))
                    .bind(f.conflict)
                    .fetch_all(&self.pool)
                    .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            async fn site_closures(
                &self,
                site: Option<&meridian_shared::SiteCode>,
                from: chrono::NaiveDate,
                to: chrono::NaiveDate,
            ) -> $crate::error::Result<Vec<$crate::store::appointments::SiteClosure>> {
                let rows: Vec<$crate::store::appointments::ClosureRow> = sqlx::query_as(concat!(
                    $crate::store::appointments::closure_select!(),
                    " WHERE ($1 IS NULL OR site = $1) AND day >= $2 AND day <= $3 \
                     ORDER BY site, day, from_time, id"
                ))
                .bind(site.map(|s| s.as_str().to_owned()))
                .bind(from.to_string())
                .bind(to.to_string())
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            async fn held_seats(
                &self,
                site: &meridian_shared::SiteCode,
                service: &meridian_shared::Code,
                day: chrono::NaiveDate,
            ) -> $crate::error::Result<Vec<$crate::store::appointments::HeldSeats>> {
                let rows: Vec<$crate::store::appointments::HeldRow> =
                    sqlx::query_as($crate::store::appointments::HELD_SEATS)
                        .bind(site.as_str())
                        .bind(service.as_str())
                        .bind(day.to_string())
                        .bind("")
                        .fetch_all(&self.pool)
                        .await?;
                Ok(rows.into_iter().map(Into::into).collect())
            }
        }
    };
}

pub(crate) use impl_appointment_store;

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn the_branchs_attendance_wins_and_reveals_conflicts() {
        use AppointmentStatus::{Booked, Cancelled};
        use meridian_shared::events::AppointmentStatusChanged;
        use meridian_shared::{AppointmentId, VisitId};
        let check = |(status, revision, rescheduled): (AppointmentStatus, u64, bool),
                     (attendance, visit, event_revision): (Attendance, bool, u64),
                     expected: Option<Option<Conflict>>| {
            let event = AppointmentStatusChanged {
                appointment_id: AppointmentId::new(),
                status: attendance,
                visit_id: visit.then(VisitId::new),
                ticket: None,
                revision: event_revision,
                at: Utc::now(),
            };
            let update = attendance_update(status, revision, rescheduled, &event);
            assert_eq!(
                update.as_ref().map(|u| u.conflict),
                expected,
                "{status:?} r{revision} {rescheduled} / {attendance:?} {visit} r{event_revision}"
            );
            if let Some(u) = update {
                assert_eq!(u.attendance, attendance);
            }
        };
        use Attendance::{Arrived, Completed, NoShow};
        check((Booked, 1, false), (Arrived, true, 1), Some(None));
        check((Booked, 2, true), (Arrived, true, 2), Some(None));
        check((Booked, 1, false), (NoShow, false, 1), Some(None));
        // Central changed it before it heard of the check-in: the arrival wins, flagged.
        check(
            (Cancelled, 2, false),
            (Arrived, true, 1),
            Some(Some(Conflict::CancelledAfterArrival)),
        );
        check(
            (Cancelled, 3, true),
            (Completed, true, 2),
            Some(Some(Conflict::CancelledAfterArrival)),
        );
        check((Booked, 2, true), (Arrived, true, 1), Some(Some(Conflict::RescheduledAfterArrival)));
        // A no-show at a called visit is after an arrival too.
        check(
            (Cancelled, 2, false),
            (NoShow, true, 1),
            Some(Some(Conflict::CancelledAfterArrival)),
        );
        // The sweep's no-show of a time central has since moved or cancelled is stale.
        check((Booked, 2, true), (NoShow, false, 1), None);
        check((Cancelled, 2, false), (NoShow, false, 1), None);
    }

    #[test]
    fn seats_overlap_by_time() {
        let at = |h: u32, m: u32| Utc.with_ymd_and_hms(2026, 3, 9, h, m, 0).unwrap();
        let held = [
            HeldSeats { starts_at: at(9, 0), duration_minutes: 15, count: 2 },
            // Booked when slots were 30 minutes long.
            HeldSeats { starts_at: at(9, 30), duration_minutes: 30, count: 1 },
        ];
        let check = |start: DateTime<Utc>, minutes: i64, expected: u32| {
            let end = start + chrono::Duration::minutes(minutes);
            assert_eq!(seats_taken(&held, start, end), expected, "{start} +{minutes}");
        };
        check(at(9, 0), 15, 2);
        check(at(9, 15), 15, 0);
        check(at(9, 30), 15, 1);
        check(at(9, 45), 15, 1);
        check(at(10, 0), 15, 0);
        check(at(8, 45), 15, 0);
        check(at(9, 0), 60, 3);
    }
}
