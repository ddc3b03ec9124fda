//! PeerAuthentication and workload identities through the control plane, on the real API
//! server: a meshed pod (run by kwok, in its Service's EndpointSlice by the real
//! controllers) and another sidecar keep their config streams open while PeerAuthentications
//! are created, changed and deleted at mesh, namespace and workload scope. The pod's pushed
//! inbound `mtls` follows each change, and the other sidecar reaches the pod's endpoint with
//! the identity of its service account, or in plaintext while the pod's port is `DISABLE`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use mesh_proxy::config::{InboundMtls, MtlsMode, ProxyConfig};
use mesh_proxy::distribution::{ClientOptions, NodeIdentity, run_client};
use mesh_testenv::{TestEnv, eventually};
use mesh_translate::PeerAuthentication;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::inprocess::ControlPlane;

const CRD: &str = include_str!("../../manifests/istio/peerauthentications.security.istio.io.yaml");

/// Installs the PeerAuthentication CRD unless it is there (as `meshctl install` would; an
/// install's own copy is left as it is).
async fn ensure_crd(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_saphyr::from_str(CRD).unwrap();
    match crds.create(&PostParams::default(), &crd).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating the PeerAuthentication CRD: {e}"),
    }
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(
            crds,
            "peerauthentications.security.istio.io",
            conditions::is_crd_established(),
        ),
    )
    .await
    .expect("CRD Established within 30s")
    .unwrap();
}

/// A sidecar's config stream; the last config it got (ACKed when it validates; one that does
/// not is kept as the error the test reports).
fn follow(
    cp: &ControlPlane,
    namespace: &str,
    pod: &str,
    ip: &str,
    stop: &CancellationToken,
) -> Followed {
    let mut o = ClientOptions::new(
        cp.distribution.to_string(),
        cp.ca_path.clone(),
        NodeIdentity::Sidecar {
            namespace: namespace.into(),
            pod: pod.into(),
            service_account: None,
            ip: Some(ip.parse().unwrap()),
        },
    );
    o.min_backoff = Duration::from_millis(100);
    let (tx, mut updates) = tokio::sync::mpsc::channel(1);
    tokio::spawn(run_client(o, tx, stop.clone()));
    let slot: Followed = Arc::default();
    let out = slot.clone();
    tokio::spawn(async move {
        while let Some(u) = updates.recv().await {
            let valid = u.config.validate().map_err(|e| format!("{e:?}"));
            *slot.lock().unwrap() = Some(match &valid {
                Ok(()) => Ok(u.config),
                Err(e) => Err(format!("version {} does not validate: {e}", u.version)),
            });
            let _ = u.reply.send(valid);
        }
    });
    out
}

/// The last config a sidecar got, or why it was refused.
type Followed = Arc<Mutex<Option<Result<ProxyConfig, String>>>>;

/// The last config of `f`; a config that did not validate fails the test.
fn last(f: &Followed) -> Option<ProxyConfig> {
    match f.lock().unwrap().clone() {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => panic!("{e}"),
    }
}

fn inbound(c: &ProxyConfig) -> InboundMtls {
    c.listeners
        .iter()
        .find(|l| l.name == mesh_translate::sidecar::INBOUND_LISTENER)
        .and_then(|l| l.mtls.clone())
        .unwrap_or_default()
}

fn mtls(mode: MtlsMode, ports: &[(u16, MtlsMode)]) -> InboundMtls {
    InboundMtls {
        mode,
        ports: ports.iter().copied().collect(),
    }
}

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1beta1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_authentication_changes_reach_sidecars_and_meshed_endpoints_carry_identities() {
    // Not while an install's objects are in the cluster (their CRDs, by field manager).
    let _shared = crate::MESH_INSTALL.read().await;
    let env = TestEnv::shared();
    let client = env.client().unwrap();
    ensure_crd(&client).await;
    let ns = env.create_namespace("peerauth").await.unwrap();
    // A mesh root namespace of this test's own: its mesh-wide policies reach no other
    // test's proxies.
    let root = env.create_namespace("peerauth-root").await.unwrap();
    let objects = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: web, namespace: {ns}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {ns}}}\n\
         spec:\n  selector: {{app: web}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: {ns}}}\n\
         spec:\n  replicas: 1\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    \
         metadata: {{labels: {{app: web, security.meshctl.io/tlsMode: istio}}}}\n    \
         spec: {{serviceAccountName: web, containers: [{{name: app, image: web:1, ports: [{{containerPort: 8080}}]}}]}}\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("objects.yaml");
    std::fs::write(&file, objects).unwrap();
    env.kubectl_ok(&["apply", "-f", file.to_str().unwrap()])
        .await
        .unwrap();

    // The pod runs, with an IP, in the Service's EndpointSlice.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let (pod, ip) = eventually(Duration::from_secs(120), "a Running web pod", || async {
        let list = pods.list(&ListParams::default().labels("app=web")).await?;
        Ok(list
            .items
            .iter()
            .find_map(|p| Some((p.metadata.name.clone()?, p.status.as_ref()?.pod_ip.clone()?))))
    })
    .await
    .unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    eventually(Duration::from_secs(60), "the pod's endpoint", || async {
        let list = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
            .await?;
        let found = list
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .any(|e| {
                e.addresses.contains(&ip)
                    && e.target_ref.as_ref().and_then(|t| t.name.as_deref()) == Some(pod.as_str())
            });
        Ok(found.then_some(()))
    })
    .await
    .unwrap();

    // A mesh root namespace of the test's own, so its mesh-wide policies reach no other
    // test's proxies.
    let root_namespaces = vec![root.clone()];
    let cp = ControlPlane::start_with(env, vec![], None, move |c| {
        c.translate.root_namespaces = root_namespaces;
    })
    .await;
    let stop = CancellationToken::new();
    let web = follow(&cp, &ns, &pod, &ip, &stop);
    let other = follow(&cp, &ns, "client-0", "10.244.255.253", &stop);
    let endpoint = format!("{ip}:8080");
    let identity = format!("spiffe://cluster.local/ns/{ns}/sa/web");

    // Waits until the pod's inbound is `want`, and the other sidecar reaches the pod with
    // its identity (`true`) or in plaintext.
    let expect = |what: &'static str, want: InboundMtls, with_identity: bool| {
        let (web, other, endpoint, identity, ns) = (&web, &other, &endpoint, &identity, &ns);
        async move {
            let seen = eventually(Duration::from_secs(30), what, || async {
                let got_inbound = last(web).as_ref().map(inbound);
                let got_identity = last(other).and_then(|c| {
                    let b = c
                        .backends
                        .iter()
                        .find(|b| b.name == format!("{ns}/web:80"))?;
                    assert!(b.endpoints.contains(endpoint), "{b:?}");
                    Some(b.mtls_identities.get(endpoint).cloned())
                });
                let ok = got_inbound.as_ref() == Some(&want)
                    && got_identity.as_ref().is_some_and(|id| {
                        id.as_deref() == with_identity.then_some(identity.as_str())
                    });
                Ok(ok.then_some(()))
            })
            .await;
            if let Err(e) = seen {
                panic!(
                    "{e:#}: web inbound {:?}, other sidecar's web backend {:?}",
                    last(web).as_ref().map(inbound),
                    last(other).map(|c| c
                        .backends
                        .iter()
                        .find(|b| b.name == format!("{ns}/web:80"))
                        .cloned())
                );
            }
        }
    };

    use MtlsMode::{Disable, Permissive, Strict};
    // No policy: PERMISSIVE, and the meshed pod's endpoint carries its identity.
    expect("no policy", mtls(Permissive, &[]), true).await;

    // Mesh-wide STRICT (security.istio.io/v1, through kubectl).
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh_file,
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: {{name: default, namespace: {root}}}\nspec: {{mtls: {{mode: STRICT}}}}\n"
        ),
    )
    .unwrap();
    env.kubectl_ok(&["apply", "-f", mesh_file.to_str().unwrap()])
        .await
        .unwrap();
    expect("mesh-wide STRICT", mtls(Strict, &[]), true).await;

    // Namespace-wide UNSET inherits the mesh's; then DISABLE: plaintext to the pod.
    let api: Api<PeerAuthentication> = Api::namespaced(client.clone(), &ns);
    let pp = PatchParams::apply("peerauth-test").force();
    let apply = |name: &'static str, spec: Value| {
        let (api, pp, ns) = (&api, &pp, &ns);
        async move {
            api.patch(name, pp, &Patch::Apply(policy(ns, name, spec)))
                .await
                .unwrap();
        }
    };
    apply("default", json!({"mtls": {"mode": "UNSET"}})).await;
    expect("namespace UNSET under mesh STRICT", mtls(Strict, &[]), true).await;
    apply("default", json!({"mtls": {"mode": "DISABLE"}})).await;
    expect("namespace DISABLE", mtls(Disable, &[]), false).await;

    // A workload policy beats it: PERMISSIVE, 8080 STRICT; then 8080 DISABLE.
    apply(
        "web",
        json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "PERMISSIVE"},
               "portLevelMtls": {"8080": {"mode": "STRICT"}}}),
    )
    .await;
    expect(
        "workload PERMISSIVE, 8080 STRICT",
        mtls(Permissive, &[(8080, Strict)]),
        true,
    )
    .await;
    apply(
        "web",
        json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "PERMISSIVE"},
               "portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
    )
    .await;
    expect(
        "workload 8080 DISABLE",
        mtls(Permissive, &[(8080, Disable)]),
        false,
    )
    .await;

    // Deleted one by one: back to the namespace's, the mesh's, the default.
    let dp = DeleteParams::default();
    api.delete("web", &dp).await.unwrap();
    expect("workload policy deleted", mtls(Disable, &[]), false).await;
    api.delete("default", &dp).await.unwrap();
    expect("namespace policy deleted", mtls(Strict, &[]), true).await;
    let root_api: Api<PeerAuthentication> = Api::namespaced(client.clone(), &root);
    root_api.delete("default", &dp).await.unwrap();
    expect("mesh policy deleted", mtls(Permissive, &[]), true).await;

    stop.cancel();
    env.kubectl_ok(&[
        "-n",
        &ns,
        "delete",
        "services,deployments",
        "--all",
        "--wait=false",
    ])
    .await
    .unwrap();
}
