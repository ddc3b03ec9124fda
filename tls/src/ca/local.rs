//! CAs and serving certificates of the mesh's own endpoints (the webhook, config
//! distribution, the test environment's API server): not workload identities.

use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;

use super::certs::{datetime, unix};
use super::error::CaError;

/// Validity of a generated certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// A CA for the mesh's own endpoints (not workload identities): signs serving and client
/// certificates with DNS and IP SANs.
pub struct LocalCa {
    /// Visible to the CA's tests, which sign intermediates with it.
    pub(super) issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct KeyedCertificate {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
}

/// A leaf to issue.
#[derive(Debug, Clone, Copy)]
pub struct LeafSpec<'a> {
    pub common_name: &'a str,
    /// One `O=` (a Kubernetes group for client certificates).
    pub organization: Option<&'a str>,
    /// DNS names or IP addresses.
    pub sans: &'a [String],
    pub usage: Usage,
    /// `None`: rcgen's default (1975 to 4096).
    pub validity: Option<Validity>,
}

fn set_validity(params: &mut CertificateParams, validity: Option<Validity>) {
    if let Some(v) = validity {
        params.not_before = datetime(unix(v.not_before));
        params.not_after = datetime(unix(v.not_after));
    }
}

impl LocalCa {
    /// A new CA named `common_name`; `path_len` limits the CAs below it (`Some(0)`: it signs
    /// leaves only), `None` does not.
    pub fn generate(
        common_name: &str,
        path_len: Option<u8>,
        validity: Option<Validity>,
    ) -> Result<LocalCa, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(match path_len {
            Some(n) => BasicConstraints::Constrained(n),
            None => BasicConstraints::Unconstrained,
        });
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, validity);
        let cert = params.self_signed(&key)?;
        Ok(LocalCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA's private key, PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a leaf with a new key.
    pub fn issue(&self, leaf: &LeafSpec<'_>) -> Result<KeyedCertificate, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(leaf.sans.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, leaf.common_name);
        if let Some(org) = leaf.organization {
            params
                .distinguished_name
                .push(DnType::OrganizationName, org);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![match leaf.usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, leaf.validity);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(KeyedCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
        })
    }
}

/// A CA and one serving certificate signed by it.
#[derive(Clone)]
pub struct ServingCertificate {
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
}

/// What [`serving_certificate`] makes.
#[derive(Debug, Clone, Copy)]
pub struct ServingSpec<'a> {
    /// The CA's common name.
    pub ca_name: &'a str,
    /// See [`LocalCa::generate`].
    pub ca_path_len: Option<u8>,
    /// The serving certificate's common name.
    pub common_name: &'a str,
    /// DNS names or IP addresses it serves.
    pub sans: &'a [String],
    /// Both certificates'; `None`: rcgen's default (1975 to 4096).
    pub validity: Option<Validity>,
}

/// A fresh CA and a serving certificate (serverAuth) for `spec.sans`, signed by it: what the
/// webhook, config distribution and test servers present, and the CA their clients trust.
pub fn serving_certificate(spec: &ServingSpec<'_>) -> Result<ServingCertificate, CaError> {
    let ca = LocalCa::generate(spec.ca_name, spec.ca_path_len, spec.validity)?;
    let leaf = ca.issue(&LeafSpec {
        common_name: spec.common_name,
        organization: None,
        sans: spec.sans,
        usage: Usage::Server,
        validity: spec.validity,
    })?;
    Ok(ServingCertificate {
        ca_pem: ca.cert_pem.clone(),
        ca_der: ca.cert_der.clone(),
        cert_pem: leaf.cert_pem,
        key_pem: leaf.key_pem,
    })
}
