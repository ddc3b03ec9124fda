//! The compiled routing table: built once per config, then only read.
//!
//! [`RouteTable::build`] turns a validated [`ProxyConfig`] into per-listener tables with
//! regexes compiled, hostnames indexed, weights prefix-summed and backends resolved to shared
//! endpoint sets and rate-limit names resolved to [`RateLimiter`] handles (the request path
//! never looks a limit up by name). Matching ([`ListenerTable::route`]) is a pure function of the request parts,
//! so it is unit tested here without sockets.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use mesh_tls::SpiffeId;
use regex::Regex;

use crate::config::{
    self, BackendTarget, Filter, HttpLimits, ListenerKind, LoadBalancer, PathMatch, PathRewrite,
    ProxyConfig, RouteAction, StringMatch, Timeouts, UpstreamProtocol,
};
use crate::ratelimit::{RateLimiter, RateLimiters};

/// A problem that makes a config impossible to compile (beyond [`ProxyConfig::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct BuildError {
    pub path: String,
    pub message: String,
}

/// One group of endpoints, shared (via `Arc`) by every route that references it.
#[derive(Debug)]
pub struct Upstream {
    pub name: Arc<str>,
    /// `host:port` authorities.
    pub endpoints: Vec<Arc<str>>,
    /// `endpoints` parsed once as URI authorities (`None` if one does not parse: that
    /// endpoint's requests fail with a connect error, as before).
    authorities: Vec<Option<http::uri::Authority>>,
    pub load_balancer: LoadBalancer,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    /// The configured name of the backend's limit: part of what makes a backend the same
    /// across builds. The request path checks the handle on each [`WeightedTarget`].
    pub rate_limit: Option<String>,
    /// Per endpoint: the identity a meshed endpoint must prove over mutual TLS (`None`:
    /// plaintext).
    identities: Vec<Option<Arc<SpiffeId>>>,
    next: AtomicUsize,
}

/// One endpoint chosen for a request.
#[derive(Debug, Clone, Copy)]
pub struct Picked<'a> {
    pub endpoint: &'a Arc<str>,
    /// Pre-parsed as a URI authority (`None` if it does not parse).
    pub authority: Option<&'a http::uri::Authority>,
    /// The identity to expect over mutual TLS; `None`: plaintext.
    pub identity: Option<&'a Arc<SpiffeId>>,
}

impl Upstream {
    pub fn new(b: &config::Backend) -> Self {
        Upstream {
            name: b.name.as_str().into(),
            endpoints: b.endpoints.iter().map(|e| Arc::from(e.as_str())).collect(),
            authorities: b
                .endpoints
                .iter()
                .map(|e| http::uri::Authority::try_from(e.as_str()).ok())
                .collect(),
            load_balancer: b.load_balancer,
            protocol: b.protocol,
            connect_timeout: b.connect_timeout,
            rate_limit: b.rate_limit.clone(),
            // Validation checked every identity's shape.
            identities: b
                .endpoints
                .iter()
                .map(|e| {
                    b.mtls_identities
                        .get(e)
                        .and_then(|id| id.parse::<SpiffeId>().ok())
                        .map(Arc::new)
                })
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Picks an endpoint by the backend's load-balancing policy; `None` if there is none.
    pub fn pick(&self) -> Option<&Arc<str>> {
        self.pick_index().map(|i| &self.endpoints[i])
    }

    /// [`pick`](Self::pick), with the endpoint's pre-parsed authority and identity.
    pub fn pick_endpoint(&self) -> Option<Picked<'_>> {
        self.pick_index().map(|i| Picked {
            endpoint: &self.endpoints[i],
            authority: self.authorities[i].as_ref(),
            identity: self.identities[i].as_ref(),
        })
    }

    fn pick_index(&self) -> Option<usize> {
        match self.endpoints.len() {
            0 => None,
            1 => Some(0),
            n => Some(match self.load_balancer {
                LoadBalancer::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
                LoadBalancer::Random => fastrand::usize(0..n),
            }),
        }
    }
}

/// Where a share of the traffic goes.
#[derive(Debug, Clone)]
pub enum Target {
    Upstream(Arc<Upstream>),
    /// An unresolved reference: its share gets 500.
    Invalid(Arc<str>),
}

impl Target {
    pub fn name(&self) -> &str {
        match self {
            Target::Upstream(u) => &u.name,
            Target::Invalid(_) => "",
        }
    }
}

/// Header changes with names and values parsed once.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderOps {
    fn compile(m: &config::HeaderModifier, path: &str) -> Result<Self, BuildError> {
        let pair = |h: &config::HeaderValue, p: String| {
            let name = HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes());
            let value = HeaderValue::from_str(&h.value);
            match (name, value) {
                (Ok(n), Ok(v)) => Ok((n, v)),
                _ => Err(BuildError {
                    path: p,
                    message: format!("{:?}: {:?} is not a valid header", h.name, h.value),
                }),
            }
        };
        let mut ops = HeaderOps::default();
        for (i, h) in m.set.iter().enumerate() {
            ops.set.push(pair(h, format!("{path}.set[{i}]"))?);
        }
        for (i, h) in m.add.iter().enumerate() {
            ops.add.push(pair(h, format!("{path}.add[{i}]"))?);
        }
        for (i, n) in m.remove.iter().enumerate() {
            ops.remove.push(
                HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()).map_err(|_| {
                    BuildError {
                        path: format!("{path}.remove[{i}]"),
                        message: format!("{n:?} is not a header name"),
                    }
                })?,
            );
        }
        Ok(ops)
    }

    /// Set, then add, then remove.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            headers.remove(n);
        }
    }
}

/// A route filter, compiled.
#[derive(Debug, Clone)]
pub enum CompiledFilter {
    RequestHeaders(HeaderOps),
    ResponseHeaders(HeaderOps),
    UrlRewrite {
        hostname: Option<HeaderValue>,
        path: Option<PathRewrite>,
    },
}

fn compile_filters(filters: &[Filter], path: &str) -> Result<Vec<CompiledFilter>, BuildError> {
    filters
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let p = format!("{path}[{i}]");
            Ok(match f {
                Filter::RequestHeaderModifier(m) => {
                    CompiledFilter::RequestHeaders(HeaderOps::compile(m, &p)?)
                }
                Filter::ResponseHeaderModifier(m) => {
                    CompiledFilter::ResponseHeaders(HeaderOps::compile(m, &p)?)
                }
                Filter::UrlRewrite(u) => CompiledFilter::UrlRewrite {
                    hostname: match &u.hostname {
                        Some(h) => Some(HeaderValue::from_str(h).map_err(|_| BuildError {
                            path: format!("{p}.hostname"),
                            message: format!("{h:?} is not a valid Host"),
                        })?),
                        None => None,
                    },
                    path: u.path.clone(),
                },
            })
        })
        .collect()
}

/// A weighted backend of a forward action.
#[derive(Debug, Clone)]
pub struct WeightedTarget {
    pub target: Target,
    pub weight: u32,
    pub filters: Vec<CompiledFilter>,
    /// The backend's limit (Service scope), resolved when the table is built.
    pub rate_limit: Option<RateLimiter>,
}

#[derive(Debug, Clone)]
pub struct MirrorTarget {
    pub target: Target,
    pub percent: f64,
}

#[derive(Debug)]
pub struct ForwardAction {
    pub backends: Vec<WeightedTarget>,
    /// Prefix sums of the weights; `cumulative[i]` = sum of weights `0..=i`.
    cumulative: Vec<u64>,
    pub mirrors: Vec<MirrorTarget>,
}

impl ForwardAction {
    /// The sum of all weights; 0 means every request gets 500.
    pub fn total_weight(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// Picks a backend with probability weight/sum. `None` if all weights are 0.
    pub fn pick(&self) -> Option<&WeightedTarget> {
        let total = self.total_weight();
        if total == 0 {
            return None;
        }
        self.pick_with(fastrand::u64(0..total))
    }

    /// Deterministic form of [`pick`](Self::pick): `r` in `0..total_weight()`.
    pub fn pick_with(&self, r: u64) -> Option<&WeightedTarget> {
        let i = self.cumulative.partition_point(|&c| c <= r);
        self.backends.get(i)
    }
}

#[derive(Debug)]
pub enum Action {
    Forward(ForwardAction),
    Redirect(config::Redirect),
    DirectResponse {
        status: StatusCode,
        body: bytes::Bytes,
    },
}

#[derive(Debug)]
enum PathMatcher {
    Exact(String),
    /// Normalized: no trailing `/` except for the root (`/`).
    Prefix(String),
    Regex(Regex),
}

impl PathMatcher {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Exact(p) => path == p,
            PathMatcher::Prefix(p) => prefix_matches(p, path),
            PathMatcher::Regex(re) => re.is_match(path),
        }
    }
}

/// Element-wise prefix match; `prefix` is normalized (no trailing `/` unless it is `/`).
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn normalize_prefix(p: &str) -> String {
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        "/".to_string()
    } else {
        t.to_string()
    }
}

fn anchored(re: &str, path: &str) -> Result<Regex, BuildError> {
    Regex::new(&format!("^(?:{re})$")).map_err(|e| BuildError {
        path: path.to_string(),
        message: format!("invalid regular expression: {e}"),
    })
}

#[derive(Debug)]
enum ValueMatcher {
    Exact(String),
    Regex(Regex),
}

impl ValueMatcher {
    fn compile(m: &StringMatch, path: &str) -> Result<Self, BuildError> {
        Ok(match m {
            StringMatch::Exact(v) => ValueMatcher::Exact(v.clone()),
            StringMatch::Regex(re) => ValueMatcher::Regex(anchored(re, path)?),
        })
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatcher::Exact(e) => e == v,
            ValueMatcher::Regex(re) => re.is_match(v),
        }
    }
}

#[derive(Debug)]
struct Matcher {
    path: PathMatcher,
    headers: Vec<(HeaderName, ValueMatcher)>,
    query: Vec<(String, ValueMatcher)>,
    method: Option<Method>,
}

impl Matcher {
    fn matches(&self, req: &RequestInfo<'_>) -> bool {
        if let Some(m) = &self.method
            && m != req.method
        {
            return false;
        }
        if !self.path.matches(req.path) {
            return false;
        }
        // Several values of one header: the first one is matched.
        for (name, vm) in &self.headers {
            match req.headers.get(name).and_then(|v| v.to_str().ok()) {
                Some(v) if vm.matches(v) => {}
                _ => return false,
            }
        }
        if !self.query.is_empty() {
            let params = parse_query(req.query.unwrap_or(""));
            for (name, vm) in &self.query {
                match params.iter().find(|(k, _)| k == name) {
                    Some((_, v)) if vm.matches(v) => {}
                    _ => return false,
                }
            }
        }
        true
    }
}

/// Decodes `a=1&b=%20x` into pairs (percent-decoded; a key without `=` has an empty value).
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// One route, compiled.
#[derive(Debug)]
pub struct CompiledRoute {
    pub name: Arc<str>,
    matcher: Matcher,
    /// The normalized prefix of a `Prefix` path match (for `ReplacePrefixMatch`).
    pub prefix: Option<String>,
    pub filters: Vec<CompiledFilter>,
    pub action: Action,
    pub rate_limit: Option<RateLimiter>,
    pub timeouts: Timeouts,
}

#[derive(Debug)]
pub struct CompiledVirtualHost {
    pub name: Arc<str>,
    pub routes: Vec<CompiledRoute>,
}

/// Hostname → virtual host index, by the Gateway API precedence.
#[derive(Debug, Default)]
struct HostIndex {
    exact: HashMap<String, usize>,
    /// (`.example.com`, vhost), longest suffix first.
    wildcards: Vec<(String, usize)>,
    any: Option<usize>,
}

impl HostIndex {
    fn lookup(&self, host: &str) -> Option<usize> {
        if let Some(&i) = self.exact.get(host) {
            return Some(i);
        }
        for (suffix, i) in &self.wildcards {
            if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                return Some(*i);
            }
        }
        self.any
    }
}

/// The parts of a request that routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// Lowercase host without port.
    pub host: &'a str,
    pub method: &'a Method,
    /// Path without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// One listener's routes.
#[derive(Debug)]
pub struct ListenerTable {
    pub name: Arc<str>,
    pub port: u16,
    pub kind: ListenerKind,
    /// The listener's limit (Gateway scope): every request it gets, routed or not.
    pub rate_limit: Option<RateLimiter>,
    pub limits: HttpLimits,
    pub virtual_hosts: Vec<CompiledVirtualHost>,
    hosts: HostIndex,
    /// Sidecar outbound: mesh Services by original destination.
    services: HashMap<std::net::SocketAddr, Arc<CompiledService>>,
    /// Sidecar inbound: the rate limit of each app port that has one.
    inbound_limits: HashMap<u16, RateLimiter>,
    /// Mutual TLS from other proxies (sidecar inbound: unset is PERMISSIVE; gateway: unset
    /// takes none).
    pub mtls: Option<config::InboundMtls>,
}

/// One mesh Service port of a sidecar outbound listener, compiled.
#[derive(Debug)]
pub struct CompiledService {
    pub name: Arc<str>,
    pub routes: Vec<CompiledRoute>,
    /// Where opaque TCP goes; `None`: the original destination.
    pub tcp_backend: Option<Arc<Upstream>>,
}

impl CompiledService {
    /// The first route whose match holds (the host is not looked at: the destination chose
    /// the Service).
    pub fn route(&self, req: &RequestInfo<'_>) -> Option<&CompiledRoute> {
        self.routes.iter().find(|r| r.matcher.matches(req))
    }
}

impl ListenerTable {
    /// The virtual host serving `host` (lowercase, without port), by hostname precedence.
    pub fn virtual_host(&self, host: &str) -> Option<&CompiledVirtualHost> {
        self.hosts.lookup(host).map(|i| &self.virtual_hosts[i])
    }

    /// The first route of the selected virtual host whose match holds.
    pub fn route(&self, req: &RequestInfo<'_>) -> Option<(&CompiledVirtualHost, &CompiledRoute)> {
        let vh = self.virtual_host(req.host)?;
        vh.routes
            .iter()
            .find(|r| r.matcher.matches(req))
            .map(|r| (vh, r))
    }

    /// Sidecar outbound: the mesh Service behind an original destination.
    pub fn service(&self, dst: std::net::SocketAddr) -> Option<&Arc<CompiledService>> {
        self.services.get(&dst)
    }

    /// Sidecar inbound: the rate limit of an app port.
    pub fn inbound_limit(&self, port: u16) -> Option<&RateLimiter> {
        self.inbound_limits.get(&port)
    }
}

/// All listeners' tables plus the shared backends of one config.
#[derive(Debug)]
pub struct RouteTable {
    pub listeners: Vec<Arc<ListenerTable>>,
    pub upstreams: HashMap<String, Arc<Upstream>>,
}

impl RouteTable {
    /// Compiles a validated config. `previous` lets backends whose definition did not change
    /// keep their `Arc` (and round-robin position) across reloads. Every rate-limit name is
    /// resolved against `limiters` (the same config's, built first so that unchanged buckets
    /// keep their state).
    pub fn build(
        cfg: &ProxyConfig,
        previous: Option<&RouteTable>,
        limiters: &RateLimiters,
    ) -> Result<Self, BuildError> {
        let mut upstreams = HashMap::new();
        for b in &cfg.backends {
            let reuse = previous
                .and_then(|p| p.upstreams.get(&b.name))
                .filter(|u| same_upstream(u, b));
            let u = match reuse {
                Some(u) => u.clone(),
                None => Arc::new(Upstream::new(b)),
            };
            upstreams.insert(b.name.clone(), u);
        }
        let mut backend_limits = HashMap::new();
        for (i, b) in cfg.backends.iter().enumerate() {
            let path = format!("backends[{i}].rateLimit");
            if let Some(l) = resolve_limit(limiters, b.rate_limit.as_deref(), &path)? {
                backend_limits.insert(b.name.as_str(), l);
            }
        }
        let resolve = Resolver {
            upstreams: &upstreams,
            limiters,
            backend_limits: &backend_limits,
        };

        let mut listeners = Vec::new();
        for (li, l) in cfg.listeners.iter().enumerate() {
            let lp = format!("listeners[{li}]");
            let mut hosts = HostIndex::default();
            let mut vhosts = Vec::new();
            for (vi, vh) in l.virtual_hosts.iter().enumerate() {
                let vp = format!("{lp}.virtualHosts[{vi}]");
                for h in &vh.hostnames {
                    let h = h.to_ascii_lowercase();
                    if h == "*" {
                        hosts.any.get_or_insert(vi);
                    } else if let Some(suffix) = h.strip_prefix('*') {
                        if !hosts.wildcards.iter().any(|(s, _)| s == suffix) {
                            hosts.wildcards.push((suffix.to_string(), vi));
                        }
                    } else {
                        hosts.exact.entry(h).or_insert(vi);
                    }
                }
                let mut routes = Vec::new();
                for (ri, r) in vh.routes.iter().enumerate() {
                    let rp = format!("{vp}.routes[{ri}]");
                    routes.push(compile_route(r, &rp, &resolve)?);
                }
                vhosts.push(CompiledVirtualHost {
                    name: vh.name.as_str().into(),
                    routes,
                });
            }
            // Longest suffix first; stable, so equal lengths keep config order.
            hosts
                .wildcards
                .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
            let mut services = HashMap::new();
            for (si, svc) in l.services.iter().enumerate() {
                let sp = format!("{lp}.services[{si}]");
                let mut routes = Vec::new();
                for (ri, r) in svc.routes.iter().enumerate() {
                    routes.push(compile_route(r, &format!("{sp}.routes[{ri}]"), &resolve)?);
                }
                let tcp_backend = match &svc.tcp_backend {
                    Some(b) => match resolve.target(
                        &BackendTarget::Backend(b.clone()),
                        &format!("{sp}.tcpBackend"),
                    )? {
                        Target::Upstream(u) => Some(u),
                        Target::Invalid(_) => None,
                    },
                    None => None,
                };
                let compiled = Arc::new(CompiledService {
                    name: svc.name.as_str().into(),
                    routes,
                    tcp_backend,
                });
                for (ai, a) in svc.addresses.iter().enumerate() {
                    let ip: std::net::IpAddr = a.parse().map_err(|_| BuildError {
                        path: format!("{sp}.addresses[{ai}]"),
                        message: format!("{a:?} is not an IP address"),
                    })?;
                    services.insert(std::net::SocketAddr::new(ip, svc.port), compiled.clone());
                }
            }
            let mut inbound_limits = HashMap::new();
            for (pi, p) in l.inbound_ports.iter().enumerate() {
                let path = format!("{lp}.inboundPorts[{pi}].rateLimit");
                if let Some(limit) = resolve.limit(p.rate_limit.as_deref(), &path)? {
                    inbound_limits.insert(p.port, limit);
                }
            }
            let rate_limit = resolve.limit(l.rate_limit.as_deref(), &format!("{lp}.rateLimit"))?;
            listeners.push(Arc::new(ListenerTable {
                name: l.name.as_str().into(),
                port: l.port,
                kind: l.kind,
                rate_limit,
                limits: l.limits,
                virtual_hosts: vhosts,
                hosts,
                services,
                inbound_limits,
                mtls: l.mtls.clone(),
            }));
        }
        Ok(RouteTable {
            listeners,
            upstreams,
        })
    }

    pub fn listener(&self, name: &str) -> Option<&Arc<ListenerTable>> {
        self.listeners.iter().find(|l| &*l.name == name)
    }
}

fn same_upstream(u: &Upstream, b: &config::Backend) -> bool {
    u.endpoints.len() == b.endpoints.len()
        && u.endpoints
            .iter()
            .zip(&b.endpoints)
            .all(|(a, b)| **a == **b)
        && u.load_balancer == b.load_balancer
        && u.protocol == b.protocol
        && u.connect_timeout == b.connect_timeout
        && u.rate_limit == b.rate_limit
        && u.identities.iter().zip(&b.endpoints).all(|(id, e)| {
            id.as_deref().map(|i| i.to_string()).as_ref() == b.mtls_identities.get(e)
        })
}

/// Resolves a config's references (backends, rate limits) to shared handles while a table is
/// built.
struct Resolver<'a> {
    upstreams: &'a HashMap<String, Arc<Upstream>>,
    limiters: &'a RateLimiters,
    /// Each backend's limit, by backend name.
    backend_limits: &'a HashMap<&'a str, RateLimiter>,
}

impl Resolver<'_> {
    fn target(&self, t: &BackendTarget, path: &str) -> Result<Target, BuildError> {
        match t {
            BackendTarget::Backend(n) => self
                .upstreams
                .get(n)
                .cloned()
                .map(Target::Upstream)
                .ok_or_else(|| BuildError {
                    path: path.to_string(),
                    message: format!("no backend named {n:?}"),
                }),
            BackendTarget::Invalid(reason) => Ok(Target::Invalid(reason.as_str().into())),
        }
    }

    fn limit(&self, name: Option<&str>, path: &str) -> Result<Option<RateLimiter>, BuildError> {
        resolve_limit(self.limiters, name, path)
    }

    /// The limit of the backend a share of traffic goes to (`None` for an invalid target).
    fn backend_limit(&self, t: &Target) -> Option<RateLimiter> {
        match t {
            Target::Upstream(u) => self.backend_limits.get(&*u.name).cloned(),
            Target::Invalid(_) => None,
        }
    }
}

fn resolve_limit(
    limiters: &RateLimiters,
    name: Option<&str>,
    path: &str,
) -> Result<Option<RateLimiter>, BuildError> {
    let Some(name) = name else {
        return Ok(None);
    };
    match limiters.get(name) {
        Some(l) => Ok(Some(l.clone())),
        None => Err(BuildError {
            path: path.to_string(),
            message: format!("no rate limit named {name:?}"),
        }),
    }
}

fn compile_route(
    r: &config::Route,
    rp: &str,
    resolve: &Resolver<'_>,
) -> Result<CompiledRoute, BuildError> {
    let m = &r.matches;
    let (path, prefix) = match &m.path {
        PathMatch::Exact(p) => (PathMatcher::Exact(p.clone()), None),
        PathMatch::Prefix(p) => {
            let n = normalize_prefix(p);
            (PathMatcher::Prefix(n.clone()), Some(n))
        }
        PathMatch::Regex(re) => (
            PathMatcher::Regex(anchored(re, &format!("{rp}.match.path.value"))?),
            None,
        ),
    };
    let mut headers = Vec::new();
    for (i, h) in m.headers.iter().enumerate() {
        let hp = format!("{rp}.match.headers[{i}]");
        let name =
            HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes()).map_err(|_| {
                BuildError {
                    path: format!("{hp}.name"),
                    message: format!("{:?} is not a header name", h.name),
                }
            })?;
        headers.push((name, ValueMatcher::compile(&h.value, &hp)?));
    }
    let mut query = Vec::new();
    for (i, q) in m.query_params.iter().enumerate() {
        let qp = format!("{rp}.match.queryParams[{i}]");
        query.push((q.name.clone(), ValueMatcher::compile(&q.value, &qp)?));
    }
    let method = match &m.method {
        Some(s) => Some(Method::from_bytes(s.as_bytes()).map_err(|_| BuildError {
            path: format!("{rp}.match.method"),
            message: format!("{s:?} is not an HTTP method"),
        })?),
        None => None,
    };
    let action = match &r.action {
        RouteAction::Forward(f) => {
            let mut backends = Vec::new();
            let mut cumulative = Vec::new();
            let mut sum = 0u64;
            for (i, wb) in f.backends.iter().enumerate() {
                let bp = format!("{rp}.action.backends[{i}]");
                sum += u64::from(wb.weight);
                cumulative.push(sum);
                let target = resolve.target(&wb.target, &format!("{bp}.target"))?;
                let rate_limit = resolve.backend_limit(&target);
                backends.push(WeightedTarget {
                    target,
                    weight: wb.weight,
                    filters: compile_filters(&wb.filters, &format!("{bp}.filters"))?,
                    rate_limit,
                });
            }
            let mut mirrors = Vec::new();
            for (i, mi) in f.mirrors.iter().enumerate() {
                mirrors.push(MirrorTarget {
                    target: resolve
                        .target(&mi.target, &format!("{rp}.action.mirrors[{i}].target"))?,
                    percent: mi.percent,
                });
            }
            Action::Forward(ForwardAction {
                backends,
                cumulative,
                mirrors,
            })
        }
        RouteAction::Redirect(rd) => Action::Redirect(rd.clone()),
        RouteAction::DirectResponse(d) => Action::DirectResponse {
            status: StatusCode::from_u16(d.status).map_err(|_| BuildError {
                path: format!("{rp}.action.status"),
                message: format!("{} is not an HTTP status", d.status),
            })?,
            body: bytes::Bytes::from(d.body.clone()),
        },
    };
    Ok(CompiledRoute {
        name: r.name.as_str().into(),
        matcher: Matcher {
            path,
            headers,
            query,
            method,
        },
        prefix,
        filters: compile_filters(&r.filters, &format!("{rp}.filters"))?,
        action,
        rate_limit: resolve.limit(r.rate_limit.as_deref(), &format!("{rp}.rateLimit"))?,
        timeouts: r.timeouts,
    })
}

impl CompiledRoute {
    /// A route that sends every request to one fixed endpoint: the sidecar's path to the
    /// original destination (outbound, not a mesh Service) or to the local app (inbound).
    /// Built per request; `name` is the route and backend label.
    pub fn passthrough(
        name: Arc<str>,
        endpoint: std::net::SocketAddr,
        rate_limit: Option<RateLimiter>,
        connect_timeout: Duration,
    ) -> CompiledRoute {
        let upstream = Upstream {
            name: name.clone(),
            endpoints: vec![endpoint.to_string().into()],
            authorities: vec![http::uri::Authority::try_from(endpoint.to_string()).ok()],
            load_balancer: LoadBalancer::RoundRobin,
            protocol: UpstreamProtocol::Http1,
            connect_timeout,
            rate_limit: None,
            identities: vec![None],
            next: AtomicUsize::new(0),
        };
        CompiledRoute {
            name,
            matcher: Matcher {
                path: PathMatcher::Prefix("/".into()),
                headers: Vec::new(),
                query: Vec::new(),
                method: None,
            },
            prefix: Some("/".into()),
            filters: Vec::new(),
            action: Action::Forward(ForwardAction {
                backends: vec![WeightedTarget {
                    target: Target::Upstream(Arc::new(upstream)),
                    weight: 1,
                    filters: Vec::new(),
                    rate_limit: None,
                }],
                cumulative: vec![1],
                mirrors: Vec::new(),
            }),
            rate_limit,
            timeouts: Timeouts::default(),
        }
    }
}

/// Applies a path rewrite. `prefix` is the route's normalized prefix match, if any.
/// Returns the new path (the caller keeps the query).
pub fn rewrite_path(rw: &PathRewrite, prefix: Option<&str>, path: &str) -> String {
    match rw {
        PathRewrite::ReplaceFullPath(p) => p.clone(),
        PathRewrite::ReplacePrefixMatch(repl) => {
            let rest = match prefix {
                Some("/") | None => path,
                Some(p) => path.strip_prefix(p).unwrap_or(path),
            };
            let base = repl.trim_end_matches('/');
            let mut out = String::with_capacity(base.len() + rest.len());
            out.push_str(base);
            if !rest.is_empty() && !rest.starts_with('/') {
                out.push('/');
            }
            out.push_str(rest);
            if out.is_empty() {
                out.push('/');
            }
            out
        }
    }
}

#[cfg(test)]
mod tests;
