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
