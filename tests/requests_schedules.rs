//! End to end, time-triggered distribution rules with an injected clock: a real
//! controller on PostgreSQL and real agents (their own SQLite stores, gRPC sessions over
//! loopback) run in-process so the agents share one `ManualClock`.
//! - Follow the sun: SFO, TYO and PAR in their real time zones with business hours; across two
//!   simulated days every open request moves SFO → TYO at SFO's close, TYO → PAR at Tokyo's
//!   close and PAR → SFO at Paris's close; a closed request stays put.
//! - Archive: closed requests older than 30 days go to the archive site ARC with ownership and
//!   are deleted at the source (the mapping's `source_copy: delete`); newer or open ones stay.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use meridian_agent::Context;
use meridian_agent::requests::{self, NewRequest, RequestPatch};
use meridian_controller::config_admin::{self, ChangeMode, ResourceInput};
use meridian_controller::server::{Listeners, serve};
use meridian_controller::settings::Settings;
use meridian_controller::store::Store;
use meridian_shared::clock::ManualClock;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct World {
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
    agents: Vec<(String, Arc<Context>)>,
    shutdown: CancellationToken,
}

fn open_every_day() -> Value {
    ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        .iter()
        .map(|d| (d.to_string(), json!(["09:00-17:00"])))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn repair_type() -> Value {
    json!({"kind": "request_type", "code": "REPAIR", "name": "Repair", "fields": [
        {"name": "summary", "type": "text", "max_length": 120, "required": true},
        {"name": "status", "type": "enum", "values": ["open", "closed"], "default": "open"}
    ]})
}

impl World {
    async fn start(sites: &[(&str, &str)], extra: Vec<Value>, at: DateTime<Utc>) -> World {
        let url = meridian_controller::testing::fresh_postgres_url().await;
        let store = meridian_controller::store::open(&url).await.expect("store");
        let mut resources: Vec<Value> = sites
            .iter()
            .map(|(code, zone)| {
                json!({"kind": "site", "code": code, "name": format!("Site {code}"),
                       "time_zone": zone, "business_hours": open_every_day()})
            })
            .collect();
        resources.push(repair_type());
        resources.extend(extra);
        let inputs: Vec<ResourceInput> =
            resources.into_iter().map(|r| serde_json::from_value(r).expect("resource")).collect();
        config_admin::change(store.as_ref(), "test", inputs, vec![], ChangeMode::Upsert)
            .await
            .expect("configuration");
        let shutdown = CancellationToken::new();
        let gateway = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let api = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gateway_url = format!("http://{}", gateway.local_addr().expect("addr"));
        let settings = Settings { request_ledger_tick_ms: 100, ..Settings::default() };
        tokio::spawn(serve(settings, store.clone(), Listeners { api, gateway }, shutdown.clone()));
        let clock = Arc::new(ManualClock::new(at));
        let dir = meridian_controller::testing::temp_dir("meridian-requests-schedules");
        let mut agents = vec![];
        for (code, _) in sites {
            let token = enrollment_token(store.as_ref(), code).await;
            let settings = meridian_agent::Settings {
                controller_url: gateway_url.clone(),
                data_dir: dir.join(code),
                enrollment_token: token,
                heartbeat_ms: 500,
                backoff_base_ms: 50,
                backoff_cap_ms: 500,
                rule_sweep_ms: 25,
                ..meridian_agent::Settings::default()
            };
            let ctx = Context::open(&settings, clock.clone()).await.expect("agent");
            let http = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            tokio::spawn(meridian_agent::run_with(ctx.clone(), settings, http, shutdown.clone()));
            wait_for("the agent configured", || async { ctx.site_config().ok().map(|_| ()) }).await;
            agents.push((code.to_string(), ctx));
        }
        World { store, clock, agents, shutdown }
    }

    fn agent(&self, code: &str) -> &Arc<Context> {
        &self.agents.iter().find(|(c, _)| c == code).expect("site").1
    }

    async fn create(&self, site: &str, summary: &str, status: &str) -> String {
        let input = NewRequest {
            request_type: "REPAIR".into(),
            fields: serde_json::from_value(json!({"summary": summary, "status": status}))
                .expect("fields"),
        };
        let made = self
            .agent(site)
            .change(move |c, config, now| requests::create(c, config, &input, now))
            .await
            .expect("create");
        made.human_id
    }

    async fn close(&self, site: &str, id: &str) {
        let patch = RequestPatch {
            fields: serde_json::from_value(json!({"status": "closed"})).expect("patch"),
            expected_revision: None,
        };
        let id = id.to_owned();
        self.agent(site)
            .change(move |c, config, now| requests::update(c, config, &id, &patch, now))
            .await
            .expect("close");
    }

    /// Where `id`'s master is, and which sites hold a row for it.
    async fn whereabouts(&self, id: &str) -> (Vec<String>, Vec<String>) {
        let (mut masters, mut holders) = (vec![], vec![]);
        for (code, ctx) in &self.agents {
            let id = id.to_owned();
            if let Some(r) = ctx.db.read(move |c| requests::get(c, &id)).await.expect("read") {
                holders.push(code.clone());
                if r.distribution.master && r.distribution.pending_operation.is_none() {
                    masters.push(code.clone());
                }
            }
        }
        (masters, holders)
    }

    /// Sets the clock and waits until every agent's rule sweep has looked at the new time (each
    /// rule's next due time lies after it) and nothing is in flight.
    async fn advance_to(&self, at: DateTime<Utc>) {
        self.clock.set(at);
        for (code, ctx) in &self.agents {
            let timed = ctx.site_config().expect("configured").request_rules.iter().any(|r| {
                matches!(
                    r.trigger,
                    meridian_shared::rules::Trigger::Schedule { .. }
                        | meridian_shared::rules::Trigger::CloseOfBusiness
                )
            });
            if !timed {
                continue;
            }
            wait_for(&format!("{code}'s rule sweep at {at}"), || async {
                let due: Vec<Option<String>> = ctx
                    .db
                    .read(|c| {
                        let mut stmt = c.prepare("SELECT due_at FROM request_rule_schedule")?;
                        let rows = stmt
                            .query_map([], |r| r.get::<_, Option<String>>(0))?
                            .collect::<rusqlite::Result<Vec<_>>>()?;
                        Ok(rows)
                    })
                    .await
                    .expect("schedule");
                let swept = !due.is_empty()
                    && due.iter().all(|d| {
                        d.as_deref()
                            .and_then(|d| DateTime::parse_from_rfc3339(d).ok())
                            .is_some_and(|d| d.to_utc() > at)
                    });
                swept.then_some(())
            })
            .await;
        }
        self.settle().await;
    }

    /// Waits until no operation is open in the ledger and no site holds a request in flight.
    async fn settle(&self) {
        wait_for("the operations settled", || async {
            let open = self
                .store
                .list_request_ops(&meridian_controller::store::requests::OpsFilter {
                    status: Some("open".into()),
                    limit: 10,
                    ..Default::default()
                })
                .await
                .expect("ops");
            let mut in_flight = false;
            for (_, ctx) in &self.agents {
                let (high, acked) = ctx
                    .db
                    .read(meridian_agent::store::queries::outbox_state)
                    .await
                    .expect("outbox");
                let pending: i64 = ctx
                    .db
                    .read(|c| {
                        Ok(c.query_row(
                            "SELECT (SELECT COUNT(*) FROM requests WHERE pending_op IS NOT NULL) \
                             + (SELECT COUNT(*) FROM request_staged)",
                            [],
                            |r| r.get(0),
                        )?)
                    })
                    .await
                    .expect("pending");
                in_flight |= high != acked || pending > 0;
            }
            (open.is_empty() && !in_flight).then_some(())
        })
        .await;
    }
}

async fn enrollment_token(store: &dyn Store, site: &str) -> String {
    let token = meridian_controller::auth::new_secret("mrd_enr_");
    let now = Utc::now();
    store
        .insert_enrollment_token(&meridian_controller::store::EnrollmentToken {
            id: uuid::Uuid::new_v4().to_string(),
            site: meridian_shared::SiteCode::parse(site).expect("site"),
            token_hash: meridian_controller::auth::hash_secret(&token),
            created_at: now,
            expires_at: now + chrono::Duration::hours(1),
            used_at: None,
            used_by_agent: None,
        })
        .await
        .expect("token");
    token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_requests_follow_the_sun_for_two_days_and_closed_ones_stay_put() {
    let mapping = json!({"kind": "request_mapping", "code": "REPAIR", "name": "As is",
                         "source_type": "REPAIR", "target_type": "REPAIR", "duplicates": "overwrite"});
    let rule = json!({"kind": "request_rule", "code": "SUN", "name": "Follow the sun",
                      "request_type": "REPAIR", "trigger": {"on": "close_of_business"},
                      "condition": "fields.status == 'open'", "action": "transfer",
                      "mode": "ownership", "mapping": "REPAIR",
                      "target": {"follow_the_sun": ["SFO", "TYO", "PAR"]}});
    // Monday 23 November 2026, 18:00 UTC: 10:00 in San Francisco, 03:00 Tuesday in Tokyo,
    // 19:00 in Paris.
    let start = Utc.with_ymd_and_hms(2026, 11, 23, 18, 0, 0).unwrap();
    let world = World::start(
        &[("SFO", "America/Los_Angeles"), ("TYO", "Asia/Tokyo"), ("PAR", "Europe/Paris")],
        vec![mapping, rule],
        start,
    )
    .await;
    let open = world.create("SFO", "Open case", "open").await;
    let closed = world.create("SFO", "Solved case", "closed").await;
    world.advance_to(start).await;
    assert_eq!(world.whereabouts(&open).await.0, ["SFO"]);

    // Each site's close, in UTC: SFO 17:00 PST = 01:00, Tokyo 17:00 JST = 08:00, Paris
    // 17:00 CET = 16:00. Half an hour before each, nothing moves; at it, the open one does.
    let mut expected = "SFO";
    for day in [24, 25] {
        for (hour, next) in [(1, "TYO"), (8, "PAR"), (16, "SFO")] {
            let close = Utc.with_ymd_and_hms(2026, 11, day, hour, 0, 0).unwrap();
            world.advance_to(close - chrono::Duration::minutes(30)).await;
            assert_eq!(world.whereabouts(&open).await.0, [expected], "before the close at {close}");
            world.advance_to(close).await;
            let (masters, _) = world.whereabouts(&open).await;
            assert_eq!(masters, [next], "after the close at {close}");
            expected = next;
        }
    }
    let (masters, holders) = world.whereabouts(&closed).await;
    assert_eq!((masters, holders), (vec!["SFO".to_owned()], vec!["SFO".to_owned()]));
    // Six moves in two days, all with ownership and all applied.
    let ops = world
        .store
        .list_request_ops(&meridian_controller::store::requests::OpsFilter {
            request: Some(open.clone()),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("ops");
    assert_eq!(ops.len(), 6, "{ops:#?}");
    assert!(ops.iter().all(|o| o.status == "applied" && o.rule.as_deref() == Some("SUN")));
    let ctx = world.agent("SFO").clone();
    let id = open.clone();
    let history = ctx.db.read(move |c| requests::get(c, &id)).await.expect("read").expect("at SFO");
    let route: Vec<String> = history
        .distribution
        .history
        .iter()
        .map(|m| format!("{}>{}", m.from_site, m.to_site))
        .collect();
    assert_eq!(route, ["SFO>TYO", "TYO>PAR", "PAR>SFO", "SFO>TYO", "TYO>PAR", "PAR>SFO"]);
    world.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closed_requests_older_than_thirty_days_move_to_the_archive_and_leave_the_source() {
    let mapping = json!({"kind": "request_mapping", "code": "ARCHIVE", "name": "To the archive",
                         "source_type": "REPAIR", "target_type": "REPAIR", "source_copy": "delete"});
    let rule = json!({"kind": "request_rule", "code": "ARCHIVE", "name": "Archive closed requests",
                      "request_type": "REPAIR", "sites": ["SFO"],
                      "trigger": {"on": "schedule", "cron": "0 2 * * *"},
                      "condition": "fields.status == 'closed' && now - request.updated_at > duration('720h')",
                      "action": "transfer", "mode": "ownership", "mapping": "ARCHIVE",
                      "target": {"site": "ARC"}, "update": "never"});
    let start = Utc.with_ymd_and_hms(2026, 11, 2, 18, 0, 0).unwrap();
    let world = World::start(
        &[("SFO", "America/Los_Angeles"), ("ARC", "America/Chicago")],
        vec![mapping, rule],
        start,
    )
    .await;
    let old = world.create("SFO", "Closed long ago", "open").await;
    world.close("SFO", &old).await;
    let open = world.create("SFO", "Still open", "open").await;
    world.advance_to(start).await;

    // 25 days later (the nightly run has been missed while nothing ran: it runs once).
    world.advance_to(start + chrono::Duration::days(25)).await;
    let recent = world.create("SFO", "Closed recently", "open").await;
    world.close("SFO", &recent).await;
    assert_eq!(world.whereabouts(&old).await.0, ["SFO"], "25 days is not old enough");

    world.advance_to(start + chrono::Duration::days(31)).await;
    assert_eq!(world.whereabouts(&old).await, (vec!["ARC".to_owned()], vec!["ARC".to_owned()]));
    assert_eq!(world.whereabouts(&recent).await.1, ["SFO"]);
    assert_eq!(world.whereabouts(&open).await.1, ["SFO"]);
    let owner = world.store.request_ownership(&old).await.expect("owner").expect("known");
    assert_eq!(owner.master_site.as_deref(), Some("ARC"));
    assert!(owner.copies.is_empty(), "the source deleted its copy: {owner:?}");
    world.shutdown.cancel();
}
