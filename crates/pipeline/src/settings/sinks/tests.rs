//! The sinks' settings read as a config file holds them: defaults, unknown keys refused, and
//! each check naming the setting it is about.

use config::{Config, File, FileFormat};
use serde_json::{json, Value};

use super::*;

fn statsd(extra: Value) -> StatsdSinkSettings {
    let mut value = json!({"address": "127.0.0.1:8125"});
    if let (Value::Object(base), Value::Object(extra)) = (&mut value, extra) {
        base.extend(extra);
    }
    serde_json::from_value(value).expect("test settings deserialize")
}

fn wants(delivery: &DeliverySettings, event: &Value) -> bool {
    delivery.wants(event["type"].as_str(), event["event"].as_str())
}

#[test]
fn the_readmes_example_reads_through_the_config_crate_as_typed_settings() {
    let toml = r#"
        [sinks]
        retry_delays_ms = [1000, 10000, 60000, 300000]
        max_attempts = 8

        [sinks.mongo]
        enabled = true
        delivery = { batch_max_events = 1000, linger_ms = 50 }

        [sinks.statsd]
        address = "statsd.internal:8125"
        prefix = "analytics"
        timers = ["duration_ms", "load_time_ms"]
        gauges = ["cart_size"]
        sample_rate = 1
        mtu = 1432

        [[sinks.http]]
        name = "crm"
        url = "https://hooks.example.com/analytics"
        headers = { Authorization = "Bearer secret-token" }
        format = "ndjson"
        connect_timeout_ms = 2000
        request_timeout_ms = 10000
        delivery = { events = ["Order Completed"], batch_max_events = 100, prefetch = 16 }
    "#;
    #[derive(Deserialize)]
    struct Only {
        sinks: SinksSettings,
    }
    let only: Only = Config::builder()
        .add_source(File::from_str(toml, FileFormat::Toml))
        .build()
        .and_then(Config::try_deserialize)
        .expect("typed sinks");
    let sinks = only.sinks;
    assert!(sinks.mongo.enabled);
    assert_eq!(sinks.mongo.delivery.batch_max_events, 1000);
    assert_eq!(sinks.mongo.delivery.linger_ms, 50);
    assert_eq!(sinks.mongo.delivery.prefetch, 128, "the rest are defaults");
    let statsd = sinks.statsd.as_ref().expect("statsd");
    assert_eq!(statsd.sample_rate, 1.0);
    assert_eq!(statsd.timers, ["duration_ms", "load_time_ms"]);
    assert_eq!(statsd.validate(), Ok(()));
    let crm = &sinks.http[0];
    assert_eq!(crm.format, BodyFormat::Ndjson);
    assert_eq!(crm.delivery.events, ["Order Completed"]);
    assert_eq!(crm.delivery.prefetch, 16);
    assert_eq!(crm.headers["Authorization"].expose(), "Bearer secret-token");
    assert_eq!(sinks.names(), ["mongo", "statsd", "crm"]);
    let printed = format!("{sinks:?} {crm:?}");
    assert!(!printed.contains("secret-token"), "{printed}");
}

#[test]
fn unknown_keys_are_refused_in_every_sink_and_in_delivery() {
    let cases = [
        json!({"mongo": {"enabled": true, "enable": false}}),
        json!({"mongo": {"enabled": true, "delivery": {"linger": 5}}}),
        json!({"mongo": {"enabled": true}, "statsd": {"address": "a:1", "counters_by": []}}),
        json!({"mongo": {"enabled": true}, "http": [{"name": "n", "url": "http://h/", "max_retries": 3}]}),
    ];
    for mut sinks in cases {
        sinks["retry_delays_ms"] = json!([1000]);
        sinks["max_attempts"] = json!(3);
        let parsed = serde_json::from_value::<SinksSettings>(sinks.clone());
        assert!(parsed.is_err(), "{sinks}");
    }
}

#[test]
fn http_defaults_and_checks_of_name_and_timeouts() {
    let parsed: HttpSinkSettings = serde_json::from_value(json!({
        "name": "warehouse",
        "url": "https://example.com/events",
    }))
    .expect("minimal settings");
    assert_eq!(parsed.format, BodyFormat::Json);
    assert_eq!(parsed.connect_timeout_ms, 2_000);
    assert_eq!(parsed.request_timeout_ms, 10_000);
    assert!(parsed.headers.is_empty());
    assert_eq!(parsed.validate(), Ok(()));
    type Mutation = fn(&mut HttpSinkSettings);
    let cases: [(&str, Mutation); 6] = [
        ("name", |s| s.name = "Warehouse".to_owned()),
        ("name", |s| s.name = String::new()),
        ("built-in sink", |s| s.name = "statsd".to_owned()),
        ("built-in sink", |s| s.name = "mongo".to_owned()),
        ("connect_timeout_ms", |s| s.connect_timeout_ms = 0),
        ("request_timeout_ms", |s| s.request_timeout_ms = 0),
    ];
    for (expected, mutate) in cases {
        let mut bad = parsed.clone();
        mutate(&mut bad);
        let error = bad.validate().expect_err(expected);
        assert!(
            error.contains(expected),
            "{error:?} should mention {expected}"
        );
    }
}

#[test]
fn statsd_defaults_and_validation_name_the_field() {
    let s = statsd(json!({}));
    assert_eq!(s.prefix, "analytics");
    assert_eq!(s.mtu, 1432);
    assert_eq!(s.sample_rate, 1.0);
    assert!(s.timers.is_empty() && s.gauges.is_empty());
    assert_eq!(s.max_event_names, 1_000);
    assert_eq!(s.dedupe_window, 100_000);
    assert_eq!(s.validate(), Ok(()));
    assert_eq!(statsd(json!({"dedupe_window": 0})).validate(), Ok(()));
    assert_eq!(statsd(json!({"address": "[::1]:8125"})).validate(), Ok(()));
    for (extra, field) in [
        (json!({"address": "statsd"}), "address"),
        (json!({"address": ":8125"}), "address"),
        (json!({"address": "statsd:0"}), "address"),
        (json!({"address": "statsd:99999"}), "address"),
        (json!({"prefix": ""}), "prefix"),
        (json!({"prefix": "a..b"}), "prefix"),
        (json!({"prefix": "a b"}), "prefix"),
        (json!({"mtu": 10}), "mtu"),
        (json!({"mtu": 70000}), "mtu"),
        (json!({"sample_rate": 0.0}), "sample_rate"),
        (json!({"sample_rate": 1.5}), "sample_rate"),
        (json!({"sample_rate": -0.5}), "sample_rate"),
        (json!({"max_event_names": 0}), "max_event_names"),
        (json!({"max_event_names": 1_000_001}), "max_event_names"),
        (json!({"dedupe_window": 10_000_001}), "dedupe_window"),
    ] {
        let error = statsd(extra.clone())
            .validate()
            .expect_err(&extra.to_string());
        assert!(error.starts_with(&format!("{field}:")), "{extra}: {error}");
    }
    let mut nan = statsd(json!({}));
    nan.sample_rate = f64::NAN;
    assert!(nan.validate().is_err());
}

#[test]
fn delivery_filters_by_type_and_event_name() {
    let only_orders = DeliverySettings {
        events: vec!["Order Completed".into()],
        ..DeliverySettings::default()
    };
    assert!(wants(
        &only_orders,
        &json!({"type":"track","event":"Order Completed"})
    ));
    assert!(!wants(
        &only_orders,
        &json!({"type":"track","event":"Product Viewed"})
    ));
    assert!(!wants(
        &only_orders,
        &json!({"type":"screen","name":"Order Completed"})
    ));
    let screens = DeliverySettings {
        types: vec!["screen".into()],
        ..DeliverySettings::default()
    };
    assert!(wants(&screens, &json!({"type":"screen","name":"Cart"})));
    assert!(!wants(&screens, &json!({"type":"track","event":"X"})));
    assert!(wants(
        &DeliverySettings::default(),
        &json!({"type":"identify"})
    ));
}

#[test]
fn delivery_validation_names_the_bad_setting() {
    let zero = DeliverySettings {
        max_in_flight: 0,
        ..DeliverySettings::default()
    };
    assert!(zero.validate().is_err_and(|e| e.contains("max_in_flight")));
    let no_spill = DeliverySettings {
        spill_after_ms: 0,
        ..DeliverySettings::default()
    };
    assert!(no_spill
        .validate()
        .is_err_and(|e| e.contains("spill_after_ms")));
    assert!(DeliverySettings::default().validate().is_ok());
}
