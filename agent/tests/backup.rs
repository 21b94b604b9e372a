//! `meridian-agent backup` (the real executable, another process) while tickets are being
//! issued on the agent's store: the copy opens, passes its integrity check, and holds exactly
//! the live store's state as of one commit — a prefix: the outbox is gapless up to its high
//! water, every visit in it has its `VISIT_CREATED` in it and vice versa, and the live store
//! holds the same visits with the same tickets at the same sequences.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use meridian_agent::store::queries;
use meridian_agent::{Context, Settings};
use meridian_shared::clock::SystemClock;
use meridian_shared::config::SiteConfig;
use rusqlite::Connection;
use serde_json::json;
use tower::ServiceExt;

const KEY: &str = "mrd_ck_backup-test";

fn site_config() -> SiteConfig {
    serde_json::from_value(json!({
        "revision": 1,
        "site": {"code": "SFO", "name": "San Francisco", "time_zone": "America/Los_Angeles"},
        "services": [{"site": "SFO", "code": "GEN", "name": "General", "queue": "general"}],
        "queues": [{"site": "SFO", "code": "general", "name": "General", "letter": "A",
                    "last_number": 9999}],
        "service_points": [],
        "work_profiles": [],
        "staff": [],
        "connector_keys": [
            {"site": "SFO", "code": "kiosk", "name": "Kiosk", "key_hash": meridian_agent::auth::hash(KEY)}
        ]
    }))
    .expect("site config")
}

async fn ticket(router: &axum::Router) {
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/visits")
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(Body::from(json!({"service": "GEN"}).to_string()))
        .expect("request");
    let resp = router.clone().oneshot(req).await.expect("call");
    assert_eq!(resp.status(), StatusCode::CREATED);
}

/// Visit id → (ticket, seq of its VISIT_CREATED) for the events up to `up_to`, and the
/// outbox's sequences, from one database.
fn state(conn: &Connection, up_to: u64) -> (BTreeMap<String, (String, u64)>, Vec<u64>) {
    let seqs: Vec<u64> = conn
        .prepare("SELECT seq FROM outbox WHERE seq <= ?1 ORDER BY seq")
        .expect("prepare")
        .query_map([up_to as i64], |r| r.get::<_, i64>(0).map(|s| s as u64))
        .expect("seqs")
        .collect::<Result<_, _>>()
        .expect("seqs");
    let visits = conn
        .prepare(
            "SELECT v.id, v.ticket, o.seq FROM visits v \
             JOIN outbox o ON o.kind = 'VISIT_CREATED' AND json_extract(CAST(o.payload AS TEXT), '$.visit_id') = v.id \
             WHERE o.seq <= ?1",
        )
        .expect("prepare")
        .query_map([up_to as i64], |r| {
            Ok((r.get::<_, String>(0)?, (r.get::<_, String>(1)?, r.get::<_, i64>(2)? as u64)))
        })
        .expect("visits")
        .collect::<Result<_, _>>()
        .expect("visits");
    (visits, seqs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_tickets_are_issued_holds_a_consistent_prefix() {
    let dir =
        std::env::temp_dir().join(format!("meridian-backup-{}", uuid::Uuid::new_v4().simple()));
    let settings = Settings { data_dir: dir.join("data"), ..Settings::default() };
    let ctx = Context::open(&settings, Arc::new(SystemClock)).await.expect("open");
    let config = site_config();
    let now = ctx.clock.now();
    ctx.db.write(move |c| queries::apply_config(c, &config, now)).await.expect("configure");
    let config = ctx.db.read(queries::site_config).await.expect("config");
    ctx.config.send_replace(config.map(Arc::new));
    let router = meridian_agent::branch_api::router(ctx.clone());
    for _ in 0..20 {
        ticket(&router).await;
    }

    // Four clients keep issuing tickets until the backup process has exited.
    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let (router, stop, issued) = (router.clone(), stop.clone(), issued.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    ticket(&router).await;
                    issued.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let dest = dir.join("backups").join("agent-copy.db");
    std::fs::create_dir_all(dest.parent().expect("parent")).expect("backups dir");
    let at_start = issued.load(Ordering::SeqCst);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meridian-agent"))
        .arg("backup")
        .arg(&dest)
        .env("MERIDIAN_AGENT_DATA_DIR", &settings.data_dir)
        .output()
        .await
        .expect("run meridian-agent backup");
    let during = issued.load(Ordering::SeqCst) - at_start;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.expect("writer");
    }
    ticket(&router).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("wrote {}", dest.display())), "{stdout}");
    assert!(during > 0, "tickets must be issued while the backup runs");
    let mode = std::fs::metadata(&dest).expect("backup file").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let copy = Connection::open(&dest).expect("open the copy");
    let check: String = copy.query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("check");
    assert_eq!(check, "ok");
    let (high, acked) = queries::outbox_state(&copy).expect("outbox state");
    assert!(stdout.contains(&format!("events up to {high} committed")), "{stdout}");
    assert_eq!(acked, 0);
    let (copied, copied_seqs) = state(&copy, high);
    assert_eq!(copied_seqs, (1..=high).collect::<Vec<_>>(), "gapless outbox up to its high water");
    let visits: i64 =
        copy.query_row("SELECT COUNT(*) FROM visits", [], |r| r.get(0)).expect("visits");
    assert_eq!(visits as usize, copied.len(), "every visit has its event and vice versa");
    assert!(copied.len() >= 20, "the tickets issued before the backup are in it");

    // The live store as of the copy's high water is exactly the copy; it went on after.
    let live = Connection::open(settings.data_dir.join("agent.db")).expect("open live");
    let (live_high, _) = queries::outbox_state(&live).expect("live state");
    assert!(live_high > high, "the live store went on after the copy");
    let (live_prefix, live_seqs) = state(&live, high);
    assert_eq!(live_seqs, copied_seqs);
    assert_eq!(live_prefix, copied, "same visits, tickets and sequences");
    drop(live);

    // A second backup to the same file is refused, and the file is left alone.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_meridian-agent"))
        .arg("backup")
        .arg(&dest)
        .env("MERIDIAN_AGENT_DATA_DIR", &settings.data_dir)
        .output()
        .expect("run again");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let (_, seqs_after) = state(&copy, i64::MAX as u64);
    assert_eq!(seqs_after, copied_seqs);
}
