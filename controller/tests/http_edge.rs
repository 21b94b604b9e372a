//! The admin API listener's HTTP edge on a served controller (`server::serve`, real
//! listeners): every console page and API answer carries the security headers (pages: a
//! Content-Security-Policy without inline script or style, no framing; answers carrying a
//! secret: never cached); `/metrics` takes a bearer API token there and none on
//! `metrics_listen`; a client slow to send its request head is cut off while others are
//! served; connections over the cap wait until one closes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_controller::api;
use meridian_controller::server::{Listeners, ensure_bootstrap_token, serve};
use meridian_controller::settings::Settings;
use meridian_controller::store::{self, Role, Store};
use meridian_controller::testing::{self, hidden_field};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

struct Controller {
    api: String,
    addr: std::net::SocketAddr,
    metrics: Option<String>,
    admin: String,
    viewer: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    served: tokio::task::JoinHandle<meridian_controller::Result<()>>,
}

impl Controller {
    async fn start(tweak: impl FnOnce(&mut Settings)) -> Controller {
        let store: Arc<dyn Store> = store::open(&testing::fresh_sqlite_url()).await.expect("store");
        let admin =
            ensure_bootstrap_token(store.as_ref(), None).await.expect("bootstrap").expect("fresh");
        let (token, viewer) = api::new_api_token("dashboard", Role::Viewer);
        store.insert_api_token(&token).await.expect("viewer token");
        let api_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gateway = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = api_listener.local_addr().expect("addr");
        let dir = testing::temp_dir("controller-http-edge");
        let ready = dir.join("ready.json");
        let mut settings = Settings { ready_file: Some(ready.clone()), ..Settings::default() };
        tweak(&mut settings);
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(serve(
            settings,
            store,
            Listeners { api: api_listener, gateway },
            shutdown.clone(),
        ));
        let until = Instant::now() + Duration::from_secs(30);
        let ready: Value = loop {
            if let Some(v) =
                std::fs::read_to_string(&ready).ok().and_then(|s| serde_json::from_str(&s).ok())
            {
                break v;
            }
            assert!(Instant::now() < until, "the controller did not get ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // No idle pooled connection: it would hold one of the server's connection slots.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(0)
            .build()
            .expect("client");
        Controller {
            api: format!("http://{addr}"),
            addr,
            metrics: ready["metrics"].as_str().map(|a| format!("http://{a}/metrics")),
            admin,
            viewer,
            http,
            shutdown,
            served,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.served.await.expect("join").expect("served");
    }

    /// Signs in through the console's form; returns the session cookie.
    async fn sign_in(&self, token: &str) -> String {
        let page = self.http.get(format!("{}/console/login", self.api)).send().await.expect("page");
        check_page("/console/login", &page);
        let login_cookie = cookie(&page, "meridian_console_login").expect("login cookie");
        let nonce = hidden_field(&page.text().await.expect("body"), "csrf").expect("nonce");
        let resp = self
            .http
            .post(format!("{}/console/login", self.api))
            .header("cookie", login_cookie)
            .form(&[("token", token), ("csrf", nonce.as_str())])
            .send()
            .await
            .expect("sign in");
        assert_eq!(resp.status(), 303);
        cookie(&resp, "meridian_console").expect("session cookie")
    }
}

fn cookie(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next())
        .find(|c| c.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

fn check_common(what: &str, resp: &reqwest::Response) {
    assert_eq!(header(resp, "x-content-type-options"), "nosniff", "{what}");
    assert_eq!(header(resp, "referrer-policy"), "same-origin", "{what}");
}

fn check_page(what: &str, resp: &reqwest::Response) {
    check_common(what, resp);
    assert!(header(resp, "content-type").starts_with("text/html"), "{what}");
    assert_eq!(header(resp, "cache-control"), "no-store", "{what}");
    assert_eq!(header(resp, "x-frame-options"), "DENY", "{what}");
    let csp = header(resp, "content-security-policy");
    for d in
        ["default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"]
    {
        assert!(csp.contains(d), "{what}: {d} missing in {csp}");
    }
}

async fn check_page_body(what: &str, resp: reqwest::Response) {
    check_page(what, &resp);
    let body = resp.text().await.expect("page");
    for inline in ["<script", " style=", "<style", "javascript:", " onclick=", " onsubmit="] {
        assert!(!body.contains(inline), "{what} has {inline:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_console_page_and_api_answer_carries_the_security_headers() {
    let c = Controller::start(|_| {}).await;
    let session = c.sign_in(&c.admin).await;
    for path in [
        "/console",
        "/console/live",
        "/console/stats",
        "/console/quarantine",
        "/console/requests",
        "/console/rollouts",
        "/console/rollouts/not-a-rollout",
    ] {
        let resp = c
            .http
            .get(format!("{}{path}", c.api))
            .header("cookie", &session)
            .send()
            .await
            .expect("page");
        check_page_body(path, resp).await;
    }
    let css =
        c.http.get(format!("{}/console/assets/console.css", c.api)).send().await.expect("css");
    assert_eq!(css.status(), 200);
    check_common("console.css", &css);
    assert!(header(&css, "content-type").starts_with("text/css"));

    // Answers that carry a secret (and every other): never cached, never sniffed.
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut req = c.http.request(method, format!("{}{path}", c.api)).bearer_auth(&c.admin);
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send()
    };
    let site = json!({"code": "SFO", "name": "San Francisco", "time_zone": "America/Los_Angeles"});
    let secrets = [
        ("/api/v1/sites", json!(site)),
        ("/api/v1/api-tokens", json!({"name": "ci", "role": "viewer"})),
        ("/api/v1/enrollment-tokens", json!({"site": "SFO"})),
        ("/api/v1/sites/SFO/connector-keys", json!({"code": "kiosk", "name": "Kiosk"})),
    ];
    for (path, body) in secrets {
        let resp = call(reqwest::Method::POST, path, Some(body)).await.expect("post");
        assert_eq!(resp.status(), 201, "{path}");
        check_common(path, &resp);
        assert_eq!(header(&resp, "cache-control"), "no-store", "{path}");
    }
    for path in ["/api/v1/sites", "/api/v1/api-tokens", "/api/v1/nope", "/healthz", "/metrics"] {
        let resp = call(reqwest::Method::GET, path, None).await.expect("get");
        check_common(path, &resp);
        assert_eq!(header(&resp, "cache-control"), "no-store", "{path}");
        assert!(header(&resp, "content-security-policy").contains("frame-ancestors 'none'"));
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_take_a_token_on_the_api_listener_and_none_on_their_own() {
    let c = Controller::start(|s| s.metrics_listen = "127.0.0.1:0".into()).await;
    let on_api = format!("{}/metrics", c.api);
    let anonymous = c.http.get(&on_api).send().await.expect("scrape");
    assert_eq!(anonymous.status(), 401);
    let body: Value = anonymous.json().await.expect("typed error");
    assert_eq!(body["code"], "unauthenticated");
    let wrong = c.http.get(&on_api).bearer_auth("mrd_at_wrong").send().await.expect("scrape");
    assert_eq!(wrong.status(), 401);
    for token in [&c.admin, &c.viewer] {
        let scrape = c.http.get(&on_api).bearer_auth(token).send().await.expect("scrape");
        assert_eq!(scrape.status(), 200);
        assert!(scrape.text().await.expect("text").contains("meridian_controller_sessions_active"));
    }
    let own = c.metrics.clone().expect("the metrics listener's address in the ready file");
    let scrape = c.http.get(&own).send().await.expect("scrape");
    assert_eq!(scrape.status(), 200);
    assert!(scrape.text().await.expect("text").contains("meridian_controller_sessions_active"));
    // That listener serves the metrics alone.
    let api = c.http.get(own.replace("/metrics", "/api/v1/sites")).send().await.expect("get");
    assert_eq!(api.status(), 404);
    c.stop().await;

    // Without `metrics_listen` there is no such listener.
    let c = Controller::start(|_| {}).await;
    assert!(c.metrics.is_none());
    c.stop().await;
}

async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => head.push(byte[0]),
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

async fn skip_body(stream: &mut TcpStream, head: &str) {
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.expect("body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_connections_over_the_cap_wait() {
    let c = Controller::start(|s| s.http_header_timeout_ms = 400).await;
    let mut slow = TcpStream::connect(c.addr).await.expect("connect");
    let started = Instant::now();
    slow.write_all(b"GET /console/login HTTP/1.1\r\nHost: controller\r\n").await.expect("write");
    let healthz = c.http.get(format!("{}/healthz", c.api)).send().await.expect("healthz");
    assert_eq!(healthz.status(), 200, "a normal client is served meanwhile");
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "slow client not cut off: {closed:?}");
    assert!(started.elapsed() >= Duration::from_millis(350), "{:?}", started.elapsed());
    c.stop().await;

    let c = Controller::start(|s| s.http_max_connections = 2).await;
    let request = b"GET /healthz HTTP/1.1\r\nHost: controller\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut conn = TcpStream::connect(c.addr).await.expect("connect");
        conn.write_all(request).await.expect("write");
        let head = read_head(&mut conn).await.expect("served");
        skip_body(&mut conn, &head).await;
        held.push(conn);
    }
    let mut third = TcpStream::connect(c.addr).await.expect("connect (the backlog)");
    third.write_all(request).await.expect("write");
    let waiting = tokio::time::timeout(Duration::from_millis(500), read_head(&mut third)).await;
    assert!(waiting.is_err(), "served over the cap: {waiting:?}");
    held[0].write_all(request).await.expect("write");
    let head = read_head(&mut held[0]).await.expect("the connections in still answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    held.pop();
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut third))
        .await
        .expect("served once a slot freed")
        .expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop((held, third));
    c.stop().await;
}
