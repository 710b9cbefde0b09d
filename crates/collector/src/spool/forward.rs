//! The forwarder: publishes what the spool holds, oldest first, with confirms, as soon as the
//! broker takes publishes again, and tells the spool which frames the broker confirmed (a
//! segment is deleted once all of it is).
//!
//! When a publish fails, the publishes in flight beside it are still awaited, and only the
//! frames the broker did not confirm are sent again: a frame confirmed out of order is never
//! published twice by a running collector. How far each segment is confirmed is recorded in its
//! progress file (`progress`) at most every [`PERSIST_EVERY`], and whenever the
//! forwarder pauses or stops, so a restart forwards again at most what was confirmed since.
//! What may still reach the broker twice: a frame whose confirm was lost (the connection died
//! after the broker took it), and after a crash, what was confirmed since the last record of
//! progress. The worker's stable ids make those harmless.

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use ingest_pipeline::Backoff;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::progress::{self, PERSIST_EVERY};
use super::record::{Bad, Reader, Record};
use super::{Spool, FORWARD_RETRY};
use crate::publisher::Publisher;

/// Frames read from disk at once, at most: what the forwarder holds in memory is bounded by
/// this many requests (and [`CHUNK_BYTES`], past which no further frame is read).
const CHUNK_RECORDS: usize = 256;
const CHUNK_BYTES: u64 = 4 << 20;
/// How often the forwarder looks whether the broker takes publishes again.
const READY_POLL: Duration = Duration::from_millis(100);

/// A stretch of one segment that the forwarder is to publish.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub seq: u64,
    pub path: PathBuf,
    pub from: u64,
    pub to: u64,
    /// Offsets of frames in it that the broker has confirmed already: not to be sent again.
    pub confirmed: BTreeSet<u64>,
}

/// A frame the broker confirmed: where it starts in its segment, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmed {
    pub offset: u64,
    pub bytes: u64,
}

/// Where the forwarder sends frames: the broker, or a script in unit tests.
pub trait Sink: Send + Sync {
    /// Whether a publish can succeed now (connected, not blocked).
    fn ready(&self) -> bool;
    /// Publishes one spooled request; `Ok` once the broker confirmed it.
    fn publish(&self, record: &Record) -> impl Future<Output = Result<(), String>> + Send;
}

impl Sink for Publisher {
    fn ready(&self) -> bool {
        self.unready_reason().is_none()
    }

    async fn publish(&self, record: &Record) -> Result<(), String> {
        Publisher::publish(self, &record.body, record.entry.properties())
            .await
            .map_err(|e| e.to_string())
    }
}

/// Forwards until `stop` is cancelled; `window` publishes await their confirms at once. Its
/// progress is recorded on disk before it returns.
pub async fn run(spool: Spool, sink: impl Sink, window: usize, stop: CancellationToken) {
    forward(&spool, sink, window, stop).await;
    persist(&spool).await;
}

async fn forward(spool: &Spool, sink: impl Sink, window: usize, stop: CancellationToken) {
    let mut backoff = Backoff::new(FORWARD_RETRY.0, FORWARD_RETRY.1);
    let mut failing = false;
    let mut persisted_at = Instant::now();
    while !stop.is_cancelled() {
        let (chunk, done) = spool.next_chunk();
        if !done.is_empty() {
            delete(spool.dir().to_owned(), done).await;
        }
        if persisted_at.elapsed() >= PERSIST_EVERY {
            persist(spool).await;
            persisted_at = Instant::now();
        }
        let Some(chunk) = chunk else {
            persist(spool).await;
            tokio::select! {
                () = spool.changed() => continue,
                () = stop.cancelled() => return,
            }
        };
        let reading = chunk.clone();
        let read = tokio::task::spawn_blocking(move || read_chunk(&reading)).await;
        let (records, bad) = match read {
            Ok(read) => read,
            Err(error) => (Vec::new(), Some(Bad::Io(error.to_string()))),
        };
        // A read error is tried again (after forwarding what came before it); a torn or
        // corrupt stretch is given up once what came before it is confirmed.
        let (retry, give_up) = match bad {
            Some(Bad::Io(error)) => (Some(error), None),
            other => (None, other),
        };
        if give_up.is_some() {
            // At once, not after the good frames before it are confirmed (the broker may be
            // away for long): nothing more goes behind a frame a restart would cut at.
            spool.seal(&chunk);
        }
        let Some(first) = records.first() else {
            if let Some(bad) = give_up {
                spool.skip_rest(&chunk, 0, &bad);
                continue;
            }
            // A read error (a stretch that is not empty yields a record or a reason).
            if let Some(error) = retry {
                tracing::error!(%error, segment = chunk.seq, "cannot read the spool; retrying");
            }
            if pause(spool, &mut backoff, &stop).await {
                return;
            }
            continue;
        };
        spool.note_oldest(first.1.entry.spooled_at_ms);
        while !sink.ready() {
            tokio::select! {
                () = tokio::time::sleep(READY_POLL) => {}
                () = stop.cancelled() => return,
            }
        }
        let to_send: Vec<&(u64, Record)> = records
            .iter()
            .filter(|(offset, _)| !chunk.confirmed.contains(offset))
            .collect();
        let (confirmed, error) = publish_window(&sink, &to_send, window).await;
        let done: BTreeSet<u64> = confirmed.iter().map(|c| c.offset).collect();
        let next_oldest = to_send
            .iter()
            .find(|(offset, _)| !done.contains(offset))
            .map(|(_, record)| record.entry.spooled_at_ms);
        spool.forwarded(&chunk, &confirmed, next_oldest);
        let bytes: u64 = confirmed.iter().map(|c| c.bytes).sum();
        metrics::counter!("collector_spool_forwarded_total").increment(confirmed.len() as u64);
        metrics::counter!("collector_spool_forwarded_bytes_total").increment(bytes);
        if let Some(error) = error {
            if !failing {
                tracing::warn!(%error, "forwarding the spool failed; retrying with backoff");
                failing = true;
            }
            if pause(spool, &mut backoff, &stop).await {
                return;
            }
            continue;
        }
        if failing {
            tracing::info!("forwarding the spool again");
            failing = false;
        }
        backoff.reset();
        if let Some(bad) = give_up {
            let read: u64 = records.iter().map(|(_, record)| record.bytes).sum();
            spool.skip_rest(&chunk, read, &bad);
        }
    }
}

/// Records on disk how far each segment is confirmed, where that moved (off the runtime's
/// threads). A failure costs only duplicates after a restart.
async fn persist(spool: &Spool) {
    let progress = spool.unpersisted();
    if progress.is_empty() {
        return;
    }
    let dir = spool.dir().to_owned();
    let written = tokio::task::spawn_blocking(move || {
        progress
            .into_iter()
            .filter(|&(seq, offset)| match progress::write(&dir, seq, offset) {
                Ok(()) => true,
                Err(error) => {
                    tracing::warn!(%error, segment = seq, "cannot record the spool's forwarding progress; a restart would forward that stretch again");
                    false
                }
            })
            .collect::<Vec<_>>()
    })
    .await;
    match written {
        Ok(written) => {
            for (seq, offset) in written {
                spool.persisted(seq, offset);
            }
        }
        Err(error) => tracing::warn!(%error, "recording the spool's forwarding progress failed"),
    }
}

/// Deletes segments forwarded whole, each after its progress file (off the runtime's threads).
async fn delete(dir: PathBuf, seqs: Vec<u64>) {
    let deleted = tokio::task::spawn_blocking(move || {
        for seq in seqs {
            if let Err(error) = progress::remove(&dir, seq) {
                tracing::warn!(%error, segment = seq, "cannot delete a spool progress file");
            }
            let path = super::segment_path(&dir, seq);
            if let Err(error) = std::fs::remove_file(&path) {
                tracing::error!(%error, path = %path.display(), "cannot delete a forwarded spool segment; it will be forwarded again after a restart");
            }
        }
    })
    .await;
    if let Err(error) = deleted {
        tracing::error!(%error, "deleting forwarded spool segments failed");
    }
}

/// Records progress, then sleeps the next backoff delay; `true` when stopped meanwhile.
async fn pause(spool: &Spool, backoff: &mut Backoff, stop: &CancellationToken) -> bool {
    persist(spool).await;
    tokio::select! {
        () = tokio::time::sleep(backoff.next_delay()) => false,
        () = stop.cancelled() => true,
    }
}

/// Publishes `records` (with their offsets) in order, up to `window` awaiting their confirms
/// at once. After the first failure no further frame is sent, but every publish already in
/// flight is awaited: the broker may confirm it, and a confirmed frame must not be sent again.
/// The frames the broker confirmed, and the first failure.
async fn publish_window(
    sink: &impl Sink,
    records: &[&(u64, Record)],
    window: usize,
) -> (Vec<Confirmed>, Option<String>) {
    let mut pending = FuturesUnordered::new();
    let mut next = records.iter();
    let mut confirmed = Vec::with_capacity(records.len());
    let mut failure = None;
    loop {
        while failure.is_none() && pending.len() < window.max(1) {
            let Some(&&(offset, ref record)) = next.next() else {
                break;
            };
            let frame = Confirmed {
                offset,
                bytes: record.bytes,
            };
            pending.push(async move { (frame, sink.publish(record).await) });
        }
        match pending.next().await {
            None => break,
            Some((frame, Ok(()))) => confirmed.push(frame),
            Some((_, Err(error))) => {
                failure.get_or_insert(error);
            }
        }
    }
    (confirmed, failure)
}

/// The frames of `chunk` with their offsets, up to [`CHUNK_RECORDS`] or past [`CHUNK_BYTES`],
/// and what ended them early, if anything did. A segment file that is gone is a stretch lost,
/// not a read to try again for ever.
fn read_chunk(chunk: &Chunk) -> (Vec<(u64, Record)>, Option<Bad>) {
    let opened = std::fs::File::open(&chunk.path).and_then(|mut file| {
        file.seek(SeekFrom::Start(chunk.from))?;
        Ok(file)
    });
    let file = match opened {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return (
                Vec::new(),
                Some(Bad::Corrupt(format!("segment file gone: {error}"))),
            )
        }
        Err(error) => return (Vec::new(), Some(Bad::Io(error.to_string()))),
    };
    let length = chunk.to.saturating_sub(chunk.from);
    let mut reader = Reader::new(std::io::BufReader::new(file.take(length)), length);
    let mut records = Vec::new();
    let mut bytes = 0;
    while records.len() < CHUNK_RECORDS && bytes < CHUNK_BYTES {
        match reader.next_record() {
            Ok(Some(record)) => {
                let offset = chunk.from + bytes;
                bytes += record.bytes;
                records.push((offset, record));
            }
            Ok(None) => break,
            Err(bad) => return (records, Some(bad)),
        }
    }
    (records, None)
}
