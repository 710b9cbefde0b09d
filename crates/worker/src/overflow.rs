//! What the invalid queue refused at its byte cap, counted per source until a summary of it is
//! in the queue. A refused record (or summary) is never retried for ever and never holds its
//! raw delivery: its events are counted here, the delivery is acked, and one `overflow`
//! [`Summary`] per source is published once the queue takes publishes again. Until then the
//! count is `worker_invalid_overflow_pending`, which `ingestctl check --invalid` pages on.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use ingest_schema::Issue;

use crate::compact::{Examples, Summary, ANY_SOURCE};
use crate::invalid::InvalidRecord;

/// Sources counted apart; past it, under [`ANY_SOURCE`].
const MAX_SOURCES: usize = 1_000;

const WHY: &str = "the invalid queue was at its byte cap (broker.invalid_max_length_bytes): \
                   these invalid events were counted, not kept";

#[derive(Debug, Clone)]
struct Tally {
    count: u64,
    first_seen: DateTime<Utc>,
    last_seen: DateTime<Utc>,
    examples: Examples,
}

#[derive(Debug, Default)]
pub struct Overflow {
    by_source: BTreeMap<String, Tally>,
    /// Counts taken into summaries being published.
    in_flight: u64,
}

impl Overflow {
    /// One record the queue refused.
    pub fn add_record(&mut self, record: &InvalidRecord, now: DateTime<Utc>) {
        let tally = self.tally(&record.source, now);
        tally.count += 1;
        tally.examples.add(record);
    }

    /// A `folded` summary the queue refused: the events it counted are now counted here.
    pub fn add_summary(&mut self, summary: &Summary) {
        let tally = self.tally(&summary.source, summary.first_seen);
        tally.count += summary.count;
        tally.first_seen = tally.first_seen.min(summary.first_seen);
        tally.last_seen = tally.last_seen.max(summary.last_seen);
        tally.examples.merge(&Examples {
            message_ids: summary.example_message_ids.clone(),
            request_ids: summary.example_request_ids.clone(),
        });
    }

    fn tally(&mut self, source: &str, now: DateTime<Utc>) -> &mut Tally {
        let source = match self.by_source.contains_key(source) || self.by_source.len() < MAX_SOURCES
        {
            true => source,
            false => ANY_SOURCE,
        };
        let tally = self
            .by_source
            .entry(source.to_owned())
            .or_insert_with(|| Tally {
                count: 0,
                first_seen: now,
                last_seen: now,
                examples: Examples::default(),
            });
        tally.last_seen = tally.last_seen.max(now);
        tally
    }

    /// Events refused and not yet in a summary the queue took.
    pub fn pending(&self) -> u64 {
        self.by_source.values().map(|t| t.count).sum::<u64>() + self.in_flight
    }

    /// One summary per source, to publish; each is [`Overflow::sent`] or [`Overflow::restore`]d.
    pub fn take(&mut self) -> Vec<Summary> {
        let taken = std::mem::take(&mut self.by_source);
        taken
            .into_iter()
            .map(|(source, tally)| {
                self.in_flight += tally.count;
                Summary {
                    reason: "overflow",
                    source,
                    folded_reason: None,
                    signature: None,
                    errors: vec![Issue {
                        pointer: String::new(),
                        message: WHY.to_owned(),
                        schema: "worker".to_owned(),
                    }],
                    count: tally.count,
                    kept: None,
                    window_ms: None,
                    first_seen: tally.first_seen,
                    last_seen: tally.last_seen,
                    request_id: tally
                        .examples
                        .request_ids
                        .first()
                        .cloned()
                        .unwrap_or_default(),
                    example_message_ids: tally.examples.message_ids,
                    example_request_ids: tally.examples.request_ids,
                }
            })
            .collect()
    }

    /// The queue took `summary`.
    pub fn sent(&mut self, summary: &Summary) {
        self.in_flight = self.in_flight.saturating_sub(summary.count);
    }

    /// The queue did not take `summary`: counted again, to be tried later.
    pub fn restore(&mut self, summary: &Summary) {
        self.in_flight = self.in_flight.saturating_sub(summary.count);
        self.add_summary(summary);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ingest_pipeline::message::{Endpoint, RequestMeta};
    use serde_json::json;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).expect("time")
    }

    fn record(source: &str, request: &str, id: &str) -> InvalidRecord {
        let meta = RequestMeta {
            request_id: request.into(),
            received_at: at(0),
            source: source.into(),
            endpoint: Endpoint::Batch,
            client_ip: None,
            user_agent: None,
        };
        InvalidRecord::new("schema", Vec::new(), Some(json!({"messageId": id})), &meta)
    }

    #[test]
    fn refusals_are_counted_per_source_until_a_summary_of_them_is_taken() {
        let mut overflow = Overflow::default();
        for i in 0..7 {
            overflow.add_record(&record("ios", "r1", &format!("m{i}")), at(i));
        }
        overflow.add_record(&record("web", "r2", "w0"), at(3));
        assert_eq!(overflow.pending(), 8);
        let summaries = overflow.take();
        assert_eq!(summaries.len(), 2);
        assert_eq!(overflow.pending(), 8, "in flight still counts");
        let ios = &summaries[0];
        assert_eq!(
            (ios.reason, ios.source.as_str(), ios.count),
            ("overflow", "ios", 7)
        );
        assert_eq!((ios.first_seen, ios.last_seen), (at(0), at(6)));
        assert_eq!(ios.example_message_ids.len(), 5);
        assert_eq!(ios.request_id, "r1");
        // The queue took one and refused the other: only the refused is still pending.
        overflow.sent(&summaries[0]);
        overflow.restore(&summaries[1]);
        assert_eq!(overflow.pending(), 1);
        // Refused again later, the counts add up in one summary.
        overflow.add_record(&record("web", "r3", "w1"), at(9));
        let again = overflow.take();
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].count, again[0].first_seen), (2, at(3)));
        overflow.sent(&again[0]);
        assert_eq!(overflow.pending(), 0);
    }

    #[test]
    fn a_refused_folded_summary_joins_the_count_and_sources_are_bounded() {
        let mut overflow = Overflow::default();
        let folded = Summary {
            reason: "folded",
            source: "ios".into(),
            folded_reason: Some("schema"),
            signature: Some("0123456789abcdef".into()),
            errors: Vec::new(),
            count: 1990,
            kept: Some(10),
            window_ms: Some(60_000),
            first_seen: at(0),
            last_seen: at(30),
            example_message_ids: vec!["m1".into()],
            example_request_ids: vec!["r1".into()],
            request_id: "r1".into(),
        };
        overflow.add_summary(&folded);
        assert_eq!(overflow.pending(), 1990);
        for i in 0..MAX_SOURCES + 5 {
            overflow.add_record(&record(&format!("s{i}"), "r", "m"), at(1));
        }
        let summaries = overflow.take();
        assert_eq!(summaries.len(), MAX_SOURCES + 1);
        let rest = summaries
            .iter()
            .find(|s| s.source == ANY_SOURCE)
            .expect("the rest");
        assert_eq!(rest.count, 6);
    }
}
