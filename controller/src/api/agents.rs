//! Enrollment tokens, agents (their view, revocation) and API tokens.

use std::time::Duration;

use meridian_shared::AgentId;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::CONNECTED_WINDOW;
use super::error::{ApiError, ApiResult};
use super::resources::{load_set, site_code};
use super::{ApiJson, ApiState};
use crate::auth;
use crate::error::Error;
use crate::store::{AgentRecord, ApiToken, EnrollmentToken, Role};

/// The operations of this part of the API, relative to `/api/v1`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    create_enrollment_token,
    list_enrollment_tokens,
    list_agents,
    get_agent,
    revoke_agent,
    list_api_tokens,
    create_api_token,
    delete_api_token,
))]
pub(super) struct Doc;

/// The routes of this part of the API, nested under `/api/v1` behind authentication.
pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/enrollment-tokens", get(list_enrollment_tokens).post(create_enrollment_token))
        .route("/agents", get(list_agents))
        .route("/agents/{id}", get(get_agent))
        .route("/agents/{id}/revoke", post(revoke_agent))
        .route("/api-tokens", get(list_api_tokens).post(create_api_token))
        .route("/api-tokens/{id}", axum::routing::delete(delete_api_token))
}
// ---------- enrollment ----------

/// Default and maximum lifetime of an enrollment token.
const DEFAULT_ENROLLMENT_TTL: u64 = 24 * 3600;
const MAX_ENROLLMENT_TTL: u64 = 30 * 24 * 3600;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewEnrollmentToken {
    /// The site's code.
    site: String,
    /// Lifetime, 1 s to 30 days (default 24 h).
    ttl_seconds: Option<u64>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct CreatedEnrollmentToken {
    id: String,
    site: String,
    /// Shown once; only its hash is kept.
    token: String,
    expires_at: chrono::DateTime<Utc>,
}

#[utoipa::path(post, path = "/enrollment-tokens", tag = "agents",
    summary = "A one-time token that enrolls an agent for a site",
    request_body = NewEnrollmentToken,
    responses((status = 201, description = "the token, shown once", body = CreatedEnrollmentToken)))]
async fn create_enrollment_token(
    State(s): State<ApiState>,
    ApiJson(req): ApiJson<NewEnrollmentToken>,
) -> ApiResult<(StatusCode, Json<CreatedEnrollmentToken>)> {
    let site = site_code(&req.site)?;
    let ttl = req.ttl_seconds.unwrap_or(DEFAULT_ENROLLMENT_TTL);
    if ttl == 0 || ttl > MAX_ENROLLMENT_TTL {
        return Err(Error::from(meridian_shared::ValidationError::new(
            "ttl_seconds",
            format!("must be between 1 and {MAX_ENROLLMENT_TTL}"),
        ))
        .into());
    }
    let (_, set) = load_set(&s).await?;
    if set.site(&site).is_none() {
        return Err(Error::from(meridian_shared::ValidationError::new(
            "site",
            format!("unknown site {site}"),
        ))
        .into());
    }
    let token = auth::new_secret("mrd_enr_");
    let now = Utc::now();
    let record = EnrollmentToken {
        id: uuid::Uuid::new_v4().to_string(),
        site: site.clone(),
        token_hash: auth::hash_secret(&token),
        created_at: now,
        expires_at: now + chrono::Duration::seconds(ttl as i64),
        used_at: None,
        used_by_agent: None,
    };
    s.store.insert_enrollment_token(&record).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedEnrollmentToken {
            id: record.id,
            site: site.to_string(),
            token,
            expires_at: record.expires_at,
        }),
    ))
}

#[utoipa::path(get, path = "/enrollment-tokens", tag = "agents",
    summary = "Enrollment tokens (their hashes left out)",
    responses((status = 200, description = "the tokens", body = Vec<EnrollmentToken>)))]
async fn list_enrollment_tokens(
    State(s): State<ApiState>,
) -> ApiResult<Json<Vec<EnrollmentToken>>> {
    Ok(Json(s.store.list_enrollment_tokens().await?))
}

// ---------- agents ----------

/// An agent as the API shows it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, utoipa::ToSchema)]
pub struct AgentView {
    pub id: String,
    pub site: String,
    pub hostname: String,
    pub version: String,
    pub connected: bool,
    pub last_seen: Option<chrono::DateTime<Utc>>,
    /// The configuration revision the agent has applied.
    pub config_revision: u64,
    /// The newest revision of its site's configuration.
    pub site_revision: u64,
    pub config_current: bool,
    /// Highest event sequence stored centrally, gapless.
    pub acked_seq: u64,
    /// Outbox backlog as last reported by the agent.
    pub outbox_pending: u64,
    /// Agent clock minus controller clock, as measured at the last report.
    pub clock_skew_ms: i64,
    /// Whether that skew is beyond the controller's `clock_skew_tolerance_ms`.
    pub clock_alert: bool,
    pub command_seq: u64,
    pub command_acked_seq: u64,
    pub command_error: Option<String>,
    pub store_error: Option<String>,
    pub enrolled_at: chrono::DateTime<Utc>,
    pub revoked: bool,
    pub revoked_at: Option<chrono::DateTime<Utc>>,
    /// Incidents of this agent not acknowledged yet (`/api/v1/incidents`): a store restored
    /// from a backup on either end, a gap of events.
    #[serde(default)]
    pub open_incidents: u64,
    /// The newest of them, e.g. "restored from backup: resequenced 300 events".
    #[serde(default)]
    pub incident: Option<String>,
}

impl AgentView {
    /// The view of `a`, its clock judged against `clock_skew_tolerance`.
    pub fn new(a: AgentRecord, clock_skew_tolerance: Duration) -> Self {
        let fresh = a.last_seen.is_some_and(|t| {
            Utc::now()
                .signed_duration_since(t)
                .to_std()
                .map(|d| d < CONNECTED_WINDOW)
                .unwrap_or(true)
        });
        AgentView {
            id: a.id.to_string(),
            site: a.site.to_string(),
            hostname: a.hostname,
            version: a.version,
            connected: a.connected && fresh && a.revoked_at.is_none(),
            last_seen: a.last_seen,
            config_revision: a.config_revision,
            site_revision: a.site_revision,
            config_current: a.config_revision >= a.site_revision,
            acked_seq: a.acked_seq,
            outbox_pending: a.outbox_pending,
            clock_skew_ms: a.clock_skew_ms,
            clock_alert: crate::clock_skew::alert(a.clock_skew_ms, clock_skew_tolerance),
            command_seq: a.command_seq,
            command_acked_seq: a.command_acked_seq,
            command_error: a.command_error,
            store_error: a.store_error,
            enrolled_at: a.enrolled_at,
            revoked: a.revoked_at.is_some(),
            revoked_at: a.revoked_at,
            open_incidents: a.open_incidents,
            incident: a.incident,
        }
    }
}

fn agent_id(s: &str) -> ApiResult<AgentId> {
    s.parse().map_err(|_| {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("{s:?} is not an agent id"))
    })
}

#[utoipa::path(get, path = "/agents", tag = "agents", summary = "Every agent",
    responses((status = 200, description = "the agents", body = Vec<AgentView>)))]
async fn list_agents(State(s): State<ApiState>) -> ApiResult<Json<Vec<AgentView>>> {
    let tolerance = s.clock_skew_tolerance;
    Ok(Json(
        s.store.list_agents().await?.into_iter().map(|a| AgentView::new(a, tolerance)).collect(),
    ))
}

#[utoipa::path(get, path = "/agents/{id}", tag = "agents", summary = "One agent", params(("id" = String, Path, description = "the agent's id")),
    responses((status = 200, description = "the agent", body = AgentView)))]
async fn get_agent(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<AgentView>> {
    let id = agent_id(&id)?;
    let agent = s.store.agent(id).await?.ok_or_else(|| Error::NotFound(format!("agent {id}")))?;
    Ok(Json(AgentView::new(agent, s.clock_skew_tolerance)))
}

#[utoipa::path(post, path = "/agents/{id}/revoke", tag = "agents",
    summary = "Revoke an agent's credential (its session ends)", params(("id" = String, Path, description = "the agent's id")),
    responses((status = 200, description = "the agent, revoked", body = AgentView)))]
async fn revoke_agent(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<AgentView>> {
    let id = agent_id(&id)?;
    let agent = s.store.agent(id).await?.ok_or_else(|| Error::NotFound(format!("agent {id}")))?;
    if agent.revoked_at.is_none() {
        s.store.revoke_agent(id, Utc::now()).await?;
        // Sessions re-check their credential when woken.
        s.commands_changed.send_modify(|n| *n += 1);
    }
    let agent = s.store.agent(id).await?.ok_or_else(|| Error::NotFound(format!("agent {id}")))?;
    Ok(Json(AgentView::new(agent, s.clock_skew_tolerance)))
}

// ---------- API tokens ----------

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewApiToken {
    name: String,
    role: Role,
}

#[derive(Serialize, utoipa::ToSchema)]
struct CreatedApiToken {
    #[serde(flatten)]
    token: ApiToken,
    /// Shown once; only its hash is kept.
    secret: String,
}

#[utoipa::path(get, path = "/api-tokens", tag = "agents", summary = "API tokens (their hashes left out)",
    responses((status = 200, description = "the tokens", body = Vec<ApiToken>)))]
async fn list_api_tokens(State(s): State<ApiState>) -> ApiResult<Json<Vec<ApiToken>>> {
    Ok(Json(s.store.list_api_tokens().await?))
}

#[utoipa::path(post, path = "/api-tokens", tag = "agents", summary = "A new API token",
    request_body = NewApiToken,
    responses((status = 201, description = "the token with its secret, shown once", body = CreatedApiToken)))]
async fn create_api_token(
    State(s): State<ApiState>,
    ApiJson(req): ApiJson<NewApiToken>,
) -> ApiResult<(StatusCode, Json<CreatedApiToken>)> {
    if req.name.trim().is_empty() || req.name.len() > 100 {
        return Err(
            Error::from(meridian_shared::ValidationError::new("name", "1-100 characters")).into()
        );
    }
    let (token, secret) = new_api_token(&req.name, req.role);
    s.store.insert_api_token(&token).await?;
    Ok((StatusCode::CREATED, Json(CreatedApiToken { token, secret })))
}

#[utoipa::path(delete, path = "/api-tokens/{id}", tag = "agents", summary = "Delete an API token",
    params(("id" = String, Path, description = "the token's id")),
    responses((status = 204, description = "deleted")))]
async fn delete_api_token(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    if s.store.delete_api_token(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Error::NotFound(format!("API token {id}")).into())
    }
}

/// A new token record and its secret (shown once).
pub fn new_api_token(name: &str, role: Role) -> (ApiToken, String) {
    let secret = auth::new_secret("mrd_at_");
    let token = ApiToken {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.to_owned(),
        role,
        token_hash: auth::hash_secret(&secret),
        created_at: Utc::now(),
    };
    (token, secret)
}
