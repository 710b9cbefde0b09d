//! Sinks: where valid events go. Each says whether a failure is worth retrying.

pub mod mongo;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SinkError {
    /// Try again later: the sink is unreachable, overloaded or timed out.
    #[error("retryable: {0}")]
    Retryable(String),
    /// Retrying cannot help: the sink refused these events.
    #[error("permanent: {0}")]
    Permanent(String),
    /// The worker is shutting down; the events stay unacked for the next worker.
    #[error("shutting down")]
    ShuttingDown,
}
