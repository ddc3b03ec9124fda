//! The backends of the routing table: a backend's endpoints (with the identity each meshed one
//! must prove), how one is picked for a request, and when a backend is the same across builds.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mesh_tls::SpiffeId;

use crate::config::{self, LoadBalancer, UpstreamProtocol};

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
    /// One fixed endpoint (a sidecar's passthrough), HTTP/1.1.
    pub fn single(
        name: Arc<str>,
        endpoint: std::net::SocketAddr,
        connect_timeout: Duration,
        identity: Option<Arc<SpiffeId>>,
    ) -> Upstream {
        Upstream {
            name,
            endpoints: vec![endpoint.to_string().into()],
            authorities: vec![http::uri::Authority::try_from(endpoint.to_string()).ok()],
            load_balancer: LoadBalancer::RoundRobin,
            protocol: UpstreamProtocol::Http1,
            connect_timeout,
            rate_limit: None,
            identities: vec![identity],
            next: AtomicUsize::new(0),
        }
    }

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

pub(super) fn same_upstream(u: &Upstream, b: &config::Backend) -> bool {
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
