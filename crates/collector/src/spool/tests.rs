//! The spool on disk: appends, restarts, torn and corrupt frames, the bound in bytes, segment
//! roll-over and deletion, and its files' modes; forwarding with a broker stand-in.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex as StdMutex;

use super::forward::{self, Sink};
use super::record::{self, Entry, Record};
use super::*;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

/// A directory of its own, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("spool-test-{}", uuid::Uuid::new_v4()));
        Self(path)
    }

    fn segments(&self) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&self.0)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        found.retain(|p| p.extension().and_then(|e| e.to_str()) == Some(SUFFIX));
        found.sort();
        found
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn settings(dir: &Dir, max_bytes: u64, segment_bytes: u64) -> SpoolSettings {
    SpoolSettings {
        enabled: true,
        dir: dir.0.clone(),
        max_bytes,
        segment_bytes,
        forward_in_flight: 8,
    }
}

fn entry(id: usize) -> Entry {
    Entry {
        spooled_at_ms: record::now_ms(),
        request_id: format!("req-{id}"),
        received_at: Utc::now(),
        source: "shop-ios".into(),
        endpoint: "track".into(),
        client_ip: None,
        user_agent: None,
        content_type: "application/json".into(),
        gzip: false,
        refused_events: None,
    }
}

fn body(id: usize) -> Vec<u8> {
    format!("{{\"event\":\"e{id}\",\"pad\":\"{}\"}}", "x".repeat(200)).into_bytes()
}

/// Opens the spool, waiting for a previous handle's writer thread to let go of the lock.
async fn open(settings: &SpoolSettings) -> (Spool, Recovered) {
    for _ in 0..100 {
        match Spool::open(settings, 4096) {
            Ok(opened) => return opened,
            Err(SpoolError::Open { reason, .. }) if reason.contains("locked") => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("open: {error}"),
        }
    }
    panic!("the spool stayed locked");
}

async fn fill(spool: &Spool, ids: std::ops::Range<usize>) {
    for id in ids {
        spool.append(&entry(id), &body(id)).await.expect("append");
    }
}

#[tokio::test]
async fn appended_requests_are_read_back_after_a_restart_and_a_second_collector_is_kept_out() {
    let dir = Dir::new();
    let s = settings(&dir, 1 << 20, 64 << 10);
    let (spool, recovered) = open(&s).await;
    assert_eq!(recovered, Recovered::default());
    fill(&spool, 0..10).await;
    assert_eq!(spool.records(), 10);
    match Spool::open(&s, 4096) {
        Err(SpoolError::Open { reason, .. }) => assert!(reason.contains("locked"), "{reason}"),
        other => panic!("a second spool on the same directory: {:?}", other.err()),
    }
    drop(spool);
    let (spool, recovered) = open(&s).await;
    assert_eq!(recovered.records, 10);
    assert!(recovered.dropped.is_empty(), "{:?}", recovered.dropped);
    assert_eq!(spool.records(), 10);
}

#[tokio::test]
async fn a_torn_last_record_is_dropped_on_start_and_every_record_before_it_kept() {
    let dir = Dir::new();
    let s = settings(&dir, 1 << 20, 64 << 10);
    let (spool, _) = open(&s).await;
    fill(&spool, 0..5).await;
    drop(spool);
    // A crash in the middle of the last write: half of its frame made it to disk.
    let segment = dir.segments().pop().expect("a segment");
    let half = record::encode(&entry(5), &body(5)).expect("encode");
    let whole = std::fs::metadata(&segment).expect("size").len();
    let mut file = OpenOptions::new()
        .append(true)
        .open(&segment)
        .expect("segment");
    file.write_all(&half[..half.len() / 2]).expect("torn write");
    drop(file);
    let (spool, recovered) = open(&s).await;
    assert_eq!(recovered.records, 5);
    assert_eq!(recovered.dropped.len(), 1, "{:?}", recovered.dropped);
    assert!(
        recovered.dropped[0].contains("torn"),
        "{:?}",
        recovered.dropped
    );
    assert_eq!(
        std::fs::metadata(&segment).expect("size").len(),
        whole,
        "the torn tail is cut off the file"
    );
    // What comes after goes to a new segment, and all of it is forwarded.
    fill(&spool, 6..8).await;
    let sink = Script::default();
    forward_all(&spool, &sink, 7).await;
    assert_eq!(sink.ids(), [0, 1, 2, 3, 4, 6, 7]);
}

#[tokio::test]
async fn a_corrupted_record_is_dropped_with_what_follows_it_in_its_segment_and_not_before() {
    let dir = Dir::new();
    let s = settings(&dir, 1 << 20, 64 << 10);
    let (spool, _) = open(&s).await;
    fill(&spool, 0..4).await;
    drop(spool);
    let segment = dir.segments().pop().expect("a segment");
    let mut bytes = std::fs::read(&segment).expect("read");
    let frame = record::encode(&entry(0), &body(0)).expect("encode").len();
    // A byte of the third record's body, flipped on disk.
    let at = 2 * frame + frame - 10;
    bytes[at] ^= 0x01;
    std::fs::write(&segment, &bytes).expect("write");
    let (spool, recovered) = open(&s).await;
    assert_eq!(recovered.records, 2);
    assert!(
        recovered.dropped[0].contains("corrupt"),
        "{:?}",
        recovered.dropped
    );
    let sink = Script::default();
    forward_all(&spool, &sink, 2).await;
    assert_eq!(sink.ids(), [0, 1]);
}

#[tokio::test]
async fn a_full_spool_refuses_and_has_room_again_once_forwarded() {
    let dir = Dir::new();
    let max_bytes = 64 << 10;
    let s = settings(&dir, max_bytes, max_bytes);
    let (spool, _) = open(&s).await;
    assert!(spool.has_room());
    let (mut taken, mut used) = (0, 0);
    let size = |id| record::encode(&entry(id), &body(id)).expect("encode").len() as u64;
    let refused = loop {
        match spool.append(&entry(taken), &body(taken)).await {
            Ok(()) => {
                used += size(taken);
                taken += 1;
            }
            Err(error) => break error,
        }
    };
    assert!(
        matches!(refused, SpoolError::Full { max_bytes: m } if m == max_bytes),
        "{refused:?}"
    );
    assert!(
        used <= max_bytes && used + size(taken) > max_bytes,
        "{taken} frames, {used} bytes"
    );
    assert!(!spool.has_room());
    let sink = Script::default();
    forward_all(&spool, &sink, taken).await;
    assert!(spool.has_room());
    spool.append(&entry(0), &body(0)).await.expect("room again");
}

#[tokio::test]
async fn segments_roll_over_and_each_is_deleted_only_once_all_of_it_is_confirmed() {
    let dir = Dir::new();
    let frame = record::encode(&entry(0), &body(0)).expect("encode").len() as u64;
    let s = settings(&dir, 1 << 20, frame * 3);
    let (spool, _) = open(&s).await;
    fill(&spool, 0..7).await;
    assert_eq!(dir.segments().len(), 3, "3 + 3 + 1 frames");
    // The broker is away: nothing is deleted.
    let sink = Script::default();
    sink.away.store(true, Ordering::SeqCst);
    let stop = CancellationToken::new();
    let forwarding = tokio::spawn(forward::run(spool.clone(), sink.clone(), 2, stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dir.segments().len(), 3);
    assert_eq!(sink.ids(), Vec::<usize>::new());
    // It comes back, and refuses the fifth request once: it is sent again, nothing is lost.
    sink.fail_at.store(5, Ordering::SeqCst);
    sink.away.store(false, Ordering::SeqCst);
    wait_for(|| spool.records() == 0).await;
    wait_for(|| dir.segments().is_empty()).await;
    stop.cancel();
    forwarding.await.expect("forwarder");
    let ids = sink.ids();
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique, (0..7).collect::<Vec<_>>(), "{ids:?}");
    assert_eq!(ids[..4], [0, 1, 2, 3], "in order up to the refusal");
    assert_eq!(spool.shared.lock().bytes(), 0);
}

async fn wait_for(mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not within 5 s");
}

/// Forwards until `expected` records went out and the spool is empty.
async fn forward_all(spool: &Spool, sink: &Script, expected: usize) {
    let stop = CancellationToken::new();
    let forwarding = tokio::spawn(forward::run(spool.clone(), sink.clone(), 4, stop.clone()));
    wait_for(|| sink.ids().len() >= expected && spool.records() == 0).await;
    stop.cancel();
    forwarding.await.expect("forwarder");
}

/// A broker stand-in: records what it confirmed, can be away, and can refuse the n-th publish.
#[derive(Clone, Default)]
struct Script {
    away: Arc<AtomicBool>,
    fail_at: Arc<AtomicUsize>,
    /// Refuses every n-th publish (0: never).
    fail_every: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    confirmed: Arc<StdMutex<Vec<usize>>>,
}

impl Script {
    fn ids(&self) -> Vec<usize> {
        self.confirmed.lock().expect("ids").clone()
    }
}

impl Sink for Script {
    fn ready(&self) -> bool {
        !self.away.load(Ordering::SeqCst)
    }

    async fn publish(&self, record: &Record) -> Result<(), String> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let every = self.fail_every.load(Ordering::SeqCst);
        if call == self.fail_at.load(Ordering::SeqCst) || (every > 0 && call.is_multiple_of(every))
        {
            return Err("nack".into());
        }
        let id = record
            .entry
            .request_id
            .trim_start_matches("req-")
            .parse()
            .map_err(|_| "bad id".to_owned())?;
        self.confirmed.lock().expect("ids").push(id);
        Ok(())
    }
}

/// Requests appending while the forwarder forwards, deletes and the broker refuses now and
/// then: every request is confirmed, and the spool ends empty, its counts at zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_racing_the_forwarder_and_a_flaky_broker_lose_nothing_and_leave_no_count_behind() {
    let dir = Dir::new();
    let frame = record::encode(&entry(0), &body(0)).expect("encode").len() as u64;
    // Small segments: many roll-overs and deletions while appends go on.
    let s = settings(&dir, 64 << 20, frame * 5);
    let (spool, _) = open(&s).await;
    let sink = Script::default();
    sink.fail_every.store(41, Ordering::SeqCst);
    let stop = CancellationToken::new();
    let forwarding = tokio::spawn(forward::run(spool.clone(), sink.clone(), 8, stop.clone()));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let spool = spool.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    let id = w * 1000 + i;
                    spool.append(&entry(id), &body(id)).await.expect("append");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    wait_for(|| spool.records() == 0).await;
    wait_for(|| dir.segments().is_empty()).await;
    stop.cancel();
    forwarding.await.expect("forwarder");
    let mut ids = sink.ids();
    ids.sort_unstable();
    ids.dedup();
    let expected: Vec<usize> = (0..8)
        .flat_map(|w| (0..100).map(move |i| w * 1000 + i))
        .collect();
    assert_eq!(ids, expected);
    assert_eq!(spool.shared.lock().bytes(), 0);
}

/// A frame that goes bad on disk under a running collector: what came before it is forwarded,
/// the stretch after it in its segment is given up and counted out, and the spool goes on.
#[tokio::test]
async fn a_frame_corrupted_under_a_running_spool_costs_its_stretch_and_the_counts_end_at_zero() {
    let dir = Dir::new();
    let s = settings(&dir, 1 << 20, 64 << 10);
    let (spool, _) = open(&s).await;
    fill(&spool, 0..4).await;
    let segment = dir.segments().pop().expect("a segment");
    let frame = record::encode(&entry(0), &body(0)).expect("encode").len();
    let mut bytes = std::fs::read(&segment).expect("read");
    bytes[2 * frame + frame - 10] ^= 0x01;
    std::fs::write(&segment, &bytes).expect("write");
    let sink = Script::default();
    forward_all(&spool, &sink, 2).await;
    assert_eq!(sink.ids(), [0, 1]);
    wait_for(|| dir.segments().is_empty()).await;
    assert_eq!(spool.records(), 0);
    assert_eq!(spool.shared.lock().bytes(), 0);
    // Appends go to a new segment and are forwarded as usual.
    fill(&spool, 10..12).await;
    forward_all(&spool, &sink, 4).await;
    assert_eq!(sink.ids(), [0, 1, 10, 11]);
}

/// The permission bits of `path`, in octal.
#[cfg(unix)]
fn mode(path: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode();
    format!("{:o}", mode & 0o777)
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[cfg(unix)]
#[tokio::test]
async fn spooled_request_bodies_are_readable_by_the_collectors_user_alone_whatever_the_umask() {
    let dir = Dir::new();
    let s = settings(&dir, 1 << 20, 64 << 10);
    let (spool, _) = open(&s).await;
    fill(&spool, 0..3).await;
    assert_eq!(mode(&dir.0), "700", "the spool directory");
    assert_eq!(mode(&dir.0.join("LOCK")), "600", "the lock file");
    let segments = dir.segments();
    assert!(!segments.is_empty());
    for segment in &segments {
        assert_eq!(mode(segment), "600", "{}", segment.display());
    }
}

#[cfg(unix)]
#[tokio::test]
async fn a_spool_an_older_release_left_world_readable_is_made_private_when_opened() {
    let dir = Dir::new();
    let s = settings(&dir, 1 << 20, 64 << 10);
    let (spool, _) = open(&s).await;
    fill(&spool, 0..3).await;
    drop(spool);
    // What the default umask gave before: a world-readable directory and files.
    set_mode(&dir.0, 0o755);
    set_mode(&dir.0.join("LOCK"), 0o644);
    for segment in dir.segments() {
        set_mode(&segment, 0o644);
    }
    let (spool, recovered) = open(&s).await;
    assert_eq!(recovered.records, 3);
    assert_eq!(spool.records(), 3);
    assert_eq!(mode(&dir.0), "700", "the spool directory");
    assert_eq!(mode(&dir.0.join("LOCK")), "600", "the lock file");
    for segment in dir.segments() {
        assert_eq!(mode(&segment), "600", "{}", segment.display());
    }
}

#[path = "dedupe_tests.rs"]
mod dedupe;
