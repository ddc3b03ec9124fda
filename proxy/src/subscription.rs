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
            Ok(()) => self.serve(config).await,
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
