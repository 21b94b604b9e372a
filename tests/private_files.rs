//! State and secrets are their owner's only, whatever the umask: a real controller, a real
//! agent and `meridian-agent backup`, all started with umask 000, create every folder 0700 and
//! every file 0600 (databases with their `-wal` and `-shm`, the bootstrap token, the backup).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use support::*;
use tokio::process::Command;

/// `program args…` started by a shell that first sets umask 000 (the test process's own umask
/// is process-wide, so it is not touched).
fn with_umask_000(program: &Path) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg("umask 000; exec \"$0\" \"$@\"").arg(program);
    cmd.stdout(Stdio::null()).stderr(Stdio::inherit()).kill_on_drop(true);
    cmd
}

fn meridian() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meridian"))
}

/// Every folder and file under `root` (itself included) with its permission bits.
fn modes(root: &Path) -> Vec<(PathBuf, bool, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).expect("metadata");
        out.push((path.clone(), meta.is_dir(), meta.permissions().mode() & 0o7777));
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).expect("read_dir") {
                stack.push(entry.expect("entry").path());
            }
        }
    }
    out
}

fn assert_private(root: &Path, expected: &[&str]) {
    let found = modes(root);
    for name in expected {
        assert!(
            found.iter().any(|(p, _, _)| p.ends_with(name)),
            "{name} was not created under {}: {found:?}",
            root.display()
        );
    }
    let wrong: Vec<_> = found
        .iter()
        .filter(|(_, dir, mode)| *mode != if *dir { 0o700 } else { 0o600 })
        .map(|(p, dir, mode)| {
            format!("{} {} {mode:o}", if *dir { "folder" } else { "file" }, p.display())
        })
        .collect();
    assert!(wrong.is_empty(), "not private under umask 000: {wrong:#?}");
}

#[tokio::test]
async fn the_controller_the_agent_and_backups_create_private_files_whatever_the_umask() {
    let root = temp_dir("meridian-private-files");
    // Folders the processes create themselves, nested to include missing parents.
    let controller_dir = root.join("controller/state");
    let controller_ready = root.join("controller-ready.json");
    let mut controller = with_umask_000(&meridian())
        .arg("controller")
        .env("MERIDIAN_CONTROLLER_DATA_DIR", &controller_dir)
        .env("MERIDIAN_CONTROLLER_API_LISTEN", "127.0.0.1:0")
        .env("MERIDIAN_CONTROLLER_GATEWAY_LISTEN", "127.0.0.1:0")
        .env("MERIDIAN_CONTROLLER_HEARTBEAT_MS", "500")
        .env("MERIDIAN_CONTROLLER_READY_FILE", &controller_ready)
        .env("MERIDIAN_CONTROLLER_LOG", "warn")
        .spawn()
        .expect("spawn controller");
    let r = read_ready(&controller_ready, &mut controller).await;
    // No bootstrap_token_file: the token goes to the data dir.
    let token = std::fs::read_to_string(controller_dir.join("bootstrap-token")).expect("token");
    let admin = AdminClient {
        base: format!("http://{}", r["api"].as_str().expect("api")),
        token: token.trim().to_owned(),
        http: reqwest::Client::new(),
    };
    admin.seed_site("SFO").await;
    let enrollment = admin.enrollment_token("SFO").await;

    let agent_dir = root.join("agent/state");
    let agent_ready = agent_dir.join("ready.json");
    let mut agent = with_umask_000(&meridian())
        .arg("agent")
        .env(
            "MERIDIAN_AGENT_CONTROLLER_URL",
            format!("http://{}", r["gateway"].as_str().expect("gw")),
        )
        .env("MERIDIAN_AGENT_DATA_DIR", &agent_dir)
        .env("MERIDIAN_AGENT_HTTP_LISTEN", "127.0.0.1:0")
        .env("MERIDIAN_AGENT_ENROLLMENT_TOKEN", &enrollment)
        .env("MERIDIAN_AGENT_HEARTBEAT_MS", "500")
        .env("MERIDIAN_AGENT_BACKOFF_BASE_MS", "50")
        .env("MERIDIAN_AGENT_BACKOFF_CAP_MS", "1000")
        .env("MERIDIAN_AGENT_READY_FILE", &agent_ready)
        .env("MERIDIAN_AGENT_LOG", "warn")
        .spawn()
        .expect("spawn agent");
    let a = read_ready(&agent_ready, &mut agent).await;
    let url = format!("http://{}", a["http"].as_str().expect("http"));
    wait_for(
        "the agent enrolled, configured and its events stored centrally",
        Duration::from_secs(60),
        || async {
            let s: Value =
                reqwest::get(format!("{url}/api/v1/status")).await.ok()?.json().await.ok()?;
            let ok = s["connected"] == true
                && s["config_revision"].as_u64() > Some(0)
                && s["outbox_pending"] == 0;
            ok.then_some(())
        },
    )
    .await;
    let ticket = reqwest::Client::new()
        .post(format!("{url}/api/v1/visits"))
        .bearer_auth(CONNECTOR_KEY)
        .json(&serde_json::json!({"service": "GEN"}))
        .send()
        .await
        .expect("ticket");
    assert_eq!(ticket.status(), 201);

    // A backup into a folder of the operator's, under umask 000 too.
    let backups = root.join("backups");
    std::fs::create_dir_all(&backups).expect("backups");
    let backup = backups.join("agent-copy.db");
    let out = with_umask_000(&workspace_binary("meridian-agent"))
        .arg("backup")
        .arg(&backup)
        .env("MERIDIAN_AGENT_DATA_DIR", &agent_dir)
        .output()
        .await
        .expect("meridian-agent backup");
    assert!(out.status.success(), "backup: {}", String::from_utf8_lossy(&out.stderr));
    let mode = std::fs::metadata(&backup).expect("backup").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the backup");

    // While both run (SQLite keeps -wal and -shm while the database is open).
    assert_private(
        &root.join("controller"),
        &["state", "controller.db", "controller.db-wal", "controller.db-shm", "bootstrap-token"],
    );
    assert_private(
        &root.join("agent"),
        &["state", "agent.db", "agent.db-wal", "agent.db-shm", "ready.json"],
    );
    let ready_mode = std::fs::metadata(&controller_ready).expect("ready").permissions().mode();
    assert_eq!(ready_mode & 0o777, 0o600, "the controller's ready file");
}
