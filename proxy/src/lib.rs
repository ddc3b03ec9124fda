//! `mesh-proxy`: the meshctl data plane.

pub use mesh_config as config;

pub mod access_log;
pub mod admin;
pub mod app_health;
pub mod body;
pub mod config_file;
pub mod connection;
pub mod distribution;
pub mod error;
mod fasthash;
mod handler;
pub mod headers;
pub mod metrics;
pub mod mtls;
pub mod normalize;
mod observe;
pub mod ratelimit;
pub mod redirect;
pub mod routing;
pub mod server;
pub mod settle;
pub mod sidecar;
pub mod subscription;
#[cfg(feature = "testing")]
pub mod testing;
mod upstream;
pub mod workers;

pub use error::ProxyError;
pub use server::{BoundListener, Proxy, ProxyHandle, ProxyOptions, ServeError};
