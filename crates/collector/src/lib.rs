//! The collector: authenticate, bound, publish with confirms, answer. `main` only loads the
//! configuration and calls [`serve`]; tests call it in-process on a port-0 listener.

pub mod api;
pub mod auth;
pub mod body;
pub mod error;
pub mod head;
pub mod in_flight;
pub mod limits;
pub mod per_client;
pub mod publisher;
pub mod quota;
pub mod ratelimit;
pub mod scan;
pub mod server;
pub mod spool;
pub mod unauth;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ingest_pipeline::metrics::SchedulingDelay;
use ingest_pipeline::Settings;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::auth::WriteKeys;
use crate::limits::Limits;
use crate::publisher::Publisher;
use crate::spool::Spool;

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
    let stop = CancellationToken::new();
    // The spool's forwarder outlives the requests: it stops once the spool is drained, or the
    // grace time is over, or the broker is away.
    let forwarding = CancellationToken::new();
    // Whatever way `serve` returns, the spool's tasks end and let go of it (and its lock).
    let _forwarding = forwarding.clone().drop_guard();
    let spool = if c.spool.enabled {
        Some(open_spool(&settings, &publisher, &forwarding).await?)
    } else {
        None
    };
    let spool_left = spool.clone();
    let state = Arc::new(AppState {
        publisher: publisher.clone(),
        spool,
        in_flight: in_flight::InFlight::new(
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
        quotas: quota::Quotas::new(c.write_keys.keys(), &settings.policy),
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
        per_forwarded_client: per_client::PerClient::new(c.max_connections_per_ip),
        unauthenticated: unauth::UnauthenticatedWork::new(
            c.unauthenticated_bytes_per_second,
            c.unauthenticated_burst_bytes,
        ),
        scheduling_delay: SchedulingDelay::start("collector"),
        max_scheduling_delay: (c.max_scheduling_delay_ms > 0)
            .then(|| Duration::from_millis(c.max_scheduling_delay_ms)),
    });
    let app = api::router(state, c);
    tracing::info!(addr = %listener.local_addr()?, "collector listening");

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
        c.trusted_proxies.clone(),
        async move { graceful.cancelled().await },
    );
    let grace = Duration::from_millis(c.shutdown_timeout_ms);
    tokio::select! {
        () = server => {}
        () = async { stop.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "open requests did not finish in time; closing anyway");
        }
    }
    if let Some(spool) = spool_left {
        drain_spool(&spool, &publisher, tokio::time::Instant::now() + grace).await;
    }
    forwarding.cancel();
    publisher.close().await;
    tracing::info!("collector stopped");
    Ok(())
}

/// On shutdown, while the broker takes publishes: lets the forwarder empty the spool, until
/// `deadline`. What is left stays on disk for the next start.
async fn drain_spool(spool: &Spool, publisher: &Publisher, deadline: tokio::time::Instant) {
    while spool.records() > 0
        && publisher.unready_reason().is_none()
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = spool.records();
    if left > 0 {
        tracing::warn!(
            records = left,
            dir = %spool.dir().display(),
            "stopping with requests in the spool; they are forwarded when a collector starts on it again"
        );
    }
}

/// Opens and recovers the spool, and starts its forwarder and the refresh of its gauges, both
/// ending with `stop`.
async fn open_spool(
    settings: &Settings,
    publisher: &Publisher,
    stop: &CancellationToken,
) -> anyhow::Result<Spool> {
    let c = &settings.collector;
    let spool_settings = c.spool.clone();
    let largest =
        spool::max_frame_bytes(c.max_batch_bytes.max(c.max_event_bytes), c.max_batch_events);
    let (spool, recovered) =
        tokio::task::spawn_blocking(move || Spool::open(&spool_settings, largest)).await??;
    tracing::info!(
        dir = %spool.dir().display(),
        records = recovered.records,
        bytes = recovered.bytes,
        dropped = recovered.dropped.len(),
        "spool open"
    );
    tokio::spawn(spool::forward::run(
        spool.clone(),
        publisher.clone(),
        c.spool.forward_in_flight,
        stop.clone(),
    ));
    let gauges = spool.clone();
    let stopped = stop.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = every.tick() => gauges.refresh_gauges(),
                () = stopped.cancelled() => return,
            }
        }
    });
    Ok(spool)
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
