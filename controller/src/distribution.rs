//! Distributed requests at the controller (issue 6): the ledger's background work. The
//! decisions themselves are made in the store (`store::requests`), in the transactions that
//! ingest the sites' events; this loop moves staged commands into the agents' logs (should a
//! session not have done it right after its ingest), times out operations whose pool's time
//! is up, resends those the target refused for now once their backoff has passed, re-sends
//! operations stranded on a replaced agent, and sends the hourly and daily copy updates.

use std::sync::Arc;
use std::time::Duration;

use meridian_shared::clock::Clock;
use meridian_shared::config::ConfigSet;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::store::Store;
use crate::store::requests::{PoolTimeouts, SweepReport};

/// The pools' timeouts from the configuration (`request_pool` resources; operations without a
/// pool run in `default`, 24 hours unless a pool named `default` says otherwise).
pub fn pool_timeouts(set: &ConfigSet) -> PoolTimeouts {
    let mut timeouts = PoolTimeouts::default();
    for res in set.resources.values() {
        let Ok(v) = serde_json::to_value(res) else { continue };
        if v["kind"] != "request_pool" {
            continue;
        }
        let (Some(code), Some(minutes)) = (v["code"].as_str(), v["timeout_minutes"].as_u64())
        else {
            continue;
        };
        let minutes = u32::try_from(minutes).unwrap_or(u32::MAX);
        if code == crate::store::requests::DEFAULT_POOL {
            timeouts.default_minutes = minutes;
        }
        timeouts.by_pool.insert(code.to_owned(), minutes);
    }
    timeouts
}

/// One pass: flush, then sweep, then flush what the sweep decided.
pub async fn tick(
    store: &dyn Store,
    cache: &crate::appointments::sync::ConfigCache,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(u64, SweepReport)> {
    let mut moved = store.flush_request_commands().await?;
    let set = cache.get(store).await?;
    let report = store.sweep_request_ops(now, &pool_timeouts(&set)).await?;
    moved += store.flush_request_commands().await?;
    Ok((moved, report))
}

/// Runs `tick` every `every` until `shutdown`, waking the sessions when commands were added.
pub async fn run_ledger(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    every: Duration,
    wake: Arc<tokio::sync::watch::Sender<u64>>,
    shutdown: CancellationToken,
) {
    let cache = crate::appointments::sync::ConfigCache::default();
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        match tick(store.as_ref(), &cache, clock.now()).await {
            Ok((moved, report)) => {
                if report != SweepReport::default() {
                    tracing::info!(?report, "request ledger sweep");
                }
                if moved > 0 {
                    wake.send_modify(|n| *n = n.wrapping_add(1));
                }
            }
            Err(e) => tracing::warn!(error = %e, "request ledger sweep failed"),
        }
    }
}
