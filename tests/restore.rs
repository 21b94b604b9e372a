//! End to end: a store that comes back from a backup, on either end of the session. A real
//! controller process on PostgreSQL (dumped with `pg_dump`, restored with `pg_restore`), real
//! agent processes whose data folder is copied and put back as an operator would, and the
//! fault proxy between them. Nothing committed is lost or doubled, nothing loops, and every
//! repair is visible to an admin.

mod support;

use std::path::Path;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::*;

const DEADLINE: Duration = Duration::from_secs(90);

/// Copies the agent's store files from `from` to `to` (the agent must not be running).
fn copy_store(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("backup dir");
    for name in ["agent.db", "agent.db-wal", "agent.db-shm"] {
        let target = to.join(name);
        let _ = std::fs::remove_file(&target);
        if from.join(name).exists() {
            std::fs::copy(from.join(name), &target).expect("copy store file");
        }
    }
}

async fn stop(agent: &mut AgentProc) {
    agent.child.start_kill().expect("kill agent");
    let _ = agent.child.wait().await;
}

async fn start_again(agent: &AgentProc, proxy: &FaultProxy) -> AgentProc {
    AgentProc::spawn_with(&agent.dir, &format!("http://{}", proxy.addr), "", &[]).await
}

/// The tickets of every central VISIT_CREATED event of one agent.
async fn central_tickets(database_url: &str, agent_id: &str) -> Vec<String> {
    let pool = sqlx::PgPool::connect(database_url).await.expect("connect");
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT payload->>'ticket' FROM events WHERE agent_id = $1 AND kind = 'VISIT_CREATED' \
         ORDER BY seq",
    )
    .bind(agent_id)
    .fetch_all(&pool)
    .await
    .expect("tickets");
    pool.close().await;
    rows.into_iter().map(|(t,)| t).collect()
}

/// Waits until central holds as many visits as were issued, then checks it holds exactly
/// `issued` (each once) and that the events are gapless from 1.
async fn wait_exactly(controller: &ControllerProc, agent_id: &str, issued: &[String]) {
    let mut want = issued.to_vec();
    want.sort();
    let until = tokio::time::Instant::now() + DEADLINE;
    let mut got = loop {
        let got = central_visit_ids(&controller.database_url, agent_id).await;
        if got.len() >= want.len() || tokio::time::Instant::now() > until {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    got.sort();
    assert_eq!(got, want, "central holds exactly the visits the branch issued, once each");
    let (count, min, max, distinct, _) = central_events(&controller.database_url, agent_id).await;
    assert_eq!((count, distinct, min, max), (max, max, 1, count), "events gapless from 1");
}

async fn agent_row(admin: &AdminClient, agent_id: &str) -> Value {
    admin.agent(agent_id).await
}

#[tokio::test]
async fn an_agent_restored_from_an_old_backup_loses_doubles_and_reissues_nothing() {
    let db = fresh_postgres_url().await;
    let root = temp_dir("meridian-restore-agent");
    let controller = ControllerProc::start(&root.join("controller"), &db).await;
    let admin = controller.client();
    admin.seed_site("SFO").await;
    let (proxy, mut agent) = start_site_agent(&root.join("agent"), &controller).await;
    let agent_id = agent.status().await["agent_id"].as_str().expect("agent id").to_owned();

    // N tickets, all stored centrally, then a copy of the data folder.
    let mut issued = agent.issue_tickets("GEN", 32).await;
    wait_exactly(&controller, &agent_id, &issued).await;
    stop(&mut agent).await;
    let backup = root.join("backup");
    copy_store(&agent.dir, &backup);
    agent = start_again(&agent, &proxy).await;

    // The branch goes on: these reach central, then the PC is restored from the copy.
    issued.extend(agent.issue_tickets("GEN", 48).await);
    wait_exactly(&controller, &agent_id, &issued).await;
    stop(&mut agent).await;
    copy_store(&backup, &agent.dir);
    agent = start_again(&agent, &proxy).await;
    let s = agent
        .wait_status("the restored agent reconciles with the controller", |s| {
            s["connected"] == true && s["store_notice"]["kind"] == "agent_restored"
        })
        .await;
    assert!(
        s["outbox_high_water"].as_u64() >= Some(80),
        "numbering continues above what central holds: {s}"
    );

    // M new tickets: every one reaches central, none is dropped as a duplicate, and no
    // ticket number of the day is issued twice.
    issued.extend(agent.issue_tickets("GEN", 40).await);
    wait_exactly(&controller, &agent_id, &issued).await;
    let tickets = central_tickets(&db, &agent_id).await;
    let mut distinct = tickets.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), tickets.len(), "a ticket number was issued twice: {tickets:?}");

    // The admin sees it.
    let row = agent_row(&admin, &agent_id).await;
    assert!(
        row["incident"].as_str().is_some_and(|i| i.starts_with("restored from backup")),
        "the fleet view shows the restore: {row}"
    );
    let incidents =
        admin.ok(Method::GET, &format!("/api/v1/incidents?agent={agent_id}"), None).await;
    assert_eq!(incidents[0]["kind"], "agent_restored", "{incidents}");

    // Restored again from the same copy, and this time offline for longer than everything
    // central received since: the high-water mark overtakes central's, the lineage still tells.
    stop(&mut agent).await;
    proxy.set(Fault::Cut);
    copy_store(&backup, &agent.dir);
    agent = start_again(&agent, &proxy).await;
    issued.extend(agent.issue_tickets("GEN", 160).await);
    let offline = agent.status().await;
    assert_eq!(offline["connected"], false);
    assert!(offline["outbox_high_water"].as_u64() > Some(120), "{offline}");
    proxy.set(Fault::Pass);
    wait_exactly(&controller, &agent_id, &issued).await;
    let open =
        admin.ok(Method::GET, &format!("/api/v1/incidents?agent={agent_id}&open=true"), None).await;
    assert_eq!(open.as_array().map(Vec::len), Some(2), "two restores, two incidents: {open}");
}

/// Dumps the controller's database to `file`.
fn pg_dump(database_url: &str, file: &Path) {
    let out = std::process::Command::new("pg_dump")
        .args(["--format=custom", "--file"])
        .arg(file)
        .arg(database_url)
        .output()
        .expect("run pg_dump (installed with PostgreSQL by make test)");
    assert!(out.status.success(), "pg_dump: {}", String::from_utf8_lossy(&out.stderr));
}

/// Replaces the controller's database with the dump in `file` (the controller must be down).
async fn pg_restore(database_url: &str, file: &Path) {
    let (base, name) = database_url.rsplit_once('/').expect("database url");
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&format!("{base}/postgres"))
        .await
        .expect("connect as admin");
    for sql in [format!("DROP DATABASE {name} WITH (FORCE)"), format!("CREATE DATABASE {name}")] {
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut admin).await.expect("recreate database");
    }
    let out = std::process::Command::new("pg_restore")
        .args(["--exit-on-error", "--dbname", database_url])
        .arg(file)
        .output()
        .expect("run pg_restore");
    assert!(out.status.success(), "pg_restore: {}", String::from_utf8_lossy(&out.stderr));
}

async fn branch_get(agent: &AgentProc, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{}{path}", agent.url))
        .bearer_auth(CONNECTOR_KEY)
        .send()
        .await
        .expect("branch request")
        .json()
        .await
        .expect("json")
}

#[tokio::test]
async fn a_controller_restored_from_a_dump_skips_no_command() {
    let (zone, offset) = noon_zone();
    let db = fresh_postgres_url().await;
    let root = temp_dir("meridian-restore-controller");
    let mut controller = ControllerProc::start(&root.join("controller"), &db).await;
    let admin = controller.client();
    let mut resources = appointment_site(&zone, 4);
    resources.push(json!({"kind": "queue", "site": "SFO", "code": "general", "name": "General", "letter": "A"}));
    resources.push(json!({"kind": "service", "site": "SFO", "code": "GEN", "name": "General", "queue": "general"}));
    admin.ok(Method::POST, "/api/v1/apply", Some(json!({ "resources": resources }))).await;
    let (proxy, agent) = start_site_agent(&root.join("agent"), &controller).await;
    let agent_id = agent.status().await["agent_id"].as_str().expect("agent id").to_owned();
    let mut issued = agent.issue_tickets("GEN", 16).await;
    wait_exactly(&controller, &agent_id, &issued).await;

    // Last night's dump; then changes the branch applies, which the restore will forget.
    let dump = root.join("controller.dump");
    pg_dump(&db, &dump);
    for letter in ["C", "D"] {
        let q = format!("q{letter}");
        admin
            .ok(
                Method::POST,
                "/api/v1/apply",
                Some(json!({"resources": [
                    {"kind": "queue", "site": "SFO", "code": q, "name": q, "letter": letter}]})),
            )
            .await;
    }
    let before = agent
        .wait_status("the branch applies the changes made after the dump", |s| {
            s["config_revision"].as_u64() >= Some(3)
        })
        .await;
    let applied_revision = before["config_revision"].as_u64().expect("revision");
    issued.extend(agent.issue_tickets("GEN", 16).await);
    wait_exactly(&controller, &agent_id, &issued).await;

    // The central database comes back from the dump; admins make changes before the branch
    // is back in touch.
    proxy.set(Fault::Cut);
    controller.kill().await;
    pg_restore(&db, &dump).await;
    controller.restart().await;
    proxy.set_upstream(controller.gateway);
    let admin = controller.client();

    // A configuration change and an appointment change after the restore.
    let report = admin
        .ok(
            Method::POST,
            "/api/v1/apply",
            Some(json!({"resources": [
                {"kind": "queue", "site": "SFO", "code": "late", "name": "Late", "letter": "L"},
                {"kind": "service", "site": "SFO", "code": "LATE", "name": "Late", "queue": "late"}]})),
        )
        .await;
    assert!(
        report["revision"].as_u64() <= Some(applied_revision),
        "the restored controller numbers revisions the branch already applied: {report}"
    );
    let start = {
        let local = chrono::Utc::now() + chrono::Duration::hours(offset);
        format!("{}T15:00", local.date_naive())
    };
    let booked = admin
        .ok(
            Method::POST,
            "/api/v1/appointments",
            Some(json!({"site": "SFO", "service": "ACC", "start": start,
                        "customer_name": "Ann", "customer_contact": "+1 555 0100"})),
        )
        .await;
    let booked_id = booked["id"].as_str().expect("appointment id").to_owned();
    proxy.set(Fault::Pass);

    // The branch ends on the latest configuration with its queues intact and has the
    // appointment: no command was skipped.
    let waiting_before = branch_get(&agent, "/api/v1/visits?status=waiting").await;
    let late = wait_for("the new service at the branch", DEADLINE, || async {
        let resp = reqwest::Client::new()
            .post(format!("{}/api/v1/visits", agent.url))
            .bearer_auth(CONNECTOR_KEY)
            .json(&json!({"service": "LATE"}))
            .send()
            .await
            .ok()?;
        if resp.status() != 201 {
            return None;
        }
        let v: Value = resp.json().await.ok()?;
        Some(v["id"].as_str()?.to_owned())
    })
    .await;
    issued.push(late);
    wait_for("the appointment booked after the restore at the branch", DEADLINE, || async {
        branch_get(&agent, "/api/v1/appointments")
            .await
            .as_array()?
            .iter()
            .any(|a| a["id"] == booked_id.as_str())
            .then_some(())
    })
    .await;
    let waiting = branch_get(&agent, "/api/v1/visits?status=waiting").await;
    assert_eq!(
        waiting.as_array().map(Vec::len),
        waiting_before.as_array().map(|w| w.len() + 1),
        "the configuration change emptied no queue"
    );
    let row = wait_for("a true fleet view", DEADLINE, || async {
        let row = admin.agent(&agent_id).await;
        (row["config_current"] == true && row["connected"] == true).then_some(row)
    })
    .await;
    assert!(row["config_revision"].as_u64() > Some(applied_revision), "{row}");
    let incidents =
        admin.ok(Method::GET, &format!("/api/v1/incidents?agent={agent_id}"), None).await;
    let kinds: Vec<&str> =
        incidents.as_array().expect("list").iter().filter_map(|i| i["kind"].as_str()).collect();
    assert!(kinds.contains(&"controller_restored"), "{incidents}");

    // Events: what was issued before and after the dump is central exactly once.
    let status = agent.status().await;
    assert_eq!(status["store_notice"]["kind"], "controller_restored", "{status}");
    issued.extend(agent.issue_tickets("GEN", 8).await);
    wait_exactly(&controller, &agent_id, &issued).await;
}

#[tokio::test]
async fn a_dump_older_than_the_branch_retention_records_a_gap_and_never_loops() {
    let db = fresh_postgres_url().await;
    let root = temp_dir("meridian-restore-gap");
    let mut controller = ControllerProc::start(&root.join("controller"), &db).await;
    let admin = controller.client();
    admin.seed_site("CHI").await;
    let token = admin.enrollment_token("CHI").await;
    let proxy = FaultProxy::start(controller.gateway).await;
    // Acknowledged events are pruned at once: anything the controller forgets is gone.
    let agent = AgentProc::spawn_with(
        &root.join("agent"),
        &format!("http://{}", proxy.addr),
        &token,
        &[("MERIDIAN_AGENT_LOCAL_RETENTION_S", "0".into())],
    )
    .await;
    agent.wait_status("connected", |s| s["connected"] == true).await;
    let agent_id = agent.status().await["agent_id"].as_str().expect("agent id").to_owned();
    let before_dump = agent.issue_tickets("GEN", 16).await;
    wait_exactly(&controller, &agent_id, &before_dump).await;

    let dump = root.join("controller.dump");
    pg_dump(&db, &dump);
    let lost = agent.issue_tickets("GEN", 32).await;
    let mut all = before_dump.clone();
    all.extend(lost.iter().cloned());
    wait_exactly(&controller, &agent_id, &all).await;
    agent.wait_status("everything acknowledged", |s| s["outbox_pending"] == 0).await;

    controller.kill().await;
    pg_restore(&db, &dump).await;
    controller.restart().await;
    proxy.set_upstream(controller.gateway);
    let admin = controller.client();

    // New tickets flow; the gap is recorded, shown, and stays until acknowledged.
    let after = agent.issue_tickets("GEN", 16).await;
    let gap = wait_for("the gap recorded", DEADLINE, || async {
        let open = admin.ok(Method::GET, "/api/v1/incidents?open=true", None).await;
        open.as_array()?.iter().find(|i| i["kind"] == "event_gap").cloned()
    })
    .await;
    wait_for("the tickets issued after the restore stored centrally", DEADLINE, || async {
        let ids = central_visit_ids(&db, &agent_id).await;
        after.iter().all(|id| ids.contains(id)).then_some(())
    })
    .await;
    let ids = central_visit_ids(&db, &agent_id).await;
    let mut expected: Vec<String> = before_dump.iter().chain(after.iter()).cloned().collect();
    expected.sort();
    let mut got = ids.clone();
    got.sort();
    assert_eq!(got, expected, "before the dump and after the restore: each once, nothing else");
    let (first, last) = (gap["gap"]["first"].as_u64(), gap["gap"]["last"].as_u64());
    let (count, _, max, distinct, _) = central_events(&db, &agent_id).await;
    assert_eq!(count, distinct, "no event stored twice");
    let gap_len = last.zip(first).map(|(l, f)| l - f + 1).expect("gap bounds");
    assert_eq!(count as u64 + gap_len, max as u64, "every sequence is stored or in the gap");
    let row = admin.agent(&agent_id).await;
    assert!(row["incident"].as_str().is_some_and(|i| i.starts_with("gap of")), "{row}");

    // No loop: the session that found the gap carries on (one session since the restart).
    let metrics = reqwest::Client::new()
        .get(format!("{}/metrics", controller.api))
        .bearer_auth(&controller.token)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let opened: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("meridian_controller_sessions_opened_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("sessions_opened metric");
    assert!(opened <= 2.0, "sessions were reopened {opened} times: a loop");

    let id = gap["id"].as_str().expect("incident id");
    admin.ok(Method::POST, &format!("/api/v1/incidents/{id}/acknowledge"), None).await;
    let (status, _) =
        admin.call(Method::POST, &format!("/api/v1/incidents/{id}/acknowledge"), None).await;
    assert_eq!(status, 409, "acknowledged once");
    let row = admin.agent(&agent_id).await;
    assert_eq!(row["open_incidents"], 1, "the controller-restored notice stays open: {row}");
}

/// One fault of the campaign.
#[derive(Debug, Clone, Copy)]
enum CampaignFault {
    /// Cut the link, issue tickets offline, heal.
    Outage(usize),
    /// Kill the agent and start it again.
    KillAgent,
    /// Kill the controller and start it again.
    KillController,
    /// Copy the agent's data folder, issue tickets (stored centrally), put the copy back.
    RestoreAgent(usize),
    /// Dump the controller's database, issue tickets (stored centrally and acknowledged),
    /// restore the dump.
    RestoreController(usize),
}

#[tokio::test]
async fn a_randomized_campaign_with_backups_and_restores_of_either_side_loses_and_doubles_nothing()
{
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("MERIDIAN_CAMPAIGN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("restore campaign seed {seed} (MERIDIAN_CAMPAIGN_SEED reruns it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let db = fresh_postgres_url().await;
    let root = temp_dir("meridian-restore-campaign");
    let mut controller = ControllerProc::start(&root.join("controller"), &db).await;
    controller.client().seed_site("SFO").await;
    let (proxy, mut agent) = start_site_agent(&root.join("agent"), &controller).await;
    let agent_id = agent.status().await["agent_id"].as_str().expect("agent id").to_owned();
    let mut issued = agent.issue_tickets("GEN", 16).await;
    for round in 0..8 {
        let n = rng.random_range(16..64);
        let fault = match rng.random_range(0..5) {
            0 => CampaignFault::Outage(n),
            1 => CampaignFault::KillAgent,
            2 => CampaignFault::KillController,
            3 => CampaignFault::RestoreAgent(n),
            _ => CampaignFault::RestoreController(n),
        };
        eprintln!("round {round}: {fault:?}");
        match fault {
            CampaignFault::Outage(n) => {
                proxy.set(Fault::Cut);
                issued.extend(agent.issue_tickets("GEN", n).await);
                proxy.set(Fault::Pass);
            }
            CampaignFault::KillAgent => {
                stop(&mut agent).await;
                agent = start_again(&agent, &proxy).await;
            }
            CampaignFault::KillController => {
                controller.restart().await;
                proxy.set_upstream(controller.gateway);
            }
            CampaignFault::RestoreAgent(n) => {
                stop(&mut agent).await;
                let backup = root.join(format!("backup-{round}"));
                copy_store(&agent.dir, &backup);
                agent = start_again(&agent, &proxy).await;
                issued.extend(agent.issue_tickets("GEN", n).await);
                wait_exactly(&controller, &agent_id, &issued).await;
                stop(&mut agent).await;
                copy_store(&backup, &agent.dir);
                agent = start_again(&agent, &proxy).await;
            }
            CampaignFault::RestoreController(n) => {
                wait_exactly(&controller, &agent_id, &issued).await;
                let dump = root.join(format!("dump-{round}"));
                pg_dump(&db, &dump);
                issued.extend(agent.issue_tickets("GEN", n).await);
                wait_exactly(&controller, &agent_id, &issued).await;
                controller.kill().await;
                pg_restore(&db, &dump).await;
                controller.restart().await;
                proxy.set_upstream(controller.gateway);
            }
        }
        issued.extend(agent.issue_tickets("GEN", rng.random_range(1..16)).await);
    }
    wait_exactly(&controller, &agent_id, &issued).await;
    agent
        .wait_status("the agent caught up", |s| s["connected"] == true && s["outbox_pending"] == 0)
        .await;
}
