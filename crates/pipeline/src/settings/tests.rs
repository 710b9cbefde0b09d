use super::*;

#[test]
fn defaults_parse_and_pass_shared_validation() {
    let s = Settings::defaults().expect("defaults");
    assert_eq!(s.broker.prefix, "analytics");
    assert_eq!(s.collector.max_event_bytes, 32 * 1024);
    assert_eq!(s.collector.max_batch_bytes, 500 * 1024);
    s.validate().expect("valid");
}

#[test]
fn collector_without_write_keys_is_rejected_naming_the_setting() {
    let s = Settings::defaults().expect("defaults");
    let err = s.validate_collector().expect_err("no keys");
    assert!(err.to_string().contains("collector.write_keys"), "{err}");
}

#[test]
fn bad_prefix_is_rejected_naming_the_setting() {
    let mut s = Settings::defaults().expect("defaults");
    s.broker.prefix = "has space".into();
    let err = s.validate().expect_err("bad prefix");
    assert!(err.to_string().contains("broker.prefix"), "{err}");
}

#[test]
fn bad_statsd_mirror_settings_are_rejected_naming_the_setting() {
    for prefix in ["", "ingest..x", ".ingest", "in gest"] {
        let mut s = Settings::defaults().expect("defaults");
        s.metrics.statsd_prefix = prefix.into();
        let err = s.validate().expect_err(prefix);
        assert!(err.to_string().contains("metrics.statsd_prefix"), "{err}");
    }
    for address in ["", "statsd", ":8125", "statsd:port"] {
        let mut s = Settings::defaults().expect("defaults");
        s.metrics.statsd_address = Some(address.into());
        let err = s.validate().expect_err(address);
        assert!(err.to_string().contains("metrics.statsd_address"), "{err}");
    }
    let mut s = Settings::defaults().expect("defaults");
    s.metrics.statsd_address = Some("statsd.internal:8125".into());
    s.metrics.statsd_prefix = "shop.ingest".into();
    assert!(s.validate().is_ok());
}

#[test]
fn environment_overrides_files_including_maps_lists_and_numbers() {
    // nextest runs each test in its own process, so setting the environment is contained.
    let vars = [
        ("APP_ENV", "local"),
        (
            "INGEST_CONFIG_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../config"),
        ),
        ("INGEST__BROKER__PREFIX", "tenant7"),
        ("INGEST__BROKER__CONFIRM_TIMEOUT_MS", "1234"),
        (
            "INGEST__COLLECTOR__WRITE_KEYS__SHOP_ANDROID",
            "android-key-1",
        ),
        ("INGEST__COLLECTOR__TRUSTED_PROXIES", "10.0.0.1,10.0.0.2"),
        ("INGEST__WORKER__UNKNOWN_EVENTS", "reject"),
        ("INGEST__SINKS__MONGO__DELIVERY__LINGER_MS", "5"),
        ("INGEST__SINKS__STATSD__ADDRESS", "statsd.internal:8125"),
        ("INGEST__SINKS__STATSD__SAMPLE_RATE", "0.5"),
    ];
    for (k, v) in vars {
        std::env::set_var(k, v);
    }
    let s = Settings::load().expect("load");
    assert_eq!(s.broker.prefix, "tenant7");
    assert_eq!(s.broker.confirm_timeout_ms, 1234);
    // from config/local.toml, plus the one from the environment
    assert_eq!(
        s.collector.write_keys["shop-ios"].expose(),
        "dev-ios-write-key"
    );
    assert_eq!(
        s.collector.write_keys["shop_android"].expose(),
        "android-key-1"
    );
    assert_eq!(s.collector.trusted_proxies.len(), 2);
    assert_eq!(s.worker.unknown_events, UnknownEventPolicy::Reject);
    // A sink's settings, typed, from the file beneath and the environment.
    assert!(s.sinks.mongo.enabled);
    assert_eq!(s.sinks.mongo.delivery.linger_ms, 5);
    assert_eq!(s.sinks.mongo.delivery.batch_max_events, 1000);
    let statsd = s
        .sinks
        .statsd
        .as_ref()
        .expect("statsd from the environment");
    assert_eq!(statsd.address, "statsd.internal:8125");
    assert_eq!(statsd.sample_rate, 0.5);
    s.validate_collector().expect("valid");
}

#[test]
fn a_rate_limit_that_is_not_finite_tiny_or_huge_or_a_burst_below_one_is_refused_naming_it() {
    let with = |rate: f64, burst: f64| {
        let mut s = Settings::defaults().expect("defaults");
        s.collector
            .write_keys
            .insert("app".into(), Secret::new("app-write-key"));
        s.collector.rate_limit_per_second = rate;
        s.collector.rate_limit_burst = burst;
        s.validate_collector()
    };
    for rate in [
        f64::NAN,
        f64::INFINITY,
        -1.0,
        1e-300,
        f64::MIN_POSITIVE,
        1e12,
    ] {
        let err = with(rate, 10.0).expect_err(&rate.to_string());
        assert!(
            err.to_string().contains("collector.rate_limit_per_second"),
            "{rate}: {err}"
        );
    }
    for burst in [f64::NAN, f64::INFINITY, 0.5, 0.0, -3.0] {
        let err = with(5.0, burst).expect_err(&burst.to_string());
        assert!(
            err.to_string().contains("collector.rate_limit_burst"),
            "{burst}: {err}"
        );
    }
    // Off (0), the burst is not used.
    assert!(with(0.0, f64::NAN).is_ok());
    for (rate, burst) in [(0.5, 2.0), (1000.0, 200.0), (0.001, 1.0), (1e6, 1e6)] {
        assert!(with(rate, burst).is_ok(), "{rate} {burst}");
    }
}

#[test]
fn unauthenticated_in_flight_defaults_to_a_quarter_and_must_leave_room_for_header_keys() {
    let mut s = Settings::defaults().expect("defaults");
    s.collector
        .write_keys
        .insert("app".into(), Secret::new("app-write-key"));
    s.collector.max_in_flight = 1024;
    assert_eq!(s.collector.unauthenticated_in_flight(), 256);
    s.collector.max_in_flight = 2;
    assert_eq!(s.collector.unauthenticated_in_flight(), 1);
    assert!(s.validate_collector().is_ok());
    for bad in [0, 2, 3] {
        s.collector.max_unauthenticated_in_flight = Some(bad);
        let err = s.validate_collector().expect_err("no room left");
        assert!(
            err.to_string()
                .contains("collector.max_unauthenticated_in_flight"),
            "{err}"
        );
    }
    s.collector.max_unauthenticated_in_flight = Some(1);
    assert!(s.validate_collector().is_ok());
}

#[test]
fn secrets_are_redacted_in_debug_output() {
    let mut s = Settings::defaults().expect("defaults");
    s.collector
        .write_keys
        .insert("app".into(), Secret::new("super-secret-key"));
    let printed = format!("{s:?}");
    assert!(!printed.contains("super-secret-key"));
    assert!(!printed.contains("guest:guest"));
}
