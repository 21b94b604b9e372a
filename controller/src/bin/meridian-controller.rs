//! `meridian-controller`: runs the controller, or prints its default configuration.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use meridian_controller::{Settings, server};

#[derive(Parser)]
#[command(name = "meridian-controller", version, about = "Meridian controller")]
struct Cli {
    /// TOML settings file (environment variables MERIDIAN_CONTROLLER_* override it).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (the default).
    Run,
    /// Print the default settings as TOML.
    PrintConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::PrintConfig) = cli.command {
        print!("{}", toml_defaults()?);
        return Ok(());
    }
    let settings = Settings::load(cli.config.as_deref())?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&settings.log))
        .init();
    tracing::info!(?settings, "starting controller");
    let listeners = server::Listeners::bind(&settings).await?;
    let shutdown = meridian_shared::shutdown::on_signal();
    server::run(settings, listeners, shutdown).await?;
    Ok(())
}

fn toml_defaults() -> anyhow::Result<String> {
    Ok(toml::to_string_pretty(&Settings::default())?)
}
