use std::net::SocketAddr;

use mesh_proxy::config::ProxyConfig;
use mesh_proxy::{Proxy, ProxyHandle, ProxyOptions};
use serde_json::{Value, json};

pub struct Env {
    pub proxy: ProxyHandle,
    pub addr: SocketAddr,
}

impl Env {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

pub fn config(v: Value) -> ProxyConfig {
    let c: ProxyConfig = serde_json::from_value(v).expect("config parses");
    c.validate().expect("config validates");
    c
}

pub fn options() -> ProxyOptions {
    ProxyOptions {
        bind_address: "127.0.0.1".parse().unwrap(),
        ..ProxyOptions::default()
    }
}

/// Starts a proxy with one listener `l` on an ephemeral port.
pub async fn start(v: Value) -> Env {
    let proxy = Proxy::start(config(v), options())
        .await
        .expect("proxy starts");
    let addr = proxy.listeners().await[0].address;
    Env { proxy, addr }
}

/// Like [`start`], with connections served on `n` worker threads (`mesh-proxy run --workers`).
pub async fn start_on_workers(v: Value, n: usize) -> Env {
    let workers = mesh_proxy::workers::Workers::start(n).expect("workers start");
    let options = ProxyOptions {
        workers: Some(std::sync::Arc::new(workers)),
        ..options()
    };
    let proxy = Proxy::start(config(v), options)
        .await
        .expect("proxy starts");
    let addr = proxy.listeners().await[0].address;
    Env { proxy, addr }
}

/// One listener (port 0) with one virtual host for `*` and these routes and backends.
pub fn gateway(routes: Value, backends: Value) -> Value {
    json!({
        "listeners": [{"name": "l", "port": 0,
            "virtualHosts": [{"name": "any", "hostnames": ["*"], "routes": routes}]}],
        "backends": backends,
    })
}

/// A route forwarding everything matching `m` to backend `b`.
pub fn forward(name: &str, m: Value, b: &str) -> Value {
    json!({"name": name, "match": m,
        "action": {"type": "forward", "backends": [{"target": {"backend": b}, "weight": 1}]}})
}

pub fn backend(name: &str, endpoints: &[String]) -> Value {
    json!({"name": name, "endpoints": endpoints})
}
