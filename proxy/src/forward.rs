//! Forwarding: the request as the backend sees it (filters, rewrites, hop-by-hop headers,
//! forwarding headers, request id), mirrors, the wait for the response head under the route's
//! timeouts and the stream idle timeout, and allowed upgrades turned into tunnels.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::body::{CountingBody, ProxyBody, TeeBody};
use crate::config::UpstreamProtocol;
use crate::context::RequestContext;
use crate::error::ProxyError;
use crate::headers;
use crate::routing::{
    CompiledFilter, CompiledRoute, MirrorTarget, Target, Upstream, WeightedTarget, rewrite_path,
};
use crate::state::Runtime;
use crate::upstream::MeshTls;

/// Sends `req` to an endpoint of `upstream` (the backend of `choice`, one of `route`'s) and
/// waits for its response head.
pub async fn forward(
    cx: &mut RequestContext<'_>,
    route: &CompiledRoute,
    choice: &WeightedTarget,
    upstream: &Upstream,
    mirrors: &[MirrorTarget],
    mut req: Request<ProxyBody>,
) -> Result<Response<ProxyBody>, ProxyError> {
    // Both outlive `cx`'s borrows (they are the request's runtime and config).
    let (rt, listener) = (cx.rt, cx.listener);
    let http = &*listener.snapshot.http;
    let picked = upstream
        .pick_endpoint()
        .ok_or_else(|| ProxyError::NoEndpoints(upstream.name.to_string()))?;
    let (endpoint, authority) = (picked.endpoint, picked.authority);
    cx.endpoint = Some(endpoint.clone());
    // A meshed endpoint gets mutual TLS once this proxy has its certificate; until then, or
    // for endpoints outside the mesh, plaintext.
    let tls = match (picked.identity, rt.mtls()) {
        (Some(identity), Some(certs)) => Some(MeshTls { certs, identity }),
        _ => None,
    };

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
    for f in route.filters.iter().chain(&choice.filters) {
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
    headers::set_forwarded(&mut parts.headers, cx.downstream.peer.ip(), "http");
    // Who called, as Envoy tells it in Istio's sidecars: over mutual TLS the peer's identity
    // is appended to `X-Forwarded-Client-Cert`; otherwise a client's own value is removed.
    headers::set_client_cert(
        &mut parts.headers,
        cx.downstream.peer_identity.as_deref().map(|p| &p.xfcc),
    );
    let id = headers::ensure_request_id(&mut parts.headers);
    // Kept only for the access log: a copy of a generated id allocates.
    if rt.observer.access_log_enabled() {
        cx.request_id = Some(id.clone());
    }
    match host_value {
        // HTTP/2 carries the authority in `:authority` (the endpoint, which hyper-util's
        // client connects by); a Host that differs from it is malformed (RFC 9113 §8.3.1).
        Some(h) if upstream.protocol == UpstreamProtocol::Http1 => {
            parts.headers.insert(header::HOST, h);
        }
        _ => {
            parts.headers.remove(header::HOST);
        }
    }
    parts.version = match upstream.protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::Http2 => Version::HTTP_2,
    };
    parts.uri = match authority {
        Some(a) => upstream_uri_from(a.clone(), pq.clone())?,
        None => upstream_uri(endpoint, pq.clone())?,
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
        cx.start,
        route.timeouts.request,
        route.timeouts.backend_request,
    );
    let sent = rt.clients.send(
        upstream.protocol,
        upstream.connect_timeout,
        http.stream_idle_timeout,
        request,
        tls,
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
    let Some(picked) = target.pick_endpoint() else {
        return;
    };
    let identity = picked.identity.cloned();
    let Ok(uri) = upstream_uri(picked.endpoint, pq) else {
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
        let tls = match (identity.as_ref(), rt.mtls()) {
            (Some(identity), Some(certs)) => Some(MeshTls { certs, identity }),
            _ => None,
        };
        let sent = rt
            .clients
            .send(protocol, connect_timeout, Some(MIRROR_TIMEOUT), req, tls);
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
}
