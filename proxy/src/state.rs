//! What the request path reads: the compiled config ([`Snapshot`]), one listener's share of
//! it ([`ListenerState`]) and what lives as long as the proxy ([`Runtime`]).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::ProxyConfig;
use crate::connection::HttpSettings;
use crate::observe::Observer;
use crate::ratelimit::RateLimiters;
use crate::routing::{ListenerTable, RouteTable};
use crate::upstream::Clients;

/// Everything derived from one config, shared by all listeners; swapped whole on reload.
pub struct Snapshot {
    pub config: Arc<ProxyConfig>,
    /// The routing table, with every rate limit resolved to one of `limiters`.
    pub table: Arc<RouteTable>,
    /// The config's limits by name (bucket state for `/config_dump`, and the buckets the next
    /// reload keeps).
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
    pub observer: Observer,
    /// Cancelled when the drain grace period is over: upgraded (tunnelled) connections end.
    pub kill: CancellationToken,
    /// The proxy's workload certificate: mutual TLS with other proxies of the mesh.
    pub identity: Option<Arc<mesh_tls::WorkloadCertificates>>,
}

impl Runtime {
    /// The workload certificates, once a certificate and a trust bundle are in place.
    pub fn mtls(&self) -> Option<&Arc<mesh_tls::WorkloadCertificates>> {
        self.identity.as_ref().filter(|c| c.is_ready())
    }
}
