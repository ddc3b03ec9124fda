//! Many sidecars of one workload cost one translation per world: 50 replicas of a
//! Deployment (pods run by kwok, EndpointSlices filled by the real controllers) connect
//! their sidecars' config streams to an in-process control plane; when a change reaches them
//! all at once, the control plane translates their shared config once, and each replica
//! still gets what is right for its pod.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use mesh_proxy::config::ProxyConfig;
use mesh_proxy::distribution::{ClientOptions, NodeIdentity, first_snapshot, run_client};
use mesh_testenv::{TestEnv, eventually};
use tokio_util::sync::CancellationToken;

use crate::inprocess::ControlPlane;

const REPLICAS: usize = 50;
const MESH_SERVICES: usize = 200;
const TRANSLATIONS: &str = "meshctl_distribution_translations_total{proxy=\"sidecar\"}";
const REQUESTS: &str = "meshctl_distribution_config_requests_total{proxy=\"sidecar\"}";

fn inbound_ports(c: &ProxyConfig) -> Vec<u16> {
    c.listeners
        .iter()
        .flat_map(|l| l.inbound_ports.iter().map(|p| p.port))
        .collect()
}

fn has_service(c: &ProxyConfig, name: &str) -> bool {
    c.listeners
        .iter()
        .flat_map(|l| &l.services)
        .any(|s| s.name.starts_with(name))
}

/// CPU time (user + system) of this process so far, from `/proc/self/stat`.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may hold spaces) end with ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_one_workload_share_one_translation_per_world() {
    let _shared = crate::MESH_INSTALL.read().await;
    let env = TestEnv::shared();
    let client = env.client().unwrap();
    let ns = env.create_namespace("fanout").await.unwrap();
    let objects = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: server, namespace: {ns}}}\n\
         spec:\n  selector: {{app: server}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: server, namespace: {ns}}}\n\
         spec:\n  replicas: {REPLICAS}\n  selector: {{matchLabels: {{app: server}}}}\n  template:\n    \
         metadata: {{labels: {{app: server, security.meshctl.io/tlsMode: istio}}}}\n    \
         spec: {{containers: [{{name: app, image: app:1, ports: [{{containerPort: 8080}}]}}]}}\n"
    );
    // A mesh of some size, so that one translation takes a while (as in a real cluster)
    // and replicas asking at once really overlap.
    let mut objects = objects;
    for i in 0..MESH_SERVICES {
        objects.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: mesh-{i}, namespace: {ns}}}\n\
             spec:\n  ports: [{{name: http, port: 80}}, {{name: grpc, port: 9090}}]\n"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("objects.yaml");
    std::fs::write(&file, objects).unwrap();
    env.kubectl_ok(&["apply", "-f", file.to_str().unwrap()])
        .await
        .unwrap();

    // The replicas run, with IPs, in the Service's EndpointSlices.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let running = eventually(Duration::from_secs(120), "50 Running pods", || async {
        let list = pods
            .list(&ListParams::default().labels("app=server"))
            .await?;
        let running: Vec<(String, String)> = list
            .items
            .iter()
            .filter_map(|p| Some((p.metadata.name.clone()?, p.status.as_ref()?.pod_ip.clone()?)))
            .collect();
        Ok((running.len() == REPLICAS).then_some(running))
    })
    .await
    .unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    eventually(Duration::from_secs(60), "50 endpoints", || async {
        let list = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=server"))
            .await?;
        let n: usize = list
            .items
            .iter()
            .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
            .sum();
        Ok((n == REPLICAS).then_some(()))
    })
    .await
    .unwrap();

    let cp = ControlPlane::start(env, Vec::new(), None).await;
    let options = |pod: &str, ip: &str| {
        let mut o = ClientOptions::new(
            cp.distribution.to_string(),
            cp.ca_path.clone(),
            NodeIdentity::Sidecar {
                namespace: ns.clone(),
                pod: pod.into(),
                service_account: Some("default".into()),
                ip: Some(ip.parse().unwrap()),
            },
        );
        o.min_backoff = Duration::from_millis(100);
        o
    };

    // One sidecar stream per replica; each keeps the last config it got (and ACKs it).
    let stop = CancellationToken::new();
    let latest: Vec<Arc<Mutex<Option<ProxyConfig>>>> =
        (0..REPLICAS).map(|_| Arc::default()).collect();
    for ((pod, ip), slot) in running.iter().zip(&latest) {
        let (tx, mut updates) = tokio::sync::mpsc::channel(1);
        tokio::spawn(run_client(options(pod, ip), tx, stop.clone()));
        let slot = slot.clone();
        tokio::spawn(async move {
            while let Some(u) = updates.recv().await {
                *slot.lock().unwrap() = Some(u.config);
                let _ = u.reply.send(Ok(()));
            }
        });
    }
    let all = |f: &dyn Fn(&ProxyConfig) -> bool| {
        latest
            .iter()
            .all(|s| s.lock().unwrap().as_ref().is_some_and(f))
    };
    eventually(
        Duration::from_secs(60),
        "every replica's config",
        || async { Ok(all(&|c| has_service(c, &format!("{ns}/server"))).then_some(())) },
    )
    .await
    .unwrap();
    // Per pod, what is right for the pod: every replica backs `server`, inbound 8080.
    for slot in &latest {
        assert_eq!(
            inbound_ports(slot.lock().unwrap().as_ref().unwrap()),
            [8080]
        );
    }

    // A change that reaches every replica at the same moment: a new Service in the mesh.
    let (t0, r0, g0) = (
        cp.metric(TRANSLATIONS).await,
        cp.metric(REQUESTS).await,
        cp.generation().await,
    );
    let (cpu0, wall0) = (cpu_time(), Instant::now());
    env.kubectl_ok(&[
        "-n",
        &ns,
        "create",
        "service",
        "clusterip",
        "extra",
        "--tcp=80:8080",
    ])
    .await
    .unwrap();
    eventually(
        Duration::from_secs(30),
        "every replica to get Service extra",
        || async { Ok(all(&|c| has_service(c, &format!("{ns}/extra"))).then_some(())) },
    )
    .await
    .unwrap();
    let (cpu, wall) = (cpu_time() - cpu0, wall0.elapsed());
    let (t1, r1, g1) = (
        cp.metric(TRANSLATIONS).await,
        cp.metric(REQUESTS).await,
        cp.generation().await,
    );
    let (translations, requests, worlds) = (t1 - t0, r1 - r0, g1 - g0);
    eprintln!(
        "{REPLICAS} replicas, one change: {translations} translations for {requests} config requests \
         over {worlds} worlds; {wall:?} from kubectl to every replica updated, {cpu:?} CPU (whole test process)"
    );
    assert!(requests >= REPLICAS as u64, "{requests} config requests");
    // Several worlds may pass meanwhile (the cluster is shared with other tests): at most
    // one translation of this workload each.
    assert!(
        translations >= 1 && translations <= worlds,
        "{translations} translations for {worlds} worlds"
    );
    for slot in &latest {
        assert_eq!(
            inbound_ports(slot.lock().unwrap().as_ref().unwrap()),
            [8080]
        );
    }

    // A pod of another workload, in the same namespace, backs nothing: no inbound ports.
    let client_config = first_snapshot(&options("client-0", "10.244.255.254"))
        .await
        .unwrap();
    assert!(has_service(&client_config, &format!("{ns}/extra")));
    assert!(
        inbound_ports(&client_config).is_empty(),
        "{client_config:?}"
    );
    stop.cancel();
    // The cluster is shared: other tests' sidecars need not carry this mesh.
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
