use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use mesh_proxy::testing::{EchoServer, TestClient, get};
use mesh_proxy::{Proxy, ProxyOptions};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

fn two_versions(a: &EchoServer, b: &EchoServer, tag: &str) -> serde_json::Value {
    let mut c = gateway(
        json!([{"name": "r", "filters": [{"type": "responseHeaderModifier",
                  "set": [{"name": "x-config", "value": tag}]}],
                "rateLimit": "big",
                "action": {"type": "forward", "backends": [
                    {"target": {"backend": "a"}, "weight": 50},
                    {"target": {"backend": "b"}, "weight": 50}]}}]),
        json!([backend("a", &[a.endpoint()]), backend("b", &[b.endpoint()])]),
    );
    c["rateLimits"] =
        json!([{"name": "big", "maxTokens": 1_000_000, "tokensPerFill": 1, "fillInterval": "60s"}]);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_loses_no_request() {
    let (a, b) = tokio::join!(EchoServer::start("a"), EchoServer::start("b"));
    // Served on two worker threads: a reload reaches every worker.
    let env = start_on_workers(two_versions(&a, &b, "0"), 2).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut workers = Vec::new();
    for w in 0..6 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), env.url("/"));
        workers.push(tokio::spawn(async move {
            // Even workers reuse keep-alive connections; odd ones open a new one each time.
            let pooled = TestClient::http1();
            while !stop.load(Ordering::Relaxed) {
                let r = if w % 2 == 0 {
                    pooled.get(&url, &[]).await
                } else {
                    get(&url).await
                };
                match r {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(r) => panic!("status {} {}", r.status, r.text()),
                    Err(e) => {
                        eprintln!("request failed: {e:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    for i in 1..=40 {
        tokio::time::sleep(Duration::from_millis(15)).await;
        env.proxy
            .update(config(two_versions(&a, &b, &i.to_string())))
            .await
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} failed, {ok} succeeded");
    assert!(ok > 100, "only {ok} requests");
    let r = get(&env.url("/")).await.unwrap();
    assert_eq!(r.header("x-config"), Some("40"));
    // The bucket survived 40 reloads: one token per request.
    let left = env
        .proxy
        .rate_limiters()
        .get("big")
        .unwrap()
        .bucket()
        .available();
    assert_eq!(left, 1_000_000 - ok as u64 - 1);
    eprintln!("reload under load: {ok} requests, 40 reloads, 0 failures");
}

async fn exchange(conn: &mut tokio::net::TcpStream) -> String {
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn update_keeps_unchanged_sockets_and_rebinds_changed_ones() {
    let a = EchoServer::start("a").await;
    let l = |name: &str, port: u16| {
        json!({"name": name, "port": port, "virtualHosts": [{"name": "v", "hostnames": ["*"],
            "routes": [forward(&format!("r-{name}"), json!({}), "a")]}]})
    };
    let cfg = |ls: Vec<serde_json::Value>| {
        config(json!({"listeners": ls, "backends": [backend("a", &[a.endpoint()])]}))
    };
    let opts = ProxyOptions {
        bind_address: "127.0.0.1".parse().unwrap(),
        listener_port_overrides: HashMap::from([(80, 0), (81, 0)]),
        ..ProxyOptions::default()
    };
    let proxy = Proxy::start(cfg(vec![l("http", 80), l("other", 81)]), opts)
        .await
        .unwrap();
    let http = proxy.address("http").await.unwrap();
    let other = proxy.address("other").await.unwrap();
    assert_ne!(http.port(), 80);
    // An open keep-alive connection on the kept listener.
    let mut conn = tokio::net::TcpStream::connect(http).await.unwrap();
    assert!(exchange(&mut conn).await.starts_with("HTTP/1.1 200"));

    // Drop "other", add "third": "http" keeps its socket and its connection.
    proxy
        .update(cfg(vec![l("http", 80), l("third", 81)]))
        .await
        .unwrap();
    // "third" maps 81 → 0 like "other", but ephemeral ports are per listener: a new socket.
    let third = proxy.address("third").await.unwrap();
    assert_eq!(proxy.address("http").await, Some(http));
    assert_eq!(proxy.address("other").await, None);
    assert_ne!(third, other);
    let r = exchange(&mut conn).await;
    assert!(
        r.starts_with("HTTP/1.1 200"),
        "the open connection survived: {r}"
    );
    assert_eq!(get(&format!("http://{third}/")).await.unwrap().status, 200);
    assert!(
        get(&format!("http://{other}/")).await.is_err(),
        "removed listener is closed"
    );

    // An invalid config changes nothing.
    let mut bad = cfg(vec![l("http", 80)]);
    bad.listeners[0].virtual_hosts[0].routes[0].name = "dup".into();
    let dup = bad.listeners[0].virtual_hosts[0].routes[0].clone();
    bad.listeners[0].virtual_hosts[0].routes.push(dup);
    let err = proxy.update(bad).await.unwrap_err();
    assert!(err.to_string().contains("duplicate route name"), "{err}");
    assert_eq!(proxy.address("third").await, Some(third));
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn graceful_shutdown_lets_in_flight_requests_finish() {
    let slow = EchoServer::slow("slow", Duration::from_millis(600)).await;
    // On worker threads: the drain reaches connections on every worker.
    let env = start_on_workers(
        gateway(
            json!([forward("r", json!({}), "s")]),
            json!([backend("s", &[slow.endpoint()])]),
        ),
        2,
    )
    .await;
    let url = env.url("/");
    let in_flight = tokio::spawn(async move { get(&url).await });
    // An idle keep-alive connection: closed by the drain.
    let mut idle = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let t = std::time::Instant::now();
    let proxy = env.proxy.clone();
    let shutdown = tokio::spawn(async move { proxy.shutdown(Duration::from_secs(5)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        tokio::net::TcpStream::connect(env.addr).await.is_err(),
        "no longer accepting"
    );
    let r = in_flight.await.unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().name, "slow");
    shutdown.await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "drained in {:?}",
        t.elapsed()
    );
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(1), idle.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "idle connection closed");
}

#[tokio::test]
async fn shutdown_grace_period_ends_stuck_requests() {
    let slow = EchoServer::slow("slow", Duration::from_secs(30)).await;
    let env = start_on_workers(
        gateway(
            json!([forward("r", json!({}), "s")]),
            json!([backend("s", &[slow.endpoint()])]),
        ),
        2,
    )
    .await;
    let url = env.url("/");
    let in_flight = tokio::spawn(async move { get(&url).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = std::time::Instant::now();
    env.proxy.clone().shutdown(Duration::from_millis(300)).await;
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(
        in_flight.await.unwrap().is_err(),
        "the stuck request was cut"
    );
}
