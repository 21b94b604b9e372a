//! Agent settings: defaults < TOML file < environment (`MERIDIAN_AGENT_…`).
//! `meridian-agent print-config` prints the defaults.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The controller's agent gateway, `https://…` (or `http://…` on loopback / in dev).
    pub controller_url: String,
    /// Holds `agent.db` (configuration, runtime data, outbox, cursors).
    pub data_dir: PathBuf,
    /// The branch LAN HTTP server (terminals and connector API).
    pub http_listen: String,
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
    pub log: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            controller_url: "http://127.0.0.1:8081".into(),
            data_dir: PathBuf::from("agent-data"),
            http_listen: "127.0.0.1:8101".into(),
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
            log: "info".into(),
        }
    }
}

impl Settings {
    pub fn load(file: Option<&Path>) -> Result<Self, config::ConfigError> {
        meridian_shared::settings::load("MERIDIAN_AGENT", file)
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
            .field("data_dir", &self.data_dir)
            .field("http_listen", &self.http_listen)
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
            .field("clock_tolerance_ms", &self.clock_tolerance_ms)
            .field("end_of_day_sweep_ms", &self.end_of_day_sweep_ms)
            .field("log", &self.log)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
