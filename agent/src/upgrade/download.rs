//! Downloading a release's artifact into `staged.partial`, resumable from its length, and
//! staging it once its size and SHA-256 match the signed manifest.

use std::fs::File;
use std::future::Future;
use std::io::{self, Write};
use std::path::PathBuf;

use futures::StreamExt;
use futures::stream::BoxStream;
use meridian_proto::ReleaseChunk;
use meridian_shared::releases::{self, ReleaseError, ReleaseManifest};

use super::files::{self, StagedRelease, UpgradeDir};

/// Bytes written between two `fsync`s of the partial download.
const SYNC_EVERY: u64 = 8 * 1024 * 1024;

/// A stream of an artifact's chunks, each naming the offset of its first byte.
pub type ChunkStream = BoxStream<'static, Result<ReleaseChunk, FetchError>>;

/// Where artifacts come from: the controller's `FetchRelease` (`GatewaySource`), or a test's
/// scripted source.
pub trait ReleaseSource: Send {
    /// Streams the artifact of `release` from byte `offset` to its end.
    fn fetch(
        &mut self,
        release: &ReleaseManifest,
        offset: u64,
    ) -> impl Future<Output = Result<ChunkStream, FetchError>> + Send;
}

/// Why a fetch stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// Try again later from what was received (link down, controller unavailable, cut).
    #[error("{0}")]
    Transient(String),
    /// The controller refuses the fetch for good (no such release, bad offset).
    #[error("{0}")]
    Refused(String),
}

/// Why a download did not stage the artifact.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// Resume later from the partial file.
    #[error("{0}")]
    Transient(String),
    /// The artifact is not the signed one (digest, size, stray bytes) or the controller
    /// refused: the upgrade fails, the files are removed, nothing is replaced.
    #[error("{0}")]
    Refused(String),
    #[error("upgrade files: {0}")]
    Io(#[from] io::Error),
}

/// What a completed download did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Downloaded {
    /// The length of the partial file it resumed from (0 for a fresh download).
    pub resumed_from: u64,
    /// Bytes received by this call.
    pub received: u64,
    /// Whether a verified `staged` file was already there (nothing fetched).
    pub already_staged: bool,
}

fn meta_of(release: &ReleaseManifest) -> StagedRelease {
    StagedRelease {
        version: release.version.clone(),
        platform: release.platform.clone(),
        sha256: release.sha256.to_ascii_lowercase(),
        size: release.size,
    }
}

/// Whether `staged` holds exactly `release`'s artifact (its size and SHA-256 checked again).
pub async fn staged_matches(dir: &UpgradeDir, release: &ReleaseManifest) -> io::Result<bool> {
    if dir.read_staged_meta().as_ref() != Some(&meta_of(release)) {
        return Ok(false);
    }
    match check_file(dir.staged(), release).await {
        Ok(checked) => Ok(checked.is_ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Checks the file at `path` against the manifest's size and SHA-256, off the async threads.
async fn check_file(
    path: PathBuf,
    release: &ReleaseManifest,
) -> io::Result<Result<(), ReleaseError>> {
    let release = release.clone();
    tokio::task::spawn_blocking(move || {
        let file = io::BufReader::with_capacity(1024 * 1024, File::open(&path)?);
        match releases::verify_artifact(&release, file) {
            Err(ReleaseError::Read(e)) => Err(io::Error::other(e)),
            checked => Ok(checked),
        }
    })
    .await
    .map_err(io::Error::other)?
}

/// Fetches the rest of `release` into `staged.partial` (resuming from its length), verifies
/// size and SHA-256 against the manifest, and renames it to `staged`. A mismatch removes the
/// files; nothing else is touched. Cancel-safe: dropping the future leaves a partial file to
/// resume from.
pub async fn download<S: ReleaseSource>(
    dir: &UpgradeDir,
    release: &ReleaseManifest,
    source: &mut S,
) -> Result<Downloaded, DownloadError> {
    dir.create()?;
    let meta = meta_of(release);
    if dir.read_staged_meta().as_ref() != Some(&meta) {
        // Another release's files (or none): start over.
        dir.discard_staged()?;
        dir.write_staged_meta(&meta)?;
    } else if staged_matches(dir, release).await? {
        return Ok(Downloaded { resumed_from: 0, received: 0, already_staged: true });
    } else {
        files::remove_if_present(&dir.staged())?;
    }
    let partial = dir.partial();
    let (mut file, mut len) = files::open_append(&partial)?;
    if len > release.size {
        file.set_len(0)?;
        len = 0;
    }
    let resumed_from = len;
    let mut received = 0u64;
    if len < release.size {
        let mut stream = source.fetch(release, len).await.map_err(from_fetch)?;
        let mut unsynced = 0u64;
        loop {
            let chunk = match stream.next().await {
                None => break,
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => {
                    file.sync_data()?;
                    return Err(from_fetch(e));
                }
            };
            if chunk.offset != len {
                drop(file);
                dir.discard_staged()?;
                return Err(DownloadError::Refused(format!(
                    "the controller sent bytes at offset {} where {len} was due",
                    chunk.offset
                )));
            }
            let n = chunk.data.len() as u64;
            if len + n > release.size {
                drop(file);
                dir.discard_staged()?;
                return Err(DownloadError::Refused(format!(
                    "the artifact is larger than the {} bytes its manifest signs",
                    release.size
                )));
            }
            file.write_all(&chunk.data)?;
            len += n;
            received += n;
            unsynced += n;
            if unsynced >= SYNC_EVERY {
                file.sync_data()?;
                unsynced = 0;
            }
            if len == release.size {
                break;
            }
        }
        file.sync_all()?;
        if len < release.size {
            return Err(DownloadError::Transient(format!(
                "the transfer ended at byte {len} of {}",
                release.size
            )));
        }
    }
    drop(file);
    if let Err(e) = check_file(partial.clone(), release).await? {
        dir.discard_staged()?;
        if resumed_from > 0 {
            // The part kept from before a cut may not have reached the disk intact (a power
            // loss): one fresh download decides.
            return Err(DownloadError::Transient(format!(
                "the resumed artifact failed its check ({e}); downloading it again"
            )));
        }
        return Err(DownloadError::Refused(format!(
            "the artifact does not match its signed manifest: {e}"
        )));
    }
    files::make_executable(&File::open(&partial)?)?;
    files::rename_durably(&partial, &dir.staged())?;
    Ok(Downloaded { resumed_from, received, already_staged: false })
}

fn from_fetch(e: FetchError) -> DownloadError {
    match e {
        FetchError::Transient(m) => DownloadError::Transient(m),
        FetchError::Refused(m) => DownloadError::Refused(m),
    }
}
