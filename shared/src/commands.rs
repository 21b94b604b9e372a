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
    /// Upgrade the agent to a signed release (`AGENT_UPGRADE`): recorded and acknowledged at
    /// once; the agent verifies, downloads with `FetchRelease`, stages and switches in the
    /// background and reports with `AGENT_UPGRADE_STATUS` events.
    Upgrade(Box<UpgradeCommand>),
    /// Drop a staged or downloading upgrade of a rollout (`AGENT_UPGRADE_CANCEL`); no effect
    /// after the switch.
    CancelUpgrade(UpgradeCancel),
}

pub const APPLY_CONFIG: &str = "APPLY_CONFIG";
pub const APPOINTMENT_UPSERT: &str = "APPOINTMENT_UPSERT";
pub const APPOINTMENTS_SYNC: &str = "APPOINTMENTS_SYNC";
pub const REQUEST_APPLY: &str = "REQUEST_APPLY";
pub const REQUEST_COMMIT: &str = "REQUEST_COMMIT";
pub const REQUEST_ABORT: &str = "REQUEST_ABORT";
pub const REQUEST_RESULT: &str = "REQUEST_RESULT";
pub const REQUEST_WITHDRAWN: &str = "REQUEST_WITHDRAWN";
pub const AGENT_UPGRADE: &str = "AGENT_UPGRADE";
pub const AGENT_UPGRADE_CANCEL: &str = "AGENT_UPGRADE_CANCEL";

/// Longest health timeout an `AGENT_UPGRADE` may ask for (a day).
pub const MAX_HEALTH_TIMEOUT_S: u32 = 86_400;

/// The payload of `AGENT_UPGRADE`. Unknown fields are ignored (a newer controller may add
/// some); the manifest's own fields are checked by `check` (and its signature by the agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeCommand {
    pub rollout_id: uuid::Uuid,
    /// The signed release to run.
    pub release: crate::releases::ReleaseManifest,
    /// Whether a release older than the running version may be installed.
    pub allow_downgrade: bool,
    /// The end of the site's maintenance window: the agent switches only before it (and keeps
    /// the staged release for a later command otherwise).
    pub switch_before: chrono::DateTime<chrono::Utc>,
    /// How long the new binary has to come up healthy and connected; 0 = the agent's
    /// `upgrade_health_timeout_ms`.
    pub health_timeout_s: u32,
}

impl UpgradeCommand {
    /// The checks beyond the types: a manifest whose fields have their form
    /// (`ReleaseManifest::validate`: semantic version, known platform, 64 lowercase hex digits
    /// of SHA-256, a size, a well-formed key id and signature when present) and a bounded
    /// health timeout. Whether it is signed, and by whom, is the agent's judgement against its
    /// own keys (reported as `AGENT_UPGRADE_STATUS failed`).
    pub fn check(&self) -> Result<(), String> {
        self.release.validate().map_err(|e| format!("release: {e}"))?;
        if self.health_timeout_s > MAX_HEALTH_TIMEOUT_S {
            return Err(format!("health_timeout_s must be at most {MAX_HEALTH_TIMEOUT_S}"));
        }
        Ok(())
    }
}

/// The payload of `AGENT_UPGRADE_CANCEL`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeCancel {
    pub rollout_id: uuid::Uuid,
}

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
            ControllerCommand::Upgrade(_) => AGENT_UPGRADE,
            ControllerCommand::CancelUpgrade(_) => AGENT_UPGRADE_CANCEL,
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
            ControllerCommand::Upgrade(u) => serde_json::to_vec(u).unwrap_or_default(),
            ControllerCommand::CancelUpgrade(c) => serde_json::to_vec(c).unwrap_or_default(),
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
            AGENT_UPGRADE => {
                let cmd: UpgradeCommand = serde_json::from_slice(payload).map_err(bad)?;
                cmd.check().map_err(|message| CommandDecodeError::Payload {
                    kind: kind.to_owned(),
                    message,
                })?;
                Ok(ControllerCommand::Upgrade(Box::new(cmd)))
            }
            AGENT_UPGRADE_CANCEL => {
                Ok(ControllerCommand::CancelUpgrade(serde_json::from_slice(payload).map_err(bad)?))
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

    fn upgrade() -> UpgradeCommand {
        UpgradeCommand {
            rollout_id: uuid::Uuid::now_v7(),
            release: crate::releases::ReleaseManifest {
                version: "1.4.0".into(),
                platform: "x86_64-linux".into(),
                sha256: "ab".repeat(32),
                size: 1234,
                key_id: "0123456789abcdef".into(),
                signature: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==".into(),
                notes: "Faster kiosk".into(),
            },
            allow_downgrade: false,
            switch_before: Utc.with_ymd_and_hms(2026, 3, 9, 5, 0, 0).unwrap(),
            health_timeout_s: 120,
        }
    }

    #[test]
    fn upgrade_commands_round_trip() {
        let cmd = ControllerCommand::Upgrade(Box::new(upgrade()));
        assert_eq!(cmd.kind(), AGENT_UPGRADE);
        assert_eq!(ControllerCommand::decode(cmd.kind(), &cmd.payload()), Ok(cmd));
        let cancel =
            ControllerCommand::CancelUpgrade(UpgradeCancel { rollout_id: uuid::Uuid::now_v7() });
        assert_eq!(cancel.kind(), AGENT_UPGRADE_CANCEL);
        assert_eq!(ControllerCommand::decode(cancel.kind(), &cancel.payload()), Ok(cancel));
        // A newer controller's extra field is ignored.
        let mut newer = serde_json::to_value(upgrade()).expect("json");
        newer["later"] = true.into();
        assert!(ControllerCommand::decode(AGENT_UPGRADE, newer.to_string().as_bytes()).is_ok());
    }

    #[test]
    fn malformed_upgrade_commands_are_typed_errors() {
        let check = |payload: Vec<u8>, kind: &str| match ControllerCommand::decode(kind, &payload) {
            Err(CommandDecodeError::Payload { kind: k, .. }) => assert_eq!(k, kind),
            other => panic!("{:?} decoded as {other:?}", String::from_utf8_lossy(&payload)),
        };
        let mutated = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = serde_json::to_value(upgrade()).expect("json");
            f(&mut v);
            v.to_string().into_bytes()
        };
        for payload in [
            b"".to_vec(),
            b"{}".to_vec(),
            b"[]".to_vec(),
            mutated(&|v| v["rollout_id"] = "nope".into()),
            mutated(&|v| v["release"]["sha256"] = "xyz".into()),
            mutated(&|v| v["release"]["sha256"] = "g".repeat(64).into()),
            mutated(&|v| v["release"]["size"] = 0.into()),
            mutated(&|v| v["release"]["size"] = (-1).into()),
            mutated(&|v| v["release"]["version"] = "".into()),
            mutated(&|v| v["release"]["platform"] = "x".repeat(65).into()),
            mutated(&|v| v["release"]["signature"] = "not base64!".into()),
            mutated(&|v| v["release"]["key_id"] = "XYZ".into()),
            mutated(&|v| v["release"]["platform"] = "x86_64-amiga".into()),
            mutated(&|v| v["release"]["version"] = "one point four".into()),
            mutated(&|v| v["switch_before"] = "tomorrow".into()),
            mutated(&|v| v["health_timeout_s"] = (MAX_HEALTH_TIMEOUT_S + 1).into()),
            mutated(&|v| v["allow_downgrade"] = "yes".into()),
        ] {
            check(payload, AGENT_UPGRADE);
        }
        check(br#"{"rollout_id":42}"#.to_vec(), AGENT_UPGRADE_CANCEL);
        check(b"{}".to_vec(), AGENT_UPGRADE_CANCEL);
    }
}
