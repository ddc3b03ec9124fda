//! Kubernetes objects → `mesh_config::ProxyConfig`. Pure: no I/O, no clock.
//!
//! [`translate`] runs the steps in order, each in its own module, sharing the [`Ctx`] that
//! collects backends, rate limits and warnings: the Gateways served ([`gateways`]), routes
//! attached to their listeners ([`attachment`], built by [`routes`], [`filters`] and
//! [`backends`]), rate-limit policies ([`policies`]) and EnvoyFilters ([`envoy_filters`]),
//! then the listeners ([`listeners`]) and the mesh options ([`mesh_options`]).

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use mesh_config::{AccessLog, Backend, HttpOptions, Listener, ProxyConfig, RateLimit};

use crate::Warning;
use crate::policy::RateLimitPolicy;
use crate::resources::{Resources, ns_name};
use crate::status::{GatewayStatus, RouteParentStatus};

mod attachment;
mod backends;
mod envoy_filters;
mod filters;
mod gateways;
mod listeners;
mod mesh_options;
mod peer_authentication;
mod policies;
mod routes;

// The sidecar translation shares these steps.
pub(crate) use backends::{meshed_endpoints, resolve_backend};
pub(crate) use mesh_options::access_log;
pub(crate) use peer_authentication::{Peers, inbound_mtls, report_peer_authentications};
pub(crate) use policies::fmt_labels;
pub(crate) use routes::build_routes;

use attachment::attach_routes;
use envoy_filters::apply_envoy_filters;
use gateways::{gateway_status, served_gateways};
use listeners::build_listeners;
use mesh_options::http_options;
use policies::apply_policies;

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// (namespace, Service name) of the Service an EndpointSlice belongs to, from its
/// `kubernetes.io/service-name` label; `None` for a slice without one.
pub(crate) fn slice_service(s: &EndpointSlice, default_ns: &str) -> Option<(String, String)> {
    let svc = s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    let (ns, _) = ns_name(&s.metadata, default_ns);
    Some((ns, svc.clone()))
}
/// What to translate and how.
#[derive(Debug, Clone)]
pub struct TranslateOptions {
    /// GatewayClass controller names we own. Default `meshctl.io/gateway-controller` and
    /// `istio.io/gateway-controller`.
    pub controller_names: Vec<String>,
    /// Gateways this proxy serves, as `namespace/name`; empty: every Gateway of our classes.
    pub gateways: Vec<String>,
    /// Namespace of objects without `metadata.namespace` (the loader usually sets it).
    pub default_namespace: String,
    /// Number of proxy instances sharing a `Distributed` rate limit (the control plane knows;
    /// standalone: a flag). Default 1.
    pub distributed_instances: u32,
    /// Labels of our gateway proxies, for EnvoyFilter `workloadSelector` matching (plus
    /// `gateway.networking.k8s.io/gateway-name: NAME` and the Gateway's
    /// `spec.infrastructure.labels`). Default `istio: ingressgateway`.
    pub gateway_labels: BTreeMap<String, String>,
    /// EnvoyFilters in these namespaces apply to every namespace (Istio's root namespace).
    /// Default `istio-system`, `mesh-system`.
    pub root_namespaces: Vec<String>,
    /// The mesh's HTTP options (the control plane's `--path-normalization`, from the
    /// profile's `meshConfig`); an install profile among the resources wins.
    pub http: HttpOptions,
    /// The trust domain of workload identities (`spiffe://<trust domain>/ns/..`): the
    /// profile's `meshConfig.trustDomain`; an install profile among the resources wins.
    /// Default `cluster.local`.
    pub trust_domain: String,
}

impl Default for TranslateOptions {
    fn default() -> Self {
        TranslateOptions {
            controller_names: vec![
                "meshctl.io/gateway-controller".into(),
                "istio.io/gateway-controller".into(),
            ],
            gateways: Vec::new(),
            default_namespace: "default".into(),
            distributed_instances: 1,
            gateway_labels: BTreeMap::from([("istio".into(), "ingressgateway".into())]),
            root_namespaces: vec!["istio-system".into(), "mesh-system".into()],
            http: HttpOptions::default(),
            trust_domain: mesh_config::identity::DEFAULT_TRUST_DOMAIN.into(),
        }
    }
}

/// The result of [`translate`]: a config that validates, what was not (fully) applied, and
/// the status to write back.
#[derive(Debug, Clone, Default)]
pub struct Translation {
    pub config: ProxyConfig,
    pub warnings: Vec<Warning>,
    pub route_status: Vec<RouteParentStatus>,
    pub gateway_status: Vec<GatewayStatus>,
}

pub(crate) struct BackendEntry {
    pub(crate) backend: Backend,
    pub(crate) service: (String, String),
    pub(crate) port_name: Option<String>,
    pub(crate) service_port: u16,
}

pub(crate) struct Ctx<'a> {
    pub(crate) res: &'a Resources,
    pub(crate) opts: &'a TranslateOptions,
    pub(crate) warnings: Vec<Warning>,
    pub(crate) backends: BTreeMap<String, BackendEntry>,
    pub(crate) rate_limits: BTreeMap<String, RateLimit>,
    port_limits: BTreeMap<u16, String>,
    /// Services by (namespace, name): lookups are per backendRef and per Service port, so a
    /// scan each time made a translation quadratic in the number of Services.
    services: HashMap<(String, String), &'a Service>,
    /// EndpointSlices by (namespace, `kubernetes.io/service-name`), sorted by name.
    slices: HashMap<(String, String), Vec<&'a EndpointSlice>>,
    /// PeerAuthentications by scope and the trust domain: the mTLS modes and identities of
    /// meshed pods.
    pub(crate) peers: Peers<'a>,
}

impl<'a> Ctx<'a> {
    /// The config of `listeners` with every backend and rate limit collected so far (backends
    /// sorted by name), validated: a problem there is a translator bug, reported as a warning
    /// under `context`.
    pub(crate) fn into_config(
        mut self,
        listeners: Vec<Listener>,
        access_log: AccessLog,
        context: &str,
    ) -> (ProxyConfig, Vec<Warning>) {
        let http = http_options(&mut self);
        let mut config = ProxyConfig {
            mesh_identity: Default::default(),
            version: String::new(),
            listeners,
            backends: self.backends.into_values().map(|b| b.backend).collect(),
            rate_limits: self.rate_limits.into_values().collect(),
            access_log,
            http,
        };
        config.backends.sort_by(|a, b| a.name.cmp(&b.name));
        if let Err(errs) = config.validate() {
            for e in errs {
                self.warnings.push(Warning::new(
                    context,
                    format!("{e} (a translator bug: please report it)"),
                ));
            }
        }
        (config, self.warnings)
    }

    pub(crate) fn new(res: &'a Resources, opts: &'a TranslateOptions) -> Self {
        let default_ns = &opts.default_namespace;
        let mut services = HashMap::with_capacity(res.services.len());
        for s in &res.services {
            // The first of duplicates wins, as the scan it replaces did.
            services
                .entry(ns_name(&s.metadata, default_ns))
                .or_insert(s);
        }
        let mut slices: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
        for s in &res.endpoint_slices {
            if let Some(key) = slice_service(s, default_ns) {
                slices.entry(key).or_default().push(s);
            }
        }
        for v in slices.values_mut() {
            v.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        }
        Ctx {
            res,
            opts,
            warnings: Vec::new(),
            backends: BTreeMap::new(),
            rate_limits: BTreeMap::new(),
            port_limits: BTreeMap::new(),
            services,
            slices,
            peers: Peers::new(res, opts),
        }
    }

    /// Rate-limit policies in the order conflicts are settled, for gateways and sidecars
    /// alike: oldest first (no timestamp last), then namespace/name.
    pub(crate) fn policies_in_order(&self) -> Vec<&'a RateLimitPolicy> {
        let mut policies: Vec<_> = self.res.rate_limit_policies.iter().collect();
        policies.sort_by_key(|p| {
            let c = p.metadata.creation_timestamp.clone();
            (
                c.is_none(),
                c,
                ns_name(&p.metadata, &self.opts.default_namespace),
            )
        });
        policies
    }

    /// The Service `ns/name`.
    pub(crate) fn service(&self, ns: &str, name: &str) -> Option<&'a Service> {
        self.services
            .get(&(ns.to_string(), name.to_string()))
            .copied()
    }

    /// The EndpointSlices of Service `ns/name`, by name.
    pub(crate) fn slices_of(&self, ns: &str, name: &str) -> &[&'a EndpointSlice] {
        self.slices
            .get(&(ns.to_string(), name.to_string()))
            .map_or(&[], Vec::as_slice)
    }

    pub(crate) fn warn(&mut self, context: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Warning::new(context, message));
    }
}

/// Translates the objects into the proxy's native config (see the crate docs for the rules).
pub fn translate(res: &Resources, opts: &TranslateOptions) -> Translation {
    let mut cx = Ctx::new(res, opts);
    let mut gws = served_gateways(&mut cx);
    let mut route_status = Vec::new();
    let mut entries = Vec::new();
    attach_routes(&mut cx, &mut gws, &mut entries, &mut route_status);
    apply_policies(&mut cx, &gws, &mut entries);
    apply_envoy_filters(&mut cx, &gws);
    report_peer_authentications(&mut cx);
    let listeners = build_listeners(&mut cx, &gws, entries);
    let access_log = access_log(&mut cx);
    let gateway_status = gateway_status(&gws);

    let (config, warnings) = cx.into_config(listeners, access_log, "generated config");
    Translation {
        config,
        warnings,
        route_status,
        gateway_status,
    }
}
