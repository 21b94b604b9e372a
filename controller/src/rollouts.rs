//! Remote upgrade rollouts at the controller: what an admin asks for, how it is
//! planned over the fleet, and the driver that moves it forward.
//!
//! The decisions are pure functions over state, unit-tested without I/O:
//! - `validate` checks a request's syntax (version, platform, targets, waves, window, limits)
//!   and `plan` resolves it against the configuration and the agents: the target sites in
//!   order, each with its current agent and the version it runs, cut into waves; a site
//!   without an agent, or already running the version, is `skipped` with the reason; a
//!   downgrade is refused unless allowed.
//! - `window_state` says whether a site's maintenance window is open at an instant (default:
//!   outside the site's business hours, in its own time zone; or an explicit local window
//!   that may cross midnight), until when, or when it opens.
//! - `decide` is one step of the driver for one rollout: which sites get `AGENT_UPGRADE`
//!   (with `switch_before` = the end of their window), which get `AGENT_UPGRADE_CANCEL`,
//!   which are skipped, and how the rollout's own state moves (next wave after the pause,
//!   halted on failures, completed). `stop` is the same for pause's siblings halt and abort.
//! - `apply_status` is what an agent's `AGENT_UPGRADE_STATUS` does to its site's row.
//!
//! The store (`store::rollouts`) applies a decision in one transaction; `run_driver` ticks
//! every `rollout_tick_ms` on one replica at a time (`Backend::ROLLOUT_LOCK`) with the
//! injected clock.
//!
//! **State machine.** A rollout is `running` → (`paused` ⇄ `running`) → `completed` |
//! `halted` (more than `max_failures` sites failed or rolled back) | `aborted` (by an admin);
//! the last three are final. A site is `pending` (not yet commanded, or commanded and not yet
//! reporting) → `downloading` → `staged` → `switching` → `healthy` | `rolled_back` | `failed`;
//! or `skipped` (no agent, already on the version, or cancelled before it switched); a site
//! not reached when the rollout stopped stays `pending`, untouched, with the reason. Waves run in order: wave n + 1 starts
//! `wave_pause_s` after every site of wave n is final; sites of later waves are never
//! commanded before that, so a halt leaves them untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use meridian_shared::clock::Clock;
use meridian_shared::config::{ConfigSet, Day, Site};
use meridian_shared::events::{UpgradePhase, UpgradeStatus};
use meridian_shared::releases;
use meridian_shared::{SiteCode, ValidationErrors};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::metrics::Metrics;
use crate::store::rollouts::{RolloutDetail, RolloutSite};
use crate::store::{AgentRecord, Store};

/// The waves when a request names none: one canary site, then the rest.
pub fn default_waves() -> Value {
    json!([{"sites": 1}, {"rest": true}])
}

/// Longest pause between waves (7 days).
pub const MAX_WAVE_PAUSE_S: u64 = 7 * 24 * 3600;
/// Bounds of a rollout's `health_timeout_s`.
pub const HEALTH_TIMEOUT_RANGE: std::ops::RangeInclusive<u32> =
    10..=meridian_shared::commands::MAX_HEALTH_TIMEOUT_S;
/// Most waves a rollout may have.
pub const MAX_WAVES: usize = 100;
/// How far ahead a window is looked for; a window that does not close within it is sent with
/// this horizon as its end (the driver sends again after it).
pub const WINDOW_HORIZON_DAYS: i64 = 7;

// ---------- vocabulary ----------

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Running,
    Paused,
    Halted,
    Aborted,
    Completed,
}

impl RolloutState {
    pub const ALL: [RolloutState; 5] =
        [Self::Running, Self::Paused, Self::Halted, Self::Aborted, Self::Completed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Halted => "halted",
            Self::Aborted => "aborted",
            Self::Completed => "completed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Halted, aborted and completed rollouts never change again; their sites are free for
    /// another rollout.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Halted | Self::Aborted | Self::Completed)
    }
}

/// Where one site of a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteState {
    Pending,
    Downloading,
    Staged,
    Switching,
    Healthy,
    RolledBack,
    Failed,
    Skipped,
}

impl SiteState {
    pub const ALL: [SiteState; 8] = [
        Self::Pending,
        Self::Downloading,
        Self::Staged,
        Self::Switching,
        Self::Healthy,
        Self::RolledBack,
        Self::Failed,
        Self::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Downloading => "downloading",
            Self::Staged => "staged",
            Self::Switching => "switching",
            Self::Healthy => "healthy",
            Self::RolledBack => "rolled_back",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Nothing more will happen to the site in this rollout.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Healthy | Self::RolledBack | Self::Failed | Self::Skipped)
    }

    /// Counts against `max_failures`.
    pub fn is_failure(self) -> bool {
        matches!(self, Self::RolledBack | Self::Failed)
    }

    fn of_phase(phase: UpgradePhase) -> Self {
        match phase {
            UpgradePhase::Downloading => Self::Downloading,
            UpgradePhase::Staged => Self::Staged,
            UpgradePhase::Switching => Self::Switching,
            UpgradePhase::Healthy => Self::Healthy,
            UpgradePhase::RolledBack => Self::RolledBack,
            UpgradePhase::Failed => Self::Failed,
        }
    }
}

/// Which sites a rollout targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// These sites, in this order (the first ones form the first waves).
    Sites(Vec<SiteCode>),
    /// Every site with this tag, by code.
    Tag(String),
    /// Every site, by code.
    All,
}

impl Targets {
    pub fn to_json(&self) -> Value {
        match self {
            Targets::Sites(s) => json!({"sites": s}),
            Targets::Tag(t) => json!({"tag": t}),
            Targets::All => json!({"all": true}),
        }
    }
}

/// How many of the sites to upgrade one wave takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaveSpec {
    /// This many sites (fewer if fewer are left).
    Sites(u32),
    /// This percentage of all the sites to upgrade, rounded up (at least one).
    Percent(u32),
    /// Every site left; only last.
    Rest,
}

impl WaveSpec {
    pub fn to_json(self) -> Value {
        match self {
            WaveSpec::Sites(n) => json!({"sites": n}),
            WaveSpec::Percent(p) => json!({"percent": p}),
            WaveSpec::Rest => json!({"rest": true}),
        }
    }
}

/// When, in a site's own time zone, its agent may switch to the new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Whenever the site is not open for business (its business hours and closed dates).
    OutsideBusinessHours,
    /// Every day from `start` to `end`, site time; crosses midnight when `end <= start`
    /// (`start == end`: the whole day, each window ending at the next `end`).
    Local { start: NaiveTime, end: NaiveTime },
}

impl Window {
    /// `null` for the default, else `{"start": "HH:MM", "end": "HH:MM"}`.
    pub fn to_json(self) -> Value {
        match self {
            Window::OutsideBusinessHours => Value::Null,
            Window::Local { start, end } => json!({
                "start": start.format("%H:%M").to_string(),
                "end": end.format("%H:%M").to_string(),
            }),
        }
    }

    /// The stored form back (anything unreadable is the default window).
    pub fn from_json(v: &Value) -> Window {
        parse_window(v).unwrap_or(Window::OutsideBusinessHours)
    }
}

// ---------- a request, checked ----------

/// `POST /api/v1/rollouts`, as sent. Every field is checked by `validate`, which reports every
/// problem with its field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// The release's version (semver), e.g. `1.4.0`.
    pub version: Option<String>,
    /// The release's platform, e.g. `x86_64-linux`.
    pub platform: Option<String>,
    /// `{"sites": ["SFO", …]}`, `{"tag": "west"}` or `{"all": true}`.
    #[schema(value_type = Option<Object>)]
    pub targets: Option<Value>,
    /// Default `[{"sites": 1}, {"rest": true}]`.
    #[schema(value_type = Option<Vec<Object>>)]
    pub waves: Option<Value>,
    /// Seconds between the end of a wave and the start of the next; default 0.
    pub wave_pause_s: Option<u64>,
    /// More failed or rolled back sites than this halt the rollout; default 0.
    pub max_failures: Option<u32>,
    /// `{"start": "HH:MM", "end": "HH:MM"}` in each site's time (crossing midnight when `end`
    /// is not after `start`; equal: all day); default (absent or null): outside the site's
    /// business hours.
    #[schema(value_type = Option<Object>)]
    pub window: Option<Value>,
    /// Allow sites to go to a lower version than they run.
    pub allow_downgrade: Option<bool>,
    /// How long a switched agent has to come up healthy before its watchdog rolls back;
    /// default the controller's `rollout_health_timeout_s`.
    pub health_timeout_s: Option<u32>,
}

/// A rollout request that passed `validate`.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutSpec {
    pub version: semver::Version,
    pub platform: String,
    pub targets: Targets,
    pub waves: Vec<WaveSpec>,
    pub wave_pause_s: u64,
    pub max_failures: u32,
    pub window: Window,
    pub allow_downgrade: bool,
    pub health_timeout_s: Option<u32>,
}

impl RolloutSpec {
    pub fn waves_json(&self) -> Value {
        Value::Array(self.waves.iter().map(|w| w.to_json()).collect())
    }
}

/// Checks a request completely (without the configuration): every problem is reported with its
/// field.
pub fn validate(req: &CreateRequest) -> Result<RolloutSpec, ValidationErrors> {
    let mut errs = ValidationErrors::default();
    let version = match req.version.as_deref().map(str::trim) {
        None | Some("") => {
            errs.push("version", "required: the release version to roll out, like 1.4.0");
            None
        }
        Some(v) => match releases::parse_version(v) {
            Ok(v) => Some(v),
            Err(e) => {
                errs.push("version", release_error(e));
                None
            }
        },
    };
    let platform = match req.platform.as_deref().map(str::trim) {
        None | Some("") => {
            errs.push("platform", "required: the agents' platform, like x86_64-linux");
            None
        }
        Some(p) => match releases::parse_platform(p) {
            Ok(_) => Some(p.to_owned()),
            Err(e) => {
                errs.push("platform", release_error(e));
                None
            }
        },
    };
    let targets = match &req.targets {
        None | Some(Value::Null) => {
            errs.push(
                "targets",
                r#"required: {"sites": ["SFO", …]}, {"tag": "TAG"} or {"all": true}"#,
            );
            None
        }
        Some(v) => parse_targets(v, &mut errs),
    };
    let waves = parse_waves(req.waves.as_ref().unwrap_or(&default_waves()), &mut errs);
    let wave_pause_s = req.wave_pause_s.unwrap_or(0);
    if wave_pause_s > MAX_WAVE_PAUSE_S {
        errs.push("wave_pause_s", format!("must be at most {MAX_WAVE_PAUSE_S} (7 days)"));
    }
    let window = match &req.window {
        None | Some(Value::Null) => Some(Window::OutsideBusinessHours),
        Some(v) => match parse_window(v) {
            Ok(w) => Some(w),
            Err(e) => {
                errs.push("window", e);
                None
            }
        },
    };
    if let Some(t) = req.health_timeout_s
        && !HEALTH_TIMEOUT_RANGE.contains(&t)
    {
        errs.push(
            "health_timeout_s",
            format!(
                "must be {}-{} seconds",
                HEALTH_TIMEOUT_RANGE.start(),
                HEALTH_TIMEOUT_RANGE.end()
            ),
        );
    }
    match (version, platform, targets, waves, window) {
        (Some(version), Some(platform), Some(targets), Some(waves), Some(window))
            if errs.is_empty() =>
        {
            Ok(RolloutSpec {
                version,
                platform,
                targets,
                waves,
                wave_pause_s,
                max_failures: req.max_failures.unwrap_or(0),
                window,
                allow_downgrade: req.allow_downgrade.unwrap_or(false),
                health_timeout_s: req.health_timeout_s,
            })
        }
        _ => Err(errs),
    }
}

/// What a refused version or platform says (without the error's field prefix).
fn release_error(e: releases::ReleaseError) -> String {
    match e {
        releases::ReleaseError::Malformed(_, why) => why,
        other => other.to_string(),
    }
}

fn parse_targets(v: &Value, errs: &mut ValidationErrors) -> Option<Targets> {
    const FORMS: &str = r#"use {"sites": ["SFO", …]}, {"tag": "TAG"} or {"all": true}"#;
    let Some(obj) = v.as_object().filter(|o| o.len() == 1) else {
        errs.push("targets", format!("must be an object with exactly one key: {FORMS}"));
        return None;
    };
    let (key, value) = obj.iter().next()?;
    match key.as_str() {
        "sites" => {
            let Some(items) = value.as_array().filter(|a| !a.is_empty()) else {
                errs.push("targets.sites", "must be a non-empty list of site codes");
                return None;
            };
            let mut sites = Vec::new();
            let mut seen = BTreeSet::new();
            let mut ok = true;
            for (i, item) in items.iter().enumerate() {
                let field = format!("targets.sites[{i}]");
                match item.as_str().map(|s| SiteCode::parse(&s.trim().to_uppercase())) {
                    Some(Ok(code)) => {
                        if !seen.insert(code.clone()) {
                            errs.push(field, format!("{code} is listed twice"));
                            ok = false;
                        }
                        sites.push(code);
                    }
                    Some(Err(e)) => {
                        errs.push(field, e.message);
                        ok = false;
                    }
                    None => {
                        errs.push(field, "must be a site code");
                        ok = false;
                    }
                }
            }
            ok.then_some(Targets::Sites(sites))
        }
        "tag" => match value.as_str().map(str::trim) {
            Some(tag) if !tag.is_empty() && tag.len() <= 64 => Some(Targets::Tag(tag.to_owned())),
            _ => {
                errs.push("targets.tag", "must be a tag (1-64 characters)");
                None
            }
        },
        "all" => {
            if value == &Value::Bool(true) {
                Some(Targets::All)
            } else {
                errs.push("targets.all", "must be true");
                None
            }
        }
        other => {
            errs.push("targets", format!("unknown key {other:?}: {FORMS}"));
            None
        }
    }
}

fn parse_waves(v: &Value, errs: &mut ValidationErrors) -> Option<Vec<WaveSpec>> {
    const FORMS: &str = r#"use {"sites": N}, {"percent": P} or {"rest": true}"#;
    let Some(items) = v.as_array().filter(|a| !a.is_empty() && a.len() <= MAX_WAVES) else {
        errs.push("waves", format!("must be a list of 1-{MAX_WAVES} waves: {FORMS}"));
        return None;
    };
    let mut waves = Vec::new();
    let before = errs.0.len();
    for (i, item) in items.iter().enumerate() {
        let field = format!("waves[{i}]");
        let Some((key, value)) =
            item.as_object().filter(|o| o.len() == 1).and_then(|o| o.iter().next())
        else {
            errs.push(field, format!("must be an object with exactly one key: {FORMS}"));
            continue;
        };
        let wave = match key.as_str() {
            "sites" => match value.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) if n >= 1 => WaveSpec::Sites(n),
                _ => {
                    errs.push(
                        format!("{field}.sites"),
                        "must be a whole number of sites, at least 1",
                    );
                    continue;
                }
            },
            "percent" => match value.as_u64() {
                Some(p @ 1..=100) => WaveSpec::Percent(p as u32),
                _ => {
                    errs.push(format!("{field}.percent"), "must be a whole percentage, 1-100");
                    continue;
                }
            },
            "rest" => {
                if value != &Value::Bool(true) {
                    errs.push(format!("{field}.rest"), "must be true");
                    continue;
                }
                if i + 1 != items.len() {
                    errs.push(field, "a rest wave takes every site left: it must be the last");
                    continue;
                }
                WaveSpec::Rest
            }
            other => {
                errs.push(field, format!("unknown key {other:?}: {FORMS}"));
                continue;
            }
        };
        waves.push(wave);
    }
    (errs.0.len() == before).then_some(waves)
}

fn parse_window(v: &Value) -> Result<Window, String> {
    const FORM: &str =
        r#"use {"start": "HH:MM", "end": "HH:MM"} (site time), or null for outside business hours"#;
    let Some(obj) = v.as_object() else {
        return Err(format!("must be an object: {FORM}"));
    };
    if let Some(k) = obj.keys().find(|k| *k != "start" && *k != "end") {
        return Err(format!("unknown key {k:?}: {FORM}"));
    }
    let time = |key: &str| -> Result<NaiveTime, String> {
        let s = obj
            .get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{key} is required: {FORM}"))?;
        NaiveTime::parse_from_str(s.trim(), "%H:%M")
            .map_err(|_| format!("{key} {s:?} is not a time: use HH:MM (00:00-23:59)"))
    };
    let (start, end) = (time("start")?, time("end")?);
    Ok(Window::Local { start, end })
}

// ---------- planning ----------

/// One target site as planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedSite {
    pub site: SiteCode,
    /// Order within the rollout (waves are cut in this order), from 1.
    pub position: u32,
    /// From 1; none for a skipped site.
    pub wave: Option<u32>,
    pub agent_id: Option<String>,
    /// `Pending` or `Skipped`.
    pub state: SiteState,
    pub reason: Option<String>,
    /// What the site's agent last reported running.
    pub from_version: Option<String>,
}

/// Resolves the targets against the configuration and the agents and cuts the waves. Refuses
/// unknown sites, a tag no site has, a downgrade without `allow_downgrade`, and waves that
/// leave sites out.
pub fn plan(
    spec: &RolloutSpec,
    config: &ConfigSet,
    agents: &[AgentRecord],
) -> Result<Vec<PlannedSite>, ValidationErrors> {
    let mut errs = ValidationErrors::default();
    let sites: Vec<&Site> = match &spec.targets {
        Targets::Sites(codes) => {
            let unknown: Vec<&str> =
                codes.iter().filter(|c| config.site(c).is_none()).map(SiteCode::as_str).collect();
            if !unknown.is_empty() {
                errs.push("targets.sites", format!("unknown site(s): {}", unknown.join(", ")));
            }
            codes.iter().filter_map(|c| config.site(c)).collect()
        }
        Targets::Tag(tag) => {
            let mut s: Vec<&Site> = config.sites().filter(|s| s.tags.contains(tag)).collect();
            s.sort_by(|a, b| a.code.cmp(&b.code));
            if s.is_empty() {
                errs.push("targets.tag", format!("no site has the tag {tag:?}"));
            }
            s
        }
        Targets::All => {
            let mut s: Vec<&Site> = config.sites().collect();
            s.sort_by(|a, b| a.code.cmp(&b.code));
            if s.is_empty() {
                errs.push("targets", "no site is configured");
            }
            s
        }
    };
    if !errs.is_empty() {
        return Err(errs);
    }
    let target = &spec.version;
    let mut planned = Vec::new();
    let mut downgrades = Vec::new();
    for (i, site) in sites.iter().enumerate() {
        let agent = current_agent(agents, &site.code);
        let mut p = PlannedSite {
            site: site.code.clone(),
            position: i as u32 + 1,
            wave: None,
            agent_id: agent.map(|a| a.id.to_string()),
            state: SiteState::Pending,
            reason: None,
            from_version: agent.map(|a| a.version.clone()),
        };
        match agent.map(|a| (a, releases::parse_version(a.version.trim()))) {
            None => {
                p.state = SiteState::Skipped;
                p.reason = Some("no agent is enrolled for this site".into());
            }
            Some((_, Ok(running))) if running.cmp_precedence(target).is_eq() => {
                p.state = SiteState::Skipped;
                p.reason = Some(format!("already runs {target}"));
            }
            Some((a, Ok(running)))
                if running.cmp_precedence(target).is_gt() && !spec.allow_downgrade =>
            {
                downgrades.push(format!("{} runs {}", site.code, a.version));
            }
            // A version that is not semver (a development build) cannot be compared: the
            // agent decides.
            Some(_) => {}
        }
        planned.push(p);
    }
    if !downgrades.is_empty() {
        errs.push(
            "version",
            format!(
                "{target} would be a downgrade ({}); set allow_downgrade to roll it out anyway",
                downgrades.join(", ")
            ),
        );
        return Err(errs);
    }
    let eligible: Vec<usize> =
        (0..planned.len()).filter(|&i| planned[i].state == SiteState::Pending).collect();
    let total = eligible.len() as u64;
    let mut next = 0usize;
    let mut wave = 0u32;
    for spec_wave in &spec.waves {
        let left = (eligible.len() - next) as u64;
        let take = match *spec_wave {
            WaveSpec::Sites(n) => u64::from(n).min(left),
            WaveSpec::Percent(p) => (total * u64::from(p)).div_ceil(100).max(1).min(left),
            WaveSpec::Rest => left,
        };
        if take == 0 {
            continue;
        }
        wave += 1;
        for &i in &eligible[next..next + take as usize] {
            planned[i].wave = Some(wave);
        }
        next += take as usize;
    }
    if next < eligible.len() {
        errs.push(
            "waves",
            format!(
                "the waves take {next} of the {} sites to upgrade; end them with {{\"rest\": true}}",
                eligible.len()
            ),
        );
        return Err(errs);
    }
    Ok(planned)
}

/// The site's agent: the newest one not revoked.
pub fn current_agent<'a>(agents: &'a [AgentRecord], site: &SiteCode) -> Option<&'a AgentRecord> {
    agents
        .iter()
        .filter(|a| &a.site == site && a.revoked_at.is_none())
        .max_by_key(|a| a.enrolled_at)
}

// ---------- maintenance windows ----------

/// A site's maintenance window at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum WindowState {
    /// Open now, until `until` (the `switch_before` of a command sent now).
    Open { until: DateTime<Utc> },
    /// Closed now; opens at `opens_at`.
    Closed { opens_at: DateTime<Utc> },
    /// The site cannot be judged (no longer configured, unknown time zone).
    Unavailable { reason: String },
}

/// Whether `site`'s window is open at `now`, in the site's own time zone.
pub fn window_state(window: Window, site: &Site, now: DateTime<Utc>) -> WindowState {
    let tz = match site.tz() {
        Ok(tz) => tz,
        Err(e) => return WindowState::Unavailable { reason: e },
    };
    let today = now.with_timezone(&tz).date_naive();
    match window {
        Window::OutsideBusinessHours => {
            let busy = business_intervals(site, tz, today);
            if let Some(&(_, end)) = busy.iter().find(|(s, e)| *s <= now && now < *e) {
                return WindowState::Closed { opens_at: end };
            }
            let until = busy
                .iter()
                .map(|(s, _)| *s)
                .find(|s| *s > now)
                .unwrap_or(now + Duration::days(WINDOW_HORIZON_DAYS));
            WindowState::Open { until }
        }
        Window::Local { start, end } => {
            let mut next_start = None;
            for d in -1..=1 {
                let Some(day) = today.checked_add_signed(Duration::days(d)) else { continue };
                let end_day = if end > start { day } else { day.succ_opt().unwrap_or(day) };
                let (Some(s), Some(e)) = (local(tz, day, start), local(tz, end_day, end)) else {
                    continue;
                };
                if s >= e {
                    continue;
                }
                if s <= now && now < e {
                    return WindowState::Open { until: e };
                }
                if s > now && next_start.is_none_or(|n| s < n) {
                    next_start = Some(s);
                }
            }
            match next_start {
                Some(opens_at) => WindowState::Closed { opens_at },
                // Unreachable for a valid window (one starts every day); judged unavailable
                // rather than open.
                None => WindowState::Unavailable { reason: "the window never opens".into() },
            }
        }
    }
}

/// The site's opening periods from the day before `today` to the horizon, as merged UTC
/// intervals (closed dates have none).
fn business_intervals(
    site: &Site,
    tz: Tz,
    today: NaiveDate,
) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    let mut v = Vec::new();
    for d in -1..=WINDOW_HORIZON_DAYS + 1 {
        let Some(day) = today.checked_add_signed(Duration::days(d)) else { continue };
        if site.closed_dates.contains(&day) {
            continue;
        }
        for p in site.business_hours.get(&Day::from(day.weekday())).into_iter().flatten() {
            if let (Some(s), Some(e)) = (local(tz, day, p.open), local(tz, day, p.close))
                && s < e
            {
                v.push((s, e));
            }
        }
    }
    v.sort();
    let mut merged: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    for (s, e) in v {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

/// A site-local wall-clock time as an instant: the earlier one when the clocks pass it twice,
/// the first instant after the jump when they skip it.
fn local(tz: Tz, day: NaiveDate, time: NaiveTime) -> Option<DateTime<Utc>> {
    let at = day.and_time(time);
    tz.from_local_datetime(&at)
        .earliest()
        .or_else(|| tz.from_local_datetime(&(at + Duration::hours(1))).earliest())
        .map(|t| t.with_timezone(&Utc))
}

// ---------- driving ----------

/// Send `AGENT_UPGRADE` to the site's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendUpgrade {
    pub site: String,
    pub agent_id: String,
    /// The end of the site's current window.
    pub switch_before: DateTime<Utc>,
}

/// Send `AGENT_UPGRADE_CANCEL` to the agent the site's upgrade went to; the site is then
/// `skipped` with `reason` (a final report from the agent still counts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelUpgrade {
    pub site: String,
    pub agent_id: String,
    pub reason: String,
}

/// The rollout's own columns after a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutUpdate {
    pub state: RolloutState,
    pub current_wave: u32,
    pub next_wave_at: Option<DateTime<Utc>>,
    pub halted_reason: Option<String>,
}

/// What one step does; empty when nothing is due.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    pub sends: Vec<SendUpgrade>,
    pub cancels: Vec<CancelUpgrade>,
    /// Sites never commanded that will not be (no agent, no longer configured): `skipped`
    /// with the reason.
    pub skips: Vec<(String, String)>,
    /// Sites never commanded when the rollout stopped: they stay `pending`, untouched, with
    /// the reason.
    pub untouched: Vec<(String, String)>,
    pub rollout: Option<RolloutUpdate>,
}

impl Decision {
    pub fn is_empty(&self) -> bool {
        self.sends.is_empty()
            && self.cancels.is_empty()
            && self.skips.is_empty()
            && self.untouched.is_empty()
            && self.rollout.is_none()
    }
}

/// One step of the driver for `r` at `now`. `agents` maps each site to its current agent;
/// `window` gives a site's window state at `now`.
pub fn decide(
    r: &RolloutDetail,
    agents: &BTreeMap<String, String>,
    window: &dyn Fn(&str) -> WindowState,
    now: DateTime<Utc>,
) -> Decision {
    let ro = &r.rollout;
    if ro.state != RolloutState::Running {
        return Decision::default();
    }
    let failures: Vec<&RolloutSite> = r.sites.iter().filter(|s| s.state.is_failure()).collect();
    if failures.len() as u64 > u64::from(ro.max_failures) {
        let list: Vec<String> = failures
            .iter()
            .map(|s| match &s.reason {
                Some(why) => format!("{} {} ({})", s.site, s.state.as_str(), why),
                None => format!("{} {}", s.site, s.state.as_str()),
            })
            .collect();
        let reason = format!(
            "{} site(s) failed or rolled back, more than max_failures {}: {}",
            failures.len(),
            ro.max_failures,
            list.join("; ")
        );
        return stop(r, RolloutState::Halted, &reason);
    }
    let mut d = Decision::default();
    let mut wave = ro.current_wave;
    let mut next_wave_at = ro.next_wave_at;
    let pause = Duration::seconds(ro.wave_pause_s.min(MAX_WAVE_PAUSE_S) as i64);
    let completed = loop {
        if wave > ro.wave_count {
            break true;
        }
        let in_wave: Vec<&RolloutSite> = r.sites.iter().filter(|s| s.wave == Some(wave)).collect();
        if in_wave.iter().all(|s| s.state.is_final()) {
            if wave >= ro.wave_count {
                break true;
            }
            match next_wave_at {
                Some(t) if t <= now => {
                    wave += 1;
                    next_wave_at = None;
                    continue;
                }
                Some(_) => break false,
                None if pause.is_zero() => {
                    wave += 1;
                    continue;
                }
                None => {
                    next_wave_at = Some(now + pause);
                    break false;
                }
            }
        }
        for s in in_wave.into_iter().filter(|s| !s.state.is_final()) {
            step_site(s, agents.get(&s.site), window, now, &mut d);
        }
        break false;
    };
    if completed {
        d.rollout = Some(RolloutUpdate {
            state: RolloutState::Completed,
            current_wave: wave.min(ro.wave_count),
            next_wave_at: None,
            halted_reason: None,
        });
    } else if wave != ro.current_wave || next_wave_at != ro.next_wave_at {
        d.rollout = Some(RolloutUpdate {
            state: RolloutState::Running,
            current_wave: wave,
            next_wave_at,
            halted_reason: None,
        });
    }
    d
}

/// A site of the current wave that is not final: send, send again, skip, or wait.
fn step_site(
    s: &RolloutSite,
    current: Option<&String>,
    window: &dyn Fn(&str) -> WindowState,
    now: DateTime<Utc>,
    d: &mut Decision,
) {
    let commanded = s.command_seq.is_some();
    let replaced = current.is_some() && current != s.agent_id.as_ref();
    match s.state {
        // Switching: its agent reports how it ends, unless the site got a new agent
        // meanwhile (new hardware, enrolled from scratch), which gets the upgrade itself.
        SiteState::Switching => {
            if let (true, WindowState::Open { until }, Some(agent)) =
                (replaced, window(&s.site), current)
            {
                d.sends.push(SendUpgrade {
                    site: s.site.clone(),
                    agent_id: agent.clone(),
                    switch_before: until,
                });
            }
        }
        SiteState::Pending if !commanded => match (window(&s.site), current) {
            (WindowState::Unavailable { reason }, _) => {
                d.skips.push((s.site.clone(), format!("not upgraded: {reason}")));
            }
            (_, None) => d.skips.push((
                s.site.clone(),
                "not upgraded: the site has no agent (revoked, none enrolled since)".into(),
            )),
            (WindowState::Open { until }, Some(agent)) => d.sends.push(SendUpgrade {
                site: s.site.clone(),
                agent_id: agent.clone(),
                switch_before: until,
            }),
            (WindowState::Closed { .. }, Some(_)) => {}
        },
        SiteState::Pending | SiteState::Downloading | SiteState::Staged => {
            // Sent before: again when the site got a new agent (the old one's log is gone),
            // or when the window it was sent for is over and a new one is open (the agent
            // kept it staged).
            let expired = s.switch_before.is_none_or(|t| t <= now);
            if let (true, WindowState::Open { until }, Some(agent)) =
                (replaced || expired, window(&s.site), current)
            {
                d.sends.push(SendUpgrade {
                    site: s.site.clone(),
                    agent_id: agent.clone(),
                    switch_before: until,
                });
            }
        }
        SiteState::Healthy | SiteState::RolledBack | SiteState::Failed | SiteState::Skipped => {}
    }
}

/// Stops a rollout (halt or abort): what has been sent and has not switched is cancelled (and
/// `skipped`), sites never commanded stay `pending` and are never touched (the reason says
/// why), switching sites are left to report.
pub fn stop(r: &RolloutDetail, to: RolloutState, reason: &str) -> Decision {
    let word = to.as_str();
    let mut d = Decision::default();
    for s in r.sites.iter().filter(|s| !s.state.is_final()) {
        match (s.state, s.command_seq, &s.agent_id) {
            (SiteState::Switching, _, _) => {}
            (_, Some(_), Some(agent)) => d.cancels.push(CancelUpgrade {
                site: s.site.clone(),
                agent_id: agent.clone(),
                reason: format!("upgrade cancelled: the rollout was {word}"),
            }),
            _ => {
                d.untouched.push((s.site.clone(), format!("not upgraded: the rollout was {word}")))
            }
        }
    }
    d.rollout = Some(RolloutUpdate {
        state: to,
        current_wave: r.rollout.current_wave,
        next_wave_at: None,
        halted_reason: Some(reason.to_owned()),
    });
    d
}

/// What an agent's `AGENT_UPGRADE_STATUS` does to its site's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusEffect {
    /// Set the site's state and reason.
    Apply { state: SiteState, reason: Option<String> },
    /// A report that changes nothing (the site is already final, a late progress report after
    /// a cancel): not an error.
    Ignore(String),
    /// A report that cannot be about this site (kept in quarantine with the reason).
    Refuse(String),
}

/// Applies `status` to `site` of a rollout of `version`.
pub fn apply_status(site: &RolloutSite, version: &str, status: &UpgradeStatus) -> StatusEffect {
    if status.version != version {
        return StatusEffect::Refuse(format!(
            "reports version {} but rollout {} rolls out {version}",
            status.version, site.rollout_id
        ));
    }
    let cancelled = site.cancel_seq.is_some();
    if site.command_seq.is_none() && !cancelled {
        return StatusEffect::Refuse(format!(
            "site {} was never sent rollout {}",
            site.site, site.rollout_id
        ));
    }
    let next = SiteState::of_phase(status.phase);
    if site.state.is_final() && !(site.state == SiteState::Skipped && cancelled) {
        return StatusEffect::Ignore(format!("the site is already {}", site.state.as_str()));
    }
    if cancelled && site.state == SiteState::Skipped && !next.is_final() {
        return StatusEffect::Ignore("progress after the upgrade was cancelled".into());
    }
    match status.phase {
        UpgradePhase::Healthy if status.running_version != version => StatusEffect::Apply {
            state: SiteState::Failed,
            reason: Some(format!(
                "reported healthy while running {}, not {version}",
                status.running_version
            )),
        },
        UpgradePhase::Healthy => StatusEffect::Apply { state: SiteState::Healthy, reason: None },
        UpgradePhase::RolledBack | UpgradePhase::Failed => StatusEffect::Apply {
            state: next,
            reason: Some(status.reason.clone().unwrap_or_else(|| match status.phase {
                UpgradePhase::RolledBack => "rolled back by the agent's watchdog".to_owned(),
                _ => "the agent reported a failure without a reason".to_owned(),
            })),
        },
        _ => StatusEffect::Apply { state: next, reason: None },
    }
}

/// The `AGENT_UPGRADE` command of `r` for a site whose window ends at `switch_before`.
pub fn upgrade_command(
    r: &crate::store::rollouts::Rollout,
    release: meridian_shared::releases::ReleaseManifest,
    switch_before: DateTime<Utc>,
    default_health_timeout_s: u32,
) -> (&'static str, Vec<u8>) {
    let cmd = meridian_shared::commands::ControllerCommand::Upgrade(Box::new(
        meridian_shared::commands::UpgradeCommand {
            rollout_id: r.id,
            release,
            allow_downgrade: r.allow_downgrade,
            switch_before,
            health_timeout_s: r.health_timeout_s.unwrap_or(default_health_timeout_s),
        },
    ));
    (cmd.kind(), cmd.payload())
}

/// The `AGENT_UPGRADE_CANCEL` command of rollout `id`.
pub fn cancel_command(id: uuid::Uuid) -> (&'static str, Vec<u8>) {
    let cmd = meridian_shared::commands::ControllerCommand::CancelUpgrade(
        meridian_shared::commands::UpgradeCancel { rollout_id: id },
    );
    (cmd.kind(), cmd.payload())
}

// ---------- the driver task ----------

/// What the driver needs besides the store.
#[derive(Debug, Clone, Copy)]
pub struct DriverSettings {
    /// `health_timeout_s` of rollouts that do not set one (0: each agent's own setting).
    pub health_timeout_s: u32,
}

/// What one tick did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TickReport {
    pub upgrades_sent: u32,
    pub cancels_sent: u32,
    pub sites_skipped: u32,
    /// Sites left untouched because their rollout stopped.
    pub sites_untouched: u32,
    /// Rollouts whose state, wave or pause changed.
    pub rollouts_changed: u32,
}

/// The window of `site` under `window`, from the configuration.
pub fn site_window(
    config: &ConfigSet,
    window: Window,
    site: &str,
    now: DateTime<Utc>,
) -> WindowState {
    match SiteCode::parse(site).ok().and_then(|c| config.site(&c).cloned()) {
        Some(s) => window_state(window, &s, now),
        None => WindowState::Unavailable { reason: format!("site {site} is no longer configured") },
    }
}

/// One pass over the running rollouts: for each, a decision on a plain read; only when it
/// would do something, the store takes the rollout's locks, decides again on what it holds and
/// applies it in one transaction.
pub async fn tick(
    store: &dyn Store,
    cache: &crate::appointments::sync::ConfigCache,
    settings: DriverSettings,
    now: DateTime<Utc>,
) -> Result<TickReport> {
    let mut report = TickReport::default();
    let running = store.running_rollouts().await?;
    if running.is_empty() {
        return Ok(report);
    }
    let config = cache.get(store).await?;
    let agents = current_agents(&store.list_agents().await?);
    for r in running {
        let window = Window::from_json(&r.rollout.window);
        let windows = |site: &str| site_window(&config, window, site, now);
        if decide(&r, &agents, &windows, now).is_empty() {
            continue;
        }
        let decide_locked = |held: &RolloutDetail, agents: &BTreeMap<String, String>| {
            decide(held, agents, &windows, now)
        };
        if let Some(done) = store
            .drive_rollout(r.rollout.id, now, settings.health_timeout_s, &decide_locked)
            .await?
        {
            report.upgrades_sent += done.sends.len() as u32;
            report.cancels_sent += done.cancels.len() as u32;
            report.sites_skipped += done.skips.len() as u32;
            report.sites_untouched += done.untouched.len() as u32;
            if let Some(u) = &done.rollout {
                report.rollouts_changed += 1;
                tracing::info!(rollout = %r.rollout.id, state = u.state.as_str(), wave = u.current_wave,
                    reason = u.halted_reason.as_deref().unwrap_or(""), "rollout moved");
            }
        }
    }
    Ok(report)
}

/// Each site's current agent (store key), from a listing of agents.
pub fn current_agents(agents: &[AgentRecord]) -> BTreeMap<String, String> {
    let mut newest: BTreeMap<String, &AgentRecord> = BTreeMap::new();
    for a in agents.iter().filter(|a| a.revoked_at.is_none()) {
        let e = newest.entry(a.site.to_string()).or_insert(a);
        if a.enrolled_at > e.enrolled_at {
            *e = a;
        }
    }
    newest.into_iter().map(|(site, a)| (site, a.id.to_string())).collect()
}

/// Runs `tick` every `every` with `clock` until `shutdown`, waking the sessions when commands
/// were added, and refreshes the rollout metrics after each tick.
pub async fn run_driver(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    every: StdDuration,
    settings: DriverSettings,
    wake: Arc<tokio::sync::watch::Sender<u64>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let cache = crate::appointments::sync::ConfigCache::default();
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        match tick(store.as_ref(), &cache, settings, clock.now()).await {
            Ok(report) => {
                if report.upgrades_sent + report.cancels_sent > 0 {
                    wake.send_modify(|n| *n = n.wrapping_add(1));
                }
                if report != TickReport::default() {
                    tracing::info!(?report, "rollout driver tick");
                }
            }
            Err(e) => tracing::warn!(error = %e, "rollout driver tick failed"),
        }
        match store.rollout_summary().await {
            Ok(summary) => metrics.set_rollout_summary(&summary),
            Err(e) => tracing::warn!(error = %e, "rollout metrics not refreshed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::rollouts::Rollout;
    use meridian_shared::AgentId;
    use meridian_shared::config::Resource;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect("time").with_timezone(&Utc)
    }

    fn site(v: Value) -> Site {
        match serde_json::from_value::<Resource>(v).expect("site resource") {
            Resource::Site(s) => s,
            other => panic!("not a site: {other:?}"),
        }
    }

    /// San Francisco, weekdays 09:00-12:00 and 13:00-17:00, closed Tuesday 2026-03-10.
    fn sfo() -> Site {
        let week: serde_json::Map<String, Value> = ["mon", "tue", "wed", "thu", "fri"]
            .iter()
            .map(|d| ((*d).to_owned(), json!(["09:00-12:00", "13:00-17:00"])))
            .collect();
        site(json!({"kind": "site", "code": "SFO", "name": "San Francisco",
            "time_zone": "America/Los_Angeles", "business_hours": week,
            "closed_dates": ["2026-03-10"], "tags": ["west"]}))
    }

    #[test]
    fn the_default_window_is_outside_business_hours_in_the_sites_zone() {
        let s = sfo();
        let check = |now: &str, want: WindowState| {
            assert_eq!(window_state(Window::OutsideBusinessHours, &s, at(now)), want, "{now}");
        };
        let open = |until: &str| WindowState::Open { until: at(until) };
        let closed = |opens: &str| WindowState::Closed { opens_at: at(opens) };
        // Monday 2026-03-09 (PDT, UTC-7): 10:00 local is business, the window opens at noon.
        check("2026-03-09T17:00:00Z", closed("2026-03-09T19:00:00Z"));
        // The lunch break is outside business hours.
        check("2026-03-09T19:30:00Z", open("2026-03-09T20:00:00Z"));
        // Monday evening: open until Wednesday 09:00, Tuesday is a closed date.
        check("2026-03-10T01:00:00Z", open("2026-03-11T16:00:00Z"));
        // Friday evening: open the whole weekend.
        check("2026-03-14T01:00:00Z", open("2026-03-16T16:00:00Z"));
        // At the instant business ends the window opens; at the instant it starts it closes.
        check("2026-03-10T00:00:00Z", open("2026-03-11T16:00:00Z"));
        check("2026-03-11T16:00:00Z", closed("2026-03-11T19:00:00Z"));
        // The weekend of the spring-forward (2026-03-08): Friday 17:00 PST is 01:00 UTC,
        // Monday 09:00 is PDT.
        check("2026-03-07T12:00:00Z", open("2026-03-09T16:00:00Z"));
        // A site with no business hours is always open (up to the horizon).
        let mut always = sfo();
        always.business_hours.clear();
        let now = at("2026-03-09T17:00:00Z");
        assert_eq!(
            window_state(Window::OutsideBusinessHours, &always, now),
            WindowState::Open { until: now + Duration::days(WINDOW_HORIZON_DAYS) }
        );
        let mut lost = sfo();
        lost.time_zone = "Mars/Olympus".into();
        assert!(matches!(
            window_state(Window::OutsideBusinessHours, &lost, now),
            WindowState::Unavailable { .. }
        ));
    }

    #[test]
    fn an_explicit_window_is_local_and_may_cross_midnight() {
        let paris = site(
            json!({"kind": "site", "code": "PAR", "name": "Paris", "time_zone": "Europe/Paris"}),
        );
        let hm = |s: &str| NaiveTime::parse_from_str(s, "%H:%M").expect("time");
        let night = Window::Local { start: hm("22:00"), end: hm("04:00") };
        let check = |w: Window, now: &str, want: WindowState| {
            assert_eq!(window_state(w, &paris, at(now)), want, "{now}");
        };
        // Paris is UTC+1 in winter.
        check(
            night,
            "2026-01-15T22:30:00Z",
            WindowState::Open { until: at("2026-01-16T03:00:00Z") },
        );
        check(
            night,
            "2026-01-16T02:00:00Z",
            WindowState::Open { until: at("2026-01-16T03:00:00Z") },
        );
        check(
            night,
            "2026-01-16T03:00:00Z",
            WindowState::Closed { opens_at: at("2026-01-16T21:00:00Z") },
        );
        check(
            night,
            "2026-01-16T11:00:00Z",
            WindowState::Closed { opens_at: at("2026-01-16T21:00:00Z") },
        );
        // Equal ends: the whole day, each window ending at the next midnight.
        let all_day = Window::Local { start: hm("00:00"), end: hm("00:00") };
        check(
            all_day,
            "2026-01-16T11:00:00Z",
            WindowState::Open { until: at("2026-01-16T23:00:00Z") },
        );
        check(
            all_day,
            "2026-01-16T22:59:59Z",
            WindowState::Open { until: at("2026-01-16T23:00:00Z") },
        );
        check(
            all_day,
            "2026-01-16T23:00:00Z",
            WindowState::Open { until: at("2026-01-17T23:00:00Z") },
        );
        let early = Window::Local { start: hm("01:00"), end: hm("05:00") };
        check(
            early,
            "2026-01-16T00:30:00Z",
            WindowState::Open { until: at("2026-01-16T04:00:00Z") },
        );
        // The night Paris springs forward (2026-03-29, 02:00 → 03:00): four hours of wall
        // clock are three hours long.
        check(
            early,
            "2026-03-29T00:30:00Z",
            WindowState::Open { until: at("2026-03-29T03:00:00Z") },
        );
        // Business hours do not matter for an explicit window.
        let mut busy = sfo();
        busy.time_zone = "Europe/Paris".into();
        assert_eq!(
            window_state(early, &busy, at("2026-03-09T09:00:00Z")),
            WindowState::Closed { opens_at: at("2026-03-10T00:00:00Z") }
        );
    }

    fn check_invalid(req: Value, fields: &[&str]) {
        let req: CreateRequest = serde_json::from_value(req.clone()).expect("request shape");
        match validate(&req) {
            Ok(spec) => panic!("{req:?} was accepted as {spec:?}"),
            Err(errs) => {
                let got: Vec<&str> = errs.0.iter().map(|e| e.field.as_str()).collect();
                assert_eq!(got, fields, "{errs:?}");
            }
        }
    }

    fn valid() -> Value {
        json!({"version": "1.4.0", "platform": "x86_64-linux", "targets": {"all": true}})
    }

    fn with(key: &str, v: Value) -> Value {
        let mut r = valid();
        r[key] = v;
        r
    }

    #[test]
    fn requests_are_checked_field_by_field() {
        let spec = validate(&serde_json::from_value(valid()).expect("request")).expect("valid");
        assert_eq!(spec.waves, vec![WaveSpec::Sites(1), WaveSpec::Rest], "canary then the rest");
        assert_eq!(spec.window, Window::OutsideBusinessHours);
        assert_eq!((spec.max_failures, spec.wave_pause_s, spec.allow_downgrade), (0, 0, false));
        check_invalid(json!({}), &["version", "platform", "targets"]);
        check_invalid(with("version", json!("1.4")), &["version"]);
        check_invalid(with("platform", json!("x86_64 linux")), &["platform"]);
        check_invalid(with("platform", json!("")), &["platform"]);
        for (targets, field) in [
            (json!([]), "targets"),
            (json!({"sites": []}), "targets.sites"),
            (json!({"sites": ["SFO", "sfo"]}), "targets.sites[1]"),
            (json!({"sites": ["not a site"]}), "targets.sites[0]"),
            (json!({"sites": [7]}), "targets.sites[0]"),
            (json!({"tag": ""}), "targets.tag"),
            (json!({"all": false}), "targets.all"),
            (json!({"region": "west"}), "targets"),
            (json!({"all": true, "tag": "west"}), "targets"),
        ] {
            check_invalid(with("targets", targets), &[field]);
        }
        for (waves, field) in [
            (json!([]), "waves"),
            (json!({"sites": 1}), "waves"),
            (json!([{"sites": 0}]), "waves[0].sites"),
            (json!([{"sites": -1}]), "waves[0].sites"),
            (json!([{"percent": 0}, {"rest": true}]), "waves[0].percent"),
            (json!([{"percent": 101}]), "waves[0].percent"),
            (json!([{"percent": 12.5}]), "waves[0].percent"),
            (json!([{"rest": true}, {"sites": 1}]), "waves[0]"),
            (json!([{"rest": false}]), "waves[0].rest"),
            (json!([{"sites": 1, "percent": 5}]), "waves[0]"),
            (json!([{"canary": 1}]), "waves[0]"),
            (json!(["1"]), "waves[0]"),
        ] {
            check_invalid(with("waves", waves), &[field]);
        }
        for window in [
            json!("nights"),
            json!({"start": "01:00"}),
            json!({"start": "1am", "end": "05:00"}),
            json!({"start": "25:00", "end": "05:00"}),
            json!({"start": "01:00", "end": 5}),
            json!({"start": "01:00", "end": "05:00", "days": ["sat"]}),
        ] {
            check_invalid(with("window", window), &["window"]);
        }
        check_invalid(with("wave_pause_s", json!(MAX_WAVE_PAUSE_S + 1)), &["wave_pause_s"]);
        check_invalid(with("health_timeout_s", json!(5)), &["health_timeout_s"]);
        // Unknown fields and wrong types are refused by the body's shape.
        assert!(serde_json::from_value::<CreateRequest>(with("colour", json!(1))).is_err());
        assert!(
            serde_json::from_value::<CreateRequest>(with("max_failures", json!("one"))).is_err()
        );
    }

    fn agent(site: &str, version: &str, minutes: i64) -> AgentRecord {
        let t = at("2026-03-01T00:00:00Z") + Duration::minutes(minutes);
        AgentRecord {
            id: AgentId::new(),
            site: SiteCode::parse(site).expect("site"),
            hostname: site.into(),
            credential_hash: String::new(),
            enrolled_at: t,
            revoked_at: None,
            version: version.into(),
            connected: true,
            last_seen: Some(t),
            config_revision: 1,
            acked_seq: 0,
            command_seq: 1,
            command_acked_seq: 1,
            command_error: None,
            outbox_pending: 0,
            clock_skew_ms: 0,
            store_error: None,
            site_revision: 1,
            open_incidents: 0,
            incident: None,
        }
    }

    fn fleet(codes: &[&str]) -> ConfigSet {
        ConfigSet::from_resources(codes.iter().map(|c| {
            let tags = if c.starts_with('W') { json!(["west"]) } else { json!([]) };
            serde_json::from_value::<Resource>(json!({"kind": "site", "code": c, "name": c,
                "time_zone": "Europe/Paris", "tags": tags}))
            .expect("site")
        }))
    }

    fn spec(v: Value) -> RolloutSpec {
        validate(&serde_json::from_value(v).expect("request")).expect("valid")
    }

    /// (site, wave, state) of a plan.
    fn waves_of(p: &[PlannedSite]) -> Vec<(String, Option<u32>, SiteState)> {
        p.iter().map(|s| (s.site.to_string(), s.wave, s.state)).collect()
    }

    #[test]
    fn targets_resolve_to_sites_with_their_agents_cut_into_waves() {
        let codes: Vec<String> = (0..20).map(|i| format!("S{i:02}")).collect();
        let refs: Vec<&str> = codes.iter().map(String::as_str).collect();
        let config = fleet(&refs);
        let agents: Vec<AgentRecord> = codes.iter().map(|c| agent(c, "1.3.0", 0)).collect();
        let mut req = valid();
        req["waves"] = json!([{"sites": 1}, {"percent": 10}, {"percent": 25}, {"rest": true}]);
        let planned = plan(&spec(req), &config, &agents).expect("plan");
        let per_wave = |w: u32| planned.iter().filter(|s| s.wave == Some(w)).count();
        // 1 canary, 10 % of 20 = 2, 25 % = 5, then the remaining 12.
        assert_eq!((per_wave(1), per_wave(2), per_wave(3), per_wave(4)), (1, 2, 5, 12));
        assert_eq!(planned[0].site.as_str(), "S00", "all targets go by site code");
        assert_eq!(planned[0].from_version.as_deref(), Some("1.3.0"));

        // An explicit list keeps its order; a site without an agent or already on the version
        // is skipped with the reason, and the waves are cut over the others; a wave never
        // comes out empty and small percentages still take one site.
        let config = fleet(&["SFO", "CHI", "TYO", "PAR"]);
        let agents = vec![
            agent("SFO", "1.3.0", 0),
            agent("TYO", "1.4.0", 0),
            agent("PAR", "1.3.0", 0),
            // CHI's hardware was replaced: the newest agent counts, the old one is revoked.
            agent("CHI", "1.2.0", 0),
            AgentRecord { revoked_at: None, ..agent("CHI", "1.3.1", 5) },
        ];
        let mut agents = agents;
        agents[3].revoked_at = Some(at("2026-03-01T00:05:00Z"));
        let mut req = valid();
        req["targets"] = json!({"sites": ["PAR", "SFO", "TYO", "CHI", "NYC"]});
        let unknown = plan(&spec(req.clone()), &config, &agents).expect_err("NYC is unknown");
        assert_eq!(unknown.0[0].field, "targets.sites");
        assert!(unknown.0[0].message.contains("NYC"), "{unknown:?}");
        req["targets"] = json!({"sites": ["PAR", "SFO", "TYO", "CHI", "LON"]});
        let config = fleet(&["SFO", "CHI", "TYO", "PAR", "LON"]);
        req["waves"] = json!([{"percent": 1}, {"percent": 1}, {"rest": true}]);
        let planned = plan(&spec(req), &config, &agents).expect("plan");
        assert_eq!(
            waves_of(&planned),
            vec![
                ("PAR".into(), Some(1), SiteState::Pending),
                ("SFO".into(), Some(2), SiteState::Pending),
                ("TYO".into(), None, SiteState::Skipped),
                ("CHI".into(), Some(3), SiteState::Pending),
                ("LON".into(), None, SiteState::Skipped),
            ]
        );
        assert_eq!(planned[2].reason.as_deref(), Some("already runs 1.4.0"));
        assert_eq!(planned[4].reason.as_deref(), Some("no agent is enrolled for this site"));
        assert_eq!(planned[3].from_version.as_deref(), Some("1.3.1"));

        // A tag; a tag no site has.
        let config = fleet(&["WSF", "WLA", "CHI"]);
        let agents = vec![agent("WSF", "1.0.0", 0), agent("WLA", "1.0.0", 0)];
        let mut req = valid();
        req["targets"] = json!({"tag": "west"});
        let planned = plan(&spec(req.clone()), &config, &agents).expect("plan");
        assert_eq!(
            waves_of(&planned),
            vec![
                ("WLA".into(), Some(1), SiteState::Pending),
                ("WSF".into(), Some(2), SiteState::Pending)
            ]
        );
        req["targets"] = json!({"tag": "east"});
        let err = plan(&spec(req), &config, &agents).expect_err("no such tag");
        assert_eq!(
            (err.0[0].field.as_str(), err.0[0].message.as_str()),
            ("targets.tag", "no site has the tag \"east\"")
        );

        // Waves that leave sites out.
        let mut req = valid();
        req["waves"] = json!([{"sites": 1}]);
        let err = plan(&spec(req), &config, &agents).expect_err("one of two");
        assert_eq!(err.0[0].field, "waves");
        assert!(err.0[0].message.contains("take 1 of the 2"), "{err:?}");
    }

    #[test]
    fn downgrades_are_refused_unless_allowed() {
        let config = fleet(&["SFO", "CHI", "DEV"]);
        let agents = vec![
            agent("SFO", "1.5.0", 0),
            agent("CHI", "1.3.0", 0),
            agent("DEV", "0.0.0-dev+local", 0),
        ];
        let err = plan(&spec(valid()), &config, &agents).expect_err("SFO runs 1.5.0");
        assert_eq!(err.0[0].field, "version");
        assert!(
            err.0[0].message.contains("1.4.0 would be a downgrade (SFO runs 1.5.0)")
                && err.0[0].message.contains("allow_downgrade"),
            "{err:?}"
        );
        let mut allowed = valid();
        allowed["allow_downgrade"] = json!(true);
        let planned = plan(&spec(allowed), &config, &agents).expect("allowed");
        assert!(planned.iter().all(|s| s.state == SiteState::Pending));
        // A build that is not semver cannot be compared: the agent decides.
        let agents =
            vec![agent("SFO", "test", 0), agent("CHI", "1.3.0", 0), agent("DEV", "1.3.0", 0)];
        assert!(plan(&spec(valid()), &config, &agents).is_ok());
    }

    // ---------- the driver's decisions ----------

    const ROLLOUT: &str = "0190a0a0-0000-7000-8000-000000000001";

    fn rollout(waves: u32, pause: u64, max_failures: u32) -> Rollout {
        let t = at("2026-03-09T00:00:00Z");
        Rollout {
            id: ROLLOUT.parse().expect("uuid"),
            version: "1.4.0".into(),
            platform: "x86_64-linux".into(),
            targets: json!({"all": true}),
            waves: json!([]),
            wave_count: waves,
            wave_pause_s: pause,
            max_failures,
            window: Value::Null,
            allow_downgrade: false,
            health_timeout_s: None,
            state: RolloutState::Running,
            current_wave: waves.min(1),
            next_wave_at: None,
            created_by: "admin".into(),
            created_at: t,
            updated_at: t,
            halted_reason: None,
            site_counts: BTreeMap::new(),
        }
    }

    fn row(site: &str, wave: u32, state: SiteState) -> RolloutSite {
        RolloutSite {
            rollout_id: ROLLOUT.parse().expect("uuid"),
            site: site.into(),
            position: 0,
            wave: Some(wave),
            agent_id: Some(format!("agent-{site}")),
            state,
            reason: None,
            from_version: Some("1.3.0".into()),
            to_version: "1.4.0".into(),
            command_seq: None,
            delivered: false,
            commanded_at: None,
            switch_before: None,
            cancel_seq: None,
            updated_at: at("2026-03-09T00:00:00Z"),
        }
    }

    fn sent(mut s: RolloutSite, switch_before: &str) -> RolloutSite {
        s.command_seq = Some(7);
        s.commanded_at = Some(at("2026-03-09T00:00:00Z"));
        s.switch_before = Some(at(switch_before));
        s
    }

    fn detail(r: Rollout, sites: Vec<RolloutSite>) -> RolloutDetail {
        RolloutDetail { rollout: r, sites }
    }

    fn agents_of(d: &RolloutDetail) -> BTreeMap<String, String> {
        d.sites.iter().map(|s| (s.site.clone(), format!("agent-{}", s.site))).collect()
    }

    fn open_until(until: &'static str) -> impl Fn(&str) -> WindowState {
        move |_: &str| WindowState::Open { until: at(until) }
    }

    fn sends(d: &Decision) -> Vec<&str> {
        d.sends.iter().map(|s| s.site.as_str()).collect()
    }

    #[test]
    fn the_canary_goes_first_and_the_rest_only_after_it_is_healthy() {
        let now = at("2026-03-09T03:00:00Z");
        let w = open_until("2026-03-09T06:00:00Z");
        let mut d = detail(
            rollout(2, 0, 0),
            vec![
                row("SFO", 1, SiteState::Pending),
                row("CHI", 2, SiteState::Pending),
                row("TYO", 2, SiteState::Pending),
            ],
        );
        let step = decide(&d, &agents_of(&d), &w, now);
        assert_eq!(sends(&step), vec!["SFO"]);
        assert_eq!(step.sends[0].switch_before, at("2026-03-09T06:00:00Z"), "the window's end");
        assert_eq!(step.sends[0].agent_id, "agent-SFO");
        assert_eq!(step.rollout, None);
        // Sent and reporting progress: nothing new, the rest waits.
        d.sites[0] = sent(row("SFO", 1, SiteState::Switching), "2026-03-09T06:00:00Z");
        assert!(decide(&d, &agents_of(&d), &w, now).is_empty());
        d.sites[0].state = SiteState::Staged;
        assert!(decide(&d, &agents_of(&d), &w, now).is_empty(), "sent for this window already");
        // Healthy: with no pause, wave 2 starts in the same step.
        d.sites[0].state = SiteState::Healthy;
        let step = decide(&d, &agents_of(&d), &w, now);
        assert_eq!(sends(&step), vec!["CHI", "TYO"]);
        assert_eq!(
            step.rollout.as_ref().map(|u| (u.state, u.current_wave)),
            Some((RolloutState::Running, 2))
        );
        // Everyone healthy: completed.
        d.rollout.current_wave = 2;
        d.sites[1] = sent(row("CHI", 2, SiteState::Healthy), "2026-03-09T06:00:00Z");
        d.sites[2] = sent(row("TYO", 2, SiteState::Healthy), "2026-03-09T06:00:00Z");
        let step = decide(&d, &agents_of(&d), &w, now);
        assert_eq!(
            step.rollout.map(|u| (u.state, u.current_wave)),
            Some((RolloutState::Completed, 2))
        );
        // Nothing to do for a rollout that does not run.
        d.rollout.state = RolloutState::Paused;
        d.sites[1].state = SiteState::Pending;
        d.sites[1].command_seq = None;
        assert!(decide(&d, &agents_of(&d), &w, now).is_empty());
        // No site to upgrade: completed at once.
        let empty = detail(rollout(0, 0, 0), vec![]);
        assert_eq!(
            decide(&empty, &BTreeMap::new(), &w, now).rollout.map(|u| u.state),
            Some(RolloutState::Completed)
        );
    }

    #[test]
    fn waves_pause_between_them() {
        let now = at("2026-03-09T03:00:00Z");
        let w = open_until("2026-03-09T06:00:00Z");
        let mut d = detail(
            rollout(2, 600, 0),
            vec![
                sent(row("SFO", 1, SiteState::Healthy), "2026-03-09T06:00:00Z"),
                row("CHI", 2, SiteState::Pending),
            ],
        );
        let step = decide(&d, &agents_of(&d), &w, now);
        assert!(step.sends.is_empty());
        let u = step.rollout.expect("the pause starts");
        assert_eq!((u.current_wave, u.next_wave_at), (1, Some(now + Duration::seconds(600))));
        d.rollout.next_wave_at = u.next_wave_at;
        assert!(decide(&d, &agents_of(&d), &w, now + Duration::seconds(599)).is_empty());
        let step = decide(&d, &agents_of(&d), &w, now + Duration::seconds(600));
        assert_eq!(sends(&step), vec!["CHI"]);
        assert_eq!(step.rollout.map(|u| (u.current_wave, u.next_wave_at)), Some((2, None)));
    }

    #[test]
    fn a_closed_window_holds_a_site_until_it_opens_and_an_expired_command_is_sent_again() {
        let now = at("2026-03-09T17:00:00Z");
        let closed = |_: &str| WindowState::Closed { opens_at: at("2026-03-10T00:00:00Z") };
        let mut d = detail(rollout(1, 0, 0), vec![row("SFO", 1, SiteState::Pending)]);
        assert!(decide(&d, &agents_of(&d), &closed, now).is_empty(), "business hours");
        let opened = open_until("2026-03-10T16:00:00Z");
        let later = at("2026-03-10T00:00:00Z");
        assert_eq!(sends(&decide(&d, &agents_of(&d), &opened, later)), vec!["SFO"]);
        // Sent for a window that has closed since (the agent was offline, or kept it staged):
        // nothing while closed, sent again when the next window opens.
        d.sites[0] = sent(row("SFO", 1, SiteState::Staged), "2026-03-09T16:00:00Z");
        assert!(decide(&d, &agents_of(&d), &closed, now).is_empty());
        let step = decide(&d, &agents_of(&d), &opened, later);
        assert_eq!(sends(&step), vec!["SFO"]);
        assert_eq!(step.sends[0].switch_before, at("2026-03-10T16:00:00Z"));
        // A site that got a new agent gets it again at once (inside its window).
        d.sites[0] = sent(row("SFO", 1, SiteState::Pending), "2026-03-10T16:00:00Z");
        let mut agents = agents_of(&d);
        agents.insert("SFO".into(), "agent-SFO-2".into());
        let step = decide(&d, &agents, &opened, later);
        assert_eq!(
            step.sends.iter().map(|s| s.agent_id.as_str()).collect::<Vec<_>>(),
            vec!["agent-SFO-2"]
        );
        // Also while it was switching (its agent will never report).
        d.sites[0].state = SiteState::Switching;
        assert_eq!(sends(&decide(&d, &agents, &opened, later)), vec!["SFO"]);
        assert!(decide(&d, &agents_of(&d), &opened, later).is_empty(), "same agent: it reports");
        // A site no longer configured, or without an agent, is skipped with the reason.
        d.sites[0] = row("SFO", 1, SiteState::Pending);
        let gone = |_: &str| WindowState::Unavailable {
            reason: "site SFO is no longer configured".into(),
        };
        assert_eq!(
            decide(&d, &agents_of(&d), &gone, later).skips,
            vec![("SFO".to_owned(), "not upgraded: site SFO is no longer configured".to_owned())]
        );
        assert_eq!(decide(&d, &BTreeMap::new(), &opened, later).skips.len(), 1);
    }

    #[test]
    fn failures_beyond_the_limit_halt_and_leave_later_sites_untouched() {
        let now = at("2026-03-09T03:00:00Z");
        let w = open_until("2026-03-09T06:00:00Z");
        let mut canary = sent(row("SFO", 1, SiteState::RolledBack), "2026-03-09T06:00:00Z");
        canary.reason = Some("the new binary exited with status 3".into());
        let d = detail(
            rollout(2, 0, 0),
            vec![
                canary,
                sent(row("CHI", 1, SiteState::Staged), "2026-03-09T06:00:00Z"),
                sent(row("PAR", 1, SiteState::Switching), "2026-03-09T06:00:00Z"),
                row("TYO", 2, SiteState::Pending),
            ],
        );
        let step = decide(&d, &agents_of(&d), &w, now);
        assert!(step.sends.is_empty(), "nothing more is sent");
        assert_eq!(
            step.cancels,
            vec![CancelUpgrade {
                site: "CHI".into(),
                agent_id: "agent-CHI".into(),
                reason: "upgrade cancelled: the rollout was halted".into()
            }]
        );
        assert!(step.skips.is_empty());
        assert_eq!(
            step.untouched,
            vec![("TYO".to_owned(), "not upgraded: the rollout was halted".to_owned())]
        );
        let u = step.rollout.expect("halted");
        assert_eq!(u.state, RolloutState::Halted);
        assert_eq!(
            u.halted_reason.as_deref(),
            Some(
                "1 site(s) failed or rolled back, more than max_failures 0: SFO rolled_back (the new binary exited with status 3)"
            )
        );
        // Within the limit the rollout goes on (the failed canary's wave is done).
        let mut tolerant = d.clone();
        tolerant.rollout.max_failures = 1;
        tolerant.sites[1].state = SiteState::Healthy;
        tolerant.sites[2].state = SiteState::Healthy;
        assert_eq!(sends(&decide(&tolerant, &agents_of(&tolerant), &w, now)), vec!["TYO"]);
        // Abort is the same stop.
        let aborted = stop(&d, RolloutState::Aborted, "aborted by admin");
        assert_eq!(aborted.cancels.len(), 1);
        assert_eq!(aborted.untouched[0].1, "not upgraded: the rollout was aborted");
        assert_eq!(
            aborted.rollout.and_then(|u| u.halted_reason).as_deref(),
            Some("aborted by admin")
        );
    }

    fn status(phase: UpgradePhase, version: &str, running: &str) -> UpgradeStatus {
        UpgradeStatus {
            rollout_id: ROLLOUT.parse().expect("uuid"),
            version: version.into(),
            running_version: running.into(),
            phase,
            reason: None,
            at: at("2026-03-09T03:00:00Z"),
        }
    }

    #[test]
    fn reports_move_a_site_and_healthy_means_running_the_version() {
        let commanded = sent(row("SFO", 1, SiteState::Pending), "2026-03-09T06:00:00Z");
        let check = |site: &RolloutSite, s: UpgradeStatus, want: StatusEffect| {
            assert_eq!(apply_status(site, "1.4.0", &s), want, "{s:?}");
        };
        let apply = |state| StatusEffect::Apply { state, reason: None };
        check(
            &commanded,
            status(UpgradePhase::Downloading, "1.4.0", "1.3.0"),
            apply(SiteState::Downloading),
        );
        check(&commanded, status(UpgradePhase::Staged, "1.4.0", "1.3.0"), apply(SiteState::Staged));
        check(
            &commanded,
            status(UpgradePhase::Healthy, "1.4.0", "1.4.0"),
            apply(SiteState::Healthy),
        );
        check(
            &commanded,
            status(UpgradePhase::Healthy, "1.4.0", "1.3.0"),
            StatusEffect::Apply {
                state: SiteState::Failed,
                reason: Some("reported healthy while running 1.3.0, not 1.4.0".into()),
            },
        );
        let mut rolled = status(UpgradePhase::RolledBack, "1.4.0", "1.3.0");
        rolled.reason = Some("crashed 3 times".into());
        check(
            &commanded,
            rolled,
            StatusEffect::Apply {
                state: SiteState::RolledBack,
                reason: Some("crashed 3 times".into()),
            },
        );
        assert!(matches!(
            apply_status(&commanded, "1.4.0", &status(UpgradePhase::Staged, "1.5.0", "1.3.0")),
            StatusEffect::Refuse(m) if m.contains("reports version 1.5.0")
        ));
        let never = row("SFO", 1, SiteState::Skipped);
        assert!(matches!(
            apply_status(&never, "1.4.0", &status(UpgradePhase::Healthy, "1.4.0", "1.4.0")),
            StatusEffect::Refuse(m) if m.contains("never sent")
        ));
        let done = sent(row("SFO", 1, SiteState::Healthy), "2026-03-09T06:00:00Z");
        assert!(matches!(
            apply_status(&done, "1.4.0", &status(UpgradePhase::Staged, "1.4.0", "1.4.0")),
            StatusEffect::Ignore(_)
        ));
        // Cancelled before it switched: only the end of the story counts.
        let mut cancelled = sent(row("SFO", 1, SiteState::Skipped), "2026-03-09T06:00:00Z");
        cancelled.cancel_seq = Some(9);
        assert!(matches!(
            apply_status(&cancelled, "1.4.0", &status(UpgradePhase::Downloading, "1.4.0", "1.3.0")),
            StatusEffect::Ignore(_)
        ));
        check(
            &cancelled,
            status(UpgradePhase::Healthy, "1.4.0", "1.4.0"),
            apply(SiteState::Healthy),
        );
    }

    // ---------- a model of the driver under random reports, windows and ticks ----------

    /// What a test agent does next with the upgrade it was sent.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// The driver ticks, `minutes` later, with these sites' windows open (bit mask).
        Tick { minutes: i64, open: u8 },
        /// Site `site` (index) reports its next phase; `fails` ends it rolled back.
        Report { site: usize, fails: bool },
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            (0i64..120, any::<u8>()).prop_map(|(minutes, open)| Step::Tick { minutes, open }),
            (0usize..8, proptest::bool::weighted(0.1))
                .prop_map(|(site, fails)| Step::Report { site, fails }),
        ]
    }

    /// Applies a decision as the store does.
    fn apply(d: &mut RolloutDetail, dec: &Decision, now: DateTime<Utc>) {
        for s in &dec.sends {
            let row = d.sites.iter_mut().find(|x| x.site == s.site).expect("site");
            row.command_seq = Some(row.command_seq.unwrap_or(0) + 1);
            row.agent_id = Some(s.agent_id.clone());
            row.switch_before = Some(s.switch_before);
            row.commanded_at = Some(now);
        }
        for c in &dec.cancels {
            let row = d.sites.iter_mut().find(|x| x.site == c.site).expect("site");
            row.state = SiteState::Skipped;
            row.cancel_seq = Some(1);
        }
        for (site, reason) in &dec.skips {
            let row = d.sites.iter_mut().find(|x| &x.site == site).expect("site");
            row.state = SiteState::Skipped;
            row.reason = Some(reason.clone());
        }
        for (site, reason) in &dec.untouched {
            let row = d.sites.iter_mut().find(|x| &x.site == site).expect("site");
            row.reason = Some(reason.clone());
        }
        if let Some(u) = &dec.rollout {
            d.rollout.state = u.state;
            d.rollout.current_wave = u.current_wave;
            d.rollout.next_wave_at = u.next_wave_at;
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        #[test]
        fn waves_windows_and_halts_hold_under_any_order_of_events(
            waves in proptest::collection::vec(1u32..4, 1..4),
            sizes in 1usize..8,
            max_failures in 0u32..2,
            pause in 0u64..3600,
            steps in proptest::collection::vec(step(), 1..80),
        ) {
            // Sites S0..Sn cut into waves of the given sizes (the last takes the rest).
            let mut sites = Vec::new();
            let mut wave = 1u32;
            let mut left_in_wave = waves[0];
            for i in 0..sizes {
                if left_in_wave == 0 && (wave as usize) < waves.len() {
                    wave += 1;
                    left_in_wave = waves[wave as usize - 1];
                }
                left_in_wave = left_in_wave.saturating_sub(1);
                sites.push(row(&format!("S{i}"), wave, SiteState::Pending));
            }
            let wave_count = sites.iter().filter_map(|s| s.wave).max().unwrap_or(0);
            let mut d = detail(rollout(wave_count, pause, max_failures), sites);
            let agents = agents_of(&d);
            let mut now = at("2026-03-09T00:00:00Z");
            let mut halted_untouched: Option<Vec<String>> = None;
            for st in steps {
                match st {
                    Step::Report { site, fails } => {
                        let Some(row) = d.sites.get_mut(site % sizes) else { continue };
                        if row.command_seq.is_none() || row.state.is_final() {
                            continue;
                        }
                        row.state = match (row.state, fails) {
                            (_, true) => SiteState::RolledBack,
                            (SiteState::Pending, _) => SiteState::Downloading,
                            (SiteState::Downloading, _) => SiteState::Staged,
                            (SiteState::Staged, _) => SiteState::Switching,
                            _ => SiteState::Healthy,
                        };
                    }
                    Step::Tick { minutes, open } => {
                        now += Duration::minutes(minutes);
                        let until = now + Duration::hours(1);
                        let names: Vec<String> = d.sites.iter().map(|s| s.site.clone()).collect();
                        let window = |site: &str| {
                            let i = names.iter().position(|n| n == site).unwrap_or(0);
                            if open & (1 << (i % 8)) != 0 {
                                WindowState::Open { until }
                            } else {
                                WindowState::Closed { opens_at: until }
                            }
                        };
                        let failures = d.sites.iter().filter(|s| s.state.is_failure()).count();
                        let before = d.clone();
                        let dec = decide(&before, &agents, &window, now);
                        // Over the limit: nothing is sent, the rollout halts.
                        if before.rollout.state == RolloutState::Running
                            && failures as u32 > max_failures
                        {
                            proptest::prop_assert!(dec.sends.is_empty());
                            proptest::prop_assert_eq!(
                                dec.rollout.as_ref().map(|u| u.state),
                                Some(RolloutState::Halted)
                            );
                        }
                        apply(&mut d, &dec, now);
                        for s in &dec.sends {
                            let row = before.sites.iter().find(|x| x.site == s.site).expect("site");
                            let w = row.wave.expect("a wave");
                            // Only into an open window, until its end.
                            let open_now = matches!(window(&s.site), WindowState::Open { .. });
                            proptest::prop_assert!(open_now);
                            proptest::prop_assert_eq!(s.switch_before, until);
                            // Never ahead of the rollout's wave, never before every earlier
                            // wave is final.
                            proptest::prop_assert!(w <= d.rollout.current_wave);
                            proptest::prop_assert!(
                                d.sites.iter().filter(|x| x.wave.is_some_and(|x| x < w)).all(|x| x.state.is_final()),
                                "{} sent before an earlier wave ended: {:?}", s.site, before.sites
                            );
                            proptest::prop_assert!(!row.state.is_final() && row.state != SiteState::Switching);
                        }
                        if d.rollout.state == RolloutState::Halted && halted_untouched.is_none() {
                            halted_untouched = Some(
                                d.sites.iter().filter(|s| s.command_seq.is_none()).map(|s| s.site.clone()).collect(),
                            );
                        }
                        if d.rollout.state == RolloutState::Completed {
                            proptest::prop_assert!(d.sites.iter().all(|s| s.state.is_final()));
                        }
                    }
                }
            }
            // Sites never commanded before the halt stay untouched.
            if let Some(untouched) = halted_untouched {
                for s in d.sites.iter().filter(|s| untouched.contains(&s.site)) {
                    proptest::prop_assert!(s.command_seq.is_none(), "{} commanded after the halt", s.site);
                }
            }
        }
    }
}
