//! The branch supervisor's status page: queues and waiting times, counters and who is on them,
//! and the link to central (online/offline since when, outbox backlog, configuration revision).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use maud::{PreEscaped, html};
use meridian_shared::config::StaffRole;

use super::workstation::staff;
use super::{error_page, from_error, layout};
use crate::Context;
use crate::store::queries;
use crate::visits;

pub async fn page(State(ctx): State<Arc<Context>>, headers: HeaderMap) -> Response {
    let Ok(username) = staff(&ctx, &headers).await else {
        return Redirect::to("/workstation?msg=Log+in+as+a+supervisor+to+see+the+branch+status")
            .into_response();
    };
    let config = match ctx.site_config() {
        Ok(c) => c,
        Err(e) => return from_error(&ctx, e),
    };
    let supervisor = config
        .staff
        .iter()
        .any(|u| u.username.as_str() == username && u.roles.contains(&StaffRole::Supervisor));
    if !supervisor {
        return error_page(
            &ctx,
            StatusCode::FORBIDDEN,
            "The branch status page is for supervisors.",
        );
    }
    let now = ctx.clock.now();
    let cfg = config.clone();
    let data = ctx
        .db
        .read(move |c| {
            Ok((
                visits::queues(c, &cfg, now)?,
                visits::service_points(c, &cfg)?,
                queries::outbox_state(c)?,
                queries::config_revision(c)?,
            ))
        })
        .await;
    let (queues, points, (high, acked), revision) = match data {
        Ok(d) => d,
        Err(e) => return from_error(&ctx, e),
    };
    let link = ctx.link.borrow().clone();
    let store_error = ctx.db.health();
    let clock = ctx.clock_health();
    let body = html! {
        header { span { (config.site.name) " · branch status" } span { (username) } }
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
        }
        script { (PreEscaped("new EventSource('/display/events').onmessage = () => location.reload();")) }
    };
    Html(layout("Branch status", &link, None, body).into_string()).into_response()
}
