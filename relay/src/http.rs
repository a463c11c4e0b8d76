//! `/healthz`, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::pipeline::Health;
use crate::status::Progress;

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Arc<Health>,
    progress: Arc<Progress>,
}

pub fn router(metrics: Metrics, health: Arc<Health>, progress: Arc<Progress>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/status", get(status))
        .with_state(AppState {
            metrics,
            health,
            progress,
        })
}

/// Serves until `shutdown`. Binding errors are returned at once.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Arc<Health>,
    progress: Arc<Progress>,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = router(metrics, health, progress);
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    }))
}

/// Alive unless the relay stopped on a definite error (the process then exits anyway).
async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.failed.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "failed\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}

/// 200 `streaming` for the leader once its binlog stream is open; 200
/// `standby` for a warm standby (preflight passed, Redis reachable), so
/// probes never restart it; 503 while starting or stopping.
async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "streaming\n")
    } else if s.health.standby.load(Ordering::Relaxed) {
        (StatusCode::OK, "standby\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not streaming\n")
    }
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

/// The relay's last report as JSON (see `status.rs`).
async fn status(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&s.progress.latest()).unwrap_or_default(),
    )
}
