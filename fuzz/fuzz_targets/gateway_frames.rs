//! The path every agent's bytes take at the gateway: protobuf decoding of the gateway's request
//! messages (`Enroll`, the session's `AgentFrame`s, the bulk transfers' requests), the checks
//! every frame passes and the conversion of event batches into the events the store ingests
//! (`meridian_controller::gateway::wire`). The first byte picks the message; none may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian_controller::gateway::wire::{RequestKind, decode_request};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else { return };
    let kind = match selector % 4 {
        0 => RequestKind::Enroll,
        1 => RequestKind::AppointmentSync,
        2 => RequestKind::FetchRelease,
        _ => RequestKind::AgentFrame,
    };
    let now = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
    let _ = decode_request(kind, bytes, now);
});
