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
        &Enrichment::off(),
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
    let made = process(
        &registry(),
        &received,
        &payload,
        LIMITS,
        Documents::Made,
        &Enrichment::off(),
    );
    let skipped = process(
        &registry(),
        &received,
        &payload,
        LIMITS,
        Documents::NotNeeded,
        &Enrichment::off(),
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
        &Enrichment::off(),
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
        &Enrichment::off(),
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
    let payload = br#"{"batch":[{"type":"track","event":"Custom","userId":"u","messageId":"m1"}]}"#;
    let outcome = process(
        &registry(),
        &BasicProperties::default(),
        payload,
        LIMITS,
        Documents::Made,
        &Enrichment::off(),
    );
    let event = &outcome.valid[0];
    let made = to_document(event.doc()).expect("storable");
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
        &Enrichment::off(),
    );
    assert!(outcome.invalid.is_empty(), "{:?}", outcome.invalid);
    assert_eq!(outcome.valid.len(), 2);
    assert!(!outcome.valid[0].fields().contains_key("anonymousId"));
    assert!(outcome.valid[0].fields()["messageId"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert!(!outcome.valid[1].fields().contains_key("userId"));
    assert!(!outcome.valid[1].fields().contains_key("properties"));
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
        &Enrichment::off(),
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
    let a = process(
        &registry(),
        &first,
        payload,
        LIMITS,
        Documents::Made,
        &Enrichment::off(),
    );
    let b = process(
        &registry(),
        &retry,
        payload,
        LIMITS,
        Documents::Made,
        &Enrichment::off(),
    );
    assert_eq!(
        a.valid[0].fields().get("messageId"),
        b.valid[0].fields().get("messageId")
    );
    let other = br#"{"batch":[{"type":"track","event":"Other","userId":"u"}]}"#;
    let c = process(
        &registry(),
        &retry,
        other,
        LIMITS,
        Documents::Made,
        &Enrichment::off(),
    );
    assert_ne!(
        a.valid[0].fields().get("messageId"),
        c.valid[0].fields().get("messageId")
    );
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
            &Enrichment::off(),
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
    let a = process(
        &registry(),
        &properties,
        payload,
        LIMITS,
        Documents::Made,
        &Enrichment::off(),
    );
    let b = process(
        &registry(),
        &properties,
        payload,
        LIMITS,
        Documents::Made,
        &Enrichment::off(),
    );
    assert_eq!(
        a.valid[0].fields().get("messageId"),
        b.valid[0].fields().get("messageId")
    );
    assert_eq!(a.valid, b.valid);
}

/// Valid events read their strings from the delivery's text; a small valid event beside a
/// large field it does not carry is copied out, so it does not keep the text alive.
#[test]
fn a_small_valid_event_does_not_hold_a_large_delivery_text() {
    let junk = "x".repeat(200_000);
    let sparse = json!({"junk": junk, "batch": [
        {"type": "track", "event": "Custom", "userId": "u", "messageId": "m1"}
    ]})
    .to_string();
    let outcome = process(
        &registry(),
        &BasicProperties::default(),
        sparse.as_bytes(),
        LIMITS,
        Documents::NotNeeded,
        &Enrichment::off(),
    );
    assert_eq!(outcome.valid.len(), 1);
    assert_eq!(outcome.valid[0].doc().text(), "", "copied out of the text");
    assert_eq!(outcome.valid[0].fields()["messageId"], json!("m1"));

    // Events that are most of the text keep sharing it.
    let big = "y".repeat(100_000);
    let dense = json!({"batch": [
        {"type": "track", "event": "Custom", "userId": "u", "messageId": "m1",
         "properties": {"big": big}}
    ]})
    .to_string();
    let outcome = process(
        &registry(),
        &BasicProperties::default(),
        dense.as_bytes(),
        LIMITS,
        Documents::NotNeeded,
        &Enrichment::off(),
    );
    assert_eq!(outcome.valid.len(), 1);
    assert_eq!(outcome.valid[0].doc().text().len(), dense.len());
}

fn enrichment(policy: &str) -> Enrichment {
    let enrich = ingest_pipeline::settings::EnrichSettings {
        user_agent: true,
        geo_database: Some(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/geo-test.mmdb"),
        ),
        bots: Vec::new(),
        hash_secret: ingest_pipeline::settings::Secret::new("a-secret-of-16-chars"),
    };
    let default: ingest_pipeline::settings::SourcePolicy =
        serde_json::from_str(policy).expect("a policy");
    let policy = ingest_pipeline::settings::PolicySettings {
        default,
        sources: Default::default(),
    };
    Enrichment::from_settings(&enrich, &policy).expect("enrichment")
}

const GOOGLEBOT: &str = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";
const CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";

fn run(enrichment: &Enrichment, batch: serde_json::Value) -> Outcome {
    let payload = json!({ "batch": batch }).to_string();
    let limits = PayloadLimits {
        max_events: 2000,
        ..LIMITS
    };
    process(
        &registry(),
        &BasicProperties::default(),
        payload.as_bytes(),
        limits,
        Documents::Made,
        enrichment,
    )
}

#[test]
fn a_bot_goes_to_the_invalid_queue_under_its_policy_and_a_browser_is_parsed_and_located() {
    let enrichment = enrichment(
        r#"{"bots":"invalid","ip":"truncate","events_per_second":0,"user_events_per_second":0,
            "burst_seconds":10,"max_events_per_second":0}"#,
    );
    let outcome = run(
        &enrichment,
        json!([
            {"type":"track","event":"A","userId":"u","messageId":"m1","context":{"userAgent":GOOGLEBOT,"ip":"203.0.113.9"}},
            {"type":"track","event":"A","userId":"u","messageId":"m2","context":{"userAgent":CHROME,"ip":"203.0.113.9"}},
        ]),
    );
    assert_eq!(outcome.valid.len(), 1);
    let event = outcome.valid[0].doc().to_value();
    assert_eq!(
        event["context"]["userAgentParsed"],
        json!({"browser":"Chrome","browserVersion":"131.0.0.0","os":"Windows 10","osVersion":"NT 10.0","deviceType":"desktop"})
    );
    assert_eq!(
        event["context"]["geo"],
        json!({"country":"DE","countryName":"Germany","city":"Berlin"})
    );
    assert_eq!(event["context"]["ip"], json!("203.0.113.0"));
    assert!(event["context"].get("bot").is_none());
    let bot = &outcome.invalid[0];
    assert_eq!(bot.reason, "bot");
    let kept = bot.event.as_ref().expect("the event");
    assert_eq!(
        kept["context"]["bot"],
        json!({"name":"Googlebot","category":"crawler"})
    );
    assert_eq!(
        kept["context"]["ip"],
        json!("203.0.113.0"),
        "the rules reach the invalid queue too"
    );
}

#[test]
fn a_field_rule_reaches_valid_and_invalid_events_and_an_unreadable_payload_is_not_kept() {
    let enrichment = enrichment(
        r#"{"bots":"flag","ip":"drop","fields":[{"path":"traits.email","action":"hash"}],
            "events_per_second":0,"user_events_per_second":0,"burst_seconds":10,"max_events_per_second":0}"#,
    );
    let outcome = run(
        &enrichment,
        json!([
            {"type":"identify","userId":"u","messageId":"m1","traits":{"email":"ann@example.com"},"context":{"ip":"203.0.113.9"}},
            {"type":"track","event":"A","userId":null,"messageId":"m2","traits":{"email":"ann@example.com"}},
        ]),
    );
    assert_eq!((outcome.valid.len(), outcome.invalid.len()), (1, 1));
    let valid = outcome.valid[0].doc().to_value();
    let hashed = valid["traits"]["email"]
        .as_str()
        .expect("hashed")
        .to_owned();
    assert!(hashed.starts_with("hmac:"), "{hashed}");
    assert!(valid["context"].get("ip").is_none());
    // Located before the address went.
    assert_eq!(valid["context"]["geo"]["country"], json!("DE"));
    let invalid = outcome.invalid[0].event.as_ref().expect("the event");
    assert_eq!(invalid["traits"]["email"], json!(hashed));

    let garbage = process(
        &registry(),
        &BasicProperties::default(),
        b"{not json ann@example.com",
        LIMITS,
        Documents::Made,
        &enrichment,
    );
    assert_eq!(garbage.invalid[0].raw_base64, None);
    assert!(garbage.invalid[0].errors[0]
        .message
        .contains("privacy rules"));
}

#[test]
fn sampling_keeps_about_its_share_and_the_same_events_every_time() {
    let enrichment = enrichment(
        r#"{"bots":"flag","ip":"keep","sample":[{"event":"Scrolled","keep":0.25}],
            "events_per_second":0,"user_events_per_second":0,"burst_seconds":10,"max_events_per_second":0}"#,
    );
    let batch: Vec<_> = (0..400)
        .map(|i| json!({"type":"track","event": if i % 2 == 0 {"Scrolled"} else {"Bought"},"userId":"u","messageId":format!("m{i}")}))
        .collect();
    let kept = |outcome: Outcome| -> Vec<String> {
        outcome
            .valid
            .iter()
            .map(|e| e.doc().get_str("messageId").unwrap_or_default().to_owned())
            .collect()
    };
    let first = kept(run(&enrichment, json!(batch.clone())));
    let second = kept(run(&enrichment, json!(batch)));
    assert_eq!(first, second);
    let scrolled = first.len() - 200;
    // 200 Scrolled at 0.25: 50 expected; the bounds are 5 standard deviations.
    assert!((20..=80).contains(&scrolled), "{scrolled} of 200 kept");
}

#[test]
fn what_enrichment_adds_stays_within_the_collectors_allowance() {
    let meta = RequestMeta {
        request_id: uuid::Uuid::nil().to_string(),
        received_at: chrono::Utc::now(),
        source: "s".repeat(100),
        endpoint: ingest_pipeline::message::Endpoint::Batch,
        client_ip: Some("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255".into()),
        user_agent: Some("a".repeat(ingest_pipeline::message::USER_AGENT_BYTES)),
    };
    assert!(enrichment_bytes(&meta) <= ingest_pipeline::built::WORKER_FIELDS_BYTES);
}
