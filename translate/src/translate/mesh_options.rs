//! Mesh-wide options from the install profiles (`IstioOperator` and kin): HTTP options
//! (path normalization), the access log and the trust domain.

use mesh_config::{AccessLog, HttpOptions, PathNormalization};

use super::Ctx;
use crate::resources::{Resources, ns_name};
use crate::{TranslateOptions, Warning};

/// The trust domain of workload identities: `meshConfig.trustDomain` of the first install
/// profile (by namespace and name) that sets it, else the options'. Profiles that set
/// another one are reported.
pub(super) fn trust_domain(res: &Resources, opts: &TranslateOptions) -> (String, Vec<Warning>) {
    let mut ops: Vec<_> = res.operators.iter().collect();
    ops.sort_by_key(|o| ns_name(&o.metadata, &opts.default_namespace));
    let mut chosen: Option<(String, String)> = None;
    let mut warnings = Vec::new();
    for op in ops {
        let Some(td) = op.trust_domain() else {
            continue;
        };
        let (ns, name) = ns_name(&op.metadata, &opts.default_namespace);
        let kind = if op.kind.is_empty() {
            "IstioOperator"
        } else {
            op.kind.as_str()
        };
        let ctx = format!("{kind} {ns}/{name}");
        match &chosen {
            None => chosen = Some((td.to_string(), ctx)),
            Some((c, first)) if c != td => warnings.push(Warning::new(
                ctx,
                format!("trustDomain {td} ignored: {first} already sets {c}"),
            )),
            _ => {}
        }
    }
    let td = chosen.map_or_else(|| opts.trust_domain.clone(), |(td, _)| td);
    (td, warnings)
}

/// The proxy's HTTP options from the install profiles: `meshConfig.pathNormalization` (the
/// first profile, by namespace and name, that sets it wins).
pub(super) fn http_options(cx: &mut Ctx<'_>) -> HttpOptions {
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
                "the proxy only uses spec.meshConfig.accessLogFile ({used}), spec.meshConfig.pathNormalization and spec.meshConfig.trustDomain; the rest (profile, values, components, other meshConfig) is the installer's business (meshctl install)"
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
