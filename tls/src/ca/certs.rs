//! Reading and checking certificates: the helpers every CA of the mesh shares, and the
//! checks a caller can run on a workload chain.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::SerialNumber;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use super::error::{CaError, material};

/// How far back a workload certificate's `notBefore` is put, so a peer whose clock is a
/// little behind the control plane's still accepts it.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

pub(super) fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

pub(super) fn datetime(secs: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for messages.
pub(super) fn rfc3339(secs: i64) -> String {
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

/// A random positive 16-byte serial number.
pub(super) fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    crate::provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| CaError::Unavailable("no randomness for a serial number".into()))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

pub(super) fn parse_certs(
    pem: &str,
    origin: &str,
) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| material(origin, format!("not PEM certificates: {e}")))?;
    for (i, c) in certs.iter().enumerate() {
        X509Certificate::from_der(c)
            .map_err(|e| material(origin, format!("certificate {} does not parse: {e}", i + 1)))?;
    }
    Ok(certs)
}

pub(super) fn x509<'a>(der: &'a CertificateDer<'_>) -> X509Certificate<'a> {
    // Every DER held here was parsed once already.
    X509Certificate::from_der(der)
        .expect("certificates are parsed when loaded")
        .1
}

/// Whether `cert` may sign certificates: CA:TRUE, and keyCertSign when it has a key usage.
pub(super) fn check_ca(cert: &X509Certificate<'_>, origin: &str) -> Result<(), CaError> {
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

pub(super) fn check_current(
    cert: &X509Certificate<'_>,
    origin: &str,
    now: i64,
) -> Result<(), CaError> {
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

pub(super) fn is_self_signed(cert: &X509Certificate<'_>) -> bool {
    cert.subject() == cert.issuer() && cert.verify_signature(None).is_ok()
}

/// Checks `chain` (leaf first) with webpki against `roots`, as a peer checks a client
/// certificate.
pub(super) fn verify_chain(
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

pub(super) fn pem_of(der: &CertificateDer<'_>) -> String {
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

/// `secs` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC), for messages and annotations.
pub fn format_unix_utc(secs: i64) -> String {
    rfc3339(secs)
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
pub fn summarize_pem(pem: &str, origin: &str) -> Result<Vec<CertificateSummary>, super::CaError> {
    Ok(parse_certs(pem, origin)?
        .iter()
        .map(|der| {
            let c = x509(der);
            CertificateSummary {
                sha256: crate::identity::sha256_hex(der),
                subject: c.subject().to_string(),
                not_after_unix: c.validity().not_after.timestamp(),
                pem: pem_of(der),
            }
        })
        .collect())
}
