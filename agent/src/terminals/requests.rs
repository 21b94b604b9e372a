//! Service requests at the branch, for staff behind the workstation login: a
//! searchable list of the site's requests (masters and read-only copies, the branch's knowledge
//! base), a request's detail with its distribution state and mapping history, a form per
//! request type to create one, and for the master an edit form, "Transfer", "Return" and
//! "Delete" (a read-only copy offers "Delete copy" only). Everything reads and writes the local
//! store, so the page works offline; operations wait in the outbox. Creating and editing fire
//! this site's distribution rules in the same store job, as the connector API does.
//!
//! Form values are strings: they are converted per field kind here (empty optional → absent,
//! unticked checkbox → false, `datetime-local` in the site's time zone → RFC 3339) and then
//! checked by `requests::create` / `requests::update`; refusals come back on the form with 422
//! (field errors) or 409 (conflicts).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use maud::{Markup, html};
use meridian_shared::config::SiteConfig;
use meridian_shared::requests::{FieldDef, FieldKind, RequestType, Values};
use meridian_shared::transfers::{OpKind, OpTarget, TransferMode, UpdatePolicy};
use meridian_shared::{Code, SiteCode, ValidationErrors};
use rusqlite::Connection;
use serde::Deserialize;
use serde_json::Value;

use super::workstation::staff;
use super::{from_error, layout};
use crate::Context;
use crate::distribution::{self, OperationSpec};
use crate::error::Error;
use crate::request_rules::{self, RuleEvent, RuleSet};
use crate::requests::{self, NewRequest, Request, RequestPatch};

/// How many of the latest requests the list searches.
const LIST_LIMIT: u32 = 1000;
/// Longest search text taken into account.
const MAX_QUERY: usize = 200;
/// Prefix of the form inputs that carry field values (keeps them apart from `type`,
/// `revision`…).
const FIELD_PREFIX: &str = "f.";

/// Creates a request and fires this site's create rules in the same store job, exactly as
/// `POST /api/v1/requests` does; the request as it is after the rules.
pub(crate) fn create_with_rules(
    conn: &Connection,
    config: &SiteConfig,
    rules: &RuleSet,
    input: &NewRequest,
    now: DateTime<Utc>,
) -> crate::Result<Request> {
    let made = requests::create(conn, config, input, now)?;
    if request_rules::on_event(conn, config, rules, &made, RuleEvent::Created, now)? == 0 {
        return Ok(made);
    }
    Ok(requests::get(conn, &made.id.to_string())?.unwrap_or(made))
}

/// Changes a master's fields and fires this site's modify and status-change rules in the same
/// store job, exactly as `PATCH /api/v1/requests/{id}` does.
pub(crate) fn update_with_rules(
    conn: &Connection,
    config: &SiteConfig,
    rules: &RuleSet,
    id: &str,
    patch: &RequestPatch,
    now: DateTime<Utc>,
) -> crate::Result<Request> {
    let before = requests::get(conn, id)?.map(|r| r.fields).unwrap_or_default();
    let changed = requests::update(conn, config, id, patch, now)?;
    let event = RuleEvent::Modified(&before);
    if request_rules::on_event(conn, config, rules, &changed, event, now)? == 0 {
        return Ok(changed);
    }
    Ok(requests::get(conn, &changed.id.to_string())?.unwrap_or(changed))
}

/// The staff member, or the redirect to the login.
async fn signed_in(ctx: &Context, headers: &HeaderMap) -> Result<String, Response> {
    staff(ctx, headers).await.map_err(|_| {
        Redirect::to("/workstation?msg=Please+log+in+to+work+with+service+requests").into_response()
    })
}

fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::Conflict(_) => StatusCode::CONFLICT,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

fn tz_of(config: &SiteConfig) -> Tz {
    config.site.tz().unwrap_or(Tz::UTC)
}

fn find_type<'a>(config: &'a SiteConfig, code: &str) -> Option<&'a RequestType> {
    config.request_types.iter().find(|t| t.code.as_str() == code)
}

fn type_name(config: &SiteConfig, code: &Code) -> String {
    find_type(config, code.as_str()).map_or_else(|| code.to_string(), |t| t.name.clone())
}

fn header(config: &SiteConfig, username: &str) -> Markup {
    let me = config.staff.iter().find(|u| u.username.as_str() == username);
    html! {
        header {
            span { (config.site.name) " · " (me.map(|u| u.name.clone()).unwrap_or_else(|| username.to_owned())) }
            nav .noprint {
                a href="/requests" { "Service requests" } " · "
                a #new-request href="/requests/new" { "New request" } " · "
                a href="/workstation" { "Workstation" }
            }
        }
    }
}

fn page(ctx: &Context, status: StatusCode, title: &str, body: Markup) -> Response {
    let link = ctx.link.borrow().clone();
    (status, Html(layout(title, &link, None, body).into_string())).into_response()
}

/// A value as shown on a page.
fn shown(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Bool(true) => "Yes".into(),
        Value::Bool(false) => "No".into(),
        other => other.to_string(),
    }
}

/// "Master", "Read-only copy" or "In transfer to X".
fn role(r: &Request) -> String {
    let d = &r.distribution;
    match (&d.pending_operation, d.master) {
        (Some(_), _) => {
            format!("In transfer to {}", d.to_site.as_deref().unwrap_or("another site"))
        }
        (None, true) => "Master".into(),
        (None, false) => "Read-only copy".into(),
    }
}

fn summary(config: &SiteConfig, r: &Request) -> String {
    let order: Vec<&str> = find_type(config, r.request_type.as_str())
        .map(|t| t.fields.iter().map(|f| f.name.as_str()).collect())
        .unwrap_or_else(|| r.fields.keys().map(String::as_str).collect());
    let text = order
        .iter()
        .filter_map(|name| r.fields.get(*name).filter(|v| !v.is_null()).map(|v| (name, v)))
        .take(3)
        .map(|(name, v)| format!("{name}: {}", shown(v)))
        .collect::<Vec<_>>()
        .join(" · ");
    if text.chars().count() > 100 {
        format!("{}…", text.chars().take(99).collect::<String>())
    } else {
        text
    }
}

fn matches(r: &Request, needle: &str) -> bool {
    needle.is_empty()
        || r.human_id.to_lowercase().contains(needle)
        || r.fields.values().any(|v| {
            let text = match v {
                Value::String(s) => s.to_lowercase(),
                other => shown(other).to_lowercase(),
            };
            text.contains(needle)
        })
}

fn when(tz: Tz, t: DateTime<Utc>) -> String {
    t.with_timezone(&tz).format("%Y-%m-%d %H:%M").to_string()
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

fn to_detail(r_id: &str, msg: &str) -> Response {
    Redirect::to(&format!("/requests/{}?msg={}", url_encode(r_id), url_encode(msg))).into_response()
}

#[derive(Debug, Deserialize, Default)]
pub struct ListQuery {
    #[serde(default)]
    q: String,
    #[serde(default, rename = "type")]
    request_type: String,
    msg: Option<String>,
}

/// `GET /requests?q=&type=`: the latest requests here, newest change first; `q` matches the
/// human id or any field value (case-insensitive).
pub async fn list(
    State(ctx): State<Arc<Context>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    let user = match signed_in(&ctx, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let config = match ctx.site_config() {
        Ok(c) => c,
        Err(e) => return from_error(&ctx, e),
    };
    let request_type = (!q.request_type.is_empty()).then(|| q.request_type.clone());
    let all =
        match ctx.db.read(move |c| requests::list(c, request_type.as_deref(), LIST_LIMIT)).await {
            Ok(all) => all,
            Err(e) => return from_error(&ctx, e),
        };
    let text: String = q.q.trim().chars().take(MAX_QUERY).collect();
    let needle = text.to_lowercase();
    let found: Vec<&Request> = all.iter().filter(|r| matches(r, &needle)).collect();
    let tz = tz_of(&config);
    let body = html! {
        (header(&config, &user))
        main {
            @if let Some(m) = &q.msg { p .message #message { (m) } }
            h2 { "Service requests" }
            form #search method="get" action="/requests" {
                input #q name="q" type="search" value=(text) placeholder="Request id or any field value";
                " "
                select #type-filter name="type" {
                    option value="" { "All types" }
                    @for t in &config.request_types {
                        option value=(t.code) selected[t.code.as_str() == q.request_type] { (t.name) }
                    }
                }
                button type="submit" { "Search" }
            }
            @if found.is_empty() {
                p .muted #no-requests { "No requests found." }
            } @else {
                table #requests {
                    tr { th { "Request" } th { "Type" } th { "Summary" } th { "Copy" } th { "Current site" } th { "Transfer status" } th { "Changed" } }
                    @for r in &found {
                        tr data-request=(r.human_id) {
                            td { a href=(format!("/requests/{}", r.id)) { (r.human_id) } }
                            td { (type_name(&config, &r.request_type)) }
                            td { (summary(&config, r)) }
                            td .role { (role(r)) }
                            td { (r.distribution.current_site) }
                            td { (r.distribution.transfer_status.as_deref().unwrap_or("—")) }
                            td { (when(tz, r.updated_at)) }
                        }
                    }
                }
                @if all.len() as u32 >= LIST_LIMIT { p .muted { "Searched the latest " (LIST_LIMIT) " requests." } }
            }
        }
    };
    page(&ctx, StatusCode::OK, "Service requests", body)
}

/// A field's value as its form input holds it.
fn raw_value(kind: &FieldKind, v: Option<&Value>, tz: Tz) -> String {
    match (kind, v) {
        (_, None | Some(Value::Null)) => String::new(),
        (FieldKind::DateTime, Some(Value::String(s))) => DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&tz).format("%Y-%m-%dT%H:%M:%S").to_string())
            .unwrap_or_else(|_| s.clone()),
        (_, Some(Value::String(s))) => s.clone(),
        (_, Some(other)) => other.to_string(),
    }
}

fn raw_values(t: &RequestType, values: &Values, tz: Tz) -> BTreeMap<String, String> {
    t.fields.iter().map(|f| (f.name.clone(), raw_value(&f.kind, values.get(&f.name), tz))).collect()
}

/// A form value converted to the field's kind; `None` when left empty. The kind's own checks
/// (length, bounds, enum values, date format) are `requests`' job.
fn parse_value(f: &FieldDef, raw: Option<&str>, tz: Tz) -> Result<Option<Value>, String> {
    if f.kind == FieldKind::Boolean {
        return Ok(Some(Value::Bool(raw.is_some_and(|v| v == "true" || v == "on"))));
    }
    let raw = raw.unwrap_or("").trim();
    if raw.is_empty() {
        return Ok(None);
    }
    match &f.kind {
        FieldKind::Number { .. } => {
            if let Ok(n) = raw.parse::<i64>() {
                return Ok(Some(Value::from(n)));
            }
            raw.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .and_then(serde_json::Number::from_f64)
                .map(|n| Some(Value::Number(n)))
                .ok_or_else(|| format!("{raw:?} is not a number"))
        }
        FieldKind::DateTime => {
            if DateTime::parse_from_rfc3339(raw).is_ok() {
                return Ok(Some(Value::String(raw.to_owned())));
            }
            let local = NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S")
                .or_else(|_| NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M"))
                .map_err(|_| "must be a date and time".to_owned())?;
            let at = tz.from_local_datetime(&local).earliest().ok_or_else(|| {
                format!("{raw} does not exist in the site's time zone (clock change)")
            })?;
            Ok(Some(Value::String(at.to_rfc3339())))
        }
        _ => Ok(Some(Value::String(raw.to_owned()))),
    }
}

/// Whether two values of a field are the same (date-times compared as instants).
fn same(kind: &FieldKind, a: Option<&Value>, b: Option<&Value>) -> bool {
    let a = a.filter(|v| !v.is_null());
    let b = b.filter(|v| !v.is_null());
    match (kind, a, b) {
        (FieldKind::DateTime, Some(Value::String(x)), Some(Value::String(y))) => {
            match (DateTime::parse_from_rfc3339(x), DateTime::parse_from_rfc3339(y)) {
                (Ok(x), Ok(y)) => x == y,
                _ => x == y,
            }
        }
        (FieldKind::Number { .. }, Some(Value::Number(x)), Some(Value::Number(y))) => {
            x.as_f64() == y.as_f64()
        }
        _ => a == b,
    }
}

/// The submitted form: field inputs by field name, and the other inputs.
struct Submitted {
    fields: BTreeMap<String, String>,
    other: BTreeMap<String, String>,
}

fn split(pairs: Vec<(String, String)>) -> Submitted {
    let mut s = Submitted { fields: BTreeMap::new(), other: BTreeMap::new() };
    for (k, v) in pairs {
        match k.strip_prefix(FIELD_PREFIX) {
            Some(name) => s.fields.insert(name.to_owned(), v),
            None => s.other.insert(k, v),
        };
    }
    s
}

/// Every field of `t` converted; conversion errors field by field.
fn convert(
    t: &RequestType,
    raw: &BTreeMap<String, String>,
    tz: Tz,
) -> Result<BTreeMap<String, Option<Value>>, ValidationErrors> {
    let mut errs = ValidationErrors::default();
    let mut out = BTreeMap::new();
    for f in &t.fields {
        match parse_value(f, raw.get(&f.name).map(String::as_str), tz) {
            Ok(v) => {
                out.insert(f.name.clone(), v);
            }
            Err(e) => errs.push(format!("fields.{}", f.name), e),
        }
    }
    if errs.is_empty() { Ok(out) } else { Err(errs) }
}

fn field_error<'a>(errs: &'a ValidationErrors, name: &str) -> Option<&'a str> {
    let key = format!("fields.{name}");
    errs.0.iter().find(|e| e.field == key).map(|e| e.message.as_str())
}

fn error_list(errs: &ValidationErrors) -> Markup {
    html! {
        @if !errs.is_empty() {
            ul .message #errors {
                @for e in &errs.0 {
                    li data-field=(e.field) { (e.field.strip_prefix("fields.").unwrap_or(&e.field)) ": " (e.message) }
                }
            }
        }
    }
}

/// One input per field of the type.
fn field_inputs(
    t: &RequestType,
    raw: &BTreeMap<String, String>,
    errs: &ValidationErrors,
) -> Markup {
    html! {
        @for f in &t.fields {
            @let name = format!("{FIELD_PREFIX}{}", f.name);
            @let id = format!("field-{}", f.name);
            @let value = raw.get(&f.name).map(String::as_str).unwrap_or("");
            p .field data-field=(f.name) {
                label for=(id) { (f.name) @if f.required { " *" } " " }
                @match &f.kind {
                    FieldKind::Text { max_length } => {
                        input id=(id) name=(name) type="text" maxlength=(max_length) value=(value);
                    }
                    FieldKind::Number { min, max, integer } => {
                        input id=(id) name=(name) type="number" step=(if *integer { "1" } else { "any" })
                            min=[min.as_ref().map(ToString::to_string)]
                            max=[max.as_ref().map(ToString::to_string)] value=(value);
                    }
                    FieldKind::Enum { values } => {
                        select id=(id) name=(name) {
                            @if !f.required || value.is_empty() { option value="" { "—" } }
                            @for v in values { option value=(v) selected[v == value] { (v) } }
                        }
                    }
                    FieldKind::Date => {
                        input id=(id) name=(name) type="date" value=(value);
                    }
                    FieldKind::DateTime => {
                        input id=(id) name=(name) type="datetime-local" step="1" value=(value);
                    }
                    FieldKind::Boolean => {
                        input id=(id) name=(name) type="checkbox" value="true" checked[value == "true"];
                    }
                }
                @if let Some(e) = field_error(errs, &f.name) { " " span .message .field-error { (e) } }
            }
        }
    }
}

#[derive(Debug, Deserialize, Default)]
pub struct NewQuery {
    #[serde(default, rename = "type")]
    request_type: String,
}

/// `GET /requests/new?type=`: the form of a type (a type chooser without one).
pub async fn new_form(
    State(ctx): State<Arc<Context>>,
    headers: HeaderMap,
    Query(q): Query<NewQuery>,
) -> Response {
    let user = match signed_in(&ctx, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let config = match ctx.site_config() {
        Ok(c) => c,
        Err(e) => return from_error(&ctx, e),
    };
    let tz = tz_of(&config);
    let raw = find_type(&config, &q.request_type)
        .map(|t| {
            t.fields
                .iter()
                .map(|f| (f.name.clone(), raw_value(&f.kind, f.default.as_ref(), tz)))
                .collect()
        })
        .unwrap_or_default();
    new_page(
        &ctx,
        &config,
        &user,
        &q.request_type,
        &raw,
        &ValidationErrors::default(),
        StatusCode::OK,
    )
}

fn new_page(
    ctx: &Context,
    config: &SiteConfig,
    user: &str,
    type_code: &str,
    raw: &BTreeMap<String, String>,
    errs: &ValidationErrors,
    status: StatusCode,
) -> Response {
    let chosen = find_type(config, type_code);
    let body = html! {
        (header(config, user))
        main {
            h2 { "New service request" }
            (error_list(errs))
            @match chosen {
                None => {
                    @if config.request_types.is_empty() {
                        p .muted #no-types { "No request types are configured for this site." }
                    } @else {
                        form #choose-type method="get" action="/requests/new" {
                            label for="type" { "Type " }
                            select #type name="type" {
                                @for t in &config.request_types { option value=(t.code) { (t.name) } }
                            }
                            button type="submit" { "Continue" }
                        }
                    }
                }
                Some(t) => {
                    form #create method="post" action="/requests" {
                        input type="hidden" name="type" value=(t.code);
                        p { strong { (t.name) } }
                        (field_inputs(t, raw, errs))
                        button .primary #create-submit type="submit" { "Create" }
                    }
                }
            }
        }
    };
    page(ctx, status, "New request", body)
}

/// `POST /requests`: creates a request from the form of its type.
pub async fn create(
    State(ctx): State<Arc<Context>>,
    headers: HeaderMap,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let user = match signed_in(&ctx, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let config = match ctx.site_config() {
        Ok(c) => c,
        Err(e) => return from_error(&ctx, e),
    };
    let form = split(pairs);
    let type_code = form.other.get("type").cloned().unwrap_or_default();
    let Some(t) = find_type(&config, &type_code) else {
        let mut errs = ValidationErrors::default();
        errs.push("type", format!("unknown request type {type_code:?}"));
        let (status, raw) = (StatusCode::UNPROCESSABLE_ENTITY, BTreeMap::new());
        return new_page(&ctx, &config, &user, "", &raw, &errs, status);
    };
    let refused = |errs: &ValidationErrors| {
        let status = StatusCode::UNPROCESSABLE_ENTITY;
        new_page(&ctx, &config, &user, t.code.as_str(), &form.fields, errs, status)
    };
    let values = match convert(t, &form.fields, tz_of(&config)) {
        Ok(v) => v,
        Err(errs) => return refused(&errs),
    };
    let input = NewRequest {
        request_type: t.code.to_string(),
        fields: values.into_iter().filter_map(|(k, v)| Some((k, v?))).collect(),
    };
    let rules = ctx.rules.get(&config);
    let made =
        ctx.change(move |c, config, now| create_with_rules(c, config, &rules, &input, now)).await;
    match made {
        Ok(r) => to_detail(&r.id.to_string(), &format!("Created {}.", r.human_id)),
        Err(Error::InvalidFields(errs)) => refused(&errs),
        Err(e @ (Error::Validation(_) | Error::Conflict(_))) => {
            let mut errs = ValidationErrors::default();
            errs.push("request", e.to_string());
            refused(&errs)
        }
        Err(e) => from_error(&ctx, e),
    }
}

#[derive(Debug, Deserialize, Default)]
pub struct DetailQuery {
    msg: Option<String>,
}

/// What a detail page shows besides the request: a message, refusals, the edit form's
/// submitted values.
#[derive(Default)]
struct Notice {
    message: Option<String>,
    errors: ValidationErrors,
    edit: Option<BTreeMap<String, String>>,
}

fn bounded(id: String) -> Option<String> {
    (id.len() <= 64).then_some(id)
}

/// `GET /requests/{id}` (an id or a human id).
pub async fn detail(
    State(ctx): State<Arc<Context>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<DetailQuery>,
) -> Response {
    let user = match signed_in(&ctx, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let notice = Notice { message: q.msg, ..Notice::default() };
    detail_page(&ctx, &user, id, StatusCode::OK, notice).await
}

async fn load(ctx: &Context, id: String) -> crate::Result<Request> {
    let Some(id) = bounded(id) else { return Err(Error::NotFound("request".into())) };
    let shown = id.clone();
    ctx.db
        .read(move |c| requests::get(c, &id))
        .await?
        .ok_or_else(|| Error::NotFound(format!("request {shown}")))
}

async fn detail_page(
    ctx: &Context,
    user: &str,
    id: String,
    status: StatusCode,
    notice: Notice,
) -> Response {
    let config = match ctx.site_config() {
        Ok(c) => c,
        Err(e) => return from_error(ctx, e),
    };
    match load(ctx, id).await {
        Ok(r) => {
            let title = r.human_id.clone();
            page(ctx, status, &title, render_detail(&config, user, &r, &notice))
        }
        Err(e) => from_error(ctx, e),
    }
}

fn render_detail(config: &SiteConfig, user: &str, r: &Request, notice: &Notice) -> Markup {
    let tz = tz_of(config);
    let site = &config.site.code;
    let d = &r.distribution;
    let t = find_type(config, r.request_type.as_str());
    let editable = d.master && d.pending_operation.is_none();
    // Fields in the type's order, then any the type no longer has.
    let mut fields: Vec<(&str, &Value)> = t
        .map(|t| {
            t.fields
                .iter()
                .filter_map(|f| r.fields.get(&f.name).map(|v| (f.name.as_str(), v)))
                .collect()
        })
        .unwrap_or_default();
    for (k, v) in &r.fields {
        if !fields.iter().any(|(name, _)| *name == k.as_str()) {
            fields.push((k.as_str(), v));
        }
    }
    let came_from = d.history.iter().rev().find(|m| &m.to_site == site).map(|m| &m.from_site);
    let mappings: Vec<_> =
        config.request_mappings.iter().filter(|m| m.source_type == r.request_type).collect();
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "—".into());
    let action = |what: &str| format!("/requests/{}/{what}", r.id);
    let distribution_rows: [(&str, &str, String); 11] = [
        ("master", "Master here", if d.master { "Yes".into() } else { "No".into() }),
        ("current-site", "Current site", d.current_site.to_string()),
        ("from-site", "From site", opt(&d.from_site)),
        ("to-site", "To site", opt(&d.to_site)),
        ("from-request-id", "From request id", opt(&d.from_request_id)),
        ("to-request-id", "To request id", opt(&d.to_request_id)),
        ("mapping", "Mapping", opt(&d.mapping)),
        ("transfer-status", "Transfer status", opt(&d.transfer_status)),
        ("update-status", "Update status", opt(&d.update_status)),
        ("pending-operation", "Operation in progress", opt(&d.pending_operation)),
        ("transfer-error", "Transfer error", opt(&d.transfer_error)),
    ];
    html! {
        (header(config, user))
        main {
            @if let Some(m) = &notice.message { p .message #message { (m) } }
            (error_list(&notice.errors))
            h2 { (r.human_id) " · " (type_name(config, &r.request_type)) }
            p #role { strong { (role(r)) } span .muted { " · revision " (r.revision) " · created " (when(tz, r.created_at)) " · changed " (when(tz, r.updated_at)) } }
            h3 { "Fields" }
            table #fields {
                @for (name, v) in &fields {
                    tr data-field=(name) { th { (name) } td { (shown(v)) } }
                }
            }
            h3 { "Distribution" }
            table #distribution {
                @for (key, label, value) in &distribution_rows {
                    tr data-key=(key) { th { (label) } td { (value) } }
                }
            }
            h3 { "Mapping history" }
            @if d.history.is_empty() {
                p .muted #no-history { "This request has never moved between sites." }
            } @else {
                table #history {
                    tr { th { "Time" } th { "From → to" } th { "Operation" } th { "Mapping" } th { "Rule" } }
                    @for m in &d.history {
                        tr {
                            td { (when(tz, m.at)) }
                            td { (m.from_site) " → " (m.to_site) }
                            td { (m.kind.as_str()) @if let Some(mode) = m.mode { " (" (mode.as_str()) ")" } }
                            td { (m.mapping.as_ref().map_or_else(|| "—".to_owned(), ToString::to_string)) }
                            td { (m.rule.as_ref().map_or_else(|| "—".to_owned(), ToString::to_string)) }
                        }
                    }
                }
            }
            @if editable {
                h3 { "Edit" }
                @match t {
                    Some(t) => {
                        @let raw = notice.edit.clone().unwrap_or_else(|| raw_values(t, &r.fields, tz));
                        form #edit method="post" action=(action("edit")) {
                            input type="hidden" name="revision" value=(r.revision);
                            (field_inputs(t, &raw, &notice.errors))
                            button .primary #save type="submit" { "Save" }
                        }
                    }
                    None => {
                        p .muted { "Request type " (r.request_type) " is no longer configured at this site; the request cannot be edited here." }
                    }
                }
                h3 { "Transfer" }
                form #transfer method="post" action=(action("operations")) {
                    input type="hidden" name="action" value="transfer";
                    label for="mode" { "Mode " }
                    select #mode name="mode" {
                        option value="ownership" { "Ownership (the target becomes the master)" }
                        option value="data_only" { "Data only (a read-only copy there)" }
                        option value="independent_copy" { "Independent copy (a new request there)" }
                    }
                    " "
                    label for="target" { "Target site " }
                    input #target name="target" type="text" maxlength="32" required;
                    @if !mappings.is_empty() {
                        " "
                        label for="mapping" { "Mapping " }
                        select #mapping name="mapping" {
                            option value="" { "— none —" }
                            @for m in &mappings { option value=(m.code) { (m.name) " (→ " (m.target_type) ")" } }
                        }
                    }
                    " "
                    button #transfer-submit type="submit" { "Transfer" }
                }
                @if let Some(from) = came_from {
                    form #return method="post" action=(action("operations")) {
                        button #return-submit name="action" value="return" type="submit" { "Return to " (from) }
                    }
                }
                form #delete method="post" action=(action("delete")) {
                    button #delete-submit type="submit" { "Delete" }
                }
            } @else {
                p .muted #read-only {
                    @if d.pending_operation.is_some() {
                        "Read-only while it is handed over to " (d.to_site.as_deref().unwrap_or("another site")) "."
                    } @else {
                        "A read-only copy: its master is at " (d.current_site) "."
                    }
                }
                @if d.pending_operation.is_none() {
                    form #delete method="post" action=(action("delete")) {
                        button #delete-submit type="submit" { "Delete copy" }
                    }
                }
            }
        }
    }
}

/// `POST /requests/{id}/edit`: saves the edit form of a master (only the fields that changed,
/// at the revision the form was shown with).
pub async fn edit(
    State(ctx): State<Arc<Context>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let user = match signed_in(&ctx, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let config = match ctx.site_config() {
        Ok(c) => c,
        Err(e) => return from_error(&ctx, e),
    };
    let current = match load(&ctx, id.clone()).await {
        Ok(r) => r,
        Err(e) => return from_error(&ctx, e),
    };
    let form = split(pairs);
    let refused = |status: StatusCode, errors: ValidationErrors, raw: BTreeMap<String, String>| {
        let notice = Notice { message: None, errors, edit: Some(raw) };
        detail_page(&ctx, &user, id.clone(), status, notice)
    };
    let Some(t) = find_type(&config, current.request_type.as_str()) else {
        let e = Error::Conflict(format!(
            "request type {} is no longer configured at this site",
            current.request_type
        ));
        let notice = Notice { message: Some(e.to_string()), ..Notice::default() };
        return detail_page(&ctx, &user, id, StatusCode::CONFLICT, notice).await;
    };
    let values = match convert(t, &form.fields, tz_of(&config)) {
        Ok(v) => v,
        Err(errs) => return refused(StatusCode::UNPROCESSABLE_ENTITY, errs, form.fields).await,
    };
    let fields: Values = t
        .fields
        .iter()
        .filter_map(|f| {
            let new = values.get(&f.name).cloned().flatten();
            let old = current.fields.get(&f.name);
            (!same(&f.kind, new.as_ref(), old))
                .then(|| (f.name.clone(), new.unwrap_or(Value::Null)))
        })
        .collect();
    if fields.is_empty() {
        return to_detail(&current.id.to_string(), "Nothing to save: no field changed.");
    }
    let expected_revision = form.other.get("revision").and_then(|r| r.parse::<u64>().ok());
    let patch = RequestPatch { fields, expected_revision };
    let rules = ctx.rules.get(&config);
    let key = current.id.to_string();
    let changed = ctx
        .change(move |c, config, now| update_with_rules(c, config, &rules, &key, &patch, now))
        .await;
    match changed {
        Ok(r) => to_detail(&r.id.to_string(), &format!("Saved {}.", r.human_id)),
        Err(Error::InvalidFields(errs)) => {
            refused(StatusCode::UNPROCESSABLE_ENTITY, errs, form.fields).await
        }
        Err(e @ (Error::Conflict(_) | Error::Validation(_))) => {
            let notice = Notice { message: Some(e.to_string()), ..Notice::default() };
            detail_page(&ctx, &user, id.clone(), status_of(&e), notice).await
        }
        Err(e) => from_error(&ctx, e),
    }
}

#[derive(Debug, Deserialize)]
pub struct OperationForm {
    action: String,
    #[serde(default)]
    mode: String,
    #[serde(default)]
    target: String,
    #[serde(default)]
    mapping: String,
}

/// The operation a transfer or return form asks for; refusals field by field.
fn operation_spec(form: &OperationForm) -> Result<OperationSpec, ValidationErrors> {
    let mut errs = ValidationErrors::default();
    let action = match form.action.as_str() {
        "transfer" => OpKind::Transfer,
        "return" => OpKind::Return,
        other => {
            errs.push("action", format!("unknown action {other:?}"));
            return Err(errs);
        }
    };
    let mode = match form.mode.trim() {
        "" => None,
        m => TransferMode::parse(m).or_else(|| {
            errs.push("mode", format!("unknown mode {m:?}"));
            None
        }),
    };
    let target = match form.target.trim() {
        "" => None,
        s => match SiteCode::parse(s) {
            Ok(site) => Some(OpTarget::Site(site)),
            Err(e) => {
                errs.push("target", e.message);
                None
            }
        },
    };
    let mapping = match form.mapping.trim() {
        "" => None,
        m => match Code::parse(m) {
            Ok(c) => Some(c),
            Err(e) => {
                errs.push("mapping", e.message);
                None
            }
        },
    };
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(OperationSpec {
        action,
        mode,
        target,
        mapping,
        pool: None,
        update: UpdatePolicy::default(),
        rule: None,
    })
}

/// `POST /requests/{id}/operations`: "Transfer" (mode, target site, mapping) or "Return".
pub async fn operation(
    State(ctx): State<Arc<Context>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<OperationForm>,
) -> Response {
    let user = match signed_in(&ctx, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let current = match load(&ctx, id.clone()).await {
        Ok(r) => r,
        Err(e) => return from_error(&ctx, e),
    };
    let spec = match operation_spec(&form) {
        Ok(s) => s,
        Err(errors) => {
            let notice = Notice { errors, ..Notice::default() };
            return detail_page(&ctx, &user, id, StatusCode::UNPROCESSABLE_ENTITY, notice).await;
        }
    };
    let key = current.id.to_string();
    let started =
        ctx.change(move |c, config, now| distribution::start(c, config, &key, &spec, now)).await;
    match started {
        Ok(s) => {
            let r = s.request.unwrap_or(current);
            let msg = match (form.action.as_str(), &r.distribution.to_site) {
                ("return", Some(to)) => format!("Return of {} to {to} started.", r.human_id),
                (_, Some(to)) => format!("Transfer of {} to {to} started.", r.human_id),
                _ => format!("Operation on {} started.", r.human_id),
            };
            to_detail(&r.id.to_string(), &msg)
        }
        Err(Error::InvalidFields(errors)) => {
            let notice = Notice { errors, ..Notice::default() };
            detail_page(&ctx, &user, id, StatusCode::UNPROCESSABLE_ENTITY, notice).await
        }
        Err(e @ (Error::Conflict(_) | Error::Validation(_))) => {
            let notice = Notice { message: Some(e.to_string()), ..Notice::default() };
            detail_page(&ctx, &user, id, status_of(&e), notice).await
        }
        Err(e) => from_error(&ctx, e),
    }
}

/// `POST /requests/{id}/delete`: deletes the master (its copies follow) or this read-only
/// copy alone.
pub async fn delete(
    State(ctx): State<Arc<Context>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let user = match signed_in(&ctx, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let current = match load(&ctx, id.clone()).await {
        Ok(r) => r,
        Err(e) => return from_error(&ctx, e),
    };
    let spec = OperationSpec {
        action: OpKind::Delete,
        mode: None,
        target: None,
        mapping: None,
        pool: None,
        update: UpdatePolicy::default(),
        rule: None,
    };
    let key = current.id.to_string();
    let done =
        ctx.change(move |c, config, now| distribution::start(c, config, &key, &spec, now)).await;
    match done {
        Ok(_) => {
            let what = if current.distribution.master { "" } else { "the copy of " };
            let msg = format!("Deleted {what}{}.", current.human_id);
            Redirect::to(&format!("/requests?msg={}", url_encode(&msg))).into_response()
        }
        Err(e @ (Error::Conflict(_) | Error::Validation(_) | Error::InvalidFields(_))) => {
            let notice = Notice { message: Some(e.to_string()), ..Notice::default() };
            detail_page(&ctx, &user, id, status_of(&e), notice).await
        }
        Err(e) => from_error(&ctx, e),
    }
}
