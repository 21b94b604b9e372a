//! Human-readable output: tables from the API's JSON, change reports, created secrets. Pure
//! functions of their input and the current time, so they are tested without a server.

use chrono::{DateTime, Utc};
use comfy_table::{Table, presets};
use serde_json::Value;

use super::{Action, ChangeReport, Listing};

/// A borderless table (kubectl style) of `items`, one row each, as listed by `listing`. An empty
/// list renders the header only.
pub fn table(listing: Listing, items: &[Value], now: DateTime<Utc>) -> String {
    let row = |v: &Value| -> Vec<String> {
        match listing {
            Listing::Sites => vec![
                text(v, "code"),
                text(v, "name"),
                text(v, "time_zone"),
                hours(v.get("business_hours")),
                count(v.get("closed_dates")),
                text(v, "tags"),
            ],
            Listing::Services => vec![
                text(v, "site"),
                text(v, "code"),
                text(v, "name"),
                text(v, "queue"),
                minutes(v.get("kpi_wait_minutes")),
            ],
            Listing::Queues => vec![
                text(v, "site"),
                text(v, "code"),
                text(v, "name"),
                text(v, "letter"),
                format!("{}-{}", text(v, "first_number"), text(v, "last_number")),
            ],
            Listing::ServicePoints => {
                vec![text(v, "site"), text(v, "code"), text(v, "name"), text(v, "work_profile")]
            }
            Listing::WorkProfiles => {
                vec![
                    text(v, "site"),
                    text(v, "code"),
                    text(v, "name"),
                    profile_queues(v.get("queues")),
                ]
            }
            Listing::Staff => {
                vec![text(v, "username"), text(v, "name"), text(v, "roles"), text(v, "sites")]
            }
            Listing::ConnectorKeys => vec![text(v, "site"), text(v, "code"), text(v, "name")],
            Listing::Webhooks => {
                vec![text(v, "site"), text(v, "code"), text(v, "url"), text(v, "kinds")]
            }
            Listing::Agents => vec![
                text(v, "site"),
                short_id(&text(v, "id")),
                text(v, "hostname"),
                connected(v),
                text(v, "version"),
                format!("{}/{}", text(v, "config_revision"), text(v, "site_revision")),
                text(v, "acked_seq"),
                text(v, "outbox_pending"),
                match time(v.get("last_seen")) {
                    Some(t) => format!("{} ago", age(now, t)),
                    None => "never".into(),
                },
                skew(v.get("clock_skew_ms").and_then(Value::as_i64)),
                agent_error(v),
            ],
            Listing::EnrollmentTokens => vec![
                short_id(&text(v, "id")),
                text(v, "site"),
                enrollment_status(v, now),
                timestamp(v.get("created_at")),
                timestamp(v.get("expires_at")),
            ],
            Listing::ApiTokens => {
                vec![
                    text(v, "id"),
                    text(v, "name"),
                    text(v, "role"),
                    timestamp(v.get("created_at")),
                ]
            }
            Listing::Revisions => vec![
                text(v, "revision"),
                timestamp(v.get("created_at")),
                text(v, "actor"),
                text(v, "summary"),
            ],
        }
    };
    grid(headers(listing), items.iter().map(row))
}

/// The column titles of `table`.
pub fn headers(listing: Listing) -> &'static [&'static str] {
    match listing {
        Listing::Sites => &["CODE", "NAME", "TIME ZONE", "HOURS", "CLOSED DATES", "TAGS"],
        Listing::Services => &["SITE", "CODE", "NAME", "QUEUE", "KPI WAIT"],
        Listing::Queues => &["SITE", "CODE", "NAME", "LETTER", "NUMBERS"],
        Listing::ServicePoints => &["SITE", "CODE", "NAME", "WORK PROFILE"],
        Listing::WorkProfiles => &["SITE", "CODE", "NAME", "QUEUES"],
        Listing::Staff => &["USERNAME", "NAME", "ROLES", "SITES"],
        Listing::ConnectorKeys => &["SITE", "CODE", "NAME"],
        Listing::Webhooks => &["SITE", "CODE", "URL", "KINDS"],
        Listing::Agents => &[
            "SITE",
            "ID",
            "HOST",
            "CONNECTED",
            "VERSION",
            "CONFIG",
            "ACKED",
            "BACKLOG",
            "LAST SEEN",
            "SKEW",
            "ERROR",
        ],
        Listing::EnrollmentTokens => &["ID", "SITE", "STATUS", "CREATED", "EXPIRES"],
        Listing::ApiTokens => &["ID", "NAME", "ROLE", "CREATED"],
        Listing::Revisions => &["REVISION", "CREATED", "ACTOR", "SUMMARY"],
    }
}

/// kubectl-style: one line per resource, then the revision and the published sites.
pub fn report(report: &ChangeReport) -> String {
    let mut out = String::new();
    for change in &report.changes {
        let action = match change.action {
            Action::Created => "created",
            Action::Updated => "updated",
            Action::Unchanged => "unchanged",
            Action::Deleted => "deleted",
        };
        let suffix =
            if report.dry_run && change.action != Action::Unchanged { " (dry run)" } else { "" };
        out.push_str(&format!("{} {action}{suffix}\n", change.resource));
    }
    let changed = report.changes.iter().any(|c| c.action != Action::Unchanged);
    let sites = report.sites_published.join(", ");
    let summary = match (report.dry_run, changed, sites.is_empty()) {
        (_, false, _) => format!("no changes; configuration revision {}", report.revision),
        (true, true, true) => format!(
            "dry run: nothing stored; configuration revision stays {}; no site would get a new configuration",
            report.revision
        ),
        (true, true, false) => format!(
            "dry run: nothing stored; configuration revision stays {}; would publish to {sites}",
            report.revision
        ),
        (false, true, true) => {
            format!("configuration revision {}; no site configuration changed", report.revision)
        }
        (false, true, false) => {
            format!("configuration revision {}; published to {sites}", report.revision)
        }
    };
    out.push_str(&summary);
    out.push('\n');
    out
}

/// `label: value` lines, aligned, for one object (a created token, a revoked agent).
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    pairs.iter().map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:"))).collect()
}

/// A timestamp as tables show it, or `-`.
pub fn timestamp(v: Option<&Value>) -> String {
    time(v).map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string()).unwrap_or_else(|| "-".into())
}

/// The first 8 characters of an id, as tables show it.
pub fn short_id(id: &str) -> String {
    id.chars().take(8).collect()
}

/// Rows under headers, columns three spaces apart, no borders.
pub(super) fn grid(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    t.set_header(headers.to_vec());
    for row in rows {
        t.add_row(row);
    }
    let last = headers.len().saturating_sub(1);
    for (i, col) in t.column_iter_mut().enumerate() {
        col.set_padding((0, if i == last { 0 } else { 3 }));
    }
    let mut s = t.trim_fmt();
    s.push('\n');
    s
}

/// A field as text: strings as-is, numbers and booleans printed, lists joined, absent as `-`.
fn text(v: &Value, field: &str) -> String {
    match v.get(field) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) if s.is_empty() => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) if items.is_empty() => "-".into(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned).unwrap_or_else(|| i.to_string()))
            .collect::<Vec<_>>()
            .join(", "),
        Some(other) => other.to_string(),
    }
}

fn time(v: Option<&Value>) -> Option<DateTime<Utc>> {
    let s = v?.as_str()?;
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
}

fn count(v: Option<&Value>) -> String {
    match v.and_then(Value::as_array).map(Vec::len) {
        None | Some(0) => "-".into(),
        Some(n) => n.to_string(),
    }
}

fn minutes(v: Option<&Value>) -> String {
    v.and_then(Value::as_u64).map(|m| format!("{m}m")).unwrap_or_else(|| "-".into())
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Business hours, consecutive days with the same periods grouped: `mon-fri 09:00-17:00; sat
/// 10:00-14:00`.
fn hours(v: Option<&Value>) -> String {
    let Some(map) = v.and_then(Value::as_object) else {
        return "-".into();
    };
    let periods: Vec<Option<String>> = DAYS
        .iter()
        .map(|d| {
            let list = map.get(*d)?.as_array()?;
            let list: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
            (!list.is_empty()).then(|| list.join(","))
        })
        .collect();
    let mut groups = Vec::new();
    let mut i = 0;
    while i < DAYS.len() {
        let mut j = i;
        while j + 1 < DAYS.len() && periods[j + 1] == periods[i] {
            j += 1;
        }
        if let Some(p) = &periods[i] {
            let days = if i == j { DAYS[i].to_owned() } else { format!("{}-{}", DAYS[i], DAYS[j]) };
            groups.push(format!("{days} {p}"));
        }
        i = j + 1;
    }
    if groups.is_empty() { "-".into() } else { groups.join("; ") }
}

fn profile_queues(v: Option<&Value>) -> String {
    let Some(entries) = v.and_then(Value::as_array) else {
        return "-".into();
    };
    entries
        .iter()
        .map(|e| {
            let queue = text(e, "queue");
            match e.get("min_wait_minutes").and_then(Value::as_u64) {
                Some(m) => format!("{queue} (after {m}m)"),
                None => queue,
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn connected(v: &Value) -> String {
    let flag = |f: &str| v.get(f).and_then(Value::as_bool).unwrap_or(false);
    if flag("revoked") {
        "revoked".into()
    } else if flag("connected") {
        "yes".into()
    } else {
        "no".into()
    }
}

fn agent_error(v: &Value) -> String {
    let err = ["store_error", "command_error"]
        .iter()
        .filter_map(|f| v.get(*f).and_then(Value::as_str))
        .find(|s| !s.is_empty());
    match err {
        Some(e) if e.chars().count() > 40 => format!("{}…", e.chars().take(39).collect::<String>()),
        Some(e) => e.to_owned(),
        None => "-".into(),
    }
}

fn enrollment_status(v: &Value, now: DateTime<Utc>) -> String {
    if let Some(agent) = v.get("used_by_agent").and_then(Value::as_str) {
        return format!("used by {}", short_id(agent));
    }
    if time(v.get("used_at")).is_some() {
        return "used".into();
    }
    match time(v.get("expires_at")) {
        Some(t) if t <= now => "expired".into(),
        Some(t) => format!("valid for {}", age(t, now)),
        None => "-".into(),
    }
}

/// `later - earlier`, coarsely: `42s`, `5m`, `3h`, `1h59m`, `2d`, `2d3h`; never negative.
fn age(later: DateTime<Utc>, earlier: DateTime<Utc>) -> String {
    let secs = (later - earlier).num_seconds().max(0);
    let two = |big: i64, big_unit: &str, small: i64, small_unit: &str| {
        if small == 0 {
            format!("{big}{big_unit}")
        } else {
            format!("{big}{big_unit}{small}{small_unit}")
        }
    };
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => two(s / 3600, "h", s % 3600 / 60, "m"),
        s => two(s / 86_400, "d", s % 86_400 / 3600, "h"),
    }
}

/// Agent clock minus controller clock: `0ms`, `+120ms`, `-1.5s`, `+3m`.
fn skew(ms: Option<i64>) -> String {
    let Some(ms) = ms else { return "-".into() };
    let sign = if ms > 0 {
        "+"
    } else if ms < 0 {
        "-"
    } else {
        ""
    };
    let abs = ms.unsigned_abs();
    match abs {
        a if a < 1000 => format!("{sign}{a}ms"),
        a if a < 60_000 => format!("{sign}{:.1}s", a as f64 / 1000.0),
        a => format!("{sign}{}m", a / 60_000),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::Change;
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2025-06-01T12:00:00Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    }

    fn check(listing: Listing, items: Value, expected: &str) {
        let items = items.as_array().cloned().unwrap_or_default();
        let got = table(listing, &items, now());
        assert_eq!(got, expected, "\n--- got ---\n{got}--- want ---\n{expected}");
    }

    #[test]
    fn config_tables() {
        check(Listing::Sites, json!([]), "CODE   NAME   TIME ZONE   HOURS   CLOSED DATES   TAGS\n");
        check(
            Listing::Sites,
            json!([
                {"code": "SFO", "name": "San Francisco", "time_zone": "America/Los_Angeles",
                 "business_hours": {"mon": ["09:00-12:00", "13:00-17:00"], "tue": ["09:00-12:00", "13:00-17:00"],
                                    "wed": ["09:00-12:00", "13:00-17:00"], "sat": ["10:00-14:00"], "sun": []},
                 "closed_dates": ["2025-12-25", "2026-01-01"], "tags": ["west", "pilot"]},
                {"code": "CHI", "name": "Chicago", "time_zone": "America/Chicago"}
            ]),
            "\
CODE   NAME            TIME ZONE             HOURS                                              CLOSED DATES   TAGS
SFO    San Francisco   America/Los_Angeles   mon-wed 09:00-12:00,13:00-17:00; sat 10:00-14:00   2              west, pilot
CHI    Chicago         America/Chicago       -                                                  -              -
",
        );
        check(
            Listing::Services,
            json!([{"kind": "service", "site": "SFO", "code": "ACC", "name": "Accounts", "queue": "A", "kpi_wait_minutes": 15},
                   {"kind": "service", "site": "SFO", "code": "LN", "name": "Loans", "queue": "B"}]),
            "\
SITE   CODE   NAME       QUEUE   KPI WAIT
SFO    ACC    Accounts   A       15m
SFO    LN     Loans      B       -
",
        );
        check(
            Listing::Queues,
            json!([{"site": "SFO", "code": "A", "name": "General", "letter": "A", "first_number": 1, "last_number": 999}]),
            "SITE   CODE   NAME      LETTER   NUMBERS\nSFO    A      General   A        1-999\n",
        );
        check(
            Listing::WorkProfiles,
            json!([{"site": "SFO", "code": "TELLER", "name": "Teller",
                    "queues": [{"queue": "A"}, {"queue": "B", "min_wait_minutes": 10}]}]),
            "SITE   CODE     NAME     QUEUES\nSFO    TELLER   Teller   A, B (after 10m)\n",
        );
        check(
            Listing::ServicePoints,
            json!([{"site": "SFO", "code": "C1", "name": "Counter 1", "work_profile": "TELLER"},
                   {"site": "SFO", "code": "C2", "name": "Counter 2"}]),
            "SITE   CODE   NAME        WORK PROFILE\nSFO    C1     Counter 1   TELLER\nSFO    C2     Counter 2   -\n",
        );
        check(
            Listing::Staff,
            json!([{"username": "alice", "name": "Alice", "roles": ["staff", "supervisor"], "sites": ["SFO", "CHI"]},
                   {"username": "bob", "name": "Bob", "roles": [], "sites": []}]),
            "\
USERNAME   NAME    ROLES               SITES
alice      Alice   staff, supervisor   SFO, CHI
bob        Bob     -                   -
",
        );
    }

    #[test]
    fn operational_tables() {
        check(
            Listing::Agents,
            json!([]),
            "SITE   ID   HOST   CONNECTED   VERSION   CONFIG   ACKED   BACKLOG   LAST SEEN   SKEW   ERROR\n",
        );
        check(
            Listing::Agents,
            json!([
                {"id": "0b7e8a52-1f7e-4c1a-9d0e-8a1b2c3d4e5f", "site": "SFO", "hostname": "sfo-1", "version": "0.1.0",
                 "connected": true, "revoked": false, "last_seen": "2025-06-01T11:59:55Z", "config_revision": 7,
                 "site_revision": 7, "acked_seq": 1042, "outbox_pending": 0, "clock_skew_ms": -120,
                 "command_error": null, "store_error": null},
                {"id": "9c6f7e1d-0000-4000-8000-000000000000", "site": "CHI", "hostname": "chi-1", "version": "0.1.0",
                 "connected": false, "revoked": false, "last_seen": "2025-06-01T09:00:00Z", "config_revision": 5,
                 "site_revision": 7, "acked_seq": 10, "outbox_pending": 31, "clock_skew_ms": 2500,
                 "command_error": null, "store_error": "disk full: cannot write the outbox database file on /var/lib"},
                {"id": "11111111-0000-4000-8000-000000000000", "site": "NYC", "hostname": "nyc-1", "version": "0.0.9",
                 "connected": true, "revoked": true, "last_seen": null, "config_revision": 0,
                 "site_revision": 3, "acked_seq": 0, "outbox_pending": 0, "clock_skew_ms": 0}
            ]),
            "\
SITE   ID         HOST    CONNECTED   VERSION   CONFIG   ACKED   BACKLOG   LAST SEEN   SKEW     ERROR
SFO    0b7e8a52   sfo-1   yes         0.1.0     7/7      1042    0         5s ago      -120ms   -
CHI    9c6f7e1d   chi-1   no          0.1.0     5/7      10      31        3h ago      +2.5s    disk full: cannot write the outbox data…
NYC    11111111   nyc-1   revoked     0.0.9     0/3      0       0         never       0ms      -
",
        );
        check(
            Listing::EnrollmentTokens,
            json!([
                {"id": "aaaaaaaa-0000-4000-8000-000000000000", "site": "SFO", "created_at": "2025-06-01T10:00:00Z",
                 "expires_at": "2025-06-02T10:00:00Z", "used_at": null, "used_by_agent": null},
                {"id": "bbbbbbbb-0000-4000-8000-000000000000", "site": "SFO", "created_at": "2025-05-01T10:00:00Z",
                 "expires_at": "2025-05-02T10:00:00Z", "used_at": null, "used_by_agent": null},
                {"id": "cccccccc-0000-4000-8000-000000000000", "site": "CHI", "created_at": "2025-06-01T10:00:00Z",
                 "expires_at": "2025-06-02T10:00:00Z", "used_at": "2025-06-01T10:05:00Z",
                 "used_by_agent": "9c6f7e1d-0000-4000-8000-000000000000"}
            ]),
            "\
ID         SITE   STATUS             CREATED                EXPIRES
aaaaaaaa   SFO    valid for 22h      2025-06-01 10:00:00Z   2025-06-02 10:00:00Z
bbbbbbbb   SFO    expired            2025-05-01 10:00:00Z   2025-05-02 10:00:00Z
cccccccc   CHI    used by 9c6f7e1d   2025-06-01 10:00:00Z   2025-06-02 10:00:00Z
",
        );
        check(
            Listing::ApiTokens,
            json!([{"id": "t1", "name": "bootstrap", "role": "admin", "created_at": "2025-06-01T10:00:00.123456Z"}]),
            "ID   NAME        ROLE    CREATED\nt1   bootstrap   admin   2025-06-01 10:00:00Z\n",
        );
        check(
            Listing::Revisions,
            json!([{"revision": 2, "created_at": "2025-06-01T10:00:00Z", "actor": "bootstrap", "summary": "created site/SFO"}]),
            "REVISION   CREATED                ACTOR       SUMMARY\n2          2025-06-01 10:00:00Z   bootstrap   created site/SFO\n",
        );
    }

    #[test]
    fn change_reports() {
        let check = |dry_run: bool, changes: &[(&str, Action)], sites: &[&str], expected: &str| {
            let r = ChangeReport {
                revision: 4,
                dry_run,
                changes: changes
                    .iter()
                    .map(|(r, a)| Change { resource: (*r).into(), action: *a })
                    .collect(),
                sites_published: sites.iter().map(|s| (*s).into()).collect(),
            };
            assert_eq!(report(&r), expected);
        };
        check(
            false,
            &[("site/SFO", Action::Created), ("queue/SFO/A", Action::Unchanged)],
            &["SFO"],
            "site/SFO created\nqueue/SFO/A unchanged\nconfiguration revision 4; published to SFO\n",
        );
        check(
            false,
            &[("site/SFO", Action::Unchanged)],
            &[],
            "site/SFO unchanged\nno changes; configuration revision 4\n",
        );
        check(
            true,
            &[("site/SFO", Action::Updated), ("site/CHI", Action::Unchanged)],
            &["SFO"],
            "site/SFO updated (dry run)\nsite/CHI unchanged\ndry run: nothing stored; configuration revision stays 4; would publish to SFO\n",
        );
        check(
            false,
            &[("staff_user/bob", Action::Deleted)],
            &[],
            "staff_user/bob deleted\nconfiguration revision 4; no site configuration changed\n",
        );
    }

    #[test]
    fn small_formats() {
        assert_eq!(
            fields(&[("token", "abc".into()), ("expires", "soon".into())]),
            "token:   abc\nexpires: soon\n"
        );
        for (ms, want) in [(0, "0ms"), (999, "+999ms"), (-1500, "-1.5s"), (125_000, "+2m")] {
            assert_eq!(skew(Some(ms)), want);
        }
        assert_eq!(skew(None), "-");
        let ago = |secs: i64| age(now(), now() - chrono::Duration::seconds(secs));
        for (secs, want) in [
            (-5, "0s"),
            (59, "59s"),
            (60, "1m"),
            (3599, "59m"),
            (3600, "1h"),
            (7199, "1h59m"),
            (86_400, "1d"),
            (90_000, "1d1h"),
        ] {
            assert_eq!(ago(secs), want, "{secs}");
        }
        assert_eq!(timestamp(Some(&json!("not a time"))), "-");
    }
}
