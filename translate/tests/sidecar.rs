//! `translate_sidecar`: mesh (GAMMA) routes by ClusterIP, producer/consumer routes, inbound
//! per-pod limits.

use mesh_config::{BackendTarget, ListenerKind, RateLimitMode, RouteAction};
use mesh_translate::{LoadOptions, SidecarOptions, TranslateOptions, load_str, translate_sidecar};

const OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: shop}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec:
  clusterIP: None
  ports: [{port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - addresses: [10.0.0.5]
    targetRef: {kind: Pod, name: web-0, namespace: shop}
  - addresses: [10.0.0.6]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v2-1, namespace: shop, labels: {kubernetes.io/service-name: web-v2}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.7]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
    - backendRefs:
        - {name: web, port: 80, weight: 90}
        - {name: web-v2, port: 80, weight: 10}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mine, namespace: client-ns}
spec:
  parentRefs: [{group: "", kind: Service, name: web, namespace: shop}]
  rules:
    - backendRefs: [{name: web-v2, namespace: shop, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: allow, namespace: shop}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: client-ns}]
  to: [{group: "", kind: Service}]
---
apiVersion: policy.meshctl.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: web-limit, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: web}]
  maxTokens: 10
  tokensPerFill: 10
  fillInterval: 1s
  mode: Distributed
"#;

fn sidecar(ns: &str, name: &str, ip: &str) -> mesh_translate::Translation {
    let loaded = load_str("objects.yaml", OBJECTS, &LoadOptions::default()).unwrap();
    translate_sidecar(
        &loaded.resources,
        &SidecarOptions {
            base: TranslateOptions::default(),
            pod_namespace: ns.into(),
            pod_name: name.into(),
            pod_ip: Some(ip.parse().unwrap()),
            pod_labels: None,
            inbound_port: 15006,
            outbound_port: 15001,
        },
    )
}

fn targets(a: &RouteAction) -> Vec<(String, u32)> {
    match a {
        RouteAction::Forward(f) => f
            .backends
            .iter()
            .map(|b| match &b.target {
                BackendTarget::Backend(n) => (n.clone(), b.weight),
                BackendTarget::Invalid(m) => (format!("invalid: {m}"), b.weight),
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[test]
fn producer_routes_by_cluster_ip_and_default_routes() {
    let t = sidecar("shop", "web-0", "10.0.0.5");
    let c = &t.config;
    c.validate().unwrap();
    let out = &c.listeners[0];
    assert_eq!(out.kind, ListenerKind::SidecarOutbound);
    assert_eq!(out.port, 15001);
    let names: Vec<&str> = out.services.iter().map(|s| s.name.as_str()).collect();
    // Headless Services are passed through (no ClusterIP).
    assert_eq!(names, ["shop/web:80", "shop/web-v2:80"]);
    let web = &out.services[0];
    assert_eq!(web.addresses, ["10.96.0.10"]);
    assert_eq!(web.routes.len(), 1);
    assert_eq!(web.routes[0].name, "shop/split/0/0");
    assert_eq!(
        targets(&web.routes[0].action),
        [
            ("shop/web:80".to_string(), 90),
            ("shop/web-v2:80".to_string(), 10)
        ]
    );
    assert_eq!(web.tcp_backend.as_deref(), Some("shop/web:80"));
    // No mesh route: one route to the Service's own endpoints.
    let v2 = &out.services[1];
    assert_eq!(v2.routes[0].name, "shop/web-v2:80/default");
    let b = c.backends.iter().find(|b| b.name == "shop/web:80").unwrap();
    assert_eq!(b.endpoints, ["10.0.0.5:8080", "10.0.0.6:8080"]);
}

#[test]
fn a_consumer_route_replaces_producer_routes_for_its_namespace_only() {
    let t = sidecar("client-ns", "c-0", "10.0.1.1");
    let web = &t.config.listeners[0].services[0];
    assert_eq!(web.routes.len(), 1);
    assert_eq!(web.routes[0].name, "client-ns/mine/0/0");
    assert_eq!(
        targets(&web.routes[0].action),
        [("shop/web-v2:80".to_string(), 1)]
    );
}

#[test]
fn a_rate_limit_policy_on_a_service_limits_its_pods_inbound() {
    // web-0 backs `web` (target port 8080): limited there, the budget split across the two
    // endpoints.
    let t = sidecar("shop", "web-0", "10.0.0.5");
    let inbound = &t.config.listeners[1];
    assert_eq!(inbound.kind, ListenerKind::SidecarInbound);
    assert_eq!(inbound.port, 15006);
    assert_eq!(inbound.inbound_ports.len(), 1);
    assert_eq!(inbound.inbound_ports[0].port, 8080);
    assert_eq!(
        inbound.inbound_ports[0].rate_limit.as_deref(),
        Some("ratelimitpolicy/shop/web-limit")
    );
    let l = &t.config.rate_limits[0];
    assert_eq!(l.mode, RateLimitMode::Distributed { instances: 2 });
    // A pod that backs nothing has no inbound limits.
    let t = sidecar("client-ns", "c-0", "10.0.1.1");
    assert!(t.config.listeners[1].inbound_ports.is_empty());
    assert!(t.config.rate_limits.is_empty());
}
