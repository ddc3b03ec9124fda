//! Snapshots, ACK/NACK, reconnects, per-pod sidecar configs and the scale test.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_proxy::config::{Listener, ListenerKind, ProxyConfig};
use mesh_proxy::distribution::{ClientOptions, NodeIdentity, Update, run_client};
use mesh_translate::{LoadOptions, Resources, TranslateOptions};
use meshctl::controlplane::Hub;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{SERVER_NAME, Server, WALKTHROUGH, next, walkthrough_resources};

fn weights(config: &ProxyConfig) -> Vec<u32> {
    backend_weights(&serde_json::to_value(config).unwrap(), "myapp")
}

/// The distinct weights of the backends whose target mentions `needle`, sorted.
fn backend_weights(json: &serde_json::Value, needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    fn walk(v: &serde_json::Value, needle: &str, out: &mut Vec<u32>) {
        match v {
            serde_json::Value::Object(m) => {
                if let (Some(w), Some(t)) = (m.get("weight"), m.get("target"))
                    && t.to_string().contains(needle)
                {
                    out.push(w.as_u64().unwrap() as u32);
                }
                m.values().for_each(|v| walk(v, needle, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, needle, out)),
            _ => {}
        }
    }
    walk(json, needle, &mut out);
    out.sort();
    out.dedup();
    out
}

async fn wait_report(
    hub: &Hub,
    what: &str,
    f: impl Fn(&meshctl::controlplane::ProxiesReport) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = hub.report();
        if f(&r) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {r:#?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn snapshot_ack_nack_and_push_on_change_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), 0).await;
    let (mut rx, _stop) = server.client(Duration::from_millis(50));
    // Nothing before the first world.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err()
    );
    wait_report(&server.hub, "proxy registered", |r| r.proxies.len() == 1).await;
    let g1 = server.publish(walkthrough_resources((80, 20)), BTreeMap::new());
    let u = next(&mut rx).await;
    assert_eq!(u.version, g1.to_string());
    assert_eq!(u.config.version, u.version);
    assert_eq!(u.config.listeners.len(), 1, "{:?}", u.config.listeners);
    assert_eq!(weights(&u.config), vec![20, 80]);
    u.reply.send(Ok(())).unwrap();
    wait_report(&server.hub, "ACK recorded", |r| {
        let p = &r.proxies[0];
        p.last_ack_version.as_deref() == Some(&*g1.to_string()) && p.sync_state() == "SYNCED"
    })
    .await;

    // A world that changes nothing for this proxy: no snapshot.
    server.publish(walkthrough_resources((80, 20)), BTreeMap::new());
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "unchanged config must not be pushed again"
    );

    // Weights change: pushed; the proxy rejects it: NACK with the error.
    let g3 = server.publish(walkthrough_resources((50, 50)), BTreeMap::new());
    let u = next(&mut rx).await;
    assert_eq!(u.version, g3.to_string());
    assert_eq!(weights(&u.config), vec![50]);
    u.reply.send(Err("listener port 80 in use".into())).unwrap();
    wait_report(&server.hub, "NACK recorded", |r| {
        let p = &r.proxies[0];
        p.sync_state() == "NACKED"
            && p.last_nack.as_ref().is_some_and(|n| {
                n.version == g3.to_string() && n.error == "listener port 80 in use"
            })
            && p.last_ack_version.as_deref() == Some(&*g1.to_string())
    })
    .await;
    let report = serde_json::to_value(server.hub.report()).unwrap();
    assert_eq!(report["proxies"][0]["node"]["kind"], "gateway");
    assert_eq!(report["proxies"][0]["node"]["pod"], "gw-0");
}

#[tokio::test]
async fn client_reconnects_after_the_control_plane_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), 0).await;
    let port = server.addr.port();
    server.publish(walkthrough_resources((80, 20)), BTreeMap::new());
    let (mut rx, _stop) = server.client(Duration::from_millis(100));
    let u = next(&mut rx).await;
    u.reply.send(Ok(())).unwrap();

    // The control plane goes away: streams end, the client retries with backoff.
    server.shutdown.cancel();
    drop(server);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err()
    );
    // It comes back on the same port with the same CA (kept in the directory).
    let mut server = Server::start(dir.path(), port).await;
    let g = server.publish(walkthrough_resources((50, 50)), BTreeMap::new());
    let u = next(&mut rx).await;
    assert_eq!(u.version, g.to_string());
    assert_eq!(weights(&u.config), vec![50]);
    u.reply.send(Ok(())).unwrap();
    wait_report(&server.hub, "ACK after reconnect", |r| {
        r.proxies.len() == 1 && r.proxies[0].sync_state() == "SYNCED"
    })
    .await;
}

#[tokio::test]
async fn distributed_rate_limits_follow_gateway_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), 0).await;
    let mut resources = walkthrough_resources((80, 20));
    let policy = mesh_translate::load_str(
        "rlp.yaml",
        "apiVersion: policy.meshctl.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: shared, namespace: demo}\n\
         spec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: istio-gwapi}]\n\
         \x20 maxTokens: 90\n  tokensPerFill: 30\n  fillInterval: 1m\n  mode: Distributed\n",
        &LoadOptions::default(),
    )
    .unwrap();
    resources.extend(policy.resources);
    let replicas = |n| BTreeMap::from([("demo/istio-gwapi".to_string(), n)]);
    server.publish(resources.clone(), replicas(1));
    let (mut rx, _stop) = server.client(Duration::from_millis(50));
    let instances = |c: &ProxyConfig| match &c.rate_limits[0].mode {
        mesh_proxy::config::RateLimitMode::Distributed { instances } => *instances,
        other => panic!("{other:?}"),
    };
    let u = next(&mut rx).await;
    assert_eq!(instances(&u.config), 1, "{:?}", u.config.rate_limits);
    u.reply.send(Ok(())).unwrap();
    // Scaled to 3 ready replicas: pushed again with 3 instances.
    server.publish(resources, replicas(3));
    let u = next(&mut rx).await;
    assert_eq!(instances(&u.config), 3, "{:?}", u.config.rate_limits);
    u.reply.send(Ok(())).unwrap();
    wait_report(&server.hub, "instances recorded", |r| {
        r.proxies[0].instances == 3
    })
    .await;
}

/// 1,000 HTTPRoutes (each with its own Service) and 10,000 endpoints (10 per Service) on one
/// Gateway. Prints: translation time, time to the first config at a connected proxy, time to
/// propagate one weight change, snapshot size, memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_1000_routes_10000_endpoints() {
    const ROUTES: usize = 1000;
    const ENDPOINTS_PER_SERVICE: usize = 10;
    let build = |changed_weight: u32| {
        let options = LoadOptions {
            default_namespace: "demo".into(),
        };
        let mut all = mesh_translate::load_str(
            "gateway.yaml",
            &std::fs::read_to_string(format!("{WALKTHROUGH}/gateway.yaml")).unwrap(),
            &options,
        )
        .unwrap()
        .resources;
        // The YAML reader allows 1,024 documents per file: 100 routes (300 documents) a file.
        let mut text = String::new();
        for i in 0..ROUTES {
            let w = if i == 500 { changed_weight } else { 1 };
            write!(
                text,
                "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r{i}}}\n\
                 spec:\n  parentRefs: [{{name: istio-gwapi}}]\n  hostnames: [\"h{i}.example.com\"]\n  rules:\n  \
                 - matches: [{{path: {{type: PathPrefix, value: /p{i}}}}}]\n    backendRefs: [{{name: s{i}, port: 80, weight: {w}}}]\n\
                 ---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec:\n  clusterIP: 10.96.{}.{}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n\
                 ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}-x\n  labels: {{kubernetes.io/service-name: s{i}}}\n\
                 addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n",
                i / 256,
                i % 256,
            )
            .unwrap();
            for e in 0..ENDPOINTS_PER_SERVICE {
                let n = i * ENDPOINTS_PER_SERVICE + e;
                writeln!(
                    text,
                    "- {{addresses: [10.{}.{}.{}], conditions: {{ready: true}}}}",
                    n / 65536,
                    (n / 256) % 256,
                    n % 256
                )
                .unwrap();
            }
            if i % 100 == 99 {
                all.extend(
                    mesh_translate::load_str("scale.yaml", &text, &options)
                        .unwrap()
                        .resources,
                );
                text.clear();
            }
        }
        all
    };
    let resources = build(1);
    let changed = build(7);
    assert_eq!(resources.http_routes.len(), ROUTES);
    let endpoints: usize = resources
        .endpoint_slices
        .iter()
        .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
        .sum();
    assert_eq!(endpoints, ROUTES * ENDPOINTS_PER_SERVICE);

    let t = Instant::now();
    let translation = mesh_translate::translate(
        &resources,
        &TranslateOptions {
            gateways: vec!["demo/istio-gwapi".into()],
            ..TranslateOptions::default()
        },
    );
    let translate_time = t.elapsed();
    assert_eq!(translation.config.backends.len(), ROUTES);
    // One sidecar's view of the same mesh: every Service's ClusterIP, routed.
    let t = Instant::now();
    let sidecar = mesh_translate::translate_sidecar(
        &resources,
        &mesh_translate::SidecarOptions {
            base: TranslateOptions::default(),
            pod_namespace: "demo".into(),
            pod_name: "client-0".into(),
            pod_ip: Some("10.255.0.1".parse().unwrap()),
            pod_labels: None,
            inbound_port: 15006,
            outbound_port: 15001,
        },
    );
    let sidecar_time = t.elapsed();
    assert_eq!(
        listener(&sidecar.config, ListenerKind::SidecarOutbound)
            .services
            .len(),
        ROUTES
    );

    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), 0).await;
    let (mut rx, _stop) = server.client(Duration::from_millis(50));
    wait_report(&server.hub, "connected", |r| r.proxies.len() == 1).await;
    let t = Instant::now();
    server.publish(resources, BTreeMap::new());
    let u = next(&mut rx).await;
    let first = t.elapsed();
    assert_eq!(u.config.backends.len(), ROUTES);
    u.reply.send(Ok(())).unwrap();

    let t = Instant::now();
    let g = server.publish(changed, BTreeMap::new());
    let u = next(&mut rx).await;
    let change = t.elapsed();
    assert_eq!(u.version, g.to_string());
    u.reply.send(Ok(())).unwrap();
    wait_report(&server.hub, "ACK", |r| {
        r.proxies[0].sync_state() == "SYNCED"
    })
    .await;
    let bytes = server.hub.report().proxies[0].last_sent_bytes.unwrap();

    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mem = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .map(|l| l[k.len()..].trim().to_string())
            .unwrap_or_default()
    };
    eprintln!(
        "scale: {ROUTES} HTTPRoutes, {endpoints} endpoints, 1 Gateway ({} build)\n  \
         translation (one proxy's config): {translate_time:?}\n  \
         translation (one sidecar's config, {ROUTES} Services): {sidecar_time:?}\n  \
         time to first config (publish -> snapshot decoded at the proxy): {first:?}\n  \
         time to propagate one weight change (publish -> snapshot at the proxy): {change:?}\n  \
         snapshot size: {bytes} bytes\n  \
         memory of the test process (control plane + proxy client + 3 copies of the objects): VmRSS {} / VmHWM {}",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        mem("VmRSS:"),
        mem("VmHWM:"),
    );
}

/// A mesh of one client and one server pod: the server Service (ClusterIP 10.96.0.10) with a
/// mesh route splitting to two versions, and a rate-limit policy on the server's port 8080.
fn mesh_resources(weights: (u32, u32)) -> Resources {
    let mut text = String::new();
    for (svc, ip) in [
        ("server", "10.96.0.10"),
        ("server-v1", "10.96.0.11"),
        ("server-v2", "10.96.0.12"),
    ] {
        write!(
            text,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {svc}}}\nspec:\n  clusterIP: {ip}\n  selector: {{app: server}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-abc\n  labels: {{kubernetes.io/service-name: {svc}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [10.244.0.2], conditions: {{ready: true}}}}]\n---\n"
        )
        .unwrap();
    }
    write!(
        text,
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: split}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: server, port: 80}}]\n  rules:\n  - backendRefs:\n    - {{name: server-v1, port: 80, weight: {}}}\n    - {{name: server-v2, port: 80, weight: {}}}\n---\n\
         apiVersion: policy.meshctl.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: server}}\nspec:\n  targetRefs: [{{group: \"\", kind: Service, name: server}}]\n  maxTokens: 10\n  tokensPerFill: 10\n  fillInterval: 1s\n",
        weights.0, weights.1
    )
    .unwrap();
    mesh_translate::load_str(
        "mesh.yaml",
        &text,
        &LoadOptions {
            default_namespace: "demo".into(),
        },
    )
    .unwrap()
    .resources
}

fn sidecar_client(server: &Server, pod: &str, ip: &str) -> mpsc::Receiver<Update> {
    let mut options = ClientOptions::new(
        server.addr.to_string(),
        server.ca_path.clone(),
        NodeIdentity::Sidecar {
            namespace: "demo".into(),
            pod: pod.into(),
            service_account: Some("default".into()),
            ip: Some(ip.parse().unwrap()),
        },
    );
    options.server_name = SERVER_NAME.into();
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(run_client(options, tx, CancellationToken::new()));
    rx
}

fn listener(config: &ProxyConfig, kind: ListenerKind) -> &Listener {
    config
        .listeners
        .iter()
        .find(|l| l.kind == kind)
        .unwrap_or_else(|| panic!("no {kind:?} listener in {config:#?}"))
}

#[tokio::test]
async fn each_sidecar_gets_the_config_of_its_pod() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), 0).await;
    server.publish(mesh_resources((80, 20)), BTreeMap::new());
    let mut server_pod = sidecar_client(&server, "server-0", "10.244.0.2");
    let mut client_pod = sidecar_client(&server, "client-0", "10.244.0.1");

    let s = next(&mut server_pod).await;
    let c = next(&mut client_pod).await;
    for u in [&s, &c] {
        let out = listener(&u.config, ListenerKind::SidecarOutbound);
        assert_eq!(out.port, 15001);
        let server_svc = out
            .services
            .iter()
            .find(|m| m.addresses == ["10.96.0.10"])
            .unwrap_or_else(|| panic!("Service server in {:#?}", out.services));
        assert_eq!(server_svc.port, 80);
        assert_eq!(
            listener(&u.config, ListenerKind::SidecarInbound).port,
            15006
        );
    }
    assert_eq!(weights_of(&c.config), vec![20, 80]);
    // Inbound policies are per pod: the server pod (an endpoint of `server`) limits 8080,
    // the client pod backs nothing.
    let inbound = &listener(&s.config, ListenerKind::SidecarInbound).inbound_ports;
    assert!(
        inbound
            .iter()
            .any(|p| p.port == 8080 && p.rate_limit.is_some()),
        "{inbound:?}"
    );
    assert!(
        listener(&c.config, ListenerKind::SidecarInbound)
            .inbound_ports
            .is_empty()
    );
    s.reply.send(Ok(())).unwrap();
    c.reply.send(Ok(())).unwrap();
    wait_report(&server.hub, "both sidecars synced", |r| {
        r.proxies.len() == 2 && r.proxies.iter().all(|p| p.sync_state() == "SYNCED")
    })
    .await;
    let report = serde_json::to_value(server.hub.report()).unwrap();
    let kinds: Vec<&serde_json::Value> = report["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["node"]["kind"])
        .collect();
    assert_eq!(kinds, ["sidecar", "sidecar"]);

    // A weight edit reaches the client's sidecar.
    server.publish(mesh_resources((50, 50)), BTreeMap::new());
    let c = next(&mut client_pod).await;
    assert_eq!(weights_of(&c.config), vec![50]);
}

/// The weights of the mesh routes of Service `server` (10.96.0.10) in a sidecar config.
fn weights_of(config: &ProxyConfig) -> Vec<u32> {
    let out = listener(config, ListenerKind::SidecarOutbound);
    let svc = out
        .services
        .iter()
        .find(|m| m.addresses == ["10.96.0.10"])
        .unwrap();
    backend_weights(&serde_json::to_value(&svc.routes).unwrap(), "server-v")
}

fn gateway_with_ports(ports: &[u16]) -> Resources {
    let mut text = String::from(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: istio}\n\
         spec: {controllerName: istio.io/gateway-controller}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: istio-gwapi}\n\
         spec:\n  gatewayClassName: istio\n  listeners:\n",
    );
    for p in ports {
        writeln!(text, "  - {{name: l{p}, protocol: HTTP, port: {p}}}").unwrap();
    }
    mesh_translate::load_str(
        "gateway.yaml",
        &text,
        &LoadOptions {
            default_namespace: "demo".into(),
        },
    )
    .unwrap()
    .resources
}

/// The proxy side for real: a snapshot the proxy cannot serve (its new listener's port is
/// taken) is NACKed with the reason, and the previous config keeps serving.
#[tokio::test]
async fn a_snapshot_the_proxy_cannot_serve_is_nacked_and_the_last_good_one_keeps_serving() {
    use mesh_proxy::admin::AdminState;
    use mesh_proxy::metrics::Metrics;
    use mesh_proxy::subscription::Subscriber;

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), 0).await;
    let (mut rx, _stop) = server.client(Duration::from_millis(50));
    let metrics = Arc::new(Metrics::new());
    let mut subscriber = Subscriber::new(
        mesh_proxy::ProxyOptions {
            bind_address: "127.0.0.1".parse().unwrap(),
            listener_port_overrides: [(80, free), (81, taken.local_addr().unwrap().port())].into(),
            metrics: Some(metrics.clone()),
            ..Default::default()
        },
        metrics.clone(),
        Arc::new(AdminState::new(metrics)),
    );

    let g1 = server.publish(gateway_with_ports(&[80]), BTreeMap::new());
    subscriber.apply(next(&mut rx).await).await;
    wait_report(&server.hub, "ACK", |r| {
        r.proxies[0].last_ack_version.as_deref() == Some(&*g1.to_string())
    })
    .await;
    let answers = || async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", free)).await?;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    assert!(answers().await.unwrap().starts_with("HTTP/1.1 404"));

    let g2 = server.publish(gateway_with_ports(&[80, 81]), BTreeMap::new());
    subscriber.apply(next(&mut rx).await).await;
    wait_report(&server.hub, "NACK", |r| {
        let p = &r.proxies[0];
        p.sync_state() == "NACKED"
            && p.last_nack
                .as_ref()
                .is_some_and(|n| n.version == g2.to_string())
            && p.last_ack_version.as_deref() == Some(&*g1.to_string())
    })
    .await;
    let error = server.hub.report().proxies[0]
        .last_nack
        .clone()
        .unwrap()
        .error;
    let port = taken.local_addr().unwrap().port().to_string();
    assert!(error.contains(&port), "the NACK names what failed: {error}");
    // Still serving the first config.
    assert!(answers().await.unwrap().starts_with("HTTP/1.1 404"));
    assert!(
        subscriber
            .into_proxy()
            .is_some_and(|p| p.config().listeners.len() == 1)
    );
}
