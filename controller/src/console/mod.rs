//! The operations console: server-rendered pages for central admins (maud, no JavaScript at
//! all; the style sheet is served from `/console/assets/`, nothing inline). Sign-in uses the
//! same API tokens and roles as the admin API and opens a server-side session (`session`):
//! the cookie holds a session id, never the token, and every form post carries the session's
//! CSRF token.
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
pub mod session;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router, middleware};
use chrono::Utc;
use maud::{DOCTYPE, Markup, html};
use meridian_shared::config::ConfigSet;

use crate::api::{AgentView, ApiState};
pub use session::SignedIn;

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
        .route("/console/logout", post(session::logout))
        .layer(middleware::from_fn_with_state(state.clone(), session::require_sign_in));
    Router::new()
        .merge(signed_in)
        .route("/console/login", get(session::login_page).post(session::login))
        .route(STYLE_PATH, get(style_sheet))
        .with_state(state)
}

/// The style sheet every page links (the pages' Content-Security-Policy allows no inline
/// style); its URL carries the version, so browsers may keep it for a day.
const STYLE_PATH: &str = "/console/assets/console.css";
const STYLE: &str = include_str!("console.css");

async fn style_sheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        STYLE,
    )
        .into_response()
}

/// The page header: where you are, the navigation, who is signed in.
fn shell(me: &SignedIn, active: &str) -> Markup {
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
            span { span #who { (me.token.name) " (" (me.token.role.as_str()) ")" } " "
                form .inline method="post" action="/console/logout" { (me.csrf_field()) button #logout { "Sign out" } } }
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
                link rel="stylesheet" href=(format!("{STYLE_PATH}?v={}", meridian_shared::VERSION));
                @if let Some(h) = head { (h) }
            }
            body { (body) }
        }
    }
}

async fn fleet(State(state): State<ApiState>, Extension(me): Extension<SignedIn>) -> Response {
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
        (shell(&me, "fleet"))
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
