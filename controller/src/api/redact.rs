//! What a viewer token never reads: the at-rest form of any secret. Every answer to a viewer
//! passes through `for_viewer` (in `authenticate`), so no route — resources, exports,
//! revisions, reports, future ones — can hand a viewer a connector key's `key_hash`, a staff
//! `password_hash`, a token's or credential's hash. (Staff password hashes and webhook secrets
//! are withheld from admins too, in `resources::view`; admins do read connector `key_hash`,
//! which tells keys apart.)

use axum::body::Body;
use axum::http::header;
use axum::response::Response;
use serde_json::Value;

/// Fields holding a secret or its hash, removed wherever they appear in a viewer's answer.
pub const SECRET_FIELDS: &[&str] =
    &["key_hash", "password_hash", "token_hash", "credential_hash", "secret_hash"];

/// The largest JSON answer rewritten for a viewer (larger ones are refused, not leaked).
const MAX_JSON_BYTES: usize = 256 * 1024 * 1024;

/// Removes `SECRET_FIELDS` (and a webhook's `secret`) from every object in `value`.
pub fn redact(value: &mut Value) {
    match value {
        Value::Object(obj) => {
            for field in SECRET_FIELDS {
                obj.remove(*field);
            }
            if obj.get("kind").and_then(Value::as_str) == Some("webhook") {
                obj.remove("secret");
            }
            obj.values_mut().for_each(redact);
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// A viewer's answer with `redact` applied to its JSON body; other bodies pass untouched.
pub async fn for_viewer(resp: Response) -> Response {
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_JSON_BYTES).await else {
        tracing::error!("an answer to a viewer was too large to check for secrets; withheld");
        let refused = super::error::ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        );
        return axum::response::IntoResponse::into_response(refused);
    };
    let Ok(mut value) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    redact(&mut value);
    let out = value.to_string();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secrets_go_wherever_they_are_nested() {
        let mut v = json!({
            "resources": [
                {"kind": "connector_key", "code": "k", "key_hash": "ab"},
                {"kind": "webhook", "code": "w", "secret": "s", "url": "https://x"},
                {"kind": "staff_user", "username": "u", "password_hash": "$argon2"},
                {"kind": "request_type", "fields": [{"name": "secret"}]}
            ],
            "token_hash": "t"
        });
        redact(&mut v);
        assert_eq!(
            v,
            json!({
                "resources": [
                    {"kind": "connector_key", "code": "k"},
                    {"kind": "webhook", "code": "w", "url": "https://x"},
                    {"kind": "staff_user", "username": "u"},
                    {"kind": "request_type", "fields": [{"name": "secret"}]}
                ]
            })
        );
    }
}
