//! The whole chain with the real `meridian-agent` executable as the running release: a
//! scripted gateway orders an upgrade over the session and serves the artifact through
//! `FetchRelease`; the agent downloads, verifies, stages, reports, stops, installs the new
//! binary (a shell script here) and stays as its watchdog — which forwards SIGTERM and takes
//! the new binary's exit code once it is healthy, or rolls back and execs the previous binary
//! (the real agent again, same process), which reconnects and reports `rolled_back`.

mod upgrade_support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use meridian_agent::store::queries::{self, Identity};
use meridian_agent::upgrade::{SwitchState, UpgradeDir};
use meridian_agent::{Context, Settings};
use meridian_shared::clock::SystemClock;
use meridian_shared::commands::{ControllerCommand, UpgradeCommand};
use meridian_shared::events::UpgradePhase;
use meridian_shared::releases;
use upgrade_support::gateway::Gateway;
use upgrade_support::{Signer, temp_dir, wait_until};
use uuid::Uuid;

const AGENT: &str = env!("CARGO_BIN_EXE_meridian-agent");

/// An enrolled agent's data directory and settings file, pointed at `controller`.
async fn agent_home(what: &str, controller: &str, signer: &Signer) -> (PathBuf, PathBuf) {
    let data = temp_dir(what);
    let settings = Settings { data_dir: data.clone(), ..Settings::default() };
    let ctx = Context::open(&settings, Arc::new(SystemClock)).await.expect("open");
    ctx.db
        .write(|c| {
            queries::save_identity(
                c,
                &Identity { agent_id: "a1".into(), site: "SFO".into(), credential: "a1.s".into() },
            )
        })
        .await
        .expect("identity");
    ctx.db.close().await;
    let config = data.join("agent.toml");
    let toml = format!(
        "controller_url = \"{controller}\"\n\
         data_dir = \"{}\"\n\
         http_listen = \"127.0.0.1:0\"\n\
         heartbeat_ms = 200\n\
         backoff_base_ms = 10\n\
         backoff_cap_ms = 200\n\
         release_keys = [\"{}\"]\n\
         upgrade_health_timeout_ms = 20000\n\
         upgrade_max_crashes = 1\n\
         log = \"info\"\n",
        data.display(),
        signer.public()
    );
    std::fs::write(&config, toml).expect("settings");
    (data, config)
}

fn spawn_agent(data: &Path, config: &Path) -> tokio::process::Child {
    let log = std::fs::File::create(data.join("agent.log")).expect("log");
    tokio::process::Command::new(AGENT)
        .arg("--config")
        .arg(config)
        .arg("run")
        .stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log))
        // Ours to end if the test fails half-way.
        .kill_on_drop(true)
        .spawn()
        .expect("start the agent")
}

fn state(data: &Path) -> Option<SwitchState> {
    UpgradeDir::new(data).read_state().ok().flatten()
}

/// Orders the upgrade to `artifact` (served by the gateway) as command 1.
async fn order(gateway: &Gateway, signer: &Signer, artifact: &[u8]) -> Uuid {
    gateway.state().artifact = artifact.to_vec();
    let rollout = Uuid::now_v7();
    let release = signer.sign("99.0.0", &releases::current_platform(), artifact);
    let cmd = ControllerCommand::Upgrade(Box::new(UpgradeCommand {
        rollout_id: rollout,
        release,
        allow_downgrade: false,
        switch_before: Utc::now() + chrono::Duration::hours(1),
        health_timeout_s: 0,
    }));
    gateway.command(1, &cmd).await;
    rollout
}

fn log_of(data: &Path) -> String {
    std::fs::read_to_string(data.join("agent.log")).unwrap_or_default()
}

async fn exit_of(child: &mut tokio::process::Child, data: &Path) -> i32 {
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap_or_else(|_| panic!("the agent did not stop; its log:\n{}", log_of(data)))
        .expect("wait");
    status.code().unwrap_or(-1)
}

fn terminate(child: &tokio::process::Child) {
    let pid = child.id().and_then(|p| i32::try_from(p).ok()).expect("running");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM");
}

#[tokio::test]
async fn the_agent_switches_to_a_healthy_binary_and_stays_its_watchdog() {
    let gateway = Gateway::default();
    let url = gateway.start().await;
    let signer = Signer::new();
    let (data, config) = agent_home("process-good", &url, &signer).await;
    let st = UpgradeDir::new(&data).state();
    // The new "agent": marks itself healthy, then serves until SIGTERM (at most a minute).
    let artifact = format!(
        "#!/bin/sh\n\
         sed 's/\"phase\":\"switching\"/\"phase\":\"healthy\"/' {st} > {st}.new && mv {st}.new {st}\n\
         trap 'echo TERM > {got}; exit 7' TERM\n\
         i=0; while [ $i -lt 3000 ]; do sleep 0.02; i=$((i+1)); done\n",
        st = st.display(),
        got = data.join("got-term").display(),
    );
    let mut agent = spawn_agent(&data, &config);
    wait_until("the agent's session", 30, || gateway.connected().then_some(())).await;
    let rollout = order(&gateway, &signer, artifact.as_bytes()).await;
    wait_until("the switch to be healthy", 60, || {
        state(&data).filter(|s| s.phase == UpgradePhase::Healthy)
    })
    .await;
    assert_eq!(gateway.phases(), ["downloading", "staged", "switching"], "{}", log_of(&data));
    let statuses = gateway.events("AGENT_UPGRADE_STATUS");
    assert!(statuses.iter().all(|s| s["rollout_id"] == rollout.to_string()));
    assert_eq!(gateway.state().fetches, [0]);
    let dir = UpgradeDir::new(&data);
    assert_eq!(
        std::fs::read(dir.previous()).expect("previous"),
        std::fs::read(AGENT).expect("agent binary"),
        "the running binary is kept as previous"
    );
    assert_eq!(std::fs::read_to_string(dir.current()).expect("current"), artifact);

    // SIGTERM reaches the new binary through the watchdog, whose exit code is the child's.
    terminate(&agent);
    assert_eq!(exit_of(&mut agent, &data).await, 7, "{}", log_of(&data));
    assert!(data.join("got-term").exists());
}

#[tokio::test]
async fn a_binary_that_crashes_is_rolled_back_and_the_previous_agent_reports_it() {
    let gateway = Gateway::default();
    let url = gateway.start().await;
    let signer = Signer::new();
    let (data, config) = agent_home("process-crash", &url, &signer).await;
    let runs = data.join("runs");
    let artifact = format!("#!/bin/sh\necho run >> {}\nexit 3\n", runs.display());
    let mut agent = spawn_agent(&data, &config);
    let pid = agent.id();
    wait_until("the agent's session", 30, || gateway.connected().then_some(())).await;
    let rollout = order(&gateway, &signer, artifact.as_bytes()).await;
    wait_until("the rollback to be reported", 60, || {
        gateway.phases().contains(&"rolled_back".to_owned()).then_some(())
    })
    .await;
    assert_eq!(
        gateway.phases(),
        ["downloading", "staged", "switching", "rolled_back"],
        "{}",
        log_of(&data)
    );
    let rolled_back = gateway.events("AGENT_UPGRADE_STATUS").pop().expect("status");
    assert_eq!(rolled_back["rollout_id"], rollout.to_string());
    assert_eq!(rolled_back["version"], "99.0.0");
    assert_eq!(rolled_back["running_version"], meridian_agent::VERSION);
    let reason = rolled_back["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("2 times"), "{reason}");
    assert_eq!(std::fs::read_to_string(&runs).expect("runs").lines().count(), 2);
    // The previous agent runs again in the same process and reconnected.
    assert_eq!(agent.id(), pid);
    let hellos = gateway.state().hellos.clone();
    assert!(hellos.len() >= 2 && hellos.iter().all(|v| v == meridian_agent::VERSION), "{hellos:?}");
    let dir = UpgradeDir::new(&data);
    assert_eq!(
        std::fs::read(dir.current()).expect("current"),
        std::fs::read(AGENT).expect("agent binary"),
        "the previous binary is current again"
    );
    let st = state(&data).expect("state");
    assert_eq!((st.phase, st.reported), (UpgradePhase::RolledBack, true));

    terminate(&agent);
    assert_eq!(exit_of(&mut agent, &data).await, 0, "{}", log_of(&data));
    // Nothing in the agent's database was lost across the switch and the rollback.
    let settings = Settings { data_dir: data.clone(), ..Settings::default() };
    let ctx = Context::open(&settings, Arc::new(SystemClock)).await.expect("reopen");
    let identity = ctx.db.read(queries::identity).await.expect("read");
    assert_eq!(identity.map(|i| i.agent_id), Some("a1".into()));
    let applied = ctx.db.read(queries::last_applied_command).await.expect("read");
    assert_eq!(applied, 1);
}
