//! Every way the request path fails, classified in one place: the status and body sent
//! downstream, the access log's response flag and the metric kind are all decided here.

use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};

use crate::access_log::ResponseFlags;
use crate::body::{ProxyBody, full};
use crate::metrics::UpstreamErrorKind;

/// A failure of the request path. [`ProxyError::into_response`] is the only place where a
/// failure becomes a status and body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// No virtual host or no route matched → 404.
    #[error("no route matched")]
    NoRoute,
    /// The chosen share of traffic points at an unresolved backend reference → 500.
    #[error("invalid backend: {0}")]
    InvalidBackend(String),
    /// No backend with a non-zero weight → 500.
    #[error("no backend with a non-zero weight")]
    NoBackends,
    /// The backend has no endpoints → 503.
    #[error("backend {0} has no endpoints")]
    NoEndpoints(String),
    /// Connecting to the endpoint failed or timed out → 503.
    #[error("upstream connect error: {0}")]
    Connect(String),
    /// Request or backend-request timeout → 504.
    #[error("upstream request timeout")]
    Timeout,
    /// The backend sent nothing for the stream idle timeout before its response head → 504.
    #[error("upstream stream idle timeout")]
    StreamIdleTimeout,
    /// The upstream reset or closed the connection, or sent garbage → 502.
    #[error("upstream reset: {0}")]
    UpstreamReset(String),
    /// The upstream answered in a way the request did not allow (e.g. switched protocols
    /// without an allowed upgrade) → 502.
    #[error("upstream protocol error: {0}")]
    UpstreamProtocol(String),
    /// Request headers over the listener's limits → 431.
    #[error("request header fields too large")]
    HeadersTooLarge,
    /// The request head cannot be served as it is (missing, duplicate or invalid Host, a
    /// path that cannot be normalized, ...) → 400.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The client's request body broke its own framing (malformed chunked encoding, fewer
    /// bytes than its Content-Length) → 400; the backend is not blamed.
    #[error("malformed request body: {0}")]
    DownstreamBody(String),
}

/// What each failure means for every observer: status, body, access-log flag, and the
/// upstream-error metric kind (`None`: not the backend's fault).
struct Class {
    status: StatusCode,
    /// Envoy's wording where there is one.
    body: &'static str,
    kind: &'static str,
    flag: ResponseFlags,
    upstream: Option<UpstreamErrorKind>,
    /// The destination refused the connection or closed it without answering: a sidecar
    /// passthrough closes the downstream connection instead of answering.
    refused: bool,
}

impl ProxyError {
    fn class(&self) -> Class {
        use ResponseFlags as F;
        use UpstreamErrorKind as U;
        let c = |status, body, kind, flag, upstream| Class {
            status,
            body,
            kind,
            flag,
            upstream,
            refused: false,
        };
        match self {
            ProxyError::NoRoute => c(
                StatusCode::NOT_FOUND,
                "no route matched\n",
                "no_route",
                F::NO_ROUTE,
                None,
            ),
            ProxyError::InvalidBackend(_) => c(
                StatusCode::INTERNAL_SERVER_ERROR,
                "invalid backend\n",
                "invalid_backend",
                F::empty(),
                None,
            ),
            ProxyError::NoBackends => c(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no backend with a non-zero weight\n",
                "no_backends",
                F::empty(),
                None,
            ),
            ProxyError::NoEndpoints(_) => c(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream\n",
                "no_endpoints",
                F::NO_HEALTHY_UPSTREAM,
                Some(U::NoEndpoints),
            ),
            ProxyError::Connect(_) => Class {
                refused: true,
                ..c(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error\n",
                    "connect_failure",
                    F::UPSTREAM_CONNECT_FAILURE,
                    Some(U::Connect),
                )
            },
            ProxyError::Timeout => c(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream request timeout\n",
                "timeout",
                F::UPSTREAM_TIMEOUT,
                Some(U::Timeout),
            ),
            ProxyError::StreamIdleTimeout => c(
                StatusCode::GATEWAY_TIMEOUT,
                "stream timeout\n",
                "stream_idle_timeout",
                F::STREAM_IDLE_TIMEOUT,
                Some(U::Timeout),
            ),
            ProxyError::UpstreamReset(_) => Class {
                refused: true,
                ..c(
                    StatusCode::BAD_GATEWAY,
                    "upstream reset before response headers\n",
                    "upstream_reset",
                    F::UPSTREAM_CONNECTION_TERMINATION,
                    Some(U::Reset),
                )
            },
            ProxyError::UpstreamProtocol(_) => c(
                StatusCode::BAD_GATEWAY,
                "upstream protocol error\n",
                "upstream_protocol_error",
                F::UPSTREAM_PROTOCOL_ERROR,
                Some(U::Protocol),
            ),
            ProxyError::HeadersTooLarge => c(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request header fields too large\n",
                "headers_too_large",
                F::DOWNSTREAM_PROTOCOL_ERROR,
                None,
            ),
            ProxyError::BadRequest(_) => c(
                StatusCode::BAD_REQUEST,
                "bad request\n",
                "bad_request",
                F::DOWNSTREAM_PROTOCOL_ERROR,
                None,
            ),
            ProxyError::DownstreamBody(_) => c(
                StatusCode::BAD_REQUEST,
                "bad request\n",
                "downstream_protocol_error",
                F::DOWNSTREAM_PROTOCOL_ERROR,
                None,
            ),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.class().status
    }

    /// A short, stable name for logs and the access log.
    pub fn kind(&self) -> &'static str {
        self.class().kind
    }

    /// The access log's response flag for this failure.
    pub fn response_flag(&self) -> ResponseFlags {
        self.class().flag
    }

    /// The `upstream_error` metric kind, when the backend is to blame.
    pub fn upstream_error_kind(&self) -> Option<UpstreamErrorKind> {
        self.class().upstream
    }

    /// The destination refused the connection, or closed it without answering (a sidecar
    /// passthrough then closes the downstream connection: refused stays refused).
    pub fn refused(&self) -> bool {
        self.class().refused
    }

    /// The short text body sent downstream.
    pub fn body(&self) -> &'static str {
        self.class().body
    }

    pub fn into_response(&self) -> Response<ProxyBody> {
        let Class { status, body, .. } = self.class();
        let mut resp = Response::new(full(body));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        resp
    }

    /// Classifies a failure of the HTTP/2 upstream client.
    pub fn from_client(e: &hyper_util::client::legacy::Error) -> ProxyError {
        if let Some(d) = downstream_cause(e) {
            return ProxyError::DownstreamBody(d);
        }
        if e.is_connect() {
            return ProxyError::Connect(chain(e));
        }
        // A timeout inside the connector surfaces as a connect error too; anything else after
        // the connection was made (reset, early close, parse error) is a 502.
        ProxyError::UpstreamReset(chain(e))
    }

    /// Classifies a failure of sending a request on an upstream HTTP/1.1 connection.
    pub fn from_send(e: &hyper::Error) -> ProxyError {
        match downstream_cause(e) {
            Some(d) => ProxyError::DownstreamBody(d),
            None => ProxyError::UpstreamReset(chain(e)),
        }
    }
}

/// The client's own body error, when that is what made a send fail (the error chain holds
/// a [`crate::body::DownstreamError`]).
fn downstream_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(d) = c.downcast_ref::<crate::body::DownstreamError>() {
            return Some(chain(d));
        }
        cur = c.source();
    }
    None
}

pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!(r.headers()[CONTENT_TYPE], "text/plain");
            assert!(e.body().len() < 64);
        }
    }

    #[test]
    fn only_a_refusal_or_a_close_without_answer_is_refused() {
        assert!(ProxyError::Connect("refused".into()).refused());
        assert!(ProxyError::UpstreamReset("closed".into()).refused());
        for e in [
            ProxyError::NoEndpoints("b".into()),
            ProxyError::Timeout,
            ProxyError::StreamIdleTimeout,
            ProxyError::UpstreamProtocol("x".into()),
            ProxyError::DownstreamBody("x".into()),
        ] {
            assert!(!e.refused(), "{e}");
        }
    }
}
