//! Remote upgrade rollouts end to end: a real controller on PostgreSQL, real
//! `meridian-agent` processes, a release signed with a key made here, uploaded through the
//! admin API and rolled out in waves.
//!
//! The new version is a second build of the agent that reports `99.0.0-fixture`
//! (`make upgrade-fixture` builds it into `$CARGO_TARGET_DIR/upgrade-fixture` before the
//! suite). The broken release is a program that exits at once.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use meridian_shared::releases::{self, PrivateKey, ReleaseManifest};
use serde_json::{Value, json};
use support::{CONNECTOR_KEY, ControllerProc, Fault, FaultProxy, fresh_postgres_url, temp_dir};
use tokio::process::{Child, Command};

const FIXTURE_VERSION: &str = "99.0.0-fixture";

/// A test directory, removed when the test passes (kept for a look when it fails).
struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `<target>/debug/meridian` -> `<target>`.
fn target_dir() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_meridian"));
    bin.parent().and_then(Path::parent).expect("the target directory").to_owned()
}

/// The agent binary of this build (the version every agent starts on).
fn agent_binary() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_meridian")).with_file_name("meridian-agent");
    assert!(bin.exists(), "{} is missing: build the workspace first", bin.display());
    bin
}

/// The second agent build, reporting `FIXTURE_VERSION`.
fn fixture_binary() -> PathBuf {
    let bin = target_dir().join("upgrade-fixture/debug/meridian-agent");
    assert!(
        bin.exists(),
        "{} is missing: run `make upgrade-fixture` (make test does it before the suite)",
        bin.display()
    );
    bin
}

/// A `meridian-agent run` process (the binary an operator installs), restarting itself on
/// upgrades; its branch server's port is re-read from the ready file after each restart.
struct Agent {
    child: Child,
    dir: PathBuf,
    ready: PathBuf,
}

impl Agent {
    async fn start(dir: &Path, controller: &str, token: &str, release_key: &str) -> Agent {
        std::fs::create_dir_all(dir).expect("agent dir");
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let child = Command::new(agent_binary())
            .arg("run")
            .env("MERIDIAN_AGENT_CONTROLLER_URL", controller)
            .env("MERIDIAN_AGENT_DATA_DIR", dir)
            .env("MERIDIAN_AGENT_HTTP_LISTEN", "127.0.0.1:0")
            .env("MERIDIAN_AGENT_ENROLLMENT_TOKEN", token)
            .env("MERIDIAN_AGENT_HEARTBEAT_MS", "500")
            .env("MERIDIAN_AGENT_BACKOFF_BASE_MS", "50")
            .env("MERIDIAN_AGENT_BACKOFF_CAP_MS", "1000")
            .env("MERIDIAN_AGENT_READY_FILE", &ready)
            .env("MERIDIAN_AGENT_RELEASE_KEYS", release_key)
            .env("MERIDIAN_AGENT_UPGRADE_HEALTH_TIMEOUT_MS", "60000")
            .env("MERIDIAN_AGENT_UPGRADE_MAX_CRASHES", "2")
            .env("MERIDIAN_AGENT_LOG", std::env::var("MERIDIAN_E2E_LOG").unwrap_or("warn".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn meridian-agent");
        let agent = Agent { child, dir: dir.to_owned(), ready };
        agent
            .wait_status("the agent enrolled, configured and connected", |s| {
                s["connected"] == true && s["config_revision"].as_u64() > Some(0)
            })
            .await;
        agent
    }

    /// The branch server's URL now (it moves when the agent restarts on another binary).
    fn url(&self) -> Option<String> {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&self.ready).ok()?).ok()?;
        Some(format!("http://{}", v["http"].as_str()?))
    }

    async fn get(&self, path: &str) -> Option<Value> {
        let url = self.url()?;
        let resp = reqwest::Client::new()
            .get(format!("{url}{path}"))
            .bearer_auth(CONNECTOR_KEY)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.json().await.ok()
    }

    async fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        support::wait_for(what, Duration::from_secs(60), || async {
            self.get("/api/v1/status").await.filter(|s| pred(s))
        })
        .await
    }

    async fn issue_tickets(&self, n: usize) -> Vec<String> {
        let url = self.url().expect("branch server");
        let http = reqwest::Client::new();
        let mut ids = Vec::new();
        for _ in 0..n {
            let v: Value = http
                .post(format!("{url}/api/v1/visits"))
                .bearer_auth(CONNECTOR_KEY)
                .json(&json!({"service": "GEN"}))
                .send()
                .await
                .expect("post visit")
                .error_for_status()
                .expect("ticket issued")
                .json()
                .await
                .expect("visit json");
            ids.push(v["id"].as_str().expect("visit id").to_owned());
        }
        ids
    }

    /// Ids of the waiting visits, in queue order.
    async fn waiting(&self) -> Vec<String> {
        let v = self.get("/api/v1/visits?status=waiting").await.expect("waiting visits");
        v.as_array()
            .expect("visits")
            .iter()
            .map(|v| v["id"].as_str().expect("id").to_owned())
            .collect()
    }

    /// SIGKILLs the process this test started and waits until the agent's branch server is gone.
    async fn stop_with_watchdog(mut self) {
        let url = self.url().expect("branch server");
        self.child.start_kill().expect("kill");
        let _ = self.child.wait().await;
        let http = reqwest::Client::new();
        support::wait_for("the agent to stop with its watchdog", Duration::from_secs(30), || {
            let (http, url) = (&http, &url);
            async move {
                let alive = http
                    .get(format!("{url}/healthz"))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok();
                (!alive).then_some(())
            }
        })
        .await;
    }

    /// The binaries the agent keeps for upgrades.
    fn upgrade_file(&self, name: &str) -> PathBuf {
        self.dir.join("upgrade").join(name)
    }
}

/// Signs `artifact` as `version` for this platform and uploads it.
async fn upload_release(
    controller: &ControllerProc,
    key: &PrivateKey,
    version: &str,
    artifact: Vec<u8>,
) -> Value {
    let manifest = signed_manifest(key, version, &artifact);
    let form = reqwest::multipart::Form::new()
        .part(
            "manifest",
            reqwest::multipart::Part::text(serde_json::to_string(&manifest).expect("manifest"))
                .mime_str("application/json")
                .expect("mime"),
        )
        .part("artifact", reqwest::multipart::Part::bytes(artifact).file_name("meridian-agent"));
    let client = controller.client();
    let resp = client
        .http
        .post(format!("{}/api/v1/releases", client.base))
        .bearer_auth(&client.token)
        .multipart(form)
        .send()
        .await
        .expect("upload");
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or_default();
    assert_eq!(status.as_u16(), 201, "release upload refused: {body}");
    body
}

fn signed_manifest(key: &PrivateKey, version: &str, artifact: &[u8]) -> ReleaseManifest {
    let platform = releases::current_platform();
    let notes = format!("test release {version}");
    let release = releases::UnsignedRelease::of_artifact(version, &platform, &notes, artifact)
        .expect("the release's digest");
    releases::sign(key, release).expect("signed")
}

/// Starts a controller on a fresh PostgreSQL database that trusts `key`, with the sites.
async fn controller(dir: &Path, key: &PrivateKey, sites: &[&str]) -> ControllerProc {
    let url = fresh_postgres_url().await;
    let controller = ControllerProc::start_with(
        &dir.join("controller"),
        &url,
        &[
            ("MERIDIAN_CONTROLLER_RELEASE_KEYS", key.public_key().to_string()),
            ("MERIDIAN_CONTROLLER_ROLLOUT_TICK_MS", "200".into()),
        ],
    )
    .await;
    let client = controller.client();
    for site in sites {
        client.seed_site(site).await;
    }
    controller
}

async fn rollout(controller: &ControllerProc, id: &str) -> Value {
    controller.client().ok(reqwest::Method::GET, &format!("/api/v1/rollouts/{id}"), None).await
}

fn site_state<'a>(rollout: &'a Value, site: &str) -> &'a str {
    rollout["sites"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["site"] == site))
        .and_then(|s| s["state"].as_str())
        .unwrap_or("missing")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollout_upgrades_the_canary_then_the_rest_through_an_outage_and_a_cut_download() {
    let dir = temp_dir("upgrade-rollout");
    let dir = TempDir(dir);
    let key = PrivateKey::generate();
    let public = key.public_key().to_string();
    let controller = controller(dir.path(), &key, &["SFO", "CHI", "TYO"]).await;
    let client = controller.client();

    // SFO (the canary) dials the controller directly; CHI and TYO through fault proxies.
    let chi_proxy = FaultProxy::start(controller.gateway).await;
    let tyo_proxy = FaultProxy::start(controller.gateway).await;
    let direct = format!("http://{}", controller.gateway);
    let sfo = Agent::start(
        &dir.path().join("sfo"),
        &direct,
        &client.enrollment_token("SFO").await,
        &public,
    )
    .await;
    let chi = Agent::start(
        &dir.path().join("chi"),
        &format!("http://{}", chi_proxy.addr),
        &client.enrollment_token("CHI").await,
        &public,
    )
    .await;
    let tyo = Agent::start(
        &dir.path().join("tyo"),
        &format!("http://{}", tyo_proxy.addr),
        &client.enrollment_token("TYO").await,
        &public,
    )
    .await;
    let old_version = sfo.get("/api/v1/status").await.expect("status")["version"]
        .as_str()
        .expect("version")
        .to_owned();
    assert_ne!(old_version, FIXTURE_VERSION);

    // Branch data and queues before the upgrade.
    let mut queues = Vec::new();
    for agent in [&sfo, &chi, &tyo] {
        agent.issue_tickets(5).await;
        queues.push(agent.waiting().await);
        assert_eq!(queues.last().map(Vec::len), Some(5));
    }

    let artifact = std::fs::read(fixture_binary()).expect("read the fixture binary");
    let size = artifact.len() as u64;
    upload_release(&controller, &key, FIXTURE_VERSION, artifact).await;

    // TYO is offline when its wave starts; CHI's download is cut a third of the way through.
    tyo_proxy.set(Fault::Cut);
    tyo.wait_status("TYO to notice it is offline", |s| s["connected"] == false).await;
    chi_proxy.set(Fault::CutOnceAfterDownstream(size / 3));

    let created = client
        .ok(
            reqwest::Method::POST,
            "/api/v1/rollouts",
            Some(json!({
                "version": FIXTURE_VERSION,
                "platform": releases::current_platform(),
                "targets": {"sites": ["SFO", "CHI", "TYO"]},
                "waves": [{"sites": 1}, {"rest": true}],
                "wave_pause_s": 1,
                "max_failures": 0,
                "window": {"start": "00:00", "end": "00:00"},
                "health_timeout_s": 60,
            })),
        )
        .await;
    let id = created["id"].as_str().expect("rollout id").to_owned();

    // The canary goes first: no other site leaves `pending` before SFO is healthy.
    let done = support::wait_for(
        "the canary healthy and the second wave under way",
        Duration::from_secs(120),
        || async {
            let r = rollout(&controller, &id).await;
            let canary = site_state(&r, "SFO");
            for other in ["CHI", "TYO"] {
                let state = site_state(&r, other);
                assert!(
                    state == "pending" || canary == "healthy",
                    "{other} is {state} while the canary is {canary}: {r}"
                );
            }
            (canary == "healthy" && site_state(&r, "CHI") != "pending").then_some(r)
        },
    )
    .await;
    assert_eq!(site_state(&done, "SFO"), "healthy", "{done}");

    // CHI's cut download resumes and completes; TYO waits offline.
    support::wait_for("CHI healthy after its cut download", Duration::from_secs(120), || async {
        let r = rollout(&controller, &id).await;
        (site_state(&r, "CHI") == "healthy").then_some(())
    })
    .await;
    assert!(chi_proxy.tripped(), "the download was cut in the middle");
    let r = rollout(&controller, &id).await;
    assert_ne!(site_state(&r, "TYO"), "healthy", "TYO was offline: {r}");
    assert_eq!(r["state"], "running", "{r}");

    // TYO reconnects and upgrades; the rollout completes.
    tyo_proxy.set(Fault::Pass);
    let finished = support::wait_for("the rollout completed", Duration::from_secs(120), || async {
        let r = rollout(&controller, &id).await;
        (r["state"] == "completed").then_some(r)
    })
    .await;
    for site in ["SFO", "CHI", "TYO"] {
        assert_eq!(site_state(&finished, site), "healthy", "{finished}");
    }

    // Every agent runs and reports the new version, centrally too; data and queues intact.
    for (agent, queue) in [&sfo, &chi, &tyo].into_iter().zip(&queues) {
        let status = agent
            .wait_status("the agent on the new version and connected", |s| {
                s["version"] == FIXTURE_VERSION && s["connected"] == true
            })
            .await;
        let agent_id = status["agent_id"].as_str().expect("agent id");
        support::wait_for("the controller to see the new version", Duration::from_secs(30), || {
            let client = &client;
            async move {
                let a = client.agent(agent_id).await;
                (a["version"] == FIXTURE_VERSION).then_some(())
            }
        })
        .await;
        assert_eq!(&agent.waiting().await, queue, "the queue survived the upgrade");
        assert!(agent.upgrade_file("previous").exists(), "the previous binary is kept");
    }

    // Killing the watchdog (SIGKILL: no forwarding) stops the new binary too: nothing runs on
    // unwatched, holding the store and the branch port.
    for agent in [sfo, chi, tyo] {
        agent.stop_with_watchdog().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_that_exits_at_once_is_rolled_back_on_the_canary_and_the_rollout_halts() {
    let dir = temp_dir("upgrade-rollback");
    let dir = TempDir(dir);
    let key = PrivateKey::generate();
    let public = key.public_key().to_string();
    let controller = controller(dir.path(), &key, &["SFO", "CHI"]).await;
    let client = controller.client();
    let direct = format!("http://{}", controller.gateway);
    let sfo = Agent::start(
        &dir.path().join("sfo"),
        &direct,
        &client.enrollment_token("SFO").await,
        &public,
    )
    .await;
    let chi = Agent::start(
        &dir.path().join("chi"),
        &direct,
        &client.enrollment_token("CHI").await,
        &public,
    )
    .await;
    let old_version =
        sfo.get("/api/v1/status").await.expect("status")["version"].as_str().expect("v").to_owned();
    sfo.issue_tickets(3).await;
    let sfo_queue = sfo.waiting().await;

    // A "binary" that exits at once with an error.
    upload_release(&controller, &key, "98.0.0", b"#!/bin/sh\nexit 3\n".to_vec()).await;
    let created = client
        .ok(
            reqwest::Method::POST,
            "/api/v1/rollouts",
            Some(json!({
                "version": "98.0.0",
                "platform": releases::current_platform(),
                "targets": {"sites": ["SFO", "CHI"]},
                "waves": [{"sites": 1}, {"rest": true}],
                "max_failures": 0,
                "window": {"start": "00:00", "end": "00:00"},
                "health_timeout_s": 60,
            })),
        )
        .await;
    let id = created["id"].as_str().expect("rollout id").to_owned();

    let halted = support::wait_for("the rollout halted", Duration::from_secs(120), || async {
        let r = rollout(&controller, &id).await;
        (r["state"] == "halted").then_some(r)
    })
    .await;
    assert_eq!(site_state(&halted, "SFO"), "rolled_back", "{halted}");
    assert_eq!(site_state(&halted, "CHI"), "pending", "CHI is never touched: {halted}");

    // The canary runs its previous binary again, connected, with its data.
    sfo.wait_status("SFO back on its previous version and connected", |s| {
        s["version"] == old_version.as_str() && s["connected"] == true
    })
    .await;
    assert_eq!(sfo.waiting().await, sfo_queue);
    // CHI never received an upgrade: nothing staged, nothing switched.
    assert!(!chi.upgrade_file("current").exists());
    assert!(!chi.upgrade_file("staged").exists());
    assert!(!chi.upgrade_file("staged.partial").exists());
    let chi_status = chi.get("/api/v1/status").await.expect("CHI status");
    assert_eq!(chi_status["version"], old_version.as_str());
}

/// Keeps the binary names honest: the fixture reports the version the tests expect.
#[test]
fn the_fixture_reports_its_own_version() {
    let out = std::process::Command::new(fixture_binary())
        .arg("--version")
        .output()
        .expect("run the fixture");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(FIXTURE_VERSION), "{text}");
}
