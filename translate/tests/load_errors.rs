//! Every load error names the file, the document and the field.

use mesh_translate::{LoadError, LoadOptions, load, load_str};

fn opts() -> LoadOptions {
    LoadOptions {
        default_namespace: "demo".into(),
    }
}

fn errors(name: &str, text: &str) -> Vec<String> {
    let e: LoadError = load_str(name, text, &opts()).expect_err("should fail");
    e.problems.iter().map(|p| p.to_string()).collect()
}

const ROUTE_HEAD: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: myapp-route
spec:
  parentRefs:
  - name: gw
";

#[test]
fn type_error_names_file_document_object_and_field() {
    let text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n---\n{ROUTE_HEAD}  rules:\n  - backendRefs:\n    - name: a\n      port: 80\n    - name: b\n      port: 80\n      weight: x\n"
    );
    let e = errors("httproute.yaml", &text);
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(
        e[0].starts_with(
            "httproute.yaml: document 2 (HTTPRoute demo/myapp-route): spec.rules[0].backendRefs[1].weight: invalid type: string \"x\", expected i32"
        ),
        "{e:#?}"
    );
}

#[test]
fn unknown_fields_are_errors_with_paths_and_all_are_reported() {
    let text = format!(
        "{ROUTE_HEAD}  rules:\n  - matches:\n    - path:\n        type: PathPrefix\n        valu: /x\n    backendRef:\n    - name: a\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: s\n  labelz: {{}}\nspec:\n  ports:\n  - port: 80\n"
    );
    let e = errors("r.yaml", &text);
    assert_eq!(e.len(), 3, "{e:#?}");
    assert!(e.contains(&"r.yaml: document 1 (HTTPRoute demo/myapp-route): spec.rules[0].matches[0].path.valu: unknown field".to_string()), "{e:#?}");
    assert!(e.contains(&"r.yaml: document 1 (HTTPRoute demo/myapp-route): spec.rules[0].backendRef: unknown field".to_string()), "{e:#?}");
    assert!(
        e.contains(
            &"r.yaml: document 2 (Service demo/s): metadata.labelz: unknown field".to_string()
        ),
        "{e:#?}"
    );
}

#[test]
fn known_but_unsupported_fields_say_so() {
    let text = format!(
        "{ROUTE_HEAD}  rules:\n  - sessionPersistence:\n      sessionName: x\n    retry:\n      attempts: 2\n"
    );
    let e = errors("r.yaml", &text);
    assert_eq!(e.len(), 2, "{e:#?}");
    assert!(
        e.iter()
            .any(|e| e.contains("spec.rules[0].sessionPersistence: not supported by meshctl")),
        "{e:#?}"
    );
    assert!(
        e.iter()
            .any(|e| e.contains("spec.rules[0].retry: not supported by meshctl")),
        "{e:#?}"
    );
}

#[test]
fn unsupported_filters_are_errors() {
    let text = format!(
        "{ROUTE_HEAD}  rules:\n  - filters:\n    - type: ExtensionRef\n      extensionRef: {{group: x.io, kind: F, name: f}}\n    - type: CORS\n      cors: {{allowOrigins: ['*']}}\n"
    );
    let e = errors("r.yaml", &text);
    assert!(
        e.iter().any(|e| e.ends_with(
            "spec.rules[0].filters[0].type: ExtensionRef filters are not supported by meshctl"
        )),
        "{e:#?}"
    );
    assert!(
        e.iter().any(|e| e
            .ends_with("spec.rules[0].filters[1].type: CORS filters are not supported by meshctl")),
        "{e:#?}"
    );
}

#[test]
fn value_checks_name_fields() {
    let text = format!(
        "{ROUTE_HEAD}  rules:\n  - matches:\n    - path: {{type: RegularExpression, value: '/(a'}}\n    - path: {{type: Exact, value: 'nope'}}\n    timeouts: {{request: 10x}}\n    backendRefs:\n    - {{name: a, port: 70000}}\n"
    );
    let e = errors("r.yaml", &text);
    let fields: Vec<&str> = e.iter().map(|e| e.split(": ").nth(2).unwrap()).collect();
    assert_eq!(
        fields,
        [
            "spec.rules[0].matches[0].path.value",
            "spec.rules[0].matches[1].path.value",
            "spec.rules[0].backendRefs[0].port",
            "spec.rules[0].timeouts.request"
        ],
        "{e:#?}"
    );
}

#[test]
fn yaml_syntax_error_names_file_and_document() {
    let e = errors(
        "bad.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\nkind: [unclosed\n",
    );
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("bad.yaml: document 2: invalid YAML"),
        "{e:#?}"
    );
}

#[test]
fn json_and_list_items() {
    let text = r#"{"apiVersion":"v1","kind":"List","items":[
        {"apiVersion":"v1","kind":"Service","metadata":{"name":"ok"},"spec":{"ports":[{"port":80}]}},
        {"apiVersion":"v1","kind":"Service","metadata":{"name":"bad"},"spec":{"ports":[{"port":"eighty"}]}}
    ]}"#;
    let e = errors("list.json", text);
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(
        e[0].starts_with(
            "list.json: document 1 (items[1]: Service demo/bad): spec.ports[0].port: invalid type"
        ),
        "{e:#?}"
    );
    let ok = load_str(
        "list.json",
        r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Service","metadata":{"name":"ok","namespace":"x"},"spec":{"ports":[{"port":80}]}}]}"#,
        &opts(),
    )
    .unwrap();
    assert_eq!(ok.resources.services.len(), 1);
    assert_eq!(
        ok.resources.services[0].metadata.namespace.as_deref(),
        Some("x")
    );
}

#[test]
fn missing_kind_unsupported_version_and_duplicates() {
    let e = errors(
        "x.yaml",
        "apiVersion: v1\nmetadata: {name: a}\n---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: HTTPRoute\nmetadata: {name: r}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\n",
    );
    assert_eq!(e.len(), 3, "{e:#?}");
    assert_eq!(e[0], "x.yaml: document 1: kind: required");
    assert!(e[1].starts_with("x.yaml: document 2 (HTTPRoute demo/r): apiVersion: HTTPRoute gateway.networking.k8s.io/v1alpha2 is not supported"), "{e:#?}");
    assert_eq!(
        e[2],
        "x.yaml: document 4 (Service demo/s): defined twice (first in x.yaml: document 3)"
    );
}

#[test]
fn other_kinds_are_ignored_with_a_warning() {
    let l = load_str(
        "c.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: b}\n",
        &opts(),
    )
    .unwrap();
    assert_eq!(l.warnings.len(), 1);
    assert_eq!(
        l.warnings[0].to_string(),
        "c.yaml: document 1 (ConfigMap demo/c): ConfigMap (v1) is not used by the proxy; ignored"
    );
}

const EF_HEAD: &str = "apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata:
  name: rl
spec:
  configPatches:
  - applyTo: HTTP_FILTER
    match:
      context: GATEWAY
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.local_ratelimit
        typed_config:
          \"@type\": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
          value:
            stat_prefix: x
            token_bucket: {max_tokens: 10, tokens_per_fill: 5, fill_interval: 60s}
";

#[test]
fn envoy_filter_partial_percent_and_unknown_fields_are_errors() {
    let text = format!(
        "{EF_HEAD}            filter_enabled:\n              default_value: {{numerator: 50, denominator: HUNDRED}}\n            filter_enforced:\n              default_value: {{numerator: 100, denominator: HUNDRED}}\n            bogus: 1\n"
    );
    let e = errors("ef.yaml", &text);
    assert_eq!(e.len(), 1, "{e:#?}");
    assert_eq!(
        e[0],
        "ef.yaml: document 1 (EnvoyFilter demo/rl): spec.configPatches[0].patch.value.typed_config.value.bogus: unknown field"
    );
    let text = format!(
        "{EF_HEAD}            filter_enabled:\n              default_value: {{numerator: 50, denominator: HUNDRED}}\n            filter_enforced:\n              default_value: {{numerator: 100, denominator: HUNDRED}}\n"
    );
    let e = errors("ef.yaml", &text);
    assert_eq!(
        e,
        [
            "ef.yaml: document 1 (EnvoyFilter demo/rl): spec.configPatches[0].patch.value.typed_config.value.filter_enabled.default_value: 50% is not supported: only 100% (or 0%)"
        ]
    );
}

#[test]
fn envoy_filter_other_patches_are_errors() {
    let text = "apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: other}
spec:
  configPatches:
  - applyTo: CLUSTER
    patch:
      operation: MERGE
      value: {name: x}
  - applyTo: HTTP_FILTER
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.lua
";
    let e = errors("ef.yaml", text);
    assert_eq!(
        e,
        [
            "ef.yaml: document 1 (EnvoyFilter demo/other): spec.configPatches[0].applyTo: \"CLUSTER\" is not supported: only HTTP_FILTER patches inserting envoy.filters.http.local_ratelimit",
            "ef.yaml: document 1 (EnvoyFilter demo/other): spec.configPatches[0].patch.operation: \"MERGE\" is not supported: only inserting envoy.filters.http.local_ratelimit (INSERT_BEFORE, INSERT_AFTER, INSERT_FIRST, ADD)",
            "ef.yaml: document 1 (EnvoyFilter demo/other): spec.configPatches[0].patch.value.name: \"x\" is not supported: only envoy.filters.http.local_ratelimit",
            "ef.yaml: document 1 (EnvoyFilter demo/other): spec.configPatches[1].patch.value.name: \"envoy.filters.http.lua\" is not supported: only envoy.filters.http.local_ratelimit",
        ]
    );
}

#[test]
fn rate_limit_policy_checks() {
    let text = "apiVersion: policy.meshctl.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: p}
spec:
  targetRefs:
  - {group: apps, kind: Deployment, name: x}
  maxTokens: 0
  tokensPerFill: 1
  fillInterval: soon
  mode: Global
";
    let e = errors("p.yaml", text);
    assert_eq!(
        e,
        [
            "p.yaml: document 1 (RateLimitPolicy demo/p): spec.mode: unknown variant `Global`, expected `Local` or `Distributed`"
        ]
    );
    let e = errors("p.yaml", &text.replace("  mode: Global\n", ""));
    assert_eq!(e.len(), 3, "{e:#?}");
    assert!(e[0].ends_with("spec.targetRefs[0]: group \"apps\" kind \"Deployment\" is not supported (Gateway or HTTPRoute in gateway.networking.k8s.io, Service in \"\")"));
    assert!(e[1].ends_with("spec.maxTokens: must be at least 1"));
    assert!(e[2].contains("spec.fillInterval: \"soon\" is not a duration"));
}

#[test]
fn directory_loading_skips_other_files_and_sorts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("b.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: b}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("a.yml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("c.json"),
        r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"c"}}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not yaml: [").unwrap();
    let l = load(&[dir.path()], &opts()).unwrap();
    let names: Vec<_> = l
        .resources
        .services
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    let e = load(&[dir.path().join("missing.yaml")], &opts()).unwrap_err();
    assert!(
        e.to_string().contains("missing.yaml: cannot read file"),
        "{e}"
    );
}

#[test]
fn a_path_normalization_istio_does_not_know_is_an_error() {
    let text = "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nmetadata: {name: p}\nspec:\n  meshConfig:\n    pathNormalization: {normalization: SQUASH}\n";
    let e = errors("profile.yaml", text);
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(
        e[0].starts_with("profile.yaml: document 1 (IstioOperator demo/p): spec.meshConfig.pathNormalization.normalization: \"SQUASH\" is not a path normalization"),
        "{e:#?}"
    );
}
