//! Rendering: values → Kubernetes objects, through the minijinja templates in
//! `manifests/templates/` and the checked-in CRDs. Output order is the apply order:
//! CRDs, namespaces, then by kind (RBAC, config, workloads), webhooks last.

use minijinja::Environment;
use serde::Serialize;
use serde_json::Value;

use super::certs::{self, WebhookTls};
use super::crds;
use super::profile::Resolved;
use super::values::{MeshValues, NAMESPACE, WebhookMode};
use crate::gateway_pod::{GatewayPod, GatewayVolume};

/// Label on everything the installer creates; prune and uninstall select on it.
pub const LABEL_OWNED_BY: &str = "install.meshctl.io/owned-by";
pub const OWNER: &str = "meshctl";
/// Which component an object belongs to.
pub const LABEL_COMPONENT: &str = "install.meshctl.io/component";
/// The profile of the install that last applied the object.
pub const LABEL_PROFILE: &str = "install.meshctl.io/profile";

/// Components, in apply order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Component {
    GatewayApiCrds,
    /// Istio's CRDs for the compatibility input (EnvoyFilter); applied only when absent or
    /// ours, like the Gateway API CRDs.
    IstioCrds,
    Base,
    ControlPlane,
    IngressGateway,
    GatewayClass,
    Webhook,
}

impl Component {
    pub fn name(self) -> &'static str {
        match self {
            Component::GatewayApiCrds => "gateway-api-crds",
            Component::IstioCrds => "istio-crds",
            Component::Base => "base",
            Component::ControlPlane => "control-plane",
            Component::IngressGateway => "ingress-gateway",
            Component::GatewayClass => "gateway-class",
            Component::Webhook => "webhook",
        }
    }
}

const TEMPLATES: &[(&str, &str)] = &[
    (
        "namespace.yaml",
        include_str!("../../manifests/templates/namespace.yaml"),
    ),
    (
        "mesh-config.yaml",
        include_str!("../../manifests/templates/mesh-config.yaml"),
    ),
    (
        "injection-config.yaml",
        include_str!("../../manifests/templates/injection-config.yaml"),
    ),
    (
        "rbac.yaml",
        include_str!("../../manifests/templates/rbac.yaml"),
    ),
    (
        "meshd.yaml",
        include_str!("../../manifests/templates/meshd.yaml"),
    ),
    (
        "webhook.yaml",
        include_str!("../../manifests/templates/webhook.yaml"),
    ),
    (
        "webhook-tls.yaml",
        include_str!("../../manifests/templates/webhook-tls.yaml"),
    ),
    (
        "ingress-gateway.yaml",
        include_str!("../../manifests/templates/ingress-gateway.yaml"),
    ),
    (
        "gatewayclass.yaml",
        include_str!("../../manifests/templates/gatewayclass.yaml"),
    ),
];

/// One rendered object.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub component: Component,
    pub value: Value,
}

impl Object {
    pub fn api_version(&self) -> &str {
        self.value["apiVersion"].as_str().unwrap_or("")
    }
    pub fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    pub fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
    pub fn namespace(&self) -> Option<&str> {
        self.value["metadata"]["namespace"].as_str()
    }
    /// `Kind namespace/name` or `Kind name`.
    pub fn describe(&self) -> String {
        match self.namespace() {
            Some(ns) => format!("{} {ns}/{}", self.kind(), self.name()),
            None => format!("{} {}", self.kind(), self.name()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("template {template}: {message}")]
    Template { template: String, message: String },
}

#[derive(Serialize)]
struct TlsCtx {
    dns_names: Vec<String>,
    not_after: String,
    ca_crt: String,
    tls_crt: String,
    tls_key: String,
}

#[derive(Serialize)]
struct Ctx<'a> {
    namespace: &'static str,
    values: &'a MeshValues,
    meshctl_image: String,
    proxy_image: String,
    injection_config: String,
    webhook_url: Option<String>,
    ca_bundle: Option<String>,
    tls: Option<TlsCtx>,
    /// The ingress gateway's pod spec (see [`ingress_gateway_pod`]).
    ingress_gateway_pod: Value,
}

/// Apply order of a kind.
fn kind_rank(kind: &str) -> u8 {
    match kind {
        "CustomResourceDefinition" => 0,
        "Namespace" => 1,
        "ServiceAccount" => 2,
        "ClusterRole" | "Role" => 3,
        "ClusterRoleBinding" | "RoleBinding" => 4,
        "ConfigMap" | "Secret" => 5,
        "Service" => 6,
        "Deployment" => 7,
        "PodDisruptionBudget" => 8,
        "GatewayClass" => 9,
        "MutatingWebhookConfiguration" => 10,
        _ => 11,
    }
}

/// The installer's ingress gateway: `mesh-proxy run` on its bootstrap config (the ConfigMap
/// of the same name), listening on each Service port's target port.
fn ingress_gateway_pod(v: &MeshValues) -> Value {
    let gw = &v.components.ingress_gateway;
    let mut args = vec![
        "run".to_string(),
        "--config=/etc/mesh-proxy/config.yaml".into(),
    ];
    args.extend(
        gw.service
            .ports
            .iter()
            .filter(|p| p.port != p.target_port)
            .map(|p| format!("--listener-port={}={}", p.port, p.target_port)),
    );
    GatewayPod {
        service_account: gw.name.clone(),
        image: v.proxy_image(),
        image_pull_policy: Some(v.image_pull_policy.clone()),
        args,
        env: Vec::new(),
        ports: gw
            .service
            .ports
            .iter()
            .map(|p| serde_json::json!({"name": p.name, "containerPort": p.target_port}))
            .collect(),
        resources: Some(serde_json::to_value(&gw.resources).expect("resources serialize")),
        volumes: vec![GatewayVolume {
            name: "config".into(),
            mount_path: "/etc/mesh-proxy".into(),
            source: serde_json::json!({"configMap": {"name": gw.name}}),
        }],
        low_ports: false,
        automount_service_account_token: None,
    }
    .spec()
}

/// Render the objects for `resolved`. `tls`: the webhook certificate (install); `None`
/// (manifest generate) leaves the Secret out and the caBundle empty unless the values give one.
pub fn render(resolved: &Resolved, tls: Option<&WebhookTls>) -> Result<Vec<Object>, RenderError> {
    let v = &resolved.values;
    let injection = v.injection_config().map_err(|e| RenderError::Template {
        template: "injection-config.yaml".into(),
        message: e.to_string(),
    })?;
    let injection_yaml =
        serde_saphyr::to_string(&injection).map_err(|e| RenderError::Template {
            template: "injection-config.yaml".into(),
            message: e.to_string(),
        })?;
    let ca_bundle = if !v.webhook.ca_bundle.is_empty() {
        Some(certs::b64(&v.webhook.ca_bundle))
    } else {
        tls.map(|t| certs::b64(&t.ca_pem))
    };
    let ctx = Ctx {
        namespace: NAMESPACE,
        values: v,
        meshctl_image: v.meshctl_image(),
        proxy_image: v.proxy_image(),
        injection_config: injection_yaml,
        webhook_url: (v.webhook.mode == WebhookMode::Url).then(|| v.webhook.url.clone()),
        ca_bundle,
        ingress_gateway_pod: ingress_gateway_pod(v),
        tls: tls.map(|t| TlsCtx {
            dns_names: t.dns_names.clone(),
            not_after: t.not_after.clone(),
            ca_crt: certs::b64(&t.ca_pem),
            tls_crt: certs::b64(&t.cert_pem),
            tls_key: certs::b64(&t.key_pem),
        }),
    };
    let mut env = Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    for (name, src) in TEMPLATES {
        env.add_template(name, src)
            .map_err(|e| RenderError::Template {
                template: (*name).into(),
                message: e.to_string(),
            })?;
    }
    let c = &v.components;
    let mut wanted: Vec<(Component, &str)> = Vec::new();
    if c.base.enabled {
        wanted.push((Component::Base, "mesh-config.yaml"));
        wanted.push((Component::Base, "injection-config.yaml"));
    }
    if c.control_plane.enabled {
        wanted.push((Component::ControlPlane, "rbac.yaml"));
        wanted.push((Component::ControlPlane, "meshd.yaml"));
    }
    if c.ingress_gateway.enabled {
        wanted.push((Component::IngressGateway, "ingress-gateway.yaml"));
    }
    if v.gateway_api.enabled {
        wanted.push((Component::GatewayClass, "gatewayclass.yaml"));
    }
    if v.webhook.enabled {
        wanted.push((Component::Webhook, "webhook.yaml"));
        if tls.is_some() && v.webhook.ca_bundle.is_empty() {
            wanted.push((Component::Webhook, "webhook-tls.yaml"));
        }
    }
    // The namespace whenever something lives in it.
    if c.base.enabled || wanted.iter().any(|(_, t)| *t != "gatewayclass.yaml") {
        wanted.insert(0, (Component::Base, "namespace.yaml"));
    }

    let mut objects = Vec::new();
    if c.gateway_api_crds.enabled {
        for value in crds::parse(crds::GATEWAY_API) {
            objects.push(Object {
                component: Component::GatewayApiCrds,
                value,
            });
        }
    }
    if c.base.enabled {
        for value in crds::parse(crds::ISTIO) {
            objects.push(Object {
                component: Component::IstioCrds,
                value,
            });
        }
        for value in crds::parse(crds::OURS) {
            objects.push(Object {
                component: Component::Base,
                value,
            });
        }
    }
    for (component, name) in wanted {
        let text = env
            .get_template(name)
            .and_then(|t| t.render(&ctx))
            .map_err(|e| RenderError::Template {
                template: name.into(),
                message: e.to_string(),
            })?;
        let (_, docs) =
            crate::kube_yaml::parse_stream(&text).map_err(|e| RenderError::Template {
                template: name.into(),
                message: format!("rendered YAML: {e}"),
            })?;
        for d in docs {
            objects.push(Object {
                component,
                value: d.value,
            });
        }
    }
    for o in &mut objects {
        let labels = o.value["metadata"]
            .as_object_mut()
            .expect("objects have metadata")
            .entry("labels")
            .or_insert_with(|| Value::Object(Default::default()));
        let labels = labels.as_object_mut().expect("labels is a map");
        labels.insert(LABEL_OWNED_BY.into(), OWNER.into());
        labels.insert(LABEL_COMPONENT.into(), o.component.name().into());
        labels.insert(LABEL_PROFILE.into(), resolved.profile.clone().into());
    }
    objects.sort_by(|a, b| {
        (kind_rank(a.kind()), a.kind(), a.namespace(), a.name()).cmp(&(
            kind_rank(b.kind()),
            b.kind(),
            b.namespace(),
            b.name(),
        ))
    });
    Ok(objects)
}

/// The objects as one YAML stream (a header, then `---`-separated documents).
pub fn to_yaml(objects: &[Object]) -> String {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&format!("# {} ({})\n", o.describe(), o.component.name()));
        out.push_str(&serde_saphyr::to_string(&o.value).expect("objects render as YAML"));
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// The header of `manifest generate` output.
pub fn header(profile: &str) -> String {
    format!(
        "# meshctl manifest generate (profile {profile}).\n\
         # Not included: the webhook serving certificate (Secret mesh-system/meshd-webhook-tls)\n\
         # and the webhook's caBundle, which `meshctl install` creates; the Gateway API CRDs are\n\
         # applied by install only when the cluster lacks them.\n"
    )
}
