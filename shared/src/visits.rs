//! The visit lifecycle as pure functions: the state machine every counter operation goes
//! through (`apply`), and the choice of the next visit for a counter (`choose_next`). The agent
//! wraps each in one SQLite transaction with its outbox event; nothing here does I/O.
//!
//! A visit is `waiting` somewhere (a queue, a service point's pool or a staff member's pool),
//! `called` to a counter, `serving` at a counter, or `ended` with exactly one outcome.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::Code;
use crate::config::WorkProfileEntry;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VisitStatus {
    Waiting,
    Called,
    Serving,
    Ended,
}

impl VisitStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            VisitStatus::Waiting => "waiting",
            VisitStatus::Called => "called",
            VisitStatus::Serving => "serving",
            VisitStatus::Ended => "ended",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Waiting, Self::Called, Self::Serving, Self::Ended]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

impl fmt::Display for VisitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a visit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Served,
    NoShow,
    Removed,
    /// Still open when the site closed; ended by the end-of-day sweep.
    ClosedAtEndOfDay,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Served => "served",
            Outcome::NoShow => "no_show",
            Outcome::Removed => "removed",
            Outcome::ClosedAtEndOfDay => "closed_at_end_of_day",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Served, Self::NoShow, Self::Removed, Self::ClosedAtEndOfDay]
            .into_iter()
            .find(|o| o.as_str() == s)
    }
}

/// Where a waiting visit waits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "code", rename_all = "snake_case")]
pub enum Location {
    Queue(Code),
    ServicePointPool(Code),
    StaffPool(Code),
}

/// Where in a queue a transferred visit goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    First,
    #[default]
    Last,
}

/// The lifecycle-relevant state of one visit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisitState {
    pub status: VisitStatus,
    /// The queue the visit belongs to (recycling returns it here).
    pub queue: Code,
    /// Where it waits, while waiting.
    pub location: Option<Location>,
    /// The counter that called or serves it.
    pub counter: Option<Code>,
    pub staff: Option<Code>,
    pub outcome: Option<Outcome>,
    pub recalls: u32,
}

impl VisitState {
    /// A new visit waiting in `queue`.
    pub fn waiting_in(queue: Code) -> Self {
        VisitState {
            status: VisitStatus::Waiting,
            location: Some(Location::Queue(queue.clone())),
            queue,
            counter: None,
            staff: None,
            outcome: None,
            recalls: 0,
        }
    }
}

/// A lifecycle operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Call to `counter` (by call-next or by ticket).
    Call {
        counter: Code,
        staff: Option<Code>,
    },
    Recall,
    /// The customer arrived at the counter.
    StartServing,
    NoShow,
    /// Back into its queue, at the end.
    Recycle,
    /// Into the calling staff member's own pool.
    Park,
    Transfer {
        to: Location,
        position: Position,
    },
    End,
    Remove,
    /// Walk-in served at once at `counter`.
    WalkDirect {
        counter: Code,
        staff: Option<Code>,
    },
    /// The end-of-day sweep.
    CloseDay,
}

impl Op {
    /// The argument-free operations by the action word the APIs use (`recall`,
    /// `start-serving`, `no-show`, `recycle`, `park`, `end`, `remove`).
    pub fn from_action(action: &str) -> Option<Op> {
        Some(match action {
            "recall" => Op::Recall,
            "start-serving" => Op::StartServing,
            "no-show" => Op::NoShow,
            "recycle" => Op::Recycle,
            "park" => Op::Park,
            "end" => Op::End,
            "remove" => Op::Remove,
            _ => return None,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Op::Call { .. } => "call",
            Op::Recall => "recall",
            Op::StartServing => "start serving",
            Op::NoShow => "mark as no-show",
            Op::Recycle => "recycle",
            Op::Park => "park",
            Op::Transfer { .. } => "transfer",
            Op::End => "end",
            Op::Remove => "remove",
            Op::WalkDirect { .. } => "serve as a walk-in",
            Op::CloseDay => "close",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("cannot {op} a visit that is {status}")]
    Illegal { op: &'static str, status: VisitStatus },
    #[error("cannot park: no staff member is logged in at the counter")]
    NoStaffToParkWith,
}

/// Applies `op` to `state`: the next state, or why the operation is not allowed now.
pub fn apply(state: &VisitState, op: &Op) -> Result<VisitState, TransitionError> {
    use VisitStatus::*;
    let illegal = || TransitionError::Illegal { op: op.name(), status: state.status };
    let mut next = state.clone();
    match (state.status, op) {
        (Waiting, Op::Call { counter, staff }) => {
            next.status = Called;
            next.location = None;
            next.counter = Some(counter.clone());
            next.staff = staff.clone();
        }
        (Waiting, Op::WalkDirect { counter, staff }) => {
            next.status = Serving;
            next.location = None;
            next.counter = Some(counter.clone());
            next.staff = staff.clone();
        }
        (Called, Op::Recall) => next.recalls += 1,
        (Called, Op::StartServing) => next.status = Serving,
        (Called, Op::NoShow) => end(&mut next, Outcome::NoShow),
        (Called | Serving, Op::Recycle) => {
            next.status = Waiting;
            next.location = Some(Location::Queue(state.queue.clone()));
            next.counter = None;
            next.staff = None;
        }
        (Called | Serving, Op::Park) => {
            let staff = state.staff.clone().ok_or(TransitionError::NoStaffToParkWith)?;
            next.status = Waiting;
            next.location = Some(Location::StaffPool(staff));
            next.counter = None;
            next.staff = None;
        }
        (Waiting | Called | Serving, Op::Transfer { to, .. }) => {
            next.status = Waiting;
            if let Location::Queue(q) = to {
                next.queue = q.clone();
            }
            next.location = Some(to.clone());
            next.counter = None;
            next.staff = None;
        }
        (Called | Serving, Op::End) => end(&mut next, Outcome::Served),
        (Waiting | Called, Op::Remove) => end(&mut next, Outcome::Removed),
        (Waiting | Called | Serving, Op::CloseDay) => end(&mut next, Outcome::ClosedAtEndOfDay),
        _ => return Err(illegal()),
    }
    Ok(next)
}

fn end(next: &mut VisitState, outcome: Outcome) {
    next.status = VisitStatus::Ended;
    next.outcome = Some(outcome);
    next.location = None;
}

/// A waiting visit as `choose_next` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<Id> {
    pub id: Id,
    pub location: Location,
    /// When it started waiting where it is now (for work-profile wait conditions).
    pub waiting_since: DateTime<Utc>,
    /// Order within its location; lower is called first.
    pub sort_key: i64,
}

/// Chooses the visit `counter` calls next: first the calling staff member's own pool, then the
/// counter's pool, then the work profile's queues — entries with a wait condition that holds
/// first, then the unconditional entries, each in profile order. Within a place, lowest
/// `sort_key`. A conditional entry only ever brings its queue forward; list the queue again
/// without a condition to call from it in the ordinary order.
pub fn choose_next<'a, Id>(
    profile: &[WorkProfileEntry],
    counter: &Code,
    staff: Option<&Code>,
    waiting: &'a [Candidate<Id>],
    now: DateTime<Utc>,
) -> Option<&'a Candidate<Id>> {
    let first_in = |loc: &Location| {
        waiting.iter().filter(|c| &c.location == loc).min_by_key(|c| (c.sort_key, c.waiting_since))
    };
    if let Some(staff) = staff
        && let Some(c) = first_in(&Location::StaffPool(staff.clone()))
    {
        return Some(c);
    }
    if let Some(c) = first_in(&Location::ServicePointPool(counter.clone())) {
        return Some(c);
    }
    let urgent = profile.iter().filter_map(|e| {
        let min = e.min_wait_minutes?;
        let c = first_in(&Location::Queue(e.queue.clone()))?;
        let oldest = waiting
            .iter()
            .filter(|w| w.location == Location::Queue(e.queue.clone()))
            .map(|w| w.waiting_since)
            .min()?;
        (now.signed_duration_since(oldest) >= chrono::Duration::minutes(i64::from(min)))
            .then_some(c)
    });
    let ordinary = profile
        .iter()
        .filter(|e| e.min_wait_minutes.is_none())
        .filter_map(|e| first_in(&Location::Queue(e.queue.clone())));
    urgent.chain(ordinary).next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn code(s: &str) -> Code {
        Code::parse(s).unwrap()
    }

    fn state(status: VisitStatus) -> VisitState {
        let mut s = VisitState::waiting_in(code("A"));
        if status != VisitStatus::Waiting {
            s.location = None;
            s.counter = Some(code("C1"));
            s.staff = Some(code("alice"));
        }
        s.status = status;
        if status == VisitStatus::Ended {
            s.outcome = Some(Outcome::Served);
        }
        s
    }

    fn ops() -> Vec<Op> {
        vec![
            Op::Call { counter: code("C1"), staff: Some(code("alice")) },
            Op::Recall,
            Op::StartServing,
            Op::NoShow,
            Op::Recycle,
            Op::Park,
            Op::Transfer { to: Location::Queue(code("B")), position: Position::First },
            Op::End,
            Op::Remove,
            Op::WalkDirect { counter: code("C2"), staff: None },
            Op::CloseDay,
        ]
    }

    /// Every (status, op) pair: the resulting status, or `None` where the operation is illegal.
    #[test]
    fn transition_table() {
        use VisitStatus::*;
        let table: &[(VisitStatus, [Option<VisitStatus>; 11])] = &[
            // call, recall, serve, no-show, recycle, park, transfer, end, remove, walk-in, close
            (
                Waiting,
                [
                    Some(Called),
                    None,
                    None,
                    None,
                    None,
                    None,
                    Some(Waiting),
                    None,
                    Some(Ended),
                    Some(Serving),
                    Some(Ended),
                ],
            ),
            (
                Called,
                [
                    None,
                    Some(Called),
                    Some(Serving),
                    Some(Ended),
                    Some(Waiting),
                    Some(Waiting),
                    Some(Waiting),
                    Some(Ended),
                    Some(Ended),
                    None,
                    Some(Ended),
                ],
            ),
            (
                Serving,
                [
                    None,
                    None,
                    None,
                    None,
                    Some(Waiting),
                    Some(Waiting),
                    Some(Waiting),
                    Some(Ended),
                    None,
                    None,
                    Some(Ended),
                ],
            ),
            (Ended, [None, None, None, None, None, None, None, None, None, None, None]),
        ];
        for (from, expected) in table {
            for (op, want) in ops().iter().zip(expected) {
                let got = apply(&state(*from), op);
                match want {
                    Some(to) => assert_eq!(
                        got.as_ref().map(|s| s.status),
                        Ok(*to),
                        "{from} --{}-->",
                        op.name()
                    ),
                    None => assert_eq!(
                        got,
                        Err(TransitionError::Illegal { op: op.name(), status: *from }),
                        "{from} --{}--> must be refused",
                        op.name()
                    ),
                }
            }
        }
    }

    #[test]
    fn transitions_keep_their_places() {
        let called = state(VisitStatus::Called);
        let recycled = apply(&called, &Op::Recycle).unwrap();
        assert_eq!(recycled.location, Some(Location::Queue(code("A"))));
        let parked = apply(&called, &Op::Park).unwrap();
        assert_eq!(parked.location, Some(Location::StaffPool(code("alice"))));
        let moved = apply(
            &called,
            &Op::Transfer { to: Location::Queue(code("B")), position: Position::Last },
        )
        .unwrap();
        assert_eq!((moved.queue.as_str(), moved.counter.clone()), ("B", None));
        let mut nobody = called.clone();
        nobody.staff = None;
        assert_eq!(apply(&nobody, &Op::Park), Err(TransitionError::NoStaffToParkWith));
        assert_eq!(apply(&called, &Op::NoShow).unwrap().outcome, Some(Outcome::NoShow));
        assert_eq!(apply(&called, &Op::Recall).unwrap().recalls, 1);
    }

    fn at(min: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 2, 9, 0, 0).unwrap() + chrono::Duration::minutes(min)
    }

    fn cand(id: u32, loc: Location, since_min: i64) -> Candidate<u32> {
        Candidate { id, location: loc, waiting_since: at(since_min), sort_key: since_min }
    }

    #[test]
    fn work_profile_choice() {
        let q = |s: &str| Location::Queue(code(s));
        // "Call from B first when its oldest ticket has waited 20 minutes, otherwise A then B."
        let profile = vec![
            WorkProfileEntry { queue: code("B"), min_wait_minutes: Some(20) },
            WorkProfileEntry { queue: code("A"), min_wait_minutes: None },
            WorkProfileEntry { queue: code("B"), min_wait_minutes: None },
        ];
        let check =
            |waiting: Vec<Candidate<u32>>, now: i64, staff: Option<&str>, expected: Option<u32>| {
                let staff = staff.map(code);
                let got = choose_next(&profile, &code("C1"), staff.as_ref(), &waiting, at(now))
                    .map(|c| c.id);
                assert_eq!(got, expected, "waiting={waiting:?} now={now}");
            };
        check(vec![], 0, None, None);
        check(vec![cand(1, q("A"), 0), cand(2, q("B"), 0)], 10, None, Some(1));
        check(vec![cand(1, q("A"), 0), cand(2, q("B"), 0)], 20, None, Some(2));
        check(vec![cand(2, q("B"), 5)], 10, None, Some(2));
        check(vec![cand(1, q("A"), 3), cand(3, q("A"), 1)], 10, None, Some(3));
        check(
            vec![cand(1, q("A"), 0), cand(4, Location::ServicePointPool(code("C1")), 9)],
            10,
            None,
            Some(4),
        );
        check(vec![cand(4, Location::ServicePointPool(code("C2")), 9)], 10, None, None);
        check(
            vec![
                cand(4, Location::ServicePointPool(code("C1")), 1),
                cand(5, Location::StaffPool(code("alice")), 9),
            ],
            10,
            Some("alice"),
            Some(5),
        );
        check(vec![cand(5, Location::StaffPool(code("alice")), 9)], 10, Some("bob"), None);
        check(vec![cand(6, q("Z"), 0)], 10, None, None);
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        (0usize..11).prop_map(|i| ops().swap_remove(i))
    }

    proptest! {
        /// Any sequence of operations: a visit is served at most once, ends in exactly one
        /// outcome, and nothing changes it after it ended.
        #[test]
        fn visits_end_once_with_one_outcome(seq in proptest::collection::vec(op_strategy(), 0..40)) {
            let mut s = VisitState::waiting_in(code("A"));
            let mut ends = 0;
            for op in &seq {
                let before = s.clone();
                match apply(&s, op) {
                    Ok(next) => {
                        prop_assert!(before.status != VisitStatus::Ended, "an ended visit changed");
                        if next.status == VisitStatus::Ended { ends += 1; }
                        prop_assert_eq!(next.outcome.is_some(), next.status == VisitStatus::Ended);
                        prop_assert_eq!(next.location.is_some(), next.status == VisitStatus::Waiting);
                        s = next;
                    }
                    Err(_) => prop_assert_eq!(&s, &before),
                }
            }
            prop_assert!(ends <= 1);
        }
    }
}
