//! The statistics dashboard (`/console/stats`), the live branch panel (`/console/live`) and the
//! quarantine list (`/console/quarantine`). Every chart has its numbers in a table below it and
//! as CSV (`/console/stats.csv?chart=…`), answered by the same queries as the statistics API.

use axum::Extension;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{NaiveDate, Utc};
use maud::{Markup, PreEscaped, html};
use meridian_shared::config::ConfigSet;
use serde::Deserialize;

use super::charts::{bar_chart, value_label};
use super::{SignedIn, page, shell};
use crate::api::ApiState;
use crate::stats::query::{self, StatsRequest};
use crate::stats::report::{GroupBy, Interval, Row};

/// Dashboard filters; an empty field means "not set".
#[derive(Debug, Default, Deserialize)]
pub struct Filters {
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    site: String,
    #[serde(default)]
    chart: String,
}

/// Waiting-time bands of the distribution chart, in minutes (upper bounds, inclusive).
const WAIT_BANDS: [(i64, &str); 9] = [
    (2, "≤2"),
    (5, "2–5"),
    (10, "5–10"),
    (15, "10–15"),
    (20, "15–20"),
    (30, "20–30"),
    (45, "30–45"),
    (60, "45–60"),
    (i64::MAX, ">60"),
];

/// One chart's data: a title, a table header and rows of cells, and the bars.
struct Chart {
    id: &'static str,
    title: &'static str,
    unit: &'static str,
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
    bars: Vec<(String, f64)>,
}

struct Dashboard {
    from: NaiveDate,
    to: NaiveDate,
    site: Option<String>,
    set: ConfigSet,
    charts: Vec<Chart>,
}

fn parse_day(field: &str, text: &str) -> Result<Option<NaiveDate>, String> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    text.trim().parse().map(Some).map_err(|_| format!("{field}: {text:?} is not a YYYY-MM-DD date"))
}

async fn build(state: &ApiState, f: &Filters) -> Result<Dashboard, (StatusCode, String)> {
    let bad = |m: String| (StatusCode::BAD_REQUEST, m);
    let today = Utc::now().date_naive();
    let to = parse_day("to", &f.to).map_err(bad)?.unwrap_or(today);
    let from = parse_day("from", &f.from).map_err(bad)?.unwrap_or(to - chrono::Duration::days(6));
    let site = (!f.site.trim().is_empty()).then(|| f.site.trim().to_owned());
    let internal = |e: crate::Error| match e {
        crate::Error::Validation(v) => (StatusCode::BAD_REQUEST, v.to_string()),
        other => {
            tracing::error!(error = %other, "dashboard query failed");
            (StatusCode::SERVICE_UNAVAILABLE, "The statistics store is unavailable.".into())
        }
    };
    let (_, resources) = state.store.load_config().await.map_err(internal)?;
    let set = ConfigSet::from_resources(resources);
    let base =
        StatsRequest { site: site.clone(), from: Some(from), to: Some(to), ..Default::default() };
    base.validate(&set).map_err(internal)?;
    let kpis = query::kpis(&set);
    let store = state.store.as_ref();
    let ask = |group_by, interval| StatsRequest { group_by, interval, ..base.clone() };

    // A CSV download asks for one chart: compute only that one.
    let want = |id: &str| f.chart.is_empty() || id.strip_prefix("chart-") == Some(f.chart.as_str());
    let mut charts = Vec::new();
    if want("chart-volumes") {
        // Volumes by hour of day (site-local), summed over the range; by day beyond 92 days.
        let hourly = (to - from).num_days() < query::MAX_HOUR_DAYS;
        let interval = if hourly { Interval::Hour } else { Interval::Day };
        let volume_rows = query::run(store, &ask(GroupBy::All, Some(interval)), &kpis)
            .await
            .map_err(internal)?
            .rows();
        let mut volumes: std::collections::BTreeMap<String, (u64, u64, u64)> = Default::default();
        for r in &volume_rows {
            let label = r.interval.clone().unwrap_or_default();
            let key = if hourly { label.get(11..13).unwrap_or("").to_owned() } else { label };
            let v = volumes.entry(key).or_default();
            v.0 += r.visits;
            v.1 += r.served;
            v.2 += r.no_shows;
        }
        charts.push(Chart {
            id: "chart-volumes",
            title: if hourly { "Visits per hour of day" } else { "Visits per day" },
            unit: "",
            header: vec![if hourly { "Hour" } else { "Day" }, "Visits", "Served", "No-shows"],
            rows: volumes
                .iter()
                .map(|(k, (v, s, n))| vec![k.clone(), v.to_string(), s.to_string(), n.to_string()])
                .collect(),
            bars: volumes.iter().map(|(k, (v, _, _))| (k.clone(), *v as f64)).collect(),
        });
    }
    // The per-site report also holds every called visit's wait (its groups together).
    if want("chart-waits") || want("chart-no-shows") {
        let by_site =
            query::run(store, &ask(GroupBy::Site, None), &kpis).await.map_err(internal)?;
        if want("chart-waits") {
            // Waiting-time distribution over every called visit in the range.
            let mut bands = [0u64; WAIT_BANDS.len()];
            for (edge, n) in by_site.waits().buckets() {
                let minutes_edge = edge.unwrap_or(i64::MAX);
                let band = WAIT_BANDS
                    .iter()
                    .position(|(upper, _)| *upper == i64::MAX || minutes_edge <= upper * 60_000)
                    .unwrap_or(WAIT_BANDS.len() - 1);
                bands[band] += n;
            }
            charts.push(Chart {
                id: "chart-waits",
                title: "Waiting time (minutes)",
                unit: "",
                header: vec!["Wait (min)", "Visits"],
                rows: WAIT_BANDS
                    .iter()
                    .zip(bands)
                    .map(|((_, l), n)| vec![(*l).to_owned(), n.to_string()])
                    .collect(),
                bars: WAIT_BANDS
                    .iter()
                    .zip(bands)
                    .map(|((_, l), n)| ((*l).to_owned(), n as f64))
                    .collect(),
            });
        }
        if want("chart-no-shows") {
            let site_rows = by_site.rows();
            charts.push(Chart {
                id: "chart-no-shows",
                title: "No-show rate by site (%)",
                unit: "%",
                header: vec!["Site", "Visits", "Served", "No-shows", "No-show %", "P90 wait (min)"],
                rows: site_rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.group.clone(),
                            r.visits.to_string(),
                            r.served.to_string(),
                            r.no_shows.to_string(),
                            value_label(r.no_show_pct),
                            r.waiting_ms
                                .as_ref()
                                .map(|w| value_label(w.p90 as f64 / 60_000.0))
                                .unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect(),
                bars: site_rows.iter().map(|r| (r.group.clone(), r.no_show_pct)).collect(),
            });
        }
    }
    if want("chart-service-level") {
        let by_service =
            query::run(store, &ask(GroupBy::Service, None), &kpis).await.map_err(internal)?.rows();
        charts.push(Chart {
            id: "chart-service-level",
            title: "Service level by site and service (% served within KPI)",
            unit: "%",
            header: vec!["Site/service", "Served", "Service level %", "Mean wait (min)"],
            rows: by_service
                .iter()
                .map(|r| {
                    vec![
                        r.group.clone(),
                        r.served.to_string(),
                        r.service_level_pct.map(value_label).unwrap_or_else(|| "-".into()),
                        mean_minutes(r),
                    ]
                })
                .collect(),
            bars: by_service
                .iter()
                .filter_map(|r| Some((r.group.clone(), r.service_level_pct?)))
                .collect(),
        });
    }
    Ok(Dashboard { from, to, site, set, charts })
}

fn mean_minutes(r: &Row) -> String {
    r.waiting_ms.as_ref().map(|w| value_label(w.mean / 60_000.0)).unwrap_or_else(|| "-".into())
}

fn error_page(status: StatusCode, message: &str) -> Response {
    let body = html! { main { p .message #message { (message) } p { a href="/console/stats" { "Back to the dashboard" } } } };
    (status, Html(page("Statistics", None, body).into_string())).into_response()
}

pub async fn stats_page(
    State(state): State<ApiState>,
    Extension(me): Extension<SignedIn>,
    Query(f): Query<Filters>,
) -> Response {
    let d = match build(&state, &f).await {
        Ok(d) => d,
        Err((status, m)) => return error_page(status, &m),
    };
    let set = &d.set;
    let site_q = d.site.clone().unwrap_or_default();
    let csv_link = |chart: &str| {
        format!("/console/stats.csv?chart={chart}&from={}&to={}&site={site_q}", d.from, d.to)
    };
    let status = async {
        Ok::<_, crate::Error>((
            state.store.projection_lag().await?,
            state.store.pending_rollups().await?,
        ))
    }
    .await
    .ok();
    let body = html! {
        (shell(&me, "stats"))
        main {
            form #filters method="get" action="/console/stats" {
                label { "From " input #from name="from" type="date" value=(d.from); } " "
                label { "To " input #to name="to" type="date" value=(d.to); } " "
                label { "Site "
                    select #site name="site" {
                        option value="" selected[d.site.is_none()] { "All sites" }
                        @for s in set.sites() {
                            option value=(s.code) selected[d.site.as_deref() == Some(s.code.as_str())] { (s.code) " — " (s.name) }
                        }
                    }
                } " "
                button #apply type="submit" { "Show" }
            }
            @if let Some((lag, pending)) = status {
                p .freshness #freshness {
                    @if lag == 0 && pending == 0 { "Statistics are current." }
                    @else { "Catching up: " (lag) " events to fold in, " (pending) " site-days to recompute." }
                }
            }
            @for c in &d.charts {
                section .chart #(format!("{}-section", c.id)) {
                    (PreEscaped(bar_chart(c.id, c.title, &c.bars, c.unit)))
                    table .numbers #(format!("{}-table", c.id)) {
                        tr { @for h in &c.header { th { (h) } } }
                        @for row in &c.rows { tr { @for cell in row { td { (cell) } } } }
                    }
                    p { a .csv href=(csv_link(c.id.trim_start_matches("chart-"))) { "Download CSV" } }
                }
            }
            @if me.is_admin() {
                form #rebuild method="post" action="/console/stats/rebuild" {
                    (me.csrf_field())
                    button #rebuild-submit type="submit" { "Rebuild statistics from raw events" }
                }
            }
        }
    };
    Html(page("Statistics", None, body).into_string()).into_response()
}

pub async fn stats_csv(State(state): State<ApiState>, Query(f): Query<Filters>) -> Response {
    let d = match build(&state, &f).await {
        Ok(d) => d,
        Err((status, m)) => return (status, m).into_response(),
    };
    let wanted = format!("chart-{}", f.chart);
    let Some(chart) = d.charts.iter().find(|c| c.id == wanted) else {
        return (
            StatusCode::BAD_REQUEST,
            "chart must be one of volumes, waits, service-level, no-shows",
        )
            .into_response();
    };
    let clean = |s: &str| s.replace([',', '"', '\n'], "_");
    let mut out = chart.header.iter().map(|h| clean(h)).collect::<Vec<_>>().join(",");
    out.push('\n');
    for row in &chart.rows {
        out.push_str(&row.iter().map(|c| clean(c)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], out).into_response()
}

/// Admin only: drop facts and rollups so the projector rebuilds them from the raw events.
pub async fn rebuild(
    State(state): State<ApiState>,
    Extension(me): Extension<SignedIn>,
) -> Response {
    if !me.is_admin() {
        return error_page(
            StatusCode::FORBIDDEN,
            "Your token is read-only (viewer): only admins can rebuild statistics.",
        );
    }
    match state.store.reset_facts().await {
        Ok(()) => Redirect::to("/console/stats").into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rebuild failed");
            error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "The store is unavailable; nothing changed.",
            )
        }
    }
}

fn minutes(ms: i64) -> String {
    format!("{} min", ms / 60_000)
}

pub async fn live_page(
    State(state): State<ApiState>,
    Extension(me): Extension<SignedIn>,
) -> Response {
    let sites = match crate::api::live(state.store.as_ref(), None).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "live panel failed");
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "The store is unavailable; retrying.",
            );
        }
    };
    let body = html! {
        (shell(&me, "live"))
        main .live {
            @for s in &sites {
                section .site-live data-site=(s.site) .stale[s.stale] {
                    h2 { (s.site) " "
                        @if s.connected { span .online { "live" } }
                        @else {
                            span .offline .stale-mark { "stale" }
                            @if let Some(t) = s.last_seen { " — agent offline since " (t.format("%Y-%m-%d %H:%M UTC")) }
                            @else { " — no agent connected yet" }
                        }
                    }
                    p { span .waiting { (s.waiting) } " waiting · " span .with-staff { (s.with_staff) } " with staff · "
                        span .counters-open { (s.open_counters.len()) } " counters open" }
                    table .places {
                        tr { th { "Waiting in" } th { "Visits" } th { "Longest wait" } }
                        @for p in &s.places {
                            tr data-place=(p.place) { td { (p.place) } td .n { (p.waiting) } td { (minutes(p.longest_wait_ms)) } }
                        }
                    }
                    p .open-counters { "Open counters: "
                        @if s.open_counters.is_empty() { "none" }
                        @for c in &s.open_counters { span .counter { (c.counter) @if let Some(st) = &c.staff { " (" (st) ")" } } " " }
                    }
                }
            }
        }
    };
    let head = html! { meta http-equiv="refresh" content="3"; };
    Html(page("Live", Some(head), body).into_string()).into_response()
}

pub async fn quarantine_page(
    State(state): State<ApiState>,
    Extension(me): Extension<SignedIn>,
) -> Response {
    let rows = match state.store.quarantined(200).await {
        Ok(r) => r,
        Err(_) => return error_page(StatusCode::SERVICE_UNAVAILABLE, "The store is unavailable."),
    };
    let body: Markup = html! {
        (shell(&me, "quarantine"))
        main {
            p { "Events set aside by ingestion or statistics, newest first. They never block an agent's stream." }
            table #quarantine {
                tr { th { "Received" } th { "Site" } th { "Agent" } th { "Seq" } th { "Kind" } th { "Reason" } }
                @for q in &rows {
                    tr { td { (q.received_at.format("%Y-%m-%d %H:%M:%S")) } td { (q.site) }
                         td { (q.agent_id.chars().take(8).collect::<String>()) } td { (q.seq) }
                         td { (q.kind) } td .reason { (q.reason) } }
                }
            }
        }
    };
    Html(page("Quarantine", None, body).into_string()).into_response()
}
