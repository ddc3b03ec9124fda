//! [`ProxyConfig::validate`]: what serde cannot check (references, patterns, values).

use std::collections::{BTreeMap, BTreeSet};

use crate::*;

/// A problem found by [`ProxyConfig::validate`], with the path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ValidationError {
    /// e.g. `listeners[0].virtualHosts[1].routes[2].action.backends[0].target`
    pub path: String,
    pub message: String,
}

impl ProxyConfig {
    /// Checks every cross-reference and value serde cannot check. Returns all problems found.
    pub fn validate(&self) -> Result<(), Vec<ValidationError>> {
        let mut errs = Vec::new();
        let mut err = |path: String, message: String| errs.push(ValidationError { path, message });

        if self.http.max_connections == Some(0) {
            err(
                "http.maxConnections".into(),
                "must be at least 1 (leave it unset for the default)".into(),
            );
        }
        for (i, u) in self.http.upgrades.iter().flatten().enumerate() {
            let p = format!("http.upgrades[{i}]");
            if u.eq_ignore_ascii_case("h2c") {
                err(
                    p,
                    "h2c upgrades are never allowed: they would tunnel HTTP/2 around routing"
                        .into(),
                );
            } else if u.is_empty()
                || !u
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._/".contains(&b))
            {
                err(
                    p,
                    format!("{u:?} is not a lowercase protocol token (e.g. websocket)"),
                );
            }
        }

        let mut backend_names = BTreeSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            let p = format!("backends[{i}]");
            if !backend_names.insert(b.name.as_str()) {
                err(
                    format!("{p}.name"),
                    format!("duplicate backend name {:?}", b.name),
                );
            }
            for (j, e) in b.endpoints.iter().enumerate() {
                if !valid_host_port(e) {
                    err(
                        format!("{p}.endpoints[{j}]"),
                        format!("{e:?} is not host:port"),
                    );
                }
            }
            for (e, id) in &b.mtls_identities {
                let ep = format!("{p}.mtlsIdentities[{e:?}]");
                if !b.endpoints.contains(e) {
                    err(
                        ep.clone(),
                        format!("{e:?} is not one of the backend's endpoints"),
                    );
                }
                if let Err(e) = crate::identity::parse_spiffe_id(id) {
                    err(ep, e.to_string());
                }
            }
        }
        if let Some(mi) = &self.mesh_identity
            && !mi.trust_bundle_pem.contains("-----BEGIN CERTIFICATE-----")
        {
            err(
                "meshIdentity.trustBundlePem".into(),
                "holds no PEM CERTIFICATE block".into(),
            );
        }
        let mut limit_names = BTreeMap::new();
        for (i, r) in self.rate_limits.iter().enumerate() {
            let p = format!("rateLimits[{i}]");
            if limit_names.insert(r.name.as_str(), i).is_some() {
                err(
                    format!("{p}.name"),
                    format!("duplicate rate limit name {:?}", r.name),
                );
            }
            if r.max_tokens == 0 {
                err(format!("{p}.maxTokens"), "must be at least 1".into());
            }
            if r.tokens_per_fill == 0 {
                err(format!("{p}.tokensPerFill"), "must be at least 1".into());
            }
            if r.fill_interval < Duration::from_millis(50) {
                err(format!("{p}.fillInterval"), "must be at least 50ms".into());
            }
            if !(100..=599).contains(&r.status) {
                err(
                    format!("{p}.status"),
                    format!("{} is not an HTTP status", r.status),
                );
            }
            if let RateLimitMode::Distributed { instances: 0 } = r.mode {
                err(format!("{p}.mode.instances"), "must be at least 1".into());
            }
            for (j, h) in r.response_headers_to_add.iter().enumerate() {
                check_header(&mut err, format!("{p}.responseHeadersToAdd[{j}]"), h);
            }
        }
        let check_limit =
            |err: &mut dyn FnMut(String, String), path: String, l: &Option<String>| {
                if let Some(l) = l
                    && !limit_names.contains_key(l.as_str())
                {
                    err(path, format!("no rate limit named {l:?}"));
                }
            };
        for (i, b) in self.backends.iter().enumerate() {
            check_limit(&mut err, format!("backends[{i}].rateLimit"), &b.rate_limit);
        }

        let mut listener_names = BTreeSet::new();
        let mut ports = BTreeSet::new();
        for (li, l) in self.listeners.iter().enumerate() {
            let lp = format!("listeners[{li}]");
            if !listener_names.insert(l.name.as_str()) {
                err(
                    format!("{lp}.name"),
                    format!("duplicate listener name {:?}", l.name),
                );
            }
            if !ports.insert((l.address.clone(), l.port)) {
                err(
                    format!("{lp}.port"),
                    format!("port {} is used twice", l.port),
                );
            }
            check_limit(&mut err, format!("{lp}.rateLimit"), &l.rate_limit);
            let mut route_names = BTreeSet::new();
            // Every route of the listener: its virtual hosts' and its mesh Services'.
            let mut routes: Vec<(String, &Route)> = Vec::new();
            for (vi, vh) in l.virtual_hosts.iter().enumerate() {
                let vp = format!("{lp}.virtualHosts[{vi}]");
                for (hi, h) in vh.hostnames.iter().enumerate() {
                    // `*`: the catch-all virtual host.
                    if h != "*"
                        && let Err(m) = check_hostname(h)
                    {
                        err(format!("{vp}.hostnames[{hi}]"), m);
                    }
                }
                for (ri, r) in vh.routes.iter().enumerate() {
                    routes.push((format!("{vp}.routes[{ri}]"), r));
                }
            }
            let mut destinations = BTreeSet::new();
            for (si, svc) in l.services.iter().enumerate() {
                let sp = format!("{lp}.services[{si}]");
                if svc.port == 0 {
                    err(format!("{sp}.port"), "must not be 0".into());
                }
                for (ai, a) in svc.addresses.iter().enumerate() {
                    match a.parse::<std::net::IpAddr>() {
                        Ok(ip) => {
                            if !destinations.insert((ip, svc.port)) {
                                err(
                                    format!("{sp}.addresses[{ai}]"),
                                    format!("{a}:{} is used by two services", svc.port),
                                );
                            }
                        }
                        Err(_) => err(
                            format!("{sp}.addresses[{ai}]"),
                            format!("{a:?} is not an IP address"),
                        ),
                    }
                }
                if let Some(b) = &svc.tcp_backend
                    && !backend_names.contains(b.as_str())
                {
                    err(
                        format!("{sp}.tcpBackend"),
                        format!("no backend named {b:?}"),
                    );
                }
                for (ri, r) in svc.routes.iter().enumerate() {
                    routes.push((format!("{sp}.routes[{ri}]"), r));
                }
            }
            let mut inbound_ports = BTreeSet::new();
            for (pi, ip) in l.inbound_ports.iter().enumerate() {
                let pp = format!("{lp}.inboundPorts[{pi}]");
                if !inbound_ports.insert(ip.port) {
                    err(
                        format!("{pp}.port"),
                        format!("port {} is listed twice", ip.port),
                    );
                }
                check_limit(&mut err, format!("{pp}.rateLimit"), &ip.rate_limit);
            }
            for (dst, id) in &l.passthrough_identities {
                let p = format!("{lp}.passthroughIdentities[{dst:?}]");
                if l.kind != ListenerKind::SidecarOutbound {
                    err(
                        p.clone(),
                        "only a sidecarOutbound listener passes through".into(),
                    );
                }
                if dst.parse::<std::net::SocketAddr>().is_err() {
                    err(p.clone(), format!("{dst:?} is not ip:port"));
                }
                if !crate::identity::is_spiffe_id(id) {
                    err(
                        p,
                        format!("{id:?} is not spiffe://<trust domain>/ns/<namespace>/sa/<name>"),
                    );
                }
            }
            if l.mtls.is_some() && l.kind == ListenerKind::SidecarOutbound {
                err(
                    format!("{lp}.mtls"),
                    "a sidecarOutbound listener takes no inbound mutual TLS settings".into(),
                );
            }
            {
                for (rp, r) in routes {
                    if !route_names.insert(r.name.as_str()) {
                        err(
                            format!("{rp}.name"),
                            format!("duplicate route name {:?}", r.name),
                        );
                    }
                    check_limit(&mut err, format!("{rp}.rateLimit"), &r.rate_limit);
                    check_match(&mut err, &rp, &r.matches);
                    let is_prefix = matches!(r.matches.path, PathMatch::Prefix(_));
                    for (fi, f) in r.filters.iter().enumerate() {
                        check_filter(&mut err, format!("{rp}.filters[{fi}]"), f, is_prefix);
                    }
                    match &r.action {
                        RouteAction::Forward(fw) => {
                            for (bi, wb) in fw.backends.iter().enumerate() {
                                let bp = format!("{rp}.action.backends[{bi}]");
                                if let BackendTarget::Backend(n) = &wb.target
                                    && !backend_names.contains(n.as_str())
                                {
                                    err(format!("{bp}.target"), format!("no backend named {n:?}"));
                                }
                                for (fi, f) in wb.filters.iter().enumerate() {
                                    check_filter(
                                        &mut err,
                                        format!("{bp}.filters[{fi}]"),
                                        f,
                                        is_prefix,
                                    );
                                }
                            }
                            for (mi, m) in fw.mirrors.iter().enumerate() {
                                let mp = format!("{rp}.action.mirrors[{mi}]");
                                if let BackendTarget::Backend(n) = &m.target
                                    && !backend_names.contains(n.as_str())
                                {
                                    err(format!("{mp}.target"), format!("no backend named {n:?}"));
                                }
                                if !(0.0..=100.0).contains(&m.percent) {
                                    err(format!("{mp}.percent"), "must be within 0..=100".into());
                                }
                            }
                        }
                        RouteAction::Redirect(rd) => {
                            check_redirect(&mut err, format!("{rp}.action"), rd, is_prefix)
                        }
                        RouteAction::DirectResponse(d) => {
                            if !(100..=599).contains(&d.status) {
                                err(
                                    format!("{rp}.action.status"),
                                    format!("{} is not an HTTP status", d.status),
                                );
                            }
                        }
                    }
                }
            }
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }
}

pub(crate) fn valid_host_port(s: &str) -> bool {
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    match s.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(['/', ' ', '[', ']'])
                && port.parse::<u16>().is_ok_and(|p| p != 0)
        }
        None => false,
    }
}

fn check_regex(err: &mut dyn FnMut(String, String), path: String, re: &str) {
    if let Err(e) = regex::Regex::new(re) {
        err(path, format!("invalid regular expression: {e}"));
    }
}

fn check_match(err: &mut dyn FnMut(String, String), rp: &str, m: &RouteMatch) {
    match &m.path {
        PathMatch::Exact(p) | PathMatch::Prefix(p) => {
            if !p.starts_with('/') {
                err(
                    format!("{rp}.match.path.value"),
                    format!("{p:?} must start with '/'"),
                );
            }
        }
        PathMatch::Regex(re) => check_regex(err, format!("{rp}.match.path.value"), re),
    }
    for (i, h) in m.headers.iter().enumerate() {
        if http_name_invalid(&h.name) {
            err(
                format!("{rp}.match.headers[{i}].name"),
                format!("{:?} is not a header name", h.name),
            );
        }
        if let StringMatch::Regex(re) = &h.value {
            check_regex(err, format!("{rp}.match.headers[{i}].regex"), re);
        }
    }
    for (i, q) in m.query_params.iter().enumerate() {
        if let StringMatch::Regex(re) = &q.value {
            check_regex(err, format!("{rp}.match.queryParams[{i}].regex"), re);
        }
    }
    if let Some(method) = &m.method
        && (method.is_empty() || !method.bytes().all(|c| c.is_ascii_uppercase()))
    {
        err(
            format!("{rp}.match.method"),
            format!("{method:?} is not an uppercase HTTP method"),
        );
    }
}

fn http_name_invalid(name: &str) -> bool {
    name.is_empty()
        || !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

fn check_header(err: &mut dyn FnMut(String, String), path: String, h: &HeaderValue) {
    if http_name_invalid(&h.name) {
        err(
            format!("{path}.name"),
            format!("{:?} is not a header name", h.name),
        );
    }
    if h.value.bytes().any(|c| c == b'\r' || c == b'\n' || c == 0) {
        err(
            format!("{path}.value"),
            "must not contain CR, LF or NUL".into(),
        );
    }
}

fn check_modifier(err: &mut dyn FnMut(String, String), path: &str, m: &HeaderModifier) {
    for (i, h) in m.set.iter().enumerate() {
        check_header(err, format!("{path}.set[{i}]"), h);
    }
    for (i, h) in m.add.iter().enumerate() {
        check_header(err, format!("{path}.add[{i}]"), h);
    }
    for (i, n) in m.remove.iter().enumerate() {
        if http_name_invalid(n) {
            err(
                format!("{path}.remove[{i}]"),
                format!("{n:?} is not a header name"),
            );
        }
    }
}

fn check_path_rewrite(
    err: &mut dyn FnMut(String, String),
    path: String,
    p: &PathRewrite,
    is_prefix: bool,
) {
    match p {
        PathRewrite::ReplaceFullPath(v) | PathRewrite::ReplacePrefixMatch(v)
            if !v.starts_with('/') =>
        {
            err(
                format!("{path}.value"),
                format!("{v:?} must start with '/'"),
            )
        }
        PathRewrite::ReplacePrefixMatch(_) if !is_prefix => err(
            path,
            "ReplacePrefixMatch needs a route whose path match is a prefix".into(),
        ),
        _ => {}
    }
}

fn check_redirect(
    err: &mut dyn FnMut(String, String),
    path: String,
    r: &Redirect,
    is_prefix: bool,
) {
    if let Some(s) = &r.scheme
        && s != "http"
        && s != "https"
    {
        err(
            format!("{path}.scheme"),
            format!("{s:?} is not http or https"),
        );
    }
    if ![301, 302, 303, 307, 308].contains(&r.status_code) {
        err(
            format!("{path}.statusCode"),
            format!("{} is not a redirect status", r.status_code),
        );
    }
    if let Some(p) = &r.path {
        check_path_rewrite(err, format!("{path}.path"), p, is_prefix);
    }
}

fn check_filter(err: &mut dyn FnMut(String, String), path: String, f: &Filter, is_prefix: bool) {
    match f {
        Filter::RequestHeaderModifier(m) | Filter::ResponseHeaderModifier(m) => {
            check_modifier(err, &path, m)
        }
        Filter::UrlRewrite(u) => {
            if let Some(p) = &u.path {
                check_path_rewrite(err, format!("{path}.path"), p, is_prefix);
            }
        }
    }
}
