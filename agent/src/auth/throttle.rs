//! Sign-in throttling, per user name and per source address, kept in the store so a restart
//! does not reset it. A subject gets a few free failures; each further failure locks it for
//! twice as long as the one before (from `base` up to `cap`); a quiet `window` forgets the
//! failures. A success clears the user's count (not the address's: one valid account must not
//! reset an attacker's address). A new lock is queued as a `STAFF_LOGIN_LOCKED` event so
//! central sees the attack; a supervisor at the branch or a central unlock lifts a lock.
//! The lock is decided before the password is checked, so a locked subject costs no argon2.

use chrono::{DateTime, Utc};
use meridian_shared::events::{AgentEvent, LockedSubject, LoginLocked, MAX_LOCKED_NAME};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::error::Result;
use crate::store::queries::append_event;

/// How a subject is throttled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Failures in a row before the first lock.
    pub free: u32,
    pub base_ms: i64,
    pub cap_ms: i64,
    /// Failures older than this are forgotten.
    pub window_ms: i64,
}

const MINUTE_MS: i64 = 60_000;

/// A user name: five tries, then 30 s, 1 min, 2 min, … up to an hour.
pub const PER_USER: Policy =
    Policy { free: 5, base_ms: MINUTE_MS / 2, cap_ms: 60 * MINUTE_MS, window_ms: 60 * MINUTE_MS };
/// A source address (a reception PC is shared): twenty tries, then the same steps.
pub const PER_ADDRESS: Policy =
    Policy { free: 20, base_ms: MINUTE_MS / 2, cap_ms: 60 * MINUTE_MS, window_ms: 60 * MINUTE_MS };

impl Policy {
    /// How long the `failures`-th failure in a row locks the subject (0: not at all).
    pub fn lock_ms(&self, failures: u32) -> i64 {
        if failures < self.free {
            return 0;
        }
        let doublings = (failures - self.free).min(30);
        self.base_ms.saturating_mul(1i64 << doublings).min(self.cap_ms)
    }
}

/// A subject's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub failures: u32,
    pub last_failure_ms: i64,
    pub locked_until_ms: i64,
    /// The user's central unlock epoch when this was written (0 for an address).
    pub unlock_epoch: u32,
}

/// Whether `record` still counts: not lifted by a newer central unlock.
fn current(record: Option<Record>, unlock_epoch: u32) -> Option<Record> {
    record.filter(|r| r.unlock_epoch >= unlock_epoch)
}

/// Pure: the record after one more failure at `now`.
pub fn after_failure(
    policy: &Policy,
    record: Option<Record>,
    unlock_epoch: u32,
    now_ms: i64,
) -> Record {
    let failures = match current(record, unlock_epoch) {
        Some(r) if now_ms - r.last_failure_ms < policy.window_ms => r.failures.saturating_add(1),
        _ => 1,
    };
    let lock = policy.lock_ms(failures);
    Record {
        failures,
        last_failure_ms: now_ms,
        locked_until_ms: if lock > 0 { now_ms + lock } else { 0 },
        unlock_epoch,
    }
}

/// Pure: until when `record` locks its subject, if it does at `now`.
pub fn locked_until(record: Option<Record>, unlock_epoch: u32, now_ms: i64) -> Option<i64> {
    current(record, unlock_epoch).map(|r| r.locked_until_ms).filter(|&until| until > now_ms)
}

/// The keys of a sign-in attempt: the user name tried and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub username: String,
    pub address: String,
    /// The user's central unlock epoch (0 for an unknown user).
    pub unlock_epoch: u32,
}

impl Attempt {
    fn user_key(&self) -> String {
        format!("user:{}", self.username)
    }
    fn address_key(&self) -> String {
        format!("address:{}", self.address)
    }
}

fn record(conn: &Connection, subject: &str) -> Result<Option<Record>> {
    Ok(conn
        .prepare_cached(
            "SELECT failures, last_failure_ms, locked_until_ms, unlock_epoch FROM login_throttle \
             WHERE subject = ?1",
        )?
        .query_row([subject], |r| {
            Ok(Record {
                failures: r.get(0)?,
                last_failure_ms: r.get(1)?,
                locked_until_ms: r.get(2)?,
                unlock_epoch: r.get(3)?,
            })
        })
        .optional()?)
}

/// Until when the attempt is locked out (the later of its user's and its address's locks).
pub fn lockout(conn: &Connection, attempt: &Attempt, now_ms: i64) -> Result<Option<i64>> {
    let user = locked_until(record(conn, &attempt.user_key())?, attempt.unlock_epoch, now_ms);
    let address = locked_until(record(conn, &attempt.address_key())?, 0, now_ms);
    Ok(user.max(address))
}

/// Records a failed sign-in; queues `STAFF_LOGIN_LOCKED` for each subject it locks. Returns
/// whether it queued one.
pub fn record_failure(conn: &Connection, attempt: &Attempt, now: DateTime<Utc>) -> Result<bool> {
    let mut queued = false;
    let now_ms = now.timestamp_millis();
    let subjects = [
        (
            LockedSubject::User,
            attempt.user_key(),
            &attempt.username,
            &PER_USER,
            attempt.unlock_epoch,
        ),
        (LockedSubject::Address, attempt.address_key(), &attempt.address, &PER_ADDRESS, 0),
    ];
    for (kind, key, name, policy, epoch) in subjects {
        let next = after_failure(policy, record(conn, &key)?, epoch, now_ms);
        conn.prepare_cached(
            "INSERT INTO login_throttle (subject, failures, last_failure_ms, locked_until_ms, \
             unlock_epoch) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (subject) DO UPDATE SET \
             failures = excluded.failures, last_failure_ms = excluded.last_failure_ms, \
             locked_until_ms = excluded.locked_until_ms, unlock_epoch = excluded.unlock_epoch",
        )?
        .execute(params![
            key,
            next.failures,
            next.last_failure_ms,
            next.locked_until_ms,
            epoch
        ])?;
        if next.locked_until_ms > now_ms {
            let until = DateTime::from_timestamp_millis(next.locked_until_ms).unwrap_or(now);
            let name: String = name.chars().take(MAX_LOCKED_NAME).collect();
            tracing::warn!(subject = ?kind, name = %name, failures = next.failures, until = %until, "sign-in locked after repeated failures");
            let event =
                LoginLocked { subject: kind, name, failures: next.failures, until, at: now };
            append_event(conn, &AgentEvent::LoginLocked(event), now)?;
            queued = true;
        }
    }
    // Forget what no longer counts, so sprayed user names do not pile up.
    conn.prepare_cached(
        "DELETE FROM login_throttle WHERE last_failure_ms < ?1 AND locked_until_ms < ?2",
    )?
    .execute(params![now_ms - PER_USER.window_ms.max(PER_ADDRESS.window_ms), now_ms])?;
    Ok(queued)
}

/// A successful sign-in: the user's count starts again.
pub fn record_success(conn: &Connection, username: &str) -> Result<()> {
    conn.prepare_cached("DELETE FROM login_throttle WHERE subject = ?1")?
        .execute([format!("user:{username}")])?;
    Ok(())
}

/// A lock in force, as supervisors see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lock {
    pub subject: LockedSubject,
    pub name: String,
    pub failures: u32,
    pub until: DateTime<Utc>,
}

/// The locks in force at `now` (a user lock lifted centrally is left out).
pub fn locks(
    conn: &Connection,
    config: &meridian_shared::config::SiteConfig,
    now_ms: i64,
) -> Result<Vec<Lock>> {
    let rows: Vec<(String, Record)> = conn
        .prepare_cached(
            "SELECT subject, failures, last_failure_ms, locked_until_ms, unlock_epoch \
             FROM login_throttle WHERE locked_until_ms > ?1 ORDER BY subject",
        )?
        .query_map([now_ms], |r| {
            Ok((
                r.get(0)?,
                Record {
                    failures: r.get(1)?,
                    last_failure_ms: r.get(2)?,
                    locked_until_ms: r.get(3)?,
                    unlock_epoch: r.get(4)?,
                },
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows
        .into_iter()
        .filter_map(|(subject, record)| {
            let (kind, name) = match subject.split_once(':')? {
                ("user", name) => (LockedSubject::User, name),
                ("address", name) => (LockedSubject::Address, name),
                _ => return None,
            };
            let epoch = match kind {
                LockedSubject::User => config
                    .staff
                    .iter()
                    .find(|u| u.username.as_str() == name)
                    .map_or(0, |u| u.unlock_epoch),
                LockedSubject::Address => 0,
            };
            let until = locked_until(Some(record), epoch, now_ms)?;
            Some(Lock {
                subject: kind,
                name: name.to_owned(),
                failures: record.failures,
                until: DateTime::from_timestamp_millis(until)?,
            })
        })
        .collect())
}

/// Lifts the lock (and forgets the failures) of a user name or an address; false when there
/// was none.
pub fn unlock(conn: &Connection, subject: LockedSubject, name: &str) -> Result<bool> {
    let key = match subject {
        LockedSubject::User => format!("user:{name}"),
        LockedSubject::Address => format!("address:{name}"),
    };
    Ok(conn.prepare_cached("DELETE FROM login_throttle WHERE subject = ?1")?.execute([key])? > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_double_from_the_first_failure_past_the_free_ones_up_to_the_cap() {
        let p = PER_USER;
        assert_eq!((0..5).map(|n| p.lock_ms(n)).collect::<Vec<_>>(), vec![0; 5]);
        assert_eq!(p.lock_ms(5), 30_000);
        assert_eq!(p.lock_ms(6), 60_000);
        assert_eq!(p.lock_ms(7), 120_000);
        assert_eq!(p.lock_ms(12), 3_600_000);
        assert_eq!(p.lock_ms(u32::MAX), 3_600_000);
    }

    #[test]
    fn a_quiet_window_forgets_and_a_central_unlock_lifts() {
        let p = PER_USER;
        let mut r = None;
        for i in 0..5 {
            r = Some(after_failure(&p, r, 0, 1_000 + i));
        }
        let locked = r.unwrap();
        assert_eq!(locked.failures, 5);
        assert_eq!(locked_until(r, 0, 1_010), Some(1_004 + 30_000));
        assert_eq!(locked_until(r, 0, 1_004 + 30_000), None, "the lock ends");
        assert_eq!(locked_until(r, 1, 1_010), None, "a newer central unlock lifts it");
        assert_eq!(after_failure(&p, r, 1, 2_000).failures, 1, "and starts the count again");
        assert_eq!(after_failure(&p, r, 0, 1_004 + p.window_ms).failures, 1, "window passed");
        assert_eq!(after_failure(&p, r, 0, 40_000).failures, 6);
    }

    #[test]
    fn failures_lock_the_user_and_the_address_and_queue_an_event_per_lock() {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::migrate(&mut conn).unwrap();
        let now = DateTime::from_timestamp_millis(1_700_000_000_000).unwrap();
        let attempt =
            Attempt { username: "ana".into(), address: "10.0.0.7".into(), unlock_epoch: 0 };
        for _ in 0..4 {
            assert!(!record_failure(&conn, &attempt, now).unwrap(), "no lock yet, nothing queued");
        }
        assert_eq!(lockout(&conn, &attempt, now.timestamp_millis()).unwrap(), None);
        assert!(record_failure(&conn, &attempt, now).unwrap(), "the lock is queued");
        let until = lockout(&conn, &attempt, now.timestamp_millis()).unwrap().unwrap();
        assert_eq!(until, now.timestamp_millis() + 30_000);
        let kinds: Vec<String> = conn
            .prepare("SELECT kind FROM outbox ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(kinds, vec!["STAFF_LOGIN_LOCKED"]);
        // Another user from the same address is not locked by ana's failures.
        let other = Attempt { username: "ben".into(), ..attempt.clone() };
        assert_eq!(lockout(&conn, &other, now.timestamp_millis()).unwrap(), None);
        assert!(unlock(&conn, LockedSubject::User, "ana").unwrap());
        assert_eq!(lockout(&conn, &attempt, now.timestamp_millis()).unwrap(), None);
        assert!(!unlock(&conn, LockedSubject::User, "ana").unwrap());
    }
}
