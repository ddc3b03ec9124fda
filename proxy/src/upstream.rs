//! Pooled upstream HTTP clients, one per (protocol, connect timeout), shared across reloads so
//! keep-alive connections to backends survive a config swap.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ProxyBody;
use crate::config::UpstreamProtocol;

pub type UpstreamClient = Client<HttpConnector, ProxyBody>;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Default)]
pub struct Clients {
    clients: Mutex<HashMap<(bool, Duration), UpstreamClient>>,
}

impl Clients {
    /// The pooled client for this protocol and connect timeout (created on first use).
    pub fn get(&self, protocol: UpstreamProtocol, connect_timeout: Duration) -> UpstreamClient {
        let mut map = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((protocol == UpstreamProtocol::Http2, connect_timeout))
            .or_insert_with(|| build(protocol, connect_timeout))
            .clone()
    }
}

fn build(protocol: UpstreamProtocol, connect_timeout: Duration) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    connector.enforce_http(true);
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new());
    if protocol == UpstreamProtocol::Http2 {
        b.http2_only(true);
    }
    b.build(connector)
}
