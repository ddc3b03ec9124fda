//! Every way the request path fails, classified in one place and turned into a response here.

use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};

use crate::body::{ProxyBody, full};

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
    /// The upstream reset or closed the connection, or sent garbage → 502.
    #[error("upstream reset: {0}")]
    UpstreamReset(String),
    /// Request headers over the listener's limits → 431.
    #[error("request header fields too large")]
    HeadersTooLarge,
    /// The request cannot be forwarded as it is (e.g. an unusable Host) → 400.
    #[error("bad request: {0}")]
    BadRequest(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::InvalidBackend(_) | ProxyError::NoBackends => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ProxyError::NoEndpoints(_) | ProxyError::Connect(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamReset(_) => StatusCode::BAD_GATEWAY,
            ProxyError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// A short, stable name for metrics (`upstream_error(backend, kind)`) and the access log.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::InvalidBackend(_) => "invalid_backend",
            ProxyError::NoBackends => "no_backends",
            ProxyError::NoEndpoints(_) => "no_endpoints",
            ProxyError::Connect(_) => "connect_failure",
            ProxyError::Timeout => "timeout",
            ProxyError::UpstreamReset(_) => "upstream_reset",
            ProxyError::HeadersTooLarge => "headers_too_large",
            ProxyError::BadRequest(_) => "bad_request",
        }
    }

    /// Whether this is an upstream failure (counted as an upstream error for the backend).
    pub fn is_upstream(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect(_) | ProxyError::Timeout | ProxyError::UpstreamReset(_)
        )
    }

    /// The short text body sent downstream (Envoy's wording where there is one).
    pub fn body(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no route matched\n",
            ProxyError::InvalidBackend(_) => "invalid backend\n",
            ProxyError::NoBackends => "no backend with a non-zero weight\n",
            ProxyError::NoEndpoints(_) => "no healthy upstream\n",
            ProxyError::Connect(_) => "upstream connect error\n",
            ProxyError::Timeout => "upstream request timeout\n",
            ProxyError::UpstreamReset(_) => "upstream reset before response headers\n",
            ProxyError::HeadersTooLarge => "request header fields too large\n",
            ProxyError::BadRequest(_) => "bad request\n",
        }
    }

    pub fn into_response(&self) -> Response<ProxyBody> {
        let body = self.body();
        let mut resp = Response::new(full(body));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        resp
    }

    /// Classifies a failure of the upstream client.
    pub fn from_client(e: &hyper_util::client::legacy::Error) -> ProxyError {
        use std::error::Error as _;
        if e.is_connect() {
            return ProxyError::Connect(chain(e));
        }
        // A timeout inside the connector surfaces as a connect error too; anything else after
        // the connection was made (reset, early close, parse error) is a 502.
        let _ = e.source();
        ProxyError::UpstreamReset(chain(e))
    }
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
