//! Deterministic simulation of the distributed-request protocol: real agent stores
//! (SQLite files, the agent's own functions) and the real controller store (SQLite, and
//! PostgreSQL), with a seeded scheduler standing in for the network. Random sequences of
//! creates, edits, ownership transfers, copies, returns, deletes and cancels run while sites
//! are partitioned, acknowledgements (events and commands) are lost, and the controller and
//! agents crash (their stores are closed and reopened: nothing in memory survives). After every
//! step the one-master invariant is checked; after the network heals and everything drains,
//! every request has exactly one master — where the ledger says — and every operation ended
//! applied or in a visible failure.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use meridian_agent::distribution::{self, OperationSpec};
use meridian_agent::requests::{self, NewRequest, RequestPatch};
use meridian_agent::store::{Db, queries};
use meridian_controller::config_admin::{self, ChangeMode, ResourceInput};
use meridian_controller::store::requests::{OpsFilter, PoolTimeouts};
use meridian_controller::store::{IncomingEvent, Store};
use meridian_shared::config::SiteConfig;
use meridian_shared::transfers::{OpKind, OpTarget, TransferMode};
use meridian_shared::{AgentId, SiteCode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

const SITES: [&str; 3] = ["SFO", "CHI", "TYO"];

struct SimSite {
    code: String,
    agent: AgentId,
    path: PathBuf,
    db: Db,
    config: Option<SiteConfig>,
    offline_until: usize,
}

struct Sim {
    url: String,
    store: Arc<dyn Store>,
    sites: Vec<SimSite>,
    rng: StdRng,
    now: DateTime<Utc>,
    step: usize,
    timeouts: PoolTimeouts,
}

fn inputs() -> Vec<ResourceInput> {
    let mut v: Vec<serde_json::Value> = SITES
        .iter()
        .map(|c| {
            json!({"kind": "site", "code": c, "name": format!("Site {c}"),
                   "time_zone": "Europe/Paris", "tags": ["fleet"]})
        })
        .collect();
    v.push(json!({"kind": "request_type", "code": "REPAIR", "name": "Repair", "fields": [
        {"name": "summary", "type": "text", "max_length": 80, "required": true},
        {"name": "category", "type": "enum", "values": ["chair", "table"], "required": true}
    ]}));
    v.into_iter().map(|j| serde_json::from_value(j).expect("resource")).collect()
}

impl Sim {
    async fn new(url: String, seed: u64) -> Sim {
        let store = meridian_controller::store::open(&url).await.expect("store");
        config_admin::change(store.as_ref(), "sim", inputs(), vec![], ChangeMode::Upsert)
            .await
            .expect("config");
        let mut sites = vec![];
        let dir = meridian_controller::testing::temp_dir("meridian-sim");
        for code in SITES {
            let agent = meridian_controller::testing::enroll_agent(store.as_ref(), code)
                .await
                .expect("enroll");
            let path = dir.join(format!("{code}.db"));
            let db = Db::open(&path).expect("agent store");
            sites.push(SimSite {
                code: code.into(),
                agent: agent.id,
                path,
                db,
                config: None,
                offline_until: 0,
            });
        }
        Sim {
            url,
            store,
            sites,
            rng: StdRng::seed_from_u64(seed),
            now: Utc.with_ymd_and_hms(2026, 11, 22, 8, 0, 0).unwrap(),
            step: 0,
            timeouts: PoolTimeouts { default_minutes: 30, by_pool: BTreeMap::new() },
        }
    }

    fn online(&self, i: usize) -> bool {
        self.sites[i].offline_until <= self.step
    }

    /// Streams site `i`'s outbox to the controller; the acknowledgement may be lost.
    async fn deliver_events(&mut self, i: usize, lose_ack: bool) {
        let (_, acked) = self.sites[i].db.read(queries::outbox_state).await.expect("outbox");
        let batch = self.sites[i]
            .db
            .read(move |c| queries::outbox_after(c, acked, 200))
            .await
            .expect("outbox");
        if batch.is_empty() {
            return;
        }
        let events: Vec<IncomingEvent> = batch
            .into_iter()
            .map(|e| IncomingEvent {
                seq: e.seq,
                kind: e.kind,
                occurred_at: DateTime::from_timestamp_millis(e.occurred_at_ms).expect("time"),
                payload: String::from_utf8(e.payload).expect("utf-8"),
                quarantine: None,
            })
            .collect();
        let up_to = self
            .store
            .ingest_events(self.sites[i].agent, &events, self.now)
            .await
            .expect("ingest")
            .expect("accepted");
        self.store.flush_request_commands().await.expect("flush");
        if !lose_ack {
            let now = self.now;
            self.sites[i]
                .db
                .write(move |c| queries::ack_outbox(c, up_to, now, chrono::Duration::hours(24)))
                .await
                .expect("ack");
        }
    }

    /// Sends site `i` its commands after the controller's cursor (which lags after a lost
    /// acknowledgement, so the agent sees some again and must skip them).
    async fn deliver_commands(&mut self, i: usize, lose_ack: bool) {
        let agent = self.store.agent(self.sites[i].agent).await.expect("agent").expect("known");
        let cmds = self
            .store
            .commands_after(agent.id, agent.command_acked_seq, 100)
            .await
            .expect("commands");
        let Some(last) = cmds.last().map(|c| c.seq) else { return };
        for cmd in cmds {
            let site = self.sites[i].code.clone();
            let config = self.sites[i].config.clone();
            let now = self.now;
            let applied = self.sites[i]
                .db
                .write(move |c| {
                    meridian_agent::link::apply_command_in(
                        c,
                        &site,
                        config.as_ref(),
                        &meridian_agent::request_rules::RuleSet::default(),
                        cmd.seq,
                        &cmd.kind,
                        &cmd.payload,
                        now,
                    )
                })
                .await
                .expect("apply");
            if let Some(config) = applied.config {
                self.sites[i].config = Some(config);
            }
        }
        if !lose_ack {
            self.store.ack_commands(agent.id, last, None).await.expect("ack");
        }
    }

    async fn restart_controller(&mut self) {
        self.store = meridian_controller::store::open(&self.url).await.expect("reopen");
    }

    async fn restart_agent(&mut self, i: usize) {
        let path = self.sites[i].path.clone();
        // The old store's thread ends when its handle is dropped.
        self.sites[i].db = Db::open(&path).expect("reopen agent store");
        let config = self.sites[i].db.read(queries::site_config).await.expect("config");
        self.sites[i].config = config;
    }

    async fn rows(&self, i: usize) -> Vec<requests::Request> {
        self.sites[i].db.read(|c| requests::list(c, None, 10_000)).await.expect("list")
    }

    async fn staged(&self, i: usize) -> BTreeSet<String> {
        self.sites[i]
            .db
            .read(|c| {
                let mut stmt = c.prepare("SELECT request_id FROM request_staged")?;
                let ids = stmt
                    .query_map([], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<BTreeSet<_>>>()?;
                Ok(ids)
            })
            .await
            .expect("staged")
    }

    /// Requests whose master site `i` deleted (its `REQUEST_DELETED` events).
    async fn deleted_masters(&self, i: usize) -> BTreeSet<String> {
        self.sites[i]
            .db
            .read(|c| {
                let mut stmt =
                    c.prepare("SELECT payload FROM outbox WHERE kind = 'REQUEST_DELETED'")?;
                let ids = stmt
                    .query_map([], |r| r.get::<_, Vec<u8>>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?
                    .into_iter()
                    .filter_map(|p| serde_json::from_slice::<serde_json::Value>(&p).ok())
                    .filter(|v| v["was_master"] == true)
                    .filter_map(|v| v["request_id"].as_str().map(str::to_owned))
                    .collect();
                Ok(ids)
            })
            .await
            .expect("outbox")
    }

    /// One random step.
    async fn step(&mut self) {
        self.step += 1;
        self.now += Duration::minutes(1);
        let i = self.rng.random_range(0..self.sites.len());
        let roll = self.rng.random_range(0..100);
        match roll {
            0..=11 => self.create(i).await,
            12..=37 => self.operate(i).await,
            38..=62 => {
                if self.online(i) {
                    let lose = self.rng.random_bool(0.15);
                    self.deliver_events(i, lose).await;
                }
            }
            63..=85 => {
                if self.online(i) {
                    let lose = self.rng.random_bool(0.15);
                    self.deliver_commands(i, lose).await;
                }
            }
            86..=89 => {
                let steps = self.rng.random_range(5..25);
                self.sites[i].offline_until = self.step + steps;
            }
            90..=91 => self.restart_controller().await,
            92..=93 => self.restart_agent(i).await,
            94..=96 => {
                self.store.sweep_request_ops(self.now, &self.timeouts).await.expect("sweep");
                self.store.flush_request_commands().await.expect("flush");
            }
            _ => self.cancel().await,
        }
    }

    async fn create(&mut self, i: usize) {
        let Some(config) = self.sites[i].config.clone() else { return };
        let category = if self.rng.random_bool(0.5) { "chair" } else { "table" };
        let input = NewRequest {
            request_type: "REPAIR".into(),
            fields: serde_json::from_value(json!({"summary": "sim", "category": category}))
                .expect("fields"),
        };
        let now = self.now;
        self.sites[i]
            .db
            .write(move |c| requests::create(c, &config, &input, now))
            .await
            .expect("create");
    }

    async fn operate(&mut self, i: usize) {
        let Some(config) = self.sites[i].config.clone() else { return };
        let rows = self.rows(i).await;
        if rows.is_empty() {
            return;
        }
        let r = &rows[self.rng.random_range(0..rows.len())];
        let other = loop {
            let j = self.rng.random_range(0..self.sites.len());
            if j != i {
                break SiteCode::parse(&self.sites[j].code).expect("site");
            }
        };
        let spec = |action, mode, target| OperationSpec {
            action,
            mode,
            target,
            mapping: None,
            pool: None,
            update: Default::default(),
            rule: None,
        };
        let now = self.now;
        let id = r.id.to_string();
        let roll = self.rng.random_range(0..100);
        if roll < 15 {
            let patch = RequestPatch {
                fields: serde_json::from_value(json!({"summary": format!("edit {}", self.step)}))
                    .expect("patch"),
                expected_revision: None,
            };
            // Refused on a copy or while in flight: that is part of what is tested.
            let _ = self.sites[i]
                .db
                .write(move |c| requests::update(c, &config, &id, &patch, now))
                .await;
            return;
        }
        let s = match roll {
            15..=54 => {
                spec(OpKind::Transfer, Some(TransferMode::Ownership), Some(OpTarget::Site(other)))
            }
            55..=69 => spec(
                OpKind::Transfer,
                Some(TransferMode::DataOnly),
                Some(if roll < 62 { OpTarget::Site(other) } else { OpTarget::AllSites }),
            ),
            70..=79 => spec(OpKind::Return, None, None),
            80..=84 => spec(
                OpKind::Transfer,
                Some(TransferMode::IndependentCopy),
                Some(OpTarget::Site(other)),
            ),
            _ => spec(OpKind::Delete, None, None),
        };
        let _ =
            self.sites[i].db.write(move |c| distribution::start(c, &config, &id, &s, now)).await;
    }

    async fn cancel(&mut self) {
        let open = self
            .store
            .list_request_ops(&OpsFilter {
                status: Some("open".into()),
                limit: 100,
                ..Default::default()
            })
            .await
            .expect("ops");
        if open.is_empty() {
            return;
        }
        let op = &open[self.rng.random_range(0..open.len())];
        let _ = self
            .store
            .cancel_request_op(&op.op_id.to_string(), &op.target_site, "simulated cancel", self.now)
            .await;
    }

    /// No request has two masters; one without a master is in flight or deleted.
    async fn check_one_master(&self, context: &str) {
        let mut masters: BTreeMap<uuid::Uuid, Vec<String>> = BTreeMap::new();
        let mut pending: BTreeSet<uuid::Uuid> = BTreeSet::new();
        let mut known: BTreeSet<uuid::Uuid> = BTreeSet::new();
        let mut staged: BTreeSet<String> = BTreeSet::new();
        // A master deleted at its site whose REQUEST_DELETED the controller may not have yet.
        let mut deleted: BTreeSet<String> = BTreeSet::new();
        for i in 0..self.sites.len() {
            for r in self.rows(i).await {
                known.insert(r.id);
                if r.distribution.master {
                    masters.entry(r.id).or_default().push(self.sites[i].code.clone());
                }
                if r.distribution.pending_operation.is_some() {
                    pending.insert(r.id);
                }
            }
            staged.extend(self.staged(i).await);
            deleted.extend(self.deleted_masters(i).await);
        }
        for (id, at) in &masters {
            assert!(at.len() <= 1, "{context}: request {id} has two masters: {at:?}");
        }
        for id in known.difference(&masters.keys().copied().collect()) {
            if pending.contains(id)
                || staged.contains(&id.to_string())
                || deleted.contains(&id.to_string())
            {
                continue;
            }
            let owner = self.store.request_ownership(&id.to_string()).await.expect("owner");
            let in_flight_or_gone =
                owner.as_ref().is_some_and(|o| o.in_flight_op.is_some() || o.deleted_at.is_some());
            if !in_flight_or_gone {
                let mut held = vec![];
                for i in 0..self.sites.len() {
                    for r in self.rows(i).await.into_iter().filter(|r| r.id == *id) {
                        held.push((self.sites[i].code.clone(), r));
                    }
                }
                let ops = self
                    .store
                    .list_request_ops(&OpsFilter {
                        request: Some(id.to_string()),
                        limit: 100,
                        ..Default::default()
                    })
                    .await
                    .expect("ops");
                panic!(
                    "{context}: request {id} has no master, is not in flight and not deleted: {owner:?}\nheld: {held:#?}\nops: {ops:#?}"
                );
            }
        }
    }

    /// Heals the network and runs until nothing is left to deliver.
    async fn drain(&mut self) {
        for s in &mut self.sites {
            s.offline_until = 0;
        }
        for round in 0..200 {
            for i in 0..self.sites.len() {
                self.deliver_events(i, false).await;
                self.deliver_commands(i, false).await;
            }
            self.now += Duration::minutes(2);
            self.store.sweep_request_ops(self.now, &self.timeouts).await.expect("sweep");
            self.store.flush_request_commands().await.expect("flush");
            let open = self
                .store
                .list_request_ops(&OpsFilter {
                    status: Some("open".into()),
                    limit: 10,
                    ..Default::default()
                })
                .await
                .expect("ops");
            let mut idle = open.is_empty();
            for i in 0..self.sites.len() {
                let (high, acked) =
                    self.sites[i].db.read(queries::outbox_state).await.expect("outbox");
                let agent =
                    self.store.agent(self.sites[i].agent).await.expect("agent").expect("known");
                idle &= high == acked && agent.command_acked_seq == agent.command_seq;
            }
            if idle {
                return;
            }
            assert!(round < 199, "the simulation did not settle: open operations {open:?}");
        }
    }

    /// After the drain: exactly one master per live request, where the ledger says; nothing
    /// in flight; every operation ended.
    async fn check_settled(&self) {
        let mut masters: BTreeMap<uuid::Uuid, Vec<String>> = BTreeMap::new();
        let mut known = BTreeSet::new();
        for i in 0..self.sites.len() {
            for r in self.rows(i).await {
                known.insert(r.id);
                assert_eq!(
                    r.distribution.pending_operation, None,
                    "{} still in flight",
                    r.human_id
                );
                if r.distribution.master {
                    masters.entry(r.id).or_default().push(self.sites[i].code.clone());
                }
            }
            assert!(
                self.staged(i).await.is_empty(),
                "{} still has staged transfers",
                self.sites[i].code
            );
        }
        let mut live = 0;
        for id in &known {
            let owner = self
                .store
                .request_ownership(&id.to_string())
                .await
                .expect("owner")
                .expect("ledger knows it");
            if owner.deleted_at.is_some() {
                assert!(!masters.contains_key(id), "deleted request {id} still has a master");
                continue;
            }
            live += 1;
            let at = masters.get(id).cloned().unwrap_or_default();
            assert_eq!(
                at.len(),
                1,
                "request {} must have exactly one master, has {at:?}",
                owner.human_id
            );
            assert_eq!(
                owner.master_site.as_deref(),
                Some(at[0].as_str()),
                "ledger and sites disagree on {}",
                owner.human_id
            );
            assert_eq!(owner.in_flight_op, None);
        }
        let all = self
            .store
            .list_request_ops(&OpsFilter { limit: 10_000, ..Default::default() })
            .await
            .expect("ops");
        for op in &all {
            assert!(
                matches!(op.status.as_str(), "applied" | "failed" | "superseded"),
                "operation {} to {} ended {}",
                op.op_id,
                op.target_site,
                op.status
            );
            if op.status == "failed" {
                assert!(
                    op.reason.as_deref().is_some_and(|r| !r.is_empty()),
                    "a failure without a reason: {op:?}"
                );
            }
        }
        let mut tally: BTreeMap<String, u32> = BTreeMap::new();
        for op in &all {
            let key = format!(
                "{} {} {} {}",
                op.kind,
                op.mode.as_deref().unwrap_or("-"),
                op.status,
                op.result.as_deref().unwrap_or("")
            );
            *tally.entry(key).or_default() += 1;
        }
        eprintln!("operations: {tally:#?}");
        let moved = all
            .iter()
            .filter(|o| o.mode.as_deref() == Some("ownership") && o.status == "applied")
            .count();
        assert!(
            live > 0 && moved > 0,
            "the run must move some ownership ({live} live, {moved} moved)"
        );
    }
}

async fn run(url: String, seed: u64, steps: usize) {
    let mut sim = Sim::new(url, seed).await;
    // Every site gets its configuration first.
    for i in 0..SITES.len() {
        sim.deliver_commands(i, false).await;
    }
    for _ in 0..steps {
        sim.step().await;
        let context = format!("seed {seed}, step {}", sim.step);
        sim.check_one_master(&context).await;
    }
    sim.drain().await;
    sim.check_settled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_master_through_partitions_crashes_and_lost_acks_on_sqlite() {
    for seed in [11, 1, 2, 3] {
        run(meridian_controller::testing::fresh_sqlite_url(), seed, 400).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_master_through_partitions_crashes_and_lost_acks_on_postgres() {
    for seed in [11, 12] {
        run(meridian_controller::testing::fresh_postgres_url().await, seed, 400).await;
    }
}
