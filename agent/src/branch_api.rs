//! The branch LAN HTTP server: `GET /api/v1/status`, `POST /api/v1/visits`,
//! `GET /api/v1/visits?status=waiting`. Works from the local store whether or not the
//! controller is reachable. Errors are typed JSON bodies `{"code","message"}`; a client's
//! mistake is a 4xx and is not logged at error level.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::Context;
use crate::error::Error;
use crate::store::queries::{self, Visit};

/// Largest accepted request body.
const MAX_BODY: usize = 64 * 1024;

pub fn router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/visits", get(list_visits).post(create_visit))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(ctx)
}

#[derive(Debug, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self)).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", message),
            Error::Validation(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                message,
            ),
            Error::NotConfigured => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_configured", message)
            }
            Error::Store(_) | Error::StoreGone(_) => {
                tracing::error!(error = %message, "request failed in the local store");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    message,
                )
            }
            Error::Internal(_) => {
                tracing::error!(error = %message, "internal error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let code = match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::UNPROCESSABLE_ENTITY => "invalid_body",
            _ => "malformed_json",
        };
        ApiError::new(r.status(), code, r.body_text())
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusView {
    pub site: Option<String>,
    pub agent_id: Option<String>,
    pub version: String,
    pub enrolled: bool,
    pub connected: bool,
    /// When `connected` last changed: online since, or offline since.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    pub last_error: Option<String>,
    pub config_revision: u64,
    pub outbox_pending: u64,
    pub outbox_high_water: u64,
    pub last_acked_seq: u64,
    pub store_error: Option<String>,
}

async fn status(State(ctx): State<Arc<Context>>) -> Result<Json<StatusView>, ApiError> {
    let (identity, (high, acked), revision) = ctx
        .db
        .read(|c| {
            Ok((
                queries::identity(c)?,
                queries::outbox_state(c)?,
                queries::config_revision(c)?,
            ))
        })
        .await?;
    let link = ctx.link.borrow().clone();
    Ok(Json(StatusView {
        site: identity.as_ref().map(|i| i.site.clone()),
        agent_id: identity.as_ref().map(|i| i.agent_id.clone()),
        version: meridian_shared::VERSION.to_owned(),
        enrolled: identity.is_some(),
        connected: link.connected,
        since: link.since,
        last_error: link.last_error,
        config_revision: revision,
        outbox_pending: high.saturating_sub(acked),
        outbox_high_water: high,
        last_acked_seq: acked,
        store_error: ctx.db.health(),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewVisit {
    service: String,
}

async fn create_visit(
    State(ctx): State<Arc<Context>>,
    body: Result<Json<NewVisit>, JsonRejection>,
) -> Result<(StatusCode, Json<Visit>), ApiError> {
    let Json(req) = body?;
    if req.service.is_empty() || req.service.len() > 32 {
        return Err(
            Error::Validation("service must be a service code of 1-32 characters".into()).into(),
        );
    }
    let config = ctx.config.borrow().clone().ok_or(Error::NotConfigured)?;
    let now = ctx.clock.now();
    let visit = ctx
        .db
        .write(move |c| queries::create_visit(c, &config, &req.service, now))
        .await?;
    ctx.outbox_changed.notify_one();
    Ok((StatusCode::CREATED, Json(visit)))
}

#[derive(Debug, Deserialize)]
struct VisitFilter {
    status: Option<String>,
}

async fn list_visits(
    State(ctx): State<Arc<Context>>,
    Query(q): Query<VisitFilter>,
) -> Result<Json<Vec<Visit>>, ApiError> {
    let status = q.status.unwrap_or_else(|| "waiting".into());
    if !matches!(status.as_str(), "waiting" | "called" | "serving" | "ended") {
        return Err(Error::Validation(format!("unknown status {status:?}")).into());
    }
    Ok(Json(
        ctx.db
            .read(move |c| queries::visits_with_status(c, &status))
            .await?,
    ))
}
