//! PostgreSQL restarted in the middle of an event stream: the same exactly-once result.
//! Its own test binary, so no other test shares the restarting server.

mod support;

use std::time::Duration;

use support::*;

/// Restarts the local PostgreSQL cluster (`MERIDIAN_TEST_PG_RESTART` overrides the command).
fn restart_postgres() {
    let cmd = std::env::var("MERIDIAN_TEST_PG_RESTART").unwrap_or_else(|_| {
        let version = std::fs::read_dir("/etc/postgresql")
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .expect(
                "no local PostgreSQL cluster under /etc/postgresql; set MERIDIAN_TEST_PG_RESTART",
            );
        format!("pg_ctlcluster --skip-systemctl-redirect {version} main restart")
    });
    let status =
        std::process::Command::new("sh").arg("-c").arg(&cmd).status().expect("run restart command");
    assert!(status.success(), "`{cmd}` failed: {status}");
}

#[tokio::test]
async fn postgres_restart_mid_stream_loses_and_doubles_nothing() {
    let db = fresh_postgres_url().await;
    let root = temp_dir("meridian-e2e");
    let controller = ControllerProc::start(&root.join("controller"), &db).await;
    let admin = controller.client();
    admin.seed_site("SFO").await;
    let token = admin.enrollment_token("SFO").await;
    let proxy = FaultProxy::start(controller.gateway).await;
    let agent = AgentProc::start(&root.join("agent"), proxy.addr, &token).await;
    let s = agent
        .wait_status("agent connected", |s| {
            s["connected"] == true && s["config_revision"].as_u64() > Some(0)
        })
        .await;
    let agent_id = s["agent_id"].as_str().expect("id").to_owned();

    proxy.set(Fault::Cut);
    agent.wait_status("agent offline", |s| s["connected"] == false).await;
    agent.issue_tickets("GEN", 5_000).await;
    proxy.set(Fault::Pass);
    wait_for("the stream to start", Duration::from_secs(60), || async {
        let c = central_events(&db, &agent_id).await;
        (c.4 > 0).then_some(())
    })
    .await;
    restart_postgres();

    let s = agent
        .wait_status("agent drains after the database restart", |s| {
            s["connected"] == true && s["outbox_pending"] == 0
        })
        .await;
    let high = s["outbox_high_water"].as_i64().expect("high water");
    let c = wait_for("all visits stored", Duration::from_secs(60), || async {
        let c = central_events(&db, &agent_id).await;
        (c.4 >= 5_000).then_some(c)
    })
    .await;
    assert_eq!(c.4, 5_000, "every visit event exactly once");
    assert_eq!((c.0, c.3, c.1, c.2), (high, high, 1, high), "gapless, no duplicates");
}
