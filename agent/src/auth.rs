//! Who is calling the branch API: a local system with a connector API key (configured
//! centrally, synced as SHA-256 hashes), or a staff member with a session token from
//! `POST /api/v1/sessions` (password verified locally against the synced argon2 hash, so
//! logging in works with the controller unreachable). Secrets are compared only as hashes.

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use rand::RngCore;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use crate::error::Result;

/// How long a staff session lasts.
pub const SESSION_TTL: chrono::Duration = chrono::Duration::hours(12);

/// The authenticated caller of a branch API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Connector { key: String },
    Staff { username: String },
}

/// Why a credential was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Invalid,
    Expired,
}

pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("mrd_ss_{}", hex::encode(bytes))
}

/// Whether `password` matches the PHC string `phc` (false for a malformed hash).
pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
        .unwrap_or(false)
}

/// The staff member of this site with `username` when `password` is theirs. Oversized input is
/// refused outright; the hash is checked (off the async threads) even for unknown users, so
/// timing does not reveal which usernames exist.
pub async fn verify_staff(
    config: &meridian_shared::config::SiteConfig,
    username: &str,
    password: &str,
) -> Option<meridian_shared::config::StaffUser> {
    if username.len() > 64 || password.len() > 256 {
        return None;
    }
    let user = config.staff.iter().find(|u| u.username.as_str() == username).cloned();
    let phc = user.as_ref().map(|u| u.password_hash.clone()).unwrap_or_default();
    let password = password.to_owned();
    let ok = tokio::task::spawn_blocking(move || verify_password(&password, &phc))
        .await
        .unwrap_or(false);
    user.filter(|_| ok)
}

pub fn create_session(conn: &Connection, username: &str, now_ms: i64) -> Result<(String, i64)> {
    let token = new_token();
    let expires = now_ms + SESSION_TTL.num_milliseconds();
    conn.prepare_cached("INSERT INTO staff_sessions (token_hash, username, created_at_ms, expires_at_ms) VALUES (?1, ?2, ?3, ?4)")?.execute(params![hash(&token), username, now_ms, expires],
    )?;
    conn.prepare_cached("DELETE FROM staff_sessions WHERE expires_at_ms < ?1")?
        .execute([now_ms])?;
    Ok((token, expires))
}

/// The staff member a session token belongs to.
pub fn session_user(
    conn: &Connection,
    token: &str,
    now_ms: i64,
) -> Result<std::result::Result<String, Refusal>> {
    let row: Option<(String, i64)> = conn
        .query_row(
            "SELECT username, expires_at_ms FROM staff_sessions WHERE token_hash = ?1",
            [hash(token)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(match row {
        None => Err(Refusal::Invalid),
        Some((_, expires)) if expires <= now_ms => Err(Refusal::Expired),
        Some((user, _)) => Ok(user),
    })
}

pub fn end_session(conn: &Connection, token: &str) -> Result<()> {
    conn.prepare_cached("DELETE FROM staff_sessions WHERE token_hash = ?1")?
        .execute([hash(token)])?;
    Ok(())
}
