//! `/api/v1/incidents…`: what the start of agent sessions found and repaired when a store came
//! back from a backup (see `store::sessions`). Viewer tokens read; admin tokens acknowledge
//! (the router's authentication refuses a viewer's `POST` with 403).
//!
//! - `GET /incidents?agent=&open=true&limit=` — newest first (limit 1–1000, default 100).
//! - `POST /incidents/{id}/acknowledge` — 200 with the incident; 404 unknown; 409 when it was
//!   acknowledged already. An acknowledged incident no longer shows on its agent's row.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::Utc;
use serde::Deserialize;

use super::error::ApiResult;
use super::{Caller, query_error};
use crate::error::Error;
use crate::store::Store;
use crate::store::sessions::{Incident, IncidentFilter};

#[derive(Clone)]
pub struct IncidentsState {
    pub store: Arc<dyn Store>,
}

/// The operations of this part of the API, relative to `/api/v1`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(list, acknowledge))]
pub(super) struct Doc;

pub fn routes<S: Clone + Send + Sync + 'static>(state: IncidentsState) -> Router<S> {
    Router::new()
        .route("/incidents", get(list))
        .route("/incidents/{id}/acknowledge", post(acknowledge))
        .with_state(state)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    agent: Option<String>,
    #[serde(default)]
    open: bool,
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/incidents", tag = "agents",
    summary = "What the start of agent sessions found and repaired, newest first", params(ListQuery),
    responses((status = 200, description = "the incidents", body = Vec<Incident>)))]
async fn list(
    State(s): State<IncidentsState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<Incident>>> {
    let Query(q) = query.map_err(query_error)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Error::from(meridian_shared::ValidationError::new(
            "limit",
            "must be between 1 and 1000",
        ))
        .into());
    }
    if let Some(a) = &q.agent
        && a.parse::<meridian_shared::AgentId>().is_err()
    {
        return Err(Error::from(meridian_shared::ValidationError::new(
            "agent",
            format!("{a:?} is not an agent id"),
        ))
        .into());
    }
    let filter = IncidentFilter { agent: q.agent, open_only: q.open, limit };
    Ok(Json(s.store.incidents(&filter).await?))
}

#[utoipa::path(post, path = "/incidents/{id}/acknowledge", tag = "agents", summary = "Acknowledge an incident",
    params(("id" = String, Path, description = "the incident's id (a UUID)")),
    responses((status = 200, description = "the incident, acknowledged", body = Incident)))]
async fn acknowledge(
    State(s): State<IncidentsState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Incident>> {
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(Error::NotFound(format!("incident {id}")).into());
    }
    let done = s.store.acknowledge_incident(&id, &caller.token_name, Utc::now()).await?;
    let found = s
        .store
        .incidents(&IncidentFilter { agent: None, open_only: false, limit: 1000 })
        .await?
        .into_iter()
        .find(|i| i.id == id);
    match (done, found) {
        (true, Some(i)) => {
            tracing::info!(incident = %i.id, agent = %i.agent_id, site = %i.site, kind = i.kind.as_str(),
                by = %caller.token_name, "incident acknowledged");
            Ok(Json(i))
        }
        (false, Some(i)) => Err(Error::Conflict(format!(
            "incident {id} was acknowledged already by {}",
            i.acknowledged_by.unwrap_or_default()
        ))
        .into()),
        (_, None) => Err(Error::NotFound(format!("incident {id}")).into()),
    }
}
