//! Well-known ports. Pod specs, probes, nat rules and listeners all use these numbers, so a
//! change here changes them everywhere at once.

/// The sidecar's outbound listener: captured outbound connections are redirected here.
pub const SIDECAR_OUTBOUND: u16 = 15001;
/// The sidecar's inbound listener: captured inbound connections are redirected here.
pub const SIDECAR_INBOUND: u16 = 15006;
/// The proxy's admin server (bound to 127.0.0.1).
pub const ADMIN: u16 = 15000;
/// The proxy's readiness server (`/ready`, probed by the kubelet on the pod IP).
pub const READINESS: u16 = 15021;
/// The proxy's metrics server (`/stats/prometheus`, scraped on the pod IP).
pub const METRICS: u16 = 15090;
/// Application health checks through the proxy (`/app-health/<container>/...`, Istio's shape).
pub const APP_HEALTH: u16 = 15020;
/// The control plane's config distribution server (TLS, HTTP/2).
pub const DISTRIBUTION: u16 = 15012;
/// The control plane's injection webhook (HTTPS).
pub const WEBHOOK: u16 = 15017;
