//! Gathers valid documents from many deliveries into one `insert_many`, bounded by count and by
//! a linger time, and tells each delivery's task how its documents fared.
//!
//! A retryable failure is retried with backoff (the CPU sleeps) a bounded number of times, then
//! reported, so the deliveries go back to the queue. A permanent failure (the server refused
//! some documents) is narrowed down document by document, so one bad event does not hold back
//! the others: the refused ones are handed back to their delivery to be kept as invalid.

use std::ops::Range;
use std::time::Duration;

use bson::Document;
use ingest_pipeline::Backoff;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::sinks::mongo::MongoSink;
use crate::sinks::SinkError;

/// A document the database refused for good, with its reason.
pub type Refused = (Document, String);

struct Job {
    documents: Vec<Document>,
    done: oneshot::Sender<Result<Vec<Refused>, SinkError>>,
}

#[derive(Clone)]
pub struct BatcherHandle {
    jobs: mpsc::Sender<Job>,
}

#[derive(Debug, Clone)]
pub struct BatchConfig {
    pub max_events: usize,
    pub linger: Duration,
    pub max_attempts: u32,
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl BatcherHandle {
    /// Resolves once the documents are written, except the refused ones it returns.
    pub async fn write(&self, documents: Vec<Document>) -> Result<Vec<Refused>, SinkError> {
        if documents.is_empty() {
            return Ok(Vec::new());
        }
        let (done, result) = oneshot::channel();
        self.jobs
            .send(Job { documents, done })
            .await
            .map_err(|_| SinkError::ShuttingDown)?;
        result.await.unwrap_or(Err(SinkError::ShuttingDown))
    }
}

/// Starts the batching task. It ends when every handle is dropped, after writing what it holds.
/// `abandon` cancels retries (shutdown), so nothing waits on a dead database forever.
pub fn spawn(
    sink: MongoSink,
    config: BatchConfig,
    abandon: CancellationToken,
) -> (BatcherHandle, tokio::task::JoinHandle<()>) {
    let (jobs, rx) = mpsc::channel(1024);
    let task = tokio::spawn(run(sink, config, abandon, rx));
    (BatcherHandle { jobs }, task)
}

async fn run(
    sink: MongoSink,
    config: BatchConfig,
    abandon: CancellationToken,
    mut rx: mpsc::Receiver<Job>,
) {
    while let Some(first) = rx.recv().await {
        let mut documents = Vec::with_capacity(config.max_events);
        let mut waiting = Vec::new();
        let mut take = |job: Job, documents: &mut Vec<Document>| {
            let start = documents.len();
            documents.extend(job.documents);
            waiting.push((start..documents.len(), job.done));
        };
        take(first, &mut documents);
        let deadline = Instant::now() + config.linger;
        while documents.len() < config.max_events {
            tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => take(job, &mut documents),
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        let result = write_with_retry(&sink, &documents, &config, &abandon).await;
        tracing::debug!(
            events = documents.len(),
            deliveries = waiting.len(),
            ok = result.is_ok(),
            "batch written"
        );
        for (range, done) in waiting {
            let answer = result
                .as_ref()
                .map(|refused| refused_in(&documents, refused, &range))
                .map_err(Clone::clone);
            let _ = done.send(answer);
        }
    }
}

fn refused_in(
    documents: &[Document],
    refused: &[(usize, String)],
    range: &Range<usize>,
) -> Vec<Refused> {
    refused
        .iter()
        .filter(|(index, _)| range.contains(index))
        .filter_map(|(index, reason)| Some((documents.get(*index)?.clone(), reason.clone())))
        .collect()
}

/// Writes the batch; returns the indices of documents refused for good.
async fn write_with_retry(
    sink: &MongoSink,
    documents: &[Document],
    config: &BatchConfig,
    abandon: &CancellationToken,
) -> Result<Vec<(usize, String)>, SinkError> {
    let mut backoff = Backoff::new(config.retry_min, config.retry_max);
    loop {
        let attempt = match sink.write(documents).await {
            Ok(()) => return Ok(Vec::new()),
            Err(SinkError::Permanent(error)) => {
                tracing::warn!(%error, "MongoDB refused documents; finding which");
                one_by_one(sink, documents).await
            }
            Err(other) => Err(other),
        };
        match attempt {
            Ok(refused) => return Ok(refused),
            Err(SinkError::Retryable(error)) if backoff.attempts() + 1 < config.max_attempts => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, ?delay, attempt = backoff.attempts(), "MongoDB write failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = abandon.cancelled() => return Err(SinkError::ShuttingDown),
                }
            }
            Err(error) => {
                tracing::error!(%error, events = documents.len(), "MongoDB write failed; deliveries go back to the queue");
                return Err(error);
            }
        }
    }
}

async fn one_by_one(
    sink: &MongoSink,
    documents: &[Document],
) -> Result<Vec<(usize, String)>, SinkError> {
    let mut refused = Vec::new();
    for (index, document) in documents.iter().enumerate() {
        match sink.write(std::slice::from_ref(document)).await {
            Ok(()) => {}
            Err(SinkError::Permanent(reason)) => refused.push((index, reason)),
            Err(other) => return Err(other),
        }
    }
    Ok(refused)
}
