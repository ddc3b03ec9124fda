//! Connection limits of the control plane's TLS listeners: the injection webhook (15017) and
//! config distribution (15012) accept through [`serve_tls`], so both close silent and idle
//! connections the same way and stop accepting at the same kind of cap.
//!
//! Per connection, from the moment it is accepted:
//! - the TLS handshake must finish within `tls_handshake_timeout`;
//! - the first request's headers must have arrived within `request_headers_timeout` (counted
//!   from accept, so it also bounds a client that sends nothing, a partial TLS record or part
//!   of a request head); a later request's, within as long from its first byte;
//! - once no request is in flight, the connection is closed after `idle_timeout`. A request
//!   is in flight from its headers until its response body has been sent or dropped, so a
//!   long-lived config-distribution stream (one HTTP/2 stream per proxy, open as long as the
//!   proxy is connected) is never cut, however quiet it is.
//!
//! Per listener, at most `max_connections` are open: at the cap the accept loop waits for a
//! connection to close (new ones wait in the kernel's backlog) instead of accepting and
//! dropping. Errors from `accept` itself (out of file descriptors, out of memory) back off
//! exponentially, 5 ms to 1 s, as Go's `net/http` does, instead of spinning.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

/// Limits applied to every connection of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Longest a TLS handshake may take, from accept.
    pub tls_handshake_timeout: Duration,
    /// Longest from accept until the first request's headers have arrived.
    pub request_headers_timeout: Duration,
    /// How long a connection with no request in flight stays open.
    pub idle_timeout: Duration,
    /// Connections open at once on the listener; more wait to be accepted.
    pub max_connections: usize,
}

/// Default TLS handshake and request-headers timeout: what the API server's webhook client
/// allows itself for a handshake (Go's `TLSHandshakeTimeout`) and the default webhook
/// `timeoutSeconds`; a client slower than that has already given up on its request.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// See [`DEFAULT_HANDSHAKE_TIMEOUT`].
pub const DEFAULT_REQUEST_HEADERS_TIMEOUT: Duration = Duration::from_secs(10);
/// Longer than the 90 s after which the API server's HTTP client drops its own idle
/// keep-alive connections, so the client, not we, closes a connection it might reuse (a
/// server closing first races with a request being sent on it).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// The webhook's clients are the API servers; one API server handles at most 200 mutating
/// requests at once by default (`--max-mutating-requests-inflight`), each one connection to
/// the webhook over HTTP/1.1.
pub const DEFAULT_WEBHOOK_MAX_CONNECTIONS: usize = 1024;
/// One connection per proxy (sidecars and gateways).
pub const DEFAULT_DISTRIBUTION_MAX_CONNECTIONS: usize = 10_000;

impl ConnectionLimits {
    /// The webhook's defaults.
    pub fn webhook() -> Self {
        Self {
            tls_handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            request_headers_timeout: DEFAULT_REQUEST_HEADERS_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_WEBHOOK_MAX_CONNECTIONS,
        }
    }

    /// Config distribution's defaults.
    pub fn distribution() -> Self {
        Self {
            max_connections: DEFAULT_DISTRIBUTION_MAX_CONNECTIONS,
            ..Self::webhook()
        }
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self::webhook()
    }
}

#[derive(Debug)]
struct ActivityState {
    in_flight: usize,
    /// When the connection expires if still no request is in flight then.
    deadline: Instant,
}

#[derive(Debug)]
struct ActivityInner {
    state: Mutex<ActivityState>,
    changed: Notify,
    idle_timeout: Duration,
    request_headers_timeout: Duration,
}

/// Requests in flight on one connection, and when it expires without one.
#[derive(Debug, Clone)]
pub struct Activity(Arc<ActivityInner>);

impl Activity {
    fn new(accepted_at: Instant, limits: &ConnectionLimits) -> Self {
        Self(Arc::new(ActivityInner {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                deadline: accepted_at + limits.request_headers_timeout,
            }),
            changed: Notify::new(),
            idle_timeout: limits.idle_timeout,
            request_headers_timeout: limits.request_headers_timeout,
        }))
    }

    /// Bytes arrived. With no request in flight they begin the next request (HTTP/1.1 keep-
    /// alive), whose head is then due within the request-headers timeout, not the idle one.
    fn received(&self) {
        let mut s = self.lock();
        if s.in_flight == 0 {
            let due = Instant::now() + self.0.request_headers_timeout;
            if due < s.deadline {
                s.deadline = due;
                drop(s);
                self.0.changed.notify_one();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wraps a hyper service so that its requests count as activity.
    pub fn track<S>(&self, service: S) -> Tracked<S> {
        Tracked {
            inner: service,
            activity: self.clone(),
        }
    }

    fn start(&self) -> InFlight {
        self.lock().in_flight += 1;
        self.0.changed.notify_one();
        InFlight(self.clone())
    }

    /// Resolves once no request has been in flight up to the deadline.
    async fn expired(&self) {
        loop {
            let changed = self.0.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read, so a change in between still wakes us.
            changed.as_mut().enable();
            let deadline = {
                let s = self.lock();
                (s.in_flight == 0).then_some(s.deadline)
            };
            match deadline {
                None => changed.await,
                Some(deadline) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => {
                            let s = self.lock();
                            if s.in_flight == 0 && Instant::now() >= s.deadline {
                                return;
                            }
                        }
                        _ = changed => {}
                    }
                }
            }
        }
    }
}

/// One request in flight; dropping it (when the response body ends or is dropped) starts the
/// idle timer if it was the last one.
#[derive(Debug)]
struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        let inner = &self.0.0;
        {
            let mut s = self.0.lock();
            s.in_flight -= 1;
            if s.in_flight == 0 {
                s.deadline = Instant::now() + inner.idle_timeout;
            }
        }
        inner.changed.notify_one();
    }
}

/// A hyper service whose requests are counted from the call until the response body ends.
#[derive(Debug, Clone)]
pub struct Tracked<S> {
    inner: S,
    activity: Activity,
}

impl<S, ReqBody, ResBody> hyper::service::Service<Request<ReqBody>> for Tracked<S>
where
    S: hyper::service::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<TrackedBody<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn call(&self, req: Request<ReqBody>) -> Self::Future {
        let guard = self.activity.start();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await?;
            Ok(response.map(|inner| TrackedBody {
                inner,
                guard: Some(guard),
            }))
        })
    }
}

/// A response body that keeps its request in flight until it ends.
#[derive(Debug)]
pub struct TrackedBody<B> {
    inner: B,
    guard: Option<InFlight>,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's stream that reports what it receives to the connection's [`Activity`].
pub struct Watched<T> {
    inner: T,
    activity: Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.received();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What a listener's connection handler gets once the TLS handshake is done.
pub struct Accepted {
    /// The TLS stream, watched for the request-headers timeout of keep-alive requests.
    pub tls: Watched<TlsStream<TcpStream>>,
    pub peer: SocketAddr,
    /// Wrap the connection's service with [`Activity::track`]: requests keep it open.
    pub activity: Activity,
}

/// Whether an `accept` error concerns only the connection being accepted (the next accept
/// may well succeed at once), as opposed to the process (file descriptors, memory).
fn per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    )
}

const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts TLS connections on `listener` until `shutdown` resolves, within `limits`; each
/// handshaken connection is handed to `handle`, whose future is dropped (closing the
/// connection) when the request-headers or idle timeout expires. `name` labels the logs.
pub async fn serve_tls<H, Fut>(
    name: &'static str,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
    handle: H,
) where
    H: Fn(Accepted) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut backoff = Duration::ZERO;
    // Logged once each time the listener reaches its cap, not once per connection there.
    let mut at_cap = false;
    tokio::pin!(shutdown);
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => {
                at_cap = false;
                p
            }
            Err(_) => {
                if !at_cap {
                    at_cap = true;
                    tracing::warn!(
                        listener = name,
                        max_connections = limits.max_connections,
                        "connection limit reached; new connections wait until one closes"
                    );
                }
                tokio::select! {
                    _ = &mut shutdown => return,
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return, // never closed
                    },
                }
            }
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(x) => {
                    backoff = Duration::ZERO;
                    x
                }
                Err(e) if per_connection(&e) => {
                    tracing::debug!(listener = name, error = %e, "accept: connection gone");
                    continue;
                }
                Err(e) => {
                    backoff = (backoff * 2).clamp(MIN_ACCEPT_BACKOFF, MAX_ACCEPT_BACKOFF);
                    tracing::warn!(listener = name, error = %e, ?backoff, "accept failed; retrying");
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let accepted_at = Instant::now();
        let activity = Activity::new(accepted_at, &limits);
        let acceptor = acceptor.clone();
        let handle = handle.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let watchdog = activity.clone();
            let serve = async move {
                let tls = match tokio::time::timeout(
                    limits.tls_handshake_timeout,
                    acceptor.accept(tcp),
                )
                .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(listener = name, %peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(listener = name, %peer, "TLS handshake timed out");
                        return;
                    }
                };
                handle(Accepted {
                    tls: Watched {
                        inner: tls,
                        activity: activity.clone(),
                    },
                    peer,
                    activity,
                })
                .await;
            };
            tokio::select! {
                _ = serve => {}
                _ = watchdog.expired() => {
                    tracing::debug!(listener = name, %peer, "connection closed: no request within the request-headers or idle timeout");
                }
            }
        });
    }
}
