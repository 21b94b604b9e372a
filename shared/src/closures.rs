//! Closures the branch decides on its own: staff close part of a day at the site (an emergency,
//! too few staff) from the branch, offline or not. The agent records one with `BRANCH_CLOSED`
//! (and its withdrawal with `BRANCH_REOPENED`); central then refuses bookings into it, and an
//! appointment booked there before central knew is flagged `slot_closed_at_branch` on both
//! sides (`check_in::Conflict`).

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::ValidationErrors;

/// Longest closure reason, in characters.
pub const MAX_REASON: usize = 200;

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

    /// Checks a closure as staff entered it: `from` before `to`, a reason of at most
    /// `MAX_REASON` characters, not on a day already over at the site (`today`).
    pub fn validate(&self, today: NaiveDate) -> Result<(), ValidationErrors> {
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
        assert!(c.validate(day).is_ok());
        let json = serde_json::to_value(BranchClosed { closure: c.clone(), at: Utc::now() })
            .expect("json");
        assert_eq!((json["from"].as_str(), json["to"].as_str()), (Some("14:00"), Some("16:00")));
        let bad = Closure { from: t("16:00"), to: t("14:00"), reason: " ".into(), ..c.clone() };
        let errs = bad.validate(day.succ_opt().expect("day")).expect_err("invalid");
        let fields: Vec<_> = errs.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["to", "reason", "date"]);
        assert!(hh_mm::parse("25:00").is_err());
    }
}
