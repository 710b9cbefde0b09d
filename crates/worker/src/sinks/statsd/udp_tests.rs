//! The statsd sink over a real UDP socket: what a daemon receives for a batch, a metric too
//! long for a datagram, a send the network refuses, a redelivered event counted once; and what
//! `connect` refuses.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::json;

use super::tests::{event, parse_line, settings, Kind};
use super::*;

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
        let mut event = event(value).fields();
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

#[tokio::test]
async fn more_distinct_event_names_than_the_default_cap_reach_the_daemon_as_the_cap_plus_other() {
    let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind server");
    let address = server.local_addr().expect("server address").to_string();
    let sink = StatsdSink::connect("statsd", settings(json!({"address": address})))
        .await
        .expect("connect");
    let cap = 1_000;
    let extra = 25;
    let events: Vec<Arc<Event>> = (0..cap + extra)
        .map(|i| {
            Arc::new(event(
                json!({"type": "track", "event": format!("Random {i}"), "source": "s"}),
            ))
        })
        .collect();
    let batch = Batch {
        key: "b".into(),
        events,
    };
    sink.deliver(&batch).await.expect("deliver");
    let received = receive_lines(&server, cap + extra, 1432).await;
    let mut counters: HashMap<String, f64> = HashMap::new();
    for (_, text) in &received {
        let line = parse_line(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        *counters.entry(line.key).or_default() += line.value;
    }
    assert_eq!(counters.len(), cap + 1, "the cap's names and `other`");
    assert_eq!(
        counters.get("analytics.s.track.other"),
        Some(&(extra as f64))
    );
    assert_eq!(counters.values().sum::<f64>(), (cap + extra) as f64);
    for i in 0..cap {
        assert_eq!(
            counters.get(&format!("analytics.s.track.random_{i}")),
            Some(&1.0)
        );
    }
}

/// The counters in what the daemon received, summed as it sums them.
fn counters(received: &[(usize, String)]) -> BTreeMap<String, f64> {
    let mut counters = BTreeMap::new();
    for (_, text) in received {
        let line = parse_line(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        if line.kind == Kind::Counter {
            *counters.entry(line.key).or_default() += line.value / line.rate;
        }
    }
    counters
}

fn identified(source: &str, id: &str, name: &str) -> Arc<Event> {
    Arc::new(event(json!({
        "type": "track", "event": name, "messageId": id, "source": source,
        "properties": {"duration_ms": 5},
    })))
}

#[tokio::test]
async fn the_same_event_redelivered_with_other_neighbours_is_counted_once() {
    let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind server");
    let address = server.local_addr().expect("server address").to_string();
    let sink = StatsdSink::connect("statsd", settings(json!({"address": address})))
        .await
        .expect("connect");
    let order = identified("shop-ios", "m-1", "Order Completed");
    let batches = [
        vec![
            order.clone(),
            identified("shop-ios", "m-2", "Product Viewed"),
        ],
        // A redelivery of the same event beside others, then alone, then twice in one batch.
        vec![
            identified("shop-ios", "m-3", "Checkout Started"),
            order.clone(),
        ],
        vec![order.clone()],
        vec![order.clone(), order],
        // The same messageId from another source is another event.
        vec![identified("shop-web", "m-1", "Order Completed")],
    ];
    for (i, events) in batches.into_iter().enumerate() {
        let batch = Batch {
            key: format!("b{i}"),
            events,
        };
        sink.deliver(&batch).await.expect("deliver");
    }
    let received = receive_lines(&server, 8, 1432).await;
    let expected: BTreeMap<String, f64> = [
        ("analytics.shop-ios.track.order_completed", 1.0),
        ("analytics.shop-ios.track.product_viewed", 1.0),
        ("analytics.shop-ios.track.checkout_started", 1.0),
        ("analytics.shop-web.track.order_completed", 1.0),
    ]
    .into_iter()
    .map(|(name, n)| (name.to_owned(), n))
    .collect();
    assert_eq!(counters(&received), expected);
    let timers = received.iter().filter(|(_, l)| l.contains("|ms")).count();
    assert_eq!(timers, 4, "one timer an event, not a copy: {received:?}");
}

#[tokio::test]
async fn with_the_window_off_every_copy_is_counted() {
    let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind server");
    let address = server.local_addr().expect("server address").to_string();
    let settings = settings(json!({"address": address, "dedupe_window": 0}));
    let sink = StatsdSink::connect("statsd", settings)
        .await
        .expect("connect");
    let order = identified("shop-ios", "m-1", "Order Completed");
    for key in ["b1", "b2"] {
        let batch = Batch {
            key: key.into(),
            events: vec![order.clone()],
        };
        sink.deliver(&batch).await.expect("deliver");
    }
    let received = receive_lines(&server, 4, 1432).await;
    assert_eq!(
        counters(&received).get("analytics.shop-ios.track.order_completed"),
        Some(&2.0)
    );
}
