//! `/api/v1/request-ops…` and `/api/v1/requests/{id}/ownership`: the distributed-request
//! ledger as admins see and repair it. Viewer tokens read; admin tokens cancel and
//! retry (the router's authentication refuses a viewer's `POST` with 403).
//!
//! - `GET /request-ops?status=&site=&pool=&request=&limit=` — operations, newest first
//!   (`status` is one status or `open`; `site` matches the source or the target; `request` an
//!   id or human id; `limit` 1-1000, default 100);
//! - `GET /request-ops/backlog` — per lane (pool × target site): open, retrying, oldest age,
//!   with totals;
//! - `GET /request-ops/{op_id}/{target_site}` — one operation;
//! - `POST /request-ops/{op_id}/{target_site}/cancel {"reason"?}` — cancels an open operation
//!   (409 otherwise); an ownership transfer's request goes back to its source;
//! - `POST /request-ops/{op_id}/{target_site}/retry` — sends it again now (409 with the reason
//!   when it cannot be retried);
//! - `GET /requests/{id}/ownership` — the repair view: master site, in-flight operation,
//!   copies, and the request's operations.
//!
//! A cancel or retry stages commands in the store; they are flushed into the agents' command
//! logs right after, and the gateway sessions are woken.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::{DateTime, Utc};
use meridian_shared::clock::Clock;
use serde::{Deserialize, Serialize};

use super::Caller;
use super::error::{ApiError, ApiResult};
use super::query_error;
use crate::store::Store;
use crate::store::requests::{LaneBacklog, LedgerOp, OpsFilter, Ownership};

/// Every value `status=` accepts.
pub const STATUS_FILTERS: [&str; 7] =
    ["open", "queued", "pending", "retry", "applied", "failed", "superseded"];

/// What the ledger handlers need.
#[derive(Clone)]
pub struct RequestOpsState {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    /// Wakes the gateway sessions after commands were added to agents' logs.
    pub commands_changed: Arc<tokio::sync::watch::Sender<u64>>,
}

/// The routes, to be nested under `/api/v1` behind authentication.
/// The operations of this part of the API, relative to `/api/v1`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(list, backlog, show, cancel, retry, ownership))]
pub(super) struct Doc;

pub fn routes<S: Clone + Send + Sync + 'static>(state: RequestOpsState) -> Router<S> {
    Router::new()
        .route("/request-ops", get(list))
        .route("/request-ops/backlog", get(backlog))
        .route("/request-ops/{op_id}/{target_site}", get(show))
        .route("/request-ops/{op_id}/{target_site}/cancel", post(cancel))
        .route("/request-ops/{op_id}/{target_site}/retry", post(retry))
        .route("/requests/{id}/ownership", get(ownership))
        .with_state(state)
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct OpsQuery {
    /// open, queued, pending, retry, applied, failed or superseded.
    pub status: Option<String>,
    pub site: Option<String>,
    pub pool: Option<String>,
    pub request: Option<String>,
    pub limit: Option<u32>,
}

/// Checks a listing query and turns it into the store's filter (empty values mean "any").
pub fn ops_filter(q: &OpsQuery) -> ApiResult<OpsFilter> {
    let status = given(&q.status).map(str::to_owned);
    if let Some(s) = &status
        && !STATUS_FILTERS.contains(&s.as_str())
    {
        return Err(unprocessable(
            "status",
            format!("unknown status {s:?}: use one of {}", STATUS_FILTERS.join(", ")),
        ));
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(unprocessable("limit", "must be 1-1000".into()));
    }
    Ok(OpsFilter {
        status,
        site: given(&q.site).map(str::to_uppercase),
        pool: given(&q.pool).map(str::to_owned),
        request: given(&q.request).map(str::to_owned),
        limit,
    })
}

fn given(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn unprocessable(field: &str, message: String) -> ApiError {
    let errs = meridian_shared::ValidationErrors(vec![meridian_shared::ValidationError::new(
        field, message,
    )]);
    crate::error::Error::Validation(errs).into()
}

fn op_not_found(op_id: &str, target: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("operation {op_id} to {target} not found"),
    )
}

/// The op id as the ledger stores it (a UUID, lower case); anything else names no operation.
fn op_key(op_id: &str, target: &str) -> ApiResult<(String, String)> {
    let id: uuid::Uuid = op_id.parse().map_err(|_| op_not_found(op_id, target))?;
    Ok((id.to_string(), target.trim().to_uppercase()))
}

type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

#[utoipa::path(get, path = "/request-ops", tag = "requests",
    summary = "Operations of the distributed-request ledger, newest first", params(OpsQuery),
    responses((status = 200, description = "the operations", body = Vec<LedgerOp>)))]
async fn list(
    State(s): State<RequestOpsState>,
    query: QueryResult<OpsQuery>,
) -> ApiResult<Json<Vec<LedgerOp>>> {
    let Query(q) = query.map_err(query_error)?;
    Ok(Json(s.store.list_request_ops(&ops_filter(&q)?).await?))
}

#[utoipa::path(get, path = "/request-ops/{op_id}/{target_site}", tag = "requests",
    summary = "One operation towards one target site", params(("op_id" = String, Path, description = "the operation's id (a UUID)"), ("target_site" = String, Path, description = "the target site's code")),
    responses((status = 200, description = "the operation", body = LedgerOp)))]
async fn show(
    State(s): State<RequestOpsState>,
    Path((op_id, target)): Path<(String, String)>,
) -> ApiResult<Json<LedgerOp>> {
    let (id, site) = op_key(&op_id, &target)?;
    s.store.request_op(&id, &site).await?.map(Json).ok_or_else(|| op_not_found(&op_id, &target))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    /// At most 500 characters; default "cancelled by <token name>".
    reason: Option<String>,
}

/// The body is optional; without a reason the ledger records who cancelled.
#[utoipa::path(post, path = "/request-ops/{op_id}/{target_site}/cancel", tag = "requests",
    summary = "Cancel an open operation (the body is optional)", params(("op_id" = String, Path, description = "the operation's id (a UUID)"), ("target_site" = String, Path, description = "the target site's code")),
    request_body = Option<CancelBody>,
    responses((status = 200, description = "the operation, cancelled", body = LedgerOp)))]
async fn cancel(
    State(s): State<RequestOpsState>,
    Extension(caller): Extension<Caller>,
    Path((op_id, target)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<LedgerOp>> {
    let req: CancelBody = optional_body(&body)?;
    let (id, site) = op_key(&op_id, &target)?;
    let reason = match req.reason.as_deref().map(str::trim).filter(|r| !r.is_empty()) {
        Some(r) if r.chars().count() > 500 => {
            return Err(unprocessable("reason", "must be at most 500 characters".into()));
        }
        Some(r) => r.to_owned(),
        None => format!("cancelled by {}", caller.token_name),
    };
    let op = s
        .store
        .cancel_request_op(&id, &site, &reason, s.clock.now())
        .await
        .map_err(|e| not_found_as(e, &op_id, &target))?;
    tracing::info!(op = %op.op_id, target = %op.target_site, request = %op.human_id, by = %caller.token_name, "request operation cancelled");
    flush_and_wake(&s).await;
    Ok(Json(op))
}

#[utoipa::path(post, path = "/request-ops/{op_id}/{target_site}/retry", tag = "requests",
    summary = "Retry a failed operation now", params(("op_id" = String, Path, description = "the operation's id (a UUID)"), ("target_site" = String, Path, description = "the target site's code")),
    responses((status = 200, description = "the operation, queued again", body = LedgerOp)))]
async fn retry(
    State(s): State<RequestOpsState>,
    Extension(caller): Extension<Caller>,
    Path((op_id, target)): Path<(String, String)>,
) -> ApiResult<Json<LedgerOp>> {
    let (id, site) = op_key(&op_id, &target)?;
    let op = s
        .store
        .retry_request_op(&id, &site, s.clock.now())
        .await
        .map_err(|e| not_found_as(e, &op_id, &target))?;
    tracing::info!(op = %op.op_id, target = %op.target_site, request = %op.human_id, attempt = op.attempt, by = %caller.token_name, "request operation retried");
    flush_and_wake(&s).await;
    Ok(Json(op))
}

fn not_found_as(e: crate::error::Error, op_id: &str, target: &str) -> ApiError {
    match e {
        crate::error::Error::NotFound(_) => op_not_found(op_id, target),
        other => other.into(),
    }
}

/// Moves the staged commands into the agents' logs and wakes the sessions. The change itself
/// is committed: should the flush fail, the ledger's sweep moves them on its next tick.
pub async fn flush_and_wake(s: &RequestOpsState) {
    match s.store.flush_request_commands().await {
        Ok(moved) if moved > 0 => s.commands_changed.send_modify(|n| *n = n.wrapping_add(1)),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "staged request commands not flushed; the ledger sweep will")
        }
    }
}

/// Totals over every lane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BacklogTotals {
    pub open: u64,
    pub retrying: u64,
    pub oldest_open_at: Option<DateTime<Utc>>,
    pub oldest_age_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Backlog {
    /// Per pool and target site.
    #[schema(value_type = Vec<Object>)]
    pub lanes: Vec<LaneBacklog>,
    pub totals: BacklogTotals,
}

impl Backlog {
    pub fn of(lanes: Vec<LaneBacklog>) -> Self {
        let totals = BacklogTotals {
            open: lanes.iter().map(|l| l.open).sum(),
            retrying: lanes.iter().map(|l| l.retrying).sum(),
            oldest_open_at: lanes.iter().filter_map(|l| l.oldest_open_at).min(),
            oldest_age_seconds: lanes.iter().map(|l| l.oldest_age_seconds).fold(0.0, f64::max),
        };
        Backlog { lanes, totals }
    }
}

#[utoipa::path(get, path = "/request-ops/backlog", tag = "requests",
    summary = "Open operations per lane (pool and target site) and in total",
    responses((status = 200, description = "the backlog", body = Backlog)))]
async fn backlog(State(s): State<RequestOpsState>) -> ApiResult<Json<Backlog>> {
    Ok(Json(Backlog::of(s.store.request_backlog(s.clock.now()).await?)))
}

/// The repair view of one request.
#[derive(Debug, Clone, Serialize)]
pub struct OwnershipView {
    #[serde(flatten)]
    pub ownership: Ownership,
    /// The request's operations, newest first (at most 1000).
    pub operations: Vec<LedgerOp>,
}

#[utoipa::path(get, path = "/requests/{id}/ownership", tag = "requests",
    summary = "Where a request's master copy is, and its operations (the repair view)",
    params(("id" = String, Path, description = "the request's id or human id")),
    responses((status = 200, description = "ownership and operations", body = Object)))]
async fn ownership(
    State(s): State<RequestOpsState>,
    Path(id): Path<String>,
) -> ApiResult<Json<OwnershipView>> {
    let Some(ownership) = s.store.request_ownership(id.trim()).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("request {id} not found in the ledger"),
        ));
    };
    let filter = OpsFilter {
        request: Some(ownership.request_id.clone()),
        limit: 1000,
        ..OpsFilter::default()
    };
    let operations = s.store.list_request_ops(&filter).await?;
    Ok(Json(OwnershipView { ownership, operations }))
}

/// A JSON body that may be empty (then `T::default()`), with the same typed errors as `ApiJson`.
fn optional_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", e.to_string())
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.to_string())
        }
    })
}
