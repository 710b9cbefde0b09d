//! One delivery's CPU work, with no I/O: decode, split, enrich, validate, convert. Every event
//! ends either as a document for the sinks or as an invalid record; none is dropped.

use bson::Document;
use ingest_schema::{Issue, Registry};
use lapin::BasicProperties;
use serde_json::Value;

use crate::decode::{self, Element};
use crate::enrich::{self, RequestMeta};
use crate::invalid::InvalidRecord;
use crate::sinks::mongo::to_document;

#[derive(Debug, Default)]
pub struct Outcome {
    pub documents: Vec<Document>,
    pub invalid: Vec<InvalidRecord>,
}

pub fn process(
    registry: &Registry,
    properties: &BasicProperties,
    body: &[u8],
    max_payload_bytes: usize,
) -> Outcome {
    let meta = decode::request_meta(properties, body);
    let mut outcome = Outcome::default();
    let split = decode::payload(body, decode::is_gzip(properties), max_payload_bytes)
        .and_then(|json| decode::split(&meta.endpoint, &json));
    let split = match split {
        Ok(split) => split,
        Err(error) => {
            outcome
                .invalid
                .push(InvalidRecord::undecodable(error.to_string(), body, &meta));
            return outcome;
        }
    };
    for (index, element) in split.elements.into_iter().enumerate() {
        match element {
            Element::Event(mut event) => {
                enrich::enrich(&mut event, &meta, index, split.sent_at.as_ref());
                match registry.validate(event) {
                    Ok(valid) => match to_document(valid.into_map()) {
                        Ok(document) => outcome.documents.push(document),
                        Err(error) => outcome.invalid.push(storage_error(error, &meta)),
                    },
                    Err(invalid) => outcome.invalid.push(InvalidRecord::new(
                        "schema",
                        invalid.errors,
                        Some(invalid.event),
                        &meta,
                    )),
                }
            }
            Element::NotAnObject(value) => outcome.invalid.push(InvalidRecord::new(
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
    outcome
}

fn storage_error(message: String, meta: &RequestMeta) -> InvalidRecord {
    InvalidRecord::new(
        "storage",
        vec![Issue {
            pointer: String::new(),
            message: format!("cannot be stored: {message}"),
            schema: "storage".into(),
        }],
        None::<Value>,
        meta,
    )
}
