//! `mesh-proxy sidecar` (the injected `mesh-proxy` container) and `mesh-proxy wait` (the
//! classic-mode `postStart` hook). The command lines and environment are the injector's
//! (`docs/injection.md`). Part of the binary, not the library: it is the one place besides
//! `run --resources` that uses the translator.
//!
//! Config sources, first that applies:
//! 1. `--config FILE`: a native config (its listeners as written; normally one
//!    `sidecarOutbound` and one `sidecarInbound` listener);
//! 2. `--resources PATH...`: Kubernetes objects, translated for this pod by
//!    `mesh_translate::translate_sidecar` (pod identity from `POD_NAMESPACE`, `POD_NAME`,
//!    `POD_IP`);
//! 3. `MESH_CONTROL_PLANE` (what injection sets): configs pushed by `meshctl control-plane`,
//!    verified with the CA at `MESH_CA_ROOT_PATH`; the sidecar identifies itself by pod
//!    namespace, name, IP and service account. The control plane translates with the default
//!    listener ports; the sidecar puts its own `--inbound-port`/`--outbound-port` on its
//!    inbound and outbound listeners.
//!
//! File sources are reloaded on SIGHUP and when a file's modification time changes (polled
//! every second); a file written in place is applied once it has stopped changing, one
//! replaced by a rename at once (`mesh_proxy::settle`).
//! Control-plane snapshots are applied as they come (ACK) or rejected with the previous
//! config kept (NACK); while the control plane is away the sidecar keeps serving.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::bail;
use tokio_util::sync::CancellationToken;

use mesh_proxy::admin::{self, AdminAddresses, AdminState};
use mesh_proxy::app_health::{self, AppHealth};
use mesh_proxy::config::{ListenerKind, ProxyConfig, parse_duration};
use mesh_proxy::distribution::{ClientOptions, NodeIdentity};
use mesh_proxy::metrics::{Metrics, ReloadResult};
use mesh_proxy::settle::{self, Settled};
use mesh_proxy::subscription::{self, Signals, Subscriber};
use mesh_proxy::{Proxy, ProxyHandle, ProxyOptions};
use mesh_wire::names::{ENV_APP_PROBERS, ENV_CA_ROOT_PATH, ENV_CONTROL_PLANE, ENV_TOKEN_PATH};
use mesh_wire::ports;

/// `mesh-proxy sidecar`.
#[derive(Debug, Clone, clap::Args)]
pub struct SidecarArgs {
    /// Port of the inbound listener (`mesh-proxy redirect --inbound-port`).
    #[arg(long, value_name = "PORT", default_value_t = ports::SIDECAR_INBOUND)]
    pub inbound_port: u16,
    /// Port of the outbound listener (`mesh-proxy redirect --outbound-port`).
    #[arg(long, value_name = "PORT", default_value_t = ports::SIDECAR_OUTBOUND)]
    pub outbound_port: u16,
    /// Admin server port (127.0.0.1 only).
    #[arg(long, value_name = "PORT", default_value_t = ports::ADMIN)]
    pub admin_port: u16,
    /// App-health server port (`GET /app-health/<container>/<livez|readyz|startupz>`, all
    /// addresses: the kubelet probes the pod IP). Runs only when there are app probes.
    #[arg(long, value_name = "PORT", default_value_t = ports::APP_HEALTH)]
    pub app_health_port: u16,
    /// The app probes injection rewrote to the app-health port (JSON: new path → original
    /// probe), run against the app on 127.0.0.1.
    #[arg(long, value_name = "JSON", env = ENV_APP_PROBERS, hide_env_values = true)]
    pub app_probers: Option<String>,
    /// Readiness server port (`GET /ready`, all addresses).
    #[arg(long, value_name = "PORT", default_value_t = ports::READINESS)]
    pub readiness_port: u16,
    /// Metrics server port (`GET /metrics`, all addresses).
    #[arg(long, value_name = "PORT", default_value_t = ports::METRICS)]
    pub metrics_port: u16,
    /// `trace debug info warn error off` (`RUST_LOG` wins when set).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,
    /// Time in-flight requests get to finish on SIGTERM/SIGINT.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub drain_duration: Duration,
    /// A native config file instead of the control plane.
    #[arg(long, value_name = "FILE", conflicts_with = "resources")]
    pub config: Option<PathBuf>,
    /// Kubernetes objects (files or directories) instead of the control plane, translated for
    /// this pod.
    #[arg(long, value_name = "PATH", num_args = 1..)]
    pub resources: Vec<PathBuf>,
    /// How long a captured connection may stay silent before it is treated as opaque TCP
    /// (server-first protocols wait this long before their first byte; too short a value
    /// misdetects HTTP from a client that is slow to write on a busy node).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub protocol_detection_timeout: Duration,
    /// Lifetime of the workload certificate to ask the control plane's CA for (its default,
    /// 24h, when unset). Renewed at about half of it.
    #[arg(long, value_name = "DURATION", env = "MESH_WORKLOAD_CERT_TTL", value_parser = parse_duration)]
    pub workload_cert_ttl: Option<Duration>,
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub pod_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub pod_namespace: String,
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<IpAddr>,
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "")]
    pub service_account: String,
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,
    /// `host:port` of `meshctl control-plane`'s config distribution.
    #[arg(long, env = ENV_CONTROL_PLANE)]
    pub control_plane: Option<String>,
    #[arg(long, env = ENV_TOKEN_PATH)]
    pub token_path: Option<PathBuf>,
    #[arg(long, env = ENV_CA_ROOT_PATH)]
    pub ca_root_path: Option<PathBuf>,
    /// Worker threads serving traffic (default: the cores the pod may use, at most 2, like
    /// Istio's sidecar `concurrency`). 1 serves everything on the main thread.
    #[arg(long, value_name = "N", env = "MESH_PROXY_WORKERS", value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: Option<u16>,
    /// The worker threads, started by `main` before the runtime.
    #[arg(skip)]
    pub worker_pool: Option<std::sync::Arc<mesh_proxy::workers::Workers>>,
    #[command(flatten)]
    pub http: mesh_proxy::connection::HttpArgs,
}

/// Where the sidecar's config comes from.
#[derive(Debug, Clone)]
pub enum SidecarSource {
    Native(PathBuf),
    Resources(Vec<PathBuf>),
    /// `MESH_CONTROL_PLANE` (`host:port`), verified with the CA at `MESH_CA_ROOT_PATH`.
    ControlPlane(String),
}

impl SidecarArgs {
    pub fn source(&self) -> anyhow::Result<SidecarSource> {
        if let Some(c) = &self.config {
            return Ok(SidecarSource::Native(c.clone()));
        }
        if !self.resources.is_empty() {
            return Ok(SidecarSource::Resources(self.resources.clone()));
        }
        match &self.control_plane {
            Some(cp) => Ok(SidecarSource::ControlPlane(cp.clone())),
            None => bail!(
                "no config source: pass --config FILE or --resources PATH..., or set MESH_CONTROL_PLANE"
            ),
        }
    }

    fn translate_options(&self) -> mesh_translate::SidecarOptions {
        mesh_translate::SidecarOptions {
            base: mesh_translate::TranslateOptions {
                default_namespace: self.pod_namespace.clone(),
                ..Default::default()
            },
            pod_namespace: self.pod_namespace.clone(),
            pod_name: self.pod_name.clone(),
            pod_ip: self.pod_ip,
            pod_labels: None,
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
        }
    }

    fn load(&self, source: &SidecarSource) -> anyhow::Result<ProxyConfig> {
        match source {
            SidecarSource::Native(path) => mesh_proxy::config_file::load(path),
            SidecarSource::Resources(paths) => {
                let load = mesh_translate::LoadOptions {
                    default_namespace: self.pod_namespace.clone(),
                };
                let loaded =
                    mesh_translate::load(paths, &load).map_err(|e| anyhow::anyhow!("{e}"))?;
                for w in &loaded.warnings {
                    tracing::warn!("{w}");
                }
                let t =
                    mesh_translate::translate_sidecar(&loaded.resources, &self.translate_options());
                for w in &t.warnings {
                    tracing::info!("{w}");
                }
                if let Err(errs) = t.config.validate() {
                    let lines: Vec<String> = errs.iter().map(ToString::to_string).collect();
                    bail!(
                        "translated sidecar config is invalid:\n{}",
                        lines.join("\n")
                    );
                }
                Ok(t.config)
            }
            SidecarSource::ControlPlane(addr) => {
                bail!("MESH_CONTROL_PLANE={addr}: configs come as the control plane sends them")
            }
        }
    }

    /// How the sidecar connects to the control plane at `address`.
    fn client_options(&self, address: &str) -> anyhow::Result<ClientOptions> {
        let Some(ca) = &self.ca_root_path else {
            bail!(
                "MESH_CONTROL_PLANE={address} needs MESH_CA_ROOT_PATH (--ca-root-path), the CA \
                 that verifies the control plane"
            );
        };
        if self.pod_name.is_empty() {
            bail!(
                "MESH_CONTROL_PLANE={address} needs POD_NAME (--pod-name): the control plane \
                   sends each pod its own config"
            );
        }
        let node = NodeIdentity::Sidecar {
            namespace: self.pod_namespace.clone(),
            pod: self.pod_name.clone(),
            service_account: Some(self.service_account.clone()).filter(|s| !s.is_empty()),
            ip: self.pod_ip,
        };
        let mut options = ClientOptions::new(address, ca.clone(), node);
        options.token_file = self.token_path.clone();
        Ok(options)
    }

    /// The sidecar's own ports on the sidecar listeners of a pushed config.
    fn localize(&self, config: &mut ProxyConfig) {
        for l in &mut config.listeners {
            match l.kind {
                ListenerKind::SidecarInbound => l.port = self.inbound_port,
                ListenerKind::SidecarOutbound => l.port = self.outbound_port,
                ListenerKind::Gateway => {}
            }
        }
    }
}

/// The paths a file source reads.
fn source_paths(source: &SidecarSource) -> Vec<PathBuf> {
    match source {
        SidecarSource::Native(p) => vec![p.clone()],
        SidecarSource::Resources(ps) => ps.clone(),
        SidecarSource::ControlPlane(_) => Vec::new(),
    }
}

/// Modification time and inode of every file a file source reads (for a directory: its
/// `*.yaml`, `*.yml` and `*.json` entries). A new inode means the file was replaced (renamed
/// over), not written in place.
fn stamps(source: &SidecarSource) -> BTreeMap<PathBuf, Option<(SystemTime, u64)>> {
    use std::os::unix::fs::MetadataExt;
    let mut files = Vec::new();
    for p in source_paths(source) {
        if p.is_dir() {
            files.extend(
                std::fs::read_dir(&p)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .filter(|f| {
                        f.extension()
                            .and_then(|e| e.to_str())
                            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
                    }),
            );
        } else {
            files.push(p);
        }
    }
    files
        .into_iter()
        .map(|f| {
            let stamp = std::fs::metadata(&f)
                .and_then(|m| Ok((m.modified()?, m.ino())))
                .ok();
            (f, stamp)
        })
        .collect()
}

/// Whether every change between two [`stamps`] is a file replaced by another (new inode).
fn all_replaced(
    before: &BTreeMap<PathBuf, Option<(SystemTime, u64)>>,
    after: &BTreeMap<PathBuf, Option<(SystemTime, u64)>>,
) -> bool {
    let keys: std::collections::BTreeSet<&PathBuf> = before.keys().chain(after.keys()).collect();
    keys.into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .all(|k| match (before.get(k), after.get(k)) {
            (Some(Some((_, a))), Some(Some((_, b)))) => a != b,
            _ => false,
        })
}

/// Runs the sidecar until SIGTERM/SIGINT, then drains for `--drain-duration`.
pub async fn run(args: SidecarArgs) -> anyhow::Result<()> {
    let mut signals = Signals::new()?;
    let source = args.source()?;
    tracing::info!(
        pod = %format!("{}/{}", args.pod_namespace, args.pod_name),
        pod_ip = ?args.pod_ip,
        service_account = %args.service_account,
        node = %args.node_name,
        ?source,
        "starting sidecar"
    );
    // The app probes are checked before anything is served: a pod whose probes the proxy
    // cannot run would otherwise fail them with no word of why.
    let app_health = match args.app_probers.as_deref().filter(|t| !t.trim().is_empty()) {
        Some(text) => {
            let health = AppHealth::from_json(text, IpAddr::V4(Ipv4Addr::LOCALHOST), args.pod_ip)
                .map_err(|e| anyhow::anyhow!("{ENV_APP_PROBERS}: {e}"))?;
            Some(Arc::new(health))
        }
        None => None,
    };
    let metrics = Arc::new(Metrics::new());
    let admin_state = Arc::new(AdminState::new(metrics.clone()));
    // The admin servers first: /ready says 503 ("no config") until the listeners are bound.
    let admin_shutdown = CancellationToken::new();
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let admin_servers = admin::start(
        &AdminAddresses {
            admin: Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                args.admin_port,
            )),
            readiness: Some(SocketAddr::new(any, args.readiness_port)),
            metrics: Some(SocketAddr::new(any, args.metrics_port)),
        },
        admin_state.clone(),
        admin_shutdown.clone(),
    )
    .await?;
    let app_health_server = match app_health {
        Some(health) => Some(
            app_health::start(
                SocketAddr::new(any, args.app_health_port),
                health,
                admin_shutdown.clone(),
            )
            .await?,
        ),
        None => None,
    };
    if let Some(server) = &app_health_server {
        // Parseable, like the listeners' lines.
        eprintln!("listening server=app-health address={}", server.address);
    }
    let options = ProxyOptions {
        bind_address: any,
        metrics: Some(metrics.clone()),
        protocol_detection_timeout: args.protocol_detection_timeout,
        workers: args.worker_pool.clone(),
        http: args.http.options(),
        ..ProxyOptions::default()
    };
    let proxy = match &source {
        SidecarSource::ControlPlane(address) => {
            let address = address.clone();
            serve_from_control_plane(
                &args,
                &address,
                options,
                &metrics,
                &admin_state,
                &mut signals,
            )
            .await?
        }
        _ => Some(
            serve_from_files(
                &args,
                &source,
                options,
                &metrics,
                &admin_state,
                &mut signals,
            )
            .await?,
        ),
    };
    tracing::info!(grace = ?args.drain_duration, "draining");
    admin_state.set_draining(true);
    if let Some(proxy) = proxy {
        proxy.shutdown(args.drain_duration).await;
    }
    admin_shutdown.cancel();
    admin_servers.join().await;
    if let Some(server) = app_health_server {
        server.join().await;
    }
    Ok(())
}

/// `--config`/`--resources`: serve the file's config, reload on SIGHUP and on change, until
/// SIGTERM/SIGINT.
async fn serve_from_files(
    args: &SidecarArgs,
    source: &SidecarSource,
    options: ProxyOptions,
    metrics: &Arc<Metrics>,
    admin_state: &Arc<AdminState>,
    signals: &mut Signals,
) -> anyhow::Result<ProxyHandle> {
    let config = match args.load(source) {
        Ok(c) => c,
        Err(e) => {
            metrics.config_reload(ReloadResult::Failure);
            return Err(e);
        }
    };
    let proxy = Proxy::start(config, options).await?;
    admin::publish(&proxy, admin_state).await;

    let paths = source_paths(source);
    let mut seen = stamps(source);
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    loop {
        let (why, replaced) = tokio::select! {
            _ = signals.hup.recv() => ("SIGHUP", true),
            _ = poll.tick() => {
                let now = stamps(source);
                if now == seen { continue; }
                ("file changed", all_replaced(&seen, &now))
            }
            _ = signals.term.recv() => break,
            _ = signals.int.recv() => break,
        };
        // A file replaced whole is complete; one written in place may be caught half-written
        // and is applied once it has stopped changing (mesh_proxy::settle).
        let settled = if replaced {
            Settled::Quiet(settle::fingerprint(&paths))
        } else {
            tokio::select! {
                s = settle::settle(&paths, settle::QUIET, settle::SETTLE_LIMIT) => s,
                _ = signals.term.recv() => break,
                _ = signals.int.recv() => break,
            }
        };
        seen = stamps(source);
        let loaded = args.load(source);
        if settle::fingerprint(&paths) != settled.fingerprint() {
            // Forget what was seen: the next poll counts it as a change and waits for it to
            // settle.
            seen.clear();
            tracing::info!("reload ({why}): the files changed while they were read");
            continue;
        }
        match loaded {
            Ok(c) if *proxy.config() == c => {}
            Ok(c) => {
                let dropped = match settled {
                    Settled::StillChanging(_) => settle::dropped(&proxy.config(), &c),
                    Settled::Quiet(_) => Vec::new(),
                };
                if !dropped.is_empty() {
                    metrics.config_reload(ReloadResult::Failure);
                    tracing::error!(
                        "reload ({why}) rejected, still serving the previous config: the files \
                         have been changing for {:?} and this content would drop {}",
                        settle::SETTLE_LIMIT,
                        dropped.join(", ")
                    );
                    continue;
                }
                match proxy.update(c).await {
                    Ok(()) => {
                        tracing::info!("reloaded ({why})");
                        admin::publish(&proxy, admin_state).await;
                    }
                    Err(e) => tracing::error!("reload ({why}) rejected: {e}"),
                }
            }
            Err(e) => {
                metrics.config_reload(ReloadResult::Failure);
                tracing::error!(
                    "reload ({why}) rejected, still serving the previous config: {e:#}"
                );
            }
        }
    }
    Ok(proxy)
}

/// `MESH_CONTROL_PLANE`: serve what the control plane pushes until SIGTERM/SIGINT. `/ready`
/// stays 503 until the first snapshot is serving.
async fn serve_from_control_plane(
    args: &SidecarArgs,
    address: &str,
    options: ProxyOptions,
    metrics: &Arc<Metrics>,
    admin_state: &Arc<AdminState>,
    signals: &mut Signals,
) -> anyhow::Result<Option<ProxyHandle>> {
    let mut client_options = args.client_options(address)?;
    let mut options = options;
    let certs = subscription::start_identity(&client_options, args.workload_cert_ttl);
    client_options.identity = Some(certs.clone());
    options.identity = Some(certs);
    let subscriber = Subscriber::new(options, metrics.clone(), admin_state.clone());
    Ok(subscription::serve(client_options, subscriber, signals, |c| args.localize(c)).await)
}

/// `mesh-proxy wait`: exit 0 once `GET 127.0.0.1:<readiness-port>/ready` answers 200.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    #[arg(long, value_name = "PORT", default_value_t = ports::READINESS)]
    pub readiness_port: u16,
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

pub async fn wait(args: WaitArgs) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), args.readiness_port);
    let deadline = tokio::time::Instant::now() + args.timeout;
    loop {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
            s.write_all(b"GET /ready HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.ok()?;
            Some(buf.starts_with(b"HTTP/1.1 200"))
        };
        if let Ok(Some(true)) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the proxy at {addr} was not ready within {:?}",
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
