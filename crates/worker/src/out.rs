//! The worker's way into the broker: its publishing channel, driven by the shared "until
//! taken" loop ([`until_taken`]) with the worker's patient policy. What it publishes (invalid
//! records and their summaries, batches for a sink's queues) holds a raw delivery until the
//! broker has it. A publish that comes back unroutable (a queue deleted under a running
//! worker) declares every queue again before the next try.

use std::sync::Arc;
use std::time::Duration;

use ingest_pipeline::broker::{until_taken, Confirmed, Policy, PublishError, Publisher};
use ingest_pipeline::Topology;
use lapin::types::FieldTable;
use lapin::BasicProperties;

use crate::consume::BROKER_CALL_TIMEOUT;
use crate::delivery::Durable;

pub(crate) struct Out {
    publisher: Publisher,
    connection: Arc<lapin::Connection>,
    topology: Topology,
    sinks: Vec<String>,
    retry_delays: Vec<Duration>,
    last_declared: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    /// How long a confirm may take before it is logged (it is still waited for).
    confirm_timeout: Duration,
}

impl Out {
    pub fn new(
        publisher: Publisher,
        connection: Arc<lapin::Connection>,
        topology: Topology,
        sinks: Vec<String>,
        retry_delays: Vec<Duration>,
        confirm_timeout: Duration,
    ) -> Self {
        Self {
            publisher,
            connection,
            topology,
            sinks,
            retry_delays,
            last_declared: tokio::sync::Mutex::new(None),
            confirm_timeout,
        }
    }

    pub fn policy(&self) -> Policy {
        Policy::patient(self.confirm_timeout)
    }

    /// Declares every queue again, at most once a second however many tasks ask.
    async fn redeclare(&self) {
        let mut last = self.last_declared.lock().await;
        if last.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(tokio::time::Instant::now());
        let declared = tokio::time::timeout(
            BROKER_CALL_TIMEOUT,
            self.topology
                .declare_sinks(&self.connection, &self.sinks, &self.retry_delays),
        )
        .await;
        match declared {
            Ok(Ok(())) => tracing::info!("declared the queues again"),
            Ok(Err(error)) => tracing::warn!(%error, "declaring the queues again failed"),
            Err(_) => tracing::warn!("declaring the queues again timed out"),
        }
    }
}

#[async_trait::async_trait]
impl Confirmed for Out {
    async fn publish_once(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: &BasicProperties,
        patience: Duration,
    ) -> Result<(), PublishError> {
        self.publisher
            .publish_and_wait(exchange, routing_key, body, properties, patience)
            .await
    }

    async fn returned(&self, queue: &str) {
        metrics::counter!("worker_publish_returned_total", "target" => queue.to_owned())
            .increment(1);
        tracing::warn!(
            queue,
            "the broker could not route a publish; declaring the queues again"
        );
        self.redeclare().await;
    }

    fn nacked(&self, queue: &str) {
        metrics::counter!("worker_publish_nacked_total", "target" => queue.to_owned()).increment(1);
    }
}

impl crate::invalid_publish::Target for Out {
    fn queue(&self) -> String {
        self.topology.invalid()
    }

    fn policy(&self) -> Policy {
        Out::policy(self)
    }
}

#[async_trait::async_trait]
impl Durable for Out {
    async fn store(&self, queue: &str, body: &[u8], headers: FieldTable) -> Result<(), String> {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_headers(headers);
        until_taken(self, "", queue, body, properties, &self.policy())
            .await
            .map_err(|error| format!("{queue} did not take the batch: {error}"))
    }
}
