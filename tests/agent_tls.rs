//! The branch server over HTTPS: a real agent process serves its API and terminals with a
//! certificate from a private CA, picks up a renewed certificate without a restart, marks its
//! session cookies `Secure`; and the agent refuses to start with plaintext where it is not
//! allowed (the branch LAN, a controller elsewhere) unless told to.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use reqwest::Method;
use serde_json::json;
use support::*;
use tokio::process::Command;

/// A private CA that issues certificates for `localhost`.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("ca key")).expect("ca");
        Pki { ca }
    }

    fn ca_pem(&self) -> String {
        self.ca.as_ref().pem()
    }

    /// A new key and certificate for `localhost`, written to `cert` and `key` (the key
    /// last, as a renewal does); returns the certificate (DER).
    fn issue(&self, cert: &Path, key: &Path) -> Vec<u8> {
        let pair = KeyPair::generate().expect("key");
        let issued = CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .signed_by(&pair, &self.ca)
            .expect("sign");
        std::fs::write(cert, issued.pem()).expect("cert.pem");
        std::fs::write(key, pair.serialize_pem()).expect("key.pem");
        issued.der().to_vec()
    }
}

/// A client that trusts only `ca_pem`, reaches `localhost` at `addr`, opens a new connection
/// per request and shows redirects as they are.
fn https_client(ca_pem: &str, addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("ca"))
        .resolve("localhost", addr)
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// The certificate the server presented for `resp`.
fn peer_certificate(resp: &reqwest::Response) -> Option<Vec<u8>> {
    resp.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .map(<[u8]>::to_vec)
}

/// `AgentProc::url`'s address.
fn addr_of(agent: &AgentProc) -> SocketAddr {
    agent.url.trim_start_matches("http://").parse().expect("agent address")
}

struct TlsAgent {
    agent: AgentProc,
    cert: PathBuf,
    key: PathBuf,
    first: Vec<u8>,
    http: reqwest::Client,
    url: String,
}

/// An agent serving HTTPS with a certificate from `pki`, dialling `controller_url`.
async fn tls_agent(root: &Path, pki: &Pki, controller_url: &str, token: &str) -> TlsAgent {
    let (cert, key) = (root.join("agent.crt"), root.join("agent.key"));
    let first = pki.issue(&cert, &key);
    let env = [
        ("MERIDIAN_AGENT_TLS_CERT", cert.display().to_string()),
        ("MERIDIAN_AGENT_TLS_KEY", key.display().to_string()),
    ];
    let agent = AgentProc::spawn_with(&root.join("agent"), controller_url, token, &env).await;
    let addr = addr_of(&agent);
    TlsAgent {
        agent,
        cert,
        key,
        first,
        http: https_client(&pki.ca_pem(), addr),
        url: format!("https://localhost:{}", addr.port()),
    }
}

#[tokio::test]
async fn the_branch_server_serves_https_and_takes_a_renewed_certificate_without_restart() {
    let root = temp_dir("meridian-agent-tls");
    let pki = Pki::new();
    // No controller: the branch server does not need one.
    let a = tls_agent(&root, &pki, "http://127.0.0.1:9", "").await;

    let resp = a.http.get(format!("{}/healthz", a.url)).send().await.expect("https /healthz");
    assert_eq!(resp.status(), 200);
    assert_eq!(peer_certificate(&resp).as_deref(), Some(a.first.as_slice()));
    let status: serde_json::Value = a
        .http
        .get(format!("{}/api/v1/status", a.url))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    assert_eq!(status["connected"], false, "{status}");
    // Plain HTTP on the same port gets no answer; a client that trusts another CA refuses it.
    let plain = reqwest::Client::new()
        .get(format!("{}/healthz", a.agent.url))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(
        plain.is_err() || plain.is_ok_and(|r| r.status() != 200),
        "plain HTTP must not be served"
    );
    let stranger = https_client(&Pki::new().ca_pem(), addr_of(&a.agent));
    assert!(stranger.get(format!("{}/healthz", a.url)).send().await.is_err());

    // Renewed in place: new connections get the new certificate, no restart.
    let second = pki.issue(&a.cert, &a.key);
    assert_ne!(second, a.first);
    wait_for(
        "the branch server presents the renewed certificate",
        Duration::from_secs(30),
        || async {
            // A new client each time: a resumed TLS session would show the certificate of the
            // session it resumes.
            let http = https_client(&pki.ca_pem(), addr_of(&a.agent));
            let resp = http.get(format!("{}/healthz", a.url)).send().await.ok()?;
            (peer_certificate(&resp)? == second && resp.status() == 200).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn session_cookies_are_secure_when_the_branch_server_speaks_https() {
    let root = temp_dir("meridian-agent-tls-cookies");
    let db = format!("sqlite://{}/controller.db", root.display());
    let controller = ControllerProc::start(&root.join("controller"), &db).await;
    let admin = controller.client();
    admin.seed_site("SFO").await;
    let staff = json!({"kind": "staff_user", "username": "ana", "name": "Ana", "roles": ["staff"],
                       "sites": ["SFO"], "password": "correct horse 1"});
    let applied =
        admin.ok(Method::POST, "/api/v1/apply", Some(json!({ "resources": [staff] }))).await;
    let revision = applied["revision"].as_u64().expect("revision");
    let token = admin.enrollment_token("SFO").await;
    let pki = Pki::new();
    let a = tls_agent(&root, &pki, &format!("http://{}", controller.gateway), &token).await;
    wait_for("the agent has the staff user", Duration::from_secs(60), || async {
        let s: serde_json::Value =
            a.http.get(format!("{}/api/v1/status", a.url)).send().await.ok()?.json().await.ok()?;
        (s["config_revision"].as_u64() >= Some(revision)).then_some(())
    })
    .await;

    let resp = a
        .http
        .post(format!("{}/workstation/login", a.url))
        .form(&[("username", "ana"), ("password", "correct horse 1"), ("counter", "")])
        .send()
        .await
        .expect("workstation login");
    assert!(resp.status().is_redirection(), "signed in: {}", resp.status());
    let cookies: Vec<String> = resp
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().expect("ascii").to_owned())
        .collect();
    let session = cookies
        .iter()
        .find(|c| c.starts_with("meridian_session=") && !c.starts_with("meridian_session=;"))
        .unwrap_or_else(|| panic!("a session cookie: {cookies:?}"));
    let attributes: Vec<&str> = session.split(';').map(str::trim).collect();
    for wanted in ["Secure", "HttpOnly", "SameSite=Strict"] {
        assert!(attributes.contains(&wanted), "{wanted} in {session}");
    }
}

/// Starts the agent binary with `env` on top of a plaintext set-up; returns whether it came
/// up (its ready file) and what it logged.
async fn start_plaintext(name: &str, env: &[(&str, &str)]) -> (bool, String) {
    let dir = temp_dir(name);
    let ready = dir.join("ready.json");
    let log = dir.join("agent.log");
    let log_file = std::fs::File::create(&log).expect("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .arg("agent")
        .env("MERIDIAN_AGENT_CONTROLLER_URL", "http://127.0.0.1:9")
        .env("MERIDIAN_AGENT_DATA_DIR", dir.join("data"))
        .env("MERIDIAN_AGENT_HTTP_LISTEN", "127.0.0.1:0")
        .env("MERIDIAN_AGENT_READY_FILE", &ready)
        .env("MERIDIAN_AGENT_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(log_file.try_clone().expect("log"))
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn agent");
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    let came_up = loop {
        if ready.exists() {
            break true;
        }
        if let Ok(Some(status)) = child.try_wait() {
            assert!(!status.success(), "a refused start exits with an error");
            break false;
        }
        assert!(tokio::time::Instant::now() < until, "the agent neither started nor stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if came_up {
        child.start_kill().expect("stop agent");
        let _ = child.wait().await;
    }
    (came_up, std::fs::read_to_string(&log).unwrap_or_default())
}

#[tokio::test]
async fn plaintext_on_the_branch_lan_or_to_a_remote_controller_needs_an_explicit_setting() {
    // Loopback is fine as it is.
    let (up, log) = start_plaintext("meridian-plain-loopback", &[]).await;
    assert!(up, "plain HTTP on loopback starts: {log}");

    // The branch LAN (every interface): refused, unless allowed (with a warning).
    let lan = [("MERIDIAN_AGENT_HTTP_LISTEN", "0.0.0.0:0")];
    let (up, log) = start_plaintext("meridian-plain-lan", &lan).await;
    assert!(!up, "plain HTTP on the LAN must not start");
    assert!(
        log.contains("needs tls_cert and tls_key") && log.contains("allow_plaintext_lan"),
        "{log}"
    );
    let allowed = [lan[0], ("MERIDIAN_AGENT_ALLOW_PLAINTEXT_LAN", "true")];
    let (up, log) = start_plaintext("meridian-plain-lan-allowed", &allowed).await;
    assert!(up, "allowed: {log}");
    assert!(log.contains("WARN") && log.contains("allow_plaintext_lan"), "a warning: {log}");

    // A plaintext controller URL to another host: refused, unless allowed (with a warning).
    // (10.255.255.1 is never dialled: the link starts after the check, and nothing answers.)
    let remote = [("MERIDIAN_AGENT_CONTROLLER_URL", "http://10.255.255.1:8081")];
    let (up, log) = start_plaintext("meridian-plain-controller", &remote).await;
    assert!(!up, "a plaintext link to a remote controller must not start");
    assert!(log.contains("allow_plaintext_controller"), "{log}");
    let allowed = [remote[0], ("MERIDIAN_AGENT_ALLOW_PLAINTEXT_CONTROLLER", "true")];
    let (up, log) = start_plaintext("meridian-plain-controller-allowed", &allowed).await;
    assert!(up, "allowed: {log}");
    assert!(log.contains("WARN") && log.contains("allow_plaintext_controller"), "a warning: {log}");
    let tls = [("MERIDIAN_AGENT_CONTROLLER_URL", "https://10.255.255.1:8081")];
    assert!(start_plaintext("meridian-tls-controller", &tls).await.0, "https:// is always fine");
}
