//! End to end: a real controller process on PostgreSQL, real agent processes, and a
//! fault-injecting TCP proxy between them. Each test asserts a guarantee of
//! `../shared/DESIGN.md` under the fault that threatens it.

mod support;

use std::time::Duration;

use meridian_proto::agent_gateway_client::AgentGatewayClient;
use meridian_proto::{AgentFrame, ControllerFrame, agent_frame, controller_frame};
use reqwest::Method;
use serde_json::{Value, json};
use support::*;

const DEADLINE: Duration = Duration::from_secs(60);

async fn fleet_of_one(site: &str) -> (ControllerProc, std::sync::Arc<FaultProxy>, AgentProc) {
    let db = fresh_postgres_url().await;
    let root = temp_dir("meridian-e2e");
    let controller = ControllerProc::start(&root.join("controller"), &db).await;
    let admin = controller.client();
    admin.seed_site(site).await;
    let token = admin.enrollment_token(site).await;
    let proxy = FaultProxy::start(controller.gateway).await;
    let agent = AgentProc::start(&root.join("agent"), proxy.addr, &token).await;
    agent
        .wait_status("agent enrolled, configured and connected", |s| {
            s["connected"] == true && s["config_revision"].as_u64() > Some(0)
        })
        .await;
    (controller, proxy, agent)
}

async fn wait_central(
    controller: &ControllerProc,
    agent_id: &str,
    visits: i64,
) -> (i64, i64, i64, i64, i64) {
    wait_for(&format!("{visits} visits stored centrally"), DEADLINE, || async {
        let c = central_events(&controller.database_url, agent_id).await;
        (c.4 >= visits).then_some(c)
    })
    .await
}

fn assert_gapless_exactly_once(c: (i64, i64, i64, i64, i64), visits: i64, high_water: i64) {
    let (count, min, max, distinct, visit_events) = c;
    assert_eq!(visit_events, visits, "every visit event exactly once");
    assert_eq!((count, distinct), (high_water, high_water), "every outbox event exactly once");
    assert_eq!((min, max), (1, high_water), "gapless from 1");
}

#[tokio::test]
async fn exactly_once_through_outage_agent_restart_lost_acks_and_offline_config_change() {
    let (controller, proxy, mut agent) = fleet_of_one("SFO").await;
    let admin = controller.client();
    let status = agent.status().await;
    let agent_id = status["agent_id"].as_str().expect("agent id").to_owned();
    assert_eq!(status["site"], "SFO");

    // Outage: the branch keeps issuing tickets, survives a restart, and takes a config change.
    proxy.set(Fault::Cut);
    agent.wait_status("agent notices the cut", |s| s["connected"] == false).await;
    let mut issued = agent.issue_tickets("GEN", 5_000).await;
    agent.kill_and_restart().await;
    let s = agent.status().await;
    assert_eq!(s["connected"], false, "still offline after the restart");
    issued.extend(agent.issue_tickets("GEN", 5_000).await);

    let change = json!({"resources": [
        {"kind": "queue", "site": "SFO", "code": "accounts", "name": "Accounts", "letter": "B"},
        {"kind": "service", "site": "SFO", "code": "ACC", "name": "Accounts", "queue": "accounts"},
    ]});
    let report = admin.ok(Method::POST, "/api/v1/apply", Some(change)).await;
    let new_revision = report["revision"].as_u64().expect("revision");

    // Heal: everything arrives once, the configuration reaches the agent, queues survive.
    proxy.set(Fault::Pass);
    let s = agent
        .wait_status("agent catches up", |s| {
            s["connected"] == true
                && s["outbox_pending"] == 0
                && s["config_revision"].as_u64() >= Some(new_revision)
        })
        .await;
    let high = s["outbox_high_water"].as_i64().expect("high water");
    assert_gapless_exactly_once(wait_central(&controller, &agent_id, 10_000).await, 10_000, high);
    let waiting: Vec<Value> = reqwest::Client::new()
        .get(format!("{}/api/v1/visits?status=waiting", agent.url))
        .bearer_auth(CONNECTOR_KEY)
        .send()
        .await
        .expect("visits")
        .json()
        .await
        .expect("json");
    assert_eq!(waiting.len(), 10_000, "the configuration change emptied no queue");
    let acc: Value = reqwest::Client::new()
        .post(format!("{}/api/v1/visits", agent.url))
        .bearer_auth(CONNECTOR_KEY)
        .json(&json!({"service": "ACC"}))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    assert_eq!(acc["ticket"], "B001", "the new service works at the branch");
    issued.push(acc["id"].as_str().expect("id").to_owned());
    let view = admin.agent(&agent_id).await;
    assert_eq!(view["config_current"], true, "{view}");

    // Lost acknowledgements: events reach the controller and commit, the acks never return.
    // In four rounds of 500: a session that hears no acknowledgement for ten heartbeats starts
    // over, and its Welcome is lost too, so each burst must fit in that session's lifetime.
    let mut s = Value::Null;
    for round in 1..=4 {
        proxy.set(Fault::DropDownstream);
        issued.extend(agent.issue_tickets("GEN", 500).await);
        wait_central(&controller, &agent_id, 10_000 + 1 + 500 * round).await;
        let lost = agent.status().await;
        assert!(
            lost["outbox_pending"].as_u64() > Some(0),
            "acks were lost, so the agent still holds events: {lost}"
        );
        proxy.set(Fault::Cut);
        proxy.set(Fault::Pass);
        s = agent
            .wait_status("agent resyncs its cursor", |s| {
                s["connected"] == true && s["outbox_pending"] == 0
            })
            .await;
    }
    let high = s["outbox_high_water"].as_i64().expect("high water");
    let c = central_events(&controller.database_url, &agent_id).await;
    assert_gapless_exactly_once(c, 12_001, high);
    let mut central = central_visit_ids(&controller.database_url, &agent_id).await;
    central.sort();
    issued.sort();
    assert_eq!(central, issued, "central holds exactly the visits the branch issued");
}

#[tokio::test]
async fn controller_killed_mid_stream_loses_and_doubles_nothing() {
    let (mut controller, proxy, agent) = fleet_of_one("CHI").await;
    let agent_id = agent.status().await["agent_id"].as_str().expect("id").to_owned();
    proxy.set(Fault::Cut);
    agent.wait_status("agent offline", |s| s["connected"] == false).await;
    agent.issue_tickets("GEN", 5_000).await;
    proxy.set(Fault::Pass);
    let at_kill = wait_for("the stream to start", DEADLINE, || async {
        let c = central_events(&controller.database_url, &agent_id).await;
        (c.4 > 0).then_some(c.4)
    })
    .await;
    controller.kill().await;
    eprintln!("controller killed with {at_kill} of 5000 visit events stored");
    controller.restart().await;
    proxy.set_upstream(controller.gateway);
    let s = agent
        .wait_status("agent drains to the restarted controller", |s| {
            s["connected"] == true && s["outbox_pending"] == 0
        })
        .await;
    let high = s["outbox_high_water"].as_i64().expect("high water");
    assert_gapless_exactly_once(wait_central(&controller, &agent_id, 5_000).await, 5_000, high);
}

#[tokio::test]
async fn blackholed_link_is_noticed_and_heals_by_itself() {
    let (controller, proxy, agent) = fleet_of_one("TYO").await;
    let agent_id = agent.status().await["agent_id"].as_str().expect("id").to_owned();
    proxy.set(Fault::Blackhole);
    agent.wait_status("agent notices the silent link", |s| s["connected"] == false).await;
    agent.issue_tickets("GEN", 100).await;
    let view = controller.client().agent(&agent_id).await;
    assert_eq!(view["connected"], false, "the controller dropped the silent session too: {view}");
    proxy.set(Fault::Pass);
    let s = agent
        .wait_status("agent reconnects by itself", |s| {
            s["connected"] == true && s["outbox_pending"] == 0
        })
        .await;
    let high = s["outbox_high_water"].as_i64().expect("high water");
    assert_gapless_exactly_once(wait_central(&controller, &agent_id, 100).await, 100, high);
}

async fn gateway(controller: &ControllerProc) -> AgentGatewayClient<tonic::transport::Channel> {
    AgentGatewayClient::connect(format!("http://{}", controller.gateway))
        .await
        .expect("connect gateway")
}

async fn enroll(
    controller: &ControllerProc,
    token: &str,
) -> Result<meridian_proto::EnrollResponse, tonic::Status> {
    gateway(controller)
        .await
        .enroll(meridian_proto::EnrollRequest {
            token: token.into(),
            hostname: "test".into(),
            version: "0.0.0".into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Opens a session with `credential`, sends `frames`, returns what the controller answered
/// until it closed the stream (or the error that refused it).
async fn session(
    controller: &ControllerProc,
    credential: &str,
    frames: Vec<AgentFrame>,
) -> Result<Vec<ControllerFrame>, tonic::Status> {
    session_until(controller, credential, frames, |_| false).await
}

/// Opens a session, sends `frames`, and collects what comes back until a protocol error, the
/// end of the stream, a frame `stop` accepts, or 10 s of silence.
async fn session_until(
    controller: &ControllerProc,
    credential: &str,
    frames: Vec<AgentFrame>,
    stop: impl Fn(&ControllerFrame) -> bool,
) -> Result<Vec<ControllerFrame>, tonic::Status> {
    let mut req =
        tonic::Request::new(futures::stream::iter(frames).chain(futures::stream::pending()));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {credential}").parse().expect("header"));
    let mut inbound = gateway(controller).await.session(req).await?.into_inner();
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Ok(Ok(Some(f))) => {
                let end = matches!(f.body, Some(controller_frame::Body::Error(_))) || stop(&f);
                got.push(f);
                if end {
                    return Ok(got);
                }
            }
            Ok(Ok(None)) | Ok(Err(_)) => return Ok(got),
            Err(_) => return Ok(got),
        }
    }
}

use futures::StreamExt as _;

fn hello(agent_id: &str, site: &str) -> AgentFrame {
    AgentFrame {
        body: Some(agent_frame::Body::Hello(meridian_proto::Hello {
            agent_id: agent_id.into(),
            site_code: site.into(),
            version: "0.0.0".into(),
            ..Default::default()
        })),
    }
}

fn protocol_error(frames: &[ControllerFrame]) -> Option<String> {
    frames.iter().find_map(|f| match &f.body {
        Some(controller_frame::Body::Error(e)) => Some(e.code.clone()),
        _ => None,
    })
}

#[tokio::test]
async fn refused_credentials_tokens_and_frames_change_nothing() {
    let db = fresh_postgres_url().await;
    let root = temp_dir("meridian-e2e");
    let controller = ControllerProc::start(&root.join("controller"), &db).await;
    let admin = controller.client();
    admin.seed_site("SFO").await;

    // Tokens: unknown, used, expired.
    let unknown = enroll(&controller, "mrd_enr_nope").await.expect_err("unknown token");
    assert_eq!(unknown.code(), tonic::Code::PermissionDenied);
    let token = admin.enrollment_token("SFO").await;
    let enrolled = enroll(&controller, &token).await.expect("enroll");
    let reused = enroll(&controller, &token).await.expect_err("used token");
    assert!(reused.message().contains("already used"), "{reused:?}");
    let short = admin
        .ok(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(json!({"site": "SFO", "ttl_seconds": 1})),
        )
        .await;
    let expires: chrono::DateTime<chrono::Utc> =
        short["expires_at"].as_str().expect("expiry").parse().expect("time");
    wait_for("the token to expire", Duration::from_secs(5), || async {
        (chrono::Utc::now() > expires).then_some(())
    })
    .await;
    let expired =
        enroll(&controller, short["token"].as_str().expect("token")).await.expect_err("expired");
    assert!(expired.message().contains("expired"), "{expired:?}");

    // Unknown agent credential.
    let stranger = session(&controller, "00000000-0000-0000-0000-000000000000.nope", vec![])
        .await
        .expect_err("unknown");
    assert_eq!(stranger.code(), tonic::Code::Unauthenticated);

    // Malformed frames: not a Hello first; Hello for another agent; a malformed event.
    let cred = &enrolled.credential;
    let id = &enrolled.agent_id;
    let ping = AgentFrame { body: Some(agent_frame::Body::Ping(meridian_proto::Ping::default())) };
    let got = session(&controller, cred, vec![ping]).await.expect("session");
    assert_eq!(protocol_error(&got).as_deref(), Some("hello_expected"));
    let got =
        session(&controller, cred, vec![hello("00000000-0000-0000-0000-000000000000", "SFO")])
            .await
            .expect("session");
    assert_eq!(protocol_error(&got).as_deref(), Some("identity_mismatch"));
    let bad_event = AgentFrame {
        body: Some(agent_frame::Body::Events(meridian_proto::EventBatch {
            events: vec![
                meridian_proto::Event {
                    seq: 1,
                    kind: "VISIT_CREATED".into(),
                    occurred_at_ms: 1,
                    payload: b"{\"ok\":1}".to_vec(),
                },
                meridian_proto::Event {
                    seq: 2,
                    kind: "not a kind".into(),
                    occurred_at_ms: 1,
                    payload: b"{}".to_vec(),
                },
            ],
        })),
    };
    // Malformed events are acknowledged and quarantined with their reason: they never end the
    // session (the agent would resend them forever) and never reach the statistics.
    let acked = |f: &ControllerFrame| matches!(&f.body, Some(controller_frame::Body::EventAck(a)) if a.up_to_seq == 2);
    let got = session_until(&controller, cred, vec![hello(id, "SFO"), bad_event], acked)
        .await
        .expect("session");
    assert_eq!(protocol_error(&got), None);
    assert!(got.iter().any(acked), "the malformed batch is acknowledged: {got:?}");
    let quarantined = admin.ok(Method::GET, "/api/v1/stats/quarantine", None).await;
    let reasons: Vec<(u64, String)> = quarantined
        .as_array()
        .expect("list")
        .iter()
        .map(|q| (q["seq"].as_u64().unwrap_or(0), q["reason"].as_str().unwrap_or("").to_owned()))
        .collect();
    assert_eq!(reasons.len(), 2, "{quarantined}");
    assert!(reasons.iter().any(|(seq, r)| *seq == 1 && r.contains("missing field")), "{reasons:?}");
    assert!(reasons.iter().any(|(seq, r)| *seq == 2 && r.contains("kind")), "{reasons:?}");
    let empty = AgentFrame { body: None };
    let got = session(&controller, cred, vec![hello(id, "SFO"), empty]).await.expect("session");
    assert_eq!(protocol_error(&got).as_deref(), Some("empty_frame"));
    assert_eq!(central_events(&db, id).await.0, 0, "no malformed event is stored as an event");

    // Revocation: the credential stops working.
    admin.ok(Method::POST, &format!("/api/v1/agents/{id}/revoke"), None).await;
    let revoked = session(&controller, cred, vec![hello(id, "SFO")]).await.expect_err("revoked");
    assert_eq!(revoked.code(), tonic::Code::PermissionDenied);
    let view = admin.agent(id).await;
    assert_eq!(view["revoked"], true);
}

#[tokio::test]
async fn counters_above_i64_max_are_refused_at_the_gateway_and_nothing_is_stored() {
    let db = fresh_postgres_url().await;
    let root = temp_dir("meridian-e2e");
    let controller = ControllerProc::start(&root.join("controller"), &db).await;
    let admin = controller.client();
    admin.seed_site("SFO").await;
    let enrolled = enroll(&controller, &admin.enrollment_token("SFO").await).await.expect("enroll");
    let (cred, id) = (&enrolled.credential, &enrolled.agent_id);
    let too_big = i64::MAX as u64 + 1;
    let before = admin.agent(id).await;

    // A Hello whose outbox high-water would wrap to a negative number in its column.
    let mut wrapped = hello(id, "SFO");
    if let Some(agent_frame::Body::Hello(h)) = &mut wrapped.body {
        h.outbox_high_water = u64::MAX;
        h.config_revision = 3;
    }
    let got = session(&controller, cred, vec![wrapped]).await.expect("session");
    assert_eq!(protocol_error(&got).as_deref(), Some("counter_out_of_range"), "{got:?}");
    assert!(
        !got.iter().any(|f| matches!(f.body, Some(controller_frame::Body::Welcome(_)))),
        "no Welcome: {got:?}"
    );
    let after = admin.agent(id).await;
    for field in ["outbox_pending", "config_revision", "version", "clock_skew_ms"] {
        assert_eq!(after[field], before[field], "{field} stored from a refused Hello");
    }

    // A Status after a good Hello.
    let status = AgentFrame {
        body: Some(agent_frame::Body::Status(meridian_proto::Status {
            config_revision: too_big,
            outbox_pending: 1,
            ..Default::default()
        })),
    };
    let got = session(&controller, cred, vec![hello(id, "SFO"), status]).await.expect("session");
    assert_eq!(protocol_error(&got).as_deref(), Some("counter_out_of_range"), "{got:?}");
    let after = admin.agent(id).await;
    assert_eq!(
        (after["config_revision"].as_u64(), after["outbox_pending"].as_u64()),
        (Some(0), Some(0))
    );

    // An event batch whose second event's sequence does not fit.
    let event = |seq| meridian_proto::Event {
        seq,
        kind: "FUTURE_KIND".into(),
        occurred_at_ms: 1,
        payload: b"{}".to_vec(),
    };
    let batch = AgentFrame {
        body: Some(agent_frame::Body::Events(meridian_proto::EventBatch {
            events: vec![event(1), event(too_big)],
        })),
    };
    let got = session(&controller, cred, vec![hello(id, "SFO"), batch]).await.expect("session");
    assert_eq!(protocol_error(&got).as_deref(), Some("counter_out_of_range"), "{got:?}");
    assert!(
        !got.iter().any(|f| matches!(f.body, Some(controller_frame::Body::EventAck(_)))),
        "nothing acknowledged: {got:?}"
    );
    assert_eq!(central_events(&db, id).await.0, 0, "no event of the batch is stored");
    let quarantined = admin.ok(Method::GET, "/api/v1/stats/quarantine", None).await;
    assert_eq!(quarantined, json!([]), "nor quarantined");
}
