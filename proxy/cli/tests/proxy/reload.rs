//! `mesh-proxy run --resources FILE` while the file is being written: a file caught
//! half-written is not applied (its missing routes would vanish); the complete content is.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mesh_proxy::testing::{EchoServer, TestClient};

/// The GatewayClass, Gateway, Service and endpoints (the echo backend's port).
fn base(port: u16) -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata:
  name: mesh
spec:
  controllerName: meshctl.io/gateway-controller
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: gw
spec:
  gatewayClassName: mesh
  listeners:
  - name: http
    protocol: HTTP
    port: 80
---
apiVersion: v1
kind: Service
metadata:
  name: app
spec:
  ports:
  - name: http
    port: 80
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: app-local
  labels:
    kubernetes.io/service-name: app
addressType: IPv4
ports:
- name: http
  port: {port}
  protocol: TCP
endpoints:
- addresses: ["127.0.0.1"]
  conditions:
    ready: true
"#
    )
}

/// An HTTPRoute `name` sending `path` (prefix) to the Service.
fn route(name: &str, path: &str) -> String {
    format!(
        r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: {name}
spec:
  parentRefs:
  - name: gw
  rules:
  - matches:
    - path:
        type: PathPrefix
        value: {path}
    backendRefs:
    - name: app
      port: 80
"#
    )
}

fn spawn(resources: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .args(["run", "--resources"])
        .arg(resources)
        .args([
            "-n",
            "demo",
            "--workers",
            "1",
            "--bind-address",
            "127.0.0.1",
            "--listener-port",
            "80=0",
            "--admin-address",
            "off",
            "--readiness-address",
            "off",
            "--metrics-address",
            "off",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mesh-proxy")
}

/// Reads stderr until the listener's address; the rest is kept (the proxy's log).
fn listening_address(child: &mut Child) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("listening listener=") {
            let addr = rest.split("address=").nth(1).unwrap().trim().to_string();
            let l = log.clone();
            std::thread::spawn(move || {
                for line in lines.map_while(Result::ok) {
                    l.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
            return (addr, log);
        }
        log.lock().unwrap().push(line);
    }
    panic!(
        "mesh-proxy exited without listening:\n{}",
        log.lock().unwrap().join("\n")
    );
}

async fn status(client: &TestClient, url: &str) -> Option<u16> {
    client.get(url, &[]).await.ok().map(|r| r.status.as_u16())
}

async fn wait_for_200(client: &TestClient, url: &str) {
    for _ in 0..200 {
        if status(client, url).await == Some(200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_in_two_parts_never_loses_its_routes_and_the_whole_is_applied() {
    let backend = EchoServer::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resources.yaml");
    let port = backend.addr.port();
    std::fs::write(&path, base(port) + &route("a", "/a")).unwrap();
    let mut child = spawn(&path);
    let (addr, log) = listening_address(&mut child);
    let client = TestClient::http1();
    let url = |p: &str| format!("http://{addr}{p}");
    wait_for_200(&client, &url("/a")).await;

    // A client keeps asking for /a while the file is rewritten in place: first everything
    // but route a (and a new route b) — whole YAML documents, so this half parses — then,
    // after a pause shorter than the settle period, route a again.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = {
        let (client, url, stop) = (client.clone(), url("/a"), stop.clone());
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                statuses.push(status(&client, &url).await);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let first = base(port) + &route("b", "/b");
    let second = route("a", "/a");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.write_all(first.as_bytes()).unwrap();
    f.flush().unwrap();
    // Longer than a plain 200 ms debounce, shorter than the settle period.
    assert!(Duration::from_millis(350) < mesh_proxy::settle::QUIET);
    tokio::time::sleep(Duration::from_millis(350)).await;
    f.write_all(second.as_bytes()).unwrap();
    f.flush().unwrap();
    drop(f);

    // The whole file is applied: route b appears, route a stays.
    wait_for_200(&client, &url("/b")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let statuses = seen.await.unwrap();
    assert!(statuses.len() > 20, "the client kept asking: {statuses:?}");
    let bad: Vec<_> = statuses.iter().filter(|s| **s != Some(200)).collect();
    let proxy_log = log.lock().unwrap_or_else(|e| e.into_inner()).join("\n");
    assert!(
        bad.is_empty(),
        "route a vanished while the file was written ({} of {} requests): {bad:?}\nproxy log:\n{proxy_log}",
        bad.len(),
        statuses.len(),
    );
    assert_eq!(status(&client, &url("/a")).await, Some(200));

    // A file replaced atomically (written elsewhere, renamed over it) is applied as it is,
    // even when it drops a route.
    let tmp = dir.path().join(".resources.yaml.tmp");
    std::fs::write(&tmp, base(port) + &route("c", "/c")).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    wait_for_200(&client, &url("/c")).await;
    assert_eq!(
        status(&client, &url("/a")).await,
        Some(404),
        "route a removed"
    );

    child.kill().unwrap();
    child.wait().unwrap();
}

/// A native config whose gateway listener (127.0.0.1, any port) routes each of `routes`
/// (a path prefix `/NAME`) to `backend`.
fn native(backend: &str, routes: &[&str]) -> String {
    let mut s = format!(
        "backends:\n  - name: b\n    endpoints: [\"{backend}\"]\nlisteners:\n  - name: gw\n    address: 127.0.0.1\n    port: 0\n    virtualHosts:\n      - name: any\n        hostnames: [\"*\"]\n        routes:\n"
    );
    for r in routes {
        s.push_str(&native_route(r));
    }
    s
}

fn native_route(name: &str) -> String {
    format!(
        "          - name: {name}\n            match: {{path: {{type: prefix, value: /{name}}}}}\n            action: {{type: forward, backends: [{{target: {{backend: b}}, weight: 1}}]}}\n"
    )
}

/// `mesh-proxy sidecar --config FILE` polls its file: the same rule as `run`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_never_applies_its_config_file_half_written() {
    let backend = EchoServer::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.yaml");
    std::fs::write(&path, native(&backend.endpoint(), &["a"])).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .args(["sidecar", "--config"])
        .arg(&path)
        .args([
            "--admin-port",
            "0",
            "--readiness-port",
            "0",
            "--metrics-port",
            "0",
            "--workers",
            "1",
            "--log-level",
            "info",
        ])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mesh-proxy sidecar");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.split("listening listener=gw address=")
                .nth(1)
                .map(|a| a.trim().to_string())
        })
        .expect("the sidecar listens");
    std::thread::spawn(move || for _ in lines {});
    let client = TestClient::http1();
    let url = |p: &str| format!("http://{addr}{p}");
    wait_for_200(&client, &url("/a")).await;

    let stop = Arc::new(AtomicBool::new(false));
    let seen = {
        let (client, url, stop) = (client.clone(), url("/a"), stop.clone());
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                statuses.push(status(&client, &url).await);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            statuses
        })
    };
    // Rewritten in place six times in a row (the file is polled every second: a poll lands
    // in the half-written state of some of them), each time all but route a first, then
    // route a after a pause shorter than the settle period.
    let mut routes = vec!["a".to_string()];
    let rounds = 6;
    for round in 0..rounds {
        routes.push(format!("r{round}"));
        let others: Vec<&str> = routes[1..].iter().map(String::as_str).collect();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all(native(&backend.endpoint(), &others).as_bytes())
            .unwrap();
        tokio::time::sleep(Duration::from_millis(450)).await;
        f.write_all(native_route("a").as_bytes()).unwrap();
        drop(f);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The last content is applied whole.
    wait_for_200(&client, &url(&format!("/r{}", rounds - 1))).await;
    wait_for_200(&client, &url("/r0")).await;
    stop.store(true, Ordering::Relaxed);
    let statuses = seen.await.unwrap();
    let bad: Vec<_> = statuses.iter().filter(|s| **s != Some(200)).collect();
    assert!(
        bad.is_empty(),
        "route a vanished while the file was written ({} of {} requests): {bad:?}",
        bad.len(),
        statuses.len()
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
