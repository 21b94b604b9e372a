//! The operations console: server-rendered pages for central admins (maud, no JavaScript build).
//! Sign-in uses the same API tokens and roles as the admin API; the token lives in an HttpOnly,
//! SameSite=Strict cookie scoped to `/console`.
//!
//! - `/console` — the fleet view: every site with its agent's status (connected or offline
//!   since when, version, configuration applied vs current, outbox backlog, clock skew with
//!   a "clock alert" beyond `clock_skew_tolerance_ms`, store health), refreshed every few
//!   seconds.
//! - `/console/live` — the live branch panel: queues, longest waits, open counters per site,
//!   marked stale for offline sites.
//! - `/console/stats` — the statistics dashboard (SVG charts with their numbers as tables and
//!   CSV), filtered by date range and site; admins can rebuild statistics from raw events.
//! - `/console/quarantine` — events set aside, with the reason.
//! - `/console/requests` — the distributed-request ledger: backlog per lane, open and failed
//!   operations; admins cancel or retry them.
//! - `/console/rollouts` — agent upgrade rollouts and, per rollout, every site's state;
//!   admins pause, resume or abort them.
//!
//! Viewers see everything and change nothing: every changing action checks the admin role.

mod charts;
mod dashboard;
mod requests;
mod rollouts;

use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{AppendHeaders, Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use chrono::Utc;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use meridian_shared::config::ConfigSet;
use serde::Deserialize;

use crate::api::{AgentView, ApiState};
use crate::auth;
use crate::store::ApiToken;

const COOKIE: &str = "meridian_console";

pub fn router(state: ApiState) -> Router {
    let signed_in = Router::new()
        .route("/console", get(fleet))
        .route("/console/live", get(dashboard::live_page))
        .route("/console/stats", get(dashboard::stats_page))
        .route("/console/stats.csv", get(dashboard::stats_csv))
        .route("/console/stats/rebuild", post(dashboard::rebuild))
        .route("/console/quarantine", get(dashboard::quarantine_page))
        .route("/console/requests", get(requests::requests_page))
        .route("/console/requests/cancel", post(requests::cancel))
        .route("/console/requests/retry", post(requests::retry))
        .route("/console/rollouts", get(rollouts::list_page))
        .route("/console/rollouts/{id}", get(rollouts::detail_page))
        .route("/console/rollouts/pause", post(rollouts::pause))
        .route("/console/rollouts/resume", post(rollouts::resume))
        .route("/console/rollouts/abort", post(rollouts::abort))
        .route("/console/logout", post(logout))
        .layer(middleware::from_fn_with_state(state.clone(), require_sign_in));
    Router::new()
        .merge(signed_in)
        .route("/console/login", get(login_page).post(login))
        .with_state(state)
}

const STYLE: &str = r#"
body { font-family: system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2430; }
header { background: #1d2430; color: #fff; padding: .8rem 1.2rem; display: flex; justify-content: space-between; align-items: center; }
main { padding: 1.2rem; }
table { border-collapse: collapse; background: #fff; width: 100%; }
td, th { padding: .45rem .7rem; border-bottom: 1px solid #dde; text-align: left; }
.online { color: #137333; font-weight: 600; } .offline { color: #b3261e; font-weight: 600; }
.stale { color: #b06000; } .message { background: #fff3cd; padding: .6rem 1rem; border-radius: .4rem; }
button { padding: .5rem 1rem; }
nav a { color: #cfd8ea; margin-right: 1rem; text-decoration: none; } nav a.active { color: #fff; font-weight: 600; }
section.chart, section.site-live { background: #fff; margin: 1rem 0; padding: .8rem; border-radius: .4rem; }
section.chart table { margin-top: .5rem; } #filters { margin-bottom: 1rem; }
"#;

/// The page header: where you are, the navigation, who is signed in.
fn shell(who: Option<&ApiToken>, active: &str) -> Markup {
    let links = [
        ("fleet", "/console", "Fleet"),
        ("live", "/console/live", "Live"),
        ("stats", "/console/stats", "Statistics"),
        ("quarantine", "/console/quarantine", "Quarantine"),
        ("requests", "/console/requests", "Requests"),
        ("rollouts", "/console/rollouts", "Rollouts"),
    ];
    html! {
        header {
            span { "Meridian console" }
            nav { @for (key, href, label) in links { a href=(href) .active[key == active] { (label) } } }
            span { @if let Some(t) = who { span #who { (t.name) " (" (t.role.as_str()) ")" } } " "
                form method="post" action="/console/logout" style="display:inline" { button #logout { "Sign out" } } }
        }
    }
}

fn page(title: &str, head: Option<Markup>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · Meridian console" }
                style { (PreEscaped(STYLE)) }
                @if let Some(h) = head { (h) }
            }
            body { (body) }
        }
    }
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|h| {
        h.split(';').find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == COOKIE && !v.is_empty()).then(|| v.to_owned())
        })
    })
}

async fn signed_in_token(state: &ApiState, headers: &HeaderMap) -> Option<ApiToken> {
    let secret = cookie(headers)?;
    state.store.api_token_by_hash(&auth::hash_secret(&secret)).await.ok().flatten()
}

async fn require_sign_in(
    State(state): State<ApiState>,
    headers: HeaderMap,
    req: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    match signed_in_token(&state, &headers).await {
        Some(_) => next.run(req).await,
        None => Redirect::to("/console/login").into_response(),
    }
}

fn login_form(status: StatusCode, message: Option<&str>) -> Response {
    let body = html! {
        header { span { "Meridian console" } }
        main {
            @if let Some(m) = message { p .message #message { (m) } }
            form #login method="post" action="/console/login" {
                p { label for="token" { "API token " } input #token name="token" type="password" autocomplete="off" required; }
                button #login-submit type="submit" { "Sign in" }
            }
            p { "Use an admin or viewer API token (created with " code { "meridianctl token create" } ")." }
        }
    };
    (status, Html(page("Sign in", None, body).into_string())).into_response()
}

async fn login_page() -> Response {
    login_form(StatusCode::OK, None)
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(state): State<ApiState>, Form(form): Form<LoginForm>) -> Response {
    let token = form.token.trim().to_owned();
    let valid = token.len() <= 200
        && matches!(state.store.api_token_by_hash(&auth::hash_secret(&token)).await, Ok(Some(_)));
    if !valid {
        return login_form(StatusCode::UNAUTHORIZED, Some("Unknown API token."));
    }
    let cookie =
        format!("{COOKIE}={token}; Path=/console; HttpOnly; SameSite=Strict; Max-Age=43200");
    match HeaderValue::from_str(&cookie) {
        Ok(v) => {
            (AppendHeaders([(header::SET_COOKIE, v)]), Redirect::to("/console")).into_response()
        }
        Err(_) => login_form(StatusCode::BAD_REQUEST, Some("That token cannot be used here.")),
    }
}

async fn logout() -> Response {
    let clear = HeaderValue::from_static(
        "meridian_console=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0",
    );
    (AppendHeaders([(header::SET_COOKIE, clear)]), Redirect::to("/console/login")).into_response()
}

async fn fleet(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let who = signed_in_token(&state, &headers).await;
    let loaded = async {
        let (_, resources) = state.store.load_config().await?;
        let agents = state.store.list_agents().await?;
        Ok::<_, crate::Error>((ConfigSet::from_resources(resources), agents))
    }
    .await;
    let (config, agents) = match loaded {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(error = %e, "console could not load the fleet");
            let body = html! { main { p .message { "The controller's database is unavailable; retrying." } } };
            let head = html! { meta http-equiv="refresh" content="5"; };
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Html(page("Fleet", Some(head), body).into_string()),
            )
                .into_response();
        }
    };
    let now = Utc::now();
    let body = html! {
        (shell(who.as_ref(), "fleet"))
        main {
            table #fleet {
                tr { th { "Site" } th { "Name" } th { "Agent" } th { "Link" } th { "Version" } th { "Configuration" }
                     th { "Backlog" } th { "Clock skew" } th { "Store" } th { "Incidents" } }
                @for site in config.sites() {
                    @let agent = agents.iter().filter(|a| a.site == site.code && a.revoked_at.is_none()).max_by_key(|a| a.enrolled_at);
                    tr .site data-site=(site.code) {
                        td { (site.code) } td { (site.name) }
                        @match agent {
                            None => { td colspan="8" .stale { "no agent enrolled" } }
                            Some(a) => {
                                @let view = AgentView::new(a.clone(), state.clock_skew_tolerance);
                                td { (view.id.chars().take(8).collect::<String>()) }
                                td {
                                    @if view.connected { span .online .link { "connected" } }
                                    @else {
                                        span .offline .link { "offline" }
                                        @if let Some(t) = view.last_seen {
                                            " since " (t.format("%Y-%m-%d %H:%M:%S UTC"))
                                            " (" (humanize(now.signed_duration_since(t))) ")"
                                        } @else { " — never connected" }
                                    }
                                }
                                td { (view.version) }
                                td .config {
                                    (view.config_revision) " / " (view.site_revision)
                                    @if !view.config_current { span .stale { " behind" } }
                                }
                                td .backlog { (view.outbox_pending) }
                                td .clock {
                                    (format!("{:+} ms", view.clock_skew_ms))
                                    @if view.clock_alert { " " span .offline .clock-alert { "clock alert" } }
                                }
                                td { @if let Some(e) = &view.store_error { span .offline { (e) } } @else { "ok" } }
                                td .incidents {
                                    @if let Some(i) = &view.incident {
                                        span .offline { (i) }
                                        @if view.open_incidents > 1 { " (" (view.open_incidents) " open)" }
                                    } @else { "none" }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    let head = html! { meta http-equiv="refresh" content="3"; };
    Html(page("Fleet", Some(head), body).into_string()).into_response()
}

fn humanize(d: chrono::Duration) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86400 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86400),
    }
}
