//! Commands the controller sends an agent through its per-agent command log. Each has a kind and
//! a JSON payload; the agent applies them idempotently in order and acknowledges cumulatively.

use serde::{Deserialize, Serialize};

use crate::config::SiteConfig;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerCommand {
    /// Replace the site configuration with this snapshot (skipped when the agent already has
    /// this or a newer revision).
    ApplyConfig(Box<SiteConfig>),
}

pub const APPLY_CONFIG: &str = "APPLY_CONFIG";

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
        }
    }

    pub fn payload(&self) -> Vec<u8> {
        match self {
            ControllerCommand::ApplyConfig(c) => serde_json::to_vec(c).unwrap_or_default(),
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
            other => Err(CommandDecodeError::UnknownKind(other.chars().take(80).collect())),
        }
    }
}
