//! Property-based tests of loading Kubernetes objects from YAML/JSON (`load_str`): the real
//! example resources edited as text or as trees, and generated documents of every kind we
//! read. Loading never panics; every error names the file and, for a problem inside a
//! document, the document; what loads translates (gateway and sidecar) to a config that
//! validates (the proxy treats anything else as a translator bug).
//!
//! Cases: `PROPTEST_CASES` (default [`DEFAULT_CASES`]); `bench/fuzz.sh` runs many more.

use std::path::{Path, PathBuf};

use mesh_translate::{
    LoadOptions, SidecarOptions, TranslateOptions, load_str, translate, translate_sidecar,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};

#[path = "../../tests/support/edits.rs"]
mod edits;
use edits::{Edit, TextEdit, apply_edit, apply_text_edit};

const DEFAULT_CASES: u32 = 128;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

fn opts() -> LoadOptions {
    LoadOptions {
        default_namespace: "demo".into(),
    }
}

/// The example walkthrough's resources and their endpoints, one document each.
fn real_documents() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in [
        root.join("../examples/seed-walkthrough"),
        root.join("tests/fixtures/seed-endpoints"),
    ] {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        v.sort();
        files.extend(v);
    }
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for d in mesh_translate::split_yaml_stream(&text) {
            docs.push(d.text.trim().to_string());
        }
    }
    docs
}

// ---------------------------------------------------------------------------------------
// Generators.

const KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "namespace",
    "labels",
    "annotations",
    "spec",
    "gatewayClassName",
    "controllerName",
    "listeners",
    "port",
    "protocol",
    "hostname",
    "allowedRoutes",
    "parentRefs",
    "hostnames",
    "rules",
    "matches",
    "path",
    "type",
    "value",
    "headers",
    "queryParams",
    "method",
    "filters",
    "backendRefs",
    "weight",
    "group",
    "sectionName",
    "timeouts",
    "request",
    "ports",
    "targetPort",
    "clusterIP",
    "selector",
    "endpoints",
    "addresses",
    "conditions",
    "ready",
    "targetRef",
    "targetRefs",
    "limit",
    "requests",
    "unit",
    "mode",
    "configPatches",
    "applyTo",
    "match",
    "context",
    "patch",
    "operation",
    "typed_config",
    "token_bucket",
    "max_tokens",
    "tokens_per_fill",
    "fill_interval",
    "workloadSelector",
    "items",
    "from",
    "to",
    "addressType",
];

const STRINGS: &[&str] = &[
    "",
    "v1",
    "gateway.networking.k8s.io/v1",
    "Gateway",
    "HTTPRoute",
    "Service",
    "demo",
    "istio",
    "HTTP",
    "HTTPS",
    "PathPrefix",
    "Exact",
    "RegularExpression",
    "/",
    "/api",
    "*",
    "*.example.com",
    "80",
    "8080",
    "10.0.0.1",
    "::1",
    "1s",
    "0s",
    "-1s",
    "100ms",
    "IPv4",
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestRedirect",
    "URLRewrite",
    "HTTP_FILTER",
    "GATEWAY",
    "SIDECAR_INBOUND",
    "ANY",
    "INSERT_BEFORE",
    "Local",
    "Distributed",
    "Minute",
    "Second",
    "(",
    "[a-",
    "true",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(KEYS).prop_map(String::from),
        1 => "\\PC{0,8}",
    ]
}

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(STRINGS).prop_map(String::from),
        1 => "\\PC{0,12}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-100i64..70_000).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        string().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 48, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The kinds the loader reads (and one it ignores).
const KINDS: &[(&str, &str)] = &[
    ("gateway.networking.k8s.io/v1", "GatewayClass"),
    ("gateway.networking.k8s.io/v1", "Gateway"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("gateway.networking.k8s.io/v1beta1", "ReferenceGrant"),
    ("v1", "Service"),
    ("v1", "Namespace"),
    ("v1", "List"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
    ("policy.meshctl.io/v1alpha1", "RateLimitPolicy"),
    ("networking.istio.io/v1alpha3", "EnvoyFilter"),
    ("install.istio.io/v1alpha1", "IstioOperator"),
    ("gateway.networking.k8s.io/v2", "Gateway"),
    ("apps/v1", "Deployment"),
];

/// A resources file: the real documents edited as text or as trees, plus generated ones.
#[derive(Debug, Clone)]
enum Resources {
    /// All real documents in one YAML stream, the stream edited as text.
    Text(Vec<TextEdit>),
    /// All real documents, some edited as trees, written as YAML (JSON flow style) or as a
    /// JSON `List`.
    Tree(Vec<(prop::sample::Index, Edit)>, bool),
    /// Real documents and generated objects of the kinds we read.
    Generated(Vec<(prop::sample::Index, Option<String>, Value)>),
}

fn resources() -> impl Strategy<Value = Resources> {
    let kind = any::<prop::sample::Index>();
    prop_oneof![
        prop::collection::vec(
            edits::text_edit((key(), string()).prop_map(|(k, v)| format!("{k}: {v}"))),
            1..4,
        )
        .prop_map(Resources::Text),
        (
            prop::collection::vec(
                (
                    any::<prop::sample::Index>(),
                    edits::edit(key(), json_value())
                ),
                1..4
            ),
            any::<bool>()
        )
            .prop_map(|(e, json)| Resources::Tree(e, json)),
        prop::collection::vec(
            (kind, prop::option::of("[a-z][a-z0-9-]{0,6}"), json_value()),
            1..4
        )
        .prop_map(Resources::Generated),
    ]
}

/// The file name and text of a generated case.
fn render(r: &Resources, real: &[String], parsed: &[Value]) -> (String, String) {
    match r {
        Resources::Text(edits) => {
            let mut t = real.join("\n---\n");
            for e in edits {
                t = apply_text_edit(&t, e);
            }
            ("resources.yaml".into(), t)
        }
        Resources::Tree(edits, as_json) => {
            let mut docs = parsed.to_vec();
            for (i, e) in edits {
                let n = docs.len();
                apply_edit(&mut docs[i.index(n)], e);
            }
            if *as_json {
                let list = json!({"apiVersion": "v1", "kind": "List", "items": docs});
                (
                    "resources.json".into(),
                    serde_json::to_string(&list).unwrap(),
                )
            } else {
                let texts: Vec<String> = docs
                    .iter()
                    .map(|d| serde_json::to_string(d).unwrap())
                    .collect();
                ("resources.yaml".into(), texts.join("\n---\n"))
            }
        }
        Resources::Generated(objects) => {
            let mut texts: Vec<String> = real.to_vec();
            for (k, name, spec) in objects {
                let (api, kind) = KINDS[k.index(KINDS.len())];
                let mut o = json!({"apiVersion": api, "kind": kind,
                    "metadata": {"name": name}, "spec": spec});
                if kind == "List" {
                    o["items"] = json!([spec]);
                }
                texts.push(serde_json::to_string(&o).unwrap());
            }
            ("resources.yaml".into(), texts.join("\n---\n"))
        }
    }
}

/// Checks one file; `Ok(true)` when it loaded.
fn check_case(name: &str, text: &str) -> Result<bool, TestCaseError> {
    match load_str(name, text, &opts()) {
        Err(e) => {
            prop_assert!(!e.problems.is_empty());
            for p in &e.problems {
                prop_assert_eq!(p.file.as_path(), Path::new(name));
                let m = p.to_string();
                prop_assert!(m.starts_with(&format!("{name}: ")), "{}", m);
                // A problem inside a YAML stream says which document; a JSON file is one.
                if name.ends_with(".yaml") {
                    prop_assert!(p.document.is_some(), "no document named: {}", m);
                }
                prop_assert!(!p.message.trim().is_empty(), "{}", m);
            }
            Ok(false)
        }
        Ok(loaded) => {
            let t = translate(&loaded.resources, &TranslateOptions::default());
            if let Err(errs) = t.config.validate() {
                let lines: Vec<String> = errs.iter().map(ToString::to_string).collect();
                prop_assert!(false, "translated config is invalid:\n{}", lines.join("\n"));
            }
            let s = translate_sidecar(
                &loaded.resources,
                &SidecarOptions {
                    base: TranslateOptions::default(),
                    pod_namespace: "demo".into(),
                    pod_name: "myapp-1".into(),
                    pod_ip: Some("10.244.0.5".parse().unwrap()),
                    pod_labels: None,
                    inbound_port: 15006,
                    outbound_port: 15001,
                },
            );
            if let Err(errs) = s.config.validate() {
                let lines: Vec<String> = errs.iter().map(ToString::to_string).collect();
                prop_assert!(
                    false,
                    "translated sidecar config is invalid:\n{}",
                    lines.join("\n")
                );
            }
            Ok(true)
        }
    }
}

#[test]
fn resource_files_never_panic_errors_name_file_and_document_and_what_loads_translates() {
    let real = real_documents();
    let parsed: Vec<Value> = real
        .iter()
        .map(|d| serde_saphyr::from_str::<Value>(d).expect("real documents parse"))
        .collect();
    // The unedited examples load and translate.
    assert!(
        check_case("resources.yaml", &real.join("\n---\n")).unwrap(),
        "the examples load"
    );
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let loaded = std::sync::atomic::AtomicU32::new(0);
    let result = runner.run(&resources(), |r| {
        let (name, text) = render(&r, &real, &parsed);
        if check_case(&name, &text)? {
            loaded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    println!(
        "resource files: {} cases passed, {} loaded",
        runner.config().cases,
        loaded.load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// Aliases that expand exponentially ("billion laughs") are refused with the file and document named, not expanded.
#[test]
fn exponential_yaml_aliases_are_refused() {
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let p = i - 1;
        text.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    let e = load_str("laughs.yaml", &text, &opts()).expect_err("refused");
    let m = e.to_string();
    println!("{m}");
    assert!(m.starts_with("laughs.yaml: "), "{m}");
}
