//! The worker's CPU per event, stage by stage, on the benchmark's own payloads: the table that
//! says where a worker CPU-second goes (decode, enrich, validate, each sink's encoding).
//!
//! Every stage runs the worker's own code on the same generated requests, one thread, no I/O.
//! Each stage's inputs are made before its clock starts (a stage that consumes its input gets a
//! fresh copy for every round), and each stage is run `rounds` times: the figure is the fastest
//! round, the one least disturbed by whatever else the machine was doing. What a stage makes is
//! freed after its clock stops, except in `whole`, whose outcomes are freed inside it. `whole` is
//! [`worker::process::process`] end to end, as the consumer calls it, to check that the
//! stages add up.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ingest_pipeline::message::{is_gzip, RequestMeta};
use ingest_pipeline::settings::{BodyFormat, StatsdSinkSettings};
use ingest_schema::{Doc, Registry, UnknownEventPolicy};
use lapin::BasicProperties;
use worker::decode::{self, Element};
use worker::delivery::split::json_len;
use worker::enrich::Enrichment;
use worker::process::{process, Documents, PayloadLimits};
use worker::sinks::mongo::to_document;
use worker::sinks::{http, statsd, Event};

use crate::amqp::collector_properties;
use crate::payload::Generator;

const LIMITS: PayloadLimits = PayloadLimits {
    max_bytes: 1 << 20,
    max_events: 2000,
    max_built_bytes: 16 << 20,
};

/// One stage's figure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stage {
    pub stage: &'static str,
    /// Microseconds of one thread per event, fastest round.
    pub us_per_event: f64,
    /// Events per CPU-second this stage alone would allow.
    pub events_per_cpu_s: f64,
}

impl Stage {
    /// A stage's figure from its µs per event.
    pub fn new(stage: &'static str, us_per_event: f64) -> Self {
        Self {
            stage,
            us_per_event,
            events_per_cpu_s: if us_per_event > 0.0 {
                1e6 / us_per_event
            } else {
                0.0
            },
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub requests: usize,
    pub events: usize,
    pub rounds: usize,
    pub stages: Vec<Stage>,
}

/// An event as split from its request: the request's index, the event's index in it, the
/// event, and the batch's `sentAt`.
type Split = (usize, usize, Doc, Option<Doc>);

/// A generated request as the worker receives it.
struct Request {
    properties: BasicProperties,
    body: Vec<u8>,
}

/// Times `run` over `rounds` rounds, each given a fresh input from `prepare` (made before the
/// clock starts); the fastest round, in µs per event.
pub(crate) fn time<I, O>(
    rounds: usize,
    events: usize,
    mut prepare: impl FnMut() -> I,
    mut run: impl FnMut(I) -> O,
) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..rounds.max(1) {
        let input = prepare();
        let started = Instant::now();
        let output = run(input);
        let seconds = started.elapsed().as_secs_f64();
        std::hint::black_box(output);
        best = best.min(seconds);
    }
    best * 1e6 / events.max(1) as f64
}

/// [`time`] for a stage whose input is shared data made before (nothing to prepare per round).
pub(crate) fn over<O>(rounds: usize, events: usize, mut run: impl FnMut() -> O) -> f64 {
    time(rounds, events, || (), |()| run())
}

pub fn run(
    schemas: &Path,
    mut generator: Generator,
    requests: usize,
    rounds: usize,
) -> anyhow::Result<Report> {
    let registry = Registry::load(schemas, UnknownEventPolicy::Reject)?;
    let inputs: Vec<Request> = (0..requests)
        .map(|_| {
            let payload = generator.next_payload();
            Request {
                properties: collector_properties("shop-ios", payload.gzip),
                body: payload.body.to_vec(),
            }
        })
        .collect();
    let metas: Vec<RequestMeta> = inputs
        .iter()
        .map(|r| RequestMeta::from_properties(&r.properties, &r.body))
        .collect();

    // The stages' inputs, made once by the worker's own code.
    let jsons: Vec<Vec<u8>> = inputs
        .iter()
        .map(|r| decode::payload(&r.body, is_gzip(&r.properties), LIMITS.max_bytes))
        .map(|json| json.map(|j| j.into_owned()).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    let split = |json: &[u8], meta: &RequestMeta| {
        decode::split(meta.endpoint, json, LIMITS.max_built_bytes, 512).map_err(anyhow::Error::msg)
    };
    let mut raw_events: Vec<Split> = Vec::new();
    for (request, (json, meta)) in jsons.iter().zip(&metas).enumerate() {
        let split = split(json, meta)?;
        for (index, element) in split.elements.into_iter().enumerate() {
            if let Element::Event(event) = element {
                raw_events.push((request, index, event, split.sent_at.clone()));
            }
        }
    }
    let events = raw_events.len();
    let seeds: Vec<String> = jsons
        .iter()
        .zip(&metas)
        .map(|(json, meta)| decode::content_seed(meta, json))
        .collect();
    let enrich_all = |mut events: Vec<Split>| {
        for (request, index, event, sent_at) in &mut events {
            let seed = seeds[*request].as_str();
            worker::enrich::enrich(event, &metas[*request], seed, *index, sent_at.as_ref());
        }
        events
    };
    let enriched = enrich_all(raw_events.clone());
    let mut validated = Vec::with_capacity(events);
    let mut by_request: Vec<Vec<Arc<Event>>> = vec![Vec::new(); requests];
    for (request, _, event, _) in &enriched {
        let issues = registry.check(event.node());
        if !issues.is_empty() {
            anyhow::bail!("a generated event is invalid: {issues:?}");
        }
        let document = to_document(event).map_err(anyhow::Error::msg)?;
        validated.push(event.clone());
        by_request[*request].push(Arc::new(Event::with_document(event.clone(), document)));
    }
    // The statsd sink as the benchmark configures it: its defaults.
    let settings: StatsdSinkSettings =
        serde_json::from_value(serde_json::json!({"address": "127.0.0.1:8125"}))?;
    let statsd = statsd::Encoder::new(&settings);

    let mut stages = Vec::new();
    let mut stage = |name: &'static str, us: f64| stages.push(Stage::new(name, us));
    let gunzip = over(rounds, events, || {
        inputs
            .iter()
            .map(|r| decode::payload(&r.body, is_gzip(&r.properties), LIMITS.max_bytes))
            .filter_map(Result::ok)
            .map(|json| json.len())
            .sum::<usize>()
    });
    stage("gunzip (the requests sent gzipped)", gunzip);
    let parse = over(rounds, events, || {
        jsons
            .iter()
            .zip(&metas)
            .filter_map(|(json, meta)| split(json, meta).ok())
            .collect::<Vec<_>>()
    });
    stage(
        "parse and split (one Doc per delivery, events as its spans)",
        parse,
    );
    let enrich = time(rounds, events, || raw_events.clone(), enrich_all);
    stage("enrich", enrich);
    // The tracking plan read on each event's Doc, as the worker reads it.
    let validate = over(rounds, events, || {
        enriched
            .iter()
            .map(|(_, _, event, _)| registry.check(event.node()).len())
            .sum::<usize>()
    });
    stage("validate (tracking plan)", validate);
    let bson = over(rounds, events, || {
        validated
            .iter()
            .filter_map(|event| to_document(event).ok())
            .map(|d| d.as_bytes().len())
            .sum::<usize>()
    });
    stage("MongoDB document (BSON)", bson);
    // Each event's JSON is written once and kept (`Event::json`): the lane asks for it to size
    // the batch, the body copies it. Fresh events each round, so the writing is timed.
    let json = time(
        rounds,
        events,
        || {
            by_request
                .iter()
                .map(|events| {
                    events
                        .iter()
                        .map(|e| Arc::new(Event::from(e.doc().clone())))
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        },
        |fresh| {
            let bytes = fresh
                .iter()
                .map(|events| {
                    let sized: usize = events.iter().map(|e| json_len(e)).sum();
                    let body = http::encode(events, BodyFormat::Json).map_or(0, |b| b.len());
                    sized + body
                })
                .sum::<usize>();
            // Freed after the clock stops, as the other stages' inputs are.
            (bytes, fresh)
        },
    );
    stage(
        "HTTP sink body (JSON: sized by the lane, then the body)",
        json,
    );
    let lines = over(rounds, events, || {
        by_request
            .iter()
            .map(|events| statsd.lines(events).len())
            .sum::<usize>()
    });
    stage("statsd lines", lines);
    let whole_for = |documents: Documents| {
        over(rounds, events, || {
            inputs
                .iter()
                .map(|r| {
                    process(
                        &registry,
                        &r.properties,
                        &r.body,
                        LIMITS,
                        documents,
                        &Enrichment::off(),
                    )
                    .valid
                    .len()
                })
                .sum::<usize>()
        })
    };
    stage(
        "whole process() without documents (MongoDB not a sink)",
        whole_for(Documents::NotNeeded),
    );
    let whole = whole_for(Documents::Made);
    stage(
        "whole process() (gunzip to documents, as the consumer calls it)",
        whole,
    );
    Ok(Report {
        requests,
        events,
        rounds,
        stages,
    })
}
