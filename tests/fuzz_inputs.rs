//! Property-based tests of meshctl's parsers of outside input:
//! - AdmissionReviews (`webhook::review::handle`): arbitrary JSON, arbitrary bytes and
//!   mutations of a real review never panic; every answer is a valid AdmissionReview response
//!   (and a patch applies to the object it was made for) or a 400 with a clear error;
//! - install profiles (`MeshOperator`/`IstioOperator` files and the overlay) and `--set`
//!   arguments: never panic; errors name the file or the `--set` argument.
//!
//! Cases: `PROPTEST_CASES` (defaults below); `bench/fuzz.sh` runs many more.

use std::collections::BTreeMap;

use base64::Engine as _;
use meshctl::inject::InjectionConfig;
use meshctl::install::overlay::{Provenance, apply_set};
use meshctl::install::profile::{Input, profile_names, resolve};
use meshctl::webhook::StaticNamespaces;
use meshctl::webhook::review::{Answer, Outcome, handle};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};

#[path = "support/edits.rs"]
mod edits;
use edits::{Edit, TextEdit, apply_edit, apply_text_edit};

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `test` on `cases` generated values; the failing input, shrunk, is in the panic.
fn check<S: Strategy>(
    name: &str,
    default_cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let mut runner = TestRunner::new(Config {
        cases: cases(default_cases),
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{name}: {e}");
    }
    println!("{name}: {} cases passed", runner.config().cases);
}

// ---------------------------------------------------------------------------------------
// JSON values.

/// Keys the webhook and the injector look at, so that generated objects reach deep code.
const KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "request",
    "uid",
    "object",
    "oldObject",
    "operation",
    "namespace",
    "subResource",
    "group",
    "version",
    "metadata",
    "spec",
    "name",
    "generateName",
    "labels",
    "annotations",
    "containers",
    "initContainers",
    "volumes",
    "image",
    "ports",
    "containerPort",
    "protocol",
    "securityContext",
    "runAsUser",
    "hostNetwork",
    "serviceAccountName",
    "resources",
    "requests",
    "limits",
    "env",
    "value",
    "args",
    "command",
    "readinessProbe",
    "livenessProbe",
    "httpGet",
    "path",
    "port",
    "dryRun",
];

const STRINGS: &[&str] = &[
    "",
    "Pod",
    "v1",
    "CREATE",
    "UPDATE",
    "admission.k8s.io/v1",
    "AdmissionReview",
    "demo",
    "true",
    "false",
    "enabled",
    "disabled",
    "app:1",
    "80",
    "8080,9090",
    "*",
    "0.0.0.0/0",
    "10.0.0.0/8",
    "100m",
    "1Gi",
    "-1",
    "65536",
    "TCP",
    "UDP",
    "status",
    "ephemeralcontainers",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(KEYS).prop_map(String::from),
        1 => "\\PC{0,10}",
    ]
}

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => prop::sample::select(STRINGS).prop_map(String::from),
        2 => "\\PC{0,16}",
        1 => "[0-9,./: -]{0,16}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        string().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

// ---------------------------------------------------------------------------------------
// AdmissionReviews.

fn review_for(pod: &Value, uid: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "demo",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
        }
    })
}

/// The walkthrough Deployment's pod, as the API server sends it to the webhook.
fn walkthrough_review() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/inject/seed-deployment.yaml"
    ))
    .unwrap();
    let (_, docs) = meshctl::kube_yaml::parse_stream(&text).unwrap();
    let t = &docs[0].value["spec"]["template"];
    let pod =
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": t["metadata"], "spec": t["spec"]});
    review_for(&pod, "walkthrough")
}

/// Annotations the injector reads, each with values it accepts; one value in four is
/// generated instead.
const ANNOTATIONS: &[(&str, &[&str])] = &[
    ("sidecar.meshctl.io/inject", &["true", "false"]),
    ("sidecar.istio.io/inject", &["true", "false"]),
    ("sidecar.meshctl.io/status", &["{}", "{\"version\":\"x\"}"]),
    (
        "sidecar.meshctl.io/proxyImage",
        &["ghcr.io/meshctl/mesh-proxy:1", "proxy:dev"],
    ),
    ("sidecar.meshctl.io/logLevel", &["debug", "info", "warn"]),
    ("sidecar.meshctl.io/nativeSidecar", &["true", "false"]),
    (
        "sidecar.meshctl.io/holdApplicationUntilProxyStarts",
        &["true", "false"],
    ),
    ("sidecar.istio.io/rewriteAppHTTPProbers", &["true", "false"]),
    ("sidecar.meshctl.io/proxyCPU", &["100m", "1", "0.5"]),
    ("sidecar.istio.io/proxyMemory", &["128Mi", "1Gi", "1e3"]),
    ("sidecar.meshctl.io/proxyCPULimit", &["2", "500m"]),
    ("sidecar.meshctl.io/proxyMemoryLimit", &["512Mi"]),
    (
        "traffic.sidecar.meshctl.io/includeInboundPorts",
        &["*", "", "80,8080", "9090"],
    ),
    (
        "traffic.sidecar.istio.io/excludeInboundPorts",
        &["", "15020", "80, 81"],
    ),
    (
        "traffic.sidecar.meshctl.io/includeOutboundPorts",
        &["", "443", "80,443"],
    ),
    (
        "traffic.sidecar.meshctl.io/excludeOutboundPorts",
        &["", "5432"],
    ),
    (
        "traffic.sidecar.meshctl.io/includeOutboundIPRanges",
        &["*", "", "10.0.0.0/8,fd00::/8"],
    ),
    (
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        &["", "169.254.169.254/32"],
    ),
];

fn annotations() -> impl Strategy<Value = Value> {
    let one = (
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        prop::option::weighted(0.25, string()),
    )
        .prop_map(|(k, v, junk)| {
            let (name, valid) = ANNOTATIONS[k.index(ANNOTATIONS.len())];
            (
                name.to_string(),
                Value::String(junk.unwrap_or_else(|| valid[v.index(valid.len())].to_string())),
            )
        });
    prop::collection::vec(one, 0..5).prop_map(|kv| Value::Object(kv.into_iter().collect()))
}

/// A pod-shaped review with generated annotations, labels and containers.
fn shaped_review() -> impl Strategy<Value = Value> {
    let name = || prop_oneof![3 => "[a-z][a-z0-9-]{0,10}", 1 => string()];
    let container = move || {
        (
            name(),
            prop_oneof![3 => Just("app:1".to_string()), 1 => string()],
            prop::collection::vec(prop_oneof![3 => 1i64..65536, 1 => any::<i64>()], 0..3),
        )
            .prop_map(|(name, image, ports)| {
                let ports: Vec<Value> = ports
                    .into_iter()
                    .map(|p| json!({"containerPort": p}))
                    .collect();
                json!({"name": name, "image": image, "ports": ports})
            })
    };
    (
        annotations(),
        prop::collection::btree_map(
            prop::sample::select(vec!["sidecar.meshctl.io/inject", "sidecar.istio.io/inject", "app"]),
            prop_oneof![Just("true".to_string()), Just("false".to_string()), string()],
            0..2,
        ),
        prop::collection::vec(container(), 1..3),
        prop::collection::vec(container(), 0..2),
        prop::bool::weighted(0.1),
        prop_oneof![
            6 => Just("CREATE"),
            1 => prop::sample::select(vec!["UPDATE", "DELETE", "CONNECT", "create"]),
        ],
    )
        .prop_map(|(ann, labels, containers, init, host_network, op)| {
            let pod = json!({
                "metadata": {"generateName": "web-", "annotations": ann, "labels": labels},
                "spec": {"containers": containers, "initContainers": init, "hostNetwork": host_network},
            });
            let mut r = review_for(&pod, "shaped");
            r["request"]["operation"] = json!(op);
            r
        })
}

/// Any JSON, mostly inside a review's envelope so that it gets past the first checks.
fn enveloped_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => json_value(),
        1 => json_value().prop_map(|request| json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request,
        })),
        2 => (json_value(), json_value(), json_value(), json_value()).prop_map(
            |(uid, kind, operation, object)| json!({
                "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "request": {"uid": uid, "kind": kind, "operation": operation, "object": object},
            })
        ),
        2 => (string(), json_value()).prop_map(|(uid, object)| json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "operation": "CREATE", "namespace": "demo", "object": object},
        })),
    ]
}

/// What a user (the API server) sees must be one of two things: a 400 with an error
/// message, or a 200 AdmissionReview response for the request's uid whose patch, if any,
/// applies to the object sent.
fn assert_valid_answer(body: &[u8], a: &Answer) -> Result<(), TestCaseError> {
    match a.status {
        400 => {
            prop_assert_eq!(a.outcome, Outcome::BadRequest);
            let e = a.body["error"].as_str().unwrap_or("");
            prop_assert!(!e.trim().is_empty(), "400 without an error: {}", a.body);
            return Ok(());
        }
        200 => {}
        s => prop_assert!(false, "status {s}: {}", a.body),
    }
    let sent: Value = serde_json::from_slice(body).expect("a 200 answers a JSON body");
    let b = &a.body;
    prop_assert_eq!(&b["apiVersion"], "admission.k8s.io/v1");
    prop_assert_eq!(&b["kind"], "AdmissionReview");
    let r = &b["response"];
    prop_assert_eq!(&r["uid"], &sent["request"]["uid"], "uid echoed");
    prop_assert!(r["uid"].as_str().is_some_and(|u| !u.is_empty()));
    let allowed = r["allowed"].as_bool();
    prop_assert!(allowed.is_some(), "allowed must be a bool: {}", b);
    if allowed == Some(false) {
        prop_assert_eq!(a.outcome, Outcome::Denied);
        let m = r["status"]["message"].as_str().unwrap_or("");
        prop_assert!(
            m.contains("request.object") || m.contains("request.kind"),
            "a denial names the field: {}",
            m
        );
        prop_assert!(r.get("patch").is_none());
    }
    match r.get("patch") {
        None => prop_assert!(a.outcome != Outcome::Injected),
        Some(p) => {
            prop_assert_eq!(a.outcome, Outcome::Injected);
            prop_assert_eq!(&r["patchType"], "JSONPatch");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(p.as_str().unwrap_or("!"))
                .map_err(|e| TestCaseError::fail(format!("patch is not base64: {e}")))?;
            let patch: json_patch::Patch = serde_json::from_slice(&bytes)
                .map_err(|e| TestCaseError::fail(format!("patch is not a JSONPatch: {e}")))?;
            // The API server applies it to the object it sent (apiVersion/kind may be absent
            // there; the webhook fills them in and never patches them).
            let mut object = sent["request"]["object"].clone();
            if let Some(o) = object.as_object_mut() {
                o.entry("apiVersion").or_insert_with(|| json!("v1"));
                o.entry("kind").or_insert_with(|| json!("Pod"));
            }
            json_patch::patch(&mut object, &patch)
                .map_err(|e| TestCaseError::fail(format!("patch does not apply: {e}")))?;
        }
    }
    Ok(())
}

fn namespaces() -> StaticNamespaces {
    let enabled: BTreeMap<String, String> =
        [("mesh-injection".to_string(), "enabled".to_string())].into();
    StaticNamespaces([("demo".to_string(), enabled)].into())
}

fn answer(body: &[u8]) -> Answer {
    handle(body, &InjectionConfig::default(), &namespaces())
}

/// How the answers of one property ended (printed, so a run shows what it reached).
#[derive(Default)]
struct Outcomes(std::sync::Mutex<BTreeMap<&'static str, u32>>);

impl Outcomes {
    fn answer(&self, body: &[u8]) -> Answer {
        let a = answer(body);
        *self
            .0
            .lock()
            .unwrap()
            .entry(a.outcome.as_str())
            .or_default() += 1;
        a
    }

    fn print(&self, name: &str) {
        println!("{name}: outcomes {:?}", self.0.lock().unwrap());
    }
}

#[test]
fn admission_reviews_of_arbitrary_json_get_a_valid_answer() {
    let outcomes = Outcomes::default();
    check("arbitrary JSON review", 256, enveloped_json(), |v| {
        let body = serde_json::to_vec(&v).unwrap();
        assert_valid_answer(&body, &outcomes.answer(&body))
    });
    outcomes.print("arbitrary JSON review");
}

#[test]
fn admission_reviews_with_arbitrary_pod_fields_get_a_valid_answer() {
    let outcomes = Outcomes::default();
    check("pod-shaped review", 256, shaped_review(), |v| {
        let body = serde_json::to_vec(&v).unwrap();
        assert_valid_answer(&body, &outcomes.answer(&body))
    });
    outcomes.print("pod-shaped review");
}

#[test]
fn mutated_real_admission_reviews_get_a_valid_answer() {
    let base = walkthrough_review();
    // The unmutated review is injected: mutations start from a review that goes all the way.
    let body = serde_json::to_vec(&base).unwrap();
    assert_eq!(answer(&body).outcome, Outcome::Injected);
    let outcomes = Outcomes::default();
    check(
        "mutated walkthrough review",
        256,
        prop::collection::vec(edits::edit(key(), json_value()), 1..5),
        |edits| {
            let mut v = base.clone();
            for e in &edits {
                apply_edit(&mut v, e);
            }
            let body = serde_json::to_vec(&v).unwrap();
            assert_valid_answer(&body, &outcomes.answer(&body))
        },
    );
    outcomes.print("mutated walkthrough review");
}

/// A body that is not a review: raw bytes, or the walkthrough review cut short or with a byte
/// changed.
#[derive(Debug, Clone)]
enum Body {
    Raw(Vec<u8>),
    Cut(prop::sample::Index),
    Flip(prop::sample::Index, u8),
}

#[test]
fn admission_review_bodies_of_arbitrary_bytes_get_a_valid_answer() {
    let base = serde_json::to_vec(&walkthrough_review()).unwrap();
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256).prop_map(Body::Raw),
        any::<prop::sample::Index>().prop_map(Body::Cut),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Body::Flip(i, b)),
    ];
    let outcomes = Outcomes::default();
    check("review bytes", 256, body, |b| {
        let body = match b {
            Body::Raw(raw) => raw,
            Body::Cut(i) => base[..i.index(base.len())].to_vec(),
            Body::Flip(i, byte) => {
                let mut v = base.clone();
                v[i.index(base.len())] = byte;
                v
            }
        };
        assert_valid_answer(&body, &outcomes.answer(&body))
    });
    outcomes.print("review bytes");
}

// ---------------------------------------------------------------------------------------
// Install profiles and `--set`.

/// Keys of the install values, so that generated paths and specs reach validation.
const VALUE_KEYS: &[&str] = &[
    "hub",
    "tag",
    "profile",
    "imagePullPolicy",
    "components",
    "base",
    "gatewayApiCrds",
    "controlPlane",
    "ingressGateway",
    "enabled",
    "replicas",
    "logLevel",
    "resources",
    "requests",
    "limits",
    "cpu",
    "memory",
    "podDisruptionBudget",
    "name",
    "service",
    "type",
    "ports",
    "port",
    "targetPort",
    "nodePort",
    "webhook",
    "mode",
    "url",
    "caBundle",
    "failurePolicy",
    "timeoutSeconds",
    "meshConfig",
    "accessLogFile",
    "accessLogEncoding",
    "enableTracing",
    "gatewayApi",
    "gatewayClassName",
    "injection",
    "values",
    "global",
    "pilot",
    "gateways",
    "istio-ingressgateway",
    "ingressGateways",
    "k8s",
    "replicaCount",
    "env",
    "PILOT_ENABLE_GATEWAY_API",
];

fn value_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(VALUE_KEYS).prop_map(String::from),
        1 => "[a-zA-Z0-9_-]{1,8}",
    ]
}

fn set_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => value_key(),
        2 => (value_key(), 0usize..4).prop_map(|(k, i)| format!("{k}[{i}]")),
        1 => (value_key(), "[a-z0-9-]{0,8}").prop_map(|(k, v)| format!("[{k}:{v}]")),
        1 => (value_key(), value_key()).prop_map(|(a, b)| format!("{a}\\.{b}")),
        1 => "[\\[\\]\\\\.:=a-z0-9]{0,6}",
    ]
}

fn set_value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "true",
            "false",
            "0",
            "1",
            "-1",
            "101",
            "1.5",
            "1e400",
            "NaN",
            "",
            "url",
            "service",
            "NodePort",
            "ClusterIP",
            "https://meshd.example:15017/inject",
            "x/y",
            "a b",
            "Always",
            "debug",
            "100m",
            "1Gi",
            "default",
            "demo",
            "minimal",
            "empty",
            "remote",
        ])
        .prop_map(String::from),
        "\\PC{0,12}",
    ]
}

fn set_arg() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (prop::collection::vec(set_segment(), 1..5), set_value())
            .prop_map(|(segs, v)| format!("{}={v}", segs.join("."))),
        1 => "\\PC{0,30}",
    ]
}

/// `--set` errors start with the argument itself.
fn names_the_argument(message: &str, args: &[String]) -> bool {
    args.iter()
        .any(|a| message.starts_with(&format!("--set {a}:")))
}

#[test]
fn set_arguments_never_panic_and_errors_name_the_argument() {
    check(
        "--set on any tree",
        512,
        (json_value(), set_arg()),
        |(mut root, arg)| {
            if let Err(e) = apply_set(&mut root, &arg, &mut Provenance::default()) {
                prop_assert_eq!(&e.arg, &arg);
                let m = e.to_string();
                prop_assert!(names_the_argument(&m, std::slice::from_ref(&arg)), "{}", m);
            }
            Ok(())
        },
    );
}

/// The real profile files and an IstioOperator from the examples.
fn real_inputs() -> Vec<(String, String)> {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut out = Vec::new();
    for f in [
        "profiles/default.yaml",
        "profiles/demo.yaml",
        "profiles/minimal.yaml",
        "profiles/empty.yaml",
        "profiles/remote.yaml",
        "tests/install/istio-gwapi.yaml",
        "examples/seed-walkthrough/istio-gwapi.yaml",
    ] {
        let text =
            std::fs::read_to_string(format!("{root}/{f}")).unwrap_or_else(|e| panic!("{f}: {e}"));
        out.push((f.to_string(), text));
    }
    out
}

/// An edit of YAML text, line by line or byte by byte.
/// A generated install file: a real one edited as text or as a tree, or a generated spec.
#[derive(Debug, Clone)]
enum InstallFile {
    Text(prop::sample::Index, Vec<TextEdit>),
    Tree(prop::sample::Index, Vec<Edit>),
    Generated(&'static str, &'static str, Value),
}

fn install_file() -> impl Strategy<Value = InstallFile> {
    prop_oneof![
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(
                edits::text_edit((value_key(), set_value()).prop_map(|(k, v)| format!("{k}: {v}"))),
                1..4
            )
        )
            .prop_map(|(i, e)| InstallFile::Text(i, e)),
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(edits::edit(key(), json_value()), 1..4)
        )
            .prop_map(|(i, e)| InstallFile::Tree(i, e)),
        (
            prop::sample::select(vec![
                "install.meshctl.io/v1alpha1",
                "install.istio.io/v1alpha1",
                "v1",
            ]),
            prop::sample::select(vec!["MeshOperator", "IstioOperator", "ConfigMap"]),
            json_value(),
        )
            .prop_map(|(a, k, spec)| InstallFile::Generated(a, k, spec)),
    ]
}

fn render(f: &InstallFile, real: &[(String, String)]) -> String {
    match f {
        InstallFile::Text(i, edits) => {
            let mut t = real[i.index(real.len())].1.clone();
            for e in edits {
                t = apply_text_edit(&t, e);
            }
            t
        }
        InstallFile::Tree(i, edits) => {
            let (_, docs) = meshctl::kube_yaml::parse_stream(&real[i.index(real.len())].1)
                .expect("real inputs parse");
            let mut v = docs[0].value.clone();
            for e in edits {
                apply_edit(&mut v, e);
            }
            // JSON is YAML.
            serde_json::to_string_pretty(&v).unwrap()
        }
        InstallFile::Generated(api, kind, spec) => serde_json::to_string(
            &json!({"apiVersion": api, "kind": kind, "metadata": {"name": "gen"}, "spec": spec}),
        )
        .unwrap(),
    }
}

#[test]
fn install_inputs_never_panic_and_errors_name_the_file_or_argument() {
    let real = real_inputs();
    // The real inputs resolve as they are (the remote profile needs its webhook URL).
    for (name, text) in &real {
        let input = Input {
            name: name.clone(),
            text: text.clone(),
        };
        match resolve(&[input], &[]) {
            Err(e) if name.ends_with("remote.yaml") => {
                assert!(e.to_string().contains("spec.webhook.url"), "{e}")
            }
            Err(e) => panic!("{name}: {e}"),
            Ok(_) => assert!(!name.ends_with("remote.yaml")),
        }
    }
    check(
        "install files and --set",
        256,
        (
            prop::collection::vec(install_file(), 0..3),
            prop::collection::vec(set_arg(), 0..3),
        ),
        |(files, sets)| {
            let inputs: Vec<Input> = files
                .iter()
                .enumerate()
                .map(|(i, f)| Input {
                    name: format!("input-{i}.yaml"),
                    text: render(f, &real),
                })
                .collect();
            if let Err(e) = resolve(&inputs, &sets) {
                let m = e.to_string();
                // A value no input set is the profile's, and the error says so.
                let named = inputs
                    .iter()
                    .any(|i| m.starts_with(&format!("{}: ", i.name)))
                    || names_the_argument(&m, &sets)
                    || profile_names()
                        .iter()
                        .any(|p| m.starts_with(&format!("profile {p}: spec.")));
                prop_assert!(named, "the error names no input: {}", m);
            }
            Ok(())
        },
    );
}
