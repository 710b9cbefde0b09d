//! The invalid queue's refusals and the summaries, against a stand-in for the broker.

use std::sync::atomic::AtomicBool;

use super::*;
use ingest_pipeline::message::{Endpoint, RequestMeta};
use ingest_schema::Issue;
use serde_json::{json, Value};

/// A queue that takes everything, refuses everything (at its cap), or has lost its channel.
#[derive(Default)]
struct Queue {
    full: AtomicBool,
    broken: AtomicBool,
    taken: Mutex<Vec<Value>>,
}

#[async_trait::async_trait]
impl Confirmed for Queue {
    async fn publish_once(
        &self,
        _: &str,
        _: &str,
        body: &[u8],
        _: &BasicProperties,
        _: Duration,
    ) -> Result<(), PublishError> {
        if self.broken.load(Ordering::Relaxed) {
            let closed =
                lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "closed");
            return Err(PublishError::Lost(closed.into()));
        }
        if self.full.load(Ordering::Relaxed) {
            return Err(PublishError::Nacked);
        }
        let record = serde_json::from_slice(body).map_err(|_| PublishError::Returned)?;
        lock(&self.taken).push(record);
        Ok(())
    }
}

impl Target for Queue {
    fn queue(&self) -> String {
        "t.invalid".into()
    }

    fn policy(&self) -> Policy {
        Policy::patient(Duration::from_secs(10))
    }
}

impl Queue {
    fn taken(&self) -> Vec<Value> {
        std::mem::take(&mut *lock(&self.taken))
    }
}

fn records(n: usize) -> Vec<InvalidRecord> {
    let meta = RequestMeta {
        request_id: "req-1".into(),
        received_at: Utc::now(),
        source: "shop-ios".into(),
        endpoint: Endpoint::Batch,
        client_ip: None,
        user_agent: None,
    };
    (0..n)
        .map(|i| {
            let issue = Issue {
                pointer: String::new(),
                message: "\"event\" is a required property".into(),
                schema: "envelope".into(),
            };
            let event = json!({"type": "track", "messageId": format!("m{i}")});
            InvalidRecord::new("schema", vec![issue], Some(event), &meta)
        })
        .collect()
}

fn settings(window_ms: u64) -> InvalidSettings {
    InvalidSettings {
        window_ms,
        keep_whole: 10,
        max_signatures: 100,
        max_signatures_per_source: 10,
    }
}

/// With the queue at its cap, the delivery still settles (no redelivery loop): what it refused
/// is counted, and summarised once the queue has room.
#[tokio::test(start_paused = true)]
async fn at_the_byte_cap_refused_records_are_counted_and_summarised_once_there_is_room() {
    let invalid = InvalidQueue::new(&settings(0));
    let queue = Queue::default();
    queue.full.store(true, Ordering::Relaxed);
    assert_eq!(invalid.keep(&queue, records(30)).await, Ok(()));
    assert_eq!(invalid.unreported(), 30);
    assert!(invalid.refusing.load(Ordering::Relaxed));
    // The summary is refused too while the queue is full; the count stays.
    invalid.flush(&queue, false).await;
    assert_eq!(invalid.unreported(), 30);
    assert!(queue.taken().is_empty());
    // Ops made room: the next record goes whole, and the summary lands.
    queue.full.store(false, Ordering::Relaxed);
    assert_eq!(invalid.keep(&queue, records(1)).await, Ok(()));
    invalid.flush(&queue, true).await;
    assert_eq!(invalid.unreported(), 0);
    let taken = queue.taken();
    assert_eq!(taken.len(), 2, "{taken:?}");
    assert_eq!(taken[0]["reason"], "schema");
    let summary = &taken[1];
    assert_eq!(summary["reason"], "overflow");
    assert_eq!(summary["source"], "shop-ios");
    assert_eq!(summary["count"], 30);
    assert_eq!(summary["requestId"], "req-1");
    assert_eq!(
        summary["exampleMessageIds"].as_array().map(Vec::len),
        Some(5)
    );
}

#[tokio::test(start_paused = true)]
async fn repeats_go_whole_up_to_k_and_a_window_s_summary_is_published_by_flush() {
    let invalid = InvalidQueue::new(&settings(60_000));
    let queue = Queue::default();
    assert_eq!(invalid.keep(&queue, records(2000)).await, Ok(()));
    assert_eq!(queue.taken().len(), 10);
    invalid.flush(&queue, false).await;
    assert!(queue.taken().is_empty(), "the window is still open");
    invalid.flush(&queue, true).await;
    let taken = queue.taken();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0]["reason"], "folded");
    assert_eq!(taken[0]["count"], 1990);
    assert_eq!(taken[0]["kept"], 10);
}

/// A folded summary the full queue refuses is counted as overflow, not lost.
#[tokio::test(start_paused = true)]
async fn a_summary_refused_at_the_cap_joins_the_overflow_count() {
    let invalid = InvalidQueue::new(&settings(60_000));
    let queue = Queue::default();
    assert_eq!(invalid.keep(&queue, records(25)).await, Ok(()));
    assert_eq!(queue.taken().len(), 10);
    queue.full.store(true, Ordering::Relaxed);
    invalid.flush(&queue, true).await;
    assert_eq!(invalid.unreported(), 15);
    queue.full.store(false, Ordering::Relaxed);
    invalid.flush(&queue, true).await;
    let taken = queue.taken();
    assert_eq!(taken.len(), 1);
    assert_eq!(
        (&taken[0]["reason"], &taken[0]["count"]),
        (&json!("overflow"), &json!(15))
    );
}

/// The channel failed mid-delivery: the delivery goes back to its queue, and its redelivery is
/// admitted afresh, so the records kept whole are published then.
#[tokio::test(start_paused = true)]
async fn a_lost_channel_returns_the_delivery_and_undoes_what_it_counted() {
    let invalid = InvalidQueue::new(&settings(60_000));
    let queue = Queue::default();
    queue.broken.store(true, Ordering::Relaxed);
    assert!(invalid.keep(&queue, records(12)).await.is_err());
    invalid.flush(&queue, false).await;
    queue.broken.store(false, Ordering::Relaxed);
    invalid.flush(&queue, false).await;
    assert_eq!(invalid.keep(&queue, records(12)).await, Ok(()));
    assert_eq!(queue.taken().len(), 10);
    invalid.flush(&queue, true).await;
    let taken = queue.taken();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0]["count"], 2, "counted once, not twice");
}
