//! Hostile clients and broken backends, over real sockets: silent and idle connections,
//! the connection cap, hung and stalling backends, h2c upgrades, path normalization tricks,
//! Host rules, malformed request bodies and responses framed twice. Each test asserts what a
//! client (or the backend) sees. docs/http-behaviour.md lists the same cases as a table.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proxy::testing::{EchoServer, TestClient, raw_exchange};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::common::{self, Env, backend, forward, gateway};

/// A proxy forwarding everything to `echo`, with these `http` options.
async fn proxy_with(echo: &EchoServer, http: Value) -> Env {
    let mut cfg = gateway(
        json!([forward(
            "all",
            json!({"path": {"type": "prefix", "value": "/"}}),
            "b"
        )]),
        json!([backend("b", &[echo.endpoint()])]),
    );
    cfg["http"] = http;
    common::start(cfg).await
}

/// Reads until EOF or reset; `None` if the peer keeps the connection open past `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(start + limit, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

fn status_of(raw: &str) -> u16 {
    raw.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"))
}

/// Counter value of `mesh_upstream_errors_total` lines (all backends and kinds).
fn upstream_errors(env: &Env) -> f64 {
    env.proxy
        .metrics()
        .encode()
        .lines()
        .filter(|l| l.starts_with("mesh_upstream_errors_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_silent_connections_are_closed_while_a_normal_client_is_served() {
    let echo = EchoServer::start("b").await;
    let env = proxy_with(&echo, json!({"requestHeadersTimeout": "1s"})).await;
    // Nothing; part of an HTTP/1 head; part of the HTTP/2 preface; a whole h2c preface and
    // SETTINGS frame with no stream ever opened.
    let h2_settings: &[u8] =
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let starts: [&[u8]; 4] = [
        b"",
        b"GET / HTTP/1.1\r\nHost: x\r\n",
        b"PRI * HT",
        h2_settings,
    ];
    let opened = Instant::now();
    let mut silent = Vec::new();
    for i in 0..1000 {
        let mut s = TcpStream::connect(env.addr).await.expect("connect");
        s.write_all(starts[i % 4]).await.unwrap();
        silent.push(s);
    }
    // A normal client keeps being served while they sit there.
    let client = TestClient::http1();
    for _ in 0..20 {
        let r = client.get(&env.url("/ok"), &[]).await.expect("served");
        assert_eq!(r.status, 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut open = 0;
    for s in &mut silent {
        let left = Duration::from_secs(4).saturating_sub(opened.elapsed());
        if closed_within(s, left.max(Duration::from_millis(10)))
            .await
            .is_none()
        {
            open += 1;
        }
    }
    assert_eq!(
        open, 0,
        "silent connections still open 4s after a 1s headers timeout"
    );
    assert!(
        opened.elapsed() >= Duration::from_secs(1),
        "closed before the timeout"
    );
    assert_eq!(client.get(&env.url("/ok"), &[]).await.unwrap().status, 200);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let echo = EchoServer::start("b").await;
    let env = proxy_with(
        &echo,
        json!({"requestHeadersTimeout": "5s", "idleTimeout": "800ms"}),
    )
    .await;
    let mut s = TcpStream::connect(env.addr).await.unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let closed = closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("idle connection closed");
    assert!(
        closed >= Duration::from_millis(700),
        "closed too early: {closed:?}"
    );

    // HTTP/2: the connection is closed (GOAWAY) once no stream is open.
    let tcp = TcpStream::connect(env.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(env.url("/h2"))
        .body(mesh_proxy::body::empty())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("idle HTTP/2 connection closed by the proxy")
        .unwrap()
        .ok();
}

#[tokio::test]
async fn at_the_connection_cap_new_connections_wait_until_one_closes() {
    let echo = EchoServer::start("b").await;
    let env = proxy_with(
        &echo,
        json!({"requestHeadersTimeout": "30s", "maxConnections": 2}),
    )
    .await;
    let a = TcpStream::connect(env.addr).await.unwrap();
    let _b = TcpStream::connect(env.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The third connects (kernel backlog) but is not served while two are open.
    let mut c = TcpStream::connect(env.addr).await.unwrap();
    c.write_all(b"GET /third HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let early = tokio::time::timeout(Duration::from_millis(500), c.read(&mut buf)).await;
    assert!(early.is_err(), "served over the cap");
    drop(a);
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("served once a slot was freed")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

/// A backend on raw TCP: `serve` gets each accepted connection.
async fn raw_backend<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let serve = Arc::new(serve);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

/// Reads a request head (up to the blank line) from a backend connection.
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

async fn proxy_to(addr: SocketAddr, http: Value) -> Env {
    let mut cfg = gateway(
        json!([forward(
            "all",
            json!({"path": {"type": "prefix", "value": "/"}}),
            "b"
        )]),
        json!([backend("b", &[addr.to_string()])]),
    );
    cfg["http"] = http;
    common::start(cfg).await
}

#[tokio::test]
async fn a_backend_that_never_answers_gets_504_after_the_stream_idle_timeout() {
    let hung = raw_backend(|mut s| async move {
        let _ = read_head(&mut s).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    let env = proxy_to(hung, json!({"streamIdleTimeout": "500ms"})).await;
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), common_get(&env, "/hang"))
        .await
        .expect("answered");
    assert_eq!(r.status, 504);
    assert_eq!(r.text(), "stream timeout\n");
    assert!(start.elapsed() >= Duration::from_millis(450));
    assert!(upstream_errors(&env) >= 1.0);
}

async fn common_get(env: &Env, path: &str) -> mesh_proxy::testing::TestResponse {
    TestClient::http1().get(&env.url(path), &[]).await.unwrap()
}

#[tokio::test]
async fn a_backend_that_stalls_mid_body_ends_the_response_after_the_stream_idle_timeout() {
    let stall = raw_backend(|mut s| async move {
        let _ = read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            .await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    let env = proxy_to(stall, json!({"streamIdleTimeout": "500ms"})).await;
    let mut s = TcpStream::connect(env.addr).await.unwrap();
    s.write_all(b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stalled response was never ended");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("0123456789"), "only the data sent: {text}");
}

/// A backend that answers every request with 101 and then records what arrives on the
/// connection; what it saw is in the returned log.
async fn switching_backend() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l2 = log.clone();
    let addr = raw_backend(move |mut s| {
        let log = l2.clone();
        async move {
            let head = read_head(&mut s).await;
            log.lock().unwrap().push(head);
            let _ = s
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
                .await;
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                log.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    })
    .await;
    (addr, log)
}

#[tokio::test]
async fn an_h2c_upgrade_is_never_tunnelled() {
    let (addr, log) = switching_backend().await;
    let env = proxy_to(addr, json!({})).await;
    let mut s = TcpStream::connect(env.addr).await.unwrap();
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
          HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answered")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    // Whatever the client sends next is a new request, routed like any other: nothing
    // reaches the backend except through the request path (which adds x-request-id).
    let _ = s
        .write_all(b"GET /next HTTP/1.1\r\nHost: x\r\nX-Probe: raw\r\n\r\n")
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = log.lock().unwrap().clone();
    assert!(!seen.is_empty());
    for chunk in &seen {
        let c = chunk.to_ascii_lowercase();
        assert!(
            c.contains("x-request-id:"),
            "bytes reached the backend unrouted: {c}"
        );
        assert!(!c.contains("upgrade:"), "{c}");
        assert!(!c.contains("http2-settings"), "{c}");
    }

    // A well-behaved backend answers the same request as a plain one.
    let echo = EchoServer::start("b").await;
    let env = proxy_with(&echo, json!({})).await;
    let raw = raw_exchange(
        env.addr,
        b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(status_of(&raw), 200, "{raw}");
    let seen = &echo.requests()[0];
    assert!(seen.headers.get("upgrade").is_none());
    assert!(seen.headers.get("http2-settings").is_none());
}

/// Two routes: `/public` → backend "public", `/secret` → backend "secret".
async fn public_and_secret(normalization: Option<&str>) -> (Env, EchoServer, EchoServer) {
    let public = EchoServer::start("public").await;
    let secret = EchoServer::start("secret").await;
    let prefix = |p: &str| json!({"path": {"type": "prefix", "value": p}});
    let mut cfg = gateway(
        json!([
            forward("public", prefix("/public"), "public"),
            forward("secret", prefix("/secret"), "secret"),
        ]),
        json!([
            backend("public", &[public.endpoint()]),
            backend("secret", &[secret.endpoint()]),
        ]),
    );
    if let Some(n) = normalization {
        cfg["http"] = json!({ "pathNormalization": n });
    }
    (common::start(cfg).await, public, secret)
}

/// Sends `GET target` and returns (status, backend name, path the backend saw).
async fn route_of(env: &Env, target: &str) -> (u16, String, String) {
    let req = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let raw = raw_exchange(env.addr, req.as_bytes(), Duration::from_secs(2)).await;
    let status = status_of(&raw);
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or("");
    match serde_json::from_str::<Value>(body) {
        Ok(v) => (
            status,
            v["name"].as_str().unwrap_or("").to_string(),
            v["path"].as_str().unwrap_or("").to_string(),
        ),
        Err(_) => (status, String::new(), String::new()),
    }
}

#[tokio::test]
async fn dot_segments_and_encoded_dots_are_routed_as_the_normalized_path() {
    let (env, public, _secret) = public_and_secret(None).await;
    for target in [
        "/public/../secret",
        "/public/%2e%2e/secret",
        "/public/%2E%2E/secret",
        "/public/.%2e/secret",
        "/public/./../secret",
        "/public/../../secret",
    ] {
        let (status, name, path) = route_of(&env, target).await;
        assert_eq!(
            (status, name.as_str(), path.as_str()),
            (200, "secret", "/secret"),
            "{target}"
        );
    }
    // Unreserved escapes are decoded, the query is kept as sent.
    let (_, name, path) = route_of(&env, "/%70ublic/x?a=%2e%2e").await;
    assert_eq!(
        (name.as_str(), path.as_str()),
        ("public", "/public/x?a=%2e%2e")
    );
    // An encoded NUL is refused under every option.
    assert_eq!(route_of(&env, "/public/a%00b").await.0, 400);
    assert!(public.requests().iter().all(|r| !r.path.contains("%00")));
}

#[tokio::test]
async fn path_normalization_follows_the_configured_option() {
    let (env, _p, _s) = public_and_secret(Some("NONE")).await;
    let (_, name, path) = route_of(&env, "/public/../secret").await;
    assert_eq!(
        (name.as_str(), path.as_str()),
        ("public", "/public/../secret")
    );

    let (env, _p, _s) = public_and_secret(Some("BASE")).await;
    assert_eq!(route_of(&env, "//secret").await.0, 404);

    let (env, _p, _s) = public_and_secret(Some("MERGE_SLASHES")).await;
    let (_, name, path) = route_of(&env, "//secret//x").await;
    assert_eq!((name.as_str(), path.as_str()), ("secret", "/secret/x"));
    let (_, name, _) = route_of(&env, "/public%2f..%2fsecret").await;
    assert_ne!(name, "secret");

    let (env, _p, _s) = public_and_secret(Some("DECODE_AND_MERGE_SLASHES")).await;
    let (_, name, path) = route_of(&env, "/public%2f..%2fsecret").await;
    assert_eq!((name.as_str(), path.as_str()), ("secret", "/secret"));
}

#[tokio::test]
async fn bad_host_headers_are_answered_400_and_never_reach_the_backend() {
    let echo = EchoServer::start("b").await;
    let env = proxy_with(&echo, json!({})).await;
    for (why, req) in [
        (
            "missing Host",
            "GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        ),
        (
            "missing Host, absolute-form",
            "GET http://x/ HTTP/1.1\r\nConnection: close\r\n\r\n",
        ),
        (
            "duplicate Host",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
        ),
        (
            "Host with a space",
            "GET / HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
        ),
        (
            "Host with a slash",
            "GET / HTTP/1.1\r\nHost: a/b\r\nConnection: close\r\n\r\n",
        ),
        (
            "Host with userinfo",
            "GET / HTTP/1.1\r\nHost: user@a\r\nConnection: close\r\n\r\n",
        ),
        (
            "Host with a bad port",
            "GET / HTTP/1.1\r\nHost: a:99999\r\nConnection: close\r\n\r\n",
        ),
        (
            "empty Host",
            "GET / HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n",
        ),
        (
            "absolute-form with userinfo",
            "GET http://user@evil.example/ HTTP/1.1\r\nHost: good.example\r\nConnection: close\r\n\r\n",
        ),
    ] {
        let raw = raw_exchange(env.addr, req.as_bytes(), Duration::from_secs(2)).await;
        assert_eq!(status_of(&raw), 400, "{why}: {raw}");
    }
    assert!(
        echo.requests().is_empty(),
        "a bad request reached the backend"
    );

    // Absolute-form: the target's authority is what routes and what the backend sees.
    let raw = raw_exchange(
        env.addr,
        b"GET http://real.example/p HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(status_of(&raw), 200, "{raw}");
    assert_eq!(echo.requests()[0].headers["host"], "real.example");
    // HTTP/1.0 may omit Host.
    let raw = raw_exchange(
        env.addr,
        b"GET /old HTTP/1.0\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(status_of(&raw), 200, "{raw}");
}

#[tokio::test]
async fn an_http2_host_that_differs_from_its_authority_is_refused() {
    let echo = EchoServer::start("b").await;
    let env = proxy_with(&echo, json!({})).await;
    let h2 = TestClient::http2();
    let ok = h2.get(&env.url("/same"), &[]).await.unwrap();
    assert_eq!(ok.status, 200);
    let r = h2
        .get(&env.url("/differs"), &[("host", "elsewhere.example")])
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(echo.requests().len(), 1);
}

#[tokio::test]
async fn malformed_request_bodies_are_400_and_not_the_backends_fault() {
    let echo = EchoServer::start("b").await;
    let env = proxy_with(&echo, json!({})).await;
    let raw = raw_exchange(
        env.addr,
        b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(status_of(&raw), 400, "{raw}");

    // A body shorter than its Content-Length (the client gives up half way).
    let mut s = TcpStream::connect(env.addr).await.unwrap();
    s.write_all(b"POST /short HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly this")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert_eq!(upstream_errors(&env), 0.0, "the backend was blamed");
    let metrics = env.proxy.metrics().encode();
    let bad: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("mesh_requests_total") && l.contains("code=\"400\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(bad >= 2.0, "both counted as 400s:\n{metrics}");
}

#[tokio::test]
async fn a_response_with_both_content_length_and_chunked_is_not_truncated() {
    let twice = raw_backend(|mut s| async move {
        let _ = read_head(&mut s).await;
        let _ = s
            .write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
                  b\r\nhello world\r\n0\r\n\r\n",
            )
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    })
    .await;
    let env = proxy_to(twice, json!({})).await;
    let r = common_get(&env, "/both").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello world");
}

#[tokio::test]
async fn a_slow_upload_is_not_a_stalled_stream() {
    let echo = EchoServer::start("b").await;
    let env = proxy_with(&echo, json!({"streamIdleTimeout": "400ms"})).await;
    let mut s = TcpStream::connect(env.addr).await.unwrap();
    s.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // Eight bytes over ~1.6 s: four times the stream idle timeout, never silent for long.
    for b in b"abcdefgh" {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.write_all(&[*b]).await.unwrap();
    }
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(status_of(&out), 200, "{out}");
    assert_eq!(&echo.requests()[0].body[..], b"abcdefgh");
}
