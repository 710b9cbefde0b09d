use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ingest_pipeline::settings::DeliverySettings;
use serde_json::json;

use super::*;
use crate::sinks::Sink;

fn events(n: usize, bad: &[usize]) -> Vec<Arc<Event>> {
    (0..n)
        .map(|i| {
            let v = json!({"messageId": format!("m{i}"), "bad": bad.contains(&i)});
            Arc::new(Event::from(v.as_object().cloned().unwrap_or_default()))
        })
        .collect()
}

/// Refuses for good any batch holding a `bad` event (or every batch), after `delay`.
struct ByContent {
    refuse_all: bool,
    delay: Duration,
    calls: AtomicUsize,
}

impl ByContent {
    fn new() -> Self {
        Self {
            refuse_all: false,
            delay: Duration::ZERO,
            calls: AtomicUsize::new(0),
        }
    }
}

#[async_trait::async_trait]
impl Sink for ByContent {
    fn name(&self) -> &str {
        "vendor"
    }

    async fn deliver(&self, batch: &Batch) -> Result<(), SinkError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        let bad = batch
            .events
            .iter()
            .find(|e| e.fields().get("bad") == Some(&json!(true)));
        match bad {
            _ if self.refuse_all => Err(SinkError::Permanent("HTTP 400: no".into())),
            Some(e) => Err(SinkError::Permanent(format!(
                "refused {:?}",
                e.fields().get("messageId")
            ))),
            None => Ok(()),
        }
    }
}

fn runner(sink: ByContent, delivery: DeliverySettings) -> SinkRunner {
    let delivery = DeliverySettings {
        inline_attempts: 1,
        breaker_failures: 0,
        ..delivery
    };
    SinkRunner::new(Arc::new(sink), delivery, vec![Duration::from_secs(1)], 3)
}

fn sizes(events: &[Arc<Event>]) -> Vec<usize> {
    events.iter().map(|e| json_len(e)).collect()
}

#[test]
fn json_len_is_the_length_of_the_event_in_a_body() {
    let event = &events(1, &[])[0];
    let written = serde_json::to_vec(event.as_ref()).expect("encode");
    assert_eq!(json_len(event), written.len());
}

#[test]
fn chunks_hold_at_most_max_events() {
    let sizes = vec![10; 1_001];
    let cut = chunks(&sizes, 500, usize::MAX);
    assert_eq!(cut, vec![0..500, 500..1_000, 1_000..1_001]);
    assert_eq!(chunks(&sizes[..3], 1, usize::MAX), vec![0..1, 1..2, 2..3]);
    assert!(chunks(&[], 500, 1 << 20).is_empty());
}

#[test]
fn chunks_make_bodies_of_at_most_max_bytes_and_an_oversized_event_goes_alone() {
    // `[` + 10 + `,` + 10 + `]` = 23 bytes for two events of 10.
    assert_eq!(chunks(&[10, 10, 10], 100, 23), vec![0..2, 2..3]);
    assert_eq!(chunks(&[10, 10, 10], 100, 22), vec![0..1, 1..2, 2..3]);
    assert_eq!(chunks(&[5, 500, 5], 100, 50), vec![0..1, 1..2, 2..3]);
    assert_eq!(chunks(&[usize::MAX, 1], 100, 50), vec![0..1, 1..2]);
}

#[test]
fn a_cut_batch_has_json_bodies_within_the_bounds() {
    let events = events(300, &[]);
    let sizes = sizes(&events);
    for range in chunks(&sizes, 1_000, 2_000) {
        let body = serde_json::to_vec(&events[range.clone()]).expect("encode");
        assert!(body.len() <= 2_000, "{range:?}: {} bytes", body.len());
    }
}

#[test]
fn a_batch_within_the_bounds_keeps_its_key_and_a_larger_one_is_cut_under_keys_of_its_parts() {
    let bounds = DeliverySettings {
        batch_max_events: 4,
        ..DeliverySettings::default()
    };
    let runner = runner(ByContent::new(), bounds);
    let few = events(4, &[]);
    let cut = runner.cut(&few, &sizes(&few), Some("kept"));
    assert_eq!(cut.len(), 1);
    assert_eq!(cut[0].1.key, "kept");

    let many = events(10, &[]);
    let cut = runner.cut(&many, &sizes(&many), Some("kept"));
    let ranges: Vec<_> = cut.iter().map(|(r, _)| r.clone()).collect();
    assert_eq!(ranges, vec![0..4, 4..8, 8..10]);
    for (range, batch) in &cut {
        assert_eq!(batch.key, batch_key("vendor", &many[range.clone()]));
    }
    let again = runner.cut(&many, &sizes(&many), Some("kept"));
    let keys =
        |c: &[(Range<usize>, Batch)]| c.iter().map(|(_, b)| b.key.clone()).collect::<Vec<_>>();
    assert_eq!(keys(&cut), keys(&again), "the same cut, the same keys");
}

#[tokio::test(start_paused = true)]
async fn a_refused_event_is_dead_lettered_alone_with_its_answer_after_the_batchs_failures() {
    let runner = runner(ByContent::new(), DeliverySettings::default());
    let batch = Batch {
        key: "k".into(),
        events: events(16, &[11]),
    };
    let stop = CancellationToken::new();
    let (parts, in_time) = runner.deliver_parts(batch, 2, Path::Queue, &stop).await;
    assert!(in_time);
    let covered: Vec<_> = parts.iter().map(|p| p.range.clone()).collect();
    assert_eq!(covered, vec![0..8, 8..10, 10..11, 11..12, 12..16]);
    for part in &parts {
        match &part.decision {
            Decision::DeadLetter { attempts, reason } => {
                assert_eq!(part.range, 11..12);
                assert_eq!(*attempts, 3, "two failures before, one now");
                assert!(reason.contains("m11"), "{reason}");
            }
            other => assert_eq!(other, &Decision::Delivered, "{:?}", part.range),
        }
    }
    // 1 + 2 a level, four levels.
    let calls = parts.len();
    assert!(calls <= 1 + 2 * 4, "{calls}");
}

#[tokio::test(start_paused = true)]
async fn a_sink_refusing_every_event_alike_fills_one_dead_letter_and_bisection_ends() {
    let sink = ByContent {
        refuse_all: true,
        ..ByContent::new()
    };
    let runner = runner(sink, DeliverySettings::default());
    let all = events(64, &[]);
    let batch = Batch {
        key: "k".into(),
        events: all.clone(),
    };
    let stop = CancellationToken::new();
    let (parts, _) = runner.deliver_parts(batch, 0, Path::Queue, &stop).await;
    assert_eq!(parts.len(), 1, "{parts:?}");
    assert_eq!(parts[0].range, 0..64);
    assert_eq!(parts[0].batch.events.len(), 64);
    assert_eq!(parts[0].batch.key, batch_key("vendor", &all));
    assert!(matches!(
        parts[0].decision,
        Decision::DeadLetter { attempts: 1, .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn past_the_deadline_what_bisection_has_left_is_spilled_in_its_parts() {
    let sink = ByContent {
        delay: Duration::from_millis(400),
        ..ByContent::new()
    };
    let runner = runner(sink, DeliverySettings::default());
    let batch = Batch {
        key: "k".into(),
        events: events(8, &[0]),
    };
    let stop = CancellationToken::new();
    let deadline = Instant::now() + Duration::from_millis(1_000);
    let (parts, in_time) = runner
        .deliver_parts(batch, 0, Path::InProcess { deadline }, &stop)
        .await;
    assert!(!in_time);
    // Refused whole (400 ms), its first half refused (800 ms), the next call cut off at 1 s.
    let covered: Vec<_> = parts.iter().map(|p| p.range.clone()).collect();
    assert_eq!(covered, vec![0..2, 2..4, 4..8]);
    assert!(parts
        .iter()
        .all(|p| matches!(p.decision, Decision::Spill { attempts: 0, .. })));
    assert_eq!(
        parts[2].batch.key,
        batch_key("vendor", &parts[2].batch.events)
    );
}

#[test]
fn a_range_is_placed_only_if_every_part_holding_its_events_is() {
    let mut placed = Placed::default();
    placed.push(0..4, Ok(()));
    placed.push(4..6, Err("dlq refused".into()));
    placed.push(6..10, Ok(()));
    assert_eq!(placed.of(&(0..4)), Ok(()));
    assert_eq!(placed.of(&(6..10)), Ok(()));
    assert_eq!(placed.of(&(3..5)), Err("dlq refused".into()));
    assert_eq!(placed.of(&(5..7)), Err("dlq refused".into()));
    assert_eq!(placed.of(&(0..10)), Err("dlq refused".into()));
}
