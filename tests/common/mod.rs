//! Shared test helpers: a webhook over real HTTPS on 127.0.0.1:0, and a small client.
#![allow(dead_code)]

pub mod silent;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::Request;
use meshctl::inject::InjectionConfig;
use meshctl::webhook::tls::CertStore;
use meshctl::webhook::{self, AppState, Limits, NamespaceLookup};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Every namespace is labelled `mesh-injection=enabled`.
pub struct AllEnabled;

impl NamespaceLookup for AllEnabled {
    fn labels(&self, _ns: &str) -> Option<BTreeMap<String, String>> {
        Some([("mesh-injection".to_string(), "enabled".to_string())].into())
    }
}

pub struct Cert {
    pub cert_pem: String,
    pub key_pem: String,
    /// The CA that signed the certificate: what clients trust.
    pub der: Vec<u8>,
    /// The serving certificate itself.
    pub leaf_der: Vec<u8>,
}

pub fn gen_cert() -> Cert {
    let tls = mesh_tls::ca::serving_certificate(&mesh_tls::ca::ServingSpec {
        ca_name: "webhook test CA",
        ca_path_len: Some(0),
        common_name: "localhost",
        sans: &["localhost".to_string()],
        validity: None,
    })
    .unwrap();
    let leaf_der = rustls::pki_types::pem::PemObject::from_pem_slice(tls.cert_pem.as_bytes())
        .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
        .unwrap();
    Cert {
        cert_pem: tls.cert_pem,
        key_pem: tls.key_pem,
        der: tls.ca_der.to_vec(),
        leaf_der,
    }
}

pub struct Server {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    pub certs: Arc<CertStore>,
    pub cert: Cert,
    pub dir: tempfile::TempDir,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

pub async fn start(cfg: InjectionConfig, ns: Arc<dyn NamespaceLookup>, limits: Limits) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let cert = gen_cert();
    let cert_path = dir.path().join("tls.crt");
    let key_path = dir.path().join("tls.key");
    std::fs::write(&cert_path, &cert.cert_pem).unwrap();
    std::fs::write(&key_path, &cert.key_pem).unwrap();
    let certs = CertStore::load(&cert_path, &key_path).unwrap();
    let state = AppState::new(cfg, ns, limits);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(webhook::serve(
        listener,
        certs.clone(),
        state.clone(),
        async {
            let _ = rx.await;
        },
    ));
    Server {
        addr,
        state,
        certs,
        cert,
        dir,
        cert_path,
        key_path,
        _shutdown: tx,
    }
}

pub fn client_config(ca_der: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.to_vec().into()).unwrap();
    let provider = mesh_tls::provider();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

pub async fn tls_connect(addr: SocketAddr, ca_der: &[u8]) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    TlsConnector::from(client_config(ca_der))
        .connect(name, tcp)
        .await
}

/// A keep-alive HTTP/1 connection over TLS.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<bytes::Bytes>>,
    addr: SocketAddr,
}

impl Client {
    pub async fn connect(addr: SocketAddr, ca_der: &[u8]) -> Client {
        let tls = tls_connect(addr, ca_der).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        Client { sender, addr }
    }

    pub async fn request(&mut self, method: &str, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
        self.sender.ready().await.unwrap();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("localhost:{}", self.addr.port()))
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, body)
    }

    pub async fn post(&mut self, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
        self.request("POST", path, body).await
    }

    pub async fn get(&mut self, path: &str) -> (u16, Vec<u8>) {
        self.request("GET", path, Vec::new()).await
    }
}

/// An AdmissionReview for a Pod CREATE.
pub fn review_for(pod: &serde_json::Value, namespace: &str, uid: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod.pointer("/metadata/name").and_then(|v| v.as_str()).unwrap_or(""),
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

/// Decode the response; returns (allowed, patch ops if any).
pub fn decode_response(body: &[u8], uid: &str) -> (bool, Option<json_patch::Patch>) {
    use base64::Engine as _;
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1", "{v}");
    assert_eq!(v["kind"], "AdmissionReview");
    let r = &v["response"];
    assert_eq!(r["uid"], uid, "uid echoed");
    let allowed = r["allowed"].as_bool().unwrap();
    let patch = r.get("patch").and_then(|p| p.as_str()).map(|p| {
        assert_eq!(r["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD.decode(p).unwrap();
        serde_json::from_slice::<json_patch::Patch>(&bytes).unwrap()
    });
    (allowed, patch)
}
