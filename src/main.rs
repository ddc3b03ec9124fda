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
    /// Run the walkthrough on this machine, no cluster.
    Demo(cli::demo::DemoArgs),
    /// Inject the mesh sidecar into Kubernetes manifests (offline, like kube-inject).
    Inject(cli::inject::InjectArgs),
    /// Run the control plane: the sidecar-injection webhook and, with cluster access, the
    /// Gateway API control plane (config distribution on 15012).
    ControlPlane(Box<cli::control_plane::ControlPlaneArgs>),
    /// Show every proxy connected to the control plane and its config sync state.
    ProxyStatus(cli::proxy_status::ProxyStatusArgs),
    /// The mesh CA: its roots (`status`), and replacing the root in one command (`rotate`).
    Ca(cli::ca::CaArgs),
    /// Render the install manifests.
    Manifest(cli::manifest::ManifestArgs),
    /// Install or upgrade the mesh (server-side apply; prunes what the profile no longer has).
    Install(cli::install::InstallArgs),
    /// Check the cluster against the rendered manifests: missing, drifted, not ready.
    VerifyInstall(cli::install::VerifyArgs),
    /// Remove what install created (CRDs only with --purge).
    Uninstall(cli::install::UninstallArgs),
}

// glibc's malloc was ~45% of the webhook's CPU per review (perf, bench/); mimalloc's
// thread-local free lists make the many small allocations of JSON and HTTP handling cheap.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mesh_tls::install_default();
    let cli = Cli::parse();
    // The demo prints a report on stdout; its servers' info logs would only interleave.
    let default_level = match cli.command {
        Command::Demo(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // kube_client logs every failed request at ERROR; our errors already say it once.
                tracing_subscriber::EnvFilter::new(format!("{default_level},kube_client=off"))
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Demo(args) => cli::demo::run(args),
        Command::Inject(args) => cli::inject::run(args),
        Command::ControlPlane(args) => cli::control_plane::run(*args),
        Command::ProxyStatus(args) => cli::proxy_status::run(args),
        Command::Ca(args) => cli::ca::run(args),
        Command::Manifest(args) => cli::manifest::run(args),
        Command::Install(args) => cli::install::install(args),
        Command::VerifyInstall(args) => cli::install::verify(args),
        Command::Uninstall(args) => cli::install::uninstall(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
