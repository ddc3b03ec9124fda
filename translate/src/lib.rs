//! Kubernetes objects → mesh-proxy's native config ([`mesh_config::ProxyConfig`]).
//!
//! Two steps, kept apart so the control plane can feed objects from watches:
//!
//! 1. [`load`] reads files and directories (multi-document YAML, JSON, `List` kinds) into
//!    typed [`Resources`], rejecting unknown and unsupported fields with the file, the
//!    document and the field path ([`LoadError`]).
//! 2. [`translate`] turns [`Resources`] into a [`Translation`]: the proxy config (routes
//!    ordered by the Gateway API precedence, since the proxy walks them first-match-wins),
//!    warnings about what was not (fully) applied, and the Gateway API status conditions the
//!    control plane writes back. Pure: no I/O.
//!
//! See `README.md` for what is supported, rejected or warned about.

use std::fmt;

mod hostname;
pub mod identity;
pub mod istio;
mod load;
pub mod peer_authentication;
pub mod policy;
mod precedence;
mod resources;
pub mod sidecar;
pub mod status;
mod translate;
mod typed;
mod validate;
pub mod yaml;

pub use hostname::{intersect as intersect_hostnames, matches as hostname_matches};
pub use identity::MeshedPod;
pub use istio::{EnvoyFilter, IstioOperator};
pub use load::{LoadError, LoadOptions, LoadProblem, Loaded, load, load_str};
pub use peer_authentication::PeerAuthentication;
pub use policy::RateLimitPolicy;
pub use precedence::PrecedenceKey;
pub use resources::{Resources, pod_key};
pub use sidecar::{SidecarKey, SidecarOptions, sidecar_key, translate_sidecar};
pub use translate::{TranslateOptions, Translation, translate};
pub use yaml::{YamlDocument, YamlError, split_yaml_stream};

/// Something the user should see: an object ignored, a field without effect, a reference that
/// does not resolve, how an Istio construct was emulated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// What it is about: `HTTPRoute demo/myapp-route`, or `file.yaml: document 2 (...)`.
    pub context: String,
    pub message: String,
}

impl Warning {
    pub fn new(context: impl Into<String>, message: impl Into<String>) -> Self {
        Warning {
            context: context.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context, self.message)
    }
}

/// A problem with one field of an object: its path (`spec.rules[0].backendRefs[1].weight`)
/// and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    pub path: String,
    pub message: String,
}

impl FieldProblem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldProblem {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}
