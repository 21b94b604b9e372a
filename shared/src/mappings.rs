//! Request mappings: how a request of one type becomes a request of another when it
//! moves between sites — fields by name, explicit field maps, constants, exclusions, a separate
//! return mapping and the duplicate-id policy. A mapping is checked against both request types
//! whenever the configuration changes (`ConfigSet::validate`), so a mapping that a type change
//! breaks is refused at configuration time, with the field and the reason, never discovered
//! at transfer time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ValidationErrors;
use crate::ids::Code;
use crate::requests::{FieldDef, FieldKind, RequestType};

/// What the target receives when a request with the same id is already there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DuplicatePolicy {
    /// Refuse the operation (it ends in a visible failure).
    #[default]
    Error,
    /// Create the target request under a new id.
    NewId,
    /// Replace the stored request.
    Overwrite,
    /// Apply the mapped fields over the stored ones.
    Merge,
}

/// Where one target field's value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum FieldSource {
    /// The value of a source field.
    Field { from: String },
    /// A constant.
    Constant { value: Value },
}

/// A mapping from requests of `source_type` to requests of `target_type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestMapping {
    pub code: Code,
    pub name: String,
    pub source_type: Code,
    pub target_type: Code,
    /// Map every target field from the source field of the same name (unless excluded or
    /// mapped explicitly). Default true.
    #[serde(default = "yes")]
    pub by_name: bool,
    /// Explicit maps, by target field.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldSource>,
    /// Target fields never filled from the source.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// The mapping a return uses (from `target_type` back to `source_type`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_mapping: Option<Code>,
    #[serde(default)]
    pub duplicates: DuplicatePolicy,
    /// What the source keeps after an ownership transfer or return with this mapping.
    #[serde(default)]
    pub source_copy: SourceCopy,
}

/// What the source keeps after it hands the ownership over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceCopy {
    /// A read-only copy (updated by the master per the rule's update policy).
    #[default]
    Keep,
    /// Nothing: the source's copy is deleted once the target holds the request (archiving).
    Delete,
}

fn yes() -> bool {
    true
}

/// Why a source field cannot fill a target field, if it cannot.
pub fn incompatible(source: &FieldDef, target: &FieldDef) -> Option<String> {
    use FieldKind::*;
    match (&source.kind, &target.kind) {
        (Text { max_length: s }, Text { max_length: t }) if s > t => {
            Some(format!("text of up to {s} characters does not fit {} (at most {t})", target.name))
        }
        (Text { .. }, Text { .. }) => None,
        (Enum { values }, Enum { values: allowed }) => {
            let missing: Vec<&str> =
                values.iter().filter(|v| !allowed.contains(v)).map(String::as_str).collect();
            (!missing.is_empty()).then(|| {
                format!("values {} are not allowed in {}", missing.join(", "), target.name)
            })
        }
        (Enum { values }, Text { max_length }) => values
            .iter()
            .find(|v| v.chars().count() > *max_length as usize)
            .map(|v| format!("value {v:?} does not fit {} (at most {max_length})", target.name)),
        (
            Number { min: s_min, max: s_max, integer: s_int },
            Number { min: t_min, max: t_max, integer: t_int },
        ) => {
            let f = |n: &Option<serde_json::Number>| n.as_ref().and_then(|n| n.as_f64());
            let below = match (f(s_min), f(t_min)) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(s), Some(t)) => s < t,
            };
            let above = match (f(s_max), f(t_max)) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(s), Some(t)) => s > t,
            };
            if *t_int && !s_int {
                Some(format!("{} takes whole numbers only", target.name))
            } else if below || above {
                Some(format!("the source's range does not fit the range of {}", target.name))
            } else {
                None
            }
        }
        (Date, Date) | (DateTime, DateTime) | (Boolean, Boolean) => None,
        (s, t) => Some(format!("a {} field cannot fill a {} field", kind_name(s), kind_name(t))),
    }
}

fn kind_name(k: &FieldKind) -> &'static str {
    match k {
        FieldKind::Text { .. } => "text",
        FieldKind::Number { .. } => "number",
        FieldKind::Enum { .. } => "enum",
        FieldKind::Date => "date",
        FieldKind::DateTime => "date-time",
        FieldKind::Boolean => "boolean",
    }
}

impl RequestMapping {
    /// Checks the mapping against its two types (`types` by code) and the other mappings
    /// (`mappings` by code, for the return mapping). Errors name the field.
    pub fn validate(
        &self,
        types: &BTreeMap<&Code, &RequestType>,
        mappings: &BTreeMap<&Code, &RequestMapping>,
        errs: &mut ValidationErrors,
    ) {
        if self.name.trim().is_empty() || self.name.chars().count() > 120 {
            errs.push("name", "must be 1-120 characters");
        }
        let source = types.get(&self.source_type);
        let target = types.get(&self.target_type);
        if source.is_none() {
            errs.push("source_type", format!("unknown request type {}", self.source_type));
        }
        if target.is_none() {
            errs.push("target_type", format!("unknown request type {}", self.target_type));
        }
        if let Some(r) = &self.return_mapping {
            match mappings.get(r) {
                None => errs.push("return_mapping", format!("unknown mapping {r}")),
                Some(back)
                    if back.source_type != self.target_type
                        || back.target_type != self.source_type =>
                {
                    errs.push(
                        "return_mapping",
                        format!(
                            "mapping {r} maps {} to {}, not {} back to {}",
                            back.source_type, back.target_type, self.target_type, self.source_type
                        ),
                    )
                }
                Some(_) => {}
            }
        }
        let (Some(source), Some(target)) = (source, target) else { return };
        let src = |name: &str| source.fields.iter().find(|f| f.name == name);
        for name in &self.exclude {
            if !target.fields.iter().any(|f| &f.name == name) {
                errs.push("exclude", format!("{name} is not a field of {}", target.code));
            }
        }
        for (name, from) in &self.fields {
            let at = format!("fields.{name}");
            let Some(t) = target.fields.iter().find(|f| &f.name == name) else {
                errs.push(at, format!("{name} is not a field of {}", target.code));
                continue;
            };
            match from {
                FieldSource::Field { from } => match src(from) {
                    None => errs.push(at, format!("{from} is not a field of {}", source.code)),
                    Some(s) => {
                        if let Some(why) = incompatible(s, t) {
                            errs.push(at, format!("{from} → {name}: {why}"));
                        }
                    }
                },
                FieldSource::Constant { value } => {
                    if let Err(e) = t.kind.check(value) {
                        errs.push(at, format!("constant: {e}"));
                    }
                }
            }
        }
        for t in &target.fields {
            let explicit = self.fields.contains_key(&t.name);
            let excluded = self.exclude.contains(&t.name);
            let by_name = !explicit && !excluded && self.by_name;
            let mapped_by_name = by_name.then(|| src(&t.name)).flatten();
            if let Some(s) = mapped_by_name
                && let Some(why) = incompatible(s, t)
            {
                errs.push(format!("fields.{}", t.name), format!("by name: {why}"));
            }
            let filled =
                explicit || mapped_by_name.is_some_and(|s| s.required) || t.default.is_some();
            if t.required && !filled {
                errs.push(
                    format!("fields.{}", t.name),
                    format!(
                        "required in {} but nothing fills it for every request (map a required \
                         field or a constant, or give it a default)",
                        target.code
                    ),
                );
            }
        }
    }

    /// The target values of a request with `values` (already valid for the source type).
    pub fn apply(
        &self,
        values: &crate::requests::Values,
        target: &RequestType,
    ) -> crate::requests::Values {
        let mut out = crate::requests::Values::new();
        for t in &target.fields {
            if self.exclude.contains(&t.name) {
                continue;
            }
            let value = match self.fields.get(&t.name) {
                Some(FieldSource::Field { from }) => values.get(from).cloned(),
                Some(FieldSource::Constant { value }) => Some(value.clone()),
                None if self.by_name => values.get(&t.name).cloned(),
                None => None,
            };
            if let Some(v) = value {
                out.insert(t.name.clone(), v);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn types() -> Vec<RequestType> {
        serde_json::from_value(json!([
            {"code": "REPAIR", "name": "Repair", "fields": [
                {"name": "summary", "type": "text", "max_length": 80, "required": true},
                {"name": "category", "type": "enum", "values": ["chair", "table"], "required": true},
                {"name": "pieces", "type": "number", "min": 1, "max": 10, "integer": true},
                {"name": "notes", "type": "text", "max_length": 2000}
            ]},
            {"code": "UPHOLSTERY", "name": "Upholstery", "fields": [
                {"name": "summary", "type": "text", "max_length": 120, "required": true},
                {"name": "item", "type": "enum", "values": ["chair", "table", "sofa"], "required": true},
                {"name": "pieces", "type": "number", "min": 0, "integer": true},
                {"name": "notes", "type": "text", "max_length": 500},
                {"name": "priority", "type": "enum", "values": ["normal", "rush"], "required": true}
            ]}
        ]))
        .expect("types")
    }

    fn mapping(v: Value) -> RequestMapping {
        serde_json::from_value(v).expect("mapping")
    }

    fn check(m: &RequestMapping, others: &[&RequestMapping]) -> Vec<String> {
        let types = types();
        let by_code: BTreeMap<&Code, &RequestType> = types.iter().map(|t| (&t.code, t)).collect();
        let mappings: BTreeMap<&Code, &RequestMapping> =
            others.iter().copied().chain([m]).map(|m| (&m.code, m)).collect();
        let mut errs = ValidationErrors::default();
        m.validate(&by_code, &mappings, &mut errs);
        errs.0.into_iter().map(|e| format!("{}: {}", e.field, e.message)).collect()
    }

    #[test]
    fn a_compatible_mapping_passes_and_maps_values() {
        let back = mapping(json!({"code": "BACK", "name": "Back", "source_type": "UPHOLSTERY",
            "target_type": "REPAIR", "fields": {"category": {"from": "item"}},
            "exclude": ["notes"]}));
        let m = mapping(json!({"code": "TO_UPH", "name": "To upholstery", "source_type": "REPAIR",
            "target_type": "UPHOLSTERY", "fields": {"item": {"from": "category"},
            "priority": {"value": "rush"}}, "exclude": ["notes"], "return_mapping": "BACK",
            "duplicates": "merge"}));
        assert_eq!(check(&m, &[&back]), Vec::<String>::new());
        let values = serde_json::from_value(json!({"summary": "Torn seat", "category": "chair",
            "pieces": 2, "notes": "x"}))
        .expect("values");
        let types = types();
        assert_eq!(
            serde_json::to_value(m.apply(&values, &types[1])).expect("json"),
            json!({"summary": "Torn seat", "item": "chair", "pieces": 2, "priority": "rush"})
        );
        assert_eq!(m.duplicates, DuplicatePolicy::Merge);
    }

    #[test]
    fn an_incompatible_mapping_is_refused_with_each_reason() {
        // By name, notes (2000 characters) does not fit notes (500); the item is never filled;
        // a constant outside the enum; a source field that does not exist; a bad return.
        let m = mapping(json!({"code": "BAD", "name": "Bad", "source_type": "UPHOLSTERY",
            "target_type": "REPAIR", "fields": {"pieces": {"from": "size"},
            "category": {"value": "sofa"}}, "return_mapping": "BAD"}));
        let errs = check(&m, &[]);
        assert!(
            errs.iter().any(|e| e.starts_with("return_mapping: mapping BAD maps UPHOLSTERY")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with("fields.pieces: size is not a field")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with("fields.category: constant: must be one of")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with("fields.summary: by name: text of up to 120")),
            "{errs:?}"
        );
        let m = mapping(json!({"code": "M", "name": "M", "source_type": "REPAIR",
            "target_type": "UPHOLSTERY"}));
        let errs = check(&m, &[]);
        assert!(
            errs.iter().any(|e| e.starts_with("fields.notes: by name: text of up to 2000")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with("fields.item: required in UPHOLSTERY")),
            "{errs:?}"
        );
        assert!(errs.iter().any(|e| e.starts_with("fields.priority: required")), "{errs:?}");
        let m = mapping(json!({"code": "M", "name": "M", "source_type": "NOPE",
            "target_type": "REPAIR", "exclude": ["colour"]}));
        assert_eq!(check(&m, &[]), ["source_type: unknown request type NOPE"]);
        assert!(
            serde_json::from_value::<RequestMapping>(json!({"code": "M", "name": "M",
            "source_type": "A", "target_type": "B", "fields": {"x": {"form": "y"}}}))
            .is_err()
        );
    }
}
