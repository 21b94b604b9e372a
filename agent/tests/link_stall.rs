//! The link never waits forever on a controller that stops making progress: a fake gateway
//! accepts the session and keeps pinging (so the link does not look silent) but never reads the
//! agent's frames nor acknowledges anything. The agent gives up on the session after
//! `ACK_PATIENCE` heartbeats without an acknowledgement (or after three heartbeats of a stalled
//! send, whichever comes first) and reconnects, resending from the controller's cursor.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::Stream;
use meridian_agent::store::queries::{self, Identity};
use meridian_agent::{Context, Settings};
use meridian_proto::agent_gateway_server::{AgentGateway, AgentGatewayServer};
use meridian_proto::{AgentFrame, ControllerFrame, controller_frame};
use meridian_shared::clock::SystemClock;
use meridian_shared::events::{AgentEvent, ConfigApplied};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

#[derive(Default)]
struct DeafGateway {
    sessions: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl AgentGateway for DeafGateway {
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
        self.sessions.fetch_add(1, Ordering::SeqCst);
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            // Read the Hello, welcome the agent, then never read again — but keep pinging.
            let _hello = inbound.message().await;
            let welcome = controller_frame::Body::Welcome(meridian_proto::Welcome {
                acked_event_seq: 0,
                controller_time_ms: 0,
                heartbeat_interval_ms: 200,
                controller_version: "deaf".into(),
                ..Default::default()
            });
            if tx.send(Ok(ControllerFrame { body: Some(welcome) })).await.is_err() {
                return;
            }
            let mut nonce = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                nonce += 1;
                let ping =
                    controller_frame::Body::Ping(meridian_proto::Ping { nonce, sent_at_ms: 0 });
                if tx.send(Ok(ControllerFrame { body: Some(ping) })).await.is_err() {
                    return; // the agent dropped the session
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type FetchAppointmentsStream =
        Pin<Box<dyn Stream<Item = Result<meridian_proto::AppointmentChunk, Status>> + Send>>;

    async fn fetch_appointments(
        &self,
        _: Request<meridian_proto::AppointmentSyncRequest>,
    ) -> Result<Response<Self::FetchAppointmentsStream>, Status> {
        Err(Status::unimplemented("not in this test"))
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

#[tokio::test]
async fn a_controller_that_stops_acknowledging_does_not_hang_the_link() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let gateway = DeafGateway::default();
    let sessions = gateway.sessions.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentGatewayServer::new(gateway))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let dir =
        std::env::temp_dir().join(format!("meridian-stall-{}", uuid::Uuid::new_v4().simple()));
    let settings = Settings {
        controller_url: format!("http://{addr}"),
        data_dir: dir,
        http_listen: "127.0.0.1:0".into(),
        heartbeat_ms: 200,
        backoff_base_ms: 10,
        backoff_cap_ms: 50,
        ..Settings::default()
    };
    let ctx = Context::open(&settings, Arc::new(SystemClock)).await.expect("open");
    // An enrolled agent with a large backlog: far more than HTTP/2 lets through unread.
    ctx.db
        .write(|c| {
            queries::save_identity(
                c,
                &Identity {
                    agent_id: "a".into(),
                    site: "SFO".into(),
                    credential: "a.secret".into(),
                },
            )?;
            let padding =
                AgentEvent::ConfigApplied(ConfigApplied { revision: 0, previous_revision: 0 });
            for _ in 0..20_000 {
                queries::append_event(c, &padding, chrono::Utc::now())?;
            }
            Ok(())
        })
        .await
        .expect("backlog");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let agent =
        tokio::spawn(meridian_agent::run_with(ctx.clone(), settings, http, shutdown.clone()));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while sessions.load(Ordering::SeqCst) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the link hung on a stalled send: {} session(s), link {:?}",
            sessions.load(Ordering::SeqCst),
            ctx.link.borrow().clone()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let error = ctx.link.borrow().last_error.clone().unwrap_or_default();
    assert!(error.contains("no acknowledgement") || error.contains("no heartbeat"), "{error}");
    shutdown.cancel();
    agent.await.expect("agent task").expect("agent");
}
