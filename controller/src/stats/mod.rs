//! Central statistics. `facts` turns the raw event stream into rows per visit, per visit
//! transaction and per session; the projector (`StatsStore::project_facts`) applies it per agent
//! after a durable cursor, in the same transaction as the facts, so every event counts exactly
//! once and a rebuild from the raw events (cursor reset) reproduces the same facts. Every
//! site-day a projection touches is marked; `refresh_rollups` recomputes its daily and monthly
//! rollups from the facts, so rollups always equal a recomputation, also after a late backfill.
//! `report` turns facts or rollups into the rows the API, the CLI and the console show.

pub mod facts;
pub mod hist;
pub mod live;
pub mod query;
pub mod report;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// Events projected per transaction.
const PROJECT_BATCH: u32 = 2_000;
/// Agents projected concurrently.
const PROJECT_PARALLEL: usize = 4;
/// Site-days recomputed per pass.
const REFRESH_BATCH: u32 = 100;

/// The time zone of every configured site, for local-time intervals.
pub async fn zones(store: &dyn Store) -> crate::error::Result<facts::Zones> {
    let (_, resources) = store.load_config().await?;
    Ok(resources
        .iter()
        .filter_map(|r| match r {
            meridian_shared::config::Resource::Site(s) => {
                s.tz().ok().map(|tz| (s.code.to_string(), tz))
            }
            _ => None,
        })
        .collect())
}

/// Projects every agent's new events until caught up, then recomputes the marked rollups.
/// Returns how much work it did (0: everything was current).
pub async fn catch_up(
    store: &dyn Store,
    shutdown: &CancellationToken,
) -> crate::error::Result<usize> {
    let zones = zones(store).await?;
    let mut work = 0;
    let started = std::time::Instant::now();
    // Agents are independent (each has its own cursor): project a few at a time, so the
    // database and this process work in parallel.
    let agents = store.list_agents().await?;
    let zones = &zones;
    let mut runs = futures::stream::iter(agents)
        .map(|agent| async move {
            let mut done = 0;
            while !shutdown.is_cancelled() {
                match store.project_facts(agent.id, PROJECT_BATCH, zones).await? {
                    0 => break,
                    n => done += n,
                }
            }
            Ok::<usize, crate::error::Error>(done)
        })
        .buffer_unordered(PROJECT_PARALLEL);
    while let Some(done) = runs.next().await {
        work += done?;
    }
    drop(runs);
    let projected = started.elapsed();
    let events = work;
    loop {
        if shutdown.is_cancelled() {
            return Ok(work);
        }
        match store.refresh_rollups(REFRESH_BATCH).await? {
            0 => break,
            n => work += n,
        }
    }
    if work > 0 {
        tracing::debug!(
            events,
            projected_ms = projected.as_millis() as u64,
            site_days = work - events,
            refreshed_ms = (started.elapsed() - projected).as_millis() as u64,
            "statistics caught up"
        );
    }
    Ok(work)
}

/// Keeps facts and rollups up to date: every `every`, catches up. Replicas may run it side by
/// side — each agent's cursor row and each site's rollup lock serialize them.
pub async fn run_projector(store: Arc<dyn Store>, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = catch_up(store.as_ref(), &shutdown).await {
            tracing::warn!(error = %e, "statistics projection failed; retrying");
        }
    }
}
