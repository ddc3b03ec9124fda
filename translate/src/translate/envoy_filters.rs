//! Istio `EnvoyFilter` local rate limits → rate limits at gateway listener scope, or (for
//! SIDECAR_INBOUND patches) emulated at backend scope.

use std::collections::{BTreeMap, BTreeSet};

use kube::core::{Selector, SelectorExt};
use mesh_config::{RateLimit, RateLimitMode};

use super::Ctx;
use super::gateways::{Gw, gateway_labels};
use super::policies::{fmt_labels, set_limit};
use crate::Warning;
use crate::istio::{LocalRateLimitPatch, PatchContext};
use crate::resources::ns_name;

/// Applies the enforced local rate limit patches of the EnvoyFilters, root namespaces first,
/// then by priority, namespace and name (so the first to limit a port or backend keeps it).
pub(super) fn apply_envoy_filters(cx: &mut Ctx<'_>, gws: &[Gw<'_>]) {
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
            let patch = Patch {
                p,
                ns: &ns,
                in_root,
                selector: &selector,
                base: format!("envoyfilter/{ns}/{name}/{}", p.index),
                pctx: format!("{ctx}: spec.configPatches[{}]", p.index),
                fill: mesh_config::format_duration(p.fill_interval),
            };
            match p.context {
                PatchContext::Gateway | PatchContext::Any => apply_at_gateways(cx, gws, &patch),
                PatchContext::SidecarInbound => apply_at_backends(cx, gws, &patch),
                PatchContext::SidecarOutbound => cx.warn(
                    &patch.pctx,
                    "context SIDECAR_OUTBOUND: there are no sidecars yet; not applied",
                ),
            }
        }
    }
}

/// One enforced local rate limit patch of an EnvoyFilter, with what applying it needs.
struct Patch<'p> {
    p: &'p LocalRateLimitPatch,
    /// The EnvoyFilter's namespace.
    ns: &'p str,
    /// The EnvoyFilter is in a root namespace: it applies to every namespace.
    in_root: bool,
    selector: &'p Option<BTreeMap<String, String>>,
    /// The name of its bucket (gateway scope), the prefix of its buckets (backend scope).
    base: String,
    /// What its warnings are about.
    pctx: String,
    /// Its fill interval, as written in warnings.
    fill: String,
}

impl Patch<'_> {
    /// The bucket `name` with the patch's capacity and fill multiplied by `n`.
    fn limit(&self, name: String, n: u64) -> RateLimit {
        let p = self.p;
        RateLimit {
            name,
            max_tokens: p.max_tokens * n,
            tokens_per_fill: p.tokens_per_fill * n,
            fill_interval: p.fill_interval,
            status: p.status,
            response_headers_to_add: p.response_headers_to_add.clone(),
            x_ratelimit_headers: p.x_ratelimit_headers,
            mode: RateLimitMode::Local,
        }
    }
}

/// Context GATEWAY (or ANY): one bucket on the port of every usable listener of the Gateways
/// the workloadSelector selects (and `match.listener.portNumber`, if set), unless a port is
/// already limited.
fn apply_at_gateways(cx: &mut Ctx<'_>, gws: &[Gw<'_>], patch: &Patch<'_>) {
    let (p, ns, in_root, selector) = (patch.p, patch.ns, patch.in_root, patch.selector);
    let (base, pctx, fill) = (&patch.base, &patch.pctx, &patch.fill);
    let mut applied = Vec::new();
    for g in gws.iter().filter(|g| in_root || g.ns == ns) {
        let labels = gateway_labels(cx, g);
        if selector
            .as_ref()
            .is_some_and(|s| !Selector::from_iter(s.clone()).matches(&labels))
        {
            continue;
        }
        for l in g.listeners.iter().filter(|l| l.usable) {
            if p.port.is_some_and(|port| port != u32::from(l.port)) {
                continue;
            }
            match cx.port_limits.get(&l.port) {
                Some(existing) if *existing != *base => cx.warnings.push(Warning::new(
                    pctx,
                    format!(
                        "port {} is already limited by {existing}; not applied there",
                        l.port
                    ),
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
            pctx,
            format!(
                "context {}: the workloadSelector {} selects no Gateway served by this proxy (labels {}); nothing to limit",
                p.context.as_str(),
                selector.as_ref().map(fmt_labels).unwrap_or_else(|| "(none)".into()),
                fmt_labels(&cx.opts.gateway_labels)
            ),
        );
    } else {
        cx.rate_limits
            .insert(base.clone(), patch.limit(base.clone(), 1));
        cx.warn(
            pctx,
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

/// Context SIDECAR_INBOUND: there are no sidecars in gateway mode, so the per-pod limit is
/// emulated on the backends of the Services in scope, one bucket per Service scaled by its
/// endpoint count.
fn apply_at_backends(cx: &mut Ctx<'_>, gws: &[Gw<'_>], patch: &Patch<'_>) {
    let (p, ns, in_root) = (patch.p, patch.ns, patch.in_root);
    let (base, pctx, fill) = (&patch.base, &patch.pctx, &patch.fill);
    let mut applied = Vec::new();
    for ((sns, sname), (bns, eps)) in services_in_scope(cx, patch) {
        let n = eps.len().max(1) as u64;
        let lname = format!("{base}/{sns}/{sname}");
        let mut any = false;
        for bn in &bns {
            let b = cx.backends.get_mut(bn).expect("listed above");
            if let Err(x) = set_limit(&mut b.backend.rate_limit, &lname) {
                cx.warnings.push(Warning::new(
                    pctx,
                    format!("backend {bn} is already limited by {x}; not applied there"),
                ));
            } else {
                any = true;
            }
        }
        if any {
            cx.rate_limits.insert(lname.clone(), patch.limit(lname, n));
            applied.push(format!(
                "{sns}/{sname} ({} endpoint{} → {} tokens, {} per {fill})",
                eps.len(),
                if eps.len() == 1 { "" } else { "s" },
                p.max_tokens * n,
                p.tokens_per_fill * n
            ));
        }
    }
    let sel = selector_note(cx, gws, patch.selector);
    let scope = if in_root {
        "every namespace (root namespace)".to_string()
    } else {
        format!("namespace {ns}")
    };
    if applied.is_empty() {
        cx.warn(
            pctx,
            format!(
                "context SIDECAR_INBOUND: {sel}; emulated at backend scope, but no backend Service in {scope} is used by a route; nothing to limit"
            ),
        );
    } else {
        cx.warn(
            pctx,
            format!(
                "context SIDECAR_INBOUND: {sel}. There are no sidecars yet, so the per-pod inbound limit is emulated at backend scope: one bucket per backend Service in {scope}, its capacity and fill multiplied by the Service's endpoint count (one sidecar bucket per pod in Istio): {}",
                applied.join(", ")
            ),
        );
    }
}

/// Service (namespace, name) → (its backends' names, its distinct endpoint addresses).
type ServiceBackends = BTreeMap<(String, String), (Vec<String>, BTreeSet<String>)>;

/// The Services in the patch's scope (its namespace, or every namespace from a root
/// namespace; with `match.listener.portNumber`, the Service or target port), with their
/// backends and endpoints.
fn services_in_scope(cx: &Ctx<'_>, patch: &Patch<'_>) -> ServiceBackends {
    let (p, ns, in_root) = (patch.p, patch.ns, patch.in_root);
    let mut services = ServiceBackends::new();
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
    services
}

/// What the warning says about the workloadSelector of a SIDECAR_INBOUND patch.
fn selector_note(
    cx: &Ctx<'_>,
    gws: &[Gw<'_>],
    selector: &Option<BTreeMap<String, String>>,
) -> String {
    match selector {
        Some(s) => {
            let selects_gateway = gws.iter().any(|g| {
                let labels = gateway_labels(cx, g);
                Selector::from_iter(s.clone()).matches(&labels)
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
    }
}
