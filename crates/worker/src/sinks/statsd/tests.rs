//! What lines the statsd sink makes of events (names, values, sampling) and the checks of its
//! settings; the helpers here (a line parsed as the daemon parses it) serve `udp_tests` too.

use serde_json::{json, Value};

use super::*;

pub(super) fn settings(extra: Value) -> StatsdSinkSettings {
    let mut value =
        json!({"address": "127.0.0.1:8125", "timers": ["duration_ms"], "gauges": ["cart_size"]});
    if let (Value::Object(base), Value::Object(extra)) = (&mut value, extra) {
        base.extend(extra);
    }
    serde_json::from_value(value).expect("test settings deserialize")
}

pub(super) fn event(value: Value) -> Event {
    match value {
        Value::Object(map) => map.into(),
        other => panic!("test event must be an object, got {other}"),
    }
}

fn lines_for(settings: &StatsdSinkSettings, value: Value) -> Vec<String> {
    let mut out = Lines {
        lines: Vec::new(),
        folded: 0,
        ends: Vec::new(),
    };
    LineBuilder::new(settings).event(&event(value), &mut out);
    out.lines
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Counter,
    Timer,
    Gauge,
}

#[derive(Debug)]
pub(super) struct Line {
    pub(super) key: String,
    pub(super) raw_value: String,
    pub(super) value: f64,
    pub(super) kind: Kind,
    pub(super) rate: f64,
}

/// The daemon's line grammar (stats.js + helpers.js `is_valid_packet`), stricter on values:
/// they must be plain decimals, as the sink promises.
pub(super) fn parse_line(line: &str) -> Result<Line, String> {
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

fn number(value: Value) -> Option<String> {
    value.as_number().and_then(plain_number)
}

#[test]
fn numbers_are_plain_decimals() {
    assert_eq!(number(json!(2.0)).as_deref(), Some("2"));
    assert_eq!(number(json!(1.5)).as_deref(), Some("1.5"));
    assert_eq!(number(json!(0.000001)).as_deref(), Some("0.000001"));
    assert_eq!(
        number(json!(1e20)).as_deref(),
        Some("100000000000000000000")
    );
    assert_eq!(
        number(json!(u64::MAX)).as_deref(),
        Some("18446744073709551615")
    );
    assert_eq!(
        number(json!(i64::MIN)).as_deref(),
        Some("-9223372036854775808")
    );
    assert_eq!(
        number(json!(0.1 + 0.2)).as_deref(),
        Some("0.30000000000000004")
    );
    assert_eq!(number(json!(1e21)), None);
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
    let lines = builder.batch(&events, &mut fastrand::Rng::new()).lines;
    assert!((350..=650).contains(&lines.len()), "sent {}", lines.len());

    let all = LineBuilder::new(&settings(json!({}))).batch(&events, &mut fastrand::Rng::new());
    assert_eq!(all.lines.len(), 1000);
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

fn named(events: &[(&str, &str)]) -> Vec<Arc<Event>> {
    events
        .iter()
        .map(|(kind, name)| {
            let key = if *kind == "track" { "event" } else { "name" };
            Arc::new(event(json!({"type": kind, key: name, "source": "web",
                                  "properties": {"duration_ms": 5}})))
        })
        .collect()
}

fn counters(lines: &[String]) -> Vec<&str> {
    lines
        .iter()
        .filter_map(|l| l.strip_suffix(":1|c"))
        .collect()
}

#[test]
fn random_event_names_past_the_cap_are_counted_under_other_and_the_first_names_seen_stay() {
    let builder = LineBuilder::new(&settings(json!({"max_event_names": 3})));
    let mut rng = fastrand::Rng::new();
    let first = builder.batch(
        &named(&[
            ("track", "Signed Up"),
            ("track", "Signed Up"),
            ("screen", "Home"),
            ("track", "Random 1"),
            ("track", "Random 2"),
            ("page", "Random 3"),
        ]),
        &mut rng,
    );
    assert_eq!(
        counters(&first.lines),
        [
            "analytics.web.track.signed_up",
            "analytics.web.track.signed_up",
            "analytics.web.screen.home",
            "analytics.web.track.random_1",
            "analytics.web.track.other",
            "analytics.web.page.other",
        ]
    );
    assert!(
        first
            .lines
            .contains(&"analytics.web.track.other.duration_ms:5|ms".to_owned()),
        "a folded event's timers go under `other` too: {:?}",
        first.lines
    );
    assert_eq!(first.folded, 2);

    // The admitted set is stable: names seen first keep their series, later ones never get in.
    let second = builder.batch(
        &named(&[
            ("track", "Random 4"),
            ("screen", "Home"),
            ("track", "Random 1"),
            ("identify", ""),
        ]),
        &mut rng,
    );
    assert_eq!(
        counters(&second.lines),
        [
            "analytics.web.track.other",
            "analytics.web.screen.home",
            "analytics.web.track.random_1",
            "analytics.web.identify",
        ]
    );
    assert_eq!(second.folded, 1, "types without a name take no slot");
}

#[test]
fn names_that_clean_to_the_same_segment_take_one_slot() {
    let builder = LineBuilder::new(&settings(json!({"max_event_names": 1})));
    let out = builder.batch(
        &named(&[
            ("track", "Order Completed"),
            ("track", "order completed"),
            ("track", "x"),
        ]),
        &mut fastrand::Rng::new(),
    );
    assert_eq!(
        counters(&out.lines),
        [
            "analytics.web.track.order_completed",
            "analytics.web.track.order_completed",
            "analytics.web.track.other",
        ]
    );
    assert_eq!(out.folded, 1);
}

#[test]
fn each_datagram_holds_the_lines_lines_in_says_so_an_event_counts_as_sent_with_its_last_line() {
    let mut rng = fastrand::Rng::with_seed(7);
    for mtu in [64, 100, 512, 1432] {
        let lines: Vec<String> = (0..300)
            .map(|i| match i % 7 {
                // A negative gauge is two lines that travel together.
                0 => format!("a.b{i}:0|g\na.b{i}:-{}|g", rng.u8(..)),
                _ => format!("a.{}:{}|c", "x".repeat(rng.usize(1..40)), i),
            })
            .collect();
        let mut covered = 0;
        for datagram in pack(&lines, mtu) {
            let next = lines_in(&lines, covered, datagram.len());
            assert_eq!(datagram, lines[covered..next].join("\n"), "mtu {mtu}");
            covered = next;
        }
        assert_eq!(covered, lines.len(), "mtu {mtu}");
    }
}
