//! Signed agent releases at the controller, on SQLite and PostgreSQL, against a
//! served controller (`server::serve` on 127.0.0.1:0 with `release_keys` and a 3 MiB
//! `max_release_bytes`; the global body limit stays at 1 MiB):
//! - `POST /api/v1/releases` stores a release signed by a trusted key whose artifact matches,
//!   in 1 MiB chunks, and refuses everything else with its typed 4xx, storing nothing (no row,
//!   no chunk): unsigned, wrong signature, unknown key, tampered or longer or empty artifact,
//!   malformed manifest fields, oversize, duplicate, badly formed uploads, viewer tokens, and
//!   any upload when no key is configured;
//! - `FetchRelease` streams the artifact in chunks of at most 1 MiB, whole and resumed from an
//!   offset in the middle of a chunk, both reassembling to the signed SHA-256; unknown
//!   releases are NOT_FOUND, offsets beyond the end INVALID_ARGUMENT, calls without a valid
//!   agent credential UNAUTHENTICATED; the bytes served are counted in `/metrics`;
//! - the real `meridianctl` binary: `release keygen`, `sign`, `upload`, `list`, `show`.

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use meridian_controller::Settings;
use meridian_controller::api::{self, ApiState};
use meridian_controller::config_admin::{self, ChangeMode, ResourceInput};
use meridian_controller::metrics::Metrics;
use meridian_controller::server::{Listeners, ensure_bootstrap_token, serve};
use meridian_controller::store::{Role, Store};
use meridian_controller::testing::{fresh_postgres_url, fresh_sqlite_url, temp_dir};
use meridian_proto::agent_gateway_client::AgentGatewayClient;
use meridian_proto::{EnrollRequest, FetchReleaseRequest, ReleaseChunk};
use meridian_shared::releases::{self, PrivateKey, ReleaseManifest, UnsignedRelease};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const MIB: usize = 1024 * 1024;
const MAX_RELEASE_BYTES: u64 = 3 * MIB as u64;
const PLATFORM: &str = "x86_64-linux";

/// A served controller trusting `trusted`'s public key, with an enrolled agent at SFO.
struct Served {
    store: Arc<dyn Store>,
    url: String,
    api: String,
    gateway: String,
    admin: String,
    viewer: String,
    credential: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    served: tokio::task::JoinHandle<meridian_controller::Result<()>>,
}

impl Served {
    async fn start(url: &str, trusted: &[&PrivateKey]) -> Served {
        let store: Arc<dyn Store> = meridian_controller::store::open(url).await.expect("store");
        let site: ResourceInput = serde_json::from_value(
            json!({"kind": "site", "code": "SFO", "name": "San Francisco", "time_zone": "America/Los_Angeles"}),
        )
        .expect("site");
        config_admin::change(store.as_ref(), "test", vec![site], vec![], ChangeMode::Upsert)
            .await
            .expect("config");
        let admin =
            ensure_bootstrap_token(store.as_ref(), None).await.expect("bootstrap").expect("fresh");
        let (token, viewer) = api::new_api_token("dashboard", Role::Viewer);
        store.insert_api_token(&token).await.expect("viewer token");

        let api_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gw_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let api = format!("http://{}", api_listener.local_addr().expect("addr"));
        let gateway = format!("http://{}", gw_listener.local_addr().expect("addr"));
        let settings = Settings {
            release_keys: trusted.iter().map(|k| k.public_key().to_string()).collect(),
            max_release_bytes: MAX_RELEASE_BYTES,
            ..Settings::default()
        };
        assert_eq!(settings.max_body_bytes, MIB, "uploads must pass the route's own limit");
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(serve(
            settings,
            store.clone(),
            Listeners { api: api_listener, gateway: gw_listener },
            shutdown.clone(),
        ));
        let http = reqwest::Client::new();

        // Enroll an agent the real way: an enrollment token from the API, then `Enroll`.
        let created: Value = http
            .post(format!("{api}/api/v1/enrollment-tokens"))
            .bearer_auth(&admin)
            .json(&json!({"site": "SFO"}))
            .send()
            .await
            .expect("enrollment token")
            .json()
            .await
            .expect("token body");
        let mut client = AgentGatewayClient::connect(gateway.clone()).await.expect("gateway");
        let enrolled = client
            .enroll(EnrollRequest {
                token: created["token"].as_str().expect("token").to_owned(),
                hostname: "sfo-agent".into(),
                version: "1.3.0".into(),
            })
            .await
            .expect("enroll")
            .into_inner();
        Served {
            store,
            url: url.to_owned(),
            api,
            gateway,
            admin,
            viewer,
            credential: enrolled.credential,
            http,
            shutdown,
            served,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.served.await.expect("served task").expect("served cleanly");
    }

    /// Posts a release form; returns the status and the JSON body.
    async fn post(&self, token: &str, form: Form) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}/api/v1/releases", self.api))
            .bearer_auth(token)
            .multipart(form)
            .send()
            .await
            .expect("upload");
        let status = StatusCode::from_u16(resp.status().as_u16()).expect("status");
        (status, resp.json().await.expect("JSON body"))
    }

    async fn upload(&self, manifest: &Value, artifact: &[u8]) -> (StatusCode, Value) {
        self.post(&self.admin, form(&manifest.to_string(), artifact)).await
    }

    async fn get(&self, token: &str, path: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .get(format!("{}/api/v1/{path}", self.api))
            .bearer_auth(token)
            .send()
            .await
            .expect("get");
        let status = StatusCode::from_u16(resp.status().as_u16()).expect("status");
        (status, resp.json().await.expect("JSON body"))
    }

    async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.api))
            .bearer_auth(&self.viewer)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// Rows in `releases` and `release_chunks`.
    async fn stored(&self) -> (i64, i64) {
        let q = ["SELECT COUNT(*) FROM releases", "SELECT COUNT(*) FROM release_chunks"];
        let mut counts = [0i64; 2];
        if self.url.starts_with("sqlite:") {
            let pool = sqlx::SqlitePool::connect(&self.url).await.expect("sqlite");
            for (i, q) in q.iter().enumerate() {
                counts[i] = sqlx::query_scalar(*q).fetch_one(&pool).await.expect("count");
            }
            pool.close().await;
        } else {
            let pool = sqlx::PgPool::connect(&self.url).await.expect("postgres");
            for (i, q) in q.iter().enumerate() {
                counts[i] = sqlx::query_scalar(*q).fetch_one(&pool).await.expect("count");
            }
            pool.close().await;
        }
        (counts[0], counts[1])
    }

    async fn fetch(
        &self,
        credential: Option<&str>,
        version: &str,
        platform: &str,
        offset: u64,
    ) -> Result<Vec<ReleaseChunk>, tonic::Status> {
        let mut client = AgentGatewayClient::connect(self.gateway.clone()).await.expect("gateway");
        let mut req = tonic::Request::new(FetchReleaseRequest {
            version: version.into(),
            platform: platform.into(),
            offset,
        });
        if let Some(c) = credential {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {c}").parse().expect("ascii"));
        }
        let mut stream = client.fetch_release(req).await?.into_inner();
        let mut chunks = vec![];
        while let Some(chunk) = stream.message().await? {
            chunks.push(chunk);
        }
        Ok(chunks)
    }
}

fn form(manifest: &str, artifact: &[u8]) -> Form {
    Form::new()
        .part("manifest", Part::text(manifest.to_owned()))
        .part("artifact", Part::bytes(artifact.to_vec()).file_name("meridian-agent"))
}

/// `len` deterministic, incompressible-looking bytes.
fn artifact(len: usize, seed: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut block = Sha256::digest([seed]);
    while out.len() < len {
        out.extend_from_slice(&block);
        block = Sha256::digest(block);
    }
    out.truncate(len);
    out
}

fn sign(key: &PrivateKey, version: &str, platform: &str, bytes: &[u8]) -> ReleaseManifest {
    let unsigned =
        UnsignedRelease::of_artifact(version, platform, "Faster kiosk", bytes).expect("digest");
    releases::sign(key, unsigned).expect("sign")
}

fn as_json(m: &ReleaseManifest) -> Value {
    serde_json::to_value(m).expect("manifest JSON")
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Checks the stream's framing (contiguous offsets from `from`, chunks of at most 1 MiB) and
/// returns the bytes.
fn reassemble(chunks: &[ReleaseChunk], from: u64) -> Vec<u8> {
    let mut next = from;
    let mut out = vec![];
    for c in chunks {
        assert_eq!(c.offset, next, "offsets are contiguous");
        assert!(!c.data.is_empty() && c.data.len() <= MIB, "chunk of {} bytes", c.data.len());
        next += c.data.len() as u64;
        out.extend_from_slice(&c.data);
    }
    out
}

async fn uploads_are_verified_and_refusals_store_nothing(url: &str) {
    let (trusted, stranger) = (PrivateKey::generate(), PrivateKey::generate());
    let s = Served::start(url, &[&trusted]).await;
    // Three chunks; larger than the router's global 1 MiB body limit.
    let bytes = artifact(2 * MIB + MIB / 2 + 123, 1);
    let good = sign(&trusted, "1.4.0", PLATFORM, &bytes);

    let (status, v) = s.upload(&as_json(&good), &bytes).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(
        (&v["version"], &v["platform"], &v["sha256"], &v["size"], &v["key_id"], &v["notes"]),
        (
            &json!("1.4.0"),
            &json!(PLATFORM),
            &json!(sha(&bytes)),
            &json!(bytes.len()),
            &json!(trusted.public_key().key_id()),
            &json!("Faster kiosk")
        )
    );
    assert_eq!(v["uploaded_by"], "bootstrap");
    assert_eq!(s.stored().await, (1, 3));
    let stored = s.store.release("1.4.0", PLATFORM).await.expect("read").expect("stored");
    assert_eq!(stored.manifest(), good);
    releases::verify_manifest(&stored.manifest(), &[trusted.public_key()]).expect("still valid");

    // Another platform of the same version, and another version; newest version first.
    let arm = artifact(1000, 2);
    let (status, v) =
        s.upload(&as_json(&sign(&trusted, "1.4.0", "aarch64-linux", &arm)), &arm).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let old = artifact(10, 3);
    let (status, v) =
        s.upload(&as_json(&sign(&trusted, "1.10.0-rc.1", PLATFORM, &old)), &old).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (status, v) = s.get(&s.viewer, "releases").await;
    assert_eq!(status, StatusCode::OK);
    let listed: Vec<(&str, &str)> = v
        .as_array()
        .expect("list")
        .iter()
        .map(|r| (r["version"].as_str().expect("v"), r["platform"].as_str().expect("p")))
        .collect();
    assert_eq!(
        listed,
        [("1.10.0-rc.1", PLATFORM), ("1.4.0", "aarch64-linux"), ("1.4.0", PLATFORM)]
    );
    let (status, v) = s.get(&s.viewer, "releases/1.4.0").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");
    let (status, v) = s.get(&s.viewer, "releases/9.9.9").await;
    assert_eq!((status, v["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    let before = s.stored().await;
    assert_eq!(before, (3, 5));

    // Every refusal: its status and code, and nothing stored.
    let other = artifact(5000, 4);
    let fresh = |version: &str| sign(&trusted, version, PLATFORM, &other);
    let mut unsigned = as_json(&fresh("2.0.0"));
    unsigned.as_object_mut().expect("object").remove("signature");
    let mut empty_signature = as_json(&fresh("2.0.0"));
    empty_signature["signature"] = json!("");
    // Signed by a stranger's key while claiming the trusted key's id.
    let mut forged = as_json(&sign(&stranger, "2.0.0", PLATFORM, &other));
    forged["key_id"] = json!(trusted.public_key().key_id());
    // The version changed after signing.
    let mut altered = as_json(&fresh("2.0.0"));
    altered["version"] = json!("2.0.1");
    let mut tampered = other.clone();
    tampered[4000] ^= 0x55;
    let mut longer = other.clone();
    longer.push(0);
    let field = |name: &str, value: Value| {
        let mut m = as_json(&fresh("2.0.0"));
        m[name] = value;
        m
    };
    let bad_semver = field("version", json!("2.0"));
    let bad_platform = field("platform", json!("x86_64-plan9"));
    let no_platform = field("platform", json!(""));
    let bad_digest = field("sha256", json!("abc"));
    let zero_size = field("size", json!(0));
    let bad_signature = field("signature", json!("!!not base64!!"));
    let oversize_bytes = artifact(MAX_RELEASE_BYTES as usize + 1, 5);
    let oversize = as_json(&sign(&trusted, "2.0.0", PLATFORM, &oversize_bytes));
    // A manifest of 5000 bytes with an artifact beyond the limit: refused while it streams.
    let lying = as_json(&fresh("2.0.0"));
    let cases: Vec<(&str, String, Vec<u8>, StatusCode, &str)> = vec![
        (
            "unsigned",
            unsigned.to_string(),
            other.clone(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unsigned_release",
        ),
        (
            "empty signature",
            empty_signature.to_string(),
            other.clone(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unsigned_release",
        ),
        (
            "wrong signature",
            forged.to_string(),
            other.clone(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_signature",
        ),
        (
            "altered manifest",
            altered.to_string(),
            other.clone(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_signature",
        ),
        (
            "unknown key",
            as_json(&sign(&stranger, "2.0.0", PLATFORM, &other)).to_string(),
            other.clone(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_release_key",
        ),
        (
            "tampered artifact",
            as_json(&fresh("2.0.0")).to_string(),
            tampered,
            StatusCode::UNPROCESSABLE_ENTITY,
            "artifact_mismatch",
        ),
        (
            "longer artifact",
            as_json(&fresh("2.0.0")).to_string(),
            longer,
            StatusCode::UNPROCESSABLE_ENTITY,
            "artifact_mismatch",
        ),
        (
            "shorter artifact",
            as_json(&fresh("2.0.0")).to_string(),
            other[..4999].to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "artifact_mismatch",
        ),
        (
            "empty artifact",
            as_json(&fresh("2.0.0")).to_string(),
            vec![],
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty_artifact",
        ),
        (
            "not JSON",
            "{version: 2".into(),
            other.clone(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "malformed_manifest",
        ),
        (
            "missing fields",
            json!({"version": "2.0.0"}).to_string(),
            other.clone(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "malformed_manifest",
        ),
        (
            "bad semver",
            bad_semver.to_string(),
            other.clone(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "malformed_manifest",
        ),
        (
            "unknown platform",
            bad_platform.to_string(),
            other.clone(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "malformed_manifest",
        ),
        (
            "missing platform",
            no_platform.to_string(),
            other.clone(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "malformed_manifest",
        ),
        (
            "bad digest",
            bad_digest.to_string(),
            other.clone(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "malformed_manifest",
        ),
        (
            "zero size",
            zero_size.to_string(),
            other.clone(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "malformed_manifest",
        ),
        (
            "signature not base64",
            bad_signature.to_string(),
            other.clone(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "malformed_manifest",
        ),
        (
            "oversize",
            oversize.to_string(),
            oversize_bytes.clone(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "release_too_large",
        ),
        (
            "oversize stream",
            lying.to_string(),
            oversize_bytes,
            StatusCode::UNPROCESSABLE_ENTITY,
            "artifact_mismatch",
        ),
        (
            "duplicate",
            as_json(&good).to_string(),
            bytes.clone(),
            StatusCode::CONFLICT,
            "release_exists",
        ),
    ];
    for (name, manifest, body, status, code) in cases {
        let (got, v) = s.post(&s.admin, form(&manifest, &body)).await;
        assert_eq!((got, v["code"].as_str()), (status, Some(code)), "{name}: {v}");
        assert!(!v["message"].as_str().unwrap_or_default().is_empty(), "{name}: {v}");
        assert_eq!(s.stored().await, before, "{name}: nothing stored");
    }
    // The field of a malformed manifest is named.
    let (_, v) = s.upload(&bad_semver, &other).await;
    assert_eq!(v["details"][0]["field"], "version", "{v}");
    let (_, v) = s.upload(&bad_platform, &other).await;
    assert_eq!(v["details"][0]["field"], "platform", "{v}");

    // Badly formed uploads.
    let good_json = as_json(&fresh("2.0.0")).to_string();
    let forms: Vec<(&str, Form)> = vec![
        (
            "artifact first",
            Form::new()
                .part("artifact", Part::bytes(other.clone()))
                .part("manifest", Part::text(good_json.clone())),
        ),
        ("no artifact", Form::new().part("manifest", Part::text(good_json.clone()))),
        ("no manifest", Form::new().part("artifact", Part::bytes(other.clone()))),
        ("unknown part", form(&good_json, &other).part("extra", Part::text("x"))),
        (
            "repeated manifest",
            Form::new()
                .part("manifest", Part::text(good_json.clone()))
                .part("manifest", Part::text(good_json.clone())),
        ),
    ];
    for (name, f) in forms {
        let (got, v) = s.post(&s.admin, f).await;
        assert_eq!(
            (got, v["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("malformed_upload")),
            "{name}: {v}"
        );
        assert_eq!(s.stored().await, before, "{name}: nothing stored");
    }
    let resp = s
        .http
        .post(format!("{}/api/v1/releases", s.api))
        .bearer_auth(&s.admin)
        .json(&json!({"manifest": {}}))
        .send()
        .await
        .expect("json post");
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(resp.json::<Value>().await.expect("body")["code"], "malformed_upload");
    // Viewers read but do not upload or delete; no token, no access.
    let (got, v) = s.post(&s.viewer, form(&good_json, &other)).await;
    assert_eq!((got, v["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{v}");
    let resp = s.http.get(format!("{}/api/v1/releases", s.api)).send().await.expect("get");
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(s.stored().await, before);

    // Refusals are counted by code.
    let metrics = s.metrics().await;
    assert!(
        metrics.contains(
            "meridian_controller_release_uploads_refused_total{code=\"bad_signature\"} 2"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("meridian_controller_releases_uploaded_total 3"), "{metrics}");

    // Delete: the release and its chunks go; a second delete finds nothing.
    let delete = |token: String, path: &str| {
        let req = s.http.delete(format!("{}/api/v1/releases/{path}", s.api)).bearer_auth(token);
        async move { req.send().await.expect("delete").status().as_u16() }
    };
    assert_eq!(delete(s.viewer.clone(), "1.4.0/aarch64-linux").await, 403);
    assert_eq!(delete(s.admin.clone(), "1.4.0/aarch64-linux").await, 204);
    assert_eq!(delete(s.admin.clone(), "1.4.0/aarch64-linux").await, 404);
    assert_eq!(s.stored().await, (2, 4));
    assert!(s.store.release("1.4.0", "aarch64-linux").await.expect("read").is_none());
    s.stop().await;
}

#[tokio::test]
async fn uploads_are_verified_and_refusals_store_nothing_on_sqlite() {
    uploads_are_verified_and_refusals_store_nothing(&fresh_sqlite_url()).await;
}

#[tokio::test]
async fn uploads_are_verified_and_refusals_store_nothing_on_postgres() {
    uploads_are_verified_and_refusals_store_nothing(&fresh_postgres_url().await).await;
}

async fn fetch_release_streams_whole_and_resumed(url: &str) {
    let key = PrivateKey::generate();
    let s = Served::start(url, &[&key]).await;
    let bytes = artifact(2 * MIB + 4321, 7);
    let manifest = sign(&key, "1.4.0", PLATFORM, &bytes);
    let (status, v) = s.upload(&as_json(&manifest), &bytes).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");

    // Whole: three chunks, the last one short.
    let whole = s.fetch(Some(&s.credential), "1.4.0", PLATFORM, 0).await.expect("fetch");
    assert_eq!(whole.iter().map(|c| c.data.len()).collect::<Vec<_>>(), [MIB, MIB, 4321]);
    let got = reassemble(&whole, 0);
    assert_eq!(sha(&got), manifest.sha256);
    releases::verify_artifact(&manifest, got.as_slice()).expect("the signed artifact");

    // Resumed in the middle of the second chunk, as after a cut download.
    let have = MIB as u64 + 12_345;
    let rest = s.fetch(Some(&s.credential), "1.4.0", PLATFORM, have).await.expect("resume");
    assert_eq!(rest.first().map(|c| c.offset), Some(have));
    let mut resumed = bytes[..have as usize].to_vec();
    resumed.extend(reassemble(&rest, have));
    assert_eq!(sha(&resumed), manifest.sha256);
    // At a chunk boundary, and at the very end (nothing left to send).
    let rest =
        s.fetch(Some(&s.credential), "1.4.0", PLATFORM, 2 * MIB as u64).await.expect("resume");
    assert_eq!(reassemble(&rest, 2 * MIB as u64), bytes[2 * MIB..]);
    let none = s.fetch(Some(&s.credential), "1.4.0", PLATFORM, manifest.size).await.expect("end");
    assert!(none.is_empty());

    // The bytes served are counted.
    let served = manifest.size + (manifest.size - have) + (manifest.size - 2 * MIB as u64);
    let metrics = s.metrics().await;
    assert!(
        metrics.contains(&format!("meridian_controller_release_bytes_served_total {served}")),
        "{metrics}"
    );

    // Refusals.
    let code = |r: Result<Vec<ReleaseChunk>, tonic::Status>| r.map(|_| ()).map_err(|s| s.code());
    let cred = Some(s.credential.as_str());
    assert_eq!(
        code(s.fetch(cred, "1.4.0", PLATFORM, manifest.size + 1).await),
        Err(tonic::Code::InvalidArgument)
    );
    assert_eq!(code(s.fetch(cred, "9.9.9", PLATFORM, 0).await), Err(tonic::Code::NotFound));
    assert_eq!(code(s.fetch(cred, "1.4.0", "aarch64-linux", 0).await), Err(tonic::Code::NotFound));
    assert_eq!(
        code(s.fetch(cred, &"9".repeat(100), PLATFORM, 0).await),
        Err(tonic::Code::InvalidArgument)
    );
    assert_eq!(code(s.fetch(None, "1.4.0", PLATFORM, 0).await), Err(tonic::Code::Unauthenticated));
    let forged = format!("{}x", s.credential);
    assert_eq!(
        code(s.fetch(Some(&forged), "1.4.0", PLATFORM, 0).await),
        Err(tonic::Code::Unauthenticated)
    );
    s.stop().await;
}

#[tokio::test]
async fn fetch_release_streams_whole_and_resumed_on_sqlite() {
    fetch_release_streams_whole_and_resumed(&fresh_sqlite_url()).await;
}

#[tokio::test]
async fn fetch_release_streams_whole_and_resumed_on_postgres() {
    fetch_release_streams_whole_and_resumed(&fresh_postgres_url().await).await;
}

/// Runs the real meridianctl binary; returns (exit code, stdout, stderr).
async fn meridianctl(args: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meridianctl"))
        .args(args)
        .env_remove("MERIDIAN_SERVER")
        .env_remove("MERIDIAN_TOKEN")
        .output()
        .await
        .expect("run meridianctl");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

async fn meridianctl_signs_and_uploads_releases(url: &str) {
    let dir = temp_dir("meridianctl-release");
    let (key_file, binary) = (dir.join("release.key"), dir.join("meridian-agent"));
    let manifest_file = dir.join("manifest.json");
    std::fs::write(&binary, artifact(MIB + 77, 9)).expect("binary");

    // keygen: the public key on stdout, the private key in a 0600 file.
    let (code, stdout, stderr) =
        meridianctl(&["release", "keygen", "--out", path(&key_file)]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let public = stdout.trim();
    assert!(public.starts_with("ed25519:"), "{stdout}");
    let key = PrivateKey::parse(&std::fs::read_to_string(&key_file).expect("key")).expect("key");
    assert_eq!(key.public_key().to_string(), public);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key_file).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let (code, _, stderr) = meridianctl(&["release", "keygen", "--out", path(&key_file)]).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("refusing to overwrite"), "{stderr}");

    // sign, offline.
    let (code, stdout, stderr) = meridianctl(&[
        "release",
        "sign",
        "--key",
        path(&key_file),
        "--version",
        "1.4.0",
        "--platform",
        PLATFORM,
        "--binary",
        path(&binary),
        "--notes",
        "Faster kiosk",
        "--out",
        path(&manifest_file),
    ])
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("signed 1.4.0 for x86_64-linux"), "{stdout}");
    let manifest: ReleaseManifest =
        serde_json::from_str(&std::fs::read_to_string(&manifest_file).expect("manifest"))
            .expect("a manifest");
    releases::verify_manifest(&manifest, &[key.public_key()]).expect("signed");
    releases::verify_artifact(&manifest, std::fs::File::open(&binary).expect("binary"))
        .expect("matches the binary");
    let (code, _, stderr) = meridianctl(&[
        "release",
        "sign",
        "--key",
        path(&key_file),
        "--version",
        "latest",
        "--binary",
        path(&binary),
    ])
    .await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("version is malformed"), "{stderr}");

    // upload, list, show against a controller trusting the key.
    let s = Served::start(url, &[&key]).await;
    let ctl = |args: &[&str]| {
        let mut all = vec!["--server", s.api.as_str(), "--token", s.admin.as_str()];
        all.extend_from_slice(args);
        all.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| async move {
        meridianctl(&args.iter().map(String::as_str).collect::<Vec<_>>()).await
    };
    let (code, stdout, stderr) = run(ctl(&[
        "release",
        "upload",
        "--manifest",
        path(&manifest_file),
        "--binary",
        path(&binary),
    ]))
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("release 1.4.0 for x86_64-linux uploaded"), "{stdout}");
    assert_eq!(s.stored().await, (1, 2));

    let (code, stdout, stderr) = run(ctl(&["release", "list"])).await;
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("VERSION"), "{stdout}");
    assert!(lines[1].starts_with("1.4.0") && lines[1].contains(PLATFORM), "{stdout}");
    assert!(lines[1].contains("1.0 MiB") && lines[1].contains(&manifest.key_id), "{stdout}");
    let (code, stdout, _) = run(ctl(&["-o", "json", "release", "list"])).await;
    assert_eq!(code, Some(0));
    let listed: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(listed[0]["sha256"], manifest.sha256);

    let (code, stdout, stderr) =
        run(ctl(&["release", "show", "1.4.0", "--platform", PLATFORM])).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(&manifest.sha256) && stdout.contains("Faster kiosk"), "{stdout}");
    let (code, _, stderr) =
        run(ctl(&["release", "show", "1.4.0", "--platform", "aarch64-linux"])).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no build for aarch64-linux"), "{stderr}");
    let (code, _, stderr) = run(ctl(&["release", "show", "2.0.0"])).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("not_found"), "{stderr}");

    // A tampered binary and a duplicate are refused with the server's code.
    let tampered = dir.join("tampered");
    let mut bytes = std::fs::read(&binary).expect("binary");
    bytes[100] ^= 1;
    std::fs::write(&tampered, bytes).expect("tampered");
    let (code, _, stderr) = run(ctl(&[
        "release",
        "upload",
        "--manifest",
        path(&manifest_file),
        "--binary",
        path(&tampered),
    ]))
    .await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("release_exists"), "{stderr}");
    let other_manifest = dir.join("other.json");
    let (code, _, stderr) = run(vec![
        "release",
        "sign",
        "--key",
        path(&key_file),
        "--version",
        "1.5.0",
        "--platform",
        PLATFORM,
        "--binary",
        path(&binary),
        "--out",
        path(&other_manifest),
    ]
    .into_iter()
    .map(str::to_owned)
    .collect())
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let (code, _, stderr) = run(ctl(&[
        "release",
        "upload",
        "--manifest",
        path(&other_manifest),
        "--binary",
        path(&tampered),
    ]))
    .await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("artifact_mismatch"), "{stderr}");
    assert_eq!(s.stored().await, (1, 2));
    s.stop().await;
}

#[tokio::test]
async fn meridianctl_signs_and_uploads_releases_on_sqlite() {
    meridianctl_signs_and_uploads_releases(&fresh_sqlite_url()).await;
}

#[tokio::test]
async fn meridianctl_signs_and_uploads_releases_on_postgres() {
    meridianctl_signs_and_uploads_releases(&fresh_postgres_url().await).await;
}

/// Without `release_keys` every upload is refused, saying why; a malformed key stops the
/// controller at start-up.
#[tokio::test]
async fn uploads_need_a_configured_key_and_keys_must_be_valid() {
    let store = meridian_controller::store::open(&fresh_sqlite_url()).await.expect("store");
    let admin =
        ensure_bootstrap_token(store.as_ref(), None).await.expect("bootstrap").expect("fresh");
    let state = ApiState {
        store: store.clone(),
        metrics: Arc::new(Metrics::default()),
        commands_changed: Arc::new(tokio::sync::watch::channel(0).0),
        clock_skew_tolerance: meridian_controller::Settings::default().clock_skew_tolerance(),
    };
    let router = api::router(state, MIB);
    let key = PrivateKey::generate();
    let bytes = artifact(100, 1);
    let manifest = as_json(&sign(&key, "1.4.0", PLATFORM, &bytes)).to_string();
    let body = format!(
        "--B\r\nContent-Disposition: form-data; name=\"manifest\"\r\n\r\n{manifest}\r\n\
         --B\r\nContent-Disposition: form-data; name=\"artifact\"\r\n\r\n{}\r\n--B--\r\n",
        String::from_utf8_lossy(&bytes)
    );
    let req = Request::post("/api/v1/releases")
        .header(header::AUTHORIZATION, format!("Bearer {admin}"))
        .header(header::CONTENT_TYPE, "multipart/form-data; boundary=B")
        .body(Body::from(body))
        .expect("request");
    let resp = router.oneshot(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let v: Value = serde_json::from_slice(
        &axum::body::to_bytes(resp.into_body(), 1 << 16).await.expect("body"),
    )
    .expect("JSON");
    assert_eq!(v["code"], "release_keys_not_configured");
    assert!(v["message"].as_str().expect("message").contains("release_keys"), "{v}");
    assert!(store.list_releases().await.expect("list").is_empty());

    let settings = Settings {
        release_keys: vec![key.public_key().to_string(), "ed25519:not-a-key".into()],
        ..Settings::default()
    };
    let listeners = Listeners {
        api: tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        gateway: tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind"),
    };
    let refused = serve(settings, store, listeners, CancellationToken::new()).await;
    let message = refused.expect_err("a malformed key stops the start").to_string();
    assert!(message.contains("release_keys[1]"), "{message}");
}
