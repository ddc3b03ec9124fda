//! Workload certificate issuance: how a proxy gets the certificate of its identity from the
//! mesh CA in the control plane (port [`DISTRIBUTION`](crate::ports::DISTRIBUTION), the same
//! TLS server and the same service-account token as the config stream).
//!
//! - The proxy makes its key pair in memory (it never leaves the proxy) and sends
//!   `POST` [`CERTIFICATE_PATH`] with `authorization: Bearer <token>` and a JSON
//!   [`CertificateRequest`] body holding a PEM PKCS#10 CSR.
//! - The control plane reviews the token (TokenReview), derives the only identity it proves
//!   (`spiffe://<trust domain>/ns/<namespace>/sa/<service account>`), refuses a CSR that asks
//!   for any other identity, and answers a JSON [`IssuedCertificate`]: the chain (leaf first)
//!   carrying only that identity as a URI SAN, and the trust bundle (every root a workload must
//!   accept right now; more than one while the root rotates).
//! - Refusals: `401` (no or bad token), `403` (the CSR asks for another identity), `400`
//!   (the body or the CSR does not parse, or the CSR's signature does not verify), with the
//!   reason as a text body. Also `413` (a body over [`MAX_REQUEST_BYTES`]), `408` (a body
//!   that does not arrive within 10 s) and `503` (the token cannot be checked now, or the CA
//!   cannot issue): worth retrying later, unlike the others.
//! - The lifetime: [`CertificateRequest::ttl_seconds`], or the control plane's default
//!   (24 h), capped at its maximum (48 h by default) and at the CA's own expiry; at least a
//!   minute.
//!
//! The proxy renews at about half of the lifetime; the trust bundle also reaches a proxy in
//! every config snapshot, so root rotation does not wait for a renewal.

use serde::{Deserialize, Serialize};

/// The request path on the config distribution server.
pub const CERTIFICATE_PATH: &str = "/meshctl.certificate.v1/issue";
/// Largest request body the control plane reads (a CSR is about 500 bytes).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Proxy → control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateRequest {
    /// PEM `CERTIFICATE REQUEST` (PKCS#10), signed by the proxy's new key.
    pub csr_pem: String,
    /// Lifetime the proxy asks for, in seconds; the control plane caps it at its own maximum
    /// and uses its default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// Control plane → proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssuedCertificate {
    /// The SPIFFE ID the certificate carries.
    pub identity: String,
    /// PEM chain: the workload certificate first, then any intermediates up to (not
    /// including) the root.
    pub cert_chain_pem: String,
    /// PEM roots every workload must trust now.
    pub trust_bundle_pem: String,
    /// The certificate's `notAfter`, seconds since the Unix epoch.
    pub expires_at_unix: u64,
}
