//! What the control plane knows at one moment (a [`World`]) and the config each proxy gets
//! from it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use mesh_proxy::config::ProxyConfig;
use mesh_proxy::distribution::NodeIdentity;
use mesh_translate::{Resources, TranslateOptions};

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
    cache: Mutex<HashMap<(String, u32), Arc<ProxyConfig>>>,
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
    /// `instances` enforcing distributed rate limits; for a sidecar, nothing yet (sidecar
    /// listeners are the sidecar's own; their routing config comes with the mesh routes).
    pub fn config_for(
        &self,
        node: &NodeIdentity,
        instances: u32,
        base: &TranslateOptions,
    ) -> Arc<ProxyConfig> {
        let Some(key) = node.gateway_key() else {
            return Arc::new(ProxyConfig::default());
        };
        let cache_key = (key, instances.max(1));
        if let Some(c) = self.cache.lock().expect("cache lock").get(&cache_key) {
            return c.clone();
        }
        let options = TranslateOptions {
            gateways: vec![cache_key.0.clone()],
            distributed_instances: cache_key.1,
            ..base.clone()
        };
        let translation = mesh_translate::translate(&self.resources, &options);
        let config = Arc::new(translation.config);
        self.cache
            .lock()
            .expect("cache lock")
            .insert(cache_key, config.clone());
        config
    }
}
