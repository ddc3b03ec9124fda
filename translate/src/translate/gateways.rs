//! The Gateways this proxy serves: their listeners (what can be served, with the listener
//! conditions), which namespaces may attach routes to them, the labels EnvoyFilters select
//! them by, and the Gateway status written back.

use std::collections::{BTreeMap, BTreeSet};

use gateway_api::apis::standard::gateways::{
    Gateway, GatewayListeners, GatewayListenersAllowedRoutesNamespacesFrom as From,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::core::{Selector, SelectorExt};
use mesh_wire::names::GATEWAY_NAME_LABEL;

use super::{Ctx, GATEWAY_GROUP};
use crate::resources::ns_name;
use crate::status::{Condition, ConditionType as Ct, GatewayStatus, ListenerStatus, Reason};

/// A Gateway listener this proxy serves.
pub(super) struct GwListener {
    pub(super) name: String,
    pub(super) port: u16,
    pub(super) hostname: Option<String>,
    /// HTTP and accepts HTTPRoute.
    pub(super) usable: bool,
    pub(super) conditions: Vec<Condition>,
    pub(super) attached: BTreeSet<(String, String)>,
}

pub(super) struct Gw<'a> {
    pub(super) ns: String,
    pub(super) name: String,
    pub(super) gw: &'a Gateway,
    pub(super) controller: String,
    pub(super) listeners: Vec<GwListener>,
}

fn gw_label(ns: &str, name: &str) -> String {
    format!("Gateway {ns}/{name}")
}

pub(super) fn served_gateways<'a>(cx: &mut Ctx<'a>) -> Vec<Gw<'a>> {
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
pub(super) fn namespace_allowed(
    cx: &Ctx<'_>,
    gw_ns: &str,
    l: &GatewayListeners,
    route_ns: &str,
) -> bool {
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
                        .map(|e| LabelSelectorRequirement {
                            key: e.key.clone(),
                            operator: e.operator.clone(),
                            values: e.values.clone(),
                        })
                        .collect()
                }),
            };
            // kube's selector semantics; one that does not convert (an unknown operator)
            // selects nothing.
            Selector::try_from(sel).is_ok_and(|s| s.matches(&labels))
        }
    }
}

pub(super) fn gateway_labels(cx: &Ctx<'_>, g: &Gw<'_>) -> BTreeMap<String, String> {
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

/// The status of every served Gateway: accepted, programmed when one of its listeners can be
/// served, and per listener its conditions and attached routes.
pub(super) fn gateway_status(gws: &[Gw<'_>]) -> Vec<GatewayStatus> {
    gws.iter()
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
        .collect()
}
