//! The spool's writer thread: takes the frames requests queued up, appends them to the active
//! segment (opening a new one when it is full or was sealed), fsyncs once for the whole group,
//! and only then answers each request (group commit).

use std::fs::File;
use std::io::Write;

use tokio::sync::mpsc;

use super::{private, sync_dir, Append, Segment, Shared, GROUP_BYTES};

/// The writer thread: takes what has queued up, appends it, fsyncs once, answers each.
pub(super) fn write_loop(shared: &Shared, mut queued: mpsc::UnboundedReceiver<Append>) {
    let mut file: Option<(u64, File)> = None;
    while let Some(first) = queued.blocking_recv() {
        let mut group = vec![first];
        let mut bytes = group[0].frame.len();
        while bytes < GROUP_BYTES {
            match queued.try_recv() {
                Ok(append) => {
                    bytes += append.frame.len();
                    group.push(append);
                }
                Err(_) => break,
            }
        }
        let outcome = write_group(shared, &mut file, &group);
        if outcome.is_err() {
            metrics::counter!("collector_spool_write_errors_total").increment(1);
        }
        for append in group {
            let _ = append.done.send(outcome.clone());
        }
    }
}

fn write_group(
    shared: &Shared,
    file: &mut Option<(u64, File)>,
    group: &[Append],
) -> Result<(), String> {
    let size: u64 = group.iter().map(|a| a.frame.len() as u64).sum();
    // Under the lock, only decisions: the file is created and written outside it.
    let (new_seq, start) = {
        let mut state = shared.lock();
        let current = file
            .as_ref()
            .map(|(seq, _)| *seq)
            .filter(|seq| state.active == Some(*seq));
        let current_len = current.and_then(|seq| {
            state
                .segments
                .iter()
                .find(|s| s.seq == seq && !s.sealed)
                .map(|s| s.len)
        });
        let reuse = current_len.is_some_and(|len| len == 0 || len + size <= shared.segment_bytes);
        // While this group is written, the active segment (old or new) is not deleted, and
        // only this thread changes its length.
        state.writing = true;
        match current_len {
            Some(len) if reuse => (None, len),
            _ => {
                state.next_seq += 1;
                (Some(state.next_seq - 1), 0)
            }
        }
    };
    let failed = |error: String, seal: bool| {
        let mut state = shared.lock();
        state.writing = false;
        state.reserved = state.reserved.saturating_sub(size);
        if seal {
            // Start a new segment next time.
            state.active = None;
        }
        drop(state);
        shared.changed.notify_one();
        Err(error)
    };
    if let Some(seq) = new_seq {
        let opened = private::options()
            .create_new(true)
            .append(true)
            .open(shared.path(seq))
            .and_then(|f| sync_dir(&shared.dir).map(|()| f));
        match opened {
            Ok(f) => {
                let mut state = shared.lock();
                state.segments.push_back(Segment::new(seq));
                state.active = Some(seq);
                *file = Some((seq, f));
            }
            Err(error) => return failed(format!("cannot create a segment: {error}"), false),
        }
    }
    let Some((seq, f)) = file.as_mut() else {
        return failed("no segment open".into(), false);
    };
    let seq = *seq;
    let started = std::time::Instant::now();
    let written = group
        .iter()
        .try_for_each(|a| f.write_all(&a.frame))
        .and_then(|()| f.sync_data());
    metrics::histogram!("collector_spool_sync_seconds").record(started.elapsed().as_secs_f64());
    if let Err(error) = written {
        // Cut back what may have been written; a file whose fsync failed is not written again.
        let _ = f.set_len(start);
        *file = None;
        return failed(error.to_string(), true);
    }
    let mut state = shared.lock();
    state.writing = false;
    state.reserved = state.reserved.saturating_sub(size);
    if let Some(segment) = state.segments.iter_mut().find(|s| s.seq == seq) {
        segment.len = start + size;
        segment.records += group.len() as u64;
    }
    if state.oldest_ms.is_none() {
        state.oldest_ms = group.first().map(|a| a.spooled_at_ms);
    }
    shared.update_gauges(&state);
    drop(state);
    shared.changed.notify_one();
    Ok(())
}
