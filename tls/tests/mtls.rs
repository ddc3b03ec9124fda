//! Mutual TLS between two workload certificates over real sockets: who each side sees, what it
//! refuses, and rotation of certificates and roots with connections open.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_tls::ca::CertificateAuthority;
use mesh_tls::workload::WorkloadCertificates;
use mesh_tls::{ClientHelloKind, Issuer, MESH_ALPN, SpiffeId, classify_client_hello};
use mesh_wire::certificate::{CertificateRequest, IssuedCertificate};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A mesh root that signs CSRs for one fixed identity (what the control plane's CA does for
/// the identity a token proves).
struct TestRoot {
    ca: CertificateAuthority,
    pem: String,
}

impl TestRoot {
    /// A fresh self-signed mesh root (`name` only tells the tests' roots apart to a reader).
    fn new(_name: &str) -> TestRoot {
        let ca = CertificateAuthority::generate_root().unwrap();
        let pem = ca.trust_bundle_pem();
        TestRoot { ca, pem }
    }

    fn sign(&self, csr_pem: &str, id: &SpiffeId, ttl: Duration) -> String {
        self.ca
            .sign_workload(csr_pem, &id.to_string(), ttl)
            .unwrap()
            .cert_chain_pem
    }
}

/// Issues for one identity from whichever root is current, with the bundle given.
struct TestIssuer {
    id: SpiffeId,
    root: Mutex<Arc<TestRoot>>,
    bundle: Mutex<String>,
    ttl: Duration,
    issued: Mutex<u32>,
}

impl TestIssuer {
    fn new(id: SpiffeId, root: Arc<TestRoot>, ttl: Duration) -> Arc<TestIssuer> {
        Arc::new(TestIssuer {
            id,
            bundle: Mutex::new(root.pem.clone()),
            root: Mutex::new(root),
            ttl,
            issued: Mutex::new(0),
        })
    }
}

impl Issuer for TestIssuer {
    fn issue(
        &self,
        request: CertificateRequest,
    ) -> Pin<Box<dyn Future<Output = Result<IssuedCertificate, String>> + Send + '_>> {
        Box::pin(async move {
            let root = self.root.lock().unwrap().clone();
            let chain = root.sign(&request.csr_pem, &self.id, self.ttl);
            *self.issued.lock().unwrap() += 1;
            Ok(IssuedCertificate {
                identity: self.id.to_string(),
                cert_chain_pem: chain,
                trust_bundle_pem: self.bundle.lock().unwrap().clone(),
                expires_at_unix: 0,
            })
        })
    }
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "demo", sa)
}

async fn workload(issuer: &Arc<TestIssuer>) -> Arc<WorkloadCertificates> {
    let w = WorkloadCertificates::new(None);
    w.renew_once(issuer.as_ref()).await.unwrap();
    w
}

/// A server that answers each connection with the identity its client proved, the TLS
/// version and the key exchange group, then echoes.
async fn serve(server: Arc<WorkloadCertificates>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (_, conn) = tls.get_ref();
                let peer = conn
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| mesh_tls::identity::identity_of(c).unwrap().to_string())
                    .unwrap_or_default();
                let line = format!(
                    "{peer} {:?} {:?}\n",
                    conn.protocol_version().unwrap(),
                    conn.negotiated_key_exchange_group().unwrap().name()
                );
                tls.write_all(line.as_bytes()).await.unwrap();
                let mut buf = [0u8; 64];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn connect(
    client: &WorkloadCertificates,
    addr: std::net::SocketAddr,
    expected: &SpiffeId,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, String), std::io::Error> {
    let connector = tokio_rustls::TlsConnector::from(client.client_config(expected));
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = tls.read(&mut b).await?;
        if n == 0 || b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    Ok((tls, String::from_utf8(line).unwrap()))
}

async fn echo(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, msg: &[u8]) -> Vec<u8> {
    tls.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tls.read_exact(&mut got).await.unwrap();
    got
}

#[tokio::test]
async fn each_side_proves_its_identity_over_tls13_with_the_hybrid_group() {
    mesh_tls::install_default();
    let root = Arc::new(TestRoot::new("mesh root"));
    let server = workload(&TestIssuer::new(
        id("api"),
        root.clone(),
        Duration::from_secs(3600),
    ))
    .await;
    let client = workload(&TestIssuer::new(id("web"), root, Duration::from_secs(3600))).await;
    assert_eq!(server.identity(), Some(id("api")));
    let addr = serve(server).await;
    let (mut tls, line) = connect(&client, addr, &id("api")).await.unwrap();
    assert_eq!(
        line,
        "spiffe://cluster.local/ns/demo/sa/web TLSv1_3 X25519MLKEM768"
    );
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(MESH_ALPN));
    assert_eq!(echo(&mut tls, b"hello").await, b"hello");
}

#[tokio::test]
async fn a_client_refuses_a_server_with_another_identity() {
    let root = Arc::new(TestRoot::new("mesh root"));
    let server = workload(&TestIssuer::new(
        id("impostor"),
        root.clone(),
        Duration::from_secs(3600),
    ))
    .await;
    let client = workload(&TestIssuer::new(id("web"), root, Duration::from_secs(3600))).await;
    let addr = serve(server).await;
    let err = connect(&client, addr, &id("api")).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("UnexpectedIdentity")
            && msg.contains("impostor")
            && msg.contains("spiffe://cluster.local/ns/demo/sa/api"),
        "{msg}"
    );
}

#[tokio::test]
async fn peers_from_another_root_are_refused_both_ways() {
    let ours = Arc::new(TestRoot::new("mesh root"));
    let theirs = Arc::new(TestRoot::new("other mesh"));
    let server = workload(&TestIssuer::new(
        id("api"),
        ours.clone(),
        Duration::from_secs(3600),
    ))
    .await;
    let stranger = workload(&TestIssuer::new(
        id("web"),
        theirs.clone(),
        Duration::from_secs(3600),
    ))
    .await;
    let addr = serve(server).await;
    // The stranger does not trust our server's root.
    assert!(connect(&stranger, addr, &id("api")).await.is_err());
    // A client that trusts our root but holds a certificate of another root is refused by
    // the server: the connection ends without the server's greeting.
    let hybrid = WorkloadCertificates::new(None);
    hybrid
        .renew_once(&*TestIssuer::new(
            id("web"),
            theirs,
            Duration::from_secs(3600),
        ))
        .await
        .unwrap();
    hybrid.set_trust_bundle(&ours.pem, "").unwrap();
    assert!(connect(&hybrid, addr, &id("api")).await.is_err());
}

#[tokio::test]
async fn a_server_refuses_a_client_without_a_certificate() {
    let root = Arc::new(TestRoot::new("mesh root"));
    let server = workload(&TestIssuer::new(
        id("api"),
        root.clone(),
        Duration::from_secs(3600),
    ))
    .await;
    let addr = serve(server).await;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut root.pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(mesh_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything))
        .with_no_client_auth();
    config.alpn_protocols = vec![MESH_ALPN.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let result = async {
        let mut tls = connector
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await?;
        Ok::<_, std::io::Error>(())
    }
    .await;
    assert!(
        result.is_err(),
        "a client without a certificate got an answer"
    );
}

#[tokio::test]
async fn certificates_rotate_under_open_connections() {
    let root = Arc::new(TestRoot::new("mesh root"));
    let issuer = TestIssuer::new(id("api"), root.clone(), Duration::from_secs(3600));
    let server = workload(&issuer).await;
    let client = workload(&TestIssuer::new(id("web"), root, Duration::from_secs(3600))).await;
    let before = server.info().unwrap();
    let addr = serve(server.clone()).await;
    let (mut open, _) = connect(&client, addr, &id("api")).await.unwrap();
    server.renew_once(issuer.as_ref()).await.unwrap();
    let after = server.info().unwrap();
    assert_ne!(before.chain_pem, after.chain_pem, "a new certificate");
    // The connection opened before the rotation goes on; a new one sees the new certificate.
    assert_eq!(echo(&mut open, b"still here").await, b"still here");
    let (mut fresh, _) = connect(&client, addr, &id("api")).await.unwrap();
    let served = fresh.get_ref().1.peer_certificates().unwrap()[0].clone();
    let expected: Vec<_> = rustls_pemfile::certs(&mut after.chain_pem.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    assert_eq!(served, expected[0]);
    assert_eq!(echo(&mut fresh, b"x").await, b"x");
}

#[tokio::test]
async fn a_root_rotation_keeps_every_pair_talking() {
    let old = Arc::new(TestRoot::new("old root"));
    let new = Arc::new(TestRoot::new("new root"));
    let s_issuer = TestIssuer::new(id("api"), old.clone(), Duration::from_secs(3600));
    let c_issuer = TestIssuer::new(id("web"), old.clone(), Duration::from_secs(3600));
    let server = workload(&s_issuer).await;
    let client = workload(&c_issuer).await;
    let addr = serve(server.clone()).await;
    let fp = |pem: &str| mesh_tls::TrustBundle::from_pem(pem).unwrap().fingerprints()[0].clone();

    // 1. Both roots in every bundle; the old one still signs.
    let both = format!("{}{}", old.pem, new.pem);
    for w in [&server, &client] {
        w.set_trust_bundle(&both, &fp(&old.pem)).unwrap();
    }
    assert!(connect(&client, addr, &id("api")).await.is_ok());
    // 2. The new root signs: the server is re-issued first; the client, still on the old
    //    root, and the server, now on the new, both accept each other.
    for i in [&s_issuer, &c_issuer] {
        *i.root.lock().unwrap() = new.clone();
        *i.bundle.lock().unwrap() = both.clone();
    }
    server.set_trust_bundle(&both, &fp(&new.pem)).unwrap();
    server.renew_once(s_issuer.as_ref()).await.unwrap();
    assert_eq!(server.info().unwrap().root_sha256, fp(&new.pem));
    let (mut open, _) = connect(&client, addr, &id("api")).await.unwrap();
    client.set_trust_bundle(&both, &fp(&new.pem)).unwrap();
    client.renew_once(c_issuer.as_ref()).await.unwrap();
    assert!(connect(&client, addr, &id("api")).await.is_ok());
    // 3. The old root leaves the bundles: the pair still talks, old connections too.
    for w in [&server, &client] {
        w.set_trust_bundle(&new.pem, &fp(&new.pem)).unwrap();
    }
    assert!(connect(&client, addr, &id("api")).await.is_ok());
    assert_eq!(echo(&mut open, b"ok").await, b"ok");
    assert_eq!(
        client.info().unwrap().trust_bundle_sha256,
        vec![fp(&new.pem)]
    );
}

#[tokio::test]
async fn a_new_signing_root_triggers_renewal_at_once() {
    let old = Arc::new(TestRoot::new("old root"));
    let new = Arc::new(TestRoot::new("new root"));
    let issuer = TestIssuer::new(id("api"), old.clone(), Duration::from_secs(24 * 3600));
    let w = WorkloadCertificates::new(None);
    tokio::spawn(w.clone().run(issuer.clone()));
    for _ in 0..500 {
        if w.is_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(*issuer.issued.lock().unwrap(), 1);
    *issuer.root.lock().unwrap() = new.clone();
    let both = format!("{}{}", old.pem, new.pem);
    *issuer.bundle.lock().unwrap() = both.clone();
    let new_fp = mesh_tls::TrustBundle::from_pem(&new.pem)
        .unwrap()
        .fingerprints()[0]
        .clone();
    w.set_trust_bundle(&both, &new_fp).unwrap();
    for _ in 0..500 {
        if w.info().unwrap().root_sha256 == new_fp {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(w.info().unwrap().root_sha256, new_fp);
    assert_eq!(*issuer.issued.lock().unwrap(), 2, "renewed once, at once");
}

#[test]
fn first_bytes_tell_mesh_tls_from_app_tls_and_plaintext() {
    assert_eq!(
        classify_client_hello(b"GET / HTTP/1.1\r\n"),
        ClientHelloKind::NotTls
    );
    assert_eq!(
        classify_client_hello(b"PRI * HTTP/2.0"),
        ClientHelloKind::NotTls
    );
    assert_eq!(classify_client_hello(&[22, 3]), ClientHelloKind::Incomplete);
    let hello = |alpn: Vec<Vec<u8>>| {
        let mut config = rustls::ClientConfig::builder_with_provider(mesh_tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything))
            .with_no_client_auth();
        config.alpn_protocols = alpn;
        let mut conn = rustls::ClientConnection::new(
            Arc::new(config),
            ServerName::try_from("app.example").unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    };
    let mesh = hello(vec![MESH_ALPN.to_vec()]);
    assert_eq!(classify_client_hello(&mesh), ClientHelloKind::Mesh);
    assert_eq!(
        classify_client_hello(&mesh[..mesh.len() / 2]),
        ClientHelloKind::Incomplete
    );
    assert_eq!(
        classify_client_hello(&hello(vec![b"h2".to_vec()])),
        ClientHelloKind::OtherTls
    );
    assert_eq!(
        classify_client_hello(&hello(vec![])),
        ClientHelloKind::OtherTls
    );
}

#[derive(Debug)]
struct AcceptAnything;

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        mesh_tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test]
async fn file_mounted_certificates_serve_like_issued_ones() {
    let root = Arc::new(TestRoot::new("mesh root"));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let chain = root.sign(&csr, &id("api"), Duration::from_secs(3600));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert-chain.pem"), &chain).unwrap();
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("root-cert.pem"), &root.pem).unwrap();
    let server = WorkloadCertificates::new(None);
    server.install_dir(dir.path()).unwrap();
    assert_eq!(server.identity(), Some(id("api")));
    let client = workload(&TestIssuer::new(
        id("web"),
        root.clone(),
        Duration::from_secs(3600),
    ))
    .await;
    let addr = serve(server).await;
    let (_, line) = connect(&client, addr, &id("api")).await.unwrap();
    assert!(
        line.starts_with("spiffe://cluster.local/ns/demo/sa/web "),
        "{line}"
    );

    // A key that is not the certificate's is refused, naming the directory.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(dir.path().join("key.pem"), other.serialize_pem()).unwrap();
    let err = WorkloadCertificates::new(None)
        .install_dir(dir.path())
        .unwrap_err();
    assert!(
        err.contains(&dir.path().display().to_string()) && err.contains("key"),
        "{err}"
    );
}
