//! `/console/requests`: the distributed-request ledger for operators — the backlog per
//! lane (pool × target site) with its oldest operation's age, the open operations and the
//! latest failed ones (status, result, reason, source → target, request, age). Admins cancel
//! an open operation or retry one that can be retried with a form post; viewers see the same
//! page without the buttons (and a post from them is refused).

use axum::Extension;
use axum::Form;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use maud::{Markup, html};
use serde::Deserialize;

use super::{SignedIn, page, shell};
use crate::api::ApiState;
use crate::store::requests::{LaneBacklog, LedgerOp, OpsFilter};

/// Open operations shown (newest first).
const OPEN_SHOWN: u32 = 200;
/// Failed operations shown (newest first).
const FAILED_SHOWN: u32 = 100;

#[derive(Debug, Default, Deserialize)]
pub struct Notice {
    #[serde(default)]
    done: String,
}

pub async fn requests_page(
    State(state): State<ApiState>,
    Extension(me): Extension<SignedIn>,
    Query(notice): Query<Notice>,
) -> Response {
    let now = Utc::now();
    let loaded = async {
        let lanes = state.store.request_backlog(now).await?;
        let open = state
            .store
            .list_request_ops(&OpsFilter {
                status: Some("open".into()),
                limit: OPEN_SHOWN,
                ..OpsFilter::default()
            })
            .await?;
        let failed = state
            .store
            .list_request_ops(&OpsFilter {
                status: Some("failed".into()),
                limit: FAILED_SHOWN,
                ..OpsFilter::default()
            })
            .await?;
        Ok::<_, crate::Error>((lanes, open, failed))
    }
    .await;
    let (lanes, open, failed) = match loaded {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(error = %e, "console could not load the request ledger");
            return message_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "The controller's database is unavailable; retrying.",
            );
        }
    };
    let admin = me.is_admin().then_some(&me);
    let notice = match notice.done.as_str() {
        "cancelled" => Some("Operation cancelled."),
        "retried" => Some("Operation sent again."),
        _ => None,
    };
    let body = html! {
        (shell(&me, "requests"))
        main {
            @if let Some(n) = notice { p .message #notice { (n) } }
            h2 { "Backlog" }
            (backlog_table(&lanes))
            h2 { "Open operations" }
            (ops_table("open-ops", &open, now, admin, OPEN_SHOWN))
            h2 { "Failed operations" }
            (ops_table("failed-ops", &failed, now, admin, FAILED_SHOWN))
        }
    };
    Html(page("Requests", None, body).into_string()).into_response()
}

fn backlog_table(lanes: &[LaneBacklog]) -> Markup {
    html! {
        @if lanes.is_empty() {
            p #backlog-empty { "No open operations." }
        } @else {
            table #backlog {
                tr { th { "Pool" } th { "Target" } th { "Open" } th { "Retrying" } th { "Oldest" } }
                @for l in lanes {
                    tr .lane data-pool=(l.pool) data-target=(l.target_site) {
                        td { (l.pool) } td { (l.target_site) } td .open { (l.open) }
                        td .retrying { (l.retrying) } td .oldest { (age(l.oldest_age_seconds)) }
                    }
                }
            }
        }
    }
}

fn ops_table(
    id: &str,
    ops: &[LedgerOp],
    now: DateTime<Utc>,
    admin: Option<&SignedIn>,
    cap: u32,
) -> Markup {
    html! {
        @if ops.is_empty() {
            p id=(format!("{id}-empty")) { "None." }
        } @else {
            table id=(id) {
                tr { th { "Request" } th { "Operation" } th { "Source → target" } th { "Pool" }
                     th { "Status" } th { "Result" } th { "Reason" } th { "Attempt" } th { "Age" }
                     @if admin.is_some() { th { "" } } }
                @for op in ops {
                    tr .op data-op=(op.op_id) data-target=(op.target_site) {
                        td .request { (op.human_id) }
                        td { (op.kind) @if let Some(m) = &op.mode { " (" (m) ")" } }
                        td { (op.source_site) " → " (op.target_site) }
                        td { (op.pool) }
                        td .status { (op.status) }
                        td .result { (op.result.as_deref().unwrap_or("")) }
                        td .reason { (op.reason.as_deref().unwrap_or("")) }
                        td { (op.attempt) }
                        td { (age((now - op.created_at).num_milliseconds() as f64 / 1000.0)) }
                        @if let Some(admin) = admin {
                            td {
                                @if crate::store::requests::OPEN.contains(&op.status.as_str()) {
                                    (action_form(admin, "cancel", "Cancel", op))
                                }
                                @if retryable(op) { (action_form(admin, "retry", "Retry", op)) }
                            }
                        }
                    }
                }
            }
            @if ops.len() as u32 >= cap {
                p .stale { "Showing the newest " (cap) "; use " code { "meridianctl requests ops" } " for more." }
            }
        }
    }
}

/// What the ledger accepts to retry: an operation waiting to retry, or a failed copy or delete
/// (not an update, not an ownership move).
fn retryable(op: &LedgerOp) -> bool {
    match op.status.as_str() {
        "retry" => true,
        "failed" => op.mode.as_deref() != Some("ownership") && op.kind != "update",
        _ => false,
    }
}

fn action_form(me: &SignedIn, action: &str, label: &str, op: &LedgerOp) -> Markup {
    html! {
        form .inline method="post" action=(format!("/console/requests/{action}")) {
            (me.csrf_field())
            input type="hidden" name="op_id" value=(op.op_id);
            input type="hidden" name="target" value=(op.target_site);
            button .(action) type="submit" { (label) }
        }
    }
}

fn age(seconds: f64) -> String {
    let s = seconds.max(0.0) as i64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86400 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86400),
    }
}

fn message_page(status: StatusCode, message: &str) -> Response {
    let body = html! { main { p .message #message { (message) } p { a href="/console/requests" { "Back to the requests" } } } };
    (status, Html(page("Requests", None, body).into_string())).into_response()
}

#[derive(Debug, Deserialize)]
pub struct OpForm {
    op_id: String,
    target: String,
    #[serde(default)]
    reason: String,
}

/// Admin only: cancels an open operation.
pub async fn cancel(
    State(state): State<ApiState>,
    Extension(me): Extension<SignedIn>,
    Form(form): Form<OpForm>,
) -> Response {
    act(&state, &me, &form, Action::Cancel).await
}

/// Admin only: sends an operation again now.
pub async fn retry(
    State(state): State<ApiState>,
    Extension(me): Extension<SignedIn>,
    Form(form): Form<OpForm>,
) -> Response {
    act(&state, &me, &form, Action::Retry).await
}

#[derive(Clone, Copy)]
enum Action {
    Cancel,
    Retry,
}

async fn act(state: &ApiState, me: &SignedIn, form: &OpForm, action: Action) -> Response {
    let who = &me.token;
    if !me.is_admin() {
        return message_page(
            StatusCode::FORBIDDEN,
            "Your token is read-only (viewer): only admins can cancel or retry operations.",
        );
    }
    let Ok(op_id) = form.op_id.trim().parse::<uuid::Uuid>() else {
        return message_page(StatusCode::NOT_FOUND, "No such operation.");
    };
    let (op_id, target) = (op_id.to_string(), form.target.trim().to_uppercase());
    let now = Utc::now();
    let done = match action {
        Action::Cancel => {
            let reason = match form.reason.trim() {
                "" => format!("cancelled by {} (console)", who.name),
                r => r.chars().take(500).collect(),
            };
            state.store.cancel_request_op(&op_id, &target, &reason, now).await.map(|_| "cancelled")
        }
        Action::Retry => {
            state.store.retry_request_op(&op_id, &target, now).await.map(|_| "retried")
        }
    };
    match done {
        Ok(done) => {
            tracing::info!(op = %op_id, target = %target, by = %who.name, done, "request operation changed from the console");
            match state.store.flush_request_commands().await {
                Ok(moved) if moved > 0 => {
                    state.commands_changed.send_modify(|n| *n = n.wrapping_add(1))
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "staged request commands not flushed; the ledger sweep will")
                }
            }
            Redirect::to(&format!("/console/requests?done={done}")).into_response()
        }
        Err(crate::Error::NotFound(_)) => message_page(StatusCode::NOT_FOUND, "No such operation."),
        Err(crate::Error::Conflict(m)) => message_page(StatusCode::CONFLICT, &m),
        Err(e) => {
            tracing::error!(error = %e, "console could not change a request operation");
            message_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "The store is unavailable; nothing changed.",
            )
        }
    }
}
