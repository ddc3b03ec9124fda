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

use crate::body::{self, CountingBody, LoggedBody, PendingLog, ProxyBody, TeeBody};
use crate::config::{Backend, ListenerKind, ProxyConfig, UpstreamProtocol};
use crate::error::ProxyError;
use crate::headers;
use crate::observe::{Arrival, Finished};
use crate::ratelimit::{RateLimitDecision, RateLimiters};
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
        Some(received) => req.map(|b| CountingBody::wrap(body::boxed(b), received.clone())),
        None => req.map(body::boxed),
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
    Ok(match entry {
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
    })
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
                st.table.inbound_limit(dst.port()).map(str::to_string),
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
            if let Some(resp) = check_limit(
                &st.snapshot.limiters,
                st.table.rate_limit.as_deref(),
                out,
                &mut extra,
            ) {
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
    for name in [st.table.rate_limit.as_deref(), route.rate_limit.as_deref()] {
        if let Some(mut resp) = check_limit(&st.snapshot.limiters, name, out, &mut extra) {
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
                    if let Some(mut resp) = check_limit(
                        &st.snapshot.limiters,
                        upstream.rate_limit.as_deref(),
                        out,
                        &mut extra,
                    ) {
                        apply_ops(&route_resp_ops, resp.headers_mut());
                        apply_ops(&backend_resp_ops, resp.headers_mut());
                        return resp;
                    } else {
                        let filters = route.filters.iter().chain(&choice.filters);
                        let forwarded = forward(
                            rt,
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

/// Checks one named limit. `Some(response)` when limited; otherwise its headers (if any)
/// are collected into `extra` for the final response.
fn check_limit(
    limiters: &RateLimiters,
    name: Option<&str>,
    out: &mut Outcome,
    extra: &mut HeaderMap,
) -> Option<Response<ProxyBody>> {
    let name = name?;
    match limiters.check(name)? {
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
    let upgrade = downstream_h1
        && upstream.protocol == UpstreamProtocol::Http1
        && headers::is_upgrade(req.headers());
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

    let request = Request::from_parts(parts, body);
    let deadline = deadline(
        start,
        route.timeouts.request,
        route.timeouts.backend_request,
    );
    let sent = rt
        .clients
        .send(upstream.protocol, upstream.connect_timeout, request);
    let result = match deadline {
        Some(d) => match tokio::time::timeout_at(d, sent).await {
            Ok(r) => r,
            Err(_) => return Err(ProxyError::Timeout),
        },
        None => sent.await,
    };
    let mut resp = result?;

    // The response speaks the downstream's protocol, whatever the backend answered with (an
    // HTTP/1.0 backend must not turn a keep-alive HTTP/1.1 connection into 1.0).
    *resp.version_mut() = downstream_version;
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
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
        match rt.clients.send(protocol, connect_timeout, req).await {
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
