//! Bringing a control plane up: the work directory, the PKI and kubeconfigs, then etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler and kwok in order, each waited on
//! until ready, and the fake node kwok manages.

use std::future::Future;
use std::net::TcpListener;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::certs::{self, Ca, CertPair, Usage};
use crate::process::{self, Supervised};
use crate::{NODE_NAME, POD_CIDR, SERVICE_CIDR, TestEnv};

const KWOK_STAGES: &str = include_str!("../../tests/kube-testenv/kwok/stages.yaml");

/// Free loopback ports, all distinct (held open together while choosing).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("finding free ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

fn kubeconfig_yaml(server: &str, ca_pem: &str, user: &str, client: &CertPair) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: testenv
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: testenv
  context:
    cluster: testenv
    user: {user}
    namespace: default
current-context: testenv
",
        ca = base64(ca_pem.as_bytes()),
        cert = base64(client.cert_pem.as_bytes()),
        key = base64(client.key_pem.as_bytes()),
    )
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

struct Starter<'a> {
    dir: &'a Path,
    bin_dir: &'a Path,
    procs: Vec<Supervised>,
    /// (what, seconds since the start) for each readiness step, for the startup report.
    phases: Vec<(String, f64)>,
    t0: Instant,
}

impl Starter<'_> {
    fn spawn(&mut self, name: &str, args: Vec<String>) -> Result<()> {
        let log = self.dir.join("logs").join(format!("{name}.log"));
        let p = Supervised::spawn(name, &self.bin_dir.join(name), &args, &log)?;
        self.procs.push(p);
        Ok(())
    }

    fn check(&mut self) -> Result<()> {
        self.procs
            .iter_mut()
            .try_for_each(Supervised::check_running)
    }

    /// Polls `f` until it yields, failing early if a component dies.
    async fn wait<T, F, Fut>(&mut self, timeout: Duration, what: &str, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>>>,
    {
        let deadline = Instant::now() + timeout;
        let mut last_err = None;
        loop {
            self.check()
                .with_context(|| format!("while waiting for {what}"))?;
            match f().await {
                Ok(Some(v)) => {
                    self.phases
                        .push((what.to_owned(), self.t0.elapsed().as_secs_f64()));
                    return Ok(v);
                }
                Ok(None) => {}
                Err(e) => last_err = Some(e),
            }
            if Instant::now() >= deadline {
                let e = last_err.unwrap_or_else(|| anyhow!("not yet"));
                let logs = self
                    .procs
                    .iter()
                    .map(|p| {
                        format!(
                            "--- {} ---\n{}",
                            p.log.display(),
                            process::log_tail(&p.log, 15)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(e.context(format!(
                    "timed out after {timeout:?} waiting for {what}; recent logs:\n{logs}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub(crate) async fn start_in(
    dir: &Path,
    bin_dir: &Path,
    keep: bool,
    janitor: Option<Supervised>,
) -> Result<TestEnv> {
    let d = |p: &str| dir.join(p).display().to_string();
    for sub in [
        "pki",
        "logs",
        "etcd",
        "kube-controller-manager",
        "kube-scheduler",
    ] {
        std::fs::create_dir_all(dir.join(sub))?;
    }

    // PKI.
    let ca = Ca::generate()?;
    let serving = ca.issue(
        "kube-apiserver",
        &[],
        &[
            "localhost",
            "127.0.0.1",
            "10.96.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ],
        Usage::Server,
    )?;
    let admin = ca.issue(
        "meshctl-testenv-admin",
        &["system:masters"],
        &[],
        Usage::Client,
    )?;
    let kcm = ca.issue("system:kube-controller-manager", &[], &[], Usage::Client)?;
    let scheduler = ca.issue("system:kube-scheduler", &[], &[], Usage::Client)?;
    let kwok = ca.issue("kwok-controller", &["system:masters"], &[], Usage::Client)?;
    let (sa_key, sa_pub) = certs::service_account_key()?;
    write(&dir.join("pki/ca.crt"), &ca.pair.cert_pem)?;
    write(&dir.join("pki/ca.key"), &ca.pair.key_pem)?;
    write(&dir.join("pki/apiserver.crt"), &serving.cert_pem)?;
    write(&dir.join("pki/apiserver.key"), &serving.key_pem)?;
    write(&dir.join("pki/sa.key"), &sa_key)?;
    write(&dir.join("pki/sa.pub"), &sa_pub)?;

    let [
        etcd_client,
        etcd_peer,
        apiserver_port,
        kcm_port,
        scheduler_port,
    ]: [u16; 5] = free_ports(5)?.try_into().map_err(|_| anyhow!("ports"))?;
    let server = format!("https://127.0.0.1:{apiserver_port}");
    let kubeconfig = dir.join("kubeconfig");
    write(
        &kubeconfig,
        &kubeconfig_yaml(&server, &ca.pair.cert_pem, "admin", &admin),
    )?;
    for (file, user, pair) in [
        (
            "kube-controller-manager.kubeconfig",
            "system:kube-controller-manager",
            &kcm,
        ),
        (
            "kube-scheduler.kubeconfig",
            "system:kube-scheduler",
            &scheduler,
        ),
        ("kwok.kubeconfig", "kwok-controller", &kwok),
    ] {
        write(
            &dir.join(file),
            &kubeconfig_yaml(&server, &ca.pair.cert_pem, user, pair),
        )?;
    }
    write(&dir.join("kwok.yaml"), KWOK_STAGES)?;

    let mut s = Starter {
        dir,
        bin_dir,
        procs: Vec::new(),
        phases: Vec::new(),
        t0: Instant::now(),
    };
    let result = start_processes(
        &mut s,
        &d,
        etcd_client,
        etcd_peer,
        apiserver_port,
        kcm_port,
        scheduler_port,
        &kubeconfig,
    )
    .await;
    let config = match result {
        Ok(config) => {
            let phases: Vec<String> = s
                .phases
                .iter()
                .map(|(what, at)| format!("{what} at {at:.1}s"))
                .collect();
            eprintln!("mesh-testenv: {}", phases.join(", "));
            config
        }
        Err(e) => {
            // Dropping the processes stops them.
            for p in s.procs.iter_mut().rev() {
                p.request_stop();
            }
            drop(s.procs);
            return Err(e);
        }
    };
    Ok(TestEnv {
        dir: dir.to_owned(),
        bin_dir: bin_dir.to_owned(),
        kubeconfig,
        server,
        ca,
        config,
        processes: Mutex::new(s.procs),
        janitor: Mutex::new(janitor),
        keep,
        startup: Duration::ZERO,
    })
}

#[allow(clippy::too_many_arguments)]
async fn start_processes(
    s: &mut Starter<'_>,
    d: &dyn Fn(&str) -> String,
    etcd_client: u16,
    etcd_peer: u16,
    apiserver_port: u16,
    kcm_port: u16,
    scheduler_port: u16,
    kubeconfig: &Path,
) -> Result<kube::Config> {
    let etcd_url = format!("http://127.0.0.1:{etcd_client}");
    let peer_url = format!("http://127.0.0.1:{etcd_peer}");
    s.spawn(
        "etcd",
        vec![
            "--name=testenv".into(),
            format!("--data-dir={}", d("etcd")),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=testenv={peer_url}"),
            // Throwaway data: no fsync keeps writes fast on a busy disk.
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
        ],
    )?;
    s.wait(Duration::from_secs(30), "etcd /health", || {
        etcd_healthy(etcd_client)
    })
    .await?;

    s.spawn(
        "kube-apiserver",
        vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={apiserver_port}"),
            format!("--cert-dir={}", d("pki")),
            format!("--tls-cert-file={}", d("pki/apiserver.crt")),
            format!("--tls-private-key-file={}", d("pki/apiserver.key")),
            format!("--client-ca-file={}", d("pki/ca.crt")),
            format!("--service-account-key-file={}", d("pki/sa.pub")),
            format!("--service-account-signing-key-file={}", d("pki/sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--authorization-mode=Node,RBAC".into(),
            "--allow-privileged=true".into(),
            // The "kubernetes" Endpoints cannot hold a loopback address.
            "--endpoint-reconciler-type=none".into(),
            "--profiling=false".into(),
        ],
    )?;
    let options = KubeConfigOptions::default();
    let config = kube::Config::from_custom_kubeconfig(Kubeconfig::read_from(kubeconfig)?, &options)
        .await
        .context("reading the admin kubeconfig")?;
    let client = kube::Client::try_from(config.clone())?;
    s.wait(Duration::from_secs(90), "kube-apiserver /readyz", || {
        let client = client.clone();
        async move {
            let req = http::Request::get("/readyz").body(Vec::new())?;
            let body = client.request_text(req).await?;
            Ok((body.trim() == "ok").then_some(()))
        }
    })
    .await?;

    let component_common = |name: &str, port: u16| -> Vec<String> {
        let kc = d(&format!("{name}.kubeconfig"));
        vec![
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", d(name)),
            "--leader-elect=false".into(),
        ]
    };
    let mut kcm_args = component_common("kube-controller-manager", kcm_port);
    kcm_args.extend([
        "--use-service-account-credentials=true".into(),
        format!("--service-account-private-key-file={}", d("pki/sa.key")),
        format!("--root-ca-file={}", d("pki/ca.crt")),
        format!("--cluster-signing-cert-file={}", d("pki/ca.crt")),
        format!("--cluster-signing-key-file={}", d("pki/ca.key")),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
    ]);
    s.spawn("kube-controller-manager", kcm_args)?;
    s.spawn(
        "kube-scheduler",
        component_common("kube-scheduler", scheduler_port),
    )?;
    s.spawn(
        "kwok",
        vec![
            format!("--kubeconfig={}", d("kwok.kubeconfig")),
            format!("--config={}", d("kwok.yaml")),
            "--manage-all-nodes=false".into(),
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
            "--node-lease-duration-seconds=40".into(),
            format!("--cidr={POD_CIDR}"),
            "--node-ip=10.243.0.1".into(),
        ],
    )?;

    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(&PostParams::default(), &fake_node()?)
        .await
        .context("creating the kwok node")?;
    s.wait(
        Duration::from_secs(60),
        &format!("node {NODE_NAME} to be Ready (kwok)"),
        || {
            let nodes = nodes.clone();
            async move {
                let node = nodes.get(NODE_NAME).await?;
                let ready = node
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                let tainted = node
                    .spec
                    .and_then(|s| s.taints)
                    .is_some_and(|t| !t.is_empty());
                Ok((ready && !tainted).then_some(()))
            }
        },
    )
    .await?;
    let sas: Api<ServiceAccount> = Api::namespaced(client, "default");
    s.wait(
        Duration::from_secs(60),
        "the default ServiceAccount (kube-controller-manager)",
        || {
            let sas = sas.clone();
            async move { Ok(sas.get_opt("default").await?.map(|_| ())) }
        },
    )
    .await?;
    Ok(config)
}

/// `GET /health` on etcd's client port, by hand (HTTP/1.0, plain text on loopback).
async fn etcd_healthy(port: u16) -> Result<Option<()>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    Ok(text.contains("\"health\":\"true\"").then_some(()))
}

fn fake_node() -> Result<Node> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NODE_NAME,
            "annotations": {
                "kwok.x-k8s.io/node": "fake",
                "node.alpha.kubernetes.io/ttl": "0",
            },
            "labels": {
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": NODE_NAME,
                "kubernetes.io/os": "linux",
                "kubernetes.io/role": "agent",
                "node-role.kubernetes.io/agent": "",
                "type": "kwok",
            },
        },
        "status": {
            "allocatable": { "cpu": "32", "memory": "256Gi", "pods": "110" },
            "capacity": { "cpu": "32", "memory": "256Gi", "pods": "110" },
        },
    }))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input:?}");
        }
    }

    #[test]
    fn free_ports_are_distinct() {
        let mut ports = free_ports(5).unwrap();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 5);
    }

    #[test]
    fn kubeconfig_is_readable_by_kube() {
        let ca = Ca::generate().unwrap();
        let admin = ca
            .issue("admin", &["system:masters"], &[], Usage::Client)
            .unwrap();
        let yaml = kubeconfig_yaml("https://127.0.0.1:6443", &ca.pair.cert_pem, "admin", &admin);
        let kc = Kubeconfig::from_yaml(&yaml).unwrap();
        assert_eq!(kc.current_context.as_deref(), Some("testenv"));
        assert_eq!(
            kc.clusters[0].cluster.as_ref().unwrap().server.as_deref(),
            Some("https://127.0.0.1:6443")
        );
    }
}
