//! HTTPRoute filters (rule- and backendRef-level) → the proxy's filters, redirect and
//! mirrors.

use gateway_api::apis::standard::httproutes::{
    HttpRouteRulesFilters, HttpRouteRulesFiltersRequestRedirectScheme,
    HttpRouteRulesFiltersType as Ft,
};
use mesh_config::{
    BackendTarget, Filter, HeaderModifier, HeaderValue, Mirror, PathRewrite, Redirect, UrlRewrite,
};

use super::Ctx;
use super::backends::resolve_backend;
use crate::status::Reason;

#[derive(Default)]
pub(super) struct Converted {
    pub(super) filters: Vec<Filter>,
    pub(super) redirect: Option<Redirect>,
    pub(super) mirrors: Vec<Mirror>,
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

pub(super) fn convert_filters(
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
