#![forbid(unsafe_code)]
//! `mesh-proxy`: the meshctl data plane.

pub use mesh_config as config;

pub mod access_log;
pub mod admin;
pub mod metrics;
pub mod ratelimit;
pub mod routing;
