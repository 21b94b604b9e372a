//! The controller's error type. Mapped to HTTP and gRPC responses only at the edges
//! (`api::error`, `gateway`), each with a stable code and a message that leaks no internals.

use meridian_shared::ValidationErrors;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} not found")]
    NotFound(String),
    #[error("invalid input: {0}")]
    Validation(ValidationErrors),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("authentication required")]
    Unauthenticated,
    #[error("{0}")]
    Forbidden(String),
    #[error("enrollment refused: {0}")]
    Enrollment(EnrollError),
    #[error("the configuration changed concurrently; retry")]
    RevisionConflict,
    #[error("{0}")]
    Appointment(AppointmentRefusal),
    #[error("store unavailable: {0}")]
    Store(#[from] sqlx::Error),
    #[error("store migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Internal(String),
}

/// Why an enrollment token was refused. The client sees the variant; it learns nothing about
/// other tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EnrollError {
    #[error("unknown enrollment token")]
    Unknown,
    #[error("enrollment token expired")]
    Expired,
    #[error("enrollment token already used")]
    AlreadyUsed,
    #[error("the token's site no longer exists")]
    SiteGone,
}

/// Why a booking change was refused although the request was well formed (HTTP 409): the state
/// it met does not allow it. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppointmentRefusal {
    #[error("the slot is fully booked ({capacity} of {capacity} taken)")]
    SlotFull { capacity: u32 },
    #[error(
        "the appointment changed meanwhile: revision {current}, not {expected}; reload and retry"
    )]
    StaleRevision { expected: u64, current: u64 },
    #[error("the appointment is cancelled")]
    AlreadyCancelled,
    #[error("external reference {0:?} is already used by another appointment of this site")]
    ExternalRefTaken(String),
    /// The branch already recorded the customer's attendance: the appointment has happened (or
    /// been missed) and can no longer be moved or cancelled.
    #[error("the branch already recorded this appointment as {0}; it can no longer be changed")]
    AlreadyAttended(meridian_shared::check_in::Attendance),
    /// The branch closed that time (`BRANCH_CLOSED`).
    #[error("the branch closed {from}-{to} that day: {reason}")]
    SlotClosed { from: String, to: String, reason: String },
}

impl AppointmentRefusal {
    /// The stable error code clients see.
    pub fn code(&self) -> &'static str {
        match self {
            AppointmentRefusal::SlotFull { .. } => "slot_full",
            AppointmentRefusal::StaleRevision { .. } => "stale_revision",
            AppointmentRefusal::AlreadyCancelled => "already_cancelled",
            AppointmentRefusal::ExternalRefTaken(_) => "external_ref_taken",
            AppointmentRefusal::AlreadyAttended(_) => "already_attended",
            AppointmentRefusal::SlotClosed { .. } => "slot_closed",
        }
    }
}

impl From<AppointmentRefusal> for Error {
    fn from(e: AppointmentRefusal) -> Self {
        Error::Appointment(e)
    }
}

impl From<ValidationErrors> for Error {
    fn from(e: ValidationErrors) -> Self {
        Error::Validation(e)
    }
}

impl From<meridian_shared::ValidationError> for Error {
    fn from(e: meridian_shared::ValidationError) -> Self {
        Error::Validation(ValidationErrors(vec![e]))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
