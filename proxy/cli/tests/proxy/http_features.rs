use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use mesh_proxy::testing::{EchoServer, TestClient, raw_exchange};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

async fn one_backend(name: &str) -> (EchoServer, Env) {
    let s = EchoServer::start(name).await;
    let env = start(gateway(
        json!([forward("r", json!({}), "b")]),
        json!([backend("b", &[s.endpoint()])]),
    ))
    .await;
    (s, env)
}

/// Reads one HTTP/1.1 response head (up to the blank line) from a stream.
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "eof in head: {head:?}");
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("content-length")
}

#[tokio::test]
async fn keep_alive_is_reused_downstream_and_upstream() {
    let (s, env) = one_backend("a").await;
    let mut conn = TcpStream::connect(env.addr).await.unwrap();
    for i in 0..5 {
        conn.write_all(format!("GET /k{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let head = read_head(&mut conn).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let mut body = vec![0u8; content_length(&head)];
        conn.read_exact(&mut body).await.unwrap();
    }
    assert_eq!(s.requests().len(), 5);
    assert_eq!(
        s.connections(),
        1,
        "the upstream connection is pooled and reused"
    );
}

/// A keep-alive HTTP/1.1 backend that answers `status` with `body` once per connection,
/// then closes it (like a backend whose idle timeout is shorter than the proxy's).
async fn one_shot_backend(
    status: &'static str,
    body: &'static str,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut b = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
                // No `connection: close`: the proxy learns of the close only from the socket.
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn a_pooled_connection_the_backend_closed_is_not_used_again() {
    let (endpoint, accepted) = one_shot_backend("200 OK", "hello").await;
    let env = start(gateway(
        json!([forward("r", json!({}), "b")]),
        json!([backend("b", &[endpoint])]),
    ))
    .await;
    let client = TestClient::http1();
    for i in 0..3 {
        let r = client.get(&env.url(&format!("/c{i}")), &[]).await.unwrap();
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.text(), "hello");
        // Let the backend's close reach the proxy's idle connection.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_connection_is_reused_after_a_response_without_a_body() {
    let (s, env) = one_backend("a").await;
    let client = TestClient::http1();
    for i in 0..4 {
        // HEAD: a response head with no body to read.
        let req = http::Request::head(env.url(&format!("/h{i}")))
            .body(mesh_proxy::testing::body(""))
            .unwrap();
        let r = client.send(req).await.unwrap();
        assert_eq!(r.status, 200);
    }
    assert_eq!(s.requests().len(), 4);
    assert_eq!(
        s.connections(),
        1,
        "the upstream connection came back to the pool"
    );
}

#[tokio::test]
async fn chunked_request_and_response_bodies_stream() {
    let (_s, env) = one_backend("a").await;
    // Request body sent in chunks, over time, echoed back as it arrives.
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<Frame<Bytes>, mesh_proxy::body::BoxError>>(4);
    let body = StreamBody::new(tokio_stream_from(rx)).boxed();
    let req = http::Request::post(env.url("/stream"))
        .header("x-echo-stream", "1")
        .body(body)
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<mesh_proxy::body::ProxyBody>();
    let resp_fut = tokio::spawn(async move { client.request(req).await });
    tx.send(Ok(Frame::data(Bytes::from_static(b"first,"))))
        .await
        .unwrap();
    let resp = resp_fut.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("content-length").is_none());
    let mut body = resp.into_body();
    // The first chunk comes back before the request body is complete: nothing is buffered.
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first chunk streamed back")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first,");
    tx.send(Ok(Frame::data(Bytes::from_static(b"second"))))
        .await
        .unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "second");

    // A chunked response from the backend arrives chunked and whole.
    let raw = raw_exchange(
        env.addr,
        b"GET /c HTTP/1.1\r\nHost: x\r\nx-echo-chunks: 3\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        raw.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{raw}"
    );
    assert!(
        raw.contains("chunk 0\n") && raw.contains("chunk 2\n"),
        "{raw}"
    );
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + Sync + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled() {
    let (s, env) = one_backend("ws").await;
    let mut conn = TcpStream::connect(env.addr).await.unwrap();
    conn.write_all(
        b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut conn).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    for msg in [&b"hello"[..], b"world, again"] {
        conn.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
    }
    let seen = &s.requests()[0];
    assert_eq!(seen.headers["upgrade"], "websocket");
    assert_eq!(
        seen.headers["sec-websocket-key"],
        "dGhlIHNhbXBsZSBub25jZQ=="
    );
}

#[tokio::test]
async fn h2c_downstream_and_h2c_upstream() {
    let s = EchoServer::start("a").await;
    let env = start(gateway(
        json!([
            forward(
                "h1",
                json!({"path": {"type": "prefix", "value": "/h1"}}),
                "b1"
            ),
            forward(
                "h2",
                json!({"path": {"type": "prefix", "value": "/h2"}}),
                "b2"
            )
        ]),
        json!([backend("b1", &[s.endpoint()]),
               {"name": "b2", "endpoints": [s.endpoint()], "protocol": "http2"}]),
    ))
    .await;
    let c = TestClient::http2();
    let r = c.get(&env.url("/h1"), &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.version, http::Version::HTTP_2);
    let e = r.echo();
    assert_eq!(e.version, "HTTP/1.1");
    assert_eq!(e.header("host"), Some(env.addr.to_string().as_str()));
    let r = TestClient::http1().get(&env.url("/h2"), &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().version, "HTTP/2.0");
    let r = c.get(&env.url("/h2"), &[]).await.unwrap();
    assert_eq!(r.echo().version, "HTTP/2.0");
}

#[tokio::test]
async fn hop_by_hop_removed_forwarded_headers_and_request_id() {
    let (s, env) = one_backend("a").await;
    let raw = raw_exchange(
        env.addr,
        b"GET /h HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, x-hop\r\nKeep-Alive: timeout=5\r\n\
          x-hop: 1\r\nTE: trailers\r\nProxy-Authorization: secret\r\nx-echo-hop: 1\r\n\
          X-Forwarded-For: 203.0.113.9\r\nx-forwarded-proto: https\r\n\r\n",
        Duration::from_millis(500),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let lower = raw.to_ascii_lowercase();
    assert!(
        !lower.contains("x-private"),
        "response hop-by-hop removed: {raw}"
    );
    assert!(!lower.contains("timeout=5"), "{raw}");
    let seen = &s.requests()[0].headers;
    for h in [
        "connection",
        "keep-alive",
        "x-hop",
        "te",
        "proxy-authorization",
    ] {
        assert!(seen.get(h).is_none(), "{h} was forwarded: {seen:?}");
    }
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    let id = seen["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 36);

    let r = TestClient::http1()
        .get(&env.url("/"), &[("x-request-id", "given-id")])
        .await
        .unwrap();
    assert_eq!(r.echo().header("x-request-id"), Some("given-id"));
    assert_eq!(r.echo().header("x-forwarded-for"), Some("127.0.0.1"));
}

#[tokio::test]
async fn too_many_or_too_large_headers_get_431() {
    let s = EchoServer::start("a").await;
    let mut cfg = gateway(
        json!([forward("r", json!({}), "b")]),
        json!([backend("b", &[s.endpoint()])]),
    );
    cfg["listeners"][0]["limits"] = json!({"maxHeaders": 20, "maxHeaderBytes": 2048});
    let env = start(cfg).await;
    let req =
        |extra: &str| format!("GET / HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n");
    let ok = raw_exchange(
        env.addr,
        req("x-a: 1\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let many: String = (0..25).map(|i| format!("x-h{i}: v\r\n")).collect();
    let r = raw_exchange(env.addr, req(&many).as_bytes(), Duration::from_secs(5)).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    assert!(r.ends_with("request header fields too large\n"), "{r}");
    let big = format!("x-big: {}\r\n", "a".repeat(3000));
    let r = raw_exchange(env.addr, req(&big).as_bytes(), Duration::from_secs(5)).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    // Far over the limits: hyper's parser refuses before the request path runs.
    let huge: String = (0..500).map(|i| format!("x-h{i}: v\r\n")).collect();
    let r = raw_exchange(env.addr, req(&huge).as_bytes(), Duration::from_secs(5)).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    assert_eq!(s.requests().len(), 1);
}

#[tokio::test]
async fn access_log_line_per_request_and_metrics() {
    let s = EchoServer::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let mut cfg = gateway(
        json!([forward("r", json!({}), "b")]),
        json!([backend("b", &[s.endpoint()])]),
    );
    cfg["accessLog"] = json!({"path": log.to_str().unwrap()});
    let env = start(cfg).await;
    let req = http::Request::post(env.url("/logged?token=secret"))
        .header("x-request-id", "rid-1")
        .header("user-agent", "t/1")
        .body(mesh_proxy::testing::body("hello"))
        .unwrap();
    let r = TestClient::http1().send(req).await.unwrap();
    assert_eq!(r.status, 200);
    let mut line = String::new();
    for _ in 0..100 {
        line = std::fs::read_to_string(&log).unwrap_or_default();
        if !line.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v: serde_json::Value = serde_json::from_str(line.trim()).expect(&line);
    assert_eq!(v["path"], "/logged", "no query string: {line}");
    assert_eq!(v["status"], 200);
    assert_eq!(v["route"], "r");
    assert_eq!(v["backend"], "b");
    assert_eq!(v["x_request_id"], "rid-1");
    assert_eq!(v["user_agent"], "t/1");
    assert_eq!(v["upstream_host"], s.endpoint());
    assert_eq!(v["listener"], "l");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["bytes_received"], 5);
    assert_eq!(v["bytes_sent"], r.body.len());
    let m = env.proxy.metrics();
    assert_eq!(m.requests_count("l", "r", "b", 200), 1);
}
