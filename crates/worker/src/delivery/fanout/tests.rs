use std::collections::VecDeque;

use ingest_pipeline::settings::DeliverySettings;
use serde_json::json;

use super::*;
use crate::delivery::testing::{Recorder, Scripted};
use crate::sinks::{Batch, Sink};

fn events(ids: &[&str], kind: &str) -> Vec<Arc<Event>> {
    ids.iter()
        .map(|m| {
            let v = json!({"messageId": m, "type": kind, "event": "E"});
            Arc::new(Event::from(v.as_object().cloned().unwrap_or_default()))
        })
        .collect()
}

fn runner(sink: Arc<dyn Sink>, delivery: DeliverySettings) -> Arc<SinkRunner> {
    Arc::new(SinkRunner::new(
        sink,
        delivery,
        vec![Duration::from_secs(1)],
        3,
    ))
}

/// Lanes for `runners`, placing what they do not deliver into `out` (prefix `t`).
fn lanes(runners: &[Arc<SinkRunner>], out: &Arc<Recorder>) -> (Arc<Fanout>, JoinSet<()>) {
    let stop = CancellationToken::new();
    let durable: Arc<dyn Durable> = out.clone();
    let (fanout, tasks) = Fanout::start(runners, &Topology::new("t"), durable, &stop);
    (Arc::new(fanout), tasks)
}

/// `n` one-event deliveries at once (messageIds `m0`…); how long each took to settle.
async fn deliver_at_once(fanout: &Arc<Fanout>, n: usize) -> Vec<Duration> {
    let started = tokio::time::Instant::now();
    futures_util::future::join_all((0..n).map(|i| {
        let fanout = fanout.clone();
        let batch = events(&[format!("m{i}").as_str()], "track");
        async move {
            fanout.deliver(&batch).await.expect("settled");
            started.elapsed()
        }
    }))
    .await
}

#[tokio::test(start_paused = true)]
async fn each_sink_gets_the_events_it_wants_in_process() {
    let all = Arc::new(Scripted::new("all", VecDeque::new()));
    let tracks = Arc::new(Scripted::new("tracks", VecDeque::new()));
    let only_tracks = DeliverySettings {
        types: vec!["track".into()],
        ..DeliverySettings::default()
    };
    let runners = [
        runner(all.clone(), DeliverySettings::default()),
        runner(tracks.clone(), only_tracks),
    ];
    let out = Arc::new(Recorder::default());
    let (fanout, _tasks) = lanes(&runners, &out);
    let mut mixed = events(&["t1"], "track");
    mixed.extend(events(&["s1"], "screen"));
    fanout.deliver(&mixed).await.expect("delivered");
    assert_eq!(all.delivered(), vec!["t1", "s1"]);
    assert_eq!(tracks.delivered(), vec!["t1"]);
    assert!(out.stored().is_empty());
    assert_eq!(runners[1].stats.snapshot()[3], 1, "one filtered out");
}

#[tokio::test(start_paused = true)]
async fn a_failing_sink_takes_its_delay_queue_and_never_holds_back_a_healthy_one() {
    let healthy = Arc::new(Scripted::new("healthy", VecDeque::new()));
    let down = Arc::new(Scripted::failing("down"));
    let quick = DeliverySettings {
        inline_attempts: 2,
        ..DeliverySettings::default()
    };
    let runners = [
        runner(healthy.clone(), DeliverySettings::default()),
        runner(down.clone(), quick),
    ];
    let out = Arc::new(Recorder::default());
    let (fanout, _tasks) = lanes(&runners, &out);
    fanout
        .deliver(&events(&["m1", "m2"], "track"))
        .await
        .expect("settled");
    assert_eq!(healthy.delivered(), vec!["m1", "m2"]);
    let stored = out.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].queue, "t.sink.down.retry.1000ms");
    assert_eq!(stored[0].message_ids, vec!["m1", "m2"]);
}

#[tokio::test(start_paused = true)]
async fn a_sink_that_does_not_finish_in_time_spills_to_its_own_queue() {
    let stalled = Arc::new(Scripted::stalled("slow"));
    let bound = DeliverySettings {
        spill_after_ms: 2_000,
        ..DeliverySettings::default()
    };
    let runners = [runner(stalled.clone(), bound)];
    let out = Arc::new(Recorder::default());
    let (fanout, _tasks) = lanes(&runners, &out);
    let started = tokio::time::Instant::now();
    fanout
        .deliver(&events(&["m1"], "track"))
        .await
        .expect("spilled");
    assert_eq!(started.elapsed(), Duration::from_millis(2_000));
    let stored = out.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].queue, "t.sink.slow");
    assert_eq!(stored[0].attempts, 0);
    // The sink was given the batch and may have it: it keeps its key, to be sent again as it was.
    assert!(!stored[0].key.is_empty());
}

#[tokio::test(start_paused = true)]
async fn deliveries_waiting_for_a_busy_sink_share_one_batch() {
    let sink = Arc::new(Scripted::new("busy", VecDeque::new()));
    let one_at_a_time = DeliverySettings {
        max_in_flight: 1,
        ..DeliverySettings::default()
    };
    let runners = [runner(sink.clone(), one_at_a_time)];
    let out = Arc::new(Recorder::default());
    let (fanout, _tasks) = lanes(&runners, &out);
    let ids: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    deliver_at_once(&fanout, ids.len()).await;
    let mut delivered = sink.delivered();
    delivered.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(delivered, expected);
    assert!(
        sink.calls() < 20,
        "{} calls for 20 deliveries",
        sink.calls()
    );
}

#[tokio::test(start_paused = true)]
async fn a_batch_that_cannot_be_placed_anywhere_fails_its_deliveries() {
    let down = Arc::new(Scripted::failing("down"));
    let quick = DeliverySettings {
        inline_attempts: 1,
        ..DeliverySettings::default()
    };
    let runners = [runner(down, quick)];
    let out = Arc::new(Recorder::refusing());
    let (fanout, _tasks) = lanes(&runners, &out);
    let error = fanout
        .deliver(&events(&["m1"], "track"))
        .await
        .expect_err("nowhere durable");
    assert!(error.contains("down"), "{error}");
}

/// A sink slower than the arrivals: deliveries that wait for one of its slots past
/// `spill_after_ms` hand their share to its queue, so none waits longer than that bound.
#[tokio::test(start_paused = true)]
async fn a_sink_busy_past_spill_after_ms_spills_what_waits_for_it() {
    let sink = Arc::new(Scripted::slow("slow", Duration::from_millis(1_500)));
    let bound = DeliverySettings {
        max_in_flight: 1,
        batch_max_events: 1,
        spill_after_ms: 1_000,
        ..DeliverySettings::default()
    };
    let runners = [runner(sink.clone(), bound)];
    let out = Arc::new(Recorder::default());
    let (fanout, _tasks) = lanes(&runners, &out);
    let waits = deliver_at_once(&fanout, 4).await;
    assert!(
        waits.iter().all(|w| *w <= Duration::from_millis(1_000)),
        "{waits:?}"
    );
    // The first batch took the one slot and was spilled at the bound too (1.5 s > 1 s).
    assert_eq!(out.stored().len(), 4);
    assert!(out.stored().iter().all(|s| s.queue == "t.sink.slow"));
    // Only that one was given to the sink: it keeps its key; the three the sink never saw go
    // as fresh events (no key), for the runner to batch with others.
    let keyed = out.stored().iter().filter(|s| !s.key.is_empty()).count();
    assert_eq!(keyed, 1, "{:?}", out.stored());
}

/// Once a sink has missed the bound, a delivery does not wait for it at all unless a slot is
/// free for it alone: the slow sink's share goes straight to its queue.
#[tokio::test(start_paused = true)]
async fn after_a_sink_misses_the_bound_its_share_goes_to_its_queue_without_waiting() {
    let sink = Arc::new(Scripted::slow("slow", Duration::from_millis(1_500)));
    let bound = DeliverySettings {
        max_in_flight: 2,
        spill_after_ms: 1_000,
        ..DeliverySettings::default()
    };
    let runners = [runner(sink.clone(), bound)];
    let out = Arc::new(Recorder::default());
    let (fanout, _tasks) = lanes(&runners, &out);
    // The first delivery finds the sink slow: it waits the bound, then spills.
    fanout
        .deliver(&events(&["first"], "track"))
        .await
        .expect("spilled");
    let waits = deliver_at_once(&fanout, 10).await;
    let at_once = waits.iter().filter(|w| w.is_zero()).count();
    // At most one probe per slot waits for the sink; the rest go at once.
    assert!(at_once >= 8, "{waits:?}");
    assert!(
        waits.iter().all(|w| *w <= Duration::from_millis(1_000)),
        "{waits:?}"
    );
}

/// Refuses for good any batch holding an event of type `bad`, once `open` says so.
struct Picky {
    open: tokio::sync::watch::Receiver<bool>,
}

#[async_trait::async_trait]
impl Sink for Picky {
    fn name(&self) -> &str {
        "picky"
    }

    async fn deliver(&self, batch: &Batch) -> Result<(), crate::sinks::SinkError> {
        let mut open = self.open.clone();
        let _ = open.wait_for(|open| *open).await;
        if batch
            .events
            .iter()
            .any(|e| e.fields().get("type") == Some(&json!("bad")))
        {
            return Err(crate::sinks::SinkError::Permanent("refused".into()));
        }
        Ok(())
    }
}

/// Takes everything but dead letters.
struct NoDeadLetters(Recorder);

#[async_trait::async_trait]
impl Durable for NoDeadLetters {
    async fn store(
        &self,
        queue: &str,
        body: &[u8],
        headers: lapin::types::FieldTable,
    ) -> Result<(), String> {
        if queue.ends_with(".dlq") {
            return Err(format!("{queue} refused the batch"));
        }
        self.0.store(queue, body, headers).await
    }
}

/// Two raw deliveries waiting for a busy sink share a batch; one holds an event the sink
/// refuses and the dead-letter queue cannot be reached. The other delivery's events are in the
/// sink, so it is answered `Ok` (its raw message is acked); only the one whose event is in
/// neither the sink nor a queue is answered with an error.
#[tokio::test(start_paused = true)]
async fn a_delivery_is_answered_by_what_became_of_its_own_events_not_of_those_batched_with_it() {
    let (open, gate) = tokio::sync::watch::channel(false);
    let sink = Arc::new(Picky { open: gate });
    let one_at_a_time = DeliverySettings {
        max_in_flight: 1,
        inline_attempts: 1,
        breaker_failures: 0,
        ..DeliverySettings::default()
    };
    let runners = [runner(sink, one_at_a_time)];
    let stop = CancellationToken::new();
    let out: Arc<dyn Durable> = Arc::new(NoDeadLetters(Recorder::default()));
    let (fanout, _tasks) = Fanout::start(&runners, &Topology::new("t"), out, &stop);
    let fanout = Arc::new(fanout);
    let send = |batch: Vec<Arc<Event>>| {
        let fanout = fanout.clone();
        tokio::spawn(async move { fanout.deliver(&batch).await })
    };
    let first = send(events(&["first"], "track"));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let good = send(events(&["g1", "g2"], "track"));
    let bad = send(events(&["b1"], "bad"));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let _ = open.send(true);

    assert_eq!(first.await.expect("task"), Ok(()));
    assert_eq!(good.await.expect("task"), Ok(()));
    assert!(bad.await.expect("task").is_err());
}

/// Feeds `fanout` as the consumer does: `held` raw deliveries in hand at once, each taken up
/// again once it is answered (after a few hundred µs of taking and processing the next one),
/// `rounds` times, each of `size` events (messageIds `m<slot>-<round>-<event>`).
async fn steady_load(fanout: &Arc<Fanout>, held: usize, rounds: usize, size: usize) {
    futures_util::future::join_all((0..held).map(|slot| {
        let fanout = fanout.clone();
        async move {
            for round in 0..rounds {
                tokio::time::sleep(Duration::from_micros(300 * (slot as u64 % 8 + 1))).await;
                let ids: Vec<String> = (0..size).map(|e| format!("m{slot}-{round}-{e}")).collect();
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                fanout
                    .deliver(&events(&ids, "track"))
                    .await
                    .expect("settled");
            }
        }
    }))
    .await;
}

/// The MongoDB sink's delivery settings in `config/default.toml`.
fn like_mongo() -> DeliverySettings {
    DeliverySettings {
        batch_max_events: 1000,
        linger_ms: 50,
        ..DeliverySettings::default()
    }
}

/// A store with a fixed cost per batch (a journal flush per insert), fed as the consumer feeds
/// it. The batches must grow to what waits, not shrink to one delivery each: a slot that frees
/// while deliveries are still being processed must not take the first one alone.
#[tokio::test(start_paused = true)]
async fn under_steady_load_a_store_with_a_cost_per_batch_gets_few_large_batches() {
    const HELD: usize = 64;
    const ROUNDS: usize = 10;
    let sink = Arc::new(Scripted::slow("store", Duration::from_millis(50)));
    let out = Arc::new(Recorder::default());
    let (fanout, _tasks) = lanes(&[runner(sink.clone(), like_mongo())], &out);
    steady_load(&fanout, HELD, ROUNDS, 1).await;
    assert_eq!(sink.delivered().len(), HELD * ROUNDS);
    assert!(out.stored().is_empty(), "nothing spilled");
    // Ideally one batch per slot per round of HELD deliveries; a quarter of that is the bound.
    assert!(
        sink.calls() <= ROUNDS * 2 * 4,
        "{} batches for {} deliveries",
        sink.calls(),
        HELD * ROUNDS
    );
}

/// A store that takes about the bound for a full batch (1 ms an event; 1,000 events; 1 s),
/// under steady load: a batch spilled while the store was still taking it would be stored
/// twice. No event is both taken by the store and spilled into its queue, and every event is
/// in one or the other.
#[tokio::test(start_paused = true)]
async fn a_store_is_not_handed_a_batch_it_cannot_take_within_the_bound() {
    const HELD: usize = 128;
    const ROUNDS: usize = 10;
    const EVENTS: usize = 20;
    let sink = Arc::new(Scripted::per_event("store", Duration::from_millis(1)));
    let out = Arc::new(Recorder::default());
    let (fanout, _tasks) = lanes(&[runner(sink.clone(), like_mongo())], &out);
    steady_load(&fanout, HELD, ROUNDS, EVENTS).await;
    let taken = sink.delivered();
    let spilled: Vec<String> = out
        .stored()
        .into_iter()
        .flat_map(|s| s.message_ids)
        .collect();
    let taken_once: std::collections::HashSet<&String> = taken.iter().collect();
    assert_eq!(
        taken_once.len(),
        taken.len(),
        "the store took an event twice"
    );
    let both = spilled.iter().filter(|id| taken_once.contains(id)).count();
    assert_eq!(
        both,
        0,
        "{both} events taken by the store and spilled too ({} taken in {} batches, {} spilled)",
        taken.len(),
        sink.calls(),
        spilled.len()
    );
    assert_eq!(taken.len() + spilled.len(), HELD * ROUNDS * EVENTS);
}

/// A backfill in the lane never makes a live delivery wait for it: live jobs go first, and
/// replays hold at most `max_in_flight - 1` of the sink's slots.
#[tokio::test(start_paused = true)]
async fn a_live_delivery_never_waits_behind_a_replay_in_its_lane() {
    let sink = Arc::new(Scripted::per_event("backfill", Duration::from_millis(1)));
    let delivery = DeliverySettings {
        max_in_flight: 2,
        spill_after_ms: 60_000,
        ..DeliverySettings::default()
    };
    let runners = [runner(sink.clone(), delivery)];
    let out = Arc::new(Recorder::default());
    let (fanout, _tasks) = lanes(&runners, &out);
    let started = tokio::time::Instant::now();
    let replays: Vec<_> = (0..4)
        .map(|r| {
            let fanout = fanout.clone();
            let ids: Vec<String> = (0..200).map(|i| format!("r{r}-{i}")).collect();
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let batch = events(&ids, "track");
            tokio::spawn(async move {
                fanout
                    .deliver_replayed(&batch, |_| true)
                    .await
                    .expect("settled");
                started.elapsed()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let live_started = tokio::time::Instant::now();
    fanout
        .deliver(&events(&["live"], "track"))
        .await
        .expect("settled");
    let live = live_started.elapsed();
    let mut replayed = Vec::new();
    for replay in replays {
        replayed.push(replay.await.expect("joined"));
    }
    assert!(live <= Duration::from_millis(5), "live waited {live:?}");
    // The replays went one batch at a time: 800 events at 1 ms each.
    assert!(
        replayed.iter().max() >= Some(&Duration::from_millis(800)),
        "{replayed:?}"
    );
    assert_eq!(sink.delivered().len(), 801);
    assert!(out.stored().is_empty());
}
