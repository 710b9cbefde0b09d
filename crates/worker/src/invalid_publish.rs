//! Putting a delivery's invalid records into the invalid queue. Repeats are compacted first
//! ([`Compactor`]); each record kept whole is published with confirms. A nack is read as the
//! queue's byte cap (`reject-publish`): after a few tries (one while the queue keeps refusing)
//! the record is counted ([`Overflow`]) and the raw delivery is still acked: its events are
//! invalid anyway, and retrying would hold the raw queue (the delivery would loop until its
//! delivery limit and take its valid neighbours to the raw DLQ). Nothing is dropped silently:
//! the count is a metric, a gauge `ingestctl check --invalid` pages on, and an `overflow`
//! summary record published once the queue has room. Summaries of ended windows are published
//! by [`InvalidQueue::flush`], which the consumer calls every second and once when stopping.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::Utc;
use ingest_pipeline::broker::{until_taken, Confirmed, Policy, PublishError};
use ingest_pipeline::message::invalid_headers;
use ingest_pipeline::settings::InvalidSettings;
use lapin::BasicProperties;

use crate::compact::{Compactor, Summary};
use crate::invalid::{self, InvalidRecord};
use crate::overflow::Overflow;

/// Records published at once per delivery.
const CONCURRENCY: usize = 64;
/// Nacks of one publish before it counts as refused by the cap: with the pauses between them,
/// about 3 s, to ride out a quorum queue's leader election. While the queue keeps refusing, one.
const NACK_ATTEMPTS: u32 = 5;
/// Returns (the queue deleted: declared again each time) before the delivery goes back.
const RETURN_ATTEMPTS: u32 = 10;
/// How often overflow summaries are tried while the queue refuses them.
const OVERFLOW_RETRY: Duration = Duration::from_secs(5);

/// Where the records go: the invalid queue, through the session's publishing channel.
pub(crate) trait Target: Confirmed {
    fn queue(&self) -> String;
    /// How a record is published until the broker takes it (the worker's patient policy).
    fn policy(&self) -> Policy;
}

pub(crate) struct InvalidQueue {
    compactor: Mutex<Compactor>,
    overflow: Mutex<Overflow>,
    /// Summaries the broker did not answer (a lost connection): tried again.
    unsent: Mutex<Vec<Summary>>,
    max_unsent: usize,
    /// The queue refused the last publish: records get one try each until it takes one.
    refusing: AtomicBool,
    overflow_tried: Mutex<Option<Instant>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl InvalidQueue {
    pub fn new(settings: &InvalidSettings) -> Self {
        Self {
            compactor: Mutex::new(Compactor::new(settings)),
            overflow: Mutex::new(Overflow::default()),
            unsent: Mutex::new(Vec::new()),
            max_unsent: settings.max_signatures.saturating_add(1),
            refusing: AtomicBool::new(false),
            overflow_tried: Mutex::new(None),
        }
    }

    /// Compacts `records` and publishes those kept whole. `Err` only when the channel failed:
    /// the delivery goes back to its queue, and what this admission counted is undone.
    pub async fn keep(
        &self,
        target: &dyn Target,
        records: Vec<InvalidRecord>,
    ) -> Result<(), String> {
        if records.is_empty() {
            return Ok(());
        }
        let now = Utc::now();
        let total = records.len();
        let (whole, ticket) = lock(&self.compactor).admit(records, now);
        self.gauges();
        let mut taken = Vec::with_capacity(whole.len());
        for chunk in whole.chunks(CONCURRENCY) {
            let answers = futures_util::future::try_join_all(chunk.iter().map(|record| async {
                let (body, properties) = invalid::message(record).map_err(|e| e.to_string())?;
                self.publish(target, &body, properties).await
            }))
            .await;
            match answers {
                Ok(answers) => taken.extend(answers),
                Err(error) => {
                    lock(&self.compactor).undo(ticket);
                    return Err(error);
                }
            }
        }
        metrics::counter!("worker_invalid_folded_total").increment((total - whole.len()) as u64);
        let refused: Vec<&InvalidRecord> = whole
            .iter()
            .zip(taken)
            .filter_map(|(record, taken)| (!taken).then_some(record))
            .collect();
        if !refused.is_empty() {
            let mut overflow = lock(&self.overflow);
            for record in &refused {
                overflow.add_record(record, now);
            }
            metrics::counter!("worker_invalid_overflow_total").increment(refused.len() as u64);
        }
        self.gauges();
        Ok(())
    }

    /// Publishes the summaries of the windows ended by now (all of them with `everything`, when
    /// stopping), those not answered before, and, every few seconds while there are any, the
    /// overflow summaries. What the queue refuses is counted as overflow; what the broker did
    /// not answer is kept for the next call.
    pub async fn flush(&self, target: &dyn Target, everything: bool) {
        let now = Utc::now();
        let mut summaries = std::mem::take(&mut *lock(&self.unsent));
        summaries.extend(match everything {
            true => lock(&self.compactor).drain(),
            false => lock(&self.compactor).due(now),
        });
        for summary in summaries {
            match self.publish_summary(target, &summary).await {
                Ok(true) => {}
                Ok(false) => {
                    lock(&self.overflow).add_summary(&summary);
                    metrics::counter!("worker_invalid_overflow_total").increment(summary.count);
                }
                Err(error) => {
                    tracing::debug!(%error, "a summary of invalid records waits for the broker");
                    let mut unsent = lock(&self.unsent);
                    if unsent.len() < self.max_unsent {
                        unsent.push(summary);
                    } else {
                        // Bounded: past it, counted like a refusal (one summary per source).
                        lock(&self.overflow).add_summary(&summary);
                    }
                }
            }
        }
        let due = {
            let mut tried = lock(&self.overflow_tried);
            let due = everything || tried.is_none_or(|at| at.elapsed() >= OVERFLOW_RETRY);
            let pending = lock(&self.overflow).pending() > 0;
            if due && pending {
                *tried = Some(Instant::now());
            }
            due && pending
        };
        if due {
            let summaries = lock(&self.overflow).take();
            for summary in summaries {
                match self.publish_summary(target, &summary).await {
                    Ok(true) => {
                        lock(&self.overflow).sent(&summary);
                        tracing::warn!(source = %summary.source, events = summary.count, "invalid events refused at the invalid queue's byte cap are summarised in it");
                    }
                    _ => lock(&self.overflow).restore(&summary),
                }
            }
        }
        self.gauges();
    }

    /// Invalid events counted but not in any summary the queue took (said when stopping).
    pub fn unreported(&self) -> u64 {
        let unsent: u64 = lock(&self.unsent).iter().map(|s| s.count).sum();
        let open = lock(&self.compactor).folded();
        lock(&self.overflow).pending() + unsent + open
    }

    async fn publish_summary(
        &self,
        target: &dyn Target,
        summary: &Summary,
    ) -> Result<bool, String> {
        let body = serde_json::to_vec(summary).map_err(|e| e.to_string())?;
        let headers = invalid_headers(summary.reason, &summary.source, &summary.request_id);
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_headers(headers);
        let taken = self.publish(target, &body, properties).await?;
        if taken {
            metrics::counter!("worker_invalid_summaries_total", "reason" => summary.reason)
                .increment(1);
        }
        Ok(taken)
    }

    /// Publishes until the broker takes it (`true`) or refuses it as the cap does (`false`):
    /// [`NACK_ATTEMPTS`] nacks are ridden out, one while the queue keeps refusing. A late
    /// confirm is waited for, never answered with a second copy; an unroutable publish
    /// declares the queues again first.
    async fn publish(
        &self,
        target: &dyn Target,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<bool, String> {
        let queue = target.queue();
        let nacks = match self.refusing.load(Ordering::Relaxed) {
            true => 1,
            false => NACK_ATTEMPTS,
        };
        let policy = Policy {
            returns: RETURN_ATTEMPTS,
            ..target.policy().with_nacks(nacks)
        };
        match until_taken(target, "", &queue, body, properties, &policy).await {
            Ok(()) => {
                if self.refusing.swap(false, Ordering::Relaxed) {
                    tracing::info!(queue, "the invalid queue takes records again");
                }
                Ok(true)
            }
            Err(PublishError::Nacked) => {
                if !self.refusing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(queue, "the invalid queue refuses records (at its byte cap?): they are counted in worker_invalid_overflow_total and summarised once it has room");
                }
                Ok(false)
            }
            Err(PublishError::Returned) => {
                Err(format!("{queue}: {RETURN_ATTEMPTS} publishes unroutable"))
            }
            Err(error) => Err(format!("{queue}: {error}")),
        }
    }

    fn gauges(&self) {
        let tracked = lock(&self.compactor).tracked();
        metrics::gauge!("worker_invalid_signatures").set(tracked as f64);
        let pending = lock(&self.overflow).pending();
        metrics::gauge!("worker_invalid_overflow_pending").set(pending as f64);
    }
}

#[cfg(test)]
#[path = "invalid_publish/tests.rs"]
mod tests;
