//! The worker's own small HTTP side: `/healthz` (the process answers), `/readyz` (consuming from
//! the broker and, when the MongoDB sink is enabled, MongoDB answering a ping within
//! `mongo.timeout_ms`, the bound of its inserts too) and `/metrics`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::sinks::mongo::MongoSink;

pub struct Health {
    consuming: AtomicBool,
    mongo: Option<MongoSink>,
}

impl Health {
    pub fn new(mongo: Option<MongoSink>) -> Arc<Self> {
        Arc::new(Self {
            consuming: AtomicBool::new(false),
            mongo,
        })
    }

    pub fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::SeqCst);
        metrics::gauge!("worker_consuming").set(if consuming { 1.0 } else { 0.0 });
    }

    async fn check(&self) -> Result<(), &'static str> {
        if !self.consuming.load(Ordering::SeqCst) {
            return Err("not consuming: no broker connection");
        }
        if let Some(mongo) = &self.mongo {
            if !mongo.ping().await {
                return Err("MongoDB does not answer");
            }
        }
        Ok(())
    }
}

pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route(
            "/metrics",
            get(|| async { ingest_pipeline::metrics::render() }),
        )
        .with_state(health)
}

async fn ready(State(health): State<Arc<Health>>) -> (StatusCode, &'static str) {
    match health.check().await {
        Ok(()) => (StatusCode::OK, "ready"),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
    }
}
