//! A quick throughput figure (ignored by default):
//! `cargo test -p mesh-proxy --test proxy bench -- --ignored --nocapture`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mesh_proxy::testing::{EchoServer, TestClient};
use serde_json::json;

use crate::common::*;

async fn rate(url: String, concurrency: usize, for_: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let client = TestClient::http1();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (stop, done, client, url) = (stop.clone(), done.clone(), client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = client.get(&url, &[]).await.unwrap();
                assert_eq!(r.status, 200);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let t = Instant::now();
    tokio::time::sleep(for_).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_keep_alive_requests_per_second() {
    let s = EchoServer::start("a").await;
    let env = start(gateway(
        json!([{"name": "r", "filters": [{"type": "requestHeaderModifier",
                    "add": [{"name": "x-mesh", "value": "istio"}]}],
                "action": {"type": "forward", "backends": [{"target": {"backend": "a"}, "weight": 1}]}}]),
        json!([backend("a", &[s.endpoint()])]),
    ))
    .await;
    let direct = rate(format!("http://{}/", s.addr), 8, Duration::from_secs(3)).await;
    let proxied = rate(env.url("/"), 8, Duration::from_secs(3)).await;
    eprintln!(
        "keep-alive, 8 concurrent: direct {direct:.0} req/s, through the proxy {proxied:.0} req/s"
    );
}
