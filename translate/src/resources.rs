//! The typed Kubernetes objects the translator reads.

use gateway_api::apis::standard::{
    gatewayclasses::GatewayClass, gateways::Gateway, httproutes::HttpRoute,
    referencegrants::ReferenceGrant,
};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::HashMap;
use std::sync::Arc;

use crate::identity::MeshedPod;
use crate::istio::{EnvoyFilter, IstioOperator};
use crate::peer_authentication::PeerAuthentication;
use crate::policy::RateLimitPolicy;

/// Everything the translator reads, as typed objects. The loader fills it from files; the
/// control plane fills it from watches. Order does not matter: the translator sorts.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    pub gateway_classes: Vec<GatewayClass>,
    pub gateways: Vec<Gateway>,
    pub http_routes: Vec<HttpRoute>,
    pub reference_grants: Vec<ReferenceGrant>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub namespaces: Vec<Namespace>,
    pub rate_limit_policies: Vec<RateLimitPolicy>,
    pub envoy_filters: Vec<EnvoyFilter>,
    /// `IstioOperator` / `MeshOperator` install profiles (only `meshConfig.accessLogFile` is
    /// used by the proxy).
    pub operators: Vec<IstioOperator>,
    pub peer_authentications: Vec<PeerAuthentication>,
    /// Meshed pods by `namespace/name`: their labels (workload selectors) and service
    /// accounts (identities of their endpoints). From `kind: Pod` objects in files, or the
    /// control plane's watch of meshed pods.
    pub pods: HashMap<String, Arc<MeshedPod>>,
}

impl Resources {
    /// Appends every object of `other`.
    pub fn extend(&mut self, other: Resources) {
        self.gateway_classes.extend(other.gateway_classes);
        self.gateways.extend(other.gateways);
        self.http_routes.extend(other.http_routes);
        self.reference_grants.extend(other.reference_grants);
        self.services.extend(other.services);
        self.endpoint_slices.extend(other.endpoint_slices);
        self.namespaces.extend(other.namespaces);
        self.rate_limit_policies.extend(other.rate_limit_policies);
        self.envoy_filters.extend(other.envoy_filters);
        self.operators.extend(other.operators);
        self.peer_authentications.extend(other.peer_authentications);
        self.pods.extend(other.pods);
    }
}

/// The key of a pod in [`Resources::pods`].
pub fn pod_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// `namespace/name` of an object, the namespace defaulted.
pub(crate) fn ns_name(meta: &ObjectMeta, default_ns: &str) -> (String, String) {
    (
        meta.namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| default_ns.to_string()),
        meta.name.clone().unwrap_or_default(),
    )
}
