//! The installer: profiles and overlay, typed values, manifest rendering, and the cluster
//! side (server-side apply, prune, readiness, verify, uninstall).

pub mod certs;
pub mod cluster;
pub mod crds;
pub mod overlay;
pub mod profile;
pub mod render;
pub mod values;

#[cfg(test)]
mod tests;
