//! The config distribution client: how a proxy gets its config from the control plane
//! (`meshctl control-plane`). The protocol's messages and framing are the contract both sides
//! share, in `mesh-wire` ([`mesh_wire::distribution`]); the protocol is described in
//! `docs/config-distribution.md`.
//!
//! [`run_client`] is the proxy side: it connects, keeps the stream open, hands every snapshot
//! to the caller (who applies it and says whether it worked), and reconnects with exponential
//! backoff (tokio time) when the stream breaks. The caller keeps serving the last good config
//! meanwhile.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_config::ProxyConfig;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Who the proxy says it is (part of [`ClientOptions`]).
pub use mesh_wire::distribution::NodeIdentity;
use mesh_wire::distribution::{
    CONTENT_TYPE, ControlPlaneMessage, FrameDecoder, ProxyMessage, STREAM_PATH, encode,
};

/// Where and how a proxy connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `host:port` to connect to.
    pub address: String,
    /// Name the control plane's certificate must carry (default: the host of `address`).
    pub server_name: String,
    /// PEM CA bundle that verifies the control plane; read again on every connection.
    pub ca_file: PathBuf,
    /// A Kubernetes service-account token (the projected `MESH_TOKEN_PATH`), sent as
    /// `authorization: Bearer`; read again on every connection (the kubelet rotates it).
    pub token_file: Option<PathBuf>,
    pub node: NodeIdentity,
    /// First reconnect delay; doubles up to `max_backoff` (with ±20 % jitter).
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Sends HTTP/2 pings this often; a control plane that does not answer within the same
    /// time is considered gone.
    pub keepalive: Duration,
    /// The proxy's workload certificate, reported (identity and expiry) on the stream.
    pub identity: Option<Arc<mesh_tls::WorkloadCertificates>>,
}

impl ClientOptions {
    pub fn new(address: impl Into<String>, ca_file: PathBuf, node: NodeIdentity) -> Self {
        let address = address.into();
        let server_name = host_of(&address).to_string();
        ClientOptions {
            address,
            server_name,
            ca_file,
            token_file: None,
            node,
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            keepalive: Duration::from_secs(15),
            identity: None,
        }
    }
}

/// `host` of `host:port` / `[v6]:port`.
pub fn host_of(address: &str) -> &str {
    let host = match address.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => address,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A snapshot handed to the caller of [`run_client`], who answers on `reply` with `Ok(())`
/// once it serves the config, or the reason it was rejected.
#[derive(Debug)]
pub struct Update {
    pub version: String,
    pub config: ProxyConfig,
    pub reply: oneshot::Sender<Result<(), String>>,
}

/// Connection state changes, for logs and the caller.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Connect(String),
    #[error("control plane answered {0}: {1}")]
    Status(http::StatusCode, String),
    #[error("stream: {0}")]
    Stream(String),
    #[error("the control plane closed the stream")]
    Closed,
}

/// Keeps a stream to the control plane open until `shutdown`, reconnecting with backoff.
/// Returns when `shutdown` fires or the receiver of `updates` is gone.
pub async fn run_client(
    options: ClientOptions,
    updates: mpsc::Sender<Update>,
    shutdown: CancellationToken,
) {
    let mut delay = options.min_backoff;
    loop {
        let mut got_snapshot = false;
        let result = tokio::select! {
            r = stream_once(&options, &updates, &mut got_snapshot) => r,
            _ = shutdown.cancelled() => return,
        };
        if updates.is_closed() {
            return;
        }
        if got_snapshot {
            delay = options.min_backoff;
        }
        let jitter = 0.8 + fastrand::f64() * 0.4;
        let wait = delay.mul_f64(jitter);
        match result {
            Ok(()) => {}
            Err(e) => tracing::warn!(
                control_plane = %options.address,
                retry_in = ?wait,
                "config distribution: {e}; serving the last good config meanwhile"
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
        delay = (delay * 2).min(options.max_backoff);
    }
}

/// Connects once and returns the first snapshot (ACKed), or why the control plane would not
/// serve this proxy (`ClientError::Status` carries its status and reason). For checks and
/// tests; proxies use [`run_client`].
pub async fn first_snapshot(options: &ClientOptions) -> Result<ProxyConfig, ClientError> {
    let (tx, mut rx) = mpsc::channel::<Update>(1);
    let mut got = false;
    let stream = stream_once(options, &tx, &mut got);
    tokio::pin!(stream);
    tokio::select! {
        r = &mut stream => Err(r.err().unwrap_or(ClientError::Closed)),
        Some(update) = rx.recv() => {
            let _ = update.reply.send(Ok(()));
            Ok(update.config)
        }
    }
}

fn tls_config(ca_file: &PathBuf) -> Result<Arc<rustls::ClientConfig>, String> {
    let pem = std::fs::read(ca_file).map_err(|e| format!("{}: {e}", ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &*pem) {
        let cert = cert.map_err(|e| format!("{}: {e}", ca_file.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", ca_file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no CERTIFICATE block", ca_file.display()));
    }
    let provider = mesh_tls::provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

type RequestBody =
    StreamBody<futures::channel::mpsc::UnboundedReceiver<Result<Frame<Bytes>, Infallible>>>;

/// One connection: Ok(()) when the control plane ended the stream cleanly.
/// An HTTP/2 connection to the control plane over TLS, and the token to present on it.
struct Connection {
    sender: hyper::client::conn::http2::SendRequest<RequestBody>,
    token: Option<String>,
    _driver: AbortOnDrop,
}

impl Connection {
    /// `request` with the token as `authorization: Bearer`.
    fn authorize(
        &self,
        mut request: http::request::Builder,
    ) -> Result<http::request::Builder, ClientError> {
        if let Some(t) = &self.token {
            let value = http::HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                ClientError::Connect("the token has characters a header cannot carry".into())
            })?;
            request = request.header(http::header::AUTHORIZATION, value);
        }
        Ok(request)
    }
}

async fn connect(options: &ClientOptions) -> Result<Connection, ClientError> {
    let tls = tls_config(&options.ca_file).map_err(ClientError::Connect)?;
    let token = match &options.token_file {
        None => None,
        Some(path) => {
            let t = std::fs::read_to_string(path)
                .map_err(|e| ClientError::Connect(format!("token {}: {e}", path.display())))?;
            Some(t.trim().to_string())
        }
    };
    let server_name = rustls::pki_types::ServerName::try_from(options.server_name.clone())
        .map_err(|e| ClientError::Connect(format!("server name {:?}: {e}", options.server_name)))?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(&options.address),
    )
    .await
    .map_err(|_| ClientError::Connect(format!("connecting to {}: timed out", options.address)))?
    .map_err(|e| ClientError::Connect(format!("connecting to {}: {e}", options.address)))?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(tls).connect(server_name, tcp),
    )
    .await
    .map_err(|_| ClientError::Connect("TLS handshake timed out".into()))?
    .map_err(|e| ClientError::Connect(format!("TLS: {e}")))?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(options.keepalive)
        .keep_alive_timeout(options.keepalive)
        .keep_alive_while_idle(true)
        .adaptive_window(true)
        .handshake::<_, RequestBody>(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Connect(format!("HTTP/2: {e}")))?;
    let conn_task = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("config distribution connection: {e}");
        }
    });
    Ok(Connection {
        sender,
        token,
        _driver: AbortOnDrop(conn_task),
    })
}

/// The status and short text reason of a refusal.
async fn refusal(response: http::Response<hyper::body::Incoming>) -> ClientError {
    let status = response.status();
    // The control plane says why in a short text body.
    let why = tokio::time::timeout(Duration::from_secs(2), response.into_body().collect())
        .await
        .ok()
        .and_then(Result::ok)
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
        .unwrap_or_default();
    ClientError::Status(status, why)
}

/// Obtains workload certificates from the control plane's CA (`mesh_wire::certificate`), on
/// a connection of its own each time (a proxy renews about twice a day), with the same
/// address, CA and token as the config stream.
pub struct CertificateIssuer {
    options: ClientOptions,
}

impl CertificateIssuer {
    pub fn new(options: ClientOptions) -> CertificateIssuer {
        CertificateIssuer { options }
    }

    async fn issue_once(
        &self,
        request: mesh_wire::certificate::CertificateRequest,
    ) -> Result<mesh_wire::certificate::IssuedCertificate, ClientError> {
        use mesh_wire::certificate::CERTIFICATE_PATH;
        let mut conn = connect(&self.options).await?;
        let body = serde_json::to_vec(&request).expect("a request serializes");
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let _ = tx.unbounded_send(Ok(Frame::data(Bytes::from(body))));
        drop(tx);
        let request = conn
            .authorize(
                http::Request::post(format!(
                    "https://{}{CERTIFICATE_PATH}",
                    self.options.server_name
                ))
                .header(http::header::CONTENT_TYPE, "application/json"),
            )?
            .body(StreamBody::new(rx))
            .expect("valid request");
        let response =
            tokio::time::timeout(Duration::from_secs(30), conn.sender.send_request(request))
                .await
                .map_err(|_| ClientError::Stream("no answer within 30s".into()))?
                .map_err(|e| ClientError::Stream(e.to_string()))?;
        if response.status() != http::StatusCode::OK {
            return Err(refusal(response).await);
        }
        let body = tokio::time::timeout(Duration::from_secs(30), response.into_body().collect())
            .await
            .map_err(|_| ClientError::Stream("the answer did not finish within 30s".into()))?
            .map_err(|e| ClientError::Stream(e.to_string()))?
            .to_bytes();
        serde_json::from_slice(&body)
            .map_err(|e| ClientError::Stream(format!("the answer does not parse: {e}")))
    }
}

impl mesh_tls::Issuer for CertificateIssuer {
    fn issue(
        &self,
        request: mesh_wire::certificate::CertificateRequest,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<mesh_wire::certificate::IssuedCertificate, String>,
                > + Send
                + '_,
        >,
    > {
        Box::pin(async move {
            self.issue_once(request)
                .await
                .map_err(|e| format!("{} (control plane {})", e, self.options.address))
        })
    }
}

async fn stream_once(
    options: &ClientOptions,
    updates: &mpsc::Sender<Update>,
    got_snapshot: &mut bool,
) -> Result<(), ClientError> {
    let mut conn = connect(options).await?;
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let send = |m: &ProxyMessage| {
        let _ = tx.unbounded_send(Ok(Frame::data(encode(m))));
    };
    send(&ProxyMessage::Hello {
        node: options.node.clone(),
        proxy_version: env!("CARGO_PKG_VERSION").to_string(),
    });
    let request = conn
        .authorize(
            http::Request::post(format!("https://{}{STREAM_PATH}", options.server_name))
                .header(http::header::CONTENT_TYPE, CONTENT_TYPE),
        )?
        .body(StreamBody::new(rx))
        .expect("valid request");
    let response = conn
        .sender
        .send_request(request)
        .await
        .map_err(|e| ClientError::Stream(e.to_string()))?;
    if response.status() != http::StatusCode::OK {
        return Err(refusal(response).await);
    }
    tracing::info!(control_plane = %options.address, node = %options.node.describe(), "connected to the control plane");
    let mut body = response.into_body();
    let mut decoder = FrameDecoder::default();
    let mut installed = options.identity.as_ref().map(|c| c.watch());
    let report_certificate = |send: &dyn Fn(&ProxyMessage)| {
        if let Some(info) = options.identity.as_ref().and_then(|c| c.info()) {
            send(&ProxyMessage::Certificate {
                identity: info.identity,
                expires_at_unix: info.expires_at_unix,
                root_sha256: info.root_sha256,
                trust_bundle_sha256: info.trust_bundle_sha256,
            });
        }
    };
    report_certificate(&send);
    loop {
        let next = async {
            match installed.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        let frame = tokio::select! {
            f = body.frame() => f,
            alive = next => {
                if alive {
                    report_certificate(&send);
                } else {
                    installed = None;
                }
                continue;
            }
        };
        let frame = match frame {
            None => return Err(ClientError::Closed),
            Some(Err(e)) => return Err(ClientError::Stream(e.to_string())),
            Some(Ok(f)) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        decoder.push(&data);
        while let Some(message) = decoder
            .next_message::<ControlPlaneMessage>()
            .map_err(|e| ClientError::Stream(e.to_string()))?
        {
            let ControlPlaneMessage::Snapshot {
                version,
                mut config,
            } = message;
            *got_snapshot = true;
            config.version = version.clone();
            let (reply_tx, reply_rx) = oneshot::channel();
            if updates
                .send(Update {
                    version: version.clone(),
                    config: *config,
                    reply: reply_tx,
                })
                .await
                .is_err()
            {
                return Ok(());
            }
            let outcome = reply_rx
                .await
                .unwrap_or_else(|_| Err("the proxy did not apply the config".into()));
            match outcome {
                Ok(()) => send(&ProxyMessage::Ack { version }),
                Err(error) => send(&ProxyMessage::Nack { version, error }),
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_name_is_the_host_of_the_address() {
        assert_eq!(
            host_of("meshd.mesh-system.svc:15012"),
            "meshd.mesh-system.svc"
        );
        assert_eq!(host_of("[::1]:15012"), "::1");
        assert_eq!(host_of("meshd"), "meshd");
    }
}
