//! Test helpers (feature `testing`): backends that report what they saw, misbehaving
//! backends, and a small HTTP client. Everything listens on 127.0.0.1 with an ephemeral port.
//!
//! The echo backend ([`EchoServer`]) answers every request with a JSON body
//! ([`EchoReply`]) naming itself and describing the request it received, plus the header
//! `x-echo-name`. Request headers steer it:
//!
//! | header | effect |
//! |---|---|
//! | `x-echo-delay-ms: N` | wait N ms before answering |
//! | `x-echo-status: N` | answer with status N |
//! | `x-echo-chunks: N` | answer with N chunks (`chunk 0\n`…) streamed without length (chunked) |
//! | `x-echo-stream: 1` | stream the request body back as the response body, frame by frame |
//! | `x-echo-hop: 1` | add hop-by-hop response headers (`keep-alive`, `x-private` named by `connection`) |
//!
//! An `Upgrade` request gets `101 Switching Protocols` and then every byte echoed back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::body::{BoxError, ProxyBody, boxed, full};

/// What the echo backend saw, as it reports it in its JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoReply {
    pub name: String,
    pub method: String,
    /// Path and query as received.
    pub path: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Lowercase names, values in order.
    pub headers: std::collections::BTreeMap<String, Vec<String>>,
    pub body: String,
}

impl EchoReply {
    /// The first value of a header the backend saw.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

/// A request as the echo backend received it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: http::Method,
    pub path: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, Clone, Default)]
pub struct EchoOptions {
    /// Delay before every response (a slow backend).
    pub delay: Duration,
}

/// An HTTP/1.1 + h2c echo backend on 127.0.0.1. Stops when dropped.
pub struct EchoServer {
    pub name: String,
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    connections: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl EchoServer {
    pub async fn start(name: &str) -> EchoServer {
        EchoServer::start_with(name, EchoOptions::default()).await
    }

    /// A backend that waits `delay` before every response.
    pub async fn slow(name: &str, delay: Duration) -> EchoServer {
        EchoServer::start_with(name, EchoOptions { delay }).await
    }

    pub async fn start_with(name: &str, options: EchoOptions) -> EchoServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = listener.local_addr().expect("echo addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (n, s, c, st) = (
            Arc::<str>::from(name),
            seen.clone(),
            connections.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = st.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (n, s, o, st) = (n.clone(), s.clone(), options.clone(), st.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| echo(n.clone(), s.clone(), o.clone(), req));
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = st.cancelled() => {}
                    }
                });
            }
        });
        EchoServer {
            name: name.to_string(),
            addr,
            seen,
            connections,
            stop,
        }
    }

    /// `127.0.0.1:PORT`, for a backend's `endpoints`.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn header_num(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.parse().ok()
}

async fn echo(
    name: Arc<str>,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    options: EchoOptions,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let delay = header_num(req.headers(), "x-echo-delay-ms")
        .map(Duration::from_millis)
        .unwrap_or(options.delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());

    if req.headers().contains_key(http::header::UPGRADE) {
        let proto = req.headers()[http::header::UPGRADE].clone();
        seen.lock().unwrap().push(SeenRequest {
            method: req.method().clone(),
            path,
            version: req.version(),
            headers: req.headers().clone(),
            body: Bytes::new(),
        });
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 4096];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if io.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        });
        let mut resp = Response::new(crate::body::empty());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut().insert(http::header::UPGRADE, proto);
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        resp.headers_mut()
            .insert("x-echo-name", name.as_ref().parse().unwrap());
        return Ok(resp);
    }

    let status = header_num(req.headers(), "x-echo-status")
        .and_then(|s| StatusCode::from_u16(s as u16).ok())
        .unwrap_or(StatusCode::OK);
    let chunks = header_num(req.headers(), "x-echo-chunks");
    let stream_back = req.headers().contains_key("x-echo-stream");
    let hop = req.headers().contains_key("x-echo-hop");

    let mut resp = if stream_back {
        seen.lock().unwrap().push(SeenRequest {
            method: req.method().clone(),
            path,
            version: req.version(),
            headers: req.headers().clone(),
            body: Bytes::new(),
        });
        Response::new(boxed(req.into_body()))
    } else {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        seen.lock().unwrap().push(SeenRequest {
            method: parts.method.clone(),
            path: path.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body: body.clone(),
        });
        match chunks {
            Some(n) => {
                let stream =
                    futures::stream::iter((0..n).map(|i| {
                        Ok::<_, BoxError>(Frame::data(Bytes::from(format!("chunk {i}\n"))))
                    }));
                Response::new(StreamBody::new(stream).boxed())
            }
            None => {
                let mut headers = std::collections::BTreeMap::<String, Vec<String>>::new();
                for (k, v) in &parts.headers {
                    headers
                        .entry(k.as_str().to_string())
                        .or_default()
                        .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
                }
                let reply = EchoReply {
                    name: name.to_string(),
                    method: parts.method.to_string(),
                    path,
                    version: format!("{:?}", parts.version),
                    headers,
                    body: String::from_utf8_lossy(&body).into_owned(),
                };
                let mut r = Response::new(full(serde_json::to_vec(&reply).unwrap()));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                r
            }
        }
    };
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("x-echo-name", name.as_ref().parse().unwrap());
    if hop {
        let h = resp.headers_mut();
        h.insert("keep-alive", http::HeaderValue::from_static("timeout=5"));
        h.insert("connection", http::HeaderValue::from_static("x-private"));
        h.insert("x-private", http::HeaderValue::from_static("secret"));
    }
    Ok(resp)
}

/// A TCP port that accepts, reads the request and resets the connection (RST) without an
/// answer: the proxy must answer 502.
pub struct ResetServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for ResetServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl ResetServer {
    pub async fn start() -> ResetServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind reset");
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let st = stop.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = tokio::select! {
                    _ = st.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream.set_zero_linger();
                    drop(stream);
                });
            }
        });
        ResetServer { addr, stop }
    }

    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }
}

/// A 127.0.0.1 port nothing listens on (connections are refused).
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A response read whole.
#[derive(Debug, Clone)]
pub struct TestResponse {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The echo backend's report (panics if the body is not one).
    pub fn echo(&self) -> EchoReply {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not an echo reply ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A pooled HTTP client (HTTP/1.1 keep-alive, or h2c with `http2`).
#[derive(Clone)]
pub struct TestClient {
    client: Client<HttpConnector, ProxyBody>,
}

impl TestClient {
    pub fn http1() -> TestClient {
        TestClient {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn http2() -> TestClient {
        TestClient {
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }

    /// `GET url` with extra headers.
    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Result<TestResponse, BoxError> {
        let mut b = Request::get(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(crate::body::empty())?).await
    }

    /// Sends a request and reads the whole response.
    pub async fn send(&self, req: Request<ProxyBody>) -> Result<TestResponse, BoxError> {
        let resp = self.client.request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(TestResponse {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }
}

/// `GET url` on a fresh connection.
pub async fn get(url: &str) -> Result<TestResponse, BoxError> {
    TestClient::http1().get(url, &[]).await
}

/// A body from a whole buffer.
pub fn body(b: impl Into<Bytes>) -> ProxyBody {
    Full::new(b.into()).map_err(|n| match n {}).boxed()
}

/// Writes raw bytes on a new connection and reads until the peer closes or `timeout` passes
/// without data; returns everything read.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], timeout: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(timeout, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
