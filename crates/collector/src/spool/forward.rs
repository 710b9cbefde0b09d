//! The forwarder: publishes what the spool holds, oldest first, with confirms, as soon as the
//! broker takes publishes again, and tells the spool how far the broker has confirmed (a
//! segment is deleted once all of it is). A frame whose publish failed is sent again from there
//! with the ones after it: the broker may then hold a request twice, which the worker's stable
//! ids make harmless.

use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use futures_util::stream::FuturesOrdered;
use futures_util::StreamExt;
use ingest_pipeline::Backoff;
use tokio_util::sync::CancellationToken;

use super::record::{Bad, Reader, Record};
use super::{Chunk, Spool, FORWARD_RETRY};
use crate::publisher::Publisher;

/// Frames read from disk at once, at most: what the forwarder holds in memory is bounded by
/// this many requests (and [`CHUNK_BYTES`], past which no further frame is read).
const CHUNK_RECORDS: usize = 256;
const CHUNK_BYTES: u64 = 4 << 20;
/// How often the forwarder looks whether the broker takes publishes again.
const READY_POLL: Duration = Duration::from_millis(100);

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

/// Forwards until `stop` is cancelled; `window` publishes await their confirms at once.
pub async fn run(spool: Spool, sink: impl Sink, window: usize, stop: CancellationToken) {
    let mut backoff = Backoff::new(FORWARD_RETRY.0, FORWARD_RETRY.1);
    let mut failing = false;
    while !stop.is_cancelled() {
        let (chunk, done) = spool.next_chunk();
        if !done.is_empty() {
            delete(done).await;
        }
        let Some(chunk) = chunk else {
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
            if pause(&mut backoff, &stop).await {
                return;
            }
            continue;
        };
        spool.note_oldest(first.entry.spooled_at_ms);
        while !sink.ready() {
            tokio::select! {
                () = tokio::time::sleep(READY_POLL) => {}
                () = stop.cancelled() => return,
            }
        }
        let (confirmed, bytes, error) = publish_in_order(&sink, &records, window).await;
        let next_oldest = records.get(confirmed).map(|r| r.entry.spooled_at_ms);
        spool.forwarded(&chunk, confirmed as u64, bytes, next_oldest);
        metrics::counter!("collector_spool_forwarded_total").increment(confirmed as u64);
        metrics::counter!("collector_spool_forwarded_bytes_total").increment(bytes);
        if let Some(error) = error {
            if !failing {
                tracing::warn!(%error, "forwarding the spool failed; retrying with backoff");
                failing = true;
            }
            if pause(&mut backoff, &stop).await {
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
            spool.skip_rest(&chunk, bytes, &bad);
        }
    }
}

/// Deletes the files of segments forwarded whole (off the runtime's threads).
async fn delete(paths: Vec<std::path::PathBuf>) {
    let deleted = tokio::task::spawn_blocking(move || {
        for path in paths {
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

/// Sleeps the next backoff delay; `true` when stopped meanwhile.
async fn pause(backoff: &mut Backoff, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(backoff.next_delay()) => false,
        () = stop.cancelled() => true,
    }
}

/// Publishes `records` with up to `window` awaiting confirms, and stops at the first failure:
/// how many were confirmed in order from the first, their bytes, and the failure.
async fn publish_in_order(
    sink: &impl Sink,
    records: &[Record],
    window: usize,
) -> (usize, u64, Option<String>) {
    let mut pending = FuturesOrdered::new();
    let mut next = records.iter();
    let mut confirmed = 0;
    let mut bytes = 0;
    loop {
        while pending.len() < window.max(1) {
            match next.next() {
                Some(record) => pending.push_back(sink.publish(record)),
                None => break,
            }
        }
        match pending.next().await {
            None => break,
            Some(Ok(())) => {
                bytes += records[confirmed].bytes;
                confirmed += 1;
            }
            Some(Err(error)) => return (confirmed, bytes, Some(error)),
        }
    }
    (confirmed, bytes, None)
}

/// The frames of `chunk`, up to [`CHUNK_RECORDS`] or past [`CHUNK_BYTES`], and what ended
/// them early, if anything did. A segment file that is gone is a stretch lost, not a read to
/// try again for ever.
fn read_chunk(chunk: &Chunk) -> (Vec<Record>, Option<Bad>) {
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
                bytes += record.bytes;
                records.push(record);
            }
            Ok(None) => break,
            Err(bad) => return (records, Some(bad)),
        }
    }
    (records, None)
}
