use super::*;
use crate::config::ProxyConfig;

fn cfg(v: serde_json::Value) -> ProxyConfig {
    let c: ProxyConfig = serde_json::from_value(v).unwrap();
    c.validate().unwrap();
    c
}

/// Compiles `c` the way the proxy does: its limiters first, then the table over them.
fn build(c: &ProxyConfig, previous: Option<&RouteTable>) -> RouteTable {
    let limiters = RateLimiters::build(&c.rate_limits, None);
    RouteTable::build(c, previous, &limiters).unwrap()
}

fn table(routes: serde_json::Value, hosts: serde_json::Value) -> RouteTable {
    let vhosts: Vec<serde_json::Value> = hosts
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            // Route names are unique per listener: suffix them with the vhost index.
            let mut routes = routes.clone();
            for r in routes.as_array_mut().unwrap() {
                let n = format!("{}@{i}", r["name"].as_str().unwrap());
                r["name"] = serde_json::json!(n);
            }
            serde_json::json!({"name": format!("vh{i}"), "hostnames": h, "routes": routes})
        })
        .collect();
    let c = cfg(serde_json::json!({
        "listeners": [{"name": "l", "port": 80, "virtualHosts": vhosts}],
        "backends": [{"name": "b1", "endpoints": ["127.0.0.1:1"]},
                     {"name": "b2", "endpoints": ["127.0.0.1:2", "127.0.0.1:3"]}],
    }));
    build(&c, None)
}

fn fwd(name: &str, m: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"name": name, "match": m,
        "action": {"type": "forward", "backends": [{"target": {"backend": "b1"}, "weight": 1}]}})
}

fn route_name(
    t: &RouteTable,
    host: &str,
    method: &str,
    uri: &str,
    hdrs: &[(&str, &str)],
) -> Option<String> {
    let uri: http::Uri = uri.parse().unwrap();
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let mut headers = HeaderMap::new();
    for (k, v) in hdrs {
        headers.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let info = RequestInfo {
        host,
        method: &method,
        path: uri.path(),
        query: uri.query(),
        headers: &headers,
    };
    t.listeners[0]
        .route(&info)
        .map(|(vh, r)| format!("{}:{}", vh.name, r.name.split('@').next().unwrap()))
}

#[test]
fn prefix_is_element_wise() {
    assert!(prefix_matches("/abc", "/abc"));
    assert!(prefix_matches("/abc", "/abc/"));
    assert!(prefix_matches("/abc", "/abc/def"));
    assert!(!prefix_matches("/abc", "/abcd"));
    assert!(!prefix_matches("/abc", "/ab"));
    assert!(prefix_matches("/", "/anything"));
    assert_eq!(normalize_prefix("/abc/"), "/abc");
    assert_eq!(normalize_prefix("/"), "/");
}

#[test]
fn path_kinds_and_first_match_order() {
    let t = table(
        serde_json::json!([
            fwd(
                "exact",
                serde_json::json!({"path": {"type": "exact", "value": "/abc"}})
            ),
            fwd(
                "regex",
                serde_json::json!({"path": {"type": "regex", "value": "/r/[0-9]+"}})
            ),
            fwd(
                "prefix",
                serde_json::json!({"path": {"type": "prefix", "value": "/abc/"}})
            ),
            fwd("root", serde_json::json!({})),
        ]),
        serde_json::json!([["*"]]),
    );
    let r = |u| route_name(&t, "h", "GET", u, &[]).unwrap();
    assert_eq!(r("/abc"), "vh0:exact");
    assert_eq!(r("/abc?x=1"), "vh0:exact");
    assert_eq!(r("/abc/d"), "vh0:prefix");
    assert_eq!(r("/abcd"), "vh0:root");
    assert_eq!(r("/r/123"), "vh0:regex");
    assert_eq!(r("/r/123x"), "vh0:root", "regex is anchored");
    assert_eq!(r("/x/r/1"), "vh0:root", "regex is anchored at the start");
}

#[test]
fn headers_query_and_method() {
    let t = table(
        serde_json::json!([
            fwd(
                "hdr",
                serde_json::json!({"headers": [{"name": "X-User", "exact": "alice"}]})
            ),
            fwd(
                "hdr-re",
                serde_json::json!({"headers": [{"name": "x-v", "regex": "v[12]"}]})
            ),
            fwd(
                "query",
                serde_json::json!({"queryParams": [{"name": "q", "exact": "a b"}]})
            ),
            fwd("post", serde_json::json!({"method": "POST"})),
        ]),
        serde_json::json!([["*"]]),
    );
    let r = |m, u, h: &[(&str, &str)]| route_name(&t, "h", m, u, h);
    assert_eq!(r("GET", "/", &[("x-user", "alice")]).unwrap(), "vh0:hdr");
    assert_eq!(r("GET", "/", &[("X-USER", "alice")]).unwrap(), "vh0:hdr");
    assert_eq!(
        r("GET", "/", &[("x-user", "Alice")]),
        None,
        "values are case sensitive"
    );
    // Several values: the first is matched.
    assert_eq!(
        r("GET", "/", &[("x-user", "alice"), ("x-user", "bob")]).unwrap(),
        "vh0:hdr"
    );
    assert_eq!(
        r("GET", "/", &[("x-user", "bob"), ("x-user", "alice")]),
        None
    );
    assert_eq!(r("GET", "/", &[("x-v", "v2")]).unwrap(), "vh0:hdr-re");
    assert_eq!(r("GET", "/", &[("x-v", "v22")]), None);
    assert_eq!(r("GET", "/?q=a%20b", &[]).unwrap(), "vh0:query");
    assert_eq!(r("GET", "/?z=1&q=a%20b&q=c", &[]).unwrap(), "vh0:query");
    assert_eq!(r("GET", "/?q=c&q=a%20b", &[]), None, "first occurrence");
    assert_eq!(r("POST", "/", &[]).unwrap(), "vh0:post");
    assert_eq!(r("GET", "/", &[]), None);
}

#[test]
fn hostname_precedence() {
    let t = table(
        serde_json::json!([fwd("r", serde_json::json!({}))]),
        serde_json::json!([
            ["*"],
            ["*.example.com"],
            ["*.a.example.com"],
            ["foo.a.example.com", "bar.com"]
        ]),
    );
    let r = |h| route_name(&t, h, "GET", "/", &[]).unwrap();
    assert_eq!(r("foo.a.example.com"), "vh3:r");
    assert_eq!(r("bar.com"), "vh3:r");
    assert_eq!(r("x.a.example.com"), "vh2:r");
    assert_eq!(r("x.y.a.example.com"), "vh2:r");
    assert_eq!(r("a.example.com"), "vh1:r");
    assert_eq!(
        r("example.com"),
        "vh0:r",
        "a wildcard needs at least one label"
    );
    assert_eq!(r("other.org"), "vh0:r");
    let t = table(
        serde_json::json!([fwd("r", serde_json::json!({}))]),
        serde_json::json!([["a.com"]]),
    );
    assert_eq!(
        route_name(&t, "b.com", "GET", "/", &[]),
        None,
        "no vhost → no route"
    );
}

#[test]
fn weights_are_prefix_summed_and_zero_is_never_chosen() {
    let c = cfg(serde_json::json!({
        "listeners": [{"name": "l", "port": 80, "virtualHosts": [{"name": "v", "hostnames": ["*"], "routes": [
            {"name": "r", "action": {"type": "forward", "backends": [
                {"target": {"backend": "b1"}, "weight": 80},
                {"target": {"invalid": "gone"}, "weight": 0},
                {"target": {"backend": "b2"}, "weight": 20}]}},
            {"name": "zero", "action": {"type": "forward", "backends": [
                {"target": {"backend": "b1"}, "weight": 0}]}}
        ]}]}],
        "backends": [{"name": "b1", "endpoints": ["127.0.0.1:1"]}, {"name": "b2"}],
    }));
    let t = build(&c, None);
    let Action::Forward(f) = &t.listeners[0].virtual_hosts[0].routes[0].action else {
        panic!()
    };
    assert_eq!(f.total_weight(), 100);
    let names: Vec<&str> = (0..100)
        .map(|r| f.pick_with(r).unwrap().target.name())
        .collect();
    assert_eq!(names.iter().filter(|n| **n == "b1").count(), 80);
    assert_eq!(names.iter().filter(|n| **n == "b2").count(), 20);
    assert!(names.iter().all(|n| !n.is_empty()), "weight 0 never chosen");
    let Action::Forward(z) = &t.listeners[0].virtual_hosts[0].routes[1].action else {
        panic!()
    };
    assert!(z.pick().is_none());
}

#[test]
fn round_robin_and_backend_reuse_across_builds() {
    let t = table(
        serde_json::json!([fwd("r", serde_json::json!({}))]),
        serde_json::json!([["*"]]),
    );
    let b2 = &t.upstreams["b2"];
    let picks: Vec<String> = (0..4).map(|_| b2.pick().unwrap().to_string()).collect();
    assert_eq!(
        picks,
        ["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:2", "127.0.0.1:3"]
    );
    assert!(t.upstreams["b1"].pick().is_some());
    let c = cfg(serde_json::json!({
        "backends": [{"name": "b1", "endpoints": ["127.0.0.1:1"]}, {"name": "b2", "endpoints": ["127.0.0.1:9"]}],
    }));
    let t2 = build(&c, Some(&t));
    assert!(Arc::ptr_eq(&t.upstreams["b1"], &t2.upstreams["b1"]));
    assert!(!Arc::ptr_eq(&t.upstreams["b2"], &t2.upstreams["b2"]));
}

#[test]
fn header_ops_set_add_remove_case_insensitive() {
    let ops = HeaderOps::compile(
        &serde_json::from_value(serde_json::json!({
            "set": [{"name": "X-Canary", "value": "v2"}],
            "add": [{"name": "X-Mesh", "value": "istio"}],
            "remove": ["X-Gone"]
        }))
        .unwrap(),
        "f",
    )
    .unwrap();
    let mut h = HeaderMap::new();
    h.append("x-canary", HeaderValue::from_static("a"));
    h.append("x-canary", HeaderValue::from_static("b"));
    h.append("x-mesh", HeaderValue::from_static("old"));
    h.append("x-gone", HeaderValue::from_static("1"));
    ops.apply(&mut h);
    assert_eq!(h.get_all("x-canary").iter().collect::<Vec<_>>(), ["v2"]);
    assert_eq!(
        h.get_all("x-mesh").iter().collect::<Vec<_>>(),
        ["old", "istio"]
    );
    assert!(h.get("x-gone").is_none());
}

#[test]
fn path_rewrites() {
    let full = PathRewrite::ReplaceFullPath("/new".into());
    assert_eq!(rewrite_path(&full, None, "/old/x"), "/new");
    let rp = |r: &str, p: &str, path: &str| {
        rewrite_path(&PathRewrite::ReplacePrefixMatch(r.into()), Some(p), path)
    };
    assert_eq!(rp("/xyz", "/foo", "/foo/bar"), "/xyz/bar");
    assert_eq!(rp("/xyz/", "/foo", "/foo/bar"), "/xyz/bar");
    assert_eq!(rp("/xyz", "/foo", "/foo"), "/xyz");
    assert_eq!(rp("/xyz", "/foo", "/foo/"), "/xyz/");
    assert_eq!(rp("/", "/foo", "/foo/bar"), "/bar");
    assert_eq!(rp("/", "/foo", "/foo"), "/");
    assert_eq!(rp("/xyz", "/", "/abc"), "/xyz/abc");
}

#[test]
fn query_decoding() {
    assert_eq!(
        parse_query("a=1&b=%41%2&c&&d=x=y"),
        vec![
            ("a".into(), "1".into()),
            ("b".into(), "A%2".into()),
            ("c".into(), String::new()),
            ("d".into(), "x=y".into())
        ]
    );
}

/// A listener with a limit at every scope: listener, route, backend, an inbound port.
fn limited_config(route_limit_tokens: u64) -> ProxyConfig {
    cfg(serde_json::json!({
        "rateLimits": [
            {"name": "gw", "maxTokens": 5, "tokensPerFill": 1, "fillInterval": "60s"},
            {"name": "route", "maxTokens": route_limit_tokens, "tokensPerFill": 1, "fillInterval": "60s"},
            {"name": "svc", "maxTokens": 7, "tokensPerFill": 1, "fillInterval": "60s"},
            {"name": "pod", "maxTokens": 9, "tokensPerFill": 1, "fillInterval": "60s"}],
        "listeners": [
            {"name": "l", "port": 80, "rateLimit": "gw", "virtualHosts": [{"name": "v", "hostnames": ["*"],
                "routes": [{"name": "r", "rateLimit": "route", "action": {"type": "forward",
                    "backends": [{"target": {"backend": "b1"}, "weight": 1}]}}]}]},
            {"name": "in", "port": 15006, "kind": "sidecarInbound",
                "inboundPorts": [{"port": 8080, "rateLimit": "pod"}, {"port": 9090}]}],
        "backends": [{"name": "b1", "endpoints": ["127.0.0.1:1"], "rateLimit": "svc"}],
    }))
}

fn route_and_backend(t: &RouteTable) -> (&CompiledRoute, &WeightedTarget) {
    let r = &t.listeners[0].virtual_hosts[0].routes[0];
    let Action::Forward(f) = &r.action else {
        panic!("not a forward")
    };
    (r, &f.backends[0])
}

#[test]
fn every_scope_holds_the_limiter_of_its_name() {
    let c = limited_config(3);
    let limiters = RateLimiters::build(&c.rate_limits, None);
    let t = RouteTable::build(&c, None, &limiters).unwrap();
    let same = |held: Option<&RateLimiter>, name: &str| {
        let held = held.unwrap_or_else(|| panic!("{name}: no limiter held"));
        assert_eq!(held.name(), name);
        assert!(Arc::ptr_eq(
            held.bucket(),
            limiters.get(name).unwrap().bucket()
        ));
    };
    same(t.listeners[0].rate_limit.as_ref(), "gw");
    let (r, b) = route_and_backend(&t);
    same(r.rate_limit.as_ref(), "route");
    same(b.rate_limit.as_ref(), "svc");
    same(t.listeners[1].inbound_limit(8080), "pod");
    assert!(t.listeners[1].inbound_limit(9090).is_none());
    assert!(t.listeners[1].rate_limit.is_none());
}

#[test]
fn a_reload_keeps_the_buckets_of_unchanged_limits() {
    let c = limited_config(3);
    let limiters = RateLimiters::build(&c.rate_limits, None);
    let t = RouteTable::build(&c, None, &limiters).unwrap();
    let (r, _) = route_and_backend(&t);
    let route_limit = r.rate_limit.as_ref().unwrap();
    assert!(route_limit.check().local_reply().is_none());
    assert_eq!(route_limit.bucket().available(), 2);

    // Same settings: the new table's handles share the old buckets (and their tokens).
    let limiters2 = RateLimiters::build(&c.rate_limits, Some(&limiters));
    let t2 = RouteTable::build(&c, Some(&t), &limiters2).unwrap();
    let (r2, b2) = route_and_backend(&t2);
    assert_eq!(r2.rate_limit.as_ref().unwrap().bucket().available(), 2);
    let (_, b) = route_and_backend(&t);
    assert!(Arc::ptr_eq(
        b.rate_limit.as_ref().unwrap().bucket(),
        b2.rate_limit.as_ref().unwrap().bucket()
    ));

    // The route's budget changes: its handle gets a fresh, full bucket; the others stay.
    let c3 = limited_config(4);
    let limiters3 = RateLimiters::build(&c3.rate_limits, Some(&limiters2));
    let t3 = RouteTable::build(&c3, Some(&t2), &limiters3).unwrap();
    let (r3, b3) = route_and_backend(&t3);
    assert_eq!(r3.rate_limit.as_ref().unwrap().bucket().available(), 4);
    assert!(Arc::ptr_eq(
        b2.rate_limit.as_ref().unwrap().bucket(),
        b3.rate_limit.as_ref().unwrap().bucket()
    ));
}

#[test]
fn a_limit_missing_from_the_limiters_is_a_build_error() {
    let c = limited_config(3);
    let e = RouteTable::build(&c, None, &RateLimiters::default()).unwrap_err();
    assert_eq!(e.path, "backends[0].rateLimit");
    assert_eq!(e.message, "no rate limit named \"svc\"");
}
