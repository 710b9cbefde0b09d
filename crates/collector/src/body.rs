//! Reading and cheaply checking a request body: bounded read, bounded gunzip, JSON well-formed,
//! the right top-level shape, per-event size, the size a batch grows to in the worker. No schema
//! validation here: that is the worker's.

use std::collections::HashMap;

use axum::body::Body;
use http_body_util::BodyExt;
use ingest_pipeline::built;
use ingest_pipeline::gzip::{inflate_capped, InflateError};
use ingest_pipeline::message::Endpoint;

use crate::error::CaptureError;
pub use crate::limits::Limits;
pub use crate::scan::Refused;
pub use crate::scan::MAX_DEPTH;
use crate::scan::{scan, starts_with_object, EventFields, Key, OwnContext};

/// Reads at most `limit` bytes, calling `reserve(total)` with the bytes read so far before it
/// keeps each piece, so that a body without a Content-Length (chunked) holds the in-flight
/// budget only for what has arrived. A larger body is a 413, a client that vanishes a 400, and
/// an error from `reserve` ends the read with it.
pub async fn read_limited(
    mut body: Body,
    limit: usize,
    mut reserve: impl FnMut(usize) -> Result<(), CaptureError>,
) -> Result<bytes::Bytes, CaptureError> {
    // One piece is kept as it came; only a second one starts a copy.
    let mut first: Option<bytes::Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| CaptureError::BodyRead(error.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        total = total.saturating_add(data.len());
        if total > limit {
            return Err(CaptureError::BatchTooLarge { limit });
        }
        reserve(total)?;
        match (&mut joined, first.take()) {
            (Some(joined), _) => joined.extend_from_slice(&data),
            (None, Some(earlier)) => {
                let mut both = bytes::BytesMut::with_capacity(total);
                both.extend_from_slice(&earlier);
                both.extend_from_slice(&data);
                joined = Some(both);
            }
            (None, None) => first = Some(data),
        }
    }
    Ok(match (joined, first) {
        (Some(joined), _) => joined.freeze(),
        (None, first) => first.unwrap_or_default(),
    })
}

/// Inflates a gzip body, refusing to produce more than `limit` bytes (gzip bombs).
pub fn gunzip_limited(compressed: &[u8], limit: usize) -> Result<Vec<u8>, CaptureError> {
    inflate_capped(compressed, limit).map_err(|error| match error {
        InflateError::Invalid(reason) => CaptureError::BadGzip(reason),
        InflateError::TooLarge(limit) => CaptureError::BatchTooLarge { limit },
    })
}

/// What the collector needs from a well-formed body.
#[derive(Debug)]
pub struct Inspected {
    pub write_key: Option<String>,
    /// The events accepted.
    pub events: usize,
    /// The batch's events refused alone (with `partial_batches`), in order.
    pub refused: Vec<Refused>,
    /// Each user's key ([`crate::quota::user_key`]) and events, when asked for.
    pub users: Vec<(u64, usize)>,
}

/// Each distinct user's key and how many of `ids` are theirs.
fn count_users<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<(u64, usize)> {
    let mut keys: Vec<u64> = ids.map(crate::quota::user_key).collect();
    keys.sort_unstable();
    let mut counted: Vec<(u64, usize)> = Vec::new();
    for key in keys {
        match counted.last_mut() {
            Some((last, n)) if *last == key => *n += 1,
            _ => counted.push((key, 1)),
        }
    }
    counted
}

/// Checks the decoded body's shape and sizes, in one pass over its JSON (see [`scan`]); returns
/// the body's `writeKey`, if any, and its number of events.
pub fn inspect(
    endpoint: Endpoint,
    json: &[u8],
    limits: &Limits,
) -> Result<Inspected, CaptureError> {
    inspect_counting(endpoint, json, limits, false)
}

/// [`inspect`], and with `users`, the events of each user.
pub fn inspect_counting(
    endpoint: Endpoint,
    json: &[u8],
    limits: &Limits,
    users: bool,
) -> Result<Inspected, CaptureError> {
    let limit = limits.for_endpoint(endpoint);
    if json.len() > limit {
        return Err(CaptureError::BatchTooLarge { limit });
    }
    let json = std::str::from_utf8(json)
        .map_err(|utf8| CaptureError::MalformedJson(format!("invalid UTF-8: {utf8}")))?;
    if !starts_with_object(json.as_bytes()) {
        return Err(CaptureError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    }
    let scanned = scan(json, endpoint == Endpoint::Batch, limits)?;
    if endpoint != Endpoint::Batch {
        return Ok(Inspected {
            users: match users {
                true => count_users(scanned.user.as_deref().into_iter()),
                false => Vec::new(),
            },
            write_key: scanned.write_key,
            events: 1,
            refused: Vec::new(),
        });
    }
    let mut batch = scanned
        .batch
        .ok_or_else(|| CaptureError::BadRequest("missing `batch` array".into()))?;
    // Every event refused: the request is, as a whole, with the first one's error.
    if !batch.refused.is_empty() && batch.refused.len() == batch.elements {
        return Err(batch.refused.swap_remove(0).error);
    }
    let expanded = expanded_events_bytes(
        &batch.events,
        scanned.shared_context.as_ref(),
        scanned.shared_integrations,
        scanned.shared_sent_at,
        limits,
    );
    if expanded > limits.max_batch_bytes {
        return Err(CaptureError::BatchExpandsTooLarge {
            limit: limits.max_batch_bytes,
        });
    }
    Ok(Inspected {
        users: match users {
            true => count_users(batch.events.iter().filter_map(|e| e.user.as_deref())),
            false => Vec::new(),
        },
        write_key: scanned.write_key,
        events: batch.elements - batch.refused.len(),
        refused: batch.refused,
    })
}

/// The bytes of the batch's events once the worker has built them, by the rule both services
/// share ([`built::added`]): each event as sent, plus what the worker copies into it of the
/// batch-level `context` (`shared`: each key with what one copy costs), `integrations` and
/// `sentAt` (`shared_integrations`, `shared_sent_at`: bytes as sent), and a screen's name. Values
/// count as sent: for compact JSON a few bytes per event over the worker's output, more if they
/// carry whitespace or escapes. Linear in the body: an event's own context keys are looked up
/// among the shared ones, never the other way round. Stops adding once past
/// `limits.max_batch_bytes`.
pub fn expanded_events_bytes(
    events: &[EventFields<'_>],
    shared: Option<&HashMap<Key<'_>, usize>>,
    shared_integrations: Option<usize>,
    shared_sent_at: Option<usize>,
    limits: &Limits,
) -> usize {
    let all = built::Shared {
        context: shared.map(|costs| costs.values().fold(0usize, |sum, b| sum.saturating_add(*b))),
        integrations: shared_integrations,
        sent_at: shared_sent_at,
    };
    let mut total = 0usize;
    for event in events {
        let context = match &event.context {
            OwnContext::Absent => built::OwnContext::Absent,
            OwnContext::Object(own) => built::OwnContext::Object {
                kept: shared.map_or(0, |shared| {
                    own.iter()
                        .filter_map(|k| shared.get(k))
                        .fold(0usize, |sum, b| sum.saturating_add(*b))
                }),
            },
            OwnContext::Other => built::OwnContext::Other,
        };
        let lacks = built::Lacks {
            context,
            has_integrations: event.has_integrations,
            has_sent_at: event.has_sent_at,
            view_name: event.view_name,
        };
        total = total
            .saturating_add(event.bytes)
            .saturating_add(built::added(&all, &lacks));
        if total > limits.max_batch_bytes {
            break;
        }
    }
    total
}

#[cfg(test)]
#[path = "body/tests.rs"]
mod tests;
