//! The agent's SQLite store. One connection, owned by a dedicated thread, so SQLite never blocks
//! an async worker. Writes are group-committed: the thread takes every queued job (up to
//! `MAX_BATCH`), runs each in its own savepoint inside one `BEGIN IMMEDIATE` transaction, commits
//! once with `synchronous=FULL`, and only then answers the callers — so a caller never hears
//! "done" before its change is durable, and one fsync covers many requests under load.
//!
//! Invariants: a job's changes (state + its outbox event) commit together or not at all; a job
//! that fails is rolled back to its savepoint without affecting the others in the batch; a
//! panic in a job is re-raised in the caller. Store-level failures (disk full, corruption, I/O)
//! are recorded in `health()`, counted (`failures()`) and logged at error level; they clear only
//! after a later batch commits a change (a read, or a write that changed nothing, proves nothing
//! about the disk: SQLite serves them without writing).

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};

pub mod queries;

/// The database file in the agent's `data_dir`.
pub const DB_FILE: &str = "agent.db";

/// Jobs per group commit.
const MAX_BATCH: usize = 256;
/// Queued jobs; when full, callers wait (backpressure), nothing is dropped.
const QUEUE: usize = 4096;

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../../migrations/agent/0001_core.sql")),
    (2, include_str!("../../../migrations/agent/0002_visit_lifecycle.sql")),
    (3, include_str!("../../../migrations/agent/0003_staff_sessions.sql")),
    (4, include_str!("../../../migrations/agent/0004_webhooks.sql")),
    (5, include_str!("../../../migrations/agent/0005_waiting_order_index.sql")),
    (6, include_str!("../../../migrations/agent/0006_customer_fields.sql")),
    (7, include_str!("../../../migrations/agent/0007_appointments.sql")),
    (8, include_str!("../../../migrations/agent/0008_appointment_check_in.sql")),
    (9, include_str!("../../../migrations/agent/0009_appointment_sync.sql")),
    (10, include_str!("../../../migrations/agent/0010_branch_closures.sql")),
    (11, include_str!("../../../migrations/agent/0011_requests.sql")),
    (12, include_str!("../../../migrations/agent/0012_request_distribution.sql")),
    (13, include_str!("../../../migrations/agent/0013_upgrades.sql")),
    (14, include_str!("../../../migrations/agent/0014_store_lineage.sql")),
    (15, include_str!("../../../migrations/agent/0015_staff_security.sql")),
];

type Finish = Box<dyn FnOnce(Option<String>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> Outcome + Send>;

/// What the store thread is asked to do.
enum Msg {
    Job(Job),
    /// Finish what is queued before, close the database, then answer.
    Close(oneshot::Sender<()>),
}

struct Outcome {
    ok: bool,
    store_failure: Option<String>,
    finish: Finish,
}

#[derive(Clone)]
pub struct Db {
    jobs: mpsc::Sender<Msg>,
    health: Arc<Mutex<Option<String>>>,
    /// Batches that failed at the store level since the database was opened.
    failures: Counter,
}

impl Db {
    /// Opens (creating if needed) the database at `path`, applies migrations and starts the
    /// store thread.
    pub fn open(path: &Path) -> Result<Db> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Every statement the store runs stays compiled (the hot paths use `prepare_cached`).
        conn.set_prepared_statement_cache_capacity(256);
        let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        let health = Arc::new(Mutex::new(None));
        if check != "ok" {
            tracing::error!(path = %path.display(), result = %check, "agent database failed its integrity check");
            set_health(&health, Some(format!("integrity check failed: {check}")));
        }
        migrate(&mut conn)?;
        // Every opening numbers on in a new segment (see meridian_shared::lineage).
        queries::open_segment(&conn)?;
        let (tx, rx) = mpsc::channel::<Msg>(QUEUE);
        let failures = Counter::default();
        let status = Status { health: health.clone(), failures: failures.clone() };
        std::thread::Builder::new()
            .name("agent-store".into())
            .spawn(move || store_thread(conn, rx, status))
            .map_err(|e| Error::Internal(format!("cannot start the store thread: {e}")))?;
        Ok(Db { jobs: tx, health, failures })
    }

    /// The last store-level failure, if the store is currently unhealthy: set when a batch
    /// fails (disk full, I/O error, corruption), cleared when a later batch commits a change.
    pub fn health(&self) -> Option<String> {
        self.health.lock().map(|h| h.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Counts store-level failures (one per failed batch, as logged); `/metrics` shows it.
    pub fn failures(&self) -> &Counter {
        &self.failures
    }

    /// Runs `f` in a durable transaction (group-committed with other callers).
    pub async fn write<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<std::thread::Result<Result<R>>>();
        let job: Job = Box::new(move |conn| {
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| f(conn)));
            let ok = matches!(result, Ok(Ok(_)));
            let store_failure = match &result {
                Ok(Err(Error::Store(e))) if is_store_failure(e) => Some(e.to_string()),
                _ => None,
            };
            Outcome {
                ok,
                store_failure,
                finish: Box::new(move |commit_error| {
                    // A job that failed on its own reports its own error; one that succeeded
                    // inside a batch that did not commit reports the commit failure.
                    let reply = match (commit_error, result) {
                        (None, result) | (Some(_), result @ (Ok(Err(_)) | Err(_))) => result,
                        (Some(e), Ok(Ok(_))) => Ok(Err(Error::StoreGone(e))),
                    };
                    let _ = tx.send(reply);
                }),
            }
        });
        self.jobs
            .send(Msg::Job(job))
            .await
            .map_err(|_| Error::StoreGone("the store thread has stopped".into()))?;
        match rx.await {
            Ok(Ok(result)) => result,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => Err(Error::StoreGone(
                self.health().unwrap_or_else(|| "the store thread has stopped".into()),
            )),
        }
    }

    /// Closes the database after every job queued before this call (the agent does before it
    /// restarts on another binary): later calls on any clone fail with `StoreGone`. Returns
    /// once the connection is closed (the WAL checkpointed and the file released).
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Msg::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Runs a read-only `f` (in the same queue; reads see every committed write).
    pub async fn read<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
    {
        self.write(f).await
    }
}

fn set_health(health: &Mutex<Option<String>>, value: Option<String>) {
    match health.lock() {
        Ok(mut h) => *h = value,
        Err(p) => *p.into_inner() = value,
    }
}

/// What the store thread reports about itself.
struct Status {
    health: Arc<Mutex<Option<String>>>,
    failures: Counter,
}

impl Status {
    /// Records a store-level failure: logged, counted, and unhealthy until a change commits.
    fn failed(&self, error: &str) {
        tracing::error!(error = %error, "agent store failure: the change was not recorded");
        self.failures.inc();
        set_health(&self.health, Some(error.to_owned()));
    }

    /// Records that a batch committed a change: the store is writable again.
    fn wrote(&self) {
        let was = std::mem::take(&mut *self.health.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(previous) = was {
            tracing::info!(previous = %previous, "agent store healthy again: a change was committed");
        }
    }
}

pub(crate) fn migrate(conn: &mut Connection) -> Result<()> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (version, sql) in MIGRATIONS {
        if *version > current {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", version)?;
            tx.commit()?;
            tracing::info!(version, "applied agent store migration");
        }
    }
    Ok(())
}

fn store_thread(conn: Connection, mut rx: mpsc::Receiver<Msg>, status: Status) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut closing = None;
    while let Some(first) = rx.blocking_recv() {
        match first {
            Msg::Job(job) => batch.push(job),
            Msg::Close(done) => closing = Some(done),
        }
        while closing.is_none() && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Job(job)) => batch.push(job),
                Ok(Msg::Close(done)) => closing = Some(done),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            run_batch(&conn, &mut batch, &status);
        }
        if closing.is_some() {
            break;
        }
    }
    // Jobs queued after a close are dropped unrun: their callers get `StoreGone`.
    rx.close();
    while rx.try_recv().is_ok() {}
    if let Err((_, e)) = conn.close() {
        tracing::error!(error = %e, "closing the agent database failed");
    }
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

fn run_batch(conn: &Connection, batch: &mut Vec<Job>, status: &Status) {
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE") {
        let msg = format!("cannot begin a transaction: {e}");
        status.failed(&msg);
        // Dropping the jobs unrun closes their reply channels: callers get `StoreGone`.
        batch.clear();
        return;
    }
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut failure = None;
    // Set when SQLite rolled the whole transaction back by itself (it does on SQLITE_FULL and
    // some I/O errors): nothing in the batch may be reported as done, and no later job may run
    // outside the transaction.
    let mut aborted: Option<String> = None;
    // Whether a job that succeeded changed rows (only such a commit proves the disk writable).
    let mut changed = false;
    for job in batch.drain(..) {
        if aborted.is_some() {
            drop(job);
            continue;
        }
        if let Err(e) = exec(conn, "SAVEPOINT job") {
            failure = Some(e.to_string());
            drop(job);
            continue;
        }
        let changes_before = conn.total_changes();
        let outcome = job(conn);
        changed |= outcome.ok && conn.total_changes() != changes_before;
        if let Some(f) = &outcome.store_failure {
            failure = Some(f.clone());
        }
        if conn.is_autocommit() {
            let msg = failure.clone().unwrap_or_else(|| "the transaction was rolled back".into());
            aborted = Some(format!("not recorded: {msg}"));
        } else {
            let end = if outcome.ok {
                exec(conn, "RELEASE job")
            } else {
                exec(conn, "ROLLBACK TO job").and_then(|()| exec(conn, "RELEASE job"))
            };
            if let Err(e) = end {
                failure = Some(e.to_string());
            }
        }
        outcomes.push(outcome);
    }
    let commit_error = match aborted {
        Some(msg) => Some(msg),
        None => exec(conn, "COMMIT").err().map(|e| e.to_string()),
    };
    if commit_error.is_some() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    match commit_error.as_ref().or(failure.as_ref()) {
        Some(e) => status.failed(e),
        None if changed => status.wrote(),
        // Reads and writes that changed nothing leave the health as it was.
        None => {}
    }
    for outcome in outcomes {
        (outcome.finish)(commit_error.clone());
    }
}

/// Runs one statement through the statement cache (the batch loop runs these for every job).
fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Whether `e` means the store itself is failing (as opposed to a rejected statement).
pub fn is_store_failure(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        e.sqlite_error_code(),
        Some(
            DiskFull
                | DatabaseCorrupt
                | NotADatabase
                | SystemIoFailure
                | CannotOpen
                | ReadOnly
                | OutOfMemory
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db() -> Db {
        let dir = std::env::temp_dir().join(format!("agent-db-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("dir");
        Db::open(&dir.join("agent.db")).expect("open")
    }

    #[tokio::test]
    async fn failed_job_rolls_back_alone() {
        let db = temp_db();
        let set = |k: &'static str| {
            let db = db.clone();
            async move {
                db.write(move |c| {
                    c.execute("INSERT INTO meta (key, value) VALUES (?1, 'x')", [k])?;
                    Ok(())
                })
                .await
            }
        };
        let (a, b, dup) = tokio::join!(set("a"), set("b"), set("a"));
        assert!(a.is_ok() && b.is_ok());
        assert!(matches!(dup, Err(Error::Store(_))), "{dup:?}");
        let n: i64 = db
            .read(|c| Ok(c.query_row("SELECT COUNT(*) FROM meta", [], |r| r.get(0))?))
            .await
            .expect("count");
        assert_eq!(n, 2);
    }

    #[test]
    fn a_corrupt_database_is_refused_loudly() {
        let dir = std::env::temp_dir().join(format!("agent-db-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("agent.db");
        std::fs::write(&path, vec![0x5a; 8192]).expect("write garbage");
        let err = Db::open(&path).err().expect("a corrupt file must not open");
        assert!(matches!(&err, Error::Store(e) if is_store_failure(e)), "{err:?}");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            vec![0x5a; 8192],
            "nothing was overwritten"
        );
    }

    #[tokio::test]
    async fn a_full_disk_refuses_the_change_reports_it_and_recovers() {
        let db = temp_db();
        // SQLite's page limit makes the database "full" exactly like a full disk would.
        db.write(|c| {
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            c.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
            Ok(())
        })
        .await
        .expect("limit pages");
        let big = vec![7u8; 256 * 1024];
        let full = db
            .write(move |c| {
                c.execute("INSERT INTO outbox (seq, kind, occurred_at_ms, payload) VALUES (1, 'X', 0, ?1)", [big])?;
                Ok(())
            })
            .await;
        assert!(matches!(&full, Err(Error::Store(e)) if is_store_failure(e)), "{full:?}");
        assert!(db.health().is_some_and(|h| h.contains("full")), "{:?}", db.health());
        assert_eq!(db.failures().get(), 1);
        let rows: i64 = db
            .read(|c| Ok(c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?))
            .await
            .expect("count");
        assert_eq!(rows, 0, "nothing half-written");
        // Reads and writes that change nothing commit without touching the disk: no proof.
        db.write(|c| {
            c.execute("DELETE FROM meta WHERE key = 'nothing'", [])?;
            c.query_row("PRAGMA max_page_count = 1073741823", [], |_| Ok(()))?;
            Ok(())
        })
        .await
        .expect("lift limit");
        assert!(db.health().is_some_and(|h| h.contains("full")), "{:?}", db.health());
        db.write(|c| {
            c.execute("INSERT INTO meta (key, value) VALUES ('after', 'x')", [])?;
            Ok(())
        })
        .await
        .expect("write after the limit is lifted");
        assert_eq!(db.health(), None, "a committed change clears the failure");
        assert_eq!(db.failures().get(), 1, "the counter keeps counting");
    }

    #[tokio::test]
    async fn callers_told_done_are_durable_when_the_disk_fills_mid_batch() {
        let db = temp_db();
        db.write(|c| {
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            c.query_row(&format!("PRAGMA max_page_count = {}", pages + 2), [], |_| Ok(()))?;
            Ok(())
        })
        .await
        .expect("limit pages");
        let writes = (0..40).map(|i| {
            let db = db.clone();
            async move {
                let size = if i % 10 == 5 { 64 * 1024 } else { 16 };
                let result = db
                    .write(move |c| {
                        c.execute(
                            "INSERT INTO meta (key, value) VALUES (?1, ?2)",
                            (i.to_string(), "x".repeat(size)),
                        )?;
                        Ok(())
                    })
                    .await;
                (i, result.is_ok())
            }
        });
        let results = futures::future::join_all(writes).await;
        assert!(results.iter().any(|(_, ok)| !ok), "the limit must refuse something");
        for (i, told_ok) in results {
            let stored: i64 = db
                .read(move |c| {
                    Ok(c.query_row(
                        "SELECT COUNT(*) FROM meta WHERE key = ?1",
                        [i.to_string()],
                        |r| r.get(0),
                    )?)
                })
                .await
                .expect("read");
            assert_eq!(stored == 1, told_ok, "write {i}: told ok = {told_ok}, stored = {stored}");
        }
    }

    #[tokio::test]
    async fn close_finishes_what_was_queued_and_refuses_the_rest() {
        let db = temp_db();
        let insert = |k: &'static str| {
            let db = db.clone();
            async move {
                db.write(move |c| {
                    c.execute("INSERT INTO meta (key, value) VALUES (?1, 'x')", [k])?;
                    Ok(())
                })
                .await
            }
        };
        let (before, ()) = tokio::join!(insert("before"), db.close());
        assert!(before.is_ok(), "{before:?}");
        let after = insert("after").await;
        assert!(matches!(after, Err(Error::StoreGone(_))), "{after:?}");
        db.close().await;
    }

    #[tokio::test]
    #[should_panic(expected = "boom")]
    async fn panics_reach_the_caller() {
        let db = temp_db();
        let _ = db.write(|_| -> Result<()> { panic!("boom") }).await;
    }
}
