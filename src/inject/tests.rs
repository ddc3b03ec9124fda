#![allow(clippy::field_reassign_with_default)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

use super::config::Policy;
use super::*;

fn pod(
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
    extra_spec: serde_json::Value,
) -> PodTemplateSpec {
    let m = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let mut spec = json!({"containers": [{"name": "app", "image": "app:1"}]});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra_spec.as_object()) {
        s.extend(e.clone());
    }
    serde_json::from_value(json!({
        "metadata": {"labels": m(labels), "annotations": m(annotations)},
        "spec": spec,
    }))
    .unwrap()
}

fn ns(name: &str, labels: &[(&str, &str)]) -> NamespaceInfo {
    NamespaceInfo {
        name: Some(name.into()),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn sel(k: &str, v: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some([(k.to_string(), v.to_string())].into()),
        match_expressions: None,
    }
}

/// The decision table of `decision.rs`, row by row.
#[test]
fn decision_table() {
    let mut cfg = InjectionConfig::default();
    cfg.never_inject_selector = vec![sel("never", "yes")];
    cfg.always_inject_selector = vec![LabelSelector {
        match_labels: None,
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "always".into(),
            operator: "Exists".into(),
            values: None,
        }]),
    }];
    let on = [("mesh-injection", "enabled")];
    let istio_on = [("istio-injection", "enabled")];
    let off = [("mesh-injection", "disabled")];
    let istio_off = [("istio-injection", "disabled")];
    let p0 = pod(&[], &[], json!({}));
    use Mode::*;
    #[allow(clippy::type_complexity)]
    let rows: Vec<(&str, PodTemplateSpec, NamespaceInfo, Mode, bool, &str)> = vec![
        // row 1
        (
            "mesh namespace",
            p0.clone(),
            ns("mesh-system", &on),
            Webhook,
            false,
            "mesh's own",
        ),
        (
            "kube-system",
            p0.clone(),
            ns("kube-system", &on),
            Webhook,
            false,
            "system namespace",
        ),
        (
            "kube-public",
            p0.clone(),
            ns("kube-public", &[]),
            Offline,
            false,
            "system namespace",
        ),
        (
            "kube-node-lease",
            p0.clone(),
            ns("kube-node-lease", &on),
            Webhook,
            false,
            "system",
        ),
        (
            "system ns beats pod opt-in",
            pod(&[("sidecar.meshctl.io/inject", "true")], &[], json!({})),
            ns("kube-system", &[]),
            Webhook,
            false,
            "system",
        ),
        // row 2
        (
            "hostNetwork",
            pod(&[], &[], json!({"hostNetwork": true})),
            ns("demo", &on),
            Webhook,
            false,
            "hostNetwork",
        ),
        (
            "hostNetwork beats opt-in",
            pod(
                &[("sidecar.meshctl.io/inject", "true")],
                &[],
                json!({"hostNetwork": true}),
            ),
            ns("demo", &on),
            Offline,
            false,
            "hostNetwork",
        ),
        // row 3
        (
            "istio proxy container",
            pod(
                &[],
                &[],
                json!({"containers": [{"name": "app"}, {"name": "istio-proxy"}]}),
            ),
            ns("demo", &on),
            Webhook,
            false,
            "Istio's proxy (container istio-proxy)",
        ),
        (
            "istio status annotation",
            pod(&[], &[("sidecar.istio.io/status", "{}")], json!({})),
            ns("demo", &on),
            Offline,
            false,
            "Istio's proxy (annotation sidecar.istio.io/status)",
        ),
        (
            "linkerd native sidecar",
            pod(
                &[],
                &[],
                json!({"initContainers": [{"name": "linkerd-proxy"}]}),
            ),
            ns("demo", &on),
            Webhook,
            false,
            "Linkerd",
        ),
        // row 4
        (
            "ns disabled",
            p0.clone(),
            ns("demo", &off),
            Webhook,
            false,
            "mesh-injection=disabled",
        ),
        (
            "istio ns disabled",
            p0.clone(),
            ns("demo", &istio_off),
            Offline,
            false,
            "istio-injection=disabled",
        ),
        (
            "ns disabled beats pod opt-in",
            pod(&[("sidecar.meshctl.io/inject", "true")], &[], json!({})),
            ns("demo", &off),
            Webhook,
            false,
            "disabled",
        ),
        (
            "mesh label wins over istio label",
            p0.clone(),
            ns(
                "demo",
                &[
                    ("mesh-injection", "enabled"),
                    ("istio-injection", "disabled"),
                ],
            ),
            Webhook,
            true,
            "mesh-injection=enabled",
        ),
        // row 5
        (
            "pod label false",
            pod(&[("sidecar.meshctl.io/inject", "false")], &[], json!({})),
            ns("demo", &on),
            Webhook,
            false,
            "pod label sidecar.meshctl.io/inject=false",
        ),
        (
            "istio pod label true, unlabelled ns",
            pod(&[("sidecar.istio.io/inject", "true")], &[], json!({})),
            ns("demo", &[]),
            Webhook,
            true,
            "pod label sidecar.istio.io/inject=true",
        ),
        (
            "label wins over annotation",
            pod(
                &[("sidecar.meshctl.io/inject", "true")],
                &[("sidecar.meshctl.io/inject", "false")],
                json!({}),
            ),
            ns("demo", &[]),
            Webhook,
            true,
            "pod label",
        ),
        (
            "meshctl label wins over istio label",
            pod(
                &[
                    ("sidecar.meshctl.io/inject", "false"),
                    ("sidecar.istio.io/inject", "true"),
                ],
                &[],
                json!({}),
            ),
            ns("demo", &on),
            Webhook,
            false,
            "sidecar.meshctl.io/inject=false",
        ),
        (
            "annotation false offline",
            pod(&[], &[("sidecar.istio.io/inject", "false")], json!({})),
            ns("demo", &[]),
            Offline,
            false,
            "pod annotation sidecar.istio.io/inject=false",
        ),
        (
            "explicit true beats never selector",
            pod(
                &[("never", "yes")],
                &[("sidecar.meshctl.io/inject", "yes")],
                json!({}),
            ),
            ns("demo", &on),
            Webhook,
            true,
            "pod annotation",
        ),
        (
            "invalid value counts as unset",
            pod(&[("sidecar.meshctl.io/inject", "maybe")], &[], json!({})),
            ns("demo", &on),
            Webhook,
            true,
            "namespace label",
        ),
        // row 6
        (
            "never selector",
            pod(&[("never", "yes")], &[], json!({})),
            ns("demo", &on),
            Webhook,
            false,
            "neverInjectSelector[0]",
        ),
        // row 7
        (
            "always selector",
            pod(&[("always", "")], &[], json!({})),
            ns("demo", &[]),
            Webhook,
            true,
            "alwaysInjectSelector[0]",
        ),
        (
            "never beats always",
            pod(&[("always", ""), ("never", "yes")], &[], json!({})),
            ns("demo", &on),
            Webhook,
            false,
            "neverInjectSelector",
        ),
        // row 8
        (
            "ns enabled",
            p0.clone(),
            ns("demo", &on),
            Webhook,
            true,
            "mesh-injection=enabled",
        ),
        (
            "istio ns enabled",
            p0.clone(),
            ns("demo", &istio_on),
            Webhook,
            true,
            "istio-injection=enabled",
        ),
        // row 9
        (
            "offline default",
            p0.clone(),
            ns("demo", &[]),
            Offline,
            true,
            "offline",
        ),
        (
            "offline, no namespace known",
            p0.clone(),
            NamespaceInfo::default(),
            Offline,
            true,
            "offline",
        ),
        // row 10
        (
            "webhook default",
            p0.clone(),
            ns("demo", &[]),
            Webhook,
            false,
            "default policy disabled",
        ),
    ];
    for (name, p, n, mode, want, reason) in rows {
        let d = decide(&p, &n, &cfg, mode);
        assert_eq!(d.inject, want, "row {name:?}: {}", d.reason);
        assert!(
            d.reason.to_string().contains(reason),
            "row {name:?}: reason {:?} lacks {reason:?}",
            d.reason.to_string()
        );
    }
    // row 10 with policy enabled
    cfg.default_policy = Policy::Enabled;
    let d = decide(&p0, &ns("demo", &[]), &cfg, Mode::Webhook);
    assert!(d.inject);
    // configurable namespace label names
    cfg.namespace_labels = vec!["custom".into()];
    cfg.default_policy = Policy::Disabled;
    assert!(
        decide(
            &p0,
            &ns("demo", &[("custom", "enabled")]),
            &cfg,
            Mode::Webhook
        )
        .inject
    );
    assert!(!decide(&p0, &ns("demo", &on), &cfg, Mode::Webhook).inject);
}

fn names(v: &Option<Vec<k8s_openapi::api::core::v1::Container>>) -> Vec<String> {
    v.iter().flatten().map(|c| c.name.clone()).collect()
}

#[test]
fn native_layout_and_idempotence() {
    let cfg = InjectionConfig::default();
    let p = pod(
        &[],
        &[],
        json!({"initContainers": [{"name": "setup", "image": "x"}]}),
    );
    let n = ns("demo", &[]);
    let a = inject_template(&p, &n, &cfg, Mode::Offline).unwrap();
    let spec = a.template.spec.as_ref().unwrap();
    assert_eq!(
        names(&spec.init_containers),
        ["mesh-init", "mesh-proxy", "setup"]
    );
    assert_eq!(spec.containers.len(), 1);
    let proxy = &spec.init_containers.as_ref().unwrap()[1];
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
    assert!(proxy.startup_probe.is_some());
    let b = inject_template(&a.template, &n, &cfg, Mode::Offline).unwrap();
    assert_eq!(a.template, b.template);
    // and stripping gives the original back
    let mut s = a.template.clone();
    strip(&mut s);
    let mut orig = p.clone();
    strip(&mut orig);
    assert_eq!(s, orig);
}

#[test]
fn classic_layout_hold_and_overrides() {
    let mut cfg = InjectionConfig::default();
    cfg.native_sidecar = false;
    let p = pod(
        &[],
        &[
            ("sidecar.meshctl.io/holdApplicationUntilProxyStarts", "true"),
            ("sidecar.istio.io/proxyCPU", "250m"),
            ("sidecar.meshctl.io/proxyMemoryLimit", "2Gi"),
        ],
        json!({"initContainers": [{"name": "setup"}]}),
    );
    let a = inject_template(&p, &ns("demo", &[]), &cfg, Mode::Offline).unwrap();
    let spec = a.template.spec.as_ref().unwrap();
    assert_eq!(names(&spec.init_containers), ["setup", "mesh-init"]);
    assert_eq!(spec.containers[0].name, "mesh-proxy");
    let proxy = &spec.containers[0];
    assert!(proxy.lifecycle.as_ref().unwrap().post_start.is_some());
    let r = proxy.resources.as_ref().unwrap();
    let req = r.requests.as_ref().unwrap();
    let lim = r.limits.as_ref().unwrap();
    assert_eq!(req["cpu"].0, "250m");
    assert_eq!(req["memory"].0, "128Mi"); // untouched
    assert_eq!(lim["memory"].0, "2Gi");
    assert_eq!(lim["cpu"].0, "2000m"); // untouched
    // annotation can switch to native
    let p2 = pod(
        &[],
        &[("sidecar.meshctl.io/nativeSidecar", "true")],
        json!({}),
    );
    let b = inject_template(&p2, &ns("demo", &[]), &cfg, Mode::Offline).unwrap();
    assert_eq!(
        names(&b.template.spec.unwrap().init_containers),
        ["mesh-init", "mesh-proxy"]
    );
}

#[test]
fn bad_annotation_is_an_error_naming_it() {
    let cfg = InjectionConfig::default();
    for (k, v) in [
        ("sidecar.meshctl.io/proxyCPU", "lots"),
        ("sidecar.meshctl.io/nativeSidecar", "perhaps"),
        ("sidecar.meshctl.io/logLevel", "loud"),
        ("traffic.sidecar.meshctl.io/includeInboundPorts", "http"),
    ] {
        let p = pod(&[], &[(k, v)], json!({}));
        let e = inject_template(&p, &ns("demo", &[]), &cfg, Mode::Offline).unwrap_err();
        assert!(
            matches!(&e, InjectError::Annotation { key, .. } if key == k),
            "{e}"
        );
    }
}

#[test]
fn user_labels_and_annotations_win_and_survive_reinjection() {
    let cfg = InjectionConfig::default();
    let p = pod(
        &[("security.meshctl.io/tlsMode", "disabled")],
        &[
            ("prometheus.io/scrape", "false"),
            ("kubectl.kubernetes.io/default-container", "app"),
        ],
        json!({}),
    );
    let a = inject_template(&p, &ns("demo", &[]), &cfg, Mode::Offline).unwrap();
    let m = a.template.metadata.as_ref().unwrap();
    assert_eq!(
        m.labels.as_ref().unwrap()["security.meshctl.io/tlsMode"],
        "disabled"
    );
    let ann = m.annotations.as_ref().unwrap();
    assert_eq!(ann["prometheus.io/scrape"], "false");
    assert!(!ann.contains_key("prometheus.io/port"));
    let status: Status = serde_json::from_str(&ann[STATUS_ANNOTATION]).unwrap();
    assert!(status.labels.is_empty());
    assert_eq!(
        status.annotations,
        ["kubectl.kubernetes.io/default-logs-container"]
    );
    let b = inject_template(&a.template, &ns("demo", &[]), &cfg, Mode::Offline).unwrap();
    assert_eq!(a.template, b.template);
    let mut s = b.template.clone();
    strip(&mut s);
    assert_eq!(
        s.metadata.unwrap().labels.unwrap()["security.meshctl.io/tlsMode"],
        "disabled"
    );
}

#[test]
fn pull_secrets_and_volumes() {
    let mut cfg = InjectionConfig::default();
    cfg.image_pull_secrets = vec!["regcred".into(), "mine".into()];
    // (A user volume named like one of ours is refused: `user_objects_with_our_names_are_refused`.)
    let p = pod(
        &[],
        &[],
        json!({"imagePullSecrets": [{"name": "mine"}], "volumes": [{"name": "cache", "emptyDir": {"medium": "Memory"}}]}),
    );
    let a = inject_template(&p, &ns("demo", &[]), &cfg, Mode::Offline).unwrap();
    let spec = a.template.spec.as_ref().unwrap();
    let secrets: Vec<_> = spec
        .image_pull_secrets
        .iter()
        .flatten()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(secrets, ["mine", "regcred"]);
    let vols: Vec<_> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(vols, ["cache", "mesh-token", "mesh-ca-root", "mesh-data"]);
    let b = inject_template(&a.template, &ns("demo", &[]), &cfg, Mode::Offline).unwrap();
    assert_eq!(a.template, b.template);
    let mut s = b.template;
    strip(&mut s);
    let secrets: Vec<_> = s
        .spec
        .unwrap()
        .image_pull_secrets
        .into_iter()
        .flatten()
        .map(|s| s.name)
        .collect();
    assert_eq!(secrets, ["mine"]);
}

#[test]
fn hundreds_of_containers() {
    let cfg = InjectionConfig::default();
    let containers: Vec<_> = (0..500)
        .map(|i| json!({"name": format!("c{i}"), "image": "x"}))
        .collect();
    let p = pod(&[], &[], json!({"containers": containers}));
    let a = inject_template(&p, &ns("demo", &[]), &cfg, Mode::Offline).unwrap();
    assert_eq!(a.template.spec.as_ref().unwrap().containers.len(), 500);
    let b = inject_template(&a.template, &ns("demo", &[]), &cfg, Mode::Offline).unwrap();
    assert_eq!(a.template, b.template);
}

/// An app's container or volume named like one we add is refused (it would be replaced),
/// naming the field; a template that records our injection is re-injected as before.
#[test]
fn user_objects_with_our_names_are_refused() {
    let cfg = InjectionConfig::default();
    let n = ns("demo", &[]);
    let cases = [
        (
            json!({"containers": [{"name": "app", "image": "a"}, {"name": "mesh-proxy", "image": "mine"}]}),
            "spec.containers[1].name",
            "container name \"mesh-proxy\" is reserved",
        ),
        (
            json!({"containers": [{"name": "mesh-proxy", "image": "mine"}]}),
            "spec.containers[0].name",
            "the sidecar proxy container",
        ),
        (
            json!({"initContainers": [{"name": "mesh-init", "image": "mine"}]}),
            "spec.initContainers[0].name",
            "redirects the pod's traffic",
        ),
        (
            json!({"containers": [{"name": "app", "image": "a"}, {"name": "mesh-init", "image": "mine"}]}),
            "spec.containers[1].name",
            "container name \"mesh-init\" is reserved",
        ),
        (
            json!({"volumes": [{"name": "data", "emptyDir": {}}, {"name": "mesh-data", "emptyDir": {}}]}),
            "spec.volumes[1].name",
            "volume name \"mesh-data\" is reserved",
        ),
    ];
    for (spec, field, want) in cases {
        let p = pod(&[], &[], spec.clone());
        let e = inject_template(&p, &n, &cfg, Mode::Offline).unwrap_err();
        match &e {
            InjectError::Invalid { field: f, message } => {
                assert_eq!(f, field, "{spec}");
                assert!(message.contains(want), "{spec}: {message}");
                assert!(message.contains("rename"), "{message}");
            }
            other => panic!("{spec}: {other:?}"),
        }
        // Not injected anyway: nothing to replace, nothing refused.
        let off = pod(&[("sidecar.meshctl.io/inject", "false")], &[], spec.clone());
        let out = inject_template(&off, &n, &cfg, Mode::Offline).unwrap();
        assert!(!out.decision.inject);
        assert_eq!(out.template, off);
    }
    // Injected by us (status annotation present): re-injected, same result as once.
    let once = inject_template(&pod(&[], &[], json!({})), &n, &cfg, Mode::Offline).unwrap();
    let twice = inject_template(&once.template, &n, &cfg, Mode::Webhook).unwrap();
    assert_eq!(once.template, twice.template);
}

/// App probes through the proxy: injection rewrites them, re-injection changes nothing, and
/// removing the injection gives the pod its probes back as written.
#[test]
fn probes_rewritten_reinjected_and_restored() {
    let cfg = InjectionConfig::default();
    let p = pod(
        &[],
        &[],
        json!({"containers": [{"name": "app", "image": "app:1",
            "ports": [{"name": "http", "containerPort": 8080}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 9},
            "readinessProbe": {"exec": {"command": ["true"]}}}]}),
    );
    let n = ns("demo", &[]);
    let a = inject_template(&p, &n, &cfg, Mode::Offline).unwrap();
    let spec = a.template.spec.as_ref().unwrap();
    let live = spec.containers[0].liveness_probe.as_ref().unwrap();
    assert_eq!(
        serde_json::to_value(live).unwrap(),
        json!({"httpGet": {"path": "/app-health/app/livez", "port": 15020}, "periodSeconds": 9})
    );
    assert!(
        spec.containers[0]
            .readiness_probe
            .as_ref()
            .unwrap()
            .exec
            .is_some()
    );
    let proxy = &spec.init_containers.as_ref().unwrap()[1];
    let env = proxy.env.as_ref().unwrap();
    let probers = env
        .iter()
        .find(|e| e.name == mesh_wire::names::ENV_APP_PROBERS)
        .and_then(|e| e.value.as_deref())
        .unwrap();
    assert_eq!(
        probers,
        r#"{"/app-health/app/livez":{"httpGet":{"path":"/healthz","port":8080}}}"#
    );
    // The proxy's own readiness probe stays on its readiness port.
    let rp = proxy
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(rp.port, IntOrString::Int(15021));

    let b = inject_template(&a.template, &n, &cfg, Mode::Offline).unwrap();
    assert_eq!(a.template, b.template);
    let mut s = a.template.clone();
    strip(&mut s);
    assert_eq!(s.spec, p.spec, "probes restored, named port included");

    // Opted out on an injected pod: re-injection restores the originals.
    let mut opted = a.template.clone();
    opted
        .metadata
        .as_mut()
        .unwrap()
        .annotations
        .as_mut()
        .unwrap()
        .insert(
            "sidecar.meshctl.io/rewriteAppHTTPProbers".into(),
            "false".into(),
        );
    let c = inject_template(&opted, &n, &cfg, Mode::Offline).unwrap();
    let spec = c.template.spec.as_ref().unwrap();
    assert_eq!(
        spec.containers[0].liveness_probe,
        p.spec.as_ref().unwrap().containers[0].liveness_probe
    );
    let proxy = &spec.init_containers.as_ref().unwrap()[1];
    assert!(
        !proxy
            .env
            .iter()
            .flatten()
            .any(|e| e.name == mesh_wire::names::ENV_APP_PROBERS)
    );
}
