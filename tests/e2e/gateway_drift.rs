//! The objects the control plane generates for a Gateway (Deployment, Service,
//! ServiceAccount) come back when someone deletes or edits them by hand, without a restart:
//! the gateway controller watches what it owns and reconciles from the cluster's state.
//!
//! The control plane runs in the test process with a controller name of this test's own, so
//! it manages only this test's GatewayClass, whatever else runs in the shared cluster.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Resource, ResourceExt};
use mesh_testenv::{TestEnv, eventually};
use meshctl::controlplane::gateways::{GatewayDeploymentOptions, deployment_name};

use crate::inprocess::ControlPlane;

const IMAGE: &str = "registry.example/mesh-proxy:drift";
const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// The Gateway API CRDs, applied as `meshctl install` applies them (same field manager and
/// content, so concurrent installs in other tests agree).
pub async fn gateway_api_crds(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply("meshctl").force();
    for crd in meshctl::install::crds::parse(meshctl::install::crds::GATEWAY_API) {
        let name = crd["metadata"]["name"].as_str().unwrap().to_string();
        crds.patch(&name, &pp, &Patch::Apply(&crd)).await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .expect("CRD Established within 30s")
        .unwrap();
    }
}

fn image(d: &Deployment) -> String {
    d.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .image
        .clone()
        .unwrap_or_default()
}

/// Waits until `get` returns an object whose uid is not `old_uid`; returns it and how long
/// that took.
async fn recreated<K, F, Fut>(what: &str, old_uid: &str, get: F) -> (K, Duration)
where
    K: Resource,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Option<K>, kube::Error>>,
{
    let t = Instant::now();
    let obj = eventually(Duration::from_secs(20), what, || async {
        Ok(get()
            .await?
            .filter(|o| o.meta().uid.as_deref() != Some(old_uid)))
    })
    .await
    .unwrap();
    (obj, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_objects_deleted_or_edited_by_hand_come_back() {
    // Not while `meshctl install`'s control plane of another test manages Gateways and
    // publishes its CA into every namespace.
    let _shared = crate::MESH_INSTALL.read().await;
    let env = TestEnv::shared();
    let client = env.client().unwrap();
    gateway_api_crds(&client).await;
    let ns = env.create_namespace("drift").await.unwrap();
    let class = format!("drift-{ns}");
    let controller = format!("e2e.meshctl.io/{ns}");

    let _cp = ControlPlane::start(
        env,
        vec![controller.clone()],
        Some(GatewayDeploymentOptions {
            image: IMAGE.into(),
            control_plane_address: "meshd.mesh-system.svc:15012".into(),
            default_service_type: "ClusterIP".into(),
            pod_labels: Default::default(),
            token_audience: "meshctl".into(),
            ca_pem: None,
        }),
    )
    .await;
    let objects = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: {class}}}\n\
         spec: {{controllerName: {controller}}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: gw, namespace: {ns}}}\n\
         spec:\n  gatewayClassName: {class}\n  listeners: [{{name: http, port: 8080, protocol: HTTP}}]\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, objects).unwrap();
    env.kubectl_ok(&["apply", "-f", file.to_str().unwrap()])
        .await
        .unwrap();

    let name = deployment_name("gw", &class);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let first = eventually(
        Duration::from_secs(60),
        "the gateway Deployment",
        || async { Ok(deployments.get_opt(&name).await?) },
    )
    .await
    .unwrap();
    assert_eq!(image(&first), IMAGE);
    // The pod runs hardened like the installer's ingress gateway (one pod builder for both):
    // non-root, with the runtime's default seccomp profile.
    let pod_security = first
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.security_context.clone())
        .unwrap();
    assert_eq!(
        pod_security.seccomp_profile.map(|p| p.type_),
        Some("RuntimeDefault".to_string())
    );
    assert_eq!(pod_security.run_as_non_root, Some(true));
    let service = eventually(Duration::from_secs(30), "the gateway Service", || async {
        Ok(services.get_opt(&name).await?)
    })
    .await
    .unwrap();
    let account = accounts.get(&name).await.unwrap();

    // Deleted by hand: back within seconds, as a new object.
    deployments
        .delete(&name, &DeleteParams::foreground())
        .await
        .unwrap();
    let (again, took) = recreated(
        "the deleted Deployment recreated",
        first.uid().as_deref().unwrap(),
        || deployments.get_opt(&name),
    )
    .await;
    eprintln!("gateway Deployment deleted: recreated after {took:?}");
    assert_eq!(image(&again), IMAGE);
    let owner = &again.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Gateway", "gw")
    );

    services
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    let (svc, took) = recreated(
        "the deleted Service recreated",
        service.uid().as_deref().unwrap(),
        || services.get_opt(&name),
    )
    .await;
    eprintln!("gateway Service deleted: recreated after {took:?}");
    let ports: Vec<i32> = svc
        .spec
        .unwrap()
        .ports
        .unwrap()
        .iter()
        .map(|p| p.port)
        .collect();
    assert!(ports.contains(&8080), "{ports:?}");

    accounts
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    let (_, took) = recreated(
        "the deleted ServiceAccount recreated",
        account.uid().as_deref().unwrap(),
        || accounts.get_opt(&name),
    )
    .await;
    eprintln!("gateway ServiceAccount deleted: recreated after {took:?}");

    // Scaled by hand: replicas are not ours (an autoscaler may own them), they stay.
    env.kubectl_ok(&["-n", &ns, "scale", "deployment", &name, "--replicas=2"])
        .await
        .unwrap();
    // The image edited by hand: ours, restored.
    env.kubectl_ok(&[
        "-n",
        &ns,
        "set",
        "image",
        &format!("deployment/{name}"),
        "mesh-proxy=registry.example/someone-else:1",
    ])
    .await
    .unwrap();
    let t = Instant::now();
    let restored = eventually(Duration::from_secs(20), "the image restored", || async {
        Ok(deployments
            .get_opt(&name)
            .await?
            .filter(|d| image(d) == IMAGE && d.metadata.generation > again.metadata.generation))
    })
    .await
    .unwrap();
    eprintln!("gateway image edited: restored after {:?}", t.elapsed());
    assert_eq!(restored.spec.unwrap().replicas, Some(2));

    // Our label taken off the Service (so it drops out of the label-selected watch): put back.
    env.kubectl_ok(&[
        "-n",
        &ns,
        "label",
        "service",
        &name,
        &format!("{GATEWAY_NAME_LABEL}-"),
    ])
    .await
    .unwrap();
    eventually(
        Duration::from_secs(20),
        "the Service label restored",
        || async {
            Ok(services
                .get_opt(&name)
                .await?
                .filter(|s| s.labels().get(GATEWAY_NAME_LABEL).map(String::as_str) == Some("gw")))
        },
    )
    .await
    .unwrap();

    env.kubectl_ok(&["delete", "gatewayclass", &class])
        .await
        .unwrap();
}
