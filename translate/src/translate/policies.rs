//! `RateLimitPolicy` → rate limits on gateway ports, routes and backends (the oldest policy
//! wins a conflict).

use std::collections::BTreeMap;

use mesh_config::{HeaderValue, RateLimit, RateLimitMode};

use super::Ctx;
use super::attachment::Entry;
use super::gateways::Gw;
use crate::policy::RateLimitPolicyMode;
use crate::resources::ns_name;
use crate::{Warning, validate};

pub(super) fn set_limit(slot: &mut Option<String>, limit: &str) -> Result<(), String> {
    match slot {
        None => {
            *slot = Some(limit.to_string());
            Ok(())
        }
        Some(existing) if existing == limit => Ok(()),
        Some(existing) => Err(existing.clone()),
    }
}

pub(super) fn apply_policies(cx: &mut Ctx<'_>, gws: &[Gw<'_>], entries: &mut [Entry]) {
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
