//! backendRefs → the proxy's backends: kind and ReferenceGrant checks, the Service port,
//! and its ready endpoints from EndpointSlices.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::Endpoint;
use mesh_config::Backend;

use super::{BackendEntry, Ctx, GATEWAY_GROUP};
use crate::status::Reason;

fn ref_permitted(cx: &Ctx<'_>, from_ns: &str, to_ns: &str, to_name: &str) -> bool {
    cx.res.reference_grants.iter().any(|g| {
        g.metadata
            .namespace
            .as_deref()
            .unwrap_or(&cx.opts.default_namespace)
            == to_ns
            && g.spec.from.iter().any(|f| {
                f.group == GATEWAY_GROUP && f.kind == "HTTPRoute" && f.namespace == from_ns
            })
            && g.spec.to.iter().any(|t| {
                (t.group.is_empty() || t.group == "core")
                    && t.kind == "Service"
                    && t.name.as_deref().is_none_or(|n| n == to_name)
            })
    })
}

/// Resolves a backendRef to a backend name (creating the backend), or says why not.
pub(crate) fn resolve_backend(
    cx: &mut Ctx<'_>,
    route_ns: &str,
    group: Option<&str>,
    kind: Option<&str>,
    name: &str,
    namespace: Option<&str>,
    port: Option<i32>,
) -> Result<String, (Reason, String)> {
    let group = group.unwrap_or("");
    let kind = kind.unwrap_or("Service");
    if !(group.is_empty() || group == "core") || kind != "Service" {
        return Err((
            Reason::InvalidKind,
            format!("backend {kind} (group {group:?}) {name}: only Services are supported"),
        ));
    }
    let ns = namespace.unwrap_or(route_ns);
    if ns != route_ns && !ref_permitted(cx, route_ns, ns, name) {
        return Err((
            Reason::RefNotPermitted,
            format!(
                "Service {ns}/{name}: no ReferenceGrant in {ns} allows HTTPRoutes from {route_ns}"
            ),
        ));
    }
    let Some(port) = port else {
        return Err((
            Reason::UnsupportedValue,
            format!("Service {ns}/{name}: port is required"),
        ));
    };
    let Some(svc) = cx.service(ns, name) else {
        return Err((
            Reason::BackendNotFound,
            format!("Service {ns}/{name} not found"),
        ));
    };
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or(&[]);
    let Some(sp) = ports.iter().find(|p| p.port == port) else {
        return Err((
            Reason::BackendNotFound,
            format!("Service {ns}/{name} has no port {port}"),
        ));
    };
    let backend_name = format!("{ns}/{name}:{port}");
    if !cx.backends.contains_key(&backend_name) {
        let (endpoints, mtls_identities) = endpoints(cx, svc, ns, name, sp, ports.len());
        cx.backends.insert(
            backend_name.clone(),
            BackendEntry {
                backend: Backend {
                    mtls_identities,
                    name: backend_name.clone(),
                    endpoints,
                    load_balancer: Default::default(),
                    protocol: upstream_protocol(sp),
                    connect_timeout: Backend::default_connect_timeout(),
                    rate_limit: None,
                },
                service: (ns.to_string(), name.to_string()),
                port_name: sp.name.clone(),
                service_port: port as u16,
            },
        );
    }
    Ok(backend_name)
}

fn upstream_protocol(sp: &ServicePort) -> mesh_config::UpstreamProtocol {
    match sp.app_protocol.as_deref() {
        Some("kubernetes.io/h2c" | "h2c" | "grpc") => mesh_config::UpstreamProtocol::Http2,
        _ => mesh_config::UpstreamProtocol::Http1,
    }
}

/// The ready endpoints of a Service port, and the identities of those that are meshed pods
/// (found by the endpoint's `targetRef`).
fn endpoints(
    cx: &Ctx<'_>,
    svc: &Service,
    ns: &str,
    name: &str,
    sp: &ServicePort,
    service_ports: usize,
) -> (Vec<String>, BTreeMap<String, String>) {
    let mut identities = BTreeMap::new();
    let spec = svc.spec.as_ref();
    if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName")
        && let Some(host) = spec.and_then(|s| s.external_name.as_deref())
    {
        return (vec![format!("{host}:{}", sp.port)], identities);
    }
    let want = sp.name.as_deref().unwrap_or("");
    let mut out: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for s in cx.slices_of(ns, name) {
        let ports = s.ports.as_deref().unwrap_or(&[]);
        let port = ports
            .iter()
            .find(|p| p.name.as_deref().unwrap_or("") == want)
            .or_else(|| (ports.len() == 1 && service_ports == 1).then(|| &ports[0]))
            .and_then(|p| p.port);
        let Some(port) = port else { continue };
        for ep in s.endpoints.iter().flatten() {
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            let Some(addr) = ep.addresses.first() else {
                continue;
            };
            let e = if addr.contains(':') {
                format!("[{addr}]:{port}")
            } else {
                format!("{addr}:{port}")
            };
            if seen.insert(e.clone()) {
                if let Some(id) = endpoint_identity(cx, ns, ep, port) {
                    identities.insert(e.clone(), id);
                }
                out.push(e);
            }
        }
    }
    (out, identities)
}

/// Every endpoint (`ip:port`, of every EndpointSlice port) that is a meshed pod, with the
/// identity it proves: a sidecar reaches these over mutual TLS also when its app dials the
/// pod's IP directly (passthrough), not through a Service.
pub(crate) fn meshed_endpoints(cx: &Ctx<'_>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for s in &cx.res.endpoint_slices {
        let ns = s
            .metadata
            .namespace
            .as_deref()
            .unwrap_or(&cx.opts.default_namespace);
        for ep in s.endpoints.iter().flatten() {
            if ep.target_ref.is_none() {
                continue;
            }
            for p in s.ports.iter().flatten() {
                let Some(port) = p.port else { continue };
                let Some(id) = endpoint_identity(cx, ns, ep, port) else {
                    continue;
                };
                for addr in &ep.addresses {
                    let key = if addr.contains(':') {
                        format!("[{addr}]:{port}")
                    } else {
                        format!("{addr}:{port}")
                    };
                    out.insert(key, id.clone());
                }
            }
        }
    }
    out
}

/// The identity of an endpoint whose `targetRef` is a meshed pod (`Peers::identity`).
fn endpoint_identity(cx: &Ctx<'_>, slice_ns: &str, ep: &Endpoint, port: i32) -> Option<String> {
    let t = ep.target_ref.as_ref()?;
    if t.kind.as_deref() != Some("Pod") {
        return None;
    }
    let pod_ns = t.namespace.as_deref().unwrap_or(slice_ns);
    cx.peers
        .identity(pod_ns, t.name.as_deref()?, u16::try_from(port).ok()?)
}
