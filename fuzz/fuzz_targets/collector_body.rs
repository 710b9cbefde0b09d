//! The collector's body checks (`body.rs`): capped gunzip, UTF-8, depth, sizes, batch shape.
//! The first byte picks the endpoint and whether the rest is gzip. Beyond "no panic", one
//! property: whatever the collector accepts, the worker's parser (serde_json into a `Value`)
//! reads as a JSON object, so an accepted request never becomes an undecodable payload, and
//! every event of an accepted batch has a type the worker knows and a usable `messageId`.
#![no_main]

use collector::body::{gunzip_limited, inspect, Limits};
use ingest_pipeline::message::Endpoint;
use libfuzzer_sys::fuzz_target;

const ENDPOINTS: [&str; 7] = [
    "batch", "track", "identify", "page", "screen", "group", "alias",
];

const LIMITS: Limits = Limits {
    max_event_bytes: 32 << 10,
    max_batch_bytes: 500 << 10,
    max_batch_events: 2000,
    partial_batches: false,
};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let endpoint = Endpoint::parse(ENDPOINTS[usize::from(selector & 0x7f) % ENDPOINTS.len()])
        .expect("a known endpoint");
    let gzip = selector & 0x80 != 0;
    let limit = LIMITS.for_endpoint(endpoint);
    let decoded;
    let json: &[u8] = if gzip {
        match gunzip_limited(body, limit) {
            Ok(out) => {
                assert!(out.len() <= limit, "gunzip went over its limit");
                decoded = out;
                &decoded
            }
            Err(error) => {
                assert!(error.status().is_client_error());
                return;
            }
        }
    } else {
        body
    };
    match inspect(endpoint, json, &LIMITS) {
        Ok(inspected) => {
            let value: serde_json::Value = serde_json::from_slice(json)
                .unwrap_or_else(|e| panic!("accepted, but the worker cannot parse it: {e}"));
            let object = value.as_object().expect("accepted a non-object");
            if endpoint == Endpoint::Batch {
                let batch = object["batch"]
                    .as_array()
                    .expect("accepted without a batch");
                assert_eq!(batch.len(), inspected.events);
                assert!(batch.iter().all(|e| e.is_object()));
                // And with a type the worker knows and a messageId it can key (or none).
                for event in batch {
                    let kind = event["type"].as_str().expect("accepted without a type");
                    assert!(ENDPOINTS[1..].contains(&kind), "accepted type {kind:?}");
                    let id = &event["messageId"];
                    assert!(id.is_null() || id.is_string(), "accepted messageId {id}");
                }
            }
        }
        Err(error) => assert!(error.status().is_client_error(), "{error}"),
    }
});
