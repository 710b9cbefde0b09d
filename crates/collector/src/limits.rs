//! The size limits a request body is held to (`collector.max_event_bytes`, `max_batch_bytes`,
//! `max_batch_events`, `partial_batches`), shared by the bounded read and the scan.

use ingest_pipeline::message::Endpoint;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_event_bytes: usize,
    pub max_batch_bytes: usize,
    pub max_batch_events: usize,
    /// A batch event too large or not an object is refused alone, the others accepted
    /// (`collector.partial_batches`); otherwise it refuses the whole batch.
    pub partial_batches: bool,
}

impl Limits {
    pub fn for_endpoint(&self, endpoint: Endpoint) -> usize {
        match endpoint {
            Endpoint::Batch => self.max_batch_bytes,
            _ => self.max_event_bytes,
        }
    }
}
