//! The injection configuration: everything the sidecar template needs.
//!
//! The same typed value drives `meshctl inject` (offline) and the admission webhook
//! (`meshctl control-plane`). The installer renders it as the ConfigMap
//! `mesh-system/mesh-sidecar-injector`, key `config`, holding YAML (or JSON) of this shape
//! (every field optional; missing fields take the default profile's value shown here):
//!
//! ```yaml
//! hub: ghcr.io/meshctl            # images are <hub>/mesh-proxy:<tag>
//! tag: 0.1.0                      # default: the meshctl version
//! imagePullPolicy: IfNotPresent
//! imagePullSecrets: []            # names of Secrets added to spec.imagePullSecrets
//! nativeSidecar: true             # proxy as an init container with restartPolicy: Always
//! holdApplicationUntilProxyStarts: false   # classic mode only; native mode always holds
//! rewriteAppHTTPProbe: true       # app probes go through the proxy's app-health port
//! controlPlaneAddress: meshd.mesh-system.svc:15012
//! meshNamespace: mesh-system      # never injected
//! skipNamespaces: [kube-system, kube-public, kube-node-lease]
//! namespaceLabels: [mesh-injection, istio-injection]   # first one set wins
//! defaultPolicy: disabled         # webhook: pods in unlabelled namespaces (enabled|disabled)
//! neverInjectSelector: []         # list of label selectors (matchLabels/matchExpressions)
//! alwaysInjectSelector: []
//! tokenAudience: meshctl          # audience of the projected service-account token
//! caRootConfigMap: mesh-ca-root-cert
//! proxy:
//!   image: null                   # full image reference; overrides hub/tag
//!   uid: 1337
//!   gid: 1337
//!   logLevel: info
//!   drainDuration: 5s
//!   ports: {outbound: 15001, inbound: 15006, admin: 15000, appHealth: 15020, readiness: 15021, metrics: 15090}
//!   resources:
//!     requests: {cpu: 100m, memory: 128Mi}
//!     limits: {cpu: 2000m, memory: 1Gi}
//!   readinessProbe: {initialDelaySeconds: 1, periodSeconds: 2, timeoutSeconds: 3, failureThreshold: 30}
//! init:
//!   resources:
//!     requests: {cpu: 10m, memory: 10Mi}
//!     limits: {cpu: 100m, memory: 50Mi}
//! traffic:
//!   includeInboundPorts: "*"
//!   excludeInboundPorts: ""       # the proxy's own ports are always excluded
//!   includeOutboundPorts: ""
//!   excludeOutboundPorts: ""
//!   includeOutboundIPRanges: "*"
//!   excludeOutboundIPRanges: ""
//! ```

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use mesh_wire::names::{PROXY_GID, PROXY_UID};
use mesh_wire::ports;
use serde::{Deserialize, Serialize};

/// Name of the ConfigMap the installer renders and the webhook reads.
pub const CONFIG_MAP_NAME: &str = "mesh-sidecar-injector";
/// Key inside that ConfigMap holding the YAML/JSON config.
pub const CONFIG_MAP_KEY: &str = "config";

/// Errors reading an injection config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("injection config: {0}")]
    Parse(String),
    #[error("injection config: field {field}: {message}")]
    Invalid { field: String, message: String },
    #[error("ConfigMap has no key {CONFIG_MAP_KEY:?} in data")]
    MissingKey,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct InjectionConfig {
    pub hub: String,
    pub tag: String,
    pub image_pull_policy: String,
    pub image_pull_secrets: Vec<String>,
    pub native_sidecar: bool,
    pub hold_application_until_proxy_starts: bool,
    /// Rewrite the app containers' HTTP, TCP and gRPC probes to the proxy's app-health port
    /// (Istio's `values.sidecarInjectorWebhook.rewriteAppHTTPProbe`); a pod's annotation
    /// `sidecar.meshctl.io/rewriteAppHTTPProbers` (or Istio's) wins.
    #[serde(rename = "rewriteAppHTTPProbe")]
    pub rewrite_app_http_probe: bool,
    pub control_plane_address: String,
    pub mesh_namespace: String,
    pub skip_namespaces: Vec<String>,
    pub namespace_labels: Vec<String>,
    pub default_policy: Policy,
    pub never_inject_selector: Vec<LabelSelector>,
    pub always_inject_selector: Vec<LabelSelector>,
    pub token_audience: String,
    pub ca_root_config_map: String,
    pub proxy: ProxyConfig,
    pub init: InitConfig,
    pub traffic: TrafficConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Policy {
    Enabled,
    Disabled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ProxyConfig {
    pub image: Option<String>,
    pub uid: i64,
    pub gid: i64,
    pub log_level: String,
    pub drain_duration: String,
    pub ports: ProxyPorts,
    pub resources: Resources,
    pub readiness_probe: ProbeConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ProxyPorts {
    pub outbound: u16,
    pub inbound: u16,
    pub admin: u16,
    /// App probes rewritten by injection (`/app-health/<container>/...`), all addresses.
    pub app_health: u16,
    pub readiness: u16,
    pub metrics: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Resources {
    pub requests: ResourceValues,
    pub limits: ResourceValues,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ResourceValues {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ProbeConfig {
    pub initial_delay_seconds: i32,
    pub period_seconds: i32,
    pub timeout_seconds: i32,
    pub failure_threshold: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct InitConfig {
    pub resources: Resources,
}

/// Traffic capture defaults; per-pod `traffic.sidecar.meshctl.io/*` annotations replace
/// the matching field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct TrafficConfig {
    pub include_inbound_ports: String,
    pub exclude_inbound_ports: String,
    pub include_outbound_ports: String,
    pub exclude_outbound_ports: String,
    #[serde(rename = "includeOutboundIPRanges")]
    pub include_outbound_ip_ranges: String,
    #[serde(rename = "excludeOutboundIPRanges")]
    pub exclude_outbound_ip_ranges: String,
}

fn s(v: &str) -> String {
    v.to_owned()
}

impl Default for InjectionConfig {
    fn default() -> Self {
        Self {
            hub: s("ghcr.io/meshctl"),
            tag: s(env!("CARGO_PKG_VERSION")),
            image_pull_policy: s("IfNotPresent"),
            image_pull_secrets: Vec::new(),
            native_sidecar: true,
            hold_application_until_proxy_starts: false,
            rewrite_app_http_probe: true,
            control_plane_address: format!("meshd.mesh-system.svc:{}", ports::DISTRIBUTION),
            mesh_namespace: s("mesh-system"),
            skip_namespaces: vec![s("kube-system"), s("kube-public"), s("kube-node-lease")],
            namespace_labels: vec![s("mesh-injection"), s("istio-injection")],
            default_policy: Policy::Disabled,
            never_inject_selector: Vec::new(),
            always_inject_selector: Vec::new(),
            token_audience: s("meshctl"),
            ca_root_config_map: s("mesh-ca-root-cert"),
            proxy: ProxyConfig::default(),
            init: InitConfig::default(),
            traffic: TrafficConfig::default(),
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            image: None,
            uid: PROXY_UID,
            gid: PROXY_GID,
            log_level: s("info"),
            drain_duration: s("5s"),
            ports: ProxyPorts::default(),
            resources: Resources {
                requests: ResourceValues {
                    cpu: Some(s("100m")),
                    memory: Some(s("128Mi")),
                },
                limits: ResourceValues {
                    cpu: Some(s("2000m")),
                    memory: Some(s("1Gi")),
                },
            },
            readiness_probe: ProbeConfig::default(),
        }
    }
}

impl Default for ProxyPorts {
    fn default() -> Self {
        Self {
            outbound: ports::SIDECAR_OUTBOUND,
            inbound: ports::SIDECAR_INBOUND,
            admin: ports::ADMIN,
            app_health: ports::APP_HEALTH,
            readiness: ports::READINESS,
            metrics: ports::METRICS,
        }
    }
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            initial_delay_seconds: 1,
            period_seconds: 2,
            timeout_seconds: 3,
            failure_threshold: 30,
        }
    }
}

impl Default for InitConfig {
    fn default() -> Self {
        Self {
            resources: Resources {
                requests: ResourceValues {
                    cpu: Some(s("10m")),
                    memory: Some(s("10Mi")),
                },
                limits: ResourceValues {
                    cpu: Some(s("100m")),
                    memory: Some(s("50Mi")),
                },
            },
        }
    }
}

impl Default for TrafficConfig {
    fn default() -> Self {
        Self {
            include_inbound_ports: s("*"),
            exclude_inbound_ports: String::new(),
            include_outbound_ports: String::new(),
            exclude_outbound_ports: String::new(),
            include_outbound_ip_ranges: s("*"),
            exclude_outbound_ip_ranges: String::new(),
        }
    }
}

impl InjectionConfig {
    /// Parse YAML (JSON is YAML too) into a config and validate it.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = if text.trim().is_empty() {
            Self::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read the config from a ConfigMap's `data` (key `config`).
    pub fn from_config_map_data(data: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let text = data.get(CONFIG_MAP_KEY).ok_or(ConfigError::MissingKey)?;
        Self::from_yaml(text)
    }

    /// Parse either a bare config document or a ConfigMap manifest carrying it.
    pub fn from_yaml_or_config_map(text: &str) -> Result<Self, ConfigError> {
        let value: serde_json::Value = if text.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?
        };
        if value.get("kind").and_then(|k| k.as_str()) == Some("ConfigMap") {
            let data: BTreeMap<String, String> = value
                .get("data")
                .cloned()
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| ConfigError::Parse(format!("ConfigMap data: {e}")))?
                .unwrap_or_default();
            return Self::from_config_map_data(&data);
        }
        Self::from_value(value)
    }

    /// Build from an already-parsed JSON value (e.g. after `--set` edits).
    pub fn from_value(value: serde_json::Value) -> Result<Self, ConfigError> {
        let cfg: Self = if value.is_null() {
            Self::default()
        } else {
            serde_path_to_error::deserialize(value).map_err(|e| ConfigError::Invalid {
                field: e.path().to_string(),
                message: e.inner().to_string(),
            })?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Apply `path.to.field=value` overrides (`--set`). The value is read as YAML unless
    /// the field currently holds a string, so `tag=1.0` stays a string.
    pub fn with_overrides(&self, sets: &[String]) -> Result<Self, ConfigError> {
        let mut root = serde_json::to_value(self).map_err(|e| ConfigError::Parse(e.to_string()))?;
        for set in sets {
            let (path, raw) = set.split_once('=').ok_or_else(|| ConfigError::Invalid {
                field: set.clone(),
                message: "expected path=value".into(),
            })?;
            let segs: Vec<&str> = path.split('.').collect();
            if segs.iter().any(|s| s.is_empty()) {
                return Err(ConfigError::Invalid {
                    field: path.into(),
                    message: "empty path segment".into(),
                });
            }
            let mut cur = &mut root;
            for seg in &segs[..segs.len() - 1] {
                let obj = cur.as_object_mut().ok_or_else(|| ConfigError::Invalid {
                    field: path.into(),
                    message: format!("{seg} is inside a non-mapping value"),
                })?;
                cur = obj
                    .entry(seg.to_string())
                    .or_insert_with(|| serde_json::Value::Object(Default::default()));
                if cur.is_null() {
                    *cur = serde_json::Value::Object(Default::default());
                }
            }
            let obj = cur.as_object_mut().ok_or_else(|| ConfigError::Invalid {
                field: path.into(),
                message: "parent is not a mapping".into(),
            })?;
            let last = segs[segs.len() - 1];
            let value = match obj.get(last) {
                Some(serde_json::Value::String(_)) => serde_json::Value::String(raw.to_owned()),
                _ => serde_saphyr::from_str::<serde_json::Value>(raw)
                    .unwrap_or_else(|_| serde_json::Value::String(raw.to_owned())),
            };
            obj.insert(last.to_owned(), value);
        }
        Self::from_value(root)
    }

    /// Checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            field: field.to_owned(),
            message,
        };
        if self.proxy.image.is_none() && (self.hub.is_empty() || self.tag.is_empty()) {
            return Err(invalid("hub", "hub and tag must be set".into()));
        }
        for (field, v) in [
            (
                "proxy.resources.requests.cpu",
                &self.proxy.resources.requests.cpu,
            ),
            (
                "proxy.resources.requests.memory",
                &self.proxy.resources.requests.memory,
            ),
            (
                "proxy.resources.limits.cpu",
                &self.proxy.resources.limits.cpu,
            ),
            (
                "proxy.resources.limits.memory",
                &self.proxy.resources.limits.memory,
            ),
            (
                "init.resources.requests.cpu",
                &self.init.resources.requests.cpu,
            ),
            (
                "init.resources.requests.memory",
                &self.init.resources.requests.memory,
            ),
            ("init.resources.limits.cpu", &self.init.resources.limits.cpu),
            (
                "init.resources.limits.memory",
                &self.init.resources.limits.memory,
            ),
        ] {
            if let Some(q) = v
                && !super::parse::is_quantity(q)
            {
                return Err(invalid(field, format!("{q:?} is not a resource quantity")));
            }
        }
        let p = self.proxy.ports;
        let mut ports = [
            p.outbound,
            p.inbound,
            p.admin,
            p.app_health,
            p.readiness,
            p.metrics,
        ];
        ports.sort_unstable();
        if ports.windows(2).any(|w| w[0] == w[1]) || ports[0] == 0 {
            return Err(invalid(
                "proxy.ports",
                "ports must be distinct and non-zero".into(),
            ));
        }
        let t = &self.traffic;
        for (field, v, ranges) in [
            (
                "traffic.includeInboundPorts",
                &t.include_inbound_ports,
                false,
            ),
            (
                "traffic.excludeInboundPorts",
                &t.exclude_inbound_ports,
                false,
            ),
            (
                "traffic.includeOutboundPorts",
                &t.include_outbound_ports,
                false,
            ),
            (
                "traffic.excludeOutboundPorts",
                &t.exclude_outbound_ports,
                false,
            ),
            (
                "traffic.includeOutboundIPRanges",
                &t.include_outbound_ip_ranges,
                true,
            ),
            (
                "traffic.excludeOutboundIPRanges",
                &t.exclude_outbound_ip_ranges,
                true,
            ),
        ] {
            let r = if ranges {
                super::redirect::IpRanges::parse(v).map(|_| ())
            } else {
                super::redirect::PortSet::parse(v).map(|_| ())
            };
            r.map_err(|m| invalid(field, m))?;
        }
        mesh_config::parse_duration(&self.proxy.drain_duration)
            .map_err(|m| invalid("proxy.drainDuration", m))?;
        for (i, sel) in self
            .never_inject_selector
            .iter()
            .chain(&self.always_inject_selector)
            .enumerate()
        {
            super::parse::validate_selector(sel)
                .map_err(|m| invalid(&format!("selector[{i}]"), m))?;
        }
        Ok(())
    }

    /// `<hub>/mesh-proxy:<tag>` unless `proxy.image` is set.
    pub fn proxy_image(&self) -> String {
        match &self.proxy.image {
            Some(i) => i.clone(),
            None => format!("{}/mesh-proxy:{}", self.hub, self.tag),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_round_trips_and_partial_config_fills_defaults() {
        let d = InjectionConfig::default();
        let y = serde_saphyr::to_string(&d).unwrap();
        assert_eq!(InjectionConfig::from_yaml(&y).unwrap(), d);
        let c = InjectionConfig::from_yaml("hub: example.com/x\nproxy:\n  uid: 1500\n").unwrap();
        assert_eq!(c.hub, "example.com/x");
        assert_eq!(c.proxy.uid, 1500);
        assert_eq!(c.proxy.ports.inbound, 15006);
        assert_eq!(
            c.proxy_image(),
            format!("example.com/x/mesh-proxy:{}", d.tag)
        );
    }

    #[test]
    fn set_overrides() {
        let c = InjectionConfig::default()
            .with_overrides(&[
                "tag=1.0".into(),
                "nativeSidecar=false".into(),
                "proxy.ports.inbound=16006".into(),
                "proxy.image=reg/x:1".into(),
                "imagePullSecrets=[a, b]".into(),
            ])
            .unwrap();
        assert_eq!(c.tag, "1.0");
        assert!(!c.native_sidecar);
        assert_eq!(c.proxy.ports.inbound, 16006);
        assert_eq!(c.proxy_image(), "reg/x:1");
        assert_eq!(c.image_pull_secrets, ["a", "b"]);
        let e = InjectionConfig::default()
            .with_overrides(&["proxy.nope=1".into()])
            .unwrap_err();
        assert!(e.to_string().contains("proxy.nope"), "{e}");
        assert!(
            InjectionConfig::default()
                .with_overrides(&["x".into()])
                .is_err()
        );
    }

    #[test]
    fn config_map_and_errors() {
        let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: mesh-sidecar-injector}\ndata:\n  config: |\n    nativeSidecar: false\n";
        assert!(
            !InjectionConfig::from_yaml_or_config_map(cm)
                .unwrap()
                .native_sidecar
        );
        let err = InjectionConfig::from_yaml("bogus: 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
        let err = InjectionConfig::from_yaml("traffic:\n  excludeOutboundPorts: abc\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("traffic.excludeOutboundPorts"), "{err}");
        let err = InjectionConfig::from_yaml("proxy:\n  resources:\n    limits: {cpu: lots}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("proxy.resources.limits.cpu"), "{err}");
    }
}
