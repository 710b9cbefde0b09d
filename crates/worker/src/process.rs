//! One delivery's CPU work, with no I/O: decode, split, enrich, validate, convert. Every event
//! ends either as a document for the sinks or as an invalid record; none is dropped.

use ingest_pipeline::message::{is_gzip, RefusedEvent, RequestMeta};
use ingest_schema::{Issue, Registry};
use lapin::BasicProperties;
use serde_json::Value;

use crate::decode::{self, DecodeError, Element};
use crate::enrich;
use crate::invalid::{scrub_write_key, InvalidRecord};
use crate::sinks::mongo::to_document;
use crate::sinks::Event;

#[derive(Debug)]
pub struct Outcome {
    pub meta: RequestMeta,
    /// Valid, enriched events, each checked to be storable.
    pub valid: Vec<Event>,
    pub invalid: Vec<InvalidRecord>,
}

/// What one payload may cost: bytes after gunzip, events, and the bytes its events may come
/// to once built (batch fields merged into each, the worker's own fields added).
#[derive(Debug, Clone, Copy)]
pub struct PayloadLimits {
    pub max_bytes: usize,
    pub max_events: usize,
    pub max_built_bytes: usize,
}

/// Whether valid events get their MongoDB document here. Made (when MongoDB is a sink), it is
/// also the check that the event is storable, and the sink sends those bytes as they are; a
/// worker without the MongoDB sink skips it (a tenth of its CPU on the benchmark's payloads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Documents {
    Made,
    NotNeeded,
}

/// What enrichment adds to one event, at most: fixed-size fields plus what comes from the
/// request.
fn enrichment_bytes(meta: &RequestMeta) -> usize {
    const FIXED: usize = 400;
    FIXED
        + meta.source.len()
        + meta.request_id.len()
        + meta.client_ip.as_ref().map_or(0, String::len)
        + meta.user_agent.as_ref().map_or(0, String::len)
}

/// Processes one payload. A panic in this pure code (a bug, or input that finds one) would
/// otherwise recur on every redelivery; it is caught, and the payload kept whole as invalid
/// with reason `internal`.
pub fn process(
    registry: &Registry,
    properties: &BasicProperties,
    body: &[u8],
    limits: PayloadLimits,
    documents: Documents,
) -> Outcome {
    let run = std::panic::AssertUnwindSafe(|| {
        let meta = RequestMeta::from_properties(properties, body);
        process_payload(registry, properties, body, limits, documents, meta)
    });
    match std::panic::catch_unwind(run) {
        Ok(outcome) => outcome,
        Err(panic) => {
            // Read again: the panic took the first reading with it (the rare path pays, not
            // every delivery).
            let meta = RequestMeta::from_properties(properties, body);
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            tracing::error!(request_id = %meta.request_id, panic = %what, "processing a payload panicked; it is kept as invalid");
            metrics::counter!("worker_processing_panics_total").increment(1);
            let mut record = InvalidRecord::undecodable(
                format!("the worker failed on this payload: {what}"),
                body,
                &meta,
            );
            record.reason = "internal";
            Outcome {
                meta,
                valid: Vec::new(),
                invalid: vec![record],
            }
        }
    }
}

fn process_payload(
    registry: &Registry,
    properties: &BasicProperties,
    body: &[u8],
    limits: PayloadLimits,
    documents: Documents,
    meta: RequestMeta,
) -> Outcome {
    let json = match decode::payload(body, is_gzip(properties), limits.max_bytes) {
        Ok(json) => json,
        Err(error) => return undecodable(meta, &error, body),
    };
    let per_event = enrichment_bytes(&meta);
    let split =
        decode::split(meta.endpoint, &json, limits.max_built_bytes, per_event).and_then(|split| {
            match split.elements.len() {
                n if n > limits.max_events => Err(DecodeError::Shape(format!(
                    "the payload has {n} events, more than {}",
                    limits.max_events
                ))),
                _ => Ok(split),
            }
        });
    let split = match split {
        Ok(split) => split,
        // The decoded text is kept (not the gzip bytes), so the write key can be scrubbed.
        Err(error) => return undecodable(meta, &error, &json),
    };
    // Ids for events that came without one: from the request's content, so a client's retry
    // of the same request (a new request id) gets the same ids.
    // Hashing a 500 KB payload costs as much as validating it: only when an event needs it.
    let mut seed: Option<String> = None;
    let mut valid_events = Vec::new();
    let mut invalid = Vec::new();
    // Events the collector refused alone (too large) while it accepted the batch: kept, cut.
    let too_large: Vec<RefusedEvent> = RefusedEvent::read(properties.headers().as_ref())
        .into_iter()
        .filter(|r| r.code == RefusedEvent::TOO_LARGE)
        .collect();
    // Their text as sent (the split has merged the batch's context into them and sorted keys).
    let sent = if too_large.is_empty() {
        Vec::new()
    } else {
        raw_elements(&json)
    };
    for (index, element) in split.elements.into_iter().enumerate() {
        if let Some(refused) = too_large.iter().find(|r| r.index == index) {
            let text = match (sent.get(index), element) {
                (Some(raw), _) => raw.get().to_owned(),
                (None, Element::Event(event)) => Value::Object(event).to_string(),
                (None, Element::NotAnObject(value)) => value.to_string(),
            };
            invalid.push(refused_too_large(refused, &text, &meta));
            continue;
        }
        match element {
            Element::Event(mut event) => {
                if enrich::needs_message_id(&event) && seed.is_none() {
                    seed = Some(decode::content_seed(&meta, &json));
                }
                let seed = seed.as_deref().unwrap_or_default();
                enrich::enrich(&mut event, &meta, seed, index, split.sent_at.as_ref());
                match registry.validate(event) {
                    Ok(valid) if documents == Documents::NotNeeded => {
                        valid_events.push(Event::from(valid.into_map()));
                    }
                    Ok(valid) => match to_document(valid.as_map()) {
                        Ok(document) => {
                            valid_events.push(Event::with_document(valid.into_map(), document))
                        }
                        Err(error) => {
                            let event = Value::Object(valid.into_map());
                            invalid.push(storage_error(error, Some(event), &meta));
                        }
                    },
                    Err(rejected) => invalid.push(InvalidRecord::new(
                        "schema",
                        rejected.errors,
                        Some(rejected.event),
                        &meta,
                    )),
                }
            }
            Element::NotAnObject(value) => invalid.push(InvalidRecord::new(
                "schema",
                vec![Issue {
                    pointer: String::new(),
                    message: format!("batch[{index}] is not a JSON object"),
                    schema: "payload".into(),
                }],
                Some(value),
                &meta,
            )),
        }
    }
    Outcome {
        meta,
        valid: valid_events,
        invalid,
    }
}

/// How much of an event the collector refused as too large is kept in its invalid record.
pub const REFUSED_KEPT_CHARS: usize = 1024;

/// A batch's elements as raw text, if the payload reads as one (an empty list otherwise).
fn raw_elements(json: &[u8]) -> Vec<&serde_json::value::RawValue> {
    #[derive(serde::Deserialize)]
    struct Elements<'a> {
        #[serde(borrow)]
        batch: Vec<&'a serde_json::value::RawValue>,
    }
    serde_json::from_slice::<Elements<'_>>(json)
        .map(|e| e.batch)
        .unwrap_or_default()
}

/// An event the collector refused as too large: the first [`REFUSED_KEPT_CHARS`] characters of
/// its JSON as sent (as a string, its write key scrubbed), its size as sent and a hash of its
/// bytes as sent (a name-based UUID), so that the client's record can be matched without
/// keeping the bulk.
fn refused_too_large(refused: &RefusedEvent, sent: &str, meta: &RequestMeta) -> InvalidRecord {
    let hash = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, sent.as_bytes());
    let scrubbed = scrub_write_key(sent.as_bytes());
    let kept: String = String::from_utf8_lossy(&scrubbed)
        .chars()
        .take(REFUSED_KEPT_CHARS)
        .collect();
    InvalidRecord::new(
        "too_large",
        vec![Issue {
            pointer: String::new(),
            message: format!(
                "batch[{}] was refused by the collector: {} bytes as sent, more than collector.max_event_bytes; kept cut to its first {} characters; hash {hash}",
                refused.index, refused.bytes, REFUSED_KEPT_CHARS
            ),
            schema: "collector".into(),
        }],
        Some(Value::String(kept)),
        meta,
    )
}

/// A payload that cannot be split into events within the limits: kept whole, once.
fn undecodable(meta: RequestMeta, error: &DecodeError, kept: &[u8]) -> Outcome {
    let mut record = InvalidRecord::undecodable(error.to_string(), kept, &meta);
    record.reason = error.reason();
    Outcome {
        meta,
        valid: Vec::new(),
        invalid: vec![record],
    }
}

/// An event the database cannot or will not store, kept with the reason.
pub fn storage_error(message: String, event: Option<Value>, meta: &RequestMeta) -> InvalidRecord {
    InvalidRecord::new(
        "storage",
        vec![Issue {
            pointer: String::new(),
            message: format!("cannot be stored: {message}"),
            schema: "storage".into(),
        }],
        event,
        meta,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use ingest_schema::UnknownEventPolicy;
    use serde_json::json;

    fn registry() -> Registry {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
        Registry::load(&dir, UnknownEventPolicy::Accept).expect("schemas")
    }

    fn body(events: usize) -> Vec<u8> {
        let batch: Vec<_> = (0..events)
            .map(|i| json!({"type":"track","event":"Custom","userId":"u","messageId":format!("m{i}")}))
            .collect();
        json!({ "batch": batch }).to_string().into_bytes()
    }

    const LIMITS: PayloadLimits = PayloadLimits {
        max_bytes: 1 << 20,
        max_events: 3,
        max_built_bytes: 4 << 20,
    };

    #[test]
    fn every_event_becomes_a_document_or_an_invalid_record() {
        let mut payload: serde_json::Value = serde_json::from_slice(&body(3)).expect("json");
        payload["batch"][1]["userId"] = json!(null);
        let payload = payload.to_string().into_bytes();
        let outcome = process(
            &registry(),
            &BasicProperties::default(),
            &payload,
            LIMITS,
            Documents::Made,
        );
        assert_eq!(outcome.valid.len(), 2);
        assert_eq!(outcome.invalid.len(), 1);
        assert_eq!(outcome.invalid[0].reason, "schema");
    }

    /// Without the MongoDB sink no document is made; the events and the verdicts are the same.
    #[test]
    fn without_documents_the_events_and_verdicts_are_the_same() {
        let mut payload: serde_json::Value = serde_json::from_slice(&body(3)).expect("json");
        payload["batch"][1]["userId"] = json!(null);
        let payload = payload.to_string().into_bytes();
        let received = BasicProperties::default().with_timestamp(1_764_000_000);
        let made = process(&registry(), &received, &payload, LIMITS, Documents::Made);
        let skipped = process(
            &registry(),
            &received,
            &payload,
            LIMITS,
            Documents::NotNeeded,
        );
        assert!(made.valid.iter().all(|e| e.document().is_some()));
        assert!(skipped.valid.iter().all(|e| e.document().is_none()));
        let fields = |o: &Outcome| {
            o.valid
                .iter()
                .map(|e| e.fields().clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(fields(&made), fields(&skipped));
        assert_eq!(fields(&made).len(), 2);
        let reasons = |o: &Outcome| o.invalid.iter().map(|r| r.reason).collect::<Vec<_>>();
        assert_eq!(reasons(&made), reasons(&skipped));
    }

    /// The collector accepted the batch but refused its second event as too large: that one
    /// is kept as invalid, cut, with its size and a hash; the others are stored.
    #[test]
    fn an_event_the_collector_refused_as_too_large_is_kept_cut_and_the_others_stored() {
        let blob = "x".repeat(5000);
        let sent = format!(
            r#"{{"type":"track","event":"Custom","userId":"u","messageId":"m1","writeKey":"secret-key","properties":{{"blob":"{blob}"}}}}"#
        );
        let event = |id: &str| {
            format!(r#"{{"type":"track","event":"Custom","userId":"u","messageId":"{id}"}}"#)
        };
        let payload = format!(
            r#"{{"context":{{"app":{{"name":"Shop"}}}},"batch":[{},{sent},{}]}}"#,
            event("m0"),
            event("m2")
        );
        let refused = [RefusedEvent {
            index: 1,
            code: "event_too_large".into(),
            bytes: sent.len(),
        }];
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            ingest_pipeline::message::headers::REFUSED_EVENTS.into(),
            ingest_pipeline::broker::long_string(&RefusedEvent::header(&refused)),
        );
        let properties = BasicProperties::default().with_headers(headers);
        let outcome = process(
            &registry(),
            &properties,
            payload.as_bytes(),
            LIMITS,
            Documents::Made,
        );
        assert_eq!(outcome.valid.len(), 2);
        assert_eq!(outcome.invalid.len(), 1);
        let record = &outcome.invalid[0];
        assert_eq!(record.reason, "too_large");
        let kept = record
            .event
            .as_ref()
            .and_then(|e| e.as_str())
            .expect("cut JSON");
        assert_eq!(kept.chars().count(), REFUSED_KEPT_CHARS);
        // The event as sent: its own key order, no merged context, its write key scrubbed.
        assert!(
            kept.starts_with(r#"{"type":"track","event":"Custom","userId":"u","messageId":"m1","writeKey":"[redacted]""#),
            "{kept}"
        );
        assert!(
            !kept.contains("context") && !kept.contains("secret-key"),
            "{kept}"
        );
        let message = &record.errors[0].message;
        let hash = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, sent.as_bytes());
        assert!(message.contains("batch[1]"), "{message}");
        assert!(
            message.contains(&format!("{} bytes", sent.len())),
            "{message}"
        );
        assert!(message.contains(&format!("hash {hash}")), "{message}");
    }

    #[test]
    fn a_payload_with_too_many_events_is_kept_whole_as_invalid() {
        let payload = body(4);
        let outcome = process(
            &registry(),
            &BasicProperties::default(),
            &payload,
            LIMITS,
            Documents::Made,
        );
        assert!(outcome.valid.is_empty());
        assert_eq!(outcome.invalid.len(), 1);
        assert_eq!(outcome.invalid[0].reason, "decode");
        assert!(outcome.invalid[0].raw_base64.is_some());
        assert!(outcome.invalid[0].errors[0].message.contains("more than 3"));
    }

    /// The storability check makes the event's BSON bytes once; the MongoDB sink sends those.
    #[test]
    fn a_valid_event_carries_the_bson_bytes_its_check_made() {
        let payload =
            br#"{"batch":[{"type":"track","event":"Custom","userId":"u","messageId":"m1"}]}"#;
        let outcome = process(
            &registry(),
            &BasicProperties::default(),
            payload,
            LIMITS,
            Documents::Made,
        );
        let event = &outcome.valid[0];
        let made = to_document(event).expect("storable");
        assert_eq!(event.document(), Some(&made));
    }

    /// Segment's API reads a null optional field as absent; the Python SDKs send
    /// `"anonymousId": null` with a `user_id`, analytics.js `"userId": null` for a visitor.
    #[test]
    fn null_optional_fields_are_absent_as_in_segments_api() {
        let payload = br#"{"batch":[
            {"type":"track","event":"Custom","userId":"u-1","anonymousId":null,"messageId":null},
            {"type":"page","userId":null,"anonymousId":"a-1","name":null,"properties":null}
        ]}"#;
        let outcome = process(
            &registry(),
            &BasicProperties::default(),
            payload,
            LIMITS,
            Documents::Made,
        );
        assert!(outcome.invalid.is_empty(), "{:?}", outcome.invalid);
        assert_eq!(outcome.valid.len(), 2);
        assert!(!outcome.valid[0].contains_key("anonymousId"));
        assert!(outcome.valid[0]["messageId"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(!outcome.valid[1].contains_key("userId"));
        assert!(!outcome.valid[1].contains_key("properties"));
    }

    /// The worker copies a batch's `context` into each event; 2,000 events under a 330 KB
    /// context once became a 660 MB message. What a delivery builds is bounded, and a payload
    /// past the bound is kept whole, once, as invalid.
    #[test]
    fn an_amplifying_batch_is_kept_whole_as_invalid_not_multiplied() {
        let events: Vec<_> = (0..500)
            .map(|i| json!({"type":"track","event":"Custom","userId":"u","messageId":format!("m{i}")}))
            .collect();
        let payload = json!({"context": {"pad": "x".repeat(100_000)}, "batch": events})
            .to_string()
            .into_bytes();
        let limits = PayloadLimits {
            max_events: 2000,
            ..LIMITS
        };
        let outcome = process(
            &registry(),
            &BasicProperties::default(),
            &payload,
            limits,
            Documents::Made,
        );
        assert!(outcome.valid.is_empty());
        assert_eq!(outcome.invalid.len(), 1);
        assert_eq!(outcome.invalid[0].reason, "too_large");
        let kept = serde_json::to_vec(&outcome.invalid[0]).expect("json");
        assert!(kept.len() < 2 * payload.len(), "{} bytes kept", kept.len());
    }

    /// A client retries a request whose confirm timed out; the collector gives the retry a new
    /// request id. Events without a `messageId` must still get the same ids both times.
    #[test]
    fn a_retried_request_without_message_ids_gets_the_same_ids() {
        let payload = br#"{"batch":[{"type":"track","event":"Custom","userId":"u"}]}"#;
        let first = BasicProperties::default().with_message_id("req-1".into());
        let retry = BasicProperties::default().with_message_id("req-2".into());
        let a = process(&registry(), &first, payload, LIMITS, Documents::Made);
        let b = process(&registry(), &retry, payload, LIMITS, Documents::Made);
        assert_eq!(a.valid[0].get("messageId"), b.valid[0].get("messageId"));
        let other = br#"{"batch":[{"type":"track","event":"Other","userId":"u"}]}"#;
        let c = process(&registry(), &retry, other, LIMITS, Documents::Made);
        assert_ne!(a.valid[0].get("messageId"), c.valid[0].get("messageId"));
    }

    /// A sendBeacon body carries its write key; the invalid queue must not keep it.
    #[test]
    fn an_undecodable_payload_is_kept_without_its_write_key() {
        for payload in [
            &br#"{"writeKey":"sekrit-key","batch":[{"type":"track""#[..],
            br#"{"writeKey" : "sekrit-key","batch":7}"#,
        ] {
            let outcome = process(
                &registry(),
                &BasicProperties::default(),
                payload,
                LIMITS,
                Documents::Made,
            );
            assert_eq!(outcome.invalid.len(), 1);
            let kept = serde_json::to_string(&outcome.invalid[0]).expect("json");
            let raw = outcome.invalid[0].raw_base64.as_deref().expect("raw kept");
            let raw = base64::engine::general_purpose::STANDARD
                .decode(raw)
                .expect("base64");
            let raw = String::from_utf8_lossy(&raw);
            assert!(
                !kept.contains("sekrit-key") && !raw.contains("sekrit-key"),
                "{raw}"
            );
            assert!(
                raw.contains("batch"),
                "the rest of the payload is kept: {raw}"
            );
        }
    }

    #[test]
    fn redelivery_yields_the_same_documents() {
        let payload = br#"{"batch":[{"type":"track","event":"Custom","userId":"u"}]}"#;
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            ingest_pipeline::headers::RECEIVED_AT.into(),
            ingest_pipeline::broker::long_string("2026-11-21T12:00:00.000Z"),
        );
        let properties = BasicProperties::default()
            .with_message_id("req-9".into())
            .with_headers(headers);
        let a = process(&registry(), &properties, payload, LIMITS, Documents::Made);
        let b = process(&registry(), &properties, payload, LIMITS, Documents::Made);
        assert_eq!(a.valid[0].get("messageId"), b.valid[0].get("messageId"));
        assert_eq!(a.valid, b.valid);
    }
}
