//! The CRDs the installer applies, generated from Rust types and checked in under
//! `manifests/` (the test `crds_are_current` fails when a checked-in file is stale;
//! `UPDATE_GOLDEN=1` rewrites them).
//!
//! - `manifests/crds/`: ours (`policy.meshctl.io`), from `mesh_translate::RateLimitPolicy`.
//! - `manifests/gateway-api/`: the Gateway API standard channel, generated from the
//!   `gateway-api` crate 0.22 (kopium-generated from the upstream Gateway API v1.5.1
//!   standard-channel CRDs; see `manifests/gateway-api/README.md` for what that loses).
//! - `manifests/istio/`: Istio's EnvoyFilter (`networking.istio.io`) and PeerAuthentication
//!   (`security.istio.io`) CRDs, so the walkthrough's `istio-envoy-filter.yaml` and Istio's mTLS
//!   policies apply on a cluster without Istio. Like Istio's own, the spec is open
//!   (`x-kubernetes-preserve-unknown-fields`); the control plane validates the subset it
//!   understands and reports the rest. Applied, like the Gateway API CRDs, only when absent
//!   or installed by meshctl earlier.

use kube::CustomResourceExt;
use serde_json::Value;

const HEADER_OURS: &str = "# Generated from mesh_translate::RateLimitPolicy (translate/src/policy.rs) by\n# meshctl's install::crds; do not edit. Regenerate: UPDATE_GOLDEN=1 cargo test --lib crds_are_current\n";
const HEADER_ISTIO: &str = "# Istio's EnvoyFilter CRD (networking.istio.io v1alpha3 storage, v1 served; open spec as\n# Istio's own), written by meshctl's install::crds; do not edit.\n# Regenerate: UPDATE_GOLDEN=1 cargo test --lib crds_are_current\n";
const HEADER_ISTIO_PA: &str = "# Istio's PeerAuthentication CRD (security.istio.io v1beta1 storage, v1 served; open spec as\n# Istio's own), written by meshctl's install::crds; do not edit.\n# Regenerate: UPDATE_GOLDEN=1 cargo test --lib crds_are_current\n";
const HEADER_GWAPI: &str = "# Gateway API v1.5.1 standard channel, generated from the Rust types of the gateway-api\n# crate 0.22.0 (kopium output of the upstream CRDs) by meshctl's install::crds; do not edit.\n# Regenerate: UPDATE_GOLDEN=1 cargo test --lib crds_are_current\n";

/// (path under `manifests/`, generated text) for every CRD.
pub fn generate() -> Vec<(&'static str, String)> {
    use gateway_api::apis::standard as gw;
    let ours = [(
        "crds/ratelimitpolicies.policy.meshctl.io.yaml",
        mesh_translate::RateLimitPolicy::crd(),
    )];
    let gwapi = [
        (
            "gateway-api/gatewayclasses.yaml",
            gw::gatewayclasses::GatewayClass::crd(),
        ),
        ("gateway-api/gateways.yaml", gw::gateways::Gateway::crd()),
        (
            "gateway-api/httproutes.yaml",
            gw::httproutes::HttpRoute::crd(),
        ),
        (
            "gateway-api/grpcroutes.yaml",
            gw::grpcroutes::GrpcRoute::crd(),
        ),
        (
            "gateway-api/referencegrants.yaml",
            gw::referencegrants::ReferenceGrant::crd(),
        ),
        (
            "gateway-api/backendtlspolicies.yaml",
            gw::backendtlspolicies::BackendTlsPolicy::crd(),
        ),
        ("gateway-api/tlsroutes.yaml", gw::tlsroutes::TlsRoute::crd()),
        (
            "gateway-api/listenersets.yaml",
            gw::listenersets::ListenerSet::crd(),
        ),
    ];
    let render = |header: &str, crd| {
        let mut v = serde_json::to_value(crd).expect("CRD serializes");
        if header == HEADER_GWAPI {
            // Upstream marks its CRDs with the bundle version and channel.
            // `*.k8s.io` groups are protected: the API server requires the approval
            // annotation (upstream's value).
            v["metadata"]["annotations"] = serde_json::json!({
                "api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api/pull/3328",
                "gateway.networking.k8s.io/bundle-version": "v1.5.1",
                "gateway.networking.k8s.io/channel": "standard",
            });
        }
        format!(
            "{header}{}",
            serde_saphyr::to_string(&v).expect("CRD renders")
        )
    };
    let istio = [
        (
            "istio/envoyfilters.networking.istio.io.yaml",
            format!(
                "{HEADER_ISTIO}{}",
                serde_saphyr::to_string(&envoy_filter_crd()).expect("CRD renders")
            ),
        ),
        (
            "istio/peerauthentications.security.istio.io.yaml",
            format!(
                "{HEADER_ISTIO_PA}{}",
                serde_saphyr::to_string(&peer_authentication_crd()).expect("CRD renders")
            ),
        ),
    ];
    ours.into_iter()
        .map(|(p, c)| (p, render(HEADER_OURS, c)))
        .chain(gwapi.into_iter().map(|(p, c)| (p, render(HEADER_GWAPI, c))))
        .chain(istio)
        .collect()
}

/// One served version of an Istio CRD: an open spec and status, a status subresource.
fn istio_version(name: &str, storage: bool) -> Value {
    serde_json::json!({
        "name": name,
        "served": true,
        "storage": storage,
        "schema": {"openAPIV3Schema": {
            "type": "object",
            "properties": {
                "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            },
        }},
        "subresources": {"status": {}},
    })
}

/// Istio's PeerAuthentication CRD: namespaced, `v1beta1` (storage) and `v1` (served), an
/// open spec (the control plane reports what it does not understand) and a status
/// subresource, as Istio ships it (minus its printer columns).
fn peer_authentication_crd() -> Value {
    serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": "peerauthentications.security.istio.io",
            "labels": {"app": "istio-pilot", "chart": "istio", "heritage": "Tiller", "istio": "security", "release": "istio"},
        },
        "spec": {
            "group": "security.istio.io",
            "names": {
                "categories": ["istio-io", "security-istio-io"],
                "kind": "PeerAuthentication",
                "listKind": "PeerAuthenticationList",
                "plural": "peerauthentications",
                "shortNames": ["pa"],
                "singular": "peerauthentication",
            },
            "scope": "Namespaced",
            "versions": [istio_version("v1beta1", true), istio_version("v1", false)],
        },
    })
}

/// Istio's EnvoyFilter CRD: namespaced, `v1alpha3` (storage) and `v1` (served), an open
/// spec and a status subresource, as Istio ships it (minus its printer columns).
fn envoy_filter_crd() -> Value {
    let version = istio_version;
    serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": "envoyfilters.networking.istio.io",
            "labels": {"app": "istio-pilot", "chart": "istio", "heritage": "Tiller", "release": "istio"},
        },
        "spec": {
            "group": "networking.istio.io",
            "names": {
                "categories": ["istio-io", "networking-istio-io"],
                "kind": "EnvoyFilter",
                "listKind": "EnvoyFilterList",
                "plural": "envoyfilters",
                "singular": "envoyfilter",
            },
            "scope": "Namespaced",
            "versions": [version("v1alpha3", true), version("v1", false)],
        },
    })
}

/// The checked-in CRDs, embedded.
pub const OURS: &[&str] = &[include_str!(
    "../../manifests/crds/ratelimitpolicies.policy.meshctl.io.yaml"
)];
pub const GATEWAY_API: &[&str] = &[
    include_str!("../../manifests/gateway-api/gatewayclasses.yaml"),
    include_str!("../../manifests/gateway-api/gateways.yaml"),
    include_str!("../../manifests/gateway-api/httproutes.yaml"),
    include_str!("../../manifests/gateway-api/grpcroutes.yaml"),
    include_str!("../../manifests/gateway-api/referencegrants.yaml"),
    include_str!("../../manifests/gateway-api/backendtlspolicies.yaml"),
    include_str!("../../manifests/gateway-api/tlsroutes.yaml"),
    include_str!("../../manifests/gateway-api/listenersets.yaml"),
];

/// Istio's CRDs we read (EnvoyFilter, PeerAuthentication), applied like [`GATEWAY_API`].
pub const ISTIO: &[&str] = &[
    include_str!("../../manifests/istio/envoyfilters.networking.istio.io.yaml"),
    include_str!("../../manifests/istio/peerauthentications.security.istio.io.yaml"),
];

pub fn parse(texts: &[&str]) -> Vec<Value> {
    texts
        .iter()
        .map(|t| serde_saphyr::from_str(t).expect("checked-in CRD parses"))
        .collect()
}

#[cfg(test)]
#[path = "../../tests/support/golden.rs"]
mod golden;

#[cfg(test)]
mod tests {
    use super::golden::Goldens;

    #[test]
    fn crds_are_current() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
        let mut goldens = Goldens::new("cargo test --lib crds_are_current");
        for (path, text) in super::generate() {
            goldens.check(&root.join(path), &text);
        }
        for dir in ["crds", "gateway-api", "istio"] {
            goldens.orphans(&root.join(dir), ".yaml");
        }
        goldens.finish();
    }
}
