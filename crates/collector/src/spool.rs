//! The collector's spool: where a request waits, on this collector's disk, while the broker
//! cannot confirm it.
//!
//! An append-only log of segment files (`<seq>.spool`, in order) in one directory, which a lock
//! file keeps to one collector and its modes (`0700`, files `0600`: module `private`) to the
//! collector's user. Requests hand their frame to one writer thread, which appends what has
//! queued up meanwhile and fsyncs once for all of it (group commit) before any of them is
//! answered (`writer`). The forwarder ([`forward`]) publishes the frames with confirms,
//! oldest first, and a segment is deleted once every frame in it is confirmed. What the broker
//! confirmed is tracked per frame, so a frame is published again only if it was not confirmed;
//! how far each segment is confirmed is also kept on disk (`progress`), so a restart does not
//! forward again what was confirmed before it. On start the directory is read back
//! (`recover`): a torn or corrupt frame and whatever follows it in its segment are dropped (a
//! crash can only tear the last frame, never answered), everything before it that was not
//! confirmed is forwarded. The bytes on disk are bounded by `max_bytes`: past it,
//! [`Spool::append`] refuses and the request gets 503.

pub mod forward;
mod private;
mod progress;
pub mod record;
mod recover;
mod writer;

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ingest_pipeline::settings::SpoolSettings;
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use self::forward::{Chunk, Confirmed};
use self::record::{Bad, Entry};

/// Frames the writer takes in one group, at most (bytes): one write and one fsync.
const GROUP_BYTES: usize = 8 << 20;
/// Bytes of frames waiting for the writer, at most: what a slow disk can make requests hold in
/// memory beside their bodies (a request whose client left no longer holds its body, but its
/// frame waits here until written).
const QUEUED_BYTES: usize = 64 << 20;
const SUFFIX: &str = "spool";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the spool is full ({max_bytes} bytes)")]
    Full { max_bytes: u64 },
    #[error("the spool could not write: {0}")]
    Write(String),
    #[error("the spool's writer has stopped")]
    Stopped,
    #[error("the request is too large for the spool ({bytes} bytes)")]
    TooLarge { bytes: usize },
    #[error("cannot open the spool in {dir}: {reason}")]
    Open { dir: PathBuf, reason: String },
}

impl SpoolError {
    /// For `collector_load_shed_total{reason}`.
    pub fn shed_reason(&self) -> &'static str {
        match self {
            Self::Full { .. } => "spool_full",
            _ => "spool_error",
        }
    }
}

/// A handle on the spool; clones share it.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    appends: mpsc::UnboundedSender<Append>,
    /// Bytes of frames sent to the writer and not yet written ([`QUEUED_BYTES`]).
    queued: Arc<Semaphore>,
}

/// What the writer thread, the forwarder and requests share.
struct Shared {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    /// The largest frame a request can make.
    max_payload: usize,
    state: Mutex<State>,
    /// Raised when frames became durable or the forwarder may delete a segment.
    changed: Notify,
    /// Held while the spool is open: one collector per directory.
    _lock: File,
}

/// A segment file, oldest first in [`State::segments`].
#[derive(Debug)]
struct Segment {
    seq: u64,
    /// Bytes of whole frames, fsync'd.
    len: u64,
    /// Bytes from its start that the broker has confirmed (every frame before it).
    forwarded: u64,
    /// Frames past `forwarded` that the broker confirmed out of order (their offset and size):
    /// the frames that were in flight beside one that failed. They are not published again.
    ahead: BTreeMap<u64, u64>,
    /// How far `forwarded` is recorded in its progress file.
    persisted: u64,
    /// Frames in it, and how many of them the broker has confirmed.
    records: u64,
    forwarded_records: u64,
    /// A stretch of it cannot be read back: nothing more is appended to it, since a restart
    /// cuts a segment at its first bad frame.
    sealed: bool,
}

impl Segment {
    fn new(seq: u64) -> Self {
        Self {
            seq,
            len: 0,
            forwarded: 0,
            ahead: BTreeMap::new(),
            persisted: 0,
            records: 0,
            forwarded_records: 0,
            sealed: false,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    segments: VecDeque<Segment>,
    /// The segment the writer appends to; `None`: the next group opens a new one.
    active: Option<u64>,
    /// The writer is appending to the active segment now (it must not be deleted).
    writing: bool,
    next_seq: u64,
    /// Bytes reserved by appends under way, not yet in a segment's `len`.
    reserved: u64,
    /// When the oldest frame not yet confirmed was spooled (Unix ms), if any.
    oldest_ms: Option<u64>,
}

impl State {
    /// Bytes on disk plus those reserved by appends under way: what `max_bytes` bounds.
    fn bytes(&self) -> u64 {
        self.segments
            .iter()
            .fold(self.reserved, |sum, s| sum.saturating_add(s.len))
    }

    /// Frames not yet confirmed by the broker (those given up as unreadable until their
    /// segment is deleted).
    fn records(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.records.saturating_sub(s.forwarded_records))
            .sum()
    }
}

struct Append {
    frame: Vec<u8>,
    spooled_at_ms: u64,
    done: oneshot::Sender<Result<(), String>>,
    /// Its bytes in the queue to the writer, given back once written.
    _queued: OwnedSemaphorePermit,
}

/// What reading the spool back on start found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub segments: usize,
    /// Frames to forward.
    pub records: u64,
    /// Frames the broker had confirmed before the restart (per the progress files): kept until
    /// their segment is done, not forwarded again.
    pub forwarded: u64,
    pub bytes: u64,
    /// Torn or corrupt frames found, each with whatever followed it in its segment.
    pub dropped: Vec<String>,
}

impl Spool {
    /// Opens (creating it if need be) and recovers the spool in `settings.dir`, and starts its
    /// writer thread. `max_frame_bytes` is the largest frame a request can make
    /// ([`max_frame_bytes`]).
    pub fn open(
        settings: &SpoolSettings,
        max_frame_bytes: usize,
    ) -> Result<(Self, Recovered), SpoolError> {
        let dir = settings.dir.clone();
        let open_error = |reason: String| SpoolError::Open {
            dir: dir.clone(),
            reason,
        };
        private::create_dir(&dir).map_err(|e| open_error(e.to_string()))?;
        let lock_path = dir.join("LOCK");
        let lock = private::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .and_then(|lock| private::tighten(&lock, &lock_path).map(|()| lock))
            .map_err(|e| open_error(e.to_string()))?;
        lock.try_lock().map_err(|e| {
            open_error(format!(
                "it is locked by another process (one collector per spool directory): {e}"
            ))
        })?;
        let max_payload = max_frame_bytes;
        let (state, recovered) = recover::recover(&dir).map_err(|e| open_error(e.to_string()))?;
        let shared = Arc::new(Shared {
            dir,
            max_bytes: settings.max_bytes,
            segment_bytes: settings.segment_bytes,
            max_payload,
            state: Mutex::new(state),
            changed: Notify::new(),
            _lock: lock,
        });
        shared.update_gauges(&shared.lock());
        metrics::gauge!("collector_spool_max_bytes").set(settings.max_bytes as f64);
        let (appends, queued) = mpsc::unbounded_channel();
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer::write_loop(&writer, queued))
            .map_err(|e| SpoolError::Open {
                dir: settings.dir.clone(),
                reason: format!("cannot start the writer thread: {e}"),
            })?;
        let queued = Arc::new(Semaphore::new(QUEUED_BYTES));
        Ok((
            Self {
                shared,
                appends,
                queued,
            },
            recovered,
        ))
    }

    /// Appends a request and returns once it is fsync'd, or why it was not spooled.
    pub async fn append(&self, entry: &Entry, body: &[u8]) -> Result<(), SpoolError> {
        let frame = record::encode(entry, body).map_err(|e| SpoolError::Write(e.to_string()))?;
        let size = frame.len() as u64;
        if frame.len() > self.shared.max_payload {
            return Err(SpoolError::TooLarge { bytes: frame.len() });
        }
        // A frame larger than the whole queue waits for all of it.
        let permits = u32::try_from(frame.len().min(QUEUED_BYTES)).unwrap_or(u32::MAX);
        let queued = self
            .queued
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(|_| SpoolError::Stopped)?;
        {
            let mut state = self.shared.lock();
            if state.bytes().saturating_add(size) > self.shared.max_bytes {
                return Err(SpoolError::Full {
                    max_bytes: self.shared.max_bytes,
                });
            }
            state.reserved += size;
        }
        let (done, written) = oneshot::channel();
        let append = Append {
            frame,
            spooled_at_ms: entry.spooled_at_ms,
            done,
            _queued: queued,
        };
        if self.appends.send(append).is_err() {
            self.shared.release(size);
            return Err(SpoolError::Stopped);
        }
        // The writer releases the reservation itself when a write fails.
        match written.await {
            Ok(Ok(())) => {
                metrics::counter!("collector_spool_appended_total").increment(1);
                Ok(())
            }
            Ok(Err(error)) => Err(SpoolError::Write(error)),
            Err(_) => Err(SpoolError::Stopped),
        }
    }

    /// Whether a request of the largest size would fit now.
    pub fn has_room(&self) -> bool {
        let state = self.shared.lock();
        state.bytes().saturating_add(self.shared.max_payload as u64) <= self.shared.max_bytes
    }

    /// Frames not yet confirmed by the broker.
    pub fn records(&self) -> u64 {
        self.shared.lock().records()
    }

    /// Sets the gauges that move with time alone (the oldest frame's age).
    pub fn refresh_gauges(&self) {
        self.shared.update_gauges(&self.shared.lock());
    }

    /// The next stretch to forward (`None`: nothing now), and the segments forwarded whole,
    /// taken out of the spool's count, for the caller to delete.
    fn next_chunk(&self) -> (Option<Chunk>, Vec<u64>) {
        let shared = &self.shared;
        let mut done = Vec::new();
        let mut state = shared.lock();
        let chunk = loop {
            let Some(front) = state.segments.front() else {
                break None;
            };
            if front.forwarded < front.len {
                break Some(Chunk {
                    seq: front.seq,
                    path: shared.path(front.seq),
                    from: front.forwarded,
                    to: front.len,
                    confirmed: front.ahead.keys().copied().collect(),
                });
            }
            let seq = front.seq;
            if state.active == Some(seq) {
                if state.writing {
                    break None;
                }
                // All forwarded, nothing being written: the next group opens a new segment.
                state.active = None;
            }
            // Its bytes and any frames given up in it (unreadable) leave the counts with it.
            state.segments.pop_front();
            done.push(seq);
            if state.segments.is_empty() {
                state.oldest_ms = None;
            }
        };
        shared.update_gauges(&state);
        (chunk, done)
    }

    /// The broker confirmed these frames of `chunk` (in any order): the segment counts as
    /// forwarded up to the first frame not confirmed, and the others are remembered so that
    /// they are not sent again. `next_oldest_ms`: when the oldest frame still to forward was
    /// spooled, if the chunk holds one.
    fn forwarded(&self, chunk: &Chunk, confirmed: &[Confirmed], next_oldest_ms: Option<u64>) {
        let mut state = self.shared.lock();
        if let Some(segment) = state.segments.iter_mut().find(|s| s.seq == chunk.seq) {
            for frame in confirmed {
                if frame.offset >= segment.forwarded
                    && segment.ahead.insert(frame.offset, frame.bytes).is_none()
                {
                    segment.forwarded_records += 1;
                }
            }
            while let Some(bytes) = segment.ahead.remove(&segment.forwarded) {
                segment.forwarded = (segment.forwarded + bytes).min(segment.len);
            }
        }
        if let Some(oldest) = next_oldest_ms {
            state.oldest_ms = Some(oldest);
        } else if state.records() == 0 {
            state.oldest_ms = None;
        }
        self.shared.update_gauges(&state);
    }

    /// The oldest frame not yet confirmed was spooled at `ms`.
    fn note_oldest(&self, ms: u64) {
        let mut state = self.shared.lock();
        state.oldest_ms = Some(ms);
        self.shared.update_gauges(&state);
    }

    /// A stretch of `chunk`'s segment cannot be read: the writer appends no more to it (what it
    /// appended after the chunk was read is read as usual; a restart would cut it off).
    fn seal(&self, chunk: &Chunk) {
        let mut state = self.shared.lock();
        if let Some(segment) = state.segments.iter_mut().find(|s| s.seq == chunk.seq) {
            segment.sealed = true;
        }
    }

    /// From `chunk.from + good` to the end of `chunk`, its segment cannot be read (disk
    /// corruption): that stretch is given up. The segment was [sealed](Self::seal) when the bad
    /// frame was found. Frames appended before that start at the chunk's end, a frame boundary,
    /// and are forwarded as usual.
    fn skip_rest(&self, chunk: &Chunk, good: u64, bad: &Bad) {
        tracing::error!(segment = chunk.seq, offset = chunk.from + good, until = chunk.to, error = %bad, "spooled records cannot be read back; that stretch of the segment is dropped");
        metrics::counter!("collector_spool_dropped_total", "reason" => bad.kind()).increment(1);
        let mut state = self.shared.lock();
        if let Some(segment) = state.segments.iter_mut().find(|s| s.seq == chunk.seq) {
            // The records lost leave the count when the segment is deleted.
            segment.forwarded = segment.forwarded.max(chunk.to.min(segment.len));
            let forwarded = segment.forwarded;
            segment.ahead.retain(|offset, _| *offset >= forwarded);
        }
        drop(state);
        self.shared.changed.notify_one();
    }

    /// Segments whose confirmed offset moved past what their progress file says.
    fn unpersisted(&self) -> Vec<(u64, u64)> {
        let state = self.shared.lock();
        state
            .segments
            .iter()
            .filter(|s| s.forwarded > s.persisted)
            .map(|s| (s.seq, s.forwarded))
            .collect()
    }

    /// Segment `seq`'s progress file now says `offset`.
    fn persisted(&self, seq: u64, offset: u64) {
        let mut state = self.shared.lock();
        if let Some(segment) = state.segments.iter_mut().find(|s| s.seq == seq) {
            segment.persisted = segment.persisted.max(offset);
        }
    }

    /// Raised when there may be something new to forward.
    async fn changed(&self) {
        self.shared.changed.notified().await;
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding it cannot leave the counts half-updated in a way that matters
        // more than stopping every request would.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn path(&self, seq: u64) -> PathBuf {
        segment_path(&self.dir, seq)
    }

    fn release(&self, bytes: u64) {
        let mut state = self.lock();
        state.reserved = state.reserved.saturating_sub(bytes);
    }

    fn update_gauges(&self, state: &State) {
        metrics::gauge!("collector_spool_bytes").set(state.bytes() as f64);
        metrics::gauge!("collector_spool_records").set(state.records() as f64);
        metrics::gauge!("collector_spool_segments").set(state.segments.len() as f64);
        let age = state
            .oldest_ms
            .map(|oldest| record::now_ms().saturating_sub(oldest) as f64 / 1000.0)
            .unwrap_or(0.0);
        metrics::gauge!("collector_spool_oldest_age_seconds").set(age);
    }
}

/// The largest frame a request can make: its body, and its metadata (a user agent of 512
/// characters, escaped, is at most about 3 KiB; the refused-events header about 32 bytes per
/// event).
pub fn max_frame_bytes(max_body_bytes: usize, max_batch_events: usize) -> usize {
    max_body_bytes
        .saturating_add(16 << 10)
        .saturating_add(max_batch_events.saturating_mul(32))
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.{SUFFIX}"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// How long the forwarder waits between two attempts when publishing fails.
pub const FORWARD_RETRY: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(5));

#[cfg(test)]
mod tests;
