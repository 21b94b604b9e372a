//! A statistics request, checked against the configuration, answered from the cheapest source:
//! monthly rollups for the whole months of an interval-less range, weekly rollups for the whole
//! weeks of weekly intervals, daily rollups for the edges and for daily intervals, and the visit
//! facts for 15-minute and hourly intervals (whose ranges are therefore bounded). Rollups kept by
//! service and queue answer every grouping but counter and staff, which read their own monthly
//! rollups over whole months and the full daily ones over days.

use chrono::{Datelike, NaiveDate};
use meridian_shared::ValidationError;
use meridian_shared::config::{ConfigSet, Resource};
use serde::Deserialize;

use super::report::{GroupBy, Interval, Kpis, Report, Row, monday};
use crate::error::{Error, Result};
use crate::store::Store;
use crate::store::stats::{FactFilter, Family, Grain, RollupQuery};

/// Longest range of any request, in days.
pub const MAX_RANGE_DAYS: i64 = 3_700;
/// Longest range for 15-minute intervals.
pub const MAX_QUARTER_DAYS: i64 = 31;
/// Longest range for hourly intervals.
pub const MAX_HOUR_DAYS: i64 = 92;

#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StatsRequest {
    #[serde(default)]
    #[param(inline)]
    pub group_by: GroupBy,
    #[param(inline)]
    pub interval: Option<Interval>,
    pub site: Option<String>,
    pub service: Option<String>,
    /// First and last site-local business day, inclusive (YYYY-MM-DD).
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
    /// `json` (default) or `csv`, where the answer is a document.
    #[param(pattern = "^(json|csv)$")]
    pub format: Option<String>,
}

fn invalid(field: &str, message: impl Into<String>) -> Error {
    Error::from(ValidationError::new(field, message))
}

impl StatsRequest {
    /// Refuses unknown sites and services, inverted or enormous ranges and intervals finer than
    /// a day over long or open ranges.
    pub fn validate(&self, set: &ConfigSet) -> Result<()> {
        if let Some(site) = &self.site
            && !set.sites().any(|s| s.code.as_str() == site)
        {
            return Err(invalid("site", format!("unknown site {site:?}")));
        }
        if let Some(service) = &self.service {
            let known = set.resources.values().any(|r| match r {
                Resource::Service(s) => {
                    s.code.as_str() == service
                        && self.site.as_ref().is_none_or(|site| s.site.as_str() == site)
                }
                _ => false,
            });
            if !known {
                let at = self.site.as_ref().map(|s| format!(" at site {s:?}")).unwrap_or_default();
                return Err(invalid("service", format!("unknown service {service:?}{at}")));
            }
        }
        if let (Some(from), Some(to)) = (self.from, self.to) {
            if from > to {
                return Err(invalid("from", "must not be after `to`"));
            }
            if (to - from).num_days() + 1 > MAX_RANGE_DAYS {
                return Err(invalid("to", format!("ranges are at most {MAX_RANGE_DAYS} days")));
            }
        }
        if let Some(interval) = self.interval.filter(|i| i.within_day()) {
            let (name, max) = match interval {
                Interval::Quarter => ("15m", MAX_QUARTER_DAYS),
                _ => ("hour", MAX_HOUR_DAYS),
            };
            let (Some(from), Some(to)) = (self.from, self.to) else {
                return Err(invalid(
                    "interval",
                    format!("interval={name} needs `from` and `to` (at most {max} days)"),
                ));
            };
            if (to - from).num_days() + 1 > max {
                return Err(invalid(
                    "interval",
                    format!("interval={name} covers at most {max} days; narrow `from`/`to`"),
                ));
            }
        }
        Ok(())
    }
}

/// Each service's target wait in milliseconds, by (site, service).
pub fn kpis(set: &ConfigSet) -> Kpis {
    set.resources
        .values()
        .filter_map(|r| match r {
            Resource::Service(svc) => svc
                .kpi_wait_minutes
                .map(|m| ((svc.site.to_string(), svc.code.to_string()), i64::from(m) * 60_000)),
            _ => None,
        })
        .collect()
}

/// The first day of `d`'s month and the last.
fn month_bounds(d: NaiveDate) -> (NaiveDate, NaiveDate) {
    let first = d.with_day(1).unwrap_or(d);
    let next = if first.month() == 12 {
        NaiveDate::from_ymd_opt(first.year() + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(first.year(), first.month() + 1, 1)
    };
    (first, next.and_then(|n| n.pred_opt()).unwrap_or(first))
}

/// The first and last day of the period a day falls in.
type Bounds = fn(NaiveDate) -> (NaiveDate, NaiveDate);

/// The Monday and Sunday of `d`'s ISO week.
fn week_bounds(d: NaiveDate) -> (NaiveDate, NaiveDate) {
    let first = monday(d);
    (first, first + chrono::Duration::days(6))
}

/// A range cut into whole periods and the partial ones at either end.
#[derive(Debug, PartialEq)]
struct WholePeriods {
    /// First day of the first whole period and last day of the last (None: unbounded).
    first: Option<NaiveDate>,
    last: Option<NaiveDate>,
    /// The days before the first whole period and after the last.
    head: Option<(NaiveDate, NaiveDate)>,
    tail: Option<(NaiveDate, NaiveDate)>,
}

/// Cuts `[from, to]` by the periods `bounds` gives a day; `None` when no whole period fits.
fn whole_periods(
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
    bounds: Bounds,
) -> Option<WholePeriods> {
    let first = from.map(|f| {
        let (start, end) = bounds(f);
        if f == start { start } else { end.succ_opt().unwrap_or(end) }
    });
    let last = to.map(|t| {
        let (start, end) = bounds(t);
        if t == end { end } else { start.pred_opt().unwrap_or(start) }
    });
    if let (Some(a), Some(b)) = (first, last)
        && a > b
    {
        return None;
    }
    let head = from.zip(first).filter(|(f, a)| f < a).and_then(|(f, a)| Some((f, a.pred_opt()?)));
    let tail = to.zip(last).filter(|(t, b)| b < t).and_then(|(t, b)| Some((b.succ_opt()?, t)));
    Some(WholePeriods { first, last, head, tail })
}

fn month_key(d: NaiveDate) -> String {
    format!("{:04}-{:02}", d.year(), d.month())
}

/// Answers a validated request; also returns the report so callers can draw its histogram.
pub async fn run<'k>(
    store: &dyn Store,
    req: &StatsRequest,
    kpi_wait_ms: &'k Kpis,
) -> Result<Report<'k>> {
    let mut report = Report::new(req.group_by, req.interval, kpi_wait_ms);
    let day = |d: Option<NaiveDate>| d.map(|d| d.to_string());
    if report.interval().is_some_and(Interval::within_day) {
        let facts = store
            .visit_facts(&FactFilter {
                site: req.site.clone(),
                service: req.service.clone(),
                from_day: day(req.from),
                to_day: day(req.to),
            })
            .await?;
        for f in &facts {
            report.add_fact(f);
        }
        return Ok(report);
    }
    // Counters and staff over whole months have rollups of their own, over days the fine ones;
    // everything else reads the far smaller rollups kept by service and queue.
    let family = match req.group_by {
        GroupBy::Counter => Family::Counter,
        GroupBy::Staff => Family::Staff,
        _ => Family::Service,
    };
    let rollups = |grain: Grain, from: Option<String>, to: Option<String>| RollupQuery {
        grain,
        family: match (family, grain) {
            (Family::Counter | Family::Staff, Grain::Day | Grain::Week) => Family::Fine,
            (f, _) => f,
        },
        site: req.site.clone(),
        service: req.service.clone(),
        from,
        to,
    };
    // Whole weeks (weekly intervals) or months (no interval) from their own rollups, the partial
    // periods at either end from days.
    let (grain, bounds, key): (Grain, Bounds, fn(NaiveDate) -> String) = match report.interval() {
        Some(Interval::Week) if family == Family::Service => {
            (Grain::Week, week_bounds, |d| monday(d).to_string())
        }
        Some(_) => (Grain::Day, |d| (d, d), |d| d.to_string()),
        None => (Grain::Month, month_bounds, month_key),
    };
    let mut queries = Vec::new();
    match whole_periods(req.from, req.to, bounds) {
        None => queries.push(rollups(Grain::Day, day(req.from), day(req.to))),
        Some(w) => {
            queries.push(rollups(grain, w.first.map(key), w.last.map(key)));
            if let Some((a, b)) = w.head {
                queries.push(rollups(Grain::Day, day(Some(a)), day(Some(b))));
            }
            if let Some((a, b)) = w.tail {
                queries.push(rollups(Grain::Day, day(Some(a)), day(Some(b))));
            }
        }
    }
    for q in queries {
        for row in store.rollups(&q).await? {
            let day = match q.grain {
                Grain::Month => None,
                Grain::Day | Grain::Week => row.period.parse().ok(),
            };
            report.add_tally(&row.dims, day, &row.tally);
        }
    }
    Ok(report)
}

/// Validates and answers in one step.
pub async fn rows(store: &dyn Store, set: &ConfigSet, req: &StatsRequest) -> Result<Vec<Row>> {
    req.validate(set)?;
    let kpi = kpis(set);
    Ok(run(store, req, &kpi).await?.rows())
}

/// Rows as CSV, one line per row.
pub fn csv(rows: &[Row]) -> String {
    let opt = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_default();
    let mut out = String::from(
        "group,interval,visits,served,no_shows,no_show_pct,wait_mean_ms,wait_p50_ms,wait_p90_ms,wait_max_ms,service_mean_ms,service_level_pct\n",
    );
    for r in rows {
        let w = r.waiting_ms.as_ref();
        out.push_str(&format!(
            "{},{},{},{},{},{:.1},{},{},{},{},{},{}\n",
            r.group.replace([',', '"', '\n'], "_"),
            r.interval.as_deref().unwrap_or_default(),
            r.visits,
            r.served,
            r.no_shows,
            r.no_show_pct,
            opt(w.map(|w| w.mean)),
            w.map(|w| w.p50.to_string()).unwrap_or_default(),
            w.map(|w| w.p90.to_string()).unwrap_or_default(),
            w.map(|w| w.max.to_string()).unwrap_or_default(),
            opt(r.service_ms_mean),
            opt(r.service_level_pct),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_edges() {
        let d = |s: &str| s.parse::<NaiveDate>().unwrap();
        assert_eq!(month_bounds(d("2026-02-14")), (d("2026-02-01"), d("2026-02-28")));
        assert_eq!(month_bounds(d("2026-12-31")), (d("2026-12-01"), d("2026-12-31")));
        assert_eq!(month_key(d("2026-03-09")), "2026-03");
        assert_eq!(week_bounds(d("2026-11-01")), (d("2026-10-26"), d("2026-11-01")));
        // Oct 29 – Nov 16: whole weeks Nov 2–15, with Oct 29 – Nov 1 and Nov 16 at the edges.
        assert_eq!(
            whole_periods(Some(d("2026-10-29")), Some(d("2026-11-16")), week_bounds),
            Some(WholePeriods {
                first: Some(d("2026-11-02")),
                last: Some(d("2026-11-15")),
                head: Some((d("2026-10-29"), d("2026-11-01"))),
                tail: Some((d("2026-11-16"), d("2026-11-16"))),
            })
        );
        assert_eq!(whole_periods(Some(d("2026-10-29")), Some(d("2026-11-02")), month_bounds), None);
        let open = whole_periods(None, Some(d("2026-11-30")), month_bounds).unwrap();
        assert_eq!(
            (open.first, open.last, open.head, open.tail),
            (None, Some(d("2026-11-30")), None, None)
        );
    }
}
