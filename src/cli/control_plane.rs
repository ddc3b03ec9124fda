//! `meshctl control-plane`: for now only the sidecar-injection webhook.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use meshctl::inject::InjectionConfig;
use meshctl::webhook::namespaces::KubeNamespaces;
use meshctl::webhook::tls::CertStore;
use meshctl::webhook::{self, AppState, Limits, NamespaceLookup, StaticNamespaces};

use super::config_args::kube_client;

#[derive(Args, Debug)]
pub struct ControlPlaneArgs {
    /// Webhook HTTPS listen address (in a pod: 0.0.0.0:15017).
    #[arg(long, default_value = "127.0.0.1:15017")]
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
    /// Longest a client may stall in TLS, headers or body before the request is dropped.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub stall_timeout: Duration,
    /// How often cert and config files are checked for changes.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub reload_interval: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    meshctl::inject::redirect::parse_duration(s)
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
    let namespaces: Arc<dyn NamespaceLookup> =
        if !args.no_cluster && (args.kubeconfig.is_some() || in_cluster) {
            let client = kube_client(args.kubeconfig.as_ref()).await?;
            KubeNamespaces::start(client)
        } else {
            tracing::warn!("no cluster access: namespace labels are not consulted");
            Arc::new(StaticNamespaces::default())
        };
    let certs = CertStore::load(&args.tls_cert, &args.tls_key).context("serving certificate")?;
    let state = AppState::new(
        cfg,
        namespaces,
        Limits {
            max_body_bytes: args.max_body_bytes,
            stall_timeout: args.stall_timeout,
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
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    webhook::serve(listener, certs, state, shutdown).await?;
    Ok(())
}
