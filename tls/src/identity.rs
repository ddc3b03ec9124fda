//! Workload identities: a service account as a SPIFFE ID,
//! `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`, as Istio names them, and
//! what a certificate says about its holder.

use std::fmt;
use std::str::FromStr;

use mesh_config::identity::{SpiffeIdError, SpiffeIdParts, parse_spiffe_id};
use rustls::pki_types::CertificateDer;

/// One workload identity. Its shape (what it prints as, what parses) is
/// `mesh_config::identity`'s, the one every part of the mesh checks identities with.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Malformed(#[from] SpiffeIdError),
    #[error("the certificate does not parse: {0}")]
    Certificate(String),
    #[error("the certificate carries no SPIFFE ID (URI SAN)")]
    NoIdentity,
    #[error("the certificate carries {0} SPIFFE IDs; a workload certificate has exactly one")]
    SeveralIdentities(usize),
}

impl SpiffeId {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// The identity's parts, borrowed.
    pub fn parts(&self) -> SpiffeIdParts<'_> {
        SpiffeIdParts::new(&self.trust_domain, &self.namespace, &self.service_account)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.parts().fmt(f)
    }
}

impl From<SpiffeIdParts<'_>> for SpiffeId {
    fn from(p: SpiffeIdParts<'_>) -> SpiffeId {
        SpiffeId::new(p.trust_domain, p.namespace, p.service_account)
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<SpiffeId, IdentityError> {
        Ok(parse_spiffe_id(s)?.into())
    }
}

/// The URI SANs of a certificate that are SPIFFE IDs (as written).
pub fn spiffe_uris(cert: &CertificateDer<'_>) -> Result<Vec<String>, IdentityError> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| IdentityError::Certificate(e.to_string()))?;
    let mut out = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && uri.starts_with("spiffe://")
            {
                out.push(uri.to_string());
            }
        }
    }
    Ok(out)
}

/// The one SPIFFE ID a workload certificate carries.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
    let uris = spiffe_uris(cert)?;
    match uris.as_slice() {
        [] => Err(IdentityError::NoIdentity),
        [one] => one.parse(),
        many => Err(IdentityError::SeveralIdentities(many.len())),
    }
}

/// `notAfter` of a certificate, seconds since the Unix epoch.
pub fn not_after_unix(cert: &CertificateDer<'_>) -> Result<u64, IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| IdentityError::Certificate(e.to_string()))?;
    Ok(parsed.validity().not_after.timestamp().max(0) as u64)
}

/// Lowercase hex SHA-256 of a certificate's DER (Envoy's and Istio's certificate hash).
pub fn sha256_hex(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let mut out = String::with_capacity(64);
    for b in digest.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The `X-Forwarded-Client-Cert` value Envoy sets for Istio's sidecars
/// (`forward_client_cert_details: APPEND_FORWARD`, `set_current_client_cert_details: {subject,
/// uri}`): who received the connection, the hash of the client's certificate, its subject
/// (empty for workload certificates) and its SPIFFE ID.
pub fn xfcc_element(by: &SpiffeId, peer_cert: &CertificateDer<'_>, peer: &SpiffeId) -> String {
    format!(
        "By={by};Hash={};Subject=\"\";URI={peer}",
        sha256_hex(peer_cert.as_ref())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_and_print_the_same() {
        let id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "demo", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/web");
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in [
            "",
            "spiffe://",
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/ns/a.b/sa/c",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn a_certificate_tells_its_identity_and_expiry() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://example.org/ns/shop/sa/cart".try_into().unwrap(),
        )];
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der().clone();
        assert_eq!(
            identity_of(&der).unwrap(),
            SpiffeId::new("example.org", "shop", "cart")
        );
        assert!(not_after_unix(&der).unwrap() > 1_700_000_000);
        let by = SpiffeId::new("example.org", "shop", "api");
        let x = xfcc_element(&by, &der, &identity_of(&der).unwrap());
        assert!(
            x.starts_with("By=spiffe://example.org/ns/shop/sa/api;Hash="),
            "{x}"
        );
        assert!(
            x.ends_with(";Subject=\"\";URI=spiffe://example.org/ns/shop/sa/cart"),
            "{x}"
        );
        assert_eq!(sha256_hex(b"abc").len(), 64);
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_certificate_without_or_with_two_identities_has_none() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let none = rcgen::CertificateParams::new(vec!["a.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(
            identity_of(none.der()),
            Err(IdentityError::NoIdentity),
            "DNS-only certificate"
        );
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![
            rcgen::SanType::URI("spiffe://td/ns/a/sa/x".try_into().unwrap()),
            rcgen::SanType::URI("spiffe://td/ns/a/sa/y".try_into().unwrap()),
        ];
        let two = params.self_signed(&key).unwrap();
        assert_eq!(
            identity_of(two.der()),
            Err(IdentityError::SeveralIdentities(2))
        );
    }
}
