//! `meshctl demo`: the walkthrough on one machine, with no cluster. The walkthrough's three
//! apps run as local servers, the walkthrough's files (embedded verbatim) go through the same
//! translator the control plane uses, and a gateway `mesh-proxy` runs in this process. Then
//! the walkthrough's traffic is sent and what the walkthrough printed is printed.
//!
//! Steps follow the walkthrough's order: routes first and the canary check, then the EnvoyFilter
//! (applied to the running proxy as a live update) and the parallel rate-limit check. Then a
//! security part the walkthrough does not have: two of its apps with sidecars of their own
//! and mutual TLS between them (`security`).

mod app;
mod security;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mesh_proxy::{Proxy, ProxyHandle, ProxyOptions};
use mesh_translate::{LoadOptions, Resources, TranslateOptions};

pub use app::{DemoApp, RunningApp, WHOAMI_PATH};
pub use security::{PlaintextAnswer, SecurityReport};

/// The walkthrough's files, embedded verbatim (examples/seed-walkthrough is a copy of
/// ../shared/seed-walkthrough, checked by a test).
pub mod walkthrough {
    pub const DEPLOYMENT: &str = include_str!("../../examples/seed-walkthrough/deployment.yaml");
    pub const GATEWAY: &str = include_str!("../../examples/seed-walkthrough/gateway.yaml");
    pub const ROUTE_MYAPP: &str =
        include_str!("../../examples/seed-walkthrough/httproute-myapp.yaml");
    pub const ROUTE_OTHERAPP: &str =
        include_str!("../../examples/seed-walkthrough/httproute-otherapp.yaml");
    pub const ENVOY_FILTER: &str =
        include_str!("../../examples/seed-walkthrough/istio-envoy-filter.yaml");
}

/// The namespace the walkthrough is applied to (`kubectl apply -n demo`).
const NAMESPACE: &str = "demo";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start a demo app: {0}")]
    App(std::io::Error),
    #[error("{0}")]
    Load(#[from] mesh_translate::LoadError),
    #[error("the gateway proxy: {0}")]
    Proxy(#[from] mesh_proxy::ServeError),
    #[error("the walkthrough's Gateway produced no listener")]
    NoListener,
    #[error("the walkthrough has no app {0}")]
    NoApp(&'static str),
    #[error("the sidecar of {0} has no listener")]
    NoSidecarListener(&'static str),
    #[error("request to {url}: {message}")]
    Request { url: String, message: String },
    #[error("the demo's mesh CA: {0}")]
    Ca(mesh_tls::ca::CaError),
    #[error("the workload certificate of {id}: {message}")]
    Certificate { id: String, message: String },
    #[error("a sidecar's config: {0}")]
    SidecarConfig(String),
    #[error("mutual TLS handshake with the sidecar at {server}: {message}")]
    Handshake { server: SocketAddr, message: String },
    #[error("writing the report: {0}")]
    Output(#[from] std::io::Error),
}

/// How to run the demo.
#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// Local port for the Gateway's port 80 (0: any free port).
    pub port: u16,
}

/// What the demo measured (also printed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoReport {
    /// Step 6: answers of 100 sequential GETs of `/` by app name.
    pub canary: BTreeMap<String, u32>,
    /// Step 7: status → count for 100 parallel GETs of `/`.
    pub burst_root: BTreeMap<u16, u32>,
    /// Step 7: status → count for 100 parallel GETs of `/other`.
    pub burst_other: BTreeMap<u16, u32>,
    /// Step 7: the headers of one 429 answer on `/`, in order.
    pub limited_headers: Vec<(String, String)>,
    pub limited_body: String,
    /// Steps 8–10: mutual TLS between two apps' own sidecars.
    pub security: SecurityReport,
}

/// A running demo: the apps and the gateway. Dropping it stops everything.
pub struct Demo {
    pub gateway: SocketAddr,
    proxy: ProxyHandle,
    _apps: Vec<RunningApp>,
    apps: Vec<(&'static str, SocketAddr)>,
    warnings: Vec<String>,
}

/// What the EndpointSlice controller would write for the walkthrough's Services: one ready endpoint
/// each, at the local app.
fn endpoint_slices(apps: &[(&str, SocketAddr)]) -> String {
    apps.iter()
        .map(|(service, addr)| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-local\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n  - name: http\n    port: {port}\n    protocol: TCP\nendpoints:\n  - addresses: [\"{ip}\"]\n    conditions:\n      ready: true\n",
                port = addr.port(),
                ip = addr.ip()
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn load(files: &[(&str, &str)], warnings: &mut Vec<String>) -> Result<Resources, DemoError> {
    let options = LoadOptions {
        default_namespace: NAMESPACE.to_string(),
    };
    let mut resources = Resources::default();
    for (name, text) in files {
        let loaded = mesh_translate::load_str(name, text, &options)?;
        // Deployments are what the apps above stand for; saying so once is enough.
        warnings.extend(
            loaded
                .warnings
                .iter()
                .filter(|w| !w.message.contains("not used by the proxy"))
                .map(ToString::to_string),
        );
        resources.extend(loaded.resources);
    }
    Ok(resources)
}

fn translate(resources: &Resources, warnings: &mut Vec<String>) -> mesh_proxy::config::ProxyConfig {
    let options = TranslateOptions {
        default_namespace: NAMESPACE.to_string(),
        ..TranslateOptions::default()
    };
    let translation = mesh_translate::translate(resources, &options);
    warnings.extend(translation.warnings.iter().map(ToString::to_string));
    translation.config
}

/// The walkthrough's objects as the cluster would hold them after step 5 (`with_filter`: step 7),
/// with EndpointSlices for the local apps.
fn walkthrough_resources(
    apps: &[(&str, SocketAddr)],
    with_filter: bool,
    warnings: &mut Vec<String>,
) -> Result<Resources, DemoError> {
    let slices = endpoint_slices(apps);
    let mut files = vec![
        ("deployment.yaml", walkthrough::DEPLOYMENT),
        ("endpointslices.yaml", slices.as_str()),
        ("gateway.yaml", walkthrough::GATEWAY),
        ("httproute-myapp.yaml", walkthrough::ROUTE_MYAPP),
        ("httproute-otherapp.yaml", walkthrough::ROUTE_OTHERAPP),
    ];
    if with_filter {
        files.push(("istio-envoy-filter.yaml", walkthrough::ENVOY_FILTER));
    }
    load(&files, warnings)
}

impl Demo {
    /// Steps 3–5: the apps, the Gateway and both HTTPRoutes, served by a gateway proxy.
    pub async fn start(options: &DemoOptions) -> Result<Demo, DemoError> {
        let mut running = Vec::new();
        let mut apps = Vec::new();
        for (service, name, prefix) in [
            ("myapp-v1", "myapp v1", "/"),
            ("myapp-v2", "myapp v2", "/"),
            ("otherapp", "otherapp", "/other"),
        ] {
            let app = DemoApp::new(name, prefix)
                .start()
                .await
                .map_err(DemoError::App)?;
            apps.push((service, app.addr));
            running.push(app);
        }
        let mut warnings = Vec::new();
        let resources = walkthrough_resources(&apps, false, &mut warnings)?;
        let config = translate(&resources, &mut warnings);
        let proxy = Proxy::start(
            config,
            ProxyOptions {
                bind_address: [127, 0, 0, 1].into(),
                listener_port_overrides: [(80, options.port)].into_iter().collect(),
                ..ProxyOptions::default()
            },
        )
        .await?;
        let gateway = proxy
            .listeners()
            .await
            .first()
            .map(|l| l.address)
            .ok_or(DemoError::NoListener)?;
        Ok(Demo {
            gateway,
            proxy,
            _apps: running,
            apps,
            warnings,
        })
    }

    /// Step 7: the EnvoyFilter, applied to the running proxy (no restart, buckets start full).
    pub async fn apply_envoy_filter(&mut self) -> Result<(), DemoError> {
        let mut warnings = Vec::new();
        let resources = walkthrough_resources(&self.apps, true, &mut warnings)?;
        let config = translate(&resources, &mut warnings);
        self.warnings.extend(warnings);
        self.proxy.update(config).await?;
        Ok(())
    }

    pub async fn stop(self) {
        self.proxy.shutdown(Duration::from_secs(1)).await;
    }
}

/// One GET on a new connection (as `curl` and `requests.get` do).
async fn get(addr: SocketAddr, path: &str) -> Result<(StatusCode, HeaderMap, Bytes), DemoError> {
    let url = format!("http://{addr}{path}");
    let fail = |message: String| DemoError::Request {
        url: url.clone(),
        message,
    };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail(e.to_string()))?;
    tokio::spawn(conn);
    let request = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(e.to_string()))?;
    let response = tokio::time::timeout(Duration::from_secs(3), sender.send_request(request))
        .await
        .map_err(|_| fail("no answer within 3s".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| fail(e.to_string()))?
        .to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// `seq 1 100 | xargs -P100 curl ...`: 100 requests at once, each on its own connection.
async fn burst(
    addr: SocketAddr,
    path: &'static str,
) -> Result<Vec<(StatusCode, HeaderMap, Bytes)>, DemoError> {
    let tasks: Vec<_> = (0..100)
        .map(|_| tokio::spawn(async move { get(addr, path).await }))
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.map_err(|e| DemoError::Request {
            url: path.to_string(),
            message: e.to_string(),
        })??);
    }
    Ok(out)
}

fn count_statuses(answers: &[(StatusCode, HeaderMap, Bytes)]) -> BTreeMap<u16, u32> {
    let mut counts = BTreeMap::new();
    for (status, _, _) in answers {
        *counts.entry(status.as_u16()).or_insert(0) += 1;
    }
    counts
}

fn statuses_line(counts: &BTreeMap<u16, u32>) -> String {
    counts
        .iter()
        .map(|(status, n)| format!("{n} {status}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Runs the whole walkthrough and prints it to `out`.
pub async fn run(options: &DemoOptions, out: &mut impl Write) -> Result<DemoReport, DemoError> {
    writeln!(
        out,
        "meshctl demo: the walkthrough on this machine, no cluster needed\n"
    )?;
    writeln!(
        out,
        "1. install (istio-gwapi.yaml): skipped, the gateway proxy runs inside this process"
    )?;
    let mut demo = Demo::start(options).await?;
    writeln!(
        out,
        "2. namespace demo, labelled for injection: the apps below stand for its pods"
    )?;
    writeln!(out, "3. deployment.yaml: three apps, one pod each")?;
    for (service, addr) in &demo.apps {
        writeln!(out, "     {service:<9} http://{addr}")?;
    }
    writeln!(
        out,
        "4. gateway.yaml: Gateway demo/istio-gwapi, listener http port 80, served at http://{}",
        demo.gateway
    )?;
    writeln!(
        out,
        "5. httproute-myapp.yaml: / -> myapp-v1 (weight 80), myapp-v2 (weight 20), X-Mesh and X-Canary on request and response"
    )?;
    writeln!(out, "   httproute-otherapp.yaml: /other -> otherapp")?;

    writeln!(out, "6. check_canary.py: 100 sequential GETs of /")?;
    let mut canary = BTreeMap::new();
    for _ in 0..100 {
        let (_, _, body) = get(demo.gateway, "/").await?;
        let text = String::from_utf8_lossy(&body).trim().to_string();
        *canary.entry(text).or_insert(0u32) += 1;
    }
    let v1 = canary.get("myapp v1").copied().unwrap_or(0);
    let v2 = canary.get("myapp v2").copied().unwrap_or(0);
    let total = f64::from((v1 + v2).max(1));
    writeln!(out, "     v1: {v1}, v2: {v2}")?;
    writeln!(
        out,
        "     v1: {:.1}% / v2: {:.1}%",
        f64::from(v1) * 100.0 / total,
        f64::from(v2) * 100.0 / total
    )?;

    writeln!(
        out,
        "7. istio-envoy-filter.yaml: local rate limit, 10 tokens, +5 every 60s, per instance (applied live)"
    )?;
    demo.apply_envoy_filter().await?;
    let root = burst(demo.gateway, "/").await?;
    let other = burst(demo.gateway, "/other").await?;
    let burst_root = count_statuses(&root);
    let burst_other = count_statuses(&other);
    writeln!(
        out,
        "     seq 1 100 | xargs -P100 curl /       {}",
        statuses_line(&burst_root)
    )?;
    writeln!(
        out,
        "     seq 1 100 | xargs -P100 curl /other  {}",
        statuses_line(&burst_other)
    )?;
    let (limited_headers, limited_body) = match root
        .iter()
        .find(|(s, _, _)| *s == StatusCode::TOO_MANY_REQUESTS)
    {
        Some((status, headers, body)) => {
            writeln!(out, "     a 429 from /:")?;
            writeln!(
                out,
                "       HTTP/1.1 {} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            )?;
            let mut list = Vec::new();
            for (name, value) in headers {
                let value = String::from_utf8_lossy(value.as_bytes()).to_string();
                if name != http::header::DATE {
                    writeln!(out, "       {name}: {value}")?;
                }
                list.push((name.to_string(), value));
            }
            let body = String::from_utf8_lossy(body).to_string();
            writeln!(out, "\n       {body}")?;
            (list, body)
        }
        None => (Vec::new(), String::new()),
    };
    writeln!(
        out,
        "     / is served by two pods (myapp-v1, myapp-v2), each with its own bucket: 2 x 10."
    )?;
    if !demo.warnings.is_empty() {
        writeln!(out, "\nWhat the translator reported:")?;
        for w in &demo.warnings {
            writeln!(out, "  - {w}")?;
        }
    }

    // otherapp calls myapp: myapp-v1 stands for myapp's pods. Each app gets a service account
    // of its own (the walkthrough's pods all run as `default`), so the two sides have
    // identities of their own; myapp-v1 and myapp-v2 would share `myapp`.
    let server_app = demo
        .apps
        .iter()
        .find(|(service, _)| *service == "myapp-v1")
        .map(|(_, addr)| *addr)
        .ok_or(DemoError::NoApp("myapp-v1"))?;
    let security = security::run(
        security::Meshed {
            service: "otherapp",
            service_account: "otherapp",
        },
        security::Meshed {
            service: "myapp-v1",
            service_account: "myapp",
        },
        server_app,
        out,
    )
    .await;
    demo.stop().await;
    let security = security?;
    Ok(DemoReport {
        canary,
        burst_root,
        burst_other,
        limited_headers,
        limited_body,
        security,
    })
}
