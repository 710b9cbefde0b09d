//! `ingestctl replay`: sends the archived requests of a range to the replay lane
//! (`<prefix>.replay`), each as it was archived (body, properties, headers) and marked as a
//! replay to the plan's sinks ([`mark_from_archive`]). Publishes are confirmed; the state file
//! records the archive offset up to which every request was confirmed or skipped, so a replay
//! killed at any point goes on from there with `--resume` (the few sent after the last save
//! are sent again: the sinks take them once, by `messageId`). A queue at its cap nacks: the
//! replay waits for the workers and sends again.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt as _, StreamExt as _};
use ingest_pipeline::broker::header_str;
use ingest_pipeline::message::{headers, is_gzip, mark_from_archive};
use ingest_pipeline::publish::{PublishError, Publisher};
use ingest_pipeline::Topology;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use tokio_util::sync::CancellationToken;

use super::state::State;
use super::{close_channel, oldest, ReplayError};

/// Publishes awaiting their confirm at once.
const IN_FLIGHT: usize = 256;
/// How often the state file is written.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// A body larger than this once gunzipped counts as one event (the collector's own caps are
/// far below it).
const COUNT_CAP: usize = 64 << 20;
/// The header a stream delivery carries its offset in.
const STREAM_OFFSET: &str = "x-stream-offset";
/// Quiet spells in a row, with requests left to read, before a replay gives up (and can
/// `--resume`).
const MAX_STALLS: u32 = 15;
/// Seconds before `--from` a replay attaches to the archive (the broker's chunk times against
/// the collectors' clocks).
pub(crate) const ATTACH_MARGIN_SECS: i64 = 60;

/// How a replay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Past `to`, or at the archive's end: every request of the range is in the replay lane.
    Finished,
    /// Stopped (Ctrl-C): `--resume` goes on.
    Stopped,
}

/// Where a replay reads, writes and reports.
pub struct Run<'a> {
    pub connection: Arc<Connection>,
    pub topology: &'a Topology,
    /// The state file, written as the replay goes.
    pub path: &'a Path,
    /// How long the archive may give nothing before the read ends (its end reached).
    pub quiet: Duration,
    /// How often `report` is called.
    pub report_every: Duration,
}

/// One archived request read: sent (its publish in flight) or skipped.
struct Read {
    offset: u64,
    time: Option<DateTime<Utc>>,
    events: u64,
    sent: bool,
}

type Confirming = BoxFuture<'static, (Read, Result<(), PublishError>)>;

/// The archive's last request: its offset and, if readable, its receive time.
type Tail = (u64, Option<DateTime<Utc>>);

/// Sends the plan of `state` from where it stands, saving it as it goes and calling `report`
/// with it and the events per second of this run. Ends past the range (a request received
/// after `to + grace`), at the archive's end, or when `stop` is cancelled; every publish sent
/// is confirmed (or failed) before it returns, and the state is saved on every way out.
pub async fn send(
    run: &Run<'_>,
    state: &mut State,
    stop: &CancellationToken,
    mut report: impl FnMut(&State, f64),
) -> Result<Ended, ReplayError> {
    let stream = run.topology.archive();
    let oldest = oldest(&run.connection, &stream, run.quiet).await?;
    if state.next_offset.is_none() {
        super::refuse_past_retention(state.plan.to, oldest)?;
        if state.plan.from < oldest {
            eprintln!("ingestctl: the archive starts at {oldest}: nothing older is kept");
        }
    }
    run.topology.declare_replay(&run.connection).await?;
    let publisher = Publisher::open(run.connection.clone()).await?;
    let channel = run.connection.create_channel().await?;
    channel
        .basic_qos(IN_FLIGHT as u16 * 2, BasicQosOptions::default())
        .await?;
    let mut args = FieldTable::default();
    let offset = match state.next_offset {
        Some(next) => AMQPValue::LongLongInt(i64::try_from(next).unwrap_or(i64::MAX)),
        // A stream attaches by the broker's time of a chunk, in seconds: a margin for the
        // collectors' clocks, then what is earlier is skipped by its `received_at`.
        None => AMQPValue::Timestamp(
            u64::try_from(
                state
                    .plan
                    .from
                    .timestamp()
                    .saturating_sub(ATTACH_MARGIN_SECS),
            )
            .unwrap_or(0),
        ),
    };
    args.insert(STREAM_OFFSET.into(), offset);
    let mut archive = channel
        .basic_consume(
            stream.as_str().into(),
            "ingestctl-replay".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await?;

    state.pid = Some(std::process::id());
    // A failed publish stops the others' waits for a lane at its cap.
    let sending = stop.child_token();
    let mut sender = Sender {
        publisher,
        lane: run.topology.replay(),
        stop: sending.clone(),
        confirming: FuturesOrdered::new(),
        pace: Pace::new(state.plan.rate),
    };
    let started = Instant::now();
    let events_before = state.events;
    let (mut saved, mut reported) = (Instant::now(), Instant::now());
    let mut failed = None;
    let (mut last_read, mut stalls) = (state.next_offset.and_then(|n| n.checked_sub(1)), 0);
    let stop_after = state.plan.to + state.plan.grace();
    let ended = loop {
        let next = tokio::select! {
            () = stop.cancelled() => break Ended::Stopped,
            next = tokio::time::timeout(run.quiet, archive.next()) => next,
        };
        let delivery = match next {
            Ok(Some(Ok(delivery))) => delivery,
            Ok(Some(Err(error))) => {
                failed = Some(ReplayError::Broker(error));
                break Ended::Stopped;
            }
            Ok(None) => {
                failed = Some(ReplayError::ArchiveConsumerEnded);
                break Ended::Stopped;
            }
            // Quiet: the archive's end, unless it holds requests past the last one read (a
            // stream that paused under load): then wait on, a while.
            Err(_) => {
                let tail = tokio::select! {
                    () = stop.cancelled() => break Ended::Stopped,
                    tail = last_request(&run.connection, &stream, run.quiet) => tail,
                };
                match end_reached(tail, last_read, state.plan.from) {
                    Ok(true) => break Ended::Finished,
                    Ok(false) => {
                        stalls += 1;
                        if stalls >= MAX_STALLS {
                            failed = Some(ReplayError::Stalled(last_read));
                            break Ended::Stopped;
                        }
                        continue;
                    }
                    Err(error) => {
                        failed = Some(error);
                        break Ended::Stopped;
                    }
                }
            }
        };
        stalls = 0;
        if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
            failed = Some(ReplayError::Broker(error));
            break Ended::Stopped;
        }
        let Some(offset) = stream_offset(&delivery) else {
            continue;
        };
        last_read = Some(offset);
        let h = delivery.properties.headers().as_ref();
        let time = header_str(h, headers::RECEIVED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        if time.is_some_and(|t| t > stop_after) {
            break Ended::Finished;
        }
        let source = header_str(h, headers::SOURCE).unwrap_or("");
        let read = Read {
            offset,
            time,
            events: 0,
            sent: time.is_some_and(|t| state.plan.takes(t, source)),
        };
        if !sender
            .push(read, delivery, state.plan.sinks.as_deref(), stop)
            .await
        {
            break Ended::Stopped;
        }
        // Settle what is confirmed already, and wait while the window is full.
        while let Some(done) = sender.settled().await {
            if let Err(error) = settle(state, done) {
                failed = Some(error);
                break;
            }
        }
        if failed.is_some() {
            break Ended::Stopped;
        }
        if saved.elapsed() >= SAVE_EVERY {
            state.updated_at = Utc::now();
            if let Err(error) = state.save(run.path) {
                failed = Some(ReplayError::State(error));
                break Ended::Stopped;
            }
            saved = Instant::now();
        }
        if reported.elapsed() >= run.report_every {
            report(state, per_second(state.events - events_before, started));
            reported = Instant::now();
        }
    };
    if failed.is_some() {
        sending.cancel();
    }
    close_channel(&channel).await;
    // Past a publish that did not settle the offset stays put: what follows is sent again on
    // --resume. A nack answered while stopping is such a publish, not a failure.
    let mut halted = failed.is_some();
    while let Some(done) = sender.confirming.next().await {
        if halted {
            continue;
        }
        match settle(state, done) {
            Ok(()) => {}
            Err(ReplayError::Publish(PublishError::Nacked)) if stop.is_cancelled() => halted = true,
            Err(error) => {
                failed = Some(error);
                sending.cancel();
                halted = true;
            }
        }
    }
    state.finished = ended == Ended::Finished && failed.is_none();
    state.pid = None;
    state.updated_at = Utc::now();
    let saved = state.save(run.path);
    report(state, per_second(state.events - events_before, started));
    match (failed, saved) {
        (Some(error), _) => Err(error),
        (None, Err(error)) => Err(ReplayError::State(error)),
        (None, Ok(())) => Ok(ended),
    }
}

/// Whether a quiet archive is at its end: the last request read is its last one, or nothing
/// was read and its last request is older than the range. An archive whose end cannot be read
/// is not taken to be at it.
fn end_reached(
    tail: Result<Option<Tail>, ReplayError>,
    last_read: Option<u64>,
    from: DateTime<Utc>,
) -> Result<bool, ReplayError> {
    Ok(match (tail?, last_read) {
        (Some((tail, _)), Some(read)) => read >= tail,
        (Some((_, Some(time))), None) => time < from,
        _ => false,
    })
}

/// The publishes in flight, in the order read, and the pace they go at.
struct Sender {
    publisher: Publisher,
    lane: String,
    stop: CancellationToken,
    confirming: FuturesOrdered<Confirming>,
    pace: Pace,
}

impl Sender {
    /// Sends `read`'s request (or passes it, when not part of the plan) in its turn; `false`
    /// if `stop` came while it waited for its pace.
    async fn push(
        &mut self,
        mut read: Read,
        delivery: Delivery,
        sinks: Option<&[String]>,
        stop: &CancellationToken,
    ) -> bool {
        if !read.sent {
            self.confirming
                .push_back(async move { (read, Ok(())) }.boxed());
            return true;
        }
        read.events = events_in(&delivery.data, is_gzip(&delivery.properties));
        if let Some(due) = self.pace.next(read.events) {
            tokio::select! {
                () = stop.cancelled() => return false,
                () = tokio::time::sleep_until(due.into()) => {}
            }
        }
        let properties = replay_properties(&delivery.properties, sinks);
        let (publisher, lane, stop) =
            (self.publisher.clone(), self.lane.clone(), self.stop.clone());
        let body = delivery.data;
        self.confirming.push_back(
            async move {
                let result = publish(&publisher, &lane, &body, &properties, &stop).await;
                (read, result)
            }
            .boxed(),
        );
        true
    }

    /// A read settled already, or the oldest one once [`IN_FLIGHT`] are in flight.
    async fn settled(&mut self) -> Option<(Read, Result<(), PublishError>)> {
        match self.confirming.len() >= IN_FLIGHT {
            true => self.confirming.next().await,
            false => self.confirming.next().now_or_never().flatten(),
        }
    }
}

/// The `--rate` ceiling: each request is due once the events before it had their time, and a
/// pause earns no credit (a replay that waited does not burst to catch up).
struct Pace {
    rate: Option<f64>,
    next: Instant,
}

impl Pace {
    fn new(rate: Option<f64>) -> Self {
        Self {
            rate,
            next: Instant::now(),
        }
    }

    /// When a request of `events` may go; `None`: no ceiling.
    fn next(&mut self, events: u64) -> Option<Instant> {
        let rate = self.rate?;
        let due = self.next.max(Instant::now());
        let spacing = Duration::try_from_secs_f64(events as f64 / rate).unwrap_or(Duration::MAX);
        self.next = due.checked_add(spacing).unwrap_or(due);
        Some(due)
    }
}

/// Counts a confirmed (or skipped) read, settled in the order read: the state's offset moves
/// past it. A failed publish leaves the offset where it is.
fn settle(
    state: &mut State,
    (read, result): (Read, Result<(), PublishError>),
) -> Result<(), ReplayError> {
    result.map_err(ReplayError::Publish)?;
    state.next_offset = Some(read.offset + 1);
    if read.sent {
        state.requests += 1;
        state.events += read.events;
    }
    if read.time.is_some() {
        state.reached = read.time;
    }
    Ok(())
}

/// Publishes with a confirm; a nack (the lane at its cap, most often) is waited out and sent
/// again until `stop`.
async fn publish(
    publisher: &Publisher,
    lane: &str,
    body: &[u8],
    properties: &BasicProperties,
    stop: &CancellationToken,
) -> Result<(), PublishError> {
    let mut wait = Duration::from_millis(250);
    loop {
        match publisher
            .publish_and_wait("", lane, body, properties, Duration::from_secs(30))
            .await
        {
            Err(PublishError::Nacked) if !stop.is_cancelled() => {
                static SAID: AtomicBool = AtomicBool::new(false);
                if !SAID.swap(true, Ordering::Relaxed) {
                    eprintln!("ingestctl: the replay lane refuses requests (at its cap, broker.raw_max_length_bytes): waiting for the workers to take some");
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            answer => return answer,
        }
    }
}

/// The archived request's properties, its headers marked as a replay to `sinks` and without
/// the stream's offset.
fn replay_properties(archived: &BasicProperties, sinks: Option<&[String]>) -> BasicProperties {
    let mut table = FieldTable::default();
    if let Some(original) = archived.headers() {
        for (key, value) in original.inner() {
            if key.as_str() != STREAM_OFFSET {
                table.insert(key.clone(), value.clone());
            }
        }
    }
    mark_from_archive(&mut table, Utc::now(), sinks);
    archived.clone().with_headers(table)
}

/// The archive's last request, its offset and receive time: the highest of its last chunk
/// (where a consumer attached at `last` starts), read for at most a second, since requests
/// coming in meanwhile keep the consumer busy.
async fn last_request(
    connection: &Connection,
    stream: &str,
    quiet: Duration,
) -> Result<Option<Tail>, ReplayError> {
    let channel = connection.create_channel().await?;
    channel.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    args.insert(STREAM_OFFSET.into(), AMQPValue::LongString("last".into()));
    let mut consumer = channel
        .basic_consume(
            stream.into(),
            "ingestctl-replay-tail".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await?;
    let mut last: Option<Tail> = None;
    let deadline = Instant::now() + quiet.min(Duration::from_secs(1));
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout_at(deadline.into(), consumer.next()).await
    {
        if let Some(offset) = stream_offset(&delivery) {
            if last.is_none_or(|(o, _)| offset > o) {
                let time = header_str(delivery.properties.headers().as_ref(), headers::RECEIVED_AT)
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&Utc));
                last = Some((offset, time));
            }
        }
        delivery.ack(BasicAckOptions::default()).await?;
    }
    close_channel(&channel).await;
    Ok(last)
}

fn stream_offset(delivery: &Delivery) -> Option<u64> {
    let value = delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(STREAM_OFFSET)?;
    match value {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        _ => None,
    }
}

fn per_second(events: u64, since: Instant) -> f64 {
    let seconds = since.elapsed().as_secs_f64();
    if seconds > 0.0 {
        events as f64 / seconds
    } else {
        0.0
    }
}

/// The events of an archived body: a `batch` array's elements, else one.
pub fn events_in(body: &[u8], gzip: bool) -> u64 {
    #[derive(serde::Deserialize)]
    struct Batch {
        batch: Option<Vec<serde::de::IgnoredAny>>,
    }
    let inflated;
    let text = match gzip {
        true => match ingest_pipeline::gzip::inflate_capped(body, COUNT_CAP) {
            Ok(text) => {
                inflated = text;
                &inflated[..]
            }
            Err(_) => return 1,
        },
        false => body,
    };
    match serde_json::from_slice::<Batch>(text) {
        Ok(Batch {
            batch: Some(events),
        }) => events.len() as u64,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::test_time as at;

    #[test]
    fn events_are_counted_in_batches_gzip_or_not() {
        let batch = br#"{"batch":[{"type":"track"},{"type":"identify"},{}],"context":{}}"#;
        assert_eq!(events_in(batch, false), 3);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, batch).expect("written");
        let gz = gz.finish().expect("finished");
        assert_eq!(events_in(&gz, true), 3);
        assert_eq!(events_in(br#"{"type":"track","event":"x"}"#, false), 1);
        assert_eq!(events_in(b"not json", false), 1);
        assert_eq!(events_in(b"not gzip", true), 1);
    }

    #[test]
    fn a_quiet_archive_is_at_its_end_only_when_nothing_is_left_to_read() {
        let from = at("2026-12-06T10:00:00Z");
        let tail = |offset, time: &str| Ok(Some((offset, Some(at(time)))));
        assert!(end_reached(tail(41, "2026-12-06T11:00:00Z"), Some(41), from).expect("read"));
        assert!(!end_reached(tail(90, "2026-12-06T11:00:00Z"), Some(41), from).expect("read"));
        // Nothing read: at the end only if the last request is older than the range.
        assert!(end_reached(tail(9, "2026-12-06T09:00:00Z"), None, from).expect("read"));
        assert!(!end_reached(tail(9, "2026-12-06T10:30:00Z"), None, from).expect("read"));
        // An end that cannot be read is not the end.
        assert!(!end_reached(Ok(None), Some(41), from).expect("read"));
        assert!(!end_reached(Ok(Some((9, None))), None, from).expect("read"));
        assert!(end_reached(Err(ReplayError::Empty), Some(1), from).is_err());
    }

    #[test]
    fn the_rate_spaces_requests_by_their_events_and_a_pause_earns_no_burst() {
        let mut pace = Pace::new(Some(100.0));
        let first = pace.next(10).expect("paced");
        let second = pace.next(10).expect("paced");
        assert_eq!(second - first, Duration::from_millis(100));
        // Long after its turn, a request goes at once, and the next one a full spacing later.
        pace.next = Instant::now() - Duration::from_secs(60);
        let late = pace.next(50).expect("paced");
        let after = pace.next(1).expect("paced");
        assert!(late + Duration::from_millis(500) <= after);
        assert_eq!(Pace::new(None).next(10), None);
    }

    #[test]
    fn a_failed_publish_leaves_the_offset_where_it_was() {
        let plan = super::super::state::Plan {
            from: at("2026-12-06T10:00:00Z"),
            to: at("2026-12-06T11:00:00Z"),
            sources: vec![],
            sinks: None,
            rate: None,
            grace_secs: 0,
        };
        let mut state = State::new(plan, at("2026-12-06T12:00:00Z"));
        let read = |offset, sent| Read {
            offset,
            time: Some(at("2026-12-06T10:30:00Z")),
            events: 3,
            sent,
        };
        settle(&mut state, (read(7, true), Ok(()))).expect("settled");
        settle(&mut state, (read(8, false), Ok(()))).expect("settled");
        assert_eq!(
            (state.next_offset, state.requests, state.events),
            (Some(9), 1, 3)
        );
        let failed = settle(&mut state, (read(9, true), Err(PublishError::Nacked)));
        assert!(failed.is_err());
        assert_eq!(
            (state.next_offset, state.requests, state.events),
            (Some(9), 1, 3)
        );
    }
}
