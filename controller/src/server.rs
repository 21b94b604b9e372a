//! Running a controller: open the store, make sure an admin can get in, serve the admin API and
//! the agent gateway on listeners the caller has bound, until `shutdown` is cancelled.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meridian_shared::private_files;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, ApiState};
use crate::error::{Error, Result};
use crate::gateway::{Gateway, MAX_MESSAGE_BYTES};
use crate::metrics::Metrics;
use crate::settings::{Settings, redact_url};
use crate::store::{self, Role, Store};

/// Sessions get this long to finish after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub struct Listeners {
    pub api: TcpListener,
    pub gateway: TcpListener,
}

impl Listeners {
    pub async fn bind(settings: &Settings) -> std::io::Result<Self> {
        Ok(Listeners {
            api: TcpListener::bind(&settings.api_listen).await?,
            gateway: TcpListener::bind(&settings.gateway_listen).await?,
        })
    }
}

/// The bootstrap admin token's file in `data_dir` when `bootstrap_token_file` is not set.
pub const BOOTSTRAP_TOKEN_FILE: &str = "bootstrap-token";

/// Creates the bootstrap admin token when no token exists yet. Returns its secret and writes it
/// to `file` (0600) when given — before the token exists, so a token is never created that
/// nobody can read.
pub async fn ensure_bootstrap_token(
    store: &dyn Store,
    file: Option<&Path>,
) -> Result<Option<String>> {
    if !store.list_api_tokens().await?.is_empty() {
        return Ok(None);
    }
    let (token, secret) = api::new_api_token("bootstrap", Role::Admin);
    if let Some(file) = file {
        write_secret_file(file, &secret)?;
    }
    store.insert_api_token(&token).await?;
    Ok(Some(secret))
}

/// Writes a secret to `file`, readable by its owner only (0600 from the moment it exists; a
/// missing folder is created 0700).
pub fn write_secret_file(file: &Path, secret: &str) -> Result<()> {
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        private_files::create_dir(dir)
            .map_err(|e| Error::Internal(format!("{}: {e}", dir.display())))?;
    }
    private_files::write(file, format!("{secret}\n").as_bytes())
        .map_err(|e| Error::Internal(format!("{}: {e}", file.display())))
}

/// Serves until `shutdown` is cancelled, then drains sessions for up to `SHUTDOWN_GRACE`.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<()> {
    if settings.database_url.is_empty() {
        private_files::create_dir(&settings.data_dir)
            .map_err(|e| Error::Internal(format!("{}: {e}", settings.data_dir.display())))?;
    }
    let url = settings.database_url();
    tracing::info!(database = %redact_url(&url), "opening store");
    let store = store::open(&url).await?;
    // The secret goes to a file only the controller's user can read, never to the log.
    let token_file = settings
        .bootstrap_token_file
        .clone()
        .unwrap_or_else(|| settings.data_dir.join(BOOTSTRAP_TOKEN_FILE));
    if ensure_bootstrap_token(store.as_ref(), Some(&token_file)).await?.is_some() {
        tracing::warn!(file = %token_file.display(), "created the bootstrap admin API token in this file (mode 0600); create your own admin token with it, then delete the file");
    }
    serve(settings, store, listeners, shutdown).await
}

/// Like `run`, with an already opened store.
pub async fn serve(
    settings: Settings,
    store: Arc<dyn Store>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<()> {
    // A malformed release key is a configuration error: refuse to start.
    let release_policy = settings.release_policy()?;
    // So does a metrics address that cannot be bound, before any task starts.
    let metrics_listener = bind_metrics(&settings.metrics_listen).await?;
    let metrics = Arc::new(Metrics::default());
    let (commands_tx, commands_rx) = tokio::sync::watch::channel(0u64);
    let tasks = TaskTracker::new();
    let gateway_addr =
        listeners.gateway.local_addr().map_err(|e| Error::Internal(e.to_string()))?;
    let api_addr = listeners.api.local_addr().map_err(|e| Error::Internal(e.to_string()))?;

    let commands_tx = Arc::new(commands_tx);
    tasks.spawn(crate::stats::run_projector(
        store.clone(),
        Duration::from_secs(1),
        shutdown.clone(),
    ));
    // Monthly partitions ahead of time (PostgreSQL) and retention: at start-up, then hourly.
    tasks.spawn(crate::store::maintenance::run_maintenance(
        store.clone(),
        settings.retention(),
        crate::store::maintenance::MAINTENANCE_EVERY,
        shutdown.clone(),
    ));
    // Other replicas' commits wake this replica's sessions (LISTEN/NOTIFY on PostgreSQL).
    let agent_wakes = Arc::new(crate::wake::AgentWakes::default());
    tasks.spawn({
        let (store, wake, shutdown) = (store.clone(), commands_tx.clone(), shutdown.clone());
        let agents = agent_wakes.clone();
        async move { store.watch_commands(wake, agents, shutdown).await }
    });
    let clock: Arc<dyn meridian_shared::clock::Clock> =
        Arc::new(meridian_shared::clock::SystemClock);
    // The nightly appointment sync: each site at its own local time, once across replicas.
    tasks.spawn(crate::appointments::sync::run_scheduler(
        store.clone(),
        clock.clone(),
        Duration::from_millis(settings.appointment_sync_tick_ms.max(100)),
        commands_tx.clone(),
        shutdown.clone(),
    ));
    // The distributed-request ledger: timeouts, retries, scheduled updates, staged commands.
    tasks.spawn(crate::distribution::run_ledger(
        store.clone(),
        clock.clone(),
        Duration::from_millis(settings.request_ledger_tick_ms.max(50)),
        commands_tx.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    // Agent upgrade rollouts: waves, maintenance windows, halts (one replica at a time).
    tasks.spawn(crate::rollouts::run_driver(
        store.clone(),
        clock.clone(),
        Duration::from_millis(settings.rollout_tick_ms.max(50)),
        crate::rollouts::DriverSettings {
            health_timeout_s: settings
                .rollout_health_timeout_s
                .min(*crate::rollouts::HEALTH_TIMEOUT_RANGE.end()),
        },
        commands_tx.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let api_state = ApiState {
        store: store.clone(),
        metrics: metrics.clone(),
        commands_changed: commands_tx,
        clock_skew_tolerance: settings.clock_skew_tolerance(),
    };
    let router =
        api::router_with(api_state.clone(), settings.max_body_bytes, clock.clone(), release_policy)
            .merge(crate::console::router(api_state));
    let limits = settings.http_limits();
    let api_task = tokio::spawn(meridian_shared::http_guard::serve(
        listeners.api,
        router,
        limits,
        shutdown.clone().cancelled_owned(),
    ));
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    let metrics_task = metrics_listener.map(|listener| {
        tokio::spawn(meridian_shared::http_guard::serve(
            listener,
            crate::metrics::router(metrics.clone()),
            limits,
            shutdown.clone().cancelled_owned(),
        ))
    });

    let heartbeat = Duration::from_millis(settings.heartbeat_ms.max(100));
    let gateway = Gateway {
        store,
        metrics,
        commands_changed: commands_rx,
        agent_wakes,
        heartbeat,
        command_poll: Duration::from_millis(settings.command_poll_ms.max(100)),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
        clock,
        config: Arc::new(crate::appointments::sync::ConfigCache::default()),
        sync_chunk: settings.appointment_sync_chunk,
        clock_skew_tolerance: settings.clock_skew_tolerance(),
    };
    let service = meridian_proto::agent_gateway_server::AgentGatewayServer::new(gateway)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(heartbeat))
        .http2_keepalive_timeout(Some(heartbeat * 2))
        .tcp_nodelay(true);
    match (&settings.tls_cert, &settings.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &Path| {
                std::fs::read(p).map_err(|e| Error::Internal(format!("{}: {e}", p.display())))
            };
            let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
            builder = builder
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .map_err(|e| Error::Internal(format!("TLS configuration: {e}")))?;
            tracing::info!(%gateway_addr, "agent gateway listening with TLS");
        }
        (None, None) => plaintext_allowed(gateway_addr, settings.dev_mode)?,
        _ => {
            return Err(Error::BadRequest("tls_cert and tls_key must be set together".into()));
        }
    }
    tracing::info!(%api_addr, "admin API listening");
    if let Some(file) = &settings.ready_file {
        let ready = serde_json::json!({
            "api": api_addr.to_string(),
            "gateway": gateway_addr.to_string(),
            "metrics": metrics_addr.map(|a| a.to_string()),
        });
        private_files::write(file, ready.to_string().as_bytes())
            .map_err(|e| Error::Internal(format!("{}: {e}", file.display())))?;
    }
    let gateway_shutdown = shutdown.clone();
    // The builder's `tcp_nodelay` applies only to sockets tonic binds itself: without it on
    // these, a command written right after an acknowledgement waits for the agent's delayed
    // ACK (Nagle), some 40 ms per hop.
    let incoming = tonic::transport::server::TcpIncoming::from(listeners.gateway)
        .with_nodelay(Some(true))
        .with_keepalive(Some(heartbeat * 2));
    let result = builder
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move { gateway_shutdown.cancelled().await })
        .await;
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait()).await.is_err() {
        tracing::warn!("sessions did not finish within the shutdown grace period");
    }
    let api_result = api_task.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    result.map_err(|e| Error::Internal(format!("gateway: {e}")))?;
    match api_result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Internal(format!("admin API: {e}"))),
        Err(e) => Err(Error::Internal(format!("admin API task: {e}"))),
    }
}

/// Binds the metrics listener (`metrics_listen`; empty = none). It is unauthenticated: an
/// address other than loopback is served, with a warning.
async fn bind_metrics(addr: &str) -> Result<Option<TcpListener>> {
    let addr = addr.trim();
    if addr.is_empty() {
        return Ok(None);
    }
    let bound = |e: std::io::Error| Error::Internal(format!("metrics_listen {addr}: {e}"));
    let listener = TcpListener::bind(addr).await.map_err(bound)?;
    let local = listener.local_addr().map_err(bound)?;
    if local.ip().is_loopback() {
        tracing::info!(addr = %local, "metrics listening");
    } else {
        tracing::warn!(addr = %local, "metrics listening on a non-loopback address without authentication");
    }
    Ok(Some(listener))
}

fn plaintext_allowed(addr: SocketAddr, dev_mode: bool) -> Result<()> {
    if addr.ip().is_loopback() {
        tracing::warn!(%addr, "agent gateway is plaintext: allowed because it listens on loopback only");
        Ok(())
    } else if dev_mode {
        tracing::warn!(%addr, "agent gateway is plaintext on a non-loopback address: allowed in dev mode only");
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "the agent gateway on {addr} needs tls_cert and tls_key (plaintext is allowed only on loopback or in dev mode)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_only_on_loopback_or_in_dev_mode() {
        let check = |addr: &str, dev: bool, ok: bool| {
            let addr: SocketAddr = addr.parse().expect("addr");
            assert_eq!(plaintext_allowed(addr, dev).is_ok(), ok, "{addr} dev={dev}");
        };
        check("127.0.0.1:8081", false, true);
        check("[::1]:8081", false, true);
        check("0.0.0.0:8081", false, false);
        check("10.1.2.3:8081", false, false);
        check("0.0.0.0:8081", true, true);
    }
}
