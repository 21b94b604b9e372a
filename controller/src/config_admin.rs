//! Configuration changes: the pure planning step (desired resources → validated new set,
//! per-resource changes, sites whose snapshot changed) and the commit with optimistic
//! concurrency, which publishes each changed site's snapshot through the command log in the
//! same transaction.

use std::collections::BTreeSet;

use chrono::Utc;
use meridian_shared::commands::ControllerCommand;
use meridian_shared::config::{
    ConfigSet, ConnectorKey, Queue, Resource, ResourceKey, Service, ServicePoint, Site, StaffRole,
    StaffUser, Webhook, WorkProfile,
};
use meridian_shared::{Code, SiteCode};
use serde::{Deserialize, Serialize};

use crate::auth;
use crate::error::{Error, Result};
use crate::store::{ConfigCommit, Store};

/// A resource as an admin writes it: like `Resource`, except that a staff user carries a
/// plain `password` (hashed here) instead of a hash.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ResourceInput {
    Site(Site),
    Service(Service),
    Queue(Queue),
    ServicePoint(ServicePoint),
    WorkProfile(WorkProfile),
    StaffUser(StaffUserInput),
    ConnectorKey(ConnectorKey),
    Webhook(Webhook),
    RequestType(meridian_shared::requests::RequestType),
    RequestMapping(meridian_shared::mappings::RequestMapping),
    RequestRule(meridian_shared::rules::RequestRule),
    RequestPool(meridian_shared::rules::RequestPool),
}

/// A staff user as an admin writes it; `Debug` hides the password.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaffUserInput {
    pub username: Code,
    pub name: String,
    #[serde(default)]
    pub roles: Vec<StaffRole>,
    #[serde(default)]
    pub sites: Vec<SiteCode>,
    /// Plain password; kept as-is when it matches the stored hash, so re-applying the same file
    /// changes nothing. Omit it to keep the current password.
    #[serde(default)]
    pub password: Option<String>,
}

impl std::fmt::Debug for StaffUserInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaffUserInput")
            .field("username", &self.username)
            .field("name", &self.name)
            .field("roles", &self.roles)
            .field("sites", &self.sites)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

impl ResourceInput {
    pub fn key(&self) -> ResourceKey {
        self.resolve_shallow().key()
    }

    /// The resource with a placeholder hash, enough to compute its key.
    fn resolve_shallow(&self) -> Resource {
        match self.clone() {
            ResourceInput::Site(x) => Resource::Site(x),
            ResourceInput::Service(x) => Resource::Service(x),
            ResourceInput::Queue(x) => Resource::Queue(x),
            ResourceInput::ServicePoint(x) => Resource::ServicePoint(x),
            ResourceInput::WorkProfile(x) => Resource::WorkProfile(x),
            ResourceInput::ConnectorKey(x) => Resource::ConnectorKey(x),
            ResourceInput::Webhook(x) => Resource::Webhook(x),
            ResourceInput::RequestType(x) => Resource::RequestType(x),
            ResourceInput::RequestMapping(x) => Resource::RequestMapping(x),
            ResourceInput::RequestRule(x) => Resource::RequestRule(x),
            ResourceInput::RequestPool(x) => Resource::RequestPool(x),
            ResourceInput::StaffUser(u) => Resource::StaffUser(StaffUser {
                username: u.username,
                name: u.name,
                roles: u.roles,
                sites: u.sites,
                password_hash: String::new(),
                sessions_epoch: 0,
                unlock_epoch: 0,
            }),
        }
    }

    /// The stored form, hashing a new staff password (or keeping the existing hash).
    pub fn resolve(self, current: &ConfigSet) -> Result<Resource> {
        let ResourceInput::StaffUser(u) = self else {
            return Ok(self.resolve_shallow());
        };
        let key = ResourceKey {
            kind: meridian_shared::config::ResourceKind::StaffUser,
            site: None,
            code: u.username.to_string(),
        };
        let (existing, epochs) = match current.get(&key) {
            Some(Resource::StaffUser(existing)) => (
                Some(existing.password_hash.clone()),
                (existing.sessions_epoch, existing.unlock_epoch),
            ),
            _ => (None, (0, 0)),
        };
        let password_hash = match (u.password.as_deref(), existing) {
            (Some(p), Some(h)) if auth::verify_password(p, &h) => h,
            (Some(p), _) => auth::hash_password(p)?,
            (None, Some(h)) => h,
            (None, None) => {
                return Err(Error::from(meridian_shared::ValidationError::new(
                    format!("{key}.password"),
                    "a new staff user needs a password",
                )));
            }
        };
        Ok(Resource::StaffUser(StaffUser {
            username: u.username,
            name: u.name,
            roles: u.roles,
            sites: u.sites,
            password_hash,
            // Raised only by the sign-out and unlock actions (`staff_access`); an edit of the
            // user keeps them.
            sessions_epoch: epochs.0,
            unlock_epoch: epochs.1,
        }))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Created,
    Updated,
    Unchanged,
    Deleted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Change {
    pub resource: String,
    pub action: Action,
}

/// The outcome of a (possibly dry-run) change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChangeReport {
    /// The revision after the change (unchanged for a dry run or a no-op).
    pub revision: u64,
    pub dry_run: bool,
    pub changes: Vec<Change>,
    /// Sites whose agents receive a new configuration.
    pub sites_published: Vec<String>,
}

/// The result of planning: the new set and what changed.
#[derive(Debug, Clone)]
pub struct Plan {
    pub next: ConfigSet,
    pub upserts: Vec<Resource>,
    pub deletes: Vec<ResourceKey>,
    pub changes: Vec<Change>,
    pub changed_sites: Vec<SiteCode>,
}

/// Pure: applies `upserts` and `deletes` to `current`, validates the whole result and works out
/// which sites' snapshots changed.
pub fn plan(
    current: &ConfigSet,
    upserts: Vec<Resource>,
    deletes: Vec<ResourceKey>,
) -> Result<Plan> {
    let mut next = current.clone();
    let mut changes = Vec::new();
    let mut seen = BTreeSet::new();
    let mut real_upserts = Vec::new();
    for res in upserts {
        let key = res.key();
        if !seen.insert(key.clone()) {
            return Err(Error::from(meridian_shared::ValidationError::new(
                key.to_string(),
                "the same resource appears twice in one change",
            )));
        }
        let action = match current.get(&key) {
            None => Action::Created,
            Some(old) if old == &res => Action::Unchanged,
            Some(_) => Action::Updated,
        };
        changes.push(Change { resource: key.to_string(), action });
        if action != Action::Unchanged {
            real_upserts.push(res.clone());
            next.resources.insert(key, res);
        }
    }
    let mut real_deletes = Vec::new();
    for key in deletes {
        if !seen.insert(key.clone()) {
            return Err(Error::from(meridian_shared::ValidationError::new(
                key.to_string(),
                "the same resource appears twice in one change",
            )));
        }
        if next.resources.remove(&key).is_none() {
            return Err(Error::NotFound(key.to_string()));
        }
        changes.push(Change { resource: key.to_string(), action: Action::Deleted });
        real_deletes.push(key);
    }
    next.validate()?;
    let sites: BTreeSet<SiteCode> =
        current.sites().chain(next.sites()).map(|s| s.code.clone()).collect();
    let changed_sites = sites
        .into_iter()
        .filter(|s| current.snapshot(s, 0) != next.snapshot(s, 0))
        .filter(|s| next.site(s).is_some())
        .collect();
    Ok(Plan { next, upserts: real_upserts, deletes: real_deletes, changes, changed_sites })
}

/// How `change` treats its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeMode {
    /// Create or update (apply).
    Upsert,
    /// Refuse with `Conflict` when a resource already exists.
    CreateOnly,
    /// Plan and report, commit nothing.
    DryRun,
}

/// Plans and commits a change, retrying when another writer committed first.
pub async fn change(
    store: &dyn Store,
    actor: &str,
    inputs: Vec<ResourceInput>,
    deletes: Vec<ResourceKey>,
    mode: ChangeMode,
) -> Result<ChangeReport> {
    change_with(store, actor, mode, |current| {
        let upserts =
            inputs.iter().cloned().map(|i| i.resolve(current)).collect::<Result<Vec<_>>>()?;
        Ok((upserts, deletes.clone()))
    })
    .await
}

/// Like `change`, with the resources to write and delete worked out by `decide` from the
/// configuration as it is (again on every retry).
pub async fn change_with(
    store: &dyn Store,
    actor: &str,
    mode: ChangeMode,
    decide: impl Fn(&ConfigSet) -> Result<(Vec<Resource>, Vec<ResourceKey>)>,
) -> Result<ChangeReport> {
    let dry_run = mode == ChangeMode::DryRun;
    for _attempt in 0..5 {
        let (revision, resources) = store.load_config().await?;
        let current = ConfigSet::from_resources(resources);
        let (upserts, deletes) = decide(&current)?;
        if let Some(site) =
            deletes.iter().find(|k| k.kind == meridian_shared::config::ResourceKind::Site)
        {
            let active = store
                .list_agents()
                .await?
                .into_iter()
                .any(|a| a.revoked_at.is_none() && a.site.as_str() == site.code);
            if active {
                return Err(Error::Conflict(format!(
                    "site {} has an active agent; revoke it before deleting the site",
                    site.code
                )));
            }
        }
        if mode == ChangeMode::CreateOnly
            && let Some(existing) = upserts.iter().find(|r| current.get(&r.key()).is_some())
        {
            return Err(Error::Conflict(format!("{} already exists", existing.key())));
        }
        let plan = plan(&current, upserts, deletes.clone())?;
        let nothing = plan.upserts.is_empty() && plan.deletes.is_empty();
        let report = |revision| ChangeReport {
            revision,
            dry_run,
            changes: plan.changes.clone(),
            sites_published: plan.changed_sites.iter().map(ToString::to_string).collect(),
        };
        if nothing {
            return Ok(ChangeReport { sites_published: vec![], ..report(revision) });
        }
        if dry_run {
            return Ok(report(revision));
        }
        let new_revision = revision + 1;
        let publish = plan
            .changed_sites
            .iter()
            .filter_map(|s| {
                let snap = plan.next.snapshot(s, new_revision)?;
                Some((s.clone(), ControllerCommand::ApplyConfig(Box::new(snap)).payload()))
            })
            .collect();
        let summary = summarize(&plan.changes);
        let commit = ConfigCommit {
            expected_revision: revision,
            revision_floor: None,
            actor: actor.to_owned(),
            summary,
            upserts: plan.upserts.clone(),
            deletes: plan.deletes.clone(),
            publish,
            at: Utc::now(),
        };
        match store.commit_config(commit).await {
            Ok(rev) => return Ok(report(rev)),
            Err(Error::RevisionConflict) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::RevisionConflict)
}

fn summarize(changes: &[Change]) -> String {
    let changed: Vec<String> = changes
        .iter()
        .filter(|c| c.action != Action::Unchanged)
        .map(|c| format!("{} {}", format!("{:?}", c.action).to_lowercase(), c.resource))
        .collect();
    let mut s = changed.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if changed.len() > 5 {
        s.push_str(&format!(" and {} more", changed.len() - 5));
    }
    s
}

/// Publishes `site`'s current configuration again at a new revision above `floor`: an agent
/// applied revision `floor` from a controller database since restored from an older dump, and
/// would skip every revision up to it as old. Returns the new revision.
pub async fn republish_above(store: &dyn Store, site: &SiteCode, floor: u64) -> Result<u64> {
    for _attempt in 0..5 {
        let (revision, resources) = store.load_config().await?;
        let set = ConfigSet::from_resources(resources);
        let new_revision = revision.max(floor) + 1;
        let Some(snap) = set.snapshot(site, new_revision) else {
            return Err(Error::NotFound(format!("site {site}")));
        };
        let commit = ConfigCommit {
            expected_revision: revision,
            revision_floor: Some(new_revision),
            actor: "controller".into(),
            summary: format!(
                "configuration of {site} published again above revision {floor}, which its \
                 agent applied from this database before it was restored"
            ),
            upserts: vec![],
            deletes: vec![],
            publish: vec![(site.clone(), ControllerCommand::ApplyConfig(Box::new(snap)).payload())],
            at: Utc::now(),
        };
        match store.commit_config(commit).await {
            Ok(rev) => return Ok(rev),
            Err(Error::RevisionConflict) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::RevisionConflict)
}

/// Builds the snapshot for `site` at the current revision (for enrollment).
pub async fn current_snapshot(
    store: &dyn Store,
    site: &SiteCode,
) -> Result<Option<(u64, Vec<u8>)>> {
    let (revision, resources) = store.load_config().await?;
    let set = ConfigSet::from_resources(resources);
    Ok(set
        .snapshot(site, revision)
        .map(|snap| (revision, ControllerCommand::ApplyConfig(Box::new(snap)).payload())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(code: &str, name: &str) -> Resource {
        Resource::Site(Site {
            code: SiteCode::parse(code).expect("code"),
            name: name.into(),
            time_zone: "UTC".into(),
            business_hours: Default::default(),
            closed_dates: vec![],
            tags: vec![],
            end_of_day: Default::default(),
            share_customer_data: false,
            appointment_sync: Default::default(),
        })
    }

    #[test]
    fn plan_reports_actions_and_changed_sites() {
        let current = ConfigSet::from_resources(vec![site("SFO", "SF"), site("CHI", "Chicago")]);
        let p = plan(
            &current,
            vec![site("SFO", "San Francisco"), site("CHI", "Chicago"), site("TYO", "Tokyo")],
            vec![],
        )
        .expect("plan");
        let actions: Vec<Action> = p.changes.iter().map(|c| c.action).collect();
        assert_eq!(actions, [Action::Updated, Action::Unchanged, Action::Created]);
        let sites: Vec<&str> = p.changed_sites.iter().map(|s| s.as_str()).collect();
        assert_eq!(sites, ["SFO", "TYO"]);
        assert_eq!(p.upserts.len(), 2);
    }

    #[test]
    fn plan_refuses_invalid_results_and_unknown_deletes() {
        let current = ConfigSet::from_resources(vec![site("SFO", "SF")]);
        let bad = plan(&current, vec![site("SFO", "")], vec![]);
        assert!(matches!(bad, Err(Error::Validation(_))), "{bad:?}");
        let key = ResourceKey {
            kind: meridian_shared::config::ResourceKind::Site,
            site: None,
            code: "XX".into(),
        };
        assert!(matches!(plan(&current, vec![], vec![key]), Err(Error::NotFound(_))));
        let twice = plan(&current, vec![site("CHI", "a"), site("CHI", "b")], vec![]);
        assert!(matches!(twice, Err(Error::Validation(_))));
    }
}
