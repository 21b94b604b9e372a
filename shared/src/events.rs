//! Events an agent records in its outbox and streams to the controller. Each event is a stable
//! kind (e.g. `VISIT_CREATED`) plus a JSON payload; the kind set grows with the product, so the
//! controller stores kinds it does not know yet (from a newer agent mid-rollout) as long as the
//! frame is well formed.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::check_in::Attendance;
use crate::customer::Customer;
use crate::{AppointmentId, Code, VisitId};

/// Largest accepted event payload, in bytes.
pub const MAX_EVENT_PAYLOAD: usize = 64 * 1024;
/// Largest accepted kind name.
pub const MAX_EVENT_KIND: usize = 64;
pub const APPOINTMENTS_SYNCED: &str = "APPOINTMENTS_SYNCED";
pub const APPOINTMENTS_SYNC_FAILED: &str = "APPOINTMENTS_SYNC_FAILED";
pub const APPOINTMENT_STATUS: &str = "APPOINTMENT_STATUS";
pub const BRANCH_CLOSED: &str = "BRANCH_CLOSED";
pub const BRANCH_REOPENED: &str = "BRANCH_REOPENED";
pub const AGENT_UPGRADE_STATUS: &str = "AGENT_UPGRADE_STATUS";
pub const STAFF_LOGIN_LOCKED: &str = "STAFF_LOGIN_LOCKED";
/// Longest accepted `UpgradeStatus::reason`, in characters (the agent cuts longer ones).
pub const MAX_UPGRADE_REASON: usize = 1000;
/// Longest accepted version text in an `UpgradeStatus`.
pub const MAX_VERSION_TEXT: usize = 64;

/// A typed event produced by the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentEvent {
    VisitCreated(VisitCreated),
    /// Every later visit transition; the kind says which.
    Visit(VisitEventKind, VisitChanged),
    ServicePoint(ServicePointEventKind, ServicePointChanged),
    ConfigApplied(ConfigApplied),
    AppointmentsSynced(AppointmentsSynced),
    AppointmentSyncFailed(AppointmentSyncFailed),
    /// The branch's record of a customer's attendance of an appointment changed.
    AppointmentStatus(AppointmentStatusChanged),
    /// Staff closed part of a day at the branch (`closures`).
    BranchClosed(crate::closures::BranchClosed),
    BranchReopened(crate::closures::BranchReopened),
    /// A service request was created at the branch (`REQUEST_CREATED`) or its fields changed
    /// (`REQUEST_UPDATED`): its whole new state.
    Request(RequestEventKind, RequestChanged),
    /// The site asks for a cross-site operation on one of its requests (`transfers`).
    RequestOperation(crate::transfers::OperationRequested),
    /// The site's answer to a `REQUEST_APPLY` command.
    RequestOperationOutcome(crate::transfers::OperationOutcome),
    /// The site deleted a request (master or read-only copy).
    RequestDeleted(crate::transfers::RequestDeleted),
    /// Where an `AGENT_UPGRADE` stands at the agent (downloading, staged, switching, healthy,
    /// rolled back, failed).
    UpgradeStatus(UpgradeStatus),
    /// Repeated failed sign-ins locked a staff user or a source address at the branch.
    LoginLocked(LoginLocked),
}

/// What a sign-in lockout at a branch locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockedSubject {
    /// A user name (known at the branch or not).
    User,
    /// A source address on the branch LAN.
    Address,
}

/// `STAFF_LOGIN_LOCKED`: after `failures` failed sign-ins in a row, `name` (a user name or an
/// address) may not sign in before `until`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginLocked {
    pub subject: LockedSubject,
    pub name: String,
    pub failures: u32,
    pub until: DateTime<Utc>,
    pub at: DateTime<Utc>,
}

/// Longest user name or address a `STAFF_LOGIN_LOCKED` carries.
pub const MAX_LOCKED_NAME: usize = 64;

/// The phases an agent reports for an upgrade (`AGENT_UPGRADE_STATUS`). `healthy`,
/// `rolled_back` and `failed` end an upgrade; the others are progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradePhase {
    /// The artifact is being fetched (`FetchRelease`, resumed after a cut).
    Downloading,
    /// Verified and kept next to the running binary, waiting for the switch window.
    Staged,
    /// The agent stops its services and restarts on the new binary under a watchdog.
    Switching,
    /// The new binary runs, its session is established: the upgrade is done.
    Healthy,
    /// The new binary crashed or never became healthy: the previous one runs again.
    RolledBack,
    /// Refused or impossible (signature, digest, platform, downgrade, …); nothing replaced.
    Failed,
}

impl UpgradePhase {
    pub const ALL: [UpgradePhase; 6] = [
        Self::Downloading,
        Self::Staged,
        Self::Switching,
        Self::Healthy,
        Self::RolledBack,
        Self::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Downloading => "downloading",
            Self::Staged => "staged",
            Self::Switching => "switching",
            Self::Healthy => "healthy",
            Self::RolledBack => "rolled_back",
            Self::Failed => "failed",
        }
    }

    /// Whether the upgrade is over in this phase.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Healthy | Self::RolledBack | Self::Failed)
    }
}

/// The payload of `AGENT_UPGRADE_STATUS`: one step of an upgrade, sent through the outbox
/// (exactly once). Extra fields from a newer agent are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeStatus {
    /// The rollout whose `AGENT_UPGRADE` this answers.
    pub rollout_id: uuid::Uuid,
    /// The release's (target) version.
    pub version: String,
    /// The version the reporting process runs (the new one once healthy, the old one after a
    /// rollback).
    pub running_version: String,
    pub phase: UpgradePhase,
    /// Why it failed or was rolled back (at most `MAX_UPGRADE_REASON` characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

impl UpgradeStatus {
    /// The wire checks beyond the types: version texts present and short, the reason bounded.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [("version", &self.version), ("running_version", &self.running_version)] {
            if v.is_empty() || v.len() > MAX_VERSION_TEXT || v.chars().any(char::is_control) {
                return Err(format!(
                    "{name} must be 1-{MAX_VERSION_TEXT} characters without control characters"
                ));
            }
        }
        if self.reason.as_ref().is_some_and(|r| r.chars().count() > MAX_UPGRADE_REASON) {
            return Err(format!("reason is longer than {MAX_UPGRADE_REASON} characters"));
        }
        Ok(())
    }
}

/// The request lifecycle events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestEventKind {
    Created,
    Updated,
}

impl RequestEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestEventKind::Created => "REQUEST_CREATED",
            RequestEventKind::Updated => "REQUEST_UPDATED",
        }
    }
}

/// A request's state after a change at the branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestChanged {
    pub request_id: uuid::Uuid,
    pub human_id: String,
    pub request_type: Code,
    pub revision: u64,
    pub fields: crate::requests::Values,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisitCreated {
    pub visit_id: VisitId,
    pub ticket: String,
    pub service: Code,
    pub queue: Code,
    /// The site-local date the ticket is numbered in.
    pub business_day: NaiveDate,
    pub created_at: DateTime<Utc>,
    /// The visit's customer fields, present only when the site's configuration shares them
    /// with central (`Site::share_customer_data`); central statistics never need them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<Customer>,
}

/// The visit transitions after creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VisitEventKind {
    Called,
    Recalled,
    Serving,
    NoShow,
    Recycled,
    Parked,
    Transferred,
    Ended,
    Removed,
    ClosedAtEndOfDay,
}

impl VisitEventKind {
    pub const ALL: [VisitEventKind; 10] = [
        Self::Called,
        Self::Recalled,
        Self::Serving,
        Self::NoShow,
        Self::Recycled,
        Self::Parked,
        Self::Transferred,
        Self::Ended,
        Self::Removed,
        Self::ClosedAtEndOfDay,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Called => "VISIT_CALLED",
            Self::Recalled => "VISIT_RECALLED",
            Self::Serving => "VISIT_SERVING",
            Self::NoShow => "VISIT_NO_SHOW",
            Self::Recycled => "VISIT_RECYCLED",
            Self::Parked => "VISIT_PARKED",
            Self::Transferred => "VISIT_TRANSFERRED",
            Self::Ended => "VISIT_ENDED",
            Self::Removed => "VISIT_REMOVED",
            Self::ClosedAtEndOfDay => "VISIT_CLOSED_AT_END_OF_DAY",
        }
    }
}

/// What central statistics need of a visit transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisitChanged {
    pub visit_id: VisitId,
    pub ticket: String,
    pub service: Code,
    /// The visit's queue after the transition.
    pub queue: Code,
    pub business_day: NaiveDate,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter: Option<Code>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staff: Option<Code>,
    /// Where the visit waits now (recycle, park, transfer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<crate::visits::Location>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<crate::visits::Outcome>,
    pub at: DateTime<Utc>,
    /// On a call: how long it waited where it was called from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_ms: Option<i64>,
    /// On an end: how long it was served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_ms: Option<i64>,
    pub recalls: u32,
    /// Free-text marks and delivered services recorded when ending a visit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub marks: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServicePointEventKind {
    Opened,
    Closed,
    StaffLoggedIn,
    StaffLoggedOut,
}

impl ServicePointEventKind {
    pub const ALL: [ServicePointEventKind; 4] =
        [Self::Opened, Self::Closed, Self::StaffLoggedIn, Self::StaffLoggedOut];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Opened => "SERVICE_POINT_OPENED",
            Self::Closed => "SERVICE_POINT_CLOSED",
            Self::StaffLoggedIn => "STAFF_LOGGED_IN",
            Self::StaffLoggedOut => "STAFF_LOGGED_OUT",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePointChanged {
    pub service_point: Code,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staff: Option<Code>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigApplied {
    pub revision: u64,
    pub previous_revision: u64,
}

/// A bulk appointment sync is in force at the branch: the appointments of `from_day` to
/// `to_day` (site-local, inclusive) were replaced by the sync's snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppointmentsSynced {
    pub sync_id: uuid::Uuid,
    pub from_day: NaiveDate,
    pub to_day: NaiveDate,
    pub appointments: u64,
    pub chunks: u32,
    /// Transfers that were cut and resumed before the set was complete.
    pub resumed: u32,
    pub at: DateTime<Utc>,
}

/// A bulk appointment sync was refused by the branch (a chunk failed its checksum or did not
/// decode, …); the previous set stays in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppointmentSyncFailed {
    pub sync_id: uuid::Uuid,
    pub error: String,
    pub at: DateTime<Utc>,
}

/// An appointment's attendance changed at the branch (check-in, call, completion, no-show).
/// Central applies it to its copy of the appointment in the ingest transaction.
/// Extra fields (from a newer agent) are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppointmentStatusChanged {
    pub appointment_id: AppointmentId,
    pub status: Attendance,
    /// The visit the check-in created (none for a no-show by the sweep).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visit_id: Option<VisitId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    /// The appointment revision the branch held when it recorded the change: central compares
    /// it with its own to detect a reschedule the branch had not seen.
    pub revision: u64,
    pub at: DateTime<Utc>,
}

impl AgentEvent {
    pub fn kind(&self) -> &'static str {
        match self {
            AgentEvent::VisitCreated(_) => "VISIT_CREATED",
            AgentEvent::Visit(kind, _) => kind.as_str(),
            AgentEvent::ServicePoint(kind, _) => kind.as_str(),
            AgentEvent::ConfigApplied(_) => "CONFIG_APPLIED",
            AgentEvent::AppointmentsSynced(_) => APPOINTMENTS_SYNCED,
            AgentEvent::AppointmentSyncFailed(_) => APPOINTMENTS_SYNC_FAILED,
            AgentEvent::AppointmentStatus(_) => APPOINTMENT_STATUS,
            AgentEvent::BranchClosed(_) => BRANCH_CLOSED,
            AgentEvent::BranchReopened(_) => BRANCH_REOPENED,
            AgentEvent::Request(kind, _) => kind.as_str(),
            AgentEvent::RequestOperation(_) => crate::transfers::REQUEST_OPERATION,
            AgentEvent::RequestOperationOutcome(_) => crate::transfers::REQUEST_OP_OUTCOME,
            AgentEvent::RequestDeleted(_) => crate::transfers::REQUEST_DELETED,
            AgentEvent::UpgradeStatus(_) => AGENT_UPGRADE_STATUS,
            AgentEvent::LoginLocked(_) => STAFF_LOGIN_LOCKED,
        }
    }

    /// The JSON payload (the variant's fields).
    pub fn payload(&self) -> Vec<u8> {
        let value = match self {
            AgentEvent::VisitCreated(e) => serde_json::to_vec(e),
            AgentEvent::Visit(_, e) => serde_json::to_vec(e),
            AgentEvent::ServicePoint(_, e) => serde_json::to_vec(e),
            AgentEvent::ConfigApplied(e) => serde_json::to_vec(e),
            AgentEvent::AppointmentsSynced(e) => serde_json::to_vec(e),
            AgentEvent::AppointmentSyncFailed(e) => serde_json::to_vec(e),
            AgentEvent::AppointmentStatus(e) => serde_json::to_vec(e),
            AgentEvent::BranchClosed(e) => serde_json::to_vec(e),
            AgentEvent::BranchReopened(e) => serde_json::to_vec(e),
            AgentEvent::Request(_, e) => serde_json::to_vec(e),
            AgentEvent::RequestOperation(e) => serde_json::to_vec(e),
            AgentEvent::RequestOperationOutcome(e) => serde_json::to_vec(e),
            AgentEvent::RequestDeleted(e) => serde_json::to_vec(e),
            AgentEvent::UpgradeStatus(e) => serde_json::to_vec(e),
            AgentEvent::LoginLocked(e) => serde_json::to_vec(e),
        };
        // Serializing plain structs of strings and numbers cannot fail.
        value.unwrap_or_default()
    }

    /// Decodes a known kind; `Ok(None)` for a well-formed kind this version does not know.
    pub fn decode(kind: &str, payload: &[u8]) -> Result<Option<Self>, WireEventError> {
        let bad = |e: serde_json::Error| WireEventError::Payload(e.to_string());
        if let Some(k) = VisitEventKind::ALL.into_iter().find(|k| k.as_str() == kind) {
            return Ok(Some(AgentEvent::Visit(k, serde_json::from_slice(payload).map_err(bad)?)));
        }
        if let Some(k) = ServicePointEventKind::ALL.into_iter().find(|k| k.as_str() == kind) {
            return Ok(Some(AgentEvent::ServicePoint(
                k,
                serde_json::from_slice(payload).map_err(bad)?,
            )));
        }
        Ok(Some(match kind {
            "VISIT_CREATED" => {
                AgentEvent::VisitCreated(serde_json::from_slice(payload).map_err(bad)?)
            }
            "CONFIG_APPLIED" => {
                AgentEvent::ConfigApplied(serde_json::from_slice(payload).map_err(bad)?)
            }
            APPOINTMENTS_SYNCED => {
                AgentEvent::AppointmentsSynced(serde_json::from_slice(payload).map_err(bad)?)
            }
            APPOINTMENTS_SYNC_FAILED => {
                AgentEvent::AppointmentSyncFailed(serde_json::from_slice(payload).map_err(bad)?)
            }
            APPOINTMENT_STATUS => {
                let e: AppointmentStatusChanged = serde_json::from_slice(payload).map_err(bad)?;
                if e.ticket.as_ref().is_some_and(|t| t.is_empty() || t.len() > 32) {
                    return Err(WireEventError::Payload("ticket must be 1-32 characters".into()));
                }
                AgentEvent::AppointmentStatus(e)
            }
            BRANCH_CLOSED => {
                let e: crate::closures::BranchClosed =
                    serde_json::from_slice(payload).map_err(bad)?;
                if e.closure.from >= e.closure.to
                    || e.closure.reason.chars().count() > crate::closures::MAX_REASON
                {
                    return Err(WireEventError::Payload("not a valid closure".into()));
                }
                if e.closure.beyond_horizon_of(e.at) {
                    return Err(WireEventError::Payload(format!(
                        "the closure starts or ends more than {} days after it was made",
                        crate::closures::MAX_HORIZON_DAYS
                    )));
                }
                AgentEvent::BranchClosed(e)
            }
            "REQUEST_CREATED" => AgentEvent::Request(
                RequestEventKind::Created,
                serde_json::from_slice(payload).map_err(bad)?,
            ),
            "REQUEST_UPDATED" => AgentEvent::Request(
                RequestEventKind::Updated,
                serde_json::from_slice(payload).map_err(bad)?,
            ),
            BRANCH_REOPENED => {
                AgentEvent::BranchReopened(serde_json::from_slice(payload).map_err(bad)?)
            }
            crate::transfers::REQUEST_OPERATION => {
                AgentEvent::RequestOperation(serde_json::from_slice(payload).map_err(bad)?)
            }
            crate::transfers::REQUEST_OP_OUTCOME => {
                AgentEvent::RequestOperationOutcome(serde_json::from_slice(payload).map_err(bad)?)
            }
            crate::transfers::REQUEST_DELETED => {
                AgentEvent::RequestDeleted(serde_json::from_slice(payload).map_err(bad)?)
            }
            AGENT_UPGRADE_STATUS => {
                let e: UpgradeStatus = serde_json::from_slice(payload).map_err(bad)?;
                e.check().map_err(WireEventError::Payload)?;
                AgentEvent::UpgradeStatus(e)
            }
            STAFF_LOGIN_LOCKED => {
                let e: LoginLocked = serde_json::from_slice(payload).map_err(bad)?;
                if e.name.is_empty() || e.name.len() > MAX_LOCKED_NAME || e.until < e.at {
                    return Err(WireEventError::Payload("not a valid sign-in lockout".into()));
                }
                AgentEvent::LoginLocked(e)
            }
            _ => return Ok(None),
        }))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireEventError {
    #[error("event kind {0:?} is not an upper-case identifier of at most 64 characters")]
    Kind(String),
    #[error("event payload is larger than {MAX_EVENT_PAYLOAD} bytes")]
    TooLarge,
    #[error("event payload is not a JSON object: {0}")]
    Payload(String),
}

/// Checks an event as it arrives from the wire: a well-formed kind and a JSON object payload
/// within the size limit; known kinds must also decode.
pub fn validate_wire_event(kind: &str, payload: &[u8]) -> Result<(), WireEventError> {
    let kind_ok = !kind.is_empty()
        && kind.len() <= MAX_EVENT_KIND
        && kind.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if !kind_ok {
        return Err(WireEventError::Kind(kind.chars().take(80).collect()));
    }
    if payload.len() > MAX_EVENT_PAYLOAD {
        return Err(WireEventError::TooLarge);
    }
    match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(serde_json::Value::Object(_)) => {}
        Ok(_) => return Err(WireEventError::Payload("not an object".into())),
        Err(e) => return Err(WireEventError::Payload(e.to_string())),
    }
    AgentEvent::decode(kind, payload).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_wire_checks() {
        let ev = AgentEvent::ConfigApplied(ConfigApplied { revision: 3, previous_revision: 2 });
        assert_eq!(AgentEvent::decode(ev.kind(), &ev.payload()).unwrap(), Some(ev.clone()));
        assert!(validate_wire_event(ev.kind(), &ev.payload()).is_ok());
        assert!(validate_wire_event("FUTURE_KIND", b"{}").is_ok());
        let check = |kind: &str, payload: &[u8]| validate_wire_event(kind, payload).unwrap_err();
        assert!(matches!(check("", b"{}"), WireEventError::Kind(_)));
        assert!(matches!(check("lower", b"{}"), WireEventError::Kind(_)));
        assert!(matches!(check("X", b"[1]"), WireEventError::Payload(_)));
        assert!(matches!(check("X", b"{not json"), WireEventError::Payload(_)));
        assert!(matches!(check("CONFIG_APPLIED", b"{}"), WireEventError::Payload(_)));
        assert!(matches!(
            check(APPOINTMENTS_SYNCED, br#"{"sync_id":"x"}"#),
            WireEventError::Payload(_)
        ));
        let synced = AgentEvent::AppointmentsSynced(AppointmentsSynced {
            sync_id: uuid::Uuid::now_v7(),
            from_day: NaiveDate::from_ymd_opt(2026, 3, 9).expect("date"),
            to_day: NaiveDate::from_ymd_opt(2026, 3, 10).expect("date"),
            appointments: 2,
            chunks: 1,
            resumed: 0,
            at: DateTime::from_timestamp(1_800_000_000, 0).expect("time"),
        });
        assert_eq!(AgentEvent::decode(synced.kind(), &synced.payload()).unwrap(), Some(synced));
        // A closure more than 366 days after it was made never reaches central's closures.
        let closed = |day: &str| {
            format!(
                r#"{{"id":"{}","day":"{day}","from":"08:00","to":"09:00","reason":"x","at":"2026-03-09T09:00:00Z"}}"#,
                uuid::Uuid::now_v7()
            )
        };
        assert!(validate_wire_event(BRANCH_CLOSED, closed("2027-03-09").as_bytes()).is_ok());
        let far = validate_wire_event(BRANCH_CLOSED, closed("2027-03-12").as_bytes());
        assert!(matches!(far, Err(WireEventError::Payload(m)) if m.contains("366 days")));
        let request = AgentEvent::Request(
            RequestEventKind::Updated,
            RequestChanged {
                request_id: uuid::Uuid::now_v7(),
                human_id: "SFO-000001".into(),
                request_type: Code::parse("REPAIR").expect("code"),
                revision: 2,
                fields: [("summary".to_owned(), serde_json::json!("Wobbly leg"))].into(),
                at: DateTime::from_timestamp(1_800_000_000, 0).expect("time"),
            },
        );
        assert_eq!(request.kind(), "REQUEST_UPDATED");
        assert_eq!(AgentEvent::decode(request.kind(), &request.payload()).unwrap(), Some(request));
        assert!(matches!(
            check("REQUEST_CREATED", br#"{"request_id":"x"}"#),
            WireEventError::Payload(_)
        ));
        let big = format!("{{\"a\":\"{}\"}}", "x".repeat(MAX_EVENT_PAYLOAD));
        assert!(matches!(check("X", big.as_bytes()), WireEventError::TooLarge));
    }

    #[test]
    fn visit_created_carries_a_customer_only_when_given_one() {
        let mut created = VisitCreated {
            visit_id: VisitId::new(),
            ticket: "A001".into(),
            service: Code::parse("GEN").expect("code"),
            queue: Code::parse("general").expect("code"),
            business_day: NaiveDate::from_ymd_opt(2026, 11, 2).expect("date"),
            created_at: DateTime::from_timestamp(1_800_000_000, 0).expect("time"),
            customer: None,
        };
        let without = AgentEvent::VisitCreated(created.clone()).payload();
        let json: serde_json::Value = serde_json::from_slice(&without).expect("json");
        assert!(json.get("customer").is_none(), "{json}");
        // Events from agents that predate customer fields decode unchanged.
        assert_eq!(
            AgentEvent::decode("VISIT_CREATED", &without).expect("decode"),
            Some(AgentEvent::VisitCreated(created.clone()))
        );
        created.customer = Some(Customer { name: Some("Ada".into()), ..Default::default() });
        let with = AgentEvent::VisitCreated(created.clone());
        assert!(validate_wire_event(with.kind(), &with.payload()).is_ok());
        assert_eq!(AgentEvent::decode(with.kind(), &with.payload()).expect("decode"), Some(with));
    }

    #[test]
    fn appointment_status_events_round_trip_and_are_checked_on_the_wire() {
        let ev = AgentEvent::AppointmentStatus(AppointmentStatusChanged {
            appointment_id: "01937a4e-1d2c-7000-8000-000000000001".parse().expect("id"),
            status: Attendance::Arrived,
            visit_id: Some(VisitId::new()),
            ticket: Some("B101".into()),
            revision: 2,
            at: DateTime::from_timestamp(1_800_000_000, 0).expect("time"),
        });
        assert_eq!(ev.kind(), "APPOINTMENT_STATUS");
        assert!(validate_wire_event(ev.kind(), &ev.payload()).is_ok());
        assert_eq!(AgentEvent::decode(ev.kind(), &ev.payload()).expect("decode"), Some(ev));
        let check = |payload: &str| {
            assert!(
                matches!(
                    validate_wire_event(APPOINTMENT_STATUS, payload.as_bytes()),
                    Err(WireEventError::Payload(_))
                ),
                "{payload}"
            );
        };
        let id = "01937a4e-1d2c-7000-8000-000000000001";
        let at = "2027-01-15T08:00:00Z";
        check("{}");
        check(&format!(r#"{{"appointment_id":"x","status":"arrived","revision":1,"at":"{at}"}}"#));
        check(&format!(r#"{{"appointment_id":"{id}","status":"lost","revision":1,"at":"{at}"}}"#));
        check(&format!(
            r#"{{"appointment_id":"{id}","status":"called","revision":-1,"at":"{at}"}}"#
        ));
        check(&format!(
            r#"{{"appointment_id":"{id}","status":"called","revision":1,"at":"{at}","ticket":""}}"#
        ));
        // A sweep's no-show has no visit; a newer agent's extra field is accepted.
        let ok = format!(
            r#"{{"appointment_id":"{id}","status":"no_show","revision":1,"at":"{at}","later":true}}"#
        );
        assert!(validate_wire_event(APPOINTMENT_STATUS, ok.as_bytes()).is_ok());
    }

    #[test]
    fn upgrade_status_events_round_trip_and_are_checked_on_the_wire() {
        let status = UpgradeStatus {
            rollout_id: uuid::Uuid::now_v7(),
            version: "1.2.0".into(),
            running_version: "1.1.0".into(),
            phase: UpgradePhase::RolledBack,
            reason: Some("exited with status 3 before becoming healthy".into()),
            at: DateTime::from_timestamp(1_800_000_000, 0).expect("time"),
        };
        let ev = AgentEvent::UpgradeStatus(status.clone());
        assert_eq!(ev.kind(), AGENT_UPGRADE_STATUS);
        let json: serde_json::Value = serde_json::from_slice(&ev.payload()).expect("json");
        assert_eq!(json["phase"], "rolled_back");
        assert!(validate_wire_event(ev.kind(), &ev.payload()).is_ok());
        assert_eq!(AgentEvent::decode(ev.kind(), &ev.payload()).expect("decode"), Some(ev));
        for phase in UpgradePhase::ALL {
            let v = serde_json::to_value(phase).expect("json");
            assert_eq!(v, phase.as_str());
        }
        let bad = |mutate: &dyn Fn(&mut serde_json::Value)| {
            let mut v = serde_json::to_value(&status).expect("json");
            mutate(&mut v);
            let payload = v.to_string();
            assert!(
                matches!(
                    validate_wire_event(AGENT_UPGRADE_STATUS, payload.as_bytes()),
                    Err(WireEventError::Payload(_))
                ),
                "{payload}"
            );
        };
        bad(&|v| v["phase"] = "exploded".into());
        bad(&|v| v["rollout_id"] = "not-a-uuid".into());
        bad(&|v| v["version"] = "".into());
        bad(&|v| v["running_version"] = "x".repeat(MAX_VERSION_TEXT + 1).into());
        bad(&|v| v["reason"] = "r".repeat(MAX_UPGRADE_REASON + 1).into());
        bad(&|v| {
            v.as_object_mut().expect("object").remove("at");
        });
        // A newer agent's extra field is accepted; no reason is fine.
        let mut newer = serde_json::to_value(&status).expect("json");
        newer["later"] = true.into();
        newer.as_object_mut().expect("object").remove("reason");
        assert!(validate_wire_event(AGENT_UPGRADE_STATUS, newer.to_string().as_bytes()).is_ok());
    }
}
