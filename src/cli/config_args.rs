//! Where the injection config comes from: defaults, a file, `--set`, or the cluster.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use k8s_openapi::api::core::v1::ConfigMap;
use meshctl::inject::InjectionConfig;
use meshctl::inject::config::{CONFIG_MAP_KEY, CONFIG_MAP_NAME};

#[derive(Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// Injection config: a YAML/JSON config document, or a ConfigMap manifest carrying
    /// it under data.config (default: the default profile).
    #[arg(long, value_name = "FILE")]
    pub injection_config: Option<PathBuf>,
    /// Override one config field, e.g. --set hub=example.com/mesh --set nativeSidecar=false.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub sets: Vec<String>,
    /// Read the config installed in the cluster (ConfigMap mesh-system/mesh-sidecar-injector).
    #[arg(long)]
    pub from_cluster: bool,
    /// Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
}

/// A kube client from --kubeconfig, or the default chain.
pub async fn kube_client(kubeconfig: Option<&PathBuf>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no cluster configuration found (use --kubeconfig)")?,
    };
    kube::Client::try_from(config).context("creating Kubernetes client")
}

impl ConfigArgs {
    /// Build the config (without cluster access unless --from-cluster).
    pub fn load(&self, mesh_namespace: &str) -> Result<InjectionConfig> {
        let base = if self.from_cluster {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let client = kube_client(self.kubeconfig.as_ref()).await?;
                let api: kube::Api<ConfigMap> = kube::Api::namespaced(client, mesh_namespace);
                let cm = api.get(CONFIG_MAP_NAME).await.with_context(|| {
                    format!("reading ConfigMap {mesh_namespace}/{CONFIG_MAP_NAME}")
                })?;
                InjectionConfig::from_config_map_data(&cm.data.unwrap_or_default()).with_context(
                    || format!("ConfigMap {mesh_namespace}/{CONFIG_MAP_NAME} key {CONFIG_MAP_KEY}"),
                )
            })?
        } else if let Some(path) = &self.injection_config {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            InjectionConfig::from_yaml_or_config_map(&text)
                .with_context(|| format!("{}", path.display()))?
        } else {
            InjectionConfig::default()
        };
        if self.sets.is_empty() {
            Ok(base)
        } else {
            base.with_overrides(&self.sets).context("--set")
        }
    }
}
