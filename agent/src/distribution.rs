//! Cross-site operations on service requests at the branch (the protocol is in
//! `meridian_shared::transfers`). This site starts operations on its own requests (a person,
//! an integration or a rule asked) and applies the controller's commands for operations other
//! sites started. Every function here runs inside one store job, so each state change commits
//! together with its outbox event or with the record of the command that caused it.
//!
//! **Invariants.** This site gives a master up only together with its `REQUEST_OPERATION`
//! (`pending_op` set, the copy read-only); it takes one back only from a `REQUEST_RESULT` of
//! that very operation, and becomes master of an incoming request only from the
//! `REQUEST_COMMIT` of the operation it staged. A copy that is not the master is never
//! edited here, and applying another site's operation never fires this site's rules on
//! create or modify (no echo).

use chrono::{DateTime, Utc};
use meridian_shared::commands::ControllerCommand;
use meridian_shared::config::SiteConfig;
use meridian_shared::events::{AgentEvent, RequestEventKind};
use meridian_shared::mappings::{DuplicatePolicy, RequestMapping, SourceCopy};
use meridian_shared::requests::{RequestType, Values};
use meridian_shared::transfers::{
    ApplyOperation, Decision, Move, OpKind, OpTarget, OperationOutcome, OperationRequested,
    OperationResult, Outcome, RequestDeleted, RequestState, ResultStatus, TransferMode,
    UpdatePolicy,
};
use meridian_shared::{Code, SiteCode};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Deserialize;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::requests::{self, Distribution, Request};
use crate::store::queries::append_event;

pub use meridian_shared::rules::DEFAULT_POOL;

/// An operation a person, an integration or a rule asks for (`POST /api/v1/requests/{id}/
/// operations`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationSpec {
    pub action: OpKind,
    #[serde(default)]
    pub mode: Option<TransferMode>,
    #[serde(default)]
    pub target: Option<OpTarget>,
    #[serde(default)]
    pub mapping: Option<Code>,
    #[serde(default)]
    pub pool: Option<Code>,
    #[serde(default)]
    pub update: UpdatePolicy,
    /// Set by the rule engine, never by the API.
    #[serde(skip)]
    pub rule: Option<Code>,
}

/// What `start` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Started {
    /// The operation's id (absent for a delete, which needs no other site's answer first).
    pub operation: Option<Uuid>,
    /// The request after the change here (absent once deleted).
    pub request: Option<Request>,
}

fn invalid(field: &str, message: impl Into<String>) -> Error {
    let mut errs = meridian_shared::ValidationErrors::default();
    errs.push(field, message);
    Error::InvalidFields(errs)
}

fn find_type<'a>(config: &'a SiteConfig, code: &str) -> Option<&'a RequestType> {
    config.request_types.iter().find(|t| t.code.as_str() == code)
}

fn find_mapping<'a>(config: &'a SiteConfig, code: &str) -> Option<&'a RequestMapping> {
    config.request_mappings.iter().find(|m| m.code.as_str() == code)
}

/// Starts an operation on request `id` (an id or a human id) of this site.
pub fn start(
    conn: &Connection,
    config: &SiteConfig,
    id: &str,
    spec: &OperationSpec,
    now: DateTime<Utc>,
) -> Result<Started> {
    let site = &config.site.code;
    let mut r = requests::get(conn, id)?.ok_or_else(|| Error::NotFound(format!("request {id}")))?;
    if spec.action == OpKind::Delete {
        if spec.mode.is_some() || spec.target.is_some() || spec.mapping.is_some() {
            return Err(invalid("action", "a delete takes no mode, target or mapping"));
        }
        return delete(conn, &r, None, now).map(|()| Started { operation: None, request: None });
    }
    requests::check_master(&r)?;
    let pool = match &spec.pool {
        Some(p)
            if p.as_str() != DEFAULT_POOL
                && !config.request_pools.iter().any(|known| &known.code == p) =>
        {
            return Err(invalid("pool", format!("unknown pool {p}")));
        }
        Some(p) => p.clone(),
        None => Code::parse(DEFAULT_POOL)
            .map_err(|e| Error::Internal(format!("the default pool's code: {e}")))?,
    };
    let (mode, target, mapping) = match spec.action {
        OpKind::Return => {
            if spec.target.is_some() || spec.mode.is_some() {
                return Err(invalid(
                    "target",
                    "a return goes back to where the request came from; give no target or mode",
                ));
            }
            let Some(came) = r.distribution.history.iter().rev().find(|m| &m.to_site == site)
            else {
                return Err(invalid(
                    "action",
                    format!(
                        "request {} was never transferred here: nothing to return to",
                        r.human_id
                    ),
                ));
            };
            let mapping = match (&spec.mapping, &came.mapping) {
                (Some(m), _) => Some(m.clone()),
                (None, Some(m)) => {
                    find_mapping(config, m.as_str()).and_then(|m| m.return_mapping.clone())
                }
                (None, None) => None,
            };
            (Some(TransferMode::Ownership), OpTarget::Site(came.from_site.clone()), mapping)
        }
        OpKind::Transfer | OpKind::Update => {
            let Some(target) = spec.target.clone() else {
                return Err(invalid("target", "give the target: a site, a group or all_sites"));
            };
            if target == OpTarget::Site(site.clone()) {
                return Err(invalid("target", "the request is already here"));
            }
            let mode = match (spec.action, spec.mode) {
                (OpKind::Update, None) => None,
                (OpKind::Update, Some(_)) => {
                    return Err(invalid("mode", "an update takes no mode"));
                }
                (_, None) => {
                    return Err(invalid(
                        "mode",
                        "give the mode: ownership, data_only or independent_copy",
                    ));
                }
                (_, Some(m)) => Some(m),
            };
            if matches!(mode, Some(TransferMode::Ownership | TransferMode::IndependentCopy))
                && !matches!(target, OpTarget::Site(_))
            {
                return Err(invalid("target", "this mode moves the request to one site only"));
            }
            (mode, target, spec.mapping.clone())
        }
        OpKind::Delete => unreachable!("handled above"),
    };
    if let Some(m) = &mapping {
        let Some(found) = find_mapping(config, m.as_str()) else {
            return Err(invalid("mapping", format!("unknown mapping {m}")));
        };
        if found.source_type != r.request_type {
            return Err(invalid(
                "mapping",
                format!(
                    "mapping {m} maps requests of type {}, this one is {}",
                    found.source_type, r.request_type
                ),
            ));
        }
    }
    let source_keeps_copy = spec.action == OpKind::Return
        || mapping
            .as_ref()
            .and_then(|m| find_mapping(config, m.as_str()))
            .is_none_or(|m| m.source_copy == SourceCopy::Keep);
    let op_id = Uuid::now_v7();
    let moves_ownership = mode == Some(TransferMode::Ownership);
    if let OpTarget::Site(to) = &target
        && spec.action != OpKind::Update
    {
        r.distribution.history.push(Move {
            at: now,
            op_id,
            kind: spec.action,
            mode,
            from_site: site.clone(),
            to_site: to.clone(),
            mapping: mapping.clone(),
            rule: spec.rule.clone(),
        });
        r.distribution.to_site = Some(to.to_string());
    }
    if spec.action != OpKind::Update {
        r.distribution.transfer_status = Some("Pending".into());
        r.distribution.transfer_error = None;
        r.distribution.mapping = mapping.as_ref().map(|m| m.to_string());
    }
    if moves_ownership {
        r.distribution.master = false;
        r.distribution.pending_operation = Some(op_id.to_string());
    }
    r.updated_at = now;
    requests::write(conn, &r)?;
    append_event(
        conn,
        &AgentEvent::RequestOperation(OperationRequested {
            op_id,
            kind: spec.action,
            mode,
            target,
            mapping,
            pool,
            update: spec.update,
            rule: spec.rule.clone(),
            request: r.state(),
            source_keeps_copy,
            at: now,
        }),
        now,
    )?;
    Ok(Started { operation: Some(op_id), request: Some(r) })
}

/// Deletes request `r` here: a master (its copies elsewhere follow, through the controller) or
/// a read-only copy alone. Refused while an operation is moving the ownership away.
fn delete(conn: &Connection, r: &Request, op: Option<Uuid>, now: DateTime<Utc>) -> Result<()> {
    if let Some(pending) = &r.distribution.pending_operation {
        return Err(Error::Conflict(format!(
            "request {} is being handed over (operation {pending}); delete it where it arrives",
            r.human_id
        )));
    }
    conn.prepare_cached("DELETE FROM requests WHERE id = ?1")?.execute([r.id.to_string()])?;
    append_event(
        conn,
        &AgentEvent::RequestDeleted(RequestDeleted {
            request_id: r.id,
            human_id: r.human_id.clone(),
            was_master: r.distribution.master,
            op_id: op,
            at: now,
        }),
        now,
    )?;
    Ok(())
}

/// Why an incoming operation cannot be applied here.
struct Refusal {
    reason: String,
    retryable: bool,
}

fn refuse(reason: impl Into<String>) -> Refusal {
    Refusal { reason: reason.into(), retryable: false }
}

fn not_yet(reason: impl Into<String>) -> Refusal {
    Refusal { reason: reason.into(), retryable: true }
}

/// The incoming request in this site's terms: its type here and its checked values.
fn localize(
    config: &SiteConfig,
    state: &RequestState,
    mapping: Option<&Code>,
    existing_type: Option<&Code>,
) -> std::result::Result<(Code, Values), Refusal> {
    let mapped = match mapping {
        Some(code) => {
            let Some(m) = find_mapping(config, code.as_str()) else {
                return Err(not_yet(format!("mapping {code} is not configured at this site yet")));
            };
            (m.source_type == state.request_type).then_some(m)
        }
        None => None,
    };
    // An update to a copy of another type (a copy left behind by an earlier move) maps by a
    // configured mapping between the two types, else by field name.
    let mapped = mapped.or_else(|| {
        let own = existing_type.filter(|t| **t != state.request_type)?;
        config
            .request_mappings
            .iter()
            .find(|m| m.source_type == state.request_type && &m.target_type == own)
    });
    let type_code = match (mapped, existing_type) {
        (Some(m), _) => m.target_type.clone(),
        (None, Some(t)) => t.clone(),
        (None, None) => state.request_type.clone(),
    };
    let Some(t) = find_type(config, type_code.as_str()) else {
        return Err(not_yet(format!(
            "request type {type_code} is not configured at this site yet"
        )));
    };
    let values = match mapped {
        Some(m) => m.apply(&state.fields, t),
        None => state
            .fields
            .iter()
            .filter(|(k, _)| t.fields.iter().any(|f| &f.name == *k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    let values = t
        .check_new(&values)
        .map_err(|e| refuse(format!("the request does not fit type {} here: {e}", t.code)))?;
    Ok((t.code.clone(), values))
}

/// Applies `REQUEST_APPLY` and records the outcome event; returns the outcome.
pub fn apply(
    conn: &Connection,
    config: &SiteConfig,
    cmd: &ApplyOperation,
    now: DateTime<Utc>,
) -> Result<Outcome> {
    let outcome = match apply_inner(conn, config, cmd, now)? {
        Ok((request_id, human_id)) => Outcome::Applied { request_id, human_id },
        Err(r) => Outcome::Rejected { reason: r.reason, retryable: r.retryable },
    };
    append_event(
        conn,
        &AgentEvent::RequestOperationOutcome(OperationOutcome {
            op_id: cmd.op_id,
            attempt: cmd.attempt,
            outcome: outcome.clone(),
            at: now,
        }),
        now,
    )?;
    Ok(outcome)
}

type Applied = std::result::Result<(Uuid, String), Refusal>;

fn apply_inner(
    conn: &Connection,
    config: &SiteConfig,
    cmd: &ApplyOperation,
    now: DateTime<Utc>,
) -> Result<Applied> {
    let site = &config.site.code;
    let state = &cmd.request;
    if &cmd.source_site == site {
        return Ok(Err(refuse("an operation cannot target the site it comes from")));
    }
    let existing = requests::get(conn, &state.request_id.to_string())?;
    if let Some(e) = &existing
        && e.distribution.master
    {
        return Ok(Err(refuse(format!(
            "this site holds the master of {}; refusing a second one",
            e.human_id
        ))));
    }
    let applied = |r: &Request| Ok(Ok((r.id, r.human_id.clone())));
    match (cmd.kind, cmd.mode) {
        (OpKind::Delete, _) => match existing {
            Some(e) => {
                delete(conn, &e, Some(cmd.op_id), now)?;
                applied(&e)
            }
            None => Ok(Ok((state.request_id, state.human_id.clone()))),
        },
        (OpKind::Update, _) => {
            let Some(mut e) = existing else {
                return Ok(Err(refuse(format!(
                    "no copy of {} here to update (deleted at this site?)",
                    state.human_id
                ))));
            };
            if state.revision > e.revision {
                let (t, values) =
                    match localize(config, state, cmd.mapping.as_ref(), Some(&e.request_type)) {
                        Ok(v) => v,
                        Err(r) => return Ok(Err(r)),
                    };
                e.request_type = t;
                e.fields = values;
                e.revision = state.revision;
                e.distribution.history = state.history.clone();
            }
            e.distribution.current_site = cmd.source_site.clone();
            e.distribution.update_status = Some("Success".into());
            e.updated_at = now;
            requests::write(conn, &e)?;
            applied(&e)
        }
        (OpKind::Transfer, Some(TransferMode::IndependentCopy)) => {
            let (t, values) = match localize(config, state, cmd.mapping.as_ref(), None) {
                Ok(v) => v,
                Err(r) => return Ok(Err(r)),
            };
            let r = independent(conn, site, cmd, t, values, now)?;
            applied(&r)
        }
        (OpKind::Transfer, Some(TransferMode::DataOnly)) | (OpKind::Transfer, None) => {
            let (t, values) = match localize(config, state, cmd.mapping.as_ref(), None) {
                Ok(v) => v,
                Err(r) => return Ok(Err(r)),
            };
            let policy = cmd
                .mapping
                .as_ref()
                .and_then(|m| find_mapping(config, m.as_str()))
                .map_or(DuplicatePolicy::Overwrite, |m| m.duplicates);
            let fields = match (&existing, policy) {
                (None, _) => values,
                (Some(e), DuplicatePolicy::Error) => {
                    return Ok(Err(refuse(format!(
                        "a copy of {} is already here (duplicate policy: error)",
                        e.human_id
                    ))));
                }
                (Some(_), DuplicatePolicy::NewId) => {
                    let r = independent(conn, site, cmd, t, values, now)?;
                    return applied(&r);
                }
                (Some(_), DuplicatePolicy::Overwrite) => values,
                (Some(e), DuplicatePolicy::Merge) => {
                    let mut merged = e.fields.clone();
                    merged.extend(values);
                    merged
                }
            };
            let r = incoming(state, cmd, t, fields, false, site, now);
            requests::write(conn, &r)?;
            applied(&r)
        }
        (OpKind::Transfer | OpKind::Return, Some(TransferMode::Ownership)) => {
            let staged: Option<String> = conn
                .prepare_cached("SELECT op_id FROM request_staged WHERE request_id = ?1")?
                .query_row([state.request_id.to_string()], |r| r.get(0))
                .optional()?;
            if let Some(other) = staged {
                return Ok(Err(not_yet(format!(
                    "operation {other} is already bringing {} here",
                    state.human_id
                ))));
            }
            let (t, values) = match localize(config, state, cmd.mapping.as_ref(), None) {
                Ok(v) => v,
                Err(r) => return Ok(Err(r)),
            };
            let r = incoming(state, cmd, t, values, true, site, now);
            conn.prepare_cached(
                "INSERT INTO request_staged (op_id, request_id, kind, source_site, mapping, state, staged_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                cmd.op_id.to_string(),
                r.id.to_string(),
                cmd.kind.as_str(),
                cmd.source_site.as_str(),
                cmd.mapping.as_ref().map(|m| m.to_string()),
                requests::json(&r)?,
                now.to_rfc3339()
            ])?;
            applied(&r)
        }
        (OpKind::Return, _) => Ok(Err(refuse("a return always moves the ownership"))),
    }
}

/// The row a copy or a staged master of `state` becomes here.
fn incoming(
    state: &RequestState,
    cmd: &ApplyOperation,
    request_type: Code,
    fields: Values,
    master: bool,
    site: &SiteCode,
    now: DateTime<Utc>,
) -> Request {
    Request {
        id: state.request_id,
        human_id: state.human_id.clone(),
        request_type,
        fields,
        distribution: Distribution {
            master,
            current_site: if master { site.clone() } else { cmd.source_site.clone() },
            from_site: Some(cmd.source_site.to_string()),
            to_site: None,
            from_request_id: Some(state.request_id.to_string()),
            to_request_id: None,
            mapping: cmd.mapping.as_ref().map(|m| m.to_string()),
            transfer_status: None,
            update_status: None,
            pending_operation: None,
            transfer_error: None,
            history: state.history.clone(),
        },
        revision: state.revision,
        created_at: state.created_at,
        updated_at: now,
    }
}

/// A new request of this site from `cmd` (independent copy, or a duplicate given a new id).
fn independent(
    conn: &Connection,
    site: &SiteCode,
    cmd: &ApplyOperation,
    request_type: Code,
    fields: Values,
    now: DateTime<Utc>,
) -> Result<Request> {
    let mut r = incoming(&cmd.request, cmd, request_type, fields, true, site, now);
    r.id = Uuid::now_v7();
    r.human_id = requests::next_human_id(conn, site)?;
    r.revision = 1;
    r.created_at = now;
    r.distribution.history = vec![Move {
        at: now,
        op_id: cmd.op_id,
        kind: cmd.kind,
        mode: cmd.mode,
        from_site: cmd.source_site.clone(),
        to_site: site.clone(),
        mapping: cmd.mapping.clone(),
        rule: None,
    }];
    requests::write(conn, &r)?;
    requests::record(conn, RequestEventKind::Created, &r, now)?;
    Ok(r)
}

/// `REQUEST_COMMIT`: the staged request becomes this site's master. Returns it (for the
/// arrival rules), or `None` when nothing was staged under `op` (already committed).
pub fn commit(conn: &Connection, d: &Decision, now: DateTime<Utc>) -> Result<Option<Request>> {
    let Some(state) = take_staged(conn, d.op_id)? else { return Ok(None) };
    let mut r: Request = serde_json::from_str(&state)
        .map_err(|e| Error::Internal(format!("corrupt staged request: {e}")))?;
    r.updated_at = now;
    requests::write(conn, &r)?;
    Ok(Some(r))
}

/// `REQUEST_ABORT`: drops what was staged under `op`.
pub fn abort(conn: &Connection, d: &Decision) -> Result<()> {
    take_staged(conn, d.op_id).map(drop)
}

fn take_staged(conn: &Connection, op: Uuid) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("DELETE FROM request_staged WHERE op_id = ?1 RETURNING state")?
        .query_row([op.to_string()], |r| r.get(0))
        .optional()?)
}

/// `REQUEST_RESULT`: how an operation this site started ended. An ownership transfer or return
/// that did not succeed gives the ownership back here.
pub fn result(
    conn: &Connection,
    config: &SiteConfig,
    res: &OperationResult,
    now: DateTime<Utc>,
) -> Result<()> {
    let Some(mut r) = requests::get(conn, &res.request_id.to_string())? else {
        return Ok(());
    };
    let op = res.op_id.to_string();
    let ours = r.distribution.pending_operation.as_deref() == Some(op.as_str());
    r.distribution.transfer_status = Some(res.status.label().into());
    r.distribution.transfer_error = res.reason.clone();
    if res.status == ResultStatus::Success {
        r.distribution.to_request_id = res.target_request_id.map(|id| id.to_string());
    }
    if ours {
        r.distribution.pending_operation = None;
        if res.status == ResultStatus::Success {
            if !res.keep_copy {
                conn.prepare_cached("DELETE FROM requests WHERE id = ?1")?
                    .execute([r.id.to_string()])?;
                return Ok(());
            }
            r.distribution.current_site = res.target_site.clone();
        } else {
            r.distribution.master = true;
            r.distribution.current_site = config.site.code.clone();
            if r.distribution.history.last().is_some_and(|m| m.op_id == res.op_id) {
                r.distribution.history.pop();
            }
        }
    }
    r.updated_at = now;
    requests::write(conn, &r)
}

/// Applies one of the controller's request commands (`REQUEST_APPLY`, `REQUEST_COMMIT`,
/// `REQUEST_ABORT`, `REQUEST_RESULT`, `REQUEST_WITHDRAWN`) inside the caller's store job.
/// Errors other than the store's are returned before anything is written (the command is then
/// recorded with the error). Returns the requests that arrived here as master (for the
/// arrival rules).
pub fn apply_command(
    conn: &Connection,
    config: Option<&SiteConfig>,
    cmd: &ControllerCommand,
    now: DateTime<Utc>,
) -> Result<Vec<Request>> {
    let configured = || config.ok_or(Error::NotConfigured);
    match cmd {
        ControllerCommand::ApplyOperation(op) => {
            apply(conn, configured()?, op, now).map(|_| vec![])
        }
        ControllerCommand::CommitOperation(d) => Ok(commit(conn, d, now)?.into_iter().collect()),
        ControllerCommand::AbortOperation(d) => abort(conn, d).map(|()| vec![]),
        ControllerCommand::OperationResult(r) => {
            result(conn, configured()?, r, now).map(|()| vec![])
        }
        ControllerCommand::Withdrawn(_) => Ok(vec![]),
        other => Err(Error::Internal(format!("{} is not a request command", other.kind()))),
    }
}

#[cfg(test)]
mod tests;
