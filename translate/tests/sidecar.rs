//! `translate_sidecar`: mesh (GAMMA) routes by ClusterIP, producer/consumer routes, inbound
//! per-pod limits.

use mesh_config::{BackendTarget, ListenerKind, RateLimitMode, RouteAction};
use mesh_translate::{LoadOptions, SidecarOptions, TranslateOptions, load_str, translate_sidecar};

const OBJECTS: &str = include_str!("fixtures/mesh-shop/objects.yaml");

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
