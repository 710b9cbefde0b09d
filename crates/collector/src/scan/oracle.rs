//! The body check as it was written first, over `serde_json`'s deserializer: kept as the oracle
//! the byte scanner of [`super`] is held to (same answers, same refusals) in `scan/tests.rs`.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;

use ingest_pipeline::built;
use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::{
    starts_with_object, Batch, EventFields, Key, OwnContext, Refused, Scanned, MAX_DEPTH,
    NOT_AN_OBJECT, RAW_VALUE_TOKEN,
};
use crate::error::CaptureError;
use crate::limits::Limits;

mod values;

use super::Text;
use values::{Any, ContextKeys, NotNull, TextSeed};

/// Parses `json` (a whole body, known to be UTF-8) in one pass. `batch` reads the batch
/// fields; otherwise only `writeKey` is picked up. Duplicate `writeKey`, `batch`, `context`,
/// `integrations` and `sentAt` are refused: the collector and the worker must read the same one.
pub(super) fn scan<'a>(
    json: &'a str,
    batch: bool,
    limits: &Limits,
) -> Result<Scanned<'a>, CaptureError> {
    let refusal = RefCell::new(None);
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let seed = Top {
        batch,
        limits,
        refusal: &refusal,
    };
    let scanned = seed
        .deserialize(&mut deserializer)
        .and_then(|scanned| deserializer.end().map(|()| scanned));
    scanned.map_err(|error| match refusal.take() {
        Some(refusal) => refusal,
        None => CaptureError::MalformedJson(error.to_string()),
    })
}

/// A check of the collector's own failed inside the parse: the specific error is kept here and
/// the parse stopped with a generic one.
type Refusal<'s> = &'s RefCell<Option<CaptureError>>;

fn refuse<E: serde::de::Error>(refusal: Refusal<'_>, error: CaptureError) -> E {
    let message = error.to_string();
    refusal.replace(Some(error));
    E::custom(message)
}

struct Top<'s> {
    batch: bool,
    limits: &'s Limits,
    refusal: Refusal<'s>,
}

impl<'de> DeserializeSeed<'de> for Top<'_> {
    type Value = Scanned<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Top<'_> {
    type Value = Scanned<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scanned<'de>, A::Error> {
        let top_level = Any {
            depth: 1,
            refusal: self.refusal,
        };
        let mut scanned = Scanned::default();
        let mut seen = [false; 5];
        let (mut user_id, mut anonymous_id) = (Text::Null, Text::Null);
        let mut once = |field: usize, name: &str| {
            if std::mem::replace(&mut seen[field], true) {
                return Err(A::Error::custom(format!("duplicate field `{name}`")));
            }
            Ok(())
        };
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match (key.0.as_ref(), self.batch) {
                ("userId", false) => user_id = map.next_value_seed(TextSeed(top_level))?,
                ("anonymousId", false) => {
                    anonymous_id = map.next_value_seed(TextSeed(top_level))?;
                }
                ("writeKey", _) => {
                    once(0, "writeKey")?;
                    scanned.write_key = map.next_value()?;
                }
                ("batch", true) => {
                    once(1, "batch")?;
                    scanned.batch = map.next_value_seed(Events {
                        limits: self.limits,
                        refusal: self.refusal,
                    })?;
                }
                ("context", true) => {
                    once(2, "context")?;
                    let raw: &'de RawValue = map.next_value()?;
                    scanned.shared_context =
                        shared_context(raw.get(), top_level).map_err(A::Error::custom)?;
                }
                ("integrations", true) => {
                    once(3, "integrations")?;
                    scanned.shared_integrations =
                        not_null_bytes(map.next_value()?, top_level).map_err(A::Error::custom)?;
                }
                ("sentAt", true) => {
                    once(4, "sentAt")?;
                    scanned.shared_sent_at =
                        not_null_bytes(map.next_value()?, top_level).map_err(A::Error::custom)?;
                }
                _ => map.next_value_seed(top_level)?,
            }
        }
        scanned.user = super::user_of(user_id, anonymous_id);
        Ok(scanned)
    }
}

/// A value's bytes as sent, parsed as the worker would; `None` for `null`.
fn not_null_bytes(raw: &RawValue, any: Any<'_>) -> serde_json::Result<Option<usize>> {
    parse_any(raw.get(), any)?;
    Ok((raw.get() != "null").then_some(raw.get().len()))
}

/// Parses `json`, a value found where `any` is, as the worker would.
fn parse_any(json: &str, any: Any<'_>) -> serde_json::Result<()> {
    let mut deserializer = serde_json::Deserializer::from_str(json);
    any.deserialize(&mut deserializer)?;
    deserializer.end()
}

/// The batch-level `context`, parsed; for an object, what one copy of each key costs in an event
/// that lacks it: the key, its value as sent and the separators. Of duplicate keys the last
/// counts, as in the worker.
fn shared_context<'a>(
    json: &'a str,
    any: Any<'_>,
) -> serde_json::Result<Option<HashMap<Key<'a>, usize>>> {
    parse_any(json, any)?;
    if !starts_with_object(json.as_bytes()) {
        return Ok(None);
    }
    let entries: Vec<(Key<'_>, &RawValue)> = serde_json::from_str::<RawEntries<'_>>(json)?.0;
    let costs = entries.into_iter().map(|(key, value)| {
        let bytes = built::context_key_cost(key.quoted_len(), value.get().len());
        (key, bytes)
    });
    Ok(Some(costs.collect()))
}

/// An object's entries in order, values as raw text.
struct RawEntries<'a>(Vec<(Key<'a>, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for RawEntries<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = RawEntries<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawEntries<'de>, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(RawEntries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

/// The `batch` array: `null` reads as absent.
struct Events<'s> {
    limits: &'s Limits,
    refusal: Refusal<'s>,
}

impl<'de> DeserializeSeed<'de> for Events<'_> {
    type Value = Option<Batch<'de>>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for Events<'_> {
    type Value = Option<Batch<'de>>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of events")
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let limits = self.limits;
        let mut batch = Batch {
            events: Vec::new(),
            elements: 0,
            refused: Vec::new(),
        };
        while let Some(raw) = seq.next_element::<&'de RawValue>()? {
            let index = batch.elements;
            if index == limits.max_batch_events {
                let limit = limits.max_batch_events;
                return Err(refuse(self.refusal, CaptureError::TooManyEvents { limit }));
            }
            batch.elements += 1;
            let json = raw.get();
            let mut deserializer = serde_json::Deserializer::from_str(json);
            if !starts_with_object(json.as_bytes()) {
                let refusal =
                    CaptureError::BadRequest(format!("batch[{index}] is not a JSON object"));
                if !limits.partial_batches {
                    return Err(refuse(self.refusal, refusal));
                }
                // Parsed all the same: the worker reads the whole body.
                let element = Any {
                    depth: 2,
                    refusal: self.refusal,
                };
                element
                    .deserialize(&mut deserializer)
                    .and_then(|()| deserializer.end())
                    .map_err(A::Error::custom)?;
                batch.refused.push(Refused {
                    index,
                    bytes: json.len(),
                    error: refusal,
                    code: NOT_AN_OBJECT,
                });
                continue;
            }
            let event = Event {
                bytes: json.len(),
                refusal: self.refusal,
            };
            let fields = event
                .deserialize(&mut deserializer)
                .and_then(|fields| deserializer.end().map(|()| fields))
                .map_err(A::Error::custom)?;
            // `fields.bytes` is the element's length as sent.
            let refusal = super::refusal_of(&fields, index, limits);
            if let Some((code, refusal)) = refusal {
                if !limits.partial_batches {
                    return Err(refuse(self.refusal, refusal));
                }
                batch.refused.push(Refused {
                    index,
                    bytes: json.len(),
                    error: refusal,
                    code,
                });
            }
            batch.events.push(fields);
        }
        Ok(Some(batch))
    }
}

/// One batch event, three containers deep (the body, the batch, the event).
struct Event<'s> {
    bytes: usize,
    refusal: Refusal<'s>,
}

impl<'de> DeserializeSeed<'de> for Event<'_> {
    type Value = EventFields<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Event<'_> {
    type Value = EventFields<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EventFields<'de>, A::Error> {
        let inside = Any {
            depth: 3,
            refusal: self.refusal,
        };
        let mut fields = EventFields {
            bytes: self.bytes,
            context: OwnContext::Absent,
            has_integrations: false,
            has_sent_at: false,
            view_name: None,
            unusable: None,
            user: None,
        };
        let (mut user_id, mut anonymous_id) = (Text::Null, Text::Null);
        let mut has_name = false;
        let mut event_name: Option<&'de RawValue> = None;
        // The last of a key sent twice counts, as in the worker's parse; `null` is absent.
        let mut kind = Text::Null;
        let mut message_id = Text::Null;
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match key.0.as_ref() {
                "context" => fields.context = map.next_value_seed(ContextKeys(inside))?,
                "integrations" => {
                    fields.has_integrations = map.next_value_seed(NotNull(inside))?;
                }
                "sentAt" => fields.has_sent_at = map.next_value_seed(NotNull(inside))?,
                "name" => has_name = map.next_value_seed(NotNull(inside))?,
                "event" => {
                    let raw: &'de RawValue = map.next_value()?;
                    parse_any(raw.get(), inside).map_err(A::Error::custom)?;
                    event_name = Some(raw);
                }
                "type" => kind = map.next_value_seed(TextSeed(inside))?,
                "messageId" => message_id = map.next_value_seed(TextSeed(inside))?,
                "userId" => user_id = map.next_value_seed(TextSeed(inside))?,
                "anonymousId" => anonymous_id = map.next_value_seed(TextSeed(inside))?,
                _ => map.next_value_seed(inside)?,
            }
        }
        if let (Text::Str(kind), false, Some(raw)) = (&kind, has_name, event_name) {
            let name = serde_json::from_str::<Cow<'_, str>>(raw.get()).ok();
            if built::is_view(kind) && name.is_some_and(|name| built::is_view_name(&name)) {
                fields.view_name = Some(raw.get().len());
            }
        }
        fields.unusable = super::unusable(kind, message_id);
        fields.user = super::user_of(user_id, anonymous_id);
        Ok(fields)
    }
}
