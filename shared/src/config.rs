//! The configuration model: typed resources (sites, services, queues, service points, work
//! profiles, staff users), validation of each resource and of a whole set (references,
//! uniqueness), and the per-site snapshot an agent applies.
//!
//! The controller keeps configuration as a set of resources keyed by (kind, site, code); every
//! change is validated against the whole resulting set before it is committed, so a stored
//! configuration is always consistent.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use chrono::{NaiveDate, NaiveTime};
use serde::{Deserialize, Serialize};

use crate::{Code, SiteCode, ValidationErrors};

/// Maximum length of free-text names.
pub const MAX_NAME_LEN: usize = 200;
/// Maximum business-hour periods per weekday.
pub const MAX_PERIODS_PER_DAY: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    Site,
    Service,
    Queue,
    ServicePoint,
    WorkProfile,
    StaffUser,
    ConnectorKey,
    Webhook,
    RequestType,
    RequestMapping,
    RequestRule,
    RequestPool,
}

impl ResourceKind {
    pub const ALL: [ResourceKind; 12] = [
        ResourceKind::Site,
        ResourceKind::Service,
        ResourceKind::Queue,
        ResourceKind::ServicePoint,
        ResourceKind::WorkProfile,
        ResourceKind::StaffUser,
        ResourceKind::ConnectorKey,
        ResourceKind::Webhook,
        ResourceKind::RequestType,
        ResourceKind::RequestMapping,
        ResourceKind::RequestRule,
        ResourceKind::RequestPool,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Site => "site",
            ResourceKind::Service => "service",
            ResourceKind::Queue => "queue",
            ResourceKind::ServicePoint => "service_point",
            ResourceKind::WorkProfile => "work_profile",
            ResourceKind::StaffUser => "staff_user",
            ResourceKind::ConnectorKey => "connector_key",
            ResourceKind::Webhook => "webhook",
            ResourceKind::RequestType => "request_type",
            ResourceKind::RequestMapping => "request_mapping",
            ResourceKind::RequestRule => "request_rule",
            ResourceKind::RequestPool => "request_pool",
        }
    }

    /// Whether resources of this kind belong to one site.
    pub fn is_site_scoped(self) -> bool {
        !matches!(
            self,
            ResourceKind::Site
                | ResourceKind::StaffUser
                | ResourceKind::RequestType
                | ResourceKind::RequestMapping
                | ResourceKind::RequestRule
                | ResourceKind::RequestPool
        )
    }
}

impl FromStr for ResourceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.to_ascii_lowercase().replace('-', "_");
        let norm = norm.strip_suffix('s').map(str::to_owned).unwrap_or(norm);
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == norm || (norm == "staff" && *k == ResourceKind::StaffUser))
            .ok_or_else(|| format!("unknown resource kind {s:?}"))
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of a resource: kind, owning site (for site-scoped kinds) and code.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResourceKey {
    pub kind: ResourceKind,
    pub site: Option<SiteCode>,
    pub code: String,
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.site {
            Some(site) => write!(f, "{}/{}/{}", self.kind, site, self.code),
            None => write!(f, "{}/{}", self.kind, self.code),
        }
    }
}

/// A weekday key in business hours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Day {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl From<chrono::Weekday> for Day {
    fn from(w: chrono::Weekday) -> Self {
        use chrono::Weekday::*;
        match w {
            Mon => Day::Mon,
            Tue => Day::Tue,
            Wed => Day::Wed,
            Thu => Day::Thu,
            Fri => Day::Fri,
            Sat => Day::Sat,
            Sun => Day::Sun,
        }
    }
}

/// An opening period within one day, written `"09:00-12:30"`; `open < close`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Period {
    pub open: NaiveTime,
    pub close: NaiveTime,
}

impl TryFrom<String> for Period {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("invalid period {s:?}: expected \"HH:MM-HH:MM\""))?;
        let parse = |t: &str| {
            NaiveTime::parse_from_str(t.trim(), "%H:%M")
                .map_err(|_| format!("invalid time {t:?} in period {s:?}: expected HH:MM"))
        };
        let (open, close) = (parse(a)?, parse(b)?);
        if open >= close {
            return Err(format!("period {s:?} closes before it opens"));
        }
        Ok(Period { open, close })
    }
}

impl From<Period> for String {
    fn from(p: Period) -> Self {
        format!("{}-{}", p.open.format("%H:%M"), p.close.format("%H:%M"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub code: SiteCode,
    pub name: String,
    /// IANA time zone, e.g. `America/Los_Angeles`.
    pub time_zone: String,
    #[serde(default)]
    pub business_hours: BTreeMap<Day, Vec<Period>>,
    #[serde(default)]
    pub closed_dates: Vec<NaiveDate>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// What happens to visits still open when the business day is over.
    #[serde(default)]
    pub end_of_day: EndOfDay,
    /// Whether visits' customer fields (name, phone, email, note) may leave the site: when
    /// true, the agent includes them in the `VISIT_CREATED` events it streams to the
    /// controller. Off by default; central statistics never need them. Local integrations at
    /// the site (the connector API, its live event feed, webhooks) see them either way.
    #[serde(default)]
    pub share_customer_data: bool,
    /// When the controller sends the site its coming appointments in bulk (the nightly sync).
    #[serde(default)]
    pub appointment_sync: AppointmentSync,
}

/// The nightly bulk sync of a site's appointments: every day at `at` (the site's wall clock,
/// `"HH:MM"`, default `"02:00"`) the controller sends the appointments of the site's current
/// day and the `days_ahead` days after it (default 1); the agent replaces its set for those
/// days. A time the clocks skip (spring forward) is read with the offset before the jump (02:30
/// on a night that jumps from 02:00 to 03:00 runs at 03:30); a time the clocks pass twice (fall
/// back) runs once, at the earlier instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppointmentSync {
    #[serde(with = "hh_mm")]
    pub at: NaiveTime,
    pub days_ahead: u32,
}

/// Upper bound of `AppointmentSync::days_ahead`.
pub const MAX_SYNC_DAYS_AHEAD: u32 = 31;

impl Default for AppointmentSync {
    fn default() -> Self {
        AppointmentSync { at: NaiveTime::from_hms_opt(2, 0, 0).unwrap_or_default(), days_ahead: 1 }
    }
}

/// `NaiveTime` as `"HH:MM"`.
mod hh_mm {
    use chrono::NaiveTime;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &NaiveTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.format("%H:%M").to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NaiveTime, D::Error> {
        let s = String::deserialize(d)?;
        NaiveTime::parse_from_str(s.trim(), "%H:%M").map_err(|_| {
            serde::de::Error::custom(format!("invalid time {s:?}: expected \"HH:MM\""))
        })
    }
}

/// The end-of-day rule: open visits are ended with the outcome `closed_at_end_of_day` once the
/// last opening period of their day has closed plus `grace_minutes` (and always once the site's
/// next calendar day has begun), unless `close_open_visits` is false.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EndOfDay {
    pub close_open_visits: bool,
    pub grace_minutes: u32,
}

impl Default for EndOfDay {
    fn default() -> Self {
        EndOfDay { close_open_visits: true, grace_minutes: 30 }
    }
}

impl Site {
    pub fn tz(&self) -> Result<chrono_tz::Tz, String> {
        self.time_zone
            .parse::<chrono_tz::Tz>()
            .map_err(|_| format!("unknown IANA time zone {:?}", self.time_zone))
    }

    fn validate(&self, errs: &mut ValidationErrors) {
        check_name(&self.name, "name", errs);
        if let Err(e) = self.tz() {
            errs.push("time_zone", e);
        }
        for (day, periods) in &self.business_hours {
            let field = format!("business_hours.{}", serde_plain_day(*day));
            if periods.len() > MAX_PERIODS_PER_DAY {
                errs.push(&field, format!("at most {MAX_PERIODS_PER_DAY} periods per day"));
            }
            let mut sorted = periods.clone();
            sorted.sort();
            for pair in sorted.windows(2) {
                if pair[1].open < pair[0].close {
                    errs.push(
                        &field,
                        format!(
                            "periods {} and {} overlap",
                            String::from(pair[0]),
                            String::from(pair[1])
                        ),
                    );
                }
            }
        }
        let unique: BTreeSet<_> = self.closed_dates.iter().collect();
        if unique.len() != self.closed_dates.len() {
            errs.push("closed_dates", "duplicate date");
        }
        if self.appointment_sync.days_ahead > MAX_SYNC_DAYS_AHEAD {
            errs.push("appointment_sync.days_ahead", format!("at most {MAX_SYNC_DAYS_AHEAD} days"));
        }
        for (i, tag) in self.tags.iter().enumerate() {
            if tag.is_empty() || tag.len() > 64 {
                errs.push(format!("tags[{i}]"), "tags are 1-64 characters");
            }
        }
    }
}

fn serde_plain_day(d: Day) -> &'static str {
    match d {
        Day::Mon => "mon",
        Day::Tue => "tue",
        Day::Wed => "wed",
        Day::Thu => "thu",
        Day::Fri => "fri",
        Day::Sat => "sat",
        Day::Sun => "sun",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub site: SiteCode,
    pub code: Code,
    pub name: String,
    /// The queue a new visit for this service enters.
    pub queue: Code,
    /// Target maximum wait, for service-level statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kpi_wait_minutes: Option<u32>,
    /// How appointments for this service are booked; a service without a policy takes no
    /// appointments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appointments: Option<AppointmentPolicy>,
}

/// Booking rules of one service: slots of `slot_minutes`, aligned to the start of each opening
/// period of the site, each taking up to `capacity` appointments; the check-in window (used at
/// the branch) opens `check_in_early_minutes` before an appointment's start and closes
/// `check_in_late_minutes` after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppointmentPolicy {
    pub slot_minutes: u32,
    pub capacity: u32,
    #[serde(default = "default_check_in_early")]
    pub check_in_early_minutes: u32,
    #[serde(default = "default_check_in_late")]
    pub check_in_late_minutes: u32,
}

/// Bounds of `AppointmentPolicy::slot_minutes`.
pub const SLOT_MINUTES: std::ops::RangeInclusive<u32> = 5..=240;
/// Bounds of `AppointmentPolicy::capacity`.
pub const SLOT_CAPACITY: std::ops::RangeInclusive<u32> = 1..=1000;
/// Upper bound of either check-in window, in minutes.
pub const MAX_CHECK_IN_MINUTES: u32 = 240;

fn default_check_in_early() -> u32 {
    30
}
fn default_check_in_late() -> u32 {
    15
}

impl AppointmentPolicy {
    fn validate(&self, errs: &mut ValidationErrors) {
        if !SLOT_MINUTES.contains(&self.slot_minutes) {
            errs.push(
                "appointments.slot_minutes",
                format!("must be {}-{} minutes", SLOT_MINUTES.start(), SLOT_MINUTES.end()),
            );
        }
        if !SLOT_CAPACITY.contains(&self.capacity) {
            errs.push(
                "appointments.capacity",
                format!(
                    "must be {}-{} appointments per slot",
                    SLOT_CAPACITY.start(),
                    SLOT_CAPACITY.end()
                ),
            );
        }
        for (field, value) in [
            ("appointments.check_in_early_minutes", self.check_in_early_minutes),
            ("appointments.check_in_late_minutes", self.check_in_late_minutes),
        ] {
            if value > MAX_CHECK_IN_MINUTES {
                errs.push(field, format!("at most {MAX_CHECK_IN_MINUTES} minutes"));
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Queue {
    pub site: SiteCode,
    pub code: Code,
    pub name: String,
    /// Ticket letter(s), 1-2 upper-case letters, unique within the site.
    pub letter: String,
    /// Ticket numbers run from `first` to `last` and wrap.
    #[serde(default = "default_first")]
    pub first_number: u32,
    #[serde(default = "default_last")]
    pub last_number: u32,
}

fn default_first() -> u32 {
    1
}
fn default_last() -> u32 {
    999
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePoint {
    pub site: SiteCode,
    pub code: Code,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_profile: Option<Code>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkProfileEntry {
    pub queue: Code,
    /// Only call from this queue ahead of later entries once its oldest ticket has waited this
    /// long; `None` means always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_wait_minutes: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkProfile {
    pub site: SiteCode,
    pub code: Code,
    pub name: String,
    pub queues: Vec<WorkProfileEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StaffRole {
    Staff,
    Supervisor,
}

/// A staff member as stored and synced: the password only as its argon2 PHC hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaffUser {
    pub username: Code,
    pub name: String,
    #[serde(default)]
    pub roles: Vec<StaffRole>,
    #[serde(default)]
    pub sites: Vec<SiteCode>,
    pub password_hash: String,
    /// Raised by a central "sign out everywhere": every session the user holds at any branch
    /// ends when the configuration reaches it (a password change does the same).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sessions_epoch: u32,
    /// Raised by a central unlock: lifts the user's sign-in lockout at every branch.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unlock_epoch: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// An API key for local systems (kiosks, displays, CRM) at one site. Only the SHA-256 of the
/// secret is configured and synced; the secret is shown once when the controller generates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorKey {
    pub site: SiteCode,
    pub code: Code,
    pub name: String,
    /// Lower-case hex SHA-256 of the secret.
    pub key_hash: String,
}

/// An outbound webhook from one site's agent: every event (or those of `kinds`) is POSTed to
/// `url` in order, signed with HMAC-SHA256 over `"<timestamp>.<body>"` using `secret`, and
/// retried with backoff until the receiver answers 2xx. `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub site: SiteCode,
    pub code: Code,
    pub url: String,
    /// The shared signing secret (16-256 characters).
    pub secret: String,
    /// Event kinds to deliver; empty means all.
    #[serde(default)]
    pub kinds: Vec<String>,
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("site", &self.site)
            .field("code", &self.code)
            .field("url", &self.url)
            .field("secret", &"***")
            .field("kinds", &self.kinds)
            .finish()
    }
}

/// One configuration resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Resource {
    Site(Site),
    Service(Service),
    Queue(Queue),
    ServicePoint(ServicePoint),
    WorkProfile(WorkProfile),
    StaffUser(StaffUser),
    ConnectorKey(ConnectorKey),
    Webhook(Webhook),
    /// A request type: global, part of every site's snapshot.
    RequestType(crate::requests::RequestType),
    /// A request mapping: global, checked against both of its types.
    RequestMapping(crate::mappings::RequestMapping),
    /// A distribution rule: global; its condition type-checks against its type.
    RequestRule(crate::rules::RequestRule),
    /// A request pool: global.
    RequestPool(crate::rules::RequestPool),
}

impl Resource {
    pub fn kind(&self) -> ResourceKind {
        match self {
            Resource::Site(_) => ResourceKind::Site,
            Resource::Service(_) => ResourceKind::Service,
            Resource::Queue(_) => ResourceKind::Queue,
            Resource::ServicePoint(_) => ResourceKind::ServicePoint,
            Resource::WorkProfile(_) => ResourceKind::WorkProfile,
            Resource::StaffUser(_) => ResourceKind::StaffUser,
            Resource::ConnectorKey(_) => ResourceKind::ConnectorKey,
            Resource::Webhook(_) => ResourceKind::Webhook,
            Resource::RequestType(_) => ResourceKind::RequestType,
            Resource::RequestMapping(_) => ResourceKind::RequestMapping,
            Resource::RequestRule(_) => ResourceKind::RequestRule,
            Resource::RequestPool(_) => ResourceKind::RequestPool,
        }
    }

    pub fn key(&self) -> ResourceKey {
        let (site, code) = match self {
            Resource::Site(s) => (None, s.code.to_string()),
            Resource::Service(s) => (Some(s.site.clone()), s.code.to_string()),
            Resource::Queue(q) => (Some(q.site.clone()), q.code.to_string()),
            Resource::ServicePoint(p) => (Some(p.site.clone()), p.code.to_string()),
            Resource::WorkProfile(w) => (Some(w.site.clone()), w.code.to_string()),
            Resource::StaffUser(u) => (None, u.username.to_string()),
            Resource::ConnectorKey(k) => (Some(k.site.clone()), k.code.to_string()),
            Resource::Webhook(w) => (Some(w.site.clone()), w.code.to_string()),
            Resource::RequestType(t) => (None, t.code.to_string()),
            Resource::RequestMapping(m) => (None, m.code.to_string()),
            Resource::RequestRule(r) => (None, r.code.to_string()),
            Resource::RequestPool(p) => (None, p.code.to_string()),
        };
        ResourceKey { kind: self.kind(), site, code }
    }

    /// The sites whose snapshot this resource is part of.
    pub fn sites(&self) -> Vec<SiteCode> {
        match self {
            Resource::Site(s) => vec![s.code.clone()],
            Resource::StaffUser(u) => u.sites.clone(),
            other => other.key().site.into_iter().collect(),
        }
    }

    /// Checks the resource on its own (no references).
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        match self {
            Resource::Site(s) => s.validate(&mut errs),
            Resource::Service(s) => {
                check_name(&s.name, "name", &mut errs);
                if let Some(policy) = &s.appointments {
                    policy.validate(&mut errs);
                }
            }
            Resource::Queue(q) => {
                check_name(&q.name, "name", &mut errs);
                let letter_ok = (1..=2).contains(&q.letter.len())
                    && q.letter.chars().all(|c| c.is_ascii_uppercase());
                if !letter_ok {
                    errs.push("letter", "ticket letter must be 1-2 upper-case letters");
                }
                if q.first_number == 0 || q.last_number > 9999 || q.first_number >= q.last_number {
                    errs.push(
                        "first_number",
                        "number range must satisfy 1 <= first_number < last_number <= 9999",
                    );
                }
            }
            Resource::ServicePoint(p) => check_name(&p.name, "name", &mut errs),
            Resource::WorkProfile(w) => {
                check_name(&w.name, "name", &mut errs);
                if w.queues.is_empty() {
                    errs.push("queues", "a work profile calls from at least one queue");
                }
                let unique: BTreeSet<_> =
                    w.queues.iter().map(|e| (&e.queue, e.min_wait_minutes)).collect();
                if unique.len() != w.queues.len() {
                    errs.push("queues", "the same queue and condition appear twice");
                }
            }
            Resource::ConnectorKey(k) => {
                check_name(&k.name, "name", &mut errs);
                let hex = k.key_hash.len() == 64
                    && k.key_hash.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
                if !hex {
                    errs.push("key_hash", "must be the lower-case hex SHA-256 of the key");
                }
            }
            Resource::Webhook(w) => {
                let scheme_ok = w.url.starts_with("https://") || w.url.starts_with("http://");
                if !scheme_ok || w.url.len() > 2000 || w.url.contains(char::is_whitespace) {
                    errs.push(
                        "url",
                        "must be an http:// or https:// URL of at most 2000 characters",
                    );
                }
                if !(16..=256).contains(&w.secret.len()) {
                    errs.push("secret", "must be 16-256 characters");
                }
                for (i, k) in w.kinds.iter().enumerate() {
                    if k.is_empty()
                        || k.len() > 64
                        || !k.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                    {
                        errs.push(
                            format!("kinds[{i}]"),
                            "event kinds are upper-case names like VISIT_CALLED",
                        );
                    }
                }
            }
            Resource::RequestType(t) => t.validate(&mut errs),
            // Checked against its types by `ConfigSet::validate`.
            Resource::RequestMapping(_) => {}
            Resource::RequestRule(r) => r.validate(&mut errs),
            Resource::RequestPool(p) => p.validate(&mut errs),
            Resource::StaffUser(u) => {
                check_name(&u.name, "name", &mut errs);
                if !u.password_hash.starts_with("$argon2") {
                    errs.push("password_hash", "must be an argon2 PHC string");
                }
            }
        }
        errs.into_result()
    }
}

fn check_name(name: &str, field: &str, errs: &mut ValidationErrors) {
    if name.trim().is_empty() {
        errs.push(field, "must not be empty");
    } else if name.chars().count() > MAX_NAME_LEN {
        errs.push(field, format!("at most {MAX_NAME_LEN} characters"));
    }
}

/// A whole configuration: every resource by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigSet {
    pub resources: BTreeMap<ResourceKey, Resource>,
}

impl ConfigSet {
    pub fn from_resources(resources: impl IntoIterator<Item = Resource>) -> Self {
        Self { resources: resources.into_iter().map(|r| (r.key(), r)).collect() }
    }

    pub fn get(&self, key: &ResourceKey) -> Option<&Resource> {
        self.resources.get(key)
    }

    pub fn sites(&self) -> impl Iterator<Item = &Site> {
        self.resources.values().filter_map(|r| match r {
            Resource::Site(s) => Some(s),
            _ => None,
        })
    }

    /// Every request type, by code.
    pub fn request_types(&self) -> BTreeMap<&Code, &crate::requests::RequestType> {
        self.resources
            .values()
            .filter_map(|r| match r {
                Resource::RequestType(t) => Some((&t.code, t)),
                _ => None,
            })
            .collect()
    }

    /// Every request mapping, by code.
    pub fn request_mappings(&self) -> BTreeMap<&Code, &crate::mappings::RequestMapping> {
        self.resources
            .values()
            .filter_map(|r| match r {
                Resource::RequestMapping(m) => Some((&m.code, m)),
                _ => None,
            })
            .collect()
    }

    /// Every distribution rule, by code.
    pub fn request_rules(&self) -> BTreeMap<&Code, &crate::rules::RequestRule> {
        self.resources
            .values()
            .filter_map(|r| match r {
                Resource::RequestRule(x) => Some((&x.code, x)),
                _ => None,
            })
            .collect()
    }

    /// Every request pool, by code.
    pub fn request_pools(&self) -> BTreeMap<&Code, &crate::rules::RequestPool> {
        self.resources
            .values()
            .filter_map(|r| match r {
                Resource::RequestPool(x) => Some((&x.code, x)),
                _ => None,
            })
            .collect()
    }

    /// The sites a rule's `target` sends a request from `source` to: one site, every site with
    /// the group's tag, every site, or the next site of the follow-the-sun chain — never
    /// `source` itself, each site once, in code order (follow-the-sun: the one site).
    pub fn expand_target(&self, target: &crate::rules::Target, source: &SiteCode) -> Vec<SiteCode> {
        use crate::rules::Target;
        let mut sites: Vec<SiteCode> = match target {
            Target::Site(s) => self.site(s).map(|x| x.code.clone()).into_iter().collect(),
            Target::Group(tag) => {
                self.sites().filter(|s| s.tags.contains(tag)).map(|s| s.code.clone()).collect()
            }
            Target::AllSites(all) => {
                if *all {
                    self.sites().map(|s| s.code.clone()).collect()
                } else {
                    vec![]
                }
            }
            Target::FollowTheSun(chain) => {
                Target::follow_the_sun_next(chain, source).into_iter().collect()
            }
        };
        sites.retain(|s| s != source);
        sites.sort();
        sites.dedup();
        sites
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.resources.values().filter_map(|r| match r {
            Resource::Service(s) => Some(s),
            _ => None,
        })
    }

    pub fn site(&self, code: &SiteCode) -> Option<&Site> {
        let key = ResourceKey { kind: ResourceKind::Site, site: None, code: code.to_string() };
        match self.resources.get(&key) {
            Some(Resource::Site(s)) => Some(s),
            _ => None,
        }
    }

    fn has(&self, kind: ResourceKind, site: &SiteCode, code: &Code) -> bool {
        self.resources.contains_key(&ResourceKey {
            kind,
            site: Some(site.clone()),
            code: code.to_string(),
        })
    }

    /// Checks every resource and every reference between them. Errors name the resource.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        let mut letters: BTreeMap<(SiteCode, String), String> = BTreeMap::new();
        for (key, res) in &self.resources {
            let at = key.to_string();
            if let Err(e) = res.validate() {
                errs.0.extend(e.nest(&at).0);
            }
            if let Some(site) = &key.site
                && self.site(site).is_none()
            {
                errs.push(format!("{at}.site"), format!("unknown site {site}"));
            }
            match res {
                Resource::Service(s) => {
                    if !self.has(ResourceKind::Queue, &s.site, &s.queue) {
                        errs.push(format!("{at}.queue"), format!("unknown queue {}", s.queue));
                    }
                }
                Resource::Queue(q) => {
                    if let Some(other) =
                        letters.insert((q.site.clone(), q.letter.clone()), q.code.to_string())
                    {
                        errs.push(
                            format!("{at}.letter"),
                            format!("letter {} is already used by queue {other}", q.letter),
                        );
                    }
                }
                Resource::ServicePoint(p) => {
                    if let Some(wp) = &p.work_profile
                        && !self.has(ResourceKind::WorkProfile, &p.site, wp)
                    {
                        errs.push(
                            format!("{at}.work_profile"),
                            format!("unknown work profile {wp}"),
                        );
                    }
                }
                Resource::WorkProfile(w) => {
                    for (i, entry) in w.queues.iter().enumerate() {
                        if !self.has(ResourceKind::Queue, &w.site, &entry.queue) {
                            errs.push(
                                format!("{at}.queues[{i}]"),
                                format!("unknown queue {}", entry.queue),
                            );
                        }
                    }
                }
                Resource::StaffUser(u) => {
                    for (i, site) in u.sites.iter().enumerate() {
                        if self.site(site).is_none() {
                            errs.push(format!("{at}.sites[{i}]"), format!("unknown site {site}"));
                        }
                    }
                }
                Resource::Site(_)
                | Resource::ConnectorKey(_)
                | Resource::Webhook(_)
                | Resource::RequestType(_) => {}
                Resource::RequestRule(r) => {
                    let mut own = ValidationErrors::default();
                    crate::rules::check_rule(r, self, &mut own);
                    errs.0.extend(own.nest(&at).0);
                }
                Resource::RequestPool(_) => {}
                Resource::RequestMapping(m) => {
                    let types = self.request_types();
                    let mappings = self.request_mappings();
                    let mut own = ValidationErrors::default();
                    m.validate(&types, &mappings, &mut own);
                    errs.0.extend(own.nest(&at).0);
                }
            }
        }
        crate::rules::check_loops(self, &mut errs);
        errs.into_result()
    }

    /// The snapshot an agent at `site` applies, stamped with `revision`.
    pub fn snapshot(&self, site: &SiteCode, revision: u64) -> Option<SiteConfig> {
        let s = self.site(site)?.clone();
        let mut snap = SiteConfig {
            revision,
            site: s,
            services: vec![],
            queues: vec![],
            service_points: vec![],
            work_profiles: vec![],
            staff: vec![],
            connector_keys: vec![],
            webhooks: vec![],
            request_types: vec![],
            request_mappings: vec![],
            request_rules: vec![],
            request_pools: vec![],
        };
        for res in self.resources.values() {
            match res {
                Resource::Service(x) if &x.site == site => snap.services.push(x.clone()),
                Resource::Queue(x) if &x.site == site => snap.queues.push(x.clone()),
                Resource::ServicePoint(x) if &x.site == site => snap.service_points.push(x.clone()),
                Resource::WorkProfile(x) if &x.site == site => snap.work_profiles.push(x.clone()),
                Resource::StaffUser(u) if u.sites.contains(site) => snap.staff.push(u.clone()),
                Resource::ConnectorKey(k) if &k.site == site => snap.connector_keys.push(k.clone()),
                Resource::Webhook(w) if &w.site == site => snap.webhooks.push(w.clone()),
                Resource::RequestType(t) => snap.request_types.push(t.clone()),
                Resource::RequestMapping(m) => snap.request_mappings.push(m.clone()),
                Resource::RequestRule(r) if r.is_evaluated_at(site) => {
                    snap.request_rules.push(r.clone())
                }
                Resource::RequestPool(p) => snap.request_pools.push(p.clone()),
                _ => {}
            }
        }
        Some(snap)
    }
}

/// Everything one site's agent needs, at one configuration revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteConfig {
    pub revision: u64,
    pub site: Site,
    pub services: Vec<Service>,
    pub queues: Vec<Queue>,
    pub service_points: Vec<ServicePoint>,
    pub work_profiles: Vec<WorkProfile>,
    pub staff: Vec<StaffUser>,
    #[serde(default)]
    pub connector_keys: Vec<ConnectorKey>,
    #[serde(default)]
    pub webhooks: Vec<Webhook>,
    /// Every request type (they are global).
    #[serde(default)]
    pub request_types: Vec<crate::requests::RequestType>,
    /// Every request mapping (global).
    #[serde(default)]
    pub request_mappings: Vec<crate::mappings::RequestMapping>,
    /// The distribution rules evaluated at this site (`sites` empty or naming it).
    #[serde(default)]
    pub request_rules: Vec<crate::rules::RequestRule>,
    /// Every request pool (global).
    #[serde(default)]
    pub request_pools: Vec<crate::rules::RequestPool>,
}

impl SiteConfig {
    pub fn service(&self, code: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.code.as_str() == code)
    }

    pub fn queue(&self, code: &str) -> Option<&Queue> {
        self.queues.iter().find(|q| q.code.as_str() == code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(code: &str, tz: &str) -> Resource {
        Resource::Site(Site {
            code: SiteCode::parse(code).unwrap(),
            name: format!("Site {code}"),
            time_zone: tz.into(),
            business_hours: BTreeMap::new(),
            closed_dates: vec![],
            tags: vec![],
            end_of_day: Default::default(),
            share_customer_data: false,
            appointment_sync: Default::default(),
        })
    }

    fn queue(site: &str, code: &str, letter: &str) -> Resource {
        Resource::Queue(Queue {
            site: SiteCode::parse(site).unwrap(),
            code: Code::parse(code).unwrap(),
            name: code.into(),
            letter: letter.into(),
            first_number: 1,
            last_number: 999,
        })
    }

    fn service(site: &str, code: &str, queue: &str) -> Resource {
        Resource::Service(Service {
            site: SiteCode::parse(site).unwrap(),
            code: Code::parse(code).unwrap(),
            name: code.into(),
            queue: Code::parse(queue).unwrap(),
            kpi_wait_minutes: None,
            appointments: None,
        })
    }

    #[test]
    fn periods_parse_and_reject() {
        let p: Period = serde_json::from_str("\"09:00-12:30\"").unwrap();
        assert_eq!(String::from(p), "09:00-12:30");
        for bad in ["\"12:00-09:00\"", "\"9-5\"", "\"09:00\"", "\"25:00-26:00\""] {
            assert!(serde_json::from_str::<Period>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn whole_set_validation() {
        let check = |resources: Vec<Resource>, expected: &[&str]| {
            let got = match ConfigSet::from_resources(resources).validate() {
                Ok(()) => vec![],
                Err(e) => e.0.into_iter().map(|e| e.field).collect::<Vec<_>>(),
            };
            assert_eq!(got, expected);
        };
        check(vec![site("SFO", "America/Los_Angeles")], &[]);
        check(vec![site("SFO", "Mars/Olympus")], &["site/SFO.time_zone"]);
        check(vec![queue("SFO", "A", "A")], &["queue/SFO/A.site"]);
        check(vec![site("SFO", "UTC"), service("SFO", "ACC", "A")], &["service/SFO/ACC.queue"]);
        check(
            vec![site("SFO", "UTC"), queue("SFO", "A", "A"), queue("SFO", "B", "A")],
            &["queue/SFO/B.letter"],
        );
        check(vec![site("SFO", "UTC"), queue("SFO", "A", "A"), service("SFO", "ACC", "A")], &[]);
    }

    #[test]
    fn appointment_policies_validate() {
        let check = |policy: serde_json::Value, expected: &[&str]| {
            let mut v =
                serde_json::json!({"site": "SFO", "code": "ACC", "name": "Accounts", "queue": "A"});
            if !policy.is_null() {
                v["appointments"] = policy;
            }
            let service: Service = serde_json::from_value(v).expect("service");
            let got = match Resource::Service(service).validate() {
                Ok(()) => vec![],
                Err(e) => e.0.into_iter().map(|e| e.field).collect::<Vec<_>>(),
            };
            assert_eq!(got, expected);
        };
        check(serde_json::Value::Null, &[]);
        check(serde_json::json!({"slot_minutes": 15, "capacity": 2}), &[]);
        check(serde_json::json!({"slot_minutes": 5, "capacity": 1}), &[]);
        check(serde_json::json!({"slot_minutes": 240, "capacity": 1000}), &[]);
        check(
            serde_json::json!({"slot_minutes": 4, "capacity": 1}),
            &["appointments.slot_minutes"],
        );
        check(
            serde_json::json!({"slot_minutes": 241, "capacity": 0}),
            &["appointments.slot_minutes", "appointments.capacity"],
        );
        check(
            serde_json::json!({"slot_minutes": 15, "capacity": 1, "check_in_early_minutes": 241}),
            &["appointments.check_in_early_minutes"],
        );
        let policy: AppointmentPolicy =
            serde_json::from_value(serde_json::json!({"slot_minutes": 15, "capacity": 1}))
                .expect("policy");
        assert_eq!((policy.check_in_early_minutes, policy.check_in_late_minutes), (30, 15));
        assert!(
            serde_json::from_value::<AppointmentPolicy>(
                serde_json::json!({"slot_minutes": 15, "capacity": 1, "slots": 3})
            )
            .is_err(),
            "unknown field"
        );
        // A service without a policy serializes as before (agents of older versions decode it).
        let plain = service("SFO", "ACC", "A");
        assert!(!serde_json::to_string(&plain).expect("json").contains("appointments"));
    }

    #[test]
    fn overlapping_hours_rejected() {
        let mut s = match site("SFO", "UTC") {
            Resource::Site(s) => s,
            _ => unreachable!(),
        };
        s.business_hours.insert(
            Day::Mon,
            vec![
                "09:00-12:00".to_owned().try_into().unwrap(),
                "11:00-13:00".to_owned().try_into().unwrap(),
            ],
        );
        let errs = Resource::Site(s).validate().unwrap_err();
        assert_eq!(errs.0[0].field, "business_hours.mon");
    }

    #[test]
    fn sites_keep_customer_data_unless_configured_to_share_it() {
        let site = |extra: serde_json::Value| {
            let mut v = serde_json::json!({"code": "SFO", "name": "SF", "time_zone": "UTC"});
            v.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
            serde_json::from_value::<Site>(v)
        };
        assert!(!site(serde_json::json!({})).expect("site").share_customer_data);
        let sharing = site(serde_json::json!({"share_customer_data": true})).expect("site");
        assert!(sharing.share_customer_data);
        assert!(site(serde_json::json!({"share_customer": true})).is_err(), "unknown field");
    }

    #[test]
    fn snapshot_contains_only_the_site() {
        let set = ConfigSet::from_resources(vec![
            site("SFO", "UTC"),
            site("CHI", "UTC"),
            queue("SFO", "A", "A"),
            queue("CHI", "A", "A"),
        ]);
        let snap = set.snapshot(&SiteCode::parse("SFO").unwrap(), 7).unwrap();
        assert_eq!(snap.revision, 7);
        assert_eq!(snap.queues.len(), 1);
        assert_eq!(snap.queues[0].site.as_str(), "SFO");
    }

    #[test]
    fn kinds_parse_loosely() {
        for (s, k) in [
            ("sites", ResourceKind::Site),
            ("service-points", ResourceKind::ServicePoint),
            ("staff", ResourceKind::StaffUser),
            ("work_profile", ResourceKind::WorkProfile),
        ] {
            assert_eq!(s.parse::<ResourceKind>().unwrap(), k);
        }
        assert!("widgets".parse::<ResourceKind>().is_err());
    }
}
