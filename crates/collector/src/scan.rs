//! One pass over a request body's JSON: parses every value the way the worker will (into
//! nothing: no allocation per value), and picks up on the way what the collector checks: the
//! `writeKey`, and for a batch each event's size and shape, and what the worker's merge of the
//! batch-level `context` and `integrations` into the events will add.
//!
//! The worker parses with `serde_json`. The collector must refuse whatever that refuses (a
//! number out of `f64` range, a lone surrogate escape, serde_json's reserved `RawValue` key),
//! and deeper nesting than MongoDB stores ([`MAX_DEPTH`]), so every string and number is
//! checked here, not skimmed: by a scanner over the bytes ([`cursor`]), one pass, allocating
//! only for what it keeps. `scan/tests.rs` holds it to the first version of this check, written
//! over `serde_json`'s deserializer and kept as the oracle (`scan/oracle.rs`).

use std::borrow::Cow;
use std::collections::HashMap;

use ingest_pipeline::built;
use ingest_pipeline::message::{RefusedEvent, EVENT_TYPES};

use crate::error::CaptureError;
use crate::limits::Limits;

mod cursor;
#[cfg(test)]
mod oracle;
#[cfg(test)]
mod tests;

use cursor::{Cursor, Scan, Stop, Str};

/// Deeper than this is refused: MongoDB stores documents nested 100 levels deep at most, and
/// the worker's parser stops at 128.
pub const MAX_DEPTH: usize = 100;

/// serde_json's marker for a `RawValue`: a `Value` reads an object whose first key is this as
/// raw JSON text, not as an object. No beacon has such a key; it is refused wherever it is.
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

/// A JSON object key, decoded, borrowed from the body when it has no escapes.
#[derive(Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key<'a>(pub Cow<'a, str>);

impl Key<'_> {
    /// Its length as a JSON string, quotes and escapes included.
    pub fn quoted_len(&self) -> usize {
        serde_json::to_string(self.0.as_ref()).map_or(self.0.len() * 6 + 2, |s| s.len())
    }
}

/// What one pass found in a body that parses.
#[derive(Debug, Default, PartialEq)]
pub struct Scanned<'a> {
    pub write_key: Option<String>,
    /// A batch's events; `None` when the body has no `batch` (or it is `null`).
    pub batch: Option<Batch<'a>>,
    /// The batch-level `context`: for an object, each key with what one copy of it costs.
    pub shared_context: Option<HashMap<Key<'a>, usize>>,
    /// The batch-level `integrations` as sent, in bytes (`None` when absent or `null`).
    pub shared_integrations: Option<usize>,
    /// The batch-level `sentAt` as sent, in bytes (`None` when absent or `null`).
    pub shared_sent_at: Option<usize>,
    /// A single event's user (not a batch's): see [`EventFields::user`].
    pub user: Option<Cow<'a, str>>,
}

/// A batch's elements as one pass found them.
#[derive(Debug, PartialEq)]
pub struct Batch<'a> {
    /// Every element that is an object, refused or not (all count for the merge's size).
    pub events: Vec<EventFields<'a>>,
    /// Elements in the batch.
    pub elements: usize,
    /// With `Limits::partial_batches`, the elements refused alone, in order.
    pub refused: Vec<Refused>,
}

/// An element of a batch refused alone, while the others are accepted.
#[derive(Debug)]
pub struct Refused {
    pub index: usize,
    /// Its size as sent.
    pub bytes: usize,
    pub error: CaptureError,
    code: &'static str,
}

/// Codes of the events refused alone, beside [`RefusedEvent::TOO_LARGE`].
pub const NOT_AN_OBJECT: &str = "not_an_object";
pub const BAD_TYPE: &str = "bad_type";
pub const BAD_MESSAGE_ID: &str = "bad_message_id";

/// The same element refused the same way (errors compared by their message).
impl PartialEq for Refused {
    fn eq(&self, other: &Self) -> bool {
        (self.index, self.bytes, self.code) == (other.index, other.bytes, other.code)
            && self.error.to_string() == other.error.to_string()
    }
}

impl Refused {
    /// Its code in the answer (and, for [`RefusedEvent::TOO_LARGE`], in the raw message's
    /// header): `event_too_large`, `not_an_object`, `bad_type` or `bad_message_id`.
    pub fn code(&self) -> &'static str {
        self.code
    }
}

/// What the worker's merge looks at in one event, and its size as sent.
#[derive(Debug, PartialEq)]
pub struct EventFields<'a> {
    pub bytes: usize,
    /// Its own `context` (the last one; `null` as absent).
    pub context: OwnContext<'a>,
    /// Whether it has non-null `integrations`.
    pub has_integrations: bool,
    /// Whether it has a non-null `sentAt`.
    pub has_sent_at: bool,
    /// For a screen or page without a `name`: the bytes as sent of the `event` the worker
    /// copies into it as its name ([`built::is_view_name`]).
    pub view_name: Option<usize>,
    /// Why the worker could not use it, whatever the tracking plan: its `type` missing or not
    /// one it knows, its `messageId` not a string.
    pub unusable: Option<(&'static str, String)>,
    /// Whose event it is, for per-user quotas: its `userId`, else its `anonymousId` (the last
    /// of each sent, a non-empty string).
    pub user: Option<Cow<'a, str>>,
}

#[derive(Debug, PartialEq)]
pub enum OwnContext<'a> {
    Absent,
    /// Its keys, sorted, each once.
    Object(Vec<Key<'a>>),
    /// Not an object: the worker copies nothing into it.
    Other,
}

/// Parses `json` (a whole body, known to be UTF-8) in one pass. `batch` reads the batch
/// fields; otherwise only `writeKey` is picked up. Duplicate `writeKey`, `batch`, `context`,
/// `integrations` and `sentAt` are refused: the collector and the worker must read the same one.
pub fn scan<'a>(json: &'a str, batch: bool, limits: &Limits) -> Result<Scanned<'a>, CaptureError> {
    let mut cursor = Cursor::new(json);
    top(&mut cursor, batch, limits)
        .and_then(|scanned| cursor.end().map(|()| scanned))
        .map_err(|stop| stop.into_error(json))
}

/// The body's object, one container deep.
fn top<'a>(cursor: &mut Cursor<'a>, batch: bool, limits: &Limits) -> Scan<Scanned<'a>> {
    if cursor.peek() != Some(b'{') {
        return cursor.fail("expected a JSON object");
    }
    let mut scanned = Scanned::default();
    let mut seen = [false; 5];
    let (mut user_id, mut anonymous_id) = (Text::Null, Text::Null);
    cursor.object(0, |cursor, key| {
        let key = key.text();
        match (key.as_ref(), batch) {
            ("userId", false) => return text(cursor, 1).map(|t| user_id = t),
            ("anonymousId", false) => return text(cursor, 1).map(|t| anonymous_id = t),
            _ => {}
        }
        let field = match (key.as_ref(), batch) {
            ("writeKey", _) => 0,
            ("batch", true) => 1,
            ("context", true) => 2,
            ("integrations", true) => 3,
            ("sentAt", true) => 4,
            _ => return cursor.value(1),
        };
        if std::mem::replace(&mut seen[field], true) {
            return cursor.fail(format!("duplicate field `{key}`"));
        }
        match field {
            0 => {
                scanned.write_key = match text(cursor, 1)? {
                    Text::Str(key) => Some(key.into_owned()),
                    Text::Null => None,
                    Text::Other => return cursor.fail("`writeKey` is not a string"),
                }
            }
            1 => scanned.batch = events(cursor, limits)?,
            2 => scanned.shared_context = shared_context(cursor)?,
            3 => scanned.shared_integrations = not_null_bytes(cursor)?,
            _ => scanned.shared_sent_at = not_null_bytes(cursor)?,
        }
        Ok(())
    })?;
    scanned.user = user_of(user_id, anonymous_id);
    Ok(scanned)
}

/// An event's `userId`, else its `anonymousId`, when a non-empty string.
fn user_of<'a>(user_id: Text<'a>, anonymous_id: Text<'a>) -> Option<Cow<'a, str>> {
    [user_id, anonymous_id].into_iter().find_map(|id| match id {
        Text::Str(id) if !id.is_empty() => Some(id),
        _ => None,
    })
}

/// A top-level value's bytes as sent; `None` for `null`.
fn not_null_bytes(cursor: &mut Cursor<'_>) -> Scan<Option<usize>> {
    let start = cursor.at;
    cursor.value(1)?;
    let raw = cursor.since(start);
    Ok((raw != "null").then_some(raw.len()))
}

/// The batch-level `context`; for an object, what one copy of each key costs in an event that
/// lacks it: the key, its value as sent and the separators. Of duplicate keys the last counts,
/// as in the worker.
fn shared_context<'a>(cursor: &mut Cursor<'a>) -> Scan<Option<HashMap<Key<'a>, usize>>> {
    if cursor.peek() != Some(b'{') {
        cursor.value(1)?;
        return Ok(None);
    }
    let mut costs = HashMap::new();
    cursor.object(1, |cursor, key| {
        let start = cursor.at;
        cursor.value(2)?;
        let key = Key(key.text());
        let bytes = built::context_key_cost(key.quoted_len(), cursor.at - start);
        costs.insert(key, bytes);
        Ok(())
    })?;
    Ok(Some(costs))
}

/// A field that should be a string: its text, `null`, or anything else (checked all the same).
enum Text<'a> {
    Null,
    Str(Cow<'a, str>),
    Other,
}

fn text<'a>(cursor: &mut Cursor<'a>, level: usize) -> Scan<Text<'a>> {
    match cursor.peek() {
        Some(b'"') => Ok(Text::Str(cursor.string()?.text())),
        Some(b'n') => cursor.value(level).map(|()| Text::Null),
        _ => cursor.value(level).map(|()| Text::Other),
    }
}

/// Any value, checked; whether it was anything but `null`.
fn not_null(cursor: &mut Cursor<'_>, level: usize) -> Scan<bool> {
    let null = cursor.peek() == Some(b'n');
    cursor.value(level)?;
    Ok(!null)
}

/// The `batch` array: `null` reads as absent.
fn events<'a>(cursor: &mut Cursor<'a>, limits: &Limits) -> Scan<Option<Batch<'a>>> {
    match cursor.peek() {
        Some(b'n') => return cursor.value(1).map(|()| None),
        Some(b'[') => {}
        _ => return cursor.fail("`batch` is not an array of events"),
    }
    let mut batch = Batch {
        events: Vec::new(),
        elements: 0,
        refused: Vec::new(),
    };
    cursor.array(1, |cursor, index| {
        let start = cursor.at;
        if index == limits.max_batch_events {
            let limit = limits.max_batch_events;
            return Err(Stop::refused(CaptureError::TooManyEvents { limit }));
        }
        batch.elements += 1;
        if cursor.peek() != Some(b'{') {
            let refusal = CaptureError::BadRequest(format!("batch[{index}] is not a JSON object"));
            if !limits.partial_batches {
                return Err(Stop::refused(refusal));
            }
            // Checked all the same: the worker reads the whole body.
            cursor.value(2)?;
            batch.refused.push(Refused {
                index,
                bytes: cursor.at - start,
                error: refusal,
                code: NOT_AN_OBJECT,
            });
            return Ok(());
        }
        let mut fields = event(cursor)?;
        fields.bytes = cursor.at - start;
        if let Some((code, refusal)) = refusal_of(&fields, index, limits) {
            if !limits.partial_batches {
                return Err(Stop::refused(refusal));
            }
            batch.refused.push(Refused {
                index,
                bytes: fields.bytes,
                error: refusal,
                code,
            });
        }
        batch.events.push(fields);
        Ok(())
    })?;
    Ok(Some(batch))
}

/// Why a batch event is refused, if it is: over `max_event_bytes`, or unusable by the worker.
/// Decided after its parse: an event wrong in its JSON is a 400 whatever its size.
fn refusal_of(
    fields: &EventFields<'_>,
    index: usize,
    limits: &Limits,
) -> Option<(&'static str, CaptureError)> {
    if fields.bytes > limits.max_event_bytes {
        let limit = limits.max_event_bytes;
        return Some((
            RefusedEvent::TOO_LARGE,
            CaptureError::EventTooLarge { index, limit },
        ));
    }
    fields.unusable.as_ref().map(|(code, why)| {
        (
            *code,
            CaptureError::BadRequest(format!("batch[{index}] {why}")),
        )
    })
}

/// One batch event, three containers deep (the body, the batch, the event); its `bytes` are
/// left for the caller.
fn event<'a>(cursor: &mut Cursor<'a>) -> Scan<EventFields<'a>> {
    let mut fields = EventFields {
        bytes: 0,
        context: OwnContext::Absent,
        has_integrations: false,
        has_sent_at: false,
        view_name: None,
        unusable: None,
        user: None,
    };
    let (mut user_id, mut anonymous_id) = (Text::Null, Text::Null);
    let mut has_name = false;
    // The `event`: its text when a string, and its bytes as sent.
    let mut event_name: Option<(Option<Str<'a>>, usize)> = None;
    // The last of a key sent twice counts, as in the worker's parse; `null` is absent.
    let mut kind = Text::Null;
    let mut message_id = Text::Null;
    cursor.object(2, |cursor, key| {
        match key.text().as_ref() {
            "context" => fields.context = own_context(cursor)?,
            "integrations" => fields.has_integrations = not_null(cursor, 3)?,
            "sentAt" => fields.has_sent_at = not_null(cursor, 3)?,
            "name" => has_name = not_null(cursor, 3)?,
            "event" => {
                let start = cursor.at;
                let name = if cursor.peek() == Some(b'"') {
                    Some(cursor.string()?)
                } else {
                    cursor.value(3)?;
                    None
                };
                event_name = Some((name, cursor.at - start));
            }
            "type" => kind = text(cursor, 3)?,
            "messageId" => message_id = text(cursor, 3)?,
            "userId" => user_id = text(cursor, 3)?,
            "anonymousId" => anonymous_id = text(cursor, 3)?,
            _ => cursor.value(3)?,
        }
        Ok(())
    })?;
    fields.user = user_of(user_id, anonymous_id);
    if let (Text::Str(kind), false, Some((Some(name), bytes))) = (&kind, has_name, event_name) {
        if built::is_view(kind) && built::is_view_name(&name.text()) {
            fields.view_name = Some(bytes);
        }
    }
    fields.unusable = unusable(kind, message_id);
    Ok(fields)
}

/// Why the worker could not use an event, whatever the tracking plan: its `type` missing or
/// not one it knows, its `messageId` not a string.
fn unusable(kind: Text<'_>, message_id: Text<'_>) -> Option<(&'static str, String)> {
    match (kind, message_id) {
        (Text::Null, _) => Some((BAD_TYPE, "has no `type`".to_owned())),
        (Text::Other, _) => Some((BAD_TYPE, "has a `type` that is not a string".to_owned())),
        (Text::Str(kind), _) if !EVENT_TYPES.contains(&kind.as_ref()) => {
            let shown: String = kind.chars().take(40).collect();
            Some((
                BAD_TYPE,
                format!(
                    "has the unknown `type` {shown:?} (expected one of {})",
                    EVENT_TYPES.join(", ")
                ),
            ))
        }
        (_, Text::Other) => Some((
            BAD_MESSAGE_ID,
            "has a `messageId` that is not a string".to_owned(),
        )),
        _ => None,
    }
}

/// An event's own `context`; an object's keys are kept, sorted, each once.
fn own_context<'a>(cursor: &mut Cursor<'a>) -> Scan<OwnContext<'a>> {
    match cursor.peek() {
        Some(b'{') => {
            let mut keys = Vec::new();
            cursor.object(3, |cursor, key| {
                cursor.value(4)?;
                keys.push(Key(key.text()));
                Ok(())
            })?;
            keys.sort_unstable();
            keys.dedup();
            Ok(OwnContext::Object(keys))
        }
        Some(b'n') => cursor.value(3).map(|()| OwnContext::Absent),
        _ => cursor.value(3).map(|()| OwnContext::Other),
    }
}

/// Whether the first non-whitespace byte opens an object.
pub fn starts_with_object(json: &[u8]) -> bool {
    json.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}
