//! End-to-end test support: real controller and agent processes, a fault-injecting TCP proxy
//! between them, fresh PostgreSQL databases, and waiting on conditions with deadlines.
#![allow(dead_code, unused_imports)]

pub mod browser;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;

pub use meridian_controller::testing::{fresh_postgres_url, temp_dir};

/// The connector API key every test site is seeded with.
pub const CONNECTOR_KEY: &str = "mrd_ck_e2e-tests";

/// Polls `check` until it returns `Some`, failing the test with `what` after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > until {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fixed-offset zone in which it is around noon now (Etc/GMT-N is UTC+N), so a site's
/// business day has hours left on either side whenever a test runs; with its offset in hours.
pub fn noon_zone() -> (String, i64) {
    use chrono::Timelike;
    let offset = 12 - i64::from(chrono::Utc::now().hour());
    let name = match offset {
        0 => "Etc/GMT".to_owned(),
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    };
    (name, offset)
}

/// The appointment tests' site SFO in `zone`: open 00:00-23:45 every day, queue `accounts`,
/// service ACC on it taking appointments (15-minute slots of `capacity`), and a connector key
/// for `CONNECTOR_KEY`. Callers add resources or fields before applying it.
pub fn appointment_site(zone: &str, capacity: u32) -> Vec<Value> {
    let every_day: serde_json::Map<String, Value> =
        ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
            .iter()
            .map(|d| (d.to_string(), serde_json::json!(["00:00-23:45"])))
            .collect();
    vec![
        serde_json::json!({"kind": "site", "code": "SFO", "name": "Site SFO", "time_zone": zone,
                           "business_hours": every_day}),
        serde_json::json!({"kind": "queue", "site": "SFO", "code": "accounts", "name": "Accounts",
                           "letter": "B"}),
        serde_json::json!({"kind": "service", "site": "SFO", "code": "ACC", "name": "Accounts",
                           "queue": "accounts",
                           "appointments": {"slot_minutes": 15, "capacity": capacity}}),
        serde_json::json!({"kind": "connector_key", "site": "SFO", "code": "e2e",
                           "name": "E2E tests",
                           "key_hash": meridian_controller::auth::hash_secret(CONNECTOR_KEY)}),
    ]
}

/// Enrolls an agent for SFO in `dir`, talking to `controller` through a new fault proxy, and
/// waits until it is connected and configured.
pub async fn start_site_agent(
    dir: &Path,
    controller: &ControllerProc,
) -> (Arc<FaultProxy>, AgentProc) {
    let token = controller.client().enrollment_token("SFO").await;
    let proxy = FaultProxy::start(controller.gateway).await;
    let agent = AgentProc::start(dir, proxy.addr, &token).await;
    agent
        .wait_status("agent enrolled, configured and connected", |s| {
            s["connected"] == true && s["config_revision"].as_u64() > Some(0)
        })
        .await;
    (proxy, agent)
}

// ---------------------------------------------------------------- fault proxy

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward both ways.
    Pass,
    /// Reset every connection and refuse new ones (RST).
    Cut,
    /// Keep connections open but silently drop every byte, both ways.
    Blackhole,
    /// Forward agent→controller, drop controller→agent (acknowledgements get lost).
    DropDownstream,
    /// Forward both ways, but drop the first connection that carries more than this many
    /// bytes controller→agent after the fault was set (a transfer cut in the middle); once.
    CutOnceAfterDownstream(u64),
}

/// A TCP proxy between agent and controller whose link can be cut, blackholed or made lossy.
pub struct FaultProxy {
    pub addr: SocketAddr,
    fault: watch::Sender<(Fault, u64)>,
    upstream: watch::Sender<SocketAddr>,
    /// Whether `CutOnceAfterDownstream` has cut its connection.
    tripped: Arc<std::sync::atomic::AtomicBool>,
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> Arc<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (fault, _) = watch::channel((Fault::Pass, 0u64));
        let (up, _) = watch::channel(upstream);
        let proxy = Arc::new(FaultProxy {
            addr,
            fault,
            upstream: up,
            tripped: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        });
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let p = p.clone();
                tokio::spawn(async move { p.serve(client).await });
            }
        });
        proxy
    }

    pub fn set(&self, fault: Fault) {
        self.tripped.store(false, std::sync::atomic::Ordering::SeqCst);
        self.fault.send_modify(|(f, generation)| {
            *f = fault;
            *generation += 1;
        });
    }

    /// Whether a `CutOnceAfterDownstream` fault has cut its connection since it was set.
    pub fn tripped(&self) -> bool {
        self.tripped.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn set_upstream(&self, addr: SocketAddr) {
        self.upstream.send_replace(addr);
    }

    async fn serve(&self, client: TcpStream) {
        let mut fault_rx = self.fault.subscribe();
        let (fault, _) = *fault_rx.borrow_and_update();
        if fault == Fault::Cut {
            let _ = client.set_zero_linger();
            return;
        }
        let upstream_addr = *self.upstream.borrow();
        let upstream = if fault == Fault::Blackhole {
            None
        } else {
            TcpStream::connect(upstream_addr).await.ok()
        };
        let Some(upstream) = upstream else {
            // Blackholed from the start (or upstream down): swallow bytes until the fault changes.
            let (mut r, _w) = client.into_split();
            let mut buf = [0u8; 16 * 1024];
            loop {
                tokio::select! {
                    n = r.read(&mut buf) => if matches!(n, Ok(0) | Err(_)) { return },
                    _ = fault_rx.changed() => return,
                }
            }
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (cr, cw) = client.into_split();
        let (ur, uw) = upstream.into_split();
        let up = pump(cr, uw, self.fault.subscribe(), true, self.tripped.clone());
        let down = pump(ur, cw, self.fault.subscribe(), false, self.tripped.clone());
        tokio::join!(up, down);
    }
}

/// Copies `r` to `w` honouring the fault; on `Cut` both sockets are reset.
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<(Fault, u64)>,
    upstream: bool,
    tripped: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    // Bytes forwarded since the fault last changed.
    let mut forwarded = 0u64;
    loop {
        tokio::select! {
            n = r.read(&mut buf) => {
                let n = match n { Ok(0) | Err(_) => break, Ok(n) => n };
                let current = fault.borrow().0;
                let forward = match current {
                    Fault::Pass => true,
                    Fault::DropDownstream => upstream,
                    Fault::Blackhole => false,
                    Fault::Cut => break,
                    Fault::CutOnceAfterDownstream(limit) => {
                        let before = forwarded;
                        forwarded += n as u64;
                        if !upstream
                            && forwarded > limit
                            && !tripped.swap(true, std::sync::atomic::Ordering::SeqCst)
                        {
                            // Deliver exactly up to the limit, then drop the connection.
                            let keep = limit.saturating_sub(before) as usize;
                            let _ = w.write_all(&buf[..keep.min(n)]).await;
                            break;
                        }
                        true
                    }
                };
                if forward && w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            changed = fault.changed() => {
                forwarded = 0;
                if changed.is_err() || fault.borrow().0 == Fault::Cut {
                    break;
                }
            }
        }
    }
    // Reset rather than close gracefully, like a dropped link.
    if let Ok(stream) = r.reunite(w) {
        let _ = stream.set_zero_linger();
    }
}

// ---------------------------------------------------------------- processes

/// Log level of the processes under test (`MERIDIAN_E2E_LOG`, default `warn`).
fn log_level() -> String {
    std::env::var("MERIDIAN_E2E_LOG").unwrap_or_else(|_| "warn".into())
}

fn meridian_bin() -> &'static str {
    env!("CARGO_BIN_EXE_meridian")
}

/// A binary of this build next to `meridian` (`meridian-controller`, `meridian-agent`).
pub fn workspace_binary(name: &str) -> PathBuf {
    let bin = Path::new(meridian_bin()).with_file_name(name);
    assert!(bin.exists(), "{} is missing: build the workspace's binaries first", bin.display());
    bin
}

/// Waits for the JSON a process writes to `file` once it listens.
pub async fn read_ready(file: &Path, child: &mut Child) -> Value {
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("process exited before it was ready: {status}");
        }
        if let Some(v) =
            std::fs::read_to_string(file).ok().and_then(|s| serde_json::from_str(&s).ok())
        {
            return v;
        }
        assert!(tokio::time::Instant::now() < until, "timed out waiting for {}", file.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A controller process.
pub struct ControllerProc {
    pub child: Child,
    pub api: String,
    pub gateway: SocketAddr,
    pub dir: PathBuf,
    pub database_url: String,
    pub token: String,
}

impl ControllerProc {
    pub async fn start(dir: &Path, database_url: &str) -> ControllerProc {
        Self::start_with(dir, database_url, &[]).await
    }

    /// Like `start`, with extra environment (e.g. TLS settings).
    pub async fn start_with(
        dir: &Path,
        database_url: &str,
        env: &[(&str, String)],
    ) -> ControllerProc {
        std::fs::create_dir_all(dir).expect("controller dir");
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let token_file = dir.join("admin-token");
        let mut child = Command::new(meridian_bin())
            .arg("controller")
            .env("MERIDIAN_CONTROLLER_DATABASE_URL", database_url)
            .env("MERIDIAN_CONTROLLER_DATA_DIR", dir)
            .env("MERIDIAN_CONTROLLER_API_LISTEN", "127.0.0.1:0")
            .env("MERIDIAN_CONTROLLER_GATEWAY_LISTEN", "127.0.0.1:0")
            .env("MERIDIAN_CONTROLLER_HEARTBEAT_MS", "500")
            .env("MERIDIAN_CONTROLLER_BOOTSTRAP_TOKEN_FILE", &token_file)
            .env("MERIDIAN_CONTROLLER_READY_FILE", &ready)
            .env("MERIDIAN_CONTROLLER_LOG", log_level())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn controller");
        let r = read_ready(&ready, &mut child).await;
        // Only the first controller on a database writes the bootstrap token; replicas share it.
        let token =
            std::fs::read_to_string(&token_file).map(|t| t.trim().to_owned()).unwrap_or_default();
        ControllerProc {
            child,
            api: format!("http://{}", r["api"].as_str().expect("api addr")),
            gateway: r["gateway"].as_str().expect("gateway addr").parse().expect("addr"),
            dir: dir.to_owned(),
            database_url: database_url.to_owned(),
            token,
        }
    }

    /// SIGKILL: no shutdown path runs.
    pub async fn kill(&mut self) {
        self.child.start_kill().expect("kill controller");
        let _ = self.child.wait().await;
    }

    /// Starts the controller again on the same database and data dir (new ports).
    pub async fn restart(&mut self) {
        self.kill().await;
        let token = self.token.clone();
        *self = ControllerProc::start(&self.dir.clone(), &self.database_url.clone()).await;
        self.token = token;
    }

    pub fn client(&self) -> AdminClient {
        AdminClient {
            base: self.api.clone(),
            token: self.token.clone(),
            http: reqwest::Client::new(),
        }
    }
}

/// An agent process.
pub struct AgentProc {
    pub child: Child,
    pub url: String,
    /// `http://host:port/metrics` when started with `MERIDIAN_AGENT_METRICS_LISTEN`.
    pub metrics: Option<String>,
    pub dir: PathBuf,
    controller_url: String,
}

impl AgentProc {
    pub async fn start(dir: &Path, controller: SocketAddr, enrollment_token: &str) -> AgentProc {
        Self::spawn(dir, &format!("http://{controller}"), enrollment_token).await
    }

    async fn spawn(dir: &Path, controller_url: &str, enrollment_token: &str) -> AgentProc {
        Self::spawn_with(dir, controller_url, enrollment_token, &[]).await
    }

    /// An agent for `controller_url` (any scheme) with extra environment.
    pub async fn spawn_with(
        dir: &Path,
        controller_url: &str,
        enrollment_token: &str,
        env: &[(&str, String)],
    ) -> AgentProc {
        std::fs::create_dir_all(dir).expect("agent dir");
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let mut child = Command::new(meridian_bin())
            .arg("agent")
            .env("MERIDIAN_AGENT_CONTROLLER_URL", controller_url)
            .env("MERIDIAN_AGENT_DATA_DIR", dir)
            .env("MERIDIAN_AGENT_HTTP_LISTEN", "127.0.0.1:0")
            .env("MERIDIAN_AGENT_ENROLLMENT_TOKEN", enrollment_token)
            .env("MERIDIAN_AGENT_HEARTBEAT_MS", "500")
            .env("MERIDIAN_AGENT_BACKOFF_BASE_MS", "50")
            .env("MERIDIAN_AGENT_BACKOFF_CAP_MS", "1000")
            .env("MERIDIAN_AGENT_READY_FILE", &ready)
            .env("MERIDIAN_AGENT_LOG", log_level())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn agent");
        let r = read_ready(&ready, &mut child).await;
        AgentProc {
            child,
            url: format!("http://{}", r["http"].as_str().expect("http addr")),
            metrics: r["metrics"].as_str().map(|a| format!("http://{a}/metrics")),
            dir: dir.to_owned(),
            controller_url: controller_url.to_owned(),
        }
    }

    /// SIGKILL, then start again on the same data dir.
    pub async fn kill_and_restart(&mut self) {
        self.child.start_kill().expect("kill agent");
        let _ = self.child.wait().await;
        *self = AgentProc::spawn(&self.dir.clone(), &self.controller_url.clone(), "").await;
    }

    pub async fn status(&self) -> Value {
        reqwest::get(format!("{}/api/v1/status", self.url))
            .await
            .expect("status")
            .json()
            .await
            .expect("status json")
    }

    /// Waits until the status satisfies `pred`; on timeout the panic shows the last status.
    pub async fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status().await;
            if pred(&s) {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "timed out waiting for {what}; last status: {s}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Issues `n` tickets for `service` with 16 concurrent clients; returns the visit ids.
    pub async fn issue_tickets(&self, service: &str, n: usize) -> Vec<String> {
        let http = reqwest::Client::new();
        let url = format!("{}/api/v1/visits", self.url);
        let per = n / 16;
        let mut tasks = Vec::new();
        for i in 0..16 {
            let count = if i == 15 { n - per * 15 } else { per };
            let (http, url, service) = (http.clone(), url.clone(), service.to_owned());
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::with_capacity(count);
                for _ in 0..count {
                    let resp = http
                        .post(&url)
                        .bearer_auth(CONNECTOR_KEY)
                        .json(&json!({ "service": service }))
                        .send()
                        .await
                        .expect("post visit");
                    assert_eq!(
                        resp.status(),
                        201,
                        "ticket refused: {}",
                        resp.text().await.unwrap_or_default()
                    );
                    let v: Value = resp.json().await.expect("visit json");
                    ids.push(v["id"].as_str().expect("id").to_owned());
                }
                ids
            }));
        }
        let mut all = Vec::with_capacity(n);
        for t in tasks {
            all.extend(t.await.expect("ticket task"));
        }
        all
    }
}

/// The admin API, authenticated.
pub struct AdminClient {
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl AdminClient {
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req =
            self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("admin request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method.clone(), path, body).await;
        assert!((200..300).contains(&status), "{method} {path} -> {status}: {v}");
        v
    }

    /// Applies a demo site with one queue and one service.
    pub async fn seed_site(&self, site: &str) {
        let resources = json!([
            {"kind": "site", "code": site, "name": format!("Site {site}"), "time_zone": "America/Los_Angeles"},
            {"kind": "queue", "site": site, "code": "general", "name": "General", "letter": "A", "last_number": 9999},
            {"kind": "service", "site": site, "code": "GEN", "name": "General", "queue": "general"},
            {"kind": "connector_key", "site": site, "code": "e2e", "name": "E2E tests",
             "key_hash": meridian_controller::auth::hash_secret(CONNECTOR_KEY)},
        ]);
        self.ok(reqwest::Method::POST, "/api/v1/apply", Some(json!({ "resources": resources })))
            .await;
    }

    pub async fn enrollment_token(&self, site: &str) -> String {
        let v = self
            .ok(reqwest::Method::POST, "/api/v1/enrollment-tokens", Some(json!({ "site": site })))
            .await;
        v["token"].as_str().expect("token").to_owned()
    }

    pub async fn agent(&self, id: &str) -> Value {
        self.ok(reqwest::Method::GET, &format!("/api/v1/agents/{id}"), None).await
    }
}

/// Central events of one agent: (count, min seq, max seq, distinct seqs, VISIT_CREATED count).
pub async fn central_events(database_url: &str, agent_id: &str) -> (i64, i64, i64, i64, i64) {
    let pool =
        sqlx::PgPool::connect(database_url).await.expect("connect to the controller database");
    let row: (i64, Option<i64>, Option<i64>, i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), MIN(seq), MAX(seq), COUNT(DISTINCT seq), COUNT(*) FILTER (WHERE kind = 'VISIT_CREATED') \
         FROM events WHERE agent_id = $1",
    )
    .bind(agent_id)
    .fetch_one(&pool)
    .await
    .expect("count events");
    pool.close().await;
    (row.0, row.1.unwrap_or(0), row.2.unwrap_or(0), row.3, row.4)
}

/// The visit ids of every central VISIT_CREATED event of one agent.
pub async fn central_visit_ids(database_url: &str, agent_id: &str) -> Vec<String> {
    let pool = sqlx::PgPool::connect(database_url).await.expect("connect");
    let ids: Vec<(String,)> = sqlx::query_as(
        "SELECT payload->>'visit_id' FROM events WHERE agent_id = $1 AND kind = 'VISIT_CREATED' ORDER BY seq",
    )
    .bind(agent_id)
    .fetch_all(&pool)
    .await
    .expect("visit ids");
    pool.close().await;
    ids.into_iter().map(|(id,)| id).collect()
}
