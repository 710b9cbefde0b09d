//! From a raw delivery's body to events: a capped gunzip, JSON parsing, and the split of a batch
//! into events (batch-level `context`, `integrations` and `sentAt` apply to every event;
//! `writeKey` is dropped so no secret is ever stored). The request's metadata comes from its
//! properties (`ingest_pipeline::message::RequestMeta`).

use ingest_pipeline::built::{self, OwnContext};
use ingest_pipeline::gzip::{inflate_capped, InflateError};
use ingest_pipeline::message::{Endpoint, RequestMeta, REQUEST_ID_NAMESPACE};
use std::collections::HashSet;
use std::sync::Arc;

use ingest_schema::{Doc, Node, ObjMut, Text, Val};
use serde_json::Value;

/// Names a request by its content: the source, the endpoint and the decoded payload. A client
/// that retries a request sends the same content under a new request id; events without a
/// `messageId` get theirs from this, so the retry is stored once.
pub fn content_seed(meta: &RequestMeta, json: &[u8]) -> String {
    let endpoint = meta.endpoint.as_str();
    let mut material = Vec::with_capacity(meta.source.len() + endpoint.len() + json.len() + 2);
    material.extend_from_slice(meta.source.as_bytes());
    material.push(b'\n');
    material.extend_from_slice(endpoint.as_bytes());
    material.push(b'\n');
    material.extend_from_slice(json);
    uuid::Uuid::new_v5(&REQUEST_ID_NAMESPACE, &material).to_string()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("invalid gzip payload: {0}")]
    Gzip(String),
    #[error("payload inflates to more than {0} bytes")]
    TooLarge(usize),
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("{0}")]
    Shape(String),
    /// The events, with the batch's shared fields merged into each, would exceed the budget.
    #[error("the payload's events, with the batch's context and integrations merged into each, come to more than {0} bytes")]
    Expands(usize),
}

impl DecodeError {
    /// The invalid record's reason: `too_large` for a payload over what a delivery may build.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Expands(_) => "too_large",
            _ => "decode",
        }
    }
}

/// The payload as JSON bytes: gunzipped if needed, never more than `limit` bytes.
pub fn payload(
    body: &[u8],
    gzip: bool,
    limit: usize,
) -> Result<std::borrow::Cow<'_, [u8]>, DecodeError> {
    if !gzip {
        if body.len() > limit {
            return Err(DecodeError::TooLarge(limit));
        }
        return Ok(std::borrow::Cow::Borrowed(body));
    }
    match inflate_capped(body, limit) {
        Ok(out) => Ok(std::borrow::Cow::Owned(out)),
        Err(InflateError::Invalid(reason)) => Err(DecodeError::Gzip(reason)),
        Err(InflateError::TooLarge(limit)) => Err(DecodeError::TooLarge(limit)),
    }
}

/// One element of a request: an event object, or what stood in its place.
#[derive(Debug, PartialEq)]
pub enum Element {
    Event(Doc),
    NotAnObject(Value),
}

/// A request split into its events, plus the batch's `sentAt`.
#[derive(Debug, PartialEq)]
pub struct Split {
    pub elements: Vec<Element>,
    pub sent_at: Option<Doc>,
}

/// Parses the payload once: every event of the request reads its strings from this one text
/// (see `ingest_schema::doc`).
fn parse(json: &[u8]) -> Result<Doc, DecodeError> {
    let text = std::str::from_utf8(json)
        .map_err(|e| DecodeError::Json(format!("the payload is not UTF-8: {e}")))?;
    Doc::parse(Arc::from(text)).map_err(|e| DecodeError::Json(e.to_string()))
}

/// Splits a payload into its events. `budget` bounds the bytes the events may come to once
/// the batch's shared fields are merged into each and the worker's own fields are added
/// (`per_event` bytes each): the bound is checked before anything is copied.
///
/// The batch's `context` and `integrations` are held once and referred to by each event that
/// lacks them (`Val::Shared`), not copied into it.
pub fn split(
    endpoint: Endpoint,
    json: &[u8],
    budget: usize,
    per_event: usize,
) -> Result<Split, DecodeError> {
    let mut whole = parse(json)?;
    let Some(mut body) = whole.object_mut() else {
        return Err(DecodeError::Shape(
            "the payload is not a JSON object".into(),
        ));
    };
    body.remove("writeKey");
    if endpoint != Endpoint::Batch {
        drop_absent(&mut body);
        body.insert_if_absent("type", || Val::string(endpoint.as_str()));
        let name =
            view_name(whole.node()).map_or(0, |name| built::view_name_added(quoted_len(name)));
        if json.len() + per_event + name > budget {
            return Err(DecodeError::Expands(budget));
        }
        fill_view_name(&mut whole);
        return Ok(Split {
            elements: vec![Element::Event(whole)],
            sent_at: None,
        });
    }
    let Some(Val::Arr(batch)) = body.remove("batch") else {
        return Err(DecodeError::Shape(
            "the payload has no `batch` array".into(),
        ));
    };
    let shared_context = match body.remove("context") {
        Some(context @ Val::Obj(_)) => Some(Arc::new(context)),
        _ => None,
    };
    // Held as the one member of an object, so each event can refer to it (`Val::Shared`).
    let shared_integrations = body
        .remove("integrations")
        .filter(|v| !matches!(v, Val::Null))
        .map(|integrations| Arc::new(Val::Obj(vec![(Text::from("integrations"), integrations)])));
    let sent_at = body
        .remove("sentAt")
        .filter(|v| !matches!(v, Val::Null))
        .map(|sent_at| whole.with_root(sent_at));
    let text = whole.text();
    let built = built_size(
        json.len(),
        text,
        &batch,
        shared_context.as_deref().map(|c| Node::new(text, c)),
        shared_integrations
            .as_deref()
            .and_then(|i| Node::new(text, i).get("integrations")),
        sent_at.as_ref().map(Doc::node),
        per_event,
    );
    if built > budget {
        return Err(DecodeError::Expands(budget));
    }
    let elements = batch
        .into_iter()
        .map(|item| match item {
            item @ Val::Obj(_) => {
                let mut event = whole.with_root(item);
                if let Some(mut object) = event.object_mut() {
                    object.remove("writeKey");
                    drop_absent(&mut object);
                }
                fill_view_name(&mut event);
                if let Some(mut object) = event.object_mut() {
                    if let Some(shared) = &shared_context {
                        if let Some(mut context) = object.object_entry("context") {
                            context.merge_shared(shared);
                        }
                    }
                    if let Some(integrations) = &shared_integrations {
                        object.insert_if_absent("integrations", || {
                            Val::Shared(Arc::clone(integrations), 0)
                        });
                    }
                }
                Element::Event(event)
            }
            other => Element::NotAnObject(Node::new(text, &other).to_value_owned()),
        })
        .collect();
    Ok(Split { elements, sent_at })
}

/// Segment's API reads a null field as an absent one (the Python SDKs send
/// `"anonymousId": null`, analytics.js `"userId": null`), and an empty `userId` or
/// `anonymousId` too (an SDK that serialises its defaults sends an anonymous user's
/// `"userId": ""`).
fn drop_absent(event: &mut ObjMut<'_>) {
    event.retain(|key, value| {
        !(value.is_null() || (value.as_str() == Some("") && ABSENT_WHEN_EMPTY.contains(&key)))
    });
}

/// The ids an SDK sends as `""` when it has none.
const ABSENT_WHEN_EMPTY: [&str; 2] = ["userId", "anonymousId"];

/// The name a `screen` or `page` without one gets: RudderStack's mobile SDKs send a screen's
/// name as `event` (and in `properties.name`), never as `name`, and RudderStack reads it from
/// `event`. `None` when the event has a `name` (not `null`), is of another type, or its `event`
/// is not a short non-empty string ([`built::is_view_name`]).
fn view_name(event: Node<'_>) -> Option<&str> {
    let kind = event.get("type").and_then(|kind| kind.as_str())?;
    if !built::is_view(kind) || event.get("name").is_some_and(|name| !name.is_null()) {
        return None;
    }
    event
        .get("event")
        .and_then(|name| name.as_str())
        .filter(|name| built::is_view_name(name))
}

fn fill_view_name(event: &mut Doc) {
    if let Some(name) = view_name(event.node()).map(str::to_owned) {
        if let Some(mut object) = event.object_mut() {
            object.insert("name", Val::string(name));
        }
    }
}

/// The bytes the events come to once built: the payload itself, plus for each event what the
/// shared rule ([`built::added`]) says the worker copies into it, and the worker's own fields.
/// Reckoned without copying anything; a `null` field counts as absent, as it is once built.
fn built_size(
    payload: usize,
    text: &str,
    batch: &[Val],
    context: Option<Node<'_>>,
    integrations: Option<Node<'_>>,
    sent_at: Option<Node<'_>>,
    per_event: usize,
) -> usize {
    let context_costs: Vec<(&str, usize)> = context
        .and_then(|context| context.members())
        .into_iter()
        .flatten()
        .map(|(k, v)| (k, built::context_key_cost(quoted_len(k), json_len(v))))
        .collect();
    let shared = built::Shared {
        context: context.map(|_| context_costs.iter().map(|(_, cost)| cost).sum()),
        integrations: integrations.map(json_len),
        sent_at: sent_at.map(json_len),
    };
    let present = |event: Node<'_>, key: &str| event.get(key).is_some_and(|v| !v.is_null());
    let mut total = payload;
    for item in batch {
        let event = Node::new(text, item);
        if !event.is_object() {
            continue;
        }
        let own_context = match event.get("context") {
            None => OwnContext::Absent,
            Some(own) if own.is_null() => OwnContext::Absent,
            Some(own) if own.is_object() => OwnContext::Object {
                kept: kept_cost(own, &context_costs),
            },
            Some(_) => OwnContext::Other,
        };
        let lacks = built::Lacks {
            context: own_context,
            has_integrations: present(event, "integrations"),
            has_sent_at: present(event, "sentAt"),
            view_name: view_name(event).map(quoted_len),
        };
        total = total
            .saturating_add(per_event)
            .saturating_add(built::added(&shared, &lacks));
    }
    total
}

/// What the batch context's keys that the event's own `context` has would have cost. Past a
/// few keys the event's own are looked up in a set: a hostile context of many keys costs each
/// event linear time, not quadratic.
fn kept_cost(own: Node<'_>, context_costs: &[(&str, usize)]) -> usize {
    const LINEAR: usize = 32;
    let mut kept = 0usize;
    if own.len() + context_costs.len() <= LINEAR {
        for (key, cost) in context_costs {
            if own.get(key).is_some() {
                kept = kept.saturating_add(*cost);
            }
        }
    } else {
        let keys: HashSet<&str> = own
            .members()
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
            .collect();
        for (key, cost) in context_costs {
            if keys.contains(key) {
                kept = kept.saturating_add(*cost);
            }
        }
    }
    kept
}

/// A string's length as JSON text, quotes and escapes included.
fn quoted_len(text: &str) -> usize {
    counted(|count| serde_json::to_writer(count, text))
}

/// The length of a value's JSON text, without building it.
fn json_len(value: Node<'_>) -> usize {
    counted(|count| serde_json::to_writer(count, &value))
}

fn counted(write: impl FnOnce(&mut Count) -> serde_json::Result<()>) -> usize {
    let mut count = Count(0);
    match write(&mut count) {
        Ok(()) => count.0,
        Err(_) => usize::MAX / 4,
    }
}

struct Count(usize);

impl std::io::Write for Count {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn batch_context_fills_gaps_without_overriding_and_write_key_is_dropped() {
        let body = json!({
            "writeKey": "secret",
            "sentAt": "2026-11-21T12:00:00Z",
            "context": {"app": {"name": "Shop"}, "ip": "1.1.1.1"},
            "batch": [
                {"type": "track", "event": "A", "context": {"ip": "2.2.2.2"}, "writeKey": "secret"},
                7
            ]
        });
        let split = split(Endpoint::Batch, body.to_string().as_bytes(), 1 << 20, 0).expect("split");
        assert_eq!(
            split.sent_at.map(|s| s.to_value()),
            Some(json!("2026-11-21T12:00:00Z"))
        );
        let Element::Event(first) = &split.elements[0] else {
            panic!("not an event")
        };
        let first = first.to_map();
        assert_eq!(first["context"]["ip"], json!("2.2.2.2"));
        assert_eq!(first["context"]["app"]["name"], json!("Shop"));
        assert!(!first.contains_key("writeKey"));
        assert_eq!(split.elements[1], Element::NotAnObject(json!(7)));
    }

    #[test]
    fn single_event_endpoints_get_their_type() {
        let split = split(
            Endpoint::Track,
            br#"{"event":"A","writeKey":"k"}"#,
            1 << 20,
            0,
        )
        .expect("split");
        let Element::Event(event) = &split.elements[0] else {
            panic!("not an event")
        };
        let event = event.to_map();
        assert_eq!(event["type"], json!("track"));
        assert!(!event.contains_key("writeKey"));
    }

    #[test]
    fn an_empty_user_or_anonymous_id_counts_as_absent_and_other_empty_strings_stay() {
        // An SDK that serialises defaults: `"userId": ""` beside a real anonymousId.
        let body = json!({"batch": [
            {"type": "track", "event": "A", "userId": "", "anonymousId": "a-1", "name": ""},
            {"type": "track", "event": "A", "userId": "u-1", "anonymousId": ""}
        ]});
        let batch = split(Endpoint::Batch, body.to_string().as_bytes(), 1 << 20, 0).expect("split");
        let events: Vec<_> = batch
            .elements
            .iter()
            .filter_map(|e| match e {
                Element::Event(event) => Some(event.to_map()),
                Element::NotAnObject(_) => None,
            })
            .collect();
        assert_eq!(events.len(), 2);
        assert!(!events[0].contains_key("userId"));
        assert_eq!(events[0]["anonymousId"], json!("a-1"));
        assert_eq!(events[0]["name"], json!(""));
        assert_eq!(events[1]["userId"], json!("u-1"));
        assert!(!events[1].contains_key("anonymousId"));
        let single = split(
            Endpoint::Track,
            br#"{"event":"A","userId":"","anonymousId":"a"}"#,
            1 << 20,
            0,
        )
        .expect("split");
        let Element::Event(event) = &single.elements[0] else {
            panic!("not an event")
        };
        assert!(event.get("userId").is_none());
    }

    #[test]
    fn a_screen_or_page_without_a_name_takes_rudderstacks_event_as_its_name() {
        let long = "x".repeat(built::VIEW_NAME_CHARS + 1);
        let body = json!({"batch": [
            {"type": "screen", "event": "Cart", "properties": {"name": "Cart"}},
            {"type": "page", "properties": {"name": "Home"}},
            {"type": "screen", "name": "Own", "event": "Other"},
            {"type": "track", "event": "Cart"},
            {"type": "screen", "event": long, "properties": {"name": "Short"}},
            {"type": "screen", "event": ""}
        ]});
        let batch = split(Endpoint::Batch, body.to_string().as_bytes(), 1 << 20, 0).expect("split");
        let names: Vec<Option<Value>> = batch
            .elements
            .iter()
            .map(|e| match e {
                Element::Event(event) => event.get("name").map(|n| n.to_value_owned()),
                Element::NotAnObject(_) => None,
            })
            .collect();
        // Only `event` gives a name: `properties.name` alone does not.
        let expected = [Some("Cart"), None, Some("Own"), None, None, None];
        let expected: Vec<Option<Value>> = expected.iter().map(|n| n.map(|n| json!(n))).collect();
        assert_eq!(names, expected);
        // What it adds counts against the budget.
        let screens =
            json!({"batch": vec![json!({"type": "screen", "event": "A"}); 10]}).to_string();
        let budget = screens.len() + 10 * built::view_name_added(r#""A""#.len()) - 1;
        assert_eq!(
            split(Endpoint::Batch, screens.as_bytes(), budget, 0).err(),
            Some(DecodeError::Expands(budget))
        );
    }

    #[test]
    fn shape_and_json_errors() {
        assert!(matches!(
            split(Endpoint::Batch, b"[1]", 1 << 20, 0),
            Err(DecodeError::Shape(_))
        ));
        assert!(matches!(
            split(Endpoint::Batch, b"{}", 1 << 20, 0),
            Err(DecodeError::Shape(_))
        ));
        assert!(matches!(
            split(Endpoint::Batch, b"{", 1 << 20, 0),
            Err(DecodeError::Json(_))
        ));
    }

    #[test]
    fn the_built_size_counts_the_shared_fields_each_event_lacks() {
        let body = json!({
            "context": {"big": "x".repeat(1000), "app": "Shop"},
            "batch": [
                {"type": "track", "context": {"big": "own"}},
                {"type": "track"},
                {"type": "track"}
            ]
        })
        .to_string();
        let fits = body.len() + 2 * 1000 + 3 * 100 + 200;
        assert!(split(Endpoint::Batch, body.as_bytes(), fits + 2000, 100).is_ok());
        assert_eq!(
            split(Endpoint::Batch, body.as_bytes(), fits - 1000, 100),
            Err(DecodeError::Expands(fits - 1000))
        );
        // Events with their own context add nothing from the batch's.
        let own = json!({
            "context": {"big": "x".repeat(1000)},
            "batch": [{"type": "track", "context": {"big": "own"}}]
        })
        .to_string();
        assert!(split(Endpoint::Batch, own.as_bytes(), own.len() + 10, 0).is_ok());
    }

    #[test]
    fn gunzip_is_capped() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&[b'a'; 5000]).expect("write");
        let gz = enc.finish().expect("gz");
        assert_eq!(payload(&gz, true, 5000).map(|p| p.len()), Ok(5000));
        assert_eq!(payload(&gz, true, 4999), Err(DecodeError::TooLarge(4999)));
        assert!(matches!(
            payload(b"nope", true, 10),
            Err(DecodeError::Gzip(_))
        ));
        assert_eq!(payload(b"12345", false, 4), Err(DecodeError::TooLarge(4)));
    }
}
