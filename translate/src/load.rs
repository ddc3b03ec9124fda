//! Loading Kubernetes objects from files: YAML (multi-document) and JSON, `List` kinds, each
//! document validated into a typed object. Separate from translation so that the control
//! plane can feed objects from watches instead.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use k8s_openapi::api::core::v1::Pod;

use crate::identity::{MESHED_POD_LABEL, MeshedPod};
use crate::resources::{Resources, ns_name, pod_key};
use crate::typed::from_value;
use crate::{FieldProblem, Warning, validate};
use mesh_wire::names::MESHED_POD_LABEL_VALUE;

/// How files are read.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Namespace given to namespaced objects without `metadata.namespace` (like
    /// `kubectl apply -n NAMESPACE`). Default `default`.
    pub default_namespace: String,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            default_namespace: "default".to_string(),
        }
    }
}

/// The objects read, and what was read but not used.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub resources: Resources,
    /// Objects of kinds the proxy does not use (ignored), and similar notices.
    pub warnings: Vec<Warning>,
}

/// One problem in the input, located as precisely as known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadProblem {
    /// The file as given (or found in a given directory).
    pub file: PathBuf,
    /// 1-based index of the document in the file (empty documents are not counted).
    pub document: Option<usize>,
    /// `Kind namespace/name` (or `Kind name`), when known; for a `List`, includes the item.
    pub object: Option<String>,
    /// Field path in the object, e.g. `spec.rules[0].backendRefs[1].weight`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for LoadProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        match (self.document, &self.object) {
            (Some(d), Some(o)) => write!(f, ": document {d} ({o})")?,
            (Some(d), None) => write!(f, ": document {d}")?,
            (None, Some(o)) => write!(f, ": {o}")?,
            (None, None) => {}
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found while loading (not just the first).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LoadError {
    pub problems: Vec<LoadProblem>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problems.as_slice() {
            [one] => write!(f, "{one}"),
            many => {
                write!(f, "{} problems in the resources:", many.len())?;
                for p in many {
                    write!(f, "\n  {p}")?;
                }
                Ok(())
            }
        }
    }
}

/// Loads objects from files and directories. A directory contributes its `*.yaml`, `*.yml`
/// and `*.json` files (not recursively), sorted by name; other files are skipped. Files are
/// read in the order given.
pub fn load<P: AsRef<Path>>(paths: &[P], options: &LoadOptions) -> Result<Loaded, LoadError> {
    let mut loader = Loader::new(options);
    for p in paths {
        let p = p.as_ref();
        if p.is_dir() {
            match list_dir(p) {
                Ok(files) => {
                    for f in files {
                        loader.file(&f);
                    }
                }
                Err(e) => {
                    loader.problem(p, None, None, None, format!("cannot read directory: {e}"))
                }
            }
        } else {
            loader.file(p);
        }
    }
    loader.finish()
}

/// Loads objects from text already read (`name` is used in messages; a name ending in
/// `.json` is parsed as JSON, anything else as YAML).
pub fn load_str(name: &str, text: &str, options: &LoadOptions) -> Result<Loaded, LoadError> {
    let mut loader = Loader::new(options);
    loader.text(Path::new(name), text);
    loader.finish()
}

fn list_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if path.is_file() && matches!(ext, "yaml" | "yml" | "json") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    GatewayClass,
    Gateway,
    HttpRoute,
    ReferenceGrant,
    Service,
    EndpointSlice,
    Namespace,
    RateLimitPolicy,
    EnvoyFilter,
    PeerAuthentication,
    Pod,
    Operator,
    List,
}

impl Kind {
    fn namespaced(self) -> bool {
        !matches!(self, Kind::GatewayClass | Kind::Namespace | Kind::List)
    }
}

/// The kind a document is read as; `Ok(None)`: a kind the proxy does not use.
fn classify(api_version: &str, kind: &str) -> Result<Option<Kind>, String> {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let k = match (group, kind) {
        ("gateway.networking.k8s.io", "GatewayClass") => Kind::GatewayClass,
        ("gateway.networking.k8s.io", "Gateway") => Kind::Gateway,
        ("gateway.networking.k8s.io", "HTTPRoute") => Kind::HttpRoute,
        ("gateway.networking.k8s.io", "ReferenceGrant") => Kind::ReferenceGrant,
        ("", "Service") => Kind::Service,
        ("", "Namespace") => Kind::Namespace,
        ("", "List") => Kind::List,
        ("discovery.k8s.io", "EndpointSlice") => Kind::EndpointSlice,
        ("policy.meshctl.io", "RateLimitPolicy") => Kind::RateLimitPolicy,
        ("networking.istio.io", "EnvoyFilter") => Kind::EnvoyFilter,
        ("security.istio.io", "PeerAuthentication") => Kind::PeerAuthentication,
        ("", "Pod") => Kind::Pod,
        ("install.istio.io", "IstioOperator") | ("install.meshctl.io", "MeshOperator") => {
            Kind::Operator
        }
        _ => return Ok(None),
    };
    let ok = match k {
        Kind::GatewayClass | Kind::Gateway | Kind::HttpRoute | Kind::ReferenceGrant => {
            matches!(version, "v1" | "v1beta1")
        }
        Kind::Service | Kind::Namespace | Kind::List | Kind::EndpointSlice | Kind::Pod => {
            version == "v1"
        }
        Kind::RateLimitPolicy | Kind::Operator => version == "v1alpha1",
        Kind::EnvoyFilter => matches!(version, "v1alpha3" | "v1"),
        Kind::PeerAuthentication => matches!(version, "v1" | "v1beta1"),
    };
    if ok {
        Ok(Some(k))
    } else {
        Err(format!(
            "{kind} {api_version} is not supported (supported: {})",
            match k {
                Kind::GatewayClass | Kind::Gateway | Kind::HttpRoute | Kind::ReferenceGrant =>
                    "gateway.networking.k8s.io/v1, v1beta1",
                Kind::Service | Kind::Namespace | Kind::List | Kind::Pod => "v1",
                Kind::EndpointSlice => "discovery.k8s.io/v1",
                Kind::RateLimitPolicy => "policy.meshctl.io/v1alpha1",
                Kind::Operator => "v1alpha1",
                Kind::EnvoyFilter => "networking.istio.io/v1alpha3, v1",
                Kind::PeerAuthentication => "security.istio.io/v1, v1beta1",
            }
        ))
    }
}

struct Loader<'a> {
    options: &'a LoadOptions,
    out: Loaded,
    problems: Vec<LoadProblem>,
    /// (kind, namespace, name) → where it was first defined.
    seen: BTreeMap<(String, String, String), String>,
}

/// Where a document is, for messages.
struct Doc<'p> {
    file: &'p Path,
    index: usize,
    /// `items[3]` when the object is an item of a `List`.
    item: Option<String>,
}

impl<'a> Loader<'a> {
    fn new(options: &'a LoadOptions) -> Self {
        Loader {
            options,
            out: Loaded::default(),
            problems: Vec::new(),
            seen: BTreeMap::new(),
        }
    }

    fn finish(self) -> Result<Loaded, LoadError> {
        if self.problems.is_empty() {
            Ok(self.out)
        } else {
            Err(LoadError {
                problems: self.problems,
            })
        }
    }

    fn problem(
        &mut self,
        file: &Path,
        document: Option<usize>,
        object: Option<String>,
        field: Option<String>,
        message: String,
    ) {
        self.problems.push(LoadProblem {
            file: file.to_path_buf(),
            document,
            object,
            field,
            message,
        });
    }

    fn file(&mut self, path: &Path) {
        match std::fs::read_to_string(path) {
            Ok(text) => self.text(path, &text),
            Err(e) => self.problem(path, None, None, None, format!("cannot read file: {e}")),
        }
    }

    fn text(&mut self, path: &Path, text: &str) {
        let is_json = path.extension().is_some_and(|e| e == "json");
        let docs: Vec<(usize, Value)> = if is_json {
            match serde_json::from_str::<Value>(text) {
                Ok(v) => vec![(1, v)],
                Err(e) => {
                    self.problem(path, None, None, None, format!("invalid JSON: {e}"));
                    return;
                }
            }
        } else {
            let mut docs = Vec::new();
            for d in crate::yaml::split_yaml_stream(text) {
                match d.parse::<Value>() {
                    Ok(v) => docs.push((d.index, v)),
                    Err(e) => self.problem(
                        path,
                        Some(e.index),
                        None,
                        None,
                        format!("invalid YAML at line {}: {}", e.line, e.message),
                    ),
                }
            }
            docs
        };
        for (index, v) in docs {
            if v.is_null() {
                continue;
            }
            let doc = Doc {
                file: path,
                index,
                item: None,
            };
            self.document(&doc, v);
        }
    }

    fn document(&mut self, doc: &Doc<'_>, mut v: Value) {
        let label = describe(&v, doc.item.as_deref(), &self.options.default_namespace);
        let problem = |this: &mut Self, field: Option<String>, message: String| {
            this.problem(doc.file, Some(doc.index), label.clone(), field, message)
        };
        let Some(obj) = v.as_object() else {
            problem(
                self,
                None,
                "a document must be a mapping (a Kubernetes object)".into(),
            );
            return;
        };
        let api_version = obj
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let kind = obj
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let (api_version, kind) = (api_version.as_str(), kind.as_str());
        if api_version.is_empty() || kind.is_empty() {
            let f = if api_version.is_empty() {
                "apiVersion"
            } else {
                "kind"
            };
            problem(self, Some(f.into()), "required".into());
            return;
        }
        let k = match classify(api_version, kind) {
            Ok(Some(k)) => k,
            Ok(None) => {
                self.out.warnings.push(Warning::new(
                    doc_context(doc, label.as_deref()),
                    format!("{kind} ({api_version}) is not used by the proxy; ignored"),
                ));
                return;
            }
            Err(m) => {
                problem(self, Some("apiVersion".into()), m);
                return;
            }
        };
        if k == Kind::List {
            let items = match v.get_mut("items").map(Value::take) {
                Some(Value::Array(items)) => items,
                None | Some(Value::Null) => Vec::new(),
                Some(_) => {
                    problem(self, Some("items".into()), "must be a list".into());
                    return;
                }
            };
            for (j, item) in items.into_iter().enumerate() {
                let prefix = match &doc.item {
                    Some(p) => format!("{p}.items[{j}]"),
                    None => format!("items[{j}]"),
                };
                let d = Doc {
                    file: doc.file,
                    index: doc.index,
                    item: Some(prefix),
                };
                self.document(&d, item);
            }
            return;
        }
        if k.namespaced()
            && let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut)
            && meta
                .get("namespace")
                .is_none_or(|n| n.as_str().is_some_and(str::is_empty))
        {
            meta.insert(
                "namespace".into(),
                Value::String(self.options.default_namespace.clone()),
            );
        }
        let key = (
            kind.to_string(),
            v.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            v.pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        );
        if key.2.is_empty() {
            let m = match v.pointer("/metadata/name") {
                None | Some(Value::Null) => "required",
                Some(_) => "must be a string",
            };
            problem(self, Some("metadata.name".into()), m.into());
            return;
        }
        let here = format!("{}: document {}", doc.file.display(), doc.index);
        if let Some(first) = self.seen.get(&key) {
            let m = format!("defined twice (first in {first})");
            problem(self, None, m);
            return;
        }
        self.seen.insert(key, here);

        let res = &mut self.out.resources;
        let problems = match k {
            Kind::GatewayClass => parse(v, &mut res.gateway_classes, |_| Vec::new()),
            Kind::Gateway => parse(v, &mut res.gateways, validate::gateway),
            Kind::HttpRoute => parse(v, &mut res.http_routes, validate::http_route),
            Kind::ReferenceGrant => parse(v, &mut res.reference_grants, |_| Vec::new()),
            Kind::Service => parse(v, &mut res.services, |_| Vec::new()),
            Kind::EndpointSlice => parse(v, &mut res.endpoint_slices, |_| Vec::new()),
            Kind::Namespace => parse(v, &mut res.namespaces, |_| Vec::new()),
            Kind::RateLimitPolicy => {
                parse(v, &mut res.rate_limit_policies, validate::rate_limit_policy)
            }
            Kind::EnvoyFilter => parse(v, &mut res.envoy_filters, |ef| {
                crate::istio::local_rate_limits(ef).errors
            }),
            Kind::PeerAuthentication => parse(
                v,
                &mut res.peer_authentications,
                crate::peer_authentication::problems,
            ),
            Kind::Pod => match from_value::<Pod>(v, "", &["apiVersion", "kind"]) {
                // Only meshed pods matter: their labels and service accounts.
                Ok(pod) => {
                    let (ns, name) = ns_name(&pod.metadata, &self.options.default_namespace);
                    match MeshedPod::of(&pod) {
                        Some(m) => {
                            res.pods.insert(pod_key(&ns, &name), Arc::new(m));
                        }
                        None => self.out.warnings.push(Warning::new(
                            doc_context(doc, label.as_deref()),
                            format!(
                                "not a meshed pod (no label {MESHED_POD_LABEL}: {MESHED_POD_LABEL_VALUE}); ignored"
                            ),
                        )),
                    }
                    Vec::new()
                }
                Err(problems) => problems,
            },
            Kind::Operator => parse(v, &mut res.operators, validate::operator),
            Kind::List => unreachable!("handled above"),
        };
        for p in problems {
            problem(self, Some(p.path), p.message);
        }
    }
}

/// Deserializes one object, runs `check` on it, and keeps it if both succeed.
fn parse<T: DeserializeOwned>(
    v: Value,
    into: &mut Vec<T>,
    check: impl Fn(&T) -> Vec<FieldProblem>,
) -> Vec<FieldProblem> {
    match from_value::<T>(v, "", &["apiVersion", "kind"]) {
        Ok(obj) => {
            let problems = check(&obj);
            if problems.is_empty() {
                into.push(obj);
            }
            problems
        }
        Err(problems) => problems,
    }
}

/// `HTTPRoute demo/myapp-route` (`GatewayClass istio` for cluster-scoped kinds), with the
/// `List` item if any.
fn describe(v: &Value, item: Option<&str>, default_ns: &str) -> Option<String> {
    let kind = v.get("kind").and_then(Value::as_str);
    let name = v.pointer("/metadata/name").and_then(Value::as_str);
    let ns = v.pointer("/metadata/namespace").and_then(Value::as_str);
    let api_version = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let namespaced = match kind {
        Some(k) => classify(api_version, k)
            .ok()
            .flatten()
            .is_none_or(Kind::namespaced),
        None => true,
    };
    let obj = match (kind, name) {
        (Some(k), Some(n)) if namespaced => Some(format!(
            "{k} {}/{n}",
            ns.filter(|s| !s.is_empty()).unwrap_or(default_ns)
        )),
        (Some(k), Some(n)) => Some(format!("{k} {n}")),
        (Some(k), None) => Some(k.to_string()),
        _ => None,
    };
    match (obj, item) {
        (Some(o), Some(i)) => Some(format!("{i}: {o}")),
        (None, Some(i)) => Some(i.to_string()),
        (o, None) => o,
    }
}

fn doc_context(doc: &Doc<'_>, label: Option<&str>) -> String {
    match label {
        Some(l) => format!("{}: document {} ({l})", doc.file.display(), doc.index),
        None => format!("{}: document {}", doc.file.display(), doc.index),
    }
}
