//! One HTTPRoute's rules → the proxy's routes: matches, the rule's action (redirect or
//! weighted backends), filters and timeouts, each with its precedence key.

use std::collections::BTreeSet;

use gateway_api::apis::standard::httproutes::{
    HttpRoute, HttpRouteRules, HttpRouteRulesFilters, HttpRouteRulesMatches,
    HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesPathType,
    HttpRouteRulesMatchesQueryParamsType,
};
use mesh_config::{
    BackendTarget, Filter, Forward, HeaderMatch, PathMatch, QueryParamMatch, Route, RouteAction,
    RouteMatch, StringMatch, Timeouts, WeightedBackend,
};

use super::Ctx;
use super::backends::resolve_backend;
use super::filters::convert_filters;
use crate::precedence::PrecedenceKey;
use crate::status::Reason;
use crate::typed::backend_filter_as_rule_filter;

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
