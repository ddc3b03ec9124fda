//! App health through the proxy (port 15020): once a pod's inbound is mutual TLS, the
//! kubelet's plaintext probes to the app would be refused, so injection rewrites them to
//! `GET /app-health/<container>/<livez|readyz|startupz>` on this server and hands the original
//! probes to the proxy as JSON ([`mesh_wire::app_probe`], in `MESH_KUBE_APP_PROBERS`). Each
//! request runs the original probe against the app on loopback, as the kubelet would have,
//! within the probe's `timeoutSeconds`:
//!
//! | original | what the proxy does | answer |
//! |---|---|---|
//! | `httpGet` | GET the original path with the original headers (HTTPS without verifying the certificate, as the kubelet does); same-host redirects are followed (at most 10), a redirect elsewhere is answered as it is, without its `Location` | the app's status code and at most 10 KiB of its body |
//! | `tcpSocket` | connect | 200, or 503 |
//! | `grpc` | `grpc.health.v1.Health/Check` with the service name over h2c | 200 when `SERVING`, else 503 |
//!
//! An app that refuses, resets, or does not answer in time gets 503 (the kubelet counts
//! anything outside 200–399 as a failure). An unknown path gets 404, a method other than
//! GET/HEAD 405. The server takes one request per connection, at most
//! [`MAX_CONNECTIONS`] at a time (the kernel backlog holds the rest), and every connection has
//! a deadline, so a client cannot make it hold sockets or run probes without bound.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{
    ACCEPT, CONNECTION, CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue, LOCATION,
    USER_AGENT,
};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_wire::app_probe::{self, AppProbers, Prober, ProbersError, Scheme};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// At most this much of an app's response body is read (the kubelet's own limit) and passed
/// on; the rest is not read.
pub const BODY_CAP: usize = 10 * 1024;
/// Redirects followed on the same host (the kubelet's limit); one more is a failure.
pub const MAX_REDIRECTS: usize = 10;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The kubelet's User-Agent, when the prober's request has none (`kube-probe/<version>`).
const DEFAULT_USER_AGENT: &str = "kube-probe/1";
const GRPC_HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
/// `grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING`.
const GRPC_SERVING: u64 = 1;

/// What is wrong with the probers the proxy was given, naming the entry.
#[derive(Debug, thiserror::Error)]
pub enum AppHealthError {
    #[error(transparent)]
    Probers(#[from] ProbersError),
    #[error("TLS client for HTTPS probes: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{path:?}: {field}: {message}")]
    Invalid {
        path: String,
        field: &'static str,
        message: String,
    },
}

/// The probers, checked and ready to run. Share as `Arc<AppHealth>`.
#[derive(Debug)]
pub struct AppHealth {
    probes: HashMap<String, Probe>,
    /// Where the app is reached (loopback: captured by no nat rule).
    app: IpAddr,
    /// Host names a redirect may point at and still be this pod: the app address and the
    /// pod's IP (what the kubelet's URL would have carried).
    local_hosts: Vec<String>,
    tls: Arc<rustls::ClientConfig>,
}

#[derive(Debug)]
struct Probe {
    action: Action,
    timeout: Duration,
}

#[derive(Debug)]
enum Action {
    Http(HttpProbe),
    Tcp(u16),
    Grpc { port: u16, service: String },
}

#[derive(Debug)]
struct HttpProbe {
    port: u16,
    https: bool,
    /// Path and query, starting with `/`.
    target: String,
    headers: HeaderMap,
}

/// The answer to one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    fn new(status: StatusCode, body: impl Into<Bytes>) -> Answer {
        Answer {
            status,
            body: body.into(),
        }
    }

    fn failed(why: impl std::fmt::Display) -> Answer {
        Answer::new(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
    }
}

impl AppHealth {
    /// Check `probers` and prepare them to run against the app at `app` (normally
    /// 127.0.0.1); `pod_ip`, when known, counts as the same host for redirects.
    pub fn new(
        probers: &AppProbers,
        app: IpAddr,
        pod_ip: Option<IpAddr>,
    ) -> Result<AppHealth, AppHealthError> {
        app_probe::validate(probers)?;
        let mut probes = HashMap::with_capacity(probers.len());
        for (path, p) in probers {
            probes.insert(path.clone(), compile(path, p)?);
        }
        let mut local_hosts = vec![app.to_string(), "localhost".to_owned()];
        local_hosts.extend(pod_ip.map(|ip| ip.to_string()));
        Ok(AppHealth {
            probes,
            app,
            local_hosts,
            tls: Arc::new(tls_config()?),
        })
    }

    /// From the JSON of `MESH_KUBE_APP_PROBERS`.
    pub fn from_json(
        text: &str,
        app: IpAddr,
        pod_ip: Option<IpAddr>,
    ) -> Result<AppHealth, AppHealthError> {
        AppHealth::new(&app_probe::parse(text)?, app, pod_ip)
    }

    pub fn is_empty(&self) -> bool {
        self.probes.is_empty()
    }

    /// The longest time a probe may take.
    fn longest_timeout(&self) -> Duration {
        self.probes
            .values()
            .map(|p| p.timeout)
            .max()
            .unwrap_or_default()
    }

    /// Runs the probe at `path`; `None` when there is none. `user_agent` is the prober's (the
    /// kubelet's), passed on to HTTP probes unless the probe sets its own.
    pub async fn probe(&self, path: &str, user_agent: Option<&HeaderValue>) -> Option<Answer> {
        let probe = self.probes.get(path)?;
        let run = async {
            match &probe.action {
                Action::Http(h) => self.http(h, user_agent).await,
                Action::Tcp(port) => match TcpStream::connect((self.app, *port)).await {
                    Ok(_) => Answer::new(StatusCode::OK, "ok\n"),
                    Err(e) => Answer::failed(format!("tcp {}:{port}: {e}", self.app)),
                },
                Action::Grpc { port, service } => self.grpc(*port, service, user_agent).await,
            }
        };
        let answer = match tokio::time::timeout(probe.timeout, run).await {
            Ok(a) => a,
            Err(_) => Answer::failed(format!("the app did not answer within {:?}", probe.timeout)),
        };
        tracing::debug!(path, status = answer.status.as_u16(), "app probe");
        Some(answer)
    }

    async fn http(&self, probe: &HttpProbe, user_agent: Option<&HeaderValue>) -> Answer {
        let (mut port, mut https, mut target) = (probe.port, probe.https, probe.target.clone());
        for _ in 0..=MAX_REDIRECTS {
            let mut headers = probe.headers.clone();
            if !headers.contains_key(USER_AGENT) {
                let ua = user_agent
                    .cloned()
                    .unwrap_or(HeaderValue::from_static(DEFAULT_USER_AGENT));
                headers.insert(USER_AGENT, ua);
            }
            let (status, location, body) = match self.http_once(port, https, &target, headers).await
            {
                Ok(r) => r,
                Err(e) => {
                    let scheme = if https { "https" } else { "http" };
                    return Answer::failed(format!("{scheme}://{}:{port}{target}: {e}", self.app));
                }
            };
            if status.is_redirection()
                && let Some(next) = location
                    .as_deref()
                    .and_then(|l| self.same_host(l, port, https, &target))
            {
                (port, https, target) = next;
                continue;
            }
            // Not followed: answered as it is (a redirect elsewhere counts as success to the
            // kubelet, as when it probes the app itself), without its Location so the
            // kubelet does not follow it either. Informational codes cannot be a final answer.
            if status.is_informational() {
                return Answer::failed(format!("the app answered {status}"));
            }
            return Answer::new(status, body);
        }
        Answer::failed(format!("stopped after {MAX_REDIRECTS} redirects"))
    }

    /// One GET: the status, the `Location`, and at most [`BODY_CAP`] bytes of the body.
    async fn http_once(
        &self,
        port: u16,
        https: bool,
        target: &str,
        mut headers: HeaderMap,
    ) -> Result<(StatusCode, Option<String>, Bytes), String> {
        let tcp = TcpStream::connect((self.app, port))
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        if !headers.contains_key(HOST) {
            let host = match self.app {
                IpAddr::V6(ip) => format!("[{ip}]:{port}"),
                IpAddr::V4(ip) => format!("{ip}:{port}"),
            };
            headers.insert(
                HOST,
                HeaderValue::try_from(host).map_err(|e| e.to_string())?,
            );
        }
        let mut req = Request::get(target)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        *req.headers_mut() = headers;
        if https {
            let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
            let tls = connector
                .connect(ServerName::IpAddress(self.app.into()), tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            http1_get(tls, req).await
        } else {
            http1_get(tcp, req).await
        }
    }

    /// Where a redirect leads if it stays on this pod: `(port, https, target)`.
    fn same_host(
        &self,
        location: &str,
        port: u16,
        https: bool,
        current: &str,
    ) -> Option<(u16, bool, String)> {
        if location.starts_with('/') && !location.starts_with("//") {
            return Some((port, https, location.to_owned()));
        }
        let absolute = if let Some(rest) = location.strip_prefix("//") {
            // Network-path reference: the current scheme.
            format!("{}://{rest}", if https { "https" } else { "http" })
        } else if has_scheme(location) {
            location.to_owned()
        } else {
            // Relative to the current path's directory.
            let dir = current.split('?').next().unwrap_or("/");
            let dir = &dir[..=dir.rfind('/').unwrap_or(0)];
            return Some((port, https, format!("{dir}{location}")));
        };
        let uri: Uri = absolute.parse().ok()?;
        let authority = uri.authority()?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return None,
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if !self
            .local_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host))
        {
            return None;
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let target = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        Some((port, https, target))
    }

    async fn grpc(&self, port: u16, service: &str, user_agent: Option<&HeaderValue>) -> Answer {
        match self.grpc_check(port, service, user_agent).await {
            Ok(GRPC_SERVING) => Answer::new(StatusCode::OK, "SERVING\n"),
            Ok(status) => Answer::failed(format!(
                "grpc health {:?}: {}",
                service,
                grpc_status_name(status)
            )),
            Err(e) => Answer::failed(format!("grpc {}:{port}: {e}", self.app)),
        }
    }

    /// `grpc.health.v1.Health/Check` over h2c: the `ServingStatus` answered.
    async fn grpc_check(
        &self,
        port: u16,
        service: &str,
        user_agent: Option<&HeaderValue>,
    ) -> Result<u64, String> {
        let tcp = TcpStream::connect((self.app, port))
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        let authority = match self.app {
            IpAddr::V6(ip) => format!("[{ip}]:{port}"),
            IpAddr::V4(ip) => format!("{ip}:{port}"),
        };
        let req = Request::post(format!("http://{authority}{GRPC_HEALTH_CHECK}"))
            .header(CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .header(
                USER_AGENT,
                user_agent
                    .cloned()
                    .unwrap_or(HeaderValue::from_static(DEFAULT_USER_AGENT)),
            )
            .body(Full::new(grpc_frame(&health_check_request(service))))
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            if resp.status() != StatusCode::OK {
                return Err(format!("HTTP status {}", resp.status()));
            }
            // A trailers-only answer carries grpc-status in the headers.
            if let Some(s) = resp.headers().get("grpc-status") {
                check_grpc_status(s, resp.headers())?;
            }
            let (body, trailers) = read_capped(resp.into_body(), BODY_CAP).await?;
            match trailers.as_ref().and_then(|t| t.get("grpc-status")) {
                Some(s) => check_grpc_status(s, trailers.as_ref().unwrap_or(&HeaderMap::new()))?,
                None => return Err("no grpc-status in the answer".into()),
            }
            decode_health_response(&body)
        };
        drive(conn, exchange).await
    }
}

/// Whether a URI reference starts with a scheme (`http:`, `https:`, ...).
fn has_scheme(reference: &str) -> bool {
    match reference.find(':') {
        Some(i) => {
            let scheme = &reference[..i];
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        }
        None => false,
    }
}

/// Runs `exchange` while driving its connection; the connection ending first (the app
/// closing after it answered) is not an error of the exchange.
async fn drive<C, E, T>(
    conn: C,
    exchange: impl Future<Output = Result<T, String>>,
) -> Result<T, String>
where
    C: Future<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    tokio::pin!(exchange);
    let mut conn_done = false;
    loop {
        tokio::select! {
            r = &mut exchange => return r,
            _ = &mut conn, if !conn_done => conn_done = true,
        }
    }
}

async fn http1_get<S>(
    io: S,
    req: Request<Empty<Bytes>>,
) -> Result<(StatusCode, Option<String>, Bytes), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(str::to_owned);
        // A body that fails or ends early after the head was received does not change the
        // answer: the kubelet judges by the status code.
        let body = read_capped(resp.into_body(), BODY_CAP)
            .await
            .map(|(b, _)| b)
            .unwrap_or_default();
        Ok((status, location, body))
    };
    drive(conn, exchange).await
}

/// At most `cap` bytes of `body` (the rest is not read) and its trailers.
async fn read_capped(mut body: Incoming, cap: usize) -> Result<(Bytes, Option<HeaderMap>), String> {
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        match frame.into_data() {
            Ok(data) => {
                let room = cap - out.len();
                out.extend_from_slice(&data[..data.len().min(room)]);
                if out.len() >= cap {
                    return Ok((out.freeze(), None));
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    return Ok((out.freeze(), Some(t)));
                }
            }
        }
    }
    Ok((out.freeze(), None))
}

fn check_grpc_status(status: &HeaderValue, headers: &HeaderMap) -> Result<(), String> {
    if status.as_bytes() == b"0" {
        return Ok(());
    }
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or("");
    Err(format!(
        "grpc-status {} {message}",
        String::from_utf8_lossy(status.as_bytes())
    )
    .trim_end()
    .to_owned())
}

/// `HealthCheckRequest { string service = 1; }`.
fn health_check_request(service: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(service.len() + 6);
    if !service.is_empty() {
        m.push(0x0a); // field 1, length-delimited
        put_varint(&mut m, service.len() as u64);
        m.extend_from_slice(service.as_bytes());
    }
    m
}

/// A gRPC message frame: uncompressed flag, big-endian length, message.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut f = Vec::with_capacity(5 + message.len());
    f.push(0);
    f.extend_from_slice(&(message.len() as u32).to_be_bytes());
    f.extend_from_slice(message);
    f.into()
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The `status` of a framed `HealthCheckResponse { ServingStatus status = 1; }` (absent: 0,
/// `UNKNOWN`).
fn decode_health_response(body: &[u8]) -> Result<u64, String> {
    let bad = |what: &str| Err(format!("malformed health response: {what}"));
    if body.len() < 5 {
        return bad("no message");
    }
    if body[0] != 0 {
        return bad("compressed message");
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let Some(mut m) = body.get(5..5 + len) else {
        return bad("truncated message");
    };
    let mut status = 0;
    while !m.is_empty() {
        let Some(tag) = get_varint(&mut m) else {
            return bad("truncated field");
        };
        match (tag >> 3, tag & 7) {
            (1, 0) => match get_varint(&mut m) {
                Some(v) => status = v,
                None => return bad("truncated status"),
            },
            (_, 0) => {
                if get_varint(&mut m).is_none() {
                    return bad("truncated field");
                }
            }
            (_, 1) => {
                m = m
                    .get(8..)
                    .ok_or("malformed health response: truncated field")?
            }
            (_, 5) => {
                m = m
                    .get(4..)
                    .ok_or("malformed health response: truncated field")?
            }
            (_, 2) => {
                let n = get_varint(&mut m).and_then(|n| usize::try_from(n).ok());
                match n.and_then(|n| m.get(n..)) {
                    Some(rest) => m = rest,
                    None => return bad("truncated field"),
                }
            }
            _ => return bad("unknown wire type"),
        }
    }
    Ok(status)
}

fn grpc_status_name(status: u64) -> String {
    match status {
        0 => "UNKNOWN".into(),
        1 => "SERVING".into(),
        2 => "NOT_SERVING".into(),
        3 => "SERVICE_UNKNOWN".into(),
        n => format!("status {n}"),
    }
}

fn compile(path: &str, p: &Prober) -> Result<Probe, AppHealthError> {
    let invalid = |field: &'static str, message: String| AppHealthError::Invalid {
        path: path.to_owned(),
        field,
        message,
    };
    let action = if let Some(h) = &p.http_get {
        let target = if h.path.starts_with('/') {
            h.path.clone()
        } else {
            format!("/{}", h.path)
        };
        target
            .parse::<http::uri::PathAndQuery>()
            .map_err(|e| invalid("httpGet.path", format!("{:?}: {e}", h.path)))?;
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
        let mut set = std::collections::HashSet::new();
        for x in &h.http_headers {
            let name = HeaderName::from_bytes(x.name.as_bytes()).map_err(|_| {
                invalid(
                    "httpGet.httpHeaders",
                    format!("{:?} is not a header name", x.name),
                )
            })?;
            let value = HeaderValue::from_str(&x.value).map_err(|_| {
                invalid(
                    "httpGet.httpHeaders",
                    format!("the value of {:?} is not a header value", x.name),
                )
            })?;
            // The probe's own headers replace the defaults; repeated ones are all sent.
            if set.insert(name.clone()) {
                headers.insert(name, value);
            } else {
                headers.append(name, value);
            }
        }
        Action::Http(HttpProbe {
            port: h.port,
            https: h.scheme == Some(Scheme::Https),
            target,
            headers,
        })
    } else if let Some(t) = &p.tcp_socket {
        Action::Tcp(t.port)
    } else if let Some(g) = &p.grpc {
        Action::Grpc {
            port: g.port,
            service: g.service.clone().unwrap_or_default(),
        }
    } else {
        // `validate` has checked there is one.
        return Err(invalid("", "no probe".into()));
    };
    Ok(Probe {
        action,
        timeout: p.timeout(),
    })
}

/// TLS to the app as the kubelet does it: the certificate is not verified (the app's
/// certificate names a Service or nothing; the connection never leaves the pod). Handshake
/// signatures are still checked with the mesh's crypto provider.
fn tls_config() -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = mesh_tls::provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The running server.
#[derive(Debug)]
pub struct AppHealthServer {
    /// The bound address (useful with port 0).
    pub address: SocketAddr,
    task: JoinHandle<()>,
}

impl AppHealthServer {
    /// Waits until the server stopped (after `shutdown` was cancelled).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

/// Binds `address` and serves `health` until `shutdown` is cancelled. Fails, naming the
/// address, if it cannot bind.
pub async fn start(
    address: SocketAddr,
    health: Arc<AppHealth>,
    shutdown: CancellationToken,
) -> io::Result<AppHealthServer> {
    let listener = TcpListener::bind(address).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("app-health server: cannot bind {address}: {e}"),
        )
    })?;
    let address = listener.local_addr()?;
    tracing::info!(server = "app-health", %address, probes = health.probes.len(), "listening");
    let task = tokio::spawn(serve(listener, health, shutdown));
    Ok(AppHealthServer { address, task })
}

async fn serve(listener: TcpListener, health: Arc<AppHealth>, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // A connection's whole life: its request, the longest probe, and a margin to answer.
    let deadline = HEADER_READ_TIMEOUT + health.longest_timeout() + Duration::from_secs(1);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        // Wait for a free slot before accepting: the kernel backlog holds the rest.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(server = "app-health", %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let health = health.clone();
        connections.spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(deadline, serve_connection(stream, health)).await;
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    // In-flight probes end within their deadline.
    while connections.join_next().await.is_some() {}
}

async fn serve_connection(stream: TcpStream, health: Arc<AppHealth>) {
    let service = service_fn(move |req: Request<Incoming>| {
        let health = health.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(&health, &req).await) }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(err) = result {
        tracing::debug!(server = "app-health", %err, "connection error");
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

async fn handle<B>(health: &AppHealth, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match health
        .probe(req.uri().path(), req.headers().get(USER_AGENT))
        .await
    {
        Some(answer) => {
            let mut resp = Response::new(Full::new(answer.body));
            *resp.status_mut() = answer.status;
            resp
        }
        None => text(StatusCode::NOT_FOUND, "no such app probe\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn health_messages_encode_and_decode() {
        assert_eq!(health_check_request(""), b"");
        assert_eq!(health_check_request("ab"), b"\x0a\x02ab");
        assert_eq!(&grpc_frame(b"\x0a\x02ab")[..], b"\0\0\0\0\x04\x0a\x02ab");
        assert_eq!(decode_health_response(b"\0\0\0\0\x02\x08\x01"), Ok(1));
        assert_eq!(decode_health_response(b"\0\0\0\0\x02\x08\x02"), Ok(2));
        // Empty message: UNKNOWN. Unknown fields are skipped.
        assert_eq!(decode_health_response(b"\0\0\0\0\0"), Ok(0));
        assert_eq!(
            decode_health_response(b"\0\0\0\0\x07\x12\x03abc\x08\x01"),
            Ok(1)
        );
        for bad in [
            &b""[..],
            b"\x01\0\0\0\x02\x08\x01",
            b"\0\0\0\0\x09\x08\x01",
            b"\0\0\0\0\x01\x08",
            b"\0\0\0\0\x02\x12\x05",
            b"\0\0\0\0\x01\x0b",
            b"\0\0\0\0\x0b\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        ] {
            assert!(decode_health_response(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn redirects_followed_only_on_this_pod() {
        let pod: IpAddr = "10.1.2.3".parse().unwrap();
        let h = AppHealth::new(
            &AppProbers::new(),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(pod),
        )
        .unwrap();
        let go = |l: &str| h.same_host(l, 8080, false, "/a/b?x=1");
        assert_eq!(go("/c"), Some((8080, false, "/c".into())));
        assert_eq!(go("c?d=1"), Some((8080, false, "/a/c?d=1".into())));
        assert_eq!(
            go("https://127.0.0.1:8443/s"),
            Some((8443, true, "/s".into()))
        );
        assert_eq!(go("http://10.1.2.3/"), Some((80, false, "/".into())));
        assert_eq!(go("http://localhost:9000"), Some((9000, false, "/".into())));
        assert_eq!(go("http://example.com/"), None);
        assert_eq!(go("//example.com/x"), None);
        assert_eq!(go("ftp://127.0.0.1/x"), None);
    }

    #[test]
    fn bad_probers_name_the_entry() {
        let app = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let e = AppHealth::from_json(
            r#"{"/app-health/a/livez": {"httpGet": {"port": 80, "httpHeaders": [{"name": "bad name", "value": "x"}]}}}"#,
            app,
            None,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"/app-health/a/livez\": httpGet.httpHeaders: \"bad name\" is not a header name"
        );
        let e = AppHealth::from_json(r#"{"/x": {"grpc": {"port": 0}}}"#, app, None).unwrap_err();
        assert_eq!(e.to_string(), "\"/x\": port 0 is not a valid port");
        let e = AppHealth::from_json("{", app, None).unwrap_err();
        assert!(e.to_string().starts_with("not a JSON map"), "{e}");
    }
}
