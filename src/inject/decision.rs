//! Whether a pod gets the sidecar, and why. The table (first matching row wins):
//!
//! | # | condition | result |
//! |---|---|---|
//! | 1 | namespace is the mesh's own (`mesh-system`) or in `skipNamespaces` (kube-system, kube-public, kube-node-lease) | skip |
//! | 2 | `spec.hostNetwork: true` | skip |
//! | 3 | pod already carries another mesh's proxy (container `istio-proxy`/`linkerd-proxy`, or annotation `sidecar.istio.io/status`/`linkerd.io/proxy-version`) | skip, naming the mesh |
//! | 4 | namespace label (`mesh-injection`, else `istio-injection`) is `disabled` | skip |
//! | 5 | pod label `sidecar.meshctl.io/inject`, else label `sidecar.istio.io/inject`, else the same two annotations, is true/false | inject / skip |
//! | 6 | a `neverInjectSelector` matches the pod's labels | skip |
//! | 7 | an `alwaysInjectSelector` matches the pod's labels | inject |
//! | 8 | namespace label is `enabled` | inject |
//! | 9 | offline (`meshctl inject`) | inject |
//! | 10 | webhook: `defaultPolicy` (default `disabled`) | skip / inject |
//!
//! Truthy values: `true`, `yes`, `y`, `enabled`, `on`; falsy: `false`, `no`, `n`,
//! `disabled`, `off` (case-insensitive). Any other value counts as unset.

use std::collections::BTreeMap;

use super::config::{InjectionConfig, Policy};
use super::parse::{parse_flag, selector_matches};
use k8s_openapi::api::core::v1::PodTemplateSpec;

pub const INJECT_KEY: &str = "sidecar.meshctl.io/inject";
pub const ISTIO_INJECT_KEY: &str = "sidecar.istio.io/inject";

/// Who is asking: offline injection defaults to on, the webhook to the config's policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Offline,
    Webhook,
}

/// The namespace a pod lives in, as far as we know it.
#[derive(Debug, Clone, Default)]
pub struct NamespaceInfo {
    pub name: Option<String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub inject: bool,
    pub reason: Reason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    MeshNamespace(String),
    SystemNamespace(String),
    HostNetwork,
    OtherMesh {
        mesh: &'static str,
        evidence: String,
    },
    NamespaceLabel {
        key: String,
        value: bool,
    },
    PodLabel {
        key: String,
        value: bool,
    },
    PodAnnotation {
        key: String,
        value: bool,
    },
    NeverInjectSelector(usize),
    AlwaysInjectSelector(usize),
    OfflineDefault,
    DefaultPolicy(Policy),
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let onoff = |b: &bool| if *b { "enabled" } else { "disabled" };
        match self {
            Reason::MeshNamespace(n) => write!(f, "namespace {n} is the mesh's own namespace"),
            Reason::SystemNamespace(n) => write!(f, "namespace {n} is a system namespace"),
            Reason::HostNetwork => write!(f, "pod uses hostNetwork"),
            Reason::OtherMesh { mesh, evidence } => {
                write!(f, "pod already carries {mesh}'s proxy ({evidence})")
            }
            Reason::NamespaceLabel { key, value } => {
                write!(f, "namespace label {key}={}", onoff(value))
            }
            Reason::PodLabel { key, value } => write!(f, "pod label {key}={value}"),
            Reason::PodAnnotation { key, value } => write!(f, "pod annotation {key}={value}"),
            Reason::NeverInjectSelector(i) => write!(f, "neverInjectSelector[{i}] matches"),
            Reason::AlwaysInjectSelector(i) => write!(f, "alwaysInjectSelector[{i}] matches"),
            Reason::OfflineDefault => write!(f, "offline injection injects unless told not to"),
            Reason::DefaultPolicy(p) => write!(
                f,
                "namespace not labelled for injection; default policy {}",
                match p {
                    Policy::Enabled => "enabled",
                    Policy::Disabled => "disabled",
                }
            ),
        }
    }
}

/// Decide for one pod template.
pub fn decide(
    tpl: &PodTemplateSpec,
    ns: &NamespaceInfo,
    cfg: &InjectionConfig,
    mode: Mode,
) -> Decision {
    let no = |reason| Decision {
        inject: false,
        reason,
    };
    let yes = |reason| Decision {
        inject: true,
        reason,
    };
    let empty = BTreeMap::new();
    let meta = tpl.metadata.as_ref();
    let labels = meta.and_then(|m| m.labels.as_ref()).unwrap_or(&empty);
    let annotations = meta.and_then(|m| m.annotations.as_ref()).unwrap_or(&empty);
    let ns_name = ns
        .name
        .clone()
        .or_else(|| meta.and_then(|m| m.namespace.clone()))
        .filter(|n| !n.is_empty());

    // 1
    if let Some(n) = &ns_name {
        if *n == cfg.mesh_namespace {
            return no(Reason::MeshNamespace(n.clone()));
        }
        if cfg.skip_namespaces.iter().any(|s| s == n) {
            return no(Reason::SystemNamespace(n.clone()));
        }
    }
    let spec = tpl.spec.as_ref();
    // 2
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return no(Reason::HostNetwork);
    }
    // 3
    if let Some((mesh, evidence)) = other_mesh(tpl) {
        return no(Reason::OtherMesh { mesh, evidence });
    }
    // 4 (and remember an `enabled` for row 8)
    let ns_flag = cfg
        .namespace_labels
        .iter()
        .find_map(|k| ns.labels.get(k).and_then(|v| parse_flag(v)).map(|v| (k, v)));
    if let Some((key, false)) = ns_flag {
        return no(Reason::NamespaceLabel {
            key: key.clone(),
            value: false,
        });
    }
    // 5
    for key in [INJECT_KEY, ISTIO_INJECT_KEY] {
        if let Some(v) = labels.get(key).and_then(|v| parse_flag(v)) {
            return Decision {
                inject: v,
                reason: Reason::PodLabel {
                    key: key.into(),
                    value: v,
                },
            };
        }
    }
    for key in [INJECT_KEY, ISTIO_INJECT_KEY] {
        if let Some(v) = annotations.get(key).and_then(|v| parse_flag(v)) {
            return Decision {
                inject: v,
                reason: Reason::PodAnnotation {
                    key: key.into(),
                    value: v,
                },
            };
        }
    }
    // 6, 7
    if let Some(i) = cfg
        .never_inject_selector
        .iter()
        .position(|s| selector_matches(s, labels))
    {
        return no(Reason::NeverInjectSelector(i));
    }
    if let Some(i) = cfg
        .always_inject_selector
        .iter()
        .position(|s| selector_matches(s, labels))
    {
        return yes(Reason::AlwaysInjectSelector(i));
    }
    // 8
    if let Some((key, true)) = ns_flag {
        return yes(Reason::NamespaceLabel {
            key: key.clone(),
            value: true,
        });
    }
    // 9, 10
    match mode {
        Mode::Offline => yes(Reason::OfflineDefault),
        Mode::Webhook => Decision {
            inject: cfg.default_policy == Policy::Enabled,
            reason: Reason::DefaultPolicy(cfg.default_policy),
        },
    }
}

/// Another mesh's proxy, if the pod carries one.
fn other_mesh(tpl: &PodTemplateSpec) -> Option<(&'static str, String)> {
    const CONTAINERS: [(&str, &str); 2] = [("istio-proxy", "Istio"), ("linkerd-proxy", "Linkerd")];
    const ANNOTATIONS: [(&str, &str); 2] = [
        ("sidecar.istio.io/status", "Istio"),
        ("linkerd.io/proxy-version", "Linkerd"),
    ];
    if let Some(spec) = &tpl.spec {
        let all = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten());
        for c in all {
            if let Some((_, mesh)) = CONTAINERS.iter().find(|(n, _)| *n == c.name) {
                return Some((mesh, format!("container {}", c.name)));
            }
        }
    }
    let ann = tpl.metadata.as_ref()?.annotations.as_ref()?;
    ANNOTATIONS
        .iter()
        .find(|(k, _)| ann.contains_key(*k))
        .map(|(k, mesh)| (*mesh, format!("annotation {k}")))
}
