//! Upstream connections. HTTP/1.1 backends go through our own keep-alive pool (below);
//! HTTP/2 backends through hyper-util's pooled client. Both are shared across reloads so
//! connections to backends survive a config swap.
//!
//! Why a pool of our own for HTTP/1.1: hyper-util's legacy client was ~18% of the proxy's
//! instructions per request (callgrind), ~10% of it in its pool (several SipHash map
//! operations, checkout futures, a task per returned connection). This pool does one map
//! lookup to take a connection and one to give it back, and gives it back when the response
//! body ends, from the body itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::{self, BoxError, ProxyBody, StallGuard};
use crate::config::UpstreamProtocol;
use crate::error::{ProxyError, chain};
use crate::fasthash::FastMap;
use mesh_tls::{SpiffeId, WorkloadCertificates};

type LegacyClient = Client<HttpConnector, ProxyBody>;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per backend address; more are closed when they come back.
const MAX_IDLE_PER_HOST: usize = 256;

/// Every upstream client of the proxy: one shard per worker thread
/// ([`crate::workers::current`]), so a pooled connection is used on the thread whose reactor
/// and runtime drive it.
pub struct Clients {
    shards: Box<[Shard]>,
}

#[derive(Default)]
struct Shard {
    http1: Http1Pool,
    http2: Mutex<HashMap<Duration, LegacyClient>>,
    /// HTTP/1.1 over mutual TLS to meshed endpoints: pooled apart from plaintext, each
    /// connection with the identity it proved.
    mtls1: Http1Pool,
    /// HTTP/2 over mutual TLS, one client per identity expected.
    mtls2: Mutex<HashMap<(Duration, Arc<SpiffeId>), MeshClient>>,
}

/// Mutual TLS to one endpoint: the proxy's certificates and the identity the endpoint must
/// prove.
#[derive(Clone, Copy)]
pub struct MeshTls<'a> {
    pub certs: &'a Arc<WorkloadCertificates>,
    pub identity: &'a Arc<SpiffeId>,
}

impl Default for Clients {
    fn default() -> Self {
        Clients::new(1)
    }
}

impl Clients {
    /// Clients for `workers` worker threads (at least one shard).
    pub fn new(workers: usize) -> Clients {
        Clients {
            shards: (0..workers.max(1)).map(|_| Shard::default()).collect(),
        }
    }

    fn shard(&self) -> &Shard {
        &self.shards[crate::workers::current() % self.shards.len()]
    }

    /// Sends `req` (absolute URI: `http://ip:port/path`) to its backend.
    /// `stream_idle`: a response body that then sends nothing for this long fails.
    /// `tls`: over mutual TLS to a meshed endpoint.
    pub async fn send(
        &self,
        protocol: UpstreamProtocol,
        connect_timeout: Duration,
        stream_idle: Option<Duration>,
        req: Request<ProxyBody>,
        tls: Option<MeshTls<'_>>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let shard = self.shard();
        match (protocol, tls) {
            (UpstreamProtocol::Http1, None) => {
                shard
                    .http1
                    .send(connect_timeout, stream_idle, req, None)
                    .await
            }
            (UpstreamProtocol::Http1, Some(tls)) => {
                shard
                    .mtls1
                    .send(connect_timeout, stream_idle, req, Some(tls))
                    .await
            }
            (UpstreamProtocol::Http2, Some(tls)) => {
                let client = {
                    let mut map = shard.mtls2.lock().unwrap_or_else(|p| p.into_inner());
                    map.entry((connect_timeout, tls.identity.clone()))
                        .or_insert_with(|| build_mesh_http2(connect_timeout, tls))
                        .clone()
                };
                let resp = client
                    .request(req)
                    .await
                    .map_err(|e| ProxyError::from_client(&e))?;
                Ok(resp.map(|b| body::boxed(StallGuard::new(b, stream_idle))))
            }
            (UpstreamProtocol::Http2, None) => {
                let client = {
                    let mut map = shard.http2.lock().unwrap_or_else(|p| p.into_inner());
                    map.entry(connect_timeout)
                        .or_insert_with(|| build_http2(connect_timeout))
                        .clone()
                };
                let resp = client
                    .request(req)
                    .await
                    .map_err(|e| ProxyError::from_client(&e))?;
                Ok(resp.map(|b| body::boxed(StallGuard::new(b, stream_idle))))
            }
        }
    }
}

fn build_http2(connect_timeout: Duration) -> LegacyClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    connector.enforce_http(true);
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http2_only(true);
    b.build(connector)
}

struct IdleConn {
    sender: SendRequest<ProxyBody>,
    since: Instant,
    /// The identity the endpoint proved (mutual TLS pool only).
    identity: Option<Arc<SpiffeId>>,
}

type IdleMap = Mutex<FastMap<Box<str>, Vec<IdleConn>>>;

/// HTTP/1.1 keep-alive connections by backend address (`ip:port` as written in the URI).
#[derive(Default)]
struct Http1Pool {
    idle: Arc<IdleMap>,
}

impl Http1Pool {
    async fn send(
        &self,
        connect_timeout: Duration,
        stream_idle: Option<Duration>,
        mut req: Request<ProxyBody>,
        tls: Option<MeshTls<'_>>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Some(authority) = req.uri().authority().cloned() else {
            return Err(ProxyError::Connect(
                "the upstream URI has no address".into(),
            ));
        };
        // HTTP/1.1 to a backend: origin-form request target, and a Host header.
        let origin = req
            .uri()
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
        *req.uri_mut() = origin;
        if !req.headers().contains_key(header::HOST)
            && let Ok(h) = HeaderValue::from_str(authority.as_str())
        {
            req.headers_mut().insert(header::HOST, h);
        }
        let key = authority.as_str();
        let identity = tls.map(|t| t.identity);
        // A pooled connection may have been closed by the backend while idle. If hyper hands
        // the request back unsent, it is safe to send it again on a fresh connection.
        if let Some(mut sender) = self.take(key, identity) {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.wrap(resp, sender, key, stream_idle, identity)),
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(ProxyError::from_send(e.error())),
                },
            }
        }
        let mut sender = connect(key, connect_timeout, tls).await?;
        match sender.send_request(req).await {
            Ok(resp) => Ok(self.wrap(resp, sender, key, stream_idle, identity)),
            Err(e) => Err(ProxyError::from_send(&e)),
        }
    }

    /// The most recently returned live connection to `key` (that proved `identity`, over
    /// mutual TLS), ready for a request.
    fn take(&self, key: &str, identity: Option<&Arc<SpiffeId>>) -> Option<SendRequest<ProxyBody>> {
        loop {
            let idle = {
                let mut map = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                map.get_mut(key)?.pop()?
            };
            if idle.sender.is_closed() || idle.since.elapsed() > POOL_IDLE_TIMEOUT {
                continue; // dropping the sender ends the connection's task
            }
            // The endpoint's expected identity changed (a new pod at the same address).
            if idle.identity.as_ref() != identity {
                continue;
            }
            // Not ready: still sending the previous request's body (the backend answered
            // before reading all of it). Never wait for it; dropping our handle lets that
            // exchange finish, then the connection closes.
            if idle.sender.is_ready() {
                return Some(idle.sender);
            }
        }
    }

    fn wrap(
        &self,
        resp: Response<Incoming>,
        sender: SendRequest<ProxyBody>,
        key: &str,
        stream_idle: Option<Duration>,
        identity: Option<&Arc<SpiffeId>>,
    ) -> Response<ProxyBody> {
        // A 101 hands the connection over to the upgrade: it never comes back.
        let give_back =
            (resp.status() != http::StatusCode::SWITCHING_PROTOCOLS).then(|| GiveBack {
                sender,
                key: key.into(),
                pool: Arc::downgrade(&self.idle),
                identity: identity.cloned(),
            });
        resp.map(|inner| {
            let mut b = PooledBody {
                inner: StallGuard::new(inner, stream_idle),
                give_back,
            };
            if b.inner.is_end_stream() {
                return_to_pool(&mut b.give_back);
            }
            body::boxed(b)
        })
    }
}

/// Opens a connection to `addr` (`ip:port`, or `host:port`, resolved), over mutual TLS when
/// `tls` says so, and starts its task.
async fn connect(
    addr: &str,
    timeout: Duration,
    tls: Option<MeshTls<'_>>,
) -> Result<SendRequest<ProxyBody>, ProxyError> {
    let open = async {
        let stream = match addr.parse::<SocketAddr>() {
            Ok(sa) => TcpStream::connect(sa).await?,
            Err(_) => TcpStream::connect(addr).await?,
        };
        stream.set_nodelay(true)?;
        Ok::<_, std::io::Error>(stream)
    };
    let stream = match tokio::time::timeout(timeout, open).await {
        Err(_) => {
            return Err(ProxyError::Connect(format!(
                "connecting to {addr}: timed out after {timeout:?}"
            )));
        }
        Ok(Err(e)) => return Err(ProxyError::Connect(format!("connecting to {addr}: {e}"))),
        Ok(Ok(s)) => s,
    };
    match tls {
        None => handshake(stream).await,
        Some(t) => {
            let stream = crate::mtls::connect(stream, t.certs, t.identity, timeout)
                .await
                .map_err(|e| ProxyError::Connect(format!("mutual TLS with {addr}: {e}")))?;
            handshake(stream).await
        }
    }
}

/// HTTP/1.1 on a connected stream, its task started.
async fn handshake<S>(stream: S) -> Result<SendRequest<ProxyBody>, ProxyError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ProxyError::Connect(chain(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

type MeshClient = Client<MeshConnector, ProxyBody>;

fn build_mesh_http2(connect_timeout: Duration, tls: MeshTls<'_>) -> MeshClient {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(true);
    let connector = MeshConnector {
        http,
        certs: tls.certs.clone(),
        identity: tls.identity.clone(),
        timeout: connect_timeout,
    };
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http2_only(true);
    b.build(connector)
}

/// Connects hyper-util's HTTP/2 client to a meshed endpoint over mutual TLS.
#[derive(Clone)]
struct MeshConnector {
    http: HttpConnector,
    certs: Arc<WorkloadCertificates>,
    identity: Arc<SpiffeId>,
    timeout: Duration,
}

impl tower::Service<Uri> for MeshConnector {
    type Response = MeshConn;
    type Error = BoxError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<MeshConn, BoxError>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        let (certs, identity, timeout) = (self.certs.clone(), self.identity.clone(), self.timeout);
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            let tls = crate::mtls::connect(tcp, &certs, &identity, timeout).await?;
            Ok(MeshConn(TokioIo::new(tls)))
        })
    }
}

/// A mutual TLS connection as hyper-util's client takes it.
struct MeshConn(TokioIo<tokio_rustls::client::TlsStream<TcpStream>>);

impl hyper_util::client::legacy::connect::Connection for MeshConn {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}

impl hyper::rt::Read for MeshConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MeshConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

struct GiveBack {
    sender: SendRequest<ProxyBody>,
    key: Box<str>,
    pool: Weak<IdleMap>,
    identity: Option<Arc<SpiffeId>>,
}

impl GiveBack {
    fn put(self) {
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        if self.sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut map = pool.lock().unwrap_or_else(|p| p.into_inner());
        let idle = IdleConn {
            sender: self.sender,
            since: now,
            identity: self.identity,
        };
        match map.get_mut(&*self.key) {
            Some(list) => {
                // Oldest first (connections are pushed as they come back and taken from the
                // end), so the ones that idled too long are a prefix: one clock read and a
                // binary search, not a clock read per idle connection. Closed ones are
                // skipped when taken.
                let expired =
                    list.partition_point(|c| now.duration_since(c.since) > POOL_IDLE_TIMEOUT);
                list.drain(..expired);
                if list.len() < MAX_IDLE_PER_HOST {
                    list.push(idle);
                }
            }
            None => {
                map.insert(self.key, vec![idle]);
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A backend's response body that returns its connection to the pool when it ends.
    /// Dropped before the end, the connection is closed instead (it is mid-response).
    struct PooledBody {
        #[pin]
        inner: StallGuard<Incoming>,
        give_back: Option<GiveBack>,
    }
}

/// Returns the connection in `slot` (if still there) to the pool: the response has ended.
fn return_to_pool(slot: &mut Option<GiveBack>) {
    if let Some(g) = slot.take() {
        g.put();
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        let ended = match &frame {
            None => true,
            Some(Ok(_)) => this.inner.is_end_stream(),
            Some(Err(_)) => {
                // A broken response: the connection is not reused.
                this.give_back.take();
                false
            }
        };
        if ended {
            return_to_pool(this.give_back);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
