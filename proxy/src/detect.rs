//! What a connection speaks, from its first bytes: an HTTP/1.x request line or the HTTP/2
//! preface → HTTP, anything else → opaque. Used on captured sidecar connections (peeked, so
//! nothing is consumed) and inside mutual TLS (read, then put back in front).

use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncRead;
use tokio::net::TcpStream;
use tokio::time::Instant;

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
pub(crate) async fn detect(stream: &TcpStream, timeout: Duration) -> Protocol {
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

/// Reads the first bytes of a decrypted stream until the protocol is known (the same rules
/// as for plaintext), and hands them back to be read again.
pub async fn detect_in<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> (Protocol, Bytes) {
    use tokio::io::AsyncReadExt;
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(16);
    loop {
        let mut chunk = [0u8; 16];
        let want = 16 - buf.len().min(16);
        let n =
            match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..want.max(1)])).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) | Err(_) => return (Protocol::Opaque, buf.into()),
            };
        if n == 0 {
            return (Protocol::Opaque, buf.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = classify(&buf) {
            return (p, buf.into());
        }
        if buf.len() >= 16 {
            return (Protocol::Opaque, buf.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn detection_inside_tls_matches_plaintext_rules() {
        let mut h1: &[u8] = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        let (p, first) = detect_in(&mut h1, Duration::from_secs(1)).await;
        assert_eq!(p, Protocol::Http1);
        assert!(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n".starts_with(&first));
        let mut h2: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        assert_eq!(
            detect_in(&mut h2, Duration::from_secs(1)).await.0,
            Protocol::Http2
        );
        let mut other: &[u8] = b"\x00\x01binary";
        assert_eq!(
            detect_in(&mut other, Duration::from_secs(1)).await.0,
            Protocol::Opaque
        );
    }
}
