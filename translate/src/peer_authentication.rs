//! Istio's `PeerAuthentication` (`security.istio.io/v1beta1`, also read as `v1`): what a
//! meshed workload's inbound side accepts, mutual TLS or plaintext, per port.
//!
//! Read as Istio writes it. The fields are kept loose (modes as text, port keys as text, other
//! keys collected) so that a watched object with a typo still reaches the translator, which
//! reports it ([`problems`]) instead of the watch failing on it; loading a file rejects it
//! with the field's path.

use std::collections::BTreeMap;

use kube::CustomResource;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::FieldProblem;

/// The mTLS mode of a policy, a port of it, or `UNSET` (inherit from the enclosing scope).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl PeerMode {
    const NAMES: &'static str = "UNSET, DISABLE, PERMISSIVE, STRICT";

    fn parse(s: &str) -> Option<PeerMode> {
        Some(match s {
            "UNSET" => PeerMode::Unset,
            "DISABLE" => PeerMode::Disable,
            "PERMISSIVE" => PeerMode::Permissive,
            "STRICT" => PeerMode::Strict,
            _ => return None,
        })
    }

    /// The proxy's mode; `None` for `UNSET`.
    pub fn resolved(self) -> Option<mesh_config::MtlsMode> {
        match self {
            PeerMode::Unset => None,
            PeerMode::Disable => Some(mesh_config::MtlsMode::Disable),
            PeerMode::Permissive => Some(mesh_config::MtlsMode::Permissive),
            PeerMode::Strict => Some(mesh_config::MtlsMode::Strict),
        }
    }
}

/// Istio `PeerAuthentication`: the mesh root namespace without a selector is mesh-wide,
/// another namespace without a selector is namespace-wide, a `selector` picks workloads of
/// the policy's namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "security.istio.io",
    version = "v1beta1",
    kind = "PeerAuthentication",
    plural = "peerauthentications",
    namespaced,
    schema = "disabled"
)]
#[kube(derive = "PartialEq", derive = "Default")]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<PeerSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<PeerMtls>,
    /// App (container) port → its mode; workload policies (with a selector) only.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<String, PeerMtls>,
    /// Keys Istio's schema does not have: reported, never ignored.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, Value>,
}

/// Istio's `WorkloadSelector`: labels of the pods the policy applies to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PeerSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct PeerMtls {
    /// `UNSET` (default), `DISABLE`, `PERMISSIVE` or `STRICT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, Value>,
}

impl PeerMtls {
    fn mode(&self) -> Option<PeerMode> {
        match &self.mode {
            None => Some(PeerMode::Unset),
            Some(m) => PeerMode::parse(m),
        }
    }
}

/// A policy whose every field is understood, in the form the translator uses.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidPolicy {
    /// `None`: no selector, or an empty one (Istio treats both as "every workload").
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: PeerMode,
    pub ports: BTreeMap<u16, PeerMode>,
}

/// Reads a policy; every unknown key, unknown mode, port that is not a port number and
/// `portLevelMtls` without a selector (which Istio's validation rejects) is a problem, and a
/// policy with problems is not applied.
pub fn read(pa: &PeerAuthentication) -> Result<ValidPolicy, Vec<FieldProblem>> {
    let s = &pa.spec;
    let mut problems = Vec::new();
    let mut unknown = |path: &str, keys: &BTreeMap<String, Value>| {
        for k in keys.keys() {
            let p = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            problems.push(FieldProblem::new(
                format!("spec.{p}"),
                "unknown field (PeerAuthentication has selector.matchLabels, mtls.mode and portLevelMtls)",
            ));
        }
    };
    unknown("", &s.unknown);
    if let Some(sel) = &s.selector {
        unknown("selector", &sel.unknown);
    }
    if let Some(m) = &s.mtls {
        unknown("mtls", &m.unknown);
    }
    for (port, m) in &s.port_level_mtls {
        unknown(&format!("portLevelMtls.{port}"), &m.unknown);
    }
    let mode = mode_of(&mut problems, "spec.mtls.mode".into(), s.mtls.as_ref());
    let mut ports = BTreeMap::new();
    for (key, m) in &s.port_level_mtls {
        let path = format!("spec.portLevelMtls.{key}");
        let port_mode = mode_of(&mut problems, format!("{path}.mode"), Some(m));
        match key.parse::<u16>() {
            Ok(p) if p > 0 => {
                ports.insert(p, port_mode);
            }
            _ => problems.push(FieldProblem::new(
                path,
                "not a port number (1-65535): portLevelMtls is keyed by the workload's port",
            )),
        }
    }
    let selector = s
        .selector
        .as_ref()
        .map(|sel| sel.match_labels.clone())
        .filter(|l| !l.is_empty());
    if selector.is_none() && !s.port_level_mtls.is_empty() {
        problems.push(FieldProblem::new(
            "spec.portLevelMtls",
            "requires a selector with matchLabels: port-level modes apply to workload policies only (as in Istio)",
        ));
    }
    if problems.is_empty() {
        Ok(ValidPolicy {
            selector,
            mode,
            ports,
        })
    } else {
        Err(problems)
    }
}

/// The mode of `m` (absent: `UNSET`); an unknown mode is a problem at `path`.
fn mode_of(problems: &mut Vec<FieldProblem>, path: String, m: Option<&PeerMtls>) -> PeerMode {
    match m.map_or(Some(PeerMode::Unset), PeerMtls::mode) {
        Some(mode) => mode,
        None => {
            let given = m.and_then(|m| m.mode.as_deref()).unwrap_or_default();
            problems.push(FieldProblem::new(
                path,
                format!("unknown mode {given:?} (one of {})", PeerMode::NAMES),
            ));
            PeerMode::Unset
        }
    }
}

/// The problems of a policy ([`read`]); empty when it is applied as written.
pub fn problems(pa: &PeerAuthentication) -> Vec<FieldProblem> {
    read(pa).err().unwrap_or_default()
}
