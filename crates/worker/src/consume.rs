//! The raw queue's consumer: one broker session at a time. Each delivery is processed in a
//! task of its own (decode, enrich, validate), its invalid records are compacted and confirmed
//! into the invalid queue ([`InvalidQueue`](crate::invalid_publish::InvalidQueue), which also
//! publishes the summaries every second), its valid events go to the sinks in this process
//! ([`Fanout`]), and it is acked once all of that is done, in tag order with `multiple`
//! ([`Acks`]). Each sink's own queue (its spill and retry path) is consumed beside it by the
//! sink's runner.
//!
//! The replay lane (`<prefix>.replay`, archived requests `ingestctl replay` sends again) is
//! consumed on a channel of its own with `worker.replay_prefetch`: a replay holds that many
//! deliveries against the live queue's `prefetch`, and a replayed delivery waits before it
//! uses any CPU while more than a quarter of the live prefetch is in hand (live traffic
//! arriving faster than it is finished); with live traffic idle, it takes the whole worker.
//! In the sinks' lanes live jobs go first too (`fanout`). A replayed request goes to the sinks
//! it names (every sink but statsd when it names none), and its age counts in no live lag.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, BoxStream};
use futures_util::{FutureExt as _, StreamExt as _};
use ingest_pipeline::message::Replayed;
use ingest_pipeline::{broker, Settings};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::acks::{Acks, Settled};
use crate::delivery::fanout::Fanout;
use crate::delivery::{Durable, SinkRunner};
use crate::out::Out;
use crate::sinks::Event;
use crate::{process, Context};

/// A broker that stopped answering must not hold up shutdown or reconnection.
pub(crate) const BROKER_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one broker call of a session's start may take: a node that takes the connection
/// and then never answers a declare or a consume must not hold the worker (it starts again,
/// from a node picked anew).
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a lost session waits for the deliveries, lanes and sink runners it holds.
const LOST_GRACE: Duration = Duration::from_secs(1);
/// How often the summaries of ended compaction windows (and of overflow) are published.
const SUMMARIES_EVERY: Duration = Duration::from_secs(1);

/// One connection's life: consume the raw queue, run every sink's lane and runner, until
/// shutdown or until the connection is lost. Publishing (invalid records, spilled batches,
/// retries) uses a second connection: a broker that blocks publishers (resource alarm) must
/// not also stall the acks.
pub(crate) async fn session(
    settings: &Settings,
    context: &Arc<Context>,
    runners: &[Arc<SinkRunner>],
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let topology = &context.topology;
    let connection =
        Arc::new(step("connecting", broker::connect(&settings.broker, "worker")).await?);
    let publishing = Arc::new(
        step(
            "connecting",
            broker::connect(&settings.broker, "worker-publish"),
        )
        .await?,
    );
    let names: Vec<String> = runners.iter().map(|r| r.sink.name().to_owned()).collect();
    let retry_delays = settings.sinks.retry_delays();
    let declaring = topology.declare_sinks(&connection, &names, &retry_delays);
    step("declaring the queues", declaring).await?;
    let channel = step("opening a channel", connection.create_channel()).await?;
    let qos = channel.basic_qos(settings.worker.prefetch, BasicQosOptions::default());
    step("setting the prefetch", qos).await?;
    let publish = step(
        "opening the publishing channel",
        broker::Publisher::open(publishing.clone()),
    )
    .await?;

    let out = Arc::new(Out::new(
        publish.clone(),
        connection.clone(),
        topology.clone(),
        names.clone(),
        settings.sinks.retry_delays(),
        context.confirm_timeout,
    ));

    // Each sink's queue runner runs beside the raw consumer; any of them failing ends the
    // session. The lanes end once the raw deliveries in hand are settled.
    let session_stop = stop.child_token();
    let mut sink_tasks = JoinSet::new();
    for runner in runners {
        let (runner, topology, connection, out, session_stop) = (
            runner.clone(),
            topology.clone(),
            connection.clone(),
            out.clone(),
            session_stop.clone(),
        );
        sink_tasks.spawn(async move {
            let result = runner
                .run(&topology, &connection, &*out, &session_stop)
                .await;
            session_stop.cancel();
            result
        });
    }
    let durable: Arc<dyn Durable> = out.clone();
    let lanes_stop = CancellationToken::new();
    let (fanout, mut lanes) = Fanout::start(runners, topology, durable, &lanes_stop);
    let shared = Arc::new(Session {
        out: out.clone(),
        fanout,
        live_in_flight: Arc::new(AtomicUsize::new(0)),
        live_busy_above: usize::from(settings.worker.prefetch / 4),
    });
    let tag = format!("worker-{}", uuid::Uuid::new_v4());
    let consuming = channel.basic_consume(
        topology.raw().into(),
        tag.as_str().into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    );
    let live = step("consuming the raw queue", consuming).await?;
    let replay_prefetch = settings.worker.replay_prefetch;
    let replay = side_lane(&connection, &topology.replay(), replay_prefetch, &tag).await?;
    let overflow_prefetch = settings.worker.overflow_prefetch;
    let overflow = side_lane(&connection, &topology.overflow(), overflow_prefetch, &tag).await?;
    tracing::info!(queue = %topology.raw(), prefetch = settings.worker.prefetch, replay_prefetch, overflow_prefetch, sinks = ?names, "consuming");
    context.health.set_consuming(true);

    let mut acks = LaneAcks {
        live: Acks::new(channel.clone(), settings.worker.prefetch),
        replay: replay
            .as_ref()
            .map(|(channel, _)| Acks::new(channel.clone(), replay_prefetch)),
        overflow: overflow
            .as_ref()
            .map(|(channel, _)| Acks::new(channel.clone(), overflow_prefetch)),
    };
    let side_channels: Vec<lapin::Channel> = [&replay, &overflow]
        .into_iter()
        .flatten()
        .map(|(channel, _)| channel.clone())
        .collect();
    let mut consumer = merged(
        live,
        replay.map(|(_, consumer)| consumer),
        overflow.map(|(_, consumer)| consumer),
    );
    let mut tasks = JoinSet::new();
    let mut health = tokio::time::interval(Duration::from_secs(1));
    // Finished deliveries held behind an unfinished one are acked alone after `acks::HOLD`.
    let mut overdue = tokio::time::interval(crate::acks::HOLD / 2);
    overdue.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut summaries = tokio::time::interval(SUMMARIES_EVERY);
    let mut flushing: Option<tokio::task::JoinHandle<()>> = None;
    let mut lost = loop {
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
                if !publishing.status().connected() || !publish.connected() {
                    tracing::warn!("the publishing connection is gone");
                    break true;
                }
            }
            _ = summaries.tick() => {
                if flushing.as_ref().is_none_or(|f| f.is_finished()) {
                    let (context, shared) = (context.clone(), shared.clone());
                    flushing = Some(tokio::spawn(async move {
                        context.invalid.flush(&*shared.out, false).await;
                    }));
                }
            }
            _ = overdue.tick(), if acks.waiting() => {
                if let Err(error) = acks.ack_overdue().await {
                    tracing::warn!(%error, "cannot ack: the channel is gone");
                    break true;
                }
            }
            next = consumer.next() => match next {
                Some((lane, Some(Ok(delivery)))) => {
                    let delivery_tag = delivery.delivery_tag;
                    let busy = (lane == Lane::Live).then(|| LiveBusy::enter(&shared.live_in_flight));
                    let work = handle(lane, delivery, context.clone(), shared.clone());
                    tasks.spawn(async move {
                        let settled = settled_on_panic(work).await;
                        drop(busy);
                        (lane, delivery_tag, settled)
                    });
                }
                Some((Lane::Live, Some(Err(error)))) => {
                    tracing::warn!(%error, "consumer failed");
                    break true;
                }
                Some((Lane::Live, None)) => {
                    tracing::warn!("the broker ended the consumer");
                    break true;
                }
                // A side lane alone (the replay lane deleted to abort a replay, its channel
                // closed): the session ends as a stop does, settling the live deliveries in
                // hand, and the next one subscribes again.
                Some((lane @ (Lane::Replay | Lane::Overflow), ended)) => {
                    let error = ended.and_then(Result::err).map(|e| e.to_string());
                    tracing::warn!(?error, ?lane, "a side lane's consumer ended; starting a new session");
                    break false;
                }
                None => break true,
            },
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if !settle_joined(&mut acks, joined, &mut tasks).await {
                    break true;
                }
            }
        }
    };
    context.health.set_consuming(false);
    if !lost {
        for channel in std::iter::once(&channel).chain(&side_channels) {
            let cancel = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
            let _ = tokio::time::timeout(BROKER_CALL_TIMEOUT, cancel).await;
        }
    }
    let in_hand = tasks.len();
    // A lost session settles little: what it holds returns to its queue when the connection
    // closes. Waiting the whole grace for it would hold up the reconnect, and the worker of a
    // node that died would drain nothing meanwhile.
    let grace = match lost {
        true => LOST_GRACE,
        false => Duration::from_millis(settings.worker.shutdown_timeout_ms),
    };
    let drained = tokio::time::timeout(grace, async {
        while let Some(joined) = tasks.join_next().await {
            if !lost && !settle_joined(&mut acks, joined, &mut tasks).await {
                lost = true;
            }
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
    if let Some(mut flushing) = flushing {
        if tokio::time::timeout(grace, &mut flushing).await.is_err() {
            flushing.abort();
        }
    }
    if !lost {
        // Stopping: every open window's summary, and what overflowed, while the channel lasts
        // (`serve` says what is left).
        let _ = tokio::time::timeout(grace, context.invalid.flush(&*shared.out, true)).await;
    }
    // Raw deliveries are settled: the lanes finish what they hold, then the runners stop.
    drop(shared);
    if tokio::time::timeout(grace, async { while lanes.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        lanes_stop.cancel();
        lanes.abort_all();
    }
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
    for c in [&*connection, &*publishing] {
        let _ =
            tokio::time::timeout(BROKER_CALL_TIMEOUT, c.close(200, "worker stopping".into())).await;
    }
    if lost {
        anyhow::bail!("connection to the broker lost");
    }
    Ok(())
}

/// Settles a finished delivery and every other one already finished, so that one `multiple`
/// ack covers them all; `false` if the channel is gone.
async fn settle_joined(
    acks: &mut LaneAcks,
    first: Result<(Lane, u64, Settled), tokio::task::JoinError>,
    tasks: &mut JoinSet<(Lane, u64, Settled)>,
) -> bool {
    let mut finished = vec![first];
    while let Some(more) = tasks.try_join_next() {
        finished.push(more);
    }
    let mut live = Vec::with_capacity(finished.len());
    let (mut replay, mut overflow) = (Vec::new(), Vec::new());
    for joined in finished {
        match joined {
            Ok((Lane::Live, tag, settled)) => live.push((tag, settled)),
            Ok((Lane::Replay, tag, settled)) => replay.push((tag, settled)),
            Ok((Lane::Overflow, tag, settled)) => overflow.push((tag, settled)),
            // Only an abort gets here (a panic is caught in the task): the channel's close
            // returns the delivery.
            Err(error) => tracing::warn!(%error, "a delivery task ended without settling"),
        }
    }
    // A side lane's channel failing costs only its own deliveries (they return to their lane
    // when it closes), never the live ones: the session goes on.
    for (side, settled) in [(&mut acks.replay, replay), (&mut acks.overflow, overflow)] {
        if let (Some(side_acks), false) = (side.as_mut(), settled.is_empty()) {
            if let Err(error) = side_acks.settle_all(settled).await {
                tracing::warn!(%error, "cannot ack on a side lane's channel");
                *side = None;
            }
        }
    }
    match acks.live.settle_all(live).await {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(%error, "cannot ack: the channel is gone");
            false
        }
    }
}

/// The queue a delivery came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    /// The raw queue: what the collectors take.
    Live,
    /// The replay lane: archived requests sent again.
    Replay,
    /// The overflow lane: requests past their source's quota or a user's.
    Overflow,
}

/// Each lane's deliveries with the lane; `None` once a consumer ended (the session ends too).
type Deliveries = BoxStream<'static, (Lane, Option<lapin::Result<Delivery>>)>;

/// Every lane's consumer as one stream.
fn merged(
    live: lapin::Consumer,
    replay: Option<lapin::Consumer>,
    overflow: Option<lapin::Consumer>,
) -> Deliveries {
    let lane = |lane: Lane, consumer: lapin::Consumer| {
        consumer
            .map(move |next| (lane, Some(next)))
            .chain(stream::once(async move { (lane, None) }))
            .boxed()
    };
    let sides = [(Lane::Replay, replay), (Lane::Overflow, overflow)]
        .into_iter()
        .filter_map(|(kind, consumer)| consumer.map(|c| lane(kind, c)));
    stream::select_all(std::iter::once(lane(Lane::Live, live)).chain(sides)).boxed()
}

/// A side lane's channel and consumer, with its own prefetch; `None` when it is 0 (this
/// worker leaves the lane to others).
async fn side_lane(
    connection: &lapin::Connection,
    queue: &str,
    prefetch: u16,
    tag: &str,
) -> anyhow::Result<Option<(lapin::Channel, lapin::Consumer)>> {
    if prefetch == 0 {
        return Ok(None);
    }
    let channel = step("opening a side lane's channel", connection.create_channel()).await?;
    let qos = channel.basic_qos(prefetch, BasicQosOptions::default());
    step("setting a side lane's prefetch", qos).await?;
    let consuming = channel.basic_consume(
        queue.into(),
        tag.into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    );
    let consumer = step("consuming a side lane", consuming).await?;
    Ok(Some((channel, consumer)))
}

/// Each consuming channel's ack tracker (their delivery tags are their own).
struct LaneAcks {
    live: Acks,
    replay: Option<Acks>,
    overflow: Option<Acks>,
}

impl LaneAcks {
    /// Whether a finished delivery waits behind an unfinished one on any channel.
    fn waiting(&self) -> bool {
        self.live.waiting() > 0
            || [&self.replay, &self.overflow]
                .into_iter()
                .flatten()
                .any(|a| a.waiting() > 0)
    }

    async fn ack_overdue(&mut self) -> lapin::Result<()> {
        for side in [&mut self.replay, &mut self.overflow] {
            if let Some(acks) = side.as_mut() {
                if let Err(error) = acks.ack_overdue().await {
                    tracing::warn!(%error, "cannot ack on a side lane's channel");
                    *side = None;
                }
            }
        }
        self.live.ack_overdue().await
    }
}

/// One broker call of a session's start, given up after [`SETUP_TIMEOUT`].
async fn step<T>(what: &str, call: impl Future<Output = lapin::Result<T>>) -> anyhow::Result<T> {
    match tokio::time::timeout(SETUP_TIMEOUT, call).await {
        Ok(result) => Ok(result?),
        Err(_) => anyhow::bail!("{what} took longer than {SETUP_TIMEOUT:?}"),
    }
}

/// Runs the work on one delivery. A panic in it must not keep the delivery's prefetch slot
/// until the channel closes (after `prefetch` panics the worker would stop consuming while it
/// still looked ready): it counts as `Requeue`, so the delivery goes back to its queue at
/// once, and the queue's delivery limit ends a loop in its dead-letter queue.
pub async fn settled_on_panic(work: impl Future<Output = Settled>) -> Settled {
    match std::panic::AssertUnwindSafe(work).catch_unwind().await {
        Ok(settled) => settled,
        Err(_) => {
            metrics::counter!("worker_deliveries_total", "outcome" => "panicked").increment(1);
            tracing::error!("handling a delivery panicked; it returns to the queue");
            Settled::Requeue
        }
    }
}

async fn handle(
    lane: Lane,
    delivery: Delivery,
    context: Arc<Context>,
    session: Arc<Session>,
) -> Settled {
    // A request put on the replay lane by hand, without the marks, goes where a replay does.
    let replayed = (lane == Lane::Replay).then(|| {
        Replayed::read(delivery.properties.headers().as_ref()).unwrap_or(Replayed {
            at: None,
            sinks: None,
        })
    });
    // A replay to a sink this worker does not have (a rolling restart that adds it): back to
    // the lane for a worker that has it; past the delivery limit, to the raw DLQ.
    if let Some(missing) = replayed
        .as_ref()
        .and_then(|r| r.sinks.as_ref())
        .and_then(|sinks| sinks.iter().find(|s| !session.fanout.has(s)))
    {
        metrics::counter!("worker_deliveries_total", "outcome" => "requeued").increment(1);
        tracing::warn!(sink = %missing, "a replayed request names a sink this worker does not have; returning it to the replay lane");
        tokio::time::sleep(Duration::from_millis(500 + fastrand::u64(0..1000))).await;
        return Settled::Requeue;
    }
    // Live traffic first: while more than a quarter of the live prefetch is in hand (live
    // deliveries arrive faster than they finish), a replayed or overflowed one waits before
    // using any CPU.
    // At most SIDE_WAIT_AT_MOST, though: a delivery held unacked for longer than the broker's
    // consumer timeout (30 min by default) would have its channel closed under it.
    if lane != Lane::Live {
        let waited = std::time::Instant::now();
        while session.live_in_flight.load(Ordering::Relaxed) > session.live_busy_above
            && waited.elapsed() < SIDE_WAIT_AT_MOST
        {
            tokio::time::sleep(LIVE_BUSY_POLL).await;
        }
    }
    let mut outcome = process::process(
        &context.registry,
        &delivery.properties,
        &delivery.data,
        context.limits,
        context.documents,
        &context.enrichment,
    );
    context.live.offer(
        &outcome,
        match lane {
            Lane::Live => "live",
            Lane::Replay => "replay",
            Lane::Overflow => "overflow",
        },
    );
    let (valid, invalid) = (outcome.valid.len(), outcome.invalid.len());
    metrics::counter!("worker_events_total", "result" => "valid").increment(valid as u64);
    metrics::counter!("worker_events_total", "result" => "invalid").increment(invalid as u64);
    let since = |time: chrono::DateTime<chrono::Utc>| {
        let waited = chrono::Utc::now().signed_duration_since(time);
        waited.num_milliseconds().max(0) as f64 / 1000.0
    };
    match &replayed {
        None if lane == Lane::Overflow => {
            metrics::counter!("worker_overflow_events_total").increment((valid + invalid) as u64);
            metrics::histogram!("worker_overflow_lag_seconds")
                .record(since(outcome.meta.received_at));
        }
        None => {
            metrics::histogram!("worker_queue_lag_seconds").record(since(outcome.meta.received_at))
        }
        Some(replayed) => {
            metrics::counter!("worker_replayed_events_total", "result" => "valid")
                .increment(valid as u64);
            metrics::counter!("worker_replayed_events_total", "result" => "invalid")
                .increment(invalid as u64);
            if let Some(at) = replayed.at {
                metrics::histogram!("worker_replay_lag_seconds").record(since(at));
            }
            outcome.valid.iter_mut().for_each(Event::mark_replayed);
        }
    }
    // A replay to named sinks (a backfill) leaves the invalid queue alone: what it refuses
    // was kept when first seen. A replay to every sink keeps it again, with today's errors.
    let keep_invalid = replayed.as_ref().is_none_or(|r| r.sinks.is_none());
    let events: Vec<Arc<Event>> = outcome.valid.into_iter().map(Arc::new).collect();
    let stored = async {
        if keep_invalid {
            context.invalid.keep(&*session.out, outcome.invalid).await?;
        }
        if !events.is_empty() {
            match &replayed {
                None => session.fanout.deliver(&events).await?,
                Some(replayed) => {
                    session
                        .fanout
                        .deliver_replayed(&events, |sink| replayed.goes_to(sink))
                        .await?
                }
            }
        }
        Ok::<(), String>(())
    }
    .await;
    match stored {
        Ok(()) => {
            metrics::counter!("worker_deliveries_total", "outcome" => "acked").increment(1);
            Settled::Done
        }
        Err(error) => {
            metrics::counter!("worker_deliveries_total", "outcome" => "requeued").increment(1);
            tracing::warn!(%error, "delivery not settled; returning it to the queue");
            // Do not spin on a persistent failure.
            tokio::time::sleep(Duration::from_millis(500 + fastrand::u64(0..1000))).await;
            Settled::Requeue
        }
    }
}

/// What a session's delivery tasks share: the way into the broker and the sinks' lanes.
struct Session {
    out: Arc<Out>,
    fanout: Fanout,
    /// Live deliveries being handled now.
    live_in_flight: Arc<AtomicUsize>,
    /// Past this many live deliveries in hand, replayed ones wait: live traffic is behind.
    live_busy_above: usize,
}

/// Counts a live delivery in hand while it lives.
struct LiveBusy(Arc<AtomicUsize>);

impl LiveBusy {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for LiveBusy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long a replayed or overflowed delivery waits for live traffic at most before it is
/// handled all the same: well within RabbitMQ's consumer timeout for an unacked delivery.
const SIDE_WAIT_AT_MOST: Duration = Duration::from_secs(300);
/// How often a replayed delivery waiting for live traffic looks again.
const LIVE_BUSY_POLL: Duration = Duration::from_millis(5);
