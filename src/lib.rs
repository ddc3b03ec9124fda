//! meshctl library: the injection core, the admission webhook and YAML helpers.

pub mod controlplane;
pub mod demo;
pub mod gateway_pod;
pub mod inject;
pub mod install;
pub mod kube_yaml;
pub mod net_limits;
pub mod offline;
pub mod webhook;
