//! Listeners and lifecycle: [`Proxy::start`] binds, [`ProxyHandle::update`] reloads without
//! dropping connections, [`ProxyHandle::shutdown`] drains.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLogger;
use crate::config::{HttpOptions, ListenerKind, ProxyConfig, ValidationError};
use crate::connection::{ConnectionSlots, HttpSettings};
use crate::context::Downstream;
use crate::downstream::{ConnectionTicket, serve_http_connection};
use crate::metrics::{Metrics, ReloadResult};
use crate::mtls::{self, DownstreamIo, Inbound, Prefixed};
use crate::observe::Observer;
use crate::ratelimit::RateLimiters;
use crate::routing::{BuildError, RouteTable};
use crate::sidecar::{Captured, serve_captured};
use crate::state::{ListenerState, Runtime, Snapshot};
use crate::upstream::Clients;
use crate::workers::{Workers, serve_connection};
use bytes::Bytes;
use tokio::net::TcpStream;
use tokio_util::either::Either;

/// How the proxy binds its listeners.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Address for listeners without their own `address` (`--bind-address`). Default 0.0.0.0.
    pub bind_address: IpAddr,
    /// Serve a config port on another local port (`--listener-port 80=8080`); a value of 0
    /// picks a free port.
    pub listener_port_overrides: HashMap<u16, u16>,
    /// How long connections of a listener removed by a reload may finish their requests.
    pub removed_listener_grace: Duration,
    /// Overrides the `instances` of every distributed rate limit (standalone mode).
    pub distributed_instances: Option<u32>,
    /// Metrics to record into (shared with the admin listener); a fresh registry if `None`.
    pub metrics: Option<Arc<Metrics>>,
    /// The access logger (reconfigured from each config's `accessLog`); a new one if `None`.
    pub access_log: Option<Arc<AccessLogger>>,
    /// Sidecar listeners: how long to wait for a captured connection's first bytes before
    /// treating it as opaque TCP (server-first protocols send nothing).
    pub protocol_detection_timeout: Duration,
    /// Worker threads that serve accepted connections (`--workers N`, N > 1); `None` serves
    /// them on the runtime that runs the proxy.
    pub workers: Option<Arc<Workers>>,
    /// HTTP timeouts, connection cap, path normalization and upgrades from the command line:
    /// the defaults for whatever a config's `http` section leaves unset.
    pub http: HttpOptions,
    /// The proxy's workload certificate and trust bundle (when a control plane issues them):
    /// mutual TLS to meshed endpoints and from meshed peers. `None`: plaintext everywhere.
    pub identity: Option<Arc<mesh_tls::WorkloadCertificates>>,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            bind_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            listener_port_overrides: HashMap::new(),
            removed_listener_grace: Duration::from_secs(30),
            distributed_instances: None,
            metrics: None,
            access_log: None,
            protocol_detection_timeout: Duration::from_secs(1),
            workers: None,
            http: HttpOptions::default(),
            identity: None,
        }
    }
}

/// Why a config could not be started or applied.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid config: {}", join(.0))]
    Invalid(Vec<ValidationError>),
    #[error("config cannot be compiled: {0}")]
    Build(#[from] BuildError),
    #[error("listener {listener}: {address:?} is not an IP address")]
    Address { listener: String, address: String },
    #[error("listener {listener}: cannot listen on {address}: {source}")]
    Bind {
        listener: String,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("listeners {0} and {1} resolve to the same socket")]
    SameSocket(String, String),
}

fn join(errs: &[ValidationError]) -> String {
    errs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A bound listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundListener {
    pub name: String,
    pub address: SocketAddr,
}

/// Entry point of the library's server.
pub struct Proxy;

impl Proxy {
    /// Validates and compiles `config`, binds one socket per listener and starts serving.
    pub async fn start(
        config: ProxyConfig,
        options: ProxyOptions,
    ) -> Result<ProxyHandle, ServeError> {
        let metrics = options
            .metrics
            .clone()
            .unwrap_or_else(|| Arc::new(Metrics::new()));
        let access_log = options
            .access_log
            .clone()
            .unwrap_or_else(|| Arc::new(AccessLogger::new(metrics.access_log_dropped_counter())));
        let rt = Arc::new(Runtime {
            clients: Clients::new(options.workers.as_ref().map_or(1, |w| w.len())),
            observer: Observer::new(metrics.clone(), access_log),
            kill: CancellationToken::new(),
            identity: options.identity.clone(),
        });
        let snapshot = match compile(&config, None, &options) {
            Ok(s) => s,
            Err(e) => {
                metrics.config_reload(ReloadResult::Failure);
                return Err(e);
            }
        };
        let inner = Arc::new(Inner {
            rt,
            metrics,
            options,
            current: ArcSwap::new(snapshot.clone()),
            running: tokio::sync::Mutex::new(Vec::new()),
        });
        let handle = ProxyHandle { inner };
        if let Err(e) = handle.apply(snapshot).await {
            handle.inner.metrics.config_reload(ReloadResult::Failure);
            handle.stop_all(Duration::ZERO).await;
            return Err(e);
        }
        handle.inner.metrics.config_reload(ReloadResult::Success);
        Ok(handle)
    }
}

/// A running proxy. Cheap to clone.
#[derive(Clone)]
pub struct ProxyHandle {
    inner: Arc<Inner>,
}

struct Inner {
    rt: Arc<Runtime>,
    metrics: Arc<Metrics>,
    options: ProxyOptions,
    current: ArcSwap<Snapshot>,
    /// Serialises updates; the listeners currently bound.
    running: tokio::sync::Mutex<Vec<RunningListener>>,
}

/// Identity of a listening socket: a reload keeps the socket when this does not change.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SocketKey {
    ip: IpAddr,
    /// The configured port after overrides (0 = ephemeral, kept across reloads).
    port: u16,
    /// The listener's name when `port` is 0, else empty.
    name: String,
}

struct RunningListener {
    key: SocketKey,
    name: String,
    address: SocketAddr,
    state: Arc<ArcSwap<ListenerState>>,
    /// The listener's connection cap (resized on reload).
    slots: Arc<ConnectionSlots>,
    /// Stops accepting and starts the graceful drain.
    stop: CancellationToken,
    /// Ends the remaining connections (after the grace period).
    kill: CancellationToken,
    task: JoinHandle<()>,
}

fn compile(
    config: &ProxyConfig,
    previous: Option<&Snapshot>,
    options: &ProxyOptions,
) -> Result<Arc<Snapshot>, ServeError> {
    config.validate().map_err(ServeError::Invalid)?;
    // Limiters first: the table resolves every limit name to one of them.
    let limiters = RateLimiters::build_with(
        &config.rate_limits,
        previous.map(|p| &*p.limiters),
        options.distributed_instances,
    );
    let table = RouteTable::build(config, previous.map(|p| &*p.table), &limiters)?;
    Ok(Arc::new(Snapshot {
        config: Arc::new(config.clone()),
        table: Arc::new(table),
        limiters: Arc::new(limiters),
        http: Arc::new(HttpSettings::resolve(&config.http, &options.http)),
    }))
}

impl ProxyHandle {
    /// The bound address of every listener, in config order.
    pub async fn listeners(&self) -> Vec<BoundListener> {
        let running = self.inner.running.lock().await;
        let snap = self.inner.current.load();
        snap.table
            .listeners
            .iter()
            .filter_map(|l| {
                running
                    .iter()
                    .find(|r| r.name == *l.name)
                    .map(|r| BoundListener {
                        name: r.name.clone(),
                        address: r.address,
                    })
            })
            .collect()
    }

    /// The bound address of the listener called `name`.
    pub async fn address(&self, name: &str) -> Option<SocketAddr> {
        let running = self.inner.running.lock().await;
        running.iter().find(|r| r.name == name).map(|r| r.address)
    }

    /// The config being served.
    pub fn config(&self) -> Arc<ProxyConfig> {
        self.inner.current.load().config.clone()
    }

    /// The rate limiters of the config being served (bucket state for `/config_dump`).
    pub fn rate_limiters(&self) -> Arc<RateLimiters> {
        self.inner.current.load().limiters.clone()
    }

    /// The metrics the request path records into.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }

    /// Applies a new config: validates and compiles it, keeps the sockets of listeners whose
    /// address and port did not change (their connections stay open), binds new ones, drains
    /// removed ones, and swaps the routing tables atomically (in-flight requests finish with the
    /// config they started with). Rate-limit buckets of unchanged limits keep their tokens.
    /// On error nothing changes.
    pub async fn update(&self, config: ProxyConfig) -> Result<(), ServeError> {
        let result = async {
            let previous = self.inner.current.load_full();
            let snapshot = compile(&config, Some(&previous), &self.inner.options)?;
            self.apply(snapshot).await
        }
        .await;
        self.inner.metrics.config_reload(if result.is_ok() {
            ReloadResult::Success
        } else {
            ReloadResult::Failure
        });
        result
    }

    async fn apply(&self, snapshot: Arc<Snapshot>) -> Result<(), ServeError> {
        let opts = &self.inner.options;
        let mut running = self.inner.running.lock().await;
        // The socket each listener of the new config wants.
        let mut wanted: Vec<(SocketKey, usize)> = Vec::new();
        for (i, l) in snapshot.config.listeners.iter().enumerate() {
            let ip = match &l.address {
                Some(a) => a.parse().map_err(|_| ServeError::Address {
                    listener: l.name.clone(),
                    address: a.clone(),
                })?,
                None => opts.bind_address,
            };
            let port = opts
                .listener_port_overrides
                .get(&l.port)
                .copied()
                .unwrap_or(l.port);
            // Ephemeral ports are per listener: two listeners on port 0 get two sockets.
            let name = if port == 0 {
                l.name.clone()
            } else {
                String::new()
            };
            let key = SocketKey { ip, port, name };
            if let Some((_, j)) = wanted.iter().find(|(k, _)| *k == key) {
                return Err(ServeError::SameSocket(
                    snapshot.config.listeners[*j].name.clone(),
                    l.name.clone(),
                ));
            }
            wanted.push((key, i));
        }

        // Bind the new sockets first: if one fails, nothing has changed.
        let mut bound = Vec::new();
        for (key, i) in &wanted {
            if running.iter().any(|r| r.key == *key) {
                continue;
            }
            let name = &snapshot.config.listeners[*i].name;
            let addr = SocketAddr::new(key.ip, key.port);
            let bind_err = |source| ServeError::Bind {
                listener: name.clone(),
                address: addr,
                source,
            };
            let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
            let address = listener.local_addr().map_err(bind_err)?;
            bound.push((key.clone(), listener, address));
        }

        // Stop listeners whose socket is no longer wanted.
        let mut kept = Vec::new();
        for r in running.drain(..) {
            if wanted.iter().any(|(k, _)| *k == r.key) {
                kept.push(r);
            } else {
                tracing::info!(listener = %r.name, address = %r.address, "listener removed");
                r.stop.cancel();
                let kill = r.kill.clone();
                let grace = opts.removed_listener_grace;
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    kill.cancel();
                });
            }
        }

        let mut next = Vec::new();
        for (key, i) in wanted {
            let name = snapshot.config.listeners[i].name.clone();
            let state = Arc::new(ListenerState {
                table: snapshot.table.listeners[i].clone(),
                snapshot: snapshot.clone(),
            });
            if let Some(pos) = kept.iter().position(|r| r.key == key) {
                let mut r = kept.swap_remove(pos);
                r.slots.set_cap(snapshot.http.max_connections);
                r.state.store(state);
                r.name = name;
                next.push(r);
                continue;
            }
            let Some(pos) = bound.iter().position(|(k, _, _)| *k == key) else {
                continue;
            };
            let (_, listener, address) = bound.swap_remove(pos);
            tracing::info!(listener = %name, %address, "listening");
            let state = Arc::new(ArcSwap::new(state));
            let slots = ConnectionSlots::new(snapshot.http.max_connections);
            let stop = CancellationToken::new();
            let kill = self.inner.rt.kill.child_token();
            let task = tokio::spawn(accept_loop(Acceptor {
                listener,
                state: state.clone(),
                slots: slots.clone(),
                rt: self.inner.rt.clone(),
                metrics: self.inner.metrics.clone(),
                name: name.clone(),
                stop: stop.clone(),
                kill: kill.clone(),
                detect_timeout: opts.protocol_detection_timeout,
                workers: opts.workers.clone(),
            }));
            next.push(RunningListener {
                key,
                name,
                address,
                state,
                slots,
                stop,
                kill,
                task,
            });
        }
        *running = next;
        if let Err(e) = self
            .inner
            .rt
            .observer
            .access_log
            .reconfigure(&snapshot.config.access_log)
        {
            tracing::warn!(error = %e, path = ?snapshot.config.access_log.path, "access log not reconfigured");
        }
        self.inner.current.store(snapshot);
        Ok(())
    }

    /// Graceful drain: stops accepting, lets in-flight requests finish and closes idle
    /// keep-alive connections; after `grace`, ends whatever is left.
    pub async fn shutdown(self, grace: Duration) {
        self.stop_all(grace).await;
    }

    async fn stop_all(&self, grace: Duration) {
        let mut running = self.inner.running.lock().await;
        let listeners: Vec<RunningListener> = running.drain(..).collect();
        for r in &listeners {
            r.stop.cancel();
        }
        let all = futures::future::join_all(listeners.into_iter().map(|r| r.task));
        tokio::pin!(all);
        if tokio::time::timeout(grace, &mut all).await.is_err() {
            tracing::info!("drain grace period over, closing remaining connections");
            self.inner.rt.kill.cancel();
            all.await;
        }
        self.inner.rt.kill.cancel();
    }
}

/// One listener's accept loop and what its connections share.
struct Acceptor {
    listener: TcpListener,
    state: Arc<ArcSwap<ListenerState>>,
    slots: Arc<ConnectionSlots>,
    rt: Arc<Runtime>,
    metrics: Arc<Metrics>,
    name: String,
    stop: CancellationToken,
    kill: CancellationToken,
    detect_timeout: Duration,
    workers: Option<Arc<Workers>>,
}

async fn accept_loop(a: Acceptor) {
    let Acceptor {
        listener,
        state,
        slots,
        rt,
        metrics,
        name,
        stop,
        kill,
        detect_timeout,
        workers,
    } = a;
    let tracker = TaskTracker::new();
    let gauge = metrics.connections_gauge(&name);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        // At the cap, stop accepting: new connections wait in the kernel's backlog.
        let slot = tokio::select! {
            _ = stop.cancelled() => break,
            slot = slots.acquire() => slot,
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    x
                }
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // EMFILE and friends: back off (up to a second) instead of spinning.
                    tracing::warn!(listener = %name, error = %e, retry_in = ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let kind = state.load().table.kind;
        let guard = gauge.opened();
        let ticket = ConnectionTicket::new(slot, tracker.token(), stop.clone());
        let (state, rt, kill) = (state.clone(), rt.clone(), kill.clone());
        if kind == ListenerKind::Gateway {
            let serve = move |stream: TcpStream| async move {
                let mtls = state.load().table.mtls.clone();
                let mut downstream = Downstream {
                    peer,
                    original_dst: None,
                    peer_identity: None,
                };
                match mtls {
                    None => {
                        serve_http_connection(stream, downstream, state, rt, &ticket.drain, kill)
                            .await
                    }
                    // A listener that takes mutual TLS from the mesh (an explicit inbound
                    // port): terminated here, the peer's identity goes with every request.
                    Some(m) => {
                        let port = stream.local_addr().map(|a| a.port()).unwrap_or_default();
                        let mode = m.mode_for(port);
                        let io: DownstreamIo =
                            match mtls::inbound(stream, mode, rt.mtls(), detect_timeout).await {
                                Inbound::Plain(s) | Inbound::Silent(s) => Either::Left(s),
                                Inbound::Mesh(tls, peer_identity) => {
                                    rt.observer.metrics.mtls_accepted(&state.load().table.name);
                                    downstream.peer_identity = Some(peer_identity);
                                    Either::Right(Prefixed::new(Bytes::new(), *tls))
                                }
                                Inbound::Refused(why) => {
                                    tracing::debug!(%peer, ?mode, "connection refused: {why}");
                                    rt.observer.metrics.mtls_refused(&state.load().table.name);
                                    return;
                                }
                            };
                        serve_http_connection(io, downstream, state, rt, &ticket.drain, kill).await
                    }
                }
                drop((guard, ticket));
            };
            serve_connection(workers.as_deref(), stream, serve);
        } else {
            // Captured connections: original destination, protocol detection, then HTTP or
            // an opaque copy (crate::sidecar).
            let serve = move |stream| {
                let captured = Captured {
                    stream,
                    peer,
                    state,
                    rt,
                    ticket,
                    kill,
                    detect_timeout,
                };
                serve_captured(captured, guard)
            };
            serve_connection(workers.as_deref(), stream, serve);
        }
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Errors of one pending connection (it was reset before we took it), not of the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}
