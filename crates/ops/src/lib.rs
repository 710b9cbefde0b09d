//! `ingestctl`: what operators run against a live pipeline, with the services' configuration.
//! Queue depths for scaling, Nagios checks for paging, local schema checks for app teams.

pub mod canary;
pub mod cluster;
pub mod console;
pub mod dlq;
pub mod invalid;
pub mod live;
pub mod management;
pub mod range;
pub mod replay;
pub mod scale;
pub mod spool;
pub mod table;

use std::time::Duration;

use ingest_pipeline::settings::BrokerSettings;
use ingest_pipeline::{broker, Topology};
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
    /// A quorum queue's leader, members and online members, from the management API when it
    /// is configured.
    #[serde(flatten)]
    pub members: Option<cluster::Members>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rates {
    pub publish: f64,
    /// Delivered to consumers (and fetched by basic.get), acknowledged or not yet.
    pub deliver: f64,
    pub ack: f64,
}

/// A queue's rates from the management API's `GET /api/queues/{vhost}/{name}`, for the vhost
/// of the broker URL; `None` while the broker has no statistics for the queue.
pub async fn management_rates(
    base: &str,
    amqp_url: &str,
    queue: &str,
) -> anyhow::Result<Option<Rates>> {
    Ok(parse_rates(
        &management::queue(base, amqp_url, queue).await?,
    ))
}

/// An unlabelled series' value in a service's `/metrics` text (Prometheus exposition); `None`
/// when it is not there or not a number.
pub fn exposed_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.split_once(' ')?;
            (series == name).then(|| value.trim().parse::<f64>().ok())?
        })
}

/// Rates out of a management API queue object: `None` without `message_stats` (the broker
/// has not sampled the queue yet, or collects no statistics); a rate it has not sampled is 0.
pub fn parse_rates(queue: &serde_json::Value) -> Option<Rates> {
    let stats = queue.get("message_stats")?;
    let rate = |key: &str| {
        stats
            .pointer(&format!("/{key}/rate"))
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
    };
    Some(Rates {
        publish: rate("publish_details"),
        deliver: rate("deliver_get_details"),
        ack: rate("ack_details"),
    })
}

/// Every queue of the pipeline: raw, the replay and overflow lanes, invalid, the raw DLQ, and
/// each sink's queue, delay queues and DLQ.
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
        if let Some(queue) = broker::inspect_queue(&connection, name).await? {
            states.push(QueueState {
                name: name.clone(),
                depth: queue.message_count(),
                consumers: queue.consumer_count(),
                rates: None,
                members: None,
            });
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

/// How long the queue's backlog takes to be worked off, as far as the broker's figures tell.
#[derive(Debug, Clone, PartialEq)]
pub enum Drain {
    /// Whole seconds, and how they were derived.
    Seconds(f64, String),
    /// It holds messages and nothing is working them off (no consumers, no acks, or above
    /// the floor and not shrinking between two samples).
    Stalled(String),
    /// The broker gave no figures to tell.
    Unknown(String),
}

/// With management API rates: depth / ack rate, the seconds a message arriving now waits.
/// With two depth samples: depth / shrink rate, the seconds until it is empty (at least that
/// wait); a queue that does not shrink with consumers on it is only stalled above
/// `min_depth`, since a busy queue in a steady state does not shrink either.
pub fn drain(observed: &scale::Observed, min_depth: u64) -> Drain {
    let depth = observed.depth;
    if depth == 0 {
        return Drain::Seconds(0.0, "empty".to_owned());
    }
    if observed.consumers == 0 {
        return Drain::Stalled("no consumers".to_owned());
    }
    let seconds = |rate: f64| (depth as f64 / rate).round();
    match (observed.drain_rate, observed.net_rate) {
        (Some(ack), _) if ack > 0.0 => Drain::Seconds(
            seconds(ack),
            format!(
                "worked off in {:.0} s at {ack:.1}/s acked, {:.1}/s arriving",
                seconds(ack),
                observed.publish_rate.unwrap_or(0.0)
            ),
        ),
        (Some(_), _) => Drain::Stalled("nothing acked".to_owned()),
        (None, Some(net)) if net < 0.0 => Drain::Seconds(
            seconds(-net),
            format!("empty in {:.0} s (net {net:+.1}/s)", seconds(-net)),
        ),
        (None, Some(_)) if depth <= min_depth => Drain::Seconds(
            0.0,
            format!("not shrinking, at or below --min-depth {min_depth}"),
        ),
        (None, Some(net)) => Drain::Stalled(format!("not shrinking (net {net:+.1}/s)")),
        (None, None) => Drain::Unknown("no rates from the broker yet".to_owned()),
    }
}

/// A drain-time check on [`drain`] against the thresholds. A stalled queue never drains, which
/// alerts under any upper bound; its perfdata value is `U` (the guidelines' "cannot be
/// determined").
pub fn check_drain(
    name: &str,
    observed: &scale::Observed,
    min_depth: u64,
    warning: Option<&Range>,
    critical: Option<&Range>,
) -> (Status, String) {
    let (value, text, perf) = match drain(observed, min_depth) {
        Drain::Seconds(s, how) => (s, how, format!("{s:.0}s")),
        Drain::Stalled(why) => (f64::INFINITY, format!("not draining ({why})"), "U".into()),
        Drain::Unknown(why) => return (Status::Unknown, format!("QUEUE UNKNOWN - {name}: {why}")),
    };
    let status = if critical.is_some_and(|c| c.alerts(value)) {
        Status::Critical
    } else if warning.is_some_and(|w| w.alerts(value)) {
        Status::Warning
    } else {
        Status::Ok
    };
    let range = |r: Option<&Range>| r.map(ToString::to_string).unwrap_or_default();
    let line = format!(
        "QUEUE {} - {name} {text} depth={} consumers={} | drain_seconds={perf};{};{};0; depth={};;;0; consumers={};;;0;",
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
            members: None,
        }
    }

    #[test]
    fn rates_are_read_from_the_management_api_queue_object() {
        let queue = serde_json::json!({
            "messages": 12,
            "message_stats": {
                "publish_details": {"rate": 250.5},
                "deliver_get_details": {"rate": 242.0},
                "ack_details": {"rate": 240.0}
            }
        });
        assert_eq!(
            parse_rates(&queue),
            Some(Rates {
                publish: 250.5,
                deliver: 242.0,
                ack: 240.0
            })
        );
        let idle = serde_json::json!({"message_stats": {"publish_details": {"rate": 3.0}}});
        assert_eq!(
            parse_rates(&idle),
            Some(Rates {
                publish: 3.0,
                deliver: 0.0,
                ack: 0.0
            })
        );
        assert_eq!(parse_rates(&serde_json::json!({"messages": 12})), None);
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

    fn sampled(depth: u64, consumers: u32, net: f64) -> scale::Observed {
        scale::Observed {
            depth,
            consumers,
            publish_rate: None,
            drain_rate: None,
            net_rate: Some(net),
        }
    }

    fn rated(depth: u64, consumers: u32, publish: f64, ack: f64) -> scale::Observed {
        scale::Observed {
            depth,
            consumers,
            publish_rate: Some(publish),
            drain_rate: Some(ack),
            net_rate: None,
        }
    }

    fn thresholds() -> (Range, Range) {
        ("300".parse().expect("w"), "900".parse().expect("c"))
    }

    #[test]
    fn drain_check_with_rates_is_the_wait_at_the_ack_rate_so_a_busy_steady_queue_is_ok() {
        let (w, c) = thresholds();
        let check = |o: &scale::Observed| check_drain("a.raw", o, 0, Some(&w), Some(&c));
        let (status, line) = check(&rated(15_000, 4, 240.0, 250.0));
        assert_eq!(status, Status::Ok);
        assert_eq!(
            line,
            "QUEUE OK - a.raw worked off in 60 s at 250.0/s acked, 240.0/s arriving depth=15000 consumers=4 | drain_seconds=60s;300;900;0; depth=15000;;;0; consumers=4;;;0;"
        );
        // arrivals equal to acks with a few messages waiting: healthy, not stalled
        assert_eq!(check(&rated(3, 2, 1000.0, 1000.0)).0, Status::Ok);
        // growing faster than it is worked off still has a finite wait; a long one alerts
        assert_eq!(check(&rated(150_000, 2, 900.0, 250.0)).0, Status::Warning);
        assert_eq!(check(&rated(250_000, 2, 900.0, 250.0)).0, Status::Critical);
        let (status, line) = check(&rated(10, 2, 5.0, 0.0));
        assert_eq!(status, Status::Critical);
        assert!(
            line.contains("not draining (nothing acked)") && line.contains("drain_seconds=U;"),
            "{line}"
        );
    }

    #[test]
    fn drain_check_from_samples_is_the_time_to_empty_with_a_floor_for_steady_queues() {
        let (w, c) = thresholds();
        let check = |o: &scale::Observed, floor| check_drain("a.raw", o, floor, Some(&w), Some(&c));
        let (status, line) = check(&sampled(6000, 2, -100.0), 0);
        assert_eq!(status, Status::Ok);
        assert_eq!(
            line,
            "QUEUE OK - a.raw empty in 60 s (net -100.0/s) depth=6000 consumers=2 | drain_seconds=60s;300;900;0; depth=6000;;;0; consumers=2;;;0;"
        );
        assert_eq!(check(&sampled(6000, 2, -10.0), 0).0, Status::Warning);
        assert_eq!(check(&sampled(6000, 2, -5.0), 0).0, Status::Critical);
        // not shrinking with consumers: stalled above the floor, fine at or below it
        let (status, line) = check(&sampled(500, 2, 0.4), 100);
        assert_eq!(status, Status::Critical, "{line}");
        assert!(
            line.contains("not draining (not shrinking (net +0.4/s))"),
            "{line}"
        );
        assert_eq!(check(&sampled(100, 2, 0.4), 100).0, Status::Ok);
    }

    #[test]
    fn drain_check_edges_empty_no_consumers_no_figures_and_rounding() {
        let (w, c) = thresholds();
        let check = |o: &scale::Observed| check_drain("a.raw", o, 1000, Some(&w), Some(&c));
        let (status, line) = check(&sampled(0, 0, 5.0));
        assert_eq!(status, Status::Ok, "{line}");
        assert!(line.contains("drain_seconds=0s;"), "{line}");
        // no consumers is stalled whatever the floor
        let (status, line) = check(&sampled(3, 0, 0.0));
        assert_eq!(status, Status::Critical, "{line}");
        assert!(line.contains("not draining (no consumers)"), "{line}");
        let unknown = scale::Observed {
            depth: 5,
            consumers: 1,
            publish_rate: None,
            drain_rate: None,
            net_rate: None,
        };
        let (status, line) = check(&unknown);
        assert_eq!(status, Status::Unknown);
        assert!(line.starts_with("QUEUE UNKNOWN - a.raw: "), "{line}");
        // decided on the value it prints: 300.4 s is 300, within `300`
        let (status, line) = check(&rated(3004, 1, 0.0, 10.0));
        assert_eq!(status, Status::Ok, "{line}");
        assert!(line.contains("drain_seconds=300s;"), "{line}");
    }

    #[test]
    fn queue_list_covers_every_sink() {
        let t = Topology::new("a");
        let q = pipeline_queues(&t, &["mongo".into()], &[Duration::from_secs(1)]);
        assert_eq!(
            q,
            vec![
                "a.raw",
                "a.replay",
                "a.overflow",
                "a.invalid",
                "a.raw.dlq",
                "a.sink.mongo",
                "a.sink.mongo.retry.1000ms",
                "a.sink.mongo.dlq"
            ]
        );
    }
}
