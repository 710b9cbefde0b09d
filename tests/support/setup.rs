//! A test's settings and environment: the servers `scripts/test` started, the write keys, a
//! queue prefix and database of the test's own, and the settings as the binaries read them.

use ingest_pipeline::settings::{HttpSinkSettings, MongoSinkSettings};
use ingest_pipeline::{Secret, Settings};
use std::path::PathBuf;

pub const IOS_KEY: &str = "test-ios-write-key";

pub const WEB_KEY: &str = "test-web-write-key";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with scripts/test, which starts the servers")
    })
}

pub fn amqp_url() -> String {
    required_env("TEST_AMQP_URL")
}

pub fn mongo_uri() -> String {
    required_env("TEST_MONGO_URI")
}

pub fn init_logs() {
    if let Ok(level) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(level)
            .with_test_writer()
            .try_init();
    }
}

/// Where a test's own files go: `TEST_WORK_DIR` (set by scripts/test), else the temp directory.
pub fn work_dir() -> PathBuf {
    std::env::var("TEST_WORK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir())
}

/// Turns the collector's spool on, in a directory of the test's own ([`spool_dir`]), with
/// segments of 1 MiB.
pub fn spool_on(s: &mut Settings) {
    s.collector.spool.enabled = true;
    s.collector.spool.dir = spool_dir(s);
    s.collector.spool.segment_bytes = 1 << 20;
}

/// The spool directory [`spool_on`] gives the test's collector.
pub fn spool_dir(s: &Settings) -> PathBuf {
    work_dir().join(format!("spool-{}", s.broker.prefix))
}

/// A name no other test uses: queue prefix and database name.
pub fn unique(name: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("t{}_{}", &id[..10], name)
}

/// Settings for one test: its own prefix and database, short timeouts.
pub fn settings(name: &str) -> Settings {
    init_logs();
    let mut s = Settings::defaults().unwrap();
    let id = unique(name);
    s.broker.url = Secret::new(amqp_url());
    s.broker.prefix = id.clone();
    s.broker.publish_channels = 2;
    s.broker.confirm_timeout_ms = 3000;
    s.broker.reconnect_min_ms = 100;
    s.broker.reconnect_max_ms = 1000;
    // Each test's archive stream on the shared broker: small segments, little disk.
    s.broker.archive.max_bytes = 64 << 20;
    s.mongo.uri = Secret::new(mongo_uri());
    s.mongo.database = id;
    s.collector.listen = "127.0.0.1:0".parse().unwrap();
    s.collector.retry_after_secs = 2;
    s.collector.shutdown_timeout_ms = 5000;
    s.collector.write_keys = [
        ("shop-ios".to_owned(), Secret::new(IOS_KEY)),
        ("shop-web".to_owned(), Secret::new(WEB_KEY)),
    ]
    .into_iter()
    .collect();
    s.worker.schemas_dir = root().join("schemas");
    s.sinks.mongo = mongo_sink(serde_json::json!({"batch_max_events": 1000, "linger_ms": 20}));
    s.worker.shutdown_timeout_ms = 10_000;
    s.worker.listen = "127.0.0.1:0".parse().unwrap();
    // Off in tests: on a loaded 2-core CI machine the runtime can run late for reasons that
    // have nothing to do with the test. The test of this shedding turns it on.
    s.collector.max_scheduling_delay_ms = 0;
    // Every test's clients are one address, 127.0.0.1: the per-address share is the tests' of
    // it to lower (tests/e2e/per_client.rs).
    s.collector.max_connections_per_ip = s.collector.max_connections;
    s.validate_collector().unwrap();
    s.validate_worker().unwrap();
    s
}

/// An HTTP sink's settings from JSON, as a config file holds them.
pub fn http_sink(value: serde_json::Value) -> HttpSinkSettings {
    serde_json::from_value(value).unwrap()
}

/// The MongoDB sink, enabled, with this `delivery` table.
pub fn mongo_sink(delivery: serde_json::Value) -> MongoSinkSettings {
    MongoSinkSettings {
        enabled: true,
        delivery: serde_json::from_value(delivery).unwrap(),
    }
}

/// The settings as the binaries read them from the environment.
pub fn settings_env(s: &Settings) -> Vec<(String, String)> {
    let management = s.broker.management_url.as_ref().map(|url| {
        (
            "INGEST__BROKER__MANAGEMENT_URL".to_owned(),
            url.expose().to_owned(),
        )
    });
    let statsd = s.metrics.statsd_address.as_ref().map(|address| {
        [
            (
                "INGEST__METRICS__STATSD_ADDRESS".to_owned(),
                address.clone(),
            ),
            (
                "INGEST__METRICS__STATSD_INTERVAL_MS".to_owned(),
                s.metrics.statsd_interval_ms.to_string(),
            ),
            (
                "INGEST__METRICS__STATSD_PREFIX".to_owned(),
                s.metrics.statsd_prefix.clone(),
            ),
        ]
    });
    let urls = (!s.broker.urls.is_empty()).then(|| {
        let urls: Vec<&str> = s.broker.urls.iter().map(|u| u.expose()).collect();
        ("INGEST__BROKER__URLS".to_owned(), urls.join(","))
    });
    let mut env = vec![
        ("APP_ENV".into(), "test".into()),
        (
            "INGEST_CONFIG_DIR".into(),
            root().join("config").display().to_string(),
        ),
        (
            "INGEST__BROKER__URL".into(),
            s.broker.url.expose().to_owned(),
        ),
        ("INGEST__BROKER__PREFIX".into(), s.broker.prefix.clone()),
        (
            "INGEST__BROKER__ARCHIVE__ENABLED".into(),
            s.broker.archive.enabled.to_string(),
        ),
        (
            "INGEST__BROKER__ARCHIVE__MAX_AGE".into(),
            s.broker.archive.max_age.clone(),
        ),
        (
            "INGEST__BROKER__ARCHIVE__MAX_BYTES".into(),
            s.broker.archive.max_bytes.to_string(),
        ),
        (
            "INGEST__BROKER__RECONNECT_MIN_MS".into(),
            s.broker.reconnect_min_ms.to_string(),
        ),
        (
            "INGEST__BROKER__RECONNECT_MAX_MS".into(),
            s.broker.reconnect_max_ms.to_string(),
        ),
        ("INGEST__WORKER__LISTEN".into(), s.worker.listen.to_string()),
        (
            "INGEST__COLLECTOR__MAX_SCHEDULING_DELAY_MS".into(),
            s.collector.max_scheduling_delay_ms.to_string(),
        ),
        (
            "INGEST__COLLECTOR__MAX_IN_FLIGHT".into(),
            s.collector.max_in_flight.to_string(),
        ),
        (
            "INGEST__COLLECTOR__MAX_IN_FLIGHT_BYTES".into(),
            s.collector.max_in_flight_bytes.to_string(),
        ),
        (
            "INGEST__BROKER__CONFIRM_TIMEOUT_MS".into(),
            s.broker.confirm_timeout_ms.to_string(),
        ),
        ("INGEST__MONGO__URI".into(), s.mongo.uri.expose().to_owned()),
        ("INGEST__MONGO__DATABASE".into(), s.mongo.database.clone()),
        (
            "INGEST__WORKER__SCHEMAS_DIR".into(),
            s.worker.schemas_dir.display().to_string(),
        ),
        (
            "INGEST__WORKER__PREFETCH".into(),
            s.worker.prefetch.to_string(),
        ),
        (
            "INGEST__WORKER__INVALID__WINDOW_MS".into(),
            s.worker.invalid.window_ms.to_string(),
        ),
        (
            "RUST_LOG".into(),
            std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()),
        ),
    ];
    env.extend(management);
    env.extend(urls);
    env.extend(statsd.into_iter().flatten());
    env
}

/// Copies a directory tree (a tracking plan a test changes).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A copy of the tracking plan where Product Viewed wrongly requires `sku` (a tracking-plan
/// bug): the plan's directory, the schema's file and its right text, to write back as the fix.
pub fn plan_requiring_sku(name: &str) -> (PathBuf, PathBuf, String) {
    let plan = work_dir().join(unique(name));
    copy_dir(&root().join("schemas"), &plan);
    let schema_file = plan.join("track/product_viewed.json");
    let original = std::fs::read_to_string(&schema_file).unwrap();
    let strict = original.replace(
        r#""required": ["product_id"]"#,
        r#""required": ["product_id", "sku"]"#,
    );
    assert_ne!(strict, original);
    std::fs::write(&schema_file, strict).unwrap();
    (plan, schema_file, original)
}
