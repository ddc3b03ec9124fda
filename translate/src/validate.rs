//! Object-local checks of values serde cannot check (what the API server's CEL rules and our
//! support matrix say), with field paths. The loader reports them as errors; the translator
//! rejects an object that fails them (with status and warnings).

use gateway_api::apis::standard::gateways::Gateway;
use gateway_api::apis::standard::httproutes::{
    HttpRoute, HttpRouteRulesFilters, HttpRouteRulesFiltersType as Ft,
    HttpRouteRulesMatchesPathType,
};
use std::collections::BTreeSet;

use crate::FieldProblem;
use crate::istio::IstioOperator;
use crate::policy::RateLimitPolicy;
use crate::typed::backend_filter_as_rule_filter;

type Problems = Vec<FieldProblem>;

fn push(out: &mut Problems, path: String, message: impl Into<String>) {
    out.push(FieldProblem::new(path, message));
}

fn valid_hostname(h: &str) -> bool {
    mesh_config::check_hostname(h).is_ok()
}

fn valid_header_name(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

fn check_port(out: &mut Problems, path: String, port: Option<i32>) {
    if let Some(p) = port
        && !(1..=65535).contains(&p)
    {
        push(out, path, format!("{p} is not a port (1-65535)"));
    }
}

fn check_regex(out: &mut Problems, path: String, re: &str) {
    if let Err(e) = regex::Regex::new(re) {
        push(out, path, format!("invalid regular expression: {e}"));
    }
}

pub(crate) fn gateway(gw: &Gateway) -> Problems {
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    for (i, l) in gw.spec.listeners.iter().enumerate() {
        let p = format!("spec.listeners[{i}]");
        if !names.insert(l.name.as_str()) {
            push(
                &mut out,
                format!("{p}.name"),
                format!("duplicate listener name {:?}", l.name),
            );
        }
        check_port(&mut out, format!("{p}.port"), Some(l.port));
        if let Some(h) = &l.hostname
            && let Err(m) = mesh_config::check_hostname(h)
        {
            push(&mut out, format!("{p}.hostname"), m);
        }
    }
    out
}

pub(crate) fn http_route(r: &HttpRoute) -> Problems {
    let mut out = Vec::new();
    for (i, h) in r.spec.hostnames.iter().flatten().enumerate() {
        if let Err(m) = mesh_config::check_hostname(h) {
            push(&mut out, format!("spec.hostnames[{i}]"), m);
        }
    }
    for (i, p) in r.spec.parent_refs.iter().flatten().enumerate() {
        check_port(&mut out, format!("spec.parentRefs[{i}].port"), p.port);
    }
    for (ri, rule) in r.spec.rules.iter().flatten().enumerate() {
        let rp = format!("spec.rules[{ri}]");
        let mut all_prefix = true;
        for (mi, m) in rule.matches.iter().flatten().enumerate() {
            let mp = format!("{rp}.matches[{mi}]");
            if let Some(path) = &m.path {
                let ty = path
                    .r#type
                    .clone()
                    .unwrap_or(HttpRouteRulesMatchesPathType::PathPrefix);
                let value = path.value.as_deref().unwrap_or("/");
                match ty {
                    HttpRouteRulesMatchesPathType::RegularExpression => {
                        all_prefix = false;
                        check_regex(&mut out, format!("{mp}.path.value"), value);
                    }
                    t => {
                        if t != HttpRouteRulesMatchesPathType::PathPrefix {
                            all_prefix = false;
                        }
                        if !value.starts_with('/') {
                            push(
                                &mut out,
                                format!("{mp}.path.value"),
                                format!("{value:?} must start with '/'"),
                            );
                        }
                        if value.contains("//")
                            || value.contains("/./")
                            || value.contains("/../")
                            || value.contains('#')
                            || value.contains('?')
                        {
                            push(
                                &mut out,
                                format!("{mp}.path.value"),
                                format!("{value:?} is not a normalized path"),
                            );
                        }
                    }
                }
            }
            for (hi, h) in m.headers.iter().flatten().enumerate() {
                if !valid_header_name(&h.name) {
                    push(
                        &mut out,
                        format!("{mp}.headers[{hi}].name"),
                        format!("{:?} is not a header name", h.name),
                    );
                }
                if matches!(
                    h.r#type,
                    Some(gateway_api::apis::standard::httproutes::HttpRouteRulesMatchesHeadersType::RegularExpression)
                ) {
                    check_regex(&mut out, format!("{mp}.headers[{hi}].value"), &h.value);
                }
            }
            for (qi, q) in m.query_params.iter().flatten().enumerate() {
                if q.name.is_empty() {
                    push(
                        &mut out,
                        format!("{mp}.queryParams[{qi}].name"),
                        "must not be empty",
                    );
                }
                if matches!(
                    q.r#type,
                    Some(gateway_api::apis::standard::httproutes::HttpRouteRulesMatchesQueryParamsType::RegularExpression)
                ) {
                    check_regex(&mut out, format!("{mp}.queryParams[{qi}].value"), &q.value);
                }
            }
        }
        check_filters(
            &mut out,
            &format!("{rp}.filters"),
            rule.filters.as_deref().unwrap_or(&[]),
            all_prefix,
            true,
        );
        for (bi, b) in rule.backend_refs.iter().flatten().enumerate() {
            let bp = format!("{rp}.backendRefs[{bi}]");
            check_port(&mut out, format!("{bp}.port"), b.port);
            if let Some(w) = b.weight
                && !(0..=1_000_000).contains(&w)
            {
                push(
                    &mut out,
                    format!("{bp}.weight"),
                    format!("{w} is not within 0..=1000000"),
                );
            }
            let filters: Vec<HttpRouteRulesFilters> = b
                .filters
                .iter()
                .flatten()
                .map(backend_filter_as_rule_filter)
                .collect();
            check_filters(
                &mut out,
                &format!("{bp}.filters"),
                &filters,
                all_prefix,
                false,
            );
        }
        if let Some(t) = &rule.timeouts {
            let mut parsed = [None, None];
            for (k, (f, v)) in [
                ("request", &t.request),
                ("backendRequest", &t.backend_request),
            ]
            .into_iter()
            .enumerate()
            {
                if let Some(v) = v {
                    match mesh_config::parse_duration(v) {
                        Ok(d) => parsed[k] = Some(d),
                        Err(e) => push(&mut out, format!("{rp}.timeouts.{f}"), e),
                    }
                }
            }
            if let [Some(req), Some(be)] = parsed
                && !req.is_zero()
                && (be.is_zero() || be > req)
            {
                push(
                    &mut out,
                    format!("{rp}.timeouts.backendRequest"),
                    "must not be longer than timeouts.request",
                );
            }
        }
    }
    out
}

fn check_filters(
    out: &mut Problems,
    path: &str,
    filters: &[HttpRouteRulesFilters],
    all_prefix: bool,
    rule_level: bool,
) {
    let mut seen = BTreeSet::new();
    let mut has_redirect = false;
    let mut has_rewrite = false;
    for (fi, f) in filters.iter().enumerate() {
        let fp = format!("{path}[{fi}]");
        let (name, field_set) = match f.r#type {
            Ft::RequestHeaderModifier => {
                ("requestHeaderModifier", f.request_header_modifier.is_some())
            }
            Ft::ResponseHeaderModifier => (
                "responseHeaderModifier",
                f.response_header_modifier.is_some(),
            ),
            Ft::RequestMirror => ("requestMirror", f.request_mirror.is_some()),
            Ft::RequestRedirect => ("requestRedirect", f.request_redirect.is_some()),
            Ft::UrlRewrite => ("urlRewrite", f.url_rewrite.is_some()),
            Ft::ExtensionRef => ("extensionRef", f.extension_ref.is_some()),
            Ft::Cors => ("cors", f.cors.is_some()),
        };
        if !field_set {
            push(
                out,
                format!("{fp}.{name}"),
                format!("required for type {:?}", f.r#type),
            );
        }
        let set_count = [
            f.request_header_modifier.is_some(),
            f.response_header_modifier.is_some(),
            f.request_mirror.is_some(),
            f.request_redirect.is_some(),
            f.url_rewrite.is_some(),
            f.extension_ref.is_some(),
            f.cors.is_some(),
        ]
        .into_iter()
        .filter(|b| *b)
        .count();
        if set_count > 1 || (set_count == 1 && !field_set) {
            push(
                out,
                fp.clone(),
                format!("only the field of type {:?} may be set", f.r#type),
            );
        }
        if !matches!(f.r#type, Ft::RequestMirror | Ft::ExtensionRef) && !seen.insert(name) {
            push(
                out,
                format!("{fp}.type"),
                format!("{:?} may appear only once", f.r#type),
            );
        }
        match f.r#type {
            Ft::ExtensionRef => push(
                out,
                format!("{fp}.type"),
                "ExtensionRef filters are not supported by meshctl",
            ),
            Ft::Cors => push(
                out,
                format!("{fp}.type"),
                "CORS filters are not supported by meshctl",
            ),
            Ft::RequestRedirect if !rule_level => push(
                out,
                format!("{fp}.type"),
                "RequestRedirect is not supported on a backendRef (only on the rule)",
            ),
            Ft::RequestMirror if !rule_level => push(
                out,
                format!("{fp}.type"),
                "RequestMirror is not supported on a backendRef (only on the rule)",
            ),
            _ => {}
        }
        for (m, mp) in [
            (
                f.request_header_modifier.as_ref().map(serde_json::to_value),
                "requestHeaderModifier",
            ),
            (
                f.response_header_modifier
                    .as_ref()
                    .map(serde_json::to_value),
                "responseHeaderModifier",
            ),
        ] {
            let Some(Ok(m)) = m else { continue };
            check_modifier(out, &format!("{fp}.{mp}"), &m);
        }
        if let Some(r) = &f.request_redirect {
            has_redirect = true;
            if let Some(s) = r.status_code
                && ![301, 302, 303, 307, 308].contains(&s)
            {
                push(
                    out,
                    format!("{fp}.requestRedirect.statusCode"),
                    format!("{s} is not 301, 302, 303, 307 or 308"),
                );
            }
            check_port(out, format!("{fp}.requestRedirect.port"), r.port);
            if let Some(h) = &r.hostname
                && !valid_hostname(h)
            {
                push(
                    out,
                    format!("{fp}.requestRedirect.hostname"),
                    format!("{h:?} is not a hostname"),
                );
            }
            if let Some(p) = &r.path {
                let v = serde_json::to_value(p).unwrap_or_default();
                check_path_modifier(out, &format!("{fp}.requestRedirect.path"), &v, all_prefix);
            }
        }
        if let Some(u) = &f.url_rewrite {
            has_rewrite = true;
            if let Some(h) = &u.hostname
                && !valid_hostname(h)
            {
                push(
                    out,
                    format!("{fp}.urlRewrite.hostname"),
                    format!("{h:?} is not a hostname"),
                );
            }
            if let Some(p) = &u.path {
                let v = serde_json::to_value(p).unwrap_or_default();
                check_path_modifier(out, &format!("{fp}.urlRewrite.path"), &v, all_prefix);
            }
        }
        if let Some(m) = &f.request_mirror {
            let mp = format!("{fp}.requestMirror");
            check_port(out, format!("{mp}.backendRef.port"), m.backend_ref.port);
            if m.percent.is_some() && m.fraction.is_some() {
                push(
                    out,
                    mp.clone(),
                    "percent and fraction are mutually exclusive",
                );
            }
            if let Some(p) = m.percent
                && !(0..=100).contains(&p)
            {
                push(
                    out,
                    format!("{mp}.percent"),
                    format!("{p} is not within 0..=100"),
                );
            }
            if let Some(fr) = &m.fraction {
                let den = fr.denominator.unwrap_or(100);
                if den <= 0 || fr.numerator < 0 || fr.numerator > den {
                    push(
                        out,
                        format!("{mp}.fraction"),
                        "needs 0 <= numerator <= denominator, denominator > 0",
                    );
                }
            }
        }
    }
    if has_redirect && has_rewrite {
        push(
            out,
            path.to_string(),
            "RequestRedirect and URLRewrite cannot be used together",
        );
    }
}

/// `m` is a serialized header modifier `{set?, add?, remove?}`.
fn check_modifier(out: &mut Problems, path: &str, m: &serde_json::Value) {
    for list in ["set", "add"] {
        for (i, h) in m
            .get(list)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
            .enumerate()
        {
            let n = h.get("name").and_then(|v| v.as_str()).unwrap_or("");
            let v = h.get("value").and_then(|v| v.as_str()).unwrap_or("");
            if !valid_header_name(n) {
                push(
                    out,
                    format!("{path}.{list}[{i}].name"),
                    format!("{n:?} is not a header name"),
                );
            }
            if v.bytes().any(|c| c == b'\r' || c == b'\n' || c == 0) {
                push(
                    out,
                    format!("{path}.{list}[{i}].value"),
                    "must not contain CR, LF or NUL",
                );
            }
        }
    }
    for (i, n) in m
        .get("remove")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let n = n.as_str().unwrap_or("");
        if !valid_header_name(n) {
            push(
                out,
                format!("{path}.remove[{i}]"),
                format!("{n:?} is not a header name"),
            );
        }
    }
}

/// `v` is a serialized `{type, replaceFullPath?, replacePrefixMatch?}`.
fn check_path_modifier(out: &mut Problems, path: &str, v: &serde_json::Value, all_prefix: bool) {
    let ty = v.get("type").and_then(|t| t.as_str()).unwrap_or("");
    let (field, other) = match ty {
        "ReplaceFullPath" => ("replaceFullPath", "replacePrefixMatch"),
        _ => ("replacePrefixMatch", "replaceFullPath"),
    };
    match v.get(field).and_then(|t| t.as_str()) {
        None => push(
            out,
            format!("{path}.{field}"),
            format!("required for type {ty}"),
        ),
        Some(s) if !s.starts_with('/') => push(
            out,
            format!("{path}.{field}"),
            format!("{s:?} must start with '/'"),
        ),
        _ => {}
    }
    if v.get(other).is_some_and(|o| !o.is_null()) {
        push(
            out,
            format!("{path}.{other}"),
            format!("must not be set for type {ty}"),
        );
    }
    if ty == "ReplacePrefixMatch" && !all_prefix {
        push(
            out,
            format!("{path}.type"),
            "ReplacePrefixMatch needs every match of the rule to be a PathPrefix",
        );
    }
}

pub(crate) fn rate_limit_policy(p: &RateLimitPolicy) -> Problems {
    let mut out = Vec::new();
    let s = &p.spec;
    if s.target_refs.is_empty() {
        push(
            &mut out,
            "spec.targetRefs".into(),
            "at least one target is required",
        );
    }
    for (i, t) in s.target_refs.iter().enumerate() {
        let ok = matches!(
            (t.group.as_str(), t.kind.as_str()),
            ("gateway.networking.k8s.io", "Gateway" | "HTTPRoute") | ("" | "core", "Service")
        );
        if !ok {
            push(
                &mut out,
                format!("spec.targetRefs[{i}]"),
                format!(
                    "group {:?} kind {:?} is not supported (Gateway or HTTPRoute in gateway.networking.k8s.io, Service in \"\")",
                    t.group, t.kind
                ),
            );
        }
    }
    if s.max_tokens == 0 {
        push(&mut out, "spec.maxTokens".into(), "must be at least 1");
    }
    if s.tokens_per_fill == 0 {
        push(&mut out, "spec.tokensPerFill".into(), "must be at least 1");
    }
    match mesh_config::parse_duration(&s.fill_interval) {
        Ok(d) if d < std::time::Duration::from_millis(50) => push(
            &mut out,
            "spec.fillInterval".into(),
            "must be at least 50ms",
        ),
        Ok(_) => {}
        Err(e) => push(&mut out, "spec.fillInterval".into(), e),
    }
    if let Some(st) = s.status
        && !(400..=599).contains(&st)
    {
        push(
            &mut out,
            "spec.status".into(),
            format!("{st} is not a 4xx or 5xx status"),
        );
    }
    for (i, h) in s.response_headers_to_add.iter().enumerate() {
        if !valid_header_name(&h.name) {
            push(
                &mut out,
                format!("spec.responseHeadersToAdd[{i}].name"),
                format!("{:?} is not a header name", h.name),
            );
        }
        if h.value.bytes().any(|c| c == b'\r' || c == b'\n' || c == 0) {
            push(
                &mut out,
                format!("spec.responseHeadersToAdd[{i}].value"),
                "must not contain CR, LF or NUL",
            );
        }
    }
    out
}

pub(crate) fn operator(op: &IstioOperator) -> Problems {
    let mut out = Vec::new();
    if let Some(v) = op.spec.pointer("/meshConfig/accessLogFile")
        && !v.is_string()
        && !v.is_null()
    {
        push(
            &mut out,
            "spec.meshConfig.accessLogFile".into(),
            "must be a string (a path, or /dev/stdout)",
        );
    }
    if let Some(v) = op
        .spec
        .pointer("/meshConfig/trustDomain")
        .filter(|v| !v.is_null())
    {
        let problem = match v.as_str() {
            Some(td) => mesh_config::identity::check_trust_domain(td)
                .err()
                .map(|e| e.to_string()),
            None => Some(format!(
                "must be a trust domain: {}",
                mesh_config::identity::TRUST_DOMAIN_RULE
            )),
        };
        if let Some(problem) = problem {
            push(&mut out, "spec.meshConfig.trustDomain".into(), problem);
        }
    }
    if let Some(v) = op
        .spec
        .pointer("/meshConfig/pathNormalization/normalization")
        .filter(|v| !v.is_null())
    {
        let parsed = v
            .as_str()
            .ok_or_else(|| "must be a string".to_string())
            .and_then(str::parse::<mesh_config::PathNormalization>);
        if let Err(e) = parsed {
            push(
                &mut out,
                "spec.meshConfig.pathNormalization.normalization".into(),
                e,
            );
        }
    }
    out
}
