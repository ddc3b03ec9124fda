//! What the end-to-end walkthrough test drives: a network namespace the gateway proxy runs in
//! (its pod IPs routed to local backends), the walkthrough's apps and HTTP checks (canary
//! split, parallel requests), and the `meshctl` processes (control plane, install, uninstall).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway_api::apis::standard::httproutes::HttpRoute;
use http_body_util::{BodyExt, Empty};
use kube::api::Api;
use mesh_testenv::TestEnv;
use serde_json::Value;

pub(super) const WALKTHROUGH: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/examples/seed-walkthrough");

pub(super) fn walkthrough(file: &str) -> String {
    format!("{WALKTHROUGH}/{file}")
}

pub(super) async fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace held by `unshare --net sh -c read` (it ends, and with it the
/// namespace and the veth pair, when the test process goes away and the pipe closes).
pub(super) struct NetNs {
    pub(super) holder: tokio::process::Child,
    pub(super) pid: u32,
    pub(super) host_ip: String,
    pub(super) ns_ip: String,
}

impl NetNs {
    pub(super) async fn create() -> NetNs {
        let holder = tokio::process::Command::new("unshare")
            .args(["--net", "--", "sh", "-c", "read x"])
            .stdin(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("unshare (needs root)");
        let pid = holder.id().unwrap();
        let k = 16 + (std::process::id() % 200);
        let (host_if, ns_if) = (format!("mcph{k}"), format!("mcpn{k}"));
        let (host_ip, ns_ip) = (format!("100.88.{k}.1"), format!("100.88.{k}.2"));
        let netns = format!("--net=/proc/{pid}/ns/net");
        // A route is needed for the pod IPs (the DNAT in OUTPUT happens after routing).
        // The namespace exists once unshare has exec'ed sh.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = sh("ip", &["link", "del", &host_if]).await;
        sh(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
            ],
        )
        .await
        .unwrap();
        sh("ip", &["link", "set", &ns_if, "netns", &pid.to_string()])
            .await
            .unwrap();
        sh(
            "ip",
            &["addr", "add", &format!("{host_ip}/30"), "dev", &host_if],
        )
        .await
        .unwrap();
        sh("ip", &["link", "set", &host_if, "up"]).await.unwrap();
        let script = format!(
            "ip link set lo up && ip addr add {ns_ip}/30 dev {ns_if} && ip link set {ns_if} up && \
             ip route add default via {host_ip}"
        );
        sh("nsenter", &[&netns, "sh", "-c", &script]).await.unwrap();
        NetNs {
            holder,
            pid,
            host_ip,
            ns_ip,
        }
    }

    pub(super) fn nsenter_arg(&self) -> String {
        format!("--net=/proc/{}/ns/net", self.pid)
    }

    /// Inside the namespace, connections to `pod_ip:port` go to `to`.
    pub(super) async fn dnat(&self, pod_ip: &str, port: u16, to: SocketAddr) {
        sh(
            "nsenter",
            &[
                &self.nsenter_arg(),
                "iptables",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-d",
                pod_ip,
                "-p",
                "tcp",
                "--dport",
                &port.to_string(),
                "-j",
                "DNAT",
                "--to-destination",
                &to.to_string(),
            ],
        )
        .await
        .unwrap();
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = self.holder.start_kill();
    }
}

/// The walkthrough's app: answers every request with its name.
pub(super) async fn backend(ip: &str, name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move || async move { name });
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

pub(super) fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(super) struct Resp {
    pub(super) status: u16,
    pub(super) headers: http::HeaderMap,
    pub(super) body: String,
}

pub(super) async fn get(url: &str) -> Result<Resp, String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.get(uri))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// The walkthrough's `check_canary.py`: 100 sequential GETs, count the bodies naming v1 and v2.
pub(super) const CANARY_SAMPLES: u32 = 400;

/// `CANARY_SAMPLES` sequential GETs, counted by the version that answered. The bands the
/// callers assert are 4.5 binomial standard deviations wide: a correct split falls outside
/// in fewer than 1 in 100,000 runs, a split 10 points off still fails.
pub(super) async fn canary(url: &str) -> (u32, u32) {
    let (mut v1, mut v2) = (0, 0);
    for _ in 0..CANARY_SAMPLES {
        let r = get(url).await.unwrap();
        if r.body.contains("v1") {
            v1 += 1;
        } else if r.body.contains("v2") {
            v2 += 1;
        }
    }
    (v1, v2)
}

/// `seq 1 100 | xargs -P100 curl ...`: 100 parallel GETs, responses by status.
pub(super) async fn parallel(url: &str) -> (BTreeMap<u16, u32>, Vec<Resp>) {
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let url = url.to_string();
            tokio::spawn(async move { get(&url).await.unwrap() })
        })
        .collect();
    let mut counts = BTreeMap::new();
    let mut limited = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        *counts.entry(r.status).or_insert(0) += 1;
        if r.status == 429 {
            limited.push(r);
        }
    }
    (counts, limited)
}

pub(super) fn mesh_proxy_binary() -> PathBuf {
    // target/debug/deps/e2e-HASH → target/debug/mesh-proxy, built here if needed.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "-p", "mesh-proxy-cli", "--bin", "mesh-proxy"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(status.success(), "building mesh-proxy");
    dir.join("mesh-proxy")
}

pub(super) fn condition<'a>(conds: &'a Value, t: &str) -> Option<&'a Value> {
    conds.as_array()?.iter().find(|c| c["type"] == t)
}

/// The route's status entry for our controller: (Accepted, ResolvedRefs).
pub(super) async fn route_conditions(
    routes: &Api<HttpRoute>,
    name: &str,
) -> Option<(Value, Value, i64)> {
    let r = routes.get(name).await.ok()?;
    let generation = r.metadata.generation.unwrap_or(0);
    let status = serde_json::to_value(&r.status).ok()?;
    let parent = status["parents"]
        .as_array()?
        .iter()
        .find(|p| p["controllerName"] == "istio.io/gateway-controller")?
        .clone();
    Some((
        condition(&parent["conditions"], "Accepted")?.clone(),
        condition(&parent["conditions"], "ResolvedRefs")?.clone(),
        generation,
    ))
}

pub(super) struct Child {
    pub(super) child: tokio::process::Child,
    pub(super) log: PathBuf,
}

impl Child {
    pub(super) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

pub(super) fn spawn_logged(mut cmd: tokio::process::Command, log: &Path) -> Child {
    let file = std::fs::File::create(log).unwrap();
    let child = cmd
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    Child {
        child,
        log: log.to_path_buf(),
    }
}

pub(super) fn control_plane(
    env: &TestEnv,
    dir: &Path,
    webhook: &str,
    dist: &str,
    admin: &str,
    log: &str,
) -> Child {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshctl"));
    cmd.args([
        "control-plane",
        // The webhook the installer registered (URL mode), with its certificate and the
        // injection config it rendered.
        "--webhook-addr",
        webhook,
        "--tls-cert",
        dir.join("webhook/tls.crt").to_str().unwrap(),
        "--tls-key",
        dir.join("webhook/tls.key").to_str().unwrap(),
        "--injection-config",
        dir.join("webhook/injection-config.yaml").to_str().unwrap(),
        "--kubeconfig",
        env.kubeconfig().to_str().unwrap(),
        "--distribution-addr",
        dist,
        "--admin-addr",
        admin,
        "--distribution-cert-dir",
        dir.join("pki").to_str().unwrap(),
        // What the walkthrough's profile (istio-gwapi.yaml) asks for: a NodePort ingress gateway.
        "--gateway-service-type",
        "NodePort",
        "--hub",
        "registry.example/meshctl",
        "--tag",
        "e2e",
    ])
    .env("RUST_LOG", "info,meshctl=debug,kube=warn");
    spawn_logged(cmd, &dir.join(log))
}

pub(super) async fn config_dump(ns_ip: &str) -> Option<Value> {
    let r = get(&format!("http://{ns_ip}:15000/config_dump"))
        .await
        .ok()?;
    serde_json::from_str(&r.body).ok()
}

pub(super) fn meshctl(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .output()
        .unwrap()
}

/// `meshctl uninstall -y` when the test ends, also on panic (CRDs stay: no `--purge`).
pub(super) struct Uninstall {
    pub(super) kubeconfig: String,
}

impl Drop for Uninstall {
    fn drop(&mut self) {
        let t = Instant::now();
        let out = meshctl(&["uninstall", "-y", "--kubeconfig", &self.kubeconfig]);
        eprintln!(
            "meshctl uninstall -y: {} in {:?}\n{}{}",
            out.status,
            t.elapsed(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() && !std::thread::panicking() {
            panic!("meshctl uninstall failed");
        }
    }
}

pub(super) fn names(list: &Option<Vec<k8s_openapi::api::core::v1::Container>>) -> Vec<String> {
    list.iter().flatten().map(|c| c.name.clone()).collect()
}
