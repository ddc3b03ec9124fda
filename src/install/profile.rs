//! Profiles and install inputs: the embedded profiles, `-f` files (`MeshOperator` or
//! Istio's `IstioOperator`), `--set`, and the overlay that turns them into [`MeshValues`].
//!
//! Order: `default` ← named profile ← `-f` files left to right ← `--set` in order.

use serde_json::{Map, Value};

use super::overlay::{self, Provenance};
use super::values::{FieldError, MeshValues};

pub const API_VERSION: &str = "install.meshctl.io/v1alpha1";
pub const KIND: &str = "MeshOperator";
pub const ISTIO_API_VERSION: &str = "install.istio.io/v1alpha1";
pub const ISTIO_KIND: &str = "IstioOperator";

/// The embedded profiles, by name.
pub const PROFILES: &[(&str, &str)] = &[
    ("default", include_str!("../../profiles/default.yaml")),
    ("demo", include_str!("../../profiles/demo.yaml")),
    ("minimal", include_str!("../../profiles/minimal.yaml")),
    ("empty", include_str!("../../profiles/empty.yaml")),
    ("remote", include_str!("../../profiles/remote.yaml")),
];

pub fn profile_names() -> Vec<&'static str> {
    PROFILES.iter().map(|(n, _)| *n).collect()
}

/// One input file: its name (for messages) and text.
#[derive(Debug, Clone)]
pub struct Input {
    pub name: String,
    pub text: String,
}

/// Errors building the values; each names the file or `--set` argument and the field.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{source_name}: {message}")]
    Input {
        source_name: String,
        message: String,
    },
    #[error("{source_name}: spec.{}: {}", error.field, error.message)]
    Field {
        source_name: String,
        error: FieldError,
    },
    #[error(transparent)]
    Set(#[from] overlay::SetError),
}

/// The result of the overlay.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub profile: String,
    pub values: MeshValues,
    /// One line per input with unsupported (ignored) fields.
    pub warnings: Vec<String>,
}

fn input_err(source_name: &str, message: impl Into<String>) -> ProfileError {
    ProfileError::Input {
        source_name: source_name.to_owned(),
        message: message.into(),
    }
}

/// Parse one input document into a MeshOperator `spec` (IstioOperator mapped) plus warnings.
pub fn parse_input(input: &Input) -> Result<(Map<String, Value>, Vec<String>), ProfileError> {
    let (_, docs) = crate::kube_yaml::parse_stream(&input.text)
        .map_err(|e| input_err(&input.name, e.to_string()))?;
    let [doc] = docs.as_slice() else {
        return Err(input_err(
            &input.name,
            format!(
                "expected exactly one {KIND} or {ISTIO_KIND} document, found {}",
                docs.len()
            ),
        ));
    };
    let v = &doc.value;
    let api = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
    let spec = match v.get("spec") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(input_err(&input.name, "spec: must be a map")),
    };
    match (api, kind) {
        (API_VERSION, KIND) => Ok((spec, Vec::new())),
        (ISTIO_API_VERSION, ISTIO_KIND) => {
            let name = v
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("(unnamed)");
            let (spec, unsupported) = from_istio_operator(spec);
            let warnings = if unsupported.is_empty() {
                Vec::new()
            } else {
                vec![format!(
                    "{}: IstioOperator {name}: not supported, ignored: {}",
                    input.name,
                    unsupported.join(", ")
                )]
            };
            Ok((spec, warnings))
        }
        _ => Err(input_err(
            &input.name,
            format!(
                "apiVersion/kind {api:?}/{kind:?}: expected {API_VERSION} {KIND} or {ISTIO_API_VERSION} {ISTIO_KIND}"
            ),
        )),
    }
}

/// Remove the value at `path` (dotted keys), pruning maps left empty.
fn take(root: &mut Map<String, Value>, path: &[&str]) -> Option<Value> {
    let (first, rest) = path.split_first()?;
    if rest.is_empty() {
        return root.remove(*first);
    }
    let child = root.get_mut(*first)?.as_object_mut()?;
    let v = take(child, rest);
    if child.is_empty() {
        root.remove(*first);
    }
    v
}

fn put(root: &mut Map<String, Value>, path: &[&str], v: Value) {
    let (first, rest) = path.split_first().expect("non-empty path");
    if rest.is_empty() {
        root.insert((*first).to_owned(), v);
        return;
    }
    let child = root
        .entry((*first).to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    if !child.is_object() {
        *child = Value::Object(Map::new());
    }
    put(child.as_object_mut().expect("map"), rest, v);
}

fn leaf_paths(v: &Value, path: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                leaf_paths(c, p, out);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for (i, c) in a.iter().enumerate() {
                leaf_paths(c, format!("{path}[{i}]"), out);
            }
        }
        _ => out.push(path),
    }
}

fn stringish(v: Value) -> Value {
    match v {
        Value::Number(n) => Value::String(n.to_string()),
        other => other,
    }
}

fn boolish(v: Value) -> Value {
    match v.as_str() {
        Some("true") => Value::Bool(true),
        Some("false") => Value::Bool(false),
        _ => v,
    }
}

/// Map an IstioOperator `spec` to ours. Returns the mapped spec and the leaf paths (as
/// `spec.…`) that we do not support.
pub fn from_istio_operator(mut io: Map<String, Value>) -> (Map<String, Value>, Vec<String>) {
    let mut out = Map::new();
    type Conv = fn(Value) -> Value;
    let id: Conv = |v| v;
    let mappings: &[(&[&str], &[&str], Conv)] = &[
        (&["profile"], &["profile"], id),
        (&["hub"], &["hub"], stringish),
        (&["tag"], &["tag"], stringish),
        (&["values", "global", "hub"], &["hub"], stringish),
        (&["values", "global", "tag"], &["tag"], stringish),
        (
            &["values", "global", "imagePullPolicy"],
            &["imagePullPolicy"],
            id,
        ),
        (
            &["meshConfig", "accessLogFile"],
            &["meshConfig", "accessLogFile"],
            id,
        ),
        (
            &["meshConfig", "accessLogEncoding"],
            &["meshConfig", "accessLogEncoding"],
            id,
        ),
        (
            &["meshConfig", "pathNormalization", "normalization"],
            &["meshConfig", "pathNormalization", "normalization"],
            id,
        ),
        (
            &["meshConfig", "enableTracing"],
            &["meshConfig", "enableTracing"],
            boolish,
        ),
        (
            &["meshConfig", "trustDomain"],
            &["meshConfig", "trustDomain"],
            id,
        ),
        (
            &["components", "base", "enabled"],
            &["components", "base", "enabled"],
            boolish,
        ),
        (
            &["components", "pilot", "enabled"],
            &["components", "controlPlane", "enabled"],
            boolish,
        ),
        (
            &["components", "pilot", "k8s", "replicaCount"],
            &["components", "controlPlane", "replicas"],
            id,
        ),
        (
            &["values", "pilot", "replicaCount"],
            &["components", "controlPlane", "replicas"],
            id,
        ),
        (
            &["values", "gateways", "istio-ingressgateway", "enabled"],
            &["components", "ingressGateway", "enabled"],
            boolish,
        ),
        (
            &["values", "gateways", "istio-ingressgateway", "type"],
            &["components", "ingressGateway", "service", "type"],
            id,
        ),
        (
            &["values", "pilot", "env", "PILOT_ENABLE_GATEWAY_API"],
            &["gatewayApi", "enabled"],
            boolish,
        ),
        (
            &["values", "sidecarInjectorWebhook", "rewriteAppHTTPProbe"],
            &["injection", "rewriteAppHTTPProbe"],
            boolish,
        ),
    ];
    for (from, to, conv) in mappings {
        if let Some(v) = take(&mut io, from) {
            put(&mut out, to, conv(v));
        }
    }
    // components.ingressGateways: the entry named istio-ingressgateway.
    if let Some(Value::Array(list)) = io
        .get_mut("components")
        .and_then(|c| c.as_object_mut().and_then(|c| c.get_mut("ingressGateways")))
    {
        for entry in list.iter_mut() {
            let Some(e) = entry.as_object_mut() else {
                continue;
            };
            if e.get("name").and_then(Value::as_str) != Some("istio-ingressgateway") {
                continue;
            }
            e.remove("name");
            if let Some(v) = take(e, &["enabled"]) {
                put(
                    &mut out,
                    &["components", "ingressGateway", "enabled"],
                    boolish(v),
                );
            }
            if let Some(v) = take(e, &["k8s", "service", "type"]) {
                put(
                    &mut out,
                    &["components", "ingressGateway", "service", "type"],
                    v,
                );
            }
            if let Some(v) = take(e, &["k8s", "replicaCount"]) {
                put(&mut out, &["components", "ingressGateway", "replicas"], v);
            }
        }
        list.retain(|e| e.as_object().is_none_or(|m| !m.is_empty()));
        if list.is_empty() {
            take(&mut io, &["components", "ingressGateways"]);
        }
    }
    let mut unsupported = Vec::new();
    leaf_paths(&Value::Object(io), String::new(), &mut unsupported);
    unsupported.retain(|p| !p.is_empty());
    let unsupported = unsupported
        .into_iter()
        .map(|p| format!("spec.{p}"))
        .collect();
    (out, unsupported)
}

fn profile_spec(name: &str) -> Option<Map<String, Value>> {
    let (_, text) = PROFILES.iter().find(|(n, _)| *n == name)?;
    let (spec, _) = parse_input(&Input {
        name: format!("profile {name}"),
        text: (*text).to_owned(),
    })
    .expect("embedded profiles parse");
    Some(spec)
}

/// `--set` paths whose value is always a string (image references).
fn string_only(path: &str) -> bool {
    matches!(path, "hub" | "tag" | "injection.hub" | "injection.tag")
}

/// Build the values: default ← profile ← files ← sets.
pub fn resolve(files: &[Input], sets: &[String]) -> Result<Resolved, ProfileError> {
    let mut specs = Vec::new();
    let mut warnings = Vec::new();
    let mut profile = "default".to_owned();
    let mut profile_source = "the default".to_owned();
    for f in files {
        let (mut spec, w) = parse_input(f)?;
        warnings.extend(w);
        match spec.remove("profile") {
            None => {}
            Some(Value::String(p)) => {
                profile = p;
                profile_source = f.name.clone();
            }
            Some(_) => return Err(input_err(&f.name, "spec.profile: must be a string")),
        }
        specs.push((f.name.clone(), spec));
    }
    let mut rest_sets = Vec::new();
    for s in sets {
        match s.split_once('=') {
            Some(("profile", p)) => {
                profile = p.to_owned();
                profile_source = format!("--set {s}");
            }
            _ => rest_sets.push(s),
        }
    }
    let profile_values = profile_spec(&profile).ok_or_else(|| {
        input_err(
            &profile_source,
            format!(
                "spec.profile: unknown profile {profile:?} (one of: {})",
                profile_names().join(", ")
            ),
        )
    })?;
    let mut root = Value::Object(profile_spec("default").expect("default profile"));
    let mut prov = Provenance::default();
    if profile != "default" {
        overlay::merge(
            &mut root,
            Value::Object(profile_values),
            &format!("profile {profile}"),
            &mut prov,
        );
    }
    for (name, spec) in specs {
        overlay::merge(&mut root, Value::Object(spec), &name, &mut prov);
    }
    for s in rest_sets {
        let path = s.split_once('=').map(|(p, _)| p).unwrap_or(s);
        if string_only(path) {
            let (_, raw) = s.split_once('=').expect("checked");
            overlay::apply_set(&mut root, s, &mut prov)?;
            let mut cur = &mut root;
            for k in path.split('.') {
                cur = &mut cur[k];
            }
            *cur = Value::String(raw.to_owned());
        } else {
            overlay::apply_set(&mut root, s, &mut prov)?;
        }
    }
    let values = MeshValues::from_value(root).map_err(|error| {
        let source_name = prov
            .source_of(&error.field)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("profile {profile}"));
        ProfileError::Field { source_name, error }
    })?;
    Ok(Resolved {
        profile,
        values,
        warnings,
    })
}
