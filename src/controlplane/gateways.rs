//! Automated deployment of Gateways, as Istio does it with the Gateway API: for each Gateway
//! of one of our GatewayClasses, a ServiceAccount, a Deployment running
//! `mesh-proxy run --control-plane ... --gateway NS/NAME`, and a Service, all named
//! `<gateway>-<class>`, owned by the Gateway (garbage-collected with it) and applied with
//! server-side apply (field manager `meshctl`). The CA that verifies the control plane is
//! mounted from the ConfigMap `mesh-ca-root-cert` ([`super::ca_root`]), written here too so it
//! exists before the gateway's first pod.
//!
//! The objects are reconciled by a kube-runtime [`Controller`] of Gateways that also watches
//! what it creates (`owns`: Deployments, Services and ServiceAccounts, found through their
//! owner reference to the Gateway) and the GatewayClasses. [`reconcile`] is a function of
//! the Gateway and the cluster, not of what was applied before: a generated object deleted or
//! edited by hand triggers a reconcile of its Gateway, which applies the whole desired state
//! again, so the object is back within a second or so. Server-side apply with `force` makes
//! our fields win and leaves fields others own alone (e.g. an autoscaler's replicas: we do
//! not set `replicas`). Failures are retried with exponential backoff (1 s doubling to
//! 5 min); every Gateway is also re-applied every 5 minutes, in case a watch event was lost.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use gateway_api::apis::standard::gatewayclasses::GatewayClass;
use gateway_api::apis::standard::gateways::Gateway;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use mesh_translate::Resources;
use mesh_wire::names::{ENV_CA_ROOT_PATH, ENV_TOKEN_PATH};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::watch::GATEWAY_NAME_LABEL;
use crate::gateway_pod::{GatewayPod, GatewayVolume};

/// Istio's annotation for the gateway Service type.
pub const SERVICE_TYPE_ANNOTATION: &str = "networking.istio.io/service-type";
pub use super::ca_root::{CA_CONFIGMAP, CA_CONFIGMAP_KEY};
/// Where gateway pods mount it.
pub const CA_MOUNT_DIR: &str = "/var/run/meshctl/ca";
/// Where gateway pods mount the projected token they present to the control plane.
pub const TOKEN_MOUNT_DIR: &str = "/var/run/secrets/tokens";
pub const TOKEN_FILE: &str = "mesh-token";
/// Readiness port of mesh-proxy.
pub const STATUS_PORT: i32 = mesh_wire::ports::READINESS as i32;

/// How gateway Deployments are made.
#[derive(Debug, Clone)]
pub struct GatewayDeploymentOptions {
    /// `<hub>/mesh-proxy:<tag>`.
    pub image: String,
    /// Address proxies dial (`meshd.mesh-system.svc:15012`).
    pub control_plane_address: String,
    /// Service type when the Gateway has no `networking.istio.io/service-type` annotation.
    pub default_service_type: String,
    /// Labels of gateway pods (EnvoyFilter `workloadSelector`s match them), besides
    /// `gateway.networking.k8s.io/gateway-name` and the Gateway's infrastructure labels.
    pub pod_labels: BTreeMap<String, String>,
    /// Audience of the projected token gateway pods present (`--proxy-token-audience`).
    pub token_audience: String,
    /// The CA PEM for [`CA_CONFIGMAP`] (none: not written); it changes when the mesh CA's
    /// roots do (a rotation), and the next apply writes the new text.
    pub ca_pem: Option<tokio::sync::watch::Receiver<String>>,
}

/// A Gateway of one of our classes.
pub struct OurGateway<'a> {
    pub gateway: &'a Gateway,
    pub class: String,
}

/// Gateways whose class is controlled by one of `controller_names`.
pub fn our_gateways<'a>(
    resources: &'a Resources,
    controller_names: &[String],
) -> Vec<OurGateway<'a>> {
    let ours: Vec<&str> = resources
        .gateway_classes
        .iter()
        .filter(|c| controller_names.contains(&c.spec.controller_name))
        .filter_map(|c| c.metadata.name.as_deref())
        .collect();
    resources
        .gateways
        .iter()
        .filter(|g| g.metadata.deletion_timestamp.is_none())
        .filter(|g| ours.contains(&g.spec.gateway_class_name.as_str()))
        .map(|g| OurGateway {
            gateway: g,
            class: g.spec.gateway_class_name.clone(),
        })
        .collect()
}

/// `<gateway>-<class>`, Istio's name for the generated objects.
pub fn deployment_name(gateway: &str, class: &str) -> String {
    format!("{gateway}-{class}")
}

/// The objects of one Gateway, as server-side-apply bodies.
pub fn desired(
    g: &OurGateway<'_>,
    options: &GatewayDeploymentOptions,
) -> Vec<(&'static str, Value)> {
    let gw = g.gateway;
    let ns = gw.namespace().unwrap_or_default();
    let name = gw.name_any();
    let obj_name = deployment_name(&name, &g.class);
    let owner = json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "name": name,
        "uid": gw.metadata.uid.clone().unwrap_or_default(),
        "controller": true,
    });
    let mut labels: BTreeMap<String, String> = options.pod_labels.clone();
    if let Some(infra) = gw
        .spec
        .infrastructure
        .as_ref()
        .and_then(|i| i.labels.as_ref())
    {
        labels.extend(infra.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    labels.insert(GATEWAY_NAME_LABEL.into(), name.clone());
    let mut pod_labels = labels.clone();
    pod_labels.insert("sidecar.meshctl.io/inject".into(), "false".into());
    let service_type = gw
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SERVICE_TYPE_ANNOTATION))
        .cloned()
        .unwrap_or_else(|| options.default_service_type.clone());
    // One port per distinct listener port (listeners may share a port).
    let mut ports: BTreeMap<i32, String> = BTreeMap::new();
    for l in &gw.spec.listeners {
        ports
            .entry(l.port)
            .or_insert_with(|| format!("{}-{}", l.protocol.to_ascii_lowercase(), l.port));
    }
    let mut service_ports: Vec<Value> = vec![json!({
        "name": "status-port", "port": STATUS_PORT, "targetPort": STATUS_PORT, "protocol": "TCP",
    })];
    service_ports.extend(ports.iter().map(
        |(port, pname)| json!({"name": pname, "port": port, "targetPort": port, "protocol": "TCP"}),
    ));
    let mut container_ports: Vec<Value> = vec![json!({
        "name": "status-port", "containerPort": STATUS_PORT, "protocol": "TCP",
    })];
    container_ports.extend(
        ports
            .keys()
            .map(|port| json!({"containerPort": port, "protocol": "TCP"})),
    );
    let meta = |extra_labels: &BTreeMap<String, String>| {
        json!({
            "name": obj_name,
            "namespace": ns,
            "labels": extra_labels,
            "ownerReferences": [owner.clone()],
        })
    };
    let pod_spec = GatewayPod {
        service_account: obj_name.clone(),
        image: options.image.clone(),
        image_pull_policy: None,
        args: vec![
            "run".into(),
            "--control-plane".into(),
            options.control_plane_address.clone(),
            "--gateway".into(),
            format!("{ns}/{name}"),
            "--readiness-address".into(),
            format!("0.0.0.0:{STATUS_PORT}"),
        ],
        env: vec![
            json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
            json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
            json!({"name": ENV_CA_ROOT_PATH, "value": format!("{CA_MOUNT_DIR}/{CA_CONFIGMAP_KEY}")}),
            json!({"name": ENV_TOKEN_PATH, "value": format!("{TOKEN_MOUNT_DIR}/{TOKEN_FILE}")}),
        ],
        ports: container_ports,
        resources: None,
        volumes: vec![
            GatewayVolume {
                name: "mesh-ca".into(),
                mount_path: CA_MOUNT_DIR.into(),
                source: json!({"configMap": {"name": CA_CONFIGMAP}}),
            },
            GatewayVolume {
                name: "mesh-token".into(),
                mount_path: TOKEN_MOUNT_DIR.into(),
                source: json!({"projected": {"sources": [{"serviceAccountToken": {
                    "audience": options.token_audience,
                    "expirationSeconds": 43200,
                    "path": TOKEN_FILE,
                }}]}}),
            },
        ],
        // Gateways listen on their listeners' ports, 80 and 443 too.
        low_ports: true,
        // No API access for the proxy: only the projected token it presents to the control
        // plane.
        automount_service_account_token: Some(false),
    }
    .spec();
    let mut out = vec![
        (
            "ServiceAccount",
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(&labels)}),
        ),
        (
            "Deployment",
            json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": meta(&labels),
                "spec": {
                    "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
                    "template": {
                        "metadata": {"labels": pod_labels},
                        "spec": pod_spec,
                    },
                },
            }),
        ),
        (
            "Service",
            json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": meta(&labels),
                "spec": {
                    "type": service_type,
                    "selector": {GATEWAY_NAME_LABEL: name},
                    "ports": service_ports,
                },
            }),
        ),
    ];
    if let Some(ca) = &options.ca_pem {
        out.push(("ConfigMap", super::ca_root::config_map(&ns, &ca.borrow())));
    }
    out
}

/// Field manager of everything the control plane applies.
pub const FIELD_MANAGER: &str = "meshctl";
/// A Gateway whose objects were applied is applied again after this long even when nothing
/// was seen to change (a lost watch event cannot leave drift for good).
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(300);
/// First retry after a failed reconcile; doubles with each consecutive failure.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between retries of a failing Gateway.
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// Why a Gateway could not be reconciled (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("applying {kind} {namespace}/{name}: {source}")]
    Apply {
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("the GatewayClass watch stopped")]
    ClassesGone,
}

/// What [`reconcile`] needs besides the Gateway.
pub struct Context {
    client: Client,
    options: GatewayDeploymentOptions,
    controller_names: Vec<String>,
    /// Every GatewayClass (a Gateway is ours when its class names one of our controllers).
    classes: Store<GatewayClass>,
    /// Consecutive failed reconciles per Gateway (`namespace/name`), for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        options: GatewayDeploymentOptions,
        controller_names: Vec<String>,
        classes: Store<GatewayClass>,
    ) -> Context {
        Context {
            client,
            options,
            controller_names,
            classes,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// The class of `gw` when one of our controllers owns it.
    fn our_class(&self, gw: &Gateway) -> Option<String> {
        let class = &gw.spec.gateway_class_name;
        self.classes
            .get(&ObjectRef::new(class))
            .filter(|c| self.controller_names.contains(&c.spec.controller_name))
            .map(|_| class.clone())
    }
}

fn gateway_key(gw: &Gateway) -> String {
    format!("{}/{}", gw.namespace().unwrap_or_default(), gw.name_any())
}

async fn apply<K>(client: &Client, ns: &str, name: &str, body: &Value) -> Result<(), kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
{
    Api::<K>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map(drop)
}

/// Brings the objects of one Gateway to their desired state: the whole desired state is
/// applied every time (server-side apply: what already matches is not written).
pub async fn reconcile(gw: Arc<Gateway>, ctx: Arc<Context>) -> Result<Action, Error> {
    // Owner references garbage-collect the objects of a deleted Gateway.
    if gw.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    ctx.classes
        .wait_until_ready()
        .await
        .map_err(|_| Error::ClassesGone)?;
    let key = gateway_key(&gw);
    let Some(class) = ctx.our_class(&gw) else {
        // Not ours (or its class does not exist yet): a GatewayClass change reconciles
        // every Gateway again.
        ctx.failures.lock().expect("failures lock").remove(&key);
        return Ok(Action::await_change());
    };
    let g = OurGateway {
        gateway: &gw,
        class,
    };
    for (kind, body) in desired(&g, &ctx.options) {
        let ns = body["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = body["metadata"]["name"].as_str().unwrap_or_default();
        let c = &ctx.client;
        let result = match kind {
            "ServiceAccount" => apply::<ServiceAccount>(c, ns, name, &body).await,
            "Deployment" => apply::<Deployment>(c, ns, name, &body).await,
            "Service" => apply::<Service>(c, ns, name, &body).await,
            _ => apply::<ConfigMap>(c, ns, name, &body).await,
        };
        result.map_err(|source| Error::Apply {
            kind,
            namespace: ns.to_string(),
            name: name.to_string(),
            source,
        })?;
        tracing::debug!(gateway = %key, "{kind} {ns}/{name} applied");
    }
    if ctx
        .failures
        .lock()
        .expect("failures lock")
        .remove(&key)
        .is_some()
    {
        tracing::info!(gateway = %key, "gateway objects applied after earlier failures");
    }
    Ok(Action::requeue(RESYNC_INTERVAL))
}

/// Retry delay after the `n`th consecutive failure (1-based): [`RETRY_MIN`] doubling up to
/// [`RETRY_MAX`].
pub fn retry_delay(n: u32) -> Duration {
    RETRY_MIN
        .saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(RETRY_MAX)
}

/// Requeues a failed Gateway with exponential backoff.
pub fn error_policy(gw: Arc<Gateway>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = gateway_key(&gw);
    let n = {
        let mut failures = ctx.failures.lock().expect("failures lock");
        let n = failures.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = retry_delay(n);
    tracing::warn!(gateway = %key, attempt = n, retry_in = ?delay, "gateway objects not applied: {error}");
    Action::requeue(delay)
}

/// Runs the gateway controller until `shutdown`.
pub async fn run(
    client: Client,
    options: GatewayDeploymentOptions,
    controller_names: Vec<String>,
    shutdown: CancellationToken,
) {
    // GatewayClasses: a store for [`Context::our_class`], and any change reconciles every
    // Gateway (a class created after its Gateways, or handed to our controller). The store
    // is written before the change is seen, so the reconcile reads the new class.
    let (classes, writer) = reflector::store();
    let class_changes = watcher(Api::<GatewayClass>::all(client.clone()), Default::default())
        .default_backoff()
        .reflect(writer)
        .touched_objects()
        .filter_map(|r| futures::future::ready(r.ok().map(drop)));
    // Only the objects we make carry the gateway-name label; watching just those keeps the
    // controller's caches small.
    let ours = || watcher::Config::default().labels(super::watch::GATEWAY_NAME_LABEL);
    let ctx = Arc::new(Context::new(
        client.clone(),
        options,
        controller_names,
        classes,
    ));
    let mut failing = false;
    Controller::new(Api::<Gateway>::all(client.clone()), Default::default())
        .owns(Api::<Deployment>::all(client.clone()), ours())
        .owns(Api::<Service>::all(client.clone()), ours())
        .owns(Api::<ServiceAccount>::all(client), ours())
        .reconcile_all_on(class_changes)
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|r| {
            match r {
                Ok((gw, _)) => {
                    if failing {
                        tracing::info!("gateway controller: watches established");
                        failing = false;
                    }
                    tracing::debug!(gateway = %gw, "gateway reconciled");
                }
                // Logged by `error_policy`.
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                Err(kube::runtime::controller::Error::ObjectNotFound(_)) => {}
                Err(e) => {
                    // A missing Gateway API CRD fails every retry: say it once.
                    if !failing {
                        tracing::warn!("gateway controller (retrying with backoff; a missing Gateway API CRD is fine until it is installed): {e}");
                    } else {
                        tracing::debug!("gateway controller: {e}");
                    }
                    failing = true;
                }
            }
            futures::future::ready(())
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_from_one_second_to_five_minutes() {
        let delays: Vec<u64> = (1..=11).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
    }
}
