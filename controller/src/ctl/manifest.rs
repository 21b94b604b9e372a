//! Manifests: the YAML files `meridianctl apply -f` and `delete -f` read. Pure functions, no I/O.
//!
//! A file holds one or more YAML documents (`---` separated). A document is one resource (a
//! mapping with `kind`), a list of resources, or a mapping with a `resources:` list (the shape of
//! `GET /api/v1/config`). Empty documents are skipped. `kind` may be written `service_point`,
//! `service-point` or `ServicePoint`; it is normalised to the snake_case the API expects. The
//! other fields are exactly those of the serde structs in `meridian_shared::config` (a staff
//! user carries a plain `password`, see `config_admin::StaffUserInput`).

use meridian_shared::SiteCode;
use meridian_shared::config::{ResourceKey, ResourceKind};
use serde::Deserialize;
use serde_json::Value;

use crate::config_admin::ResourceInput;

/// Resources to send in one `/api/v1/apply` call: every document is parsed and checked against
/// the same serde types the controller uses, so a mistake is reported with its document number
/// before anything is sent.
pub fn resources_for_apply(text: &str) -> Result<Vec<Value>, String> {
    parse_documents(text)?
        .into_iter()
        .map(|(at, value)| match serde_json::from_value::<ResourceInput>(value.clone()) {
            Ok(_) => Ok(value),
            Err(e) => Err(format!("{at}: {e}")),
        })
        .collect()
}

/// The keys of the resources in a manifest, for `delete -f`. A document needs only `kind`, the
/// code (`username` for a staff user) and, for site-scoped kinds, `site`; other fields are
/// ignored, so the file that created the resources also deletes them.
pub fn keys_for_delete(text: &str) -> Result<Vec<ResourceKey>, String> {
    parse_documents(text)?
        .into_iter()
        .map(|(at, value)| resource_key(&value).map_err(|e| format!("{at}: {e}")))
        .collect()
}

/// A resource kind as a user may write it: snake_case, kebab-case or CamelCase, any case.
pub fn normalise_kind(kind: &str) -> Option<ResourceKind> {
    let mut snake = String::with_capacity(kind.len() + 4);
    let mut prev_lower = false;
    for c in kind.trim().chars() {
        match c {
            '-' | '_' | ' ' => snake.push('_'),
            c if c.is_ascii_uppercase() => {
                if prev_lower {
                    snake.push('_');
                }
                snake.push(c.to_ascii_lowercase());
            }
            c => snake.push(c),
        }
        prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
    }
    ResourceKind::ALL.into_iter().find(|k| k.as_str() == snake)
}

/// A time-to-live such as `3600`, `90s`, `30m`, `1h`, `1h30m`, `7d` or `2w`, in seconds.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid duration {s:?}: use e.g. 3600, 90s, 30m, 12h, 7d");
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(secs);
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
        digits.clear();
    }
    if !digits.is_empty() || s.is_empty() {
        return Err(bad());
    }
    Ok(total)
}

const KINDS_HINT: &str = "site, service, queue, service_point, work_profile, staff_user, \
     connector_key, webhook, request_type, request_mapping, request_rule, request_pool";

/// Every resource in the file with its place (`document 2`, `document 3, item 1`) and its kind
/// normalised. Checks YAML syntax and `kind` only.
fn parse_documents(text: &str) -> Result<Vec<(String, Value)>, String> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let value = Value::deserialize(doc).map_err(|e| format!("document {n}: {e}"))?;
        let items: Vec<(String, Value)> = match value {
            Value::Null => continue,
            Value::Array(items) => numbered(n, items),
            Value::Object(mut obj)
                if !obj.contains_key("kind") && obj.contains_key("resources") =>
            {
                match obj.remove("resources") {
                    Some(Value::Array(items)) => numbered(n, items),
                    _ => return Err(format!("document {n}: `resources` must be a list")),
                }
            }
            value @ Value::Object(_) => vec![(format!("document {n}"), value)],
            other => {
                return Err(format!(
                    "document {n}: expected a resource (a mapping with `kind`) or a list of resources, found {}",
                    json_type(&other)
                ));
            }
        };
        for (at, item) in items {
            let item = normalise(item).map_err(|e| format!("{at}: {e}"))?;
            out.push((label(&at, &item), item));
        }
    }
    if out.is_empty() {
        return Err("the file contains no resources".into());
    }
    Ok(out)
}

fn numbered(n: usize, items: Vec<Value>) -> Vec<(String, Value)> {
    items
        .into_iter()
        .enumerate()
        .map(|(j, v)| (format!("document {n}, item {}", j + 1), v))
        .collect()
}

/// `document 2 (queue A)`: the place plus what the resource says it is, when it says.
fn label(at: &str, item: &Value) -> String {
    let kind = item.get("kind").and_then(Value::as_str).unwrap_or_default();
    let name = item.get("code").or_else(|| item.get("username")).and_then(Value::as_str);
    match name {
        Some(name) => format!("{at} ({kind} {name})"),
        None => format!("{at} ({kind})"),
    }
}

fn normalise(mut item: Value) -> Result<Value, String> {
    let Value::Object(obj) = &mut item else {
        return Err(format!("expected a mapping with `kind`, found {}", json_type(&item)));
    };
    let kind = match obj.get("kind") {
        Some(Value::String(k)) => normalise_kind(k)
            .ok_or_else(|| format!("unknown kind {k:?}: use one of {KINDS_HINT}"))?,
        Some(other) => {
            return Err(format!("`kind` must be a string, found {}", json_type(other)));
        }
        None => return Err(format!("missing `kind` (one of {KINDS_HINT})")),
    };
    obj.insert("kind".into(), Value::String(kind.as_str().into()));
    Ok(item)
}

fn resource_key(item: &Value) -> Result<ResourceKey, String> {
    let kind = item
        .get("kind")
        .and_then(Value::as_str)
        .and_then(normalise_kind)
        .ok_or("missing `kind`")?;
    let field = |name: &str| -> Result<&str, String> {
        match item.get(name) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(format!("`{name}` must be a string, found {}", json_type(other))),
            None => Err(format!("missing field `{name}`")),
        }
    };
    let code = field(if kind == ResourceKind::StaffUser { "username" } else { "code" })?;
    let site = if kind.is_site_scoped() {
        Some(SiteCode::parse(field("site")?).map_err(|e| e.message)?)
    } else if kind == ResourceKind::Site {
        // Checks the code's format; a site is keyed by its code alone.
        SiteCode::parse(code).map_err(|e| e.message)?;
        None
    } else {
        None
    };
    Ok(ResourceKey { kind, site, code: code.to_owned() })
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn kinds_normalise() {
        let check = |input: &str, expected: Option<&str>| {
            assert_eq!(normalise_kind(input).map(ResourceKind::as_str), expected, "{input}");
        };
        check("site", Some("site"));
        check("Site", Some("site"));
        check("service_point", Some("service_point"));
        check("service-point", Some("service_point"));
        check("ServicePoint", Some("service_point"));
        check("servicePoint", Some("service_point"));
        check("SERVICE_POINT", Some("service_point"));
        check("Service-Point", Some("service_point"));
        check("WorkProfile", Some("work_profile"));
        check("StaffUser", Some("staff_user"));
        check("staff-user", Some("staff_user"));
        check("RequestRule", Some("request_rule"));
        check("request-pool", Some("request_pool"));
        check("sites", None);
        check("staff", None);
        check("widget", None);
        check("", None);
    }

    #[test]
    fn apply_manifests() {
        let check = |input: &str, expected: Result<Value, &str>| {
            let got = resources_for_apply(input).map(Value::Array);
            match (&got, &expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{input}"),
                (Err(got), Err(want)) => {
                    assert!(got.contains(want), "{input}\n got: {got}\nwant: {want}")
                }
                _ => panic!("{input}\n got: {got:?}\nwant: {expected:?}"),
            }
        };
        let site =
            json!({"kind": "site", "code": "SFO", "name": "San Francisco", "time_zone": "UTC"});
        let queue =
            json!({"kind": "queue", "site": "SFO", "code": "A", "name": "General", "letter": "A"});

        // One document.
        check("kind: site\ncode: SFO\nname: San Francisco\ntime_zone: UTC\n", Ok(json!([site])));
        // Several documents, CamelCase kinds, empty documents skipped.
        check(
            "---\nkind: Site\ncode: SFO\nname: San Francisco\ntime_zone: UTC\n---\n---\nkind: Queue\nsite: SFO\ncode: A\nname: General\nletter: A\n",
            Ok(json!([site, queue])),
        );
        // A top-level list, and a `resources:` list (the shape of GET /api/v1/config).
        check(
            "- {kind: site, code: SFO, name: San Francisco, time_zone: UTC}\n- {kind: queue, site: SFO, code: A, name: General, letter: A}\n",
            Ok(json!([site, queue])),
        );
        check(
            "revision: 4\nresources:\n- {kind: site, code: SFO, name: San Francisco, time_zone: UTC}\n",
            Ok(json!([site])),
        );
        // YAML 1.2: NO, 09:00-12:00 and dates stay strings.
        check(
            "kind: site\ncode: NO\nname: Oslo\ntime_zone: Europe/Oslo\nbusiness_hours: {mon: [09:00-12:00]}\nclosed_dates: [2025-12-25]\n",
            Ok(json!([{"kind": "site", "code": "NO", "name": "Oslo", "time_zone": "Europe/Oslo",
                "business_hours": {"mon": ["09:00-12:00"]}, "closed_dates": ["2025-12-25"]}])),
        );
        check(
            "kind: staff_user\nusername: alice\nname: Alice\nsites: [SFO]\npassword: correct horse\n",
            Ok(
                json!([{"kind": "staff_user", "username": "alice", "name": "Alice", "sites": ["SFO"],
                "password": "correct horse"}]),
            ),
        );

        // Errors name the document and carry serde's message.
        check("kind: site\ncode: SFO\n---\nkind: queue\n  bad indent: [\n", Err("document 2: "));
        check(
            "kind: site\ncode: SFO\nname: x\ntime_zone: UTC\n---\n- [unclosed\n",
            Err("document 2: "),
        );
        check(
            "kind: site\ncode: SFO\nname: San Francisco\ntime_zone: UTC\n---\nkind: queue\nsite: SFO\ncode: A\nname: General\nletter: A\ncolour: red\n",
            Err("document 2 (queue A): unknown field `colour`"),
        );
        check(
            "kind: site\ncode: SFO\ntime_zone: UTC\n",
            Err("document 1 (site SFO): missing field `name`"),
        );
        check(
            "kind: site\ncode: sfo\nname: x\ntime_zone: UTC\n",
            Err("document 1 (site sfo): site: invalid site code \"sfo\""),
        );
        check(
            "- {kind: site, code: SFO, name: x, time_zone: UTC}\n- {kind: widget}\n",
            Err("document 1, item 2: unknown kind \"widget\""),
        );
        check("code: SFO\n", Err("document 1: missing `kind`"));
        check("kind: 3\n", Err("document 1: `kind` must be a string"));
        check("just a string\n", Err("document 1: expected a resource"));
        check("resources: 3\n", Err("document 1: `resources` must be a list"));
        check("", Err("no resources"));
        check("---\n---\n", Err("no resources"));
    }

    #[test]
    fn delete_manifests() {
        let check = |input: &str, expected: Result<&[&str], &str>| {
            let got = keys_for_delete(input)
                .map(|keys| keys.iter().map(ToString::to_string).collect::<Vec<_>>());
            match (&got, expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{input}"),
                (Err(got), Err(want)) => {
                    assert!(got.contains(want), "{input}\n got: {got}\nwant: {want}")
                }
                _ => panic!("{input}\n got: {got:?}\nwant: {expected:?}"),
            }
        };
        check(
            "- {kind: site, code: SFO, name: x, time_zone: UTC}\n- {kind: ServicePoint, site: SFO, code: C1}\n- {kind: staff_user, username: alice}\n",
            Ok(&["site/SFO", "service_point/SFO/C1", "staff_user/alice"]),
        );
        check("kind: queue\ncode: A\n", Err("document 1 (queue A): missing field `site`"));
        check("kind: queue\nsite: sfo\ncode: A\n", Err("invalid site code"));
        check("kind: staff_user\ncode: alice\n", Err("missing field `username`"));
        check("kind: site\ncode: 12\n", Err("`code` must be a string"));
    }

    #[test]
    fn ttls() {
        let check = |input: &str, expected: Option<u64>| {
            assert_eq!(parse_ttl(input).ok(), expected, "{input}");
        };
        check("3600", Some(3600));
        check("90s", Some(90));
        check("30m", Some(1800));
        check("1h", Some(3600));
        check("1h30m", Some(5400));
        check("7d", Some(604_800));
        check("2w", Some(1_209_600));
        check("", None);
        check("h", None);
        check("1x", None);
        check("1h30", None);
        check("-5", None);
        check("99999999999999999999w", None);
    }
}
