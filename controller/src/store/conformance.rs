//! The store conformance suite, written once and run against every backend
//! (`controller/tests/store_conformance.rs`). A backend is done when it passes all of it.

use chrono::{Duration, TimeZone, Utc};
use meridian_shared::config::{Resource, ResourceKind, Site};
use meridian_shared::{AgentId, SiteCode};

use super::*;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 2, 9, 0, 0).single().expect("valid time")
}

fn site(code: &str) -> Resource {
    Resource::Site(Site {
        code: SiteCode::parse(code).expect("site code"),
        name: format!("Site {code}"),
        time_zone: "UTC".into(),
        business_hours: Default::default(),
        closed_dates: vec![],
        tags: vec![],
        end_of_day: Default::default(),
        share_customer_data: false,
        appointment_sync: Default::default(),
    })
}

fn commit(expected: u64, upserts: Vec<Resource>, publish: &[&str]) -> ConfigCommit {
    ConfigCommit {
        revision_floor: None,
        expected_revision: expected,
        actor: "test".into(),
        summary: format!("{} change(s)", upserts.len()),
        upserts,
        deletes: vec![],
        publish: publish
            .iter()
            .map(|s| {
                (
                    SiteCode::parse(s).expect("site"),
                    format!("{{\"rev\":{}}}", expected + 1).into_bytes(),
                )
            })
            .collect(),
        at: t0(),
    }
}

async fn enroll_agent(store: &dyn Store, site: &str, token: &str) -> AgentRecord {
    store
        .insert_enrollment_token(&EnrollmentToken {
            id: format!("id-{token}"),
            site: SiteCode::parse(site).expect("site"),
            token_hash: format!("hash-{token}"),
            created_at: t0(),
            expires_at: t0() + Duration::hours(1),
            used_at: None,
            used_by_agent: None,
        })
        .await
        .expect("insert token");
    let (revision, _) = store.load_config().await.expect("load");
    store
        .enroll(Enrollment {
            token_hash: format!("hash-{token}"),
            agent_id: AgentId::new(),
            credential_hash: format!("cred-{token}"),
            hostname: "host".into(),
            version: "1.0.0".into(),
            expected_revision: revision,
            initial_config: b"{\"initial\":true}".to_vec(),
            sync_appointments: false,
            at: t0(),
        })
        .await
        .expect("enroll")
}

fn events(range: std::ops::RangeInclusive<u64>) -> Vec<IncomingEvent> {
    range
        .map(|seq| IncomingEvent {
            seq,
            kind: "VISIT_CREATED".into(),
            occurred_at: t0() + Duration::seconds(seq as i64),
            payload: format!("{{\"n\":{seq}}}"),
            quarantine: None,
        })
        .collect()
}

pub async fn config_commits_are_atomic_and_versioned(store: &dyn Store) {
    let (rev, resources) = store.load_config().await.expect("load");
    assert_eq!((rev, resources.len()), (0, 0));
    let rev = store.commit_config(commit(0, vec![site("SFO"), site("CHI")], &["SFO", "CHI"])).await;
    assert_eq!(rev.expect("commit"), 1);
    let stale = store.commit_config(commit(0, vec![site("TYO")], &["TYO"])).await;
    assert!(matches!(stale, Err(Error::RevisionConflict)), "{stale:?}");
    let (rev, resources) = store.load_config().await.expect("load");
    assert_eq!(rev, 1);
    let codes: Vec<String> = resources.iter().map(|r| r.key().code).collect();
    assert_eq!(codes, ["CHI", "SFO"]);

    let mut delete = commit(1, vec![], &[]);
    delete.deletes.push(ResourceKey { kind: ResourceKind::Site, site: None, code: "CHI".into() });
    assert_eq!(store.commit_config(delete).await.expect("delete"), 2);
    let (_, resources) = store.load_config().await.expect("load");
    assert_eq!(resources, vec![site("SFO")]);
    let revisions = store.config_revisions(10).await.expect("revisions");
    assert_eq!(revisions.iter().map(|r| r.revision).collect::<Vec<_>>(), [2, 1]);
}

pub async fn api_tokens_roundtrip(store: &dyn Store) {
    let token = ApiToken {
        id: "tok1".into(),
        name: "bootstrap".into(),
        role: Role::Admin,
        token_hash: "h1".into(),
        created_at: t0(),
    };
    store.insert_api_token(&token).await.expect("insert");
    assert!(store.insert_api_token(&token).await.is_err(), "duplicate hash must fail");
    assert_eq!(store.api_token_by_hash("h1").await.expect("get"), Some(token.clone()));
    assert_eq!(store.api_token_by_hash("nope").await.expect("get"), None);
    assert_eq!(store.list_api_tokens().await.expect("list"), vec![token]);
    assert!(store.delete_api_token("tok1").await.expect("delete"));
    assert!(!store.delete_api_token("tok1").await.expect("delete again"));
}

pub async fn enrollment_is_one_time_and_replaces_hardware(store: &dyn Store) {
    store.commit_config(commit(0, vec![site("SFO")], &["SFO"])).await.expect("commit");
    let first = enroll_agent(store, "SFO", "a").await;
    assert_eq!(first.site.as_str(), "SFO");
    assert_eq!(first.command_seq, 1, "initial configuration is the first command");
    let cmds = store.commands_after(first.id, 0, 10).await.expect("commands");
    assert_eq!(cmds.len(), 1);
    assert_eq!(cmds[0].payload, b"{\"initial\":true}");

    let again = Enrollment {
        token_hash: "hash-a".into(),
        agent_id: AgentId::new(),
        credential_hash: "other".into(),
        hostname: "h".into(),
        version: "1".into(),
        expected_revision: 1,
        initial_config: vec![],
        sync_appointments: false,
        at: t0(),
    };
    let used = store.enroll(again.clone()).await;
    assert!(matches!(used, Err(Error::Enrollment(EnrollError::AlreadyUsed))), "{used:?}");
    let unknown = store.enroll(Enrollment { token_hash: "nope".into(), ..again.clone() }).await;
    assert!(matches!(unknown, Err(Error::Enrollment(EnrollError::Unknown))), "{unknown:?}");

    store
        .insert_enrollment_token(&EnrollmentToken {
            id: "old".into(),
            site: SiteCode::parse("SFO").expect("site"),
            token_hash: "hash-old".into(),
            created_at: t0() - Duration::hours(2),
            expires_at: t0() - Duration::hours(1),
            used_at: None,
            used_by_agent: None,
        })
        .await
        .expect("insert");
    let expired = store.enroll(Enrollment { token_hash: "hash-old".into(), ..again.clone() }).await;
    assert!(matches!(expired, Err(Error::Enrollment(EnrollError::Expired))), "{expired:?}");
    let tokens = store.list_enrollment_tokens().await.expect("tokens");
    assert!(
        tokens.iter().find(|t| t.id == "old").expect("old").used_at.is_none(),
        "refusal changes nothing"
    );

    let second = enroll_agent(store, "SFO", "b").await;
    let first_now = store.agent(first.id).await.expect("get").expect("exists");
    assert!(first_now.revoked_at.is_some(), "re-enrolling a site revokes its previous agent");
    assert!(store.agent(second.id).await.expect("get").expect("exists").revoked_at.is_none());
    assert_eq!(
        store.agent_by_credential("cred-b").await.expect("get").map(|a| a.id),
        Some(second.id)
    );
    assert_eq!(store.list_agents().await.expect("list").len(), 2);
}

pub async fn config_commits_enqueue_commands_for_active_agents(store: &dyn Store) {
    store
        .commit_config(commit(0, vec![site("SFO"), site("CHI")], &["SFO", "CHI"]))
        .await
        .expect("c");
    let sfo = enroll_agent(store, "SFO", "s").await;
    let chi = enroll_agent(store, "CHI", "c").await;
    store.commit_config(commit(1, vec![site("SFO")], &["SFO"])).await.expect("c");
    let sfo_cmds = store.commands_after(sfo.id, 0, 10).await.expect("cmds");
    assert_eq!(sfo_cmds.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(sfo_cmds[1].payload, b"{\"rev\":2}");
    assert_eq!(store.commands_after(chi.id, 0, 10).await.expect("cmds").len(), 1);
    let sfo = store.agent(sfo.id).await.expect("get").expect("exists");
    assert_eq!((sfo.site_revision, sfo.command_seq), (2, 2));
    assert_eq!(store.commands_after(sfo.id, 1, 10).await.expect("cmds").len(), 1);

    store.ack_commands(sfo.id, 2, None).await.expect("ack");
    store.ack_commands(sfo.id, 1, None).await.expect("stale ack");
    store.ack_commands(sfo.id, 9, None).await.expect("ack beyond head");
    let sfo = store.agent(sfo.id).await.expect("get").expect("exists");
    assert_eq!(sfo.command_acked_seq, 2, "acks never move backwards or past the head");
}

pub async fn ingest_is_idempotent_and_gapless(store: &dyn Store) {
    store.commit_config(commit(0, vec![site("SFO")], &["SFO"])).await.expect("c");
    let agent = enroll_agent(store, "SFO", "x").await;
    let ingest = |evs: Vec<IncomingEvent>| async move {
        store.ingest_events(agent.id, &evs, t0()).await.expect("store")
    };
    assert_eq!(ingest(events(1..=100)).await, Ok(100));
    assert_eq!(ingest(events(1..=100)).await, Ok(100), "a resent batch is a no-op");
    assert_eq!(ingest(events(51..=150)).await, Ok(150), "overlap stores only the new part");
    assert_eq!(ingest(vec![]).await, Ok(150));
    assert_eq!(ingest(events(152..=160)).await, Err(IngestError::Gap { first: 152, acked: 150 }));
    let mut holes = events(151..=155);
    holes.remove(2);
    assert_eq!(ingest(holes).await, Err(IngestError::NotContiguous(154)));
    assert_eq!(store.count_events(agent.id).await.expect("count"), 150);
    let stored = store.events_after(agent.id, 148, 10).await.expect("after");
    assert_eq!(stored.iter().map(|e| e.seq).collect::<Vec<_>>(), [149, 150]);
    assert_eq!(stored[0].payload, serde_json::json!({"n": 149}));
    assert_eq!(store.agent(agent.id).await.expect("get").expect("exists").acked_seq, 150);

    let stranger = store.ingest_events(AgentId::new(), &events(1..=1), t0()).await.expect("store");
    assert_eq!(stranger, Err(IngestError::UnknownAgent));
    assert!(store.revoke_agent(agent.id, t0()).await.expect("revoke"));
    assert!(!store.revoke_agent(agent.id, t0()).await.expect("revoke again"));
    let revoked = store.ingest_events(agent.id, &events(151..=151), t0()).await.expect("store");
    assert_eq!(revoked, Err(IngestError::UnknownAgent));
    assert_eq!(store.count_events(agent.id).await.expect("count"), 150);
}

pub async fn agent_status_updates_are_partial(store: &dyn Store) {
    store.commit_config(commit(0, vec![site("SFO")], &["SFO"])).await.expect("c");
    let agent = enroll_agent(store, "SFO", "y").await;
    let update = AgentStatusUpdate {
        connected: true,
        last_seen: Some(t0()),
        version: Some("2.0.0".into()),
        config_revision: Some(1),
        outbox_pending: Some(42),
        clock_skew_ms: Some(-250),
        store_error: Some("disk full".into()),
    };
    store.update_agent_status(agent.id, &update).await.expect("update");
    store
        .update_agent_status(
            agent.id,
            &AgentStatusUpdate { connected: false, ..Default::default() },
        )
        .await
        .expect("update");
    let a = store.agent(agent.id).await.expect("get").expect("exists");
    assert!(!a.connected);
    assert_eq!(a.version, "2.0.0");
    assert_eq!((a.config_revision, a.outbox_pending, a.clock_skew_ms), (1, 42, -250));
    assert_eq!(a.store_error.as_deref(), Some("disk full"));
    let clear = AgentStatusUpdate {
        connected: true,
        store_error: Some(String::new()),
        ..Default::default()
    };
    store.update_agent_status(agent.id, &clear).await.expect("update");
    assert_eq!(store.agent(agent.id).await.expect("get").expect("exists").store_error, None);
}

pub async fn facts_project_events_exactly_once_and_rebuild_identically(store: &dyn Store) {
    use meridian_shared::VisitId;
    use meridian_shared::events::VisitEventKind;
    use meridian_shared::visits::Outcome;

    store.commit_config(commit(0, vec![site("SFO")], &["SFO"])).await.expect("c");
    let agent = enroll_agent(store, "SFO", "f").await;
    let (a, b) = (VisitId::new(), VisitId::new());
    let mut timeline = crate::testing::visit_events(a, t0(), &[]);
    timeline.extend(crate::testing::visit_events(b, t0(), &[]));
    let a_steps = crate::testing::visit_events(
        a,
        t0(),
        &[
            (VisitEventKind::Called, 5, None, None),
            (VisitEventKind::Serving, 6, None, None),
            (VisitEventKind::Ended, 10, Some(Outcome::Served), Some(240_000)),
        ],
    );
    let b_steps = crate::testing::visit_events(
        b,
        t0(),
        &[
            (VisitEventKind::Called, 11, None, None),
            (VisitEventKind::NoShow, 13, Some(Outcome::NoShow), None),
        ],
    );
    timeline.extend(a_steps.into_iter().skip(1));
    timeline.extend(b_steps.into_iter().skip(1));
    // A visit event for a visit nobody created: quarantined with its reason, never blocking.
    let orphan = crate::testing::visit_events(
        VisitId::new(),
        t0(),
        &[(VisitEventKind::Called, 1, None, None)],
    );
    timeline.push(orphan[1].clone());
    let incoming = crate::testing::incoming(&timeline, 1, t0());
    let zones = crate::stats::facts::Zones::new();
    let sfo = stats::FactFilter { site: Some("SFO".into()), ..Default::default() };
    // Ingest in two batches and project in small steps: the same facts as one pass.
    store.ingest_events(agent.id, &incoming[..4], t0()).await.expect("store").expect("ingest");
    assert_eq!(store.project_facts(agent.id, 3, &zones).await.expect("project"), 3);
    assert_eq!(store.project_facts(agent.id, 3, &zones).await.expect("project"), 1);
    store
        .ingest_events(agent.id, &incoming[2..], t0())
        .await
        .expect("store")
        .expect("resend overlaps");
    while store.project_facts(agent.id, 2, &zones).await.expect("project") > 0 {}
    assert_eq!(store.project_facts(agent.id, 100, &zones).await.expect("project"), 0, "caught up");
    assert_eq!(store.projection_lag().await.expect("lag"), 0);
    let facts = store.visit_facts(&sfo).await.expect("facts");
    assert_eq!(facts.len(), 2);
    let fa = facts.iter().find(|f| f.visit_id == a.to_string()).expect("a");
    let fb = facts.iter().find(|f| f.visit_id == b.to_string()).expect("b");
    assert_eq!(
        (fa.outcome.as_deref(), fa.waiting_ms, fa.service_ms),
        (Some("served"), Some(300_000), 240_000)
    );
    assert_eq!(fa.created_local, "2026-11-02T09:00");
    assert_eq!((fb.outcome.as_deref(), fb.waiting_ms), (Some("no_show"), Some(660_000)));
    let chi = stats::FactFilter { site: Some("CHI".into()), ..Default::default() };
    assert_eq!(store.visit_facts(&chi).await.expect("facts"), vec![]);
    let transactions = store.transaction_facts(&sfo).await.expect("transactions");
    assert_eq!(
        transactions.iter().map(|t| (t.n, t.outcome.as_deref())).collect::<Vec<_>>(),
        [(0, Some("served")), (0, Some("no_show"))]
    );
    assert_eq!(store.open_transactions(None).await.expect("open"), vec![]);
    let quarantined = store.quarantined(10).await.expect("quarantine");
    assert_eq!(
        quarantined.iter().map(|q| (q.seq, q.reason.as_str())).collect::<Vec<_>>(),
        [(incoming.len() as u64, "no VISIT_CREATED was received for this visit")]
    );

    // Rollups: the marked day is recomputed once, and equals the facts.
    assert_eq!(store.pending_rollups().await.expect("pending"), 1);
    assert_eq!(store.refresh_rollups(10).await.expect("refresh"), 1);
    assert_eq!(store.pending_rollups().await.expect("pending"), 0);
    let day = store.rollups(&stats::RollupQuery::default()).await.expect("rollups");
    let month = store
        .rollups(&stats::RollupQuery { grain: stats::Grain::Month, ..Default::default() })
        .await
        .expect("rollups");
    let expected = crate::stats::report::rollup(&facts);
    let as_map = |rows: &[stats::RollupRow]| {
        rows.iter()
            .map(|r| (r.dims.clone(), r.tally.clone()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(as_map(&day), expected);
    assert_eq!(as_map(&month), expected);
    assert_eq!(day[0].period, "2026-11-02");
    assert_eq!(month[0].period, "2026-11");

    store.reset_facts().await.expect("reset");
    assert_eq!(store.visit_facts(&Default::default()).await.expect("facts"), vec![]);
    assert_eq!(store.rollups(&stats::RollupQuery::default()).await.expect("rollups"), vec![]);
    while store.project_facts(agent.id, 1000, &zones).await.expect("rebuild") > 0 {}
    while store.refresh_rollups(10).await.expect("refresh") > 0 {}
    assert_eq!(store.visit_facts(&sfo).await.expect("facts"), facts, "a rebuild is identical");
    assert_eq!(store.transaction_facts(&sfo).await.expect("transactions"), transactions);
    assert_eq!(
        as_map(&store.rollups(&stats::RollupQuery::default()).await.expect("rollups")),
        expected
    );
    assert_eq!(store.quarantined(10).await.expect("quarantine").len(), 1, "quarantined once");
}

/// Ingests `events` after the agent's acknowledgement, all occurring (and received) at `at`;
/// returns their sequences.
async fn ingest_at(
    store: &dyn Store,
    agent: AgentId,
    events: &[meridian_shared::events::AgentEvent],
    at: DateTime<Utc>,
) -> Vec<u64> {
    let first = store.agent(agent).await.expect("get").expect("exists").acked_seq + 1;
    let incoming = crate::testing::incoming(events, first, at);
    let acked = store.ingest_events(agent, &incoming, at).await.expect("store").expect("ingest");
    (first..=acked).collect()
}

pub async fn retention_removes_old_months_but_never_unprojected_events(store: &dyn Store) {
    use std::collections::BTreeSet;

    use meridian_shared::events::{
        AgentEvent, ServicePointChanged, ServicePointEventKind, VisitEventKind,
    };
    use meridian_shared::visits::Outcome;
    use meridian_shared::{Code, VisitId};

    use super::maintenance::RetentionPolicy;

    let at = |month: u32, day: u32| {
        Utc.with_ymd_and_hms(2026, month, day, 9, 0, 0).single().expect("valid time")
    };
    let counter = |kind, at| {
        AgentEvent::ServicePoint(
            kind,
            ServicePointChanged {
                service_point: Code::parse("C1").expect("code"),
                staff: None,
                at,
            },
        )
    };
    store.commit_config(commit(0, vec![site("SFO")], &["SFO"])).await.expect("c");
    let agent = enroll_agent(store, "SFO", "r").await;
    // PostgreSQL: partitions for June to August; May and September land in the DEFAULT
    // partitions, so both ways of removing rows are exercised. SQLite: nothing to prepare.
    store.prepare_partitions(at(6, 15)).await.expect("partitions");
    assert_eq!(store.prepare_partitions(at(6, 15)).await.expect("again"), Vec::<String>::new());

    // One served visit, one counter session and (in May and August) one quarantined event per
    // month, May to September.
    let mut visits = std::collections::BTreeMap::new();
    let mut seqs_by_month = std::collections::BTreeMap::new();
    for month in 5..=9 {
        let visit = VisitId::new();
        let mut timeline = crate::testing::visit_events(
            visit,
            at(month, 10),
            &[
                (VisitEventKind::Called, 5, None, None),
                (VisitEventKind::Ended, 10, Some(Outcome::Served), Some(300_000)),
            ],
        );
        timeline.push(counter(ServicePointEventKind::Opened, at(month, 10)));
        timeline.push(counter(ServicePointEventKind::Closed, at(month, 10) + Duration::hours(8)));
        if month == 5 || month == 8 {
            let orphan = crate::testing::visit_events(
                VisitId::new(),
                at(month, 10),
                &[(VisitEventKind::Called, 1, None, None)],
            );
            timeline.push(orphan[1].clone());
        }
        visits.insert(month, visit.to_string());
        seqs_by_month.insert(month, ingest_at(store, agent.id, &timeline, at(month, 10)).await);
    }
    crate::stats::catch_up(store, &Default::default()).await.expect("project");
    assert_eq!(store.projection_lag().await.expect("lag"), 0);
    let rollups_before = store.rollups(&stats::RollupQuery::default()).await.expect("rollups");
    assert_eq!(rollups_before.len(), 5);

    let stored_seqs = || async {
        store
            .events_after(agent.id, 0, 10_000)
            .await
            .expect("events")
            .iter()
            .map(|e| e.seq)
            .collect::<BTreeSet<u64>>()
    };
    let seqs_of = |months: &[u32]| -> BTreeSet<u64> {
        months.iter().flat_map(|m| seqs_by_month[m].iter().copied()).collect()
    };
    let visit_ids = |facts: Vec<String>| facts.into_iter().collect::<BTreeSet<_>>();
    let visits_of =
        |months: &[u32]| -> BTreeSet<String> { months.iter().map(|m| visits[m].clone()).collect() };

    // Events: kept 60 days at 20 September = from 1 July; facts: 100 days = from 1 June.
    let policy = RetentionPolicy { events_days: 60, facts_days: 100 };
    let report = store.apply_retention(&policy, at(9, 20)).await.expect("retention");
    assert_eq!(report.unprojected_kept, 0);
    assert_eq!(report.events_removed as usize, seqs_of(&[5, 6]).len());
    assert_eq!(stored_seqs().await, seqs_of(&[7, 8, 9]), "exactly the events before July go");
    let all = stats::FactFilter::default();
    let facts = store.visit_facts(&all).await.expect("facts");
    assert_eq!(
        visit_ids(facts.into_iter().map(|f| f.visit_id).collect()),
        visits_of(&[6, 7, 8, 9]),
        "exactly the visits before June go"
    );
    let transactions = store.transaction_facts(&all).await.expect("transactions");
    assert_eq!(
        visit_ids(transactions.into_iter().map(|t| t.visit_id).collect()),
        visits_of(&[6, 7, 8, 9])
    );
    let sessions = store.session_facts(&all).await.expect("sessions");
    assert_eq!(
        sessions.iter().map(|s| s.opened_at).collect::<Vec<_>>(),
        [at(6, 10), at(7, 10), at(8, 10), at(9, 10)]
    );
    let quarantined = store.quarantined(10).await.expect("quarantine");
    assert_eq!(
        quarantined.iter().map(|q| q.seq).collect::<Vec<_>>(),
        [*seqs_by_month[&8].last().expect("orphan")],
        "the May quarantine goes, August's stays"
    );
    assert_eq!(
        store.rollups(&stats::RollupQuery::default()).await.expect("rollups"),
        rollups_before,
        "rollups are kept"
    );
    let again = store.apply_retention(&policy, at(9, 20)).await.expect("retention again");
    assert!(again.is_empty(), "nothing more to remove: {again:?}");

    // Events the projector has not consumed yet stay, whatever their age: a visit in July (now
    // past the cut-off) and one in April (long past it).
    let late_july = ingest_at(
        store,
        agent.id,
        &crate::testing::visit_events(VisitId::new(), at(7, 12), &[]),
        at(7, 12),
    )
    .await;
    let late_april = ingest_at(
        store,
        agent.id,
        &crate::testing::visit_events(VisitId::new(), at(4, 12), &[]),
        at(4, 12),
    )
    .await;
    let events_only = RetentionPolicy { events_days: 60, facts_days: 0 };
    let report = store.apply_retention(&events_only, at(10, 20)).await.expect("retention");
    assert_eq!(report.unprojected_kept as usize, late_july.len() + late_april.len());
    let stored = stored_seqs().await;
    assert!(
        late_july.iter().chain(&late_april).all(|seq| stored.contains(seq)),
        "unprojected events are kept: {stored:?}"
    );
    assert!(seqs_of(&[8, 9]).is_subset(&stored), "events from August on are kept");
    assert_eq!(store.visit_facts(&all).await.expect("facts").len(), 4, "facts kept forever");

    // Once projected they go like the rest.
    crate::stats::catch_up(store, &Default::default()).await.expect("project");
    let report = store.apply_retention(&events_only, at(10, 20)).await.expect("retention");
    assert_eq!(report.unprojected_kept, 0);
    assert_eq!(stored_seqs().await, seqs_of(&[8, 9]), "exactly the events before August go");
}

/// Appointments: the capacity a placement names is never exceeded, external references are
/// unique per site, every change bumps the revision and a stale one changes nothing.
pub async fn appointments_keep_capacity_and_revisions(store: &dyn Store) {
    use super::appointments::{AppointmentFilter, AppointmentStatus, NewAppointment, Placement};
    use crate::error::AppointmentRefusal;
    use meridian_shared::{AppointmentId, Code};
    let sfo = SiteCode::parse("SFO").expect("site");
    let acc = Code::parse("ACC").expect("service");
    let day = chrono::NaiveDate::from_ymd_opt(2026, 11, 3).expect("day");
    let place = |hour: u32, minute: u32| Placement {
        starts_at: Utc.with_ymd_and_hms(2026, 11, 3, hour, minute, 0).single().expect("time"),
        local_start: day.and_hms_opt(hour, minute, 0).expect("local"),
        duration_minutes: 15,
        capacity: 2,
    };
    let new = |name: &str, placement: Placement, reference: Option<&str>| NewAppointment {
        id: AppointmentId::new(),
        site: sfo.clone(),
        service: acc.clone(),
        placement,
        customer_name: name.into(),
        customer_contact: None,
        notes: None,
        external_ref: reference.map(str::to_owned),
        at: t0(),
    };
    let refusal = |r: Result<_>| match r {
        Err(Error::Appointment(refusal)) => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let a =
        store.book_appointment(&new("Ann", place(9, 0), Some("CRM-1")), None).await.expect("book");
    assert_eq!(
        (a.revision, a.status, a.start.as_str()),
        (1, AppointmentStatus::Booked, "2026-11-03T09:00")
    );
    assert_eq!(store.appointment(a.id).await.expect("get"), Some(a.clone()));
    let b = store.book_appointment(&new("Bo", place(9, 0), None), None).await.expect("book");
    assert_eq!(
        refusal(store.book_appointment(&new("Cy", place(9, 0), None), None).await),
        AppointmentRefusal::SlotFull { capacity: 2 }
    );
    assert_eq!(
        refusal(store.book_appointment(&new("Cy", place(9, 15), Some("CRM-1")), None).await),
        AppointmentRefusal::ExternalRefTaken("CRM-1".into())
    );
    let held = store.held_seats(&sfo, &acc, day).await.expect("held");
    assert_eq!(held.iter().map(|h| h.count).sum::<u32>(), 2);

    // Reschedule: stale revision refused; into its own full slot fine; revision bumped.
    assert_eq!(
        refusal(store.reschedule_appointment(a.id, 7, &place(9, 15), t0(), None).await),
        AppointmentRefusal::StaleRevision { expected: 7, current: 1 }
    );
    let same = store.reschedule_appointment(b.id, 1, &place(9, 0), t0(), None).await.expect("same");
    assert_eq!(same.revision, 2);
    let moved =
        store.reschedule_appointment(a.id, 1, &place(9, 15), t0(), None).await.expect("move");
    assert_eq!((moved.revision, moved.start.as_str()), (2, "2026-11-03T09:15"));
    let c = store.book_appointment(&new("Cy", place(9, 15), None), None).await.expect("book");
    assert_eq!(
        refusal(store.reschedule_appointment(b.id, 2, &place(9, 15), t0(), None).await),
        AppointmentRefusal::SlotFull { capacity: 2 }
    );
    let unknown =
        store.reschedule_appointment(AppointmentId::new(), 1, &place(9, 0), t0(), None).await;
    assert!(matches!(unknown, Err(Error::NotFound(_))), "{unknown:?}");

    // Cancel: frees the seat; cannot happen twice.
    let cancelled =
        store.cancel_appointment(c.id, Some(1), Some("ill"), t0(), None).await.expect("cancel");
    assert_eq!(
        (cancelled.status, cancelled.revision, cancelled.cancel_reason.as_deref()),
        (AppointmentStatus::Cancelled, 2, Some("ill"))
    );
    assert_eq!(
        refusal(store.cancel_appointment(c.id, None, None, t0(), None).await),
        AppointmentRefusal::AlreadyCancelled
    );
    assert_eq!(
        refusal(store.reschedule_appointment(c.id, 2, &place(9, 30), t0(), None).await),
        AppointmentRefusal::AlreadyCancelled
    );
    store.reschedule_appointment(b.id, 2, &place(9, 15), t0(), None).await.expect("seat freed");

    let list = |from: Option<chrono::NaiveDate>, status: Option<AppointmentStatus>| {
        let filter = AppointmentFilter {
            site: Some(sfo.clone()),
            from_day: from,
            to_day: from,
            status,
            conflict: None,
            limit: 100,
        };
        async move {
            // Same start: the order among them is by id; compare as sets.
            let mut names: Vec<String> = store
                .list_appointments(&filter)
                .await
                .expect("list")
                .into_iter()
                .map(|a| a.customer_name)
                .collect();
            names.sort();
            names
        }
    };
    assert_eq!(list(Some(day), None).await, ["Ann", "Bo", "Cy"]);
    assert_eq!(list(Some(day), Some(AppointmentStatus::Cancelled)).await, ["Cy"]);
    assert!(list(day.succ_opt(), None).await.is_empty());
}

/// Same-day live sync: a change to an appointment of the site's current day appends one
/// `APPOINTMENT_UPSERT` with its new state to every active agent of the site, in order; a
/// change that touches only later days or a refused change appends nothing.
pub async fn appointments_of_today_go_live_to_the_sites_agents(store: &dyn Store) {
    use super::appointments::{AppointmentStatus, LiveSync, NewAppointment, Placement};
    use meridian_shared::commands::{APPOINTMENT_UPSERT, ControllerCommand};
    use meridian_shared::{AppointmentId, Code};
    store.commit_config(commit(0, vec![site("SFO"), site("CHI")], &[])).await.expect("config");
    let sfo = enroll_agent(store, "SFO", "s").await;
    let chi = enroll_agent(store, "CHI", "c").await;
    let first = store.agent(sfo.id).await.expect("get").expect("agent").command_seq;
    let today = chrono::NaiveDate::from_ymd_opt(2026, 11, 2).expect("day");
    let live = LiveSync { today, queue: Some(Code::parse("accounts").expect("queue")) };
    let place = |day: chrono::NaiveDate, hour: u32| Placement {
        starts_at: Utc.from_utc_datetime(&day.and_hms_opt(hour, 0, 0).expect("time")),
        local_start: day.and_hms_opt(hour, 0, 0).expect("local"),
        duration_minutes: 15,
        capacity: 1,
    };
    let new = |placement: Placement| NewAppointment {
        id: AppointmentId::new(),
        site: SiteCode::parse("SFO").expect("site"),
        service: Code::parse("ACC").expect("service"),
        placement,
        customer_name: "Ann".into(),
        customer_contact: Some("ann@example.com".into()),
        notes: None,
        external_ref: None,
        at: t0(),
    };
    let tomorrow = today.succ_opt().expect("tomorrow");
    let sfo_id = sfo.id;
    let sent = || async move {
        store
            .commands_after(sfo_id, first, 100)
            .await
            .expect("commands")
            .into_iter()
            .map(|c| match ControllerCommand::decode(&c.kind, &c.payload) {
                Ok(ControllerCommand::UpsertAppointment(a)) => {
                    (c.seq, a.id, a.local_day, a.status, a.revision, a.queue)
                }
                other => panic!("unexpected command {other:?}"),
            })
            .collect::<Vec<_>>()
    };

    let later = store.book_appointment(&new(place(tomorrow, 10)), Some(&live)).await.expect("b");
    assert!(sent().await.is_empty(), "a booking for tomorrow waits for the nightly sync");
    let a = store.book_appointment(&new(place(today, 10)), Some(&live)).await.expect("book");
    let full = store.book_appointment(&new(place(today, 10)), Some(&live)).await;
    assert!(full.is_err(), "the slot holds one");
    let moved = store
        .reschedule_appointment(a.id, 1, &place(tomorrow, 11), t0(), Some(&live))
        .await
        .expect("move away from today");
    let back = store
        .reschedule_appointment(later.id, 1, &place(today, 12), t0(), Some(&live))
        .await
        .expect("move to today");
    store
        .reschedule_appointment(moved.id, 2, &place(tomorrow, 12), t0(), Some(&live))
        .await
        .expect("move within tomorrow");
    store.cancel_appointment(back.id, Some(2), None, t0(), Some(&live)).await.expect("cancel");
    let q = live.queue.clone();
    assert_eq!(
        sent().await,
        [
            (first + 1, a.id, today, AppointmentStatus::Booked, 1, q.clone()),
            (first + 2, a.id, tomorrow, AppointmentStatus::Booked, 2, q.clone()),
            (first + 3, later.id, today, AppointmentStatus::Booked, 2, q.clone()),
            (first + 4, later.id, today, AppointmentStatus::Cancelled, 3, q),
        ]
    );
    let cmds = store.commands_after(sfo_id, first, 100).await.expect("commands");
    assert!(cmds.iter().all(|c| c.kind == APPOINTMENT_UPSERT));
    let chi_now = store.agent(chi.id).await.expect("get").expect("agent");
    assert_eq!(chi_now.command_seq, chi.command_seq, "another site's agent gets nothing");
}

/// Attendance flows back: `APPOINTMENT_STATUS` events update the central appointment in the
/// ingest transaction, exactly once (a replayed sequence changes nothing); an attended
/// appointment can no longer be moved or cancelled; and the conflict rules: a cancel or a
/// reschedule central made before it heard of the branch's check-in keeps the attendance and is
/// flagged (`?conflict=true` lists them), while a sweep's no-show of a time central has since
/// moved is stale and ignored. Another site's agent cannot touch the appointment.
pub async fn appointment_attendance_flows_back_with_the_conflict_rules(store: &dyn Store) {
    use super::appointments::{AppointmentFilter, AppointmentStatus, NewAppointment, Placement};
    use crate::error::AppointmentRefusal;
    use meridian_shared::check_in::{AppointmentState, Attendance, Conflict};
    use meridian_shared::events::{AgentEvent, AppointmentStatusChanged};
    use meridian_shared::{AppointmentId, Code, VisitId};
    store.commit_config(commit(0, vec![site("SFO"), site("CHI")], &[])).await.expect("config");
    let sfo = enroll_agent(store, "SFO", "s").await;
    let chi = enroll_agent(store, "CHI", "c").await;
    let day = chrono::NaiveDate::from_ymd_opt(2026, 11, 3).expect("day");
    let place = |hour: u32, minute: u32| Placement {
        starts_at: Utc.with_ymd_and_hms(2026, 11, 3, hour, minute, 0).single().expect("time"),
        local_start: day.and_hms_opt(hour, minute, 0).expect("local"),
        duration_minutes: 15,
        capacity: 5,
    };
    let book = |name: &str, hour: u32| {
        let new = NewAppointment {
            id: AppointmentId::new(),
            site: SiteCode::parse("SFO").expect("site"),
            service: Code::parse("ACC").expect("service"),
            placement: place(hour, 0),
            customer_name: name.into(),
            customer_contact: None,
            notes: None,
            external_ref: None,
            at: t0(),
        };
        async move { store.book_appointment(&new, None).await.expect("book") }
    };
    let event =
        |seq: u64, id: AppointmentId, status: Attendance, visit: Option<VisitId>, revision: u64| {
            let ev = AgentEvent::AppointmentStatus(AppointmentStatusChanged {
                appointment_id: id,
                status,
                visit_id: visit,
                ticket: visit.map(|_| "B101".to_owned()),
                revision,
                at: t0() + Duration::minutes(seq as i64),
            });
            IncomingEvent {
                seq,
                kind: ev.kind().into(),
                occurred_at: t0() + Duration::minutes(seq as i64),
                payload: String::from_utf8(ev.payload()).expect("utf-8"),
                quarantine: None,
            }
        };
    let get = |id: AppointmentId| async move {
        store.appointment(id).await.expect("get").expect("appointment")
    };
    let refusal = |r: Result<super::appointments::Appointment>| match r {
        Err(Error::Appointment(refusal)) => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    };

    let a = book("Ann", 9).await;
    let c = book("Cy", 10).await;
    let r = book("Ria", 11).await;
    let seen = book("Sam", 12).await;
    let n = book("Ned", 13).await;
    assert_eq!((a.state, a.attendance, a.conflict), (AppointmentState::Created, None, None));
    assert_eq!(a.reference, a.id.reference());

    // The plain flow: arrived, called, completed, in one batch with a visit event.
    let visit = VisitId::new();
    let mut batch = events(1..=1);
    batch.push(event(2, a.id, Attendance::Arrived, Some(visit), 1));
    batch.push(event(3, a.id, Attendance::Called, Some(visit), 1));
    let acked = store.ingest_events(sfo.id, &batch, t0()).await.expect("store").expect("ingest");
    assert_eq!(acked, 3);
    let now_a = get(a.id).await;
    assert_eq!(
        (now_a.attendance, now_a.state),
        (Some(Attendance::Called), AppointmentState::Called)
    );
    assert_eq!(now_a.visit_id, Some(visit.to_string()));
    assert_eq!(now_a.ticket.as_deref(), Some("B101"));
    assert_eq!(now_a.arrived_at, Some(t0() + Duration::minutes(2)));
    assert_eq!(now_a.revision, 1, "attendance is not a booking change");
    let done = event(4, a.id, Attendance::Completed, Some(visit), 1);
    store.ingest_events(sfo.id, &[done], t0()).await.expect("store").expect("ingest");
    // A resent, already stored event (the agent resends from its acknowledgement) changes
    // nothing: exactly once.
    store.ingest_events(sfo.id, &batch[1..], t0()).await.expect("store").expect("ingest");
    let now_a = get(a.id).await;
    assert_eq!(
        (now_a.attendance, now_a.state),
        (Some(Attendance::Completed), AppointmentState::Completed)
    );
    assert_eq!(now_a.attendance_at, Some(t0() + Duration::minutes(4)));
    assert_eq!(now_a.conflict, None);
    // Attended: central can no longer move or cancel it.
    assert_eq!(
        refusal(store.reschedule_appointment(a.id, 1, &place(9, 30), t0(), None).await),
        AppointmentRefusal::AlreadyAttended(Attendance::Completed)
    );
    assert_eq!(
        refusal(store.cancel_appointment(a.id, None, None, t0(), None).await),
        AppointmentRefusal::AlreadyAttended(Attendance::Completed)
    );

    // Cancelled centrally while the branch (offline) had checked the customer in.
    store.cancel_appointment(c.id, None, None, t0(), None).await.expect("cancel");
    // Rescheduled centrally likewise; and one the branch heard of before the check-in.
    store.reschedule_appointment(r.id, 1, &place(11, 30), t0(), None).await.expect("move");
    store.reschedule_appointment(seen.id, 1, &place(12, 30), t0(), None).await.expect("move");
    // Moved centrally after the branch's sweep judged its old time a no-show.
    store.reschedule_appointment(n.id, 1, &place(13, 30), t0(), None).await.expect("move");
    let batch = [
        event(5, c.id, Attendance::Arrived, Some(VisitId::new()), 1),
        event(6, r.id, Attendance::Arrived, Some(VisitId::new()), 1),
        event(7, seen.id, Attendance::Arrived, Some(VisitId::new()), 2),
        event(8, n.id, Attendance::NoShow, None, 1),
        event(9, c.id, Attendance::Called, Some(VisitId::new()), 2),
    ];
    store.ingest_events(sfo.id, &batch, t0()).await.expect("store").expect("ingest");
    let now_c = get(c.id).await;
    assert_eq!(now_c.status, AppointmentStatus::Cancelled);
    assert_eq!(
        (now_c.attendance, now_c.state),
        (Some(Attendance::Called), AppointmentState::Called)
    );
    assert_eq!(now_c.conflict, Some(Conflict::CancelledAfterArrival));
    assert_eq!(now_c.conflict_at, Some(t0() + Duration::minutes(5)), "flagged when first seen");
    let now_r = get(r.id).await;
    assert_eq!(
        (now_r.attendance, now_r.state),
        (Some(Attendance::Arrived), AppointmentState::Arrived)
    );
    assert_eq!(
        (now_r.conflict, now_r.rescheduled),
        (Some(Conflict::RescheduledAfterArrival), true)
    );
    let now_seen = get(seen.id).await;
    assert_eq!((now_seen.attendance, now_seen.conflict), (Some(Attendance::Arrived), None));
    let now_n = get(n.id).await;
    assert_eq!((now_n.attendance, now_n.state), (None, AppointmentState::Rescheduled));

    // Another site's agent, and a quarantined event, change nothing.
    let mut stray = event(1, n.id, Attendance::Arrived, Some(VisitId::new()), 2);
    store.ingest_events(chi.id, &[stray.clone()], t0()).await.expect("store").expect("ingest");
    stray.seq = 10;
    stray.quarantine = Some("bad".into());
    store.ingest_events(sfo.id, &[stray], t0()).await.expect("store").expect("ingest");
    assert_eq!(get(n.id).await.attendance, None);

    let flagged = |conflict: Option<bool>| {
        let filter = AppointmentFilter { conflict, limit: 100, ..Default::default() };
        async move {
            store
                .list_appointments(&filter)
                .await
                .expect("list")
                .into_iter()
                .map(|x| x.customer_name)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(flagged(Some(true)).await, ["Cy", "Ria"]);
    assert_eq!(flagged(Some(false)).await, ["Ann", "Sam", "Ned"]);
    assert_eq!(flagged(None).await.len(), 5);
}

/// Conflict rule 3: a closure the branch decided on its own (`BRANCH_CLOSED`, applied in the
/// ingest transaction) flags the appointments central booked into it before it knew
/// (`slot_closed_at_branch`) and refuses bookings and reschedules into it while open; a
/// withdrawal (`BRANCH_REOPENED`) lets bookings in again and leaves the flags for admins.
pub async fn branch_closures_flag_earlier_bookings_and_refuse_new_ones(store: &dyn Store) {
    use super::appointments::{NewAppointment, Placement};
    use crate::error::{AppointmentRefusal, Error};
    use meridian_shared::check_in::Conflict;
    use meridian_shared::closures::{BranchClosed, BranchReopened, Closure};
    use meridian_shared::events::AgentEvent;
    use meridian_shared::{AppointmentId, Code};
    store.commit_config(commit(0, vec![site("SFO"), site("CHI")], &[])).await.expect("config");
    let sfo = enroll_agent(store, "SFO", "s").await;
    let chi = enroll_agent(store, "CHI", "c").await;
    let day = chrono::NaiveDate::from_ymd_opt(2026, 11, 3).expect("day");
    let place = |hour: u32, minute: u32| Placement {
        starts_at: Utc.with_ymd_and_hms(2026, 11, 3, hour, minute, 0).single().expect("time"),
        local_start: day.and_hms_opt(hour, minute, 0).expect("local"),
        duration_minutes: 15,
        capacity: 5,
    };
    let new = |site: &str, hour: u32, minute: u32| NewAppointment {
        id: AppointmentId::new(),
        site: SiteCode::parse(site).expect("site"),
        service: Code::parse("ACC").expect("service"),
        placement: place(hour, minute),
        customer_name: format!("Customer {hour}:{minute}"),
        customer_contact: None,
        notes: None,
        external_ref: None,
        at: t0(),
    };
    let inside = store.book_appointment(&new("SFO", 14, 30), None).await.expect("book");
    let edge = store.book_appointment(&new("SFO", 13, 45), None).await.expect("book");
    let after = store.book_appointment(&new("SFO", 16, 0), None).await.expect("book");
    let gone = store.book_appointment(&new("SFO", 15, 0), None).await.expect("book");
    store.cancel_appointment(gone.id, None, None, t0(), None).await.expect("cancel");
    let other_site = store.book_appointment(&new("CHI", 14, 30), None).await.expect("book");
    let closure = Closure {
        id: uuid::Uuid::now_v7(),
        day,
        from: chrono::NaiveTime::from_hms_opt(14, 0, 0).expect("time"),
        to: chrono::NaiveTime::from_hms_opt(16, 0, 0).expect("time"),
        reason: "two staff ill".into(),
    };
    let event = |seq: u64, ev: AgentEvent| IncomingEvent {
        seq,
        kind: ev.kind().into(),
        occurred_at: t0(),
        payload: String::from_utf8(ev.payload()).expect("utf-8"),
        quarantine: None,
    };
    let closed =
        event(1, AgentEvent::BranchClosed(BranchClosed { closure: closure.clone(), at: t0() }));
    store
        .ingest_events(sfo.id, std::slice::from_ref(&closed), t0())
        .await
        .expect("ingest")
        .expect("stored");
    store.ingest_events(sfo.id, &[closed], t0()).await.expect("again").expect("stored");
    let conflict = |id: AppointmentId| async move {
        store.appointment(id).await.expect("get").expect("appointment").conflict
    };
    assert_eq!(conflict(inside.id).await, Some(Conflict::SlotClosedAtBranch));
    for untouched in [edge.id, after.id, gone.id, other_site.id] {
        assert_eq!(conflict(untouched).await, None);
    }
    let listed = store.site_closures(None, day, day).await.expect("closures");
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].site.as_str(), &listed[0].closure), ("SFO", &closure));
    assert!(listed[0].reopened_at.is_none());

    // While open: bookings and moves into it are refused, outside it and at CHI allowed.
    let refused = |r: crate::error::Result<super::appointments::Appointment>| match r {
        Err(Error::Appointment(AppointmentRefusal::SlotClosed { from, to, reason })) => {
            (from, to, reason)
        }
        other => panic!("expected slot_closed, got {other:?}"),
    };
    let expected = ("14:00".to_owned(), "16:00".to_owned(), "two staff ill".to_owned());
    assert_eq!(refused(store.book_appointment(&new("SFO", 15, 45), None).await), expected);
    assert_eq!(
        refused(store.reschedule_appointment(after.id, 1, &place(14, 0), t0(), None).await),
        expected
    );
    store.book_appointment(&new("SFO", 16, 15), None).await.expect("after the closure");
    store.book_appointment(&new("CHI", 15, 0), None).await.expect("another site");

    // Withdrawn: bookable again; the flag stays for admins.
    let reopened =
        event(2, AgentEvent::BranchReopened(BranchReopened { closure_id: closure.id, at: t0() }));
    store.ingest_events(sfo.id, &[reopened], t0()).await.expect("ingest").expect("stored");
    store.book_appointment(&new("SFO", 15, 45), None).await.expect("reopened");
    assert_eq!(conflict(inside.id).await, Some(Conflict::SlotClosedAtBranch));
    let listed = store.site_closures(Some(&SiteCode::parse("SFO").expect("site")), day, day).await;
    assert!(listed.expect("closures")[0].reopened_at.is_some());
    // A closure reported by another site's agent is that site's.
    let chi_closure = Closure { id: uuid::Uuid::now_v7(), ..closure };
    let ev = event(1, AgentEvent::BranchClosed(BranchClosed { closure: chi_closure, at: t0() }));
    store.ingest_events(chi.id, &[ev], t0()).await.expect("ingest").expect("stored");
    assert_eq!(conflict(other_site.id).await, Some(Conflict::SlotClosedAtBranch));
}

/// A release is stored whole (row and chunks in one transaction) once per (version, platform),
/// listed newest version first, read back chunk by chunk from any index, and deleted with its
/// chunks; chunks not laid out as the store keeps them are refused with nothing stored.
pub async fn releases_are_stored_whole_and_read_by_chunk(store: &dyn Store) {
    use super::releases::{NewRelease, RELEASE_CHUNK_BYTES};
    let chunk = RELEASE_CHUNK_BYTES;
    let new = |version: &str, platform: &str, size: u64| NewRelease {
        manifest: meridian_shared::releases::ReleaseManifest {
            version: version.into(),
            platform: platform.into(),
            sha256: "ab".repeat(32),
            size,
            key_id: "0123456789abcdef".into(),
            signature: "c2ln".into(),
            notes: "notes".into(),
        },
        uploaded_by: "admin".into(),
        uploaded_at: t0(),
    };
    let data: Vec<Vec<u8>> = vec![vec![1; chunk], vec![2; chunk], vec![3; 10]];
    let size = (2 * chunk + 10) as u64;
    let stored = store.create_release(&new("1.4.0", "x86_64-linux", size), &data).await;
    let stored = stored.expect("stored");
    assert_eq!((stored.size, stored.chunk_count()), (size, 3));
    assert_eq!(stored.manifest(), new("1.4.0", "x86_64-linux", size).manifest);
    assert_eq!(store.release("1.4.0", "x86_64-linux").await.expect("read"), Some(stored.clone()));
    // Once per (version, platform).
    let again = store.create_release(&new("1.4.0", "x86_64-linux", 10), &[vec![9; 10]]).await;
    assert!(matches!(again, Err(Error::Conflict(_))), "{again:?}");
    // Chunks not laid out as stored: refused, nothing kept.
    for (chunks, size) in [
        (vec![vec![1; 10], vec![2; 10]], 20),
        (vec![vec![1; chunk + 1]], chunk as u64 + 1),
        (vec![vec![1; 10]], 11),
        (vec![], 0),
    ] {
        let refused = store.create_release(&new("1.5.0", "x86_64-linux", size), &chunks).await;
        assert!(matches!(refused, Err(Error::Internal(_))), "{refused:?}");
    }
    assert!(store.release("1.5.0", "x86_64-linux").await.expect("read").is_none());
    store.create_release(&new("1.10.0", "x86_64-linux", 5), &[vec![5; 5]]).await.expect("stored");
    store.create_release(&new("1.4.0", "aarch64-linux", 5), &[vec![6; 5]]).await.expect("stored");
    let listed: Vec<(String, String)> = store
        .list_releases()
        .await
        .expect("list")
        .into_iter()
        .map(|r| (r.version, r.platform))
        .collect();
    let pair = |v: &str, p: &str| (v.to_owned(), p.to_owned());
    assert_eq!(
        listed,
        [
            pair("1.10.0", "x86_64-linux"),
            pair("1.4.0", "aarch64-linux"),
            pair("1.4.0", "x86_64-linux")
        ]
    );
    let of_version = store.releases_of_version("1.4.0").await.expect("version");
    assert_eq!(
        of_version.iter().map(|r| r.platform.as_str()).collect::<Vec<_>>(),
        ["aarch64-linux", "x86_64-linux"]
    );
    // Chunks from any index, in order, with their indexes; nothing past the end.
    let page = store.release_chunks(stored.id, 1, 5).await.expect("chunks");
    assert_eq!(page, vec![(1, data[1].clone()), (2, data[2].clone())]);
    assert_eq!(
        store.release_chunks(stored.id, 0, 1).await.expect("chunks"),
        vec![(0, data[0].clone())]
    );
    assert!(store.release_chunks(stored.id, 3, 5).await.expect("chunks").is_empty());
    // Deleted with its chunks; other releases stay.
    assert!(store.delete_release("1.4.0", "x86_64-linux").await.expect("delete"));
    assert!(!store.delete_release("1.4.0", "x86_64-linux").await.expect("delete"));
    assert!(store.release_chunks(stored.id, 0, 5).await.expect("chunks").is_empty());
    assert_eq!(store.list_releases().await.expect("list").len(), 2);
}

pub async fn session_repairs_are_atomic_and_incidents_acknowledged_once(store: &dyn Store) {
    use crate::store::sessions::{Incident, IncidentFilter, IncidentKind, SessionRepair};
    use meridian_shared::lineage::{Gap, Segment};
    store.commit_config(commit(0, vec![site("SFO")], &["SFO"])).await.expect("c");
    let agent = enroll_agent(store, "SFO", "lineage").await;
    let created: Vec<IncomingEvent> = (1..=6u64)
        .map(|seq| IncomingEvent {
            seq,
            kind: "VISIT_CREATED".into(),
            occurred_at: t0(),
            payload: format!(
                "{{\"visit_id\":\"{}\",\"ticket\":\"A{seq:03}\",\"service\":\"GEN\",\
                 \"queue\":\"{}\",\"business_day\":\"2026-11-02\",\
                 \"created_at\":\"2026-11-02T09:00:00Z\"}}",
                meridian_shared::VisitId::new(),
                if seq % 2 == 0 { "general" } else { "accounts" }
            ),
            quarantine: None,
        })
        .collect();
    assert_eq!(store.ingest_events(agent.id, &created, t0()).await.expect("ingest"), Ok(6));

    // The command at the agent's head, by its nonce.
    let head = store.commands_after(agent.id, 0, 10).await.expect("commands");
    assert!(head[0].nonce > 0, "every logged command has a nonce");
    let state = store.session_state(agent.id, 0, &[head[0].seq, 99]).await.expect("state");
    assert_eq!(state.acked, 6);
    assert_eq!(state.nonces.into_iter().collect::<Vec<_>>(), [(head[0].seq, head[0].nonce)]);
    assert!(state.lineage.is_empty() && state.gaps.is_empty());

    // A lineage written, then read from the segment covering floor + 1.
    let seg = |id, first_seq| Segment { id, first_seq, origin: None };
    let repair = |expected, acked, from, lineage: Vec<Segment>, incidents| SessionRepair {
        expected_acked: expected,
        acked,
        lineage_from: from,
        lineage,
        incidents,
    };
    let origin = meridian_shared::lineage::Origin { keep_through: 2, base: 3, moved_head: 7 };
    let lineage = vec![seg(11, 1), Segment { origin: Some(origin), ..seg(12, 4) }, seg(13, 9)];
    assert!(
        store.repair_session(agent.id, &repair(6, 6, 1, lineage.clone(), vec![])).await.expect("r")
    );
    assert_eq!(store.session_state(agent.id, 0, &[]).await.expect("s").lineage, lineage);
    assert_eq!(store.session_state(agent.id, 5, &[]).await.expect("s").lineage, lineage[1..]);
    assert_eq!(store.session_state(agent.id, 8, &[]).await.expect("s").lineage, lineage[2..]);

    // A repair made from a stale acknowledgement writes nothing.
    let gap = Incident {
        gap: Some(Gap { first: 7, last: 20 }),
        ..Incident::new(agent.id, "SFO", IncidentKind::EventGap, "gap of 14 events".into(), t0())
    };
    let stale = repair(5, 20, 9, vec![seg(14, 9)], vec![gap.clone()]);
    assert!(!store.repair_session(agent.id, &stale).await.expect("stale"));
    assert_eq!(store.agent(agent.id).await.expect("a").expect("agent").acked_seq, 6);
    assert!(
        store
            .incidents(&IncidentFilter { limit: 10, ..Default::default() })
            .await
            .expect("l")
            .is_empty()
    );

    // A gap moves the acknowledgement with its incident, in one go.
    let fixed = repair(6, 20, 9, vec![seg(14, 9)], vec![gap.clone()]);
    assert!(store.repair_session(agent.id, &fixed).await.expect("gap"));
    let row = store.agent(agent.id).await.expect("a").expect("agent");
    assert_eq!((row.acked_seq, row.open_incidents), (20, 1));
    assert_eq!(row.incident.as_deref(), Some("gap of 14 events"));
    let state = store.session_state(agent.id, 0, &[]).await.expect("s");
    assert_eq!(state.lineage, [lineage[0], lineage[1], seg(14, 9)]);
    assert_eq!(state.gaps, [Gap { first: 7, last: 20 }]);
    assert!(store.session_state(agent.id, 20, &[]).await.expect("s").gaps.is_empty());

    let at = |seqs: &[u64]| -> Vec<IncomingEvent> {
        seqs.iter().map(|&seq| IncomingEvent { seq, ..created[0].clone() }).collect()
    };
    assert_eq!(store.ingest_events(agent.id, &at(&[21]), t0()).await.expect("i"), Ok(21));
    // A batch steps over a recorded gap, and over nothing else.
    let later = Incident {
        gap: Some(Gap { first: 25, last: 30 }),
        ..Incident::new(agent.id, "SFO", IncidentKind::EventGap, "gap of 6 events".into(), t0())
    };
    let no_lineage = u64::MAX >> 1;
    assert!(
        store
            .repair_session(agent.id, &repair(21, 21, no_lineage, vec![], vec![later]))
            .await
            .expect("r")
    );
    assert_eq!(
        store.ingest_events(agent.id, &at(&[22, 23, 24, 31]), t0()).await.expect("i"),
        Ok(31)
    );
    assert_eq!(
        store.ingest_events(agent.id, &at(&[33]), t0()).await.expect("i"),
        Err(IngestError::Gap { first: 33, acked: 31 })
    );
    assert_eq!(
        store.ingest_events(agent.id, &at(&[32, 34]), t0()).await.expect("i"),
        Err(IngestError::NotContiguous(34))
    );

    let open = IncidentFilter { agent: Some(agent.id.to_string()), open_only: true, limit: 10 };
    let listed = store.incidents(&open).await.expect("list");
    assert_eq!(listed.len(), 2);
    let listed: Vec<Incident> = listed.into_iter().filter(|i| i.id == gap.id).collect();
    assert_eq!((listed[0].kind, listed[0].gap), (IncidentKind::EventGap, gap.gap));
    assert!(store.acknowledge_incident(&gap.id, "ops", t0()).await.expect("ack"));
    assert!(!store.acknowledge_incident(&gap.id, "ops", t0()).await.expect("ack again"));
    assert_eq!(store.incidents(&open).await.expect("list").len(), 1);
    let row = store.agent(agent.id).await.expect("a").expect("agent");
    assert_eq!((row.open_incidents, row.incident.as_deref()), (1, Some("gap of 6 events")));
    let all =
        store.incidents(&IncidentFilter { limit: 10, ..Default::default() }).await.expect("l");
    let acknowledged = all.iter().find(|i| i.id == gap.id).expect("listed");
    assert_eq!(acknowledged.acknowledged_by.as_deref(), Some("ops"));

    // The last ticket per queue and day after a sequence.
    let floors = store.ticket_floors(agent.id, 2, t0() - Duration::days(1)).await.expect("floors");
    // (seqs 21–31 repeat the first event: queue "accounts", ticket A001)
    let floors: Vec<(String, String)> = floors.into_iter().map(|f| (f.queue, f.ticket)).collect();
    assert_eq!(floors, [("accounts".into(), "A001".into()), ("general".into(), "A006".into())]);
}

pub use super::console_sessions::console_sessions_end_with_their_token_expiry_or_sign_out;

/// Generates one `#[tokio::test]` per conformance case; `$make` is an async expression that
/// yields a fresh, empty `Arc<dyn Store>`.
#[macro_export]
macro_rules! store_conformance_suite {
    ($make:expr) => {
        $crate::store_conformance_suite!(@cases $make;
            config_commits_are_atomic_and_versioned,
            api_tokens_roundtrip,
            enrollment_is_one_time_and_replaces_hardware,
            config_commits_enqueue_commands_for_active_agents,
            ingest_is_idempotent_and_gapless,
            agent_status_updates_are_partial,
            facts_project_events_exactly_once_and_rebuild_identically,
            retention_removes_old_months_but_never_unprojected_events,
            appointments_keep_capacity_and_revisions,
            appointments_of_today_go_live_to_the_sites_agents,
            appointment_attendance_flows_back_with_the_conflict_rules,
            branch_closures_flag_earlier_bookings_and_refuse_new_ones,
            releases_are_stored_whole_and_read_by_chunk,
            session_repairs_are_atomic_and_incidents_acknowledged_once,
            console_sessions_end_with_their_token_expiry_or_sign_out,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                let store: std::sync::Arc<dyn $crate::store::Store> = $make.await;
                $crate::store::conformance::$case(store.as_ref()).await;
            }
        )*
    };
}
