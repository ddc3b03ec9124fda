use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DnType, KeyPair, SanType};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use super::*;

const A: &str = "spiffe://cluster.local/ns/shop/sa/a";
const B: &str = "spiffe://cluster.local/ns/shop/sa/b";
const DAY: Duration = Duration::from_secs(24 * 3600);

/// A CSR from a new key, asking for `uris` (and a DNS name and subject, which are ignored).
fn csr(uris: &[&str]) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["admin.example.com".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "cluster-admin");
    for u in uris {
        params
            .subject_alt_names
            .push(SanType::URI(u.to_string().try_into().unwrap()));
    }
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn a_csr_for_sa_a_signed_as_sa_a_verifies_and_carries_only_that_identity() {
    let ca = CertificateAuthority::generate_root().unwrap();
    let before = unix(SystemTime::now());
    let issued = ca.sign_workload(&csr(&[A]), A, DAY).unwrap();
    assert_eq!(issued.identity, A);
    assert_eq!(issued.trust_bundle_pem, ca.trust_bundle_pem());
    // webpki, as a peer checks it, against the root only.
    let ids = verify_workload_chain(&issued.cert_chain_pem, &ca.trust_bundle_pem()).unwrap();
    assert_eq!(ids, [A]);
    let chain = certs(&issued.cert_chain_pem);
    assert_eq!(chain.len(), 1, "a root signs directly: no intermediates");
    // Only the URI SAN: not the DNS name the CSR asked for.
    assert_eq!(subject_alt_names(&chain[0]), [format!("URI:{A}")]);
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    assert!(
        leaf.subject().as_raw().len() <= 2,
        "empty subject: {}",
        leaf.subject()
    );
    assert!(!leaf.is_ca());
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any);
    // A minute back, and now + ttl.
    let v = leaf.validity();
    let nb = v.not_before.timestamp();
    assert!(
        (before - 62..=before - 58).contains(&nb),
        "{nb} vs {before}"
    );
    let na = v.not_after.timestamp();
    assert_eq!(na as u64, issued.expires_at_unix);
    assert!((before + 86_400..=before + 86_402).contains(&na), "{na}");
    // An issued certificate with the key in the CSR, not the CA's.
    let ca_key = x509(&ca.roots()[0]).public_key().raw.to_vec();
    assert_ne!(leaf.public_key().raw, ca_key.as_slice());
    // A CSR that names nothing gets the caller's identity too.
    let plain = ca.sign_workload(&csr(&[]), A, DAY).unwrap();
    assert_eq!(
        verify_workload_chain(&plain.cert_chain_pem, &plain.trust_bundle_pem).unwrap(),
        [A]
    );
}

#[test]
fn a_csr_naming_another_identity_is_refused_saying_which() {
    let ca = CertificateAuthority::generate_root().unwrap();
    let e = ca.sign_workload(&csr(&[B]), A, DAY).unwrap_err();
    assert!(matches!(e, CaError::OtherIdentity { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("sa/b") && msg.contains(A), "{msg}");
    // Its own identity and another one: still refused.
    let e = ca.sign_workload(&csr(&[A, B]), A, DAY).unwrap_err();
    assert!(e.to_string().contains("sa/b"), "{e}");
    // A spiffe:// common name counts as a name too.
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, B);
    let by_cn = params.serialize_request(&key).unwrap().pem().unwrap();
    let e = ca.sign_workload(&by_cn, A, DAY).unwrap_err();
    assert!(matches!(e, CaError::OtherIdentity { .. }), "{e:?}");
    // Not a workload identity at all.
    let e = ca
        .sign_workload(&csr(&[]), "spiffe://cluster.local/ns/a", DAY)
        .unwrap_err();
    assert!(matches!(e, CaError::BadIdentity(_)), "{e:?}");
}

#[test]
fn a_tampered_or_broken_csr_is_refused() {
    let ca = CertificateAuthority::generate_root().unwrap();
    let pem = csr(&[A]);
    let der =
        rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
    let mut bytes = der.as_ref().to_vec();
    // Change what it asks for after it was signed: sa/a → sa/c.
    let at = bytes
        .windows(4)
        .position(|w| w == b"sa/a")
        .expect("the URI in the DER");
    bytes[at + 3] = b'c';
    let tampered = pem_block("CERTIFICATE REQUEST", &bytes);
    let e = ca
        .sign_workload(&tampered, "spiffe://cluster.local/ns/shop/sa/c", DAY)
        .unwrap_err();
    assert!(matches!(e, CaError::CsrSignature), "{e:?}");
    assert!(e.is_bad_request());
    for junk in [
        "",
        "not a csr",
        &pem_block("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00"),
    ] {
        let e = ca.sign_workload(junk, A, DAY).unwrap_err();
        assert!(matches!(e, CaError::BadCsr(_)), "{junk:?}: {e:?}");
        assert!(e.is_bad_request());
    }
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN {label}-----\n{b64}\n-----END {label}-----\n")
}

#[test]
fn the_lifetime_never_outlasts_the_ca() {
    let now = SystemTime::now();
    let ca = CertificateAuthority::generate_root_at(now, Duration::from_secs(7200)).unwrap();
    let issued = ca.sign_workload_at(&csr(&[A]), A, 2 * DAY, now).unwrap();
    assert_eq!(issued.expires_at_unix, unix(ca.not_after()) as u64);
    assert_eq!(unix(ca.not_after()), unix(now) + 7200);
    // A short one is left as asked.
    let issued = ca
        .sign_workload_at(&csr(&[A]), A, Duration::from_secs(60), now)
        .unwrap();
    assert_eq!(issued.expires_at_unix, unix(now) as u64 + 60);
    // An expired CA issues nothing.
    let later = now + Duration::from_secs(7201);
    let e = ca.sign_workload_at(&csr(&[A]), A, DAY, later).unwrap_err();
    assert!(matches!(e, CaError::Unavailable(_)), "{e:?}");
}

#[test]
fn plug_in_files_that_do_not_fit_are_refused_naming_the_file() {
    let ca = CertificateAuthority::generate_root().unwrap();
    let files = ca.plugin_files();
    let origin = |n: &str| format!("Secret mesh-system/cacerts key {n}");
    // As they are: fine, and the same CA.
    let again = CertificateAuthority::from_plugin(&files, origin).unwrap();
    assert_eq!(again.signing_root_sha256(), ca.signing_root_sha256());

    let other_key = KeyPair::generate().unwrap().serialize_pem();
    let wrong_key = PluginFiles {
        ca_key: other_key,
        ..files.clone()
    };
    let e = CertificateAuthority::from_plugin(&wrong_key, origin)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("key ca-key.pem") && e.contains("does not match"),
        "{e}"
    );

    let junk_key = PluginFiles {
        ca_key: "junk".into(),
        ..files.clone()
    };
    let e = CertificateAuthority::from_plugin(&junk_key, origin)
        .unwrap_err()
        .to_string();
    assert!(e.contains("ca-key.pem") && e.contains("private key"), "{e}");

    // A leaf as ca-cert.pem: not a CA.
    let local = LocalCa::generate("x", None, None).unwrap();
    let leaf = local
        .issue(&LeafSpec {
            common_name: "leaf",
            organization: None,
            sans: &["leaf.example".into()],
            usage: Usage::Server,
            validity: None,
        })
        .unwrap();
    let not_ca = PluginFiles {
        ca_cert: leaf.cert_pem.clone(),
        ca_key: leaf.key_pem.clone(),
        cert_chain: leaf.cert_pem + local.cert_pem(),
        root_cert: local.cert_pem().to_string(),
    };
    let e = CertificateAuthority::from_plugin(&not_ca, origin)
        .unwrap_err()
        .to_string();
    assert!(e.contains("ca-cert.pem") && e.contains("not a CA"), "{e}");

    // Expired.
    let old = CertificateAuthority::generate_root_at(SystemTime::now() - 20 * 365 * DAY, 365 * DAY)
        .unwrap();
    let e = CertificateAuthority::from_plugin(&old.plugin_files(), origin)
        .unwrap_err()
        .to_string();
    assert!(e.contains("ca-cert.pem") && e.contains("expired"), "{e}");

    // A root-cert.pem that is not where ca-cert.pem leads.
    let stranger = CertificateAuthority::generate_root().unwrap();
    let e = CertificateAuthority::from_plugin(
        &PluginFiles {
            root_cert: stranger.trust_bundle_pem(),
            ..files.clone()
        },
        origin,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("root-cert.pem"), "{e}");
    // Missing files in a directory: the path is named.
    let dir = std::env::temp_dir().join(format!("mesh-tls-ca-missing-{}", std::process::id()));
    let e = CertificateAuthority::from_plugin_dir(&dir)
        .unwrap_err()
        .to_string();
    assert!(e.contains("ca-cert.pem"), "{e}");
}

/// Istio's layout with an intermediate: root → intermediate (ca-cert.pem) → workloads.
#[test]
fn an_intermediate_from_plug_in_files_signs_and_is_sent_in_the_chain() {
    let root = LocalCa::generate("Example Root CA", None, None).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "Example cluster CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params.use_authority_key_identifier_extension = true;
    let inter = params.signed_by(&key, &root.issuer).unwrap();
    let files = PluginFiles {
        ca_cert: inter.pem(),
        ca_key: key.serialize_pem(),
        cert_chain: inter.pem() + root.cert_pem(),
        root_cert: root.cert_pem().to_string(),
    };
    let dir = tempdir();
    files.write_dir(&dir).unwrap();
    let ca = CertificateAuthority::from_plugin_dir(&dir).unwrap();
    assert_eq!(
        ca.signing_root_sha256(),
        sha256_hex(root.cert_der()),
        "the signing root is the root, not the intermediate"
    );
    let issued = ca.sign_workload(&csr(&[A]), A, DAY).unwrap();
    let chain = certs(&issued.cert_chain_pem);
    assert_eq!(chain.len(), 2, "leaf + intermediate");
    assert_eq!(chain[1], *inter.der());
    assert_eq!(issued.trust_bundle_pem, root.cert_pem());
    assert_eq!(
        verify_workload_chain(&issued.cert_chain_pem, root.cert_pem()).unwrap(),
        [A]
    );
    // Without the intermediate a peer cannot build the path: the chain is what makes it work.
    let leaf_only = pem_of(&chain[0]);
    assert!(verify_workload_chain(&leaf_only, root.cert_pem()).is_err());
    // Persisted the same way it came.
    assert_eq!(ca.plugin_files(), files);
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "mesh-tls-ca-{}-{}",
        std::process::id(),
        fastrand_u64()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fastrand_u64() -> u64 {
    let mut b = [0u8; 8];
    crate::provider().secure_random.fill(&mut b).unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn a_second_root_is_trusted_then_signs() {
    let mut ca = CertificateAuthority::generate_root().unwrap();
    let old = ca.sign_workload(&csr(&[A]), A, DAY).unwrap();
    let old_root = ca.signing_root_sha256();
    let next = CertificateAuthority::generate_root().unwrap();
    let next_root = next.signing_root_sha256();
    // Trusted first…
    ca.add_root(&next.trust_bundle_pem()).unwrap();
    ca.add_root(&next.trust_bundle_pem()).unwrap();
    assert_eq!(ca.roots().len(), 2, "added once");
    assert_eq!(ca.signing_root_sha256(), old_root);
    // …then the signer.
    ca.rotate_to(next);
    assert_eq!(ca.signing_root_sha256(), next_root);
    assert_eq!(ca.roots().len(), 2);
    let new = ca.sign_workload(&csr(&[A]), A, DAY).unwrap();
    // Both generations verify against the bundle every workload now has.
    let bundle = new.trust_bundle_pem.clone();
    assert_eq!(
        verify_workload_chain(&old.cert_chain_pem, &bundle).unwrap(),
        [A]
    );
    assert_eq!(
        verify_workload_chain(&new.cert_chain_pem, &bundle).unwrap(),
        [A]
    );
    // And the old bundle does not accept the new root's certificates.
    assert!(verify_workload_chain(&new.cert_chain_pem, &old.trust_bundle_pem).is_err());
    // Persisting keeps both roots.
    let back = CertificateAuthority::from_plugin(&ca.plugin_files(), |n| n.to_string()).unwrap();
    assert_eq!(back.roots().len(), 2);
    assert_eq!(back.signing_root_sha256(), next_root);
}

#[test]
fn the_generated_root_is_what_the_mesh_asks_for() {
    let ca = CertificateAuthority::generate_root().unwrap();
    let root = x509(&ca.roots()[0]);
    assert!(root.is_ca());
    assert!(root.key_usage().unwrap().unwrap().value.key_cert_sign());
    assert_eq!(root.subject().to_string(), "O=meshctl");
    let left = root.validity().not_after.timestamp() - unix(SystemTime::now());
    let ten_years = 10 * 365 * 86_400;
    assert!((ten_years - 60..=ten_years).contains(&left), "{left}");
    assert_eq!(
        root.public_key().algorithm.algorithm.to_id_string(),
        "1.2.840.10045.2.1",
        "ECDSA"
    );
    assert_eq!(ca.signing_root_sha256().len(), 64);
    assert_eq!(ca.signing_root_sha256(), sha256_hex(&ca.roots()[0]));
}

#[test]
fn a_serving_certificate_verifies_for_its_names_against_its_ca() {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let s = serving_certificate(&ServingSpec {
        ca_name: "test CA",
        ca_path_len: Some(0),
        common_name: "localhost",
        sans: &names,
        validity: None,
    })
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(s.ca_der.clone()).unwrap();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        crate::provider(),
    )
    .build()
    .unwrap();
    let leaf = certs(&s.cert_pem).remove(0);
    for name in ["localhost", "127.0.0.1"] {
        verifier
            .verify_server_cert(
                &leaf,
                &[],
                &rustls::pki_types::ServerName::try_from(name).unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap();
    }
    assert!(
        verifier
            .verify_server_cert(
                &leaf,
                &[],
                &rustls::pki_types::ServerName::try_from("example.com").unwrap(),
                &[],
                UnixTime::now(),
            )
            .is_err()
    );
    KeyPair::from_pem(&s.key_pem).unwrap();
}
