//! Mutual TLS between meshed workloads: which peers a proxy reaches over mTLS and with which
//! identity, and what its inbound side accepts (Istio's PeerAuthentication, resolved by the
//! translator to one mode per port).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a sidecar's inbound side accepts on a port.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Mutual TLS from meshed peers and plaintext from anyone else, told apart by the first
    /// bytes of the connection (Istio's default).
    #[default]
    Permissive,
    /// Mutual TLS only: a plaintext connection is closed.
    Strict,
    /// Plaintext only: the proxy does not terminate TLS (an app's own TLS passes through).
    Disable,
}

/// A sidecar inbound listener's mutual TLS settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundMtls {
    /// The mode of every port not in [`InboundMtls::ports`].
    #[serde(default)]
    pub mode: MtlsMode,
    /// Per-port modes (the app's port, as the captured connection's original port).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<u16, MtlsMode>,
}

impl InboundMtls {
    pub fn is_default(&self) -> bool {
        *self == InboundMtls::default()
    }

    /// The mode that applies to a connection for the app's `port`.
    pub fn mode_for(&self, port: u16) -> MtlsMode {
        self.ports.get(&port).copied().unwrap_or(self.mode)
    }
}

/// The roots a proxy trusts for its peers, pushed with every config so a new root reaches
/// every proxy at once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshIdentity {
    /// PEM certificates: every root a workload must accept now (more than one while the root
    /// rotates).
    pub trust_bundle_pem: String,
    /// Lowercase hex SHA-256 of the DER of the root that signs new workload certificates. A
    /// proxy whose certificate chains to another root asks for a new one at once.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signing_root_sha256: String,
}

/// Whether `id` has the shape of a workload identity this mesh issues:
/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
pub fn is_spiffe_id(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return false;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    matches!(parts.as_slice(), [td, "ns", ns, "sa", sa]
        if !td.is_empty() && !ns.is_empty() && !sa.is_empty())
}
