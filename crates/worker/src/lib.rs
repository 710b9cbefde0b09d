//! The worker: drains the raw queue with a bounded prefetch, processes deliveries concurrently,
//! sends invalid events to the invalid queue and valid ones, one message per delivery, to the
//! `<prefix>.valid` fan-out exchange, and acks a delivery only once the broker has confirmed
//! both. Each enabled sink then runs on its own queue (`runner`), so sinks never wait for each
//! other. `main` loads the configuration and calls [`run`]; tests call it in-process.

pub mod acks;
pub mod breaker;
pub mod decode;
pub mod delivery;
pub mod enrich;
pub mod health;
pub mod invalid;
pub mod process;
pub mod runner;
pub mod settle;
pub mod sinks;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::FutureExt as _;
use futures_util::StreamExt;
use ingest_pipeline::broker::{long_string, Answer, Publisher};
use ingest_pipeline::metrics::SchedulingDelay;
use ingest_pipeline::settings::BrokerSettings;
use ingest_pipeline::{broker, Backoff, Settings, Topology};
use ingest_schema::Registry;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde::Deserialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::delivery::DeliverySettings;
use crate::invalid::InvalidRecord;
use crate::process::PayloadLimits;
use crate::settle::SinkRunner;
use crate::sinks::http::{HttpSink, HttpSinkSettings};
use crate::sinks::mongo::MongoSink;
use crate::sinks::statsd::{StatsdSettings, StatsdSink};
use crate::sinks::{Event, Sink};

/// A broker that stopped answering must not hold up shutdown or reconnection.
const BROKER_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Invalid records published at once per delivery.
const INVALID_PUBLISH_CONCURRENCY: usize = 64;
/// Refusals (nacks, unroutable) of one publish before its delivery goes back to the queue.
const PUBLISH_ATTEMPTS: u32 = 10;
const STATS_EVERY: Duration = Duration::from_secs(10);

struct Context {
    health: Arc<health::Health>,
    registry: Registry,
    topology: Topology,
    limits: PayloadLimits,
    confirm_timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MongoSinkEntry {
    enabled: bool,
    #[serde(default)]
    delivery: DeliverySettings,
}

/// A sink's settings with its `delivery` table taken out.
fn split_delivery(
    mut value: serde_json::Value,
) -> anyhow::Result<(serde_json::Value, DeliverySettings)> {
    let delivery = match value.as_object_mut().and_then(|o| o.remove("delivery")) {
        Some(d) => serde_json::from_value(d).context("delivery")?,
        None => DeliverySettings::default(),
    };
    Ok((value, delivery))
}

/// Builds every enabled sink from the settings, checking each.
pub async fn build_sinks(
    settings: &Settings,
) -> anyhow::Result<Vec<(Arc<dyn Sink>, DeliverySettings)>> {
    let mut sinks: Vec<(Arc<dyn Sink>, DeliverySettings)> = Vec::new();
    let mongo: MongoSinkEntry = serde_json::from_value(settings.sinks.mongo.clone())
        .context("invalid setting `sinks.mongo`")?;
    if mongo.enabled {
        let sink = MongoSink::connect(&settings.mongo)
            .await
            .context("MongoDB settings")?;
        sinks.push((Arc::new(sink), mongo.delivery));
    }
    if let Some(statsd) = &settings.sinks.statsd {
        let (value, delivery) =
            split_delivery(statsd.clone()).context("invalid setting `sinks.statsd`")?;
        let statsd: StatsdSettings =
            serde_json::from_value(value).context("invalid setting `sinks.statsd`")?;
        statsd
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid setting `sinks.statsd`: {e}"))?;
        let sink = StatsdSink::connect("statsd", statsd)
            .await
            .context("sinks.statsd")?;
        sinks.push((Arc::new(sink), delivery));
    }
    for (i, http) in settings.sinks.http.iter().enumerate() {
        let (value, delivery) = split_delivery(http.clone())
            .with_context(|| format!("invalid setting `sinks.http[{i}]`"))?;
        let http: HttpSinkSettings = serde_json::from_value(value)
            .with_context(|| format!("invalid setting `sinks.http[{i}]`"))?;
        http.validate()
            .map_err(|e| anyhow::anyhow!("invalid setting `sinks.http[{i}]`: {e}"))?;
        let sink = HttpSink::new(http).map_err(|e| anyhow::anyhow!("sinks.http[{i}]: {e}"))?;
        sinks.push((Arc::new(sink), delivery));
    }
    anyhow::ensure!(
        !sinks.is_empty(),
        "no sink is enabled: enable sinks.mongo or configure another"
    );
    let mut names: Vec<&str> = sinks.iter().map(|(s, _)| s.name()).collect();
    names.sort_unstable();
    if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
        anyhow::bail!("two sinks are named `{}`", pair[0]);
    }
    for (sink, delivery) in &sinks {
        delivery.validate().map_err(|e| {
            anyhow::anyhow!("invalid delivery settings of sink `{}`: {e}", sink.name())
        })?;
    }
    Ok(sinks)
}

/// Runs until `shutdown` completes; then stops consuming, finishes the deliveries in hand within
/// `worker.shutdown_timeout_ms`, and closes the connections, which returns anything still
/// unacked to its queue for the next worker. `listener` serves `/healthz`, `/readyz` and
/// `/metrics`.
pub async fn serve(
    settings: Settings,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    ingest_pipeline::metrics::install("worker", &settings.metrics);
    let w = &settings.worker;
    let registry = Registry::load(&w.schemas_dir, w.unknown_events)
        .with_context(|| format!("loading schemas from {}", w.schemas_dir.display()))?;
    tracing::info!(schemas = registry.len(), "tracking plan loaded");
    let sinks = build_sinks(&settings).await?;

    let stop = CancellationToken::new();
    let stop_on_signal = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop_on_signal.cancel();
    });
    let mongo = match sinks.iter().any(|(s, _)| s.name() == "mongo") {
        true => Some(MongoSink::connect(&settings.mongo).await?),
        false => None,
    };
    let health = health::Health::new(mongo.clone());
    tracing::info!(addr = %listener.local_addr()?, "worker health and metrics listening");
    let http_stop = stop.clone();
    let router = health::router(health.clone());
    let http = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { http_stop.cancelled().await })
            .await
    });
    let _scheduling = SchedulingDelay::start("worker");
    let reconnect = Backoff::new(
        Duration::from_millis(settings.broker.reconnect_min_ms),
        Duration::from_millis(settings.broker.reconnect_max_ms),
    );
    if let Some(mongo) = &mongo {
        if !ensure_indexes(mongo, reconnect.clone(), &stop).await {
            return Ok(());
        }
    }

    let topology = Topology::from_settings(&settings.broker);
    let runners: Vec<Arc<SinkRunner>> = sinks
        .into_iter()
        .map(|(sink, delivery)| {
            Arc::new(SinkRunner::new(
                sink,
                delivery,
                settings.sinks.retry_delays(),
                settings.sinks.max_attempts,
            ))
        })
        .collect();
    tokio::spawn(log_stats(
        runners.clone(),
        settings.broker.clone(),
        Topology::from_settings(&settings.broker),
        stop.clone(),
    ));
    let context = Arc::new(Context {
        health,
        registry,
        topology,
        limits: PayloadLimits {
            max_bytes: w.max_payload_bytes,
            max_events: w.max_payload_events,
            max_built_bytes: w.max_built_bytes,
        },
        confirm_timeout: settings.broker.confirm_timeout(),
    });

    let mut backoff = reconnect;
    while !stop.is_cancelled() {
        match session(&settings, &context, &runners, &stop).await {
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
    http.abort();
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

/// Logs each sink's totals every few seconds while they change or batches wait for a retry.
/// "In the retry path" is read from the broker (messages in the sink's delay queues), so it is
/// the same whichever worker logs it.
async fn log_stats(
    runners: Vec<Arc<SinkRunner>>,
    broker_settings: BrokerSettings,
    topology: Topology,
    stop: CancellationToken,
) {
    let mut last: Vec<([u64; 4], u32)> = vec![([0; 4], 0); runners.len()];
    loop {
        tokio::select! {
            () = tokio::time::sleep(STATS_EVERY) => {}
            () = stop.cancelled() => return,
        }
        let waiting = retry_depths(&runners, &broker_settings, &topology).await;
        for ((runner, last), in_retry_path) in runners.iter().zip(last.iter_mut()).zip(waiting) {
            let now = (runner.stats.snapshot(), in_retry_path);
            if now != *last || in_retry_path > 0 {
                let ([delivered, retried, dead_lettered, filtered_out], _) = now;
                tracing::info!(
                    sink = runner.sink.name(),
                    delivered,
                    retried,
                    dead_lettered,
                    filtered_out,
                    batches_in_retry_path = in_retry_path,
                    "sink totals"
                );
                *last = now;
            }
        }
    }
}

/// Messages waiting in each sink's delay queues (0 where the broker cannot be asked).
async fn retry_depths(
    runners: &[Arc<SinkRunner>],
    settings: &BrokerSettings,
    topology: &Topology,
) -> Vec<u32> {
    let mut depths = vec![0; runners.len()];
    let Ok(Ok(connection)) = tokio::time::timeout(
        BROKER_CALL_TIMEOUT,
        broker::connect(settings, "worker-stats"),
    )
    .await
    else {
        return depths;
    };
    for (runner, depth) in runners.iter().zip(depths.iter_mut()) {
        for delay in &runner.retry_delays {
            let queue = topology.sink_retry(runner.sink.name(), *delay);
            if let Ok(Some(q)) = broker::inspect_queue(&connection, &queue).await {
                *depth += q.message_count();
            }
        }
    }
    tracing::debug!("read the sinks' retry queues");
    let _ = tokio::time::timeout(BROKER_CALL_TIMEOUT, connection.close(200, "".into())).await;
    depths
}

/// One connection's life: consume the raw queue and run every sink until shutdown or until the
/// connection is lost. Publishing (invalid records, valid events, retries) uses a second
/// connection: a broker that blocks publishers (resource alarm) must not also stall the acks.
async fn session(
    settings: &Settings,
    context: &Arc<Context>,
    runners: &[Arc<SinkRunner>],
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let topology = &context.topology;
    let connection = Arc::new(broker::connect(&settings.broker, "worker").await?);
    let publishing = broker::connect(&settings.broker, "worker-publish").await?;
    let names: Vec<String> = runners.iter().map(|r| r.sink.name().to_owned()).collect();
    topology
        .declare_sinks(&connection, &names, &settings.sinks.retry_delays())
        .await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(settings.worker.prefetch, BasicQosOptions::default())
        .await?;
    let publish = broker::Publisher::open(&publishing).await?;

    // Sinks run beside the raw consumer; any of them failing ends the session.
    let session_stop = stop.child_token();
    let mut sink_tasks = JoinSet::new();
    for runner in runners {
        let (runner, topology, connection, publish, session_stop) = (
            runner.clone(),
            topology.clone(),
            connection.clone(),
            publish.clone(),
            session_stop.clone(),
        );
        sink_tasks.spawn(async move {
            let result = runner
                .run(&topology, &connection, &publish, &session_stop)
                .await;
            session_stop.cancel();
            result
        });
    }

    let shared = Arc::new(Session {
        publish: publish.clone(),
        connection: connection.clone(),
        sinks: names.clone(),
        retry_delays: settings.sinks.retry_delays(),
        topology: topology.clone(),
        last_declared: tokio::sync::Mutex::new(None),
    });
    let tag = format!("worker-{}", uuid::Uuid::new_v4());
    let mut consumer = channel
        .basic_consume(
            topology.raw().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = %topology.raw(), prefetch = settings.worker.prefetch, sinks = ?names, "consuming");
    context.health.set_consuming(true);

    let mut tasks = JoinSet::new();
    let mut health = tokio::time::interval(Duration::from_secs(1));
    let lost = loop {
        tokio::select! {
            () = session_stop.cancelled() => break !stop.is_cancelled(),
            // A sink task that ended (error or panic) ends the session: it reconnects whole.
            Some(ended) = sink_tasks.join_next(), if !sink_tasks.is_empty() => {
                match ended {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => tracing::warn!(error = format!("{error:#}"), "a sink stopped"),
                    Err(error) => tracing::error!(%error, "a sink task panicked"),
                }
                break !stop.is_cancelled();
            }
            _ = health.tick() => {
                if !publishing.status().connected() || !publish.channel().status().connected() {
                    tracing::warn!("the publishing connection is gone");
                    break true;
                }
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    tasks.spawn(handle(delivery, context.clone(), shared.clone()));
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
    context.health.set_consuming(false);
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
        tasks.abort_all();
    }
    // Raw deliveries are settled; now the sinks finish their batches.
    session_stop.cancel();
    if tokio::time::timeout(grace, async {
        while let Some(joined) = sink_tasks.join_next().await {
            if let Ok(Err(error)) = joined {
                tracing::warn!(error = format!("{error:#}"), "sink stopped");
            }
        }
    })
    .await
    .is_err()
    {
        sink_tasks.abort_all();
    }
    tracing::info!(in_hand, lost, "closing the broker connections");
    for c in [&*connection, &publishing] {
        let _ =
            tokio::time::timeout(BROKER_CALL_TIMEOUT, c.close(200, "worker stopping".into())).await;
    }
    if lost {
        anyhow::bail!("connection to the broker lost");
    }
    Ok(())
}

fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined {
        if error.is_panic() {
            tracing::error!(%error, "delivery task panicked; the delivery returns to the queue");
        }
    }
}

/// Publishes into a queue or exchange until the broker has it. A late confirm is waited
/// for, never answered with a second copy (`Publisher::publish_and_wait`); a nack is tried
/// again after a pause; an unroutable publish (a deleted queue) declares the topology again
/// first. After `PUBLISH_ATTEMPTS` refusals it gives up, and the delivery goes back to its
/// queue (where the delivery limit ends a loop).
async fn publish_until_taken(
    context: &Context,
    session: &Session,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), String> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let target = if exchange.is_empty() {
        routing_key
    } else {
        exchange
    };
    for _ in 0..PUBLISH_ATTEMPTS {
        let answer = session
            .publish
            .publish_and_wait(
                exchange,
                routing_key,
                body,
                properties.clone(),
                context.confirm_timeout,
            )
            .await
            .map_err(|error| format!("{target}: {error}"))?;
        match answer {
            Answer::Confirmed => return Ok(()),
            Answer::Returned => {
                metrics::counter!("worker_publish_returned_total", "target" => target.to_owned())
                    .increment(1);
                tracing::warn!(
                    target,
                    "the broker could not route a publish; declaring the queues again"
                );
                session.redeclare().await;
            }
            Answer::Nacked => {
                metrics::counter!("worker_publish_nacked_total", "target" => target.to_owned())
                    .increment(1);
                tracing::warn!(target, "the broker refused a publish; trying again");
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
    Err(format!("{target} refused {PUBLISH_ATTEMPTS} publishes"))
}

/// Each record once, into the invalid queue; a record is published again only after the
/// broker refused it, never because its confirm was late.
async fn publish_invalid(
    context: &Context,
    session: &Session,
    records: &[InvalidRecord],
) -> Result<(), String> {
    let queue = context.topology.invalid();
    for chunk in records.chunks(INVALID_PUBLISH_CONCURRENCY) {
        futures_util::future::try_join_all(chunk.iter().map(|record| async {
            let (body, properties) = invalid::message(record).map_err(|e| e.to_string())?;
            publish_until_taken(context, session, "", &queue, &body, properties).await
        }))
        .await?;
    }
    Ok(())
}

/// One message with all of a delivery's valid events, to every sink's queue at once.
async fn publish_valid(
    context: &Context,
    session: &Session,
    events: &[Event],
    request_id: &str,
) -> Result<(), String> {
    let body = serde_json::to_vec(events).map_err(|e| e.to_string())?;
    let mut headers = FieldTable::default();
    headers.insert("request_id".into(), long_string(request_id));
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(headers);
    let exchange = context.topology.valid_exchange();
    publish_until_taken(context, session, &exchange, "", &body, properties).await
}

/// Handles one raw delivery; see [`returning_on_panic`].
async fn handle(delivery: Delivery, context: Arc<Context>, session: Arc<Session>) {
    let acker = delivery.acker.clone();
    returning_on_panic(acker, settle(delivery, context, session)).await;
}

/// Runs the work on one delivery. A panic in it must not keep the delivery's prefetch slot
/// until the channel closes (after `prefetch` panics the worker would stop consuming while it
/// still looked ready): the delivery goes back to its queue at once, and the queue's delivery
/// limit ends a loop in its dead-letter queue.
pub async fn returning_on_panic(acker: lapin::Acker, work: impl Future<Output = ()>) {
    let handled = std::panic::AssertUnwindSafe(work).catch_unwind().await;
    if handled.is_err() {
        metrics::counter!("worker_deliveries_total", "outcome" => "panicked").increment(1);
        tracing::error!("handling a delivery panicked; it returns to the queue");
        let requeue = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        if let Err(error) = acker.nack(requeue).await {
            tracing::warn!(%error, "could not return the delivery; it returns when the channel closes");
        }
    }
}

async fn settle(delivery: Delivery, context: Arc<Context>, session: Arc<Session>) {
    let outcome = process::process(
        &context.registry,
        &delivery.properties,
        &delivery.data,
        context.limits,
    );
    let (valid, invalid) = (outcome.valid.len(), outcome.invalid.len());
    metrics::counter!("worker_events_total", "result" => "valid").increment(valid as u64);
    metrics::counter!("worker_events_total", "result" => "invalid").increment(invalid as u64);
    let waited = chrono::Utc::now().signed_duration_since(outcome.meta.received_at);
    metrics::histogram!("worker_queue_lag_seconds")
        .record(waited.num_milliseconds().max(0) as f64 / 1000.0);
    let stored = async {
        publish_invalid(&context, &session, &outcome.invalid).await?;
        if !outcome.valid.is_empty() {
            publish_valid(&context, &session, &outcome.valid, &outcome.meta.request_id).await?;
        }
        Ok::<(), String>(())
    }
    .await;
    match stored {
        Ok(()) => {
            tracing::debug!(
                valid,
                invalid,
                tag = delivery.delivery_tag,
                "delivery fanned out"
            );
            metrics::counter!("worker_deliveries_total", "outcome" => "acked").increment(1);
            if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
                tracing::warn!(%error, "ack failed; the delivery will be redelivered");
            }
        }
        Err(error) => {
            metrics::counter!("worker_deliveries_total", "outcome" => "requeued").increment(1);
            tracing::warn!(%error, "delivery not fanned out; returning it to the queue");
            // Do not spin on a persistent failure.
            tokio::time::sleep(Duration::from_millis(500 + fastrand::u64(0..1000))).await;
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
        }
    }
}

/// What a session's delivery tasks share: the publishing channel, and the connection to
/// declare the topology again on (a queue deleted under a running worker).
struct Session {
    publish: Publisher,
    connection: Arc<lapin::Connection>,
    sinks: Vec<String>,
    retry_delays: Vec<Duration>,
    topology: Topology,
    last_declared: tokio::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Session {
    /// Declares every queue again, at most once a second however many tasks ask.
    async fn redeclare(&self) {
        let mut last = self.last_declared.lock().await;
        if last.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(tokio::time::Instant::now());
        let declared = tokio::time::timeout(
            BROKER_CALL_TIMEOUT,
            self.topology
                .declare_sinks(&self.connection, &self.sinks, &self.retry_delays),
        )
        .await;
        match declared {
            Ok(Ok(())) => tracing::info!("declared the queues again"),
            Ok(Err(error)) => tracing::warn!(%error, "declaring the queues again failed"),
            Err(_) => tracing::warn!("declaring the queues again timed out"),
        }
    }
}
