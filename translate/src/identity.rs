//! Which pods are meshed workloads, and as whom: what the translator needs to know of a pod
//! so that its endpoints are reached over mutual TLS with the identity it must present.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

pub use mesh_wire::names::MESHED_POD_LABEL;

/// Istio's label on pods injected by Istio's sidecar injector.
pub const ISTIO_MESHED_POD_LABEL: &str = "security.istio.io/tlsMode";
/// The value of [`ISTIO_MESHED_POD_LABEL`] on a pod whose proxy speaks mutual TLS.
pub const ISTIO_MESHED_POD_LABEL_VALUE: &str = "istio";
/// The service account of a pod whose `spec.serviceAccountName` is empty.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// What the translator keeps of a pod with a sidecar: its labels (policies select workloads
/// by them) and its service account (its identity). Nothing else, so that a control plane
/// watching every meshed pod of a cluster stays small.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshedPod {
    pub labels: BTreeMap<String, String>,
    /// `spec.serviceAccountName`, [`DEFAULT_SERVICE_ACCOUNT`] when empty.
    pub service_account: String,
}

impl MeshedPod {
    /// What matters of `pod`, or `None` when it is not meshed.
    pub fn of(pod: &Pod) -> Option<MeshedPod> {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        is_meshed(&labels).then(|| MeshedPod {
            labels,
            service_account: service_account(
                pod.spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.as_deref()),
            ),
        })
    }
}

/// The service account a pod runs as: `name`, or `default` when it is unset or empty.
pub fn service_account(name: Option<&str>) -> String {
    name.filter(|n| !n.is_empty())
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT)
        .to_string()
}

/// Whether a pod with these labels has a proxy that speaks mutual TLS: injection labels it
/// `security.meshctl.io/tlsMode: mesh` (any value but `disabled`); Istio's injector
/// `security.istio.io/tlsMode: istio`.
pub fn is_meshed(labels: &BTreeMap<String, String>) -> bool {
    use mesh_wire::names::MESHED_POD_LABEL_DISABLED;
    labels
        .get(MESHED_POD_LABEL)
        .is_some_and(|v| v != MESHED_POD_LABEL_DISABLED)
        || labels.get(ISTIO_MESHED_POD_LABEL).map(String::as_str)
            == Some(ISTIO_MESHED_POD_LABEL_VALUE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn meshed_by_either_label_with_value_istio() {
        assert!(is_meshed(&labels(&[(MESHED_POD_LABEL, "istio")])));
        assert!(is_meshed(&labels(&[(
            MESHED_POD_LABEL,
            mesh_wire::names::MESHED_POD_LABEL_VALUE
        )])));
        assert!(!is_meshed(&labels(&[(ISTIO_MESHED_POD_LABEL, "disabled")])));
        assert!(is_meshed(&labels(&[(ISTIO_MESHED_POD_LABEL, "istio")])));
        assert!(!is_meshed(&labels(&[(MESHED_POD_LABEL, "disabled")])));
        assert!(!is_meshed(&labels(&[("app", "web")])));
    }

    #[test]
    fn a_pod_without_a_service_account_runs_as_default() {
        assert_eq!(service_account(Some("")), DEFAULT_SERVICE_ACCOUNT);
        assert_eq!(service_account(None), DEFAULT_SERVICE_ACCOUNT);
        assert_eq!(service_account(Some("web")), "web");
    }
}
