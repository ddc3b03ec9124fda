//! Attaching HTTPRoutes to the listeners of served Gateways: parentRef resolution, the
//! route's status per parent, and one [`Entry`] per route match and port.

use gateway_api::apis::standard::httproutes::{HttpRoute, HttpRouteParentRefs};

use super::gateways::{Gw, namespace_allowed};
use super::routes::build_routes;
use super::{Ctx, GATEWAY_GROUP};
use crate::hostname;
use crate::precedence::PrecedenceKey;
use crate::resources::ns_name;
use crate::status::{Condition, ConditionType as Ct, ParentRef, Reason, RouteParentStatus};
use crate::{FieldProblem, validate};
use mesh_config::Route;

/// One route match attached to a port, with the hostnames it serves there.
pub(super) struct Entry {
    pub(super) port: u16,
    pub(super) hostnames: Vec<String>,
    pub(super) key: PrecedenceKey,
    pub(super) route: Route,
    pub(super) source: (String, String),
    pub(super) rule_name: Option<String>,
}

/// The route being attached, as its parents' statuses and the warnings name it.
struct RouteRef<'a> {
    ns: &'a str,
    name: &'a str,
    /// `HTTPRoute ns/name`, what warnings are about.
    ctx: &'a str,
    generation: Option<i64>,
    /// What validation found wrong with the route (it is then accepted by no parent).
    problems: &'a [FieldProblem],
    /// Its hostnames, lowercase.
    hosts: &'a [String],
}

/// Attaches every HTTPRoute to the listeners of the served Gateways its parentRefs name,
/// writing one status per such parent and one [`Entry`] per route match and attached port.
pub(super) fn attach_routes(
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
        let hosts: Vec<String> = r
            .spec
            .hostnames
            .iter()
            .flatten()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        let route = RouteRef {
            ns: &ns,
            name: &name,
            ctx: &ctx,
            generation,
            problems: &problems,
            hosts: &hosts,
        };
        let first_status = route_status.len();
        // (port, hostnames)
        let mut attachments: Vec<(u16, Vec<String>)> = Vec::new();
        for pr in r.spec.parent_refs.iter().flatten() {
            if let Some((parent_ref, controller, condition)) =
                attach_to_parent(cx, gws, &route, pr, &default_controller, &mut attachments)
            {
                route_status.push(RouteParentStatus {
                    route_namespace: ns.clone(),
                    route_name: name.clone(),
                    parent_ref,
                    controller_name: controller,
                    conditions: vec![condition],
                });
            }
        }
        let resolved = build_entries(cx, r, (&ns, &name), &ctx, generation, &attachments, entries);
        for s in &mut route_status[first_status..] {
            s.conditions.push(resolved.clone());
        }
    }
}

/// One parentRef of a route. A Gateway this proxy serves gets the route attached to its
/// listeners (recorded in `attachments`); the parent's status is returned as (parentRef,
/// controller, `Accepted` condition). `None` when the status is not ours to write: a mesh
/// (Service) parent, an unsupported kind, a Gateway of another class or another proxy.
fn attach_to_parent(
    cx: &mut Ctx<'_>,
    gws: &mut [Gw<'_>],
    route: &RouteRef<'_>,
    pr: &HttpRouteParentRefs,
    default_controller: &str,
    attachments: &mut Vec<(u16, Vec<String>)>,
) -> Option<(ParentRef, String, Condition)> {
    let group = pr.group.clone().unwrap_or_else(|| GATEWAY_GROUP.into());
    let kind = pr.kind.clone().unwrap_or_else(|| "Gateway".into());
    let pns = pr.namespace.clone().unwrap_or_else(|| route.ns.to_string());
    if kind == "Service" && (group.is_empty() || group == "core") {
        // A mesh (GAMMA) route: the sidecars' outbound side serves it (`translate_sidecar`),
        // a gateway does not.
        return None;
    }
    if group != GATEWAY_GROUP || kind != "Gateway" {
        cx.warn(
            route.ctx,
            format!(
                "parentRef {kind} {pns}/{}: only Gateway and Service (mesh) parents are supported; not attached",
                pr.name
            ),
        );
        return None;
    }
    let parent_ref = ParentRef {
        group,
        kind,
        namespace: pns.clone(),
        name: pr.name.clone(),
        section_name: pr.section_name.clone(),
        port: pr.port,
    };
    let Some(g) = gws.iter_mut().find(|g| g.ns == pns && g.name == pr.name) else {
        let exists = cx.res.gateways.iter().any(|g| {
            ns_name(&g.metadata, &cx.opts.default_namespace) == (pns.clone(), pr.name.clone())
        });
        if exists {
            // A Gateway of another class, or one another proxy serves.
            return None;
        }
        let m = format!("Gateway {pns}/{} does not exist", pr.name);
        cx.warn(route.ctx, format!("{m}; not attached"));
        let cond = Condition::new(
            Ct::Accepted,
            false,
            Reason::NoMatchingParent,
            m,
            route.generation,
        );
        return Some((parent_ref, default_controller.to_string(), cond));
    };
    if !route.problems.is_empty() {
        let m = route
            .problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        let cond = Condition::new(
            Ct::Accepted,
            false,
            Reason::UnsupportedValue,
            m,
            route.generation,
        );
        return Some((parent_ref, g.controller.clone(), cond));
    }
    let cond = attach_to_listeners(
        cx,
        g,
        pr,
        (route.ns, route.name),
        route.hosts,
        route.generation,
        attachments,
    );
    if !cond.status {
        cx.warn(
            route.ctx,
            format!(
                "parentRef Gateway {pns}/{}: not attached: {}",
                pr.name, cond.message
            ),
        );
    }
    Some((parent_ref, g.controller.clone(), cond))
}

/// Attaches the route to the listeners of `g` its parentRef `pr` selects (by sectionName and
/// port), that allow routes from its namespace and whose hostname intersects the route's; each
/// attachment is recorded in `attachments` as (port, hostnames). Returns the parent's
/// `Accepted` condition.
fn attach_to_listeners(
    cx: &Ctx<'_>,
    g: &mut Gw<'_>,
    pr: &HttpRouteParentRefs,
    (ns, name): (&str, &str),
    route_hosts: &[String],
    generation: Option<i64>,
    attachments: &mut Vec<(u16, Vec<String>)>,
) -> Condition {
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
                g.listeners[i].usable && namespace_allowed(cx, &g.ns, &g.gw.spec.listeners[i], ns)
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
                if let Some(hosts) = hostname::intersect(l.hostname.as_deref(), route_hosts) {
                    any = true;
                    l.attached.insert((ns.to_string(), name.to_string()));
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
}

/// The route's entries, one per route match and attachment (port, hostnames), pushed to
/// `entries`; the route's `ResolvedRefs` condition, with a warning per unresolved reference.
fn build_entries(
    cx: &mut Ctx<'_>,
    r: &HttpRoute,
    (ns, name): (&str, &str),
    ctx: &str,
    generation: Option<i64>,
    attachments: &[(u16, Vec<String>)],
    entries: &mut Vec<Entry>,
) -> Condition {
    if attachments.is_empty() {
        return Condition::new(Ct::ResolvedRefs, true, Reason::ResolvedRefs, "", generation);
    }
    let (built, ref_problems) = build_routes(cx, r, ns, name);
    for (port, hosts) in attachments {
        for (key, route, rule_name) in &built {
            entries.push(Entry {
                port: *port,
                hostnames: hosts.clone(),
                key: key.clone(),
                route: route.clone(),
                source: (ns.to_string(), name.to_string()),
                rule_name: rule_name.clone(),
            });
        }
    }
    match ref_problems.first() {
        None => Condition::new(Ct::ResolvedRefs, true, Reason::ResolvedRefs, "", generation),
        Some((reason, _)) => {
            let m = ref_problems
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            for (_, m) in &ref_problems {
                cx.warn(ctx, m.clone());
            }
            Condition::new(Ct::ResolvedRefs, false, *reason, m, generation)
        }
    }
}
