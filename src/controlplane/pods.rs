//! The labels of meshed pods (label `security.meshctl.io/tlsMode`, which injection adds),
//! watched as metadata only. A sidecar's inbound policies select workloads by pod labels
//! (EnvoyFilter `workloadSelector`); the sidecar names its pod, the labels come from the API
//! server. Only a change of some pod's labels (or a pod coming or going) counts as a change:
//! pod status updates, the bulk of pod events, do not re-translate anything.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::mpsc;

use super::unlisted::Unlisted;

/// Label that injection puts on every meshed pod.
pub use mesh_wire::names::MESHED_POD_LABEL;

type Labels = BTreeMap<String, String>;

/// `namespace/name` → labels of meshed pods.
#[derive(Clone, Default)]
pub struct PodLabels(Arc<RwLock<HashMap<String, Arc<Labels>>>>);

impl PodLabels {
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<Labels>> {
        self.0
            .read()
            .expect("pod labels lock")
            .get(&format!("{namespace}/{name}"))
            .cloned()
    }

    /// A copy for one [`super::World`].
    pub fn snapshot(&self) -> HashMap<String, Arc<Labels>> {
        self.0.read().expect("pod labels lock").clone()
    }

    /// Sets one pod's labels; true when that changed something.
    fn set(&self, key: String, labels: Option<Labels>) -> bool {
        let mut map = self.0.write().expect("pod labels lock");
        match labels {
            Some(l) => {
                if map.get(&key).is_some_and(|old| **old == l) {
                    return false;
                }
                map.insert(key, Arc::new(l));
                true
            }
            None => map.remove(&key).is_some(),
        }
    }

    fn replace(&self, all: HashMap<String, Arc<Labels>>) -> bool {
        let mut map = self.0.write().expect("pod labels lock");
        let changed = *map != all;
        *map = all;
        changed
    }
}

fn key_of(pod: &impl ResourceExt) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

/// Starts the watch; `changes` gets a message when some meshed pod's labels change.
pub fn start(client: &Client, changes: mpsc::UnboundedSender<()>, pending: Unlisted) -> PodLabels {
    let labels = PodLabels::default();
    let out = labels.clone();
    // Metadata-only requests: labels, not specs and statuses.
    let api: Api<PartialObjectMeta<Pod>> = Api::all(client.clone());
    let config = watcher::Config::default().labels(MESHED_POD_LABEL);
    pending.begin();
    tokio::spawn(async move {
        let stream = watcher(api, config).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut relisting: Option<HashMap<String, Arc<Labels>>> = None;
        let mut settled = false;
        let mut failing = false;
        while let Some(event) = stream.next().await {
            let changed = match event {
                Ok(watcher::Event::Init) => {
                    relisting = Some(HashMap::new());
                    false
                }
                Ok(watcher::Event::InitApply(pod)) => {
                    if let Some(m) = relisting.as_mut() {
                        m.insert(key_of(&pod), Arc::new(pod.labels().clone()));
                    }
                    false
                }
                Ok(watcher::Event::InitDone) => {
                    if failing {
                        tracing::info!("pod watch established");
                    }
                    failing = false;
                    let changed = labels.replace(relisting.take().unwrap_or_default());
                    if !settled {
                        settled = true;
                        pending.end();
                        true
                    } else {
                        changed
                    }
                }
                Ok(watcher::Event::Apply(pod)) => {
                    labels.set(key_of(&pod), Some(pod.labels().clone()))
                }
                Ok(watcher::Event::Delete(pod)) => labels.set(key_of(&pod), None),
                Err(e) => {
                    if !failing {
                        tracing::warn!("pod watch failed (retrying with backoff): {e}");
                    }
                    failing = true;
                    if !settled {
                        settled = true;
                        pending.end();
                        true
                    } else {
                        false
                    }
                }
            };
            if changed {
                let _ = changes.send(());
            }
        }
    });
    out
}
