//! Acceptance, in a real browser: headless Chromium (installed by `make test` when missing)
//! takes a ticket at the kiosk, logs in at the workstation and calls it, and sees the display
//! show it within one second; the same flow passes with the controller stopped, and every page
//! says when the branch is offline from central.

mod support;

use std::time::{Duration, Instant};

use fantoccini::wd::WindowHandle;
use reqwest::Method;
use serde_json::json;
use support::browser::{Browser, PAGE, POLL};
use support::*;

const SITE: &str = "BRW";
const USERNAME: &str = "alice";
const PASSWORD: &str = "correct horse";
const COUNTER: &str = "C1";

/// The acceptance criterion: the display shows a call within this long of the click.
const DISPLAY_LATENCY: Duration = Duration::from_secs(1);
/// The whole browser part of the test; a stalled browser fails instead of hanging.
const WHOLE_TEST: Duration = Duration::from_secs(180);

#[tokio::test]
async fn kiosk_workstation_and_display_work_in_a_browser_with_and_without_the_controller() {
    let db = fresh_postgres_url().await;
    let root = temp_dir("meridian-browser");
    let mut controller = ControllerProc::start(&root.join("controller"), &db).await;
    let admin = controller.client();
    admin.seed_site(SITE).await;
    let applied = admin
        .ok(
            Method::POST,
            "/api/v1/apply",
            Some(json!({"resources": [
                {"kind": "staff_user", "username": USERNAME, "name": "Alice", "roles": ["staff"],
                 "sites": [SITE], "password": PASSWORD},
                {"kind": "service_point", "site": SITE, "code": COUNTER, "name": "Counter 1"},
            ]})),
        )
        .await;
    let revision = applied["revision"].as_u64().expect("apply revision");
    let token = admin.enrollment_token(SITE).await;
    let agent = AgentProc::start(&root.join("agent"), controller.gateway, &token).await;
    agent
        .wait_status("agent enrolled, connected and on the staff/counter revision", |s| {
            s["connected"] == true && s["config_revision"].as_u64() >= Some(revision)
        })
        .await;

    let browser = Browser::start().await;
    let flow = async {
        let windows = Windows::open(&browser).await;

        let online = branch_flow(&browser, &windows, &agent.url, Link::Online).await;
        assert_eq!(online, "A001", "the first ticket of the day");

        controller.kill().await;
        agent
            .wait_status("agent notices the controller is gone", |s| s["connected"] == false)
            .await;
        // Log in again from scratch: staff passwords are checked at the branch.
        browser.delete_all_cookies().await.expect("delete cookies");
        let offline = branch_flow(&browser, &windows, &agent.url, Link::Offline).await;
        assert_eq!(offline, "A002", "the next ticket, issued without the controller");
    };
    tokio::time::timeout(WHOLE_TEST, flow)
        .await
        .unwrap_or_else(|_| panic!("the browser flow took longer than {WHOLE_TEST:?}"));
    browser.close().await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Online,
    Offline,
}

/// One browser, three windows: the display, the kiosk and the workstation.
struct Windows {
    display: WindowHandle,
    kiosk: WindowHandle,
    workstation: WindowHandle,
}

impl Windows {
    async fn open(browser: &Browser) -> Windows {
        let display = browser.window().await.expect("first window");
        let kiosk = browser.new_window(false).await.expect("kiosk window").handle;
        let workstation = browser.new_window(false).await.expect("workstation window").handle;
        Windows { display, kiosk, workstation }
    }
}

async fn show(browser: &Browser, window: &WindowHandle, url: &str) {
    browser.switch_to_window(window.clone()).await.expect("switch window");
    browser.goto(url).await.unwrap_or_else(|e| panic!("open {url}: {e}"));
}

/// Display, kiosk and workstation for one ticket; returns the ticket.
async fn branch_flow(browser: &Browser, w: &Windows, base: &str, link: Link) -> String {
    // a. The display is up before anything happens.
    show(browser, &w.display, &format!("{base}/display")).await;
    check_offline_banner(browser, "display", link).await;

    // b. The kiosk issues a ticket.
    show(browser, &w.kiosk, &format!("{base}/kiosk")).await;
    check_offline_banner(browser, "kiosk", link).await;
    browser.click(r#"form button[data-service="GEN"]"#).await;
    let ticket = browser.wait_text("#ticket-number", "the kiosk's ticket", |t| !t.is_empty()).await;
    check_offline_banner(browser, "kiosk ticket", link).await;

    // c. Staff log in at the workstation and call the next ticket.
    show(browser, &w.workstation, &format!("{base}/workstation")).await;
    if browser.all("form#login").await.is_empty() {
        panic!("a browser without a session is not asked to log in; {}", browser.describe().await);
    }
    check_offline_banner(browser, "workstation login", link).await;
    browser.one("#username").await.send_keys(USERNAME).await.expect("type username");
    browser.one("#password").await.send_keys(PASSWORD).await.expect("type password");
    browser.one("#counter").await.select_by_value(COUNTER).await.expect("choose the counter");
    browser.click("#login-submit").await;
    browser.wait_one("#call-next").await;
    check_offline_banner(browser, "workstation", link).await;
    browser.click("#call-next").await;
    let called = Instant::now();
    browser.wait_text("#current-ticket", &format!("{ticket} called"), |t| t == ticket).await;

    // d. The display shows the call within a second of the click.
    browser.switch_to_window(w.display.clone()).await.expect("switch to the display");
    let shown = format!(r#"li.call[data-ticket="{ticket}"]"#);
    while browser.all(&shown).await.is_empty() {
        if called.elapsed() > PAGE {
            panic!(
                "{link:?}: the display did not show `{shown}` within {PAGE:?}; {}",
                browser.describe().await
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let latency = called.elapsed();
    assert!(
        latency <= DISPLAY_LATENCY,
        "{link:?}: the display showed {ticket} {latency:?} after the call, over {DISPLAY_LATENCY:?}"
    );
    eprintln!("{link:?}: ticket {ticket} on the display {latency:?} after the call");
    check_offline_banner(browser, "display", link).await;

    // Serve and end the visit, freeing the counter to call the next ticket.
    browser.switch_to_window(w.workstation.clone()).await.expect("switch to the workstation");
    browser.click("#start-serving").await;
    browser.wait_text("#current-status", "serving", |t| t.starts_with("serving")).await;
    browser.click("#end").await;
    browser.wait_one("#call-next").await;
    ticket
}

/// Offline from central: the page shows `#offline-banner`. Online: no visible banner. Pages
/// re-render themselves live (a reload, or the display's board), so the elements are looked up
/// afresh until the expectation holds or a deadline passes.
async fn check_offline_banner(browser: &Browser, page: &str, link: Link) {
    let expected = link == Link::Offline;
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut visible = Vec::new();
        let mut stale = false;
        for banner in browser.all("#offline-banner").await {
            match banner.is_displayed().await {
                Ok(v) => visible.push(v),
                Err(e) if e.is_stale_element_reference() => stale = true,
                Err(e) => panic!("banner visibility: {e:?}"),
            }
        }
        let shown = visible.contains(&true);
        if !stale && shown == expected {
            return;
        }
        if tokio::time::Instant::now() >= until {
            panic!(
                "{link:?}: the {page} page {} the offline banner ({} #offline-banner, visible: \
                 {visible:?}); {}",
                if shown { "shows" } else { "does not show" },
                visible.len(),
                browser.describe().await
            );
        }
        tokio::time::sleep(POLL).await;
    }
}
