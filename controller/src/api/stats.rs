//! Statistics: visits (JSON or CSV), sessions, the live branch panel, how current the
//! statistics are, quarantined events, and the rebuild of facts from raw events.

use meridian_shared::config::ConfigSet;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::error::ApiResult;
use super::resources::load_set;
use super::{ApiState, query_error};
use crate::error::Error;
use crate::store::Store;

/// The operations of this part of the API, relative to `/api/v1`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(visit_stats, session_stats, live_panel, stats_status, quarantine, rebuild_stats))]
pub(super) struct Doc;

/// The routes of this part of the API, nested under `/api/v1` behind authentication.
pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/stats/visits", get(visit_stats))
        .route("/stats/sessions", get(session_stats))
        .route("/stats/live", get(live_panel))
        .route("/stats/status", get(stats_status))
        .route("/stats/quarantine", get(quarantine))
        .route("/stats/rebuild", post(rebuild_stats))
}

fn wants_csv(format: Option<&str>) -> ApiResult<bool> {
    match format {
        None | Some("json") => Ok(false),
        Some("csv") => Ok(true),
        Some(other) => Err(Error::from(meridian_shared::ValidationError::new(
            "format",
            format!("unknown format {other:?}: use json or csv"),
        ))
        .into()),
    }
}

/// Visit statistics from the rollups (or facts, for intervals within a day), as JSON or CSV.
#[utoipa::path(get, path = "/stats/visits", tag = "statistics",
    summary = "Visit statistics by site, service, queue, counter, staff or day",
    params(crate::stats::query::StatsRequest),
    responses((status = 200, description = "one row per group and interval",
        content((Vec<crate::stats::report::Row> = "application/json"), (String = "text/csv")))))]
async fn visit_stats(
    State(s): State<ApiState>,
    query: Result<
        Query<crate::stats::query::StatsRequest>,
        axum::extract::rejection::QueryRejection,
    >,
) -> ApiResult<Response> {
    let Query(q) = query.map_err(query_error)?;
    let csv = wants_csv(q.format.as_deref())?;
    let (_, set) = load_set(&s).await?;
    let rows = crate::stats::query::rows(s.store.as_ref(), &set, &q).await?;
    if !csv {
        return Ok(Json(rows).into_response());
    }
    let out = crate::stats::query::csv(&rows);
    Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], out).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct SessionQuery {
    #[serde(default)]
    #[param(inline)]
    group_by: crate::stats::live::SessionGroup,
    site: Option<String>,
    from: Option<chrono::NaiveDate>,
    to: Option<chrono::NaiveDate>,
}

/// Counter and staff sessions: open, serving and idle time, on the given site-local days.
#[utoipa::path(get, path = "/stats/sessions", tag = "statistics",
    summary = "Counter and staff sessions: open, serving and idle time", params(SessionQuery),
    responses((status = 200, description = "one row per group", body = Vec<crate::stats::live::SessionRow>)))]
async fn session_stats(
    State(s): State<ApiState>,
    query: Result<Query<SessionQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<crate::stats::live::SessionRow>>> {
    let Query(q) = query.map_err(query_error)?;
    let (_, set) = load_set(&s).await?;
    // The same checks as visit statistics (site known, range sane).
    let check = crate::stats::query::StatsRequest {
        site: q.site.clone(),
        from: q.from,
        to: q.to,
        ..Default::default()
    };
    check.validate(&set)?;
    let filter = crate::store::stats::FactFilter {
        site: q.site,
        service: None,
        from_day: q.from.map(|d| d.to_string()),
        to_day: q.to.map(|d| d.to_string()),
    };
    let sessions = s.store.session_facts(&filter).await?;
    Ok(Json(crate::stats::live::session_rows(&sessions, q.group_by, Utc::now())))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct SiteQuery {
    site: Option<String>,
}

/// The live branch panel of every site (or one): queues, longest waits, open counters.
pub async fn live(
    store: &dyn Store,
    site: Option<&str>,
) -> crate::error::Result<Vec<crate::stats::live::SiteLive>> {
    let (_, resources) = store.load_config().await?;
    let set = ConfigSet::from_resources(resources);
    let sites: Vec<String> =
        set.sites().map(|s| s.code.to_string()).filter(|c| site.is_none_or(|s| s == c)).collect();
    if let Some(site) = site
        && sites.is_empty()
    {
        return Err(Error::from(meridian_shared::ValidationError::new(
            "site",
            format!("unknown site {site:?}"),
        )));
    }
    let agents = store.list_agents().await?;
    let open = store.open_transactions(site).await?;
    let sessions = store.open_sessions(site).await?;
    Ok(crate::stats::live::panel(&sites, &agents, &open, &sessions, Utc::now()))
}

#[utoipa::path(get, path = "/stats/live", tag = "statistics",
    summary = "The live panel of every site (or one): queues, longest waits, open counters",
    params(SiteQuery),
    responses((status = 200, description = "one entry per site", body = Vec<crate::stats::live::SiteLive>)))]
async fn live_panel(
    State(s): State<ApiState>,
    query: Result<Query<SiteQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<crate::stats::live::SiteLive>>> {
    let Query(q) = query.map_err(query_error)?;
    Ok(Json(live(s.store.as_ref(), q.site.as_deref()).await?))
}

/// How current the statistics are.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatsStatus {
    /// Events stored but not yet folded into facts.
    pub projection_lag: u64,
    /// Site-days whose rollups wait to be recomputed.
    pub pending_rollups: u64,
}

#[utoipa::path(get, path = "/stats/status", tag = "statistics", summary = "How current the statistics are",
    responses((status = 200, description = "lags", body = StatsStatus)))]
async fn stats_status(State(s): State<ApiState>) -> ApiResult<Json<StatsStatus>> {
    Ok(Json(StatsStatus {
        projection_lag: s.store.projection_lag().await?,
        pending_rollups: s.store.pending_rollups().await?,
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct LimitQuery {
    /// 1-1000, default 100.
    limit: Option<u32>,
}

/// Events statistics set aside, newest first, with why.
#[utoipa::path(get, path = "/stats/quarantine", tag = "statistics",
    summary = "Events statistics set aside, newest first, with why", params(LimitQuery),
    responses((status = 200, description = "the events", body = Vec<crate::store::stats::QuarantinedEvent>)))]
async fn quarantine(
    State(s): State<ApiState>,
    query: Result<Query<LimitQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<crate::store::stats::QuarantinedEvent>>> {
    let Query(q) = query.map_err(query_error)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Error::from(meridian_shared::ValidationError::new(
            "limit",
            "between 1 and 1000",
        ))
        .into());
    }
    Ok(Json(s.store.quarantined(limit).await?))
}

/// Drops facts and rollups; the projector rebuilds them from the raw events (admin only).
#[utoipa::path(post, path = "/stats/rebuild", tag = "statistics",
    summary = "Drop facts and rollups; the projector rebuilds them from the raw events",
    responses((status = 202, description = "the rebuild started")))]
async fn rebuild_stats(State(s): State<ApiState>) -> ApiResult<StatusCode> {
    s.store.reset_facts().await?;
    Ok(StatusCode::ACCEPTED)
}
