//! Config distribution in-process, without the API server: the control plane's server
//! ([`meshctl::controlplane::Hub`]) fed with worlds the test publishes, and the proxy's client
//! ([`mesh_proxy::distribution::run_client`]) over real TLS and HTTP/2.
//!
//! - `snapshots`: snapshots, ACK/NACK, reconnects, sidecars' per-pod configs, and the scale
//!   test (1,000 HTTPRoutes, 10,000 endpoints) that prints its numbers;
//! - `limits`: the listener (15012) under connections that say nothing, and its connection
//!   cap, while a real proxy client is served throughout.

#[path = "../common/silent.rs"]
mod silent;

mod limits;
mod snapshots;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_proxy::distribution::{ClientOptions, NodeIdentity, Update, run_client};
use mesh_translate::{LoadOptions, Resources, TranslateOptions};
use meshctl::controlplane::auth::ProxyAuth;
use meshctl::controlplane::certs::{self, CertSource};
use meshctl::controlplane::{Hub, World};
use meshctl::net_limits::ConnectionLimits;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

const WALKTHROUGH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/seed-walkthrough");
/// The name proxies verify the control plane's certificate against.
const SERVER_NAME: &str = "meshd.mesh-system.svc";

/// The walkthrough's Gateway and HTTPRoutes (the myapp split `myapp_weights`, so each world
/// can give the proxy a different config), its Services and one endpoint each.
fn walkthrough_resources(myapp_weights: (u32, u32)) -> Resources {
    let mut text = String::new();
    for f in ["gateway.yaml", "httproute-otherapp.yaml"] {
        text.push_str(&std::fs::read_to_string(format!("{WALKTHROUGH}/{f}")).unwrap());
        text.push_str("\n---\n");
    }
    text.push_str(
        &std::fs::read_to_string(format!("{WALKTHROUGH}/httproute-myapp.yaml"))
            .unwrap()
            .replace("weight: 80", &format!("weight: {}", myapp_weights.0))
            .replace("weight: 20", &format!("weight: {}", myapp_weights.1)),
    );
    text.push_str("\n---\n");
    for svc in ["myapp-v1", "myapp-v2", "otherapp"] {
        write!(
            text,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {svc}}}\nspec:\n  ports: [{{name: http, port: 80, targetPort: 5678}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-abc\n  labels: {{kubernetes.io/service-name: {svc}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 5678}}]\nendpoints: [{{addresses: [10.244.0.9], conditions: {{ready: true}}}}]\n---\n"
        )
        .unwrap();
    }
    mesh_translate::load_str(
        "walkthrough.yaml",
        &text,
        &LoadOptions {
            default_namespace: "demo".into(),
        },
    )
    .unwrap()
    .resources
}

/// The control plane's config distribution server, on 127.0.0.1 over TLS.
struct Server {
    hub: Arc<Hub>,
    worlds: watch::Sender<Option<Arc<World>>>,
    addr: std::net::SocketAddr,
    ca_path: PathBuf,
    ca_pem: String,
    shutdown: CancellationToken,
    generation: u64,
    /// The certificate directory, when the server made its own.
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    /// With the default limits, certificates in `dir`, on `port` (0: any).
    async fn start(dir: &Path, port: u16) -> Server {
        Self::start_with(dir, port, ConnectionLimits::distribution()).await
    }

    /// With `limits`, certificates in a directory of its own.
    async fn with_limits(limits: ConnectionLimits) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut server = Self::start_with(dir.path(), 0, limits).await;
        server._dir = Some(dir);
        server
    }

    async fn start_with(dir: &Path, port: u16, limits: ConnectionLimits) -> Server {
        mesh_tls::install_default();
        let tls = certs::load(&CertSource::Generated {
            dir: dir.to_path_buf(),
            sans: vec![SERVER_NAME.into()],
        })
        .unwrap();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (worlds, rx) = watch::channel(None);
        // Authentication needs the API server (TokenReview): tested in tests/e2e/proxy_auth.rs.
        let hub = Hub::new(rx, TranslateOptions::default(), ProxyAuth::Disabled);
        let shutdown = CancellationToken::new();
        tokio::spawn(hub.clone().serve_with_limits(
            listener,
            tls.server_config,
            limits,
            shutdown.clone(),
        ));
        Server {
            hub,
            worlds,
            addr,
            ca_path: tls.ca_path,
            ca_pem: tls.ca_pem,
            shutdown,
            generation: 0,
            _dir: None,
        }
    }

    /// Publishes a new world; returns its generation (the version proxies are sent).
    fn publish(&mut self, resources: Resources, replicas: BTreeMap<String, u32>) -> u64 {
        self.generation += 1;
        self.worlds.send_replace(Some(Arc::new(World::new(
            self.generation,
            Arc::new(resources),
            replicas,
        ))));
        self.generation
    }

    /// A gateway proxy's subscription, as `mesh-proxy` runs it.
    fn client(&self, backoff: Duration) -> (mpsc::Receiver<Update>, CancellationToken) {
        let mut options = ClientOptions::new(
            self.addr.to_string(),
            self.ca_path.clone(),
            NodeIdentity::Gateway {
                namespace: "demo".into(),
                name: "istio-gwapi".into(),
                pod: Some("gw-0".into()),
            },
        );
        options.server_name = SERVER_NAME.into();
        options.min_backoff = backoff;
        options.max_backoff = backoff * 4;
        let (tx, rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        tokio::spawn(run_client(options, tx, stop.clone()));
        (rx, stop)
    }

    /// A TLS client config trusting the control plane's CA, offering HTTP/2 as proxies do.
    fn client_tls(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut self.ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = mesh_tls::provider();
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// The ids of the connected proxies (a reconnect gets a new id).
    fn proxy_ids(&self) -> Vec<u64> {
        self.hub.report().proxies.iter().map(|p| p.id).collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The next snapshot a client gets.
async fn next(rx: &mut mpsc::Receiver<Update>) -> Update {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("a snapshot within 20 s")
        .expect("client running")
}
