//! The branch supervisor's status page: queues and waiting times, counters and who is on them,
//! the link to central (online/offline since when, outbox backlog, configuration revision), and
//! the sign-in locks in force, which a supervisor can lift.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use maud::html;

use super::workstation::session;
use super::{error_page, from_error, layout};
use crate::Context;
use crate::auth;
use crate::store::queries;
use crate::visits;
use meridian_shared::events::LockedSubject;

pub async fn page(State(ctx): State<Arc<Context>>, headers: HeaderMap) -> Response {
    let Ok(signed_in) = session(&ctx, &headers).await else {
        return Redirect::to("/workstation?msg=Log+in+as+a+supervisor+to+see+the+branch+status")
            .into_response();
    };
    let config = match ctx.site_config() {
        Ok(c) => c,
        Err(e) => return from_error(&ctx, e),
    };
    let supervisor = signed_in.is_supervisor();
    if !supervisor {
        return error_page(
            &ctx,
            StatusCode::FORBIDDEN,
            "The branch status page is for supervisors.",
        );
    }
    let now = ctx.clock.now();
    let tz = match config.site.tz() {
        Ok(tz) => tz,
        Err(e) => return from_error(&ctx, crate::error::Error::Internal(e)),
    };
    let cfg = config.clone();
    let data = ctx
        .db
        .read(move |c| {
            Ok((
                visits::queues(c, &cfg, now)?,
                visits::service_points(c, &cfg)?,
                queries::outbox_state(c)?,
                queries::config_revision(c)?,
                auth::throttle::locks(c, &cfg, now.timestamp_millis())?,
            ))
        })
        .await;
    let (queues, points, (high, acked), revision, locks) = match data {
        Ok(d) => d,
        Err(e) => return from_error(&ctx, e),
    };
    let link = ctx.link.borrow().clone();
    let store_error = ctx.db.health();
    let clock = ctx.clock_health();
    let body = html! {
        header { span { (config.site.name) " · branch status" } span { (signed_in.username) } }
        main {
            h2 { "Link to central" }
            table #link {
                tr { th { "State" } td #link-state { @if link.connected { "online" } @else { "offline" } } }
                tr { th { "Since" } td { (link.since.map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string()).unwrap_or_else(|| "—".into())) } }
                tr { th { "Events waiting to sync" } td #backlog { (high.saturating_sub(acked)) } }
                tr { th { "Configuration revision" } td #config-revision { (revision) } }
                @if let Some(e) = &link.last_error { tr { th { "Last link error" } td { (e) } } }
                @if let Some(e) = &store_error { tr { th { "Local store" } td .message { (e) } } }
                @if let Some(alert) = &clock.alert { tr { th { "Clock" } td #clock-alert .message { (alert) } } }
            }
            h2 { "Queues" }
            table #queues {
                tr { th { "Queue" } th { "Waiting" } th { "Longest wait" } }
                @for q in &queues { tr { td { (q.name) } td { (q.waiting) } td { (format!("{} min", q.longest_wait_secs / 60)) } } }
            }
            h2 { "Counters" }
            table #counters {
                tr { th { "Counter" } th { "Open" } th { "Staff" } th { "Current" } }
                @for p in &points {
                    tr {
                        td { (p.name) }
                        td { @if p.open { "open" } @else { "closed" } }
                        td { (p.staff.clone().unwrap_or_else(|| "—".into())) }
                        td { (p.current.as_ref().map(|v| v.ticket.clone()).unwrap_or_else(|| "—".into())) }
                    }
                }
            }
            h2 { "Locked sign-ins" }
            @if locks.is_empty() { p .muted #no-locks { "No user or address is locked." } }
            @else {
                table #locks {
                    tr { th { "Locked" } th { "Failed attempts" } th { "Until" } th {} }
                    @for l in &locks {
                        tr {
                            td { (match l.subject { LockedSubject::User => "user ", LockedSubject::Address => "address " }) (l.name) }
                            td { (l.failures) }
                            td { (l.until.with_timezone(&tz).format("%H:%M:%S")) }
                            td {
                                form method="post" action="/branch/unlock" {
                                    input type="hidden" name="subject" value=(match l.subject { LockedSubject::User => "user", LockedSubject::Address => "address" });
                                    input type="hidden" name="name" value=(l.name);
                                    button .unlock type="submit" aria-label=(format!("Unlock {}", l.name)) { "Unlock" }
                                }
                            }
                        }
                    }
                }
            }
        }
        // `terminals.js` reloads the page on every branch change.
        div hidden data-live="reload" {}
    };
    Html(layout("Branch status", &link, None, body).into_string()).into_response()
}

#[derive(Debug, serde::Deserialize)]
pub struct UnlockForm {
    subject: String,
    name: String,
}

/// A supervisor lifts a sign-in lock from the branch status page.
pub async fn unlock(
    State(ctx): State<Arc<Context>>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<UnlockForm>,
) -> Response {
    match session(&ctx, &headers).await {
        Ok(s) if s.is_supervisor() => {}
        Ok(_) => {
            return error_page(
                &ctx,
                StatusCode::FORBIDDEN,
                "Only supervisors can unlock sign-ins.",
            );
        }
        Err(_) => {
            return Redirect::to(
                "/workstation?msg=Log+in+as+a+supervisor+to+see+the+branch+status",
            )
            .into_response();
        }
    }
    let subject = match form.subject.as_str() {
        "user" => LockedSubject::User,
        "address" => LockedSubject::Address,
        _ => return error_page(&ctx, StatusCode::UNPROCESSABLE_ENTITY, "Unknown kind of lock."),
    };
    let name = form.name.clone();
    match ctx.db.write(move |c| auth::throttle::unlock(c, subject, &name)).await {
        Ok(_) => {
            tracing::info!(subject = ?subject, name = %form.name, "sign-in lock lifted by a supervisor");
            Redirect::to("/branch").into_response()
        }
        Err(e) => from_error(&ctx, e),
    }
}
