//! Flags shared by manifest generate, install, verify-install and uninstall.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use meshctl::install::profile::{Input, Resolved, resolve};

#[derive(Args, Debug, Clone, Default)]
pub struct ProfileArgs {
    /// MeshOperator (install.meshctl.io/v1alpha1) or IstioOperator file; repeatable, later
    /// files win. `-` reads stdin.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub files: Vec<String>,
    /// Override one value, e.g. --set profile=demo --set components.ingressGateway.service.type=NodePort
    /// (paths: a.b.c, list[N], list.[key:value], \. for a dot in a key).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub sets: Vec<String>,
}

impl ProfileArgs {
    /// Read the files, merge, validate; print warnings to stderr.
    pub fn resolve(&self) -> Result<Resolved> {
        let mut inputs = Vec::new();
        for f in &self.files {
            let text = if f == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .context("reading stdin")?;
                s
            } else {
                std::fs::read_to_string(f).with_context(|| format!("reading {f}"))?
            };
            inputs.push(Input {
                name: f.clone(),
                text,
            });
        }
        let resolved = resolve(&inputs, &self.sets)?;
        for w in &resolved.warnings {
            eprintln!("warning: {w}");
        }
        Ok(resolved)
    }
}

/// Cluster access, as kubectl users expect.
#[derive(Args, Debug, Clone, Default)]
pub struct ClusterArgs {
    /// Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, value_name = "FILE", global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: the current context).
    #[arg(long, value_name = "NAME", global = true)]
    pub context: Option<String>,
}
