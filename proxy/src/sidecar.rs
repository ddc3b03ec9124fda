//! Sidecar mode: connections captured by `mesh-proxy redirect`'s nat rules.
//!
//! Per accepted connection on a `sidecarInbound`/`sidecarOutbound` listener:
//!
//! 1. the original destination is read from the socket (`SO_ORIGINAL_DST`, set by the nat
//!    `REDIRECT`); a connection that was not redirected (its original destination is the
//!    listener itself) is closed, so nothing can loop through the proxy;
//! 2. the protocol is detected by peeking at the first bytes ([`classify`]): an HTTP/1.x
//!    request line or the HTTP/2 preface → HTTP, served by the request path
//!    (`handler::handle`, with routes chosen by the original destination, see `select`); anything else, or
//!    nothing within the detection timeout (server-first protocols) → opaque TCP;
//! 3. opaque TCP is copied both ways untouched: outbound to the mesh Service's TCP backend or
//!    the original destination, inbound to the app on `127.0.0.1:<original port>`. A
//!    destination that refuses is answered with a reset (the proxy already accepted the
//!    connection, so the client sees a reset instead of a refusal, never a success).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::access_log::{AccessLogEntry, ResponseFlags};
use crate::config::{Backend, ListenerKind};
use crate::context::Downstream;
use crate::downstream::{ConnectionTicket, serve_http_connection};
use crate::metrics::{ConnectionGuard, UpstreamErrorKind};
use crate::mtls::{self, DownstreamIo, Inbound, Prefixed};
use crate::state::{ListenerState, Runtime};
use mesh_config::MtlsMode;
use mesh_tls::SpiffeId;
use tokio_util::either::Either;

/// What a captured connection speaks, as far as its first bytes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/1.x request line (`GET `, `POST `, ...).
    Http1,
    /// The HTTP/2 connection preface (`PRI * HTTP/2.0`), prior knowledge (h2c).
    Http2,
    /// Anything else: copied untouched.
    Opaque,
}

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Classifies the first bytes of a connection; `None` means "could still be either: read
/// more". Pure, so tested without sockets.
pub fn classify(first: &[u8]) -> Option<Protocol> {
    if first.is_empty() {
        return None;
    }
    if first.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    if METHODS.iter().any(|m| first.starts_with(m)) {
        return Some(Protocol::Http1);
    }
    let could_be = |pattern: &[u8]| first.len() < pattern.len() && pattern.starts_with(first);
    if could_be(H2_PREFACE) || METHODS.iter().any(|m| could_be(m)) {
        return None;
    }
    Some(Protocol::Opaque)
}

/// Peeks until [`classify`] decides, the peer stops sending (EOF), or `timeout` passes.
async fn detect(stream: &TcpStream, timeout: Duration) -> Protocol {
    let mut buf = [0u8; 16];
    let deadline = Instant::now() + timeout;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return Protocol::Opaque,
        };
        if n == 0 {
            return Protocol::Opaque;
        }
        if let Some(p) = classify(&buf[..n]) {
            return p;
        }
        // Part of a method or preface is here, the rest is on its way: `peek` returns at once
        // while data is buffered, so wait a little instead of spinning.
        if Instant::now() >= deadline {
            return Protocol::Opaque;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The destination the connection had before the nat `REDIRECT`; `None` if it was not
/// redirected (its original destination is the listening socket itself) or unknown.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr().ok()?;
    let dst = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    let dst = dst.ok()?.as_socket()?;
    (dst != local).then_some(dst)
}

/// One accepted connection of a sidecar listener.
pub(crate) struct Captured {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub state: Arc<ArcSwap<ListenerState>>,
    pub rt: Arc<Runtime>,
    pub ticket: ConnectionTicket,
    pub kill: CancellationToken,
    pub detect_timeout: Duration,
}

pub(crate) async fn serve_captured(c: Captured, guard: ConnectionGuard) {
    let Some(dst) = original_dst(&c.stream) else {
        tracing::debug!(peer = %c.peer, "connection was not redirected (no original destination); closing");
        return;
    };
    let (kind, mtls) = {
        let st = c.state.load();
        (st.table.kind, st.table.mtls.clone())
    };
    let Captured {
        stream,
        peer,
        state,
        rt,
        ticket,
        kill,
        detect_timeout,
    } = c;
    let conn = Conn {
        peer,
        state,
        rt,
        ticket,
        kill,
    };
    if kind == ListenerKind::SidecarInbound {
        // What the pod's PeerAuthentication allows on this port (unset: PERMISSIVE).
        let mode = mtls.map_or(MtlsMode::Permissive, |m| m.mode_for(dst.port()));
        match mtls::inbound(stream, mode, conn.rt.mtls(), detect_timeout).await {
            Inbound::Plain(stream) => serve_plain(conn, stream, dst, detect_timeout).await,
            Inbound::Silent(stream) => serve_tcp(conn, Either::Left(stream), dst).await,
            Inbound::Mesh(mut tls, peer_identity) => {
                conn.rt
                    .observer
                    .metrics
                    .mtls_accepted(&conn.state.load().table.name);
                let (protocol, first) = mtls::detect_in(&mut *tls, detect_timeout).await;
                tracing::debug!(peer = %peer, %dst, ?protocol, identity = %peer_identity.id, "mutual TLS connection");
                let io = Either::Right(Prefixed::new(first, *tls));
                match protocol {
                    Protocol::Http1 | Protocol::Http2 => {
                        serve_http(conn, io, dst, Some(peer_identity)).await
                    }
                    Protocol::Opaque => serve_tcp(conn, io, dst).await,
                }
            }
            Inbound::Refused(why) => {
                tracing::debug!(%peer, %dst, ?mode, "inbound connection refused: {why}");
                conn.rt
                    .observer
                    .metrics
                    .mtls_refused(&conn.state.load().table.name);
            }
        }
    } else {
        serve_plain(conn, stream, dst, detect_timeout).await;
    }
    drop(guard);
}

/// What a captured connection is served with, besides its byte stream.
struct Conn {
    peer: SocketAddr,
    state: Arc<ArcSwap<ListenerState>>,
    rt: Arc<Runtime>,
    ticket: ConnectionTicket,
    kill: CancellationToken,
}

/// A plaintext connection: HTTP or opaque TCP, as its first bytes say.
async fn serve_plain(conn: Conn, stream: TcpStream, dst: SocketAddr, detect_timeout: Duration) {
    let protocol = detect(&stream, detect_timeout).await;
    tracing::debug!(peer = %conn.peer, %dst, ?protocol, "captured connection");
    match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            serve_http(conn, Either::Left(stream), dst, None).await
        }
        Protocol::Opaque => serve_tcp(conn, Either::Left(stream), dst).await,
    }
}

async fn serve_http(
    c: Conn,
    stream: DownstreamIo,
    dst: SocketAddr,
    peer_identity: Option<Arc<mtls::PeerIdentity>>,
) {
    let downstream = Downstream {
        peer: c.peer,
        original_dst: Some(dst),
        peer_identity,
    };
    serve_http_connection(stream, downstream, c.state, c.rt, &c.ticket.drain, c.kill).await;
}

/// Inbound: the app, on loopback at the original port.
fn app_addr(dst: SocketAddr) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), dst.port())
}

async fn serve_tcp(mut c: Conn, down: DownstreamIo, dst: SocketAddr) {
    c.ticket.leave_drain();
    let st = c.state.load_full();
    let listener = st.table.name.clone();
    type Target = (Arc<str>, String, Duration, Option<Arc<SpiffeId>>);
    let (backend, target, connect_timeout, identity): Target = match st.table.kind {
        ListenerKind::SidecarInbound => (
            format!("inbound|{}", dst.port()).into(),
            app_addr(dst).to_string(),
            Backend::default_connect_timeout(),
            None,
        ),
        _ => match st
            .table
            .service(dst)
            .and_then(|s| s.tcp_backend.as_ref())
            .and_then(|u| u.pick_endpoint().map(|p| (u, p)))
        {
            Some((u, p)) => (
                u.name.clone(),
                p.endpoint.to_string(),
                u.connect_timeout,
                p.identity.cloned(),
            ),
            None => (
                "passthrough".into(),
                dst.to_string(),
                Backend::default_connect_timeout(),
                None,
            ),
        },
    };
    drop(st);
    let start = Instant::now();
    let start_time = SystemTime::now();
    let metrics = &c.rt.observer.metrics;
    let connected = tokio::time::timeout(connect_timeout, TcpStream::connect(&target)).await;
    let connected = match connected {
        Ok(Ok(up)) => {
            let _ = up.set_nodelay(true);
            // A meshed endpoint: mutual TLS, once this proxy has its certificate.
            match (identity.as_ref(), c.rt.mtls()) {
                (Some(identity), Some(certs)) => {
                    mtls::connect(up, certs, identity, connect_timeout)
                        .await
                        .map(Either::Right)
                }
                _ => Ok(Either::Left(up)),
            }
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    };
    let mut up: mtls::UpstreamIo = match connected {
        Ok(up) => up,
        Err(e) => {
            tracing::debug!(%target, error = %e, "opaque connection: upstream connect failed; resetting downstream");
            metrics.upstream_error(&backend, UpstreamErrorKind::Connect);
            log_tcp(
                &c.rt,
                TcpLog {
                    listener,
                    backend,
                    target,
                    peer: c.peer,
                    start_time,
                    duration: start.elapsed(),
                    received: 0,
                    sent: 0,
                    flags: ResponseFlags::UPSTREAM_CONNECT_FAILURE,
                },
            );
            // Close with RST rather than FIN: the closest a proxy that already accepted can
            // get to "connection refused".
            let _ = mtls::downstream_socket(&down).set_zero_linger();
            return;
        }
    };
    metrics.tcp_connection(&listener, &backend);
    // Envoy's TCP proxy idle timeout: a connection that moves no byte either way for the
    // idle timeout is closed (so silent captured sockets cannot pile up either).
    let idle = c.state.load().snapshot.http.idle_timeout;
    let active = Arc::new(AtomicBool::new(false));
    let mut down_io = Marked {
        inner: down,
        active: active.clone(),
    };
    let (received, sent) = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut down_io, &mut up) => match r {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "opaque connection ended with an error");
                (0, 0)
            }
        },
        _ = idle_expired(&active, idle) => {
            tracing::debug!(peer = %c.peer, ?idle, "opaque connection idle; closing");
            (0, 0)
        }
        _ = c.kill.cancelled() => (0, 0),
    };
    metrics.tcp_bytes(&listener, &backend, received, sent);
    log_tcp(
        &c.rt,
        TcpLog {
            listener,
            backend,
            target,
            peer: c.peer,
            start_time,
            duration: start.elapsed(),
            received,
            sent,
            flags: ResponseFlags::empty(),
        },
    );
}

/// Resolves once `active` has stayed unset for `idle` (checked every eighth of it); never
/// without a timeout.
async fn idle_expired(active: &AtomicBool, idle: Option<Duration>) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    let tick = (idle / 8).clamp(Duration::from_millis(1), Duration::from_secs(30));
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(tick).await;
        if active.swap(false, Ordering::Relaxed) {
            quiet = Duration::ZERO;
        } else {
            quiet += tick;
            if quiet >= idle {
                return;
            }
        }
    }
}

/// The downstream side of an opaque copy, marking every read or write that moved bytes
/// (both directions pass through it).
struct Marked {
    inner: DownstreamIo,
    active: Arc<AtomicBool>,
}

impl tokio::io::AsyncRead for Marked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.active.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl tokio::io::AsyncWrite for Marked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.active.store(true, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct TcpLog {
    listener: Arc<str>,
    backend: Arc<str>,
    target: String,
    peer: SocketAddr,
    start_time: SystemTime,
    duration: Duration,
    received: u64,
    sent: u64,
    flags: ResponseFlags,
}

/// One access log line per opaque connection (`protocol: TCP`, no method/path/status).
fn log_tcp(rt: &Runtime, l: TcpLog) {
    if !rt.observer.access_log_enabled() {
        return;
    }
    rt.observer.access_log.log(AccessLogEntry {
        start_time: l.start_time,
        method: String::new(),
        path: String::new(),
        protocol: "TCP",
        status: 0,
        bytes_received: l.received,
        bytes_sent: l.sent,
        duration: l.duration,
        upstream_host: Some(l.target),
        listener: l.listener,
        route: None,
        backend: Some(l.backend),
        x_request_id: None,
        user_agent: None,
        authority: None,
        downstream_remote_address: Some(l.peer),
        rate_limited: false,
        response_flags: l.flags,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_request_lines_are_http() {
        for m in [
            "GET / HTTP/1.1\r\n",
            "POST /x HTTP/1.0",
            "DELETE ",
            "OPTIONS * HTTP/1.1",
        ] {
            assert_eq!(classify(m.as_bytes()), Some(Protocol::Http1), "{m}");
        }
    }

    #[test]
    fn the_h2_preface_is_http2() {
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(Protocol::Http2)
        );
    }

    #[test]
    fn prefixes_wait_for_more() {
        for p in [
            "G", "GE", "GET", "P", "PO", "PU", "PRI * HT", "OPTIONS", "CONN",
        ] {
            assert_eq!(classify(p.as_bytes()), None, "{p}");
        }
        assert_eq!(classify(b""), None);
    }

    #[test]
    fn anything_else_is_opaque() {
        for p in [
            &b"hello\n"[..],
            b"\x16\x03\x01\x02\x00",
            b"SSH-2.0-OpenSSH",
            b"get / HTTP/1.1",
            b"GETX / HTTP/1.1",
            b"PRI * HTTP/1.1\r\n",
            b"\x00\x00\x00",
        ] {
            assert_eq!(classify(p), Some(Protocol::Opaque), "{p:?}");
        }
    }
}
