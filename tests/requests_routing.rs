//! End to end, distributed requests with a real controller on PostgreSQL, three real
//! agent processes (SFO, the Chicago workshop CHI and its upholstery specialist CHIUPH), each
//! behind the fault proxy, and rules configured centrally:
//! - routing by kind: a chair created in SFO moves with ownership to CHI, and one needing
//!   upholstery on to CHIUPH; SFO and CHI keep read-only copies, the mapping history shows both
//!   moves, and a change at the master reaches the copies (update policy `immediately`);
//! - knowledge base: a request closed anywhere is broadcast as a read-only copy to every other
//!   site and is found there with the link cut;
//! - faults: the target offline during a transfer, the source offline when its rule fires, the
//!   controller killed mid-transfer — every operation completes once the network heals, and
//!   every request ends with exactly one master, where the ledger says.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::*;

const WAIT: Duration = Duration::from_secs(30);
const SITES: [&str; 3] = ["SFO", "CHI", "CHIUPH"];

fn resources() -> Vec<Value> {
    let mut v = vec![];
    for site in SITES {
        v.push(json!({"kind": "site", "code": site, "name": format!("Site {site}"),
                      "time_zone": "America/Chicago", "tags": ["workshops"]}));
        v.push(json!({"kind": "connector_key", "site": site, "code": "e2e", "name": "E2E",
                      "key_hash": meridian_controller::auth::hash_secret(CONNECTOR_KEY)}));
    }
    v.push(json!({"kind": "request_type", "code": "REPAIR", "name": "Furniture repair", "fields": [
        {"name": "summary", "type": "text", "max_length": 120, "required": true},
        {"name": "category", "type": "enum", "values": ["chair", "table", "sofa"], "required": true},
        {"name": "upholstery", "type": "boolean", "default": false},
        {"name": "status", "type": "enum", "values": ["open", "closed"], "default": "open"}
    ]}));
    v.push(json!({"kind": "request_mapping", "code": "REPAIR", "name": "Repair as is",
                  "source_type": "REPAIR", "target_type": "REPAIR", "return_mapping": "REPAIR",
                  "duplicates": "overwrite"}));
    v.push(
        json!({"kind": "request_rule", "code": "CHAIRS", "name": "Chairs to the Chicago workshop",
                  "request_type": "REPAIR", "sites": ["SFO"], "trigger": {"on": "create"},
                  "condition": "fields.category == 'chair'", "action": "transfer",
                  "mode": "ownership", "mapping": "REPAIR", "target": {"site": "CHI"},
                  "update": "immediately"}),
    );
    v.push(json!({"kind": "request_rule", "code": "UPHOLSTERY", "name": "Upholstery specialist",
                  "request_type": "REPAIR", "sites": ["CHI"], "trigger": {"on": "arrival"},
                  "condition": "fields.upholstery", "action": "transfer", "mode": "ownership",
                  "mapping": "REPAIR", "target": {"site": "CHIUPH"}, "update": "immediately"}));
    v.push(json!({"kind": "request_rule", "code": "KB", "name": "Closed requests to every site",
                  "request_type": "REPAIR", "trigger": {"on": "status_change", "field": "status"},
                  "condition": "fields.status == 'closed'", "action": "transfer",
                  "mode": "data_only", "mapping": "REPAIR", "target": {"all_sites": true},
                  "update": "never"}));
    v
}

struct Fleet {
    controller: ControllerProc,
    sites: BTreeMap<&'static str, (Arc<FaultProxy>, AgentProc)>,
}

impl Fleet {
    async fn start(name: &str) -> Fleet {
        let db = fresh_postgres_url().await;
        let root = temp_dir(name);
        let controller = ControllerProc::start_with(
            &root.join("controller"),
            &db,
            &[("MERIDIAN_CONTROLLER_REQUEST_LEDGER_TICK_MS", "200".into())],
        )
        .await;
        let admin = controller.client();
        admin.ok(Method::POST, "/api/v1/apply", Some(json!({ "resources": resources() }))).await;
        let mut sites = BTreeMap::new();
        for site in SITES {
            let token = admin.enrollment_token(site).await;
            let proxy = FaultProxy::start(controller.gateway).await;
            let agent = AgentProc::start(&root.join(site), proxy.addr, &token).await;
            agent
                .wait_status("agent enrolled, configured and connected", |s| {
                    s["connected"] == true && s["config_revision"].as_u64() > Some(0)
                })
                .await;
            sites.insert(site, (proxy, agent));
        }
        Fleet { controller, sites }
    }

    fn agent(&self, site: &str) -> &AgentProc {
        &self.sites[site].1
    }

    fn proxy(&self, site: &str) -> &FaultProxy {
        &self.sites[site].0
    }

    async fn branch(
        &self,
        site: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = reqwest::Client::new()
            .request(method, format!("{}{path}", self.agent(site).url))
            .bearer_auth(CONNECTOR_KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("branch request");
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn create(&self, site: &str, fields: Value) -> Value {
        let (status, made) = self
            .branch(
                site,
                Method::POST,
                "/api/v1/requests",
                Some(json!({"type": "REPAIR", "fields": fields})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{made}");
        made
    }

    async fn get(&self, site: &str, id: &str) -> Option<Value> {
        let (status, r) =
            self.branch(site, Method::GET, &format!("/api/v1/requests/{id}"), None).await;
        (status == StatusCode::OK).then_some(r)
    }

    /// Waits until `site` holds `id` and `pred` holds for it.
    async fn wait_request(
        &self,
        what: &str,
        site: &str,
        id: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_for(what, WAIT, || async { self.get(site, id).await.filter(|r| pred(r)) }).await
    }

    /// The ledger's rows for one request: (kind, mode, source, target, status).
    async fn ledger(
        &self,
        human_id: &str,
    ) -> Vec<(String, Option<String>, String, String, String)> {
        let mut conn = sqlx_connect(&self.controller.database_url).await;
        sqlx::query_as(
            "SELECT kind, mode, source_site, target_site, status FROM request_ops \
             WHERE human_id = $1 ORDER BY created_at, target_site",
        )
        .bind(human_id)
        .fetch_all(&mut conn)
        .await
        .expect("ledger")
    }

    /// Every request at every site: exactly one master each, where the ledger says, and every
    /// operation ended.
    async fn check_one_master_each(&self) {
        let mut masters: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for site in SITES {
            let (status, list) =
                self.branch(site, Method::GET, "/api/v1/requests?limit=1000", None).await;
            assert_eq!(status, StatusCode::OK);
            for r in list.as_array().expect("list") {
                let id = r["human_id"].as_str().expect("human id").to_owned();
                let entry = masters.entry(id).or_default();
                if r["distribution"]["master"] == true {
                    entry.push(site);
                }
                assert!(r["distribution"]["pending_operation"].is_null(), "{r}");
            }
        }
        let mut conn = sqlx_connect(&self.controller.database_url).await;
        for (id, at) in &masters {
            assert_eq!(at.len(), 1, "{id} has masters at {at:?}");
            let (ledger_master,): (Option<String>,) =
                sqlx::query_as("SELECT master_site FROM request_owners WHERE human_id = $1")
                    .bind(id)
                    .fetch_one(&mut conn)
                    .await
                    .expect("owner");
            assert_eq!(ledger_master.as_deref(), Some(at[0]), "ledger and sites disagree on {id}");
        }
        let open: Vec<(String, String)> = sqlx::query_as(
            "SELECT human_id, status FROM request_ops WHERE status NOT IN ('applied', 'superseded')",
        )
        .fetch_all(&mut conn)
        .await
        .expect("ops");
        assert!(open.is_empty(), "operations not applied: {open:?}");
    }
}

async fn sqlx_connect(url: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(url).await.expect("connect to the controller's database")
}

fn summary(r: &Value) -> &str {
    r["fields"]["summary"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn a_chair_is_routed_to_chicago_and_on_to_upholstery_and_closed_requests_become_a_knowledge_base()
 {
    let fleet = Fleet::start("meridian-requests-routing").await;

    // Routing by kind.
    let chair = fleet
        .create("SFO", json!({"summary": "Torn seat", "category": "chair", "upholstery": true}))
        .await;
    let id = chair["human_id"].as_str().expect("human id").to_owned();
    assert_eq!(id, "SFO-000001");
    assert_eq!(
        chair["distribution"]["transfer_status"], "Pending",
        "the rule fired at once: {chair}"
    );
    let at_uph = fleet
        .wait_request("the chair at the upholstery specialist", "CHIUPH", &id, |r| {
            r["distribution"]["master"] == true
        })
        .await;
    let history = at_uph["distribution"]["history"].as_array().expect("history");
    let moves: Vec<(String, String, String, String)> = history
        .iter()
        .map(|m| {
            (
                m["from_site"].as_str().unwrap_or_default().to_owned(),
                m["to_site"].as_str().unwrap_or_default().to_owned(),
                m["mapping"].as_str().unwrap_or_default().to_owned(),
                m["rule"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        moves,
        [
            ("SFO".into(), "CHI".into(), "REPAIR".into(), "CHAIRS".into()),
            ("CHI".into(), "CHIUPH".into(), "REPAIR".into(), "UPHOLSTERY".into())
        ],
        "mapping history: {at_uph}"
    );
    for m in history {
        assert_eq!(m["mode"], "ownership");
    }
    let at_sfo = fleet
        .wait_request("SFO's copy settled", "SFO", &id, |r| {
            r["distribution"]["transfer_status"] == "Success"
        })
        .await;
    assert_eq!(at_sfo["distribution"]["master"], false);
    let at_chi = fleet
        .wait_request("CHI's copy settled", "CHI", &id, |r| {
            r["distribution"]["transfer_status"] == "Success"
        })
        .await;
    assert_eq!(at_chi["distribution"]["master"], false);
    assert_eq!(at_chi["distribution"]["current_site"], "CHIUPH");

    // A table stays where it was created; copies are read-only.
    let table = fleet.create("SFO", json!({"summary": "Scratched top", "category": "table"})).await;
    assert_eq!(table["distribution"]["master"], true);
    assert!(table["distribution"]["transfer_status"].is_null());
    let (status, refused) = fleet
        .branch(
            "SFO",
            Method::PATCH,
            &format!("/api/v1/requests/{id}"),
            Some(json!({"fields": {"summary": "x"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");

    // A change at the master reaches both copies.
    let (status, changed) = fleet
        .branch(
            "CHIUPH",
            Method::PATCH,
            &format!("/api/v1/requests/{id}"),
            Some(json!({"fields": {"summary": "Seat reupholstered"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    for site in ["SFO", "CHI"] {
        let copy = fleet
            .wait_request("the update at the copy", site, &id, |r| {
                summary(r) == "Seat reupholstered"
            })
            .await;
        assert_eq!(copy["distribution"]["current_site"], "CHIUPH", "{copy}");
        assert_eq!(copy["distribution"]["update_status"], "Success");
    }
    let ledger = fleet.ledger(&id).await;
    let moves: Vec<_> = ledger.iter().filter(|o| o.1.as_deref() == Some("ownership")).collect();
    assert_eq!(moves.len(), 2, "{ledger:?}");
    assert!(ledger.iter().all(|o| o.4 == "applied" || o.4 == "superseded"), "{ledger:?}");

    // Knowledge base: closing a request broadcasts it to every other site as a read-only
    // copy, searchable there with the link cut.
    let sofa = fleet.create("SFO", json!({"summary": "Broken spring", "category": "sofa"})).await;
    let sofa_id = sofa["human_id"].as_str().expect("human id").to_owned();
    let (status, closed) = fleet
        .branch(
            "SFO",
            Method::PATCH,
            &format!("/api/v1/requests/{sofa_id}"),
            Some(json!({"fields": {"status": "closed"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{closed}");
    for site in ["CHI", "CHIUPH"] {
        fleet
            .wait_request("the closed request in the knowledge base", site, &sofa_id, |r| {
                r["distribution"]["master"] == false && r["fields"]["status"] == "closed"
            })
            .await;
    }
    fleet.proxy("CHI").set(Fault::Cut);
    fleet.agent("CHI").wait_status("CHI offline", |s| s["connected"] == false).await;
    let (status, found) =
        fleet.branch("CHI", Method::GET, "/api/v1/requests?type=REPAIR", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        found.as_array().expect("list").iter().any(|r| r["human_id"] == sofa_id.as_str()),
        "the knowledge base answers offline: {found}"
    );
    fleet.proxy("CHI").set(Fault::Pass);
    fleet.agent("CHI").wait_status("CHI back", |s| s["connected"] == true).await;
    wait_for("every operation applied", WAIT, || async {
        let mut conn = sqlx_connect(&fleet.controller.database_url).await;
        let (open,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM request_ops WHERE status NOT IN ('applied', 'superseded')",
        )
        .fetch_one(&mut conn)
        .await
        .expect("count");
        (open == 0).then_some(())
    })
    .await;
    fleet.check_one_master_each().await;
}

#[tokio::test]
async fn transfers_complete_after_an_offline_target_an_offline_source_and_a_controller_restart() {
    let mut fleet = Fleet::start("meridian-requests-faults").await;
    let chair = |summary: &str| json!({"summary": summary, "category": "chair"});

    // The target is offline: the operation waits in the ledger, the source's copy is
    // read-only meanwhile, and it completes when CHI is back.
    fleet.proxy("CHI").set(Fault::Cut);
    fleet.agent("CHI").wait_status("CHI offline", |s| s["connected"] == false).await;
    let a = fleet.create("SFO", chair("Target offline")).await;
    let a_id = a["human_id"].as_str().expect("id").to_owned();
    wait_for("the transfer pending in the ledger", WAIT, || async {
        let ledger = fleet.ledger(&a_id).await;
        ledger.iter().any(|o| o.3 == "CHI" && o.4 == "pending").then_some(())
    })
    .await;
    assert_eq!(fleet.get("SFO", &a_id).await.expect("at SFO")["distribution"]["master"], false);
    fleet.proxy("CHI").set(Fault::Pass);
    fleet.wait_request("A at CHI", "CHI", &a_id, |r| r["distribution"]["master"] == true).await;

    // The source is offline: the rule fires there and the operation waits in its outbox.
    fleet.proxy("SFO").set(Fault::Cut);
    fleet.agent("SFO").wait_status("SFO offline", |s| s["connected"] == false).await;
    let b = fleet.create("SFO", chair("Source offline")).await;
    let b_id = b["human_id"].as_str().expect("id").to_owned();
    assert_eq!(b["distribution"]["transfer_status"], "Pending", "{b}");
    assert!(fleet.ledger(&b_id).await.is_empty(), "central cannot know yet");
    fleet.proxy("SFO").set(Fault::Pass);
    fleet.wait_request("B at CHI", "CHI", &b_id, |r| r["distribution"]["master"] == true).await;

    // The controller is killed while a transfer waits for its target; it comes back on new
    // ports and the transfer completes.
    fleet.proxy("CHI").set(Fault::Cut);
    fleet.agent("CHI").wait_status("CHI offline", |s| s["connected"] == false).await;
    let c = fleet.create("SFO", chair("Controller restart")).await;
    let c_id = c["human_id"].as_str().expect("id").to_owned();
    wait_for("C pending in the ledger", WAIT, || async {
        fleet.ledger(&c_id).await.iter().any(|o| o.4 == "pending").then_some(())
    })
    .await;
    fleet.controller.restart().await;
    for site in SITES {
        fleet.proxy(site).set_upstream(fleet.controller.gateway);
    }
    fleet.proxy("CHI").set(Fault::Pass);
    fleet.wait_request("C at CHI", "CHI", &c_id, |r| r["distribution"]["master"] == true).await;
    for id in [&a_id, &b_id, &c_id] {
        fleet
            .wait_request("the source settled", "SFO", id, |r| {
                r["distribution"]["transfer_status"] == "Success"
            })
            .await;
    }
    fleet.check_one_master_each().await;
}
