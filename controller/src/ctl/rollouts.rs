//! `meridianctl rollouts …`: agent upgrade rollouts through `/api/v1/rollouts` — `create`,
//! `list`, `show`, `pause`, `resume`, `abort`. Bodies are read as JSON values, so
//! `--output json|yaml` prints exactly what the API answered.

use chrono::{DateTime, Utc};
use reqwest::Method;
use serde_json::{Map, Value, json};

use super::render::{fields, timestamp};
use super::{Client, CtlError, Output, Result, structured};

/// What `meridianctl rollouts create` was given.
#[derive(Debug, Clone, Default)]
pub struct CreateArgs<'a> {
    pub version: &'a str,
    pub platform: &'a str,
    /// Site codes (each may hold several, comma-separated).
    pub sites: &'a [String],
    pub tag: Option<&'a str>,
    pub all: bool,
    /// A JSON list (`[{"sites":1},{"rest":true}]`) or the short form `1,10%,rest`.
    pub waves: Option<&'a str>,
    pub wave_pause_s: Option<u64>,
    pub max_failures: Option<u32>,
    /// `HH:MM-HH:MM` in each site's time.
    pub window: Option<&'a str>,
    pub allow_downgrade: bool,
    pub health_timeout_s: Option<u32>,
}

/// The body of `POST /api/v1/rollouts` (the server checks the values; this only shapes them).
pub fn create_body(a: &CreateArgs<'_>) -> Result<Value> {
    let sites: Vec<String> = a
        .sites
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let targets = match (!sites.is_empty(), a.tag, a.all) {
        (true, None, false) => json!({ "sites": sites }),
        (false, Some(tag), false) => json!({ "tag": tag }),
        (false, None, true) => json!({ "all": true }),
        (false, None, false) => {
            return Err(CtlError::Usage("name the targets: --site, --tag or --all".into()));
        }
        _ => return Err(CtlError::Usage("give only one of --site, --tag and --all".into())),
    };
    let mut body = Map::new();
    body.insert("version".into(), a.version.into());
    body.insert("platform".into(), a.platform.into());
    body.insert("targets".into(), targets);
    if let Some(w) = a.waves {
        body.insert("waves".into(), parse_waves(w)?);
    }
    if let Some(w) = a.window {
        let (start, end) = w.split_once('-').ok_or_else(|| {
            CtlError::Usage(format!("--window {w:?}: use HH:MM-HH:MM, like 01:00-05:00"))
        })?;
        body.insert("window".into(), json!({"start": start.trim(), "end": end.trim()}));
    }
    if let Some(p) = a.wave_pause_s {
        body.insert("wave_pause_s".into(), p.into());
    }
    if let Some(m) = a.max_failures {
        body.insert("max_failures".into(), m.into());
    }
    if a.allow_downgrade {
        body.insert("allow_downgrade".into(), true.into());
    }
    if let Some(t) = a.health_timeout_s {
        body.insert("health_timeout_s".into(), t.into());
    }
    Ok(Value::Object(body))
}

/// `--waves`: a JSON list as the API takes it, or the short form `1,10%,rest` (a number of
/// sites, a percentage, the rest).
pub fn parse_waves(s: &str) -> Result<Value> {
    let s = s.trim();
    if s.starts_with('[') {
        return serde_json::from_str(s)
            .map_err(|e| CtlError::Usage(format!("--waves is not valid JSON: {e}")));
    }
    let waves = s
        .split(',')
        .map(str::trim)
        .map(|w| {
            if w == "rest" {
                Ok(json!({"rest": true}))
            } else if let Some(p) = w.strip_suffix('%') {
                p.trim().parse::<u64>().map(|p| json!({"percent": p})).map_err(|_| w)
            } else {
                w.parse::<u64>().map(|n| json!({"sites": n})).map_err(|_| w)
            }
        })
        .collect::<std::result::Result<Vec<Value>, &str>>()
        .map_err(|w| {
            CtlError::Usage(format!(
                "--waves: {w:?} is not a wave; use a number of sites, a percentage (10%) or rest, \
                 comma-separated (1,10%,rest), or a JSON list"
            ))
        })?;
    Ok(Value::Array(waves))
}

pub async fn create(client: &Client, body: &Value) -> Result<Value> {
    client.call(Method::POST, &["rollouts"], Some(body)).await
}

pub async fn list(client: &Client, state: Option<&str>, limit: Option<u32>) -> Result<Vec<Value>> {
    let mut url = client.url(&["rollouts"])?;
    {
        let mut q = url.query_pairs_mut();
        if let Some(s) = state {
            q.append_pair("state", s);
        }
        if let Some(l) = limit {
            q.append_pair("limit", &l.to_string());
        }
    }
    match client.send_to(Method::GET, url, None).await?.unwrap_or(Value::Null) {
        Value::Array(items) => Ok(items),
        other => Err(CtlError::Protocol {
            server: client.server().to_owned(),
            reason: format!("expected a list, got {other}"),
        }),
    }
}

pub async fn show(client: &Client, id: &str) -> Result<Value> {
    client.call(Method::GET, &["rollouts", id], None).await
}

pub async fn pause(client: &Client, id: &str) -> Result<Value> {
    client.call(Method::POST, &["rollouts", id, "pause"], None).await
}

pub async fn resume(client: &Client, id: &str) -> Result<Value> {
    client.call(Method::POST, &["rollouts", id, "resume"], None).await
}

pub async fn abort(client: &Client, id: &str, reason: Option<&str>) -> Result<Value> {
    let body = match reason {
        Some(r) => json!({ "reason": r }),
        None => json!({}),
    };
    client.call(Method::POST, &["rollouts", id, "abort"], Some(&body)).await
}

fn text(v: &Value, field: &str) -> String {
    match v.get(field) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn wave(v: &Value) -> String {
    match (
        v.get("current_wave").and_then(Value::as_u64),
        v.get("wave_count").and_then(Value::as_u64),
    ) {
        (Some(c), Some(n)) if n > 0 => format!("{c}/{n}"),
        _ => "-".into(),
    }
}

/// `healthy 2, pending 1`: the site states with sites.
fn counts(v: &Value) -> String {
    let parts: Vec<String> = v
        .get("site_counts")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
                .map(|(s, n)| format!("{s} {n}"))
                .collect()
        })
        .unwrap_or_default();
    if parts.is_empty() { "-".into() } else { parts.join(", ") }
}

fn window_text(w: Option<&Value>) -> String {
    match w.and_then(Value::as_object) {
        Some(o) => format!(
            "{}-{} (site time)",
            o.get("start").and_then(Value::as_str).unwrap_or("?"),
            o.get("end").and_then(Value::as_str).unwrap_or("?")
        ),
        None => "outside business hours".into(),
    }
}

fn site_window(s: &Value) -> String {
    let w = s.get("window");
    match w.and_then(|w| w.get("status")).and_then(Value::as_str) {
        Some("open") => format!("open until {}", timestamp(w.and_then(|w| w.get("until")))),
        Some("closed") => format!("opens {}", timestamp(w.and_then(|w| w.get("opens_at")))),
        Some(_) => text(w.unwrap_or(&Value::Null), "reason"),
        None => "-".into(),
    }
}

fn command(s: &Value) -> String {
    let mut out = match s.get("command_seq").and_then(Value::as_u64) {
        Some(seq) if s.get("delivered") == Some(&Value::Bool(true)) => format!("#{seq} delivered"),
        Some(seq) => format!("#{seq} queued"),
        None => "-".into(),
    };
    if s.get("cancel_seq").is_some_and(|c| !c.is_null()) {
        out.push_str(", cancelled");
    }
    out
}

/// Rollouts, newest first.
pub fn render_list(items: &[Value], output: Output, now: DateTime<Utc>) -> Result<String> {
    if output != Output::Table {
        return structured(items, output);
    }
    let rows = items.iter().map(|v| {
        let age = v
            .get("created_at")
            .and_then(Value::as_str)
            .and_then(|t| t.parse::<DateTime<Utc>>().ok())
            .map(|t| super::requests::age((now - t).num_milliseconds() as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        vec![
            text(v, "id"),
            text(v, "version"),
            text(v, "platform"),
            text(v, "state"),
            wave(v),
            counts(v),
            age,
        ]
    });
    Ok(grid(&["ID", "VERSION", "PLATFORM", "STATE", "WAVE", "SITES", "AGE"], rows))
}

/// One rollout, field by field, then its sites.
pub fn render_one(v: &Value, output: Output) -> Result<String> {
    if output != Output::Table {
        return structured(v, output);
    }
    let mut out = fields(&[
        ("rollout", text(v, "id")),
        ("release", format!("{} for {}", text(v, "version"), text(v, "platform"))),
        ("state", text(v, "state")),
        ("reason", text(v, "halted_reason")),
        ("wave", wave(v)),
        ("next wave", timestamp(v.get("next_wave_at"))),
        ("sites", counts(v)),
        ("targets", v.get("targets").map(Value::to_string).unwrap_or_default()),
        ("waves", v.get("waves").map(Value::to_string).unwrap_or_default()),
        ("wave pause", format!("{}s", text(v, "wave_pause_s"))),
        ("window", window_text(v.get("window"))),
        ("max failures", text(v, "max_failures")),
        ("allow downgrade", text(v, "allow_downgrade")),
        (
            "health timeout",
            match v.get("health_timeout_s").and_then(Value::as_u64) {
                Some(t) => format!("{t}s"),
                None => "controller default".into(),
            },
        ),
        ("created", format!("{} by {}", timestamp(v.get("created_at")), text(v, "created_by"))),
        ("updated", timestamp(v.get("updated_at"))),
    ]);
    let sites = v.get("sites").and_then(Value::as_array).cloned().unwrap_or_default();
    out.push_str("\nsites:\n");
    if sites.is_empty() {
        out.push_str("  none\n");
    } else {
        out.push_str(&grid(
            &["SITE", "WAVE", "STATE", "FROM", "TO", "COMMAND", "WINDOW", "REASON"],
            sites.iter().map(|s| {
                vec![
                    text(s, "site"),
                    text(s, "wave"),
                    text(s, "state"),
                    text(s, "from_version"),
                    text(s, "to_version"),
                    command(s),
                    site_window(s),
                    text(s, "reason"),
                ]
            }),
        ));
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
    fn create_flags_shape_the_body() {
        let sites = vec!["SFO,CHI".to_owned(), "TYO".to_owned()];
        let body = create_body(&CreateArgs {
            version: "1.4.0",
            platform: "x86_64-linux",
            sites: &sites,
            waves: Some("1, 10%,rest"),
            window: Some("22:00-04:00"),
            max_failures: Some(1),
            allow_downgrade: true,
            ..CreateArgs::default()
        })
        .expect("body");
        assert_eq!(
            body,
            json!({
                "version": "1.4.0", "platform": "x86_64-linux",
                "targets": {"sites": ["SFO", "CHI", "TYO"]},
                "waves": [{"sites": 1}, {"percent": 10}, {"rest": true}],
                "window": {"start": "22:00", "end": "04:00"},
                "max_failures": 1, "allow_downgrade": true,
            })
        );
        let tag = create_body(&CreateArgs {
            version: "1.4.0",
            platform: "p-q",
            tag: Some("west"),
            waves: Some(r#"[{"rest": true}]"#),
            ..CreateArgs::default()
        })
        .expect("body");
        assert_eq!(
            (&tag["targets"], &tag["waves"]),
            (&json!({"tag": "west"}), &json!([{"rest": true}]))
        );
        for (args, message) in [
            (
                CreateArgs { version: "1", platform: "p", ..CreateArgs::default() },
                "name the targets",
            ),
            (
                CreateArgs {
                    version: "1",
                    platform: "p",
                    all: true,
                    tag: Some("x"),
                    ..CreateArgs::default()
                },
                "only one of",
            ),
            (
                CreateArgs {
                    version: "1",
                    platform: "p",
                    all: true,
                    waves: Some("1,ten"),
                    ..CreateArgs::default()
                },
                "\"ten\" is not a wave",
            ),
            (
                CreateArgs {
                    version: "1",
                    platform: "p",
                    all: true,
                    window: Some("0100"),
                    ..CreateArgs::default()
                },
                "HH:MM-HH:MM",
            ),
        ] {
            match create_body(&args) {
                Err(CtlError::Usage(m)) => assert!(m.contains(message), "{m}"),
                other => panic!("{args:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_rollout_renders_with_its_sites() {
        let v = json!({
            "id": "0190-x", "version": "1.4.0", "platform": "x86_64-linux", "state": "running",
            "current_wave": 1, "wave_count": 2, "window": null, "max_failures": 0,
            "site_counts": {"healthy": 1, "pending": 1, "failed": 0},
            "sites": [
                {"site": "SFO", "wave": 1, "state": "healthy", "from_version": "1.3.0", "to_version": "1.4.0",
                 "command_seq": 7, "delivered": true, "cancel_seq": null, "window": null, "reason": null},
                {"site": "CHI", "wave": 2, "state": "pending", "from_version": "1.3.0", "to_version": "1.4.0",
                 "command_seq": null, "delivered": false, "cancel_seq": null,
                 "window": {"status": "closed", "opens_at": "2026-11-22T17:00:00Z"}, "reason": null}
            ]
        });
        let out = render_one(&v, Output::Table).expect("render");
        assert!(out.contains("1/2") && out.contains("healthy 1, pending 1"), "{out}");
        assert!(out.contains("outside business hours"), "{out}");
        let sfo = out.lines().find(|l| l.starts_with("SFO")).expect("SFO row");
        assert!(sfo.contains("#7 delivered"), "{out}");
        let chi = out.lines().find(|l| l.starts_with("CHI")).expect("CHI row");
        assert!(chi.contains("opens 2026-11-22 17:00:00Z"), "{out}");
    }
}
