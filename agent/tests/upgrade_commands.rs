//! `AGENT_UPGRADE` through the command log and the upgrader's passes, without a controller:
//! the command is recorded and acknowledged at once; a manifest that is not signed by a key
//! the agent trusts, is built for another platform, downgrades without leave, or reaches an
//! agent that cannot replace its binary is reported `failed` with nothing downloaded; an
//! accepted one is downloaded (resumed after a cut), staged, and switched only inside its
//! window — a closed window keeps it staged until a later command of the same release.

mod upgrade_support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use meridian_agent::link::{self, CommandApplied};
use meridian_agent::request_rules::RuleSet;
use meridian_agent::upgrade::{self, Pass, UpgradeDir, Upgrader};
use meridian_agent::{Context, Settings};
use meridian_shared::clock::{Clock, ManualClock};
use meridian_shared::commands::{ControllerCommand, UpgradeCancel, UpgradeCommand};
use meridian_shared::releases::{self, ReleaseManifest};
use tokio_util::sync::CancellationToken;
use upgrade_support::{ScriptedSource, Signer, temp_dir, write_script};
use uuid::Uuid;

const NEW: &str = "99.0.0";

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 9, 2, 0, 0).unwrap()
}

fn artifact(tag: u8) -> Vec<u8> {
    let mut bytes = b"#!/bin/sh\necho the new agent\n".to_vec();
    bytes.extend((0..20_000u32).map(|i| (i % 241) as u8 ^ tag));
    bytes
}

struct Agent {
    ctx: Arc<Context>,
    clock: Arc<ManualClock>,
    data: PathBuf,
    dir: UpgradeDir,
    seq: u64,
    stop: CancellationToken,
}

/// An agent trusting `signer`, able to replace its binary (a script) when `upgradable`.
async fn agent(what: &str, signer: &Signer, upgradable: bool) -> Agent {
    let data = temp_dir(what);
    let installed = data.join("installed-agent");
    write_script(&installed, "echo the running agent");
    let settings = Settings {
        data_dir: data.clone(),
        release_keys: vec![signer.public()],
        ..Settings::default()
    };
    let clock = Arc::new(ManualClock::new(start()));
    let upgrader = upgradable.then(|| Upgrader::new(installed, vec!["run".into()]));
    let ctx = Context::open_with(&settings, clock.clone(), upgrader).await.expect("open");
    Agent { ctx, clock, dir: UpgradeDir::new(&data), data, seq: 0, stop: CancellationToken::new() }
}

fn order(
    release: ReleaseManifest,
    rollout: Uuid,
    switch_before: DateTime<Utc>,
) -> ControllerCommand {
    ControllerCommand::Upgrade(Box::new(UpgradeCommand {
        rollout_id: rollout,
        release,
        allow_downgrade: false,
        switch_before,
        health_timeout_s: 45,
    }))
}

impl Agent {
    /// Applies the next command of the log as the link does.
    async fn apply(&mut self, cmd: &ControllerCommand) -> CommandApplied {
        self.seq += 1;
        let (seq, kind, payload) = (self.seq, cmd.kind().to_owned(), cmd.payload());
        self.apply_raw(seq, kind, payload).await
    }

    async fn apply_raw(&self, seq: u64, kind: String, payload: Vec<u8>) -> CommandApplied {
        let gate = self.ctx.upgrades.gate.clone();
        let now = self.clock.now();
        self.ctx
            .db
            .write(move |c| {
                link::apply_command_with_gate(
                    c,
                    "SFO",
                    None,
                    &RuleSet::default(),
                    &gate,
                    (seq, 0),
                    &kind,
                    &payload,
                    now,
                )
            })
            .await
            .expect("apply")
    }

    async fn pass(&self, source: &mut ScriptedSource) -> Pass {
        upgrade::pass(&self.ctx, source, &self.stop).await.expect("pass")
    }

    /// The `AGENT_UPGRADE_STATUS` payloads queued, in order.
    async fn statuses(&self) -> Vec<serde_json::Value> {
        self.ctx
            .db
            .read(|c| {
                let mut stmt = c.prepare(
                    "SELECT payload FROM outbox WHERE kind = 'AGENT_UPGRADE_STATUS' ORDER BY seq",
                )?;
                let rows = stmt
                    .query_map([], |r| r.get::<_, Vec<u8>>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await
            .expect("outbox")
            .into_iter()
            .map(|p| serde_json::from_slice(&p).expect("json"))
            .collect()
    }

    async fn phases(&self) -> Vec<String> {
        self.statuses().await.iter().map(|s| s["phase"].as_str().unwrap_or("").to_owned()).collect()
    }

    async fn record(&self, rollout: Uuid) -> upgrade::UpgradeRecord {
        self.ctx
            .db
            .read(|c| upgrade::list(c, 10))
            .await
            .expect("list")
            .into_iter()
            .find(|u| u.rollout_id == rollout)
            .expect("recorded")
    }

    /// The error the command log recorded for `seq` (`None` when applied cleanly).
    async fn command_error(&self, seq: u64) -> Option<String> {
        self.ctx
            .db
            .read(move |c| {
                Ok(c.query_row(
                    "SELECT error FROM applied_commands WHERE seq = ?1",
                    [seq as i64],
                    |r| r.get::<_, Option<String>>(0),
                )?)
            })
            .await
            .expect("applied command")
    }
}

#[tokio::test]
async fn refused_upgrades_are_reported_and_nothing_is_downloaded() {
    let trusted = Signer::new();
    let stranger = Signer::new();
    let platform = releases::current_platform();
    let bytes = artifact(0);
    let mut tampered_version = trusted.sign(NEW, &platform, &bytes);
    tampered_version.version = "99.0.1".into();
    let mut unsigned = trusted.sign(NEW, &platform, &bytes);
    unsigned.key_id.clear();
    unsigned.signature.clear();
    let mut tampered_size = trusted.sign(NEW, &platform, &bytes);
    tampered_size.size += 1;
    let older = {
        let v = semver::Version::parse(meridian_agent::VERSION).expect("semver");
        if v.patch > 0 {
            format!("{}.{}.{}", v.major, v.minor, v.patch - 1)
        } else if v.minor > 0 {
            format!("{}.{}.99", v.major, v.minor - 1)
        } else {
            format!("{}.99.99", v.major - 1)
        }
    };
    let cases: Vec<(&str, ReleaseManifest, bool, String)> = vec![
        (
            "unknown key",
            stranger.sign(NEW, &platform, &bytes),
            true,
            verify_error(&stranger, &trusted, NEW),
        ),
        (
            "version not signed",
            tampered_version.clone(),
            true,
            refusal(&tampered_version, &trusted),
        ),
        ("size not signed", tampered_size.clone(), true, refusal(&tampered_size, &trusted)),
        ("unsigned", unsigned.clone(), true, refusal(&unsigned, &trusted)),
        (
            "wrong platform",
            trusted.sign(NEW, "sparc64-illumos", &bytes),
            true,
            "built for sparc64-illumos".into(),
        ),
        ("downgrade", trusted.sign(&older, &platform, &bytes), true, "downgrade".into()),
        (
            "in-process",
            trusted.sign(NEW, &platform, &bytes),
            false,
            "cannot replace its binary".into(),
        ),
    ];
    for (case, release, upgradable, why) in cases {
        let mut a = agent("refused", &trusted, upgradable).await;
        let rollout = Uuid::now_v7();
        let applied = a.apply(&order(release, rollout, start() + chrono::Duration::hours(3))).await;
        assert_eq!(applied.error, None, "{case}: acknowledged without error");
        assert_eq!(a.command_error(1).await, None, "{case}: recorded");
        let statuses = a.statuses().await;
        assert_eq!(statuses.len(), 1, "{case}: {statuses:?}");
        assert_eq!(statuses[0]["phase"], "failed", "{case}");
        assert_eq!(statuses[0]["rollout_id"], rollout.to_string());
        assert_eq!(statuses[0]["running_version"], meridian_agent::VERSION);
        let reason = statuses[0]["reason"].as_str().unwrap_or_default().to_owned();
        assert!(reason.contains(&why), "{case}: {reason:?} should say {why:?}");
        assert_eq!(a.record(rollout).await.state, "failed", "{case}");
        let mut source = ScriptedSource::new(bytes.clone(), 4096);
        assert_eq!(a.pass(&mut source).await, Pass::Idle, "{case}");
        assert!(source.offsets().is_empty(), "{case}: nothing downloaded");
        assert!(!a.dir.staged().exists() && !a.dir.partial().exists(), "{case}");
        assert_eq!(a.phases().await, ["failed"], "{case}: reported once");
    }
}

fn refusal(release: &ReleaseManifest, trusted: &Signer) -> String {
    let keys = [releases::PublicKey::parse(&trusted.public()).expect("key")];
    releases::verify_manifest(release, &keys).expect_err("refused").to_string()
}

fn verify_error(signer: &Signer, trusted: &Signer, version: &str) -> String {
    refusal(&signer.sign(version, &releases::current_platform(), &artifact(0)), trusted)
}

#[tokio::test]
async fn a_downgrade_the_rollout_allows_proceeds() {
    let signer = Signer::new();
    let mut a = agent("downgrade", &signer, true).await;
    let mut release = signer.sign("0.0.1", &releases::current_platform(), &artifact(0));
    release.notes = "the known good one".into();
    let rollout = Uuid::now_v7();
    let cmd = ControllerCommand::Upgrade(Box::new(UpgradeCommand {
        rollout_id: rollout,
        release,
        allow_downgrade: true,
        switch_before: start() + chrono::Duration::hours(1),
        health_timeout_s: 0,
    }));
    a.apply(&cmd).await;
    assert!(a.statuses().await.is_empty());
    assert_eq!(a.record(rollout).await.state, "pending");
}

#[tokio::test]
async fn the_running_version_is_healthy_at_once() {
    let signer = Signer::new();
    let mut a = agent("same", &signer, true).await;
    let release = signer.sign(meridian_agent::VERSION, &releases::current_platform(), &artifact(0));
    let rollout = Uuid::now_v7();
    a.apply(&order(release, rollout, start() + chrono::Duration::hours(1))).await;
    assert_eq!(a.phases().await, ["healthy"]);
    let mut source = ScriptedSource::new(artifact(0), 4096);
    assert_eq!(a.pass(&mut source).await, Pass::Idle);
    assert!(source.offsets().is_empty());
}

#[tokio::test]
async fn a_closed_window_keeps_the_release_staged_until_a_later_command() {
    let signer = Signer::new();
    let mut a = agent("window", &signer, true).await;
    let bytes = artifact(0);
    let release = signer.sign(NEW, &releases::current_platform(), &bytes);
    let rollout = Uuid::now_v7();
    // The window ends in ten minutes, but the agent gets to it only after it closed.
    a.apply(&order(release.clone(), rollout, start() + chrono::Duration::minutes(10))).await;
    a.clock.advance(chrono::Duration::minutes(11));
    let mut source = ScriptedSource::new(bytes.clone(), 4096);
    assert_eq!(a.pass(&mut source).await, Pass::Idle);
    assert_eq!(a.phases().await, ["downloading", "staged"]);
    assert_eq!(std::fs::read(a.dir.staged()).expect("staged"), bytes);
    assert!(!a.dir.previous_new().exists() && !a.dir.current().exists(), "no switch");
    assert_eq!(a.pass(&mut source).await, Pass::Idle, "still waiting");
    assert_eq!(source.offsets(), [0]);

    // The next window: the same release switches without downloading again.
    let later = a.clock.now() + chrono::Duration::hours(4);
    a.clock.advance(chrono::Duration::hours(3));
    let applied = a.apply(&order(release, rollout, later)).await;
    assert!(applied.upgrade_requested);
    let plan = match a.pass(&mut source).await {
        Pass::Switch(plan) => plan,
        other => panic!("expected a switch, got {other:?}"),
    };
    assert_eq!(source.offsets(), [0], "not downloaded again");
    assert_eq!(
        (plan.rollout_id, plan.from_version.as_str(), plan.to_version.as_str()),
        (rollout, meridian_agent::VERSION, NEW)
    );
    assert_eq!(plan.health_timeout, Duration::from_secs(45));
    assert_eq!(a.phases().await, ["downloading", "staged", "switching"]);
    assert_eq!(
        std::fs::read(a.dir.previous_new()).expect("previous.new"),
        std::fs::read(a.data.join("installed-agent")).expect("installed"),
        "the running binary is kept aside before anything stops"
    );
    assert_eq!(a.record(rollout).await.state, "switching");
}

#[tokio::test]
async fn a_switch_that_was_never_installed_is_reported_failed() {
    let signer = Signer::new();
    let mut a = agent("abandoned", &signer, true).await;
    let bytes = artifact(0);
    let rollout = Uuid::now_v7();
    let release = signer.sign(NEW, &releases::current_platform(), &bytes);
    a.apply(&order(release, rollout, start() + chrono::Duration::hours(1))).await;
    let mut source = ScriptedSource::new(bytes, 4096);
    assert!(matches!(a.pass(&mut source).await, Pass::Switch(_)));
    // The agent stops before `install` (power cut): the next start finds no state.json.
    assert_eq!(a.pass(&mut source).await, Pass::Idle);
    assert_eq!(a.phases().await, ["downloading", "staged", "switching", "failed"]);
    let record = a.record(rollout).await;
    assert_eq!(record.state, "failed");
    assert!(record.reason.is_some_and(|r| r.contains("stopped before")));
}

#[tokio::test]
async fn a_cut_download_resumes_and_each_phase_is_reported_once() {
    let signer = Signer::new();
    let mut a = agent("resume", &signer, true).await;
    let bytes = artifact(0);
    let release = signer.sign(NEW, &releases::current_platform(), &bytes);
    let rollout = Uuid::now_v7();
    a.apply(&order(release, rollout, start() + chrono::Duration::hours(1))).await;
    let mut source = ScriptedSource::new(bytes.clone(), 4096).cutting(2, 1);
    assert!(matches!(a.pass(&mut source).await, Pass::Wait(_)), "cut: try again later");
    assert_eq!(std::fs::metadata(a.dir.partial()).expect("partial").len(), 8192);
    assert!(matches!(a.pass(&mut source).await, Pass::Switch(_)));
    assert_eq!(source.offsets(), [0, 8192]);
    assert_eq!(a.phases().await, ["downloading", "staged", "switching"]);
    let record = a.record(rollout).await;
    assert_eq!((record.resumed, record.attempts), (1, 2));
}

#[tokio::test]
async fn a_tampered_artifact_fails_the_upgrade_and_nothing_is_replaced() {
    let signer = Signer::new();
    let mut a = agent("tampered", &signer, true).await;
    let bytes = artifact(0);
    let release = signer.sign(NEW, &releases::current_platform(), &bytes);
    let rollout = Uuid::now_v7();
    a.apply(&order(release, rollout, start() + chrono::Duration::hours(1))).await;
    let mut tampered = bytes.clone();
    tampered[1000] ^= 0x40;
    let mut source = ScriptedSource::new(tampered, 4096);
    assert_eq!(a.pass(&mut source).await, Pass::Again);
    assert_eq!(a.phases().await, ["downloading", "failed"]);
    let reason = a.statuses().await[1]["reason"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("SHA-256"), "{reason}");
    assert_eq!(a.record(rollout).await.state, "failed");
    assert_eq!(a.pass(&mut source).await, Pass::Idle);
    for f in [a.dir.staged(), a.dir.partial(), a.dir.current(), a.dir.previous_new()] {
        assert!(!f.exists(), "{} must not exist", f.display());
    }
}

#[tokio::test]
async fn a_cancel_drops_the_staged_release_and_a_newer_rollout_supersedes() {
    let signer = Signer::new();
    let mut a = agent("cancel", &signer, true).await;
    let platform = releases::current_platform();
    let closed = start() - chrono::Duration::minutes(1);
    let first = Uuid::now_v7();
    a.apply(&order(signer.sign(NEW, &platform, &artifact(1)), first, closed)).await;
    let mut source = ScriptedSource::new(artifact(1), 4096);
    assert_eq!(a.pass(&mut source).await, Pass::Idle);
    assert!(a.dir.staged().exists());
    let cancel = ControllerCommand::CancelUpgrade(UpgradeCancel { rollout_id: first });
    assert!(a.apply(&cancel).await.upgrade_requested);
    assert_eq!(a.pass(&mut source).await, Pass::Idle);
    assert!(!a.dir.staged().exists(), "the staged release was removed");
    assert_eq!(a.record(first).await.state, "cancelled");
    assert_eq!(a.phases().await, ["downloading", "staged"], "a cancel reports nothing");

    let second = Uuid::now_v7();
    a.apply(&order(signer.sign(NEW, &platform, &artifact(2)), second, closed)).await;
    let mut second_source = ScriptedSource::new(artifact(2), 4096);
    assert_eq!(a.pass(&mut second_source).await, Pass::Idle);
    let third = Uuid::now_v7();
    let newer = signer.sign("99.1.0", &platform, &artifact(3));
    a.apply(&order(newer, third, start() + chrono::Duration::hours(1))).await;
    let second_status = a.statuses().await.pop().expect("status");
    assert_eq!(second_status["rollout_id"], second.to_string());
    assert_eq!(second_status["phase"], "failed");
    assert!(second_status["reason"].as_str().is_some_and(|r| r.contains(&third.to_string())));
    assert_eq!(a.record(second).await.state, "superseded");
    let mut third_source = ScriptedSource::new(artifact(3), 4096);
    assert!(matches!(a.pass(&mut third_source).await, Pass::Switch(p) if p.to_version == "99.1.0"));
    assert_eq!(third_source.offsets(), [0], "the other release's files are never resumed into");
    assert_eq!(std::fs::read(a.dir.staged()).expect("staged"), artifact(3));
}

#[tokio::test]
async fn a_malformed_upgrade_command_is_recorded_with_its_error_and_never_blocks_the_log() {
    let signer = Signer::new();
    let a = agent("malformed", &signer, true).await;
    for (seq, payload) in [
        (1, b"{".to_vec()),
        (2, br#"{"rollout_id":"x"}"#.to_vec()),
        (3, serde_json::json!({"rollout_id": Uuid::now_v7(), "release": {"version": "1", "platform": "p", "sha256": "zz", "size": 1, "key_id": "k", "signature": "s"}, "allow_downgrade": false, "switch_before": "2026-03-09T05:00:00Z", "health_timeout_s": 0}).to_string().into_bytes()),
    ] {
        let applied = a.apply_raw(seq, "AGENT_UPGRADE".into(), payload).await;
        let error = applied.error.expect("rejected");
        assert!(error.contains("AGENT_UPGRADE"), "{error}");
        assert_eq!(a.command_error(seq).await.as_deref(), Some(error.as_str()));
    }
    assert!(a.statuses().await.is_empty());
    assert!(a.ctx.db.read(|c| upgrade::list(c, 10)).await.expect("list").is_empty());
}
