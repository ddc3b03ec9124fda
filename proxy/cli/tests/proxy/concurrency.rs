//! Many keep-alive clients at once through one proxy: every request is answered by the
//! route's backends, with the route's filters applied, and counted once.
//! (Throughput is measured by `mesh-bench`, not here: this asserts what a client sees.)

use std::collections::BTreeMap;

use mesh_proxy::testing::{EchoServer, TestClient};
use serde_json::json;

use crate::common::*;

const CLIENTS: usize = 8;
const REQUESTS_PER_CLIENT: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_keep_alive_clients_are_all_answered_by_the_route() {
    let (a, b) = tokio::join!(EchoServer::start("a"), EchoServer::start("b"));
    let env = start(gateway(
        json!([{"name": "r",
                "filters": [{"type": "requestHeaderModifier",
                             "add": [{"name": "x-mesh", "value": "istio"}]},
                            {"type": "responseHeaderModifier",
                             "set": [{"name": "x-canary", "value": "v2"}]}],
                "action": {"type": "forward", "backends": [
                    {"target": {"backend": "a"}, "weight": 1},
                    {"target": {"backend": "b"}, "weight": 1}]}}]),
        json!([backend("a", &[a.endpoint()]), backend("b", &[b.endpoint()])]),
    ))
    .await;
    let clients = (0..CLIENTS).map(|i| {
        let client = TestClient::http1();
        let path = format!("/client/{i}");
        let url = env.url(&path);
        tokio::spawn(async move {
            let mut answered_by = Vec::new();
            for _ in 0..REQUESTS_PER_CLIENT {
                let r = client.get(&url, &[]).await.expect("request answered");
                assert_eq!(r.status, 200, "{}", r.text());
                assert_eq!(r.header("x-canary"), Some("v2"));
                let echo = r.echo();
                assert_eq!(echo.path, path);
                assert_eq!(echo.header("x-mesh"), Some("istio"));
                answered_by.push(echo.name);
            }
            answered_by
        })
    });
    let mut by_backend: BTreeMap<String, usize> = BTreeMap::new();
    for c in futures::future::join_all(clients).await {
        for name in c.expect("client task") {
            *by_backend.entry(name).or_default() += 1;
        }
    }
    let total = CLIENTS * REQUESTS_PER_CLIENT;
    assert_eq!(by_backend.values().sum::<usize>(), total);
    // Equal weights over 400 requests: both backends get some (all on one: p = 2^-399).
    assert_eq!(by_backend.len(), 2, "{by_backend:?}");
    // What each backend saw is what the clients were told.
    assert_eq!(
        by_backend.get("a").copied().unwrap_or(0),
        a.requests().len()
    );
    assert_eq!(
        by_backend.get("b").copied().unwrap_or(0),
        b.requests().len()
    );
    let m = env.proxy.metrics();
    assert_eq!(
        m.requests_count("l", "r", "a", 200) + m.requests_count("l", "r", "b", 200),
        total as u64
    );
}
