//! The walkthrough (../shared/seed-walkthrough) loads as is and translates to
//! the expected config.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_config::{
    BackendTarget, Filter, HeaderModifier, HeaderValue, PathMatch, RateLimitMode, RouteAction,
};
use mesh_translate::{LoadOptions, TranslateOptions, load, translate};

/// The repository's verbatim copy of the walkthrough (what `meshctl demo` embeds).
fn walkthrough_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed-walkthrough")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn walkthrough_options() -> LoadOptions {
    LoadOptions {
        default_namespace: "demo".into(),
    }
}

#[test]
fn fixture_copy_equals_shared_walkthrough() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/seed-walkthrough");
    if !shared.is_dir() {
        eprintln!("{} not found; skipping", shared.display());
        return;
    }
    let yaml = |dir: &Path| {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(yaml(&walkthrough_dir()), yaml(&shared));
}

#[test]
fn walkthrough_loads_as_is_with_warnings_for_unused_kinds() {
    let loaded = load(&[walkthrough_dir()], &walkthrough_options()).unwrap();
    let r = &loaded.resources;
    assert_eq!(r.gateway_classes.len(), 1);
    assert_eq!(r.gateways.len(), 1);
    assert_eq!(r.http_routes.len(), 2);
    assert_eq!(r.services.len(), 3);
    assert_eq!(r.envoy_filters.len(), 1);
    assert_eq!(r.operators.len(), 1);
    let ignored: Vec<String> = loaded.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(ignored.len(), 3, "{ignored:#?}");
    assert!(
        ignored[0].contains("deployment.yaml: document 1 (Deployment demo/myapp-v1)")
            && ignored[0].contains("Deployment (apps/v1) is not used by the proxy; ignored"),
        "{ignored:#?}"
    );
    // namespaces defaulted like `kubectl apply -n demo`
    assert_eq!(r.http_routes[0].metadata.namespace.as_deref(), Some("demo"));
    assert_eq!(r.gateway_classes[0].metadata.namespace, None);
}

fn walkthrough_translation() -> mesh_translate::Translation {
    let loaded = load(
        &[walkthrough_dir(), fixtures().join("seed-endpoints")],
        &walkthrough_options(),
    )
    .unwrap();
    translate(
        &loaded.resources,
        &TranslateOptions {
            default_namespace: "demo".into(),
            ..Default::default()
        },
    )
}

#[test]
fn walkthrough_translates_to_expected_config() {
    let t = walkthrough_translation();
    let c = &t.config;
    c.validate().unwrap();
    assert_eq!(c.access_log.path.as_deref(), Some("/dev/stdout"));

    assert_eq!(c.listeners.len(), 1);
    let l = &c.listeners[0];
    assert_eq!(l.name, "demo/istio-gwapi/http");
    assert_eq!(l.port, 80);
    assert_eq!(l.rate_limit, None);
    assert_eq!(l.virtual_hosts.len(), 1);
    let vh = &l.virtual_hosts[0];
    assert_eq!(vh.hostnames, ["*"]);
    let names: Vec<&str> = vh.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        ["demo/other-route/0/0", "demo/myapp-route/0/0"],
        "/other before / by precedence"
    );

    let other = &vh.routes[0];
    assert_eq!(other.matches.path, PathMatch::Prefix("/other".into()));
    let RouteAction::Forward(fw) = &other.action else {
        panic!()
    };
    assert_eq!(fw.backends.len(), 1);
    assert_eq!(
        fw.backends[0].target,
        BackendTarget::Backend("demo/otherapp:80".into())
    );
    assert_eq!(fw.backends[0].weight, 1);

    let root = &vh.routes[1];
    assert_eq!(root.matches.path, PathMatch::Prefix("/".into()));
    let RouteAction::Forward(fw) = &root.action else {
        panic!()
    };
    let split: Vec<(BackendTarget, u32)> = fw
        .backends
        .iter()
        .map(|b| (b.target.clone(), b.weight))
        .collect();
    assert_eq!(
        split,
        [
            (BackendTarget::Backend("demo/myapp-v1:80".into()), 80),
            (BackendTarget::Backend("demo/myapp-v2:80".into()), 20)
        ]
    );
    let hv = |n: &str, v: &str| HeaderValue {
        name: n.into(),
        value: v.into(),
    };
    let modifier = HeaderModifier {
        set: vec![hv("X-Canary", "v2-20pct")],
        add: vec![hv("X-Mesh", "istio")],
        remove: vec![],
    };
    assert_eq!(
        root.filters,
        [
            Filter::RequestHeaderModifier(modifier.clone()),
            Filter::ResponseHeaderModifier(modifier)
        ]
    );

    // backends and endpoints
    let backends: Vec<(&str, Vec<&str>)> = c
        .backends
        .iter()
        .map(|b| {
            (
                b.name.as_str(),
                b.endpoints.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        backends,
        [
            ("demo/myapp-v1:80", vec!["127.0.0.1:18081"]),
            ("demo/myapp-v2:80", vec!["127.0.0.1:18082"]),
            ("demo/otherapp:80", vec!["127.0.0.1:18083"]),
        ]
    );

    // the EnvoyFilter's SIDECAR_INBOUND local rate limit, emulated per backend Service
    assert_eq!(c.rate_limits.len(), 3);
    for (b, rl) in c.backends.iter().zip(&c.rate_limits) {
        assert_eq!(b.rate_limit.as_deref(), Some(rl.name.as_str()));
        assert_eq!(rl.max_tokens, 10);
        assert_eq!(rl.tokens_per_fill, 5);
        assert_eq!(rl.fill_interval, Duration::from_secs(60));
        assert_eq!(rl.status, 429);
        assert_eq!(
            rl.response_headers_to_add,
            [hv("x-rate-limited", "TOO_MANY_REQUESTS")]
        );
        assert!(!rl.x_ratelimit_headers);
        assert_eq!(rl.mode, RateLimitMode::Local);
    }
    assert_eq!(
        c.rate_limits[0].name,
        "envoyfilter/demo/ingress-local-ratelimit/0/demo/myapp-v1"
    );

    // status: both routes accepted and resolved
    assert_eq!(t.route_status.len(), 2);
    for s in &t.route_status {
        assert_eq!(s.controller_name, "istio.io/gateway-controller");
        assert!(s.conditions.iter().all(|c| c.status), "{s:?}");
    }
    assert_eq!(t.gateway_status.len(), 1);
    assert_eq!(t.gateway_status[0].listeners[0].attached_routes, 2);
}

#[test]
fn walkthrough_warnings_explain_emulation_and_operator() {
    let t = walkthrough_translation();
    let w: Vec<String> = t.warnings.iter().map(|w| w.to_string()).collect();
    let sidecar = w
        .iter()
        .find(|w| w.contains("SIDECAR_INBOUND"))
        .unwrap_or_else(|| panic!("{w:#?}"));
    assert!(sidecar.starts_with("EnvoyFilter demo/ingress-local-ratelimit: spec.configPatches[0]"));
    assert!(
        sidecar.contains("workloadSelector {istio: ingressgateway} selects the ingress gateway")
    );
    assert!(
        sidecar.contains("demo/myapp-v1 (1 endpoint → 10 tokens, 5 per 1m)"),
        "{sidecar}"
    );
    let op = w
        .iter()
        .find(|w| w.starts_with("IstioOperator demo/istio-gwapi"))
        .unwrap_or_else(|| panic!("{w:#?}"));
    assert!(op.contains("installer's business"));
    assert!(op.contains("/dev/stdout"));
    assert_eq!(w.len(), 2, "{w:#?}");
}

#[test]
fn walkthrough_without_endpoint_slices_has_empty_endpoints() {
    let loaded = load(&[walkthrough_dir()], &walkthrough_options()).unwrap();
    let t = translate(&loaded.resources, &TranslateOptions::default());
    t.config.validate().unwrap();
    assert!(t.config.backends.iter().all(|b| b.endpoints.is_empty()));
    assert_eq!(t.config.backends.len(), 3);
}
