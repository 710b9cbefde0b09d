//! Compaction of repeated invalid records, so that one request of 2,000 copies of a bad event
//! costs the invalid queue a few records, not 2,000. Per source and error signature (the reason,
//! and each error's schema, pointer and message with the client's values masked), within a
//! window, the first `keep_whole` records go to the queue whole and the rest are counted in one
//! [`Summary`] per window. Memory is bounded: at most `max_signatures` windows at once and
//! `max_signatures_per_source` of one source; a record past either bound is counted under its
//! source's catch-all window (or, the table full, one shared catch-all).

use std::collections::HashMap;

use chrono::{DateTime, TimeDelta, Utc};
use ingest_pipeline::settings::InvalidSettings;
use ingest_schema::Issue;
use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::enrich::format_time;
use crate::invalid::{string_end, InvalidRecord};

/// Message ids, and request ids, a summary names as examples.
const EXAMPLES: usize = 5;
/// Errors a signature keeps for its summary.
const SIGNATURE_ISSUES: usize = 4;
/// Characters kept of a signature's schema, pointer and message class, and of an example id.
const PART_CHARS: usize = 120;
const ID_CHARS: usize = 64;
/// The source of the shared catch-all, used once the table is full.
pub const ANY_SOURCE: &str = "*";

/// What the invalid queue gets instead of records it does not keep whole: repeats counted
/// (`folded`) or records the queue refused at its byte cap (`overflow`, see `overflow.rs`).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub reason: &'static str,
    pub source: String,
    /// For `folded`: the reason of the records counted (`schema`, `decode`, …; `mixed` in a
    /// catch-all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub folded_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    pub errors: Vec<Issue>,
    /// Events counted here and not kept whole.
    pub count: u64,
    /// For `folded`: records of the window kept whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_ms: Option<u64>,
    #[serde(serialize_with = "millis")]
    pub first_seen: DateTime<Utc>,
    #[serde(serialize_with = "millis")]
    pub last_seen: DateTime<Utc>,
    pub example_message_ids: Vec<String>,
    pub example_request_ids: Vec<String>,
    /// The first example's request, for tools that look records up by request.
    pub request_id: String,
}

fn millis<S: Serializer>(t: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format_time(*t))
}

/// A few ids of the events a summary counts, so that ops can find their clients.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Examples {
    pub message_ids: Vec<String>,
    pub request_ids: Vec<String>,
}

impl Examples {
    pub fn add(&mut self, record: &InvalidRecord) {
        let message_id = record
            .event
            .as_ref()
            .and_then(|e| e.get("messageId"))
            .and_then(Value::as_str);
        if let Some(id) = message_id {
            push_example(&mut self.message_ids, id);
        }
        push_example(&mut self.request_ids, &record.request_id);
    }

    pub fn merge(&mut self, other: &Examples) {
        for id in &other.message_ids {
            push_example(&mut self.message_ids, id);
        }
        for id in &other.request_ids {
            push_example(&mut self.request_ids, id);
        }
    }
}

fn push_example(ids: &mut Vec<String>, id: &str) {
    if ids.len() < EXAMPLES && !id.is_empty() && !ids.iter().any(|known| known == id) {
        ids.push(cut(id, ID_CHARS));
    }
}

fn cut(text: &str, chars: usize) -> String {
    text.chars().take(chars).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Sig {
    Of(u128),
    /// A source's catch-all: signatures past the bounds.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    source: String,
    sig: Sig,
}

#[derive(Debug)]
struct Window {
    started: DateTime<Utc>,
    last_seen: DateTime<Utc>,
    kept: usize,
    folded: u64,
    reason: &'static str,
    signature: String,
    errors: Vec<Issue>,
    examples: Examples,
}

/// What one delivery's admission counted, per window, so that it can be undone when the
/// delivery goes back to its queue (its records would otherwise count twice, and the slots of
/// records kept whole but never published would be spent).
#[derive(Debug, Default)]
pub struct Ticket(HashMap<Key, (DateTime<Utc>, usize, u64)>);

/// One record's signature: its digest and the parts a summary shows.
struct Signature {
    digest: u128,
    parts: Vec<(String, String, String)>,
}

#[derive(Debug)]
pub struct Compactor {
    settings: InvalidSettings,
    windows: HashMap<Key, Window>,
    /// Specific signatures tracked per source.
    per_source: HashMap<String, usize>,
    /// Windows ended by a record of their next window, waiting for [`Compactor::due`].
    closed: Vec<Summary>,
}

impl Compactor {
    pub fn new(settings: &InvalidSettings) -> Self {
        Self {
            settings: settings.clone(),
            windows: HashMap::new(),
            per_source: HashMap::new(),
            closed: Vec::new(),
        }
    }

    fn window(&self) -> TimeDelta {
        TimeDelta::milliseconds(i64::try_from(self.settings.window_ms).unwrap_or(i64::MAX))
    }

    /// Windows tracked now.
    pub fn tracked(&self) -> usize {
        self.windows.len()
    }

    /// Records counted in the open windows, and in ended ones not yet taken by `due`.
    pub fn folded(&self) -> u64 {
        let closed: u64 = self.closed.iter().map(|s| s.count).sum();
        self.windows.values().map(|w| w.folded).sum::<u64>() + closed
    }

    /// The records to keep whole; the others are counted in their window.
    pub fn admit(
        &mut self,
        records: Vec<InvalidRecord>,
        now: DateTime<Utc>,
    ) -> (Vec<InvalidRecord>, Ticket) {
        let mut ticket = Ticket::default();
        if self.settings.window_ms == 0 {
            return (records, ticket);
        }
        let mut whole = Vec::new();
        for record in records {
            let key = self.place(&record, now);
            let Some(window) = self.windows.get_mut(&key) else {
                whole.push(record); // not reached: `place` returns a tracked window
                continue;
            };
            window.last_seen = now;
            let counted = ticket.0.entry(key).or_insert((window.started, 0, 0));
            if window.kept < self.settings.keep_whole {
                window.kept += 1;
                counted.1 += 1;
                whole.push(record);
            } else {
                window.folded += 1;
                counted.2 += 1;
                window.examples.add(&record);
            }
        }
        (whole, ticket)
    }

    /// Gives back what `ticket` counted, in windows still open.
    pub fn undo(&mut self, ticket: Ticket) {
        for (key, (started, kept, folded)) in ticket.0 {
            if let Some(window) = self.windows.get_mut(&key) {
                if window.started == started {
                    window.kept = window.kept.saturating_sub(kept);
                    window.folded = window.folded.saturating_sub(folded);
                }
            }
        }
    }

    /// The summaries of the windows ended by `now` (a window that folded nothing has none);
    /// their memory is freed.
    pub fn due(&mut self, now: DateTime<Utc>) -> Vec<Summary> {
        let window = self.window();
        let ended: Vec<Key> = self
            .windows
            .iter()
            .filter(|(_, w)| now.signed_duration_since(w.started) >= window)
            .map(|(key, _)| key.clone())
            .collect();
        for key in ended {
            self.close(&key);
        }
        std::mem::take(&mut self.closed)
    }

    /// Every window's summary, ended or not (the worker is stopping).
    pub fn drain(&mut self) -> Vec<Summary> {
        let keys: Vec<Key> = self.windows.keys().cloned().collect();
        for key in keys {
            self.close(&key);
        }
        std::mem::take(&mut self.closed)
    }

    fn close(&mut self, key: &Key) {
        let Some(window) = self.windows.remove(key) else {
            return;
        };
        if let Sig::Of(_) = key.sig {
            if let Some(n) = self.per_source.get_mut(&key.source) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_source.remove(&key.source);
                }
            }
        }
        if window.folded > 0 {
            self.closed.push(Summary {
                reason: "folded",
                source: key.source.clone(),
                folded_reason: Some(window.reason),
                signature: Some(window.signature),
                errors: window.errors,
                count: window.folded,
                kept: Some(window.kept),
                window_ms: Some(self.settings.window_ms),
                first_seen: window.started,
                last_seen: window.last_seen,
                request_id: window
                    .examples
                    .request_ids
                    .first()
                    .cloned()
                    .unwrap_or_default(),
                example_message_ids: window.examples.message_ids,
                example_request_ids: window.examples.request_ids,
            });
        }
    }

    /// The window `record` counts in, opened if need be: its own signature's, else its
    /// source's catch-all, else the shared one.
    fn place(&mut self, record: &InvalidRecord, now: DateTime<Utc>) -> Key {
        let signature = signature(record);
        let own = Key {
            source: record.source.clone(),
            sig: Sig::Of(signature.digest),
        };
        self.roll(&own, now);
        if self.windows.contains_key(&own) {
            return own;
        }
        let of_source = self.per_source.get(&record.source).copied().unwrap_or(0);
        if of_source < self.settings.max_signatures_per_source
            && self.windows.len() < self.settings.max_signatures
        {
            let errors = signature
                .parts
                .into_iter()
                .take(SIGNATURE_ISSUES)
                .map(|(schema, pointer, message)| Issue {
                    pointer,
                    message,
                    schema,
                })
                .collect();
            let name = format!("{:032x}", signature.digest);
            self.open(&own, now, record.reason, name[..16].to_owned(), errors);
            *self.per_source.entry(record.source.clone()).or_default() += 1;
            return own;
        }
        let mut other = Key {
            source: record.source.clone(),
            sig: Sig::Other,
        };
        self.roll(&other, now);
        if !self.windows.contains_key(&other) && self.windows.len() >= self.settings.max_signatures
        {
            other.source = ANY_SOURCE.to_owned();
            self.roll(&other, now);
        }
        if !self.windows.contains_key(&other) {
            let errors = vec![Issue {
                pointer: String::new(),
                message: "records whose error signature was past worker.invalid.max_signatures or max_signatures_per_source, counted together".to_owned(),
                schema: "worker".to_owned(),
            }];
            self.open(&other, now, "mixed", "other".to_owned(), errors);
        }
        other
    }

    fn open(
        &mut self,
        key: &Key,
        now: DateTime<Utc>,
        reason: &'static str,
        signature: String,
        errors: Vec<Issue>,
    ) {
        let window = Window {
            started: now,
            last_seen: now,
            kept: 0,
            folded: 0,
            reason,
            signature,
            errors,
            examples: Examples::default(),
        };
        self.windows.insert(key.clone(), window);
    }

    /// Closes `key`'s window if `now` is past its end.
    fn roll(&mut self, key: &Key, now: DateTime<Utc>) {
        let window = self.window();
        if self
            .windows
            .get(key)
            .is_some_and(|w| now.signed_duration_since(w.started) >= window)
        {
            self.close(key);
        }
    }
}

/// The signature of a record: its reason and the set of (schema, pointer, message class) of
/// its errors, where array indexes in pointers and the client's values in messages are masked.
fn signature(record: &InvalidRecord) -> Signature {
    let mut parts: Vec<(String, String, String)> = record
        .errors
        .iter()
        .map(|issue| {
            // A validation message starts with the value it is about (a scalar's JSON).
            let instance = match record.reason {
                "schema" => record
                    .event
                    .as_ref()
                    .and_then(|e| e.pointer(&issue.pointer)),
                _ => None,
            };
            (
                cut(&issue.schema, PART_CHARS),
                pointer_class(&issue.pointer),
                message_class(&issue.message, instance),
            )
        })
        .collect();
    parts.sort_unstable();
    parts.dedup();
    let mut text = record.reason.to_owned();
    for (schema, pointer, message) in &parts {
        text.push('\n');
        for part in [schema, pointer, message] {
            text.push_str(part);
            text.push('\t');
        }
    }
    let digest = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, text.as_bytes()).as_u128();
    Signature { digest, parts }
}

/// A pointer with its array indexes as `-`: `/properties/items/3/price` and `…/7/price` are
/// one signature.
fn pointer_class(pointer: &str) -> String {
    let class: Vec<&str> = pointer
        .split('/')
        .map(|segment| {
            if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
                "-"
            } else {
                segment
            }
        })
        .collect();
    cut(&class.join("/"), PART_CHARS)
}

/// A message with the client's values masked: the value it starts with (when `instance` is a
/// scalar), anything in single quotes (unexpected property names) and every word with a digit
/// (sizes, positions, indexes, hashes). What is left comes from the schemas and the worker.
fn message_class(message: &str, instance: Option<&Value>) -> String {
    let rest = match instance {
        Some(Value::String(_)) if message.starts_with('"') => {
            let end = string_end(message.as_bytes(), 0);
            format!("value{}", message.get(end..).unwrap_or_default())
        }
        Some(Value::Number(_) | Value::Bool(_) | Value::Null) => match message.split_once(' ') {
            Some((_, rest)) => format!("value {rest}"),
            None => "value".to_owned(),
        },
        _ => message.to_owned(),
    };
    let mut masked = String::with_capacity(rest.len());
    let mut quoted = rest.split('\'');
    if let Some(first) = quoted.next() {
        masked.push_str(first);
    }
    let pieces: Vec<&str> = quoted.collect();
    for (i, piece) in pieces.iter().enumerate() {
        // Odd pieces are inside quotes, unless the last quote has no partner.
        let inside = i % 2 == 0 && i + 1 < pieces.len();
        masked.push('\'');
        masked.push_str(if inside { "…" } else { piece });
    }
    let words: Vec<&str> = masked
        .split_whitespace()
        .map(|w| match w.bytes().any(|b| b.is_ascii_digit()) {
            true => "#",
            false => w,
        })
        .collect();
    cut(&words.join(" "), PART_CHARS)
}

#[cfg(test)]
#[path = "compact/tests.rs"]
mod tests;
