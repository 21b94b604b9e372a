//! The branch server's HTTP edge on a real agent (`run_with`, a real listener): every page and
//! API answer carries the security headers, pages load script and style only from files the
//! agent serves, the display is framed only by the configured origins; a client slow to send
//! its request head or body is cut off while others are served; connections over the cap wait
//! until one closes; a live feed over the cap gets `503` with `Retry-After` until one ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_agent::store::queries;
use meridian_agent::{Context, Settings};
use meridian_shared::clock::SystemClock;
use meridian_shared::config::SiteConfig;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const KEY: &str = "mrd_ck_http-edge";
const PASSWORD: &str = "correct horse";
const SIGNAGE: &str = "https://signage.example.com";

fn site_config() -> SiteConfig {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(b"0123456789abcdef").expect("salt");
    let hash = argon2::Argon2::default().hash_password(PASSWORD.as_bytes(), &salt).expect("hash");
    serde_json::from_value(json!({
        "revision": 1,
        "site": {"code": "SFO", "name": "San Francisco", "time_zone": "America/Los_Angeles"},
        "services": [{"site": "SFO", "code": "GEN", "name": "General", "queue": "general"}],
        "queues": [{"site": "SFO", "code": "general", "name": "General", "letter": "A"}],
        "service_points": [
            {"site": "SFO", "code": "C1", "name": "Counter 1", "work_profile": "all"}
        ],
        "work_profiles": [
            {"site": "SFO", "code": "all", "name": "All", "queues": [{"queue": "general"}]}
        ],
        "staff": [
            {"username": "alice", "name": "Alice", "roles": ["staff", "supervisor"],
             "sites": ["SFO"], "password_hash": hash.to_string()}
        ],
        "connector_keys": [
            {"site": "SFO", "code": "kiosk", "name": "Kiosk", "key_hash": meridian_agent::auth::hash(KEY)}
        ],
        "request_types": [
            {"code": "REPAIR", "name": "Furniture repair", "fields": [
                {"name": "summary", "type": "text", "max_length": 80, "required": true}
            ]}
        ]
    }))
    .expect("site config")
}

struct Agent {
    addr: SocketAddr,
    base: String,
    client: reqwest::Client,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<meridian_agent::Result<()>>,
}

impl Agent {
    async fn start(tweak: impl FnOnce(&mut Settings)) -> Agent {
        let dir = std::env::temp_dir()
            .join(format!("meridian-http-edge-{}", uuid::Uuid::new_v4().simple()));
        // Nothing listens there: the agent works offline.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr();
        let mut settings = Settings {
            data_dir: dir,
            controller_url: format!("http://{}", closed.expect("addr")),
            ..Settings::default()
        };
        tweak(&mut settings);
        let ctx = Context::open(&settings, Arc::new(SystemClock)).await.expect("open");
        let config = site_config();
        let now = ctx.clock.now();
        ctx.db.write(move |c| queries::apply_config(c, &config, now)).await.expect("configure");
        let config = ctx.db.read(queries::site_config).await.expect("read config");
        ctx.config.send_replace(config.map(Arc::new));
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = http.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task =
            tokio::spawn(meridian_agent::run_with(ctx.clone(), settings, http, shutdown.clone()));
        // No idle pooled connection: it would hold one of the server's connection slots.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(0)
            .build()
            .expect("client");
        let agent = Agent { addr, base: format!("http://{addr}"), client, ctx, shutdown, task };
        wait_for("the branch server", || async {
            agent.client.get(agent.url("/healthz")).send().await.ok().map(|_| ())
        })
        .await;
        agent
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> reqwest::Response {
        let mut req = self.client.get(self.url(path));
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        req.send().await.expect("get")
    }

    /// Signs alice in through the workstation's form (with whatever hidden fields it
    /// carries); returns the cookies to send.
    async fn sign_in(&self) -> String {
        let page = self.get("/workstation", None).await;
        let mut cookies = set_cookies(&page);
        let html = page.text().await.expect("login page");
        let mut form = hidden_inputs(&html);
        form.extend([
            ("username".to_owned(), "alice".to_owned()),
            ("password".to_owned(), PASSWORD.to_owned()),
            ("counter".to_owned(), "C1".to_owned()),
        ]);
        let mut req = self.client.post(self.url("/workstation/login")).form(&form);
        if !cookies.is_empty() {
            req = req.header("cookie", cookies.join("; "));
        }
        let resp = req.send().await.expect("login");
        assert!(resp.status().is_redirection(), "login: {}", resp.status());
        cookies.extend(set_cookies(&resp));
        cookies.join("; ")
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("join").expect("agent ran");
    }
}

async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `name=value` of every cookie a response sets.
fn set_cookies(resp: &reqwest::Response) -> Vec<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next().map(str::to_owned))
        .filter(|c| !c.ends_with('='))
        .collect()
}

/// The hidden inputs of a page, as maud writes them.
fn hidden_inputs(html: &str) -> Vec<(String, String)> {
    html.split("<input")
        .skip(1)
        .filter(|i| i.contains("type=\"hidden\""))
        .filter_map(|i| {
            let attr = |name: &str| {
                let start = i.find(&format!("{name}=\""))? + name.len() + 2;
                Some(i[start..].split('"').next()?.to_owned())
            };
            Some((attr("name")?, attr("value")?))
        })
        .collect()
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// The headers every answer carries.
fn check_common(what: &str, resp: &reqwest::Response) {
    assert_eq!(header(resp, "x-content-type-options"), "nosniff", "{what}");
    assert_eq!(header(resp, "referrer-policy"), "same-origin", "{what}");
}

/// A page: headers, and nothing inline the policy would block.
async fn check_page(what: &str, resp: reqwest::Response, framed_by: Option<&str>) {
    check_common(what, &resp);
    assert!(header(&resp, "content-type").starts_with("text/html"), "{what}");
    assert_eq!(header(&resp, "cache-control"), "no-store", "{what}");
    let csp = header(&resp, "content-security-policy").to_owned();
    for directive in
        ["default-src 'none'", "script-src 'self'", "style-src 'self'", "base-uri 'none'"]
    {
        assert!(csp.contains(directive), "{what}: {directive} missing in {csp}");
    }
    match framed_by {
        None => {
            assert!(csp.ends_with("frame-ancestors 'none'"), "{what}: {csp}");
            assert_eq!(header(&resp, "x-frame-options"), "DENY", "{what}");
        }
        Some(origin) => {
            assert!(csp.ends_with(&format!("frame-ancestors {origin}")), "{what}: {csp}");
            assert!(resp.headers().get("x-frame-options").is_none(), "{what}");
        }
    }
    let body = resp.text().await.expect("page");
    for inline in
        [" style=", "<style", "javascript:", " onclick=", " onload=", " onsubmit=", " onchange="]
    {
        assert!(!body.contains(inline), "{what} has {inline:?} inline");
    }
    for script in body.split("<script").skip(1) {
        assert!(script.starts_with(" src=\"/assets/"), "{what}: inline script <script{script:.60}");
    }
    if body.starts_with("<!DOCTYPE") {
        assert!(body.contains("/assets/terminals.css"), "{what} has no style sheet");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_and_answer_carries_the_security_headers() {
    let agent = Agent::start(|s| s.display_frame_ancestors = vec![SIGNAGE.into()]).await;
    let created = agent
        .client
        .post(agent.url("/api/v1/visits"))
        .bearer_auth(KEY)
        .json(&json!({"service": "GEN"}))
        .send()
        .await
        .expect("visit");
    assert_eq!(created.status(), 201);
    check_common("POST /api/v1/visits", &created);
    assert_eq!(header(&created, "cache-control"), "no-store");
    let visit: Value = created.json().await.expect("visit json");
    let ticket = format!("/kiosk/tickets/{}", visit["id"].as_str().expect("id"));

    // Public pages, an error page, a page fragment.
    for path in ["/kiosk", ticket.as_str(), "/kiosk/tickets/nope", "/workstation", "/display/board"]
    {
        check_page(path, agent.get(path, None).await, None).await;
    }
    check_page("/display", agent.get("/display", None).await, Some(SIGNAGE)).await;
    // Signed-in pages.
    let cookie = agent.sign_in().await;
    for path in ["/workstation", "/branch", "/requests", "/requests/new"] {
        let resp = agent.get(path, Some(&cookie)).await;
        assert_eq!(resp.status(), 200, "{path}");
        check_page(path, resp, None).await;
    }

    // The API: never cached (a staff session token is a secret), never sniffed.
    let session = agent
        .client
        .post(agent.url("/api/v1/sessions"))
        .json(&json!({"username": "alice", "password": PASSWORD}))
        .send()
        .await
        .expect("session");
    assert!(session.status().is_success(), "{}", session.status());
    check_common("POST /api/v1/sessions", &session);
    assert_eq!(header(&session, "cache-control"), "no-store");
    for path in ["/api/v1/status", "/api/v1/visits", "/api/v1/nope", "/healthz"] {
        let resp =
            agent.client.get(agent.url(path)).bearer_auth(KEY).send().await.expect("api call");
        check_common(path, &resp);
        assert_eq!(header(&resp, "cache-control"), "no-store", "{path}");
        assert!(header(&resp, "content-security-policy").contains("frame-ancestors 'none'"));
    }
    // The script and style sheet the pages load.
    for (path, kind) in
        [("/assets/terminals.js", "text/javascript"), ("/assets/terminals.css", "text/css")]
    {
        let resp = agent.get(path, None).await;
        assert_eq!(resp.status(), 200, "{path}");
        check_common(path, &resp);
        assert!(header(&resp, "content-type").starts_with(kind), "{path}");
    }
    agent.stop().await;

    // An origin that could widen the policy is refused at start-up.
    let settings = Settings {
        data_dir: std::env::temp_dir()
            .join(format!("meridian-http-edge-{}", uuid::Uuid::new_v4().simple())),
        display_frame_ancestors: vec!["https://a.example.com; script-src *".into()],
        ..Settings::default()
    };
    let refused = Context::open(&settings, Arc::new(SystemClock)).await.err().expect("refused");
    assert!(refused.to_string().contains("display_frame_ancestors"), "{refused}");
}

/// Reads a response head from `stream`; `None` when the server closed the connection first.
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

/// Reads and drops the body of a response whose head said `Content-Length`.
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

/// Whether the server closes `stream` (EOF or reset) within `within`, without a response.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    matches!(tokio::time::timeout(within, stream.read(&mut buf)).await, Ok(Ok(0)) | Ok(Err(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_while_others_are_served() {
    let agent = Agent::start(|s| {
        s.http_header_timeout_ms = 400;
        s.http_body_timeout_ms = 400;
    })
    .await;

    // Half a request head, then nothing.
    let mut slow = TcpStream::connect(agent.addr).await.expect("connect");
    let started = Instant::now();
    slow.write_all(b"GET /kiosk HTTP/1.1\r\nHost: branch\r\n").await.expect("write");
    // Meanwhile a normal client is served.
    let status = agent.get("/api/v1/status", None).await;
    assert_eq!(status.status(), 200);
    assert!(closed_within(&mut slow, Duration::from_secs(10)).await, "slow head not cut off");
    assert!(started.elapsed() >= Duration::from_millis(350), "{:?}", started.elapsed());

    // A request whose body stalls fails and records nothing.
    let before = agent.ctx.db.read(|c| Ok(queries::outbox_state(c)?.0)).await.expect("outbox");
    let mut stalled = TcpStream::connect(agent.addr).await.expect("connect");
    let head = format!(
        "POST /api/v1/visits HTTP/1.1\r\nHost: branch\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"service\""
    );
    stalled.write_all(head.as_bytes()).await.expect("write");
    let answer = tokio::time::timeout(Duration::from_secs(10), read_head(&mut stalled))
        .await
        .expect("an answer to the stalled body");
    let answer = answer.expect("a response before the close");
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    let after = agent.ctx.db.read(|c| Ok(queries::outbox_state(c)?.0)).await.expect("outbox");
    assert_eq!(after, before, "a stalled request changed nothing");

    // An idle keep-alive connection is closed after the header timeout too.
    let mut idle = TcpStream::connect(agent.addr).await.expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: branch\r\n\r\n").await.expect("write");
    let head = read_head(&mut idle).await.expect("healthz");
    skip_body(&mut idle, &head).await;
    assert!(closed_within(&mut idle, Duration::from_secs(10)).await, "idle connection kept");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_wait_until_one_closes() {
    let agent = Agent::start(|s| s.http_max_connections = 2).await;
    let request = b"GET /healthz HTTP/1.1\r\nHost: branch\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(agent.addr).await.expect("connect");
        c.write_all(request).await.expect("write");
        let head = read_head(&mut c).await.expect("served");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        skip_body(&mut c, &head).await;
        held.push(c);
    }
    // The third waits to be accepted ...
    let mut third = TcpStream::connect(agent.addr).await.expect("connect (the backlog)");
    third.write_all(request).await.expect("write");
    let waiting = tokio::time::timeout(Duration::from_millis(500), read_head(&mut third)).await;
    assert!(waiting.is_err(), "a third connection was served over the cap: {waiting:?}");
    // ... while the connections in are still answered ...
    held[0].write_all(request).await.expect("write");
    let head = read_head(&mut held[0]).await.expect("still served");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // ... and is served once one closes.
    held.pop();
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut third))
        .await
        .expect("served after a slot freed")
        .expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_feeds_over_the_cap_get_503_until_one_ends() {
    let agent = Agent::start(|s| s.max_live_feeds = 2).await;
    let display = agent.get("/display/events", None).await;
    assert_eq!(display.status(), 200);
    assert!(header(&display, "content-type").starts_with("text/event-stream"));
    let api = agent
        .client
        .get(agent.url("/api/v1/events"))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("api feed");
    assert_eq!(api.status(), 200);

    for (path, key) in [("/display/events", None), ("/api/v1/events", Some(KEY))] {
        let mut req = agent.client.get(agent.url(path));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        let refused = req.send().await.expect("third feed");
        assert_eq!(refused.status(), 503, "{path}");
        assert_eq!(header(&refused, "retry-after"), "5", "{path}");
        check_common(path, &refused);
        let body: Value = refused.json().await.expect("typed error");
        assert_eq!(body["code"], "too_many_live_feeds", "{path}");
    }
    assert_eq!(agent.ctx.live_feeds.open(), 2);

    // A subscriber goes: its slot frees.
    drop(display);
    wait_for("the display's slot to free", || async {
        (agent.ctx.live_feeds.open() < 2).then_some(())
    })
    .await;
    let again = agent.get("/display/events", None).await;
    assert_eq!(again.status(), 200);
    drop((again, api));
    agent.stop().await;
}
