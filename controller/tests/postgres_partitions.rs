//! PostgreSQL only: the monthly time partitions of `events`, `visit_facts` and
//! `transaction_facts` (migration 0004), their creation ahead of time and retention by dropping
//! whole partitions, checked in the catalog. Requires PostgreSQL (provisioned by `make test`).

use std::path::Path;

use chrono::{DateTime, Datelike, Duration, TimeZone, Utc};
use meridian_controller::store::maintenance::RetentionPolicy;
use meridian_controller::store::stats::StatsStore;
use meridian_controller::store::{Enrollment, EnrollmentToken, IncomingEvent, PgStore, Store};
use meridian_shared::events::{AgentEvent, VisitEventKind};
use meridian_shared::visits::Outcome;
use meridian_shared::{AgentId, SiteCode, VisitId};
use sqlx::PgPool;

const PARTITIONED: [&str; 3] = ["events", "visit_facts", "transaction_facts"];

fn at(year: i32, month: u32, day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(year, month, day, 9, 0, 0).single().expect("valid time")
}

/// The partitions of `table`, by name.
async fn partitions(pool: &PgPool, table: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = CAST($1 AS regclass) ORDER BY 1",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .expect("partitions")
}

async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("count {table}: {e}"))
}

fn month_name(table: &str, t: DateTime<Utc>) -> String {
    format!("{table}_p{:04}_{:02}", t.year(), t.month())
}

async fn enroll(store: &dyn Store) -> AgentId {
    let token = EnrollmentToken {
        id: "t".into(),
        site: SiteCode::parse("SFO").expect("site"),
        token_hash: "hash-t".into(),
        created_at: Utc::now(),
        expires_at: Utc::now() + Duration::hours(1),
        used_at: None,
        used_by_agent: None,
    };
    store.insert_enrollment_token(&token).await.expect("token");
    let agent = store
        .enroll(Enrollment {
            token_hash: "hash-t".into(),
            agent_id: AgentId::new(),
            credential_hash: "cred".into(),
            hostname: "host".into(),
            version: "1.0.0".into(),
            expected_revision: 0,
            initial_config: b"{}".to_vec(),
            sync_appointments: false,
            at: Utc::now(),
        })
        .await
        .expect("enroll");
    agent.id
}

/// Ingests one served visit created at `t` (all its events occur at `t`); returns its id.
async fn visit_at(store: &dyn Store, agent: AgentId, t: DateTime<Utc>) -> String {
    let visit = VisitId::new();
    let events = meridian_controller::testing::visit_events(
        visit,
        t,
        &[
            (VisitEventKind::Called, 5, None, None),
            (VisitEventKind::Ended, 10, Some(Outcome::Served), Some(60_000)),
        ],
    );
    ingest(store, agent, &events, t).await;
    visit.to_string()
}

async fn ingest(store: &dyn Store, agent: AgentId, events: &[AgentEvent], t: DateTime<Utc>) {
    let first = store.agent(agent).await.expect("agent").expect("exists").acked_seq + 1;
    let incoming: Vec<IncomingEvent> = meridian_controller::testing::incoming(events, first, t);
    store.ingest_events(agent, &incoming, t).await.expect("store").expect("ingest");
}

#[tokio::test]
async fn migration_partitions_the_tables_and_keeps_the_old_rows() {
    let url = meridian_controller::testing::fresh_postgres_url().await;
    let pool = PgPool::connect(&url).await.expect("connect");
    // The layout before 0004: run 0001–0003 only, from a copy of those files.
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/controller-postgres");
    let old = meridian_controller::testing::temp_dir("meridian-pre0004");
    for entry in std::fs::read_dir(&source).expect("migrations") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("name").to_string_lossy().into_owned();
        if name.as_str() < "0004" {
            std::fs::copy(&path, old.join(&name)).expect("copy migration");
        }
    }
    sqlx::migrate::Migrator::new(old.as_path())
        .await
        .expect("old migrations")
        .run(&pool)
        .await
        .expect("run 0001-0003");
    let months = [at(2024, 2, 29), at(2025, 12, 31) + Duration::hours(14), Utc::now()];
    for (i, t) in months.iter().enumerate() {
        sqlx::query(
            "INSERT INTO events (agent_id, seq, site, kind, occurred_at, received_at, payload) \
             VALUES ('a', $1, 'SFO', 'VISIT_CREATED', $2, $2, '{\"n\": 1}')",
        )
        .bind(i as i64 + 1)
        .bind(t)
        .execute(&pool)
        .await
        .expect("old event");
        sqlx::query(
            "INSERT INTO visit_facts (visit_id, agent_id, site, ticket, service, queue, \
             business_day, created_at, created_local, service_ms, transfers, recalls) \
             VALUES ($1, 'a', 'SFO', 'A001', 'GEN', 'general', '2024-02-29', $2, 'x', 0, 0, 0)",
        )
        .bind(format!("v{i}"))
        .bind(t)
        .execute(&pool)
        .await
        .expect("old visit fact");
        sqlx::query(
            "INSERT INTO transaction_facts (visit_id, n, agent_id, site, service, queue, place, \
             business_day, entered_at, entered_local, service_ms) \
             VALUES ($1, 0, 'a', 'SFO', 'GEN', 'general', 'queue:general', '2024-02-29', $2, 'x', 0)",
        )
        .bind(format!("v{i}"))
        .bind(t)
        .execute(&pool)
        .await
        .expect("old transaction fact");
    }

    let store = PgStore::connect(&url).await.expect("migrate to 0004");
    let pool = store.pool();
    let partitioned: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid \
         WHERE p.partstrat = 'r' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .expect("catalog");
    assert_eq!(partitioned, ["events", "transaction_facts", "visit_facts"]);
    for table in PARTITIONED {
        assert_eq!(count(pool, table).await, 3, "{table} keeps its rows");
        let parts = partitions(pool, table).await;
        for t in &months {
            let name = month_name(table, *t);
            assert!(parts.contains(&name), "{table}: {name} in {parts:?}");
            assert_eq!(count(pool, &name).await, 1, "{name} holds its month's row");
        }
        let now = Utc::now();
        for ahead in 1..=2 {
            let month = now.date_naive().with_day(1).expect("first") + chrono::Months::new(ahead);
            let name = format!("{table}_p{:04}_{:02}", month.year(), month.month());
            assert!(parts.contains(&name), "{table}: {name} created ahead in {parts:?}");
        }
        assert!(parts.contains(&format!("{table}_default")), "{parts:?}");
        assert_eq!(count(pool, &format!("{table}_default")).await, 0);
        assert!(!exists(pool, &format!("{table}_pre0004")).await, "nothing left behind");
    }
}

/// Whether `table` exists (`count` of a missing table panics).
async fn exists(pool: &PgPool, table: &str) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(pool)
        .await
        .expect("to_regclass")
}

#[tokio::test]
async fn partitions_are_created_ahead_idempotently_and_heal_the_default_partition() {
    let url = meridian_controller::testing::fresh_postgres_url().await;
    let store = PgStore::connect(&url).await.expect("store");
    let agent = enroll(&store).await;
    // A month without a partition yet: its rows land in the DEFAULT partition.
    visit_at(&store, agent, at(2030, 1, 15)).await;
    assert_eq!(count(store.pool(), "events_default").await, 3);
    assert_eq!(count(store.pool(), "visit_facts_default").await, 0, "not projected yet");

    let created = store.prepare_partitions(at(2029, 12, 3)).await.expect("prepare");
    let mut expected: Vec<String> = PARTITIONED
        .iter()
        .flat_map(|t| ["2029_12", "2030_01", "2030_02"].map(|m| format!("{t}_p{m}")))
        .collect();
    expected.sort();
    let mut sorted = created.clone();
    sorted.sort();
    assert_eq!(sorted, expected);
    assert_eq!(
        store.prepare_partitions(at(2029, 12, 31)).await.expect("again"),
        Vec::<String>::new()
    );
    assert_eq!(count(store.pool(), "events_default").await, 0, "moved out of DEFAULT");
    assert_eq!(count(store.pool(), "events_p2030_01").await, 3);
    assert_eq!(store.count_events(agent).await.expect("count"), 3);
    // The partition attached after the move has the primary key like every other.
    let has_pk: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = CAST('events_p2030_01' AS regclass) \
         AND indisprimary)",
    )
    .fetch_one(store.pool())
    .await
    .expect("pk");
    assert!(has_pk);
    meridian_controller::stats::catch_up(&store, &Default::default()).await.expect("project");
    assert_eq!(count(store.pool(), "visit_facts_p2030_01").await, 1);
    assert_eq!(count(store.pool(), "transaction_facts_p2030_01").await, 1);
}

#[tokio::test]
async fn retention_drops_whole_old_partitions_once_projected() {
    let url = meridian_controller::testing::fresh_postgres_url().await;
    let store = PgStore::connect(&url).await.expect("store");
    let pool = store.pool().clone();
    let agent = enroll(&store).await;
    store.prepare_partitions(at(2025, 1, 1)).await.expect("prepare");
    visit_at(&store, agent, at(2025, 1, 10)).await;
    let february = visit_at(&store, agent, at(2025, 2, 10)).await;
    meridian_controller::stats::catch_up(&store, &Default::default()).await.expect("project");

    // 30 days at 20 March: everything before 1 February goes.
    let policy = RetentionPolicy { events_days: 30, facts_days: 30 };
    let report = store.apply_retention(&policy, at(2025, 3, 20)).await.expect("retention");
    let mut dropped = report.partitions_dropped.clone();
    dropped.sort();
    assert_eq!(dropped, ["events_p2025_01", "transaction_facts_p2025_01", "visit_facts_p2025_01"]);
    assert_eq!((report.events_removed, report.facts_removed), (3, 2));
    for table in PARTITIONED {
        assert!(!exists(&pool, &format!("{table}_p2025_01")).await, "{table} January dropped");
        assert!(!partitions(&pool, table).await.contains(&format!("{table}_p2025_01")));
        assert_eq!(
            count(&pool, &format!("{table}_p2025_02")).await,
            if table == "events" { 3 } else { 1 }
        );
    }
    let facts = store.visit_facts(&Default::default()).await.expect("facts");
    assert_eq!(facts.iter().map(|f| f.visit_id.clone()).collect::<Vec<_>>(), [february]);

    // A partition still holding unprojected events is kept whole until they are projected.
    visit_at(&store, agent, at(2025, 2, 20)).await;
    let events_only = RetentionPolicy { events_days: 30, facts_days: 0 };
    let report = store.apply_retention(&events_only, at(2025, 4, 20)).await.expect("retention");
    assert_eq!((report.unprojected_kept, report.partitions_dropped.len()), (3, 0));
    assert_eq!(count(&pool, "events_p2025_02").await, 6);
    meridian_controller::stats::catch_up(&store, &Default::default()).await.expect("project");
    let report = store.apply_retention(&events_only, at(2025, 4, 20)).await.expect("retention");
    assert_eq!(report.partitions_dropped, ["events_p2025_02"]);
    assert!(!exists(&pool, "events_p2025_02").await);
    assert!(exists(&pool, "visit_facts_p2025_02").await, "facts kept forever");
    assert_eq!(store.count_events(agent).await.expect("count"), 0);
}
