//! The statsd sink: every event becomes a counter, plus a timer or gauge for each configured
//! numeric property, sent over UDP in datagrams packed up to the configured MTU.
//!
//! Names are `<prefix>.<source>.<type>[.<name>]`, each segment cleaned the way the statsd daemon
//! (etsy/statsd `sanitizeKeyName`) would clean it, with dots inside a segment turned into `_` so
//! an event called "v1.2 Launched" stays one level deep. What we send is therefore what the
//! daemon stores, and every line passes the daemon's packet checks (plain decimal values,
//! non-negative timers), since it drops bad lines silently.
//!
//! Only the first `max_event_names` distinct event names get series of their own; events with
//! any other name are counted under `other` (see [`EventNames`]), so a client sending random
//! names cannot grow the daemon's series without bound.
//!
//! An event counted once is not counted again while it is among the last `dedupe_window` (or
//! up to twice as many) events this sink counted ([`recent`]): a redelivered or duplicated
//! event adds nothing.
//!
//! UDP is fire and forget: only a local send error (for example a refusal reported by ICMP for
//! an earlier datagram) fails a delivery, as retryable. The events whose datagrams went out
//! before it stay counted and a retry skips them; an event whose lines were split between a
//! datagram sent and one not sent is counted again in part (metrics tolerate that better than
//! losing it).

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::UdpSocket;

use ingest_pipeline::settings::StatsdSinkSettings;
use ingest_pipeline::statsd::{pack, MAX_DATAGRAM};

use self::recent::{Claim, RecentEvents};
use super::{Batch, Event, Sink, SinkError};

mod recent;

/// The name segment under which events past the cap of distinct names are counted. An event
/// really called "other" shares its series.
const OTHER: &str = "other";

/// JavaScript prints numbers outside this range in exponent notation; we skip them instead.
const PLAIN_MAX: f64 = 1e21;
const PLAIN_MIN: f64 = 1e-6;

/// Every check of the statsd sink's settings: those the settings make themselves, and that each
/// timer and gauge property leaves something of its name once cleaned as statsd cleans it.
pub fn validate(settings: &StatsdSinkSettings) -> Result<(), String> {
    settings.validate()?;
    for (field, properties) in [("timers", &settings.timers), ("gauges", &settings.gauges)] {
        if let Some(bad) = properties.iter().find(|p| clean(p).is_empty()) {
            return Err(format!(
                "{field}: property {bad:?} has no characters usable in a metric name"
            ));
        }
    }
    Ok(())
}

pub struct StatsdSink {
    name: String,
    socket: UdpSocket,
    settings: StatsdSinkSettings,
    lines: LineBuilder,
    recent: RecentEvents,
    /// `worker_statsd_names_folded_total{sink}`: events counted under `other`.
    folded: metrics::Counter,
    /// `worker_statsd_duplicates_skipped_total{sink}`: copies of events counted already.
    duplicates: metrics::Counter,
}

impl StatsdSink {
    /// Validates the settings, resolves the address once and connects a UDP socket to it.
    pub async fn connect(name: &str, settings: StatsdSinkSettings) -> io::Result<Self> {
        let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidInput, message);
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        {
            return Err(invalid(format!(
                "sink name must match [a-z0-9_-]+, got {name:?}"
            )));
        }
        validate(&settings).map_err(invalid)?;
        let target = tokio::net::lookup_host(settings.address.as_str())
            .await?
            .next()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} resolved to no address", settings.address),
                )
            })?;
        let local: SocketAddr = if target.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local).await?;
        socket.connect(target).await?;
        let folded =
            metrics::counter!("worker_statsd_names_folded_total", "sink" => name.to_owned());
        let duplicates =
            metrics::counter!("worker_statsd_duplicates_skipped_total", "sink" => name.to_owned());
        Ok(Self {
            name: name.to_owned(),
            socket,
            lines: LineBuilder::new(&settings),
            recent: RecentEvents::new(settings.dedupe_window),
            folded,
            duplicates,
            settings,
        })
    }
}

#[async_trait::async_trait]
impl Sink for StatsdSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, batch: &Batch) -> Result<(), SinkError> {
        // Dropped with whatever it admitted and was not sent: on an error below, or if this
        // delivery is given up while it sends.
        let mut claim = Claim::new(&self.recent);
        let fresh: Vec<Arc<Event>> = batch
            .events
            .iter()
            .filter(|event| claim.admit(event))
            .cloned()
            .collect();
        self.duplicates
            .increment((batch.events.len() - fresh.len()) as u64);
        let Lines {
            lines,
            folded,
            ends,
        } = self.lines.batch(&fresh, &mut fastrand::Rng::new());
        // Counted before sending, as the `other` lines are: a retry counts again only the
        // events it sends again (those whose datagrams did not go out).
        self.folded.increment(folded);
        let mut covered = 0;
        for datagram in pack(&lines, self.settings.mtu) {
            covered = lines_in(&lines, covered, datagram.len());
            if datagram.len() > MAX_DATAGRAM {
                tracing::warn!(
                    sink = %self.name,
                    bytes = datagram.len(),
                    "statsd metric too long for one datagram, dropped"
                );
            } else {
                self.socket.send(datagram.as_bytes()).await.map_err(|e| {
                    SinkError::Retryable(format!("statsd send to {}: {e}", self.settings.address))
                })?;
            }
            claim.sent(ends.partition_point(|end| *end <= covered));
        }
        claim.sent(fresh.len());
        Ok(())
    }

    async fn flush(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// The names that get series of their own: the first `max_event_names` distinct ones this
/// sink sees, each an event's name with its type (`track`, `screen`, `page`) as cleaned into
/// the metric name. The set only grows, up to the cap, and is never evicted from, so a name
/// keeps its series once it has one; it lives in memory only, so a restart starts it afresh
/// (and each worker process keeps its own: with several, the daemon may see up to that many
/// times the cap). A name is remembered by its 64-bit SipHash under keys drawn at random when
/// the sink is built: a few bytes a name whatever its length, and no client can aim two names
/// at one slot.
#[derive(Debug)]
struct EventNames {
    cap: usize,
    keys: RandomState,
    admitted: Mutex<HashSet<u64>>,
}

impl EventNames {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            keys: RandomState::new(),
            admitted: Mutex::new(HashSet::new()),
        }
    }

    /// Whether `kind`'s `name` has a series of its own: admitted before, or now while there
    /// is room.
    fn admit(&self, kind: &str, name: &str) -> bool {
        let hash = self.keys.hash_one((kind, name));
        let mut admitted = self.admitted.lock().unwrap_or_else(PoisonError::into_inner);
        if admitted.contains(&hash) {
            return true;
        }
        if admitted.len() >= self.cap {
            return false;
        }
        admitted.insert(hash);
        if admitted.len() == self.cap {
            tracing::warn!(
                cap = self.cap,
                "statsd sink: every slot for event names is taken; events with names not seen \
                 yet are counted under `other` until the worker restarts (max_event_names)"
            );
        }
        true
    }
}

/// What a batch becomes: its lines, how many of its events were counted under `other`, and
/// for each event, how many lines there are up to its last (the same as the event before
/// it for an event the sample left out).
#[derive(Debug)]
struct Lines {
    lines: Vec<String>,
    folded: u64,
    ends: Vec<usize>,
}

/// The lines a datagram of `bytes` holds, from line `from` on: [`pack`] joins whole lines,
/// leaving out empty ones, with a newline between two. The first line after them.
fn lines_in(lines: &[String], from: usize, bytes: usize) -> usize {
    let mut at = from;
    let mut len = 0;
    while at < lines.len() && len < bytes {
        if !lines[at].is_empty() {
            len += lines[at].len() + usize::from(len > 0);
        }
        at += 1;
    }
    at
}

/// The sink's line encoding alone, without a socket or the window of recent events: what the
/// benchmark's per-stage table times (`ingest-loadgen stages`).
#[derive(Debug)]
pub struct Encoder(LineBuilder);

impl Encoder {
    pub fn new(settings: &StatsdSinkSettings) -> Self {
        Self(LineBuilder::new(settings))
    }

    /// The lines for `events`, as the sink would send them (before packing into datagrams).
    pub fn lines(&self, events: &[Arc<Event>]) -> Vec<String> {
        self.0.batch(events, &mut fastrand::Rng::with_seed(0)).lines
    }
}

/// The settings turned into what every event needs: property names already cleaned, and the
/// event names admitted so far.
#[derive(Debug)]
struct LineBuilder {
    prefix: String,
    sample_rate: f64,
    rate_suffix: String,
    timers: Vec<(String, String)>,
    gauges: Vec<(String, String)>,
    names: EventNames,
}

impl LineBuilder {
    fn new(settings: &StatsdSinkSettings) -> Self {
        let named = |properties: &[String]| {
            properties
                .iter()
                .map(|p| (p.clone(), segment(p)))
                .collect::<Vec<_>>()
        };
        Self {
            prefix: settings.prefix.clone(),
            sample_rate: settings.sample_rate,
            rate_suffix: if settings.sample_rate < 1.0 {
                format!("|@{}", settings.sample_rate)
            } else {
                String::new()
            },
            timers: named(&settings.timers),
            gauges: named(&settings.gauges),
            names: EventNames::new(settings.max_event_names),
        }
    }

    /// Lines for the events that the sample keeps (the others take no name slot). One the
    /// sample leaves out still counts as counted for the window of recent events: a copy of it
    /// gets no second draw.
    fn batch(&self, events: &[Arc<Event>], rng: &mut fastrand::Rng) -> Lines {
        let mut out = Lines {
            lines: Vec::with_capacity(events.len() * (1 + self.timers.len())),
            folded: 0,
            ends: Vec::with_capacity(events.len()),
        };
        for event in events {
            if self.sample_rate >= 1.0 || rng.f64() < self.sample_rate {
                self.event(event, &mut out);
            }
            out.ends.push(out.lines.len());
        }
        out
    }

    fn event(&self, event: &Event, out: &mut Lines) {
        let kind = segment(text(event, "type"));
        let name = match kind.as_str() {
            "track" => Some(segment(text(event, "event"))),
            "screen" | "page" => Some(segment(text(event, "name"))),
            _ => None,
        };
        let mut base = format!("{}.{}.{kind}", self.prefix, segment(text(event, "source")));
        if let Some(name) = name {
            base.push('.');
            if self.names.admit(&kind, &name) {
                base.push_str(&name);
            } else {
                base.push_str(OTHER);
                out.folded += 1;
            }
        }
        let out = &mut out.lines;
        out.push(format!("{base}:1|c{}", self.rate_suffix));

        let Some(properties) = event.doc().get("properties").filter(|p| p.is_object()) else {
            return;
        };
        for (property, metric) in &self.timers {
            if let Some(value) = properties
                .get(property)
                .and_then(|value| value.as_number().and_then(plain_number))
            {
                if !value.starts_with('-') {
                    out.push(format!("{base}.{metric}:{value}|ms{}", self.rate_suffix));
                }
            }
        }
        for (property, metric) in &self.gauges {
            if let Some(value) = properties
                .get(property)
                .and_then(|value| value.as_number().and_then(plain_number))
            {
                if value.starts_with('-') {
                    out.push(format!("{base}.{metric}:0|g\n{base}.{metric}:{value}|g"));
                } else {
                    out.push(format!("{base}.{metric}:{value}|g"));
                }
            }
        }
    }
}

fn text<'a>(event: &'a Event, key: &str) -> &'a str {
    event.get_str(key).unwrap_or("")
}

/// A JSON number written as statsd's `parseFloat` reads it back: plain decimal, no exponent,
/// no trailing `.0`. `None` for anything else, or for magnitudes JavaScript would print with
/// an exponent.
fn plain_number(number: &serde_json::Number) -> Option<String> {
    if let Some(integer) = number.as_i64() {
        return Some(integer.to_string());
    }
    if let Some(integer) = number.as_u64() {
        return Some(integer.to_string());
    }
    let float = number.as_f64()?;
    if float == 0.0 {
        return Some("0".to_owned());
    }
    let magnitude = float.abs();
    if !float.is_finite() || !(PLAIN_MIN..PLAIN_MAX).contains(&magnitude) {
        return None;
    }
    Some(float.to_string())
}

/// The statsd daemon's `sanitizeKeyName`: whitespace runs become `_`, `/` becomes `-`, and
/// anything outside `[a-zA-Z_\-0-9.]` is removed.
pub fn sanitize_key_name(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut in_whitespace = false;
    for c in key.chars() {
        if is_js_whitespace(c) {
            if !in_whitespace {
                out.push('_');
            }
            in_whitespace = true;
            continue;
        }
        in_whitespace = false;
        match c {
            '/' => out.push('-'),
            c if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') => out.push(c),
            _ => {}
        }
    }
    out
}

/// JavaScript's `\s`, which is not quite Unicode `White_Space` (it adds U+FEFF, drops U+0085).
fn is_js_whitespace(c: char) -> bool {
    const SINGLES: [char; 8] = [
        ' ', '\u{a0}', '\u{1680}', '\u{2028}', '\u{2029}', '\u{202f}', '\u{205f}', '\u{3000}',
    ];
    ('\t'..='\r').contains(&c)
        || ('\u{2000}'..='\u{200a}').contains(&c)
        || c == '\u{feff}'
        || SINGLES.contains(&c)
}

fn clean(raw: &str) -> String {
    sanitize_key_name(&raw.replace('.', "_")).to_ascii_lowercase()
}

/// One level of a metric name: cleaned, lowercased, never empty.
fn segment(raw: &str) -> String {
    let cleaned = clean(raw);
    if cleaned.is_empty() {
        "unknown".to_owned()
    } else {
        cleaned
    }
}

#[cfg(test)]
#[path = "statsd/tests.rs"]
mod tests;
#[cfg(test)]
#[path = "statsd/udp_tests.rs"]
mod udp_tests;
