//! The walkthrough's `deployment.yaml`, applied with the real kubectl: Deployments
//! become Available, pods Running with IPs (kwok), EndpointSlices carry those IPs.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use mesh_testenv::{TestEnv, eventually};

const DEPLOYMENT_YAML: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/seed-walkthrough/deployment.yaml"
);

fn selector(map: &std::collections::BTreeMap<String, String>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::test]
async fn walkthrough_deployments_become_available_with_endpoints() {
    let env = TestEnv::shared();
    let client = env.client().unwrap();
    let ns = env.create_namespace("walkthrough").await.unwrap();

    let out = env
        .kubectl_ok(&["apply", "-n", &ns, "-f", DEPLOYMENT_YAML])
        .await
        .unwrap();
    for line in [
        "deployment.apps/myapp-v1 created",
        "service/myapp-v1 created",
        "deployment.apps/myapp-v2 created",
        "service/myapp-v2 created",
        "deployment.apps/otherapp created",
        "service/otherapp created",
    ] {
        assert!(out.contains(line), "kubectl apply said:\n{out}");
    }

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let slices: Api<EndpointSlice> = Api::namespaced(client, &ns);

    for name in ["myapp-v1", "myapp-v2", "otherapp"] {
        eventually(
            Duration::from_secs(120),
            &format!("deployment {name} to be Available"),
            || async {
                let d = deployments.get(name).await?;
                let available = d
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c.type_ == "Available" && c.status == "True")
                    });
                let ready = d.status.as_ref().and_then(|s| s.ready_replicas) == Some(1);
                Ok((available && ready).then_some(()))
            },
        )
        .await
        .unwrap();

        let svc = services.get(name).await.unwrap();
        let sel = selector(svc.spec.as_ref().unwrap().selector.as_ref().unwrap());
        let pod_list = pods
            .list(&ListParams::default().labels(&sel))
            .await
            .unwrap();
        assert_eq!(pod_list.items.len(), 1, "one replica of {name}");
        let mut pod_ips = BTreeSet::new();
        for pod in &pod_list.items {
            let status = pod.status.as_ref().unwrap();
            assert_eq!(
                status.phase.as_deref(),
                Some("Running"),
                "{name}: {status:?}"
            );
            let ip = status.pod_ip.clone().expect("kwok gives the pod an IP");
            assert!(ip.starts_with("10.244."), "pod IP {ip} from kwok's --cidr");
            assert_eq!(
                pod.spec.as_ref().unwrap().node_name.as_deref(),
                Some(mesh_testenv::NODE_NAME),
                "scheduled onto the kwok node"
            );
            pod_ips.insert(ip);
        }

        let slice_ips = eventually(
            Duration::from_secs(60),
            &format!("EndpointSlices of service {name} to hold its pod IPs"),
            || async {
                let list = slices
                    .list(
                        &ListParams::default()
                            .labels(&format!("kubernetes.io/service-name={name}")),
                    )
                    .await?;
                let mut ips = BTreeSet::new();
                for s in &list.items {
                    let port_ok = s.ports.as_ref().is_some_and(|ps| {
                        ps.iter()
                            .any(|p| p.name.as_deref() == Some("http") && p.port == Some(5678))
                    });
                    for e in s.endpoints.iter().flatten() {
                        let ready = e.conditions.as_ref().and_then(|c| c.ready) == Some(true);
                        if port_ok && ready {
                            ips.extend(e.addresses.iter().cloned());
                        }
                    }
                }
                Ok((ips == pod_ips).then_some(ips))
            },
        )
        .await
        .unwrap();
        assert_eq!(slice_ips, pod_ips);
    }
}
