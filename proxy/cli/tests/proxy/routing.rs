use std::time::Duration;

use mesh_proxy::testing::{EchoServer, ResetServer, TestClient, closed_port, get};
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn hostnames_exact_wildcard_and_precedence() {
    let (a, b, c, d) = tokio::join!(
        EchoServer::start("any"),
        EchoServer::start("wild"),
        EchoServer::start("deeper-wild"),
        EchoServer::start("exact"),
    );
    let vh = |name: &str, hosts: serde_json::Value, be: &str| {
        json!({"name": name, "hostnames": hosts,
               "routes": [forward(&format!("r-{name}"), json!({}), be)]})
    };
    let env = start(json!({
        "listeners": [{"name": "l", "port": 0, "virtualHosts": [
            vh("any", json!(["*"]), "a"),
            vh("wild", json!(["*.example.com"]), "b"),
            vh("deeper", json!(["*.api.example.com"]), "c"),
            vh("exact", json!(["www.example.com", "api.example.com"]), "d"),
        ]}],
        "backends": [backend("a", &[a.endpoint()]), backend("b", &[b.endpoint()]),
                     backend("c", &[c.endpoint()]), backend("d", &[d.endpoint()])],
    }))
    .await;
    let client = TestClient::http1();
    for (host, want) in [
        ("www.example.com", "exact"),
        ("WWW.Example.com:8080", "exact"),
        ("api.example.com", "exact"),
        ("v1.api.example.com", "deeper-wild"),
        ("x.y.api.example.com", "deeper-wild"),
        ("foo.example.com", "wild"),
        ("example.com", "any"),
        ("other.org", "any"),
    ] {
        let r = client.get(&env.url("/"), &[("host", host)]).await.unwrap();
        assert_eq!(r.status, 200, "{host}");
        assert_eq!(r.echo().name, want, "host {host}");
        assert_eq!(
            r.echo().header("host"),
            Some(host),
            "Host is forwarded as sent"
        );
    }
}

#[tokio::test]
async fn no_virtual_host_or_route_is_404() {
    let a = EchoServer::start("a").await;
    let env = start(json!({
        "listeners": [{"name": "l", "port": 0, "virtualHosts": [{"name": "v",
            "hostnames": ["a.com"],
            "routes": [forward("r", json!({"path": {"type": "prefix", "value": "/abc"}}), "a")]}]}],
        "backends": [backend("a", &[a.endpoint()])],
    }))
    .await;
    let c = TestClient::http1();
    let r = c.get(&env.url("/abc"), &[("host", "b.com")]).await.unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), "no route matched\n");
    let r = c
        .get(&env.url("/abcd"), &[("host", "a.com")])
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    let r = c
        .get(&env.url("/abc/d"), &[("host", "a.com")])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(a.requests().iter().all(|s| s.path == "/abc/d"));
}

#[tokio::test]
async fn path_header_query_method_matches_first_match_wins() {
    let names = [
        "exact", "prefix", "regex", "header", "query", "method", "fallback",
    ];
    let mut servers = Vec::new();
    for n in names {
        servers.push(EchoServer::start(n).await);
    }
    let routes = json!([
        forward(
            "exact",
            json!({"path": {"type": "exact", "value": "/abc"}}),
            "exact"
        ),
        forward(
            "prefix",
            json!({"path": {"type": "prefix", "value": "/abc"}}),
            "prefix"
        ),
        forward(
            "regex",
            json!({"path": {"type": "regex", "value": "/items/[0-9]+"}}),
            "regex"
        ),
        forward(
            "header",
            json!({"headers": [{"name": "X-Version", "exact": "v2"}]}),
            "header"
        ),
        forward(
            "query",
            json!({"queryParams": [{"name": "debug", "regex": "1|true"}]}),
            "query"
        ),
        forward("method", json!({"method": "DELETE"}), "method"),
        forward(
            "first-wins-shadowed",
            json!({"path": {"type": "exact", "value": "/abc"}}),
            "fallback"
        ),
        forward("fallback", json!({}), "fallback"),
    ]);
    let backends: Vec<_> = servers
        .iter()
        .map(|s| backend(&s.name, &[s.endpoint()]))
        .collect();
    let env = start(gateway(routes, json!(backends))).await;
    let c = TestClient::http1();
    let send = |method: &'static str, path: &str, hdrs: Vec<(&'static str, &'static str)>| {
        let url = env.url(path);
        let c = c.clone();
        async move {
            let mut b = http::Request::builder().method(method).uri(url);
            for (k, v) in hdrs {
                b = b.header(k, v);
            }
            let r = c
                .send(b.body(mesh_proxy::body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(r.status, 200);
            r.echo().name
        }
    };
    assert_eq!(send("GET", "/abc", vec![]).await, "exact");
    assert_eq!(
        send("GET", "/abc?x=1", vec![]).await,
        "exact",
        "Exact ignores the query"
    );
    assert_eq!(send("GET", "/abc/", vec![]).await, "prefix");
    assert_eq!(send("GET", "/abc/def", vec![]).await, "prefix");
    assert_eq!(
        send("GET", "/abcd", vec![]).await,
        "fallback",
        "/abc does not match /abcd"
    );
    assert_eq!(send("GET", "/items/42", vec![]).await, "regex");
    assert_eq!(
        send("GET", "/items/42/x", vec![]).await,
        "fallback",
        "regex is anchored"
    );
    assert_eq!(send("GET", "/", vec![("x-version", "v2")]).await, "header");
    assert_eq!(
        send("GET", "/", vec![("x-version", "v3")]).await,
        "fallback"
    );
    assert_eq!(send("GET", "/?debug=true", vec![]).await, "query");
    assert_eq!(send("GET", "/?debug=no", vec![]).await, "fallback");
    assert_eq!(send("DELETE", "/", vec![]).await, "method");
    assert_eq!(
        send("DELETE", "/abc", vec![]).await,
        "exact",
        "first match wins"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_split_statistically_and_weight_zero_is_never_chosen() {
    let (v1, v2, never) = tokio::join!(
        EchoServer::start("myapp v1"),
        EchoServer::start("myapp v2"),
        EchoServer::start("never"),
    );
    let env = start(gateway(
        json!([{"name": "canary", "action": {"type": "forward", "backends": [
            {"target": {"backend": "v1"}, "weight": 80},
            {"target": {"backend": "never"}, "weight": 0},
            {"target": {"backend": "v2"}, "weight": 20}]}}]),
        json!([
            backend("v1", &[v1.endpoint()]),
            backend("v2", &[v2.endpoint()]),
            backend("never", &[never.endpoint()])
        ]),
    ))
    .await;
    let c = TestClient::http1();
    let n = 1000u32;
    let p = 0.2;
    let sd = (f64::from(n) * p * (1.0 - p)).sqrt();
    let expected = f64::from(n) * p;
    // A correct 80/20 split lands outside 3 standard deviations in 0.3% of samples; a second,
    // independent sample makes a false alarm a 1-in-100,000 event while a wrong split (say
    // 75/25, 6 sd away) still fails both.
    let mut total_v2 = 0;
    let mut sent = 0;
    for attempt in 1..=2 {
        let mut handles = Vec::new();
        for w in 0..8 {
            let c = c.clone();
            let url = env.url("/");
            handles.push(tokio::spawn(async move {
                let mut v2 = 0u32;
                for _ in (w..n).step_by(8) {
                    let r = c.get(&url, &[]).await.unwrap();
                    assert_eq!(r.status, 200);
                    if r.header("x-echo-name") == Some("myapp v2") {
                        v2 += 1;
                    }
                }
                v2
            }));
        }
        let mut v2 = 0;
        for h in handles {
            v2 += h.await.unwrap();
        }
        total_v2 += v2;
        sent += n;
        eprintln!("weights: v2 got {v2} of {n} (sample {attempt})");
        if (f64::from(v2) - expected).abs() <= 3.0 * sd {
            break;
        }
        assert!(
            attempt < 2,
            "v2 got {v2} of {n} twice outside {expected} ± {:.1}",
            3.0 * sd
        );
    }
    assert_eq!(never.requests().len(), 0, "weight 0 is never chosen");
    assert_eq!(v1.requests().len() + total_v2 as usize, sent as usize);
}

#[tokio::test]
async fn failures_map_to_500_503_504_502() {
    let (ok, slow, reset) = tokio::join!(
        EchoServer::start("ok"),
        EchoServer::slow("slow", Duration::from_millis(800)),
        ResetServer::start(),
    );
    let closed = closed_port().await;
    let env = start(gateway(
        json!([
            {"name": "invalid", "match": {"path": {"type": "prefix", "value": "/invalid"}},
             "action": {"type": "forward", "backends": [
                {"target": {"invalid": "Service demo/gone not found"}, "weight": 1}]}},
            {"name": "zero", "match": {"path": {"type": "prefix", "value": "/zero"}},
             "action": {"type": "forward", "backends": [
                {"target": {"backend": "ok"}, "weight": 0}]}},
            {"name": "none", "match": {"path": {"type": "prefix", "value": "/none"}},
             "action": {"type": "forward", "backends": []}},
            forward("empty", json!({"path": {"type": "prefix", "value": "/empty"}}), "empty"),
            forward("refused", json!({"path": {"type": "prefix", "value": "/refused"}}), "refused"),
            forward("reset", json!({"path": {"type": "prefix", "value": "/reset"}}), "reset"),
            {"name": "timeout", "match": {"path": {"type": "prefix", "value": "/timeout"}},
             "timeouts": {"request": "200ms"},
             "action": {"type": "forward", "backends": [{"target": {"backend": "slow"}, "weight": 1}]}},
            {"name": "backend-timeout", "match": {"path": {"type": "prefix", "value": "/btimeout"}},
             "timeouts": {"backendRequest": "200ms", "request": "10s"},
             "action": {"type": "forward", "backends": [{"target": {"backend": "slow"}, "weight": 1}]}},
            {"name": "in-time", "match": {"path": {"type": "prefix", "value": "/intime"}},
             "timeouts": {"request": "5s"},
             "action": {"type": "forward", "backends": [{"target": {"backend": "slow"}, "weight": 1}]}},
        ]),
        json!([backend("ok", &[ok.endpoint()]), backend("empty", &[]),
               backend("refused", &[closed.to_string()]), backend("reset", &[reset.endpoint()]),
               backend("slow", &[slow.endpoint()])]),
    ))
    .await;
    let c = TestClient::http1();
    for (path, status, body) in [
        ("/invalid", 500, "invalid backend\n"),
        ("/zero", 500, "no backend with a non-zero weight\n"),
        ("/none", 500, "no backend with a non-zero weight\n"),
        ("/empty", 503, "no healthy upstream\n"),
        ("/refused", 503, "upstream connect error\n"),
        ("/reset", 502, "upstream reset before response headers\n"),
        ("/timeout", 504, "upstream request timeout\n"),
        ("/btimeout", 504, "upstream request timeout\n"),
    ] {
        // A 504 is the timeout firing: the slow backend would have answered 200 (/intime).
        let r = c.get(&env.url(path), &[]).await.unwrap();
        assert_eq!(r.status, status, "{path}: {}", r.text());
        assert_eq!(r.text(), body, "{path}");
        assert_eq!(r.header("content-type"), Some("text/plain"));
    }
    let r = c.get(&env.url("/intime"), &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(ok.requests().len(), 0);
    let m = env.proxy.metrics().encode();
    assert!(m.contains("kind=\"timeout\""), "{m}");
    assert!(m.contains("kind=\"connect\""), "{m}");
    assert!(m.contains("kind=\"reset\""), "{m}");
}

#[tokio::test]
async fn header_modifiers_on_request_and_response() {
    let v1 = EchoServer::start("myapp v1").await;
    let modifier = json!({
        "set": [{"name": "X-Canary", "value": "v2-20pct"}],
        "add": [{"name": "X-Mesh", "value": "istio"}],
        "remove": ["X-Drop"]
    });
    let mut req_mod = modifier.clone();
    req_mod["type"] = json!("requestHeaderModifier");
    let mut resp_mod = modifier.clone();
    resp_mod["type"] = json!("responseHeaderModifier");
    let env = start(gateway(
        json!([{"name": "r", "filters": [req_mod, resp_mod],
                "action": {"type": "forward", "backends": [
                    {"target": {"backend": "v1"}, "weight": 1,
                     "filters": [{"type": "requestHeaderModifier",
                                  "add": [{"name": "x-backend-filter", "value": "yes"}]},
                                 {"type": "responseHeaderModifier",
                                  "set": [{"name": "x-from-backend-filter", "value": "1"}]}]}]}}]),
        json!([backend("v1", &[v1.endpoint()])]),
    ))
    .await;
    let r = TestClient::http1()
        .get(
            &env.url("/"),
            &[("x-canary", "old"), ("X-MESH", "client"), ("x-drop", "1")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let seen = &v1.requests()[0].headers;
    assert_eq!(
        seen.get_all("x-canary").iter().collect::<Vec<_>>(),
        ["v2-20pct"]
    );
    assert_eq!(
        seen.get_all("x-mesh").iter().collect::<Vec<_>>(),
        ["client", "istio"]
    );
    assert!(seen.get("x-drop").is_none());
    assert_eq!(seen["x-backend-filter"], "yes");
    assert_eq!(
        r.headers.get_all("x-canary").iter().collect::<Vec<_>>(),
        ["v2-20pct"]
    );
    assert_eq!(
        r.headers.get_all("x-mesh").iter().collect::<Vec<_>>(),
        ["istio"]
    );
    assert_eq!(r.header("x-from-backend-filter"), Some("1"));
}

#[tokio::test]
async fn redirect_and_direct_response() {
    let env = start(gateway(
        json!([
            {"name": "to-https", "match": {"path": {"type": "prefix", "value": "/secure"}},
             "action": {"type": "redirect", "scheme": "https", "statusCode": 301}},
            {"name": "move", "match": {"path": {"type": "prefix", "value": "/old"}},
             "action": {"type": "redirect", "hostname": "new.example.com",
                        "path": {"type": "replacePrefixMatch", "value": "/new"}}},
            {"name": "port", "match": {"path": {"type": "exact", "value": "/port"}},
             "action": {"type": "redirect", "port": 8443,
                        "path": {"type": "replaceFullPath", "value": "/p"}}},
            {"name": "direct", "match": {"path": {"type": "exact", "value": "/teapot"}},
             "filters": [{"type": "responseHeaderModifier", "add": [{"name": "x-tea", "value": "1"}]}],
             "action": {"type": "directResponse", "status": 418, "body": "short and stout"}},
        ]),
        json!([]),
    ))
    .await;
    let c = TestClient::http1();
    let r = c
        .get(&env.url("/secure/x?a=1"), &[("host", "shop.com")])
        .await
        .unwrap();
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("https://shop.com/secure/x?a=1"));
    let r = c
        .get(&env.url("/old/page"), &[("host", "shop.com:8080")])
        .await
        .unwrap();
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location"),
        Some("http://new.example.com:8080/new/page")
    );
    let r = c
        .get(&env.url("/port"), &[("host", "shop.com")])
        .await
        .unwrap();
    assert_eq!(r.header("location"), Some("http://shop.com:8443/p"));
    let r = c.get(&env.url("/teapot"), &[]).await.unwrap();
    assert_eq!(r.status, 418);
    assert_eq!(r.text(), "short and stout");
    assert_eq!(r.header("x-tea"), Some("1"));
}

#[tokio::test]
async fn url_rewrites_hostname_full_path_and_prefix() {
    let a = EchoServer::start("a").await;
    let env = start(gateway(
        json!([
            {"name": "prefix", "match": {"path": {"type": "prefix", "value": "/api/v1"}},
             "filters": [{"type": "urlRewrite", "hostname": "internal.svc",
                          "path": {"type": "replacePrefixMatch", "value": "/v2"}}],
             "action": {"type": "forward", "backends": [{"target": {"backend": "a"}, "weight": 1}]}},
            {"name": "strip", "match": {"path": {"type": "prefix", "value": "/strip/"}},
             "filters": [{"type": "urlRewrite", "path": {"type": "replacePrefixMatch", "value": "/"}}],
             "action": {"type": "forward", "backends": [{"target": {"backend": "a"}, "weight": 1}]}},
            {"name": "full", "match": {"path": {"type": "prefix", "value": "/full"}},
             "filters": [{"type": "urlRewrite", "path": {"type": "replaceFullPath", "value": "/replaced"}}],
             "action": {"type": "forward", "backends": [{"target": {"backend": "a"}, "weight": 1}]}},
        ]),
        json!([backend("a", &[a.endpoint()])]),
    ))
    .await;
    let c = TestClient::http1();
    for (path, want_path, want_host) in [
        ("/api/v1/users?id=3", "/v2/users?id=3", "internal.svc"),
        ("/api/v1", "/v2", "internal.svc"),
        ("/strip/x/y", "/x/y", "orig.com"),
        ("/strip", "/", "orig.com"),
        ("/full/deep/path?q=1", "/replaced?q=1", "orig.com"),
    ] {
        let r = c
            .get(&env.url(path), &[("host", "orig.com")])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{path}");
        let e = r.echo();
        assert_eq!(e.path, want_path, "{path}");
        assert_eq!(e.header("host"), Some(want_host), "{path}");
    }
}

#[tokio::test]
async fn mirror_backend_sees_a_copy() {
    let (main, mirror) = tokio::join!(EchoServer::start("main"), EchoServer::start("mirror"));
    let env = start(gateway(
        json!([{"name": "r", "action": {"type": "forward",
            "backends": [{"target": {"backend": "main"}, "weight": 1}],
            "mirrors": [{"target": {"backend": "mirror"}},
                        {"target": {"invalid": "gone"}}]}}]),
        json!([
            backend("main", &[main.endpoint()]),
            backend("mirror", &[mirror.endpoint()])
        ]),
    ))
    .await;
    let req = http::Request::post(env.url("/m?x=1"))
        .header("x-test", "copied")
        .body(mesh_proxy::testing::body("payload"))
        .unwrap();
    let r = TestClient::http1().send(req).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().name, "main");
    assert_eq!(r.echo().body, "payload");
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen = mirror.requests();
        if !seen.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen.len(), 1, "the mirror got the copy");
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].path, "/m?x=1");
    assert_eq!(seen[0].headers["x-test"], "copied");
    assert_eq!(&seen[0].body[..], b"payload");
}

#[tokio::test]
async fn unreachable_mirror_does_not_affect_the_response() {
    let main = EchoServer::start("main").await;
    let closed = closed_port().await;
    let env = start(gateway(
        json!([{"name": "r", "action": {"type": "forward",
            "backends": [{"target": {"backend": "main"}, "weight": 1}],
            "mirrors": [{"target": {"backend": "dead"}, "percent": 100}]}}]),
        json!([
            backend("main", &[main.endpoint()]),
            backend("dead", &[closed.to_string()])
        ]),
    ))
    .await;
    let r = get(&env.url("/")).await.unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_at_listener_route_and_backend_scope() {
    let (a, b) = tokio::join!(EchoServer::start("a"), EchoServer::start("b"));
    let limit = |name: &str, n: u64| {
        json!({"name": name, "maxTokens": n, "tokensPerFill": n, "fillInterval": "60s",
               "responseHeadersToAdd": [{"name": "x-rate-limited", "value": "TOO_MANY_REQUESTS"}]})
    };
    let mut cfg = gateway(
        json!([
            {"name": "route-limited", "match": {"path": {"type": "prefix", "value": "/r"}},
             "rateLimit": "route",
             "filters": [{"type": "responseHeaderModifier",
                          "set": [{"name": "x-canary", "value": "v2-20pct"}],
                          "add": [{"name": "x-mesh", "value": "istio"}]}],
             "action": {"type": "forward", "backends": [{"target": {"backend": "a"}, "weight": 1}]}},
            forward("backend-limited", json!({"path": {"type": "prefix", "value": "/b"}}), "b"),
            {"name": "with-headers", "match": {"path": {"type": "prefix", "value": "/x"}},
             "rateLimit": "xrl",
             "action": {"type": "forward", "backends": [{"target": {"backend": "a"}, "weight": 1}]}},
            forward("listener-only", json!({}), "a"),
        ]),
        json!([backend("a", &[a.endpoint()]),
               {"name": "b", "endpoints": [b.endpoint()], "rateLimit": "backend"}]),
    );
    cfg["listeners"][0]["rateLimit"] = json!("listener");
    let mut xrl = limit("xrl", 2);
    xrl["xRatelimitHeaders"] = json!(true);
    cfg["rateLimits"] = json!([
        limit("listener", 1000),
        limit("route", 10),
        limit("backend", 5),
        xrl
    ]);
    let env = start(cfg).await;
    let c = TestClient::http1();
    let burst = |path: &'static str| {
        let c = c.clone();
        let url = env.url(path);
        async move {
            let rs = futures::future::join_all((0..100).map(|_| c.get(&url, &[]))).await;
            rs.into_iter().map(Result::unwrap).collect::<Vec<_>>()
        }
    };
    let rs = burst("/r").await;
    let ok = rs.iter().filter(|r| r.status == 200).count();
    let limited: Vec<_> = rs.iter().filter(|r| r.status == 429).collect();
    assert_eq!((ok, limited.len()), (10, 90));
    let l = limited[0];
    assert_eq!(l.text(), "local_rate_limited");
    assert_eq!(l.header("content-length"), Some("18"));
    assert_eq!(l.header("content-type"), Some("text/plain"));
    assert_eq!(l.header("x-rate-limited"), Some("TOO_MANY_REQUESTS"));
    assert_eq!(
        l.header("x-canary"),
        Some("v2-20pct"),
        "route's response filter applies"
    );
    assert_eq!(l.header("x-mesh"), Some("istio"));
    assert!(
        rs.iter()
            .filter(|r| r.status == 200)
            .all(|r| r.header("x-rate-limited").is_none())
    );

    let rs = burst("/b").await;
    assert_eq!(rs.iter().filter(|r| r.status == 200).count(), 5);
    assert_eq!(b.requests().len(), 5);

    // The listener's budget (1000) has been charged for all 200 requests so far.
    let rs = burst("/other").await;
    assert_eq!(rs.iter().filter(|r| r.status == 200).count(), 100);
    let remaining = env
        .proxy
        .rate_limiters()
        .get("listener")
        .unwrap()
        .bucket()
        .available();
    assert_eq!(remaining, 700);
    let m = env.proxy.metrics();
    assert_eq!(m.rate_limited_count("l", "route-limited", "route"), 90);

    // x-ratelimit-* headers of the limit that asked for them, on allowed and limited responses.
    let r = c.get(&env.url("/x"), &[]).await.unwrap();
    assert_eq!(
        (
            r.status.as_u16(),
            r.header("x-ratelimit-limit"),
            r.header("x-ratelimit-remaining")
        ),
        (200, Some("2"), Some("1"))
    );
    let _ = c.get(&env.url("/x"), &[]).await.unwrap();
    let r = c.get(&env.url("/x"), &[]).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.header("x-ratelimit-remaining")),
        (429, Some("0"))
    );
}

/// Tokens come back after the fill interval, over real sockets and real time: the bucket
/// empties, stays empty within the interval, and gets exactly `tokensPerFill` back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_tokens_come_back_after_the_interval() {
    let a = EchoServer::start("a").await;
    let mut cfg = gateway(
        json!([{"name": "r", "rateLimit": "short",
                "action": {"type": "forward", "backends": [{"target": {"backend": "a"}, "weight": 1}]}}]),
        json!([backend("a", &[a.endpoint()])]),
    );
    cfg["rateLimits"] =
        json!([{"name": "short", "maxTokens": 3, "tokensPerFill": 2, "fillInterval": "600ms"}]);
    let env = start(cfg).await;
    let c = TestClient::http1();
    let statuses = |n: usize| {
        let c = c.clone();
        let url = env.url("/");
        async move {
            let mut out = Vec::new();
            for _ in 0..n {
                out.push(c.get(&url, &[]).await.unwrap().status.as_u16());
            }
            out
        }
    };
    // The bucket's fill boundaries count from its creation; start right after one so the
    // first phase below cannot straddle a fill.
    let bucket = env
        .proxy
        .rate_limiters()
        .get("short")
        .unwrap()
        .bucket()
        .clone();
    tokio::time::sleep(bucket.time_until_next_fill() + Duration::from_millis(20)).await;
    let _ = statuses(4).await; // drain whatever is there
    assert_eq!(statuses(2).await, [429, 429], "empty within the interval");
    tokio::time::sleep(bucket.time_until_next_fill() + Duration::from_millis(50)).await;
    assert_eq!(
        statuses(3).await,
        [200, 200, 429],
        "tokensPerFill (2) came back"
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(
        statuses(4).await,
        [200, 200, 200, 429],
        "refilled, but never above maxTokens (3)"
    );
}

/// Whichever step ends a request, its response is finished the same way: the route's
/// response filters, then the chosen backend's, then the `x-ratelimit-*` headers of the
/// limits that let it through (a limited answer carries only its own limit's headers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_is_finished_with_the_filters_and_limit_headers_it_reached() {
    let a = EchoServer::start("a").await;
    let set = |name: &str, value: &str| json!([{"type": "responseHeaderModifier", "set": [{"name": name, "value": value}]}]);
    let mut cfg = gateway(
        json!([
            {"name": "limited", "match": {"path": {"type": "prefix", "value": "/limited"}},
             "filters": set("x-route", "limited"),
             "action": {"type": "forward", "backends": [{"target": {"backend": "a"}, "weight": 1,
                 "filters": set("x-backend", "a")}]}},
            {"name": "empty", "match": {"path": {"type": "prefix", "value": "/empty"}},
             "filters": set("x-route", "empty"),
             "action": {"type": "forward", "backends": [{"target": {"backend": "none"}, "weight": 1,
                 "filters": set("x-backend", "none")}]}},
        ]),
        json!([{"name": "a", "endpoints": [a.endpoint()], "rateLimit": "svc"},
               {"name": "none"}]),
    );
    cfg["listeners"][0]["rateLimit"] = json!("gw");
    cfg["rateLimits"] = json!([
        {"name": "gw", "maxTokens": 1000, "tokensPerFill": 1, "fillInterval": "60s",
         "xRatelimitHeaders": true},
        {"name": "svc", "maxTokens": 1, "tokensPerFill": 1, "fillInterval": "60s",
         "responseHeadersToAdd": [{"name": "x-limited-by", "value": "svc"}]},
    ]);
    let env = start(cfg).await;
    let c = TestClient::http1();
    let seen = |r: &mesh_proxy::testing::TestResponse| {
        (
            r.status.as_u16(),
            r.header("x-route").map(str::to_owned),
            r.header("x-backend").map(str::to_owned),
            r.header("x-limited-by").map(str::to_owned),
            r.header("x-ratelimit-remaining").map(str::to_owned),
        )
    };
    let s = |v: &str| Some(v.to_owned());

    // Forwarded: both filters and the listener limit's headers.
    let r = c.get(&env.url("/limited"), &[]).await.unwrap();
    assert_eq!(seen(&r), (200, s("limited"), s("a"), None, s("999")));
    assert_eq!(r.echo().name, "a");
    // Refused by the backend's limit: both filters, the limit's own headers, and not the
    // headers of the listener limit that let it through.
    let r = c.get(&env.url("/limited"), &[]).await.unwrap();
    assert_eq!(seen(&r), (429, s("limited"), s("a"), s("svc"), None));
    assert_eq!(r.text(), "local_rate_limited");
    // A failure after the limits: the filters it reached and the limits' headers.
    let r = c.get(&env.url("/empty"), &[]).await.unwrap();
    assert_eq!(seen(&r), (503, s("empty"), s("none"), None, s("997")));
    assert_eq!(r.text(), "no healthy upstream\n");
    // No route: only the listener limit's headers.
    let r = c.get(&env.url("/elsewhere"), &[]).await.unwrap();
    assert_eq!(seen(&r), (404, None, None, None, s("996")));

    let m = env.proxy.metrics();
    assert_eq!(m.rate_limited_count("l", "limited", "svc"), 1);
    assert_eq!(m.requests_count("l", "empty", "none", 503), 1);
    assert_eq!(a.requests().len(), 1);
}
