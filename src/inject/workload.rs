//! Kubernetes objects as JSON values: find the pod template of each workload kind,
//! validate it into typed values, run the core, and write the result back without
//! losing anything the core did not touch (user containers are kept byte-for-byte as
//! they came, including fields our types might not know).

use k8s_openapi::api::core::v1::PodTemplateSpec;
use serde::Serialize;
use serde_json::{Map, Value};

use super::{Decision, InjectError, InjectionConfig, Mode, NamespaceInfo, inject_template};

/// An error in one document, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Dotted path from the document root, e.g. `spec.template.spec.containers[0].name`.
    pub field: String,
    pub message: String,
}

fn ferr(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// What happened to one pod template inside a document.
#[derive(Debug, Clone)]
pub struct TemplateReport {
    /// `Kind/name` of the object holding the template (with `items[i]` for lists).
    pub object: String,
    pub decision: Option<Decision>,
    pub changed: bool,
}

/// Where the pod template of a workload kind lives.
pub fn template_path(
    api_version: &str,
    kind: &str,
) -> Result<Option<&'static [&'static str]>, String> {
    let (group, version) = match api_version.rsplit_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
    let (want_group, path): (&str, &'static [&'static str]) = match kind {
        "Pod" => ("", &[]),
        "ReplicationController" | "PodTemplate" => ("", &["spec", "template"]),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" => {
            ("apps", &["spec", "template"])
        }
        "Job" => ("batch", &["spec", "template"]),
        "CronJob" => ("batch", &["spec", "jobTemplate", "spec", "template"]),
        _ => return Ok(None),
    };
    if group != want_group {
        return Ok(None);
    }
    if version != "v1" {
        return Err(format!(
            "{kind} in {api_version} is not supported (use {})",
            if want_group.is_empty() {
                "v1".to_owned()
            } else {
                format!("{want_group}/v1")
            }
        ));
    }
    // PodTemplate keeps its template at the top level `template`.
    if kind == "PodTemplate" {
        return Ok(Some(&["template"]));
    }
    Ok(Some(path))
}

/// Run injection over one document (which may be a List). `prefix` is the field path of
/// `doc` inside its file (empty for a top-level document).
pub fn inject_value(
    doc: &mut Value,
    ns: &NamespaceInfo,
    cfg: &InjectionConfig,
    mode: Mode,
) -> Result<Vec<TemplateReport>, FieldError> {
    let mut reports = Vec::new();
    inject_at(doc, "", ns, cfg, mode, &mut reports)?;
    Ok(reports)
}

fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_owned()
    } else if field.is_empty() {
        prefix.to_owned()
    } else if field.starts_with('[') {
        format!("{prefix}{field}")
    } else {
        format!("{prefix}.{field}")
    }
}

fn inject_at(
    doc: &mut Value,
    prefix: &str,
    ns: &NamespaceInfo,
    cfg: &InjectionConfig,
    mode: Mode,
    reports: &mut Vec<TemplateReport>,
) -> Result<(), FieldError> {
    let obj = doc
        .as_object()
        .ok_or_else(|| ferr(prefix, "a Kubernetes object must be a mapping"))?;
    let str_field = |k: &str| -> Result<String, FieldError> {
        match obj.get(k) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::String(_)) | None => Err(ferr(join(prefix, k), "missing")),
            Some(_) => Err(ferr(join(prefix, k), "must be a string")),
        }
    };
    let api_version = str_field("apiVersion")?;
    let kind = str_field("kind")?;
    let name = obj
        .get("metadata")
        .and_then(|m| m.get("name").or_else(|| m.get("generateName")))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let obj_ns = obj
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .map(str::to_owned);

    if kind.ends_with("List") && obj.get("items").is_some() {
        let items = doc
            .get_mut("items")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| ferr(join(prefix, "items"), "must be a list"))?;
        for (i, item) in items.iter_mut().enumerate() {
            inject_at(
                item,
                &join(prefix, &format!("items[{i}]")),
                ns,
                cfg,
                mode,
                reports,
            )?;
        }
        return Ok(());
    }

    let path =
        template_path(&api_version, &kind).map_err(|m| ferr(join(prefix, "apiVersion"), m))?;
    let Some(path) = path else {
        return Ok(()); // not a pod-bearing kind: unchanged
    };
    let mut tpl_prefix = prefix.to_owned();
    let mut tpl = &mut *doc;
    for seg in path {
        tpl_prefix = join(&tpl_prefix, seg);
        tpl = tpl
            .get_mut(*seg)
            .filter(|v| v.is_object())
            .ok_or_else(|| ferr(tpl_prefix.clone(), "missing"))?;
    }
    let ns = NamespaceInfo {
        name: ns.name.clone().or(obj_ns),
        labels: ns.labels.clone(),
    };
    let before: PodTemplateSpec = typed(tpl, &tpl_prefix)?;
    if before.spec.is_none() {
        return Err(ferr(join(&tpl_prefix, "spec"), "missing"));
    }
    let out = inject_template(&before, &ns, cfg, mode).map_err(|e| match e {
        InjectError::Annotation { key, message } => ferr(
            join(&tpl_prefix, &format!("metadata.annotations[{key:?}]")),
            message,
        ),
        InjectError::Invalid { field, message } => ferr(join(&tpl_prefix, &field), message),
    })?;
    let changed = merge(tpl, &before, &out.template).map_err(|m| ferr(tpl_prefix.clone(), m))?;
    reports.push(TemplateReport {
        object: format!("{kind}/{name}"),
        decision: Some(out.decision),
        changed,
    });
    Ok(())
}

/// Validate a JSON value into a typed one, naming the offending field.
fn typed<T: serde::de::DeserializeOwned>(v: &Value, prefix: &str) -> Result<T, FieldError> {
    // Most templates deserialize as they are: no copy, and no path tracking (about a third
    // of the cost). Only a failure pays for a normalized copy and, if that fails too, for
    // the path that names the field.
    if let Ok(t) = <T as serde::Deserialize>::deserialize(v) {
        return Ok(t);
    }
    let mut v = v.clone();
    normalize_quantities(&mut v);
    if let Ok(t) = <T as serde::Deserialize>::deserialize(&v) {
        return Ok(t);
    }
    serde_path_to_error::deserialize(&v).map_err(|e| {
        let p = e.path().to_string();
        let p = if p == "." { String::new() } else { p };
        ferr(join(prefix, &p), e.inner().to_string())
    })
}

/// Kubernetes accepts bare numbers for quantities (`cpu: 1`); our types want strings.
/// Only the copy used for validation is changed: the raw document keeps what it had.
fn normalize_quantities(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                match (k.as_str(), &mut *child) {
                    ("limits" | "requests" | "overhead", Value::Object(q)) => {
                        for qv in q.values_mut() {
                            if let Value::Number(n) = qv {
                                *qv = Value::String(n.to_string());
                            }
                        }
                    }
                    ("sizeLimit", Value::Number(n)) => *child = Value::String(n.to_string()),
                    _ => normalize_quantities(child),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(normalize_quantities),
        _ => {}
    }
}

fn to_value<T: Serialize>(v: &T) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| e.to_string())
}

fn set_or_remove(obj: &mut Map<String, Value>, key: &str, v: Option<Value>) {
    match v {
        Some(v) => {
            obj.insert(key.to_owned(), v);
        }
        None => {
            obj.remove(key);
        }
    }
}

/// Lists whose elements are keyed by `name`: keep the raw element when the typed element
/// is unchanged.
fn merge_named_list<T: Serialize + PartialEq>(
    raw: Option<&Value>,
    before: &[T],
    after: &[T],
    name_of: impl Fn(&T) -> &str,
) -> Result<Value, String> {
    let raw_items = raw.and_then(Value::as_array);
    let mut out = Vec::with_capacity(after.len());
    for item in after {
        let n = name_of(item);
        let kept = before
            .iter()
            .position(|b| name_of(b) == n && b == item)
            .and_then(|i| raw_items.and_then(|r| r.get(i)));
        out.push(match kept {
            Some(r) => r.clone(),
            None => to_value(item)?,
        });
    }
    Ok(Value::Array(out))
}

/// Write the changed parts of `after` into `raw`. Returns whether anything changed.
fn merge(
    raw: &mut Value,
    before: &PodTemplateSpec,
    after: &PodTemplateSpec,
) -> Result<bool, String> {
    if before == after {
        return Ok(false);
    }
    let obj = raw.as_object_mut().ok_or("not a mapping")?;
    let no_meta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta::default();
    let (bm, am) = (
        before.metadata.as_ref().unwrap_or(&no_meta),
        after.metadata.as_ref().unwrap_or(&no_meta),
    );
    if bm.labels != am.labels || bm.annotations != am.annotations {
        let meta = obj
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        if meta.is_null() {
            *meta = Value::Object(Map::new());
        }
        let meta = meta.as_object_mut().ok_or("metadata is not a mapping")?;
        if bm.labels != am.labels {
            set_or_remove(
                meta,
                "labels",
                am.labels.as_ref().map(to_value).transpose()?,
            );
        }
        if bm.annotations != am.annotations {
            set_or_remove(
                meta,
                "annotations",
                am.annotations.as_ref().map(to_value).transpose()?,
            );
        }
    }
    let (Some(bs), Some(a_s)) = (&before.spec, &after.spec) else {
        return Ok(true);
    };
    let spec = obj
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .ok_or("spec is not a mapping")?;
    macro_rules! list {
        ($field:ident, $key:literal, $name:expr) => {
            if bs.$field != a_s.$field {
                let v = match &a_s.$field {
                    Some(after) => Some(merge_named_list(
                        spec.get($key),
                        bs.$field.as_deref().unwrap_or(&[]),
                        after,
                        $name,
                    )?),
                    None => None,
                };
                set_or_remove(spec, $key, v);
            }
        };
    }
    list!(
        init_containers,
        "initContainers",
        |c: &k8s_openapi::api::core::v1::Container| c.name.as_str()
    );
    list!(
        volumes,
        "volumes",
        |c: &k8s_openapi::api::core::v1::Volume| c.name.as_str()
    );
    list!(
        image_pull_secrets,
        "imagePullSecrets",
        |c: &k8s_openapi::api::core::v1::LocalObjectReference| c.name.as_str()
    );
    if bs.containers != a_s.containers {
        let v = merge_named_list(
            spec.get("containers"),
            &bs.containers,
            &a_s.containers,
            |c| c.name.as_str(),
        )?;
        spec.insert("containers".into(), v);
    }
    Ok(true)
}
