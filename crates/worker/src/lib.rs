//! The worker: drains the raw queue with a bounded prefetch, processes deliveries concurrently,
//! sends invalid events to the invalid queue and valid ones to MongoDB in batches, and acks a
//! delivery only once all of its events are durably somewhere. `main` loads the configuration
//! and calls [`run`]; tests call it in-process.

pub mod batcher;
pub mod decode;
pub mod enrich;
pub mod invalid;
pub mod process;
pub mod sinks;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt;
use ingest_pipeline::{broker, Backoff, Settings, Topology};
use ingest_schema::Registry;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::Channel;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::batcher::{BatchConfig, BatcherHandle};
use crate::invalid::InvalidRecord;
use crate::process::PayloadLimits;
use crate::sinks::mongo::MongoSink;
use crate::sinks::SinkError;

struct Context {
    registry: Registry,
    batcher: BatcherHandle,
    invalid_queue: String,
    limits: PayloadLimits,
    confirm_timeout: Duration,
}

/// Runs until `shutdown` completes; then stops consuming, finishes (writes and acks) the
/// deliveries in hand within `worker.shutdown_timeout_ms`, and closes the connection, which
/// returns anything still unacked to the queue for the next worker.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let w = &settings.worker;
    let registry = Registry::load(&w.schemas_dir, w.unknown_events)
        .with_context(|| format!("loading schemas from {}", w.schemas_dir.display()))?;
    tracing::info!(schemas = registry.len(), "tracking plan loaded");
    let sink = MongoSink::connect(&settings.mongo)
        .await
        .context("MongoDB settings")?;

    let stop = CancellationToken::new();
    let stop_on_signal = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop_on_signal.cancel();
    });
    let reconnect = Backoff::new(
        Duration::from_millis(settings.broker.reconnect_min_ms),
        Duration::from_millis(settings.broker.reconnect_max_ms),
    );
    if !ensure_indexes(&sink, reconnect.clone(), &stop).await {
        return Ok(());
    }

    let abandon = CancellationToken::new();
    let (batcher, batcher_task) = batcher::spawn(
        sink,
        BatchConfig {
            max_events: w.batch_max_events,
            linger: Duration::from_millis(w.batch_linger_ms),
            max_attempts: w.mongo_max_attempts,
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(10),
        },
        abandon.clone(),
    );
    let topology = Topology::new(settings.broker.prefix.clone());
    let context = Arc::new(Context {
        registry,
        batcher,
        invalid_queue: topology.invalid(),
        limits: PayloadLimits {
            max_bytes: w.max_payload_bytes,
            max_events: w.max_payload_events,
        },
        confirm_timeout: settings.broker.confirm_timeout(),
    });

    let mut backoff = reconnect;
    while !stop.is_cancelled() {
        match session(&settings, &topology, &context, &stop, &abandon).await {
            Ok(()) => backoff.reset(),
            Err(error) => tracing::warn!(error = format!("{error:#}"), "broker session failed"),
        }
        if stop.is_cancelled() {
            break;
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => break,
        }
    }
    drop(context);
    let _ = batcher_task.await;
    tracing::info!("worker stopped");
    Ok(())
}

async fn ensure_indexes(sink: &MongoSink, mut backoff: Backoff, stop: &CancellationToken) -> bool {
    loop {
        match sink.ensure_indexes().await {
            Ok(()) => return true,
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, ?delay, "cannot reach MongoDB to create indexes; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => return false,
                }
            }
        }
    }
}

/// One connection's life: consume until shutdown or until the connection is lost. Invalid
/// records are published on a second connection: a broker that blocks publishers (resource
/// alarm) must not also stall this connection's acks.
async fn session(
    settings: &Settings,
    topology: &Topology,
    context: &Arc<Context>,
    stop: &CancellationToken,
    abandon: &CancellationToken,
) -> anyhow::Result<()> {
    let connection = broker::connect(&settings.broker, "worker").await?;
    let publishing = broker::connect(&settings.broker, "worker-publish").await?;
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    channel
        .basic_qos(settings.worker.prefetch, BasicQosOptions::default())
        .await?;
    let invalid_channel = broker::confirm_channel(&publishing).await?;
    let tag = format!("worker-{}", uuid::Uuid::new_v4());
    let mut consumer = channel
        .basic_consume(
            topology.raw().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = %topology.raw(), prefetch = settings.worker.prefetch, "consuming");

    let mut tasks = JoinSet::new();
    let lost = loop {
        tokio::select! {
            () = stop.cancelled() => break false,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    tasks.spawn(handle(delivery, context.clone(), invalid_channel.clone()));
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "consumer failed");
                    break true;
                }
                None => break true,
            },
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => log_join(joined),
        }
    };
    if !lost {
        let cancel = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
        let _ = tokio::time::timeout(BROKER_CALL_TIMEOUT, cancel).await;
    }
    let in_hand = tasks.len();
    let grace = Duration::from_millis(settings.worker.shutdown_timeout_ms);
    let drained = tokio::time::timeout(grace, async {
        while let Some(joined) = tasks.join_next().await {
            log_join(joined);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            ?grace,
            left = tasks.len(),
            "deliveries not finished in time; they return to the queue"
        );
        if stop.is_cancelled() {
            // Shutting down: stop retrying writes whose deliveries are going back anyway.
            abandon.cancel();
        }
        tasks.abort_all();
    }
    tracing::info!(in_hand, lost, "closing the broker connections");
    for c in [&connection, &publishing] {
        let _ =
            tokio::time::timeout(BROKER_CALL_TIMEOUT, c.close(200, "worker stopping".into())).await;
    }
    if lost {
        anyhow::bail!("connection to the broker lost");
    }
    Ok(())
}

/// A broker that stopped answering must not hold up shutdown or reconnection.
const BROKER_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Invalid records published at once per delivery.
const INVALID_PUBLISH_CONCURRENCY: usize = 64;

fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined {
        if error.is_panic() {
            tracing::error!(%error, "delivery task panicked; the delivery returns to the queue");
        }
    }
}

async fn publish_invalid(
    context: &Context,
    channel: &Channel,
    records: &[InvalidRecord],
) -> Result<(), SinkError> {
    for chunk in records.chunks(INVALID_PUBLISH_CONCURRENCY) {
        let confirms = futures_util::future::try_join_all(
            chunk
                .iter()
                .map(|record| invalid::publish(channel, &context.invalid_queue, record)),
        );
        match tokio::time::timeout(context.confirm_timeout, confirms).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(SinkError::Retryable(format!("invalid queue: {error}"))),
            Err(_) => {
                return Err(SinkError::Retryable(
                    "invalid queue: no confirm in time".into(),
                ))
            }
        }
    }
    Ok(())
}

async fn handle(delivery: Delivery, context: Arc<Context>, invalid_channel: Channel) {
    let outcome = process::process(
        &context.registry,
        &delivery.properties,
        &delivery.data,
        context.limits,
    );
    let (valid, invalid) = (outcome.documents.len(), outcome.invalid.len());
    let meta = outcome.meta;
    let stored = async {
        publish_invalid(&context, &invalid_channel, &outcome.invalid).await?;
        let refused = context.batcher.write(outcome.documents).await?;
        if !refused.is_empty() {
            let records: Vec<_> = refused
                .into_iter()
                .map(|(document, reason)| {
                    let event = bson::Bson::Document(document).into_relaxed_extjson();
                    process::storage_error(reason, Some(event), &meta)
                })
                .collect();
            publish_invalid(&context, &invalid_channel, &records).await?;
        }
        Ok::<(), SinkError>(())
    }
    .await;
    match stored {
        Ok(()) => {
            tracing::debug!(
                valid,
                invalid,
                tag = delivery.delivery_tag,
                "delivery stored"
            );
            if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
                tracing::warn!(%error, "ack failed; the delivery will be redelivered");
            }
        }
        Err(error) => {
            tracing::warn!(%error, "delivery not stored; returning it to the queue");
            if error != SinkError::ShuttingDown {
                // Do not spin on a persistent failure.
                tokio::time::sleep(Duration::from_millis(500 + fastrand::u64(0..1000))).await;
            }
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
        }
    }
}
