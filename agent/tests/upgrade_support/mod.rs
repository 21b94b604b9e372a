//! Helpers of the upgrade tests: temporary data directories, fake binaries written as shell
//! scripts, waiting on conditions with a deadline, signed manifests and a scripted artifact
//! source.
#![allow(dead_code)]

pub mod gateway;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use meridian_agent::upgrade::{ChunkStream, FetchError, ReleaseSource};
use meridian_proto::ReleaseChunk;
use meridian_shared::releases::{self, ReleaseManifest};

pub fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!("meridian-upgrade-{what}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Writes an executable shell script.
pub fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Waits until `check` gives a value, polling every 20 ms, for at most `secs` seconds.
pub async fn wait_until<T>(what: &str, secs: u64, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An artifact source that serves `artifact` in chunks, records the offsets asked for, and
/// cuts the first `cuts` transfers after `cut_after` chunks.
#[derive(Clone)]
pub struct ScriptedSource {
    pub artifact: Arc<Vec<u8>>,
    pub chunk: usize,
    pub cut_after: usize,
    pub cuts: Arc<Mutex<u32>>,
    pub offsets: Arc<Mutex<Vec<u64>>>,
}

impl ScriptedSource {
    pub fn new(artifact: Vec<u8>, chunk: usize) -> Self {
        ScriptedSource {
            artifact: Arc::new(artifact),
            chunk,
            cut_after: 0,
            cuts: Arc::default(),
            offsets: Arc::default(),
        }
    }

    /// Cuts the next `times` transfers after `after` chunks each.
    pub fn cutting(mut self, after: usize, times: u32) -> Self {
        self.cut_after = after;
        *self.cuts.lock().expect("lock") = times;
        self
    }

    pub fn offsets(&self) -> Vec<u64> {
        self.offsets.lock().expect("lock").clone()
    }
}

impl ReleaseSource for ScriptedSource {
    async fn fetch(
        &mut self,
        _release: &ReleaseManifest,
        offset: u64,
    ) -> Result<ChunkStream, FetchError> {
        self.offsets.lock().expect("lock").push(offset);
        let start = usize::try_from(offset).expect("offset");
        if start > self.artifact.len() {
            return Err(FetchError::Refused("offset beyond the artifact".into()));
        }
        let mut items: Vec<Result<ReleaseChunk, FetchError>> = self.artifact[start..]
            .chunks(self.chunk)
            .enumerate()
            .map(|(i, data)| {
                Ok(ReleaseChunk { offset: (start + i * self.chunk) as u64, data: data.to_vec() })
            })
            .collect();
        let mut cuts = self.cuts.lock().expect("lock");
        if *cuts > 0 && items.len() > self.cut_after {
            *cuts -= 1;
            items.truncate(self.cut_after);
            items.push(Err(FetchError::Transient("connection reset in the middle".into())));
        }
        Ok(futures::stream::iter(items).boxed())
    }
}

/// A release signing key, as `meridianctl release keygen` makes one: the agent trusts its
/// public half (`release_keys`).
pub struct Signer {
    key: releases::PrivateKey,
}

impl Signer {
    pub fn new() -> Self {
        Signer { key: releases::PrivateKey::generate() }
    }

    /// `ed25519:<base64 of the 32 public key bytes>`.
    pub fn public(&self) -> String {
        self.key.public_key().to_string()
    }

    /// A manifest of `artifact` for `version` on `platform`, signed as `meridianctl release
    /// sign` does.
    pub fn sign(&self, version: &str, platform: &str, artifact: &[u8]) -> ReleaseManifest {
        let release = releases::UnsignedRelease::of_artifact(
            version,
            platform,
            "signed by the tests",
            artifact,
        )
        .expect("release");
        releases::sign(&self.key, release).expect("sign")
    }
}
