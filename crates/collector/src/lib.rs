//! The collector: authenticate, bound, publish with confirms, answer. `main` only loads the
//! configuration and calls [`serve`]; tests call it in-process on a port-0 listener.

pub mod api;
pub mod auth;
pub mod body;
pub mod error;
pub mod publisher;
pub mod ratelimit;
pub mod scan;
pub mod server;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ingest_pipeline::metrics::SchedulingDelay;
use ingest_pipeline::Settings;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::auth::WriteKeys;
use crate::body::Limits;
use crate::publisher::Publisher;

/// Serves until `shutdown` completes, then lets open requests finish (bounded by
/// `collector.shutdown_timeout_ms`) and closes the broker connection. Invalid settings are an
/// error before anything starts.
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    settings.validate_collector()?;
    let c = &settings.collector;
    ingest_pipeline::metrics::install("collector", &settings.metrics);
    let publisher = Publisher::start(settings.broker.clone());
    let state = Arc::new(AppState {
        publisher: publisher.clone(),
        in_flight: api::InFlight::new(
            c.max_in_flight,
            c.unauthenticated_in_flight(),
            c.max_in_flight_bytes,
            c.unauthenticated_in_flight_bytes(),
        ),
        limiter: ratelimit::RateLimiter::new(
            c.write_keys.keys(),
            c.rate_limit_per_second,
            c.rate_limit_burst,
        ),
        keys: WriteKeys::new(&c.write_keys),
        limits: Limits {
            max_event_bytes: c.max_event_bytes,
            max_batch_bytes: c.max_batch_bytes,
            max_batch_events: c.max_batch_events,
            partial_batches: c.partial_batches,
        },
        body_timeout: Duration::from_millis(c.body_timeout_ms),
        retry_after_secs: c.retry_after_secs,
        trusted_proxies: c.trusted_proxies.clone(),
        scheduling_delay: SchedulingDelay::start("collector"),
        max_scheduling_delay: (c.max_scheduling_delay_ms > 0)
            .then(|| Duration::from_millis(c.max_scheduling_delay_ms)),
    });
    let app = api::router(state, c);
    tracing::info!(addr = %listener.local_addr()?, "collector listening");

    let stop = CancellationToken::new();
    let stop_signal = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop_signal.cancel();
    });
    let graceful = stop.clone();
    let limits = server::ConnectionLimits::from_settings(c);
    let server = server::run(
        listener,
        app,
        limits,
        async move { graceful.cancelled().await },
    );
    let grace = Duration::from_millis(c.shutdown_timeout_ms);
    tokio::select! {
        () = server => {}
        () = async { stop.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "open requests did not finish in time; closing anyway");
        }
    }
    publisher.close().await;
    tracing::info!("collector stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Start-up refuses bad settings with an error naming the setting, whoever calls `serve`
    /// (a rate of 1e-300 once made the first request past the burst panic).
    #[tokio::test]
    async fn bad_settings_stop_start_up_with_an_error_naming_the_setting_instead_of_a_panic() {
        for rate in [f64::NAN, 1e-300] {
            let mut settings = Settings::defaults().expect("defaults");
            settings
                .collector
                .write_keys
                .insert("app".into(), ingest_pipeline::Secret::new("app-write-key"));
            settings.collector.rate_limit_per_second = rate;
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let started = serve(settings, listener, std::future::pending());
            let outcome = tokio::time::timeout(Duration::from_secs(10), started).await;
            let error = outcome
                .expect("serve ran on with an invalid setting")
                .expect_err("serve accepted an invalid setting");
            assert!(
                error
                    .to_string()
                    .contains("collector.rate_limit_per_second"),
                "{rate}: {error}"
            );
        }
    }
}
