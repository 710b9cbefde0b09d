//! Checks of the settings, each naming the setting it refuses: those both services share, and
//! each service's own.

use super::{Settings, SettingsError, MAX_RATE_PER_SECOND, MIN_RATE_PER_SECOND};

impl Settings {
    /// Checks shared by both services.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if let Err((setting, reason)) = self.policy.validate(&self.enrich) {
            return Err(SettingsError::InvalidNamed { setting, reason });
        }
        let b = &self.broker;
        check(
            !b.nodes().is_empty(),
            "broker.url",
            "must not be empty (or give broker.urls)",
        )?;
        check(
            b.urls.iter().all(|u| !u.expose().is_empty()),
            "broker.urls",
            "must not hold an empty URL",
        )?;
        check(
            !b.prefix.is_empty()
                && b.prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
            "broker.prefix",
            "must be non-empty ASCII letters, digits, '.', '_' or '-'",
        )?;
        check(
            (1..=64).contains(&b.publish_channels),
            "broker.publish_channels",
            "must be between 1 and 64",
        )?;
        check(
            (2..=1000).contains(&b.delivery_limit),
            "broker.delivery_limit",
            "must be between 2 and 1000",
        )?;
        check(
            b.archive.max_age_is_valid(),
            "broker.archive.max_age",
            "must be a whole number > 0 and one unit: Y, M, D, h, m or s (e.g. 7D)",
        )?;
        check(
            b.archive.max_bytes >= 1 << 20,
            "broker.archive.max_bytes",
            "must be at least 1048576 (1 MiB)",
        )?;
        check(
            b.confirm_timeout_ms > 0,
            "broker.confirm_timeout_ms",
            "must be > 0",
        )?;
        check(
            b.reconnect_min_ms > 0 && b.reconnect_min_ms <= b.reconnect_max_ms,
            "broker.reconnect_min_ms",
            "must be > 0 and <= broker.reconnect_max_ms",
        )?;
        check(
            self.metrics.statsd_interval_ms >= 100,
            "metrics.statsd_interval_ms",
            "must be at least 100",
        )?;
        check(
            self.metrics.statsd_prefix.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
            }),
            "metrics.statsd_prefix",
            "must be dot-separated parts of ASCII letters, digits, '_' or '-', none empty",
        )?;
        check(
            self.metrics.statsd_address.as_ref().is_none_or(|a| {
                a.rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            }),
            "metrics.statsd_address",
            "must be host:port",
        )?;
        Ok(())
    }

    pub fn validate_collector(&self) -> Result<(), SettingsError> {
        self.validate()?;
        let c = &self.collector;
        check(
            c.max_event_bytes > 0,
            "collector.max_event_bytes",
            "must be > 0",
        )?;
        check(
            c.max_batch_bytes >= c.max_event_bytes,
            "collector.max_batch_bytes",
            "must be >= collector.max_event_bytes",
        )?;
        check(
            c.body_timeout_ms > 0,
            "collector.body_timeout_ms",
            "must be > 0",
        )?;
        check(
            c.max_batch_events > 0,
            "collector.max_batch_events",
            "must be > 0",
        )?;
        check(
            c.max_in_flight > 0,
            "collector.max_in_flight",
            "must be > 0",
        )?;
        check(
            c.max_in_flight_bytes >= c.max_batch_bytes.max(c.max_event_bytes),
            "collector.max_in_flight_bytes",
            "must be >= collector.max_batch_bytes, or a batch at the limit could never be taken",
        )?;
        check(
            c.max_unauthenticated_in_flight
                .is_none_or(|n| n > 0 && n < c.max_in_flight),
            "collector.max_unauthenticated_in_flight",
            "must be > 0 and < collector.max_in_flight, so requests with a header key keep slots of their own",
        )?;
        check(
            c.header_timeout_ms > 0 && c.idle_timeout_ms > 0,
            "collector.header_timeout_ms",
            "header_timeout_ms and idle_timeout_ms must be > 0",
        )?;
        check(
            c.max_connections_per_ip > 0,
            "collector.max_connections_per_ip",
            "must be > 0",
        )?;
        check(
            (8192..=1 << 20).contains(&c.max_header_bytes),
            "collector.max_header_bytes",
            "must be 8192 to 1048576",
        )?;
        check(
            c.max_connections > 0,
            "collector.max_connections",
            "must be > 0",
        )?;
        let rate = c.rate_limit_per_second;
        check(
            rate == 0.0 || (MIN_RATE_PER_SECOND..=MAX_RATE_PER_SECOND).contains(&rate),
            "collector.rate_limit_per_second",
            &format!(
                "must be 0 (no limit) or between {MIN_RATE_PER_SECOND} and {MAX_RATE_PER_SECOND}"
            ),
        )?;
        check(
            rate == 0.0 || (c.rate_limit_burst.is_finite() && c.rate_limit_burst >= 1.0),
            "collector.rate_limit_burst",
            "must be a finite number >= 1 while collector.rate_limit_per_second is on",
        )?;
        check(
            !c.write_keys.is_empty(),
            "collector.write_keys",
            "needs at least one source = \"key\" (or INGEST__COLLECTOR__WRITE_KEYS__<SOURCE>)",
        )?;
        if c.spool.enabled {
            let largest = c.max_batch_bytes.max(c.max_event_bytes) as u64;
            check(
                c.spool.segment_bytes >= largest,
                "collector.spool.segment_bytes",
                "must be >= collector.max_batch_bytes, so that any request fits in a segment",
            )?;
            check(
                c.spool.max_bytes >= c.spool.segment_bytes,
                "collector.spool.max_bytes",
                "must be >= collector.spool.segment_bytes",
            )?;
            check(
                c.spool.forward_in_flight > 0,
                "collector.spool.forward_in_flight",
                "must be > 0",
            )?;
            check(
                !c.spool.dir.as_os_str().is_empty(),
                "collector.spool.dir",
                "must not be empty",
            )?;
        }
        for (source, key) in &c.write_keys {
            if key.expose().len() < 8 {
                return Err(SettingsError::Invalid {
                    setting: "collector.write_keys",
                    reason: format!("the key of source `{source}` is shorter than 8 characters"),
                });
            }
        }
        Ok(())
    }

    pub fn validate_worker(&self) -> Result<(), SettingsError> {
        self.validate()?;
        let w = &self.worker;
        check(w.prefetch > 0, "worker.prefetch", "must be > 0")?;
        check(
            w.max_payload_events > 0 && w.max_payload_bytes > 0,
            "worker.max_payload_bytes",
            "must be > 0",
        )?;
        // Below RabbitMQ's largest message (128 MiB by default) with room for the envelope.
        check(
            (w.max_payload_bytes..=(64 << 20)).contains(&w.max_built_bytes),
            "worker.max_built_bytes",
            "must be at least worker.max_payload_bytes and at most 64 MiB",
        )?;
        // Whatever batch a collector with this configuration accepts builds within it
        // (`built::WORKER_BOUND_FACTOR`), so a 200 never becomes a whole-request invalid record.
        let c = &self.collector;
        let accepted = crate::built::WORKER_BOUND_FACTOR
            .saturating_mul(c.max_batch_bytes)
            .saturating_add(
                c.max_batch_events
                    .saturating_mul(crate::built::WORKER_FIELDS_BYTES),
            );
        check(
            w.max_built_bytes >= accepted,
            "worker.max_built_bytes",
            "must be at least 6 x collector.max_batch_bytes + 2048 x collector.max_batch_events, \
             what a batch the collector accepts can come to once built",
        )?;
        check(
            !self.mongo.database.is_empty(),
            "mongo.database",
            "must not be empty",
        )?;
        check(
            !self.sinks.retry_delays_ms.is_empty()
                && self.sinks.retry_delays_ms.iter().all(|d| *d > 0),
            "sinks.retry_delays_ms",
            "needs at least one delay, each > 0",
        )?;
        check(
            self.sinks.max_attempts > 0,
            "sinks.max_attempts",
            "must be > 0",
        )?;
        check(
            !self.mongo.collection.is_empty(),
            "mongo.collection",
            "must not be empty",
        )?;
        check(self.mongo.timeout_ms > 0, "mongo.timeout_ms", "must be > 0")?;
        w.invalid
            .validate()
            .map_err(|(setting, reason)| SettingsError::Invalid { setting, reason })
    }
}

fn check(ok: bool, setting: &'static str, reason: &str) -> Result<(), SettingsError> {
    if ok {
        Ok(())
    } else {
        Err(SettingsError::Invalid {
            setting,
            reason: reason.to_owned(),
        })
    }
}
