//! Where the request path reports finished requests: metrics and the access log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Uri, Version};

use crate::access_log::{AccessLogEntry, AccessLogger, ResponseFlags, protocol_name};
use crate::error::ProxyError;
use crate::metrics::Metrics;

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

/// What is known of a request when it arrives (kept only while the access log is on).
pub struct Arrival {
    start_time: SystemTime,
    user_agent: Option<String>,
    authority: Option<String>,
}

impl Arrival {
    pub fn new(uri: &Uri, headers: &HeaderMap) -> Self {
        let s = |v: &HeaderValue| v.to_str().ok().map(str::to_owned);
        Arrival {
            start_time: SystemTime::now(),
            user_agent: headers.get(header::USER_AGENT).and_then(s),
            authority: uri
                .authority()
                .map(|a| a.as_str().to_owned())
                .or_else(|| headers.get(header::HOST).and_then(s)),
        }
    }
}

/// One finished request (response headers sent downstream).
pub struct Finished<'a> {
    pub listener: &'a Arc<str>,
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub version: Version,
    pub peer: SocketAddr,
    pub request_id: Option<&'a HeaderValue>,
    pub status: StatusCode,
    /// `content-length` of the response, when known.
    pub bytes_sent: Option<u64>,
    /// From the request's arrival to the response headers.
    pub duration: Duration,
    pub outcome: &'a Outcome,
    pub arrival: Option<Arrival>,
}

/// Fans a finished request out to metrics and the access log.
pub struct Observer {
    pub metrics: Arc<Metrics>,
    pub access_log: Arc<AccessLogger>,
}

impl Observer {
    pub fn new(metrics: Arc<Metrics>, access_log: Arc<AccessLogger>) -> Self {
        Observer {
            metrics,
            access_log,
        }
    }

    pub fn access_log_enabled(&self) -> bool {
        self.access_log.is_enabled()
    }

    /// Records the metrics of a request whose response headers are ready, and returns its
    /// access log entry (when the log is on) for [`crate::body::LoggedBody`] to complete and
    /// send once the response body has been sent.
    pub fn request_done(&self, f: Finished<'_>) -> Option<AccessLogEntry> {
        let o = f.outcome;
        let route = o.route.as_deref().unwrap_or("");
        let backend = o.backend.as_deref().unwrap_or("");
        self.metrics.record_request_arc(
            f.listener,
            o.route.as_ref(),
            o.backend.as_ref(),
            f.status.as_u16(),
            f.duration,
        );
        if let Some(limit) = &o.rate_limited {
            self.metrics.rate_limited(f.listener, route, limit);
        }
        if let Some(e) = &o.error
            && let Some(kind) = e.upstream_error_kind()
        {
            self.metrics.upstream_error(backend, kind);
        }
        if let Some(arrival) = f.arrival {
            let mut flags = ResponseFlags::empty();
            if o.rate_limited.is_some() {
                flags.insert(ResponseFlags::RATE_LIMITED);
            }
            if o.direct {
                flags.insert(ResponseFlags::DIRECT_RESPONSE);
            }
            if let Some(e) = &o.error {
                flags.insert(e.response_flag());
            }
            Some(AccessLogEntry {
                start_time: arrival.start_time,
                method: f.method.as_str().to_owned(),
                path: f.uri.path().to_owned(),
                protocol: protocol_name(f.version),
                status: f.status.as_u16(),
                bytes_received: 0,
                bytes_sent: f.bytes_sent.unwrap_or(0),
                duration: f.duration,
                upstream_host: o.upstream_host.as_deref().map(str::to_owned),
                listener: f.listener.clone(),
                route: o.route.clone(),
                backend: o.backend.clone(),
                x_request_id: f
                    .request_id
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                user_agent: arrival.user_agent,
                authority: arrival.authority,
                downstream_remote_address: Some(f.peer),
                rate_limited: o.rate_limited.is_some(),
                response_flags: flags,
            })
        } else {
            None
        }
    }
}
