//! `/api/v1/appointments/sync…`: the nightly bulk sync of appointments as admins see and
//! drive it. `POST /appointments/sync {"site"}` requests a sync of the site's agents now (admin;
//! the same path the nightly job takes); `GET /appointments/syncs?site=&limit=` lists syncs,
//! newest first; `GET /appointments/syncs/{id}` shows one; `GET /appointments/sync-schedule`
//! gives each site's next scheduled run; `GET /appointments/closures?site=&from=&to=` lists
//! the closures branches decided on their own (what makes bookings `slot_closed`).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use meridian_shared::SiteCode;
use serde::{Deserialize, Serialize};

use super::appointments::AppointmentsState;
use super::error::{ApiError, ApiResult};
use super::{ApiJson, query_error};
use crate::store::appointment_sync::SyncRecord;

/// The operations of this part of the API, relative to `/api/v1`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(request, list, show, schedule, closures))]
pub(super) struct Doc;

pub fn routes<S: Clone + Send + Sync + 'static>(state: AppointmentsState) -> Router<S> {
    Router::new()
        .route("/appointments/sync", post(request))
        .route("/appointments/syncs", get(list))
        .route("/appointments/syncs/{id}", get(show))
        .route("/appointments/sync-schedule", get(schedule))
        .route("/appointments/closures", get(closures))
        .with_state(state)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SyncBody {
    /// The site's code.
    site: String,
}

/// The syncs requested (one per active agent of the site).
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Requested {
    syncs: Vec<SyncRecord>,
}

fn unprocessable(field: &str, message: String) -> ApiError {
    let errs = meridian_shared::ValidationErrors(vec![meridian_shared::ValidationError::new(
        field, message,
    )]);
    crate::error::Error::Validation(errs).into()
}

#[utoipa::path(post, path = "/appointments/sync", tag = "appointments",
    summary = "Sync a site's agents' appointments now (the nightly bulk sync, by hand)",
    request_body = SyncBody,
    responses((status = 202, description = "the syncs requested, one per agent", body = Requested)))]
async fn request(
    State(s): State<AppointmentsState>,
    ApiJson(body): ApiJson<SyncBody>,
) -> ApiResult<(StatusCode, Json<Requested>)> {
    let site = SiteCode::parse(&body.site).map_err(|e| unprocessable("site", e.message))?;
    let set = s.store.load_config().await?;
    if !set
        .1
        .iter()
        .any(|r| matches!(r, meridian_shared::config::Resource::Site(x) if x.code == site))
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("site {site} not found"),
        ));
    }
    let syncs = s.store.request_appointment_sync(&site, "manual", s.clock.now()).await?;
    if syncs.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_agent",
            format!("site {site} has no enrolled agent to sync"),
        ));
    }
    s.commands_changed.send_modify(|n| *n = n.wrapping_add(1));
    tracing::info!(site = %site, syncs = syncs.len(), "appointment sync requested by hand");
    Ok((StatusCode::ACCEPTED, Json(Requested { syncs })))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    site: Option<String>,
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/appointments/syncs", tag = "appointments", summary = "Bulk syncs, newest first",
    params(ListQuery),
    responses((status = 200, description = "the syncs", body = Vec<SyncRecord>)))]
async fn list(
    State(s): State<AppointmentsState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<SyncRecord>>> {
    let Query(q) = query.map_err(query_error)?;
    let site = q
        .site
        .as_deref()
        .map(|raw| SiteCode::parse(raw).map_err(|e| unprocessable("site", e.message)))
        .transpose()?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(unprocessable("limit", "must be 1-1000".into()));
    }
    Ok(Json(s.store.list_appointment_syncs(site.as_ref(), limit).await?))
}

#[utoipa::path(get, path = "/appointments/syncs/{id}", tag = "appointments", summary = "One bulk sync",
    params(("id" = String, Path, description = "the sync's id (a UUID)")),
    responses((status = 200, description = "the sync", body = SyncRecord)))]
async fn show(
    State(s): State<AppointmentsState>,
    Path(id): Path<String>,
) -> ApiResult<Json<SyncRecord>> {
    let not_found =
        || ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("sync {id} not found"));
    let parsed: uuid::Uuid = id.parse().map_err(|_| not_found())?;
    s.store.appointment_sync(parsed).await?.map(Json).ok_or_else(not_found)
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ScheduleEntry {
    #[schema(value_type = String)]
    site: SiteCode,
    next_due_at: DateTime<Utc>,
}

#[utoipa::path(get, path = "/appointments/sync-schedule", tag = "appointments",
    summary = "Each site's next scheduled bulk sync",
    responses((status = 200, description = "per site", body = Vec<ScheduleEntry>)))]
async fn schedule(State(s): State<AppointmentsState>) -> ApiResult<Json<Vec<ScheduleEntry>>> {
    let rows = s.store.sync_schedule().await?;
    Ok(Json(
        rows.into_iter().map(|(site, next_due_at)| ScheduleEntry { site, next_due_at }).collect(),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ClosuresQuery {
    site: Option<String>,
    /// First site-local day, `YYYY-MM-DD` (default: 7 days ago by UTC).
    from: Option<String>,
    /// Last site-local day (default: a year after `from`).
    to: Option<String>,
}

#[utoipa::path(get, path = "/appointments/closures", tag = "appointments",
    summary = "Closures branches decided on their own", params(ClosuresQuery),
    responses((status = 200, description = "the closures: site, id, day, from, to, reason, closed_at, reopened_at", body = Vec<Object>)))]
async fn closures(
    State(s): State<AppointmentsState>,
    query: Result<Query<ClosuresQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<crate::store::appointments::SiteClosure>>> {
    let Query(q) = query.map_err(query_error)?;
    let site = q
        .site
        .as_deref()
        .map(|raw| SiteCode::parse(raw).map_err(|e| unprocessable("site", e.message)))
        .transpose()?;
    let day = |field: &str, raw: Option<&str>| {
        raw.map(|r| {
            r.parse::<chrono::NaiveDate>()
                .map_err(|_| unprocessable(field, format!("{r:?} is not a date YYYY-MM-DD")))
        })
        .transpose()
    };
    let from = day("from", q.from.as_deref())?
        .unwrap_or_else(|| s.clock.now().date_naive() - chrono::Days::new(7));
    let to = day("to", q.to.as_deref())?.unwrap_or(from + chrono::Days::new(366));
    if to < from {
        return Err(unprocessable("to", "must not be before from".into()));
    }
    Ok(Json(s.store.site_closures(site.as_ref(), from, to).await?))
}
