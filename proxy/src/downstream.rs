//! Serving HTTP on one accepted downstream connection: hyper's HTTP/1.1 and HTTP/2 server
//! (with upgrades) in front of the request path, the connection's watchdog, and the drain.
//! Gateway listeners (`server`) and captured sidecar connections (`sidecar`) both end here.

use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::config::HttpLimits;
use crate::connection::{ConnWatch, Expiry, HttpSettings, Slot, watchdog};
use crate::context::Downstream;
use crate::handler::handle;
use crate::state::{ListenerState, Runtime};

/// What a served connection holds until it ends: its place under the cap and in the drain.
pub(crate) struct ConnectionTicket {
    _slot: Slot,
    /// Held while the drain should wait for this connection.
    draining: Option<TaskTrackerToken>,
    /// Cancelled when the listener stops: finish in-flight requests, then close.
    pub drain: CancellationToken,
}

impl ConnectionTicket {
    pub(crate) fn new(
        slot: Slot,
        draining: TaskTrackerToken,
        drain: CancellationToken,
    ) -> ConnectionTicket {
        ConnectionTicket {
            _slot: slot,
            draining: Some(draining),
            drain,
        }
    }

    /// The drain stops waiting for this connection (opaque TCP copies end with `kill`).
    pub(crate) fn leave_drain(&mut self) {
        self.draining = None;
    }
}

/// Serves HTTP/1.1 or HTTP/2 (with upgrades) on one accepted connection until the client
/// closes it, the drain or the watchdog closes it, or `kill` fires. `stream` is the
/// connection's byte stream as the request path should read it (the accepted socket today;
/// a layer that unwraps the bytes first, such as TLS, hands over its own stream).
pub(crate) async fn serve_http_connection<S>(
    stream: S,
    downstream: Downstream,
    state: Arc<ArcSwap<ListenerState>>,
    rt: Arc<Runtime>,
    drain: &CancellationToken,
    kill: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = downstream.peer;
    let (limits, http) = {
        let st = state.load();
        (st.table.limits, st.snapshot.http.clone())
    };
    let watch = Arc::new(ConnWatch::default());
    let svc = {
        let watch = watch.clone();
        service_fn(move |req| {
            let st = state.load_full();
            let in_flight = watch.begin();
            handle(rt.clone(), st, downstream.clone(), req, in_flight)
        })
    };
    let builder = server_builder(limits, &http);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let dog = watchdog(&watch, http.request_headers_timeout, http.idle_timeout);
    tokio::pin!(dog);
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            _ = drain.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            why = &mut dog, if !closing => match why {
                Expiry::RequestHeaders => {
                    tracing::debug!(%peer, timeout = ?http.request_headers_timeout, "no request head in time; closing the connection");
                    break;
                }
                Expiry::Idle => {
                    tracing::debug!(%peer, timeout = ?http.idle_timeout, "idle connection; closing");
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            },
            _ = kill.cancelled() => break,
        }
    }
}

fn server_builder(limits: HttpLimits, http: &HttpSettings) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // The request path checks the exact limits (and answers 431 with a body); hyper's own
    // parser limits sit above them as a backstop (hyper answers 431 without a body).
    let max_headers = (limits.max_headers as usize).saturating_mul(2).max(100);
    let max_buf = (limits.max_header_bytes as usize)
        .saturating_mul(2)
        .max(64 * 1024);
    // Later request heads on a keep-alive connection: hyper's timer, armed at their first
    // byte (the first head is the watchdog's).
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(http.request_headers_timeout)
        .keep_alive(true)
        .max_headers(max_headers)
        .max_buf_size(max_buf);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes.saturating_mul(2).max(16 * 1024));
    b
}
