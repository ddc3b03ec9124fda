//! `mesh-proxy run --config FILE`: serve a native config, reload it on SIGHUP and when the file
//! changes, drain on SIGTERM/SIGINT.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use mesh_proxy::admin::{self, AdminAddresses, AdminArgs, AdminState};
use mesh_proxy::config::{ProxyConfig, parse_duration};
use mesh_proxy::metrics::{Metrics, ReloadResult};
use mesh_proxy::settle;
use mesh_proxy::subscription::Signals;
use mesh_proxy::workers::Workers;
use mesh_proxy::{Proxy, ProxyHandle, ProxyOptions};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

mod bin_sidecar;

#[derive(Parser)]
#[command(name = "mesh-proxy", version, about = "The meshctl data plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a config until SIGTERM/SIGINT.
    Run(RunArgs),
    /// Program the pod's traffic capture (nat rules); what the injected `mesh-init` runs.
    Redirect(mesh_proxy::redirect::RedirectArgs),
    /// Run as a pod's sidecar: capture-aware inbound and outbound listeners.
    Sidecar(bin_sidecar::SidecarArgs),
    /// Exit 0 once the local sidecar is ready (classic-mode postStart hook).
    Wait(bin_sidecar::WaitArgs),
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "resources", "control_plane"])))]
struct RunArgs {
    /// Native proxy config (YAML or JSON), reloaded on SIGHUP and when the file changes.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Kubernetes objects (files or directories of multi-document YAML/JSON): Gateway API
    /// GatewayClass/Gateway/HTTPRoute/ReferenceGrant, Service, EndpointSlice,
    /// RateLimitPolicy, Istio EnvoyFilter (local rate limit) and IstioOperator (access log).
    /// Reloaded on SIGHUP and when a file changes.
    #[arg(long, value_name = "PATH", num_args = 1..)]
    resources: Vec<PathBuf>,
    /// Get the config from the control plane (`HOST:PORT`, TLS; see
    /// docs/config-distribution.md). With `--gateway NS/NAME` the proxy serves that Gateway;
    /// without, it identifies as the sidecar of pod `$POD_NAMESPACE/$POD_NAME`.
    #[arg(long, value_name = "HOST:PORT", env = mesh_wire::names::ENV_CONTROL_PLANE)]
    control_plane: Option<String>,
    /// CA bundle (PEM) that verifies the control plane's certificate.
    #[arg(
        long,
        value_name = "FILE",
        env = mesh_wire::names::ENV_CA_ROOT_PATH,
        default_value = "/var/run/meshctl/ca/root-cert.pem"
    )]
    ca_file: PathBuf,
    /// Name the control plane's certificate must carry (default: the host of
    /// `--control-plane`).
    #[arg(long, value_name = "NAME")]
    control_plane_server_name: Option<String>,
    /// Service-account token presented to the control plane (a projected token with the
    /// mesh's audience; re-read on every connection).
    #[arg(long, value_name = "FILE", env = mesh_wire::names::ENV_TOKEN_PATH)]
    token_file: Option<PathBuf>,
    /// With `--control-plane`: lifetime of the workload certificate to ask the control plane's
    /// CA for (its default, 24h, when unset). Renewed at about half of it.
    #[arg(long, value_name = "DURATION", env = "MESH_WORKLOAD_CERT_TTL", value_parser = parse_duration, requires = "control_plane")]
    workload_cert_ttl: Option<Duration>,
    /// Without a control plane: a directory with a workload certificate (`cert-chain.pem`,
    /// `key.pem`, `root-cert.pem`, Istio's file-mounted layout) for mutual TLS with other
    /// proxies (backends with `mtlsIdentities`, listeners with `mtls`). Read once at start.
    #[arg(long, value_name = "DIR", conflicts_with = "control_plane")]
    workload_certs: Option<PathBuf>,
    /// Namespace of `--resources` objects that have none (like `kubectl apply -n`).
    #[arg(long, short = 'n', value_name = "NAMESPACE", default_value = "default")]
    namespace: String,
    /// Serve only these Gateways (`NAMESPACE/NAME`, repeatable); default: every Gateway of
    /// a GatewayClass we control.
    #[arg(long = "gateway", value_name = "NAMESPACE/NAME")]
    gateways: Vec<String>,
    /// Address for listeners that do not set their own.
    #[arg(long, value_name = "IP", default_value = "0.0.0.0")]
    bind_address: IpAddr,
    /// Serve a config port on another local port (0 = any free port); repeatable.
    #[arg(long = "listener-port", value_name = "GW_PORT=LOCAL_PORT", value_parser = parse_port_map)]
    listener_ports: Vec<(u16, u16)>,
    /// Split every distributed rate limit across this many instances (standalone mode).
    #[arg(long, value_name = "N")]
    distributed_instances: Option<u32>,
    /// Time in-flight requests get to finish on SIGTERM/SIGINT.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Worker threads serving traffic (default: one per core). Each runs its own event loop
    /// and keeps the connections it was handed; 1 serves everything on the main thread.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    workers: Option<u16>,
    /// The worker threads, started in `main` before the runtime.
    #[arg(skip)]
    worker_pool: Option<Arc<Workers>>,
    #[command(flatten)]
    http: mesh_proxy::connection::HttpArgs,
    #[command(flatten)]
    admin: AdminArgs,
}

fn parse_port_map(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not GW_PORT=LOCAL_PORT"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("{p:?} is not a port"))
    };
    Ok((port(a)?, port(b)?))
}

/// Where the config comes from.
#[derive(Debug, Clone)]
enum ConfigSource {
    /// A native config file, YAML or JSON.
    Native(PathBuf),
    /// Kubernetes objects, translated by mesh-translate.
    Resources {
        paths: Vec<PathBuf>,
        load: mesh_translate::LoadOptions,
        translate: Box<mesh_translate::TranslateOptions>,
    },
}

impl ConfigSource {
    /// Reads, parses and validates the config. Errors name the file and the field.
    fn load(&self) -> anyhow::Result<ProxyConfig> {
        match self {
            ConfigSource::Native(path) => mesh_proxy::config_file::load(path),
            ConfigSource::Resources {
                paths,
                load,
                translate,
            } => load_resources(paths, load, translate),
        }
    }

    /// Files whose change triggers a reload.
    fn watched(&self) -> Vec<PathBuf> {
        match self {
            ConfigSource::Native(path) => vec![path.clone()],
            ConfigSource::Resources { paths, .. } => paths.clone(),
        }
    }
}

/// Loads and translates Kubernetes objects. Problems in the files are errors naming file,
/// document and field; what translation could not honour is printed as warnings.
fn load_resources(
    paths: &[PathBuf],
    load: &mesh_translate::LoadOptions,
    options: &mesh_translate::TranslateOptions,
) -> anyhow::Result<ProxyConfig> {
    let loaded = mesh_translate::load(paths, load).map_err(|e| anyhow::anyhow!("{e}"))?;
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    let translation = mesh_translate::translate(&loaded.resources, options);
    for w in &translation.warnings {
        tracing::warn!("{w}");
    }
    if translation.config.listeners.is_empty() {
        bail!(
            "{}: no Gateway of a GatewayClass we control (controllers {}) to serve",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            options.controller_names.join(", ")
        );
    }
    if let Err(errs) = translation.config.validate() {
        // A translator bug, not a user error: say so plainly.
        let lines: Vec<String> = errs.iter().map(ToString::to_string).collect();
        bail!("translated config is invalid:\n{}", lines.join("\n"));
    }
    Ok(translation.config)
}

// The system allocator on purpose: mimalloc (which meshctl uses) saved ~3% of instructions
// per request here but added ~7 MB of RSS per proxy, and a sidecar runs in every pod.
fn main() -> std::process::ExitCode {
    mesh_tls::install_default();
    let mut cli = Cli::parse();
    // Use the open-file limit the system allows (the connection cap is sized from it).
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("warning: cannot raise the open-file limit: {e}");
    }
    let default_level = match &cli.command {
        Command::Sidecar(a) => a.log_level.clone(),
        _ => "info".to_string(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // `run` and `sidecar` serve traffic on worker threads of their own (proxy::workers); the
    // main thread's runtime does the rest: accepting, config, admin.
    let cores = || std::thread::available_parallelism().map_or(1, usize::from);
    let (requested, pool) = match &mut cli.command {
        Command::Run(args) => (
            args.workers.map_or_else(cores, usize::from),
            Some(&mut args.worker_pool),
        ),
        Command::Sidecar(args) => (
            args.workers.map_or_else(|| cores().min(2), usize::from),
            Some(&mut args.worker_pool),
        ),
        _ => (1, None),
    };
    let mut builder = match pool {
        Some(pool) => {
            if requested > 1 {
                match Workers::start(requested) {
                    Ok(w) => *pool = Some(Arc::new(w)),
                    Err(e) => {
                        eprintln!("error: cannot start {requested} worker threads: {e}");
                        return std::process::ExitCode::FAILURE;
                    }
                }
            }
            tokio::runtime::Builder::new_current_thread()
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Redirect(args) => mesh_proxy::redirect::run(&args),
            Command::Sidecar(args) => bin_sidecar::run(args).await,
            Command::Wait(args) => bin_sidecar::wait(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

impl RunArgs {
    fn proxy_options(&self, metrics: &Arc<Metrics>) -> ProxyOptions {
        ProxyOptions {
            bind_address: self.bind_address,
            listener_port_overrides: self
                .listener_ports
                .iter()
                .copied()
                .collect::<HashMap<_, _>>(),
            distributed_instances: self.distributed_instances,
            metrics: Some(metrics.clone()),
            workers: self.worker_pool.clone(),
            http: self.http.options(),
            ..ProxyOptions::default()
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Signal handlers first: a SIGHUP must never hit the default action (exit).
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    if let Some(address) = args.control_plane.clone() {
        return run_with_control_plane(args, address, Signals { hup, term, int }).await;
    }
    let source = match &args.config {
        Some(path) => ConfigSource::Native(path.clone()),
        None => ConfigSource::Resources {
            paths: args.resources.clone(),
            load: mesh_translate::LoadOptions {
                default_namespace: args.namespace.clone(),
            },
            translate: Box::new(mesh_translate::TranslateOptions {
                default_namespace: args.namespace.clone(),
                gateways: args.gateways.clone(),
                ..mesh_translate::TranslateOptions::default()
            }),
        },
    };
    // Watch before the first load, so a change made right after it is not missed.
    let (reload_tx, mut reload_rx) = mpsc::channel::<Change>(16);
    let _watcher = watch(&source.watched(), reload_tx)?;
    let metrics = Arc::new(Metrics::new());
    let config = match source.load() {
        Ok(c) => c,
        Err(e) => {
            metrics.config_reload(ReloadResult::Failure);
            return Err(e);
        }
    };
    let mut options = args.proxy_options(&metrics);
    let admin_state = Arc::new(AdminState::new(metrics.clone()));
    if let Some(dir) = &args.workload_certs {
        let certs = mesh_tls::WorkloadCertificates::new(None);
        certs.install_dir(dir).map_err(anyhow::Error::msg)?;
        admin_state.set_identity(certs.clone());
        options.identity = Some(certs);
    }
    let proxy = Proxy::start(config, options).await?;
    admin::publish(&proxy, &admin_state).await;
    let admin_shutdown = CancellationToken::new();
    let admin_servers = admin::start(
        &AdminAddresses::from(&args.admin),
        admin_state.clone(),
        admin_shutdown.clone(),
    )
    .await?;
    // One parseable line per admin server, like the listeners' (tests and scripts read them).
    for (name, addr) in [
        ("admin", admin_servers.admin),
        ("readiness", admin_servers.readiness),
        ("metrics", admin_servers.metrics),
    ] {
        if let Some(addr) = addr {
            eprintln!("listening server={name} address={addr}");
        }
    }

    let watched = source.watched();
    loop {
        let trigger = tokio::select! {
            _ = hup.recv() => Trigger::Signal,
            Some(change) = reload_rx.recv() => {
                // Everything reported so far: a rename (atomic replace) is complete at once,
                // anything else may be a file caught half-written (mesh_proxy::settle).
                let mut atomic = change == Change::Replaced;
                while let Ok(c) = reload_rx.try_recv() {
                    atomic &= c == Change::Replaced;
                }
                if atomic { Trigger::Replaced } else { Trigger::Written }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let settled = match trigger {
            Trigger::Signal | Trigger::Replaced => {
                settle::Settled::Quiet(settle::fingerprint(&watched))
            }
            Trigger::Written => tokio::select! {
                s = settle::settle(&watched, settle::QUIET, settle::SETTLE_LIMIT) => s,
                _ = term.recv() => break,
                _ = int.recv() => break,
            },
        };
        reload(&source, &proxy, &admin_state, &metrics, trigger, settled).await;
    }
    tracing::info!(grace = ?args.drain_timeout, "draining");
    admin_state.set_draining(true);
    proxy.shutdown(args.drain_timeout).await;
    admin_shutdown.cancel();
    admin_servers.join().await;
    Ok(())
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// SIGHUP: the operator says the files are ready.
    Signal,
    /// Every change seen was a rename over a watched file (or a ConfigMap's `..data` swap).
    Replaced,
    /// A file changed in place (or appeared, or went away).
    Written,
}

impl Trigger {
    fn why(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::Replaced => "file replaced",
            Trigger::Written => "file changed",
        }
    }
}

/// One change the watcher saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Renamed into place: the content is complete.
    Replaced,
    /// Written, created or removed: the content may be incomplete.
    Written,
}

/// Loads and applies the config whose content `settled` describes. Content that changed
/// while it was loaded is not applied (the change that follows triggers another reload), and
/// content that never settled is applied only if it drops nothing the proxy serves.
async fn reload(
    source: &ConfigSource,
    proxy: &ProxyHandle,
    admin_state: &AdminState,
    metrics: &Metrics,
    trigger: Trigger,
    settled: settle::Settled,
) {
    let why = trigger.why();
    let loaded = source.load();
    if settle::fingerprint(&source.watched()) != settled.fingerprint() {
        tracing::info!(
            "reload ({why}): the files changed while they were read; waiting for them to settle"
        );
        return;
    }
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            metrics.config_reload(ReloadResult::Failure);
            tracing::error!("reload ({why}) rejected, still serving the previous config: {e:#}");
            return;
        }
    };
    if *proxy.config() == config {
        tracing::debug!("reload ({why}): config unchanged");
        return;
    }
    if let settle::Settled::StillChanging(_) = settled {
        let dropped = settle::dropped(&proxy.config(), &config);
        if !dropped.is_empty() {
            metrics.config_reload(ReloadResult::Failure);
            tracing::error!(
                "reload ({why}) rejected, still serving the previous config: the files have \
                 been changing for {:?} and this content would drop {}",
                settle::SETTLE_LIMIT,
                dropped.join(", ")
            );
            return;
        }
    }
    match proxy.update(config).await {
        Ok(()) => {
            tracing::info!("reloaded ({why})");
            admin::publish(proxy, admin_state).await;
        }
        Err(e) => {
            tracing::error!("reload ({why}) rejected, still serving the previous config: {e}")
        }
    }
}

/// Watches the directories of `files` (so replaced files and ConfigMap symlink swaps are seen)
/// and reports each change of one of them: a rename into place, or anything else.
fn watch(
    files: &[PathBuf],
    tx: mpsc::Sender<Change>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    // A file is matched by name within its directory (so a replaced file or a ConfigMap's
    // `..data` symlink swap counts); a directory matches any change of an entry in it.
    let names: Vec<std::ffi::OsString> = files
        .iter()
        .filter(|f| !f.is_dir())
        .filter_map(|f| f.file_name().map(|n| n.to_os_string()))
        .collect();
    let dirs: Vec<PathBuf> = files
        .iter()
        .filter(|f| f.is_dir())
        .filter_map(|d| d.canonicalize().ok())
        .collect();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let Ok(ev) = ev else { return };
        if ev.kind.is_access() {
            return;
        }
        let relevant = ev.paths.iter().any(|p| {
            // In a watched directory, the files the loader reads (not, e.g., the temporary
            // file of an atomic replace).
            let in_dir = p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
                && p.parent()
                    .and_then(|d| d.canonicalize().ok())
                    .is_some_and(|d| dirs.contains(&d));
            in_dir
                || p.file_name().is_some_and(|n| {
                    names.iter().any(|w| w == n) || n.to_string_lossy().starts_with("..")
                })
        });
        if relevant {
            let change = match ev.kind {
                notify::EventKind::Modify(notify::event::ModifyKind::Name(_)) => Change::Replaced,
                _ => Change::Written,
            };
            let _ = tx.try_send(change);
        }
    })?;
    for f in files {
        if f.is_dir() {
            watcher
                .watch(f, RecursiveMode::NonRecursive)
                .with_context(|| format!("cannot watch {}", f.display()))?;
            continue;
        }
        let dir = match f.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {}", dir.display()))?;
    }
    Ok(watcher)
}

/// Who this proxy is for the control plane: `--gateway NS/NAME`, else the sidecar of the pod
/// named by `POD_NAME`/`POD_NAMESPACE` (`SERVICE_ACCOUNT` optional).
fn node_identity(args: &RunArgs) -> anyhow::Result<mesh_proxy::distribution::NodeIdentity> {
    use mesh_proxy::distribution::NodeIdentity;
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match args.gateways.as_slice() {
        [] => {
            let (Some(namespace), Some(pod)) = (env("POD_NAMESPACE"), env("POD_NAME")) else {
                bail!(
                    "--control-plane needs an identity: --gateway NAMESPACE/NAME, or POD_NAME \
                     and POD_NAMESPACE in the environment (sidecar)"
                );
            };
            Ok(NodeIdentity::Sidecar {
                namespace,
                pod,
                service_account: env("SERVICE_ACCOUNT"),
                ip: env("POD_IP").and_then(|ip| ip.parse().ok()),
            })
        }
        [gateway] => {
            let Some((namespace, name)) = gateway
                .split_once('/')
                .filter(|(n, m)| !n.is_empty() && !m.is_empty() && !m.contains('/'))
            else {
                bail!("--gateway {gateway:?}: expected NAMESPACE/NAME");
            };
            Ok(NodeIdentity::Gateway {
                namespace: namespace.into(),
                name: name.into(),
                pod: env("POD_NAME"),
            })
        }
        _ => bail!("with --control-plane, give one --gateway (the proxy serves one Gateway)"),
    }
}

/// `run --control-plane`: wait for the first snapshot, start serving it, then apply each new
/// one (ACK) or keep the previous config (NACK). While the control plane is away the proxy
/// keeps serving; the client reconnects with backoff.
async fn run_with_control_plane(
    args: RunArgs,
    address: String,
    mut signals: Signals,
) -> anyhow::Result<()> {
    use mesh_proxy::distribution::ClientOptions;
    let node = node_identity(&args)?;
    let mut client_options = ClientOptions::new(address.clone(), args.ca_file.clone(), node);
    if let Some(name) = &args.control_plane_server_name {
        client_options.server_name = name.clone();
    }
    client_options.token_file = args.token_file.clone();
    let metrics = Arc::new(Metrics::new());
    let admin_state = Arc::new(AdminState::new(metrics.clone()));
    let admin_shutdown = CancellationToken::new();
    let admin_servers = admin::start(
        &AdminAddresses::from(&args.admin),
        admin_state.clone(),
        admin_shutdown.clone(),
    )
    .await?;
    let mut options = args.proxy_options(&metrics);
    let certs = mesh_proxy::subscription::start_identity(&client_options, args.workload_cert_ttl);
    client_options.identity = Some(certs.clone());
    options.identity = Some(certs);
    let subscriber =
        mesh_proxy::subscription::Subscriber::new(options, metrics.clone(), admin_state.clone());
    let proxy =
        mesh_proxy::subscription::serve(client_options, subscriber, &mut signals, |_| {}).await;
    tracing::info!(grace = ?args.drain_timeout, "draining");
    admin_state.set_draining(true);
    if let Some(p) = proxy {
        p.shutdown(args.drain_timeout).await;
    }
    admin_shutdown.cancel();
    admin_servers.join().await;
    Ok(())
}
