//! The Meridian controller: configuration, enrollment, the agent gateway and the admin API.
//! The binaries (`meridian-controller`, `meridianctl`) only parse flags and call into here.
#![forbid(unsafe_code)]

pub mod api;
pub mod appointments;
pub mod auth;
pub mod clock_skew;
pub mod config_admin;
pub mod console;
pub mod ctl;
pub mod distribution;
pub mod error;
pub mod gateway;
pub mod metrics;
pub mod rollouts;
pub mod server;
pub mod settings;
pub mod stats;
pub mod store;
pub mod testing;
pub mod wake;

pub use error::{Error, Result};
pub use settings::Settings;
