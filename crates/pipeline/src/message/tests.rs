use super::*;

#[test]
fn refused_events_travel_in_a_header_and_a_bad_entry_is_skipped() {
    let refused = vec![
        RefusedEvent {
            index: 3,
            code: "event_too_large".into(),
            bytes: 40_123,
        },
        RefusedEvent {
            index: 7,
            code: "not_an_object".into(),
            bytes: 1,
        },
    ];
    let header = RefusedEvent::header(&refused);
    assert_eq!(header, "3:event_too_large:40123,7:not_an_object:1");
    let mut table = FieldTable::default();
    table.insert(headers::REFUSED_EVENTS.into(), long_string(&header));
    assert_eq!(RefusedEvent::read(Some(&table)), refused);
    table.insert(
        headers::REFUSED_EVENTS.into(),
        long_string("x:bad:1,2:event_too_large:5,9"),
    );
    assert_eq!(RefusedEvent::read(Some(&table)).len(), 1);
    assert!(RefusedEvent::read(None).is_empty());
}

fn text(table: &FieldTable, name: &str) -> Option<String> {
    header_str(Some(table), name).map(str::to_owned)
}

fn meta() -> RequestMeta {
    RequestMeta {
        request_id: "req-1".into(),
        received_at: DateTime::parse_from_rfc3339("2026-11-21T12:00:00.250Z")
            .expect("time")
            .with_timezone(&Utc),
        source: "shop-ios".into(),
        endpoint: Endpoint::Track,
        client_ip: Some("203.0.113.9".into()),
        user_agent: Some("ShopApp/1.0".into()),
    }
}

/// The wire format, spelled out: a change here breaks a rolling upgrade.
#[test]
fn header_names_and_values_are_the_wire_format() {
    let properties = meta().properties("text/plain", true);
    let table = properties.headers().clone().expect("headers");
    let names: Vec<&str> = table.inner().keys().map(|k| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "client_ip",
            "endpoint",
            "received_at",
            "source",
            "user_agent"
        ]
    );
    assert_eq!(
        text(&table, "received_at").as_deref(),
        Some("2026-11-21T12:00:00.250Z")
    );
    assert_eq!(text(&table, "endpoint").as_deref(), Some("track"));
    assert_eq!(properties.delivery_mode(), &Some(2));
    assert_eq!(properties.timestamp(), &Some(1_795_262_400));
    assert_eq!(
        properties.message_id().as_ref().map(|s| s.as_str()),
        Some("req-1")
    );
    assert_eq!(
        properties.app_id().as_ref().map(|s| s.as_str()),
        Some("shop-ios")
    );
    assert!(is_gzip(&properties));
    assert!(!is_gzip(&meta().properties("application/json", false)));

    let batch = batch_headers("crm", "key-1", 3, "HTTP 503");
    let names: Vec<&str> = batch.inner().keys().map(|k| k.as_str()).collect();
    assert_eq!(
        names,
        ["x-attempt", "x-batch-key", "x-last-error", "x-sink"]
    );
    assert_eq!(
        batch.inner().get("x-attempt"),
        Some(&AMQPValue::LongUInt(3))
    );
    let invalid = invalid_headers("schema", "shop-ios", "req-1");
    let names: Vec<&str> = invalid.inner().keys().map(|k| k.as_str()).collect();
    assert_eq!(names, ["reason", "request_id", "source"]);
}

#[test]
fn a_request_reads_back_as_it_was_written() {
    let written = meta();
    let properties = written.properties("application/json", false);
    assert_eq!(RequestMeta::from_properties(&properties, b"{}"), written);
    let long = RequestMeta {
        user_agent: Some("é".repeat(600)),
        source: "s".repeat(300),
        ..meta()
    };
    let properties = long.properties("application/json", false);
    let read = RequestMeta::from_properties(&properties, b"{}");
    // Cut in bytes at a character's boundary: 256 two-byte characters.
    assert_eq!(read.user_agent.as_ref().map(String::len), Some(512));
    assert_eq!(read.user_agent.map(|a| a.chars().count()), Some(256));
    assert_eq!(read.source.len(), 300, "the header keeps the whole source");
    assert_eq!(
        properties.app_id().as_ref().map(|a| a.as_str().len()),
        Some(255)
    );
}

#[test]
fn what_is_missing_gets_a_stand_in_that_a_redelivery_gets_too() {
    let bare = BasicProperties::default().with_timestamp(1_795_262_400);
    let a = RequestMeta::from_properties(&bare, b"{\"batch\":[]}");
    let b = RequestMeta::from_properties(&bare, b"{\"batch\":[]}");
    assert_eq!(a, b);
    assert_eq!(a.source, "unknown");
    assert_eq!(a.endpoint, Endpoint::Batch);
    assert_eq!(a.received_at.timestamp(), 1_795_262_400);
    assert_eq!((a.client_ip, a.user_agent), (None, None));
    let mut table = FieldTable::default();
    table.insert(headers::ENDPOINT.into(), long_string("t"));
    let short = BasicProperties::default().with_headers(table);
    assert_eq!(
        RequestMeta::from_properties(&short, b"").endpoint,
        Endpoint::Batch,
        "a header holds an endpoint's name, never a path's short form"
    );
}

#[test]
fn endpoints_from_paths_and_from_names() {
    assert_eq!(Endpoint::parse("batch"), Some(Endpoint::Batch));
    assert_eq!(Endpoint::parse("import"), Some(Endpoint::Batch));
    assert_eq!(Endpoint::parse("t"), Some(Endpoint::Track));
    assert_eq!(Endpoint::parse("nope"), None);
    for endpoint in Endpoint::ALL {
        assert_eq!(Endpoint::from_name(endpoint.as_str()), Some(endpoint));
        assert_eq!(Endpoint::parse(endpoint.as_str()), Some(endpoint));
    }
    assert_eq!(Endpoint::from_name("import"), None);
}

#[test]
fn attempt_counts_are_read_from_any_integer_header() {
    for (value, want) in [
        (AMQPValue::LongUInt(3), 3),
        (AMQPValue::LongLongInt(4), 4),
        (AMQPValue::LongInt(-1), 0),
        (AMQPValue::ShortUInt(5), 5),
        (long_string("x"), 0),
    ] {
        let mut table = FieldTable::default();
        table.insert(headers::ATTEMPT.into(), value);
        assert_eq!(read_attempts(Some(&table)), want);
    }
    assert_eq!(read_attempts(None), 0);
    let table = batch_headers("s", "k", u32::MAX, &"e".repeat(5000));
    assert_eq!(read_attempts(Some(&table)), u32::MAX);
    assert_eq!(read_batch_key(Some(&table)), Some("k"));
    assert_eq!(
        text(&table, headers::LAST_ERROR).map(|e| e.len()),
        Some(1000)
    );
    assert_eq!(read_batch_key(None), None);
}

#[test]
fn truncate_respects_char_boundaries() {
    assert_eq!(truncate("héllo", 2), "h");
    assert_eq!(truncate("abc", 10), "abc");
}

#[test]
fn the_brokers_death_records_are_told_apart() {
    for name in ["x-death", "x-first-death-reason", "x-last-death-queue"] {
        assert!(is_death_record(name), "{name}");
    }
    for name in ["x-batch-key", "source", "x-replayed"] {
        assert!(!is_death_record(name), "{name}");
    }
}

#[test]
fn the_single_event_endpoints_are_the_event_types() {
    let named: Vec<&str> = Endpoint::ALL
        .into_iter()
        .filter(|e| *e != Endpoint::Batch)
        .map(Endpoint::as_str)
        .collect();
    assert_eq!(named, EVENT_TYPES);
    for kind in EVENT_TYPES {
        assert_eq!(Endpoint::parse(kind).map(Endpoint::as_str), Some(kind));
    }
}

#[test]
fn a_replayed_request_names_its_sinks_or_goes_to_all_but_statsd() {
    let at = DateTime::parse_from_rfc3339("2026-12-06T10:00:00.250Z")
        .expect("a time")
        .with_timezone(&Utc);
    let mut table = FieldTable::default();
    assert_eq!(Replayed::read(Some(&table)), None);
    mark_replayed(&mut table, "invalid");
    assert_eq!(Replayed::read(Some(&table)), None, "a dlq replay is not");

    let mut table = FieldTable::default();
    mark_from_archive(&mut table, at, None);
    let replayed = Replayed::read(Some(&table)).expect("replayed");
    assert_eq!(replayed.at, Some(at));
    assert!(replayed.goes_to("mongo") && replayed.goes_to("crm"));
    assert!(!replayed.goes_to(STATSD_SINK));

    let named = ["crm".to_owned(), STATSD_SINK.to_owned()];
    let mut table = FieldTable::default();
    mark_from_archive(&mut table, at, Some(&named));
    let replayed = Replayed::read(Some(&table)).expect("replayed");
    assert_eq!(replayed.sinks.as_deref(), Some(&named[..]));
    assert!(replayed.goes_to("crm") && replayed.goes_to(STATSD_SINK));
    assert!(!replayed.goes_to("mongo"));
}
