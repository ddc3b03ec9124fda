//! End-to-end tests against a real Kubernetes control plane (kube-apiserver, etcd,
//! controller-manager, scheduler, kwok) started by `mesh-testenv`. One environment is shared
//! by every test in this binary; each test works in a namespace of its own.

mod ca_rotation;
mod control_plane;
mod gateway_controlplane;
mod gateway_drift;
mod injection_webhook;
mod inprocess;
mod mesh_ca;
mod peer_authentication;
mod proxy_auth;
mod ssa;
mod translation_fanout;
mod url_webhook;
mod walkthrough;

/// Held for writing while a test has `meshctl install`'s objects in the shared cluster: its
/// cluster-wide injection webhook (the namespaceSelector matches every
/// `mesh-injection`/`istio-injection=enabled` namespace) and its CRDs (server-side applied by
/// field manager `meshctl`). Held for reading by tests that label namespaces that way for a
/// webhook of their own, or apply a CRD of the same name (`ssa`).
pub static MESH_INSTALL: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());
