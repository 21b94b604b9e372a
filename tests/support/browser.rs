//! A real browser for end-to-end tests: Debian's headless Chromium driven over WebDriver by a
//! `chromedriver` process on a free loopback port. `make test` installs both
//! (`tests/provision-chromium.sh`); a test that needs them fails loudly when they are missing.

use std::net::TcpListener;
use std::ops::Deref;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// How long chromedriver may take to answer `/status`, and the browser to open a session.
const STARTUP: Duration = Duration::from_secs(30);
/// How long a page may take to show what a test waits for (not a performance bound).
pub const PAGE: Duration = Duration::from_secs(10);
/// How often the DOM is polled while waiting.
pub const POLL: Duration = Duration::from_millis(10);

/// A WebDriver session in a fresh headless Chromium profile. Derefs to the `fantoccini::Client`.
/// Dropping it kills chromedriver and the browser it started; `close` ends the session first.
pub struct Browser {
    client: Client,
    driver: Driver,
}

impl Browser {
    /// Starts chromedriver and opens a session in a fresh profile.
    pub async fn start() -> Browser {
        for binary in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(binary).exists(),
                "{binary} is missing: run `make test`, which installs chromium and chromium-driver \
                 (tests/provision-chromium.sh)"
            );
        }
        let driver = Driver::start().await;
        let capabilities = json!({
            "browserName": "chrome",
            "timeouts": { "implicit": 0, "pageLoad": 30_000, "script": 10_000 },
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-quic",
                    "--no-first-run",
                    // Without these Chromium calls home, which this machine refuses, and may stall.
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    // A branch display is always in the foreground: never throttle other windows.
                    "--disable-background-timer-throttling",
                    "--disable-backgrounding-occluded-windows",
                    "--disable-renderer-backgrounding",
                    format!("--user-data-dir={}", driver.profile.display()),
                ],
            },
        });
        let Value::Object(capabilities) = capabilities else { unreachable!("an object") };
        let mut builder = ClientBuilder::new(HttpConnector::new());
        builder.capabilities(capabilities);
        let session = tokio::time::timeout(STARTUP, builder.connect(&driver.url)).await;
        let client = match session {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => panic!("cannot open a Chromium session: {e}"),
            Err(_) => panic!("Chromium did not open a session within {STARTUP:?}"),
        };
        Browser { client, driver }
    }

    /// Ends the WebDriver session (closing the browser), then stops chromedriver.
    pub async fn close(self) {
        let Browser { client, driver } = self;
        let _ = tokio::time::timeout(Duration::from_secs(10), client.close()).await;
        drop(driver);
    }

    /// The elements matching a CSS selector on the current page (none is not an error).
    pub async fn all(&self, css: &str) -> Vec<Element> {
        self.client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("looking for `{css}`: {e}"))
    }

    /// The one element matching a CSS selector on the current page; panics with the page's URL
    /// and text when there is none or more than one.
    pub async fn one(&self, css: &str) -> Element {
        let mut found = self.all(css).await;
        if found.len() != 1 {
            panic!(
                "expected exactly one `{css}`, found {}; {}",
                found.len(),
                self.describe().await
            );
        }
        found.remove(0)
    }

    /// Waits (up to `PAGE`) for exactly one element matching `css`, e.g. after a navigation.
    pub async fn wait_one(&self, css: &str) -> Element {
        let until = tokio::time::Instant::now() + PAGE;
        loop {
            let mut found = self.all(css).await;
            if found.len() == 1 {
                return found.remove(0);
            }
            if tokio::time::Instant::now() > until {
                panic!(
                    "expected one `{css}` within {PAGE:?}, found {}; {}",
                    found.len(),
                    self.describe().await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits (up to `PAGE`) until the trimmed text of the one `css` element satisfies `ok`, and
    /// returns it. A page replaced between finding and reading is read again.
    pub async fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let until = tokio::time::Instant::now() + PAGE;
        loop {
            let found = self.all(css).await;
            let mut last = None;
            if let [element] = found.as_slice()
                && let Ok(text) = element.text().await
            {
                let text = text.trim().to_owned();
                if ok(&text) {
                    return text;
                }
                last = Some(text);
            }
            if tokio::time::Instant::now() > until {
                panic!(
                    "{what}: `{css}` ({} found) last read {last:?} after {PAGE:?}; {}",
                    found.len(),
                    self.describe().await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Clicks the one element matching `css`, waiting for it (up to `PAGE`). A click that hits a
    /// page being replaced (stale element) did not happen, so it is retried on the new page.
    pub async fn click(&self, css: &str) {
        let until = tokio::time::Instant::now() + PAGE;
        loop {
            let element = self.wait_one(css).await;
            match element.click().await {
                Ok(()) => return,
                Err(e) if e.is_stale_element_reference() && tokio::time::Instant::now() < until => {
                    tokio::time::sleep(POLL).await;
                }
                Err(e) => panic!("click `{css}`: {e}; {}", self.describe().await),
            }
        }
    }

    /// The current URL and the visible text of the page, for failure messages.
    pub async fn describe(&self) -> String {
        let url = self.client.current_url().await.map(|u| u.to_string()).unwrap_or_default();
        let text = match self.client.find(Locator::Css("body")).await {
            Ok(body) => body.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        format!("page {url}:\n{text}")
    }
}

impl Deref for Browser {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

/// A chromedriver process in its own process group (so the browsers it starts die with it) and
/// the browser profile directory.
struct Driver {
    child: Child,
    url: String,
    profile: PathBuf,
}

impl Driver {
    async fn start() -> Driver {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
            listener.local_addr().expect("local addr").port()
        };
        let profile = super::temp_dir("meridian-chromium");
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
        let mut driver = Driver { child, url: format!("http://127.0.0.1:{port}"), profile };
        driver.wait_ready().await;
        driver
    }

    /// Waits until chromedriver answers `/status` with `ready: true`.
    async fn wait_ready(&mut self) {
        let http = reqwest::Client::new();
        let status = format!("{}/status", self.url);
        let until = tokio::time::Instant::now() + STARTUP;
        loop {
            if let Ok(Some(exit)) = self.child.try_wait() {
                panic!("{CHROMEDRIVER} exited before it was ready: {exit}");
            }
            let answer = http.get(&status).timeout(Duration::from_secs(2)).send().await;
            if let Ok(resp) = answer
                && let Ok(v) = resp.json::<Value>().await
                && v["value"]["ready"] == true
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "{CHROMEDRIVER} did not answer {status} within {STARTUP:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The whole group: chromedriver and every Chromium process it started.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
