//! What an HTTP sink's body holds, and under which keys: each event as it is plus its own key
//! (`_ingest.eventKey`), the same in every batch it travels in, so the receiver can drop a
//! duplicate event; and the batch's `Idempotency-Key`, the same for every retry of a batch.

use std::time::Duration;

use crate::delivery::settle::{json_len, SinkRunner};
use crate::sinks::{EventId, EVENT_KEY_NAMESPACE};

use super::*;

fn sourced(source: &str, id: &str, name: &str) -> Arc<Event> {
    event(json!({"type": "track", "event": name, "messageId": id, "source": source}))
}

/// The `_ingest.eventKey` of each event a request held, by `messageId` and source.
fn event_keys(received: &Received) -> BTreeMap<(String, String), String> {
    let events: Vec<Value> = serde_json::from_slice(&received.body).expect("a JSON array");
    events
        .iter()
        .map(|e| {
            let id = (e["source"].as_str(), e["messageId"].as_str());
            let key = e[META_FIELD][EVENT_KEY_FIELD].as_str();
            match (id, key) {
                ((Some(source), Some(id)), Some(key)) => {
                    ((source.to_owned(), id.to_owned()), key.to_owned())
                }
                _ => panic!("an event without its key: {e}"),
            }
        })
        .collect()
}

#[test]
fn json_body_is_an_array_that_parses_back_to_the_events() {
    let batch = batch();
    let body = encode(&batch.events, BodyFormat::Json).expect("encode");
    let parsed: Vec<Event> = serde_json::from_slice(&body).expect("a JSON array of objects");
    assert_eq!(parsed, events_of(&batch));
    assert_eq!(encode(&[], BodyFormat::Json).expect("encode"), b"[]");
}

#[test]
fn ndjson_body_is_one_event_per_line_with_trailing_newline() {
    let batch = batch();
    let body = encode(&batch.events, BodyFormat::Ndjson).expect("encode");
    let text = String::from_utf8(body).expect("utf-8");
    assert!(text.ends_with('\n'));
    let parsed: Vec<Event> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("one object per line"))
        .collect();
    assert_eq!(parsed, events_of(&batch));
    assert!(encode(&[], BodyFormat::Ndjson).expect("encode").is_empty());
}

#[tokio::test]
async fn the_same_event_in_two_batches_with_other_neighbours_carries_the_same_event_key() {
    let server = TestServer::start(|_| StatusCode::OK.into_response()).await;
    let sink = sink(&server.url);
    let twice = sourced("shop-ios", "m-1", "Order Completed");
    // The first copy in one batch; the second, say from a request the spool published twice,
    // with other neighbours and in another place, under another batch key.
    let first = Batch {
        key: "batch-a".to_owned(),
        events: vec![twice.clone(), sourced("shop-ios", "m-2", "Product Viewed")],
    };
    let second = Batch {
        key: "batch-b".to_owned(),
        events: vec![
            sourced("shop-web", "m-1", "Order Completed"),
            sourced("shop-ios", "m-3", "Product Viewed"),
            twice,
        ],
    };
    assert_eq!(sink.deliver(&first).await, Ok(()));
    assert_eq!(sink.deliver(&second).await, Ok(()));

    let received = server.received();
    assert_eq!(received.len(), 2);
    let batch_keys: Vec<_> = received
        .iter()
        .map(|r| header(r, "idempotency-key"))
        .collect();
    assert_eq!(batch_keys, [Some("batch-a"), Some("batch-b")]);
    let (a, b) = (event_keys(&received[0]), event_keys(&received[1]));
    let ios = ("shop-ios".to_owned(), "m-1".to_owned());
    let web = ("shop-web".to_owned(), "m-1".to_owned());
    assert_eq!(a.get(&ios), b.get(&ios), "one event, one key");
    // Anyone can compute it again: the UUIDv5 of `<source>\n<messageId>`.
    let expected = uuid::Uuid::new_v5(&EVENT_KEY_NAMESPACE, b"shop-ios\nm-1").to_string();
    assert_eq!(a.get(&ios), Some(&expected));
    assert_ne!(b.get(&web), b.get(&ios), "the same id from another source");
    let mut all: Vec<&String> = a.values().chain(b.values()).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 4, "four events, four keys: {all:?}");
}

#[test]
fn an_events_own_ingest_field_is_replaced_and_the_key_costs_at_most_its_stated_bytes() {
    let plain = sourced("shop-ios", "m-1", "Signed Up");
    let forged = event(
        json!({"type": "track", "messageId": "m-1", "source": "shop-ios",
                              "_ingest": {"eventKey": "forged", "x": 1}}),
    );
    let with = encode(std::slice::from_ref(&plain), BodyFormat::Ndjson).expect("encode");
    assert_eq!(
        with.len(),
        json_len(&plain) + 1 + EVENT_KEY_BYTES,
        "the overhead is exact"
    );

    let body = encode(std::slice::from_ref(&forged), BodyFormat::Json).expect("encode");
    assert!(body.len() <= json_len(&forged) + 2 + EVENT_KEY_BYTES);
    let sent: Vec<Value> = serde_json::from_slice(&body).expect("JSON");
    let key = EventId::of(&forged).expect("an id").key().to_string();
    assert_eq!(sent[0]["_ingest"], json!({"eventKey": key}));
    assert_eq!(sent[0]["messageId"], json!("m-1"), "the rest as it was");
    let keyless = event(json!({"type": "identify", "messageId": "m-9"}));
    let body = encode(std::slice::from_ref(&keyless), BodyFormat::Json).expect("encode");
    let sent: Vec<Event> = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(sent, [keyless.as_ref().clone()], "no source: sent as it is");
}

#[test]
fn batches_are_cut_with_the_event_key_counted_against_batch_max_bytes() {
    let events: Vec<Arc<Event>> = (0..4)
        .map(|i| sourced("shop-ios", &format!("m-{i}"), "Viewed"))
        .collect();
    let sizes: Vec<usize> = events.iter().map(|e| json_len(e)).collect();
    // Room for the four events as they are, not with their keys.
    let bytes = 1 + sizes.iter().map(|s| s + 1).sum::<usize>();
    let delivery = DeliverySettings {
        batch_max_bytes: bytes,
        ..DeliverySettings::default()
    };
    let sink = Arc::new(sink("http://127.0.0.1:9/"));
    let runner = SinkRunner::new(sink, delivery, vec![Duration::from_secs(1)], 3);
    let batches = runner.cut(&events, &sizes, None);
    assert!(batches.len() > 1, "one batch of {bytes} bytes and more");
    for (_, batch) in batches {
        let body = encode(&batch.events, BodyFormat::Json).expect("encode");
        assert!(body.len() <= bytes, "{} bytes", body.len());
    }
}

#[tokio::test]
async fn a_retried_batch_carries_the_same_idempotency_key() {
    let server = TestServer::start(|_| StatusCode::NO_CONTENT.into_response()).await;
    let sink = sink(&server.url);
    let batch = batch();
    let other = Batch {
        key: "batch-other".to_owned(),
        events: batch.events.clone(),
    };
    assert_eq!(sink.deliver(&batch).await, Ok(()));
    assert_eq!(sink.deliver(&batch).await, Ok(()));
    assert_eq!(sink.deliver(&other).await, Ok(()));

    let keys: Vec<Option<String>> = server
        .received()
        .iter()
        .map(|r| header(r, "idempotency-key").map(str::to_owned))
        .collect();
    assert_eq!(
        keys,
        vec![
            Some("batch-7f3a".to_owned()),
            Some("batch-7f3a".to_owned()),
            Some("batch-other".to_owned()),
        ]
    );
}

/// The body copies each event's kept JSON and adds its key before the closing brace: the bytes
/// are exactly what writing the event with its key anew gives, whatever the event holds.
#[test]
fn a_body_from_kept_json_is_byte_for_byte_the_body_written_anew() {
    let cases = [
        json!({"type": "track", "event": "A", "messageId": "m1", "source": "ios"}),
        json!({"messageId": "m2", "source": "web", "properties": {"q": "é\"\\\n\u{1}", "n": [1, 2.5, null, true]}, "context": {}}),
        json!({"messageId": "m3", "source": "web", META_FIELD: {"eventKey": "forged"}, "z": 1}),
        json!({"type": "track", "event": "no ids"}),
        json!({"messageId": "m4"}),
        json!({}),
    ];
    for format in [BodyFormat::Json, BodyFormat::Ndjson] {
        let events: Vec<Arc<Event>> = cases.iter().map(|c| event(c.clone())).collect();
        let anew = {
            let mut body = Vec::new();
            for (i, e) in events.iter().enumerate() {
                if format == BodyFormat::Json {
                    body.push(if i == 0 { b'[' } else { b',' });
                }
                serde_json::to_writer(&mut body, &Outgoing(e)).expect("written");
                if format == BodyFormat::Ndjson {
                    body.push(b'\n');
                }
            }
            if format == BodyFormat::Json {
                body.push(b']');
            }
            body
        };
        // Asked for first, as the lanes do when they size a batch.
        assert!(events.iter().all(|e| !e.json().is_empty()));
        let kept = encode(&events, format).expect("encoded");
        assert_eq!(
            String::from_utf8_lossy(&kept),
            String::from_utf8_lossy(&anew)
        );
    }
}
