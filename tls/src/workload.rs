//! A proxy's own workload certificate: its key is made here and never leaves the process; the
//! certificate comes from the mesh CA (an [`Issuer`]), is renewed at about half of its
//! lifetime, and is swapped in place, so connections that are open keep going and new ones use
//! the new certificate. The trust bundle is swapped the same way when the control plane sends
//! a new one (root rotation); a certificate that no longer chains to the CA's signing root is
//! renewed at once.
//!
//! The rustls configs handed out read the current certificate and bundle on every handshake,
//! so they are built once: one server config, one client config per expected peer identity.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use mesh_wire::certificate::{CertificateRequest, IssuedCertificate};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use tokio::sync::Notify;

use crate::identity::{SpiffeId, not_after_unix};
use crate::verify::{PeerClientVerifier, PeerServerVerifier, TrustBundle};

/// The ALPN protocol a proxy offers when it opens mutual TLS to another proxy. An inbound
/// proxy terminates TLS only when the client offers it, so an app's own TLS passes through.
pub const MESH_ALPN: &[u8] = b"meshctl-mtls/1";

/// File names of file-mounted workload certificates (Istio's `/etc/certs` layout).
pub const FILE_CERT_CHAIN: &str = "cert-chain.pem";
pub const FILE_KEY: &str = "key.pem";
pub const FILE_ROOT_CERT: &str = "root-cert.pem";

/// Renewal retries back off from this...
const RETRY_MIN: Duration = Duration::from_secs(1);
/// ...up to this.
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("making the key pair or CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error("the issued chain does not parse as PEM: {0}")]
    Pem(String),
    #[error("the issued chain is empty")]
    EmptyChain,
    #[error("the issued trust bundle: {0}")]
    Bundle(#[from] crate::verify::BundleError),
    #[error("the issued certificate does not verify against the trust bundle: {0}")]
    Verify(rustls::Error),
    #[error("the issued certificate is for {actual}, the CA said {claimed}")]
    Mismatch { actual: SpiffeId, claimed: String },
    #[error("the issued certificate is not for this proxy's key")]
    WrongKey,
    #[error("{0}")]
    Identity(#[from] crate::identity::IdentityError),
    #[error("loading the key: {0}")]
    Rustls(rustls::Error),
}

/// Where certificates come from (the control plane, over the proxy's authenticated channel).
pub trait Issuer: Send + Sync {
    fn issue(
        &self,
        request: CertificateRequest,
    ) -> Pin<Box<dyn Future<Output = Result<IssuedCertificate, String>> + Send + '_>>;
}

/// A key pair and the CSR made from it, waiting for its certificate.
pub struct PendingKey {
    key: rcgen::KeyPair,
    request: CertificateRequest,
}

impl fmt::Debug for PendingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PendingKey { .. }")
    }
}

impl PendingKey {
    /// A new ECDSA P-256 key pair, in memory only, and a CSR signed by it. The CSR names no
    /// identity: the CA gives the one the proxy's token proves.
    pub fn generate(ttl: Option<Duration>) -> Result<PendingKey, WorkloadError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
        Ok(PendingKey {
            request: CertificateRequest {
                csr_pem: csr.pem()?,
                ttl_seconds: ttl.map(|t| t.as_secs()),
            },
            key,
        })
    }

    pub fn request(&self) -> &CertificateRequest {
        &self.request
    }
}

/// The certificate in use.
struct Current {
    certified: Arc<CertifiedKey>,
    identity: SpiffeId,
    chain_pem: String,
    expires_at_unix: u64,
    /// Fingerprint of the root the chain leads to.
    root_sha256: String,
}

/// What `proxy-status` and `/config_dump` show about the certificate (never the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    pub identity: String,
    pub chain_pem: String,
    pub expires_at_unix: u64,
    pub root_sha256: String,
    pub trust_bundle_sha256: Vec<String>,
}

/// A proxy's workload certificate and trust bundle.
pub struct WorkloadCertificates {
    /// Shared with the configs' resolvers, which may outlive this.
    current: Arc<ArcSwapOption<Current>>,
    trust: Arc<ArcSwap<TrustBundle>>,
    /// The root the CA signs with now, as the control plane last said.
    signing_root: ArcSwap<String>,
    renew_now: Notify,
    ttl: Option<Duration>,
    server: Arc<ServerConfig>,
    clients: Mutex<HashMap<SpiffeId, Arc<ClientConfig>>>,
    /// Counts installed certificates and trust bundles, for whoever reports them.
    installed: tokio::sync::watch::Sender<u64>,
}

impl fmt::Debug for WorkloadCertificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificates")
            .field("identity", &self.identity())
            .finish()
    }
}

impl WorkloadCertificates {
    /// `ttl`: the lifetime to ask for (the CA's default when `None`).
    pub fn new(ttl: Option<Duration>) -> Arc<WorkloadCertificates> {
        {
            let current = Arc::new(ArcSwapOption::empty());
            let trust = Arc::new(ArcSwap::from_pointee(TrustBundle::empty()));
            let mut server = ServerConfig::builder_with_provider(crate::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("the provider supports TLS 1.3")
                .with_client_cert_verifier(Arc::new(PeerClientVerifier {
                    trust: trust.clone(),
                }))
                .with_cert_resolver(Arc::new(Resolver(current.clone())));
            server.alpn_protocols = vec![MESH_ALPN.to_vec()];
            // No resumption: every connection proves both identities with the current
            // certificates (connections are pooled, so handshakes are rare).
            server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            server.send_tls13_tickets = 0;
            Arc::new(WorkloadCertificates {
                current,
                trust,
                signing_root: ArcSwap::from_pointee(String::new()),
                renew_now: Notify::new(),
                ttl,
                server: Arc::new(server),
                clients: Mutex::new(HashMap::new()),
                installed: tokio::sync::watch::Sender::new(0),
            })
        }
    }

    /// Whether mutual TLS can be spoken: a certificate and a trust bundle are in place.
    pub fn is_ready(&self) -> bool {
        self.current.load().is_some() && !self.trust.load().is_empty()
    }

    pub fn identity(&self) -> Option<SpiffeId> {
        self.current.load().as_ref().map(|c| c.identity.clone())
    }

    /// Changes each time a new certificate or trust bundle is put in use.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.installed.subscribe()
    }

    pub fn info(&self) -> Option<CertificateInfo> {
        self.current.load().as_ref().map(|c| CertificateInfo {
            identity: c.identity.to_string(),
            chain_pem: c.chain_pem.clone(),
            expires_at_unix: c.expires_at_unix,
            root_sha256: c.root_sha256.clone(),
            trust_bundle_sha256: self.trust.load().fingerprints(),
        })
    }

    /// The config that terminates mutual TLS from other proxies.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The config that opens mutual TLS to an endpoint that must prove `expected`.
    pub fn client_config(&self, expected: &SpiffeId) -> Arc<ClientConfig> {
        let mut clients = self.clients.lock().expect("client configs lock");
        if let Some(c) = clients.get(expected) {
            return c.clone();
        }
        let mut config = ClientConfig::builder_with_provider(crate::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the provider supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerServerVerifier {
                trust: self.trust.clone(),
                expected: vec![expected.clone()],
            }))
            .with_client_cert_resolver(Arc::new(Resolver(self.current.clone())));
        config.alpn_protocols = vec![MESH_ALPN.to_vec()];
        config.enable_sni = false;
        config.resumption = rustls::client::Resumption::disabled();
        let config = Arc::new(config);
        clients.insert(expected.clone(), config.clone());
        config
    }

    /// A trust bundle from the control plane (with every config). When the CA signs with a
    /// root the current certificate does not chain to, the certificate is renewed at once.
    pub fn set_trust_bundle(
        &self,
        pem: &str,
        signing_root_sha256: &str,
    ) -> Result<(), crate::verify::BundleError> {
        if self.trust.load().pem() != pem {
            let bundle = TrustBundle::from_pem(pem)?;
            tracing::info!(roots = ?bundle.fingerprints(), "trust bundle updated");
            self.trust.store(Arc::new(bundle));
            self.installed.send_modify(|n| *n += 1);
        }
        if !signing_root_sha256.is_empty() && **self.signing_root.load() != signing_root_sha256 {
            self.signing_root
                .store(Arc::new(signing_root_sha256.to_string()));
            if let Some(c) = self.current.load().as_ref()
                && c.root_sha256 != signing_root_sha256
            {
                tracing::info!(
                    signing_root = signing_root_sha256,
                    "the mesh CA signs with a new root: renewing the workload certificate"
                );
                self.renew_now.notify_one();
            }
        }
        Ok(())
    }

    /// Checks an issued certificate and puts it in use.
    pub fn install(
        &self,
        pending: PendingKey,
        issued: &IssuedCertificate,
    ) -> Result<(), WorkloadError> {
        let chain: Vec<CertificateDer<'static>> =
            rustls_pemfile::certs(&mut issued.cert_chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| WorkloadError::Pem(e.to_string()))?;
        let leaf = chain.first().ok_or(WorkloadError::EmptyChain)?;
        // The issued bundle is the newest the CA has; it joins (never shrinks) the current
        // one until the control plane's config says otherwise.
        let bundle = TrustBundle::from_pem(&issued.trust_bundle_pem)?;
        let (identity, root) = bundle
            .verified_path_root(
                leaf,
                &chain[1..],
                UnixTime::now(),
                webpki::KeyUsage::client_auth(),
            )
            .map_err(WorkloadError::Verify)?;
        if identity.to_string() != issued.identity {
            return Err(WorkloadError::Mismatch {
                actual: identity,
                claimed: issued.identity.clone(),
            });
        }
        let expires_at_unix = not_after_unix(leaf)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pending.key.serialize_der()));
        let signing = crate::provider()
            .key_provider
            .load_private_key(key_der)
            .map_err(WorkloadError::Rustls)?;
        let certified = CertifiedKey::new(chain, signing);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(_)) => return Err(WorkloadError::WrongKey),
            // Key types the check cannot compare are accepted (the CA signed our CSR).
            Err(_) => {}
        }
        if self.trust.load().is_empty() {
            self.trust.store(Arc::new(bundle));
        }
        tracing::info!(%identity, expires_at_unix, root = %root, "workload certificate in use");
        self.current.store(Some(Arc::new(Current {
            certified: Arc::new(certified),
            identity,
            chain_pem: issued.cert_chain_pem.clone(),
            expires_at_unix,
            root_sha256: root,
        })));
        self.installed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Puts a certificate from files in use (Istio's file-mounted certificates:
    /// `cert-chain.pem`, `key.pem`, `root-cert.pem`), for proxies that run without a control
    /// plane. Nothing renews it; reload by calling this again.
    pub fn install_files(
        &self,
        chain_pem: &str,
        key_pem: &str,
        bundle_pem: &str,
    ) -> Result<(), WorkloadError> {
        let key = rcgen::KeyPair::from_pem(key_pem)?;
        let identity = {
            let leaf = rustls_pemfile::certs(&mut chain_pem.as_bytes())
                .next()
                .ok_or(WorkloadError::EmptyChain)?
                .map_err(|e| WorkloadError::Pem(e.to_string()))?;
            crate::identity::identity_of(&leaf)?
        };
        let pending = PendingKey {
            key,
            request: CertificateRequest {
                csr_pem: String::new(),
                ttl_seconds: None,
            },
        };
        self.trust
            .store(Arc::new(TrustBundle::from_pem(bundle_pem)?));
        self.install(
            pending,
            &IssuedCertificate {
                identity: identity.to_string(),
                cert_chain_pem: chain_pem.to_string(),
                trust_bundle_pem: bundle_pem.to_string(),
                expires_at_unix: 0,
            },
        )
    }

    /// Reads [`WorkloadCertificates::install_files`]' three files from `dir`.
    pub fn install_dir(&self, dir: &std::path::Path) -> Result<(), String> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))
        };
        self.install_files(
            &read(FILE_CERT_CHAIN)?,
            &read(FILE_KEY)?,
            &read(FILE_ROOT_CERT)?,
        )
        .map_err(|e| format!("{}: {e}", dir.display()))
    }

    /// When to renew: at half of the remaining lifetime (Istio renews at about half), and
    /// at once when the certificate no longer chains to the signing root.
    fn renew_in(&self) -> Duration {
        let Some(c) = self.current.load_full() else {
            return Duration::ZERO;
        };
        let signing = self.signing_root.load();
        if !signing.is_empty() && **signing != c.root_sha256 {
            return Duration::ZERO;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        Duration::from_secs(c.expires_at_unix.saturating_sub(now) / 2)
    }

    /// Obtains a certificate and keeps it fresh, forever. Failures are retried with backoff;
    /// the certificate in use stays until a new one is installed.
    pub async fn run(self: Arc<Self>, issuer: Arc<dyn Issuer>) {
        let mut backoff = RETRY_MIN;
        loop {
            match self.renew_once(issuer.as_ref()).await {
                Ok(()) => {
                    backoff = RETRY_MIN;
                    let wait = self.renew_in();
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.renew_now.notified() => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "workload certificate not obtained");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// One request for a new certificate.
    pub async fn renew_once(&self, issuer: &dyn Issuer) -> Result<(), String> {
        let pending = PendingKey::generate(self.ttl).map_err(|e| e.to_string())?;
        let issued = issuer.issue(pending.request().clone()).await?;
        self.install(pending, &issued).map_err(|e| e.to_string())
    }
}

/// Hands rustls the current certificate at each handshake (server and client side).
struct Resolver(Arc<ArcSwapOption<Current>>);

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl Resolver {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.0.load().as_ref().map(|c| c.certified.clone())
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.current().is_some()
    }
}

/// What the first bytes of an inbound connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientHelloKind {
    /// Not a TLS handshake (plaintext, or another protocol).
    NotTls,
    /// A TLS ClientHello that is not complete yet: read more.
    Incomplete,
    /// A TLS ClientHello from another proxy of the mesh (offers [`MESH_ALPN`]).
    Mesh,
    /// A TLS ClientHello from anything else (the app's own TLS: pass it through).
    OtherTls,
}

/// Classifies peeked bytes without consuming them.
pub fn classify_client_hello(peeked: &[u8]) -> ClientHelloKind {
    // A TLS record: handshake (22), version 3.x.
    match peeked {
        [] => return ClientHelloKind::Incomplete,
        [22] | [22, 3] => return ClientHelloKind::Incomplete,
        [22, 3, ..] => {}
        _ => return ClientHelloKind::NotTls,
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut input = peeked;
    while !input.is_empty() {
        match acceptor.read_tls(&mut input) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return ClientHelloKind::OtherTls,
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            let hello = accepted.client_hello();
            let mesh = hello
                .alpn()
                .map(|mut protocols| protocols.any(|p| p == MESH_ALPN))
                .unwrap_or(false);
            if mesh {
                ClientHelloKind::Mesh
            } else {
                ClientHelloKind::OtherTls
            }
        }
        Ok(None) => ClientHelloKind::Incomplete,
        Err(_) => ClientHelloKind::OtherTls,
    }
}
