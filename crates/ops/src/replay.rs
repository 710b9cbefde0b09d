//! `ingestctl replay`: the archive stream (`<prefix>.archive`) read by time range. `--dry-run`
//! counts what a replay of the range would send, per source and per hour (here); a replay
//! sends it to the replay lane ([`run`]) and keeps where it stands in a state file
//! ([`state`]). The stream is read from the offset of `--from` (a stream attaches by
//! timestamp at a chunk boundary, so earlier requests can come first: they are skipped by their
//! archived `received_at`), and the read stops at the first request past `--to`, or once the
//! stream has nothing more to give.

pub mod run;
pub mod state;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::StreamExt;
use ingest_pipeline::broker::{header_str, inspect_queue};
use ingest_pipeline::message::headers;
use ingest_pipeline::publish::PublishError;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Connection;

/// A time given on the command line: RFC 3339 (`2026-12-06T10:00:00Z`), `now`, or relative to
/// now, `-` then a whole number and a unit (`s`, `m`, `h`, `d`): `-2h`.
pub fn parse_time(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if text == "now" {
        return Ok(now);
    }
    if let Some(relative) = text.strip_prefix('-') {
        let ago = parse_span(relative).map_err(|e| format!("`{text}`: {e}"))?;
        return now
            .checked_sub_signed(ago)
            .ok_or_else(|| format!("`{text}` is too far back"));
    }
    DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|error| {
            format!("`{text}` is not RFC 3339 (2026-12-06T10:00:00Z) nor relative (-2h): {error}")
        })
}

/// A span of time: a whole number and a unit (`s`, `m`, `h`, `d`): `10m`.
pub fn parse_span(text: &str) -> Result<chrono::TimeDelta, String> {
    let unit_at = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(unit_at);
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err("the unit of a span of time is s, m, h or d (2h)".to_owned()),
    };
    number
        .parse::<i64>()
        .ok()
        .and_then(|n| n.checked_mul(seconds))
        .and_then(chrono::TimeDelta::try_seconds)
        .ok_or_else(|| "not a span of time like 2h".to_owned())
}

/// Requests and their bytes as archived, for one source in one hour.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub requests: u64,
    pub bytes: u64,
}

/// What a replay of a range would send: per (source, hour starting at), in order.
pub type Counts = BTreeMap<(String, String), Tally>;

/// A dry run's answer.
#[derive(Debug)]
pub struct DryRun {
    pub counts: Counts,
    /// The oldest archived request's time, when the range starts before it: nothing older is
    /// in the archive (never archived, or dropped by its retention).
    pub archive_starts: Option<DateTime<Utc>>,
}

/// Why a range cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("there is no archive stream `{0}` (broker.archive is off, or no collector ever declared it)")]
    NoArchive(String),
    #[error("the archive holds nothing yet")]
    Empty,
    #[error("the range ends at {to}, before the oldest archived request ({oldest}): nothing of it is in the archive (its retention, broker.archive.max_age and max_bytes, drops the oldest first)")]
    PastRetention { to: String, oldest: String },
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("sending to the replay lane: {0} (the state file keeps where the replay stands: --resume goes on)")]
    Publish(PublishError),
    #[error("the archive stopped giving requests (last read: offset {0:?}) while it holds later ones: stopped (--resume goes on)")]
    Stalled(Option<u64>),
    #[error("the broker ended the read of the archive (a node restarted, or the stream was deleted): stopped (--resume goes on)")]
    ArchiveConsumerEnded,
    #[error("writing the replay state: {0}")]
    State(#[from] std::io::Error),
}

/// Closes a channel, waiting for the broker's answer a few seconds at most (a close that
/// hangs must not keep a replay from ending).
pub(crate) async fn close_channel(channel: &lapin::Channel) {
    let _ = tokio::time::timeout(Duration::from_secs(5), channel.close(200, "".into())).await;
}

/// The receive time of the oldest archived request.
async fn oldest(
    connection: &Connection,
    stream: &str,
    quiet: Duration,
) -> Result<DateTime<Utc>, ReplayError> {
    if inspect_queue(connection, stream).await?.is_none() {
        return Err(ReplayError::NoArchive(stream.to_owned()));
    }
    read(
        connection,
        stream,
        AMQPValue::LongString("first".into()),
        quiet,
        |time, _, _| (Some(time), false),
    )
    .await?
    .ok_or(ReplayError::Empty)
}

/// A range that ends before the oldest archived request has nothing to read.
fn refuse_past_retention(to: DateTime<Utc>, oldest: DateTime<Utc>) -> Result<(), ReplayError> {
    match to < oldest {
        true => Err(ReplayError::PastRetention {
            to: to.to_rfc3339_opts(SecondsFormat::Secs, true),
            oldest: oldest.to_rfc3339_opts(SecondsFormat::Millis, true),
        }),
        false => Ok(()),
    }
}

/// Counts the archived requests received in `[from, to]`, of `sources` only when given, read
/// until a request received after `to + grace` (see [`state::Plan::grace_secs`]). A range
/// that ends before the oldest archived request is refused with that request's time.
/// `quiet`: how long the stream may give nothing before the read ends (its end reached).
pub async fn dry_run(
    connection: &Connection,
    stream: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    grace: chrono::TimeDelta,
    sources: &[String],
    quiet: Duration,
) -> Result<DryRun, ReplayError> {
    let oldest = oldest(connection, stream, quiet).await?;
    refuse_past_retention(to, oldest)?;
    let mut counts = Counts::new();
    // The offset by timestamp is the broker's time of a chunk: a margin, then what is earlier
    // is skipped by its `received_at`.
    let offset =
        u64::try_from(from.timestamp().saturating_sub(run::ATTACH_MARGIN_SECS)).unwrap_or(0);
    read(
        connection,
        stream,
        AMQPValue::Timestamp(offset),
        quiet,
        |time, source, bytes| {
            if time > to + grace {
                return (None::<()>, false);
            }
            if time >= from
                && time <= to
                && (sources.is_empty() || sources.iter().any(|s| s == source))
            {
                let hour = time.format("%Y-%m-%dT%H:00Z").to_string();
                let tally = counts.entry((source.to_owned(), hour)).or_default();
                tally.requests += 1;
                tally.bytes += bytes as u64;
            }
            (None, true)
        },
    )
    .await?;
    Ok(DryRun {
        counts,
        archive_starts: (from < oldest).then_some(oldest),
    })
}

/// Reads `stream` from `offset`, giving each request's `received_at`, source and size to
/// `each`, which answers what to return and whether to go on. Ends when `each` stops it, or
/// when nothing comes for `quiet`. Requests without a readable `received_at` are skipped.
async fn read<T>(
    connection: &Connection,
    stream: &str,
    offset: AMQPValue,
    quiet: Duration,
    mut each: impl FnMut(DateTime<Utc>, &str, usize) -> (Option<T>, bool),
) -> Result<Option<T>, ReplayError> {
    let channel = connection.create_channel().await?;
    channel.basic_qos(500, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), offset);
    let mut consumer = channel
        .basic_consume(
            stream.into(),
            "ingestctl-replay".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await?;
    let mut answer = None;
    while let Ok(Some(delivery)) = tokio::time::timeout(quiet, consumer.next()).await {
        let delivery = delivery?;
        let headers = delivery.properties.headers().as_ref();
        let time = header_str(headers, headers::RECEIVED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        let source = header_str(headers, headers::SOURCE).unwrap_or("");
        let (found, go_on) = match time {
            Some(time) => each(time, source, delivery.data.len()),
            None => (None, true),
        };
        delivery.ack(BasicAckOptions::default()).await?;
        if found.is_some() {
            answer = found;
        }
        if !go_on {
            break;
        }
    }
    close_channel(&channel).await;
    Ok(answer)
}

/// A time from RFC 3339, for the replay's tests.
#[cfg(test)]
pub(crate) fn test_time(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .expect("a time")
        .with_timezone(&Utc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc_3339_now_or_relative() {
        let now = test_time("2026-12-06T12:00:00Z");
        let at = |text: &str| parse_time(text, now).map(|t| t.to_rfc3339());
        assert_eq!(at("now"), Ok("2026-12-06T12:00:00+00:00".into()));
        assert_eq!(at("-2h"), Ok("2026-12-06T10:00:00+00:00".into()));
        assert_eq!(at("-90m"), Ok("2026-12-06T10:30:00+00:00".into()));
        assert_eq!(at("-1d"), Ok("2026-12-05T12:00:00+00:00".into()));
        assert_eq!(at("-5s"), Ok("2026-12-06T11:59:55+00:00".into()));
        assert_eq!(
            at("2026-12-06T11:00:00+01:00"),
            Ok("2026-12-06T10:00:00+00:00".into())
        );
        assert!(at("-2w").expect_err("refused").contains("unit"));
        assert!(at("-h").is_err());
        assert!(at("-99999999999999999d").is_err());
        assert!(at("yesterday").expect_err("refused").contains("RFC 3339"));
    }
}
