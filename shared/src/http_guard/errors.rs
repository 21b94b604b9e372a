//! The error body for the answers axum gives by itself, on both servers: an extractor's
//! rejection (an undecodable path segment or query string, a body over the limit, a body that
//! is not JSON), a method a route does not have (405, with its `Allow` header), a request a
//! layer refused. They are plain text or empty; `typed_error_body` turns every one into the
//! documented JSON error `{"code","message"}`. Responses that are already JSON pass through.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The stable `code` of an error answered with `status` and no body of ours.
pub fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_body",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    }
}

/// `axum::middleware::map_response` body: a 4xx/5xx that is not JSON becomes the JSON error,
/// keeping the status and the headers (`Allow`, `Retry-After`, …).
pub async fn typed_error_body(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => "this endpoint does not support this method".to_owned(),
        StatusCode::NOT_FOUND => "no such endpoint".to_owned(),
        s if s.is_server_error() => "internal error".to_owned(),
        _ if text.is_empty() => status.canonical_reason().unwrap_or("bad request").to_owned(),
        _ => text,
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_TYPE);
    let body = serde_json::json!({ "code": code_for(status), "message": message });
    let typed = (status, axum::Json(body)).into_response();
    let (typed_parts, typed_body) = typed.into_parts();
    parts.headers.extend(typed_parts.headers);
    Response::from_parts(parts, typed_body)
}
