//! The benchmark's load generator and bare baselines, as a library so tests (the CI smoke
//! benchmark, the chaos suite) can drive a steady load and read back the messageIds of every
//! event that got a 2xx.
//!
//! - [`payload`]: realistic Segment-style mobile batches that pass the sample tracking plan.
//! - [`drive`]: open loop at a scheduled rate (coordinated-omission safe) or closed loop.
//! - [`record`]: HdrHistogram latency, outcomes by status, per-second series, accepted ids.
//! - [`amqp`], [`mongo`]: the bare publisher / consumer / `insert_many` ceilings.
//! - [`bare`]: the bare axum + lapin service the collector is measured against.
//! - [`receiver`], [`proc`], [`plot`]: sink stand-ins, process memory, PNG plots.

pub mod amqp;
pub mod bare;
pub mod drive;
pub mod mongo;
pub mod payload;
pub mod plot;
pub mod proc;
pub mod receiver;
pub mod record;
pub mod stages;
pub mod stages_enrich;

pub use drive::{closed_loop, open_loop, HttpTarget, Schedule, Target};
pub use payload::{Generator, Payload, Shape};
pub use record::{during, recovery, Ended, Outcome, Recorder, Report};
