//! Configuration resources: sites and their services, queues, counters, work profiles,
//! connector keys and webhooks; staff; the global request types, mappings, rules and pools;
//! the whole configuration, its revisions, declarative apply and delete.

use meridian_shared::SiteCode;
use meridian_shared::config::{ConfigSet, Resource, ResourceKey, ResourceKind};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{ApiError, ApiResult};
use super::{ApiJson, ApiState, Caller};
use crate::auth;
use crate::config_admin::{self, ChangeMode, ChangeReport, ResourceInput};
use crate::error::Error;

/// The operations of this part of the API, relative to `/api/v1`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    list_sites,
    create_site,
    get_site,
    put_site,
    delete_site,
    list_site_resources,
    create_site_resource,
    get_site_resource,
    put_site_resource,
    delete_site_resource,
    list_staff,
    create_staff,
    get_staff,
    put_staff,
    delete_staff,
    request_types::list,
    request_types::create,
    request_types::show,
    request_types::put,
    request_types::delete,
    request_mappings::list,
    request_mappings::create,
    request_mappings::show,
    request_mappings::put,
    request_mappings::delete,
    request_rules::list,
    request_rules::create,
    request_rules::show,
    request_rules::put,
    request_rules::delete,
    request_pools::list,
    request_pools::create,
    request_pools::show,
    request_pools::put,
    request_pools::delete,
    export_config,
    list_revisions,
    apply,
    delete_many,
))]
pub(super) struct Doc;

/// The routes of this part of the API, nested under `/api/v1` behind authentication.
pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/sites", get(list_sites).post(create_site))
        .route("/sites/{site}", get(get_site).put(put_site).delete(delete_site))
        .route("/sites/{site}/{kind}", get(list_site_resources).post(create_site_resource))
        .route(
            "/sites/{site}/{kind}/{code}",
            get(get_site_resource).put(put_site_resource).delete(delete_site_resource),
        )
        .route("/staff", get(list_staff).post(create_staff))
        .route("/staff/{username}", get(get_staff).put(put_staff).delete(delete_staff))
        .route("/request-types", get(request_types::list).post(request_types::create))
        .route(
            "/request-types/{code}",
            get(request_types::show).put(request_types::put).delete(request_types::delete),
        )
        .route("/request-mappings", get(request_mappings::list).post(request_mappings::create))
        .route(
            "/request-mappings/{code}",
            get(request_mappings::show).put(request_mappings::put).delete(request_mappings::delete),
        )
        .route("/request-rules", get(request_rules::list).post(request_rules::create))
        .route(
            "/request-rules/{code}",
            get(request_rules::show).put(request_rules::put).delete(request_rules::delete),
        )
        .route("/request-pools", get(request_pools::list).post(request_pools::create))
        .route(
            "/request-pools/{code}",
            get(request_pools::show).put(request_pools::put).delete(request_pools::delete),
        )
        .route("/config", get(export_config))
        .route("/config/revisions", get(list_revisions))
        .route("/apply", post(apply))
        .route("/delete", post(delete_many))
}

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

pub(super) fn site_code(s: &str) -> ApiResult<SiteCode> {
    SiteCode::parse(s).map_err(|e| ApiError::from(Error::from(e)))
}

/// The public view of a resource: staff password hashes are never returned.
pub(super) fn view(res: &Resource) -> Value {
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

pub(super) async fn load_set(state: &ApiState) -> ApiResult<(u64, ConfigSet)> {
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

#[utoipa::path(
    get,
    path = "/sites",
    tag = "configuration",
    summary = "Every site",
    responses((status = 200, description = "the resources, secrets left out", body = Vec<Object>))
)]
async fn list_sites(State(s): State<ApiState>) -> ApiResult<Json<Vec<Value>>> {
    list_of(&s, ResourceKind::Site, None).await
}
#[utoipa::path(
    post,
    path = "/sites",
    tag = "configuration",
    summary = "Create a site",
    request_body(content = Object, description = "the resource, as in `meridian apply` files; `kind`, `site` and `code` may be left out (taken from the path)"),
    responses((status = 201, description = "created (a connector key made without `key_hash` carries its generated `secret`, shown once)", body = Object))
)]
async fn create_site(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let input = input_from_body(ResourceKind::Site, None, None, body)?;
    write_one(&s, &c, input, ChangeMode::CreateOnly).await
}
#[utoipa::path(
    get,
    path = "/sites/{site}",
    tag = "configuration",
    summary = "One site",
    params(("site" = String, Path, description = "site code, e.g. SFO")),
    responses((status = 200, description = "the resource, secrets left out", body = Object))
)]
async fn get_site(State(s): State<ApiState>, Path(site): Path<String>) -> ApiResult<Json<Value>> {
    get_one(&s, key(ResourceKind::Site, None, site_code(&site)?.as_str())).await
}
#[utoipa::path(
    put,
    path = "/sites/{site}",
    tag = "configuration",
    summary = "Create or replace a site",
    params(("site" = String, Path, description = "site code, e.g. SFO")),
    request_body(content = Object, description = "the resource, as in `meridian apply` files; `kind`, `site` and `code` may be left out (taken from the path)"),
    responses((status = 200, description = "created or replaced", body = Object))
)]
async fn put_site(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path(site): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let input = input_from_body(ResourceKind::Site, Some(&site_code(&site)?), None, body)?;
    write_one(&s, &c, input, ChangeMode::Upsert).await
}
#[utoipa::path(
    delete,
    path = "/sites/{site}",
    tag = "configuration",
    summary = "Delete a site",
    params(("site" = String, Path, description = "site code, e.g. SFO")),
    responses((status = 204, description = "deleted"))
)]
async fn delete_site(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path(site): Path<String>,
) -> ApiResult<StatusCode> {
    delete_one(&s, &c, key(ResourceKind::Site, None, site_code(&site)?.as_str())).await
}
#[utoipa::path(
    get,
    path = "/sites/{site}/{kind}",
    tag = "configuration",
    summary = "A site's resources of one kind",
    params(("site" = String, Path, description = "site code, e.g. SFO"), ("kind" = inline(SiteCollection), Path, description = "the kind of resource")),
    responses((status = 200, description = "the resources, secrets left out", body = Vec<Object>))
)]
async fn list_site_resources(
    State(s): State<ApiState>,
    Path((site, kind)): Path<(String, String)>,
) -> ApiResult<Json<Vec<Value>>> {
    list_of(&s, kind_from_segment(&kind)?, Some(&site_code(&site)?)).await
}
#[utoipa::path(
    post,
    path = "/sites/{site}/{kind}",
    tag = "configuration",
    summary = "Create a resource of a site",
    params(("site" = String, Path, description = "site code, e.g. SFO"), ("kind" = inline(SiteCollection), Path, description = "the kind of resource")),
    request_body(content = Object, description = "the resource, as in `meridian apply` files; `kind`, `site` and `code` may be left out (taken from the path)"),
    responses((status = 201, description = "created (a connector key made without `key_hash` carries its generated `secret`, shown once)", body = Object))
)]
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
#[utoipa::path(
    get,
    path = "/sites/{site}/{kind}/{code}",
    tag = "configuration",
    summary = "One resource of a site",
    params(("site" = String, Path, description = "site code, e.g. SFO"), ("kind" = inline(SiteCollection), Path, description = "the kind of resource"), ("code" = String, Path, description = "the resource's code")),
    responses((status = 200, description = "the resource, secrets left out", body = Object))
)]
async fn get_site_resource(
    State(s): State<ApiState>,
    Path((site, kind, code)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    get_one(&s, key(kind_from_segment(&kind)?, Some(&site_code(&site)?), &code)).await
}
#[utoipa::path(
    put,
    path = "/sites/{site}/{kind}/{code}",
    tag = "configuration",
    summary = "Create or replace a resource of a site",
    params(("site" = String, Path, description = "site code, e.g. SFO"), ("kind" = inline(SiteCollection), Path, description = "the kind of resource"), ("code" = String, Path, description = "the resource's code")),
    request_body(content = Object, description = "the resource, as in `meridian apply` files; `kind`, `site` and `code` may be left out (taken from the path)"),
    responses((status = 200, description = "created or replaced", body = Object))
)]
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
#[utoipa::path(
    delete,
    path = "/sites/{site}/{kind}/{code}",
    tag = "configuration",
    summary = "Delete a resource of a site",
    params(("site" = String, Path, description = "site code, e.g. SFO"), ("kind" = inline(SiteCollection), Path, description = "the kind of resource"), ("code" = String, Path, description = "the resource's code")),
    responses((status = 204, description = "deleted"))
)]
async fn delete_site_resource(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path((site, kind, code)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    delete_one(&s, &c, key(kind_from_segment(&kind)?, Some(&site_code(&site)?), &code)).await
}
#[utoipa::path(
    get,
    path = "/staff",
    tag = "configuration",
    summary = "Every staff user (password hashes left out)",
    responses((status = 200, description = "the resources, secrets left out", body = Vec<Object>))
)]
async fn list_staff(State(s): State<ApiState>) -> ApiResult<Json<Vec<Value>>> {
    list_of(&s, ResourceKind::StaffUser, None).await
}
#[utoipa::path(
    post,
    path = "/staff",
    tag = "configuration",
    summary = "Create a staff user",
    request_body(content = Object, description = "the resource, as in `meridian apply` files; `kind`, `site` and `code` may be left out (taken from the path)"),
    responses((status = 201, description = "created (a connector key made without `key_hash` carries its generated `secret`, shown once)", body = Object))
)]
async fn create_staff(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let input = input_from_body(ResourceKind::StaffUser, None, None, body)?;
    write_one(&s, &c, input, ChangeMode::CreateOnly).await
}
#[utoipa::path(
    get,
    path = "/staff/{username}",
    tag = "configuration",
    summary = "One staff user",
    params(("username" = String, Path)),
    responses((status = 200, description = "the resource, secrets left out", body = Object))
)]
async fn get_staff(
    State(s): State<ApiState>,
    Path(username): Path<String>,
) -> ApiResult<Json<Value>> {
    get_one(&s, key(ResourceKind::StaffUser, None, &username)).await
}
#[utoipa::path(
    put,
    path = "/staff/{username}",
    tag = "configuration",
    summary = "Create or replace a staff user",
    params(("username" = String, Path)),
    request_body(content = Object, description = "the resource, as in `meridian apply` files; `kind`, `site` and `code` may be left out (taken from the path)"),
    responses((status = 200, description = "created or replaced", body = Object))
)]
async fn put_staff(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path(username): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let input = input_from_body(ResourceKind::StaffUser, None, Some(&username), body)?;
    write_one(&s, &c, input, ChangeMode::Upsert).await
}
#[utoipa::path(
    delete,
    path = "/staff/{username}",
    tag = "configuration",
    summary = "Delete a staff user",
    params(("username" = String, Path)),
    responses((status = 204, description = "deleted"))
)]
async fn delete_staff(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path(username): Path<String>,
) -> ApiResult<StatusCode> {
    delete_one(&s, &c, key(ResourceKind::StaffUser, None, &username)).await
}

/// `GET|POST {base}` and `GET|PUT|DELETE {base}/{code}` of a global configuration kind: the
/// handlers of one kind in a module of that name.
macro_rules! global_kind {
    ($module:ident, $kind:expr, $base:literal, $item:literal, $what:literal) => {
        mod $module {
            use super::*;

            const KIND: ResourceKind = $kind;

            #[utoipa::path(get, path = $base, tag = "configuration", summary = concat!("Every ", $what),
                responses((status = 200, description = "the resources", body = Vec<Object>)))]
            pub(super) async fn list(State(s): State<ApiState>) -> ApiResult<Json<Vec<Value>>> {
                list_of(&s, KIND, None).await
            }

            #[utoipa::path(post, path = $base, tag = "configuration", summary = concat!("Create a ", $what),
                request_body(content = Object, description = "the resource; `kind` may be left out"),
                responses((status = 201, description = "created", body = Object)))]
            pub(super) async fn create(
                State(s): State<ApiState>,
                Extension(c): Extension<Caller>,
                ApiJson(body): ApiJson<Value>,
            ) -> ApiResult<(StatusCode, Json<Value>)> {
                let input = input_from_body(KIND, None, None, body)?;
                write_one(&s, &c, input, ChangeMode::CreateOnly).await
            }

            #[utoipa::path(get, path = $item, tag = "configuration", summary = concat!("One ", $what),
                params(("code" = String, Path)),
                responses((status = 200, description = "the resource", body = Object)))]
            pub(super) async fn show(
                State(s): State<ApiState>,
                Path(code): Path<String>,
            ) -> ApiResult<Json<Value>> {
                get_one(&s, key(KIND, None, &code)).await
            }

            #[utoipa::path(put, path = $item, tag = "configuration",
                summary = concat!("Create or replace a ", $what),
                params(("code" = String, Path)),
                request_body(content = Object, description = "the resource; `kind` and `code` may be left out"),
                responses((status = 200, description = "created or replaced", body = Object)))]
            pub(super) async fn put(
                State(s): State<ApiState>,
                Extension(c): Extension<Caller>,
                Path(code): Path<String>,
                ApiJson(body): ApiJson<Value>,
            ) -> ApiResult<(StatusCode, Json<Value>)> {
                let input = input_from_body(KIND, None, Some(&code), body)?;
                write_one(&s, &c, input, ChangeMode::Upsert).await
            }

            #[utoipa::path(delete, path = $item, tag = "configuration", summary = concat!("Delete a ", $what),
                params(("code" = String, Path)),
                responses((status = 204, description = "deleted")))]
            pub(super) async fn delete(
                State(s): State<ApiState>,
                Extension(c): Extension<Caller>,
                Path(code): Path<String>,
            ) -> ApiResult<StatusCode> {
                delete_one(&s, &c, key(KIND, None, &code)).await
            }
        }
    };
}

global_kind!(
    request_types,
    ResourceKind::RequestType,
    "/request-types",
    "/request-types/{code}",
    "request type"
);
global_kind!(
    request_mappings,
    ResourceKind::RequestMapping,
    "/request-mappings",
    "/request-mappings/{code}",
    "request mapping"
);
global_kind!(
    request_rules,
    ResourceKind::RequestRule,
    "/request-rules",
    "/request-rules/{code}",
    "request distribution rule"
);
global_kind!(
    request_pools,
    ResourceKind::RequestPool,
    "/request-pools",
    "/request-pools/{code}",
    "request pool"
);

/// The kinds of resource a site holds, as path segments.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "kebab-case")]
enum SiteCollection {
    Services,
    Queues,
    ServicePoints,
    WorkProfiles,
    ConnectorKeys,
    Webhooks,
}

#[derive(Serialize, utoipa::ToSchema)]
struct ConfigExport {
    revision: u64,
    /// Every resource, secrets left out.
    #[schema(value_type = Vec<Object>)]
    resources: Vec<Value>,
}

#[utoipa::path(
    get,
    path = "/config",
    tag = "configuration",
    summary = "The whole configuration at its newest revision",
    responses((status = 200, description = "every resource", body = ConfigExport))
)]
async fn export_config(State(s): State<ApiState>) -> ApiResult<Json<ConfigExport>> {
    let (revision, set) = load_set(&s).await?;
    Ok(Json(ConfigExport { revision, resources: set.resources.values().map(view).collect() }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct Limit {
    /// At most this many (default 50, at most 1000).
    limit: Option<u32>,
}

#[utoipa::path(
    get,
    path = "/config/revisions",
    tag = "configuration",
    summary = "Configuration revisions, newest first",
    params(Limit),
    responses((status = 200, description = "revisions", body = Vec<crate::store::RevisionInfo>))
)]
async fn list_revisions(
    State(s): State<ApiState>,
    Query(q): Query<Limit>,
) -> ApiResult<Json<Vec<crate::store::RevisionInfo>>> {
    Ok(Json(s.store.config_revisions(q.limit.unwrap_or(50).min(1000)).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ApplyRequest {
    /// Resources, each with its `kind`.
    #[schema(value_type = Vec<Object>)]
    resources: Vec<Value>,
    #[serde(default)]
    dry_run: bool,
}

/// Declarative apply: create or update every resource in the request, in one revision.
#[utoipa::path(
    post,
    path = "/apply",
    tag = "configuration",
    summary = "Create or update every resource given, in one revision (or only check them: `dry_run`)",
    request_body = ApplyRequest,
    responses((status = 200, description = "what changed", body = ChangeReport))
)]
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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct DeleteRequest {
    /// `{"kind", "site"?, "code"}` of each resource.
    #[schema(value_type = Vec<Object>)]
    resources: Vec<ResourceKey>,
    #[serde(default)]
    dry_run: bool,
}

#[utoipa::path(
    post,
    path = "/delete",
    tag = "configuration",
    summary = "Delete the resources named, in one revision (or only check: `dry_run`)",
    request_body = DeleteRequest,
    responses((status = 200, description = "what changed", body = ChangeReport))
)]
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

/// Wakes the agent sessions when a configuration change published revisions to sites.
pub(super) fn notify(state: &ApiState, report: &ChangeReport) {
    if !report.sites_published.is_empty() && !report.dry_run {
        state.commands_changed.send_modify(|n| *n += 1);
    }
}
