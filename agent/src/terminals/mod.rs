//! The branch terminals: server-rendered HTML (maud) with a little project-written JavaScript,
//! served by the agent from its local store, so they keep working with the controller down.
//! Script and style are files the agent serves (`assets`): the pages' Content-Security-Policy
//! allows nothing inline.
//!
//! - `/kiosk` — customers take a ticket or check in for an appointment (public on the branch
//!   LAN);
//! - `/display` — "now serving", live over server-sent events (public);
//! - `/workstation` — staff log in at a counter and call, serve, transfer and end visits;
//!   reception checks in today's appointments there;
//! - `/branch` — the supervisor's status page;
//! - `/requests` — staff (same login as the workstation) search, read, create, edit, transfer,
//!   return and delete service requests.
//!
//! Every page shows `#offline-banner` while the branch is offline from central.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use crate::Context;
use crate::error::Error;
use crate::link::LinkStatus;

mod assets;
mod branch_page;
mod display;
mod kiosk;
mod requests;
mod workstation;

pub fn router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route("/", get(|| async { axum::response::Redirect::to("/kiosk") }))
        .route(assets::SCRIPT_PATH, get(assets::script))
        .route(assets::STYLE_PATH, get(assets::style))
        .route("/kiosk", get(kiosk::page))
        .route("/kiosk/tickets", post(kiosk::take_ticket))
        .route("/kiosk/tickets/{id}", get(kiosk::ticket))
        .route("/kiosk/check-in", post(kiosk::check_in))
        .route("/display", get(display::page))
        .route("/display/board", get(display::board))
        .route("/display/events", get(display::events))
        .route("/workstation", get(workstation::page))
        .route("/workstation/login", post(workstation::login))
        .route("/workstation/logout", post(workstation::logout))
        .route("/workstation/action", post(workstation::action))
        .route("/workstation/check-in", post(workstation::check_in))
        .route("/branch", get(branch_page::page))
        .route("/branch/unlock", post(branch_page::unlock))
        .route("/requests", get(requests::list).post(requests::create))
        .route("/requests/new", get(requests::new_form))
        .route("/requests/{id}", get(requests::detail))
        .route("/requests/{id}/edit", post(requests::edit))
        .route("/requests/{id}/operations", post(requests::operation))
        .route("/requests/{id}/delete", post(requests::delete))
        .layer(axum::middleware::from_fn_with_state(ctx.clone(), same_origin_forms))
        .with_state(ctx)
}

/// A form post must come from the agent's own pages (`Origin`, `Sec-Fetch-Site`): a page on
/// another site cannot make a signed-in workstation call, end or transfer a visit.
async fn same_origin_forms(
    State(ctx): State<Arc<Context>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.method() == axum::http::Method::POST
        && !meridian_shared::http_guard::same_origin(req.headers())
    {
        return error_page(
            &ctx,
            StatusCode::FORBIDDEN,
            "This form must be sent from the branch's own pages.",
        );
    }
    next.run(req).await
}

/// The page frame: title, the offline banner when the link is down, the body.
fn layout(title: &str, link: &LinkStatus, head: Option<Markup>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Meridian" }
                (assets::links())
                @if let Some(h) = head { (h) }
            }
            body {
                (offline_banner(link))
                (body)
            }
        }
    }
}

/// Shown while the branch is offline from central; everything keeps working locally.
fn offline_banner(link: &LinkStatus) -> Markup {
    html! {
        @if !link.connected {
            div #offline-banner role="status" {
                "Offline from central"
                @if let Some(since) = link.since { " since " (since.format("%H:%M:%S UTC")) }
                " — this branch keeps working; everything syncs when the link returns."
            }
        }
    }
}

/// A time in the site's own time zone.
fn local_time(ctx: &Context, t: DateTime<Utc>) -> String {
    match ctx.site_config().ok().and_then(|c| c.site.tz().ok()) {
        Some(tz) => t.with_timezone(&tz).format("%H:%M").to_string(),
        None => t.format("%H:%M UTC").to_string(),
    }
}

/// An error page with the right status; client mistakes are not logged as errors.
fn error_page(ctx: &Context, status: StatusCode, message: &str) -> Response {
    let link = ctx.link.borrow().clone();
    let body = html! {
        header { span { "Meridian" } }
        main { p .message { (message) } p { a href="/" data-back { "Back" } } }
    };
    (status, Html(layout("Error", &link, None, body).into_string())).into_response()
}

fn from_error(ctx: &Context, e: Error) -> Response {
    let (status, message) = match &e {
        Error::NotFound(_) => (StatusCode::NOT_FOUND, e.to_string()),
        Error::Validation(_) | Error::InvalidFields(_) => {
            (StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
        }
        Error::Conflict(_) => (StatusCode::CONFLICT, e.to_string()),
        Error::CheckIn(r) => {
            (StatusCode::from_u16(r.http_status()).unwrap_or(StatusCode::CONFLICT), e.to_string())
        }
        Error::NotConfigured => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Error::Store(_) | Error::StoreGone(_) | Error::Internal(_) => {
            tracing::error!(error = %e, "terminal request failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "The branch system cannot record this right now; please ask a member of staff."
                    .to_owned(),
            )
        }
    };
    error_page(ctx, status, &message)
}
