//! The nightly bulk sync of appointments: when each site is due (in its own time zone,
//! daylight-saving safe), the scheduler tick that requests the syncs, the plan a fetch takes its
//! snapshot by, and the configuration cache the gateway reads that plan from.
//!
//! The schedule is durable (`appointment_sync_schedule`): a tick at `now` runs every site whose
//! stored due time has passed, once, and stores its next due time. A controller that was down
//! at a site's time runs it at its first tick after restart (once, however many days were
//! missed). An agent that is offline when its sync is requested gets the command when it
//! reconnects and fetches a snapshot taken then, so its days are the site's days at that moment.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, LocalResult, NaiveDate, NaiveTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use meridian_shared::clock::Clock;
use meridian_shared::config::{ConfigSet, Site};
use meridian_shared::{Code, SiteCode};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::store::Store;
use crate::store::appointment_sync::{SitePlan, SnapshotPlan, SyncRecord};

/// The first time after `after` at which the site-local wall clock reads `at`. A time the
/// clocks skip that day (spring forward) is read with the offset in force before the jump, so
/// it runs as long after the jump as it was after the jump's start (02:30 on a night that jumps
/// from 02:00 to 03:00 runs at 03:30); a time they pass twice (fall back) is the earlier
/// instant, so the sync runs once that day.
pub fn next_run(after: DateTime<Utc>, tz: Tz, at: NaiveTime) -> DateTime<Utc> {
    let mut day = after.with_timezone(&tz).date_naive();
    loop {
        let candidate = resolve(tz, day, at);
        if candidate > after {
            return candidate;
        }
        day = day.succ_opt().unwrap_or(day);
    }
}

/// The instant the site-local wall clock reads `at` on `day` (see `next_run`).
fn resolve(tz: Tz, day: NaiveDate, at: NaiveTime) -> DateTime<Utc> {
    let local = day.and_time(at);
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(earlier, _) => earlier.with_timezone(&Utc),
        LocalResult::None => {
            // In a gap: read the wall time with the offset in force before the jump.
            let before = local - chrono::Duration::hours(3);
            let offset = match tz.from_local_datetime(&before) {
                LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => t.offset().fix(),
                LocalResult::None => tz.offset_from_utc_datetime(&local).fix(),
            };
            Utc.from_utc_datetime(&(local - offset))
        }
    }
}

/// Whether a site takes appointments at all (one of its services has a policy).
fn books_appointments(set: &ConfigSet, site: &SiteCode) -> bool {
    set.services().any(|s| &s.site == site && s.appointments.is_some())
}

/// The sites that take appointments, each with its next due time after `now`.
pub fn plans(set: &ConfigSet, now: DateTime<Utc>) -> Vec<SitePlan> {
    set.sites()
        .filter(|site| books_appointments(set, &site.code))
        .filter_map(|site| {
            let tz = site.tz().ok()?;
            Some(SitePlan {
                site: site.code.clone(),
                next_due: next_run(now, tz, site.appointment_sync.at),
            })
        })
        .collect()
}

/// The plan a fetch of `site`'s sync takes its snapshot by at `now`.
pub fn snapshot_plan(
    set: &ConfigSet,
    site: &SiteCode,
    now: DateTime<Utc>,
    chunk_size: usize,
) -> Result<SnapshotPlan> {
    let site_cfg: &Site =
        set.site(site).ok_or_else(|| Error::NotFound(format!("site {site} is not configured")))?;
    let tz = site_cfg.tz().map_err(Error::Internal)?;
    let queues: BTreeMap<Code, Code> = set
        .services()
        .filter(|s| &s.site == site)
        .map(|s| (s.code.clone(), s.queue.clone()))
        .collect();
    Ok(SnapshotPlan {
        today: meridian_shared::business_day::business_day(tz, now),
        days_ahead: site_cfg.appointment_sync.days_ahead,
        queues,
        chunk_size: chunk_size.max(1),
        at: now,
    })
}

/// One scheduler tick at `now`: requests the syncs of every due site (once across replicas).
pub async fn tick(store: &dyn Store, now: DateTime<Utc>) -> Result<Vec<SyncRecord>> {
    let (_, resources) = store.load_config().await?;
    let set = ConfigSet::from_resources(resources);
    store.run_sync_schedule(&plans(&set, now), now).await
}

/// Ticks every `every` until `shutdown`, waking the sessions when syncs were requested.
pub async fn run_scheduler(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    every: Duration,
    wake: Arc<tokio::sync::watch::Sender<u64>>,
    shutdown: CancellationToken,
) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        match tick(store.as_ref(), clock.now()).await {
            Ok(requested) if !requested.is_empty() => {
                tracing::info!(syncs = requested.len(), "requested nightly appointment syncs");
                wake.send_modify(|n| *n = n.wrapping_add(1));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "appointment sync scheduler tick failed"),
        }
    }
}

/// The configuration as of its latest revision, reloaded only when the revision moved (one
/// cheap query per use otherwise).
#[derive(Default)]
pub struct ConfigCache(Mutex<Option<(u64, Arc<ConfigSet>)>>);

impl ConfigCache {
    pub async fn get(&self, store: &dyn Store) -> Result<Arc<ConfigSet>> {
        let revision = store.config_revision().await?;
        let mut cached = self.0.lock().await;
        if let Some((rev, set)) = cached.as_ref()
            && *rev == revision
        {
            return Ok(set.clone());
        }
        let (revision, resources) = store.load_config().await?;
        let set = Arc::new(ConfigSet::from_resources(resources));
        *cached = Some((revision, set.clone()));
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect("time").with_timezone(&Utc)
    }

    fn hm(h: u32, m: u32) -> NaiveTime {
        NaiveTime::from_hms_opt(h, m, 0).expect("time")
    }

    #[test]
    fn runs_at_the_site_wall_clock_across_daylight_saving() {
        let ny: Tz = "America/New_York".parse().expect("tz");
        let tokyo: Tz = "Asia/Tokyo".parse().expect("tz");
        let paris: Tz = "Europe/Paris".parse().expect("tz");
        // An ordinary night: 02:00 EST is 07:00 UTC.
        assert_eq!(next_run(at("2026-03-06T12:00:00Z"), ny, hm(2, 0)), at("2026-03-07T07:00:00Z"));
        // Spring forward in New York (2026-03-08, 02:00 → 03:00): 02:00 does not exist and runs
        // at the jump, 03:00 EDT = 07:00 UTC; 02:30 runs at 03:30 EDT.
        assert_eq!(next_run(at("2026-03-07T08:00:00Z"), ny, hm(2, 0)), at("2026-03-08T07:00:00Z"));
        assert_eq!(next_run(at("2026-03-07T08:00:00Z"), ny, hm(2, 30)), at("2026-03-08T07:30:00Z"));
        // The day after: 02:00 EDT = 06:00 UTC.
        assert_eq!(next_run(at("2026-03-08T07:00:00Z"), ny, hm(2, 0)), at("2026-03-09T06:00:00Z"));
        // Fall back in New York (2026-11-01): 01:30 happens twice; the run is the earlier one
        // (EDT, 05:30 UTC) and not again at 06:30 UTC.
        assert_eq!(next_run(at("2026-10-31T12:00:00Z"), ny, hm(1, 30)), at("2026-11-01T05:30:00Z"));
        assert_eq!(next_run(at("2026-11-01T05:30:00Z"), ny, hm(1, 30)), at("2026-11-02T06:30:00Z"));
        // Tokyo has no daylight saving; Paris changes on 2026-03-29 (02:00 → 03:00).
        assert_eq!(
            next_run(at("2026-03-07T08:00:00Z"), tokyo, hm(2, 0)),
            at("2026-03-07T17:00:00Z")
        );
        assert_eq!(
            next_run(at("2026-03-28T12:00:00Z"), paris, hm(2, 15)),
            at("2026-03-29T01:15:00Z")
        );
        // Exactly at the due instant, the next run is the following day's.
        assert_eq!(
            next_run(at("2026-03-07T17:00:00Z"), tokyo, hm(2, 0)),
            at("2026-03-08T17:00:00Z")
        );
    }
}
