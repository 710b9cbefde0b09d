//! One delivery's CPU work, with no I/O: decode, split, enrich, validate, convert. Every event
//! ends either as a document for the sinks or as an invalid record; none is dropped.

use ingest_pipeline::message::{is_gzip, RefusedEvent, RequestMeta};
use ingest_pipeline::settings::BotPolicy;
use ingest_schema::{Issue, Registry};
use lapin::BasicProperties;
use serde_json::Value;

use crate::decode::{self, DecodeError, Element};
use crate::enrich::{self, privacy::Applied, Enrichment, GeoResult};
use crate::invalid::{scrub_write_key, InvalidRecord};
use crate::sinks::mongo::to_document;
use crate::sinks::Event;

#[derive(Debug)]
pub struct Outcome {
    pub meta: RequestMeta,
    /// Valid, enriched events, each checked to be storable.
    pub valid: Vec<Event>,
    pub invalid: Vec<InvalidRecord>,
}

/// What one payload may cost: bytes after gunzip, events, and the bytes its events may come
/// to once built (batch fields merged into each, the worker's own fields added).
#[derive(Debug, Clone, Copy)]
pub struct PayloadLimits {
    pub max_bytes: usize,
    pub max_events: usize,
    pub max_built_bytes: usize,
}

/// Whether valid events get their MongoDB document here. Made (when MongoDB is a sink), it is
/// also the check that the event is storable, and the sink sends those bytes as they are; a
/// worker without the MongoDB sink skips it (a tenth of its CPU on the benchmark's payloads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Documents {
    Made,
    NotNeeded,
}

/// What enrichment adds to one event, at most: fixed-size fields, what comes from the
/// request, what [`Enrichment::annotate`] adds and what privacy rules may lengthen it by. It
/// stays within `built::WORKER_FIELDS_BYTES`, the collector's allowance for it.
fn enrichment_bytes(meta: &RequestMeta) -> usize {
    const FIXED: usize = 400;
    FIXED
        + enrich::ANNOTATION_BYTES
        + 2 * enrich::privacy::MAX_GROWTH_BYTES
        + meta.source.len()
        + meta.request_id.len()
        + meta.client_ip.as_ref().map_or(0, String::len)
        + meta.user_agent.as_ref().map_or(0, String::len)
}

/// Processes one payload. A panic in this pure code (a bug, or input that finds one) would
/// otherwise recur on every redelivery; it is caught, and the payload kept whole as invalid
/// with reason `internal`.
pub fn process(
    registry: &Registry,
    properties: &BasicProperties,
    body: &[u8],
    limits: PayloadLimits,
    documents: Documents,
    enrichment: &Enrichment,
) -> Outcome {
    let run = std::panic::AssertUnwindSafe(|| {
        let meta = RequestMeta::from_properties(properties, body);
        process_payload(
            registry, properties, body, limits, documents, enrichment, meta,
        )
    });
    match std::panic::catch_unwind(run) {
        Ok(outcome) => outcome,
        Err(panic) => {
            // Read again: the panic took the first reading with it (the rare path pays, not
            // every delivery).
            let meta = RequestMeta::from_properties(properties, body);
            // A panic's message can quote what it failed on: for a source with privacy rules,
            // neither it nor the payload is kept.
            let withhold = !enrichment.rules(&meta.source).privacy.is_off();
            let what = match withhold {
                true => {
                    "a panic (its message is not kept: the source has privacy rules)".to_owned()
                }
                false => panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_owned()),
            };
            tracing::error!(request_id = %meta.request_id, panic = %what, "processing a payload panicked; it is kept as invalid");
            metrics::counter!("worker_processing_panics_total").increment(1);
            let mut record = InvalidRecord::undecodable(
                format!("the worker failed on this payload: {what}"),
                body,
                &meta,
            );
            if withhold {
                record.raw_base64 = None;
            }
            record.reason = "internal";
            Outcome {
                meta,
                valid: Vec::new(),
                invalid: vec![record],
            }
        }
    }
}

fn process_payload(
    registry: &Registry,
    properties: &BasicProperties,
    body: &[u8],
    limits: PayloadLimits,
    documents: Documents,
    enrichment: &Enrichment,
    meta: RequestMeta,
) -> Outcome {
    let rules = enrichment.rules(&meta.source);
    // A source with privacy rules keeps no text that the rules could not read.
    let withhold = !rules.privacy.is_off();
    let json = match decode::payload(body, is_gzip(properties), limits.max_bytes) {
        Ok(json) => json,
        Err(error) => return undecodable(meta, &error, body, withhold),
    };
    let per_event = enrichment_bytes(&meta);
    let split =
        decode::split(meta.endpoint, &json, limits.max_built_bytes, per_event).and_then(|split| {
            match split.elements.len() {
                n if n > limits.max_events => Err(DecodeError::Shape(format!(
                    "the payload has {n} events, more than {}",
                    limits.max_events
                ))),
                _ => Ok(split),
            }
        });
    let split = match split {
        Ok(split) => split,
        // The decoded text is kept (not the gzip bytes), so the write key can be scrubbed.
        Err(error) => return undecodable(meta, &error, &json, withhold),
    };
    let mut tally = Tally::default();
    let mut memo = enrich::Memo::default();
    // Ids for events that came without one: from the request's content, so a client's retry
    // of the same request (a new request id) gets the same ids.
    // Hashing a 500 KB payload costs as much as validating it: only when an event needs it.
    let mut seed: Option<String> = None;
    let mut valid_events = Vec::new();
    let mut invalid = Vec::new();
    // Events the collector refused alone (too large) while it accepted the batch: kept, cut.
    let too_large: Vec<RefusedEvent> = RefusedEvent::read(properties.headers().as_ref())
        .into_iter()
        .filter(|r| r.code == RefusedEvent::TOO_LARGE)
        .collect();
    // Their text as sent (the split has merged the batch's context into them and sorted keys).
    let sent = if too_large.is_empty() {
        Vec::new()
    } else {
        raw_elements(&json)
    };
    for (index, element) in split.elements.into_iter().enumerate() {
        if let Some(refused) = too_large.iter().find(|r| r.index == index) {
            let text = match (sent.get(index), element) {
                (Some(raw), _) => raw.get().to_owned(),
                (None, Element::Event(event)) => serde_json::to_string(&event).unwrap_or_default(),
                (None, Element::NotAnObject(value)) => value.to_string(),
            };
            invalid.push(refused_too_large(refused, &text, &meta, withhold));
            continue;
        }
        match element {
            Element::Event(mut event) => {
                if enrich::needs_message_id(&event) && seed.is_none() {
                    seed = Some(decode::content_seed(&meta, &json));
                }
                let seed = seed.as_deref().unwrap_or_default();
                enrich::enrich(&mut event, &meta, seed, index, split.sent_at.as_ref());
                let annotated = enrichment.annotate(&mut event, &mut memo);
                tally.geo(annotated.geo);
                if let Some(bot) = &annotated.bot {
                    let action = match rules.bots {
                        BotPolicy::Flag => "flagged",
                        BotPolicy::Drop => "dropped",
                        BotPolicy::Invalid => "invalid",
                    };
                    tally.bot(&bot.category, action);
                    match rules.bots {
                        BotPolicy::Flag => {}
                        BotPolicy::Drop => continue,
                        BotPolicy::Invalid => {
                            let mut issues = vec![Issue {
                                pointer: "/context/userAgent".into(),
                                message: format!(
                                    "a bot's event ({}, {}): this source's policy keeps bots out (policy.bots = \"invalid\")",
                                    bot.name, bot.category
                                ),
                                schema: "bot".into(),
                            }];
                            tally.applied.add(rules.privacy.apply(
                                &mut event,
                                &mut issues,
                                &mut memo,
                            ));
                            invalid.push(InvalidRecord::new(
                                "bot",
                                issues,
                                Some(event.to_value()),
                                &meta,
                            ));
                            continue;
                        }
                    }
                }
                let mut issues = registry.check(event.node());
                tally
                    .applied
                    .add(rules.privacy.apply(&mut event, &mut issues, &mut memo));
                if issues.is_empty() && !rules.sample.is_empty() {
                    if let Some((name, keep)) = event_name(&event).and_then(|n| rules.sampled(n)) {
                        let id = event.get_str("messageId").unwrap_or_default();
                        if !enrich::sampled_in(id, keep) {
                            tally.sampled(name);
                            continue;
                        }
                    }
                }
                if !issues.is_empty() {
                    invalid.push(InvalidRecord::new(
                        "schema",
                        issues,
                        Some(event.to_value()),
                        &meta,
                    ));
                    continue;
                }
                match documents {
                    Documents::NotNeeded => valid_events.push(Event::from(event)),
                    Documents::Made => match to_document(&event) {
                        Ok(document) => valid_events.push(Event::with_document(event, document)),
                        Err(error) => {
                            invalid.push(storage_error(error, Some(event.to_value()), &meta));
                        }
                    },
                }
            }
            Element::NotAnObject(value) => invalid.push(InvalidRecord::new(
                "schema",
                vec![Issue {
                    pointer: String::new(),
                    message: format!("batch[{index}] is not a JSON object"),
                    schema: "payload".into(),
                }],
                // A source with privacy rules keeps no value the rules could not read (an
                // event sent as a JSON string would be kept whole).
                (!withhold).then_some(value),
                &meta,
            )),
        }
    }
    detach_if_sparse(&mut valid_events);
    tally.record(&meta.source);
    Outcome {
        meta,
        valid: valid_events,
        invalid,
    }
}

/// A track's `event`, a page's or screen's `name`: what sampling rules name.
fn event_name(event: &ingest_schema::Doc) -> Option<&str> {
    match event.get_str("type")? {
        "track" => event.get_str("event"),
        "page" | "screen" => event.get_str("name"),
        _ => None,
    }
}

/// What one delivery's enrichment did, counted once per delivery (not per event).
#[derive(Default)]
struct Tally {
    /// Bot category, action, events.
    bots: Vec<(String, &'static str, u64)>,
    /// Found, missing, no address.
    geo: [u64; 3],
    applied: Applied,
    /// Event name (one a rule names), events left out.
    sampled: Vec<(String, u64)>,
}

impl Tally {
    fn bot(&mut self, category: &str, action: &'static str) {
        match self
            .bots
            .iter_mut()
            .find(|(c, a, _)| c == category && *a == action)
        {
            Some((_, _, n)) => *n += 1,
            None => self.bots.push((category.to_owned(), action, 1)),
        }
    }

    fn geo(&mut self, result: GeoResult) {
        match result {
            GeoResult::Off => {}
            GeoResult::Found => self.geo[0] += 1,
            GeoResult::Missing => self.geo[1] += 1,
            GeoResult::NoAddress => self.geo[2] += 1,
        }
    }

    fn sampled(&mut self, name: &str) {
        match self.sampled.iter_mut().find(|(n, _)| n == name) {
            Some((_, n)) => *n += 1,
            None => self.sampled.push((name.to_owned(), 1)),
        }
    }

    /// Labels are bounded by the configuration: sources are write keys' names, categories
    /// the bot list's, event names those the sampling rules name.
    fn record(&self, source: &str) {
        for (category, action, n) in &self.bots {
            metrics::counter!("worker_bot_events_total", "source" => source.to_owned(), "category" => category.clone(), "action" => *action).increment(*n);
        }
        for (result, n) in ["found", "missing", "no_address"].into_iter().zip(self.geo) {
            if n > 0 {
                metrics::counter!("worker_geo_lookups_total", "result" => result).increment(n);
            }
        }
        let a = &self.applied;
        for (action, n) in [
            ("drop", a.dropped),
            ("hash", a.hashed),
            ("redact", a.redacted),
            ("ip", a.ip),
        ] {
            if n > 0 {
                metrics::counter!("worker_privacy_rules_applied_total", "source" => source.to_owned(), "action" => action).increment(n);
            }
        }
        for (event, n) in &self.sampled {
            metrics::counter!("worker_sampled_events_total", "source" => source.to_owned(), "event" => event.clone()).increment(*n);
        }
    }
}

/// Deliveries of less text than this keep it shared by their events whatever they hold.
const DETACH_FROM: usize = 64 * 1024;

/// Valid events read their strings from their delivery's text, which lives as long as any of
/// them. When they are less than half of it (the rest invalid events, refused ones, or fields
/// a batch carries for nothing), they are copied out of it, so a client cannot make the worker
/// hold a large text for a small event while the sinks take it.
fn detach_if_sparse(events: &mut [Event]) {
    let Some(text) = events.first().map(|e| e.doc().text().len()) else {
        return;
    };
    if text < DETACH_FROM {
        return;
    }
    // Written now rather than when the lanes size the events: the same bytes, once.
    let kept: usize = events.iter().map(|e| e.json().len()).sum();
    if kept.saturating_mul(2) < text {
        for event in events {
            event.detach();
        }
    }
}

/// How much of an event the collector refused as too large is kept in its invalid record.
pub const REFUSED_KEPT_CHARS: usize = 1024;

/// A batch's elements as raw text, if the payload reads as one (an empty list otherwise).
fn raw_elements(json: &[u8]) -> Vec<&serde_json::value::RawValue> {
    #[derive(serde::Deserialize)]
    struct Elements<'a> {
        #[serde(borrow)]
        batch: Vec<&'a serde_json::value::RawValue>,
    }
    serde_json::from_slice::<Elements<'_>>(json)
        .map(|e| e.batch)
        .unwrap_or_default()
}

/// An event the collector refused as too large: the first [`REFUSED_KEPT_CHARS`] characters of
/// its JSON as sent (as a string, its write key scrubbed), its size as sent and a hash of its
/// bytes as sent (a name-based UUID), so that the client's record can be matched without
/// keeping the bulk.
fn refused_too_large(
    refused: &RefusedEvent,
    sent: &str,
    meta: &RequestMeta,
    withhold: bool,
) -> InvalidRecord {
    let hash = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, sent.as_bytes());
    let scrubbed = scrub_write_key(sent.as_bytes());
    let kept: String = match withhold {
        true => String::new(),
        false => String::from_utf8_lossy(&scrubbed)
            .chars()
            .take(REFUSED_KEPT_CHARS)
            .collect(),
    };
    InvalidRecord::new(
        "too_large",
        vec![Issue {
            pointer: String::new(),
            message: format!(
                "batch[{}] was refused by the collector: {} bytes as sent, more than collector.max_event_bytes; kept cut to its first {} characters; hash {hash}",
                refused.index, refused.bytes, REFUSED_KEPT_CHARS
            ),
            schema: "collector".into(),
        }],
        Some(Value::String(kept)),
        meta,
    )
}

/// A payload that cannot be split into events within the limits: kept whole, once.
fn undecodable(meta: RequestMeta, error: &DecodeError, kept: &[u8], withhold: bool) -> Outcome {
    let mut record = InvalidRecord::undecodable(error.to_string(), kept, &meta);
    record.reason = error.reason();
    if withhold {
        record.raw_base64 = None;
        if let Some(issue) = record.errors.first_mut() {
            issue.message.push_str(
                "; the payload is not kept: its source has privacy rules, which cannot be applied to what does not parse",
            );
        }
    }
    Outcome {
        meta,
        valid: Vec::new(),
        invalid: vec![record],
    }
}

/// An event the database cannot or will not store, kept with the reason.
pub fn storage_error(message: String, event: Option<Value>, meta: &RequestMeta) -> InvalidRecord {
    InvalidRecord::new(
        "storage",
        vec![Issue {
            pointer: String::new(),
            message: format!("cannot be stored: {message}"),
            schema: "storage".into(),
        }],
        event,
        meta,
    )
}

#[cfg(test)]
#[path = "process/tests.rs"]
mod tests;

#[cfg(test)]
#[path = "process/same_bytes_tests.rs"]
mod same_bytes_tests;
