//! Outbound webhooks: every event the branch records (or the kinds a webhook asks for) is POSTed
//! to each configured receiver, in order, at least once. The body is signed with HMAC-SHA256
//! over `"<unix-seconds>.<body>"` (header `X-Meridian-Signature: t=<ts>,v1=<hex>`), so a receiver
//! can check authenticity and reject replays; `X-Meridian-Delivery` (`<site>-<seq>`) lets it
//! drop duplicates. A failing receiver is retried with capped exponential backoff and full
//! jitter, without holding up the others. Delivery resumes from a durable per-webhook cursor
//! over the locally retained events; a receiver that stays down longer than the retention
//! loses the oldest events, which is logged at error level.
//!
//! Personal data: a webhook is a receiver the site's configuration names, so its deliveries
//! carry the visit's customer fields on `VISIT_CREATED` whether or not the site shares them
//! with central (`visits::for_local_subscribers`). Point webhooks only at receivers allowed
//! to hold customers' personal data.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use meridian_shared::backoff::BackoffPolicy;
use meridian_shared::config::Webhook;
use rusqlite::{OptionalExtension, params};
use sha2::Sha256;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Context;
use crate::store::queries;

/// Events read per round per webhook.
const PAGE: u32 = 100;

#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub backoff: BackoffPolicy,
    pub timeout: Duration,
}

/// `v1` signature of `body` sent at `timestamp` (unix seconds).
pub fn sign(secret: &str, timestamp: i64, body: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("{timestamp}.{body}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error("receiver answered {0}")]
    Status(u16),
    #[error("receiver unreachable: {0}")]
    Transport(String),
    #[error("local store: {0}")]
    Store(#[from] crate::Error),
}

/// Runs until `shutdown`, delivering to every webhook in the current configuration.
pub async fn run(ctx: Arc<Context>, settings: WebhookSettings, shutdown: CancellationToken) {
    let client = match reqwest::Client::builder().timeout(settings.timeout).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook HTTP client; webhooks disabled");
            return;
        }
    };
    let mut activity = ctx.activity.subscribe();
    // Per webhook: failed attempts in a row and when to try again.
    let mut retry: HashMap<String, (u32, Instant)> = HashMap::new();
    loop {
        let (site, hooks) = match ctx.config.borrow().as_ref() {
            Some(c) => (c.site.code.to_string(), c.webhooks.clone()),
            None => (String::new(), vec![]),
        };
        retry.retain(|code, _| hooks.iter().any(|h| h.code.as_str() == code));
        for hook in &hooks {
            let code = hook.code.to_string();
            if retry.get(&code).is_some_and(|(_, at)| *at > Instant::now()) {
                continue;
            }
            match deliver_pending(&ctx, &client, &site, hook).await {
                Ok(()) => {
                    retry.remove(&code);
                }
                Err(e) => {
                    let attempts = retry.get(&code).map_or(0, |(n, _)| *n);
                    let delay = settings.backoff.delay(attempts, &mut rand::rng());
                    tracing::warn!(webhook = %code, error = %e, retry_in_ms = delay.as_millis() as u64, "webhook delivery failed");
                    retry.insert(code, (attempts.saturating_add(1), Instant::now() + delay));
                }
            }
        }
        let next_retry = retry.values().map(|(_, at)| *at).min();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = activity.changed() => if changed.is_err() { return },
            _ = async {
                match next_retry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

async fn cursor(ctx: &Context, code: &str) -> Result<u64, crate::Error> {
    let code = code.to_owned();
    let now = ctx.clock.now().to_rfc3339();
    ctx.db
        .write(move |c| {
            let found: Option<i64> = c
                .query_row("SELECT seq FROM webhook_cursors WHERE code = ?1", [&code], |r| r.get(0))
                .optional()?;
            if let Some(seq) = found {
                return Ok(seq as u64);
            }
            // A new webhook receives what happens from now on.
            let (high, _) = queries::outbox_state(c)?;
            c.execute(
                "INSERT INTO webhook_cursors (code, seq, updated_at) VALUES (?1, ?2, ?3)",
                params![code, high as i64, now],
            )?;
            Ok(high)
        })
        .await
}

async fn save_cursor(ctx: &Context, code: &str, seq: u64) -> Result<(), crate::Error> {
    let code = code.to_owned();
    let now = ctx.clock.now().to_rfc3339();
    ctx.db
        .write(move |c| {
            c.execute(
                "UPDATE webhook_cursors SET seq = ?2, updated_at = ?3 WHERE code = ?1 AND seq < ?2",
                params![code, seq as i64, now],
            )?;
            Ok(())
        })
        .await
}

async fn deliver_pending(
    ctx: &Context,
    client: &reqwest::Client,
    site: &str,
    hook: &Webhook,
) -> Result<(), DeliveryError> {
    let code = hook.code.as_str();
    let mut at = cursor(ctx, code).await?;
    loop {
        let after = at;
        let (page, oldest) = ctx
            .db
            .read(move |c| {
                let page = queries::outbox_after(c, after, PAGE)?;
                Ok((crate::visits::for_local_subscribers(c, page)?, queries::oldest_retained(c)?))
            })
            .await?;
        if let Some(oldest) = oldest
            && oldest > at + 1
            && page.first().is_some_and(|e| e.seq == oldest)
        {
            tracing::error!(webhook = %code, from = at + 1, to = oldest - 1, "events expired before the webhook receiver accepted them");
        }
        let Some(last) = page.last().map(|e| e.seq) else { return Ok(()) };
        for e in page {
            if hook.kinds.is_empty() || hook.kinds.contains(&e.kind) {
                let payload: serde_json::Value =
                    serde_json::from_slice(&e.payload).unwrap_or_default();
                let delivery = format!("{site}-{}", e.seq);
                let body = serde_json::json!({
                    "id": delivery,
                    "site": site,
                    "seq": e.seq,
                    "kind": e.kind,
                    "occurred_at": chrono::DateTime::from_timestamp_millis(e.occurred_at_ms),
                    "payload": payload,
                })
                .to_string();
                let ts = ctx.clock.now().timestamp();
                let resp = client
                    .post(&hook.url)
                    .header("content-type", "application/json")
                    .header("x-meridian-delivery", &delivery)
                    .header(
                        "x-meridian-signature",
                        format!("t={ts},v1={}", sign(&hook.secret, ts, &body)),
                    )
                    .body(body)
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => {
                        save_cursor(ctx, code, at).await?;
                        return Err(DeliveryError::Status(r.status().as_u16()));
                    }
                    Err(err) => {
                        save_cursor(ctx, code, at).await?;
                        // Without the URL: a webhook URL often carries a secret of its own
                        // (a token in its path or query), and this error is logged.
                        return Err(DeliveryError::Transport(err.without_url().to_string()));
                    }
                }
            }
            at = e.seq;
            save_cursor(ctx, code, at).await?;
        }
        at = at.max(last);
    }
}
