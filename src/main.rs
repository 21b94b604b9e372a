//! `meridian`: the one binary a newcomer runs. `meridian dev` starts a controller on the embedded
//! store plus three demo branch agents; `meridian controller` and `meridian agent` run one
//! component (the same code as `meridian-controller` and `meridian-agent`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod dev;

#[derive(Parser)]
#[command(name = "meridian", version, about = "Meridian: branch operations that never stop")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A controller on the embedded store and three demo agents (SFO, CHI, TYO).
    Dev(dev::DevArgs),
    /// Run a controller.
    Controller {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run a branch agent.
    Agent {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn init_logs(filter: &str) {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new(filter)).init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Dev(args) => {
            init_logs(&std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
            dev::run(args, meridian_shared::shutdown::on_signal()).await
        }
        Command::Controller { config } => {
            let settings = meridian_controller::Settings::load(config.as_deref())?;
            init_logs(&settings.log);
            let listeners = meridian_controller::server::Listeners::bind(&settings).await?;
            meridian_controller::server::run(
                settings,
                listeners,
                meridian_shared::shutdown::on_signal(),
            )
            .await?;
            Ok(())
        }
        Command::Agent { config } => {
            let settings = meridian_agent::Settings::load(config.as_deref())?;
            init_logs(&settings.log);
            let http = tokio::net::TcpListener::bind(&settings.http_listen).await?;
            meridian_agent::run(settings, http, meridian_shared::shutdown::on_signal()).await?;
            Ok(())
        }
    }
}
