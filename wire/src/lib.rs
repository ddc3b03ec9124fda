//! The contract between the control plane (`meshctl`) and the proxy (`mesh-proxy`): what both
//! sides must agree on, in one place, so neither has to depend on the other to speak to it.
//!
//! - [`app_probe`]: the app probes the injector rewrites to the proxy's app-health port, as
//!   the proxy container's environment carries them.
//! - [`certificate`]: workload certificate issuance (CSR in, chain and trust bundle out).
//! - [`distribution`]: the config distribution protocol's messages and framing (the proxy's
//!   client lives in `mesh-proxy`, the server in `meshctl`'s control plane).
//! - [`redirect`]: the nat rules spec the injector writes into a pod's `mesh-init` command line
//!   and `mesh-proxy redirect` applies.
//! - [`ports`] and [`names`]: the well-known port numbers, ids, labels, annotations, container
//!   names and environment variables written into pods and read back by the proxy.
//!
//! Pure data and functions: no I/O, no runtime, no Kubernetes types.

pub mod app_probe;
pub mod certificate;
pub mod distribution;
pub mod names;
pub mod ports;
pub mod redirect;
