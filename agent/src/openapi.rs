//! The OpenAPI 3.1 description of the branch API, served at `/api/v1/openapi.json`.
//! `agent/tests/branch_operations.rs` checks that every documented operation exists.

use meridian_shared::customer::{
    MAX_CUSTOMER_EMAIL, MAX_CUSTOMER_NAME, MAX_CUSTOMER_NOTE, MAX_CUSTOMER_PHONE,
};
use serde_json::{Value, json};

/// (method, path, summary, request body schema, success status) of every documented operation.
pub const OPERATIONS: &[(&str, &str, &str, Option<&str>, u16)] = &[
    (
        "get",
        "/api/v1/status",
        "Branch, link and clock status, end-of-day sweeps (no authentication)",
        None,
        200,
    ),
    (
        "post",
        "/api/v1/sessions",
        "Staff login; returns a session token (no authentication)",
        Some("Login"),
        201,
    ),
    ("delete", "/api/v1/sessions/current", "Staff logout", None, 204),
    ("get", "/api/v1/visits", "Visits by status (?status=waiting|called|serving|ended)", None, 200),
    (
        "post",
        "/api/v1/visits",
        "Take a ticket for a service, optionally with customer fields",
        Some("NewVisit"),
        201,
    ),
    ("get", "/api/v1/visits/{id}", "One visit", None, 200),
    ("post", "/api/v1/visits/{id}/recall", "Recall a called visit", None, 200),
    ("post", "/api/v1/visits/{id}/start-serving", "The customer arrived at the counter", None, 200),
    ("post", "/api/v1/visits/{id}/no-show", "End a called visit as a no-show", None, 200),
    (
        "post",
        "/api/v1/visits/{id}/recycle",
        "Put a called visit back at the end of its queue",
        None,
        200,
    ),
    (
        "post",
        "/api/v1/visits/{id}/park",
        "Park a visit in the calling staff member's pool",
        None,
        200,
    ),
    (
        "post",
        "/api/v1/visits/{id}/end",
        "End a visit as served, with optional marks",
        Some("EndVisit"),
        200,
    ),
    ("post", "/api/v1/visits/{id}/remove", "Remove a waiting or called visit", None, 200),
    (
        "post",
        "/api/v1/visits/{id}/transfer",
        "Transfer to a queue (first or last), a counter pool or a staff pool",
        Some("Transfer"),
        200,
    ),
    ("get", "/api/v1/queues", "Queues with waiting counts and longest wait", None, 200),
    ("get", "/api/v1/service-points", "Counters: open, staff, current visit", None, 200),
    (
        "post",
        "/api/v1/service-points/{code}/open",
        "Open a counter, optionally with a staff member",
        Some("OpenServicePoint"),
        200,
    ),
    (
        "post",
        "/api/v1/service-points/{code}/close",
        "Close a counter (refused while it has a customer)",
        None,
        200,
    ),
    (
        "post",
        "/api/v1/service-points/{code}/call-next",
        "Call the next visit by the counter's work profile (404 nobody_waiting)",
        None,
        200,
    ),
    (
        "post",
        "/api/v1/service-points/{code}/call",
        "Call a specific visit by id or ticket",
        Some("Call"),
        200,
    ),
    (
        "post",
        "/api/v1/service-points/{code}/walk-direct",
        "Create a walk-in visit served at once",
        Some("NewVisit"),
        201,
    ),
    (
        "get",
        "/api/v1/appointments",
        "Appointments of one site-local day (?date=YYYY-MM-DD, default today), by start, cancelled ones with their status, each with its booking reference and what the branch recorded (attendance, visit_id, ticket, arrived_at, attendance_at, conflict, conflict_at)",
        None,
        200,
    ),
    (
        "post",
        "/api/v1/appointments/check-in",
        "Check a customer in by what they show (kiosk, integrations): the booking reference XXXX-XXXX (any case, dash optional), the QR text MERIDIAN:APPT:<reference>, the appointment id or its external reference. 201 {appointment, visit}: a visit in the appointment's queue, placed by the appointment's start. Refusals: 404 unknown_appointment; 409 too_early / too_late (message names the window), appointment_cancelled, not_today, service_unavailable, already_checked_in (with the existing `visit`)",
        Some("CheckIn"),
        201,
    ),
    (
        "post",
        "/api/v1/appointments/{id}/check-in",
        "Reception: check in appointment {id}; same answers and refusals as /api/v1/appointments/check-in",
        None,
        201,
    ),
    (
        "get",
        "/api/v1/appointments/sync",
        "Supervisors: the nightly bulk appointment sync at this branch: the set in force (watermark: sync, days, appointments, applied_at) and the latest requests with their state (pending, fetching, applied, failed, superseded), staged chunks, resumes and error",
        None,
        200,
    ),
    (
        "get",
        "/api/v1/closures",
        "Closures of today and later days that staff decided at the branch (withdrawn ones with reopened_at)",
        None,
        200,
    ),
    (
        "post",
        "/api/v1/closures",
        "Supervisors: close part of a site-local day at the branch (works offline): 201 with the closure and `flagged`, the expected appointments it flags slot_closed_at_branch. Sent to central, which then refuses bookings into it (409 slot_closed) and flags bookings it made there before it knew. 422 with the offending fields",
        Some("NewClosure"),
        201,
    ),
    (
        "delete",
        "/api/v1/closures/{id}",
        "Supervisors: withdraw a closure (flags already set stay for admins); 404 unknown, 409 already withdrawn",
        None,
        200,
    ),
    (
        "get",
        "/api/v1/login-locks",
        "Supervisors: the sign-in locks in force (subject user|address, name, failures, until)",
        None,
        200,
    ),
    (
        "delete",
        "/api/v1/login-locks/{subject}/{name}",
        "Supervisors: lift the sign-in lock of a user (`user/{name}`) or an address (`address/{ip}`); 404 when there is none",
        None,
        204,
    ),
    (
        "get",
        "/api/v1/requests",
        "Service requests held here (?type=, ?limit= 1-1000), newest change first, with their distribution fields (master, current_site, from/to site and request id, mapping, transfer and update status, history)",
        None,
        200,
    ),
    (
        "post",
        "/api/v1/requests",
        "Create a request of a configured type: checked against the type's field schema (defaults filled in; 422 lists every bad or unknown field); 201 with its id and human id (SITE-000123)",
        Some("NewRequest"),
        201,
    ),
    ("get", "/api/v1/requests/{id}", "One request by id or human id", None, 200),
    (
        "delete",
        "/api/v1/requests/{id}",
        "Delete a request here: the master (its copies at other sites follow) or a read-only copy alone; 404 unknown, 409 while its ownership is being handed over",
        None,
        204,
    ),
    (
        "post",
        "/api/v1/requests/{id}/operations",
        "Start a cross-site operation on a request of this site (transfer with a mode and a target, update, return): 202 with the operation id and the request as it is here now; works offline. 404 unknown, 409 not the master here, 422 bad spec",
        Some("Operation"),
        202,
    ),
    (
        "patch",
        "/api/v1/requests/{id}",
        "Change fields of the master copy (null clears an optional field): 404 unknown, 409 read-only copy or stale expected_revision, 422 field errors",
        Some("RequestPatch"),
        200,
    ),
    (
        "get",
        "/api/v1/events",
        "Live event feed (server-sent events); resume with Last-Event-ID or ?after=",
        None,
        200,
    ),
];

/// (method, path) of the operations only supervisors and connector keys may call; a plain
/// staff session gets 403. Marked `x-meridian-role: supervisor` in the document.
pub const SUPERVISOR_ONLY: &[(&str, &str)] = &[
    ("get", "/api/v1/appointments/sync"),
    ("post", "/api/v1/closures"),
    ("delete", "/api/v1/closures/{id}"),
    ("get", "/api/v1/login-locks"),
    ("delete", "/api/v1/login-locks/{subject}/{name}"),
];

/// What an operation answers: its success (JSON, a live feed or no content) and the errors
/// every operation may give, each the typed `Error` body.
fn responses(method: &str, path: &str, status: u16) -> Value {
    let list = method == "get"
        && matches!(
            path,
            "/api/v1/visits"
                | "/api/v1/queues"
                | "/api/v1/service-points"
                | "/api/v1/appointments"
                | "/api/v1/closures"
                | "/api/v1/requests"
                | "/api/v1/login-locks"
        );
    let success = match (status, path) {
        (204, _) => json!({"description": "done"}),
        (_, "/api/v1/events") => json!({"description": "server-sent events, one per outbox event",
            "content": {"text/event-stream": {"schema": {"type": "string"}}}}),
        _ => json!({"description": "success", "content": {"application/json": {"schema":
            if list { json!({"type": "array", "items": {"type": "object"}}) } else { json!({"type": "object"}) }}}}),
    };
    let error = |description: &str| {
        json!({"description": description,
               "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
    };
    let mut out = json!({ status.to_string(): success });
    for (code, description) in [
        ("400", "malformed request: path, query string or JSON (`bad_request`, `malformed_json`)"),
        ("401", "no, unknown or expired key or session"),
        ("403", "the caller may not do this (a staff session on a supervisor operation)"),
        ("404", "no such object (`not_found`, `nobody_waiting`, `unknown_appointment`)"),
        ("409", "conflicts with the current state (`conflict` or a specific code)"),
        ("410", "the live feed's cursor is no longer retained (`cursor_expired`)"),
        ("413", "body over 64 KiB (`payload_too_large`)"),
        ("415", "body is not `application/json` (`unsupported_media_type`)"),
        ("422", "invalid input, the fields in `details` (`validation_failed`, `invalid_body`)"),
        ("429", "too many attempts or requests; retry after `Retry-After`"),
        ("503", "branch store unavailable or not yet configured, or too many live feeds"),
    ] {
        out[code] = error(description);
    }
    out
}

pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for (method, path, summary, body, status) in OPERATIONS {
        let mut op = json!({"summary": summary, "responses": responses(method, path, *status)});
        let public = matches!(*path, "/api/v1/status" | "/api/v1/sessions");
        if public {
            op["security"] = json!([]);
        }
        if SUPERVISOR_ONLY.contains(&(*method, *path)) {
            op["x-meridian-role"] = json!("supervisor");
        }
        if let Some(schema) = body {
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
        }
        let params: Vec<Value> = ["id", "code", "subject", "name"]
            .iter()
            .filter(|p| path.contains(&format!("{{{p}}}")))
            .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        paths.entry(path.to_string()).or_insert_with(|| json!({}))[*method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Meridian branch API", "version": meridian_shared::VERSION,
                 "description": "Served by the branch agent from its local store; works with the controller unreachable."},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                "description": "A connector API key of this site, or a staff session token from POST /api/v1/sessions."}},
            "schemas": {
                "Error": {"type": "object", "required": ["code", "message"],
                          "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                                         "visit": {"type": "object", "description": "already_checked_in: the ticket the customer already has"},
                                         "details": {"type": "array", "description": "invalid fields (validation_failed)",
                                                     "items": {"type": "object", "required": ["field", "message"],
                                                               "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}}}},
                "CheckIn": {"type": "object", "required": ["reference"], "additionalProperties": false,
                            "properties": {"reference": {"type": "string", "maxLength": 200,
                                "description": "booking reference, MERIDIAN:APPT:<reference>, appointment id or external reference"}}},
                "NewClosure": {"type": "object", "required": ["from", "to", "reason"], "additionalProperties": false,
                    "properties": {"date": {"type": "string", "format": "date", "description": "site-local day; today when absent"},
                                   "from": {"type": "string", "description": "HH:MM, site wall clock"},
                                   "to": {"type": "string", "description": "HH:MM, exclusive (24:00 = end of day)"},
                                   "reason": {"type": "string", "maxLength": meridian_shared::closures::MAX_REASON}}},
                "NewRequest": {"type": "object", "required": ["type"], "additionalProperties": false,
                    "properties": {"type": {"type": "string", "description": "a configured request type's code"},
                                   "fields": {"type": "object", "description": "values by field name, checked against the type"}}},
                "Operation": {"type": "object", "required": ["action"], "additionalProperties": false,
                    "properties": {"action": {"enum": ["transfer", "update", "return"]},
                                   "mode": {"enum": ["ownership", "data_only", "independent_copy"], "description": "transfer: what moves"},
                                   "target": {"type": "object", "description": "transfer: the target site or pool"},
                                   "mapping": {"type": "string"}, "pool": {"type": "string"},
                                   "update": {"enum": ["immediately", "hourly", "daily", "on_return", "never"], "description": "when copies are updated"}}},
                "RequestPatch": {"type": "object", "required": ["fields"], "additionalProperties": false,
                    "properties": {"fields": {"type": "object"}, "expected_revision": {"type": "integer"}}},
                "Login": {"type": "object", "required": ["username", "password"],
                          "properties": {"username": {"type": "string"}, "password": {"type": "string"}}},
                "NewVisit": {"type": "object", "required": ["service"], "additionalProperties": false, "properties": {
                    "service": {"type": "string"},
                    "customer": {"$ref": "#/components/schemas/Customer"}}},
                "Customer": {"type": "object", "additionalProperties": false,
                    "description": "Personal data, all optional; trimmed, empty fields dropped. Kept at the branch; sent to central only when the site's configuration sets share_customer_data. Returned in a visit's `customer`.",
                    "properties": {
                        "name": {"type": "string", "maxLength": MAX_CUSTOMER_NAME},
                        "phone": {"type": "string", "maxLength": MAX_CUSTOMER_PHONE},
                        "email": {"type": "string", "maxLength": MAX_CUSTOMER_EMAIL, "description": "name@domain.tld (a light check)"},
                        "note": {"type": "string", "maxLength": MAX_CUSTOMER_NOTE}}},
                "EndVisit": {"type": "object", "properties": {"marks": {"type": "array", "items": {"type": "string"}}}},
                "OpenServicePoint": {"type": "object", "properties": {"staff": {"type": "string"}}},
                "Call": {"type": "object", "properties": {"visit_id": {"type": "string"}, "ticket": {"type": "string"}}},
                "Transfer": {"type": "object", "required": ["to"], "properties": {
                    "to": {"type": "object", "required": ["kind", "code"], "properties": {
                        "kind": {"enum": ["queue", "service_point_pool", "staff_pool"]}, "code": {"type": "string"}}},
                    "position": {"enum": ["first", "last"]}}}
            }
        }
    })
}
