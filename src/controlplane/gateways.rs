//! Automated deployment of Gateways, as Istio does it with the Gateway API: for each Gateway
//! of one of our GatewayClasses, a ServiceAccount, a Deployment running
//! `mesh-proxy run --control-plane ... --gateway NS/NAME`, and a Service, all named
//! `<gateway>-<class>`, owned by the Gateway (garbage-collected with it) and applied with
//! server-side apply (field manager `meshctl`). The CA that verifies the control plane is
//! mounted from the ConfigMap `mesh-ca-root-cert` ([`super::ca_root`]), written here too so it
//! exists before the gateway's first pod.

use std::collections::{BTreeMap, HashMap};

use gateway_api::apis::standard::gateways::Gateway;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use mesh_translate::Resources;
use mesh_wire::names::{ENV_CA_ROOT_PATH, ENV_TOKEN_PATH, PROXY_CONTAINER, PROXY_GID, PROXY_UID};
use serde_json::{Value, json};

use super::watch::GATEWAY_NAME_LABEL;

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
    /// The CA PEM for [`CA_CONFIGMAP`] (none: not written).
    pub ca_pem: Option<String>,
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
                        "spec": {
                            "serviceAccountName": obj_name,
                            "securityContext": {
                                "runAsUser": PROXY_UID,
                                "runAsGroup": PROXY_GID,
                                "runAsNonRoot": true,
                                "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}],
                            },
                            "containers": [{
                                "name": PROXY_CONTAINER,
                                "image": options.image,
                                "args": [
                                    "run",
                                    "--control-plane", options.control_plane_address,
                                    "--gateway", format!("{ns}/{name}"),
                                    "--readiness-address", format!("0.0.0.0:{STATUS_PORT}"),
                                ],
                                "env": [
                                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                                    {"name": ENV_CA_ROOT_PATH, "value": format!("{CA_MOUNT_DIR}/{CA_CONFIGMAP_KEY}")},
                                    {"name": ENV_TOKEN_PATH, "value": format!("{TOKEN_MOUNT_DIR}/{TOKEN_FILE}")},
                                ],
                                "ports": container_ports,
                                "readinessProbe": {
                                    "httpGet": {"path": "/ready", "port": STATUS_PORT},
                                    "periodSeconds": 2,
                                },
                                "securityContext": {
                                    "allowPrivilegeEscalation": false,
                                    "readOnlyRootFilesystem": true,
                                    "capabilities": {"drop": ["ALL"]},
                                },
                                "volumeMounts": [
                                    {"name": "mesh-ca", "mountPath": CA_MOUNT_DIR, "readOnly": true},
                                    {"name": "mesh-token", "mountPath": TOKEN_MOUNT_DIR, "readOnly": true},
                                ],
                            }],
                            // No API access for the proxy: only the projected token it
                            // presents to the control plane.
                            "automountServiceAccountToken": false,
                            "volumes": [
                                {"name": "mesh-ca", "configMap": {"name": CA_CONFIGMAP}},
                                {"name": "mesh-token", "projected": {"sources": [{"serviceAccountToken": {
                                    "audience": options.token_audience,
                                    "expirationSeconds": 43200,
                                    "path": TOKEN_FILE,
                                }}]}},
                            ],
                        },
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
        out.push(("ConfigMap", super::ca_root::config_map(&ns, ca)));
    }
    out
}

/// Applies what changed since the last call (a restart applies everything once).
pub struct Reconciler {
    client: Client,
    options: GatewayDeploymentOptions,
    applied: HashMap<String, Value>,
}

impl Reconciler {
    pub fn new(client: Client, options: GatewayDeploymentOptions) -> Reconciler {
        Reconciler {
            client,
            options,
            applied: HashMap::new(),
        }
    }

    pub async fn reconcile(&mut self, resources: &Resources, controller_names: &[String]) {
        let params = PatchParams::apply("meshctl").force();
        for g in our_gateways(resources, controller_names) {
            for (kind, body) in desired(&g, &self.options) {
                let ns = body["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let name = body["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let key = format!("{kind}/{ns}/{name}");
                if self.applied.get(&key) == Some(&body) {
                    continue;
                }
                let c = self.client.clone();
                let patch = Patch::Apply(&body);
                let result = match kind {
                    "ServiceAccount" => Api::<ServiceAccount>::namespaced(c, &ns)
                        .patch(&name, &params, &patch)
                        .await
                        .map(drop),
                    "Deployment" => Api::<Deployment>::namespaced(c, &ns)
                        .patch(&name, &params, &patch)
                        .await
                        .map(drop),
                    "Service" => Api::<Service>::namespaced(c, &ns)
                        .patch(&name, &params, &patch)
                        .await
                        .map(drop),
                    _ => Api::<ConfigMap>::namespaced(c, &ns)
                        .patch(&name, &params, &patch)
                        .await
                        .map(drop),
                };
                match result {
                    Ok(()) => {
                        tracing::info!(%key, "applied");
                        self.applied.insert(key, body);
                    }
                    Err(e) => {
                        tracing::warn!(%key, "apply failed (retried on the next change): {e}")
                    }
                }
            }
        }
    }
}
