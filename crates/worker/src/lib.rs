//! The worker: drains the raw queue with a bounded prefetch and processes deliveries
//! concurrently (`consume`): invalid events are confirmed into the invalid queue, valid ones
//! go to every sink in this process (`fanout`), and a delivery is acked once each sink has its
//! events or has them in its own durable queue (its spill and retry path, drained by the
//! sink's `runner`). `main` loads the configuration and calls [`serve`]; tests call it
//! in-process.

pub mod acks;
pub mod compact;
pub mod consume;
pub mod decode;
pub mod delivery;
pub mod enrich;
pub mod health;
pub mod invalid;
pub(crate) mod invalid_publish;
pub mod live;
pub(crate) mod out;
pub mod overflow;
pub mod process;
pub mod sinks;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ingest_pipeline::metrics::SchedulingDelay;
use ingest_pipeline::settings::{BrokerSettings, DeliverySettings};
use ingest_pipeline::{broker, Backoff, Settings, Topology};
use ingest_schema::Registry;
use tokio_util::sync::CancellationToken;

use crate::consume::BROKER_CALL_TIMEOUT;
use crate::delivery::SinkRunner;
use crate::process::{Documents, PayloadLimits};
use crate::sinks::http::HttpSink;
use crate::sinks::mongo::MongoSink;
use crate::sinks::statsd::StatsdSink;
use crate::sinks::Sink;

const STATS_EVERY: Duration = Duration::from_secs(10);

pub(crate) struct Context {
    health: Arc<health::Health>,
    registry: Registry,
    topology: Topology,
    limits: PayloadLimits,
    /// Made only when MongoDB is a sink.
    documents: Documents,
    confirm_timeout: Duration,
    /// Compaction and the byte cap's overflow, across broker sessions.
    invalid: invalid_publish::InvalidQueue,
    /// The user agent read, bots, geolocation, and each source's rules.
    enrichment: enrich::Enrichment,
    /// The live feed for `ingestctl tail` and `console`: built only while someone watches.
    live: Arc<live::LiveFeed>,
}

/// Builds every enabled sink from the settings, checking each.
pub async fn build_sinks(
    settings: &Settings,
) -> anyhow::Result<Vec<(Arc<dyn Sink>, DeliverySettings)>> {
    let mut sinks: Vec<(Arc<dyn Sink>, DeliverySettings)> = Vec::new();
    let mongo = &settings.sinks.mongo;
    if mongo.enabled {
        let sink = MongoSink::connect(&settings.mongo)
            .await
            .context("MongoDB settings")?;
        sinks.push((Arc::new(sink), mongo.delivery.clone()));
    }
    if let Some(statsd) = &settings.sinks.statsd {
        sinks::statsd::validate(statsd)
            .map_err(|e| anyhow::anyhow!("invalid setting `sinks.statsd`: {e}"))?;
        let sink = StatsdSink::connect("statsd", statsd.clone())
            .await
            .context("sinks.statsd")?;
        sinks.push((Arc::new(sink), statsd.delivery.clone()));
    }
    for (i, http) in settings.sinks.http.iter().enumerate() {
        sinks::http::validate(http)
            .map_err(|e| anyhow::anyhow!("invalid setting `sinks.http[{i}]`: {e}"))?;
        let sink =
            HttpSink::new(http.clone()).map_err(|e| anyhow::anyhow!("sinks.http[{i}]: {e}"))?;
        sinks.push((Arc::new(sink), http.delivery.clone()));
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
    let enrichment = enrich::Enrichment::from_settings(&settings.enrich, &settings.policy)?;
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
    let live_feed = Arc::new(live::LiveFeed::default());
    let context = Arc::new(Context {
        health,
        registry,
        topology,
        limits: PayloadLimits {
            max_bytes: w.max_payload_bytes,
            max_events: w.max_payload_events,
            max_built_bytes: w.max_built_bytes,
        },
        documents: if settings.sinks.mongo.enabled {
            Documents::Made
        } else {
            Documents::NotNeeded
        },
        confirm_timeout: settings.broker.confirm_timeout(),
        invalid: invalid_publish::InvalidQueue::new(&w.invalid),
        enrichment,
        live: live_feed.clone(),
    });
    let live_task = tokio::spawn(live_feed.run(settings.clone(), stop.clone()));

    let mut backoff = reconnect;
    while !stop.is_cancelled() {
        match consume::session(&settings, &context, &runners, &stop).await {
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
    live_task.abort();
    let unreported = context.invalid.unreported();
    if unreported > 0 {
        tracing::error!(unreported, "stopping with invalid events counted in no summary the invalid queue took (it was full, or the broker gone): only the metrics and this line keep their count");
    }
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

/// Logs each sink's totals every few seconds while they change or batches wait for a retry,
/// and sets `worker_replay_lane_depth`.
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
        let (waiting, replay_lane) = retry_depths(&runners, &broker_settings, &topology).await;
        if let Some(depth) = replay_lane {
            metrics::gauge!("worker_replay_lane_depth").set(f64::from(depth));
        }
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

/// Messages waiting in each sink's delay queues (0 where the broker cannot be asked), and in
/// the replay lane (what replays have left).
async fn retry_depths(
    runners: &[Arc<SinkRunner>],
    settings: &BrokerSettings,
    topology: &Topology,
) -> (Vec<u32>, Option<u32>) {
    let mut depths = vec![0; runners.len()];
    let Ok(Ok(connection)) = tokio::time::timeout(
        BROKER_CALL_TIMEOUT,
        broker::connect(settings, "worker-stats"),
    )
    .await
    else {
        return (depths, None);
    };
    for (runner, depth) in runners.iter().zip(depths.iter_mut()) {
        for delay in &runner.retry_delays {
            let queue = topology.sink_retry(runner.sink.name(), *delay);
            if let Ok(Some(q)) = broker::inspect_queue(&connection, &queue).await {
                *depth += q.message_count();
            }
        }
    }
    let replay_lane = match broker::inspect_queue(&connection, &topology.replay()).await {
        Ok(Some(q)) => Some(q.message_count()),
        _ => None,
    };
    tracing::debug!("read the sinks' retry queues and the replay lane");
    let _ = tokio::time::timeout(BROKER_CALL_TIMEOUT, connection.close(200, "".into())).await;
    (depths, replay_lane)
}
