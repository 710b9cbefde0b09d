//! Gathers valid documents from many deliveries into one `insert_many`, bounded by count and by
//! a linger time, and tells each delivery's task how its documents fared. A failed write is
//! retried with backoff (the CPU sleeps) a bounded number of times, then reported as failed so
//! the deliveries go back to the queue.

use std::time::Duration;

use bson::Document;
use ingest_pipeline::Backoff;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::sinks::mongo::MongoSink;
use crate::sinks::SinkError;

struct Job {
    documents: Vec<Document>,
    done: oneshot::Sender<Result<(), SinkError>>,
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
    /// Resolves once the documents are written (or known not to be).
    pub async fn write(&self, documents: Vec<Document>) -> Result<(), SinkError> {
        if documents.is_empty() {
            return Ok(());
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
        let mut count = first.documents.len();
        let mut jobs = vec![first];
        let deadline = Instant::now() + config.linger;
        while count < config.max_events {
            tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => {
                        count += job.documents.len();
                        jobs.push(job);
                    }
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        let documents: Vec<Document> = jobs
            .iter()
            .flat_map(|j| j.documents.iter().cloned())
            .collect();
        let result = write_with_retry(&sink, &documents, &config, &abandon).await;
        tracing::debug!(
            events = documents.len(),
            deliveries = jobs.len(),
            ok = result.is_ok(),
            "batch written"
        );
        for job in jobs {
            let _ = job.done.send(result.clone());
        }
    }
}

async fn write_with_retry(
    sink: &MongoSink,
    documents: &[Document],
    config: &BatchConfig,
    abandon: &CancellationToken,
) -> Result<(), SinkError> {
    let mut backoff = Backoff::new(config.retry_min, config.retry_max);
    loop {
        match sink.write(documents).await {
            Ok(()) => return Ok(()),
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
