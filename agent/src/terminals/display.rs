//! The "now serving" display: the tickets at counters, newest call highlighted. The page
//! subscribes to `/display/events` (server-sent events) and re-renders its board from
//! `/display/board` on every branch change, so a call shows within milliseconds. It is the one
//! page that may be framed (by the origins in `display_frame_ancestors`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{AppendHeaders, Html, IntoResponse, Response};
use futures::Stream;
use maud::{Markup, html};
use meridian_shared::http_guard::page_policy;

use super::{from_error, layout, offline_banner};
use crate::Context;
use crate::visits;

/// Calls shown on the board.
const BOARD_SIZE: u32 = 8;

pub async fn page(State(ctx): State<Arc<Context>>) -> Response {
    let board = match render_board(&ctx).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let site = ctx.site_config().map(|c| c.site.name.clone()).unwrap_or_default();
    let body = html! {
        header { span { (site) } span { "Now serving" } }
        // `terminals.js` re-renders the board on every branch change.
        main { div #board data-live="board" { (board) } }
    };
    // The banner lives inside the board so it follows the link live.
    let online = crate::link::LinkStatus { connected: true, ..Default::default() };
    // The one page digital signage may frame, from the origins the settings name.
    let policy = page_policy(&ctx.display_frame_ancestors);
    (AppendHeaders(policy), Html(layout("Now serving", &online, None, body).into_string()))
        .into_response()
}

pub async fn board(State(ctx): State<Arc<Context>>) -> Response {
    match render_board(&ctx).await {
        Ok(b) => Html(b.into_string()).into_response(),
        Err(r) => r,
    }
}

async fn render_board(ctx: &Arc<Context>) -> Result<Markup, Response> {
    let calls = ctx
        .db
        .read(|c| visits::recent_calls(c, BOARD_SIZE))
        .await
        .map_err(|e| from_error(ctx, e))?;
    let config = ctx.site_config().ok();
    let counter_name = |code: &str| {
        config
            .as_ref()
            .and_then(|c| c.service_points.iter().find(|p| p.code.as_str() == code))
            .map(|p| p.name.clone())
            .unwrap_or_else(|| code.to_owned())
    };
    let link = ctx.link.borrow().clone();
    Ok(html! {
        (offline_banner(&link))
        ul #calls {
            @for (i, v) in calls.iter().enumerate() {
                li .call .latest[i == 0] data-ticket=(v.ticket) {
                    (v.ticket) " → " (counter_name(v.counter.as_deref().unwrap_or_default()))
                }
            }
        }
        @if calls.is_empty() { p .muted { "Please wait for your number to be called." } }
    })
}

/// One `refresh` event per branch change (and per link change), plus keep-alives; `503` with
/// `Retry-After` when the branch holds `max_live_feeds` feeds already.
pub async fn events(State(ctx): State<Arc<Context>>) -> Response {
    let slot = match ctx.live_feeds.join() {
        Ok(slot) => slot,
        Err(refused) => return refused.into_response(),
    };
    let mut activity = ctx.activity.subscribe();
    let stream = async_stream(move |tx| async move {
        // Held while the subscriber is there.
        let _slot = slot;
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                changed = activity.changed() => if changed.is_err() { return },
            }
            if tx.send(Ok(Event::default().data("refresh"))).await.is_err() {
                return;
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

/// A stream fed by a task through a small bounded channel (when a slow client lets it fill, the
/// task waits; changes coalesce because the watch keeps only the latest).
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Event, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
