use std::collections::VecDeque;

use serde_json::json;

use super::*;
use crate::delivery::testing::{Recorder, Scripted};
use ingest_pipeline::Topology;

fn event(v: serde_json::Value) -> Event {
    v.as_object().cloned().unwrap_or_default().into()
}

fn batch(ids: &[&str]) -> Batch {
    let events: Vec<Arc<Event>> = ids
        .iter()
        .map(|m| Arc::new(event(json!({"messageId": m}))))
        .collect();
    Batch {
        key: batch_key("test", &events),
        events,
    }
}

fn runner(sink: Arc<dyn Sink>, delivery: DeliverySettings) -> SinkRunner {
    SinkRunner::new(
        sink,
        delivery,
        vec![Duration::from_secs(1), Duration::from_secs(10)],
        3,
    )
}

/// One batch through the whole path: attempt, decide (a first try), place into a recorder.
async fn settle_once(runner: &SinkRunner, b: &Batch) -> (Decision, Recorder) {
    let out = Recorder::default();
    let stop = CancellationToken::new();
    let decision = decide(runner.attempt(b, true, &stop).await, 0, runner.max_attempts);
    runner
        .place(b, decision.clone(), &Topology::new("t"), &out)
        .await
        .expect("placed");
    (decision, out)
}

#[test]
fn batch_keys_depend_on_sink_and_events_only() {
    let a = batch(&["m1", "m2"]).events;
    let b = batch(&["m1", "m3"]).events;
    assert_eq!(batch_key("vendor", &a), batch_key("vendor", &a.clone()));
    assert_ne!(batch_key("vendor", &a), batch_key("vendor", &b));
    assert_ne!(batch_key("vendor", &a), batch_key("other", &a));
}

#[test]
fn each_result_has_one_decision() {
    let retry = || Some(Err(SinkError::Retryable("down".into())));
    assert_eq!(decide(Some(Ok(())), 0, 3), Decision::Delivered);
    assert!(matches!(
        decide(retry(), 0, 3),
        Decision::Delay { attempts: 1, .. }
    ));
    assert!(matches!(
        decide(retry(), 2, 3),
        Decision::DeadLetter { attempts: 3, .. }
    ));
    assert!(matches!(
        decide(Some(Err(SinkError::Permanent("400".into()))), 0, 3),
        Decision::DeadLetter { attempts: 1, .. }
    ));
    assert_eq!(
        decide(Some(Err(SinkError::Refused(vec![(1, "bad".into())]))), 0, 3),
        Decision::DeadLetterSome {
            refused: vec![1],
            attempts: 1,
            reason: "bad".into()
        }
    );
    assert_eq!(
        decide(Some(Err(SinkError::ShuttingDown)), 0, 3),
        Decision::Release
    );
    // The circuit was open: the batch waits without spending an attempt.
    assert!(matches!(
        decide(None, 2, 3),
        Decision::Delay { attempts: 2, .. }
    ));
    let throttled = Some(Err(SinkError::Throttled {
        reason: "429".into(),
        retry_after: Duration::from_secs(5),
    }));
    assert!(matches!(
        decide(throttled, 0, 3),
        Decision::Delay { at_least, .. } if at_least == Duration::from_secs(5)
    ));
}

#[test]
fn an_attempt_count_at_its_maximum_is_dead_lettered_without_overflow() {
    let retry = Some(Err(SinkError::Retryable("down".into())));
    assert!(matches!(
        decide(retry, u32::MAX, 3),
        Decision::DeadLetter {
            attempts: u32::MAX,
            ..
        }
    ));
}

#[test]
fn delay_tiers_follow_attempts_and_honour_retry_after() {
    let tiers = [Duration::from_secs(1), Duration::from_secs(10)];
    assert_eq!(
        delay_for(&tiers, 1, Duration::ZERO),
        Some(Duration::from_secs(1))
    );
    assert_eq!(
        delay_for(&tiers, 9, Duration::ZERO),
        Some(Duration::from_secs(10))
    );
    assert_eq!(
        delay_for(&tiers, 1, Duration::from_secs(5)),
        Some(Duration::from_secs(10))
    );
    assert_eq!(delay_for(&[], 1, Duration::ZERO), None);
}

/// A stalled store must not hang its caller: the call is bounded, and the batch takes the
/// retry path like any other retryable failure.
#[tokio::test(start_paused = true)]
async fn a_sink_that_never_answers_is_a_retryable_failure_not_a_hang() {
    let sink = Arc::new(Scripted::stalled("stalled"));
    let runner = runner(sink, DeliverySettings::default());
    let stop = CancellationToken::new();
    let result = tokio::time::timeout(
        Duration::from_secs(3600),
        runner.attempt(&batch(&["m"]), true, &stop),
    )
    .await
    .expect("the attempt hung on a stalled sink");
    assert!(
        matches!(&result, Some(Err(e)) if e.is_retryable()),
        "{result:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn inline_retries_recover_a_flaky_sink_without_a_queue() {
    let sink = Arc::new(Scripted::new(
        "flaky",
        VecDeque::from([Err(SinkError::Retryable("blip".into())), Ok(())]),
    ));
    let runner = runner(sink.clone(), DeliverySettings::default());
    let (decision, out) = settle_once(&runner, &batch(&["m1", "m2"])).await;
    assert_eq!(decision, Decision::Delivered);
    assert_eq!(sink.calls(), 2);
    assert!(out.stored().is_empty());
    assert_eq!(runner.stats.snapshot()[0], 2);
}

#[tokio::test(start_paused = true)]
async fn a_failing_sink_sends_its_batch_to_the_first_delay_queue_with_its_key() {
    let sink = Arc::new(Scripted::failing("down"));
    let delivery = DeliverySettings {
        inline_attempts: 2,
        ..DeliverySettings::default()
    };
    let runner = runner(sink.clone(), delivery);
    let b = batch(&["m1"]);
    let (_, out) = settle_once(&runner, &b).await;
    let stored = out.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].queue, "t.sink.down.retry.1000ms");
    assert_eq!(stored[0].key, b.key);
    assert_eq!(stored[0].attempts, 1);
    assert_eq!(sink.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn refused_events_alone_are_dead_lettered_and_the_rest_count_as_delivered() {
    let sink = Arc::new(Scripted::new(
        "picky",
        VecDeque::from([Err(SinkError::Refused(vec![(0, "no".into())]))]),
    ));
    let runner = runner(sink, DeliverySettings::default());
    let (_, out) = settle_once(&runner, &batch(&["bad", "good"])).await;
    let stored = out.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].queue, "t.sink.picky.dlq");
    assert_eq!(stored[0].message_ids, vec!["bad"]);
    assert_eq!(runner.stats.snapshot()[0], 1);
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_sends_the_batch_on_without_calling_the_sink() {
    let sink = Arc::new(Scripted::failing("dead"));
    let delivery = DeliverySettings {
        inline_attempts: 1,
        breaker_failures: 1,
        ..DeliverySettings::default()
    };
    let runner = runner(sink.clone(), delivery);
    let stop = CancellationToken::new();
    let first = runner.attempt(&batch(&["m1"]), false, &stop).await;
    assert!(matches!(first, Some(Err(_))));
    let second = runner.attempt(&batch(&["m2"]), false, &stop).await;
    assert!(second.is_none(), "{second:?}");
    assert_eq!(sink.calls(), 1);
}
