//! Visits and counters at the branch: every operation loads what it needs, runs the pure
//! lifecycle (`meridian_shared::visits`), writes the new state and appends its event to the
//! outbox — inside the caller's store job, so state and event commit together. Concurrency
//! between counters is safe because store jobs run one at a time, and the schema keeps at most
//! one current visit per counter as a last line of defence.

use chrono::{DateTime, NaiveDate, Utc};
use meridian_shared::business_day::{format_ticket, next_ticket_number};
use meridian_shared::config::SiteConfig;
use meridian_shared::customer::Customer;
use meridian_shared::events::{
    AgentEvent, ServicePointChanged, ServicePointEventKind, VisitChanged, VisitCreated,
    VisitEventKind,
};
use meridian_shared::visits::{
    self, Candidate, Location, Op, Outcome, Position, VisitState, VisitStatus,
};
use meridian_shared::{Code, VisitId};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::store::queries::{OutboxEvent, append_event};

/// A visit as the branch API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Visit {
    pub id: String,
    pub ticket: String,
    pub service: String,
    pub queue: String,
    pub business_day: NaiveDate,
    pub status: VisitStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// Where it waits, while waiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counter: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staff: Option<String>,
    pub recalls: u32,
    pub created_at: DateTime<Utc>,
    pub waiting_since: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub called_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serving_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    /// Personal data: shown at the branch, sent to central only if the site shares it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer: Option<Customer>,
    #[serde(skip)]
    sort_key: i64,
}

const COLUMNS: &str = "id, ticket, service, queue, business_day, status, created_at, outcome, \
    location_kind, location_code, sort_key, waiting_since_ms, counter, staff, recalls, \
    called_at_ms, serving_at_ms, ended_at_ms, customer_name, customer_phone, customer_email, \
    customer_note";

fn ms(t: Option<i64>) -> Option<DateTime<Utc>> {
    t.and_then(DateTime::from_timestamp_millis)
}

fn code(s: &str) -> Result<Code> {
    Code::parse(s).map_err(|e| Error::Internal(format!("stored code: {e}")))
}

fn location(kind: Option<String>, code_: Option<String>) -> Result<Option<Location>> {
    Ok(match (kind.as_deref(), code_) {
        (Some("queue"), Some(c)) => Some(Location::Queue(code(&c)?)),
        (Some("service_point_pool"), Some(c)) => Some(Location::ServicePointPool(code(&c)?)),
        (Some("staff_pool"), Some(c)) => Some(Location::StaffPool(code(&c)?)),
        _ => None,
    })
}

fn location_parts(l: Option<&Location>) -> (Option<&'static str>, Option<String>) {
    match l {
        Some(Location::Queue(c)) => (Some("queue"), Some(c.to_string())),
        Some(Location::ServicePointPool(c)) => (Some("service_point_pool"), Some(c.to_string())),
        Some(Location::StaffPool(c)) => (Some("staff_pool"), Some(c.to_string())),
        None => (None, None),
    }
}

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawVisit> {
    Ok(RawVisit {
        id: r.get(0)?,
        ticket: r.get(1)?,
        service: r.get(2)?,
        queue: r.get(3)?,
        business_day: r.get(4)?,
        status: r.get(5)?,
        created_at: r.get(6)?,
        outcome: r.get(7)?,
        location_kind: r.get(8)?,
        location_code: r.get(9)?,
        sort_key: r.get(10)?,
        waiting_since_ms: r.get(11)?,
        counter: r.get(12)?,
        staff: r.get(13)?,
        recalls: r.get(14)?,
        called_at_ms: r.get(15)?,
        serving_at_ms: r.get(16)?,
        ended_at_ms: r.get(17)?,
        customer: customer_from(r, 18)?,
    })
}

struct RawVisit {
    id: String,
    ticket: String,
    service: String,
    queue: String,
    business_day: String,
    status: String,
    created_at: String,
    outcome: Option<String>,
    location_kind: Option<String>,
    location_code: Option<String>,
    sort_key: i64,
    waiting_since_ms: i64,
    counter: Option<String>,
    staff: Option<String>,
    recalls: i64,
    called_at_ms: Option<i64>,
    serving_at_ms: Option<i64>,
    ended_at_ms: Option<i64>,
    customer: Option<Customer>,
}

/// The four customer columns starting at `first`; `None` when all are empty.
fn customer_from(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Option<Customer>> {
    let customer = Customer {
        name: r.get(first)?,
        phone: r.get(first + 1)?,
        email: r.get(first + 2)?,
        note: r.get(first + 3)?,
    };
    Ok((customer != Customer::default()).then_some(customer))
}

impl TryFrom<RawVisit> for Visit {
    type Error = Error;
    fn try_from(r: RawVisit) -> Result<Visit> {
        let bad =
            |what: &str, v: &str| Error::Internal(format!("stored {what} {v:?} is unreadable"));
        Ok(Visit {
            business_day: r.business_day.parse().map_err(|_| bad("date", &r.business_day))?,
            status: VisitStatus::parse(&r.status).ok_or_else(|| bad("status", &r.status))?,
            created_at: DateTime::parse_from_rfc3339(&r.created_at)
                .map_err(|_| bad("time", &r.created_at))?
                .with_timezone(&Utc),
            outcome: match r.outcome {
                Some(o) => Some(Outcome::parse(&o).ok_or_else(|| bad("outcome", &o))?),
                None => None,
            },
            location: location(r.location_kind, r.location_code)?,
            waiting_since: ms(Some(r.waiting_since_ms)).unwrap_or_default(),
            called_at: ms(r.called_at_ms),
            serving_at: ms(r.serving_at_ms),
            ended_at: ms(r.ended_at_ms),
            id: r.id,
            ticket: r.ticket,
            service: r.service,
            queue: r.queue,
            counter: r.counter,
            staff: r.staff,
            recalls: r.recalls as u32,
            customer: r.customer,
            sort_key: r.sort_key,
        })
    }
}

impl Visit {
    fn state(&self) -> Result<VisitState> {
        Ok(VisitState {
            status: self.status,
            queue: code(&self.queue)?,
            location: self.location.clone(),
            counter: self.counter.as_deref().map(code).transpose()?,
            staff: self.staff.as_deref().map(code).transpose()?,
            outcome: self.outcome,
            recalls: self.recalls,
        })
    }
}

fn query_visits(conn: &Connection, filter: &str, p: impl rusqlite::Params) -> Result<Vec<Visit>> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {COLUMNS} FROM visits {filter}"))?;
    let rows = stmt.query_map(p, read_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(Visit::try_from).collect()
}

pub fn get(conn: &Connection, id: &str) -> Result<Visit> {
    query_visits(conn, "WHERE id = ?1", [id])?
        .pop()
        .ok_or_else(|| Error::NotFound(format!("visit {id}")))
}

/// Visits with `status`, oldest first.
pub fn list(conn: &Connection, status: VisitStatus) -> Result<Vec<Visit>> {
    query_visits(conn, "WHERE status = ?1 ORDER BY sort_key, created_at, id", [status.as_str()])
}

/// The visit with `ticket` on `day` that is not ended (tickets repeat after wrapping).
pub fn open_by_ticket(conn: &Connection, ticket: &str, day: NaiveDate) -> Result<Visit> {
    query_visits(
        conn,
        "WHERE ticket = ?1 AND business_day = ?2 AND status != 'ended' ORDER BY created_at DESC LIMIT 1",
        params![ticket, day.to_string()],
    )?
    .pop()
    .ok_or_else(|| Error::NotFound(format!("open visit with ticket {ticket}")))
}

fn save(conn: &Connection, v: &Visit) -> Result<()> {
    let (kind, loc) = location_parts(v.location.as_ref());
    conn.prepare_cached("UPDATE visits SET status = ?2, outcome = ?3, queue = ?4, location_kind = ?5, location_code = ?6, \
         sort_key = ?7, waiting_since_ms = ?8, counter = ?9, staff = ?10, recalls = ?11, \
         called_at_ms = ?12, serving_at_ms = ?13, ended_at_ms = ?14 WHERE id = ?1")?.execute(params![
            v.id,
            v.status.as_str(),
            v.outcome.map(|o| o.as_str()),
            v.queue,
            kind,
            loc,
            v.sort_key,
            v.waiting_since.timestamp_millis(),
            v.counter,
            v.staff,
            v.recalls,
            v.called_at.map(|t| t.timestamp_millis()),
            v.serving_at.map(|t| t.timestamp_millis()),
            v.ended_at.map(|t| t.timestamp_millis()),
        ],
    )
    .map_err(|e| match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::ConstraintViolation) => {
            Error::Conflict("the counter already has a current visit".into())
        }
        _ => Error::Store(e),
    })?;
    Ok(())
}

fn service_and_queue<'a>(
    config: &'a SiteConfig,
    service: &str,
) -> Result<(&'a meridian_shared::config::Service, &'a meridian_shared::config::Queue)> {
    let svc =
        config.service(service).ok_or_else(|| Error::NotFound(format!("service {service:?}")))?;
    let queue = config
        .queue(svc.queue.as_str())
        .ok_or_else(|| Error::Internal(format!("service {service} points at a missing queue")))?;
    Ok((svc, queue))
}

/// Issues a ticket for `service`: the next number of its queue for the site-local business
/// day, a visit waiting at the end of the queue (with its `customer` fields, if any), and
/// `VISIT_CREATED` — which carries the customer only if the site's configuration shares
/// customer data with central.
pub fn create(
    conn: &Connection,
    config: &SiteConfig,
    service: &str,
    customer: Option<&Customer>,
    now: DateTime<Utc>,
) -> Result<Visit> {
    create_placed(conn, config, service, customer, None, now)
}

/// Like `create`, for a checked-in appointment: the visit is placed as if it had arrived at
/// the appointment's start `starts_at` (its sort key is that instant in ms, made unique within
/// the queue), so it is called in appointment order among the walk-ins.
pub fn create_for_appointment(
    conn: &Connection,
    config: &SiteConfig,
    service: &str,
    customer: Option<&Customer>,
    starts_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Visit> {
    create_placed(conn, config, service, customer, Some(starts_at.timestamp_millis()), now)
}

/// `create`, placed at `at_ms` (an appointment's start) or, for a walk-in, by arrival.
fn create_placed(
    conn: &Connection,
    config: &SiteConfig,
    service: &str,
    customer: Option<&Customer>,
    at_ms: Option<i64>,
    now: DateTime<Utc>,
) -> Result<Visit> {
    let (svc, queue) = service_and_queue(config, service)?;
    let tz = config.site.tz().map_err(Error::Internal)?;
    let day = meridian_shared::business_day::business_day(tz, now);
    let day_s = day.to_string();
    let previous: Option<i64> = conn
        .query_row(
            "SELECT last_number FROM ticket_counters WHERE queue = ?1 AND business_day = ?2",
            params![queue.code.as_str(), day_s],
            |r| r.get(0),
        )
        .optional()?;
    let number =
        next_ticket_number(previous.map(|n| n as u32), queue.first_number, queue.last_number);
    conn.prepare_cached(
        "INSERT INTO ticket_counters (queue, business_day, last_number) VALUES (?1, ?2, ?3) \
         ON CONFLICT (queue, business_day) DO UPDATE SET last_number = excluded.last_number",
    )?
    .execute(params![queue.code.as_str(), day_s, number])?;
    let id = VisitId::new();
    let ticket = format_ticket(&queue.letter, number);
    let now_ms = now.timestamp_millis();
    let place = Location::Queue(queue.code.clone());
    let sort_key = match at_ms {
        Some(at) => free_key(conn, &place, at)?,
        None => arrival_key(conn, &place, now_ms)?,
    };
    conn.prepare_cached(
        "INSERT INTO visits (id, ticket, service, queue, business_day, status, created_at, \
         location_kind, location_code, sort_key, waiting_since_ms, customer_name, \
         customer_phone, customer_email, customer_note) \
         VALUES (?1, ?2, ?3, ?4, ?5, 'waiting', ?6, 'queue', ?4, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        id.to_string(),
        ticket,
        svc.code.as_str(),
        queue.code.as_str(),
        day_s,
        now.to_rfc3339(),
        sort_key,
        now_ms,
        customer.and_then(|c| c.name.as_deref()),
        customer.and_then(|c| c.phone.as_deref()),
        customer.and_then(|c| c.email.as_deref()),
        customer.and_then(|c| c.note.as_deref()),
    ])?;
    append_event(
        conn,
        &AgentEvent::VisitCreated(VisitCreated {
            visit_id: id,
            ticket,
            service: svc.code.clone(),
            queue: queue.code.clone(),
            business_day: day,
            created_at: now,
            // The personal data rule: customer fields leave the site only if it shares them.
            customer: customer.filter(|_| config.site.share_customer_data).cloned(),
        }),
        now,
    )?;
    get(conn, &id.to_string())
}

fn check_counter(config: &SiteConfig, counter: &str) -> Result<Code> {
    config
        .service_points
        .iter()
        .find(|p| p.code.as_str() == counter)
        .map(|p| p.code.clone())
        .ok_or_else(|| Error::NotFound(format!("service point {counter:?}")))
}

fn check_location(config: &SiteConfig, to: &Location) -> Result<()> {
    let known = match to {
        Location::Queue(q) => config.queue(q.as_str()).is_some(),
        Location::ServicePointPool(c) => config.service_points.iter().any(|p| &p.code == c),
        Location::StaffPool(s) => config.staff.iter().any(|u| &u.username == s),
    };
    if known { Ok(()) } else { Err(Error::NotFound(format!("transfer target {to:?}"))) }
}

/// Applies `op` to visit `id` and records its event. `marks` are kept with an `End`.
pub fn transition(
    conn: &Connection,
    config: &SiteConfig,
    id: &str,
    op: Op,
    marks: Vec<String>,
    now: DateTime<Utc>,
) -> Result<Visit> {
    let visit = get(conn, id)?;
    apply_and_record(conn, config, visit, op, marks, now)
}

fn apply_and_record(
    conn: &Connection,
    config: &SiteConfig,
    visit: Visit,
    op: Op,
    marks: Vec<String>,
    now: DateTime<Utc>,
) -> Result<Visit> {
    if let Op::Transfer { to, .. } = &op {
        check_location(config, to)?;
    }
    let next = visits::apply(&visit.state()?, &op).map_err(|e| Error::Conflict(e.to_string()))?;
    let now_ms = now.timestamp_millis();
    let mut v = visit.clone();
    v.status = next.status;
    v.outcome = next.outcome;
    v.queue = next.queue.to_string();
    v.counter = next.counter.as_ref().map(ToString::to_string);
    v.staff = next.staff.as_ref().map(ToString::to_string);
    v.recalls = next.recalls;
    let mut waiting_ms = None;
    let mut service_ms = None;
    let kind = match &op {
        Op::Call { .. } => {
            waiting_ms = Some(now_ms - visit.waiting_since.timestamp_millis());
            v.called_at = Some(now);
            v.serving_at = None;
            VisitEventKind::Called
        }
        Op::WalkDirect { .. } => {
            waiting_ms = Some(now_ms - visit.waiting_since.timestamp_millis());
            v.called_at = Some(now);
            v.serving_at = Some(now);
            VisitEventKind::Serving
        }
        Op::Recall => VisitEventKind::Recalled,
        Op::StartServing => {
            v.serving_at = Some(now);
            VisitEventKind::Serving
        }
        Op::NoShow => VisitEventKind::NoShow,
        Op::Recycle => VisitEventKind::Recycled,
        Op::Park => VisitEventKind::Parked,
        Op::Transfer { .. } => VisitEventKind::Transferred,
        Op::End => {
            let from = visit.serving_at.or(visit.called_at).unwrap_or(now);
            service_ms = Some(now_ms - from.timestamp_millis());
            VisitEventKind::Ended
        }
        Op::Remove => VisitEventKind::Removed,
        Op::CloseDay => VisitEventKind::ClosedAtEndOfDay,
    };
    if next.status == VisitStatus::Ended {
        v.ended_at = Some(now);
    }
    if next.status == VisitStatus::Waiting {
        v.waiting_since = now;
        v.called_at = None;
        v.serving_at = None;
        v.sort_key = match (&op, &next.location) {
            (Op::Transfer { position: Position::First, .. }, Some(loc)) => {
                first_key(conn, loc)?.min(now_ms)
            }
            (_, Some(loc)) => last_key(conn, loc, now_ms)?,
            (_, None) => now_ms,
        };
    }
    v.location = next.location.clone();
    save(conn, &v)?;
    let event = VisitChanged {
        visit_id: visit.id.parse().map_err(|_| Error::Internal("stored visit id".into()))?,
        ticket: v.ticket.clone(),
        service: code(&v.service)?,
        queue: next.queue.clone(),
        business_day: v.business_day,
        counter: next
            .counter
            .clone()
            .or_else(|| visit.counter.as_deref().and_then(|c| Code::parse(c).ok())),
        staff: next
            .staff
            .clone()
            .or_else(|| visit.staff.as_deref().and_then(|c| Code::parse(c).ok())),
        to: if next.status == VisitStatus::Waiting { next.location.clone() } else { None },
        outcome: next.outcome,
        at: now,
        waiting_ms,
        service_ms,
        recalls: next.recalls,
        marks,
    };
    append_event(conn, &AgentEvent::Visit(kind, event), now)?;
    crate::check_in::on_visit_change(conn, &v, now)?;
    Ok(v)
}

/// A sort key after everything waiting at `loc` (strictly, even within one millisecond).
fn last_key(conn: &Connection, loc: &Location, now_ms: i64) -> Result<i64> {
    let (kind, code_) = location_parts(Some(loc));
    let max: Option<i64> = conn.prepare_cached("SELECT MAX(sort_key) FROM visits WHERE status = 'waiting' AND location_kind = ?1 AND location_code = ?2")?.query_row(params![kind, code_],
        |r| r.get(0),
    )?;
    Ok(max.map_or(now_ms, |m| now_ms.max(m + 1)))
}

/// A walk-in's sort key: its arrival `now_ms`, after every walk-in already waiting at `loc`
/// (strictly). Checked-in appointments keep their own keys (their start, possibly later than
/// now), so a walk-in who arrives before an appointment's time is called before it.
fn arrival_key(conn: &Connection, loc: &Location, now_ms: i64) -> Result<i64> {
    let (kind, code_) = location_parts(Some(loc));
    let max: Option<i64> = conn
        .prepare_cached(
            "SELECT sort_key FROM visits v WHERE status = 'waiting' AND location_kind = ?1 \
             AND location_code = ?2 \
             AND NOT EXISTS (SELECT 1 FROM appointments a WHERE a.visit_id = v.id) \
             ORDER BY sort_key DESC LIMIT 1",
        )?
        .query_row(params![kind, code_], |r| r.get(0))
        .optional()?;
    free_key(conn, loc, max.map_or(now_ms, |m| now_ms.max(m + 1)))
}

/// The first sort key from `at_ms` on that no visit waiting at `loc` has.
fn free_key(conn: &Connection, loc: &Location, at_ms: i64) -> Result<i64> {
    let (kind, code_) = location_parts(Some(loc));
    let mut stmt = conn.prepare_cached(
        "SELECT 1 FROM visits WHERE status = 'waiting' AND location_kind = ?1 \
         AND location_code = ?2 AND sort_key = ?3",
    )?;
    let mut key = at_ms;
    while stmt.exists(params![kind, code_, key])? {
        key += 1;
    }
    Ok(key)
}

/// A sort key that puts a visit before everything waiting at `loc`.
fn first_key(conn: &Connection, loc: &Location) -> Result<i64> {
    let (kind, code_) = location_parts(Some(loc));
    let min: Option<i64> = conn.prepare_cached("SELECT MIN(sort_key) FROM visits WHERE status = 'waiting' AND location_kind = ?1 AND location_code = ?2")?.query_row(params![kind, code_],
        |r| r.get(0),
    )?;
    Ok(min.map(|m| m - 1).unwrap_or(i64::MAX))
}

/// The state of one counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePointState {
    pub code: String,
    pub name: String,
    pub open: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staff: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current: Option<Visit>,
}

fn counter_row(conn: &Connection, counter: &str) -> Result<(bool, Option<String>)> {
    Ok(conn
        .query_row("SELECT open, staff FROM service_points WHERE code = ?1", [counter], |r| {
            Ok((r.get::<_, i64>(0)? != 0, r.get(1)?))
        })
        .optional()?
        .unwrap_or((false, None)))
}

fn current_visit(conn: &Connection, counter: &str) -> Result<Option<Visit>> {
    Ok(query_visits(conn, "WHERE counter = ?1 AND status IN ('called', 'serving')", [counter])?
        .pop())
}

pub fn service_points(conn: &Connection, config: &SiteConfig) -> Result<Vec<ServicePointState>> {
    config
        .service_points
        .iter()
        .map(|p| {
            let (open, staff) = counter_row(conn, p.code.as_str())?;
            Ok(ServicePointState {
                code: p.code.to_string(),
                name: p.name.clone(),
                open,
                staff,
                current: current_visit(conn, p.code.as_str())?,
            })
        })
        .collect()
}

fn record_counter(
    conn: &Connection,
    kind: ServicePointEventKind,
    counter: &Code,
    staff: Option<&str>,
    now: DateTime<Utc>,
) -> Result<()> {
    let event = ServicePointChanged {
        service_point: counter.clone(),
        staff: staff.map(code).transpose()?,
        at: now,
    };
    append_event(conn, &AgentEvent::ServicePoint(kind, event), now)?;
    Ok(())
}

/// Opens `counter`, optionally with `staff` logged in (replacing whoever was).
pub fn open_counter(
    conn: &Connection,
    config: &SiteConfig,
    counter: &str,
    staff: Option<&str>,
    now: DateTime<Utc>,
) -> Result<ServicePointState> {
    let c = check_counter(config, counter)?;
    if let Some(s) = staff
        && !config.staff.iter().any(|u| u.username.as_str() == s)
    {
        return Err(Error::NotFound(format!("staff user {s:?}")));
    }
    let (was_open, previous) = counter_row(conn, counter)?;
    if !was_open {
        record_counter(conn, ServicePointEventKind::Opened, &c, staff, now)?;
    }
    if previous.as_deref() != staff {
        if let Some(p) = &previous {
            record_counter(conn, ServicePointEventKind::StaffLoggedOut, &c, Some(p), now)?;
        }
        if let Some(s) = staff {
            record_counter(conn, ServicePointEventKind::StaffLoggedIn, &c, Some(s), now)?;
        }
    }
    conn.prepare_cached("INSERT INTO service_points (code, open, staff, changed_at) VALUES (?1, 1, ?2, ?3) \
         ON CONFLICT (code) DO UPDATE SET open = 1, staff = excluded.staff, changed_at = excluded.changed_at")?.execute(params![counter, staff, now.to_rfc3339()],
    )?;
    service_points(conn, config)?
        .into_iter()
        .find(|p| p.code == counter)
        .ok_or_else(|| Error::NotFound(format!("service point {counter:?}")))
}

/// Closes `counter`; refused while it has a current visit.
pub fn close_counter(
    conn: &Connection,
    config: &SiteConfig,
    counter: &str,
    now: DateTime<Utc>,
) -> Result<ServicePointState> {
    let c = check_counter(config, counter)?;
    if let Some(v) = current_visit(conn, counter)? {
        return Err(Error::Conflict(format!(
            "service point {counter} still has ticket {}; end, recycle or transfer it first",
            v.ticket
        )));
    }
    let (was_open, staff) = counter_row(conn, counter)?;
    if let Some(s) = &staff {
        record_counter(conn, ServicePointEventKind::StaffLoggedOut, &c, Some(s), now)?;
    }
    if was_open {
        record_counter(conn, ServicePointEventKind::Closed, &c, None, now)?;
    }
    conn.prepare_cached(
        "INSERT INTO service_points (code, open, staff, changed_at) VALUES (?1, 0, NULL, ?2) \
         ON CONFLICT (code) DO UPDATE SET open = 0, staff = NULL, changed_at = excluded.changed_at",
    )?
    .execute(params![counter, now.to_rfc3339()])?;
    service_points(conn, config)?
        .into_iter()
        .find(|p| p.code == counter)
        .ok_or_else(|| Error::NotFound(format!("service point {counter:?}")))
}

/// The counter's staff, after checking it can take a visit now.
fn ready_counter(
    conn: &Connection,
    config: &SiteConfig,
    counter: &str,
) -> Result<(Code, Option<Code>)> {
    let c = check_counter(config, counter)?;
    let (open, staff) = counter_row(conn, counter)?;
    if !open {
        return Err(Error::Conflict(format!("service point {counter} is closed; open it first")));
    }
    if let Some(v) = current_visit(conn, counter)? {
        return Err(Error::Conflict(format!(
            "service point {counter} already has ticket {}; end, recycle or transfer it first",
            v.ticket
        )));
    }
    Ok((c, staff.as_deref().map(code).transpose()?))
}

/// Calls the next visit for `counter` by its work profile; `None` when nobody waits for it.
pub fn call_next(
    conn: &Connection,
    config: &SiteConfig,
    counter: &str,
    now: DateTime<Utc>,
) -> Result<Option<Visit>> {
    let (c, staff) = ready_counter(conn, config, counter)?;
    let profile = config
        .service_points
        .iter()
        .find(|p| p.code == c)
        .and_then(|p| p.work_profile.as_ref())
        .and_then(|wp| config.work_profiles.iter().find(|w| &w.code == wp))
        .map(|w| w.queues.clone())
        .unwrap_or_else(|| {
            config
                .queues
                .iter()
                .map(|q| meridian_shared::config::WorkProfileEntry {
                    queue: q.code.clone(),
                    min_wait_minutes: None,
                })
                .collect()
        });
    // Only the head (lowest sort key) and the longest-waiting visit of each place the counter
    // may call from can be chosen, so those are all `choose_next` needs: a handful of indexed
    // lookups instead of reading every waiting visit.
    let mut places = Vec::new();
    if let Some(s) = &staff {
        places.push(Location::StaffPool(s.clone()));
    }
    places.push(Location::ServicePointPool(c.clone()));
    for entry in &profile {
        let place = Location::Queue(entry.queue.clone());
        if !places.contains(&place) {
            places.push(place);
        }
    }
    let mut waiting: Vec<Visit> = Vec::new();
    for place in &places {
        let (kind, code_) = location_parts(Some(place));
        for order in ["sort_key", "waiting_since_ms"] {
            let found = query_visits(
                conn,
                &format!(
                    "WHERE status = 'waiting' AND location_kind = ?1 AND location_code = ?2 \
                     ORDER BY {order}, id LIMIT 1"
                ),
                params![kind, code_],
            )?;
            for v in found {
                if !waiting.iter().any(|w| w.id == v.id) {
                    waiting.push(v);
                }
            }
        }
    }
    let candidates: Vec<Candidate<usize>> = waiting
        .iter()
        .enumerate()
        .filter_map(|(i, v)| {
            Some(Candidate {
                id: i,
                location: v.location.clone()?,
                waiting_since: v.waiting_since,
                sort_key: v.sort_key,
            })
        })
        .collect();
    let Some(chosen) = visits::choose_next(&profile, &c, staff.as_ref(), &candidates, now) else {
        return Ok(None);
    };
    let visit = waiting[chosen.id].clone();
    apply_and_record(conn, config, visit, Op::Call { counter: c, staff }, vec![], now).map(Some)
}

/// Calls a specific waiting visit to `counter`.
pub fn call(
    conn: &Connection,
    config: &SiteConfig,
    counter: &str,
    visit: Visit,
    now: DateTime<Utc>,
) -> Result<Visit> {
    let (c, staff) = ready_counter(conn, config, counter)?;
    apply_and_record(conn, config, visit, Op::Call { counter: c, staff }, vec![], now)
}

/// A walk-in served at once at `counter`.
pub fn walk_direct(
    conn: &Connection,
    config: &SiteConfig,
    counter: &str,
    service: &str,
    customer: Option<&Customer>,
    now: DateTime<Utc>,
) -> Result<Visit> {
    let (c, staff) = ready_counter(conn, config, counter)?;
    let visit = create(conn, config, service, customer, now)?;
    apply_and_record(conn, config, visit, Op::WalkDirect { counter: c, staff }, vec![], now)
}

/// One queue as the branch sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueState {
    pub code: String,
    pub name: String,
    pub letter: String,
    pub waiting: u32,
    /// How long the longest-waiting visit has waited, in seconds.
    pub longest_wait_secs: i64,
}

pub fn queues(
    conn: &Connection,
    config: &SiteConfig,
    now: DateTime<Utc>,
) -> Result<Vec<QueueState>> {
    let mut stmt = conn.prepare_cached(
        "SELECT COUNT(*), MIN(waiting_since_ms) FROM visits \
         WHERE status = 'waiting' AND location_kind = 'queue' AND location_code = ?1",
    )?;
    config
        .queues
        .iter()
        .map(|q| {
            let (n, oldest): (i64, Option<i64>) =
                stmt.query_row([q.code.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(QueueState {
                code: q.code.to_string(),
                name: q.name.clone(),
                letter: q.letter.clone(),
                waiting: n as u32,
                longest_wait_secs: oldest
                    .map(|o| (now.timestamp_millis() - o).max(0) / 1000)
                    .unwrap_or(0),
            })
        })
        .collect()
}

/// Outbox events as the site's own subscribers receive them (the live event feed and
/// webhooks): a `VISIT_CREATED` whose visit has customer fields carries them even when the
/// site does not share customer data with central — these are local integrations. The outbox
/// itself, which is what the controller receives, is left as recorded.
pub fn for_local_subscribers(
    conn: &Connection,
    mut events: Vec<OutboxEvent>,
) -> Result<Vec<OutboxEvent>> {
    let mut stmt = conn.prepare_cached(
        "SELECT customer_name, customer_phone, customer_email, customer_note FROM visits \
         WHERE id = ?1",
    )?;
    for e in events.iter_mut().filter(|e| e.kind == "VISIT_CREATED") {
        let Ok(serde_json::Value::Object(mut payload)) = serde_json::from_slice(&e.payload) else {
            continue;
        };
        if payload.contains_key("customer") {
            continue;
        }
        let Some(id) = payload.get("visit_id").and_then(|v| v.as_str()) else { continue };
        let customer = stmt.query_row([id], |r| customer_from(r, 0)).optional()?.flatten();
        if let Some(customer) = customer {
            let value =
                serde_json::to_value(customer).map_err(|err| Error::Internal(err.to_string()))?;
            payload.insert("customer".into(), value);
            e.payload =
                serde_json::to_vec(&payload).map_err(|err| Error::Internal(err.to_string()))?;
        }
    }
    Ok(events)
}

/// How many visits wait ahead of `v` where it waits (0 unless it is waiting).
pub fn people_ahead(conn: &Connection, v: &Visit) -> Result<u32> {
    if v.status != VisitStatus::Waiting {
        return Ok(0);
    }
    let (kind, code_) = location_parts(v.location.as_ref());
    let n: i64 = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM visits WHERE status = 'waiting' AND location_kind = ?1 \
         AND location_code = ?2 AND sort_key < ?3",
        )?
        .query_row(params![kind, code_, v.sort_key], |r| r.get(0))?;
    Ok(n as u32)
}

/// The most recently called visits still at a counter (called or being served), newest first.
pub fn recent_calls(conn: &Connection, limit: u32) -> Result<Vec<Visit>> {
    query_visits(
        conn,
        "WHERE status IN ('called', 'serving') ORDER BY called_at_ms DESC, id LIMIT ?1",
        [limit],
    )
}

/// What the end-of-day sweep has done since the agent started (`/api/v1/status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct EndOfDaySweeps {
    /// Sweeps run.
    pub runs: u64,
    /// When the last sweep ran, by the agent's clock.
    pub last_run_at: Option<DateTime<Utc>>,
    /// Visits the last sweep ended.
    pub last_ended: usize,
}

impl EndOfDaySweeps {
    pub fn record(&mut self, at: DateTime<Utc>, ended: usize) {
        self.runs += 1;
        self.last_run_at = Some(at);
        self.last_ended = ended;
    }
}

/// Ends every visit whose business day is over under the site's end-of-day rule, with the
/// outcome `closed_at_end_of_day`; returns how many were ended.
pub fn close_finished_days(
    conn: &Connection,
    config: &SiteConfig,
    now: DateTime<Utc>,
) -> Result<usize> {
    let tz = config.site.tz().map_err(Error::Internal)?;
    let open = query_visits(conn, "WHERE status != 'ended' ORDER BY sort_key, id", [])?;
    let mut ended = 0;
    for v in open {
        if meridian_shared::business_day::day_is_over(
            &config.site,
            tz,
            v.business_day,
            v.created_at,
            now,
        ) {
            apply_and_record(conn, config, v, Op::CloseDay, vec![], now)?;
            ended += 1;
        }
    }
    Ok(ended)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config() -> SiteConfig {
        serde_json::from_value(serde_json::json!({
            "revision": 1,
            "site": {"code": "SFO", "name": "SF", "time_zone": "America/Los_Angeles"},
            "services": [
                {"site": "SFO", "code": "GEN", "name": "General", "queue": "general"},
                {"site": "SFO", "code": "ACC", "name": "Accounts", "queue": "accounts"}
            ],
            "queues": [
                {"site": "SFO", "code": "general", "name": "General", "letter": "A", "first_number": 1, "last_number": 500},
                {"site": "SFO", "code": "accounts", "name": "Accounts", "letter": "B", "first_number": 100, "last_number": 999}
            ],
            "service_points": [], "work_profiles": [], "staff": []
        }))
        .expect("config")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Tickets issued in any order across queues and business days never repeat within a
        /// queue and day (while the day stays within the queue's number range), and restart at
        /// the first number each day.
        #[test]
        fn ticket_numbers_are_unique_per_queue_per_day(
            steps in proptest::collection::vec((any::<bool>(), 0i64..90), 1..120)
        ) {
            let mut conn = Connection::open_in_memory().expect("db");
            crate::store::migrate(&mut conn).expect("migrate");
            let config = config();
            let mut now = chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 11, 2, 16, 0, 0).single().expect("t0");
            let mut seen = std::collections::HashSet::new();
            let mut days: std::collections::HashMap<(String, NaiveDate), u32> = Default::default();
            for (general, minutes) in steps {
                now += chrono::Duration::minutes(minutes);
                let v = create(&conn, &config, if general { "GEN" } else { "ACC" }, None, now).expect("ticket");
                prop_assert!(seen.insert((v.queue.clone(), v.business_day, v.ticket.clone())), "duplicate {}", v.ticket);
                let n = days.entry((v.queue.clone(), v.business_day)).or_default();
                *n += 1;
                if *n == 1 {
                    prop_assert!(v.ticket == "A001" || v.ticket == "B100", "first of the day: {}", v.ticket);
                }
            }
        }
    }
}
