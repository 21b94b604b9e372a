//! Appointments as both sides know them: the status an appointment is in, and the snapshot the
//! controller sends a site's agent (`commands::ControllerCommand::UpsertAppointment`) whenever an
//! appointment of the site's current business day changes.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::{AppointmentId, Code, SiteCode};

/// Where an appointment is in its life. Every status but `Cancelled` holds its seat (later
/// steps of the appointment flow add arrived, called, completed, no-show).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppointmentStatus {
    Booked,
    Cancelled,
}

impl AppointmentStatus {
    pub const ALL: [AppointmentStatus; 2] =
        [AppointmentStatus::Booked, AppointmentStatus::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            AppointmentStatus::Booked => "booked",
            AppointmentStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// The whole current state of one appointment, as the controller sends it to the site's agent.
/// Applying it is idempotent: the agent keeps it only if `revision` is newer than the one it
/// holds, so a replayed or reordered snapshot never moves an appointment back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppointmentSnapshot {
    pub id: AppointmentId,
    pub site: SiteCode,
    pub service: Code,
    /// The queue of the service when the change was made (`None` if the service is no longer
    /// configured).
    #[serde(default)]
    pub queue: Option<Code>,
    /// The start in the site's time zone, `YYYY-MM-DDTHH:MM`.
    pub start: String,
    pub starts_at: DateTime<Utc>,
    /// The site-local day of the start.
    pub local_day: NaiveDate,
    pub duration_minutes: u32,
    pub customer_name: String,
    #[serde(default)]
    pub customer_contact: Option<String>,
    #[serde(default)]
    pub notes: Option<String>,
    #[serde(default)]
    pub external_ref: Option<String>,
    pub status: AppointmentStatus,
    /// Bumped by the controller on every change.
    pub revision: u64,
    pub updated_at: DateTime<Utc>,
}

/// Appointments per chunk of a bulk sync, unless configured otherwise.
pub const DEFAULT_SYNC_CHUNK: usize = 1_000;

/// Why a bulk sync chunk is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {0} failed its SHA-256 check")]
    Checksum(u32),
    #[error("chunk {index} does not decode: {message}")]
    Decode { index: u32, message: String },
}

/// The bytes of one bulk sync chunk and their SHA-256.
pub fn encode_chunk(appointments: &[AppointmentSnapshot]) -> (Vec<u8>, Vec<u8>) {
    // Plain structs of strings, numbers and dates always serialize.
    let payload = serde_json::to_vec(appointments).unwrap_or_default();
    let digest = sha2::Sha256::digest(&payload).to_vec();
    (payload, digest)
}

/// Checks a received chunk against its SHA-256 and decodes it.
pub fn decode_chunk(
    index: u32,
    payload: &[u8],
    sha256: &[u8],
) -> Result<Vec<AppointmentSnapshot>, ChunkError> {
    if sha2::Sha256::digest(payload).as_slice() != sha256 {
        return Err(ChunkError::Checksum(index));
    }
    serde_json::from_slice(payload)
        .map_err(|e| ChunkError::Decode { index, message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip() {
        for s in AppointmentStatus::ALL {
            assert_eq!(AppointmentStatus::parse(s.as_str()), Some(s));
            let json = serde_json::to_string(&s).expect("json");
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
        assert_eq!(AppointmentStatus::parse("lost"), None);
    }

    #[test]
    fn chunks_check_their_digest_and_decode() {
        let (payload, sha) = encode_chunk(&[]);
        assert_eq!(decode_chunk(0, &payload, &sha), Ok(vec![]));
        let mut flipped = payload.clone();
        flipped[0] ^= 1;
        assert_eq!(decode_chunk(3, &flipped, &sha), Err(ChunkError::Checksum(3)));
        let junk = br#"[{"id":1}]"#;
        let digest = sha2::Sha256::digest(junk).to_vec();
        assert!(matches!(decode_chunk(4, junk, &digest), Err(ChunkError::Decode { index: 4, .. })));
    }
}
