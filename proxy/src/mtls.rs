//! Mutual TLS between proxies on the data path: terminating it on a sidecar's inbound side and
//! opening it to meshed endpoints. The certificates, verifiers and configs are `mesh-tls`'s;
//! this module only moves bytes and tells the request path who the peer is.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::HeaderValue;
use mesh_config::MtlsMode;
use mesh_tls::{ClientHelloKind, SpiffeId, WorkloadCertificates, classify_client_hello};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Largest ClientHello the inbound side waits for before it decides (post-quantum key shares
/// make hellos of ~1.3 KB; a hello of more than 16 KB is not one of ours).
const MAX_HELLO_PEEK: usize = 16 * 1024;

/// Who is on the other end of a mutual TLS connection, worked out once per connection.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    pub id: SpiffeId,
    /// `id` as text (metrics label, access log).
    pub principal: Arc<str>,
    /// The element this proxy appends to `X-Forwarded-Client-Cert` (Envoy's format).
    pub xfcc: HeaderValue,
}

/// Peeks at a connection's first bytes until they say whether it is mutual TLS from another
/// proxy, someone else's TLS, or not TLS. `None`: nothing arrived within `timeout` (a
/// server-first protocol); bytes that are still undecided by then count as not TLS.
pub async fn peek_client_hello(stream: &TcpStream, timeout: Duration) -> Option<ClientHelloKind> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 5];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return Some(ClientHelloKind::NotTls),
            Err(_) => return None,
        };
        if n == 0 {
            return Some(ClientHelloKind::NotTls);
        }
        match classify_client_hello(&buf[..n]) {
            ClientHelloKind::Incomplete => {}
            decided => return Some(decided),
        }
        if n == buf.len() {
            if buf.len() >= MAX_HELLO_PEEK {
                return Some(ClientHelloKind::OtherTls);
            }
            // The record header says how long the hello is; peek that much next time.
            let want = if n >= 5 {
                5 + u16::from_be_bytes([buf[3], buf[4]]) as usize
            } else {
                buf.len() * 2
            };
            buf.resize(want.clamp(buf.len() + 1, MAX_HELLO_PEEK), 0);
            continue;
        }
        if Instant::now() >= deadline {
            return Some(ClientHelloKind::NotTls);
        }
        // Part of the hello is here, the rest is on its way.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// How long a mutual TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection accepted by a listener that takes mutual TLS from the mesh, once its first
/// bytes were looked at.
pub enum Inbound {
    /// Plaintext (or, in PERMISSIVE, someone else's TLS): served as before.
    Plain(TcpStream),
    /// Nothing arrived within the detection timeout (a server-first protocol).
    Silent(TcpStream),
    /// Mutual TLS from another proxy of the mesh, terminated.
    Mesh(
        Box<tokio_rustls::server::TlsStream<TcpStream>>,
        Arc<PeerIdentity>,
    ),
    /// Closed: what the mode does not allow, or a handshake that failed.
    Refused(String),
}

/// Looks at an accepted connection and terminates mutual TLS where `mode` says so.
pub async fn inbound(
    stream: TcpStream,
    mode: MtlsMode,
    certs: Option<&Arc<WorkloadCertificates>>,
    detect_timeout: Duration,
) -> Inbound {
    if mode == MtlsMode::Disable {
        return Inbound::Plain(stream);
    }
    let strict = mode == MtlsMode::Strict;
    match peek_client_hello(&stream, detect_timeout).await {
        Some(ClientHelloKind::Mesh) => match certs {
            Some(certs) => match accept(stream, certs, HANDSHAKE_TIMEOUT).await {
                Ok((tls, peer)) => Inbound::Mesh(Box::new(tls), Arc::new(peer)),
                Err(e) => Inbound::Refused(format!("mutual TLS handshake failed: {e}")),
            },
            // Another proxy's TLS cannot be answered yet; it retries.
            None => Inbound::Refused("mutual TLS before this proxy has its certificate".into()),
        },
        _ if strict => Inbound::Refused("not mutual TLS, and the port is STRICT".into()),
        None => Inbound::Silent(stream),
        Some(_) => Inbound::Plain(stream),
    }
}

/// The downstream side of a served connection: the socket, or mutual TLS over it (with the
/// bytes read to detect the protocol inside put back in front).
pub type DownstreamIo =
    tokio_util::either::Either<TcpStream, Prefixed<tokio_rustls::server::TlsStream<TcpStream>>>;

/// The socket under a downstream stream.
pub fn downstream_socket(io: &DownstreamIo) -> &TcpStream {
    match io {
        tokio_util::either::Either::Left(s) => s,
        tokio_util::either::Either::Right(p) => p.inner.get_ref().0,
    }
}

/// The upstream side of an opaque copy: plaintext, or mutual TLS to a meshed endpoint.
pub type UpstreamIo =
    tokio_util::either::Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// Terminates mutual TLS from another proxy: the peer must present a certificate of the mesh.
pub async fn accept(
    stream: TcpStream,
    certs: &WorkloadCertificates,
    timeout: Duration,
) -> io::Result<(tokio_rustls::server::TlsStream<TcpStream>, PeerIdentity)> {
    let acceptor = tokio_rustls::TlsAcceptor::from(certs.server_config());
    let tls = tokio::time::timeout(timeout, acceptor.accept(stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let peer_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .ok_or_else(|| io::Error::new(io::ErrorKind::PermissionDenied, "no client certificate"))?;
    let id = mesh_tls::identity::identity_of(&peer_cert)
        .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e))?;
    let by = certs
        .identity()
        .ok_or_else(|| io::Error::other("no workload certificate"))?;
    let xfcc = HeaderValue::from_str(&mesh_tls::identity::xfcc_element(&by, &peer_cert, &id))
        .map_err(io::Error::other)?;
    let principal = id.to_string().into();
    Ok((
        tls,
        PeerIdentity {
            id,
            principal,
            xfcc,
        },
    ))
}

/// Opens mutual TLS on a connected socket to an endpoint that must prove `expected`.
pub async fn connect(
    tcp: TcpStream,
    certs: &WorkloadCertificates,
    expected: &SpiffeId,
    timeout: Duration,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let peer = tcp.peer_addr()?;
    let connector = tokio_rustls::TlsConnector::from(certs.client_config(expected));
    tokio::time::timeout(
        timeout,
        connector.connect(
            rustls::pki_types::ServerName::IpAddress(peer.ip().into()),
            tcp,
        ),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// A stream whose first bytes were already read (to detect its protocol): they are read
/// again first, then the stream itself.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Prefixed<S> {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads the first bytes of a decrypted stream until the protocol is known (the same rules
/// as for plaintext), and hands them back to be read again.
pub async fn detect_in<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> (crate::sidecar::Protocol, Bytes) {
    use tokio::io::AsyncReadExt;
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(16);
    loop {
        let mut chunk = [0u8; 16];
        let want = 16 - buf.len().min(16);
        let n =
            match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..want.max(1)])).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) | Err(_) => return (crate::sidecar::Protocol::Opaque, buf.into()),
            };
        if n == 0 {
            return (crate::sidecar::Protocol::Opaque, buf.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = crate::sidecar::classify(&buf) {
            return (p, buf.into());
        }
        if buf.len() >= 16 {
            return (crate::sidecar::Protocol::Opaque, buf.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_prefixed_stream_reads_its_prefix_first() {
        let inner: &[u8] = b" world";
        let mut s = Prefixed::new(Bytes::from_static(b"hello"), inner);
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[tokio::test]
    async fn detection_inside_tls_matches_plaintext_rules() {
        let mut h1: &[u8] = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        let (p, first) = detect_in(&mut h1, Duration::from_secs(1)).await;
        assert_eq!(p, crate::sidecar::Protocol::Http1);
        assert!(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n".starts_with(&first));
        let mut h2: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        assert_eq!(
            detect_in(&mut h2, Duration::from_secs(1)).await.0,
            crate::sidecar::Protocol::Http2
        );
        let mut other: &[u8] = b"\x00\x01binary";
        assert_eq!(
            detect_in(&mut other, Duration::from_secs(1)).await.0,
            crate::sidecar::Protocol::Opaque
        );
    }
}
