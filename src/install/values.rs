//! The typed, validated install values: what the merged profile's `spec` must be.
//!
//! The default profile sets every field; the merge result is deserialized into
//! [`MeshValues`] (unknown fields rejected), then [`MeshValues::validate`] checks what serde
//! cannot. Errors carry the field path; the caller adds the file or `--set` it came from.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::inject::InjectionConfig;
use crate::inject::config::Resources;

/// The mesh namespace (fixed by design).
pub const NAMESPACE: &str = "mesh-system";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshValues {
    pub hub: String,
    pub tag: String,
    pub image_pull_policy: String,
    pub components: Components,
    pub webhook: Webhook,
    pub mesh_config: MeshConfigValues,
    pub gateway_api: GatewayApi,
    /// Free-form overrides of the injection config, validated by [`InjectionConfig`].
    pub injection: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Components {
    pub base: Toggle,
    pub gateway_api_crds: Toggle,
    pub control_plane: ControlPlane,
    pub ingress_gateway: IngressGateway,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Toggle {
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControlPlane {
    pub enabled: bool,
    pub replicas: i32,
    pub log_level: String,
    pub resources: Resources,
    pub pod_disruption_budget: Toggle,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressGateway {
    pub enabled: bool,
    pub name: String,
    pub replicas: i32,
    pub service: GatewayService,
    pub resources: Resources,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayService {
    #[serde(rename = "type")]
    pub type_: ServiceType,
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Webhook {
    pub enabled: bool,
    pub mode: WebhookMode,
    pub url: String,
    pub ca_bundle: String,
    pub failure_policy: FailurePolicy,
    pub timeout_seconds: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum WebhookMode {
    Service,
    Url,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailurePolicy {
    Fail,
    Ignore,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfigValues {
    pub access_log_file: String,
    pub access_log_encoding: AccessLogEncoding,
    pub enable_tracing: bool,
    /// Istio's `meshConfig.pathNormalization`; unset: the proxies' default (`BASE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_normalization: Option<PathNormalizationValues>,
    /// Istio's `meshConfig.trustDomain`: workload identities are
    /// `spiffe://<trustDomain>/ns/<namespace>/sa/<service account>` (the control plane's
    /// `--trust-domain`).
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
}

fn default_trust_domain() -> String {
    mesh_config::identity::DEFAULT_TRUST_DOMAIN.to_string()
}

/// `meshConfig.pathNormalization` (`{normalization: BASE}`), passed to the control plane's
/// `--path-normalization`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathNormalizationValues {
    pub normalization: mesh_config::PathNormalization,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(clippy::upper_case_acronyms)]
pub enum AccessLogEncoding {
    TEXT,
    JSON,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayApi {
    pub enabled: bool,
    pub gateway_class_name: String,
    pub claim_istio_controller: bool,
}

/// A value that is wrong: the field path and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn bad(field: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_owned(),
        message: message.into(),
    }
}

fn check_resources(field: &str, r: &Resources) -> Result<(), FieldError> {
    for (k, v) in [
        ("requests.cpu", &r.requests.cpu),
        ("requests.memory", &r.requests.memory),
        ("limits.cpu", &r.limits.cpu),
        ("limits.memory", &r.limits.memory),
    ] {
        if let Some(q) = v
            && !crate::inject::parse::is_quantity(q)
        {
            return Err(bad(
                &format!("{field}.{k}"),
                format!("{q:?} is not a resource quantity"),
            ));
        }
    }
    Ok(())
}

impl MeshValues {
    /// Deserialize a merged `spec` (without `profile`), naming the field on error.
    pub fn from_value(v: Value) -> Result<Self, FieldError> {
        let mut values: MeshValues = serde_path_to_error::deserialize(v).map_err(|e| {
            let message = e.inner().to_string();
            let mut field = e.path().to_string();
            // Name the unknown key itself, so its source can be found.
            if let Some(k) = message
                .strip_prefix("unknown field `")
                .and_then(|r| r.split('`').next())
            {
                field = if field == "." {
                    k.to_owned()
                } else {
                    format!("{field}.{k}")
                };
            }
            FieldError { field, message }
        })?;
        if values.tag.is_empty() {
            values.tag = env!("CARGO_PKG_VERSION").to_owned();
        }
        values.validate()?;
        Ok(values)
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        if self.hub.is_empty() || self.hub.ends_with('/') || self.hub.contains(char::is_whitespace)
        {
            return Err(bad(
                "hub",
                format!("{:?} is not an image registry path", self.hub),
            ));
        }
        if self.tag.contains(['/', ':', ' ']) {
            return Err(bad("tag", format!("{:?} is not an image tag", self.tag)));
        }
        if !matches!(
            self.image_pull_policy.as_str(),
            "Always" | "IfNotPresent" | "Never"
        ) {
            return Err(bad(
                "imagePullPolicy",
                "must be Always, IfNotPresent or Never",
            ));
        }
        let cp = &self.components.control_plane;
        if !(0..=100).contains(&cp.replicas) {
            return Err(bad("components.controlPlane.replicas", "must be 0..=100"));
        }
        if !matches!(
            cp.log_level.as_str(),
            "trace" | "debug" | "info" | "warn" | "error"
        ) {
            return Err(bad(
                "components.controlPlane.logLevel",
                "must be trace, debug, info, warn or error",
            ));
        }
        check_resources("components.controlPlane.resources", &cp.resources)?;
        if let Err(e) = mesh_config::identity::check_trust_domain(&self.mesh_config.trust_domain) {
            return Err(bad("meshConfig.trustDomain", e.to_string()));
        }
        let gw = &self.components.ingress_gateway;
        if !mesh_config::is_dns_label(&gw.name) {
            return Err(bad(
                "components.ingressGateway.name",
                format!("{:?} is not a DNS label", gw.name),
            ));
        }
        if gw.name == "meshd" {
            return Err(bad("components.ingressGateway.name", "meshd is taken"));
        }
        if !(0..=100).contains(&gw.replicas) {
            return Err(bad("components.ingressGateway.replicas", "must be 0..=100"));
        }
        check_resources("components.ingressGateway.resources", &gw.resources)?;
        if gw.service.ports.is_empty() {
            return Err(bad("components.ingressGateway.service.ports", "is empty"));
        }
        for (i, p) in gw.service.ports.iter().enumerate() {
            let f = format!("components.ingressGateway.service.ports[{i}]");
            if !mesh_config::is_dns_label(&p.name) || p.name.len() > 15 {
                return Err(bad(
                    &format!("{f}.name"),
                    format!(
                        "{:?} is not a port name (DNS label, at most 15 characters)",
                        p.name
                    ),
                ));
            }
            if p.port == 0 || p.target_port == 0 {
                return Err(bad(&f, "ports must be non-zero"));
            }
            if let Some(np) = p.node_port {
                if gw.service.type_ == ServiceType::ClusterIP {
                    return Err(bad(
                        &format!("{f}.nodePort"),
                        "needs type NodePort or LoadBalancer",
                    ));
                }
                if !(30000..=32767).contains(&np) {
                    return Err(bad(&format!("{f}.nodePort"), "must be in 30000-32767"));
                }
            }
            for (j, q) in gw.service.ports[..i].iter().enumerate() {
                if q.name == p.name || q.port == p.port {
                    return Err(bad(&f, format!("same name or port as ports[{j}]")));
                }
            }
        }
        let wh = &self.webhook;
        if !(1..=30).contains(&wh.timeout_seconds) {
            return Err(bad("webhook.timeoutSeconds", "must be 1..=30"));
        }
        if wh.enabled {
            match wh.mode {
                WebhookMode::Service => {
                    if !cp.enabled {
                        return Err(bad(
                            "webhook.mode",
                            "service mode needs components.controlPlane.enabled (or use mode url)",
                        ));
                    }
                }
                WebhookMode::Url => {
                    url_host(&wh.url).map_err(|m| bad("webhook.url", m))?;
                }
            }
        }
        if !wh.ca_bundle.is_empty() && !wh.ca_bundle.contains("-----BEGIN CERTIFICATE-----") {
            return Err(bad("webhook.caBundle", "is not a PEM certificate"));
        }
        if !mesh_config::is_dns_subdomain(&self.gateway_api.gateway_class_name) {
            return Err(bad(
                "gatewayApi.gatewayClassName",
                format!(
                    "{:?} is not a DNS name",
                    self.gateway_api.gateway_class_name
                ),
            ));
        }
        self.injection_config()?;
        Ok(())
    }

    /// The sidecar injection config: defaults, then hub/tag/pull policy from these values,
    /// then `injection`.
    pub fn injection_config(&self) -> Result<InjectionConfig, FieldError> {
        let mut base = serde_json::to_value(InjectionConfig::default())
            .map_err(|e| bad("injection", e.to_string()))?;
        base["hub"] = self.hub.clone().into();
        base["tag"] = self.tag.clone().into();
        base["imagePullPolicy"] = self.image_pull_policy.clone().into();
        base["meshNamespace"] = NAMESPACE.into();
        base["controlPlaneAddress"] =
            format!("meshd.{NAMESPACE}.svc:{}", mesh_wire::ports::DISTRIBUTION).into();
        let mut prov = super::overlay::Provenance::default();
        super::overlay::merge(
            &mut base,
            Value::Object(self.injection.clone()),
            "injection",
            &mut prov,
        );
        InjectionConfig::from_value(base).map_err(|e| match e {
            crate::inject::config::ConfigError::Invalid { field, message } => {
                bad(&format!("injection.{field}"), message)
            }
            other => bad("injection", other.to_string()),
        })
    }

    pub fn meshctl_image(&self) -> String {
        format!("{}/meshctl:{}", self.hub, self.tag)
    }

    pub fn proxy_image(&self) -> String {
        format!("{}/mesh-proxy:{}", self.hub, self.tag)
    }
}

/// The host of an `https://host[:port]/path` URL.
pub fn url_host(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url:?}: must be an https:// URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err(format!("{url:?}: user info is not allowed"));
    }
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("").to_owned()
    } else {
        authority.split(':').next().unwrap_or("").to_owned()
    };
    if host.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    Ok(host)
}
