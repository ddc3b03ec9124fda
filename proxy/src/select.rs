//! Route selection. Gateway listeners choose by host and request (first match of the virtual
//! host); sidecar listeners first by the connection's original destination: a mesh Service's
//! routes (outbound), or one passthrough route to the original destination (outbound, not a
//! mesh Service) or to the local app (inbound).

use std::borrow::Cow;
use std::net::SocketAddr;

use http::Request;
use http::header;

use crate::config::{Backend, ListenerKind};
use crate::routing::{CompiledRoute, CompiledService, ListenerTable, RequestInfo};

/// Inbound: the app is reached over loopback on the original port.
const INBOUND_APP_IP: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Where a request's connection is going, as far as the connection tells (before the request
/// is looked at).
#[derive(Debug)]
pub enum Destination<'a> {
    /// A gateway listener: the virtual host and route are chosen by the request.
    Gateway,
    /// Sidecar outbound to a mesh Service: one of its routes.
    Service(&'a CompiledService),
    /// Sidecar: every request goes to one fixed endpoint (built per request; boxed so that
    /// gateway requests do not carry its size).
    Passthrough(Box<CompiledRoute>),
    /// A sidecar connection without an original destination: nothing is routed.
    Unknown,
}

/// The destination of requests on a connection of `table`'s listener.
pub fn destination(table: &ListenerTable, original_dst: Option<SocketAddr>) -> Destination<'_> {
    match (table.kind, original_dst) {
        (ListenerKind::Gateway, _) => Destination::Gateway,
        (ListenerKind::SidecarOutbound, Some(dst)) => match table.service(dst) {
            Some(svc) => Destination::Service(svc),
            None => Destination::Passthrough(Box::new(CompiledRoute::passthrough(
                "passthrough".into(),
                dst,
                None,
                Backend::default_connect_timeout(),
                table.passthrough_identity(dst).cloned(),
            ))),
        },
        (ListenerKind::SidecarInbound, Some(dst)) => {
            Destination::Passthrough(Box::new(CompiledRoute::passthrough(
                format!("inbound|{}", dst.port()).into(),
                SocketAddr::new(INBOUND_APP_IP, dst.port()),
                table.inbound_limit(dst.port()).cloned(),
                Backend::default_connect_timeout(),
                None,
            )))
        }
        (_, None) => Destination::Unknown,
    }
}

impl Destination<'_> {
    pub fn is_passthrough(&self) -> bool {
        matches!(self, Destination::Passthrough(_))
    }
}

/// The route that serves `req` on `dest`; `None` when nothing matches.
pub fn route<'a, B>(
    dest: &'a Destination<'a>,
    table: &'a ListenerTable,
    req: &Request<B>,
) -> Option<&'a CompiledRoute> {
    let info = |host| RequestInfo {
        host,
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
    };
    match dest {
        Destination::Gateway => {
            let (_, host) = request_host(req);
            table.route(&info(&host)).map(|(_, r)| r)
        }
        Destination::Service(svc) => {
            let (_, host) = request_host(req);
            svc.route(&info(&host))
        }
        Destination::Passthrough(r) => Some(r),
        Destination::Unknown => None,
    }
}

/// The request's host: `(port as sent, lowercase host without port)`; borrowed unless it
/// had uppercase letters.
pub fn request_host<B>(req: &Request<B>) -> (Option<u16>, Cow<'_, str>) {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or_default();
    let (host, port) = split_host_port(raw);
    let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    };
    (port, host)
}

fn split_host_port(s: &str) -> (&str, Option<u16>) {
    if let Some(rest) = s.strip_prefix('[') {
        // [v6]:port
        if let Some((h, p)) = rest.split_once(']') {
            return (h, p.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
        return (s, None);
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().ok()),
        _ => (s, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::RateLimiters;
    use crate::routing::{Action, RouteTable, Target};

    fn table() -> RouteTable {
        let c: crate::config::ProxyConfig = serde_json::from_value(serde_json::json!({
            "rateLimits": [{"name": "pod", "maxTokens": 5, "tokensPerFill": 1, "fillInterval": "60s"}],
            "listeners": [
                {"name": "gw", "port": 80, "virtualHosts": [{"name": "v", "hostnames": ["shop.example"],
                    "routes": [{"name": "shop", "action": {"type": "forward",
                        "backends": [{"target": {"backend": "b"}, "weight": 1}]}}]}]},
                {"name": "out", "port": 15001, "kind": "sidecarOutbound",
                    "services": [{"name": "svc", "addresses": ["10.0.0.1"], "port": 80,
                        "routes": [{"name": "svc-route", "action": {"type": "forward",
                            "backends": [{"target": {"backend": "b"}, "weight": 1}]}}]}]},
                {"name": "in", "port": 15006, "kind": "sidecarInbound",
                    "inboundPorts": [{"port": 8080, "rateLimit": "pod"}]}],
            "backends": [{"name": "b", "endpoints": ["127.0.0.1:1"]}],
        }))
        .unwrap();
        c.validate().unwrap();
        RouteTable::build(&c, None, &RateLimiters::build(&c.rate_limits, None)).unwrap()
    }

    fn get(host: &str) -> Request<()> {
        Request::get("/").header("host", host).body(()).unwrap()
    }

    /// The one endpoint a passthrough route sends to.
    fn endpoint(r: &CompiledRoute) -> String {
        let Action::Forward(f) = &r.action else {
            panic!("not a forward")
        };
        match &f.backends[0].target {
            Target::Upstream(u) => u.endpoints[0].to_string(),
            Target::Invalid(_) => panic!("invalid target"),
        }
    }

    #[test]
    fn a_gateway_routes_by_host() {
        let t = table();
        let gw = &t.listeners[0];
        let dest = destination(gw, None);
        assert!(matches!(dest, Destination::Gateway));
        assert_eq!(
            &*route(&dest, gw, &get("Shop.Example:80")).unwrap().name,
            "shop"
        );
        assert!(route(&dest, gw, &get("other.example")).is_none());
    }

    #[test]
    fn sidecar_outbound_routes_a_mesh_service_else_passes_through() {
        let t = table();
        let out = &t.listeners[1];
        let svc = destination(out, Some("10.0.0.1:80".parse().unwrap()));
        let r = route(&svc, out, &get("anything")).unwrap();
        assert_eq!((&*r.name, svc.is_passthrough()), ("svc-route", false));

        let elsewhere = destination(out, Some("10.9.9.9:443".parse().unwrap()));
        let r = route(&elsewhere, out, &get("anything")).unwrap();
        assert_eq!(
            (&*r.name, elsewhere.is_passthrough()),
            ("passthrough", true)
        );
        assert_eq!(endpoint(r), "10.9.9.9:443");
        assert!(r.rate_limit.is_none());
    }

    #[test]
    fn sidecar_inbound_passes_through_to_the_app_with_the_ports_limit() {
        let t = table();
        let inbound = &t.listeners[2];
        let dest = destination(inbound, Some("10.0.0.7:8080".parse().unwrap()));
        let r = route(&dest, inbound, &get("pod")).unwrap();
        assert_eq!(&*r.name, "inbound|8080");
        assert_eq!(endpoint(r), "127.0.0.1:8080");
        assert_eq!(r.rate_limit.as_ref().map(|l| l.name()), Some("pod"));

        let other = destination(inbound, Some("10.0.0.7:9090".parse().unwrap()));
        assert!(
            route(&other, inbound, &get("pod"))
                .unwrap()
                .rate_limit
                .is_none()
        );
    }

    #[test]
    fn a_sidecar_connection_without_a_destination_routes_nothing() {
        let t = table();
        let dest = destination(&t.listeners[1], None);
        assert!(matches!(dest, Destination::Unknown));
        assert!(route(&dest, &t.listeners[1], &get("x")).is_none());
    }

    #[test]
    fn host_and_port_are_split() {
        assert_eq!(split_host_port("example.com"), ("example.com", None));
        assert_eq!(
            split_host_port("example.com:8080"),
            ("example.com", Some(8080))
        );
        assert_eq!(split_host_port("[::1]:80"), ("::1", Some(80)));
        assert_eq!(split_host_port("[::1]"), ("::1", None));
        assert_eq!(split_host_port("::1"), ("::1", None));
        let req = Request::get("/")
            .header("host", "Shop.COM:81")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req), (Some(81), Cow::from("shop.com")));
        let req = Request::get("http://h2.example/x").body(()).unwrap();
        assert_eq!(request_host(&req), (None, Cow::from("h2.example")));
    }
}
