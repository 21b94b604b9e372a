//! Central statistics. `facts` turns the raw event stream into one row per visit; a projector
//! (see `Store::project_facts`) applies it per agent after a durable cursor, in the same
//! transaction as the facts, so every event counts exactly once and a rebuild from the raw
//! events (cursor reset) reproduces the same facts.

pub mod facts;
pub mod report;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// Events projected per transaction.
const PROJECT_BATCH: u32 = 1_000;

/// Keeps visit facts up to date: every `every`, projects each agent's new events until caught
/// up. Replicas may run it side by side — each agent's cursor row serializes them.
pub async fn run_projector(store: Arc<dyn Store>, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let agents = match store.list_agents().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "statistics projector cannot list agents; retrying");
                continue;
            }
        };
        for agent in agents {
            loop {
                if shutdown.is_cancelled() {
                    return;
                }
                match store.project_facts(agent.id, PROJECT_BATCH).await {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(agent = %agent.id, error = %e, "statistics projection failed; retrying");
                        break;
                    }
                }
            }
        }
    }
}
