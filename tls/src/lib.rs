//! Every TLS and crypto decision of the mesh, owned in one place:
//!
//! - the crypto provider (aws-lc-rs, for the hybrid post-quantum key exchange X25519MLKEM768,
//!   preferred over X25519), installed by every `main` with [`install_default`];
//! - workload identities (SPIFFE IDs) and what a certificate says ([`identity`]);
//! - peer verification against the mesh's trust bundle ([`verify`]);
//! - a proxy's own workload certificate, renewed and rotated in place, and the mutual TLS
//!   configs built on it ([`workload`]).

#![forbid(unsafe_code)]

use std::sync::{Arc, LazyLock};

pub use rustls;

pub mod ca;
pub mod identity;
pub mod issuer;
pub mod verify;
pub mod workload;

pub use identity::{DEFAULT_TRUST_DOMAIN, SpiffeId};
pub use verify::TrustBundle;
pub use workload::{
    ClientHelloKind, Issuer, MESH_ALPN, PendingKey, WorkloadCertificates, classify_client_hello,
};

static PROVIDER: LazyLock<Arc<rustls::crypto::CryptoProvider>> =
    LazyLock::new(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));

/// The one crypto provider of the workspace. Its key exchange groups, in order of
/// preference: X25519MLKEM768 (hybrid post-quantum), X25519, P-256, P-384.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    PROVIDER.clone()
}

/// Installs [`provider`] as the process default (for libraries that build their own configs,
/// such as the Kubernetes client). Every `main` calls it first; calling it again is harmless.
pub fn install_default() {
    let _ = rustls::crypto::CryptoProvider::install_default((*provider()).clone());
}

/// Signing key for a PEM private key, with the workspace's provider.
pub fn signing_key(
    key: &rustls::pki_types::PrivateKeyDer<'_>,
) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
    provider().key_provider.load_private_key(key.clone_key())
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefers_the_hybrid_post_quantum_group() {
        let names: Vec<_> = super::provider()
            .kx_groups
            .iter()
            .map(|g| g.name())
            .collect();
        assert_eq!(names[0], rustls::NamedGroup::X25519MLKEM768, "{names:?}");
        assert!(names.contains(&rustls::NamedGroup::X25519), "{names:?}");
    }
}
