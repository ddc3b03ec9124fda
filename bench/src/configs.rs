//! The same scenarios written for each proxy: mesh-proxy's native config, an Envoy static
//! bootstrap, an HAProxy config.

use std::time::Duration;

use mesh_config as c;
use serde::Serialize;

/// What the proxy is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// One route (`/` prefix) to one backend.
    Plain,
    /// The walkthrough's route: `/` split 80/20 to two backends, `X-Mesh: istio` added and
    /// `X-Canary: v2-20pct` set on the request and on the response.
    Seed,
    /// The walkthrough's route plus its local rate limit, with a bucket so large it never
    /// triggers: the cost of checking it.
    SeedRl,
    /// One mesh hop in plaintext: client → proxy A → proxy B → backend, each proxy with the
    /// plain route (`crate::hop`).
    Hop,
    /// The same hop with mutual TLS between A and B: A originates it, B terminates it
    /// (STRICT), with SPIFFE workload certificates.
    HopMtls,
}

impl Scenario {
    /// One proxy between the client and the backend.
    pub const ALL: [Scenario; 3] = [Scenario::Plain, Scenario::Seed, Scenario::SeedRl];
    /// Two proxies (a mesh hop).
    pub const HOPS: [Scenario; 2] = [Scenario::Hop, Scenario::HopMtls];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Plain => "plain",
            Scenario::Seed => "seed",
            Scenario::SeedRl => "seed+ratelimit",
            Scenario::Hop => "hop",
            Scenario::HopMtls => "hop-mtls",
        }
    }

    pub fn from_name(name: &str) -> Option<Scenario> {
        Self::ALL
            .into_iter()
            .chain(Self::HOPS)
            .find(|s| s.name() == name)
    }

    pub fn is_hop(self) -> bool {
        Self::HOPS.contains(&self)
    }

    fn seed(self) -> bool {
        matches!(self, Scenario::Seed | Scenario::SeedRl)
    }

    fn rate_limit(self) -> bool {
        self == Scenario::SeedRl
    }
}

/// A bucket that never runs dry at any rate this machine can drive.
const HUGE: u64 = 4_000_000_000; // Envoy: max_tokens is a uint32

pub fn mesh(s: Scenario, port: u16, backends: [u16; 2]) -> c::ProxyConfig {
    let hv = |n: &str, v: &str| c::HeaderValue {
        name: n.into(),
        value: v.into(),
    };
    let modifier = c::HeaderModifier {
        set: vec![hv("X-Canary", "v2-20pct")],
        add: vec![hv("X-Mesh", "istio")],
        remove: vec![],
    };
    let wb = |name: &str, weight| c::WeightedBackend {
        target: c::BackendTarget::Backend(name.into()),
        weight,
        filters: vec![],
    };
    let backend = |name: &str, port: u16| c::Backend {
        mtls_identities: Default::default(),
        name: name.into(),
        endpoints: vec![format!("127.0.0.1:{port}")],
        load_balancer: c::LoadBalancer::RoundRobin,
        protocol: c::UpstreamProtocol::Http1,
        connect_timeout: c::Backend::default_connect_timeout(),
        rate_limit: None,
    };
    let (weighted, filters, backs) = if s.seed() {
        (
            vec![wb("myapp-v1", 80), wb("myapp-v2", 20)],
            vec![
                c::Filter::RequestHeaderModifier(modifier.clone()),
                c::Filter::ResponseHeaderModifier(modifier),
            ],
            vec![
                backend("myapp-v1", backends[0]),
                backend("myapp-v2", backends[1]),
            ],
        )
    } else {
        (
            vec![wb("myapp-v1", 1)],
            vec![],
            vec![backend("myapp-v1", backends[0])],
        )
    };
    let rate_limits = if s.rate_limit() {
        vec![c::RateLimit {
            name: "ingress-local-ratelimit".into(),
            max_tokens: HUGE,
            tokens_per_fill: HUGE,
            fill_interval: Duration::from_secs(1),
            status: 429,
            response_headers_to_add: vec![hv("x-rate-limited", "TOO_MANY_REQUESTS")],
            x_ratelimit_headers: false,
            mode: c::RateLimitMode::Local,
        }]
    } else {
        vec![]
    };
    c::ProxyConfig {
        mesh_identity: Default::default(),
        version: "bench".into(),
        listeners: vec![c::Listener {
            passthrough_identities: Default::default(),
            mtls: Default::default(),
            name: "bench/http".into(),
            address: Some("127.0.0.1".into()),
            port,
            kind: c::ListenerKind::Gateway,
            protocol: c::ListenerProtocol::Http,
            services: vec![],
            inbound_ports: vec![],
            virtual_hosts: vec![c::VirtualHost {
                name: "bench".into(),
                hostnames: vec!["*".into()],
                routes: vec![c::Route {
                    name: "demo/myapp-route/0/0".into(),
                    matches: c::RouteMatch::default(),
                    filters,
                    action: c::RouteAction::Forward(c::Forward {
                        backends: weighted,
                        mirrors: vec![],
                    }),
                    rate_limit: None,
                    timeouts: c::Timeouts::default(),
                }],
            }],
            rate_limit: s.rate_limit().then(|| "ingress-local-ratelimit".into()),
            limits: c::HttpLimits::default(),
        }],
        backends: backs,
        rate_limits,
        access_log: c::AccessLog::default(),
        http: c::HttpOptions::default(),
    }
}

pub fn envoy(s: Scenario, port: u16, backends: [u16; 2]) -> String {
    let headers = |indent: &str| {
        format!(
            "{indent}- header: {{key: X-Mesh, value: istio}}\n\
             {indent}  append_action: APPEND_IF_EXISTS_OR_ADD\n\
             {indent}- header: {{key: X-Canary, value: v2-20pct}}\n\
             {indent}  append_action: OVERWRITE_IF_EXISTS_OR_ADD\n"
        )
    };
    let route = if s.seed() {
        format!(
            "                route:\n\
             \x20                 weighted_clusters:\n\
             \x20                   clusters:\n\
             \x20                   - {{name: myapp-v1, weight: 80}}\n\
             \x20                   - {{name: myapp-v2, weight: 20}}\n\
             \x20               request_headers_to_add:\n{}\
             \x20               response_headers_to_add:\n{}",
            headers("                "),
            headers("                ")
        )
    } else {
        "                route: {cluster: myapp-v1}\n".to_string()
    };
    let ratelimit = if s.rate_limit() {
        format!(
            "          - name: envoy.filters.http.local_ratelimit\n\
             \x20           typed_config:\n\
             \x20             \"@type\": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit\n\
             \x20             stat_prefix: http_local_rate_limiter\n\
             \x20             token_bucket: {{max_tokens: {HUGE}, tokens_per_fill: {HUGE}, fill_interval: 1s}}\n\
             \x20             filter_enabled:\n\
             \x20               runtime_key: local_rate_limit_enabled\n\
             \x20               default_value: {{numerator: 100, denominator: HUNDRED}}\n\
             \x20             filter_enforced:\n\
             \x20               runtime_key: local_rate_limit_enforced\n\
             \x20               default_value: {{numerator: 100, denominator: HUNDRED}}\n\
             \x20             response_headers_to_add:\n\
             \x20             - append_action: APPEND_IF_EXISTS_OR_ADD\n\
             \x20               header: {{key: x-rate-limited, value: TOO_MANY_REQUESTS}}\n\
             \x20             status: {{code: 429}}\n"
        )
    } else {
        String::new()
    };
    let cluster = |name: &str, port: u16| {
        format!(
            "  - name: {name}\n\
             \x20   type: STATIC\n\
             \x20   connect_timeout: 5s\n\
             \x20   load_assignment:\n\
             \x20     cluster_name: {name}\n\
             \x20     endpoints:\n\
             \x20     - lb_endpoints:\n\
             \x20       - endpoint:\n\
             \x20           address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}\n"
        )
    };
    let mut clusters = cluster("myapp-v1", backends[0]);
    if s.seed() {
        clusters.push_str(&cluster("myapp-v2", backends[1]));
    }
    format!(
        "static_resources:\n\
         \x20 listeners:\n\
         \x20 - name: bench_http\n\
         \x20   address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}\n\
         \x20   filter_chains:\n\
         \x20   - filters:\n\
         \x20     - name: envoy.filters.network.http_connection_manager\n\
         \x20       typed_config:\n\
         \x20         \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n\
         \x20         stat_prefix: ingress_http\n\
         \x20         codec_type: AUTO\n\
         \x20         route_config:\n\
         \x20           name: bench\n\
         \x20           virtual_hosts:\n\
         \x20           - name: bench\n\
         \x20             domains: [\"*\"]\n\
         \x20             routes:\n\
         \x20             - match: {{prefix: \"/\"}}\n\
         {route}\
         \x20         http_filters:\n\
         {ratelimit}\
         \x20         - name: envoy.filters.http.router\n\
         \x20           typed_config:\n\
         \x20             \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n\
         \x20 clusters:\n\
         {clusters}"
    )
}

pub fn haproxy(s: Scenario, port: u16, backends: [u16; 2], threads: usize) -> String {
    let mut fe = String::new();
    if s.rate_limit() {
        // A stick-table request-rate counter checked on every request, with a limit that
        // never triggers (HAProxy's closest equivalent of a local token bucket).
        fe.push_str(&format!(
            "    stick-table type integer size 1 expire 10s store http_req_rate(1s)\n\
             \x20   http-request track-sc0 int(1)\n\
             \x20   http-request deny deny_status 429 if {{ sc_http_req_rate(0) gt {HUGE} }}\n"
        ));
    }
    let mut be = String::new();
    if s.seed() {
        be.push_str(
            "    http-request add-header X-Mesh istio\n\
             \x20   http-request set-header X-Canary v2-20pct\n\
             \x20   http-response add-header X-Mesh istio\n\
             \x20   http-response set-header X-Canary v2-20pct\n",
        );
        be.push_str(&format!(
            "    server v1 127.0.0.1:{} weight 80\n    server v2 127.0.0.1:{} weight 20\n",
            backends[0], backends[1]
        ));
    } else {
        be.push_str(&format!("    server v1 127.0.0.1:{}\n", backends[0]));
    }
    format!(
        "global\n\
         \x20   nbthread {threads}\n\
         \x20   maxconn 4000\n\
         defaults\n\
         \x20   mode http\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 30s\n\
         \x20   timeout server 30s\n\
         \x20   option http-keep-alive\n\
         \x20   option forwardfor\n\
         \x20   http-reuse always\n\
         frontend bench\n\
         \x20   bind 127.0.0.1:{port}\n\
         {fe}\
         \x20   default_backend myapp\n\
         backend myapp\n\
         \x20   balance roundrobin\n\
         {be}"
    )
}
