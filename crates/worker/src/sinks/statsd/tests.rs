use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use super::*;

fn settings(extra: Value) -> StatsdSinkSettings {
    let mut value =
        json!({"address": "127.0.0.1:8125", "timers": ["duration_ms"], "gauges": ["cart_size"]});
    if let (Value::Object(base), Value::Object(extra)) = (&mut value, extra) {
        base.extend(extra);
    }
    serde_json::from_value(value).expect("test settings deserialize")
}

fn event(value: Value) -> Event {
    match value {
        Value::Object(map) => map.into(),
        other => panic!("test event must be an object, got {other}"),
    }
}

fn lines_for(settings: &StatsdSinkSettings, value: Value) -> Vec<String> {
    let mut out = Vec::new();
    LineBuilder::new(settings).event(&event(value), &mut out);
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Timer,
    Gauge,
}

#[derive(Debug)]
struct Line {
    key: String,
    raw_value: String,
    value: f64,
    kind: Kind,
    rate: f64,
}

/// The daemon's line grammar (stats.js + helpers.js `is_valid_packet`), stricter on values:
/// they must be plain decimals, as the sink promises.
fn parse_line(line: &str) -> Result<Line, String> {
    let (key, rest) = line.split_once(':').ok_or("no ':'")?;
    if key.is_empty() || sanitize_key_name(key) != key {
        return Err(format!("key {key:?} would be renamed by the daemon"));
    }
    if rest.contains(':') {
        return Err("more than one value".into());
    }
    let fields: Vec<&str> = rest.split('|').collect();
    if !(2..=3).contains(&fields.len()) {
        return Err(format!("expected value|type[|@rate], got {rest:?}"));
    }
    let kind = match fields[1] {
        "c" => Kind::Counter,
        "ms" => Kind::Timer,
        "g" => Kind::Gauge,
        other => return Err(format!("unknown type {other:?}")),
    };
    let rate = match fields.get(2) {
        None => 1.0,
        Some(field) => {
            let digits = field.strip_prefix('@').ok_or("rate without '@'")?;
            if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit() || c == '.') {
                return Err(format!("bad rate {field:?}"));
            }
            digits
                .parse()
                .map_err(|e| format!("bad rate {field:?}: {e}"))?
        }
    };
    let raw_value = fields[0];
    let unsigned = raw_value.strip_prefix('-').unwrap_or(raw_value);
    let plain = match unsigned.split_once('.') {
        Some((int, frac)) => {
            !int.is_empty()
                && !frac.is_empty()
                && !frac.ends_with('0')
                && int.chars().chain(frac.chars()).all(|c| c.is_ascii_digit())
        }
        None => !unsigned.is_empty() && unsigned.chars().all(|c| c.is_ascii_digit()),
    };
    if !plain {
        return Err(format!("value {raw_value:?} is not a plain decimal"));
    }
    let value: f64 = raw_value.parse().map_err(|e| format!("{e}"))?;
    if kind == Kind::Timer && value < 0.0 {
        return Err("negative timer".into());
    }
    Ok(Line {
        key: key.to_owned(),
        raw_value: raw_value.to_owned(),
        value,
        kind,
        rate,
    })
}

#[test]
fn sanitising_matches_the_statsd_daemon_per_segment() {
    assert_eq!(segment("Order Completed"), "order_completed");
    assert_eq!(segment("  lots \t of\n space  "), "_lots_of_space_");
    assert_eq!(segment("Home/Main Screen"), "home-main_screen");
    assert_eq!(segment("v1.2 Launched"), "v1_2_launched");
    assert_eq!(segment("a:b|c@d#e"), "abcde");
    assert_eq!(segment("Café ☕ Commandé"), "caf__command");
    assert_eq!(
        segment("no\u{a0}break\u{3000}ideo\u{feff}bom"),
        "no_break_ideo_bom"
    );
    assert_eq!(
        segment("Kelvin\u{212a}"),
        "kelvin",
        "non-ASCII K is removed, not lowercased"
    );
    assert_eq!(segment("日本語"), "unknown");
    assert_eq!(segment(""), "unknown");
    assert_eq!(sanitize_key_name("a.b c/d:e"), "a.b_c-de");
}

#[test]
fn track_event_gives_counter_timer_and_gauge() {
    let lines = lines_for(
        &settings(json!({})),
        json!({"type": "track", "event": "Order Completed", "source": "shop-ios",
               "properties": {"duration_ms": 250, "cart_size": 3.5, "other": 1}}),
    );
    assert_eq!(
        lines,
        [
            "analytics.shop-ios.track.order_completed:1|c",
            "analytics.shop-ios.track.order_completed.duration_ms:250|ms",
            "analytics.shop-ios.track.order_completed.cart_size:3.5|g",
        ]
    );
}

#[test]
fn screen_and_page_use_their_name() {
    let s = settings(json!({"prefix": "app.prod"}));
    let screen = lines_for(
        &s,
        json!({"type": "screen", "name": "Home Screen", "source": "Shop Android",
               "properties": {"duration_ms": 12.25}}),
    );
    assert_eq!(
        screen,
        [
            "app.prod.shop_android.screen.home_screen:1|c",
            "app.prod.shop_android.screen.home_screen.duration_ms:12.25|ms",
        ]
    );
    let page = lines_for(
        &s,
        json!({"type": "page", "name": "/checkout/pay", "source": "web"}),
    );
    assert_eq!(page, ["app.prod.web.page.-checkout-pay:1|c"]);
}

#[test]
fn identify_and_other_types_omit_the_name() {
    let s = settings(json!({}));
    let identify = lines_for(
        &s,
        json!({"type": "identify", "event": "ignored", "name": "ignored", "source": "shop-ios",
               "properties": {"duration_ms": 5}}),
    );
    assert_eq!(
        identify,
        [
            "analytics.shop-ios.identify:1|c",
            "analytics.shop-ios.identify.duration_ms:5|ms",
        ]
    );
    assert_eq!(
        lines_for(&s, json!({"type": "group", "source": "crm"})),
        ["analytics.crm.group:1|c"]
    );
}

#[test]
fn missing_or_non_string_fields_become_unknown() {
    let s = settings(json!({}));
    assert_eq!(
        lines_for(&s, json!({"type": "track", "source": 42})),
        ["analytics.unknown.track.unknown:1|c"]
    );
    assert_eq!(lines_for(&s, json!({})), ["analytics.unknown.unknown:1|c"]);
}

#[test]
fn negative_gauge_is_reset_then_sent_as_one_entry() {
    let lines = lines_for(
        &settings(json!({})),
        json!({"type": "track", "event": "Cart", "source": "web", "properties": {"cart_size": -5}}),
    );
    assert_eq!(
        lines,
        [
            "analytics.web.track.cart:1|c",
            "analytics.web.track.cart.cart_size:0|g\nanalytics.web.track.cart.cart_size:-5|g",
        ]
    );
    let zero = lines_for(
        &settings(json!({})),
        json!({"type": "track", "event": "Cart", "source": "web", "properties": {"cart_size": -0.0}}),
    );
    assert_eq!(zero[1], "analytics.web.track.cart.cart_size:0|g");
}

#[test]
fn unusable_property_values_are_skipped() {
    let s = settings(json!({}));
    for value in [
        json!(f64::NAN),
        json!("12"),
        json!("NaN"),
        json!(true),
        json!(null),
        json!([1]),
        json!({"value": 1}),
        json!(1e21),
        json!(1e300),
        json!(1e-7),
        json!(-1e25),
    ] {
        let lines = lines_for(
            &s,
            json!({"type": "track", "event": "E", "source": "s",
                   "properties": {"duration_ms": value, "cart_size": value}}),
        );
        assert_eq!(lines, ["analytics.s.track.e:1|c"], "value {value}");
    }
    let absent = lines_for(
        &s,
        json!({"type": "track", "event": "E", "source": "s", "properties": {}}),
    );
    assert_eq!(absent, ["analytics.s.track.e:1|c"]);
    let not_object = lines_for(
        &s,
        json!({"type": "track", "event": "E", "source": "s", "properties": 7}),
    );
    assert_eq!(not_object, ["analytics.s.track.e:1|c"]);
}

#[test]
fn negative_timer_is_skipped_because_the_daemon_rejects_it() {
    let lines = lines_for(
        &settings(json!({})),
        json!({"type": "track", "event": "E", "source": "s", "properties": {"duration_ms": -3}}),
    );
    assert_eq!(lines, ["analytics.s.track.e:1|c"]);
}

#[test]
fn numbers_are_plain_decimals() {
    assert_eq!(plain_number(&json!(2.0)).as_deref(), Some("2"));
    assert_eq!(plain_number(&json!(1.5)).as_deref(), Some("1.5"));
    assert_eq!(plain_number(&json!(0.000001)).as_deref(), Some("0.000001"));
    assert_eq!(
        plain_number(&json!(1e20)).as_deref(),
        Some("100000000000000000000")
    );
    assert_eq!(
        plain_number(&json!(u64::MAX)).as_deref(),
        Some("18446744073709551615")
    );
    assert_eq!(
        plain_number(&json!(i64::MIN)).as_deref(),
        Some("-9223372036854775808")
    );
    assert_eq!(
        plain_number(&json!(0.1 + 0.2)).as_deref(),
        Some("0.30000000000000004")
    );
    assert_eq!(plain_number(&json!(1e21)), None);
}

#[test]
fn sample_rate_is_appended_to_counters_and_timers_not_gauges() {
    let lines = lines_for(
        &settings(json!({"sample_rate": 0.5})),
        json!({"type": "track", "event": "E", "source": "s",
               "properties": {"duration_ms": 7, "cart_size": 2}}),
    );
    assert_eq!(
        lines,
        [
            "analytics.s.track.e:1|c|@0.5",
            "analytics.s.track.e.duration_ms:7|ms|@0.5",
            "analytics.s.track.e.cart_size:2|g",
        ]
    );
    for line in &lines {
        assert!(parse_line(line).is_ok(), "{line}");
    }
}

#[test]
fn sampling_keeps_about_the_configured_share() {
    let builder = LineBuilder::new(&settings(json!({"sample_rate": 0.5})));
    let events: Vec<Arc<Event>> = (0..1000)
        .map(|_| Arc::new(event(json!({"type": "track", "event": "E", "source": "s"}))))
        .collect();
    let lines = builder.batch(&events, &mut fastrand::Rng::new());
    assert!((350..=650).contains(&lines.len()), "sent {}", lines.len());

    let all = LineBuilder::new(&settings(json!({}))).batch(&events, &mut fastrand::Rng::new());
    assert_eq!(all.len(), 1000);
}

#[test]
fn pack_never_exceeds_mtu_never_splits_and_keeps_order() {
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..500 {
        let mtu = rng.usize(16..600);
        let lines: Vec<String> = (0..rng.usize(0..60))
            .map(|_| {
                let len = rng.usize(1..=mtu + mtu / 4);
                (0..len).map(|_| rng.alphanumeric()).collect()
            })
            .collect();
        let datagrams = pack(&lines, mtu);

        let rejoined: Vec<&str> = datagrams.iter().flat_map(|d| d.split('\n')).collect();
        assert_eq!(rejoined, lines, "mtu {mtu}");
        for (i, datagram) in datagrams.iter().enumerate() {
            assert!(
                datagram.len() <= mtu || !datagram.contains('\n'),
                "datagram {i} of {} bytes over mtu {mtu} holds several lines",
                datagram.len()
            );
            if let Some(next) = datagrams.get(i + 1) {
                let first = next.split('\n').next().unwrap_or_default();
                assert!(
                    datagram.len() + 1 + first.len() > mtu,
                    "datagram {i} could hold more"
                );
            }
        }
    }
}

#[test]
fn pack_sends_an_oversize_line_alone() {
    let lines = [
        "a".repeat(10),
        "b".repeat(100),
        "c".repeat(10),
        "d".repeat(10),
    ]
    .map(String::from);
    let datagrams = pack(&lines, 30);
    assert_eq!(
        datagrams,
        [
            lines[0].clone(),
            lines[1].clone(),
            format!("{}\n{}", lines[2], lines[3])
        ]
    );
    assert!(pack(&[], 30).is_empty());
}

#[test]
fn pack_keeps_a_negative_gauge_pair_in_one_datagram() {
    let pair = "a.g:0|g\na.g:-5|g".to_owned();
    let lines = ["x".repeat(40), pair.clone()].map(String::from);
    let datagrams = pack(&lines, 50);
    assert_eq!(datagrams, [lines[0].clone(), pair]);
}

#[test]
fn validation_names_the_field_including_properties_that_clean_to_nothing() {
    assert_eq!(validate(&settings(json!({}))), Ok(()));
    for (extra, field) in [
        (json!({"address": "statsd"}), "address"),
        (json!({"sample_rate": 1.5}), "sample_rate"),
        (json!({"timers": ["ok", "☕"]}), "timers"),
        (json!({"gauges": [""]}), "gauges"),
    ] {
        let error = validate(&settings(extra.clone())).expect_err(&extra.to_string());
        assert!(error.starts_with(&format!("{field}:")), "{extra}: {error}");
    }
}

#[tokio::test]
async fn connect_rejects_bad_settings_and_names() {
    let bad = settings(json!({"sample_rate": 2.0}));
    let error = StatsdSink::connect("statsd", bad)
        .await
        .err()
        .expect("bad rate refused");
    assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    let error = StatsdSink::connect("Stats D", settings(json!({})))
        .await
        .err()
        .expect("bad name refused");
    assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    let sink = StatsdSink::connect("statsd", settings(json!({})))
        .await
        .expect("connects");
    assert_eq!(sink.name(), "statsd");
    assert_eq!(sink.flush().await, Ok(()));
}

async fn receive_lines(server: &UdpSocket, expected: usize, mtu: usize) -> Vec<(usize, String)> {
    let mut buf = vec![0u8; 70_000];
    let mut lines = Vec::new();
    let mut datagram = 0;
    loop {
        let wait = if lines.len() >= expected { 200 } else { 5_000 };
        match tokio::time::timeout(Duration::from_millis(wait), server.recv(&mut buf)).await {
            Ok(received) => {
                let len = received.expect("recv");
                assert!(len <= mtu, "datagram of {len} bytes over mtu {mtu}");
                let text = std::str::from_utf8(&buf[..len]).expect("utf-8 datagram");
                lines.extend(
                    text.split('\n')
                        .filter(|l| !l.is_empty())
                        .map(|l| (datagram, l.to_owned())),
                );
                datagram += 1;
            }
            Err(_) => return lines,
        }
    }
}

#[tokio::test]
async fn end_to_end_over_real_udp_matches_the_events() {
    let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind server");
    let address = server.local_addr().expect("server address").to_string();
    let mtu = 512;
    let sink = StatsdSink::connect("statsd", settings(json!({"address": address, "mtu": mtu})))
        .await
        .expect("connect");

    let mut expected_counters: HashMap<String, f64> = HashMap::new();
    let mut expected_timers: HashMap<String, Vec<f64>> = HashMap::new();
    let mut expected_gauges: HashMap<String, f64> = HashMap::new();
    let mut events = Vec::new();
    for i in 0..200_i64 {
        let (source, source_segment) = if i % 3 == 0 {
            ("Shop Android", "shop_android")
        } else {
            ("shop-ios", "shop-ios")
        };
        let (value, base) = match i % 4 {
            0 => (
                json!({"type": "screen", "name": "Home/Main Screen"}),
                format!("analytics.{source_segment}.screen.home-main_screen"),
            ),
            1 => (
                json!({"type": "identify"}),
                format!("analytics.{source_segment}.identify"),
            ),
            2 => (
                json!({"type": "track", "event": "Order Completed"}),
                format!("analytics.{source_segment}.track.order_completed"),
            ),
            _ => (
                json!({"type": "track", "event": "Product v2.1 Viewed"}),
                format!("analytics.{source_segment}.track.product_v2_1_viewed"),
            ),
        };
        let mut event = event(value).into_fields();
        event.insert("source".into(), json!(source));
        let duration = i as f64 * 1.25;
        let cart = i - 100;
        let duration_value = if i % 10 == 0 {
            json!("12")
        } else {
            json!(duration)
        };
        event.insert(
            "properties".into(),
            json!({"duration_ms": duration_value, "cart_size": cart}),
        );
        *expected_counters.entry(base.clone()).or_default() += 1.0;
        if i % 10 != 0 {
            expected_timers
                .entry(format!("{base}.duration_ms"))
                .or_default()
                .push(duration);
        }
        expected_gauges.insert(format!("{base}.cart_size"), cart as f64);
        events.push(Arc::new(Event::from(event)));
    }
    let expected_lines = 200 + expected_timers.values().map(Vec::len).sum::<usize>() + 200 + 100;

    let batch = Batch {
        key: "b1".into(),
        events,
    };
    sink.deliver(&batch).await.expect("deliver");
    let received = receive_lines(&server, expected_lines, mtu).await;
    assert_eq!(received.len(), expected_lines);

    let mut counters: HashMap<String, f64> = HashMap::new();
    let mut timers: HashMap<String, Vec<f64>> = HashMap::new();
    let mut gauges: HashMap<String, f64> = HashMap::new();
    let mut previous: Option<&(usize, String)> = None;
    for entry @ (datagram, text) in &received {
        let line = parse_line(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        match line.kind {
            Kind::Counter => *counters.entry(line.key).or_default() += line.value / line.rate,
            Kind::Timer => timers.entry(line.key).or_default().push(line.value),
            Kind::Gauge if line.raw_value.starts_with(['-', '+']) => {
                let reset = previous.and_then(|(d, t)| (d == datagram).then_some(t));
                assert_eq!(
                    reset,
                    Some(&format!("{}:0|g", line.key)),
                    "delta without reset: {text}"
                );
                *gauges.entry(line.key).or_default() += line.value;
            }
            Kind::Gauge => {
                gauges.insert(line.key, line.value);
            }
        }
        previous = Some(entry);
    }
    for values in timers.values_mut().chain(expected_timers.values_mut()) {
        values.sort_by(f64::total_cmp);
    }
    assert_eq!(counters, expected_counters);
    assert_eq!(timers, expected_timers);
    assert_eq!(gauges, expected_gauges);
}

#[tokio::test]
async fn metric_too_long_for_udp_is_dropped_not_retried_forever() {
    let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind server");
    let address = server.local_addr().expect("server address").to_string();
    let sink = StatsdSink::connect("statsd", settings(json!({"address": address})))
        .await
        .expect("connect");
    let huge = Arc::new(event(
        json!({"type": "track", "event": "x".repeat(70_000), "source": "s"}),
    ));
    let small = Arc::new(event(
        json!({"type": "track", "event": "ok", "source": "s"}),
    ));
    let batch = Batch {
        key: "b".into(),
        events: vec![huge, small],
    };
    assert_eq!(sink.deliver(&batch).await, Ok(()));
    let received = receive_lines(&server, 1, 1432).await;
    let lines: Vec<&str> = received.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(lines, ["analytics.s.track.ok:1|c"]);
}

#[tokio::test]
async fn refused_send_is_retryable() {
    let closed = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let address = closed.local_addr().expect("address").to_string();
    drop(closed);
    let sink = StatsdSink::connect("statsd", settings(json!({"address": address})))
        .await
        .expect("connect");
    let batch = Batch {
        key: "b".into(),
        events: vec![Arc::new(event(
            json!({"type": "track", "event": "E", "source": "s"}),
        ))],
    };
    let mut outcome = Ok(());
    for _ in 0..20 {
        outcome = sink.deliver(&batch).await;
        if outcome.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let error = outcome.expect_err("ICMP port unreachable surfaces as a send error");
    assert!(matches!(error, SinkError::Retryable(_)), "{error:?}");
}
