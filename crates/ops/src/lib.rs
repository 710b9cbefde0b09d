//! `ingestctl`: what operators run against a live pipeline, with the services' configuration.
//! Queue depths for scaling, Nagios checks for paging, local schema checks for app teams.

pub mod canary;
pub mod dlq;
pub mod range;
pub mod scale;

use std::time::Duration;

use ingest_pipeline::settings::BrokerSettings;
use ingest_pipeline::{broker, Topology};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde::Serialize;

pub use range::Range;

/// One queue as ops see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueState {
    pub name: String,
    pub depth: u32,
    pub consumers: u32,
    /// Messages per second published into and acknowledged out of the queue, from the
    /// management API when it is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rates: Option<Rates>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rates {
    pub publish: f64,
    pub ack: f64,
}

/// A queue's rates from the management API's `GET /api/queues/{vhost}/{name}`.
pub async fn management_rates(base: &str, amqp_url: &str, queue: &str) -> anyhow::Result<Rates> {
    let vhost = amqp_url
        .rsplit_once('/')
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty() && !v.contains('@') && !v.contains(':'))
        .unwrap_or("%2f");
    let url = format!("{}/api/queues/{vhost}/{queue}", base.trim_end_matches('/'));
    let mut parsed = reqwest::Url::parse(&url)?;
    // Credentials go in one Authorization header: left in the URL as well, they would be sent
    // twice, and the management API answers a doubled header with 400.
    let user = parsed.username().to_owned();
    let password = parsed.password().map(str::to_owned);
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut request = client.get(parsed);
    if !user.is_empty() {
        request = request.basic_auth(user, password);
    }
    let body: serde_json::Value = request.send().await?.error_for_status()?.json().await?;
    Ok(parse_rates(&body))
}

/// Rates out of a management API queue object (0 where the broker has not sampled yet).
pub fn parse_rates(queue: &serde_json::Value) -> Rates {
    let rate = |key: &str| {
        queue
            .pointer(&format!("/message_stats/{key}/rate"))
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
    };
    Rates {
        publish: rate("publish_details"),
        ack: rate("ack_details"),
    }
}

/// Every queue of the pipeline: raw, invalid, and each sink's queue, delay queues and DLQ.
pub fn pipeline_queues(
    topology: &Topology,
    sinks: &[String],
    retry_delays: &[Duration],
) -> Vec<String> {
    let mut queues = topology.all_queues();
    for sink in sinks {
        queues.extend(topology.sink_queues(sink, retry_delays));
    }
    queues
}

/// Reads depth and consumer count of each queue over AMQP (passive declares); a queue that
/// does not exist is left out.
pub async fn queue_states(
    settings: &BrokerSettings,
    names: &[String],
) -> anyhow::Result<Vec<QueueState>> {
    let connection = tokio::time::timeout(
        Duration::from_secs(10),
        broker::connect(settings, "ingestctl"),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no answer from the broker within 10 s"))??;
    let mut states = Vec::with_capacity(names.len());
    for name in names {
        // A failed passive declare closes the channel, so each queue gets its own.
        let channel = connection.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        if let Ok(queue) = channel
            .queue_declare(name.as_str().into(), passive, FieldTable::default())
            .await
        {
            states.push(QueueState {
                name: name.clone(),
                depth: queue.message_count(),
                consumers: queue.consumer_count(),
                rates: None,
            });
            let _ = channel.close(200, "".into()).await;
        }
    }
    let _ = connection.close(200, "".into()).await;
    Ok(states)
}

/// Nagios / monitoring-plugins service states and their exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    Unknown = 3,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::Warning => "WARNING",
            Self::Critical => "CRITICAL",
            Self::Unknown => "UNKNOWN",
        }
    }
}

/// A depth check: critical wins over warning; no consumer on a non-empty queue is critical
/// when `require_consumers` is set.
pub fn check_queue(
    state: &QueueState,
    warning: Option<&Range>,
    critical: Option<&Range>,
    require_consumers: bool,
) -> (Status, String) {
    let depth = f64::from(state.depth);
    let mut status = Status::Ok;
    let mut why = Vec::new();
    if critical.is_some_and(|c| c.alerts(depth)) {
        status = Status::Critical;
    } else if warning.is_some_and(|w| w.alerts(depth)) {
        status = Status::Warning;
    }
    if require_consumers && state.consumers == 0 && state.depth > 0 {
        status = Status::Critical;
        why.push("no consumers".to_owned());
    }
    let range = |r: Option<&Range>| r.map(ToString::to_string).unwrap_or_default();
    let mut line = format!(
        "QUEUE {} - {} depth={} consumers={}",
        status.label(),
        state.name,
        state.depth,
        state.consumers
    );
    if !why.is_empty() {
        line.push_str(&format!(" ({})", why.join(", ")));
    }
    line.push_str(&format!(
        " | depth={};{};{};0; consumers={};;;0;",
        state.depth,
        range(warning),
        range(critical),
        state.consumers
    ));
    (status, line)
}

/// A drain-time check: seconds until `name` is empty at its current net rate, against the
/// thresholds. A queue that holds messages and is not shrinking never drains, which alerts
/// under any upper bound; its perfdata value is `U` (the guidelines' "cannot be determined").
pub fn check_drain(
    name: &str,
    observed: &scale::Observed,
    warning: Option<&Range>,
    critical: Option<&Range>,
) -> (Status, String) {
    let seconds = scale::drain_seconds(observed);
    let value = seconds.unwrap_or(f64::INFINITY);
    let status = if critical.is_some_and(|c| c.alerts(value)) {
        Status::Critical
    } else if warning.is_some_and(|w| w.alerts(value)) {
        Status::Warning
    } else {
        Status::Ok
    };
    let net = scale::net_rate(observed)
        .map(|n| format!("{n:+.1}/s"))
        .unwrap_or_else(|| "unknown".to_owned());
    let (drain, perf) = match seconds {
        Some(s) => (format!("empty in {s:.0} s"), format!("{s:.0}")),
        None => ("not draining".to_owned(), "U".to_owned()),
    };
    let range = |r: Option<&Range>| r.map(ToString::to_string).unwrap_or_default();
    let line = format!(
        "QUEUE {} - {name} {drain} (net {net}) depth={} consumers={} | drain_seconds={perf};{};{};0; depth={};;;0; consumers={};;;0;",
        status.label(),
        observed.depth,
        observed.consumers,
        range(warning),
        range(critical),
        observed.depth,
        observed.consumers,
    );
    (status, line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(depth: u32, consumers: u32) -> QueueState {
        QueueState {
            name: "analytics.raw".into(),
            depth,
            consumers,
            rates: None,
        }
    }

    #[test]
    fn rates_are_read_from_the_management_api_queue_object() {
        let queue = serde_json::json!({
            "messages": 12,
            "message_stats": {"publish_details": {"rate": 250.5}, "ack_details": {"rate": 240.0}}
        });
        assert_eq!(
            parse_rates(&queue),
            Rates {
                publish: 250.5,
                ack: 240.0
            }
        );
        assert_eq!(
            parse_rates(&serde_json::json!({})),
            Rates {
                publish: 0.0,
                ack: 0.0
            }
        );
    }

    #[test]
    fn status_line_and_perfdata_follow_the_plugin_guidelines() {
        let w: Range = "1000".parse().expect("w");
        let c: Range = "10000".parse().expect("c");
        let (status, line) = check_queue(&state(15230, 4), Some(&w), Some(&c), false);
        assert_eq!(status, Status::Critical);
        assert_eq!(
            line,
            "QUEUE CRITICAL - analytics.raw depth=15230 consumers=4 | depth=15230;1000;10000;0; consumers=4;;;0;"
        );
        assert_eq!(
            check_queue(&state(5000, 4), Some(&w), Some(&c), false).0,
            Status::Warning
        );
        assert_eq!(
            check_queue(&state(10, 4), Some(&w), Some(&c), false).0,
            Status::Ok
        );
    }

    #[test]
    fn a_non_empty_queue_without_consumers_is_critical_when_asked() {
        let (status, line) = check_queue(&state(3, 0), None, None, true);
        assert_eq!(status, Status::Critical);
        assert!(line.contains("no consumers"), "{line}");
        assert_eq!(check_queue(&state(0, 0), None, None, true).0, Status::Ok);
        assert_eq!(check_queue(&state(3, 0), None, None, false).0, Status::Ok);
    }

    fn observed(depth: u64, consumers: u32, net: f64) -> scale::Observed {
        scale::Observed {
            depth,
            consumers,
            publish_rate: None,
            drain_rate: None,
            net_rate: Some(net),
        }
    }

    #[test]
    fn drain_check_alerts_on_a_slow_or_stalled_drain() {
        let w: Range = "300".parse().expect("w");
        let c: Range = "900".parse().expect("c");
        let (status, line) = check_drain("a.raw", &observed(6000, 2, -100.0), Some(&w), Some(&c));
        assert_eq!(status, Status::Ok);
        assert_eq!(
            line,
            "QUEUE OK - a.raw empty in 60 s (net -100.0/s) depth=6000 consumers=2 | drain_seconds=60;300;900;0; depth=6000;;;0; consumers=2;;;0;"
        );
        let slow = check_drain("a.raw", &observed(6000, 2, -10.0), Some(&w), Some(&c));
        assert_eq!(slow.0, Status::Warning, "{}", slow.1);
        let slower = check_drain("a.raw", &observed(6000, 2, -5.0), Some(&w), Some(&c));
        assert_eq!(slower.0, Status::Critical, "{}", slower.1);
        // growing, or holding still with messages in it: never empties
        for net in [0.0, 50.0] {
            let (status, line) = check_drain("a.raw", &observed(10, 0, net), Some(&w), Some(&c));
            assert_eq!(status, Status::Critical, "{line}");
            assert!(
                line.contains("not draining") && line.contains("drain_seconds=U"),
                "{line}"
            );
        }
        // an empty queue is drained, whatever arrives
        let (status, line) = check_drain("a.raw", &observed(0, 0, 5.0), Some(&w), Some(&c));
        assert_eq!(status, Status::Ok, "{line}");
        assert!(line.contains("drain_seconds=0;"), "{line}");
    }

    #[test]
    fn queue_list_covers_every_sink() {
        let t = Topology::new("a");
        let q = pipeline_queues(&t, &["mongo".into()], &[Duration::from_secs(1)]);
        assert_eq!(
            q,
            vec![
                "a.raw",
                "a.invalid",
                "a.sink.mongo",
                "a.sink.mongo.retry.1000ms",
                "a.sink.mongo.dlq"
            ]
        );
    }
}
