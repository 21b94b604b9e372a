//! A bulk appointment sync refused chunk by chunk: a scripted gateway sends the agent one good
//! sync, then syncs whose chunk fails its SHA-256, does not decode, or carries another site's
//! appointment. The good sync is applied and reported; each bad one is refused, reported as
//! `APPOINTMENTS_SYNC_FAILED`, its staged chunks dropped, and the previous set stays in force.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use futures::Stream;
use meridian_agent::store::queries::{self, Identity};
use meridian_agent::{Context, Settings};
use meridian_proto::agent_gateway_server::{AgentGateway, AgentGatewayServer};
use meridian_proto::{
    AgentFrame, AppointmentChunk, ControllerFrame, agent_frame, controller_frame,
};
use meridian_shared::appointments::{AppointmentSnapshot, AppointmentStatus, encode_chunk};
use meridian_shared::clock::ManualClock;
use meridian_shared::commands::{ControllerCommand, SyncRequest};
use meridian_shared::{AppointmentId, Code, SiteCode};
use sha2::Digest;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

/// What the scripted gateway serves for each sync id: the chunks (two per sync).
type Script = Arc<Mutex<Vec<(Uuid, Vec<AppointmentChunk>)>>>;
/// The current session's outbound frames, for pushing commands down it.
type Downlink = Arc<Mutex<Option<mpsc::Sender<Result<ControllerFrame, Status>>>>>;

struct ScriptedGateway {
    script: Script,
    /// Commands to push down the current session.
    commands: Downlink,
}

#[tonic::async_trait]
impl AgentGateway for ScriptedGateway {
    async fn enroll(
        &self,
        _: Request<meridian_proto::EnrollRequest>,
    ) -> Result<Response<meridian_proto::EnrollResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    type SessionStream = Pin<Box<dyn Stream<Item = Result<ControllerFrame, Status>> + Send>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentFrame>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let welcome = controller_frame::Body::Welcome(meridian_proto::Welcome {
            acked_event_seq: 0,
            controller_time_ms: 0,
            heartbeat_interval_ms: 200,
            controller_version: "scripted".into(),
            ..Default::default()
        });
        tx.send(Ok(ControllerFrame { body: Some(welcome) })).await.ok();
        *self.commands.lock().expect("lock") = Some(tx.clone());
        tokio::spawn(async move {
            // Answer pings and acknowledge every event so the session stays healthy.
            while let Ok(Some(frame)) = inbound.message().await {
                let reply = match frame.body {
                    Some(agent_frame::Body::Ping(p)) => {
                        controller_frame::Body::Pong(meridian_proto::Pong {
                            nonce: p.nonce,
                            sent_at_ms: p.sent_at_ms,
                        })
                    }
                    Some(agent_frame::Body::Events(b)) => {
                        let up_to_seq = b.events.last().map_or(0, |e| e.seq);
                        controller_frame::Body::EventAck(meridian_proto::EventAck { up_to_seq })
                    }
                    _ => continue,
                };
                if tx.send(Ok(ControllerFrame { body: Some(reply) })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type FetchAppointmentsStream =
        Pin<Box<dyn Stream<Item = Result<AppointmentChunk, Status>> + Send>>;

    async fn fetch_appointments(
        &self,
        request: Request<meridian_proto::AppointmentSyncRequest>,
    ) -> Result<Response<Self::FetchAppointmentsStream>, Status> {
        let req = request.into_inner();
        let script = self.script.lock().expect("lock");
        let Some((_, chunks)) = script.iter().find(|(id, _)| id.to_string() == req.sync_id) else {
            return Err(Status::not_found("unknown sync"));
        };
        let rest: Vec<_> = chunks.iter().skip(req.from_chunk as usize).cloned().map(Ok).collect();
        Ok(Response::new(Box::pin(futures::stream::iter(rest))))
    }

    type FetchReleaseStream =
        Pin<Box<dyn Stream<Item = Result<meridian_proto::ReleaseChunk, Status>> + Send>>;

    async fn fetch_release(
        &self,
        _: Request<meridian_proto::FetchReleaseRequest>,
    ) -> Result<Response<Self::FetchReleaseStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

fn snap(n: u32, site: &str) -> AppointmentSnapshot {
    let local = chrono::NaiveDate::from_ymd_opt(2026, 3, 9)
        .expect("day")
        .and_hms_opt(9 + n, 0, 0)
        .expect("time");
    AppointmentSnapshot {
        id: AppointmentId::new(),
        site: SiteCode::parse(site).expect("site"),
        service: Code::parse("ACC").expect("service"),
        queue: Some(Code::parse("accounts").expect("queue")),
        start: local.format("%Y-%m-%dT%H:%M").to_string(),
        starts_at: Utc.from_utc_datetime(&local),
        local_day: local.date(),
        duration_minutes: 15,
        customer_name: format!("Customer {n}"),
        customer_contact: None,
        notes: None,
        external_ref: None,
        status: AppointmentStatus::Booked,
        revision: 1,
        updated_at: Utc.with_ymd_and_hms(2026, 3, 8, 12, 0, 0).unwrap(),
    }
}

/// A two-chunk sync of the 9th and 10th; `second` is the second chunk's (payload, sha256).
fn chunks(
    id: Uuid,
    first: &[AppointmentSnapshot],
    second: (Vec<u8>, Vec<u8>),
) -> Vec<AppointmentChunk> {
    let (p0, s0) = encode_chunk(first);
    let total = first.len() as u64 + 1;
    [(0, p0, s0), (1, second.0, second.1)]
        .into_iter()
        .map(|(index, payload, sha256)| AppointmentChunk {
            sync_id: id.to_string(),
            index,
            total_chunks: 2,
            total_appointments: total,
            from_day: "2026-03-09".into(),
            to_day: "2026-03-10".into(),
            as_of_command_seq: 1,
            payload,
            sha256,
        })
        .collect()
}

async fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_corrupt_chunk_is_refused_and_the_previous_set_stays_in_force() {
    let script: Script = Arc::default();
    let commands: Downlink = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentGatewayServer::new(ScriptedGateway {
                script: script.clone(),
                commands: commands.clone(),
            }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let dir = std::env::temp_dir().join(format!("meridian-sync-{}", Uuid::new_v4().simple()));
    let settings = Settings {
        controller_url: format!("http://{addr}"),
        data_dir: dir,
        http_listen: "127.0.0.1:0".into(),
        heartbeat_ms: 200,
        backoff_base_ms: 10,
        backoff_cap_ms: 50,
        ..Settings::default()
    };
    let clock = Arc::new(ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 9, 8, 0, 0).unwrap()));
    let ctx = Context::open(&settings, clock).await.expect("open");
    ctx.db
        .write(|c| {
            queries::save_identity(
                c,
                &Identity { agent_id: "a".into(), site: "SFO".into(), credential: "a.s".into() },
            )
        })
        .await
        .expect("identity");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let agent =
        tokio::spawn(meridian_agent::run_with(ctx.clone(), settings, http, shutdown.clone()));
    let session = wait_until("a session", || commands.lock().expect("lock").clone()).await;

    let mut seq = 0u64;
    let mut request = |id: Uuid| {
        seq += 1;
        let cmd = ControllerCommand::SyncAppointments(SyncRequest {
            sync_id: id,
            reason: "manual".into(),
            requested_at: Utc::now(),
        });
        ControllerFrame {
            body: Some(controller_frame::Body::Command(meridian_proto::Command {
                seq,
                kind: cmd.kind().into(),
                payload: cmd.payload(),
                ..Default::default()
            })),
        }
    };
    let sync_state = |ctx: &Arc<Context>| {
        let ctx = ctx.clone();
        async move {
            ctx.db.read(|c| meridian_agent::appointment_sync::status(c, 10)).await.expect("status")
        }
    };
    let appointment_ids = |ctx: &Arc<Context>| {
        let ctx = ctx.clone();
        async move {
            ctx.db
                .read(|c| {
                    let mut stmt = c.prepare("SELECT id FROM appointments ORDER BY id")?;
                    let ids = stmt
                        .query_map([], |r| r.get::<_, String>(0))?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    Ok(ids)
                })
                .await
                .expect("ids")
        }
    };

    // A good sync: applied, watermark recorded.
    let good_rows = [snap(0, "SFO"), snap(1, "SFO"), snap(2, "SFO")];
    let good = Uuid::now_v7();
    script
        .lock()
        .expect("lock")
        .push((good, chunks(good, &good_rows[..2], encode_chunk(&good_rows[2..]))));
    session.send(Ok(request(good))).await.expect("send");
    let mut applied = None;
    for _ in 0..750 {
        let st = sync_state(&ctx).await;
        if st.watermark.as_ref().is_some_and(|w| w.sync_id == good) {
            applied = Some(st);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let applied = applied.expect("the good sync applied");
    assert_eq!(applied.watermark.expect("watermark").appointments, 3);
    let mut expected: Vec<String> = good_rows.iter().map(|a| a.id.to_string()).collect();
    expected.sort();
    assert_eq!(appointment_ids(&ctx).await, expected);

    // Three bad syncs, each replacing the day with something else if it were applied.
    let other = [snap(3, "SFO")];
    let (payload, sha256) = encode_chunk(&[snap(4, "SFO")]);
    let mut flipped = payload.clone();
    flipped[10] ^= 0x01;
    let junk = br#"[{"id":"not an appointment"}]"#.to_vec();
    let junk_sha = sha2::Sha256::digest(&junk).to_vec();
    let bad = [
        ("SHA-256", (flipped, sha256)),
        ("does not decode", (junk, junk_sha)),
        ("site CHI", encode_chunk(&[snap(5, "CHI")])),
    ];
    for (why, second) in bad {
        let id = Uuid::now_v7();
        script.lock().expect("lock").push((id, chunks(id, &other, second)));
        session.send(Ok(request(id))).await.expect("send");
        let mut failed = None;
        for _ in 0..750 {
            let st = sync_state(&ctx).await;
            if st.requests.first().is_some_and(|r| r.sync_id == id && r.state == "failed") {
                failed = Some(st);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let st = failed.unwrap_or_else(|| panic!("the sync with a chunk that {why} was refused"));
        let request = &st.requests[0];
        assert!(request.error.as_deref().unwrap_or_default().contains(why), "{request:?}");
        assert_eq!(request.staged_chunks, 0, "staged chunks dropped");
        assert_eq!(st.watermark.expect("watermark").sync_id, good, "previous sync in force");
        assert_eq!(appointment_ids(&ctx).await, expected, "previous set in force");
    }

    // The outbox holds one report per sync: one applied, three failed.
    let kinds = ctx
        .db
        .read(|c| {
            let mut stmt = c.prepare(
                "SELECT kind, COUNT(*) FROM outbox WHERE kind LIKE 'APPOINTMENTS_SYNC%' GROUP BY kind ORDER BY kind",
            )?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
        .expect("outbox");
    assert_eq!(
        kinds,
        [("APPOINTMENTS_SYNCED".to_owned(), 1), ("APPOINTMENTS_SYNC_FAILED".to_owned(), 3)]
    );
    shutdown.cancel();
    agent.await.expect("agent task").expect("agent");
}
