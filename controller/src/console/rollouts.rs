//! `/console/rollouts`: agent upgrade rollouts for operators — the list (state,
//! release, wave, sites per state) and one rollout's page (its settings, why it halted, every
//! site with its state, reason, wave, versions, command and maintenance window). Admins pause,
//! resume or abort with a form post; viewers see the same pages without the buttons (and a
//! post from them is refused).

use axum::Extension;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use maud::{Markup, html};
use meridian_shared::config::ConfigSet;
use serde::Deserialize;

use super::{SignedIn, page, shell};
use crate::api::ApiState;
use crate::api::rollouts::{RolloutView, SiteView};
use crate::rollouts::{RolloutState, SiteState, WindowState};
use crate::store::rollouts::{Rollout, RolloutAction, RolloutFilter};

/// Rollouts listed (newest first).
const LISTED: u32 = 200;

#[derive(Debug, Default, Deserialize)]
pub struct Notice {
    #[serde(default)]
    done: String,
}

pub async fn list_page(
    State(state): State<ApiState>,
    Extension(me): Extension<SignedIn>,
) -> Response {
    let filter = RolloutFilter { state: None, limit: LISTED };
    let rollouts = match state.store.list_rollouts(&filter).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "console could not load the rollouts");
            return message_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "The controller's database is unavailable; retrying.",
            );
        }
    };
    let body = html! {
        (shell(&me, "rollouts"))
        main {
            @if rollouts.is_empty() {
                p #rollouts-empty { "No rollouts yet. Create one with " code { "meridianctl rollouts create" } "." }
            } @else {
                table #rollouts {
                    tr { th { "Rollout" } th { "Release" } th { "State" } th { "Wave" } th { "Sites" }
                         th { "Created" } th { "Reason" } }
                    @for r in &rollouts {
                        tr .rollout data-rollout=(r.id) data-state=(r.state.as_str()) {
                            td { a href=(format!("/console/rollouts/{}", r.id)) { (short(&r.id)) } }
                            td { (r.version) " · " (r.platform) }
                            td .state { (r.state.as_str()) }
                            td { (wave(r)) }
                            td .counts { (counts(r)) }
                            td { (r.created_at.format("%Y-%m-%d %H:%M UTC")) " by " (r.created_by) }
                            td .reason { (r.halted_reason.as_deref().unwrap_or("")) }
                        }
                    }
                }
                @if rollouts.len() as u32 >= LISTED {
                    p .stale { "Showing the newest " (LISTED) "; use " code { "meridianctl rollouts list" } " for more." }
                }
            }
        }
    };
    let head = html! { meta http-equiv="refresh" content="5"; };
    Html(page("Rollouts", Some(head), body).into_string()).into_response()
}

pub async fn detail_page(
    State(state): State<ApiState>,
    Extension(me): Extension<SignedIn>,
    Path(id): Path<String>,
    Query(notice): Query<Notice>,
) -> Response {
    let Ok(key) = id.trim().parse::<uuid::Uuid>() else {
        return message_page(StatusCode::NOT_FOUND, "No such rollout.");
    };
    let loaded = async {
        let detail = state.store.rollout(key).await?;
        let (_, resources) = state.store.load_config().await?;
        Ok::<_, crate::Error>((detail, ConfigSet::from_resources(resources)))
    }
    .await;
    let view = match loaded {
        Ok((Some(d), config)) => RolloutView::of(d, &config, Utc::now()),
        Ok((None, _)) => return message_page(StatusCode::NOT_FOUND, "No such rollout."),
        Err(e) => {
            tracing::error!(error = %e, "console could not load a rollout");
            return message_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "The controller's database is unavailable; retrying.",
            );
        }
    };
    let notice = match notice.done.as_str() {
        "paused" => Some("Rollout paused: nothing more is sent until it is resumed."),
        "resumed" => Some("Rollout resumed."),
        "aborted" => Some("Rollout aborted: what had not switched was cancelled."),
        _ => None,
    };
    let r = &view.rollout;
    let body = html! {
        (shell(&me, "rollouts"))
        main {
            @if let Some(n) = notice { p .message #notice { (n) } }
            h2 { "Rollout " (r.id) }
            table #rollout data-state=(r.state.as_str()) {
                tr { th { "Release" } td { (r.version) " for " (r.platform) } }
                tr { th { "State" } td #state { (r.state.as_str()) } }
                @if let Some(why) = &r.halted_reason { tr { th { "Reason" } td #halted-reason { (why) } } }
                tr { th { "Wave" } td { (wave(r)) @if let Some(t) = r.next_wave_at { " · next wave at " (t.format("%Y-%m-%d %H:%M:%S UTC")) } } }
                tr { th { "Sites" } td { (counts(r)) } }
                tr { th { "Targets" } td { code { (r.targets) } } }
                tr { th { "Waves" } td { code { (r.waves) } " · pause " (r.wave_pause_s) " s" } }
                tr { th { "Maintenance window" } td { (window_text(&r.window)) } }
                tr { th { "Max failures" } td { (r.max_failures) } }
                tr { th { "Downgrade allowed" } td { (if r.allow_downgrade { "yes" } else { "no" }) } }
                tr { th { "Health timeout" } td { (r.health_timeout_s.map(|t| format!("{t} s")).unwrap_or_else(|| "controller default".into())) } }
                tr { th { "Created" } td { (r.created_at.format("%Y-%m-%d %H:%M:%S UTC")) " by " (r.created_by) } }
            }
            @if me.is_admin() && !r.state.is_finished() {
                p #actions {
                    @if r.state == RolloutState::Running { (action_form(&me, "pause", "Pause", r)) }
                    @if r.state == RolloutState::Paused { (action_form(&me, "resume", "Resume", r)) }
                    " " (action_form(&me, "abort", "Abort", r))
                }
            }
            h2 { "Sites" }
            (sites_table(&view.sites))
            p { a href="/console/rollouts" { "All rollouts" } }
        }
    };
    let head = html! { meta http-equiv="refresh" content="5"; };
    Html(page("Rollout", Some(head), body).into_string()).into_response()
}

fn sites_table(sites: &[SiteView]) -> Markup {
    html! {
        @if sites.is_empty() {
            p #sites-empty { "None." }
        } @else {
            table #sites {
                tr { th { "Site" } th { "Wave" } th { "State" } th { "Reason" } th { "From" } th { "To" }
                     th { "Command" } th { "Window" } th { "Updated" } }
                @for v in sites {
                    @let s = &v.site;
                    tr .site data-site=(s.site) data-state=(s.state.as_str()) {
                        td { (s.site) }
                        td { (s.wave.map(|w| w.to_string()).unwrap_or_else(|| "-".into())) }
                        td .state .(state_class(s.state)) { (s.state.as_str()) }
                        td .reason { (s.reason.as_deref().unwrap_or("")) }
                        td { (s.from_version.as_deref().unwrap_or("-")) }
                        td { (s.to_version) }
                        td {
                            @match s.command_seq {
                                Some(seq) => { "#" (seq) @if s.delivered { " delivered" } @else { " queued" }
                                    @if let Some(t) = s.switch_before { " · switch before " (t.format("%Y-%m-%d %H:%M UTC")) } }
                                None => { "not sent" }
                            }
                            @if s.cancel_seq.is_some() { " · cancelled" }
                        }
                        td .window { (window_state_text(v.window.as_ref())) }
                        td { (s.updated_at.format("%Y-%m-%d %H:%M:%S UTC")) }
                    }
                }
            }
        }
    }
}

fn state_class(s: SiteState) -> &'static str {
    match s {
        SiteState::Healthy => "online",
        SiteState::Failed | SiteState::RolledBack => "offline",
        _ => "",
    }
}

fn window_text(w: &serde_json::Value) -> String {
    match (w.get("start").and_then(|v| v.as_str()), w.get("end").and_then(|v| v.as_str())) {
        (Some(s), Some(e)) => format!("{s}-{e}, each site's time"),
        _ => "outside each site's business hours".into(),
    }
}

fn window_state_text(w: Option<&WindowState>) -> String {
    let t = |t: &DateTime<Utc>| t.format("%Y-%m-%d %H:%M UTC").to_string();
    match w {
        None => String::new(),
        Some(WindowState::Open { until }) => format!("open until {}", t(until)),
        Some(WindowState::Closed { opens_at }) => format!("closed, opens {}", t(opens_at)),
        Some(WindowState::Unavailable { reason }) => reason.clone(),
    }
}

fn short(id: &uuid::Uuid) -> String {
    id.to_string().chars().take(8).collect()
}

fn wave(r: &Rollout) -> String {
    if r.wave_count == 0 { "-".into() } else { format!("{} of {}", r.current_wave, r.wave_count) }
}

/// `healthy 3 · pending 2 …`: the states with sites.
fn counts(r: &Rollout) -> String {
    let parts: Vec<String> = r
        .site_counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(s, n)| format!("{} {n}", s.as_str()))
        .collect();
    if parts.is_empty() { "none".into() } else { parts.join(" · ") }
}

fn action_form(me: &SignedIn, action: &str, label: &str, r: &Rollout) -> Markup {
    html! {
        form .inline method="post" action=(format!("/console/rollouts/{action}")) {
            (me.csrf_field())
            input type="hidden" name="id" value=(r.id);
            button .(action) type="submit" { (label) }
        }
    }
}

fn message_page(status: StatusCode, message: &str) -> Response {
    let body = html! { main { p .message #message { (message) } p { a href="/console/rollouts" { "Back to the rollouts" } } } };
    (status, Html(page("Rollouts", None, body).into_string())).into_response()
}

#[derive(Debug, Deserialize)]
pub struct RolloutForm {
    id: String,
    #[serde(default)]
    reason: String,
}

/// Admin only: pauses a running rollout.
pub async fn pause(
    State(state): State<ApiState>,
    Extension(me): Extension<SignedIn>,
    Form(form): Form<RolloutForm>,
) -> Response {
    act(&state, &me, &form, "pause").await
}

/// Admin only: resumes a paused rollout.
pub async fn resume(
    State(state): State<ApiState>,
    Extension(me): Extension<SignedIn>,
    Form(form): Form<RolloutForm>,
) -> Response {
    act(&state, &me, &form, "resume").await
}

/// Admin only: aborts a rollout (cancels what has not switched).
pub async fn abort(
    State(state): State<ApiState>,
    Extension(me): Extension<SignedIn>,
    Form(form): Form<RolloutForm>,
) -> Response {
    act(&state, &me, &form, "abort").await
}

async fn act(state: &ApiState, me: &SignedIn, form: &RolloutForm, action: &str) -> Response {
    let who = &me.token;
    if !me.is_admin() {
        return message_page(
            StatusCode::FORBIDDEN,
            "Your token is read-only (viewer): only admins can pause, resume or abort rollouts.",
        );
    }
    let Ok(id) = form.id.trim().parse::<uuid::Uuid>() else {
        return message_page(StatusCode::NOT_FOUND, "No such rollout.");
    };
    let (change, done) = match action {
        "pause" => (RolloutAction::Pause, "paused"),
        "resume" => (RolloutAction::Resume, "resumed"),
        _ => {
            let reason = match form.reason.trim() {
                "" => format!("aborted by {} (console)", who.name),
                r => format!(
                    "aborted by {} (console): {}",
                    who.name,
                    r.chars().take(500).collect::<String>()
                ),
            };
            (RolloutAction::Abort { reason }, "aborted")
        }
    };
    match state.store.change_rollout(id, &change, Utc::now()).await {
        Ok(_) => {
            tracing::info!(rollout = %id, by = %who.name, done, "rollout changed from the console");
            if done == "aborted" {
                state.commands_changed.send_modify(|n| *n = n.wrapping_add(1));
            }
            Redirect::to(&format!("/console/rollouts/{id}?done={done}")).into_response()
        }
        Err(crate::Error::NotFound(_)) => message_page(StatusCode::NOT_FOUND, "No such rollout."),
        Err(crate::Error::Conflict(m)) => message_page(StatusCode::CONFLICT, &m),
        Err(e) => {
            tracing::error!(error = %e, "console could not change a rollout");
            message_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "The store is unavailable; nothing changed.",
            )
        }
    }
}
