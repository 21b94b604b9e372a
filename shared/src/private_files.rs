//! Files and folders only their owner may read: the controller's and the agent's state
//! (databases, staging folders) and secrets. Files are 0600 and folders 0700 from the moment
//! they exist, whatever the process's umask; one that already exists with another mode (an
//! older install) is set to it.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The mode of every state or secret file.
pub const FILE_MODE: u32 = 0o600;
/// The mode of every state folder.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` and its missing parents (0700); an existing `dir` is set to 0700, existing
/// parents are left as they are.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)?;
    set_mode(dir, DIR_MODE)
}

/// Creates `file` empty (0600) unless it exists, for files a library opens or creates itself
/// (a SQLite database); an existing one keeps its content and is set to 0600.
pub fn ensure_file(file: &Path) -> io::Result<()> {
    OpenOptions::new().write(true).create(true).truncate(false).mode(FILE_MODE).open(file)?;
    set_mode(file, FILE_MODE)
}

/// Writes `contents` to `file` (created 0600, or truncated and set to 0600 before anything is
/// written), synced to disk.
pub fn write(file: &Path, contents: &[u8]) -> io::Result<()> {
    let mut f =
        OpenOptions::new().write(true).create(true).truncate(true).mode(FILE_MODE).open(file)?;
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    f.write_all(contents)?;
    f.sync_all()
}

/// Makes the SQLite database `db` a private file before SQLite opens it: SQLite creates a new
/// database 0644 and gives its `-wal`, `-shm` and `-journal` files the database's mode, so
/// the database is created here (0600) and the companions left by an older install are set to
/// 0600 too.
pub fn sqlite_database(db: &Path) -> io::Result<()> {
    ensure_file(db)?;
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut companion = db.as_os_str().to_owned();
        companion.push(suffix);
        let companion = PathBuf::from(companion);
        match set_mode(&companion, FILE_MODE) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(())
}

/// Sets `path` to `mode` unless it has it already.
fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    let current = std::fs::metadata(path)?.permissions().mode() & 0o7777;
    if current != mode {
        std::fs::set_permissions(path, Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("metadata").permissions().mode() & 0o7777
    }

    #[test]
    fn files_are_0600_and_folders_0700_new_or_existing() {
        let root = std::env::temp_dir().join(format!("private-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("a/b");
        create_dir(&dir).expect("create");
        assert_eq!((mode(&root.join("a")), mode(&dir)), (DIR_MODE, DIR_MODE));
        std::fs::set_permissions(&dir, Permissions::from_mode(0o755)).expect("chmod");
        create_dir(&dir).expect("again");
        assert_eq!(mode(&dir), DIR_MODE, "an existing folder is narrowed");

        let secret = dir.join("secret");
        std::fs::write(&secret, "old").expect("old");
        std::fs::set_permissions(&secret, Permissions::from_mode(0o644)).expect("chmod");
        write(&secret, b"new\n").expect("write");
        assert_eq!(
            (mode(&secret), std::fs::read(&secret).expect("read")),
            (FILE_MODE, b"new\n".to_vec())
        );

        let db = dir.join("x.db");
        sqlite_database(&db).expect("new database");
        assert_eq!((mode(&db), std::fs::metadata(&db).expect("db").len()), (FILE_MODE, 0));
        let wal = dir.join("x.db-wal");
        std::fs::write(&db, "kept").expect("db");
        std::fs::write(&wal, "wal").expect("wal");
        for p in [&db, &wal] {
            std::fs::set_permissions(p, Permissions::from_mode(0o666)).expect("chmod");
        }
        sqlite_database(&db).expect("existing database");
        assert_eq!((mode(&db), mode(&wal)), (FILE_MODE, FILE_MODE));
        assert_eq!(std::fs::read(&db).expect("db"), b"kept", "an existing database is kept");
        std::fs::remove_dir_all(&root).expect("clean up");
    }
}
