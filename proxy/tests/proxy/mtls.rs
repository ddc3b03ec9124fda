//! Mutual TLS between two proxies over real sockets: proxy A originates it to a meshed
//! endpoint (proxy B's explicit inbound listener), B terminates it, and the app behind B learns
//! who called from `X-Forwarded-Client-Cert`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proxy::testing::{EchoServer, TestClient, raw_exchange};
use mesh_proxy::{Proxy, ProxyHandle, ProxyOptions};
use mesh_tls::WorkloadCertificates;
use mesh_tls::ca::CertificateAuthority;
use mesh_tls::issuer::InProcessIssuer;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{config, forward, options};

const A: &str = "spiffe://cluster.local/ns/shop/sa/web";
const B: &str = "spiffe://cluster.local/ns/shop/sa/api";

async fn certs(ca: &Arc<Mutex<CertificateAuthority>>, id: &str) -> Arc<WorkloadCertificates> {
    mesh_tls::install_default();
    let certs = WorkloadCertificates::new(None);
    let issuer = InProcessIssuer::new(ca.clone(), id, Duration::from_secs(3600));
    certs.renew_once(&issuer).await.expect("issued");
    certs
}

async fn start(
    v: serde_json::Value,
    certs: Arc<WorkloadCertificates>,
) -> (ProxyHandle, SocketAddr) {
    let proxy = Proxy::start(
        config(v),
        ProxyOptions {
            identity: Some(certs),
            ..options()
        },
    )
    .await
    .expect("proxy starts");
    let addr = proxy.listeners().await[0].address;
    (proxy, addr)
}

/// B: a listener taking mutual TLS in `mode`, in front of `app`.
fn server_config(app: &str, mode: &str) -> serde_json::Value {
    json!({
        "listeners": [{"name": "inbound", "port": 0, "mtls": {"mode": mode},
            "virtualHosts": [{"name": "any", "hostnames": ["*"],
                "routes": [forward("app", json!({}), "app")]}]}],
        "backends": [{"name": "app", "endpoints": [app]}],
    })
}

/// A: a plain listener whose backend is B, meshed as `expected`.
fn client_config(b: SocketAddr, expected: &str) -> serde_json::Value {
    json!({
        "listeners": [{"name": "outbound", "port": 0,
            "virtualHosts": [{"name": "any", "hostnames": ["*"],
                "routes": [forward("to-b", json!({}), "b")]}]}],
        "backends": [{"name": "b", "endpoints": [b.to_string()],
            "mtlsIdentities": {b.to_string(): expected}}],
    })
}

struct Pair {
    app: EchoServer,
    a: SocketAddr,
    b: SocketAddr,
    _proxies: (ProxyHandle, ProxyHandle),
    b_metrics: Arc<mesh_proxy::metrics::Metrics>,
}

async fn pair(mode: &str, expected: &str) -> Pair {
    let ca = Arc::new(Mutex::new(CertificateAuthority::generate_root().unwrap()));
    let app = EchoServer::start("app").await;
    let b_metrics = Arc::new(mesh_proxy::metrics::Metrics::new());
    let b_proxy = Proxy::start(
        config(server_config(&app.endpoint(), mode)),
        ProxyOptions {
            identity: Some(certs(&ca, B).await),
            metrics: Some(b_metrics.clone()),
            ..options()
        },
    )
    .await
    .unwrap();
    let b = b_proxy.listeners().await[0].address;
    let (a_proxy, a) = start(client_config(b, expected), certs(&ca, A).await).await;
    Pair {
        app,
        a,
        b,
        _proxies: (a_proxy, b_proxy),
        b_metrics,
    }
}

#[tokio::test]
async fn the_app_learns_the_callers_identity_and_a_made_up_one_is_dropped() {
    let p = pair("STRICT", B).await;
    let r = TestClient::http1()
        .get(
            &format!("http://{}/orders", p.a),
            &[(
                "x-forwarded-client-cert",
                "URI=spiffe://cluster.local/ns/x/sa/admin",
            )],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let echo = r.echo();
    let xfcc = echo.header("x-forwarded-client-cert").expect("XFCC set");
    assert!(
        xfcc.starts_with(&format!("By={B};Hash="))
            && xfcc.ends_with(&format!(";Subject=\"\";URI={A}")),
        "{xfcc}"
    );
    assert!(
        !xfcc.contains("admin"),
        "the client's own value reached the app: {xfcc}"
    );
    assert_eq!(echo.headers["x-forwarded-client-cert"].len(), 1);
    let metrics = p.b_metrics.encode();
    assert!(
        metrics.contains(&format!(
            "mesh_mtls_requests_total{{listener=\"inbound\",source_principal=\"{A}\"}} 1"
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn strict_refuses_plaintext_and_permissive_serves_it_without_an_identity() {
    let strict = pair("STRICT", B).await;
    let answer = raw_exchange(
        strict.b,
        b"GET / HTTP/1.1\r\nhost: b\r\nx-forwarded-client-cert: URI=spiffe://forged\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(answer, "", "STRICT answered a plaintext client");
    assert!(strict.app.requests().is_empty(), "the app was reached");
    assert!(
        strict
            .b_metrics
            .encode()
            .contains("mesh_mtls_connections_total{listener=\"inbound\",result=\"refused\"} 1")
    );

    let permissive = pair("PERMISSIVE", B).await;
    let r = TestClient::http1()
        .get(
            &format!("http://{}/", permissive.b),
            &[("x-forwarded-client-cert", "URI=spiffe://forged")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().header("x-forwarded-client-cert"), None);
    // ...and a meshed client still gets mutual TLS.
    let r = TestClient::http1()
        .get(&format!("http://{}/", permissive.a), &[])
        .await
        .unwrap();
    assert!(
        r.echo()
            .header("x-forwarded-client-cert")
            .is_some_and(|x| x.ends_with(A))
    );
}

#[tokio::test]
async fn a_server_with_an_unexpected_identity_is_refused_by_the_client() {
    let p = pair("STRICT", "spiffe://cluster.local/ns/shop/sa/payments").await;
    let r = TestClient::http1()
        .get(&format!("http://{}/", p.a), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(p.app.requests().is_empty(), "the app was reached");
}

/// Relays bytes between A and B, keeping a copy of what went each way.
async fn tap(to: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((down, _)) = l.accept().await {
            let up = TcpStream::connect(to).await.unwrap();
            let (dr, dw) = down.into_split();
            let (ur, uw) = up.into_split();
            tokio::spawn(pump(dr, uw, seen2.clone()));
            tokio::spawn(pump(ur, dw, seen2.clone()));
        }
    });
    (addr, seen)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    seen: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = [0u8; 4096];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

#[tokio::test]
async fn nothing_of_the_request_crosses_the_wire_in_plaintext() {
    let ca = Arc::new(Mutex::new(CertificateAuthority::generate_root().unwrap()));
    let app = EchoServer::start("app").await;
    let (_b, b) = start(
        server_config(&app.endpoint(), "STRICT"),
        certs(&ca, B).await,
    )
    .await;
    let (tapped, seen) = tap(b).await;
    let (_a, a) = start(client_config(tapped, B), certs(&ca, A).await).await;
    for client in [TestClient::http1(), TestClient::http2()] {
        let r = client
            .get(
                &format!("http://{a}/secret-path?q=1"),
                &[("x-secret-header", "hunter2")],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.echo().header("x-secret-header"), Some("hunter2"));
    }
    let wire = seen.lock().unwrap().clone();
    assert!(wire.len() > 1000, "the tap saw {} bytes", wire.len());
    let text = String::from_utf8_lossy(&wire);
    for needle in [
        "secret-path",
        "hunter2",
        "HTTP/1.1",
        "x-secret-header",
        "\"name\":\"app\"",
    ] {
        assert!(
            !text.contains(needle),
            "{needle:?} crossed the wire in plaintext"
        );
    }
}

#[tokio::test]
async fn http2_backends_get_mutual_tls_too() {
    let ca = Arc::new(Mutex::new(CertificateAuthority::generate_root().unwrap()));
    let app = EchoServer::start("app").await;
    let (_b, b) = start(
        server_config(&app.endpoint(), "STRICT"),
        certs(&ca, B).await,
    )
    .await;
    let mut a_config = client_config(b, B);
    a_config["backends"][0]["protocol"] = json!("http2");
    let (_a, a) = start(a_config, certs(&ca, A).await).await;
    let r = TestClient::http1()
        .get(&format!("http://{a}/h2"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.echo()
            .header("x-forwarded-client-cert")
            .is_some_and(|x| x.ends_with(A))
    );
}
