//! The injection core: pure functions from (pod template, namespace, config) to
//! (mutated pod template, decision). No I/O here; `meshctl inject` and the webhook both
//! call [`inject_template`] (through [`workload`]).

pub mod config;
pub mod decision;
pub mod parse;
pub mod patch;
pub mod probes;
pub mod redirect;
pub mod template;
pub mod workload;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{LocalObjectReference, PodSpec, PodTemplateSpec};
use serde::{Deserialize, Serialize};

pub use config::InjectionConfig;
pub use decision::{Decision, Mode, NamespaceInfo, Reason, decide};

/// Annotation recording what an injection added, so it can be undone exactly.
pub use mesh_wire::names::STATUS_ANNOTATION;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    #[error("annotation {key}: {message}")]
    Annotation { key: String, message: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

/// The value of [`STATUS_ANNOTATION`] (JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Status {
    pub version: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub init_containers: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub annotations: Vec<String>,
    /// The app probes rewritten to the proxy's app-health port, with their original
    /// handlers ([`probes::Originals`]).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub probes: probes::Originals,
}

/// Result of running the core on one pod template.
#[derive(Debug, Clone)]
pub struct Injected {
    pub template: PodTemplateSpec,
    pub decision: Decision,
}

/// Undo a previous injection, driven by the status annotation. Also removes containers
/// carrying our fixed names so an injection can never duplicate them.
pub fn strip(tpl: &mut PodTemplateSpec) {
    let status: Status = tpl
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(STATUS_ANNOTATION))
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    let ours = |list: &[String], name: &str| list.iter().any(|n| n == name);
    let fixed = [template::INIT_NAME, template::PROXY_NAME];
    if let Some(spec) = tpl.spec.as_mut() {
        probes::restore(&mut spec.containers, &status.probes);
        spec.containers
            .retain(|c| !ours(&status.containers, &c.name) && !fixed.contains(&c.name.as_str()));
        if let Some(ic) = spec.init_containers.as_mut() {
            ic.retain(|c| {
                !ours(&status.init_containers, &c.name) && !fixed.contains(&c.name.as_str())
            });
        }
        if let Some(v) = spec.volumes.as_mut() {
            v.retain(|v| !ours(&status.volumes, &v.name));
        }
        if let Some(s) = spec.image_pull_secrets.as_mut() {
            s.retain(|s| !ours(&status.image_pull_secrets, &s.name));
        }
        none_if_empty(&mut spec.init_containers);
        none_if_empty(&mut spec.volumes);
        none_if_empty(&mut spec.image_pull_secrets);
    }
    if let Some(m) = tpl.metadata.as_mut() {
        if let Some(l) = m.labels.as_mut() {
            l.retain(|k, _| !ours(&status.labels, k));
        }
        if let Some(a) = m.annotations.as_mut() {
            a.retain(|k, _| !ours(&status.annotations, k) && k != STATUS_ANNOTATION);
        }
        none_if_empty_map(&mut m.labels);
        none_if_empty_map(&mut m.annotations);
    }
}

fn none_if_empty<T>(v: &mut Option<Vec<T>>) {
    if v.as_ref().is_some_and(Vec::is_empty) {
        *v = None;
    }
}

fn none_if_empty_map(v: &mut Option<BTreeMap<String, String>>) {
    if v.as_ref().is_some_and(BTreeMap::is_empty) {
        *v = None;
    }
}

/// Decide and, if the answer is yes, inject. A previous injection is stripped first, so
/// injecting an injected template gives the same template.
pub fn inject_template(
    tpl: &PodTemplateSpec,
    ns: &NamespaceInfo,
    cfg: &InjectionConfig,
    mode: Mode,
) -> Result<Injected, InjectError> {
    let mut out = tpl.clone();
    strip(&mut out);
    let decision = decide(&out, ns, cfg, mode);
    if !decision.inject {
        return Ok(Injected {
            template: tpl.clone(),
            decision,
        });
    }
    if !carries_status(tpl)
        && let Some(e) = reserved_name_clash(tpl)
    {
        return Err(e);
    }
    let Some(spec) = out.spec.as_mut() else {
        return Err(InjectError::Invalid {
            field: "spec".into(),
            message: "missing".into(),
        });
    };
    if spec.containers.is_empty() {
        return Err(InjectError::Invalid {
            field: "spec.containers".into(),
            message: "a pod needs at least one container".into(),
        });
    }
    let meta = out.metadata.get_or_insert_with(Default::default);
    let annotations = meta.annotations.clone().unwrap_or_default();
    let opts = template::pod_options(cfg, &annotations)?;

    let mut status = Status {
        version: 1,
        ..Default::default()
    };
    let init = template::init_container(cfg, &opts);
    let mut proxy = template::proxy_container(cfg, &opts);
    // App probes go through the proxy (before the proxy joins the containers).
    let rewritten = probes::rewrite_pod(cfg, &annotations, &mut spec.containers)?;
    if let Some(env) = probes::env(&rewritten.probers) {
        proxy.env.get_or_insert_with(Vec::new).push(env);
    }
    status.probes = rewritten.originals;
    let first_app = spec.containers.first().map(|c| c.name.clone());

    // Containers.
    let inits = spec.init_containers.get_or_insert_with(Vec::new);
    if opts.native {
        // Redirect first, then the proxy, then the pod's own init containers (which then
        // have a working proxy).
        status.init_containers = vec![init.name.clone(), proxy.name.clone()];
        inits.splice(0..0, [init, proxy]);
    } else {
        // Classic: redirect last so the pod's own init containers keep plain networking.
        status.init_containers = vec![init.name.clone()];
        status.containers = vec![proxy.name.clone()];
        inits.push(init);
        if opts.hold {
            spec.containers.insert(0, proxy);
        } else {
            spec.containers.push(proxy);
        }
    }

    // Volumes. One of ours left by an earlier injection whose status did not list it is
    // replaced (an app's own volume with our name was refused above).
    let vols = template::volumes(cfg);
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.retain(|v| !vols.iter().any(|o| o.name == v.name));
    status.volumes = vols.iter().map(|v| v.name.clone()).collect();
    volumes.extend(vols);

    // Pull secrets (only those not already listed).
    if !cfg.image_pull_secrets.is_empty() {
        let secrets = spec.image_pull_secrets.get_or_insert_with(Vec::new);
        for s in &cfg.image_pull_secrets {
            if !secrets.iter().any(|x| &x.name == s) {
                secrets.push(LocalObjectReference { name: s.clone() });
                status.image_pull_secrets.push(s.clone());
            }
        }
    }
    normalize_spec(spec);

    // Labels and annotations: only add what is absent, record what we added.
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    if !labels.contains_key(template::TLS_MODE_LABEL) {
        labels.insert(
            template::TLS_MODE_LABEL.into(),
            mesh_wire::names::MESHED_POD_LABEL_VALUE.into(),
        );
        status.labels.push(template::TLS_MODE_LABEL.into());
    }
    let ann = meta.annotations.get_or_insert_with(BTreeMap::new);
    let user_prometheus = ann.keys().any(|k| k.starts_with("prometheus.io/"));
    for (k, v) in template::default_annotations(cfg, first_app.as_deref()) {
        if ann.contains_key(&k) || (user_prometheus && k.starts_with("prometheus.io/")) {
            continue;
        }
        ann.insert(k.clone(), v);
        status.annotations.push(k);
    }
    let status_json = serde_json::to_string(&status).map_err(|e| InjectError::Invalid {
        field: STATUS_ANNOTATION.into(),
        message: e.to_string(),
    })?;
    ann.insert(STATUS_ANNOTATION.into(), status_json);

    Ok(Injected {
        template: out,
        decision,
    })
}

/// Whether the template records an injection of ours: its containers and volumes with our
/// names are then ours, and are replaced.
fn carries_status(tpl: &PodTemplateSpec) -> bool {
    tpl.metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .is_some_and(|a| a.contains_key(STATUS_ANNOTATION))
}

/// The names of what the injector adds, and what each one is.
const RESERVED_CONTAINERS: [(&str, &str); 2] = [
    (
        template::INIT_NAME,
        "the init container that redirects the pod's traffic",
    ),
    (template::PROXY_NAME, "the sidecar proxy container"),
];
const RESERVED_VOLUMES: [(&str, &str); 3] = [
    (
        template::TOKEN_VOLUME,
        "the proxy's service-account token volume",
    ),
    (template::CA_VOLUME, "the proxy's CA root volume"),
    (template::DATA_VOLUME, "the proxy's data volume"),
];

/// An app's container or volume named like one the injector adds would be replaced by ours
/// (the app silently gone, or its mount pointing at our volume): refused, naming the
/// field. Only for templates that do not record an injection of ours.
fn reserved_name_clash(tpl: &PodTemplateSpec) -> Option<InjectError> {
    let spec = tpl.spec.as_ref()?;
    let clash = |field: String, name: &str, what: &str, reserved: &[(&str, &str)]| {
        reserved
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(n, role)| InjectError::Invalid {
                field,
                message: format!(
                    "{what} name {n:?} is reserved: the sidecar injector adds {role} under that \
                     name, which would replace this {what}; rename it, or opt the pod out of \
                     injection (label sidecar.meshctl.io/inject: \"false\")"
                ),
            })
    };
    let containers = [
        (
            "initContainers",
            spec.init_containers.as_deref().unwrap_or(&[]),
        ),
        ("containers", &spec.containers[..]),
    ];
    for (list, items) in containers {
        for (i, c) in items.iter().enumerate() {
            let field = format!("spec.{list}[{i}].name");
            if let Some(e) = clash(field, &c.name, "container", &RESERVED_CONTAINERS) {
                return Some(e);
            }
        }
    }
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        let field = format!("spec.volumes[{i}].name");
        if let Some(e) = clash(field, &v.name, "volume", &RESERVED_VOLUMES) {
            return Some(e);
        }
    }
    None
}

fn normalize_spec(spec: &mut PodSpec) {
    none_if_empty(&mut spec.init_containers);
    none_if_empty(&mut spec.volumes);
    none_if_empty(&mut spec.image_pull_secrets);
}

#[cfg(test)]
mod tests;
