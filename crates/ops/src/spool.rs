//! `ingestctl check --spool`: a Nagios check on a collector's spool, from its `/metrics`. A spool
//! that holds requests means the broker has not been taking them: the age of the oldest says for
//! how long, the fill how close the collector is to answering 503.

use std::time::Duration;

use crate::{Range, Status};

/// Age thresholds in seconds when none are given: a broker away for a minute is worth a look,
/// for ten a page.
pub const DEFAULT_AGE_WARNING: f64 = 60.0;
pub const DEFAULT_AGE_CRITICAL: f64 = 600.0;

/// The spool's gauges, as a collector exposes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub bytes: f64,
    pub max_bytes: f64,
    pub records: f64,
    pub oldest_age_seconds: f64,
}

impl Reading {
    /// From a collector's `/metrics` text; `None` when it has no spool (not enabled).
    pub fn parse(text: &str) -> Option<Self> {
        let value = |name: &str| crate::exposed_value(text, name);
        Some(Self {
            max_bytes: value("collector_spool_max_bytes")?,
            bytes: value("collector_spool_bytes").unwrap_or(0.0),
            records: value("collector_spool_records").unwrap_or(0.0),
            oldest_age_seconds: value("collector_spool_oldest_age_seconds").unwrap_or(0.0),
        })
    }

    /// Percent of `max_bytes` in use.
    pub fn fill_percent(&self) -> f64 {
        if self.max_bytes > 0.0 {
            100.0 * self.bytes / self.max_bytes
        } else {
            0.0
        }
    }
}

/// Thresholds: on the oldest request's age in seconds (a Nagios range), and on the fill in
/// percent (at or above).
pub struct Thresholds<'a> {
    pub age_warning: Option<&'a Range>,
    pub age_critical: Option<&'a Range>,
    pub fill_warning: f64,
    pub fill_critical: f64,
}

/// The status and the plugin's one line for `reading` of the collector at `url`.
pub fn check(url: &str, reading: &Reading, t: &Thresholds<'_>) -> (Status, String) {
    let age = reading.oldest_age_seconds;
    let fill = reading.fill_percent();
    let age_alerts = |range: Option<&Range>, default: f64| match range {
        Some(range) => range.alerts(age),
        None => age > default,
    };
    let status = if age_alerts(t.age_critical, DEFAULT_AGE_CRITICAL) || fill >= t.fill_critical {
        Status::Critical
    } else if age_alerts(t.age_warning, DEFAULT_AGE_WARNING) || fill >= t.fill_warning {
        Status::Warning
    } else {
        Status::Ok
    };
    let range = |r: Option<&Range>, default: f64| {
        r.map(ToString::to_string)
            .unwrap_or_else(|| format!("{default}"))
    };
    let line = format!(
        "SPOOL {} - {url}: {:.0} requests waiting, the oldest {age:.0} s old, {fill:.1}% of {:.0} bytes | oldest_age_seconds={age:.0}s;{};{};0; bytes={:.0}B;;;0;{:.0} records={:.0};;;0; fill={fill:.1}%;{};{};0;100",
        status.label(),
        reading.records,
        reading.max_bytes,
        range(t.age_warning, DEFAULT_AGE_WARNING),
        range(t.age_critical, DEFAULT_AGE_CRITICAL),
        reading.bytes,
        reading.max_bytes,
        reading.records,
        t.fill_warning,
        t.fill_critical,
    );
    (status, line)
}

/// Fetches the collector's `/metrics` and checks its spool.
pub async fn check_collector(url: &str, t: &Thresholds<'_>) -> (Status, String) {
    let base = url.trim_end_matches('/');
    let fetched = async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let response = client
            .get(format!("{base}/metrics"))
            .send()
            .await?
            .error_for_status()?;
        response.text().await
    }
    .await;
    match fetched {
        Ok(text) => match Reading::parse(&text) {
            Some(reading) => check(base, &reading, t),
            None => (
                Status::Unknown,
                format!(
                    "SPOOL UNKNOWN - {base}: no spool metrics (is collector.spool.enabled on?)"
                ),
            ),
        },
        Err(error) => (
            Status::Unknown,
            format!("SPOOL UNKNOWN - {base}: cannot read /metrics: {error}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# HELP collector_spool_bytes Bytes the spool holds on disk.
# TYPE collector_spool_bytes gauge
collector_spool_bytes 536870912
collector_spool_max_bytes 1073741824
collector_spool_records 5000
collector_spool_oldest_age_seconds 95.5
collector_spool_records_total{x=\"1\"} 7
";

    fn thresholds() -> Thresholds<'static> {
        Thresholds {
            age_warning: None,
            age_critical: None,
            fill_warning: 50.0,
            fill_critical: 90.0,
        }
    }

    #[test]
    fn the_gauges_are_read_from_the_exposition_and_a_collector_without_a_spool_is_none() {
        let reading = Reading::parse(METRICS).expect("a spool");
        assert_eq!(reading.records, 5000.0);
        assert_eq!(reading.oldest_age_seconds, 95.5);
        assert_eq!(reading.fill_percent(), 50.0);
        assert_eq!(Reading::parse("collector_in_flight_requests 3\n"), None);
    }

    #[test]
    fn age_and_fill_each_raise_the_status_and_critical_wins() {
        let empty = Reading {
            bytes: 0.0,
            max_bytes: 1000.0,
            records: 0.0,
            oldest_age_seconds: 0.0,
        };
        let (status, line) = check("http://c:8080", &empty, &thresholds());
        assert_eq!(status, Status::Ok, "{line}");
        assert!(line.contains("| oldest_age_seconds=0s;60;600;0;"), "{line}");
        let old = Reading {
            oldest_age_seconds: 120.0,
            records: 3.0,
            bytes: 10.0,
            ..empty
        };
        assert_eq!(check("c", &old, &thresholds()).0, Status::Warning);
        let older = Reading {
            oldest_age_seconds: 601.0,
            ..old
        };
        assert_eq!(check("c", &older, &thresholds()).0, Status::Critical);
        let full = Reading {
            bytes: 950.0,
            ..old
        };
        assert_eq!(check("c", &full, &thresholds()).0, Status::Critical);
        let half = Reading {
            bytes: 500.0,
            oldest_age_seconds: 1.0,
            ..old
        };
        assert_eq!(check("c", &half, &thresholds()).0, Status::Warning);
        let warning: Range = "300".parse().expect("range");
        let given = Thresholds {
            age_warning: Some(&warning),
            ..thresholds()
        };
        assert_eq!(check("c", &old, &given).0, Status::Ok, "-w 300 and 120 s");
    }
}
