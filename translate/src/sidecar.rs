//! Kubernetes objects → the config of one pod's sidecar (`mesh-proxy sidecar`).
//!
//! - **Outbound** (`sidecarOutbound` listener): one [`MeshService`] per port of every Service
//!   with a ClusterIP. HTTP to `ClusterIP:port` is routed by the HTTPRoutes whose parentRef is
//!   that Service (Gateway API mesh routing, "GAMMA"; the parentRef `port`, when set, picks the
//!   Service port), ordered by the Gateway API precedence like gateway routes; routes in the
//!   Service's namespace ("producer" routes) apply to every client, routes in the client's
//!   namespace ("consumer" routes) apply to this client only and replace the producer routes.
//!   Route `hostnames` are not used (the destination chose the Service). A Service port without
//!   mesh routes gets one route to its own endpoints. Opaque TCP goes to the Service port's
//!   endpoints. Headless Services have no ClusterIP: their pods are dialled directly and
//!   passed through.
//! - **Inbound** (`sidecarInbound` listener): the pod's per-pod policies. The Services this pod
//!   backs are found in the EndpointSlices (an endpoint with the pod's IP, or whose targetRef
//!   is the pod); a `RateLimitPolicy` targeting one of them limits its target ports here, with
//!   the whole budget per pod (`Local`) or the budget split across the Service's endpoints
//!   (`Distributed`); an `EnvoyFilter` local rate limit with context `SIDECAR_INBOUND` (or
//!   `ANY`) whose workloadSelector matches the pod limits the port it names, or every port.
//!   Without Pod objects, the pod's labels are taken to be those of the selectors of the
//!   Services it backs (unless given). As in gateway mode, a workloadSelector that selects the
//!   ingress gateway (the walkthrough's EnvoyFilter) is not used: the limit applies to every sidecar
//!   in its scope. Its `mtls` (what it accepts, per port) is resolved from the
//!   PeerAuthentications that apply to the pod's namespace and labels.
//! - Backends of meshed pods carry their identities (see `identity`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::Service;
use kube::core::{Selector, SelectorExt};
use mesh_config::{
    BackendTarget, Forward, InboundPort, Listener, ListenerKind, ListenerProtocol, MeshService,
    RateLimit, RateLimitMode, Route, RouteAction, RouteMatch, WeightedBackend,
};

use crate::istio::PatchContext;
use crate::policy::RateLimitPolicyMode;
use crate::precedence::PrecedenceKey;
use crate::resources::{Resources, ns_name};
use crate::translate::{
    Ctx, access_log, build_routes, fmt_labels, inbound_mtls, resolve_backend, slice_service,
};
use crate::{TranslateOptions, Translation, validate};

/// Listener names in a sidecar's config.
pub const OUTBOUND_LISTENER: &str = "sidecar-outbound";
pub const INBOUND_LISTENER: &str = "sidecar-inbound";

/// Who the sidecar is.
#[derive(Debug, Clone)]
pub struct SidecarOptions {
    /// Defaults, controller names, root namespaces, gateway labels (see [`TranslateOptions`]).
    pub base: TranslateOptions,
    /// `POD_NAMESPACE`.
    pub pod_namespace: String,
    /// `POD_NAME`.
    pub pod_name: String,
    /// `POD_IP`.
    pub pod_ip: Option<IpAddr>,
    /// The pod's labels when known (the control plane knows them); `None`: the selectors of
    /// the Services the pod backs.
    pub pod_labels: Option<BTreeMap<String, String>>,
    pub inbound_port: u16,
    pub outbound_port: u16,
}

/// A Service this pod is an endpoint of, with its EndpointSlice ports (name → target port).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Backed {
    ns: String,
    name: String,
    ports: BTreeMap<String, u16>,
    endpoints: usize,
}

/// Everything a sidecar's config depends on besides the objects: two pods with equal keys
/// get equal configs (the pods of one Deployment, typically), so the control plane translates
/// once per key, not once per pod. Costs one pass over the EndpointSlices.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SidecarKey {
    namespace: String,
    labels: Option<BTreeMap<String, String>>,
    backed: Vec<Backed>,
    ports: (u16, u16),
}

/// The [`SidecarKey`] of one pod.
pub fn sidecar_key(res: &Resources, o: &SidecarOptions) -> SidecarKey {
    SidecarKey {
        namespace: o.pod_namespace.clone(),
        // The labels matter only through the EnvoyFilter workloadSelectors
        // ([`inbound_envoy_filters`]) and the PeerAuthentication selectors: the others
        // (`pod-template-hash`, a StatefulSet's `statefulset.kubernetes.io/pod-name`) would
        // make replicas differ for nothing.
        labels: known_pod_labels(res, o).map(|labels| {
            let selected: BTreeSet<&String> = res
                .envoy_filters
                .iter()
                .filter_map(|f| f.spec.workload_selector.as_ref())
                .flat_map(|s| s.labels.keys())
                .chain(
                    res.peer_authentications
                        .iter()
                        .filter_map(|p| p.spec.selector.as_ref())
                        .flat_map(|s| s.match_labels.keys()),
                )
                .collect();
            labels
                .iter()
                .filter(|(k, _)| selected.contains(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }),
        backed: backed_services(res, &o.base.default_namespace, o),
        ports: (o.inbound_port, o.outbound_port),
    }
}

/// The pod's labels: given, or those of the pod among the resources' meshed pods.
fn known_pod_labels(res: &Resources, o: &SidecarOptions) -> Option<BTreeMap<String, String>> {
    o.pod_labels.clone().or_else(|| {
        res.pods
            .get(&crate::pod_key(&o.pod_namespace, &o.pod_name))
            .map(|p| p.labels.clone())
    })
}

/// Translates the objects into the config of the sidecar of one pod.
pub fn translate_sidecar(res: &Resources, o: &SidecarOptions) -> Translation {
    let mut cx = Ctx::new(res, &o.base);
    let services = outbound_services(&mut cx, o);
    let backed = backed_services(res, &o.base.default_namespace, o);
    let labels = known_pod_labels(res, o).unwrap_or_else(|| {
        let mut l = BTreeMap::new();
        for b in &backed {
            if let Some(sel) = service(&cx, &b.ns, &b.name)
                .and_then(|s| s.spec.as_ref())
                .and_then(|s| s.selector.as_ref())
            {
                l.extend(sel.clone());
            }
        }
        l
    });
    let mut inbound_limits: BTreeMap<u16, Option<String>> = BTreeMap::new();
    for b in &backed {
        for p in b.ports.values() {
            inbound_limits.entry(*p).or_default();
        }
    }
    let mut listener_limit = None;
    inbound_policies(&mut cx, o, &backed, &mut inbound_limits);
    inbound_envoy_filters(
        &mut cx,
        o,
        &labels,
        &mut inbound_limits,
        &mut listener_limit,
    );
    let mtls = inbound_mtls(&mut cx, &o.pod_namespace, &o.pod_name, &labels);
    let access_log = access_log(&mut cx);

    let outbound = Listener {
        mtls: Default::default(),
        passthrough_identities: crate::translate::meshed_endpoints(&cx),
        name: OUTBOUND_LISTENER.into(),
        address: None,
        port: o.outbound_port,
        kind: ListenerKind::SidecarOutbound,
        protocol: ListenerProtocol::Http,
        virtual_hosts: Vec::new(),
        rate_limit: None,
        limits: Default::default(),
        services,
        inbound_ports: Vec::new(),
    };
    let inbound = Listener {
        mtls: (!mtls.is_default()).then_some(mtls),
        passthrough_identities: Default::default(),
        name: INBOUND_LISTENER.into(),
        address: None,
        port: o.inbound_port,
        kind: ListenerKind::SidecarInbound,
        protocol: ListenerProtocol::Http,
        virtual_hosts: Vec::new(),
        rate_limit: listener_limit,
        limits: Default::default(),
        services: Vec::new(),
        inbound_ports: inbound_limits
            .into_iter()
            .map(|(port, rate_limit)| InboundPort { port, rate_limit })
            .collect(),
    };
    let (config, warnings) = cx.into_config(
        vec![outbound, inbound],
        access_log,
        "generated sidecar config",
    );
    Translation {
        config,
        warnings,
        route_status: Vec::new(),
        gateway_status: Vec::new(),
    }
}

fn service<'a>(cx: &Ctx<'a>, ns: &str, name: &str) -> Option<&'a Service> {
    cx.service(ns, name)
}

/// A mesh route attached to a Service: (service ns, name, parentRef port, consumer?, route).
struct MeshRoute {
    service: (String, String),
    port: Option<i32>,
    consumer: bool,
    routes: Vec<(PrecedenceKey, Route)>,
}

fn mesh_routes(cx: &mut Ctx<'_>, o: &SidecarOptions) -> Vec<MeshRoute> {
    let mut out = Vec::new();
    let mut routes: Vec<&HttpRoute> = cx.res.http_routes.iter().collect();
    routes.sort_by_key(|r| ns_name(&r.metadata, &cx.opts.default_namespace));
    for r in routes {
        let (ns, name) = ns_name(&r.metadata, &cx.opts.default_namespace);
        let ctx = format!("HTTPRoute {ns}/{name}");
        let parents: Vec<(String, String, Option<i32>)> = r
            .spec
            .parent_refs
            .iter()
            .flatten()
            .filter(|p| {
                p.kind.as_deref() == Some("Service")
                    && matches!(p.group.as_deref(), Some("" | "core"))
            })
            .map(|p| {
                (
                    p.namespace.clone().unwrap_or_else(|| ns.clone()),
                    p.name.clone(),
                    p.port,
                )
            })
            // Producer routes (in the Service's namespace) apply to every client; consumer
            // routes only to clients in the route's namespace.
            .filter(|(pns, _, _)| *pns == ns || ns == o.pod_namespace)
            .collect();
        if parents.is_empty() {
            continue;
        }
        let problems = validate::http_route(r);
        if !problems.is_empty() {
            let m = problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            cx.warn(&ctx, format!("{m}; the mesh route is not applied"));
            continue;
        }
        let (built, ref_problems) = build_routes(cx, r, &ns, &name);
        for (_, m) in &ref_problems {
            cx.warn(&ctx, m.clone());
        }
        for (pns, pname, port) in parents {
            if service(cx, &pns, &pname).is_none() {
                cx.warn(
                    &ctx,
                    format!("parentRef Service {pns}/{pname} does not exist; not attached"),
                );
                continue;
            }
            out.push(MeshRoute {
                consumer: pns != ns,
                service: (pns, pname),
                port,
                routes: built
                    .iter()
                    .map(|(k, r, _)| (k.clone(), r.clone()))
                    .collect(),
            });
        }
    }
    out
}

fn outbound_services(cx: &mut Ctx<'_>, o: &SidecarOptions) -> Vec<MeshService> {
    let attached = mesh_routes(cx, o);
    let mut attached_to: BTreeMap<(&str, &str), Vec<&MeshRoute>> = BTreeMap::new();
    for m in &attached {
        attached_to
            .entry((m.service.0.as_str(), m.service.1.as_str()))
            .or_default()
            .push(m);
    }
    let mut svcs: Vec<&Service> = cx.res.services.iter().collect();
    svcs.sort_by_key(|s| ns_name(&s.metadata, &cx.opts.default_namespace));
    let mut out = Vec::new();
    let mut used_names = BTreeSet::new();
    for svc in svcs {
        let (ns, name) = ns_name(&svc.metadata, &cx.opts.default_namespace);
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let mut addresses: Vec<String> = spec
            .cluster_ips
            .clone()
            .unwrap_or_default()
            .into_iter()
            .chain(spec.cluster_ip.clone())
            .filter(|a| a.parse::<IpAddr>().is_ok())
            .collect();
        addresses.dedup();
        if addresses.is_empty() {
            continue;
        }
        for sp in spec.ports.iter().flatten() {
            if sp.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            let Ok(port) = u16::try_from(sp.port) else {
                continue;
            };
            let backend = match resolve_backend(cx, &ns, None, None, &name, None, Some(sp.port)) {
                Ok(b) => b,
                Err((_, m)) => {
                    cx.warn(format!("Service {ns}/{name}"), m);
                    continue;
                }
            };
            let svc_name = format!("{ns}/{name}:{port}");
            let mine: Vec<&MeshRoute> = attached_to
                .get(&(ns.as_str(), name.as_str()))
                .into_iter()
                .flatten()
                .copied()
                .filter(|m| m.port.is_none_or(|p| p == sp.port))
                .collect();
            let consumer = mine.iter().any(|m| m.consumer);
            let mut entries: Vec<(PrecedenceKey, Route)> = mine
                .into_iter()
                .filter(|m| m.consumer == consumer)
                .flat_map(|m| m.routes.iter().cloned())
                .collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut routes: Vec<Route> = entries.into_iter().map(|(_, r)| r).collect();
            if routes.is_empty() {
                routes.push(Route {
                    name: format!("{svc_name}/default"),
                    matches: RouteMatch::default(),
                    filters: Vec::new(),
                    action: RouteAction::Forward(Forward {
                        backends: vec![WeightedBackend {
                            target: BackendTarget::Backend(backend.clone()),
                            weight: 1,
                            filters: Vec::new(),
                        }],
                        mirrors: Vec::new(),
                    }),
                    rate_limit: None,
                    timeouts: Default::default(),
                });
            }
            for r in &mut routes {
                // Route names are unique per listener: a route attached to several Service
                // ports keeps its name once and gets `@service` elsewhere.
                if !used_names.insert(r.name.clone()) {
                    r.name = format!("{}@{svc_name}", r.name);
                    used_names.insert(r.name.clone());
                }
            }
            out.push(MeshService {
                name: svc_name,
                addresses: addresses.clone(),
                port,
                routes,
                tcp_backend: Some(backend),
            });
        }
    }
    out
}

/// The Services whose EndpointSlices hold this pod (by IP, or by a targetRef naming it),
/// sorted by namespace and name.
fn backed_services(res: &Resources, default_ns: &str, o: &SidecarOptions) -> Vec<Backed> {
    let ip = o.pod_ip.map(|i| i.to_string());
    let mut out: BTreeMap<(String, String), Backed> = BTreeMap::new();
    let mut slices: Vec<_> = res.endpoint_slices.iter().collect();
    // Later slices win a port name: in name order, whatever order the objects came in.
    slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    for s in slices {
        let Some((ns, svc)) = slice_service(s, default_ns) else {
            continue;
        };
        let eps: &[_] = s.endpoints.as_deref().unwrap_or(&[]);
        let mine = eps.iter().any(|e| {
            ip.as_ref().is_some_and(|ip| e.addresses.contains(ip))
                || (ns == o.pod_namespace
                    && e.target_ref.as_ref().is_some_and(|t| {
                        t.kind.as_deref() == Some("Pod")
                            && t.name.as_deref() == Some(o.pod_name.as_str())
                    }))
        });
        let b = out.entry((ns.clone(), svc.clone())).or_insert(Backed {
            ns,
            name: svc.clone(),
            ports: BTreeMap::new(),
            endpoints: 0,
        });
        b.endpoints += eps
            .iter()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .count();
        if mine {
            for p in s.ports.iter().flatten() {
                if let Some(port) = p.port.and_then(|p| u16::try_from(p).ok()) {
                    b.ports.insert(p.name.clone().unwrap_or_default(), port);
                }
            }
        }
    }
    out.into_values().filter(|b| !b.ports.is_empty()).collect()
}

fn set_port_limit(
    cx: &mut Ctx<'_>,
    ctx: &str,
    limits: &mut BTreeMap<u16, Option<String>>,
    port: u16,
    limit: &str,
) -> bool {
    let slot = limits.entry(port).or_default();
    match slot {
        Some(existing) if existing != limit => {
            let m =
                format!("inbound port {port} is already limited by {existing}; not applied there");
            cx.warn(ctx, m);
            false
        }
        _ => {
            *slot = Some(limit.to_string());
            true
        }
    }
}

fn inbound_policies(
    cx: &mut Ctx<'_>,
    o: &SidecarOptions,
    backed: &[Backed],
    limits: &mut BTreeMap<u16, Option<String>>,
) {
    for p in cx.policies_in_order() {
        let (ns, name) = ns_name(&p.metadata, &cx.opts.default_namespace);
        let ctx = format!("RateLimitPolicy {ns}/{name}");
        if !validate::rate_limit_policy(p).is_empty() {
            continue; // the gateway translation reports the problems
        }
        let s = &p.spec;
        let limit_name = format!("ratelimitpolicy/{ns}/{name}");
        let mut used = false;
        let mut instances = 1;
        for t in &s.target_refs {
            if t.kind != "Service" || !(t.group.is_empty() || t.group == "core") {
                continue;
            }
            let Some(b) = backed.iter().find(|b| b.ns == ns && b.name == t.name) else {
                continue;
            };
            instances = b.endpoints.max(1) as u32;
            for (port_name, port) in &b.ports {
                if t.section_name.as_ref().is_some_and(|sn| sn != port_name) {
                    continue;
                }
                used |= set_port_limit(cx, &ctx, limits, *port, &limit_name);
            }
        }
        if used {
            cx.rate_limits.insert(
                limit_name.clone(),
                RateLimit {
                    name: limit_name,
                    max_tokens: s.max_tokens,
                    tokens_per_fill: s.tokens_per_fill,
                    fill_interval: mesh_config::parse_duration(&s.fill_interval)
                        .unwrap_or_default(),
                    status: s.status.unwrap_or(429),
                    response_headers_to_add: s
                        .response_headers_to_add
                        .iter()
                        .map(|h| mesh_config::HeaderValue {
                            name: h.name.clone(),
                            value: h.value.clone(),
                        })
                        .collect(),
                    x_ratelimit_headers: s.x_rate_limit_headers,
                    mode: match s.mode {
                        RateLimitPolicyMode::Local => RateLimitMode::Local,
                        // One budget for the Service, split across the pods serving it.
                        RateLimitPolicyMode::Distributed => {
                            RateLimitMode::Distributed { instances }
                        }
                    },
                },
            );
            cx.warn(
                &ctx,
                format!(
                    "applied at the inbound of pod {}/{} (per pod)",
                    o.pod_namespace, o.pod_name
                ),
            );
        }
    }
}

fn inbound_envoy_filters(
    cx: &mut Ctx<'_>,
    o: &SidecarOptions,
    pod_labels: &BTreeMap<String, String>,
    limits: &mut BTreeMap<u16, Option<String>>,
    listener_limit: &mut Option<String>,
) {
    let mut filters: Vec<_> = cx.res.envoy_filters.iter().collect();
    let root = |ns: &str| cx.opts.root_namespaces.iter().any(|r| r == ns);
    filters.sort_by_key(|f| {
        let (ns, name) = ns_name(&f.metadata, &cx.opts.default_namespace);
        (!root(&ns), f.spec.priority.unwrap_or(0), ns, name)
    });
    for ef in filters {
        let (ns, name) = ns_name(&ef.metadata, &cx.opts.default_namespace);
        let ctx = format!("EnvoyFilter {ns}/{name}");
        let in_root = cx.opts.root_namespaces.contains(&ns);
        if !(in_root || ns == o.pod_namespace) {
            continue;
        }
        let extracted = crate::istio::local_rate_limits(ef);
        if !extracted.errors.is_empty() {
            continue; // reported by the gateway translation
        }
        let selector = ef.spec.workload_selector.as_ref().map(|s| s.labels.clone());
        let selects = |l: &BTreeMap<String, String>, s: &BTreeMap<String, String>| {
            Selector::from_iter(s.clone()).matches(l)
        };
        let how = match &selector {
            None => "no workloadSelector".to_string(),
            Some(s) if selects(pod_labels, s) => format!("workloadSelector {}", fmt_labels(s)),
            Some(s) if selects(&cx.opts.gateway_labels, s) => format!(
                "its workloadSelector {} selects the ingress gateway, which has no SIDECAR_INBOUND listener; as in gateway mode the selector is not used",
                fmt_labels(s)
            ),
            Some(_) => continue,
        };
        for p in extracted.patches.iter().filter(|p| p.enforced) {
            if !matches!(p.context, PatchContext::SidecarInbound | PatchContext::Any) {
                continue;
            }
            let lname = format!("envoyfilter/{ns}/{name}/{}", p.index);
            let pctx = format!("{ctx}: spec.configPatches[{}]", p.index);
            let applied = match p.port.and_then(|port| u16::try_from(port).ok()) {
                Some(port) => set_port_limit(cx, &pctx, limits, port, &lname),
                None => match listener_limit {
                    Some(existing) if *existing != lname => {
                        let m = format!(
                            "the inbound listener is already limited by {existing}; not applied"
                        );
                        cx.warn(&pctx, m);
                        false
                    }
                    _ => {
                        *listener_limit = Some(lname.clone());
                        true
                    }
                },
            };
            if applied {
                cx.rate_limits.insert(
                    lname.clone(),
                    RateLimit {
                        name: lname,
                        max_tokens: p.max_tokens,
                        tokens_per_fill: p.tokens_per_fill,
                        fill_interval: p.fill_interval,
                        status: p.status,
                        response_headers_to_add: p.response_headers_to_add.clone(),
                        x_ratelimit_headers: p.x_ratelimit_headers,
                        mode: RateLimitMode::Local,
                    },
                );
                cx.warn(
                    &pctx,
                    format!(
                        "context {}: local rate limit ({} tokens, {} per {}) at the inbound of pod {}/{} ({how})",
                        p.context.as_str(),
                        p.max_tokens,
                        p.tokens_per_fill,
                        mesh_config::format_duration(p.fill_interval),
                        o.pod_namespace,
                        o.pod_name
                    ),
                );
            }
        }
    }
}
