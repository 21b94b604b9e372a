//! Visit facts: what central statistics need of one visit, derived from its events in stream
//! order (per agent, which the session guarantees). Pure; the store persists the result.

use chrono::{DateTime, Utc};
use meridian_shared::events::{AgentEvent, VisitEventKind};
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

/// Applies one event to the visit's fact (`None` before its `VISIT_CREATED`). Returns the new
/// fact, or `None` when the event is not about a visit or its creation was never seen.
pub fn apply(
    fact: Option<VisitFact>,
    agent_id: &str,
    site: &str,
    event: &AgentEvent,
) -> Option<VisitFact> {
    match event {
        AgentEvent::VisitCreated(e) => Some(VisitFact {
            visit_id: e.visit_id.to_string(),
            agent_id: agent_id.to_owned(),
            site: site.to_owned(),
            ticket: e.ticket.clone(),
            service: e.service.to_string(),
            queue: e.queue.to_string(),
            business_day: e.business_day.to_string(),
            created_at: e.created_at,
            first_called_at: None,
            ended_at: None,
            outcome: None,
            waiting_ms: None,
            service_ms: 0,
            counter: None,
            staff: None,
            transfers: 0,
            recalls: 0,
        }),
        AgentEvent::Visit(kind, e) => {
            let mut f = fact?;
            match kind {
                VisitEventKind::Called | VisitEventKind::Serving if f.first_called_at.is_none() => {
                    f.first_called_at = Some(e.at);
                    f.waiting_ms = Some((e.at - f.created_at).num_milliseconds().max(0));
                }
                _ => {}
            }
            if matches!(kind, VisitEventKind::Called | VisitEventKind::Serving) {
                f.counter = e.counter.as_ref().map(ToString::to_string);
                f.staff = e.staff.as_ref().map(ToString::to_string);
            }
            match kind {
                VisitEventKind::Recalled => f.recalls += 1,
                VisitEventKind::Transferred => f.transfers += 1,
                _ => {}
            }
            if let Some(ms) = e.service_ms {
                f.service_ms += ms.max(0);
            }
            if let Some(outcome) = e.outcome {
                f.outcome = Some(outcome.as_str().to_owned());
                f.ended_at = Some(e.at);
            }
            Some(f)
        }
        AgentEvent::ServicePoint(..) | AgentEvent::ConfigApplied(_) => fact,
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
    use meridian_shared::events::{VisitChanged, VisitCreated};
    use meridian_shared::visits::Outcome;
    use meridian_shared::{Code, VisitId};

    fn at(min: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 2, 9, 0, 0).unwrap() + chrono::Duration::minutes(min)
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
            service: Code::parse("GEN").unwrap(),
            queue: Code::parse("general").unwrap(),
            business_day: at(0).date_naive(),
            counter: Some(Code::parse("C1").unwrap()),
            staff: Some(Code::parse("alice").unwrap()),
            to: None,
            outcome,
            at: at(minute),
            waiting_ms: None,
            service_ms,
            recalls: 0,
            marks: vec![],
        }
    }

    #[test]
    fn a_visit_folds_into_one_fact() {
        let id = VisitId::new();
        let created = AgentEvent::VisitCreated(VisitCreated {
            visit_id: id,
            ticket: "A001".into(),
            service: Code::parse("GEN").unwrap(),
            queue: Code::parse("general").unwrap(),
            business_day: at(0).date_naive(),
            created_at: at(0),
        });
        let events = [
            created,
            AgentEvent::Visit(VisitEventKind::Called, changed(id, 12, None, None)),
            AgentEvent::Visit(VisitEventKind::Recalled, changed(id, 13, None, None)),
            AgentEvent::Visit(VisitEventKind::Serving, changed(id, 14, None, None)),
            AgentEvent::Visit(VisitEventKind::Transferred, changed(id, 20, None, None)),
            AgentEvent::Visit(VisitEventKind::Called, changed(id, 25, None, None)),
            AgentEvent::Visit(
                VisitEventKind::Ended,
                changed(id, 31, Some(Outcome::Served), Some(360_000)),
            ),
        ];
        let fact = events.iter().fold(None, |f, e| apply(f, "agent", "SFO", e)).unwrap();
        assert_eq!(fact.waiting_ms, Some(12 * 60_000), "first call counts, not the second");
        assert_eq!(fact.first_called_at, Some(at(12)));
        assert_eq!((fact.recalls, fact.transfers), (1, 1));
        assert_eq!((fact.outcome.as_deref(), fact.ended_at), (Some("served"), Some(at(31))));
        assert_eq!(fact.service_ms, 360_000);
        // An event for a visit whose creation was never seen makes no fact.
        let orphan =
            AgentEvent::Visit(VisitEventKind::Called, changed(VisitId::new(), 1, None, None));
        assert_eq!(apply(None, "agent", "SFO", &orphan), None);
    }
}
