//! The webhook over real HTTPS: bad input, limits, stalls, health, metrics, reloads,
//! and a latency measurement.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshctl::inject::InjectionConfig;
use meshctl::net_limits::ConnectionLimits;
use meshctl::webhook::{Limits, StaticNamespaces};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn small_limits() -> Limits {
    Limits {
        max_body_bytes: 64 * 1024,
        body_timeout: Duration::from_millis(500),
        connections: ConnectionLimits {
            tls_handshake_timeout: Duration::from_millis(500),
            request_headers_timeout: Duration::from_millis(500),
            ..ConnectionLimits::webhook()
        },
    }
}

fn pod(containers: usize) -> Value {
    let cs: Vec<_> = (0..containers)
        .map(|i| json!({"name": format!("c{i}"), "image": "app:1"}))
        .collect();
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "web-", "namespace": "demo", "labels": {"app": "web"}}, "spec": {"containers": cs}})
}

async fn server(limits: Limits) -> common::Server {
    common::start(
        InjectionConfig::default(),
        Arc::new(common::AllEnabled),
        limits,
    )
    .await
}

fn error_of(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    v["error"].as_str().unwrap_or("").to_owned()
}

#[tokio::test]
async fn bad_requests_get_clear_4xx() {
    let s = server(small_limits()).await;
    let mut c = common::Client::connect(s.addr, &s.cert.der).await;
    let good = common::review_for(&pod(1), "demo", "u1");
    let mut wrong_version = good.clone();
    wrong_version["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let mut wrong_kind = good.clone();
    wrong_kind["kind"] = json!("TokenReview");
    let mut no_request = good.clone();
    no_request.as_object_mut().unwrap().remove("request");
    let mut no_uid = good.clone();
    no_uid["request"].as_object_mut().unwrap().remove("uid");
    let mut no_object = good.clone();
    no_object["request"]
        .as_object_mut()
        .unwrap()
        .remove("object");
    let mut bad_operation = good.clone();
    bad_operation["request"]["operation"] = json!(42);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("invalid JSON", b"{not json".to_vec(), "not valid JSON"),
        (
            "YAML body",
            b"apiVersion: admission.k8s.io/v1\nkind: AdmissionReview\n".to_vec(),
            "not valid JSON",
        ),
        ("empty body", Vec::new(), "not valid JSON"),
        ("array", b"[1,2]".to_vec(), "JSON object"),
        (
            "wrong apiVersion",
            serde_json::to_vec(&wrong_version).unwrap(),
            "apiVersion must be admission.k8s.io/v1",
        ),
        (
            "wrong kind",
            serde_json::to_vec(&wrong_kind).unwrap(),
            "kind must be AdmissionReview",
        ),
        (
            "no request",
            serde_json::to_vec(&no_request).unwrap(),
            "no request",
        ),
        ("no uid", serde_json::to_vec(&no_uid).unwrap(), "uid"),
        (
            "no object",
            serde_json::to_vec(&no_object).unwrap(),
            "request.object is missing",
        ),
        (
            "bad field type",
            serde_json::to_vec(&bad_operation).unwrap(),
            "request.operation",
        ),
    ];
    for (name, body, want) in cases {
        let (status, resp) = c.post("/inject", body).await;
        assert_eq!(status, 400, "{name}: {}", String::from_utf8_lossy(&resp));
        let e = error_of(&resp);
        assert!(e.contains(want), "{name}: error {e:?} lacks {want:?}");
    }
    // The server is still fine afterwards.
    let (status, resp) = c.post("/inject", serde_json::to_vec(&good).unwrap()).await;
    assert_eq!(status, 200);
    assert!(common::decode_response(&resp, "u1").1.is_some());
    let (status, _) = c.get("/inject").await;
    assert_eq!(status, 405);
    let (status, _) = c.get("/nope").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn objects_we_must_not_touch_are_allowed_without_patch() {
    let s = server(small_limits()).await;
    let mut c = common::Client::connect(s.addr, &s.cert.der).await;
    // Not a pod.
    let mut svc = common::review_for(
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}}),
        "demo",
        "svc",
    );
    svc["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "Service"});
    // A pod UPDATE.
    let mut update = common::review_for(&pod(1), "demo", "upd");
    update["request"]["operation"] = json!("UPDATE");
    // A pod in kube-system, and one that opts out.
    let sys = common::review_for(&pod(1), "kube-system", "sys");
    let mut out = pod(1);
    out["metadata"]["annotations"] = json!({"sidecar.meshctl.io/inject": "false"});
    let opt_out = common::review_for(&out, "demo", "out");
    for (uid, review) in [
        ("svc", svc),
        ("upd", update),
        ("sys", sys),
        ("out", opt_out),
    ] {
        let (status, resp) = c
            .post("/inject", serde_json::to_vec(&review).unwrap())
            .await;
        assert_eq!(status, 200, "{uid}");
        let (allowed, patch) = common::decode_response(&resp, uid);
        assert!(allowed && patch.is_none(), "{uid}");
    }
    // A pod whose annotation is invalid is denied with the annotation named.
    let mut bad = pod(1);
    bad["metadata"]["annotations"] = json!({"sidecar.meshctl.io/proxyCPU": "lots"});
    let (status, resp) = c
        .post(
            "/inject",
            serde_json::to_vec(&common::review_for(&bad, "demo", "bad")).unwrap(),
        )
        .await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(v["response"]["allowed"], false);
    let msg = v["response"]["status"]["message"].as_str().unwrap();
    assert!(msg.contains("sidecar.meshctl.io/proxyCPU"), "{msg}");
}

#[tokio::test]
async fn namespace_labels_come_from_the_lookup() {
    let ns = StaticNamespaces(
        [
            (
                "on".to_string(),
                [("istio-injection".to_string(), "enabled".to_string())].into(),
            ),
            (
                "off".to_string(),
                [("mesh-injection".to_string(), "disabled".to_string())].into(),
            ),
        ]
        .into(),
    );
    let s = common::start(InjectionConfig::default(), Arc::new(ns), small_limits()).await;
    let mut c = common::Client::connect(s.addr, &s.cert.der).await;
    for (ns, want) in [("on", true), ("off", false), ("unlabelled", false)] {
        let (status, resp) = c
            .post(
                "/inject",
                serde_json::to_vec(&common::review_for(&pod(1), ns, ns)).unwrap(),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(common::decode_response(&resp, ns).1.is_some(), want, "{ns}");
    }
}

#[tokio::test]
async fn hundreds_of_containers() {
    let s = server(Limits::default()).await;
    let mut c = common::Client::connect(s.addr, &s.cert.der).await;
    let p = pod(300);
    let (status, resp) = c
        .post(
            "/inject",
            serde_json::to_vec(&common::review_for(&p, "demo", "big")).unwrap(),
        )
        .await;
    assert_eq!(status, 200);
    let (_, patch) = common::decode_response(&resp, "big");
    let mut got = p.clone();
    json_patch::patch(&mut got, &patch.unwrap()).unwrap();
    assert_eq!(got["spec"]["containers"].as_array().unwrap().len(), 300);
    assert_eq!(got["spec"]["initContainers"][1]["name"], "mesh-proxy");
}

#[tokio::test]
async fn body_over_limit_is_413() {
    let s = server(small_limits()).await;
    let mut c = common::Client::connect(s.addr, &s.cert.der).await;
    let mut p = pod(1);
    p["metadata"]["annotations"] = json!({"big": "x".repeat(100 * 1024)});
    let body = serde_json::to_vec(&common::review_for(&p, "demo", "huge")).unwrap();
    let (status, resp) = c.post("/inject", body.clone()).await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&resp));
    // Also without a Content-Length (chunked), caught while reading.
    let mut tls = common::tls_connect(s.addr, &s.cert.der).await.unwrap();
    let mut req = b"POST /inject HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    req.extend(format!("{:x}\r\n", body.len()).as_bytes());
    req.extend(&body);
    req.extend(b"\r\n0\r\n\r\n");
    let _ = tls.write_all(&req).await;
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut resp)).await;
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}

#[tokio::test]
async fn stalled_requests_time_out() {
    let s = server(small_limits()).await;
    // Body stalls: headers promise 1000 bytes, 10 arrive.
    let mut tls = common::tls_connect(s.addr, &s.cert.der).await.unwrap();
    tls.write_all(
        b"POST /inject HTTP/1.1\r\nhost: localhost\r\ncontent-length: 1000\r\n\r\n{\"apiVersi",
    )
    .await
    .unwrap();
    let start = Instant::now();
    let mut resp = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut resp)).await;
    assert!(r.is_ok(), "server never answered a stalled body");
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(start.elapsed() < Duration::from_secs(3));
    // Headers stall: the connection is closed.
    let mut tls = common::tls_connect(s.addr, &s.cert.der).await.unwrap();
    tls.write_all(b"POST /inject HTTP/1.1\r\nhost: loc")
        .await
        .unwrap();
    let mut resp = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut resp)).await;
    assert!(r.is_ok(), "server never closed a stalled header");
    // TLS handshake never starts: closed as well.
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let s = server(small_limits()).await;
    let mut c = common::Client::connect(s.addr, &s.cert.der).await;
    assert_eq!(c.get("/healthz").await.0, 200);
    assert_eq!(c.get("/ready").await.0, 200);
    c.post(
        "/inject",
        serde_json::to_vec(&common::review_for(&pod(1), "demo", "m1")).unwrap(),
    )
    .await;
    c.post("/inject", b"nope".to_vec()).await;
    let (status, body) = c.get("/metrics").await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.contains("meshctl_injection_reviews_total{outcome=\"injected\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("meshctl_injection_reviews_total{outcome=\"bad_request\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("meshctl_injection_review_duration_seconds_count 2"),
        "{text}"
    );
}

#[tokio::test]
async fn certificate_and_config_files_are_reloaded() {
    let s = server(small_limits()).await;
    let cfg_path = s.dir.path().join("config");
    std::fs::write(&cfg_path, "hub: first.example.com\n").unwrap();
    meshctl::webhook::spawn_reloaders(
        s.state.clone(),
        s.certs.clone(),
        Some(cfg_path.clone()),
        Duration::from_millis(50),
    );
    let image = |resp: &[u8]| -> String {
        let (_, patch) = common::decode_response(resp, "r");
        let mut p = pod(1);
        json_patch::patch(&mut p, &patch.unwrap()).unwrap();
        p["spec"]["initContainers"][1]["image"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let review = serde_json::to_vec(&common::review_for(&pod(1), "demo", "r")).unwrap();
    // Config: the mounted-ConfigMap form (bare config) and the manifest form both load.
    let mut ok = false;
    for _ in 0..100 {
        let mut c = common::Client::connect(s.addr, &s.cert.der).await;
        let (_, resp) = c.post("/inject", review.clone()).await;
        if image(&resp).starts_with("first.example.com/") {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "config file not picked up");
    std::fs::write(
        &cfg_path,
        "kind: ConfigMap\napiVersion: v1\ndata:\n  config: |\n    hub: second.example.com\n",
    )
    .unwrap();
    let mut ok = false;
    for _ in 0..100 {
        let mut c = common::Client::connect(s.addr, &s.cert.der).await;
        let (_, resp) = c.post("/inject", review.clone()).await;
        if image(&resp).starts_with("second.example.com/") {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "config change not picked up");
    // An invalid config keeps the old one.
    std::fs::write(&cfg_path, "hub: [not, a, string]\n").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = common::Client::connect(s.addr, &s.cert.der).await;
    let (_, resp) = c.post("/inject", review.clone()).await;
    assert!(image(&resp).starts_with("second.example.com/"));

    // Certificate: write a new pair; new connections must present it.
    let new = common::gen_cert();
    std::fs::write(&s.key_path, &new.key_pem).unwrap();
    std::fs::write(&s.cert_path, &new.cert_pem).unwrap();
    let mut ok = false;
    for _ in 0..100 {
        if s.certs.current_leaf().as_deref() == Some(&new.leaf_der[..]) {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "certificate not reloaded");
    let mut c = common::Client::connect(s.addr, &new.der).await;
    assert_eq!(c.get("/healthz").await.0, 200);
    assert!(
        common::tls_connect(s.addr, &s.cert.der).await.is_err(),
        "old cert still served"
    );
    // A broken pair keeps the current one.
    std::fs::write(&s.cert_path, "garbage").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = common::Client::connect(s.addr, &new.der).await;
    assert_eq!(c.get("/healthz").await.0, 200);
}

/// Latency per review over one keep-alive HTTPS connection (walkthrough Deployment's pod).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_per_review() {
    let s = server(Limits::default()).await;
    let mut c = common::Client::connect(s.addr, &s.cert.der).await;
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/inject/seed-deployment.yaml"
    ))
    .unwrap();
    let (_, docs) = meshctl::kube_yaml::parse_stream(&text).unwrap();
    let t = &docs[0].value["spec"]["template"];
    let p =
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": t["metadata"], "spec": t["spec"]});
    let body = serde_json::to_vec(&common::review_for(&p, "demo", "lat")).unwrap();
    for _ in 0..20 {
        c.post("/inject", body.clone()).await;
    }
    let n = 300;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let (status, _) = c.post("/inject", body.clone()).await;
        samples.push(t0.elapsed());
        assert_eq!(status, 200);
    }
    samples.sort();
    let pct = |q: f64| samples[((n as f64 * q) as usize).min(n - 1)];
    let mean = samples.iter().sum::<Duration>() / n as u32;
    println!(
        "webhook latency per review over HTTPS keep-alive ({n} reviews, {} build): mean {:?}, p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        mean,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        samples[n - 1]
    );
    // Printed, not asserted: speed is the benchmarks' job (bench/), not a test's.
    // The same review without HTTP/TLS: parse, decide, inject, diff, encode.
    let cfg = InjectionConfig::default();
    let ns = common::AllEnabled;
    let t0 = Instant::now();
    for _ in 0..n {
        let a = meshctl::webhook::review::handle(&body, &cfg, &ns);
        assert_eq!(a.outcome, meshctl::webhook::Outcome::Injected);
    }
    println!(
        "review::handle alone: {:?} per review",
        t0.elapsed() / n as u32
    );
}

fn connection_limits(headers: Duration, idle: Duration, max_connections: usize) -> Limits {
    Limits {
        connections: ConnectionLimits {
            tls_handshake_timeout: headers,
            request_headers_timeout: headers,
            idle_timeout: idle,
            max_connections,
        },
        ..Limits::default()
    }
}

/// About 1,000 connections that never send a request (plain TCP that never starts TLS, TLS
/// handshaken then silent, TLS with half a request head) are all closed once the
/// request-headers timeout has passed since they were accepted, while clients that do send
/// requests are served all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_while_clients_are_served() {
    let headers = Duration::from_secs(3);
    let s = server(connection_limits(headers, Duration::from_secs(60), 4096)).await;
    let addr = s.addr;
    let client_tls = common::client_config(&s.cert.der);

    // A client that keeps using one keep-alive connection longer than the headers timeout,
    // and one that opens a new connection per review.
    let review = serde_json::to_vec(&common::review_for(&pod(1), "demo", "busy")).unwrap();
    let served = {
        let der = s.cert.der.clone();
        tokio::spawn(async move {
            let mut kept = common::Client::connect(addr, &der).await;
            let until = Instant::now() + headers * 3;
            let mut n = 0;
            while Instant::now() < until {
                let (status, resp) = kept.post("/inject", review.clone()).await;
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
                assert!(common::decode_response(&resp, "busy").1.is_some());
                let mut fresh = common::Client::connect(addr, &der).await;
                assert_eq!(fresh.get("/healthz").await.0, 200);
                n += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            n
        })
    };

    let mut conns = common::silent::open_many(500, 64, |_| common::silent::tcp(addr)).await;
    let tls = |then: &'static [u8]| {
        let cfg = client_tls.clone();
        move |_| {
            let cfg = cfg.clone();
            async move {
                common::silent::tls(addr, cfg, "localhost", then)
                    .await
                    .expect("TLS handshake within its timeout")
            }
        }
    };
    conns.extend(common::silent::open_many(450, 8, tls(b"")).await);
    conns.extend(
        common::silent::open_many(50, 8, tls(b"POST /inject HTTP/1.1\r\nhost: local")).await,
    );
    let n = conns.len();
    let times = common::silent::closed_after(conns, headers + Duration::from_secs(30)).await;
    let summary = common::silent::summary(&times);
    println!("{n} silent connections: {summary}");
    assert!(times.iter().all(Option::is_some), "{summary}");
    // Never before the timeout: the server accepted each one after the client connected.
    assert!(
        times.iter().flatten().all(|t| *t >= headers),
        "closed too early: {summary}"
    );
    let reviews = served.await.expect("the busy clients were served");
    assert!(reviews >= 3, "{reviews} rounds");
}

/// A keep-alive connection stays open while requests keep coming, and is closed once it has
/// been idle for the idle timeout.
#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let idle = Duration::from_millis(1500);
    let s = server(connection_limits(Duration::from_secs(1), idle, 64)).await;
    let tls = common::tls_connect(s.addr, &s.cert.der).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    // Longer in total than both the request-headers and the idle timeout.
    let mut last_sent = Instant::now();
    for _ in 0..6 {
        sender.ready().await.expect("connection still open");
        // The server's idle timer can only start after the request was sent.
        last_sent = Instant::now();
        let req = http::Request::get("/healthz")
            .header("host", "localhost")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.expect("served");
        assert_eq!(resp.status(), 200);
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let closed = tokio::time::timeout(Duration::from_secs(20), conn).await;
    assert!(closed.is_ok(), "idle connection still open after 20 s");
    assert!(
        last_sent.elapsed() >= idle,
        "closed {:?} after the last request",
        last_sent.elapsed()
    );
}

/// On a kept-alive connection, a request head that starts but never ends is cut after the
/// request-headers timeout from its first byte, not after the (much longer) idle timeout.
#[tokio::test]
async fn stalled_head_on_a_kept_alive_connection_is_closed() {
    let headers = Duration::from_secs(1);
    let s = server(connection_limits(headers, Duration::from_secs(120), 64)).await;
    let mut tls = common::tls_connect(s.addr, &s.cert.der).await.unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut resp = Vec::new();
    let mut buf = [0u8; 1024];
    while !resp.ends_with(b"\r\n\r\nok") {
        let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
            .await
            .expect("a response")
            .unwrap();
        assert!(
            n > 0,
            "closed before answering: {}",
            String::from_utf8_lossy(&resp)
        );
        resp.extend(&buf[..n]);
    }
    assert!(resp.starts_with(b"HTTP/1.1 200"));
    // Idle for a while (within the idle timeout), then half a head, then nothing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    tls.write_all(b"POST /inject HTTP/1.1\r\nhost: loc")
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "stalled head kept open for 20 s");
    assert!(
        started.elapsed() >= headers,
        "closed after {:?}",
        started.elapsed()
    );
}

/// At the connection cap the server stops accepting: one more client waits (its TLS
/// handshake does not complete) until a connection closes, then it is served.
#[tokio::test]
async fn connections_over_the_cap_wait_until_one_closes() {
    let long = Duration::from_secs(60);
    let cap = 20;
    let s = server(connection_limits(long, long, cap)).await;
    let addr = s.addr;
    let mut holders = common::silent::open_many(cap, 8, |_| common::silent::tcp(addr)).await;
    let der = s.cert.der.clone();
    let mut waiting = tokio::spawn(async move {
        let mut c = common::Client::connect(addr, &der).await;
        c.get("/healthz").await.0
    });
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut waiting)
            .await
            .is_err(),
        "a connection over the cap was served"
    );
    drop(holders.pop());
    let status = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("served once a connection closed")
        .unwrap();
    assert_eq!(status, 200);
    // Everyone gone: the server serves as before.
    drop(holders);
    for i in 0..cap + 5 {
        let mut c = common::Client::connect(addr, &s.cert.der).await;
        assert_eq!(c.get("/healthz").await.0, 200, "client {i}");
    }
}

/// A review sent for a Pod whose object is something else (a List of pods, a Deployment) is
/// denied, naming both kinds, with a small answer: no item is injected.
#[tokio::test]
async fn object_of_another_kind_than_the_review_is_denied() {
    let s = server(Limits::default()).await;
    let mut c = common::Client::connect(s.addr, &s.cert.der).await;
    let items: Vec<_> = (0..200).map(|_| pod(3)).collect();
    let list = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items});
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "demo"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "app:1"}]}}}});
    let mut v2 = pod(1);
    v2["apiVersion"] = json!("v2");
    let mut numeric = pod(1);
    numeric["kind"] = json!(7);
    for (uid, object, want) in [
        (
            "list",
            list,
            "request.object is v1 PodList, but request.kind is v1 Pod",
        ),
        (
            "deployment",
            deployment,
            "request.object is apps/v1 Deployment, but request.kind is v1 Pod",
        ),
        (
            "v2",
            v2,
            "request.object is v2 Pod, but request.kind is v1 Pod",
        ),
        (
            "numeric",
            numeric,
            "request.object is v1 7, but request.kind is v1 Pod",
        ),
    ] {
        let body = serde_json::to_vec(&common::review_for(&object, "demo", uid)).unwrap();
        let (status, resp) = c.post("/inject", body.clone()).await;
        assert_eq!(status, 200, "{uid}: {}", String::from_utf8_lossy(&resp));
        let (allowed, patch) = common::decode_response(&resp, uid);
        assert!(!allowed && patch.is_none(), "{uid}");
        let v: Value = serde_json::from_slice(&resp).unwrap();
        let msg = v["response"]["status"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "{uid}: {msg}");
        assert!(msg.contains("only a single Pod"), "{uid}: {msg}");
        assert_eq!(v["response"]["status"]["code"], 400);
        assert!(resp.len() < 1024, "{uid}: {} bytes answered", resp.len());
    }
    // The object may leave apiVersion/kind out; the review's kind is assumed.
    let mut bare = pod(1);
    bare.as_object_mut().unwrap().remove("apiVersion");
    bare.as_object_mut().unwrap().remove("kind");
    let body = serde_json::to_vec(&common::review_for(&bare, "demo", "bare")).unwrap();
    let (status, resp) = c.post("/inject", body).await;
    assert_eq!(status, 200);
    let (allowed, patch) = common::decode_response(&resp, "bare");
    assert!(allowed && patch.is_some());
}

/// A user container named like the sidecar (or its init container) is denied with the
/// container named, instead of being replaced; a pod we injected before is still fine.
#[tokio::test]
async fn user_container_with_the_sidecars_name_is_denied() {
    let s = server(Limits::default()).await;
    let mut c = common::Client::connect(s.addr, &s.cert.der).await;
    let mut only_proxy = pod(1);
    only_proxy["spec"]["containers"][0]["name"] = json!("mesh-proxy");
    let mut init = pod(2);
    init["spec"]["initContainers"] = json!([{"name": "mesh-init", "image": "mine:1"}]);
    for (uid, p, want) in [
        (
            "proxy",
            only_proxy,
            "request.object.spec.containers[0].name: container name \"mesh-proxy\" is reserved",
        ),
        (
            "init",
            init,
            "request.object.spec.initContainers[0].name: container name \"mesh-init\" is reserved",
        ),
    ] {
        let body = serde_json::to_vec(&common::review_for(&p, "demo", uid)).unwrap();
        let (status, resp) = c.post("/inject", body).await;
        assert_eq!(status, 200);
        let (allowed, patch) = common::decode_response(&resp, uid);
        assert!(!allowed && patch.is_none(), "{uid}");
        let v: Value = serde_json::from_slice(&resp).unwrap();
        let msg = v["response"]["status"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "{uid}: {msg}");
    }
    // Injected once (by the patch we answered), reviewed again: allowed, nothing to change.
    let p = pod(1);
    let body = serde_json::to_vec(&common::review_for(&p, "demo", "first")).unwrap();
    let (_, resp) = c.post("/inject", body).await;
    let (_, patch) = common::decode_response(&resp, "first");
    let mut injected = p.clone();
    json_patch::patch(&mut injected, &patch.unwrap()).unwrap();
    let body = serde_json::to_vec(&common::review_for(&injected, "demo", "again")).unwrap();
    let (status, resp) = c.post("/inject", body).await;
    assert_eq!(status, 200);
    let (allowed, patch) = common::decode_response(&resp, "again");
    assert!(allowed && patch.is_none());
}
