//! Commands the controller sends an agent through its per-agent command log. Each has a kind and
//! a JSON payload; the agent applies them idempotently in order and acknowledges cumulatively.

use serde::{Deserialize, Serialize};

use crate::appointments::AppointmentSnapshot;
use crate::config::SiteConfig;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerCommand {
    /// Replace the site configuration with this snapshot (skipped when the agent already has
    /// this or a newer revision).
    ApplyConfig(Box<SiteConfig>),
    /// An appointment of the site's current business day was booked, rescheduled (to or from
    /// today) or cancelled: its whole current state (kept only if its revision is newer than
    /// the agent's copy).
    UpsertAppointment(Box<AppointmentSnapshot>),
    /// Fetch the bulk appointment sync `sync_id` (the nightly job, a manual trigger) with the
    /// `FetchAppointments` RPC and replace the appointments of its days. The agent records the
    /// request and acknowledges at once; the transfer runs beside the session.
    SyncAppointments(SyncRequest),
    /// Apply one cross-site operation on a request (`transfers`): store or stage a copy,
    /// update a copy, delete one. Answered with a `REQUEST_OP_OUTCOME` event.
    ApplyOperation(Box<crate::transfers::ApplyOperation>),
    /// The staged ownership transfer or return is the target's: it becomes the master.
    CommitOperation(crate::transfers::Decision),
    /// The staged ownership transfer or return was cancelled or timed out: drop it.
    AbortOperation(crate::transfers::Decision),
    /// How an operation this site asked for ended (the source takes the ownership back when an
    /// ownership transfer or return did not succeed).
    OperationResult(crate::transfers::OperationResult),
    /// A `REQUEST_APPLY` withdrawn before the target acknowledged it (superseded or cancelled).
    Withdrawn(crate::transfers::Withdrawn),
}

pub const APPLY_CONFIG: &str = "APPLY_CONFIG";
pub const APPOINTMENT_UPSERT: &str = "APPOINTMENT_UPSERT";
pub const APPOINTMENTS_SYNC: &str = "APPOINTMENTS_SYNC";
pub const REQUEST_APPLY: &str = "REQUEST_APPLY";
pub const REQUEST_COMMIT: &str = "REQUEST_COMMIT";
pub const REQUEST_ABORT: &str = "REQUEST_ABORT";
pub const REQUEST_RESULT: &str = "REQUEST_RESULT";
pub const REQUEST_WITHDRAWN: &str = "REQUEST_WITHDRAWN";

/// The payload of `APPOINTMENTS_SYNC`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub sync_id: uuid::Uuid,
    /// Why it was requested: `scheduled` or `manual`.
    pub reason: String,
    pub requested_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandDecodeError {
    #[error("unknown command kind {0:?}")]
    UnknownKind(String),
    #[error("malformed {kind} payload: {message}")]
    Payload { kind: String, message: String },
}

impl ControllerCommand {
    pub fn kind(&self) -> &'static str {
        match self {
            ControllerCommand::ApplyConfig(_) => APPLY_CONFIG,
            ControllerCommand::UpsertAppointment(_) => APPOINTMENT_UPSERT,
            ControllerCommand::SyncAppointments(_) => APPOINTMENTS_SYNC,
            ControllerCommand::ApplyOperation(_) => REQUEST_APPLY,
            ControllerCommand::CommitOperation(_) => REQUEST_COMMIT,
            ControllerCommand::AbortOperation(_) => REQUEST_ABORT,
            ControllerCommand::OperationResult(_) => REQUEST_RESULT,
            ControllerCommand::Withdrawn(_) => REQUEST_WITHDRAWN,
        }
    }

    pub fn payload(&self) -> Vec<u8> {
        match self {
            ControllerCommand::ApplyConfig(c) => serde_json::to_vec(c).unwrap_or_default(),
            ControllerCommand::UpsertAppointment(a) => serde_json::to_vec(a).unwrap_or_default(),
            ControllerCommand::SyncAppointments(r) => serde_json::to_vec(r).unwrap_or_default(),
            ControllerCommand::ApplyOperation(o) => serde_json::to_vec(o).unwrap_or_default(),
            ControllerCommand::CommitOperation(d) | ControllerCommand::AbortOperation(d) => {
                serde_json::to_vec(d).unwrap_or_default()
            }
            ControllerCommand::OperationResult(r) => serde_json::to_vec(r).unwrap_or_default(),
            ControllerCommand::Withdrawn(w) => serde_json::to_vec(w).unwrap_or_default(),
        }
    }

    pub fn decode(kind: &str, payload: &[u8]) -> Result<Self, CommandDecodeError> {
        let bad = |e: serde_json::Error| CommandDecodeError::Payload {
            kind: kind.to_owned(),
            message: e.to_string(),
        };
        match kind {
            APPLY_CONFIG => {
                Ok(ControllerCommand::ApplyConfig(serde_json::from_slice(payload).map_err(bad)?))
            }
            APPOINTMENT_UPSERT => Ok(ControllerCommand::UpsertAppointment(
                serde_json::from_slice(payload).map_err(bad)?,
            )),
            APPOINTMENTS_SYNC => Ok(ControllerCommand::SyncAppointments(
                serde_json::from_slice(payload).map_err(bad)?,
            )),
            REQUEST_APPLY => {
                Ok(ControllerCommand::ApplyOperation(serde_json::from_slice(payload).map_err(bad)?))
            }
            REQUEST_COMMIT => Ok(ControllerCommand::CommitOperation(
                serde_json::from_slice(payload).map_err(bad)?,
            )),
            REQUEST_ABORT => {
                Ok(ControllerCommand::AbortOperation(serde_json::from_slice(payload).map_err(bad)?))
            }
            REQUEST_RESULT => Ok(ControllerCommand::OperationResult(
                serde_json::from_slice(payload).map_err(bad)?,
            )),
            REQUEST_WITHDRAWN => {
                Ok(ControllerCommand::Withdrawn(serde_json::from_slice(payload).map_err(bad)?))
            }
            other => Err(CommandDecodeError::UnknownKind(other.chars().take(80).collect())),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{NaiveDate, TimeZone, Utc};

    use super::*;
    use crate::appointments::AppointmentStatus;
    use crate::{AppointmentId, Code, SiteCode};

    fn snapshot() -> AppointmentSnapshot {
        AppointmentSnapshot {
            id: AppointmentId::new(),
            site: SiteCode::parse("SFO").expect("site"),
            service: Code::parse("ACC").expect("service"),
            queue: Some(Code::parse("accounts").expect("queue")),
            start: "2026-03-09T09:15".into(),
            starts_at: Utc.with_ymd_and_hms(2026, 3, 9, 16, 15, 0).unwrap(),
            local_day: NaiveDate::from_ymd_opt(2026, 3, 9).unwrap(),
            duration_minutes: 15,
            customer_name: "Ann".into(),
            customer_contact: Some("+1 555 0100".into()),
            notes: None,
            external_ref: Some("CRM-1".into()),
            status: AppointmentStatus::Booked,
            revision: 3,
            updated_at: Utc.with_ymd_and_hms(2026, 3, 9, 15, 0, 0).unwrap(),
        }
    }

    #[test]
    fn an_appointment_upsert_round_trips() {
        let cmd = ControllerCommand::UpsertAppointment(Box::new(snapshot()));
        assert_eq!(cmd.kind(), APPOINTMENT_UPSERT);
        assert_eq!(ControllerCommand::decode(cmd.kind(), &cmd.payload()), Ok(cmd));
    }

    #[test]
    fn a_sync_request_round_trips() {
        let cmd = ControllerCommand::SyncAppointments(SyncRequest {
            sync_id: uuid::Uuid::now_v7(),
            reason: "scheduled".into(),
            requested_at: Utc.with_ymd_and_hms(2026, 3, 9, 10, 0, 0).unwrap(),
        });
        assert_eq!(cmd.kind(), APPOINTMENTS_SYNC);
        assert_eq!(ControllerCommand::decode(cmd.kind(), &cmd.payload()), Ok(cmd));
        assert!(matches!(
            ControllerCommand::decode(APPOINTMENTS_SYNC, br#"{"sync_id":"nope"}"#),
            Err(CommandDecodeError::Payload { .. })
        ));
    }

    #[test]
    fn bad_payloads_and_kinds_are_typed_errors() {
        let mut wrong_status = serde_json::to_value(snapshot()).expect("json");
        wrong_status["status"] = "misplaced".into();
        let mut no_revision = serde_json::to_value(snapshot()).expect("json");
        no_revision.as_object_mut().expect("object").remove("revision");
        let mut bad_site = serde_json::to_value(snapshot()).expect("json");
        bad_site["site"] = "not a site code".into();
        for payload in [
            b"".to_vec(),
            b"{".to_vec(),
            b"[]".to_vec(),
            wrong_status.to_string().into_bytes(),
            no_revision.to_string().into_bytes(),
            bad_site.to_string().into_bytes(),
        ] {
            match ControllerCommand::decode(APPOINTMENT_UPSERT, &payload) {
                Err(CommandDecodeError::Payload { kind, .. }) => {
                    assert_eq!(kind, APPOINTMENT_UPSERT)
                }
                other => panic!("{:?} decoded as {other:?}", String::from_utf8_lossy(&payload)),
            }
        }
        assert_eq!(
            ControllerCommand::decode("APPOINTMENT_DELETE", b"{}"),
            Err(CommandDecodeError::UnknownKind("APPOINTMENT_DELETE".into()))
        );
    }
}
