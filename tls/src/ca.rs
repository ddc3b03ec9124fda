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
//! Modules: `plugin` (the plug-in layout), `csr` (signing requests), `certs` (reading and
//! checking certificates), `local` (the mesh's own endpoints), `error`.
//!
//! Certificates carry wall-clock times, so these functions read the system clock (or take
//! `now`), not tokio's monotonic one.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_config::identity::SpiffeIdError;
use mesh_wire::certificate::IssuedCertificate;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;

mod certs;
mod csr;
mod error;
mod local;
mod plugin;

pub use crate::identity::sha256_hex;
pub use certs::{
    CLOCK_SKEW, CertificateSummary, format_unix_utc, subject_alt_names, summarize_pem,
    verify_workload_chain,
};
pub use csr::VerifiedCsr;
pub use error::CaError;
pub use local::{
    KeyedCertificate, LeafSpec, LocalCa, ServingCertificate, ServingSpec, Usage, Validity,
    serving_certificate,
};
pub use plugin::{CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, PluginFiles, ROOT_CERT_FILE};

use certs::{
    check_ca, check_current, datetime, is_self_signed, parse_certs, pem_of, random_serial, rfc3339,
    unix, verify_chain, x509,
};
use error::material;

/// Lifetime of a root made by [`CertificateAuthority::generate_root`].
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far back a generated root's `notBefore` is put (nodes whose clocks lag the control
/// plane's must accept every chain through it from its first minute).
const ROOT_BACKDATE: Duration = Duration::from_secs(3600);

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
        mesh_config::identity::parse_spiffe_id(identity)?;
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
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into().map_err(
        |_| {
            CaError::BadIdentity(SpiffeIdError {
                id: identity.to_string(),
                problem: "it is not ASCII".into(),
            })
        },
    )?)];
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

#[cfg(test)]
mod tests;
