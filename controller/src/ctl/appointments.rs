//! `meridianctl appointments …`: book, list, show, slots, reschedule, cancel through
//! `/api/v1/appointments`, bulk syncs (`sync`, `syncs`), and their tables. Requests are the
//! API's own types, so the server validates everything (and reports every problem with its
//! field).

use reqwest::Method;
use serde_json::Value;

use super::{Client, CtlError, Output, Result, structured};
use crate::appointments::{BookRequest, CancelRequest, DaySlots, RescheduleRequest};
use crate::store::appointment_sync::SyncRecord;
use crate::store::appointments::Appointment;

/// What `meridianctl appointments list` asks for.
#[derive(Debug, Clone, Copy, Default)]
pub struct ListFilter<'a> {
    pub site: Option<&'a str>,
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
    pub status: Option<&'a str>,
    /// Only appointments flagged with a conflict.
    pub conflict: bool,
}

pub async fn book(client: &Client, req: &BookRequest) -> Result<Appointment> {
    let body = to_value(req)?;
    client.call(Method::POST, &["appointments"], Some(&body)).await
}

pub async fn list(client: &Client, f: &ListFilter<'_>) -> Result<Vec<Appointment>> {
    let mut url = client.url(&["appointments"])?;
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in [("site", f.site), ("from", f.from), ("to", f.to), ("status", f.status)] {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
        if f.conflict {
            q.append_pair("conflict", "true");
        }
    }
    decode(client, client.send_to(Method::GET, url, None).await?)
}

pub async fn show(client: &Client, id: &str) -> Result<Appointment> {
    client.call(Method::GET, &["appointments", id], None).await
}

/// Requests a bulk sync of `site`'s agents now; returns the syncs requested.
pub async fn request_sync(client: &Client, site: &str) -> Result<Vec<SyncRecord>> {
    let body = serde_json::json!({ "site": site });
    let v: Value = client.call(Method::POST, &["appointments", "sync"], Some(&body)).await?;
    decode(client, v.get("syncs").cloned())
}

pub async fn syncs(client: &Client, site: Option<&str>) -> Result<Vec<SyncRecord>> {
    let mut url = client.url(&["appointments", "syncs"])?;
    if let Some(site) = site {
        url.query_pairs_mut().append_pair("site", site);
    }
    decode(client, client.send_to(Method::GET, url, None).await?)
}

pub fn render_syncs(items: &[SyncRecord], output: Output) -> Result<String> {
    if output != Output::Table {
        return structured(&items, output);
    }
    let day = |d: Option<chrono::NaiveDate>| d.map(|d| d.to_string()).unwrap_or_default();
    let rows = items.iter().map(|s| {
        vec![
            s.id.to_string(),
            s.site.to_string(),
            s.reason.clone(),
            s.state.as_str().to_owned(),
            s.requested_at.format("%Y-%m-%d %H:%M:%SZ").to_string(),
            match (s.from_day, s.to_day) {
                (None, None) => String::new(),
                (from, to) => format!("{}..{}", day(from), day(to)),
            },
            s.appointments.map(|n| n.to_string()).unwrap_or_default(),
            s.resumed.to_string(),
            s.error.clone().unwrap_or_default(),
        ]
    });
    Ok(grid(
        &[
            "SYNC",
            "SITE",
            "REASON",
            "STATE",
            "REQUESTED",
            "DAYS",
            "APPOINTMENTS",
            "RESUMED",
            "ERROR",
        ],
        rows,
    ))
}

pub async fn slots(client: &Client, site: &str, service: &str, date: &str) -> Result<DaySlots> {
    let mut url = client.url(&["appointments", "slots"])?;
    url.query_pairs_mut()
        .append_pair("site", site)
        .append_pair("service", service)
        .append_pair("date", date);
    decode(client, client.send_to(Method::GET, url, None).await?)
}

/// Moves an appointment to `start`. Without `expected_revision` the current one is read first
/// (so a change made meanwhile by someone else is overwritten only if it happened in between).
pub async fn reschedule(
    client: &Client,
    id: &str,
    start: &str,
    expected_revision: Option<u64>,
) -> Result<Appointment> {
    let expected_revision = match expected_revision {
        Some(r) => r,
        None => show(client, id).await?.revision,
    };
    let body = to_value(&RescheduleRequest { start: start.to_owned(), expected_revision })?;
    client.call(Method::POST, &["appointments", id, "reschedule"], Some(&body)).await
}

pub async fn cancel(client: &Client, id: &str, req: &CancelRequest) -> Result<Appointment> {
    let body = to_value(req)?;
    client.call(Method::POST, &["appointments", id, "cancel"], Some(&body)).await
}

/// Appointments as a table: local start (the site's wall clock), site, service, customer,
/// booking reference, state (with the branch's attendance) and any conflict.
pub fn render_list(items: &[Appointment], output: Output) -> Result<String> {
    if output != Output::Table {
        return structured(items, output);
    }
    let rows = items.iter().map(|a| {
        vec![
            a.id.to_string(),
            a.start.replace('T', " "),
            a.site.to_string(),
            a.service.to_string(),
            format!("{}m", a.duration_minutes),
            a.customer_name.clone(),
            a.reference.to_string(),
            a.external_ref.clone().unwrap_or_else(|| "-".into()),
            a.status.as_str().to_owned(),
            a.state.as_str().to_owned(),
            a.ticket.clone().unwrap_or_else(|| "-".into()),
            a.conflict.map(|c| c.as_str().to_owned()).unwrap_or_else(|| "-".into()),
            a.revision.to_string(),
        ]
    });
    Ok(grid(
        &[
            "ID",
            "START (LOCAL)",
            "SITE",
            "SERVICE",
            "LENGTH",
            "CUSTOMER",
            "BOOKING REF",
            "EXTERNAL REF",
            "STATUS",
            "STATE",
            "TICKET",
            "CONFLICT",
            "REV",
        ],
        rows,
    ))
}

/// One appointment, field by field.
pub fn render_one(a: &Appointment, output: Output) -> Result<String> {
    if output != Output::Table {
        return structured(a, output);
    }
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    Ok(super::render::fields(&[
        ("appointment", a.id.to_string()),
        ("site", a.site.to_string()),
        ("service", a.service.to_string()),
        ("start", format!("{} (site time)", a.start.replace('T', " "))),
        ("starts at", a.starts_at.format("%Y-%m-%d %H:%MZ").to_string()),
        ("length", format!("{} minutes", a.duration_minutes)),
        ("customer", a.customer_name.clone()),
        ("contact", opt(&a.customer_contact)),
        ("notes", opt(&a.notes)),
        ("booking reference", a.reference.to_string()),
        ("external reference", opt(&a.external_ref)),
        ("status", a.status.as_str().to_owned()),
        ("state", a.state.as_str().to_owned()),
        ("attendance", a.attendance.map(|x| x.as_str().to_owned()).unwrap_or_else(|| "-".into())),
        ("ticket", opt(&a.ticket)),
        ("conflict", a.conflict.map(|c| c.as_str().to_owned()).unwrap_or_else(|| "-".into())),
        ("cancel reason", opt(&a.cancel_reason)),
        ("revision", a.revision.to_string()),
    ]))
}

/// A day's slots: local start, UTC start, capacity, booked, remaining.
pub fn render_slots(day: &DaySlots, output: Output) -> Result<String> {
    if output != Output::Table {
        return structured(day, output);
    }
    let rows = day.slots.iter().map(|s| {
        vec![
            s.start.get(11..).unwrap_or(&s.start).to_owned(),
            s.starts_at.format("%Y-%m-%d %H:%MZ").to_string(),
            s.capacity.to_string(),
            s.booked.to_string(),
            s.remaining.to_string(),
            if s.bookable { "yes" } else { "no" }.to_owned(),
        ]
    });
    let table = grid(&["START", "UTC", "CAPACITY", "BOOKED", "REMAINING", "BOOKABLE"], rows);
    Ok(format!(
        "{} {} on {} ({}, {}-minute slots)\n{table}",
        day.site, day.service, day.date, day.time_zone, day.slot_minutes
    ))
}

fn grid(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header(headers.to_vec());
    for row in rows {
        t.add_row(row);
    }
    let last = headers.len().saturating_sub(1);
    for (i, col) in t.column_iter_mut().enumerate() {
        col.set_padding((0, if i == last { 0 } else { 3 }));
    }
    let mut s = t.trim_fmt();
    s.push('\n');
    s
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| CtlError::Usage(e.to_string()))
}

fn decode<T: serde::de::DeserializeOwned>(client: &Client, v: Option<Value>) -> Result<T> {
    serde_json::from_value(v.unwrap_or(Value::Null)).map_err(|e| CtlError::Protocol {
        server: client.server().to_owned(),
        reason: format!("unexpected body: {e}"),
    })
}
