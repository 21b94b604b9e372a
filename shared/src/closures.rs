//! Closures the branch decides on its own: staff close part of a day at the site (an emergency,
//! too few staff) from the branch, offline or not. The agent records one with `BRANCH_CLOSED`
//! (and its withdrawal with `BRANCH_REOPENED`); central then refuses bookings into it, and an
//! appointment booked there before central knew is flagged `slot_closed_at_branch` on both
//! sides (`check_in::Conflict`).

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::ValidationErrors;

/// Longest closure reason, in characters.
pub const MAX_REASON: usize = 200;
/// How far ahead a closure may start or end, in days from now.
pub const MAX_HORIZON_DAYS: u64 = 366;

/// A closed part of one site-local day: `[from, to)` in the site's wall clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closure {
    pub id: uuid::Uuid,
    pub day: NaiveDate,
    #[serde(with = "hh_mm")]
    pub from: NaiveTime,
    #[serde(with = "hh_mm")]
    pub to: NaiveTime,
    pub reason: String,
}

impl Closure {
    /// Whether an appointment of `day` starting at `start` (site wall clock) and lasting
    /// `minutes` overlaps the closure.
    pub fn overlaps(&self, day: NaiveDate, start: NaiveTime, minutes: u32) -> bool {
        if day != self.day {
            return false;
        }
        let start_m = minutes_of(start);
        let end_m = start_m + i64::from(minutes.max(1));
        start_m < minutes_of(self.to) && minutes_of(self.from) < end_m
    }

    /// Whether the closure starts or ends more than `MAX_HORIZON_DAYS` after `local_now`
    /// (the site's wall clock).
    pub fn beyond_horizon(&self, local_now: NaiveDateTime) -> bool {
        let Some(horizon) = local_now.checked_add_days(chrono::Days::new(MAX_HORIZON_DAYS)) else {
            return false;
        };
        self.day.and_time(self.from) > horizon || self.day.and_time(self.to) > horizon
    }

    /// Whether a closure that reached central with `BRANCH_CLOSED` is beyond the horizon from
    /// when the branch made it (`at`), in any time zone the site may be in.
    pub fn beyond_horizon_of(&self, at: DateTime<Utc>) -> bool {
        // No zone is ahead of UTC by more than 14 hours.
        self.beyond_horizon(at.naive_utc() + chrono::Duration::hours(14))
    }

    /// Checks a closure as staff entered it: `from` before `to`, a reason of at most
    /// `MAX_REASON` characters, not on a day already over at the site (`today`), not starting
    /// or ending more than `MAX_HORIZON_DAYS` after `local_now` (the site's wall clock).
    pub fn validate(
        &self,
        today: NaiveDate,
        local_now: NaiveDateTime,
    ) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        if self.from >= self.to {
            errs.push("to", "must be after from");
        }
        if self.reason.trim().is_empty() {
            errs.push("reason", "required");
        } else if self.reason.chars().count() > MAX_REASON {
            errs.push("reason", format!("at most {MAX_REASON} characters"));
        }
        if self.day < today {
            errs.push("date", format!("{} is over at this site", self.day));
        } else if self.beyond_horizon(local_now) {
            errs.push(
                "date",
                format!("a closure may not start or end more than {MAX_HORIZON_DAYS} days ahead"),
            );
        }
        errs.into_result()
    }
}

fn minutes_of(t: NaiveTime) -> i64 {
    i64::from(chrono::Timelike::num_seconds_from_midnight(&t)) / 60
}

/// The payload of `BRANCH_CLOSED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchClosed {
    #[serde(flatten)]
    pub closure: Closure,
    pub at: DateTime<Utc>,
}

/// The payload of `BRANCH_REOPENED`: the closure is withdrawn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchReopened {
    pub closure_id: uuid::Uuid,
    pub at: DateTime<Utc>,
}

/// `NaiveTime` as `"HH:MM"`.
pub mod hh_mm {
    use chrono::NaiveTime;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &NaiveTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.format("%H:%M").to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NaiveTime, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }

    /// `"HH:MM"` (also `"24:00"`, the end of the day, as 23:59).
    pub fn parse(s: &str) -> Result<NaiveTime, String> {
        let s = s.trim();
        if s == "24:00" {
            return NaiveTime::from_hms_opt(23, 59, 0).ok_or_else(|| "invalid time".into());
        }
        NaiveTime::parse_from_str(s, "%H:%M")
            .map_err(|_| format!("invalid time {s:?}: expected \"HH:MM\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: &str) -> NaiveTime {
        hh_mm::parse(s).expect("time")
    }

    #[test]
    fn overlap_is_half_open_on_the_same_day() {
        let day = NaiveDate::from_ymd_opt(2026, 3, 9).expect("day");
        let c = Closure {
            id: uuid::Uuid::now_v7(),
            day,
            from: t("14:00"),
            to: t("16:00"),
            reason: "staff shortage".into(),
        };
        assert!(c.overlaps(day, t("14:00"), 15));
        assert!(c.overlaps(day, t("13:50"), 15), "ends inside");
        assert!(c.overlaps(day, t("15:45"), 15));
        assert!(!c.overlaps(day, t("13:45"), 15), "ends as it begins");
        assert!(!c.overlaps(day, t("16:00"), 15), "starts as it ends");
        assert!(!c.overlaps(day.succ_opt().expect("day"), t("15:00"), 15));
        let nine = day.and_hms_opt(9, 0, 0).expect("time");
        assert!(c.validate(day, nine).is_ok());
        let json = serde_json::to_value(BranchClosed { closure: c.clone(), at: Utc::now() })
            .expect("json");
        assert_eq!((json["from"].as_str(), json["to"].as_str()), (Some("14:00"), Some("16:00")));
        let bad = Closure { from: t("16:00"), to: t("14:00"), reason: " ".into(), ..c.clone() };
        let errs = bad.validate(day.succ_opt().expect("day"), nine).expect_err("invalid");
        let fields: Vec<_> = errs.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["to", "reason", "date"]);
        assert!(hh_mm::parse("25:00").is_err());
    }

    #[test]
    fn a_closure_may_start_and_end_at_most_366_days_ahead() {
        let today = NaiveDate::from_ymd_opt(2026, 3, 9).expect("day");
        let now = today.and_hms_opt(9, 0, 0).expect("time");
        let on = |day: NaiveDate, from: &str, to: &str| Closure {
            id: uuid::Uuid::now_v7(),
            day,
            from: t(from),
            to: t(to),
            reason: "renovation".into(),
        };
        let last = today + chrono::Days::new(MAX_HORIZON_DAYS);
        assert!(on(last, "08:00", "09:00").validate(today, now).is_ok(), "ends exactly then");
        let ends_late = on(last, "08:00", "10:00").validate(today, now).expect_err("ends late");
        assert_eq!(ends_late.0[0].field, "date");
        assert!(ends_late.0[0].message.contains("366 days"), "{ends_late:?}");
        let far = on(today + chrono::Days::new(10_000), "08:00", "09:00");
        assert!(far.validate(today, now).is_err());
        let at = Utc.with_ymd_and_hms(2026, 3, 9, 9, 0, 0).single().expect("at");
        assert!(far.beyond_horizon_of(at));
        assert!(!on(last, "08:00", "10:00").beyond_horizon_of(at), "a zone ahead of UTC");
        assert!(on(last.succ_opt().expect("day"), "00:00", "01:00").beyond_horizon_of(at));
    }
}
