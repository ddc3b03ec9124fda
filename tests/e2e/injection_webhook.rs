//! The sidecar-injection webhook end to end on the real API server: the same server
//! `meshctl control-plane` runs (`meshctl::webhook`, serving certificate loaded by
//! `CertStore` from files, default `InjectionConfig`, namespace labels from the watch-backed
//! `KubeNamespaces` cache) is registered by a URL-mode MutatingWebhookConfiguration whose
//! `caBundle` is the environment's CA; namespaces are labelled with the real kubectl; the
//! walkthrough's `deployment.yaml` is applied with kubectl and the pods the ReplicaSet controller
//! creates carry the sidecar and reach Running under kwok.
//!
//! Every webhook configuration here is cluster-scoped but only selects namespaces carrying
//! [`SCOPE_LABEL`] with a value unique to the test, so the other tests of this binary
//! (running in parallel in the same environment) never reach it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use mesh_testenv::{TestEnv, eventually};
use meshctl::inject::InjectionConfig;
use meshctl::inject::decision::INJECT_KEY;
use meshctl::inject::template::{INIT_NAME, PROXY_NAME, TLS_MODE_LABEL};
use meshctl::inject::{STATUS_ANNOTATION, Status};
use meshctl::webhook::namespaces::KubeNamespaces;
use meshctl::webhook::tls::CertStore;
use meshctl::webhook::{self, AppState, Limits, NamespaceLookup};

const DEPLOYMENT_YAML: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/seed-walkthrough/deployment.yaml"
);

/// Namespace label that scopes a test's webhook configuration to that test's namespaces.
const SCOPE_LABEL: &str = "e2e.meshctl.io/injection-test";

/// The webhooks of one configuration (see [`hook_config`]).
const MESH_LABEL_HOOK: &str = "mesh-label.sidecar-injector.meshctl.io";
const ISTIO_LABEL_HOOK: &str = "istio-label.sidecar-injector.meshctl.io";

/// The walkthrough's Deployments and the pods the ReplicaSet controller makes for them.
const WALKTHROUGH_APPS: [&str; 3] = ["myapp-v1", "myapp-v2", "otherapp"];

// ---------------------------------------------------------------------------------------
// The webhook server, in process.

/// The injection webhook as `meshctl control-plane` runs it, on a runtime of its own so that
/// stopping it (dropping the runtime) also closes the API server's keep-alive connections,
/// as the exit of the real process would.
struct Webhook {
    port: u16,
    state: Arc<AppState>,
    rt: Option<tokio::runtime::Runtime>,
    _certs: tempfile::TempDir,
    /// No installed (cluster-wide) injection webhook while this one's namespaces are labelled.
    _exclusive: tokio::sync::RwLockReadGuard<'static, ()>,
}

impl Webhook {
    async fn start(env: &'static TestEnv) -> Webhook {
        let exclusive = crate::MESH_INSTALL.read().await;
        // The serving certificate as files, loaded (and polled for changes) by CertStore,
        // as `--tls-cert` / `--tls-key` are.
        let certs_dir = tempfile::tempdir().unwrap();
        let pair = env.issue_cert(&["127.0.0.1"]).unwrap();
        let cert_path = certs_dir.path().join("tls.crt");
        let key_path = certs_dir.path().join("tls.key");
        std::fs::write(&cert_path, &pair.cert_pem).unwrap();
        std::fs::write(&key_path, &pair.key_pem).unwrap();
        let certs = CertStore::load(&cert_path, &key_path).unwrap();

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("injection-webhook")
            .enable_all()
            .build()
            .unwrap();
        // The namespace cache the control plane uses with `--kubeconfig` / in cluster: a
        // watch on Namespaces through a client made in (and bound to) the webhook's runtime.
        let namespaces: Arc<KubeNamespaces> = rt
            .spawn(async move { KubeNamespaces::start(env.client().unwrap()) })
            .await
            .unwrap();
        let lookup: Arc<dyn NamespaceLookup> = namespaces.clone();
        let state = AppState::new(InjectionConfig::default(), lookup, Limits::default());

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        {
            let (state, certs) = (state.clone(), certs.clone());
            rt.spawn(async move {
                webhook::spawn_reloaders(
                    state.clone(),
                    certs.clone(),
                    None,
                    Duration::from_secs(2),
                );
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                webhook::serve(listener, certs, state, std::future::pending()).await
            });
        }
        // `GET /ready` answers 200 exactly when this holds.
        eventually(
            Duration::from_secs(30),
            "the namespace cache to sync",
            || {
                let ready = state.namespaces.ready();
                async move { Ok(ready.then_some(())) }
            },
        )
        .await
        .unwrap();
        Webhook {
            port,
            state,
            rt: Some(rt),
            _certs: certs_dir,
            _exclusive: exclusive,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/inject", self.port)
    }

    /// Waits until the webhook's namespace cache shows `label` on `ns` (the watch lags the
    /// `kubectl label` by a moment).
    async fn wait_for_label(&self, ns: &str, label: &str) {
        let (key, value) = label.split_once('=').unwrap();
        eventually(
            Duration::from_secs(30),
            &format!("the webhook's namespace cache to show {ns} {label}"),
            || {
                let seen = self
                    .state
                    .namespaces
                    .labels(ns)
                    .is_some_and(|l| l.get(key).map(String::as_str) == Some(value));
                async move { Ok(seen.then_some(())) }
            },
        )
        .await
        .unwrap();
    }

    /// Counter `meshctl_injection_reviews_total{outcome=...}` and the review-duration
    /// histogram's sum and count, from `/metrics`' text.
    fn metric(&self, name: &str) -> f64 {
        let text = self.state.metrics.encode();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Stops the server: every task of its runtime (listener, open connections, the
    /// namespace watch) is dropped.
    fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------
// The webhook configuration.

/// The MutatingWebhookConfiguration the installer would render for a URL-mode control plane,
/// scoped to namespaces labelled `SCOPE_LABEL=scope`.
///
/// docs/injection.md row 4: the namespace label `mesh-injection`, *else* `istio-injection`,
/// being `disabled` skips. A single selector ANDs its expressions, so "mesh-injection NotIn
/// [disabled], istio-injection NotIn [disabled]" would also drop a namespace labelled
/// `mesh-injection=enabled, istio-injection=disabled`, which the decision injects. Two
/// webhooks with disjoint namespace selectors express the "else" exactly:
/// - `mesh-label`: `mesh-injection` set and not `disabled`;
/// - `istio-label`: no `mesh-injection`, `istio-injection` not `disabled` (this includes
///   unlabelled namespaces, where a pod can still opt in and `defaultPolicy` decides).
///
/// Both skip the mesh's own namespace and the skipped system namespaces (row 1: the
/// control plane's pods must never wait for the control plane), and pods labelled
/// `sidecar.meshctl.io/inject=false` (row 5: that label wins over everything that could
/// inject; `sidecar.istio.io/inject=false` does not, as the meshctl label may say true).
/// The selectors only keep away requests the webhook would certainly skip; the webhook
/// itself still decides (e.g. `Disabled` in capitals, or `off`).
fn hook_config(
    name: &str,
    scope: &str,
    url: &str,
    ca_pem: &str,
    failure_policy: &str,
) -> MutatingWebhookConfiguration {
    let cfg = InjectionConfig::default();
    let mut skip: Vec<String> = cfg.skip_namespaces.clone();
    skip.push(cfg.mesh_namespace.clone());
    let common = |namespace_exprs: serde_json::Value| {
        let mut exprs = vec![
            serde_json::json!({"key": SCOPE_LABEL, "operator": "In", "values": [scope]}),
            serde_json::json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": skip}),
        ];
        exprs.extend(namespace_exprs.as_array().unwrap().iter().cloned());
        serde_json::json!({
            "clientConfig": { "url": url },
            "rules": [{
                "apiGroups": [""], "apiVersions": ["v1"],
                "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced",
            }],
            "namespaceSelector": { "matchExpressions": exprs },
            "objectSelector": { "matchExpressions": [
                { "key": INJECT_KEY, "operator": "NotIn", "values": ["false"] },
            ]},
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": failure_policy,
            "reinvocationPolicy": "Never",
            "timeoutSeconds": 10,
        })
    };
    let mut mesh = common(serde_json::json!([
        {"key": "mesh-injection", "operator": "Exists"},
        {"key": "mesh-injection", "operator": "NotIn", "values": ["disabled"]},
    ]));
    mesh["name"] = MESH_LABEL_HOOK.into();
    let mut istio = common(serde_json::json!([
        {"key": "mesh-injection", "operator": "DoesNotExist"},
        {"key": "istio-injection", "operator": "NotIn", "values": ["disabled"]},
    ]));
    istio["name"] = ISTIO_LABEL_HOOK.into();
    let mut hook: MutatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": name, "labels": { "app.kubernetes.io/managed-by": "meshctl-e2e" } },
        "webhooks": [mesh, istio],
    }))
    .unwrap();
    for w in hook.webhooks.iter_mut().flatten() {
        w.client_config.ca_bundle = Some(ByteString(ca_pem.as_bytes().to_vec()));
    }
    hook
}

/// A registered webhook configuration, deleted when dropped (also when the test panics).
struct Registered {
    name: String,
    kubectl: PathBuf,
    kubeconfig: PathBuf,
}

impl Registered {
    async fn create(env: &TestEnv, hook: &MutatingWebhookConfiguration) -> Registered {
        let hooks: Api<MutatingWebhookConfiguration> = Api::all(env.client().unwrap());
        hooks.create(&PostParams::default(), hook).await.unwrap();
        Registered {
            name: hook.metadata.name.clone().unwrap(),
            kubectl: env.kubectl_path(),
            kubeconfig: env.kubeconfig().to_owned(),
        }
    }

    /// Deletes it now, checking that it is gone.
    async fn delete(self, env: &TestEnv) {
        let hooks: Api<MutatingWebhookConfiguration> = Api::all(env.client().unwrap());
        hooks
            .delete(&self.name, &DeleteParams::default())
            .await
            .unwrap();
        assert!(hooks.get_opt(&self.name).await.unwrap().is_none());
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .env_remove("KUBECONFIG")
            .args([
                "delete",
                "mutatingwebhookconfiguration",
                &self.name,
                "--ignore-not-found",
            ])
            .output();
    }
}

// ---------------------------------------------------------------------------------------
// Helpers.

/// A namespace labelled, with the real kubectl, for this test's webhook scope and `labels`.
async fn namespace(env: &TestEnv, prefix: &str, scope: &str, labels: &[&str]) -> String {
    let ns = env.create_namespace(prefix).await.unwrap();
    let scope_label = format!("{SCOPE_LABEL}={scope}");
    let mut args = vec!["label", "ns", ns.as_str(), scope_label.as_str()];
    args.extend_from_slice(labels);
    let out = env.kubectl_ok(&args).await.unwrap();
    assert_eq!(out.trim(), format!("namespace/{ns} labeled"));
    ns
}

/// A pod like the walkthrough's myapp pod.
fn app_pod(name: &str, labels: &[(&str, &str)]) -> Pod {
    let labels: BTreeMap<_, _> = labels.iter().copied().collect();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": labels },
        "spec": { "containers": [{
            "name": "myapp",
            "image": "rlawnsdud/demo",
            "env": [{ "name": "PORT", "value": "5678" }],
            "ports": [{ "containerPort": 5678 }],
        }]},
    }))
    .unwrap()
}

fn names<'a>(
    containers: impl IntoIterator<Item = &'a k8s_openapi::api::core::v1::Container>,
) -> Vec<&'a str> {
    containers.into_iter().map(|c| c.name.as_str()).collect()
}

fn is_meshed(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref().unwrap();
    let all = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers);
    let has_container = all
        .into_iter()
        .any(|c| c.name == INIT_NAME || c.name == PROXY_NAME);
    let has_status = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(STATUS_ANNOTATION));
    has_container || has_status
}

/// Native-mode injection as docs/injection.md describes it, on a pod the API server stored.
fn assert_injected(pod: &Pod, app: &str) {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let spec = pod.spec.as_ref().unwrap();
    let inits = spec.init_containers.as_deref().unwrap_or_default();
    assert_eq!(
        names(inits),
        [INIT_NAME, PROXY_NAME],
        "{name}: init containers"
    );
    assert_eq!(
        names(&spec.containers),
        [app],
        "{name}: the app is the only container"
    );
    let proxy = &inits[1];
    assert_eq!(
        proxy.restart_policy.as_deref(),
        Some("Always"),
        "{name}: native sidecar"
    );
    assert!(
        proxy.startup_probe.is_some(),
        "{name}: native sidecar startup probe"
    );
    assert_eq!(
        proxy.image.as_deref(),
        Some(concat!(
            "ghcr.io/meshctl/mesh-proxy:",
            env!("CARGO_PKG_VERSION")
        )),
        "{name}"
    );
    assert_eq!(proxy.args.as_ref().unwrap()[0], "sidecar", "{name}");
    let init = &inits[0];
    assert_eq!(init.args.as_ref().unwrap()[0], "redirect", "{name}");
    let caps = init
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    assert_eq!(
        caps,
        ["NET_ADMIN", "NET_RAW"],
        "{name}: mesh-init capabilities"
    );

    let annotations = pod.metadata.annotations.as_ref().unwrap();
    let status: Status = serde_json::from_str(&annotations[STATUS_ANNOTATION]).unwrap();
    assert_eq!(
        status.init_containers,
        [INIT_NAME, PROXY_NAME],
        "{name}: {status:?}"
    );
    assert_eq!(
        status.volumes,
        ["mesh-token", "mesh-ca-root", "mesh-data"],
        "{name}: {status:?}"
    );
    assert_eq!(
        annotations
            .get("kubectl.kubernetes.io/default-container")
            .map(String::as_str),
        Some(app),
        "{name}"
    );
    let labels = pod.metadata.labels.as_ref().unwrap();
    assert_eq!(
        labels.get(TLS_MODE_LABEL).map(String::as_str),
        Some("mesh"),
        "{name}"
    );
    let volumes: Vec<_> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    for v in ["mesh-token", "mesh-ca-root", "mesh-data"] {
        assert!(volumes.contains(&v), "{name}: volume {v} in {volumes:?}");
    }
}

/// Running under kwok, with an IP; for a meshed pod also the sidecar started and
/// `mesh-init` completed.
fn assert_running(pod: &Pod) {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let status = pod.status.as_ref().unwrap();
    assert_eq!(
        status.phase.as_deref(),
        Some("Running"),
        "{name}: {status:?}"
    );
    assert!(status.pod_ip.is_some(), "{name}: a pod IP");
    for s in status.init_container_statuses.iter().flatten() {
        let state = s.state.as_ref().unwrap();
        match s.name.as_str() {
            PROXY_NAME => assert!(
                s.started == Some(true) && state.running.is_some(),
                "{name}: {s:?}"
            ),
            INIT_NAME => assert_eq!(
                state.terminated.as_ref().map(|t| t.exit_code),
                Some(0),
                "{name}: {s:?}"
            ),
            _ => {}
        }
    }
}

/// Waits until each walkthrough Deployment has exactly one pod, Running.
async fn walkthrough_pods_running(pods: &Api<Pod>) -> Vec<Pod> {
    let mut out = Vec::new();
    for app in WALKTHROUGH_APPS {
        let selector = if app == "otherapp" {
            "app=otherapp".to_owned()
        } else {
            format!("app=myapp,version={}", &app[6..])
        };
        let pod = eventually(
            Duration::from_secs(120),
            &format!("the pod of {app} to be Running"),
            || async {
                let list = pods.list(&ListParams::default().labels(&selector)).await?;
                Ok(match list.items.as_slice() {
                    [pod]
                        if pod.status.as_ref().and_then(|s| s.phase.as_deref())
                            == Some("Running") =>
                    {
                        Some(pod.clone())
                    }
                    _ => None,
                })
            },
        )
        .await
        .unwrap();
        out.push(pod);
    }
    out
}

/// Waits until the API server calls the webhook for pods of `ns` (it picks up new and
/// changed webhook configurations within a moment): a server-side dry-run create, which
/// runs the mutating webhooks (they declare `sideEffects: None`) and stores nothing.
async fn wait_until_injecting(pods: &Api<Pod>) {
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    eventually(
        Duration::from_secs(30),
        "the API server to call the injection webhook",
        || async {
            let pod = pods.create(&dry_run, &app_pod("probe", &[])).await?;
            Ok(is_meshed(&pod).then_some(()))
        },
    )
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn walkthrough_pods_get_the_sidecar_in_labelled_namespaces_only() {
    let env = TestEnv::shared();
    let client = env.client().unwrap();
    let hook = Webhook::start(env).await;

    let scope = env.create_namespace("injwh-scope").await.unwrap(); // just a unique name
    let mesh_ns = namespace(env, "injwh-mesh", &scope, &[]).await;
    let istio_ns = namespace(env, "injwh-istio", &scope, &[]).await;
    let plain_ns = namespace(env, "injwh-plain", &scope, &[]).await;
    // The walkthrough's step: label the namespace with the real kubectl.
    env.kubectl_ok(&["label", "ns", &mesh_ns, "mesh-injection=enabled"])
        .await
        .unwrap();
    env.kubectl_ok(&["label", "ns", &istio_ns, "istio-injection=enabled"])
        .await
        .unwrap();
    hook.wait_for_label(&mesh_ns, "mesh-injection=enabled")
        .await;
    hook.wait_for_label(&istio_ns, "istio-injection=enabled")
        .await;

    let name = format!("meshctl-sidecar-injector-{scope}");
    let registered = Registered::create(
        env,
        &hook_config(&name, &scope, &hook.url(), env.ca_pem(), "Fail"),
    )
    .await;
    wait_until_injecting(&Api::namespaced(client.clone(), &mesh_ns)).await;

    for ns in [&mesh_ns, &istio_ns, &plain_ns] {
        let out = env
            .kubectl_ok(&["apply", "-n", ns, "-f", DEPLOYMENT_YAML])
            .await
            .unwrap();
        assert!(out.contains("deployment.apps/myapp-v1 created"), "{out}");
    }

    for ns in [&mesh_ns, &istio_ns] {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        for pod in walkthrough_pods_running(&pods).await {
            let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                owner.kind, "ReplicaSet",
                "made by the ReplicaSet controller"
            );
            let app = &pod.spec.as_ref().unwrap().containers[0].name;
            assert_injected(&pod, app);
            assert_running(&pod);
        }
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &plain_ns);
    for pod in walkthrough_pods_running(&pods).await {
        assert!(!is_meshed(&pod), "unlabelled namespace: {pod:?}");
        assert!(pod.spec.as_ref().unwrap().init_containers.is_none());
        assert_running(&pod);
    }
    // The unlabelled namespace's pods were reviewed and skipped (the istio-label webhook
    // covers unlabelled namespaces), not kept away by the selectors.
    assert!(hook.metric("meshctl_injection_reviews_total{outcome=\"injected\"}") >= 6.0);
    assert!(hook.metric("meshctl_injection_reviews_total{outcome=\"skipped\"}") >= 3.0);

    registered.delete(env).await;
}

#[tokio::test]
async fn a_stopped_webhook_refuses_pods_with_fail_and_lets_them_through_with_ignore() {
    let env = TestEnv::shared();
    let client = env.client().unwrap();
    let mut hook = Webhook::start(env).await;

    let scope = env.create_namespace("injwh-scope").await.unwrap();
    let on = namespace(env, "injwh-on", &scope, &["mesh-injection=enabled"]).await;
    let mixed = namespace(
        env,
        "injwh-mixed",
        &scope,
        &["mesh-injection=enabled", "istio-injection=disabled"],
    )
    .await;
    let off = namespace(env, "injwh-off", &scope, &["mesh-injection=disabled"]).await;
    let istio_off = namespace(env, "injwh-istiooff", &scope, &["istio-injection=disabled"]).await;
    hook.wait_for_label(&on, "mesh-injection=enabled").await;

    let name = format!("meshctl-sidecar-injector-{scope}");
    let registered = Registered::create(
        env,
        &hook_config(&name, &scope, &hook.url(), env.ca_pem(), "Fail"),
    )
    .await;
    let on_pods: Api<Pod> = Api::namespaced(client.clone(), &on);
    wait_until_injecting(&on_pods).await;

    hook.stop();

    // failurePolicy: Fail — the API server refuses the pod, naming the webhook and why.
    let err = on_pods
        .create(&PostParams::default(), &app_pod("refused", &[]))
        .await
        .expect_err("failurePolicy: Fail with the webhook down");
    let msg = err.to_string();
    eprintln!("webhook down, failurePolicy Fail: {msg}");
    assert!(
        msg.contains(&format!("failed calling webhook \"{MESH_LABEL_HOOK}\""))
            && msg.contains(&hook.url())
            // A fresh dial is refused; a keep-alive connection the API server still held
            // to the stopped server fails as a broken pipe, reset or EOF instead.
            && ["connection refused", "broken pipe", "connection reset", "EOF"]
                .iter()
                .any(|why| msg.contains(why)),
        "{msg}"
    );
    // The same through kubectl, as a user sees it.
    let out = env
        .kubectl()
        .args([
            "run",
            "-n",
            &on,
            "refused-too",
            "--image=rlawnsdud/demo",
            "--restart=Never",
        ])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "kubectl run succeeded: {stderr}");
    assert!(
        stderr.contains("Error from server (InternalError)")
            && stderr.contains(&format!("failed calling webhook \"{MESH_LABEL_HOOK}\"")),
        "{stderr}"
    );
    // mesh-injection wins over istio-injection=disabled, so that namespace is the webhook's
    // too, and refused.
    let err = Api::<Pod>::namespaced(client.clone(), &mixed)
        .create(&PostParams::default(), &app_pod("refused", &[]))
        .await
        .expect_err("mesh-injection=enabled, istio-injection=disabled goes to the webhook");
    assert!(err.to_string().contains(MESH_LABEL_HOOK), "{err}");
    // What the webhook would certainly skip never reaches it, so it is not blocked either.
    for ns in [&off, &istio_off] {
        let pod = Api::<Pod>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &app_pod("let-through", &[]))
            .await
            .unwrap_or_else(|e| panic!("{ns}: {e}"));
        assert!(!is_meshed(&pod));
    }
    let pod = on_pods
        .create(
            &PostParams::default(),
            &app_pod("opted-out", &[(INJECT_KEY, "false")]),
        )
        .await
        .unwrap();
    assert!(!is_meshed(&pod));

    // The ReplicaSet controller cannot create the walkthrough's pods, and says why.
    env.kubectl_ok(&["apply", "-n", &on, "-f", DEPLOYMENT_YAML])
        .await
        .unwrap();
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), &on);
    let condition = eventually(
        Duration::from_secs(60),
        "the ReplicaSet of myapp-v1 to report ReplicaFailure",
        || async {
            let list = replica_sets
                .list(&ListParams::default().labels("app=myapp,version=v1"))
                .await?;
            Ok(list.items.iter().find_map(|rs| {
                rs.status
                    .as_ref()?
                    .conditions
                    .as_ref()?
                    .iter()
                    .find(|c| c.type_ == "ReplicaFailure" && c.status == "True")
                    .and_then(|c| c.message.clone())
            }))
        },
    )
    .await
    .unwrap();
    assert!(
        condition.contains(&format!("failed calling webhook \"{MESH_LABEL_HOOK}\"")),
        "{condition}"
    );

    // failurePolicy: Ignore — the pod goes through, un-meshed.
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let patch = serde_json::json!([
        { "op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Ignore" },
        { "op": "replace", "path": "/webhooks/1/failurePolicy", "value": "Ignore" },
    ]);
    hooks
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Json::<()>(serde_json::from_value(patch).unwrap()),
        )
        .await
        .unwrap();
    let pod = eventually(
        Duration::from_secs(30),
        "the API server to apply failurePolicy: Ignore",
        || async {
            match on_pods
                .create(&PostParams::default(), &app_pod("ignored", &[]))
                .await
            {
                Ok(pod) => Ok(Some(pod)),
                Err(kube::Error::Api(e)) if e.message.contains("failed calling webhook") => {
                    Ok(None)
                }
                Err(e) => Err(e.into()),
            }
        },
    )
    .await
    .unwrap();
    assert!(!is_meshed(&pod), "{pod:?}");
    let pod = eventually(Duration::from_secs(60), "pod ignored to run", || async {
        let pod = on_pods.get("ignored").await?;
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        Ok(running.then_some(pod))
    })
    .await
    .unwrap();
    assert!(!is_meshed(&pod));
    assert_running(&pod);
    // And the ReplicaSet controller's retry now creates the walkthrough's pods, un-meshed.
    for pod in walkthrough_pods_running(&on_pods).await {
        assert!(!is_meshed(&pod), "{pod:?}");
    }

    registered.delete(env).await;
}

/// Pod create round trips as the API server's client sees them, with and without the
/// webhook in the path. Printed; run with `--nocapture` to see them.
#[tokio::test]
async fn pod_create_latency_with_and_without_the_webhook() {
    const N: usize = 30;
    let env = TestEnv::shared();
    let client = env.client().unwrap();
    let hook = Webhook::start(env).await;

    let scope = env.create_namespace("injwh-scope").await.unwrap();
    // Not in scope: the webhook configuration does not select it.
    let bare = env.create_namespace("injwh-bare").await.unwrap();
    // In scope, unlabelled: the webhook is called and answers "skip".
    let skipped = namespace(env, "injwh-skip", &scope, &[]).await;
    // In scope, labelled: the webhook is called and returns the patch.
    let meshed = namespace(env, "injwh-lat", &scope, &["mesh-injection=enabled"]).await;
    hook.wait_for_label(&meshed, "mesh-injection=enabled").await;

    let name = format!("meshctl-sidecar-injector-{scope}");
    let registered = Registered::create(
        env,
        &hook_config(&name, &scope, &hook.url(), env.ca_pem(), "Fail"),
    )
    .await;
    wait_until_injecting(&Api::namespaced(client.clone(), &meshed)).await;

    let cases = [
        ("no webhook", &bare),
        ("webhook, skip", &skipped),
        ("webhook, inject", &meshed),
    ];
    let apis: Vec<Api<Pod>> = cases
        .iter()
        .map(|(_, ns)| Api::namespaced(client.clone(), ns))
        .collect();
    let mut samples = vec![Vec::with_capacity(N); cases.len()];
    // Two warm-up rounds (connections, caches), then N measured, interleaved so that
    // background load on the machine hits all three alike.
    for i in 0..N + 2 {
        for (c, api) in apis.iter().enumerate() {
            let start = Instant::now();
            let pod = api
                .create(&PostParams::default(), &app_pod(&format!("lat-{i}"), &[]))
                .await
                .unwrap();
            let took = start.elapsed();
            assert_eq!(is_meshed(&pod), c == 2, "{}: {pod:?}", cases[c].0);
            if i >= 2 {
                samples[c].push(took);
            }
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    eprintln!("pod create round trip, {N} creates each (ms):");
    let mut p50s = Vec::new();
    for ((label, _), s) in cases.iter().zip(&mut samples) {
        s.sort();
        let mean = s.iter().map(|d| ms(*d)).sum::<f64>() / s.len() as f64;
        let pct = |p: f64| ms(s[((s.len() - 1) as f64 * p).round() as usize]);
        eprintln!(
            "  {label:16} min {:6.2}  p50 {:6.2}  p90 {:6.2}  max {:6.2}  mean {:6.2}",
            ms(s[0]),
            pct(0.5),
            pct(0.9),
            ms(s[s.len() - 1]),
            mean
        );
        p50s.push(pct(0.5));
    }
    let reviews = hook.metric("meshctl_injection_review_duration_seconds_count");
    let review_sum = hook.metric("meshctl_injection_review_duration_seconds_sum");
    eprintln!(
        "  webhook p50 overhead: skip {:+.2} ms, inject {:+.2} ms; review handling in the webhook: mean {:.3} ms over {reviews} reviews",
        p50s[1] - p50s[0],
        p50s[2] - p50s[0],
        review_sum / reviews * 1e3,
    );
    assert!(reviews >= (2 * (N + 2)) as f64);

    // These pods served their purpose; don't leave ~100 pods for kwok and the scheduler.
    for api in &apis {
        api.delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
            .unwrap();
    }
    registered.delete(env).await;
}

/// App probes through the proxy: the webhook rewrites the app's HTTP (named port), TCP and
/// gRPC probes to the proxy's app-health port and hands the originals to the proxy; the API
/// server validates and stores the rewritten pod and kwok runs it. A pod opting out keeps its
/// probes as written.
#[tokio::test]
async fn app_probes_are_rewritten_to_the_proxy_and_accepted_by_the_api_server() {
    use mesh_wire::app_probe;
    use mesh_wire::names::ENV_APP_PROBERS;

    let env = TestEnv::shared();
    let client = env.client().unwrap();
    let hook = Webhook::start(env).await;
    let scope = env.create_namespace("injwh-probes-scope").await.unwrap();
    let ns = namespace(env, "injwh-probes", &scope, &["mesh-injection=enabled"]).await;
    hook.wait_for_label(&ns, "mesh-injection=enabled").await;
    let name = format!("meshctl-sidecar-injector-{scope}");
    let registered = Registered::create(
        env,
        &hook_config(&name, &scope, &hook.url(), env.ca_pem(), "Fail"),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    wait_until_injecting(&pods).await;

    let probed = |name: &str, annotations: serde_json::Value| -> Pod {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name, "annotations": annotations },
            "spec": { "containers": [{
                "name": "myapp",
                "image": "rlawnsdud/demo",
                "ports": [{ "name": "http", "containerPort": 5678 }, { "containerPort": 9090 }],
                "livenessProbe": { "httpGet": { "path": "/healthz", "port": "http" },
                    "periodSeconds": 7, "timeoutSeconds": 2 },
                "readinessProbe": { "tcpSocket": { "port": 5678 } },
                "startupProbe": { "grpc": { "port": 9090, "service": "myapp" },
                    "failureThreshold": 20 },
            }, {
                "name": "helper",
                "image": "busybox",
                "livenessProbe": { "exec": { "command": ["true"] } },
            }]},
        }))
        .unwrap()
    };
    let created = pods
        .create(
            &PostParams::default(),
            &probed("probed", serde_json::json!({})),
        )
        .await
        .unwrap();
    let spec = created.spec.as_ref().unwrap();
    let app = &spec.containers[0];
    let rewritten = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let h = p.as_ref().unwrap().http_get.as_ref().unwrap();
        (h.path.clone().unwrap(), h.port.clone())
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(
        rewritten(&app.liveness_probe),
        ("/app-health/myapp/livez".into(), IntOrString::Int(15020))
    );
    assert_eq!(
        rewritten(&app.readiness_probe),
        ("/app-health/myapp/readyz".into(), IntOrString::Int(15020))
    );
    assert_eq!(
        rewritten(&app.startup_probe),
        ("/app-health/myapp/startupz".into(), IntOrString::Int(15020))
    );
    let live = app.liveness_probe.as_ref().unwrap();
    assert_eq!(
        (live.period_seconds, live.timeout_seconds),
        (Some(7), Some(2))
    );
    assert!(
        spec.containers[1]
            .liveness_probe
            .as_ref()
            .unwrap()
            .exec
            .is_some()
    );
    // The proxy has the originals, ports resolved; its own readiness probe is on 15021.
    let proxy = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == PROXY_NAME)
        .unwrap();
    let json = proxy
        .env
        .iter()
        .flatten()
        .find(|e| e.name == ENV_APP_PROBERS)
        .and_then(|e| e.value.clone())
        .expect("the proxy gets the app probes");
    let probers = app_probe::parse(&json).unwrap();
    assert_eq!(probers.len(), 3, "{json}");
    assert_eq!(
        probers["/app-health/myapp/livez"]
            .http_get
            .as_ref()
            .unwrap()
            .port,
        5678
    );
    assert_eq!(probers["/app-health/myapp/livez"].timeout_seconds, 2);
    assert_eq!(
        probers["/app-health/myapp/startupz"]
            .grpc
            .as_ref()
            .unwrap()
            .service
            .as_deref(),
        Some("myapp")
    );
    let proxy_ready = proxy
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(proxy_ready.port, IntOrString::Int(15021));
    let args = proxy.args.as_ref().unwrap().join(" ");
    assert!(args.contains("--app-health-port 15020"), "{args}");
    let init = spec.init_containers.as_ref().unwrap()[0]
        .args
        .as_ref()
        .unwrap()
        .join(" ");
    assert!(
        init.contains("--exclude-inbound-ports 15000,15020,15021,15090"),
        "{init}"
    );
    // The status annotation keeps the originals as written (the named port).
    let status: Status =
        serde_json::from_str(&created.metadata.annotations.as_ref().unwrap()[STATUS_ANNOTATION])
            .unwrap();
    assert_eq!(
        status.probes["myapp"]["livenessProbe"]["httpGet"]["port"],
        serde_json::json!("http")
    );

    // Opted out with Istio's annotation: injected, probes as written.
    let opted = pods
        .create(
            &PostParams::default(),
            &probed(
                "opted-out",
                serde_json::json!({"sidecar.istio.io/rewriteAppHTTPProbers": "false"}),
            ),
        )
        .await
        .unwrap();
    assert!(is_meshed(&opted));
    let want = probed("x", serde_json::json!({}));
    let want = &want.spec.as_ref().unwrap().containers[0];
    let got = &opted.spec.as_ref().unwrap().containers[0];
    assert_eq!(
        rewritten(&got.liveness_probe),
        ("/healthz".into(), IntOrString::String("http".into()))
    );
    assert_eq!(
        got.readiness_probe.as_ref().unwrap().tcp_socket,
        want.readiness_probe.as_ref().unwrap().tcp_socket
    );

    // kwok runs the rewritten pod.
    let running = eventually(
        Duration::from_secs(120),
        "the probed pod to be Running",
        || async {
            let pod = pods.get("probed").await?;
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            Ok((phase == Some("Running")).then_some(pod))
        },
    )
    .await
    .unwrap();
    assert_running(&running);
    registered.delete(env).await;
}
