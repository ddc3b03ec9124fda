//! Meshed pods (label `security.meshctl.io/tlsMode`, which injection adds): their labels and
//! service accounts. A sidecar's inbound policies select workloads by pod labels (EnvoyFilter
//! `workloadSelector`, PeerAuthentication `selector`), and the endpoints of meshed pods are
//! reached over mutual TLS with the identity of their service account; the sidecar names its
//! pod, the rest comes from the API server. Only those two fields of each pod are kept, and
//! only a change of them (or a pod coming or going) counts as a change: pod status updates,
//! the bulk of pod events, do not re-translate anything.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use mesh_translate::MeshedPod;
use tokio::sync::mpsc;

use super::unlisted::Unlisted;

/// Label that injection puts on every meshed pod.
pub use mesh_wire::names::MESHED_POD_LABEL;

/// `namespace/name` → what matters of each meshed pod.
#[derive(Clone, Default)]
pub struct MeshedPods(Arc<RwLock<HashMap<String, Arc<MeshedPod>>>>);

impl MeshedPods {
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<MeshedPod>> {
        self.0
            .read()
            .expect("meshed pods lock")
            .get(&mesh_translate::pod_key(namespace, name))
            .cloned()
    }

    /// A copy for one [`super::World`] (its `Resources::pods`).
    pub fn snapshot(&self) -> HashMap<String, Arc<MeshedPod>> {
        self.0.read().expect("meshed pods lock").clone()
    }

    /// Sets one pod; true when that changed something.
    fn set(&self, key: String, pod: Option<MeshedPod>) -> bool {
        let mut map = self.0.write().expect("meshed pods lock");
        match pod {
            Some(p) => {
                if map.get(&key).is_some_and(|old| **old == p) {
                    return false;
                }
                map.insert(key, Arc::new(p));
                true
            }
            None => map.remove(&key).is_some(),
        }
    }

    fn replace(&self, all: HashMap<String, Arc<MeshedPod>>) -> bool {
        let mut map = self.0.write().expect("meshed pods lock");
        let changed = *map != all;
        *map = all;
        changed
    }
}

fn key_of(pod: &Pod) -> String {
    mesh_translate::pod_key(&pod.namespace().unwrap_or_default(), &pod.name_any())
}

/// The labels and the service account of a pod: all that is kept of it. Every pod with the
/// label is kept, whatever its value (`disabled` opts a pod out of mutual TLS, not out of
/// its policies); the translator tells meshed workloads apart.
fn kept(pod: &Pod) -> MeshedPod {
    MeshedPod {
        labels: pod.labels().clone(),
        service_account: mesh_translate::identity::service_account(
            pod.spec
                .as_ref()
                .and_then(|s| s.service_account_name.as_deref()),
        ),
    }
}

/// Starts the watch; `changes` gets a message when some meshed pod's labels or service
/// account change.
pub fn start(client: &Client, changes: mpsc::UnboundedSender<()>, pending: Unlisted) -> MeshedPods {
    let labels = MeshedPods::default();
    let out = labels.clone();
    // Whole pods (the service account is in the spec; a metadata-only watch lacks it), of
    // which only the labels and the service account are kept.
    let api: Api<Pod> = Api::all(client.clone());
    let config = watcher::Config::default().labels(MESHED_POD_LABEL);
    pending.begin();
    tokio::spawn(async move {
        let stream = watcher(api, config).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut relisting: Option<HashMap<String, Arc<MeshedPod>>> = None;
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
                        m.insert(key_of(&pod), Arc::new(kept(&pod)));
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
                Ok(watcher::Event::Apply(pod)) => labels.set(key_of(&pod), Some(kept(&pod))),
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
