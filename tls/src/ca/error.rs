//! What the mesh CA's work can fail with.

use mesh_config::identity::SpiffeIdError;

/// What went wrong; each message names the file or the part of the request at fault.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// CA material (a file, or a key of a Secret) that cannot be used.
    #[error("{origin}: {reason}")]
    Material { origin: String, reason: String },
    /// The CSR is not a PEM PKCS#10 request we can read.
    #[error("the certificate signing request does not parse: {0}")]
    BadCsr(String),
    /// The CSR's signature does not verify with the key it carries.
    #[error(
        "the certificate signing request's signature does not verify (it was altered, or not \
         signed by the key it carries)"
    )]
    CsrSignature,
    /// The CSR asks for an identity the caller does not have.
    #[error("the certificate signing request asks for {requested}, but the caller is {identity}")]
    OtherIdentity { requested: String, identity: String },
    /// Not `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`, saying which part
    /// is wrong.
    #[error(transparent)]
    BadIdentity(#[from] SpiffeIdError),
    /// The CA cannot issue now (for example, it has expired).
    #[error("the mesh CA cannot issue: {0}")]
    Unavailable(String),
    /// Making or signing a certificate failed.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

impl CaError {
    /// Whether the request was at fault (a bad CSR, another identity) rather than the CA.
    pub fn is_bad_request(&self) -> bool {
        matches!(self, CaError::BadCsr(_) | CaError::CsrSignature)
    }
}

pub(super) fn material(origin: impl Into<String>, reason: impl Into<String>) -> CaError {
    CaError::Material {
        origin: origin.into(),
        reason: reason.into(),
    }
}
