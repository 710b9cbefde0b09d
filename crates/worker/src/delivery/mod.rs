//! Everything about delivering valid events to a sink, and what happens when a sink does not
//! take them. Read in this order:
//!
//! - [`fanout`]: the happy path. A delivery's valid events go to every sink in this process,
//!   each sink through its own lane (a bounded queue of jobs and a batcher), so a slow sink
//!   never holds back another.
//! - [`split`]: what a sink is given is cut into batches within its limits, and a batch the
//!   sink refuses is split so one bad event never takes its neighbours with it.
//! - [`settle`]: the one decision for a batch, the same on every path. [`SinkRunner::attempt`]
//!   calls the sink (inline retries, the [`breaker`], a time bound); [`settle::decide`] turns
//!   the result into a [`settle::Decision`] (delivered, spilled, delayed, dead-lettered). No
//!   I/O but the sink's call: its unit tests use the in-memory sink and store of [`testing`].
//!   Each successful call feeds the sink's [`pace`], which sizes the happy path's batches to
//!   what the sink takes within half its `spill_after_ms`.
//! - [`store`]: [`SinkRunner::place`] carries the decision out, placing a batch into one of
//!   the sink's queues (its own queue, a delay tier, its dead-letter queue), confirmed by the
//!   broker ([`Durable`]).
//! - [`runner`]: the sink's own queue, consumed beside the raw queue: spilled batches, and
//!   retried ones coming back from the delay queues, go through the same decision.
//! - [`testing`] (unit tests only): a scripted sink and a recording store.
//!
//! The sink queues' names and arguments are declared with the rest of the topology
//! (`ingest_pipeline::broker::Topology::declare_sinks`); a sink's delivery settings (batch
//! size, retries, breaker, delays) are read with the other settings
//! (`ingest_pipeline::settings::sinks`).

pub mod breaker;
pub mod fanout;
pub mod pace;
pub mod runner;
pub mod settle;
pub mod split;
pub mod store;
#[cfg(test)]
pub mod testing;

pub use settle::SinkRunner;
pub use store::Durable;
