//! `meshctl control-plane`: the sidecar-injection webhook, and (with cluster access) the
//! Gateway API control plane: config distribution to proxies, gateway deployments, status.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use mesh_wire::ports;
use meshctl::inject::InjectionConfig;
use meshctl::net_limits::{self, ConnectionLimits};
use meshctl::webhook::namespaces::KubeNamespaces;
use meshctl::webhook::tls::CertStore;
use meshctl::webhook::{self, AppState, Limits, NamespaceLookup, StaticNamespaces};

use super::config_args::kube_client;

#[derive(Args, Debug)]
pub struct ControlPlaneArgs {
    /// Webhook HTTPS listen address (in a pod: 0.0.0.0:15017).
    #[arg(long, default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, ports::WEBHOOK)))]
    pub webhook_addr: SocketAddr,
    /// Serving certificate chain (PEM); reloaded when it changes.
    #[arg(long, default_value = "/etc/meshctl/webhook/tls.crt")]
    pub tls_cert: PathBuf,
    /// Serving private key (PEM); reloaded when it changes.
    #[arg(long, default_value = "/etc/meshctl/webhook/tls.key")]
    pub tls_key: PathBuf,
    /// Injection config file (the mounted ConfigMap key `config`, or a ConfigMap
    /// manifest); reloaded when it changes. Default: the default profile.
    #[arg(long, value_name = "FILE")]
    pub injection_config: Option<PathBuf>,
    /// Kubeconfig for namespace-label lookups (default: in-cluster when running in a pod).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Do not contact the API server: namespaces count as unlabelled.
    #[arg(long)]
    pub no_cluster: bool,
    /// Largest AdmissionReview body accepted (bytes); larger gets 413.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Longest a client may take to send an AdmissionReview body once its headers arrived;
    /// slower gets 408.
    #[arg(long, alias = "stall-timeout", default_value = "10s", value_parser = mesh_config::parse_duration)]
    pub request_body_timeout: Duration,
    /// Webhook connections open at once; more wait to be accepted until one closes.
    #[arg(long, default_value_t = net_limits::DEFAULT_WEBHOOK_MAX_CONNECTIONS, value_parser = positive)]
    pub webhook_max_connections: usize,
    #[command(flatten)]
    pub connections: ConnectionArgs,
    /// How often cert and config files are checked for changes.
    #[arg(long, default_value = "2s", value_parser = mesh_config::parse_duration)]
    pub reload_interval: Duration,
    /// Do not run the injection webhook (only the Gateway API control plane).
    #[arg(long)]
    pub no_webhook: bool,
    #[command(flatten)]
    pub distribution: DistributionArgs,
}

/// Timeouts of every connection to the webhook and to config distribution.
#[derive(Args, Debug)]
pub struct ConnectionArgs {
    /// Longest a TLS handshake may take, from accept.
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    pub tls_handshake_timeout: Duration,
    /// Longest from accept until a connection's first request headers have arrived (a client
    /// that sends nothing, or part of a request, is disconnected).
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    pub request_headers_timeout: Duration,
    /// How long a connection with no request in flight stays open (a proxy's config stream
    /// counts as a request in flight for as long as it is open).
    #[arg(long, default_value = "5m", value_parser = positive_duration)]
    pub idle_timeout: Duration,
}

impl ConnectionArgs {
    fn limits(&self, max_connections: usize) -> ConnectionLimits {
        ConnectionLimits {
            tls_handshake_timeout: self.tls_handshake_timeout,
            request_headers_timeout: self.request_headers_timeout,
            idle_timeout: self.idle_timeout,
            max_connections,
        }
    }
}

/// The Gateway API control plane (needs cluster access).
#[derive(Args, Debug)]
pub struct DistributionArgs {
    /// Config distribution listen address (TLS, HTTP/2; in a pod: 0.0.0.0:15012).
    #[arg(long, default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, ports::DISTRIBUTION)))]
    pub distribution_addr: SocketAddr,
    /// Serving certificate chain for config distribution (PEM). Without it, a CA and a
    /// certificate are generated into --distribution-cert-dir (kept across restarts).
    #[arg(long, value_name = "FILE", requires_all = ["distribution_key", "distribution_ca"])]
    pub distribution_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub distribution_key: Option<PathBuf>,
    /// The CA proxies use to verify --distribution-cert (copied into each gateway namespace
    /// as ConfigMap mesh-ca-root-cert).
    #[arg(long, value_name = "FILE")]
    pub distribution_ca: Option<PathBuf>,
    /// Where the generated CA (root-cert.pem), certificate and key live
    /// (default: $TMPDIR/meshctl-distribution).
    #[arg(long, value_name = "DIR")]
    pub distribution_cert_dir: Option<PathBuf>,
    /// Names (DNS or IP) of the generated certificate; repeatable.
    #[arg(
        long = "distribution-san",
        value_name = "NAME",
        default_values = ["meshd.mesh-system.svc", "meshd.mesh-system.svc.cluster.local", "localhost", "127.0.0.1"]
    )]
    pub distribution_sans: Vec<String>,
    /// Admin endpoint (`/debug/proxies` for `meshctl proxy-status`, `/ready`), or `off`.
    #[arg(long, default_value = "127.0.0.1:15014")]
    pub admin_addr: String,
    /// GatewayClass controller names we own; repeatable.
    #[arg(
        long = "controller-name",
        value_name = "NAME",
        default_values = ["meshctl.io/gateway-controller", "istio.io/gateway-controller"]
    )]
    pub controller_names: Vec<String>,
    /// Request path normalization of every proxy (Istio's
    /// `meshConfig.pathNormalization.normalization`: NONE, BASE, MERGE_SLASHES,
    /// DECODE_AND_MERGE_SLASHES); default: the proxies' own (BASE).
    #[arg(long, value_name = "MODE")]
    pub path_normalization: Option<mesh_config::PathNormalization>,
    /// Image registry of the gateway proxy image `<hub>/mesh-proxy:<tag>`.
    #[arg(long, default_value = "ghcr.io/meshctl")]
    pub hub: String,
    #[arg(long, default_value = "latest")]
    pub tag: String,
    /// Address gateway proxies dial.
    #[arg(long, default_value_t = format!("meshd.mesh-system.svc:{}", ports::DISTRIBUTION))]
    pub proxy_control_plane_address: String,
    /// Service type of gateways without the `networking.istio.io/service-type` annotation.
    #[arg(long, default_value = "LoadBalancer")]
    pub gateway_service_type: String,
    /// Do not create Deployments/Services for Gateways.
    #[arg(long)]
    pub no_gateway_deployments: bool,
    /// Do not write Gateway API status.
    #[arg(long)]
    pub no_status: bool,
    /// The audience of the service-account tokens proxies must present (the injection
    /// config's `tokenAudience`); the API server checks them (TokenReview).
    #[arg(long, default_value = meshctl::controlplane::auth::DEFAULT_AUDIENCE)]
    pub proxy_token_audience: String,
    /// Serve config to any client that reaches the port (no token needed). For tests.
    #[arg(long)]
    pub no_proxy_auth: bool,
    /// Changes arriving within this window are translated and pushed together.
    #[arg(long, default_value = "100ms", value_parser = mesh_config::parse_duration)]
    pub debounce: Duration,
    /// Config distribution connections open at once (one per proxy); more wait to be
    /// accepted until one closes.
    #[arg(long, default_value_t = net_limits::DEFAULT_DISTRIBUTION_MAX_CONNECTIONS, value_parser = positive)]
    pub distribution_max_connections: usize,
    #[command(flatten)]
    pub mesh_ca: MeshCaArgs,
}

/// The mesh CA: workload certificates (SPIFFE identities) for proxies.
#[derive(Args, Debug)]
pub struct MeshCaArgs {
    /// Trust domain of workload identities, spiffe://<trust domain>/ns/<ns>/sa/<sa>
    /// (the profile's meshConfig.trustDomain).
    #[arg(long, default_value = mesh_config::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Lifetime of a workload certificate when the proxy asks for none (at least 1m).
    #[arg(long, default_value = "24h", value_parser = cert_ttl)]
    pub workload_cert_ttl: Duration,
    /// The longest lifetime issued, whatever a proxy asks for (at least 1m).
    #[arg(long, default_value = "48h", value_parser = cert_ttl)]
    pub max_workload_cert_ttl: Duration,
    /// Namespace of the CA's Secrets: `cacerts` (a CA you plug in, Istio's layout) wins over
    /// `mesh-ca-secret` (the root meshd makes when neither exists).
    #[arg(long, env = "POD_NAMESPACE", default_value = meshctl::controlplane::mesh_ca::DEFAULT_NAMESPACE)]
    pub mesh_ca_namespace: String,
    /// Keep the CA in this directory instead of Secrets (Istio's plug-in files; a new root
    /// is written there when it holds none). For running without a mesh installed.
    #[arg(long, value_name = "DIR")]
    pub mesh_ca_dir: Option<PathBuf>,
    /// For tests, with --no-proxy-auth only: issue whatever identity a CSR names. Without it,
    /// certificates are refused while proxies are not authenticated (no identity is proven).
    #[arg(long, requires = "no_proxy_auth")]
    pub insecure_issue_requested_identity: bool,
}

impl MeshCaArgs {
    fn options(&self) -> meshctl::controlplane::mesh_ca::MeshCaOptions {
        use meshctl::controlplane::mesh_ca::{CaSource, MeshCaOptions};
        let source = match &self.mesh_ca_dir {
            Some(dir) => CaSource::Dir(dir.clone()),
            None => CaSource::Kubernetes {
                namespace: self.mesh_ca_namespace.clone(),
            },
        };
        MeshCaOptions {
            source,
            trust_domain: self.trust_domain.clone(),
            workload_cert_ttl: self.workload_cert_ttl,
            max_workload_cert_ttl: self.max_workload_cert_ttl,
            insecure_issue_requested_identity: self.insecure_issue_requested_identity,
        }
    }
}

/// A workload certificate lifetime: at least a minute (a proxy renews at half of it).
fn cert_ttl(s: &str) -> Result<Duration, String> {
    match mesh_config::parse_duration(s)? {
        d if d < meshctl::controlplane::mesh_ca::MIN_WORKLOAD_CERT_TTL => {
            Err(format!("{s:?}: must be at least 1m"))
        }
        d => Ok(d),
    }
}

impl DistributionArgs {
    fn config(
        &self,
        connections: &ConnectionArgs,
    ) -> Result<meshctl::controlplane::ControlPlaneConfig> {
        use meshctl::controlplane::{ControlPlaneConfig, certs::CertSource, gateways};
        let cert = match (
            &self.distribution_cert,
            &self.distribution_key,
            &self.distribution_ca,
        ) {
            (Some(cert), Some(key), Some(ca)) => CertSource::Files {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            },
            _ => CertSource::Generated {
                dir: self
                    .distribution_cert_dir
                    .clone()
                    .unwrap_or_else(|| std::env::temp_dir().join("meshctl-distribution")),
                sans: self.distribution_sans.clone(),
            },
        };
        let admin_addr = match self.admin_addr.as_str() {
            "off" => None,
            a => Some(a.parse().with_context(|| format!("--admin-addr {a:?}"))?),
        };
        let translate = mesh_translate::TranslateOptions {
            controller_names: self.controller_names.clone(),
            // The identities endpoints must present are the ones the mesh CA issues.
            trust_domain: self.mesh_ca.trust_domain.clone(),
            http: mesh_config::HttpOptions {
                path_normalization: self.path_normalization,
                ..Default::default()
            },
            ..mesh_translate::TranslateOptions::default()
        };
        let gateway_deployments =
            (!self.no_gateway_deployments).then(|| gateways::GatewayDeploymentOptions {
                image: format!("{}/mesh-proxy:{}", self.hub, self.tag),
                control_plane_address: self.proxy_control_plane_address.clone(),
                default_service_type: self.gateway_service_type.clone(),
                pod_labels: translate.gateway_labels.clone(),
                token_audience: self.proxy_token_audience.clone(),
                ca_pem: None,
            });
        let mesh_ca = self.mesh_ca.options();
        mesh_ca.validate()?;
        Ok(ControlPlaneConfig {
            distribution_addr: self.distribution_addr,
            distribution_limits: connections.limits(self.distribution_max_connections),
            admin_addr,
            cert,
            translate,
            gateway_deployments,
            write_status: !self.no_status,
            debounce: self.debounce,
            proxy_token_audience: (!self.no_proxy_auth).then(|| self.proxy_token_audience.clone()),
            mesh_ca: Some(mesh_ca),
        })
    }
}

/// A timeout of zero would close every connection at once.
fn positive_duration(s: &str) -> Result<Duration, String> {
    match mesh_config::parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?}: must be longer than zero")),
        d => Ok(d),
    }
}

fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

pub fn run(args: ControlPlaneArgs) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(args: ControlPlaneArgs) -> Result<()> {
    let cfg = match &args.injection_config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            InjectionConfig::from_yaml_or_config_map(&text)
                .with_context(|| p.display().to_string())?
        }
        None => InjectionConfig::default(),
    };
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut control_plane = None;
    let namespaces: Arc<dyn NamespaceLookup> = if !args.no_cluster
        && (args.kubeconfig.is_some() || in_cluster)
    {
        let client = kube_client(args.kubeconfig.as_ref()).await?;
        let config = args.distribution.config(&args.connections)?;
        control_plane = Some(tokio::spawn(meshctl::controlplane::run(
            client.clone(),
            config,
            shutdown.clone(),
        )));
        KubeNamespaces::start(client)
    } else {
        tracing::warn!(
            "no cluster access: namespace labels are not consulted, no Gateway API control plane"
        );
        Arc::new(StaticNamespaces::default())
    };
    if args.no_webhook {
        let Some(cp) = control_plane else {
            anyhow::bail!("--no-webhook without cluster access leaves nothing to run");
        };
        tokio::select! {
            r = cp => r.context("control plane task")??,
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm() => {}
        }
        shutdown.cancel();
        return Ok(());
    }
    if let Some(cp) = control_plane {
        tokio::spawn(async move {
            match cp.await {
                Ok(Err(e)) => {
                    tracing::error!("control plane stopped: {e:#}");
                    std::process::exit(1);
                }
                Err(e) => {
                    tracing::error!("control plane task: {e}");
                    std::process::exit(1);
                }
                Ok(Ok(())) => {}
            }
        });
    }
    let certs = CertStore::load(&args.tls_cert, &args.tls_key).context("serving certificate")?;
    let state = AppState::new(
        cfg,
        namespaces,
        Limits {
            max_body_bytes: args.max_body_bytes,
            body_timeout: args.request_body_timeout,
            connections: args.connections.limits(args.webhook_max_connections),
        },
    );
    webhook::spawn_reloaders(
        state.clone(),
        certs.clone(),
        args.injection_config.clone(),
        args.reload_interval,
    );
    let listener = tokio::net::TcpListener::bind(args.webhook_addr)
        .await
        .with_context(|| format!("binding {}", args.webhook_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "sidecar-injection webhook listening (POST /inject)");
    let webhook_shutdown = async {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm() => {}
        }
    };
    webhook::serve(listener, certs, state, webhook_shutdown).await?;
    shutdown.cancel();
    Ok(())
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
