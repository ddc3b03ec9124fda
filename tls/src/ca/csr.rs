//! Certificate signing requests: read, and their signature verified, before the mesh CA
//! looks at what they ask for.

use rcgen::SubjectPublicKeyInfo;
use rustls::pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use super::error::CaError;

/// A CSR that was read and whose signature verified.
pub struct VerifiedCsr {
    /// The key the certificate is issued for.
    pub(super) public_key: SubjectPublicKeyInfo,
    /// The URI SANs it asks for.
    pub uris: Vec<String>,
    /// A `spiffe://` subject common name, if it has one.
    pub spiffe_common_name: Option<String>,
}

impl VerifiedCsr {
    /// Reads a PEM PKCS#10 CSR and verifies its signature.
    pub fn parse(csr_pem: &str) -> Result<VerifiedCsr, CaError> {
        let der =
            rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
                .map_err(|e| CaError::BadCsr(format!("no PEM CERTIFICATE REQUEST: {e}")))?;
        let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CaError::BadCsr("trailing bytes after the request".into()));
        }
        csr.verify_signature().map_err(|_| CaError::CsrSignature)?;
        let info = &csr.certification_request_info;
        let public_key = SubjectPublicKeyInfo::from_der(info.subject_pki.raw)
            .map_err(|e| CaError::BadCsr(format!("its public key is not one we sign: {e}")))?;
        let mut uris = Vec::new();
        if let Some(exts) = csr.requested_extensions() {
            for ext in exts {
                if let ParsedExtension::SubjectAlternativeName(san) = ext {
                    for n in &san.general_names {
                        if let GeneralName::URI(u) = n {
                            uris.push((*u).to_string());
                        }
                    }
                }
            }
        }
        let spiffe_common_name = info
            .subject
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .find(|cn| cn.starts_with("spiffe://"))
            .map(str::to_string);
        Ok(VerifiedCsr {
            public_key,
            uris,
            spiffe_common_name,
        })
    }

    /// Every identity the CSR names (URI SANs and a `spiffe://` common name).
    pub fn named_identities(&self) -> impl Iterator<Item = &str> {
        self.uris
            .iter()
            .map(String::as_str)
            .chain(self.spiffe_common_name.as_deref())
    }
}
