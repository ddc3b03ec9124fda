//! What gets injected: the `mesh-init` and `mesh-proxy` containers, volumes, labels and
//! annotations, all from [`InjectionConfig`] plus per-pod annotation overrides.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, ExecAction, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    Probe, ProjectedVolumeSource, ResourceRequirements, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use mesh_wire::names::{ENV_CA_ROOT_PATH, ENV_CONTROL_PLANE, ENV_TOKEN_PATH};

use super::InjectError;
use super::config::{InjectionConfig, ResourceValues};
use super::parse::{is_quantity, parse_flag};
use super::redirect::{IpRanges, PortSet, RedirectSpec};

pub use mesh_wire::names::{INIT_CONTAINER as INIT_NAME, PROXY_CONTAINER as PROXY_NAME};
pub const TOKEN_VOLUME: &str = "mesh-token";
pub const CA_VOLUME: &str = "mesh-ca-root";
pub const DATA_VOLUME: &str = "mesh-data";
pub const TOKEN_DIR: &str = "/var/run/secrets/tokens";
pub const TOKEN_FILE: &str = "mesh-token";
pub const CA_DIR: &str = "/var/run/secrets/meshctl/ca";
pub const CA_FILE: &str = "root-cert.pem";
pub const DATA_DIR: &str = "/var/lib/mesh-proxy";
pub use mesh_wire::names::MESHED_POD_LABEL as TLS_MODE_LABEL;
pub const METRICS_PATH: &str = "/metrics";
pub const READY_PATH: &str = "/ready";
pub const TOKEN_EXPIRATION_SECONDS: i64 = 43200;

/// Value of the pod annotation `sidecar.meshctl.io/<name>`, falling back to
/// `sidecar.istio.io/<name>`; returns the key actually used.
pub fn annotation<'a>(
    ann: &'a BTreeMap<String, String>,
    prefix: &str,
    name: &str,
) -> Option<(String, &'a str)> {
    [
        format!("{prefix}.meshctl.io/{name}"),
        format!("{prefix}.istio.io/{name}"),
    ]
    .into_iter()
    .find_map(|k| ann.get(&k).map(|v| (k, v.as_str())))
}

fn sidecar_ann<'a>(ann: &'a BTreeMap<String, String>, name: &str) -> Option<(String, &'a str)> {
    annotation(ann, "sidecar", name)
}

fn bad(key: String, message: impl Into<String>) -> InjectError {
    InjectError::Annotation {
        key,
        message: message.into(),
    }
}

/// The effective traffic-capture spec for a pod.
pub fn redirect_spec(
    cfg: &InjectionConfig,
    ann: &BTreeMap<String, String>,
) -> Result<RedirectSpec, InjectError> {
    let t = &cfg.traffic;
    let ports = |name: &str, default: &str| -> Result<PortSet, InjectError> {
        match annotation(ann, "traffic.sidecar", name) {
            Some((k, v)) => PortSet::parse(v).map_err(|m| bad(k, m)),
            None => PortSet::parse(default).map_err(|m| bad(format!("traffic.{name}"), m)),
        }
    };
    let ranges = |name: &str, default: &str| -> Result<IpRanges, InjectError> {
        match annotation(ann, "traffic.sidecar", name) {
            Some((k, v)) => IpRanges::parse(v).map_err(|m| bad(k, m)),
            None => IpRanges::parse(default).map_err(|m| bad(format!("traffic.{name}"), m)),
        }
    };
    let p = cfg.proxy.ports;
    let mut exclude_inbound = ports("excludeInboundPorts", &t.exclude_inbound_ports)?;
    if let PortSet::List(l) = &mut exclude_inbound {
        l.extend([p.admin, p.app_health, p.readiness, p.metrics]);
    }
    Ok(RedirectSpec {
        proxy_uid: cfg.proxy.uid,
        proxy_gid: cfg.proxy.gid,
        inbound_port: p.inbound,
        outbound_port: p.outbound,
        include_inbound_ports: ports("includeInboundPorts", &t.include_inbound_ports)?,
        exclude_inbound_ports: exclude_inbound,
        include_outbound_ports: ports("includeOutboundPorts", &t.include_outbound_ports)?,
        exclude_outbound_ports: ports("excludeOutboundPorts", &t.exclude_outbound_ports)?,
        include_outbound_ip_ranges: ranges(
            "includeOutboundIPRanges",
            &t.include_outbound_ip_ranges,
        )?,
        exclude_outbound_ip_ranges: ranges(
            "excludeOutboundIPRanges",
            &t.exclude_outbound_ip_ranges,
        )?,
    })
}

/// Per-pod choices derived from config + annotations, validated.
#[derive(Debug, Clone)]
pub struct PodOptions {
    pub native: bool,
    pub hold: bool,
    pub image: String,
    pub log_level: String,
    pub resources: ResourceRequirements,
    pub redirect: RedirectSpec,
}

pub fn pod_options(
    cfg: &InjectionConfig,
    ann: &BTreeMap<String, String>,
) -> Result<PodOptions, InjectError> {
    let flag = |name: &str, default: bool| -> Result<bool, InjectError> {
        match sidecar_ann(ann, name) {
            Some((k, v)) => parse_flag(v).ok_or_else(|| bad(k, format!("{v:?} is not true/false"))),
            None => Ok(default),
        }
    };
    let native = flag("nativeSidecar", cfg.native_sidecar)?;
    let hold = flag(
        "holdApplicationUntilProxyStarts",
        cfg.hold_application_until_proxy_starts,
    )?;
    let image = match sidecar_ann(ann, "proxyImage") {
        Some((k, v)) if v.trim().is_empty() || v.contains(char::is_whitespace) => {
            return Err(bad(k, "not an image reference"));
        }
        Some((_, v)) => v.to_owned(),
        None => cfg.proxy_image(),
    };
    let log_level = match sidecar_ann(ann, "logLevel") {
        Some((k, v)) => {
            const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
            if !LEVELS.contains(&v) {
                return Err(bad(k, format!("{v:?} is not one of {}", LEVELS.join(", "))));
            }
            v.to_owned()
        }
        None => cfg.proxy.log_level.clone(),
    };
    let mut r = cfg.proxy.resources.clone();
    for (name, slot) in [
        ("proxyCPU", &mut r.requests.cpu),
        ("proxyMemory", &mut r.requests.memory),
        ("proxyCPULimit", &mut r.limits.cpu),
        ("proxyMemoryLimit", &mut r.limits.memory),
    ] {
        if let Some((k, v)) = sidecar_ann(ann, name) {
            if !is_quantity(v) {
                return Err(bad(k, format!("{v:?} is not a resource quantity")));
            }
            *slot = Some(v.to_owned());
        }
    }
    Ok(PodOptions {
        native,
        hold,
        image,
        log_level,
        resources: resources(&r.requests, &r.limits),
        redirect: redirect_spec(cfg, ann)?,
    })
}

fn resources(requests: &ResourceValues, limits: &ResourceValues) -> ResourceRequirements {
    let map = |v: &ResourceValues| {
        let m: BTreeMap<String, Quantity> = [("cpu", &v.cpu), ("memory", &v.memory)]
            .into_iter()
            .filter_map(|(k, q)| q.as_ref().map(|q| (k.to_owned(), Quantity(q.clone()))))
            .collect();
        (!m.is_empty()).then_some(m)
    };
    ResourceRequirements {
        requests: map(requests),
        limits: map(limits),
        ..Default::default()
    }
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// The `mesh-init` init container.
pub fn init_container(cfg: &InjectionConfig, o: &PodOptions) -> Container {
    let r = &cfg.init.resources;
    Container {
        name: INIT_NAME.into(),
        image: Some(o.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        args: Some(o.redirect.args()),
        resources: Some(resources(&r.requests, &r.limits)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            capabilities: Some(Capabilities {
                add: Some(strs(&["NET_ADMIN", "NET_RAW"])),
                drop: Some(strs(&["ALL"])),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..Default::default()
        }),
        value: None,
    }
}

fn value_env(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    }
}

fn http_probe(port: u16, p: (i32, i32, i32, i32)) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(READY_PATH.into()),
            port: IntOrString::Int(port.into()),
            ..Default::default()
        }),
        initial_delay_seconds: Some(p.0),
        period_seconds: Some(p.1),
        timeout_seconds: Some(p.2),
        failure_threshold: Some(p.3),
        ..Default::default()
    }
}

/// The `mesh-proxy` sidecar container (native: goes into initContainers).
pub fn proxy_container(cfg: &InjectionConfig, o: &PodOptions) -> Container {
    let ports = cfg.proxy.ports;
    let rp = cfg.proxy.readiness_probe;
    let args = vec![
        "sidecar".to_owned(),
        "--inbound-port".into(),
        ports.inbound.to_string(),
        "--outbound-port".into(),
        ports.outbound.to_string(),
        "--admin-port".into(),
        ports.admin.to_string(),
        "--app-health-port".into(),
        ports.app_health.to_string(),
        "--readiness-port".into(),
        ports.readiness.to_string(),
        "--metrics-port".into(),
        ports.metrics.to_string(),
        "--log-level".into(),
        o.log_level.clone(),
        "--drain-duration".into(),
        cfg.proxy.drain_duration.clone(),
    ];
    let mut c = Container {
        name: PROXY_NAME.into(),
        image: Some(o.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        args: Some(args),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("POD_IP", "status.podIP"),
            field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            field_env("NODE_NAME", "spec.nodeName"),
            value_env(ENV_CONTROL_PLANE, cfg.control_plane_address.clone()),
            value_env(ENV_TOKEN_PATH, format!("{TOKEN_DIR}/{TOKEN_FILE}")),
            value_env(ENV_CA_ROOT_PATH, format!("{CA_DIR}/{CA_FILE}")),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("mesh-metrics".into()),
                container_port: ports.metrics.into(),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("mesh-health".into()),
                container_port: ports.readiness.into(),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        readiness_probe: Some(http_probe(
            ports.readiness,
            (
                rp.initial_delay_seconds,
                rp.period_seconds,
                rp.timeout_seconds,
                rp.failure_threshold,
            ),
        )),
        resources: Some(o.resources.clone()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_user: Some(cfg.proxy.uid),
            run_as_group: Some(cfg.proxy.gid),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(strs(&["ALL"])),
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: TOKEN_VOLUME.into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: CA_VOLUME.into(),
                mount_path: CA_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: DATA_VOLUME.into(),
                mount_path: DATA_DIR.into(),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    if o.native {
        c.restart_policy = Some("Always".into());
        // Native sidecars block the following containers until started.
        c.startup_probe = Some(http_probe(ports.readiness, (0, 1, 3, 600)));
    } else if o.hold {
        c.lifecycle = Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "mesh-proxy".into(),
                        "wait".into(),
                        "--readiness-port".into(),
                        ports.readiness.to_string(),
                        "--timeout".into(),
                        "60s".into(),
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    c
}

/// The volumes the proxy mounts.
pub fn volumes(cfg: &InjectionConfig) -> Vec<Volume> {
    vec![
        Volume {
            name: TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(cfg.token_audience.clone()),
                        expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                        path: TOKEN_FILE.into(),
                    }),
                    ..Default::default()
                }]),
                default_mode: None,
            }),
            ..Default::default()
        },
        Volume {
            name: CA_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: cfg.ca_root_config_map.clone(),
                optional: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: DATA_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    ]
}

/// Annotations added when absent (the pod's own value always wins).
pub fn default_annotations(
    cfg: &InjectionConfig,
    first_app_container: Option<&str>,
) -> Vec<(String, String)> {
    let mut v = Vec::new();
    if let Some(c) = first_app_container {
        v.push((
            "kubectl.kubernetes.io/default-container".into(),
            c.to_owned(),
        ));
        v.push((
            "kubectl.kubernetes.io/default-logs-container".into(),
            c.to_owned(),
        ));
    }
    v.push(("prometheus.io/scrape".into(), "true".into()));
    v.push((
        "prometheus.io/port".into(),
        cfg.proxy.ports.metrics.to_string(),
    ));
    v.push(("prometheus.io/path".into(), METRICS_PATH.into()));
    v
}
