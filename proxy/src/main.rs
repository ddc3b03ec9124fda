#![forbid(unsafe_code)]
//! `mesh-proxy run --config FILE`: serve a native config, reload it on SIGHUP and when the file
//! changes, drain on SIGTERM/SIGINT.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use mesh_proxy::admin::{self, AdminAddresses, AdminArgs, AdminState};
use mesh_proxy::config::{ProxyConfig, parse_duration};
use mesh_proxy::metrics::{Metrics, ReloadResult};
use mesh_proxy::{Proxy, ProxyHandle, ProxyOptions};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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
}

#[derive(clap::Args)]
struct RunArgs {
    /// Native proxy config (YAML or JSON), reloaded on SIGHUP and when the file changes.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
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
    /// Worker threads serving traffic (default: one per core). 1 runs everything on the
    /// main thread (a current-thread runtime).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
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

/// Where the config comes from. The lead adds `Resources(Vec<PathBuf>)` (Kubernetes objects,
/// translated by mesh-translate) as another variant; everything else stays the same.
#[derive(Debug, Clone)]
enum ConfigSource {
    /// A native config file, YAML or JSON.
    Native(PathBuf),
}

impl ConfigSource {
    /// Reads, parses and validates the config. Errors name the file and the field.
    fn load(&self) -> anyhow::Result<ProxyConfig> {
        match self {
            ConfigSource::Native(path) => load_native(path),
        }
    }

    /// Files whose change triggers a reload.
    fn watched(&self) -> Vec<PathBuf> {
        match self {
            ConfigSource::Native(path) => vec![path.clone()],
        }
    }
}

fn load_native(path: &Path) -> anyhow::Result<ProxyConfig> {
    let file = path.display();
    let text = std::fs::read_to_string(path).with_context(|| format!("{file}: cannot read"))?;
    if text.trim().is_empty() {
        // Most likely caught between truncate and write; an empty config would drop every
        // listener.
        bail!("{file}: the file is empty");
    }
    let is_json =
        path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
    let config: ProxyConfig = if is_json {
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{file}: {e}"))?
    } else {
        serde_saphyr::from_str(&text).map_err(|e| anyhow::anyhow!("{file}: {e}"))?
    };
    if let Err(errs) = config.validate() {
        let lines: Vec<String> = errs.iter().map(|e| format!("{file}: {e}")).collect();
        bail!("invalid config:\n{}", lines.join("\n"));
    }
    Ok(config)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let Command::Run(args) = &cli.command;
    let mut builder = match args.workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
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

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Signal handlers first: a SIGHUP must never hit the default action (exit).
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let source = ConfigSource::Native(args.config.clone());
    // Watch before the first load, so a change made right after it is not missed.
    let (reload_tx, mut reload_rx) = mpsc::channel::<&'static str>(16);
    let _watcher = watch(&source.watched(), reload_tx)?;
    let metrics = Arc::new(Metrics::new());
    let config = match source.load() {
        Ok(c) => c,
        Err(e) => {
            metrics.config_reload(ReloadResult::Failure);
            return Err(e);
        }
    };
    let options = ProxyOptions {
        bind_address: args.bind_address,
        listener_port_overrides: args
            .listener_ports
            .iter()
            .copied()
            .collect::<HashMap<_, _>>(),
        distributed_instances: args.distributed_instances,
        metrics: Some(metrics.clone()),
        ..ProxyOptions::default()
    };
    let proxy = Proxy::start(config, options).await?;
    let admin_state = Arc::new(AdminState::new(metrics.clone()));
    publish(&proxy, &admin_state).await;
    let admin_shutdown = CancellationToken::new();
    let admin_servers = admin::start(
        &AdminAddresses::from(&args.admin),
        admin_state.clone(),
        admin_shutdown.clone(),
    )
    .await?;

    loop {
        let why = tokio::select! {
            _ = hup.recv() => "SIGHUP",
            Some(why) = reload_rx.recv() => {
                // Debounce: editors and ConfigMap updates write in several steps.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while reload_rx.try_recv().is_ok() {}
                why
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        reload(&source, &proxy, &admin_state, &metrics, why).await;
    }
    tracing::info!(grace = ?args.drain_timeout, "draining");
    admin_state.set_draining(true);
    proxy.shutdown(args.drain_timeout).await;
    admin_shutdown.cancel();
    admin_servers.join().await;
    Ok(())
}

async fn reload(
    source: &ConfigSource,
    proxy: &ProxyHandle,
    admin_state: &AdminState,
    metrics: &Metrics,
    why: &str,
) {
    let config = match source.load() {
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
    match proxy.update(config).await {
        Ok(()) => {
            tracing::info!("reloaded ({why})");
            publish(proxy, admin_state).await;
        }
        Err(e) => {
            tracing::error!("reload ({why}) rejected, still serving the previous config: {e}")
        }
    }
}

/// Prints the bound listeners (one parseable line each) and hands them to the admin server.
async fn publish(proxy: &ProxyHandle, admin_state: &AdminState) {
    let listeners = proxy.listeners().await;
    for l in &listeners {
        eprintln!("listening listener={} address={}", l.name, l.address);
    }
    admin_state.set_config(proxy.config());
    admin_state.set_listeners(
        listeners
            .into_iter()
            .map(|l| (l.name, l.address))
            .collect::<BTreeMap<_, _>>(),
    );
    admin_state.set_listeners_bound(true);
}

/// Watches the directories of `files` (so replaced files and ConfigMap symlink swaps are seen)
/// and sends a reload trigger when one of them changes.
fn watch(
    files: &[PathBuf],
    tx: mpsc::Sender<&'static str>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let names: Vec<std::ffi::OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_os_string()))
        .collect();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let Ok(ev) = ev else { return };
        if ev.kind.is_access() {
            return;
        }
        let relevant = ev.paths.iter().any(|p| {
            p.file_name().is_some_and(|n| {
                names.iter().any(|w| w == n) || n.to_string_lossy().starts_with("..")
            })
        });
        if relevant {
            let _ = tx.try_send("file changed");
        }
    })?;
    for f in files {
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
