//! Who is calling the branch API: a local system with a connector API key (configured
//! centrally, synced as SHA-256 hashes), or a staff member with a session token from
//! `POST /api/v1/sessions` (password verified locally against the synced argon2 hash, so
//! logging in works with the controller unreachable). Secrets are compared only as hashes.
//!
//! A session is checked against the configuration in force at every request: it ends when its
//! user is deleted or leaves the site, when the password changes, or when central signs the
//! user out everywhere (the session is bound to a digest of the password hash and the
//! sign-out epoch), and it carries the user's roles as they are now. Sign-ins go through the
//! throttle (`throttle`) and the bounded password gate (`gate`).

pub mod gate;
pub mod throttle;

use std::net::IpAddr;

use meridian_shared::config::{SiteConfig, StaffRole, StaffUser};
use rand::RngCore;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use crate::Context;
use crate::error::Result;

pub use gate::{PasswordGate, verify_password};

/// How long a staff session lasts.
pub const SESSION_TTL: chrono::Duration = chrono::Duration::hours(12);

/// The authenticated caller of a branch API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Connector { key: String },
    Staff(StaffSession),
}

/// Why a credential was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Invalid,
    Expired,
    /// The user was deleted or left the site, the password changed, or central signed the
    /// user out everywhere.
    Ended,
}

pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("mrd_ss_{}", hex::encode(bytes))
}

/// A staff member's session as of now: the roles are the user's current ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaffSession {
    pub username: String,
    pub roles: Vec<StaffRole>,
    /// The counter the workstation signed in at.
    pub counter: Option<String>,
}

impl StaffSession {
    pub fn is_supervisor(&self) -> bool {
        self.roles.contains(&StaffRole::Supervisor)
    }
}

impl Caller {
    /// Connector keys (local systems) and supervisors may supervise; plain staff may not.
    pub fn may_supervise(&self) -> bool {
        match self {
            Caller::Connector { .. } => true,
            Caller::Staff(s) => s.is_supervisor(),
        }
    }
}

/// What a session is bound to: the password hash and the sign-out epoch of its user.
fn credential(user: &StaffUser) -> String {
    hash(&format!("{}\n{}", user.password_hash, user.sessions_epoch))
}

/// Why a sign-in was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignInRefusal {
    /// Unknown user or wrong password (the same answer for both).
    Invalid,
    /// Too many failures for this user or address: not before `retry_after_s` seconds.
    Locked { retry_after_s: u64 },
    /// Too many sign-ins are being checked right now.
    Busy,
}

/// Longest user name and password looked at; longer ones are refused unchecked.
const MAX_USERNAME: usize = 64;
const MAX_PASSWORD: usize = 256;

/// Checks a sign-in for this site through the throttle and the password gate; on success the
/// user as configured now. A failure is recorded against the user name and the address.
pub async fn sign_in(
    ctx: &Context,
    username: &str,
    password: &str,
    from: Option<IpAddr>,
) -> Result<std::result::Result<StaffUser, SignInRefusal>> {
    if username.is_empty() || username.len() > MAX_USERNAME || password.len() > MAX_PASSWORD {
        return Ok(Err(SignInRefusal::Invalid));
    }
    let config = ctx.site_config()?;
    let user = config.staff.iter().find(|u| u.username.as_str() == username).cloned();
    let attempt = throttle::Attempt {
        username: username.to_owned(),
        address: from.map_or_else(|| "unknown".to_owned(), |a| a.to_canonical().to_string()),
        unlock_epoch: user.as_ref().map_or(0, |u| u.unlock_epoch),
    };
    let now_ms = ctx.clock.now().timestamp_millis();
    let locked = {
        let attempt = attempt.clone();
        ctx.db.read(move |c| throttle::lockout(c, &attempt, now_ms)).await?
    };
    if let Some(until) = locked {
        let retry_after_s = u64::try_from((until - now_ms + 999) / 1000).unwrap_or(1).max(1);
        return Ok(Err(SignInRefusal::Locked { retry_after_s }));
    }
    let phc = user.as_ref().map(|u| u.password_hash.clone());
    let Ok(matches) = ctx.logins.verify(phc, password.to_owned()).await else {
        return Ok(Err(SignInRefusal::Busy));
    };
    match user.filter(|_| matches) {
        Some(user) => {
            let name = user.username.to_string();
            ctx.db.write(move |c| throttle::record_success(c, &name)).await?;
            Ok(Ok(user))
        }
        None => {
            let now = ctx.clock.now();
            let queued = ctx.db.write(move |c| throttle::record_failure(c, &attempt, now)).await?;
            if queued {
                // Only a new lock has something to send; a plain failure wakes nobody (the
                // terminals refresh on every change).
                ctx.outbox_changed.notify_one();
            }
            Ok(Err(SignInRefusal::Invalid))
        }
    }
}

/// Opens a session for `user` (at `counter`, from the workstation).
pub fn create_session(
    conn: &Connection,
    user: &StaffUser,
    counter: Option<&str>,
    now_ms: i64,
) -> Result<(String, i64)> {
    let token = new_token();
    let expires = now_ms + SESSION_TTL.num_milliseconds();
    conn.prepare_cached(
        "INSERT INTO staff_sessions (token_hash, username, created_at_ms, expires_at_ms, \
         credential, counter) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        hash(&token),
        user.username.as_str(),
        now_ms,
        expires,
        credential(user),
        counter
    ])?;
    conn.prepare_cached("DELETE FROM staff_sessions WHERE expires_at_ms < ?1")?
        .execute([now_ms])?;
    Ok((token, expires))
}

/// The session a token belongs to, checked against `config` (the configuration in force).
pub fn session(
    conn: &Connection,
    config: &SiteConfig,
    token: &str,
    now_ms: i64,
) -> Result<std::result::Result<StaffSession, Refusal>> {
    let row: Option<(String, i64, String, Option<String>)> = conn
        .prepare_cached(
            "SELECT username, expires_at_ms, credential, counter FROM staff_sessions \
             WHERE token_hash = ?1",
        )?
        .query_row([hash(token)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .optional()?;
    let Some((username, expires, bound_to, counter)) = row else {
        return Ok(Err(Refusal::Invalid));
    };
    if expires <= now_ms {
        return Ok(Err(Refusal::Expired));
    }
    let user = config.staff.iter().find(|u| u.username.as_str() == username);
    Ok(match user {
        Some(user) if credential(user) == bound_to => {
            Ok(StaffSession { username, roles: user.roles.clone(), counter })
        }
        _ => Err(Refusal::Ended),
    })
}

pub fn end_session(conn: &Connection, token: &str) -> Result<()> {
    conn.prepare_cached("DELETE FROM staff_sessions WHERE token_hash = ?1")?
        .execute([hash(token)])?;
    Ok(())
}

/// Ends the sessions `config` no longer allows (users deleted or gone from the site, passwords
/// changed, signed out everywhere); runs where a configuration is applied. The rows stay until
/// they expire, so their holders are told the session ended rather than that it is unknown.
pub fn end_sessions_ended_by(conn: &Connection, config: &SiteConfig) -> Result<usize> {
    let sessions: Vec<(String, String, String)> = conn
        .prepare_cached("SELECT token_hash, username, credential FROM staff_sessions")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut ended = 0;
    for (token_hash, username, bound_to) in sessions {
        let valid = config
            .staff
            .iter()
            .any(|u| u.username.as_str() == username && credential(u) == bound_to);
        if !valid && !bound_to.is_empty() {
            conn.prepare_cached("UPDATE staff_sessions SET credential = '' WHERE token_hash = ?1")?
                .execute([token_hash])?;
            ended += 1;
        }
    }
    Ok(ended)
}
