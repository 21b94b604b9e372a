//! Agent settings: defaults < TOML file < environment (`MERIDIAN_AGENT_…`).
//! `meridian-agent print-config` prints the defaults.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The controller's agent gateway, `https://…`. `http://…` is refused unless the host is
    /// loopback, `dev_mode` is set, or `allow_plaintext_controller` is.
    pub controller_url: String,
    /// Allows a plaintext (`http://`) `controller_url` to a host other than loopback: the
    /// agent's credential and the branch's data cross the network readable (a warning at
    /// start-up).
    pub allow_plaintext_controller: bool,
    /// Holds `agent.db` (configuration, runtime data, outbox, cursors).
    pub data_dir: PathBuf,
    /// The branch LAN server (terminals and connector API).
    pub http_listen: String,
    /// PEM certificate chain and private key of the branch server: with both it serves HTTPS,
    /// and the files are read again when they change (no restart). Without them it serves
    /// plain HTTP, which is refused unless `http_listen` is loopback, `dev_mode` is set or
    /// `allow_plaintext_lan` is.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Allows plain HTTP on a non-loopback `http_listen`: staff passwords and session cookies
    /// cross the branch LAN readable (a warning at start-up).
    pub allow_plaintext_lan: bool,
    /// Development only (`meridian dev`): plaintext is allowed everywhere.
    pub dev_mode: bool,
    /// Prometheus `/metrics`, on a listener of its own; empty (the default) = off. It has no
    /// authentication: bind it to loopback (`127.0.0.1:9464`) or a management network, never
    /// to the branch LAN.
    pub metrics_listen: String,
    /// PEM trust anchor for the controller's TLS certificate; the public web roots otherwise.
    pub ca_cert: Option<PathBuf>,
    /// One-time enrollment token, used only while the agent has no credential.
    pub enrollment_token: String,
    /// Heartbeat used until the controller's Welcome says otherwise (HTTP/2 keepalive too).
    pub heartbeat_ms: u64,
    /// Reconnect backoff: exponential from `backoff_base_ms`, capped at `backoff_cap_ms`, with
    /// full jitter.
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    /// Webhook retry backoff (exponential with full jitter, capped).
    pub webhook_backoff_base_ms: u64,
    pub webhook_backoff_cap_ms: u64,
    /// How often the time-triggered distribution rules (schedules, close of business) are
    /// checked.
    pub rule_sweep_ms: u64,
    /// When set, the bound branch server address is written here as JSON once listening.
    pub ready_file: Option<PathBuf>,
    /// Public keys of the release signers this agent trusts (`ed25519:<base64>`), configured
    /// at install. An upgrade whose manifest is not signed by one of them is refused. In the
    /// environment: `MERIDIAN_AGENT_RELEASE_KEYS=ed25519:…,ed25519:…`.
    #[serde(default, deserialize_with = "meridian_shared::settings::list_or_comma_separated")]
    pub release_keys: Vec<String>,
    /// How long a new binary has, after the switch, to establish its session and report
    /// healthy before the watchdog rolls back (an `AGENT_UPGRADE` may ask for another time).
    pub upgrade_health_timeout_ms: u64,
    /// Crashes of a new binary before it is healthy that the watchdog tolerates; one more
    /// rolls back to the previous binary.
    pub upgrade_max_crashes: u32,
    /// How long acknowledged events stay at the branch: the live feed and webhooks resume from
    /// them, and they are sent again should the controller's database come back from a dump
    /// older than them (older ones become a gap the controller records).
    pub local_retention_s: u64,
    /// How far the system clock may be from the trusted time (the controller's at the last
    /// session, moved on by the monotonic clock) before the agent stops using it, uses the
    /// trusted time instead and raises an alert (at least 1000).
    pub clock_tolerance_ms: u64,
    /// How often the end-of-day rule (ending visits left open when their day is over) is
    /// checked.
    pub end_of_day_sweep_ms: u64,
    /// Slow clients on the branch server: the time a client has to send a request's head
    /// (and the TLS handshake); a keep-alive connection idle as long is closed.
    pub http_header_timeout_ms: u64,
    /// The longest pause while a request body arrives (the request then fails).
    pub http_body_timeout_ms: u64,
    /// Connections the branch server serves at once; more wait to be accepted until one
    /// closes. Every terminal page holds one for its live feed.
    pub http_max_connections: usize,
    /// Live feeds (`/display/events`, which every display, workstation and branch status page
    /// holds open, and `/api/v1/events`) served at once; one more is answered `503` with
    /// `Retry-After` (the pages retry on their own).
    pub max_live_feeds: usize,
    /// Origins that may frame the public display (`/display`), e.g.
    /// `["https://signage.example.com"]` or `'self'`; empty (the default): no page may be framed.
    /// In the environment: `MERIDIAN_AGENT_DISPLAY_FRAME_ANCESTORS=https://a.example,https://b.example`.
    #[serde(default, deserialize_with = "meridian_shared::settings::list_or_comma_separated")]
    pub display_frame_ancestors: Vec<String>,
    pub log: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            controller_url: "http://127.0.0.1:8081".into(),
            allow_plaintext_controller: false,
            data_dir: PathBuf::from("agent-data"),
            http_listen: "127.0.0.1:8101".into(),
            tls_cert: None,
            tls_key: None,
            allow_plaintext_lan: false,
            dev_mode: false,
            metrics_listen: String::new(),
            ca_cert: None,
            enrollment_token: String::new(),
            heartbeat_ms: 3_000,
            backoff_base_ms: 200,
            backoff_cap_ms: 30_000,
            webhook_backoff_base_ms: 1_000,
            webhook_backoff_cap_ms: 300_000,
            rule_sweep_ms: 30_000,
            ready_file: None,
            release_keys: Vec::new(),
            upgrade_health_timeout_ms: 120_000,
            upgrade_max_crashes: 3,
            local_retention_s: 86_400,
            clock_tolerance_ms: meridian_shared::clock::DEFAULT_SKEW_TOLERANCE_MS,
            end_of_day_sweep_ms: 30_000,
            http_header_timeout_ms: 10_000,
            http_body_timeout_ms: 30_000,
            http_max_connections: 512,
            max_live_feeds: 256,
            display_frame_ancestors: Vec::new(),
            log: "info".into(),
        }
    }
}

impl Settings {
    pub fn load(file: Option<&Path>) -> Result<Self, config::ConfigError> {
        meridian_shared::settings::load("MERIDIAN_AGENT", file)
    }

    /// The branch server's limits on slow clients and connections.
    pub fn http_limits(&self) -> meridian_shared::http_guard::Limits {
        meridian_shared::http_guard::Limits {
            header_read_timeout: std::time::Duration::from_millis(
                self.http_header_timeout_ms.max(100),
            ),
            body_read_timeout: std::time::Duration::from_millis(self.http_body_timeout_ms.max(100)),
            max_connections: self.http_max_connections.max(1),
        }
    }

    /// `display_frame_ancestors`, checked: each an origin or `'self'`.
    pub fn display_frame_ancestors(&self) -> Result<Vec<String>, String> {
        self.display_frame_ancestors
            .iter()
            .map(|s| {
                meridian_shared::http_guard::check_frame_ancestor(s.trim())
                    .map(|()| s.trim().to_owned())
                    .map_err(|e| format!("display_frame_ancestors: {e}"))
            })
            .collect()
    }

    /// `clock_tolerance_ms`, at least a second (less would raise alerts on ordinary jitter).
    pub fn clock_tolerance(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.clock_tolerance_ms.max(1_000))
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("controller_url", &self.controller_url)
            .field("allow_plaintext_controller", &self.allow_plaintext_controller)
            .field("data_dir", &self.data_dir)
            .field("http_listen", &self.http_listen)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("allow_plaintext_lan", &self.allow_plaintext_lan)
            .field("dev_mode", &self.dev_mode)
            .field("metrics_listen", &self.metrics_listen)
            .field("ca_cert", &self.ca_cert)
            .field("enrollment_token", &if self.enrollment_token.is_empty() { "" } else { "***" })
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("backoff_base_ms", &self.backoff_base_ms)
            .field("backoff_cap_ms", &self.backoff_cap_ms)
            .field("webhook_backoff_base_ms", &self.webhook_backoff_base_ms)
            .field("webhook_backoff_cap_ms", &self.webhook_backoff_cap_ms)
            .field("rule_sweep_ms", &self.rule_sweep_ms)
            .field("ready_file", &self.ready_file)
            .field("release_keys", &self.release_keys)
            .field("upgrade_health_timeout_ms", &self.upgrade_health_timeout_ms)
            .field("upgrade_max_crashes", &self.upgrade_max_crashes)
            .field("local_retention_s", &self.local_retention_s)
            .field("clock_tolerance_ms", &self.clock_tolerance_ms)
            .field("end_of_day_sweep_ms", &self.end_of_day_sweep_ms)
            .field("http_header_timeout_ms", &self.http_header_timeout_ms)
            .field("http_body_timeout_ms", &self.http_body_timeout_ms)
            .field("http_max_connections", &self.http_max_connections)
            .field("max_live_feeds", &self.max_live_feeds)
            .field("display_frame_ancestors", &self.display_frame_ancestors)
            .field("log", &self.log)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_a_secret() {
        let settings =
            Settings { enrollment_token: "mrd_enr_S3CR3T".into(), ..Settings::default() };
        let identity = crate::store::queries::Identity {
            agent_id: "a".into(),
            site: "SFO".into(),
            credential: "mrd_cred_S3CR3T".into(),
        };
        let hook: meridian_shared::config::Webhook = serde_json::from_value(serde_json::json!(
            {"site": "SFO", "code": "crm", "url": "https://crm.example.com/hook",
             "secret": "whsec-0123456789-S3CR3T"}
        ))
        .expect("webhook");
        for shown in [format!("{settings:?}"), format!("{identity:?}"), format!("{hook:?}")] {
            assert!(!shown.contains("S3CR3T"), "{shown}");
            assert!(shown.contains("***"), "{shown}");
        }
    }

    #[test]
    fn the_example_settings_file_is_valid_and_a_malformed_key_is_refused() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.example.toml");
        let settings = Settings::load(Some(&path)).expect("deploy/agent.example.toml");
        assert!(settings.release_keys.is_empty());
        assert_eq!(settings.upgrade_max_crashes, 3);
        assert_eq!(settings.clock_tolerance_ms, 120_000);
        // Nothing set at all: no keys (an empty default list does not survive the layering).
        let empty = std::env::temp_dir().join(format!("agent-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&empty, "").expect("write");
        assert!(Settings::load(Some(&empty)).expect("defaults").release_keys.is_empty());
        crate::upgrade::Gate::new(&settings.release_keys, None).expect("keys");
        // A key list in TOML, and a malformed key refused when the agent starts.
        let file = std::env::temp_dir().join(format!("agent-{}.toml", uuid::Uuid::new_v4()));
        let key = meridian_shared::releases::PrivateKey::generate().public_key().to_string();
        std::fs::write(&file, format!("release_keys = [\"{key}\", \"ed25519:nope\"]\n"))
            .expect("write");
        let settings = Settings::load(Some(&file)).expect("load");
        assert_eq!(settings.release_keys, [key.clone(), "ed25519:nope".to_owned()]);
        let err = crate::upgrade::Gate::new(&settings.release_keys, None).expect_err("refused");
        assert!(err.to_string().contains("release_keys[1]"), "{err}");
        assert!(crate::upgrade::Gate::new(&[key], None).is_ok());
    }
}
