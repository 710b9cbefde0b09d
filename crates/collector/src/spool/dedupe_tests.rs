//! The forwarder does not publish again what the broker confirmed: neither the frames in flight
//! beside one that failed, nor, after a crash, the frames its progress file records.

use std::future::Future;

use super::*;

/// A broker stand-in that takes (or refuses) a frame when it is sent and confirms it later, as
/// the raw queue does: `taken` is what the queue got, in order, duplicates included.
#[derive(Clone, Default)]
struct Broker {
    calls: Arc<AtomicUsize>,
    /// These calls are refused (1-based).
    nack: Arc<StdMutex<Vec<usize>>>,
    /// From this call on, every publish is refused (0: never).
    nack_from: Arc<AtomicUsize>,
    taken: Arc<StdMutex<Vec<usize>>>,
}

impl Broker {
    fn nacking(calls: &[usize]) -> Self {
        let broker = Self::default();
        broker.nack.lock().expect("nack").extend_from_slice(calls);
        broker
    }

    fn taken(&self) -> Vec<usize> {
        self.taken.lock().expect("taken").clone()
    }
}

impl Sink for Broker {
    fn ready(&self) -> bool {
        true
    }

    fn publish(&self, record: &Record) -> impl Future<Output = Result<(), String>> + Send {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let from = self.nack_from.load(Ordering::SeqCst);
        let refused = self.nack.lock().expect("nack").contains(&call) || (from > 0 && call >= from);
        if !refused {
            let id = record.entry.request_id.trim_start_matches("req-").parse();
            self.taken
                .lock()
                .expect("taken")
                .push(id.unwrap_or(usize::MAX));
        }
        async move {
            // The confirm comes later: the publishes of a window are all in flight at once.
            tokio::task::yield_now().await;
            if refused {
                Err("nack".to_owned())
            } else {
                Ok(())
            }
        }
    }
}

fn progress_files(dir: &Dir) -> usize {
    std::fs::read_dir(&dir.0)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().and_then(|x| x.to_str()) == Some(progress::SUFFIX))
                .count()
        })
        .unwrap_or(0)
}

/// Forwards with `broker` until the spool is empty and its files are gone.
async fn drain(spool: &Spool, dir: &Dir, broker: &Broker, window: usize) {
    let stop = CancellationToken::new();
    let forwarding = tokio::spawn(forward::run(
        spool.clone(),
        broker.clone(),
        window,
        stop.clone(),
    ));
    wait_for(|| spool.records() == 0 && dir.segments().is_empty()).await;
    stop.cancel();
    forwarding.await.expect("forwarder");
}

#[tokio::test]
async fn a_publish_refused_mid_window_sends_again_only_the_frames_the_broker_did_not_confirm() {
    let dir = Dir::new();
    let s = settings(&dir, 1 << 20, 64 << 10);
    let (spool, _) = open(&s).await;
    fill(&spool, 0..40).await;
    // Eight in flight: the third and the twelfth publish are refused while those after them in
    // their window are confirmed.
    let broker = Broker::nacking(&[3, 12]);
    drain(&spool, &dir, &broker, 8).await;
    let taken = broker.taken();
    let mut unique = taken.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique,
        (0..40).collect::<Vec<_>>(),
        "nothing lost: {taken:?}"
    );
    assert_eq!(
        taken.len(),
        40,
        "the raw queue got a frame twice: {taken:?}"
    );
    assert_eq!(
        progress_files(&dir),
        0,
        "progress files go with their segment"
    );
}

#[tokio::test]
async fn after_a_crash_the_frames_confirmed_before_it_are_not_forwarded_again() {
    let dir = Dir::new();
    let s = settings(&dir, 1 << 20, 64 << 10);
    let (spool, _) = open(&s).await;
    fill(&spool, 0..30).await;
    // The broker takes 12 frames, then refuses every publish: the forwarder pauses, and
    // records its progress before it does.
    let broker = Broker::default();
    broker.nack_from.store(13, Ordering::SeqCst);
    let stop = CancellationToken::new();
    let forwarding = tokio::spawn(forward::run(spool.clone(), broker.clone(), 1, stop.clone()));
    let seq = spool.shared.lock().segments.front().expect("a segment").seq;
    wait_for(|| {
        let state = spool.shared.lock();
        let front = state.segments.front().expect("the segment");
        front.forwarded_records == 12 && progress::read(&dir.0, seq) == front.forwarded
    })
    .await;
    // A crash: the forwarder never gets to stop, the spool is not closed.
    forwarding.abort();
    let _ = forwarding.await;
    drop(spool);
    assert_eq!(broker.taken(), (0..12).collect::<Vec<_>>());

    let (spool, recovered) = open(&s).await;
    assert_eq!((recovered.records, recovered.forwarded), (18, 12));
    assert_eq!(spool.records(), 18);
    let broker = Broker::default();
    drain(&spool, &dir, &broker, 4).await;
    assert_eq!(broker.taken(), (12..30).collect::<Vec<_>>());
    assert_eq!(
        progress_files(&dir),
        0,
        "progress files go with their segment"
    );
}

#[tokio::test]
async fn a_progress_file_left_without_its_segment_is_removed_and_its_number_never_reused() {
    let dir = Dir::new();
    let s = settings(&dir, 1 << 20, 64 << 10);
    let (spool, _) = open(&s).await;
    drop(spool);
    // A crash between deleting a segment and its progress file (as the disk kept them).
    progress::write(&dir.0, 41, 5 * 300).expect("write");
    let (spool, recovered) = open(&s).await;
    assert_eq!(recovered, Recovered::default());
    assert_eq!(progress_files(&dir), 0);
    fill(&spool, 0..5).await;
    let segments = dir.segments();
    assert_eq!(segments.len(), 1);
    assert_eq!(
        segments[0],
        segment_path(&dir.0, 42),
        "after the number it held"
    );
    let broker = Broker::default();
    drain(&spool, &dir, &broker, 4).await;
    assert_eq!(broker.taken(), (0..5).collect::<Vec<_>>());
}
