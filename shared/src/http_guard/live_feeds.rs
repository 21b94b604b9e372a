//! A cap on the live feeds (server-sent events) one server holds open at once: each feed holds
//! a `LiveFeedSlot` for as long as its stream lives; when none is free the subscriber is
//! answered `503` with `Retry-After` at once (no queue: a feed never ends on its own).

use std::sync::Arc;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What a refused subscriber is told to wait before it tries again (seconds).
pub const LIVE_FEED_RETRY_AFTER_S: u64 = 5;

/// The live feeds of one server (shared by all its live endpoints).
#[derive(Debug, Clone)]
pub struct LiveFeeds {
    slots: Arc<Semaphore>,
    max: usize,
}

/// One open live feed; dropping it (when the stream ends) frees the slot.
#[derive(Debug)]
pub struct LiveFeedSlot {
    _permit: OwnedSemaphorePermit,
}

impl LiveFeeds {
    /// At most `max` feeds at once (at least one).
    pub fn new(max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        LiveFeeds { slots: Arc::new(Semaphore::new(max)), max }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Feeds open now.
    pub fn open(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// A slot for a new feed, or the refusal to answer instead (`LiveFeedsFull`).
    pub fn join(&self) -> Result<LiveFeedSlot, LiveFeedsFull> {
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => Ok(LiveFeedSlot { _permit: permit }),
            Err(_) => {
                tracing::warn!(max = self.max, "live feed refused: every slot is taken");
                Err(LiveFeedsFull { max: self.max })
            }
        }
    }
}

/// Every slot is taken: answered `503 too_many_live_feeds` (typed JSON) with `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveFeedsFull {
    max: usize,
}

impl IntoResponse for LiveFeedsFull {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "code": "too_many_live_feeds",
            "message": format!(
                "this server already holds {} live feeds; retry in {LIVE_FEED_RETRY_AFTER_S} s",
                self.max
            ),
        });
        let mut resp = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(LIVE_FEED_RETRY_AFTER_S));
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feed_over_the_cap_is_refused_until_one_ends() {
        let feeds = LiveFeeds::new(2);
        let a = feeds.join().expect("first");
        let _b = feeds.join().expect("second");
        let refused = feeds.join().expect_err("third").into_response();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.headers()[header::RETRY_AFTER], "5");
        assert_eq!(feeds.open(), 2);
        drop(a);
        assert_eq!(feeds.open(), 1);
        let _c = feeds.join().expect("a slot freed");
    }
}
