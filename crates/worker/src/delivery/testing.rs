//! For unit tests of the worker's logic without a broker or a store: a sink that answers from
//! a script, and a [`Durable`] store that records what it was given.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use ingest_pipeline::message::{read_attempts, read_batch_key};
use lapin::types::FieldTable;

use super::store::Durable;
use crate::sinks::{Batch, Sink, SinkError};

/// Answers each call with the next scripted result; after the script, with `then`.
pub struct Scripted {
    name: String,
    script: Mutex<VecDeque<Result<(), SinkError>>>,
    then: Option<Result<(), SinkError>>,
    calls: AtomicUsize,
    delivered: Mutex<Vec<String>>,
    delay: Option<std::time::Duration>,
    /// For [`Scripted::per_event`]: the time each event of a batch takes.
    per_event: Option<std::time::Duration>,
}

impl Scripted {
    pub fn new(name: &str, script: VecDeque<Result<(), SinkError>>) -> Self {
        Self {
            name: name.to_owned(),
            script: Mutex::new(script),
            then: Some(Ok(())),
            calls: AtomicUsize::new(0),
            delivered: Mutex::new(Vec::new()),
            delay: None,
            per_event: None,
        }
    }

    /// A store that takes `each` per event of a batch and has the events from the moment it is
    /// called, as a database has an insert it was sent whether or not its caller waits for
    /// the answer: [`Scripted::delivered`] lists them then, even if the call is dropped.
    pub fn per_event(name: &str, each: std::time::Duration) -> Self {
        Self {
            per_event: Some(each),
            ..Self::new(name, VecDeque::new())
        }
    }

    /// Fails every call, retryably.
    pub fn failing(name: &str) -> Self {
        Self {
            then: Some(Err(SinkError::Retryable("scripted failure".into()))),
            ..Self::new(name, VecDeque::new())
        }
    }

    /// Answers `Ok` after `delay`.
    pub fn slow(name: &str, delay: std::time::Duration) -> Self {
        Self {
            delay: Some(delay),
            ..Self::new(name, VecDeque::new())
        }
    }

    /// Never answers.
    pub fn stalled(name: &str) -> Self {
        Self {
            then: None,
            ..Self::new(name, VecDeque::new())
        }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The messageIds of every batch answered `Ok`, in order.
    pub fn delivered(&self) -> Vec<String> {
        self.delivered.lock().map(|d| d.clone()).unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl Sink for Scripted {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, batch: &Batch) -> Result<(), SinkError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(each) = self.per_event {
            self.record(batch);
            let events = u32::try_from(batch.events.len()).unwrap_or(u32::MAX);
            tokio::time::sleep(each.saturating_mul(events)).await;
            return Ok(());
        }
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        let next = self.script.lock().ok().and_then(|mut s| s.pop_front());
        let Some(answer) = next.or_else(|| self.then.clone()) else {
            return std::future::pending().await;
        };
        if answer.is_ok() {
            self.record(batch);
        }
        answer
    }
}

impl Scripted {
    fn record(&self, batch: &Batch) {
        if let Ok(mut delivered) = self.delivered.lock() {
            delivered.extend(batch.events.iter().map(|e| {
                e.fields()
                    .get("messageId")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned()
            }));
        }
    }
}

/// One batch a [`Recorder`] was given.
#[derive(Debug, Clone)]
pub struct Stored {
    pub queue: String,
    pub key: String,
    pub attempts: u32,
    pub message_ids: Vec<String>,
}

/// A durable store that keeps what it is given (or refuses everything).
#[derive(Default)]
pub struct Recorder {
    stored: Mutex<Vec<Stored>>,
    refuse: bool,
}

impl Recorder {
    pub fn refusing() -> Self {
        Self {
            refuse: true,
            ..Self::default()
        }
    }

    pub fn stored(&self) -> Vec<Stored> {
        self.stored.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl Durable for Recorder {
    async fn store(&self, queue: &str, body: &[u8], headers: FieldTable) -> Result<(), String> {
        if self.refuse {
            return Err(format!("{queue} refused the batch"));
        }
        let events: Vec<serde_json::Value> =
            serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let key = read_batch_key(Some(&headers))
            .unwrap_or_default()
            .to_owned();
        let attempts = read_attempts(Some(&headers));
        let message_ids = events
            .iter()
            .map(|e| e["messageId"].as_str().unwrap_or_default().to_owned())
            .collect();
        self.stored.lock().map_err(|e| e.to_string())?.push(Stored {
            queue: queue.to_owned(),
            key,
            attempts,
            message_ids,
        });
        Ok(())
    }
}
