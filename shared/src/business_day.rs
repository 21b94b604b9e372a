//! Business-day arithmetic in a site's own time zone: which local date a moment belongs to and
//! how ticket numbers are formatted and wrap within a queue's range.

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;

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
}
