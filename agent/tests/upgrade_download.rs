//! Downloading a release into `data_dir/upgrade/`: a transfer cut in the middle resumes from
//! the partial file's length; an artifact that is not the signed one (digest, size, stray
//! bytes) is refused, its files removed, and nothing else touched.

mod upgrade_support;

use meridian_agent::upgrade::download::{self, DownloadError};
use meridian_agent::upgrade::{ChunkStream, FetchError, ReleaseSource, UpgradeDir};
use meridian_proto::ReleaseChunk;
use meridian_shared::releases::ReleaseManifest;
use sha2::Digest;
use upgrade_support::{ScriptedSource, temp_dir};

fn artifact(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

fn manifest(bytes: &[u8]) -> ReleaseManifest {
    ReleaseManifest {
        version: "2.0.0".into(),
        platform: meridian_shared::releases::current_platform(),
        sha256: hex::encode(sha2::Sha256::digest(bytes)),
        size: bytes.len() as u64,
        key_id: "0000000000000000".into(),
        signature: String::new(),
        notes: String::new(),
    }
}

/// A directory with a release already running (`current`) that a refused download must not
/// touch.
fn dir_with_current(what: &str) -> UpgradeDir {
    let dir = UpgradeDir::new(&temp_dir(what));
    dir.create().expect("dir");
    std::fs::write(dir.current(), b"the running release").expect("current");
    dir
}

fn assert_nothing_replaced(dir: &UpgradeDir) {
    assert!(!dir.staged().exists(), "nothing staged");
    assert!(!dir.partial().exists(), "the partial download was removed");
    assert_eq!(std::fs::read(dir.current()).expect("current"), b"the running release");
}

#[tokio::test]
async fn a_cut_download_resumes_from_the_partial_file() {
    let dir = dir_with_current("resume");
    let bytes = artifact(10_000);
    let release = manifest(&bytes);
    let mut source = ScriptedSource::new(bytes.clone(), 1_000).cutting(3, 1);
    let cut = download::download(&dir, &release, &mut source).await;
    assert!(matches!(cut, Err(DownloadError::Transient(_))), "{cut:?}");
    assert_eq!(std::fs::metadata(dir.partial()).expect("partial").len(), 3_000);
    assert!(!dir.staged().exists());

    let done = download::download(&dir, &release, &mut source).await.expect("resumed");
    assert_eq!((done.resumed_from, done.received, done.already_staged), (3_000, 7_000, false));
    assert_eq!(source.offsets(), [0, 3_000], "the second fetch asked only for the rest");
    assert_eq!(std::fs::read(dir.staged()).expect("staged"), bytes);
    assert!(!dir.partial().exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.staged()).expect("staged").permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "staged is executable, by the agent's user only");
    let dir_mode = std::fs::metadata(dir.root()).expect("upgrade dir").permissions().mode();
    assert_eq!(dir_mode & 0o777, 0o700, "the upgrade folder is the agent's user's only");
    assert!(download::staged_matches(&dir, &release).await.expect("check"));

    // Asked again (a later command of the same release): nothing is fetched.
    let again = download::download(&dir, &release, &mut source).await.expect("staged");
    assert!(again.already_staged);
    assert_eq!(source.offsets().len(), 2);
}

#[tokio::test]
async fn a_download_of_another_release_starts_over() {
    let dir = dir_with_current("other");
    let first = artifact(5_000);
    let mut source = ScriptedSource::new(first.clone(), 1_000).cutting(2, 1);
    let cut = download::download(&dir, &manifest(&first), &mut source).await;
    assert!(matches!(cut, Err(DownloadError::Transient(_))), "{cut:?}");
    let second: Vec<u8> = artifact(4_000).into_iter().map(|b| b ^ 0x55).collect();
    let mut other = ScriptedSource::new(second.clone(), 1_000);
    download::download(&dir, &manifest(&second), &mut other).await.expect("download");
    assert_eq!(other.offsets(), [0], "never resumed into another release's bytes");
    assert_eq!(std::fs::read(dir.staged()).expect("staged"), second);
}

#[tokio::test]
async fn a_tampered_artifact_is_refused_and_nothing_is_replaced() {
    let dir = dir_with_current("tampered");
    let bytes = artifact(6_000);
    let release = manifest(&bytes);
    let mut tampered = bytes.clone();
    tampered[4_321] ^= 0x01;
    let mut source = ScriptedSource::new(tampered, 1_000);
    let refused = download::download(&dir, &release, &mut source).await;
    match refused {
        Err(DownloadError::Refused(why)) => assert!(why.contains("SHA-256"), "{why}"),
        other => panic!("a tampered artifact was not refused: {other:?}"),
    }
    assert_nothing_replaced(&dir);
}

#[tokio::test]
async fn bytes_past_the_signed_size_are_refused_before_they_are_written() {
    let dir = dir_with_current("longer");
    let bytes = artifact(3_000);
    let release = manifest(&bytes);
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"and a payload the manifest does not sign");
    // The last chunk straddles the signed size (3 000 = 2 × 1 024 + 952).
    let mut source = ScriptedSource::new(longer, 1_024);
    let refused = download::download(&dir, &release, &mut source).await;
    match refused {
        Err(DownloadError::Refused(why)) => assert!(why.contains("larger"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_nothing_replaced(&dir);
}

/// Sends the right bytes at the wrong offsets.
struct Misplaced(Vec<u8>);

impl ReleaseSource for Misplaced {
    async fn fetch(&mut self, _: &ReleaseManifest, offset: u64) -> Result<ChunkStream, FetchError> {
        let chunk = ReleaseChunk { offset: offset + 10, data: self.0.clone() };
        Ok(Box::pin(futures::stream::iter([Ok(chunk)])))
    }
}

#[tokio::test]
async fn bytes_at_the_wrong_offset_are_refused() {
    let dir = dir_with_current("misplaced");
    let bytes = artifact(2_000);
    let refused = download::download(&dir, &manifest(&bytes), &mut Misplaced(bytes)).await;
    match refused {
        Err(DownloadError::Refused(why)) => assert!(why.contains("offset 10"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_nothing_replaced(&dir);
}

#[tokio::test]
async fn a_partial_file_damaged_on_disk_is_downloaded_again_once() {
    let dir = dir_with_current("damaged");
    let bytes = artifact(8_000);
    let release = manifest(&bytes);
    let mut source = ScriptedSource::new(bytes.clone(), 1_000).cutting(4, 1);
    assert!(download::download(&dir, &release, &mut source).await.is_err());
    // What a power loss can leave: the length is there, the bytes are not.
    let mut kept = std::fs::read(dir.partial()).expect("partial");
    kept[100] ^= 0xff;
    std::fs::write(dir.partial(), kept).expect("damage");
    let again = download::download(&dir, &release, &mut source).await;
    assert!(matches!(again, Err(DownloadError::Transient(_))), "{again:?}");
    download::download(&dir, &release, &mut source).await.expect("fresh download");
    assert_eq!(source.offsets(), [0, 4_000, 0]);
    assert_eq!(std::fs::read(dir.staged()).expect("staged"), bytes);
}

#[tokio::test]
async fn a_refusal_by_the_controller_fails_the_download() {
    struct Gone;
    impl ReleaseSource for Gone {
        async fn fetch(&mut self, _: &ReleaseManifest, _: u64) -> Result<ChunkStream, FetchError> {
            Err(FetchError::Refused("no such release".into()))
        }
    }
    let dir = dir_with_current("gone");
    let bytes = artifact(100);
    let refused = download::download(&dir, &manifest(&bytes), &mut Gone).await;
    assert!(matches!(refused, Err(DownloadError::Refused(_))), "{refused:?}");
    assert!(!dir.staged().exists());
}
