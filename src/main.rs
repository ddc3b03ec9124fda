#![forbid(unsafe_code)]
//! `meshctl`: the command line. Each subcommand's handling lives in its own module.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "meshctl",
    version,
    about = "meshctl: a service mesh for Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Inject the mesh sidecar into Kubernetes manifests (offline, like kube-inject).
    Inject(cli::inject::InjectArgs),
    /// Run the control plane: the sidecar-injection webhook and, with cluster access, the
    /// Gateway API control plane (config distribution on 15012).
    ControlPlane(Box<cli::control_plane::ControlPlaneArgs>),
    /// Show every proxy connected to the control plane and its config sync state.
    ProxyStatus(cli::proxy_status::ProxyStatusArgs),
}

fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inject(args) => cli::inject::run(args),
        Command::ControlPlane(args) => cli::control_plane::run(*args),
        Command::ProxyStatus(args) => cli::proxy_status::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
