//! Unit tests of profiles, IstioOperator mapping and the typed values.

use super::profile::{Input, ProfileError, profile_names, resolve};
use super::values::{FailurePolicy, ServiceType, WebhookMode};

fn input(name: &str, text: &str) -> Input {
    Input {
        name: name.into(),
        text: text.into(),
    }
}

fn sets(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

#[test]
fn every_profile_resolves() {
    for p in profile_names() {
        let mut s = vec![format!("profile={p}")];
        if p == "remote" {
            s.push("webhook.url=https://192.0.2.10:15017/inject".into());
        }
        let r = resolve(&[], &s).unwrap_or_else(|e| panic!("{p}: {e}"));
        assert_eq!(r.profile, p);
        assert!(r.warnings.is_empty());
        assert_eq!(r.values.tag, env!("CARGO_PKG_VERSION"));
    }
    let d = resolve(&[], &[]).unwrap();
    assert_eq!(d.profile, "default");
    assert!(d.values.components.ingress_gateway.enabled);
    assert_eq!(d.values.webhook.failure_policy, FailurePolicy::Fail);
    let m = resolve(&[], &sets(&["profile=minimal"])).unwrap();
    assert!(!m.values.components.ingress_gateway.enabled);
    assert!(m.values.components.control_plane.enabled);
    let demo = resolve(&[], &sets(&["profile=demo"])).unwrap();
    assert_eq!(demo.values.mesh_config.access_log_file, "/dev/stdout");
    // demo overrides one resource value; the rest stays from default.
    let r = &demo.values.components.control_plane.resources;
    assert_eq!(r.requests.cpu.as_deref(), Some("10m"));
    assert_eq!(r.limits.memory.as_deref(), Some("512Mi"));
}

#[test]
fn remote_needs_a_url() {
    let e = resolve(&[], &sets(&["profile=remote"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("profile remote: spec.webhook.url"), "{e}");
    let e = resolve(
        &[],
        &sets(&["profile=remote", "webhook.url=http://x/inject"]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--set webhook.url=http://x/inject: spec.webhook.url"),
        "{e}"
    );
    let r = resolve(
        &[],
        &sets(&["profile=remote", "webhook.url=https://[::1]:9/inject"]),
    )
    .unwrap();
    assert_eq!(r.values.webhook.mode, WebhookMode::Url);
    assert!(!r.values.components.control_plane.enabled);
}

#[test]
fn overlay_order_default_profile_files_sets() {
    let f1 = input(
        "f1.yaml",
        "apiVersion: install.meshctl.io/v1alpha1\nkind: MeshOperator\nspec:\n  profile: demo\n  hub: reg.example/one\n  components:\n    ingressGateway:\n      replicas: 3\n      service:\n        ports: [{name: http, port: 80, targetPort: 8080}]\n",
    );
    let f2 = input(
        "f2.yaml",
        "apiVersion: install.meshctl.io/v1alpha1\nkind: MeshOperator\nspec:\n  hub: reg.example/two\n  tag: 1.10\n",
    );
    let r = resolve(
        &[f1, f2],
        &sets(&[
            "components.ingressGateway.replicas=2",
            "tag=1.20",
            "components.ingressGateway.service.ports[0].nodePort=30080",
            "components.ingressGateway.service.type=NodePort",
        ]),
    )
    .unwrap();
    assert_eq!(r.profile, "demo");
    assert_eq!(
        r.values.mesh_config.access_log_file, "/dev/stdout",
        "profile applied"
    );
    assert_eq!(r.values.hub, "reg.example/two", "later file wins");
    assert_eq!(r.values.tag, "1.20", "--set wins, kept as a string");
    let gw = &r.values.components.ingress_gateway;
    assert_eq!(gw.replicas, 2);
    assert_eq!(gw.service.ports.len(), 1, "lists replace");
    assert_eq!(gw.service.ports[0].node_port, Some(30080));
    assert_eq!(gw.service.type_, ServiceType::NodePort);
    assert_eq!(
        r.values.injection_config().unwrap().proxy_image(),
        "reg.example/two/mesh-proxy:1.20"
    );
}

#[test]
fn errors_name_the_source_and_field() {
    let f = input(
        "mine.yaml",
        "apiVersion: install.meshctl.io/v1alpha1\nkind: MeshOperator\nspec:\n  components:\n    controlPlane:\n      replicaz: 2\n",
    );
    let e = resolve(&[f], &[]).unwrap_err().to_string();
    assert!(
        e.starts_with("mine.yaml: spec.components.controlPlane.replicaz"),
        "{e}"
    );
    let f = input(
        "mine.yaml",
        "apiVersion: install.meshctl.io/v1alpha1\nkind: MeshOperator\nspec:\n  webhook:\n    failurePolicy: Sometimes\n",
    );
    let e = resolve(&[f], &[]).unwrap_err().to_string();
    assert!(
        e.starts_with("mine.yaml: spec.webhook.failurePolicy"),
        "{e}"
    );
    let e = resolve(
        &[],
        &sets(&["components.controlPlane.resources.limits.cpu=lots"]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--set components.controlPlane.resources.limits.cpu=lots: spec.components.controlPlane.resources.limits.cpu"),
        "{e}"
    );
    let e = resolve(&[], &sets(&["injection.proxy.uid=abc"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("spec.injection.proxy.uid"), "{e}");
    let e = resolve(&[], &sets(&["profile=huge"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown profile \"huge\""), "{e}");
    let e = resolve(&[input("x.yaml", "apiVersion: v1\nkind: ConfigMap\n")], &[]).unwrap_err();
    assert!(matches!(e, ProfileError::Input { .. }));
    assert!(e.to_string().starts_with("x.yaml: apiVersion/kind"), "{e}");
    let e = resolve(&[input("two.yaml", "a: 1\n---\nb: 2\n")], &[]).unwrap_err();
    assert!(e.to_string().contains("exactly one"), "{e}");
    let e = resolve(&[], &sets(&["components.controlPlane.enabled=false"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("spec.webhook.mode: service mode needs"), "{e}");
}

#[test]
fn the_walkthrough_istio_operator_maps_with_one_warning_for_the_rest() {
    let walkthrough = include_str!("../../tests/install/istio-gwapi.yaml");
    let r = resolve(&[input("istio-gwapi.yaml", walkthrough)], &[]).unwrap();
    assert_eq!(r.profile, "default");
    assert_eq!(r.values.mesh_config.access_log_file, "/dev/stdout");
    assert!(!r.values.mesh_config.enable_tracing);
    assert!(r.values.components.ingress_gateway.enabled);
    assert_eq!(
        r.values.components.ingress_gateway.service.type_,
        ServiceType::NodePort
    );
    assert!(r.values.gateway_api.enabled);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);

    let extra = "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nmetadata: {name: x}\nspec:\n  profile: minimal\n  hub: docker.io/istio\n  tag: 1.22\n  namespace: istio-system\n  meshConfig:\n    accessLogFile: /dev/stdout\n    outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n  components:\n    pilot: {enabled: true, k8s: {replicaCount: 2, hpaSpec: {maxReplicas: 5}}}\n    ingressGateways:\n    - name: istio-ingressgateway\n      enabled: true\n      k8s: {service: {type: ClusterIP}}\n    - name: other\n      enabled: true\n  values:\n    global: {proxy: {privileged: true}}\n    pilot: {env: {PILOT_ENABLE_GATEWAY_API: \"false\", OTHER: \"1\"}}\n    sidecarInjectorWebhook: {rewriteAppHTTPProbe: \"false\"}\n";
    let r = resolve(&[input("io.yaml", extra)], &[]).unwrap();
    assert_eq!(r.profile, "minimal");
    assert_eq!(r.values.hub, "docker.io/istio");
    assert_eq!(r.values.tag, "1.22");
    assert_eq!(r.values.components.control_plane.replicas, 2);
    assert!(r.values.components.ingress_gateway.enabled);
    assert_eq!(
        r.values.components.ingress_gateway.service.type_,
        ServiceType::ClusterIP
    );
    assert!(!r.values.gateway_api.enabled);
    // Istio's switch for rewriting app probes reaches the injection config.
    assert!(!r.values.injection_config().unwrap().rewrite_app_http_probe);
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert_eq!(
        r.warnings[0],
        "io.yaml: IstioOperator x: not supported, ignored: spec.components.ingressGateways[0].enabled, \
         spec.components.ingressGateways[0].name, spec.components.pilot.k8s.hpaSpec.maxReplicas, \
         spec.meshConfig.outboundTrafficPolicy.mode, spec.namespace, spec.values.global.proxy.privileged, \
         spec.values.pilot.env.OTHER"
    );
}

#[test]
fn readiness_reasons() {
    use super::cluster::not_ready_reason;
    use serde_json::json;
    let d = |spec: i64, gen_: i64, status: serde_json::Value| json!({"metadata": {"generation": gen_}, "spec": {"replicas": spec}, "status": status});
    assert_eq!(
        not_ready_reason("Deployment", &d(1, 2, json!({"observedGeneration": 1}))).as_deref(),
        Some("the new spec is not observed yet")
    );
    assert_eq!(
        not_ready_reason(
            "Deployment",
            &d(2, 1, json!({"observedGeneration": 1, "updatedReplicas": 2, "availableReplicas": 1, "replicas": 2}))
        )
        .as_deref(),
        Some("1/2 replicas available")
    );
    assert_eq!(
        not_ready_reason(
            "Deployment",
            &d(
                1,
                1,
                json!({"observedGeneration": 1, "updatedReplicas": 1, "availableReplicas": 1, "replicas": 1})
            )
        ),
        None
    );
    assert!(not_ready_reason("CustomResourceDefinition", &json!({})).is_some());
    assert_eq!(
        not_ready_reason(
            "CustomResourceDefinition",
            &json!({"status": {"conditions": [{"type": "Established", "status": "True"}]}})
        ),
        None
    );
    assert_eq!(not_ready_reason("ConfigMap", &json!({})), None);
}

#[test]
fn mesh_config_path_normalization_reaches_the_control_plane() {
    let io = "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nmetadata: {name: p}\nspec:\n  meshConfig:\n    pathNormalization: {normalization: MERGE_SLASHES}\n";
    let r = resolve(&[input("p.yaml", io)], &[]).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let objects = super::render::render(&r, None).unwrap();
    let values: Vec<&serde_json::Value> = objects.iter().map(|o| &o.value).collect();
    let meshd = serde_json::to_string(&values).unwrap();
    assert!(
        meshd.contains("--path-normalization=MERGE_SLASHES"),
        "{meshd}"
    );
    // Without it the flag is left out (the proxies' BASE applies).
    let r = resolve(&[], &[]).unwrap();
    let objects = super::render::render(&r, None).unwrap();
    let values: Vec<&serde_json::Value> = objects.iter().map(|o| &o.value).collect();
    let text = serde_json::to_string(&values).unwrap();
    assert!(!text.contains("--path-normalization"));
    // A value Istio does not know names the field.
    let bad = io.replace("MERGE_SLASHES", "SQUASH");
    let e = resolve(&[input("p.yaml", &bad)], &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("pathNormalization"), "{e}");
}

#[test]
fn mesh_config_trust_domain_reaches_the_control_plane() {
    let rendered = |inputs: &[Input]| {
        let r = resolve(inputs, &[]).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let objects = super::render::render(&r, None).unwrap();
        let values: Vec<&serde_json::Value> = objects.iter().map(|o| &o.value).collect();
        serde_json::to_string(&values).unwrap()
    };
    // Istio's field, and ours.
    let io = "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nmetadata: {name: p}\nspec:\n  meshConfig:\n    trustDomain: example.org\n";
    assert!(rendered(&[input("p.yaml", io)]).contains("--trust-domain=example.org"));
    let mo = "apiVersion: install.meshctl.io/v1alpha1\nkind: MeshOperator\nmetadata: {name: p}\nspec:\n  meshConfig:\n    trustDomain: corp.example\n";
    assert!(rendered(&[input("p.yaml", mo)]).contains("--trust-domain=corp.example"));
    // The default: cluster.local.
    assert!(rendered(&[]).contains("--trust-domain=cluster.local"));
    // Something that is not a trust domain names the field.
    let bad = io.replace("example.org", "Example.org/x");
    let e = resolve(&[input("p.yaml", &bad)], &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("meshConfig.trustDomain"), "{e}");
}
