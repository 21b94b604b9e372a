//! Domain types shared by the controller and the agent: ids, the configuration model and its
//! validation, customer fields of a visit, appointments as synced to agents, agent events, controller commands, business-day arithmetic and the reconnect
//! backoff policy. Nothing here does I/O, except loading settings, creating private files
//! (`private_files`) and the HTTP edge both servers share (`http_guard`).
#![forbid(unsafe_code)]

pub mod appointments;
pub mod backoff;
pub mod business_day;
pub mod check_in;
pub mod clock;
pub mod closures;
pub mod commands;
pub mod config;
pub mod customer;
pub mod error;
pub mod events;
pub mod http_guard;
pub mod ids;
pub mod lineage;
pub mod mappings;
pub mod private_files;
pub mod releases;
pub mod requests;
pub mod rules;
pub mod settings;
pub mod shutdown;
pub mod transfers;
pub mod visits;

pub use error::{ValidationError, ValidationErrors};
pub use ids::{AgentId, AppointmentId, Code, SiteCode, VisitId};

/// The product version, reported by both binaries and in the session Hello.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
