//! One delivery's CPU work, with no I/O: decode, split, enrich, validate, convert. Every event
//! ends either as a document for the sinks or as an invalid record; none is dropped.

use ingest_schema::{Issue, Registry};
use lapin::BasicProperties;
use serde_json::Value;

use crate::decode::{self, DecodeError, Element};
use crate::enrich::{self, RequestMeta};
use crate::invalid::InvalidRecord;
use crate::sinks::mongo::to_document;
use crate::sinks::Event;

#[derive(Debug)]
pub struct Outcome {
    pub meta: RequestMeta,
    /// Valid, enriched events, each checked to be storable.
    pub valid: Vec<Event>,
    pub invalid: Vec<InvalidRecord>,
}

/// What one payload may cost: bytes after gunzip, and events.
#[derive(Debug, Clone, Copy)]
pub struct PayloadLimits {
    pub max_bytes: usize,
    pub max_events: usize,
}

pub fn process(
    registry: &Registry,
    properties: &BasicProperties,
    body: &[u8],
    limits: PayloadLimits,
) -> Outcome {
    let meta = decode::request_meta(properties, body);
    let split = decode::payload(body, decode::is_gzip(properties), limits.max_bytes)
        .and_then(|json| decode::split(&meta.endpoint, &json))
        .and_then(|split| match split.elements.len() {
            n if n > limits.max_events => Err(DecodeError::Shape(format!(
                "the payload has {n} events, more than {}",
                limits.max_events
            ))),
            _ => Ok(split),
        });
    let mut valid_events = Vec::new();
    let mut invalid = Vec::new();
    match split {
        Err(error) => invalid.push(InvalidRecord::undecodable(error.to_string(), body, &meta)),
        Ok(split) => {
            for (index, element) in split.elements.into_iter().enumerate() {
                match element {
                    Element::Event(mut event) => {
                        enrich::enrich(&mut event, &meta, index, split.sent_at.as_ref());
                        match registry.validate(event) {
                            Ok(valid) => match to_document(valid.as_map()) {
                                Ok(_) => valid_events.push(valid.into_map()),
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
        }
    }
    Outcome {
        meta,
        valid: valid_events,
        invalid,
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
    };

    #[test]
    fn every_event_becomes_a_document_or_an_invalid_record() {
        let mut payload: serde_json::Value = serde_json::from_slice(&body(3)).expect("json");
        payload["batch"][1]["userId"] = json!(null);
        let payload = payload.to_string().into_bytes();
        let outcome = process(&registry(), &BasicProperties::default(), &payload, LIMITS);
        assert_eq!(outcome.valid.len(), 2);
        assert_eq!(outcome.invalid.len(), 1);
        assert_eq!(outcome.invalid[0].reason, "schema");
    }

    #[test]
    fn a_payload_with_too_many_events_is_kept_whole_as_invalid() {
        let payload = body(4);
        let outcome = process(&registry(), &BasicProperties::default(), &payload, LIMITS);
        assert!(outcome.valid.is_empty());
        assert_eq!(outcome.invalid.len(), 1);
        assert_eq!(outcome.invalid[0].reason, "decode");
        assert!(outcome.invalid[0].raw_base64.is_some());
        assert!(outcome.invalid[0].errors[0].message.contains("more than 3"));
    }

    #[test]
    fn redelivery_yields_the_same_documents() {
        let payload = br#"{"batch":[{"type":"track","event":"Custom","userId":"u"}]}"#;
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            "received_at".into(),
            ingest_pipeline::broker::long_string("2026-11-21T12:00:00.000Z"),
        );
        let properties = BasicProperties::default()
            .with_message_id("req-9".into())
            .with_headers(headers);
        let a = process(&registry(), &properties, payload, LIMITS);
        let b = process(&registry(), &properties, payload, LIMITS);
        assert_eq!(a.valid[0].get("messageId"), b.valid[0].get("messageId"));
        assert_eq!(a.valid, b.valid);
    }
}
