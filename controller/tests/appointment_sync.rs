//! The nightly bulk sync of appointments at the controller, on SQLite and PostgreSQL:
//! - the scheduler, driven by an injected clock in five-minute ticks across the spring and the
//!   autumn daylight-saving changes, requests each site's sync at its own local time, once a
//!   day (New York at 02:00, which does not exist on the spring night; Los Angeles at 01:30,
//!   which happens twice on the autumn night; Tokyo at 02:00, no daylight saving), and two
//!   replicas ticking at the same instants on one PostgreSQL database request each run once;
//! - a sync's lifecycle: the command in the agent's log, the snapshot taken at the first fetch
//!   (the site's days by the clock, in chunks, with the command log mark), a resumed fetch
//!   reading exactly the same chunks although bookings changed meanwhile, another agent
//!   refused, the agent's report ending it once (chunks dropped), a newer request superseding
//!   an open one; and the admin API's manual trigger with its 4xx answers.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use meridian_controller::appointments::sync::{snapshot_plan, tick};
use meridian_controller::config_admin::{self, ChangeMode, ResourceInput};
use meridian_controller::store::appointment_sync::SyncState;
use meridian_controller::store::appointments::{NewAppointment, Placement};
use meridian_controller::store::{self, IncomingEvent, Store};
use meridian_controller::testing::{enroll_agent, fresh_postgres_url, fresh_sqlite_url};
use meridian_shared::appointments::{AppointmentSnapshot, decode_chunk};
use meridian_shared::commands::ControllerCommand;
use meridian_shared::config::ConfigSet;
use meridian_shared::events::{AgentEvent, AppointmentsSynced};
use meridian_shared::{AppointmentId, Code, SiteCode};
use serde_json::json;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).expect("time").with_timezone(&Utc)
}

/// NYC (New York, 02:00), LAX (Los Angeles, 01:30), TYO (Tokyo, default 02:00), each with a
/// bookable service and an enrolled agent.
async fn configure(store: &dyn Store) {
    let mut resources = vec![];
    for (site, zone, sync) in [
        ("NYC", "America/New_York", Some("02:00")),
        ("LAX", "America/Los_Angeles", Some("01:30")),
        ("TYO", "Asia/Tokyo", None),
    ] {
        let mut s = json!({"kind": "site", "code": site, "name": site, "time_zone": zone,
            "business_hours": {"mon": ["09:00-17:00"], "tue": ["09:00-17:00"], "wed": ["09:00-17:00"],
                               "thu": ["09:00-17:00"], "fri": ["09:00-17:00"], "sat": ["09:00-17:00"],
                               "sun": ["09:00-17:00"]}});
        if let Some(t) = sync {
            s["appointment_sync"] = json!({"at": t, "days_ahead": 1});
        }
        resources.push(s);
        resources.push(json!({"kind": "queue", "site": site, "code": "general", "name": "General", "letter": "A"}));
        resources.push(json!({"kind": "service", "site": site, "code": "ACC", "name": "Accounts",
            "queue": "general", "appointments": {"slot_minutes": 15, "capacity": 3}}));
    }
    let inputs: Vec<ResourceInput> =
        resources.into_iter().map(|r| serde_json::from_value(r).expect("resource")).collect();
    config_admin::change(store, "test", inputs, vec![], ChangeMode::Upsert).await.expect("config");
    for site in ["NYC", "LAX", "TYO"] {
        enroll_agent(store, site).await.expect("enroll");
    }
}

/// Ticks every five minutes from `from` to `to` (one tick per instant on each of `replicas`,
/// concurrently); returns each run as (site, instant).
async fn drive(
    replicas: &[Arc<dyn Store>],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Vec<(String, DateTime<Utc>)> {
    let mut runs = vec![];
    let mut now = from;
    while now < to {
        let ticks = replicas.iter().map(|s| tick(s.as_ref(), now));
        for requested in futures::future::join_all(ticks).await {
            for sync in requested.expect("tick") {
                assert_eq!(sync.reason, "scheduled");
                runs.push((sync.site.to_string(), now));
            }
        }
        now += Duration::minutes(5);
    }
    runs.sort();
    runs
}

fn expected(rows: &[(&str, &str)]) -> Vec<(String, DateTime<Utc>)> {
    let mut v: Vec<_> = rows.iter().map(|(s, t)| (s.to_string(), at(t))).collect();
    v.sort();
    v
}

async fn scheduler_runs_each_site_at_its_local_time_once(replicas: Vec<Arc<dyn Store>>) {
    configure(replicas[0].as_ref()).await;
    // Spring: New York and Los Angeles move to daylight time on Sunday 2026-03-08 at 02:00.
    let spring = drive(&replicas, at("2026-03-07T00:00:00Z"), at("2026-03-10T00:00:00Z")).await;
    assert_eq!(
        spring,
        expected(&[
            ("NYC", "2026-03-07T07:00:00Z"), // 02:00 EST
            ("NYC", "2026-03-08T07:00:00Z"), // 02:00 does not exist: 03:00 EDT
            ("NYC", "2026-03-09T06:00:00Z"), // 02:00 EDT
            ("LAX", "2026-03-07T09:30:00Z"), // 01:30 PST
            ("LAX", "2026-03-08T09:30:00Z"), // 01:30 PST, half an hour before the jump
            ("LAX", "2026-03-09T08:30:00Z"), // 01:30 PDT
            ("TYO", "2026-03-07T17:00:00Z"), // 02:00 JST on the 8th
            ("TYO", "2026-03-08T17:00:00Z"),
            ("TYO", "2026-03-09T17:00:00Z"),
        ])
    );
    // Autumn: back to standard time on Sunday 2026-11-01 at 02:00 (01:00-02:00 twice). The
    // schedule was left due in March: the first tick runs every site once to catch up.
    let autumn = drive(&replicas, at("2026-10-31T00:00:00Z"), at("2026-11-03T00:00:00Z")).await;
    assert_eq!(
        autumn,
        expected(&[
            ("NYC", "2026-10-31T00:00:00Z"),
            ("LAX", "2026-10-31T00:00:00Z"),
            ("TYO", "2026-10-31T00:00:00Z"),
            ("NYC", "2026-10-31T06:00:00Z"), // 02:00 EDT
            ("NYC", "2026-11-01T07:00:00Z"), // 02:00 EST (after the repeated hour)
            ("NYC", "2026-11-02T07:00:00Z"),
            ("LAX", "2026-10-31T08:30:00Z"), // 01:30 PDT
            ("LAX", "2026-11-01T08:30:00Z"), // the first 01:30 only, not 09:30Z as well
            ("LAX", "2026-11-02T09:30:00Z"), // 01:30 PST
            ("TYO", "2026-10-31T17:00:00Z"),
            ("TYO", "2026-11-01T17:00:00Z"),
            ("TYO", "2026-11-02T17:00:00Z"),
        ])
    );
    // Each run put one APPOINTMENTS_SYNC in the site's agent's log, superseding the last.
    let syncs = replicas[0].list_appointment_syncs(None, 1000).await.expect("syncs");
    assert_eq!(syncs.len(), 21);
    assert_eq!(syncs.iter().filter(|s| s.state == SyncState::Requested).count(), 3);
    assert_eq!(syncs.iter().filter(|s| s.state == SyncState::Superseded).count(), 18);
}

#[tokio::test]
async fn the_nightly_schedule_follows_each_site_across_daylight_saving_on_sqlite() {
    let store = store::open(&fresh_sqlite_url()).await.expect("store");
    scheduler_runs_each_site_at_its_local_time_once(vec![store]).await;
}

#[tokio::test]
async fn the_nightly_schedule_runs_once_across_two_replicas_on_postgres() {
    let url = fresh_postgres_url().await;
    let a = store::open(&url).await.expect("replica a");
    let b = store::open(&url).await.expect("replica b");
    scheduler_runs_each_site_at_its_local_time_once(vec![a, b]).await;
}

fn book(site: &str, local: &str, at: DateTime<Utc>) -> NewAppointment {
    let local = chrono::NaiveDateTime::parse_from_str(local, "%Y-%m-%dT%H:%M").expect("local");
    // Tokyo is UTC+9 all year.
    let starts_at = Utc.from_utc_datetime(&(local - Duration::hours(9)));
    NewAppointment {
        id: AppointmentId::new(),
        site: SiteCode::parse(site).expect("site"),
        service: Code::parse("ACC").expect("service"),
        placement: Placement { starts_at, local_start: local, duration_minutes: 15, capacity: 3 },
        customer_name: format!("Customer at {local}"),
        customer_contact: None,
        notes: None,
        external_ref: None,
        at,
    }
}

fn decode_all(
    chunks: &[meridian_controller::store::appointment_sync::StoredChunk],
) -> Vec<AppointmentSnapshot> {
    chunks
        .iter()
        .flat_map(|c| decode_chunk(c.index, &c.payload, &c.sha256).expect("chunk"))
        .collect()
}

async fn a_sync_snapshots_once_resumes_identically_and_ends_once(store: Arc<dyn Store>) {
    configure(store.as_ref()).await;
    let now = at("2026-03-09T01:00:00Z"); // 10:00 in Tokyo on the 9th
    let day = |d: &str| d.parse::<NaiveDate>().expect("day");
    for local in ["2026-03-09T11:00", "2026-03-09T11:15", "2026-03-10T09:00", "2026-03-11T09:00"] {
        store.book_appointment(&book("TYO", local, now), None).await.expect("book");
    }
    let tyo = SiteCode::parse("TYO").expect("site");
    let agent = store.list_agents().await.expect("agents").into_iter().find(|a| a.site == tyo);
    let agent = agent.expect("TYO agent");
    let requested = store.request_appointment_sync(&tyo, "manual", now).await.expect("request");
    assert_eq!(requested.len(), 1);
    let sync = &requested[0];
    assert_eq!((sync.state, sync.agent_id), (SyncState::Requested, agent.id));
    let log = store.commands_after(agent.id, 0, 100).await.expect("log");
    let last = log.last().expect("a command");
    match ControllerCommand::decode(&last.kind, &last.payload) {
        Ok(ControllerCommand::SyncAppointments(r)) => assert_eq!(r.sync_id, sync.id),
        other => panic!("expected APPOINTMENTS_SYNC, got {other:?}"),
    }

    let set = ConfigSet::from_resources(store.load_config().await.expect("config").1);
    let plan = snapshot_plan(&set, &tyo, now, 1).expect("plan");
    assert_eq!((plan.today, plan.to_day()), (day("2026-03-09"), day("2026-03-10")));
    let manifest = store.fetch_appointment_sync(sync.id, agent.id, &plan, 0).await.expect("fetch");
    assert_eq!((manifest.chunks, manifest.appointments), (3, 3));
    assert_eq!(manifest.as_of_command_seq, last.seq);
    assert_eq!((manifest.from_day, manifest.to_day), (day("2026-03-09"), day("2026-03-10")));
    let first = store.appointment_sync_chunks(sync.id, 0, 10).await.expect("chunks");
    let snapshot = decode_all(&first);
    let starts: Vec<&str> = snapshot.iter().map(|a| a.start.as_str()).collect();
    assert_eq!(starts, ["2026-03-09T11:00", "2026-03-09T11:15", "2026-03-10T09:00"]);
    assert!(snapshot.iter().all(|a| a.queue == Some(Code::parse("general").expect("queue"))));

    // A booking after the snapshot does not change it: a resumed fetch reads the same chunks.
    store.book_appointment(&book("TYO", "2026-03-10T10:00", now), None).await.expect("book");
    let later = snapshot_plan(&set, &tyo, now + Duration::hours(1), 1).expect("plan");
    let again = store.fetch_appointment_sync(sync.id, agent.id, &later, 2).await.expect("resume");
    assert_eq!(again, manifest);
    let rest = store.appointment_sync_chunks(sync.id, 2, 10).await.expect("chunks");
    assert_eq!(rest, first[2..].to_vec());
    let other = store
        .list_agents()
        .await
        .expect("agents")
        .into_iter()
        .find(|a| a.site.as_str() == "NYC")
        .expect("NYC agent");
    let refused = store.fetch_appointment_sync(sync.id, other.id, &plan, 0).await;
    assert!(matches!(refused, Err(meridian_controller::error::Error::NotFound(_))), "{refused:?}");
    let record = store.appointment_sync(sync.id).await.expect("get").expect("sync");
    assert_eq!((record.state, record.resumed, record.chunks_served), (SyncState::Sending, 1, 4));

    // The agent's report ends it, in the ingest transaction, once.
    let report = AgentEvent::AppointmentsSynced(AppointmentsSynced {
        sync_id: sync.id,
        from_day: manifest.from_day,
        to_day: manifest.to_day,
        appointments: 3,
        chunks: 3,
        resumed: 1,
        at: now + Duration::minutes(1),
    });
    let event = |seq: u64| IncomingEvent {
        seq,
        kind: report.kind().into(),
        occurred_at: now,
        payload: String::from_utf8(report.payload()).expect("utf-8"),
        quarantine: None,
    };
    store.ingest_events(agent.id, &[event(1)], now).await.expect("ingest").expect("stored");
    store.ingest_events(agent.id, &[event(1)], now).await.expect("again").expect("stored");
    let done = store.appointment_sync(sync.id).await.expect("get").expect("sync");
    assert_eq!((done.state, done.appointments, done.resumed), (SyncState::Completed, Some(3), 1));
    assert!(store.appointment_sync_chunks(sync.id, 0, 10).await.expect("chunks").is_empty());
    let ended = store.fetch_appointment_sync(sync.id, agent.id, &plan, 0).await;
    assert!(matches!(ended, Err(meridian_controller::error::Error::Conflict(_))), "{ended:?}");

    // A newer request supersedes an open one and drops its snapshot.
    let one = store.request_appointment_sync(&tyo, "manual", now).await.expect("one");
    store.fetch_appointment_sync(one[0].id, agent.id, &plan, 0).await.expect("fetch");
    let two = store.request_appointment_sync(&tyo, "scheduled", now).await.expect("two");
    let one_now = store.appointment_sync(one[0].id).await.expect("get").expect("sync");
    assert_eq!(one_now.state, SyncState::Superseded);
    assert!(store.appointment_sync_chunks(one[0].id, 0, 10).await.expect("chunks").is_empty());
    assert_eq!(two[0].state, SyncState::Requested);
    let listed = store.list_appointment_syncs(Some(&tyo), 10).await.expect("list");
    let states: BTreeMap<_, _> = listed.iter().map(|s| (s.id, s.state)).collect();
    assert_eq!(states.len(), 3);
}

#[tokio::test]
async fn a_sync_snapshots_once_resumes_identically_and_ends_once_on_sqlite() {
    a_sync_snapshots_once_resumes_identically_and_ends_once(
        store::open(&fresh_sqlite_url()).await.expect("store"),
    )
    .await;
}

#[tokio::test]
async fn a_sync_snapshots_once_resumes_identically_and_ends_once_on_postgres() {
    let url = fresh_postgres_url().await;
    a_sync_snapshots_once_resumes_identically_and_ends_once(
        store::open(&url).await.expect("store"),
    )
    .await;
}

/// The manual trigger over HTTP and through meridianctl: 202 with one sync per agent, typed
/// 4xx for a malformed or unknown site, a site without an agent and a viewer token; the list
/// and one sync; meridianctl's `sync` and `syncs` tables.
#[tokio::test]
async fn admins_trigger_a_sync_by_hand_and_list_syncs() {
    use std::future::IntoFuture;

    use meridian_controller::api::{self, ApiState};
    use meridian_controller::ctl::{Client, CtlError, Output, appointments as appt};
    use meridian_controller::store::Role;
    let store = store::open(&fresh_sqlite_url()).await.expect("store");
    configure(store.as_ref()).await;
    let site = json!({"kind": "site", "code": "EMP", "name": "No agent", "time_zone": "UTC"});
    let inputs = vec![serde_json::from_value::<ResourceInput>(site).expect("resource")];
    config_admin::change(store.as_ref(), "test", inputs, vec![], ChangeMode::Upsert)
        .await
        .expect("config");
    let admin = meridian_controller::server::ensure_bootstrap_token(store.as_ref(), None)
        .await
        .expect("token")
        .expect("first token");
    let (token, viewer) = api::new_api_token("viewer", Role::Viewer);
    store.insert_api_token(&token).await.expect("viewer token");
    let state = ApiState {
        store: store.clone(),
        metrics: Arc::new(meridian_controller::metrics::Metrics::default()),
        commands_changed: Arc::new(tokio::sync::watch::channel(0).0),
        clock_skew_tolerance: meridian_controller::Settings::default().clock_skew_tolerance(),
    };
    let clock = Arc::new(meridian_shared::clock::ManualClock::new(at("2026-03-09T01:00:00Z")));
    let router = api::router_with_clock(state, 1 << 20, clock);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(axum::serve(listener, router).into_future());
    let client = Client::new(&server, Some(admin.clone())).expect("client");

    let synced = appt::request_sync(&client, "TYO").await.expect("sync");
    assert_eq!(synced.len(), 1);
    assert_eq!((synced[0].site.as_str(), synced[0].reason.as_str()), ("TYO", "manual"));
    assert_eq!(synced[0].state, SyncState::Requested);
    let refused = |site: &'static str| {
        let client = &client;
        async move {
            match appt::request_sync(client, site).await {
                Err(CtlError::Api(f)) => (f.status, f.code),
                other => panic!("expected a refusal for {site}, got {other:?}"),
            }
        }
    };
    assert_eq!(refused("no such site").await, (422, "validation_failed".into()));
    assert_eq!(refused("XXX").await, (404, "not_found".into()));
    assert_eq!(refused("EMP").await, (409, "no_agent".into()));
    let as_viewer = Client::new(&server, Some(viewer)).expect("viewer client");
    match appt::request_sync(&as_viewer, "TYO").await {
        Err(CtlError::Api(f)) => assert_eq!(f.status, 403),
        other => panic!("a viewer may not trigger a sync: {other:?}"),
    }
    let listed = appt::syncs(&as_viewer, Some("TYO")).await.expect("viewers read");
    assert_eq!(listed.iter().map(|s| s.id).collect::<Vec<_>>(), [synced[0].id]);
    assert!(appt::syncs(&client, None).await.expect("all").len() == 1);
    let table = appt::render_syncs(&listed, Output::Table).expect("table");
    let header = table.lines().next().unwrap_or_default();
    assert!(header.starts_with("SYNC") && header.contains("STATE"), "{table}");
    assert!(table.lines().nth(1).is_some_and(|l| l.contains("TYO") && l.contains("requested")));
    let one: serde_json::Value = reqwest::Client::new()
        .get(format!("{server}/api/v1/appointments/syncs/{}", synced[0].id))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("show")
        .json()
        .await
        .expect("json");
    assert_eq!(one["state"], "requested");
    let missing = reqwest::Client::new()
        .get(format!("{server}/api/v1/appointments/syncs/not-a-uuid"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("show");
    assert_eq!(missing.status(), 404);

    // The binary.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meridianctl"))
        .args(["--server", &server, "--token", &admin, "appointments", "sync", "NYC"])
        .env_remove("MERIDIAN_SERVER")
        .env_remove("MERIDIAN_TOKEN")
        .output()
        .await
        .expect("run meridianctl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.lines().nth(1).is_some_and(|l| l.contains("NYC") && l.contains("manual")));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meridianctl"))
        .args(["--server", &server, "--token", &admin, "appointments", "sync", "XXX"])
        .env_remove("MERIDIAN_SERVER")
        .env_remove("MERIDIAN_TOKEN")
        .output()
        .await
        .expect("run meridianctl");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not_found"));
}
