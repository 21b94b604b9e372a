//! The switch, the watchdog and the rollback with real processes: fake binaries written as
//! shell scripts play the new release (one that becomes healthy, one that exits at once, one
//! that never becomes healthy and ignores SIGTERM) and the old one.

mod upgrade_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use meridian_agent::upgrade::{
    self, Boot, Exit, SwitchPlan, SwitchState, UpgradeDir, Upgrader, WatchdogEnd, WatchdogLimits,
};
use meridian_agent::{Context, Settings};
use meridian_shared::clock::SystemClock;
use meridian_shared::events::UpgradePhase;
use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use upgrade_support::{temp_dir, wait_until, write_script};
use uuid::Uuid;

const OLD: &str = "echo 'the old binary'";
// The scripts that serve loop for at most a minute, so none outlives a failed test for long.

struct Setup {
    data: PathBuf,
    dir: UpgradeDir,
    upgrader: Upgrader,
    plan: SwitchPlan,
    /// The new binary's script.
    new: String,
}

/// A data directory where the running binary (script `OLD`) decided to switch to the script
/// `new` gives (from the data directory): the new one is staged and the old one copied aside,
/// as `upgrade::pass` leaves them.
fn setup(what: &str, new: impl FnOnce(&Path) -> String, health_timeout: Duration) -> Setup {
    let data = temp_dir(what);
    let dir = UpgradeDir::new(&data);
    dir.create().expect("upgrade dir");
    let old = data.join("installed-agent");
    write_script(&old, OLD);
    std::fs::copy(&old, dir.previous_new()).expect("previous.new");
    let new = new(&data);
    write_script(&dir.staged(), &new);
    let upgrader = Upgrader::new(old, vec!["run".into()]);
    let plan = SwitchPlan {
        rollout_id: Uuid::now_v7(),
        from_version: "1.0.0".into(),
        to_version: "2.0.0".into(),
        health_timeout,
    };
    Setup { data, dir, upgrader, plan, new }
}

fn limits(max_crashes: u32) -> WatchdogLimits {
    WatchdogLimits {
        max_crashes,
        kill_grace: Duration::from_millis(300),
        poll: Duration::from_millis(20),
    }
}

fn state(dir: &UpgradeDir) -> SwitchState {
    dir.read_state().expect("state.json").expect("a state")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn lines(path: &Path) -> usize {
    read(path).lines().count()
}

/// Installs the plan and returns the watchdog's task and its signal line.
fn switch(
    s: &Setup,
    limits: WatchdogLimits,
) -> (tokio::task::JoinHandle<std::io::Result<WatchdogEnd>>, mpsc::Sender<Signal>) {
    let watchdog = match upgrade::install(&s.dir, &s.plan, &s.upgrader, limits) {
        Exit::Supervise(w) => w,
        other => panic!("the switch was not installed: {other:?}"),
    };
    let st = state(&s.dir);
    assert_eq!(st.phase, UpgradePhase::Switching);
    assert_eq!((st.from_version.as_str(), st.to_version.as_str()), ("1.0.0", "2.0.0"));
    assert!(!s.dir.staged().exists(), "staged became current");
    let (tx, rx) = mpsc::channel(4);
    (tokio::spawn(watchdog.supervise(rx)), tx)
}

#[tokio::test]
async fn a_good_binary_becomes_healthy_gets_the_signals_and_the_previous_one_is_kept() {
    // Marks itself healthy (as the real agent does once its session is up), then serves until
    // SIGTERM and exits with 7.
    let s = setup(
        "good",
        |data| {
            format!(
                "echo \"$MERIDIAN_UPGRADE_SUPERVISED $1\" >> {runs}\n\
                 sed 's/\"phase\":\"switching\"/\"phase\":\"healthy\"/' {st} > {st}.new \
                 && mv {st}.new {st}\n\
                 trap 'echo TERM >> {got}; exit 7' TERM\n\
                 i=0; while [ $i -lt 3000 ]; do sleep 0.02; i=$((i+1)); done",
                runs = data.join("runs").display(),
                st = UpgradeDir::new(data).state().display(),
                got = data.join("signals").display(),
            )
        },
        Duration::from_secs(30),
    );
    let (runs, got) = (s.data.join("runs"), s.data.join("signals"));

    let (watchdog, signals) = switch(&s, limits(1));
    wait_until("the new binary to be healthy", 20, || {
        (state(&s.dir).phase == UpgradePhase::Healthy).then_some(())
    })
    .await;
    assert_eq!(
        read(&runs).trim(),
        format!("{} run", std::process::id()),
        "started once, supervised by this process (its pid), with the same arguments"
    );
    // After healthy the watchdog only forwards signals and takes the child's exit code.
    signals.send(Signal::SIGTERM).await.expect("signal");
    let end = tokio::time::timeout(Duration::from_secs(20), watchdog)
        .await
        .expect("the watchdog ends")
        .expect("task")
        .expect("supervise");
    assert!(matches!(end, WatchdogEnd::Exited(7)), "{end:?}");
    assert_eq!(read(&got).trim(), "TERM");
    assert_eq!(read(&s.dir.previous()), read(s.upgrader.exe()), "previous kept");
    assert_eq!(read(&s.dir.current()), format!("#!/bin/sh\n{}\n", s.new));
    assert_eq!(state(&s.dir).crashes, 0);
}

#[tokio::test]
async fn a_binary_that_exits_at_once_is_rolled_back_after_the_crash_limit() {
    let s = setup(
        "crash",
        |data| format!("echo run >> {}\nexit 3", data.join("runs").display()),
        Duration::from_secs(60),
    );
    let runs = s.data.join("runs");
    let (watchdog, _signals) = switch(&s, limits(2));
    let end = tokio::time::timeout(Duration::from_secs(30), watchdog)
        .await
        .expect("the watchdog ends")
        .expect("task")
        .expect("supervise");
    let WatchdogEnd::RolledBack(cmd) = end else { panic!("not rolled back: {end:?}") };
    assert_eq!(lines(&runs), 3, "two crashes tolerated, the third rolls back");
    assert_eq!(Path::new(cmd.get_program()), s.dir.current(), "the previous binary is exec'd");
    assert_eq!(cmd.get_args().collect::<Vec<_>>(), ["run"], "with the same arguments");
    assert_eq!(read(&s.dir.current()), format!("#!/bin/sh\n{OLD}\n"), "previous is current again");
    assert!(!s.dir.previous().exists());
    let st = state(&s.dir);
    assert_eq!((st.phase, st.crashes, st.reported), (UpgradePhase::RolledBack, 3, false));
    let reason = st.reason.expect("reason");
    assert!(reason.contains("exited") && reason.contains("3 times"), "{reason}");

    // The previous binary, exec'd, reports it once through the outbox.
    let settings = Settings { data_dir: s.data.clone(), ..Settings::default() };
    let ctx = Context::open(&settings, Arc::new(SystemClock)).await.expect("open");
    assert!(!upgrade::settle(&ctx).await.expect("settle"));
    assert!(!upgrade::settle(&ctx).await.expect("settle again"));
    let events = upgrade_events(&ctx).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["phase"], "rolled_back");
    assert_eq!(events[0]["rollout_id"], s.plan.rollout_id.to_string());
    assert_eq!(events[0]["version"], "2.0.0");
    assert_eq!(events[0]["running_version"], meridian_agent::VERSION);
    assert!(events[0]["reason"].as_str().is_some_and(|r| r.contains("3 times")));
    assert!(state(&s.dir).reported);
}

#[tokio::test]
async fn a_binary_that_never_becomes_healthy_is_stopped_and_rolled_back_at_the_deadline() {
    // Ignores SIGTERM: the watchdog must kill it after the grace period.
    let s = setup(
        "hang",
        |data| {
            format!(
                "trap '' TERM\necho $$ > {}\ni=0; while [ $i -lt 3000 ]; do sleep 0.02; i=$((i+1)); done",
                data.join("pid").display()
            )
        },
        Duration::from_millis(1500),
    );
    let pid_file = s.data.join("pid");
    let started = std::time::Instant::now();
    let (watchdog, _signals) = switch(&s, limits(3));
    let end = tokio::time::timeout(Duration::from_secs(30), watchdog)
        .await
        .expect("the watchdog ends")
        .expect("task")
        .expect("supervise");
    assert!(started.elapsed() >= Duration::from_millis(1400), "not before the deadline");
    assert!(matches!(end, WatchdogEnd::RolledBack(_)), "{end:?}");
    let pid: i32 = read(&pid_file).trim().parse().expect("the script wrote its pid");
    assert_eq!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH),
        "the hung binary was killed"
    );
    let st = state(&s.dir);
    assert_eq!(st.phase, UpgradePhase::RolledBack);
    assert_eq!(st.crashes, 0);
    assert!(st.reason.as_deref().is_some_and(|r| r.contains("not healthy")), "{st:?}");
    assert_eq!(read(&s.dir.current()), format!("#!/bin/sh\n{OLD}\n"));
}

#[tokio::test]
async fn a_stop_signal_while_switching_is_forwarded_and_not_counted_as_a_crash() {
    let s = setup(
        "stop",
        |data| {
            format!(
                "trap 'echo TERM > {}; exit 0' TERM\necho up > {}\ni=0; while [ $i -lt 3000 ]; do sleep 0.02; i=$((i+1)); done",
                data.join("term").display(),
                data.join("up").display()
            )
        },
        Duration::from_secs(60),
    );
    let flag = s.data.join("term");
    let (watchdog, signals) = switch(&s, limits(0));
    // Wait for the script to be up (its trap set) before stopping it.
    wait_until("the new binary to run", 20, || s.data.join("up").exists().then_some(())).await;
    signals.send(Signal::SIGTERM).await.expect("signal");
    let end = tokio::time::timeout(Duration::from_secs(20), watchdog)
        .await
        .expect("the watchdog ends")
        .expect("task")
        .expect("supervise");
    assert!(matches!(end, WatchdogEnd::Exited(0)), "{end:?}");
    assert_eq!(read(&flag).trim(), "TERM");
    let st = state(&s.dir);
    assert_eq!((st.phase, st.crashes), (UpgradePhase::Switching, 0), "resumed at next start");
    // The next start (no watchdog above it) supervises the unfinished switch again.
    let boot = upgrade::boot(&s.dir, &s.upgrader, limits(0)).expect("boot");
    assert!(matches!(boot, Boot::Supervise(_)), "{boot:?}");
}

#[test]
fn the_bootstrap_execs_the_current_release_and_runs_otherwise() {
    let data = temp_dir("boot");
    let dir = UpgradeDir::new(&data);
    let installed = data.join("installed-agent");
    write_script(&installed, OLD);
    let upgrader = Upgrader::new(installed.clone(), vec!["--config".into(), "agent.toml".into()]);
    // Never upgraded: run.
    assert!(matches!(upgrade::boot(&dir, &upgrader, limits(3)).expect("boot"), Boot::Run));
    // An upgrade installed `current`: the installed binary is only the bootstrap.
    dir.create().expect("dir");
    write_script(&dir.current(), "echo new");
    let state = SwitchState {
        phase: UpgradePhase::Healthy,
        rollout_id: Uuid::now_v7(),
        from_version: "1.0.0".into(),
        to_version: "2.0.0".into(),
        deadline: Utc::now(),
        crashes: 0,
        reported: true,
        reason: None,
    };
    dir.write_state(&state).expect("state");
    match upgrade::boot(&dir, &upgrader, limits(3)).expect("boot") {
        Boot::Exec(cmd) => {
            assert_eq!(Path::new(cmd.get_program()), dir.current());
            assert_eq!(cmd.get_args().collect::<Vec<_>>(), ["--config", "agent.toml"]);
        }
        other => panic!("expected an exec of current: {other:?}"),
    }
    // `current` itself runs.
    let current = Upgrader::new(dir.current(), vec![]);
    assert!(matches!(upgrade::boot(&dir, &current, limits(3)).expect("boot"), Boot::Run));
    // A switch nobody supervises (the watchdog was stopped): supervise it.
    dir.write_state(&SwitchState { phase: UpgradePhase::Switching, ..state }).expect("state");
    assert!(matches!(upgrade::boot(&dir, &upgrader, limits(3)).expect("boot"), Boot::Supervise(_)));
}

#[tokio::test]
async fn the_new_binary_reports_healthy_once_its_session_is_up() {
    let data = temp_dir("healthy");
    let settings = Settings { data_dir: data.clone(), ..Settings::default() };
    let ctx = Context::open(&settings, Arc::new(SystemClock)).await.expect("open");
    let dir = UpgradeDir::new(&data);
    dir.create().expect("dir");
    let rollout = Uuid::now_v7();
    let switching = SwitchState {
        phase: UpgradePhase::Switching,
        rollout_id: rollout,
        from_version: "0.0.1".into(),
        to_version: meridian_agent::VERSION.into(),
        deadline: Utc::now() + chrono::Duration::minutes(2),
        crashes: 1,
        reported: false,
        reason: None,
    };
    dir.write_state(&switching).expect("state");
    // Not connected yet: pending, nothing reported.
    assert!(upgrade::settle(&ctx).await.expect("settle"));
    assert!(upgrade_events(&ctx).await.is_empty());
    ctx.link.send_modify(|l| l.connected = true);
    assert!(!upgrade::settle(&ctx).await.expect("settle"));
    let events = upgrade_events(&ctx).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["phase"], "healthy");
    assert_eq!(events[0]["running_version"], meridian_agent::VERSION);
    let st = state(&dir);
    assert_eq!((st.phase, st.reported), (UpgradePhase::Healthy, true));
    assert!(!upgrade::settle(&ctx).await.expect("settle"));
    assert_eq!(upgrade_events(&ctx).await.len(), 1, "reported once");

    // A binary of another version than the switch installed never reports healthy (the
    // watchdog rolls it back at the deadline).
    dir.write_state(&SwitchState {
        to_version: "98.0.0".into(),
        rollout_id: Uuid::now_v7(),
        ..switching
    })
    .expect("state");
    assert!(upgrade::settle(&ctx).await.expect("settle"));
    assert_eq!(upgrade_events(&ctx).await.len(), 1);
    assert_eq!(state(&dir).phase, UpgradePhase::Switching);
}

/// The `AGENT_UPGRADE_STATUS` payloads in the outbox, in order.
async fn upgrade_events(ctx: &Context) -> Vec<serde_json::Value> {
    ctx.db
        .read(|c| {
            let mut stmt = c.prepare(
                "SELECT payload FROM outbox WHERE kind = 'AGENT_UPGRADE_STATUS' ORDER BY seq",
            )?;
            let rows = stmt
                .query_map([], |r| r.get::<_, Vec<u8>>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
        .expect("outbox")
        .into_iter()
        .map(|p| serde_json::from_slice(&p).expect("json"))
        .collect()
}
