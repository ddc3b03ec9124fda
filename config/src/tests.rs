use super::*;
use crate::validate::valid_host_port;

fn sample() -> ProxyConfig {
    serde_json::from_value(serde_json::json!({
        "listeners": [{
            "name": "demo/gw/http",
            "port": 8080,
            "rateLimit": "gw",
            "virtualHosts": [{
                "name": "any",
                "hostnames": ["*"],
                "routes": [{
                    "name": "demo/r/0/0",
                    "match": {"path": {"type": "prefix", "value": "/"},
                              "headers": [{"name": "x-user", "exact": "alice"}]},
                    "filters": [{"type": "requestHeaderModifier",
                                 "add": [{"name": "X-Mesh", "value": "istio"}]}],
                    "action": {"type": "forward", "backends": [
                        {"target": {"backend": "demo/v1:80"}, "weight": 80},
                        {"target": {"invalid": "Service demo/gone not found"}, "weight": 20}
                    ]},
                    "timeouts": {"request": "10s"}
                }]
            }]
        }],
        "backends": [{"name": "demo/v1:80", "endpoints": ["127.0.0.1:5678"]}],
        "rateLimits": [{"name": "gw", "maxTokens": 10, "tokensPerFill": 5, "fillInterval": "60s",
                        "responseHeadersToAdd": [{"name": "x-rate-limited", "value": "TOO_MANY_REQUESTS"}],
                        "mode": {"type": "distributed", "instances": 2}}]
    }))
    .unwrap()
}

#[test]
fn documented_json_form_parses_and_round_trips() {
    let c = sample();
    assert_eq!(c.validate(), Ok(()));
    let r = &c.listeners[0].virtual_hosts[0].routes[0];
    assert_eq!(r.timeouts.request, Some(Duration::from_secs(10)));
    assert_eq!(c.rate_limits[0].fill_interval, Duration::from_secs(60));
    assert_eq!(c.rate_limits[0].status, 429);
    assert_eq!(
        c.rate_limits[0].mode,
        RateLimitMode::Distributed { instances: 2 }
    );
    let back: ProxyConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
}

#[test]
fn unknown_fields_are_rejected() {
    let e =
        serde_json::from_value::<ProxyConfig>(serde_json::json!({"listenres": []})).unwrap_err();
    assert!(e.to_string().contains("listenres"), "{e}");
}

#[test]
fn validation_names_the_field_of_every_problem() {
    let mut c = sample();
    c.rate_limits[0].max_tokens = 0;
    let r = &mut c.listeners[0].virtual_hosts[0].routes[0];
    r.matches.path = PathMatch::Regex("(".into());
    if let RouteAction::Forward(f) = &mut r.action {
        f.backends[0].target = BackendTarget::Backend("nope".into());
    }
    r.filters.push(Filter::UrlRewrite(UrlRewrite {
        hostname: None,
        path: Some(PathRewrite::ReplacePrefixMatch("/x".into())),
    }));
    c.listeners[0].virtual_hosts[0]
        .hostnames
        .push("Bad_Host".into());
    let errs = c.validate().unwrap_err();
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "rateLimits[0].maxTokens",
            "listeners[0].virtualHosts[0].hostnames[1]",
            "listeners[0].virtualHosts[0].routes[0].match.path.value",
            "listeners[0].virtualHosts[0].routes[0].filters[1].path",
            "listeners[0].virtualHosts[0].routes[0].action.backends[0].target",
        ],
        "{errs:#?}"
    );
}

#[test]
fn durations_parse_in_gateway_api_and_envoy_forms() {
    for (s, ms) in [
        ("500ms", 500),
        ("10s", 10_000),
        ("1.5s", 1500),
        ("1m30s", 90_000),
        ("1h", 3_600_000),
        ("1h2m3s4ms", 3_723_004),
        ("0s", 0),
    ] {
        assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        assert_eq!(
            parse_duration(&format_duration(Duration::from_millis(ms))),
            Ok(Duration::from_millis(ms))
        );
    }
    for bad in ["", "10", "s", "10x", "-1s", "1..2s"] {
        assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn endpoints_must_be_host_port() {
    assert!(valid_host_port("10.0.0.1:80"));
    assert!(valid_host_port("[::1]:80"));
    assert!(valid_host_port("myapp.demo.svc:80"));
    assert!(!valid_host_port("10.0.0.1"));
    assert!(!valid_host_port("host:0"));
    assert!(!valid_host_port(":80"));
}

#[test]
fn a_backend_endpoint_identity_must_be_a_workload_identity() {
    let mut c = sample();
    c.backends[0].mtls_identities.insert(
        "127.0.0.1:5678".into(),
        "spiffe://cluster.local/ns/shop/sa/db".into(),
    );
    assert_eq!(c.validate(), Ok(()));
    c.backends[0].mtls_identities.insert(
        "127.0.0.1:5678".into(),
        "spiffe://cluster.local/ns/Shop/sa/db".into(),
    );
    let errs = c.validate().unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(
        errs[0].path,
        "backends[0].mtlsIdentities[\"127.0.0.1:5678\"]"
    );
    assert!(
        errs[0]
            .message
            .contains("the namespace \"Shop\" is not a Kubernetes namespace name"),
        "{}",
        errs[0].message
    );
}
