//! The config distribution server (port 15012): accepts proxy streams, sends each proxy its
//! snapshot (with the mesh's trust bundle) and a new one on change, records ACK/NACK per
//! proxy; and issues workload certificates (`POST` [`CERTIFICATE_PATH`], see
//! `mesh_wire::certificate`) to the identity a proxy's token proves.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::SinkExt;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_config::{MeshIdentity, ProxyConfig};
use mesh_translate::TranslateOptions;
use mesh_wire::certificate::{CERTIFICATE_PATH, CertificateRequest, MAX_REQUEST_BYTES};
use mesh_wire::distribution::{
    CONTENT_TYPE, FrameDecoder, NodeIdentity, ProxyMessage, STREAM_PATH,
};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::auth::{ProxyAuth, authorize};
use super::mesh_ca::{MeshCa, Refused};
use super::metrics::{DistributionMetrics, RefusalLabels};
use super::world::World;
use crate::net_limits::{self, Accepted, ConnectionLimits};

/// What the control plane knows about one connected proxy (`/debug/proxies`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyState {
    pub id: u64,
    pub node: NodeIdentity,
    /// The service account (`namespace/name`) its token proved; none with `--no-proxy-auth`.
    pub identity: Option<String>,
    pub peer: String,
    pub proxy_version: String,
    /// Milliseconds since the Unix epoch.
    pub connected_since_ms: u64,
    pub last_sent_version: Option<String>,
    pub last_sent_ms: Option<u64>,
    pub last_sent_bytes: Option<usize>,
    pub last_ack_version: Option<String>,
    pub last_ack_ms: Option<u64>,
    pub last_nack: Option<Nack>,
    /// Instances counted for this proxy's distributed rate limits.
    pub instances: u32,
    /// The workload certificate the proxy reports serving with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateState>,
}

/// A proxy's workload certificate, as it reports it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateState {
    pub identity: String,
    /// `notAfter`, milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
    /// The root its chain leads to (SHA-256 of the DER, hex).
    pub root_sha256: String,
    /// The roots the proxy trusts.
    pub trust_bundle_sha256: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Nack {
    pub version: String,
    pub error: String,
    pub at_ms: u64,
}

impl ProxyState {
    /// `SYNCED` (last sent = last ACK), `NACKED`, `STALE` (sent, no answer yet), `WAITING`.
    pub fn sync_state(&self) -> &'static str {
        match (
            &self.last_sent_version,
            &self.last_ack_version,
            &self.last_nack,
        ) {
            (None, _, _) => "WAITING",
            (Some(s), _, Some(n)) if &n.version == s => "NACKED",
            (Some(s), Some(a), _) if a == s => "SYNCED",
            _ => "STALE",
        }
    }
}

/// `/debug/proxies` body.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxiesReport {
    /// Generation of the current world (0 = not synced with the API server yet).
    pub generation: u64,
    pub proxies: Vec<ProxyState>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Shared state of the distribution server.
pub struct Hub {
    world: watch::Receiver<Option<Arc<World>>>,
    options: TranslateOptions,
    auth: ProxyAuth,
    proxies: Mutex<BTreeMap<u64, ProxyState>>,
    next_id: AtomicU64,
    metrics: DistributionMetrics,
    /// Issues workload certificates, and its trust bundle goes in every snapshot; `None`:
    /// this server issues none. The CA in use changes while the server runs (a root
    /// rotation, an updated `cacerts`: `ca_rotation`).
    mesh_ca: Option<watch::Receiver<Arc<MeshCa>>>,
}

/// How long a certificate request's body may take to arrive.
const CERTIFICATE_BODY_TIMEOUT: Duration = Duration::from_secs(10);

fn plain(status: StatusCode, text: String) -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from(text)).boxed())
        .expect("valid response")
}

impl Hub {
    /// A server without a mesh CA (no certificates, no trust bundle in snapshots).
    pub fn new(
        world: watch::Receiver<Option<Arc<World>>>,
        options: TranslateOptions,
        auth: ProxyAuth,
    ) -> Arc<Hub> {
        Hub::with_mesh_ca(world, options, auth, None)
    }

    /// A server that issues workload certificates from `mesh_ca` and puts its trust bundle in
    /// every snapshot.
    pub fn with_mesh_ca(
        world: watch::Receiver<Option<Arc<World>>>,
        options: TranslateOptions,
        auth: ProxyAuth,
        mesh_ca: Option<Arc<MeshCa>>,
    ) -> Arc<Hub> {
        Hub::with_changing_mesh_ca(world, options, auth, mesh_ca.map(|ca| watch::channel(ca).1))
    }

    /// A server that issues from the CA `mesh_ca` holds now, and puts its trust bundle in
    /// every snapshot. A change of CA reaches proxies with the next world (the one who
    /// changes it publishes one).
    pub fn with_changing_mesh_ca(
        world: watch::Receiver<Option<Arc<World>>>,
        options: TranslateOptions,
        auth: ProxyAuth,
        mesh_ca: Option<watch::Receiver<Arc<MeshCa>>>,
    ) -> Arc<Hub> {
        Arc::new(Hub {
            world,
            options,
            auth,
            proxies: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            metrics: DistributionMetrics::default(),
            mesh_ca,
        })
    }

    /// The CA in use now.
    fn current_ca(&self) -> Option<Arc<MeshCa>> {
        self.mesh_ca.as_ref().map(|rx| rx.borrow().clone())
    }

    /// The trust bundle snapshots carry now.
    fn mesh_identity(&self) -> Option<Arc<MeshIdentity>> {
        self.current_ca().map(|ca| ca.shared_identity())
    }

    /// Translation and push counters (`/metrics`).
    pub fn metrics(&self) -> &DistributionMetrics {
        &self.metrics
    }

    pub fn report(&self) -> ProxiesReport {
        let generation = self.world.borrow().as_ref().map_or(0, |w| w.generation);
        ProxiesReport {
            generation,
            proxies: self
                .proxies
                .lock()
                .expect("proxies lock")
                .values()
                .cloned()
                .collect(),
        }
    }

    /// Connected proxies of one Gateway.
    pub fn connected(&self, gateway_key: &str) -> u32 {
        self.proxies
            .lock()
            .expect("proxies lock")
            .values()
            .filter(|p| p.node.gateway_key().as_deref() == Some(gateway_key))
            .count() as u32
    }

    /// Instances enforcing a distributed limit of a Gateway: the ready replicas of its
    /// Deployment, else (not deployed by us, e.g. a proxy run by hand) the connected proxies.
    pub fn instances(&self, node: &NodeIdentity, world: &World) -> u32 {
        let Some(key) = node.gateway_key() else {
            return 1;
        };
        world
            .gateway_replicas
            .get(&key)
            .copied()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| self.connected(&key))
            .max(1)
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut ProxyState)) {
        if let Some(p) = self.proxies.lock().expect("proxies lock").get_mut(&id) {
            f(p);
        }
    }

    /// Serves proxies on `listener` until `shutdown`, with the default connection limits.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: CancellationToken,
    ) {
        self.serve_with_limits(listener, tls, ConnectionLimits::distribution(), shutdown)
            .await
    }

    /// Serves proxies on `listener` until `shutdown`. A connection without an open stream is
    /// closed after the request-headers timeout (from accept) or the idle timeout; a proxy's
    /// stream keeps its connection open for as long as it lasts.
    pub async fn serve_with_limits(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        limits: ConnectionLimits,
        shutdown: CancellationToken,
    ) {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let stop = shutdown.clone();
        net_limits::serve_tls(
            "config distribution",
            listener,
            acceptor,
            limits,
            async move { stop.cancelled().await },
            move |conn: Accepted| {
                let hub = self.clone();
                let shutdown = shutdown.clone();
                let peer = conn.peer;
                let service = conn.activity.track(hyper::service::service_fn(move |req| {
                    let hub = hub.clone();
                    let shutdown = shutdown.clone();
                    async move { Ok::<_, Infallible>(hub.handle(req, peer, shutdown).await) }
                }));
                async move {
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .keep_alive_interval(Some(Duration::from_secs(15)))
                        .keep_alive_timeout(Duration::from_secs(15))
                        .adaptive_window(true)
                        .serve_connection(TokioIo::new(conn.tls), service);
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, "config distribution connection ended: {e}");
                    }
                }
            },
        )
        .await
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        if req.uri().path() == CERTIFICATE_PATH {
            return self.issue_certificate(req, peer).await;
        }
        if req.uri().path() != STREAM_PATH {
            return plain(StatusCode::NOT_FOUND, format!("use POST {STREAM_PATH}\n"));
        }
        if req.method() != http::Method::POST {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "use POST\n".into());
        }
        let authorization = req.headers().get(http::header::AUTHORIZATION).cloned();
        let caller = match self.auth.authenticate(authorization.as_ref()).await {
            Ok(c) => c,
            Err(r) => {
                tracing::info!(%peer, status = %r.status, "proxy refused: {}", r.reason);
                return plain(r.status, format!("{}\n", r.reason));
            }
        };
        let mut body = req.into_body();
        let mut decoder = FrameDecoder::default();
        let hello = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(m) = decoder
                    .next_message::<ProxyMessage>()
                    .map_err(|e| e.to_string())?
                {
                    return Ok(m);
                }
                match body.frame().await {
                    None => return Err("stream ended before hello".to_string()),
                    Some(Err(e)) => return Err(e.to_string()),
                    Some(Ok(f)) => {
                        if let Ok(d) = f.into_data() {
                            decoder.push(&d);
                        }
                    }
                }
            }
        })
        .await;
        let (node, proxy_version) = match hello {
            Ok(Ok(ProxyMessage::Hello {
                node,
                proxy_version,
            })) => (node, proxy_version),
            Ok(Ok(other)) => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    format!("the first message must be hello, got {other:?}\n"),
                );
            }
            Ok(Err(e)) => return plain(StatusCode::BAD_REQUEST, format!("{e}\n")),
            Err(_) => return plain(StatusCode::REQUEST_TIMEOUT, "no hello within 10s\n".into()),
        };
        if let Some(caller) = &caller {
            let world = self.world.borrow().clone();
            if let Err(r) = authorize(caller, &node, world.as_deref()) {
                tracing::info!(%peer, node = %node.describe(), status = %r.status, "proxy refused: {}", r.reason);
                return plain(r.status, format!("{}\n", r.reason));
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        tracing::info!(id, %peer, node = %node.describe(), "proxy connected");
        self.proxies.lock().expect("proxies lock").insert(
            id,
            ProxyState {
                id,
                node: node.clone(),
                identity: caller
                    .as_ref()
                    .map(|c| format!("{}/{}", c.namespace, c.service_account)),
                peer: peer.to_string(),
                proxy_version,
                connected_since_ms: now_ms(),
                last_sent_version: None,
                last_sent_ms: None,
                last_sent_bytes: None,
                last_ack_version: None,
                last_ack_ms: None,
                last_nack: None,
                instances: 1,
                certificate: None,
            },
        );
        let gone = shutdown.child_token();
        // The token is reviewed again while the stream lives: an expired token, or one bound to
        // a pod that is gone, ends the stream (a live proxy reconnects with its new token).
        if let (Some(_), Some(every)) = (&caller, self.auth.recheck_every()) {
            let hub = self.clone();
            let gone = gone.clone();
            let node = node.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = gone.cancelled() => return,
                    }
                    let refusal = match hub.auth.authenticate(authorization.as_ref()).await {
                        Ok(Some(c)) => {
                            let world = hub.world.borrow().clone();
                            authorize(&c, &node, world.as_deref()).err()
                        }
                        Ok(None) => None,
                        Err(r) => Some(r),
                    };
                    match refusal {
                        // The API server is away: keep serving, ask again later.
                        Some(r) if r.status == StatusCode::SERVICE_UNAVAILABLE => {}
                        Some(r) => {
                            tracing::info!(id, node = %node.describe(), "stream closed, the token no longer holds: {}", r.reason);
                            gone.cancel();
                            return;
                        }
                        None => {}
                    }
                }
            });
        }
        // Proxy → control plane: ACK/NACK.
        {
            let hub = self.clone();
            let gone = gone.clone();
            tokio::spawn(async move {
                let reason = loop {
                    match decoder.next_message::<ProxyMessage>() {
                        Err(e) => break format!("bad message: {e}"),
                        Ok(Some(m)) => {
                            hub.on_message(id, m);
                            continue;
                        }
                        Ok(None) => {}
                    }
                    let frame = tokio::select! {
                        f = body.frame() => f,
                        _ = gone.cancelled() => break "closed".into(),
                    };
                    match frame {
                        None => break "the proxy closed the stream".into(),
                        Some(Err(e)) => break e.to_string(),
                        Some(Ok(f)) => {
                            if let Ok(d) = f.into_data() {
                                decoder.push(&d);
                            }
                        }
                    }
                };
                tracing::info!(id, "proxy disconnected: {reason}");
                gone.cancel();
            });
        }
        // Control plane → proxy: snapshots.
        let (tx, rx) = futures::channel::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        tokio::spawn(self.clone().push(id, node, tx, gone));
        Response::builder()
            .header(http::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(StreamBody::new(rx).boxed())
            .expect("valid response")
    }

    /// `POST` [`CERTIFICATE_PATH`]: the certificate of the identity the bearer token proves.
    /// Every refusal is logged with its reason (never the token) and counted.
    async fn issue_certificate(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        let refuse = |status: StatusCode, reason: String| {
            let label = match status {
                StatusCode::UNAUTHORIZED => "unauthenticated",
                StatusCode::FORBIDDEN => "forbidden",
                StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::NOT_FOUND
                | StatusCode::INTERNAL_SERVER_ERROR => "unavailable",
                _ => "bad_request",
            };
            self.metrics
                .certificates_refused
                .get_or_create(&RefusalLabels { reason: label })
                .inc();
            tracing::info!(%peer, status = %status.as_u16(), "certificate refused: {reason}");
            plain(status, format!("{reason}\n"))
        };
        if req.method() != http::Method::POST {
            return refuse(StatusCode::METHOD_NOT_ALLOWED, "use POST".into());
        }
        let Some(ca) = self.current_ca() else {
            return refuse(
                StatusCode::NOT_FOUND,
                "this control plane runs without a mesh CA".into(),
            );
        };
        // Who is asking, before reading what they send.
        let caller = match self
            .auth
            .authenticate(req.headers().get(http::header::AUTHORIZATION))
            .await
        {
            Ok(c) => c,
            Err(r) => return refuse(r.status, r.reason),
        };
        let too_large = || {
            format!(
                "the request body is larger than {MAX_REQUEST_BYTES} bytes (a CSR is about 500)"
            )
        };
        if req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > MAX_REQUEST_BYTES as u64)
        {
            return refuse(StatusCode::PAYLOAD_TOO_LARGE, too_large());
        }
        let body = http_body_util::Limited::new(req.into_body(), MAX_REQUEST_BYTES);
        let bytes = match tokio::time::timeout(CERTIFICATE_BODY_TIMEOUT, body.collect()).await {
            Err(_) => {
                return refuse(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {}s",
                        CERTIFICATE_BODY_TIMEOUT.as_secs()
                    ),
                );
            }
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return refuse(StatusCode::PAYLOAD_TOO_LARGE, too_large());
            }
            Ok(Err(e)) => {
                return refuse(StatusCode::BAD_REQUEST, format!("reading the body: {e}"));
            }
            Ok(Ok(b)) => b.to_bytes(),
        };
        let request: CertificateRequest = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "the body is not a certificate request (JSON {{\"csrPem\": ...}}): {e}"
                    ),
                );
            }
        };
        let identity = match &caller {
            Some(c) => match ca.identity_of(&c.namespace, &c.service_account) {
                Ok(id) => Some(id),
                Err(e) => return refuse(StatusCode::FORBIDDEN, e.to_string()),
            },
            None => None,
        };
        match ca.issue(&request, identity.as_deref()) {
            Ok(issued) => {
                self.metrics.certificates_issued.inc();
                tracing::info!(%peer, identity = %issued.identity, expires_at_unix = issued.expires_at_unix, "certificate issued");
                let body = serde_json::to_vec(&issued).expect("an issued certificate serializes");
                Response::builder()
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(body)).boxed())
                    .expect("valid response")
            }
            Err((kind, reason)) => {
                let status = match kind {
                    Refused::Unauthenticated => StatusCode::UNAUTHORIZED,
                    Refused::BadRequest => StatusCode::BAD_REQUEST,
                    Refused::Forbidden => StatusCode::FORBIDDEN,
                    Refused::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                };
                refuse(status, reason)
            }
        }
    }

    fn on_message(&self, id: u64, message: ProxyMessage) {
        match message {
            ProxyMessage::Hello { .. } => {
                tracing::warn!(id, "second hello ignored");
            }
            ProxyMessage::Ack { version } => {
                tracing::debug!(id, %version, "ACK");
                self.update(id, |p| {
                    p.last_ack_version = Some(version);
                    p.last_ack_ms = Some(now_ms());
                });
            }
            ProxyMessage::Nack { version, error } => {
                tracing::warn!(id, %version, "NACK: {error}");
                self.update(id, |p| {
                    p.last_nack = Some(Nack {
                        version,
                        error,
                        at_ms: now_ms(),
                    });
                });
            }
            ProxyMessage::Certificate {
                identity,
                expires_at_unix,
                root_sha256,
                trust_bundle_sha256,
            } => {
                tracing::debug!(id, %identity, expires_at_unix, %root_sha256, "workload certificate");
                self.update(id, |p| {
                    p.certificate = Some(CertificateState {
                        identity,
                        expires_at_ms: expires_at_unix.saturating_mul(1000),
                        root_sha256,
                        trust_bundle_sha256,
                    });
                });
            }
        }
    }

    async fn push(
        self: Arc<Self>,
        id: u64,
        node: NodeIdentity,
        mut tx: futures::channel::mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
        gone: CancellationToken,
    ) {
        let mut world_rx = self.world.clone();
        let mut last: Option<Arc<ProxyConfig>> = None;
        let labels = DistributionMetrics::labels(node.gateway_key().is_some());
        loop {
            let world = world_rx.borrow_and_update().clone();
            if let Some(world) = world {
                let instances = self.instances(&node, &world);
                let hub = self.clone();
                let node2 = node.clone();
                // Finding the cache entry reads every EndpointSlice for a sidecar: off the
                // async threads. The translation itself (once per entry, however many
                // replicas ask at once) runs on the blocking pool too.
                let pending = tokio::task::spawn_blocking(move || {
                    world
                        .prepare(&node2, instances, &hub.options)
                        .with_mesh_identity(hub.mesh_identity())
                })
                .await
                .expect("finding a config does not panic");
                let lookup = tokio::select! {
                    l = pending.resolve() => l,
                    _ = gone.cancelled() => break,
                };
                self.metrics.config_requests.get_or_create(&labels).inc();
                if lookup.translated {
                    self.metrics.translations.get_or_create(&labels).inc();
                }
                let changed = match &last {
                    None => true,
                    Some(l) => !Arc::ptr_eq(l, &lookup.config) && **l != *lookup.config,
                };
                let frame = if changed {
                    Some(lookup.frame().await)
                } else {
                    None
                };
                if let Some(bytes) = frame {
                    let version = lookup.version();
                    let len = bytes.len();
                    tokio::select! {
                        r = tx.send(Ok(Frame::data(bytes))) => if r.is_err() { break },
                        _ = gone.cancelled() => break,
                    }
                    self.metrics.snapshots_sent.get_or_create(&labels).inc();
                    tracing::info!(id, node = %node.describe(), %version, bytes = len, "config sent");
                    self.update(id, |p| {
                        p.last_sent_version = Some(version);
                        p.last_sent_ms = Some(now_ms());
                        p.last_sent_bytes = Some(len);
                        p.instances = instances;
                    });
                }
                last = Some(lookup.config);
            }
            tokio::select! {
                r = world_rx.changed() => if r.is_err() { break },
                _ = gone.cancelled() => break,
            }
        }
        gone.cancel();
        self.proxies.lock().expect("proxies lock").remove(&id);
    }
}
