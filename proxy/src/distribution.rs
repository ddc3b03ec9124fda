//! Config distribution: how a proxy gets its config from the control plane
//! (`meshctl control-plane`, port 15012). The protocol is described in
//! `docs/config-distribution.md`; in short:
//!
//! - TLS (the proxy verifies the control plane against a CA file), ALPN `h2`, one long-lived
//!   HTTP/2 request per proxy: `POST /meshctl.distribution.v1/stream`.
//! - Both bodies are streams of frames: a 4-byte big-endian length, then that many bytes of
//!   JSON.
//! - Request body (proxy → control plane): [`ProxyMessage::Hello`] first (who the proxy is),
//!   then one [`ProxyMessage::Ack`] or [`ProxyMessage::Nack`] per snapshot received.
//! - Response body (control plane → proxy): [`ControlPlaneMessage::Snapshot`]s, each a whole
//!   [`ProxyConfig`] with a version, the first one as soon as the control plane has it and a
//!   new one whenever what concerns this proxy changes.
//!
//! [`run_client`] is the proxy side: it connects, keeps the stream open, hands every snapshot
//! to the caller (who applies it and says whether it worked), and reconnects with exponential
//! backoff (tokio time) when the stream breaks. The caller keeps serving the last good config
//! meanwhile.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_config::ProxyConfig;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Default port of the config distribution server.
pub const DEFAULT_PORT: u16 = 15012;
/// The one request path.
pub const STREAM_PATH: &str = "/meshctl.distribution.v1/stream";
/// Largest frame either side accepts (a config with thousands of routes is a few MB).
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;
/// Environment variable for the control-plane address (`host:port`).
pub const ENV_CONTROL_PLANE: &str = "MESH_CONTROL_PLANE";
/// Environment variable for the CA file that verifies the control plane.
pub const ENV_CA_ROOT_PATH: &str = "MESH_CA_ROOT_PATH";

/// Who a proxy is; decides which config it gets.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase", deny_unknown_fields)]
pub enum NodeIdentity {
    /// A gateway proxy serving the Gateway `namespace/name`.
    #[serde(rename_all = "camelCase")]
    Gateway {
        namespace: String,
        name: String,
        /// The pod it runs in (`POD_NAME`), for `proxy-status`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod: Option<String>,
    },
    /// A sidecar proxy of a pod.
    #[serde(rename_all = "camelCase")]
    Sidecar {
        namespace: String,
        pod: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service_account: Option<String>,
        /// The pod's IP (`POD_IP`): which Services it backs (EndpointSlices) decides its
        /// inbound policies.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ip: Option<std::net::IpAddr>,
    },
}

impl NodeIdentity {
    /// `gateway demo/istio-gwapi (pod ...)` or `sidecar demo/pod`.
    pub fn describe(&self) -> String {
        match self {
            NodeIdentity::Gateway {
                namespace,
                name,
                pod,
            } => match pod {
                Some(p) => format!("gateway {namespace}/{name} (pod {p})"),
                None => format!("gateway {namespace}/{name}"),
            },
            NodeIdentity::Sidecar { namespace, pod, .. } => format!("sidecar {namespace}/{pod}"),
        }
    }

    /// The Gateway key `namespace/name` of a gateway proxy.
    pub fn gateway_key(&self) -> Option<String> {
        match self {
            NodeIdentity::Gateway {
                namespace, name, ..
            } => Some(format!("{namespace}/{name}")),
            NodeIdentity::Sidecar { .. } => None,
        }
    }
}

/// Proxy → control plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum ProxyMessage {
    /// First message of a stream.
    #[serde(rename_all = "camelCase")]
    Hello {
        node: NodeIdentity,
        /// The proxy's build version.
        #[serde(default)]
        proxy_version: String,
    },
    /// The snapshot `version` was applied and is being served.
    Ack { version: String },
    /// The snapshot `version` was rejected; the proxy keeps serving its previous config.
    Nack { version: String, error: String },
}

/// Control plane → proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum ControlPlaneMessage {
    /// The whole config for this proxy (its `version` field equals `version`).
    Snapshot {
        version: String,
        config: Box<ProxyConfig>,
    },
}

/// Encodes one message as a frame (4-byte big-endian length, JSON).
pub fn encode<T: Serialize>(message: &T) -> Bytes {
    let json = serde_json::to_vec(message).expect("protocol messages serialize");
    let mut out = BytesMut::with_capacity(4 + json.len());
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out.freeze()
}

/// Splits a byte stream into frames and decodes them.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

/// A frame that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    #[error("invalid message: {0}")]
    Json(#[from] serde_json::Error),
}

impl FrameDecoder {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, if one is buffered.
    pub fn next_message<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        self.buf.advance(4);
        let frame = self.buf.split_to(len);
        Ok(Some(serde_json::from_slice(&frame)?))
    }

    /// Bytes of an incomplete frame still buffered.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

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
    let provider = Arc::new(rustls::crypto::ring::default_provider());
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
async fn stream_once(
    options: &ClientOptions,
    updates: &mpsc::Sender<Update>,
    got_snapshot: &mut bool,
) -> Result<(), ClientError> {
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
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
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
    let _abort = AbortOnDrop(conn_task);

    let (tx, rx) = futures::channel::mpsc::unbounded();
    let send = |m: &ProxyMessage| {
        let _ = tx.unbounded_send(Ok(Frame::data(encode(m))));
    };
    send(&ProxyMessage::Hello {
        node: options.node.clone(),
        proxy_version: env!("CARGO_PKG_VERSION").to_string(),
    });
    let mut request = http::Request::post(format!("https://{}{STREAM_PATH}", options.server_name))
        .header(http::header::CONTENT_TYPE, "application/x-meshctl-frames");
    if let Some(t) = &token {
        let value = http::HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
            ClientError::Connect("the token has characters a header cannot carry".into())
        })?;
        request = request.header(http::header::AUTHORIZATION, value);
    }
    let request = request.body(StreamBody::new(rx)).expect("valid request");
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| ClientError::Stream(e.to_string()))?;
    if response.status() != http::StatusCode::OK {
        let status = response.status();
        // The control plane says why in a short text body.
        let why = tokio::time::timeout(Duration::from_secs(2), response.into_body().collect())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        return Err(ClientError::Status(status, why));
    }
    tracing::info!(control_plane = %options.address, node = %options.node.describe(), "connected to the control plane");
    let mut body = response.into_body();
    let mut decoder = FrameDecoder::default();
    loop {
        let frame = match body.frame().await {
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
    fn frames_round_trip_split_anywhere() {
        let a = ProxyMessage::Hello {
            node: NodeIdentity::Gateway {
                namespace: "demo".into(),
                name: "gw".into(),
                pod: None,
            },
            proxy_version: "0.1.0".into(),
        };
        let b = ProxyMessage::Nack {
            version: "7".into(),
            error: "bad".into(),
        };
        let mut bytes = encode(&a).to_vec();
        bytes.extend_from_slice(&encode(&b));
        for split in 0..bytes.len() {
            let mut d = FrameDecoder::default();
            d.push(&bytes[..split]);
            let mut got = Vec::new();
            while let Some(m) = d.next_message::<ProxyMessage>().unwrap() {
                got.push(m);
            }
            d.push(&bytes[split..]);
            while let Some(m) = d.next_message::<ProxyMessage>().unwrap() {
                got.push(m);
            }
            assert_eq!(got, vec![a.clone(), b.clone()], "split at {split}");
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut d = FrameDecoder::default();
        d.push(&((MAX_FRAME_BYTES as u32) + 1).to_be_bytes());
        assert!(matches!(
            d.next_message::<ProxyMessage>(),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn identities_serialize_as_documented() {
        let id = NodeIdentity::Sidecar {
            namespace: "demo".into(),
            pod: "p-1".into(),
            service_account: Some("default".into()),
            ip: Some("10.244.0.7".parse().unwrap()),
        };
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            r#"{"kind":"sidecar","namespace":"demo","pod":"p-1","serviceAccount":"default","ip":"10.244.0.7"}"#
        );
        assert_eq!(
            host_of("meshd.mesh-system.svc:15012"),
            "meshd.mesh-system.svc"
        );
        assert_eq!(host_of("[::1]:15012"), "::1");
    }
}
