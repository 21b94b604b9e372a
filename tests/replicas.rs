//! Two controller replicas on one PostgreSQL: a configuration change made through one replica
//! reaches an agent connected to the other at once, through LISTEN/NOTIFY — the fallback poll
//! is set to ten minutes here, so only the notification can deliver it in time.

mod support;

use reqwest::Method;
use serde_json::json;
use support::*;

#[tokio::test]
async fn a_change_on_one_replica_reaches_agents_on_another_through_notify() {
    let db = fresh_postgres_url().await;
    let root = temp_dir("meridian-replicas");
    let no_poll = [("MERIDIAN_CONTROLLER_COMMAND_POLL_MS", "600000".to_owned())];
    let a = ControllerProc::start_with(&root.join("a"), &db, &no_poll).await;
    let mut b = ControllerProc::start_with(&root.join("b"), &db, &no_poll).await;
    b.token = a.token.clone();
    let (admin_a, admin_b) = (a.client(), b.client());
    admin_a.seed_site("SFO").await;
    let token = admin_a.enrollment_token("SFO").await;
    let agent = AgentProc::start(&root.join("agent"), a.gateway, &token).await;
    let s = agent
        .wait_status("agent connected to replica A", |s| {
            s["connected"] == true && s["config_revision"].as_u64() > Some(0)
        })
        .await;
    let agent_id = s["agent_id"].as_str().expect("id").to_owned();

    let change = json!({"resources": [
        {"kind": "queue", "site": "SFO", "code": "accounts", "name": "Accounts", "letter": "B"}
    ]});
    let report = admin_b.ok(Method::POST, "/api/v1/apply", Some(change)).await;
    let revision = report["revision"].as_u64().expect("revision");
    agent
        .wait_status("the change made on replica B reaches the agent on replica A", |s| {
            s["config_revision"].as_u64() >= Some(revision)
        })
        .await;

    // Revoking through B ends the session held by A.
    admin_b.ok(Method::POST, &format!("/api/v1/agents/{agent_id}/revoke"), None).await;
    agent.wait_status("the revoked agent is disconnected", |s| s["connected"] == false).await;
}
