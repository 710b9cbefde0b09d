//! The worker's events are parsed once into a `Doc` (spans of the delivery, the batch's context
//! shared) instead of a `serde_json::Value` tree per event. These tests hold what it produces to
//! what the `Value` path produced, byte for byte: each valid event's JSON (what HTTP sinks and
//! the sinks' queues send) and its BSON document (what MongoDB stores), and each invalid event
//! as its record keeps it. The oracle is the `Value` path as it stood before (`reference`
//! below): split, batch fields merged, nulls and empty ids dropped, views named, enriched.
//!
//! Inputs: every mobile SDK fixture of `tests/compat/fixtures` (the bodies those SDKs send) and
//! generated batches with what SDKs and hostile clients put in them: a batch `context`,
//! `integrations` and `sentAt` (or nulls), write keys, repeated keys, escapes, unicode, nulls,
//! empty ids, views named by `event`, numbers of every kind.

use std::path::Path;

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::*;

/// The `Value` path as it was: `decode::split` and `enrich::enrich` on `serde_json` maps.
mod reference {
    use chrono::{DateTime, Utc};
    use ingest_pipeline::built;
    use ingest_pipeline::message::{Endpoint, RequestMeta};
    use serde_json::{Map, Value};

    use crate::enrich::{corrected_timestamp, derived_message_id, format_time, parse_time};

    pub fn split(endpoint: Endpoint, json: &[u8]) -> Option<(Vec<Value>, Option<Value>)> {
        let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(json) else {
            return None;
        };
        body.remove("writeKey");
        if endpoint != Endpoint::Batch {
            drop_absent(&mut body);
            body.entry("type")
                .or_insert_with(|| Value::String(endpoint.as_str().to_owned()));
            fill_view_name(&mut body);
            return Some((vec![Value::Object(body)], None));
        }
        let Some(Value::Array(batch)) = body.remove("batch") else {
            return None;
        };
        let context = match body.remove("context") {
            Some(Value::Object(context)) => Some(context),
            _ => None,
        };
        let integrations = body.remove("integrations").filter(|v| !v.is_null());
        let sent_at = body.remove("sentAt").filter(|v| !v.is_null());
        let events = batch
            .into_iter()
            .map(|item| match item {
                Value::Object(mut event) => {
                    event.remove("writeKey");
                    drop_absent(&mut event);
                    fill_view_name(&mut event);
                    if let Some(shared) = &context {
                        let slot = event
                            .entry("context")
                            .or_insert_with(|| Value::Object(Map::new()));
                        if let Value::Object(own) = slot {
                            for (k, v) in shared {
                                own.entry(k.clone()).or_insert_with(|| v.clone());
                            }
                        }
                    }
                    if let Some(integrations) = &integrations {
                        event
                            .entry("integrations")
                            .or_insert_with(|| integrations.clone());
                    }
                    Value::Object(event)
                }
                other => other,
            })
            .collect();
        Some((events, sent_at))
    }

    fn drop_absent(event: &mut Map<String, Value>) {
        event.retain(|key, value| match value {
            Value::Null => false,
            Value::String(id) if id.is_empty() => {
                !["userId", "anonymousId"].contains(&key.as_str())
            }
            _ => true,
        });
    }

    fn fill_view_name(event: &mut Map<String, Value>) {
        let Some(kind) = event.get("type").and_then(Value::as_str) else {
            return;
        };
        if !built::is_view(kind) || event.get("name").is_some_and(|name| !name.is_null()) {
            return;
        }
        let name = event
            .get("event")
            .and_then(Value::as_str)
            .filter(|name| built::is_view_name(name))
            .map(str::to_owned);
        if let Some(name) = name {
            event.insert("name".to_owned(), Value::String(name));
        }
    }

    pub fn enrich(
        event: &mut Map<String, Value>,
        meta: &RequestMeta,
        seed: &str,
        index: usize,
        batch_sent_at: Option<&Value>,
    ) {
        if !event.contains_key("messageId") {
            event.insert(
                "messageId".into(),
                Value::String(derived_message_id(seed, index)),
            );
        }
        if !event.contains_key("sentAt") {
            if let Some(sent_at) = batch_sent_at {
                event.insert("sentAt".into(), sent_at.clone());
            }
        }
        event.insert(
            "receivedAt".into(),
            Value::String(format_time(meta.received_at)),
        );
        let original_value = event
            .get("originalTimestamp")
            .or_else(|| event.get("timestamp"))
            .cloned();
        let original: Option<DateTime<Utc>> = parse_time(original_value.as_ref());
        if original_value.is_none() || original.is_some() {
            let sent_at = parse_time(event.get("sentAt"));
            let corrected = corrected_timestamp(meta.received_at, original, sent_at);
            if let Some(value) = original_value {
                event.insert("originalTimestamp".into(), value);
            }
            event.insert("timestamp".into(), Value::String(format_time(corrected)));
        }
        event.insert("source".into(), Value::String(meta.source.clone()));
        event.insert("requestId".into(), Value::String(meta.request_id.clone()));
        let context = event
            .entry("context")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(context) = context {
            if let Some(ip) = &meta.client_ip {
                context
                    .entry("ip")
                    .or_insert_with(|| Value::String(ip.clone()));
            }
            if let Some(agent) = &meta.user_agent {
                context
                    .entry("userAgent")
                    .or_insert_with(|| Value::String(agent.clone()));
            }
        }
    }
}

fn registry() -> Registry {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
    Registry::load(&dir, ingest_schema::UnknownEventPolicy::Accept).expect("schemas")
}

const LIMITS: PayloadLimits = PayloadLimits {
    max_bytes: 4 << 20,
    max_events: 1000,
    max_built_bytes: 64 << 20,
};

fn properties() -> BasicProperties {
    let meta = RequestMeta {
        request_id: "req-1".into(),
        received_at: chrono::DateTime::parse_from_rfc3339("2026-12-05T10:00:02.500Z")
            .expect("time")
            .with_timezone(&chrono::Utc),
        source: "shop-ios".into(),
        endpoint: ingest_pipeline::message::Endpoint::Batch,
        client_ip: Some("203.0.113.9".into()),
        user_agent: Some("Shop/1.0 \"quoted\"".into()),
    };
    BasicProperties::default()
        .with_headers(meta.headers())
        .with_message_id("req-1".into())
}

/// Each valid event's JSON and BSON, in order; each event refused (by the plan, or as not
/// storable) as its invalid record keeps it, in order.
type Made = (Vec<(Vec<u8>, Vec<u8>)>, Vec<Value>);

/// What the `Value` path made of a payload.
fn by_reference(registry: &Registry, body: &[u8]) -> Made {
    let properties = properties();
    let meta = RequestMeta::from_properties(&properties, body);
    let mut made: Made = (Vec::new(), Vec::new());
    let Some((events, sent_at)) = reference::split(meta.endpoint, body) else {
        return made;
    };
    let seed = decode::content_seed(&meta, body);
    for (index, event) in events.into_iter().enumerate() {
        let Value::Object(mut event) = event else {
            made.1.push(event);
            continue;
        };
        reference::enrich(&mut event, &meta, &seed, index, sent_at.as_ref());
        match registry.validate(event) {
            Ok(valid) => match old_document(valid.as_map()) {
                Some(bson) => {
                    let json = serde_json::to_vec(valid.as_map()).expect("writes");
                    made.0.push((json, bson));
                }
                None => made.1.push(Value::Object(valid.into_map())),
            },
            Err(invalid) => made.1.push(invalid.event),
        }
    }
    made
}

/// The BSON the sink stored for a map: `_id`, then the fields, times as BSON dates; `None`
/// where it refused the event (a reserved key, a number BSON cannot hold).
fn old_document(event: &Map<String, Value>) -> Option<Vec<u8>> {
    if event.keys().any(|k| k == "_id" || k.starts_with('$')) {
        return None;
    }
    let source = event["source"].as_str()?;
    let message_id = event["messageId"].as_str()?;
    let mut document = bson::doc! {"_id": {"source": source, "messageId": message_id}};
    for (key, value) in event {
        let time = crate::sinks::mongo::DATE_FIELDS
            .contains(&key.as_str())
            .then(|| crate::enrich::parse_time(Some(value)))
            .flatten();
        match time {
            Some(time) => document.insert(key, bson::DateTime::from_chrono(time)),
            None => document.insert(key, bson::to_bson(value).ok()?),
        };
    }
    bson::to_vec(&document).ok()
}

fn by_doc(registry: &Registry, body: &[u8]) -> Made {
    let outcome = process(
        registry,
        &properties(),
        body,
        LIMITS,
        Documents::Made,
        &Enrichment::off(),
    );
    let valid = outcome
        .valid
        .iter()
        .map(|event| {
            let json = event.json().to_vec();
            let bson = event
                .document()
                .map(|d| d.as_bytes().to_vec())
                .unwrap_or_default();
            (json, bson)
        })
        .collect();
    let invalid = outcome
        .invalid
        .into_iter()
        .map(|record| record.event.unwrap_or(Value::Null))
        .collect();
    (valid, invalid)
}

fn same(registry: &Registry, body: &[u8]) -> Result<usize, TestCaseError> {
    let (want_valid, want_invalid) = by_reference(registry, body);
    prop_assert!(
        !want_valid.is_empty() || !want_invalid.is_empty(),
        "the reference made nothing of {}",
        String::from_utf8_lossy(body)
    );
    let (got_valid, got_invalid) = by_doc(registry, body);
    prop_assert_eq!(got_valid.len(), want_valid.len());
    for ((got_json, got_bson), (want_json, want_bson)) in got_valid.iter().zip(&want_valid) {
        prop_assert_eq!(
            String::from_utf8_lossy(got_json),
            String::from_utf8_lossy(want_json)
        );
        prop_assert!(
            got_bson == want_bson,
            "BSON differs for {}",
            String::from_utf8_lossy(got_json)
        );
    }
    prop_assert_eq!(got_invalid, want_invalid);
    Ok(want_valid.len())
}

#[test]
fn every_sdk_fixture_gives_the_bytes_the_value_path_gave() {
    let registry = registry();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/compat/fixtures");
    let mut checked = 0;
    let mut valid = 0;
    for entry in std::fs::read_dir(dir).expect("fixtures") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|ext| ext != "json") {
            continue;
        }
        let fixture: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        let mut body = fixture["body"].to_string();
        for (placeholder, value) in [
            ("$ANONYMOUS_ID_COLON_BASE64", "YTo="),
            ("$ANONYMOUS_ID_BASE64", "YQ=="),
            ("$ANONYMOUS_ID", "anon-1"),
            ("$WRITE_KEY", "wk"),
            ("$BASIC_AUTH", "Basic d2s6"),
            ("$MARKER", "run-1"),
            ("$USER_ID", "user-1"),
            ("$NOW", "2026-12-05T10:00:00.000Z"),
        ] {
            body = body.replace(placeholder, value);
        }
        for n in 1..=6 {
            body = body.replace(&format!("$MESSAGE_ID_{n}"), &format!("m-{n}"));
        }
        valid += same(&registry, body.as_bytes()).expect("the same bytes");
        checked += 1;
    }
    assert!(checked >= 8, "{checked} fixtures");
    // Six events per fixture, and the SDKs' events are valid under the shipped plan.
    assert!(
        valid >= checked * 5,
        "{valid} valid events of {checked} fixtures"
    );
}

const KEYS: &[&str] = &[
    "type",
    "event",
    "name",
    "userId",
    "anonymousId",
    "messageId",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "context",
    "integrations",
    "properties",
    "traits",
    "writeKey",
    "k\"ey",
    "ünï",
    "ip",
    "userAgent",
    "app",
    "receivedAt",
    "_id",
];

const STRINGS: &[&str] = &[
    "track",
    "screen",
    "page",
    "identify",
    "Cart",
    "Custom",
    "",
    "u-1",
    "2026-12-05T10:00:00.000Z",
    "2026-12-05T11:00:00+01:00",
    "not a time",
    "esc \"q\" \\ \n \u{e9}",
    "🦀",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        (0..STRINGS.len()).prop_map(|i| json!(STRINGS[i])),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((0..KEYS.len(), inner), 0..5).prop_map(|members| {
                Value::Object(
                    members
                        .into_iter()
                        .map(|(k, v)| (KEYS[k].to_owned(), v))
                        .collect(),
                )
            }),
        ]
    })
}

/// An event as text, members in the order given (repeats kept, for the parser to settle):
/// anything at all, or an SDK-like event the plan accepts with a write key, nulls, empty ids
/// and objects of anything among its members.
fn event_text() -> impl Strategy<Value = String> {
    let anything = (
        0..4usize,
        proptest::option::of(0..STRINGS.len()),
        any::<bool>(),
        proptest::collection::vec((0..KEYS.len(), value()), 0..7),
    )
        .prop_map(|(kind, name, ids, members)| {
            let mut parts = vec![format!("\"type\":{}", json!(STRINGS[kind]))];
            if let Some(name) = name {
                parts.push(format!("\"event\":{}", json!(STRINGS[name])));
            }
            if ids {
                parts.push("\"userId\":\"u-1\"".into());
            }
            for (key, value) in members {
                parts.push(format!("{}:{value}", json!(KEYS[key])));
            }
            format!("{{{}}}", parts.join(","))
        });
    let accepted = (
        0..4usize,
        proptest::collection::vec((0..ACCEPTED.len(), value()), 0..6),
        any::<bool>(),
    )
        .prop_map(|(kind, members, message_id)| {
            let mut parts = vec![
                "\"writeKey\":\"wk\"".to_owned(),
                format!("\"type\":{}", json!(STRINGS[kind])),
                "\"event\":\"Cart\"".into(),
                "\"anonymousId\":\"a-1\"".into(),
            ];
            if message_id {
                parts.push("\"messageId\":\"m-1\"".into());
            }
            for (key, value) in members {
                let (key, value) = match ACCEPTED[key] {
                    // Objects the envelope only asks to be objects.
                    key @ ("context" | "properties" | "traits" | "integrations") => {
                        (key, json!({"k": value, "ip": null}))
                    }
                    key => (key, value),
                };
                parts.push(format!("{}:{value}", json!(key)));
            }
            format!("{{{}}}", parts.join(","))
        });
    prop_oneof![anything, accepted]
}

/// Members an accepted event may have: the envelope's objects, keys it does not know of, and
/// `userId` (a null or empty one is dropped; a string one stands).
const ACCEPTED: &[&str] = &[
    "context",
    "properties",
    "traits",
    "integrations",
    "k\"ey",
    "ünï",
    "extra",
    "writeKey",
];

fn batch_text() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(event_text(), 1..6),
        proptest::option::of(value()),
        proptest::option::of(value()),
        proptest::option::of(0..STRINGS.len()),
        any::<bool>(),
    )
        .prop_map(|(events, context, integrations, sent_at, nulls)| {
            let mut parts = vec![format!("\"batch\":[{}]", events.join(","))];
            if let Some(context) = context {
                parts.push(format!("\"context\":{context}"));
            } else if nulls {
                parts.push("\"context\":null".into());
            }
            if let Some(integrations) = integrations {
                parts.push(format!("\"integrations\":{integrations}"));
            } else if nulls {
                parts.push("\"integrations\":null".into());
            }
            if let Some(sent_at) = sent_at {
                parts.push(format!("\"sentAt\":{}", json!(STRINGS[sent_at])));
            }
            parts.push("\"writeKey\":\"wk\"".into());
            format!("{{{}}}", parts.join(","))
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn generated_batches_give_the_bytes_the_value_path_gave(body in batch_text()) {
        thread_local! { static REGISTRY: Registry = registry(); }
        REGISTRY.with(|registry| same(registry, body.as_bytes()))?;
    }
}
