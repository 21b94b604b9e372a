//! Acceptance for central statistics, on SQLite and PostgreSQL:
//! - a generated workload with known answers — 3 sites in three time zones × 5 business days
//!   across a month boundary and a daylight-saving change, known arrivals, waits, outcomes and
//!   services — gives exactly the expected statistics through the API, whichever source answers
//!   (monthly rollups, daily rollups, facts);
//! - one site offline for three days backfills after the others (two projectors at once, as two
//!   controller replicas run them); its days are corrected, the rollups equal a recomputation
//!   from the raw events, and a resent batch counts nothing twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use meridian_controller::api::ApiState;
use meridian_controller::config_admin::{self, ChangeMode, ResourceInput};
use meridian_controller::metrics::Metrics;
use meridian_controller::store::stats::{Family, Grain, RollupQuery};
use meridian_controller::store::{self, Store};
use meridian_controller::testing;
use meridian_shared::events::{AgentEvent, VisitChanged, VisitCreated, VisitEventKind};
use meridian_shared::visits::Outcome;
use meridian_shared::{AgentId, Code, VisitId};
use serde_json::{Value, json};
use tower::ServiceExt;

const SITES: [(&str, &str); 3] =
    [("SFO", "America/Los_Angeles"), ("CHI", "America/Chicago"), ("TYO", "Asia/Tokyo")];
/// GEN's target wait; ACC has none.
const KPI_MIN: i64 = 10;

fn days() -> Vec<NaiveDate> {
    // Oct 29 – Nov 2 2026: a month boundary, and US daylight saving ends on Nov 1.
    (0..5)
        .map(|d| NaiveDate::from_ymd_opt(2026, 10, 29).expect("test data") + Duration::days(d))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Served { service_min: i64 },
    NoShow,
    RemovedUncalled,
}

/// One planned visit: everything the expected answers are computed from.
#[derive(Debug, Clone)]
struct Planned {
    site: &'static str,
    day: NaiveDate,
    /// Minutes after 09:00 site-local time.
    arrival_min: i64,
    service: &'static str,
    wait_min: Option<i64>,
    end: End,
}

fn plan() -> Vec<Planned> {
    let mut out = Vec::new();
    for (s, (site, _)) in SITES.iter().enumerate() {
        for (d, day) in days().into_iter().enumerate() {
            for i in 0..(6 + s + d) as i64 {
                let end = if i % 7 == 6 {
                    End::RemovedUncalled
                } else if i % 5 == 3 {
                    End::NoShow
                } else {
                    End::Served { service_min: 4 + i % 3 }
                };
                out.push(Planned {
                    site,
                    day,
                    arrival_min: 20 * i,
                    service: if i % 2 == 0 { "GEN" } else { "ACC" },
                    wait_min: (end != End::RemovedUncalled).then_some((i % 4 + 1) * 3 + s as i64),
                    end,
                });
            }
        }
    }
    out
}

fn tz(site: &str) -> Tz {
    SITES
        .iter()
        .find(|(s, _)| *s == site)
        .map(|(_, z)| z.parse().expect("test data"))
        .expect("test data")
}

fn code(s: &str) -> Code {
    Code::parse(s).expect("test data")
}

fn arrival(p: &Planned) -> DateTime<Utc> {
    let local = p.day.and_hms_opt(9, 0, 0).expect("test data") + Duration::minutes(p.arrival_min);
    tz(p.site).from_local_datetime(&local).single().expect("unambiguous").with_timezone(&Utc)
}

fn events_of(p: &Planned) -> Vec<AgentEvent> {
    let id = VisitId::new();
    let created = arrival(p);
    let changed = |minutes: i64, outcome: Option<Outcome>, service_ms: Option<i64>| VisitChanged {
        visit_id: id,
        ticket: "A001".into(),
        service: code(p.service),
        queue: code("general"),
        business_day: p.day,
        counter: Some(code("C1")),
        staff: Some(code("alice")),
        to: None,
        outcome,
        at: created + Duration::minutes(minutes),
        waiting_ms: None,
        service_ms,
        recalls: 0,
        marks: vec![],
    };
    let mut events = vec![AgentEvent::VisitCreated(VisitCreated {
        visit_id: id,
        ticket: "A001".into(),
        service: code(p.service),
        queue: code("general"),
        business_day: p.day,
        created_at: created,
        customer: None,
    })];
    match (p.end, p.wait_min) {
        (End::RemovedUncalled, _) => events.push(AgentEvent::Visit(
            VisitEventKind::Removed,
            changed(30, Some(Outcome::Removed), None),
        )),
        (End::NoShow, Some(w)) => {
            events.push(AgentEvent::Visit(VisitEventKind::Called, changed(w, None, None)));
            events.push(AgentEvent::Visit(
                VisitEventKind::NoShow,
                changed(w + 2, Some(Outcome::NoShow), None),
            ));
        }
        (End::Served { service_min }, Some(w)) => {
            events.push(AgentEvent::Visit(VisitEventKind::Called, changed(w, None, None)));
            events.push(AgentEvent::Visit(VisitEventKind::Serving, changed(w + 1, None, None)));
            events.push(AgentEvent::Visit(
                VisitEventKind::Ended,
                changed(w + 1 + service_min, Some(Outcome::Served), Some(service_min * 60_000)),
            ));
        }
        _ => unreachable!("called visits have a wait"),
    }
    events
}

/// The expected row of a set of planned visits, computed from the plan alone.
#[derive(Debug, PartialEq)]
struct Expected {
    visits: u64,
    served: u64,
    no_shows: u64,
    wait_mean_ms: f64,
    p50_ms: i64,
    p90_ms: i64,
    max_ms: i64,
    service_mean_ms: f64,
    service_level: Option<f64>,
}

/// Means compared to the microsecond: the JSON round trip may change the last binary digit.
fn micro(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

fn expected<'a>(visits: impl Iterator<Item = &'a Planned>) -> Expected {
    let visits: Vec<&Planned> = visits.collect();
    let mut waits: Vec<i64> =
        visits.iter().filter_map(|p| p.wait_min.map(|w| w * 60_000)).collect();
    waits.sort_unstable();
    let rank = |q: f64| waits[((q * waits.len() as f64).ceil() as usize).max(1) - 1];
    let served: Vec<&&Planned> =
        visits.iter().filter(|p| matches!(p.end, End::Served { .. })).collect();
    let service_total: i64 = served
        .iter()
        .map(|p| match p.end {
            End::Served { service_min } => service_min * 60_000,
            _ => 0,
        })
        .sum();
    let gen_served: Vec<&&&Planned> = served.iter().filter(|p| p.service == "GEN").collect();
    let within = gen_served.iter().filter(|p| p.wait_min.unwrap_or(0) <= KPI_MIN).count();
    Expected {
        visits: visits.len() as u64,
        served: served.len() as u64,
        no_shows: visits.iter().filter(|p| p.end == End::NoShow).count() as u64,
        wait_mean_ms: micro(waits.iter().sum::<i64>() as f64 / waits.len() as f64),
        p50_ms: rank(0.5),
        p90_ms: rank(0.9),
        max_ms: *waits.last().expect("test data"),
        service_mean_ms: micro(service_total as f64 / served.len() as f64),
        service_level: (!gen_served.is_empty())
            .then(|| micro(100.0 * within as f64 / gen_served.len() as f64)),
    }
}

fn actual(row: &Value) -> Expected {
    Expected {
        visits: row["visits"].as_u64().expect("test data"),
        served: row["served"].as_u64().expect("test data"),
        no_shows: row["no_shows"].as_u64().expect("test data"),
        wait_mean_ms: micro(row["waiting_ms"]["mean"].as_f64().expect("test data")),
        p50_ms: row["waiting_ms"]["p50"].as_i64().expect("test data"),
        p90_ms: row["waiting_ms"]["p90"].as_i64().expect("test data"),
        max_ms: row["waiting_ms"]["max"].as_i64().expect("test data"),
        service_mean_ms: micro(row["service_ms_mean"].as_f64().expect("test data")),
        service_level: row["service_level_pct"].as_f64().map(micro),
    }
}

struct Fleet {
    store: Arc<dyn Store>,
    router: axum::Router,
    token: String,
    agents: HashMap<&'static str, AgentId>,
    /// Each site's events in stream order.
    streams: HashMap<&'static str, Vec<AgentEvent>>,
}

async fn fleet(store: Arc<dyn Store>) -> Fleet {
    let token = meridian_controller::server::ensure_bootstrap_token(store.as_ref(), None)
        .await
        .expect("token")
        .expect("first");
    let mut resources = Vec::new();
    for (site, zone) in SITES {
        resources.extend([
            json!({"kind": "site", "code": site, "name": site, "time_zone": zone}),
            json!({"kind": "queue", "site": site, "code": "general", "name": "General", "letter": "A"}),
            json!({"kind": "service", "site": site, "code": "GEN", "name": "General", "queue": "general", "kpi_wait_minutes": KPI_MIN}),
            json!({"kind": "service", "site": site, "code": "ACC", "name": "Accounts", "queue": "general"}),
        ]);
    }
    let inputs: Vec<ResourceInput> =
        resources.into_iter().map(|r| serde_json::from_value(r).expect("resource")).collect();
    config_admin::change(store.as_ref(), "test", inputs, vec![], ChangeMode::Upsert)
        .await
        .expect("config");
    let mut agents = HashMap::new();
    for (site, _) in SITES {
        let agent = testing::enroll_agent(store.as_ref(), site).await.expect("enroll");
        agents.insert(site, agent.id);
    }
    let mut streams: HashMap<&'static str, Vec<AgentEvent>> = HashMap::new();
    for p in plan() {
        streams.entry(p.site).or_default().extend(events_of(&p));
    }
    let state = ApiState {
        store: store.clone(),
        metrics: Arc::new(Metrics::default()),
        commands_changed: Arc::new(tokio::sync::watch::channel(0).0),
        clock_skew_tolerance: meridian_controller::Settings::default().clock_skew_tolerance(),
    };
    Fleet {
        store,
        router: meridian_controller::api::router(state, 1 << 20),
        token,
        agents,
        streams,
    }
}

impl Fleet {
    /// Streams `site`'s events of business days `< until` (or all) that were not sent yet, in
    /// batches of 40, as the gateway would; returns the next sequence to send.
    async fn stream(&self, site: &'static str, from_seq: u64, until: Option<NaiveDate>) -> u64 {
        let events = &self.streams[site];
        let day_of = |e: &AgentEvent| match e {
            AgentEvent::VisitCreated(c) => c.business_day,
            AgentEvent::Visit(_, v) => v.business_day,
            _ => NaiveDate::MIN,
        };
        let mut seq = from_seq;
        let end = events
            .iter()
            .position(|e| until.is_some_and(|u| day_of(e) >= u))
            .unwrap_or(events.len());
        let batch: Vec<AgentEvent> = events[(from_seq - 1) as usize..end].to_vec();
        for chunk in batch.chunks(40) {
            let incoming = testing::incoming(chunk, seq, Utc::now());
            self.store
                .ingest_events(self.agents[site], &incoming, Utc::now())
                .await
                .expect("store")
                .expect("ingest");
            seq += chunk.len() as u64;
        }
        seq
    }

    /// Two projectors at once, as two controller replicas run them: each event still counts once.
    async fn catch_up(&self) {
        let shutdown = Default::default();
        let run = || meridian_controller::stats::catch_up(self.store.as_ref(), &shutdown);
        let (a, b) = tokio::join!(run(), run());
        a.expect("projection");
        b.expect("projection");
        assert_eq!(self.store.projection_lag().await.expect("lag"), 0);
        assert_eq!(self.store.pending_rollups().await.expect("pending"), 0);
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        let req = Request::get(path)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .body(Body::empty())
            .expect("req");
        let resp = self.router.clone().oneshot(req).await.expect("resp");
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 22).await.expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn rows(&self, query: &str) -> Vec<Value> {
        let (status, body) = self.get(&format!("/api/v1/stats/visits?{query}")).await;
        assert_eq!(status, StatusCode::OK, "{query}: {body}");
        serde_json::from_str::<Value>(&body).expect("json").as_array().expect("rows").clone()
    }

    async fn rollups(&self) -> Vec<Vec<String>> {
        let dump = |grain, family| async move {
            let rows = self
                .store
                .rollups(&RollupQuery { grain, family, ..Default::default() })
                .await
                .expect("rollups");
            let mut out: Vec<String> = rows.iter().map(|r| format!("{r:?}")).collect();
            out.sort();
            out
        };
        let mut all = Vec::new();
        for (grain, family) in [
            (Grain::Day, Family::Fine),
            (Grain::Month, Family::Fine),
            (Grain::Day, Family::Service),
            (Grain::Week, Family::Service),
            (Grain::Month, Family::Service),
            (Grain::Month, Family::Counter),
            (Grain::Month, Family::Staff),
        ] {
            all.push(dump(grain, family).await);
        }
        all
    }
}

/// Daily rows per site: every site-local business day in its own row, each as planned.
async fn every_site_day_is_exact(fleet: &Fleet, plan: &[Planned]) -> Vec<Value> {
    let daily = fleet.rows("group_by=site&interval=day").await;
    assert_eq!(daily.len(), 15);
    for row in &daily {
        let (site, day) = (
            row["group"].as_str().expect("test data"),
            row["interval"].as_str().expect("test data"),
        );
        let want = expected(plan.iter().filter(|p| p.site == site && p.day.to_string() == day));
        assert_eq!(actual(row), want, "{site} {day}");
    }
    daily
}

async fn known_answers(store: Arc<dyn Store>) {
    let fleet = fleet(store).await;
    for (site, _) in SITES {
        fleet.stream(site, 1, None).await;
    }
    fleet.catch_up().await;
    let plan = plan();

    // By site over the five days: every figure as computed from the plan.
    let rows = fleet.rows("group_by=site&from=2026-10-29&to=2026-11-02").await;
    assert_eq!(rows.len(), 3);
    for row in &rows {
        let site = row["group"].as_str().expect("test data");
        assert_eq!(actual(row), expected(plan.iter().filter(|p| p.site == site)), "{site}");
    }
    // The same through monthly rollups only (whole months), and with no range at all.
    for query in ["group_by=site&from=2026-10-01&to=2026-11-30", "group_by=site"] {
        assert_eq!(fleet.rows(query).await, rows, "{query}");
    }
    // A range that cuts both months: monthly rollups are not usable, days are.
    let cut = fleet.rows("group_by=site&from=2026-10-30&to=2026-11-01").await;
    for row in &cut {
        let site = row["group"].as_str().expect("test data");
        let want = expected(
            plan.iter().filter(|p| p.site == site && p.day >= days()[1] && p.day <= days()[3]),
        );
        assert_eq!(actual(row), want, "{site} 30 Oct – 1 Nov");
    }
    // Daily intervals, per site: every site-local business day in its own row.
    every_site_day_is_exact(&fleet, &plan).await;
    // Hourly intervals in site-local time, on the day daylight saving ends in the US.
    let hourly = fleet.rows("site=SFO&interval=hour&from=2026-11-01&to=2026-11-01").await;
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for p in plan.iter().filter(|p| p.site == "SFO" && p.day.to_string() == "2026-11-01") {
        let hour = 9 + p.arrival_min / 60;
        *want.entry(format!("2026-11-01 {hour:02}:00")).or_default() += 1;
    }
    let got: BTreeMap<String, u64> = hourly
        .iter()
        .map(|r| {
            (
                r["interval"].as_str().expect("test data").to_owned(),
                r["visits"].as_u64().expect("test data"),
            )
        })
        .collect();
    assert_eq!(got, want, "local hours: 09:00 is 09:00 on both sides of the change");
    // Weekly intervals: Oct 29 – Nov 1 are in the week of Monday Oct 26, Nov 2 starts a week.
    let weekly = fleet.rows("group_by=all&interval=week").await;
    let weeks: Vec<(String, u64)> = weekly
        .iter()
        .map(|r| {
            (
                r["interval"].as_str().expect("test data").to_owned(),
                r["visits"].as_u64().expect("test data"),
            )
        })
        .collect();
    let before = plan.iter().filter(|p| p.day < days()[4]).count() as u64;
    assert_eq!(
        weeks,
        [("2026-10-26".to_owned(), before), ("2026-11-02".to_owned(), plan.len() as u64 - before)]
    );
    // Weeks cut by the range come from days, whole weeks from weekly rollups: the same answer.
    let cut_weeks = fleet.rows("group_by=all&interval=week&from=2026-10-29&to=2026-11-02").await;
    assert_eq!(cut_weeks, weekly);
    // Counters over whole months read the counter rollups: the called visits at C1, the
    // uncalled ones at none ("-"); over days, the fine rollups — the same answer.
    let counters = fleet.rows("group_by=counter&site=SFO").await;
    let called = plan.iter().filter(|p| p.site == "SFO" && p.wait_min.is_some()).count() as u64;
    let uncalled = plan.iter().filter(|p| p.site == "SFO" && p.wait_min.is_none()).count() as u64;
    assert_eq!(
        counters
            .iter()
            .map(|r| (r["group"].as_str().unwrap_or(""), r["visits"].as_u64()))
            .collect::<Vec<_>>(),
        [("SFO/-", Some(uncalled)), ("SFO/C1", Some(called))]
    );
    let by_days = fleet.rows("group_by=counter&site=SFO&from=2026-10-29&to=2026-11-02").await;
    assert_eq!(by_days, counters);
    // Staff likewise, from the staff rollups and from days.
    let staff = fleet.rows("group_by=staff&site=SFO").await;
    assert_eq!(
        staff
            .iter()
            .map(|r| (r["group"].as_str().unwrap_or(""), r["visits"].as_u64()))
            .collect::<Vec<_>>(),
        [("-", Some(uncalled)), ("alice", Some(called))]
    );
    assert_eq!(fleet.rows("group_by=staff&site=SFO&from=2026-10-29&to=2026-11-02").await, staff);
    // By service at one site, and filtered to one service.
    let services = fleet.rows("group_by=service&site=TYO").await;
    for row in &services {
        let service = row["group"].as_str().expect("test data").trim_start_matches("TYO/");
        let want = expected(plan.iter().filter(|p| p.site == "TYO" && p.service == service));
        assert_eq!(actual(row), want, "TYO/{service}");
    }
    assert_eq!(services[0]["service_level_pct"], Value::Null, "ACC has no KPI");
    let gen_only = fleet.rows("group_by=site&service=GEN&site=CHI").await;
    assert_eq!(
        actual(&gen_only[0]),
        expected(plan.iter().filter(|p| p.site == "CHI" && p.service == "GEN"))
    );
    // CSV carries the same numbers.
    let (_, csv) = fleet.get("/api/v1/stats/visits?group_by=site&format=csv").await;
    let sfo = expected(plan.iter().filter(|p| p.site == "SFO"));
    let line = csv.lines().find(|l| l.starts_with("SFO,")).expect("SFO line");
    assert!(
        line.starts_with(&format!("SFO,,{},{},{},", sfo.visits, sfo.served, sfo.no_shows))
            && line.contains(&format!(",{},{},{},", sfo.p50_ms, sfo.p90_ms, sfo.max_ms)),
        "{line}"
    );
}

async fn backfill(store: Arc<dyn Store>) {
    let fleet = fleet(store).await;
    let plan = plan();
    let days = days();
    // SFO and CHI stream day by day, and statistics are read each day; TYO is offline for the
    // first three days.
    let mut next = HashMap::from([("SFO", 1u64), ("CHI", 1), ("TYO", 1)]);
    for day in &days[..3] {
        for site in ["SFO", "CHI"] {
            let seq = fleet.stream(site, next[site], day.succ_opt()).await;
            next.insert(site, seq);
        }
        fleet.catch_up().await;
        let rows = fleet.rows("group_by=site").await;
        assert_eq!(
            rows.iter().map(|r| r["group"].as_str().expect("test data")).collect::<Vec<_>>(),
            ["CHI", "SFO"]
        );
    }
    let before_tyo = fleet.rollups().await;
    // TYO reconnects: three days of backlog, one batch of which arrives twice (its ack was lost).
    let tyo = &fleet.streams["TYO"];
    let backlog_end = tyo
        .iter()
        .position(|e| matches!(e, AgentEvent::VisitCreated(c) if c.business_day >= days[3]))
        .expect("test data");
    let first = testing::incoming(&tyo[..40], 1, Utc::now());
    let agent = fleet.agents["TYO"];
    fleet.store.ingest_events(agent, &first, Utc::now()).await.expect("store").expect("ingest");
    fleet.catch_up().await;
    // The resend overlaps what was stored and projected: nothing is counted twice.
    let resent = testing::incoming(&tyo[..backlog_end], 1, Utc::now());
    for chunk in resent.chunks(40) {
        fleet.store.ingest_events(agent, chunk, Utc::now()).await.expect("store").expect("ingest");
    }
    fleet.store.ingest_events(agent, &first, Utc::now()).await.expect("store").expect("ingest");
    next.insert("TYO", backlog_end as u64 + 1);
    for site in ["SFO", "CHI", "TYO"] {
        fleet.stream(site, next[site], None).await;
    }
    fleet.catch_up().await;

    // Every day of every site is right, TYO's three late days included.
    let daily = every_site_day_is_exact(&fleet, &plan).await;
    let totals = fleet.rows("group_by=site").await;
    for row in &totals {
        let site = row["group"].as_str().expect("test data");
        assert_eq!(actual(row), expected(plan.iter().filter(|p| p.site == site)), "{site}");
    }
    let after = fleet.rollups().await;
    assert_ne!(after, before_tyo, "the backfill changed the rollups");
    let visits = fleet.store.visit_facts(&Default::default()).await.expect("facts").len();
    assert_eq!(visits, plan.len(), "one fact per visit");

    // The rollups equal a recomputation from the raw events.
    fleet.store.reset_facts().await.expect("reset");
    assert_eq!(fleet.rows("group_by=site").await, Vec::<Value>::new());
    fleet.catch_up().await;
    assert_eq!(fleet.rollups().await, after, "rollups == recomputation from raw events");
    assert_eq!(fleet.rows("group_by=site").await, totals);
    assert_eq!(fleet.rows("group_by=site&interval=day").await, daily);
}

#[tokio::test]
async fn a_known_workload_gives_exact_statistics_on_sqlite() {
    known_answers(store::open(&testing::fresh_sqlite_url()).await.expect("sqlite")).await;
}

#[tokio::test]
async fn a_known_workload_gives_exact_statistics_on_postgres() {
    let url = testing::fresh_postgres_url().await;
    known_answers(store::open(&url).await.expect("postgres")).await;
}

#[tokio::test]
async fn a_three_day_backfill_is_corrected_and_never_double_counted_on_sqlite() {
    backfill(store::open(&testing::fresh_sqlite_url()).await.expect("sqlite")).await;
}

#[tokio::test]
async fn a_three_day_backfill_is_corrected_and_never_double_counted_on_postgres() {
    let url = testing::fresh_postgres_url().await;
    backfill(store::open(&url).await.expect("postgres")).await;
}
