//! The control plane's Prometheus metrics (`GET /metrics` on the admin endpoint): how much
//! translation and encoding work config distribution does for its proxies, and the workload
//! certificates the mesh CA issued and refused.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyKindLabels {
    /// `gateway` or `sidecar`.
    pub proxy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `unauthenticated` (401), `forbidden` (403), `bad_request` (400, 405, 408, 413),
    /// `unavailable` (404 without a CA, 503).
    pub reason: &'static str,
}

/// Counters of config distribution.
pub struct DistributionMetrics {
    registry: Registry,
    /// Translations run. With the per-world cache, one per Gateway (and instance count) or
    /// per workload (sidecars with the same [`mesh_translate::SidecarKey`]) and world,
    /// however many of its proxies ask.
    pub translations: Family<ProxyKindLabels, Counter>,
    /// Configs asked for (one per connected proxy and world).
    pub config_requests: Family<ProxyKindLabels, Counter>,
    /// Snapshots sent (a config that differs from the one the proxy has).
    pub snapshots_sent: Family<ProxyKindLabels, Counter>,
    /// Workload certificates issued.
    pub certificates_issued: Counter,
    /// Certificate requests refused, by reason.
    pub certificates_refused: Family<RefusalLabels, Counter>,
}

impl Default for DistributionMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("meshctl_distribution");
        let translations = Family::<ProxyKindLabels, Counter>::default();
        let config_requests = Family::<ProxyKindLabels, Counter>::default();
        let snapshots_sent = Family::<ProxyKindLabels, Counter>::default();
        registry.register(
            "translations",
            "Translations run for proxies' configs (the others came from the per-world cache)",
            translations.clone(),
        );
        registry.register(
            "config_requests",
            "Proxy configs looked up (one per connected proxy and world)",
            config_requests.clone(),
        );
        registry.register(
            "snapshots_sent",
            "Config snapshots sent to proxies",
            snapshots_sent.clone(),
        );
        let certificates_issued = Counter::default();
        let certificates_refused = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "certificates_issued",
            "Workload certificates issued by the mesh CA",
            certificates_issued.clone(),
        );
        registry.register(
            "certificates_refused",
            "Workload certificate requests refused, by reason",
            certificates_refused.clone(),
        );
        Self {
            registry,
            translations,
            config_requests,
            snapshots_sent,
            certificates_issued,
            certificates_refused,
        }
    }
}

impl DistributionMetrics {
    pub fn labels(gateway: bool) -> ProxyKindLabels {
        ProxyKindLabels {
            proxy: if gateway { "gateway" } else { "sidecar" },
        }
    }

    /// Translations run so far for proxies of one kind.
    pub fn translations(&self, gateway: bool) -> u64 {
        self.translations
            .get_or_create(&Self::labels(gateway))
            .get()
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}
