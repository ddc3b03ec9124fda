//! Every certificate authority of the mesh, in one place.
//!
//! - [`CertificateAuthority`]: the mesh CA that gives workloads their SPIFFE identity. It is a
//!   self-signed root made here ([`CertificateAuthority::generate_root`]) or a CA the user
//!   plugs in, read in Istio's plug-in layout as it is ([`PluginFiles`]: `ca-cert.pem` and
//!   `ca-key.pem` sign, `cert-chain.pem` is the chain from `ca-cert.pem` up, `root-cert.pem`
//!   the roots). It signs workload certificates from CSRs
//!   ([`CertificateAuthority::sign_workload`]) and holds the trust bundle: every root a
//!   workload must accept now, more than one while the root rotates
//!   ([`CertificateAuthority::add_root`], [`CertificateAuthority::rotate_to`]).
//! - [`LocalCa`] and [`serving_certificate`]: a small CA and the serving (or client)
//!   certificates of the mesh's own endpoints (the webhook, config distribution, the test
//!   environment's API server), so every generated certificate is made the same way.
//!
//! Certificates carry wall-clock times, so these functions read the system clock (or take
//! `now`), not tokio's monotonic one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_wire::certificate::IssuedCertificate;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

/// File (and Secret key) names of Istio's plug-in CA layout.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// Lifetime of a root made by [`CertificateAuthority::generate_root`].
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far back a workload certificate's `notBefore` is put, so a peer whose clock is a
/// little behind the control plane's still accepts it.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// How far back a generated root's `notBefore` is put (nodes whose clocks lag the control
/// plane's must accept every chain through it from its first minute).
const ROOT_BACKDATE: Duration = Duration::from_secs(3600);

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
    /// Not `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    #[error(
        "{0:?} is not a workload identity (spiffe://<trust domain>/ns/<namespace>/sa/<service account>)"
    )]
    BadIdentity(String),
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

fn material(origin: impl Into<String>, reason: impl Into<String>) -> CaError {
    CaError::Material {
        origin: origin.into(),
        reason: reason.into(),
    }
}

/// The four PEM texts of Istio's plug-in CA layout.
#[derive(Clone, PartialEq, Eq)]
pub struct PluginFiles {
    /// `ca-cert.pem`: the certificate that signs workload certificates.
    pub ca_cert: String,
    /// `ca-key.pem`: its private key.
    pub ca_key: String,
    /// `cert-chain.pem`: the chain from `ca-cert.pem` up (may be empty when `ca-cert.pem` is
    /// the root itself).
    pub cert_chain: String,
    /// `root-cert.pem`: the roots workloads trust.
    pub root_cert: String,
}

impl std::fmt::Debug for PluginFiles {
    // Never the private key in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginFiles")
            .field("ca_cert", &self.ca_cert)
            .field("ca_key", &"(hidden)")
            .field("cert_chain", &self.cert_chain)
            .field("root_cert", &self.root_cert)
            .finish()
    }
}

impl PluginFiles {
    /// Reads `dir/{ca-cert.pem,ca-key.pem,cert-chain.pem,root-cert.pem}`; `cert-chain.pem` may
    /// be absent.
    pub fn read_dir(dir: &Path) -> Result<PluginFiles, CaError> {
        let read = |name: &str, optional: bool| {
            let p = dir.join(name);
            match std::fs::read_to_string(&p) {
                Ok(t) => Ok(t),
                Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
                Err(e) => Err(material(p.display().to_string(), e.to_string())),
            }
        };
        Ok(PluginFiles {
            ca_cert: read(CA_CERT_FILE, false)?,
            ca_key: read(CA_KEY_FILE, false)?,
            cert_chain: read(CERT_CHAIN_FILE, true)?,
            root_cert: read(ROOT_CERT_FILE, false)?,
        })
    }

    /// Whether `dir` holds a plug-in CA (its `ca-cert.pem`).
    pub fn present_in(dir: &Path) -> bool {
        dir.join(CA_CERT_FILE).exists()
    }

    /// Writes the four files into `dir` (created when absent; the key readable by its owner
    /// only). `root-cert.pem` last: its presence means the set is complete.
    pub fn write_dir(&self, dir: &Path) -> Result<(), CaError> {
        let fail = |p: &Path, e: std::io::Error| material(p.display().to_string(), e.to_string());
        std::fs::create_dir_all(dir).map_err(|e| fail(dir, e))?;
        for (name, text) in [
            (CA_KEY_FILE, &self.ca_key),
            (CA_CERT_FILE, &self.ca_cert),
            (CERT_CHAIN_FILE, &self.cert_chain),
            (ROOT_CERT_FILE, &self.root_cert),
        ] {
            let p = dir.join(name);
            let tmp = dir.join(format!(".{name}.tmp"));
            write_private(&tmp, text.as_bytes())
                .and_then(|()| std::fs::rename(&tmp, &p))
                .map_err(|e| fail(&p, e))?;
        }
        Ok(())
    }

    /// `(name, text)` of each file, for a Secret's data.
    pub fn entries(&self) -> [(&'static str, &str); 4] {
        [
            (CA_CERT_FILE, &self.ca_cert),
            (CA_KEY_FILE, &self.ca_key),
            (CERT_CHAIN_FILE, &self.cert_chain),
            (ROOT_CERT_FILE, &self.root_cert),
        ]
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

/// The certificate that signs, with its key and its way up to a root.
struct Signer {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    /// From the signing certificate (when it is not a root itself) up to, not including, the
    /// root: what a workload sends after its own certificate.
    intermediates: Vec<CertificateDer<'static>>,
    /// The root the chain ends at.
    root: CertificateDer<'static>,
    /// The earliest `notAfter` of the chain, seconds since the epoch: no workload certificate
    /// outlives it.
    not_after: i64,
}

/// The mesh CA: signs workload certificates and holds the trust bundle.
pub struct CertificateAuthority {
    signer: Signer,
    /// Every root workloads must accept now; the signer's root among them.
    roots: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("signing_root_sha256", &self.signing_root_sha256())
            .field("roots", &self.roots.len())
            .field("intermediates", &self.signer.intermediates.len())
            .finish()
    }
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

fn datetime(secs: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for messages.
fn rfc3339(secs: i64) -> String {
    let t = datetime(secs);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// `secs` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC), for messages and annotations.
pub fn format_unix_utc(secs: i64) -> String {
    rfc3339(secs)
}

/// A random positive 16-byte serial number.
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    crate::provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| CaError::Unavailable("no randomness for a serial number".into()))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn parse_certs(pem: &str, origin: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| material(origin, format!("not PEM certificates: {e}")))?;
    for (i, c) in certs.iter().enumerate() {
        X509Certificate::from_der(c)
            .map_err(|e| material(origin, format!("certificate {} does not parse: {e}", i + 1)))?;
    }
    Ok(certs)
}

fn x509<'a>(der: &'a CertificateDer<'_>) -> X509Certificate<'a> {
    // Every DER held here was parsed once already.
    X509Certificate::from_der(der)
        .expect("certificates are parsed when loaded")
        .1
}

/// Whether `cert` may sign certificates: CA:TRUE, and keyCertSign when it has a key usage.
fn check_ca(cert: &X509Certificate<'_>, origin: &str) -> Result<(), CaError> {
    if !cert.is_ca() {
        return Err(material(
            origin,
            format!(
                "{} is not a CA certificate (basicConstraints CA:TRUE is missing)",
                cert.subject()
            ),
        ));
    }
    if let Ok(Some(ku)) = cert.key_usage()
        && !ku.value.key_cert_sign()
    {
        return Err(material(
            origin,
            format!(
                "{} may not sign certificates (keyUsage lacks keyCertSign)",
                cert.subject()
            ),
        ));
    }
    Ok(())
}

fn check_current(cert: &X509Certificate<'_>, origin: &str, now: i64) -> Result<(), CaError> {
    let v = cert.validity();
    if v.not_after.timestamp() <= now {
        return Err(material(
            origin,
            format!(
                "{} expired at {}",
                cert.subject(),
                rfc3339(v.not_after.timestamp())
            ),
        ));
    }
    if v.not_before.timestamp() > now + CLOCK_SKEW.as_secs() as i64 {
        return Err(material(
            origin,
            format!(
                "{} is not valid before {}",
                cert.subject(),
                rfc3339(v.not_before.timestamp())
            ),
        ));
    }
    Ok(())
}

fn is_self_signed(cert: &X509Certificate<'_>) -> bool {
    cert.subject() == cert.issuer() && cert.verify_signature(None).is_ok()
}

/// Checks `chain` (leaf first) with webpki against `roots`, as a peer checks a client
/// certificate.
fn verify_chain(
    chain: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<(), String> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).map_err(|e| e.to_string())?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(store),
        crate::provider(),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let (leaf, intermediates) = chain.split_first().ok_or("an empty chain")?;
    verifier
        .verify_client_cert(
            leaf,
            intermediates,
            UnixTime::since_unix_epoch(Duration::from_secs(unix(now).max(0) as u64)),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Checks a workload certificate chain (PEM, leaf first) against a trust bundle (PEM) the
/// way a peer does, and returns the SPIFFE IDs (URI SANs) of the leaf.
pub fn verify_workload_chain(
    chain_pem: &str,
    trust_bundle_pem: &str,
) -> Result<Vec<String>, CaError> {
    let chain = parse_certs(chain_pem, "the certificate chain")?;
    let roots = parse_certs(trust_bundle_pem, "the trust bundle")?;
    verify_chain(&chain, &roots, SystemTime::now())
        .map_err(|e| material("the certificate chain", e))?;
    let leaf = x509(&chain[0]);
    Ok(uri_sans(&leaf))
}

fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every subject alternative name of a certificate (PEM or DER), as `URI:...`, `DNS:...`,
/// `IP:...`, ... (to check that a workload certificate carries nothing but its identity).
pub fn subject_alt_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(cert) else {
        return Vec::new();
    };
    cert.subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|n| match n {
                    GeneralName::URI(u) => format!("URI:{u}"),
                    GeneralName::DNSName(d) => format!("DNS:{d}"),
                    GeneralName::RFC822Name(m) => format!("email:{m}"),
                    GeneralName::IPAddress(ip) => format!("IP:{ip:?}"),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `id` is `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
fn is_workload_identity(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return false;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    matches!(parts.as_slice(), [td, "ns", ns, "sa", sa]
        if !td.is_empty() && !ns.is_empty() && !sa.is_empty())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:/".contains(&b))
}

/// The SPIFFE ID of a workload: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
pub fn workload_identity(
    trust_domain: &str,
    namespace: &str,
    service_account: &str,
) -> Result<String, CaError> {
    let id = format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}");
    if !is_workload_identity(&id) || trust_domain.contains('/') {
        return Err(CaError::BadIdentity(id));
    }
    Ok(id)
}

/// A CSR that was read and whose signature verified.
pub struct VerifiedCsr {
    public_key: SubjectPublicKeyInfo,
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

impl CertificateAuthority {
    /// A new self-signed root: ECDSA P-256, valid 10 years, CA:TRUE with keyCertSign, subject
    /// `O=meshctl`.
    pub fn generate_root() -> Result<CertificateAuthority, CaError> {
        Self::generate_root_at(SystemTime::now(), ROOT_LIFETIME)
    }

    /// [`generate_root`](Self::generate_root) as of `now`, valid `lifetime`.
    pub fn generate_root_at(
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<CertificateAuthority, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "meshctl");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial()?);
        params.not_before = datetime(unix(now) - ROOT_BACKDATE.as_secs() as i64);
        params.not_after = datetime(unix(now) + lifetime.as_secs() as i64);
        let cert = params.self_signed(&key)?;
        let pem = cert.pem();
        Self::from_plugin_at(
            &PluginFiles {
                ca_cert: pem.clone(),
                ca_key: key.serialize_pem(),
                cert_chain: String::new(),
                root_cert: pem,
            },
            |name| format!("generated {name}"),
            now,
        )
    }

    /// Reads Istio's plug-in files from `dir`.
    pub fn from_plugin_dir(dir: &Path) -> Result<CertificateAuthority, CaError> {
        let files = PluginFiles::read_dir(dir)?;
        let dir: PathBuf = dir.to_path_buf();
        Self::from_plugin(&files, |name| dir.join(name).display().to_string())
    }

    /// Uses Istio's plug-in files as they are. `origin` names a file in messages (its path,
    /// or the Secret and key it came from).
    pub fn from_plugin(
        files: &PluginFiles,
        origin: impl Fn(&str) -> String,
    ) -> Result<CertificateAuthority, CaError> {
        Self::from_plugin_at(files, origin, SystemTime::now())
    }

    fn from_plugin_at(
        files: &PluginFiles,
        origin: impl Fn(&str) -> String,
        now_t: SystemTime,
    ) -> Result<CertificateAuthority, CaError> {
        let now = unix(now_t);
        let (o_cert, o_key, o_chain, o_root) = (
            origin(CA_CERT_FILE),
            origin(CA_KEY_FILE),
            origin(CERT_CHAIN_FILE),
            origin(ROOT_CERT_FILE),
        );
        let ca_certs = parse_certs(&files.ca_cert, &o_cert)?;
        let Some(cert) = ca_certs.first().cloned() else {
            return Err(material(&o_cert, "holds no PEM CERTIFICATE"));
        };
        let parsed = x509(&cert);
        check_ca(&parsed, &o_cert)?;
        check_current(&parsed, &o_cert, now)?;

        let key = KeyPair::from_pem(&files.ca_key).map_err(|e| {
            material(
                &o_key,
                format!("not a PEM private key (PKCS#8, SEC1 or PKCS#1): {e}"),
            )
        })?;
        if rcgen::PublicKeyData::subject_public_key_info(&key) != parsed.public_key().raw {
            return Err(material(
                &o_key,
                format!("the key does not match the certificate in {o_cert}"),
            ));
        }

        let roots = parse_certs(&files.root_cert, &o_root)?;
        if roots.is_empty() {
            return Err(material(&o_root, "holds no PEM CERTIFICATE"));
        }
        for r in &roots {
            let p = x509(r);
            check_ca(&p, &o_root)?;
            check_current(&p, &o_root, now)?;
        }

        // The intermediates a workload sends: the chain from ca-cert.pem up, without roots.
        let chain = parse_certs(&files.cert_chain, &o_chain)?;
        let mut intermediates: Vec<CertificateDer<'static>> = Vec::new();
        if !roots.contains(&cert) {
            if is_self_signed(&parsed) {
                return Err(material(
                    &o_root,
                    format!(
                        "does not hold the self-signed root in {o_cert} ({})",
                        parsed.subject()
                    ),
                ));
            }
            intermediates.push(cert.clone());
            for c in chain {
                if c == cert || roots.contains(&c) || is_self_signed(&x509(&c)) {
                    continue;
                }
                let p = x509(&c);
                check_ca(&p, &o_chain)?;
                check_current(&p, &o_chain, now)?;
                intermediates.push(c);
            }
        }

        let issuer = Issuer::from_ca_cert_der(&cert, key)?;
        // Sign a throwaway certificate and check it the way peers will: this finds the root
        // the chain ends at, and refuses a chain that does not end at one of root-cert.pem.
        let probe_key = KeyPair::generate()?;
        let probe = leaf_params(
            "spiffe://probe.invalid/ns/probe/sa/probe",
            now - CLOCK_SKEW.as_secs() as i64,
            now + 60,
        )?
        .signed_by(&probe_key, &issuer)?;
        let mut probe_chain = vec![probe.der().clone()];
        probe_chain.extend(intermediates.iter().cloned());
        let mut last_error = String::new();
        let root = roots
            .iter()
            .find(
                |r| match verify_chain(&probe_chain, std::slice::from_ref(r), now_t) {
                    Ok(()) => true,
                    Err(e) => {
                        last_error = e;
                        false
                    }
                },
            )
            .cloned()
            .ok_or_else(|| {
                material(
                    &o_cert,
                    format!(
                        "does not chain to a root of {o_root} (through {o_chain}): {last_error}"
                    ),
                )
            })?;
        let not_after = std::iter::once(&root)
            .chain(&intermediates)
            .map(|c| x509(c).validity().not_after.timestamp())
            .min()
            .unwrap_or(now);
        Ok(CertificateAuthority {
            signer: Signer {
                issuer,
                cert,
                intermediates,
                root,
                not_after,
            },
            roots,
        })
    }

    /// The files that hold this CA (to persist it): `root-cert.pem` holds every root.
    pub fn plugin_files(&self) -> PluginFiles {
        let s = &self.signer;
        PluginFiles {
            ca_cert: pem_of(&s.cert),
            ca_key: s.issuer.key().serialize_pem(),
            // Istio's layout: from ca-cert.pem up to the root; empty when ca-cert.pem is the root.
            cert_chain: if s.intermediates.is_empty() {
                String::new()
            } else {
                s.intermediates
                    .iter()
                    .chain(std::iter::once(&s.root))
                    .map(pem_of)
                    .collect()
            },
            root_cert: self.trust_bundle_pem(),
        }
    }

    /// Every root workloads must trust now.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// [`roots`](Self::roots) as PEM.
    pub fn trust_bundle_pem(&self) -> String {
        self.roots.iter().map(pem_of).collect()
    }

    /// Lowercase hex SHA-256 of the DER of the root the signer chains to.
    pub fn signing_root_sha256(&self) -> String {
        sha256_hex(&self.signer.root)
    }

    /// When the signer's chain expires: no certificate it issues lives longer.
    pub fn not_after(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.signer.not_after.max(0) as u64)
    }

    /// Adds a root to the trust bundle (root rotation: the next root is trusted everywhere
    /// before it signs). A root already there is not added twice.
    pub fn add_root(&mut self, root_pem: &str) -> Result<(), CaError> {
        let certs = parse_certs(root_pem, "the added root")?;
        if certs.is_empty() {
            return Err(material("the added root", "holds no PEM CERTIFICATE"));
        }
        for c in certs {
            check_ca(&x509(&c), "the added root")?;
            if !self.roots.contains(&c) {
                self.roots.push(c);
            }
        }
        Ok(())
    }

    /// Makes `next`'s signer the one that issues; the trust bundle keeps every current root
    /// and gains `next`'s (workloads with certificates of the old root stay trusted until
    /// the old root is dropped).
    pub fn rotate_to(&mut self, next: CertificateAuthority) {
        let CertificateAuthority { signer, roots } = next;
        for r in roots {
            if !self.roots.contains(&r) {
                self.roots.push(r);
            }
        }
        self.signer = signer;
    }

    /// Issues the certificate of `identity` for the key of `csr_pem`, valid `ttl`.
    pub fn sign_workload(
        &self,
        csr_pem: &str,
        identity: &str,
        ttl: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        self.sign_workload_at(csr_pem, identity, ttl, SystemTime::now())
    }

    /// [`sign_workload`](Self::sign_workload) as of `now`.
    ///
    /// The CSR's signature must verify. Whatever subject and names it asks for are not
    /// used: the certificate carries `identity` as its only (URI) SAN, an empty subject,
    /// digitalSignature and keyEncipherment, serverAuth and clientAuth. A CSR that names
    /// another identity (a URI SAN or a `spiffe://` common name) is refused, saying which.
    /// `notBefore` is a minute back (clock skew); `notAfter` is `now + ttl`, but never after
    /// the CA's own chain expires.
    pub fn sign_workload_at(
        &self,
        csr_pem: &str,
        identity: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedCertificate, CaError> {
        if !is_workload_identity(identity) {
            return Err(CaError::BadIdentity(identity.to_string()));
        }
        let csr = VerifiedCsr::parse(csr_pem)?;
        if let Some(other) = csr.named_identities().find(|n| *n != identity) {
            return Err(CaError::OtherIdentity {
                requested: other.to_string(),
                identity: identity.to_string(),
            });
        }
        let now = unix(now);
        if self.signer.not_after <= now {
            return Err(CaError::Unavailable(format!(
                "its chain expired at {}",
                rfc3339(self.signer.not_after)
            )));
        }
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let not_after = now.saturating_add(ttl).min(self.signer.not_after);
        let params = leaf_params(identity, now - CLOCK_SKEW.as_secs() as i64, not_after)?;
        let cert = params.signed_by(&csr.public_key, &self.signer.issuer)?;
        let mut chain = cert.pem();
        for c in &self.signer.intermediates {
            chain.push_str(&pem_of(c));
        }
        Ok(IssuedCertificate {
            identity: identity.to_string(),
            cert_chain_pem: chain,
            trust_bundle_pem: self.trust_bundle_pem(),
            expires_at_unix: not_after.max(0) as u64,
        })
    }
}

fn leaf_params(
    identity: &str,
    not_before: i64,
    not_after: i64,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    // An empty subject: the identity is the URI SAN (which rcgen then marks critical, as
    // RFC 5280 asks).
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        identity
            .to_string()
            .try_into()
            .map_err(|_| CaError::BadIdentity(identity.to_string()))?,
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    params.not_before = datetime(not_before);
    params.not_after = datetime(not_after);
    Ok(params)
}

/// What a certificate is, for people (`meshctl ca status`): its fingerprint, subject and
/// expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSummary {
    /// Lowercase hex SHA-256 of the DER.
    pub sha256: String,
    pub subject: String,
    /// `notAfter`, seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// The certificate, PEM.
    pub pem: String,
}

impl CertificateSummary {
    /// `notAfter` as `YYYY-MM-DDTHH:MM:SSZ`.
    pub fn not_after(&self) -> String {
        rfc3339(self.not_after_unix)
    }
}

/// Every certificate of a PEM text (a trust bundle), summarized; `origin` names the text in
/// errors.
pub fn summarize_pem(pem: &str, origin: &str) -> Result<Vec<CertificateSummary>, CaError> {
    Ok(parse_certs(pem, origin)?
        .iter()
        .map(|der| {
            let c = x509(der);
            CertificateSummary {
                sha256: sha256_hex(der),
                subject: c.subject().to_string(),
                not_after_unix: c.validity().not_after.timestamp(),
                pem: pem_of(der),
            }
        })
        .collect())
}

fn pem_of(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

/// Lowercase hex SHA-256 of `bytes` (a certificate's DER: its fingerprint).
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------
// CAs and serving certificates of the mesh's own endpoints.

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
    issuer: Issuer<'static, KeyPair>,
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

#[cfg(test)]
mod tests;
