//! The mutating admission webhook: axum over rustls.
//!
//! Routes: `POST /inject` (AdmissionReview `admission.k8s.io/v1` → JSONPatch),
//! `GET /healthz`, `GET /ready`, `GET /metrics` (Prometheus text).
//! Bodies over the limit get 413; a body slower than the body timeout gets 408. Connections
//! are accepted through [`crate::net_limits`]: TLS handshake, request-headers and idle
//! timeouts, and a cap on open connections.

pub mod namespaces;
pub mod review;
pub mod tls;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::inject::InjectionConfig;
use crate::net_limits::{self, Accepted, ConnectionLimits};
pub use review::{NamespaceLookup, Outcome, StaticNamespaces};
use tls::CertStore;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Prometheus metrics of the webhook.
pub struct Metrics {
    registry: Registry,
    reviews: Family<OutcomeLabels, Counter>,
    latency: Histogram,
    config_reloads: Counter,
    cert_reloads: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("meshctl_injection");
        let reviews = Family::<OutcomeLabels, Counter>::default();
        let latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        let config_reloads = Counter::default();
        let cert_reloads = Counter::default();
        registry.register(
            "reviews",
            "Admission reviews handled, by outcome",
            reviews.clone(),
        );
        registry.register(
            "review_duration_seconds",
            "Time to handle one admission review (body read to response)",
            latency.clone(),
        );
        registry.register(
            "config_reloads",
            "Injection config reloads",
            config_reloads.clone(),
        );
        registry.register(
            "cert_reloads",
            "Serving certificate reloads",
            cert_reloads.clone(),
        );
        Self {
            registry,
            reviews,
            latency,
            config_reloads,
            cert_reloads,
        }
    }
}

impl Metrics {
    fn observe(&self, outcome: Outcome, elapsed: Duration) {
        self.reviews
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
        self.latency.observe(elapsed.as_secs_f64());
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// Limits applied to every request and connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Longest a client may take to send a request body once its headers have arrived.
    pub body_timeout: Duration,
    /// TLS handshake, request-headers and idle timeouts, connection cap.
    pub connections: ConnectionLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
            body_timeout: Duration::from_secs(10),
            connections: ConnectionLimits::webhook(),
        }
    }
}

/// Shared state of the webhook.
pub struct AppState {
    pub config: ArcSwap<InjectionConfig>,
    pub namespaces: Arc<dyn NamespaceLookup>,
    pub metrics: Metrics,
    pub limits: Limits,
    pub config_loaded: AtomicBool,
}

impl AppState {
    pub fn new(
        cfg: InjectionConfig,
        namespaces: Arc<dyn NamespaceLookup>,
        limits: Limits,
    ) -> Arc<Self> {
        Arc::new(Self {
            config: ArcSwap::from_pointee(cfg),
            namespaces,
            metrics: Metrics::default(),
            limits,
            config_loaded: AtomicBool::new(true),
        })
    }
}

/// The axum router (usable without TLS, e.g. in tests).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/inject", post(inject))
        .route("/healthz", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error(status: StatusCode, msg: &str) -> Response {
    json_response(status, &serde_json::json!({"error": msg}))
}

async fn inject(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let start = Instant::now();
    let limit = state.limits.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        state.metrics.observe(Outcome::BadRequest, start.elapsed());
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body larger than {limit} bytes"),
        );
    }
    let body: Body = req.into_body();
    let bytes =
        match tokio::time::timeout(state.limits.body_timeout, axum::body::to_bytes(body, limit))
            .await
        {
            Err(_) => {
                state.metrics.observe(Outcome::BadRequest, start.elapsed());
                return error(StatusCode::REQUEST_TIMEOUT, "timed out reading the body");
            }
            Ok(Err(e)) => {
                state.metrics.observe(Outcome::BadRequest, start.elapsed());
                let too_big = std::error::Error::source(&e)
                    .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                    || e.to_string().contains("length limit");
                return if too_big {
                    error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        &format!("body larger than {limit} bytes"),
                    )
                } else {
                    error(StatusCode::BAD_REQUEST, &format!("reading body: {e}"))
                };
            }
            Ok(Ok(b)) => b,
        };
    let cfg = state.config.load();
    let answer = review::handle(&bytes, &cfg, state.namespaces.as_ref());
    state.metrics.observe(answer.outcome, start.elapsed());
    if answer.outcome != Outcome::Ignored {
        tracing::debug!(outcome = answer.outcome.as_str(), "admission review");
    }
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &answer.body)
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.namespaces.ready() && state.config_loaded.load(Ordering::Relaxed) {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// Serve HTTPS on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    certs: Arc<CertStore>,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tls::TlsError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(certs.server_config()?);
    let app = router(state.clone());
    let limits = state.limits.connections;
    net_limits::serve_tls(
        "webhook",
        listener,
        acceptor,
        limits,
        shutdown,
        move |conn: Accepted| {
            let svc = conn
                .activity
                .track(hyper_util::service::TowerToHyperService::new(app.clone()));
            async move {
                let io = hyper_util::rt::TokioIo::new(conn.tls);
                let mut builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                // The request-headers and idle timeouts are enforced per connection by
                // `net_limits` (from accept, whatever the protocol); hyper's own header timer
                // would restart on every keep-alive wait and cut idle connections early.
                builder
                    .http1()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(None);
                if let Err(e) = builder.serve_connection(io, svc).await {
                    tracing::debug!(peer = %conn.peer, error = %e, "connection ended with error");
                }
            }
        },
    )
    .await;
    Ok(())
}

/// Watch files by polling (robust with ConfigMap/Secret volume symlink swaps).
pub fn spawn_reloaders(
    state: Arc<AppState>,
    certs: Arc<CertStore>,
    config_path: Option<PathBuf>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Checked on the first tick too, so a change since startup is never missed.
        let mut last_cfg: Option<Vec<u8>> = None;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match certs.reload() {
                Ok(true) => {
                    state.metrics.cert_reloads.inc();
                    tracing::info!("serving certificate reloaded");
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "serving certificate not reloaded"),
            }
            let Some(path) = &config_path else { continue };
            let Ok(bytes) = std::fs::read(path) else {
                tracing::warn!(path = %path.display(), "injection config unreadable; keeping the old one");
                continue;
            };
            if last_cfg.as_ref() == Some(&bytes) {
                continue;
            }
            match InjectionConfig::from_yaml_or_config_map(&String::from_utf8_lossy(&bytes)) {
                Ok(cfg) => {
                    state.config.store(Arc::new(cfg));
                    state.config_loaded.store(true, Ordering::Relaxed);
                    state.metrics.config_reloads.inc();
                    tracing::info!(path = %path.display(), "injection config reloaded");
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "injection config invalid; keeping the old one");
                }
            }
            last_cfg = Some(bytes);
        }
    })
}
