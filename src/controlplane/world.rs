//! What the control plane knows at one moment (a [`World`]) and the config each proxy gets
//! from it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use mesh_proxy::config::ProxyConfig;
use mesh_proxy::distribution::{ControlPlaneMessage, NodeIdentity, encode};
use mesh_translate::{Resources, SidecarKey, SidecarOptions, TranslateOptions};

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
    /// Labels of meshed pods (`namespace/name`).
    pub pod_labels: HashMap<String, Arc<BTreeMap<String, String>>>,
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
/// the same time wait for that translation instead of running their own (single flight).
#[derive(Default)]
struct Entry {
    config: OnceLock<Arc<ProxyConfig>>,
    /// The snapshot message of this config at the world's generation, encoded once for
    /// every proxy it is sent to.
    frame: OnceLock<Bytes>,
}

/// A proxy's config in one world ([`World::lookup`]).
pub struct Lookup {
    pub config: Arc<ProxyConfig>,
    /// This call ran the translation (false: it came from the cache, or from the caller
    /// that was already translating it).
    pub translated: bool,
    generation: u64,
    entry: Arc<Entry>,
}

impl Lookup {
    /// The snapshot message carrying this config, versioned with the world's generation:
    /// encoded by the first proxy it is sent to, shared by the others.
    pub fn frame(&self) -> Bytes {
        self.entry
            .frame
            .get_or_init(|| {
                let version = self.generation.to_string();
                let mut config = (*self.config).clone();
                config.version = version.clone();
                encode(&ControlPlaneMessage::Snapshot {
                    version,
                    config: Box::new(config),
                })
            })
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
            pod_labels: HashMap::new(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn with_pod_labels(
        mut self,
        pod_labels: HashMap<String, Arc<BTreeMap<String, String>>>,
    ) -> World {
        self.pod_labels = pod_labels;
        self
    }

    /// The config of a proxy: for a gateway, the translation of its Gateway with
    /// `instances` enforcing distributed rate limits; for a sidecar, the translation for its
    /// pod (outbound: the mesh's Services and their routes; inbound: the policies of the
    /// Services it backs and the EnvoyFilters selecting its labels), with the default
    /// listener ports (the sidecar puts its own on).
    pub fn config_for(
        &self,
        node: &NodeIdentity,
        instances: u32,
        base: &TranslateOptions,
    ) -> Arc<ProxyConfig> {
        self.lookup(node, instances, base).config
    }

    /// [`World::config_for`], saying whether this call translated. Blocks while another
    /// thread translates the same key (call it off the async threads).
    pub fn lookup(&self, node: &NodeIdentity, instances: u32, base: &TranslateOptions) -> Lookup {
        let sidecar = match node {
            NodeIdentity::Gateway { .. } => None,
            NodeIdentity::Sidecar {
                namespace, pod, ip, ..
            } => Some(SidecarOptions {
                base: TranslateOptions {
                    default_namespace: namespace.clone(),
                    ..base.clone()
                },
                pod_namespace: namespace.clone(),
                pod_name: pod.clone(),
                pod_ip: *ip,
                // The API server's labels; a pod not seen (yet) gets the selectors of the
                // Services it backs.
                pod_labels: self
                    .pod_labels
                    .get(&format!("{namespace}/{pod}"))
                    .map(|l| (**l).clone()),
                inbound_port: SIDECAR_INBOUND_PORT,
                outbound_port: SIDECAR_OUTBOUND_PORT,
            }),
        };
        let gateway = (node.gateway_key().unwrap_or_default(), instances.max(1));
        let cache_key = match &sidecar {
            None => CacheKey::Gateway(gateway.0.clone(), gateway.1),
            Some(o) => CacheKey::Sidecar(mesh_translate::sidecar_key(&self.resources, o)),
        };
        // The map lock is held only to find the entry; the translation runs under the
        // entry's own once-cell, so other keys are served meanwhile.
        let entry = self
            .cache
            .lock()
            .expect("cache lock")
            .entry(cache_key)
            .or_default()
            .clone();
        let mut translated = false;
        let config = entry
            .config
            .get_or_init(|| {
                translated = true;
                let translation = match &sidecar {
                    Some(o) => mesh_translate::translate_sidecar(&self.resources, o),
                    None => {
                        let options = TranslateOptions {
                            gateways: vec![gateway.0],
                            distributed_instances: gateway.1,
                            ..base.clone()
                        };
                        mesh_translate::translate(&self.resources, &options)
                    }
                };
                Arc::new(translation.config)
            })
            .clone();
        Lookup {
            config,
            translated,
            generation: self.generation,
            entry,
        }
    }
}

/// The sidecar listener ports the control plane translates with (`mesh-proxy sidecar`'s
/// defaults; a sidecar started with other ports puts its own on).
pub const SIDECAR_INBOUND_PORT: u16 = 15006;
pub const SIDECAR_OUTBOUND_PORT: u16 = 15001;

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

    #[test]
    fn pods_that_back_the_same_services_share_one_translation() {
        let res = mesh_translate::load_str("objects.yaml", OBJECTS, &Default::default())
            .unwrap()
            .resources;
        let world = World::new(1, Arc::new(res), BTreeMap::new());
        let base = TranslateOptions::default();
        let a = world.config_for(&sidecar("server-a", "10.244.0.2"), 1, &base);
        let b = world.config_for(&sidecar("server-b", "10.244.0.3"), 1, &base);
        let client = world.config_for(&sidecar("client", "10.244.0.9"), 1, &base);
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
        let labelled = World::new(2, world.resources.clone(), BTreeMap::new()).with_pod_labels(
            [(
                "demo/server-b".to_string(),
                Arc::new(BTreeMap::from([("app".to_string(), "server".to_string())])),
            )]
            .into(),
        );
        let a2 = labelled.config_for(&sidecar("server-a", "10.244.0.2"), 1, &base);
        let b2 = labelled.config_for(&sidecar("server-b", "10.244.0.3"), 1, &base);
        assert!(!Arc::ptr_eq(&a2, &b2));
    }
}
