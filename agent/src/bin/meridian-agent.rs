//! `meridian-agent`: runs a branch agent, or prints its default configuration.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use meridian_agent::Settings;

#[derive(Parser)]
#[command(name = "meridian-agent", version, about = "Meridian branch agent")]
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::PrintConfig) = cli.command {
        print!("{}", toml::to_string_pretty(&Settings::default())?);
        return Ok(());
    }
    let settings = Settings::load(cli.config.as_deref())?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&settings.log))
        .init();
    tracing::info!(?settings, "starting agent");
    let http = tokio::net::TcpListener::bind(&settings.http_listen).await?;
    let shutdown = meridian_shared::shutdown::on_signal();
    meridian_agent::run(settings, http, shutdown).await?;
    Ok(())
}
