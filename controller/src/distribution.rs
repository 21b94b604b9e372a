//! Distributed requests at the controller: the ledger's background work. The
//! decisions themselves are made in the store (`store::requests`), in the transactions that
//! ingest the sites' events; this loop moves staged commands into the agents' logs (should a
//! session not have done it right after its ingest), times out operations whose pool's time
//! is up, resends those the target refused for now once their backoff has passed, re-sends
//! operations stranded on a replaced agent, and sends the hourly and daily copy updates.
//! After each tick it refreshes the ledger's metrics: the backlog per lane (pool × target)
//! every tick, and the count of operations that ended failed, by result, from a look at the
//! newest failed operations every `FAILED_SCAN_EVERY` (`FailedWatch`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_shared::clock::Clock;
use meridian_shared::config::ConfigSet;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::store::requests::{LedgerOp, OpsFilter, PoolTimeouts, SweepReport};

/// How often the newest failed operations are read to count new failures.
pub const FAILED_SCAN_EVERY: Duration = Duration::from_secs(15);
/// How many of the newest failed operations (by creation) each look reads. A failure is
/// missed only when more than this many operations created after it also failed.
pub const FAILED_SCAN_LIMIT: u32 = 500;

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

/// Counts operations that newly ended failed, between looks at the ledger's newest failed
/// operations. The first look only learns what has already failed (the counter counts
/// failures since start-up); an operation retried and failing again counts again (its
/// attempt differs).
#[derive(Debug, Default)]
pub struct FailedWatch {
    seen: Option<HashSet<(uuid::Uuid, String, u32)>>,
}

impl FailedWatch {
    /// The newly failed operations among `failed`, per result.
    pub fn observe(&mut self, failed: &[LedgerOp]) -> BTreeMap<String, u64> {
        let now: HashSet<_> =
            failed.iter().map(|o| (o.op_id, o.target_site.clone(), o.attempt)).collect();
        let mut new = BTreeMap::new();
        if let Some(seen) = &self.seen {
            for op in failed.iter().filter(|o| {
                o.status == "failed" && !seen.contains(&(o.op_id, o.target_site.clone(), o.attempt))
            }) {
                *new.entry(op.result.clone().unwrap_or_else(|| "failure".into())).or_default() += 1;
            }
        }
        self.seen = Some(now);
        new
    }
}

/// Refreshes the ledger's metrics: the backlog always, new failures when `scan_failures`.
pub async fn refresh_metrics(
    store: &dyn Store,
    metrics: &Metrics,
    watch: &mut FailedWatch,
    now: chrono::DateTime<chrono::Utc>,
    scan_failures: bool,
) -> Result<()> {
    metrics.set_request_backlog(&store.request_backlog(now).await?);
    if scan_failures {
        let filter = OpsFilter {
            status: Some("failed".into()),
            limit: FAILED_SCAN_LIMIT,
            ..OpsFilter::default()
        };
        for (result, n) in watch.observe(&store.list_request_ops(&filter).await?) {
            metrics.count_request_ops_failed(&result, n);
        }
    }
    Ok(())
}

/// Runs `tick` every `every` until `shutdown`, waking the sessions when commands were added,
/// and refreshes the ledger's metrics after each tick.
pub async fn run_ledger(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    every: Duration,
    wake: Arc<tokio::sync::watch::Sender<u64>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let cache = crate::appointments::sync::ConfigCache::default();
    let mut failed = FailedWatch::default();
    let mut last_scan: Option<Instant> = None;
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
        let scan = last_scan.is_none_or(|t| t.elapsed() >= FAILED_SCAN_EVERY);
        match refresh_metrics(store.as_ref(), &metrics, &mut failed, clock.now(), scan).await {
            Ok(()) if scan => last_scan = Some(Instant::now()),
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "request ledger metrics not refreshed"),
        }
    }
}
