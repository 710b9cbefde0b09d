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
