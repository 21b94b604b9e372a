//! `/api/v1/appointments`: central booking over HTTP (`crate::appointments` does the work).
//! Admin tokens book, reschedule and cancel; viewer tokens read (the router's authentication
//! refuses their writes). Times in bodies are wall-clock `YYYY-MM-DDTHH:MM` in the site's
//! zone; answers carry both that and the UTC instant. A change the store sent to the site's
//! agents (one of today's appointments) wakes the gateway sessions at once.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use meridian_shared::clock::Clock;
use serde::de::DeserializeOwned;

use super::error::{ApiError, ApiResult};
use super::{ApiJson, query_error};
use crate::appointments::{
    self, BookRequest, CancelRequest, Changed, DaySlots, ListQuery, RescheduleRequest, SlotsQuery,
};
use crate::store::Store;
use crate::store::appointments::Appointment;

/// What the appointment handlers need: the store, the clock bookings are checked against and
/// the gateway sessions' wake-up signal.
#[derive(Clone)]
pub struct AppointmentsState {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub commands_changed: Arc<tokio::sync::watch::Sender<u64>>,
}

impl AppointmentsState {
    /// Wakes the sessions when the change was sent to agents; returns the appointment.
    fn changed(&self, c: Changed) -> Appointment {
        if c.sent_live {
            self.commands_changed.send_modify(|n| *n = n.wrapping_add(1));
        }
        c.appointment
    }
}

/// The operations of this part of the API, relative to `/api/v1`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(book, list, slots, show, reschedule, cancel))]
pub(super) struct Doc;

/// The routes, to be nested under `/api/v1` behind authentication.
pub fn routes<S: Clone + Send + Sync + 'static>(state: AppointmentsState) -> Router<S> {
    Router::new()
        .route("/appointments", get(list).post(book))
        .route("/appointments/slots", get(slots))
        .route("/appointments/{id}", get(show))
        .route("/appointments/{id}/reschedule", post(reschedule))
        .route("/appointments/{id}/cancel", post(cancel))
        .with_state(state)
}

type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

#[utoipa::path(post, path = "/appointments", tag = "appointments", summary = "Book an appointment",
    request_body = BookRequest,
    responses((status = 201, description = "booked", body = Appointment)))]
async fn book(
    State(s): State<AppointmentsState>,
    ApiJson(req): ApiJson<BookRequest>,
) -> ApiResult<(StatusCode, Json<Appointment>)> {
    let booked = s.changed(appointments::book(s.store.as_ref(), s.clock.as_ref(), req).await?);
    tracing::info!(appointment = %booked.id, site = %booked.site, service = %booked.service, start = %booked.start, "appointment booked");
    Ok((StatusCode::CREATED, Json(booked)))
}

#[utoipa::path(get, path = "/appointments", tag = "appointments",
    summary = "Appointments by site, days, status and conflict", params(appointments::ListQuery),
    responses((status = 200, description = "the appointments", body = Vec<Appointment>)))]
async fn list(
    State(s): State<AppointmentsState>,
    query: QueryResult<ListQuery>,
) -> ApiResult<Json<Vec<Appointment>>> {
    let Query(q) = query.map_err(query_error)?;
    Ok(Json(appointments::list(s.store.as_ref(), &q).await?))
}

#[utoipa::path(get, path = "/appointments/slots", tag = "appointments",
    summary = "The slots of one service on one day", params(SlotsQuery),
    responses((status = 200, description = "the slots", body = DaySlots)))]
async fn slots(
    State(s): State<AppointmentsState>,
    query: QueryResult<SlotsQuery>,
) -> ApiResult<Json<DaySlots>> {
    let Query(q) = query.map_err(query_error)?;
    Ok(Json(appointments::day_slots(s.store.as_ref(), s.clock.as_ref(), &q).await?))
}

#[utoipa::path(get, path = "/appointments/{id}", tag = "appointments", summary = "One appointment", params(("id" = String, Path, description = "the appointment's id")),
    responses((status = 200, description = "the appointment", body = Appointment)))]
async fn show(
    State(s): State<AppointmentsState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Appointment>> {
    Ok(Json(appointments::get(s.store.as_ref(), &id).await?))
}

#[utoipa::path(post, path = "/appointments/{id}/reschedule", tag = "appointments",
    summary = "Move an appointment to another start", params(("id" = String, Path, description = "the appointment's id")), request_body = RescheduleRequest,
    responses((status = 200, description = "rescheduled", body = Appointment)))]
async fn reschedule(
    State(s): State<AppointmentsState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<RescheduleRequest>,
) -> ApiResult<Json<Appointment>> {
    let moved =
        s.changed(appointments::reschedule(s.store.as_ref(), s.clock.as_ref(), &id, req).await?);
    tracing::info!(appointment = %moved.id, start = %moved.start, "appointment rescheduled");
    Ok(Json(moved))
}

/// The body is optional: no body cancels whatever the revision.
#[utoipa::path(post, path = "/appointments/{id}/cancel", tag = "appointments",
    summary = "Cancel an appointment (the body is optional)", params(("id" = String, Path, description = "the appointment's id")), request_body = Option<CancelRequest>,
    responses((status = 200, description = "cancelled", body = Appointment)))]
async fn cancel(
    State(s): State<AppointmentsState>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Appointment>> {
    let req: CancelRequest = optional_body(&body)?;
    let cancelled =
        s.changed(appointments::cancel(s.store.as_ref(), s.clock.as_ref(), &id, req).await?);
    tracing::info!(appointment = %cancelled.id, "appointment cancelled");
    Ok(Json(cancelled))
}

/// A JSON body that may be empty (then `T::default()`), with the same typed errors as `ApiJson`.
fn optional_body<T: DeserializeOwned + Default>(body: &[u8]) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", e.to_string())
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.to_string())
        }
    })
}
