//! The branch LAN HTTP server: `GET /api/v1/status`, `POST /api/v1/visits`,
//! `GET /api/v1/visits?status=waiting`. Works from the local store whether or not the
//! controller is reachable. Errors are typed JSON bodies `{"code","message","details"?}`
//! (`details` lists invalid fields); a client's mistake is a 4xx and is not logged at error
//! level.

use std::sync::Arc;

use axum::extract::Path;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::Context;
use crate::appointments::{self, BranchAppointment};

use crate::check_in::{self, CheckInRefusal, CheckedIn};
use crate::error::Error;
use crate::store::queries;
use crate::visits::{self, QueueState, ServicePointState, Visit};
use meridian_shared::ValidationError;
use meridian_shared::customer::{Customer, CustomerInput};
use meridian_shared::visits::{Location, Op, Position, VisitStatus};

mod sessions;

pub use sessions::{Session, peer};

/// Largest accepted request body.
const MAX_BODY: usize = 64 * 1024;

pub fn router(ctx: Arc<Context>) -> Router {
    // What only supervisors (and local systems with a connector key) may do.
    let supervising = Router::new()
        .route("/api/v1/closures", post(close_branch))
        .route("/api/v1/closures/{id}", axum::routing::delete(reopen_branch))
        .route("/api/v1/appointments/sync", get(appointment_sync_status))
        .route("/api/v1/login-locks", get(sessions::list_locks))
        .route("/api/v1/login-locks/{subject}/{name}", axum::routing::delete(sessions::unlock))
        .route_layer(axum::middleware::from_fn(sessions::require_supervisor));
    let protected = Router::new()
        .route("/api/v1/visits", get(list_visits).post(create_visit))
        .route("/api/v1/visits/{id}", get(get_visit))
        .route("/api/v1/visits/{id}/transfer", post(transfer_visit))
        .route("/api/v1/visits/{id}/{action}", post(visit_action))
        .route("/api/v1/queues", get(list_queues))
        .route("/api/v1/service-points", get(list_service_points))
        .route("/api/v1/service-points/{code}/open", post(open_service_point))
        .route("/api/v1/service-points/{code}/close", post(close_service_point))
        .route("/api/v1/service-points/{code}/call-next", post(call_next))
        .route("/api/v1/service-points/{code}/call", post(call_visit))
        .route("/api/v1/service-points/{code}/walk-direct", post(walk_direct))
        .route("/api/v1/sessions/current", axum::routing::delete(sessions::logout))
        .route("/api/v1/events", get(event_feed))
        .route("/api/v1/appointments", get(list_appointments))
        .route("/api/v1/closures", get(list_closures))
        .route("/api/v1/requests", get(list_requests).post(create_request))
        .route(
            "/api/v1/requests/{id}",
            get(get_request).patch(update_request).delete(delete_request),
        )
        .route("/api/v1/requests/{id}/operations", post(start_operation))
        .route("/api/v1/appointments/check-in", post(check_in_by_text))
        .route("/api/v1/appointments/{id}/check-in", post(check_in_by_id))
        .merge(supervising)
        .layer(axum::middleware::from_fn_with_state(ctx.clone(), sessions::authenticate));
    Router::new()
        .merge(protected)
        .route("/api/v1/status", get(status))
        .route("/api/v1/openapi.json", get(|| async { Json(crate::openapi::document()) }))
        .route("/api/v1/sessions", post(sessions::login))
        .route("/healthz", get(healthz))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(meridian_shared::http_guard::typed_error_body))
        .with_state(ctx)
}

#[derive(Debug, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Field by field, for invalid input.
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<Vec<ValidationError>>,
    /// The existing ticket, for `already_checked_in`.
    #[serde(skip_serializing_if = "Option::is_none")]
    visit: Option<Box<Visit>>,
    /// Seconds for a `Retry-After` header.
    #[serde(skip)]
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
            visit: None,
            retry_after: None,
        }
    }

    /// An error the caller may retry after `seconds` (`Retry-After`).
    pub fn retry_after(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
        seconds: u64,
    ) -> Self {
        Self { retry_after: Some(seconds), ..Self::new(status, code, message) }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = self.retry_after;
        let mut resp = (self.status, Json(self)).into_response();
        if let Some(seconds) = retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(seconds));
        }
        resp
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", message),
            Error::Validation(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", message)
            }
            Error::InvalidFields(errs) => ApiError {
                details: Some(errs.0),
                ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", message)
            },
            Error::NotConfigured => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_configured", message)
            }
            Error::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            Error::CheckIn(refusal) => {
                let status =
                    StatusCode::from_u16(refusal.http_status()).unwrap_or(StatusCode::CONFLICT);
                let mut err = ApiError::new(status, refusal.code(), message);
                if let CheckInRefusal::AlreadyCheckedIn { visit } = *refusal {
                    err.visit = Some(visit);
                }
                err
            }
            Error::Store(_) | Error::StoreGone(_) => {
                tracing::error!(error = %message, "request failed in the local store");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", message)
            }
            Error::Internal(_) => {
                tracing::error!(error = %message, "internal error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
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

/// `GET /healthz`: 200 `{"status":"ok"}`, or 503 `{"status":"degraded","store_error":"…"}`
/// while the store is unhealthy (a change failed at the store level — disk full, I/O error —
/// and none has committed since). The link being down is not a degradation: the branch works.
async fn healthz(State(ctx): State<Arc<Context>>) -> Response {
    match ctx.db.health() {
        None => Json(serde_json::json!({ "status": "ok" })).into_response(),
        Some(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "degraded", "store_error": e })),
        )
            .into_response(),
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
    /// The agent's clock: its skew from the trusted time, whether the agent uses the system
    /// clock, and the alert while it does not.
    pub clock: crate::clock::ClockHealth,
    /// What the end-of-day sweep has done since the agent started.
    pub end_of_day: crate::visits::EndOfDaySweeps,
    /// The newest thing the start of a session found about a restored store (this agent's
    /// from a backup, or the controller's from a dump).
    #[serde(default)]
    pub store_notice: Option<StoreNotice>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreNotice {
    pub kind: String,
    pub message: String,
    pub at: String,
}

async fn status(State(ctx): State<Arc<Context>>) -> Result<Json<StatusView>, ApiError> {
    let (identity, (high, acked), revision, notice) = ctx
        .db
        .read(|c| {
            Ok((
                queries::identity(c)?,
                queries::outbox_state(c)?,
                queries::config_revision(c)?,
                queries::last_notice(c)?,
            ))
        })
        .await?;
    let link = ctx.link.borrow().clone();
    Ok(Json(StatusView {
        site: identity.as_ref().map(|i| i.site.clone()),
        agent_id: identity.as_ref().map(|i| i.agent_id.clone()),
        version: crate::VERSION.to_owned(),
        enrolled: identity.is_some(),
        connected: link.connected,
        since: link.since,
        last_error: link.last_error,
        config_revision: revision,
        outbox_pending: high.saturating_sub(acked),
        outbox_high_water: high,
        last_acked_seq: acked,
        store_error: ctx.db.health(),
        store_notice: notice.map(|(kind, message, at)| StoreNotice { kind, message, at }),
        clock: ctx.clock_health(),
        end_of_day: ctx.end_of_day.borrow().clone(),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewVisit {
    service: String,
    /// Optional customer fields (personal data; see `meridian_shared::customer`).
    #[serde(default)]
    customer: Option<CustomerInput>,
}

impl NewVisit {
    /// The service code and the validated customer, or every problem at once.
    fn validate(self) -> Result<(String, Option<Customer>), Error> {
        check_code("service", &self.service)?;
        let customer = match self.customer {
            Some(input) => {
                input.validate().map_err(|errs| Error::InvalidFields(errs.nest("customer")))?
            }
            None => None,
        };
        Ok((self.service, customer))
    }
}

type Json201<T> = Result<(StatusCode, Json<T>), ApiError>;

fn config(ctx: &Context) -> Result<std::sync::Arc<meridian_shared::config::SiteConfig>, Error> {
    ctx.site_config()
}

fn check_code(what: &str, value: &str) -> Result<(), Error> {
    if value.is_empty() || value.len() > 32 {
        return Err(Error::Validation(format!("{what} must be a code of 1-32 characters")));
    }
    Ok(())
}

/// Runs a state-changing store job (see `Context::change`).
async fn change<R, F>(ctx: &Context, f: F) -> Result<R, ApiError>
where
    R: Send + 'static,
    F: FnOnce(
            &rusqlite::Connection,
            &meridian_shared::config::SiteConfig,
            chrono::DateTime<chrono::Utc>,
        ) -> crate::Result<R>
        + Send
        + 'static,
{
    Ok(ctx.change(f).await?)
}

async fn create_visit(
    State(ctx): State<Arc<Context>>,
    body: Result<Json<NewVisit>, JsonRejection>,
) -> Json201<Visit> {
    let Json(req) = body?;
    let (service, customer) = req.validate()?;
    let visit = change(&ctx, move |c, config, now| {
        visits::create(c, config, &service, customer.as_ref(), now)
    })
    .await?;
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
    let raw = q.status.unwrap_or_else(|| "waiting".into());
    let status = VisitStatus::parse(&raw)
        .ok_or_else(|| Error::Validation(format!("unknown status {raw:?}")))?;
    Ok(Json(ctx.db.read(move |c| visits::list(c, status)).await?))
}

/// Creates a service request of a configured type: 201; field errors as 422.
async fn create_request(
    State(ctx): State<Arc<Context>>,
    body: Result<Json<crate::requests::NewRequest>, JsonRejection>,
) -> Json201<crate::requests::Request> {
    let Json(input) = body?;
    let rules = ctx.rules.get(&*ctx.site_config()?);
    let made = change(&ctx, move |c, config, now| {
        let made = crate::requests::create(c, config, &input, now)?;
        let event = crate::request_rules::RuleEvent::Created;
        if crate::request_rules::on_event(c, config, &rules, &made, event, now)? == 0 {
            return Ok(made);
        }
        Ok(crate::requests::get(c, &made.id.to_string())?.unwrap_or(made))
    })
    .await?;
    Ok((StatusCode::CREATED, Json(made)))
}

/// Changes fields of a request's master copy (404 unknown; 409 read-only copy or stale
/// revision; 422 field errors).
async fn update_request(
    State(ctx): State<Arc<Context>>,
    Path(id): Path<String>,
    body: Result<Json<crate::requests::RequestPatch>, JsonRejection>,
) -> Result<Json<crate::requests::Request>, ApiError> {
    let Json(patch) = body?;
    if id.len() > 64 {
        return Err(Error::NotFound("request".into()).into());
    }
    let rules = ctx.rules.get(&*ctx.site_config()?);
    Ok(Json(
        change(&ctx, move |c, config, now| {
            let before = crate::requests::get(c, &id)?.map(|r| r.fields).unwrap_or_default();
            let changed = crate::requests::update(c, config, &id, &patch, now)?;
            let event = crate::request_rules::RuleEvent::Modified(&before);
            if crate::request_rules::on_event(c, config, &rules, &changed, event, now)? == 0 {
                return Ok(changed);
            }
            Ok(crate::requests::get(c, &changed.id.to_string())?.unwrap_or(changed))
        })
        .await?,
    ))
}

/// Starts a cross-site operation on a request of this site (transfer with a mode and a target,
/// update, return): 202 with the operation id and the request as it is here now (an ownership
/// transfer or a return makes it read-only until the controller settles it). Works offline:
/// the operation waits in the outbox. 404 unknown; 409 not the master here; 422 bad spec.
async fn start_operation(
    State(ctx): State<Arc<Context>>,
    Path(id): Path<String>,
    body: Result<Json<crate::distribution::OperationSpec>, JsonRejection>,
) -> Result<(StatusCode, Json<crate::distribution::Started>), ApiError> {
    let Json(spec) = body?;
    if id.len() > 64 {
        return Err(Error::NotFound("request".into()).into());
    }
    if spec.action == meridian_shared::transfers::OpKind::Delete {
        return Err(
            Error::Validation("delete a request with DELETE /api/v1/requests/{id}".into()).into()
        );
    }
    let started =
        change(&ctx, move |c, config, now| crate::distribution::start(c, config, &id, &spec, now))
            .await?;
    Ok((StatusCode::ACCEPTED, Json(started)))
}

/// Deletes a request here: the master (its copies at other sites follow) or a read-only copy
/// alone. 204; 404 unknown; 409 while its ownership is being handed over.
async fn delete_request(
    State(ctx): State<Arc<Context>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if id.len() > 64 {
        return Err(Error::NotFound("request".into()).into());
    }
    let spec = crate::distribution::OperationSpec {
        action: meridian_shared::transfers::OpKind::Delete,
        mode: None,
        target: None,
        mapping: None,
        pool: None,
        update: Default::default(),
        rule: None,
    };
    change(&ctx, move |c, config, now| crate::distribution::start(c, config, &id, &spec, now))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_request(
    State(ctx): State<Arc<Context>>,
    Path(id): Path<String>,
) -> Result<Json<crate::requests::Request>, ApiError> {
    let shown = id.chars().take(64).collect::<String>();
    let found = ctx.db.read(move |c| crate::requests::get(c, &id)).await?;
    Ok(Json(found.ok_or_else(|| Error::NotFound(format!("request {shown}")))?))
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RequestQuery {
    #[serde(rename = "type")]
    request_type: Option<String>,
    limit: Option<u32>,
}

/// The latest requests (of one `type`), newest change first; `limit` 1-1000 (default 100).
async fn list_requests(
    State(ctx): State<Arc<Context>>,
    Query(q): Query<RequestQuery>,
) -> Result<Json<Vec<crate::requests::Request>>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Error::InvalidFields(meridian_shared::ValidationErrors(vec![
            ValidationError::new("limit", "must be 1-1000"),
        ]))
        .into());
    }
    let t = q.request_type;
    Ok(Json(ctx.db.read(move |c| crate::requests::list(c, t.as_deref(), limit)).await?))
}

/// Closes part of a day at the branch (staff or integrations): 201 with the closure and how
/// many expected appointments it flagged; field errors as 422.
async fn close_branch(
    State(ctx): State<Arc<Context>>,
    body: Result<Json<crate::closures::NewClosure>, JsonRejection>,
) -> Json201<crate::closures::BranchClosure> {
    let Json(input) = body?;
    let made =
        change(&ctx, move |c, config, now| crate::closures::close(c, config, &input, now)).await?;
    Ok((StatusCode::CREATED, Json(made)))
}

/// Withdraws a closure (404 unknown, 409 already withdrawn).
async fn reopen_branch(
    State(ctx): State<Arc<Context>>,
    Path(id): Path<String>,
) -> Result<Json<crate::closures::BranchClosure>, ApiError> {
    if id.len() > 64 {
        return Err(Error::NotFound(format!(
            "closure {}",
            id.chars().take(64).collect::<String>()
        ))
        .into());
    }
    Ok(Json(change(&ctx, move |c, _, now| crate::closures::reopen(c, &id, now)).await?))
}

/// Closures of today and later (withdrawn ones with `reopened_at`).
async fn list_closures(
    State(ctx): State<Arc<Context>>,
) -> Result<Json<Vec<crate::closures::BranchClosure>>, ApiError> {
    let tz = config(&ctx)?.site.tz().map_err(Error::Internal)?;
    let today = meridian_shared::business_day::business_day(tz, ctx.clock.now());
    Ok(Json(ctx.db.read(move |c| crate::closures::list(c, today)).await?))
}

/// The bulk appointment sync at this branch: the set in force (watermark) and the latest
/// requests with their progress.
async fn appointment_sync_status(
    State(ctx): State<Arc<Context>>,
) -> Result<Json<crate::appointment_sync::SyncStatus>, ApiError> {
    Ok(Json(ctx.db.read(|c| crate::appointment_sync::status(c, 20)).await?))
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AppointmentDay {
    /// `YYYY-MM-DD`, site-local; today (the site's business day) when absent.
    date: Option<String>,
}

/// The appointments the controller has sent for one site-local day (today by default), by
/// start; cancelled ones are listed with their status. Read-only.
async fn list_appointments(
    State(ctx): State<Arc<Context>>,
    Query(q): Query<AppointmentDay>,
) -> Result<Json<Vec<BranchAppointment>>, ApiError> {
    let day = match q.date.as_deref() {
        Some(raw) => raw.parse::<chrono::NaiveDate>().map_err(|_| {
            Error::InvalidFields(meridian_shared::ValidationErrors(vec![ValidationError::new(
                "date",
                format!("{raw:?} is not a date YYYY-MM-DD"),
            )]))
        })?,
        None => {
            let tz = config(&ctx)?.site.tz().map_err(Error::Internal)?;
            meridian_shared::business_day::business_day(tz, ctx.clock.now())
        }
    };
    Ok(Json(ctx.db.read(move |c| appointments::of_day(c, day)).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckInRequest {
    /// What the customer shows: the booking reference (`XXXX-XXXX`, any case, dash optional),
    /// the QR text `MERIDIAN:APPT:<reference>`, the appointment id or its external reference.
    reference: String,
}

/// Checks a customer in by what they show (kiosk, integrations): 201 with the appointment and
/// its new visit; typed refusals (`check_in::CheckInRefusal`).
async fn check_in_by_text(
    State(ctx): State<Arc<Context>>,
    body: Result<Json<CheckInRequest>, JsonRejection>,
) -> Json201<CheckedIn> {
    let Json(req) = body?;
    if req.reference.trim().is_empty() || req.reference.len() > 200 {
        return Err(Error::InvalidFields(meridian_shared::ValidationErrors(vec![
            ValidationError::new("reference", "give the booking reference (1-200 characters)"),
        ]))
        .into());
    }
    let done =
        change(&ctx, move |c, config, now| check_in::check_in_text(c, config, &req.reference, now))
            .await?;
    Ok((StatusCode::CREATED, Json(done)))
}

/// Reception checks a customer in by the appointment's id.
async fn check_in_by_id(
    State(ctx): State<Arc<Context>>,
    Path(id): Path<String>,
) -> Json201<CheckedIn> {
    let id: meridian_shared::AppointmentId =
        id.parse().map_err(|_| Error::from(CheckInRefusal::Unknown(id.clone())))?;
    let done = change(&ctx, move |c, config, now| check_in::check_in(c, config, &id, now)).await?;
    Ok((StatusCode::CREATED, Json(done)))
}

async fn get_visit(
    State(ctx): State<Arc<Context>>,
    Path(id): Path<String>,
) -> Result<Json<Visit>, ApiError> {
    Ok(Json(ctx.db.read(move |c| visits::get(c, &id)).await?))
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EndVisit {
    /// Marks / delivered services recorded with the visit.
    #[serde(default)]
    marks: Vec<String>,
}

async fn visit_action(
    State(ctx): State<Arc<Context>>,
    Path((id, action)): Path<(String, String)>,
    body: Option<Json<EndVisit>>,
) -> Result<Json<Visit>, ApiError> {
    let op = Op::from_action(&action).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("unknown visit action {action:?}"),
        )
    })?;
    let marks = body.map(|Json(b)| b.marks).unwrap_or_default();
    if marks.len() > 20 || marks.iter().any(|m| m.is_empty() || m.len() > 100) {
        return Err(Error::Validation("at most 20 marks of 1-100 characters".into()).into());
    }
    let visit =
        change(&ctx, move |c, config, now| visits::transition(c, config, &id, op, marks, now))
            .await?;
    Ok(Json(visit))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferRequest {
    to: Location,
    #[serde(default)]
    position: Position,
}

async fn transfer_visit(
    State(ctx): State<Arc<Context>>,
    Path(id): Path<String>,
    body: Result<Json<TransferRequest>, JsonRejection>,
) -> Result<Json<Visit>, ApiError> {
    let Json(req) = body?;
    let op = Op::Transfer { to: req.to, position: req.position };
    Ok(Json(
        change(&ctx, move |c, config, now| visits::transition(c, config, &id, op, vec![], now))
            .await?,
    ))
}

async fn list_queues(State(ctx): State<Arc<Context>>) -> Result<Json<Vec<QueueState>>, ApiError> {
    let config = config(&ctx)?;
    let now = ctx.clock.now();
    Ok(Json(ctx.db.read(move |c| visits::queues(c, &config, now)).await?))
}

async fn list_service_points(
    State(ctx): State<Arc<Context>>,
) -> Result<Json<Vec<ServicePointState>>, ApiError> {
    let config = config(&ctx)?;
    Ok(Json(ctx.db.read(move |c| visits::service_points(c, &config)).await?))
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OpenRequest {
    staff: Option<String>,
}

async fn open_service_point(
    State(ctx): State<Arc<Context>>,
    Path(code): Path<String>,
    body: Option<Json<OpenRequest>>,
) -> Result<Json<ServicePointState>, ApiError> {
    let staff = body.and_then(|Json(b)| b.staff);
    Ok(Json(
        change(&ctx, move |c, config, now| {
            visits::open_counter(c, config, &code, staff.as_deref(), now)
        })
        .await?,
    ))
}

async fn close_service_point(
    State(ctx): State<Arc<Context>>,
    Path(code): Path<String>,
) -> Result<Json<ServicePointState>, ApiError> {
    Ok(Json(
        change(&ctx, move |c, config, now| visits::close_counter(c, config, &code, now)).await?,
    ))
}

async fn call_next(
    State(ctx): State<Arc<Context>>,
    Path(code): Path<String>,
) -> Result<Response, ApiError> {
    let called =
        change(&ctx, move |c, config, now| visits::call_next(c, config, &code, now)).await?;
    Ok(match called {
        Some(v) => Json(v).into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "nobody_waiting",
            "nobody is waiting for this service point",
        )
        .into_response(),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallRequest {
    visit_id: Option<String>,
    ticket: Option<String>,
}

async fn call_visit(
    State(ctx): State<Arc<Context>>,
    Path(code): Path<String>,
    body: Result<Json<CallRequest>, JsonRejection>,
) -> Result<Json<Visit>, ApiError> {
    let Json(req) = body?;
    let tz_day = |config: &meridian_shared::config::SiteConfig, now| {
        config
            .site
            .tz()
            .map(|tz| meridian_shared::business_day::business_day(tz, now))
            .map_err(Error::Internal)
    };
    let visit = change(&ctx, move |c, config, now| {
        let visit = match (req.visit_id, req.ticket) {
            (Some(id), None) => visits::get(c, &id)?,
            (None, Some(ticket)) => visits::open_by_ticket(c, &ticket, tz_day(config, now)?)?,
            _ => {
                return Err(Error::Validation("give exactly one of visit_id and ticket".into()));
            }
        };
        visits::call(c, config, &code, visit, now)
    })
    .await?;
    Ok(Json(visit))
}

async fn walk_direct(
    State(ctx): State<Arc<Context>>,
    Path(code): Path<String>,
    body: Result<Json<NewVisit>, JsonRejection>,
) -> Json201<Visit> {
    let Json(req) = body?;
    let (service, customer) = req.validate()?;
    let visit = change(&ctx, move |c, config, now| {
        visits::walk_direct(c, config, &code, &service, customer.as_ref(), now)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(visit)))
}

#[derive(Debug, Deserialize)]
struct FeedQuery {
    /// Resume after this sequence (or send `Last-Event-ID`); without either, only new events.
    after: Option<u64>,
}

/// Events per read while catching up.
const FEED_PAGE: u32 = 200;

/// The live event feed for local subscribers: server-sent events, one per outbox event, with
/// the event's sequence as SSE id, so a subscriber resumes with `Last-Event-ID` (or `?after=`)
/// for as long as the branch retains events (`Settings::local_retention_s`). An older cursor gets
/// `410 cursor_expired` rather than a silent gap. A local integration: `VISIT_CREATED` carries
/// the visit's customer fields whether or not the site shares them with central
/// (`visits::for_local_subscribers`).
async fn event_feed(
    State(ctx): State<Arc<Context>>,
    headers: axum::http::HeaderMap,
    Query(q): Query<FeedQuery>,
) -> Result<Response, ApiError> {
    let from_header = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().parse::<u64>())
        .transpose()
        .map_err(|_| Error::Validation("Last-Event-ID must be an event sequence number".into()))?;
    let cursor = q.after.or(from_header);
    let (high, oldest) =
        ctx.db.read(|c| Ok((queries::outbox_state(c)?.0, queries::oldest_retained(c)?))).await?;
    let mut cursor = match cursor {
        None => high,
        Some(c) if c > high => {
            return Err(
                Error::Validation(format!("cursor {c} is ahead of the last event {high}")).into()
            );
        }
        Some(c) => {
            let first_needed = c + 1;
            if first_needed <= high && oldest.is_none_or(|o| o > first_needed) {
                return Err(ApiError::new(
                    StatusCode::GONE,
                    "cursor_expired",
                    format!(
                        "events after {c} are no longer retained; resume from {}",
                        oldest.unwrap_or(high + 1) - 1
                    ),
                ));
            }
            c
        }
    };
    // Held by the feed's task: the slot frees when the subscriber goes.
    let slot = match ctx.live_feeds.join() {
        Ok(slot) => slot,
        Err(refused) => return Ok(refused.into_response()),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<axum::response::sse::Event, std::convert::Infallible>,
    >(16);
    let mut activity = ctx.activity.subscribe();
    tokio::spawn(async move {
        let _slot = slot;
        loop {
            let after = cursor;
            let page = match ctx
                .db
                .read(move |c| {
                    visits::for_local_subscribers(c, queries::outbox_after(c, after, FEED_PAGE)?)
                })
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "event feed read failed; closing the stream");
                    return;
                }
            };
            if page.is_empty() {
                tokio::select! {
                    _ = tx.closed() => return,
                    changed = activity.changed() => if changed.is_err() { return },
                }
                continue;
            }
            for e in page {
                cursor = e.seq;
                let payload: serde_json::Value =
                    serde_json::from_slice(&e.payload).unwrap_or_default();
                let data = serde_json::json!({
                    "seq": e.seq,
                    "kind": e.kind,
                    "occurred_at": chrono::DateTime::from_timestamp_millis(e.occurred_at_ms),
                    "payload": payload,
                });
                let event = axum::response::sse::Event::default()
                    .id(e.seq.to_string())
                    .event(e.kind)
                    .data(data.to_string());
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok(axum::response::sse::Sse::new(stream)
        .keep_alive(
            axum::response::sse::KeepAlive::new().interval(std::time::Duration::from_secs(15)),
        )
        .into_response())
}
