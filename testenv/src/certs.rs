//! The environment's PKI, generated fresh for every environment: one CA that signs the API
//! server's serving certificate and every client certificate, plus the service-account key.

use std::sync::Arc;

use anyhow::{Context, Result};
use mesh_tls::ca::{LeafSpec, LocalCa};
use rcgen::KeyPair;

pub(crate) use mesh_tls::ca::Usage;

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct CertPair {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key (PKCS#8), PEM.
    pub key_pem: String,
}

/// The CA of one environment.
#[derive(Clone)]
pub(crate) struct Ca {
    pub(crate) pair: CertPair,
    ca: Arc<LocalCa>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.pair.cert_pem)
            .finish_non_exhaustive()
    }
}

impl Ca {
    pub(crate) fn generate() -> Result<Ca> {
        let ca =
            LocalCa::generate("meshctl-testenv-ca", None, None).context("generating the CA")?;
        Ok(Ca {
            pair: CertPair {
                cert_pem: ca.cert_pem().to_string(),
                key_pem: ca.key_pem(),
            },
            ca: Arc::new(ca),
        })
    }

    /// Issues a leaf certificate. `sans` are DNS names or IP addresses; for client
    /// certificates `common_name` is the Kubernetes user and `organizations` its groups.
    pub(crate) fn issue(
        &self,
        common_name: &str,
        organizations: &[&str],
        sans: &[&str],
        usage: Usage,
    ) -> Result<CertPair> {
        anyhow::ensure!(
            organizations.len() <= 1,
            "at most one organization (group) per certificate is supported"
        );
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let leaf = self
            .ca
            .issue(&LeafSpec {
                common_name,
                // rcgen keeps one value per attribute type; one group is all we need.
                organization: organizations.first().copied(),
                sans: &sans,
                usage,
                validity: None,
            })
            .with_context(|| format!("signing the certificate for {common_name} ({sans:?})"))?;
        Ok(CertPair {
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
        })
    }
}

/// The service-account token signing key: (private key PEM, public key PEM).
pub(crate) fn service_account_key() -> Result<(String, String)> {
    let key = KeyPair::generate().context("generating the service-account key")?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_server_and_client_certs() {
        let ca = Ca::generate().unwrap();
        assert!(ca.pair.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let server = ca
            .issue(
                "kube-apiserver",
                &[],
                &["localhost", "127.0.0.1"],
                Usage::Server,
            )
            .unwrap();
        assert!(server.key_pem.contains("PRIVATE KEY"));
        let client = ca
            .issue("admin", &["system:masters"], &[], Usage::Client)
            .unwrap();
        assert_ne!(client.cert_pem, server.cert_pem);
        assert!(
            ca.issue("x", &["a", "b"], &[], Usage::Client).is_err(),
            "two groups are refused rather than silently dropped"
        );
    }
}
