//! Statistics over visit facts: volumes, outcomes, waiting and service times and service level,
//! grouped by site, service, queue, counter, staff or business day. Pure; the API feeds it facts.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::facts::VisitFact;

/// What rows are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    #[default]
    Site,
    Service,
    Queue,
    Counter,
    Staff,
    Day,
}

/// Waiting-time distribution, milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    pub mean: f64,
    pub p50: i64,
    pub p90: i64,
    pub max: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// The group's key: `SFO`, `SFO/GEN`, `2026-11-02`, …
    pub group: String,
    pub visits: u64,
    pub served: u64,
    pub no_shows: u64,
    pub no_show_pct: f64,
    /// Over visits that were called.
    pub waiting_ms: Option<Distribution>,
    /// Mean time being served, over served visits.
    pub service_ms_mean: Option<f64>,
    /// Share of served visits whose wait was within their service's KPI (when one is set).
    pub service_level_pct: Option<f64>,
}

/// `kpi_wait_ms` maps (site, service) to the service's target wait.
pub fn aggregate(
    facts: &[VisitFact],
    group_by: GroupBy,
    kpi_wait_ms: &HashMap<(String, String), i64>,
) -> Vec<Row> {
    let mut groups: BTreeMap<String, Vec<&VisitFact>> = BTreeMap::new();
    for f in facts {
        let key = match group_by {
            GroupBy::Site => f.site.clone(),
            GroupBy::Service => format!("{}/{}", f.site, f.service),
            GroupBy::Queue => format!("{}/{}", f.site, f.queue),
            GroupBy::Counter => format!("{}/{}", f.site, f.counter.as_deref().unwrap_or("-")),
            GroupBy::Staff => f.staff.clone().unwrap_or_else(|| "-".into()),
            GroupBy::Day => f.business_day.clone(),
        };
        groups.entry(key).or_default().push(f);
    }
    groups
        .into_iter()
        .map(|(group, fs)| {
            let served: Vec<&&VisitFact> =
                fs.iter().filter(|f| f.outcome.as_deref() == Some("served")).collect();
            let no_shows =
                fs.iter().filter(|f| f.outcome.as_deref() == Some("no_show")).count() as u64;
            let mut waits: Vec<i64> = fs.iter().filter_map(|f| f.waiting_ms).collect();
            waits.sort_unstable();
            let waiting_ms = (!waits.is_empty()).then(|| Distribution {
                mean: waits.iter().sum::<i64>() as f64 / waits.len() as f64,
                p50: percentile(&waits, 0.50),
                p90: percentile(&waits, 0.90),
                max: *waits.last().unwrap_or(&0),
            });
            let service_ms_mean = (!served.is_empty()).then(|| {
                served.iter().map(|f| f.service_ms).sum::<i64>() as f64 / served.len() as f64
            });
            let with_kpi: Vec<bool> = served
                .iter()
                .filter_map(|f| {
                    let kpi = kpi_wait_ms.get(&(f.site.clone(), f.service.clone()))?;
                    Some(f.waiting_ms.unwrap_or(0) <= *kpi)
                })
                .collect();
            let service_level_pct = (!with_kpi.is_empty()).then(|| {
                100.0 * with_kpi.iter().filter(|ok| **ok).count() as f64 / with_kpi.len() as f64
            });
            let visits = fs.len() as u64;
            Row {
                group,
                visits,
                served: served.len() as u64,
                no_shows,
                no_show_pct: if visits == 0 {
                    0.0
                } else {
                    100.0 * no_shows as f64 / visits as f64
                },
                waiting_ms,
                service_ms_mean,
                service_level_pct,
            }
        })
        .collect()
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[i64], p: f64) -> i64 {
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn fact(
        site: &str,
        service: &str,
        day: &str,
        wait_min: Option<i64>,
        outcome: Option<&str>,
        service_min: i64,
    ) -> VisitFact {
        VisitFact {
            visit_id: uuid::Uuid::new_v4().to_string(),
            agent_id: "a".into(),
            site: site.into(),
            ticket: "A001".into(),
            service: service.into(),
            queue: "general".into(),
            business_day: day.into(),
            created_at: Utc.with_ymd_and_hms(2026, 11, 2, 9, 0, 0).unwrap(),
            first_called_at: None,
            ended_at: None,
            outcome: outcome.map(Into::into),
            waiting_ms: wait_min.map(|m| m * 60_000),
            service_ms: service_min * 60_000,
            counter: Some("C1".into()),
            staff: Some("alice".into()),
            transfers: 0,
            recalls: 0,
        }
    }

    #[test]
    fn known_answers() {
        // SFO: waits 2, 4, 6, 30 min; three served (5 min each), one no-show; KPI 10 min.
        let facts = vec![
            fact("SFO", "GEN", "2026-11-02", Some(2), Some("served"), 5),
            fact("SFO", "GEN", "2026-11-02", Some(4), Some("served"), 5),
            fact("SFO", "GEN", "2026-11-03", Some(30), Some("served"), 5),
            fact("SFO", "ACC", "2026-11-03", Some(6), Some("no_show"), 0),
            fact("CHI", "GEN", "2026-11-02", None, None, 0),
        ];
        let kpi = HashMap::from([(("SFO".to_owned(), "GEN".to_owned()), 10 * 60_000)]);
        let rows = aggregate(&facts, GroupBy::Site, &kpi);
        assert_eq!(rows.iter().map(|r| r.group.as_str()).collect::<Vec<_>>(), ["CHI", "SFO"]);
        let chi = &rows[0];
        assert_eq!((chi.visits, chi.served, chi.waiting_ms.clone()), (1, 0, None));
        let sfo = &rows[1];
        assert_eq!((sfo.visits, sfo.served, sfo.no_shows), (4, 3, 1));
        assert_eq!(sfo.no_show_pct, 25.0);
        let w = sfo.waiting_ms.clone().expect("waits");
        assert_eq!(
            (w.mean, w.p50, w.p90, w.max),
            (10.5 * 60_000.0, 4 * 60_000, 30 * 60_000, 30 * 60_000)
        );
        assert_eq!(sfo.service_ms_mean, Some(5.0 * 60_000.0));
        let sl = sfo.service_level_pct.expect("service level");
        assert!((sl - 200.0 / 3.0).abs() < 1e-9, "{sl}");
        let by_day = aggregate(&facts, GroupBy::Day, &kpi);
        assert_eq!(
            by_day.iter().map(|r| (r.group.as_str(), r.visits)).collect::<Vec<_>>(),
            [("2026-11-02", 3), ("2026-11-03", 2)]
        );
        let by_service = aggregate(&facts, GroupBy::Service, &kpi);
        assert_eq!(
            by_service.iter().map(|r| r.group.as_str()).collect::<Vec<_>>(),
            ["CHI/GEN", "SFO/ACC", "SFO/GEN"]
        );
    }
}
