//! The OpenAPI 3.1 document of the admin API, served unauthenticated at
//! `/api/v1/openapi.json`. It is generated from the handlers (`#[utoipa::path]`) and the types
//! they take and return (`ToSchema`, `IntoParams`): each part of the API lists its operations in
//! its own `Doc`, nested here under `/api/v1`. Every operation gets the error responses every
//! handler can give (the typed `Error` body), bearer authentication, and the client errors of
//! a request body when it takes one. `controller/tests/openapi.rs` checks the document against
//! the router: every documented operation is routed and every routed one documented.

use serde_json::{Value, json};
use utoipa::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};

use super::error::{ErrorBody, FieldError};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Meridian admin API",
        description = "Configuration, agents, statistics, appointments, requests and releases \
                       of the central controller. Every error is a JSON body \
                       `{\"code\", \"message\", \"details\"?}` with a stable `code`. Viewer \
                       tokens may only read (`GET`).",
    ),
    security(("bearer" = [])),
    modifiers(&BearerAuth),
    components(schemas(ErrorBody, FieldError)),
)]
struct Base;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.description = Some(
            "An API token (`mrd_at_…`) from `POST /api/v1/api-tokens` or the bootstrap token."
                .into(),
        );
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The document, as served.
pub fn document() -> Value {
    let mut api = super::resources::Doc::openapi();
    for part in [
        super::agents::Doc::openapi(),
        super::stats::Doc::openapi(),
        super::staff_access::Doc::openapi(),
        super::request_ops::Doc::openapi(),
        super::releases::Doc::openapi(),
        super::rollouts::Doc::openapi(),
        super::incidents::Doc::openapi(),
        super::appointment_sync::Doc::openapi(),
        super::appointments::Doc::openapi(),
    ] {
        api.merge(part);
    }
    let mut doc = serde_json::to_value(Base::openapi().nest("/api/v1", api)).unwrap_or_default();
    doc["info"]["version"] = json!(meridian_shared::VERSION);
    if let Some(paths) = doc["paths"].as_object_mut() {
        for item in paths.values_mut() {
            let Some(item) = item.as_object_mut() else { continue };
            for (method, op) in item.iter_mut() {
                add_errors(method, op);
            }
        }
    }
    doc
}

/// The errors any operation may answer, unless its annotation says more about them.
fn add_errors(method: &str, op: &mut Value) {
    let error = |description: &str| {
        json!({"description": description,
               "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
    };
    let mut errors = vec![
        ("400", "malformed request: path, query string or body (`bad_request`, `malformed_json`)"),
        ("401", "no or unknown API token (`unauthenticated`)"),
        ("403", "the token may not do this, e.g. a viewer token writing (`forbidden`)"),
        ("404", "no such object (`not_found`)"),
        ("422", "invalid path, query or body fields, listed in `details` (`validation_failed`)"),
        ("429", "too many requests; retry later"),
        ("503", "the database is unavailable; retry later (`store_unavailable`)"),
    ];
    if method != "get" {
        errors.push(("409", "conflicts with the current state (`conflict` or a specific code)"));
        errors.push(("413", "body over the size limit (`payload_too_large`)"));
        errors.push(("415", "body is not `application/json` (`unsupported_media_type`)"));
    }
    let Some(responses) = op["responses"].as_object_mut() else { return };
    for (status, description) in errors {
        responses.entry(status).or_insert_with(|| error(description));
    }
}
