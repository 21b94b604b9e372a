//! `/api/v1/rollouts…`: agent upgrade rollouts. Admin tokens create, pause, resume
//! and abort; viewer tokens read (the router's authentication refuses their `POST` with 403).
//!
//! - `POST /rollouts` — `{"version", "platform", "targets", "waves"?, "wave_pause_s"?,
//!   "max_failures"?, "window"?, "allow_downgrade"?, "health_timeout_s"?}` (see
//!   `rollouts::CreateRequest`) → 201 with the rollout and its sites. Refused with nothing
//!   stored: 422 `validation_failed` naming each bad field (unknown version, no release for
//!   the platform, malformed targets / waves / window, unknown sites or tags, a downgrade
//!   without `allow_downgrade`), 422 `invalid_body` for an unknown field or a wrong type, 409
//!   `conflict` naming the sites already in an unfinished rollout;
//! - `GET /rollouts?state=&limit=` — newest first (`limit` 1-1000, default 100);
//! - `GET /rollouts/{id}` — the rollout, its counts per site state and every site with its
//!   state, reason, command and maintenance window (open until / opens at, by the API's clock);
//! - `POST /rollouts/{id}/pause`, `…/resume`, `…/abort {"reason"?}` — 409 when the rollout's
//!   state does not allow it. Abort cancels what has not switched (`AGENT_UPGRADE_CANCEL`) and
//!   wakes the gateway sessions.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::{DateTime, Utc};
use meridian_shared::clock::Clock;
use meridian_shared::config::ConfigSet;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ApiResult};
use super::{ApiJson, Caller, query_error};
use crate::error::Error;
use crate::rollouts::{self, CreateRequest, RolloutState, Window, WindowState};
use crate::store::Store;
use crate::store::rollouts::{
    NewRollout, Rollout, RolloutAction, RolloutDetail, RolloutFilter, RolloutSite,
};

/// What the rollout handlers need.
#[derive(Clone)]
pub struct RolloutsState {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    /// Wakes the gateway sessions after commands were added to agents' logs (abort).
    pub commands_changed: Arc<tokio::sync::watch::Sender<u64>>,
}

/// The operations of this part of the API, relative to `/api/v1`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(create, list, show, pause, resume, abort))]
pub(super) struct Doc;

/// The routes, to be nested under `/api/v1` behind authentication.
pub fn routes<S: Clone + Send + Sync + 'static>(state: RolloutsState) -> Router<S> {
    Router::new()
        .route("/rollouts", get(list).post(create))
        .route("/rollouts/{id}", get(show))
        .route("/rollouts/{id}/pause", post(pause))
        .route("/rollouts/{id}/resume", post(resume))
        .route("/rollouts/{id}/abort", post(abort))
        .with_state(state)
}

/// A rollout as the API shows it: its columns, counts per site state, and its sites.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutView {
    #[serde(flatten)]
    pub rollout: Rollout,
    pub sites: Vec<SiteView>,
}

/// One site of a rollout, with its maintenance window now (none once the site is final or the
/// rollout finished).
#[derive(Debug, Clone, Serialize)]
pub struct SiteView {
    #[serde(flatten)]
    pub site: RolloutSite,
    pub window: Option<WindowState>,
}

impl RolloutView {
    pub fn of(d: RolloutDetail, config: &ConfigSet, now: DateTime<Utc>) -> Self {
        let window = Window::from_json(&d.rollout.window);
        let finished = d.rollout.state.is_finished();
        let sites = d
            .sites
            .into_iter()
            .map(|s| SiteView {
                window: (!finished && !s.state.is_final())
                    .then(|| rollouts::site_window(config, window, &s.site, now)),
                site: s,
            })
            .collect();
        RolloutView { rollout: d.rollout, sites }
    }
}

async fn view(s: &RolloutsState, d: RolloutDetail) -> ApiResult<RolloutView> {
    let (_, resources) = s.store.load_config().await?;
    Ok(RolloutView::of(d, &ConfigSet::from_resources(resources), s.clock.now()))
}

#[utoipa::path(post, path = "/rollouts", tag = "releases",
    summary = "Roll a release out to sites in waves, within their windows",
    request_body = CreateRequest,
    responses((status = 201, description = "the rollout with its sites", body = Object)))]
async fn create(
    State(s): State<RolloutsState>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CreateRequest>,
) -> ApiResult<(StatusCode, Json<RolloutView>)> {
    let spec = rollouts::validate(&req).map_err(Error::Validation)?;
    let (_, resources) = s.store.load_config().await?;
    let config = ConfigSet::from_resources(resources);
    let agents = s.store.list_agents().await?;
    let sites = rollouts::plan(&spec, &config, &agents).map_err(Error::Validation)?;
    let new = NewRollout {
        id: uuid::Uuid::now_v7(),
        spec,
        sites,
        created_by: caller.token_name.clone(),
        at: s.clock.now(),
    };
    let detail = s.store.create_rollout(&new).await?;
    tracing::info!(rollout = %detail.rollout.id, version = %detail.rollout.version,
        platform = %detail.rollout.platform, sites = detail.sites.len(), by = %caller.token_name,
        "rollout created");
    Ok((StatusCode::CREATED, Json(RolloutView::of(detail, &config, s.clock.now()))))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub state: Option<String>,
    pub limit: Option<u32>,
}

/// Checks a listing query (an empty `state` means any).
pub fn list_filter(q: &ListQuery) -> ApiResult<RolloutFilter> {
    let state = match q.state.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(RolloutState::parse(s).ok_or_else(|| {
            let names: Vec<&str> = RolloutState::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::from(Error::from(meridian_shared::ValidationError::new(
                "state",
                format!("unknown state {s:?}: use one of {}", names.join(", ")),
            )))
        })?),
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(
            Error::from(meridian_shared::ValidationError::new("limit", "must be 1-1000")).into()
        );
    }
    Ok(RolloutFilter { state, limit })
}

type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

#[utoipa::path(get, path = "/rollouts", tag = "releases", summary = "Rollouts, newest first",
    params(ListQuery),
    responses((status = 200, description = "the rollouts", body = Vec<Object>)))]
async fn list(
    State(s): State<RolloutsState>,
    query: QueryResult<ListQuery>,
) -> ApiResult<Json<Vec<Rollout>>> {
    let Query(q) = query.map_err(query_error)?;
    Ok(Json(s.store.list_rollouts(&list_filter(&q)?).await?))
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("rollout {id} not found"))
}

/// A rollout id; anything that is not a UUID names no rollout.
fn rollout_id(id: &str) -> ApiResult<uuid::Uuid> {
    id.trim().parse().map_err(|_| not_found(id))
}

#[utoipa::path(get, path = "/rollouts/{id}", tag = "releases", summary = "One rollout with its sites", params(("id" = String, Path, description = "the rollout's id (a UUID)")),
    responses((status = 200, description = "the rollout", body = Object)))]
async fn show(
    State(s): State<RolloutsState>,
    Path(id): Path<String>,
) -> ApiResult<Json<RolloutView>> {
    let key = rollout_id(&id)?;
    let detail = s.store.rollout(key).await?.ok_or_else(|| not_found(&id))?;
    Ok(Json(view(&s, detail).await?))
}

async fn change(
    s: &RolloutsState,
    caller: &Caller,
    id: &str,
    action: RolloutAction,
) -> ApiResult<Json<RolloutView>> {
    let key = rollout_id(id)?;
    let detail = match s.store.change_rollout(key, &action, s.clock.now()).await {
        Ok(d) => d,
        Err(Error::NotFound(_)) => return Err(not_found(id)),
        Err(e) => return Err(e.into()),
    };
    tracing::info!(rollout = %key, action = ?action, by = %caller.token_name, "rollout changed");
    if matches!(action, RolloutAction::Abort { .. }) {
        s.commands_changed.send_modify(|n| *n = n.wrapping_add(1));
    }
    Ok(Json(view(s, detail).await?))
}

#[utoipa::path(post, path = "/rollouts/{id}/pause", tag = "releases", summary = "Pause a rollout", params(("id" = String, Path, description = "the rollout's id (a UUID)")),
    responses((status = 200, description = "the rollout", body = Object)))]
async fn pause(
    State(s): State<RolloutsState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<RolloutView>> {
    change(&s, &caller, &id, RolloutAction::Pause).await
}

#[utoipa::path(post, path = "/rollouts/{id}/resume", tag = "releases", summary = "Resume a paused rollout", params(("id" = String, Path, description = "the rollout's id (a UUID)")),
    responses((status = 200, description = "the rollout", body = Object)))]
async fn resume(
    State(s): State<RolloutsState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<RolloutView>> {
    change(&s, &caller, &id, RolloutAction::Resume).await
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct AbortBody {
    reason: Option<String>,
}

/// The body is optional; the reason recorded names the token either way.
#[utoipa::path(post, path = "/rollouts/{id}/abort", tag = "releases",
    summary = "Abort a rollout (the body is optional)", params(("id" = String, Path, description = "the rollout's id (a UUID)")),
    request_body = Option<AbortBody>,
    responses((status = 200, description = "the rollout", body = Object)))]
async fn abort(
    State(s): State<RolloutsState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<RolloutView>> {
    let req: AbortBody = optional_body(&body)?;
    let reason = match req.reason.as_deref().map(str::trim).filter(|r| !r.is_empty()) {
        Some(r) if r.chars().count() > 500 => {
            return Err(Error::from(meridian_shared::ValidationError::new(
                "reason",
                "must be at most 500 characters",
            ))
            .into());
        }
        Some(r) => format!("aborted by {}: {r}", caller.token_name),
        None => format!("aborted by {}", caller.token_name),
    };
    change(&s, &caller, &id, RolloutAction::Abort { reason }).await
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
