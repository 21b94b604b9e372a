//! The HTTP edge both servers share (the agent's branch server, the controller's admin API and
//! console): slow clients and connection floods are bounded, live feeds are capped, and every
//! response carries the browser security headers.
//!
//! - `serve` runs hyper's HTTP/1 connections itself (axum's `serve` sets no timer, so it has
//!   no header timeout): a client has `Limits::header_read_timeout` to send a request's head (an
//!   idle keep-alive connection as long for its next one), at most
//!   `Limits::body_read_timeout` between two pieces of a request body, and at most
//!   `Limits::max_connections` connections are served at once — further ones wait in the
//!   listen backlog until one closes. `serve_with` takes a `Handshake` (TLS) that runs under
//!   the header timeout too.
//! - `security_headers` (applied by `serve` to every response): `nosniff`, referrers to the same
//!   origin only (`no-referrer` would make browsers send `Origin: null` on same-origin posts),
//!   `Cache-Control: no-store` unless the handler chose a policy, and on HTML pages a
//!   Content-Security-Policy that allows scripts and styles from the server itself only and no
//!   framing (`X-Frame-Options: DENY`). A page that may be framed sets its own policy with
//!   `page_policy`.
//! - `LiveFeeds` caps the live feeds (server-sent events) one server holds open; over the cap
//!   a subscriber gets `503` with `Retry-After`.

mod errors;
mod live_feeds;
mod serve;

use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::http::{HeaderName, HeaderValue};
use axum::response::Response;

pub use errors::{code_for, typed_error_body};
pub use live_feeds::{LIVE_FEED_RETRY_AFTER_S, LiveFeedSlot, LiveFeeds, LiveFeedsFull};
pub use serve::{Handshake, Limits, Plaintext, serve, serve_with};

/// The policy of every HTML page: scripts, styles and fetches from the server itself, forms
/// posted to it, nothing inline, no plugins, no framing.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'";

/// Everything else (JSON, CSV, text, scripts, styles) is never a document to render.
const NON_PAGE_POLICY: &str = "default-src 'none'; frame-ancestors 'none'";

/// The security headers of an HTML page that `frame_ancestors` (CSP source expressions, see
/// `check_frame_ancestor`) may frame; none: no framing at all.
pub fn page_policy(frame_ancestors: &[String]) -> Vec<(HeaderName, HeaderValue)> {
    let ancestors =
        if frame_ancestors.is_empty() { "'none'".to_owned() } else { frame_ancestors.join(" ") };
    let policy = format!("{PAGE_POLICY}; frame-ancestors {ancestors}");
    let mut headers = vec![(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_str(&policy)
            .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'")),
    )];
    if frame_ancestors.is_empty() {
        // For browsers without CSP level 2; it cannot name origins, so a page that may be
        // framed relies on `frame-ancestors` alone.
        headers.push((X_FRAME_OPTIONS, HeaderValue::from_static("DENY")));
    }
    headers
}

/// Whether `source` may be given as a frame ancestor: `'self'` or an origin
/// (`https://signage.example.com`, `https://*.example.com`, `http://10.1.2.3:8080`), nothing
/// that could end the directive or widen it to anyone.
pub fn check_frame_ancestor(source: &str) -> Result<(), String> {
    if source == "'self'" {
        return Ok(());
    }
    let rest =
        source.strip_prefix("https://").or_else(|| source.strip_prefix("http://")).ok_or_else(
            || format!("{source:?}: an origin like https://signage.example.com, or 'self'"),
        )?;
    let host = rest.strip_prefix("*.").unwrap_or(rest);
    let valid = !host.is_empty()
        && !host.starts_with(['.', ':'])
        && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{source:?}: an origin like https://signage.example.com (no path, no wildcard but a leading *.)"
        ))
    }
}

/// Adds the security headers to `resp` (see the module documentation); what the handler set
/// itself is kept.
pub async fn security_headers(mut resp: Response) -> Response {
    let is_page =
        resp.headers().get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/html"));
    let headers = resp.headers_mut();
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.entry(REFERRER_POLICY).or_insert(HeaderValue::from_static("same-origin"));
    headers.entry(CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    if !headers.contains_key(CONTENT_SECURITY_POLICY) {
        if is_page {
            headers.extend(page_policy(&[]));
        } else {
            headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(NON_PAGE_POLICY));
        }
    }
    resp
}

/// Whether a form post comes from the server's own pages: `Sec-Fetch-Site` (when the browser
/// sends it) says same-origin, and `Origin` (when sent) names the host the request was made to
/// (`Host`, or `X-Forwarded-Host` behind a proxy). A client that sends neither (not a browser)
/// is left to the credential checks.
pub fn same_origin(headers: &axum::http::HeaderMap) -> bool {
    use axum::http::header;
    let text = |name: HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text(HeaderName::from_static("sec-fetch-site"))
        && !matches!(site, "same-origin" | "none")
    {
        return false;
    }
    let Some(origin) = text(header::ORIGIN) else { return true };
    let Some(host) = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"))
    else {
        return false;
    };
    [text(header::HOST), text(HeaderName::from_static("x-forwarded-host"))]
        .into_iter()
        .flatten()
        .any(|h| h.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_origin_posts_only() {
        let check = |pairs: &[(&'static str, &'static str)], ok: bool| {
            let mut h = axum::http::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            assert_eq!(same_origin(&h), ok, "{pairs:?}");
        };
        check(&[], true);
        check(&[("host", "ctl:8080"), ("origin", "http://ctl:8080")], true);
        check(
            &[
                ("host", "10.0.0.5:8080"),
                ("x-forwarded-host", "ops.example.com"),
                ("origin", "https://ops.example.com"),
            ],
            true,
        );
        check(&[("host", "ctl:8080"), ("origin", "https://evil.example")], false);
        check(&[("host", "ctl:8080"), ("origin", "null")], false);
        check(&[("host", "ctl:8080"), ("sec-fetch-site", "cross-site")], false);
        check(&[("host", "ctl:8080"), ("sec-fetch-site", "same-site")], false);
        check(
            &[
                ("host", "ctl:8080"),
                ("sec-fetch-site", "same-origin"),
                ("origin", "http://ctl:8080"),
            ],
            true,
        );
    }

    #[test]
    fn frame_ancestors_are_origins_or_self() {
        for ok in [
            "'self'",
            "https://signage.example.com",
            "https://*.example.com",
            "http://10.1.2.3:8080",
        ] {
            assert!(check_frame_ancestor(ok).is_ok(), "{ok}");
        }
        for bad in [
            "*",
            "https://*",
            "example.com",
            "https://a.example.com/path",
            "https://a.example.com; script-src *",
            "https://a b",
            "'none'",
            "'unsafe-inline'",
            "https://",
        ] {
            assert!(check_frame_ancestor(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_page_that_may_be_framed_names_its_ancestors_and_drops_x_frame_options() {
        let framed = page_policy(&["https://signage.example.com".into(), "'self'".into()]);
        assert_eq!(framed.len(), 1);
        let csp = framed[0].1.to_str().expect("ascii");
        assert!(csp.ends_with("frame-ancestors https://signage.example.com 'self'"), "{csp}");
        let closed = page_policy(&[]);
        assert!(closed[0].1.to_str().expect("ascii").ends_with("frame-ancestors 'none'"));
        assert_eq!(closed[1], (X_FRAME_OPTIONS, HeaderValue::from_static("DENY")));
    }
}
