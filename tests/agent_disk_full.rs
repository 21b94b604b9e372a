//! A branch whose disk fills up, end to end: a real controller on PostgreSQL and a real agent
//! process. While the disk is full the agent refuses tickets (503), `/healthz` answers 503
//! `degraded` naming the store error, `/metrics` shows it, and the controller's
//! `/api/v1/agents` row carries `store_error` (sent in the heartbeat's Status frame). Once space
//! is freed, the next ticket commits, all three clear, and every ticket the branch accepted —
//! before, during and after — reaches central statistics; the refused ones exist nowhere.
//!
//! How the disk fills: the agent's data dir is a 32 MiB tmpfs the test mounts (`mount -t
//! tmpfs`, which needs root / CAP_SYS_ADMIN: `make test` and a plain `cargo test` run as root
//! here; elsewhere the test fails loudly, it does not skip). Once the agent is settled (every
//! event acknowledged) the test checkpoints and truncates the agent's WAL from its own
//! connection, then writes a filler file until `write` fails with ENOSPC. The agent's next
//! commit has to grow its WAL, gets ENOSPC and SQLite reports SQLITE_FULL — what a real full
//! disk gives; the filesystem's free space (`statvfs`, the metric) is really zero. Removing
//! the filler frees the space. The mount is lazily unmounted when the test ends, pass or fail
//! (`umount --lazy`, so an agent still exiting does not keep it mounted).
//! Why not RLIMIT_FSIZE: it is per process, needs SIGXFSZ ignored in the agent, and yields
//! EFBIG (SQLITE_IOERR) with a filesystem that still shows free space — not a full disk.
//!
//! Everything is acknowledged before the disk fills on purpose: recording an acknowledgement
//! is itself a write, and the link ends its session when it cannot record one, so a branch
//! whose disk fills with events in flight reconnects until space is freed (the controller then
//! shows it disconnected rather than its store error).

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use support::{AgentProc, CONNECTOR_KEY, ControllerProc, wait_for};

const DEADLINE: Duration = Duration::from_secs(30);

/// A tmpfs mounted for the test; lazily unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size_mib: u32) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m,mode=0700"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a tmpfs as the agent's data dir and needs root (CAP_SYS_ADMIN); \
             mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("--lazy").arg(&self.0).status();
    }
}

/// Writes `path` until the filesystem is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).expect("filler");
    let mut written = 0u64;
    for chunk in [1usize << 20, 4096, 64] {
        let buf = vec![0xa5u8; chunk];
        loop {
            match file.write_all(&buf) {
                Ok(()) => written += chunk as u64,
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    written
}

/// The value of the sample `name` in a scrape.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

struct Branch {
    agent: AgentProc,
    http: reqwest::Client,
}

impl Branch {
    async fn healthz(&self) -> (u16, Value) {
        let resp =
            self.http.get(format!("{}/healthz", self.agent.url)).send().await.expect("healthz");
        (resp.status().as_u16(), resp.json().await.expect("healthz json"))
    }

    async fn metric(&self, name: &str) -> f64 {
        let url = self.agent.metrics.as_deref().expect("metrics listener");
        let text = self.http.get(url).send().await.expect("scrape").text().await.expect("text");
        sample(&text, name).unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    /// Asks for a ticket: `Ok(visit id)` when accepted, `Err(error code)` when refused with 503.
    async fn ticket(&self) -> Result<String, String> {
        let resp = self
            .http
            .post(format!("{}/api/v1/visits", self.agent.url))
            .bearer_auth(CONNECTOR_KEY)
            .json(&json!({"service": "GEN"}))
            .send()
            .await
            .expect("post visit");
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.expect("json");
        match status {
            201 => Ok(body["id"].as_str().expect("id").to_owned()),
            503 => Err(body["code"].as_str().unwrap_or_default().to_owned()),
            other => panic!("unexpected answer {other}: {body}"),
        }
    }
}

/// The controller's `/api/v1/agents` row of `id`.
async fn agent_row(controller: &ControllerProc, id: &str) -> Value {
    let rows = controller.client().ok(reqwest::Method::GET, "/api/v1/agents", None).await;
    rows.as_array()
        .and_then(|rows| rows.iter().find(|r| r["id"] == id))
        .cloned()
        .unwrap_or_else(|| panic!("agent {id} not listed: {rows}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_everywhere_and_nothing_is_lost_once_space_is_freed() {
    let root = support::temp_dir("meridian-disk-full");
    let database_url = support::fresh_postgres_url().await;
    let controller = ControllerProc::start(&root.join("controller"), &database_url).await;
    controller.client().seed_site("SFO").await;
    let data = root.join("agent-data");
    let mount = Tmpfs::mount(&data, 32);
    let token = controller.client().enrollment_token("SFO").await;
    let agent = AgentProc::spawn_with(
        &data,
        &format!("http://{}", controller.gateway),
        &token,
        &[("MERIDIAN_AGENT_METRICS_LISTEN", "127.0.0.1:0".to_owned())],
    )
    .await;
    let status = agent
        .wait_status("agent enrolled, configured and connected", |s| {
            s["connected"] == true && s["config_revision"].as_u64() > Some(0)
        })
        .await;
    let agent_id = status["agent_id"].as_str().expect("agent id").to_owned();
    let branch = Branch { agent, http: reqwest::Client::new() };

    let mut accepted = branch.agent.issue_tickets("GEN", 32).await;
    branch
        .agent
        .wait_status("every event acknowledged", |s| {
            s["outbox_pending"] == 0 && s["last_acked_seq"] == s["outbox_high_water"]
        })
        .await;
    assert_eq!(branch.healthz().await, (200, json!({"status": "ok"})));
    assert_eq!(branch.metric("meridian_agent_store_unhealthy").await, 0.0);
    assert_eq!(branch.metric("meridian_agent_link_connected").await, 1.0);
    assert_eq!(branch.metric("meridian_agent_outbox_backlog").await, 0.0);
    assert!(branch.metric("meridian_agent_data_dir_free_bytes").await > 16.0 * 1024.0 * 1024.0);

    // Empty the WAL, so the agent's next commit has to grow it, then fill the filesystem.
    let db_path = data.join("agent.db");
    wait_for("a complete WAL checkpoint", DEADLINE, || {
        let db_path = db_path.clone();
        async move {
            let conn = rusqlite::Connection::open(&db_path).expect("open the agent database");
            conn.busy_timeout(Duration::from_secs(5)).expect("busy timeout");
            let (busy, log, done): (i64, i64, i64) = conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .expect("checkpoint");
            (busy == 0 && log == done).then_some(())
        }
    })
    .await;
    let filler = data.join("filler");
    let filled = {
        let filler = filler.clone();
        tokio::task::spawn_blocking(move || fill(&filler)).await.expect("fill")
    };
    assert!(filled > 16 * 1024 * 1024, "filled {filled} bytes");
    assert!(branch.metric("meridian_agent_data_dir_free_bytes").await < 4096.0);

    for _ in 0..3 {
        assert_eq!(branch.ticket().await, Err("store_unavailable".to_owned()));
    }
    let (code, body) = branch.healthz().await;
    assert_eq!((code, body["status"].as_str()), (503, Some("degraded")), "{body}");
    let store_error = body["store_error"].as_str().expect("store_error").to_owned();
    assert!(store_error.contains("full"), "{store_error}");
    assert_eq!(branch.metric("meridian_agent_store_unhealthy").await, 1.0);
    assert!(branch.metric("meridian_agent_store_errors_total").await >= 3.0);
    let row = wait_for("the store error on the controller's agents row", DEADLINE, || async {
        let row = agent_row(&controller, &agent_id).await;
        row["store_error"].as_str().is_some_and(|e| e.contains("full")).then_some(row)
    })
    .await;
    assert_eq!(row["connected"], true, "{row}");
    // Still degraded: reads (the heartbeat's, the scrapes') do not clear it.
    assert_eq!(branch.healthz().await.0, 503);

    std::fs::remove_file(&filler).expect("free the space");
    accepted.push(branch.ticket().await.expect("a ticket once space is free"));
    assert_eq!(branch.healthz().await, (200, json!({"status": "ok"})));
    assert_eq!(branch.metric("meridian_agent_store_unhealthy").await, 0.0);
    wait_for("the store error cleared on the controller", DEADLINE, || async {
        agent_row(&controller, &agent_id).await["store_error"].is_null().then_some(())
    })
    .await;
    accepted.extend(branch.agent.issue_tickets("GEN", 16).await);

    // Nothing lost, nothing invented: central holds exactly the accepted tickets, gapless.
    let status = branch
        .agent
        .wait_status("every event acknowledged again", |s| {
            s["outbox_pending"] == 0 && s["last_acked_seq"] == s["outbox_high_water"]
        })
        .await;
    let high = status["outbox_high_water"].as_i64().expect("high water");
    let (count, min, max, distinct, _) = support::central_events(&database_url, &agent_id).await;
    assert_eq!((count, min, max, distinct), (high, 1, high, high), "gapless central events");
    let mut central = support::central_visit_ids(&database_url, &agent_id).await;
    central.sort();
    accepted.sort();
    assert_eq!(central, accepted, "central has exactly the tickets the branch accepted");
    assert_eq!(branch.metric("meridian_agent_outbox_backlog").await, 0.0);

    let Branch { mut agent, .. } = branch;
    agent.child.start_kill().expect("kill agent");
    let _ = agent.child.wait().await;
    drop(mount);
}
