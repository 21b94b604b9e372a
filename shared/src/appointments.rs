//! Appointments as both sides know them: the status an appointment is in, and the snapshot the
//! controller sends a site's agent (`commands::ControllerCommand::UpsertAppointment`) whenever an
//! appointment of the site's current business day changes.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

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
}
