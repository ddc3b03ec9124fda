//! The proxy's Prometheus metrics, served by the admin and metrics listeners at
//! `/stats/prometheus` (OpenMetrics text).
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `mesh_requests_total` | counter | `listener`, `route`, `backend`, `code` | Requests answered, by the status sent downstream. Local replies count too: `route`/`backend` are empty when unknown (e.g. 404 no route, a rate-limited request has its route and an empty backend). |
//! | `mesh_request_duration_seconds` | histogram | `listener`, `route`, `backend` | From the request's arrival to the end of the response headers sent downstream. |
//! | `mesh_rate_limited_total` | counter | `listener`, `route`, `limit` | Requests refused by the named rate limit (also counted in `mesh_requests_total` with their status, 429 by default). |
//! | `mesh_upstream_errors_total` | counter | `backend`, `kind` | Failures talking to a backend; `kind` is one of [`UpstreamErrorKind`]: `connect`, `timeout`, `reset`, `no_endpoints`, `protocol`, `other`. |
//! | `mesh_config_reloads_total` | counter | `result` (`success`, `failure`) | Config loads and reloads (file, SIGHUP, control-plane push), by outcome. |
//! | `mesh_connections_active` | gauge | `listener` | Downstream connections open now. |
//! | `mesh_access_log_dropped_total` | counter | | Access-log lines dropped because the writer fell behind. |
//! | `mesh_tcp_connections_total` | counter | `listener`, `backend` | Opaque (non-HTTP) connections a sidecar passed through, once connected upstream (`backend`: the mesh Service's backend, `passthrough`, or `inbound\|PORT`). Connect failures count in `mesh_upstream_errors_total`. |
//! | `mesh_tcp_received_bytes_total` | counter | `listener`, `backend` | Bytes of opaque connections received from downstream. |
//! | `mesh_tcp_sent_bytes_total` | counter | `listener`, `backend` | Bytes of opaque connections sent downstream. |
//! | `mesh_mtls_requests_total` | counter | `listener`, `source_principal` | Requests that arrived over mutual TLS from another proxy of the mesh, by its SPIFFE ID (requests counted in `mesh_requests_total` but not here arrived in plaintext). |
//! | `mesh_mtls_connections_total` | counter | `listener`, `result` (`accepted`, `refused`) | Inbound connections on listeners that take mutual TLS: terminated mutual TLS, or closed (plaintext under STRICT, a failed handshake). |
//!
//! Hot path: resolve a [`RouteMetrics`] handle per (listener, route, backend) once per config
//! (labels are `Arc<str>`, the histogram is resolved up front), then [`RouteMetrics::record`]
//! per request costs one read-locked hash lookup for the counter plus one histogram observation.
//! The plain [`Metrics::record_request`] works without a handle.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::fasthash::{FastHasher, FastMap};

/// Content type of [`Metrics::encode`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of the request duration histogram's buckets.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub listener: Arc<str>,
    pub route: Arc<str>,
    pub backend: Arc<str>,
    pub code: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub listener: Arc<str>,
    pub route: Arc<str>,
    pub backend: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitedLabels {
    pub listener: Arc<str>,
    pub route: Arc<str>,
    pub limit: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub backend: Arc<str>,
    pub kind: UpstreamErrorKind,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub listener: Arc<str>,
    pub backend: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MtlsRequestLabels {
    pub listener: Arc<str>,
    pub source_principal: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MtlsConnectionLabels {
    pub listener: Arc<str>,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: ReloadResult,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: Arc<str>,
}

/// Why a request to a backend failed (`kind` label of `mesh_upstream_errors_total`).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// Could not connect (refused, unreachable, connect timeout).
    Connect,
    /// No response within the route's timeout.
    Timeout,
    /// The connection was closed or reset before a complete response.
    Reset,
    /// The backend has no endpoints (503).
    NoEndpoints,
    /// The backend spoke invalid HTTP.
    Protocol,
    Other,
}

impl UpstreamErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::NoEndpoints => "no_endpoints",
            UpstreamErrorKind::Protocol => "protocol",
            UpstreamErrorKind::Other => "other",
        }
    }
}

impl EncodeLabelValue for UpstreamErrorKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Outcome of a config load (`result` label of `mesh_config_reloads_total`).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum ReloadResult {
    Success,
    Failure,
}

impl ReloadResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Success => "success",
            ReloadResult::Failure => "failure",
        }
    }
}

impl EncodeLabelValue for ReloadResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// All metrics of one proxy process. Share it as `Arc<Metrics>`; it outlives config reloads.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily<RouteLabels>,
    rate_limited: Family<RateLimitedLabels, Counter>,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    config_reloads: Family<ReloadLabels, Counter>,
    connections_active: Family<ListenerLabels, Gauge>,
    access_log_dropped: Counter,
    tcp_connections: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    mtls_requests: Family<MtlsRequestLabels, Counter>,
    mtls_connections: Family<MtlsConnectionLabels, Counter>,
    /// The empty label value, shared.
    empty: Arc<str>,
    /// Resolved (counter, histogram) handles of `record_request_arc`, sharded by worker
    /// thread.
    request_handles: Box<[Mutex<RequestHandleCache>]>,
}

/// Shards of the request-handle cache: workers beyond this share shards (correct, just a
/// little lock traffic).
const REQUEST_HANDLE_SHARDS: usize = 8;
/// Label sets per shard before it is emptied (label sets of configs long gone go with it).
const REQUEST_HANDLE_MAX: usize = 4096;

/// The metric handles of one label set (listener, route, backend, code).
#[derive(Debug)]
struct RequestHandles {
    labels: RouteLabels,
    code: u16,
    requests: Counter,
    duration: Histogram,
}

/// Handles by the hash of their label values. SipHash over three label strings plus a
/// lookup in each `Family` was ~4% of the proxy's instructions per request; this is one fast
/// hash and a comparison of the strings. Keyed by content, not by `Arc` identity: sidecar
/// passthrough routes build their names per request.
#[derive(Debug, Default)]
struct RequestHandleCache {
    by_hash: FastMap<u64, Vec<RequestHandles>>,
    len: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let requests = Family::<RequestLabels, Counter>::default();
        let duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        let rate_limited = Family::<RateLimitedLabels, Counter>::default();
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        let connections_active = Family::<ListenerLabels, Gauge>::default();
        let access_log_dropped = Counter::default();
        let tcp_connections = Family::<TcpLabels, Counter>::default();
        let tcp_received = Family::<TcpLabels, Counter>::default();
        let tcp_sent = Family::<TcpLabels, Counter>::default();
        let mtls_requests = Family::<MtlsRequestLabels, Counter>::default();
        let mtls_connections = Family::<MtlsConnectionLabels, Counter>::default();

        let mut registry = Registry::default();
        registry.register(
            "mesh_requests",
            "Requests answered, by listener, route, backend and status code sent downstream",
            requests.clone(),
        );
        registry.register_with_unit(
            "mesh_request_duration",
            "Time from a request's arrival to the end of the response headers sent downstream",
            Unit::Seconds,
            duration.clone(),
        );
        registry.register(
            "mesh_rate_limited",
            "Requests refused by a rate limit, by listener, route and limit name",
            rate_limited.clone(),
        );
        registry.register(
            "mesh_upstream_errors",
            "Failures talking to a backend, by backend and kind \
             (connect, timeout, reset, no_endpoints, protocol, other)",
            upstream_errors.clone(),
        );
        registry.register(
            "mesh_config_reloads",
            "Config loads and reloads, by result (success, failure)",
            config_reloads.clone(),
        );
        registry.register(
            "mesh_connections_active",
            "Downstream connections open now, by listener",
            connections_active.clone(),
        );
        registry.register(
            "mesh_access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            access_log_dropped.clone(),
        );
        registry.register(
            "mesh_tcp_connections",
            "Opaque (non-HTTP) connections passed through by a sidecar, by listener and backend",
            tcp_connections.clone(),
        );
        registry.register(
            "mesh_tcp_received_bytes",
            "Bytes of opaque connections received from downstream",
            tcp_received.clone(),
        );
        registry.register(
            "mesh_tcp_sent_bytes",
            "Bytes of opaque connections sent downstream",
            tcp_sent.clone(),
        );
        registry.register(
            "mesh_mtls_requests",
            "Requests that arrived over mutual TLS from another proxy, by listener and the \
             caller's SPIFFE ID",
            mtls_requests.clone(),
        );
        registry.register(
            "mesh_mtls_connections",
            "Inbound connections on listeners that take mutual TLS, by result (accepted, refused)",
            mtls_connections.clone(),
        );
        Metrics {
            mtls_requests,
            mtls_connections,
            tcp_connections,
            tcp_received,
            tcp_sent,
            registry,
            requests,
            duration,
            rate_limited,
            upstream_errors,
            config_reloads,
            connections_active,
            access_log_dropped,
            empty: Arc::from(""),
            request_handles: (0..REQUEST_HANDLE_SHARDS)
                .map(|_| Mutex::new(RequestHandleCache::default()))
                .collect(),
        }
    }

    /// A pre-resolved handle for requests of `route` on `listener` sent to `backend` (use `""`
    /// for none). Build these when a config is compiled; they stay valid across reloads.
    pub fn route(&self, listener: &str, route: &str, backend: &str) -> RouteMetrics {
        let labels = RouteLabels {
            listener: listener.into(),
            route: route.into(),
            backend: backend.into(),
        };
        RouteMetrics {
            duration: self.duration.get_or_create_owned(&labels),
            labels,
            requests: self.requests.clone(),
            rate_limited: self.rate_limited.clone(),
        }
    }

    /// Counts one request and its duration without a handle.
    pub fn record_request(
        &self,
        listener: &str,
        route: &str,
        backend: &str,
        code: u16,
        duration: Duration,
    ) {
        self.route(listener, route, backend).record(code, duration);
    }

    /// Counts one request and its duration, with labels the request path already holds as
    /// `Arc<str>` (`None` = empty): no allocation, no handle to build.
    pub fn record_request_arc(
        &self,
        listener: &Arc<str>,
        route: Option<&Arc<str>>,
        backend: Option<&Arc<str>>,
        code: u16,
        duration: Duration,
    ) {
        let route = route.unwrap_or(&self.empty);
        let backend = backend.unwrap_or(&self.empty);
        let hash = {
            let mut h = FastHasher::default();
            (&**listener, &**route, &**backend, code).hash(&mut h);
            h.finish()
        };
        let is_it = |e: &RequestHandles| {
            e.code == code
                && *e.labels.listener == **listener
                && *e.labels.route == **route
                && *e.labels.backend == **backend
        };
        let shard = &self.request_handles[crate::workers::current() % REQUEST_HANDLE_SHARDS];
        let mut cache = shard.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = cache
            .by_hash
            .get(&hash)
            .and_then(|l| l.iter().find(|e| is_it(e)))
        {
            e.requests.inc();
            e.duration.observe(duration.as_secs_f64());
            return;
        }
        if cache.len >= REQUEST_HANDLE_MAX {
            *cache = RequestHandleCache::default();
        }
        let labels = RouteLabels {
            listener: listener.clone(),
            route: route.clone(),
            backend: backend.clone(),
        };
        let histogram = self.duration.get_or_create_owned(&labels);
        let requests = self.requests.get_or_create_owned(&RequestLabels {
            listener: labels.listener.clone(),
            route: labels.route.clone(),
            backend: labels.backend.clone(),
            code,
        });
        requests.inc();
        histogram.observe(duration.as_secs_f64());
        cache.len += 1;
        cache.by_hash.entry(hash).or_default().push(RequestHandles {
            labels,
            code,
            requests,
            duration: histogram,
        });
    }

    /// Counts one request refused by `limit`.
    pub fn rate_limited(&self, listener: &str, route: &str, limit: &str) {
        self.rate_limited
            .get_or_create(&RateLimitedLabels {
                listener: listener.into(),
                route: route.into(),
                limit: limit.into(),
            })
            .inc();
    }

    /// Counts one failure talking to `backend`.
    pub fn upstream_error(&self, backend: &str, kind: UpstreamErrorKind) {
        self.upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                backend: backend.into(),
                kind,
            })
            .inc();
    }

    /// Counts one config load or reload.
    pub fn config_reload(&self, result: ReloadResult) {
        self.config_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    /// Counts a downstream connection on `listener` as open until the guard is dropped.
    pub fn connection_opened(&self, listener: &str) -> ConnectionGuard {
        let gauge = self
            .connections_active
            .get_or_create_owned(&ListenerLabels {
                listener: listener.into(),
            });
        gauge.inc();
        ConnectionGuard { gauge }
    }

    /// The gauge of open connections of `listener`, to clone into an accept loop once and
    /// open guards with [`ConnectionGauge::opened`].
    pub fn connections_gauge(&self, listener: &str) -> ConnectionGauge {
        ConnectionGauge {
            gauge: self
                .connections_active
                .get_or_create_owned(&ListenerLabels {
                    listener: listener.into(),
                }),
        }
    }

    /// Counts one opaque connection passed through (connected upstream).
    pub fn tcp_connection(&self, listener: &str, backend: &str) {
        self.tcp_connections
            .get_or_create(&TcpLabels {
                listener: listener.into(),
                backend: backend.into(),
            })
            .inc();
    }

    /// Counts the bytes of a finished opaque connection.
    pub fn tcp_bytes(&self, listener: &str, backend: &str, received: u64, sent: u64) {
        let labels = TcpLabels {
            listener: listener.into(),
            backend: backend.into(),
        };
        self.tcp_received.get_or_create(&labels).inc_by(received);
        self.tcp_sent.get_or_create(&labels).inc_by(sent);
    }

    /// Current value of `mesh_tcp_connections_total` for these labels.
    pub fn tcp_connections_count(&self, listener: &str, backend: &str) -> u64 {
        self.tcp_connections
            .get(&TcpLabels {
                listener: listener.into(),
                backend: backend.into(),
            })
            .map(|c| c.get())
            .unwrap_or(0)
    }

    /// Counts one request that arrived over mutual TLS from `source_principal`.
    pub fn mtls_request(&self, listener: &Arc<str>, source_principal: &Arc<str>) {
        self.mtls_requests
            .get_or_create(&MtlsRequestLabels {
                listener: listener.clone(),
                source_principal: source_principal.clone(),
            })
            .inc();
    }

    /// Counts one inbound connection that took mutual TLS.
    pub fn mtls_accepted(&self, listener: &Arc<str>) {
        self.mtls_connection(listener, "accepted");
    }

    /// Counts one inbound connection closed for not being (valid) mutual TLS.
    pub fn mtls_refused(&self, listener: &Arc<str>) {
        self.mtls_connection(listener, "refused");
    }

    fn mtls_connection(&self, listener: &Arc<str>, result: &'static str) {
        self.mtls_connections
            .get_or_create(&MtlsConnectionLabels {
                listener: listener.clone(),
                result,
            })
            .inc();
    }

    /// Counts one access log line dropped.
    pub fn access_log_dropped(&self) {
        self.access_log_dropped.inc();
    }

    /// The counter of dropped access log lines (the access logger increments a clone of it).
    pub fn access_log_dropped_counter(&self) -> Counter {
        self.access_log_dropped.clone()
    }

    /// Everything, in the OpenMetrics text format ([`OPENMETRICS_CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Current value of `mesh_requests_total` for these labels (tests and the demo).
    pub fn requests_count(&self, listener: &str, route: &str, backend: &str, code: u16) -> u64 {
        self.requests
            .get(&RequestLabels {
                listener: listener.into(),
                route: route.into(),
                backend: backend.into(),
                code,
            })
            .map(|c| c.get())
            .unwrap_or(0)
    }

    /// Current value of `mesh_rate_limited_total` for these labels.
    pub fn rate_limited_count(&self, listener: &str, route: &str, limit: &str) -> u64 {
        self.rate_limited
            .get(&RateLimitedLabels {
                listener: listener.into(),
                route: route.into(),
                limit: limit.into(),
            })
            .map(|c| c.get())
            .unwrap_or(0)
    }
}

/// Metrics of one (listener, route, backend), resolved once. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    labels: RouteLabels,
    duration: Histogram,
    requests: Family<RequestLabels, Counter>,
    rate_limited: Family<RateLimitedLabels, Counter>,
}

impl RouteMetrics {
    /// Counts one request answered with `code` after `duration`.
    pub fn record(&self, code: u16, duration: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                listener: self.labels.listener.clone(),
                route: self.labels.route.clone(),
                backend: self.labels.backend.clone(),
                code,
            })
            .inc();
        self.duration.observe(duration.as_secs_f64());
    }

    /// Counts one request of this route refused by `limit`.
    pub fn rate_limited(&self, limit: &str) {
        self.rate_limited
            .get_or_create(&RateLimitedLabels {
                listener: self.labels.listener.clone(),
                route: self.labels.route.clone(),
                limit: limit.into(),
            })
            .inc();
    }

    pub fn labels(&self) -> &RouteLabels {
        &self.labels
    }
}

/// The open-connections gauge of one listener.
#[derive(Debug, Clone)]
pub struct ConnectionGauge {
    gauge: Gauge,
}

impl ConnectionGauge {
    pub fn opened(&self) -> ConnectionGuard {
        self.gauge.inc();
        ConnectionGuard {
            gauge: self.gauge.clone(),
        }
    }

    pub fn get(&self) -> i64 {
        self.gauge.get()
    }
}

/// Decrements `mesh_connections_active` when dropped (when the connection ends).
#[derive(Debug)]
pub struct ConnectionGuard {
    gauge: Gauge,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests;
