//! The admin REST API under `/api/v1` (JSON), authenticated with bearer API tokens. Read-only
//! (`viewer`) tokens may only read. Every error is a typed JSON body (`error::ApiError`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::Utc;
use meridian_shared::config::{ConfigSet, Resource, ResourceKey, ResourceKind};
use meridian_shared::{AgentId, SiteCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::auth;
use crate::config_admin::{self, ChangeMode, ChangeReport, ResourceInput};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::store::{AgentRecord, ApiToken, EnrollmentToken, Role, Store};

pub mod appointment_sync;
pub mod appointments;
pub mod error;
pub mod incidents;
pub mod releases;
pub mod request_ops;
pub mod rollouts;

use error::{ApiError, ApiResult};

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
        .route("/sites", get(list_sites).post(create_site))
        .route("/sites/{site}", get(get_site).put(put_site).delete(delete_site))
        .route("/sites/{site}/{kind}", get(list_site_resources).post(create_site_resource))
        .route(
            "/sites/{site}/{kind}/{code}",
            get(get_site_resource).put(put_site_resource).delete(delete_site_resource),
        )
        .route("/staff", get(list_staff).post(create_staff))
        .route("/staff/{username}", get(get_staff).put(put_staff).delete(delete_staff))
        .merge(global_routes("/request-types", ResourceKind::RequestType))
        .merge(global_routes("/request-mappings", ResourceKind::RequestMapping))
        .merge(global_routes("/request-rules", ResourceKind::RequestRule))
        .merge(global_routes("/request-pools", ResourceKind::RequestPool))
        .route("/config", get(export_config))
        .route("/config/revisions", get(list_revisions))
        .route("/apply", post(apply))
        .route("/delete", post(delete_many))
        .route("/enrollment-tokens", get(list_enrollment_tokens).post(create_enrollment_token))
        .route("/agents", get(list_agents))
        .route("/agents/{id}", get(get_agent))
        .route("/agents/{id}/revoke", post(revoke_agent))
        .route("/api-tokens", get(list_api_tokens).post(create_api_token))
        .route("/api-tokens/{id}", axum::routing::delete(delete_api_token))
        .route("/stats/visits", get(visit_stats))
        .route("/stats/sessions", get(session_stats))
        .route("/stats/live", get(live_panel))
        .route("/stats/status", get(stats_status))
        .route("/stats/quarantine", get(quarantine))
        .route("/stats/rebuild", post(rebuild_stats))
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
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::map_response(typed_error_body))
        .with_state(state)
}

/// axum answers some requests itself with a plain-text or empty body (405 for a method a route
/// does not have, 400 for an undecodable path segment or query string); this gives those the
/// typed JSON error body too. Responses that are already JSON pass through untouched.
async fn typed_error_body(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            ("method_not_allowed", "this endpoint does not support this method".to_owned())
        }
        StatusCode::NOT_FOUND => ("not_found", "no such endpoint".to_owned()),
        s if s.is_server_error() => ("internal", "internal error".to_owned()),
        _ if text.is_empty() => {
            ("bad_request", status.canonical_reason().unwrap_or("bad request").to_owned())
        }
        _ => ("bad_request", text),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_TYPE);
    let typed = ApiError::new(status, code, message).into_response();
    let (typed_parts, typed_body) = typed.into_parts();
    parts.headers.extend(typed_parts.headers);
    Response::from_parts(parts, typed_body)
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
    next.run(req).await
}

async fn metrics(State(state): State<ApiState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

// ---------- configuration resources ----------

fn kind_from_segment(segment: &str) -> ApiResult<ResourceKind> {
    let kind = match segment {
        "services" => ResourceKind::Service,
        "queues" => ResourceKind::Queue,
        "service-points" => ResourceKind::ServicePoint,
        "work-profiles" => ResourceKind::WorkProfile,
        "connector-keys" => ResourceKind::ConnectorKey,
        "webhooks" => ResourceKind::Webhook,
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "unknown collection {other:?}: use services, queues, service-points, work-profiles, connector-keys or webhooks"
                ),
            ));
        }
    };
    Ok(kind)
}

fn site_code(s: &str) -> ApiResult<SiteCode> {
    SiteCode::parse(s).map_err(|e| ApiError::from(Error::from(e)))
}

/// The public view of a resource: staff password hashes are never returned.
fn view(res: &Resource) -> Value {
    let mut v = serde_json::to_value(res).unwrap_or(Value::Null);
    if let Some(obj) = v.as_object_mut() {
        obj.remove("password_hash");
        // Webhook signing secrets are write-only.
        if obj.get("kind").and_then(Value::as_str) == Some("webhook") {
            obj.remove("secret");
        }
    }
    v
}

/// A connector key created without `key_hash` gets a generated secret: its hash is stored and
/// the secret returned once (in `secret`).
fn generate_connector_secret(kind: ResourceKind, body: &mut Value) -> Option<String> {
    let obj = body.as_object_mut()?;
    if kind != ResourceKind::ConnectorKey || obj.contains_key("key_hash") {
        return None;
    }
    let secret = auth::new_secret("mrd_ck_");
    obj.insert("key_hash".into(), Value::String(auth::hash_secret(&secret)));
    Some(secret)
}

/// Turns a kind-specific body into a `ResourceInput`, filling `kind` (and `site` / `code` from
/// the path when absent) and refusing a body that names another object than its path.
fn input_from_body(
    kind: ResourceKind,
    site: Option<&SiteCode>,
    code: Option<&str>,
    body: Value,
) -> ApiResult<ResourceInput> {
    let Value::Object(mut obj) = body else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            "the body must be a JSON object",
        ));
    };
    if let Some(k) = obj.get("kind")
        && k != kind.as_str()
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("kind must be {kind}"),
        ));
    }
    obj.insert("kind".into(), Value::String(kind.as_str().into()));
    let code_field = match kind {
        ResourceKind::StaffUser => "username",
        _ => "code",
    };
    let mut fill = |field: &str, value: &str| -> ApiResult<()> {
        match obj.get(field) {
            None => {
                obj.insert(field.into(), Value::String(value.into()));
                Ok(())
            }
            Some(Value::String(s)) if s == value => Ok(()),
            Some(_) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("{field} in the body does not match the path ({value})"),
            )),
        }
    };
    if let Some(site) = site {
        fill(if kind == ResourceKind::Site { "code" } else { "site" }, site.as_str())?;
    }
    if let Some(code) = code {
        fill(code_field, code)?;
    }
    serde_json::from_value(Value::Object(obj)).map_err(|e| {
        ApiError::from(Error::from(meridian_shared::ValidationError::new(
            kind.as_str(),
            e.to_string(),
        )))
    })
}

async fn load_set(state: &ApiState) -> ApiResult<(u64, ConfigSet)> {
    let (rev, resources) = state.store.load_config().await?;
    Ok((rev, ConfigSet::from_resources(resources)))
}

fn key(kind: ResourceKind, site: Option<&SiteCode>, code: &str) -> ResourceKey {
    ResourceKey { kind, site: site.cloned(), code: code.to_owned() }
}

async fn list_of(
    state: &ApiState,
    kind: ResourceKind,
    site: Option<&SiteCode>,
) -> ApiResult<Json<Vec<Value>>> {
    let (_, set) = load_set(state).await?;
    if let Some(site) = site
        && set.site(site).is_none()
    {
        return Err(Error::NotFound(format!("site {site}")).into());
    }
    Ok(Json(
        set.resources
            .iter()
            .filter(|(k, _)| k.kind == kind && (site.is_none() || k.site.as_ref() == site))
            .map(|(_, r)| view(r))
            .collect(),
    ))
}

async fn get_one(state: &ApiState, key: ResourceKey) -> ApiResult<Json<Value>> {
    let (_, set) = load_set(state).await?;
    set.get(&key).map(|r| Json(view(r))).ok_or_else(|| Error::NotFound(key.to_string()).into())
}

async fn write_one(
    state: &ApiState,
    caller: &Caller,
    input: ResourceInput,
    mode: ChangeMode,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let key = input.key();
    let report =
        config_admin::change(state.store.as_ref(), &caller.token_name, vec![input], vec![], mode)
            .await?;
    notify(state, &report);
    let (_, set) = load_set(state).await?;
    let body = set.get(&key).map(view).unwrap_or(Value::Null);
    let status = if mode == ChangeMode::CreateOnly { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(body)))
}

async fn delete_one(state: &ApiState, caller: &Caller, key: ResourceKey) -> ApiResult<StatusCode> {
    let report = config_admin::change(
        state.store.as_ref(),
        &caller.token_name,
        vec![],
        vec![key],
        ChangeMode::Upsert,
    )
    .await?;
    notify(state, &report);
    Ok(StatusCode::NO_CONTENT)
}

fn notify(state: &ApiState, report: &ChangeReport) {
    if !report.sites_published.is_empty() && !report.dry_run {
        state.commands_changed.send_modify(|n| *n += 1);
    }
}

async fn list_sites(State(s): State<ApiState>) -> ApiResult<Json<Vec<Value>>> {
    list_of(&s, ResourceKind::Site, None).await
}
async fn create_site(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let input = input_from_body(ResourceKind::Site, None, None, body)?;
    write_one(&s, &c, input, ChangeMode::CreateOnly).await
}
async fn get_site(State(s): State<ApiState>, Path(site): Path<String>) -> ApiResult<Json<Value>> {
    get_one(&s, key(ResourceKind::Site, None, site_code(&site)?.as_str())).await
}
async fn put_site(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path(site): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let input = input_from_body(ResourceKind::Site, Some(&site_code(&site)?), None, body)?;
    write_one(&s, &c, input, ChangeMode::Upsert).await
}
async fn delete_site(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path(site): Path<String>,
) -> ApiResult<StatusCode> {
    delete_one(&s, &c, key(ResourceKind::Site, None, site_code(&site)?.as_str())).await
}
async fn list_site_resources(
    State(s): State<ApiState>,
    Path((site, kind)): Path<(String, String)>,
) -> ApiResult<Json<Vec<Value>>> {
    list_of(&s, kind_from_segment(&kind)?, Some(&site_code(&site)?)).await
}
async fn create_site_resource(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path((site, kind)): Path<(String, String)>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let kind = kind_from_segment(&kind)?;
    let mut body = body;
    let secret = generate_connector_secret(kind, &mut body);
    let input = input_from_body(kind, Some(&site_code(&site)?), None, body)?;
    let (status, Json(mut created)) = write_one(&s, &c, input, ChangeMode::CreateOnly).await?;
    if let (Some(secret), Some(obj)) = (secret, created.as_object_mut()) {
        obj.insert("secret".into(), Value::String(secret));
    }
    Ok((status, Json(created)))
}
async fn get_site_resource(
    State(s): State<ApiState>,
    Path((site, kind, code)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    get_one(&s, key(kind_from_segment(&kind)?, Some(&site_code(&site)?), &code)).await
}
async fn put_site_resource(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path((site, kind, code)): Path<(String, String, String)>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let input =
        input_from_body(kind_from_segment(&kind)?, Some(&site_code(&site)?), Some(&code), body)?;
    write_one(&s, &c, input, ChangeMode::Upsert).await
}
async fn delete_site_resource(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path((site, kind, code)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    delete_one(&s, &c, key(kind_from_segment(&kind)?, Some(&site_code(&site)?), &code)).await
}
async fn list_staff(State(s): State<ApiState>) -> ApiResult<Json<Vec<Value>>> {
    list_of(&s, ResourceKind::StaffUser, None).await
}
async fn create_staff(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let input = input_from_body(ResourceKind::StaffUser, None, None, body)?;
    write_one(&s, &c, input, ChangeMode::CreateOnly).await
}
async fn get_staff(
    State(s): State<ApiState>,
    Path(username): Path<String>,
) -> ApiResult<Json<Value>> {
    get_one(&s, key(ResourceKind::StaffUser, None, &username)).await
}
async fn put_staff(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path(username): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let input = input_from_body(ResourceKind::StaffUser, None, Some(&username), body)?;
    write_one(&s, &c, input, ChangeMode::Upsert).await
}
async fn delete_staff(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path(username): Path<String>,
) -> ApiResult<StatusCode> {
    delete_one(&s, &c, key(ResourceKind::StaffUser, None, &username)).await
}

/// `GET|POST {base}` and `GET|PUT|DELETE {base}/{code}` for a global configuration kind
/// (request types, request mappings).
fn global_routes(base: &str, kind: ResourceKind) -> Router<ApiState> {
    Router::new()
        .route(
            base,
            get(move |State(s): State<ApiState>| async move { list_of(&s, kind, None).await })
                .post(
                    move |State(s): State<ApiState>,
                          Extension(c): Extension<Caller>,
                          ApiJson(body): ApiJson<Value>| async move {
                        let input = input_from_body(kind, None, None, body)?;
                        write_one(&s, &c, input, ChangeMode::CreateOnly).await
                    },
                ),
        )
        .route(
            &format!("{base}/{{code}}"),
            get(move |State(s): State<ApiState>, Path(code): Path<String>| async move {
                get_one(&s, key(kind, None, &code)).await
            })
            .put(
                move |State(s): State<ApiState>,
                      Extension(c): Extension<Caller>,
                      Path(code): Path<String>,
                      ApiJson(body): ApiJson<Value>| async move {
                    let input = input_from_body(kind, None, Some(&code), body)?;
                    write_one(&s, &c, input, ChangeMode::Upsert).await
                },
            )
            .delete(
                move |State(s): State<ApiState>,
                      Extension(c): Extension<Caller>,
                      Path(code): Path<String>| async move {
                    delete_one(&s, &c, key(kind, None, &code)).await
                },
            ),
        )
}

#[derive(Serialize)]
struct ConfigExport {
    revision: u64,
    resources: Vec<Value>,
}

async fn export_config(State(s): State<ApiState>) -> ApiResult<Json<ConfigExport>> {
    let (revision, set) = load_set(&s).await?;
    Ok(Json(ConfigExport { revision, resources: set.resources.values().map(view).collect() }))
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<u32>,
}

async fn list_revisions(
    State(s): State<ApiState>,
    Query(q): Query<Limit>,
) -> ApiResult<Json<Vec<crate::store::RevisionInfo>>> {
    Ok(Json(s.store.config_revisions(q.limit.unwrap_or(50).min(1000)).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyRequest {
    resources: Vec<Value>,
    #[serde(default)]
    dry_run: bool,
}

/// Declarative apply: create or update every resource in the request, in one revision.
async fn apply(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<ApplyRequest>,
) -> ApiResult<Json<ChangeReport>> {
    let mut inputs = Vec::with_capacity(req.resources.len());
    let mut errs = meridian_shared::ValidationErrors::default();
    for (i, raw) in req.resources.into_iter().enumerate() {
        match serde_json::from_value::<ResourceInput>(raw) {
            Ok(input) => inputs.push(input),
            Err(e) => errs.push(format!("resources[{i}]"), e.to_string()),
        }
    }
    errs.into_result().map_err(Error::from)?;
    let mode = if req.dry_run { ChangeMode::DryRun } else { ChangeMode::Upsert };
    let report =
        config_admin::change(s.store.as_ref(), &c.token_name, inputs, vec![], mode).await?;
    notify(&s, &report);
    Ok(Json(report))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteRequest {
    resources: Vec<ResourceKey>,
    #[serde(default)]
    dry_run: bool,
}

async fn delete_many(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<DeleteRequest>,
) -> ApiResult<Json<ChangeReport>> {
    let mode = if req.dry_run { ChangeMode::DryRun } else { ChangeMode::Upsert };
    let report =
        config_admin::change(s.store.as_ref(), &c.token_name, vec![], req.resources, mode).await?;
    notify(&s, &report);
    Ok(Json(report))
}

// ---------- enrollment ----------

/// Default and maximum lifetime of an enrollment token.
const DEFAULT_ENROLLMENT_TTL: u64 = 24 * 3600;
const MAX_ENROLLMENT_TTL: u64 = 30 * 24 * 3600;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewEnrollmentToken {
    site: String,
    ttl_seconds: Option<u64>,
}

#[derive(Serialize)]
struct CreatedEnrollmentToken {
    id: String,
    site: String,
    /// Shown once; only its hash is kept.
    token: String,
    expires_at: chrono::DateTime<Utc>,
}

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

async fn list_enrollment_tokens(
    State(s): State<ApiState>,
) -> ApiResult<Json<Vec<EnrollmentToken>>> {
    Ok(Json(s.store.list_enrollment_tokens().await?))
}

// ---------- agents ----------

/// An agent as the API shows it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
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

async fn list_agents(State(s): State<ApiState>) -> ApiResult<Json<Vec<AgentView>>> {
    let tolerance = s.clock_skew_tolerance;
    Ok(Json(
        s.store.list_agents().await?.into_iter().map(|a| AgentView::new(a, tolerance)).collect(),
    ))
}

async fn get_agent(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<AgentView>> {
    let id = agent_id(&id)?;
    let agent = s.store.agent(id).await?.ok_or_else(|| Error::NotFound(format!("agent {id}")))?;
    Ok(Json(AgentView::new(agent, s.clock_skew_tolerance)))
}

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewApiToken {
    name: String,
    role: Role,
}

#[derive(Serialize)]
struct CreatedApiToken {
    #[serde(flatten)]
    token: ApiToken,
    /// Shown once; only its hash is kept.
    secret: String,
}

async fn list_api_tokens(State(s): State<ApiState>) -> ApiResult<Json<Vec<ApiToken>>> {
    Ok(Json(s.store.list_api_tokens().await?))
}

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

// ---------- statistics ----------

fn query_error(e: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::from(Error::from(meridian_shared::ValidationError::new("query", e.body_text())))
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionQuery {
    #[serde(default)]
    group_by: crate::stats::live::SessionGroup,
    site: Option<String>,
    from: Option<chrono::NaiveDate>,
    to: Option<chrono::NaiveDate>,
}

/// Counter and staff sessions: open, serving and idle time, on the given site-local days.
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

#[derive(Debug, Deserialize)]
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

async fn live_panel(
    State(s): State<ApiState>,
    query: Result<Query<SiteQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<crate::stats::live::SiteLive>>> {
    let Query(q) = query.map_err(query_error)?;
    Ok(Json(live(s.store.as_ref(), q.site.as_deref()).await?))
}

/// How current the statistics are.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsStatus {
    /// Events stored but not yet folded into facts.
    pub projection_lag: u64,
    /// Site-days whose rollups wait to be recomputed.
    pub pending_rollups: u64,
}

async fn stats_status(State(s): State<ApiState>) -> ApiResult<Json<StatsStatus>> {
    Ok(Json(StatsStatus {
        projection_lag: s.store.projection_lag().await?,
        pending_rollups: s.store.pending_rollups().await?,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitQuery {
    limit: Option<u32>,
}

/// Events statistics set aside, newest first, with why.
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
async fn rebuild_stats(State(s): State<ApiState>) -> ApiResult<StatusCode> {
    s.store.reset_facts().await?;
    Ok(StatusCode::ACCEPTED)
}
