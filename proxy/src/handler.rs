//! The request path: each request gets a [`RequestContext`], goes through the steps below as
//! small functions over it, and is finished in one place.
//!
//! 1. policy checks of the request head (`policy::check_request`: size, host, path);
//! 2. route selection (`select`: by host and request, or by the original destination);
//! 3. policy checks of the route (`policy`: the listener's limit, then the route's);
//! 4. the route's action: a direct response or redirect, or forwarding (the backend's limit,
//!    then `forward`);
//! 5. [`finish`]: the response filters of the route and the backend, the limits' headers,
//!    metrics and the access log, whatever step ended the request.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::{self, CountingBody, InFlightBody, LoggedBody, PendingLog, ProxyBody};
use crate::config::Redirect;
use crate::connection::InFlight;
use crate::context::{Downstream, RequestContext, Stop};
use crate::error::ProxyError;
use crate::forward::forward;
use crate::headers;
use crate::observe::{Arrival, Finished, Outcome};
use crate::policy;
use crate::routing::{Action, CompiledFilter, CompiledRoute, Target, rewrite_path};
use crate::select::{self, Destination};
use crate::state::{ListenerState, Runtime};

/// The downstream connection is closed without a response: a sidecar passthrough whose
/// destination refused the connection (or closed it without answering) fails the way the
/// un-meshed connection would have.
#[derive(Debug, thiserror::Error)]
#[error("the original destination refused the connection")]
pub struct CloseConnection;

/// Serves one request. Never fails: every failure is turned into a response by
/// [`ProxyError::into_response`], except a refused passthrough ([`CloseConnection`]).
pub async fn handle(
    rt: Arc<Runtime>,
    st: Arc<ListenerState>,
    downstream: Downstream,
    req: Request<Incoming>,
    in_flight: InFlight,
) -> Result<Response<ProxyBody>, CloseConnection> {
    let start = Instant::now();
    let dest = select::destination(&st.table, downstream.original_dst);
    let arrival = rt
        .observer
        .access_log_enabled()
        .then(|| Arrival::new(req.uri(), req.headers()));
    // The request id and the bytes received are kept only for the access log.
    let request_id = arrival
        .as_ref()
        .and_then(|_| req.headers().get(&headers::X_REQUEST_ID).cloned());
    let received = arrival.as_ref().map(|_| Arc::new(AtomicU64::new(0)));
    let mut cx = RequestContext {
        rt: &rt,
        listener: &st,
        downstream,
        start,
        method: req.method().clone(),
        uri: req.uri().clone(),
        version: req.version(),
        route: None,
        backend: None,
        endpoint: None,
        limit_headers: HeaderMap::new(),
        request_id,
        arrival,
        received,
    };
    let req = match &cx.received {
        Some(received) => req.map(|b| CountingBody::wrap(body::downstream(b), received.clone())),
        None => req.map(body::downstream),
    };
    let result = serve(&mut cx, &dest, req).await;
    finish(cx, &dest, result, in_flight)
}

/// Steps 1 to 4: the response of the route's action, or why the request stopped before it.
async fn serve<'a>(
    cx: &mut RequestContext<'a>,
    dest: &'a Destination<'a>,
    mut req: Request<ProxyBody>,
) -> Result<Response<ProxyBody>, Stop> {
    policy::check_request(cx, &mut req)?;
    let table = &*cx.listener.table;
    cx.route = select::route(dest, table, &req);
    policy::check_listener(cx)?;
    let Some(route) = cx.route else {
        return Err(ProxyError::NoRoute.into());
    };
    policy::check_route(cx, route)?;
    act(cx, route, req).await
}

/// The route's action: answered by the route itself, or forwarded to one of its backends.
async fn act<'a>(
    cx: &mut RequestContext<'a>,
    route: &'a CompiledRoute,
    req: Request<ProxyBody>,
) -> Result<Response<ProxyBody>, Stop> {
    let fwd = match &route.action {
        Action::DirectResponse { status, body } => return Ok(direct_response(*status, body)),
        Action::Redirect(rd) => return Ok(redirect(rd, route, &req, cx.listener.table.port)),
        Action::Forward(fwd) => fwd,
    };
    let choice = fwd.pick().ok_or(ProxyError::NoBackends)?;
    let upstream = match &choice.target {
        Target::Upstream(upstream) => upstream,
        Target::Invalid(reason) => {
            return Err(ProxyError::InvalidBackend(reason.to_string()).into());
        }
    };
    cx.backend = Some(choice);
    policy::check_limit(cx, choice.rate_limit.as_ref())?;
    Ok(forward(cx, route, choice, upstream, &fwd.mirrors, req).await?)
}

/// Step 5, for every request whatever step ended it: the response (the action's, a failure's
/// or a limit's), the response filters of the route and then the backend, the headers of the
/// limits that let the request through, metrics, and the access log (sent once the body has
/// been sent).
fn finish(
    cx: RequestContext<'_>,
    dest: &Destination<'_>,
    result: Result<Response<ProxyBody>, Stop>,
    in_flight: InFlight,
) -> Result<Response<ProxyBody>, CloseConnection> {
    let backend = cx.backend_name();
    let (mut resp, error, limited) = match result {
        Ok(resp) => (resp, None, None),
        Err(Stop::Failed(e)) => (e.into_response(), Some(e), None),
        Err(Stop::Limited(l)) => (l.local_reply().map(body::boxed), None, Some(l)),
    };
    if let Some(route) = cx.route {
        apply_response_filters(&route.filters, resp.headers_mut());
    }
    if let Some(backend) = cx.backend {
        apply_response_filters(&backend.filters, resp.headers_mut());
    }
    // A limited answer carries its own limit's headers only.
    if limited.is_none() {
        resp.headers_mut().extend(cx.limit_headers);
    }

    let outcome = Outcome {
        route: cx.route.map(|r| r.name.clone()),
        backend,
        upstream_host: cx.endpoint,
        // Only a route's action that ran answers locally (a limit may have refused first).
        direct: error.is_none()
            && limited.is_none()
            && cx.route.is_some_and(|r| {
                matches!(
                    r.action,
                    Action::DirectResponse { .. } | Action::Redirect(_)
                )
            }),
        error,
        rate_limited: limited.map(|l| l.name().to_string()),
        passthrough: dest.is_passthrough(),
    };
    let rt = cx.rt;
    if let Some(peer) = &cx.downstream.peer_identity {
        rt.observer
            .metrics
            .mtls_request(&cx.listener.table.name, &peer.principal);
    }
    let entry = rt.observer.request_done(Finished {
        listener: &cx.listener.table.name,
        method: &cx.method,
        uri: &cx.uri,
        version: cx.version,
        peer: cx.downstream.peer,
        request_id: cx.request_id.as_ref(),
        status: resp.status(),
        bytes_sent: http_body::Body::size_hint(resp.body()).exact(),
        duration: cx.start.elapsed(),
        outcome: &outcome,
        arrival: cx.arrival,
    });
    // A passthrough whose destination refused (or closed without answering) fails like the
    // un-meshed connection: the downstream connection is closed, no response is made up.
    if outcome.passthrough && outcome.error.as_ref().is_some_and(ProxyError::refused) {
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
                    received: cx.received.unwrap_or_default(),
                    start: cx.start,
                },
            )
        }),
        None => resp,
    };
    Ok(resp.map(|b| InFlightBody::wrap(b, in_flight)))
}

/// Applies the response header modifiers among `filters`, in order.
fn apply_response_filters(filters: &[CompiledFilter], headers: &mut HeaderMap) {
    for f in filters {
        if let CompiledFilter::ResponseHeaders(ops) = f {
            ops.apply(headers);
        }
    }
}

fn direct_response(status: StatusCode, body: &bytes::Bytes) -> Response<ProxyBody> {
    let mut r = Response::new(body::full(body.clone()));
    *r.status_mut() = status;
    if !body.is_empty() {
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    r
}

/// The redirect's `Location`: each part the redirect does not set is the request's (the
/// port: the request's, or the listener's; a scheme change without a port uses the new
/// scheme's default).
fn redirect<B>(
    rd: &Redirect,
    route: &CompiledRoute,
    req: &Request<B>,
    listener_port: u16,
) -> Response<ProxyBody> {
    let (host_port, host) = select::request_host(req);
    let req_scheme = req.uri().scheme_str().unwrap_or("http");
    let scheme = rd.scheme.as_deref().unwrap_or(req_scheme);
    let host = rd.hostname.as_deref().unwrap_or(&host);
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
