//! `meridian-agent`: runs a branch agent, prints its default configuration, or backs up its
//! store while it runs.
//!
//! Only this executable can upgrade itself (it hands `meridian_agent::run_upgradable` its
//! `Upgrader`): at start it may exec the current release installed under
//! `data_dir/upgrade/current`, and after a switch it stays as the new binary's watchdog (see
//! `meridian_agent::upgrade::switch`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use meridian_agent::Settings;
use meridian_agent::upgrade::{self, Boot, Exit, UpgradeDir, Upgrader, Watchdog, WatchdogEnd};

#[derive(Parser)]
#[command(name = "meridian-agent", version = meridian_agent::VERSION, about = "Meridian branch agent")]
struct Cli {
    /// TOML settings file (environment variables MERIDIAN_AGENT_* override it).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Print the default settings as TOML.
    PrintConfig,
    /// Write a consistent copy of the agent's database (data_dir/agent.db) to DESTINATION,
    /// mode 0600, while the agent runs; an existing file is never overwritten.
    Backup {
        /// The file to create.
        destination: PathBuf,
    },
}

/// How long the agent's tasks get to end when its runtime is dropped (before a watchdog takes
/// over the process).
const RUNTIME_GRACE: Duration = Duration::from_secs(5);

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::PrintConfig) = cli.command {
        print!("{}", toml::to_string_pretty(&Settings::default())?);
        return Ok(());
    }
    let settings = Settings::load(cli.config.as_deref())?;
    if let Some(Command::Backup { destination }) = &cli.command {
        let source = settings.data_dir.join(meridian_agent::store::DB_FILE);
        let report = meridian_agent::backup::backup(&source, destination)
            .with_context(|| format!("backing up {}", source.display()))?;
        println!("{report}");
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&settings.log))
        .init();
    let upgrader = Upgrader::for_this_process().context("cannot find this executable")?;
    let dir = UpgradeDir::new(&settings.data_dir);
    let limits = upgrade::WatchdogLimits::new(settings.upgrade_max_crashes);
    match upgrade::boot(&dir, &upgrader, limits).context("reading the upgrade state")? {
        Boot::Run => {}
        Boot::Exec(cmd) => return Err(exec(cmd)),
        Boot::Supervise(watchdog) => return supervise(watchdog),
    }
    tracing::info!(?settings, version = meridian_agent::VERSION, "starting agent");
    let runtime = tokio::runtime::Runtime::new()?;
    let exit = runtime.block_on(async {
        let http = tokio::net::TcpListener::bind(&settings.http_listen).await?;
        let shutdown = meridian_shared::shutdown::on_signal();
        anyhow::Ok(meridian_agent::run_upgradable(settings, http, shutdown, upgrader).await?)
    });
    // Every task of the agent ends with its runtime (live connections included), so a
    // watchdog that follows holds nothing of it.
    runtime.shutdown_timeout(RUNTIME_GRACE);
    match exit? {
        Exit::Stopped => Ok(()),
        Exit::Supervise(watchdog) => supervise(watchdog),
        Exit::Restart(cmd) => Err(exec(cmd)),
    }
}

/// Becomes the thin parent of the new binary; exits with its code, or execs the previous
/// binary after a rollback.
fn supervise(watchdog: Watchdog) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let end = runtime.block_on(async {
        let signals = upgrade::forward_signals()?;
        watchdog.supervise(signals).await
    });
    drop(runtime);
    match end.context("supervising the new binary")? {
        WatchdogEnd::Exited(code) => std::process::exit(code),
        WatchdogEnd::RolledBack(cmd) => Err(exec(cmd)),
    }
}

/// Replaces this process with `cmd`; returns only if that failed.
fn exec(mut cmd: std::process::Command) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    tracing::info!(program = ?cmd.get_program(), "restarting on another binary");
    let e = cmd.exec();
    anyhow::anyhow!("cannot exec {:?}: {e}", cmd.get_program())
}
