//! Who may call the branch API, in one place: the bearer check (`authenticate`, a connector key
//! or a staff session checked against the configuration in force), the supervisor gate on the
//! routes that need it (`require_supervisor`), staff sign-in and sign-out, and the sign-in
//! locks supervisors can see and lift.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use meridian_shared::events::LockedSubject;
use serde::{Deserialize, Serialize};

use super::{ApiError, Json201};
use crate::Context;
use crate::auth::{self, Caller, Refusal, SignInRefusal, throttle};
use crate::error::Error;

fn bearer(req: &axum::extract::Request) -> Option<String> {
    let header = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = header.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
        .then(|| token.trim().to_owned())
}

pub(super) fn refused(r: Refusal) -> ApiError {
    match r {
        Refusal::Missing => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "a connector API key or staff session is required",
        ),
        Refusal::Invalid => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            "unknown API key or session",
        ),
        Refusal::Expired => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "session_expired",
            "the staff session has expired; log in again",
        ),
        Refusal::Ended => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "session_ended",
            "the staff session ended: the account changed or was signed out; log in again",
        ),
    }
}

/// Admits connector keys of this site and live staff sessions; everything else is a 401.
pub(super) async fn authenticate(
    State(ctx): State<Arc<Context>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = bearer(&req) else {
        return refused(Refusal::Missing).into_response();
    };
    let Some(config) = ctx.config.borrow().clone() else {
        return ApiError::from(Error::NotConfigured).into_response();
    };
    let hashed = auth::hash(&token);
    let key =
        config.connector_keys.iter().find(|k| k.key_hash == hashed).map(|k| k.code.to_string());
    let caller = match key {
        Some(key) => Caller::Connector { key },
        None => {
            let now = ctx.clock.now().timestamp_millis();
            match ctx.db.read(move |c| auth::session(c, &config, &token, now)).await {
                Ok(Ok(session)) => Caller::Staff(session),
                Ok(Err(refusal)) => return refused(refusal).into_response(),
                Err(e) => return ApiError::from(e).into_response(),
            }
        }
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Lets supervisors and connector keys through; a plain staff session gets 403.
pub(super) async fn require_supervisor(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match req.extensions().get::<Caller>() {
        Some(caller) if caller.may_supervise() => next.run(req).await,
        Some(_) => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this needs a supervisor (or a connector key)",
        )
        .into_response(),
        None => refused(Refusal::Missing).into_response(),
    }
}

/// `Debug` hides the password.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LoginRequest {
    username: String,
    password: String,
}

impl std::fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginRequest").field("username", &self.username).finish_non_exhaustive()
    }
}

/// A new staff session; `Debug` hides its token.
#[derive(Serialize, Deserialize)]
pub struct Session {
    pub token: String,
    pub username: String,
    pub name: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("username", &self.username)
            .field("name", &self.name)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The address a request came from (none when served without connection info, as in tests
/// that call the router directly).
pub fn peer(extensions: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    extensions.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| addr.ip())
}

/// Staff login, verified against the synced password hash (works offline), throttled per user
/// and per address.
pub(super) async fn login(
    State(ctx): State<Arc<Context>>,
    extensions: axum::http::Extensions,
    body: Result<Json<LoginRequest>, JsonRejection>,
) -> Json201<Session> {
    let Json(req) = body?;
    let user = auth::sign_in(&ctx, &req.username, &req.password, peer(&extensions))
        .await?
        .map_err(SignIn)?;
    let now = ctx.clock.now().timestamp_millis();
    let (token, expires) = {
        let user = user.clone();
        ctx.db.write(move |c| auth::create_session(c, &user, None, now)).await?
    };
    Ok((
        StatusCode::CREATED,
        Json(Session {
            token,
            username: user.username.to_string(),
            name: user.name.clone(),
            expires_at: chrono::DateTime::from_timestamp_millis(expires).unwrap_or_default(),
        }),
    ))
}

/// A refused sign-in on its way out of `login`.
struct SignIn(SignInRefusal);

impl From<SignIn> for ApiError {
    fn from(SignIn(r): SignIn) -> Self {
        match r {
            SignInRefusal::Invalid => refused(Refusal::Invalid),
            SignInRefusal::Locked { retry_after_s } => ApiError::retry_after(
                StatusCode::TOO_MANY_REQUESTS,
                "sign_in_locked",
                "too many failed sign-ins for this user or from this address; try again later \
                 or ask a supervisor to unlock",
                retry_after_s,
            ),
            SignInRefusal::Busy => ApiError::retry_after(
                StatusCode::TOO_MANY_REQUESTS,
                "busy",
                "too many sign-ins are being checked right now; try again shortly",
                1,
            ),
        }
    }
}

pub(super) async fn logout(
    State(ctx): State<Arc<Context>>,
    req: axum::extract::Request,
) -> Result<StatusCode, ApiError> {
    let Some(token) = bearer(&req) else {
        return Err(refused(Refusal::Missing));
    };
    ctx.db.write(move |c| auth::end_session(c, &token)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The sign-in locks in force.
pub(super) async fn list_locks(
    State(ctx): State<Arc<Context>>,
) -> Result<Json<Vec<throttle::Lock>>, ApiError> {
    let config = ctx.site_config()?;
    let now = ctx.clock.now().timestamp_millis();
    Ok(Json(ctx.db.read(move |c| throttle::locks(c, &config, now)).await?))
}

/// Lifts the lock of a user (`user/{name}`) or an address (`address/{ip}`).
pub(super) async fn unlock(
    State(ctx): State<Arc<Context>>,
    Path((subject, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let subject = match subject.as_str() {
        "user" => LockedSubject::User,
        "address" => LockedSubject::Address,
        _ => return Err(Error::NotFound(format!("lock subject {subject:?}")).into()),
    };
    let lifted = {
        let name = name.clone();
        ctx.db.write(move |c| throttle::unlock(c, subject, &name)).await?
    };
    if !lifted {
        return Err(Error::NotFound(format!("no sign-in lock for {name:?}")).into());
    }
    tracing::info!(subject = ?subject, name = %name, "sign-in lock lifted at the branch");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_password_and_the_session_token() {
        let login: LoginRequest =
            serde_json::from_str(r#"{"username": "ana", "password": "pw-S3CR3T"}"#).expect("login");
        let session = Session {
            token: "session-S3CR3T".into(),
            username: "ana".into(),
            name: "Ana".into(),
            expires_at: chrono::Utc::now(),
        };
        for shown in [format!("{login:?}"), format!("{session:?}")] {
            assert!(!shown.contains("S3CR3T") && shown.contains("ana"), "{shown}");
        }
    }
}
