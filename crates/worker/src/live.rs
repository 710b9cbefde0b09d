//! The live feed (issue #26): what the worker makes of each request, for `ingestctl tail` and
//! `ingestctl console`, published only while someone watches.
//!
//! A viewer holds a consumer on the presence queue `<prefix>.live.viewers` (it never gets a
//! message) and reads its own exclusive, auto-deleted, length-capped queue bound to the fanout
//! exchange `<prefix>.live`. The worker asks the broker every [`CHECK_EVERY`] how many consumers
//! the presence queue has (a declare, not a publish): with none, it builds and publishes
//! nothing. The feed is lossy by design: the worker hands each item to its own task through a
//! bounded channel and drops it when that is full; the task publishes without confirms on a
//! connection of its own, so a stalled broker or a slow viewer can hold neither a delivery nor
//! a sink; and at most [`MAX_PER_SECOND`] items a second leave each worker, the rest counted in
//! the next one's `skipped`. What it shows is each event after the privacy rules, never a write
//! key (the worker removed it when it split the request).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ingest_pipeline::{broker, Backoff, Settings, Topology};
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::invalid::InvalidRecord;
use crate::process::Outcome;

/// How often the worker asks whether anyone watches.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Items a worker sends to the feed a second at most; past it, items are skipped and counted.
pub const MAX_PER_SECOND: f64 = 200.0;
/// Items waiting for the feed's task; past it, an item is dropped. With events of up to a few
/// tens of KB, this bounds what a stalled feed holds in the worker to some MB.
const BACKLOG: usize = 256;

/// The worker's side of the feed: whether anyone watches, and the way to the feed's task.
pub struct LiveFeed {
    watched: AtomicBool,
    sender: mpsc::Sender<Vec<u8>>,
    receiver: Mutex<Option<mpsc::Receiver<Vec<u8>>>>,
    budget: Mutex<(f64, Instant)>,
    skipped: AtomicU64,
}

impl Default for LiveFeed {
    fn default() -> Self {
        let (sender, receiver) = mpsc::channel(BACKLOG);
        Self {
            watched: AtomicBool::new(false),
            sender,
            receiver: Mutex::new(Some(receiver)),
            budget: Mutex::new((MAX_PER_SECOND, Instant::now())),
            skipped: AtomicU64::new(0),
        }
    }
}

impl LiveFeed {
    /// Whether a viewer watches (as of the last check).
    pub fn is_watched(&self) -> bool {
        self.watched.load(Ordering::Relaxed)
    }

    /// Offers what one delivery came to; nothing is built while nobody watches. Past the rate,
    /// refused events go before valid ones (they are what a viewer looks for).
    pub fn offer(&self, outcome: &Outcome, lane: &'static str) {
        if !self.is_watched() {
            return;
        }
        let all = outcome.invalid.len() + outcome.valid.len();
        let (allowed, mut skipped) = self.take(all);
        let refused = outcome.invalid.iter().map(Err);
        let valid = outcome.valid.iter().map(|event| Ok(event.json()));
        for what in refused.chain(valid).take(allowed) {
            self.send(item(&outcome.meta.source, lane, skipped, what));
            skipped = 0;
        }
    }

    /// Takes up to `wanted` items' places in this second's budget, at one lock per delivery:
    /// how many it got, and the items skipped before them (the rest are skipped now).
    fn take(&self, wanted: usize) -> (usize, u64) {
        let Ok(mut budget) = self.budget.lock() else {
            return (0, 0);
        };
        let (tokens, updated) = &mut *budget;
        let now = Instant::now();
        *tokens = (*tokens
            + now.saturating_duration_since(*updated).as_secs_f64() * MAX_PER_SECOND)
            .min(MAX_PER_SECOND);
        *updated = now;
        let allowed = (tokens.max(0.0).floor() as usize).min(wanted);
        *tokens -= allowed as f64;
        drop(budget);
        let left_out = (wanted - allowed) as u64;
        if left_out > 0 {
            metrics::counter!("worker_live_feed_skipped_total").increment(left_out);
        }
        // The first item sent carries what was skipped before it; what is skipped now waits for
        // the next one.
        if allowed == 0 {
            self.skipped.fetch_add(left_out, Ordering::Relaxed);
            return (0, 0);
        }
        (allowed, self.skipped.swap(left_out, Ordering::Relaxed))
    }

    fn send(&self, item: Vec<u8>) {
        if self.sender.try_send(item).is_err() {
            metrics::counter!("worker_live_feed_dropped_total").increment(1);
        }
    }

    /// Runs the feed's task until `stop`: its own connection, the check every [`CHECK_EVERY`],
    /// and the publishing. Called once per worker.
    pub async fn run(self: Arc<Self>, settings: Settings, stop: CancellationToken) {
        let Some(mut items) = self.receiver.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        let topology = Topology::from_settings(&settings.broker);
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        while !stop.is_cancelled() {
            let session = self.session(&settings, &topology, &mut items, &stop);
            if let Err(error) = session.await {
                tracing::debug!(%error, "the live feed's connection ended");
            }
            self.watched.store(false, Ordering::Relaxed);
            metrics::gauge!("worker_live_feed_viewers").set(0.0);
            tokio::select! {
                () = tokio::time::sleep(backoff.next_delay()) => {}
                () = stop.cancelled() => break,
            }
        }
    }

    async fn session(
        &self,
        settings: &Settings,
        topology: &Topology,
        items: &mut mpsc::Receiver<Vec<u8>>,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let connection = broker::connect(&settings.broker, "worker-live").await?;
        let channel = connection.create_channel().await?;
        let exchange = topology.live_exchange();
        let mut check = tokio::time::interval(CHECK_EVERY);
        let result = loop {
            tokio::select! {
                () = stop.cancelled() => break Ok(()),
                _ = check.tick() => {
                    match tokio::time::timeout(CHECK_EVERY, topology.declare_live(&channel)).await {
                        Ok(Ok(viewers)) => {
                            metrics::gauge!("worker_live_feed_viewers").set(f64::from(viewers));
                            self.watched.store(viewers > 0, Ordering::Relaxed);
                        }
                        Ok(Err(error)) => break Err(error.into()),
                        Err(_) => self.watched.store(false, Ordering::Relaxed),
                    }
                }
                Some(item) = items.recv() => {
                    if !self.is_watched() {
                        continue;
                    }
                    let publish = channel.basic_publish(
                        exchange.as_str().into(),
                        "".into(),
                        BasicPublishOptions::default(),
                        &item,
                        BasicProperties::default().with_content_type("application/json".into()),
                    );
                    match tokio::time::timeout(CHECK_EVERY, publish).await {
                        Ok(Ok(_)) => {
                            metrics::counter!("worker_live_feed_published_total").increment(1);
                        }
                        Ok(Err(error)) => break Err(error.into()),
                        Err(_) => metrics::counter!("worker_live_feed_dropped_total").increment(1),
                    }
                }
            }
        };
        let _ =
            tokio::time::timeout(Duration::from_secs(2), connection.close(200, "".into())).await;
        result
    }
}

/// One item of the feed: `{"source", "lane", "skipped", "valid", "event"}` for a valid event
/// (its JSON as the sinks get it), and for an invalid one also `reason` and `errors`.
fn item(source: &str, lane: &str, skipped: u64, what: Result<&[u8], &InvalidRecord>) -> Vec<u8> {
    let head = serde_json::json!({"source": source, "lane": lane, "skipped": skipped});
    let mut out = serde_json::to_vec(&head).unwrap_or_else(|_| b"{}".to_vec());
    out.pop();
    match what {
        Ok(event) => {
            out.extend_from_slice(b",\"valid\":true,\"event\":");
            out.extend_from_slice(event);
        }
        Err(record) => {
            let rest = serde_json::json!({
                "valid": false,
                "reason": record.reason,
                "errors": record.errors,
                "event": record.event,
                "receivedAt": record.received_at,
            });
            let rest = serde_json::to_vec(&rest).unwrap_or_else(|_| b"{}".to_vec());
            out.push(b',');
            out.extend_from_slice(rest.get(1..).unwrap_or(b"}"));
            return out;
        }
    }
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use ingest_schema::Issue;
    use serde_json::{json, Value};

    use super::*;

    #[test]
    fn an_item_is_one_json_object_for_a_valid_and_an_invalid_event() {
        let valid: Value = serde_json::from_slice(&item(
            "ios",
            "live",
            3,
            Ok(br#"{"type":"track","event":"A"}"#),
        ))
        .expect("json");
        assert_eq!(
            valid,
            json!({"source":"ios","lane":"live","skipped":3,"valid":true,"event":{"type":"track","event":"A"}})
        );
        let record = InvalidRecord {
            reason: "schema",
            errors: vec![Issue {
                pointer: "/properties/price".into(),
                message: "-1 is less than the minimum of 0".into(),
                schema: "product_viewed".into(),
            }],
            event: Some(json!({"type":"track"})),
            raw_base64: Some("c2VjcmV0".into()),
            source: "web".into(),
            request_id: "r".into(),
            received_at: "2026-12-06T10:00:00.000Z".into(),
        };
        let invalid: Value =
            serde_json::from_slice(&item("web", "replay", 0, Err(&record))).expect("json");
        assert_eq!(invalid["valid"], json!(false));
        assert_eq!(invalid["errors"][0]["pointer"], json!("/properties/price"));
        assert_eq!(invalid["lane"], json!("replay"));
        assert!(
            invalid.get("rawBase64").is_none(),
            "a payload's bytes never go out"
        );
    }

    #[test]
    fn the_rate_is_capped_and_what_is_skipped_is_told_with_the_next_item() {
        let feed = LiveFeed::default();
        let (first, before) = feed.take(150);
        assert_eq!((first, before), (150, 0));
        // 50 places left this moment: 50 of 80 go, 30 are skipped.
        let (second, before) = feed.take(80);
        assert!((50..=52).contains(&second), "{second}");
        assert_eq!(before, 0);
        let (third, _) = feed.take(10);
        assert!(third <= 2, "{third}");
        std::thread::sleep(std::time::Duration::from_millis(100));
        // A tenth of a second later, 20 places: the first item says what was skipped.
        let (fourth, before) = feed.take(5);
        assert_eq!(fourth, 5);
        assert!(before >= 30 + 8, "{before} skipped before");
    }
}
