//! Acceptance, in a real browser: headless Chromium signs in to the operations console, sees the
//! fleet view list both sites with the right link status, opens the statistics dashboard and
//! finds the charts drawn with the numbers of the visits driven through a branch, sees the live
//! panel, and, signed in read-only, cannot rebuild statistics.

mod support;

use std::time::Duration;

use chrono::Utc;
use fantoccini::Locator;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::browser::{Browser, PAGE, POLL};
use support::*;

/// The site whose visits are driven, and the one whose agent is stopped.
const ONE: &str = "ONE";
const TWO: &str = "TWO";
const COUNTER: &str = "C1";
const STAFF: &str = "alice";
const VIEWER: &str = "console-viewer";

/// Conditions the controller reaches in about a second (projector, agent sessions).
const SETTLE: Duration = Duration::from_secs(20);
/// The whole test; a stalled browser or process fails instead of hanging.
const WHOLE_TEST: Duration = Duration::from_secs(120);

#[tokio::test]
async fn console_shows_the_fleet_the_charts_and_the_live_panel_and_viewers_read_only() {
    tokio::time::timeout(WHOLE_TEST, console_flow())
        .await
        .unwrap_or_else(|_| panic!("the console test took longer than {WHOLE_TEST:?}"));
}

async fn console_flow() {
    // 1. A controller on a fresh database, two sites with a counter each, one agent per site.
    let db = fresh_postgres_url().await;
    let root = temp_dir("meridian-console-browser");
    let controller = ControllerProc::start(&root.join("controller"), &db).await;
    let admin = controller.client();
    for site in [ONE, TWO] {
        admin.seed_site(site).await;
    }
    let applied = admin
        .ok(
            Method::POST,
            "/api/v1/apply",
            Some(json!({"resources": [
                {"kind": "staff_user", "username": STAFF, "name": "Alice", "roles": ["staff"],
                 "sites": [ONE, TWO], "password": "correct horse"},
                {"kind": "service_point", "site": ONE, "code": COUNTER, "name": "Counter 1"},
                {"kind": "service_point", "site": TWO, "code": COUNTER, "name": "Counter 1"},
                // A wait target, so the service-level chart has a bar.
                {"kind": "service", "site": ONE, "code": "GEN", "name": "General",
                 "queue": "general", "kpi_wait_minutes": 5},
            ]})),
        )
        .await;
    let revision = applied["revision"].as_u64().expect("apply revision");
    let mut agents = Vec::new();
    for site in [ONE, TWO] {
        let token = admin.enrollment_token(site).await;
        let agent = AgentProc::start(&root.join(site), controller.gateway, &token).await;
        agent
            .wait_status(&format!("{site}'s agent connected on the counter revision"), |s| {
                s["connected"] == true && s["config_revision"].as_u64() >= Some(revision)
            })
            .await;
        agents.push(agent);
    }
    let mut two = agents.pop().expect("TWO's agent");
    let one = agents.pop().expect("ONE's agent");

    // 2. Three tickets at ONE: one served, one no-show, one left waiting.
    let tickets = one.issue_tickets("GEN", 3).await;
    assert_eq!(tickets.len(), 3);
    let branch = Branch { http: reqwest::Client::new(), base: one.url.clone() };
    branch.post(&format!("/api/v1/service-points/{COUNTER}/open"), json!({"staff": STAFF})).await;
    let served = branch.call_next().await;
    branch.post(&format!("/api/v1/visits/{served}/start-serving"), json!({})).await;
    branch.post(&format!("/api/v1/visits/{served}/end"), json!({})).await;
    let no_show = branch.call_next().await;
    assert_ne!(served, no_show, "two different visits called");
    branch.post(&format!("/api/v1/visits/{no_show}/no-show"), json!({})).await;

    let stats = wait_for("central statistics: ONE 3 visits, 1 served, 1 no-show", SETTLE, || {
        site_stats(&admin, ONE)
    })
    .await;
    assert_eq!(stats["no_show_pct"].as_f64().map(|p| (p * 10.0).round()), Some(333.0), "{stats}");

    // 3. TWO's agent stops; central notices.
    two.child.start_kill().expect("kill TWO's agent");
    let _ = two.child.wait().await;
    wait_for("TWO's agent shown disconnected", SETTLE, || async {
        let agents = admin.ok(Method::GET, "/api/v1/agents", None).await;
        let two = agents.as_array()?.iter().find(|a| a["site"] == TWO && a["revoked"] == false)?;
        (two["connected"] == false).then_some(())
    })
    .await;

    let browser = Browser::start().await;
    browser_flow(&browser, &controller.api, &admin).await;
    browser.close().await;
}

async fn browser_flow(browser: &Browser, api: &str, admin: &AdminClient) {
    // 4a. Sign in as admin: the fleet view lists both sites, ONE connected, TWO offline.
    sign_in(browser, api, &admin.token).await;
    let who = browser.wait_text("span#who", "who is signed in", |t| !t.is_empty()).await;
    assert!(who.ends_with("(admin)"), "signed in as admin, header says {who:?}");
    for nav in ["/console/live", "/console/stats", "/console/quarantine"] {
        browser.wait_one(&format!(r#"header nav a[href="{nav}"]"#)).await;
    }
    // The page refreshes itself every few seconds, so rows are counted on whichever copy is up.
    wait_for("the fleet view to list exactly two sites", PAGE, || async {
        (browser.all("table#fleet tr.site").await.len() == 2).then_some(())
    })
    .await;
    let link =
        |site: &str, class: &str| format!(r#"tr.site[data-site="{site}"] span.link.{class}"#);
    browser.wait_text(&link(ONE, "online"), "ONE connected", |t| t == "connected").await;
    browser.wait_text(&link(TWO, "offline"), "TWO offline", |t| t == "offline").await;
    let two_cell = format!(r#"tr.site[data-site="{TWO}"] td:nth-child(4)"#);
    browser
        .wait_text(&two_cell, "TWO offline since when", |t| t.starts_with("offline since "))
        .await;
    let config = format!(r#"tr.site[data-site="{ONE}"] td.config"#);
    let config = browser
        .wait_text(&config, "ONE's configuration", |t| {
            t.split_once(" / ").is_some_and(|(applied, current)| applied == current)
        })
        .await;
    let applied: u64 = config.split(" / ").next().and_then(|r| r.parse().ok()).expect("revision");
    assert!(applied > 0, "ONE applied a configuration: {config:?}");
    let backlog = format!(r#"tr.site[data-site="{ONE}"] td.backlog"#);
    browser.wait_text(&backlog, "ONE's empty backlog", |t| t == "0").await;

    // 4b. The dashboard over the UTC date ± 1 day (any site-local business day of today).
    let today = Utc::now().date_naive();
    let (from, to) = (today.pred_opt().expect("yesterday"), today.succ_opt().expect("tomorrow"));
    let stats_url = format!("{api}/console/stats?from={from}&to={to}");
    open_current_stats(browser, &stats_url).await;
    assert_eq!(
        browser.one("input#from").await.prop("value").await.ok().flatten(),
        Some(from.to_string())
    );
    assert_eq!(
        browser.one("input#to").await.prop("value").await.ok().flatten(),
        Some(to.to_string())
    );
    browser.wait_one("form#rebuild button#rebuild-submit").await;

    // No-shows: 1 of 3 visits at ONE.
    let no_show_texts = svg_texts(browser, "chart-no-shows").await;
    assert!(
        no_show_texts.iter().any(|t| t == "33.3%"),
        "the no-show chart labels ONE's bar 33.3%: {no_show_texts:?}"
    );
    let no_shows = table(browser, "chart-no-shows-table").await;
    let row_one = no_shows.iter().find(|r| r[0] == ONE).unwrap_or_else(|| {
        panic!("a no-show row for {ONE}: {no_shows:?}");
    });
    assert_eq!(&row_one[1..5], ["3", "1", "1", "33.3"], "ONE: visits, served, no-shows, %");
    assert!(
        no_shows.iter().all(|r| r[0] == ONE || r[1] == "0"),
        "no other site has visits: {no_shows:?}"
    );

    // Volumes: every visit in some site-local hour, each bar labelled with its number.
    let volumes = table(browser, "chart-volumes-table").await;
    let total: u64 = volumes.iter().map(|r| number(&r[1])).sum();
    assert_eq!(total, 3, "visits per hour of day sum to 3: {volumes:?}");
    assert_eq!(volumes.iter().map(|r| number(&r[2])).sum::<u64>(), 1, "served: {volumes:?}");
    assert_eq!(volumes.iter().map(|r| number(&r[3])).sum::<u64>(), 1, "no-shows: {volumes:?}");
    let volume_texts = svg_texts(browser, "chart-volumes").await;
    for row in &volumes {
        assert!(row[0].len() == 2 && row[0].parse::<u32>().is_ok_and(|h| h < 24), "hour {row:?}");
        for label in [&row[0], &row[1]] {
            assert!(
                volume_texts.contains(label),
                "volumes chart shows {label:?}: {volume_texts:?}"
            );
        }
    }

    // Waits: the two called visits, both called within two minutes of their ticket.
    let waits = table(browser, "chart-waits-table").await;
    assert_eq!(waits.iter().map(|r| number(&r[1])).sum::<u64>(), 2, "two waits: {waits:?}");
    assert_eq!(waits[0], ["≤2", "2"], "both in the first band: {waits:?}");

    // Service level: ONE's one served visit was within its 5-minute target.
    let levels = table(browser, "chart-service-level-table").await;
    assert_eq!(levels.len(), 1, "one site/service served: {levels:?}");
    assert_eq!(levels, [[format!("{ONE}/GEN"), "1".into(), "100".into(), levels[0][3].clone()]]);
    let level_texts = svg_texts(browser, "chart-service-level").await;
    assert!(level_texts.iter().any(|t| t == "100%"), "service level bar: {level_texts:?}");

    for chart in ["volumes", "waits", "service-level", "no-shows"] {
        let href = browser
            .one(&format!("#chart-{chart}-section a.csv"))
            .await
            .attr("href")
            .await
            .expect("csv href")
            .unwrap_or_default();
        assert!(href.starts_with(&format!("/console/stats.csv?chart={chart}&")), "{href}");
    }

    // 4c. The live panel: one visitor waiting at ONE; TWO marked stale.
    browser.goto(&format!("{api}/console/live")).await.expect("open the live panel");
    let live = |site: &str, what: &str| format!(r#"section.site-live[data-site="{site}"] {what}"#);
    browser.wait_text(&live(ONE, "span.waiting"), "ONE's waiting count", |t| t == "1").await;
    browser.wait_text(&live(ONE, "span.with-staff"), "ONE's visits with staff", |t| t == "0").await;
    browser.wait_text(&live(ONE, "span.counters-open"), "ONE's open counters", |t| t == "1").await;
    browser.wait_text(&live(ONE, "h2 span.online"), "ONE live", |t| t == "live").await;
    browser.wait_text(&live(TWO, "span.stale-mark"), "TWO stale", |t| t == "stale").await;

    // 5. Read-only: a viewer sees the dashboard without the rebuild form and cannot rebuild.
    browser.click("button#logout").await;
    browser.wait_one("form#login").await;
    let created = admin
        .ok(Method::POST, "/api/v1/api-tokens", Some(json!({"name": VIEWER, "role": "viewer"})))
        .await;
    let viewer = created["secret"].as_str().expect("viewer secret").to_owned();
    sign_in(browser, api, &viewer).await;
    browser.wait_text("span#who", "the viewer", |t| t == format!("{VIEWER} (viewer)")).await;
    open_current_stats(browser, &stats_url).await;
    browser.wait_one("svg#chart-no-shows").await;
    assert!(browser.all("#rebuild").await.is_empty(), "a viewer sees no rebuild form");
    assert!(browser.all("#rebuild-submit").await.is_empty(), "a viewer sees no rebuild button");
    let no_show_texts = svg_texts(browser, "chart-no-shows").await;
    assert!(no_show_texts.iter().any(|t| t == "33.3%"), "viewer's chart: {no_show_texts:?}");

    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client");
    let rebuild = format!("{api}/console/stats/rebuild");
    // The viewer's own session and CSRF token: the role refuses it, not the form's checks.
    let session = browser.get_named_cookie("meridian_console").await.expect("session cookie");
    assert!(!session.value().contains(&viewer), "the cookie holds a session id, not the token");
    let csrf = browser
        .one(r#"header input[name="csrf"]"#)
        .await
        .attr("value")
        .await
        .expect("csrf field")
        .unwrap_or_default();
    let refused = http
        .post(&rebuild)
        .header(reqwest::header::COOKIE, format!("meridian_console={}", session.value()))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .expect("viewer's rebuild");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN, "a viewer's rebuild is refused");
    // Right after the refusal: nothing was dropped (a rebuild empties the facts at once).
    let status = admin.ok(Method::GET, "/api/v1/stats/status", None).await;
    assert_eq!(status["projection_lag"], 0, "no re-projection started: {status}");
    let after = site_stats(admin, ONE).await;
    assert!(after.is_some(), "ONE's statistics unchanged after the refused rebuild: {after:?}");
    // Without a session the console only redirects to the sign-in page.
    let anonymous = http.post(&rebuild).send().await.expect("anonymous rebuild");
    assert_eq!(anonymous.status(), StatusCode::SEE_OTHER);
}

/// ONE's row of the statistics API by site, once it holds the three visits driven.
async fn site_stats(admin: &AdminClient, site: &str) -> Option<Value> {
    let rows = admin.ok(Method::GET, "/api/v1/stats/visits?group_by=site", None).await;
    let row = rows.as_array()?.iter().find(|r| r["group"] == site)?.clone();
    (row["visits"] == 3 && row["served"] == 1 && row["no_shows"] == 1).then_some(row)
}

/// The branch's connector API.
struct Branch {
    http: reqwest::Client,
    base: String,
}

impl Branch {
    async fn post(&self, path: &str, body: Value) -> Value {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(CONNECTOR_KEY)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(status, StatusCode::OK, "POST {path}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Calls the next waiting visit to the counter; returns its id.
    async fn call_next(&self) -> String {
        let v = self.post(&format!("/api/v1/service-points/{COUNTER}/call-next"), json!({})).await;
        v["id"].as_str().unwrap_or_else(|| panic!("called visit id: {v}")).to_owned()
    }
}

/// Signs in on the console's sign-in page and waits for the fleet view.
async fn sign_in(browser: &Browser, api: &str, token: &str) {
    browser.goto(&format!("{api}/console/login")).await.expect("open the sign-in page");
    browser.wait_one("form#login input#token").await.send_keys(token).await.expect("type token");
    browser.click("form#login button#login-submit").await;
    browser.wait_one("table#fleet").await;
    let url = browser.current_url().await.expect("current url");
    assert_eq!(url.path(), "/console", "signed in, the fleet view");
}

/// Opens the dashboard until it says the statistics are current (the projector runs every
/// second; the page does not refresh itself).
async fn open_current_stats(browser: &Browser, url: &str) {
    let until = tokio::time::Instant::now() + PAGE;
    loop {
        browser.goto(url).await.unwrap_or_else(|e| panic!("open {url}: {e}"));
        let text = browser.wait_text("p#freshness", "the freshness note", |_| true).await;
        if text == "Statistics are current." {
            return;
        }
        if tokio::time::Instant::now() > until {
            panic!(
                "the dashboard still says {text:?} after {PAGE:?}; {}",
                browser.describe().await
            );
        }
        tokio::time::sleep(POLL * 20).await;
    }
}

/// The rendered text of every `<text>` in the chart `svg#id`.
async fn svg_texts(browser: &Browser, id: &str) -> Vec<String> {
    let mut texts = Vec::new();
    for t in browser.all(&format!("svg#{id} text")).await {
        texts.push(t.text().await.expect("svg text").trim().to_owned());
    }
    assert!(!texts.is_empty(), "svg#{id} has labels; {}", browser.describe().await);
    texts
}

/// The data rows (`td` cells) of `table#id`.
async fn table(browser: &Browser, id: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for tr in
        browser.one(&format!("table#{id}")).await.find_all(Locator::Css("tr")).await.expect("rows")
    {
        let mut cells = Vec::new();
        for td in tr.find_all(Locator::Css("td")).await.expect("cells") {
            cells.push(td.text().await.expect("cell text").trim().to_owned());
        }
        if !cells.is_empty() {
            rows.push(cells);
        }
    }
    rows
}

fn number(cell: &str) -> u64 {
    cell.parse().unwrap_or_else(|_| panic!("{cell:?} is not a count"))
}
