//! Clients that connect and then say nothing (or say half a thing), for the listener limits
//! tests of the webhook and of config distribution.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// One open connection the server is expected to close.
pub struct Silent {
    stream: Box<dyn AsyncRead + Unpin + Send>,
    /// Before `connect`: the server cannot have accepted it earlier.
    pub opened: Instant,
}

/// A TCP connection that never starts its TLS handshake.
pub async fn tcp(addr: SocketAddr) -> Silent {
    let opened = Instant::now();
    let stream = TcpStream::connect(addr).await.expect("TCP connect");
    Silent {
        stream: Box::new(stream),
        opened,
    }
}

/// A connection that completes its TLS handshake, then writes `then` (maybe nothing).
pub async fn tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
    then: &[u8],
) -> std::io::Result<Silent> {
    let opened = Instant::now();
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    if !then.is_empty() {
        tls.write_all(then).await?;
        tls.flush().await?;
    }
    Ok(Silent {
        stream: Box::new(tls),
        opened,
    })
}

/// Waits until the server closes each connection (EOF or error on read), for at most
/// `within` from now. Returns, per connection, how long after it was opened it was closed,
/// or `None` if it is still open.
pub async fn closed_after(conns: Vec<Silent>, within: Duration) -> Vec<Option<Duration>> {
    let deadline = Instant::now() + within;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                loop {
                    match tokio::time::timeout_at(deadline, c.stream.read(&mut buf)).await {
                        Err(_) => return None,
                        Ok(Ok(0)) | Ok(Err(_)) => return Some(c.opened.elapsed()),
                        // A server may answer a half-sent request before closing; keep reading.
                        Ok(Ok(_)) => continue,
                    }
                }
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("reader task"));
    }
    out
}

/// Opens `n` connections with `open`, at most `parallel` at a time.
pub async fn open_many<F, Fut>(n: usize, parallel: usize, open: F) -> Vec<Silent>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Silent>,
{
    use futures::StreamExt;
    futures::stream::iter(0..n)
        .map(open)
        .buffer_unordered(parallel)
        .collect()
        .await
}

/// Summary for assertion messages: how many closed, and the range of times.
pub fn summary(times: &[Option<Duration>]) -> String {
    let closed: Vec<Duration> = times.iter().flatten().copied().collect();
    format!(
        "{} of {} closed, after {:?}..{:?}",
        closed.len(),
        times.len(),
        closed.iter().min(),
        closed.iter().max()
    )
}
