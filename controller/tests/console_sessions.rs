//! Console sessions and cross-site request forgery, through the console's router: the cookie
//! holds a session id (never the API token), the session ends at sign-out, at expiry and with
//! its token; a form post without the session's CSRF token, with a wrong one or from another
//! site is refused with 403 and changes nothing; the sign-in form itself cannot be posted from
//! another site (login CSRF).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use chrono::Utc;
use meridian_controller::api::{self, ApiState};
use meridian_controller::auth;
use meridian_controller::metrics::Metrics;
use meridian_controller::store::console_sessions::ConsoleSession;
use meridian_controller::store::{self, Role, Store};
use meridian_controller::testing::{self, ConsoleSignIn, console_sign_in};
use tower::ServiceExt;

async fn console() -> (Arc<dyn Store>, Router, String) {
    let store = store::open(&testing::fresh_sqlite_url()).await.expect("store");
    let token = meridian_controller::server::ensure_bootstrap_token(store.as_ref(), None)
        .await
        .expect("token")
        .expect("first token");
    let state = ApiState {
        store: store.clone(),
        metrics: Arc::new(Metrics::default()),
        commands_changed: Arc::new(tokio::sync::watch::channel(0).0),
        clock_skew_tolerance: meridian_controller::Settings::default().clock_skew_tolerance(),
    };
    (store, meridian_controller::console::router(state), token)
}

/// Status, `Location` and whether a session cookie was set.
async fn send(router: &Router, req: Request<Body>) -> (StatusCode, Option<String>, bool) {
    let resp = router.clone().oneshot(req).await.expect("response");
    let location =
        resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let session_set = testing::set_cookie(resp.headers(), "meridian_console")
        .is_some_and(|c| c != "meridian_console=");
    (resp.status(), location, session_set)
}

/// Whether `session` still opens the fleet page.
async fn signed_in(router: &Router, session: &ConsoleSignIn) -> bool {
    send(router, session.get("/console")).await.0 == StatusCode::OK
}

fn post(cookie: &str, path: &str) -> axum::http::request::Builder {
    Request::post(path)
        .header(header::COOKIE, cookie)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
}

#[tokio::test]
async fn the_cookie_holds_a_session_that_ends_at_sign_out_expiry_or_with_its_token() {
    let (store, router, admin) = console().await;
    let session = console_sign_in(&router, &admin).await;
    let id = session.cookie.strip_prefix("meridian_console=").expect("cookie").to_owned();
    assert!(!session.cookie.contains(&admin), "the token is not in the cookie");
    assert!(!session.cookie.contains(&auth::hash_secret(&admin)), "nor its hash");
    // Only the id's hash is stored.
    let now = Utc::now();
    assert!(store.console_session(&auth::hash_secret(&id), now).await.expect("get").is_some());
    assert!(store.console_session(&id, now).await.expect("get").is_none());
    assert!(signed_in(&router, &session).await);

    // Sign-out ends it; its cookie no longer opens anything.
    let (status, location, _) = send(&router, session.post("/console/logout", "")).await;
    assert_eq!((status, location.as_deref()), (StatusCode::SEE_OTHER, Some("/console/login")));
    assert!(!signed_in(&router, &session).await, "signed out");

    // Deleting the API token ends every session opened with it.
    let (viewer, secret) = api::new_api_token("dashboard", Role::Viewer);
    store.insert_api_token(&viewer).await.expect("viewer token");
    let first = console_sign_in(&router, &secret).await;
    let second = console_sign_in(&router, &secret).await;
    assert!(signed_in(&router, &first).await && signed_in(&router, &second).await);
    assert!(store.delete_api_token(&viewer.id).await.expect("revoke"));
    assert!(!signed_in(&router, &first).await, "revoked token, first session");
    assert!(!signed_in(&router, &second).await, "revoked token, second session");

    // An expired session opens nothing.
    let expired = "mrd_cs_expired-session";
    let at = Utc::now() - chrono::Duration::hours(13);
    let tokens = store.list_api_tokens().await.expect("tokens");
    store
        .insert_console_session(&ConsoleSession {
            id_hash: auth::hash_secret(expired),
            api_token_id: tokens[0].id.clone(),
            csrf_token: "x".into(),
            created_at: at,
            expires_at: at + chrono::Duration::hours(12),
        })
        .await
        .expect("expired session");
    let stale = ConsoleSignIn { cookie: format!("meridian_console={expired}"), csrf: "x".into() };
    assert!(!signed_in(&router, &stale).await, "expired");
}

#[tokio::test]
async fn a_post_without_the_sessions_csrf_token_or_from_another_site_is_refused() {
    let (_, router, admin) = console().await;
    let session = console_sign_in(&router, &admin).await;
    let other = console_sign_in(&router, &admin).await;
    let refused: Vec<(&str, Request<Body>)> = vec![
        ("no token", post(&session.cookie, "/console/logout").body(Body::empty())),
        ("a wrong token", post(&session.cookie, "/console/logout").body(Body::from("csrf=forged"))),
        (
            "another session's token",
            post(&session.cookie, "/console/logout")
                .body(Body::from(format!("csrf={}", other.csrf))),
        ),
        (
            "another site's origin",
            post(&session.cookie, "/console/logout")
                .header(header::HOST, "controller:8080")
                .header(header::ORIGIN, "https://evil.example")
                .body(Body::from(format!("csrf={}", session.csrf))),
        ),
        (
            "a cross-site fetch",
            post(&session.cookie, "/console/logout")
                .header("sec-fetch-site", "cross-site")
                .body(Body::from(format!("csrf={}", session.csrf))),
        ),
        (
            "an admin action without a token",
            post(&session.cookie, "/console/stats/rebuild").body(Body::empty()),
        ),
    ]
    .into_iter()
    .map(|(what, req)| (what, req.expect("request")))
    .collect();
    for (what, req) in refused {
        let (status, _, _) = send(&router, req).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
        assert!(signed_in(&router, &session).await, "{what}: the session is untouched");
    }
    // The same post from the console's own page goes through.
    let same_site = post(&session.cookie, "/console/logout")
        .header(header::HOST, "controller:8080")
        .header(header::ORIGIN, "http://controller:8080")
        .header("sec-fetch-site", "same-origin")
        .body(Body::from(format!("csrf={}", session.csrf)))
        .expect("request");
    assert_eq!(send(&router, same_site).await.0, StatusCode::SEE_OTHER);
    assert!(!signed_in(&router, &session).await);
    assert!(signed_in(&router, &other).await, "another session is not affected");
}

#[tokio::test]
async fn the_sign_in_form_cannot_be_posted_from_another_site() {
    let (_, router, admin) = console().await;
    let page = router
        .clone()
        .oneshot(Request::get("/console/login").body(Body::empty()).expect("request"))
        .await
        .expect("sign-in page");
    let nonce_cookie =
        testing::set_cookie(page.headers(), "meridian_console_login").expect("login cookie");
    let html = axum::body::to_bytes(page.into_body(), 1 << 20).await.expect("body");
    let nonce = testing::hidden_field(&String::from_utf8_lossy(&html), "csrf").expect("nonce");
    let form = |cookie: Option<&str>, csrf: &str| {
        let mut req = Request::post("/console/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, c);
        }
        (req, format!("token={admin}&csrf={csrf}"))
    };
    let cases = [
        ("no form cookie", form(None, &nonce)),
        ("no form value", form(Some(&nonce_cookie), "")),
        ("another form's value", form(Some(&nonce_cookie), "0123abcd")),
        ("another site", {
            let (req, body) = form(Some(&nonce_cookie), &nonce);
            (
                req.header(header::HOST, "controller")
                    .header(header::ORIGIN, "https://evil.example"),
                body,
            )
        }),
    ];
    for (what, (req, body)) in cases {
        let (status, _, session_set) =
            send(&router, req.body(Body::from(body)).expect("request")).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
        assert!(!session_set, "{what}: no session opened");
    }
    // The form as the page served it signs in.
    let (req, body) = form(Some(&nonce_cookie), &nonce);
    let (status, location, session_set) =
        send(&router, req.body(Body::from(body)).expect("request")).await;
    assert_eq!((status, location.as_deref()), (StatusCode::SEE_OTHER, Some("/console")));
    assert!(session_set);
}
