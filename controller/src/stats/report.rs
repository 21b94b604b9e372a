//! Statistics over visits: volumes, outcomes, waiting and service times and service level,
//! grouped by site, service, queue, counter or staff and by 15-minute, hourly, daily or weekly
//! intervals in each site's own time zone. Pure: [`Tally`] sums visits (and is what the daily and
//! monthly rollups store), [`Report`] merges tallies or facts into groups and computes the rows.

use std::collections::{BTreeMap, HashMap};

use chrono::{Datelike, NaiveDate};
use serde::{Deserialize, Serialize};

use super::facts::VisitFact;
use super::hist::Histogram;

/// What rows are grouped by. `day` is kept as a shorthand for `all` with daily intervals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    #[default]
    Site,
    Service,
    Queue,
    Counter,
    Staff,
    Day,
    All,
}

/// Time buckets within each group, in the site's local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
pub enum Interval {
    #[serde(rename = "15m")]
    Quarter,
    #[serde(rename = "hour")]
    Hour,
    #[serde(rename = "day")]
    Day,
    #[serde(rename = "week")]
    Week,
}

impl Interval {
    /// Whether the interval needs the per-visit facts (finer than a business day).
    pub fn within_day(self) -> bool {
        matches!(self, Interval::Quarter | Interval::Hour)
    }
}

/// The dimensions a rollup row is kept by (`""` for no counter / staff).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dims {
    pub site: String,
    pub service: String,
    pub queue: String,
    pub counter: String,
    pub staff: String,
}

impl Dims {
    pub fn of(f: &VisitFact) -> Self {
        Dims {
            site: f.site.clone(),
            service: f.service.clone(),
            queue: f.queue.clone(),
            counter: f.counter.clone().unwrap_or_default(),
            staff: f.staff.clone().unwrap_or_default(),
        }
    }
}

/// Additive totals of a set of visits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    pub visits: u64,
    pub served: u64,
    pub no_shows: u64,
    /// Visits that were called, and their waits.
    pub waited: u64,
    pub wait_sum_ms: i64,
    pub wait_max_ms: i64,
    pub waits: Histogram,
    /// Waits of served visits (0 when served without a call), for service levels.
    pub served_waits: Histogram,
    /// Time being served, over served visits.
    pub service_sum_ms: i64,
}

impl Tally {
    pub fn add(&mut self, f: &VisitFact) {
        self.visits += 1;
        if let Some(w) = f.waiting_ms {
            self.waited += 1;
            self.wait_sum_ms += w;
            self.wait_max_ms = self.wait_max_ms.max(w);
            self.waits.add(w);
        }
        match f.outcome.as_deref() {
            Some("served") => {
                self.served += 1;
                self.served_waits.add(f.waiting_ms.unwrap_or(0));
                self.service_sum_ms += f.service_ms;
            }
            Some("no_show") => self.no_shows += 1,
            _ => {}
        }
    }

    pub fn merge(&mut self, o: &Tally) {
        self.visits += o.visits;
        self.served += o.served;
        self.no_shows += o.no_shows;
        self.waited += o.waited;
        self.wait_sum_ms += o.wait_sum_ms;
        self.wait_max_ms = self.wait_max_ms.max(o.wait_max_ms);
        self.waits.merge(&o.waits);
        self.served_waits.merge(&o.served_waits);
        self.service_sum_ms += o.service_sum_ms;
    }
}

/// Tallies of visit facts by dimensions: what one site-day's rollup rows hold.
pub fn rollup<'a>(facts: impl IntoIterator<Item = &'a VisitFact>) -> BTreeMap<Dims, Tally> {
    let mut out: BTreeMap<Dims, Tally> = BTreeMap::new();
    for f in facts {
        out.entry(Dims::of(f)).or_default().add(f);
    }
    out
}

/// Waiting-time distribution, milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Distribution {
    pub mean: f64,
    pub p50: i64,
    pub p90: i64,
    pub max: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Row {
    /// The group's key: `SFO`, `SFO/GEN`, `all`, …
    pub group: String,
    /// The interval's start in the site's local time: `2026-11-02 09:15`, `2026-11-02` (a day,
    /// or the Monday of a week).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
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

#[derive(Debug, Clone, Default)]
struct Acc {
    tally: Tally,
    kpi_n: u64,
    kpi_ok: u64,
}

/// Each service's target wait in milliseconds, by site and service (looked up per rollup row,
/// so without building a key).
#[derive(Debug, Clone, Default)]
pub struct Kpis(HashMap<String, HashMap<String, i64>>);

impl Kpis {
    pub fn get(&self, site: &str, service: &str) -> Option<i64> {
        self.0.get(site)?.get(service).copied()
    }
}

impl FromIterator<((String, String), i64)> for Kpis {
    fn from_iter<I: IntoIterator<Item = ((String, String), i64)>>(iter: I) -> Self {
        let mut out = Kpis::default();
        for ((site, service), ms) in iter {
            out.0.entry(site).or_default().insert(service, ms);
        }
        out
    }
}

/// Groups under construction. `kpi_wait_ms` maps (site, service) to the service's target wait,
/// applied as the configuration has it now.
pub struct Report<'k> {
    group_by: GroupBy,
    interval: Option<Interval>,
    kpi_wait_ms: &'k Kpis,
    groups: BTreeMap<(String, Option<String>), Acc>,
}

impl<'k> Report<'k> {
    pub fn new(group_by: GroupBy, interval: Option<Interval>, kpi_wait_ms: &'k Kpis) -> Self {
        let interval = match group_by {
            GroupBy::Day => Some(interval.unwrap_or(Interval::Day)),
            _ => interval,
        };
        Report { group_by, interval, kpi_wait_ms, groups: BTreeMap::new() }
    }

    pub fn interval(&self) -> Option<Interval> {
        self.interval
    }

    fn key(&self, d: &Dims) -> String {
        let or_dash = |s: &str| if s.is_empty() { "-".to_owned() } else { s.to_owned() };
        match self.group_by {
            GroupBy::Site => d.site.clone(),
            GroupBy::Service => format!("{}/{}", d.site, d.service),
            GroupBy::Queue => format!("{}/{}", d.site, d.queue),
            GroupBy::Counter => format!("{}/{}", d.site, or_dash(&d.counter)),
            GroupBy::Staff => or_dash(&d.staff),
            GroupBy::Day | GroupBy::All => "all".to_owned(),
        }
    }

    /// Adds a tally of `dims` for the business day `day` (or a whole month when `day` is None,
    /// which only an interval-less report accepts).
    pub fn add_tally(&mut self, dims: &Dims, day: Option<NaiveDate>, tally: &Tally) {
        let label = match (self.interval, day) {
            (None, _) => None,
            (Some(Interval::Week), Some(d)) => Some(monday(d).to_string()),
            (Some(_), Some(d)) => Some(d.to_string()),
            (Some(_), None) => None,
        };
        self.merge(dims, label, tally);
    }

    /// Adds one visit fact (for intervals within a day, or small ranges).
    pub fn add_fact(&mut self, f: &VisitFact) {
        let mut one = Tally::default();
        one.add(f);
        let dims = Dims::of(f);
        match self.interval {
            Some(i) if i.within_day() => {
                self.merge(&dims, Some(local_label(&f.created_local, i)), &one);
            }
            _ => self.add_tally(&dims, f.business_day.parse().ok(), &one),
        }
    }

    fn merge(&mut self, dims: &Dims, label: Option<String>, tally: &Tally) {
        let kpi = self.kpi_wait_ms.get(&dims.site, &dims.service);
        let acc = self.groups.entry((self.key(dims), label)).or_default();
        acc.tally.merge(tally);
        if let Some(kpi) = kpi {
            acc.kpi_n += tally.served;
            acc.kpi_ok += tally.served_waits.count_at_most(kpi);
        }
    }

    /// The waiting-time histogram of every group together (for charts).
    pub fn waits(&self) -> Histogram {
        let mut h = Histogram::default();
        for acc in self.groups.values() {
            h.merge(&acc.tally.waits);
        }
        h
    }

    pub fn rows(&self) -> Vec<Row> {
        self.groups
            .iter()
            .map(|((group, interval), acc)| {
                let t = &acc.tally;
                let waiting_ms = (t.waited > 0).then(|| Distribution {
                    mean: t.wait_sum_ms as f64 / t.waited as f64,
                    p50: t.waits.percentile(0.50, t.wait_max_ms).unwrap_or(0),
                    p90: t.waits.percentile(0.90, t.wait_max_ms).unwrap_or(0),
                    max: t.wait_max_ms,
                });
                Row {
                    group: group.clone(),
                    interval: interval.clone(),
                    visits: t.visits,
                    served: t.served,
                    no_shows: t.no_shows,
                    no_show_pct: pct(t.no_shows, t.visits).unwrap_or(0.0),
                    waiting_ms,
                    service_ms_mean: (t.served > 0)
                        .then(|| t.service_sum_ms as f64 / t.served as f64),
                    service_level_pct: pct(acc.kpi_ok, acc.kpi_n),
                }
            })
            .collect()
    }
}

fn pct(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| 100.0 * part as f64 / whole as f64)
}

/// The Monday of `d`'s ISO week.
pub fn monday(d: NaiveDate) -> NaiveDate {
    d - chrono::Duration::days(i64::from(d.weekday().num_days_from_monday()))
}

/// `YYYY-MM-DDTHH:MM` local time → the start of its 15-minute or hourly interval.
fn local_label(local: &str, interval: Interval) -> String {
    let (date, time) = local.split_once('T').unwrap_or((local, "00:00"));
    let (h, m) = time.split_once(':').unwrap_or((time, "00"));
    let m: u32 = m.parse().unwrap_or(0);
    match interval {
        Interval::Quarter => format!("{date} {h}:{:02}", m / 15 * 15),
        _ => format!("{date} {h}:00"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn fact(
        site: &str,
        service: &str,
        local: &str,
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
            business_day: local[..10].into(),
            created_at: Utc.with_ymd_and_hms(2026, 11, 2, 9, 0, 0).unwrap(),
            created_local: local.into(),
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

    fn facts() -> Vec<VisitFact> {
        // SFO: waits 2, 4, 6, 30 min; three served (5 min each), one no-show; KPI 10 min.
        vec![
            fact("SFO", "GEN", "2026-11-02T09:05", Some(2), Some("served"), 5),
            fact("SFO", "GEN", "2026-11-02T09:20", Some(4), Some("served"), 5),
            fact("SFO", "GEN", "2026-11-03T10:59", Some(30), Some("served"), 5),
            fact("SFO", "ACC", "2026-11-03T11:00", Some(6), Some("no_show"), 0),
            fact("CHI", "GEN", "2026-11-02T09:00", None, None, 0),
        ]
    }

    fn kpi() -> Kpis {
        Kpis::from_iter([(("SFO".to_owned(), "GEN".to_owned()), 10 * 60_000)])
    }

    fn report(group_by: GroupBy, interval: Option<Interval>, by_rollup: bool) -> Vec<Row> {
        let kpi = kpi();
        let mut r = Report::new(group_by, interval, &kpi);
        if by_rollup {
            let mut days: BTreeMap<String, Vec<VisitFact>> = BTreeMap::new();
            for f in facts() {
                days.entry(f.business_day.clone()).or_default().push(f);
            }
            for (day, fs) in days {
                for (dims, tally) in rollup(&fs) {
                    r.add_tally(&dims, day.parse().ok(), &tally);
                }
            }
        } else {
            for f in facts() {
                r.add_fact(&f);
            }
        }
        r.rows()
    }

    #[test]
    fn known_answers() {
        for by_rollup in [false, true] {
            let rows = report(GroupBy::Site, None, by_rollup);
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
            let by_day = report(GroupBy::Day, None, by_rollup);
            assert_eq!(
                by_day
                    .iter()
                    .map(|r| (r.group.as_str(), r.interval.as_deref(), r.visits))
                    .collect::<Vec<_>>(),
                [("all", Some("2026-11-02"), 3), ("all", Some("2026-11-03"), 2)]
            );
            let weekly = report(GroupBy::Service, Some(Interval::Week), by_rollup);
            assert_eq!(
                weekly
                    .iter()
                    .map(|r| (r.group.as_str(), r.interval.as_deref()))
                    .collect::<Vec<_>>(),
                [
                    ("CHI/GEN", Some("2026-11-02")),
                    ("SFO/ACC", Some("2026-11-02")),
                    ("SFO/GEN", Some("2026-11-02"))
                ]
            );
        }
        let quarters = report(GroupBy::Site, Some(Interval::Quarter), false);
        assert_eq!(
            quarters
                .iter()
                .map(|r| (r.group.as_str(), r.interval.as_deref().unwrap(), r.visits))
                .collect::<Vec<_>>(),
            [
                ("CHI", "2026-11-02 09:00", 1),
                ("SFO", "2026-11-02 09:00", 1),
                ("SFO", "2026-11-02 09:15", 1),
                ("SFO", "2026-11-03 10:45", 1),
                ("SFO", "2026-11-03 11:00", 1),
            ]
        );
        let hours = report(GroupBy::All, Some(Interval::Hour), false);
        assert_eq!(
            hours.iter().map(|r| (r.interval.as_deref().unwrap(), r.visits)).collect::<Vec<_>>(),
            [("2026-11-02 09:00", 3), ("2026-11-03 10:00", 1), ("2026-11-03 11:00", 1)]
        );
    }
}
