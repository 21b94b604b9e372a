//! No secret ever reaches a log: the real `meridian-controller` and `meridian-agent` binaries
//! run at debug level while every kind of secret is created and used — the bootstrap admin
//! token, an API token, an enrollment token (used, then tried again), the agent's credential,
//! a connector key, a staff password (right and wrong, through the API and the workstation)
//! and the session tokens it yields, a webhook signing secret, a token in a webhook's URL, a
//! database password — and
//! neither process's stdout or stderr holds any of them.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use meridian_proto::agent_gateway_client::AgentGatewayClient;
use reqwest::Method;
use serde_json::{Value, json};
use support::*;
use tokio::process::{Child, Command};

/// A process whose stdout and stderr both go to `log`.
fn logged(program: &Path, log: &Path) -> Command {
    let file = std::fs::File::create(log).expect("log file");
    let mut cmd = Command::new(program);
    cmd.stdout(Stdio::from(file.try_clone().expect("log file"))).stderr(Stdio::from(file));
    cmd.kill_on_drop(true);
    cmd
}

/// SIGTERM, so the shutdown path logs too; then waits for the exit.
async fn stop(child: &mut Child) {
    let pid = child.id().expect("running").to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().await.expect("kill");
    assert!(sent.success());
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("stopped within 30 s")
        .expect("exit status");
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// A webhook receiver: answers the first delivery 500 (so the agent logs a failed delivery and
/// retries), the rest 200; counts the deliveries it accepted.
async fn webhook_receiver() -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let (calls, accepted) = (calls.clone(), accepted.clone());
            move || async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind receiver");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), accepted)
}

#[tokio::test]
async fn no_secret_reaches_the_logs_of_the_controller_or_the_agent() {
    let root = temp_dir("meridian-no-secrets");
    let mut secrets: Vec<(&str, String)> = Vec::new();

    // The controller, with its bootstrap token written to a file.
    let controller_log = root.join("controller.log");
    let controller_ready = root.join("controller-ready.json");
    let token_file = root.join("controller/bootstrap-token");
    let mut controller = logged(&workspace_binary("meridian-controller"), &controller_log)
        .arg("run")
        .env("MERIDIAN_CONTROLLER_DATA_DIR", root.join("controller"))
        .env("MERIDIAN_CONTROLLER_API_LISTEN", "127.0.0.1:0")
        .env("MERIDIAN_CONTROLLER_GATEWAY_LISTEN", "127.0.0.1:0")
        .env("MERIDIAN_CONTROLLER_HEARTBEAT_MS", "500")
        .env("MERIDIAN_CONTROLLER_BOOTSTRAP_TOKEN_FILE", &token_file)
        .env("MERIDIAN_CONTROLLER_READY_FILE", &controller_ready)
        .env("MERIDIAN_CONTROLLER_LOG", "debug")
        .spawn()
        .expect("spawn meridian-controller");
    let r = read_ready(&controller_ready, &mut controller).await;
    let api = format!("http://{}", r["api"].as_str().expect("api"));
    let gateway = format!("http://{}", r["gateway"].as_str().expect("gateway"));
    let bootstrap =
        std::fs::read_to_string(&token_file).expect("bootstrap token").trim().to_owned();
    secrets.push(("bootstrap admin token", bootstrap.clone()));
    let bootstrap_admin =
        AdminClient { base: api.clone(), token: bootstrap, http: reqwest::Client::new() };

    // An API token made through the API, then used for everything else.
    let created = bootstrap_admin
        .ok(
            Method::POST,
            "/api/v1/api-tokens",
            Some(json!({"name": "automation", "role": "admin"})),
        )
        .await;
    let api_token = created["secret"].as_str().expect("secret").to_owned();
    secrets.push(("API token", api_token.clone()));
    let admin = AdminClient { base: api.clone(), token: api_token, http: reqwest::Client::new() };

    // Configuration: a site, a staff user with a password, a webhook with a signing secret,
    // a connector key generated by the controller.
    admin.seed_site("SFO").await;
    let password = unique("pw-");
    let wrong_password = unique("typo-");
    secrets.push(("staff password", password.clone()));
    secrets.push(("wrong staff password", wrong_password.clone()));
    let webhook_secret = unique("whsec-");
    secrets.push(("webhook secret", webhook_secret.clone()));
    // A webhook URL can be a secret itself (a token in its path); this one never answers, so
    // its failures are logged.
    let url_token = unique("hooktoken-");
    secrets.push(("token in a webhook URL", url_token.clone()));
    let (hook_url, accepted) = webhook_receiver().await;
    admin
        .ok(
            Method::POST,
            "/api/v1/apply",
            Some(json!({"resources": [
                {"kind": "staff_user", "username": "ana", "name": "Ana", "roles": ["staff"],
                 "sites": ["SFO"], "password": password},
                {"kind": "webhook", "site": "SFO", "code": "crm", "url": hook_url,
                 "secret": webhook_secret},
                {"kind": "webhook", "site": "SFO", "code": "gone",
                 "url": format!("http://127.0.0.1:9/hooks/{url_token}"),
                 "secret": unique("whsec-")},
            ]})),
        )
        .await;
    let key = admin
        .ok(
            Method::POST,
            "/api/v1/sites/SFO/connector-keys",
            Some(json!({"code": "kiosk", "name": "Kiosk"})),
        )
        .await;
    let connector_key = key["secret"].as_str().expect("connector key").to_owned();
    secrets.push(("connector key", connector_key.clone()));
    let config = admin.ok(Method::GET, "/api/v1/config", None).await;
    let revision = config["revision"].as_u64().expect("the configuration revision");

    // The agent enrolls with a one-time token, which is then refused when tried again.
    let enrollment = admin.enrollment_token("SFO").await;
    secrets.push(("enrollment token", enrollment.clone()));
    let agent_dir = root.join("agent");
    let agent_log = root.join("agent.log");
    let agent_ready = root.join("agent-ready.json");
    let mut agent = logged(&workspace_binary("meridian-agent"), &agent_log)
        .arg("run")
        .env("MERIDIAN_AGENT_CONTROLLER_URL", &gateway)
        .env("MERIDIAN_AGENT_DATA_DIR", &agent_dir)
        .env("MERIDIAN_AGENT_HTTP_LISTEN", "127.0.0.1:0")
        .env("MERIDIAN_AGENT_ENROLLMENT_TOKEN", &enrollment)
        .env("MERIDIAN_AGENT_HEARTBEAT_MS", "500")
        .env("MERIDIAN_AGENT_BACKOFF_BASE_MS", "50")
        .env("MERIDIAN_AGENT_BACKOFF_CAP_MS", "1000")
        .env("MERIDIAN_AGENT_WEBHOOK_BACKOFF_BASE_MS", "50")
        .env("MERIDIAN_AGENT_WEBHOOK_BACKOFF_CAP_MS", "200")
        .env("MERIDIAN_AGENT_READY_FILE", &agent_ready)
        .env("MERIDIAN_AGENT_LOG", "debug")
        .spawn()
        .expect("spawn meridian-agent");
    let a = read_ready(&agent_ready, &mut agent).await;
    let branch = format!("http://{}", a["http"].as_str().expect("http"));
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    wait_for("the agent enrolled and on the latest revision", Duration::from_secs(60), || async {
        let s: Value =
            http.get(format!("{branch}/api/v1/status")).send().await.ok()?.json().await.ok()?;
        (s["connected"] == true && s["config_revision"].as_u64() >= Some(revision)).then_some(())
    })
    .await;
    let channel = tonic::transport::Endpoint::from_shared(gateway.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("gateway");
    let again = AgentGatewayClient::new(channel)
        .enroll(meridian_proto::EnrollRequest {
            token: enrollment.clone(),
            hostname: "intruder".into(),
            version: "0".into(),
        })
        .await;
    assert!(again.is_err(), "a spent enrollment token is refused");

    // The agent's credential, as it keeps it.
    let credential: String = rusqlite::Connection::open(agent_dir.join("agent.db"))
        .expect("agent.db")
        .query_row("SELECT value FROM meta WHERE key = 'credential'", [], |r| r.get(0))
        .expect("credential");
    secrets.push(("agent credential", credential));

    // Staff sign in (API and workstation), with a wrong password first; both sessions are used.
    let sign_in = |password: String| {
        http.post(format!("{branch}/api/v1/sessions"))
            .json(&json!({"username": "ana", "password": password}))
            .send()
    };
    assert_eq!(sign_in(wrong_password.clone()).await.expect("sign-in").status(), 401);
    let session: Value =
        sign_in(password.clone()).await.expect("sign-in").json().await.expect("session");
    let session = session["token"].as_str().expect("session token").to_owned();
    secrets.push(("staff session token", session.clone()));
    let queues = http.get(format!("{branch}/api/v1/queues")).bearer_auth(&session).send().await;
    assert_eq!(queues.expect("queues").status(), 200);
    let login = http
        .post(format!("{branch}/workstation/login"))
        .form(&[("username", "ana"), ("password", password.as_str()), ("counter", "")])
        .send()
        .await
        .expect("workstation login");
    let cookie = login
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.strip_prefix("meridian_session=")?.split(';').next().map(str::to_owned))
        .filter(|v| !v.is_empty())
        .expect("a workstation session cookie");
    secrets.push(("workstation session", cookie.clone()));
    let page = http
        .get(format!("{branch}/workstation"))
        .header(reqwest::header::COOKIE, format!("meridian_session={cookie}"))
        .send()
        .await
        .expect("workstation");
    assert_eq!(page.status(), 200);

    // The connector key issues a ticket; its event goes to the webhook (refused once, retried).
    let ticket = http
        .post(format!("{branch}/api/v1/visits"))
        .bearer_auth(&connector_key)
        .json(&json!({"service": "GEN"}))
        .send()
        .await
        .expect("ticket");
    assert_eq!(ticket.status(), 201);
    wait_for("the webhook delivered after a refusal", Duration::from_secs(60), || async {
        (accepted.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    wait_for("the unreachable webhook's failure logged", Duration::from_secs(60), || async {
        let log = std::fs::read_to_string(&agent_log).ok()?;
        log.lines()
            .any(|l| l.contains("webhook delivery failed") && l.contains("gone"))
            .then_some(())
    })
    .await;

    stop(&mut agent).await;
    stop(&mut controller).await;

    // A database URL with a password, to a server that is not there: the controller stops
    // with an error and says which database, without the password.
    let db_password = unique("dbpw-");
    secrets.push(("database password", db_password.clone()));
    let db_log = root.join("controller-db.log");
    let status = logged(&workspace_binary("meridian-controller"), &db_log)
        .arg("run")
        .env(
            "MERIDIAN_CONTROLLER_DATABASE_URL",
            format!("postgres://meridian:{db_password}@127.0.0.1:9/meridian"),
        )
        .env("MERIDIAN_CONTROLLER_DATA_DIR", root.join("controller-db"))
        .env("MERIDIAN_CONTROLLER_API_LISTEN", "127.0.0.1:0")
        .env("MERIDIAN_CONTROLLER_GATEWAY_LISTEN", "127.0.0.1:0")
        .env("MERIDIAN_CONTROLLER_LOG", "debug")
        .status()
        .await
        .expect("meridian-controller");
    assert!(!status.success(), "no database, no controller");

    let logs = [
        ("controller", std::fs::read_to_string(&controller_log).expect("controller log")),
        ("agent", std::fs::read_to_string(&agent_log).expect("agent log")),
        ("controller without its database", std::fs::read_to_string(&db_log).expect("log")),
    ];
    for (process, log) in &logs[..2] {
        assert!(log.contains("DEBUG"), "the {process} logged at debug level:\n{log}");
    }
    for (process, log) in &logs {
        for (what, secret) in &secrets {
            assert!(!log.contains(secret.as_str()), "the {process}'s log holds the {what}");
        }
    }
    assert!(logs[0].1.contains(&token_file.display().to_string()), "the log names the token file");
    assert!(logs[2].1.contains("meridian:***@127.0.0.1:9"), "the log names the database, redacted");
}
