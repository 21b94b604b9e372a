//! Events an agent records in its outbox and streams to the controller. Each event is a stable
//! kind (e.g. `VISIT_CREATED`) plus a JSON payload; the kind set grows with the product, so the
//! controller stores kinds it does not know yet (from a newer agent mid-rollout) as long as the
//! frame is well formed.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::{Code, VisitId};

/// Largest accepted event payload, in bytes.
pub const MAX_EVENT_PAYLOAD: usize = 64 * 1024;
/// Largest accepted kind name.
pub const MAX_EVENT_KIND: usize = 64;

/// A typed event produced by the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentEvent {
    VisitCreated(VisitCreated),
    ConfigApplied(ConfigApplied),
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigApplied {
    pub revision: u64,
    pub previous_revision: u64,
}

impl AgentEvent {
    pub fn kind(&self) -> &'static str {
        match self {
            AgentEvent::VisitCreated(_) => "VISIT_CREATED",
            AgentEvent::ConfigApplied(_) => "CONFIG_APPLIED",
        }
    }

    /// The JSON payload (the variant's fields).
    pub fn payload(&self) -> Vec<u8> {
        let value = match self {
            AgentEvent::VisitCreated(e) => serde_json::to_vec(e),
            AgentEvent::ConfigApplied(e) => serde_json::to_vec(e),
        };
        // Serializing plain structs of strings and numbers cannot fail.
        value.unwrap_or_default()
    }

    /// Decodes a known kind; `Ok(None)` for a well-formed kind this version does not know.
    pub fn decode(kind: &str, payload: &[u8]) -> Result<Option<Self>, WireEventError> {
        let bad = |e: serde_json::Error| WireEventError::Payload(e.to_string());
        Ok(Some(match kind {
            "VISIT_CREATED" => {
                AgentEvent::VisitCreated(serde_json::from_slice(payload).map_err(bad)?)
            }
            "CONFIG_APPLIED" => {
                AgentEvent::ConfigApplied(serde_json::from_slice(payload).map_err(bad)?)
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
        && kind
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
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
        let ev = AgentEvent::ConfigApplied(ConfigApplied {
            revision: 3,
            previous_revision: 2,
        });
        assert_eq!(
            AgentEvent::decode(ev.kind(), &ev.payload()).unwrap(),
            Some(ev.clone())
        );
        assert!(validate_wire_event(ev.kind(), &ev.payload()).is_ok());
        assert!(validate_wire_event("FUTURE_KIND", b"{}").is_ok());
        let check = |kind: &str, payload: &[u8]| validate_wire_event(kind, payload).unwrap_err();
        assert!(matches!(check("", b"{}"), WireEventError::Kind(_)));
        assert!(matches!(check("lower", b"{}"), WireEventError::Kind(_)));
        assert!(matches!(check("X", b"[1]"), WireEventError::Payload(_)));
        assert!(matches!(
            check("X", b"{not json"),
            WireEventError::Payload(_)
        ));
        assert!(matches!(
            check("CONFIG_APPLIED", b"{}"),
            WireEventError::Payload(_)
        ));
        let big = format!("{{\"a\":\"{}\"}}", "x".repeat(MAX_EVENT_PAYLOAD));
        assert!(matches!(
            check("X", big.as_bytes()),
            WireEventError::TooLarge
        ));
    }
}
