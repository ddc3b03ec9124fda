//! One request's context: what the request path learns about a request on its way, from its
//! arrival to its finished response. The steps of the path (route selection in `select`,
//! policies in `policy`, forwarding in `forward`, the action and the one place a response is
//! finished in `handler`) are small functions over it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use http::header::{HeaderMap, HeaderValue};
use http::{Method, Uri, Version};
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::observe::Arrival;
use crate::ratelimit::Limited;
use crate::routing::{CompiledRoute, Target, WeightedTarget};
use crate::state::{ListenerState, Runtime};

/// What the request path knows of the downstream connection a request came on (the same for
/// every request of the connection).
#[derive(Debug, Clone)]
pub struct Downstream {
    pub peer: SocketAddr,
    /// Sidecar listeners: the destination the connection had before it was captured.
    pub original_dst: Option<SocketAddr>,
    /// The other proxy's identity, when the connection is mutual TLS from the mesh.
    pub peer_identity: Option<Arc<crate::mtls::PeerIdentity>>,
}

/// One request, from arrival to finished response.
pub struct RequestContext<'a> {
    pub rt: &'a Arc<Runtime>,
    /// The listener that accepted the request, and the config it is served with (in-flight
    /// requests finish with the config they started with).
    pub listener: &'a ListenerState,
    pub downstream: Downstream,
    /// Arrival: the route's request timeout and the observed duration run from here.
    pub start: Instant,
    /// The request as it arrived (path normalization and filters change what is forwarded),
    /// for metrics and the access log.
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    /// The route the request matched.
    pub route: Option<&'a CompiledRoute>,
    /// The share of the route's traffic the request went to, once its backend is known to
    /// exist; its response filters apply to the response.
    pub backend: Option<&'a WeightedTarget>,
    /// The endpoint the request was sent to.
    pub endpoint: Option<Arc<str>>,
    /// Headers of the limits that let the request through (`x-ratelimit-*`), for its
    /// response.
    pub limit_headers: HeaderMap,
    /// The request id (as received, then as forwarded); kept only while the access log is on.
    pub request_id: Option<HeaderValue>,
    /// What the access log keeps of the request's arrival (only while the log is on).
    pub arrival: Option<Arrival>,
    /// Request body bytes received so far (only while the access log is on).
    pub received: Option<Arc<AtomicU64>>,
}

impl RequestContext<'_> {
    /// The name of the backend the request went to.
    pub fn backend_name(&self) -> Option<Arc<str>> {
        match &self.backend?.target {
            Target::Upstream(u) => Some(u.name.clone()),
            Target::Invalid(_) => None,
        }
    }
}

/// Why the request path stopped before the route's action produced a response.
#[derive(Debug)]
pub enum Stop {
    /// A failure, answered by [`ProxyError::into_response`].
    Failed(ProxyError),
    /// A limit refused the request, answered by [`Limited::local_reply`].
    Limited(Limited),
}

impl From<ProxyError> for Stop {
    fn from(e: ProxyError) -> Stop {
        Stop::Failed(e)
    }
}
