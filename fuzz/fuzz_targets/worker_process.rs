//! The worker's CPU path (`decode.rs` + `process.rs`): request metadata, capped gunzip, JSON,
//! batch split, enrichment, validation against `schemas/`, conversion to a document. The first
//! byte picks the endpoint header and gzip. Every payload must end as valid events or invalid
//! records (never nothing), and every invalid record must serialise (it is published as JSON).
#![no_main]

use std::sync::OnceLock;

use ingest_pipeline::broker::long_string;
use ingest_pipeline::headers;
use ingest_schema::{Registry, UnknownEventPolicy};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use libfuzzer_sys::fuzz_target;
use worker::process::{process, PayloadLimits};

const ENDPOINTS: [&str; 8] = [
    "batch", "track", "identify", "page", "screen", "group", "alias", "nonsense",
];

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
        Registry::load(&dir, UnknownEventPolicy::Accept).expect("schemas/ loads")
    })
}

const LIMITS: PayloadLimits = PayloadLimits {
    max_bytes: 1 << 20,
    max_events: 2000,
};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let mut table = FieldTable::default();
    table.insert(
        headers::ENDPOINT.into(),
        long_string(ENDPOINTS[usize::from(selector & 0x7f) % ENDPOINTS.len()]),
    );
    table.insert(
        headers::RECEIVED_AT.into(),
        long_string("2026-11-21T10:00:05.000Z"),
    );
    table.insert(headers::SOURCE.into(), long_string("fuzz"));
    let mut properties = BasicProperties::default()
        .with_message_id("fuzz-request".into())
        .with_headers(table);
    let gzip = selector & 0x80 != 0;
    if gzip {
        properties = properties.with_content_encoding("gzip".into());
    }
    let outcome = process(registry(), &properties, body, LIMITS);
    assert!(
        !outcome.valid.is_empty() || !outcome.invalid.is_empty() || is_empty_batch(body, gzip),
        "a payload vanished: neither valid nor invalid"
    );
    for record in &outcome.invalid {
        serde_json::to_vec(record).expect("an invalid record serialises");
    }
    for event in &outcome.valid {
        assert!(
            event.contains_key("messageId"),
            "a valid event without messageId"
        );
    }
});

/// `{"batch": []}` is the one payload with nothing in it to keep.
fn is_empty_batch(body: &[u8], gzip: bool) -> bool {
    worker::decode::payload(body, gzip, LIMITS.max_bytes)
        .ok()
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
        .and_then(|v| v.get("batch").and_then(|b| b.as_array().map(Vec::is_empty)))
        .unwrap_or(false)
}
