//! The operations endpoint: `/metrics`, `/healthz`, `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::metrics::Metrics;

/// Shared state of the endpoint.
#[derive(Clone)]
pub struct Ops {
    /// Metrics to render.
    pub metrics: Arc<Metrics>,
    /// Set once the gRPC server accepts requests; cleared when shutdown begins.
    pub ready: Arc<AtomicBool>,
}

/// The router.
pub fn router(ops: Ops) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(ops)
}

async fn metrics(State(ops): State<Ops>) -> ([(&'static str, &'static str); 1], String) {
    ([("content-type", "text/plain; version=0.0.4")], ops.metrics.render())
}

async fn ready(State(ops): State<Ops>) -> (StatusCode, &'static str) {
    if ops.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
