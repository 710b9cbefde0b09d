//! Reading the spool back on start: every segment, oldest first, cut at its first torn or
//! corrupt frame; and how far the broker had confirmed each one before the restart, from its
//! progress file (`progress`), so those frames are not forwarded again.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader};
use std::path::Path;

use super::record::{Bad, Reader, Record};
use super::{private, progress, segment_path, sync_dir, Recovered, Segment, State, SUFFIX};

/// Reads every segment back, oldest first. A segment is cut at its first torn or corrupt frame
/// (and the cut made durable); one left empty is deleted. Frames its progress file says the
/// broker confirmed count as forwarded. A progress file without its segment (a crash between
/// the two deletions) is deleted. A read
/// error stops the start instead: what the disk did not give back may still be there.
pub(super) fn recover(dir: &Path) -> io::Result<(State, Recovered)> {
    let mut seqs: BTreeSet<u64> = BTreeSet::new();
    let mut progress_files: BTreeSet<u64> = BTreeSet::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let kind = path.extension().and_then(|e| e.to_str());
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        // Only the names this spool writes: a `5.spool` is someone else's file.
        if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(seq) = stem.parse() else { continue };
        if kind == Some(SUFFIX) {
            seqs.insert(seq);
        } else if kind == Some(progress::SUFFIX) {
            progress_files.insert(seq);
        }
    }
    // A sequence number still named by a progress file is never used again, even if the file
    // outlived its segment and cannot be deleted now.
    let last = seqs.iter().chain(&progress_files).max();
    let mut state = State {
        next_seq: last.map_or(0, |last| last + 1),
        ..State::default()
    };
    let mut recovered = Recovered::default();
    for &seq in &seqs {
        let path = segment_path(dir, seq);
        let file = File::open(&path)?;
        private::tighten(&file, &path)?;
        let size = file.metadata()?.len();
        let confirmed = progress::read(dir, seq);
        let mut reader = Reader::new(BufReader::new(file), size);
        let mut segment = Segment::new(seq);
        let mut first_ms = None;
        let bad = loop {
            match reader.next_record() {
                Ok(Some(Record { entry, bytes, .. })) => {
                    segment.len += bytes;
                    segment.records += 1;
                    // The last frame boundary the progress file vouches for.
                    if segment.len <= confirmed {
                        segment.forwarded = segment.len;
                        segment.forwarded_records = segment.records;
                    } else {
                        first_ms.get_or_insert(entry.spooled_at_ms);
                    }
                }
                Ok(None) => break None,
                Err(Bad::Io(error)) => {
                    return Err(io::Error::other(format!("{}: {error}", path.display())))
                }
                Err(bad) => break Some(bad),
            }
        };
        let len = segment.len;
        if let Some(bad) = bad {
            let file = OpenOptions::new().write(true).open(&path)?;
            file.set_len(len)?;
            file.sync_all()?;
            metrics::counter!("collector_spool_dropped_total", "reason" => bad.kind()).increment(1);
            let what = format!(
                "{}: {bad} at byte {len}; {} bytes dropped",
                path.display(),
                size - len
            );
            tracing::warn!("{what}");
            recovered.dropped.push(what);
        }
        if segment.records == 0 {
            progress::remove(dir, seq)?;
            std::fs::remove_file(&path)?;
            continue;
        }
        segment.persisted = segment.forwarded;
        recovered.segments += 1;
        recovered.records += segment.records - segment.forwarded_records;
        recovered.forwarded += segment.forwarded_records;
        recovered.bytes += len;
        if state.oldest_ms.is_none() {
            state.oldest_ms = first_ms;
        }
        state.segments.push_back(segment);
    }
    for orphan in progress_files.difference(&seqs) {
        // Harmless if it stays: its number is never given to a new segment.
        if let Err(error) = progress::remove(dir, *orphan) {
            tracing::warn!(%error, segment = orphan, "cannot delete a spool progress file left without its segment");
        }
    }
    sync_dir(dir)?;
    Ok((state, recovered))
}
