use chrono::TimeZone;
use serde_json::json;

use super::*;
use crate::requests::NewRequest;

fn db() -> Connection {
    let mut conn = Connection::open_in_memory().expect("db");
    crate::store::migrate(&mut conn).expect("migrate");
    conn
}

fn config(site: &str, duplicates: &str) -> SiteConfig {
    serde_json::from_value(json!({
        "revision": 1,
        "site": {"code": site, "name": site, "time_zone": "Europe/Paris"},
        "services": [], "queues": [], "service_points": [], "work_profiles": [],
        "staff": [], "connector_keys": [], "webhooks": [],
        "request_types": [
            {"code": "REPAIR", "name": "Repair", "fields": [
                {"name": "summary", "type": "text", "max_length": 80, "required": true},
                {"name": "category", "type": "enum", "values": ["chair", "table"], "required": true}
            ]},
            {"code": "WORKSHOP", "name": "Workshop job", "fields": [
                {"name": "title", "type": "text", "max_length": 80, "required": true},
                {"name": "kind", "type": "enum", "values": ["chair", "table"], "required": true},
                {"name": "priority", "type": "number", "integer": true, "default": 3}
            ]}
        ],
        "request_mappings": [
            {"code": "TO-WORKSHOP", "name": "To the workshop", "source_type": "REPAIR",
             "target_type": "WORKSHOP", "fields": {"title": {"from": "summary"}, "kind": {"from": "category"}},
             "return_mapping": "FROM-WORKSHOP", "duplicates": duplicates},
            {"code": "FROM-WORKSHOP", "name": "Back", "source_type": "WORKSHOP",
             "target_type": "REPAIR", "fields": {"summary": {"from": "title"}, "category": {"from": "kind"}}}
        ]
    }))
    .expect("config")
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap()
}

fn new_request(conn: &Connection, cfg: &SiteConfig) -> Request {
    let input = NewRequest {
        request_type: "REPAIR".into(),
        fields: serde_json::from_value(json!({"summary": "Wobbly", "category": "chair"})).unwrap(),
    };
    requests::create(conn, cfg, &input, now()).expect("create")
}

fn spec(action: OpKind, mode: Option<TransferMode>, target: Option<&str>) -> OperationSpec {
    OperationSpec {
        action,
        mode,
        target: target.map(|t| OpTarget::Site(SiteCode::parse(t).unwrap())),
        mapping: None,
        pool: None,
        update: UpdatePolicy::Immediately,
        rule: None,
    }
}

fn last_event(conn: &Connection) -> (String, serde_json::Value) {
    conn.query_row("SELECT kind, payload FROM outbox ORDER BY seq DESC LIMIT 1", [], |r| {
        let payload: Vec<u8> = r.get(1)?;
        Ok((r.get(0)?, serde_json::from_slice(&payload).unwrap()))
    })
    .expect("an event")
}

/// The `REQUEST_APPLY` the controller would send for the source's last operation.
fn apply_cmd(conn: &Connection) -> ApplyOperation {
    let (kind, payload) = last_event(conn);
    assert_eq!(kind, "REQUEST_OPERATION");
    let op: OperationRequested = serde_json::from_value(payload).unwrap();
    ApplyOperation {
        op_id: op.op_id,
        attempt: 1,
        kind: op.kind,
        mode: op.mode,
        source_site: SiteCode::parse("SFO").unwrap(),
        mapping: op.mapping,
        request: op.request,
    }
}

#[test]
fn an_ownership_transfer_is_staged_mapped_and_committed_and_the_source_turns_read_only() {
    let (sfo, chi) = (db(), db());
    let (sfo_cfg, chi_cfg) = (config("SFO", "error"), config("CHI", "error"));
    let r = new_request(&sfo, &sfo_cfg);
    let mut s = spec(OpKind::Transfer, Some(TransferMode::Ownership), Some("CHI"));
    s.mapping = Some(Code::parse("TO-WORKSHOP").unwrap());
    let started = start(&sfo, &sfo_cfg, &r.human_id, &s, now()).unwrap();
    let here = started.request.unwrap();
    assert!(!here.distribution.master);
    assert_eq!(here.distribution.transfer_status.as_deref(), Some("Pending"));
    // Read-only while in flight: edits and deletes are refused.
    let patch = requests::RequestPatch {
        fields: serde_json::from_value(json!({"summary": "x"})).unwrap(),
        expected_revision: None,
    };
    assert!(matches!(
        requests::update(&sfo, &sfo_cfg, &r.human_id, &patch, now()),
        Err(Error::Conflict(m)) if m.contains("handed over")
    ));
    assert!(matches!(
        start(&sfo, &sfo_cfg, &r.human_id, &spec(OpKind::Delete, None, None), now()),
        Err(Error::Conflict(_))
    ));

    let cmd = apply_cmd(&sfo);
    let outcome = apply(&chi, &chi_cfg, &cmd, now()).unwrap();
    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    assert!(requests::get(&chi, &r.id.to_string()).unwrap().is_none(), "staged, not yet stored");
    let arrived = commit(&chi, &Decision { op_id: cmd.op_id, request_id: r.id }, now())
        .unwrap()
        .expect("committed");
    assert!(arrived.distribution.master);
    assert_eq!(arrived.request_type.as_str(), "WORKSHOP");
    assert_eq!(arrived.fields["title"], json!("Wobbly"));
    assert_eq!(arrived.fields["priority"], json!(3));
    assert_eq!(arrived.distribution.history.len(), 1);
    // A second commit of the same operation is a no-op.
    assert!(
        commit(&chi, &Decision { op_id: cmd.op_id, request_id: r.id }, now()).unwrap().is_none()
    );

    let res = OperationResult {
        op_id: cmd.op_id,
        request_id: r.id,
        target_site: SiteCode::parse("CHI").unwrap(),
        status: ResultStatus::Success,
        target_request_id: Some(r.id),
        reason: None,
        keep_copy: true,
    };
    result(&sfo, &sfo_cfg, &res, now()).unwrap();
    let copy = requests::get(&sfo, &r.human_id).unwrap().unwrap();
    assert!(!copy.distribution.master);
    assert_eq!(copy.distribution.pending_operation, None);
    assert_eq!(copy.distribution.current_site.as_str(), "CHI");
    assert_eq!(copy.distribution.transfer_status.as_deref(), Some("Success"));

    // CHI returns it: the return mapping brings it back as a REPAIR, SFO's copy is replaced
    // and SFO is master again.
    let returned =
        start(&chi, &chi_cfg, &r.human_id, &spec(OpKind::Return, None, None), now()).unwrap();
    let mut back = {
        let (_, payload) = last_event(&chi);
        let op: OperationRequested = serde_json::from_value(payload).unwrap();
        assert_eq!(op.target, OpTarget::Site(SiteCode::parse("SFO").unwrap()));
        assert_eq!(op.mapping.as_ref().map(|m| m.as_str()), Some("FROM-WORKSHOP"));
        ApplyOperation {
            op_id: op.op_id,
            attempt: 1,
            kind: op.kind,
            mode: op.mode,
            source_site: SiteCode::parse("CHI").unwrap(),
            mapping: op.mapping,
            request: op.request,
        }
    };
    assert_eq!(returned.operation, Some(back.op_id));
    assert!(matches!(apply(&sfo, &sfo_cfg, &back, now()).unwrap(), Outcome::Applied { .. }));
    commit(&sfo, &Decision { op_id: back.op_id, request_id: r.id }, now()).unwrap();
    let home = requests::get(&sfo, &r.human_id).unwrap().unwrap();
    assert!(home.distribution.master);
    assert_eq!(home.request_type.as_str(), "REPAIR");
    assert_eq!(home.distribution.history.len(), 2);
    // A replayed apply of the return now finds the master here and is refused.
    back.attempt = 2;
    assert!(matches!(
        apply(&sfo, &sfo_cfg, &back, now()).unwrap(),
        Outcome::Rejected { retryable: false, reason } if reason.contains("master")
    ));
}

#[test]
fn a_failed_transfer_gives_the_ownership_back_and_drops_the_move() {
    let sfo = db();
    let cfg = config("SFO", "error");
    let r = new_request(&sfo, &cfg);
    let started = start(
        &sfo,
        &cfg,
        &r.human_id,
        &spec(OpKind::Transfer, Some(TransferMode::Ownership), Some("CHI")),
        now(),
    )
    .unwrap();
    let res = OperationResult {
        op_id: started.operation.unwrap(),
        request_id: r.id,
        target_site: SiteCode::parse("CHI").unwrap(),
        status: ResultStatus::Timeout,
        target_request_id: None,
        reason: Some("no outcome from CHI within 30 minutes".into()),
        keep_copy: true,
    };
    result(&sfo, &cfg, &res, now()).unwrap();
    let back = requests::get(&sfo, &r.human_id).unwrap().unwrap();
    assert!(back.distribution.master);
    assert_eq!(back.distribution.pending_operation, None);
    assert_eq!(back.distribution.transfer_status.as_deref(), Some("Timeout"));
    assert!(back.distribution.history.is_empty());
    assert!(back.distribution.transfer_error.as_deref().unwrap().contains("30 minutes"));
    // A result for an operation the site does not know changes nothing.
    let stray = OperationResult { op_id: Uuid::now_v7(), ..res };
    result(&sfo, &cfg, &stray, now()).unwrap();
    assert!(requests::get(&sfo, &r.human_id).unwrap().unwrap().distribution.master);
}

#[test]
fn copies_follow_the_duplicate_policy_and_the_master_refuses_copies_of_itself() {
    let check = |policy: &str, expect: &str| {
        let (sfo, chi) = (db(), db());
        let (sfo_cfg, chi_cfg) = (config("SFO", policy), config("CHI", policy));
        let r = new_request(&sfo, &sfo_cfg);
        let mut s = spec(OpKind::Transfer, Some(TransferMode::DataOnly), Some("CHI"));
        s.mapping = Some(Code::parse("TO-WORKSHOP").unwrap());
        start(&sfo, &sfo_cfg, &r.human_id, &s, now()).unwrap();
        let first = apply_cmd(&sfo);
        assert!(matches!(apply(&chi, &chi_cfg, &first, now()).unwrap(), Outcome::Applied { .. }));
        let copy = requests::get(&chi, &r.id.to_string()).unwrap().unwrap();
        assert!(!copy.distribution.master);
        assert_eq!(copy.distribution.current_site.as_str(), "SFO");
        start(&sfo, &sfo_cfg, &r.human_id, &s, now()).unwrap();
        let second = apply_cmd(&sfo);
        let outcome = apply(&chi, &chi_cfg, &second, now()).unwrap();
        let all = requests::list(&chi, None, 10).unwrap();
        let got = match (&outcome, all.len()) {
            (Outcome::Rejected { .. }, 1) => "refused",
            (Outcome::Applied { request_id, .. }, 2) if *request_id != r.id => "new request",
            (Outcome::Applied { .. }, 1) => "replaced",
            other => panic!("{policy}: {other:?}"),
        };
        assert_eq!(got, expect, "duplicate policy {policy}");
    };
    check("error", "refused");
    check("new_id", "new request");
    check("overwrite", "replaced");
    check("merge", "replaced");

    // An operation naming the site's own master is refused (forged or replayed).
    let sfo = db();
    let cfg = config("SFO", "error");
    let r = new_request(&sfo, &cfg);
    start(
        &sfo,
        &cfg,
        &r.human_id,
        &spec(OpKind::Transfer, Some(TransferMode::DataOnly), Some("CHI")),
        now(),
    )
    .unwrap();
    let mut forged = apply_cmd(&sfo);
    forged.source_site = SiteCode::parse("CHI").unwrap();
    assert!(matches!(
        apply(&sfo, &cfg, &forged, now()).unwrap(),
        Outcome::Rejected { retryable: false, .. }
    ));
    assert!(requests::get(&sfo, &r.human_id).unwrap().unwrap().distribution.master);
}

#[test]
fn a_type_or_mapping_the_target_lacks_is_refused_for_now_and_bad_specs_change_nothing() {
    let (sfo, chi) = (db(), db());
    let sfo_cfg = config("SFO", "error");
    let mut chi_cfg = config("CHI", "error");
    chi_cfg.request_mappings.clear();
    let r = new_request(&sfo, &sfo_cfg);
    let mut s = spec(OpKind::Transfer, Some(TransferMode::Ownership), Some("CHI"));
    s.mapping = Some(Code::parse("TO-WORKSHOP").unwrap());
    start(&sfo, &sfo_cfg, &r.human_id, &s, now()).unwrap();
    let cmd = apply_cmd(&sfo);
    assert!(matches!(
        apply(&chi, &chi_cfg, &cmd, now()).unwrap(),
        Outcome::Rejected { retryable: true, reason } if reason.contains("TO-WORKSHOP")
    ));

    let other = new_request(&sfo, &sfo_cfg);
    let before = sfo.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0)).unwrap();
    let refused = |s: OperationSpec| match start(&sfo, &sfo_cfg, &other.human_id, &s, now()) {
        Err(Error::InvalidFields(errs)) => errs.0[0].field.clone(),
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(refused(spec(OpKind::Transfer, None, Some("CHI"))), "mode");
    assert_eq!(refused(spec(OpKind::Transfer, Some(TransferMode::Ownership), None)), "target");
    assert_eq!(
        refused(spec(OpKind::Transfer, Some(TransferMode::Ownership), Some("SFO"))),
        "target"
    );
    assert_eq!(refused(spec(OpKind::Return, None, None)), "action");
    let mut unknown = spec(OpKind::Transfer, Some(TransferMode::DataOnly), Some("CHI"));
    unknown.mapping = Some(Code::parse("NOPE").unwrap());
    assert_eq!(refused(unknown), "mapping");
    let mut wrong_type = spec(OpKind::Transfer, Some(TransferMode::DataOnly), Some("CHI"));
    wrong_type.mapping = Some(Code::parse("FROM-WORKSHOP").unwrap());
    assert_eq!(refused(wrong_type), "mapping");
    let mut pool = spec(OpKind::Transfer, Some(TransferMode::DataOnly), Some("CHI"));
    pool.pool = Some(Code::parse("nightly").unwrap());
    assert_eq!(refused(pool), "pool");
    let mut group = spec(OpKind::Transfer, Some(TransferMode::Ownership), None);
    group.target = Some(OpTarget::Group("emea".into()));
    assert_eq!(refused(group), "target");
    let after = sfo.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0)).unwrap();
    assert_eq!(before, after, "a refused operation records nothing");
    assert!(requests::get(&sfo, &other.human_id).unwrap().unwrap().distribution.master);
}
