//! A sink's delivery settings (`sinks.<sink>.delivery`): typed, checked once at start, and
//! shared by the worker, `ingestctl` and the tests.

use serde::Deserialize;
use serde_json::Value;

use crate::sinks::Event;

/// How a sink is fed: batching, concurrency, prefetch, quick retries, circuit breaker, the
/// bound on how long a delivery may hold a raw message, filter.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliverySettings {
    pub batch_max_events: usize,
    pub batch_max_bytes: usize,
    pub linger_ms: u64,
    pub prefetch: u16,
    /// Attempts in place (with backoff and full jitter) before a batch takes the durable path.
    pub inline_attempts: u32,
    /// Consecutive failed attempts that open the circuit; 0 disables the breaker.
    pub breaker_failures: u32,
    pub breaker_cooldown_ms: u64,
    /// Batches delivered at once (the in-process path; more than one keeps a store busy while
    /// the next batch is built).
    pub max_in_flight: usize,
    /// A batch the sink has not taken within this time goes to the sink's own queue instead
    /// (its spill path), so a slow sink never holds raw acks, memory or other sinks back
    /// longer than this.
    pub spill_after_ms: u64,
    /// The longest one delivery of a batch may take; past it the attempt is a retryable
    /// failure, so a sink whose store stalls never hangs its runner.
    pub timeout_ms: u64,
    /// Only these event types (empty: all).
    pub types: Vec<String>,
    /// Only track events with these names (empty: all).
    pub events: Vec<String>,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            batch_max_events: 500,
            batch_max_bytes: 1 << 20,
            linger_ms: 200,
            prefetch: 128,
            inline_attempts: 3,
            breaker_failures: 5,
            breaker_cooldown_ms: 10_000,
            max_in_flight: 2,
            spill_after_ms: 10_000,
            timeout_ms: 30_000,
            types: Vec::new(),
            events: Vec::new(),
        }
    }
}

impl DeliverySettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.batch_max_events == 0 || self.batch_max_bytes == 0 || self.prefetch == 0 {
            return Err("batch_max_events, batch_max_bytes and prefetch must be > 0".into());
        }
        if self.inline_attempts == 0 {
            return Err("inline_attempts must be > 0".into());
        }
        if self.timeout_ms == 0 {
            return Err("timeout_ms must be > 0".into());
        }
        if self.max_in_flight == 0 || self.max_in_flight > 64 {
            return Err("max_in_flight must be between 1 and 64".into());
        }
        if self.spill_after_ms == 0 {
            return Err("spill_after_ms must be > 0".into());
        }
        Ok(())
    }

    /// Whether this sink wants the event.
    pub fn wants(&self, event: &Event) -> bool {
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
        if !self.types.is_empty() && !self.types.iter().any(|t| t == kind) {
            return false;
        }
        if !self.events.is_empty() {
            let name = event.get("event").and_then(Value::as_str);
            return kind == "track" && name.is_some_and(|n| self.events.iter().any(|e| e == n));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(v: Value) -> Event {
        v.as_object().cloned().unwrap_or_default().into()
    }

    #[test]
    fn filters_by_type_and_event_name() {
        let only_orders = DeliverySettings {
            events: vec!["Order Completed".into()],
            ..DeliverySettings::default()
        };
        assert!(only_orders.wants(&event(json!({"type":"track","event":"Order Completed"}))));
        assert!(!only_orders.wants(&event(json!({"type":"track","event":"Product Viewed"}))));
        assert!(!only_orders.wants(&event(json!({"type":"screen","name":"Order Completed"}))));
        let screens = DeliverySettings {
            types: vec!["screen".into()],
            ..DeliverySettings::default()
        };
        assert!(screens.wants(&event(json!({"type":"screen","name":"Cart"}))));
        assert!(!screens.wants(&event(json!({"type":"track","event":"X"}))));
        assert!(DeliverySettings::default().wants(&event(json!({"type":"identify"}))));
    }

    #[test]
    fn validation_names_the_bad_setting() {
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
}
