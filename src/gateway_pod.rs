//! The pod of a gateway proxy (`mesh-proxy run`), built in one place for both gateways meshctl
//! runs: the installer's ingress gateway (`manifests/templates/ingress-gateway.yaml`) and the
//! Deployments the control plane makes for Gateways (`controlplane::gateways`). What makes the
//! pod safe to run is the builder's, not the caller's: non-root as the proxy's uid/gid, the
//! runtime's default seccomp profile, no privilege escalation, a read-only root filesystem, no
//! capabilities, and the readiness probe on the proxy's readiness port.

use mesh_wire::names::{PROXY_CONTAINER, PROXY_GID, PROXY_UID};
use mesh_wire::ports;
use serde_json::{Value, json};

/// A volume the proxy mounts read-only.
#[derive(Debug, Clone)]
pub struct GatewayVolume {
    pub name: String,
    pub mount_path: String,
    /// The volume's source, e.g. `{"configMap": {"name": "x"}}`.
    pub source: Value,
}

/// What differs between the two gateways; the rest is [`GatewayPod::spec`]'s.
#[derive(Debug, Clone, Default)]
pub struct GatewayPod {
    pub service_account: String,
    pub image: String,
    pub image_pull_policy: Option<String>,
    pub args: Vec<String>,
    /// Container environment entries (`{"name": ..., "value"/"valueFrom": ...}`).
    pub env: Vec<Value>,
    /// Container ports (`{"containerPort": ..., ...}`).
    pub ports: Vec<Value>,
    pub resources: Option<Value>,
    pub volumes: Vec<GatewayVolume>,
    /// Listens on ports below 1024 as a non-root user (`net.ipv4.ip_unprivileged_port_start`).
    pub low_ports: bool,
    /// `automountServiceAccountToken` (`None`: the cluster's default).
    pub automount_service_account_token: Option<bool>,
}

impl GatewayPod {
    /// The pod spec (`spec.template.spec` of the Deployment).
    pub fn spec(&self) -> Value {
        let mut security = json!({
            "runAsNonRoot": true,
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_GID,
            "seccompProfile": {"type": "RuntimeDefault"},
        });
        if self.low_ports {
            security["sysctls"] =
                json!([{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]);
        }
        let mut container = json!({
            "name": PROXY_CONTAINER,
            "image": self.image,
            "args": self.args,
            "ports": self.ports,
            "readinessProbe": {
                "httpGet": {"path": "/ready", "port": ports::READINESS},
                "periodSeconds": 2,
            },
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": self.volumes.iter().map(|v| json!({
                "name": v.name, "mountPath": v.mount_path, "readOnly": true,
            })).collect::<Vec<_>>(),
        });
        if let Some(p) = &self.image_pull_policy {
            container["imagePullPolicy"] = json!(p);
        }
        if !self.env.is_empty() {
            container["env"] = json!(self.env);
        }
        if let Some(r) = &self.resources {
            container["resources"] = r.clone();
        }
        let volumes: Vec<Value> = self
            .volumes
            .iter()
            .map(|v| {
                let mut out = v.source.clone();
                out["name"] = json!(v.name);
                out
            })
            .collect();
        let mut spec = json!({
            "serviceAccountName": self.service_account,
            "securityContext": security,
            "containers": [container],
            "volumes": volumes,
        });
        if let Some(a) = self.automount_service_account_token {
            spec["automountServiceAccountToken"] = json!(a);
        }
        spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_gateway_pod_is_hardened_the_same_way() {
        let plain = GatewayPod {
            service_account: "gw".into(),
            image: "example.com/mesh-proxy:1".into(),
            ..Default::default()
        }
        .spec();
        let low = GatewayPod {
            low_ports: true,
            ..Default::default()
        }
        .spec();
        for spec in [&plain, &low] {
            let pod = &spec["securityContext"];
            assert_eq!(pod["seccompProfile"]["type"], "RuntimeDefault");
            assert_eq!(pod["runAsNonRoot"], true);
            assert_eq!(pod["runAsUser"], PROXY_UID);
            let c = &spec["containers"][0]["securityContext"];
            assert_eq!(c["allowPrivilegeEscalation"], false);
            assert_eq!(c["readOnlyRootFilesystem"], true);
            assert_eq!(c["capabilities"]["drop"], json!(["ALL"]));
        }
        assert!(plain["securityContext"].get("sysctls").is_none());
        assert_eq!(
            low["securityContext"]["sysctls"][0]["name"],
            "net.ipv4.ip_unprivileged_port_start"
        );
    }
}
