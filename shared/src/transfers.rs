//! Cross-site operations on service requests: the messages of the distribution
//! protocol and its vocabulary. Sites never talk to each other; every operation goes through
//! the controller's ledger as an event from the source's outbox and a command in the
//! target's command log, so each hop is exactly once in effect.
//!
//! Ownership moves in two phases so that a request always has exactly one master, or is in
//! flight under one ledger entry:
//! 1. the master site gives the ownership up and records `REQUEST_OPERATION` in the same
//!    transaction (its copy turns read-only, `transfer_status` Pending);
//! 2. the controller records the operation in its ledger (the request is now in flight under
//!    it) and sends `REQUEST_APPLY` to the target;
//! 3. the target checks and stages the request (not yet master) and answers
//!    `REQUEST_OP_OUTCOME`;
//! 4. the controller decides in the transaction that ingests the outcome: staged → the
//!    ownership is the target's (`REQUEST_COMMIT` to the target, `REQUEST_RESULT` success to
//!    the source); refused, timed out or cancelled → the ownership goes back to the source
//!    (`REQUEST_RESULT` failure; `REQUEST_ABORT` to a target that staged it after all).
//!
//! Copies (data only, broadcasts, updates) are one phase: the target stores a read-only copy
//! and answers; an independent copy becomes a new request, its own master, at the target.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{Code, SiteCode};
use crate::requests::Values;

pub const REQUEST_OPERATION: &str = "REQUEST_OPERATION";
pub const REQUEST_OP_OUTCOME: &str = "REQUEST_OP_OUTCOME";
pub const REQUEST_DELETED: &str = "REQUEST_DELETED";

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Transfer,
    Update,
    Return,
    Delete,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Transfer => "transfer",
            OpKind::Update => "update",
            OpKind::Return => "return",
            OpKind::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "transfer" => OpKind::Transfer,
            "update" => OpKind::Update,
            "return" => OpKind::Return,
            "delete" => OpKind::Delete,
            _ => return None,
        })
    }
}

/// How a transfer treats the ownership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferMode {
    /// The target becomes the master; the source keeps a read-only copy or deletes its copy
    /// (the mapping's `source_copy`).
    Ownership,
    /// The target gets a read-only copy; the source stays master.
    DataOnly,
    /// The target gets a new, unlinked request of its own.
    IndependentCopy,
}

impl TransferMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferMode::Ownership => "ownership",
            TransferMode::DataOnly => "data_only",
            TransferMode::IndependentCopy => "independent_copy",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ownership" => TransferMode::Ownership,
            "data_only" => TransferMode::DataOnly,
            "independent_copy" => TransferMode::IndependentCopy,
            _ => return None,
        })
    }
}

/// When a master's changes reach a read-only copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdatePolicy {
    #[default]
    Immediately,
    Hourly,
    Daily,
    OnReturn,
    Never,
}

impl UpdatePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdatePolicy::Immediately => "immediately",
            UpdatePolicy::Hourly => "hourly",
            UpdatePolicy::Daily => "daily",
            UpdatePolicy::OnReturn => "on_return",
            UpdatePolicy::Never => "never",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "immediately" => UpdatePolicy::Immediately,
            "hourly" => UpdatePolicy::Hourly,
            "daily" => UpdatePolicy::Daily,
            "on_return" => UpdatePolicy::OnReturn,
            "never" => UpdatePolicy::Never,
            _ => return None,
        })
    }
}

/// Where an operation goes, as the source names it. Follow-the-sun chains are resolved at the
/// source (it knows its place in the chain); groups and "every other site" by the controller,
/// which knows the sites.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpTarget {
    Site(SiteCode),
    Group(String),
    AllSites,
}

/// A request's transferable state: what a target needs to hold a copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestState {
    pub request_id: Uuid,
    pub human_id: String,
    pub request_type: Code,
    pub fields: Values,
    pub revision: u64,
    pub created_at: DateTime<Utc>,
    /// Every move so far, oldest first.
    #[serde(default)]
    pub history: Vec<Move>,
}

/// One move of a request, as its mapping history shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub at: DateTime<Utc>,
    pub op_id: Uuid,
    pub kind: OpKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<TransferMode>,
    pub from_site: SiteCode,
    pub to_site: SiteCode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping: Option<Code>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<Code>,
}

/// `REQUEST_OPERATION`: a site asks for an operation on one of its requests. For an ownership
/// transfer or a return the site has already given the ownership up in the same transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationRequested {
    pub op_id: Uuid,
    pub kind: OpKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<TransferMode>,
    pub target: OpTarget,
    /// Mapping the target applies (source type → its type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping: Option<Code>,
    pub pool: Code,
    #[serde(default)]
    pub update: UpdatePolicy,
    /// The rule that fired, if a rule did (absent: a person or an integration asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<Code>,
    /// The request as the source holds it (its history includes this move for transfers).
    pub request: RequestState,
    /// Whether the source keeps a read-only copy after an ownership transfer.
    #[serde(default = "yes")]
    pub source_keeps_copy: bool,
    pub at: DateTime<Utc>,
}

fn yes() -> bool {
    true
}

/// What the target did with a `REQUEST_APPLY`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// Stored (copies, updates, deletes) or staged awaiting the controller's commit
    /// (ownership transfers and returns). `request_id` / `human_id` are the target's
    /// (different from the source's for an independent copy or a duplicate given a new id).
    Applied { request_id: Uuid, human_id: String },
    /// Refused: the reason, and whether trying again later may succeed (e.g. the target has
    /// not received the request type yet).
    Rejected { reason: String, retryable: bool },
}

/// `REQUEST_OP_OUTCOME`: the target's answer to one `REQUEST_APPLY`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationOutcome {
    pub op_id: Uuid,
    /// The attempt answered (the ledger retries with a new attempt number).
    pub attempt: u32,
    pub outcome: Outcome,
    pub at: DateTime<Utc>,
}

/// `REQUEST_DELETED`: a site deleted a request (its master, which deletes its copies down the
/// chain, or a read-only copy alone), by a person, a rule or a delete operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestDeleted {
    pub request_id: Uuid,
    pub human_id: String,
    pub was_master: bool,
    /// The delete operation applied, when this deletion answers one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_id: Option<Uuid>,
    pub at: DateTime<Utc>,
}

/// `REQUEST_APPLY`: the controller asks a target site to apply one operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyOperation {
    pub op_id: Uuid,
    pub attempt: u32,
    pub kind: OpKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<TransferMode>,
    pub source_site: SiteCode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping: Option<Code>,
    /// The request's state at the source (in the source's type; the target maps it).
    pub request: RequestState,
}

/// `REQUEST_RESULT`: how an operation a site asked for ended. For an ownership transfer or a
/// return that did not succeed, the source takes the ownership back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationResult {
    pub op_id: Uuid,
    pub request_id: Uuid,
    pub target_site: SiteCode,
    pub status: ResultStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_request_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// After a successful ownership transfer: whether the source keeps its read-only copy.
    #[serde(default = "yes")]
    pub keep_copy: bool,
}

/// The source's `transfer_status` after a result (DSO's vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultStatus {
    Success,
    Failure,
    Timeout,
    Cancelled,
}

impl ResultStatus {
    /// As shown in `transfer_status`.
    pub fn label(self) -> &'static str {
        match self {
            ResultStatus::Success => "Success",
            ResultStatus::Failure => "Failure",
            ResultStatus::Timeout => "Timeout",
            ResultStatus::Cancelled => "Cancelled",
        }
    }
}

/// `REQUEST_COMMIT` / `REQUEST_ABORT`: the controller's decision on a staged ownership
/// transfer or return.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub op_id: Uuid,
    pub request_id: Uuid,
}

/// `REQUEST_WITHDRAWN`: what a superseded or cancelled `REQUEST_APPLY` is rewritten to in the
/// command log before the target acknowledged it (the target records it and does nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withdrawn {
    pub op_id: Uuid,
    pub reason: String,
}

/// Immediate reversals (a move X→Y directly followed by Y→X) between `a` and `b` in a
/// request's history: what the bounce limit counts.
pub fn bounces(history: &[Move], a: &SiteCode, b: &SiteCode) -> u32 {
    fn pair(m: &Move) -> (&SiteCode, &SiteCode) {
        (&m.from_site, &m.to_site)
    }
    history
        .windows(2)
        .filter(|w| {
            let (f0, t0) = pair(&w[0]);
            let (f1, t1) = pair(&w[1]);
            f0 == t1 && t0 == f1 && ((f0 == a && t0 == b) || (f0 == b && t0 == a))
        })
        .count() as u32
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn mv(from: &str, to: &str) -> Move {
        Move {
            at: Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap(),
            op_id: Uuid::now_v7(),
            kind: OpKind::Transfer,
            mode: Some(TransferMode::Ownership),
            from_site: SiteCode::parse(from).unwrap(),
            to_site: SiteCode::parse(to).unwrap(),
            mapping: None,
            rule: None,
        }
    }

    #[test]
    fn bounces_count_immediate_reversals_only() {
        let s = |c: &str| SiteCode::parse(c).unwrap();
        let check = |moves: &[(&str, &str)], expected: u32| {
            let h: Vec<Move> = moves.iter().map(|(f, t)| mv(f, t)).collect();
            assert_eq!(bounces(&h, &s("SFO"), &s("CHI")), expected, "{moves:?}");
        };
        check(&[], 0);
        check(&[("SFO", "CHI")], 0);
        check(&[("SFO", "CHI"), ("CHI", "SFO")], 1);
        check(&[("SFO", "CHI"), ("CHI", "SFO"), ("SFO", "CHI")], 2);
        // Follow the sun passes through both sites every day without bouncing.
        check(&[("SFO", "TYO"), ("TYO", "PAR"), ("PAR", "SFO"), ("SFO", "CHI")], 0);
        check(&[("TYO", "PAR"), ("PAR", "TYO")], 0);
    }

    #[test]
    fn messages_round_trip_as_json() {
        let state = RequestState {
            request_id: Uuid::now_v7(),
            human_id: "SFO-000001".into(),
            request_type: Code::parse("REPAIR").unwrap(),
            fields: Values::new(),
            revision: 2,
            created_at: Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap(),
            history: vec![mv("SFO", "CHI")],
        };
        let op = OperationRequested {
            op_id: Uuid::now_v7(),
            kind: OpKind::Transfer,
            mode: Some(TransferMode::Ownership),
            target: OpTarget::Site(SiteCode::parse("CHI").unwrap()),
            mapping: Some(Code::parse("REPAIR-CHI").unwrap()),
            pool: Code::parse("default").unwrap(),
            update: UpdatePolicy::Hourly,
            rule: None,
            request: state,
            source_keeps_copy: true,
            at: Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap(),
        };
        let json = serde_json::to_string(&op).unwrap();
        assert_eq!(serde_json::from_str::<OperationRequested>(&json).unwrap(), op);
        let outcome = Outcome::Rejected { reason: "unknown type".into(), retryable: true };
        let json = serde_json::to_value(&outcome).unwrap();
        assert_eq!(json["result"], "rejected");
        assert!(serde_json::from_str::<OpTarget>(r#"{"moon": 1}"#).is_err());
    }
}
