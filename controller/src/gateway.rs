//! The agent gateway (gRPC): `Enroll`, the bidirectional `Session`, and the bulk transfers
//! beside it (`FetchAppointments`; `FetchRelease`, a release artifact from a byte offset).
//!
//! A session: authenticate the credential in the `authorization` metadata → wait for Hello
//! (which must name the same agent) → Welcome with the central acknowledgement → then, until
//! either side goes away: store event batches and acknowledge cumulatively after the commit,
//! stream commands after the agent's cursor (woken on new commands, with a slow poll for
//! commands committed by other replicas), record command acks and status, ping every
//! heartbeat and end the session when the agent has been silent for three heartbeats.
//! A store error ends the session with `UNAVAILABLE`; the agent reconnects and resumes from the
//! cursors it gets in the next Welcome, so nothing is lost or doubled.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::Stream;
use meridian_proto::agent_gateway_server::AgentGateway;
use meridian_proto::{
    AgentFrame, AppointmentChunk, AppointmentSyncRequest, ControllerFrame, EnrollRequest,
    EnrollResponse, agent_frame, controller_frame,
};
use meridian_shared::AgentId;
use meridian_shared::clock::Clock;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use crate::appointments::sync::ConfigCache;
use crate::auth;
use crate::clock_skew::SkewWatch;
use crate::config_admin;
use crate::error::{EnrollError, Error};
use crate::metrics::Metrics;
use crate::store::{AgentStatusUpdate, Enrollment, IngestError, Store};

mod reconcile;
pub mod wire;

pub use wire::MAX_BATCH_EVENTS;

/// Largest gRPC message either side accepts.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Commands sent per wake-up.
const COMMAND_PAGE: u32 = 100;
/// Outbound frames buffered per session; when full the session task waits (backpressure from
/// a slow agent link), it never drops a frame.
const OUTBOUND_BUFFER: usize = 64;
/// How long a command acknowledgement without an error may wait to be recorded, so that an
/// agent acknowledging command by command costs one write per period, not one per command.
/// Only monitoring reads the recorded cursor in the meantime: the agent's Hello names what it
/// applied, so a lost acknowledgement never resends a command it has.
const ACK_RECORD_PERIOD: Duration = Duration::from_millis(100);

#[derive(Clone)]
pub struct Gateway {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub commands_changed: watch::Receiver<u64>,
    /// This replica's sessions by agent: request operations wake only the agents whose logs
    /// got commands.
    pub agent_wakes: Arc<crate::wake::AgentWakes>,
    pub heartbeat: Duration,
    /// Fallback poll for commands committed elsewhere (see `Store::watch_commands`).
    pub command_poll: Duration,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    /// Names the site's current day when a bulk appointment sync takes its snapshot.
    pub clock: Arc<dyn Clock>,
    pub config: Arc<ConfigCache>,
    /// Appointments per chunk of a bulk appointment sync.
    pub sync_chunk: usize,
    /// An agent clock further than this from ours raises an alert (`clock_skew::SkewWatch`).
    pub clock_skew_tolerance: Duration,
}

/// Chunks of a bulk appointment sync read from the store at a time.
const SYNC_CHUNK_PAGE: u32 = 4;
/// Release chunks (1 MiB each) read ahead of the agent per download; when full the reader
/// waits for the agent, so a download holds at most this many chunks plus one in memory.
const RELEASE_BUFFER: usize = 2;

type FrameStream = Pin<Box<dyn Stream<Item = Result<ControllerFrame, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<AppointmentChunk, Status>> + Send>>;
type ReleaseStream =
    Pin<Box<dyn Stream<Item = Result<meridian_proto::ReleaseChunk, Status>> + Send>>;

fn status_from(e: Error) -> Status {
    match e {
        Error::Enrollment(e) => Status::permission_denied(e.to_string()),
        Error::Validation(e) => Status::invalid_argument(e.to_string()),
        Error::NotFound(m) => Status::not_found(m),
        Error::Store(e) => {
            tracing::warn!(error = %e, "store unavailable during RPC");
            Status::unavailable("the controller's database is unavailable; retry")
        }
        Error::RevisionConflict => Status::aborted("configuration changed concurrently; retry"),
        Error::Conflict(m) => Status::failed_precondition(m),
        other => {
            tracing::error!(error = %other, "internal error during RPC");
            Status::internal("internal error")
        }
    }
}

fn frame(body: controller_frame::Body) -> ControllerFrame {
    ControllerFrame { body: Some(body) }
}

#[tonic::async_trait]
impl AgentGateway for Gateway {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let req = request.into_inner();
        if req.token.len() > 200 || req.hostname.len() > 255 || req.version.len() > 64 {
            return Err(Status::invalid_argument("enrollment request fields are too long"));
        }
        let result = self.enroll_inner(&req).await;
        match &result {
            Ok(r) => {
                self.metrics.enrollments.inc();
                tracing::info!(agent = %r.agent_id, site = %r.site_code, hostname = %req.hostname, "agent enrolled");
            }
            Err(e) => {
                self.metrics.enrollments_refused.inc();
                tracing::warn!(error = %e, hostname = %req.hostname, "enrollment refused");
            }
        }
        result.map(Response::new).map_err(status_from)
    }

    type SessionStream = FrameStream;

    async fn session(
        &self,
        request: Request<Streaming<AgentFrame>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let agent = self.authenticate(request.metadata()).await?;
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let session = Session {
            gw: self.clone(),
            agent: agent.id,
            credential_hash: agent.credential_hash.clone(),
            site: agent.site.to_string(),
            inbound: request.into_inner(),
            outbound: tx,
            ack: AckCursor::default(),
            clock: SkewWatch::new(
                self.metrics.clone(),
                self.clock_skew_tolerance,
                agent.id,
                agent.site.as_str(),
            ),
        };
        self.tasks.spawn(session.run());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type FetchAppointmentsStream = ChunkStream;

    async fn fetch_appointments(
        &self,
        request: Request<AppointmentSyncRequest>,
    ) -> Result<Response<Self::FetchAppointmentsStream>, Status> {
        let agent = self.authenticate(request.metadata()).await?;
        let req = request.into_inner();
        if req.sync_id.len() > 64 {
            return Err(Status::invalid_argument("sync_id is too long"));
        }
        let site = agent.site.clone();
        let id = agent.id;
        self.fetch_appointments_inner(agent, req).await.map(Response::new).inspect_err(|s| {
            tracing::warn!(agent = %id, site = %site, code = ?s.code(), error = %s.message(),
                "appointment sync fetch refused");
        })
    }

    type FetchReleaseStream = ReleaseStream;

    async fn fetch_release(
        &self,
        request: Request<meridian_proto::FetchReleaseRequest>,
    ) -> Result<Response<Self::FetchReleaseStream>, Status> {
        let agent = self.authenticate(request.metadata()).await?;
        let req = request.into_inner();
        let (site, id) = (agent.site.clone(), agent.id);
        let (version, platform, offset) = (req.version.clone(), req.platform.clone(), req.offset);
        self.fetch_release_inner(req).await.map(Response::new).inspect_err(|s| {
            tracing::warn!(agent = %id, site = %site, version = %version.chars().take(64).collect::<String>(),
                platform = %platform.chars().take(64).collect::<String>(), offset,
                code = ?s.code(), error = %s.message(), "release fetch refused");
        })
    }
}

impl Gateway {
    /// The active agent whose credential the request carries.
    async fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<crate::store::AgentRecord, Status> {
        let credential = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(auth::bearer)
            .map(str::to_owned)
            .ok_or_else(|| Status::unauthenticated("missing agent credential"))?;
        let agent = self
            .store
            .agent_by_credential(&auth::hash_secret(&credential))
            .await
            .map_err(status_from)?
            .ok_or_else(|| Status::unauthenticated("unknown agent credential"))?;
        if agent.revoked_at.is_some() {
            tracing::warn!(agent = %agent.id, site = %agent.site, "revoked agent refused");
            return Err(Status::permission_denied("this agent has been revoked; enroll again"));
        }
        Ok(agent)
    }

    /// Streams release (`version`, `platform`)'s artifact from byte `offset` to its end, a
    /// stored chunk (≤ 1 MiB) at a time, read from the store as the agent takes them.
    async fn fetch_release_inner(
        &self,
        req: meridian_proto::FetchReleaseRequest,
    ) -> Result<ReleaseStream, Status> {
        use crate::store::releases::RELEASE_CHUNK_BYTES;
        if req.version.len() > meridian_shared::releases::MAX_VERSION_LEN || req.platform.len() > 64
        {
            return Err(Status::invalid_argument("version or platform is too long"));
        }
        let missing = || {
            Status::not_found(format!("no release {} for platform {}", req.version, req.platform))
        };
        let release = self
            .store
            .release(&req.version, &req.platform)
            .await
            .map_err(status_from)?
            .ok_or_else(missing)?;
        if req.offset > release.size {
            return Err(Status::invalid_argument(format!(
                "offset {} is beyond release {} for {} ({} bytes)",
                req.offset, release.version, release.platform, release.size
            )));
        }
        tracing::info!(version = %release.version, platform = %release.platform,
            offset = req.offset, size = release.size, "sending release");
        let chunk_bytes = RELEASE_CHUNK_BYTES as u64;
        let (tx, rx) = mpsc::channel(RELEASE_BUFFER);
        let (store, metrics, shutdown) =
            (self.store.clone(), self.metrics.clone(), self.shutdown.clone());
        self.tasks.spawn(async move {
            let mut next = req.offset / chunk_bytes;
            // Bytes of the first chunk the agent already has.
            let mut skip = (req.offset % chunk_bytes) as usize;
            while next < release.chunk_count() {
                let page = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    page = store.release_chunks(release.id, next, 1) => page,
                };
                let (idx, mut data) = match page.map(|p| p.into_iter().next()) {
                    Ok(Some(chunk)) if chunk.0 == next && skip <= chunk.1.len() => chunk,
                    Ok(None) => {
                        let _ = tx
                            .send(Err(Status::not_found(format!(
                                "release {} for {} was deleted while it was being sent",
                                release.version, release.platform
                            ))))
                            .await;
                        return;
                    }
                    Ok(Some((idx, _))) => {
                        tracing::error!(release = %release.id, expected = next, found = idx,
                            "release chunks are not laid out as stored");
                        let _ = tx.send(Err(Status::internal("internal error"))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(status_from(e))).await;
                        return;
                    }
                };
                if skip > 0 {
                    data.drain(..skip);
                }
                let offset = idx * chunk_bytes + skip as u64;
                skip = 0;
                let len = data.len() as u64;
                if len == 0 {
                    return; // the agent asked from the very end: nothing left to send
                }
                metrics.release_bytes_served.inc_by(len);
                if tx.send(Ok(meridian_proto::ReleaseChunk { offset, data })).await.is_err() {
                    return; // the agent went away; it resumes from what it has
                }
                next = idx + 1;
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// Takes (or finds) the sync's snapshot and streams its chunks from `from_chunk`, a page
    /// at a time, until done or the agent goes away.
    async fn fetch_appointments_inner(
        &self,
        agent: crate::store::AgentRecord,
        req: AppointmentSyncRequest,
    ) -> Result<ChunkStream, Status> {
        let sync_id: uuid::Uuid =
            req.sync_id.parse().map_err(|_| Status::invalid_argument("sync_id is not a UUID"))?;
        let set = self.config.get(self.store.as_ref()).await.map_err(status_from)?;
        let plan = crate::appointments::sync::snapshot_plan(
            &set,
            &agent.site,
            self.clock.now(),
            self.sync_chunk,
        )
        .map_err(status_from)?;
        let manifest = self
            .store
            .fetch_appointment_sync(sync_id, agent.id, &plan, req.from_chunk)
            .await
            .map_err(status_from)?;
        if req.from_chunk > manifest.chunks {
            return Err(Status::out_of_range(format!(
                "sync {sync_id} has {} chunks; from_chunk {} is beyond them",
                manifest.chunks, req.from_chunk
            )));
        }
        tracing::info!(agent = %agent.id, sync = %sync_id, from_chunk = req.from_chunk,
            chunks = manifest.chunks, appointments = manifest.appointments, "sending appointment sync");
        let (tx, rx) = mpsc::channel(SYNC_CHUNK_PAGE as usize);
        let store = self.store.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let mut next = req.from_chunk;
            while next < manifest.chunks {
                let page = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    page = store.appointment_sync_chunks(sync_id, next, SYNC_CHUNK_PAGE) => page,
                };
                let page = match page {
                    Ok(page) if !page.is_empty() => page,
                    Ok(_) => {
                        // The sync ended (superseded) while it was being sent.
                        let _ = tx
                            .send(Err(Status::failed_precondition(format!(
                                "sync {sync_id} ended while it was being sent"
                            ))))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(status_from(e))).await;
                        return;
                    }
                };
                for chunk in page {
                    next = chunk.index + 1;
                    let frame = AppointmentChunk {
                        sync_id: sync_id.to_string(),
                        index: chunk.index,
                        total_chunks: manifest.chunks,
                        total_appointments: manifest.appointments,
                        from_day: manifest.from_day.to_string(),
                        to_day: manifest.to_day.to_string(),
                        as_of_command_seq: manifest.as_of_command_seq,
                        payload: chunk.payload,
                        sha256: chunk.sha256,
                    };
                    if tx.send(Ok(frame)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// Whether `site` takes appointments (one of its services has a policy).
    async fn site_books_appointments(
        &self,
        site: &meridian_shared::SiteCode,
    ) -> Result<bool, Error> {
        let set = self.config.get(self.store.as_ref()).await?;
        Ok(set.services().any(|s| &s.site == site && s.appointments.is_some()))
    }

    async fn enroll_inner(&self, req: &EnrollRequest) -> Result<EnrollResponse, Error> {
        let token_hash = auth::hash_secret(req.token.trim());
        for _ in 0..5 {
            let token = self
                .store
                .enrollment_token_by_hash(&token_hash)
                .await?
                .ok_or(Error::Enrollment(EnrollError::Unknown))?;
            let (revision, initial_config) =
                config_admin::current_snapshot(self.store.as_ref(), &token.site)
                    .await?
                    .ok_or(Error::Enrollment(EnrollError::SiteGone))?;
            let agent_id = AgentId::new();
            let credential = format!("{agent_id}.{}", auth::new_secret(""));
            let enrollment = Enrollment {
                token_hash: token_hash.clone(),
                agent_id,
                credential_hash: auth::hash_secret(&credential),
                hostname: req.hostname.clone(),
                version: req.version.clone(),
                expected_revision: revision,
                initial_config,
                sync_appointments: self.site_books_appointments(&token.site).await?,
                at: Utc::now(),
            };
            match self.store.enroll(enrollment).await {
                Ok(agent) => {
                    return Ok(EnrollResponse {
                        agent_id: agent.id.to_string(),
                        site_code: agent.site.to_string(),
                        credential,
                    });
                }
                Err(Error::RevisionConflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::RevisionConflict)
    }
}

struct Session {
    gw: Gateway,
    agent: AgentId,
    credential_hash: String,
    site: String,
    inbound: Streaming<AgentFrame>,
    outbound: mpsc::Sender<Result<ControllerFrame, Status>>,
    ack: AckCursor,
    clock: SkewWatch,
}

/// Command acknowledgements received and recorded.
#[derive(Default)]
struct AckCursor {
    received: u64,
    recorded: u64,
}

/// Why a session ended.
enum End {
    AgentClosed,
    Silent,
    Shutdown,
    Protocol(&'static str, String),
    Store(Error),
    Revoked,
    Transport(Status),
}

impl From<wire::Refusal> for End {
    fn from(r: wire::Refusal) -> Self {
        End::Protocol(r.code, r.message)
    }
}

impl Session {
    async fn run(mut self) {
        self.gw.metrics.sessions_opened.inc();
        self.gw.metrics.sessions_active.inc();
        let span = tracing::info_span!("session", agent = %self.agent, site = %self.site);
        let end = {
            let _enter = span.enter();
            tracing::info!("agent session opened");
            drop(_enter);
            tracing::Instrument::instrument(self.serve(), span.clone()).await
        };
        let _enter = span.enter();
        match &end {
            End::AgentClosed => tracing::info!("agent closed the session"),
            End::Silent => tracing::warn!("agent silent for three heartbeats; session dropped"),
            End::Shutdown => tracing::info!("session ended by controller shutdown"),
            End::Revoked => tracing::warn!("agent revoked; session ended"),
            End::Protocol(code, msg) => {
                tracing::warn!(code, message = %msg, "protocol error; session ended");
                let body = controller_frame::Body::Error(meridian_proto::ProtocolError {
                    code: (*code).to_owned(),
                    message: msg.clone(),
                });
                let _ = self.outbound.try_send(Ok(frame(body)));
            }
            End::Store(e) => {
                tracing::warn!(error = %e, "store error; session ended");
                let _ = self
                    .outbound
                    .try_send(Err(Status::unavailable("controller database unavailable")));
            }
            End::Transport(s) => tracing::info!(status = %s, "agent stream failed"),
        }
        self.gw.metrics.sessions_active.dec();
        if let Err(End::Store(e)) = self.record_ack().await {
            tracing::warn!(error = %e, "could not record the last command acknowledgement");
        }
        let offline = AgentStatusUpdate {
            connected: false,
            last_seen: Some(Utc::now()),
            ..Default::default()
        };
        if let Err(e) = self.gw.store.update_agent_status(self.agent, &offline).await {
            tracing::warn!(error = %e, "could not record session end");
        }
    }

    /// Sends one frame; a send the transport does not take within three heartbeats (both
    /// directions blocked, or a peer the keepalive has not declared dead yet) ends the session
    /// instead of waiting forever.
    async fn send(&self, body: controller_frame::Body) -> Result<(), End> {
        match tokio::time::timeout(self.gw.heartbeat * 3, self.outbound.send(Ok(frame(body)))).await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::AgentClosed),
            Err(_) => Err(End::Silent),
        }
    }

    async fn serve(&mut self) -> End {
        match self.serve_inner().await {
            Ok(()) => End::AgentClosed,
            Err(end) => end,
        }
    }

    async fn serve_inner(&mut self) -> Result<(), End> {
        let heartbeat = self.gw.heartbeat;
        let hello = match tokio::time::timeout(heartbeat * 3, self.inbound.message()).await {
            Err(_) => return Err(End::Silent),
            Ok(Err(status)) => return Err(End::Transport(status)),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(AgentFrame { body: Some(agent_frame::Body::Hello(h)) }))) => h,
            Ok(Ok(Some(_))) => {
                return Err(End::Protocol(
                    "hello_expected",
                    "the first frame must be a Hello".into(),
                ));
            }
        };
        wire::check_hello(&hello)?;
        if hello.agent_id != self.agent.to_string() || hello.site_code != self.site {
            return Err(End::Protocol(
                "identity_mismatch",
                "Hello names another agent or site than the credential".into(),
            ));
        }
        let now = Utc::now();
        let agent =
            self.gw.store.agent(self.agent).await.map_err(End::Store)?.ok_or(End::Revoked)?;
        self.clock.observe(skew(hello.agent_time_ms, now));
        let status = AgentStatusUpdate {
            connected: true,
            last_seen: Some(now),
            version: Some(truncate(&hello.version, 64)),
            config_revision: Some(hello.config_revision),
            outbox_pending: Some(hello.outbox_high_water.saturating_sub(agent.acked_seq)),
            clock_skew_ms: Some(skew(hello.agent_time_ms, now)),
            store_error: None,
        };
        self.gw.store.update_agent_status(self.agent, &status).await.map_err(End::Store)?;
        let start = self.reconcile(&hello).await?;
        let mut command_cursor = start.command_cursor;
        if command_cursor > agent.command_acked_seq {
            self.gw
                .store
                .ack_commands(self.agent, command_cursor, None)
                .await
                .map_err(End::Store)?;
        }
        self.send(controller_frame::Body::Welcome(meridian_proto::Welcome {
            acked_event_seq: start.acked,
            controller_time_ms: now.timestamp_millis(),
            heartbeat_interval_ms: heartbeat.as_millis() as u32,
            controller_version: meridian_shared::VERSION.to_owned(),
            resequence: start.resequence,
            command_rebase_to: start.command_rebase_to,
            ticket_floors: start.ticket_floors,
        }))
        .await?;

        let mut wake = self.gw.commands_changed.clone();
        let mut agent_wake = self.gw.agent_wakes.subscribe(&self.agent.to_string());
        let mut record_acks = tokio::time::interval(ACK_RECORD_PERIOD);
        record_acks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ping = tokio::time::interval(heartbeat);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut poll = tokio::time::interval(self.gw.command_poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = tokio::time::Instant::now();
        let mut nonce = 0u64;
        command_cursor = self.send_commands(command_cursor).await?;
        loop {
            tokio::select! {
                biased;
                _ = self.gw.shutdown.cancelled() => return Err(End::Shutdown),
                msg = self.inbound.message() => {
                    last_heard = tokio::time::Instant::now();
                    match msg {
                        Err(status) => return Err(End::Transport(status)),
                        Ok(None) => return Ok(()),
                        Ok(Some(f)) => self.handle(f).await?,
                    }
                }
                changed = wake.changed() => {
                    if changed.is_err() {
                        return Err(End::Shutdown);
                    }
                    self.check_still_enrolled().await?;
                    command_cursor = self.send_commands(command_cursor).await?;
                }
                _ = agent_wake.changed() => {
                    command_cursor = self.send_commands(command_cursor).await?;
                }
                _ = record_acks.tick() => self.record_ack().await?,
                _ = poll.tick() => {
                    command_cursor = self.send_commands(command_cursor).await?;
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > heartbeat * 3 {
                        return Err(End::Silent);
                    }
                    nonce += 1;
                    self.send(controller_frame::Body::Ping(meridian_proto::Ping {
                        nonce,
                        sent_at_ms: Utc::now().timestamp_millis(),
                    }))
                    .await?;
                }
            }
        }
    }

    /// Records the newest command acknowledgement received, if it is not recorded yet.
    async fn record_ack(&mut self) -> Result<(), End> {
        if self.ack.received > self.ack.recorded {
            self.gw
                .store
                .ack_commands(self.agent, self.ack.received, None)
                .await
                .map_err(End::Store)?;
            self.ack.recorded = self.ack.received;
        }
        Ok(())
    }

    async fn check_still_enrolled(&self) -> Result<(), End> {
        let agent = self.gw.store.agent(self.agent).await.map_err(End::Store)?;
        match agent {
            Some(a) if a.revoked_at.is_none() && a.credential_hash == self.credential_hash => {
                Ok(())
            }
            _ => Err(End::Revoked),
        }
    }

    /// Sends every command after `cursor`; returns the new cursor.
    async fn send_commands(&self, mut cursor: u64) -> Result<u64, End> {
        loop {
            let page = self
                .gw
                .store
                .commands_after(self.agent, cursor, COMMAND_PAGE)
                .await
                .map_err(End::Store)?;
            let full = page.len() == COMMAND_PAGE as usize;
            for cmd in page {
                cursor = cmd.seq;
                self.send(controller_frame::Body::Command(meridian_proto::Command {
                    seq: cmd.seq,
                    kind: cmd.kind,
                    payload: cmd.payload,
                    nonce: cmd.nonce,
                }))
                .await?;
                self.gw.metrics.commands_sent.inc();
            }
            if !full {
                return Ok(cursor);
            }
        }
    }

    async fn handle(&mut self, f: AgentFrame) -> Result<(), End> {
        if let Err(refusal) = wire::check_frame(&f) {
            if matches!(f.body, Some(agent_frame::Body::Events(_))) {
                self.gw.metrics.event_batches_refused.inc();
            }
            return Err(refusal.into());
        }
        match f.body {
            None => Err(End::Protocol("empty_frame", "frame without a body".into())),
            Some(agent_frame::Body::Hello(_)) => Err(End::Protocol(
                "unexpected_hello",
                "Hello is only valid as the first frame".into(),
            )),
            Some(agent_frame::Body::Events(batch)) => self.ingest(batch).await,
            Some(agent_frame::Body::CommandAck(ack)) => {
                let error = (!ack.error.is_empty()).then(|| truncate(&ack.error, 2000));
                if let Some(e) = &error {
                    tracing::warn!(up_to = ack.up_to_seq, error = %e, "agent reported a failed command");
                }
                self.ack.received = self.ack.received.max(ack.up_to_seq);
                if error.is_some() {
                    // A failure is recorded at once, with its reason.
                    self.gw
                        .store
                        .ack_commands(self.agent, ack.up_to_seq, error.as_deref())
                        .await
                        .map_err(End::Store)?;
                    self.ack.recorded = self.ack.recorded.max(ack.up_to_seq);
                }
                Ok(())
            }
            Some(agent_frame::Body::Status(s)) => {
                let now = Utc::now();
                self.clock.observe(skew(s.agent_time_ms, now));
                let update = AgentStatusUpdate {
                    connected: true,
                    last_seen: Some(now),
                    version: None,
                    config_revision: Some(s.config_revision),
                    outbox_pending: Some(s.outbox_pending),
                    clock_skew_ms: Some(skew(s.agent_time_ms, now)),
                    store_error: Some(truncate(&s.store_error, 2000)),
                };
                self.gw.store.update_agent_status(self.agent, &update).await.map_err(End::Store)
            }
            Some(agent_frame::Body::Ping(p)) => {
                self.send(controller_frame::Body::Pong(meridian_proto::Pong {
                    nonce: p.nonce,
                    sent_at_ms: p.sent_at_ms,
                }))
                .await
            }
            Some(agent_frame::Body::Pong(_)) => Ok(()),
        }
    }

    async fn ingest(&mut self, batch: meridian_proto::EventBatch) -> Result<(), End> {
        let (events, quarantined) = wire::events(batch, Utc::now()).inspect_err(|_| {
            self.gw.metrics.event_batches_refused.inc();
        })?;
        let n = events.len() as u64;
        let requests = crate::store::requests::has_request_events(&events);
        let acked = match self
            .gw
            .store
            .ingest_events(self.agent, &events, Utc::now())
            .await
            .map_err(End::Store)?
        {
            Ok(acked) => {
                self.gw.metrics.events_ingested.inc_by(n - quarantined);
                self.gw.metrics.events_quarantined.inc_by(quarantined);
                if quarantined > 0 {
                    tracing::warn!(agent = %self.agent, quarantined, "malformed events quarantined");
                }
                if requests {
                    // Commands the ledger decided for other agents go out right away (the
                    // ledger sweep moves them too should this fail or the replica stop here).
                    match self.gw.store.flush_request_commands_by_agent().await {
                        Ok(flushed) => {
                            for (agent, _) in flushed {
                                self.gw.agent_wakes.wake(&agent);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not flush request commands; the sweep will")
                        }
                    }
                }
                acked
            }
            Err(IngestError::UnknownAgent) => return Err(End::Revoked),
            Err(IngestError::NotContiguous(seq)) => {
                self.gw.metrics.event_batches_refused.inc();
                return Err(End::Protocol(
                    "not_contiguous",
                    format!("batch is not contiguous at {seq}"),
                ));
            }
            Err(IngestError::Gap { first, acked }) => {
                // The start of the next session decides what the agent still holds (and records
                // a gap for what it does not); re-acknowledging here would have the agent send
                // the same batch again at once, forever.
                self.gw.metrics.event_batches_refused.inc();
                return Err(End::Protocol(
                    "gap",
                    format!("batch starts at {first} but only {acked} is stored; reconnect"),
                ));
            }
        };
        self.send(controller_frame::Body::EventAck(meridian_proto::EventAck { up_to_seq: acked }))
            .await
    }
}

fn skew(agent_time_ms: i64, now: DateTime<Utc>) -> i64 {
    if agent_time_ms == 0 { 0 } else { agent_time_ms.saturating_sub(now.timestamp_millis()) }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}
