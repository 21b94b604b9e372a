//! The switch to a new binary, the watchdog that supervises it, and the rollback.
//!
//! The chain of processes, for an agent running release A that switches to B:
//!
//! 1. A stops its services (branch server, link, tasks) and closes its store, then `install`s:
//!    its own binary becomes `previous`, `state.json` says `switching` (with the deadline),
//!    `staged` is renamed to `current` (atomic).
//! 2. A stays as a thin watchdog parent (`Watchdog::supervise`): it starts `current` with its
//!    own arguments (and `MERIDIAN_UPGRADE_SUPERVISED=<its pid>`: B asks the kernel for
//!    SIGTERM should its watchdog die, so it never runs on unwatched, holding the store and
//!    the port), forwards SIGTERM/SIGINT to it and waits. B reports `healthy` once its session is established and marks `state.json`
//!    `healthy`; from then on the watchdog only forwards signals and exits with B's code.
//! 3. If B exits before it is healthy more than `max_crashes` times, or is not healthy by the
//!    deadline, the watchdog stops it, renames `previous` back to `current`, writes
//!    `rolled_back` with the reason and execs `current` (A again), which reports it.
//!
//! At every start `boot` decides: supervise (a switch is in progress and nobody watches it),
//! exec `current` (an upgrade installed it and this is another binary: the installed one is
//! only the bootstrap), or run.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use chrono::Utc;
use meridian_shared::events::UpgradePhase;
use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::files::{self, SwitchState, UpgradeDir};

/// Set in the environment of the binary a watchdog starts, so it runs instead of supervising
/// itself. (Not `MERIDIAN_AGENT_…`: those are settings.)
pub const SUPERVISED_ENV: &str = "MERIDIAN_UPGRADE_SUPERVISED";

/// The capability to replace the running binary. Only the `meridian-agent` executable has one
/// (`for_this_process`, in its `main`); an agent run inside another program (tests, `meridian
/// dev`) has none and answers `AGENT_UPGRADE` with `failed`.
#[derive(Debug, Clone)]
pub struct Upgrader {
    exe: PathBuf,
    args: Vec<OsString>,
}

impl Upgrader {
    /// This process: its executable (`/proc/self/exe` on Linux, so the running image is found
    /// even after its file was replaced) and its arguments, replayed on every restart.
    pub fn for_this_process() -> io::Result<Upgrader> {
        let proc_exe = Path::new("/proc/self/exe");
        let exe = if proc_exe.exists() { proc_exe.to_owned() } else { std::env::current_exe()? };
        Ok(Upgrader { exe, args: std::env::args_os().skip(1).collect() })
    }

    /// An explicit executable and arguments (tests drive the switch with scripts).
    pub fn new(exe: PathBuf, args: Vec<OsString>) -> Upgrader {
        Upgrader { exe, args }
    }

    /// The running binary (copied to `previous` before a switch).
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    pub fn args(&self) -> &[OsString] {
        &self.args
    }

    /// `program` with this process's arguments.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.args(&self.args);
        c
    }
}

/// How the watchdog judges a new binary.
#[derive(Debug, Clone, Copy)]
pub struct WatchdogLimits {
    /// Exits before healthy that are tolerated; one more rolls back.
    pub max_crashes: u32,
    /// How long a stopped binary has to exit after SIGTERM before SIGKILL.
    pub kill_grace: Duration,
    /// How often `state.json` is looked at for `healthy`.
    pub poll: Duration,
}

impl WatchdogLimits {
    pub fn new(max_crashes: u32) -> Self {
        WatchdogLimits {
            max_crashes,
            kill_grace: Duration::from_secs(10),
            poll: Duration::from_millis(100),
        }
    }
}

/// What a starting `meridian-agent run` does.
#[derive(Debug)]
pub enum Boot {
    /// Run the agent in this process.
    Run,
    /// Replace this process with the current release (`exec`, same arguments).
    Exec(Command),
    /// A switch is in progress: supervise the new binary.
    Supervise(Watchdog),
}

/// A supervised agent stops (SIGTERM, a clean shutdown) when its watchdog dies, whatever
/// kills it: left running, it would hold the store and the branch port while the service
/// manager starts the agent again. `parent` is the watchdog's pid; a watchdog already gone
/// before this point is refused the same way.
fn die_with_watchdog(parent: &str) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).map_err(io::Error::from)?;
    let expected: u32 = parent.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{SUPERVISED_ENV}={parent:?} is not a pid"),
        )
    })?;
    if std::os::unix::process::parent_id() != expected {
        return Err(io::Error::other(format!(
            "the watchdog (pid {expected}) is gone; not running unsupervised"
        )));
    }
    Ok(())
}

/// Decides what a starting agent does (see the module documentation).
pub fn boot(dir: &UpgradeDir, upgrader: &Upgrader, limits: WatchdogLimits) -> io::Result<Boot> {
    if let Some(parent) = std::env::var_os(SUPERVISED_ENV) {
        die_with_watchdog(&parent.to_string_lossy())?;
        return Ok(Boot::Run);
    }
    let state = match dir.read_state() {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            tracing::error!(error = %e, "the upgrade state is unreadable; ignoring it");
            None
        }
        Err(e) => return Err(e),
    };
    if state.is_some_and(|s| s.phase == UpgradePhase::Switching) {
        return Ok(Boot::Supervise(Watchdog::new(dir.clone(), upgrader.clone(), limits)));
    }
    let current = dir.current();
    if current.exists() && !same_file(&current, upgrader.exe())? {
        return Ok(Boot::Exec(upgrader.command(&current)));
    }
    Ok(Boot::Run)
}

fn same_file(a: &Path, b: &Path) -> io::Result<bool> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (std::fs::metadata(a)?, std::fs::metadata(b)?);
        Ok(a.dev() == b.dev() && a.ino() == b.ino())
    }
    #[cfg(not(unix))]
    Ok(std::fs::canonicalize(a)? == std::fs::canonicalize(b)?)
}

/// A switch decided by the running agent, to install once its services are stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchPlan {
    pub rollout_id: Uuid,
    pub from_version: String,
    pub to_version: String,
    /// How long the new binary has to become healthy.
    pub health_timeout: Duration,
}

/// What the agent process does after `run_upgradable` returns.
#[derive(Debug)]
pub enum Exit {
    /// Stopped (a signal): exit.
    Stopped,
    /// The new binary is installed: become its watchdog.
    Supervise(Watchdog),
    /// The switch could not be installed (recorded as `failed` in `state.json`): exec this
    /// binary again, which reports it.
    Restart(Command),
}

/// Installs `plan` (the agent's services are stopped and its store closed): `previous.new`
/// becomes `previous`, `state.json` says `switching`, `staged` becomes `current`. A failure
/// leaves the running binary in charge and `state.json` `failed`.
pub fn install(
    dir: &UpgradeDir,
    plan: &SwitchPlan,
    upgrader: &Upgrader,
    limits: WatchdogLimits,
) -> Exit {
    let deadline = Utc::now()
        + chrono::Duration::from_std(plan.health_timeout).unwrap_or(chrono::Duration::hours(1));
    let mut state = SwitchState {
        phase: UpgradePhase::Switching,
        rollout_id: plan.rollout_id,
        from_version: plan.from_version.clone(),
        to_version: plan.to_version.clone(),
        deadline,
        crashes: 0,
        reported: false,
        reason: None,
    };
    let installed = (|| -> io::Result<()> {
        files::rename_durably(&dir.previous_new(), &dir.previous())?;
        dir.write_state(&state)?;
        files::rename_durably(&dir.staged(), &dir.current())?;
        files::remove_if_present(&dir.staged_meta())
    })();
    match installed {
        Ok(()) => {
            tracing::info!(from = %plan.from_version, to = %plan.to_version, "switched to the new binary; supervising it");
            Exit::Supervise(Watchdog::new(dir.clone(), upgrader.clone(), limits))
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot install the new binary; staying on this one");
            state.phase = UpgradePhase::Failed;
            state.reason = Some(format!("cannot install the new binary: {e}"));
            if let Err(e) = dir.write_state(&state) {
                tracing::error!(error = %e, "cannot record the failed switch");
            }
            Exit::Restart(upgrader.command(upgrader.exe()))
        }
    }
}

/// How a supervision ended.
#[derive(Debug)]
pub enum WatchdogEnd {
    /// The supervised binary exited after it was healthy, or after a forwarded stop signal:
    /// exit with this code.
    Exited(i32),
    /// The new binary was rolled back: exec this (the previous binary, same arguments).
    RolledBack(Command),
}

/// The thin parent of a new binary until it is healthy (and a signal forwarder after).
#[derive(Debug)]
pub struct Watchdog {
    dir: UpgradeDir,
    upgrader: Upgrader,
    limits: WatchdogLimits,
}

impl Watchdog {
    pub fn new(dir: UpgradeDir, upgrader: Upgrader, limits: WatchdogLimits) -> Self {
        Watchdog { dir, upgrader, limits }
    }

    /// Supervises `current` (see the module documentation). `signals` are forwarded to it (the
    /// binary feeds SIGTERM/SIGINT in with `forward_signals`).
    pub async fn supervise(self, mut signals: mpsc::Receiver<Signal>) -> io::Result<WatchdogEnd> {
        let mut state = self.dir.read_state()?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "no state.json: nothing to supervise")
        })?;
        let mut healthy = state.phase == UpgradePhase::Healthy;
        let mut signals_open = true;
        loop {
            if !healthy && Utc::now() >= state.deadline {
                let reason = format!(
                    "{} was not healthy by its deadline {}",
                    state.to_version,
                    state.deadline.to_rfc3339()
                );
                return self.rollback(state, reason);
            }
            let mut child = match self.spawn().await {
                Ok(c) => c,
                Err(e) => {
                    state.crashes += 1;
                    self.dir.write_state(&state)?;
                    if state.crashes > self.limits.max_crashes {
                        let reason = format!("{} cannot be started: {e}", state.to_version);
                        return self.rollback(state, reason);
                    }
                    continue;
                }
            };
            let pid = child.id();
            tracing::info!(pid, version = %state.to_version, healthy, "started the new binary");
            let mut tick = tokio::time::interval(self.limits.poll);
            let mut stopping = false;
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status?,
                    sig = signals.recv(), if signals_open => match sig {
                        Some(sig) => {
                            stopping = true;
                            forward(pid, sig);
                        }
                        None => signals_open = false,
                    },
                    _ = tick.tick(), if !healthy => {
                        if self.is_healthy() {
                            healthy = true;
                            tracing::info!(version = %state.to_version, "the new binary is healthy");
                        } else if Utc::now() >= state.deadline {
                            self.terminate(&mut child).await;
                            let reason = format!(
                                "{} was not healthy within its health timeout (deadline {}); stopped",
                                state.to_version,
                                state.deadline.to_rfc3339()
                            );
                            return self.rollback(state, reason);
                        }
                    }
                }
            };
            let code = exit_code(status);
            if healthy || stopping || self.is_healthy() {
                return Ok(WatchdogEnd::Exited(code));
            }
            state.crashes += 1;
            self.dir.write_state(&state)?;
            tracing::warn!(crashes = state.crashes, status = %status, "the new binary exited before it was healthy");
            if state.crashes > self.limits.max_crashes {
                let reason = format!(
                    "{} exited ({status}) before it was healthy, {} times",
                    state.to_version, state.crashes
                );
                return self.rollback(state, reason);
            }
            // A short pause before the next start; a stop meanwhile ends the supervision.
            let pause = self.limits.poll * 2u32.saturating_pow(state.crashes.min(6));
            tokio::select! {
                _ = tokio::time::sleep(pause.min(Duration::from_secs(5))) => {}
                Some(_) = signals.recv(), if signals_open => return Ok(WatchdogEnd::Exited(code)),
            }
        }
    }

    /// Starts `current`. A file still open for writing somewhere (`ETXTBSY`: another thread of
    /// this process forking while it was written) is retried briefly, not counted as a crash.
    async fn spawn(&self) -> io::Result<tokio::process::Child> {
        let mut busy = 0;
        loop {
            match tokio::process::Command::new(self.dir.current())
                .args(self.upgrader.args())
                .env(SUPERVISED_ENV, std::process::id().to_string())
                // Supervision abandoned (a panic, the runtime dropped): never leave the new
                // binary running unwatched; the next start supervises the switch again.
                .kill_on_drop(true)
                .spawn()
            {
                Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy && busy < 50 => {
                    busy += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => return other,
            }
        }
    }

    fn is_healthy(&self) -> bool {
        matches!(self.dir.read_state(), Ok(Some(s)) if s.phase == UpgradePhase::Healthy)
    }

    /// SIGTERM, then SIGKILL after the grace period.
    async fn terminate(&self, child: &mut tokio::process::Child) {
        if let Some(pid) = child.id() {
            forward(Some(pid), Signal::SIGTERM);
        }
        if tokio::time::timeout(self.limits.kill_grace, child.wait()).await.is_err() {
            tracing::warn!("the new binary ignored SIGTERM; killing it");
            let _ = child.kill().await;
        }
    }

    /// Puts `previous` back as `current`, records `rolled_back` with `reason`, and returns the
    /// command to exec.
    fn rollback(&self, mut state: SwitchState, reason: String) -> io::Result<WatchdogEnd> {
        tracing::error!(reason = %reason, "rolling back to the previous binary");
        let current = self.dir.current();
        let target = if self.dir.previous().exists() {
            files::rename_durably(&self.dir.previous(), &current)?;
            current
        } else {
            // Nothing kept aside: the watchdog's own binary is the previous one.
            files::remove_if_present(&current)?;
            self.upgrader.exe().to_owned()
        };
        state.phase = UpgradePhase::RolledBack;
        state.reason = Some(reason);
        state.reported = false;
        self.dir.write_state(&state)?;
        Ok(WatchdogEnd::RolledBack(self.upgrader.command(&target)))
    }
}

fn forward(pid: Option<u32>, sig: Signal) {
    let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) else { return };
    if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
        tracing::warn!(error = %e, pid, signal = %sig, "cannot forward a signal to the new binary");
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return 128 + sig;
        }
    }
    status.code().unwrap_or(1)
}

/// SIGTERM and SIGINT received by this process, to hand to `Watchdog::supervise`.
pub fn forward_signals() -> io::Result<mpsc::Receiver<Signal>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let sig = tokio::select! {
                Some(()) = term.recv() => Signal::SIGTERM,
                Some(()) = int.recv() => Signal::SIGINT,
                else => return,
            };
            if tx.send(sig).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}
