//! Helpers shared by the benchmarks (`mod common;` in each bench; a subdirectory module is not
//! built as a bench target of its own): the environment, the machine, CPU by thread and the
//! in-process controller.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use chrono::Utc;
use meridian_controller::server::{Listeners, serve};
use meridian_controller::store::{self, EnrollmentToken, Store};
use meridian_controller::testing;
use meridian_controller::{Settings, auth};
use meridian_shared::SiteCode;
use sqlx::Connection;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

// ---------- environment ----------

pub fn env_flag(name: &str) -> Result<bool> {
    match std::env::var(name) {
        Ok(v) if v == "1" || v.eq_ignore_ascii_case("true") => Ok(true),
        Ok(v) if v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false") => Ok(false),
        Ok(v) => bail!("{name} must be 0 or 1, not {v:?}"),
        Err(_) => Ok(false),
    }
}

pub fn env_number(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Ok(v) => {
            Ok(Some(v.parse().with_context(|| format!("{name} must be a number, not {v:?}"))?))
        }
        Err(_) => Ok(None),
    }
}

/// Logs go to stderr only when `RUST_LOG` asks for them.
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
}

// ---------- the machine ----------

/// CPUs, CPU model, memory, OS and the current load average, for the `machine:` line; call it
/// before the run.
pub fn machine_info() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / (1024.0 * 1024.0));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "nproc {cpus}, {model}, {mem_gib:.0} GiB RAM, {} {}; load average before the run {} \
         (other work on this machine skews the results)",
        std::env::consts::OS,
        std::env::consts::ARCH,
        load.join(" "),
    )
}

/// The filesystem type of the mount holding `path`, from /proc/mounts.
pub fn filesystem_of(path: &str) -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, mount, fs) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(mount).then(|| (mount.len(), fs.to_owned()))
        })
        .max()
        .map_or_else(|| "unknown".into(), |(_, fs)| fs)
}

// ---------- where the CPU goes ----------

/// CPU seconds per thread name of this process, from /proc/self/task. Each bench describes it
/// in its own words.
pub struct ThreadCpu(pub BTreeMap<String, f64>);

impl ThreadCpu {
    pub fn sample() -> ThreadCpu {
        let mut by_name = BTreeMap::new();
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return ThreadCpu(by_name);
        };
        for task in tasks.flatten() {
            let dir = task.path();
            let name =
                std::fs::read_to_string(dir.join("comm")).unwrap_or_default().trim().to_owned();
            if let Some(seconds) = stat_cpu_seconds(&dir.join("stat")) {
                *by_name.entry(name).or_insert(0.0) += seconds;
            }
        }
        ThreadCpu(by_name)
    }

    /// The CPU used since `before`, by the threads that used any.
    pub fn since(&self, before: &ThreadCpu) -> ThreadCpu {
        let used = self.0.iter().map(|(name, seconds)| {
            (name.clone(), seconds - before.0.get(name).copied().unwrap_or(0.0))
        });
        ThreadCpu(used.filter(|(_, s)| *s > 0.0).collect())
    }
}

/// utime + stime of a `/proc/…/stat` file, in seconds (assuming the usual 100 ticks per
/// second).
pub fn stat_cpu_seconds(path: &Path) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

// ---------- the controller ----------

/// A controller served in-process on loopback, port 0.
pub struct Controller {
    pub store: Arc<dyn Store>,
    pub gateway_url: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<meridian_controller::Result<()>>,
}

impl Controller {
    pub async fn start(db_url: &str) -> Result<Controller> {
        let store = store::open(db_url).await.context("opening the controller store")?;
        let api = TcpListener::bind("127.0.0.1:0").await.context("binding the admin API")?;
        let gateway = TcpListener::bind("127.0.0.1:0").await.context("binding the gateway")?;
        let gateway_url = format!("http://{}", gateway.local_addr()?);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(
            Settings::default(),
            store.clone(),
            Listeners { api, gateway },
            shutdown.clone(),
        ));
        Ok(Controller { store, gateway_url, shutdown, task })
    }

    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        let served = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("the controller did not stop within 30 s")?
            .context("the controller task panicked")?;
        served.context("the controller failed")
    }
}

/// Creates a one-time enrollment token for `site` and returns its secret.
pub async fn enrollment_token(store: &dyn Store, site: &str) -> Result<String> {
    let token = auth::new_secret("mrd_enr_");
    let now = Utc::now();
    store
        .insert_enrollment_token(&EnrollmentToken {
            id: uuid::Uuid::new_v4().to_string(),
            site: SiteCode::parse(site)?,
            token_hash: auth::hash_secret(&token),
            created_at: now,
            expires_at: now + chrono::Duration::hours(1),
            used_at: None,
            used_by_agent: None,
        })
        .await
        .with_context(|| format!("creating an enrollment token for {site}"))?;
    Ok(token)
}

// ---------- simulated agents ----------

/// A simulated agent enrolled over the gateway, with its channel.
pub struct EnrolledAgent {
    pub index: usize,
    pub agent_id: String,
    pub site: String,
    pub credential: String,
    pub channel: tonic::transport::Channel,
}

/// Enrolls simulated agent `index` with `token` over the gateway at `gateway_url`.
pub async fn enroll(gateway_url: &str, index: usize, token: &str) -> Result<EnrolledAgent> {
    let channel = tonic::transport::Endpoint::from_shared(gateway_url.to_owned())?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("agent {index} cannot connect to the gateway"))?;
    let response = meridian_proto::agent_gateway_client::AgentGatewayClient::new(channel.clone())
        .enroll(meridian_proto::EnrollRequest {
            token: token.to_owned(),
            hostname: format!("bench-agent-{index}"),
            version: meridian_shared::VERSION.to_owned(),
        })
        .await
        .with_context(|| format!("agent {index} could not enroll"))?
        .into_inner();
    Ok(EnrolledAgent {
        index,
        agent_id: response.agent_id,
        site: response.site_code,
        credential: response.credential,
        channel,
    })
}

// ---------- PostgreSQL and CPU accounting ----------

/// Drops a benchmark's PostgreSQL database (`meridian_t_…` only).
pub async fn drop_database(name: &str) -> Result<()> {
    ensure!(
        name.starts_with("meridian_t_")
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
        "refusing to drop unexpected database {name:?}"
    );
    let admin = testing::postgres_admin_url();
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .with_context(|| format!("cannot connect to {admin} to drop {name}"))?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
        .execute(&mut conn)
        .await
        .with_context(|| format!("dropping the benchmark database {name}"))?;
    Ok(())
}

/// CPU seconds of the PostgreSQL backends connected to database `db_name`, from /proc.
pub fn pg_backend_cpu(db_name: &str) -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut total = 0.0;
    for entry in entries.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "postgres" {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(db_name) {
            total +=
                stat_cpu_seconds(std::path::Path::new(&format!("/proc/{pid}/stat"))).unwrap_or(0.0);
        }
    }
    total
}

/// The four threads that used the most CPU, busiest first (the main thread, named after the
/// executable, as `main`).
pub fn describe_threads(threads: &ThreadCpu) -> String {
    let exe: Option<String> = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().chars().take(15).collect()));
    let mut threads: Vec<(&String, &f64)> = threads.0.iter().collect();
    threads.sort_by(|a, b| b.1.total_cmp(a.1));
    let parts: Vec<String> = threads
        .iter()
        .take(4)
        .map(|(name, s)| {
            let name = if exe.as_deref() == Some(name.as_str()) { "main" } else { name.as_str() };
            format!("{name} {s:.2} s")
        })
        .collect();
    if parts.is_empty() { "-".into() } else { parts.join(", ") }
}
