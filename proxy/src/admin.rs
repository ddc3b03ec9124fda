//! The proxy's operational HTTP servers (plain hyper, HTTP/1.1).
//!
//! | server | default address | endpoints |
//! |---|---|---|
//! | admin | `127.0.0.1:15000` | `/ready`, `/healthz`, `/stats/prometheus`, `/config_dump`, `/listeners`, `/` (index) |
//! | readiness | `0.0.0.0:15021` | `/ready` (and Istio's `/healthz/ready`), probed by the kubelet |
//! | metrics | `0.0.0.0:15090` | `/stats/prometheus` (and `/metrics`), scraped by Prometheus |
//!
//! Each is optional (`--admin-address off`, ...) and addressable by flag ([`AdminArgs`]).
//!
//! - `/ready`: 200 `ready` once the proxy has a config **and** its listeners are bound, and it
//!   is not draining; else 503 with the reason (`no config`, `listeners not bound`,
//!   `draining`).
//! - `/healthz`: 200 `ok` while the process serves (liveness).
//! - `/stats/prometheus`: every metric of [`Metrics`] in the OpenMetrics text format.
//! - `/config_dump`: `{"version": ..., "loadedAt": RFC 3339, "config": ProxyConfig}` (all
//!   `null` before the first config), and with a workload certificate `"certificate":
//!   {identity, expiresAt, certChainPem, rootSha256, trustBundleSha256}` (never the key).
//! - `/listeners`: `{"<listener name>": "<bound ip:port>", ...}`.
//!
//! Only `GET` and `HEAD` are accepted (405 otherwise); unknown paths get 404.
//!
//! The request path shares state with these servers through one [`AdminState`]: it calls
//! [`AdminState::set_config`] after each successful (re)load, [`AdminState::set_listeners`] once
//! its listeners are bound, and [`AdminState::set_draining`] on SIGTERM.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use mesh_config::ProxyConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::access_log::rfc3339;
use crate::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE};

/// Default address of the admin server (loopback only).
pub const DEFAULT_ADMIN_ADDRESS: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), mesh_wire::ports::ADMIN);
/// Default address of the readiness server (the kubelet probes the pod IP).
pub const DEFAULT_READINESS_ADDRESS: SocketAddr = SocketAddr::new(
    IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    mesh_wire::ports::READINESS,
);
/// Default address of the metrics server (Prometheus scrapes the pod IP).
pub const DEFAULT_METRICS_ADDRESS: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), mesh_wire::ports::METRICS);

/// Time a client has to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A loaded config, as `/config_dump` shows it.
#[derive(Debug, Clone)]
pub struct ConfigSnapshot {
    pub config: Arc<ProxyConfig>,
    /// `config.version` at load time.
    pub version: String,
    pub loaded_at: SystemTime,
}

/// What the admin servers report, set by the rest of the proxy. Share as `Arc<AdminState>`.
#[derive(Debug)]
pub struct AdminState {
    metrics: Arc<Metrics>,
    config: ArcSwapOption<ConfigSnapshot>,
    listeners: ArcSwap<BTreeMap<String, SocketAddr>>,
    listeners_bound: AtomicBool,
    draining: AtomicBool,
    /// The workload certificate, shown (chain, identity, expiry; never the key) in
    /// `/config_dump`.
    identity: ArcSwapOption<mesh_tls::WorkloadCertificates>,
}

/// Why `/ready` says 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    NoConfig,
    ListenersNotBound,
    Draining,
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotReady::NoConfig => "no config",
            NotReady::ListenersNotBound => "listeners not bound",
            NotReady::Draining => "draining",
        })
    }
}

impl AdminState {
    pub fn new(metrics: Arc<Metrics>) -> AdminState {
        AdminState {
            metrics,
            config: ArcSwapOption::empty(),
            listeners: ArcSwap::from_pointee(BTreeMap::new()),
            listeners_bound: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            identity: ArcSwapOption::empty(),
        }
    }

    /// The workload certificate to show in `/config_dump`.
    pub fn set_identity(&self, certs: Arc<mesh_tls::WorkloadCertificates>) {
        self.identity.store(Some(certs));
    }

    /// The workload certificate in use: identity, chain, expiry, trust bundle fingerprints.
    pub fn certificate(&self) -> Option<serde_json::Value> {
        let certs = self.identity.load_full()?;
        Some(match certs.info() {
            None => serde_json::json!({"identity": null, "state": "waiting for the mesh CA"}),
            Some(i) => serde_json::json!({
                "identity": i.identity,
                "expiresAt": rfc3339(UNIX_EPOCH + Duration::from_secs(i.expires_at_unix)),
                "certChainPem": i.chain_pem,
                "rootSha256": i.root_sha256,
                "trustBundleSha256": i.trust_bundle_sha256,
            }),
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Records the config now being served (after it validated and was applied).
    pub fn set_config(&self, config: Arc<ProxyConfig>) {
        let snapshot = ConfigSnapshot {
            version: config.version.clone(),
            config,
            loaded_at: SystemTime::now(),
        };
        self.config.store(Some(Arc::new(snapshot)));
    }

    /// The config now being served, if any.
    pub fn config(&self) -> Option<Arc<ConfigSnapshot>> {
        self.config.load_full()
    }

    /// Records the listeners bound (name → address) and marks them bound: `/ready` turns 200
    /// once a config is set too. Call again after a reload that changed listeners.
    pub fn set_listeners(&self, listeners: BTreeMap<String, SocketAddr>) {
        self.listeners.store(Arc::new(listeners));
        self.listeners_bound.store(true, Ordering::Release);
    }

    /// Marks the listeners (not) bound without changing the list, e.g. while rebinding.
    pub fn set_listeners_bound(&self, bound: bool) {
        self.listeners_bound.store(bound, Ordering::Release);
    }

    pub fn listeners(&self) -> Arc<BTreeMap<String, SocketAddr>> {
        self.listeners.load_full()
    }

    /// Draining (SIGTERM): `/ready` answers 503 so the endpoint is taken out of rotation.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Release);
    }

    pub fn readiness(&self) -> Result<(), NotReady> {
        if self.draining.load(Ordering::Acquire) {
            Err(NotReady::Draining)
        } else if self.config.load().is_none() {
            Err(NotReady::NoConfig)
        } else if !self.listeners_bound.load(Ordering::Acquire) {
            Err(NotReady::ListenersNotBound)
        } else {
            Ok(())
        }
    }

    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }
}

/// Which endpoints a server exposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoints {
    /// Everything (the loopback admin server).
    Admin,
    /// `/ready` only.
    Readiness,
    /// `/stats/prometheus` only.
    Metrics,
}

impl Endpoints {
    fn name(self) -> &'static str {
        match self {
            Endpoints::Admin => "admin",
            Endpoints::Readiness => "readiness",
            Endpoints::Metrics => "metrics",
        }
    }
}

/// A listen address or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub Option<SocketAddr>);

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<ListenAddr, String> {
        match s.trim() {
            "" | "off" | "none" | "disabled" => Ok(ListenAddr(None)),
            s => s
                .parse()
                .map(|a| ListenAddr(Some(a)))
                .map_err(|e| format!("{s:?} is not ip:port or \"off\": {e}")),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("off"),
        }
    }
}

/// Command-line flags for the three servers (`#[command(flatten)]` them).
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// Admin server (`/ready`, `/stats/prometheus`, `/config_dump`, `/listeners`), or `off`.
    #[arg(long, value_name = "IP:PORT|off", default_value_t = ListenAddr(Some(DEFAULT_ADMIN_ADDRESS)))]
    pub admin_address: ListenAddr,
    /// Readiness server (`/ready` only, for the kubelet), or `off`.
    #[arg(long, value_name = "IP:PORT|off", default_value_t = ListenAddr(Some(DEFAULT_READINESS_ADDRESS)))]
    pub readiness_address: ListenAddr,
    /// Metrics server (`/stats/prometheus` only, for Prometheus), or `off`.
    #[arg(long, value_name = "IP:PORT|off", default_value_t = ListenAddr(Some(DEFAULT_METRICS_ADDRESS)))]
    pub metrics_address: ListenAddr,
}

/// Where to run each server (`None` = not at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminAddresses {
    pub admin: Option<SocketAddr>,
    pub readiness: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
}

impl Default for AdminAddresses {
    fn default() -> Self {
        AdminAddresses {
            admin: Some(DEFAULT_ADMIN_ADDRESS),
            readiness: Some(DEFAULT_READINESS_ADDRESS),
            metrics: Some(DEFAULT_METRICS_ADDRESS),
        }
    }
}

impl From<&AdminArgs> for AdminAddresses {
    fn from(a: &AdminArgs) -> Self {
        AdminAddresses {
            admin: a.admin_address.0,
            readiness: a.readiness_address.0,
            metrics: a.metrics_address.0,
        }
    }
}

/// The running servers.
#[derive(Debug)]
pub struct AdminServers {
    /// Bound address of each server that runs (useful with port 0).
    pub admin: Option<SocketAddr>,
    pub readiness: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl AdminServers {
    /// Waits until every server stopped (after `shutdown` was cancelled).
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Binds every configured server and serves until `shutdown` is cancelled. Fails, naming the
/// server and address, if one cannot bind (then none runs).
pub async fn start(
    addresses: &AdminAddresses,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
) -> io::Result<AdminServers> {
    let mut bound = Vec::new();
    for (endpoints, addr) in [
        (Endpoints::Admin, addresses.admin),
        (Endpoints::Readiness, addresses.readiness),
        (Endpoints::Metrics, addresses.metrics),
    ] {
        if let Some(addr) = addr {
            let listener = TcpListener::bind(addr).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{} server: cannot bind {addr}: {e}", endpoints.name()),
                )
            })?;
            bound.push((endpoints, listener));
        }
    }
    let mut servers = AdminServers {
        admin: None,
        readiness: None,
        metrics: None,
        tasks: Vec::new(),
    };
    for (endpoints, listener) in bound {
        let addr = listener.local_addr()?;
        match endpoints {
            Endpoints::Admin => servers.admin = Some(addr),
            Endpoints::Readiness => servers.readiness = Some(addr),
            Endpoints::Metrics => servers.metrics = Some(addr),
        }
        tracing::info!(server = endpoints.name(), %addr, "listening");
        servers.tasks.push(tokio::spawn(serve(
            listener,
            endpoints,
            state.clone(),
            shutdown.clone(),
        )));
    }
    Ok(servers)
}

/// Serves `endpoints` on an already bound listener until `shutdown` is cancelled; in-flight
/// requests finish.
pub async fn serve(
    listener: TcpListener,
    endpoints: Endpoints,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(server = endpoints.name(), %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        connections.spawn(serve_connection(
            stream,
            endpoints,
            state.clone(),
            shutdown.clone(),
        ));
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn serve_connection(
    stream: TcpStream,
    endpoints: Endpoints,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
) {
    let service = service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(endpoints, &state, &req)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(err) = res {
                tracing::debug!(server = endpoints.name(), %err, "connection error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", body)
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    reply(StatusCode::OK, "application/json", body)
}

const INDEX: &str = "mesh-proxy admin\n\
  /ready              200 when a config is loaded and listeners are bound\n\
  /healthz            liveness\n\
  /stats/prometheus   metrics (OpenMetrics text)\n\
  /config_dump        the config being served, its version and load time\n\
  /listeners          listener name -> bound address\n";

/// Answers one request (no I/O; exposed for tests of other modules).
pub fn handle<B>(
    endpoints: Endpoints,
    state: &AdminState,
    req: &Request<B>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let path = req.uri().path();
    let admin = endpoints == Endpoints::Admin;
    let readiness = admin || endpoints == Endpoints::Readiness;
    let metrics = admin || endpoints == Endpoints::Metrics;
    match path {
        "/ready" | "/healthz/ready" if readiness => match state.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/stats/prometheus" | "/metrics" if metrics => reply(
            StatusCode::OK,
            OPENMETRICS_CONTENT_TYPE,
            state.metrics.encode(),
        ),
        "/healthz" if admin => text(StatusCode::OK, "ok\n"),
        "/" if admin => text(StatusCode::OK, INDEX),
        "/config_dump" if admin => {
            let snapshot = state.config();
            let value = match snapshot.as_deref() {
                Some(s) => serde_json::json!({
                    "version": s.version,
                    "loadedAt": rfc3339(s.loaded_at),
                    "config": &*s.config,
                }),
                None => serde_json::json!({
                    "version": null,
                    "loadedAt": null,
                    "config": null,
                }),
            };
            let mut value = value;
            if let Some(c) = state.certificate() {
                value["certificate"] = c;
            }
            json(&value)
        }
        "/listeners" if admin => {
            let listeners = state.listeners();
            let map: serde_json::Map<String, serde_json::Value> = listeners
                .iter()
                .map(|(name, addr)| (name.clone(), addr.to_string().into()))
                .collect();
            json(&serde_json::Value::Object(map))
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Prints the bound listeners of `proxy` (one parseable line each:
/// `listening listener=NAME address=IP:PORT`), hands them and the config to the admin state,
/// and marks the listeners bound (so `/ready` can answer 200).
pub async fn publish(proxy: &crate::ProxyHandle, state: &AdminState) {
    let listeners = proxy.listeners().await;
    for l in &listeners {
        eprintln!("listening listener={} address={}", l.name, l.address);
    }
    state.set_config(proxy.config());
    state.set_listeners(
        listeners
            .into_iter()
            .map(|l| (l.name, l.address))
            .collect::<BTreeMap<_, _>>(),
    );
    state.set_listeners_bound(true);
}
