//! Facts: what central statistics need of the event stream, derived per agent in stream order
//! (which the session guarantees). One row per visit, one per visit transaction (a stint in one
//! waiting place: entered → called → served / transferred / no-show …) and one per service
//! point or staff session. Pure; the store loads the facts a batch touches, folds the batch with
//! [`Projection`] and writes the result back in the transaction that moves the agent's cursor.
//! Events that cannot be folded (undecodable, about a visit never created, earlier than their
//! visit, after its end) are quarantined with a reason instead.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use meridian_shared::events::{AgentEvent, ServicePointEventKind, VisitEventKind};
use meridian_shared::visits::Location;
use serde::{Deserialize, Serialize};

/// One visit as central statistics see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisitFact {
    pub visit_id: String,
    pub agent_id: String,
    pub site: String,
    pub ticket: String,
    pub service: String,
    /// The queue it was created in.
    pub queue: String,
    /// The site-local business day.
    pub business_day: String,
    pub created_at: DateTime<Utc>,
    /// Creation in the site's time zone, `YYYY-MM-DDTHH:MM`, for 15-minute and hourly intervals.
    pub created_local: String,
    pub first_called_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    /// `served`, `no_show`, `removed` or `closed_at_end_of_day` once ended.
    pub outcome: Option<String>,
    /// Creation to first call.
    pub waiting_ms: Option<i64>,
    /// Time being served, summed over every service of the visit.
    pub service_ms: i64,
    /// The counter and staff member of the last call.
    pub counter: Option<String>,
    pub staff: Option<String>,
    pub transfers: i32,
    pub recalls: i32,
}

/// One stint of a visit in one waiting place: from entering it to leaving it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionFact {
    pub visit_id: String,
    /// 0 for the stint that began at creation, then 1, 2, … per move.
    pub n: i32,
    pub agent_id: String,
    pub site: String,
    pub service: String,
    pub queue: String,
    /// Where it waited: `queue:<code>`, `counter:<code>` or `staff:<code>`.
    pub place: String,
    pub business_day: String,
    pub entered_at: DateTime<Utc>,
    pub entered_local: String,
    pub called_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    /// `served`, `no_show`, `removed`, `closed_at_end_of_day`, `transferred`, `recycled` or
    /// `parked`; `None` while the stint is open (waiting, called or being served).
    pub outcome: Option<String>,
    pub waiting_ms: Option<i64>,
    pub service_ms: i64,
    pub counter: Option<String>,
    pub staff: Option<String>,
}

/// A service point open (kind `service_point`, subject the counter) or a staff member logged in
/// (kind `staff`, subject the staff member), with the time spent serving during it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionFact {
    pub agent_id: String,
    pub site: String,
    pub kind: String,
    pub subject: String,
    /// The counter of a staff session, the staff member who opened a service point.
    pub other: Option<String>,
    pub opened_at: DateTime<Utc>,
    /// Opening in the site's time zone, `YYYY-MM-DDTHH:MM`.
    pub opened_local: String,
    pub closed_at: Option<DateTime<Utc>>,
    pub serving_ms: i64,
    pub served: i32,
}

impl SessionFact {
    /// Open time so far (`now` for a session still open).
    pub fn open_ms(&self, now: DateTime<Utc>) -> i64 {
        (self.closed_at.unwrap_or(now) - self.opened_at).num_milliseconds().max(0)
    }
}

/// A visit with its transactions, as a batch folds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisitState {
    pub fact: VisitFact,
    pub stints: Vec<TransactionFact>,
}

/// An event statistics set aside, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub agent_id: String,
    pub seq: u64,
    pub site: String,
    pub kind: String,
    pub reason: String,
}

/// The state a batch of one agent's events is folded into. The caller seeds `visits` with the
/// stored state of every visit the batch mentions and `sessions` with the agent's open
/// sessions, folds, then persists what changed.
#[derive(Debug, Default)]
pub struct Projection {
    pub visits: BTreeMap<String, VisitState>,
    /// Open sessions by (kind, subject), plus every session the batch closed.
    pub open: BTreeMap<(String, String), SessionFact>,
    pub closed: Vec<SessionFact>,
    pub quarantined: Vec<Quarantined>,
    /// Visits whose state changed.
    pub touched: BTreeSet<String>,
    /// (site, business day) pairs whose rollups must be recomputed.
    pub dirty_days: BTreeSet<(String, String)>,
}

/// Site time zones, for local-time intervals; a site not listed counts in UTC.
pub type Zones = std::collections::HashMap<String, Tz>;

fn local(at: DateTime<Utc>, site: &str, zones: &Zones) -> String {
    match zones.get(site) {
        Some(tz) => at.with_timezone(tz).format("%Y-%m-%dT%H:%M").to_string(),
        None => at.format("%Y-%m-%dT%H:%M").to_string(),
    }
}

const SERVICE_POINT: &str = "service_point";
const STAFF: &str = "staff";

impl Projection {
    /// Folds one decoded event. `seq`, `kind` and `site` identify it for quarantine.
    pub fn apply(
        &mut self,
        agent_id: &str,
        seq: u64,
        site: &str,
        event: &AgentEvent,
        zones: &Zones,
    ) {
        let refuse = |this: &mut Self, reason: &str| {
            this.quarantined.push(Quarantined {
                agent_id: agent_id.to_owned(),
                seq,
                site: site.to_owned(),
                kind: event.kind().to_owned(),
                reason: reason.to_owned(),
            })
        };
        match event {
            AgentEvent::VisitCreated(e) => {
                let id = e.visit_id.to_string();
                if self.visits.contains_key(&id) {
                    return refuse(self, "the visit was already created");
                }
                let created_local = local(e.created_at, site, zones);
                let business_day = e.business_day.to_string();
                let fact = VisitFact {
                    visit_id: id.clone(),
                    agent_id: agent_id.to_owned(),
                    site: site.to_owned(),
                    ticket: e.ticket.clone(),
                    service: e.service.to_string(),
                    queue: e.queue.to_string(),
                    business_day: business_day.clone(),
                    created_at: e.created_at,
                    created_local: created_local.clone(),
                    first_called_at: None,
                    ended_at: None,
                    outcome: None,
                    waiting_ms: None,
                    service_ms: 0,
                    counter: None,
                    staff: None,
                    transfers: 0,
                    recalls: 0,
                };
                let stint = TransactionFact {
                    visit_id: id.clone(),
                    n: 0,
                    agent_id: agent_id.to_owned(),
                    site: site.to_owned(),
                    service: fact.service.clone(),
                    queue: fact.queue.clone(),
                    place: format!("queue:{}", fact.queue),
                    business_day: business_day.clone(),
                    entered_at: e.created_at,
                    entered_local: created_local,
                    called_at: None,
                    ended_at: None,
                    outcome: None,
                    waiting_ms: None,
                    service_ms: 0,
                    counter: None,
                    staff: None,
                };
                self.dirty_days.insert((site.to_owned(), business_day));
                self.visits.insert(id.clone(), VisitState { fact, stints: vec![stint] });
                self.touched.insert(id);
            }
            AgentEvent::Visit(kind, e) => {
                let id = e.visit_id.to_string();
                let Some(state) = self.visits.get_mut(&id) else {
                    return refuse(self, "no VISIT_CREATED was received for this visit");
                };
                if e.at < state.fact.created_at {
                    return refuse(self, "the event is earlier than its visit's creation");
                }
                if state.fact.outcome.is_some() {
                    return refuse(self, "the visit had already ended");
                }
                fold_visit(state, *kind, e, site, zones);
                self.dirty_days.insert((site.to_owned(), state.fact.business_day.clone()));
                self.touched.insert(id);
                // Serving time counts towards the sessions of the counter and staff member.
                if let Some(ms) = e.service_ms.filter(|ms| *ms > 0) {
                    let served = i32::from(e.outcome.is_some());
                    for key in [
                        e.counter.as_ref().map(|c| (SERVICE_POINT.to_owned(), c.to_string())),
                        e.staff.as_ref().map(|s| (STAFF.to_owned(), s.to_string())),
                    ]
                    .into_iter()
                    .flatten()
                    {
                        if let Some(session) = self.open.get_mut(&key) {
                            session.serving_ms += ms;
                            session.served += served;
                        }
                    }
                }
            }
            AgentEvent::ServicePoint(kind, e) => {
                let (session_kind, subject, other) = match kind {
                    ServicePointEventKind::Opened | ServicePointEventKind::Closed => (
                        SERVICE_POINT,
                        e.service_point.to_string(),
                        e.staff.as_ref().map(ToString::to_string),
                    ),
                    ServicePointEventKind::StaffLoggedIn
                    | ServicePointEventKind::StaffLoggedOut => {
                        let Some(staff) = &e.staff else {
                            return refuse(self, "a staff event without a staff member");
                        };
                        (STAFF, staff.to_string(), Some(e.service_point.to_string()))
                    }
                };
                let key = (session_kind.to_owned(), subject.clone());
                let opens = matches!(
                    kind,
                    ServicePointEventKind::Opened | ServicePointEventKind::StaffLoggedIn
                );
                if opens {
                    // Reopening without a close (e.g. after an agent crash) ends the old session.
                    if let Some(mut old) = self.open.remove(&key) {
                        old.closed_at = Some(e.at.max(old.opened_at));
                        self.closed.push(old);
                    }
                    self.open.insert(
                        key,
                        SessionFact {
                            agent_id: agent_id.to_owned(),
                            site: site.to_owned(),
                            kind: session_kind.to_owned(),
                            subject,
                            other,
                            opened_at: e.at,
                            opened_local: local(e.at, site, zones),
                            closed_at: None,
                            serving_ms: 0,
                            served: 0,
                        },
                    );
                } else {
                    let Some(mut session) = self.open.remove(&key) else {
                        return refuse(self, "closes a session that was never opened");
                    };
                    if e.at < session.opened_at {
                        self.open.insert(key, session);
                        return refuse(self, "closes a session before it was opened");
                    }
                    session.closed_at = Some(e.at);
                    self.closed.push(session);
                }
            }
            AgentEvent::ConfigApplied(_)
            | AgentEvent::AppointmentsSynced(_)
            | AgentEvent::AppointmentSyncFailed(_)
            | AgentEvent::AppointmentStatus(_)
            | AgentEvent::BranchClosed(_)
            | AgentEvent::BranchReopened(_)
            | AgentEvent::Request(..)
            | AgentEvent::RequestOperation(_)
            | AgentEvent::RequestOperationOutcome(_)
            | AgentEvent::RequestDeleted(_)
            | AgentEvent::UpgradeStatus(_)
            | AgentEvent::LoginLocked(_) => {}
        }
    }

    /// Every session the batch created or changed: the closed ones and the still open ones.
    pub fn sessions(&self) -> impl Iterator<Item = &SessionFact> {
        self.closed.iter().chain(self.open.values())
    }
}

fn fold_visit(
    state: &mut VisitState,
    kind: VisitEventKind,
    e: &meridian_shared::events::VisitChanged,
    site: &str,
    zones: &Zones,
) {
    let f = &mut state.fact;
    let calls = matches!(kind, VisitEventKind::Called | VisitEventKind::Serving);
    if calls && f.first_called_at.is_none() {
        f.first_called_at = Some(e.at);
        f.waiting_ms = Some((e.at - f.created_at).num_milliseconds().max(0));
    }
    if calls {
        f.counter = e.counter.as_ref().map(ToString::to_string);
        f.staff = e.staff.as_ref().map(ToString::to_string);
    }
    match kind {
        VisitEventKind::Recalled => f.recalls += 1,
        VisitEventKind::Transferred => f.transfers += 1,
        _ => {}
    }
    let service_ms = e.service_ms.unwrap_or(0).max(0);
    f.service_ms += service_ms;
    if let Some(outcome) = e.outcome {
        f.outcome = Some(outcome.as_str().to_owned());
        f.ended_at = Some(e.at);
    }

    let n = state.stints.len() as i32;
    let Some(stint) = state.stints.last_mut() else { return };
    if stint.outcome.is_some() {
        return; // the stored state ended the last stint already; nothing is open to fold into
    }
    if calls && stint.called_at.is_none() {
        stint.called_at = Some(e.at);
        stint.waiting_ms = Some((e.at - stint.entered_at).num_milliseconds().max(0));
    }
    if calls {
        stint.counter = e.counter.as_ref().map(ToString::to_string);
        stint.staff = e.staff.as_ref().map(ToString::to_string);
    }
    stint.service_ms += service_ms;
    let moved_to = match kind {
        VisitEventKind::Transferred => Some(("transferred", place_of(e.to.as_ref(), &e.queue))),
        VisitEventKind::Recycled => Some(("recycled", format!("queue:{}", e.queue))),
        VisitEventKind::Parked => Some(("parked", place_of(e.to.as_ref(), &e.queue))),
        _ => None,
    };
    if let Some(outcome) = e.outcome {
        stint.outcome = Some(outcome.as_str().to_owned());
        stint.ended_at = Some(e.at);
    } else if let Some((outcome, place)) = moved_to {
        stint.outcome = Some(outcome.to_owned());
        stint.ended_at = Some(e.at);
        let next = TransactionFact {
            visit_id: stint.visit_id.clone(),
            n,
            agent_id: stint.agent_id.clone(),
            site: stint.site.clone(),
            service: e.service.to_string(),
            queue: e.queue.to_string(),
            place,
            business_day: stint.business_day.clone(),
            entered_at: e.at,
            entered_local: local(e.at, site, zones),
            called_at: None,
            ended_at: None,
            outcome: None,
            waiting_ms: None,
            service_ms: 0,
            counter: None,
            staff: None,
        };
        state.stints.push(next);
    }
}

fn place_of(to: Option<&Location>, queue: &meridian_shared::Code) -> String {
    match to {
        Some(Location::Queue(q)) => format!("queue:{q}"),
        Some(Location::ServicePointPool(c)) => format!("counter:{c}"),
        Some(Location::StaffPool(s)) => format!("staff:{s}"),
        None => format!("queue:{queue}"),
    }
}

/// The business day of the visit an event is about, if any.
pub fn day_of(event: &AgentEvent) -> Option<chrono::NaiveDate> {
    match event {
        AgentEvent::VisitCreated(e) => Some(e.business_day),
        AgentEvent::Visit(_, e) => Some(e.business_day),
        _ => None,
    }
}

/// The visit an event is about, if any.
pub fn visit_of(event: &AgentEvent) -> Option<String> {
    match event {
        AgentEvent::VisitCreated(e) => Some(e.visit_id.to_string()),
        AgentEvent::Visit(_, e) => Some(e.visit_id.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use meridian_shared::events::{ServicePointChanged, VisitChanged, VisitCreated};
    use meridian_shared::visits::Outcome;
    use meridian_shared::{Code, VisitId};

    fn at(min: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 2, 17, 0, 0).unwrap() + chrono::Duration::minutes(min)
    }

    fn code(s: &str) -> Code {
        Code::parse(s).unwrap()
    }

    fn changed(
        id: VisitId,
        minute: i64,
        outcome: Option<Outcome>,
        service_ms: Option<i64>,
    ) -> VisitChanged {
        VisitChanged {
            visit_id: id,
            ticket: "A001".into(),
            service: code("GEN"),
            queue: code("general"),
            business_day: at(0).date_naive(),
            counter: Some(code("C1")),
            staff: Some(code("alice")),
            to: None,
            outcome,
            at: at(minute),
            waiting_ms: None,
            service_ms,
            recalls: 0,
            marks: vec![],
        }
    }

    fn created(id: VisitId, minute: i64) -> AgentEvent {
        AgentEvent::VisitCreated(VisitCreated {
            visit_id: id,
            ticket: "A001".into(),
            service: code("GEN"),
            queue: code("general"),
            business_day: at(0).date_naive(),
            created_at: at(minute),
            customer: None,
        })
    }

    fn sp(kind: ServicePointEventKind, minute: i64) -> AgentEvent {
        AgentEvent::ServicePoint(
            kind,
            ServicePointChanged {
                service_point: code("C1"),
                staff: Some(code("alice")),
                at: at(minute),
            },
        )
    }

    #[test]
    fn a_visit_folds_into_one_fact_and_one_transaction_per_stint() {
        let id = VisitId::new();
        let mut to_vip = changed(id, 20, None, Some(60_000));
        to_vip.to = Some(Location::Queue(code("vip")));
        to_vip.queue = code("vip");
        let events = [
            sp(ServicePointEventKind::Opened, -5),
            sp(ServicePointEventKind::StaffLoggedIn, -5),
            created(id, 0),
            AgentEvent::Visit(VisitEventKind::Called, changed(id, 12, None, None)),
            AgentEvent::Visit(VisitEventKind::Recalled, changed(id, 13, None, None)),
            AgentEvent::Visit(VisitEventKind::Serving, changed(id, 14, None, None)),
            AgentEvent::Visit(VisitEventKind::Transferred, to_vip),
            AgentEvent::Visit(VisitEventKind::Called, changed(id, 25, None, None)),
            AgentEvent::Visit(
                VisitEventKind::Ended,
                changed(id, 31, Some(Outcome::Served), Some(360_000)),
            ),
            sp(ServicePointEventKind::Closed, 40),
        ];
        let zones = Zones::from([("SFO".to_owned(), chrono_tz::America::Los_Angeles)]);
        let mut p = Projection::default();
        for (seq, e) in events.iter().enumerate() {
            p.apply("agent", seq as u64 + 1, "SFO", e, &zones);
        }
        assert_eq!(p.quarantined, vec![]);
        let state = &p.visits[&id.to_string()];
        let fact = &state.fact;
        assert_eq!(fact.created_local, "2026-11-02T09:00", "site-local time");
        assert_eq!(fact.waiting_ms, Some(12 * 60_000), "first call counts, not the second");
        assert_eq!((fact.recalls, fact.transfers), (1, 1));
        assert_eq!((fact.outcome.as_deref(), fact.ended_at), (Some("served"), Some(at(31))));
        assert_eq!(fact.service_ms, 420_000);

        let [first, second] = &state.stints[..] else { panic!("two stints: {:?}", state.stints) };
        assert_eq!((first.n, first.place.as_str()), (0, "queue:general"));
        assert_eq!(first.outcome.as_deref(), Some("transferred"));
        assert_eq!((first.waiting_ms, first.service_ms), (Some(12 * 60_000), 60_000));
        assert_eq!(
            (second.n, second.place.as_str(), second.queue.as_str()),
            (1, "queue:vip", "vip")
        );
        assert_eq!(second.entered_at, at(20));
        assert_eq!((second.waiting_ms, second.service_ms), (Some(5 * 60_000), 360_000));
        assert_eq!(second.outcome.as_deref(), Some("served"));

        let sessions: Vec<_> = p.sessions().collect();
        let counter = sessions.iter().find(|s| s.kind == "service_point").expect("counter");
        assert_eq!(
            (counter.closed_at, counter.serving_ms, counter.served),
            (Some(at(40)), 420_000, 1)
        );
        assert_eq!(counter.open_ms(at(99)), 45 * 60_000);
        let staff = sessions.iter().find(|s| s.kind == "staff").expect("staff");
        assert_eq!((staff.closed_at, staff.serving_ms), (None, 420_000), "still logged in");
    }

    #[test]
    fn impossible_events_are_quarantined_with_a_reason() {
        let id = VisitId::new();
        let mut p = Projection::default();
        let zones = Zones::new();
        p.apply(
            "a",
            1,
            "SFO",
            &AgentEvent::Visit(VisitEventKind::Called, changed(id, 1, None, None)),
            &zones,
        );
        p.apply("a", 2, "SFO", &created(id, 10), &zones);
        p.apply(
            "a",
            3,
            "SFO",
            &AgentEvent::Visit(VisitEventKind::Called, changed(id, 5, None, None)),
            &zones,
        );
        p.apply(
            "a",
            4,
            "SFO",
            &AgentEvent::Visit(VisitEventKind::Ended, changed(id, 20, Some(Outcome::Served), None)),
            &zones,
        );
        p.apply(
            "a",
            5,
            "SFO",
            &AgentEvent::Visit(VisitEventKind::Called, changed(id, 21, None, None)),
            &zones,
        );
        p.apply("a", 6, "SFO", &created(id, 30), &zones);
        p.apply("a", 7, "SFO", &sp(ServicePointEventKind::Closed, 30), &zones);
        let reasons: Vec<_> = p.quarantined.iter().map(|q| (q.seq, q.reason.as_str())).collect();
        assert_eq!(
            reasons,
            [
                (1, "no VISIT_CREATED was received for this visit"),
                (3, "the event is earlier than its visit's creation"),
                (5, "the visit had already ended"),
                (6, "the visit was already created"),
                (7, "closes a session that was never opened"),
            ]
        );
        let fact = &p.visits[&id.to_string()].fact;
        assert_eq!((fact.outcome.as_deref(), fact.waiting_ms), (Some("served"), None));
    }
}
