//! What the control plane knows at one moment (a [`World`]) and the config each proxy gets
//! from it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use mesh_config::{MeshIdentity, ProxyConfig};
use mesh_translate::{Resources, SidecarKey, SidecarOptions, TranslateOptions};
use mesh_wire::distribution::{ControlPlaneMessage, NodeIdentity, encode};
use mesh_wire::ports;
use tokio::sync::OnceCell;

/// One consistent view of the watched objects. Published as a whole (`Arc`) on every
/// (debounced) change; the configs derived from it are computed lazily and cached, so many
/// proxies of one Gateway, or the replicas of one workload, cost one translation per world
/// however many of them ask at once.
pub struct World {
    /// Increases with every published world; a proxy's config version is the generation at
    /// which its config last changed.
    pub generation: u64,
    pub resources: Arc<Resources>,
    /// Ready replicas of the Deployment of each Gateway (`namespace/name`) we manage.
    pub gateway_replicas: BTreeMap<String, u32>,
    cache: Mutex<HashMap<CacheKey, Arc<Entry>>>,
}

/// What a proxy's config depends on besides the world.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum CacheKey {
    /// Gateway `namespace/name`, instances enforcing its distributed limits.
    Gateway(String, u32),
    /// A sidecar: what its config depends on (pods of one Deployment share it).
    Sidecar(SidecarKey),
}

/// One cached config of a world. The first proxy to ask translates; the others asking at
/// the same time wait (asynchronously: no thread is held) for that translation instead of
/// running their own. Should the first one go away mid-way, the next waiter takes over.
#[derive(Default)]
struct Entry {
    config: OnceCell<Arc<ProxyConfig>>,
    /// The snapshot message of this config at the world's generation, encoded once for
    /// every proxy it is sent to.
    frame: OnceCell<Bytes>,
}

/// What to translate for one cache entry.
#[derive(Clone)]
enum Job {
    Gateway(Box<TranslateOptions>),
    Sidecar(Box<SidecarOptions>),
}

impl Job {
    fn run(&self, resources: &Resources) -> ProxyConfig {
        match self {
            Job::Gateway(options) => mesh_translate::translate(resources, options).config,
            Job::Sidecar(options) => mesh_translate::translate_sidecar(resources, options).config,
        }
    }
}

/// A proxy's place in one world's cache ([`World::prepare`]), to be [`Pending::resolve`]d.
pub struct Pending {
    entry: Arc<Entry>,
    job: Job,
    resources: Arc<Resources>,
    generation: u64,
    mesh_identity: Option<Arc<MeshIdentity>>,
}

/// A proxy's config in one world.
pub struct Lookup {
    pub config: Arc<ProxyConfig>,
    /// This call ran the translation (false: it came from the cache, or from the caller
    /// that was already translating it).
    pub translated: bool,
    generation: u64,
    entry: Arc<Entry>,
}

impl Pending {
    /// Puts the mesh's trust bundle into the config (when this call translates it). It is
    /// the same for every proxy of a control plane, so it is not part of the cache key.
    pub fn with_mesh_identity(mut self, identity: Option<Arc<MeshIdentity>>) -> Pending {
        self.mesh_identity = identity;
        self
    }

    /// The config: cached, or being translated by another caller (waited for), or
    /// translated here (on the blocking pool: thousands of routes take a while).
    pub async fn resolve(self) -> Lookup {
        let mut translated = false;
        let config = self
            .entry
            .config
            .get_or_init(|| {
                translated = true;
                let (job, resources) = (self.job.clone(), self.resources.clone());
                let mesh_identity = self.mesh_identity.clone();
                async move {
                    let config = tokio::task::spawn_blocking(move || {
                        let mut config = job.run(&resources);
                        config.mesh_identity = mesh_identity.map(|m| (*m).clone());
                        config
                    })
                    .await
                    .expect("translation does not panic");
                    Arc::new(config)
                }
            })
            .await
            .clone();
        Lookup {
            config,
            translated,
            generation: self.generation,
            entry: self.entry,
        }
    }
}

impl Lookup {
    /// The snapshot message carrying this config, versioned with the world's generation:
    /// encoded by the first proxy it is sent to, shared by the others.
    pub async fn frame(&self) -> Bytes {
        self.entry
            .frame
            .get_or_init(|| {
                let version = self.version();
                let config = self.config.clone();
                async move {
                    tokio::task::spawn_blocking(move || {
                        let mut config = (*config).clone();
                        config.version = version.clone();
                        encode(&ControlPlaneMessage::Snapshot {
                            version,
                            config: Box::new(config),
                        })
                    })
                    .await
                    .expect("encoding does not panic")
                }
            })
            .await
            .clone()
    }

    /// The version [`Lookup::frame`] carries.
    pub fn version(&self) -> String {
        self.generation.to_string()
    }
}

impl World {
    pub fn new(
        generation: u64,
        resources: Arc<Resources>,
        gateway_replicas: BTreeMap<String, u32>,
    ) -> World {
        World {
            generation,
            resources,
            gateway_replicas,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The config of a proxy: for a gateway, the translation of its Gateway with
    /// `instances` enforcing distributed rate limits; for a sidecar, the translation for its
    /// pod (outbound: the mesh's Services and their routes; inbound: the policies of the
    /// Services it backs and the EnvoyFilters selecting its labels), with the default
    /// listener ports (the sidecar puts its own on).
    pub async fn config_for(
        &self,
        node: &NodeIdentity,
        instances: u32,
        base: &TranslateOptions,
    ) -> Arc<ProxyConfig> {
        self.prepare(node, instances, base).resolve().await.config
    }

    /// Finds the cache entry of a proxy's config (what it depends on: for a sidecar, one
    /// pass over the EndpointSlices; call it off the async threads in a big cluster).
    pub fn prepare(&self, node: &NodeIdentity, instances: u32, base: &TranslateOptions) -> Pending {
        let (cache_key, job) = match node {
            NodeIdentity::Gateway { .. } => {
                let gateway = node.gateway_key().unwrap_or_default();
                let instances = instances.max(1);
                let options = TranslateOptions {
                    gateways: vec![gateway.clone()],
                    distributed_instances: instances,
                    ..base.clone()
                };
                (
                    CacheKey::Gateway(gateway, instances),
                    Job::Gateway(Box::new(options)),
                )
            }
            NodeIdentity::Sidecar {
                namespace, pod, ip, ..
            } => {
                let options = SidecarOptions {
                    base: TranslateOptions {
                        default_namespace: namespace.clone(),
                        ..base.clone()
                    },
                    pod_namespace: namespace.clone(),
                    pod_name: pod.clone(),
                    pod_ip: *ip,
                    // The API server's labels, from the resources' meshed pods; a pod not
                    // seen (yet) gets the selectors of the Services it backs.
                    pod_labels: None,
                    // `mesh-proxy sidecar`'s defaults; a sidecar started with other ports puts
                    // its own on.
                    inbound_port: ports::SIDECAR_INBOUND,
                    outbound_port: ports::SIDECAR_OUTBOUND,
                };
                let key = mesh_translate::sidecar_key(&self.resources, &options);
                (CacheKey::Sidecar(key), Job::Sidecar(Box::new(options)))
            }
        };
        let entry = self
            .cache
            .lock()
            .expect("cache lock")
            .entry(cache_key)
            .or_default()
            .clone();
        Pending {
            entry,
            job,
            resources: self.resources.clone(),
            generation: self.generation,
            mesh_identity: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: server, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: server-abc, namespace: demo, labels: {kubernetes.io/service-name: server}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.2]}, {addresses: [10.244.0.3]}]
"#;

    fn sidecar(pod: &str, ip: &str) -> NodeIdentity {
        NodeIdentity::Sidecar {
            namespace: "demo".into(),
            pod: pod.into(),
            service_account: None,
            ip: Some(ip.parse().unwrap()),
        }
    }

    #[tokio::test]
    async fn pods_that_back_the_same_services_share_one_translation() {
        let res = mesh_translate::load_str("objects.yaml", OBJECTS, &Default::default())
            .unwrap()
            .resources;
        let world = World::new(1, Arc::new(res), BTreeMap::new());
        let base = TranslateOptions::default();
        let a = world
            .config_for(&sidecar("server-a", "10.244.0.2"), 1, &base)
            .await;
        let b = world
            .config_for(&sidecar("server-b", "10.244.0.3"), 1, &base)
            .await;
        let client = world
            .config_for(&sidecar("client", "10.244.0.9"), 1, &base)
            .await;
        assert!(Arc::ptr_eq(&a, &b), "two replicas, one translation");
        assert!(!Arc::ptr_eq(&a, &client));
        // And what they share is right for each: the replicas serve 8080 inbound, the
        // client backs nothing.
        let inbound = |c: &ProxyConfig| -> Vec<u16> {
            c.listeners
                .iter()
                .flat_map(|l| l.inbound_ports.iter().map(|p| p.port))
                .collect()
        };
        assert_eq!(inbound(&a), [8080]);
        assert!(inbound(&client).is_empty());
        // Labels known from the API server make a different key.
        let mut res = (*world.resources).clone();
        res.pods.insert(
            "demo/server-b".to_string(),
            Arc::new(mesh_translate::MeshedPod {
                labels: BTreeMap::from([("app".to_string(), "server".to_string())]),
                service_account: "default".into(),
            }),
        );
        let labelled = World::new(2, Arc::new(res), BTreeMap::new());
        let a2 = labelled
            .config_for(&sidecar("server-a", "10.244.0.2"), 1, &base)
            .await;
        let b2 = labelled
            .config_for(&sidecar("server-b", "10.244.0.3"), 1, &base)
            .await;
        assert!(!Arc::ptr_eq(&a2, &b2));
    }

    /// Pods `server-a` and `server-b` of one workload (both back `server`), with the labels
    /// the API server would report.
    fn labelled_world(objects: &str, generation: u64) -> World {
        let mut res = mesh_translate::load_str(
            "objects.yaml",
            objects,
            &mesh_translate::LoadOptions {
                default_namespace: "demo".into(),
            },
        )
        .unwrap()
        .resources;
        let pod = |pod: &str| {
            Arc::new(mesh_translate::MeshedPod {
                labels: BTreeMap::from([
                    ("app".to_string(), "server".to_string()),
                    (
                        "statefulset.kubernetes.io/pod-name".to_string(),
                        pod.to_string(),
                    ),
                ]),
                service_account: "server".into(),
            })
        };
        res.pods = ["server-a", "server-b"]
            .into_iter()
            .map(|p| (format!("demo/{p}"), pod(p)))
            .collect();
        World::new(generation, Arc::new(res), BTreeMap::new())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_asking_at_once_cause_one_translation() {
        let world = Arc::new(labelled_world(OBJECTS, 7));
        let barrier = Arc::new(tokio::sync::Barrier::new(50));
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let (world, barrier) = (world.clone(), barrier.clone());
                tokio::spawn(async move {
                    let (pod, ip) = if i % 2 == 0 {
                        ("server-a", "10.244.0.2")
                    } else {
                        ("server-b", "10.244.0.3")
                    };
                    let pending = world.prepare(&sidecar(pod, ip), 1, &TranslateOptions::default());
                    barrier.wait().await;
                    let lookup = pending.resolve().await;
                    let frame = lookup.frame().await;
                    (lookup, frame)
                })
            })
            .collect();
        let mut lookups = Vec::new();
        for t in tasks {
            lookups.push(t.await.unwrap());
        }
        let translated = lookups.iter().filter(|(l, _)| l.translated).count();
        assert_eq!(translated, 1, "50 replicas asking at once, one translation");
        let first = &lookups[0];
        for (l, frame) in &lookups {
            assert!(Arc::ptr_eq(&l.config, &first.0.config));
            // Encoded once too: every replica is sent the same bytes.
            assert_eq!(frame.as_ptr(), first.1.as_ptr());
        }
        assert_eq!(first.0.version(), "7");
        let mut decoder = mesh_wire::distribution::FrameDecoder::default();
        decoder.push(&first.1);
        match decoder.next_message::<ControlPlaneMessage>().unwrap() {
            Some(ControlPlaneMessage::Snapshot { version, config }) => {
                assert_eq!(version, "7");
                assert_eq!(config.version, "7");
                assert_eq!(config.listeners, first.0.config.listeners);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn labels_no_selector_reads_do_not_split_replicas() {
        // Replicas differ in a label (a StatefulSet's pod name) that nothing selects on:
        // one translation.
        let world = labelled_world(OBJECTS, 1);
        let base = TranslateOptions::default();
        let a = world
            .prepare(&sidecar("server-a", "10.244.0.2"), 1, &base)
            .resolve()
            .await;
        let b = world
            .prepare(&sidecar("server-b", "10.244.0.3"), 1, &base)
            .resolve()
            .await;
        assert!(a.translated && !b.translated);
        assert!(Arc::ptr_eq(&a.config, &b.config));

        // An EnvoyFilter selects one pod by that label: now it matters, and only the
        // selected pod gets the limit.
        let filter = include_str!("../../examples/seed-walkthrough/istio-envoy-filter.yaml")
            .replace(
                "name: ingress-local-ratelimit",
                "name: server-a-limit\n  namespace: demo",
            )
            .replace(
                "istio: ingressgateway",
                "statefulset.kubernetes.io/pod-name: server-a",
            );
        let world = labelled_world(&format!("{OBJECTS}---\n{filter}"), 2);
        let a = world
            .prepare(&sidecar("server-a", "10.244.0.2"), 1, &base)
            .resolve()
            .await;
        let b = world
            .prepare(&sidecar("server-b", "10.244.0.3"), 1, &base)
            .resolve()
            .await;
        assert!(a.translated && b.translated);
        assert_eq!(a.config.rate_limits.len(), 1, "{:?}", a.config.rate_limits);
        assert!(
            b.config.rate_limits.is_empty(),
            "{:?}",
            b.config.rate_limits
        );
    }
}
