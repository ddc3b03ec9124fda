//! What the control plane knows at one moment (a [`World`]) and the config each proxy gets
//! from it.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use mesh_proxy::config::ProxyConfig;
use mesh_proxy::distribution::NodeIdentity;
use mesh_translate::{Resources, SidecarOptions, TranslateOptions};

/// One consistent view of the watched objects. Published as a whole (`Arc`) on every
/// (debounced) change; the configs derived from it are computed lazily and cached, so many
/// proxies of one Gateway cost one translation.
pub struct World {
    /// Increases with every published world; a proxy's config version is the generation at
    /// which its config last changed.
    pub generation: u64,
    pub resources: Arc<Resources>,
    /// Ready replicas of the Deployment of each Gateway (`namespace/name`) we manage.
    pub gateway_replicas: BTreeMap<String, u32>,
    /// Labels of meshed pods (`namespace/name`).
    pub pod_labels: HashMap<String, Arc<BTreeMap<String, String>>>,
    cache: Mutex<HashMap<CacheKey, Arc<ProxyConfig>>>,
}

/// What a proxy's config depends on besides the world.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum CacheKey {
    /// Gateway `namespace/name`, instances enforcing its distributed limits.
    Gateway(String, u32),
    /// A sidecar: pod namespace, name and IP.
    Sidecar(String, String, Option<IpAddr>),
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
        let cache_key = match node {
            NodeIdentity::Gateway { .. } => {
                CacheKey::Gateway(node.gateway_key().unwrap_or_default(), instances.max(1))
            }
            NodeIdentity::Sidecar {
                namespace, pod, ip, ..
            } => CacheKey::Sidecar(namespace.clone(), pod.clone(), *ip),
        };
        if let Some(c) = self.cache.lock().expect("cache lock").get(&cache_key) {
            return c.clone();
        }
        let translation = match &cache_key {
            CacheKey::Gateway(key, instances) => {
                let options = TranslateOptions {
                    gateways: vec![key.clone()],
                    distributed_instances: *instances,
                    ..base.clone()
                };
                mesh_translate::translate(&self.resources, &options)
            }
            CacheKey::Sidecar(namespace, pod, ip) => {
                let options = SidecarOptions {
                    base: TranslateOptions {
                        default_namespace: namespace.clone(),
                        ..base.clone()
                    },
                    pod_namespace: namespace.clone(),
                    pod_name: pod.clone(),
                    pod_ip: *ip,
                    // The API server's labels; a pod not seen (yet) gets the selectors
                    // of the Services it backs.
                    pod_labels: self
                        .pod_labels
                        .get(&format!("{namespace}/{pod}"))
                        .map(|l| (**l).clone()),
                    inbound_port: SIDECAR_INBOUND_PORT,
                    outbound_port: SIDECAR_OUTBOUND_PORT,
                };
                mesh_translate::translate_sidecar(&self.resources, &options)
            }
        };
        let config = Arc::new(translation.config);
        self.cache
            .lock()
            .expect("cache lock")
            .insert(cache_key, config.clone());
        config
    }
}

/// The sidecar listener ports the control plane translates with (`mesh-proxy sidecar`'s
/// defaults; a sidecar started with other ports puts its own on).
pub const SIDECAR_INBOUND_PORT: u16 = 15006;
pub const SIDECAR_OUTBOUND_PORT: u16 = 15001;
