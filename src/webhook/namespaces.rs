//! Namespace labels from the cluster: a reflector (watch-backed cache) over Namespaces.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use super::review::NamespaceLookup;

/// Watch-backed namespace cache.
pub struct KubeNamespaces {
    store: Store<Namespace>,
    synced: Arc<AtomicBool>,
}

impl KubeNamespaces {
    /// Start the watch; the cache reports ready once the first list has arrived.
    pub fn start(client: Client) -> Arc<Self> {
        let api: Api<Namespace> = Api::all(client);
        let (store, writer) = reflector::store();
        let synced = Arc::new(AtomicBool::new(false));
        let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
            .default_backoff()
            .touched_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                if let Err(e) = ev {
                    tracing::warn!(error = %e, "namespace watch error");
                }
            }
        });
        let s = Arc::new(Self {
            store: store.clone(),
            synced: synced.clone(),
        });
        tokio::spawn(async move {
            if store.wait_until_ready().await.is_ok() {
                synced.store(true, Ordering::Relaxed);
            }
        });
        s
    }
}

impl NamespaceLookup for KubeNamespaces {
    fn labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        self.store
            .get(&ObjectRef::new(namespace))
            .map(|ns| ns.metadata.labels.clone().unwrap_or_default())
    }

    fn ready(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }
}
