//! `meshctl ca rotate` against the real API server: two workloads (real
//! `mesh_tls::WorkloadCertificates`, certificates issued by the real control plane for the
//! service account their bound token proves, trust bundles from their real config
//! distribution streams) talk mutual TLS on loopback, a new handshake per request in both
//! directions, while the `meshctl` binary rotates the root: no handshake may fail, and at the
//! end both certificates chain to the new root and the old root is gone from both bundles
//! and from `mesh-ca-root-cert`. Also: `--dry-run` changes nothing, a user's `cacerts` is
//! refused with what to do instead, and a `cacerts` the user updates reaches proxies at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use mesh_proxy::distribution::{CertificateIssuer, ClientOptions, NodeIdentity, run_client};
use mesh_testenv::{TestEnv, eventually};
use mesh_tls::ca::{LocalCa, summarize_pem};
use mesh_tls::{SpiffeId, WorkloadCertificates};
use meshctl::controlplane::mesh_ca::{CaSource, MESH_CA_SECRET, MeshCaOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::inprocess::ControlPlane;

fn kube_ca(ns: &str) -> MeshCaOptions {
    MeshCaOptions::new(CaSource::Kubernetes {
        namespace: ns.to_string(),
    })
}

/// Fingerprints of the certificates of a PEM text, in order.
fn fingerprints(pem: &str) -> Vec<String> {
    summarize_pem(pem, "test")
        .unwrap()
        .into_iter()
        .map(|c| c.sha256)
        .collect()
}

async fn secret(env: &TestEnv, ns: &str, name: &str) -> Option<Secret> {
    Api::<Secret>::namespaced(env.client().unwrap(), ns)
        .get_opt(name)
        .await
        .unwrap()
}

fn secret_text(s: &Secret, key: &str) -> String {
    String::from_utf8(s.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

fn annotation(s: &Secret, key: &str) -> Option<String> {
    s.metadata.annotations.as_ref()?.get(key).cloned()
}

/// `meshctl <args>` (the binary), with the test environment's kubeconfig: (success, stdout,
/// stderr).
async fn meshctl(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .env_remove("KUBECONFIG")
        .env_remove("MESHCTL_CONTROL_PLANE_ADMIN")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A simulated proxy: its workload certificate (renewed by the real issuance client) and the
/// trust bundle of every snapshot its config stream receives, applied as `mesh-proxy` does
/// (`Subscriber::trust`), ACKed or NACKed.
struct Workload {
    certs: Arc<WorkloadCertificates>,
    id: SpiffeId,
    /// While false, a snapshot received waits before it is applied (a slow proxy).
    applying: tokio::sync::watch::Sender<bool>,
}

fn workload(
    cp: &ControlPlane,
    ns: &str,
    pod: &str,
    sa: &str,
    token_file: &Path,
    stop: &CancellationToken,
) -> Workload {
    let certs = WorkloadCertificates::new(Some(Duration::from_secs(3600)));
    let mut o = ClientOptions::new(
        cp.distribution.to_string(),
        cp.ca_path.clone(),
        NodeIdentity::Sidecar {
            namespace: ns.into(),
            pod: pod.into(),
            service_account: Some(sa.into()),
            ip: None,
        },
    );
    o.server_name = "127.0.0.1".into();
    o.token_file = Some(token_file.to_path_buf());
    o.identity = Some(certs.clone());
    o.min_backoff = Duration::from_millis(100);
    {
        let (certs, stop) = (certs.clone(), stop.clone());
        let issuer = Arc::new(CertificateIssuer::new(o.clone()));
        tokio::spawn(async move {
            tokio::select! {
                _ = certs.run(issuer) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
    let (tx, mut updates) = tokio::sync::mpsc::channel(1);
    tokio::spawn(run_client(o, tx, stop.clone()));
    let c = certs.clone();
    let applying = tokio::sync::watch::Sender::new(true);
    let mut gate = applying.subscribe();
    tokio::spawn(async move {
        while let Some(u) = updates.recv().await {
            if gate.wait_for(|open| *open).await.is_err() {
                return;
            }
            let applied = match &u.config.mesh_identity {
                Some(mi) => c
                    .set_trust_bundle(&mi.trust_bundle_pem, &mi.signing_root_sha256)
                    .map_err(|e| e.to_string()),
                None => Err("the snapshot has no meshIdentity".to_string()),
            };
            let _ = u.reply.send(applied);
        }
    });
    Workload {
        certs,
        applying,
        id: format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
            .parse()
            .unwrap(),
    }
}

/// Handshakes seen, by outcome (both sides count: a failure on either is a failure).
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut e = self.errors.lock().unwrap();
        if e.len() < 20 {
            e.push(what);
        }
    }
}

/// A mutual TLS echo server of `w` on 127.0.0.1: one line in, the same line back.
async fn serve(w: &Workload, tally: Arc<Tally>, stop: CancellationToken) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(w.certs.server_config());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                a = listener.accept() => a.unwrap(),
                _ = stop.cancelled() => return,
            };
            let (acceptor, tally) = (acceptor.clone(), tally.clone());
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(tls) => {
                        let mut tls = BufReader::new(tls);
                        let mut line = String::new();
                        if tls.read_line(&mut line).await.is_ok() {
                            let _ = tls.get_mut().write_all(line.as_bytes()).await;
                            let _ = tls.get_mut().shutdown().await;
                        }
                    }
                    Err(e) => tally.fail(format!("server side: {e}")),
                }
            });
        }
    });
    addr
}

/// One request from `from` to the server of `to` at `addr`, on a new connection (a new
/// handshake, both identities checked).
async fn request(from: &Workload, to: &Workload, addr: SocketAddr) -> Result<(), String> {
    let connector = tokio_rustls::TlsConnector::from(from.certs.client_config(&to.id));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from("workload.mesh").unwrap();
    let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| "handshake: no answer within 10s".to_string())?
        .map_err(|e| format!("handshake {} → {}: {e}", from.id, to.id))?;
    let mut tls = BufReader::new(tls);
    tls.get_mut()
        .write_all(b"ping\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_line(&mut line))
        .await
        .map_err(|_| "no echo within 10s".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    if line != "ping\n" {
        return Err(format!("echo {line:?}"));
    }
    Ok(())
}

/// Creates service account `sa` and pod `pod` (never run: bound to a node that does not
/// exist) in `ns`, and a token of `sa` bound to the pod, written into `dir`.
async fn bound_token(env: &TestEnv, ns: &str, sa: &str, pod: &str, dir: &Path) -> PathBuf {
    let objects = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {ns}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}}}\n\
         spec:\n  serviceAccountName: {sa}\n  nodeName: no-kubelet\n  containers: [{{name: app, image: app:1}}]\n"
    );
    let file = dir.join(format!("{pod}.yaml"));
    std::fs::write(&file, objects).unwrap();
    env.kubectl_ok(&["apply", "-f", file.to_str().unwrap()])
        .await
        .unwrap();
    let token = env
        .kubectl_ok(&[
            "-n",
            ns,
            "create",
            "token",
            sa,
            "--audience",
            "meshctl",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            pod,
        ])
        .await
        .unwrap();
    let path = dir.join(format!("{pod}.token"));
    std::fs::write(&path, token.trim()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_rotates_in_one_command_while_workloads_keep_talking() {
    let env = TestEnv::shared();
    let ca_ns = env.create_namespace("rotate-ca").await.unwrap();
    let ns = env.create_namespace("rotate-app").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_a = bound_token(env, &ns, "a", "app-a", dir.path()).await;
    let token_b = bound_token(env, &ns, "b", "app-b", dir.path()).await;

    let ca_home = ca_ns.clone();
    let cp = ControlPlane::start_with(env, vec![], None, move |c| {
        c.proxy_token_audience = Some("meshctl".into());
        c.mesh_ca = Some(kube_ca(&ca_home));
    })
    .await;
    let admin = format!("http://{}", cp.admin);
    let tls_ca = std::fs::read_to_string(&cp.ca_path).unwrap();
    let before = secret(env, &ca_ns, MESH_CA_SECRET)
        .await
        .expect("the control plane made mesh-ca-secret");
    let old_root = fingerprints(&secret_text(&before, "root-cert.pem"));
    assert_eq!(old_root.len(), 1);
    let old_root = old_root[0].clone();

    let stop = CancellationToken::new();
    let a = Arc::new(workload(&cp, &ns, "app-a", "a", &token_a, &stop));
    let b = Arc::new(workload(&cp, &ns, "app-b", "b", &token_b, &stop));
    // Both have a certificate from the old root and trust it, and the control plane knows.
    eventually(
        Duration::from_secs(60),
        "both workloads with a certificate, reported to the control plane",
        || async {
            let (_, body) = cp.get("/debug/proxies").await.unwrap_or_default();
            let reported = body
                .matches(&format!("\"rootSha256\":\"{old_root}\""))
                .count();
            Ok((a.certs.is_ready() && b.certs.is_ready() && reported == 2).then_some(()))
        },
    )
    .await
    .unwrap();

    // Requests both ways, a handshake each, until told to stop.
    let tally = Arc::new(Tally::default());
    let addr_a = serve(&a, tally.clone(), stop.clone()).await;
    let addr_b = serve(&b, tally.clone(), stop.clone()).await;
    let talking = CancellationToken::new();
    let mut loops = Vec::new();
    for (from, to, addr) in [
        (a.clone(), b.clone(), addr_b),
        (b.clone(), a.clone(), addr_a),
    ] {
        let (tally, talking) = (tally.clone(), talking.clone());
        loops.push(tokio::spawn(async move {
            while !talking.is_cancelled() {
                match request(&from, &to, addr).await {
                    Ok(()) => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tally.fail(e),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }

    // --dry-run: the current root and the two proxies to re-issue; nothing changes.
    let (ok, out, err) = meshctl(
        env,
        &[
            "ca",
            "rotate",
            "--dry-run",
            "-n",
            &ca_ns,
            "--control-plane-admin",
            &admin,
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains(&format!("signing root {old_root}")), "{out}");
    assert!(out.contains("proxies that would be re-issued (2)"), "{out}");
    for p in [format!("sidecar {ns}/app-a"), format!("sidecar {ns}/app-b")] {
        assert!(out.contains(&p), "{p} in {out}");
    }
    assert!(out.contains("nothing was changed"), "{out}");
    let after_dry_run = secret(env, &ca_ns, MESH_CA_SECRET).await.unwrap();
    assert_eq!(
        after_dry_run.metadata.resource_version, before.metadata.resource_version,
        "--dry-run changed mesh-ca-secret"
    );

    // The rotation, in one command. A slow proxy holds it in the add phase: the command
    // gives up at its timeout saying who, and the rotation stays in the Secret.
    b.applying.send_replace(false);
    let rotate = |timeout: &'static str| {
        let (ca_ns, admin) = (ca_ns.clone(), admin.clone());
        async move {
            meshctl(
                env,
                &[
                    "ca",
                    "rotate",
                    "-n",
                    &ca_ns,
                    "--control-plane-admin",
                    &admin,
                    "--timeout",
                    timeout,
                ],
            )
            .await
        }
    };
    let (ok, out, err) = rotate("10s").await;
    assert!(!ok, "{out}{err}");
    assert!(out.contains("rotation requested"), "{out}");
    assert!(
        out.contains("phase add: waiting for every proxy to trust both roots"),
        "{out}"
    );
    assert!(
        err.contains("timed out after 10s in phase add")
            && err.contains(&format!("not there yet: sidecar {ns}/app-b"))
            && err.contains("run `meshctl ca rotate` again"),
        "{err}"
    );
    let held = secret(env, &ca_ns, MESH_CA_SECRET).await.unwrap();
    assert_eq!(
        annotation(&held, "ca.meshctl.io/rotation-phase").as_deref(),
        Some("add")
    );
    assert_eq!(fingerprints(&secret_text(&held, "root-cert.pem")).len(), 2);
    assert_eq!(
        fingerprints(&secret_text(&held, "ca-cert.pem")),
        std::slice::from_ref(&old_root)
    );

    // The proxy catches up; running the command again follows the same rotation to the end.
    b.applying.send_replace(true);
    let (ok, out, err) = rotate("120s").await;
    eprintln!("meshctl ca rotate, again:\n{out}");
    assert!(ok, "meshctl ca rotate failed:\n{out}{err}");
    assert!(out.contains("under way (phase add"), "{out}");
    assert!(out.contains("rotation done"), "{out}");
    assert!(!out.contains("rotation requested"), "{out}");

    // A little more talk on the new root, then the count.
    let ok_at_end = tally.ok.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(20),
        "requests after the rotation",
        || async { Ok((tally.ok.load(Ordering::Relaxed) >= ok_at_end + 10).then_some(())) },
    )
    .await
    .unwrap();
    talking.cancel();
    for l in loops {
        l.await.unwrap();
    }
    let (ok_count, failed) = (
        tally.ok.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    assert_eq!(
        failed,
        0,
        "handshakes failed during the rotation ({ok_count} succeeded): {:?}",
        tally.errors.lock().unwrap()
    );
    assert!(ok_count >= 20, "only {ok_count} requests");
    eprintln!("{ok_count} mutual TLS requests during the rotation, none failed");

    // The Secret: done, the new root signs and is the only root, Istio's keys as they were.
    let after = secret(env, &ca_ns, MESH_CA_SECRET).await.unwrap();
    assert_eq!(
        annotation(&after, "ca.meshctl.io/rotation-phase").as_deref(),
        Some("done")
    );
    let new_root = annotation(&after, "ca.meshctl.io/rotation-new-root").unwrap();
    assert_ne!(new_root, old_root);
    assert_eq!(
        fingerprints(&secret_text(&after, "root-cert.pem")),
        std::slice::from_ref(&new_root)
    );
    assert_eq!(
        fingerprints(&secret_text(&after, "ca-cert.pem")),
        std::slice::from_ref(&new_root)
    );
    assert!(!after.data.as_ref().unwrap().contains_key("next-ca-key.pem"));

    // Both workloads: a certificate from the new root, and only the new root trusted.
    for w in [&a, &b] {
        let info = w.certs.info().unwrap();
        assert_eq!(info.root_sha256, new_root, "{}", w.id);
        assert_eq!(
            info.trust_bundle_sha256,
            std::slice::from_ref(&new_root),
            "{}",
            w.id
        );
    }

    // mesh-ca-root-cert: the control plane's CA, then the new root only.
    let cms = Api::<ConfigMap>::namespaced(env.client().unwrap(), &ns);
    let expected = format!("{tls_ca}{}", secret_text(&after, "root-cert.pem"));
    eventually(
        Duration::from_secs(60),
        "mesh-ca-root-cert with the new root only",
        || {
            let (cms, expected) = (cms.clone(), expected.clone());
            async move {
                let text = cms
                    .get_opt("mesh-ca-root-cert")
                    .await?
                    .and_then(|c| c.data)
                    .and_then(|d| d.get("root-cert.pem").cloned());
                Ok(text.filter(|t| *t == expected))
            }
        },
    )
    .await
    .unwrap();
    let published =
        cms.get("mesh-ca-root-cert").await.unwrap().data.unwrap()["root-cert.pem"].clone();
    assert!(!fingerprints(&published).contains(&old_root));

    // `ca status` says so.
    let (ok, out, err) = meshctl(
        env,
        &[
            "ca",
            "status",
            "-n",
            &ca_ns,
            "--control-plane-admin",
            &admin,
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains(&format!("signing root {new_root}")), "{out}");
    assert!(!out.contains(&format!("root {old_root}")), "{out}");
    assert!(out.contains(&format!("  {new_root}: 2")), "{out}");
    assert!(out.contains("rotation: phase done"), "{out}");
    stop.cancel();
}

/// A user's CA in Istio's plug-in layout: a self-signed root that signs.
fn plugin_secret(ns: &str, roots_pem: &str, ca: &LocalCa) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some("cacerts".into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            (
                "ca-cert.pem".into(),
                ByteString(ca.cert_pem().as_bytes().to_vec()),
            ),
            ("ca-key.pem".into(), ByteString(ca.key_pem().into_bytes())),
            (
                "root-cert.pem".into(),
                ByteString(roots_pem.as_bytes().to_vec()),
            ),
        ])),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_cacerts_is_not_rotated_by_meshctl_and_its_updates_reach_proxies() {
    let env = TestEnv::shared();
    let ca_ns = env.create_namespace("rotate-plugin").await.unwrap();
    let client = env.client().unwrap();
    let secrets = Api::<Secret>::namespaced(client.clone(), &ca_ns);
    let first = LocalCa::generate("Example Root 1", None, None).unwrap();
    let second = LocalCa::generate("Example Root 2", None, None).unwrap();
    secrets
        .create(
            &PostParams::default(),
            &plugin_secret(&ca_ns, first.cert_pem(), &first),
        )
        .await
        .unwrap();

    // Refused, saying how the user rotates their own CA; nothing written.
    let (ok, out, err) = meshctl(env, &["ca", "rotate", "-n", &ca_ns]).await;
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains(&format!("Secret {ca_ns}/cacerts")) && err.contains("by updating cacerts"),
        "{err}"
    );
    assert!(secret(env, &ca_ns, MESH_CA_SECRET).await.is_none());
    let (ok, out, err) = meshctl(env, &["ca", "rotate", "--dry-run", "-n", &ca_ns]).await;
    assert!(!ok && err.contains("by updating cacerts"), "{out}{err}");

    // The control plane uses it; the user adds a second root (the first step of their own
    // rotation): every proxy's next snapshot carries both, without any other change.
    let ca_home = ca_ns.clone();
    let cp = ControlPlane::start_with(env, vec![], None, move |c| {
        c.mesh_ca = Some(kube_ca(&ca_home));
    })
    .await;
    let ns = env.create_namespace("rotate-plugin-app").await.unwrap();
    let mut o = ClientOptions::new(
        cp.distribution.to_string(),
        cp.ca_path.clone(),
        NodeIdentity::Sidecar {
            namespace: ns.clone(),
            pod: "app-0".into(),
            service_account: None,
            ip: None,
        },
    );
    o.server_name = "127.0.0.1".into();
    o.min_backoff = Duration::from_millis(100);
    let stop = CancellationToken::new();
    let (tx, mut updates) = tokio::sync::mpsc::channel(1);
    tokio::spawn(run_client(o, tx, stop.clone()));
    // The fingerprints of the trust bundle of every snapshot received.
    let bundles: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let seen = bundles.clone();
    tokio::spawn(async move {
        while let Some(u) = updates.recv().await {
            let fps = u
                .config
                .mesh_identity
                .as_ref()
                .map(|m| fingerprints(&m.trust_bundle_pem))
                .unwrap_or_default();
            seen.lock().unwrap().push(fps);
            let _ = u.reply.send(Ok(()));
        }
    });
    let fp1 = mesh_tls::ca::sha256_hex(first.cert_der());
    let fp2 = mesh_tls::ca::sha256_hex(second.cert_der());
    eventually(
        Duration::from_secs(30),
        "a snapshot with the user's root",
        || async {
            Ok(bundles
                .lock()
                .unwrap()
                .last()
                .filter(|b| **b == [fp1.clone()])
                .map(|_| ()))
        },
    )
    .await
    .unwrap();
    let both = format!("{}{}", first.cert_pem(), second.cert_pem());
    secrets
        .patch(
            "cacerts",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"data": {
                "root-cert.pem": ByteString(both.into_bytes()),
            }})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "a snapshot with both roots",
        || async {
            Ok(bundles
                .lock()
                .unwrap()
                .last()
                .filter(|b| **b == [fp1.clone(), fp2.clone()])
                .map(|_| ()))
        },
    )
    .await
    .unwrap();

    // `ca status` reads the user's CA and its two roots.
    let (ok, out, err) = meshctl(
        env,
        &[
            "ca",
            "status",
            "-n",
            &ca_ns,
            "--control-plane-admin",
            &format!("http://{}", cp.admin),
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("Secret {ca_ns}/cacerts (your own CA")),
        "{out}"
    );
    assert!(out.contains(&format!("signing root {fp1}")), "{out}");
    assert!(out.contains(&format!("root {fp2}")), "{out}");
    stop.cancel();
}
