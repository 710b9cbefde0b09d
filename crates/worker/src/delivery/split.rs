//! A sink's batch never mixes what can fail separately. What a sink is given is cut into
//! batches within its `batch_max_events` and `batch_max_bytes` ([`SinkRunner::cut`]), on every
//! path; and when the sink refuses a batch of several events for good, the batch is bisected
//! until the refused events are found ([`SinkRunner::deliver_parts`]): only they are
//! dead-lettered, with the sink's answer to them, while every other part is delivered or, if
//! it fails retryably, takes the retry path alone.
//!
//! Every part travels under a key of its own, made from its events like any batch's, so the
//! same events cut the same way get the same `Idempotency-Key` each time. A batch that needs no
//! cutting keeps the key it came with.
//!
//! Bisection ends: halves strictly shrink, and a single refused event is dead-lettered. It
//! costs at most two calls per level for each refused event, `2·⌈log2 n⌉` for one in `n`.

use std::ops::Range;
use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::settle::{batch_key, decide, Decision, SinkRunner};
use crate::sinks::{Batch, Event, SinkError};

/// The bytes `event` takes in a JSON body.
pub fn json_len(event: &Event) -> usize {
    event.json().len()
}

/// The bytes of a body before its events: a JSON array's `[` (NDJSON has none).
pub const BODY_START: usize = 1;

/// What events of these sizes add to a body: each event and what follows it (`,` or the
/// closing `]`, or a newline). A body is [`BODY_START`] plus the share of its events.
pub fn body_share(sizes: &[usize]) -> usize {
    sizes.iter().fold(0usize, |sum, size| {
        sum.saturating_add(size.saturating_add(1))
    })
}

/// Cuts events of these sizes, in order, into consecutive batches of at most `max_events`
/// whose body is at most `max_bytes`. An event too large for `max_bytes` alone is a batch of
/// its own: the sink answers for it.
pub fn chunks(sizes: &[usize], max_events: usize, max_bytes: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = BODY_START;
    for (i, size) in sizes.iter().enumerate() {
        let add = body_share(std::slice::from_ref(size));
        if i > start && (i - start >= max_events || bytes.saturating_add(add) > max_bytes) {
            out.push(start..i);
            start = i;
            bytes = BODY_START;
        }
        bytes = bytes.saturating_add(add);
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// A part of what a sink was given, and what to do with it.
#[derive(Debug, Clone)]
pub struct Part {
    /// Its events' positions in what the sink was given.
    pub range: Range<usize>,
    pub batch: Batch,
    pub decision: Decision,
}

/// Which path a delivery takes, and so how long it may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// A raw delivery waits for it: past `deadline` (its `spill_after_ms`) what is left goes
    /// to the sink's queue, and an open circuit is not waited for.
    InProcess { deadline: Instant },
    /// From the sink's own queue: nothing else waits, so an open circuit is waited out.
    Queue,
}

/// What became of each part: `Ok` once its events are in the sink or confirmed into one of
/// the sink's queues.
#[derive(Debug, Default)]
pub struct Placed(Vec<(Range<usize>, Result<(), String>)>);

impl Placed {
    pub fn push(&mut self, range: Range<usize>, placed: Result<(), String>) {
        self.0.push((range, placed));
    }

    /// Whether every event in `range` was placed; the first error if not.
    pub fn of(&self, range: &Range<usize>) -> Result<(), String> {
        self.0
            .iter()
            .filter(|(part, _)| part.start < range.end && range.start < part.end)
            .find_map(|(_, placed)| placed.clone().err())
            .map_or(Ok(()), Err)
    }
}

impl SinkRunner {
    /// `events` (with their [`json_len`]s) in batches within the sink's bounds, in order, each
    /// with its key: `key` if one batch holds them all, else one made from its events. What
    /// the sink adds to each event ([`Sink::event_overhead`](crate::sinks::Sink)) counts too.
    pub fn cut(
        &self,
        events: &[Arc<Event>],
        sizes: &[usize],
        key: Option<&str>,
    ) -> Vec<(Range<usize>, Batch)> {
        let overhead = self.sink.event_overhead();
        let sent: Vec<usize> = sizes.iter().map(|s| s.saturating_add(overhead)).collect();
        let ranges = chunks(
            &sent,
            self.delivery.batch_max_events,
            self.delivery.batch_max_bytes,
        );
        let whole = ranges.len() == 1;
        ranges
            .into_iter()
            .map(|range| {
                let part = events[range.clone()].to_vec();
                let key = match key {
                    Some(key) if whole => key.to_owned(),
                    _ => batch_key(self.sink.name(), &part),
                };
                (range, Batch { key, events: part })
            })
            .collect()
    }

    /// Delivers `events` in batches within the sink's bounds, one after the other, bisecting
    /// refused ones: the parts, in order, with their decisions, and whether every batch was
    /// given to the sink in time (see [`Path`]). `attempts`: how often these events failed
    /// before.
    pub async fn deliver_all(
        &self,
        events: &[Arc<Event>],
        sizes: &[usize],
        key: Option<&str>,
        attempts: u32,
        path: Path,
        stop: &CancellationToken,
    ) -> (Vec<Part>, bool) {
        let mut parts = Vec::new();
        let mut in_time = true;
        for (range, batch) in self.cut(events, sizes, key) {
            let (found, on_time) = self.deliver_parts(batch, attempts, path, stop).await;
            in_time &= on_time;
            parts.extend(found.into_iter().map(|mut part| {
                part.range = part.range.start + range.start..part.range.end + range.start;
                part
            }));
        }
        (parts, in_time)
    }

    /// Delivers one batch; if the sink refuses it for good and it holds more than one event,
    /// delivers each half the same way. The parts cover the batch in order; adjacent refused
    /// events with the same answer are dead-lettered together.
    pub async fn deliver_parts(
        &self,
        batch: Batch,
        attempts: u32,
        path: Path,
        stop: &CancellationToken,
    ) -> (Vec<Part>, bool) {
        let mut parts: Vec<Part> = Vec::new();
        let mut in_time = true;
        let mut splits = 0u32;
        // Depth first, left half first: parts come out in order.
        let mut todo = vec![(0..batch.events.len(), batch.key)];
        while let Some((range, key)) = todo.pop() {
            let part = Batch {
                key,
                events: batch.events[range.clone()].to_vec(),
            };
            // `Err(sent)`: out of time, after giving the sink the batch or before.
            let result = match path {
                Path::InProcess { deadline } if Instant::now() >= deadline => Err(false),
                Path::InProcess { deadline } => {
                    let started = Instant::now();
                    let attempt =
                        tokio::time::timeout_at(deadline, self.attempt(&part, false, stop));
                    attempt.await.map_err(|_| {
                        // Not answered by the bound: the sink takes at most this pace.
                        self.pace.record(part.events.len(), started.elapsed());
                        true
                    })
                }
                Path::Queue => Ok(self.attempt(&part, true, stop).await),
            };
            let result = match result {
                Ok(result) => result,
                Err(sent) => {
                    in_time = false;
                    parts.push(self.spill(range, part, attempts, sent));
                    while let Some((range, key)) = todo.pop() {
                        let events = batch.events[range.clone()].to_vec();
                        parts.push(self.spill(range, Batch { key, events }, attempts, false));
                    }
                    break;
                }
            };
            match result {
                Some(Err(SinkError::Permanent(reason))) if range.len() > 1 => {
                    splits += 1;
                    tracing::debug!(sink = self.sink.name(), events = range.len(), %reason, "refused batch bisected");
                    let middle = range.start + range.len() / 2;
                    for half in [middle..range.end, range.start..middle] {
                        let key = batch_key(self.sink.name(), &batch.events[half.clone()]);
                        todo.push((half, key));
                    }
                }
                result => parts.push(Part {
                    range,
                    batch: part,
                    decision: decide(result, attempts, self.max_attempts),
                }),
            }
        }
        if splits > 0 {
            let refused = parts
                .iter()
                .filter(|p| matches!(p.decision, Decision::DeadLetter { .. }))
                .map(|p| p.batch.events.len())
                .sum::<usize>();
            tracing::info!(
                sink = self.sink.name(),
                events = batch.events.len(),
                bisections = splits,
                refused,
                "a refused batch was bisected to its refused events"
            );
        }
        (self.merge_dead_letters(parts), in_time)
    }

    fn spill(&self, range: Range<usize>, batch: Batch, attempts: u32, sent: bool) -> Part {
        let reason = format!(
            "not taken within spill_after_ms ({} ms)",
            self.delivery.spill_after_ms
        );
        Part {
            range,
            batch,
            decision: Decision::Spill {
                attempts,
                reason,
                sent,
            },
        }
    }

    /// Joins adjacent dead letters with the same answer into one part: a sink that refuses
    /// every event of a batch alike fills one dead-letter message, not one per event.
    fn merge_dead_letters(&self, parts: Vec<Part>) -> Vec<Part> {
        let mut out: Vec<(Part, bool)> = Vec::with_capacity(parts.len());
        for part in parts {
            if let Some((last, joined)) = out.last_mut() {
                let alike = matches!(
                    (&last.decision, &part.decision),
                    (
                        Decision::DeadLetter { attempts: a, reason: r },
                        Decision::DeadLetter { attempts: b, reason: s },
                    ) if a == b && r == s
                );
                if alike && last.range.end == part.range.start {
                    last.range.end = part.range.end;
                    last.batch.events.extend(part.batch.events);
                    *joined = true;
                    continue;
                }
            }
            out.push((part, false));
        }
        out.into_iter()
            .map(|(mut part, joined)| {
                if joined {
                    part.batch.key = batch_key(self.sink.name(), &part.batch.events);
                }
                part
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "split/tests.rs"]
mod tests;
