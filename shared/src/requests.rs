//! Distributed service requests: request types (≈ Remedy forms) with a typed field
//! schema, defined centrally and part of every site's configuration, and the checking of a
//! request's field values against its type. Pure: no I/O.
//!
//! A type's fields are named by identifiers (`[a-z][a-z0-9_]{0,39}`); each has a kind (text with
//! a maximum length, number with optional bounds and integer flag, enum, date, date-time,
//! boolean), a required flag and an optional default that must itself be a valid value.
//! `RequestType::check_new` fills defaults and checks a whole set of values;
//! `RequestType::check_patch` checks changes to stored values. Both report every problem with
//! its field, and refuse fields the type does not have.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDate};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ValidationErrors;
use crate::ids::Code;

/// Most fields a request type may have.
pub const MAX_FIELDS: usize = 100;
/// Largest `max_length` of a text field.
pub const MAX_TEXT: u32 = 10_000;
/// Most values of an enum field.
pub const MAX_ENUM_VALUES: usize = 200;

/// The values of a request's fields, by field name.
pub type Values = BTreeMap<String, Value>;

/// A request type: its code, name and field schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestType {
    pub code: Code,
    pub name: String,
    pub fields: Vec<FieldDef>,
}

/// One field of a request type, written flat: `{"name", "type", <the kind's settings>,
/// "required"?, "default"?}`; any other key is refused (a misspelt setting is an error, not
/// silently ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "serde_json::Map<String, Value>")]
pub struct FieldDef {
    pub name: String,
    #[serde(flatten)]
    pub kind: FieldKind,
    #[serde(default)]
    pub required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
}

/// `FieldDef` as written, once its keys are known to be ones a field may have.
#[derive(Deserialize)]
struct RawField {
    name: String,
    #[serde(flatten)]
    kind: FieldKind,
    #[serde(default)]
    required: bool,
    #[serde(default)]
    default: Option<Value>,
}

const FIELD_KEYS: [&str; 9] =
    ["name", "type", "required", "default", "max_length", "min", "max", "integer", "values"];

impl TryFrom<serde_json::Map<String, Value>> for FieldDef {
    type Error = String;
    fn try_from(map: serde_json::Map<String, Value>) -> Result<Self, Self::Error> {
        if let Some(k) = map.keys().find(|k| !FIELD_KEYS.contains(&k.as_str())) {
            return Err(format!("unknown field `{k}`, expected one of {}", FIELD_KEYS.join(", ")));
        }
        let raw: RawField =
            serde_json::from_value(Value::Object(map)).map_err(|e| e.to_string())?;
        Ok(FieldDef {
            name: raw.name,
            kind: raw.kind,
            required: raw.required,
            default: raw.default,
        })
    }
}

/// What a field holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FieldKind {
    Text {
        max_length: u32,
    },
    Number {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min: Option<serde_json::Number>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<serde_json::Number>,
        #[serde(default)]
        integer: bool,
    },
    Enum {
        values: Vec<String>,
    },
    Date,
    DateTime,
    Boolean,
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && name.len() <= 40
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl FieldKind {
    /// Checks one value of this kind (not null); the message says what is expected.
    pub fn check(&self, value: &Value) -> Result<(), String> {
        match (self, value) {
            (FieldKind::Text { max_length }, Value::String(s)) => {
                if s.chars().count() > *max_length as usize {
                    Err(format!("at most {max_length} characters"))
                } else {
                    Ok(())
                }
            }
            (FieldKind::Number { min, max, integer }, Value::Number(n)) => {
                let Some(x) = n.as_f64() else { return Err("not a finite number".into()) };
                if *integer && x.fract() != 0.0 {
                    return Err("must be a whole number".into());
                }
                let (lo, hi) =
                    (min.as_ref().and_then(|m| m.as_f64()), max.as_ref().and_then(|m| m.as_f64()));
                if lo.is_some_and(|m| x < m) || hi.is_some_and(|m| x > m) {
                    return Err(format!(
                        "must be between {} and {}",
                        min.as_ref().map_or("-∞".into(), ToString::to_string),
                        max.as_ref().map_or("∞".into(), ToString::to_string)
                    ));
                }
                Ok(())
            }
            (FieldKind::Enum { values }, Value::String(s)) => {
                if values.iter().any(|v| v == s) {
                    Ok(())
                } else {
                    Err(format!("must be one of {}", values.join(", ")))
                }
            }
            (FieldKind::Date, Value::String(s)) => {
                s.parse::<NaiveDate>().map(|_| ()).map_err(|_| "must be a date YYYY-MM-DD".into())
            }
            (FieldKind::DateTime, Value::String(s)) => DateTime::parse_from_rfc3339(s)
                .map(|_| ())
                .map_err(|_| "must be an RFC 3339 date-time with offset".into()),
            (FieldKind::Boolean, Value::Bool(_)) => Ok(()),
            (kind, _) => Err(format!("must be {}", kind.describe())),
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            FieldKind::Text { .. } => "a string",
            FieldKind::Number { .. } => "a number",
            FieldKind::Enum { .. } => "one of the listed strings",
            FieldKind::Date => "a date YYYY-MM-DD",
            FieldKind::DateTime => "an RFC 3339 date-time",
            FieldKind::Boolean => "true or false",
        }
    }
}

impl RequestType {
    /// Checks the type on its own: field names unique and well formed, kinds sensible,
    /// defaults valid for their field.
    pub fn validate(&self, errs: &mut ValidationErrors) {
        if self.name.trim().is_empty() || self.name.chars().count() > 120 {
            errs.push("name", "must be 1-120 characters");
        }
        if self.fields.is_empty() || self.fields.len() > MAX_FIELDS {
            errs.push("fields", format!("a request type has 1-{MAX_FIELDS} fields"));
        }
        let mut seen = BTreeSet::new();
        for (i, f) in self.fields.iter().enumerate() {
            let at = format!("fields[{i}]");
            if !valid_name(&f.name) {
                errs.push(
                    format!("{at}.name"),
                    "field names are lower-case identifiers of at most 40 characters",
                );
            } else if !seen.insert(f.name.as_str()) {
                errs.push(format!("{at}.name"), format!("field {} appears twice", f.name));
            }
            match &f.kind {
                FieldKind::Text { max_length } if !(1..=MAX_TEXT).contains(max_length) => {
                    errs.push(format!("{at}.max_length"), format!("must be 1-{MAX_TEXT}"));
                }
                FieldKind::Number { min: Some(lo), max: Some(hi), .. }
                    if lo.as_f64().zip(hi.as_f64()).is_some_and(|(lo, hi)| lo > hi) =>
                {
                    errs.push(format!("{at}.min"), "must not be above max");
                }
                FieldKind::Enum { values } => {
                    let unique: BTreeSet<_> = values.iter().collect();
                    if values.is_empty()
                        || values.len() > MAX_ENUM_VALUES
                        || unique.len() != values.len()
                        || values.iter().any(|v| v.is_empty() || v.len() > 100)
                    {
                        errs.push(
                            format!("{at}.values"),
                            format!("1-{MAX_ENUM_VALUES} distinct values of 1-100 characters"),
                        );
                    }
                }
                _ => {}
            }
            if let Some(d) = &f.default
                && let Err(e) = f.kind.check(d)
            {
                errs.push(format!("{at}.default"), e);
            }
        }
    }

    fn field(&self, name: &str) -> Option<&FieldDef> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// The values of a new request: `input` checked field by field, defaults filled in, every
    /// required field present. Null means absent.
    pub fn check_new(&self, input: &Values) -> Result<Values, ValidationErrors> {
        let mut errs = ValidationErrors::default();
        let mut out = Values::new();
        self.check_given(input, &mut out, &mut errs);
        for f in &self.fields {
            let given = input.get(&f.name).is_some_and(|v| !v.is_null());
            if !given && let Some(d) = &f.default {
                out.insert(f.name.clone(), d.clone());
            }
            if f.required && !given && f.default.is_none() {
                errs.push(format!("fields.{}", f.name), "required");
            }
        }
        errs.into_result().map(|()| out)
    }

    /// `stored` with `changes` applied: each change checked, a null clears a field unless it
    /// is required.
    pub fn check_patch(
        &self,
        stored: &Values,
        changes: &Values,
    ) -> Result<Values, ValidationErrors> {
        let mut errs = ValidationErrors::default();
        let mut out = stored.clone();
        for (name, value) in changes {
            if value.is_null() {
                match self.field(name) {
                    Some(f) if f.required => {
                        errs.push(format!("fields.{name}"), "required; cannot be cleared")
                    }
                    Some(_) => {
                        out.remove(name);
                    }
                    None => errs.push(format!("fields.{name}"), "no such field in this type"),
                }
            }
        }
        let given: Values = changes
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.check_given(&given, &mut out, &mut errs);
        errs.into_result().map(|()| out)
    }

    fn check_given(&self, input: &Values, out: &mut Values, errs: &mut ValidationErrors) {
        for (name, value) in input {
            let at = format!("fields.{name}");
            match self.field(name) {
                None => errs.push(at, "no such field in this type"),
                Some(_) if value.is_null() => {}
                Some(f) => match f.kind.check(value) {
                    Ok(()) => {
                        out.insert(name.clone(), value.clone());
                    }
                    Err(e) => errs.push(at, e),
                },
            }
        }
    }
}

/// A request's human id: the creating site's code and a six-digit sequence of that site
/// (`SFO-000123`); never the same at two sites.
pub fn human_id(site: &crate::SiteCode, n: u64) -> String {
    format!("{site}-{n:06}")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn repair() -> RequestType {
        serde_json::from_value(json!({
            "code": "REPAIR",
            "name": "Furniture repair",
            "fields": [
                {"name": "summary", "type": "text", "max_length": 20, "required": true},
                {"name": "category", "type": "enum", "values": ["chair", "table"], "required": true},
                {"name": "pieces", "type": "number", "min": 1, "max": 50, "integer": true, "default": 1},
                {"name": "upholstery", "type": "boolean", "default": false},
                {"name": "due", "type": "date"},
                {"name": "picked_up_at", "type": "date_time"}
            ]
        }))
        .expect("type")
    }

    fn values(v: Value) -> Values {
        serde_json::from_value(v).expect("values")
    }

    fn fields_of(e: ValidationErrors) -> Vec<String> {
        e.0.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn a_new_request_gets_defaults_and_every_problem_is_reported() {
        let t = repair();
        let mut errs = ValidationErrors::default();
        t.validate(&mut errs);
        assert!(errs.0.is_empty(), "{errs:?}");
        let ok = t
            .check_new(&values(json!({"summary": "Wobbly leg", "category": "chair", "due": null})))
            .expect("valid");
        assert_eq!(
            ok,
            values(
                json!({"summary": "Wobbly leg", "category": "chair", "pieces": 1, "upholstery": false})
            )
        );
        let bad = t
            .check_new(&values(json!({
                "summary": "x".repeat(21), "pieces": 2.5, "upholstery": "yes",
                "due": "tomorrow", "picked_up_at": "2026-11-22T10:00:00", "colour": "red"
            })))
            .expect_err("invalid");
        assert_eq!(
            fields_of(bad),
            [
                "fields.colour",
                "fields.due",
                "fields.picked_up_at",
                "fields.pieces",
                "fields.summary",
                "fields.upholstery",
                "fields.category"
            ]
        );
        let out_of_range = t
            .check_new(&values(json!({"summary": "a", "category": "sofa", "pieces": 51})))
            .expect_err("invalid");
        assert_eq!(fields_of(out_of_range), ["fields.category", "fields.pieces"]);
    }

    #[test]
    fn a_patch_changes_checked_fields_and_never_clears_a_required_one() {
        let t = repair();
        let stored = t
            .check_new(&values(
                json!({"summary": "Wobbly leg", "category": "chair", "due": "2026-12-01"}),
            ))
            .expect("valid");
        let patched = t
            .check_patch(&stored, &values(json!({"category": "table", "due": null})))
            .expect("valid");
        assert_eq!(patched["category"], "table");
        assert!(!patched.contains_key("due"));
        let bad = t
            .check_patch(&stored, &values(json!({"summary": null, "nope": 1, "pieces": 0})))
            .expect_err("invalid");
        assert_eq!(fields_of(bad), ["fields.summary", "fields.nope", "fields.pieces"]);
    }

    #[test]
    fn a_bad_schema_is_refused_field_by_field() {
        let t: RequestType = serde_json::from_value(json!({
            "code": "BAD",
            "name": "",
            "fields": [
                {"name": "Summary", "type": "text", "max_length": 0},
                {"name": "kind", "type": "enum", "values": ["a", "a"]},
                {"name": "kind", "type": "number", "min": 5, "max": 1},
                {"name": "flag", "type": "boolean", "default": "no"}
            ]
        }))
        .expect("parses");
        let mut errs = ValidationErrors::default();
        t.validate(&mut errs);
        assert_eq!(
            fields_of(errs),
            [
                "name",
                "fields[0].name",
                "fields[0].max_length",
                "fields[1].values",
                "fields[2].name",
                "fields[2].min",
                "fields[3].default"
            ]
        );
        for field in [
            json!({"name": "a", "type": "colour"}),
            json!({"name": "a", "type": "text", "max_length": 5, "requried": true}),
        ] {
            let unknown = serde_json::from_value::<RequestType>(
                json!({"code": "X", "name": "X", "fields": [field]}),
            );
            assert!(unknown.is_err(), "{unknown:?}");
        }
        assert_eq!(human_id(&crate::SiteCode::parse("SFO").expect("site"), 123), "SFO-000123");
    }
}
