//! Mutual TLS between meshed workloads, from files as a user writes them: which endpoints
//! are meshed and as whom (sidecar outbound and gateway backends), what each sidecar's
//! inbound accepts (PeerAuthentication), the trust domain, and what is reported.

use std::collections::BTreeMap;

use mesh_config::{Backend, InboundMtls, MtlsMode, ProxyConfig};
use mesh_translate::sidecar::INBOUND_LISTENER;
use mesh_translate::{
    LoadError, LoadOptions, Resources, SidecarOptions, TranslateOptions, Translation, load_str,
    sidecar_key, translate, translate_sidecar,
};

/// `shop/web` has two meshed pods (service account `web`, and one with none: `default`)
/// and one pod without a sidecar; `shop/db` one meshed pod. A Gateway routes to both.
const OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: metrics, port: 9090}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: metrics, port: 9090}]
endpoints:
  - addresses: [10.0.0.5]
    targetRef: {kind: Pod, name: web-0, namespace: shop}
  - addresses: [10.0.0.6]
    targetRef: {kind: Pod, name: web-1}
  - addresses: [10.0.0.7]
    targetRef: {kind: Pod, name: web-legacy, namespace: shop}
  - addresses: [10.0.0.8]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: tcp, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: tcp, port: 5432}]
endpoints:
  - addresses: [10.0.1.5]
    targetRef: {kind: Pod, name: db-0, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: shop
  labels: {app: web, version: v1, security.meshctl.io/tlsMode: istio}
spec:
  serviceAccountName: web
  containers: [{name: app, image: web:1}]
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  labels: {app: web, version: v2, security.istio.io/tlsMode: istio}
spec:
  containers: [{name: app, image: web:2}]
---
apiVersion: v1
kind: Pod
metadata:
  name: web-legacy
  namespace: shop
  labels: {app: web, version: legacy}
spec:
  serviceAccountName: web
  containers: [{name: app, image: web:0}]
---
apiVersion: v1
kind: Pod
metadata:
  name: db-0
  namespace: shop
  labels: {app: db, security.meshctl.io/tlsMode: istio}
spec:
  serviceAccountName: db
  containers: [{name: db, image: db:1}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: mesh}
spec: {controllerName: meshctl.io/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: shop}
spec:
  gatewayClassName: mesh
  listeners: [{name: http, port: 8080, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{name: gw}]
  rules:
    - backendRefs: [{name: web, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /metrics}}]
      backendRefs: [{name: web, port: 9090}]
    - matches: [{path: {type: PathPrefix, value: /db}}]
      backendRefs: [{name: db, port: 5432}]
"#;

fn load(extra: &str) -> Resources {
    let text = format!("{OBJECTS}---\n{extra}");
    load_str("objects.yaml", &text, &LoadOptions::default())
        .unwrap()
        .resources
}

fn sidecar_options(ns: &str, pod: &str, ip: &str) -> SidecarOptions {
    SidecarOptions {
        base: TranslateOptions::default(),
        pod_namespace: ns.into(),
        pod_name: pod.into(),
        pod_ip: Some(ip.parse().unwrap()),
        pod_labels: None,
        inbound_port: 15006,
        outbound_port: 15001,
    }
}

fn sidecar(res: &Resources, pod: &str, ip: &str) -> Translation {
    let t = translate_sidecar(res, &sidecar_options("shop", pod, ip));
    t.config.validate().unwrap();
    t
}

fn backend<'c>(c: &'c ProxyConfig, name: &str) -> &'c Backend {
    c.backends
        .iter()
        .find(|b| b.name == name)
        .unwrap_or_else(|| panic!("no backend {name} in {:#?}", c.backends))
}

fn ids(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(e, id)| (e.to_string(), id.to_string()))
        .collect()
}

/// The inbound listener's settings (unset: the default, PERMISSIVE).
fn inbound(c: &ProxyConfig) -> InboundMtls {
    c.listeners
        .iter()
        .find(|l| l.name == INBOUND_LISTENER)
        .unwrap()
        .mtls
        .clone()
        .unwrap_or_default()
}

fn mtls(mode: MtlsMode, ports: &[(u16, MtlsMode)]) -> InboundMtls {
    InboundMtls {
        mode,
        ports: ports.iter().copied().collect(),
    }
}

const WEB_IDS: &[(&str, &str)] = &[
    ("10.0.0.5:8080", "spiffe://cluster.local/ns/shop/sa/web"),
    ("10.0.0.6:8080", "spiffe://cluster.local/ns/shop/sa/default"),
];

#[test]
fn meshed_endpoints_carry_their_pods_identity_in_sidecar_and_gateway_backends() {
    let res = load("");
    // Another pod's sidecar: web's meshed pods by their service accounts; the pod without a
    // sidecar and the endpoint without a targetRef get plaintext.
    let t = sidecar(&res, "client-0", "10.0.9.9");
    let web = backend(&t.config, "shop/web:80");
    assert_eq!(
        web.endpoints,
        [
            "10.0.0.5:8080",
            "10.0.0.6:8080",
            "10.0.0.7:8080",
            "10.0.0.8:8080"
        ]
    );
    assert_eq!(web.mtls_identities, ids(WEB_IDS));
    assert_eq!(
        backend(&t.config, "shop/db:5432").mtls_identities,
        ids(&[("10.0.1.5:5432", "spiffe://cluster.local/ns/shop/sa/db")])
    );
    // Dialed by pod IP (passthrough), the same pods are reached over mutual TLS too, on
    // every port their EndpointSlices name; the others are not listed.
    let outbound = t
        .config
        .listeners
        .iter()
        .find(|l| l.kind == mesh_config::ListenerKind::SidecarOutbound)
        .unwrap();
    for (endpoint, id) in ids(WEB_IDS) {
        assert_eq!(
            outbound.passthrough_identities.get(&endpoint),
            Some(&id),
            "{endpoint}"
        );
    }
    assert_eq!(
        outbound
            .passthrough_identities
            .get("10.0.1.5:5432")
            .map(String::as_str),
        Some("spiffe://cluster.local/ns/shop/sa/db")
    );
    for plain in web
        .endpoints
        .iter()
        .filter(|e| !web.mtls_identities.contains_key(*e))
    {
        assert!(
            !outbound.passthrough_identities.contains_key(plain),
            "{plain} is not meshed"
        );
    }
    // The gateway originates mutual TLS to the same pods.
    let g = translate(&res, &TranslateOptions::default());
    g.config.validate().unwrap();
    assert_eq!(
        backend(&g.config, "shop/web:80").mtls_identities,
        ids(WEB_IDS)
    );
    // Without PeerAuthentications every sidecar is PERMISSIVE, and nothing is said.
    assert!(inbound(&t.config).is_default());
    assert!(
        t.warnings
            .iter()
            .all(|w| !w.to_string().contains("mutual TLS")),
        "{:?}",
        t.warnings
    );
}

#[test]
fn a_port_disabled_by_peer_authentication_is_reached_in_plaintext() {
    // web-0 (version v1) disables mTLS on 9090 (its metrics) only; db's namespace policy
    // would be STRICT but db is selected by a workload policy that disables it.
    let res = load(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web-metrics, namespace: shop}
spec:
  selector: {matchLabels: {version: v1}}
  portLevelMtls: {9090: {mode: DISABLE}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db-plain, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: DISABLE}
"#,
    );
    for t in [
        sidecar(&res, "client-0", "10.0.9.9"),
        translate(&res, &TranslateOptions::default()),
    ] {
        let c = &t.config;
        assert_eq!(backend(c, "shop/web:80").mtls_identities, ids(WEB_IDS));
        assert_eq!(
            backend(c, "shop/web:9090").mtls_identities,
            ids(&[("10.0.0.6:9090", "spiffe://cluster.local/ns/shop/sa/default")]),
            "web-0's 9090 is DISABLE: plaintext"
        );
        assert!(backend(c, "shop/db:5432").mtls_identities.is_empty());
    }
    // And the inbound side of each pod says the same.
    let web0 = sidecar(&res, "web-0", "10.0.0.5");
    assert_eq!(
        inbound(&web0.config),
        mtls(MtlsMode::Strict, &[(9090, MtlsMode::Disable)])
    );
    assert!(
        web0.warnings.iter().any(|w| w.to_string()
            == "Pod shop/web-0: inbound mutual TLS STRICT (port 9090: DISABLE), from PeerAuthentication shop/default, shop/web-metrics"),
        "{:#?}",
        web0.warnings
    );
    assert_eq!(
        inbound(&sidecar(&res, "web-1", "10.0.0.6").config),
        mtls(MtlsMode::Strict, &[])
    );
    assert_eq!(
        inbound(&sidecar(&res, "db-0", "10.0.1.5").config),
        mtls(MtlsMode::Disable, &[])
    );
}

#[test]
fn mesh_namespace_and_workload_scopes_with_unset_inheritance() {
    let mesh = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
                metadata: {name: default, namespace: mesh-system}\nspec: {mtls: {mode: STRICT}}\n";
    let ns_unset = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
                    metadata: {name: default, namespace: shop}\nspec: {mtls: {mode: UNSET}}\n";
    let ns_permissive = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
                         metadata: {name: default, namespace: shop}\nspec: {mtls: {mode: PERMISSIVE}}\n";
    let workload = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
                    metadata: {name: v2, namespace: shop}\n\
                    spec: {selector: {matchLabels: {version: v2}}, portLevelMtls: {8080: {mode: UNSET}, 9090: {mode: DISABLE}}}\n";
    let web1 = |extra: &str| inbound(&sidecar(&load(extra), "web-1", "10.0.0.6").config).clone();
    let web0 = |extra: &str| inbound(&sidecar(&load(extra), "web-0", "10.0.0.5").config).clone();
    use MtlsMode::{Disable, Permissive, Strict};
    assert_eq!(web1(mesh), mtls(Strict, &[]));
    // Namespace UNSET: the mesh's.
    assert_eq!(web1(&format!("{mesh}---\n{ns_unset}")), mtls(Strict, &[]));
    assert_eq!(
        web1(&format!("{mesh}---\n{ns_permissive}")),
        mtls(Permissive, &[])
    );
    // Workload without mtls: the namespace's (or the mesh's); its UNSET port the same.
    assert_eq!(
        web1(&format!("{mesh}---\n{ns_unset}---\n{workload}")),
        mtls(Strict, &[(8080, Strict), (9090, Disable)])
    );
    assert_eq!(
        web1(&format!("{mesh}---\n{ns_permissive}---\n{workload}")),
        mtls(Permissive, &[(8080, Permissive), (9090, Disable)])
    );
    // The workload policy selects version v2 only.
    assert_eq!(
        web0(&format!("{mesh}---\n{ns_permissive}---\n{workload}")),
        mtls(Permissive, &[])
    );
}

#[test]
fn the_oldest_policy_of_a_scope_wins_and_the_other_is_reported() {
    let policy = |name: &str, created: &str, mode: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: {{name: {name}, namespace: shop, creationTimestamp: '{created}'}}\n\
             spec: {{mtls: {{mode: {mode}}}}}\n"
        )
    };
    let res = load(&format!(
        "{}---\n{}",
        policy("a-newer", "2026-02-01T00:00:00Z", "DISABLE"),
        policy("z-older", "2026-01-01T00:00:00Z", "STRICT")
    ));
    let t = sidecar(&res, "web-0", "10.0.0.5");
    assert_eq!(inbound(&t.config), mtls(MtlsMode::Strict, &[]));
    let g = translate(&res, &TranslateOptions::default());
    assert!(
        g.warnings.iter().any(|w| w.to_string()
            == "PeerAuthentication shop/a-newer: the namespace-wide policy of shop is the older shop/z-older; not applied"),
        "{:#?}",
        g.warnings
    );
}

#[test]
fn the_trust_domain_comes_from_the_options_or_the_install_profile() {
    let res = load("");
    let options = TranslateOptions {
        trust_domain: "example.org".into(),
        ..Default::default()
    };
    let t = translate(&res, &options);
    assert_eq!(
        backend(&t.config, "shop/db:5432").mtls_identities["10.0.1.5:5432"],
        "spiffe://example.org/ns/shop/sa/db"
    );
    let res = load(
        "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nmetadata: {name: p, namespace: istio-system}\n\
         spec: {meshConfig: {trustDomain: corp.internal}}\n",
    );
    let t = translate(&res, &options);
    assert_eq!(
        backend(&t.config, "shop/db:5432").mtls_identities["10.0.1.5:5432"],
        "spiffe://corp.internal/ns/shop/sa/db"
    );
}

#[test]
fn replicas_differing_only_in_labels_no_policy_selects_share_a_key() {
    // version is selected by a PeerAuthentication: web-0 and web-1 differ; without it they
    // would not.
    let plain = load("");
    let key =
        |res: &Resources, pod: &str, ip: &str| sidecar_key(res, &sidecar_options("shop", pod, ip));
    assert_eq!(
        key(&plain, "web-0", "10.0.0.5"),
        key(&plain, "web-1", "10.0.0.6")
    );
    let selecting = load(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: v1, namespace: shop}\n\
         spec: {selector: {matchLabels: {version: v1}}, mtls: {mode: STRICT}}\n",
    );
    assert_ne!(
        key(&selecting, "web-0", "10.0.0.5"),
        key(&selecting, "web-1", "10.0.0.6")
    );
}

fn load_errors(text: &str) -> Vec<String> {
    let e: LoadError = load_str("pa.yaml", text, &LoadOptions::default()).expect_err("should fail");
    e.problems.iter().map(ToString::to_string).collect()
}

#[test]
fn invalid_peer_authentications_in_files_name_the_file_document_and_field() {
    let head = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: shop}\n";
    let cases = [
        (
            "spec: {mtls: {mode: STRICT}, mTLS: {mode: STRICT}}\n",
            "pa.yaml: document 1 (PeerAuthentication shop/p): spec.mTLS: unknown field",
        ),
        (
            "spec: {mtls: {mode: strict}}\n",
            "pa.yaml: document 1 (PeerAuthentication shop/p): spec.mtls.mode: unknown mode \"strict\" (one of UNSET, DISABLE, PERMISSIVE, STRICT)",
        ),
        (
            "spec: {portLevelMtls: {8080: {mode: STRICT}}}\n",
            "pa.yaml: document 1 (PeerAuthentication shop/p): spec.portLevelMtls: requires a selector",
        ),
        (
            "spec: {selector: {matchLabels: {app: web}}, portLevelMtls: {http: {mode: STRICT}}}\n",
            "pa.yaml: document 1 (PeerAuthentication shop/p): spec.portLevelMtls.http: not a port number",
        ),
        (
            "spec: {selector: {matchLabels: {app: web}, matchExpressions: []}}\n",
            "pa.yaml: document 1 (PeerAuthentication shop/p): spec.selector.matchExpressions: unknown field",
        ),
        (
            "spec: {selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: STRICT, extra: 1}}}\n",
            "pa.yaml: document 1 (PeerAuthentication shop/p): spec.portLevelMtls.8080.extra: unknown field",
        ),
    ];
    for (spec, want) in cases {
        let e = load_errors(&format!("{head}{spec}"));
        assert!(e.len() == 1 && e[0].starts_with(want), "{spec}: {e:#?}");
    }
    let e = load_errors(
        "apiVersion: security.istio.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec: {}\n",
    );
    assert!(e[0].contains("security.istio.io/v1, v1beta1"), "{e:#?}");
    let e = load_errors(
        "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nmetadata: {name: p}\nspec: {meshConfig: {trustDomain: 'Not/A/Domain'}}\n",
    );
    assert!(e[0].contains("spec.meshConfig.trustDomain"), "{e:#?}");
    assert!(
        e[0].contains("the trust domain \"Not/A/Domain\" holds 'N'"),
        "{e:#?}"
    );
}

#[test]
fn pods_without_a_sidecar_are_not_kept_and_say_so() {
    let loaded = load_str(
        "pods.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: plain, namespace: shop, labels: {app: x}}\n\
         spec: {containers: [{name: a, image: a}]}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: opted-out, namespace: shop, labels: {security.meshctl.io/tlsMode: disabled}}\n\
         spec: {containers: [{name: a, image: a}]}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: meshed, labels: {security.meshctl.io/tlsMode: istio}}\n\
         spec: {containers: [{name: a, image: a}]}\n",
        &LoadOptions::default(),
    )
    .unwrap();
    let keys: Vec<&String> = loaded.resources.pods.keys().collect();
    assert_eq!(keys, ["default/meshed"]);
    assert_eq!(
        loaded.resources.pods["default/meshed"].service_account,
        "default"
    );
    let w: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(w.len(), 2, "{w:#?}");
    assert!(
        w[0].starts_with("pods.yaml: document 1 (Pod shop/plain): not a meshed pod"),
        "{w:#?}"
    );
    // A Pod's fields are checked like any object's.
    let e = load_errors("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containerz: []}\n");
    assert!(e[0].contains("spec.containerz: unknown field"), "{e:#?}");
}
