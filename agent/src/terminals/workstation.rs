//! The counter workstation. Staff log in with their central credentials — verified locally
//! against the synced hash, so it works offline — pick a counter, and work the queue: call next,
//! recall, start serving, no-show, recycle, park, transfer, end. Reception sees today's
//! appointments with their attendance and checks customers in ("Check in"). Plain forms with
//! redirects; the session lives in an HttpOnly cookie.

use std::sync::Arc;

use axum::Form;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{AppendHeaders, Html, IntoResponse, Redirect, Response};
use maud::{Markup, html};
use meridian_shared::Code;
use meridian_shared::visits::{Location, Op, Position};
use serde::Deserialize;

use super::{from_error, layout};
use crate::Context;
use crate::auth::{self, Refusal, SignInRefusal, StaffSession};
use crate::error::Error;
use crate::{appointments, check_in, visits};

pub const SESSION_COOKIE: &str = "meridian_session";

pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|h| {
        h.split(';').find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name && !v.is_empty()).then(|| v.to_owned())
        })
    })
}

/// The staff member behind the session cookie.
pub async fn staff(ctx: &Context, headers: &HeaderMap) -> Result<String, Refusal> {
    session(ctx, headers).await.map(|s| s.username)
}

/// The session behind the cookie, checked against the configuration in force (roles as of
/// now, the counter it signed in at).
pub async fn session(ctx: &Context, headers: &HeaderMap) -> Result<StaffSession, Refusal> {
    let token = cookie(headers, SESSION_COOKIE).ok_or(Refusal::Missing)?;
    let config = ctx.site_config().map_err(|_| Refusal::Invalid)?;
    let now = ctx.clock.now().timestamp_millis();
    match ctx.db.read(move |c| auth::session(c, &config, &token, now)).await {
        Ok(r) => r,
        Err(_) => Err(Refusal::Invalid),
    }
}

#[derive(Debug, Deserialize, Default)]
pub struct Message {
    msg: Option<String>,
}

pub async fn page(
    State(ctx): State<Arc<Context>>,
    headers: HeaderMap,
    Query(m): Query<Message>,
) -> Response {
    let session = match session(&ctx, &headers).await {
        Ok(s) => s,
        Err(Refusal::Expired) => {
            return login_page(
                &ctx,
                StatusCode::OK,
                Some("Your session has expired; please log in again."),
            );
        }
        Err(Refusal::Ended) => {
            return login_page(
                &ctx,
                StatusCode::OK,
                Some("Your session has ended (your account was changed); please log in again."),
            );
        }
        Err(_) => return login_page(&ctx, StatusCode::OK, m.msg.as_deref()),
    };
    match render(&ctx, &session.username, session.counter.as_deref(), m.msg.as_deref()).await {
        Ok(markup) => Html(markup.into_string()).into_response(),
        Err(e) => from_error(&ctx, e),
    }
}

fn login_page(ctx: &Context, status: StatusCode, message: Option<&str>) -> Response {
    let config = ctx.site_config().ok();
    let link = ctx.link.borrow().clone();
    let body = html! {
        header { span { (config.as_ref().map(|c| c.site.name.clone()).unwrap_or_default()) } span { "Counter workstation" } }
        main {
            @if let Some(m) = message { p .message #message { (m) } }
            form #login method="post" action="/workstation/login" {
                p { label for="username" { "User name " } input #username name="username" autocomplete="username" required; }
                p { label for="password" { "Password " } input #password name="password" type="password" autocomplete="current-password" required; }
                p {
                    label for="counter" { "Counter " }
                    select #counter name="counter" {
                        @if let Some(c) = &config {
                            @for sp in &c.service_points { option value=(sp.code) { (sp.name) } }
                        }
                        option value="" { "— no counter (supervisor) —" }
                    }
                }
                button .primary #login-submit type="submit" { "Log in" }
            }
        }
    };
    (status, Html(layout("Log in", &link, None, body).into_string())).into_response()
}

async fn render(
    ctx: &Arc<Context>,
    username: &str,
    counter: Option<&str>,
    message: Option<&str>,
) -> crate::Result<Markup> {
    let config = ctx.site_config()?;
    let now = ctx.clock.now();
    let tz = config.site.tz().map_err(Error::Internal)?;
    let today = meridian_shared::business_day::business_day(tz, now);
    let (queues, points, booked) = {
        let config = config.clone();
        ctx.db
            .read(move |c| {
                Ok((
                    visits::queues(c, &config, now)?,
                    visits::service_points(c, &config)?,
                    appointments::of_day(c, today)?,
                ))
            })
            .await?
    };
    let me = config.staff.iter().find(|u| u.username.as_str() == username);
    let point = counter.and_then(|c| points.iter().find(|p| p.code == c));
    let current = point.and_then(|p| p.current.clone());
    let link = ctx.link.borrow().clone();
    let body = html! {
        header {
            span { (config.site.name) " · " (me.map(|u| u.name.clone()).unwrap_or_else(|| username.to_owned())) }
            span { @if let Some(p) = point { (p.name) } @else { "No counter" } }
        }
        main {
            @if let Some(m) = message { p .message #message { (m) } }
            h2 { "Current customer" }
            p .ticket #current-ticket { @if let Some(v) = &current { (v.ticket) } @else { "—" } }
            @if let Some(v) = &current { p #current-status { (v.status) " · " (v.service) } }
            @if let Some(c) = current.as_ref().and_then(|v| v.customer.as_ref()) {
                @if let Some(name) = &c.name { p #current-customer-name { (name) } }
                @if let Some(note) = &c.note { p .muted #current-customer-note { (note) } }
            }
            @if point.is_some() {
                form method="post" action="/workstation/action" {
                    @if current.is_none() {
                        button .primary #call-next name="action" value="call-next" { "Call next" }
                    } @else {
                        button #recall name="action" value="recall" { "Recall" }
                        button #start-serving name="action" value="start-serving" { "Start serving" }
                        button #no-show name="action" value="no-show" { "No-show" }
                        button #recycle name="action" value="recycle" { "Recycle" }
                        button #park name="action" value="park" { "Park" }
                        button .primary #end name="action" value="end" { "End" }
                        br;
                        select #transfer-queue name="queue" {
                            @for q in &config.queues { option value=(q.code) { (q.name) } }
                        }
                        button #transfer name="action" value="transfer" { "Transfer" }
                    }
                }
            }
            h2 { "Queues" }
            table #queues {
                tr { th { "Queue" } th { "Waiting" } th { "Longest wait" } }
                @for q in &queues {
                    tr data-queue=(q.code) { td { (q.name) } td .waiting { (q.waiting) } td { (format!("{} min", q.longest_wait_secs / 60)) } }
                }
            }
            h2 { "Today's appointments" }
            @if booked.is_empty() { p .muted #no-appointments { "No appointments today." } }
            @else {
                table #appointments {
                    tr { th { "Time" } th { "Customer" } th { "Service" } th { "Reference" } th { "Status" } th { "Ticket" } th {} }
                    @for a in &booked {
                        tr data-appointment=(a.id) {
                            td { (a.start.get(11..).unwrap_or(&a.start)) }
                            td { (a.customer_name) }
                            td { (a.service) }
                            td { (a.reference) }
                            td .appointment-status {
                                (a.check_in.attendance.map(|x| x.as_str()).unwrap_or(a.status.as_str()))
                                @if let Some(c) = a.check_in.conflict { " · " span .message { (c) } }
                            }
                            td { (a.check_in.ticket.clone().unwrap_or_else(|| "—".into())) }
                            td {
                                @if a.check_in.attendance.is_none() && a.status == meridian_shared::appointments::AppointmentStatus::Booked {
                                    form method="post" action="/workstation/check-in" {
                                        button .check-in name="appointment" value=(a.id) { "Check in" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            form method="post" action="/workstation/logout" { button #logout type="submit" { "Log out" } }
        }
        // `terminals.js` reloads the page on every branch change (not while a drop-down is open).
        div hidden data-live="reload-unless-select" {}
    };
    Ok(layout("Workstation", &link, None, body))
}

/// `Debug` hides the password.
#[derive(Deserialize)]
pub struct LoginForm {
    username: String,
    password: String,
    #[serde(default)]
    counter: String,
}

impl std::fmt::Debug for LoginForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginForm")
            .field("username", &self.username)
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

fn session_cookie(ctx: &Context, token: &str, max_age: i64) -> (header::HeaderName, HeaderValue) {
    // `Secure` under HTTPS: the browser never sends the session over plain HTTP.
    let secure = if ctx.secure_cookies() { "; Secure" } else { "" };
    let value = format!(
        "{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    );
    (
        header::SET_COOKIE,
        HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("")),
    )
}

pub async fn login(
    State(ctx): State<Arc<Context>>,
    extensions: axum::http::Extensions,
    Form(form): Form<LoginForm>,
) -> Response {
    let from = crate::branch_api::peer(&extensions);
    let user = match auth::sign_in(&ctx, &form.username, &form.password, from).await {
        Ok(Ok(user)) => user,
        Ok(Err(SignInRefusal::Invalid)) => {
            return login_page(
                &ctx,
                StatusCode::UNAUTHORIZED,
                Some("Unknown user or wrong password."),
            );
        }
        Ok(Err(SignInRefusal::Locked { retry_after_s })) => {
            let minutes = retry_after_s.div_ceil(60);
            let message = format!(
                "Too many failed log-ins. Try again in {minutes} min, or ask a supervisor to unlock the account."
            );
            return login_page(&ctx, StatusCode::TOO_MANY_REQUESTS, Some(&message));
        }
        Ok(Err(SignInRefusal::Busy)) => {
            return login_page(
                &ctx,
                StatusCode::TOO_MANY_REQUESTS,
                Some("The branch is busy; please try again."),
            );
        }
        Err(e) => return from_error(&ctx, e),
    };
    let counter = (!form.counter.is_empty()).then(|| form.counter.clone());
    let now_ms = ctx.clock.now().timestamp_millis();
    let result = ctx
        .change(move |c, config, now| {
            if let Some(counter) = &counter {
                visits::open_counter(c, config, counter, Some(user.username.as_str()), now)?;
            }
            auth::create_session(c, &user, counter.as_deref(), now_ms)
        })
        .await;
    match result {
        Ok((token, _)) => {
            let cookie = session_cookie(&ctx, &token, auth::SESSION_TTL.num_seconds());
            (AppendHeaders([cookie]), Redirect::to("/workstation")).into_response()
        }
        Err(e) => from_error(&ctx, e),
    }
}

pub async fn logout(State(ctx): State<Arc<Context>>, headers: HeaderMap) -> Response {
    if let Some(token) = cookie(&headers, SESSION_COOKIE) {
        let signed_in = session(&ctx, &headers).await.ok();
        let _ = ctx
            .change(move |c, config, now| {
                // Leave the counter open only if someone else took it over.
                if let Some(StaffSession { username, counter: Some(counter), .. }) = signed_in {
                    let points = visits::service_points(c, config)?;
                    let mine = points.iter().any(|p| {
                        p.code == counter && p.staff.as_deref() == Some(username.as_str())
                    });
                    if mine && points.iter().any(|p| p.code == counter && p.current.is_none()) {
                        visits::close_counter(c, config, &counter, now)?;
                    }
                }
                auth::end_session(c, &token)
            })
            .await;
    }
    (AppendHeaders([session_cookie(&ctx, "", 0)]), Redirect::to("/workstation")).into_response()
}

#[derive(Debug, Deserialize)]
pub struct ActionForm {
    action: String,
    #[serde(default)]
    queue: String,
}

pub async fn action(
    State(ctx): State<Arc<Context>>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    let Ok(signed_in) = session(&ctx, &headers).await else {
        return Redirect::to("/workstation?msg=Please+log+in").into_response();
    };
    let Some(counter) = signed_in.counter else {
        return Redirect::to("/workstation?msg=Log+in+at+a+counter+to+call+customers")
            .into_response();
    };
    let action = form.action.clone();
    let queue = form.queue.clone();
    let result = ctx
        .change(move |c, config, now| {
            if action == "call-next" {
                return visits::call_next(c, config, &counter, now)
                    .map(|v| v.map(|_| ()).ok_or(()));
            }
            let points = visits::service_points(c, config)?;
            let current =
                points.into_iter().find(|p| p.code == counter).and_then(|p| p.current).ok_or_else(
                    || Error::Conflict("there is no current customer at this counter".into()),
                )?;
            let op = match action.as_str() {
                "transfer" => {
                    let q = Code::parse(&queue).map_err(|e| Error::Validation(e.to_string()))?;
                    Op::Transfer { to: Location::Queue(q), position: Position::Last }
                }
                other => Op::from_action(other)
                    .ok_or_else(|| Error::Validation(format!("unknown action {other:?}")))?,
            };
            visits::transition(c, config, &current.id, op, vec![], now).map(|_| Ok(()))
        })
        .await;
    let msg = match result {
        Ok(Ok(())) => return Redirect::to("/workstation").into_response(),
        Ok(Err(())) => "Nobody is waiting for this counter.".to_owned(),
        Err(
            e @ (Error::Conflict(_)
            | Error::Validation(_)
            | Error::InvalidFields(_)
            | Error::NotFound(_)),
        ) => e.to_string(),
        Err(e) => return from_error(&ctx, e),
    };
    let encoded: String = url_encode(&msg);
    Redirect::to(&format!("/workstation?msg={encoded}")).into_response()
}

#[derive(Debug, Deserialize)]
pub struct CheckInForm {
    appointment: String,
}

/// Reception's "Check in": checks in one of today's appointments and says which ticket the
/// customer got, or why not.
pub async fn check_in(
    State(ctx): State<Arc<Context>>,
    headers: HeaderMap,
    Form(form): Form<CheckInForm>,
) -> Response {
    if staff(&ctx, &headers).await.is_err() {
        return Redirect::to("/workstation?msg=Please+log+in").into_response();
    }
    let result = match form.appointment.parse::<meridian_shared::AppointmentId>() {
        Ok(id) => ctx.change(move |c, config, now| check_in::check_in(c, config, &id, now)).await,
        Err(_) => Err(check_in::CheckInRefusal::Unknown(form.appointment.clone()).into()),
    };
    let msg = match result {
        Ok(done) => {
            format!("Checked in {}: ticket {}", done.appointment.customer_name, done.visit.ticket)
        }
        Err(e @ (Error::CheckIn(_) | Error::Conflict(_) | Error::NotFound(_))) => e.to_string(),
        Err(e) => return from_error(&ctx, e),
    };
    Redirect::to(&format!("/workstation?msg={}", url_encode(&msg))).into_response()
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b' ' => "+".to_owned(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_password() {
        let form = LoginForm {
            username: "ana".into(),
            password: "pw-S3CR3T".into(),
            counter: "c1".into(),
        };
        let shown = format!("{form:?}");
        assert!(!shown.contains("S3CR3T") && shown.contains("ana"), "{shown}");
    }
}
