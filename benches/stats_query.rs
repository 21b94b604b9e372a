//! Statistics query benchmark: the goal is that a statistics query over one year × 100 sites ×
//! 1,000 visits a day answers in under 200 ms at the 95th percentile.
//!
//! On a fresh PostgreSQL database opened through the product's store, it configures the sites
//! (each with three services with a KPI and their queues) through `config_admin::change`, loads
//! one calendar year of visit facts server-side (`INSERT … SELECT … FROM generate_series`, one
//! statement per month, deterministic pseudo-random arrivals, services, waits, outcomes,
//! counters and staff), marks every site-day dirty and lets the product's own
//! `refresh_rollups` build the daily and monthly rollups. Then it times `stats::query::rows`
//! (validation, `query::run` and the rows) for five requests and, optionally, the first one
//! through the admin HTTP API, and prints the data size, load and rollup times and p50/p95/max of
//! each query against the goal.
//!
//! `cargo bench --bench stats_query` runs the full scale (36.5 M facts, ≈ 10 GB in PostgreSQL;
//! the database is dropped at the end). Parameters:
//! - `MERIDIAN_BENCH_SCALE` (default 1): sites × visits per day scale by it (at least 2 sites
//!   and 10 visits a day); `0.01` is a smoke run of a few seconds. The year stays a whole year.
//! - `MERIDIAN_BENCH_SITES`: the number of sites, overriding the scale's (e.g. 10 sites at full
//!   density, for profiling per-row costs).
//! - `MERIDIAN_BENCH_RUNS` (default 30, 5 below scale 0.1): timed runs per query, after 3
//!   warm-up runs.
//! - `MERIDIAN_BENCH_HTTP` (`0` skips the HTTP API run).
//! - `MERIDIAN_BENCH_KEEP=1` keeps the database (its name is printed);
//!   `MERIDIAN_BENCH_REUSE=<database>` skips configuration and loading and queries that kept
//!   database again (pending migrations run when the store opens it).

#[allow(dead_code)]
mod common;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chrono::{Datelike, NaiveDate};
use common::{env_flag, env_number, filesystem_of, init_tracing, machine_info};
use futures::{StreamExt, TryStreamExt};
use meridian_controller::config_admin::{self, ChangeMode, ResourceInput};
use meridian_controller::stats::query::{self, StatsRequest};
use meridian_controller::stats::report::{GroupBy, Interval};
use meridian_controller::store::{self, Role, Store};
use meridian_controller::testing;
use meridian_shared::config::ConfigSet;
use sqlx::{Connection, PgConnection};

/// The calendar year of the data.
const YEAR: i32 = 2025;
/// The goal, at the 95th percentile.
const GOAL_MS: f64 = 200.0;
/// Full-scale data set.
const FULL_SITES: f64 = 100.0;
const FULL_VISITS_PER_DAY: f64 = 1_000.0;
/// Sites take their zone from this list in turn.
const ZONES: [&str; 6] = [
    "America/Los_Angeles",
    "America/Chicago",
    "America/New_York",
    "Europe/London",
    "Europe/Berlin",
    "Asia/Tokyo",
];
/// (service, queue, queue letter, KPI wait in minutes, share of visits in percent).
const SERVICES: [(&str, &str, &str, u32, u32); 3] = [
    ("GEN", "general", "A", 10, 50),
    ("ACC", "accounts", "B", 15, 30),
    ("LOA", "loans", "C", 20, 20),
];
/// Site-days recomputed per `refresh_rollups` call (the projector's batch).
const REFRESH_BATCH: u32 = 100;
/// Month chunks loaded at the same time (one connection each).
const LOAD_PARALLEL: usize = 2;
/// Estimated bytes PostgreSQL needs per visit fact (heap, indexes, rollups, headroom).
const BYTES_PER_FACT: u64 = 330;
const WARMUP_RUNS: usize = 3;

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stats query benchmark FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Params {
    scale: f64,
    sites: usize,
    visits_per_day: usize,
    runs: usize,
    http: bool,
    keep: bool,
    reuse: Option<String>,
}

impl Params {
    fn from_env() -> Result<Self> {
        let scale = match std::env::var("MERIDIAN_BENCH_SCALE") {
            Ok(v) => v
                .parse::<f64>()
                .with_context(|| format!("MERIDIAN_BENCH_SCALE must be a number, not {v:?}"))?,
            Err(_) => 1.0,
        };
        ensure!(scale > 0.0 && scale <= 10.0, "MERIDIAN_BENCH_SCALE must be in (0, 10]");
        let sites = match env_number("MERIDIAN_BENCH_SITES")? {
            Some(n) => n,
            None => ((FULL_SITES * scale).round() as usize).max(2),
        };
        ensure!(sites <= 999, "at most 999 sites (S000..S998)");
        let visits_per_day = ((FULL_VISITS_PER_DAY * scale).round() as usize).max(10);
        let runs = env_number("MERIDIAN_BENCH_RUNS")?.unwrap_or(if scale < 0.1 { 5 } else { 30 });
        ensure!(runs >= 1, "MERIDIAN_BENCH_RUNS must be at least 1");
        let http = std::env::var("MERIDIAN_BENCH_HTTP").map_or(true, |v| v != "0");
        let reuse = std::env::var("MERIDIAN_BENCH_REUSE").ok().filter(|v| !v.is_empty());
        Ok(Params {
            scale,
            sites,
            visits_per_day,
            runs,
            http,
            keep: env_flag("MERIDIAN_BENCH_KEEP")? || reuse.is_some(),
            reuse,
        })
    }

    fn days(&self) -> u64 {
        (last_day() - first_day()).num_days() as u64 + 1
    }

    fn facts(&self) -> u64 {
        self.sites as u64 * self.visits_per_day as u64 * self.days()
    }

    fn site_codes(&self) -> Vec<String> {
        (0..self.sites).map(|i| format!("S{i:03}")).collect()
    }
}

fn first_day() -> NaiveDate {
    NaiveDate::from_ymd_opt(YEAR, 1, 1).unwrap_or_default()
}

fn last_day() -> NaiveDate {
    NaiveDate::from_ymd_opt(YEAR, 12, 31).unwrap_or_default()
}

fn date(month: u32, day: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(YEAR, month, day).unwrap_or_default()
}

async fn run() -> Result<()> {
    let params = Params::from_env()?;
    println!(
        "Meridian statistics query benchmark{}",
        if params.scale < 1.0 { " (reduced scale: goal not judged)" } else { "" }
    );
    println!("machine: {}", machine_info());

    let (db_url, db_name) = match &params.reuse {
        Some(name) => {
            let admin = testing::postgres_admin_url();
            let (base, _) = admin.rsplit_once('/').unwrap_or((admin.as_str(), ""));
            (format!("{base}/{name}"), name.clone())
        }
        None => {
            let url = testing::fresh_postgres_url().await;
            let name = url.rsplit('/').next().unwrap_or_default().to_owned();
            (url, name)
        }
    };
    let mut pg = PgConnection::connect(&db_url)
        .await
        .with_context(|| format!("cannot connect to the benchmark database {db_name}"))?;
    println!("postgresql: {}", postgres_info(&mut pg).await?);
    let free = free_disk_bytes(&mut pg).await;

    let sites = params.site_codes();
    let started = Instant::now();
    let store = store::open(&db_url).await.context("opening the controller store")?;
    let opened = started.elapsed();

    if params.reuse.is_none() {
        println!(
            "data set: calendar year {YEAR} ({} days) x {} sites x {} visits/day = {} visit facts \
             (scale {}); sites in {} time zones, 3 services with KPIs (3 queues) per site, 4 \
             counters, 4 staff rotating across counters daily",
            params.days(),
            params.sites,
            params.visits_per_day,
            params.facts(),
            params.scale,
            ZONES.len().min(params.sites),
        );
        let need = params.facts() * BYTES_PER_FACT + (1 << 30);
        match free {
            Some(free) => {
                println!(
                    "disk: {:.1} GiB free where PostgreSQL keeps its data; this run needs about \
                     {:.1} GiB",
                    gib(free),
                    gib(need)
                );
                ensure!(
                    free >= need,
                    "not enough free disk for {} facts: {:.1} GiB free, about {:.1} GiB needed \
                     (lower MERIDIAN_BENCH_SCALE)",
                    params.facts(),
                    gib(free),
                    gib(need)
                );
            }
            None => println!("disk: free space unknown (df failed); going ahead"),
        }
        let result = load(&params, &sites, store.as_ref(), &mut pg, &db_url, opened).await;
        if let Err(e) = result {
            drop_unless_kept(&params, pg, &db_name).await?;
            return Err(e);
        }
    } else {
        println!(
            "data set: reusing database {db_name} (store opened, migrations run: {opened:.2?})"
        );
        let pending = store.pending_rollups().await.context("pending rollups")?;
        if pending > 0 {
            let started = Instant::now();
            let done = drain_rollups(store.as_ref(), pending).await?;
            println!(
                "rollups: {done} site-days still pending recomputed in {:.1} s = {:.1} ms per \
                 site-day",
                started.elapsed().as_secs_f64(),
                started.elapsed().as_secs_f64() * 1000.0 / done.max(1) as f64
            );
            sqlx::query("ANALYZE rollup_day, rollup_month")
                .execute(&mut pg)
                .await
                .context("analyzing the rollups")?;
        }
    }

    let result = measure(&params, store.clone(), &mut pg).await;
    drop(store);
    drop_unless_kept(&params, pg, &db_name).await?;
    result
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0 * 1024.0)
}

async fn drop_unless_kept(params: &Params, pg: PgConnection, db_name: &str) -> Result<()> {
    pg.close().await.context("closing the benchmark database")?;
    if params.keep {
        println!(
            "database kept: {db_name} (MERIDIAN_BENCH_REUSE={db_name} queries it again; drop it \
             with DROP DATABASE {db_name})"
        );
        Ok(())
    } else {
        drop_database(db_name).await
    }
}

// ---------- configuration and data ----------

async fn load(
    params: &Params,
    sites: &[String],
    store: &dyn Store,
    pg: &mut PgConnection,
    db_url: &str,
    opened: Duration,
) -> Result<()> {
    let started = Instant::now();
    configure(store, sites).await?;
    println!(
        "setup: store opened and migrated in {:.2} s; {} sites configured ({} resources) in {:.2} s",
        opened.as_secs_f64(),
        sites.len(),
        sites.len() * (1 + 2 * SERVICES.len()),
        started.elapsed().as_secs_f64()
    );

    let layout = prepare_partitions(pg).await?;
    println!("visit_facts layout: {layout}");

    let started = Instant::now();
    let months: Vec<u32> = (1..=12).collect();
    let chunk_times: Vec<(u32, Duration, u64)> = futures::stream::iter(months)
        .map(|m| load_month(db_url, params, sites, m))
        .buffer_unordered(LOAD_PARALLEL)
        .try_collect()
        .await?;
    let load_time = started.elapsed();
    let inserted: u64 = chunk_times.iter().map(|(_, _, n)| n).sum();
    ensure!(inserted == params.facts(), "inserted {inserted} facts, expected {}", params.facts());
    let slowest = chunk_times.iter().map(|(_, d, _)| *d).max().unwrap_or_default();
    println!(
        "load: {inserted} visit facts in {:.1} s = {:.0} facts/s (12 monthly INSERT … SELECT \
         statements, {LOAD_PARALLEL} at a time; slowest month {:.1} s)",
        load_time.as_secs_f64(),
        inserted as f64 / load_time.as_secs_f64(),
        slowest.as_secs_f64()
    );

    let started = Instant::now();
    sqlx::query("VACUUM (ANALYZE) visit_facts")
        .execute(&mut *pg)
        .await
        .context("vacuuming visit_facts")?;
    println!(
        "vacuum analyze visit_facts (what autovacuum would do after the load): {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let marked = sqlx::query(
        "INSERT INTO rollup_dirty (site, day) \
         SELECT s, to_char(d, 'YYYY-MM-DD') FROM unnest($1::text[]) AS s \
         CROSS JOIN generate_series($2::date, $3::date, interval '1 day') AS d \
         ON CONFLICT DO NOTHING",
    )
    .bind(sites)
    .bind(first_day())
    .bind(last_day())
    .execute(&mut *pg)
    .await
    .context("marking every site-day dirty")?
    .rows_affected();
    let done = drain_rollups(store, marked).await?;
    let refresh_time = started.elapsed();
    ensure!(done as u64 == marked, "refresh_rollups recomputed {done} site-days, {marked} marked");
    println!(
        "rollups: {done} site-days recomputed by store.refresh_rollups({REFRESH_BATCH}) until it \
         returned 0, in {:.1} s = {:.1} ms per site-day",
        refresh_time.as_secs_f64(),
        refresh_time.as_secs_f64() * 1000.0 / done.max(1) as f64
    );
    sqlx::query("ANALYZE rollup_day, rollup_month")
        .execute(&mut *pg)
        .await
        .context("analyzing the rollups")?;
    Ok(())
}

/// Calls `refresh_rollups` until it returns 0 (retrying a failed call, as the projector does,
/// up to 10 times in a row); returns how many site-days it recomputed.
async fn drain_rollups(store: &dyn Store, pending: u64) -> Result<usize> {
    let started = Instant::now();
    let step = (pending as usize / 10).max(1);
    let (mut done, mut next_report, mut failures) = (0usize, step, 0);
    loop {
        let n = match store.refresh_rollups(REFRESH_BATCH).await {
            Ok(n) => n,
            Err(e) if failures < 10 => {
                failures += 1;
                eprintln!("  refresh_rollups failed ({e}); retrying in 2 s");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            Err(e) => return Err(e).context("refresh_rollups keeps failing"),
        };
        failures = 0;
        if n == 0 {
            return Ok(done);
        }
        done += n;
        if done >= next_report {
            eprintln!(
                "  rollups: {done}/{pending} site-days after {:.0} s",
                started.elapsed().as_secs_f64()
            );
            next_report += step;
        }
    }
}

async fn configure(store: &dyn Store, sites: &[String]) -> Result<()> {
    let mut inputs = Vec::with_capacity(sites.len() * 7);
    for (i, site) in sites.iter().enumerate() {
        let zone = ZONES[i % ZONES.len()];
        let mut docs = vec![serde_json::json!({
            "kind": "site", "code": site, "name": format!("Branch {site}"), "time_zone": zone,
        })];
        for (service, queue, letter, kpi, _) in SERVICES {
            docs.push(serde_json::json!({
                "kind": "queue", "site": site, "code": queue, "name": queue, "letter": letter,
            }));
            docs.push(serde_json::json!({
                "kind": "service", "site": site, "code": service, "name": service,
                "queue": queue, "kpi_wait_minutes": kpi,
            }));
        }
        for doc in docs {
            inputs.push(serde_json::from_value::<ResourceInput>(doc).context("resource JSON")?);
        }
    }
    config_admin::change(store, "bench", inputs, vec![], ChangeMode::Upsert)
        .await
        .context("configuring the sites")?;
    Ok(())
}

/// With the partitioned layout (migration 0004), creates the monthly partitions the year's
/// facts fall into (from the December before to the January after, since site-local days
/// straddle UTC months), as the controller would have created them while the data arrived.
async fn prepare_partitions(pg: &mut PgConnection) -> Result<String> {
    let partitioned: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = 'visit_facts'::regclass)",
    )
    .fetch_one(&mut *pg)
    .await?;
    if !partitioned {
        return Ok("one table (not partitioned)".into());
    }
    let has_fn: bool =
        sqlx::query_scalar("SELECT to_regproc('meridian_month_partition') IS NOT NULL")
            .fetch_one(&mut *pg)
            .await?;
    if has_fn {
        sqlx::query(
            "SELECT meridian_month_partition('visit_facts', 'created_at', CAST(m AS DATE)) \
             FROM generate_series($1::date, $2::date, interval '1 month') AS m",
        )
        .bind(date(1, 1) - chrono::Months::new(1))
        .bind(date(12, 1) + chrono::Months::new(1))
        .execute(&mut *pg)
        .await
        .context("creating the monthly partitions")?;
    }
    let partitions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_partition_tree('visit_facts') WHERE isleaf")
            .fetch_one(&mut *pg)
            .await?;
    Ok(format!(
        "partitioned by created_at, {partitions} partitions{}",
        if has_fn { " (the year's months created with meridian_month_partition)" } else { "" }
    ))
}

/// Inserts every visit of month `month` for every site in one statement; returns the month,
/// how long it took and how many rows it inserted.
///
/// Per site-day, `visits` arrivals spread evenly over 08:00–18:00 site-local time. Each visit's
/// random draws come from `hashint8extended` of (site, day, visit number), so the data are the
/// same in every run: service 50/30/20 %; outcome served 86 %, no-show 10 %, removed before a
/// call 2 %, closed at the end of the day uncalled 2 %; wait `60 min × u × v` (0–60 min, mean
/// 15, skewed short) for called visits; service 2–15 min; counter C1–C4 at random, the staff
/// member at a counter rotating daily; 3 % transferred, 5 % recalled.
async fn load_month(
    db_url: &str,
    params: &Params,
    sites: &[String],
    month: u32,
) -> Result<(u32, Duration, u64)> {
    let first = date(month, 1);
    let last = (first + chrono::Months::new(1)).pred_opt().unwrap_or(first);
    let zones: Vec<&str> = (0..sites.len()).map(|i| ZONES[i % ZONES.len()]).collect();
    let agents: Vec<String> = (0..sites.len())
        .map(|i| uuid::Uuid::from_u128(0x6d65_7269_6469_616e_0000_0000_0000_0000 + i as u128))
        .map(|u| u.to_string())
        .collect();
    let (gen_share, acc_share) = (SERVICES[0].4, SERVICES[0].4 + SERVICES[1].4);
    let mut conn = PgConnection::connect(db_url).await.context("connecting for the load")?;
    let started = Instant::now();
    let sql = format!(
        "WITH s AS ( \
           SELECT code, tz, agent, CAST(ord - 1 AS INT) AS si \
           FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS u(code, tz, agent, ord) \
         ), g AS ( \
           SELECT s.*, CAST(d AS DATE) AS day, CAST(d AS DATE) - DATE '2000-01-01' AS dayno, n, \
                  (CAST(s.si AS BIGINT) * 100000 + (CAST(d AS DATE) - DATE '2000-01-01')) * 100000 + n AS k \
           FROM s CROSS JOIN generate_series($4::date, $5::date, interval '1 day') AS d \
                  CROSS JOIN generate_series(0, $6::int - 1) AS n \
         ), r AS ( \
           SELECT g.*, \
             CAST(hashint8extended(k, 1) & 2147483647 AS FLOAT8) / 2147483648.0 AS u_arr, \
             CAST(hashint8extended(k, 2) & 2147483647 AS FLOAT8) / 2147483648.0 AS u_svc, \
             CAST(hashint8extended(k, 3) & 2147483647 AS FLOAT8) / 2147483648.0 AS u_out, \
             CAST(hashint8extended(k, 4) & 2147483647 AS FLOAT8) / 2147483648.0 AS u_w1, \
             CAST(hashint8extended(k, 5) & 2147483647 AS FLOAT8) / 2147483648.0 AS u_w2, \
             CAST(hashint8extended(k, 6) & 2147483647 AS FLOAT8) / 2147483648.0 AS u_ctr, \
             CAST(hashint8extended(k, 7) & 2147483647 AS FLOAT8) / 2147483648.0 AS u_srv, \
             CAST(hashint8extended(k, 8) & 2147483647 AS FLOAT8) / 2147483648.0 AS u_x \
           FROM g \
         ), t AS ( \
           SELECT r.*, \
             day + make_interval(secs => 28800 + floor((n + u_arr) * 36000.0 / $6)) AS local_ts, \
             CASE WHEN u_svc * 100 < {gen_share} THEN 1 WHEN u_svc * 100 < {acc_share} THEN 2 ELSE 3 END AS svc, \
             CASE WHEN u_out < 0.86 THEN 'served' WHEN u_out < 0.96 THEN 'no_show' \
                  WHEN u_out < 0.98 THEN 'removed' ELSE 'closed_at_end_of_day' END AS outcome, \
             CAST(floor(3600000 * u_w1 * u_w2) AS BIGINT) AS wait, \
             CAST(1 + floor(u_ctr * 4) AS INT) AS ctr, \
             CAST(120000 + floor(u_srv * 780000) AS BIGINT) AS svc_ms \
           FROM r \
         ), v AS ( \
           SELECT t.*, local_ts AT TIME ZONE tz AS created_at, outcome IN ('served', 'no_show') AS called \
           FROM t \
         ), w AS ( \
           SELECT v.*, lpad(to_hex(CAST(floor(extract(epoch FROM created_at) * 1000) AS BIGINT)), 12, '0') AS h \
           FROM v \
         ) \
         INSERT INTO visit_facts (visit_id, agent_id, site, ticket, service, queue, business_day, \
             created_at, created_local, first_called_at, ended_at, outcome, waiting_ms, service_ms, \
             counter, staff, transfers, recalls) \
         SELECT \
           substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-7' || lpad(to_hex(si), 3, '0') || '-8' \
             || lpad(to_hex(dayno % 4096), 3, '0') || '-' || lpad(to_hex(n), 12, '0'), \
           agent, code, ($9::text[])[svc] || lpad(CAST(n % 999 + 1 AS TEXT), 3, '0'), \
           ($7::text[])[svc], ($8::text[])[svc], to_char(day, 'YYYY-MM-DD'), \
           created_at, to_char(local_ts, 'YYYY-MM-DD\"T\"HH24:MI'), \
           CASE WHEN called THEN created_at + make_interval(secs => wait / 1000.0) END, \
           created_at + make_interval(secs => (wait + CASE outcome WHEN 'served' THEN svc_ms \
             WHEN 'no_show' THEN 60000 ELSE 0 END) / 1000.0), \
           outcome, \
           CASE WHEN called THEN wait END, \
           CASE WHEN outcome = 'served' THEN svc_ms ELSE 0 END, \
           CASE WHEN called THEN 'C' || ctr END, \
           CASE WHEN called THEN code || '_st' || CAST((ctr - 1 + dayno) % 4 + 1 AS TEXT) END, \
           CASE WHEN u_x < 0.03 THEN 1 ELSE 0 END, \
           CASE WHEN u_x >= 0.95 THEN 1 ELSE 0 END \
         FROM w"
    );
    let services: Vec<&str> = SERVICES.iter().map(|s| s.0).collect();
    let queues: Vec<&str> = SERVICES.iter().map(|s| s.1).collect();
    let letters: Vec<&str> = SERVICES.iter().map(|s| s.2).collect();
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(sites)
        .bind(&zones)
        .bind(&agents)
        .bind(first)
        .bind(last)
        .bind(params.visits_per_day as i32)
        .bind(&services)
        .bind(&queues)
        .bind(&letters)
        .execute(&mut conn)
        .await
        .with_context(|| format!("loading the facts of {YEAR}-{month:02}"))?
        .rows_affected();
    let elapsed = started.elapsed();
    eprintln!("  loaded {YEAR}-{month:02}: {rows} facts in {:.1} s", elapsed.as_secs_f64());
    conn.close().await.ok();
    Ok((month, elapsed, rows))
}

// ---------- measurements ----------

struct Case {
    label: &'static str,
    source: &'static str,
    req: StatsRequest,
}

fn cases(site: &str) -> Vec<Case> {
    let req = |group_by, interval, site: Option<&str>, from, to| StatsRequest {
        group_by,
        interval,
        site: site.map(str::to_owned),
        from: Some(from),
        to: Some(to),
        ..StatsRequest::default()
    };
    // A Monday-to-Sunday week in June.
    let monday = date(6, 2);
    let monday = monday - chrono::Days::new(u64::from(monday.weekday().num_days_from_monday()));
    vec![
        Case {
            label: "(a) whole year, group_by=site, all sites",
            source: "monthly rollups by service",
            req: req(GroupBy::Site, None, None, first_day(), last_day()),
        },
        Case {
            label: "(b) whole year, group_by=service, interval=week",
            source: "weekly + daily-edge rollups by service",
            req: req(GroupBy::Service, Some(Interval::Week), None, first_day(), last_day()),
        },
        Case {
            label: "(c) one month (June), group_by=site, interval=day",
            source: "daily rollups by service",
            req: req(GroupBy::Site, Some(Interval::Day), None, date(6, 1), date(6, 30)),
        },
        Case {
            label: "(d) one site, one week, interval=hour",
            source: "visit facts",
            req: req(
                GroupBy::Site,
                Some(Interval::Hour),
                Some(site),
                monday,
                monday + chrono::Days::new(6),
            ),
        },
        Case {
            label: "(e) Jan 15 - Dec 14, group_by=site, all sites",
            source: "monthly + daily-edge rollups by service",
            req: req(GroupBy::Site, None, None, date(1, 15), date(12, 14)),
        },
        Case {
            label: "(f) whole year, group_by=counter, all sites",
            source: "monthly rollups by counter",
            req: req(GroupBy::Counter, None, None, first_day(), last_day()),
        },
    ]
}

struct Timing {
    label: String,
    source: String,
    rows: usize,
    visits: u64,
    samples: Vec<Duration>,
}

impl Timing {
    fn percentile(&self, p: f64) -> f64 {
        let mut s = self.samples.clone();
        s.sort_unstable();
        let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
        s[rank - 1].as_secs_f64() * 1000.0
    }
}

async fn measure(params: &Params, store: Arc<dyn Store>, pg: &mut PgConnection) -> Result<()> {
    report_sizes(pg).await?;
    let (_, resources) = store.load_config().await.context("loading the configuration")?;
    let set = ConfigSet::from_resources(resources);
    let facts: i64 =
        sqlx::query_scalar("SELECT count(*) FROM visit_facts").fetch_one(&mut *pg).await?;
    let first_site = set.sites().map(|s| s.code.to_string()).min().context("no sites")?;

    let mut timings = Vec::new();
    for case in cases(&first_site) {
        let mut samples = Vec::with_capacity(params.runs);
        let mut shape = (0, 0);
        for i in 0..WARMUP_RUNS + params.runs {
            let started = Instant::now();
            let rows = query::rows(store.as_ref(), &set, &case.req)
                .await
                .with_context(|| format!("query {}", case.label))?;
            let elapsed = started.elapsed();
            if i >= WARMUP_RUNS {
                samples.push(elapsed);
            }
            shape = (rows.len(), rows.iter().map(|r| r.visits).sum::<u64>());
        }
        if ["(a)", "(b)", "(f)"].iter().any(|p| case.label.starts_with(p)) {
            ensure!(
                shape.1 == facts as u64,
                "{}: the rows add up to {} visits, the facts table holds {facts}",
                case.label,
                shape.1
            );
        }
        timings.push(Timing {
            label: case.label.to_owned(),
            source: case.source.to_owned(),
            rows: shape.0,
            visits: shape.1,
            samples,
        });
    }
    if params.http {
        let case = cases(&first_site).swap_remove(0);
        timings.push(http_timing(params, store.clone(), &case).await?);
    }

    println!(
        "queries: {} timed runs each after {WARMUP_RUNS} warm-up runs, one at a time, through \
         stats::query::rows (validation + query::run + rows; configuration loaded once)",
        params.runs
    );
    println!(
        "  {:<52} {:<30} {:>6} {:>10} {:>9} {:>9} {:>9}  goal p95 < {GOAL_MS:.0} ms",
        "query", "answered from", "rows", "visits", "p50 ms", "p95 ms", "max ms"
    );
    let mut missed = Vec::new();
    for t in &timings {
        let p95 = t.percentile(0.95);
        let verdict = match (params.scale >= 1.0, p95 < GOAL_MS) {
            (false, _) => "not judged (reduced scale)",
            (true, true) => "met",
            (true, false) => {
                missed.push(t.label.clone());
                "NOT met"
            }
        };
        println!(
            "  {:<52} {:<30} {:>6} {:>10} {:>9.1} {:>9.1} {:>9.1}  {verdict}",
            t.label,
            t.source,
            t.rows,
            t.visits,
            t.percentile(0.5),
            p95,
            t.percentile(1.0),
        );
    }
    if params.scale >= 1.0 {
        if missed.is_empty() {
            println!("goal (p95 < {GOAL_MS:.0} ms): met by every query");
        } else {
            println!(
                "goal (p95 < {GOAL_MS:.0} ms): NOT met by {} of {} queries: {}",
                missed.len(),
                timings.len(),
                missed.join("; ")
            );
        }
    }
    Ok(())
}

/// The first case through the admin API: a real listener on loopback, a viewer token, JSON.
async fn http_timing(params: &Params, store: Arc<dyn Store>, case: &Case) -> Result<Timing> {
    use meridian_controller::api::{self, ApiState};
    let (token, secret) = api::new_api_token("bench", Role::Viewer);
    store.insert_api_token(&token).await.context("creating an API token")?;
    let state = ApiState {
        store,
        metrics: Arc::new(meridian_controller::metrics::Metrics::default()),
        commands_changed: Arc::new(tokio::sync::watch::channel(0).0),
        clock_skew_tolerance: meridian_controller::Settings::default().clock_skew_tolerance(),
    };
    let router = api::router(state, 1 << 20);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding")?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let r = &case.req;
    let url = format!(
        "{base}/api/v1/stats/visits?group_by=site&from={}&to={}",
        r.from.unwrap_or_default(),
        r.to.unwrap_or_default()
    );
    let client = reqwest::Client::new();
    let mut samples = Vec::with_capacity(params.runs);
    let mut shape = (0, 0);
    for i in 0..WARMUP_RUNS + params.runs {
        let started = Instant::now();
        let resp = client.get(&url).bearer_auth(&secret).send().await.context("GET stats")?;
        let status = resp.status();
        let body = resp.bytes().await.context("reading the answer")?;
        let elapsed = started.elapsed();
        if !status.is_success() {
            bail!("GET {url}: {status}: {}", String::from_utf8_lossy(&body));
        }
        if i >= WARMUP_RUNS {
            samples.push(elapsed);
        }
        let rows: Vec<query_row::Row> = serde_json::from_slice(&body).context("answer JSON")?;
        shape = (rows.len(), rows.iter().map(|r| r.visits).sum());
    }
    server.abort();
    Ok(Timing {
        label: "(a) again, through GET /api/v1/stats/visits".into(),
        source: "monthly rollups by service (+ config, JSON)".into(),
        rows: shape.0,
        visits: shape.1,
        samples,
    })
}

mod query_row {
    /// The part of an API row the benchmark checks.
    #[derive(serde::Deserialize)]
    pub struct Row {
        pub visits: u64,
    }
}

async fn report_sizes(pg: &mut PgConnection) -> Result<()> {
    println!("data size:");
    for table in [
        "visit_facts",
        "rollup_day",
        "rollup_month",
        "rollup_service_day",
        "rollup_service_week",
        "rollup_service_month",
        "rollup_counter_month",
        "rollup_staff_month",
    ] {
        let (rows, bytes): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT (SELECT count(*) FROM {table}), \
             CAST(greatest(pg_total_relation_size('{table}'), \
                   (SELECT coalesce(sum(pg_total_relation_size(relid)), 0) \
                    FROM pg_partition_tree('{table}'))) AS BIGINT)"
        )))
        .fetch_one(&mut *pg)
        .await
        .with_context(|| format!("sizing {table}"))?;
        println!(
            "  {table:<20} {rows:>11} rows  {:>9.1} MiB (pg_total_relation_size with indexes, \
             partitions summed)",
            bytes as f64 / (1024.0 * 1024.0)
        );
    }
    let dead: Vec<(String, i64)> = sqlx::query_as(
        "SELECT relname::text, n_dead_tup FROM pg_stat_user_tables \
         WHERE relname LIKE 'rollup%' ORDER BY relname",
    )
    .fetch_all(&mut *pg)
    .await?;
    let dead: Vec<String> = dead.iter().map(|(t, n)| format!("{t} {n}")).collect();
    println!(
        "  dead row versions not yet vacuumed (pg_stat_user_tables; refresh_rollups rewrites the \
         weeks and months of the days it recomputes, once per batch): {}",
        dead.join(", ")
    );
    let per_day: Option<f64> = sqlx::query_scalar(
        "SELECT CAST(count(*) AS FLOAT8) / NULLIF(count(DISTINCT (site, day)), 0) FROM rollup_day",
    )
    .fetch_one(&mut *pg)
    .await?;
    let per_month: Option<f64> = sqlx::query_scalar(
        "SELECT CAST(count(*) AS FLOAT8) / NULLIF(count(DISTINCT (site, month)), 0) \
         FROM rollup_month",
    )
    .fetch_one(&mut *pg)
    .await?;
    let db: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
        .fetch_one(&mut *pg)
        .await?;
    println!(
        "  rollup rows per site-day {:.1}, per site-month {:.1}; whole database {:.2} GiB",
        per_day.unwrap_or(0.0),
        per_month.unwrap_or(0.0),
        gib(db as u64)
    );
    let (visits, served, no_shows, uncalled, wait_mean, wait_max): (i64, i64, i64, i64, f64, f64) =
        sqlx::query_as(
            "SELECT CAST(coalesce(sum(visits), 0) AS BIGINT), CAST(coalesce(sum(served), 0) AS BIGINT), \
             CAST(coalesce(sum(no_shows), 0) AS BIGINT), \
             CAST(coalesce(sum(visits - waited), 0) AS BIGINT), \
             coalesce(CAST(sum(wait_sum_ms) AS FLOAT8) / NULLIF(sum(waited), 0), 0) / 60000, \
             coalesce(CAST(max(wait_max_ms) AS FLOAT8), 0) / 60000 FROM rollup_month",
        )
        .fetch_one(&mut *pg)
        .await
        .context("summarising the rollups")?;
    let pct = |n: i64| 100.0 * n as f64 / visits.max(1) as f64;
    println!(
        "  spread (from the monthly rollups): {visits} visits, served {:.1} %, no-shows {:.1} %, \
         never called (removed, closed at end of day) {:.1} %; wait of called visits mean \
         {wait_mean:.1} min, max {wait_max:.1} min",
        pct(served),
        pct(no_shows),
        pct(uncalled)
    );
    Ok(())
}

// ---------- environment ----------

/// Free bytes on the filesystem of PostgreSQL's data directory (via `df`), if known.
async fn free_disk_bytes(pg: &mut PgConnection) -> Option<u64> {
    let dir: String = sqlx::query_scalar("SELECT current_setting('data_directory')")
        .fetch_one(&mut *pg)
        .await
        .unwrap_or_else(|_| "/".to_owned());
    let dir = if std::path::Path::new(&dir).exists() { dir } else { "/".to_owned() };
    let out = std::process::Command::new("df").args(["-Pk", &dir]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let kb: u64 = text.lines().nth(1)?.split_whitespace().nth(3)?.parse().ok()?;
    Some(kb * 1024)
}

async fn postgres_info(pg: &mut PgConnection) -> Result<String> {
    let version: String = sqlx::query_scalar("SHOW server_version").fetch_one(&mut *pg).await?;
    let mut settings = Vec::new();
    for name in ["shared_buffers", "work_mem", "effective_cache_size", "max_wal_size", "jit"] {
        let value: String =
            sqlx::query_scalar("SELECT current_setting($1)").bind(name).fetch_one(&mut *pg).await?;
        settings.push(format!("{name}={value}"));
    }
    let data_dir: Option<String> = sqlx::query_scalar("SELECT current_setting('data_directory')")
        .fetch_one(&mut *pg)
        .await
        .ok();
    let fs = data_dir.as_deref().map(filesystem_of).unwrap_or_else(|| "unknown".into());
    Ok(format!("{version} on the same machine ({}; data directory on {fs})", settings.join(", ")))
}

/// Drops the benchmark's database.
async fn drop_database(name: &str) -> Result<()> {
    ensure!(
        name.starts_with("meridian_t_")
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
        "refusing to drop unexpected database {name:?}"
    );
    let admin = testing::postgres_admin_url();
    let mut conn = PgConnection::connect(&admin)
        .await
        .with_context(|| format!("cannot connect to {admin} to drop {name}"))?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
        .execute(&mut conn)
        .await
        .with_context(|| format!("dropping the benchmark database {name}"))?;
    Ok(())
}
