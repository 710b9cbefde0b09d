//! The bare stack the collector is measured against: axum reads the body, lapin publishes it
//! persistent and mandatory to a quorum queue over confirm channels, and the answer is 200 once
//! the broker confirms it (503 otherwise). No write key, no checks, no headers, no metrics: what
//! any service on this stack pays at the least. Benchmark tooling only, never shipped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation, Connection};

struct Bare {
    _connection: Connection,
    channels: Vec<Channel>,
    next: AtomicUsize,
    queue: String,
}

/// Serves `POST /v1/{endpoint}` on `listen` until the process ends.
pub async fn serve(
    listen: SocketAddr,
    amqp: &str,
    queue: &str,
    channels: usize,
) -> anyhow::Result<()> {
    crate::amqp::declare_quorum(amqp, queue).await?;
    let connection = crate::amqp::connect(amqp, "bare-collector").await?;
    let channels = crate::amqp::confirm_channels(&connection, channels).await?;
    let bare = Arc::new(Bare {
        _connection: connection,
        channels,
        next: AtomicUsize::new(0),
        queue: queue.to_owned(),
    });
    let app = Router::new()
        .route("/v1/{endpoint}", post(publish))
        .route("/readyz", axum::routing::get(|| async { "ready" }))
        .with_state(bare);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn publish(State(bare): State<Arc<Bare>>, body: Bytes) -> StatusCode {
    let index = bare.next.fetch_add(1, Ordering::Relaxed) % bare.channels.len();
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirmed = async {
        bare.channels[index]
            .basic_publish(
                "".into(),
                bare.queue.as_str().into(),
                options,
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await
    };
    match confirmed.await {
        Ok(Confirmation::Ack(None)) => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}
