//! `mesh-proxy`: the meshctl data plane.

pub use mesh_config as config;

pub mod access_log;
pub mod admin;
pub mod app_health;
pub mod body;
pub mod config_file;
pub mod connection;
mod context;
mod detect;
pub mod distribution;
mod downstream;
pub mod error;
mod fasthash;
mod forward;
mod handler;
pub mod headers;
pub mod metrics;
pub mod mtls;
pub mod normalize;
mod observe;
mod policy;
pub mod ratelimit;
pub mod redirect;
pub mod routing;
mod select;
pub mod server;
pub mod settle;
pub mod sidecar;
mod state;
pub mod subscription;
#[cfg(feature = "testing")]
pub mod testing;
mod upstream;
pub mod workers;

pub use error::ProxyError;
pub use server::{BoundListener, Proxy, ProxyHandle, ProxyOptions, ServeError};
