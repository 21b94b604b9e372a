//! Controller settings: defaults < TOML file < environment (`MERIDIAN_CONTROLLER_…`, `__` for
//! nesting). `meridian-controller print-config` prints the defaults.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `postgres://…` or `sqlite://…`; empty = SQLite file `controller.db` in `data_dir`.
    pub database_url: String,
    pub data_dir: PathBuf,
    /// Admin REST API, the console, `/healthz` and `/metrics` (there with a bearer API
    /// token of any role).
    pub api_listen: String,
    /// Prometheus `/metrics` without authentication, on a listener of its own; empty (the
    /// default) = off. Bind it to loopback or a management network only.
    pub metrics_listen: String,
    /// Slow clients on the API listener: the time a client has to send a request's head; a
    /// keep-alive connection idle as long is closed.
    pub http_header_timeout_ms: u64,
    /// The longest pause while a request body arrives (the request then fails).
    pub http_body_timeout_ms: u64,
    /// Connections the API listener serves at once; more wait to be accepted until one closes.
    pub http_max_connections: usize,
    /// Agent gateway (gRPC).
    pub gateway_listen: String,
    /// PEM certificate chain and key for the gateway; without them the gateway speaks
    /// plaintext, which is refused unless it listens on loopback or `dev_mode` is set.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub dev_mode: bool,
    /// Session heartbeat; a peer silent for three heartbeats is dropped.
    pub heartbeat_ms: u64,
    /// Sessions look for new commands this often even without a wake-up (a safety net under
    /// LISTEN/NOTIFY, which wakes them at once).
    pub command_poll_ms: u64,
    /// An agent whose clock (reported in every Hello and Status) is further than this from
    /// the controller's raises an alert: a WARN line, the `agents_clock_skewed` gauge and
    /// `clock_alert` in `GET /api/v1/agents` and the console.
    pub clock_skew_tolerance_ms: u64,
    /// The nightly appointment sync scheduler looks for due sites this often.
    pub appointment_sync_tick_ms: u64,
    /// The distributed-request ledger sweeps (timeouts, retries, hourly and daily updates)
    /// this often.
    pub request_ledger_tick_ms: u64,
    /// The rollout driver moves the agent upgrade rollouts forward this often.
    pub rollout_tick_ms: u64,
    /// How long a switched agent has to come up healthy before its watchdog rolls it back, for
    /// rollouts that do not set `health_timeout_s` (seconds; 0: each agent's own
    /// `upgrade_health_timeout_ms`).
    pub rollout_health_timeout_s: u32,
    /// Appointments per chunk of a bulk appointment sync.
    pub appointment_sync_chunk: usize,
    pub max_body_bytes: usize,
    /// Public keys of the release signers whose agent releases may be uploaded
    /// (`ed25519:<base64>`, as `meridianctl release keygen` prints them). Empty (the default):
    /// every upload is refused. In the environment:
    /// `MERIDIAN_CONTROLLER_RELEASE_KEYS=ed25519:…,ed25519:…`.
    #[serde(default, deserialize_with = "meridian_shared::settings::list_or_comma_separated")]
    pub release_keys: Vec<String>,
    /// Largest agent release artifact accepted by `POST /api/v1/releases` (bytes; the upload
    /// is refused while it streams once it goes beyond).
    pub max_release_bytes: u64,
    /// Where the bootstrap admin token is written on first start (mode 0600; the log names
    /// the file, never the token). Unset: `bootstrap-token` in `data_dir`.
    pub bootstrap_token_file: Option<PathBuf>,
    /// When set, the bound API and gateway addresses are written here as JSON once the
    /// controller listens (for supervisors and tests that bind port 0).
    pub ready_file: Option<PathBuf>,
    /// `tracing` filter, e.g. `info` or `meridian_controller=debug`.
    pub log: String,
    /// Raw events are kept this many days (rounded out to whole UTC months), then removed
    /// once projected into facts; 0 keeps them forever. Facts hold the statistics, so raw
    /// events are needed only to rebuild facts and for audits.
    pub retention_events_days: u32,
    /// Visit, transaction and session facts and quarantined events are kept this many days
    /// (whole UTC months); 0 (the default) keeps them forever. Rollups are always kept.
    pub retention_facts_days: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            database_url: String::new(),
            data_dir: PathBuf::from("data"),
            api_listen: "127.0.0.1:8080".into(),
            metrics_listen: String::new(),
            http_header_timeout_ms: 10_000,
            http_body_timeout_ms: 30_000,
            http_max_connections: 1024,
            gateway_listen: "127.0.0.1:8081".into(),
            tls_cert: None,
            tls_key: None,
            dev_mode: false,
            heartbeat_ms: 5_000,
            command_poll_ms: 2_000,
            clock_skew_tolerance_ms: meridian_shared::clock::DEFAULT_SKEW_TOLERANCE_MS,
            appointment_sync_tick_ms: 30_000,
            request_ledger_tick_ms: 1_000,
            rollout_tick_ms: 2_000,
            rollout_health_timeout_s: 120,
            appointment_sync_chunk: meridian_shared::appointments::DEFAULT_SYNC_CHUNK,
            max_body_bytes: 1024 * 1024,
            release_keys: Vec::new(),
            max_release_bytes: 200 * 1024 * 1024,
            bootstrap_token_file: None,
            ready_file: None,
            log: "info".into(),
            retention_events_days: 400,
            retention_facts_days: 0,
        }
    }
}

impl Settings {
    pub fn load(file: Option<&Path>) -> Result<Self, config::ConfigError> {
        meridian_shared::settings::load("MERIDIAN_CONTROLLER", file)
    }

    /// What `store::maintenance` removes.
    pub fn retention(&self) -> crate::store::maintenance::RetentionPolicy {
        crate::store::maintenance::RetentionPolicy {
            events_days: self.retention_events_days,
            facts_days: self.retention_facts_days,
        }
    }

    /// The release keys and upload limit the admin API enforces; a malformed key is a
    /// configuration error.
    pub fn release_policy(&self) -> crate::Result<crate::api::releases::ReleasePolicy> {
        crate::api::releases::ReleasePolicy::new(&self.release_keys, self.max_release_bytes)
    }

    /// The API listener's limits on slow clients and connections.
    pub fn http_limits(&self) -> meridian_shared::http_guard::Limits {
        meridian_shared::http_guard::Limits {
            header_read_timeout: Duration::from_millis(self.http_header_timeout_ms.max(100)),
            body_read_timeout: Duration::from_millis(self.http_body_timeout_ms.max(100)),
            max_connections: self.http_max_connections.max(1),
        }
    }

    /// `clock_skew_tolerance_ms`.
    pub fn clock_skew_tolerance(&self) -> Duration {
        Duration::from_millis(self.clock_skew_tolerance_ms)
    }

    /// The database URL to open (the default SQLite file when unset).
    pub fn database_url(&self) -> String {
        if self.database_url.is_empty() {
            format!("sqlite://{}/controller.db", self.data_dir.display())
        } else {
            self.database_url.clone()
        }
    }
}

/// Hides the password in a database URL.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("database_url", &redact_url(&self.database_url))
            .field("data_dir", &self.data_dir)
            .field("api_listen", &self.api_listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("http_header_timeout_ms", &self.http_header_timeout_ms)
            .field("http_body_timeout_ms", &self.http_body_timeout_ms)
            .field("http_max_connections", &self.http_max_connections)
            .field("gateway_listen", &self.gateway_listen)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key.as_ref().map(|_| "***"))
            .field("dev_mode", &self.dev_mode)
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("command_poll_ms", &self.command_poll_ms)
            .field("clock_skew_tolerance_ms", &self.clock_skew_tolerance_ms)
            .field("appointment_sync_tick_ms", &self.appointment_sync_tick_ms)
            .field("request_ledger_tick_ms", &self.request_ledger_tick_ms)
            .field("rollout_tick_ms", &self.rollout_tick_ms)
            .field("rollout_health_timeout_s", &self.rollout_health_timeout_s)
            .field("appointment_sync_chunk", &self.appointment_sync_chunk)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("release_keys", &self.release_keys)
            .field("max_release_bytes", &self.max_release_bytes)
            .field("bootstrap_token_file", &self.bootstrap_token_file)
            .field("ready_file", &self.ready_file)
            .field("log", &self.log)
            .field("retention_events_days", &self.retention_events_days)
            .field("retention_facts_days", &self.retention_facts_days)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
        let s = Settings { database_url: "postgres://u:pw@h/db".into(), ..Default::default() };
        assert!(!format!("{s:?}").contains("pw"));
    }

    #[test]
    fn debug_output_never_shows_a_secret() {
        let staff: crate::config_admin::StaffUserInput = serde_json::from_value(serde_json::json!(
            {"username": "ana", "name": "Ana", "password": "hunter2-S3CR3T"}
        ))
        .expect("staff");
        let client = crate::ctl::Client::new("http://127.0.0.1:8080", Some("mrd_at_S3CR3T".into()))
            .expect("client");
        let created = crate::ctl::CreatedEnrollmentToken {
            id: "1".into(),
            site: "SFO".into(),
            token: "mrd_enr_S3CR3T".into(),
            expires_at: chrono::Utc::now(),
        };
        for shown in [format!("{staff:?}"), format!("{client:?}"), format!("{created:?}")] {
            assert!(!shown.contains("S3CR3T"), "{shown}");
            assert!(shown.contains("***"), "{shown}");
        }
    }

    #[test]
    fn release_keys_come_as_a_list_or_comma_separated() {
        let key = || meridian_shared::releases::PrivateKey::generate().public_key().to_string();
        let (a, b) = (key(), key());
        let dir = crate::testing::temp_dir("controller-settings");
        let load = |toml: String| {
            let file = dir.join("controller.toml");
            std::fs::write(&file, toml).expect("write");
            Settings::load(Some(&file)).expect("settings")
        };
        // Not set anywhere: none (an empty default list does not survive the layering).
        assert!(load(String::new()).release_keys.is_empty());
        let listed = load(format!("release_keys = [\"{a}\", \"{b}\"]\n"));
        assert_eq!(listed.release_keys, [a.clone(), b.clone()]);
        let joined = load(format!("release_keys = \" {a} , {b} \"\nmax_release_bytes = 1024\n"));
        assert_eq!(joined.release_keys, [a.clone(), b]);
        let policy = joined.release_policy().expect("policy");
        assert_eq!((policy.keys().len(), policy.max_bytes()), (2, 1024));
        assert_eq!(Settings::default().max_release_bytes, 200 * 1024 * 1024);
        assert!(Settings::default().release_policy().expect("policy").keys().is_empty());
        let bad =
            Settings { release_keys: vec![a, "ed25519-private:AAAA".into()], ..Default::default() };
        let e = bad.release_policy().expect_err("a malformed key").to_string();
        assert!(e.contains("release_keys[1]"), "{e}");
    }
}
