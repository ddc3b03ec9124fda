//! The environment's PKI, generated fresh for every environment: one CA that signs the API
//! server's serving certificate and every client certificate, plus the service-account key.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct CertPair {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key (PKCS#8), PEM.
    pub key_pem: String,
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Usage {
    Server,
    Client,
}

/// The CA of one environment.
#[derive(Clone, Debug)]
pub(crate) struct Ca {
    pub(crate) pair: CertPair,
    /// What the CA certificate was made from (the issuer's name and key identifier).
    params: CertificateParams,
}

impl Ca {
    pub(crate) fn generate() -> Result<Ca> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::new(Vec::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "meshctl-testenv-ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        Ok(Ca {
            pair: CertPair {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            },
            params,
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
        let ca_key = KeyPair::from_pem(&self.pair.key_pem).context("reading the CA key")?;
        let issuer = Issuer::from_params(&self.params, ca_key);
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .with_context(|| format!("subject alternative names {sans:?}"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        // rcgen keeps one value per attribute type; one group is all we need.
        if let Some(org) = organizations.first() {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *org);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &issuer)
            .with_context(|| format!("signing the certificate for {common_name}"))?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
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
