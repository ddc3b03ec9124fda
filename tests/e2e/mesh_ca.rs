//! The mesh CA against the real API server: workload certificates over config distribution
//! (real TLS, HTTP/2) for the identity a service-account token proves (TokenReview), the root
//! kept in Secret `mesh-ca-secret` across restarts and replicas, a plugged-in `cacerts` used
//! as it is, and the trust bundle in what proxies receive.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use mesh_proxy::distribution::{ClientOptions, NodeIdentity, first_snapshot};
use mesh_testenv::{TestEnv, eventually};
use mesh_tls::ca::{LocalCa, sha256_hex, subject_alt_names, verify_workload_chain};
use mesh_wire::certificate::{CERTIFICATE_PATH, IssuedCertificate, MAX_REQUEST_BYTES};
use meshctl::controlplane::auth::ProxyAuth;
use meshctl::controlplane::certs::{self, CertSource};
use meshctl::controlplane::mesh_ca::{CaSource, MESH_CA_SECRET, MeshCa, MeshCaOptions};
use meshctl::controlplane::{Hub, World};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::inprocess::ControlPlane;

/// A service-account token for the mesh's audience (`extra`: e.g. binding it to a pod).
async fn token(env: &TestEnv, ns: &str, sa: &str, extra: &[&str]) -> String {
    let mut args = vec!["-n", ns, "create", "token", sa, "--audience", "meshctl"];
    args.extend_from_slice(extra);
    env.kubectl_ok(&args).await.unwrap().trim().to_string()
}

/// A CSR of a new key naming `uris` (and a DNS name and subject, which the CA ignores).
fn csr(uris: &[&str]) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["db.example.com".to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "admin");
    for u in uris {
        params
            .subject_alt_names
            .push(rcgen::SanType::URI(u.to_string().try_into().unwrap()));
    }
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn request(csr_pem: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"csrPem": csr_pem})).unwrap()
}

fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// `POST CERTIFICATE_PATH` over TLS and HTTP/2, as a proxy sends it: (status, body).
async fn post(addr: SocketAddr, ca_pem: &str, token: Option<&str>, body: Vec<u8>) -> (u16, String) {
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs(ca_pem) {
        roots.add(c).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(mesh_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::post(format!(
        "https://127.0.0.1:{}{CERTIFICATE_PATH}",
        addr.port()
    ))
    .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        send.send_request(req.body(Full::new(Bytes::from(body))).unwrap()),
    )
    .await
    .expect("an answer within 20 s")
    .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The config distribution server with `ca`, on 127.0.0.1.
struct Served {
    addr: SocketAddr,
    ca_pem: String,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
    _world: watch::Sender<Option<Arc<World>>>,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn serve(ca: MeshCa, auth: ProxyAuth) -> Served {
    mesh_testenv::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let tls = certs::load(&CertSource::Generated {
        dir: dir.path().join("pki"),
        sans: vec!["127.0.0.1".into()],
    })
    .unwrap();
    let (world, rx) = watch::channel(Some(Arc::new(World::new(
        1,
        Arc::new(Default::default()),
        Default::default(),
    ))));
    let hub = Hub::with_mesh_ca(rx, Default::default(), auth, Some(Arc::new(ca)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(
        hub.clone()
            .serve(listener, tls.server_config, shutdown.clone()),
    );
    Served {
        addr,
        ca_pem: tls.ca_pem,
        hub,
        shutdown,
        _world: world,
        _dir: dir,
    }
}

async fn secret_text(env: &TestEnv, ns: &str, name: &str, key: &str) -> Option<String> {
    let s = Api::<Secret>::namespaced(env.client().unwrap(), ns)
        .get_opt(name)
        .await
        .unwrap()?;
    let data = s.data.unwrap_or_default();
    Some(String::from_utf8(data.get(key)?.0.clone()).unwrap())
}

fn kube_ca(ns: &str) -> MeshCaOptions {
    MeshCaOptions::new(CaSource::Kubernetes {
        namespace: ns.to_string(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_gets_the_certificate_of_its_own_service_account_and_nothing_else() {
    let env = TestEnv::shared();
    let ns = env.create_namespace("ca-issue").await.unwrap();
    env.kubectl_ok(&["-n", &ns, "create", "serviceaccount", "a"])
        .await
        .unwrap();
    let client = env.client().unwrap();
    let ca = MeshCa::load(Some(&client), kube_ca(&ns)).await.unwrap();
    let served = serve(ca, ProxyAuth::token_review(client, "meshctl")).await;
    let (addr, tls_ca) = (served.addr, served.ca_pem.clone());
    let token_a = token(env, &ns, "a", &[]).await;
    let id_a = format!("spiffe://cluster.local/ns/{ns}/sa/a");
    let id_b = format!("spiffe://cluster.local/ns/{ns}/sa/b");

    // sa/a's token and a CSR for sa/a: its certificate, and only its identity in it.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let body = serde_json::to_vec(&json!({"csrPem": csr(&[&id_a]), "ttlSeconds": 3600})).unwrap();
    let (status, text) = post(addr, &tls_ca, Some(&token_a), body).await;
    assert_eq!(status, 200, "{text}");
    let issued: IssuedCertificate = serde_json::from_str(&text).unwrap();
    assert_eq!(issued.identity, id_a);
    assert_eq!(
        verify_workload_chain(&issued.cert_chain_pem, &issued.trust_bundle_pem).unwrap(),
        std::slice::from_ref(&id_a),
        "verifies against the trust bundle, as a peer checks it"
    );
    let leaf = pem_certs(&issued.cert_chain_pem).remove(0);
    assert_eq!(subject_alt_names(&leaf), [format!("URI:{id_a}")]);
    assert!((now + 3590..=now + 3610).contains(&issued.expires_at_unix));
    // The trust bundle is the root the control plane keeps in mesh-ca-secret.
    let root = secret_text(env, &ns, MESH_CA_SECRET, "root-cert.pem")
        .await
        .expect("mesh-ca-secret created");
    assert_eq!(issued.trust_bundle_pem, root);

    // A CSR that names nothing: still sa/a's certificate.
    let (status, text) = post(addr, &tls_ca, Some(&token_a), request(&csr(&[]))).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(&id_a), "{text}");

    // sa/a's token asking for sa/b: 403, saying which.
    let (status, text) = post(addr, &tls_ca, Some(&token_a), request(&csr(&[&id_b]))).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains(&id_b) && text.contains(&id_a), "{text}");

    // No token, a token for another audience: 401.
    let (status, text) = post(addr, &tls_ca, None, request(&csr(&[&id_a]))).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("no bearer token"), "{text}");
    let elsewhere = env
        .kubectl_ok(&["-n", &ns, "create", "token", "a", "--audience", "other"])
        .await
        .unwrap();
    let (status, text) = post(
        addr,
        &tls_ca,
        Some(elsewhere.trim()),
        request(&csr(&[&id_a])),
    )
    .await;
    assert_eq!(status, 401, "{text}");

    // What does not parse: 400 with the reason; too much: 413, without reading it all.
    let (status, text) = post(addr, &tls_ca, Some(&token_a), b"{\"csr\": 1}".to_vec()).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("csr"), "{text}");
    let (status, text) = post(
        addr,
        &tls_ca,
        Some(&token_a),
        request("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("certificate signing request"), "{text}");
    let (status, text) = post(
        addr,
        &tls_ca,
        Some(&token_a),
        vec![b' '; MAX_REQUEST_BYTES + 1],
    )
    .await;
    assert_eq!(status, 413, "{text}");

    let metrics = served.hub.metrics().encode();
    for line in [
        "meshctl_distribution_certificates_issued_total 2",
        "meshctl_distribution_certificates_refused_total{reason=\"forbidden\"} 1",
        "meshctl_distribution_certificates_refused_total{reason=\"unauthenticated\"} 2",
        "meshctl_distribution_certificates_refused_total{reason=\"bad_request\"} 3",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_lives_in_mesh_ca_secret_and_reaches_proxies_and_every_namespace() {
    let env = TestEnv::shared();
    let ca_ns = env.create_namespace("ca-home").await.unwrap();
    let ns = env.create_namespace("ca-app").await.unwrap();
    let objects = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: a, namespace: {ns}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: app-0, namespace: {ns}}}\n\
         spec:\n  serviceAccountName: a\n  nodeName: no-kubelet\n  containers: [{{name: app, image: app:1}}]\n"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("objects.yaml"), objects).unwrap();
    env.kubectl_ok(&[
        "apply",
        "-f",
        dir.path().join("objects.yaml").to_str().unwrap(),
    ])
    .await
    .unwrap();
    let bound = token(
        env,
        &ns,
        "a",
        &["--bound-object-kind", "Pod", "--bound-object-name", "app-0"],
    )
    .await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &bound).unwrap();
    let id_a = format!("spiffe://cluster.local/ns/{ns}/sa/a");

    let start = || {
        let ca_ns = ca_ns.clone();
        ControlPlane::start_with(env, vec![], None, move |c| {
            c.proxy_token_audience = Some("meshctl".into());
            c.mesh_ca = Some(kube_ca(&ca_ns));
        })
    };
    let cp = start().await;
    let tls_ca = std::fs::read_to_string(&cp.ca_path).unwrap();
    let root = secret_text(env, &ca_ns, MESH_CA_SECRET, "root-cert.pem")
        .await
        .expect("the control plane created mesh-ca-secret");
    let root_sha = sha256_hex(&pem_certs(&root)[0]);

    // The snapshot a sidecar receives carries the bundle and the signing root.
    let mut o = ClientOptions::new(
        cp.distribution.to_string(),
        cp.ca_path.clone(),
        NodeIdentity::Sidecar {
            namespace: ns.clone(),
            pod: "app-0".into(),
            service_account: Some("a".into()),
            ip: None,
        },
    );
    o.server_name = "127.0.0.1".into();
    o.token_file = Some(token_file.clone());
    let config = tokio::time::timeout(Duration::from_secs(20), first_snapshot(&o))
        .await
        .expect("a snapshot within 20 s")
        .unwrap();
    let identity = config
        .mesh_identity
        .expect("the snapshot carries meshIdentity");
    assert_eq!(identity.trust_bundle_pem, root);
    assert_eq!(identity.signing_root_sha256, root_sha);

    // mesh-ca-root-cert in the app's namespace: the CA of the control plane first, then the
    // mesh's root.
    let expected = format!("{tls_ca}{root}");
    let cms = Api::<ConfigMap>::namespaced(env.client().unwrap(), &ns);
    eventually(
        Duration::from_secs(60),
        "mesh-ca-root-cert with the mesh root",
        || {
            let cms = cms.clone();
            let expected = expected.clone();
            async move {
                let cm = cms.get_opt("mesh-ca-root-cert").await?;
                let text = cm
                    .and_then(|c| c.data)
                    .and_then(|d| d.get("root-cert.pem").cloned());
                Ok(text.filter(|t| *t == expected))
            }
        },
    )
    .await
    .unwrap();

    // Issued over the control plane's own server, counted on its /metrics.
    let (status, text) = post(
        cp.distribution,
        &tls_ca,
        Some(&bound),
        request(&csr(&[&id_a])),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let first: IssuedCertificate = serde_json::from_str(&text).unwrap();
    assert_eq!(
        cp.metric("meshctl_distribution_certificates_issued_total")
            .await,
        1
    );

    // A restarted control plane signs with the same root.
    drop(cp);
    let cp = start().await;
    let tls_ca = std::fs::read_to_string(&cp.ca_path).unwrap();
    let (status, text) = post(
        cp.distribution,
        &tls_ca,
        Some(&bound),
        request(&csr(&[&id_a])),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let again: IssuedCertificate = serde_json::from_str(&text).unwrap();
    assert_eq!(again.trust_bundle_pem, root);
    assert_eq!(
        verify_workload_chain(&again.cert_chain_pem, &first.trust_bundle_pem).unwrap(),
        std::slice::from_ref(&id_a),
        "the new certificate verifies against the bundle workloads got before the restart"
    );
    assert_eq!(
        secret_text(env, &ca_ns, MESH_CA_SECRET, "root-cert.pem").await,
        Some(root)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_at_once_end_with_one_root() {
    let env = TestEnv::shared();
    let ns = env.create_namespace("ca-race").await.unwrap();
    let client = env.client().unwrap();
    let loads: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            let options = kube_ca(&ns);
            tokio::spawn(async move { MeshCa::load(Some(&client), options).await })
        })
        .collect();
    let mut roots = Vec::new();
    for l in loads {
        roots.push(
            l.await
                .unwrap()
                .unwrap()
                .mesh_identity()
                .signing_root_sha256
                .clone(),
        );
    }
    let stored = secret_text(env, &ns, MESH_CA_SECRET, "root-cert.pem")
        .await
        .unwrap();
    let stored = sha256_hex(&pem_certs(&stored)[0]);
    assert!(roots.iter().all(|r| *r == stored), "{roots:?} vs {stored}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cacerts_secret_is_used_as_it_is() {
    let env = TestEnv::shared();
    let ns = env.create_namespace("ca-plugin").await.unwrap();
    env.kubectl_ok(&["-n", &ns, "create", "serviceaccount", "a"])
        .await
        .unwrap();
    // An operator's PKI: a root (kept offline) and the cluster's intermediate CA.
    let root = LocalCa::generate("Example Corp Root CA", None, None).unwrap();
    let root_issuer = rcgen::Issuer::from_ca_cert_pem(
        root.cert_pem(),
        rcgen::KeyPair::from_pem(&root.key_pem()).unwrap(),
    )
    .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Example cluster CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params.use_authority_key_identifier_extension = true;
    let intermediate = params.signed_by(&key, &root_issuer).unwrap();
    let cacerts = |ns: &str, ca_key: String| Secret {
        metadata: ObjectMeta {
            name: Some("cacerts".into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            (
                "ca-cert.pem".into(),
                ByteString(intermediate.pem().into_bytes()),
            ),
            ("ca-key.pem".into(), ByteString(ca_key.into_bytes())),
            (
                "cert-chain.pem".into(),
                ByteString((intermediate.pem() + root.cert_pem()).into_bytes()),
            ),
            (
                "root-cert.pem".into(),
                ByteString(root.cert_pem().as_bytes().to_vec()),
            ),
        ])),
        ..Default::default()
    };
    let client = env.client().unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &cacerts(&ns, key.serialize_pem()))
        .await
        .unwrap();

    let ca = MeshCa::load(Some(&client), kube_ca(&ns)).await.unwrap();
    assert_eq!(
        ca.mesh_identity().signing_root_sha256,
        sha256_hex(root.cert_der())
    );
    let served = serve(ca, ProxyAuth::token_review(client.clone(), "meshctl")).await;
    let id_a = format!("spiffe://cluster.local/ns/{ns}/sa/a");
    let token_a = token(env, &ns, "a", &[]).await;
    let (status, text) = post(
        served.addr,
        &served.ca_pem,
        Some(&token_a),
        request(&csr(&[])),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let issued: IssuedCertificate = serde_json::from_str(&text).unwrap();
    // Leaf + the intermediate; the bundle is the operator's root and nothing else.
    let chain = pem_certs(&issued.cert_chain_pem);
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], *intermediate.der());
    assert_eq!(issued.trust_bundle_pem, root.cert_pem());
    assert_eq!(
        verify_workload_chain(&issued.cert_chain_pem, root.cert_pem()).unwrap(),
        [id_a]
    );
    assert_eq!(
        secret_text(env, &ns, MESH_CA_SECRET, "root-cert.pem").await,
        None,
        "no root of our own is made when an operator's CA is there"
    );

    // A cacerts whose key is not the certificate's stops the control plane, naming it.
    let broken_ns = env.create_namespace("ca-plugin-bad").await.unwrap();
    Api::<Secret>::namespaced(client.clone(), &broken_ns)
        .create(
            &PostParams::default(),
            &cacerts(
                &broken_ns,
                rcgen::KeyPair::generate().unwrap().serialize_pem(),
            ),
        )
        .await
        .unwrap();
    let e = MeshCa::load(Some(&client), kube_ca(&broken_ns))
        .await
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains(&format!("Secret {broken_ns}/cacerts key ca-key.pem"))
            && e.contains("does not match"),
        "{e}"
    );
}
