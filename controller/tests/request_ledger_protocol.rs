//! The distributed-request ledger against forged, replayed and stray messages (bad
//! input), on SQLite and PostgreSQL: events are fed through `ingest_events` exactly as the
//! gateway does. An operation from a site that is not the master is recorded as failed with
//! the reason and moves nothing; a replayed operation, an outcome for an unknown operation or
//! from the wrong site, and a change from a copy's site change nothing; a genuine transfer
//! still completes afterwards.

use chrono::{TimeZone, Utc};
use meridian_controller::config_admin::{self, ChangeMode, ResourceInput};
use meridian_controller::store::Store;
use meridian_controller::store::requests::OpsFilter;
use meridian_controller::testing::{self, enroll_agent, incoming};
use meridian_shared::commands::ControllerCommand;
use meridian_shared::events::{AgentEvent, RequestChanged, RequestEventKind};
use meridian_shared::transfers::{
    OpKind, OpTarget, OperationOutcome, OperationRequested, Outcome, RequestState, TransferMode,
    UpdatePolicy,
};
use meridian_shared::{AgentId, Code, SiteCode};
use serde_json::json;
use uuid::Uuid;

struct Site {
    agent: AgentId,
    seq: u64,
}

async fn setup(store: &dyn Store) -> (Site, Site, Site) {
    let inputs: Vec<ResourceInput> = ["SFO", "CHI", "TYO"]
        .iter()
        .map(|c| json!({"kind": "site", "code": c, "name": c, "time_zone": "Europe/Paris"}))
        .chain([json!({"kind": "request_type", "code": "REPAIR", "name": "Repair", "fields": [
            {"name": "summary", "type": "text", "max_length": 80, "required": true}]})])
        .map(|v| serde_json::from_value(v).expect("resource"))
        .collect();
    config_admin::change(store, "test", inputs, vec![], ChangeMode::Upsert).await.expect("config");
    let mut sites = vec![];
    for code in ["SFO", "CHI", "TYO"] {
        let agent = enroll_agent(store, code).await.expect("enroll");
        sites.push(Site { agent: agent.id, seq: 0 });
    }
    let tyo = sites.pop().expect("tyo");
    let chi = sites.pop().expect("chi");
    let sfo = sites.pop().expect("sfo");
    (sfo, chi, tyo)
}

async fn send(store: &dyn Store, site: &mut Site, events: &[AgentEvent]) {
    let at = Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap();
    let batch = incoming(events, site.seq + 1, at);
    store.ingest_events(site.agent, &batch, Utc::now()).await.expect("ingest").expect("accepted");
    site.seq += events.len() as u64;
    store.flush_request_commands().await.expect("flush");
}

/// The kinds of the commands in `agent`'s log after its configuration.
async fn commands(store: &dyn Store, agent: AgentId) -> Vec<(String, Vec<u8>)> {
    store
        .commands_after(agent, 0, 100)
        .await
        .expect("commands")
        .into_iter()
        .filter(|c| c.kind != "APPLY_CONFIG")
        .map(|c| (c.kind, c.payload))
        .collect()
}

fn state(id: Uuid) -> RequestState {
    RequestState {
        request_id: id,
        human_id: "SFO-000001".into(),
        request_type: Code::parse("REPAIR").expect("code"),
        fields: serde_json::from_value(json!({"summary": "Wobbly"})).expect("fields"),
        revision: 1,
        created_at: Utc.with_ymd_and_hms(2026, 11, 22, 9, 0, 0).unwrap(),
        history: vec![],
    }
}

fn created(id: Uuid) -> AgentEvent {
    let s = state(id);
    AgentEvent::Request(
        RequestEventKind::Created,
        RequestChanged {
            request_id: id,
            human_id: s.human_id,
            request_type: s.request_type,
            revision: 1,
            fields: s.fields,
            at: s.created_at,
        },
    )
}

fn transfer(id: Uuid, op: Uuid, to: &str) -> AgentEvent {
    AgentEvent::RequestOperation(OperationRequested {
        op_id: op,
        kind: OpKind::Transfer,
        mode: Some(TransferMode::Ownership),
        target: OpTarget::Site(SiteCode::parse(to).expect("site")),
        mapping: None,
        pool: Code::parse("default").expect("pool"),
        update: UpdatePolicy::Immediately,
        rule: None,
        request: state(id),
        source_keeps_copy: true,
        at: Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap(),
    })
}

fn outcome(op: Uuid, id: Uuid) -> AgentEvent {
    AgentEvent::RequestOperationOutcome(OperationOutcome {
        op_id: op,
        attempt: 1,
        outcome: Outcome::Applied { request_id: id, human_id: "SFO-000001".into() },
        at: Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 1).unwrap(),
    })
}

async fn forged_and_replayed_messages_change_nothing(store: &dyn Store) {
    let (mut sfo, mut chi, mut tyo) = setup(store).await;
    let id = Uuid::now_v7();
    send(store, &mut sfo, &[created(id)]).await;

    // TYO, which does not hold the master, asks to move it: recorded as failed, with the
    // reason, and nothing moves — not even back to TYO.
    let forged = Uuid::now_v7();
    send(store, &mut tyo, &[transfer(id, forged, "CHI")]).await;
    let op = store.request_op(&forged.to_string(), "CHI").await.expect("op").expect("recorded");
    assert_eq!((op.status.as_str(), op.result.as_deref()), ("failed", Some("failure")));
    assert!(op.reason.as_deref().unwrap_or_default().contains("not the master"), "{op:?}");
    let owner = store.request_ownership(&id.to_string()).await.expect("owner").expect("known");
    assert_eq!(owner.master_site.as_deref(), Some("SFO"));
    assert!(commands(store, tyo.agent).await.is_empty(), "the forger is told nothing");
    assert!(commands(store, chi.agent).await.is_empty(), "the target is sent nothing");

    // A change reported by a site that is not the master is ignored.
    let mut stray = created(id);
    if let AgentEvent::Request(_, c) = &mut stray {
        c.revision = 9;
    }
    let AgentEvent::Request(_, change) = stray else { unreachable!() };
    send(store, &mut tyo, &[AgentEvent::Request(RequestEventKind::Updated, change)]).await;
    let owner = store.request_ownership(&id.to_string()).await.expect("owner").expect("known");
    assert_eq!(owner.revision, 1);

    // The genuine transfer, then a replay of the same operation under a new sequence: the
    // replay adds nothing to the ledger and sends nothing.
    let op_id = Uuid::now_v7();
    send(store, &mut sfo, &[transfer(id, op_id, "CHI")]).await;
    let applies = commands(store, chi.agent).await;
    assert_eq!(applies.len(), 1, "one REQUEST_APPLY to CHI");
    send(store, &mut sfo, &[transfer(id, op_id, "CHI")]).await;
    assert_eq!(commands(store, chi.agent).await.len(), 1, "the replay sent nothing");
    let ops = store
        .list_request_ops(&OpsFilter {
            request: Some(id.to_string()),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("ops");
    assert_eq!(ops.len(), 2, "the forged and the genuine operation: {ops:#?}");

    // Outcomes for an unknown operation, or from a site the operation did not go to, change
    // nothing; the target's own outcome commits.
    send(store, &mut chi, &[outcome(Uuid::now_v7(), id)]).await;
    send(store, &mut tyo, &[outcome(op_id, id)]).await;
    let owner = store.request_ownership(&id.to_string()).await.expect("owner").expect("known");
    assert_eq!((owner.master_site, owner.in_flight_op), (None, Some(op_id.to_string())));
    send(store, &mut chi, &[outcome(op_id, id)]).await;
    let owner = store.request_ownership(&id.to_string()).await.expect("owner").expect("known");
    assert_eq!(owner.master_site.as_deref(), Some("CHI"));
    let kinds: Vec<String> = commands(store, chi.agent).await.into_iter().map(|c| c.0).collect();
    assert_eq!(kinds, ["REQUEST_APPLY", "REQUEST_COMMIT"]);
    let results = commands(store, sfo.agent).await;
    assert_eq!(results.len(), 1);
    match ControllerCommand::decode(&results[0].0, &results[0].1).expect("decodes") {
        ControllerCommand::OperationResult(r) => {
            assert_eq!((r.op_id, r.status.label()), (op_id, "Success"));
        }
        other => panic!("expected a result, got {other:?}"),
    }
    // A second outcome of the settled operation sends nothing more.
    send(store, &mut chi, &[outcome(op_id, id)]).await;
    assert_eq!(commands(store, chi.agent).await.len(), 2);
}

fn transfer_in(id: Uuid, op: Uuid, to: &str, pool: &str, mode: TransferMode) -> AgentEvent {
    let mut e = transfer(id, op, to);
    if let AgentEvent::RequestOperation(o) = &mut e {
        o.pool = Code::parse(pool).expect("pool");
        o.mode = Some(mode);
    }
    e
}

fn refused_for_now(op: Uuid) -> AgentEvent {
    AgentEvent::RequestOperationOutcome(OperationOutcome {
        op_id: op,
        attempt: 1,
        outcome: Outcome::Rejected {
            reason: "request type REPAIR is not configured here yet".into(),
            retryable: true,
        },
        at: Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 1).unwrap(),
    })
}

/// The `(op, attempt)` of every `REQUEST_APPLY` in `agent`'s log, in order.
async fn applies(store: &dyn Store, agent: AgentId) -> Vec<(Uuid, u32)> {
    commands(store, agent)
        .await
        .into_iter()
        .filter_map(|(kind, payload)| match ControllerCommand::decode(&kind, &payload) {
            Ok(ControllerCommand::ApplyOperation(a)) => Some((a.op_id, a.attempt)),
            _ => None,
        })
        .collect()
}

/// A target that refuses for now puts its operation in `retry`; later operations of the same
/// pool to that site queue behind it (FIFO per lane) while other pools flow; the sweep sends it
/// again after the backoff and then the queued ones, in order; the timeout ends what never
/// succeeds with a visible failure and gives the ownership back.
async fn lanes_retry_in_order_and_time_out(store: &dyn Store) {
    let (mut sfo, mut chi, _) = setup(store).await;
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    send(store, &mut sfo, &[created(a), created(b), created(c)]).await;
    let (op_a, op_b, op_c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    send(store, &mut sfo, &[transfer_in(a, op_a, "CHI", "default", TransferMode::DataOnly)]).await;
    send(store, &mut chi, &[refused_for_now(op_a)]).await;
    let status = |op: Uuid| async move {
        store.request_op(&op.to_string(), "CHI").await.expect("op").expect("recorded").status
    };
    assert_eq!(status(op_a).await, "retry");
    send(store, &mut sfo, &[transfer_in(b, op_b, "CHI", "default", TransferMode::DataOnly)]).await;
    send(store, &mut sfo, &[transfer_in(c, op_c, "CHI", "urgent", TransferMode::Ownership)]).await;
    assert_eq!(status(op_b).await, "queued", "behind the retry in its lane");
    assert_eq!(status(op_c).await, "pending", "another pool does not wait");
    assert_eq!(applies(store, chi.agent).await, [(op_a, 1), (op_c, 1)]);

    let timeouts = meridian_controller::store::requests::PoolTimeouts::default();
    let soon = Utc::now() + chrono::Duration::seconds(6);
    let report = store.sweep_request_ops(soon, &timeouts).await.expect("sweep");
    assert_eq!(report.retried, 1);
    store.flush_request_commands().await.expect("flush");
    assert_eq!(applies(store, chi.agent).await, [(op_a, 1), (op_c, 1), (op_a, 2), (op_b, 1)]);
    assert_eq!((status(op_a).await, status(op_b).await), ("pending".into(), "pending".into()));

    // Nothing answers within the pool's day: every open operation times out, visibly, and the
    // ownership transfer gives the request back to its source.
    let later = Utc::now() + chrono::Duration::hours(25);
    let report = store.sweep_request_ops(later, &timeouts).await.expect("sweep");
    assert_eq!(report.timed_out, 3);
    for op in [op_a, op_b, op_c] {
        let o = store.request_op(&op.to_string(), "CHI").await.expect("op").expect("recorded");
        assert_eq!((o.status.as_str(), o.result.as_deref()), ("failed", Some("timeout")));
        assert!(o.reason.as_deref().unwrap_or_default().contains("no outcome from CHI"), "{o:?}");
    }
    let owner = store.request_ownership(&c.to_string()).await.expect("owner").expect("known");
    assert_eq!((owner.master_site.as_deref(), owner.in_flight_op), (Some("SFO"), None));
}

#[tokio::test]
async fn lanes_retry_in_order_and_time_out_on_sqlite() {
    let store =
        meridian_controller::store::open(&testing::fresh_sqlite_url()).await.expect("store");
    lanes_retry_in_order_and_time_out(store.as_ref()).await;
}

#[tokio::test]
async fn lanes_retry_in_order_and_time_out_on_postgres() {
    let store = meridian_controller::store::open(&testing::fresh_postgres_url().await)
        .await
        .expect("store");
    lanes_retry_in_order_and_time_out(store.as_ref()).await;
}

#[tokio::test]
async fn forged_and_replayed_messages_change_nothing_on_sqlite() {
    let store =
        meridian_controller::store::open(&testing::fresh_sqlite_url()).await.expect("store");
    forged_and_replayed_messages_change_nothing(store.as_ref()).await;
}

#[tokio::test]
async fn forged_and_replayed_messages_change_nothing_on_postgres() {
    let store = meridian_controller::store::open(&testing::fresh_postgres_url().await)
        .await
        .expect("store");
    forged_and_replayed_messages_change_nothing(store.as_ref()).await;
}
