//! The files of an upgrade under `data_dir/upgrade/` (the only place the agent may write under
//! systemd's `ProtectSystem=strict`), and `state.json`, the switch's state shared by the
//! watchdog and the agents it starts. Every write is write-temp + fsync + rename + fsync of the
//! directory, so a crash leaves the old file or the new one, never half of one.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use meridian_shared::events::UpgradePhase;
use meridian_shared::private_files;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The paths of `data_dir/upgrade/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeDir {
    root: PathBuf,
}

impl UpgradeDir {
    pub fn new(data_dir: &Path) -> Self {
        UpgradeDir { root: data_dir.join("upgrade") }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A download in progress, resumed from its length.
    pub fn partial(&self) -> PathBuf {
        self.root.join("staged.partial")
    }

    /// The verified artifact, waiting for the switch.
    pub fn staged(&self) -> PathBuf {
        self.root.join("staged")
    }

    /// Which release `staged.partial` and `staged` hold (`StagedRelease`).
    pub fn staged_meta(&self) -> PathBuf {
        self.root.join("staged.json")
    }

    /// The running release binary, when an upgrade installed one (`run` execs it).
    pub fn current(&self) -> PathBuf {
        self.root.join("current")
    }

    /// The binary that ran before the last switch (the rollback target).
    pub fn previous(&self) -> PathBuf {
        self.root.join("previous")
    }

    /// The running binary copied aside before the switch, renamed to `previous` by it.
    pub fn previous_new(&self) -> PathBuf {
        self.root.join("previous.new")
    }

    pub fn state(&self) -> PathBuf {
        self.root.join("state.json")
    }

    /// Creates the folder (0700, like the data dir).
    pub fn create(&self) -> io::Result<()> {
        private_files::create_dir(&self.root)
    }

    /// The switch state, if a switch ever happened here. A file that does not parse is an
    /// error (the watchdog must not guess).
    pub fn read_state(&self) -> io::Result<Option<SwitchState>> {
        match fs::read(self.state()) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("state.json: {e}"))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn write_state(&self, state: &SwitchState) -> io::Result<()> {
        let bytes = serde_json::to_vec(state).map_err(io::Error::other)?;
        write_atomically(&self.state(), &bytes)
    }

    pub fn read_staged_meta(&self) -> Option<StagedRelease> {
        fs::read(self.staged_meta()).ok().and_then(|b| serde_json::from_slice(&b).ok())
    }

    pub fn write_staged_meta(&self, meta: &StagedRelease) -> io::Result<()> {
        let bytes = serde_json::to_vec(meta).map_err(io::Error::other)?;
        write_atomically(&self.staged_meta(), &bytes)
    }

    /// Removes the download and the staged artifact (cancelled, superseded, refused).
    pub fn discard_staged(&self) -> io::Result<()> {
        for p in [self.partial(), self.staged(), self.staged_meta()] {
            remove_if_present(&p)?;
        }
        sync_dir(&self.root)
    }
}

/// The switch's state (`state.json`): written by the agent that switches, updated by the
/// watchdog (crashes, rollback) and by the new agent (healthy), read at every start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchState {
    /// `switching` until the new binary is healthy; then `healthy`, or `rolled_back` /
    /// `failed` with `reason`.
    pub phase: UpgradePhase,
    pub rollout_id: Uuid,
    pub from_version: String,
    pub to_version: String,
    /// When the new binary must be healthy by (wall clock: the watchdog supervises real
    /// processes across restarts).
    pub deadline: DateTime<Utc>,
    /// Exits of the new binary before it became healthy.
    pub crashes: u32,
    /// Whether the phase was queued as `AGENT_UPGRADE_STATUS` (by the agent that runs after
    /// it).
    pub reported: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Which release the staged files are (a download of another release is never resumed into).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedRelease {
    pub version: String,
    pub platform: String,
    pub sha256: String,
    pub size: u64,
}

/// Writes `path` as a whole: a temporary file beside it, fsync, rename, fsync the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    private_files::write(&tmp, bytes)?;
    fs::rename(&tmp, path)?;
    sync_parent(path)
}

/// Renames `from` to `to` (atomically replacing it) and makes the rename durable.
pub fn rename_durably(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    sync_parent(to)
}

/// Copies `from` to `to` as an executable file, synced to disk.
pub fn copy_executable(from: &Path, to: &Path) -> io::Result<()> {
    let mut src = File::open(from)?;
    let mut dst = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(EXECUTABLE_MODE)
        .open(to)?;
    io::copy(&mut src, &mut dst)?;
    make_executable(&dst)?;
    dst.sync_all()
}

/// Release binaries are the owner's only, like everything under the data dir: read, write and
/// run by the agent's user (0700).
pub const EXECUTABLE_MODE: u32 = 0o700;

pub fn make_executable(f: &File) -> io::Result<()> {
    f.set_permissions(fs::Permissions::from_mode(EXECUTABLE_MODE))
}

pub fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Opens `path` for appending (created if missing); returns it with its current length.
pub fn open_append(path: &Path) -> io::Result<(File, u64)> {
    let f =
        OpenOptions::new().create(true).append(true).mode(private_files::FILE_MODE).open(path)?;
    let len = f.metadata()?.len();
    Ok((f, len))
}
