//! The ticket kiosk: one button per service; a printable ticket with the number, service, time
//! and how many people are ahead. Customers with an appointment type their booking reference
//! or scan the QR code of their confirmation ("I have an appointment"): they get their ticket,
//! or a clear refusal (too early, too late, cancelled, another day, unknown).

use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;

use super::{from_error, layout, local_time};
use crate::Context;
use crate::{check_in, visits};

pub async fn page(State(ctx): State<Arc<Context>>) -> Response {
    let config = match ctx.site_config() {
        Ok(c) => c,
        Err(e) => return from_error(&ctx, e),
    };
    let link = ctx.link.borrow().clone();
    let body = html! {
        header { span { (config.site.name) } span { "Take a ticket" } }
        main {
            h1 { "Welcome — what can we help you with?" }
            form method="post" action="/kiosk/tickets" {
                @for svc in &config.services {
                    button .service type="submit" name="service" value=(svc.code) data-service=(svc.code) { (svc.name) }
                }
            }
            h2 { "I have an appointment" }
            form #appointment-check-in method="post" action="/kiosk/check-in" {
                label for="reference" { "Booking reference (or scan the QR code of your confirmation) " }
                input #reference name="reference" autocomplete="off" required maxlength="200" placeholder="XXXX-XXXX";
                button .primary #check-in type="submit" { "Check in" }
            }
        }
    };
    Html(layout("Kiosk", &link, None, body).into_string()).into_response()
}

#[derive(Debug, Deserialize)]
pub struct TicketForm {
    service: String,
}

pub async fn take_ticket(
    State(ctx): State<Arc<Context>>,
    Form(form): Form<TicketForm>,
) -> Response {
    let service = form.service;
    match ctx.change(move |c, config, now| visits::create(c, config, &service, None, now)).await {
        Ok(v) => Redirect::to(&format!("/kiosk/tickets/{}", v.id)).into_response(),
        Err(e) => from_error(&ctx, e),
    }
}

#[derive(Debug, Deserialize)]
pub struct CheckInForm {
    reference: String,
}

/// "I have an appointment": checks in what the customer typed or scanned, then shows the
/// ticket; a refusal is shown as the page's message with its status.
pub async fn check_in(State(ctx): State<Arc<Context>>, Form(form): Form<CheckInForm>) -> Response {
    let text = form.reference;
    if text.trim().is_empty() || text.len() > 200 {
        return from_error(
            &ctx,
            crate::Error::Validation("type the booking reference from your confirmation".into()),
        );
    }
    match ctx.change(move |c, config, now| check_in::check_in_text(c, config, &text, now)).await {
        Ok(done) => Redirect::to(&format!("/kiosk/tickets/{}", done.visit.id)).into_response(),
        Err(e) => from_error(&ctx, e),
    }
}

pub async fn ticket(State(ctx): State<Arc<Context>>, Path(id): Path<String>) -> Response {
    let found = ctx
        .db
        .read(move |c| {
            let v = visits::get(c, &id)?;
            let ahead = visits::people_ahead(c, &v)?;
            Ok((v, ahead))
        })
        .await;
    let (visit, ahead) = match found {
        Ok(x) => x,
        Err(e) => return from_error(&ctx, e),
    };
    let config = ctx.site_config().ok();
    let service_name = config
        .as_ref()
        .and_then(|c| c.service(&visit.service))
        .map(|s| s.name.clone())
        .unwrap_or_else(|| visit.service.clone());
    let site_name = config.as_ref().map(|c| c.site.name.clone()).unwrap_or_default();
    let link = ctx.link.borrow().clone();
    let head = html! { meta http-equiv="refresh" content="20;url=/kiosk"; };
    let body = html! {
        header { span { (site_name) } span { "Your ticket" } }
        main {
            p { "Your number" }
            div .ticket #ticket-number { (visit.ticket) }
            p #ticket-service { (service_name) }
            p #ticket-time { "Taken at " (local_time(&ctx, visit.created_at)) }
            p #people-ahead {
                @match ahead { 0 => "You are next.", 1 => "1 person ahead of you.", n => (format!("{n} people ahead of you.")) }
            }
            p .noprint { button type="button" data-print { "Print" } a href="/kiosk" { "Done" } }
        }
    };
    Html(layout("Ticket", &link, Some(head), body).into_string()).into_response()
}
