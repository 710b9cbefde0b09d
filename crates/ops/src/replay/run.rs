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
use super::{oldest, ReplayError};

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

/// Sends the plan of `state` from where it stands, saving it as it goes and calling `report`
/// with it and the events per second of this run. Ends past the range, at the archive's end,
/// or when `stop` is cancelled; every publish sent is confirmed (or failed) before it returns.
pub async fn send(
    run: &Run<'_>,
    state: &mut State,
    stop: &CancellationToken,
    mut report: impl FnMut(&State, f64),
) -> Result<Ended, ReplayError> {
    let stream = run.topology.archive();
    run.topology.declare(&run.connection).await?;
    if state.next_offset.is_none() {
        let oldest = oldest(&run.connection, &stream, run.quiet).await?;
        super::refuse_past_retention(state.plan.to, oldest)?;
    }
    let publisher = Publisher::open(run.connection.clone()).await?;
    let channel = run.connection.create_channel().await?;
    channel
        .basic_qos(IN_FLIGHT as u16 * 2, BasicQosOptions::default())
        .await?;
    let mut args = FieldTable::default();
    let offset = match state.next_offset {
        Some(next) => AMQPValue::LongLongInt(i64::try_from(next).unwrap_or(i64::MAX)),
        // The offset by timestamp is in seconds: a second early, then skipped by `received_at`.
        None => AMQPValue::Timestamp(
            u64::try_from(state.plan.from.timestamp().saturating_sub(1)).unwrap_or(0),
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

    let lane = run.topology.replay();
    state.pid = Some(std::process::id());
    let started = Instant::now();
    let events_before = state.events;
    // In the order read: the state's offset moves in that order.
    let mut confirming: FuturesOrdered<Confirming> = FuturesOrdered::new();
    let mut sent_this_run = 0u64;
    let (mut saved, mut reported) = (Instant::now(), Instant::now());
    let mut failed = None;
    let (mut last_read, mut stalls) = (None, 0);
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
            Ok(None) => break Ended::Finished,
            // Quiet: the archive's end, unless requests past the last one read are there (a
            // stream that paused under load): then wait on.
            Err(_) => match last_read {
                Some(read)
                    if last_offset(&run.connection, &stream, run.quiet).await? > Some(read) =>
                {
                    stalls += 1;
                    if stalls >= MAX_STALLS {
                        failed = Some(ReplayError::Stalled(read));
                        break Ended::Stopped;
                    }
                    continue;
                }
                _ => break Ended::Finished,
            },
        };
        stalls = 0;
        delivery.ack(BasicAckOptions::default()).await?;
        let Some(offset) = stream_offset(&delivery) else {
            continue;
        };
        last_read = Some(offset);
        let h = delivery.properties.headers().as_ref();
        let time = header_str(h, headers::RECEIVED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        if time.is_some_and(|t| t > state.plan.to) {
            break Ended::Finished;
        }
        let source = header_str(h, headers::SOURCE).unwrap_or("");
        let taken = time.is_some_and(|t| state.plan.takes(t, source));
        let mut read = Read {
            offset,
            time,
            events: 0,
            sent: taken,
        };
        if !taken {
            confirming.push_back(async move { (read, Ok(())) }.boxed());
        } else {
            read.events = events_in(&delivery.data, is_gzip(&delivery.properties));
            if let Some(rate) = state.plan.rate {
                let due = started + Duration::from_secs_f64(sent_this_run as f64 / rate);
                tokio::select! {
                    () = stop.cancelled() => break Ended::Stopped,
                    () = tokio::time::sleep_until(due.into()) => {}
                }
            }
            sent_this_run += read.events;
            let properties = replay_properties(&delivery.properties, state.plan.sinks.as_deref());
            let (publisher, lane, stop) = (publisher.clone(), lane.clone(), stop.clone());
            let body = delivery.data;
            confirming.push_back(
                async move {
                    let result = publish(&publisher, &lane, &body, &properties, &stop).await;
                    (read, result)
                }
                .boxed(),
            );
        }
        // Settle what is confirmed already, and wait while the window is full.
        while let Some(Some(done)) = match confirming.len() >= IN_FLIGHT {
            true => Some(confirming.next().await),
            false => confirming.next().now_or_never(),
        } {
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
            state.save(run.path)?;
            saved = Instant::now();
        }
        if reported.elapsed() >= run.report_every {
            report(state, per_second(state.events - events_before, started));
            reported = Instant::now();
        }
    };
    let _ = channel.close(200, "".into()).await;
    // Past a failed publish the offset stays put: what follows is sent again on --resume.
    while let Some(done) = confirming.next().await {
        if failed.is_none() {
            failed = settle(state, done).err();
        }
    }
    state.finished = ended == Ended::Finished && failed.is_none();
    state.pid = None;
    state.updated_at = Utc::now();
    state.save(run.path)?;
    report(state, per_second(state.events - events_before, started));
    match failed {
        Some(error) => Err(error),
        None => Ok(ended),
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

/// The offset of the archive's last request: the highest of its last chunk (where a consumer
/// attached at `last` starts).
async fn last_offset(
    connection: &Connection,
    stream: &str,
    quiet: Duration,
) -> Result<Option<u64>, ReplayError> {
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
    let mut last = None;
    // The last chunk comes at once; a short wait past it is enough.
    let wait = quiet.min(Duration::from_millis(500));
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout(wait, consumer.next()).await {
        last = last.max(stream_offset(&delivery));
        delivery.ack(BasicAckOptions::default()).await?;
    }
    let _ = channel.close(200, "".into()).await;
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
}
