//! Well-known ids and Kubernetes names shared by the injector, the control plane, the
//! translator and the proxy.

/// The uid the proxy runs as; the nat rules never capture its own connections.
pub const PROXY_UID: i64 = 1337;
/// The gid the proxy runs as; the nat rules never capture its own connections.
pub const PROXY_GID: i64 = 1337;

/// The proxy container, injected into pods and in gateway Deployments.
pub const PROXY_CONTAINER: &str = "mesh-proxy";
/// The injected init container that programs the nat rules (`mesh-proxy redirect`).
pub const INIT_CONTAINER: &str = "mesh-init";

/// The label injection puts on meshed pods; the control plane watches pods by it.
pub const MESHED_POD_LABEL: &str = "security.meshctl.io/tlsMode";
/// The value injection gives [`MESHED_POD_LABEL`]: the pod's proxy speaks mutual TLS. Any
/// value but [`MESHED_POD_LABEL_DISABLED`] counts (Istio's `istio` too).
pub const MESHED_POD_LABEL_VALUE: &str = "mesh";
/// The value of [`MESHED_POD_LABEL`] that opts a pod's proxy out of mutual TLS.
pub const MESHED_POD_LABEL_DISABLED: &str = "disabled";
/// The annotation injection writes: what it added, so it can be undone or redone.
pub const STATUS_ANNOTATION: &str = "sidecar.meshctl.io/status";
/// The Gateway API label on a gateway's Deployment, pods and Service: the Gateway's name.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// Environment variable for the control-plane address (`host:port`).
pub const ENV_CONTROL_PLANE: &str = "MESH_CONTROL_PLANE";
/// Environment variable for the CA file that verifies the control plane.
pub const ENV_CA_ROOT_PATH: &str = "MESH_CA_ROOT_PATH";
/// Environment variable for the service-account token the proxy presents to the control plane.
pub const ENV_TOKEN_PATH: &str = "MESH_TOKEN_PATH";
/// Environment variable of the proxy container: the app probes injection rewrote to the
/// app-health port, as JSON of [`crate::app_probe::AppProbers`] (Istio's
/// `ISTIO_KUBE_APP_PROBERS` shape).
pub const ENV_APP_PROBERS: &str = "MESH_KUBE_APP_PROBERS";
/// Pod annotation turning the rewrite of app probes off (`"false"`); Istio's
/// `sidecar.istio.io/rewriteAppHTTPProbers` is honoured the same way.
pub const REWRITE_PROBES_ANNOTATION: &str = "sidecar.meshctl.io/rewriteAppHTTPProbers";
