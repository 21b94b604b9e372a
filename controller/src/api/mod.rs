//! The admin REST API under `/api/v1` (JSON), authenticated with bearer API tokens. Read-only
//! (`viewer`) tokens may only read. Every error is a typed JSON body (`error::ApiError`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::auth;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::store::{Role, Store};

pub mod agents;
pub mod appointment_sync;
pub mod appointments;
pub mod error;
pub mod incidents;
pub mod openapi;
pub mod redact;
pub mod releases;
pub mod request_ops;
mod resources;
pub mod rollouts;
pub mod staff_access;
pub mod stats;

pub use agents::{AgentView, new_api_token};
use error::ApiError;
pub use stats::{StatsStatus, live};

/// A session is shown as connected only while it keeps reporting within this window.
pub const CONNECTED_WINDOW: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct ApiState {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    /// Wakes agent sessions after a configuration commit.
    pub commands_changed: Arc<tokio::sync::watch::Sender<u64>>,
    /// An agent whose last measured clock skew is beyond this shows `clock_alert`.
    pub clock_skew_tolerance: Duration,
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_name: String,
    pub role: Role,
}

/// The API on the wall clock.
pub fn router(state: ApiState, max_body_bytes: usize) -> Router {
    router_with_clock(state, max_body_bytes, Arc::new(meridian_shared::clock::SystemClock))
}

/// The API with the clock bookings are checked against (tests pass a `ManualClock`), trusting
/// no release key (release uploads are refused).
pub fn router_with_clock(
    state: ApiState,
    max_body_bytes: usize,
    clock: Arc<dyn meridian_shared::clock::Clock>,
) -> Router {
    router_with(state, max_body_bytes, clock, releases::ReleasePolicy::default())
}

/// The whole API: `router_with_clock` plus the release keys and the size limit that release
/// uploads are checked against (`Settings::release_policy`).
pub fn router_with(
    state: ApiState,
    max_body_bytes: usize,
    clock: Arc<dyn meridian_shared::clock::Clock>,
    release_policy: releases::ReleasePolicy,
) -> Router {
    let booking = appointments::AppointmentsState {
        store: state.store.clone(),
        clock,
        commands_changed: state.commands_changed.clone(),
    };
    let api = Router::new()
        .merge(resources::routes())
        .merge(staff_access::routes())
        .merge(agents::routes())
        .merge(stats::routes())
        .merge(request_ops::routes(request_ops::RequestOpsState {
            store: state.store.clone(),
            clock: booking.clock.clone(),
            commands_changed: state.commands_changed.clone(),
        }))
        .merge(releases::routes(releases::ReleasesState {
            store: state.store.clone(),
            metrics: state.metrics.clone(),
            policy: release_policy,
        }))
        .merge(rollouts::routes(rollouts::RolloutsState {
            store: state.store.clone(),
            clock: booking.clock.clone(),
            commands_changed: state.commands_changed.clone(),
        }))
        .merge(incidents::routes(incidents::IncidentsState { store: state.store.clone() }))
        .merge(appointment_sync::routes(booking.clone()))
        .merge(appointments::routes(booking))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .nest("/api/v1", api)
        .route("/api/v1/openapi.json", get(|| async { Json(openapi::document()) }))
        .route("/healthz", get(|| async { "ok" }))
        // A bearer API token of any role; `metrics_listen` serves it without one.
        .route(
            "/metrics",
            get(metrics).layer(middleware::from_fn_with_state(state.clone(), authenticate)),
        )
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::map_response(meridian_shared::http_guard::typed_error_body))
        .with_state(state)
}

/// JSON body extractor whose rejections are typed `ApiError`s.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(v) = Json::<T>::from_request(req, state).await?;
        Ok(ApiJson(v))
    }
}

async fn authenticate(State(state): State<ApiState>, mut req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(auth::bearer)
        .map(str::to_owned);
    let Some(token) = token else {
        return ApiError::from(Error::Unauthenticated).into_response();
    };
    let found = match state.store.api_token_by_hash(&auth::hash_secret(&token)).await {
        Ok(found) => found,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let Some(found) = found else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", "unknown API token")
            .into_response();
    };
    let read_only = matches!(*req.method(), Method::GET | Method::HEAD);
    if found.role == Role::Viewer && !read_only {
        return ApiError::from(Error::Forbidden("this token is read-only".into())).into_response();
    }
    req.extensions_mut().insert(Caller { token_name: found.name, role: found.role });
    let resp = next.run(req).await;
    if found.role == Role::Viewer { redact::for_viewer(resp).await } else { resp }
}

async fn metrics(State(state): State<ApiState>) -> Response {
    crate::metrics::scrape(&state.metrics)
}

pub(crate) fn query_error(e: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::from(Error::from(meridian_shared::ValidationError::new("query", e.body_text())))
}
