//! The control plane (`meshctl control-plane`): watches the cluster, translates Gateway API
//! objects with `mesh-translate`, pushes each proxy its config over the config distribution
//! protocol (`docs/config-distribution.md`), deploys Gateways, writes Gateway API status,
//! and runs the mesh CA that issues workload certificates (`mesh_ca`).
//!
//! ```text
//! reflectors ──(debounce)──► World ──► Hub (one stream per proxy: snapshot on change, ACK/NACK)
//!                              └────► StatusWriter
//! Gateway controller (kube-runtime: Gateways + the Deployments/Services it owns) ──► SSA
//! ```

pub mod admin;
pub mod auth;
pub mod ca_root;
pub mod ca_rotation;
pub mod certs;
pub mod gateways;
pub mod hub;
pub mod mesh_ca;
pub mod metrics;
pub mod pods;
pub mod status;
pub mod unlisted;
pub mod watch;
pub mod world;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use mesh_translate::TranslateOptions;
use tokio::sync::{mpsc, watch as tokio_watch};
use tokio_util::sync::CancellationToken;

pub use hub::{Hub, ProxiesReport, ProxyState};
pub use world::World;

/// Everything `meshctl control-plane` needs besides the kube client.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// Config distribution (TLS, HTTP/2).
    pub distribution_addr: SocketAddr,
    /// Timeouts and connection cap of the config distribution listener.
    pub distribution_limits: crate::net_limits::ConnectionLimits,
    /// `/debug/proxies`, `/ready` (plain HTTP; keep it on 127.0.0.1).
    pub admin_addr: Option<SocketAddr>,
    pub cert: certs::CertSource,
    pub translate: TranslateOptions,
    /// Gateway Deployments (`None`: do not deploy Gateways).
    pub gateway_deployments: Option<gateways::GatewayDeploymentOptions>,
    /// Write Gateway API status.
    pub write_status: bool,
    /// How long a burst of changes is collected before it is translated and pushed.
    pub debounce: Duration,
    /// The audience proxies' tokens must have (`None`: proxies are not authenticated).
    pub proxy_token_audience: Option<String>,
    /// The mesh CA (`None`: no workload certificates, no trust bundle in snapshots).
    pub mesh_ca: Option<mesh_ca::MeshCaOptions>,
}

/// Runs until `shutdown`.
pub async fn run(
    client: kube::Client,
    config: ControlPlaneConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    let tls = certs::load(&config.cert).context("config distribution certificate")?;
    let mesh_ca = match config.mesh_ca.clone() {
        Some(options) => Some(std::sync::Arc::new(
            mesh_ca::MeshCa::load(Some(&client), options)
                .await
                .context("the mesh CA")?,
        )),
        None => None,
    };
    // The CA in use; it changes while the control plane runs (ca_rotation).
    let mesh_ca = mesh_ca.map(tokio_watch::channel);
    let published_roots = root_cert_pem(&tls.ca_pem, mesh_ca.as_ref().map(|(_, rx)| rx));
    // What gateway Deployments write into their namespace's ConfigMap follows it too.
    let published_tx = tokio_watch::Sender::new(published_roots.clone());
    let listener = tokio::net::TcpListener::bind(config.distribution_addr)
        .await
        .with_context(|| format!("binding {}", config.distribution_addr))?;
    tracing::info!(addr = %listener.local_addr()?, ca = %tls.ca_path.display(), "config distribution listening (TLS, HTTP/2)");

    let (changes_tx, changes_rx) = mpsc::unbounded_channel();
    let (stores, pending) = watch::start(&client, changes_tx.clone());
    let (world_tx, world_rx) = tokio_watch::channel(None);
    tokio::spawn(watch::publish_worlds(
        stores,
        pending,
        changes_rx,
        world_tx,
        config.debounce,
    ));
    let auth = match &config.proxy_token_audience {
        Some(audience) => auth::ProxyAuth::token_review(client.clone(), audience.clone()),
        None => {
            tracing::warn!(
                "--no-proxy-auth: any client that reaches config distribution gets any proxy's config"
            );
            auth::ProxyAuth::Disabled
        }
    };
    let (ca_tx, ca_rx) = match mesh_ca {
        Some((tx, rx)) => (Some(tx), Some(rx)),
        None => (None, None),
    };
    let hub = Hub::with_changing_mesh_ca(
        world_rx.clone(),
        config.translate.clone(),
        auth,
        ca_rx.clone(),
    );
    // The CA Secrets are followed: an updated cacerts, and `meshctl ca rotate`'s phases.
    if let (Some(ca), Some(options)) = (ca_tx, config.mesh_ca.clone())
        && let mesh_ca::CaSource::Kubernetes { namespace } = &options.source
    {
        let follower = ca_rotation::CaFollower {
            client: client.clone(),
            namespace: namespace.clone(),
            options: options.clone(),
            ca,
            hub: hub.clone(),
            world_changed: changes_tx.clone(),
        };
        tokio::spawn(follower.run(shutdown.clone()));
    }
    if let Some(addr) = config.admin_addr {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(addr = %l.local_addr()?, "control-plane admin listening (/debug/proxies)");
        tokio::spawn(admin::serve(l, hub.clone(), shutdown.clone()));
    }

    // Gateway Deployments: a controller of their own, driven by the Gateways and by what it
    // owns, so drift of a generated object is repaired at once.
    if let Some(mut g) = config.gateway_deployments.clone() {
        g.ca_pem = Some(published_tx.subscribe());
        tokio::spawn(gateways::run(
            client.clone(),
            g,
            config.translate.controller_names.clone(),
            shutdown.clone(),
        ));
    }
    // Status and the CA ConfigMaps follow every world; a periodic pass retries failures.
    {
        let mut world_rx = world_rx;
        let client = client.clone();
        let options = config.translate.clone();
        let mut status = config.write_status.then(status::StatusWriter::default);
        let mut ca_root = ca_root::CaPublisher::new(client.clone(), published_roots);
        let shutdown = shutdown.clone();
        let tls_ca_pem = tls.ca_pem.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tokio::select! {
                    r = world_rx.changed() => if r.is_err() { return },
                    _ = tick.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                // A changed CA comes with a new world: its roots go to every namespace again.
                let roots = root_cert_pem(&tls_ca_pem, ca_rx.as_ref());
                published_tx.send_if_modified(|p| {
                    let changed = *p != roots;
                    p.clone_from(&roots);
                    changed
                });
                ca_root.set_ca_pem(roots);
                ca_root.publish().await;
                let Some(world) = world_rx.borrow_and_update().clone() else {
                    continue;
                };
                if let Some(s) = status.as_mut() {
                    s.write(&client, &world.resources, &options).await;
                }
            }
        });
    }
    hub.serve_with_limits(
        listener,
        tls.server_config,
        config.distribution_limits,
        shutdown,
    )
    .await;
    Ok(())
}

/// What proxies trust, published in every namespace: the CA that verifies the control plane
/// first (proxies that read only the first certificate keep working), then the mesh's roots,
/// for workloads that verify their peers.
fn root_cert_pem(
    distribution_ca_pem: &str,
    mesh_ca: Option<&tokio_watch::Receiver<std::sync::Arc<mesh_ca::MeshCa>>>,
) -> String {
    match mesh_ca {
        Some(ca) => format!(
            "{}{}{}",
            distribution_ca_pem,
            if distribution_ca_pem.ends_with('\n') {
                ""
            } else {
                "\n"
            },
            ca.borrow().mesh_identity().trust_bundle_pem
        ),
        None => distribution_ca_pem.to_string(),
    }
}
