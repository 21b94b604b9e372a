//! Business-day arithmetic in a site's own time zone: which local date a moment belongs to and
//! how ticket numbers are formatted and wrap within a queue's range.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

use crate::config::{Day, Site};

/// The site-local calendar date of `now`; ticket numbering restarts when it changes.
pub fn business_day(tz: Tz, now: DateTime<Utc>) -> NaiveDate {
    now.with_timezone(&tz).date_naive()
}

/// The number that follows `last` (the previous ticket's number today, `None` for the first
/// ticket of the day) within `first..=last_number`, wrapping to `first` after the end.
pub fn next_ticket_number(previous: Option<u32>, first: u32, last_number: u32) -> u32 {
    match previous {
        Some(n) if n >= first && n < last_number => n + 1,
        _ => first,
    }
}

/// `A` + `42` → `A042` (at least three digits).
pub fn format_ticket(letter: &str, number: u32) -> String {
    format!("{letter}{number:03}")
}

/// When business day `day` closes: the end of its last opening period, in UTC. `None` when the
/// site has no opening hours that day (closed date or no periods).
pub fn closing_time(site: &Site, tz: Tz, day: NaiveDate) -> Option<DateTime<Utc>> {
    if site.closed_dates.contains(&day) {
        return None;
    }
    let close =
        site.business_hours.get(&Day::from(day.weekday()))?.iter().map(|p| p.close).max()?;
    // In a daylight-saving gap the wall time does not exist; the first instant after it counts.
    let local = day.and_time(close);
    let resolved = tz
        .from_local_datetime(&local)
        .earliest()
        .or_else(|| tz.from_local_datetime(&(local + chrono::Duration::hours(1))).earliest())?;
    Some(resolved.with_timezone(&Utc))
}

/// Whether a visit of business day `day`, created at `created`, still open at `now` must be
/// ended under the site's end-of-day rule: once the site's next calendar day has begun, or —
/// if it was open when the site closed — once closing time plus the grace period has passed.
pub fn day_is_over(
    site: &Site,
    tz: Tz,
    day: NaiveDate,
    created: DateTime<Utc>,
    now: DateTime<Utc>,
) -> bool {
    if !site.end_of_day.close_open_visits {
        return false;
    }
    if business_day(tz, now) > day {
        return true;
    }
    let grace = chrono::Duration::minutes(i64::from(site.end_of_day.grace_minutes));
    closing_time(site, tz, day).is_some_and(|close| created < close && now >= close + grace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn day_is_local() {
        // 2026-03-08 06:30 UTC is still 2026-03-07 in San Francisco, already the 8th in Tokyo.
        let now = Utc.with_ymd_and_hms(2026, 3, 8, 6, 30, 0).unwrap();
        let la: Tz = "America/Los_Angeles".parse().unwrap();
        let tokyo: Tz = "Asia/Tokyo".parse().unwrap();
        assert_eq!(business_day(la, now), NaiveDate::from_ymd_opt(2026, 3, 7).unwrap());
        assert_eq!(business_day(tokyo, now), NaiveDate::from_ymd_opt(2026, 3, 8).unwrap());
    }

    #[test]
    fn numbers_wrap_in_range() {
        let check = |prev, expected| assert_eq!(next_ticket_number(prev, 5, 7), expected);
        check(None, 5);
        check(Some(5), 6);
        check(Some(6), 7);
        check(Some(7), 5);
        check(Some(1), 5);
        assert_eq!(format_ticket("A", 42), "A042");
        assert_eq!(format_ticket("BC", 1234), "BC1234");
    }

    fn site(hours: &[(Day, &str)], closed: &[NaiveDate]) -> Site {
        let mut business_hours = std::collections::BTreeMap::new();
        for (day, period) in hours {
            business_hours
                .entry(*day)
                .or_insert_with(Vec::new)
                .push(period.to_string().try_into().expect("period"));
        }
        Site {
            code: crate::SiteCode::parse("SFO").expect("code"),
            name: "SF".into(),
            time_zone: "America/Los_Angeles".into(),
            business_hours,
            closed_dates: closed.to_vec(),
            tags: vec![],
            end_of_day: Default::default(),
            share_customer_data: false,
            appointment_sync: Default::default(),
        }
    }

    #[test]
    fn end_of_day_rule() {
        let la: Tz = "America/Los_Angeles".parse().expect("tz");
        // Sunday 2026-03-08 is the spring-forward day in Los Angeles; Monday the 9th is PDT.
        let mon = NaiveDate::from_ymd_opt(2026, 3, 9).expect("date");
        let s = site(&[(Day::Mon, "09:00-12:00"), (Day::Mon, "13:00-17:00")], &[]);
        assert_eq!(
            closing_time(&s, la, mon),
            Some(Utc.with_ymd_and_hms(2026, 3, 10, 0, 0, 0).unwrap())
        );
        let morning = Utc.with_ymd_and_hms(2026, 3, 9, 17, 0, 0).unwrap();
        let check = |s: &Site, now: DateTime<Utc>, expected: bool| {
            assert_eq!(day_is_over(s, la, mon, morning, now), expected, "{now}");
        };
        // A ticket taken after closing waits for the next calendar day.
        let late = Utc.with_ymd_and_hms(2026, 3, 10, 1, 0, 0).unwrap();
        assert!(!day_is_over(&s, la, mon, late, late + chrono::Duration::hours(1)));
        assert!(day_is_over(
            &s,
            la,
            mon,
            late,
            Utc.with_ymd_and_hms(2026, 3, 10, 7, 0, 0).unwrap()
        ));
        // 17:29 local (grace 30 min) not yet, 17:30 yes; next local day always.
        check(&s, Utc.with_ymd_and_hms(2026, 3, 10, 0, 29, 0).unwrap(), false);
        check(&s, Utc.with_ymd_and_hms(2026, 3, 10, 0, 30, 0).unwrap(), true);
        let closed_all_day = site(&[], &[mon]);
        check(&closed_all_day, Utc.with_ymd_and_hms(2026, 3, 10, 6, 59, 0).unwrap(), false);
        check(&closed_all_day, Utc.with_ymd_and_hms(2026, 3, 10, 7, 0, 0).unwrap(), true);
        let mut keep = s.clone();
        keep.end_of_day.close_open_visits = false;
        check(&keep, Utc.with_ymd_and_hms(2026, 3, 11, 0, 0, 0).unwrap(), false);
        // A closing time inside the spring-forward gap (02:30 does not exist on 2026-03-08).
        let sun = NaiveDate::from_ymd_opt(2026, 3, 8).expect("date");
        let night = site(&[(Day::Sun, "01:00-02:30")], &[]);
        assert_eq!(
            closing_time(&night, la, sun),
            Some(Utc.with_ymd_and_hms(2026, 3, 8, 10, 30, 0).unwrap())
        );
    }
}
