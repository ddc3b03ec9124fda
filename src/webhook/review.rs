//! One AdmissionReview in, one AdmissionReview out. No HTTP here: [`handle`] takes the
//! request body and answers with a status code and a JSON body.

use std::collections::BTreeMap;

use base64::Engine as _;
use kube::core::GroupVersionKind;
use kube::core::admission::Operation;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::inject::patch::diff;
use crate::inject::workload::inject_value;
use crate::inject::{InjectionConfig, Mode, NamespaceInfo};

pub const ADMISSION_API_VERSION: &str = "admission.k8s.io/v1";
pub const ADMISSION_KIND: &str = "AdmissionReview";

/// How a review ended, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A patch was returned.
    Injected,
    /// The decision said no (or nothing changed): allowed, no patch.
    Skipped,
    /// Not a pod CREATE: allowed, no patch.
    Ignored,
    /// The pod asked for something invalid (e.g. a bad annotation): denied.
    Denied,
    /// The request itself was malformed: 4xx.
    BadRequest,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::Skipped => "skipped",
            Outcome::Ignored => "ignored",
            Outcome::Denied => "denied",
            Outcome::BadRequest => "bad_request",
        }
    }
}

/// The answer to one request: HTTP status, JSON body, outcome.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub outcome: Outcome,
}

/// Namespace labels for the decision. Implemented by a watch-backed cache in the
/// cluster and by plain maps in tests, so the review logic stays pure.
pub trait NamespaceLookup: Send + Sync + 'static {
    /// Labels of the namespace; `None` when unknown.
    fn labels(&self, namespace: &str) -> Option<BTreeMap<String, String>>;
    /// Whether the lookup is ready to answer (e.g. the cache has synced).
    fn ready(&self) -> bool {
        true
    }
}

/// Fixed namespace labels (tests, or a webhook without cluster access).
#[derive(Debug, Clone, Default)]
pub struct StaticNamespaces(pub BTreeMap<String, BTreeMap<String, String>>);

impl NamespaceLookup for StaticNamespaces {
    fn labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        self.0.get(namespace).cloned()
    }
}

fn bad_request(message: impl Into<String>) -> Answer {
    let message = message.into();
    Answer {
        status: 400,
        body: json!({"error": message}),
        outcome: Outcome::BadRequest,
    }
}

fn review(uid: &str, response: Value, outcome: Outcome) -> Answer {
    let mut r = json!({"uid": uid, "allowed": true});
    if let (Some(r), Some(extra)) = (r.as_object_mut(), response.as_object()) {
        r.extend(extra.clone());
    }
    Answer {
        status: 200,
        body: json!({
            "apiVersion": ADMISSION_API_VERSION,
            "kind": ADMISSION_KIND,
            "response": r,
        }),
        outcome,
    }
}

/// Refuses the object: `allowed: false` with `message` (prefixed with who refused) as the
/// status the API server shows the user.
fn deny(uid: &str, message: String) -> Answer {
    let message = format!("meshctl sidecar injection: {message}");
    review(
        uid,
        json!({"allowed": false, "status": {"status": "Failure", "code": 400, "reason": "BadRequest", "message": message}}),
        Outcome::Denied,
    )
}

/// What the webhook reads of an AdmissionReview besides the object. Deserialized from the
/// parsed body in place: the object (and oldObject) are skipped, not copied.
#[derive(Deserialize)]
struct ReviewHead {
    #[serde(default)]
    request: Option<RequestHead>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestHead {
    #[serde(default)]
    uid: String,
    kind: GroupVersionKind,
    operation: Operation,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

/// Handle one AdmissionReview body.
pub fn handle(body: &[u8], cfg: &InjectionConfig, namespaces: &dyn NamespaceLookup) -> Answer {
    let mut raw: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return bad_request(format!("body is not valid JSON: {e}")),
    };
    let Some(obj) = raw.as_object() else {
        return bad_request("body must be a JSON object (an AdmissionReview)");
    };
    let api_version = obj.get("apiVersion").and_then(Value::as_str);
    let kind = obj.get("kind").and_then(Value::as_str);
    if kind != Some(ADMISSION_KIND) {
        return bad_request(format!("kind must be {ADMISSION_KIND}, got {kind:?}"));
    }
    if api_version != Some(ADMISSION_API_VERSION) {
        return bad_request(format!(
            "apiVersion must be {ADMISSION_API_VERSION}, got {api_version:?}"
        ));
    }
    // Only the request's head is typed; the object stays JSON and is taken, not copied.
    let head: ReviewHead = match serde_path_to_error::deserialize(&raw) {
        Ok(r) => r,
        Err(e) => return bad_request(format!("AdmissionReview field {}: {}", e.path(), e.inner())),
    };
    let Some(req) = head.request else {
        return bad_request("AdmissionReview has no request");
    };
    if req.uid.is_empty() {
        return bad_request("request.uid is missing");
    }
    let uid = req.uid.as_str();
    let is_pod = req.kind.group.is_empty() && req.kind.kind == "Pod";
    if !is_pod || req.operation != Operation::Create || req.sub_resource.is_some() {
        return review(uid, json!({}), Outcome::Ignored);
    }
    let mut pod = match raw.pointer_mut("/request/object") {
        Some(o) if o.is_object() => o.take(),
        _ => return bad_request("request.object is missing for a Pod CREATE"),
    };
    // The API server may omit apiVersion/kind inside the object; the core needs them.
    let want_api_version = if req.kind.group.is_empty() {
        req.kind.version.clone()
    } else {
        format!("{}/{}", req.kind.group, req.kind.version)
    };
    if let Some(o) = pod.as_object_mut() {
        o.entry("apiVersion")
            .or_insert_with(|| json!(want_api_version));
        o.entry("kind").or_insert_with(|| json!(req.kind.kind));
    }
    // Only one object of the kind the review is for: anything else (a List of pods, a
    // Deployment) would be injected item by item into a patch the API server cannot apply,
    // many times larger than the request. Denied rather than answered with an HTTP error,
    // which `failurePolicy: Ignore` would turn into admitting the object unexamined.
    let got_api_version = pod.get("apiVersion").unwrap_or(&Value::Null);
    let got_kind = pod.get("kind").unwrap_or(&Value::Null);
    if got_api_version.as_str() != Some(&want_api_version)
        || got_kind.as_str() != Some(&req.kind.kind)
    {
        let show = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
        return deny(
            uid,
            format!(
                "request.object is {} {}, but request.kind is {} {}: only a single {} is accepted",
                show(got_api_version),
                show(got_kind),
                want_api_version,
                req.kind.kind,
                req.kind.kind,
            ),
        );
    }
    let before = pod.clone();
    let namespace = req
        .namespace
        .clone()
        .or_else(|| {
            pod.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .filter(|n| !n.is_empty());
    let ns = NamespaceInfo {
        labels: namespace
            .as_deref()
            .and_then(|n| namespaces.labels(n))
            .unwrap_or_default(),
        name: namespace,
    };
    match inject_value(&mut pod, &ns, cfg, Mode::Webhook) {
        Err(e) => deny(uid, format!("request.object.{e}")),
        Ok(_) => {
            let patch = diff(&before, &pod);
            if patch.0.is_empty() {
                return review(uid, json!({}), Outcome::Skipped);
            }
            let bytes = match serde_json::to_vec(&patch) {
                Ok(b) => b,
                Err(e) => return bad_request(format!("cannot encode patch: {e}")),
            };
            let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
            review(
                uid,
                json!({"patchType": "JSONPatch", "patch": b64}),
                Outcome::Injected,
            )
        }
    }
}
