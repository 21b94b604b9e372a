//! `meridian-agent backup <destination>`: a consistent copy of the agent's store, taken while
//! the agent runs.
//!
//! SQLite's online backup API copies every page in one step, inside one read transaction on a
//! connection of its own: the copy is the database as of one commit (in WAL mode the agent goes
//! on writing meanwhile and is never blocked). The copy is written to `<destination>.partial`
//! (mode 0600: it holds the agent's credential and customers' data), checked (`quick_check`),
//! synced, and only then renamed to `<destination>`; an existing destination is never
//! overwritten. Nothing is written to the live database.

use std::fmt;
use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use crate::error::{Error, Result};
use crate::store::queries;

/// How often a busy source (a checkpoint holding a lock) is retried, and how long apart.
const BUSY_RETRIES: u32 = 100;
const BUSY_PAUSE: Duration = Duration::from_millis(100);

/// What a backup wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub pages: u64,
    pub site: Option<String>,
    pub agent_id: Option<String>,
    pub config_revision: u64,
    /// The outbox as of the copy: the last sequence committed and the last acknowledged.
    pub outbox_high_water: u64,
    pub outbox_acked: u64,
}

impl fmt::Display for BackupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "wrote {} ({} bytes, {} pages, mode 0600)",
            self.path.display(),
            self.bytes,
            self.pages
        )?;
        writeln!(
            f,
            "site {}, agent {}, configuration revision {}",
            self.site.as_deref().unwrap_or("(not enrolled)"),
            self.agent_id.as_deref().unwrap_or("-"),
            self.config_revision
        )?;
        write!(
            f,
            "outbox: events up to {} committed, up to {} acknowledged by the controller",
            self.outbox_high_water, self.outbox_acked
        )
    }
}

/// Copies the agent database `source` (the live `data_dir/agent.db`) to `destination`.
pub fn backup(source: &Path, destination: &Path) -> Result<BackupReport> {
    if !source.is_file() {
        return Err(Error::NotFound(format!("agent database {}", source.display())));
    }
    if destination.exists() {
        return Err(Error::Conflict(format!(
            "{} already exists; a backup never overwrites a file",
            destination.display()
        )));
    }
    let partial = partial_path(destination)?;
    let result = write_copy(source, &partial).and_then(|report| {
        std::fs::rename(&partial, destination).map_err(|e| io(destination, e))?;
        if let Some(dir) = destination.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))?;
        }
        Ok(BackupReport { path: destination.to_owned(), ..report })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// `<destination>.partial`, beside the destination (so the rename stays on one filesystem).
fn partial_path(destination: &Path) -> Result<PathBuf> {
    let name = destination.file_name().ok_or_else(|| {
        Error::Validation(format!("{} is not a file name", destination.display()))
    })?;
    let mut partial = name.to_owned();
    partial.push(".partial");
    Ok(destination.with_file_name(partial))
}

fn write_copy(source: &Path, partial: &Path) -> Result<BackupReport> {
    // Left over by a backup that was interrupted: ours to replace.
    match std::fs::remove_file(partial) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(partial, e)),
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(partial)
        .map_err(|e| io(partial, e))?;
    std::fs::set_permissions(partial, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io(partial, e))?;
    // Read-write without create: a missing file is an error, not a new empty database; the
    // connection only ever reads.
    let src = Connection::open_with_flags(
        source,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    src.busy_timeout(Duration::from_secs(5))?;
    let mut dst = Connection::open(partial)?;
    {
        let copy = Backup::new(&src, &mut dst)?;
        let mut busy = 0;
        loop {
            // -1: every page in one step, so the copy is one snapshot and never restarts.
            match copy.step(-1)? {
                StepResult::Done => break,
                StepResult::More => {}
                StepResult::Busy | StepResult::Locked if busy < BUSY_RETRIES => {
                    busy += 1;
                    std::thread::sleep(BUSY_PAUSE);
                }
                _ => {
                    return Err(Error::Conflict(format!(
                        "{} stayed locked; try again",
                        source.display()
                    )));
                }
            }
        }
    }
    drop(src);
    let check: String = dst.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(Error::Internal(format!("the copy failed its integrity check: {check}")));
    }
    let pages: i64 = dst.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let identity = queries::identity(&dst)?;
    let config_revision = queries::config_revision(&dst)?;
    let (outbox_high_water, outbox_acked) = queries::outbox_state(&dst)?;
    dst.close().map_err(|(_, e)| Error::Store(e))?;
    let file = std::fs::File::open(partial).map_err(|e| io(partial, e))?;
    file.sync_all().map_err(|e| io(partial, e))?;
    let bytes = file.metadata().map_err(|e| io(partial, e))?.len();
    Ok(BackupReport {
        path: partial.to_owned(),
        bytes,
        pages: pages.max(0) as u64,
        site: identity.as_ref().map(|i| i.site.clone()),
        agent_id: identity.map(|i| i.agent_id),
        config_revision,
        outbox_high_water,
        outbox_acked,
    })
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Internal(format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("agent-backup-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[tokio::test]
    async fn copies_refuses_to_overwrite_and_names_a_missing_source() {
        let dir = temp_dir();
        let db = crate::store::Db::open(&dir.join("agent.db")).expect("open");
        db.write(|c| {
            queries::save_identity(
                c,
                &queries::Identity {
                    agent_id: "a1".into(),
                    site: "SFO".into(),
                    credential: "a1.secret".into(),
                },
            )
        })
        .await
        .expect("identity");
        let dest = dir.join("copy.db");
        let report = backup(&dir.join("agent.db"), &dest).expect("backup");
        assert_eq!((report.site.as_deref(), report.path.as_path()), (Some("SFO"), dest.as_path()));
        let mode = std::fs::metadata(&dest).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        for leftover in ["copy.db.partial", "copy.db.partial-wal", "copy.db.partial-shm"] {
            assert!(!dir.join(leftover).exists(), "{leftover} left behind");
        }
        assert!(!report.to_string().contains("secret"), "{report}");

        let again = backup(&dir.join("agent.db"), &dest).expect_err("exists");
        assert!(matches!(again, Error::Conflict(_)), "{again:?}");
        let missing = backup(&dir.join("nothing.db"), &dir.join("other.db")).expect_err("missing");
        assert!(matches!(missing, Error::NotFound(_)), "{missing:?}");
        assert!(!dir.join("nothing.db").exists(), "no database was created");
        assert!(!dir.join("other.db").exists() && !dir.join("other.db.partial").exists());
    }
}
