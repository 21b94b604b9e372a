//! The agent's error type; mapped to HTTP responses in `branch_api` and to log lines in `link`.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} not found")]
    NotFound(String),
    #[error("invalid input: {0}")]
    Validation(String),
    /// Invalid input, field by field (the connector API lists them in `details`).
    #[error("invalid input: {0}")]
    InvalidFields(meridian_shared::ValidationErrors),
    /// The operation is not allowed in the current state (illegal transition, closed counter).
    #[error("{0}")]
    Conflict(String),
    /// A check-in refused by the appointment's state (unknown, cancelled, outside its window…).
    #[error("{0}")]
    CheckIn(Box<crate::check_in::CheckInRefusal>),
    #[error("this branch has no configuration yet (the agent has not synced with the controller)")]
    NotConfigured,
    /// The local database failed (disk full, corruption, I/O). Loud in logs and status.
    #[error("local store failure: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("local store is unavailable: {0}")]
    StoreGone(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
