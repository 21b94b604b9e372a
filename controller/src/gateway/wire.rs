//! What an agent's bytes become at the gateway, before anything is stored: protobuf decoding of
//! the gateway's request messages, the checks every frame passes, and the conversion of an
//! event batch into the events the store ingests. Pure functions, so they are fuzzed
//! (`fuzz/fuzz_targets/gateway_frames.rs`) and unit-tested without a session.
//!
//! Architecture invariant: every counter an agent sends (sequences, revisions, high-water
//! marks, nonces, segment ids) is an unsigned 64-bit integer on the wire and a signed one in
//! both stores; one above `i64::MAX` is refused here with a typed `ProtocolError`, so nothing
//! wraps into a negative number in a column.

use chrono::{DateTime, Utc};
use meridian_proto::{AgentFrame, EventBatch, Hello, agent_frame};
use meridian_shared::events::{MAX_EVENT_KIND, MAX_EVENT_PAYLOAD, validate_wire_event};
use prost::Message;

use crate::store::IncomingEvent;

/// Most events in one batch.
pub const MAX_BATCH_EVENTS: usize = 5_000;

/// Why a frame is refused: sent to the agent as a `ProtocolError` with this code and message,
/// then the session ends. Nothing the frame carried is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Refusal { code, message: message.into() }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// The largest counter the stores keep (signed 64-bit columns).
pub const MAX_COUNTER: u64 = i64::MAX as u64;

/// Refuses a counter the stores cannot keep as it is.
pub fn counter(field: &str, value: u64) -> Result<u64, Refusal> {
    if value > MAX_COUNTER {
        return Err(Refusal::new(
            "counter_out_of_range",
            format!("{field} = {value} is above the largest counter ({MAX_COUNTER})"),
        ));
    }
    Ok(value)
}

/// Checks every counter of a Hello.
pub fn check_hello(h: &Hello) -> Result<(), Refusal> {
    counter("config_revision", h.config_revision)?;
    counter("last_applied_command_seq", h.last_applied_command_seq)?;
    counter("last_applied_command_nonce", h.last_applied_command_nonce)?;
    counter("outbox_high_water", h.outbox_high_water)?;
    counter("outbox_acked", h.outbox_acked)?;
    counter("outbox_oldest", h.outbox_oldest)?;
    for s in &h.lineage {
        for (field, v) in [
            ("lineage.id", s.id),
            ("lineage.first_seq", s.first_seq),
            ("lineage.origin_keep_through", s.origin_keep_through),
            ("lineage.origin_base", s.origin_base),
            ("lineage.origin_moved_head", s.origin_moved_head),
        ] {
            counter(field, v)?;
        }
    }
    for g in &h.holes {
        counter("holes.first", g.first)?;
        counter("holes.last", g.last)?;
    }
    for c in &h.applied_checkpoints {
        counter("applied_checkpoints.seq", c.seq)?;
        counter("applied_checkpoints.nonce", c.nonce)?;
    }
    Ok(())
}

/// Checks a frame after the Hello: its counters (an event batch is converted by `events`).
pub fn check_frame(f: &AgentFrame) -> Result<(), Refusal> {
    match &f.body {
        None => Err(Refusal::new("empty_frame", "frame without a body")),
        Some(agent_frame::Body::Hello(h)) => check_hello(h),
        Some(agent_frame::Body::Events(batch)) => {
            if batch.events.len() > MAX_BATCH_EVENTS {
                return Err(Refusal::new(
                    "batch_too_large",
                    format!("at most {MAX_BATCH_EVENTS} events per batch"),
                ));
            }
            batch.events.iter().try_for_each(|e| counter("events.seq", e.seq).map(|_| ()))
        }
        Some(agent_frame::Body::CommandAck(a)) => {
            counter("command_ack.up_to_seq", a.up_to_seq).map(|_| ())
        }
        Some(agent_frame::Body::Status(s)) => {
            counter("status.config_revision", s.config_revision)?;
            counter("status.outbox_pending", s.outbox_pending)?;
            counter("status.outbox_high_water", s.outbox_high_water)?;
            Ok(())
        }
        Some(agent_frame::Body::Ping(_) | agent_frame::Body::Pong(_)) => Ok(()),
    }
}

/// An event batch as the store ingests it, with how many of its events were quarantined.
/// Malformed content never refuses the batch (the agent would resend it forever): such an
/// event is kept aside with the reason, for admins. A batch that is too large or holds a
/// sequence the store cannot keep is refused.
pub fn events(batch: EventBatch, now: DateTime<Utc>) -> Result<(Vec<IncomingEvent>, u64), Refusal> {
    if batch.events.len() > MAX_BATCH_EVENTS {
        return Err(Refusal::new(
            "batch_too_large",
            format!("at most {MAX_BATCH_EVENTS} events per batch"),
        ));
    }
    let mut events = Vec::with_capacity(batch.events.len());
    let mut quarantined = 0;
    for e in batch.events {
        let seq = counter("events.seq", e.seq)?;
        let mut problem = validate_wire_event(&e.kind, &e.payload).err().map(|e| e.to_string());
        let occurred_at =
            DateTime::<Utc>::from_timestamp_millis(e.occurred_at_ms).unwrap_or_else(|| {
                problem.get_or_insert_with(|| "occurred_at out of range".into());
                now
            });
        let payload = match String::from_utf8(e.payload) {
            Ok(p) => p,
            Err(err) => {
                problem.get_or_insert_with(|| "payload is not UTF-8".into());
                String::from_utf8_lossy(err.as_bytes()).into_owned()
            }
        };
        if problem.is_none() && payload.contains("\\u0000") {
            problem =
                Some("the payload holds a \\u0000 escape, which the store cannot keep".into());
        }
        let (kind, payload) = if problem.is_some() {
            quarantined += 1;
            // Text columns refuse NUL; keep everything else as it arrived.
            let clean = |s: &str, max| truncate(&s.replace('\0', "\u{FFFD}"), max);
            (clean(&e.kind, MAX_EVENT_KIND), clean(&payload, MAX_EVENT_PAYLOAD))
        } else {
            (e.kind, payload)
        };
        events.push(IncomingEvent { seq, kind, occurred_at, payload, quarantine: problem });
    }
    Ok((events, quarantined))
}

/// Which request message of the gateway a buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Enroll,
    AgentFrame,
    AppointmentSync,
    FetchRelease,
}

/// Decodes `bytes` as the gateway request message `kind` the way tonic does, then passes it
/// through the same checks and conversions as the gateway: the whole path an agent's bytes
/// take before the store. Never panics; a refusal is the agent's mistake.
pub fn decode_request(kind: RequestKind, bytes: &[u8], now: DateTime<Utc>) -> Result<(), Refusal> {
    let malformed = |e: prost::DecodeError| Refusal::new("malformed_frame", e.to_string());
    match kind {
        RequestKind::Enroll => {
            meridian_proto::EnrollRequest::decode(bytes).map_err(malformed)?;
        }
        RequestKind::AppointmentSync => {
            meridian_proto::AppointmentSyncRequest::decode(bytes).map_err(malformed)?;
        }
        RequestKind::FetchRelease => {
            // Its offset is checked against the release's size, not stored.
            meridian_proto::FetchReleaseRequest::decode(bytes).map_err(malformed)?;
        }
        RequestKind::AgentFrame => {
            let frame = AgentFrame::decode(bytes).map_err(malformed)?;
            check_frame(&frame)?;
            if let Some(agent_frame::Body::Events(batch)) = frame.body {
                events(batch, now)?;
            }
        }
    }
    Ok(())
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_proto::{Event, Status};

    const TOO_BIG: u64 = i64::MAX as u64 + 1;

    fn refused_code(r: Result<(), Refusal>) -> Option<&'static str> {
        r.err().map(|r| r.code)
    }

    #[test]
    fn every_counter_of_a_hello_above_i64_max_is_refused() {
        assert_eq!(check_hello(&Hello::default()), Ok(()));
        let max = Hello { outbox_high_water: MAX_COUNTER, ..Default::default() };
        assert_eq!(check_hello(&max), Ok(()), "i64::MAX itself fits");
        let cases: Vec<(&str, Hello)> = vec![
            ("config_revision", Hello { config_revision: TOO_BIG, ..Default::default() }),
            ("outbox_high_water", Hello { outbox_high_water: u64::MAX, ..Default::default() }),
            ("outbox_acked", Hello { outbox_acked: TOO_BIG, ..Default::default() }),
            ("outbox_oldest", Hello { outbox_oldest: TOO_BIG, ..Default::default() }),
            (
                "last_applied_command_seq",
                Hello { last_applied_command_seq: TOO_BIG, ..Default::default() },
            ),
            (
                "last_applied_command_nonce",
                Hello { last_applied_command_nonce: TOO_BIG, ..Default::default() },
            ),
            (
                "lineage.first_seq",
                Hello {
                    lineage: vec![meridian_proto::Segment {
                        id: 1,
                        first_seq: TOO_BIG,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ),
            (
                "holes.last",
                Hello {
                    holes: vec![meridian_proto::Gap { first: 1, last: TOO_BIG }],
                    ..Default::default()
                },
            ),
            (
                "applied_checkpoints.nonce",
                Hello {
                    applied_checkpoints: vec![meridian_proto::AppliedCommand {
                        seq: 1,
                        nonce: TOO_BIG,
                    }],
                    ..Default::default()
                },
            ),
        ];
        for (field, hello) in cases {
            let refusal = check_hello(&hello).expect_err(field);
            assert_eq!(refusal.code, "counter_out_of_range");
            assert!(refusal.message.starts_with(field), "{field}: {refusal}");
        }
    }

    #[test]
    fn status_acks_and_event_seqs_above_i64_max_are_refused() {
        let frame = |body| AgentFrame { body: Some(body) };
        let status = |s: Status| frame(agent_frame::Body::Status(s));
        for s in [
            Status { config_revision: TOO_BIG, ..Default::default() },
            Status { outbox_pending: u64::MAX, ..Default::default() },
            Status { outbox_high_water: TOO_BIG, ..Default::default() },
        ] {
            assert_eq!(refused_code(check_frame(&status(s))), Some("counter_out_of_range"));
        }
        assert_eq!(check_frame(&status(Status::default())), Ok(()));
        let ack = meridian_proto::CommandAck { up_to_seq: TOO_BIG, error: String::new() };
        let ack = frame(agent_frame::Body::CommandAck(ack));
        assert_eq!(refused_code(check_frame(&ack)), Some("counter_out_of_range"));
        let event = |seq| Event { seq, kind: "X".into(), occurred_at_ms: 1, payload: b"{}".into() };
        let batch = EventBatch { events: vec![event(1), event(TOO_BIG)] };
        let as_frame = frame(agent_frame::Body::Events(batch.clone()));
        assert_eq!(refused_code(check_frame(&as_frame)), Some("counter_out_of_range"));
        assert_eq!(
            events(batch, Utc::now()).map(|_| ()).err().map(|r| r.code),
            Some("counter_out_of_range")
        );
        let (ok, quarantined) = events(EventBatch { events: vec![event(MAX_COUNTER)] }, Utc::now())
            .expect("i64::MAX fits");
        assert_eq!((ok[0].seq, quarantined), (MAX_COUNTER, 0));
    }

    #[test]
    fn malformed_bytes_are_refused_not_panicked_on() {
        let now = Utc::now();
        for kind in [
            RequestKind::Enroll,
            RequestKind::AgentFrame,
            RequestKind::AppointmentSync,
            RequestKind::FetchRelease,
        ] {
            assert_eq!(
                decode_request(kind, &[], now),
                if kind == RequestKind::AgentFrame {
                    Err(Refusal::new("empty_frame", "frame without a body"))
                } else {
                    Ok(())
                }
            );
            let bad = decode_request(kind, &[0xff, 0xff, 0xff], now).expect_err("garbage");
            assert_eq!(bad.code, "malformed_frame");
        }
        let hello = AgentFrame {
            body: Some(agent_frame::Body::Hello(Hello {
                outbox_high_water: u64::MAX,
                ..Default::default()
            })),
        };
        let refused = decode_request(RequestKind::AgentFrame, &hello.encode_to_vec(), now);
        assert_eq!(refused_code(refused), Some("counter_out_of_range"));
    }
}
