//! The CA that verifies the control plane, followed by the mesh CA's roots (the trust bundle
//! of workload certificates), published as the ConfigMap `mesh-ca-root-cert`
//! (key `root-cert.pem`) in every namespace, as Istio does with `istio-ca-root-cert`: injected
//! sidecars mount it (`MESH_CA_ROOT_PATH`, the injection config's `caRootConfigMap`), gateway
//! Deployments too. Written with server-side apply; a namespace created later gets it on the
//! next pass (every world change and every 30 s), and every namespace gets it again when the
//! mesh CA's roots change (a rotation).

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::time::Instant;

/// ConfigMap holding the CA (key [`CA_CONFIGMAP_KEY`]).
pub const CA_CONFIGMAP: &str = "mesh-ca-root-cert";
pub const CA_CONFIGMAP_KEY: &str = "root-cert.pem";
/// Label on every copy, so `meshctl uninstall` finds them (they are not the installer's:
/// install would prune them).
pub const PUBLISHED_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "meshd");
/// The Kubernetes system namespaces, where no proxy runs.
const SKIPPED_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// The ConfigMap for one namespace.
pub fn config_map(namespace: &str, ca_pem: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CA_CONFIGMAP,
            "namespace": namespace,
            "labels": {PUBLISHED_LABEL.0: PUBLISHED_LABEL.1},
        },
        "data": {CA_CONFIGMAP_KEY: ca_pem},
    })
}

/// Publishes the CA into namespaces it has not been written to yet.
pub struct CaPublisher {
    client: Client,
    ca_pem: String,
    /// Namespaces (with their uid, so a re-created namespace is written again) done.
    written: HashMap<String, String>,
    last_pass: Option<Instant>,
}

/// Shortest time between two passes (each lists the namespaces).
const MIN_INTERVAL: Duration = Duration::from_secs(5);

impl CaPublisher {
    pub fn new(client: Client, ca_pem: String) -> CaPublisher {
        CaPublisher {
            client,
            ca_pem,
            written: HashMap::new(),
            last_pass: None,
        }
    }

    /// The text to publish from now on; a change is written into every namespace again, at
    /// once (a root rotation must reach workloads without waiting).
    pub fn set_ca_pem(&mut self, ca_pem: String) {
        if ca_pem != self.ca_pem {
            self.ca_pem = ca_pem;
            self.written.clear();
            self.last_pass = None;
        }
    }

    pub async fn publish(&mut self) {
        if self.last_pass.is_some_and(|t| t.elapsed() < MIN_INTERVAL) {
            return;
        }
        self.last_pass = Some(Instant::now());
        let namespaces = match Api::<Namespace>::all(self.client.clone())
            .list_metadata(&ListParams::default())
            .await
        {
            Ok(l) => l.items,
            Err(e) => {
                tracing::warn!("listing namespaces for {CA_CONFIGMAP} failed (retried): {e}");
                return;
            }
        };
        let params = PatchParams::apply("meshctl").force();
        for ns in namespaces {
            let name = ns.name_any();
            let uid = ns.uid().unwrap_or_default();
            if SKIPPED_NAMESPACES.contains(&name.as_str())
                || ns.metadata.deletion_timestamp.is_some()
                || self.written.get(&name) == Some(&uid)
            {
                continue;
            }
            let body = config_map(&name, &self.ca_pem);
            match Api::<ConfigMap>::namespaced(self.client.clone(), &name)
                .patch(CA_CONFIGMAP, &params, &Patch::Apply(&body))
                .await
            {
                Ok(_) => {
                    tracing::debug!(namespace = %name, "{CA_CONFIGMAP} applied");
                    self.written.insert(name, uid);
                }
                Err(e) => {
                    tracing::warn!(namespace = %name, "applying {CA_CONFIGMAP} failed (retried): {e}")
                }
            }
        }
    }
}
