//! The admin API's error body: `{"code": "...", "message": "...", "details": [...]}` with a
//! stable `code`, a status that says whose fault it is, and no internals.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::Error;

/// Every error of the admin API.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    /// Stable, e.g. `not_found`, `validation_failed`, `slot_taken`.
    #[schema(value_type = String)]
    pub code: &'static str,
    /// For people; may change.
    pub message: String,
    /// The invalid fields (`validation_failed`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<FieldError>)]
    pub details: Vec<meridian_shared::ValidationError>,
}

/// One invalid field of a request (the shape of `meridian_shared::ValidationError`).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `business_hours.mon[1]`.
    field: String,
    message: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, body: ErrorBody { code, message: message.into(), details: vec![] } }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", message),
            Error::Validation(errs) => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                body: ErrorBody { code: "validation_failed", message, details: errs.0 },
            },
            Error::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            Error::BadRequest(_) => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message),
            Error::Unauthenticated => {
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
            }
            Error::Forbidden(_) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", message),
            Error::Enrollment(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "enrollment_refused", message)
            }
            Error::Appointment(refusal) => {
                ApiError::new(StatusCode::CONFLICT, refusal.code(), message)
            }
            Error::RevisionConflict => {
                ApiError::new(StatusCode::CONFLICT, "revision_conflict", message)
            }
            Error::Store(e) => {
                tracing::error!(error = %e, "store error");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the database is unavailable; retry later",
                )
            }
            Error::Migrate(e) => {
                tracing::error!(error = %e, "migration error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
            }
            Error::Internal(e) => {
                tracing::error!(error = %e, "internal error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::UNPROCESSABLE_ENTITY => "invalid_body",
            _ => "malformed_json",
        };
        ApiError::new(status, code, r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
