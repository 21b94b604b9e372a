//! The agent's link to the controller: enroll once, then keep one session open — reconnecting
//! with capped exponential backoff and full jitter — and over it stream the outbox, apply
//! commands and report status.
//!
//! Cursors: on every (re)connect the Welcome carries the controller's gapless acknowledgement;
//! the agent resends everything after it (the controller stores idempotently, so resending what
//! was stored but not acknowledged is harmless). Commands are applied in the agent's own
//! transaction together with the record of their sequence, so a repeated command is a no-op,
//! and acknowledged after that commit. A peer that stays silent for three heartbeats (the
//! controller pings every heartbeat) is declared dead; HTTP/2 keepalive catches a blackholed
//! TCP connection at the transport level too.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use meridian_proto::agent_gateway_client::AgentGatewayClient;
use meridian_proto::{AgentFrame, ControllerFrame, agent_frame, controller_frame};
use meridian_shared::backoff::BackoffPolicy;
use meridian_shared::commands::ControllerCommand;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::Context;
use crate::store::queries::{self, Identity};

/// Events per batch frame.
const BATCH: u32 = 500;
/// Events sent but not yet acknowledged, at most.
const MAX_IN_FLIGHT: u64 = 10_000;
/// Outbound frames buffered towards the transport; when full the link waits.
const OUTBOUND_BUFFER: usize = 64;
/// Heartbeats the controller may leave events in flight unacknowledged before the session is
/// restarted (acknowledgements normally follow within one commit).
const ACK_PATIENCE: u32 = 10;
/// A session that lived this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// What the branch sees of its link.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkStatus {
    pub connected: bool,
    /// When `connected` last changed (online since / offline since).
    pub since: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

#[derive(Clone)]
pub struct LinkSettings {
    pub controller_url: String,
    pub ca_cert: Option<Vec<u8>>,
    pub enrollment_token: String,
    pub heartbeat: Duration,
    pub backoff: BackoffPolicy,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    #[error("cannot reach the controller: {0}")]
    Connect(String),
    #[error("controller refused: {0}")]
    Refused(String),
    #[error("session lost: {0}")]
    Lost(String),
    #[error("no heartbeat from the controller for {0:?}")]
    Silent(Duration),
    #[error("local store: {0}")]
    Store(#[from] crate::error::Error),
    #[error("not enrolled and no enrollment token is configured")]
    NotEnrolled,
}

/// Runs the link until `shutdown`.
pub async fn run(ctx: Arc<Context>, settings: LinkSettings, shutdown: CancellationToken) {
    let mut attempt = 0u32;
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = session(&ctx, &settings, &shutdown) => r,
        };
        if shutdown.is_cancelled() {
            break;
        }
        let error = match result {
            Ok(()) => "session closed".to_owned(),
            Err(e) => e.to_string(),
        };
        set_link(&ctx, false, Some(error.clone()));
        ctx.metrics.link_reconnects.inc();
        if started.elapsed() >= HEALTHY_AFTER {
            attempt = 0;
        }
        let delay = settings.backoff.delay(attempt, &mut rand::rng());
        attempt = attempt.saturating_add(1);
        tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, attempt, "controller link down");
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    set_link(&ctx, false, Some("agent shutting down".into()));
}

fn set_link(ctx: &Context, connected: bool, error: Option<String>) {
    let flipped = ctx.link.borrow().connected != connected;
    if flipped {
        ctx.activity.send_modify(|n| *n = n.wrapping_add(1));
    }
    ctx.link.send_if_modified(|s| {
        let changed = s.connected != connected || s.since.is_none();
        if changed {
            s.connected = connected;
            s.since = Some(ctx.clock.now());
        }
        let error_changed = s.last_error != error;
        s.last_error = error;
        changed || error_changed
    });
}

fn endpoint(settings: &LinkSettings, heartbeat: Duration) -> Result<Endpoint, LinkError> {
    let mut ep = Endpoint::from_shared(settings.controller_url.clone())
        .map_err(|e| LinkError::Connect(format!("invalid controller_url: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(heartbeat)
        .keep_alive_timeout(heartbeat * 2)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if settings.controller_url.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new();
        tls = match &settings.ca_cert {
            Some(pem) => tls.ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            None => tls.with_webpki_roots(),
        };
        ep = ep.tls_config(tls).map_err(|e| LinkError::Connect(format!("TLS: {e}")))?;
    }
    Ok(ep)
}

pub(crate) async fn connect(
    settings: &LinkSettings,
    heartbeat: Duration,
) -> Result<AgentGatewayClient<Channel>, LinkError> {
    let channel = endpoint(settings, heartbeat)?.connect().await.map_err(|e| {
        LinkError::Connect(format!(
            "{e}: {}",
            std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default()
        ))
    })?;
    Ok(AgentGatewayClient::new(channel)
        .max_decoding_message_size(16 * 1024 * 1024)
        .max_encoding_message_size(16 * 1024 * 1024))
}

async fn enroll(ctx: &Context, settings: &LinkSettings) -> Result<Identity, LinkError> {
    if settings.enrollment_token.is_empty() {
        return Err(LinkError::NotEnrolled);
    }
    let mut client = connect(settings, settings.heartbeat).await?;
    let hostname =
        std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    let resp = client
        .enroll(meridian_proto::EnrollRequest {
            token: settings.enrollment_token.clone(),
            hostname,
            version: crate::VERSION.to_owned(),
        })
        .await
        .map_err(|s| LinkError::Refused(format!("enrollment: {}", s.message())))?
        .into_inner();
    let identity =
        Identity { agent_id: resp.agent_id, site: resp.site_code, credential: resp.credential };
    let saved = identity.clone();
    ctx.db.write(move |c| queries::save_identity(c, &saved)).await?;
    tracing::info!(agent = %identity.agent_id, site = %identity.site, "enrolled with the controller");
    Ok(identity)
}

fn frame(body: agent_frame::Body) -> AgentFrame {
    AgentFrame { body: Some(body) }
}

struct Cursors {
    /// Highest event sequence acknowledged by the controller.
    acked: u64,
    /// Highest event sequence sent in this session.
    sent: u64,
    /// When the acknowledgement last advanced (or nothing was in flight).
    progress_at: Instant,
}

async fn session(
    ctx: &Arc<Context>,
    settings: &LinkSettings,
    shutdown: &CancellationToken,
) -> Result<(), LinkError> {
    let identity = match ctx.db.read(queries::identity).await? {
        Some(id) => id,
        None => enroll(ctx, settings).await?,
    };
    let mut client = connect(settings, settings.heartbeat).await?;
    let (outbox, config_revision, head, checkpoints) = ctx
        .db
        .write(|c| {
            let head = queries::applied_head(c)?;
            Ok((
                queries::outbox_report(c)?,
                queries::config_revision(c)?,
                head,
                queries::applied_checkpoints(c, head.seq)?,
            ))
        })
        .await?;
    let high_water = outbox.high_water;
    let (out, out_rx) = mpsc::channel::<AgentFrame>(OUTBOUND_BUFFER);
    out.send(frame(agent_frame::Body::Hello(meridian_proto::Hello {
        agent_id: identity.agent_id.clone(),
        site_code: identity.site.clone(),
        version: crate::VERSION.to_owned(),
        config_revision,
        last_applied_command_seq: head.seq,
        outbox_high_water: high_water,
        agent_time_ms: ctx.system_time().timestamp_millis(),
        outbox_acked: outbox.acked,
        outbox_oldest: outbox.oldest_retained,
        lineage: outbox
            .lineage
            .iter()
            .map(|s| meridian_proto::Segment {
                id: s.id,
                first_seq: s.first_seq,
                origin_keep_through: s.origin.map_or(0, |o| o.keep_through),
                origin_base: s.origin.map_or(0, |o| o.base),
                origin_moved_head: s.origin.map_or(0, |o| o.moved_head),
            })
            .collect(),
        last_applied_command_nonce: head.nonce,
        holes: outbox
            .holes
            .iter()
            .map(|h| meridian_proto::Gap { first: h.first, last: h.last })
            .collect(),
        applied_checkpoints: checkpoints
            .into_iter()
            .map(|(seq, nonce)| meridian_proto::AppliedCommand { seq, nonce })
            .collect(),
    })))
    .await
    .map_err(|_| LinkError::Lost("outbound closed".into()))?;
    let mut request = tonic::Request::new(ReceiverStream::new(out_rx));
    let auth = format!("Bearer {}", identity.credential)
        .parse()
        .map_err(|_| LinkError::Refused("stored credential is not a valid header value".into()))?;
    request.metadata_mut().insert("authorization", auth);
    let mut inbound = client
        .session(request)
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                LinkError::Refused(s.message().to_owned())
            }
            _ => LinkError::Lost(s.message().to_owned()),
        })?
        .into_inner();

    let welcome = match tokio::time::timeout(settings.heartbeat * 3, inbound.message()).await {
        Err(_) => return Err(LinkError::Silent(settings.heartbeat * 3)),
        Ok(Err(s)) => return Err(LinkError::Lost(s.message().to_owned())),
        Ok(Ok(None)) => return Err(LinkError::Lost("closed before Welcome".into())),
        Ok(Ok(Some(ControllerFrame { body: Some(controller_frame::Body::Welcome(w)) }))) => w,
        Ok(Ok(Some(ControllerFrame { body: Some(controller_frame::Body::Error(e)) }))) => {
            return Err(LinkError::Refused(format!("{}: {}", e.code, e.message)));
        }
        Ok(Ok(Some(_))) => return Err(LinkError::Lost("expected Welcome".into())),
    };
    ctx.controller_time(welcome.controller_time_ms);
    let heartbeat = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms))
        .clamp(Duration::from_millis(100), Duration::from_secs(60));
    let acked = start_streams(ctx, &welcome).await?;
    tracing::info!(acked, high_water, config_revision, "session established");
    set_link(ctx, true, None);

    let out = Outbound { tx: out, stall_after: heartbeat * 3 };
    let mut cursors = Cursors { acked, sent: acked, progress_at: Instant::now() };
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut nonce = 0u64;
    pump(ctx, &out, &mut cursors).await?;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            msg = inbound.message() => {
                last_heard = Instant::now();
                let f = match msg {
                    Err(s) => return Err(LinkError::Lost(s.message().to_owned())),
                    Ok(None) => return Err(LinkError::Lost("controller closed the session".into())),
                    Ok(Some(f)) => f,
                };
                handle(ctx, &identity, &out, &mut cursors, f).await?;
            }
            _ = ctx.outbox_changed.notified() => pump(ctx, &out, &mut cursors).await?,
            _ = tick.tick() => {
                if cursors.sent == cursors.acked {
                    cursors.progress_at = Instant::now();
                } else if cursors.progress_at.elapsed() > heartbeat * ACK_PATIENCE {
                    // Alive but not acknowledging: start over from the controller's cursor.
                    return Err(LinkError::Lost(format!(
                        "no acknowledgement for {:?} with {} events in flight",
                        cursors.progress_at.elapsed(),
                        cursors.sent - cursors.acked
                    )));
                }
                if last_heard.elapsed() > heartbeat * 3 {
                    return Err(LinkError::Silent(last_heard.elapsed()));
                }
                nonce += 1;
                let now = ctx.clock.now().timestamp_millis();
                send(&out, agent_frame::Body::Ping(meridian_proto::Ping { nonce, sent_at_ms: now })).await?;
                let (high, acked) = ctx.db.read(queries::outbox_state).await?;
                let revision = ctx.db.read(queries::config_revision).await?;
                send(&out, agent_frame::Body::Status(meridian_proto::Status {
                    config_revision: revision,
                    outbox_pending: high.saturating_sub(acked),
                    outbox_high_water: high,
                    agent_time_ms: ctx.system_time().timestamp_millis(),
                    store_error: ctx.db.health().unwrap_or_default(),
                })).await?;
                pump(ctx, &out, &mut cursors).await?;
            }
        }
    }
}

/// Takes the Welcome's cursors: renumbers the outbox when the store came back from a backup
/// older than what the controller holds, sets aside commands applied from a controller log
/// since restored from an older dump, and takes the controller's acknowledgement as its own
/// (lower than the one held when the controller's database went back: nothing it lacks is
/// pruned then). Returns the acknowledgement.
async fn start_streams(ctx: &Context, welcome: &meridian_proto::Welcome) -> Result<u64, LinkError> {
    let now = ctx.clock.now();
    let steps: Vec<meridian_shared::lineage::Step> = welcome
        .resequence
        .iter()
        .map(|r| meridian_shared::lineage::Step {
            keep_through: r.keep_through,
            base: r.base,
            segment: r.segment_id,
            moved_head: r.moved_head,
        })
        .collect();
    if let Some(bad) = steps.iter().find(|s| s.base <= s.keep_through || s.segment == 0) {
        return Err(LinkError::Refused(format!(
            "malformed renumbering from the controller: {bad:?}"
        )));
    }
    let floors: Vec<queries::TicketFloor> = welcome
        .ticket_floors
        .iter()
        .map(|f| queries::TicketFloor {
            queue: f.queue.clone(),
            business_day: f.business_day.clone(),
            last_number: f.last_number,
        })
        .collect();
    let rebase = welcome.command_rebase_to;
    let retention = ctx.local_retention;
    let welcome_acked = welcome.acked_event_seq;
    let (acked, moved, set_aside) = ctx
        .db
        .write(move |c| {
            let mut moved = None;
            for step in &steps {
                *moved.get_or_insert(0) += queries::resequence(c, step, now)?;
            }
            if moved.is_some() {
                queries::raise_ticket_counters(c, &floors)?;
            }
            let set_aside = match rebase {
                Some(to) => {
                    let n = queries::set_aside_commands(c, to, now)?;
                    queries::note(
                        c,
                        "controller_restored",
                        &format!(
                            "controller restored: {n} commands applied after {to} set aside; \
                             the controller streams its log again from there"
                        ),
                        now,
                    )?;
                    Some(n)
                }
                None => None,
            };
            let (high_water, _) = queries::outbox_state(c)?;
            let acked = welcome_acked.min(high_water);
            queries::set_acked(c, acked)?;
            queries::ack_outbox(c, acked, now, retention)?;
            Ok((acked, moved, set_aside))
        })
        .await?;
    if let Some(moved) = moved {
        tracing::warn!(
            moved,
            acked,
            "store restored from a backup: unsent events renumbered above the controller's acknowledgement"
        );
        ctx.changed();
    }
    if let Some(n) = set_aside {
        tracing::warn!(set_aside = n, to = ?rebase, "controller database restored from a dump: applied commands set aside, its log streams again");
    }
    Ok(acked)
}

/// The frames going up to the controller. A send that cannot complete within `stall_after`
/// (the transport stopped taking data: both directions blocked, or a dead peer the keepalive
/// has not caught yet) ends the session, so the link never waits forever.
struct Outbound {
    tx: mpsc::Sender<AgentFrame>,
    stall_after: Duration,
}

async fn send(out: &Outbound, body: agent_frame::Body) -> Result<(), LinkError> {
    match tokio::time::timeout(out.stall_after, out.tx.send(frame(body))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(LinkError::Lost("outbound stream closed".into())),
        Err(_) => Err(LinkError::Silent(out.stall_after)),
    }
}

/// Sends outbox events after the sent cursor while the in-flight window allows.
async fn pump(ctx: &Context, out: &Outbound, c: &mut Cursors) -> Result<(), LinkError> {
    while c.sent < c.acked + MAX_IN_FLIGHT {
        let after = c.sent;
        let batch = ctx.db.read(move |conn| queries::outbox_after(conn, after, BATCH)).await?;
        let Some(last) = batch.last() else { break };
        c.sent = last.seq;
        let events = batch
            .into_iter()
            .map(|e| meridian_proto::Event {
                seq: e.seq,
                kind: e.kind,
                occurred_at_ms: e.occurred_at_ms,
                payload: e.payload,
            })
            .collect();
        send(out, agent_frame::Body::Events(meridian_proto::EventBatch { events })).await?;
    }
    Ok(())
}

async fn handle(
    ctx: &Arc<Context>,
    identity: &Identity,
    out: &Outbound,
    c: &mut Cursors,
    f: ControllerFrame,
) -> Result<(), LinkError> {
    match f.body {
        Some(controller_frame::Body::EventAck(ack)) => {
            let up_to = ack.up_to_seq;
            if up_to > c.sent {
                return Err(LinkError::Lost(format!(
                    "controller acknowledged {up_to}, beyond what was sent ({})",
                    c.sent
                )));
            }
            if up_to > c.acked {
                c.acked = up_to;
                c.progress_at = Instant::now();
                let now = ctx.clock.now();
                let retention = ctx.local_retention;
                ctx.db.write(move |conn| queries::ack_outbox(conn, up_to, now, retention)).await?;
            } else if up_to < c.sent {
                // A re-acknowledgement below what we sent: resend from there.
                c.acked = up_to;
                c.sent = up_to;
            }
            pump(ctx, out, c).await
        }
        Some(controller_frame::Body::Command(cmd)) => {
            let error =
                apply_command(ctx, identity, cmd.seq, cmd.nonce, &cmd.kind, &cmd.payload).await?;
            send(
                out,
                agent_frame::Body::CommandAck(meridian_proto::CommandAck {
                    up_to_seq: cmd.seq,
                    error: error.unwrap_or_default(),
                }),
            )
            .await
        }
        Some(controller_frame::Body::Ping(p)) => {
            send(
                out,
                agent_frame::Body::Pong(meridian_proto::Pong {
                    nonce: p.nonce,
                    sent_at_ms: p.sent_at_ms,
                }),
            )
            .await
        }
        Some(controller_frame::Body::Pong(_)) => Ok(()),
        Some(controller_frame::Body::Error(e)) => {
            Err(LinkError::Refused(format!("{}: {}", e.code, e.message)))
        }
        Some(controller_frame::Body::Welcome(_)) | None => {
            Err(LinkError::Lost("unexpected frame from the controller".into()))
        }
    }
}

/// Applies one command idempotently; returns the error to report, if it was rejected.
async fn apply_command(
    ctx: &Arc<Context>,
    identity: &Identity,
    seq: u64,
    nonce: u64,
    kind: &str,
    payload: &[u8],
) -> Result<Option<String>, LinkError> {
    let site = identity.site.clone();
    let (kind, payload) = (kind.to_owned(), payload.to_vec());
    let now = ctx.clock.now();
    let config = ctx.config.borrow().clone();
    let rules = config.as_deref().map(|c| ctx.rules.get(c)).unwrap_or_default();
    let gate = ctx.upgrades.gate.clone();
    let applied = ctx
        .db
        .write(move |conn| {
            apply_command_with_gate(
                conn,
                &site,
                config.as_deref(),
                &rules,
                &gate,
                (seq, nonce),
                &kind,
                &payload,
                now,
            )
        })
        .await?;
    if let Some(snap) = applied.config {
        tracing::info!(revision = snap.revision, "applied configuration");
        ctx.config.send_replace(Some(Arc::new(snap)));
        ctx.changed();
    } else if applied.changed {
        // An appointment or a request changed (and a request operation's outcome waits in
        // the outbox): wake the outbox pump and the terminals.
        tracing::debug!(seq, "stored a change from the controller");
        ctx.changed();
    }
    if applied.sync_requested && applied.error.is_none() {
        ctx.sync_requested.notify_one();
    }
    if applied.upgrade_requested && applied.error.is_none() {
        ctx.upgrades.requested.notify_one();
    }
    if let Some(e) = &applied.error {
        ctx.metrics.commands_rejected.inc();
        tracing::warn!(seq, error = %e, "rejected a command from the controller");
    }
    Ok(applied.error)
}

/// What applying one command did.
#[derive(Debug, Default)]
pub struct CommandApplied {
    /// A newer configuration now in force.
    pub config: Option<meridian_shared::config::SiteConfig>,
    /// Whether stored state changed (appointments, requests).
    pub changed: bool,
    /// Requests that arrived here as master (for the arrival rules).
    pub arrived: Vec<crate::requests::Request>,
    pub sync_requested: bool,
    /// An upgrade was recorded, superseded or cancelled (the upgrader has work).
    pub upgrade_requested: bool,
    /// Why the command was rejected (recorded, and acknowledged with it).
    pub error: Option<String>,
}

/// Applies command `seq` inside one store job: skipped if already applied, else applied and
/// recorded together (with its error if it is rejected: a command that cannot be applied never
/// blocks the log). A request arriving here as master fires this site's arrival rules in the
/// same job. Store failures are returned, and the job rolls back. An `AGENT_UPGRADE` is judged
/// by a gate that trusts no release key (see `apply_command_with_gate`).
#[allow(clippy::too_many_arguments)]
pub fn apply_command_in(
    conn: &rusqlite::Connection,
    site: &str,
    config: Option<&meridian_shared::config::SiteConfig>,
    rules: &crate::request_rules::RuleSet,
    seq: u64,
    kind: &str,
    payload: &[u8],
    now: DateTime<Utc>,
) -> crate::error::Result<CommandApplied> {
    let gate = crate::upgrade::Gate::none();
    apply_command_with_gate(conn, site, config, rules, &gate, (seq, 0), kind, payload, now)
}

/// `apply_command_in`, with the gate `AGENT_UPGRADE` commands are judged by (the agent's
/// release keys, platform, version and whether it can replace its binary), for the command
/// `(seq, nonce)`: one whose nonce was applied before and set aside (see
/// `queries::set_aside_commands`) is recorded without being applied again.
#[allow(clippy::too_many_arguments)]
pub fn apply_command_with_gate(
    conn: &rusqlite::Connection,
    site: &str,
    config: Option<&meridian_shared::config::SiteConfig>,
    rules: &crate::request_rules::RuleSet,
    gate: &crate::upgrade::Gate,
    (seq, nonce): (u64, u64),
    kind: &str,
    payload: &[u8],
    now: DateTime<Utc>,
) -> crate::error::Result<CommandApplied> {
    use crate::error::Error;
    if seq <= queries::last_applied_command(conn)? {
        return Ok(CommandApplied::default());
    }
    if queries::take_set_aside(conn, nonce)? {
        queries::record_command(conn, seq, nonce, kind, None, now)?;
        return Ok(CommandApplied::default());
    }
    let mut done = CommandApplied::default();
    let outcome = match ControllerCommand::decode(kind, payload) {
        Ok(ControllerCommand::ApplyConfig(snap)) if snap.site.code.as_str() != site => {
            Err(format!("configuration for site {} sent to an agent of {site}", snap.site.code))
        }
        Ok(ControllerCommand::ApplyConfig(snap)) => {
            if queries::apply_config(conn, &snap, now)? {
                done.config = Some(*snap);
            }
            Ok(())
        }
        Ok(ControllerCommand::UpsertAppointment(a)) if a.site.as_str() != site => {
            Err(format!("appointment of site {} sent to an agent of {site}", a.site))
        }
        Ok(ControllerCommand::UpsertAppointment(a)) => {
            done.changed = crate::appointment_sync::apply_live(conn, &a, seq, now)?;
            Ok(())
        }
        Ok(ControllerCommand::SyncAppointments(req)) => {
            crate::appointment_sync::record_request(conn, &req, now)?;
            done.sync_requested = true;
            Ok(())
        }
        Ok(ControllerCommand::Upgrade(cmd)) => {
            done.upgrade_requested = crate::upgrade::apply_command(conn, gate, seq, &cmd, now)?;
            // A refusal is reported as `AGENT_UPGRADE_STATUS failed` in the outbox.
            done.changed = true;
            Ok(())
        }
        Ok(ControllerCommand::CancelUpgrade(c)) => {
            done.upgrade_requested = crate::upgrade::cancel(conn, c.rollout_id, now)?;
            Ok(())
        }
        Ok(cmd) => match crate::distribution::apply_command(conn, config, &cmd, now) {
            Ok(arrived) => {
                if let Some(config) = config {
                    for r in &arrived {
                        crate::request_rules::on_event(
                            conn,
                            config,
                            rules,
                            r,
                            crate::request_rules::RuleEvent::Arrived,
                            now,
                        )?;
                    }
                }
                done.changed = true;
                done.arrived = arrived;
                Ok(())
            }
            Err(e @ (Error::Store(_) | Error::StoreGone(_) | Error::Internal(_))) => {
                return Err(e);
            }
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    match outcome {
        Ok(()) => queries::record_command(conn, seq, nonce, kind, None, now)?,
        Err(e) => {
            queries::record_command(conn, seq, nonce, kind, Some(&e), now)?;
            done = CommandApplied { error: Some(e), ..CommandApplied::default() };
        }
    }
    Ok(done)
}
