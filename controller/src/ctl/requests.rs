//! `meridianctl requests …`: the distributed-request ledger through `/api/v1/request-ops` and
//! `/api/v1/requests/{id}/ownership` — list operations (`ops`), show one (`op`), `cancel` and
//! `retry` one, the per-lane `backlog`, and who holds a request (`owner`). Bodies are read as
//! JSON values, so `--output json|yaml` prints exactly what the API answered.

use chrono::{DateTime, Utc};
use reqwest::Method;
use serde_json::{Value, json};

use super::render::{fields, timestamp};
use super::{Client, Output, Result, structured};

/// What `meridianctl requests ops` asks for.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpsFilter<'a> {
    pub status: Option<&'a str>,
    pub site: Option<&'a str>,
    pub pool: Option<&'a str>,
    pub request: Option<&'a str>,
    pub limit: Option<u32>,
}

pub async fn ops(client: &Client, f: &OpsFilter<'_>) -> Result<Vec<Value>> {
    let mut url = client.url(&["request-ops"])?;
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in
            [("status", f.status), ("site", f.site), ("pool", f.pool), ("request", f.request)]
        {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
        if let Some(limit) = f.limit {
            q.append_pair("limit", &limit.to_string());
        }
    }
    let v = client.send_to(Method::GET, url, None).await?.unwrap_or(Value::Null);
    array(client, v)
}

pub async fn op(client: &Client, op_id: &str, target: &str) -> Result<Value> {
    client.call(Method::GET, &["request-ops", op_id, target], None).await
}

pub async fn cancel(
    client: &Client,
    op_id: &str,
    target: &str,
    reason: Option<&str>,
) -> Result<Value> {
    let body = match reason {
        Some(r) => json!({ "reason": r }),
        None => json!({}),
    };
    client.call(Method::POST, &["request-ops", op_id, target, "cancel"], Some(&body)).await
}

pub async fn retry(client: &Client, op_id: &str, target: &str) -> Result<Value> {
    client.call(Method::POST, &["request-ops", op_id, target, "retry"], None).await
}

pub async fn backlog(client: &Client) -> Result<Value> {
    client.call(Method::GET, &["request-ops", "backlog"], None).await
}

pub async fn owner(client: &Client, request: &str) -> Result<Value> {
    client.call(Method::GET, &["requests", request, "ownership"], None).await
}

fn array(client: &Client, v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(super::CtlError::Protocol {
            server: client.server().to_owned(),
            reason: format!("expected a list, got {other}"),
        }),
    }
}

fn text(v: &Value, field: &str) -> String {
    match v.get(field) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn time_of(v: &Value, field: &str) -> Option<DateTime<Utc>> {
    v.get(field)?.as_str()?.parse().ok()
}

/// An age as tables show it: `42s`, `17m`, `5h`, `3d`.
pub fn age(seconds: f64) -> String {
    let s = seconds.max(0.0) as i64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn age_since(v: &Value, field: &str, now: DateTime<Utc>) -> String {
    time_of(v, field)
        .map(|t| age((now - t).num_milliseconds() as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

fn op_kind(v: &Value) -> String {
    match v.get("mode").and_then(Value::as_str) {
        Some(mode) => format!("{} ({mode})", text(v, "kind")),
        None => text(v, "kind"),
    }
}

fn op_row(v: &Value, now: DateTime<Utc>) -> Vec<String> {
    vec![
        text(v, "op_id"),
        text(v, "human_id"),
        op_kind(v),
        format!("{} → {}", text(v, "source_site"), text(v, "target_site")),
        text(v, "pool"),
        text(v, "status"),
        text(v, "result"),
        text(v, "attempt"),
        age_since(v, "created_at", now),
        text(v, "reason"),
    ]
}

const OP_HEADERS: [&str; 10] =
    ["OP", "REQUEST", "KIND", "ROUTE", "POOL", "STATUS", "RESULT", "ATTEMPT", "AGE", "REASON"];

/// Operations, newest first.
pub fn render_ops(items: &[Value], output: Output, now: DateTime<Utc>) -> Result<String> {
    if output != Output::Table {
        return structured(items, output);
    }
    Ok(grid(&OP_HEADERS, items.iter().map(|v| op_row(v, now))))
}

/// One operation, field by field.
pub fn render_op(v: &Value, output: Output, now: DateTime<Utc>) -> Result<String> {
    if output != Output::Table {
        return structured(v, output);
    }
    Ok(fields(&[
        ("operation", text(v, "op_id")),
        ("request", format!("{} ({})", text(v, "human_id"), text(v, "request_id"))),
        ("kind", op_kind(v)),
        ("origin", text(v, "origin")),
        ("source", text(v, "source_site")),
        ("target", text(v, "target_site")),
        ("pool", text(v, "pool")),
        ("mapping", text(v, "mapping")),
        ("rule", text(v, "rule")),
        ("update policy", text(v, "update_policy")),
        ("status", text(v, "status")),
        ("result", text(v, "result")),
        ("reason", text(v, "reason")),
        ("attempt", text(v, "attempt")),
        ("agent", text(v, "agent_id")),
        ("delivered", text(v, "delivered")),
        ("target request", text(v, "target_request_id")),
        ("requested", timestamp(v.get("requested_at"))),
        (
            "recorded",
            format!("{} ({} ago)", timestamp(v.get("created_at")), age_since(v, "created_at", now)),
        ),
        ("next attempt", timestamp(v.get("next_attempt_at"))),
        ("completed", timestamp(v.get("completed_at"))),
    ]))
}

/// The backlog per lane, then the totals.
pub fn render_backlog(v: &Value, output: Output) -> Result<String> {
    if output != Output::Table {
        return structured(v, output);
    }
    let lanes = v.get("lanes").and_then(Value::as_array).cloned().unwrap_or_default();
    let totals = v.get("totals").cloned().unwrap_or(Value::Null);
    let oldest = |l: &Value| {
        let secs = l.get("oldest_age_seconds").and_then(Value::as_f64).unwrap_or(0.0);
        if l.get("oldest_open_at").is_none_or(Value::is_null) { "-".into() } else { age(secs) }
    };
    let mut rows: Vec<Vec<String>> = lanes
        .iter()
        .map(|l| {
            vec![
                text(l, "pool"),
                text(l, "target_site"),
                text(l, "open"),
                text(l, "retrying"),
                oldest(l),
            ]
        })
        .collect();
    rows.push(vec![
        "TOTAL".into(),
        String::new(),
        text(&totals, "open"),
        text(&totals, "retrying"),
        oldest(&totals),
    ]);
    Ok(grid(&["POOL", "TARGET", "OPEN", "RETRYING", "OLDEST"], rows.into_iter()))
}

/// Who holds a request: the owner row, its copies, and its operations.
pub fn render_owner(v: &Value, output: Output, now: DateTime<Utc>) -> Result<String> {
    if output != Output::Table {
        return structured(v, output);
    }
    let master = match (v.get("master_site").and_then(Value::as_str), v.get("deleted_at")) {
        (Some(site), _) => site.to_owned(),
        (None, Some(d)) if !d.is_null() => format!("none (deleted {})", timestamp(Some(d))),
        (None, _) => "none (in flight)".into(),
    };
    let mut out = fields(&[
        ("request", format!("{} ({})", text(v, "human_id"), text(v, "request_id"))),
        ("type", text(v, "request_type")),
        ("master", master),
        ("in flight", text(v, "in_flight_op")),
        ("revision", text(v, "revision")),
    ]);
    let copies = v.get("copies").and_then(Value::as_array).cloned().unwrap_or_default();
    out.push_str("\ncopies:\n");
    if copies.is_empty() {
        out.push_str("  none\n");
    } else {
        out.push_str(&grid(
            &["SITE", "UPDATES", "MAPPING", "DIRTY", "LAST SENT"],
            copies.iter().map(|c| {
                vec![
                    text(c, "site"),
                    text(c, "update_policy"),
                    text(c, "mapping"),
                    text(c, "dirty"),
                    timestamp(c.get("last_sent_at")),
                ]
            }),
        ));
    }
    let ops = v.get("operations").and_then(Value::as_array).cloned().unwrap_or_default();
    out.push_str("\noperations:\n");
    if ops.is_empty() {
        out.push_str("  none\n");
    } else {
        out.push_str(&grid(&OP_HEADERS, ops.iter().map(|o| op_row(o, now))));
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_at_a_glance() {
        for (secs, want) in [
            (0.0, "0s"),
            (59.9, "59s"),
            (60.0, "1m"),
            (3599.0, "59m"),
            (7200.0, "2h"),
            (172_800.0, "2d"),
            (-5.0, "0s"),
        ] {
            assert_eq!(age(secs), want, "{secs}");
        }
    }

    #[test]
    fn a_backlog_table_ends_with_its_totals() {
        let v = json!({
            "lanes": [{"pool": "default", "target_site": "CHI", "open": 2, "retrying": 1,
                       "oldest_open_at": "2026-11-22T08:00:00Z", "oldest_age_seconds": 125.0}],
            "totals": {"open": 2, "retrying": 1, "oldest_open_at": "2026-11-22T08:00:00Z",
                       "oldest_age_seconds": 125.0}
        });
        let table = render_backlog(&v, Output::Table).expect("render");
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(
            lines[1].starts_with("default") && lines[1].contains("CHI") && lines[1].ends_with("2m"),
            "{table}"
        );
        assert!(lines[2].starts_with("TOTAL") && lines[2].ends_with("2m"), "{table}");
    }
}
