//! Agent upgrade rollouts at the controller, on SQLite and PostgreSQL.
//!
//! - The whole story over real gRPC sessions: simulated agents enroll, hold sessions, receive
//!   `AGENT_UPGRADE` through their command logs and report `AGENT_UPGRADE_STATUS` events; the
//!   driver is ticked with an injected clock. The canary goes first and the rest only after it
//!   is healthy; no upgrade is sent (or outstanding) during a site's business hours, and it is
//!   sent when the window opens; an agent offline when its wave starts gets it on reconnect.
//! - Halting on failure with the other sites never commanded; pause / resume / abort; an
//!   expired window's command sent again at the next window; reports from strangers kept in
//!   quarantine; every bad input refused with nothing changed (API); the console page and
//!   `meridianctl rollouts` against a served controller.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use chrono::{DateTime, Duration, Utc};
use meridian_controller::api::{self, ApiState};
use meridian_controller::appointments::sync::ConfigCache;
use meridian_controller::config_admin::{self, ChangeMode, ResourceInput};
use meridian_controller::metrics::Metrics;
use meridian_controller::rollouts::{self, DriverSettings, TickReport};
use meridian_controller::server::{Listeners, ensure_bootstrap_token, serve};
use meridian_controller::settings::Settings;
use meridian_controller::store::{AgentRecord, EnrollmentToken, Role, Store};
use meridian_controller::testing::{
    self, ConsoleSignIn, enroll_agent, fresh_postgres_url, fresh_sqlite_url,
};
use meridian_proto::agent_gateway_client::AgentGatewayClient;
use meridian_proto::{
    AgentFrame, ControllerFrame, Event, EventBatch, agent_frame, controller_frame,
};
use meridian_shared::clock::{Clock, ManualClock};
use meridian_shared::commands::{ControllerCommand, UpgradeCommand};
use meridian_shared::events::{AgentEvent, UpgradePhase, UpgradeStatus};
use meridian_shared::{AgentId, SiteCode};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use uuid::Uuid;

const PLATFORM: &str = "x86_64-linux";
const WAIT: StdDuration = StdDuration::from_secs(20);

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).expect("time").with_timezone(&Utc)
}

/// SFO (Los Angeles), CHI (Chicago) and TYO (Tokyo) open on weekdays 09:00-17:00 local; PAR
/// (Paris) has no business hours; NYC has no agent. SFO and CHI carry the tag `us`.
fn config() -> Vec<ResourceInput> {
    let week: serde_json::Map<String, Value> = ["mon", "tue", "wed", "thu", "fri"]
        .iter()
        .map(|d| ((*d).to_owned(), json!(["09:00-17:00"])))
        .collect();
    [
        ("SFO", "America/Los_Angeles", true, json!(["us"])),
        ("CHI", "America/Chicago", true, json!(["us"])),
        ("TYO", "Asia/Tokyo", true, json!([])),
        ("PAR", "Europe/Paris", false, json!([])),
        ("NYC", "America/New_York", true, json!([])),
    ]
    .into_iter()
    .map(|(code, tz, hours, tags)| {
        let hours = if hours { Value::Object(week.clone()) } else { json!({}) };
        json!({"kind": "site", "code": code, "name": code, "time_zone": tz,
               "business_hours": hours, "tags": tags})
    })
    .map(|v| serde_json::from_value(v).expect("resource"))
    .collect()
}

/// Stores a release (version, platform) through the store, as an accepted upload does (the
/// rollout never reads the artifact; its one chunk only has the manifest's size).
async fn add_release(store: &dyn Store, version: &str, platform: &str) {
    let artifact = format!("agent {version} for {platform}").into_bytes();
    let key = meridian_shared::releases::PrivateKey::generate();
    let unsigned = meridian_shared::releases::UnsignedRelease::of_artifact(
        version,
        platform,
        "notes",
        &artifact[..],
    )
    .expect("release");
    let manifest = meridian_shared::releases::sign(&key, unsigned).expect("signed");
    let release = meridian_controller::store::releases::NewRelease {
        manifest,
        uploaded_by: "test".into(),
        uploaded_at: Utc::now(),
    };
    store.create_release(&release, &[artifact]).await.expect("release stored");
}

/// A store with the sites, releases 1.4.0 (x86_64-linux, aarch64-linux) and 1.2.0, tokens, the
/// API on a manual clock, and the driver's tick.
struct Fixture {
    url: String,
    store: Arc<dyn Store>,
    router: Router,
    clock: Arc<ManualClock>,
    metrics: Arc<Metrics>,
    admin: String,
    viewer: String,
    cache: ConfigCache,
}

impl Fixture {
    async fn start(url: &str, now: DateTime<Utc>) -> Fixture {
        let store: Arc<dyn Store> = meridian_controller::store::open(url).await.expect("store");
        config_admin::change(store.as_ref(), "test", config(), vec![], ChangeMode::Upsert)
            .await
            .expect("config");
        add_release(store.as_ref(), "1.4.0", PLATFORM).await;
        add_release(store.as_ref(), "1.4.0", "aarch64-linux").await;
        add_release(store.as_ref(), "1.2.0", PLATFORM).await;
        let admin =
            ensure_bootstrap_token(store.as_ref(), None).await.expect("bootstrap").expect("fresh");
        let (token, viewer) = api::new_api_token("dashboard", Role::Viewer);
        store.insert_api_token(&token).await.expect("viewer token");
        let metrics = Arc::new(Metrics::default());
        let clock = Arc::new(ManualClock::new(now));
        let state = ApiState {
            store: store.clone(),
            metrics: metrics.clone(),
            commands_changed: Arc::new(watch::channel(0).0),
            clock_skew_tolerance: meridian_controller::Settings::default().clock_skew_tolerance(),
        };
        let router = api::router_with_clock(state.clone(), 1 << 20, clock.clone())
            .merge(meridian_controller::console::router(state));
        Fixture {
            url: url.to_owned(),
            store,
            router,
            clock,
            metrics,
            admin,
            viewer,
            cache: ConfigCache::default(),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        testing::call_router(&self.router, method, path, token, body).await
    }

    async fn create(&self, body: Value) -> Value {
        let (status, v) =
            self.call(Method::POST, "/api/v1/rollouts", &self.admin, Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        v
    }

    async fn show(&self, id: &str) -> Value {
        let (status, v) =
            self.call(Method::GET, &format!("/api/v1/rollouts/{id}"), &self.viewer, None).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v
    }

    async fn post(&self, id: &str, action: &str) -> (StatusCode, Value) {
        self.call(Method::POST, &format!("/api/v1/rollouts/{id}/{action}"), &self.admin, None).await
    }

    async fn tick(&self) -> TickReport {
        rollouts::tick(
            self.store.as_ref(),
            &self.cache,
            DriverSettings { health_timeout_s: 120 },
            self.clock.now(),
        )
        .await
        .expect("tick")
    }

    fn set(&self, now: &str) {
        self.clock.set(at(now));
    }
}

/// Each site's state in a rollout view.
fn states(v: &Value) -> BTreeMap<String, String> {
    v["sites"]
        .as_array()
        .expect("sites")
        .iter()
        .map(|s| {
            (
                s["site"].as_str().unwrap_or("?").to_owned(),
                s["state"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect()
}

fn site<'a>(v: &'a Value, code: &str) -> &'a Value {
    v["sites"]
        .as_array()
        .expect("sites")
        .iter()
        .find(|s| s["site"] == code)
        .expect("site in rollout")
}

fn expect_states(v: &Value, want: &[(&str, &str)]) {
    let want: BTreeMap<String, String> =
        want.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect();
    assert_eq!(states(v), want, "{v:#}");
}

/// The `AGENT_UPGRADE` and `AGENT_UPGRADE_CANCEL` commands in an agent's log.
async fn upgrade_commands(store: &dyn Store, agent: AgentId) -> Vec<ControllerCommand> {
    store
        .commands_after(agent, 0, 1000)
        .await
        .expect("commands")
        .into_iter()
        .filter(|c| c.kind.starts_with("AGENT_UPGRADE"))
        .map(|c| ControllerCommand::decode(&c.kind, &c.payload).expect("decodes"))
        .collect()
}

fn upgrades(cmds: &[ControllerCommand]) -> Vec<&UpgradeCommand> {
    cmds.iter()
        .filter_map(|c| match c {
            ControllerCommand::Upgrade(u) => Some(u.as_ref()),
            _ => None,
        })
        .collect()
}

fn cancels(cmds: &[ControllerCommand]) -> usize {
    cmds.iter().filter(|c| matches!(c, ControllerCommand::CancelUpgrade(_))).count()
}

fn status(rollout: &str, phase: UpgradePhase, running: &str) -> UpgradeStatus {
    UpgradeStatus {
        rollout_id: rollout.parse().expect("rollout id"),
        version: "1.4.0".into(),
        running_version: running.into(),
        phase,
        reason: (phase == UpgradePhase::RolledBack).then(|| "the new binary exited at once".into()),
        at: Utc::now(),
    }
}

/// An agent enrolled through the store whose events the test feeds to `ingest_events`, as the
/// gateway does.
struct Fed {
    agent: AgentRecord,
    seq: u64,
}

impl Fed {
    async fn enroll(store: &dyn Store, site: &str, version: &str) -> Fed {
        let agent = enroll_agent(store, site).await.expect("enroll");
        store
            .update_agent_status(
                agent.id,
                &meridian_controller::store::AgentStatusUpdate {
                    connected: true,
                    version: Some(version.into()),
                    ..Default::default()
                },
            )
            .await
            .expect("version");
        Fed { agent, seq: 0 }
    }

    async fn report(&mut self, store: &dyn Store, s: UpgradeStatus) {
        let batch = testing::incoming(&[AgentEvent::UpgradeStatus(s)], self.seq + 1, Utc::now());
        store
            .ingest_events(self.agent.id, &batch, Utc::now())
            .await
            .expect("ingest")
            .expect("accepted");
        self.seq += 1;
    }
}

// ---------- the story over real sessions ----------

/// A simulated agent speaking the real gRPC session: records and acknowledges every command,
/// sends the events the test gives it.
struct SimAgent {
    site: String,
    agent_id: String,
    credential: String,
    gateway_url: String,
    commands: watch::Sender<Vec<(u64, ControllerCommand)>>,
    next_seq: u64,
    session: Option<SimSession>,
}

struct SimSession {
    out: mpsc::Sender<AgentFrame>,
    acked: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl SimAgent {
    async fn enroll(store: &dyn Store, gateway_url: &str, site: &str) -> SimAgent {
        let token = meridian_controller::auth::new_secret("mrd_enr_");
        let now = Utc::now();
        store
            .insert_enrollment_token(&EnrollmentToken {
                id: Uuid::new_v4().to_string(),
                site: SiteCode::parse(site).expect("site"),
                token_hash: meridian_controller::auth::hash_secret(&token),
                created_at: now,
                expires_at: now + Duration::hours(1),
                used_at: None,
                used_by_agent: None,
            })
            .await
            .expect("enrollment token");
        let mut client =
            AgentGatewayClient::connect(gateway_url.to_owned()).await.expect("gateway");
        let enrolled = client
            .enroll(meridian_proto::EnrollRequest {
                token,
                hostname: format!("sim-{site}"),
                version: "1.3.0".into(),
            })
            .await
            .expect("enroll")
            .into_inner();
        SimAgent {
            site: site.to_owned(),
            agent_id: enrolled.agent_id,
            credential: enrolled.credential,
            gateway_url: gateway_url.to_owned(),
            commands: watch::channel(Vec::new()).0,
            next_seq: 1,
            session: None,
        }
    }

    fn id(&self) -> AgentId {
        self.agent_id.parse().expect("agent id")
    }

    /// Opens a session running `version`, resuming after the last command it applied.
    async fn connect(&mut self, version: &str) {
        let last_applied = self.commands.borrow().last().map_or(0, |(seq, _)| *seq);
        let (out, out_rx) = mpsc::channel::<AgentFrame>(64);
        let frame = |body| AgentFrame { body: Some(body) };
        out.send(frame(agent_frame::Body::Hello(meridian_proto::Hello {
            agent_id: self.agent_id.clone(),
            site_code: self.site.clone(),
            version: version.to_owned(),
            config_revision: 0,
            last_applied_command_seq: last_applied,
            outbox_high_water: self.next_seq - 1,
            agent_time_ms: Utc::now().timestamp_millis(),
            ..Default::default()
        })))
        .await
        .expect("hello");
        let mut out_rx = out_rx;
        let mut request =
            tonic::Request::new(futures::stream::poll_fn(move |cx| out_rx.poll_recv(cx)));
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.credential).parse().expect("header"),
        );
        let mut client =
            AgentGatewayClient::connect(self.gateway_url.clone()).await.expect("gateway");
        let mut inbound = client.session(request).await.expect("session").into_inner();
        match tokio::time::timeout(WAIT, inbound.message()).await {
            Ok(Ok(Some(ControllerFrame { body: Some(controller_frame::Body::Welcome(_)) }))) => {}
            other => panic!("{}: expected Welcome, got {other:?}", self.site),
        }
        let (acked_tx, acked) = watch::channel(0u64);
        let commands = self.commands.clone();
        let replies = out.clone();
        let task = tokio::spawn(async move {
            while let Ok(Some(f)) = inbound.message().await {
                match f.body {
                    Some(controller_frame::Body::Command(c)) => {
                        let cmd = ControllerCommand::decode(&c.kind, &c.payload);
                        let error = cmd.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
                        if let Ok(cmd) = cmd {
                            commands.send_modify(|v| v.push((c.seq, cmd)));
                        }
                        let ack = meridian_proto::CommandAck { up_to_seq: c.seq, error };
                        let _ = replies.send(frame(agent_frame::Body::CommandAck(ack))).await;
                    }
                    Some(controller_frame::Body::EventAck(a)) => {
                        acked_tx.send_replace(a.up_to_seq);
                    }
                    Some(controller_frame::Body::Ping(p)) => {
                        let pong =
                            meridian_proto::Pong { nonce: p.nonce, sent_at_ms: p.sent_at_ms };
                        let _ = replies.send(frame(agent_frame::Body::Pong(pong))).await;
                    }
                    _ => {}
                }
            }
        });
        self.session = Some(SimSession { out, acked, task });
    }

    fn disconnect(&mut self) {
        if let Some(s) = self.session.take() {
            s.task.abort();
        }
    }

    /// Sends one event and waits until the controller acknowledged it.
    async fn report(&mut self, s: UpgradeStatus) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let session = self.session.as_mut().expect("connected");
        let ev = AgentEvent::UpgradeStatus(s);
        let batch = EventBatch {
            events: vec![Event {
                seq,
                kind: ev.kind().to_owned(),
                occurred_at_ms: Utc::now().timestamp_millis(),
                payload: ev.payload(),
            }],
        };
        session
            .out
            .send(AgentFrame { body: Some(agent_frame::Body::Events(batch)) })
            .await
            .expect("send events");
        tokio::time::timeout(WAIT, session.acked.wait_for(|a| *a >= seq))
            .await
            .unwrap_or_else(|_| panic!("{}: event {seq} not acknowledged", self.site))
            .expect("session alive");
    }

    /// Waits until the agent has received `n` upgrade commands; returns them.
    async fn wait_upgrades(&self, n: usize) -> Vec<UpgradeCommand> {
        let mut rx = self.commands.subscribe();
        let count = |v: &Vec<(u64, ControllerCommand)>| {
            v.iter().filter(|(_, c)| matches!(c, ControllerCommand::Upgrade(_))).count()
        };
        tokio::time::timeout(WAIT, rx.wait_for(|v| count(v) >= n))
            .await
            .unwrap_or_else(|_| panic!("{}: no {n} AGENT_UPGRADE within {WAIT:?}", self.site))
            .expect("sender alive");
        self.received()
    }

    fn received(&self) -> Vec<UpgradeCommand> {
        self.commands
            .borrow()
            .iter()
            .filter_map(|(_, c)| match c {
                ControllerCommand::Upgrade(u) => Some(u.as_ref().clone()),
                _ => None,
            })
            .collect()
    }
}

async fn story_over_real_sessions(url: &str) {
    // Monday 2026-03-09, 10:00 in San Francisco, 12:00 in Chicago, 02:00 Tuesday in Tokyo.
    let f = Fixture::start(url, at("2026-03-09T17:00:00Z")).await;
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gateway = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gateway_url = format!("http://{}", gateway.local_addr().expect("addr"));
    let shutdown = CancellationToken::new();
    // The served controller's own driver stays out of the way (the test ticks with its clock);
    // sessions look for new commands every 100 ms.
    let settings = Settings {
        rollout_tick_ms: 3_600_000,
        command_poll_ms: 100,
        heartbeat_ms: 1_000,
        ..Settings::default()
    };
    let served = tokio::spawn(serve(
        settings,
        f.store.clone(),
        Listeners { api, gateway },
        shutdown.clone(),
    ));

    let mut sfo = SimAgent::enroll(f.store.as_ref(), &gateway_url, "SFO").await;
    let mut chi = SimAgent::enroll(f.store.as_ref(), &gateway_url, "CHI").await;
    let mut tyo = SimAgent::enroll(f.store.as_ref(), &gateway_url, "TYO").await;
    sfo.connect("1.3.0").await;
    chi.connect("1.3.0").await;
    tyo.connect("1.3.0").await;
    // The versions the agents report are what the rollout plans from.
    let deadline = tokio::time::Instant::now() + WAIT;
    while f.store.list_agents().await.expect("agents").iter().any(|a| a.version != "1.3.0") {
        assert!(tokio::time::Instant::now() < deadline, "Hello versions not recorded");
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    }
    tyo.disconnect();

    let created = f
        .create(json!({"version": "1.4.0", "platform": PLATFORM,
                       "targets": {"sites": ["SFO", "CHI", "TYO"]}, "waves": [{"sites": 1}, {"rest": true}]}))
        .await;
    let id = created["id"].as_str().expect("id").to_owned();
    expect_states(&created, &[("SFO", "pending"), ("CHI", "pending"), ("TYO", "pending")]);
    assert_eq!(
        (created["state"].as_str(), created["wave_count"].as_u64()),
        (Some("running"), Some(2))
    );
    assert_eq!(site(&created, "SFO")["from_version"], "1.3.0");
    assert_eq!(site(&created, "SFO")["window"]["status"], "closed", "{created:#}");
    assert_eq!(site(&created, "SFO")["window"]["opens_at"], "2026-03-10T00:00:00Z");

    // Business hours at the canary: nothing is sent, nothing is outstanding.
    assert_eq!(f.tick().await, TickReport::default());
    for a in [&sfo, &chi, &tyo] {
        assert!(upgrade_commands(f.store.as_ref(), a.id()).await.is_empty(), "{}", a.site);
    }

    // 17:30 in San Francisco: the window opens; only the canary gets the upgrade, with the
    // end of its window (Tuesday 09:00 PDT) as switch_before.
    f.set("2026-03-10T00:30:00Z");
    assert_eq!(f.tick().await.upgrades_sent, 1);
    let got = sfo.wait_upgrades(1).await;
    assert_eq!(got[0].switch_before, at("2026-03-10T16:00:00Z"));
    assert_eq!(
        (got[0].release.version.as_str(), got[0].release.platform.as_str()),
        ("1.4.0", PLATFORM)
    );
    assert_eq!(got[0].rollout_id.to_string(), id);
    assert_eq!(got[0].health_timeout_s, 120);
    assert!(!got[0].allow_downgrade);
    assert!(
        upgrade_commands(f.store.as_ref(), chi.id()).await.is_empty(),
        "CHI waits for the canary"
    );
    // The agent's acknowledgement is recorded (the gateway may batch it for a moment).
    let deadline = tokio::time::Instant::now() + WAIT;
    while f.show(&id).await["sites"][0]["delivered"] != true {
        assert!(tokio::time::Instant::now() < deadline, "SFO's acknowledgement not recorded");
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    }
    // Progress does not start the next wave.
    for phase in [UpgradePhase::Downloading, UpgradePhase::Staged, UpgradePhase::Switching] {
        sfo.report(status(&id, phase, "1.3.0")).await;
        assert_eq!(f.tick().await, TickReport::default(), "{phase:?}");
    }
    expect_states(
        &f.show(&id).await,
        &[("SFO", "switching"), ("CHI", "pending"), ("TYO", "pending")],
    );
    // The canary restarts on the new version and reports healthy: the rest goes. CHI's
    // window is open (19:30 CDT), TYO's is not (09:30 JST on Tuesday).
    sfo.disconnect();
    sfo.connect("1.4.0").await;
    sfo.report(status(&id, UpgradePhase::Healthy, "1.4.0")).await;
    let report = f.tick().await;
    assert_eq!((report.upgrades_sent, report.rollouts_changed), (1, 1));
    let got = chi.wait_upgrades(1).await;
    assert_eq!(got[0].switch_before, at("2026-03-10T14:00:00Z"), "Tuesday 09:00 CDT");
    let v = f.show(&id).await;
    assert_eq!(v["current_wave"], 2);
    assert_eq!(site(&v, "TYO")["window"]["status"], "closed");
    assert!(
        upgrade_commands(f.store.as_ref(), tyo.id()).await.is_empty(),
        "Tokyo is open for business"
    );
    chi.report(status(&id, UpgradePhase::Healthy, "1.4.0")).await;
    assert_eq!(f.tick().await, TickReport::default());

    // 17:30 in Tokyo, with TYO offline: the upgrade goes into its command log, and it gets it
    // when it reconnects.
    f.set("2026-03-10T08:30:00Z");
    assert_eq!(f.tick().await.upgrades_sent, 1);
    assert_eq!(upgrades(&upgrade_commands(f.store.as_ref(), tyo.id()).await).len(), 1);
    assert!(tyo.received().is_empty());
    assert_eq!(site(&f.show(&id).await, "TYO")["delivered"], false);
    tyo.connect("1.3.0").await;
    let got = tyo.wait_upgrades(1).await;
    assert_eq!(got[0].switch_before, at("2026-03-11T00:00:00Z"), "Wednesday 09:00 JST");
    tyo.report(status(&id, UpgradePhase::Staged, "1.3.0")).await;
    tyo.report(status(&id, UpgradePhase::Healthy, "1.4.0")).await;
    let report = f.tick().await;
    assert_eq!(report.rollouts_changed, 1);
    let v = f.show(&id).await;
    assert_eq!(v["state"], "completed", "{v:#}");
    expect_states(&v, &[("SFO", "healthy"), ("CHI", "healthy"), ("TYO", "healthy")]);
    assert_eq!(v["site_counts"]["healthy"], 3);
    // Each agent got exactly one upgrade, and nothing else about the rollout.
    for a in [&sfo, &chi, &tyo] {
        let cmds = upgrade_commands(f.store.as_ref(), a.id()).await;
        assert_eq!((upgrades(&cmds).len(), cmds.len()), (1, 1), "{}", a.site);
    }
    // The sites are free for the next rollout.
    f.create(json!({"version": "1.4.0", "platform": "aarch64-linux", "targets": {"tag": "us"},
                    "allow_downgrade": true}))
        .await;

    for a in [&mut sfo, &mut chi, &mut tyo] {
        a.disconnect();
    }
    shutdown.cancel();
    tokio::time::timeout(StdDuration::from_secs(30), served)
        .await
        .expect("the controller stops")
        .expect("no panic")
        .expect("served cleanly");
}

#[tokio::test]
async fn canary_first_windows_and_an_offline_agent_over_real_sessions_on_sqlite() {
    story_over_real_sessions(&fresh_sqlite_url()).await;
}

#[tokio::test]
async fn canary_first_windows_and_an_offline_agent_over_real_sessions_on_postgres() {
    story_over_real_sessions(&fresh_postgres_url().await).await;
}

// ---------- halts, pause / resume / abort, windows, strangers ----------

/// A window open all day (equal ends).
fn all_day() -> Value {
    json!({"start": "00:00", "end": "00:00"})
}

async fn a_failure_halts_and_the_other_sites_are_never_commanded(url: &str) {
    let f = Fixture::start(url, at("2026-03-09T17:00:00Z")).await;
    let mut sfo = Fed::enroll(f.store.as_ref(), "SFO", "1.3.0").await;
    let chi = Fed::enroll(f.store.as_ref(), "CHI", "1.3.0").await;
    let tyo = Fed::enroll(f.store.as_ref(), "TYO", "1.3.0").await;
    let v = f
        .create(json!({"version": "1.4.0", "platform": PLATFORM, "targets": {"sites": ["SFO", "CHI", "TYO"]},
                       "waves": [{"sites": 1}, {"percent": 10}, {"rest": true}], "window": all_day(),
                       "max_failures": 0, "health_timeout_s": 300}))
        .await;
    let id = v["id"].as_str().expect("id").to_owned();
    assert_eq!(v["wave_count"], 3);
    assert_eq!(f.tick().await.upgrades_sent, 1);
    let sent = upgrade_commands(f.store.as_ref(), sfo.agent.id).await;
    assert_eq!(upgrades(&sent)[0].health_timeout_s, 300, "the rollout's own timeout");
    sfo.report(f.store.as_ref(), status(&id, UpgradePhase::Switching, "1.3.0")).await;
    sfo.report(f.store.as_ref(), status(&id, UpgradePhase::RolledBack, "1.3.0")).await;
    let v = f.show(&id).await;
    assert_eq!(site(&v, "SFO")["reason"], "the new binary exited at once");
    let report = f.tick().await;
    assert_eq!(
        (
            report.upgrades_sent,
            report.sites_skipped,
            report.sites_untouched,
            report.rollouts_changed
        ),
        (0, 0, 2, 1)
    );
    let v = f.show(&id).await;
    assert_eq!(v["state"], "halted", "{v:#}");
    assert!(
        v["halted_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("SFO rolled_back (the new binary exited at once)"),
        "{v:#}"
    );
    expect_states(&v, &[("SFO", "rolled_back"), ("CHI", "pending"), ("TYO", "pending")]);
    assert_eq!(site(&v, "CHI")["reason"], "not upgraded: the rollout was halted");
    for a in [&chi, &tyo] {
        assert!(upgrade_commands(f.store.as_ref(), a.agent.id).await.is_empty(), "never touched");
    }
    // A halted rollout is final: later ticks and actions change nothing.
    assert_eq!(f.tick().await, TickReport::default());
    let (status_code, e) = f.post(&id, "resume").await;
    assert_eq!(status_code, StatusCode::CONFLICT, "{e}");
    assert!(e["message"].as_str().unwrap_or_default().contains("is halted"), "{e}");
    // Its sites are free again.
    f.create(json!({"version": "1.2.0", "platform": PLATFORM, "targets": {"sites": ["CHI"]},
                    "allow_downgrade": true}))
        .await;
    // The metrics count rollouts per state and the sites of unfinished ones.
    f.metrics.set_rollout_summary(&f.store.rollout_summary().await.expect("summary"));
    let text = f.metrics.render();
    for line in [
        r#"meridian_controller_rollouts{state="halted"} 1"#,
        r#"meridian_controller_rollouts{state="running"} 1"#,
        r#"meridian_controller_rollouts{state="completed"} 0"#,
        r#"state="pending"} 1"#,
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(line) || l.contains(line)),
            "{line} missing from\n{text}"
        );
    }
    assert!(
        !text.contains(&format!("rollout=\"{id}\"")),
        "a halted rollout's sites are not shown\n{text}"
    );
}

#[tokio::test]
async fn a_failure_halts_and_the_other_sites_are_never_commanded_on_sqlite() {
    a_failure_halts_and_the_other_sites_are_never_commanded(&fresh_sqlite_url()).await;
}

#[tokio::test]
async fn a_failure_halts_and_the_other_sites_are_never_commanded_on_postgres() {
    a_failure_halts_and_the_other_sites_are_never_commanded(&fresh_postgres_url().await).await;
}

async fn pause_resume_and_abort(url: &str) {
    let f = Fixture::start(url, at("2026-03-09T17:00:00Z")).await;
    let mut sfo = Fed::enroll(f.store.as_ref(), "SFO", "1.3.0").await;
    let mut chi = Fed::enroll(f.store.as_ref(), "CHI", "1.3.0").await;
    let tyo = Fed::enroll(f.store.as_ref(), "TYO", "1.3.0").await;
    let v = f
        .create(json!({"version": "1.4.0", "platform": PLATFORM, "targets": {"sites": ["SFO", "CHI", "TYO"]},
                       "waves": [{"sites": 2}, {"rest": true}], "window": all_day()}))
        .await;
    let id = v["id"].as_str().expect("id").to_owned();
    // Paused before anything was sent: the driver sends nothing.
    let (code, v) = f.post(&id, "pause").await;
    assert_eq!((code, v["state"].as_str()), (StatusCode::OK, Some("paused")), "{v}");
    let (code, _) = f.post(&id, "pause").await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert_eq!(f.tick().await, TickReport::default());
    assert!(upgrade_commands(f.store.as_ref(), sfo.agent.id).await.is_empty());
    // A viewer cannot resume.
    let (code, _) =
        f.call(Method::POST, &format!("/api/v1/rollouts/{id}/resume"), &f.viewer, None).await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    let (code, v) = f.post(&id, "resume").await;
    assert_eq!((code, v["state"].as_str()), (StatusCode::OK, Some("running")), "{v}");
    assert_eq!(f.tick().await.upgrades_sent, 2);
    // The release cannot be deleted while the rollout uses it.
    let release = format!("/api/v1/releases/1.4.0/{PLATFORM}");
    let (code, e) = f.call(Method::DELETE, &release, &f.admin, None).await;
    assert_eq!(code, StatusCode::CONFLICT, "{e}");
    assert!(e.to_string().contains(&id), "the refusal names the rollout: {e}");
    sfo.report(f.store.as_ref(), status(&id, UpgradePhase::Staged, "1.3.0")).await;
    chi.report(f.store.as_ref(), status(&id, UpgradePhase::Switching, "1.3.0")).await;
    // Abort: SFO (staged) is cancelled, CHI (switching) is left to finish, TYO never touched.
    let (code, v) = f
        .call(
            Method::POST,
            &format!("/api/v1/rollouts/{id}/abort"),
            &f.admin,
            Some(json!({"reason": "bad week"})),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{v}");
    assert_eq!(
        (v["state"].as_str(), v["halted_reason"].as_str()),
        (Some("aborted"), Some("aborted by bootstrap: bad week"))
    );
    expect_states(&v, &[("SFO", "skipped"), ("CHI", "switching"), ("TYO", "pending")]);
    assert_eq!(site(&v, "TYO")["reason"], "not upgraded: the rollout was aborted");
    assert_eq!(site(&v, "SFO")["reason"], "upgrade cancelled: the rollout was aborted");
    assert!(site(&v, "SFO")["cancel_seq"].is_u64());
    let sfo_cmds = upgrade_commands(f.store.as_ref(), sfo.agent.id).await;
    assert_eq!((upgrades(&sfo_cmds).len(), cancels(&sfo_cmds)), (1, 1));
    assert_eq!(
        cancels(&upgrade_commands(f.store.as_ref(), chi.agent.id).await),
        0,
        "switching: no cancel"
    );
    assert!(upgrade_commands(f.store.as_ref(), tyo.agent.id).await.is_empty());
    for action in ["abort", "pause", "resume"] {
        let (code, e) = f.post(&id, action).await;
        assert_eq!(code, StatusCode::CONFLICT, "{action}: {e}");
    }
    // Aborted: the release may go (CHI's late report below still counts).
    let (code, e) = f.call(Method::DELETE, &release, &f.admin, None).await;
    assert_eq!(code, StatusCode::NO_CONTENT, "{e}");
    // The truth still arrives: CHI switched, and SFO's cancel came too late (it had switched).
    chi.report(f.store.as_ref(), status(&id, UpgradePhase::Healthy, "1.4.0")).await;
    sfo.report(f.store.as_ref(), status(&id, UpgradePhase::Downloading, "1.3.0")).await;
    expect_states(
        &f.show(&id).await,
        &[("SFO", "skipped"), ("CHI", "healthy"), ("TYO", "pending")],
    );
    sfo.report(f.store.as_ref(), status(&id, UpgradePhase::Healthy, "1.4.0")).await;
    expect_states(
        &f.show(&id).await,
        &[("SFO", "healthy"), ("CHI", "healthy"), ("TYO", "pending")],
    );
    assert_eq!(f.tick().await, TickReport::default());
    // Unknown rollouts.
    for path in [format!("/api/v1/rollouts/{}", Uuid::now_v7()), "/api/v1/rollouts/nope".to_owned()]
    {
        let (code, e) = f.call(Method::GET, &path, &f.admin, None).await;
        assert_eq!(
            (code, e["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "{path}"
        );
    }
    let (code, _) = f.post(&Uuid::now_v7().to_string(), "pause").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn pause_resume_and_abort_on_sqlite() {
    pause_resume_and_abort(&fresh_sqlite_url()).await;
}

#[tokio::test]
async fn pause_resume_and_abort_on_postgres() {
    pause_resume_and_abort(&fresh_postgres_url().await).await;
}

async fn an_expired_window_is_sent_again_at_the_next(url: &str) {
    // 02:00 in Paris (UTC+1), Monday 2026-03-09.
    let f = Fixture::start(url, at("2026-03-09T01:00:00Z")).await;
    let mut par = Fed::enroll(f.store.as_ref(), "PAR", "1.3.0").await;
    let v = f
        .create(json!({"version": "1.4.0", "platform": PLATFORM, "targets": {"sites": ["PAR"]},
                       "window": {"start": "01:00", "end": "05:00"}}))
        .await;
    let id = v["id"].as_str().expect("id").to_owned();
    assert_eq!(f.tick().await.upgrades_sent, 1);
    par.report(f.store.as_ref(), status(&id, UpgradePhase::Staged, "1.3.0")).await;
    // The window closed before the agent switched: nothing new while it is closed, and the
    // command it holds no longer allows a switch.
    f.set("2026-03-09T10:00:00Z");
    assert_eq!(f.tick().await, TickReport::default());
    let sent = upgrade_commands(f.store.as_ref(), par.agent.id).await;
    assert!(upgrades(&sent).iter().all(|u| u.switch_before <= f.clock.now()), "none outstanding");
    assert_eq!(site(&f.show(&id).await, "PAR")["window"]["opens_at"], "2026-03-10T00:00:00Z");
    // The next night it is sent again, for that night's window.
    f.set("2026-03-10T00:10:00Z");
    assert_eq!(f.tick().await.upgrades_sent, 1);
    assert_eq!(f.tick().await, TickReport::default(), "once per window");
    let sent = upgrade_commands(f.store.as_ref(), par.agent.id).await;
    let times: Vec<DateTime<Utc>> = upgrades(&sent).iter().map(|u| u.switch_before).collect();
    assert_eq!(times, vec![at("2026-03-09T04:00:00Z"), at("2026-03-10T04:00:00Z")]);
    par.report(f.store.as_ref(), status(&id, UpgradePhase::Healthy, "1.4.0")).await;
    f.tick().await;
    assert_eq!(f.show(&id).await["state"], "completed");
}

#[tokio::test]
async fn an_expired_window_is_sent_again_at_the_next_on_sqlite() {
    an_expired_window_is_sent_again_at_the_next(&fresh_sqlite_url()).await;
}

#[tokio::test]
async fn an_expired_window_is_sent_again_at_the_next_on_postgres() {
    an_expired_window_is_sent_again_at_the_next(&fresh_postgres_url().await).await;
}

async fn reports_from_strangers_change_nothing(url: &str) {
    let f = Fixture::start(url, at("2026-03-09T17:00:00Z")).await;
    let mut sfo = Fed::enroll(f.store.as_ref(), "SFO", "1.3.0").await;
    let mut chi = Fed::enroll(f.store.as_ref(), "CHI", "1.3.0").await;
    let mut tyo = Fed::enroll(f.store.as_ref(), "TYO", "1.3.0").await;
    let v = f
        .create(
            json!({"version": "1.4.0", "platform": PLATFORM, "targets": {"sites": ["SFO", "CHI"]},
                       "window": all_day()}),
        )
        .await;
    let id = v["id"].as_str().expect("id").to_owned();
    f.tick().await;
    // An unknown rollout; a site not in it; a site in it that was never sent it; another
    // version.
    let unknown = Uuid::now_v7().to_string();
    sfo.report(f.store.as_ref(), status(&unknown, UpgradePhase::Healthy, "1.4.0")).await;
    tyo.report(f.store.as_ref(), status(&id, UpgradePhase::Healthy, "1.4.0")).await;
    chi.report(f.store.as_ref(), status(&id, UpgradePhase::Healthy, "1.4.0")).await;
    let mut other = status(&id, UpgradePhase::Healthy, "1.5.0");
    other.version = "1.5.0".into();
    sfo.report(f.store.as_ref(), other).await;
    expect_states(&f.show(&id).await, &[("SFO", "pending"), ("CHI", "pending")]);
    let quarantined = f.store.quarantined(100).await.expect("quarantine");
    let reasons: Vec<(String, String)> = quarantined
        .iter()
        .map(|q| {
            let v = serde_json::to_value(q).expect("json");
            (
                v["site"].as_str().unwrap_or_default().to_owned(),
                v["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for (site_code, reason) in [
        ("SFO", format!("unknown rollout {unknown}")),
        ("TYO", format!("site TYO is not part of rollout {id}")),
        ("CHI", format!("site CHI was never sent rollout {id}")),
        ("SFO", format!("reports version 1.5.0 but rollout {id} rolls out 1.4.0")),
    ] {
        assert!(
            reasons.contains(&(site_code.to_owned(), reason.clone())),
            "{reason} not in {reasons:#?}"
        );
    }
    // Healthy means running the version.
    sfo.report(f.store.as_ref(), status(&id, UpgradePhase::Healthy, "1.3.0")).await;
    let v = f.show(&id).await;
    assert_eq!(site(&v, "SFO")["state"], "failed");
    assert_eq!(site(&v, "SFO")["reason"], "reported healthy while running 1.3.0, not 1.4.0");
}

#[tokio::test]
async fn reports_from_strangers_change_nothing_on_sqlite() {
    reports_from_strangers_change_nothing(&fresh_sqlite_url()).await;
}

#[tokio::test]
async fn reports_from_strangers_change_nothing_on_postgres() {
    reports_from_strangers_change_nothing(&fresh_postgres_url().await).await;
}

// ---------- bad input ----------

async fn bad_input_is_refused_and_changes_nothing(url: &str) {
    let f = Fixture::start(url, at("2026-03-09T17:00:00Z")).await;
    for (code, version) in [("SFO", "1.3.0"), ("CHI", "1.3.0"), ("TYO", "1.5.0"), ("PAR", "1.3.0")]
    {
        Fed::enroll(f.store.as_ref(), code, version).await;
    }
    let base =
        json!({"version": "1.4.0", "platform": PLATFORM, "targets": {"sites": ["SFO", "CHI"]}});
    let with = |key: &str, v: Value| {
        let mut b = base.clone();
        b[key] = v;
        b
    };
    let without = |key: &str| {
        let mut b = base.clone();
        b.as_object_mut().expect("object").remove(key);
        b
    };
    let cases: Vec<(Value, StatusCode, &str, &str, &str)> = vec![
        (
            with("version", json!("9.9.9")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "version",
            "unknown version 9.9.9",
        ),
        (
            with("platform", json!("riscv64-linux")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "platform",
            "no release of 1.4.0 for platform riscv64-linux (it has aarch64-linux, x86_64-linux)",
        ),
        (
            without("platform"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "platform",
            "required",
        ),
        (
            without("version"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "version",
            "required",
        ),
        (
            with("version", json!("latest")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "version",
            "not a semantic version",
        ),
        (
            with("targets", json!({"sites": ["SFO", "ZZZ"]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "targets.sites",
            "unknown site(s): ZZZ",
        ),
        (
            with("targets", json!({"tag": "mars"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "targets.tag",
            "no site has the tag",
        ),
        (
            with("targets", json!("everything")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "targets",
            "exactly one key",
        ),
        (
            with("waves", json!([{"percent": 0}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "waves[0].percent",
            "1-100",
        ),
        (
            with("waves", json!([{"rest": true}, {"sites": 1}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "waves[0]",
            "must be the last",
        ),
        (
            with("waves", json!([{"sites": 1}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "waves",
            "take 1 of the 2",
        ),
        (
            with("window", json!({"start": "22:00", "end": "26:00"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "window",
            "not a time",
        ),
        (
            with("window", json!({"start": "02:00", "until": "04:00"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "window",
            "unknown key \"until\"",
        ),
        (
            with("targets", json!({"sites": ["TYO"]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "version",
            "would be a downgrade (TYO runs 1.5.0)",
        ),
        (
            with("max_failures", json!(-1)),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            "",
            "max_failures",
        ),
        (
            with("colour", json!("blue")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            "",
            "colour",
        ),
    ];
    for (body, status_code, code, field, message) in cases {
        let (got, e) = f.call(Method::POST, "/api/v1/rollouts", &f.admin, Some(body.clone())).await;
        assert_eq!((got, e["code"].as_str()), (status_code, Some(code)), "{body}: {e}");
        let text = if field.is_empty() {
            e["message"].as_str().unwrap_or_default().to_owned()
        } else {
            let detail = e["details"]
                .as_array()
                .and_then(|d| d.iter().find(|d| d["field"] == field))
                .unwrap_or_else(|| panic!("{body}: no detail for {field}: {e}"));
            detail["message"].as_str().unwrap_or_default().to_owned()
        };
        assert!(text.contains(message), "{body}: {text:?} lacks {message:?}");
    }
    let (code, e) = f.call(Method::POST, "/api/v1/rollouts", &f.admin, None).await;
    assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{e}");
    let (code, _) = f.call(Method::POST, "/api/v1/rollouts", &f.viewer, Some(base.clone())).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "viewers read only");
    let (_, list) = f.call(Method::GET, "/api/v1/rollouts", &f.viewer, None).await;
    assert_eq!(list, json!([]), "nothing was created");

    // Overlapping rollouts for a site: 409 naming the site and its rollout; nothing stored.
    let first = f.create(base.clone()).await;
    let first_id = first["id"].as_str().expect("id");
    let (code, e) = f
        .call(
            Method::POST,
            "/api/v1/rollouts",
            &f.admin,
            Some(with("targets", json!({"sites": ["PAR", "CHI"]}))),
        )
        .await;
    assert_eq!((code, e["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")), "{e}");
    assert!(
        e["message"].as_str().unwrap_or_default().contains(&format!("CHI (rollout {first_id})")),
        "{e}"
    );
    let (_, list) = f.call(Method::GET, "/api/v1/rollouts", &f.viewer, None).await;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    // A paused rollout still holds its sites; PAR alone is free.
    f.post(first_id, "pause").await;
    let mut all = with("targets", json!({"all": true}));
    all["allow_downgrade"] = json!(true);
    let (code, e) = f.call(Method::POST, "/api/v1/rollouts", &f.admin, Some(all)).await;
    assert_eq!(code, StatusCode::CONFLICT, "{e}");
    assert!(e["message"].as_str().unwrap_or_default().contains("CHI (rollout"), "{e}");
    assert!(e["message"].as_str().unwrap_or_default().contains("SFO (rollout"), "{e}");
    f.create(with("targets", json!({"sites": ["PAR"]}))).await;
    // Listing: filters and their errors.
    let (code, list) = f.call(Method::GET, "/api/v1/rollouts?state=paused", &f.viewer, None).await;
    assert_eq!((code, list.as_array().map(Vec::len)), (StatusCode::OK, Some(1)), "{list}");
    assert_eq!(list[0]["site_counts"]["pending"], 2, "{list}");
    for query in ["?state=sleeping", "?limit=0", "?limit=5000", "?colour=red"] {
        let (code, e) =
            f.call(Method::GET, &format!("/api/v1/rollouts{query}"), &f.viewer, None).await;
        assert_eq!(
            (code, e["code"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("validation_failed")),
            "{query}: {e}"
        );
    }
    let (code, e) = f
        .call(
            Method::POST,
            &format!("/api/v1/rollouts/{first_id}/abort"),
            &f.admin,
            Some(json!({"why": 1})),
        )
        .await;
    assert_eq!(
        (code, e["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_body")),
        "{e}"
    );
    assert_eq!(f.show(first_id).await["state"], "paused", "a refused abort changed nothing");
    let _ = &f.url;
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing_on_sqlite() {
    bad_input_is_refused_and_changes_nothing(&fresh_sqlite_url()).await;
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing_on_postgres() {
    bad_input_is_refused_and_changes_nothing(&fresh_postgres_url().await).await;
}

// ---------- console and meridianctl ----------

async fn sign_in(router: &Router, token: &str) -> ConsoleSignIn {
    meridian_controller::testing::console_sign_in(router, token).await
}

async fn console(router: &Router, req: Request<Body>) -> (StatusCode, Option<String>, String) {
    let resp = router.clone().oneshot(req).await.expect("response");
    let status = resp.status();
    let location =
        resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 22).await.expect("body");
    (status, location, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_console_shows_rollouts_and_lets_admins_pause_and_abort() {
    let f = Fixture::start(&fresh_sqlite_url(), at("2026-03-09T17:00:00Z")).await;
    Fed::enroll(f.store.as_ref(), "SFO", "1.3.0").await;
    Fed::enroll(f.store.as_ref(), "CHI", "1.3.0").await;
    let v =
        f.create(json!({"version": "1.4.0", "platform": PLATFORM, "targets": {"tag": "us"}})).await;
    let id = v["id"].as_str().expect("id").to_owned();
    let get = |session: &ConsoleSignIn, path: &str| session.get(path);
    let form = |session: &ConsoleSignIn, action: &str| {
        session.post(&format!("/console/rollouts/{action}"), &format!("id={id}"))
    };
    let viewer = sign_in(&f.router, &f.viewer).await;
    let (status, _, html) = console(&f.router, get(&viewer, "/console/rollouts")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains(r#"href="/console/rollouts""#), "nav link: {html}");
    assert!(html.contains(&format!(r#"data-rollout="{id}""#)) && html.contains("1.4.0"), "{html}");
    let (status, _, html) =
        console(&f.router, get(&viewer, &format!("/console/rollouts/{id}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains(r#"data-site="SFO""#) && html.contains(r#"data-site="CHI""#), "{html}");
    // The console judges windows by the wall clock.
    assert!(
        html.contains(r#"class="window">open until"#)
            || html.contains(r#"class="window">closed, opens"#),
        "{html}"
    );
    assert!(!html.contains("/console/rollouts/pause"), "no buttons for viewers: {html}");
    let (status, _, _) = console(&f.router, form(&viewer, "pause")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let admin = sign_in(&f.router, &f.admin).await;
    let (_, _, html) = console(&f.router, get(&admin, &format!("/console/rollouts/{id}"))).await;
    assert!(
        html.contains("/console/rollouts/pause") && html.contains("/console/rollouts/abort"),
        "{html}"
    );
    // An admin's post without the session's CSRF token, with another, or from another site is
    // refused and changes nothing.
    for (csrf, origin) in [
        (None, None),
        (Some("forged"), None),
        (Some(admin.csrf.as_str()), Some("https://evil.example")),
    ] {
        let mut req = Request::post("/console/rollouts/pause")
            .header(header::COOKIE, &admin.cookie)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(origin) = origin {
            req = req.header(header::ORIGIN, origin).header(header::HOST, "controller");
        }
        let body = match csrf {
            Some(c) => format!("id={id}&csrf={c}"),
            None => format!("id={id}"),
        };
        let (status, _, _) = console(&f.router, req.body(Body::from(body)).expect("request")).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "csrf {csrf:?}, origin {origin:?}");
        let (_, _, html) =
            console(&f.router, get(&admin, &format!("/console/rollouts/{id}"))).await;
        assert!(html.contains(r#"data-state="running""#), "still running: {html}");
    }
    let (status, location, _) = console(&f.router, form(&admin, "pause")).await;
    assert_eq!(
        (status, location),
        (StatusCode::SEE_OTHER, Some(format!("/console/rollouts/{id}?done=paused")))
    );
    let (status, _, html) = console(&f.router, form(&admin, "pause")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(html.contains("only a running rollout can be paused"), "{html}");
    let (status, _, _) = console(&f.router, form(&admin, "abort")).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, _, html) = console(&f.router, get(&admin, &format!("/console/rollouts/{id}"))).await;
    assert!(
        html.contains(r#"id="halted-reason""#) && html.contains("aborted by bootstrap (console)"),
        "{html}"
    );
    let (status, _, _) = console(&f.router, get(&admin, "/console/rollouts/not-a-rollout")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn meridianctl_rollouts_commands_against_a_served_controller() {
    let f = Fixture::start(&fresh_sqlite_url(), at("2026-03-09T17:00:00Z")).await;
    Fed::enroll(f.store.as_ref(), "SFO", "1.3.0").await;
    Fed::enroll(f.store.as_ref(), "CHI", "1.3.0").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = format!("http://{}", listener.local_addr().expect("addr"));
    let router = f.router.clone();
    let task = tokio::spawn(async move { axum::serve(listener, router).await });
    let dir = testing::temp_dir("meridianctl-rollouts");
    let token_file = dir.join("token");
    std::fs::write(&token_file, &f.admin).expect("token file");
    let run = |args: &str| {
        let (server, token_file) = (server.clone(), token_file.clone());
        let args: Vec<String> = args.split_whitespace().map(str::to_owned).collect();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meridianctl"))
                .args(["--server", &server, "--token-file"])
                .arg(&token_file)
                .args(&args)
                .env_remove("MERIDIAN_SERVER")
                .env_remove("MERIDIAN_TOKEN")
                .output()
                .await
                .expect("run meridianctl");
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let (code, out, err) = run(&format!(
        "rollouts create --version 1.4.0 --platform {PLATFORM} --site SFO,CHI --waves 1,rest --window 01:00-05:00 -o json"
    ))
    .await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("json");
    let id = v["id"].as_str().expect("id").to_owned();
    assert_eq!((v["window"]["start"].as_str(), v["wave_count"].as_u64()), (Some("01:00"), Some(2)));

    let (code, out, _) = run("rollouts list").await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ID") && lines[0].contains("STATE"), "{out}");
    assert!(
        lines[1].starts_with(&id) && lines[1].contains("running") && lines[1].contains("pending 2"),
        "{out}"
    );

    let (code, out, _) = run(&format!("rollouts show {id}")).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("01:00-05:00 (site time)") && out.lines().any(|l| l.starts_with("SFO")),
        "{out}"
    );

    let (code, out, _) = run(&format!("rollouts pause {id}")).await;
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l.starts_with("state:") && l.ends_with("paused")), "{out}");
    let (code, _, err) = run(&format!("rollouts pause {id}")).await;
    assert_eq!(code, 1);
    assert!(err.contains("conflict") && err.contains("only a running rollout"), "{err}");
    let (code, _, _) = run(&format!("rollouts resume {id}")).await;
    assert_eq!(code, 0);
    let (code, out, err) = run(&format!("rollouts abort {id} --reason testing")).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("aborted by bootstrap: testing"), "{out}");

    let (code, _, err) =
        run(&format!("rollouts create --version 7.0.0 --platform {PLATFORM} --all")).await;
    assert_eq!(code, 1);
    assert!(err.contains("unknown version 7.0.0"), "{err}");
    let (code, _, err) = run("rollouts create --version 1.4.0 --platform x86_64-linux").await;
    assert_eq!(code, 1);
    assert!(err.contains("name the targets"), "{err}");
    let (code, _, err) = run(&format!("rollouts show {}", Uuid::now_v7())).await;
    assert_eq!(code, 1);
    assert!(err.contains("not found"), "{err}");
    task.abort();
}
