//! The agent's guarded clock: a branch never acts on a wrong clock.
//!
//! The agent keeps a **reference**, the best time it knows: the controller's time at the last
//! session's Welcome, moved on by a monotonic clock (time since boot, which counts suspend and
//! never jumps); before any session, the last good wall time it kept in the store (exact after
//! a restart on the same boot); else the system clock at start, unless that is earlier than the
//! last good wall time by more than the tolerance. While the system wall clock is within
//! `clock_tolerance_ms` of the reference, the agent uses the system clock; beyond it, the agent
//! uses the reference instead and raises an alert (a WARN line once per episode, `clock` in
//! `/api/v1/status`, `Context::clock_health`) until the two agree again. So a clock jump never
//! moves the business day, never runs the end-of-day sweep and never dates an event on a day
//! that has not come.
//!
//! `judge` and `start_reference` are the pure decisions; `GuardedClock` reads the clocks and
//! keeps the state; `keep_last_good` stores the last good wall time now and then.
//!
//! **Invariant:** every time the guarded clock returns is within the tolerance of its
//! reference. **Boundary:** the link hands it the Welcome's `controller_time_ms`
//! (`Context::controller_time`); the link reports the unguarded system time
//! (`Context::system_time`), so the controller measures the machine's real skew.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use meridian_shared::clock::{Clock, SystemClock, skew_beyond};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::Context;
use crate::store::queries;

/// How often the last good wall time is stored.
const KEEP_EVERY: Duration = Duration::from_secs(60);

/// What the agent reads the time from.
pub enum ClockSource {
    /// A clock used as it is, unguarded: tests that move time on purpose.
    Injected(Arc<dyn Clock>),
    /// The wall clock `system`, guarded by a reference kept on `monotonic`. `boot_id` names the
    /// boot `monotonic` counts from (`None`: it counts from the agent's start), so a reference
    /// kept before a restart on the same boot is still exact.
    Guarded { system: Arc<dyn Clock>, monotonic: Arc<dyn Monotonic>, boot_id: Option<String> },
}

impl ClockSource {
    /// The machine's wall clock, guarded by its boot-time clock.
    pub fn system() -> Self {
        let monotonic = BootClock::new();
        let boot_id = monotonic.boot_id();
        ClockSource::Guarded {
            system: Arc::new(SystemClock),
            monotonic: Arc::new(monotonic),
            boot_id,
        }
    }
}

// ---------------------------------------------------------------- pure decisions

/// Where the reference comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The controller's clock at the last session's Welcome.
    Controller,
    /// The last good wall time the agent kept in its store.
    LastGood,
    /// The system clock when the agent started: nothing better was known.
    System,
}

impl Source {
    fn describe(self) -> &'static str {
        match self {
            Source::Controller => "the controller's time",
            Source::LastGood => "the last good time the agent kept",
            Source::System => "the system time at start",
        }
    }
}

/// A trusted wall time and the monotonic reading it was taken at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reference {
    pub wall: DateTime<Utc>,
    pub at: Duration,
    pub source: Source,
}

impl Reference {
    /// The trusted time at monotonic reading `mono`: the reference moved on by the monotonic
    /// time since it was taken.
    pub fn at(&self, mono: Duration) -> DateTime<Utc> {
        let elapsed = TimeDelta::from_std(mono.saturating_sub(self.at)).unwrap_or(TimeDelta::MAX);
        self.wall.checked_add_signed(elapsed).unwrap_or(DateTime::<Utc>::MAX_UTC)
    }
}

/// What the guarded clock reads at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// The time the agent uses.
    pub now: DateTime<Utc>,
    /// The system clock minus the reference, in ms.
    pub skew_ms: i64,
    /// Whether `now` is the system clock (it is within the tolerance of the reference).
    pub trusted: bool,
}

/// The time to use, given the system clock, the monotonic clock and the reference: the
/// system clock while it is within `tolerance` of the reference, the reference otherwise.
pub fn judge(
    system: DateTime<Utc>,
    mono: Duration,
    reference: &Reference,
    tolerance: Duration,
) -> Reading {
    let trusted_now = reference.at(mono);
    let skew_ms = system.signed_duration_since(trusted_now).num_milliseconds();
    let trusted = !skew_beyond(skew_ms, tolerance);
    Reading { now: if trusted { system } else { trusted_now }, skew_ms, trusted }
}

/// The last good wall time as the store keeps it (JSON in `meta`): the guarded time, the boot
/// it was read on and the monotonic reading then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastGood {
    pub wall: DateTime<Utc>,
    pub boot_id: Option<String>,
    pub mono_ms: u64,
}

/// The reference an agent starts with. On the boot the last good time was kept on, that time
/// moved on by the monotonic clock (exact). Otherwise the machine may have been off for any
/// time, so only a system clock earlier than the last good time by more than `tolerance` is
/// known to be wrong: then the last good time is the reference; else the system clock is.
pub fn start_reference(
    system: DateTime<Utc>,
    mono: Duration,
    boot_id: Option<&str>,
    last: Option<&LastGood>,
    tolerance: Duration,
) -> Reference {
    let Some(last) = last else {
        return Reference { wall: system, at: mono, source: Source::System };
    };
    let kept_at = Duration::from_millis(last.mono_ms);
    if boot_id.is_some() && last.boot_id.as_deref() == boot_id && kept_at <= mono {
        return Reference { wall: last.wall, at: kept_at, source: Source::LastGood };
    }
    let behind_ms = system.signed_duration_since(last.wall).num_milliseconds();
    if behind_ms < 0 && skew_beyond(behind_ms, tolerance) {
        Reference { wall: last.wall, at: mono, source: Source::LastGood }
    } else {
        Reference { wall: system, at: mono, source: Source::System }
    }
}

/// A change of the alert state: logged once per episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The system clock went beyond the tolerance.
    Raised,
    /// It is back within the tolerance.
    Cleared,
}

/// The alert episode the clock is in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Episode {
    /// When (guarded time) the current alert was raised; `None` while the clock is trusted.
    pub since: Option<DateTime<Utc>>,
    /// Alerts raised since the agent started.
    pub raised: u64,
}

impl Episode {
    /// Moves the episode on by one reading; returns the transition to report, if any.
    pub fn step(&mut self, reading: &Reading) -> Option<Transition> {
        match (self.since.is_some(), reading.trusted) {
            (false, false) => {
                self.since = Some(reading.now);
                self.raised += 1;
                Some(Transition::Raised)
            }
            (true, true) => {
                self.since = None;
                Some(Transition::Cleared)
            }
            _ => None,
        }
    }
}

// ---------------------------------------------------------------- health

/// The clock's state as the branch status, the supervisor page and metrics show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockHealth {
    /// Whether the clock is guarded at all (an agent opened with an injected clock is not).
    pub guarded: bool,
    /// Whether the agent uses its system clock (within the tolerance of the reference).
    pub trusted: bool,
    /// The system clock minus the reference at the last reading, in ms.
    pub skew_ms: i64,
    pub tolerance_ms: u64,
    /// Where the reference comes from (`None` when unguarded).
    pub reference: Option<Source>,
    /// Why the agent does not use its system clock; `None` while it does.
    pub alert: Option<String>,
    /// Since when (the agent's time) the alert stands.
    pub alert_since: Option<DateTime<Utc>>,
    /// Alerts raised since the agent started (a counter for metrics).
    pub alerts_raised: u64,
}

impl ClockHealth {
    /// The health of an injected clock: used as it is, nothing to judge.
    pub fn unguarded() -> Self {
        ClockHealth {
            guarded: false,
            trusted: true,
            skew_ms: 0,
            tolerance_ms: 0,
            reference: None,
            alert: None,
            alert_since: None,
            alerts_raised: 0,
        }
    }
}

/// `90061000` → `1d 1h 1m 1s`.
fn span(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, s) = (s / 86_400, s / 3_600 % 24, s / 60 % 60, s % 60);
    let parts = [(d, "d"), (h, "h"), (m, "m"), (s, "s")];
    let text: Vec<String> =
        parts.iter().filter(|(n, _)| *n > 0).map(|(n, unit)| format!("{n}{unit}")).collect();
    if text.is_empty() { format!("{ms}ms") } else { text.join(" ") }
}

fn alert_text(skew_ms: i64, source: Source, tolerance: Duration) -> String {
    let way = if skew_ms > 0 { "ahead of" } else { "behind" };
    format!(
        "the system clock is {} {way} {} (tolerance {}); the agent uses {} instead",
        span(skew_ms.unsigned_abs()),
        source.describe(),
        span(u64::try_from(tolerance.as_millis()).unwrap_or(u64::MAX)),
        source.describe(),
    )
}

// ---------------------------------------------------------------- the clock

/// A clock that never jumps: the time since an origin that stays put while the agent runs.
pub trait Monotonic: Send + Sync + 'static {
    fn now(&self) -> Duration;
}

/// The time since the machine booted, counting suspend (Linux `CLOCK_BOOTTIME`); elsewhere,
/// or should that clock be unreadable, the time since this value was made.
pub enum BootClock {
    /// `CLOCK_BOOTTIME`; should a later reading fail, the boot time at start plus the process's
    /// monotonic time since (continuous, only blind to a suspend).
    Boot {
        at_start: Duration,
        start: std::time::Instant,
    },
    Process(std::time::Instant),
}

impl BootClock {
    pub fn new() -> Self {
        let start = std::time::Instant::now();
        match boot_time() {
            Some(at_start) => BootClock::Boot { at_start, start },
            None => BootClock::Process(start),
        }
    }

    /// The kernel's id of this boot when the clock counts from it.
    pub fn boot_id(&self) -> Option<String> {
        match self {
            BootClock::Boot { .. } => std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty()),
            BootClock::Process(_) => None,
        }
    }
}

impl Default for BootClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(target_os = "linux")]
fn boot_time() -> Option<Duration> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    Some(Duration::new(u64::try_from(t.tv_sec()).ok()?, u32::try_from(t.tv_nsec()).ok()?))
}

#[cfg(not(target_os = "linux"))]
fn boot_time() -> Option<Duration> {
    None
}

impl Monotonic for BootClock {
    fn now(&self) -> Duration {
        match self {
            BootClock::Boot { at_start, start } => {
                boot_time().unwrap_or_else(|| *at_start + start.elapsed())
            }
            BootClock::Process(start) => start.elapsed(),
        }
    }
}

/// A monotonic clock tests move by hand.
#[derive(Debug, Default)]
pub struct ManualMonotonic(Mutex<Duration>);

impl ManualMonotonic {
    pub fn advance(&self, by: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *t += by;
    }
}

impl Monotonic for ManualMonotonic {
    fn now(&self) -> Duration {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct State {
    reference: Reference,
    last: Reading,
    episode: Episode,
}

/// The agent's clock: the system clock while it agrees with the reference, the reference
/// otherwise (see the module documentation).
pub struct GuardedClock {
    system: Arc<dyn Clock>,
    monotonic: Arc<dyn Monotonic>,
    boot_id: Option<String>,
    tolerance: Duration,
    state: Mutex<State>,
}

impl GuardedClock {
    /// Starts from the last good wall time kept in the store, if any (`start_reference`).
    pub fn new(
        system: Arc<dyn Clock>,
        monotonic: Arc<dyn Monotonic>,
        boot_id: Option<String>,
        tolerance: Duration,
        last_good: Option<&LastGood>,
    ) -> Self {
        let (wall, mono) = (system.now(), monotonic.now());
        let reference = start_reference(wall, mono, boot_id.as_deref(), last_good, tolerance);
        let first = Reading { now: wall, skew_ms: 0, trusted: true };
        let clock = GuardedClock {
            system,
            monotonic,
            boot_id,
            tolerance,
            state: Mutex::new(State { reference, last: first, episode: Episode::default() }),
        };
        clock.read();
        clock
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads both clocks and judges them; reports a change of the alert state.
    pub fn read(&self) -> Reading {
        self.read_at().0
    }

    fn read_at(&self) -> (Reading, Duration) {
        let system = self.system.now();
        let mono = self.monotonic.now();
        let (reading, transition, source) = {
            let mut s = self.lock();
            let reading = judge(system, mono, &s.reference, self.tolerance);
            s.last = reading;
            let transition = s.episode.step(&reading);
            (reading, transition, s.reference.source)
        };
        if let Some(t) = transition {
            report(t, &reading, source, self.tolerance);
        }
        (reading, mono)
    }

    /// Takes the controller's time (a session's Welcome) as the reference from now on.
    pub fn controller_time(&self, at: DateTime<Utc>) {
        let mono = self.monotonic.now();
        self.lock().reference = Reference { wall: at, at: mono, source: Source::Controller };
        self.read();
    }

    /// The system clock, unguarded.
    pub fn system_now(&self) -> DateTime<Utc> {
        self.system.now()
    }

    /// The state as of the last reading.
    pub fn health(&self) -> ClockHealth {
        let s = self.lock();
        ClockHealth {
            guarded: true,
            trusted: s.last.trusted,
            skew_ms: s.last.skew_ms,
            tolerance_ms: u64::try_from(self.tolerance.as_millis()).unwrap_or(u64::MAX),
            reference: Some(s.reference.source),
            alert: (!s.last.trusted)
                .then(|| alert_text(s.last.skew_ms, s.reference.source, self.tolerance)),
            alert_since: s.episode.since,
            alerts_raised: s.episode.raised,
        }
    }

    /// What to keep in the store as the last good wall time: the guarded time now.
    pub fn last_good(&self) -> LastGood {
        let (reading, mono) = self.read_at();
        LastGood {
            wall: reading.now,
            boot_id: self.boot_id.clone(),
            mono_ms: u64::try_from(mono.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

impl Clock for GuardedClock {
    fn now(&self) -> DateTime<Utc> {
        self.read().now
    }
}

/// The clock's log lines, from one place.
fn report(t: Transition, reading: &Reading, source: Source, tolerance: Duration) {
    let tolerance_ms = u64::try_from(tolerance.as_millis()).unwrap_or(u64::MAX);
    match t {
        Transition::Raised => tracing::warn!(
            skew_ms = reading.skew_ms,
            tolerance_ms,
            reference = ?source,
            using = %reading.now,
            "system clock beyond the tolerance of the trusted time; using the trusted time until they agree"
        ),
        Transition::Cleared => tracing::info!(
            skew_ms = reading.skew_ms,
            tolerance_ms,
            reference = ?source,
            "system clock within the tolerance of the trusted time again; using it"
        ),
    }
}

/// Stores the guarded clock's last good wall time every minute and at shutdown, so a restart
/// starts from it (`start_reference`). Nothing to do for an unguarded clock.
pub async fn keep_last_good(ctx: Arc<Context>, shutdown: CancellationToken) {
    let Some(clock) = ctx.clock_guard.clone() else { return };
    let mut tick = tokio::time::interval(KEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tick.tick() => false,
        };
        let last = clock.last_good();
        if let Err(e) = ctx.db.write(move |c| queries::save_clock_last_good(c, &last)).await {
            tracing::warn!(error = %e, "could not keep the last good wall time; retrying");
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use meridian_shared::clock::ManualClock;
    use proptest::prelude::*;

    const TOL: Duration = Duration::from_secs(120);

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 9, 17, 0, 0).unwrap()
    }

    fn ms(n: i64) -> TimeDelta {
        TimeDelta::milliseconds(n)
    }

    fn reference(source: Source) -> Reference {
        Reference { wall: t0(), at: Duration::from_secs(1_000), source }
    }

    #[test]
    fn judge_uses_the_system_clock_only_within_the_tolerance() {
        let r = reference(Source::Controller);
        // 10 s of monotonic time after the reference: the trusted time is t0 + 10 s.
        let mono = Duration::from_secs(1_010);
        let trusted_now = t0() + ms(10_000);
        let check = |system_offset_ms: i64, now: DateTime<Utc>, trusted: bool| {
            let system = trusted_now + ms(system_offset_ms);
            assert_eq!(
                judge(system, mono, &r, TOL),
                Reading { now, skew_ms: system_offset_ms, trusted },
                "{system_offset_ms}"
            );
        };
        check(0, trusted_now, true);
        check(120_000, trusted_now + ms(120_000), true);
        check(-120_000, trusted_now - ms(120_000), true);
        check(120_001, trusted_now, false);
        check(86_400_000, trusted_now, false);
        check(-7_200_000, trusted_now, false);
    }

    #[test]
    fn the_boot_clock_counts_from_boot_and_never_goes_back() {
        let clock = BootClock::new();
        let (a, b) = (clock.now(), clock.now());
        assert!(b >= a);
        if cfg!(target_os = "linux") {
            assert!(matches!(clock, BootClock::Boot { .. }));
            assert!(clock.boot_id().is_some_and(|id| id.len() >= 32));
        }
    }

    #[test]
    fn the_reference_moves_with_the_monotonic_clock_only() {
        let r = reference(Source::Controller);
        assert_eq!(r.at(Duration::from_secs(1_000)), t0());
        assert_eq!(r.at(Duration::from_secs(4_600)), t0() + ms(3_600_000));
        // A reading before the reference (never on one boot) does not go back.
        assert_eq!(r.at(Duration::from_secs(10)), t0());
        assert_eq!(r.at(Duration::MAX), DateTime::<Utc>::MAX_UTC);
    }

    #[test]
    fn start_reference_cases() {
        let mono = Duration::from_secs(5_000);
        let kept = LastGood { wall: t0(), boot_id: Some("boot-a".into()), mono_ms: 4_000_000 };
        let check = |system: DateTime<Utc>, boot: Option<&str>, last: Option<&LastGood>, want| {
            assert_eq!(start_reference(system, mono, boot, last, TOL), want, "{system} {boot:?}");
        };
        let later = t0() + ms(86_400_000);
        // Nothing kept: the system clock.
        check(
            later,
            Some("boot-a"),
            None,
            Reference { wall: later, at: mono, source: Source::System },
        );
        // Same boot: the kept time, exact (the system clock is then judged against it).
        check(
            later,
            Some("boot-a"),
            Some(&kept),
            Reference { wall: t0(), at: Duration::from_secs(4_000), source: Source::LastGood },
        );
        // Another boot: any later system time may be right (the machine was off)...
        check(
            later,
            Some("boot-b"),
            Some(&kept),
            Reference { wall: later, at: mono, source: Source::System },
        );
        check(
            later,
            None,
            Some(&kept),
            Reference { wall: later, at: mono, source: Source::System },
        );
        // ...a little earlier too, but not earlier than the tolerance allows.
        let slightly = t0() - ms(120_000);
        check(
            slightly,
            Some("boot-b"),
            Some(&kept),
            Reference { wall: slightly, at: mono, source: Source::System },
        );
        let earlier = t0() - ms(7_200_000);
        check(
            earlier,
            Some("boot-b"),
            Some(&kept),
            Reference { wall: t0(), at: mono, source: Source::LastGood },
        );
        // A kept reading from later in "the same boot" cannot be: the boot id was reused.
        let odd = LastGood { mono_ms: 9_000_000, ..kept.clone() };
        check(
            later,
            Some("boot-a"),
            Some(&odd),
            Reference { wall: later, at: mono, source: Source::System },
        );
    }

    #[test]
    fn an_episode_reports_once_each_way() {
        let mut e = Episode::default();
        let at = |trusted| Reading { now: t0(), skew_ms: 0, trusted };
        assert_eq!(e.step(&at(true)), None);
        assert_eq!(e.step(&at(false)), Some(Transition::Raised));
        assert_eq!(e.step(&at(false)), None);
        assert_eq!(e.since, Some(t0()));
        assert_eq!(e.step(&at(true)), Some(Transition::Cleared));
        assert_eq!(e.step(&at(true)), None);
        assert_eq!(e.step(&at(false)), Some(Transition::Raised));
        assert_eq!(e.raised, 2);
    }

    #[test]
    fn alert_text_names_the_way_and_the_reference() {
        let text = alert_text(86_400_500, Source::Controller, TOL);
        assert_eq!(
            text,
            "the system clock is 1d ahead of the controller's time (tolerance 2m); \
             the agent uses the controller's time instead"
        );
        assert!(
            alert_text(-7_261_000, Source::LastGood, TOL).starts_with(
                "the system clock is 2h 1m 1s behind the last good time the agent kept"
            )
        );
        assert_eq!(span(400), "400ms");
    }

    fn guarded(last: Option<&LastGood>) -> (Arc<ManualClock>, Arc<ManualMonotonic>, GuardedClock) {
        let system = Arc::new(ManualClock::new(t0()));
        let mono = Arc::new(ManualMonotonic::default());
        mono.advance(Duration::from_secs(100));
        let clock =
            GuardedClock::new(system.clone(), mono.clone(), Some("boot-a".into()), TOL, last);
        (system, mono, clock)
    }

    #[test]
    fn a_jump_ahead_then_behind_keeps_the_trusted_time_and_clears_when_fixed() {
        let (system, mono, clock) = guarded(None);
        assert_eq!(clock.now(), t0());
        assert!(clock.health().trusted);
        clock.controller_time(t0() + ms(1_000));
        // Within the tolerance: the system clock as it is.
        mono.advance(Duration::from_secs(60));
        system.advance(ms(60_000));
        assert_eq!(clock.now(), t0() + ms(60_000));
        // One day ahead: the controller's time moved on by the monotonic clock.
        mono.advance(Duration::from_secs(60));
        system.advance(ms(86_400_000 + 60_000));
        assert_eq!(clock.now(), t0() + ms(121_000));
        let h = clock.health();
        assert!(!h.trusted && h.alert.is_some() && h.alerts_raised == 1, "{h:?}");
        assert_eq!(h.skew_ms, 86_400_000 - 1_000);
        assert_eq!(h.reference, Some(Source::Controller));
        // Two hours behind: still the trusted time, still the same episode.
        mono.advance(Duration::from_secs(10));
        system.set(t0() + ms(131_000 - 7_200_000));
        assert_eq!(clock.now(), t0() + ms(131_000));
        assert_eq!(clock.health().alerts_raised, 1);
        assert!(clock.health().alert.expect("alert").contains("behind"));
        // Fixed: the system clock again, alert cleared.
        system.set(t0() + ms(131_500));
        assert_eq!(clock.now(), t0() + ms(131_500));
        let h = clock.health();
        assert!(h.trusted && h.alert.is_none() && h.alert_since.is_none(), "{h:?}");
        // The last good time is the guarded time, with the boot and monotonic reading.
        let kept = clock.last_good();
        assert_eq!(
            kept,
            LastGood { wall: t0() + ms(131_500), boot_id: Some("boot-a".into()), mono_ms: 230_000 }
        );
    }

    #[test]
    fn a_wrong_clock_at_start_is_corrected_by_the_first_session() {
        // Started a day ahead with nothing kept: nothing better is known yet.
        let (system, _mono, clock) = guarded(None);
        system.set(t0() + ms(86_400_000));
        let wrong = GuardedClock::new(
            system.clone(),
            Arc::new(ManualMonotonic::default()),
            None,
            TOL,
            None,
        );
        assert_eq!(wrong.now(), t0() + ms(86_400_000));
        assert!(wrong.health().trusted);
        // The first Welcome corrects it.
        wrong.controller_time(t0());
        assert_eq!(wrong.now(), t0());
        assert!(!wrong.health().trusted);
        // A jump after start is caught against the time the clock started with; should the
        // controller say the new time is right, it is trusted again.
        assert_eq!(clock.now(), t0());
        assert!(!clock.health().trusted);
        clock.controller_time(t0() + ms(86_400_000));
        assert_eq!(clock.now(), t0() + ms(86_400_000));
        assert!(clock.health().trusted);
    }

    #[test]
    fn a_restart_on_the_same_boot_keeps_the_reference() {
        // Kept at monotonic 40 s; the new process starts at 100 s with the clock a day ahead.
        let kept =
            LastGood { wall: t0() - ms(60_000), boot_id: Some("boot-a".into()), mono_ms: 40_000 };
        let system = Arc::new(ManualClock::new(t0() + ms(86_400_000)));
        let mono = Arc::new(ManualMonotonic::default());
        mono.advance(Duration::from_secs(100));
        let clock = GuardedClock::new(system, mono, Some("boot-a".into()), TOL, Some(&kept));
        assert_eq!(clock.now(), t0());
        let h = clock.health();
        assert_eq!((h.trusted, h.reference, h.alerts_raised), (false, Some(Source::LastGood), 1));
    }

    proptest! {
        /// Whatever the system clock does, the guarded time stays within the tolerance of the
        /// reference, and it is the system time exactly when that is within the tolerance.
        #[test]
        fn the_guarded_time_never_leaves_the_tolerance(
            steps in proptest::collection::vec((0u64..600_000, -200_000_000i64..200_000_000), 1..40),
            tolerance_s in 1u64..600,
        ) {
            let tolerance = Duration::from_secs(tolerance_s);
            let system = Arc::new(ManualClock::new(t0()));
            let mono = Arc::new(ManualMonotonic::default());
            let clock = GuardedClock::new(system.clone(), mono.clone(), None, tolerance, None);
            let mut elapsed = 0i64;
            let mut raised = 0u64;
            let mut alert = false;
            for (advance_ms, offset_ms) in steps {
                mono.advance(Duration::from_millis(advance_ms));
                elapsed += advance_ms as i64;
                let trusted_now = t0() + ms(elapsed);
                system.set(trusted_now + ms(offset_ms));
                let now = clock.now();
                let within = offset_ms.unsigned_abs() <= tolerance_s * 1_000;
                prop_assert!((now - trusted_now).num_milliseconds().unsigned_abs() <= tolerance_s * 1_000);
                prop_assert_eq!(now == trusted_now + ms(offset_ms), within);
                if !within && !alert {
                    raised += 1;
                }
                alert = !within;
                let h = clock.health();
                prop_assert_eq!(h.trusted, within);
                prop_assert_eq!(h.alert.is_some(), !within);
                prop_assert_eq!(h.alerts_raised, raised);
            }
        }
    }
}
