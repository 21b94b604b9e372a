//! Reconciling the two ends of a session after either store came back from a backup.
//!
//! Both streams of the session are numbered by their writer: events by the agent (its outbox),
//! commands by the controller (the agent's command log). A store restored from a backup forgets
//! numbers it already handed out, and the other side must neither drop what it hands out anew
//! under the same numbers nor wait forever for what the restored side no longer has. This
//! module decides, from what each side reports at the start of a session, what to do; it does
//! no I/O. See `docs/protocol.md`, "Restored stores".
//!
//! **Events.** Every time the agent opens its store it starts a new *segment* of its outbox: a
//! random id and the first sequence it will number in it. The list of segments (the *lineage*)
//! labels every sequence with the store incarnation that wrote it; two stores agree on a
//! sequence when the same segment covers it. The agent sends the segments covering its
//! unacknowledged events in Hello; the controller keeps every agent's lineage. A restored agent
//! store opens a new segment where its backup ended, so the labels disagree from there on —
//! whatever the high-water marks say.
//!
//! **Commands.** Every command carries a random nonce; the agent records the nonce of each
//! command it applies and names the last one in Hello. A controller database restored from a
//! dump either lacks that command or holds another one under its sequence.

use serde::{Deserialize, Serialize};

/// Most segments an agent reports in one Hello.
pub const MAX_SEGMENTS: usize = 1_000;

/// A new random nonce or segment id: positive as a signed 64-bit integer (how both stores keep
/// it), never 0 (which means "not recorded").
pub fn new_nonce() -> u64 {
    (rand::random::<u64>() >> 1).max(1)
}

/// A run of outbox sequences written by one incarnation of an agent's store, from `first_seq`
/// until the next segment's first sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Segment {
    pub id: u64,
    pub first_seq: u64,
    /// Set on the segment a renumbering continued in: which renumbering, so a store restored
    /// from a backup older than it is renumbered the same way (see `Step::moved_head`). It
    /// travels with the lineage, so it survives either side's restore as long as the other
    /// side still reports it.
    #[serde(default)]
    pub origin: Option<Origin>,
}

/// The renumbering a segment was created by (its `Step` without the segment id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Origin {
    pub keep_through: u64,
    pub base: u64,
    pub moved_head: u64,
}

/// Why a reported lineage is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineageError {
    #[error("the lineage has {0} segments; at most {MAX_SEGMENTS} are allowed")]
    TooLong(usize),
    #[error("segment {0} starts at sequence 0")]
    ZeroSequence(usize),
    #[error("segment {0} has id 0")]
    ZeroId(usize),
    #[error("segment {0} does not start after the one before it")]
    NotIncreasing(usize),
    #[error("segment {0} names a renumbering that moves nothing")]
    BadOrigin(usize),
    #[error("{0} holes reported; at most {MAX_HOLES} are allowed")]
    TooManyHoles(usize),
    #[error("hole {0} is empty or starts at 0")]
    BadHole(usize),
}

/// Most holes an agent reports.
pub const MAX_HOLES: usize = 1_000;

/// Checks the holes received from the network: bounded, each non-empty.
pub fn validate_holes(holes: &[Gap]) -> Result<(), LineageError> {
    if holes.len() > MAX_HOLES {
        return Err(LineageError::TooManyHoles(holes.len()));
    }
    match holes.iter().position(|h| h.first == 0 || h.first > h.last) {
        Some(i) => Err(LineageError::BadHole(i)),
        None => Ok(()),
    }
}

/// Checks a lineage received from the network: bounded, ids non-zero, first sequences positive
/// and strictly increasing.
pub fn validate(lineage: &[Segment]) -> Result<(), LineageError> {
    if lineage.len() > MAX_SEGMENTS {
        return Err(LineageError::TooLong(lineage.len()));
    }
    for (i, s) in lineage.iter().enumerate() {
        if s.first_seq == 0 {
            return Err(LineageError::ZeroSequence(i));
        }
        if s.id == 0 {
            return Err(LineageError::ZeroId(i));
        }
        if i > 0 && s.first_seq <= lineage[i - 1].first_seq {
            return Err(LineageError::NotIncreasing(i));
        }
        if s.origin.is_some_and(|o| o.keep_through >= o.base) {
            return Err(LineageError::BadOrigin(i));
        }
    }
    Ok(())
}

/// The segment that labels `seq` in `lineage` (sorted), if any covers it.
pub fn covering(lineage: &[Segment], seq: u64) -> Option<u64> {
    let i = lineage.partition_point(|s| s.first_seq <= seq);
    (i > 0).then(|| lineage[i - 1].id)
}

/// The segments of `lineage` that cover sequences above `floor`: what the agent reports.
pub fn above(lineage: &[Segment], floor: u64) -> &[Segment] {
    // Segment i ends where segment i + 1 starts; it matters if it ends above `floor`.
    let skip = lineage.windows(2).take_while(|w| w[1].first_seq <= floor + 1).count();
    &lineage[skip..]
}

/// The lineage after the store opens a new segment `id` at `next_seq`: a segment in which
/// nothing was written yet is replaced.
pub fn open_segment(lineage: &mut Vec<Segment>, id: u64, next_seq: u64) {
    lineage.retain(|s| s.first_seq < next_seq);
    lineage.push(Segment { id, first_seq: next_seq, origin: None });
}

/// What the agent reports about its outbox in Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentOutbox {
    /// The highest sequence the agent holds as acknowledged centrally.
    pub acked: u64,
    /// The highest sequence it has assigned.
    pub high_water: u64,
    /// The lowest sequence it still holds (`high_water + 1` when it holds none).
    pub oldest_retained: u64,
    /// The segments covering every sequence it holds above `min(acked, oldest_retained - 1)`.
    pub lineage: Vec<Segment>,
    /// The ranges its renumberings skipped (the controller held those sequences then).
    pub holes: Vec<Gap>,
}

/// What the controller knows of the agent's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CentralEvents {
    /// The high-water mark of the events stored centrally, gapless but for `gaps`.
    pub acked: u64,
    /// Sequences recorded as never to be stored (above the agent's acknowledgement at least).
    pub gaps: Vec<Gap>,
    /// The agent's lineage as last recorded (at least the segments covering sequences above
    /// the agent's reported `acked`).
    pub lineage: Vec<Segment>,
}

/// What to do with the agent's events at the start of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventPlan {
    /// Both sides agree on every stored sequence: the agent sends from `central.acked + 1`.
    Continue,
    /// The agent's store is older than what was stored centrally (restored from a backup):
    /// central's sequences after `keep_through` are not the agent's. The agent renumbers every
    /// event it holds after `keep_through` to follow `base` (central's acknowledgement) — so no
    /// sequence is ever reused — and continues in a new segment starting at `base + 1`.
    Resequence {
        keep_through: u64,
        base: u64,
        /// Events the agent reported that move (more may be committed meanwhile; they move too).
        moved: u64,
    },
    /// The controller's database is older than what the agent knows was stored (restored from
    /// a dump): the agent sends again from `central.acked + 1` everything it still holds. The
    /// sequences it no longer holds — pruned, or never its own (a renumbering left them to the
    /// controller, which lost them too) — are gaps, recorded centrally and skipped.
    Resend { gaps: Vec<Gap> },
}

/// Sequences `first..=last` of an agent that central will never have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub first: u64,
    pub last: u64,
}

impl Gap {
    pub fn len(&self) -> u64 {
        self.last - self.first + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Decides how the agent's events continue (see `EventPlan`).
pub fn plan_events(central: &CentralEvents, agent: &AgentOutbox) -> EventPlan {
    let c = central.acked;
    if agent.acked > c {
        // Central forgot events it had acknowledged.
        return EventPlan::Resend { gaps: missing_after(c, agent) };
    }
    match first_disagreement(central, agent) {
        None => EventPlan::Continue,
        Some(d) => {
            let keep_through = d - 1;
            // Above everything the controller holds or has written off.
            let base = central.gaps.iter().map(|g| g.last).fold(c, u64::max);
            EventPlan::Resequence {
                keep_through,
                base,
                moved: agent.high_water.saturating_sub(keep_through),
            }
        }
    }
}

/// The sequences above `c` the agent does not hold, merged into ranges: those before its
/// oldest event, and the ranges renumberings skipped (events the controller held then).
fn missing_after(c: u64, agent: &AgentOutbox) -> Vec<Gap> {
    let mut ranges: Vec<(u64, u64)> = agent
        .holes
        .iter()
        .map(|h| (h.first, h.last))
        .chain(std::iter::once((1, agent.oldest_retained - 1)))
        .map(|(first, last)| (first.max(c + 1), last))
        .filter(|(first, last)| first <= last)
        .collect();
    ranges.sort_unstable();
    let mut gaps: Vec<Gap> = Vec::new();
    for (first, last) in ranges {
        match gaps.last_mut() {
            Some(g) if first <= g.last + 1 => g.last = g.last.max(last),
            _ => gaps.push(Gap { first, last }),
        }
    }
    gaps
}

/// The acknowledgement after `acked` once the gaps that start right after it are skipped.
pub fn skip_gaps(mut acked: u64, gaps: &[Gap]) -> u64 {
    let mut sorted = gaps.to_vec();
    sorted.sort_by_key(|g| g.first);
    for g in sorted {
        if g.first <= acked + 1 && g.last > acked {
            acked = g.last;
        }
    }
    acked
}

/// Checks a batch of sequences against the acknowledgement `acked`: it must start at or below
/// the next expected sequence and run contiguously, where "next" steps over the recorded
/// `gaps`. Returns the first sequence out of place, if any.
pub fn out_of_place(acked: u64, seqs: &[u64], gaps: &[Gap]) -> Option<u64> {
    let mut expected = skip_gaps(acked, gaps) + 1;
    for (i, &seq) in seqs.iter().enumerate() {
        let ok = if i == 0 { seq >= 1 && seq <= expected } else { seq == expected };
        if !ok {
            return Some(seq);
        }
        expected = skip_gaps(seq, gaps) + 1;
    }
    None
}

/// The first sequence in `(agent.acked, central.acked]` the two sides do not both hold under
/// the same segment, if any. Where central has no lineage (an agent that reported none yet)
/// it cannot tell and takes the agent's word.
fn first_disagreement(central: &CentralEvents, agent: &AgentOutbox) -> Option<u64> {
    let from = agent.acked + 1;
    // An event the agent holds, under another label than the controller's, where the
    // controller wrote the sequence off (under the same label it is the very event that was
    // written off: not a new one).
    let in_gap = central
        .gaps
        .iter()
        .filter_map(|g| {
            first_foreign(central, agent, g.first.max(from), g.last.min(agent.high_water))
        })
        .min();
    let to = central.acked;
    if from > to {
        return in_gap;
    }
    // Labels change only at segment starts, so checking `from` and every start inside the
    // range finds the first disagreement.
    let starts = central.lineage.iter().chain(&agent.lineage).map(|s| s.first_seq);
    let edges = central.gaps.iter().chain(&agent.holes).map(|g| g.last.saturating_add(1));
    let mut points: Vec<u64> =
        std::iter::once(from).chain(starts.chain(edges).filter(|&s| s > from && s <= to)).collect();
    points.sort_unstable();
    points.dedup();
    let label_mismatch = points.into_iter().find(|&t| {
        !in_any(&central.gaps, t)
            && !in_any(&agent.holes, t)
            && match (covering(&central.lineage, t), covering(&agent.lineage, t)) {
                (None, _) | (_, None) => false,
                (Some(a), Some(b)) => a != b,
            }
    });
    let missing = (agent.high_water < to).then_some(agent.high_water + 1);
    [label_mismatch, missing, in_gap].into_iter().flatten().min()
}

fn in_any(gaps: &[Gap], seq: u64) -> bool {
    gaps.iter().any(|g| g.first <= seq && seq <= g.last)
}

/// The first sequence in `first..=last` the agent holds (not one of its holes) under another
/// label than the controller's (or where the controller has none).
fn first_foreign(
    central: &CentralEvents,
    agent: &AgentOutbox,
    first: u64,
    last: u64,
) -> Option<u64> {
    if first > last {
        return None;
    }
    // Whether the agent holds a sequence, and the labels, change only at these points.
    let starts = central.lineage.iter().chain(&agent.lineage).map(|s| s.first_seq);
    let hole_ends = agent.holes.iter().map(|h| h.last.saturating_add(1));
    let mut points: Vec<u64> = std::iter::once(first)
        .chain(starts.chain(hole_ends).filter(|&t| t > first && t <= last))
        .collect();
    points.sort_unstable();
    points.dedup();
    points.into_iter().find(|&t| {
        let held = !agent.holes.iter().any(|h| h.first <= t && t <= h.last);
        let same = match (covering(&central.lineage, t), covering(&agent.lineage, t)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        };
        held && !same
    })
}

/// One renumbering of an agent's outbox (see `EventPlan::Resequence`): every event after
/// `keep_through` moves by `base - keep_through`; the run that covered `keep_through + 1`
/// continues as segment `segment` from `base + 1`, later segments keep their ids, shifted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub keep_through: u64,
    pub base: u64,
    pub segment: u64,
    /// The segment that covered `keep_through + 1` in the store the step was decided for (0:
    /// none): a store restored from a backup that still holds that event unmoved predates the
    /// step, and the same step is applied to it again, so its events land where the
    /// controller already stored them instead of being stored twice.
    pub moved_head: u64,
}

impl Step {
    fn shift(&self) -> u64 {
        self.base - self.keep_through
    }

    /// The step a segment was created by, if any.
    pub fn of(segment: &Segment) -> Option<Step> {
        segment.origin.map(|o| Step {
            keep_through: o.keep_through,
            base: o.base,
            segment: segment.id,
            moved_head: o.moved_head,
        })
    }
}

/// `lineage` after `step`: the segments up to `keep_through` as they were, the moved run
/// relabelled as the step's segment from `base + 1`, the segments starting after
/// `keep_through + 1` shifted with their events.
pub fn shift_lineage(lineage: &[Segment], step: &Step) -> Vec<Segment> {
    let k = step.keep_through;
    let head = Segment {
        id: step.segment,
        first_seq: step.base + 1,
        origin: Some(Origin {
            keep_through: step.keep_through,
            base: step.base,
            moved_head: step.moved_head,
        }),
    };
    // The events at or below `keep_through` stay where they are, with their labels (they are
    // sent again should the controller's database go back); the moved run becomes `head`.
    let kept = lineage.iter().filter(|s| s.first_seq <= k).copied();
    let later = lineage
        .iter()
        .filter(|s| s.first_seq > k + 1)
        .map(|s| Segment { first_seq: s.first_seq + step.shift(), ..*s });
    kept.chain(std::iter::once(head)).chain(later).collect()
}

impl AgentOutbox {
    /// Whether this store still holds, unmoved, the event `step` moved first.
    pub fn predates(&self, step: &Step) -> bool {
        step.moved_head != 0
            && self.high_water > step.keep_through
            && !in_any(&self.holes, step.keep_through + 1)
            && covering(&self.lineage, step.keep_through + 1) == Some(step.moved_head)
    }

    /// What the agent reports after it applies `step`.
    pub fn after(&self, step: &Step) -> AgentOutbox {
        let k = step.keep_through;
        let moved = |seq: u64| if seq > k { seq + step.shift() } else { seq };
        let mut holes: Vec<Gap> = self.holes.iter().filter(|h| h.last <= k).copied().collect();
        holes.push(Gap { first: k + 1, last: step.base });
        AgentOutbox {
            acked: step.base,
            high_water: moved(self.high_water.max(k)),
            oldest_retained: moved(self.oldest_retained),
            lineage: shift_lineage(&self.lineage, step),
            holes,
        }
    }
}

/// Everything the start of a session decides about the agent's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPlan {
    /// Renumberings the agent applies, in order: earlier ones its store predates (restored
    /// from a backup older than them), then a new one if needed.
    pub steps: Vec<Step>,
    /// The new renumbering among `steps`, for the controller to record.
    pub new_step: Option<Step>,
    /// The decision on the report after the earlier renumberings.
    pub events: EventPlan,
    /// The controller's lineage from this sequence on is replaced by `lineage`.
    pub lineage_from: u64,
    pub lineage: Vec<Segment>,
}

/// Decides how the agent's events continue: replays the renumberings recorded in either
/// side's lineage (oldest first) that the agent's store predates, then `plan_events`; a
/// resequence becomes a new step continuing in `fresh_segment`. The controller's lineage then
/// follows the agent's as it will be once it applied every step.
pub fn plan_session(
    central: &CentralEvents,
    agent: &AgentOutbox,
    fresh_segment: u64,
) -> SessionPlan {
    let mut recorded: Vec<Step> =
        central.lineage.iter().chain(&agent.lineage).filter_map(Step::of).collect();
    recorded.sort_by_key(|s| (s.base, s.keep_through));
    recorded.dedup();
    let mut report = agent.clone();
    let mut steps = Vec::new();
    for step in &recorded {
        if report.predates(step) {
            report = report.after(step);
            steps.push(*step);
        }
    }
    let events = plan_events(central, &report);
    let mut new_step = None;
    if let EventPlan::Resequence { keep_through, base, .. } = events {
        let step = Step {
            keep_through,
            base,
            segment: fresh_segment,
            moved_head: covering(&report.lineage, keep_through + 1).unwrap_or(0),
        };
        report = report.after(&step);
        steps.push(step);
        new_step = Some(step);
    }
    let (lineage_from, lineage) = match report.lineage.first() {
        Some(first) => (first.first_seq, report.lineage.clone()),
        // Nothing reported (an agent from before lineages): keep what is known.
        None => (u64::MAX >> 1, vec![]),
    };
    SessionPlan { steps, new_step, events, lineage_from, lineage }
}

/// What the agent reports about the commands it applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppliedHead {
    /// The highest command sequence applied (0 = none).
    pub seq: u64,
    /// That command's nonce (0 = not recorded: applied before nonces existed).
    pub nonce: u64,
}

/// Most checkpoints an agent reports.
pub const MAX_CHECKPOINTS: usize = 48;

/// The sequences whose nonces the agent reports besides its head: `head - 1`, `head - 2`,
/// `head - 4`, … down to 1, so the controller finds the last command both logs share within
/// twice the distance to it.
pub fn checkpoints(head: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut back = 1u64;
    while back < head && out.len() < MAX_CHECKPOINTS - 1 {
        out.push(head - back);
        back = back.saturating_mul(2);
    }
    out
}

/// Where the controller streams commands from at the start of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandPlan {
    /// Same log: stream after `cursor`.
    Continue { cursor: u64 },
    /// The controller's log is not the one the agent applied up to its head (its database was
    /// restored from a dump): the agent sets aside what it applied after `to` — the last
    /// command both logs share — remembering the nonces, the controller streams after `to`,
    /// and the agent applies only the commands whose nonce it has not applied already.
    Rebase { to: u64 },
}

/// Decides where commands resume. `agent` holds the head and the checkpoints the agent
/// reported, as (sequence, nonce); `nonce_at` gives the controller's nonce at a sequence, if
/// its log holds it; `log_end` is the last sequence of its log.
pub fn plan_commands(
    log_end: u64,
    head: AppliedHead,
    agent: &[(u64, u64)],
    nonce_at: impl Fn(u64) -> Option<u64>,
) -> CommandPlan {
    if head.seq == 0 {
        return CommandPlan::Continue { cursor: 0 };
    }
    if head.nonce == 0 {
        // Applied before nonces existed: only the sequence can tell.
        return if head.seq <= log_end {
            CommandPlan::Continue { cursor: head.seq }
        } else {
            CommandPlan::Rebase { to: log_end }
        };
    }
    if nonce_at(head.seq) == Some(head.nonce) {
        return CommandPlan::Continue { cursor: head.seq };
    }
    let to = agent
        .iter()
        .filter(|(seq, nonce)| *nonce != 0 && *seq < head.seq && nonce_at(*seq) == Some(*nonce))
        .map(|(seq, _)| *seq)
        .max()
        .unwrap_or(0);
    CommandPlan::Rebase { to }
}

#[cfg(test)]
mod tests;
