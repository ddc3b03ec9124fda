//! The native configuration model of `mesh-proxy`.
//!
//! This is the one form of configuration the proxy runtime understands. It is what the control
//! plane pushes to every proxy, what `mesh-proxy run --config FILE` reads, and what
//! `mesh-translate` produces from Kubernetes objects (`mesh-proxy run --resources`). The proxy
//! never sees Kubernetes types.
//!
//! Shape:
//!
//! ```text
//! ProxyConfig
//! ├── listeners[]        a port and what it does (gateway, sidecar inbound/outbound)
//! │   └── virtual_hosts[]   hostnames → routes, picked by the most specific hostname
//! │       └── routes[]          one match each, evaluated in order: first match wins
//! │           └── action        forward to weighted backends | redirect | direct response
//! ├── backends[]         named groups of endpoints (a Service port), referenced by routes
//! └── rate_limits[]      named token buckets, referenced by listeners, routes, backends
//! ```
//!
//! Routes are evaluated in the order given. The Gateway API precedence rules (exact path
//! before longest prefix, method, header and query match counts, creation time, name) are
//! applied by the translator when it orders the routes, so the runtime stays a simple and fast
//! first-match walk.
//!
//! [`ProxyConfig::validate`] checks what serde cannot: references resolve, regexes compile,
//! weights and durations are sane. A proxy applies a config only after it validates.

use std::time::Duration;

use serde::{Deserialize, Serialize};

mod duration;
mod hostname;
mod http;
pub mod identity;
mod mtls;
mod validate;
pub use duration::{format_duration, parse_duration};
pub use hostname::{check_hostname, is_dns_label, is_dns_subdomain};
pub use http::{HttpOptions, PathNormalization};
pub use mtls::{InboundMtls, MeshIdentity, MtlsMode};
pub use validate::ValidationError;

/// Everything one proxy instance needs to serve traffic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// Opaque version of this config (set by the control plane; reported in ACK/NACK and
    /// `/config_dump`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub rate_limits: Vec<RateLimit>,
    #[serde(default)]
    pub access_log: AccessLog,
    /// Connection timeouts, the connection cap, path normalization and protocol upgrades of
    /// every listener. Unset fields take the proxy's command-line values, then the defaults.
    #[serde(default, skip_serializing_if = "HttpOptions::is_unset")]
    pub http: HttpOptions,
    /// The mesh's trust bundle (control plane only). Without it a proxy has no workload
    /// certificate and speaks plaintext to every peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_identity: Option<MeshIdentity>,
}

/// One port the proxy listens on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    /// Unique name, used in metrics and logs (e.g. `demo/istio-gwapi/http`).
    pub name: String,
    /// Address to bind; `None` means the proxy's `--bind-address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub kind: ListenerKind,
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// Virtual hosts; a request's Host picks the most specific one (see [`VirtualHost`]).
    #[serde(default)]
    pub virtual_hosts: Vec<VirtualHost>,
    /// A rate limit applied to every request on this listener (Gateway scope).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    #[serde(default)]
    pub limits: HttpLimits,
    /// `sidecarOutbound` only: the mesh Services this proxy routes, found by the captured
    /// connection's original destination (`address:port`). Connections to any other
    /// destination are passed through to it unchanged (HTTP is still observed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<MeshService>,
    /// `sidecarOutbound` only: destinations reached by passthrough (a pod IP dialed
    /// directly) that are meshed pods, `ip:port` → the SPIFFE ID they must prove: reached
    /// over mutual TLS like a mesh Service's endpoints. Others get plaintext.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub passthrough_identities: std::collections::BTreeMap<String, String>,
    /// `sidecarInbound` only: per-port settings of the local app (ports not listed are still
    /// forwarded, without a port limit).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound_ports: Vec<InboundPort>,
    /// Whether connections must, may or must not be mutual TLS from other proxies of the
    /// mesh (PeerAuthentication), per port. `sidecarInbound`: unset is PERMISSIVE. `gateway`:
    /// unset terminates no mutual TLS; set, the listener takes mesh mTLS as a sidecar's
    /// inbound does (a workload's explicit inbound port, no capture needed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<InboundMtls>,
}

/// One port of a mesh Service as a sidecar's outbound side sees it (Gateway API mesh routing,
/// "GAMMA": HTTPRoutes whose parentRef is the Service).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshService {
    /// `namespace/name:port`.
    pub name: String,
    /// The IP addresses the app dials for this Service (its ClusterIPs).
    pub addresses: Vec<String>,
    pub port: u16,
    /// HTTP requests to the Service: evaluated in order, first match wins; no match → 404.
    /// The translator puts here the Service's HTTPRoutes, or one route to its own endpoints.
    /// Route names share the listener's namespace (unique within the listener).
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Where opaque (non-HTTP) connections go: a backend (normally the Service port's own
    /// endpoints). `None`: to the original destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_backend: Option<String>,
}

/// Settings of one port of the app behind a sidecar's inbound listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundPort {
    /// The app's (container) port, i.e. the captured connection's original port.
    pub port: u16,
    /// A rate limit applied to HTTP requests to this port (per pod: every sidecar has its own
    /// bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
}

/// What a listener is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ListenerKind {
    /// Traffic addressed to the proxy itself, routed by hostname and route (ingress gateway).
    #[default]
    Gateway,
    /// Captured traffic arriving at the pod (`mesh-proxy redirect`'s inbound port), forwarded
    /// to the local app on the original port over loopback. Non-HTTP is copied untouched.
    SidecarInbound,
    /// Captured traffic leaving the pod: HTTP to a mesh Service ([`Listener::services`]) is
    /// routed by its routes, anything else goes to the original destination. Non-HTTP is
    /// copied untouched.
    SidecarOutbound,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ListenerProtocol {
    /// HTTP/1.1, and HTTP/2 with prior knowledge (h2c), on the same port.
    #[default]
    Http,
}

/// Limits applied to requests on a listener. Requests over them get 431.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpLimits {
    /// Maximum total size of the request line and headers, in bytes.
    #[serde(default = "HttpLimits::default_max_header_bytes")]
    pub max_header_bytes: u32,
    /// Maximum number of request headers.
    #[serde(default = "HttpLimits::default_max_headers")]
    pub max_headers: u32,
}

impl HttpLimits {
    fn default_max_header_bytes() -> u32 {
        60 * 1024
    }
    fn default_max_headers() -> u32 {
        100
    }
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_header_bytes: Self::default_max_header_bytes(),
            max_headers: Self::default_max_headers(),
        }
    }
}

/// A set of hostnames and the routes that serve them.
///
/// Host selection (the Gateway API's hostname precedence): an exact hostname beats a wildcard;
/// among wildcards (`*.example.com`) the longest suffix wins; `*` alone matches any host and
/// loses to everything else. The port in the Host header is ignored. No matching virtual host
/// → 404.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualHost {
    pub name: String,
    /// `example.com`, `*.example.com` or `*`. Lowercase.
    pub hostnames: Vec<String>,
    /// Evaluated in order; the first route whose match holds serves the request.
    pub routes: Vec<Route>,
}

/// One match and what to do when it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Route {
    /// Unique within the listener; the `route` label of metrics and the access log
    /// (the translator uses `namespace/name/rule/match`, e.g. `demo/myapp-route/0/0`).
    pub name: String,
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    /// Filters applied in order before the action (request side) and to the response.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    pub action: RouteAction,
    /// A rate limit applied to requests this route serves (route scope).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    #[serde(default, skip_serializing_if = "Timeouts::is_empty")]
    pub timeouts: Timeouts,
}

/// All conditions must hold (AND). An empty match matches every request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default)]
    pub path: PathMatch,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<QueryParamMatch>,
    /// Uppercase HTTP method, e.g. `GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type", content = "value")]
pub enum PathMatch {
    /// The whole path equals the value (case sensitive; query string excluded).
    Exact(String),
    /// Element-wise prefix: `/abc` matches `/abc` and `/abc/def`, not `/abcd`. A trailing `/`
    /// in the value is ignored (`/abc/` == `/abc`). `/` matches everything.
    Prefix(String),
    /// The whole path matches the regular expression (Rust `regex` syntax, anchored).
    Regex(String),
}

impl Default for PathMatch {
    fn default() -> Self {
        PathMatch::Prefix("/".to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name; compared case-insensitively.
    pub name: String,
    #[serde(flatten)]
    pub value: StringMatch,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueryParamMatch {
    /// Parameter name; compared exactly (case-sensitive). The first occurrence is used.
    pub name: String,
    #[serde(flatten)]
    pub value: StringMatch,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    /// Equal to the value.
    Exact(String),
    /// The whole value matches the regular expression (anchored).
    Regex(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum RouteAction {
    /// Send the request to one of the weighted backends (weight / sum of weights).
    Forward(Forward),
    /// Answer with a redirect (3xx) built from the request.
    Redirect(Redirect),
    /// Answer directly with a status and body.
    DirectResponse(DirectResponse),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Forward {
    /// Weighted choice. A weight of 0 is never chosen. If every weight is 0 (or there is no
    /// backend) the request gets 500.
    pub backends: Vec<WeightedBackend>,
    /// Requests copied, fire and forget, to other backends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedBackend {
    pub target: BackendTarget,
    pub weight: u32,
    /// Filters applied only when this backend is chosen, after the route's filters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BackendTarget {
    /// The name of a [`Backend`] in [`ProxyConfig::backends`].
    Backend(String),
    /// A reference that could not be resolved (missing Service, not permitted, ...). Its
    /// share of the traffic gets 500; the reason is logged and shown in `/config_dump`.
    Invalid(String),
}

/// A group of endpoints, typically one port of a Kubernetes Service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backend {
    /// Unique name, e.g. `demo/myapp-v1:80`.
    pub name: String,
    /// `ip:port` or `host:port`. Empty → requests get 503.
    #[serde(default)]
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    /// Protocol spoken to the endpoints.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Time allowed to establish a connection to an endpoint.
    #[serde(
        default = "Backend::default_connect_timeout",
        with = "duration::serde_duration"
    )]
    pub connect_timeout: Duration,
    /// A rate limit applied to requests sent to this backend (backend Service scope).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    /// Endpoints that are meshed workloads, reached over mutual TLS: endpoint (as in
    /// [`Backend::endpoints`]) → the SPIFFE ID it must present. Other endpoints get plaintext.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub mtls_identities: std::collections::BTreeMap<String, String>,
}

impl Backend {
    pub fn default_connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    Random,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c), e.g. for gRPC backends.
    Http2,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    pub target: BackendTarget,
    /// Share of requests mirrored, in percent (0–100). Default 100.
    #[serde(default = "Mirror::default_percent")]
    pub percent: f64,
}

impl Mirror {
    fn default_percent() -> f64 {
        100.0
    }
}

/// Gateway API rule timeouts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// From the request's arrival to the end of the response headers sent downstream,
    /// retries included. Expiry → 504.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "duration::serde_opt_duration"
    )]
    pub request: Option<Duration>,
    /// One attempt to one backend, from sending the request to the response headers.
    /// Expiry → 504.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "duration::serde_opt_duration"
    )]
    pub backend_request: Option<Duration>,
}

impl Timeouts {
    pub fn is_empty(&self) -> bool {
        self.request.is_none() && self.backend_request.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum Filter {
    RequestHeaderModifier(HeaderModifier),
    ResponseHeaderModifier(HeaderModifier),
    UrlRewrite(UrlRewrite),
}

/// Header changes. Names compare case-insensitively. Order of application: `set`, then
/// `add`, then `remove`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    /// Replace the header's value (or add it if absent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HeaderValue>,
    /// Append a value, keeping existing ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderValue>,
    /// Remove every value of these headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redirect {
    /// `http` or `https`; default: the request's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
    /// Default: the well-known port of the scheme when the scheme changes, else the
    /// request's port (omitted from Location when it is the scheme's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 301 or 302 (default 302).
    #[serde(default = "Redirect::default_status")]
    pub status_code: u16,
}

impl Redirect {
    fn default_status() -> u16 {
        302
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewrite {
    /// Replace the Host header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type", content = "value")]
pub enum PathRewrite {
    /// Replace the whole path (the query string is kept).
    ReplaceFullPath(String),
    /// Replace the part of the path matched by the route's `Prefix` path match. Only valid on
    /// routes whose path match is a prefix.
    ReplacePrefixMatch(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DirectResponse {
    pub status: u16,
    #[serde(default)]
    pub body: String,
}

/// A token bucket with Envoy's local rate limit semantics: `max_tokens` is the capacity and the
/// initial fill; `tokens_per_fill` are added every `fill_interval` (lazily, from monotonic
/// time), never above `max_tokens`. One request takes one token; with none left the request is
/// answered locally with `status`, body `local_rate_limited` and `response_headers_to_add`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// Unique name; referenced by listeners, routes and backends.
    pub name: String,
    pub max_tokens: u64,
    pub tokens_per_fill: u64,
    #[serde(with = "duration::serde_duration")]
    pub fill_interval: Duration,
    /// Status of limited responses (default 429).
    #[serde(default = "RateLimit::default_status")]
    pub status: u16,
    /// Headers added to limited responses only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub response_headers_to_add: Vec<HeaderValue>,
    /// Add `x-ratelimit-limit`, `x-ratelimit-remaining`, `x-ratelimit-reset` to every response
    /// this limit checked (Envoy's `enable_x_ratelimit_headers: DRAFT_VERSION_03`).
    #[serde(default)]
    pub x_ratelimit_headers: bool,
    #[serde(default)]
    pub mode: RateLimitMode,
}

impl RateLimit {
    fn default_status() -> u16 {
        429
    }
}

/// How a budget is shared among the proxy instances that enforce it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum RateLimitMode {
    /// Every instance has the whole budget (Envoy's local rate limit): N instances let through
    /// N times the limit.
    #[default]
    Local,
    /// One budget split across `instances` instances: each gets `ceil(max_tokens / instances)`
    /// capacity and `ceil(tokens_per_fill / instances)` per fill, so the fleet lets through about the
    /// limit written. `instances` comes from the control plane (or a flag when standalone).
    Distributed { instances: u32 },
}

/// JSON access log, one line per request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLog {
    /// Where to write: `/dev/stdout` (Istio's `accessLogFile`), a file path, or none (off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[cfg(test)]
mod tests;
