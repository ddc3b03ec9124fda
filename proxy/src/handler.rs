//! The request path: route, rate-limit, filter, forward (or answer locally), then report.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::body::{self, CountingBody, InFlightBody, LoggedBody, PendingLog, ProxyBody, TeeBody};
use crate::config::{Backend, ListenerKind, ProxyConfig, UpstreamProtocol};
use crate::connection::{HttpSettings, InFlight};
use crate::error::ProxyError;
use crate::headers;
use crate::observe::{Arrival, Finished};
use crate::ratelimit::{RateLimitDecision, RateLimiter, RateLimiters};
use crate::routing::{
    Action, CompiledFilter, CompiledRoute, HeaderOps, ListenerTable, RequestInfo, RouteTable,
    Target, Upstream, rewrite_path,
};
use crate::upstream::Clients;
use std::sync::atomic::AtomicU64;

/// Everything derived from one config, shared by all listeners; swapped whole on reload.
pub struct Snapshot {
    pub config: Arc<ProxyConfig>,
    pub table: Arc<RouteTable>,
    pub limiters: Arc<RateLimiters>,
    /// The config's HTTP options with the command line's and the built-in defaults.
    pub http: Arc<HttpSettings>,
}

/// What one listener's connections read per request (through an `ArcSwap`).
pub struct ListenerState {
    pub table: Arc<ListenerTable>,
    pub snapshot: Arc<Snapshot>,
}

/// State that lives as long as the proxy: upstream pools, observers, the kill switch.
pub struct Runtime {
    pub clients: Clients,
    pub observer: crate::observe::Observer,
    /// Cancelled when the drain grace period is over: upgraded (tunnelled) connections end.
    pub kill: CancellationToken,
}

/// What happened to one request, for metrics and the access log.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub route: Option<Arc<str>>,
    pub backend: Option<Arc<str>>,
    pub upstream_host: Option<Arc<str>>,
    pub error: Option<ProxyError>,
    /// Name of the limit that refused the request.
    pub rate_limited: Option<String>,
    /// Answered by the route itself (direct response or redirect).
    pub direct: bool,
    /// Served by a sidecar passthrough route (original destination, or the local app).
    pub passthrough: bool,
}

/// The downstream connection is closed without a response: a sidecar passthrough whose
/// destination refused the connection (or closed it without answering) fails the way the
/// un-meshed connection would have.
#[derive(Debug, thiserror::Error)]
#[error("the original destination refused the connection")]
pub struct CloseConnection;

/// Inbound: the app is reached over loopback on the original port.
const INBOUND_APP_IP: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Serves one request. Never fails: every failure is turned into a response by
/// [`ProxyError::into_response`].
pub async fn handle(
    rt: Arc<Runtime>,
    st: Arc<ListenerState>,
    req: Request<Incoming>,
    peer: SocketAddr,
    original_dst: Option<SocketAddr>,
    in_flight: InFlight,
) -> Result<Response<ProxyBody>, CloseConnection> {
    let start = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let version = req.version();
    let arrival = rt
        .observer
        .access_log_enabled()
        .then(|| Arrival::new(&uri, req.headers()));
    // The request id and the bytes received are kept only for the access log.
    let mut request_id = arrival
        .as_ref()
        .and_then(|_| req.headers().get(&headers::X_REQUEST_ID).cloned());
    let received = arrival.as_ref().map(|_| Arc::new(AtomicU64::new(0)));
    let req = match &received {
        Some(received) => req.map(|b| CountingBody::wrap(body::downstream(b), received.clone())),
        None => req.map(body::downstream),
    };
    let mut out = Outcome::default();
    let resp = serve(
        &rt,
        &st,
        req,
        peer,
        original_dst,
        start,
        &mut out,
        &mut request_id,
    )
    .await;
    let entry = rt.observer.request_done(Finished {
        listener: &st.table.name,
        method: &method,
        uri: &uri,
        version,
        peer,
        request_id: request_id.as_ref(),
        status: resp.status(),
        bytes_sent: http_body::Body::size_hint(resp.body()).exact(),
        duration: start.elapsed(),
        outcome: &out,
        arrival,
    });
    // A passthrough whose destination refused (or closed without answering) fails like the
    // un-meshed connection: the downstream connection is closed, no response is made up.
    if out.passthrough
        && matches!(
            out.error,
            Some(ProxyError::Connect(_) | ProxyError::UpstreamReset(_))
        )
    {
        if let Some(entry) = entry {
            rt.observer.access_log.log(entry);
        }
        return Err(CloseConnection);
    }
    let resp = match entry {
        Some(entry) => resp.map(|b| {
            LoggedBody::wrap(
                b,
                PendingLog {
                    logger: rt.observer.access_log.clone(),
                    entry,
                    received: received.unwrap_or_default(),
                    start,
                },
            )
        }),
        None => resp,
    };
    Ok(resp.map(|b| InFlightBody::wrap(b, in_flight)))
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    rt: &Arc<Runtime>,
    st: &ListenerState,
    req: Request<ProxyBody>,
    peer: SocketAddr,
    original_dst: Option<SocketAddr>,
    start: Instant,
    out: &mut Outcome,
    request_id: &mut Option<HeaderValue>,
) -> Response<ProxyBody> {
    let limits = st.table.limits;
    let head = headers::head_size(
        req.method().as_str(),
        req.uri().path_and_query().map_or(1, |p| p.as_str().len()),
        req.headers(),
    );
    if req.headers().len() > limits.max_headers as usize || head > limits.max_header_bytes as usize
    {
        return fail(out, ProxyError::HeadersTooLarge);
    }
    let http = &*st.snapshot.http;
    if let Err(e) = check_host(&req) {
        return fail(out, e);
    }
    let mut req = req;
    if let Err(e) = normalize_path(&mut req, http.path_normalization) {
        return fail(out, e);
    }

    // Both borrow the request (no copies); they are last used before it is forwarded.
    let (host_port, host) = request_host(&req);
    let info = RequestInfo {
        host: &host,
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
    };
    let passthrough: CompiledRoute;
    let route = match (st.table.kind, original_dst) {
        (ListenerKind::Gateway, _) => st.table.route(&info).map(|(_, r)| r),
        (ListenerKind::SidecarOutbound, Some(dst)) => match st.table.service(dst) {
            Some(svc) => svc.route(&info),
            None => {
                out.passthrough = true;
                passthrough = CompiledRoute::passthrough(
                    "passthrough".into(),
                    dst,
                    None,
                    Backend::default_connect_timeout(),
                );
                Some(&passthrough)
            }
        },
        (ListenerKind::SidecarInbound, Some(dst)) => {
            out.passthrough = true;
            passthrough = CompiledRoute::passthrough(
                format!("inbound|{}", dst.port()).into(),
                SocketAddr::new(INBOUND_APP_IP, dst.port()),
                st.table.inbound_limit(dst.port()).cloned(),
                Backend::default_connect_timeout(),
            );
            Some(&passthrough)
        }
        (_, None) => None,
    };
    let route = match route {
        Some(r) => r,
        None => {
            // The listener's limit applies to every request it gets, routed or not.
            let mut extra = HeaderMap::new();
            if let Some(resp) = check_limit(st.table.rate_limit.as_ref(), out, &mut extra) {
                return resp;
            }
            let mut resp = fail(out, ProxyError::NoRoute);
            resp.headers_mut().extend(extra);
            return resp;
        }
    };
    out.route = Some(route.name.clone());
    let route_resp_ops: Vec<&HeaderOps> = response_ops(&route.filters).collect();

    // Rate limits: listener, then route, then (below) the chosen backend.
    let mut extra = HeaderMap::new();
    for limit in [st.table.rate_limit.as_ref(), route.rate_limit.as_ref()] {
        if let Some(mut resp) = check_limit(limit, out, &mut extra) {
            apply_ops(&route_resp_ops, resp.headers_mut());
            return resp;
        }
    }

    let mut backend_resp_ops: Vec<&HeaderOps> = Vec::new();
    out.direct = matches!(
        route.action,
        Action::DirectResponse { .. } | Action::Redirect(_)
    );
    let mut resp = match &route.action {
        Action::DirectResponse { status, body } => {
            let mut r = Response::new(body::full(body.clone()));
            *r.status_mut() = *status;
            if !body.is_empty() {
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
            r
        }
        Action::Redirect(rd) => redirect(rd, route, &req, &host, host_port, st.table.port),
        Action::Forward(fwd) => match fwd.pick() {
            None => fail(out, ProxyError::NoBackends),
            Some(choice) => match &choice.target {
                Target::Invalid(reason) => {
                    fail(out, ProxyError::InvalidBackend(reason.to_string()))
                }
                Target::Upstream(upstream) => {
                    out.backend = Some(upstream.name.clone());
                    backend_resp_ops.extend(response_ops(&choice.filters));
                    if let Some(mut resp) = check_limit(choice.rate_limit.as_ref(), out, &mut extra)
                    {
                        apply_ops(&route_resp_ops, resp.headers_mut());
                        apply_ops(&backend_resp_ops, resp.headers_mut());
                        return resp;
                    } else {
                        let filters = route.filters.iter().chain(&choice.filters);
                        let forwarded = forward(
                            rt,
                            http,
                            route,
                            upstream,
                            &fwd.mirrors,
                            filters,
                            req,
                            peer,
                            start,
                            out,
                            request_id,
                        )
                        .await;
                        forwarded.unwrap_or_else(|e| fail(out, e))
                    }
                }
            },
        },
    };
    // Response filters: the route's, then the chosen backend's; then rate-limit headers.
    apply_ops(&route_resp_ops, resp.headers_mut());
    apply_ops(&backend_resp_ops, resp.headers_mut());
    resp.headers_mut().extend(extra);
    resp
}

fn fail(out: &mut Outcome, e: ProxyError) -> Response<ProxyBody> {
    let r = e.into_response();
    out.error = Some(e);
    r
}

/// Checks one limit (resolved when the table was built). `Some(response)` when limited;
/// otherwise its headers (if any) are collected into `extra` for the final response.
fn check_limit(
    limit: Option<&RateLimiter>,
    out: &mut Outcome,
    extra: &mut HeaderMap,
) -> Option<Response<ProxyBody>> {
    match limit?.check() {
        RateLimitDecision::Allowed { headers } => {
            extra.extend(headers);
            None
        }
        RateLimitDecision::Limited(l) => {
            out.rate_limited = Some(l.name().to_string());
            Some(l.local_reply().map(body::boxed))
        }
    }
}

fn response_ops(filters: &[CompiledFilter]) -> impl Iterator<Item = &HeaderOps> {
    filters.iter().filter_map(|f| match f {
        CompiledFilter::ResponseHeaders(ops) => Some(ops),
        _ => None,
    })
}

fn apply_ops(ops: &[&HeaderOps], headers: &mut HeaderMap) {
    for o in ops {
        o.apply(headers);
    }
}

/// The request's host: `(port as sent, lowercase host without port)`; borrowed unless it
/// had uppercase letters.
fn request_host<B>(req: &Request<B>) -> (Option<u16>, Cow<'_, str>) {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or_default();
    let (host, port) = split_host_port(raw);
    let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    };
    (port, host)
}

/// Host rules of RFC 9112 §3.2 and RFC 9113 §8.3.1, checked before anything is routed: an
/// HTTP/1.1 request without a Host, with more than one, or with an invalid one is refused;
/// so is an authority with userinfo (RFC 9110 §4.2.4) and an HTTP/2 request whose Host
/// names another authority than its `:authority`. HTTP/1.0 may omit Host.
fn check_host<B>(req: &Request<B>) -> Result<(), ProxyError> {
    let bad = |why: &str| Err(ProxyError::BadRequest(why.to_string()));
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return bad("more than one Host header");
    }
    if let Some(h) = host
        && !valid_authority(h.as_bytes())
    {
        return bad("invalid Host header");
    }
    match req.uri().authority() {
        Some(a) => {
            if a.as_str().contains('@') {
                return bad("the request target has userinfo");
            }
            if !valid_authority(a.as_str().as_bytes()) {
                return bad("invalid authority in the request target");
            }
            // Absolute-form (HTTP/1.1): the target's authority wins and is what is forwarded,
            // so a differing Host cannot route one way and reach the backend another. HTTP/2:
            // the two must agree.
            if req.version() == Version::HTTP_2
                && let Some(h) = host
                && !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes())
            {
                return bad("Host differs from :authority");
            }
        }
        None if host.is_none() && req.version() == Version::HTTP_2 => {
            return bad("missing :authority");
        }
        None => {}
    }
    if host.is_none() && req.version() == Version::HTTP_11 {
        return bad("missing Host header");
    }
    Ok(())
}

/// `host [ ":" port ]` (RFC 3986 §3.2.2): a bracketed IPv6 literal or a reg-name of
/// unreserved, sub-delims and percent-encoded characters; a port of digits.
fn valid_authority(a: &[u8]) -> bool {
    let (host, port) = if a.first() == Some(&b'[') {
        let Some(end) = a.iter().position(|&c| c == b']') else {
            return false;
        };
        let lit = &a[1..end];
        if lit.is_empty()
            || !lit
                .iter()
                .all(|&c| c.is_ascii_hexdigit() || c == b':' || c == b'.')
        {
            return false;
        }
        match &a[end + 1..] {
            [] => (&a[..0], None),
            [b':', port @ ..] => (&a[..0], Some(port)),
            _ => return false,
        }
    } else {
        match a.iter().rposition(|&c| c == b':') {
            Some(i) => (&a[..i], Some(&a[i + 1..])),
            None => (a, None),
        }
    };
    let reg_name_ok = host
        .iter()
        .all(|&c| c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&c));
    let port_ok = port.is_none_or(|p| {
        p.len() <= 5
            && p.iter().all(u8::is_ascii_digit)
            && std::str::from_utf8(p)
                .ok()
                .and_then(|p| {
                    if p.is_empty() {
                        Some(0)
                    } else {
                        p.parse::<u32>().ok()
                    }
                })
                .is_some_and(|n| n <= 65535)
    });
    reg_name_ok && port_ok && !(host.is_empty() && a.first() != Some(&b'['))
}

/// Normalizes the request's path in place (see [`crate::normalize`]); the request is rebuilt
/// only when the path changes.
fn normalize_path<B>(
    req: &mut Request<B>,
    mode: crate::config::PathNormalization,
) -> Result<(), ProxyError> {
    let normalized = match crate::normalize::normalize(req.uri().path(), mode) {
        Ok(Cow::Borrowed(_)) => return Ok(()),
        Ok(Cow::Owned(p)) => p,
        Err(e) => return Err(ProxyError::BadRequest(e.to_string())),
    };
    let pq = match req.uri().query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query =
        Some(PathAndQuery::try_from(pq).map_err(|e| ProxyError::BadRequest(e.to_string()))?);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    Ok(())
}

fn split_host_port(s: &str) -> (&str, Option<u16>) {
    if let Some(rest) = s.strip_prefix('[') {
        // [v6]:port
        if let Some((h, p)) = rest.split_once(']') {
            return (h, p.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
        return (s, None);
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().ok()),
        _ => (s, None),
    }
}

fn redirect<B>(
    rd: &crate::config::Redirect,
    route: &CompiledRoute,
    req: &Request<B>,
    host: &str,
    host_port: Option<u16>,
    listener_port: u16,
) -> Response<ProxyBody> {
    let req_scheme = req.uri().scheme_str().unwrap_or("http");
    let scheme = rd.scheme.as_deref().unwrap_or(req_scheme);
    let host = rd.hostname.as_deref().unwrap_or(host);
    let default_port = |s: &str| if s == "https" { 443 } else { 80 };
    let port = match rd.port {
        Some(p) => p,
        None if rd.scheme.is_some() && scheme != req_scheme => default_port(scheme),
        None => host_port.unwrap_or(listener_port),
    };
    let path = match &rd.path {
        Some(rw) => rewrite_path(rw, route.prefix.as_deref(), req.uri().path()),
        None => req.uri().path().to_string(),
    };
    let mut loc = format!("{scheme}://{host}");
    if port != default_port(scheme) {
        loc.push_str(&format!(":{port}"));
    }
    loc.push_str(&path);
    if let Some(q) = req.uri().query() {
        loc.push('?');
        loc.push_str(q);
    }
    let status = StatusCode::from_u16(rd.status_code).unwrap_or(StatusCode::FOUND);
    let mut r = Response::new(body::empty());
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(&loc) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

#[allow(clippy::too_many_arguments)]
async fn forward<'a>(
    rt: &Arc<Runtime>,
    http: &HttpSettings,
    route: &CompiledRoute,
    upstream: &Upstream,
    mirrors: &[crate::routing::MirrorTarget],
    filters: impl Iterator<Item = &'a CompiledFilter>,
    mut req: Request<ProxyBody>,
    peer: SocketAddr,
    start: Instant,
    out: &mut Outcome,
    request_id: &mut Option<HeaderValue>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (endpoint, authority) = upstream
        .pick_with_authority()
        .ok_or_else(|| ProxyError::NoEndpoints(upstream.name.to_string()))?;
    let endpoint = endpoint.clone();
    out.upstream_host = Some(endpoint.clone());

    let downstream_version = req.version();
    let downstream_h1 = downstream_version < Version::HTTP_2;
    // Only the upgrades the proxy allows become tunnels (never h2c: it would carry HTTP/2
    // around routing); any other `Upgrade` is dropped below and the request forwarded as a
    // plain one, which RFC 9110 lets a server do.
    let upgrade = downstream_h1
        && upstream.protocol == UpstreamProtocol::Http1
        && headers::is_upgrade(req.headers())
        && req
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|u| http.upgrade_allowed(u));
    let on_downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let (mut parts, incoming) = req.into_parts();
    // The Host the backend sees: the request's authority (HTTP/2) or Host header.
    let mut host_value = match parts.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => parts.headers.get(header::HOST).cloned(),
    };
    let mut path = parts.uri.path().to_string();
    for f in filters {
        match f {
            CompiledFilter::RequestHeaders(ops) => ops.apply(&mut parts.headers),
            CompiledFilter::ResponseHeaders(_) => {}
            CompiledFilter::UrlRewrite { hostname, path: rw } => {
                if let Some(h) = hostname {
                    host_value = Some(h.clone());
                }
                if let Some(rw) = rw {
                    path = rewrite_path(rw, route.prefix.as_deref(), &path);
                }
            }
        }
    }
    let pq = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let pq = PathAndQuery::try_from(pq).map_err(|e| ProxyError::BadRequest(e.to_string()))?;

    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    headers::set_forwarded(&mut parts.headers, peer.ip(), "http");
    let id = headers::ensure_request_id(&mut parts.headers);
    // Kept only for the access log (see `handle`): a copy of a generated id allocates.
    if rt.observer.access_log_enabled() {
        *request_id = Some(id.clone());
    }
    match host_value {
        Some(h) => {
            parts.headers.insert(header::HOST, h);
        }
        None => {
            parts.headers.remove(header::HOST);
        }
    }
    parts.version = match upstream.protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::Http2 => Version::HTTP_2,
    };
    parts.uri = match authority {
        Some(a) => upstream_uri_from(a.clone(), pq.clone())?,
        None => upstream_uri(&endpoint, pq.clone())?,
    };

    let mut body = incoming;
    // Mirrors: a copy of the (filtered) request, fire and forget.
    let chosen: Vec<&Arc<Upstream>> = if upgrade {
        Vec::new()
    } else {
        mirrors
            .iter()
            .filter(|m| m.percent >= 100.0 || fastrand::f64() * 100.0 < m.percent)
            .filter_map(|m| match &m.target {
                Target::Upstream(u) => Some(u),
                Target::Invalid(_) => None,
            })
            .collect()
    };
    if !chosen.is_empty() {
        let (main, copies) = TeeBody::split(body, chosen.len());
        body = main;
        for (m, copy) in chosen.into_iter().zip(copies) {
            spawn_mirror(rt, m, &parts, pq.clone(), copy);
        }
    }

    // The stream idle timeout runs from the last request body data the client sent.
    let uploading = if !http_body::Body::is_end_stream(&body) && http.stream_idle_timeout.is_some()
    {
        let sent = Arc::new(AtomicU64::new(0));
        body = CountingBody::wrap(body, sent.clone());
        Some(sent)
    } else {
        None
    };
    let request = Request::from_parts(parts, body);
    let deadline = deadline(
        start,
        route.timeouts.request,
        route.timeouts.backend_request,
    );
    let sent = rt.clients.send(
        upstream.protocol,
        upstream.connect_timeout,
        http.stream_idle_timeout,
        request,
    );
    let mut resp = await_response(sent, deadline, http.stream_idle_timeout, uploading).await?;

    // The response speaks the downstream's protocol, whatever the backend answered with (an
    // HTTP/1.0 backend must not turn a keep-alive HTTP/1.1 connection into 1.0).
    *resp.version_mut() = downstream_version;
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching && !upgrade {
        // A tunnel nobody asked for (or that the proxy refused): never hand it over.
        return Err(ProxyError::UpstreamProtocol(
            "the backend switched protocols without an allowed upgrade".into(),
        ));
    }
    headers::strip_hop_by_hop(resp.headers_mut(), switching && upgrade);
    if switching && let Some(down) = on_downstream_upgrade {
        let up = hyper::upgrade::on(&mut resp);
        let kill = rt.kill.clone();
        tokio::spawn(async move {
            let (Ok(down), Ok(up)) = (down.await, up.await) else {
                return;
            };
            let mut down = TokioIo::new(down);
            let mut up = TokioIo::new(up);
            tokio::select! {
                r = tokio::io::copy_bidirectional(&mut down, &mut up) => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "upgraded connection ended");
                    }
                }
                _ = kill.cancelled() => {}
            }
        });
    }
    Ok(resp)
}

/// Waits for the backend's response head: the route's deadline ends it with 504 (`UT`), and
/// so does the stream idle timeout (`SI`) once neither the backend answered nor the client
/// sent body data for that long.
async fn await_response(
    sent: impl std::future::Future<Output = Result<Response<ProxyBody>, ProxyError>>,
    deadline: Option<Instant>,
    stream_idle: Option<Duration>,
    uploading: Option<Arc<AtomicU64>>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Some(idle) = stream_idle else {
        return match deadline {
            Some(d) => tokio::time::timeout_at(d, sent)
                .await
                .unwrap_or(Err(ProxyError::Timeout)),
            None => sent.await,
        };
    };
    tokio::pin!(sent);
    let uploaded = || {
        uploading
            .as_ref()
            .map_or(0, |u| u.load(std::sync::atomic::Ordering::Relaxed))
    };
    let mut seen = uploaded();
    let mut idle_at = Instant::now() + idle;
    loop {
        let wake = deadline.map_or(idle_at, |d| d.min(idle_at));
        if let Ok(r) = tokio::time::timeout_at(wake, &mut sent).await {
            return r;
        }
        if deadline.is_some_and(|d| d <= wake) {
            return Err(ProxyError::Timeout);
        }
        // Body data went up since the last check: the stream is not idle.
        let now_seen = uploaded();
        if now_seen != seen {
            seen = now_seen;
            idle_at = Instant::now() + idle;
            continue;
        }
        return Err(ProxyError::StreamIdleTimeout);
    }
}

fn deadline(
    start: Instant,
    request: Option<Duration>,
    backend: Option<Duration>,
) -> Option<Instant> {
    let a = request.map(|d| start + d);
    let b = backend.map(|d| Instant::now() + d);
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn upstream_uri(endpoint: &str, pq: PathAndQuery) -> Result<Uri, ProxyError> {
    let authority =
        Authority::try_from(endpoint).map_err(|e| ProxyError::Connect(e.to_string()))?;
    upstream_uri_from(authority, pq)
}

fn upstream_uri_from(authority: Authority, pq: PathAndQuery) -> Result<Uri, ProxyError> {
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority)
        .path_and_query(pq)
        .build()
        .map_err(|e| ProxyError::Connect(e.to_string()))
}

/// How long a mirrored request may take: nobody waits for its answer.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(60);

fn spawn_mirror(
    rt: &Arc<Runtime>,
    target: &Upstream,
    parts: &http::request::Parts,
    pq: PathAndQuery,
    body: ProxyBody,
) {
    let Some(endpoint) = target.pick() else {
        return;
    };
    let Ok(uri) = upstream_uri(endpoint, pq) else {
        return;
    };
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = parts.headers.clone();
    *req.version_mut() = match target.protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::Http2 => Version::HTTP_2,
    };
    let rt = rt.clone();
    let (protocol, connect_timeout) = (target.protocol, target.connect_timeout);
    let name = target.name.clone();
    tokio::spawn(async move {
        use http_body_util::BodyExt;
        // A mirror that never answers must not be kept forever either.
        let sent = rt
            .clients
            .send(protocol, connect_timeout, Some(MIRROR_TIMEOUT), req);
        match tokio::time::timeout(MIRROR_TIMEOUT, sent)
            .await
            .unwrap_or(Err(ProxyError::Timeout))
        {
            Ok(resp) => {
                // Drain so the connection can go back to the pool.
                let _ = resp.into_body().collect().await.map(|_: _| Bytes::new());
            }
            Err(e) => tracing::debug!(mirror = %name, error = %e, "mirror request failed"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_are_split() {
        assert_eq!(split_host_port("example.com"), ("example.com", None));
        assert_eq!(
            split_host_port("example.com:8080"),
            ("example.com", Some(8080))
        );
        assert_eq!(split_host_port("[::1]:80"), ("::1", Some(80)));
        assert_eq!(split_host_port("[::1]"), ("::1", None));
        assert_eq!(split_host_port("::1"), ("::1", None));
        let req = Request::get("/")
            .header("host", "Shop.COM:81")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req), (Some(81), Cow::from("shop.com")));
        let req = Request::get("http://h2.example/x").body(()).unwrap();
        assert_eq!(request_host(&req), (None, Cow::from("h2.example")));
    }

    #[test]
    fn the_earlier_timeout_wins() {
        let start = Instant::now();
        assert_eq!(deadline(start, None, None), None);
        assert_eq!(
            deadline(start, Some(Duration::from_secs(1)), None),
            Some(start + Duration::from_secs(1))
        );
        let d = deadline(
            start,
            Some(Duration::from_secs(10)),
            Some(Duration::from_secs(1)),
        );
        assert!(d.unwrap() < start + Duration::from_secs(2));
        let d = deadline(
            start,
            Some(Duration::from_millis(1)),
            Some(Duration::from_secs(1)),
        );
        assert_eq!(d, Some(start + Duration::from_millis(1)));
    }

    #[test]
    fn errors_map_to_statuses_with_short_bodies() {
        for (e, s) in [
            (ProxyError::NoRoute, 404),
            (ProxyError::InvalidBackend("x".into()), 500),
            (ProxyError::NoBackends, 500),
            (ProxyError::NoEndpoints("b".into()), 503),
            (ProxyError::Connect("refused".into()), 503),
            (ProxyError::Timeout, 504),
            (ProxyError::UpstreamReset("reset".into()), 502),
            (ProxyError::HeadersTooLarge, 431),
        ] {
            let r = e.into_response();
            assert_eq!(r.status().as_u16(), s, "{e}");
            assert_eq!(r.headers()[header::CONTENT_TYPE], "text/plain");
            assert!(e.body().len() < 64);
        }
    }
}
