//! Distribution rules and request pools, like Remedy's DSO pools and distribution
//! mappings: when a request of some type is created, changed, arrives or a time comes, a rule
//! whose CEL condition holds transfers, updates, returns or deletes it across sites. Pure: no I/O.
//!
//! Rules and pools are global configuration kinds (`request_rule`, `request_pool`). Each rule
//! is checked on its own (`RequestRule::validate`) and against the whole set
//! (`ConfigSet::validate` calls `check_rule` and `check_loops`): its type, mapping, pool and
//! sites exist, its condition type-checks against a sample request of its type, and no set of
//! arrival rules could move a request around in a loop.
//!
//! The agent evaluates rules with `compile` + `CompiledRule::matches` and schedules time
//! triggers with `next_occurrence`; the controller resolves targets with
//! `ConfigSet::expand_target` and enforces `RequestRule::bounce_limit` with `transfers::bounces`.
//!
//! A condition sees four variables: `request` (a map: `type`, `human_id`, `site` — the
//! evaluating site —, `created_at` and `updated_at` as timestamps, `age_days` as a double),
//! `fields` (every field of the type: text and enum as strings, numbers as ints for integer
//! fields and doubles otherwise, dates as `"YYYY-MM-DD"` strings, date-times as timestamps,
//! booleans; an absent field is `null`), `previous` (the field values before the change for
//! `modify` and `status_change`, an empty map otherwise) and `now` (a timestamp).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Duration, NaiveDateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::config::{ConfigSet, Site};
use crate::error::ValidationErrors;
use crate::ids::{Code, SiteCode};
use crate::requests::{FieldKind, RequestType, Values};

/// The pool an operation runs in when its rule names none.
pub const DEFAULT_POOL: &str = "default";
/// Bounds of `RequestPool::timeout_minutes` (30 days at most).
pub const POOL_TIMEOUT_MINUTES: std::ops::RangeInclusive<u32> = 1..=43_200;
/// Bounds of `RequestRule::bounce_limit`.
pub const BOUNCE_LIMIT: std::ops::RangeInclusive<u32> = 1..=100;
/// The variables a condition may use.
pub const CONDITION_VARIABLES: [&str; 4] = ["request", "fields", "previous", "now"];
/// Keys of the `request` variable.
pub const REQUEST_KEYS: [&str; 6] =
    ["type", "human_id", "site", "created_at", "updated_at", "age_days"];

/// A named, ordered lane for cross-site operations: operations of one pool run one at a time
/// in order, and one not done within `timeout_minutes` fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestPool {
    pub code: Code,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default = "default_timeout")]
    pub timeout_minutes: u32,
}

fn default_timeout() -> u32 {
    1440
}

/// A distribution rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestRule {
    pub code: Code,
    pub name: String,
    /// The type of the requests the rule acts on.
    pub request_type: Code,
    /// Where the rule is evaluated; empty means every site.
    #[serde(default)]
    pub sites: Vec<SiteCode>,
    pub trigger: Trigger,
    /// A CEL expression giving a boolean; absent means always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<TransferMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping: Option<Code>,
    /// The pool the operation runs in; absent means `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<Code>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    /// When the master's changes reach copies the rule made.
    #[serde(default)]
    pub update: UpdatePolicy,
    /// How many times a request may bounce between the same two sites (X→Y directly followed
    /// by Y→X) before the rule stops moving it.
    #[serde(default = "default_bounce_limit")]
    pub bounce_limit: u32,
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn default_bounce_limit() -> u32 {
    3
}
fn yes() -> bool {
    true
}

/// When a rule is evaluated, written `{"on": "<trigger>", <its settings>}`; a key the trigger
/// does not take is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "on", rename_all = "snake_case", try_from = "serde_json::Map<String, Json>")]
pub enum Trigger {
    /// A request is created at the site.
    Create,
    /// A request is changed at the site.
    Modify,
    /// `field` of a request changes.
    StatusChange { field: String },
    /// A request arrives at the site as its master (by a transfer or a return).
    Arrival,
    /// A cron expression in the evaluating site's time zone: 5 fields (minute first), or 6/7
    /// (seconds first, optional year) as the `cron` crate reads them.
    Schedule { cron: String },
    /// The end of the evaluating site's last business-hours period of each open day.
    CloseOfBusiness,
}

/// `Trigger` as written, once its keys are known to be ones its kind takes.
#[derive(Deserialize)]
#[serde(tag = "on", rename_all = "snake_case")]
enum RawTrigger {
    Create,
    Modify,
    StatusChange { field: String },
    Arrival,
    Schedule { cron: String },
    CloseOfBusiness,
}

impl TryFrom<serde_json::Map<String, Json>> for Trigger {
    type Error = String;
    fn try_from(map: serde_json::Map<String, Json>) -> Result<Self, Self::Error> {
        let allowed: &[&str] = match map.get("on").and_then(Json::as_str) {
            Some("status_change") => &["on", "field"],
            Some("schedule") => &["on", "cron"],
            _ => &["on"],
        };
        if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(format!("unknown field `{k}` in trigger, expected {}", allowed.join(", ")));
        }
        Ok(match serde_json::from_value(Json::Object(map)).map_err(|e| e.to_string())? {
            RawTrigger::Create => Trigger::Create,
            RawTrigger::Modify => Trigger::Modify,
            RawTrigger::StatusChange { field } => Trigger::StatusChange { field },
            RawTrigger::Arrival => Trigger::Arrival,
            RawTrigger::Schedule { cron } => Trigger::Schedule { cron },
            RawTrigger::CloseOfBusiness => Trigger::CloseOfBusiness,
        })
    }
}

/// What a rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Transfer,
    Update,
    Return,
    Delete,
}

pub use crate::transfers::{TransferMode, UpdatePolicy};

/// Where a rule sends a request, written with one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// One site.
    Site(SiteCode),
    /// Every site with this tag, except the source.
    Group(String),
    /// Every other site (`true`).
    AllSites(bool),
    /// The site after the evaluating one in the chain, wrapping around.
    FollowTheSun(Vec<SiteCode>),
}

impl Target {
    /// The site after `from` in `chain`, wrapping around; `None` when `from` is not in it.
    pub fn follow_the_sun_next(chain: &[SiteCode], from: &SiteCode) -> Option<SiteCode> {
        let i = chain.iter().position(|s| s == from)?;
        let next = &chain[(i + 1) % chain.len()];
        (next != from).then(|| next.clone())
    }

    /// Whether the target is exactly one site (for a given source).
    fn is_single_site(&self) -> bool {
        matches!(self, Target::Site(_) | Target::FollowTheSun(_))
    }
}

impl RequestPool {
    /// Checks the pool on its own.
    pub fn validate(&self, errs: &mut ValidationErrors) {
        check_name(&self.name, errs);
        if self.description.as_ref().is_some_and(|d| d.chars().count() > 2000) {
            errs.push("description", "at most 2000 characters");
        }
        if !POOL_TIMEOUT_MINUTES.contains(&self.timeout_minutes) {
            errs.push(
                "timeout_minutes",
                format!(
                    "must be {}-{} minutes",
                    POOL_TIMEOUT_MINUTES.start(),
                    POOL_TIMEOUT_MINUTES.end()
                ),
            );
        }
    }
}

fn check_name(name: &str, errs: &mut ValidationErrors) {
    if name.trim().is_empty() || name.chars().count() > crate::config::MAX_NAME_LEN {
        errs.push("name", format!("must be 1-{} characters", crate::config::MAX_NAME_LEN));
    }
}

impl RequestRule {
    /// Checks the rule on its own: the action's required and forbidden settings, the target's
    /// shape, the bounce limit, the cron expression and the condition's syntax.
    pub fn validate(&self, errs: &mut ValidationErrors) {
        check_name(&self.name, errs);
        match self.action {
            Action::Transfer => {
                match self.mode {
                    None => errs.push(
                        "mode",
                        "a transfer needs a mode: ownership, data_only or independent_copy",
                    ),
                    Some(mode @ (TransferMode::Ownership | TransferMode::IndependentCopy)) => {
                        if self.target.as_ref().is_some_and(|t| !t.is_single_site()) {
                            errs.push(
                                "target",
                                format!(
                                    "an {} transfer goes to one site: use site or follow_the_sun",
                                    TransferMode::as_str(mode)
                                ),
                            );
                        }
                    }
                    Some(TransferMode::DataOnly) => {}
                }
                if self.mapping.is_none() {
                    errs.push("mapping", "a transfer needs a mapping");
                }
                if self.target.is_none() {
                    errs.push("target", "a transfer needs a target");
                }
            }
            Action::Update => {
                if self.target.is_none() {
                    errs.push("target", "an update needs a target");
                }
                if self.mode.is_some() {
                    errs.push("mode", "only a transfer has a mode");
                }
            }
            Action::Return => {
                if self.target.is_some() {
                    errs.push(
                        "target",
                        "a return goes back to the site the request came from: remove target",
                    );
                }
                if self.mode.is_some() {
                    errs.push("mode", "only a transfer has a mode");
                }
            }
            Action::Delete => {
                for (field, set) in [
                    ("target", self.target.is_some()),
                    ("mapping", self.mapping.is_some()),
                    ("mode", self.mode.is_some()),
                ] {
                    if set {
                        errs.push(field, format!("a delete takes no {field}"));
                    }
                }
            }
        }
        match &self.target {
            Some(Target::FollowTheSun(chain)) => {
                let distinct: BTreeSet<&SiteCode> = chain.iter().collect();
                if distinct.len() < 2 {
                    errs.push(
                        "target.follow_the_sun",
                        "a follow-the-sun chain has at least two different sites",
                    );
                } else if distinct.len() != chain.len() {
                    errs.push("target.follow_the_sun", "a site appears twice in the chain");
                }
            }
            Some(Target::Group(tag)) if tag.is_empty() || tag.len() > 64 => {
                errs.push("target.group", "a group is a site tag of 1-64 characters");
            }
            Some(Target::AllSites(false)) => {
                errs.push("target.all_sites", "must be true (omit the target instead)");
            }
            _ => {}
        }
        if !BOUNCE_LIMIT.contains(&self.bounce_limit) {
            errs.push(
                "bounce_limit",
                format!("must be {}-{}", BOUNCE_LIMIT.start(), BOUNCE_LIMIT.end()),
            );
        }
        match &self.trigger {
            Trigger::Schedule { cron } => {
                if let Err(e) = parse_cron(cron) {
                    errs.push("trigger.cron", e);
                }
            }
            Trigger::StatusChange { field } if field.is_empty() => {
                errs.push("trigger.field", "name the field whose change triggers the rule");
            }
            _ => {}
        }
        if let Some(condition) = &self.condition
            && let Err(e) = parse_condition(condition)
        {
            errs.push("condition", e);
        }
    }

    /// The sites among `all` where the rule is evaluated.
    pub fn evaluated_at<'a>(&'a self, all: &'a [SiteCode]) -> impl Iterator<Item = &'a SiteCode> {
        all.iter().filter(|s| self.sites.is_empty() || self.sites.contains(s))
    }

    /// Whether the rule is evaluated at `site`.
    pub fn is_evaluated_at(&self, site: &SiteCode) -> bool {
        self.sites.is_empty() || self.sites.contains(site)
    }

    /// The pool the rule's operations run in.
    pub fn pool_code(&self) -> &str {
        self.pool.as_ref().map_or(DEFAULT_POOL, Code::as_str)
    }
}

// ---------------------------------------------------------------------------------------------
// Conditions

/// A rule's condition, compiled for one request type.
#[derive(Debug)]
pub struct CompiledRule {
    program: Option<cel::Program>,
    request_type: Code,
    /// Field kinds of the type, by name (to convert values).
    kinds: BTreeMap<String, FieldKind>,
}

/// What a condition is evaluated against: one request at the evaluating site.
#[derive(Debug, Clone, Copy)]
pub struct RuleContext<'a> {
    pub human_id: &'a str,
    /// The evaluating site.
    pub site: &'a SiteCode,
    pub fields: &'a Values,
    /// The values before the change (`modify`, `status_change`); `None` otherwise.
    pub previous: Option<&'a Values>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub now: DateTime<Utc>,
}

/// Compiles `rule`'s condition for requests of `request_type` (which must be the rule's type).
/// Parsing runs on a thread with a 64 MiB stack: cel 0.15's ANTLR parser recurses deeply (in a
/// debug build 30 nested parentheses overflow a 256 KiB stack) and the `parser_pratt` feature
/// does not help, as `Program::compile` always uses the ANTLR parser.
pub fn compile(rule: &RequestRule, request_type: &RequestType) -> Result<CompiledRule, String> {
    if rule.request_type != request_type.code {
        return Err(format!(
            "rule {} is for request type {}, not {}",
            rule.code, rule.request_type, request_type.code
        ));
    }
    let program = match &rule.condition {
        Some(condition) => Some(parse_condition(condition)?),
        None => None,
    };
    Ok(CompiledRule {
        program,
        request_type: request_type.code.clone(),
        kinds: request_type.fields.iter().map(|f| (f.name.clone(), f.kind.clone())).collect(),
    })
}

impl CompiledRule {
    /// Whether the condition holds for the request in `ctx` (always true without a condition).
    /// An error is a condition that failed to evaluate (say, a comparison of a null optional
    /// field with a number), with CEL's message.
    pub fn matches(&self, ctx: &RuleContext<'_>) -> Result<bool, String> {
        let Some(program) = &self.program else { return Ok(true) };
        let mut vars = cel::Context::default();
        let timestamp = |t: DateTime<Utc>| cel::Value::Timestamp(t.fixed_offset());
        let age = (ctx.now - ctx.created_at).num_seconds() as f64 / 86_400.0;
        let request: HashMap<String, cel::Value> = [
            ("type", cel::Value::from(self.request_type.as_str())),
            ("human_id", cel::Value::from(ctx.human_id)),
            ("site", cel::Value::from(ctx.site.as_str())),
            ("created_at", timestamp(ctx.created_at)),
            ("updated_at", timestamp(ctx.updated_at)),
            ("age_days", cel::Value::Float(age)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        vars.add_variable_from_value("request", request);
        vars.add_variable_from_value("fields", self.fields_value(ctx.fields));
        let previous = match ctx.previous {
            Some(p) => self.fields_value(p),
            None => HashMap::new(),
        };
        vars.add_variable_from_value("previous", previous);
        vars.add_variable_from_value("now", timestamp(ctx.now));
        match program.execute(&vars) {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("gives {}, not a boolean", describe(&other))),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Every field of the type, converted for CEL (absent ones `null`).
    fn fields_value(&self, values: &Values) -> HashMap<String, cel::Value> {
        self.kinds
            .iter()
            .map(|(name, kind)| (name.clone(), to_cel(kind, values.get(name))))
            .collect()
    }
}

fn describe(v: &cel::Value) -> String {
    let name = match v {
        cel::Value::List(_) => "a list",
        cel::Value::Map(_) => "a map",
        cel::Value::Int(_) | cel::Value::UInt(_) => "an integer",
        cel::Value::Float(_) => "a double",
        cel::Value::String(_) => "a string",
        cel::Value::Bytes(_) => "bytes",
        cel::Value::Duration(_) => "a duration",
        cel::Value::Timestamp(_) => "a timestamp",
        cel::Value::Null => "null",
        _ => "a value",
    };
    name.to_owned()
}

fn to_cel(kind: &FieldKind, value: Option<&Json>) -> cel::Value {
    let Some(value) = value else { return cel::Value::Null };
    match (kind, value) {
        (FieldKind::Number { integer: true, .. }, Json::Number(n)) if n.as_i64().is_some() => {
            cel::Value::Int(n.as_i64().unwrap_or_default())
        }
        (FieldKind::Number { .. }, Json::Number(n)) => {
            cel::Value::Float(n.as_f64().unwrap_or_default())
        }
        (FieldKind::DateTime, Json::String(s)) => match DateTime::parse_from_rfc3339(s) {
            Ok(t) => cel::Value::Timestamp(t),
            Err(_) => cel::Value::String(Arc::new(s.clone())),
        },
        (_, Json::String(s)) => cel::Value::String(Arc::new(s.clone())),
        (_, Json::Bool(b)) => cel::Value::Bool(*b),
        (_, Json::Number(n)) => cel::Value::Float(n.as_f64().unwrap_or_default()),
        _ => cel::Value::Null,
    }
}

/// Parses a condition; the error is CEL's message. Runs the parser on its own thread with a
/// 64 MiB stack (see `compile`).
fn parse_condition(source: &str) -> Result<cel::Program, String> {
    if source.len() > 4000 {
        return Err("a condition has at most 4000 characters".into());
    }
    let owned = source.to_owned();
    let parsed = std::thread::Builder::new()
        .name("cel-parse".into())
        .stack_size(64 << 20)
        .spawn(move || cel::Program::compile(&owned).map_err(|e| e.to_string()))
        .map_err(|e| format!("cannot start the condition parser: {e}"))?
        .join()
        .map_err(|_| "the condition parser failed".to_owned())?;
    parsed.map_err(|e| format!("does not parse: {}", e.replace('\n', "; ")))
}

/// A value of each field of `t` as a sample request would have it.
fn sample_values(t: &RequestType) -> Values {
    t.fields
        .iter()
        .map(|f| {
            let v = match &f.kind {
                FieldKind::Text { .. } => Json::from("x"),
                FieldKind::Number { min, integer, .. } => match min {
                    Some(m) => Json::Number(m.clone()),
                    None if *integer => Json::from(1),
                    None => Json::from(1.0),
                },
                FieldKind::Enum { values } => {
                    Json::from(values.first().cloned().unwrap_or_default())
                }
                FieldKind::Date => Json::from("2026-01-15"),
                FieldKind::DateTime => Json::from("2026-01-15T10:00:00Z"),
                FieldKind::Boolean => Json::from(true),
            };
            (f.name.clone(), v)
        })
        .collect()
}

/// Type-checks `rule`'s condition against `t`: only the provided variables, only fields the
/// type has, and evaluation on a sample request gives a boolean. The error says why.
fn type_check(rule: &RequestRule, compiled: &CompiledRule, t: &RequestType) -> Result<(), String> {
    let Some(program) = &compiled.program else { return Ok(()) };
    let mut bound = BTreeSet::new();
    let mut selects = Vec::new();
    walk(&program.expression().expr, &mut bound, &mut selects);
    let references = program.references();
    let mut unknown: Vec<&str> = references
        .variables()
        .into_iter()
        .filter(|v| !CONDITION_VARIABLES.contains(v) && !bound.contains(*v))
        .collect();
    unknown.sort_unstable();
    if let Some(v) = unknown.first() {
        return Err(format!(
            "unknown variable {v} (a condition uses {})",
            CONDITION_VARIABLES.join(", ")
        ));
    }
    for (var, field) in selects {
        if bound.contains(var) {
            continue;
        }
        let known = match var {
            "fields" | "previous" => compiled.kinds.contains_key(field),
            "request" => REQUEST_KEYS.contains(&field),
            _ => true,
        };
        if !known {
            return Err(if var == "request" {
                format!("request has no {field} (it has {})", REQUEST_KEYS.join(", "))
            } else {
                format!("request type {} has no field {field}", t.code)
            });
        }
    }
    let fields = sample_values(t);
    let created = Utc.with_ymd_and_hms(2026, 1, 15, 9, 0, 0).single().unwrap_or_default();
    let site = SiteCode::parse("SFO").map_err(|e| e.message)?;
    let ctx = RuleContext {
        human_id: "SFO-000001",
        site: &site,
        fields: &fields,
        previous: matches!(rule.trigger, Trigger::Modify | Trigger::StatusChange { .. })
            .then_some(&fields),
        created_at: created,
        updated_at: created + Duration::hours(1),
        now: created + Duration::days(2),
    };
    compiled
        .matches(&ctx)
        .map(|_| ())
        .map_err(|e| format!("fails on a sample {} request: {e}", t.code))
}

/// Collects the names comprehensions bind and every `<ident>.<field>` selection.
fn walk<'e>(
    e: &'e cel::common::ast::Expr,
    bound: &mut BTreeSet<&'e str>,
    selects: &mut Vec<(&'e str, &'e str)>,
) {
    use cel::common::ast::{EntryExpr, Expr};
    match e {
        Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => {}
        Expr::Call(c) => {
            if let Some(t) = &c.target {
                walk(&t.expr, bound, selects);
            }
            for a in &c.args {
                walk(&a.expr, bound, selects);
            }
        }
        Expr::Comprehension(c) => {
            bound.insert(&c.iter_var);
            if let Some(v) = &c.iter_var2 {
                bound.insert(v);
            }
            bound.insert(&c.accu_var);
            for x in [&c.iter_range, &c.accu_init, &c.loop_cond, &c.loop_step, &c.result] {
                walk(&x.expr, bound, selects);
            }
        }
        Expr::List(l) => {
            for x in &l.elements {
                walk(&x.expr, bound, selects);
            }
        }
        Expr::Map(m) => {
            for entry in &m.entries {
                match &entry.expr {
                    EntryExpr::StructField(f) => walk(&f.value.expr, bound, selects),
                    EntryExpr::MapEntry(me) => {
                        walk(&me.key.expr, bound, selects);
                        walk(&me.value.expr, bound, selects);
                    }
                }
            }
        }
        Expr::Struct(s) => {
            for entry in &s.entries {
                match &entry.expr {
                    EntryExpr::StructField(f) => walk(&f.value.expr, bound, selects),
                    EntryExpr::MapEntry(me) => {
                        walk(&me.key.expr, bound, selects);
                        walk(&me.value.expr, bound, selects);
                    }
                }
            }
        }
        Expr::Select(s) => {
            if let Expr::Ident(name) = &s.operand.expr {
                selects.push((name, &s.field));
            }
            walk(&s.operand.expr, bound, selects);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Time triggers

/// Parses a cron expression. A standard 5-field one (minute hour day month weekday, weekdays
/// numbered 0-7 from Sunday, or named) gets a leading `0` for the seconds and its weekday
/// numbers written as names (the `cron` crate numbers them 1-7 from Sunday); 6 or 7 fields are
/// read as the `cron` crate reads them.
fn parse_cron(expr: &str) -> Result<cron::Schedule, String> {
    let parts: Vec<&str> = expr.split_whitespace().collect();
    let full = match parts.len() {
        5 => format!("0 {} {}", parts[..4].join(" "), weekday_names(parts[4])),
        6 | 7 => expr.trim().to_owned(),
        n => {
            return Err(format!(
                "invalid cron expression {expr:?}: expected 5 fields (minute hour day month \
                 weekday), or 6-7 with seconds first, found {n}"
            ));
        }
    };
    cron::Schedule::from_str(&full).map_err(|e| format!("invalid cron expression {expr:?}: {e}"))
}

/// `1-5` → `Mon-Fri`: standard weekday numbers (0 and 7 are Sunday) as names; a step
/// (`*/2`) stays a number.
fn weekday_names(field: &str) -> String {
    const NAMES: [&str; 8] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    let mut out = String::with_capacity(field.len() + 8);
    let mut digits = String::new();
    let mut after_slash = false;
    let flush = |digits: &mut String, out: &mut String, after_slash: bool| {
        if digits.is_empty() {
            return;
        }
        match digits.parse::<usize>().ok().and_then(|n| NAMES.get(n)) {
            Some(name) if !after_slash => out.push_str(name),
            // A step, or out of range (the parser reports it).
            _ => out.push_str(digits),
        }
        digits.clear();
    };
    for c in field.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
        } else {
            flush(&mut digits, &mut out, after_slash);
            after_slash = c == '/';
            out.push(c);
        }
    }
    flush(&mut digits, &mut out, after_slash);
    out
}

/// When a time-triggered rule (`schedule`, `close_of_business`) next fires at `site` strictly
/// after `after`; `None` for other triggers, a site with a bad time zone, or no occurrence
/// within a year (a schedule that cannot match, a site never open).
///
/// Wall times are the site's: a time the clocks skip (spring forward) fires at the same wall
/// time plus one hour (02:30 on a night that jumps from 02:00 to 03:00 fires at 03:30), and a
/// time the clocks pass twice (fall back) fires once, at the earlier instant.
/// `close_of_business` fires at `business_day::closing_time` of each open day (closed dates
/// and days without business hours are skipped).
pub fn next_occurrence(
    rule: &RequestRule,
    site: &Site,
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let tz = site.tz().ok()?;
    match &rule.trigger {
        Trigger::Schedule { cron } => {
            let schedule = parse_cron(cron).ok()?;
            // Run the schedule over wall times (naive local time written as UTC), then resolve
            // each wall time in the zone.
            let wall = Utc.from_utc_datetime(&after.with_timezone(&tz).naive_local());
            let limit = after + Duration::days(400);
            for candidate in schedule.after(&wall).take(10_000) {
                let at = resolve_local(tz, candidate.naive_utc())?;
                if at > after {
                    return Some(at);
                }
                if at > limit {
                    return None;
                }
            }
            None
        }
        Trigger::CloseOfBusiness => {
            let mut day = crate::business_day::business_day(tz, after);
            for _ in 0..400 {
                if let Some(close) = crate::business_day::closing_time(site, tz, day)
                    && close > after
                {
                    return Some(close);
                }
                day = day.succ_opt()?;
            }
            None
        }
        _ => None,
    }
}

fn resolve_local(tz: chrono_tz::Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    tz.from_local_datetime(&local)
        .earliest()
        .or_else(|| tz.from_local_datetime(&(local + Duration::hours(1))).earliest())
        .map(|t| t.with_timezone(&Utc))
}

// ---------------------------------------------------------------------------------------------
// Whole-set checks (called by `ConfigSet::validate`)

/// Checks `rule` against the rest of `set`; `at` is the rule's resource key. Field paths are
/// relative to the rule.
pub(crate) fn check_rule(rule: &RequestRule, set: &ConfigSet, errs: &mut ValidationErrors) {
    let types = set.request_types();
    let mappings = set.request_mappings();
    let pools = set.request_pools();
    let sites: BTreeMap<&SiteCode, &Site> = set.sites().map(|s| (&s.code, s)).collect();
    let rule_type = types.get(&rule.request_type).copied();
    if rule_type.is_none() {
        errs.push("request_type", format!("unknown request type {}", rule.request_type));
    }
    if let Some(code) = &rule.mapping {
        match mappings.get(code) {
            None => errs.push("mapping", format!("unknown request mapping {code}")),
            Some(m) if m.source_type != rule.request_type => errs.push(
                "mapping",
                format!(
                    "mapping {code} maps requests of type {}, not {}",
                    m.source_type, rule.request_type
                ),
            ),
            Some(_) => {}
        }
    }
    if let Some(pool) = &rule.pool
        && pool.as_str() != DEFAULT_POOL
        && !pools.contains_key(pool)
    {
        errs.push("pool", format!("unknown request pool {pool}"));
    }
    for (i, s) in rule.sites.iter().enumerate() {
        if !sites.contains_key(s) {
            errs.push(format!("sites[{i}]"), format!("unknown site {s}"));
        }
    }
    match &rule.target {
        Some(Target::Site(s)) if !sites.contains_key(s) => {
            errs.push("target.site", format!("unknown site {s}"));
        }
        Some(Target::FollowTheSun(chain)) => {
            for (i, s) in chain.iter().enumerate() {
                if !sites.contains_key(s) {
                    errs.push(format!("target.follow_the_sun[{i}]"), format!("unknown site {s}"));
                }
            }
        }
        Some(Target::Group(tag)) if !sites.values().any(|s| s.tags.contains(tag)) => {
            errs.push("target.group", format!("no site has the tag {tag}"));
        }
        _ => {}
    }
    match &rule.trigger {
        Trigger::CloseOfBusiness => {
            let closed: Vec<&str> = sites
                .values()
                .filter(|s| rule.is_evaluated_at(&s.code))
                .filter(|s| s.business_hours.values().all(Vec::is_empty))
                .map(|s| s.code.as_str())
                .collect();
            if !closed.is_empty() {
                errs.push(
                    "trigger",
                    format!(
                        "close_of_business needs business hours at every evaluating site; {} \
                         has none",
                        closed.join(", ")
                    ),
                );
            }
        }
        Trigger::StatusChange { field } => {
            if let Some(t) = rule_type
                && !field.is_empty()
                && !t.fields.iter().any(|f| &f.name == field)
            {
                errs.push("trigger.field", format!("request type {} has no field {field}", t.code));
            }
        }
        _ => {}
    }
    // A condition that does not parse is reported by `RequestRule::validate`.
    if let Some(t) = rule_type
        && let Ok(compiled) = compile(rule, t)
        && let Err(e) = type_check(rule, &compiled, t)
    {
        errs.push("condition", e);
    }
}

/// Refuses sets of enabled arrival rules that would move a request in a loop by ownership
/// transfers: a graph over (site, request type), an edge per rule and evaluating site.
/// Errors are pushed at `request_rule/<first rule of the cycle>.target`.
pub(crate) fn check_loops(set: &ConfigSet, errs: &mut ValidationErrors) {
    let all_sites: Vec<SiteCode> = set.sites().map(|s| s.code.clone()).collect();
    let mappings = set.request_mappings();
    type Node = (SiteCode, Code);
    let mut edges: BTreeMap<Node, Vec<(Node, Code)>> = BTreeMap::new();
    for rule in set.request_rules().values() {
        let moves_on_arrival = rule.enabled
            && rule.trigger == Trigger::Arrival
            && rule.action == Action::Transfer
            && rule.mode == Some(TransferMode::Ownership);
        let Some(mapping) = rule.mapping.as_ref().and_then(|m| mappings.get(m)) else {
            continue;
        };
        if !moves_on_arrival {
            continue;
        }
        for from in rule.evaluated_at(&all_sites) {
            let to = match &rule.target {
                Some(Target::Site(s)) if s != from => Some(s.clone()),
                Some(Target::FollowTheSun(chain)) => Target::follow_the_sun_next(chain, from),
                _ => None,
            };
            if let Some(to) = to {
                edges
                    .entry((from.clone(), rule.request_type.clone()))
                    .or_default()
                    .push(((to, mapping.target_type.clone()), rule.code.clone()));
            }
        }
    }
    // Depth-first search; a back edge closes a cycle, reported once per set of rules.
    let mut done: BTreeSet<Node> = BTreeSet::new();
    let mut reported: BTreeSet<Vec<Code>> = BTreeSet::new();
    for start in edges.keys() {
        if done.contains(start) {
            continue;
        }
        // The path: (node, index of the next edge to try, the rule that led here).
        let mut path: Vec<(Node, usize, Option<Code>)> = vec![(start.clone(), 0, None)];
        while let Some((node, next, _)) = path.last().cloned() {
            let out = edges.get(&node).map(Vec::as_slice).unwrap_or_default();
            let Some((to, rule)) = out.get(next) else {
                done.insert(node);
                path.pop();
                continue;
            };
            if let Some(last) = path.last_mut() {
                last.1 += 1;
            }
            if let Some(i) = path.iter().position(|(n, _, _)| n == to) {
                let mut rules: Vec<Code> =
                    path[i + 1..].iter().filter_map(|(_, _, r)| r.clone()).collect();
                rules.push(rule.clone());
                let mut sites: Vec<&str> = path[i..].iter().map(|(n, _, _)| n.0.as_str()).collect();
                sites.push(to.0.as_str());
                let mut key = rules.clone();
                key.sort();
                key.dedup();
                // Start the report at the smallest rule (then site), so it reads the same
                // whichever node the search entered the cycle by.
                let start =
                    (0..rules.len()).min_by_key(|&k| (&rules[k], sites[k])).unwrap_or_default();
                rules.rotate_left(start);
                sites.pop();
                sites.rotate_left(start);
                sites.push(sites[0]);
                if reported.insert(key.clone()) {
                    let names = match key.as_slice() {
                        [one] => format!("rule {one}"),
                        [init @ .., last] => format!(
                            "rules {} and {last}",
                            init.iter().map(Code::as_str).collect::<Vec<_>>().join(", ")
                        ),
                        [] => String::new(),
                    };
                    errs.push(
                        format!("request_rule/{}.target", rules[0]),
                        format!("{names} would move a request in a loop: {}", sites.join(" → ")),
                    );
                }
            } else if !done.contains(to) {
                path.push((to.clone(), 0, Some(rule.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::NaiveDate;
    use serde_json::json;

    use super::*;
    use crate::config::Resource;

    fn s(code: &str) -> SiteCode {
        SiteCode::parse(code).expect("site code")
    }

    fn at(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, min, 0).single().expect("time")
    }

    fn resource(v: Json) -> Resource {
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{v}: {e}"))
    }

    fn repair_type() -> Json {
        json!({"kind": "request_type", "code": "REPAIR", "name": "Repair", "fields": [
            {"name": "summary", "type": "text", "max_length": 80, "required": true},
            {"name": "category", "type": "enum", "values": ["chair", "table"]},
            {"name": "status", "type": "enum", "values": ["open", "closed"]},
            {"name": "upholstery", "type": "boolean"},
            {"name": "qty", "type": "number", "integer": true, "min": 1},
            {"name": "price", "type": "number"},
            {"name": "due", "type": "date"},
            {"name": "seen", "type": "date_time"},
            {"name": "note", "type": "text", "max_length": 200}
        ]})
    }

    /// Sites SFO and CHI (tag `us`, weekday hours), PAR (tag `emea`, no hours) and TYO; types
    /// REPAIR and UPHOLSTERY; mappings R2R (REPAIR → REPAIR), TO_UPH (REPAIR → UPHOLSTERY) and
    /// U2U; pool `night`.
    fn base() -> Vec<Json> {
        let hours = json!({"mon": ["09:00-17:00"], "tue": ["09:00-17:00"], "wed": ["09:00-17:00"],
                           "thu": ["09:00-17:00"], "fri": ["09:00-17:00"]});
        vec![
            json!({"kind": "site", "code": "SFO", "name": "San Francisco",
                   "time_zone": "America/Los_Angeles", "tags": ["us"], "business_hours": hours}),
            json!({"kind": "site", "code": "CHI", "name": "Chicago", "time_zone": "America/Chicago",
                   "tags": ["us"], "business_hours": hours}),
            json!({"kind": "site", "code": "PAR", "name": "Paris", "time_zone": "Europe/Paris",
                   "tags": ["emea"]}),
            json!({"kind": "site", "code": "TYO", "name": "Tokyo", "time_zone": "Asia/Tokyo"}),
            repair_type(),
            json!({"kind": "request_type", "code": "UPHOLSTERY", "name": "Upholstery", "fields": [
                {"name": "summary", "type": "text", "max_length": 200, "required": true}
            ]}),
            json!({"kind": "request_mapping", "code": "R2R", "name": "Repair",
                   "source_type": "REPAIR", "target_type": "REPAIR"}),
            json!({"kind": "request_mapping", "code": "TO_UPH", "name": "To upholstery",
                   "source_type": "REPAIR", "target_type": "UPHOLSTERY"}),
            json!({"kind": "request_mapping", "code": "U2U", "name": "Upholstery",
                   "source_type": "UPHOLSTERY", "target_type": "UPHOLSTERY"}),
            json!({"kind": "request_pool", "code": "night", "name": "Night lane"}),
        ]
    }

    /// A rule `code`: the base (an ownership transfer of REPAIR on create to CHI by R2R) with
    /// `changes` applied (a null removes a key).
    fn rule(code: &str, changes: Json) -> Json {
        let mut v = json!({"kind": "request_rule", "code": code, "name": format!("Rule {code}"),
            "request_type": "REPAIR", "trigger": {"on": "create"}, "action": "transfer",
            "mode": "ownership", "mapping": "R2R", "target": {"site": "CHI"}});
        let obj = v.as_object_mut().expect("object");
        for (k, val) in changes.as_object().expect("object") {
            if val.is_null() {
                obj.remove(k);
            } else {
                obj.insert(k.clone(), val.clone());
            }
        }
        v
    }

    fn set_with(extra: Vec<Json>) -> ConfigSet {
        ConfigSet::from_resources(base().into_iter().chain(extra).map(resource))
    }

    /// Validates the base set plus `extra`; `expected` is every error as (field, a fragment
    /// of its message), in order.
    fn check_set(extra: Vec<Json>, expected: &[(&str, &str)]) {
        let what = serde_json::to_string(&extra).expect("json");
        let got = match set_with(extra).validate() {
            Ok(()) => vec![],
            Err(e) => e.0,
        };
        let fields: Vec<&str> = got.iter().map(|e| e.field.as_str()).collect();
        let want: Vec<&str> = expected.iter().map(|(f, _)| *f).collect();
        assert_eq!(fields, want, "{what}\n{got:?}");
        for (e, (_, fragment)) in got.iter().zip(expected) {
            assert!(
                e.message.contains(fragment),
                "{what}\n{}: {:?} lacks {fragment:?}",
                e.field,
                e.message
            );
        }
    }

    /// One rule R with `changes`; the expected errors' fields are relative to the rule.
    fn check(changes: Json, expected: &[(&str, &str)]) {
        let full: Vec<(String, &str)> =
            expected.iter().map(|(f, m)| (format!("request_rule/R.{f}"), *m)).collect();
        let full: Vec<(&str, &str)> = full.iter().map(|(f, m)| (f.as_str(), *m)).collect();
        check_set(vec![rule("R", changes)], &full);
    }

    #[test]
    fn rules_are_checked_on_their_own() {
        check(json!({}), &[]);
        check(json!({"mode": null}), &[("mode", "a transfer needs a mode")]);
        check(json!({"mapping": null}), &[("mapping", "a transfer needs a mapping")]);
        check(json!({"target": null}), &[("target", "a transfer needs a target")]);
        check(
            json!({"target": {"group": "us"}}),
            &[("target", "an ownership transfer goes to one site")],
        );
        check(
            json!({"mode": "independent_copy", "target": {"all_sites": true}}),
            &[("target", "an independent_copy transfer goes to one site")],
        );
        check(json!({"mode": "data_only", "target": {"group": "emea"}}), &[]);
        check(json!({"mode": "data_only", "target": {"all_sites": true}}), &[]);
        check(
            json!({"mode": "data_only", "target": {"all_sites": false}}),
            &[("target.all_sites", "must be true")],
        );
        check(json!({"action": "return", "mode": null, "mapping": null, "target": null}), &[]);
        check(
            json!({"action": "return", "mode": null}),
            &[("target", "a return goes back to the site the request came from")],
        );
        check(json!({"action": "return", "target": null}), &[("mode", "only a transfer")]);
        check(json!({"action": "delete", "mode": null, "mapping": null, "target": null}), &[]);
        check(
            json!({"action": "delete"}),
            &[
                ("target", "a delete takes no target"),
                ("mapping", "a delete takes no mapping"),
                ("mode", "a delete takes no mode"),
            ],
        );
        check(json!({"action": "update", "mode": null}), &[]);
        check(
            json!({"action": "update", "mode": null, "target": null}),
            &[("target", "an update needs a target")],
        );
        check(json!({"target": {"follow_the_sun": ["SFO", "TYO", "PAR"]}}), &[]);
        check(
            json!({"target": {"follow_the_sun": ["SFO"]}}),
            &[("target.follow_the_sun", "at least two different sites")],
        );
        check(
            json!({"target": {"follow_the_sun": ["SFO", "SFO"]}}),
            &[("target.follow_the_sun", "at least two different sites")],
        );
        check(
            json!({"target": {"follow_the_sun": ["SFO", "TYO", "SFO"]}}),
            &[("target.follow_the_sun", "appears twice")],
        );
        check(json!({"bounce_limit": 0}), &[("bounce_limit", "must be 1-100")]);
        check(json!({"bounce_limit": 101}), &[("bounce_limit", "must be 1-100")]);
        check(json!({"bounce_limit": 100}), &[]);
        check(json!({"trigger": {"on": "schedule", "cron": "0 9 * * 1-5"}}), &[]);
        check(json!({"trigger": {"on": "schedule", "cron": "0 0 9 * * Mon-Fri"}}), &[]);
        check(json!({"trigger": {"on": "schedule", "cron": "0 0 9 * * Mon-Fri 2030"}}), &[]);
        check(
            json!({"trigger": {"on": "schedule", "cron": "61 * * * *"}}),
            &[("trigger.cron", "invalid cron expression \"61 * * * *\"")],
        );
        check(
            json!({"trigger": {"on": "schedule", "cron": "every day"}}),
            &[("trigger.cron", "expected 5 fields")],
        );
        check(
            json!({"trigger": {"on": "status_change", "field": ""}}),
            &[("trigger.field", "name the field")],
        );
        check(json!({"condition": "fields.category =="}), &[("condition", "does not parse")]);
        check(
            json!({"condition": "fields.category == 'chair' &&"}),
            &[("condition", "does not parse")],
        );
        check(json!({"name": " "}), &[("name", "must be 1-200 characters")]);
    }

    #[test]
    fn rules_are_checked_against_the_set() {
        check(
            json!({"request_type": "NOPE", "condition": "fields.x == 1"}),
            &[
                ("request_type", "unknown request type NOPE"),
                ("mapping", "mapping R2R maps requests of type REPAIR, not NOPE"),
            ],
        );
        check(json!({"mapping": "NOPE"}), &[("mapping", "unknown request mapping NOPE")]);
        check(
            json!({"mapping": "U2U"}),
            &[("mapping", "mapping U2U maps requests of type UPHOLSTERY, not REPAIR")],
        );
        check(json!({"pool": "NOPE"}), &[("pool", "unknown request pool NOPE")]);
        check(json!({"pool": "night"}), &[]);
        check(json!({"pool": "default"}), &[]);
        check(json!({"sites": ["SFO", "LON"]}), &[("sites[1]", "unknown site LON")]);
        check(json!({"target": {"site": "LON"}}), &[("target.site", "unknown site LON")]);
        check(
            json!({"target": {"follow_the_sun": ["SFO", "LON"]}}),
            &[("target.follow_the_sun[1]", "unknown site LON")],
        );
        check(
            json!({"mode": "data_only", "target": {"group": "apac"}}),
            &[("target.group", "no site has the tag apac")],
        );
        check(json!({"trigger": {"on": "close_of_business"}, "sites": ["SFO", "CHI"]}), &[]);
        check(
            json!({"trigger": {"on": "close_of_business"}}),
            &[(
                "trigger",
                "close_of_business needs business hours at every evaluating site; PAR, TYO has none",
            )],
        );
        check(json!({"trigger": {"on": "status_change", "field": "status"}}), &[]);
        check(
            json!({"trigger": {"on": "status_change", "field": "colour"}}),
            &[("trigger.field", "request type REPAIR has no field colour")],
        );
        check_set(
            vec![json!({"kind": "request_pool", "code": "default", "name": "Default",
                              "timeout_minutes": 60})],
            &[],
        );
        check_set(
            vec![json!({"kind": "request_pool", "code": "slow", "name": "Slow",
                        "timeout_minutes": 0})],
            &[("request_pool/slow.timeout_minutes", "must be 1-43200 minutes")],
        );
        let pool: RequestPool =
            serde_json::from_value(json!({"code": "p", "name": "P"})).expect("pool");
        assert_eq!(pool.timeout_minutes, 1440);
        let r: RequestRule =
            serde_json::from_value(rule("R", json!({"kind": null}))).expect("rule");
        assert_eq!((r.bounce_limit, r.enabled, r.update), (3, true, UpdatePolicy::Immediately));
        for bad in [
            rule("R", json!({"kind": null, "colour": "red"})),
            rule("R", json!({"kind": null, "trigger": {"on": "create", "field": "x"}})),
            rule("R", json!({"kind": null, "target": {"site": "CHI", "group": "us"}})),
            rule("R", json!({"kind": null, "trigger": {"on": "sometimes"}})),
        ] {
            assert!(serde_json::from_value::<RequestRule>(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn conditions_type_check_against_a_sample_request() {
        let ok = |condition: &str| check(json!({"condition": condition}), &[]);
        ok("fields.category == 'chair' && fields.upholstery");
        ok("fields.status == 'closed' && now - request.updated_at > duration('720h')");
        ok("fields.qty >= 2 && fields.price < 100.0 && fields.due > '2026-01-01'");
        ok("fields.seen < now && request.age_days > 1.5 && request.site == 'SFO'");
        ok("request.human_id.startsWith('SFO-') && request.type == 'REPAIR'");
        ok("[1, 2].exists(x, x > fields.qty) || fields.summary.contains('urgent')");
        ok("fields.note == null || size(fields.note) > 3");
        ok("size(previous) == 0");
        let bad = |condition: &str, fragment: &str| {
            check(json!({"condition": condition}), &[("condition", fragment)]);
        };
        bad("fields.category + 1 == 2", "fails on a sample REPAIR request: ");
        bad("fields.colour == 'red'", "request type REPAIR has no field colour");
        bad("false && fields.colour == 'red'", "request type REPAIR has no field colour");
        bad("fields['colour'] == 'red'", "fails on a sample REPAIR request: No such key: colour");
        bad("request.colour == 'red'", "request has no colour");
        bad("colour == 'red'", "unknown variable colour (a condition uses request, fields");
        bad("fields.summary", "gives a string, not a boolean");
        bad("fields.qty + 1", "gives an integer, not a boolean");
        bad("now - request.updated_at > 720", "fails on a sample REPAIR request");
        bad("previous.status == 'open'", "No such key: status");
        check(
            json!({"trigger": {"on": "modify"}, "condition": "previous.status != fields.status"}),
            &[],
        );
        check(
            json!({"trigger": {"on": "status_change", "field": "status"},
                   "condition": "previous.status == 'open' && fields.status == 'closed'"}),
            &[],
        );
    }

    #[test]
    fn arrival_rules_that_would_loop_are_refused() {
        let arrive = |code: &str, site: &str, to: &str, changes: Json| {
            let mut r = rule(
                code,
                json!({"trigger": {"on": "arrival"}, "sites": [site],
                                          "target": {"site": to}}),
            );
            for (k, v) in changes.as_object().expect("object") {
                r[k] = v.clone();
            }
            r
        };
        check_set(
            vec![arrive("A", "SFO", "CHI", json!({})), arrive("B", "CHI", "SFO", json!({}))],
            &[(
                "request_rule/A.target",
                "rules A and B would move a request in a loop: SFO → CHI → SFO",
            )],
        );
        check_set(
            vec![
                arrive("A", "SFO", "CHI", json!({})),
                arrive("B", "CHI", "TYO", json!({})),
                arrive("C", "TYO", "SFO", json!({})),
            ],
            &[(
                "request_rule/A.target",
                "rules A, B and C would move a request in a loop: SFO → CHI → TYO → SFO",
            )],
        );
        // Not loops: one direction disabled, a copy, a time trigger, a type change on the way.
        for b in [
            json!({"enabled": false}),
            json!({"mode": "data_only"}),
            json!({"trigger": {"on": "schedule", "cron": "0 * * * *"}}),
            json!({"trigger": {"on": "close_of_business"}}),
        ] {
            check_set(
                vec![arrive("A", "SFO", "CHI", json!({})), arrive("B", "CHI", "SFO", b)],
                &[],
            );
        }
        check_set(
            vec![
                arrive("A", "SFO", "CHI", json!({"mapping": "TO_UPH"})),
                arrive("B", "CHI", "SFO", json!({})),
            ],
            &[],
        );
        // A follow-the-sun chain evaluated on arrival at every site of the chain goes round.
        check_set(
            vec![rule(
                "F",
                json!({"trigger": {"on": "arrival"},
                                  "target": {"follow_the_sun": ["SFO", "TYO", "PAR"]}}),
            )],
            &[(
                "request_rule/F.target",
                "rule F would move a request in a loop: PAR → SFO → TYO → PAR",
            )],
        );
        // The same chain on create (or at one site only) is fine.
        check_set(
            vec![rule("F", json!({"target": {"follow_the_sun": ["SFO", "TYO", "PAR"]}}))],
            &[],
        );
        check_set(
            vec![rule(
                "F",
                json!({"trigger": {"on": "arrival"}, "sites": ["SFO"],
                                  "target": {"follow_the_sun": ["SFO", "TYO", "PAR"]}}),
            )],
            &[],
        );
    }

    fn compiled(condition: &str, trigger: Json) -> CompiledRule {
        let r: RequestRule = serde_json::from_value(rule(
            "R",
            json!({"kind": null, "condition": condition, "trigger": trigger}),
        ))
        .expect("rule");
        let t: RequestType = serde_json::from_value({
            let mut t = repair_type();
            t.as_object_mut().expect("object").remove("kind");
            t
        })
        .expect("type");
        compile(&r, &t).expect("compiles")
    }

    #[test]
    fn conditions_evaluate_against_a_request() {
        let sfo = s("SFO");
        let fields: Values = serde_json::from_value(json!({"summary": "Broken leg",
            "category": "chair", "status": "closed", "upholstery": true, "qty": 2,
            "price": 99.5, "due": "2026-02-01", "seen": "2026-01-10T08:00:00-08:00"}))
        .expect("values");
        let previous: Values =
            serde_json::from_value(json!({"summary": "Broken leg", "status": "open"}))
                .expect("values");
        let now = at(2026, 3, 1, 12, 0);
        let ctx = |updated_days_ago: i64| RuleContext {
            human_id: "SFO-000042",
            site: &sfo,
            fields: &fields,
            previous: Some(&previous),
            created_at: now - Duration::days(40),
            updated_at: now - Duration::days(updated_days_ago),
            now,
        };
        let check = |condition: &str, updated_days_ago: i64, expected: Result<bool, &str>| {
            let got = compiled(condition, json!({"on": "modify"})).matches(&ctx(updated_days_ago));
            match (&got, expected) {
                (Ok(g), Ok(e)) => assert_eq!(*g, e, "{condition}"),
                (Err(g), Err(e)) => assert!(g.contains(e), "{condition}: {g}"),
                _ => panic!("{condition}: {got:?} vs {expected:?}"),
            }
        };
        check("fields.category == 'chair' && fields.upholstery", 0, Ok(true));
        check("fields.category == 'table' && fields.upholstery", 0, Ok(false));
        let stale = "fields.status == 'closed' && now - request.updated_at > duration('720h')";
        check(stale, 31, Ok(true));
        check(stale, 29, Ok(false));
        check("request.age_days > 39.9 && request.age_days < 40.1", 0, Ok(true));
        check("fields.seen == timestamp('2026-01-10T16:00:00Z')", 0, Ok(true));
        check("fields.seen > request.created_at", 0, Ok(false));
        check("fields.due == '2026-02-01' && fields.qty == 2 && fields.price > 99.0", 0, Ok(true));
        check("previous.status == 'open' && fields.status == 'closed'", 0, Ok(true));
        check("fields.note == null && previous.category == null", 0, Ok(true));
        check("request.site == 'SFO' && request.human_id.startsWith('SFO-')", 0, Ok(true));
        check("request.type == 'REPAIR'", 0, Ok(true));
        check("fields.qty > 'x'", 0, Err(""));
        check("fields.summary", 0, Err("gives a string, not a boolean"));
        // No condition: always.
        let r: RequestRule =
            serde_json::from_value(rule("R", json!({"kind": null}))).expect("rule");
        let t: RequestType = serde_json::from_value({
            let mut t = repair_type();
            t.as_object_mut().expect("object").remove("kind");
            t
        })
        .expect("type");
        assert_eq!(compile(&r, &t).expect("compiles").matches(&ctx(0)), Ok(true));
        // A rule compiles only for its own type.
        let mut other = t.clone();
        other.code = Code::parse("OTHER").expect("code");
        assert!(compile(&r, &other).is_err());
        // Without previous values (create), `previous` is an empty map.
        let create = RuleContext { previous: None, ..ctx(0) };
        assert_eq!(
            compiled("size(previous) == 0", json!({"on": "create"})).matches(&create),
            Ok(true)
        );
    }

    #[test]
    fn deep_conditions_compile_on_an_ordinary_thread() {
        // The parser runs on its own large stack, so a deeply nested condition compiles even
        // from a thread with a small stack.
        let nested = format!("{}true{}", "(".repeat(60), ")".repeat(60));
        let cond = format!("{nested} && fields.upholstery");
        let handle = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || compiled(&cond, json!({"on": "create"})).program.is_some())
            .expect("thread");
        assert!(handle.join().expect("no overflow"));
    }

    fn sfo_site(closed: &[NaiveDate]) -> Site {
        let set = set_with(vec![]);
        let mut site = set.site(&s("SFO")).expect("SFO").clone();
        site.closed_dates = closed.to_vec();
        site
    }

    fn timed(trigger: Json) -> RequestRule {
        serde_json::from_value(rule("R", json!({"kind": null, "trigger": trigger}))).expect("rule")
    }

    #[test]
    fn schedules_fire_in_the_site_zone_across_daylight_saving_changes() {
        let site = sfo_site(&[]);
        let check = |cron: &str, after: DateTime<Utc>, expected: Option<DateTime<Utc>>| {
            let r = timed(json!({"on": "schedule", "cron": cron}));
            assert_eq!(next_occurrence(&r, &site, after), expected, "{cron} after {after}");
        };
        // Los Angeles springs forward on Sunday 2026-03-08 at 02:00 (to 03:00 PDT).
        check("30 2 * * *", at(2026, 3, 7, 12, 0), Some(at(2026, 3, 8, 10, 30)));
        check("30 2 * * *", at(2026, 3, 8, 10, 30), Some(at(2026, 3, 9, 9, 30)));
        check("0 9 * * *", at(2026, 3, 7, 17, 0), Some(at(2026, 3, 8, 16, 0)));
        // It falls back on Sunday 2026-11-01 at 02:00 (to 01:00 PST): 01:30 happens twice and
        // fires once, at the first.
        check("30 1 * * *", at(2026, 10, 31, 12, 0), Some(at(2026, 11, 1, 8, 30)));
        check("30 1 * * *", at(2026, 11, 1, 8, 30), Some(at(2026, 11, 2, 9, 30)));
        check("30 1 * * *", at(2026, 11, 1, 9, 0), Some(at(2026, 11, 2, 9, 30)));
        // Weekdays numbered from Sunday = 0: Friday 2026-03-06 17:00 local → Monday 09:00 PDT.
        check("0 9 * * 1-5", at(2026, 3, 7, 1, 0), Some(at(2026, 3, 9, 16, 0)));
        check("0 9 * * Mon-Fri", at(2026, 3, 7, 1, 0), Some(at(2026, 3, 9, 16, 0)));
        check("0 0 9 * * Mon-Fri", at(2026, 3, 7, 1, 0), Some(at(2026, 3, 9, 16, 0)));
        check("0 9 * * 0", at(2026, 3, 7, 1, 0), Some(at(2026, 3, 8, 16, 0)));
        check("0 9 * * 7", at(2026, 3, 7, 1, 0), Some(at(2026, 3, 8, 16, 0)));
        check("*/20 * * * *", at(2026, 3, 7, 1, 5), Some(at(2026, 3, 7, 1, 20)));
        // Other triggers have no occurrences.
        let create = timed(json!({"on": "create"}));
        assert_eq!(next_occurrence(&create, &site, at(2026, 3, 7, 1, 0)), None);
    }

    #[test]
    fn close_of_business_skips_closed_days_and_dates() {
        let cob = timed(json!({"on": "close_of_business"}));
        let check = |site: &Site, after: DateTime<Utc>, expected: DateTime<Utc>| {
            assert_eq!(next_occurrence(&cob, site, after), Some(expected), "after {after}");
        };
        let open = sfo_site(&[]);
        // Friday 2026-03-06 17:00 PST = 01:00 UTC on the 7th; at that instant it is next due
        // on Monday the 9th, 17:00 PDT (after the change) = 00:00 UTC on the 10th.
        check(&open, at(2026, 3, 6, 20, 0), at(2026, 3, 7, 1, 0));
        check(&open, at(2026, 3, 7, 1, 0), at(2026, 3, 10, 0, 0));
        // Monday the 9th closed: Tuesday.
        let closed = sfo_site(&[NaiveDate::from_ymd_opt(2026, 3, 9).expect("date")]);
        check(&closed, at(2026, 3, 7, 1, 0), at(2026, 3, 11, 0, 0));
        // A site never open: none.
        let mut never = open.clone();
        never.business_hours.clear();
        assert_eq!(next_occurrence(&cob, &never, at(2026, 3, 7, 1, 0)), None);
    }

    #[test]
    fn targets_expand() {
        let chain = [s("SFO"), s("TYO"), s("PAR")];
        assert_eq!(Target::follow_the_sun_next(&chain, &s("SFO")), Some(s("TYO")));
        assert_eq!(Target::follow_the_sun_next(&chain, &s("PAR")), Some(s("SFO")));
        assert_eq!(Target::follow_the_sun_next(&chain, &s("CHI")), None);
        assert_eq!(Target::follow_the_sun_next(&[s("SFO")], &s("SFO")), None);
        let set = set_with(vec![]);
        let check = |target: Json, source: &str, expected: &[&str]| {
            let target: Target = serde_json::from_value(target).expect("target");
            let got = set.expand_target(&target, &s(source));
            let got: Vec<&str> = got.iter().map(SiteCode::as_str).collect();
            assert_eq!(got, expected, "{target:?} from {source}");
        };
        check(json!({"site": "CHI"}), "SFO", &["CHI"]);
        check(json!({"site": "SFO"}), "SFO", &[]);
        check(json!({"site": "LON"}), "SFO", &[]);
        check(json!({"group": "us"}), "SFO", &["CHI"]);
        check(json!({"group": "us"}), "PAR", &["CHI", "SFO"]);
        check(json!({"all_sites": true}), "SFO", &["CHI", "PAR", "TYO"]);
        check(json!({"follow_the_sun": ["SFO", "TYO", "PAR"]}), "PAR", &["SFO"]);
        check(json!({"follow_the_sun": ["SFO", "TYO", "PAR"]}), "CHI", &[]);
    }

    #[test]
    fn snapshots_carry_the_rules_of_the_site_and_every_pool() {
        let set = set_with(vec![
            rule("ALL", json!({})),
            rule("SF", json!({"sites": ["SFO"], "target": {"site": "CHI"}})),
            rule("CH", json!({"sites": ["CHI"], "target": {"site": "SFO"}})),
        ]);
        set.validate().expect("valid");
        let snap = set.snapshot(&s("SFO"), 1).expect("snapshot");
        let codes: Vec<&str> = snap.request_rules.iter().map(|r| r.code.as_str()).collect();
        assert_eq!(codes, ["ALL", "SF"]);
        assert_eq!(snap.request_pools.len(), 1);
        assert_eq!(set.request_rules().len(), 3);
        assert_eq!(set.request_pools().len(), 1);
    }
}
