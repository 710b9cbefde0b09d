//! The happy path: a raw delivery's valid events go to every sink in this process, without
//! crossing the broker again. Each sink has a lane: a bounded queue of jobs and a batcher that
//! takes the jobs waiting and delivers them once one of the sink's `max_in_flight` slots is
//! free (so batches grow with load, up to `batch_max_events`, `batch_max_bytes` and what the
//! sink has been taking in half of `spill_after_ms` (its [`pace`](super::pace)); a job larger
//! than that is cut), and answers each job once its own events are in the sink or confirmed
//! into the sink's own queue:
//!
//! - delivered (after inline retries if needed): done;
//! - still failing, circuit open: the batch goes to the sink's delay queue (as the queue path
//!   does), and its runner takes it from there;
//! - not finished within `spill_after_ms` of its oldest job's arrival (waiting for a free
//!   slot included): what is left goes to `<prefix>.sink.<name>`;
//! - refused for good: bisected (`settle::split`), so only the refused events go to the
//!   sink's dead-letter queue, whichever job they came with.
//!
//! So a slow or failing sink holds a raw delivery at most `spill_after_ms` (plus a confirmed
//! publish), never blocks another sink, and a publish into one sink's queue concerns that sink
//! alone.
//!
//! A lane takes replayed events (the replay lane's) only when no live job waits, batches them
//! apart from live ones, and lets them hold at most `max_in_flight - 1` of the sink's slots
//! (at least one): a backfill queued ahead of live events, or holding every slot, would make
//! each live delivery wait for it, and with them the raw consumer's prefetch.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ingest_pipeline::settings::DeliverySettings;
use ingest_pipeline::Topology;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::settle::{
    body_share, json_len, Decision, Outcome, Path, Placed, SinkRunner, BODY_START,
};
use super::split::Part;
use super::store::Durable;
use crate::sinks::Event;

/// Jobs waiting per sink beyond those being delivered; with the raw prefetch this bounds
/// memory (a full lane makes deliveries wait, which stops the consumer at its prefetch).
const LANE_DEPTH: usize = 1024;

struct Job {
    events: Vec<Arc<Event>>,
    /// Each event's size in a JSON body.
    sizes: Vec<usize>,
    /// When the job entered the lane: `spill_after_ms` counts from here, waiting for a slot
    /// included.
    at: Instant,
    done: Answer,
}

/// Where a job's answer goes: `Ok` once its events are in the sink or in one of its queues.
type Answer = oneshot::Sender<Result<(), String>>;

/// Jobs delivered together: their events end to end, and where each job's are.
struct Group {
    events: Vec<Arc<Event>>,
    sizes: Vec<usize>,
    /// The body the events make.
    bytes: usize,
    dones: Vec<(Range<usize>, Answer)>,
}

impl Group {
    fn new(job: Job) -> Self {
        let mut group = Self {
            events: Vec::new(),
            sizes: Vec::new(),
            bytes: BODY_START,
            dones: Vec::new(),
        };
        group.push(job);
        group
    }

    /// Whether `job` can join without the batch going past `max_events` or the sink's bytes.
    fn fits(&self, job: &Job, max_events: usize, delivery: &DeliverySettings) -> bool {
        self.events.len() + job.events.len() <= max_events
            && self.bytes.saturating_add(body_share(&job.sizes)) <= delivery.batch_max_bytes
    }

    fn push(&mut self, job: Job) {
        let start = self.events.len();
        self.bytes = self.bytes.saturating_add(body_share(&job.sizes));
        self.events.extend(job.events);
        self.sizes.extend(job.sizes);
        self.dones.push((start..self.events.len(), job.done));
    }

    /// Answers each job from what became of its own events.
    fn answer(self, placed: &Placed) {
        for (range, done) in self.dones {
            let _ = done.send(placed.of(&range));
        }
    }
}

/// Hands valid events to every sink's lane.
pub struct Fanout {
    lanes: Vec<Lane>,
}

/// A sink's lane, as the deliveries see it: live jobs, and replayed ones that wait for them.
struct Lane {
    runner: Arc<SinkRunner>,
    live: mpsc::Sender<Job>,
    replayed: mpsc::Sender<Job>,
}

/// A lane's jobs, live ones first; replayed ones only with one of the permits that bound the
/// sink's slots replays may hold.
struct Inbox {
    live: mpsc::Receiver<Job>,
    replayed: mpsc::Receiver<Job>,
    replay_permits: Arc<Semaphore>,
    /// A replayed job that did not fit in the last batch: the next replayed one to go.
    held_replay: Option<Job>,
}

/// A job taken from a lane, and what it may batch with.
struct Next {
    job: Job,
    replayed: bool,
    /// For a replayed job: its hold on the replays' share of the slots.
    permit: Option<OwnedSemaphorePermit>,
}

impl Inbox {
    /// The next job, live first, a replayed one once a replay permit is free; `None` once both
    /// are closed and empty.
    async fn recv(&mut self) -> Option<Next> {
        let live = |job| Next {
            job,
            replayed: false,
            permit: None,
        };
        tokio::select! {
            biased;
            Some(job) = self.live.recv() => Some(live(job)),
            Ok(permit) = self.replay_permits.clone().acquire_owned() => {
                if let Some(job) = self.held_replay.take() {
                    return Some(Next { job, replayed: true, permit: Some(permit) });
                }
                tokio::select! {
                    biased;
                    Some(job) = self.live.recv() => Some(live(job)),
                    Some(job) = self.replayed.recv() => Some(Next { job, replayed: true, permit: Some(permit) }),
                    else => None,
                }
            }
            else => None,
        }
    }

    /// A job of the same kind already waiting, to batch with the first.
    fn try_recv(&mut self, replayed: bool) -> Option<Job> {
        match replayed {
            true => self.replayed.try_recv().ok(),
            false => self.live.try_recv().ok(),
        }
    }
}

impl Fanout {
    /// Starts a batcher per sink; they end once the `Fanout` is dropped and their work is
    /// done, or at once when `stop` is cancelled.
    pub fn start(
        runners: &[Arc<SinkRunner>],
        topology: &Topology,
        out: Arc<dyn Durable>,
        stop: &CancellationToken,
    ) -> (Self, JoinSet<()>) {
        let mut tasks = JoinSet::new();
        let lanes = runners
            .iter()
            .map(|runner| {
                let (live, live_jobs) = mpsc::channel(LANE_DEPTH);
                let (replayed, replayed_jobs) = mpsc::channel(LANE_DEPTH);
                let inbox = Inbox {
                    live: live_jobs,
                    replayed: replayed_jobs,
                    replay_permits: Arc::new(Semaphore::new(
                        runner.delivery.max_in_flight.saturating_sub(1).max(1),
                    )),
                    held_replay: None,
                };
                tasks.spawn(lane(
                    runner.clone(),
                    inbox,
                    topology.clone(),
                    out.clone(),
                    stop.clone(),
                ));
                Lane {
                    runner: runner.clone(),
                    live,
                    replayed,
                }
            })
            .collect();
        (Self { lanes }, tasks)
    }

    /// Gives each sink the events it wants; `Ok` once every sink has them or has them in its
    /// own queue. `Err` means at least one sink has neither: the caller returns the delivery
    /// to its queue (the sinks that had it get it again: at least once).
    pub async fn deliver(&self, events: &[Arc<Event>]) -> Result<(), String> {
        self.send(events, |_| true, false).await
    }

    /// Replayed events to the sinks whose name `to` takes, behind live jobs in each lane.
    pub async fn deliver_replayed(
        &self,
        events: &[Arc<Event>],
        to: impl Fn(&str) -> bool,
    ) -> Result<(), String> {
        self.send(events, to, true).await
    }

    /// Whether a sink of this name is in this process.
    pub fn has(&self, sink: &str) -> bool {
        self.lanes.iter().any(|l| l.runner.sink.name() == sink)
    }

    async fn send(
        &self,
        events: &[Arc<Event>],
        to: impl Fn(&str) -> bool,
        replayed: bool,
    ) -> Result<(), String> {
        let sizes: Vec<usize> = events.iter().map(|e| json_len(e)).collect();
        let mut waiting = Vec::with_capacity(self.lanes.len());
        for Lane {
            runner,
            live,
            replayed: behind,
        } in self.lanes.iter().filter(|l| to(l.runner.sink.name()))
        {
            let lane = if replayed { behind } else { live };
            let (wanted, wanted_sizes): (Vec<Arc<Event>>, Vec<usize>) = events
                .iter()
                .zip(&sizes)
                .filter(|(e, _)| runner.delivery.wants(e.get_str("type"), e.get_str("event")))
                .map(|(e, size)| (e.clone(), *size))
                .unzip();
            if wanted.len() < events.len() {
                runner.count(Outcome::FilteredOut, events.len() - wanted.len());
            }
            if wanted.is_empty() {
                continue;
            }
            let (done, answer) = oneshot::channel();
            let job = Job {
                events: wanted,
                sizes: wanted_sizes,
                at: Instant::now(),
                done,
            };
            lane.send(job)
                .await
                .map_err(|_| format!("sink {} is stopping", runner.sink.name()))?;
            waiting.push((runner.sink.name(), answer));
        }
        for (name, answer) in waiting {
            match answer.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(format!("sink {name}: {error}")),
                Err(_) => return Err(format!("sink {name} stopped before answering")),
            }
        }
        Ok(())
    }
}

/// One sink's batcher. Once a slot is free for the oldest waiting job, a batch is that job and
/// whatever else waits behind it within the sink's bounds and its pace (a job that would not
/// fit waits for the next batch); it goes to the sink, and to the sink's queue if no slot
/// frees, or the sink does not answer, before the oldest job's `spill_after_ms` is up.
///
/// A sink that just missed that bound is *slow*: from then on a job goes to the sink only if a
/// slot is free at once, alone (a probe), and every other job goes straight to the sink's
/// queue without waiting, so a slow sink costs raw deliveries nothing beyond a publish. The
/// first probe the sink takes within the bound ends it.
async fn lane(
    runner: Arc<SinkRunner>,
    mut jobs: Inbox,
    topology: Topology,
    out: Arc<dyn Durable>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(runner.delivery.max_in_flight));
    let spill_after = Duration::from_millis(runner.delivery.spill_after_ms);
    let slow = Arc::new(AtomicBool::new(false));
    let mut deliveries = JoinSet::new();
    // A job that did not fit in the last batch: the first of the next.
    let mut held: Option<Next> = None;
    loop {
        let next = match held.take() {
            Some(next) if !stop.is_cancelled() => Some(next),
            Some(_) => None,
            None => tokio::select! {
                next = jobs.recv() => next,
                () = stop.cancelled() => None,
            },
        };
        let Some(Next {
            job: first,
            replayed,
            permit,
        }) = next
        else {
            break;
        };
        // A replayed job waits in the lane for live ones by design: its bound counts from now,
        // and what becomes of it never marks the sink slow for live jobs.
        let deadline = match replayed {
            true => Instant::now() + spill_after,
            false => first.at + spill_after,
        };
        // A slot first, then the batch: what arrived meanwhile joins it.
        let (slot, alone) = if slow.load(Ordering::Relaxed) {
            // A probe: only if a slot is free at once, and alone.
            let probe = slots.clone().try_acquire_owned().ok();
            let alone = probe.is_some();
            (probe, alone)
        } else {
            // Past the bound, spill even if a slot is free: the raw delivery has waited enough.
            let slot = tokio::select! {
                biased;
                () = tokio::time::sleep_until(deadline) => None,
                slot = slots.clone().acquire_owned() => slot.ok(),
            };
            (slot, false)
        };
        // To the sink, no more than it has been taking in half the time left before the bound
        // (see `pace`), so that it is not still storing the batch when the batch spills; if
        // not even the oldest job fits, it goes to the sink's queue without being sent.
        let left = deadline.saturating_duration_since(Instant::now());
        let slot = slot.filter(|_| runner.pace.takes_within(first.events.len(), left));
        let room = runner
            .pace
            .batch_cap(left, runner.delivery.batch_max_events);
        let cap = match (&slot, alone) {
            (Some(_), true) => 0,
            (Some(_), false) => room,
            // To the sink's queue: as much as one batch message holds.
            (None, _) => runner.delivery.batch_max_events,
        };
        let mut group = Group::new(first);
        while group.events.len() < cap {
            match jobs.try_recv(replayed) {
                Some(job) if group.fits(&job, cap, &runner.delivery) => group.push(job),
                // A replayed job waits for the replays' share of the slots again; live jobs
                // go before it meanwhile.
                Some(job) if replayed => {
                    jobs.held_replay = Some(job);
                    break;
                }
                Some(job) => {
                    held = Some(Next {
                        job,
                        replayed,
                        permit: None,
                    });
                    break;
                }
                None => break,
            }
        }
        let (runner, topology, out, stop, slow) = (
            runner.clone(),
            topology.clone(),
            out.clone(),
            stop.clone(),
            slow.clone(),
        );
        deliveries.spawn(async move {
            // Held until the batch is placed, as the slot is.
            let _replay_share = permit;
            let parts = match slot {
                Some(_slot) => {
                    let path = Path::InProcess { deadline };
                    let (parts, in_time) = runner
                        .deliver_all(&group.events, &group.sizes, None, 0, path, &stop)
                        .await;
                    if !replayed {
                        slow.store(!in_time, Ordering::Relaxed);
                    }
                    parts
                }
                // No slot in time: the sink is slower than the arrivals.
                None => {
                    if !replayed {
                        slow.store(true, Ordering::Relaxed);
                    }
                    let reason = format!("the sink was busy for spill_after_ms ({spill_after:?})");
                    runner
                        .cut(&group.events, &group.sizes, None)
                        .into_iter()
                        .map(|(range, batch)| Part {
                            range,
                            batch,
                            decision: Decision::Spill {
                                attempts: 0,
                                reason: reason.clone(),
                                sent: false,
                            },
                        })
                        .collect()
                }
            };
            let mut placed = Placed::default();
            for part in parts {
                let result = runner
                    .place(&part.batch, part.decision, &topology, &*out)
                    .await;
                placed.push(part.range, result);
            }
            group.answer(&placed);
        });
        while deliveries.try_join_next().is_some() {}
    }
    while deliveries.join_next().await.is_some() {}
}

#[cfg(test)]
#[path = "fanout/tests.rs"]
mod tests;
