//! An [`Issuer`] that signs with a CA in the same process, for one fixed identity: what the
//! control plane does for the identity a token proves, for `meshctl demo` and tests that run
//! proxies without a control plane.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_wire::certificate::{CertificateRequest, IssuedCertificate};

use crate::ca::CertificateAuthority;
use crate::workload::Issuer;

pub struct InProcessIssuer {
    ca: Arc<Mutex<CertificateAuthority>>,
    identity: String,
    ttl: Duration,
}

impl InProcessIssuer {
    /// Issues `identity` (a SPIFFE ID) from `ca`, valid `ttl` unless the request asks less.
    pub fn new(
        ca: Arc<Mutex<CertificateAuthority>>,
        identity: impl Into<String>,
        ttl: Duration,
    ) -> InProcessIssuer {
        InProcessIssuer {
            ca,
            identity: identity.into(),
            ttl,
        }
    }
}

impl Issuer for InProcessIssuer {
    fn issue(
        &self,
        request: CertificateRequest,
    ) -> Pin<Box<dyn Future<Output = Result<IssuedCertificate, String>> + Send + '_>> {
        let ttl = request
            .ttl_seconds
            .map_or(self.ttl, |s| self.ttl.min(Duration::from_secs(s)));
        let issued = self
            .ca
            .lock()
            .expect("CA lock")
            .sign_workload(&request.csr_pem, &self.identity, ttl)
            .map_err(|e| e.to_string());
        Box::pin(std::future::ready(issued))
    }
}
