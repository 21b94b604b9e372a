//! Console sign-ins as stored (migration 0015): one `console_sessions` row per signed-in
//! browser, keyed by the SHA-256 of the random id its cookie holds, bound to the API token it
//! was opened with, with the session's CSRF token and its expiry. Both backends implement
//! `ConsoleSessionStore` with the SQL of `impl_console_session_store!`, which `impl_store!`
//! expands.
//!
//! Invariants every backend keeps:
//! - a session is found only while its API token exists and before `expires_at`: deleting
//!   the token ends every session opened with it (and deletes them);
//! - the cookie's id itself is never stored, only its hash.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::Result;
use crate::store::ApiToken;

/// A console session. `Debug` hides the CSRF token.
#[derive(Clone, PartialEq, Eq)]
pub struct ConsoleSession {
    /// SHA-256 (hex) of the id the session cookie holds.
    pub id_hash: String,
    pub api_token_id: String,
    /// The token every form of the session carries back.
    pub csrf_token: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

impl std::fmt::Debug for ConsoleSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSession")
            .field("id_hash", &self.id_hash)
            .field("api_token_id", &self.api_token_id)
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

#[async_trait]
pub trait ConsoleSessionStore: Send + Sync {
    /// Stores a new session (its API token must exist).
    async fn insert_console_session(&self, session: &ConsoleSession) -> Result<()>;
    /// The session with `id_hash` and its API token, if both are live at `now`.
    async fn console_session(
        &self,
        id_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<(ConsoleSession, ApiToken)>>;
    /// Ends a session (sign-out); false if there was none.
    async fn delete_console_session(&self, id_hash: &str) -> Result<bool>;
    /// Removes the sessions expired at `now`; returns how many.
    async fn delete_expired_console_sessions(&self, now: DateTime<Utc>) -> Result<u64>;
}

/// A session joined with its token, as selected.
pub(crate) type SessionRow =
    (String, String, String, DateTime<Utc>, DateTime<Utc>, String, String, String, DateTime<Utc>);

pub(crate) fn from_row(row: SessionRow) -> Result<(ConsoleSession, ApiToken)> {
    let (id_hash, api_token_id, csrf_token, created_at, expires_at, name, role, token_hash, t_at) =
        row;
    let role = crate::store::Role::parse(&role).ok_or_else(|| {
        crate::error::Error::Internal(format!("corrupt value in api_tokens.role: {role:?}"))
    })?;
    let token = ApiToken { id: api_token_id.clone(), name, role, token_hash, created_at: t_at };
    Ok((ConsoleSession { id_hash, api_token_id, csrf_token, created_at, expires_at }, token))
}

macro_rules! impl_console_session_store {
    ($ty:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::console_sessions::ConsoleSessionStore for $ty {
            async fn insert_console_session(
                &self,
                s: &$crate::store::console_sessions::ConsoleSession,
            ) -> $crate::error::Result<()> {
                sqlx::query(
                    "INSERT INTO console_sessions \
                     (id_hash, api_token_id, csrf_token, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&s.id_hash)
                .bind(&s.api_token_id)
                .bind(&s.csrf_token)
                .bind(s.created_at)
                .bind(s.expires_at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn console_session(
                &self,
                id_hash: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<
                Option<($crate::store::console_sessions::ConsoleSession, $crate::store::ApiToken)>,
            > {
                let row: Option<$crate::store::console_sessions::SessionRow> = sqlx::query_as(
                    "SELECT s.id_hash, s.api_token_id, s.csrf_token, s.created_at, s.expires_at, \
                     t.name, t.role, t.token_hash, t.created_at \
                     FROM console_sessions s JOIN api_tokens t ON t.id = s.api_token_id \
                     WHERE s.id_hash = $1 AND s.expires_at > $2",
                )
                .bind(id_hash)
                .bind(now)
                .fetch_optional(&self.pool)
                .await?;
                row.map($crate::store::console_sessions::from_row).transpose()
            }

            async fn delete_console_session(&self, id_hash: &str) -> $crate::error::Result<bool> {
                let done = sqlx::query("DELETE FROM console_sessions WHERE id_hash = $1")
                    .bind(id_hash)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn delete_expired_console_sessions(
                &self,
                now: chrono::DateTime<chrono::Utc>,
            ) -> $crate::error::Result<u64> {
                let done = sqlx::query("DELETE FROM console_sessions WHERE expires_at <= $1")
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }
        }
    };
}
pub(crate) use impl_console_session_store;

/// The conformance case (`store_conformance_suite!`): sessions are found by their hash until
/// they expire, are signed out or lose their token.
pub async fn console_sessions_end_with_their_token_expiry_or_sign_out(
    store: &dyn crate::store::Store,
) {
    use crate::store::Role;
    let t0: DateTime<Utc> = "2026-03-09T12:00:00Z".parse().expect("time");
    let token = |id: &str| ApiToken {
        id: id.into(),
        name: format!("{id} token"),
        role: Role::Viewer,
        token_hash: format!("{id}-hash"),
        created_at: t0,
    };
    let session = |id: &str, token: &str, hours: i64| ConsoleSession {
        id_hash: id.into(),
        api_token_id: token.into(),
        csrf_token: format!("{id}-csrf"),
        created_at: t0,
        expires_at: t0 + chrono::Duration::hours(hours),
    };
    store.insert_api_token(&token("tok1")).await.expect("token 1");
    store.insert_api_token(&token("tok2")).await.expect("token 2");
    let a = session("a", "tok1", 12);
    store.insert_console_session(&a).await.expect("a");
    store.insert_console_session(&session("b", "tok1", 12)).await.expect("b");
    store.insert_console_session(&session("c", "tok2", 1)).await.expect("c");
    assert!(
        store.insert_console_session(&session("d", "no-such-token", 1)).await.is_err(),
        "a session needs its token"
    );

    let found = store.console_session("a", t0).await.expect("get").expect("live");
    assert_eq!(found, (a.clone(), token("tok1")));
    assert_eq!(store.console_session("nope", t0).await.expect("get"), None);
    // Expiry.
    let later = t0 + chrono::Duration::hours(2);
    assert_eq!(store.console_session("c", later).await.expect("get"), None, "expired");
    assert_eq!(store.delete_expired_console_sessions(later).await.expect("sweep"), 1);
    // Sign-out.
    assert!(store.delete_console_session("b").await.expect("sign out"));
    assert!(!store.delete_console_session("b").await.expect("again"));
    assert_eq!(store.console_session("b", t0).await.expect("get"), None);
    // Revoking the token ends its sessions.
    assert!(store.delete_api_token("tok1").await.expect("revoke"));
    assert_eq!(store.console_session("a", t0).await.expect("get"), None, "token gone");
    assert!(!store.delete_console_session("a").await.expect("cascaded"), "deleted with it");
}
