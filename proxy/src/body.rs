//! Body types of the request path: everything is streamed, nothing buffered whole.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::access_log::{AccessLogEntry, AccessLogger, ResponseFlags};

/// Errors from bodies (downstream, upstream, mirrors).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response the proxy handles.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A request body as the client sends it: its errors (malformed chunked encoding, a body
/// shorter than its Content-Length) are marked as the client's, so a send that fails because
/// of them answers 400 and is not counted against the backend.
pub fn downstream(b: hyper::body::Incoming) -> ProxyBody {
    b.map_err(|e| Box::new(DownstreamError(e)) as BoxError)
        .boxed()
}

/// An error of the client's request body.
#[derive(Debug, thiserror::Error)]
#[error("client request body: {0}")]
pub struct DownstreamError(#[source] pub hyper::Error);

/// The backend sent nothing for the stream idle timeout in the middle of a response body.
#[derive(Debug, thiserror::Error)]
#[error("upstream stream idle timeout: no response data for {0:?}")]
pub struct StreamIdle(pub std::time::Duration);

pin_project_lite::pin_project! {
    /// A backend's response body that fails when no frame arrives for `idle`: a stalled
    /// backend ends the downstream response (HTTP/1: connection closed mid-body; HTTP/2:
    /// stream reset) instead of holding the client forever. The timer exists only while the
    /// body actually waits, so a body that is already there costs nothing.
    pub struct StallGuard<B> {
        #[pin]
        inner: B,
        idle: Option<std::time::Duration>,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
        armed: bool,
    }
}

impl<B> StallGuard<B> {
    pub fn new(inner: B, idle: Option<std::time::Duration>) -> Self {
        StallGuard {
            inner,
            idle,
            timer: None,
            armed: false,
        }
    }
}

impl<B> Body for StallGuard<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.armed = false;
                Poll::Ready(frame.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let Some(idle) = *this.idle else {
                    return Poll::Pending;
                };
                if !*this.armed {
                    *this.armed = true;
                    let at = tokio::time::Instant::now() + idle;
                    match this.timer {
                        Some(t) => t.as_mut().reset(at),
                        None => *this.timer = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                }
                let fired = match this.timer {
                    Some(t) => t.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if fired {
                    *this.idle = None;
                    return Poll::Ready(Some(Err(Box::new(StreamIdle(idle)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that holds its connection's in-flight mark until it is sent or dropped
/// (the connection's idle timeout counts only while nothing is in flight).
pub struct InFlightBody {
    inner: ProxyBody,
    _mark: crate::connection::InFlight,
}

impl InFlightBody {
    pub fn wrap(inner: ProxyBody, mark: crate::connection::InFlight) -> ProxyBody {
        InFlightBody { inner, _mark: mark }.boxed()
    }
}

impl Body for InFlightBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A whole body from bytes.
pub fn full(b: impl Into<Bytes>) -> ProxyBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    full(Bytes::new())
}

/// Boxes any body whose error converts to [`BoxError`].
pub fn boxed<B>(b: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed()
}

/// What a mirror receives: `Some(data)` frames, then `None` at the end. A channel closed
/// without `None` means the copy was abandoned (the mirror fell behind), and the mirror's
/// body fails instead of ending short.
type TeeItem = Option<Bytes>;

/// Passes a body through while copying its data frames to mirrors, never waiting for them:
/// a mirror that falls behind by more than its channel capacity is dropped.
pub struct TeeBody {
    inner: ProxyBody,
    copies: Vec<mpsc::Sender<TeeItem>>,
}

/// Frames a mirror may lag behind before its copy is abandoned.
const MIRROR_BUFFER_FRAMES: usize = 64;

impl TeeBody {
    /// Wraps `inner`, returning the pass-through body and one body per mirror.
    pub fn split(inner: ProxyBody, mirrors: usize) -> (ProxyBody, Vec<ProxyBody>) {
        let mut copies = Vec::with_capacity(mirrors);
        let mut bodies = Vec::with_capacity(mirrors);
        for _ in 0..mirrors {
            let (tx, rx) = mpsc::channel(MIRROR_BUFFER_FRAMES);
            copies.push(tx);
            bodies.push(MirrorBody { rx, done: false }.boxed());
        }
        if inner.is_end_stream() {
            for tx in &copies {
                let _ = tx.try_send(None);
            }
            copies.clear();
        }
        (TeeBody { inner, copies }.boxed(), bodies)
    }
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.copies
                        .retain(|tx| tx.try_send(Some(data.clone())).is_ok());
                }
            }
            Poll::Ready(None) => {
                for tx in this.copies.drain(..) {
                    let _ = tx.try_send(None);
                }
            }
            Poll::Ready(Some(Err(_))) => this.copies.clear(),
            Poll::Pending => {}
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

struct MirrorBody {
    rx: mpsc::Receiver<TeeItem>,
    done: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("the mirrored request body was abandoned")]
struct MirrorAbandoned;

impl Body for MirrorBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Some(data))) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Poll::Ready(Some(None)) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(Err(Box::new(MirrorAbandoned))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Counts the data bytes of a body into a shared counter (request bytes for the access log).
pub struct CountingBody {
    inner: ProxyBody,
    count: Arc<AtomicU64>,
}

impl CountingBody {
    pub fn wrap(inner: ProxyBody, count: Arc<AtomicU64>) -> ProxyBody {
        CountingBody { inner, count }.boxed()
    }
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &polled
            && let Some(d) = f.data_ref()
        {
            self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
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

/// A response body that writes the request's access log line once it has been sent (or
/// abandoned, flagged `DC`), with the bytes received and sent and the total duration.
pub struct LoggedBody {
    inner: ProxyBody,
    sent: u64,
    pending: Option<PendingLog>,
}

/// What [`LoggedBody`] needs to finish an entry.
pub struct PendingLog {
    pub logger: Arc<AccessLogger>,
    pub entry: AccessLogEntry,
    pub received: Arc<AtomicU64>,
    pub start: tokio::time::Instant,
}

impl LoggedBody {
    pub fn wrap(inner: ProxyBody, pending: PendingLog) -> ProxyBody {
        let mut b = LoggedBody {
            inner,
            sent: 0,
            pending: Some(pending),
        };
        if b.inner.is_end_stream() {
            b.finish(false);
        }
        b.boxed()
    }

    fn finish(&mut self, abandoned: bool) {
        if let Some(mut p) = self.pending.take() {
            p.entry.bytes_sent = self.sent;
            p.entry.bytes_received = p.received.load(Ordering::Relaxed);
            p.entry.duration = p.start.elapsed();
            if abandoned {
                p.entry
                    .response_flags
                    .insert(ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION);
            }
            p.logger.log(p.entry);
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.sent += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish(false);
                }
            }
            Poll::Ready(None) => self.finish(false),
            Poll::Ready(Some(Err(_))) => self.finish(true),
            Poll::Pending => {}
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

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // Dropped before the end: the downstream went away (or the connection was cut).
        let abandoned = !self.inner.is_end_stream();
        self.finish(abandoned);
    }
}
