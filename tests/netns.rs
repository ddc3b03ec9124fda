//! Sidecar mode with real packets: two "pods" as network namespaces joined by a veth pair,
//! each with an app, the nat rules of `mesh-proxy redirect` and a `mesh-proxy sidecar`, both
//! started exactly as `meshctl inject` writes them into the pod (same arguments and
//! environment; the proxy as uid/gid 1337). The sidecars get their config the way they do in
//! a cluster: from `meshctl control-plane`, which watches a real API server (mesh-testenv)
//! where the test applies the Services, EndpointSlices, the mesh HTTPRoute and the EnvoyFilter
//! with kubectl.
//!
//! Needs root, `ip` (iproute2), iptables, `setpriv`, `unshare` and `mount` (util-linux),
//! `tcpdump` (what crosses the veth between the pods), and
//! the mesh-testenv binaries; `.ci/run` provides them. Without the tools the test fails,
//! unless `MESHCTL_SKIP_NETNS=1`.
//!
//! What stands in for the node:
//! - pods 10.200.1.1 (client) and 10.200.1.2 (server) on one veth pair; Service ClusterIPs
//!   come from the API server's range (no kube-proxy: the sidecars route ClusterIPs to
//!   endpoints themselves), routed towards the other pod;
//! - the control plane listens on 10.201.0.1:15012 in the test's own namespace, reached from
//!   each pod over a second veth; `/etc/netns/<ns>/hosts` (which `ip netns exec` mounts over
//!   `/etc/hosts`) resolves the injected `meshd.mesh-system.svc` to it, the cluster DNS's job;
//! - the kubelet's mount of the `mesh-ca-root-cert` ConfigMap: the proxy runs in a mount
//!   namespace of its own with a tmpfs on `/run` holding the ConfigMap's `root-cert.pem` at
//!   the injected `MESH_CA_ROOT_PATH`.
//!
//! Everything is removed at the end, also on failure.
//!
//! The apps are this test binary re-executed in a namespace (`netns_helper`, driven by
//! commands on stdin).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_testenv::TestEnv;

const CLIENT_IP: &str = "10.200.1.1";
const SERVER_IP: &str = "10.200.1.2";
/// Where `meshctl control-plane` serves config distribution (the injected
/// `meshd.mesh-system.svc:15012` resolves here inside the pods).
const CONTROL_PLANE_IP: &str = "10.201.0.1";

// ---------------------------------------------------------------------------------------------
// The app: serves HTTP/TCP ports (`MESHCTL_NETNS_SERVE`) and runs client commands from stdin.
// ---------------------------------------------------------------------------------------------

#[test]
fn netns_helper() {
    if std::env::var_os("MESHCTL_NETNS_HELPER").is_none() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(helper::main());
}

mod helper {
    use std::collections::BTreeMap;
    use std::convert::Infallible;
    use std::time::Instant;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};

    pub async fn main() {
        let serve = std::env::var("MESHCTL_NETNS_SERVE").unwrap_or_default();
        for spec in serve.split(',').filter(|s| !s.is_empty()) {
            let (port, tag) = spec.split_once('=').unwrap();
            let l = TcpListener::bind(("0.0.0.0", port.parse::<u16>().unwrap()))
                .await
                .unwrap();
            let tag = tag.to_string();
            tokio::spawn(async move {
                loop {
                    let Ok((s, _)) = l.accept().await else {
                        continue;
                    };
                    let tag = tag.clone();
                    tokio::spawn(async move {
                        if tag == "echo" {
                            let (mut r, mut w) = s.into_split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                            return;
                        }
                        let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                            let tag = tag.clone();
                            async move {
                                let route = req
                                    .headers()
                                    .get("x-route")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("-")
                                    .to_string();
                                // `/whoami`: who the mesh says called (the sidecar's
                                // X-Forwarded-Client-Cert).
                                let body = if req.uri().path() == "/whoami" {
                                    req.headers()
                                        .get("x-forwarded-client-cert")
                                        .and_then(|v| v.to_str().ok())
                                        .unwrap_or("-")
                                        .to_string()
                                } else {
                                    format!("{tag} {} x-route={route}", req.uri().path())
                                };
                                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(
                                    body,
                                ))))
                            }
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(s), svc)
                            .await;
                    });
                }
            });
        }
        println!("@@ ready");
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let out = match parts.as_slice() {
                ["http", addr, path, n] => {
                    // A fresh pool per command: a keep-alive connection opened before the nat
                    // rules existed would be picked up mid-stream by conntrack and redirected
                    // (and reset), which cannot happen in a pod (mesh-init runs first).
                    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                        .build_http::<Empty<Bytes>>();
                    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
                    let mut bodies: BTreeMap<String, u64> = BTreeMap::new();
                    let mut lat = Vec::new();
                    let mut errors = Vec::new();
                    for _ in 0..n.parse::<u32>().unwrap() {
                        let uri: hyper::Uri = format!("http://{addr}{path}").parse().unwrap();
                        let start = Instant::now();
                        match client.get(uri).await {
                            Ok(resp) => {
                                let status = resp.status().as_u16();
                                let limited = resp.headers().contains_key("x-rate-limited");
                                let body = resp.into_body().collect().await;
                                lat.push(start.elapsed().as_micros() as u64);
                                *statuses
                                    .entry(format!(
                                        "{status}{}",
                                        if limited { "+x-rate-limited" } else { "" }
                                    ))
                                    .or_default() += 1;
                                if let Ok(b) = body {
                                    let b = String::from_utf8_lossy(&b.to_bytes()).into_owned();
                                    *bodies.entry(b).or_default() += 1;
                                }
                            }
                            Err(e) => errors.push(format!("{e:?}")),
                        }
                    }
                    serde_json::json!({"statuses": statuses, "bodies": bodies, "lat_us": lat, "errors": errors})
                }
                ["tcp", addr, text] => {
                    let r = async {
                        let mut s = TcpStream::connect(addr).await?;
                        s.write_all(text.as_bytes()).await?;
                        s.shutdown().await?;
                        let mut buf = String::new();
                        s.read_to_string(&mut buf).await?;
                        Ok::<_, std::io::Error>(buf)
                    }
                    .await;
                    match r {
                        Ok(echo) => serde_json::json!({"echo": echo}),
                        Err(e) => serde_json::json!({"error": e.to_string()}),
                    }
                }
                _ => serde_json::json!({"error": format!("unknown command {line:?}")}),
            };
            println!("@@ {out}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The harness.
// ---------------------------------------------------------------------------------------------

/// Removes what the test created, whatever happens: processes (by pid), then the namespaces
/// (which takes their veth ends, addresses and nat rules with them).
struct Cleanup {
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            // The veth pairs go with the namespace (both ends).
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
        }
        // Only when empty: other namespaces' files stay.
        let _ = std::fs::remove_dir("/etc/netns");
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` with `input` on its stdin; panics with its stderr unless it succeeds.
fn run_with_stdin(cmd: &mut Command, input: &str) -> Vec<u8> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// A running app in a namespace, answering commands.
struct App {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl App {
    fn start(cleanup: &mut Cleanup, ns: &str, serve: &str) -> App {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(std::env::current_exe().unwrap())
            .args(["netns_helper", "--exact", "--nocapture", "--test-threads=1"])
            .env("MESHCTL_NETNS_HELPER", "1")
            .env("MESHCTL_NETNS_SERVE", serve)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        cleanup.children.push(child);
        let mut app = App { stdin, stdout };
        assert_eq!(app.read(), "ready");
        app
    }

    fn read(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(n > 0, "the app exited");
            // libtest may have printed "test netns_helper ... " on the same line.
            if let Some(i) = line.find("@@ ") {
                return line[i + 3..].trim_end().to_string();
            }
        }
    }

    fn cmd(&mut self, line: &str) -> serde_json::Value {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        serde_json::from_str(&self.read()).unwrap()
    }

    fn http(&mut self, addr: &str, path: &str, n: u32) -> Http {
        let v = self.cmd(&format!("http {addr} {path} {n}"));
        let map = |k: &str| -> BTreeMap<String, u64> {
            v[k].as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
                .collect()
        };
        Http {
            statuses: map("statuses"),
            bodies: map("bodies"),
            lat_us: v["lat_us"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect(),
            errors: v["errors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect(),
        }
    }

    fn metrics(&mut self, port: u16) -> String {
        let h = self.http(&format!("127.0.0.1:{port}"), "/stats/prometheus", 1);
        assert_eq!(h.statuses.get("200"), Some(&1), "{h:?}");
        h.bodies.into_keys().next().unwrap()
    }
}

#[derive(Debug)]
struct Http {
    statuses: BTreeMap<String, u64>,
    bodies: BTreeMap<String, u64>,
    lat_us: Vec<u64>,
    errors: Vec<String>,
}

/// The value of a counter line whose labels include all of `labels`.
fn counter(metrics: &str, name: &str, labels: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn lat(h: &Http) -> (f64, f64) {
    let mut v = h.lat_us.clone();
    v.sort_unstable();
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"));
    if !root {
        missing.push("root (effective uid 0)".to_string());
    }
    for tool in [
        "ip",
        "iptables",
        "iptables-restore",
        "setpriv",
        "unshare",
        "mount",
        "tcpdump",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            missing.push(tool.to_string());
        }
    }
    missing
}

/// The `mesh-proxy` binary of this build profile. `cargo test --workspace` builds it with
/// the tests; otherwise (only this target built, or `--release`, where a binary left from an
/// older build would be measured) it is built here first.
fn mesh_proxy_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("mesh-proxy");
    let release = !cfg!(debug_assertions);
    if release || !bin.exists() {
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-p", "mesh-proxy-cli", "--bin", "mesh-proxy"]);
        if release {
            build.arg("--release");
        }
        run(build.current_dir(env!("CARGO_MANIFEST_DIR")));
    }
    assert!(bin.exists(), "{} not found", bin.display());
    bin
}

/// The injected pod's `mesh-init` args and `mesh-proxy` args + env, from `meshctl inject`.
struct Injected {
    /// The injected pod, as the webhook would have it stored.
    pod: serde_json::Value,
    init_args: Vec<String>,
    proxy_args: Vec<String>,
    proxy_env: Vec<(String, String)>,
}

fn inject(name: &str, ip: &str, app: &str) -> Injected {
    // `tier` is in no Service's selector: only the API server's copy of the pod has it.
    let mut pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: demo\n  labels:\n    app: {app}\n    tier: {app}-tier\nspec:\n  serviceAccountName: {app}\n  containers:\n    - name: {app}\n      image: app:1\n"
    );
    if app == "server" {
        // Probes, rewritten by injection to the sidecar's app-health port: an HTTP one the
        // app answers (named port), a TCP one on a port nothing listens on.
        pod.push_str(
            "      ports: [{name: http, containerPort: 8080}]\n      readinessProbe: {httpGet: {path: /probe, port: http}}\n      livenessProbe: {tcpSocket: {port: 8099}}\n",
        );
    }
    let out = run_with_stdin(
        Command::new(env!("CARGO_BIN_EXE_meshctl"))
            .args(["inject", "-f", "-", "-o", "json"])
            .env("RUST_LOG", "off"),
        &pod,
    );
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let containers: Vec<&serde_json::Value> = v["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(v["spec"]["containers"].as_array().into_iter().flatten())
        .collect();
    let find = |n: &str| *containers.iter().find(|c| c["name"] == n).unwrap();
    let args = |c: &serde_json::Value| -> Vec<String> {
        c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    let proxy = find("mesh-proxy");
    // The downward API values the kubelet would fill in.
    let proxy_env = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let n = e["name"].as_str().unwrap().to_string();
            let value = match e["value"].as_str() {
                Some(v) => v.to_string(),
                None => match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("metadata.name") => name.to_string(),
                    Some("metadata.namespace") => "demo".to_string(),
                    Some("status.podIP") => ip.to_string(),
                    Some("spec.serviceAccountName") => app.to_string(),
                    Some("spec.nodeName") => "node-1".to_string(),
                    other => panic!("env {n}: unexpected source {other:?}"),
                },
            };
            (n, value)
        })
        .collect();
    Injected {
        pod: v.clone(),
        init_args: args(find("mesh-init")),
        proxy_args: args(proxy),
        proxy_env,
    }
}

const RESOURCES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: demo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: server, namespace: demo}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: demo}
spec:
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: server-v1, namespace: demo}
spec:
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: server-v2, namespace: demo}
spec:
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: 8081}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: server}
  ports: [{name: tcp-echo, port: 9000, targetPort: 9000}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: server-abc, namespace: demo, labels: {kubernetes.io/service-name: server}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.200.1.2], targetRef: {kind: Pod, name: server-0, namespace: demo}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: server-v1-abc, namespace: demo, labels: {kubernetes.io/service-name: server-v1}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.200.1.2], targetRef: {kind: Pod, name: server-0, namespace: demo}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: server-v2-abc, namespace: demo, labels: {kubernetes.io/service-name: server-v2}}
addressType: IPv4
ports: [{name: http, port: 8081}]
endpoints: [{addresses: [10.200.1.2], targetRef: {kind: Pod, name: server-0, namespace: demo}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-abc, namespace: demo, labels: {kubernetes.io/service-name: echo}}
addressType: IPv4
ports: [{name: tcp-echo, port: 9000}]
endpoints: [{addresses: [10.200.1.2], targetRef: {kind: Pod, name: server-0, namespace: demo}}]
---
# GAMMA: a mesh route on the Service `server`: 80/20 split, a header filter, a timeout.
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: server-split, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: server, port: 80}]
  rules:
    - filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {add: [{name: x-route, value: mesh}]}
      backendRefs:
        - {name: server-v1, port: 80, weight: 80}
        - {name: server-v2, port: 80, weight: 20}
      timeouts: {request: 5s}
---
# The walkthrough's kind of limit: Istio local rate limit in the sidecars' inbound, port 8082 only, for
# the pods labelled tier=server-tier (a label only the Pod object has, no Service selector).
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: inbound-ratelimit, namespace: demo}
spec:
  workloadSelector:
    labels: {tier: server-tier}
  configPatches:
    - applyTo: HTTP_FILTER
      match:
        context: SIDECAR_INBOUND
        listener:
          portNumber: 8082
          filterChain:
            filter: {name: "envoy.filters.network.http_connection_manager"}
      patch:
        operation: INSERT_BEFORE
        value:
          name: envoy.filters.http.local_ratelimit
          typed_config:
            "@type": type.googleapis.com/udpa.type.v1.TypedStruct
            type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
            value:
              stat_prefix: http_local_rate_limiter
              token_bucket: {max_tokens: 5, tokens_per_fill: 1, fill_interval: 60s}
              filter_enabled:
                runtime_key: local_rate_limit_enabled
                default_value: {numerator: 100, denominator: HUNDRED}
              filter_enforced:
                runtime_key: local_rate_limit_enforced
                default_value: {numerator: 100, denominator: HUNDRED}
              response_headers_to_add:
                - append_action: APPEND_IF_EXISTS_OR_ADD
                  header: {key: x-rate-limited, value: TOO_MANY_REQUESTS}
              status: {code: 429}
"#;

struct Pod {
    ns: String,
    ip: &'static str,
    name: &'static str,
    app: App,
}

/// Starts the injected `mesh-proxy` container's process in the pod: its args and env as
/// injected; the proxy's uid/gid (1337) like the pod's securityContext; the CA ConfigMap
/// mounted where the injected `MESH_CA_ROOT_PATH` points.
fn start_sidecar(
    cleanup: &mut Cleanup,
    bin: &Path,
    pod: &Pod,
    injected: &Injected,
    ca: &Path,
    token: &Path,
    log: &Path,
) {
    let env_of = |name: &str| -> String {
        injected
            .proxy_env
            .iter()
            .find(|(k, _)| k == name)
            .unwrap_or_else(|| panic!("{name} injected"))
            .1
            .clone()
    };
    // `ip netns exec` needs root; in a mount namespace of its own a tmpfs on /run (where
    // /var/run points) takes the files of the pod's volumes where the injected env says they
    // are, as the kubelet would mount them (the CA ConfigMap, the projected token); setpriv
    // then drops to the proxy's uid/gid.
    let script = r#"set -e
mount -t tmpfs -o mode=755 tmpfs /run
for f in "$CA_SRC:$MESH_CA_ROOT_PATH" "$TOKEN_SRC:$MESH_TOKEN_PATH"; do
  src=${f%%:*}; dst=${f#*:}
  mkdir -p "$(dirname "$dst")"
  cp "$src" "$dst"
  chmod 644 "$dst"
done
unset CA_SRC TOKEN_SRC
exec setpriv --reuid 1337 --regid 1337 --clear-groups "$@""#;
    assert!(env_of("MESH_CA_ROOT_PATH").starts_with("/var/run/"));
    assert!(env_of("MESH_TOKEN_PATH").starts_with("/var/run/"));
    let log = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &pod.ns])
        .args([
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(bin)
        .args(&injected.proxy_args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CA_SRC", ca)
        .env("TOKEN_SRC", token)
        .envs(std::env::var("RUST_LOG").ok().map(|v| ("RUST_LOG", v)))
        .envs(injected.proxy_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    cleanup.children.push(cmd.spawn().unwrap());
}

/// `kubectl` against the test's API server; panics with its output unless it succeeds.
fn kubectl(env: &TestEnv, args: &[&str]) -> String {
    run(Command::new(env.kubectl_path())
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .env_remove("KUBECONFIG")
        .args(args))
}

fn kubectl_apply(env: &TestEnv, yaml: &str) {
    run_with_stdin(
        Command::new(env.kubectl_path())
            .arg("--kubeconfig")
            .arg(env.kubeconfig())
            .env_remove("KUBECONFIG")
            .args(["apply", "--server-side", "-f", "-"]),
        yaml,
    );
}

/// Polls `f` every 200 ms for up to `secs` seconds.
fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A veth from the test's namespace into `ns` (`cp0` inside, addressed `10.201.<n>.2/30`)
/// with a route to the control plane's address. `n` = 1 also carries that address.
fn control_plane_link(ns: &str, n: u8, id: u32) {
    let outside = format!("mt{id}-{n}");
    ip(&[
        "link", "add", &outside, "type", "veth", "peer", "name", "cp0", "netns", ns,
    ]);
    ip(&["addr", "add", &format!("10.201.{n}.1/30"), "dev", &outside]);
    if n == 1 {
        ip(&[
            "addr",
            "add",
            &format!("{CONTROL_PLANE_IP}/32"),
            "dev",
            &outside,
        ]);
    }
    ip(&["link", "set", &outside, "up"]);
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("10.201.{n}.2/30"),
        "dev",
        "cp0",
    ]);
    ip(&["-n", ns, "link", "set", "cp0", "up"]);
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        &format!("{CONTROL_PLANE_IP}/32"),
        "via",
        &format!("10.201.{n}.1"),
    ]);
    // The cluster DNS's answer for the injected control-plane address.
    let etc = Path::new("/etc/netns").join(ns);
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("hosts"),
        format!("127.0.0.1 localhost\n{CONTROL_PLANE_IP} meshd.mesh-system.svc meshd.mesh-system.svc.cluster.local\n"),
    )
    .unwrap();
}

fn wait_ready(pod: &mut Pod, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = pod.app.http("127.0.0.1:15021", "/ready", 1);
        if h.statuses.get("200") == Some(&1) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the sidecar of {} is not ready: {h:?}\n{}",
            pod.name,
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn sidecars_in_network_namespaces() {
    let missing = missing_prerequisites();
    if !missing.is_empty() {
        if std::env::var("MESHCTL_SKIP_NETNS").as_deref() == Ok("1") {
            eprintln!(
                "skipped (MESHCTL_SKIP_NETNS=1): missing {}",
                missing.join(", ")
            );
            return;
        }
        panic!(
            "this test needs {} (install iproute2, iptables and util-linux and run as root, \
             e.g. through .ci/run), or set MESHCTL_SKIP_NETNS=1 to skip it",
            missing.join(", ")
        );
    }
    let bin = mesh_proxy_bin();
    let env = TestEnv::shared();
    let id = std::process::id();
    let (cns, sns) = (format!("mt-client-{id}"), format!("mt-server-{id}"));
    let mut cleanup = Cleanup {
        namespaces: Vec::new(),
        children: Vec::new(),
    };

    // The cluster side: our CRDs, then the objects the sidecars are configured from.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for crd in [
        "manifests/gateway-api/httproutes.yaml",
        "manifests/gateway-api/gateways.yaml",
        "manifests/gateway-api/gatewayclasses.yaml",
        "manifests/gateway-api/referencegrants.yaml",
        "manifests/istio/envoyfilters.networking.istio.io.yaml",
        "manifests/istio/peerauthentications.security.istio.io.yaml",
        "manifests/crds/ratelimitpolicies.policy.meshctl.io.yaml",
    ] {
        kubectl(
            env,
            &[
                "apply",
                "--server-side",
                "-f",
                root.join(crd).to_str().unwrap(),
            ],
        );
    }
    kubectl(
        env,
        &[
            "wait",
            "--for",
            "condition=Established",
            "--timeout=60s",
            "crd",
            "--all",
        ],
    );
    kubectl_apply(env, RESOURCES);
    let cluster_ip = |svc: &str| {
        kubectl(
            env,
            &[
                "-n",
                "demo",
                "get",
                "service",
                svc,
                "-o",
                "jsonpath={.spec.clusterIP}",
            ],
        )
    };
    let split_svc = format!("{}:80", cluster_ip("server"));
    let echo_svc = format!("{}:9000", cluster_ip("echo"));

    // Two pods joined by a veth pair, each with a link to the control plane.
    for ns in [&cns, &sns] {
        ip(&["netns", "add", ns]);
        cleanup.namespaces.push(ns.clone());
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    ip(&[
        "-n", &cns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &sns,
    ]);
    for (ns, addr) in [(&cns, CLIENT_IP), (&sns, SERVER_IP)] {
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        // The Service CIDR: routable only towards the other pod.
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            mesh_testenv::SERVICE_CIDR,
            "dev",
            "eth0",
        ]);
    }
    control_plane_link(&cns, 1, id);
    control_plane_link(&sns, 2, id);

    let dir = tempfile::tempdir().unwrap();
    // Readable by the proxy's uid.
    run(Command::new("chmod").args(["755", dir.path().to_str().unwrap()]));

    // The control plane, as meshd runs it but outside the cluster (--kubeconfig).
    let admin_port = free_port();
    let cp_log = dir.path().join("control-plane.log");
    {
        let log = std::fs::File::create(&cp_log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_meshctl"))
            .arg("control-plane")
            .arg("--kubeconfig")
            .arg(env.kubeconfig())
            .args(["--no-webhook", "--no-gateway-deployments"])
            .arg(format!("--distribution-addr={CONTROL_PLANE_IP}:15012"))
            .arg("--distribution-cert-dir")
            .arg(dir.path().join("control-plane-certs"))
            // No mesh installed here (no mesh-system namespace for the CA's Secret).
            .arg("--mesh-ca-dir")
            .arg(dir.path().join("mesh-ca"))
            .arg(format!("--admin-addr=127.0.0.1:{admin_port}"))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        cleanup.children.push(child);
    }
    // What the kubelet would mount: the CA ConfigMap the control plane publishes.
    let ca_pem = eventually(30, "the ConfigMap mesh-ca-root-cert in demo", || {
        let out = Command::new(env.kubectl_path())
            .arg("--kubeconfig")
            .arg(env.kubeconfig())
            .args(["-n", "demo", "get", "configmap", "mesh-ca-root-cert"])
            .args(["-o", "jsonpath={.data.root-cert\\.pem}"])
            .output()
            .ok()?;
        let pem = String::from_utf8_lossy(&out.stdout).into_owned();
        pem.contains("BEGIN CERTIFICATE").then_some(pem)
    });
    let ca = dir.path().join("root-cert.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    run(Command::new("chmod").args(["644", ca.to_str().unwrap()]));

    let mut client = Pod {
        app: App::start(&mut cleanup, &cns, ""),
        ns: cns.clone(),
        ip: CLIENT_IP,
        name: "client-0",
    };
    let mut server = Pod {
        app: App::start(&mut cleanup, &sns, "8080=v1,8081=v2,8082=limited,9000=echo"),
        ns: sns.clone(),
        ip: SERVER_IP,
        name: "server-0",
    };

    // Without the mesh: the baseline.
    let direct = client.app.http(&format!("{SERVER_IP}:8080"), "/", 300);
    assert_eq!(direct.statuses.get("200"), Some(&300), "{direct:?}");
    let echo = client
        .app
        .cmd(&format!("tcp {SERVER_IP}:9000 hello-direct"));
    assert_eq!(echo["echo"], "hello-direct");

    // The mesh, as injected.
    let mut logs = Vec::new();
    for (pod, app) in [(&client, "client"), (&server, "server")] {
        let injected = inject(pod.name, pod.ip, app);
        assert_eq!(injected.init_args[0], "redirect");
        // The pod in the API server (its labels are what the control plane matches
        // workloadSelectors against), on a node no kubelet runs: it stays Pending, with no IP
        // for the EndpointSlice controller to publish.
        let mut stored = injected.pod.clone();
        stored["spec"]["nodeName"] = "netns-node".into();
        kubectl_apply(env, &stored.to_string());
        run(Command::new("ip")
            .args(["netns", "exec", &pod.ns])
            .arg(&bin)
            .args(&injected.init_args));
        let rules =
            run(Command::new("ip").args(["netns", "exec", &pod.ns, "iptables-save", "-t", "nat"]));
        assert!(rules.contains("-A OUTPUT -p tcp -j MESH_OUTPUT"), "{rules}");
        // The projected token the kubelet would mount: the pod's service account, the mesh's
        // audience, bound to the pod.
        let token = kubectl(
            env,
            &[
                "-n",
                "demo",
                "create",
                "token",
                app,
                "--audience",
                "meshctl",
                "--bound-object-kind",
                "Pod",
                "--bound-object-name",
                pod.name,
            ],
        );
        let token_file = dir.path().join(format!("{app}-token"));
        std::fs::write(&token_file, token.trim()).unwrap();
        run(Command::new("chmod").args(["644", token_file.to_str().unwrap()]));
        let log = dir.path().join(format!("{app}-proxy.log"));
        start_sidecar(&mut cleanup, &bin, pod, &injected, &ca, &token_file, &log);
        logs.push(log);
    }
    wait_ready(&mut client, &logs[0]);
    wait_ready(&mut server, &logs[1]);
    logs.push(cp_log);
    let show_logs = || {
        logs.iter()
            .map(|l| {
                format!(
                    "--- {}\n{}",
                    l.display(),
                    std::fs::read_to_string(l).unwrap_or_default()
                )
            })
            .collect::<String>()
    };

    // 0. The kubelet's probes of the server pod, rewritten by injection: from the node to
    //    the pod's app-health port (excluded from inbound capture), which runs the original
    //    probes against the app inside the pod.
    let node_get = |path: &str| -> String {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect("10.201.2.2:15020").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: 10.201.2.2:15020\r\nuser-agent: kube-probe/1.36\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let ready = node_get("/app-health/server/readyz");
    assert!(
        ready.starts_with("HTTP/1.1 200"),
        "{ready}\n{}",
        show_logs()
    );
    assert!(ready.ends_with("v1 /probe x-route=-"), "{ready}");
    let live = node_get("/app-health/server/livez");
    assert!(live.starts_with("HTTP/1.1 503"), "{live}");
    assert!(node_get("/app-health/client/readyz").starts_with("HTTP/1.1 404"));

    // 1. HTTP from the client app to the server pod: through both proxies.
    let meshed = client.app.http(&format!("{SERVER_IP}:8080"), "/", 300);
    assert_eq!(
        meshed.statuses.get("200"),
        Some(&300),
        "{:?} {:?}\n{}",
        meshed.statuses,
        meshed.errors,
        show_logs()
    );
    assert_eq!(meshed.bodies.get("v1 / x-route=-"), Some(&300));
    let cm = client.app.metrics(15090);
    let sm = server.app.metrics(15090);
    let out_reqs = counter(
        &cm,
        "mesh_requests_total",
        &[
            "listener=\"sidecar-outbound\"",
            "route=\"passthrough\"",
            "code=\"200\"",
        ],
    );
    let in_reqs = counter(
        &sm,
        "mesh_requests_total",
        &[
            "listener=\"sidecar-inbound\"",
            "route=\"inbound|8080\"",
            "code=\"200\"",
        ],
    );
    assert!(out_reqs >= 300, "client proxy metrics:\n{cm}");
    assert!(in_reqs >= 300, "server proxy metrics:\n{sm}");

    // The app's traffic to localhost is not captured: the server app calling itself on
    // 127.0.0.1 leaves the server proxy's request counters as they were.
    let requests = |m: &str| counter(m, "mesh_requests_total", &[]);
    let before = requests(&server.app.metrics(15090));
    let local = server.app.http("127.0.0.1:8080", "/local", 10);
    assert_eq!(
        local.bodies.get("v1 /local x-route=-"),
        Some(&10),
        "{local:?}"
    );
    assert_eq!(requests(&server.app.metrics(15090)), before);

    // 2. Raw TCP passes untouched, to the pod and through the echo Service's ClusterIP.
    for (addr, text) in [
        (format!("{SERVER_IP}:9000"), "hello-pod"),
        (echo_svc.clone(), "hello-service"),
    ] {
        let echo = client.app.cmd(&format!("tcp {addr} {text}"));
        assert_eq!(echo["echo"], text, "{echo}\n{}", show_logs());
    }
    let cm = client.app.metrics(15090);
    let sm = server.app.metrics(15090);
    assert!(
        counter(
            &cm,
            "mesh_tcp_connections_total",
            &["backend=\"passthrough\""]
        ) >= 1,
        "{cm}"
    );
    assert!(
        counter(
            &cm,
            "mesh_tcp_connections_total",
            &["backend=\"demo/echo:9000\""]
        ) >= 1,
        "{cm}"
    );
    assert!(
        counter(
            &sm,
            "mesh_tcp_connections_total",
            &["backend=\"inbound|9000\""]
        ) >= 2,
        "{sm}"
    );

    // 3. The mesh route on Service `server` splits 80/20 and adds its header.
    let split = client.app.http(&split_svc, "/split", 400);
    assert_eq!(
        split.statuses.get("200"),
        Some(&400),
        "{split:?}\n{}",
        show_logs()
    );
    let v1 = split
        .bodies
        .get("v1 /split x-route=mesh")
        .copied()
        .unwrap_or(0);
    let v2 = split
        .bodies
        .get("v2 /split x-route=mesh")
        .copied()
        .unwrap_or(0);
    assert_eq!(v1 + v2, 400, "{split:?}");
    // 80% of 400 = 320; binomial sd = 8: a wide margin.
    assert!((270..=370).contains(&v1), "v1 {v1} v2 {v2}");
    let cm = client.app.metrics(15090);
    assert!(
        counter(
            &cm,
            "mesh_requests_total",
            &[
                "route=\"demo/server-split/0/0\"",
                "backend=\"demo/server-v2:80\""
            ]
        ) >= 1,
        "{cm}"
    );

    // Both sidecars are configured by the control plane and have ACKed what it sent.
    let status = run(Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["proxy-status", "--control-plane-admin"])
        .arg(format!("http://127.0.0.1:{admin_port}")));
    for (pod, sa) in [
        ("sidecar demo/client-0", " demo/client "),
        ("sidecar demo/server-0", " demo/server "),
    ] {
        assert!(
            status
                .lines()
                .any(|l| l.starts_with(pod) && l.contains(sa) && l.contains("SYNCED")),
            "{pod} not SYNCED as{sa}:\n{status}"
        );
    }

    // A weight edit in the cluster reaches the client's sidecar: everything to v2.
    kubectl(
        env,
        &[
            "-n",
            "demo",
            "patch",
            "httproute",
            "server-split",
            "--type=json",
            "-p",
            r#"[{"op":"replace","path":"/spec/rules/0/backendRefs/0/weight","value":0},{"op":"replace","path":"/spec/rules/0/backendRefs/1/weight","value":100}]"#,
        ],
    );
    let edited = Instant::now();
    eventually(20, "the weight edit to reach the client's sidecar", || {
        let h = client.app.http(&split_svc, "/split", 20);
        (h.bodies.get("v2 /split x-route=mesh") == Some(&20)).then_some(())
    });
    eprintln!(
        "weight edit to all-v2 traffic: {:.2}s",
        edited.elapsed().as_secs_f64()
    );

    // 4. The inbound rate limit (EnvoyFilter SIDECAR_INBOUND, port 8082): 5 tokens per pod,
    // answered by the server's proxy.
    let limited = client.app.http(&format!("{SERVER_IP}:8082"), "/", 8);
    assert_eq!(limited.statuses.get("200"), Some(&5), "{limited:?}");
    assert_eq!(
        limited.statuses.get("429+x-rate-limited"),
        Some(&3),
        "{limited:?}"
    );
    let sm = server.app.metrics(15090);
    assert_eq!(
        counter(
            &sm,
            "mesh_rate_limited_total",
            &["listener=\"sidecar-inbound\"", "route=\"inbound|8082\""]
        ),
        3,
        "{sm}"
    );
    // Not on the (unlimited) 8080.
    let more = client.app.http(&format!("{SERVER_IP}:8080"), "/", 20);
    assert_eq!(more.statuses.get("200"), Some(&20));

    // 5. Refused stays refused: no app on 8099. HTTP gets no response (never a 200), TCP a
    // reset/close with nothing echoed.
    let refused = client.app.http(&format!("{SERVER_IP}:8099"), "/", 1);
    assert!(
        refused.statuses.is_empty() && refused.errors.len() == 1,
        "{refused:?}"
    );
    let tcp_refused = client.app.cmd(&format!("tcp {SERVER_IP}:8099 hello"));
    assert!(
        tcp_refused["echo"].as_str().unwrap_or("").is_empty(),
        "{tcp_refused}"
    );

    // 6. Latency: direct vs through both proxies (pod IP, passthrough) and through the mesh
    // route (ClusterIP).
    let meshed = client.app.http(&format!("{SERVER_IP}:8080"), "/", 300);
    let routed = client.app.http(&split_svc, "/", 300);
    let (d50, d99) = lat(&direct);
    let (m50, m99) = lat(&meshed);
    let (r50, r99) = lat(&routed);
    eprintln!(
        "latency over {} sequential keep-alive requests ({} build, shared machine):\n\
         \x20 direct (no mesh)                    p50 {d50:.3} ms  p99 {d99:.3} ms\n\
         \x20 both sidecars, pod IP (passthrough) p50 {m50:.3} ms  p99 {m99:.3} ms\n\
         \x20 both sidecars, Service route        p50 {r50:.3} ms  p99 {r99:.3} ms\n\
         \x20 added per hop (p50): passthrough {:.3} ms, routed {:.3} ms",
        direct.lat_us.len(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        (m50 - d50) / 2.0,
        (r50 - d50) / 2.0
    );

    // 7. Mutual TLS between the pods, with nothing configured: each sidecar got a workload
    //    certificate from the control plane's CA for its pod's service account.
    let client_id = "spiffe://cluster.local/ns/demo/sa/client";
    let server_id = "spiffe://cluster.local/ns/demo/sa/server";
    let sm = server.app.metrics(15090);
    assert!(
        counter(
            &sm,
            "mesh_mtls_requests_total",
            &[&format!("source_principal=\"{client_id}\"")]
        ) >= 300,
        "the server's sidecar saw no mutual TLS from the client:\n{sm}\n{}",
        show_logs()
    );
    // The app learns who called (Istio's X-Forwarded-Client-Cert), by pod IP and by Service.
    for target in [format!("{SERVER_IP}:8080"), split_svc.clone()] {
        let who = client.app.http(&target, "/whoami", 1);
        let xfcc = who.bodies.keys().next().cloned().unwrap_or_default();
        assert!(
            xfcc.starts_with(&format!("By={server_id};Hash="))
                && xfcc.ends_with(&format!(";URI={client_id}")),
            "{target}: {who:?}"
        );
    }
    // On the wire between the pods: TLS only, no request line, header or body in the clear.
    // Every packet on the server pod's side of the veth, payload printed as text.
    let capture = dir.path().join("pods.txt");
    let capture_err = dir.path().join("tcpdump.log");
    let mut dump = Command::new("ip")
        .args([
            "netns", "exec", &sns, "tcpdump", "-i", "eth0", "-n", "-l", "-A", "-s", "0",
        ])
        .arg("tcp")
        .stdout(std::fs::File::create(&capture).unwrap())
        .stderr(std::fs::File::create(&capture_err).unwrap())
        .spawn()
        .unwrap();
    eventually(10, "tcpdump to start", || {
        std::fs::read_to_string(&capture_err)
            .ok()
            .filter(|l| l.contains("listening on"))
            .map(|_| ())
    });
    let canary = "wire-canary-7d1f";
    let by_ip = client
        .app
        .http(&format!("{SERVER_IP}:8080"), &format!("/{canary}"), 5);
    let by_svc = client.app.http(&split_svc, &format!("/{canary}"), 5);
    assert_eq!(by_ip.statuses.get("200"), Some(&5), "{by_ip:?}");
    assert_eq!(by_svc.statuses.get("200"), Some(&5), "{by_svc:?}");
    let echoed = client
        .app
        .cmd(&format!("tcp {SERVER_IP}:9000 {canary}-tcp"));
    assert_eq!(echoed["echo"], format!("{canary}-tcp"));
    std::thread::sleep(Duration::from_millis(1000));
    run(Command::new("kill").args(["-INT", &dump.id().to_string()]));
    let _ = dump.wait();
    let text = std::fs::read_to_string(&capture).unwrap();
    let packets = text
        .lines()
        .filter(|l| l.contains(&format!("{CLIENT_IP}.")) && l.contains(" > "))
        .count();
    assert!(
        packets >= 20,
        "only {packets} packets from the client pod captured:\n{text}\n{}",
        std::fs::read_to_string(&capture_err).unwrap_or_default()
    );
    for plain in [canary, "HTTP/1.1", "x-route", "user-agent", "host:"] {
        assert!(
            !text
                .to_ascii_lowercase()
                .contains(&plain.to_ascii_lowercase()),
            "{plain:?} crossed the veth in plaintext"
        );
    }
    // A client outside the mesh (the node, plaintext): served under the default PERMISSIVE,
    // refused once the namespace's PeerAuthentication says STRICT; the meshed client and the
    // kubelet's probes still get through.
    let node_plain = || -> String {
        use std::io::Read;
        let Ok(mut s) = std::net::TcpStream::connect("10.201.2.2:8080") else {
            return String::new();
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = write!(
            s,
            "GET / HTTP/1.1\r\nhost: server\r\nconnection: close\r\n\r\n"
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let plain = node_plain();
    assert!(plain.starts_with("HTTP/1.1 200"), "PERMISSIVE: {plain:?}");
    kubectl_apply(
        env,
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {name: default, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n",
    );
    eventually(30, "STRICT to reach the server's sidecar", || {
        node_plain().is_empty().then_some(())
    });
    let strict = client.app.http(&format!("{SERVER_IP}:8080"), "/", 20);
    assert_eq!(strict.statuses.get("200"), Some(&20), "{strict:?}");
    let ready = node_get("/app-health/server/readyz");
    assert!(
        ready.starts_with("HTTP/1.1 200"),
        "probe under STRICT: {ready}"
    );
    // proxy-status shows each sidecar's SPIFFE ID and certificate expiry.
    let status = run(Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["proxy-status", "--control-plane-admin"])
        .arg(format!("http://127.0.0.1:{admin_port}")));
    for (pod, id) in [
        ("sidecar demo/client-0", client_id),
        ("sidecar demo/server-0", server_id),
    ] {
        assert!(
            status
                .lines()
                .any(|l| l.starts_with(pod) && l.contains(id) && l.contains(" in 23h")),
            "{pod} without its identity or certificate expiry:\n{status}"
        );
    }

    // Cleanup: rules removed by the same subcommand, then everything else by the guard.
    for ns in [&cns, &sns] {
        run(Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&bin)
            .args(["redirect", "--cleanup"]));
        let rules =
            run(Command::new("ip").args(["netns", "exec", ns, "iptables-save", "-t", "nat"]));
        assert!(!rules.contains("MESH_"), "{rules}");
    }
    drop(client);
    drop(server);
    drop(cleanup);
    let left = run(Command::new("ip").args(["netns", "list"]));
    assert!(!left.contains(&cns) && !left.contains(&sns), "{left}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
