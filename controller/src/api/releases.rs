//! `/api/v1/releases…`: signed agent releases. Admin tokens upload and delete;
//! viewer tokens list (the router's authentication refuses a viewer's `POST`/`DELETE`).
//!
//! - `POST /releases` — `multipart/form-data` with the part `manifest` (the JSON
//!   `ReleaseManifest` that `meridianctl release sign` writes) **before** the part `artifact`
//!   (the binary). The manifest is checked first — form, signature against the configured
//!   `release_keys`, size within `max_release_bytes`, not a duplicate — then the artifact is
//!   streamed: hashed as it arrives and refused as soon as it grows past the manifest's size
//!   or the limit, never after buffering the whole body. Only a release whose artifact has
//!   exactly the signed size and SHA-256 is stored (row and chunks in one transaction): 201
//!   with the release. Every refusal stores nothing; what is left of a refused body is read
//!   and dropped (within the route's limit, for at most 10 s) so that the client reads the
//!   answer rather than a reset connection. An accepted artifact is held in memory (at most
//!   `max_release_bytes`) until its transaction commits.
//! - `GET /releases` — every release, newest version first;
//! - `GET /releases/{version}` — that version's releases, one per platform (404 if none);
//! - `DELETE /releases/{version}/{platform}` — 204, or 404.
//!
//! Refusals (status, `code`): no key configured 403 `release_keys_not_configured`; unsigned
//! 422 `unsigned_release`; signed by a key not in `release_keys` 422 `unknown_release_key`;
//! signature not matching 422 `bad_signature`; a bad manifest field (bad semver, unknown
//! platform, digest not 64 lowercase hex, size 0, …) 422 `malformed_manifest` with the field in
//! `details`; artifact not matching the signed size or SHA-256 422 `artifact_mismatch`; empty
//! artifact 422 `empty_artifact`; larger than `max_release_bytes` 413 `release_too_large`; a
//! (version, platform) already stored 409 `release_exists`; a body that is not the expected
//! multipart form (missing, repeated, unknown or misordered parts) 400 `malformed_upload`.

use std::sync::Arc;

use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use chrono::Utc;
use meridian_shared::ValidationError;
use meridian_shared::releases::{
    ArtifactDigest, PublicKey, ReleaseError, ReleaseManifest, verify_manifest,
};

use super::Caller;
use super::error::{ApiError, ApiResult, ErrorBody};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::store::releases::{NewRelease, RELEASE_CHUNK_BYTES, ReleaseRecord};

/// Default `max_release_bytes`: 200 MiB.
pub const DEFAULT_MAX_RELEASE_BYTES: u64 = 200 * 1024 * 1024;
/// Largest manifest part accepted.
const MAX_MANIFEST_BYTES: usize = 64 * 1024;
/// Room in the upload route's body limit for the manifest and the multipart framing.
const FORM_OVERHEAD_BYTES: u64 = 1024 * 1024;
/// How long the rest of a refused upload is read and dropped before the answer goes out.
const DISCARD_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// What the controller trusts and accepts: the release keys (`release_keys`) and the largest
/// artifact (`max_release_bytes`).
#[derive(Debug, Clone)]
pub struct ReleasePolicy {
    keys: Arc<[PublicKey]>,
    max_bytes: u64,
}

impl Default for ReleasePolicy {
    /// No trusted key (every upload refused), the default size limit.
    fn default() -> Self {
        Self { keys: Arc::from(Vec::new()), max_bytes: DEFAULT_MAX_RELEASE_BYTES }
    }
}

impl ReleasePolicy {
    /// Parses the configured keys; a malformed one is an error naming it.
    pub fn new(keys: &[String], max_bytes: u64) -> crate::Result<Self> {
        let keys = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                PublicKey::parse(k)
                    .map_err(|e| Error::BadRequest(format!("release_keys[{i}]: {e}")))
            })
            .collect::<crate::Result<Vec<_>>>()?;
        if max_bytes == 0 {
            return Err(Error::BadRequest("max_release_bytes must be above 0".into()));
        }
        Ok(Self { keys: Arc::from(keys), max_bytes })
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The upload route's body limit: the artifact limit plus room for the form around it.
    fn body_limit(&self) -> usize {
        usize::try_from(self.max_bytes.saturating_add(FORM_OVERHEAD_BYTES)).unwrap_or(usize::MAX)
    }
}

/// The form of `POST /releases`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct UploadForm {
    /// `{"version", "platform", "sha256", "size", "key_id", "signature", "notes"?}`.
    manifest: String,
    #[schema(value_type = String, format = Binary)]
    artifact: Vec<u8>,
}

/// The operations of this part of the API, relative to `/api/v1`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(list, upload, show, remove))]
pub(super) struct Doc;

/// What the release handlers need.
#[derive(Clone)]
pub struct ReleasesState {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub policy: ReleasePolicy,
}

/// The routes, to be nested under `/api/v1` behind authentication. The upload route allows
/// bodies up to `max_release_bytes` plus the form's overhead (the router's `max_body_bytes`
/// holds everywhere else).
pub fn routes<S: Clone + Send + Sync + 'static>(state: ReleasesState) -> Router<S> {
    let limit = state.policy.body_limit();
    Router::new()
        .route("/releases", get(list).merge(post(upload).layer(DefaultBodyLimit::max(limit))))
        .route("/releases/{version}", get(show))
        .route("/releases/{version}/{platform}", delete(remove))
        .with_state(state)
}

#[utoipa::path(get, path = "/releases", tag = "releases", summary = "Every uploaded agent release",
    responses((status = 200, description = "the releases", body = Vec<ReleaseRecord>)))]
async fn list(State(s): State<ReleasesState>) -> ApiResult<Json<Vec<ReleaseRecord>>> {
    Ok(Json(s.store.list_releases().await?))
}

#[utoipa::path(get, path = "/releases/{version}", tag = "releases",
    summary = "The releases of one version (one per platform)",
    params(("version" = String, Path, description = "semver, e.g. 1.4.0")),
    responses((status = 200, description = "the releases", body = Vec<ReleaseRecord>)))]
async fn show(
    State(s): State<ReleasesState>,
    Path(version): Path<String>,
) -> ApiResult<Json<Vec<ReleaseRecord>>> {
    let releases = s.store.releases_of_version(&version).await?;
    if releases.is_empty() {
        return Err(Error::NotFound(format!("release {}", shorten(&version))).into());
    }
    Ok(Json(releases))
}

#[utoipa::path(delete, path = "/releases/{version}/{platform}", tag = "releases",
    summary = "Delete a release",
    params(("version" = String, Path), ("platform" = String, Path, description = "e.g. x86_64-linux")),
    responses((status = 204, description = "deleted")))]
async fn remove(
    State(s): State<ReleasesState>,
    Extension(caller): Extension<Caller>,
    Path((version, platform)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    if s.store.delete_release(&version, &platform).await? {
        tracing::info!(version = %version, platform = %platform, by = %caller.token_name,
            "release deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Error::NotFound(format!("release {} for {}", shorten(&version), shorten(&platform)))
            .into())
    }
}

#[utoipa::path(post, path = "/releases", tag = "releases",
    summary = "Upload a signed agent release: a `manifest` part (JSON) and an `artifact` part",
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses((status = 201, description = "the release", body = ReleaseRecord)))]
async fn upload(
    State(s): State<ReleasesState>,
    Extension(caller): Extension<Caller>,
    form: Result<Multipart, MultipartRejection>,
) -> ApiResult<(StatusCode, Json<ReleaseRecord>)> {
    let result = match form {
        Ok(mut form) => {
            let result = receive(&s, &caller, &mut form).await;
            if result.is_err() {
                discard_rest(&mut form).await;
            }
            result
        }
        Err(r) => Err(malformed_upload(format!(
            "expected multipart/form-data with the parts `manifest` and `artifact`: {}",
            r.body_text()
        ))),
    };
    match &result {
        Ok((_, Json(r))) => {
            s.metrics.releases_uploaded.inc();
            tracing::info!(version = %r.version, platform = %r.platform, size = r.size,
                key = %r.key_id, by = %caller.token_name, "release uploaded");
        }
        Err(e) => {
            s.metrics.release_upload_refused(e.body.code);
            tracing::warn!(code = e.body.code, error = %e.body.message, by = %caller.token_name,
                "release upload refused");
        }
    }
    result
}

/// Reads and drops what is left of a refused upload (bounded by the route's body limit and by
/// `DISCARD_FOR`), so that the client reads the refusal instead of a connection reset while it
/// is still sending. Nothing of it is kept.
async fn discard_rest(form: &mut Multipart) {
    let drain = async {
        while let Ok(Some(mut field)) = form.next_field().await {
            while let Ok(Some(_)) = field.chunk().await {}
        }
    };
    let _ = tokio::time::timeout(DISCARD_FOR, drain).await;
}

/// Reads, checks and stores one upload (see the module documentation for the order).
async fn receive(
    s: &ReleasesState,
    caller: &Caller,
    form: &mut Multipart,
) -> ApiResult<(StatusCode, Json<ReleaseRecord>)> {
    if s.policy.keys().is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "release_keys_not_configured",
            "release uploads are refused: this controller trusts no release key (set \
             `release_keys` to the public key `meridianctl release keygen` printed)",
        ));
    }
    let mut manifest: Option<ReleaseManifest> = None;
    let mut artifact: Option<Artifact> = None;
    while let Some(mut field) = form.next_field().await.map_err(multipart_error)? {
        match field.name() {
            Some("manifest") => {
                if manifest.is_some() {
                    return Err(malformed_upload("the `manifest` part is repeated".into()));
                }
                let m = read_manifest(&mut field).await?;
                check_manifest(s, &m).await?;
                manifest = Some(m);
            }
            Some("artifact") => {
                let Some(m) = &manifest else {
                    return Err(malformed_upload(
                        "the `manifest` part must come before the `artifact` part".into(),
                    ));
                };
                if artifact.is_some() {
                    return Err(malformed_upload("the `artifact` part is repeated".into()));
                }
                artifact = Some(read_artifact(&mut field, m, s.policy.max_bytes()).await?);
            }
            other => {
                return Err(malformed_upload(format!(
                    "unknown part {:?}: send `manifest` and `artifact`",
                    other.map(shorten).unwrap_or_default()
                )));
            }
        }
    }
    let Some(manifest) = manifest else {
        return Err(malformed_upload("the `manifest` part is missing".into()));
    };
    let Some(artifact) = artifact else {
        return Err(malformed_upload("the `artifact` part is missing".into()));
    };
    if artifact.digest.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty_artifact",
            "the artifact is empty",
        ));
    }
    artifact.digest.check(&manifest).map_err(release_error)?;
    let release =
        NewRelease { manifest, uploaded_by: caller.token_name.clone(), uploaded_at: Utc::now() };
    let record = s.store.create_release(&release, &artifact.chunks).await.map_err(|e| match e {
        Error::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "release_exists", m),
        e => ApiError::from(e),
    })?;
    Ok((StatusCode::CREATED, Json(record)))
}

async fn read_manifest(
    field: &mut axum::extract::multipart::Field<'_>,
) -> ApiResult<ReleaseManifest> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        if bytes.len() + chunk.len() > MAX_MANIFEST_BYTES {
            return Err(malformed_manifest(
                "manifest",
                format!("larger than {MAX_MANIFEST_BYTES} bytes"),
            ));
        }
        bytes.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| malformed_manifest("manifest", format!("not a release manifest (JSON): {e}")))
}

/// Refuses a manifest that is malformed, not signed by a trusted key, too large or already
/// stored, before a byte of its artifact is read.
async fn check_manifest(s: &ReleasesState, m: &ReleaseManifest) -> ApiResult<()> {
    verify_manifest(m, s.policy.keys()).map_err(release_error)?;
    if m.size > s.policy.max_bytes() {
        return Err(too_large(s.policy.max_bytes()));
    }
    if s.store.release(&m.version, &m.platform).await?.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "release_exists",
            format!(
                "release {} for {} already exists; delete it first or upload another version",
                m.version, m.platform
            ),
        ));
    }
    Ok(())
}

/// An artifact as received: its digest and its bytes in store-sized chunks.
struct Artifact {
    digest: ArtifactDigest,
    chunks: Vec<Vec<u8>>,
}

/// Streams the artifact into chunks, hashing as it goes; refuses as soon as it grows past the
/// manifest's size or `max_bytes`.
async fn read_artifact(
    field: &mut axum::extract::multipart::Field<'_>,
    manifest: &ReleaseManifest,
    max_bytes: u64,
) -> ApiResult<Artifact> {
    let mut digest = ArtifactDigest::new();
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut current: Vec<u8> = Vec::new();
    while let Some(bytes) = field.chunk().await.map_err(multipart_error)? {
        let received = digest.len() + bytes.len() as u64;
        if received > max_bytes {
            return Err(too_large(max_bytes));
        }
        if received > manifest.size {
            return Err(release_error(ReleaseError::SizeMismatch {
                expected: manifest.size,
                actual: received,
            }));
        }
        digest.update(&bytes);
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            if current.capacity() == 0 {
                let left = manifest.size - chunks.len() as u64 * RELEASE_CHUNK_BYTES as u64;
                current.reserve_exact(left.min(RELEASE_CHUNK_BYTES as u64) as usize);
            }
            let take = (RELEASE_CHUNK_BYTES - current.len()).min(rest.len());
            current.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if current.len() == RELEASE_CHUNK_BYTES {
                chunks.push(std::mem::take(&mut current));
            }
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    Ok(Artifact { digest, chunks })
}

/// The API error for a refused manifest or artifact.
fn release_error(e: ReleaseError) -> ApiError {
    let message = e.to_string();
    match e {
        ReleaseError::Malformed(field, why) => malformed_manifest(field, why),
        ReleaseError::Unsigned => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unsigned_release", message)
        }
        ReleaseError::UnknownKey { .. } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unknown_release_key", message)
        }
        ReleaseError::BadSignature => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_signature", message)
        }
        ReleaseError::DigestMismatch { .. } | ReleaseError::SizeMismatch { .. } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "artifact_mismatch",
            format!("the artifact is not the signed one: {message}"),
        ),
        ReleaseError::BadKey(_) | ReleaseError::Read(_) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "malformed_upload", message)
        }
    }
}

fn malformed_manifest(field: &str, why: String) -> ApiError {
    ApiError {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        body: ErrorBody {
            code: "malformed_manifest",
            message: format!("the release manifest is malformed: {field}: {why}"),
            details: vec![ValidationError::new(field, why)],
        },
    }
}

fn malformed_upload(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "malformed_upload", message)
}

fn too_large(max_bytes: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "release_too_large",
        format!("the artifact is larger than this controller accepts ({max_bytes} bytes)"),
    )
}

fn multipart_error(e: MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "release_too_large", e.body_text())
    } else {
        malformed_upload(format!("the multipart body could not be read: {}", e.body_text()))
    }
}

/// At most 64 characters of untrusted text, for messages.
fn shorten(s: &str) -> String {
    s.chars().take(64).collect()
}
