//! Wire types of the agent gateway, generated from `proto/meridian/v1/gateway.proto`.
//!
//! Only the edges (the controller's gateway and the agent's link) use these types; everything
//! else works with the domain types in `meridian-shared`.
#![forbid(unsafe_code)]

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("meridian.v1");
}

pub use v1::*;
