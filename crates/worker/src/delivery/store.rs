//! Where a batch goes when the sink did not take it: one of the sink's queues, confirmed by the
//! broker. The worker's [`Out`](crate::out::Out) stores through the shared "until taken" loop
//! (`ingest_pipeline::publish::until_taken`): nacks ridden out through a leader election, an
//! unroutable publish answered by declaring the queues again, a late confirm waited for.

use lapin::types::FieldTable;

/// Where batches go when the sink did not take them: a queue that confirms what it holds.
#[async_trait::async_trait]
pub trait Durable: Send + Sync {
    /// Stores `body` (a JSON array of events) in `queue` with the batch's headers; `Ok` once
    /// it is confirmed.
    async fn store(&self, queue: &str, body: &[u8], headers: FieldTable) -> Result<(), String>;
}
