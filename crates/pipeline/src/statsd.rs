//! The same metrics, mirrored to statsd (optional, `metrics.statsd_address`): a second recorder
//! beside Prometheus's that keeps the values in a registry, and a thread that sends them every
//! `metrics.statsd_interval_ms` (counters and histograms: what is new; gauges: every time).
//!
//! Plain statsd has no labels, so they are folded into the name:
//! `http_requests_total{route="/v1/batch",status="200"}` from the collector becomes
//! `ingest.collector.http_requests_total.route__v1_batch.status_200`. Counters go as the
//! increase since the last send (`|c`), gauges as their value (`|g`; a negative one after a
//! `0`, since a signed value is an adjustment in statsd), histograms as timers (`|ms`):
//! `_seconds` ones in milliseconds, others as they are. A histogram that recorded more than
//! [`MAX_SAMPLES`] values in an interval sends an even spread of that many with their sample
//! rate (`|@0.1`), so statsd still counts them all. Datagrams never exceed [`MTU`]. The address
//! is looked up by the sending thread, again every [`RESOLVE_EVERY`] sends and after a failed
//! lookup, preferring IPv4 (where statsd daemons listen by default).

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};

/// Bytes per datagram: fits an Ethernet MTU with IP and UDP headers.
pub const MTU: usize = 1432;
/// The largest payload a UDP datagram can carry over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;
/// Values a histogram sends per interval at most.
pub const MAX_SAMPLES: usize = 100;
/// Sends between two lookups of the statsd address (a daemon's address can change).
pub const RESOLVE_EVERY: u32 = 60;

/// The recorder: values live in its registry until the sender reads them.
#[derive(Clone)]
pub struct Mirror {
    registry: Arc<Registry<Key, AtomicStorage>>,
    prefix: String,
}

impl Mirror {
    /// `prefix` starts every name (e.g. `ingest.collector`).
    pub fn new(prefix: &str) -> Self {
        Self {
            registry: Arc::new(Registry::atomic()),
            prefix: sanitize(prefix, true),
        }
    }

    /// Sends to `address` every `every`, from a thread of its own (it must outlive whichever
    /// runtime installed the recorder; a lookup may block). Lookup and send errors are logged
    /// or dropped: statsd is fire-and-forget, and the metrics stay in `/metrics`.
    pub fn start_sending(&self, address: String, every: Duration) -> std::io::Result<()> {
        let mirror = self.clone();
        std::thread::Builder::new()
            .name("statsd-mirror".into())
            .spawn(move || {
                let mut sent = HashMap::new();
                let mut target: Option<(SocketAddr, UdpSocket)> = None;
                let mut sends = 0u32;
                loop {
                    std::thread::sleep(every);
                    let lines = mirror.lines(&mut sent);
                    if target.is_none() || sends >= RESOLVE_EVERY {
                        sends = 0;
                        match resolve(&address) {
                            Ok(found) => target = Some(found),
                            Err(error) if target.is_none() => tracing::warn!(
                                %address,
                                %error,
                                "statsd address not found; this interval's metrics dropped"
                            ),
                            Err(_) => {} // keep the last address that worked
                        }
                    }
                    let Some((to, socket)) = &target else {
                        continue;
                    };
                    sends += 1;
                    for datagram in pack(&lines, MTU) {
                        let _ = socket.send_to(datagram.as_bytes(), to);
                    }
                }
            })?;
        Ok(())
    }

    /// The statsd lines for everything that changed since `sent` (updated).
    pub fn lines(&self, sent: &mut HashMap<Key, u64>) -> Vec<String> {
        let mut lines = Vec::new();
        self.registry.visit_counters(|key, counter| {
            let now = counter.load(Ordering::Relaxed);
            let before = sent.insert(key.clone(), now).unwrap_or(0);
            let increase = now.saturating_sub(before);
            if increase > 0 {
                lines.push(format!("{}:{increase}|c", self.name(key)));
            }
        });
        self.registry.visit_gauges(|key, gauge| {
            let value = f64::from_bits(gauge.load(Ordering::Relaxed));
            if !value.is_finite() {
                return; // statsd has no NaN or infinity
            }
            let value = if value == 0.0 { 0.0 } else { value }; // no "-0"
            let name = self.name(key);
            // A signed gauge value is an adjustment in statsd: a negative one is set by a 0
            // first, in the same datagram (one entry, which packing never splits).
            if value < 0.0 {
                lines.push(format!("{name}:0|g\n{name}:{value}|g"));
            } else {
                lines.push(format!("{name}:{value}|g"));
            }
        });
        self.registry.visit_histograms(|key, histogram| {
            let mut values = Vec::new();
            histogram.clear_with(|chunk| values.extend_from_slice(chunk));
            if values.is_empty() {
                return;
            }
            let name = self.name(key);
            let scale = if key.name().ends_with("_seconds") {
                1000.0
            } else {
                1.0
            };
            let rate = match values.len() {
                n if n > MAX_SAMPLES => {
                    values = (0..MAX_SAMPLES)
                        .map(|i| values[i * n / MAX_SAMPLES])
                        .collect();
                    // `{}` prints every digit and never an exponent (statsd rejects one)
                    format!("|@{}", MAX_SAMPLES as f64 / n as f64)
                }
                _ => String::new(),
            };
            for value in values {
                lines.push(format!("{name}:{:.3}|ms{rate}", value * scale));
            }
        });
        lines
    }

    fn name(&self, key: &Key) -> String {
        let mut name = format!("{}.{}", self.prefix, sanitize(key.name(), false));
        for label in key.labels() {
            name.push('.');
            name.push_str(&sanitize(label.key(), false));
            name.push('_');
            name.push_str(&sanitize(label.value(), false));
        }
        name
    }
}

/// The statsd address, IPv4 first, and a socket of its family to send from.
fn resolve(address: &str) -> std::io::Result<(SocketAddr, UdpSocket)> {
    let found: Vec<SocketAddr> = address.to_socket_addrs()?.collect();
    let target = found
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| found.first())
        .copied()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
    let local = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    Ok((target, UdpSocket::bind(local)?))
}

/// Letters, digits, `_` and `-` stay (and `.` where `dots`); everything else becomes `_`.
fn sanitize(text: &str, dots: bool) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' || (dots && c == '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Joins entries with `\n` into datagrams of at most `mtu` bytes, in order. An entry is never
/// split, so one that is longer than `mtu` goes alone in its own datagram. An entry may hold
/// several lines that must arrive together (a negative gauge's reset and value). Used by the
/// mirror and by the worker's statsd sink.
pub fn pack(lines: &[String], mtu: usize) -> Vec<String> {
    let mut datagrams = Vec::new();
    let mut current = String::new();
    for line in lines.iter().filter(|line| !line.is_empty()) {
        if !current.is_empty() && current.len() + 1 + line.len() > mtu {
            datagrams.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push('\n');
        }
        current.push_str(line);
    }
    if !current.is_empty() {
        datagrams.push(current);
    }
    datagrams
}

impl Recorder for Mirror {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.registry
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.registry
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.registry
            .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_send_their_increase_gauges_their_value_histograms_timers() {
        let mirror = Mirror::new("ingest.collector");
        let mut sent = HashMap::new();
        metrics::with_local_recorder(&mirror, || {
            metrics::counter!("http_requests_total", "route" => "/v1/batch", "status" => "200")
                .increment(3);
            metrics::gauge!("collector_in_flight_requests").set(2.0);
            metrics::histogram!("http_request_duration_seconds", "route" => "/v1/batch")
                .record(0.0125);
            metrics::histogram!("sink_batch_size").record(40.0);
        });
        let mut lines = mirror.lines(&mut sent);
        lines.sort();
        assert_eq!(
            lines,
            vec![
                "ingest.collector.collector_in_flight_requests:2|g",
                "ingest.collector.http_request_duration_seconds.route__v1_batch:12.500|ms",
                "ingest.collector.http_requests_total.route__v1_batch.status_200:3|c",
                "ingest.collector.sink_batch_size:40.000|ms",
            ]
        );
        // Next interval: only what changed; gauges again; a negative gauge is set, not adjusted.
        metrics::with_local_recorder(&mirror, || {
            metrics::counter!("http_requests_total", "route" => "/v1/batch", "status" => "200")
                .increment(2);
            metrics::gauge!("collector_in_flight_requests").set(-1.0);
        });
        assert_eq!(
            mirror.lines(&mut sent),
            vec![
                "ingest.collector.http_requests_total.route__v1_batch.status_200:2|c",
                "ingest.collector.collector_in_flight_requests:0|g\ningest.collector.collector_in_flight_requests:-1|g",
            ]
        );
    }

    #[test]
    fn gauges_statsd_cannot_read_are_not_sent() {
        let mirror = Mirror::new("p");
        metrics::with_local_recorder(&mirror, || {
            metrics::gauge!("a").set(f64::NAN);
            metrics::gauge!("b").set(f64::INFINITY);
            metrics::gauge!("c").set(-0.0);
        });
        assert_eq!(mirror.lines(&mut HashMap::new()), vec!["p.c:0|g"]);
    }

    #[test]
    fn the_address_is_looked_up_ipv4_first() {
        let (to, socket) = resolve("localhost:8125").expect("localhost resolves");
        assert!(to.is_ipv4(), "{to}");
        assert!(socket.local_addr().expect("bound").is_ipv4());
        assert!(resolve("no-such-host.invalid:8125").is_err());
    }

    #[test]
    fn a_busy_histogram_sends_a_spread_with_its_sample_rate() {
        let mirror = Mirror::new("p");
        metrics::with_local_recorder(&mirror, || {
            let h = metrics::histogram!("sink_batch_size");
            for v in 0..1000 {
                h.record(f64::from(v));
            }
        });
        let lines = mirror.lines(&mut HashMap::new());
        assert_eq!(lines.len(), MAX_SAMPLES);
        assert!(lines.iter().all(|l| l.ends_with("|ms|@0.1")), "{lines:?}");
        // distinct values from what was recorded (the bucket hands them back in blocks, not
        // in recording order)
        let mut values: Vec<u32> = lines
            .iter()
            .map(|l| {
                let v = &l["p.sink_batch_size:".len()..l.find(".000|").expect("value")];
                v.parse().expect("number")
            })
            .collect();
        values.sort_unstable();
        values.dedup();
        assert_eq!(values.len(), MAX_SAMPLES);
        assert!(values.iter().all(|v| *v < 1000));
        // and nothing is left for the next interval
        assert!(mirror.lines(&mut HashMap::new()).is_empty());
    }

    #[test]
    fn datagrams_fit_the_mtu_and_never_split_a_line() {
        let lines: Vec<String> = (0..200).map(|i| format!("p.metric_{i}:{i}|c")).collect();
        let datagrams = pack(&lines, MTU);
        assert!(datagrams.len() > 1);
        assert!(datagrams.iter().all(|d| d.len() <= MTU));
        let rejoined: Vec<&str> = datagrams.iter().flat_map(|d| d.split('\n')).collect();
        assert_eq!(
            rejoined,
            lines.iter().map(String::as_str).collect::<Vec<_>>()
        );
        let long = vec!["x".repeat(MTU + 10), "p.a:1|c".to_owned()];
        assert_eq!(pack(&long, MTU).len(), 2);
    }

    #[test]
    fn pack_never_exceeds_mtu_never_splits_and_keeps_order() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..500 {
            let mtu = rng.usize(16..600);
            let lines: Vec<String> = (0..rng.usize(0..60))
                .map(|_| {
                    let len = rng.usize(1..=mtu + mtu / 4);
                    (0..len).map(|_| rng.alphanumeric()).collect()
                })
                .collect();
            let datagrams = pack(&lines, mtu);

            let rejoined: Vec<&str> = datagrams.iter().flat_map(|d| d.split('\n')).collect();
            assert_eq!(rejoined, lines, "mtu {mtu}");
            for (i, datagram) in datagrams.iter().enumerate() {
                assert!(
                    datagram.len() <= mtu || !datagram.contains('\n'),
                    "datagram {i} of {} bytes over mtu {mtu} holds several lines",
                    datagram.len()
                );
                if let Some(next) = datagrams.get(i + 1) {
                    let first = next.split('\n').next().unwrap_or_default();
                    assert!(
                        datagram.len() + 1 + first.len() > mtu,
                        "datagram {i} could hold more"
                    );
                }
            }
        }
    }

    #[test]
    fn pack_sends_an_oversize_line_alone() {
        let lines = [
            "a".repeat(10),
            "b".repeat(100),
            "c".repeat(10),
            "d".repeat(10),
        ]
        .map(String::from);
        let datagrams = pack(&lines, 30);
        assert_eq!(
            datagrams,
            [
                lines[0].clone(),
                lines[1].clone(),
                format!("{}\n{}", lines[2], lines[3])
            ]
        );
        assert!(pack(&[], 30).is_empty());
    }

    #[test]
    fn pack_keeps_a_negative_gauge_pair_in_one_datagram() {
        let pair = "a.g:0|g\na.g:-5|g".to_owned();
        let lines = ["x".repeat(40), pair.clone()].map(String::from);
        let datagrams = pack(&lines, 50);
        assert_eq!(datagrams, [lines[0].clone(), pair]);
    }
}
