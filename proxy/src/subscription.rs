//! Serving the configs the control plane pushes (`mesh-proxy run --control-plane`, and
//! `mesh-proxy sidecar` with `MESH_CONTROL_PLANE`): the first snapshot starts the proxy, each
//! later one replaces the config (ACK) or is rejected while the previous one keeps serving
//! (NACK, with the reason). One place, so gateways and sidecars answer the same way.

use std::sync::Arc;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::config::ProxyConfig;
use crate::distribution::{ClientOptions, Update, run_client};
use crate::metrics::{Metrics, ReloadResult};
use crate::{Proxy, ProxyHandle, ProxyOptions};

/// The proxy fed by control-plane snapshots.
pub struct Subscriber {
    proxy: Option<ProxyHandle>,
    options: ProxyOptions,
    metrics: Arc<Metrics>,
    admin: Arc<AdminState>,
}

impl Subscriber {
    pub fn new(options: ProxyOptions, metrics: Arc<Metrics>, admin: Arc<AdminState>) -> Self {
        if let Some(certs) = &options.identity {
            admin.set_identity(certs.clone());
        }
        Subscriber {
            proxy: None,
            options,
            metrics,
            admin,
        }
    }

    /// Applies one snapshot and answers it (ACK or NACK with the error).
    pub async fn apply(&mut self, update: Update) {
        let Update {
            version,
            config,
            reply,
        } = update;
        let result = match config.validate() {
            Err(errs) => {
                let lines: Vec<String> = errs.iter().map(ToString::to_string).collect();
                Err(format!("invalid config:\n{}", lines.join("\n")))
            }
            Ok(()) => match self.trust(&config) {
                Ok(()) => self.serve(config).await,
                Err(e) => Err(e),
            },
        };
        match &result {
            Ok(()) => {
                self.metrics.config_reload(ReloadResult::Success);
                tracing::info!(%version, "applied config from the control plane");
                if let Some(p) = &self.proxy {
                    admin::publish(p, &self.admin).await;
                }
            }
            Err(e) => {
                self.metrics.config_reload(ReloadResult::Failure);
                tracing::error!(%version, "config from the control plane rejected, still serving the previous one: {e}");
            }
        }
        let _ = reply.send(result);
    }

    /// The trust bundle that comes with every config: peers are verified against it from now
    /// on (a root rotation reaches every proxy this way).
    fn trust(&self, config: &ProxyConfig) -> Result<(), String> {
        match (&config.mesh_identity, &self.options.identity) {
            (Some(mi), Some(certs)) => certs
                .set_trust_bundle(&mi.trust_bundle_pem, &mi.signing_root_sha256)
                .map_err(|e| format!("meshIdentity.trustBundlePem: {e}")),
            _ => Ok(()),
        }
    }

    /// Starts the proxy on the first config, then replaces its config.
    async fn serve(&mut self, config: crate::config::ProxyConfig) -> Result<(), String> {
        match &self.proxy {
            None => {
                self.proxy = Some(
                    Proxy::start(config, self.options.clone())
                        .await
                        .map_err(|e| e.to_string())?,
                );
                Ok(())
            }
            Some(p) if *p.config() == config => Ok(()),
            Some(p) => p.update(config).await.map_err(|e| e.to_string()),
        }
    }

    /// The running proxy (none before the first good snapshot).
    pub fn into_proxy(self) -> Option<ProxyHandle> {
        self.proxy
    }
}

/// Starts obtaining and renewing the proxy's workload certificate from the control plane's
/// CA (same address, CA file and token as the config stream). `ttl`: the lifetime to ask for
/// (the control plane's default when `None`).
pub fn start_identity(
    client_options: &ClientOptions,
    ttl: Option<std::time::Duration>,
) -> Arc<mesh_tls::WorkloadCertificates> {
    let certs = mesh_tls::WorkloadCertificates::new(ttl);
    let issuer = Arc::new(crate::distribution::CertificateIssuer::new(
        client_options.clone(),
    ));
    tokio::spawn(certs.clone().run(issuer));
    certs
}

/// The signals a proxy process acts on: SIGHUP (reload, where there is a file to reload),
/// SIGTERM and SIGINT (drain and stop).
pub struct Signals {
    pub hup: Signal,
    pub term: Signal,
    pub int: Signal,
}

impl Signals {
    pub fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

/// Connects to the control plane and serves what it pushes, each snapshot passed through
/// `adapt` first, until SIGTERM/SIGINT. The client reconnects with backoff while the last
/// good config keeps serving. Returns the proxy (none if no snapshot ever served), to drain.
pub async fn serve(
    client_options: ClientOptions,
    mut subscriber: Subscriber,
    signals: &mut Signals,
    adapt: impl Fn(&mut ProxyConfig),
) -> Option<ProxyHandle> {
    tracing::info!(control_plane = %client_options.address, node = %client_options.node.describe(), "waiting for the first config from the control plane");
    let (tx, mut rx) = mpsc::channel::<Update>(1);
    let client_shutdown = CancellationToken::new();
    let client = tokio::spawn(run_client(client_options, tx, client_shutdown.clone()));
    loop {
        let mut update = tokio::select! {
            Some(u) = rx.recv() => u,
            _ = signals.hup.recv() => { tracing::info!("SIGHUP: the config comes from the control plane"); continue }
            _ = signals.term.recv() => break,
            _ = signals.int.recv() => break,
        };
        adapt(&mut update.config);
        subscriber.apply(update).await;
    }
    client_shutdown.cancel();
    let _ = client.await;
    subscriber.into_proxy()
}
