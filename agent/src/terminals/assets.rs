//! The terminals' script and style sheet, compiled into the agent and served from it (the
//! pages' Content-Security-Policy allows scripts and styles from the agent only, none inline).
//! Their URLs carry the agent's version, so a browser may keep them for a day and still gets
//! the new ones right after an upgrade.

use axum::http::header;
use axum::response::IntoResponse;
use maud::{Markup, html};

pub const SCRIPT_PATH: &str = "/assets/terminals.js";
pub const STYLE_PATH: &str = "/assets/terminals.css";

const SCRIPT: &str = include_str!("assets/terminals.js");
const STYLE: &str = include_str!("assets/terminals.css");
const CACHE: &str = "public, max-age=86400";

/// The `<link>` and `<script>` every page's head carries.
pub fn links() -> Markup {
    let version = crate::VERSION;
    html! {
        link rel="stylesheet" href=(format!("{STYLE_PATH}?v={version}"));
        script src=(format!("{SCRIPT_PATH}?v={version}")) defer {}
    }
}

pub async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, CACHE)],
        SCRIPT,
    )
}

pub async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, CACHE)], STYLE)
}
