//! Peer verification between workloads: a certificate chain must lead to one of the mesh's
//! current roots (the trust bundle) and carry exactly one SPIFFE ID; a client also checks that
//! the server's ID is one it expects for the endpoint it dialed. No DNS names are involved, so
//! the chain is validated with webpki directly, with the workspace provider's algorithms.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{SpiffeId, identity_of, sha256_hex};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("the trust bundle does not parse as PEM: {0}")]
    Pem(String),
    #[error("the trust bundle holds no CERTIFICATE block")]
    Empty,
    #[error("root {index} of the trust bundle is not a usable trust anchor: {reason}")]
    Anchor { index: usize, reason: String },
}

/// The roots a workload accepts for its peers right now (more than one while the root rotates).
pub struct TrustBundle {
    pem: String,
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.fingerprints())
            .finish()
    }
}

impl TrustBundle {
    /// A bundle that trusts nothing (a proxy before it has heard from the control plane).
    pub fn empty() -> TrustBundle {
        TrustBundle {
            pem: String::new(),
            roots: Vec::new(),
            anchors: Vec::new(),
        }
    }

    pub fn from_pem(pem: &str) -> Result<TrustBundle, BundleError> {
        let roots: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| BundleError::Pem(e.to_string()))?;
        if roots.is_empty() {
            return Err(BundleError::Empty);
        }
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| BundleError::Anchor {
                        index,
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(TrustBundle {
            pem: pem.to_string(),
            roots,
            anchors,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// SHA-256 (lowercase hex) of each root's DER, in bundle order.
    pub fn fingerprints(&self) -> Vec<String> {
        self.roots.iter().map(|r| sha256_hex(r.as_ref())).collect()
    }

    /// Validates `end_entity` (with `intermediates`) up to one of the roots, for `usage`, and
    /// returns the one SPIFFE ID it carries.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        self.verified_path_root(end_entity, intermediates, now, usage)
            .map(|(id, _)| id)
    }

    /// Like [`TrustBundle::verify`], and also which root (its fingerprint) the chain led to.
    pub fn verified_path_root(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(SpiffeId, String), rustls::Error> {
        if self.anchors.is_empty() {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ));
        }
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        let algs = crate::provider().signature_verification_algorithms;
        let path = cert
            .verify_for_usage(
                algs.all,
                &self.anchors,
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map_err(webpki_error)?;
        let anchor = path.anchor();
        let root = self
            .anchors
            .iter()
            .position(|a| a.subject_public_key_info == anchor.subject_public_key_info)
            .map(|i| sha256_hex(self.roots[i].as_ref()))
            .unwrap_or_default();
        let id = identity_of(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        Ok((id, root))
    }
}

fn webpki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        E::CertRevoked => CertificateError::Revoked,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(ce)
}

/// The error a client reports when the server proved an identity it did not expect.
#[derive(Debug, thiserror::Error)]
#[error("the peer is {actual}, expected {expected}")]
pub struct UnexpectedIdentity {
    pub actual: SpiffeId,
    pub expected: String,
}

/// Client side: the server must chain to the bundle and be one of `expected`.
pub(crate) struct PeerServerVerifier {
    pub trust: Arc<ArcSwap<TrustBundle>>,
    pub expected: Vec<SpiffeId>,
}

impl fmt::Debug for PeerServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerServerVerifier")
            .field("expected", &self.expected)
            .finish()
    }
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self.trust.load().verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if self.expected.contains(&id) {
            Ok(ServerCertVerified::assertion())
        } else {
            let expected = self
                .expected
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(" or ");
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(UnexpectedIdentity {
                    actual: id,
                    expected,
                })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        supported_schemes()
    }
}

/// Server side: a client must present a certificate that chains to the bundle and carries one
/// SPIFFE ID. Who it is, is for policy to decide after the handshake.
pub(crate) struct PeerClientVerifier {
    pub trust: Arc<ArcSwap<TrustBundle>>,
}

impl fmt::Debug for PeerClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PeerClientVerifier")
    }
}

impl ClientCertVerifier for PeerClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.trust.load().verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        supported_schemes()
    }
}

/// Mesh connections are TLS 1.3 only.
fn no_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

/// A TLS 1.3 handshake signature, checked with the workspace provider's algorithms.
fn tls13_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &crate::provider().signature_verification_algorithms,
    )
}

fn supported_schemes() -> Vec<SignatureScheme> {
    crate::provider()
        .signature_verification_algorithms
        .supported_schemes()
}
