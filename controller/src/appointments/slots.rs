//! Where appointments may start: the slots of a service's policy on one day of a site, and the
//! check of one requested start. Pure functions of the configuration.
//!
//! Slots are laid out in the site's wall-clock time: each opening period of the weekday is cut
//! into `slot_minutes` steps from its opening time, and a slot exists only if it ends by the
//! period's close. A slot's instant is its wall-clock start in the site's zone; around a
//! daylight-saving change:
//! - a start the clocks skip (spring forward, e.g. 02:30 in Los Angeles on 2026-03-08) does not
//!   exist: no slot is listed there and booking it is refused with a clear error;
//! - a start the clocks pass twice (fall back, e.g. 01:30 on 2026-11-01) is the **earlier** of
//!   the two instants (still daylight time), so every wall-clock slot is one instant and the
//!   repeated hour offers no second set of slots.
//!
//! An appointment lasts `slot_minutes` of elapsed time from that instant.

use chrono::{DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use meridian_shared::config::{AppointmentPolicy, Day, Period, Site};

/// One slot of a service on one day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub local_start: NaiveDateTime,
    pub starts_at: DateTime<Utc>,
}

/// Every slot of `policy` on `day` at `site`, in time order: none on a closed date or a day
/// without opening hours; starts in a daylight-saving gap are left out.
pub fn day_slots(site: &Site, tz: Tz, policy: &AppointmentPolicy, day: NaiveDate) -> Vec<Slot> {
    let mut slots = Vec::new();
    if site.closed_dates.contains(&day) {
        return slots;
    }
    for period in periods(site, day) {
        for minute in slot_minutes_of(&period, policy.slot_minutes) {
            let local = at_minute(day, minute);
            if let Some(starts_at) = instant(tz, local) {
                slots.push(Slot { local_start: local, starts_at });
            }
        }
    }
    slots
}

/// Checks that `local` (a wall-clock start in the site's zone) is a slot of `policy`: an open
/// day, inside one opening period, on the slot grid, and an instant that exists. The error is
/// a message for the `start` field.
pub fn place(
    site: &Site,
    tz: Tz,
    policy: &AppointmentPolicy,
    local: NaiveDateTime,
) -> Result<Slot, String> {
    let day = local.date();
    if site.closed_dates.contains(&day) {
        return Err(format!("the site is closed on {day} (a closed date)"));
    }
    let periods = periods(site, day);
    if periods.is_empty() {
        return Err(format!("the site has no business hours on {} ({day})", day.weekday()));
    }
    if local.second() != 0 || local.nanosecond() != 0 {
        return Err("a start is a whole minute".into());
    }
    let minute = minute_of(local);
    let slot = policy.slot_minutes;
    let Some(period) = periods
        .iter()
        .find(|p| minute_of_time(p.open) <= minute && minute < minute_of_time(p.close))
    else {
        let hours: Vec<String> = periods.iter().map(|p| String::from(*p)).collect();
        return Err(format!(
            "{} is outside business hours on {} ({})",
            local.format("%H:%M"),
            day.weekday(),
            hours.join(", ")
        ));
    };
    let open = minute_of_time(period.open);
    if !(minute - open).is_multiple_of(slot) {
        let first: Vec<String> = slot_minutes_of(period, slot)
            .take(3)
            .map(|m| at_minute(day, m).format("%H:%M").to_string())
            .collect();
        return Err(format!(
            "{} is not a slot start: slots start every {slot} minutes from {} ({}, …)",
            local.format("%H:%M"),
            period.open.format("%H:%M"),
            first.join(", ")
        ));
    }
    if minute + slot > minute_of_time(period.close) {
        return Err(format!(
            "a {slot}-minute appointment at {} would end after closing time {}",
            local.format("%H:%M"),
            period.close.format("%H:%M")
        ));
    }
    let starts_at = instant(tz, local).ok_or_else(|| {
        format!(
            "{} does not exist on {day} in {}: the clocks skip it (daylight-saving change)",
            local.format("%H:%M"),
            tz.name()
        )
    })?;
    Ok(Slot { local_start: local, starts_at })
}

/// The instant of a wall-clock time in `tz`: `None` in a gap, the earlier one when ambiguous.
pub fn instant(tz: Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
        LocalResult::Ambiguous(earlier, _) => Some(earlier.with_timezone(&Utc)),
        LocalResult::None => None,
    }
}

/// The opening periods of `day`'s weekday, in order.
fn periods(site: &Site, day: NaiveDate) -> Vec<Period> {
    let mut periods =
        site.business_hours.get(&Day::from(day.weekday())).cloned().unwrap_or_default();
    periods.sort();
    periods
}

/// Minutes after midnight at which the slots of `period` start.
fn slot_minutes_of(period: &Period, slot: u32) -> impl Iterator<Item = u32> {
    let (open, close) = (minute_of_time(period.open), minute_of_time(period.close));
    (open..).step_by(slot.max(1) as usize).take_while(move |m| m + slot <= close)
}

fn minute_of_time(t: chrono::NaiveTime) -> u32 {
    t.num_seconds_from_midnight() / 60
}

fn minute_of(t: NaiveDateTime) -> u32 {
    minute_of_time(t.time())
}

fn at_minute(day: NaiveDate, minute: u32) -> NaiveDateTime {
    day.and_time(chrono::NaiveTime::MIN) + chrono::Duration::minutes(i64::from(minute))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn site(hours: &[(Day, &str)], closed: &[&str]) -> Site {
        let mut business_hours = BTreeMap::new();
        for (day, period) in hours {
            business_hours
                .entry(*day)
                .or_insert_with(Vec::new)
                .push(period.to_string().try_into().expect("period"));
        }
        Site {
            code: meridian_shared::SiteCode::parse("SFO").expect("code"),
            name: "SF".into(),
            time_zone: "America/Los_Angeles".into(),
            business_hours,
            closed_dates: closed.iter().map(|d| d.parse().expect("date")).collect(),
            tags: vec![],
            end_of_day: Default::default(),
            share_customer_data: false,
            appointment_sync: Default::default(),
        }
    }

    fn policy(slot_minutes: u32) -> AppointmentPolicy {
        AppointmentPolicy {
            slot_minutes,
            capacity: 1,
            check_in_early_minutes: 30,
            check_in_late_minutes: 15,
        }
    }

    fn local(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M").expect("local time")
    }

    fn la() -> Tz {
        "America/Los_Angeles".parse().expect("tz")
    }

    #[test]
    fn slots_follow_periods_and_skip_the_gap() {
        let s = site(
            &[(Day::Mon, "09:00-10:00"), (Day::Mon, "13:10-14:00"), (Day::Sun, "01:00-04:00")],
            &["2026-03-16"],
        );
        let starts = |day: &str, minutes| {
            day_slots(&s, la(), &policy(minutes), day.parse().expect("day"))
                .iter()
                .map(|slot| {
                    format!(
                        "{}={}",
                        slot.local_start.format("%H:%M"),
                        slot.starts_at.format("%H:%MZ")
                    )
                })
                .collect::<Vec<_>>()
        };
        // A 20-minute grid from each period's opening; 13:50 would end after 14:00.
        assert_eq!(
            starts("2026-03-09", 20),
            ["09:00=16:00Z", "09:20=16:20Z", "09:40=16:40Z", "13:10=20:10Z", "13:30=20:30Z"]
        );
        assert!(starts("2026-03-16", 20).is_empty(), "closed date");
        assert!(starts("2026-03-10", 20).is_empty(), "no hours on Tuesdays");
        // Spring forward: 02:00-02:59 does not exist; 03:00 PDT follows 01:59 PST.
        assert_eq!(
            starts("2026-03-08", 30),
            ["01:00=09:00Z", "01:30=09:30Z", "03:00=10:00Z", "03:30=10:30Z"]
        );
        // Fall back: 01:00-01:59 happens twice; a slot is its earlier (PDT) instant.
        assert_eq!(
            starts("2026-11-01", 30),
            [
                "01:00=08:00Z",
                "01:30=08:30Z",
                "02:00=10:00Z",
                "02:30=10:30Z",
                "03:00=11:00Z",
                "03:30=11:30Z"
            ]
        );
    }

    #[test]
    fn starts_are_checked() {
        let s = site(&[(Day::Mon, "09:00-12:00"), (Day::Sun, "01:00-04:00")], &["2026-03-16"]);
        let check = |start: &str, minutes: u32, expected: Result<&str, &str>| {
            let got = place(&s, la(), &policy(minutes), local(start));
            match (&got, expected) {
                (Ok(slot), Ok(want)) => {
                    assert_eq!(slot.starts_at.to_rfc3339(), want, "{start}");
                    assert_eq!(slot.local_start, local(start));
                }
                (Err(got), Err(want)) => assert!(got.contains(want), "{start}: {got} / {want}"),
                _ => panic!("{start}: got {got:?}, want {expected:?}"),
            }
        };
        check("2026-03-09T09:00", 15, Ok("2026-03-09T16:00:00+00:00"));
        check("2026-03-09T11:45", 15, Ok("2026-03-09T18:45:00+00:00"));
        check("2026-03-09T11:45", 30, Err("is not a slot start"));
        check("2026-03-09T11:40", 40, Err("would end after closing time 12:00"));
        check("2026-03-09T09:10", 15, Err("slots start every 15 minutes from 09:00"));
        check("2026-03-09T12:00", 15, Err("outside business hours"));
        check("2026-03-09T08:45", 15, Err("outside business hours"));
        check("2026-03-10T09:00", 15, Err("no business hours on Tue"));
        check("2026-03-16T09:00", 15, Err("closed on 2026-03-16"));
        check("2026-03-08T02:30", 30, Err("does not exist on 2026-03-08 in America/Los_Angeles"));
        check("2026-03-08T03:00", 30, Ok("2026-03-08T10:00:00+00:00"));
        check("2026-11-01T01:30", 30, Ok("2026-11-01T08:30:00+00:00"));
    }
}
