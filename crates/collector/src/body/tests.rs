use super::*;
use std::io::Write;

const LIMITS: Limits = Limits {
    max_event_bytes: 100,
    max_batch_bytes: 300,
    max_batch_events: 3,
    partial_batches: false,
};

/// Room enough that only the check under test refuses.
const WIDE: Limits = Limits {
    max_event_bytes: 1 << 20,
    max_batch_bytes: 1 << 20,
    max_batch_events: 10,
    partial_batches: false,
};

#[test]
fn batch_yields_write_key_and_event_count() {
    let got = inspect(
        Endpoint::Batch,
        br#"{"writeKey":"k","batch":[{"type":"track"},{"type":"page"}]}"#,
        &LIMITS,
    )
    .expect("valid");
    assert_eq!(got.write_key.as_deref(), Some("k"));
    assert_eq!(got.events, 2);
    assert!(got.refused.is_empty());
}

/// With partial batches, an event too large or not an object is refused alone and the
/// others accepted; when every event is refused, the request is, with the first error.
#[test]
fn partial_batches_refuse_bad_events_alone_and_a_batch_of_only_bad_ones_whole() {
    let partial = Limits {
        partial_batches: true,
        max_batch_events: 10,
        ..LIMITS
    };
    let big = format!(r#"{{"p":"{}"}}"#, "x".repeat(120));
    let body = format!(r#"{{"batch":[{{"type":"track"}},{big},[1e300],{{"type":"page"}}]}}"#);
    let got = inspect(Endpoint::Batch, body.as_bytes(), &partial).expect("accepted");
    assert_eq!(got.events, 2);
    let refused: Vec<(usize, &str, usize)> = got
        .refused
        .iter()
        .map(|r| (r.index, r.code(), r.bytes))
        .collect();
    assert_eq!(
        refused,
        vec![(1, "event_too_large", big.len()), (2, "not_an_object", 7)]
    );
    // All-or-nothing without the setting.
    let whole = Limits {
        partial_batches: false,
        ..partial
    };
    let err = inspect(Endpoint::Batch, body.as_bytes(), &whole).expect_err("whole");
    assert_eq!(err.status().as_u16(), 413);
    // Every event refused: the first one's error.
    for (body, status) in [
        (format!(r#"{{"batch":[{big},1]}}"#), 413),
        (r#"{"batch":[1,{"a":1e400}]}"#.to_owned(), 400),
        (r#"{"batch":["s"]}"#.to_owned(), 400),
    ] {
        let err = inspect(Endpoint::Batch, body.as_bytes(), &partial).expect_err(&body);
        assert_eq!(err.status().as_u16(), status, "{body}");
    }
    // A refused element is still parsed like the worker would: bad JSON in it is a 400.
    let err =
        inspect(Endpoint::Batch, br#"{"batch":[{},[1e400]]}"#, &partial).expect_err("malformed");
    assert!(matches!(err, CaptureError::MalformedJson(_)), "{err}");
    // An event the worker could not use, whatever the tracking plan, is refused alone too:
    // no `type` (or `null`), one it does not know, a `messageId` that is not a string.
    let body = r#"{"batch":[{"type":"track","messageId":"m-1"},{"event":"x"},{"type":null},{"type":"Track"},{"type":7},{"type":"page","messageId":42},{"type":"page","messageId":null},{"type":"x","type":"screen"}]}"#;
    let got = inspect(Endpoint::Batch, body.as_bytes(), &partial).expect("accepted");
    let refused: Vec<(usize, &str)> = got.refused.iter().map(|r| (r.index, r.code())).collect();
    assert_eq!(
        refused,
        vec![
            (1, "bad_type"),
            (2, "bad_type"),
            (3, "bad_type"),
            (4, "bad_type"),
            (5, "bad_message_id")
        ]
    );
    assert_eq!(
        got.events, 3,
        "a null messageId is derived; the last `type` counts"
    );
    assert!(
        got.refused[2].error.to_string().contains(r#""Track""#),
        "{}",
        got.refused[2].error
    );
    let err = inspect(Endpoint::Batch, body.as_bytes(), &whole).expect_err("strict");
    assert_eq!(err.status().as_u16(), 400);
    // An empty batch stays accepted with no events.
    let got = inspect(Endpoint::Batch, br#"{"batch":[]}"#, &partial).expect("empty");
    assert_eq!((got.events, got.refused.len()), (0, 0));
}

#[test]
fn shape_errors_are_400_and_size_errors_413() {
    let status = |endpoint, body: &[u8]| {
        inspect(endpoint, body, &LIMITS)
            .map(|_| ())
            .map_err(|e| e.status().as_u16())
    };
    assert_eq!(status(Endpoint::Batch, b"[1,2]"), Err(400));
    assert_eq!(status(Endpoint::Batch, br#"{"batch":[1]}"#), Err(400));
    assert_eq!(status(Endpoint::Batch, br#"{"nobatch":[]}"#), Err(400));
    assert_eq!(
        status(
            Endpoint::Batch,
            br#"{"batch":[{"type":"page"},{"type":"page"},{"type":"page"},{"type":"page"}]}"#
        ),
        Err(413)
    );
    assert_eq!(status(Endpoint::Track, br#"{"event":"x""#), Err(400));
    assert_eq!(status(Endpoint::Track, b"{\"event\":\"\xff\"}"), Err(400));
    assert_eq!(
        status(Endpoint::Track, br#"{"writeKey":"a","writeKey":"b"}"#),
        Err(400)
    );
    let big_event = format!(r#"{{"batch":[{{"p":"{}"}}]}}"#, "x".repeat(120));
    assert_eq!(status(Endpoint::Batch, big_event.as_bytes()), Err(413));
    let big_single = format!(r#"{{"p":"{}"}}"#, "x".repeat(120));
    assert_eq!(status(Endpoint::Track, big_single.as_bytes()), Err(413));
}

#[test]
fn deep_nesting_is_rejected_not_a_stack_overflow() {
    let deep = format!("{{\"a\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    let limits = WIDE;
    let err = inspect(Endpoint::Track, deep.as_bytes(), &limits).expect_err("too deep");
    assert_eq!(err.status().as_u16(), 400);
}

#[test]
fn brackets_inside_strings_do_not_count_as_nesting() {
    let limits = WIDE;
    let body = format!(r#"{{"a":"{}\"{}"}}"#, "[".repeat(500), "{".repeat(500));
    assert!(inspect(Endpoint::Track, body.as_bytes(), &limits).is_ok());
    let at_limit = format!("{}{}", "[".repeat(MAX_DEPTH - 1), "]".repeat(MAX_DEPTH - 1));
    assert!(inspect(
        Endpoint::Track,
        format!(r#"{{"a":{at_limit}}}"#).as_bytes(),
        &limits
    )
    .is_ok());
    let over = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
    assert!(inspect(
        Endpoint::Track,
        format!(r#"{{"a":{over}}}"#).as_bytes(),
        &limits
    )
    .is_err());
}

/// A batch's own fields are read once (as the worker must read the same one), and depth
/// counts from the body's first bracket through the batch into each event.
#[test]
fn batch_fields_given_twice_and_events_nested_too_deep_are_refused() {
    let limits = WIDE;
    for body in [
        r#"{"batch":[],"batch":[]}"#,
        r#"{"context":{},"batch":[],"context":{}}"#,
        r#"{"integrations":1,"batch":[],"integrations":2}"#,
    ] {
        let err = inspect(Endpoint::Batch, body.as_bytes(), &limits).expect_err(body);
        assert!(
            matches!(err, CaptureError::MalformedJson(_)),
            "{body}: {err}"
        );
    }
    // The body, the batch and the event are three levels.
    let event = |levels: usize| {
        let nested = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        format!(r#"{{"batch":[{{"type":"track","a":{nested}}}]}}"#)
    };
    assert!(inspect(Endpoint::Batch, event(MAX_DEPTH - 3).as_bytes(), &limits).is_ok());
    let err =
        inspect(Endpoint::Batch, event(MAX_DEPTH - 2).as_bytes(), &limits).expect_err("too deep");
    assert!(matches!(err, CaptureError::BadRequest(_)), "{err}");
    let nested = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let context = format!(r#"{{"context":{{"a":{nested}}},"batch":[]}}"#);
    let err = inspect(Endpoint::Batch, context.as_bytes(), &limits).expect_err("too deep");
    assert!(matches!(err, CaptureError::BadRequest(_)), "{err}");
}

#[test]
fn gzip_bomb_stops_at_the_limit() {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(&vec![b' '; 10 << 20]).expect("write");
    let bomb = enc.finish().expect("finish");
    assert!(bomb.len() < 64 << 10);
    let err = gunzip_limited(&bomb, 1000).expect_err("bomb");
    assert_eq!(err.status().as_u16(), 413);
    assert!(matches!(
        gunzip_limited(b"not gzip", 1000),
        Err(CaptureError::BadGzip(_))
    ));
}

#[test]
fn numbers_and_escapes_the_worker_cannot_parse_are_refused() {
    let limits = WIDE;
    let long_integer = format!(r#"{{"n":{}}}"#, "9".repeat(400));
    for body in [
        r#"{"n":1e400}"#,
        r#"{"n":-1e400}"#,
        long_integer.as_str(),
        r#"{"s":"\ud800"}"#,
        r#"{"\udc00":1}"#,
    ] {
        assert!(
            serde_json::from_slice::<serde_json::Value>(body.as_bytes()).is_err(),
            "the worker parses {body}"
        );
        let batch = format!(r#"{{"batch":[{body}]}}"#);
        for (endpoint, json) in [(Endpoint::Track, body), (Endpoint::Batch, &batch)] {
            let status = inspect(endpoint, json.as_bytes(), &limits)
                .map(|_| ())
                .map_err(|e| e.status());
            assert_eq!(status, Err(axum::http::StatusCode::BAD_REQUEST), "{json}");
        }
    }
    assert!(inspect(Endpoint::Track, br#"{"n":1e300,"m":-0.0}"#, &limits).is_ok());
}

/// Found by the collector_body fuzz target: with serde_json's `raw_value` feature, a
/// `Value` reads an object whose first key is this token as raw JSON, so the worker refused
/// bodies the collector had accepted (or read them as something else).
#[test]
fn serde_json_raw_value_token_as_a_key_is_refused() {
    let limits = WIDE;
    for body in [
        r#"{"$serde_json::private::RawValue":[]}"#,
        r#"{"$serde_json::private::RawValue":"{\"a\":1}"}"#,
        r#"{"\u0024serde_json::private::RawValue":[]}"#,
        r#"{"a":{"$serde_json::private::RawValue":1}}"#,
    ] {
        let batch = format!(r#"{{"batch":[{body}]}}"#);
        for (endpoint, json) in [(Endpoint::Page, body), (Endpoint::Batch, &batch)] {
            let status = inspect(endpoint, json.as_bytes(), &limits)
                .map(|_| ())
                .map_err(|e| e.status());
            assert_eq!(status, Err(axum::http::StatusCode::BAD_REQUEST), "{json}");
        }
    }
}

const ROOMY: Limits = Limits {
    max_event_bytes: 1000,
    max_batch_bytes: 1000,
    max_batch_events: 100,
    partial_batches: false,
};

/// `{"<shared>":…,"batch":[<event>, … n times]}`.
fn batch_sharing(shared: &str, event: &str, n: usize) -> String {
    let events = vec![event; n].join(",");
    format!(r#"{{{shared},"batch":[{events}]}}"#)
}

/// The worker copies the batch-level `context` keys an event lacks, and the batch-level
/// `integrations`, into every event: 2000 copies of a large shared value from a small body.
#[test]
fn a_batch_whose_shared_context_or_integrations_expand_past_the_batch_limit_is_refused() {
    let blob = "x".repeat(200);
    for shared in [
        format!(r#""context":{{"blob":"{blob}"}}"#),
        format!(r#""integrations":{{"All":"{blob}"}}"#),
        format!(r#""context":{{"app":{{"name":"Shop"}},"blob":"{blob}"}}"#),
    ] {
        // `null` is counted as absent: a worker may treat it so (Segment's API does).
        for event in [
            r#"{"type":"track"}"#,
            r#"{"type":"track","context":{"app":{}}}"#,
            r#"{"type":"track","context":null,"integrations":null}"#,
        ] {
            let body = batch_sharing(&shared, event, 10);
            assert!(body.len() < ROOMY.max_batch_bytes, "{body}");
            let err = inspect(Endpoint::Batch, body.as_bytes(), &ROOMY).expect_err(&body);
            assert_eq!(err.status().as_u16(), 413, "{body}");
            assert!(err.to_string().contains("context"), "{err}");
        }
    }
}

/// Issue #21: the collector left out the batch-level `sentAt`, which the worker copies into
/// every event without one: a 396 KB beacon with a 300 KB `sentAt` was answered 200 and
/// ended whole in the invalid queue. A screen's name taken from `event` counts too.
#[test]
fn a_batch_whose_shared_sent_at_or_screen_names_expand_past_the_batch_limit_is_refused() {
    let sent_at = format!(r#""sentAt":"{}""#, "9".repeat(200));
    for event in [r#"{"type":"track"}"#, r#"{"type":"track","sentAt":null}"#] {
        let body = batch_sharing(&sent_at, event, 10);
        assert!(body.len() < ROOMY.max_batch_bytes, "{body}");
        let err = inspect(Endpoint::Batch, body.as_bytes(), &ROOMY).expect_err(&body);
        assert_eq!(err.status().as_u16(), 413, "{body}");
    }
    // Events with their own `sentAt` take none; `null` batch-level fields copy nothing.
    let own = batch_sharing(&sent_at, r#"{"type":"track","sentAt":"x"}"#, 10);
    assert!(
        inspect(Endpoint::Batch, own.as_bytes(), &ROOMY).is_ok(),
        "{own}"
    );
    let nulls = batch_sharing(
        r#""sentAt":null,"integrations":null,"context":null"#,
        r#"{"type":"track"}"#,
        40,
    );
    assert!(
        inspect(Endpoint::Batch, nulls.as_bytes(), &ROOMY).is_ok(),
        "{nulls}"
    );
    // RudderStack's screens: `event` becomes the name, so each is counted twice.
    let name = "n".repeat(150);
    let screen = format!(r#"{{"type":"screen","event":"{name}"}}"#);
    let body = batch_sharing(r#""x":1"#, &screen, 5);
    assert!(body.len() < ROOMY.max_batch_bytes);
    let err = inspect(Endpoint::Batch, body.as_bytes(), &ROOMY).expect_err(&body);
    assert_eq!(err.status().as_u16(), 413);
    let named = format!(r#"{{"type":"screen","event":"{name}","name":"Cart"}}"#);
    let body = batch_sharing(r#""x":1"#, &named, 5);
    assert!(inspect(Endpoint::Batch, body.as_bytes(), &ROOMY).is_ok());
}

#[test]
fn a_shared_context_that_events_override_or_cannot_take_does_not_count_against_the_limit() {
    let shared = format!(r#""context":{{"blob":"{}"}}"#, "x".repeat(200));
    // Every event has its own `blob` (an escaped key is the same key), or a `context` that
    // is not an object: the worker copies nothing into them.
    for event in [
        r#"{"type":"track","context":{"blob":1}}"#,
        r#"{"type":"track","context":{"\u0062lob":1}}"#,
        r#"{"type":"track","context":[]}"#,
    ] {
        let body = batch_sharing(&shared, event, 10);
        assert!(
            inspect(Endpoint::Batch, body.as_bytes(), &ROOMY).is_ok(),
            "{body}"
        );
    }
    // Shared integrations go only to events without their own.
    let shared = format!(r#""integrations":{{"All":"{}"}}"#, "x".repeat(200));
    let body = batch_sharing(&shared, r#"{"type":"track","integrations":{}}"#, 10);
    assert!(inspect(Endpoint::Batch, body.as_bytes(), &ROOMY).is_ok());
}

#[test]
fn a_full_batch_with_per_event_contexts_and_no_batch_context_is_never_refused_as_expanding() {
    let event =
        r#"{"type":"track","event":"E","context":{"app":{"name":"Shop"},"os":{"name":"iOS"}}}"#;
    let n = (ROOMY.max_batch_bytes - 20) / (event.len() + 1);
    let body = format!(r#"{{"batch":[{}]}}"#, vec![event; n].join(","));
    assert!(body.len() <= ROOMY.max_batch_bytes);
    assert!(inspect(Endpoint::Batch, body.as_bytes(), &ROOMY).is_ok());
    // A small shared context that the events lack, well inside the limit once copied.
    let body = batch_sharing(
        r#""context":{"library":{"name":"x"}}"#,
        r#"{"type":"track"}"#,
        10,
    );
    assert!(inspect(Endpoint::Batch, body.as_bytes(), &ROOMY).is_ok());
}

/// The worker's merge (`decode::split`), with `null` read as absent.
fn merged_events_bytes(body: &str) -> usize {
    let body: serde_json::Value = serde_json::from_str(body).expect("json");
    let shared = body.get("context").and_then(|c| c.as_object()).cloned();
    let integrations = body.get("integrations").filter(|i| !i.is_null());
    let batch = body["batch"].as_array().expect("batch");
    batch
        .iter()
        .map(|event| {
            let mut event = event.as_object().expect("object").clone();
            event.retain(|_, v| !v.is_null());
            if let Some(shared) = &shared {
                let own = event
                    .entry("context")
                    .or_insert_with(|| serde_json::json!({}));
                if let Some(own) = own.as_object_mut() {
                    for (k, v) in shared {
                        own.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                }
            }
            if let Some(integrations) = integrations {
                event
                    .entry("integrations")
                    .or_insert_with(|| integrations.clone());
            }
            serde_json::to_string(&event).expect("serialize").len()
        })
        .sum()
}

/// What `inspect` reckons a batch's events grow to, and how many there are.
fn reckoned(body: &str, limits: &Limits) -> (usize, usize) {
    let scanned = scan(body, true, limits).expect(body);
    let events = scanned.batch.expect("batch").events;
    let bytes = expanded_events_bytes(
        &events,
        scanned.shared_context.as_ref(),
        scanned.shared_integrations,
        scanned.shared_sent_at,
        limits,
    );
    (bytes, events.len())
}

#[test]
fn expanded_size_is_an_upper_bound_within_a_few_bytes_per_event_of_the_merge() {
    // Partial: an event without a type is refused alone, and still counted.
    let limits = Limits {
        max_event_bytes: 1 << 20,
        max_batch_bytes: usize::MAX,
        max_batch_events: 1000,
        partial_batches: true,
    };
    // `null` fields are counted as sent: an event's own, though the merge drops them, and
    // shared `integrations`, which a worker may copy as they are.
    let with_nulls = r#"{"context":{"a":1},"integrations":null,"batch":[{"context":null},{"integrations":null}]}"#;
    assert!(reckoned(with_nulls, &limits).0 >= merged_events_bytes(with_nulls));
    let bodies = [
        r#"{"context":{"a":1,"b":{"c":[1,2]},"\u00e9":"x"},"batch":[{},{"context":{"a":2}},{"context":{"x":1}},{"context":"s"}]}"#,
        r#"{"integrations":{"All":false},"batch":[{},{"integrations":{}},{"type":"track"}]}"#,
        r#"{"context":{"a":"x","a":"yy"},"batch":[{"context":{"a":0}},{"k":"v"}]}"#,
        r#"{"context":{},"batch":[{},{"context":{"a":1}}]}"#,
        r#"{"batch":[{"context":{"a":1}},{"type":"page"}]}"#,
    ];
    for body in bodies {
        let (got, events) = reckoned(body, &limits);
        let merged = merged_events_bytes(body);
        assert!(got >= merged, "{body}: reckoned {got} < merged {merged}");
        assert!(
            got <= merged + 3 * events,
            "{body}: reckoned {got}, merged {merged}"
        );
    }
}
