//! Translation rules: precedence, hostnames, allowedRoutes, references, filters, rate limits,
//! status.

use std::time::Duration;

use mesh_config::{
    BackendTarget, Filter, Mirror, PathMatch, PathRewrite, ProxyConfig, RateLimitMode, Redirect,
    RouteAction, UrlRewrite, VirtualHost,
};
use mesh_translate::status::{ConditionType, Reason, RouteParentStatus};
use mesh_translate::{LoadOptions, TranslateOptions, Translation, load_str, translate};

const BASE: &str = include_str!("fixtures/gateway-base/base.yaml");

const GW: &str = include_str!("fixtures/gateway-base/gateway.yaml");

fn run_with(yaml: &str, opts: &TranslateOptions) -> Translation {
    let loaded = load_str(
        "test.yaml",
        yaml,
        &LoadOptions {
            default_namespace: "demo".into(),
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let t = translate(&loaded.resources, opts);
    t.config
        .validate()
        .unwrap_or_else(|e| panic!("invalid config: {e:?}\n{:#?}", t.config));
    t
}

fn run(yaml: &str) -> Translation {
    run_with(
        yaml,
        &TranslateOptions {
            default_namespace: "demo".into(),
            ..Default::default()
        },
    )
}

fn route(name: &str, extra_meta: &str, spec: &str) -> String {
    format!(
        "\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}{extra_meta}}}\nspec:\n{spec}"
    )
}

fn vhost<'a>(c: &'a ProxyConfig, host: &str) -> &'a VirtualHost {
    c.listeners
        .iter()
        .flat_map(|l| &l.virtual_hosts)
        .find(|v| v.hostnames.iter().any(|h| h == host))
        .unwrap_or_else(|| panic!("no vhost {host}: {c:#?}"))
}

fn names(v: &VirtualHost) -> Vec<&str> {
    v.routes.iter().map(|r| r.name.as_str()).collect()
}

fn status<'a>(t: &'a Translation, route: &str) -> &'a RouteParentStatus {
    t.route_status
        .iter()
        .find(|s| s.route_name == route)
        .unwrap_or_else(|| panic!("no status for {route}: {:#?}", t.route_status))
}

fn cond(s: &RouteParentStatus, t: ConditionType) -> (bool, Reason) {
    let c = s.condition(t).unwrap();
    (c.status, c.reason)
}

#[test]
fn precedence_across_routes_and_rules() {
    let y = [
        BASE,
        GW,
        &route(
            "zeta",
            ", creationTimestamp: '2020-01-01T00:00:00Z'",
            "  parentRefs: [{name: gw}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: a, port: 80}]
  - matches:
    - {path: {type: PathPrefix, value: /api}, method: GET}
    - {path: {type: PathPrefix, value: /api}, headers: [{name: x, value: '1'}, {name: X, value: '2'}]}
    backendRefs: [{name: a, port: 80}]
",
        ),
        &route(
            "alpha",
            ", creationTimestamp: '2024-01-01T00:00:00Z'",
            "  parentRefs: [{name: gw}]
  rules:
  - matches:
    - {path: {type: PathPrefix, value: /}}
    - {path: {type: Exact, value: /api}}
    - {path: {type: RegularExpression, value: '/api/v[0-9]+'}}
    - {path: {type: PathPrefix, value: /api}, headers: [{name: a, value: '1'}, {name: b, value: '2'}]}
    - {path: {type: PathPrefix, value: /api/}}
    backendRefs: [{name: a, port: 80}]
  - backendRefs: [{name: a, port: 80}]
",
        ),
    ]
    .concat();
    let t = run(&y);
    let v = vhost(&t.config, "*");
    assert_eq!(
        names(v),
        [
            "demo/alpha/0/1", // Exact
            "demo/alpha/0/4", // /api/ (5 chars)
            "demo/zeta/1/0",  // /api + method
            "demo/alpha/0/3", // /api + 2 headers (alpha has 2 distinct header names)
            "demo/zeta/1/1", // /api + 1 header (duplicate name counted once), older but fewer headers
            "demo/zeta/0/0", // / : zeta is older than alpha
            "demo/alpha/0/0",
            "demo/alpha/1/0", // rule without matches = PathPrefix /
            "demo/alpha/0/2", // regex last
        ]
    );
    assert_eq!(v.routes[7].matches.path, PathMatch::Prefix("/".into()));
}

#[test]
fn same_age_routes_order_by_namespace_and_name() {
    let spec = "  parentRefs: [{name: gw, namespace: demo}]\n  rules: [{backendRefs: [{name: a, port: 80, namespace: demo}]}]\n";
    let grant = "\n---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: g}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: aaa}]\n  to: [{group: '', kind: Service}]\n";
    let y = [
        BASE,
        GW,
        grant,
        &route("b", "", spec),
        &route("a", ", namespace: zzz", spec),
        &route("z", ", namespace: aaa", spec),
    ]
    .concat();
    let t = run(&y);
    assert_eq!(
        names(vhost(&t.config, "*")),
        ["aaa/z/0/0", "demo/b/0/0", "zzz/a/0/0"]
    );
    // zzz has no ReferenceGrant: its backend is invalid
    let zzz = &vhost(&t.config, "*").routes[2];
    let RouteAction::Forward(f) = &zzz.action else {
        panic!()
    };
    assert!(matches!(f.backends[0].target, BackendTarget::Invalid(_)));
    let s = status(&t, "a");
    assert_eq!(cond(s, ConditionType::Accepted), (true, Reason::Accepted));
    assert_eq!(
        cond(s, ConditionType::ResolvedRefs),
        (false, Reason::RefNotPermitted)
    );
    assert_eq!(
        cond(status(&t, "z"), ConditionType::ResolvedRefs),
        (true, Reason::ResolvedRefs)
    );
}

#[test]
fn hostname_intersection_and_vhost_fallback() {
    let gw = "
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  gatewayClassName: mesh
  listeners:
  - {name: wild, protocol: HTTP, port: 80, hostname: '*.example.com'}
  - {name: exact, protocol: HTTP, port: 80, hostname: 'api.example.com'}
";
    let y = [
        BASE,
        gw,
        &route(
            "specific",
            "",
            "  parentRefs: [{name: gw, sectionName: wild}]\n  hostnames: [foo.example.com, example.com, other.io]\n  rules: [{matches: [{path: {type: PathPrefix, value: /foo}}], backendRefs: [{name: a, port: 80}]}]\n",
        ),
        &route(
            "catchall",
            "",
            "  parentRefs: [{name: gw}]\n  rules: [{backendRefs: [{name: a, port: 80}]}]\n",
        ),
        &route(
            "nomatch",
            "",
            "  parentRefs: [{name: gw}]\n  hostnames: [other.io]\n  rules: [{backendRefs: [{name: a, port: 80}]}]\n",
        ),
    ]
    .concat();
    let t = run(&y);
    let l = &t.config.listeners;
    assert_eq!(l.len(), 1, "both listeners share port 80");
    assert_eq!(l[0].name, "port-80");
    let hosts: Vec<&str> = l[0].virtual_hosts.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(
        hosts,
        ["api.example.com", "foo.example.com", "*.example.com"]
    );
    // the specific route's hostname first, then the listener wildcard's routes as fallback
    assert_eq!(
        names(vhost(&t.config, "foo.example.com")),
        ["demo/specific/0/0", "demo/catchall/0/0@foo.example.com"]
    );
    // catchall is attached to both listeners: its own name where it was attached first
    // (api.example.com, through the exact listener, listed once), `@host` elsewhere
    assert_eq!(
        names(vhost(&t.config, "api.example.com")),
        ["demo/catchall/0/0"]
    );
    assert_eq!(
        names(vhost(&t.config, "*.example.com")),
        ["demo/catchall/0/0@*.example.com"]
    );
    assert_eq!(
        cond(status(&t, "nomatch"), ConditionType::Accepted),
        (false, Reason::NoMatchingListenerHostname)
    );
    assert_eq!(t.gateway_status[0].listeners[0].attached_routes, 2);
    assert_eq!(t.gateway_status[0].listeners[1].attached_routes, 1);
}

#[test]
fn allowed_routes_same_selector_and_kinds() {
    let gw = "
---
apiVersion: v1
kind: Namespace
metadata: {name: team, labels: {gateway-access: 'yes'}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  gatewayClassName: mesh
  listeners:
  - {name: same, protocol: HTTP, port: 80}
  - name: sel
    protocol: HTTP
    port: 81
    allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {gateway-access: 'yes'}}}}
  - name: grpc-only
    protocol: HTTP
    port: 82
    allowedRoutes: {kinds: [{kind: GRPCRoute}], namespaces: {from: All}}
";
    let spec = |section: &str| {
        format!(
            "  parentRefs: [{{name: gw, namespace: demo, sectionName: {section}}}]\n  rules: [{{backendRefs: [{{name: a, port: 80, namespace: demo}}]}}]\n"
        )
    };
    let y = [
        BASE,
        gw,
        &route("same-ok", "", &spec("same")),
        &route("same-no", ", namespace: team", &spec("same")),
        &route("sel-ok", ", namespace: team", &spec("sel")),
        &route("sel-no", ", namespace: else", &spec("sel")),
        &route("kind-no", "", &spec("grpc-only")),
        &route("section-no", "", &spec("nope")),
    ]
    .concat();
    let t = run(&y);
    let acc = |n: &str| cond(status(&t, n), ConditionType::Accepted);
    assert_eq!(acc("same-ok"), (true, Reason::Accepted));
    assert_eq!(acc("same-no"), (false, Reason::NotAllowedByListeners));
    assert_eq!(acc("sel-ok"), (true, Reason::Accepted));
    assert_eq!(acc("sel-no"), (false, Reason::NotAllowedByListeners));
    assert_eq!(acc("kind-no"), (false, Reason::NotAllowedByListeners));
    assert_eq!(acc("section-no"), (false, Reason::NoMatchingParent));
    let ports: Vec<u16> = t.config.listeners.iter().map(|l| l.port).collect();
    assert_eq!(ports, [80, 81], "the GRPCRoute-only listener is not served");
    let grpc = &t.gateway_status[0].listeners[2];
    assert!(
        grpc.conditions
            .iter()
            .any(|c| c.type_ == ConditionType::ResolvedRefs
                && !c.status
                && c.reason == Reason::InvalidKind)
    );
}

#[test]
fn backend_refs_resolution_and_endpoints() {
    let y = [
        BASE,
        GW,
        &route(
            "r",
            "",
            "  parentRefs: [{name: gw}]
  rules:
  - backendRefs:
    - {name: b, port: 80, weight: 3}
    - {name: b, port: 9000, weight: 0}
    - {name: missing, port: 80}
    - {name: a, port: 81}
    - {name: bucket, group: storage.example.com, kind: Bucket}
    - {name: c, namespace: other, port: 8080}
",
        ),
    ]
    .concat();
    let t = run(&y);
    let r = &vhost(&t.config, "*").routes[0];
    let RouteAction::Forward(f) = &r.action else {
        panic!()
    };
    let targets: Vec<_> = f.backends.iter().map(|b| (&b.target, b.weight)).collect();
    assert_eq!(targets[0], (&BackendTarget::Backend("demo/b:80".into()), 3));
    assert_eq!(
        targets[1],
        (&BackendTarget::Backend("demo/b:9000".into()), 0)
    );
    for (i, needle) in [
        (2, "Service demo/missing not found"),
        (3, "Service demo/a has no port 81"),
        (4, "only Services are supported"),
        (5, "no ReferenceGrant in other allows HTTPRoutes from demo"),
    ] {
        let BackendTarget::Invalid(m) = &f.backends[i].target else {
            panic!("{i}")
        };
        assert!(m.contains(needle), "{m}");
    }
    let s = status(&t, "r");
    assert_eq!(cond(s, ConditionType::Accepted), (true, Reason::Accepted));
    let rr = s.condition(ConditionType::ResolvedRefs).unwrap();
    assert_eq!((rr.status, rr.reason), (false, Reason::BackendNotFound));
    assert!(rr.message.contains("InvalidKind") || rr.message.contains("only Services"));

    let b80 = t
        .config
        .backends
        .iter()
        .find(|b| b.name == "demo/b:80")
        .unwrap();
    assert_eq!(
        b80.endpoints,
        ["10.0.0.1:5678", "10.0.0.3:5678", "[fd00::1]:5678"]
    );
    let b9000 = t
        .config
        .backends
        .iter()
        .find(|b| b.name == "demo/b:9000")
        .unwrap();
    assert_eq!(b9000.endpoints, ["10.0.0.1:9001", "10.0.0.3:9001"]);
    assert_eq!(t.config.backends.len(), 2);
}

#[test]
fn invalid_kind_reason() {
    let y = [
        BASE,
        GW,
        &route(
            "r",
            "",
            "  parentRefs: [{name: gw}]\n  rules: [{backendRefs: [{name: x, group: storage.example.com, kind: Bucket}]}]\n",
        ),
    ]
    .concat();
    let t = run(&y);
    assert_eq!(
        cond(status(&t, "r"), ConditionType::ResolvedRefs),
        (false, Reason::InvalidKind)
    );
}

#[test]
fn filters_redirect_rewrite_mirror_timeouts() {
    let y = [
        BASE,
        GW,
        &route(
            "r",
            "",
            "  parentRefs: [{name: gw}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: new.example.com, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
  - matches: [{path: {type: PathPrefix, value: /api}}]
    timeouts: {request: 10s, backendRequest: 2s}
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: b, port: 80}, fraction: {numerator: 1, denominator: 4}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: a, port: 80}}
    backendRefs:
    - name: a
      port: 80
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {remove: [x-debug]}
",
        ),
    ]
    .concat();
    let t = run(&y);
    let v = vhost(&t.config, "*");
    let redirect = v.routes.iter().find(|r| r.name == "demo/r/0/0").unwrap();
    assert_eq!(
        redirect.action,
        RouteAction::Redirect(Redirect {
            scheme: Some("https".into()),
            hostname: Some("new.example.com".into()),
            path: Some(PathRewrite::ReplacePrefixMatch("/new".into())),
            port: None,
            status_code: 301,
        })
    );
    let api = v.routes.iter().find(|r| r.name == "demo/r/1/0").unwrap();
    assert_eq!(api.timeouts.request, Some(Duration::from_secs(10)));
    assert_eq!(api.timeouts.backend_request, Some(Duration::from_secs(2)));
    assert_eq!(
        api.filters,
        [Filter::UrlRewrite(UrlRewrite {
            hostname: Some("internal".into()),
            path: Some(PathRewrite::ReplacePrefixMatch("/".into())),
        })]
    );
    let RouteAction::Forward(f) = &api.action else {
        panic!()
    };
    assert_eq!(
        f.mirrors,
        [
            Mirror {
                target: BackendTarget::Backend("demo/b:80".into()),
                percent: 25.0
            },
            Mirror {
                target: BackendTarget::Backend("demo/a:80".into()),
                percent: 100.0
            },
        ]
    );
    let Filter::RequestHeaderModifier(m) = &f.backends[0].filters[0] else {
        panic!()
    };
    assert_eq!(m.remove, ["x-debug"]);
}

#[test]
fn missing_gateway_other_class_and_served_gateway_filter() {
    let y = [
        BASE,
        GW,
        "\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: foreign}\nspec:\n  gatewayClassName: other\n  listeners: [{name: http, protocol: HTTP, port: 8080}]\n",
        "\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: second}\nspec:\n  gatewayClassName: mesh\n  listeners: [{name: http, protocol: HTTP, port: 8081}, {name: tls, protocol: HTTPS, port: 443}]\n",
        &route("ghost", "", "  parentRefs: [{name: nope}]\n  rules: [{backendRefs: [{name: a, port: 80}]}]\n"),
        &route("foreign", "", "  parentRefs: [{name: foreign}]\n  rules: [{backendRefs: [{name: a, port: 80}]}]\n"),
    ]
    .concat();
    let t = run(&y);
    assert_eq!(
        cond(status(&t, "ghost"), ConditionType::Accepted),
        (false, Reason::NoMatchingParent)
    );
    assert!(
        t.route_status.iter().all(|s| s.route_name != "foreign"),
        "not our Gateway: no status"
    );
    let ports: Vec<u16> = t.config.listeners.iter().map(|l| l.port).collect();
    assert_eq!(
        ports,
        [80, 8081],
        "HTTPS listener not served; other class ignored"
    );
    assert!(t.warnings.iter().any(|w| {
        w.to_string()
            .contains("protocol HTTPS is not supported yet")
    }));
    let https = &t.gateway_status[1].listeners[1];
    assert!(
        https
            .conditions
            .iter()
            .any(|c| c.reason == Reason::UnsupportedProtocol)
    );

    let only = run_with(
        &y,
        &TranslateOptions {
            gateways: vec!["demo/second".into()],
            ..Default::default()
        },
    );
    let ports: Vec<u16> = only.config.listeners.iter().map(|l| l.port).collect();
    assert_eq!(ports, [8081]);
    assert_eq!(only.gateway_status.len(), 1);
}

const POLICY: &str = "
---
apiVersion: policy.meshctl.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: NAME}
spec:
  targetRefs: [TARGET]
  maxTokens: 100
  tokensPerFill: 10
  fillInterval: 1s
  responseHeadersToAdd: [{name: x-limited, value: 'yes'}]
  xRateLimitHeaders: true
  MODE
";

fn policy(name: &str, target: &str, mode: &str) -> String {
    POLICY
        .replace("NAME", name)
        .replace("TARGET", target)
        .replace("MODE", mode)
}

#[test]
fn rate_limit_policy_scopes_and_distributed_mode() {
    let y = [
        BASE,
        GW,
        &route(
            "r",
            "",
            "  parentRefs: [{name: gw}]\n  rules:\n  - name: main\n    backendRefs: [{name: a, port: 80}]\n  - matches: [{path: {value: /b}}]\n    backendRefs: [{name: b, port: 80}]\n",
        ),
        &policy("gw", "{group: gateway.networking.k8s.io, kind: Gateway, name: gw}", "mode: Distributed"),
        &policy("route", "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r, sectionName: main}", ""),
        &policy("svc", "{group: '', kind: Service, name: b}", ""),
        &policy("nothing", "{group: '', kind: Service, name: unused}", ""),
    ]
    .concat();
    let t = run_with(
        &y,
        &TranslateOptions {
            distributed_instances: 3,
            ..Default::default()
        },
    );
    let c = &t.config;
    assert_eq!(
        c.listeners[0].rate_limit.as_deref(),
        Some("ratelimitpolicy/demo/gw")
    );
    let v = vhost(c, "*");
    assert_eq!(v.routes[0].name, "demo/r/1/0");
    assert_eq!(v.routes[0].rate_limit, None);
    assert_eq!(
        v.routes[1].rate_limit.as_deref(),
        Some("ratelimitpolicy/demo/route")
    );
    let b = c.backends.iter().find(|b| b.name == "demo/b:80").unwrap();
    assert_eq!(b.rate_limit.as_deref(), Some("ratelimitpolicy/demo/svc"));
    let names: Vec<&str> = c.rate_limits.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "ratelimitpolicy/demo/gw",
            "ratelimitpolicy/demo/route",
            "ratelimitpolicy/demo/svc"
        ]
    );
    let gw = &c.rate_limits[0];
    assert_eq!(gw.mode, RateLimitMode::Distributed { instances: 3 });
    assert_eq!((gw.max_tokens, gw.tokens_per_fill), (100, 10));
    assert_eq!(gw.fill_interval, Duration::from_secs(1));
    assert!(gw.x_ratelimit_headers);
    assert_eq!(gw.response_headers_to_add[0].name, "x-limited");
    assert_eq!(c.rate_limits[1].mode, RateLimitMode::Local);
    assert!(
        t.warnings
            .iter()
            .any(|w| w.context == "RateLimitPolicy demo/nothing"
                && w.message.contains("is not served by this proxy"))
    );
}

#[test]
fn envoy_filter_gateway_context_limits_the_listener() {
    let ef = "
---
apiVersion: networking.istio.io/v1
kind: EnvoyFilter
metadata: {name: gw-rl, namespace: istio-system}
spec:
  workloadSelector: {labels: {gateway.networking.k8s.io/gateway-name: gw}}
  configPatches:
  - applyTo: HTTP_FILTER
    match: {context: GATEWAY, listener: {portNumber: 80, filterChain: {filter: {name: envoy.filters.network.http_connection_manager}}}}
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.local_ratelimit
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
          stat_prefix: gw
          token_bucket: {max_tokens: 50, tokens_per_fill: 50, fill_interval: 1s}
          filter_enabled: {default_value: {numerator: 100}}
          filter_enforced: {default_value: {numerator: 1000000, denominator: MILLION}}
          status: {code: 503}
          enable_x_ratelimit_headers: DRAFT_VERSION_03
";
    let y = [BASE, GW, ef].concat();
    let t = run(&y);
    let c = &t.config;
    assert_eq!(
        c.listeners[0].rate_limit.as_deref(),
        Some("envoyfilter/istio-system/gw-rl/0")
    );
    let rl = &c.rate_limits[0];
    assert_eq!(
        (rl.max_tokens, rl.tokens_per_fill, rl.status),
        (50, 50, 503)
    );
    assert!(rl.x_ratelimit_headers);
}

#[test]
fn envoy_filter_sidecar_inbound_multiplies_by_endpoints() {
    let ef = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/seed-walkthrough/istio-envoy-filter.yaml"),
    )
    .unwrap();
    let y = [
        BASE,
        GW,
        &route("r", "", "  parentRefs: [{name: gw}]\n  rules: [{backendRefs: [{name: b, port: 80}, {name: b, port: 9000}]}]\n"),
        "\n---\n",
        &ef,
    ]
    .concat();
    let t = run(&y);
    let c = &t.config;
    // b has 3 ready endpoints (10.0.0.1, 10.0.0.3, fd00::1): one bucket for the Service, ×3
    assert_eq!(c.rate_limits.len(), 1);
    let rl = &c.rate_limits[0];
    assert_eq!(rl.name, "envoyfilter/demo/ingress-local-ratelimit/0/demo/b");
    assert_eq!((rl.max_tokens, rl.tokens_per_fill), (30, 15));
    assert!(
        c.backends
            .iter()
            .all(|b| b.rate_limit.as_deref() == Some(rl.name.as_str()))
    );
}

#[test]
fn unsupported_fields_warn_and_disabled_filter_is_noted() {
    let y = [
        BASE,
        "
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  gatewayClassName: mesh
  addresses: [{type: IPAddress, value: 10.0.0.9}]
  listeners: [{name: http, protocol: HTTP, port: 80}]
---
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: disabled}
spec:
  configPatches:
  - applyTo: HTTP_FILTER
    match: {context: GATEWAY}
    patch:
      operation: INSERT_FIRST
      value:
        name: envoy.filters.http.local_ratelimit
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
          stat_prefix: x
          token_bucket: {max_tokens: 1, fill_interval: 1s}
",
    ]
    .concat();
    let t = run(&y);
    let w: Vec<String> = t.warnings.iter().map(|w| w.to_string()).collect();
    assert!(
        w.iter()
            .any(|w| w.starts_with("Gateway demo/gw: spec.addresses is not supported")),
        "{w:#?}"
    );
    assert!(
        w.iter()
            .any(|w| w.contains("filter_enabled: absent: Envoy's default is 0%")),
        "{w:#?}"
    );
    assert!(t.config.rate_limits.is_empty());
}

#[test]
fn mesh_config_path_normalization_reaches_the_proxy_config() {
    let profile = "\n---\napiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nmetadata: {name: p}\nspec:\n  meshConfig:\n    pathNormalization: {normalization: DECODE_AND_MERGE_SLASHES}\n";
    let t = run(&format!("{BASE}{GW}{profile}"));
    assert_eq!(
        t.config.http.path_normalization,
        Some(mesh_config::PathNormalization::DecodeAndMergeSlashes)
    );
    // Without a profile the proxy's own default (BASE) applies.
    let t = run(&format!("{BASE}{GW}"));
    assert_eq!(t.config.http.path_normalization, None);
}
