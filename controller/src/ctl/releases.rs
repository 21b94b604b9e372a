//! `meridianctl release …`: signed agent releases. `keygen` and `sign` work offline on the
//! release manager's machine (the private key never goes near the controller); `upload`,
//! `list` and `show` talk to `/api/v1/releases`.
//!
//! - `keygen --out FILE` writes a new private key (`ed25519-private:…`, mode 0600, never
//!   overwriting a file) and returns the public key line (`ed25519:…`) to put in the
//!   controller's and the agents' `release_keys`;
//! - `sign` hashes the binary (streamed) and signs its manifest (`meridian_shared::releases`);
//! - `upload` sends the manifest and the binary as one multipart form; the controller checks
//!   the signature and the digest before it stores anything.

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use meridian_shared::releases::{self, PrivateKey, PublicKey, ReleaseManifest, UnsignedRelease};
use reqwest::Method;
use reqwest::multipart::{Form, Part};
use serde_json::Value;

use super::render::{fields, grid, timestamp};
use super::{ApiFailure, Client, CtlError, Output, Result, structured};

/// How long an upload may take (a large binary over a slow link).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A key pair just written.
#[derive(Debug)]
pub struct NewKey {
    pub public: PublicKey,
    pub key_id: String,
}

/// Writes a new private key to `out` (mode 0600; refuses to overwrite an existing file).
pub fn keygen(out: &Path) -> Result<NewKey> {
    let io = |source| CtlError::Io { path: out.display().to_string(), source };
    let key = PrivateKey::generate();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(out).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CtlError::Usage(format!(
                "{} already exists; refusing to overwrite a key (choose another --out)",
                out.display()
            ))
        } else {
            io(e)
        }
    })?;
    file.write_all(format!("{}\n", key.to_text()).as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    let public = key.public_key();
    Ok(NewKey { key_id: public.key_id(), public })
}

/// What `meridianctl release sign` signs.
#[derive(Debug, Clone, Copy)]
pub struct SignArgs<'a> {
    pub key: &'a Path,
    pub version: &'a str,
    pub platform: &'a str,
    pub binary: &'a Path,
    pub notes: &'a str,
}

/// Hashes the binary and signs its manifest with the private key file.
pub fn sign(args: SignArgs<'_>) -> Result<ReleaseManifest> {
    let key_text = std::fs::read_to_string(args.key)
        .map_err(|source| CtlError::Io { path: args.key.display().to_string(), source })?;
    let key = PrivateKey::parse(&key_text)
        .map_err(|e| CtlError::Usage(format!("{}: {e}", args.key.display())))?;
    let binary = std::fs::File::open(args.binary)
        .map_err(|source| CtlError::Io { path: args.binary.display().to_string(), source })?;
    let release = UnsignedRelease::of_artifact(
        args.version,
        args.platform,
        args.notes,
        std::io::BufReader::new(binary),
    )
    .map_err(|e| CtlError::Manifest(format!("{}: {e}", args.binary.display())))?;
    releases::sign(&key, release).map_err(|e| CtlError::Manifest(e.to_string()))
}

/// The manifest as a file holds it (pretty JSON, newline-terminated).
pub fn manifest_json(m: &ReleaseManifest) -> Result<String> {
    structured(m, Output::Json)
}

/// Uploads the manifest file and the binary; returns the stored release.
pub async fn upload(client: &Client, manifest: &Path, binary: &Path) -> Result<Value> {
    let manifest_text = std::fs::read_to_string(manifest)
        .map_err(|source| CtlError::Io { path: manifest.display().to_string(), source })?;
    // Only a JSON check here: the controller judges the manifest itself.
    serde_json::from_str::<Value>(&manifest_text).map_err(|e| {
        CtlError::Manifest(format!("{}: not a JSON release manifest: {e}", manifest.display()))
    })?;
    let bytes = std::fs::read(binary)
        .map_err(|source| CtlError::Io { path: binary.display().to_string(), source })?;
    let file_name = binary
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "artifact".into());
    let part = |p: Part, mime: &str| {
        p.mime_str(mime).map_err(|e| CtlError::Usage(format!("multipart body: {e}")))
    };
    let form =
        Form::new().part("manifest", part(Part::text(manifest_text), "application/json")?).part(
            "artifact",
            part(Part::bytes(bytes).file_name(file_name), "application/octet-stream")?,
        );
    let mut req =
        client.http.request(Method::POST, client.url(&["releases"])?).timeout(UPLOAD_TIMEOUT);
    if let Some(token) = &client.token {
        req = req.bearer_auth(token);
    }
    let resp = req.multipart(form).send().await.map_err(|e| client.transport_error(&e))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| client.transport_error(&e))?;
    if !status.is_success() {
        let mut failure = ApiFailure::from_body(status, &body);
        failure.without_token = client.token.is_none();
        return Err(CtlError::Api(failure));
    }
    serde_json::from_slice(&body).map_err(|e| CtlError::Protocol {
        server: client.server().to_owned(),
        reason: format!("the body is not JSON: {e}"),
    })
}

/// Every release, newest version first.
pub async fn list(client: &Client) -> Result<Vec<Value>> {
    client.call(Method::GET, &["releases"], None).await
}

/// The releases of `version`, or its release for `platform` only.
pub async fn show(client: &Client, version: &str, platform: Option<&str>) -> Result<Vec<Value>> {
    let all: Vec<Value> = client.call(Method::GET, &["releases", version], None).await?;
    let Some(platform) = platform else { return Ok(all) };
    let (found, others): (Vec<Value>, Vec<Value>) =
        all.into_iter().partition(|r| r.get("platform").and_then(Value::as_str) == Some(platform));
    if found.is_empty() {
        let have: Vec<String> = others.iter().map(|r| text(r, "platform")).collect();
        return Err(CtlError::Usage(format!(
            "release {version} has no build for {platform} (it has {})",
            have.join(", ")
        )));
    }
    Ok(found)
}

const HEADERS: [&str; 7] = ["VERSION", "PLATFORM", "SIZE", "SHA256", "KEY", "UPLOADED", "BY"];

/// Releases as a table (or JSON/YAML as the API answered).
pub fn render_list(items: &[Value], output: Output) -> Result<String> {
    if output != Output::Table {
        return structured(items, output);
    }
    if items.is_empty() {
        return Ok("no releases\n".into());
    }
    Ok(grid(
        &HEADERS,
        items.iter().map(|v| {
            vec![
                text(v, "version"),
                text(v, "platform"),
                size(v),
                text(v, "sha256").chars().take(12).collect(),
                text(v, "key_id"),
                timestamp(v.get("uploaded_at")),
                text(v, "uploaded_by"),
            ]
        }),
    ))
}

/// Each release field by field, with its notes.
pub fn render_show(items: &[Value], output: Output) -> Result<String> {
    if output != Output::Table {
        return structured(items, output);
    }
    let blocks: Vec<String> = items
        .iter()
        .map(|v| {
            fields(&[
                ("version", text(v, "version")),
                ("platform", text(v, "platform")),
                ("size", size(v)),
                ("sha256", text(v, "sha256")),
                ("signed by", text(v, "key_id")),
                (
                    "uploaded",
                    format!("{} by {}", timestamp(v.get("uploaded_at")), text(v, "uploaded_by")),
                ),
                ("notes", text(v, "notes")),
            ])
        })
        .collect();
    Ok(blocks.join("\n"))
}

/// One uploaded release, as `upload` prints it.
pub fn render_uploaded(v: &Value, output: Output) -> Result<String> {
    if output != Output::Table {
        return structured(v, output);
    }
    Ok(format!(
        "release {} for {} uploaded ({}, sha256 {}, signed by {})\n",
        text(v, "version"),
        text(v, "platform"),
        size(v),
        text(v, "sha256"),
        text(v, "key_id")
    ))
}

/// What `sign` prints when it wrote the manifest to a file.
pub fn render_signed(m: &ReleaseManifest, out: &Path) -> String {
    format!(
        "signed {} for {} ({} bytes, sha256 {}) with key {}; manifest written to {}\n",
        m.version,
        m.platform,
        m.size,
        m.sha256,
        m.key_id,
        out.display()
    )
}

fn text(v: &Value, field: &str) -> String {
    match v.get(field) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) | Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn size(v: &Value) -> String {
    v.get("size").and_then(Value::as_u64).map(human_size).unwrap_or_else(|| "-".into())
}

/// Bytes as tables show them: `812 B`, `14.2 MiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_at_a_glance() {
        assert_eq!(human_size(812), "812 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(14 * 1024 * 1024 + 200 * 1024), "14.2 MiB");
    }

    #[test]
    fn keygen_never_overwrites_and_keeps_the_key_private() {
        let dir = crate::testing::temp_dir("meridianctl-keygen");
        let path = dir.join("release.key");
        let key = keygen(&path).expect("keygen");
        let text = std::fs::read_to_string(&path).expect("key file");
        let private = PrivateKey::parse(&text).expect("a private key");
        assert_eq!(private.public_key(), key.public);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).expect("metadata").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(keygen(&path), Err(CtlError::Usage(_))));
        assert_eq!(std::fs::read_to_string(&path).expect("key file"), text, "not overwritten");
    }
}
