//! Staff access at the branch against the real controller and agent processes: sessions end
//! when central changes the user, roles are the user's current ones, the workstation's counter
//! belongs to the session, failed sign-ins lock and are reported centrally, and a storm of
//! wrong sign-ins neither exhausts the agent's memory nor stops the branch.

mod support;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{AgentProc, CONNECTOR_KEY, ControllerProc, temp_dir, wait_for};

const SITE: &str = "SFO";
const PASSWORD: &str = "correct horse 1";
/// How long a configuration change may take to reach the agent on a loaded machine.
const PROPAGATION: Duration = Duration::from_secs(60);

struct Branch {
    controller: ControllerProc,
    agent: AgentProc,
    http: reqwest::Client,
}

async fn branch(name: &str) -> Branch {
    let root = temp_dir(name);
    let db = format!("sqlite://{}/controller.db", root.display());
    let controller = ControllerProc::start(&root.join("controller"), &db).await;
    let admin = controller.client();
    admin.seed_site(SITE).await;
    admin.seed_site("OAK").await;
    let applied = admin
        .ok(
            Method::POST,
            "/api/v1/apply",
            Some(json!({"resources": [
                staff("ana", &["staff"], &[SITE], PASSWORD),
                staff("sam", &["supervisor"], &[SITE], PASSWORD),
                {"kind": "service_point", "site": SITE, "code": "c1", "name": "Counter 1"},
                {"kind": "service_point", "site": SITE, "code": "c2", "name": "Counter 2"},
            ]})),
        )
        .await;
    let revision = applied["revision"].as_u64().expect("revision");
    let token = admin.enrollment_token(SITE).await;
    let agent = AgentProc::start(&root.join("agent"), controller.gateway, &token).await;
    agent
        .wait_status("agent on the staff revision", |s| {
            s["connected"] == true && s["config_revision"].as_u64() >= Some(revision)
        })
        .await;
    Branch { controller, agent, http: reqwest::Client::new() }
}

fn staff(username: &str, roles: &[&str], sites: &[&str], password: &str) -> Value {
    json!({"kind": "staff_user", "username": username, "name": username, "roles": roles,
           "sites": sites, "password": password})
}

impl Branch {
    async fn login(&self, username: &str, password: &str) -> (StatusCode, Value, Option<String>) {
        let resp = self
            .http
            .post(format!("{}/api/v1/sessions", self.agent.url))
            .json(&json!({"username": username, "password": password}))
            .send()
            .await
            .expect("login");
        let status = resp.status();
        let retry =
            resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
        (status, resp.json().await.unwrap_or(Value::Null), retry)
    }

    async fn session(&self, username: &str) -> String {
        let (status, body, _) = self.login(username, PASSWORD).await;
        assert_eq!(status, StatusCode::CREATED, "{username} signs in: {body}");
        body["token"].as_str().expect("token").to_owned()
    }

    async fn get(&self, token: &str, path: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .get(format!("{}{path}", self.agent.url))
            .bearer_auth(token)
            .send()
            .await
            .expect("branch request");
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Waits until `token` is refused as ended.
    async fn wait_ended(&self, token: &str, why: &str) {
        wait_for(why, PROPAGATION, || async {
            let (status, body) = self.get(token, "/api/v1/queues").await;
            (status == StatusCode::UNAUTHORIZED && body["code"] == "session_ended").then_some(())
        })
        .await;
    }

    async fn central(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        self.controller.client().ok(method, path, body).await
    }
}

#[tokio::test]
async fn sessions_end_when_central_deletes_the_user_changes_the_password_or_the_sites_or_signs_out()
{
    let b = branch("meridian-staff-sessions").await;

    let token = b.session("ana").await;
    assert_eq!(b.get(&token, "/api/v1/queues").await.0, StatusCode::OK);
    b.central(Method::DELETE, "/api/v1/staff/ana", None).await;
    b.wait_ended(&token, "ana's session ends after she is deleted centrally").await;

    b.central(
        Method::POST,
        "/api/v1/apply",
        Some(json!({"resources": [staff("ana", &["staff"], &[SITE], PASSWORD)]})),
    )
    .await;
    let token = wait_for("ana can sign in again", PROPAGATION, || async {
        let (status, body, _) = b.login("ana", PASSWORD).await;
        (status == StatusCode::CREATED)
            .then(|| body["token"].as_str().unwrap_or_default().to_owned())
    })
    .await;
    b.central(
        Method::PUT,
        "/api/v1/staff/ana",
        Some(staff("ana", &["staff"], &[SITE], "a new password 2")),
    )
    .await;
    b.wait_ended(&token, "ana's session ends after her password changes").await;

    b.central(Method::PUT, "/api/v1/staff/ana", Some(staff("ana", &["staff"], &[SITE], PASSWORD)))
        .await;
    let token = wait_for("ana signs in with the old password again", PROPAGATION, || async {
        let (status, body, _) = b.login("ana", PASSWORD).await;
        (status == StatusCode::CREATED)
            .then(|| body["token"].as_str().unwrap_or_default().to_owned())
    })
    .await;
    // Re-applying the same user changes nothing: the session lives on.
    b.central(Method::PUT, "/api/v1/staff/ana", Some(staff("ana", &["staff"], &[SITE], PASSWORD)))
        .await;
    b.central(Method::PUT, "/api/v1/staff/ana", Some(staff("ana", &["staff"], &["OAK"], PASSWORD)))
        .await;
    b.wait_ended(&token, "ana's session ends when SFO is taken from her").await;

    let token = b.session("sam").await;
    let other = b.session("sam").await;
    let changed = b.central(Method::POST, "/api/v1/staff/sam/sign-out-everywhere", None).await;
    assert_eq!(changed["sessions_epoch"], 1, "{changed}");
    assert_eq!(changed["sites_published"], json!([SITE]), "{changed}");
    b.wait_ended(&token, "sam's first session ends when central signs him out everywhere").await;
    b.wait_ended(&other, "and so does his second").await;
    let fresh = b.session("sam").await;
    assert_eq!(b.get(&fresh, "/api/v1/queues").await.0, StatusCode::OK, "a new sign-in works");
    let (status, body) = b
        .controller
        .client()
        .call(Method::POST, "/api/v1/staff/nobody/sign-out-everywhere", None)
        .await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn staff_roles_are_enforced_on_the_api_as_they_are_now() {
    let b = branch("meridian-staff-roles").await;
    let token = b.session("ana").await;
    for path in ["/api/v1/appointments/sync", "/api/v1/login-locks"] {
        let (status, body) = b.get(&token, path).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "plain staff may not read {path}: {body}");
        assert_eq!(body["code"], "forbidden");
    }
    let closure = json!({"from": "10:00", "to": "11:00", "reason": "drill"});
    let refused = b
        .http
        .post(format!("{}/api/v1/closures", b.agent.url))
        .bearer_auth(&token)
        .json(&closure)
        .send()
        .await
        .expect("closure");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN, "plain staff may not close the branch");
    let (_, closures) = b.get(CONNECTOR_KEY, "/api/v1/closures").await;
    assert_eq!(closures.as_array().map(Vec::len), Some(0), "nothing was closed: {closures}");

    // Promoted centrally: the same session gets the new role, without signing in again.
    b.central(
        Method::PUT,
        "/api/v1/staff/ana",
        Some(staff("ana", &["supervisor"], &[SITE], PASSWORD)),
    )
    .await;
    wait_for("ana's session carries the supervisor role", PROPAGATION, || async {
        (b.get(&token, "/api/v1/login-locks").await.0 == StatusCode::OK).then_some(())
    })
    .await;
    assert_eq!(b.get(CONNECTOR_KEY, "/api/v1/appointments/sync").await.0, StatusCode::OK);
}

#[tokio::test]
async fn failed_sign_ins_lock_are_reported_centrally_and_are_unlocked_at_the_branch_or_centrally() {
    let b = branch("meridian-staff-locks").await;
    for _ in 0..5 {
        assert_eq!(b.login("ana", "wrong password").await.0, StatusCode::UNAUTHORIZED);
    }
    let (status, body, retry) = b.login("ana", PASSWORD).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "locked even with the right password");
    assert_eq!(body["code"], "sign_in_locked", "{body}");
    let retry: u64 = retry.expect("Retry-After").parse().expect("seconds");
    assert!((1..=30).contains(&retry), "the first lock lasts 30 s: {retry}");
    // The workstation's form is locked too.
    let page = b
        .http
        .post(format!("{}/workstation/login", b.agent.url))
        .form(&[("username", "ana"), ("password", PASSWORD), ("counter", "")])
        .send()
        .await
        .expect("workstation login");
    assert_eq!(page.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(page.text().await.unwrap_or_default().contains("Too many failed log-ins"));

    // Central sees the attack as an incident of the branch's agent.
    let incidents = wait_for("the lock reaches central", PROPAGATION, || async {
        let v = b.central(Method::GET, "/api/v1/incidents?open=true", None).await;
        let found: Vec<Value> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["kind"] == "sign_in_locked")
            .cloned()
            .collect();
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert!(
        incidents[0]["summary"].as_str().unwrap_or_default().contains("\"ana\""),
        "{incidents:?}"
    );

    // A supervisor sees and lifts the lock.
    let sam = b.session("sam").await;
    let (status, locks) = b.get(&sam, "/api/v1/login-locks").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(locks[0]["subject"], "user", "{locks}");
    assert_eq!(locks[0]["name"], "ana", "{locks}");
    let lifted = b
        .http
        .delete(format!("{}/api/v1/login-locks/user/ana", b.agent.url))
        .bearer_auth(&sam)
        .send()
        .await
        .expect("unlock");
    assert_eq!(lifted.status(), StatusCode::NO_CONTENT);
    b.session("ana").await;

    // Locked again; central lifts it.
    for _ in 0..5 {
        b.login("ana", "wrong password").await;
    }
    assert_eq!(b.login("ana", PASSWORD).await.0, StatusCode::TOO_MANY_REQUESTS);
    // With meridianctl (`meridianctl staff unlock ana`).
    let ctl =
        meridian_controller::ctl::Client::new(&b.controller.api, Some(b.controller.token.clone()))
            .expect("ctl client");
    let changed =
        meridian_controller::ctl::staff_access(&ctl, "ana", "unlock").await.expect("unlock");
    assert_eq!(changed["unlock_epoch"], 1, "{changed}");
    let shown = meridian_controller::ctl::render_staff_access(&changed, Default::default())
        .expect("render");
    assert!(shown.contains("ana") && shown.contains(SITE), "{shown}");
    wait_for("the central unlock reaches the branch", PROPAGATION, || async {
        (b.login("ana", PASSWORD).await.0 == StatusCode::CREATED).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_workstation_counter_belongs_to_the_session_not_to_a_cookie() {
    let b = branch("meridian-staff-counter").await;
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let resp = no_redirects
        .post(format!("{}/workstation/login", b.agent.url))
        .form(&[("username", "ana"), ("password", PASSWORD), ("counter", "c1")])
        .send()
        .await
        .expect("workstation login");
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let cookies: Vec<String> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(cookies.len(), 1, "only the session cookie: {cookies:?}");
    b.agent.issue_tickets("GEN", 1).await;
    // A page on another site cannot post the signed-in workstation's forms.
    let forged = no_redirects
        .post(format!("{}/workstation/action", b.agent.url))
        .header("cookie", cookies[0].clone())
        .header("origin", "https://evil.example")
        .header("sec-fetch-site", "cross-site")
        .form(&[("action", "call-next")])
        .send()
        .await
        .expect("cross-site post");
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    let (_, points) = b.get(CONNECTOR_KEY, "/api/v1/service-points").await;
    assert!(
        points.as_array().into_iter().flatten().all(|p| p["current"].is_null()),
        "nobody was called: {points}"
    );
    // A forged counter cookie changes nothing: the call happens at the session's counter.
    let resp = no_redirects
        .post(format!("{}/workstation/action", b.agent.url))
        .header("cookie", format!("{}; meridian_counter=c2", cookies[0]))
        .form(&[("action", "call-next")])
        .send()
        .await
        .expect("call next");
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (_, points) = b.get(CONNECTOR_KEY, "/api/v1/service-points").await;
    let current = |code: &str| {
        points
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["code"] == code)
            .map(|p| p["current"].clone())
            .unwrap_or(Value::Null)
    };
    assert!(current("c1").is_object(), "called at c1: {points}");
    assert!(current("c2").is_null(), "nothing at c2: {points}");
}

#[tokio::test]
async fn two_hundred_parallel_wrong_sign_ins_keep_the_agent_small_and_the_branch_answering() {
    let b = branch("meridian-staff-storm").await;
    let pid = b.agent.child.id().expect("agent pid");
    let before = memory_kib(pid, "VmRSS");
    let mut logins = Vec::new();
    for i in 0..200 {
        let (http, url) = (b.http.clone(), format!("{}/api/v1/sessions", b.agent.url));
        // Known and unknown users alike.
        let username = if i % 2 == 0 { "ana".to_owned() } else { format!("nobody{i}") };
        logins.push(tokio::spawn(async move {
            http.post(url)
                .json(&json!({"username": username, "password": "wrong password"}))
                .send()
                .await
                .map(|r| r.status())
        }));
    }
    // The branch keeps answering meanwhile.
    for _ in 0..10 {
        let (status, _) =
            tokio::time::timeout(Duration::from_secs(30), b.get(CONNECTOR_KEY, "/api/v1/queues"))
                .await
                .expect("the branch API answers during the storm");
        assert_eq!(status, StatusCode::OK);
    }
    let mut statuses = std::collections::BTreeMap::new();
    for l in logins {
        let status = tokio::time::timeout(Duration::from_secs(120), l)
            .await
            .expect("every sign-in is answered")
            .expect("task")
            .expect("response");
        *statuses.entry(status.as_u16()).or_insert(0) += 1;
    }
    assert!(
        statuses.keys().all(|s| *s == 401 || *s == 429),
        "wrong sign-ins are refused or deferred: {statuses:?}"
    );
    assert!(statuses.contains_key(&429), "some were turned away with 429: {statuses:?}");
    let peak = memory_kib(pid, "VmHWM");
    // At most four argon2 checks (19 MiB each) run at once; allow generous room for the rest.
    let bound_kib = before + 160 * 1024;
    assert!(peak < bound_kib, "peak resident memory {peak} KiB, started at {before} KiB");
}

/// A field of `/proc/<pid>/status`, in KiB.
fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("memory field")
}
