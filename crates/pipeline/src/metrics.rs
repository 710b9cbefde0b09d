//! Prometheus metrics for both services: one process-wide recorder behind the `metrics` facade,
//! rendered by each service's `/metrics` (and mirrored to statsd when configured), and the
//! runtime's scheduling delay (the tokio analogue of Node's event-loop lag), which the collector
//! also sheds load on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::layers::FanoutBuilder;

use crate::settings::MetricsSettings;
use crate::statsd::Mirror;

/// Latency buckets in seconds: 0.5 ms to 30 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Lag buckets in seconds: events can wait minutes in a backlog.
const LAG_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];
const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];
/// Histogram samples are folded into buckets this often even when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// How often the scheduling-delay probe wakes.
const PROBE_EVERY: Duration = Duration::from_millis(100);

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// What a metric is, for its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric either service records, with its HELP text. A metric recorded without an
/// entry here has no HELP line (`promtool check metrics` flags it); a test keeps the two in
/// step.
pub const CATALOGUE: &[(&str, Kind, &str)] = &[
    // Both services.
    ("runtime_scheduling_delay_seconds", Kind::Histogram, "How late the runtime woke a task that slept 100 ms: what every other task waits too."),
    ("broker_channels_renewed_total", Kind::Counter, "Publishing channels replaced after the broker nacked a publish on them (the publish is then sent once more on the new channel)."),
    ("broker_confirm_waits_total", Kind::Counter, "Publishes whose confirm took longer than the caller's patience; they are waited for, never sent again."),
    ("broker_raw_queue_without_cap_total", Kind::Counter, "Declares that found the raw queue without the configured length cap (declared by an older release)."),
    ("broker_queue_kept_with_old_arguments_total", Kind::Counter, "Declares that kept an existing queue whose arguments differ from this release's."),
    // Collector.
    ("http_requests_total", Kind::Counter, "HTTP requests answered, by route and status."),
    ("http_request_duration_seconds", Kind::Histogram, "Time from a request's head to its answer, by route and status."),
    ("collector_overflowed_events_total", Kind::Counter, "Events of requests sent to the overflow lane (<prefix>.overflow) past their source's quota, by source and reason (source: policy.events_per_second; user: policy.user_events_per_second)."),
    ("collector_ceiling_refused_events_total", Kind::Counter, "Events of requests refused with 429 past their source's ceiling (policy.max_events_per_second), by source."),
    ("collector_quota_users_untracked_total", Kind::Counter, "Users not counted against policy.user_events_per_second because their source's table of active users was full (100000 per source per collector)."),
    ("collector_events_accepted_total", Kind::Counter, "Events in requests answered 2xx (confirmed by the broker)."),
    ("collector_events_refused_total", Kind::Counter, "Events of accepted batches refused alone (kept as invalid by the worker), by code."),
    ("collector_requests_spooled_total", Kind::Counter, "Requests answered 200 from the spool because the broker could not confirm them, by the broker's reason."),
    ("collector_spool_appended_total", Kind::Counter, "Requests fsync'd to the spool."),
    ("collector_spool_forwarded_total", Kind::Counter, "Spooled requests the broker has confirmed (their rate is the forward rate)."),
    ("collector_spool_forwarded_bytes_total", Kind::Counter, "Bytes of spooled requests the broker has confirmed."),
    ("collector_spool_bytes", Kind::Gauge, "Bytes the spool holds on disk (collector.spool.max_bytes bounds it)."),
    ("collector_spool_max_bytes", Kind::Gauge, "The spool's bound in bytes (collector.spool.max_bytes)."),
    ("collector_spool_records", Kind::Gauge, "Spooled requests not yet confirmed by the broker."),
    ("collector_spool_segments", Kind::Gauge, "Segment files of the spool."),
    ("collector_spool_oldest_age_seconds", Kind::Gauge, "Age of the oldest spooled request not yet confirmed by the broker; 0 when none."),
    ("collector_spool_sync_seconds", Kind::Histogram, "Time to append and fsync one group of spooled requests."),
    ("collector_spool_write_errors_total", Kind::Counter, "Groups of requests the spool failed to write (each answered 503)."),
    ("collector_spool_dropped_total", Kind::Counter, "Torn or corrupt spool records found, each dropped with the rest of its segment, by kind."),
    ("collector_load_shed_total", Kind::Counter, "Requests refused to protect the collector or the broker, by reason."),
    ("collector_in_flight_requests", Kind::Gauge, "Requests being read or published now."),
    ("collector_in_flight_bytes", Kind::Gauge, "Bytes reserved by requests being read or published now (collector.max_in_flight_bytes bounds it)."),
    ("collector_publish_confirm_seconds", Kind::Histogram, "Time from handing a request's body to the broker to its confirm, by outcome: the broker's share of a request's latency."),
    ("collector_request_own_seconds", Kind::Histogram, "Time a published request spent in the collector outside the broker's confirm: the collector's own share of its latency."),
    ("collector_connections_open", Kind::Gauge, "Open client connections."),
    ("collector_connections_rejected_total", Kind::Counter, "Connections closed at accept, by reason."),
    ("collector_connections_timed_out_total", Kind::Counter, "Connections closed for a request head or an idle spell that took too long, by reason."),
    ("collector_accept_errors_total", Kind::Counter, "Failed accepts (out of file descriptors, for example)."),
    // Worker.
    ("worker_consuming", Kind::Gauge, "1 while the worker consumes the raw queue, 0 otherwise."),
    ("worker_deliveries_total", Kind::Counter, "Raw deliveries settled, by outcome (acked, requeued, panicked)."),
    ("worker_events_total", Kind::Counter, "Events taken from raw deliveries, by result (valid, invalid)."),
    ("worker_queue_lag_seconds", Kind::Histogram, "Time from the collector's receipt of a request to the worker's handling of it (live traffic; replays count in worker_replay_lag_seconds)."),
    ("worker_replayed_events_total", Kind::Counter, "Events taken from the replay lane (ingestctl replay), by result (valid, invalid); also counted in worker_events_total."),
    ("worker_replay_lane_depth", Kind::Gauge, "Requests waiting in the replay lane (<prefix>.replay): what replays have left; read every 10 s."),
    ("worker_replay_lag_seconds", Kind::Histogram, "Time from ingestctl replay's send of an archived request to the worker's handling of it: the replay lane's lag."),
    ("worker_bot_events_total", Kind::Counter, "Events whose user agent is a bot's, by source, bot category (crawler, automation, monitor, http-library, or one enrich.bots names) and action (flagged, invalid, dropped: policy.bots)."),
    ("worker_geo_lookups_total", Kind::Counter, "Geolocation of events' context.ip, by result: found, missing (an address the database does not have), no_address (none, or not an address)."),
    ("worker_privacy_rules_applied_total", Kind::Counter, "Values the privacy rules changed, by source and action: drop, hash, redact (policy.fields) and ip (context.ip truncated or dropped)."),
    ("worker_sampled_events_total", Kind::Counter, "Valid events left out by a sampling rule (policy.sample), by source and the event name the rule names."),
    ("worker_overflow_events_total", Kind::Counter, "Events taken from the overflow lane (<prefix>.overflow: requests past their source's or a user's quota); also counted in worker_events_total."),
    ("worker_overflow_lag_seconds", Kind::Histogram, "Time from the collector's receipt of an overflowed request to the worker's handling of it: the overflow lane's lag (kept out of worker_queue_lag_seconds)."),
    ("worker_live_feed_viewers", Kind::Gauge, "Viewers of the live feed (ingestctl tail and console pages) as of the worker's last look, every 2 s; the worker publishes to the feed only while it is above 0."),
    ("worker_live_feed_published_total", Kind::Counter, "Items the worker published to the live feed (<prefix>.live) for ingestctl tail and console; only while a viewer watches."),
    ("worker_live_feed_skipped_total", Kind::Counter, "Items left out of the live feed past its rate (200 a second per worker); each next item says how many were skipped before it."),
    ("worker_live_feed_dropped_total", Kind::Counter, "Items of the live feed dropped because its task was behind (a slow broker): the feed is lossy by design."),
    ("worker_processing_panics_total", Kind::Counter, "Payloads whose processing panicked; each is kept as an invalid record."),
    ("worker_publish_returned_total", Kind::Counter, "Worker publishes returned unroutable (the target queue was missing), by target."),
    ("worker_publish_nacked_total", Kind::Counter, "Worker publishes refused by the broker, by target."),
    ("worker_invalid_folded_total", Kind::Counter, "Invalid events counted in a summary record instead of kept whole: repeats of one source and error signature within worker.invalid.window_ms."),
    ("worker_invalid_summaries_total", Kind::Counter, "Summary records the invalid queue took, by reason (folded: repeats counted; overflow: events refused at the byte cap)."),
    ("worker_invalid_overflow_total", Kind::Counter, "Invalid events the invalid queue refused at its byte cap (broker.invalid_max_length_bytes): counted in an overflow summary, not kept whole."),
    ("worker_invalid_overflow_pending", Kind::Gauge, "Invalid events refused at the invalid queue's byte cap and not yet in a summary record the queue took; above 0 the queue is full."),
    ("worker_invalid_signatures", Kind::Gauge, "Windows of (source, error signature) the worker tracks to compact repeated invalid events; worker.invalid.max_signatures bounds it."),
    ("sink_events_total", Kind::Counter, "Events by sink and outcome (delivered, retried, dead_lettered, filtered_out)."),
    ("sink_deliver_seconds", Kind::Histogram, "Time of one delivery attempt to a sink, by sink and result."),
    ("sink_batch_size", Kind::Histogram, "Events per delivery attempt, by sink."),
    ("sink_lag_seconds", Kind::Histogram, "Time from the collector's receipt of an event to its delivery to a sink, by sink (live events; replayed ones are left out)."),
    ("sink_spilled_batches_total", Kind::Counter, "Batches a sink did not take within spill_after_ms, put in its own queue instead, by sink."),
    ("worker_statsd_names_folded_total", Kind::Counter, "Events the statsd sink counted under `other` because max_event_names distinct event names already had series, by sink."),
    ("worker_statsd_duplicates_skipped_total", Kind::Counter, "Events the statsd sink did not count because it had counted the same event (source and messageId) among its last dedupe_window events in this worker, by sink."),
    ("mongo_documents_total", Kind::Counter, "Documents sent to MongoDB, by outcome (inserted, duplicate: already there, refused)."),
];

/// Gives every metric in [`CATALOGUE`] its HELP text, in the recorder just installed.
fn describe_all() {
    for &(name, kind, help) in CATALOGUE {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

/// Installs the process's recorder once (later calls get the same handle): Prometheus, and
/// beside it the statsd mirror when `metrics.statsd_address` is set, its names starting with
/// `<statsd_prefix>.<service>`. `None` if another recorder was installed first; the services
/// then run without `/metrics` content.
pub fn install(service: &str, settings: &MetricsSettings) -> Option<PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("lag_seconds".into()), LAG_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_size".into()), COUNT_BUCKETS)
                })
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    let prometheus = b.build_recorder();
                    let handle = prometheus.handle();
                    let installed = match statsd_mirror(service, settings) {
                        Some(mirror) => metrics::set_global_recorder(
                            FanoutBuilder::default()
                                .add_recorder(prometheus)
                                .add_recorder(mirror)
                                .build(),
                        )
                        .map_err(|e| e.to_string()),
                        None => metrics::set_global_recorder(prometheus).map_err(|e| e.to_string()),
                    };
                    installed.map(|()| handle)
                });
            match handle {
                Ok(handle) => {
                    describe_all();
                    let upkeep = handle.clone();
                    // A thread, not a task: it must outlive whichever runtime installed it.
                    let spawned = std::thread::Builder::new()
                        .name("metrics-upkeep".into())
                        .spawn(move || loop {
                            std::thread::sleep(UPKEEP_EVERY);
                            upkeep.run_upkeep();
                        });
                    if let Err(error) = spawned {
                        tracing::warn!(%error, "metrics upkeep thread not started");
                    }
                    Some(handle)
                }
                Err(error) => {
                    tracing::warn!(%error, "Prometheus recorder not installed");
                    None
                }
            }
        })
        .clone()
}

/// The statsd mirror, sending, when `metrics.statsd_address` is set. If its thread cannot
/// start, `/metrics` still works; only the mirror is missing.
fn statsd_mirror(service: &str, settings: &MetricsSettings) -> Option<Mirror> {
    let address = settings.statsd_address.as_ref()?;
    let mirror = Mirror::new(&format!("{}.{service}", settings.statsd_prefix));
    match mirror.start_sending(address.clone(), settings.statsd_interval()) {
        Ok(()) => {
            tracing::info!(%address, "metrics mirrored to statsd");
            Some(mirror)
        }
        Err(error) => {
            tracing::warn!(%address, %error, "statsd mirror not started");
            None
        }
    }
}

/// The text `/metrics` answers with (empty before [`install`]).
pub fn render() -> String {
    RECORDER
        .get()
        .and_then(Option::as_ref)
        .map(PrometheusHandle::render)
        .unwrap_or_default()
}

/// The latest measured scheduling delay of the runtime the probe runs on.
#[derive(Clone, Default)]
pub struct SchedulingDelay {
    micros: Arc<AtomicU64>,
}

impl SchedulingDelay {
    /// Starts the probe on the current runtime: a task that sleeps [`PROBE_EVERY`] and records
    /// how late it woke. A busy runtime wakes it late; that lateness is what every other task
    /// waits too. The probe stops when the last handle is dropped.
    pub fn start(service: &'static str) -> Self {
        let delay = Self::default();
        let weak = Arc::downgrade(&delay.micros);
        tokio::spawn(async move {
            let histogram =
                metrics::histogram!("runtime_scheduling_delay_seconds", "service" => service);
            loop {
                let start = Instant::now();
                tokio::time::sleep(PROBE_EVERY).await;
                let late = start.elapsed().saturating_sub(PROBE_EVERY);
                let Some(micros) = weak.upgrade() else { return };
                micros.store(
                    u64::try_from(late.as_micros()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                histogram.record(late.as_secs_f64());
            }
        });
        delay
    }

    pub fn current(&self) -> Duration {
        Duration::from_micros(self.micros.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric name recorded anywhere in the services' sources, by its macro.
    fn recorded_names() -> Vec<(String, Kind, String)> {
        let crates = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut found = Vec::new();
        let mut dirs = vec![crates];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir)
                .expect("readable source tree")
                .flatten()
            {
                let path = entry.path();
                if path.is_dir() {
                    if !path.ends_with("target") {
                        dirs.push(path);
                    }
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).expect("readable source");
                for (macro_name, kind) in [
                    ("counter!(", Kind::Counter),
                    ("gauge!(", Kind::Gauge),
                    ("histogram!(", Kind::Histogram),
                ] {
                    for (at, _) in text.match_indices(macro_name) {
                        let rest = text[at + macro_name.len()..].trim_start();
                        let Some(rest) = rest.strip_prefix('"') else {
                            continue;
                        };
                        let Some(end) = rest.find('"') else { continue };
                        found.push((rest[..end].to_owned(), kind, path.display().to_string()));
                    }
                }
            }
        }
        found
    }

    #[test]
    fn every_metric_the_services_record_has_a_help_text_of_its_kind() {
        let found = recorded_names();
        assert!(
            found.iter().any(|(name, _, _)| name == "sink_events_total"),
            "the scan finds the services' metrics"
        );
        for (name, kind, file) in found {
            if file.contains("pipeline/src/statsd") || file.ends_with("metrics.rs") {
                continue; // the statsd mirror's tests record throwaway names; this file scans
            }
            let entry = CATALOGUE.iter().find(|(n, _, _)| *n == name);
            assert!(
                entry.is_some_and(|(_, k, _)| *k == kind),
                "{name} ({kind:?}, in {file}) is not in metrics::CATALOGUE as a {kind:?}"
            );
        }
    }

    #[test]
    fn the_catalogue_names_each_metric_once_and_every_help_text_is_a_sentence() {
        let mut names: Vec<_> = CATALOGUE.iter().map(|(n, _, _)| *n).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "a metric is described twice");
        for (name, kind, help) in CATALOGUE {
            assert!(help.ends_with('.') && help.len() > 20, "{name}: {help:?}");
            assert_eq!(*kind == Kind::Counter, name.ends_with("_total"), "{name}");
        }
    }
}
