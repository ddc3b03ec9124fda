#![forbid(unsafe_code)]
//! End-to-end tests against a real Kubernetes control plane (kube-apiserver, etcd,
//! controller-manager, scheduler, kwok) started by `mesh-testenv`. One environment is shared
//! by every test in this binary; each test works in a namespace of its own.

mod control_plane;
mod gateway_controlplane;
mod injection_webhook;
mod ssa;
mod url_webhook;
mod walkthrough;

/// Held for writing while a test has the installer's cluster-wide injection webhook registered
/// (its namespaceSelector matches every `mesh-injection`/`istio-injection=enabled` namespace),
/// for reading by tests that label namespaces that way for a webhook of their own.
pub static CLUSTER_WEBHOOK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());
