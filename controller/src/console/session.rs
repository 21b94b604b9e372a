//! Console sign-in: server-side sessions and cross-site request forgery checks.
//!
//! - Signing in exchanges an API token for a session (`store::console_sessions`): the cookie
//!   `meridian_console` (HttpOnly, SameSite=Strict, `/console`) holds a random id whose hash
//!   alone is stored, never the token; the session ends at sign-out, after `SESSION_HOURS`, or
//!   when its API token is deleted.
//! - Every form post carries the session's CSRF token (hidden field `csrf`, compared in
//!   constant time) and must come from the console's own origin (`Origin`, `Sec-Fetch-Site`);
//!   otherwise it is refused with 403 and nothing changes.
//! - The sign-in form itself is bound to a one-time value in a cookie of its own
//!   (`meridian_console_login`, double submit), so another site cannot sign a browser in to an
//!   account of its choosing.

use axum::Form;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{AppendHeaders, Html, IntoResponse, Redirect, Response};
use chrono::Utc;
use maud::{Markup, html};
use serde::Deserialize;

use super::page;
use crate::api::ApiState;
use crate::auth;
use crate::store::console_sessions::ConsoleSession;
use crate::store::{ApiToken, Role};

const COOKIE: &str = "meridian_console";
const LOGIN_COOKIE: &str = "meridian_console_login";
/// A console session lasts this long from sign-in.
pub const SESSION_HOURS: i64 = 12;
/// The largest form the console reads (its forms are a few fields).
const MAX_FORM_BYTES: usize = 64 * 1024;

/// Who is signed in, for the pages (an extension set by `require_sign_in`). `Debug` hides the
/// CSRF token.
#[derive(Clone)]
pub struct SignedIn {
    pub token: ApiToken,
    csrf: String,
}

impl std::fmt::Debug for SignedIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedIn").field("token", &self.token).finish_non_exhaustive()
    }
}

impl SignedIn {
    pub fn is_admin(&self) -> bool {
        self.token.role == Role::Admin
    }

    /// The hidden field every form of the session carries.
    pub fn csrf_field(&self) -> Markup {
        html! { input type="hidden" name="csrf" value=(self.csrf); }
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|h| {
        h.split(';').find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name && !v.is_empty()).then(|| v.to_owned())
        })
    })
}

/// Equal without telling how much of `a` matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub use meridian_shared::http_guard::same_origin;

/// `Secure` when the browser reached the console over HTTPS (a TLS proxy in front).
fn secure(headers: &HeaderMap) -> &'static str {
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    if https { "; Secure" } else { "" }
}

fn set_cookie(value: String) -> (header::HeaderName, HeaderValue) {
    let value = HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""));
    (header::SET_COOKIE, value)
}

fn forbidden(message: &str) -> Response {
    let body = html! {
        header { span { "Meridian console" } }
        main { p .message #message { (message) } p { a href="/console" { "Back to the console" } } }
    };
    (StatusCode::FORBIDDEN, Html(page("Refused", None, body).into_string())).into_response()
}

/// The session behind the request's cookie, if it is live.
async fn session(state: &ApiState, headers: &HeaderMap) -> Option<SignedIn> {
    let id = cookie(headers, COOKIE)?;
    match state.store.console_session(&auth::hash_secret(&id), Utc::now()).await {
        Ok(found) => found.map(|(s, token)| SignedIn { token, csrf: s.csrf_token }),
        Err(e) => {
            tracing::error!(error = %e, "console session lookup failed");
            None
        }
    }
}

#[derive(Deserialize)]
struct CsrfField {
    #[serde(default)]
    csrf: String,
}

/// The signed-in pages' gate: a live session, and for a form post the same origin and the
/// session's CSRF token. Without a session it sends the browser to the sign-in page.
pub async fn require_sign_in(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let Some(me) = session(&state, req.headers()).await else {
        return Redirect::to("/console/login").into_response();
    };
    let req = if matches!(*req.method(), Method::GET | Method::HEAD) {
        req
    } else {
        if !same_origin(req.headers()) {
            return forbidden(
                "This form was not sent from the console's own pages; nothing changed.",
            );
        }
        let (parts, body) = req.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM_BYTES).await else {
            return forbidden("This form is too large; nothing changed.");
        };
        let sent = csrf_of(&bytes).await;
        if !constant_time_eq(sent.as_bytes(), me.csrf.as_bytes()) {
            return forbidden(
                "This form has expired or was not sent from the console; reload the page and try again. Nothing changed.",
            );
        }
        Request::from_parts(parts, Body::from(bytes))
    };
    let mut req = req;
    req.extensions_mut().insert(me);
    next.run(req).await
}

/// The `csrf` field of a URL-encoded form (empty when absent or unreadable).
async fn csrf_of(bytes: &axum::body::Bytes) -> String {
    use axum::extract::FromRequest;
    let req = Request::builder()
        .method(Method::POST)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(bytes.clone()));
    match req {
        Ok(req) => Form::<CsrfField>::from_request(req, &())
            .await
            .map(|Form(f)| f.csrf)
            .unwrap_or_default(),
        Err(_) => String::new(),
    }
}

fn login_form(status: StatusCode, message: Option<&str>, headers: &HeaderMap) -> Response {
    // A fresh one-time value for the form and its cookie.
    let nonce = auth::new_secret("");
    let body = html! {
        header { span { "Meridian console" } }
        main {
            @if let Some(m) = message { p .message #message { (m) } }
            form #login method="post" action="/console/login" {
                input type="hidden" name="csrf" value=(nonce);
                p { label for="token" { "API token " } input #token name="token" type="password" autocomplete="off" required; }
                button #login-submit type="submit" { "Sign in" }
            }
            p { "Use an admin or viewer API token (created with " code { "meridianctl token create" } ")." }
        }
    };
    let cookie = set_cookie(format!(
        "{LOGIN_COOKIE}={nonce}; Path=/console/login; HttpOnly; SameSite=Strict; Max-Age=3600{}",
        secure(headers)
    ));
    (status, AppendHeaders([cookie]), Html(page("Sign in", None, body).into_string()))
        .into_response()
}

pub async fn login_page(headers: HeaderMap) -> Response {
    login_form(StatusCode::OK, None, &headers)
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
    #[serde(default)]
    csrf: String,
}

pub async fn login(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let nonce = cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    if !same_origin(&headers)
        || nonce.is_empty()
        || !constant_time_eq(nonce.as_bytes(), form.csrf.as_bytes())
    {
        return login_form(
            StatusCode::FORBIDDEN,
            Some(
                "This sign-in form has expired or was not sent from the console; please sign in again.",
            ),
            &headers,
        );
    }
    let secret = form.token.trim();
    let token = if secret.len() <= 200 {
        state.store.api_token_by_hash(&auth::hash_secret(secret)).await
    } else {
        Ok(None)
    };
    let token = match token {
        Ok(Some(t)) => t,
        Ok(None) => {
            return login_form(StatusCode::UNAUTHORIZED, Some("Unknown API token."), &headers);
        }
        Err(e) => {
            tracing::error!(error = %e, "console sign-in failed");
            return login_form(
                StatusCode::SERVICE_UNAVAILABLE,
                Some("The controller's database is unavailable; try again."),
                &headers,
            );
        }
    };
    let id = auth::new_secret("mrd_cs_");
    let now = Utc::now();
    let session = ConsoleSession {
        id_hash: auth::hash_secret(&id),
        api_token_id: token.id.clone(),
        csrf_token: auth::new_secret(""),
        created_at: now,
        expires_at: now + chrono::Duration::hours(SESSION_HOURS),
    };
    if let Err(e) = state.store.insert_console_session(&session).await {
        tracing::error!(error = %e, "console sign-in failed");
        return login_form(
            StatusCode::SERVICE_UNAVAILABLE,
            Some("The controller's database is unavailable; try again."),
            &headers,
        );
    }
    if let Err(e) = state.store.delete_expired_console_sessions(now).await {
        tracing::warn!(error = %e, "could not remove expired console sessions");
    }
    tracing::info!(token = %token.name, "console sign-in");
    let secure = secure(&headers);
    let cookies = [
        set_cookie(format!(
            "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            SESSION_HOURS * 3600
        )),
        set_cookie(format!(
            "{LOGIN_COOKIE}=; Path=/console/login; HttpOnly; SameSite=Strict; Max-Age=0{secure}"
        )),
    ];
    (AppendHeaders(cookies), Redirect::to("/console")).into_response()
}

/// Ends the session (its CSRF token was checked by `require_sign_in`).
pub async fn logout(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, COOKIE)
        && let Err(e) = state.store.delete_console_session(&auth::hash_secret(&id)).await
    {
        tracing::error!(error = %e, "console sign-out failed");
        return forbidden("The controller's database is unavailable; you are still signed in.");
    }
    let clear = set_cookie(format!(
        "{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0{}",
        secure(&headers)
    ));
    (AppendHeaders([clear]), Redirect::to("/console/login")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_csrf_token() {
        let at = chrono::Utc::now();
        let session = crate::store::console_sessions::ConsoleSession {
            id_hash: "h".into(),
            api_token_id: "t".into(),
            csrf_token: "csrf-S3CR3T".into(),
            created_at: at,
            expires_at: at,
        };
        let token = ApiToken {
            id: "t".into(),
            name: "ana".into(),
            role: Role::Admin,
            token_hash: "h".into(),
            created_at: at,
        };
        let signed_in = SignedIn { token, csrf: "csrf-S3CR3T".into() };
        for shown in [format!("{session:?}"), format!("{signed_in:?}")] {
            assert!(!shown.contains("S3CR3T"), "{shown}");
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
