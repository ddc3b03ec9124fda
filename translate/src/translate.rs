//! Kubernetes objects → `mesh_config::ProxyConfig`. Pure: no I/O, no clock.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use gateway_api::apis::standard::gateways::{
    Gateway, GatewayListeners, GatewayListenersAllowedRoutesNamespacesFrom as From,
};
use gateway_api::apis::standard::httproutes::{
    HttpRoute, HttpRouteRules, HttpRouteRulesBackendRefsFilters, HttpRouteRulesFilters,
    HttpRouteRulesFiltersRequestRedirectScheme, HttpRouteRulesFiltersType as Ft,
    HttpRouteRulesMatches, HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesPathType,
    HttpRouteRulesMatchesQueryParamsType,
};
use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use mesh_config::{
    AccessLog, Backend, BackendTarget, Filter, Forward, HeaderMatch, HeaderModifier, HeaderValue,
    HttpOptions, Listener, ListenerKind, ListenerProtocol, Mirror, PathMatch, PathNormalization,
    PathRewrite, ProxyConfig, QueryParamMatch, RateLimit, RateLimitMode, Redirect, Route,
    RouteAction, RouteMatch, StringMatch, Timeouts, UrlRewrite, VirtualHost, WeightedBackend,
};
use mesh_wire::names::GATEWAY_NAME_LABEL;

use crate::istio::PatchContext;
use crate::policy::{RateLimitPolicy, RateLimitPolicyMode};
use crate::precedence::PrecedenceKey;
use crate::resources::{Resources, ns_name};
use crate::status::{
    Condition, ConditionType as Ct, GatewayStatus, ListenerStatus, ParentRef, Reason,
    RouteParentStatus,
};
use crate::{Warning, hostname, validate};

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

/// A Gateway listener this proxy serves.
struct GwListener {
    name: String,
    port: u16,
    hostname: Option<String>,
    /// HTTP and accepts HTTPRoute.
    usable: bool,
    conditions: Vec<Condition>,
    attached: BTreeSet<(String, String)>,
}

struct Gw<'a> {
    ns: String,
    name: String,
    gw: &'a Gateway,
    controller: String,
    listeners: Vec<GwListener>,
}

/// One route match attached to a port, with the hostnames it serves there.
struct Entry {
    port: u16,
    hostnames: Vec<String>,
    key: PrecedenceKey,
    route: Route,
    source: (String, String),
    rule_name: Option<String>,
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
    let listeners = build_listeners(&mut cx, &gws, entries);
    let access_log = access_log(&mut cx);

    let gateway_status = gws
        .iter()
        .map(|g| {
            let programmed = g.listeners.iter().any(|l| l.usable);
            let generation = g.gw.metadata.generation;
            GatewayStatus {
                namespace: g.ns.clone(),
                name: g.name.clone(),
                controller_name: g.controller.clone(),
                conditions: vec![
                    Condition::new(Ct::Accepted, true, Reason::Accepted, "", generation),
                    if programmed {
                        Condition::new(Ct::Programmed, true, Reason::Programmed, "", generation)
                    } else {
                        Condition::new(
                            Ct::Programmed,
                            false,
                            Reason::Invalid,
                            "no listener can be served",
                            generation,
                        )
                    },
                ],
                listeners: g
                    .listeners
                    .iter()
                    .map(|l| ListenerStatus {
                        name: l.name.clone(),
                        attached_routes: l.attached.len() as i32,
                        supported_kinds: if l.usable {
                            vec!["HTTPRoute".into()]
                        } else {
                            Vec::new()
                        },
                        conditions: l.conditions.clone(),
                    })
                    .collect(),
            }
        })
        .collect();

    let (config, warnings) = cx.into_config(listeners, access_log, "generated config");
    Translation {
        config,
        warnings,
        route_status,
        gateway_status,
    }
}

fn gw_label(ns: &str, name: &str) -> String {
    format!("Gateway {ns}/{name}")
}

fn served_gateways<'a>(cx: &mut Ctx<'a>) -> Vec<Gw<'a>> {
    let res = cx.res;
    let mut classes = BTreeMap::new();
    for c in &res.gateway_classes {
        let name = c.metadata.name.clone().unwrap_or_default();
        if cx.opts.controller_names.contains(&c.spec.controller_name) {
            if c.spec.parameters_ref.is_some() {
                cx.warn(
                    format!("GatewayClass {name}"),
                    "spec.parametersRef is not supported; ignored",
                );
            }
            classes.insert(name, c.spec.controller_name.clone());
        }
    }
    let mut gws = Vec::new();
    let mut wanted: BTreeSet<&String> = cx.opts.gateways.iter().collect();
    let mut sorted: Vec<&Gateway> = res.gateways.iter().collect();
    sorted.sort_by_key(|g| ns_name(&g.metadata, &cx.opts.default_namespace));
    for gw in sorted {
        let (ns, name) = ns_name(&gw.metadata, &cx.opts.default_namespace);
        let Some(controller) = classes.get(&gw.spec.gateway_class_name) else {
            continue;
        };
        let key = format!("{ns}/{name}");
        if !cx.opts.gateways.is_empty() && !wanted.remove(&key) {
            continue;
        }
        let ctx = gw_label(&ns, &name);
        let spec = &gw.spec;
        if spec.addresses.as_ref().is_some_and(|a| !a.is_empty()) {
            cx.warn(
                &ctx,
                "spec.addresses is not supported (the proxy listens on its --bind-address); ignored",
            );
        }
        if spec.tls.is_some() {
            cx.warn(&ctx, "spec.tls is not supported; ignored");
        }
        if spec.allowed_listeners.is_some() {
            cx.warn(
                &ctx,
                "spec.allowedListeners (ListenerSets) is not supported; ignored",
            );
        }
        if let Some(inf) = &spec.infrastructure
            && (inf.parameters_ref.is_some() || inf.annotations.is_some())
        {
            cx.warn(
                &ctx,
                "spec.infrastructure: only labels are used (for EnvoyFilter workloadSelector matching); annotations and parametersRef are ignored",
            );
        }
        let generation = gw.metadata.generation;
        let mut listeners = Vec::new();
        for (i, l) in spec.listeners.iter().enumerate() {
            listeners.push(gw_listener(cx, &ctx, i, l, generation));
        }
        gws.push(Gw {
            ns,
            name,
            gw,
            controller: controller.clone(),
            listeners,
        });
    }
    for missing in wanted {
        cx.warn(
            format!("Gateway {missing}"),
            "asked to serve it, but there is no such Gateway of a class we own",
        );
    }
    gws
}

fn gw_listener(
    cx: &mut Ctx<'_>,
    ctx: &str,
    i: usize,
    l: &GatewayListeners,
    generation: Option<i64>,
) -> GwListener {
    let mut conditions = Vec::new();
    let mut usable = true;
    let port = u16::try_from(l.port).ok().filter(|p| *p > 0);
    if l.protocol != "HTTP" {
        usable = false;
        let m = format!(
            "protocol {} is not supported yet (only HTTP); the listener is not served",
            l.protocol
        );
        cx.warn(ctx, format!("spec.listeners[{i}] ({}): {m}", l.name));
        conditions.push(Condition::new(
            Ct::Accepted,
            false,
            Reason::UnsupportedProtocol,
            m,
            generation,
        ));
    } else if port.is_none() {
        usable = false;
        conditions.push(Condition::new(
            Ct::Accepted,
            false,
            Reason::PortUnavailable,
            format!("{} is not a port", l.port),
            generation,
        ));
    } else {
        conditions.push(Condition::new(
            Ct::Accepted,
            true,
            Reason::Accepted,
            "",
            generation,
        ));
    }
    if l.tls.is_some() && usable {
        cx.warn(
            ctx,
            format!(
                "spec.listeners[{i}] ({}): tls is not supported on an HTTP listener; ignored",
                l.name
            ),
        );
    }
    let mut resolved = Condition::new(Ct::ResolvedRefs, true, Reason::ResolvedRefs, "", generation);
    if let Some(kinds) = l.allowed_routes.as_ref().and_then(|a| a.kinds.as_ref()) {
        let http = kinds.iter().any(|k| {
            k.kind == "HTTPRoute" && k.group.as_deref().is_none_or(|g| g == GATEWAY_GROUP)
        });
        let others: Vec<_> = kinds
            .iter()
            .filter(|k| {
                !(k.kind == "HTTPRoute" && k.group.as_deref().is_none_or(|g| g == GATEWAY_GROUP))
            })
            .map(|k| k.kind.clone())
            .collect();
        if !others.is_empty() {
            resolved = Condition::new(
                Ct::ResolvedRefs,
                false,
                Reason::InvalidKind,
                format!("route kinds not supported: {}", others.join(", ")),
                generation,
            );
        }
        if !http {
            usable = false;
        }
    }
    conditions.push(resolved);
    conditions.push(if usable {
        Condition::new(Ct::Programmed, true, Reason::Programmed, "", generation)
    } else {
        Condition::new(
            Ct::Programmed,
            false,
            Reason::Invalid,
            "not served",
            generation,
        )
    });
    GwListener {
        name: l.name.clone(),
        port: port.unwrap_or(0),
        hostname: l.hostname.clone().filter(|h| !h.is_empty()),
        usable,
        conditions,
        attached: BTreeSet::new(),
    }
}

/// Does the listener allow routes from `route_ns`?
fn namespace_allowed(cx: &Ctx<'_>, gw_ns: &str, l: &GatewayListeners, route_ns: &str) -> bool {
    let ns = l
        .allowed_routes
        .as_ref()
        .and_then(|a| a.namespaces.as_ref());
    match ns.and_then(|n| n.from.clone()).unwrap_or(From::Same) {
        From::All => true,
        From::Same => gw_ns == route_ns,
        From::Selector => {
            let Some(sel) = ns.and_then(|n| n.selector.as_ref()) else {
                return false;
            };
            let mut labels: BTreeMap<String, String> = cx
                .res
                .namespaces
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(route_ns))
                .and_then(|n| n.metadata.labels.clone())
                .unwrap_or_default();
            labels
                .entry("kubernetes.io/metadata.name".into())
                .or_insert_with(|| route_ns.to_string());
            let sel = LabelSelector {
                match_labels: sel.match_labels.clone(),
                match_expressions: sel.match_expressions.as_ref().map(|es| {
                    es.iter()
                        .map(|e| {
                            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                                key: e.key.clone(),
                                operator: e.operator.clone(),
                                values: e.values.clone(),
                            }
                        })
                        .collect()
                }),
            };
            selector_matches(&sel, &labels)
        }
    }
}

pub(crate) fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let ml = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let me = sel.match_expressions.iter().flatten().all(|e| {
        let vals = e.values.as_deref().unwrap_or(&[]);
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| vals.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !vals.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    ml && me
}

fn attach_routes(
    cx: &mut Ctx<'_>,
    gws: &mut [Gw<'_>],
    entries: &mut Vec<Entry>,
    route_status: &mut Vec<RouteParentStatus>,
) {
    let mut routes: Vec<&HttpRoute> = cx.res.http_routes.iter().collect();
    routes.sort_by_key(|r| ns_name(&r.metadata, &cx.opts.default_namespace));
    let default_controller = cx
        .opts
        .controller_names
        .first()
        .cloned()
        .unwrap_or_default();
    for r in routes {
        let (ns, name) = ns_name(&r.metadata, &cx.opts.default_namespace);
        let ctx = format!("HTTPRoute {ns}/{name}");
        let generation = r.metadata.generation;
        let problems = validate::http_route(r);
        let route_hosts: Vec<String> = r
            .spec
            .hostnames
            .iter()
            .flatten()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        let first_status = route_status.len();
        // (port, hostnames)
        let mut attachments: Vec<(u16, Vec<String>)> = Vec::new();
        for pr in r.spec.parent_refs.iter().flatten() {
            let group = pr.group.clone().unwrap_or_else(|| GATEWAY_GROUP.into());
            let kind = pr.kind.clone().unwrap_or_else(|| "Gateway".into());
            let pns = pr.namespace.clone().unwrap_or_else(|| ns.clone());
            let parent_ref = ParentRef {
                group: group.clone(),
                kind: kind.clone(),
                namespace: pns.clone(),
                name: pr.name.clone(),
                section_name: pr.section_name.clone(),
                port: pr.port,
            };
            if kind == "Service" && (group.is_empty() || group == "core") {
                // A mesh (GAMMA) route: the sidecars' outbound side serves it
                // (`translate_sidecar`), a gateway does not.
                continue;
            }
            if group != GATEWAY_GROUP || kind != "Gateway" {
                cx.warn(
                    &ctx,
                    format!(
                        "parentRef {kind} {pns}/{}: only Gateway and Service (mesh) parents are supported; not attached",
                        pr.name
                    ),
                );
                continue;
            }
            let mut status = |controller: &str, conditions: Vec<Condition>| {
                route_status.push(RouteParentStatus {
                    route_namespace: ns.clone(),
                    route_name: name.clone(),
                    parent_ref: parent_ref.clone(),
                    controller_name: controller.to_string(),
                    conditions,
                })
            };
            let Some(g) = gws.iter_mut().find(|g| g.ns == pns && g.name == pr.name) else {
                let exists = cx.res.gateways.iter().any(|g| {
                    ns_name(&g.metadata, &cx.opts.default_namespace)
                        == (pns.clone(), pr.name.clone())
                });
                if !exists {
                    let m = format!("Gateway {pns}/{} does not exist", pr.name);
                    cx.warn(&ctx, format!("{m}; not attached"));
                    status(
                        &default_controller,
                        vec![Condition::new(
                            Ct::Accepted,
                            false,
                            Reason::NoMatchingParent,
                            m,
                            generation,
                        )],
                    );
                }
                // else: a Gateway of another class, or one another proxy serves.
                continue;
            };
            if !problems.is_empty() {
                let m = problems
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join("; ");
                status(
                    &g.controller,
                    vec![Condition::new(
                        Ct::Accepted,
                        false,
                        Reason::UnsupportedValue,
                        m,
                        generation,
                    )],
                );
                continue;
            }
            let cond = {
                let candidates: Vec<usize> = (0..g.listeners.len())
                    .filter(|&i| {
                        let l = &g.gw.spec.listeners[i];
                        pr.section_name.as_ref().is_none_or(|s| *s == l.name)
                            && pr.port.is_none_or(|p| p == l.port)
                    })
                    .collect();
                if candidates.is_empty() {
                    Condition::new(
                        Ct::Accepted,
                        false,
                        Reason::NoMatchingParent,
                        "no listener matches the parentRef's sectionName/port",
                        generation,
                    )
                } else {
                    let allowed: Vec<usize> = candidates
                        .into_iter()
                        .filter(|&i| {
                            g.listeners[i].usable
                                && namespace_allowed(cx, &g.ns, &g.gw.spec.listeners[i], &ns)
                        })
                        .collect();
                    if allowed.is_empty() {
                        Condition::new(
                            Ct::Accepted,
                            false,
                            Reason::NotAllowedByListeners,
                            format!("no listener allows HTTPRoutes from namespace {ns}"),
                            generation,
                        )
                    } else {
                        let mut any = false;
                        for i in allowed {
                            let l = &mut g.listeners[i];
                            if let Some(hosts) =
                                hostname::intersect(l.hostname.as_deref(), &route_hosts)
                            {
                                any = true;
                                l.attached.insert((ns.clone(), name.clone()));
                                attachments.push((l.port, hosts));
                            }
                        }
                        if any {
                            Condition::new(Ct::Accepted, true, Reason::Accepted, "", generation)
                        } else {
                            Condition::new(
                                Ct::Accepted,
                                false,
                                Reason::NoMatchingListenerHostname,
                                "no listener hostname intersects the route's hostnames",
                                generation,
                            )
                        }
                    }
                }
            };
            if !cond.status {
                cx.warn(
                    &ctx,
                    format!(
                        "parentRef Gateway {pns}/{}: not attached: {}",
                        pr.name, cond.message
                    ),
                );
            }
            status(&g.controller, vec![cond]);
        }
        let resolved = if attachments.is_empty() {
            Condition::new(Ct::ResolvedRefs, true, Reason::ResolvedRefs, "", generation)
        } else {
            let (built, ref_problems) = build_routes(cx, r, &ns, &name);
            for (port, hosts) in &attachments {
                for (key, route, rule_name) in &built {
                    entries.push(Entry {
                        port: *port,
                        hostnames: hosts.clone(),
                        key: key.clone(),
                        route: route.clone(),
                        source: (ns.clone(), name.clone()),
                        rule_name: rule_name.clone(),
                    });
                }
            }
            match ref_problems.first() {
                None => {
                    Condition::new(Ct::ResolvedRefs, true, Reason::ResolvedRefs, "", generation)
                }
                Some((reason, _)) => {
                    let m = ref_problems
                        .iter()
                        .map(|(_, m)| m.as_str())
                        .collect::<Vec<_>>()
                        .join("; ");
                    for (_, m) in &ref_problems {
                        cx.warn(&ctx, m.clone());
                    }
                    Condition::new(Ct::ResolvedRefs, false, *reason, m, generation)
                }
            }
        };
        for s in &mut route_status[first_status..] {
            s.conditions.push(resolved.clone());
        }
    }
}

pub(crate) type Built = (
    Vec<(PrecedenceKey, Route, Option<String>)>,
    Vec<(Reason, String)>,
);

pub(crate) fn build_routes(cx: &mut Ctx<'_>, r: &HttpRoute, ns: &str, name: &str) -> Built {
    let mut out = Vec::new();
    let mut ref_problems = Vec::new();
    let created = r.metadata.creation_timestamp.as_ref();
    let ctx = format!("HTTPRoute {ns}/{name}");
    for (ri, rule) in r.spec.rules.iter().flatten().enumerate() {
        let (action, filters, timeouts) = build_rule(cx, &ctx, ns, ri, rule, &mut ref_problems);
        let default_match = [HttpRouteRulesMatches::default()];
        let matches: &[HttpRouteRulesMatches] = match rule.matches.as_deref() {
            Some(m) if !m.is_empty() => m,
            _ => &default_match,
        };
        for (mi, m) in matches.iter().enumerate() {
            let rm = route_match(m);
            let key = PrecedenceKey::new(&rm, created, ns, name, ri, mi);
            out.push((
                key,
                Route {
                    name: format!("{ns}/{name}/{ri}/{mi}"),
                    matches: rm,
                    filters: filters.clone(),
                    action: action.clone(),
                    rate_limit: None,
                    timeouts,
                },
                rule.name.clone(),
            ));
        }
    }
    (out, ref_problems)
}

fn route_match(m: &HttpRouteRulesMatches) -> RouteMatch {
    let path = match &m.path {
        None => PathMatch::Prefix("/".into()),
        Some(p) => {
            let v = p.value.clone().unwrap_or_else(|| "/".into());
            match p
                .r#type
                .clone()
                .unwrap_or(HttpRouteRulesMatchesPathType::PathPrefix)
            {
                HttpRouteRulesMatchesPathType::Exact => PathMatch::Exact(v),
                HttpRouteRulesMatchesPathType::PathPrefix => PathMatch::Prefix(v),
                HttpRouteRulesMatchesPathType::RegularExpression => PathMatch::Regex(v),
            }
        }
    };
    // The spec: only the first of several matches with an equivalent name counts.
    let mut seen = BTreeSet::new();
    let headers = m
        .headers
        .iter()
        .flatten()
        .filter(|h| seen.insert(h.name.to_ascii_lowercase()))
        .map(|h| HeaderMatch {
            name: h.name.clone(),
            value: match h.r#type {
                Some(HttpRouteRulesMatchesHeadersType::RegularExpression) => {
                    StringMatch::Regex(h.value.clone())
                }
                _ => StringMatch::Exact(h.value.clone()),
            },
        })
        .collect();
    let mut seen = BTreeSet::new();
    let query_params = m
        .query_params
        .iter()
        .flatten()
        .filter(|q| seen.insert(q.name.clone()))
        .map(|q| QueryParamMatch {
            name: q.name.clone(),
            value: match q.r#type {
                Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression) => {
                    StringMatch::Regex(q.value.clone())
                }
                _ => StringMatch::Exact(q.value.clone()),
            },
        })
        .collect();
    let method = m.method.as_ref().and_then(|me| {
        serde_json::to_value(me)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
    });
    RouteMatch {
        path,
        headers,
        query_params,
        method,
    }
}

/// The same filter, read as a rule-level filter (the two generated types have one shape).
pub(crate) fn backend_filter_as_rule_filter(
    f: &HttpRouteRulesBackendRefsFilters,
) -> HttpRouteRulesFilters {
    serde_json::to_value(f)
        .and_then(serde_json::from_value)
        .expect("backendRef filters and rule filters have the same schema")
}

#[derive(Default)]
struct Converted {
    filters: Vec<Filter>,
    redirect: Option<Redirect>,
    mirrors: Vec<Mirror>,
}

fn header_modifier(v: serde_json::Value) -> HeaderModifier {
    let list = |k: &str| -> Vec<HeaderValue> {
        v.get(k)
            .and_then(|l| l.as_array())
            .into_iter()
            .flatten()
            .map(|h| HeaderValue {
                name: h.get("name").and_then(|x| x.as_str()).unwrap_or("").into(),
                value: h.get("value").and_then(|x| x.as_str()).unwrap_or("").into(),
            })
            .collect()
    };
    HeaderModifier {
        set: list("set"),
        add: list("add"),
        remove: v
            .get("remove")
            .and_then(|l| l.as_array())
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
    }
}

fn path_rewrite(v: serde_json::Value) -> Option<PathRewrite> {
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    match v.get("type").and_then(|x| x.as_str()) {
        Some("ReplaceFullPath") => s("replaceFullPath").map(PathRewrite::ReplaceFullPath),
        Some("ReplacePrefixMatch") => s("replacePrefixMatch").map(PathRewrite::ReplacePrefixMatch),
        _ => None,
    }
}

fn convert_filters(
    cx: &mut Ctx<'_>,
    route_ns: &str,
    filters: &[HttpRouteRulesFilters],
    ref_problems: &mut Vec<(Reason, String)>,
) -> Converted {
    let mut c = Converted::default();
    for f in filters {
        match f.r#type {
            Ft::RequestHeaderModifier => {
                if let Some(m) = &f.request_header_modifier {
                    let v = serde_json::to_value(m).unwrap_or_default();
                    c.filters
                        .push(Filter::RequestHeaderModifier(header_modifier(v)));
                }
            }
            Ft::ResponseHeaderModifier => {
                if let Some(m) = &f.response_header_modifier {
                    let v = serde_json::to_value(m).unwrap_or_default();
                    c.filters
                        .push(Filter::ResponseHeaderModifier(header_modifier(v)));
                }
            }
            Ft::UrlRewrite => {
                if let Some(u) = &f.url_rewrite {
                    c.filters.push(Filter::UrlRewrite(UrlRewrite {
                        hostname: u.hostname.clone(),
                        path: u.path.as_ref().and_then(|p| {
                            path_rewrite(serde_json::to_value(p).unwrap_or_default())
                        }),
                    }));
                }
            }
            Ft::RequestRedirect => {
                if let Some(r) = &f.request_redirect {
                    c.redirect = Some(Redirect {
                        scheme: r.scheme.as_ref().map(|s| {
                            match s {
                                HttpRouteRulesFiltersRequestRedirectScheme::Http => "http",
                                HttpRouteRulesFiltersRequestRedirectScheme::Https => "https",
                            }
                            .to_string()
                        }),
                        hostname: r.hostname.clone(),
                        path: r.path.as_ref().and_then(|p| {
                            path_rewrite(serde_json::to_value(p).unwrap_or_default())
                        }),
                        port: r.port.and_then(|p| u16::try_from(p).ok()),
                        status_code: r
                            .status_code
                            .and_then(|s| u16::try_from(s).ok())
                            .unwrap_or(302),
                    });
                }
            }
            Ft::RequestMirror => {
                if let Some(m) = &f.request_mirror {
                    let b = &m.backend_ref;
                    let target = match resolve_backend(
                        cx,
                        route_ns,
                        b.group.as_deref(),
                        b.kind.as_deref(),
                        &b.name,
                        b.namespace.as_deref(),
                        b.port,
                    ) {
                        Ok(n) => BackendTarget::Backend(n),
                        Err((reason, msg)) => {
                            ref_problems.push((reason, format!("requestMirror: {msg}")));
                            continue;
                        }
                    };
                    let percent = match (&m.percent, &m.fraction) {
                        (Some(p), _) => f64::from(*p),
                        (None, Some(fr)) => {
                            let den = fr.denominator.unwrap_or(100).max(1);
                            f64::from(fr.numerator) * 100.0 / f64::from(den)
                        }
                        (None, None) => 100.0,
                    };
                    c.mirrors.push(Mirror { target, percent });
                }
            }
            // rejected by validation
            Ft::ExtensionRef | Ft::Cors => {}
        }
    }
    c
}

fn build_rule(
    cx: &mut Ctx<'_>,
    ctx: &str,
    route_ns: &str,
    ri: usize,
    rule: &HttpRouteRules,
    ref_problems: &mut Vec<(Reason, String)>,
) -> (RouteAction, Vec<Filter>, Timeouts) {
    let c = convert_filters(
        cx,
        route_ns,
        rule.filters.as_deref().unwrap_or(&[]),
        ref_problems,
    );
    let timeouts = rule
        .timeouts
        .as_ref()
        .map(|t| {
            let d = |s: &Option<String>| {
                s.as_deref()
                    .and_then(|s| mesh_config::parse_duration(s).ok())
                    .filter(|d| !d.is_zero())
            };
            Timeouts {
                request: d(&t.request),
                backend_request: d(&t.backend_request),
            }
        })
        .unwrap_or_default();
    if let Some(redirect) = c.redirect {
        if rule.backend_refs.as_ref().is_some_and(|b| !b.is_empty()) {
            cx.warn(
                ctx,
                format!("spec.rules[{ri}]: has a RequestRedirect filter, so its backendRefs are not used"),
            );
        }
        return (RouteAction::Redirect(redirect), c.filters, timeouts);
    }
    let mut backends = Vec::new();
    for (bi, b) in rule.backend_refs.iter().flatten().enumerate() {
        let weight = u32::try_from(b.weight.unwrap_or(1)).unwrap_or(0);
        let target = match resolve_backend(
            cx,
            route_ns,
            b.group.as_deref(),
            b.kind.as_deref(),
            &b.name,
            b.namespace.as_deref(),
            b.port,
        ) {
            Ok(n) => BackendTarget::Backend(n),
            Err((reason, msg)) => {
                let msg = format!("spec.rules[{ri}].backendRefs[{bi}]: {msg}");
                ref_problems.push((reason, msg.clone()));
                BackendTarget::Invalid(msg)
            }
        };
        let bf: Vec<HttpRouteRulesFilters> = b
            .filters
            .iter()
            .flatten()
            .map(backend_filter_as_rule_filter)
            .collect();
        let bc = convert_filters(cx, route_ns, &bf, ref_problems);
        backends.push(WeightedBackend {
            target,
            weight,
            filters: bc.filters,
        });
    }
    (
        RouteAction::Forward(Forward {
            backends,
            mirrors: c.mirrors,
        }),
        c.filters,
        timeouts,
    )
}

fn ref_permitted(cx: &Ctx<'_>, from_ns: &str, to_ns: &str, to_name: &str) -> bool {
    cx.res.reference_grants.iter().any(|g| {
        g.metadata
            .namespace
            .as_deref()
            .unwrap_or(&cx.opts.default_namespace)
            == to_ns
            && g.spec.from.iter().any(|f| {
                f.group == GATEWAY_GROUP && f.kind == "HTTPRoute" && f.namespace == from_ns
            })
            && g.spec.to.iter().any(|t| {
                (t.group.is_empty() || t.group == "core")
                    && t.kind == "Service"
                    && t.name.as_deref().is_none_or(|n| n == to_name)
            })
    })
}

/// Resolves a backendRef to a backend name (creating the backend), or says why not.
pub(crate) fn resolve_backend(
    cx: &mut Ctx<'_>,
    route_ns: &str,
    group: Option<&str>,
    kind: Option<&str>,
    name: &str,
    namespace: Option<&str>,
    port: Option<i32>,
) -> Result<String, (Reason, String)> {
    let group = group.unwrap_or("");
    let kind = kind.unwrap_or("Service");
    if !(group.is_empty() || group == "core") || kind != "Service" {
        return Err((
            Reason::InvalidKind,
            format!("backend {kind} (group {group:?}) {name}: only Services are supported"),
        ));
    }
    let ns = namespace.unwrap_or(route_ns);
    if ns != route_ns && !ref_permitted(cx, route_ns, ns, name) {
        return Err((
            Reason::RefNotPermitted,
            format!(
                "Service {ns}/{name}: no ReferenceGrant in {ns} allows HTTPRoutes from {route_ns}"
            ),
        ));
    }
    let Some(port) = port else {
        return Err((
            Reason::UnsupportedValue,
            format!("Service {ns}/{name}: port is required"),
        ));
    };
    let Some(svc) = cx.service(ns, name) else {
        return Err((
            Reason::BackendNotFound,
            format!("Service {ns}/{name} not found"),
        ));
    };
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or(&[]);
    let Some(sp) = ports.iter().find(|p| p.port == port) else {
        return Err((
            Reason::BackendNotFound,
            format!("Service {ns}/{name} has no port {port}"),
        ));
    };
    let backend_name = format!("{ns}/{name}:{port}");
    if !cx.backends.contains_key(&backend_name) {
        let endpoints = endpoints(cx, svc, ns, name, sp, ports.len());
        cx.backends.insert(
            backend_name.clone(),
            BackendEntry {
                backend: Backend {
                    name: backend_name.clone(),
                    endpoints,
                    load_balancer: Default::default(),
                    protocol: upstream_protocol(sp),
                    connect_timeout: Backend::default_connect_timeout(),
                    rate_limit: None,
                },
                service: (ns.to_string(), name.to_string()),
                port_name: sp.name.clone(),
                service_port: port as u16,
            },
        );
    }
    Ok(backend_name)
}

fn upstream_protocol(sp: &ServicePort) -> mesh_config::UpstreamProtocol {
    match sp.app_protocol.as_deref() {
        Some("kubernetes.io/h2c" | "h2c" | "grpc") => mesh_config::UpstreamProtocol::Http2,
        _ => mesh_config::UpstreamProtocol::Http1,
    }
}

fn endpoints(
    cx: &Ctx<'_>,
    svc: &Service,
    ns: &str,
    name: &str,
    sp: &ServicePort,
    service_ports: usize,
) -> Vec<String> {
    let spec = svc.spec.as_ref();
    if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName")
        && let Some(host) = spec.and_then(|s| s.external_name.as_deref())
    {
        return vec![format!("{host}:{}", sp.port)];
    }
    let want = sp.name.as_deref().unwrap_or("");
    let mut out: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for s in cx.slices_of(ns, name) {
        let ports = s.ports.as_deref().unwrap_or(&[]);
        let port = ports
            .iter()
            .find(|p| p.name.as_deref().unwrap_or("") == want)
            .or_else(|| (ports.len() == 1 && service_ports == 1).then(|| &ports[0]))
            .and_then(|p| p.port);
        let Some(port) = port else { continue };
        for ep in s.endpoints.iter().flatten() {
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            let Some(addr) = ep.addresses.first() else {
                continue;
            };
            let e = if addr.contains(':') {
                format!("[{addr}]:{port}")
            } else {
                format!("{addr}:{port}")
            };
            if seen.insert(e.clone()) {
                out.push(e);
            }
        }
    }
    out
}

fn gateway_labels(cx: &Ctx<'_>, g: &Gw<'_>) -> BTreeMap<String, String> {
    let mut labels = cx.opts.gateway_labels.clone();
    labels.insert(GATEWAY_NAME_LABEL.into(), g.name.clone());
    if let Some(l) =
        g.gw.spec
            .infrastructure
            .as_ref()
            .and_then(|i| i.labels.as_ref())
    {
        labels.extend(l.clone());
    }
    labels
}

fn set_limit(slot: &mut Option<String>, limit: &str) -> Result<(), String> {
    match slot {
        None => {
            *slot = Some(limit.to_string());
            Ok(())
        }
        Some(existing) if existing == limit => Ok(()),
        Some(existing) => Err(existing.clone()),
    }
}

fn apply_policies(cx: &mut Ctx<'_>, gws: &[Gw<'_>], entries: &mut [Entry]) {
    for p in cx.policies_in_order() {
        let (ns, name) = ns_name(&p.metadata, &cx.opts.default_namespace);
        let ctx = format!("RateLimitPolicy {ns}/{name}");
        let problems = validate::rate_limit_policy(p);
        if !problems.is_empty() {
            for pr in problems {
                cx.warn(&ctx, format!("{pr}; the policy is not applied"));
            }
            continue;
        }
        let s = &p.spec;
        let limit_name = format!("ratelimitpolicy/{ns}/{name}");
        let limit = RateLimit {
            name: limit_name.clone(),
            max_tokens: s.max_tokens,
            tokens_per_fill: s.tokens_per_fill,
            fill_interval: mesh_config::parse_duration(&s.fill_interval).unwrap_or_default(),
            status: s.status.unwrap_or(429),
            response_headers_to_add: s
                .response_headers_to_add
                .iter()
                .map(|h| HeaderValue {
                    name: h.name.clone(),
                    value: h.value.clone(),
                })
                .collect(),
            x_ratelimit_headers: s.x_rate_limit_headers,
            mode: match s.mode {
                RateLimitPolicyMode::Local => RateLimitMode::Local,
                RateLimitPolicyMode::Distributed => RateLimitMode::Distributed {
                    instances: cx.opts.distributed_instances.max(1),
                },
            },
        };
        let mut used = false;
        let mut conflicts = Vec::new();
        for (ti, t) in s.target_refs.iter().enumerate() {
            let section = t.section_name.as_deref();
            let mut hit = false;
            match t.kind.as_str() {
                "Gateway" => {
                    for g in gws.iter().filter(|g| g.ns == ns && g.name == t.name) {
                        for l in g.listeners.iter().filter(|l| l.usable) {
                            if section.is_some_and(|s| s != l.name) {
                                continue;
                            }
                            hit = true;
                            let slot = cx.port_limits.entry(l.port).or_default();
                            let mut o = (!slot.is_empty()).then(|| slot.clone());
                            if let Err(e) = set_limit(&mut o, &limit_name) {
                                conflicts.push(format!("port {} already limited by {e}", l.port));
                            } else {
                                *slot = limit_name.clone();
                            }
                            if g.listeners
                                .iter()
                                .filter(|o| o.usable && o.port == l.port)
                                .count()
                                > 1
                                && section.is_some()
                            {
                                cx.warnings.push(Warning::new(
                                    &ctx,
                                    format!(
                                        "spec.targetRefs[{ti}]: listener {} shares port {} with other listeners; the limit applies to the whole port",
                                        l.name, l.port
                                    ),
                                ));
                            }
                        }
                    }
                }
                "HTTPRoute" => {
                    for e in entries.iter_mut().filter(|e| {
                        e.source.0 == ns
                            && e.source.1 == t.name
                            && section.is_none_or(|s| e.rule_name.as_deref() == Some(s))
                    }) {
                        hit = true;
                        if let Err(x) = set_limit(&mut e.route.rate_limit, &limit_name) {
                            conflicts
                                .push(format!("route {} already limited by {x}", e.route.name));
                        }
                    }
                }
                _ => {
                    for b in cx.backends.values_mut().filter(|b| {
                        b.service.0 == ns
                            && b.service.1 == t.name
                            && section.is_none_or(|s| b.port_name.as_deref() == Some(s))
                    }) {
                        hit = true;
                        if let Err(x) = set_limit(&mut b.backend.rate_limit, &limit_name) {
                            conflicts
                                .push(format!("backend {} already limited by {x}", b.backend.name));
                        }
                    }
                }
            }
            if !hit {
                cx.warnings.push(Warning::new(
                    &ctx,
                    format!(
                        "spec.targetRefs[{ti}]: {} {ns}/{}{} is not served by this proxy (not found, not attached, or not referenced by a route); nothing to limit there",
                        t.kind,
                        t.name,
                        section.map(|s| format!(" section {s}")).unwrap_or_default()
                    ),
                ));
            }
            used |= hit;
        }
        for c in conflicts {
            cx.warn(
                &ctx,
                format!("{c} (the oldest policy wins); not applied there"),
            );
        }
        if used {
            cx.rate_limits.insert(limit_name, limit);
        }
    }
}

pub(crate) fn fmt_labels(l: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> = l.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!("{{{}}}", parts.join(", "))
}

fn apply_envoy_filters(cx: &mut Ctx<'_>, gws: &[Gw<'_>]) {
    let mut filters: Vec<_> = cx.res.envoy_filters.iter().collect();
    let root = |ns: &str| cx.opts.root_namespaces.iter().any(|r| r == ns);
    filters.sort_by_key(|f| {
        let (ns, name) = ns_name(&f.metadata, &cx.opts.default_namespace);
        (!root(&ns), f.spec.priority.unwrap_or(0), ns, name)
    });
    for ef in filters {
        let (ns, name) = ns_name(&ef.metadata, &cx.opts.default_namespace);
        let ctx = format!("EnvoyFilter {ns}/{name}");
        let extracted = crate::istio::local_rate_limits(ef);
        for w in &extracted.warnings {
            cx.warn(&ctx, w.to_string());
        }
        if !extracted.errors.is_empty() {
            for e in &extracted.errors {
                cx.warn(&ctx, format!("{e}; the EnvoyFilter is not applied"));
            }
            continue;
        }
        let in_root = cx.opts.root_namespaces.contains(&ns);
        let selector = ef.spec.workload_selector.as_ref().map(|s| s.labels.clone());
        for p in extracted.patches.iter().filter(|p| p.enforced) {
            let base = format!("envoyfilter/{ns}/{name}/{}", p.index);
            let pctx = format!("{ctx}: spec.configPatches[{}]", p.index);
            let fill = mesh_config::format_duration(p.fill_interval);
            let limit = |name: String, n: u64| RateLimit {
                name,
                max_tokens: p.max_tokens * n,
                tokens_per_fill: p.tokens_per_fill * n,
                fill_interval: p.fill_interval,
                status: p.status,
                response_headers_to_add: p.response_headers_to_add.clone(),
                x_ratelimit_headers: p.x_ratelimit_headers,
                mode: RateLimitMode::Local,
            };
            match p.context {
                PatchContext::Gateway | PatchContext::Any => {
                    let mut applied = Vec::new();
                    for g in gws.iter().filter(|g| in_root || g.ns == ns) {
                        let labels = gateway_labels(cx, g);
                        if selector
                            .as_ref()
                            .is_some_and(|s| s.iter().any(|(k, v)| labels.get(k) != Some(v)))
                        {
                            continue;
                        }
                        for l in g.listeners.iter().filter(|l| l.usable) {
                            if p.port.is_some_and(|port| port != u32::from(l.port)) {
                                continue;
                            }
                            match cx.port_limits.get(&l.port) {
                                Some(existing) if *existing != base => cx.warnings.push(Warning::new(
                                    &pctx,
                                    format!("port {} is already limited by {existing}; not applied there", l.port),
                                )),
                                _ => {
                                    cx.port_limits.insert(l.port, base.clone());
                                    applied.push(format!("{}/{} port {}", g.ns, g.name, l.port));
                                }
                            }
                        }
                    }
                    applied.dedup();
                    if applied.is_empty() {
                        cx.warn(
                            &pctx,
                            format!(
                                "context {}: the workloadSelector {} selects no Gateway served by this proxy (labels {}); nothing to limit",
                                p.context.as_str(),
                                selector.as_ref().map(fmt_labels).unwrap_or_else(|| "(none)".into()),
                                fmt_labels(&cx.opts.gateway_labels)
                            ),
                        );
                    } else {
                        cx.rate_limits.insert(base.clone(), limit(base.clone(), 1));
                        cx.warn(
                            &pctx,
                            format!(
                                "context {}: local rate limit ({} tokens, {} per {fill}) applied at gateway listener scope: {}",
                                p.context.as_str(),
                                p.max_tokens,
                                p.tokens_per_fill,
                                applied.join(", ")
                            ),
                        );
                    }
                }
                PatchContext::SidecarInbound => {
                    // service → (backend names, distinct endpoints)
                    let mut services: BTreeMap<(String, String), (Vec<String>, BTreeSet<String>)> =
                        BTreeMap::new();
                    for (bn, b) in &cx.backends {
                        if !(in_root || b.service.0 == ns) {
                            continue;
                        }
                        if let Some(port) = p.port {
                            let target_match = b.backend.endpoints.iter().any(|e| {
                                e.rsplit_once(':')
                                    .and_then(|(_, pt)| pt.parse::<u32>().ok())
                                    == Some(port)
                            });
                            if u32::from(b.service_port) != port && !target_match {
                                continue;
                            }
                        }
                        let s = services.entry(b.service.clone()).or_default();
                        s.0.push(bn.clone());
                        for e in &b.backend.endpoints {
                            let host = e.rsplit_once(':').map(|(h, _)| h).unwrap_or(e);
                            s.1.insert(host.to_string());
                        }
                    }
                    let mut applied = Vec::new();
                    for ((sns, sname), (bns, eps)) in services {
                        let n = eps.len().max(1) as u64;
                        let lname = format!("{base}/{sns}/{sname}");
                        let mut any = false;
                        for bn in &bns {
                            let b = cx.backends.get_mut(bn).expect("listed above");
                            if let Err(x) = set_limit(&mut b.backend.rate_limit, &lname) {
                                cx.warnings.push(Warning::new(
                                    &pctx,
                                    format!(
                                        "backend {bn} is already limited by {x}; not applied there"
                                    ),
                                ));
                            } else {
                                any = true;
                            }
                        }
                        if any {
                            cx.rate_limits.insert(lname.clone(), limit(lname, n));
                            applied.push(format!(
                                "{sns}/{sname} ({} endpoint{} → {} tokens, {} per {fill})",
                                eps.len(),
                                if eps.len() == 1 { "" } else { "s" },
                                p.max_tokens * n,
                                p.tokens_per_fill * n
                            ));
                        }
                    }
                    let sel = match &selector {
                        Some(s) => {
                            let selects_gateway = gws.iter().any(|g| {
                                let labels = gateway_labels(cx, g);
                                s.iter().all(|(k, v)| labels.get(k) == Some(v))
                            });
                            if selects_gateway {
                                format!(
                                    "its workloadSelector {} selects the ingress gateway, which has no SIDECAR_INBOUND listener (in Istio this patch applies to nothing there); the selector is not used",
                                    fmt_labels(s)
                                )
                            } else {
                                format!(
                                    "its workloadSelector {} is not used (there are no sidecars yet to select)",
                                    fmt_labels(s)
                                )
                            }
                        }
                        None => "it has no workloadSelector".to_string(),
                    };
                    let scope = if in_root {
                        "every namespace (root namespace)".to_string()
                    } else {
                        format!("namespace {ns}")
                    };
                    if applied.is_empty() {
                        cx.warn(
                            &pctx,
                            format!(
                                "context SIDECAR_INBOUND: {sel}; emulated at backend scope, but no backend Service in {scope} is used by a route; nothing to limit"
                            ),
                        );
                    } else {
                        cx.warn(
                            &pctx,
                            format!(
                                "context SIDECAR_INBOUND: {sel}. There are no sidecars yet, so the per-pod inbound limit is emulated at backend scope: one bucket per backend Service in {scope}, its capacity and fill multiplied by the Service's endpoint count (one sidecar bucket per pod in Istio): {}",
                                applied.join(", ")
                            ),
                        );
                    }
                }
                PatchContext::SidecarOutbound => cx.warn(
                    &pctx,
                    "context SIDECAR_OUTBOUND: there are no sidecars yet; not applied",
                ),
            }
        }
    }
}

fn build_listeners(cx: &mut Ctx<'_>, gws: &[Gw<'_>], entries: Vec<Entry>) -> Vec<Listener> {
    // port → gateway listener names
    let mut ports: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for g in gws {
        for l in g.listeners.iter().filter(|l| l.usable) {
            ports
                .entry(l.port)
                .or_default()
                .push(format!("{}/{}/{}", g.ns, g.name, l.name));
        }
    }
    let mut by_port: BTreeMap<u16, Vec<Entry>> = BTreeMap::new();
    for e in entries {
        by_port.entry(e.port).or_default().push(e);
    }
    let mut listeners = Vec::new();
    for (port, names) in ports {
        let entries = by_port.remove(&port).unwrap_or_default();
        let mut hosts: Vec<&String> = entries.iter().flat_map(|e| &e.hostnames).collect();
        hosts.sort_by_key(|h| hostname::specificity(h));
        hosts.dedup();
        let mut used_names = BTreeSet::new();
        let mut virtual_hosts = Vec::new();
        for h in hosts {
            let mut members: Vec<(_, &PrecedenceKey, usize)> = entries
                .iter()
                .enumerate()
                .filter_map(|(i, e)| {
                    e.hostnames
                        .iter()
                        .filter(|eh| hostname::matches(eh, h))
                        .map(|eh| hostname::specificity(eh))
                        .min()
                        .map(|s| (s, &e.key, i))
                })
                .collect();
            members.sort();
            let mut routes = Vec::new();
            let mut in_vhost = BTreeSet::new();
            for (_, _, i) in members {
                // The same route match attached through two listeners of this port: once.
                if !in_vhost.insert(entries[i].route.name.as_str()) {
                    continue;
                }
                let mut r = entries[i].route.clone();
                // Route names are unique per listener: a route keeps its name in the virtual
                // host of its own (first) hostname and gets `@host` elsewhere.
                let own = entries[i].hostnames.contains(h);
                if !own || !used_names.insert(r.name.clone()) {
                    r.name = format!("{}@{h}", r.name);
                    used_names.insert(r.name.clone());
                }
                routes.push(r);
            }
            virtual_hosts.push(VirtualHost {
                name: h.clone(),
                hostnames: vec![h.clone()],
                routes,
            });
        }
        let name = if names.len() == 1 {
            names[0].clone()
        } else {
            format!("port-{port}")
        };
        listeners.push(Listener {
            name,
            address: None,
            port,
            kind: ListenerKind::Gateway,
            protocol: ListenerProtocol::Http,
            virtual_hosts,
            rate_limit: cx.port_limits.get(&port).cloned().filter(|s| !s.is_empty()),
            limits: Default::default(),
            services: Vec::new(),
            inbound_ports: Vec::new(),
        });
    }
    listeners
}

/// The proxy's HTTP options from the install profiles: `meshConfig.pathNormalization` (the
/// first profile, by namespace and name, that sets it wins).
fn http_options(cx: &mut Ctx<'_>) -> HttpOptions {
    let mut ops: Vec<_> = cx.res.operators.iter().collect();
    ops.sort_by_key(|o| ns_name(&o.metadata, &cx.opts.default_namespace));
    let mut chosen: Option<(PathNormalization, String)> = None;
    let mut warnings = Vec::new();
    for op in ops {
        let Some(n) = op.path_normalization() else {
            continue;
        };
        let (ns, name) = ns_name(&op.metadata, &cx.opts.default_namespace);
        let ctx = format!(
            "{} {ns}/{name}",
            if op.kind.is_empty() {
                "IstioOperator"
            } else {
                op.kind.as_str()
            }
        );
        match &chosen {
            None => chosen = Some((n, ctx)),
            Some((c, first)) if *c != n => warnings.push((
                ctx,
                format!(
                    "pathNormalization {} ignored: {first} already sets {}",
                    n.as_str(),
                    c.as_str()
                ),
            )),
            _ => {}
        }
    }
    for (ctx, w) in warnings {
        cx.warn(&ctx, w);
    }
    HttpOptions {
        path_normalization: chosen.map(|(n, _)| n),
        ..HttpOptions::default()
    }
    .or(&cx.opts.http)
}

pub(crate) fn access_log(cx: &mut Ctx<'_>) -> AccessLog {
    let mut path: Option<(String, String)> = None;
    let mut ops: Vec<_> = cx.res.operators.iter().collect();
    ops.sort_by_key(|o| ns_name(&o.metadata, &cx.opts.default_namespace));
    for op in ops {
        let (ns, name) = ns_name(&op.metadata, &cx.opts.default_namespace);
        let kind = if op.kind.is_empty() {
            "IstioOperator"
        } else {
            op.kind.as_str()
        };
        let ctx = format!("{kind} {ns}/{name}");
        let file = op.access_log_file();
        let used = match file {
            Some(f) => format!("spec.meshConfig.accessLogFile → access log {f}"),
            None => "no spec.meshConfig.accessLogFile → access log off".to_string(),
        };
        cx.warn(
            &ctx,
            format!(
                "the proxy only uses spec.meshConfig.accessLogFile ({used}) and spec.meshConfig.pathNormalization; the rest (profile, values, components, other meshConfig) is the installer's business (meshctl install)"
            ),
        );
        if let Some(f) = file {
            match &path {
                None => path = Some((f.to_string(), ctx)),
                Some((p, first)) if p != f => cx.warn(
                    &ctx,
                    format!("accessLogFile {f} ignored: {first} already sets {p}"),
                ),
                _ => {}
            }
        }
    }
    AccessLog {
        path: path.map(|(p, _)| p),
    }
}
