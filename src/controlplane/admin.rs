//! The control plane's admin endpoint (plain HTTP, 127.0.0.1:15014 by default):
//! `GET /debug/proxies` (JSON [`ProxiesReport`](super::ProxiesReport): every connected proxy,
//! the version last sent, ACKed, NACKed with its error), `GET /ready` (200 once the first
//! world was built from the API server), `GET /metrics` (Prometheus text: translations,
//! configs looked up and snapshots sent, by proxy kind).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::hub::{Hub, ProxiesReport};

pub fn router(hub: Arc<Hub>) -> axum::Router {
    axum::Router::new()
        .route("/debug/proxies", get(proxies))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(hub)
}

async fn proxies(State(hub): State<Arc<Hub>>) -> Json<ProxiesReport> {
    Json(hub.report())
}

async fn metrics(State(hub): State<Arc<Hub>>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        hub.metrics().encode(),
    )
}

async fn ready(State(hub): State<Arc<Hub>>) -> (StatusCode, &'static str) {
    if hub.report().generation > 0 {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not synced with the API server yet\n",
        )
    }
}

pub async fn serve(listener: TcpListener, hub: Arc<Hub>, shutdown: CancellationToken) {
    let _ = axum::serve(listener, router(hub))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
}
