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
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "port_keys::deserialize"
    )]
    pub ports: BTreeMap<u16, MtlsMode>,
}

/// JSON writes the port keys of [`InboundMtls::ports`] as strings (`"8080"`). serde_json
/// reads them back into `u16` itself, but not once the config is inside an internally tagged
/// message (the distribution protocol's `{"type": "snapshot", ...}`), where serde buffers it
/// and hands the key over as a string: accept a string holding a port number, or a number.
mod port_keys {
    use std::collections::BTreeMap;
    use std::fmt;

    use serde::de::{self, Deserializer, MapAccess, Visitor};

    use super::MtlsMode;

    struct Port(u16);

    impl<'de> de::Deserialize<'de> for Port {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Port, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Port;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a port number (0-65535)")
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Port, E> {
                    u16::try_from(v)
                        .map(Port)
                        .map_err(|_| E::custom(format!("{v} is not a port number")))
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Port, E> {
                    u64::try_from(v)
                        .map_err(|_| E::custom(format!("{v} is not a port number")))
                        .and_then(|v| self.visit_u64(v))
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Port, E> {
                    v.parse()
                        .map(Port)
                        .map_err(|_| E::custom(format!("{v:?} is not a port number")))
                }
            }
            d.deserialize_any(V)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<u16, MtlsMode>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BTreeMap<u16, MtlsMode>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of port numbers to modes")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((Port(p), mode)) = map.next_entry::<Port, MtlsMode>()? {
                    out.insert(p, mode);
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
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
