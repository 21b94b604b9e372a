//! Distribution rules at the branch: the rules of the applied configuration that are
//! evaluated at this site (`SiteConfig::request_rules`), compiled once per configuration
//! revision. Event-triggered rules (create, modify, status change, arrival) run in the same
//! store job as the change that triggers them, so a rule fires exactly when its change commits
//! — offline too: the operation it starts waits in the outbox. Time-triggered rules (a cron
//! schedule or the close of business, in the site's time zone) run from `run_escalations`
//! against a durable due time per rule, so a run missed while the agent was down happens once
//! at the next sweep.
//!
//! **Echo and loop protection.** Applying another site's operation never fires this site's
//! create or modify rules (only a committed arrival fires arrival rules), copies never fire
//! anything (only the master is evaluated), and a rule does not move a request between two
//! sites that it has already bounced between `bounce_limit` times. Rule sets with a loop of
//! arrival rules are refused centrally when saved.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use meridian_shared::config::SiteConfig;
use meridian_shared::requests::Values;
use meridian_shared::rules::{Action, CompiledRule, RequestRule, RuleContext, Target, Trigger};
use meridian_shared::transfers::{OpKind, OpTarget, bounces};
use rusqlite::{Connection, OptionalExtension, params};

use crate::distribution::{self, OperationSpec};
use crate::error::{Error, Result};
use crate::requests::{self, Request};

/// The compiled rules of one configuration revision.
#[derive(Debug, Default)]
pub struct RuleSet {
    pub revision: u64,
    rules: Vec<(RequestRule, CompiledRule)>,
}

impl RuleSet {
    /// Compiles the enabled rules evaluated at this site. A rule that does not compile (the
    /// controller refuses those, so only a damaged snapshot has one) is logged and left out.
    pub fn build(config: &SiteConfig) -> RuleSet {
        let mut rules = vec![];
        for rule in config.request_rules.iter().filter(|r| r.enabled) {
            if !rule.is_evaluated_at(&config.site.code) {
                continue;
            }
            let Some(t) = config.request_types.iter().find(|t| t.code == rule.request_type) else {
                tracing::warn!(rule = %rule.code, "rule for a request type this site does not have; skipped");
                continue;
            };
            match meridian_shared::rules::compile(rule, t) {
                Ok(compiled) => rules.push((rule.clone(), compiled)),
                Err(e) => {
                    tracing::warn!(rule = %rule.code, error = %e, "rule does not compile; skipped")
                }
            }
        }
        RuleSet { revision: config.revision, rules }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// Keeps the compiled rules of the applied configuration.
#[derive(Default)]
pub struct RuleCache(std::sync::Mutex<Option<Arc<RuleSet>>>);

impl RuleCache {
    /// The rules of `config`, compiled when its revision is new.
    pub fn get(&self, config: &SiteConfig) -> Arc<RuleSet> {
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(set) = cached.as_ref()
            && set.revision == config.revision
        {
            return set.clone();
        }
        let set = Arc::new(RuleSet::build(config));
        *cached = Some(set.clone());
        set
    }
}

/// What happened to a request, for event-triggered rules.
#[derive(Debug, Clone, Copy)]
pub enum RuleEvent<'a> {
    Created,
    /// Changed at this site; the values before.
    Modified(&'a Values),
    /// Arrived here as master.
    Arrived,
}

fn triggered(trigger: &Trigger, event: RuleEvent<'_>, r: &Request) -> bool {
    match (trigger, event) {
        (Trigger::Create, RuleEvent::Created) => true,
        (Trigger::Modify, RuleEvent::Modified(_)) => true,
        (Trigger::StatusChange { field }, RuleEvent::Modified(before)) => {
            before.get(field) != r.fields.get(field)
        }
        (Trigger::Arrival, RuleEvent::Arrived) => true,
        _ => false,
    }
}

/// Evaluates the event-triggered rules for `r` after `event`, inside the caller's store job;
/// starts the operations of those that match. Returns how many fired.
pub fn on_event(
    conn: &Connection,
    config: &SiteConfig,
    rules: &RuleSet,
    r: &Request,
    event: RuleEvent<'_>,
    now: DateTime<Utc>,
) -> Result<u32> {
    let mut started = 0;
    let previous = match event {
        RuleEvent::Modified(before) => Some(before),
        _ => None,
    };
    for (rule, compiled) in &rules.rules {
        if rule.request_type != r.request_type || !triggered(&rule.trigger, event, r) {
            continue;
        }
        // Re-read: an earlier rule may have moved the request away.
        let Some(current) = requests::get(conn, &r.id.to_string())? else { break };
        if !current.distribution.master || current.distribution.pending_operation.is_some() {
            break;
        }
        if fire(conn, config, rule, compiled, &current, previous, now)? {
            started += 1;
        }
    }
    Ok(started)
}

/// Evaluates one rule for one request and starts its operation if it matches.
fn fire(
    conn: &Connection,
    config: &SiteConfig,
    rule: &RequestRule,
    compiled: &CompiledRule,
    r: &Request,
    previous: Option<&Values>,
    now: DateTime<Utc>,
) -> Result<bool> {
    let site = &config.site.code;
    let ctx = RuleContext {
        human_id: &r.human_id,
        site,
        fields: &r.fields,
        previous,
        created_at: r.created_at,
        updated_at: r.updated_at,
        now,
    };
    match compiled.matches(&ctx) {
        Ok(true) => {}
        Ok(false) => return Ok(false),
        Err(e) => {
            tracing::warn!(rule = %rule.code, request = %r.human_id, error = %e, "rule condition failed to evaluate; not fired");
            return Ok(false);
        }
    }
    let target = match &rule.target {
        None => None,
        Some(Target::Site(s)) => Some(OpTarget::Site(s.clone())),
        Some(Target::Group(g)) => Some(OpTarget::Group(g.clone())),
        Some(Target::AllSites(_)) => Some(OpTarget::AllSites),
        Some(Target::FollowTheSun(chain)) => match Target::follow_the_sun_next(chain, site) {
            Some(next) => Some(OpTarget::Site(next)),
            None => {
                tracing::warn!(rule = %rule.code, %site, "this site is not in the rule's follow-the-sun chain");
                return Ok(false);
            }
        },
    };
    let action = match rule.action {
        Action::Transfer => OpKind::Transfer,
        Action::Update => OpKind::Update,
        Action::Return => OpKind::Return,
        Action::Delete => OpKind::Delete,
    };
    // The bounce limit: never move a request back and forth between two sites more often.
    let to = match (&target, action) {
        (Some(OpTarget::Site(t)), _) => Some(t.clone()),
        (None, OpKind::Return) => r
            .distribution
            .history
            .iter()
            .rev()
            .find(|m| &m.to_site == site)
            .map(|m| m.from_site.clone()),
        _ => None,
    };
    if let Some(to) = &to {
        let moves: Vec<_> = r
            .distribution
            .history
            .iter()
            .filter(|m| {
                m.kind == OpKind::Return
                    || m.mode == Some(meridian_shared::transfers::TransferMode::Ownership)
            })
            .cloned()
            .collect();
        let mut with_this = moves;
        if let Some(last) = with_this.last().cloned() {
            with_this.push(meridian_shared::transfers::Move {
                from_site: site.clone(),
                to_site: to.clone(),
                ..last
            });
        }
        if bounces(&with_this, site, to) > rule.bounce_limit {
            tracing::warn!(rule = %rule.code, request = %r.human_id, %site, %to, limit = rule.bounce_limit, "bounce limit reached; the rule does not move the request again");
            return Ok(false);
        }
    }
    let spec = OperationSpec {
        action,
        mode: rule.mode,
        target,
        mapping: rule.mapping.clone(),
        pool: rule.pool.clone(),
        update: rule.update,
        rule: Some(rule.code.clone()),
    };
    match distribution::start(conn, config, &r.id.to_string(), &spec, now) {
        Ok(started) => {
            tracing::info!(rule = %rule.code, request = %r.human_id, operation = ?started.operation, "rule fired");
            Ok(true)
        }
        Err(e @ (Error::Store(_) | Error::StoreGone(_) | Error::Internal(_))) => Err(e),
        Err(e) => {
            tracing::warn!(rule = %rule.code, request = %r.human_id, error = %e, "rule matched but its operation was refused");
            Ok(false)
        }
    }
}

/// Runs the time-triggered rules that are due at `now` (schedule, close of business): each
/// over every master request of its type here. Returns how many operations started.
pub fn run_escalations(
    conn: &Connection,
    config: &SiteConfig,
    rules: &RuleSet,
    now: DateTime<Utc>,
) -> Result<u32> {
    let mut started = 0;
    let mut live = vec![];
    for (rule, compiled) in &rules.rules {
        if !matches!(rule.trigger, Trigger::Schedule { .. } | Trigger::CloseOfBusiness) {
            continue;
        }
        live.push(rule.code.to_string());
        let due: Option<String> = conn
            .prepare_cached("SELECT due_at FROM request_rule_schedule WHERE rule = ?1")?
            .query_row([rule.code.as_str()], |r| r.get(0))
            .optional()?;
        let due = due.and_then(|d| DateTime::parse_from_rfc3339(&d).ok()).map(|d| d.to_utc());
        let next = |after| meridian_shared::rules::next_occurrence(rule, &config.site, after);
        let Some(due) = due.or_else(|| next(now)) else { continue };
        if due <= now {
            for r in masters_of(conn, rule)? {
                if fire(conn, config, rule, compiled, &r, None, now)? {
                    started += 1;
                }
            }
        }
        let upcoming = if due <= now { next(now) } else { Some(due) };
        conn.prepare_cached(
            "INSERT INTO request_rule_schedule (rule, due_at) VALUES (?1, ?2) \
             ON CONFLICT (rule) DO UPDATE SET due_at = excluded.due_at",
        )?
        .execute(params![rule.code.as_str(), upcoming.map(|t| t.to_rfc3339())])?;
    }
    let stale: Vec<String> = conn
        .prepare_cached("SELECT rule FROM request_rule_schedule")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for rule in stale.into_iter().filter(|r| !live.contains(r)) {
        conn.prepare_cached("DELETE FROM request_rule_schedule WHERE rule = ?1")?
            .execute([rule])?;
    }
    Ok(started)
}

/// The master requests of `rule`'s type held here, not in flight.
fn masters_of(conn: &Connection, rule: &RequestRule) -> Result<Vec<Request>> {
    let ids: Vec<String> = conn
        .prepare_cached(
            "SELECT id FROM requests WHERE request_type = ?1 AND is_master = 1 \
             AND pending_op IS NULL ORDER BY created_at, id",
        )?
        .query_map([rule.request_type.as_str()], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.extend(requests::get(conn, &id)?);
    }
    Ok(out)
}
