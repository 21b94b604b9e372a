//! meridianctl against the real admin API, served in-process on 127.0.0.1:0 with a SQLite store:
//! the library functions the binary calls, then the binary itself for its output and exit codes.

use std::path::Path;
use std::sync::Arc;

use meridian_controller::api::{self, ApiState};
use meridian_controller::ctl::{self, Action, ChangeReport, Client, CtlError, Listing, Output};
use meridian_controller::metrics::Metrics;
use meridian_controller::server::ensure_bootstrap_token;
use meridian_controller::testing::{fresh_sqlite_url, temp_dir};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct TestServer {
    url: String,
    token: String,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    async fn start() -> Self {
        let store =
            meridian_controller::store::open(&fresh_sqlite_url()).await.expect("open store");
        let token = ensure_bootstrap_token(store.as_ref(), None)
            .await
            .expect("bootstrap token")
            .expect("a fresh store has no token yet");
        let state = ApiState {
            store,
            metrics: Arc::new(Metrics::default()),
            commands_changed: Arc::new(tokio::sync::watch::channel(0).0),
            clock_skew_tolerance: meridian_controller::Settings::default().clock_skew_tolerance(),
        };
        let router = api::router(state, 1024 * 1024);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        });
        TestServer { url, token, shutdown, task }
    }

    fn client(&self) -> Client {
        Client::new(&self.url, Some(self.token.clone())).expect("client")
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("server task").expect("server");
    }
}

const MANIFEST: &str = "\
kind: Site
code: SFO
name: San Francisco
time_zone: America/Los_Angeles
business_hours:
  mon: [09:00-12:00, 13:00-17:00]
---
kind: queue
site: SFO
code: A
name: General
letter: A
---
- kind: service
  site: SFO
  code: ACC
  name: Accounts
  queue: A
- kind: StaffUser
  username: alice
  name: Alice
  roles: [staff]
  sites: [SFO]
  password: correct horse battery
";

fn actions(report: &ChangeReport) -> Vec<(&str, Action)> {
    report.changes.iter().map(|c| (c.resource.as_str(), c.action)).collect()
}

async fn revision(client: &Client) -> u64 {
    let revisions = ctl::list(client, Listing::Revisions, None).await.expect("revisions");
    revisions.first().and_then(|r| r["revision"].as_u64()).unwrap_or(0)
}

fn api_code(result: Result<impl std::fmt::Debug, CtlError>) -> (String, String) {
    match result {
        Err(CtlError::Api(f)) => {
            let text = f.to_string();
            (f.code, text)
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn apply_get_and_delete_through_the_library() {
    let server = TestServer::start().await;
    let client = server.client();

    // First apply: everything created, in one revision, published to the site.
    let report = ctl::apply(&client, MANIFEST, false).await.expect("apply");
    assert_eq!(
        actions(&report),
        [
            ("site/SFO", Action::Created),
            ("queue/SFO/A", Action::Created),
            ("service/SFO/ACC", Action::Created),
            ("staff_user/alice", Action::Created),
        ]
    );
    assert_eq!((report.revision, report.dry_run), (1, false));
    assert_eq!(report.sites_published, ["SFO"]);
    assert_eq!(revision(&client).await, 1);

    // Same file again: nothing changes (the staff password matches its stored hash).
    let report = ctl::apply(&client, MANIFEST, false).await.expect("re-apply");
    assert!(report.changes.iter().all(|c| c.action == Action::Unchanged), "{report:?}");
    assert_eq!(report.changes.len(), 4);
    assert_eq!(report.revision, 1);
    assert!(report.sites_published.is_empty());
    assert_eq!(
        ctl::render_report(&report, Output::Table).expect("render"),
        "site/SFO unchanged\nqueue/SFO/A unchanged\nservice/SFO/ACC unchanged\nstaff_user/alice unchanged\n\
         no changes; configuration revision 1\n"
    );

    // A change as a dry run: reported as updated, nothing stored.
    let renamed = MANIFEST.replace("name: San Francisco", "name: San Francisco Downtown");
    let report = ctl::apply(&client, &renamed, true).await.expect("dry run");
    assert_eq!(report.revision, 1);
    assert!(report.dry_run);
    assert_eq!(
        actions(&report),
        [
            ("site/SFO", Action::Updated),
            ("queue/SFO/A", Action::Unchanged),
            ("service/SFO/ACC", Action::Unchanged),
            ("staff_user/alice", Action::Unchanged),
        ]
    );
    assert_eq!(report.sites_published, ["SFO"]);
    let sites = ctl::list(&client, Listing::Sites, None).await.expect("sites");
    assert_eq!(sites.len(), 1);
    assert_eq!(sites[0]["name"], "San Francisco");
    assert_eq!(revision(&client).await, 1);

    // Listings: site-scoped kinds across all sites and for one site agree.
    let all = ctl::list(&client, Listing::Queues, None).await.expect("queues");
    let sfo = ctl::list(&client, Listing::Queues, Some("SFO")).await.expect("SFO queues");
    assert_eq!(all, sfo);
    assert_eq!(
        ctl::render_list(Listing::Queues, &sfo, Output::Table, chrono::Utc::now()).expect("render"),
        "SITE   CODE   NAME      LETTER   NUMBERS\nSFO    A      General   A        1-999\n"
    );
    let staff = ctl::list(&client, Listing::Staff, Some("SFO")).await.expect("staff");
    assert_eq!(staff.len(), 1);
    assert!(staff[0].get("password_hash").is_none(), "the API never returns password hashes");
    let (code, _) = api_code(ctl::list(&client, Listing::Services, Some("CHI")).await);
    assert_eq!(code, "not_found");

    // Delete the service: one new revision.
    let key = ctl::key_from_args("service", "ACC", Some("SFO")).expect("key");
    let report = ctl::delete(&client, &[key], false).await.expect("delete");
    assert_eq!(actions(&report), [("service/SFO/ACC", Action::Deleted)]);
    assert_eq!(report.revision, 2);
    assert!(ctl::list(&client, Listing::Services, None).await.expect("services").is_empty());
    assert_eq!(revision(&client).await, 2);

    // Agents: none yet; the table is its header.
    let agents = ctl::list(&client, Listing::Agents, None).await.expect("agents");
    assert!(agents.is_empty());
    assert_eq!(
        ctl::render_list(Listing::Agents, &agents, Output::Table, chrono::Utc::now())
            .expect("render"),
        "SITE   ID   HOST   CONNECTED   VERSION   CONFIG   ACKED   BACKLOG   LAST SEEN   SKEW   ERROR\n"
    );
    assert_eq!(
        ctl::render_list(Listing::Agents, &agents, Output::Json, chrono::Utc::now()).expect("json"),
        "[]\n"
    );

    server.stop().await;
}

#[tokio::test]
async fn errors_are_reported_and_nothing_is_stored() {
    let server = TestServer::start().await;
    let client = server.client();
    ctl::apply(&client, MANIFEST, false).await.expect("apply");

    // The server refuses an unknown queue: code, message and the field in the details.
    let bad = MANIFEST.replace("queue: A", "queue: Z");
    let (code, text) = api_code(ctl::apply(&client, &bad, false).await);
    assert_eq!(code, "validation_failed");
    assert!(text.contains("\n  service/SFO/ACC.queue: unknown queue Z"), "{text}");

    // A manifest that does not parse is refused before anything is sent.
    let broken = format!("{MANIFEST}---\nkind: queue\nsite: SFO\ncode: [B\n");
    match ctl::apply(&client, &broken, false).await {
        Err(CtlError::Manifest(m)) => assert!(m.starts_with("document 4: "), "{m}"),
        other => panic!("expected a manifest error, got {other:?}"),
    }
    let typo = MANIFEST.replace("letter: A", "letter: A\ncolor: blue");
    match ctl::apply(&client, &typo, false).await {
        Err(CtlError::Manifest(m)) => {
            assert!(m.starts_with("document 2 (queue A): unknown field `color`"), "{m}")
        }
        other => panic!("expected a manifest error, got {other:?}"),
    }
    assert_eq!(revision(&client).await, 1);

    // Deleting what does not exist, or a site that still has queues.
    let key = ctl::key_from_args("queue", "ZZ", Some("SFO")).expect("key");
    assert_eq!(api_code(ctl::delete(&client, &[key], false).await).0, "not_found");
    let key = ctl::key_from_args("site", "SFO", None).expect("key");
    assert_eq!(api_code(ctl::delete(&client, &[key], false).await).0, "validation_failed");
    assert_eq!(revision(&client).await, 1);

    // Tokens: a viewer may read, not write; enrollment tokens list as valid.
    let viewer = ctl::create_api_token(&client, "dashboard", "viewer").await.expect("viewer token");
    let secret = viewer["secret"].as_str().expect("secret").to_owned();
    let as_viewer = Client::new(&server.url, Some(secret)).expect("client");
    assert_eq!(ctl::list(&as_viewer, Listing::Sites, None).await.expect("viewer reads").len(), 1);
    assert_eq!(api_code(ctl::apply(&as_viewer, MANIFEST, true).await).0, "forbidden");
    let id = viewer["id"].as_str().expect("id");
    ctl::delete_api_token(&client, id).await.expect("delete token");
    assert_eq!(api_code(ctl::list(&as_viewer, Listing::Sites, None).await).0, "unauthenticated");
    let (code, text) = api_code(
        ctl::list(&Client::new(&server.url, None).expect("client"), Listing::Sites, None).await,
    );
    assert_eq!(code, "unauthenticated");
    assert!(text.contains("no API token given"), "{text}");

    let created =
        ctl::create_enrollment_token(&client, "SFO", Some("1h")).await.expect("enrollment token");
    assert!(created.token.starts_with("mrd_enr_"));
    let ttl = created.expires_at - chrono::Utc::now();
    assert!(ttl > chrono::Duration::minutes(59) && ttl <= chrono::Duration::hours(1), "{ttl}");
    let listed = ctl::list(&client, Listing::EnrollmentTokens, Some("SFO")).await.expect("list");
    let table =
        ctl::render_list(Listing::EnrollmentTokens, &listed, Output::Table, chrono::Utc::now())
            .expect("render");
    assert!(
        table.lines().nth(1).is_some_and(|l| l.contains("SFO") && l.contains("valid for")),
        "{table}"
    );
    let (code, _) = api_code(ctl::create_enrollment_token(&client, "CHI", None).await);
    assert_eq!(code, "validation_failed");
    let (code, _) =
        api_code(ctl::revoke_agent(&client, "0b7e8a52-1f7e-4c1a-9d0e-8a1b2c3d4e5f").await);
    assert_eq!(code, "not_found");

    let url = server.url.clone();
    server.stop().await;

    // The stopped server cannot be reached, and the message names it.
    let client = Client::new(&url, Some("x".into())).expect("client");
    match ctl::list(&client, Listing::Sites, None).await {
        Err(e @ CtlError::Unreachable { .. }) => {
            assert!(
                e.to_string()
                    .starts_with(&format!("could not reach the Meridian controller at {url}: ")),
                "{e}"
            )
        }
        other => panic!("expected unreachable, got {other:?}"),
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn meridianctl(server: &str, token_file: &Path, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meridianctl"))
        .args(["--server", server, "--token-file"])
        .arg(token_file)
        .args(args)
        .env_remove("MERIDIAN_SERVER")
        .env_remove("MERIDIAN_TOKEN")
        .output()
        .await
        .expect("run meridianctl");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn the_binary_prints_results_and_exits_non_zero_on_errors() {
    let server = TestServer::start().await;
    let dir = temp_dir("meridianctl");
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{}\n", server.token)).expect("write token");
    let manifest = dir.join("sfo.yaml");
    std::fs::write(&manifest, MANIFEST).expect("write manifest");
    let manifest = manifest.to_str().expect("utf-8 path");

    let run = meridianctl(&server.url, &token_file, &["apply", "-f", manifest]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        run.stdout,
        "site/SFO created\nqueue/SFO/A created\nservice/SFO/ACC created\nstaff_user/alice created\n\
         configuration revision 1; published to SFO\n"
    );

    let run = meridianctl(&server.url, &token_file, &["get", "sites"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        run.stdout,
        "CODE   NAME            TIME ZONE             HOURS                         CLOSED DATES   TAGS\n\
         SFO    San Francisco   America/Los_Angeles   mon 09:00-12:00,13:00-17:00   -              -\n"
    );

    let run = meridianctl(&server.url, &token_file, &["get", "queues", "-o", "json"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let queues: Value = serde_json::from_str(&run.stdout).expect("json output");
    assert_eq!(queues[0]["letter"], "A");

    let run =
        meridianctl(&server.url, &token_file, &["delete", "staff-user", "alice", "--dry-run"])
            .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.starts_with("staff_user/alice deleted (dry run)\n"), "{}", run.stdout);

    let run =
        meridianctl(&server.url, &token_file, &["delete", "queue", "A", "--site", "SFO"]).await;
    assert_eq!(run.code, 1);
    assert!(run.stdout.is_empty());
    assert!(run.stderr.starts_with("error: validation_failed: "), "{}", run.stderr);
    assert!(run.stderr.contains("\n  service/SFO/ACC.queue: unknown queue A"), "{}", run.stderr);

    let run = meridianctl(
        &server.url,
        &token_file,
        &["enroll-token", "create", "--site", "SFO", "--ttl", "2h"],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.starts_with("token:   mrd_enr_"), "{}", run.stdout);

    let run = meridianctl(
        &server.url,
        &token_file,
        &["token", "create", "--name", "ci", "--role", "viewer", "-o", "yaml"],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let created: Value = serde_yaml_ng::from_str(&run.stdout).expect("yaml output");
    assert_eq!(created["role"], "viewer");
    let id = created["id"].as_str().expect("id");
    let run = meridianctl(&server.url, &token_file, &["token", "delete", id]).await;
    assert_eq!((run.code, run.stdout), (0, format!("API token {id} deleted\n")));

    // A port nobody listens on: bound, then released.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    server.stop().await;
    let run = meridianctl(&url, &token_file, &["get", "agents"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .starts_with(&format!("error: could not reach the Meridian controller at {url}: ")),
        "{}",
        run.stderr
    );
}

/// `deploy/controller.example.toml` (which `deploy/README.md` installs) is a valid settings file:
/// unknown fields are refused, so a renamed field breaks this test rather than an installation.
#[test]
fn the_deploy_example_settings_load() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/controller.example.toml");
    let settings =
        meridian_controller::Settings::load(Some(&path)).expect("deploy/controller.example.toml");
    assert!(settings.database_url.starts_with("postgres://"));
    assert_eq!(settings.gateway_listen, "0.0.0.0:8081");
    assert!(settings.tls_cert.is_some() && settings.tls_key.is_some());
    assert!(!settings.dev_mode);
}

#[tokio::test]
async fn connector_keys_are_generated_once_and_stored_as_hashes_and_webhook_secrets_are_write_only()
{
    let server = TestServer::start().await;
    let client = server.client();
    ctl::apply(&client, MANIFEST, false).await.expect("apply");
    let created = ctl::create_connector_key(&client, "SFO", "kiosk-1", "Entrance kiosk")
        .await
        .expect("create");
    let secret = created["secret"].as_str().expect("secret shown once").to_owned();
    assert!(secret.starts_with("mrd_ck_"));
    assert_eq!(
        created["key_hash"].as_str(),
        Some(meridian_controller::auth::hash_secret(&secret).as_str())
    );
    let listed = ctl::list(&client, Listing::ConnectorKeys, Some("SFO")).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert!(listed[0].get("secret").is_none(), "the secret is never listed");
    let again = ctl::create_connector_key(&client, "SFO", "kiosk-1", "Again").await;
    assert_eq!(api_code(again).0, "conflict");

    let hook = "kind: webhook\nsite: SFO\ncode: crm\nurl: https://crm.example.com/meridian\nsecret: a-long-shared-secret\n";
    ctl::apply(&client, hook, false).await.expect("apply webhook");
    let hooks = ctl::list(&client, Listing::Webhooks, Some("SFO")).await.expect("list");
    assert_eq!(hooks[0]["url"], "https://crm.example.com/meridian");
    assert!(hooks[0].get("secret").is_none(), "webhook secrets are write-only");
    let bad = "kind: webhook\nsite: SFO\ncode: bad\nurl: ftp://x\nsecret: short\n";
    assert_eq!(api_code(ctl::apply(&client, bad, false).await).0, "validation_failed");
}
