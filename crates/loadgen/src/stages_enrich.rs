//! What enrichment costs the worker per event, step by step (issue #25): the user agent read
//! (from the cache, as SDK traffic mostly is, and parsed anew), the address located, the
//! privacy rules, and `process()` end to end without and with all of it, on the benchmark's own
//! payloads. One thread, no I/O, fastest of `rounds` rounds, as the other stages.
//!
//! The requests come from client addresses inside the database's networks (so each lookup
//! finds its record, the dearer case) and carry one of [`AGENTS`], as apps and browsers do.

use std::net::IpAddr;
use std::path::Path;

use ingest_pipeline::message::headers;
use ingest_pipeline::settings::{
    EnrichSettings, FieldAction, FieldRule, IpPolicy, PolicySettings, SourcePolicy,
};
use ingest_pipeline::Secret;
use ingest_schema::{Doc, Registry, UnknownEventPolicy};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use worker::enrich::agent::AgentParser;
use worker::enrich::geo::GeoReader;
use worker::enrich::privacy::Privacy;
use worker::enrich::Enrichment;
use worker::process::{process, Documents, PayloadLimits};

use crate::amqp::collector_properties;
use crate::payload::Generator;
use crate::stages::{over, time, Report, Stage};

const LIMITS: PayloadLimits = PayloadLimits {
    max_bytes: 1 << 20,
    max_events: 2000,
    max_built_bytes: 16 << 20,
};

/// User agents the requests carry, one each in turn.
pub const AGENTS: &[&str] = &[
    "Shop/4.12.0 (iPhone; iOS 17.4.1) analytics-swift/1.5.11",
    "Dalvik/2.1.0 (Linux; U; Android 14; Pixel 8 Build/UQ1A.240105.004)",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_1) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.81 Mobile Safari/537.36",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.6099.109 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
];

/// Every step on: the user agent, bots (flagged), geolocation, the IP truncated, a device id
/// hashed and the carrier dropped.
pub fn settings(geo: &Path) -> (EnrichSettings, PolicySettings) {
    let enrich = EnrichSettings {
        user_agent: true,
        geo_database: Some(geo.to_path_buf()),
        bots: Vec::new(),
        hash_secret: Secret::new("benchmark-hash-secret"),
    };
    let mut policy = SourcePolicy::keep_all();
    policy.ip = IpPolicy::Truncate;
    policy.fields = vec![
        FieldRule {
            path: "context.device.id".into(),
            action: FieldAction::Hash,
        },
        FieldRule {
            path: "context.network.carrier".into(),
            action: FieldAction::Drop,
        },
    ];
    let policy = PolicySettings {
        default: policy,
        sources: Default::default(),
    };
    (enrich, policy)
}

fn with_header(properties: BasicProperties, key: &str, value: &str) -> BasicProperties {
    let mut table: FieldTable = properties.headers().clone().unwrap_or_default();
    table.insert(
        key.into(),
        AMQPValue::LongString(value.as_bytes().to_vec().into()),
    );
    properties.with_headers(table)
}

pub fn run(
    schemas: &Path,
    mut generator: Generator,
    requests: usize,
    rounds: usize,
    geo: &Path,
    addresses: &[IpAddr],
) -> anyhow::Result<Report> {
    anyhow::ensure!(!addresses.is_empty(), "no client addresses given");
    let registry = Registry::load(schemas, UnknownEventPolicy::Reject)?;
    let inputs: Vec<(BasicProperties, Vec<u8>)> = (0..requests)
        .map(|i| {
            let payload = generator.next_payload();
            let properties = collector_properties("shop-ios", payload.gzip);
            let properties = with_header(properties, headers::USER_AGENT, AGENTS[i % AGENTS.len()]);
            let ip = addresses[i % addresses.len()].to_string();
            let properties = with_header(properties, headers::CLIENT_IP, &ip);
            (properties, payload.body.to_vec())
        })
        .collect();
    let (enrich, policy) = settings(geo);
    let on = Enrichment::from_settings(&enrich, &policy)?;
    let off = Enrichment::off();
    let whole = |enrichment: &Enrichment| {
        inputs
            .iter()
            .map(|(properties, body)| {
                process(
                    &registry,
                    properties,
                    body,
                    LIMITS,
                    Documents::NotNeeded,
                    enrichment,
                )
                .valid
                .len()
            })
            .sum::<usize>()
    };
    let events = whole(&off);
    anyhow::ensure!(whole(&on) == events, "enrichment changed the events kept");
    // Each event as enrichment finds it, with its request's user agent and address: one
    // process() of each request, before any clock.
    let mut per_event: Vec<(String, IpAddr)> = Vec::new();
    let mut docs: Vec<Doc> = Vec::new();
    for (properties, body) in &inputs {
        let outcome = process(
            &registry,
            properties,
            body,
            LIMITS,
            Documents::NotNeeded,
            &off,
        );
        let agent = outcome.meta.user_agent.clone().unwrap_or_default();
        let ip = outcome
            .meta
            .client_ip
            .as_deref()
            .and_then(|ip| ip.parse().ok())
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        for event in &outcome.valid {
            per_event.push((agent.clone(), ip));
            docs.push(event.doc().clone());
        }
    }

    let mut stages = Vec::new();
    let mut stage = |name: &'static str, us: f64| stages.push(Stage::new(name, us));
    stage(
        "whole process() without enrichment (MongoDB not a sink)",
        over(rounds, events, || whole(&off)),
    );
    let cached = AgentParser::new(&[]);
    stage(
        "user agent read (from the cache)",
        over(rounds, events, || {
            per_event
                .iter()
                .filter(|(agent, _)| cached.read(agent).bot.is_some())
                .count()
        }),
    );
    stage(
        "user agent parsed (no cache: a new user agent each time)",
        over(rounds, events, || {
            per_event
                .iter()
                .filter(|(agent, _)| cached.parse_uncached(agent).bot.is_some())
                .count()
        }),
    );
    let reader = GeoReader::open(geo)?;
    stage(
        "geolocation (found in the database)",
        over(rounds, events, || {
            per_event
                .iter()
                .filter(|(_, ip)| reader.locate(*ip).is_some())
                .count()
        }),
    );
    let privacy = Privacy::new(&policy.default, enrich.hash_secret.expose());
    stage(
        "privacy rules (IP truncated, one hash, one drop)",
        time(
            rounds,
            events,
            || docs.clone(),
            |mut docs| {
                // One memo for the lot: each request's events would share one.
                let mut memo = worker::enrich::Memo::default();
                let hashed = docs
                    .iter_mut()
                    .map(|doc| privacy.apply(doc, &mut [], &mut memo).hashed)
                    .sum::<u64>();
                // Freed after the clock stops, as the other stages' inputs are.
                (hashed, docs)
            },
        ),
    );
    stage(
        "whole process() with all enrichment on",
        over(rounds, events, || whole(&on)),
    );
    Ok(Report {
        requests,
        events,
        rounds,
        stages,
    })
}
