//! The config distribution listener (15012) under connections that say nothing: silent TCP,
//! TLS handshaken then silent, HTTP/2 without a stream, a connection whose stream ended; and
//! the connection cap. A real proxy client (`mesh_proxy::distribution::run_client`) is served
//! throughout, and its long-lived stream is never cut by the idle timeout.

use std::collections::BTreeMap;
use std::time::Duration;

use meshctl::net_limits::ConnectionLimits;
use tokio::time::Instant;

use super::{SERVER_NAME, Server, next, silent, walkthrough_resources};

/// About 1,000 connections that never open a stream (plain TCP that never starts TLS, TLS
/// handshaken then silent, TLS with the HTTP/2 preface and nothing more) are closed once the
/// request-headers timeout has passed since they were accepted. Meanwhile a proxy's stream,
/// opened before them, stays open across many idle timeouts and still gets pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_proxy_streams_are_kept() {
    let headers = Duration::from_secs(3);
    let idle = Duration::from_millis(500);
    let mut server = Server::with_limits(ConnectionLimits {
        tls_handshake_timeout: headers,
        request_headers_timeout: headers,
        idle_timeout: idle,
        max_connections: 4096,
    })
    .await;
    let v1 = server
        .publish(walkthrough_resources((80, 20)), BTreeMap::new())
        .to_string();
    let (mut rx, _stop) = server.client(Duration::from_millis(50));
    let u = next(&mut rx).await;
    assert_eq!(u.version, v1);
    u.reply.send(Ok(())).unwrap();
    let ids = server.proxy_ids();
    assert_eq!(ids.len(), 1);
    let stream_opened = Instant::now();

    let addr = server.addr;
    let mut conns = silent::open_many(500, 64, |_| silent::tcp(addr)).await;
    let tls = |then: &'static [u8]| {
        let cfg = server.client_tls();
        move |_| {
            let cfg = cfg.clone();
            async move {
                silent::tls(addr, cfg, SERVER_NAME, then)
                    .await
                    .expect("TLS handshake within its timeout")
            }
        }
    };
    conns.extend(silent::open_many(450, 8, tls(b"")).await);
    conns.extend(silent::open_many(50, 8, tls(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")).await);
    let n = conns.len();
    let times = silent::closed_after(conns, headers + Duration::from_secs(30)).await;
    let summary = silent::summary(&times);
    println!("{n} silent connections: {summary}");
    assert!(times.iter().all(Option::is_some), "{summary}");
    assert!(
        times.iter().flatten().all(|t| *t >= headers),
        "closed too early: {summary}"
    );

    // The proxy's stream outlived many idle timeouts on its one connection, and still works.
    assert!(stream_opened.elapsed() > idle * 4);
    assert_eq!(server.proxy_ids(), ids, "the proxy had to reconnect");
    let v2 = server
        .publish(walkthrough_resources((50, 50)), BTreeMap::new())
        .to_string();
    let u = next(&mut rx).await;
    assert_eq!(u.version, v2);
    u.reply.send(Ok(())).unwrap();
    assert_eq!(server.proxy_ids(), ids, "the proxy had to reconnect");
}

/// An HTTP/2 connection is closed after the idle timeout once its last stream has ended.
#[tokio::test]
async fn connection_without_open_streams_is_closed_after_the_idle_timeout() {
    let idle = Duration::from_millis(1500);
    let server = Server::with_limits(ConnectionLimits {
        tls_handshake_timeout: Duration::from_secs(5),
        request_headers_timeout: Duration::from_secs(5),
        idle_timeout: idle,
        max_connections: 64,
    })
    .await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).unwrap();
    let tls = tokio_rustls::TlsConnector::from(server.client_tls())
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    // Streams that end at once (not the distribution path): each one is activity.
    let mut last_sent = Instant::now();
    for _ in 0..4 {
        last_sent = Instant::now();
        let req = http::Request::get(format!("https://{SERVER_NAME}/nope"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.expect("served");
        assert_eq!(resp.status(), 404);
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let closed = tokio::time::timeout(Duration::from_secs(20), conn).await;
    assert!(
        closed.is_ok(),
        "idle HTTP/2 connection still open after 20 s"
    );
    assert!(
        last_sent.elapsed() >= idle,
        "closed {:?} after the last stream",
        last_sent.elapsed()
    );
}

/// At the connection cap the listener stops accepting; a proxy that connects then gets its
/// config once a connection closes.
#[tokio::test]
async fn proxies_over_the_cap_wait_until_a_connection_closes() {
    let long = Duration::from_secs(60);
    let cap = 5;
    let mut server = Server::with_limits(ConnectionLimits {
        tls_handshake_timeout: long,
        request_headers_timeout: long,
        idle_timeout: long,
        max_connections: cap,
    })
    .await;
    let addr = server.addr;
    let mut holders = silent::open_many(cap, cap, |_| silent::tcp(addr)).await;
    let v1 = server
        .publish(walkthrough_resources((80, 20)), BTreeMap::new())
        .to_string();
    let (mut rx, _stop) = server.client(Duration::from_millis(50));
    assert!(
        tokio::time::timeout(Duration::from_secs(1), rx.recv())
            .await
            .is_err(),
        "a proxy over the cap was served"
    );
    assert!(server.proxy_ids().is_empty());
    drop(holders.pop());
    let u = next(&mut rx).await;
    assert_eq!(u.version, v1);
    u.reply.send(Ok(())).unwrap();
}
