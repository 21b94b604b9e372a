//! The start of a session: what the agent reports in Hello is compared with what the
//! controller holds, and what a store restored from a backup on either end broke is repaired
//! (`meridian_shared::lineage` decides; `store::sessions` writes; incidents make it visible).

use chrono::Utc;

use super::{End, Session};
use crate::config_admin;
use crate::error::Error;

/// Where a session's streams start, after the reconciliation.
pub(super) struct SessionStart {
    /// Central's acknowledgement of the agent's events (sent in the Welcome).
    pub(super) acked: u64,
    pub(super) resequence: Vec<meridian_proto::Resequence>,
    pub(super) ticket_floors: Vec<meridian_proto::TicketFloor>,
    /// Commands are streamed after this sequence.
    pub(super) command_cursor: u64,
    pub(super) command_rebase_to: Option<u64>,
}

impl Session {
    /// Compares what the agent reports in `hello` with what the controller holds, repairs what
    /// a restored store on either end broke (`meridian_shared::lineage` decides; incidents make
    /// it visible) and returns where both streams continue.
    pub(super) async fn reconcile(
        &self,
        hello: &meridian_proto::Hello,
    ) -> Result<SessionStart, End> {
        use meridian_shared::lineage::{self, CommandPlan, EventPlan};
        let report = lineage::AgentOutbox {
            acked: hello.outbox_acked.min(hello.outbox_high_water),
            high_water: hello.outbox_high_water,
            oldest_retained: hello
                .outbox_oldest
                .clamp(1, hello.outbox_high_water.saturating_add(1)),
            lineage: hello
                .lineage
                .iter()
                .map(|s| lineage::Segment {
                    id: s.id,
                    first_seq: s.first_seq,
                    origin: (s.origin_base > 0).then_some(lineage::Origin {
                        keep_through: s.origin_keep_through,
                        base: s.origin_base,
                        moved_head: s.origin_moved_head,
                    }),
                })
                .collect(),
            holes: hello
                .holes
                .iter()
                .map(|h| lineage::Gap { first: h.first, last: h.last })
                .collect(),
        };
        lineage::validate(&report.lineage)
            .and_then(|()| lineage::validate_holes(&report.holes))
            .map_err(|e| End::Protocol("bad_lineage", e.to_string()))?;
        if hello.applied_checkpoints.len() >= lineage::MAX_CHECKPOINTS {
            return Err(End::Protocol("bad_checkpoints", "too many command checkpoints".into()));
        }
        let head = lineage::AppliedHead {
            seq: hello.last_applied_command_seq,
            nonce: hello.last_applied_command_nonce,
        };
        let checkpoints: Vec<(u64, u64)> =
            hello.applied_checkpoints.iter().map(|c| (c.seq, c.nonce)).collect();
        let mut seqs: Vec<u64> = checkpoints.iter().map(|c| c.0).collect();
        seqs.push(head.seq);
        let floor = report.acked.min(report.oldest_retained - 1);
        let state =
            self.gw.store.session_state(self.agent, floor, &seqs).await.map_err(End::Store)?;
        let central = lineage::CentralEvents {
            acked: state.acked,
            lineage: state.lineage.clone(),
            gaps: state.gaps.clone(),
        };
        let plan = lineage::plan_session(&central, &report, lineage::new_nonce());
        let commands = lineage::plan_commands(state.command_seq, head, &checkpoints, |s| {
            state.nonces.get(&s).copied()
        });
        let (lineage_from, rows) = (plan.lineage_from, plan.lineage.clone());
        let now = Utc::now();
        let incident = |kind, summary: String| {
            crate::store::sessions::Incident::new(self.agent, &self.site, kind, summary, now)
        };
        use crate::store::sessions::IncidentKind;
        let mut incidents = Vec::new();
        let mut acked = state.acked;
        let mut resequence = Vec::new();
        let mut ticket_floors = Vec::new();
        if let Some(first) = plan.steps.first() {
            let moved = match plan.events {
                EventPlan::Resequence { moved, .. } => moved,
                _ => 0,
            };
            tracing::warn!(agent = %self.agent, site = %self.site, steps = plan.steps.len(),
                keep_through = first.keep_through, base = plan.steps.last().map_or(0, |s| s.base),
                moved, agent_high_water = report.high_water,
                "agent store restored from a backup: its unsent events are renumbered above the controller's");
            self.gw.metrics.events_resequenced.inc_by(moved);
            incidents.push(incident(
                IncidentKind::AgentRestored,
                format!(
                    "restored from backup: resequenced {moved} events (the agent's store held \
                     {} events, the controller {})",
                    report.high_water, state.acked
                ),
            ));
            let floors = self
                .gw
                .store
                .ticket_floors(self.agent, first.keep_through, now - chrono::Duration::days(2))
                .await
                .map_err(End::Store)?;
            ticket_floors = floors
                .into_iter()
                .filter_map(|f| {
                    let number =
                        f.ticket.trim_start_matches(|c: char| !c.is_ascii_digit()).parse().ok()?;
                    Some(meridian_proto::TicketFloor {
                        queue: f.queue,
                        business_day: f.business_day,
                        last_number: number,
                    })
                })
                .collect();
            resequence = plan
                .steps
                .iter()
                .map(|s| meridian_proto::Resequence {
                    keep_through: s.keep_through,
                    base: s.base,
                    segment_id: s.segment,
                    moved_head: s.moved_head,
                })
                .collect();
        }
        if let EventPlan::Resend { gaps } = &plan.events {
            tracing::warn!(agent = %self.agent, site = %self.site, controller_acked = state.acked,
                agent_acked = report.acked, gaps = gaps.len(),
                "controller database restored from a dump: the agent sends again what it still holds");
            incidents.push(incident(
                IncidentKind::ControllerRestored,
                format!(
                    "controller restored: the agent sends again its events after {} (it held \
                     {} as stored)",
                    state.acked, report.acked
                ),
            ));
            for gap in gaps {
                tracing::error!(agent = %self.agent, site = %self.site, first = gap.first,
                    last = gap.last, events = gap.len(),
                    "events lost: the agent no longer holds them; gap recorded for an admin to acknowledge");
                self.gw.metrics.events_in_gaps.inc_by(gap.len());
                let mut i = incident(
                    IncidentKind::EventGap,
                    format!(
                        "gap of {} events ({}–{}): the agent no longer held them when the \
                         controller's database came back from a dump; acknowledge to clear",
                        gap.len(),
                        gap.first,
                        gap.last
                    ),
                );
                i.gap = Some(*gap);
                incidents.push(i);
            }
            let mut all = state.gaps.clone();
            all.extend(gaps.iter().copied());
            acked = lineage::skip_gaps(acked, &all);
        }
        let command_cursor = match commands {
            CommandPlan::Continue { cursor } => cursor,
            CommandPlan::Rebase { to } => {
                let resent = state.command_seq.saturating_sub(to);
                tracing::warn!(agent = %self.agent, site = %self.site, agent_applied = head.seq,
                    controller_log = state.command_seq, rebase_to = to, resent,
                    "controller database restored from a dump: commands streamed again after the agent's last common one");
                incidents.push(incident(
                    IncidentKind::ControllerRestored,
                    format!(
                        "controller restored: {resent} commands re-sent (the agent had applied \
                         {} of a log that now ends at {})",
                        head.seq, state.command_seq
                    ),
                ));
                to
            }
        };
        let unchanged_lineage =
            state.lineage.iter().filter(|s| s.first_seq >= lineage_from).eq(rows.iter());
        if !(incidents.is_empty() && unchanged_lineage) {
            for i in &incidents {
                self.gw
                    .metrics
                    .store_incidents
                    .get_or_create(&vec![("kind".to_owned(), i.kind.as_str().to_owned())])
                    .inc();
            }
            let repair = crate::store::sessions::SessionRepair {
                expected_acked: state.acked,
                acked,
                lineage_from,
                lineage: rows,
                incidents,
            };
            if !self.gw.store.repair_session(self.agent, &repair).await.map_err(End::Store)? {
                return Err(End::Protocol(
                    "concurrent_session",
                    "another session of this agent stored events meanwhile; reconnect".into(),
                ));
            }
        }
        self.realign_configuration(hello.config_revision).await?;
        Ok(SessionStart {
            acked,
            resequence,
            ticket_floors,
            command_cursor,
            command_rebase_to: matches!(commands, CommandPlan::Rebase { .. })
                .then_some(command_cursor),
        })
    }

    /// An agent that applied a configuration revision this controller has not reached (its
    /// database came back from an older dump) would skip every revision up to it as old: the
    /// site's configuration is published again above it.
    async fn realign_configuration(&self, agent_revision: u64) -> Result<(), End> {
        let revision = self.gw.store.config_revision().await.map_err(End::Store)?;
        if agent_revision <= revision {
            return Ok(());
        }
        let site = meridian_shared::SiteCode::parse(&self.site)
            .map_err(|e| End::Protocol("bad_site", e.to_string()))?;
        let published = match config_admin::republish_above(
            self.gw.store.as_ref(),
            &site,
            agent_revision,
        )
        .await
        {
            Ok(r) => r,
            Err(Error::Store(e)) => return Err(End::Store(Error::Store(e))),
            Err(e) => {
                tracing::warn!(error = %e, "could not publish the configuration again");
                return Ok(());
            }
        };
        tracing::warn!(agent = %self.agent, site = %self.site, agent_revision, controller_revision = revision,
            published, "controller database restored from a dump: configuration published again above the agent's revision");
        let summary = format!(
            "controller restored: configuration published again as revision {published} (the \
             agent had applied revision {agent_revision}; the database was at {revision})"
        );
        let i = crate::store::sessions::Incident::new(
            self.agent,
            &self.site,
            crate::store::sessions::IncidentKind::ControllerRestored,
            summary,
            Utc::now(),
        );
        self.gw
            .metrics
            .store_incidents
            .get_or_create(&vec![("kind".to_owned(), i.kind.as_str().to_owned())])
            .inc();
        let state =
            self.gw.store.agent(self.agent).await.map_err(End::Store)?.ok_or(End::Revoked)?;
        let repair = crate::store::sessions::SessionRepair {
            expected_acked: state.acked_seq,
            acked: state.acked_seq,
            lineage_from: u64::MAX >> 1,
            lineage: vec![],
            incidents: vec![i],
        };
        self.gw.store.repair_session(self.agent, &repair).await.map_err(End::Store)?;
        // The new command goes out with the others after the Welcome.
        self.gw.agent_wakes.wake(&self.agent.to_string());
        Ok(())
    }
}
