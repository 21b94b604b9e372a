//! What is happening at the sites now, built from the event stream's open transactions and
//! sessions (the live branch panel), and how counters and staff spent their open time (session
//! statistics). Pure.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::facts::{SessionFact, TransactionFact};
use crate::store::AgentRecord;

/// One waiting place at a site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlaceLive {
    /// `queue:<code>`, `counter:<code>` (a counter's own pool) or `staff:<code>`.
    pub place: String,
    pub waiting: u64,
    /// How long the longest-waiting visit has waited, as of the last event received.
    pub longest_wait_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CounterLive {
    pub counter: String,
    /// Who opened it.
    pub staff: Option<String>,
    /// The ticket called or being served there now.
    pub ticket_visit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SiteLive {
    pub site: String,
    /// The site's agent is connected now.
    pub connected: bool,
    /// The numbers may be out of date: the agent is offline (or never connected).
    pub stale: bool,
    pub last_seen: Option<DateTime<Utc>>,
    pub places: Vec<PlaceLive>,
    pub waiting: u64,
    /// Visits called or being served.
    pub with_staff: u64,
    pub open_counters: Vec<CounterLive>,
}

/// The live panel for `sites` (in order). Waits are measured to `now` for connected sites and
/// to the agent's last contact for offline ones, whose panel is marked stale.
pub fn panel(
    sites: &[String],
    agents: &[AgentRecord],
    open: &[TransactionFact],
    sessions: &[SessionFact],
    now: DateTime<Utc>,
) -> Vec<SiteLive> {
    sites
        .iter()
        .map(|site| {
            let agent = agents
                .iter()
                .filter(|a| a.site.as_str() == site && a.revoked_at.is_none())
                .max_by_key(|a| a.enrolled_at);
            let connected = agent.is_some_and(|a| a.connected);
            let last_seen = agent.and_then(|a| a.last_seen);
            let as_of = if connected { now } else { last_seen.unwrap_or(now) };
            let mut places: BTreeMap<String, PlaceLive> = BTreeMap::new();
            let mut with_staff = 0;
            let mut at_counter: BTreeMap<&str, &str> = BTreeMap::new();
            for t in open.iter().filter(|t| &t.site == site) {
                if t.called_at.is_some() {
                    with_staff += 1;
                    if let Some(c) = &t.counter {
                        at_counter.insert(c, &t.visit_id);
                    }
                    continue;
                }
                let p = places.entry(t.place.clone()).or_insert_with(|| PlaceLive {
                    place: t.place.clone(),
                    waiting: 0,
                    longest_wait_ms: 0,
                });
                p.waiting += 1;
                p.longest_wait_ms =
                    p.longest_wait_ms.max((as_of - t.entered_at).num_milliseconds().max(0));
            }
            let open_counters = sessions
                .iter()
                .filter(|s| &s.site == site && s.kind == "service_point" && s.closed_at.is_none())
                .map(|s| CounterLive {
                    counter: s.subject.clone(),
                    staff: s.other.clone(),
                    ticket_visit: at_counter.get(s.subject.as_str()).map(|v| (*v).to_owned()),
                })
                .collect();
            let places: Vec<PlaceLive> = places.into_values().collect();
            SiteLive {
                site: site.clone(),
                connected,
                stale: !connected,
                last_seen,
                waiting: places.iter().map(|p| p.waiting).sum(),
                places,
                with_staff,
                open_counters,
            }
        })
        .collect()
}

/// What to group session statistics by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionGroup {
    #[default]
    Counter,
    Staff,
    Site,
}

/// Open, serving and idle time of counters or staff.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionRow {
    pub group: String,
    pub sessions: u64,
    pub open_ms: i64,
    pub serving_ms: i64,
    pub idle_ms: i64,
    pub served: u64,
    /// Share of open time spent serving.
    pub utilisation_pct: Option<f64>,
}

/// Sessions still open count up to `now`.
pub fn session_rows(
    sessions: &[SessionFact],
    group: SessionGroup,
    now: DateTime<Utc>,
) -> Vec<SessionRow> {
    let wanted = match group {
        SessionGroup::Staff => "staff",
        _ => "service_point",
    };
    let mut rows: BTreeMap<String, SessionRow> = BTreeMap::new();
    for s in sessions.iter().filter(|s| s.kind == wanted) {
        let key = match group {
            SessionGroup::Counter => format!("{}/{}", s.site, s.subject),
            SessionGroup::Staff => s.subject.clone(),
            SessionGroup::Site => s.site.clone(),
        };
        let r = rows.entry(key.clone()).or_insert_with(|| SessionRow {
            group: key,
            sessions: 0,
            open_ms: 0,
            serving_ms: 0,
            idle_ms: 0,
            served: 0,
            utilisation_pct: None,
        });
        r.sessions += 1;
        r.open_ms += s.open_ms(now);
        r.serving_ms += s.serving_ms;
        r.served += s.served.max(0) as u64;
    }
    rows.into_values()
        .map(|mut r| {
            r.idle_ms = (r.open_ms - r.serving_ms).max(0);
            r.utilisation_pct = (r.open_ms > 0)
                .then(|| 100.0 * r.serving_ms.min(r.open_ms) as f64 / r.open_ms as f64);
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(min: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 2, 17, 0, 0).unwrap() + chrono::Duration::minutes(min)
    }

    fn stint(site: &str, place: &str, entered: i64, called: Option<i64>) -> TransactionFact {
        TransactionFact {
            visit_id: format!("{site}-{place}-{entered}"),
            n: 0,
            agent_id: "a".into(),
            site: site.into(),
            service: "GEN".into(),
            queue: "general".into(),
            place: place.into(),
            business_day: "2026-11-02".into(),
            entered_at: at(entered),
            entered_local: String::new(),
            called_at: called.map(at),
            ended_at: None,
            outcome: None,
            waiting_ms: None,
            service_ms: 0,
            counter: called.map(|_| "C1".into()),
            staff: None,
        }
    }

    fn session(
        kind: &str,
        subject: &str,
        opened: i64,
        closed: Option<i64>,
        serving_min: i64,
    ) -> SessionFact {
        SessionFact {
            agent_id: "a".into(),
            site: "SFO".into(),
            kind: kind.into(),
            subject: subject.into(),
            other: Some("alice".into()),
            opened_at: at(opened),
            opened_local: String::new(),
            closed_at: closed.map(at),
            serving_ms: serving_min * 60_000,
            served: 2,
        }
    }

    #[test]
    fn the_panel_counts_waiting_visits_per_place_and_open_counters() {
        let open = [
            stint("SFO", "queue:general", 0, None),
            stint("SFO", "queue:general", 5, None),
            stint("SFO", "queue:vip", 8, None),
            stint("SFO", "queue:general", 1, Some(3)),
            stint("CHI", "queue:general", 0, None),
        ];
        let sessions = [
            session("service_point", "C1", -10, None, 0),
            session("service_point", "C2", -10, Some(-1), 0),
        ];
        let panel = panel(&["SFO".into(), "TYO".into()], &[], &open, &sessions, at(10));
        let sfo = &panel[0];
        assert_eq!((sfo.waiting, sfo.with_staff), (3, 1));
        assert_eq!(
            sfo.places
                .iter()
                .map(|p| (p.place.as_str(), p.waiting, p.longest_wait_ms))
                .collect::<Vec<_>>(),
            [("queue:general", 2, 10 * 60_000), ("queue:vip", 1, 2 * 60_000)]
        );
        assert_eq!(sfo.open_counters.len(), 1);
        assert_eq!(sfo.open_counters[0].ticket_visit.as_deref(), Some("SFO-queue:general-1"));
        assert!(sfo.stale, "no agent: stale");
        assert_eq!((panel[1].waiting, panel[1].open_counters.len()), (0, 0));
    }

    #[test]
    fn sessions_split_open_time_into_serving_and_idle() {
        let sessions = [
            session("service_point", "C1", 0, Some(60), 45),
            session("service_point", "C1", 120, None, 10),
            session("staff", "alice", 0, Some(60), 45),
        ];
        let rows = session_rows(&sessions, SessionGroup::Counter, at(150));
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.group.as_str(), r.sessions, r.served), ("SFO/C1", 2, 4));
        assert_eq!((r.open_ms, r.serving_ms, r.idle_ms), (90 * 60_000, 55 * 60_000, 35 * 60_000));
        let staff = session_rows(&sessions, SessionGroup::Staff, at(150));
        assert_eq!((staff[0].group.as_str(), staff[0].utilisation_pct), ("alice", Some(75.0)));
    }
}
