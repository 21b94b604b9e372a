//! A scripted agent gateway for the upgrade tests: welcomes sessions, acknowledges and keeps
//! every event (by sequence, so a resend is not counted twice), serves one release artifact
//! through `FetchRelease`, and lets the test push commands down the current session.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use meridian_proto::agent_gateway_server::{AgentGateway, AgentGatewayServer};
use meridian_proto::{AgentFrame, ControllerFrame, ReleaseChunk, agent_frame, controller_frame};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

type Downlink = mpsc::Sender<Result<ControllerFrame, Status>>;

#[derive(Default)]
pub struct State {
    /// Events received, by sequence: (kind, payload).
    pub events: BTreeMap<u64, (String, Vec<u8>)>,
    /// The versions the agent said hello with, in order.
    pub hellos: Vec<String>,
    /// The artifact served by `FetchRelease`, and the offsets asked for.
    pub artifact: Vec<u8>,
    pub fetches: Vec<u64>,
    downlink: Option<Downlink>,
}

#[derive(Clone, Default)]
pub struct Gateway(pub Arc<Mutex<State>>);

impl Gateway {
    /// Serves on a loopback port; returns the URL.
    pub async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AgentGatewayServer::new(self.clone()))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().expect("gateway state")
    }

    pub fn connected(&self) -> bool {
        self.state().downlink.as_ref().is_some_and(|d| !d.is_closed())
    }

    /// Sends a command down the current session.
    pub async fn command(&self, seq: u64, cmd: &meridian_shared::commands::ControllerCommand) {
        let downlink = self.state().downlink.clone().expect("a session");
        let frame = ControllerFrame {
            body: Some(controller_frame::Body::Command(meridian_proto::Command {
                seq,
                kind: cmd.kind().into(),
                payload: cmd.payload(),
                ..Default::default()
            })),
        };
        downlink.send(Ok(frame)).await.expect("send the command");
    }

    /// The payloads of the events of `kind`, in sequence order.
    pub fn events(&self, kind: &str) -> Vec<serde_json::Value> {
        self.state()
            .events
            .values()
            .filter(|(k, _)| k == kind)
            .map(|(_, p)| serde_json::from_slice(p).expect("json payload"))
            .collect()
    }

    /// The phases of the `AGENT_UPGRADE_STATUS` events, in order.
    pub fn phases(&self) -> Vec<String> {
        self.events("AGENT_UPGRADE_STATUS")
            .iter()
            .map(|e| e["phase"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

#[tonic::async_trait]
impl AgentGateway for Gateway {
    async fn enroll(
        &self,
        _: Request<meridian_proto::EnrollRequest>,
    ) -> Result<Response<meridian_proto::EnrollResponse>, Status> {
        Err(Status::unimplemented("the agents of this test are enrolled"))
    }

    type SessionStream = Pin<Box<dyn Stream<Item = Result<ControllerFrame, Status>> + Send>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentFrame>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await {
            Ok(Some(AgentFrame { body: Some(agent_frame::Body::Hello(h)) })) => h,
            _ => return Err(Status::invalid_argument("expected Hello")),
        };
        let (tx, rx) = mpsc::channel(64);
        let acked = {
            let mut st = self.state();
            st.hellos.push(hello.version.clone());
            st.downlink = Some(tx.clone());
            st.events.keys().next_back().copied().unwrap_or(0)
        };
        let welcome = controller_frame::Body::Welcome(meridian_proto::Welcome {
            acked_event_seq: acked,
            controller_time_ms: 0,
            heartbeat_interval_ms: 200,
            controller_version: "scripted".into(),
            ..Default::default()
        });
        tx.send(Ok(ControllerFrame { body: Some(welcome) })).await.ok();
        let state = self.0.clone();
        tokio::spawn(async move {
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
                        let mut st = state.lock().expect("gateway state");
                        for e in b.events {
                            st.events.entry(e.seq).or_insert((e.kind, e.payload));
                        }
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
        Pin<Box<dyn Stream<Item = Result<meridian_proto::AppointmentChunk, Status>> + Send>>;

    async fn fetch_appointments(
        &self,
        _: Request<meridian_proto::AppointmentSyncRequest>,
    ) -> Result<Response<Self::FetchAppointmentsStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    type FetchReleaseStream = Pin<Box<dyn Stream<Item = Result<ReleaseChunk, Status>> + Send>>;

    async fn fetch_release(
        &self,
        request: Request<meridian_proto::FetchReleaseRequest>,
    ) -> Result<Response<Self::FetchReleaseStream>, Status> {
        let offset = request.into_inner().offset;
        let mut st = self.state();
        st.fetches.push(offset);
        let start = usize::try_from(offset).map_err(|_| Status::invalid_argument("offset"))?;
        if start > st.artifact.len() {
            return Err(Status::invalid_argument("offset beyond the artifact"));
        }
        let chunks: Vec<_> = st.artifact[start..]
            .chunks(64 * 1024)
            .enumerate()
            .map(|(i, data)| {
                Ok(ReleaseChunk { offset: (start + i * 64 * 1024) as u64, data: data.to_vec() })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }
}
