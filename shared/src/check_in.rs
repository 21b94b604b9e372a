//! Check-in of appointments at the branch, as pure rules both sides share: the short booking
//! reference of an appointment, what a kiosk scan may contain, the check-in window, the no-show
//! rule, and the vocabulary of attendance and conflicts that flows back to central in
//! `APPOINTMENT_STATUS` events (`events::AppointmentStatusChanged`).

use std::fmt;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::AppointmentId;
use crate::config::AppointmentPolicy;

/// Crockford's base32 alphabet: no I, L, O or U, so a reference read aloud or typed from paper
/// is hard to get wrong.
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Bits a reference carries: the last 40 bits of the appointment's UUID (random in a UUIDv7).
const REFERENCE_BITS: u32 = 40;
/// The prefix of the QR code printed on confirmations: `MERIDIAN:APPT:<reference>`.
pub const QR_PREFIX: &str = "MERIDIAN:APPT:";

/// A short human booking reference, `XXXX-XXXX` (8 Crockford base32 characters), derived from
/// the last 40 bits of the appointment's id. It is not globally unique (40 bits); the branch
/// resolves it among its own appointments, preferring today's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reference(u64);

impl Reference {
    /// The reference of `id`.
    pub fn of(id: &AppointmentId) -> Self {
        let n = id.0.as_u128() & ((1u128 << REFERENCE_BITS) - 1);
        // Masked to 40 bits, so it fits.
        Reference(n as u64)
    }

    /// Reads a reference typed or scanned: case-insensitive, with or without the dash (and
    /// spaces), `I`/`L` read as `1` and `O` as `0` as Crockford decoding does.
    pub fn parse(s: &str) -> Option<Self> {
        let mut n: u64 = 0;
        let mut digits = 0;
        for c in s.trim().chars() {
            if c == '-' || c == ' ' {
                continue;
            }
            let c = match c.to_ascii_uppercase() {
                'I' | 'L' => '1',
                'O' => '0',
                other => other,
            };
            let value = CROCKFORD.iter().position(|&a| char::from(a) == c)?;
            digits += 1;
            if digits > 8 {
                return None;
            }
            n = (n << 5) | value as u64;
        }
        (digits == 8).then_some(Reference(n))
    }

    /// The last ten hex digits of the id's text form (`…-xxxxxxxxxxxx`, lower case) that every
    /// appointment with this reference has: what a store matches (`substr(id, 27)`).
    pub fn id_suffix(&self) -> String {
        format!("{:010x}", self.0)
    }

    /// Whether `id` has this reference.
    pub fn matches(&self, id: &AppointmentId) -> bool {
        Reference::of(id) == *self
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; 9];
        let mut j = 0;
        for i in 0..8 {
            if i == 4 {
                out[j] = b'-';
                j += 1;
            }
            let shift = 5 * (7 - i);
            out[j] = CROCKFORD[((self.0 >> shift) & 31) as usize];
            j += 1;
        }
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

impl Serialize for Reference {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Reference {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Reference::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid booking reference {s:?}")))
    }
}

impl AppointmentId {
    /// The appointment's short booking reference (`XXXX-XXXX`).
    pub fn reference(&self) -> Reference {
        Reference::of(self)
    }
}

/// What a kiosk scan or a typed check-in text may name, to be tried in this order: the
/// appointment id, its booking reference, its external reference (a CRM's booking number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckInText {
    pub id: Option<AppointmentId>,
    pub reference: Option<Reference>,
    /// The text as given (trimmed), matched exactly against external references.
    pub external_ref: Option<String>,
}

impl CheckInText {
    /// Reads `text`: the reference (`XXXX-XXXX`, any case, dash optional), the QR text
    /// `MERIDIAN:APPT:<reference>`, the full appointment UUID, or an external reference.
    /// `None` for an empty or over-long text.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.is_empty() || text.chars().count() > 200 {
            return None;
        }
        let has_prefix = text.len() >= QR_PREFIX.len()
            && text.is_char_boundary(QR_PREFIX.len())
            && text[..QR_PREFIX.len()].eq_ignore_ascii_case(QR_PREFIX);
        if has_prefix {
            let rest = &text[QR_PREFIX.len()..];
            return Some(CheckInText {
                id: rest.trim().parse().ok(),
                reference: Reference::parse(rest),
                external_ref: None,
            });
        }
        Some(CheckInText {
            id: text.parse().ok(),
            reference: Reference::parse(text),
            external_ref: (text.chars().count() <= 100).then(|| text.to_owned()),
        })
    }
}

/// What the branch recorded of a customer's attendance of an appointment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attendance {
    /// Checked in; a visit waits in the appointment's queue.
    Arrived,
    /// The visit was called to a counter.
    Called,
    /// The visit was served and ended.
    Completed,
    /// Not arrived by the end of the check-in window, or a no-show when called.
    NoShow,
}

impl Attendance {
    pub const ALL: [Attendance; 4] =
        [Attendance::Arrived, Attendance::Called, Attendance::Completed, Attendance::NoShow];

    pub fn as_str(self) -> &'static str {
        match self {
            Attendance::Arrived => "arrived",
            Attendance::Called => "called",
            Attendance::Completed => "completed",
            Attendance::NoShow => "no_show",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

impl fmt::Display for Attendance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A central change that met an arrival the branch recorded while it was offline. The branch's
/// arrival wins; the conflict is kept for admins (both at the branch and centrally).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Conflict {
    /// Cancelled centrally while the customer was checked in at the branch.
    CancelledAfterArrival,
    /// Rescheduled centrally while (or after) the customer was checked in at the branch.
    RescheduledAfterArrival,
    /// Booked (or moved) centrally into a time the branch had closed before central knew
    /// (`closures`): the booking stands, flagged for admins to rebook or cancel.
    SlotClosedAtBranch,
}

impl Conflict {
    pub const ALL: [Conflict; 3] = [
        Conflict::CancelledAfterArrival,
        Conflict::RescheduledAfterArrival,
        Conflict::SlotClosedAtBranch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Conflict::CancelledAfterArrival => "cancelled_after_arrival",
            Conflict::RescheduledAfterArrival => "rescheduled_after_arrival",
            Conflict::SlotClosedAtBranch => "slot_closed_at_branch",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an appointment is in its life as central shows it, in the vocabulary:
/// the branch's attendance when there is one (the arrival wins over a later central change),
/// else cancelled, rescheduled or created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppointmentState {
    Created,
    Rescheduled,
    Cancelled,
    Arrived,
    Called,
    Completed,
    NoShow,
}

impl AppointmentState {
    pub fn of(
        status: crate::appointments::AppointmentStatus,
        rescheduled: bool,
        attendance: Option<Attendance>,
    ) -> Self {
        match (attendance, status) {
            (Some(Attendance::Arrived), _) => AppointmentState::Arrived,
            (Some(Attendance::Called), _) => AppointmentState::Called,
            (Some(Attendance::Completed), _) => AppointmentState::Completed,
            (Some(Attendance::NoShow), _) => AppointmentState::NoShow,
            (None, crate::appointments::AppointmentStatus::Cancelled) => {
                AppointmentState::Cancelled
            }
            (None, _) if rescheduled => AppointmentState::Rescheduled,
            (None, _) => AppointmentState::Created,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AppointmentState::Created => "created",
            AppointmentState::Rescheduled => "rescheduled",
            AppointmentState::Cancelled => "cancelled",
            AppointmentState::Arrived => "arrived",
            AppointmentState::Called => "called",
            AppointmentState::Completed => "completed",
            AppointmentState::NoShow => "no_show",
        }
    }
}

impl fmt::Display for AppointmentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When an appointment starting at `starts_at` may be checked in: from `check_in_early_minutes`
/// before its start to `check_in_late_minutes` after it, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckInWindow {
    pub opens: DateTime<Utc>,
    pub closes: DateTime<Utc>,
}

/// Where `now` falls against a check-in window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowCheck {
    TooEarly,
    Open,
    TooLate,
}

impl CheckInWindow {
    pub fn of(starts_at: DateTime<Utc>, policy: &AppointmentPolicy) -> Self {
        CheckInWindow {
            opens: starts_at - Duration::minutes(i64::from(policy.check_in_early_minutes)),
            closes: starts_at + Duration::minutes(i64::from(policy.check_in_late_minutes)),
        }
    }

    pub fn check(&self, now: DateTime<Utc>) -> WindowCheck {
        if now < self.opens {
            WindowCheck::TooEarly
        } else if now > self.closes {
            WindowCheck::TooLate
        } else {
            WindowCheck::Open
        }
    }

    /// The no-show rule: an appointment nobody checked in for is a no-show once its window
    /// has closed.
    pub fn no_show_due(&self, now: DateTime<Utc>) -> bool {
        self.check(now) == WindowCheck::TooLate
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn id(s: &str) -> AppointmentId {
        s.parse().expect("id")
    }

    #[test]
    fn references_are_the_ids_last_forty_bits_in_crockford_base32() {
        let check = |uuid: &str, expected: &str| {
            let r = id(uuid).reference();
            assert_eq!(r.to_string(), expected, "{uuid}");
            assert_eq!(Reference::parse(expected), Some(r));
            assert!(r.matches(&id(uuid)));
            assert!(uuid.ends_with(&r.id_suffix()), "{uuid} {}", r.id_suffix());
        };
        check("01937a4e-1d2c-7000-8000-000000000000", "0000-0000");
        check("01937a4e-1d2c-7000-8000-000000000001", "0000-0001");
        check("01937a4e-1d2c-7000-8000-00000000001f", "0000-000Z");
        check("01937a4e-1d2c-7000-8000-00ffffffffff", "ZZZZ-ZZZZ");
        // Bits above the last 40 do not change the reference.
        check("01937a4e-1d2c-7000-8fff-ff0000000020", "0000-0010");
        for _ in 0..200 {
            let a = AppointmentId::new();
            let r = a.reference();
            let text = r.to_string();
            assert_eq!(text.len(), 9);
            assert_eq!(&text[4..5], "-");
            assert_eq!(Reference::parse(&text), Some(r));
            assert_eq!(Reference::parse(&text.to_lowercase()), Some(r));
            assert_eq!(Reference::parse(&text.replace('-', "")), Some(r));
            assert!(a.to_string().ends_with(&r.id_suffix()));
        }
    }

    #[test]
    fn reference_parsing() {
        let r = Reference::parse("AB1C-D2EF").expect("ref");
        for same in ["ab1c-d2ef", "AB1CD2EF", " ab1c d2ef ", "AB1C-D2EF", "abIc-d2ef", "abLc-d2ef"]
        {
            assert_eq!(Reference::parse(same), Some(r), "{same}");
        }
        assert_eq!(Reference::parse("0O0O-0000"), Reference::parse("0000-0000"));
        for bad in ["", "ABC-DEF", "AB1C-D2EF0", "AB1C-D2EU", "AB1C_D2EF", "ÄB1C-D2EF"] {
            assert_eq!(Reference::parse(bad), None, "{bad}");
        }
        let json = serde_json::to_string(&r).expect("json");
        assert_eq!(json, "\"AB1C-D2EF\"");
        assert_eq!(serde_json::from_str::<Reference>("\"ab1cd2ef\"").expect("json"), r);
    }

    #[test]
    fn scanned_texts() {
        let a = id("01937a4e-1d2c-7000-8000-00000000abcd");
        let reference = a.reference();
        let check = |text: &str,
                     expected_id: Option<AppointmentId>,
                     expected_ref: Option<Reference>,
                     expected_ext: Option<&str>| {
            let scanned = CheckInText::parse(text).expect("parses");
            assert_eq!(scanned.id, expected_id, "{text}");
            assert_eq!(scanned.reference, expected_ref, "{text}");
            assert_eq!(scanned.external_ref.as_deref(), expected_ext, "{text}");
        };
        let text = reference.to_string();
        check(&text, None, Some(reference), Some(&text));
        check(&format!("MERIDIAN:APPT:{text}"), None, Some(reference), None);
        check(&format!("meridian:appt:{}", text.to_lowercase()), None, Some(reference), None);
        check(&a.to_string(), Some(a), None, Some(&a.to_string()));
        check("  CRM-778  ", None, None, Some("CRM-778"));
        assert_eq!(CheckInText::parse("   "), None);
        assert_eq!(CheckInText::parse(&"x".repeat(201)), None);
    }

    #[test]
    fn the_window_opens_early_and_closes_late_inclusive() {
        let start = Utc.with_ymd_and_hms(2026, 3, 9, 17, 0, 0).unwrap();
        let policy = AppointmentPolicy {
            slot_minutes: 15,
            capacity: 1,
            check_in_early_minutes: 30,
            check_in_late_minutes: 10,
        };
        let w = CheckInWindow::of(start, &policy);
        let check = |minutes_from_start: i64, seconds: i64, expected: WindowCheck| {
            let now = start + Duration::minutes(minutes_from_start) + Duration::seconds(seconds);
            assert_eq!(w.check(now), expected, "{minutes_from_start}m{seconds}s");
            assert_eq!(w.no_show_due(now), expected == WindowCheck::TooLate);
        };
        check(-31, 0, WindowCheck::TooEarly);
        check(-30, -1, WindowCheck::TooEarly);
        check(-30, 0, WindowCheck::Open);
        check(0, 0, WindowCheck::Open);
        check(10, 0, WindowCheck::Open);
        check(10, 1, WindowCheck::TooLate);
        check(60, 0, WindowCheck::TooLate);
    }

    #[test]
    fn the_state_prefers_the_branchs_attendance() {
        use crate::appointments::AppointmentStatus::{Booked, Cancelled};
        let check = |status, rescheduled, attendance, expected: &str| {
            let state = AppointmentState::of(status, rescheduled, attendance);
            assert_eq!(state.as_str(), expected, "{status:?} {rescheduled} {attendance:?}");
            assert_eq!(serde_json::to_string(&state).expect("json"), format!("\"{expected}\""));
        };
        check(Booked, false, None, "created");
        check(Booked, true, None, "rescheduled");
        check(Cancelled, false, None, "cancelled");
        check(Cancelled, true, None, "cancelled");
        check(Booked, false, Some(Attendance::Arrived), "arrived");
        check(Booked, true, Some(Attendance::Called), "called");
        // Cancelled centrally after the branch checked the customer in: the arrival wins.
        check(Cancelled, false, Some(Attendance::Completed), "completed");
        check(Booked, false, Some(Attendance::NoShow), "no_show");
    }

    #[test]
    fn attendance_and_conflict_codes_round_trip() {
        for a in Attendance::ALL {
            assert_eq!(Attendance::parse(a.as_str()), Some(a));
            assert_eq!(serde_json::to_string(&a).expect("json"), format!("\"{a}\""));
        }
        for c in Conflict::ALL {
            assert_eq!(Conflict::parse(c.as_str()), Some(c));
            assert_eq!(serde_json::to_string(&c).expect("json"), format!("\"{c}\""));
        }
        assert_eq!(Attendance::parse("booked"), None);
        assert_eq!(Conflict::parse("other"), None);
    }
}
