//! Chaos: a steady open-loop load from the load generator while a collector, a worker, the
//! MongoDB-wire server and a test-owned RabbitMQ node are SIGKILLed and restarted at random
//! moments. Beside the steady load, for the whole run, a hostile client sends a few requests a
//! second: amplifying batches, NUL-byte keys, `$`/`.`/`_id` keys, one messageId from two
//! sources, null optional fields, schema errors, and straight onto the raw queue undecodable
//! bodies and the amplifying poison payload. At the end, judged from the load generator's and
//! the hostile client's own records of what got a 2xx (or a confirm): every such event is in
//! MongoDB exactly once per (source, messageId), or else in the invalid queue with the reason
//! it should have, or in a dead-letter queue; nothing is missing, the raw DLQ holds nothing
//! unexplained and the worker's memory stays bounded. The short form runs in CI;
//! `CHAOS_SECS=600 scripts/test chaos` is the long form. `CHAOS_SEED` replays a run's choice of
//! victims and moments. A second run does it all again with the collector's spool on, and then
//! no request may get a 503.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ingest_e2e::*;
use ingest_loadgen::payload::id_string;
use ingest_loadgen::{open_loop, Generator, HttpTarget, Recorder, Report, Schedule, Shape};
use ingest_pipeline::broker::long_string;
use ingest_pipeline::headers::LAST_ERROR;
use ingest_pipeline::settings::Settings;
use ingest_pipeline::Topology;
use serde_json::{json, Value};

use super::fixtures::{batch, order_completed, product_viewed};

/// Requests per second of the steady load (about 25 events each on average).
const RATE: f64 = 15.0;
/// Requests per second of the hostile client: a modest share of a 2-core machine that also runs
/// the steady load, RabbitMQ, SecantusDB and both services (about one in six carries 500 KB).
const HOSTILE_RATE: f64 = 3.0;
/// Peak resident memory any worker process may reach in the run. The worker bounds what it
/// holds: at most `prefetch` (64) deliveries of at most `max_payload_bytes` (1 MiB) each, and
/// what it builds from one of them by `max_built_bytes` (16 MiB); the 660 MB amplifier must be
/// refused before it is built. The debug build peaked at 67-88 MiB here (30 s and 120 s runs);
/// 512 MiB leaves room for allocator slack and a full prefetch window of large payloads, and is
/// still below the 660 MB one amplifier would cost if it were built.
const MAX_WORKER_RSS_MIB: u64 = 512;
/// Every hostile event that should be stored names this user, to find its documents.
const HOSTILE_USER: &str = "hostile-client";
/// Header naming a payload the hostile client published straight to the raw queue (it keeps it
/// through dead-lettering; the marker is also the payload's AMQP message id, hence its
/// `requestId` in the invalid queue).
const HOSTILE_HEADER: &str = "x-hostile";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    Collector,
    Worker,
    Mongo,
    Broker,
}

const PARTS: [Part; 4] = [Part::Collector, Part::Worker, Part::Mongo, Part::Broker];

/// Everything the chaos can kill, each restartable on the same address and data.
struct Parts {
    settings: Settings,
    broker: RabbitNode,
    mongo: Secantus,
    collector: Process,
    worker: Process,
}

impl Parts {
    fn kill(&mut self, part: Part) {
        match part {
            Part::Collector => self.collector.kill9(),
            Part::Worker => self.worker.kill9(),
            Part::Mongo => self.mongo.kill9(),
            Part::Broker => self.broker.kill9(),
        }
    }

    fn restart(&mut self, part: Part) {
        match part {
            Part::Collector => self.collector = Process::spawn("collector", &self.settings),
            Part::Worker => self.worker = Process::spawn("worker", &self.settings),
            Part::Mongo => self.mongo.resume(),
            Part::Broker => self.broker.resume(),
        }
    }
}

/// What the test sees of the services between faults: the peak memory of every worker process
/// (VmHWM, read while it runs and right before it is killed), and any service process that
/// exited without being killed.
#[derive(Default)]
struct Watch {
    worker_peak_kib: u64,
    samples: u32,
    exited: BTreeSet<String>,
}

impl Watch {
    /// Looks at the services that are up (`down` is the one the chaos has just killed).
    fn look(&mut self, parts: &mut Parts, down: Option<Part>) {
        if down != Some(Part::Worker) {
            match parts.worker.try_memory_kib() {
                Some((_, peak)) => {
                    self.worker_peak_kib = self.worker_peak_kib.max(peak);
                    self.samples += 1;
                }
                None => {
                    self.exited
                        .insert(format!("worker pid {}", parts.worker.pid()));
                }
            }
        }
        if down != Some(Part::Collector) && !parts.collector.is_running() {
            self.exited
                .insert(format!("collector pid {}", parts.collector.pid()));
        }
    }

    /// Sleeps `length`, looking at the services every 250 ms.
    async fn pause(&mut self, parts: &mut Parts, down: Option<Part>, length: Duration) {
        let end = Instant::now() + length;
        loop {
            self.look(parts, down);
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left.min(Duration::from_millis(250))).await;
        }
    }
}

/// Kills a part at a random moment, restarts it after a random outage, and goes on until
/// `until` has passed and every kind of part has been killed at least once.
async fn inject(
    parts: &mut Parts,
    victims: &[Part],
    until: Instant,
    seed: u64,
    watch: &mut Watch,
) -> BTreeMap<Part, u32> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut faults: BTreeMap<Part, u32> = BTreeMap::new();
    let mut round: Vec<Part> = Vec::new();
    let started = Instant::now();
    while Instant::now() < until || faults.len() < victims.len() {
        let wait = Duration::from_millis(rng.u64(500..3000));
        watch.pause(parts, None, wait).await;
        if round.is_empty() {
            round = victims.to_vec();
            rng.shuffle(&mut round);
        }
        let Some(part) = round.pop() else { continue };
        // the worker's peak, right before it goes
        watch.look(parts, None);
        tokio::task::block_in_place(|| parts.kill(part));
        *faults.entry(part).or_insert(0) += 1;
        eprintln!(
            "chaos: {part:?} killed at {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let outage = Duration::from_millis(rng.u64(100..2500));
        watch.pause(parts, Some(part), outage).await;
        tokio::task::block_in_place(|| parts.restart(part));
    }
    faults
}

async fn steady_load(url: &str, secs: f64, seed: u64, recorder: &Recorder) -> Report {
    let target = Arc::new(HttpTarget::new(url, IOS_KEY, Duration::from_secs(10)).unwrap());
    let generator = Generator::new(&Shape {
        templates: 32,
        seed,
        ..Shape::default()
    });
    let schedule = Schedule::constant(RATE, Duration::from_secs_f64(secs));
    open_loop(
        target,
        generator,
        &schedule,
        recorder,
        2_000,
        Duration::from_secs(30),
    )
    .await;
    recorder.report("chaos")
}

/// (source, messageId): what MongoDB holds an event under.
type Key = (String, String);

/// What the hostile client sends, in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// A bad event beside a good one: a NUL byte in a property key.
    NulKey,
    /// Top-level `$set` and `_id` (refused), nested `$`/dotted keys and a top-level dotted key
    /// (stored as sent).
    ReservedKeys,
    /// One messageId from shop-ios and from shop-web, different content: two documents.
    SameIds,
    /// Null optional fields, read as absent.
    NullFields,
    /// A schema error beside a good event.
    SchemaError,
    /// 2,000 tiny events under a 330 KB batch context (660 MB built): 413 from the collector.
    Amplifier,
    /// Straight onto the raw queue: truncated JSON carrying a writeKey.
    BadJson,
    /// Straight onto the raw queue: `Content-Encoding: gzip` on bytes that are not gzip.
    BadGzip,
    /// Straight onto the raw queue: the amplifier (plain or gzipped), which used to loop.
    Poison,
}

const KINDS: [Kind; 9] = [
    Kind::NulKey,
    Kind::ReservedKeys,
    Kind::SameIds,
    Kind::NullFields,
    Kind::Amplifier,
    Kind::SchemaError,
    Kind::BadJson,
    Kind::BadGzip,
    Kind::Poison,
];

impl Kind {
    fn raw(self) -> bool {
        matches!(self, Kind::BadJson | Kind::BadGzip | Kind::Poison)
    }
}

/// What a hostile event should become.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// Stored once, and its document shows it.
    Stored(Check),
    /// Kept in the invalid queue with this reason.
    Invalid(&'static str),
}

#[derive(Debug, Clone, PartialEq)]
enum Check {
    Nothing,
    /// `properties.total`, which tells the two sources' events with one messageId apart.
    Total(f64),
    /// A field sent as null must be absent.
    Absent(&'static str),
}

/// A hostile request through the collector, what it got, and what each event should become.
struct Sent {
    kind: Kind,
    /// The status, or `connect`, `timeout`, `error`.
    outcome: String,
    code: Option<String>,
    events: Vec<(Key, Expect)>,
}

impl Sent {
    fn accepted(&self) -> bool {
        self.outcome.starts_with('2')
    }
}

/// A hostile payload published straight to the raw queue.
struct Published {
    kind: Kind,
    marker: String,
    /// The invalid queue's reason for it.
    reason: &'static str,
    /// `Ok` if the broker confirmed it (then it must be found); else why not.
    outcome: Result<(), String>,
}

#[derive(Default)]
struct HostileLog {
    sent: Vec<Sent>,
    published: Vec<Published>,
}

fn hostile_event(id: &str) -> Value {
    let mut event = product_viewed(id);
    event["userId"] = json!(HOSTILE_USER);
    event
}

/// The events of one hostile request of `kind` (not `SameIds`, `Amplifier` or the raw kinds),
/// each with what it should become.
fn hostile_batch(kind: Kind, n: u64) -> Vec<(Value, Expect)> {
    let id = |what: &str| format!("h{n}-{what}");
    let stored = || Expect::Stored(Check::Nothing);
    match kind {
        Kind::NulKey => {
            let mut bad = hostile_event(&id("nul"));
            bad["properties"]["k\u{0}x"] = json!(1);
            vec![
                (hostile_event(&id("beside-nul")), stored()),
                (bad, Expect::Invalid("storage")),
            ]
        }
        Kind::ReservedKeys => {
            let mut dollar = hostile_event(&id("dollar"));
            dollar["$set"] = json!({"a": 1});
            let mut own_id = hostile_event(&id("own-id"));
            own_id["_id"] = json!("mine");
            let mut nested = hostile_event(&id("nested"));
            nested["properties"]["$inc"] = json!(1);
            nested["properties"]["a.b"] = json!(2);
            nested["properties"]["deep"] = json!({"$x": {"c.d": 3}});
            let mut dotted = hostile_event(&id("dotted"));
            dotted["a.b"] = json!(1);
            vec![
                (dollar, Expect::Invalid("storage")),
                (own_id, Expect::Invalid("storage")),
                (nested, stored()),
                (dotted, stored()),
            ]
        }
        Kind::NullFields => vec![
            (
                json!({"type": "track", "event": "Product Viewed", "messageId": id("nulls"),
                    "userId": HOSTILE_USER, "anonymousId": null, "timestamp": null,
                    "integrations": null, "context": null, "properties": {"product_id": "sku-1"}}),
                Expect::Stored(Check::Absent("anonymousId")),
            ),
            (
                json!({"type": "page", "name": null, "messageId": id("nulls-page"),
                    "userId": null, "anonymousId": "hostile-anon", "properties": null}),
                Expect::Stored(Check::Absent("userId")),
            ),
        ],
        Kind::SchemaError => {
            let mut bad = hostile_event(&id("schema"));
            bad["properties"]["price"] = json!(-1);
            vec![
                (hostile_event(&id("beside-schema")), stored()),
                (bad, Expect::Invalid("schema")),
            ]
        }
        _ => Vec::new(),
    }
}

/// 2,000 tiny events under a 330 KB batch-level context: under every limit as sent (about
/// 500 KB), 660 MB once the context is copied into each event.
fn amplifier() -> Vec<u8> {
    let events: Vec<Value> = (0..2000)
        .map(|i| json!({"type": "track", "event": "Custom", "userId": format!("u-{i:06}"), "properties": {"pad": "xxxxxxxx"}}))
        .collect();
    json!({"batch": events, "context": {"blob": "x".repeat(330_000)}})
        .to_string()
        .into_bytes()
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: Vec<u8>,
) -> (String, Option<String>) {
    let request = client
        .post_as(format!("{url}/v1/batch"), key)
        .header("content-type", "application/json")
        .body(body);
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16().to_string();
            let answer: Option<Value> = response.json().await.ok();
            let code = answer.and_then(|a| a["code"].as_str().map(str::to_owned));
            (status, code)
        }
        Err(error) if error.is_timeout() => ("timeout".into(), None),
        Err(error) if error.is_connect() => ("connect".into(), None),
        Err(_) => ("error".into(), None),
    }
}

/// As a collector would publish a request of `source`, named by `marker`.
fn raw_properties(marker: &str, source: &str, gzip: bool) -> lapin::BasicProperties {
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(ingest_pipeline::headers::SOURCE.into(), long_string(source));
    headers.insert(
        ingest_pipeline::headers::ENDPOINT.into(),
        long_string("batch"),
    );
    headers.insert(HOSTILE_HEADER.into(), long_string(marker));
    let mut properties = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(marker.into())
        .with_headers(headers);
    if gzip {
        properties = properties.with_content_encoding("gzip".into());
    }
    properties
}

/// The hostile client: one request (or raw publish) every 1/`HOSTILE_RATE` s for `secs`, the
/// kinds in turn, the source alternating by round. Goes on through every fault, recording what
/// each request got.
async fn hostile_client(url: String, amqp: String, raw: String, secs: f64) -> HostileLog {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let amplifier = amplifier();
    let amplifier_gzip = gzip(&amplifier);
    let mut log = HostileLog::default();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / HOSTILE_RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut n: u64 = 0;
    while Instant::now() < until {
        tick.tick().await;
        let kind = KINDS[(n % KINDS.len() as u64) as usize];
        let round = n / KINDS.len() as u64;
        let (source, key) = if round.is_multiple_of(2) {
            ("shop-ios", IOS_KEY)
        } else {
            ("shop-web", WEB_KEY)
        };
        match kind {
            _ if kind.raw() => {
                let marker = format!("h{n}-{kind:?}");
                let (body, gzipped, reason) = match kind {
                    Kind::BadJson => (
                        format!(r#"{{"writeKey":"{IOS_KEY}","batch":[{{"type":"track","event":"{marker}""#)
                            .into_bytes(),
                        false,
                        "decode",
                    ),
                    Kind::BadGzip => (format!("not gzip: {marker}").into_bytes(), true, "decode"),
                    _ if round.is_multiple_of(2) => (amplifier.clone(), false, "too_large"),
                    _ => (amplifier_gzip.clone(), true, "too_large"),
                };
                let properties = raw_properties(&marker, source, gzipped);
                let outcome =
                    publish_once(&amqp, &raw, &body, properties, Duration::from_secs(5)).await;
                log.published.push(Published {
                    kind,
                    marker,
                    reason,
                    outcome,
                });
            }
            Kind::Amplifier => {
                let (outcome, code) = post(&client, &url, key, amplifier.clone()).await;
                log.sent.push(Sent {
                    kind,
                    outcome,
                    code,
                    events: Vec::new(),
                });
            }
            Kind::SameIds => {
                let shared = format!("h{n}-shared");
                let both = [
                    ("shop-ios", IOS_KEY, 10.0 + n as f64),
                    ("shop-web", WEB_KEY, 100_000.0 + n as f64),
                ];
                for (source, key, total) in both {
                    let mut event = order_completed(&shared, total);
                    event["userId"] = json!(HOSTILE_USER);
                    let body = batch(vec![event]).to_string().into_bytes();
                    let (outcome, code) = post(&client, &url, key, body).await;
                    log.sent.push(Sent {
                        kind,
                        outcome,
                        code,
                        events: vec![(
                            (source.to_owned(), shared.clone()),
                            Expect::Stored(Check::Total(total)),
                        )],
                    });
                }
            }
            _ => {
                let events = hostile_batch(kind, n);
                let body = batch(events.iter().map(|(e, _)| e.clone()).collect())
                    .to_string()
                    .into_bytes();
                let (outcome, code) = post(&client, &url, key, body).await;
                let events = events
                    .into_iter()
                    .map(|(event, expect)| {
                        let id = event["messageId"].as_str().unwrap().to_owned();
                        ((source.to_owned(), id), expect)
                    })
                    .collect();
                log.sent.push(Sent {
                    kind,
                    outcome,
                    code,
                    events,
                });
            }
        }
        n += 1;
    }
    log
}

/// Everything taken out of the queues where events and payloads are kept, over every poll.
#[derive(Default)]
struct Kept {
    invalid: Vec<(BTreeMap<String, String>, Value)>,
    mongo_dlq: Vec<(BTreeMap<String, String>, Value)>,
    raw_dlq: Vec<(BTreeMap<String, String>, Vec<u8>)>,
}

impl Kept {
    async fn take(&mut self, url: &str, topology: &Topology) {
        self.invalid
            .extend(drain_with_headers(url, &topology.invalid()).await);
        self.mongo_dlq
            .extend(drain_with_headers(url, &topology.sink_dlq("mongo")).await);
        self.raw_dlq
            .extend(drain_raw_with_headers(url, &topology.raw_dlq()).await);
    }

    /// Where each event and payload was kept, and what was kept without its reason.
    fn places(&self) -> Places {
        let mut places = Places::default();
        for (headers, record) in &self.invalid {
            let Some(reason) = record.get("reason").and_then(Value::as_str) else {
                places.faults.push(format!(
                    "kept without a reason in the invalid queue: {headers:?} {record}"
                ));
                continue;
            };
            let source = record["source"].as_str().unwrap_or_default().to_owned();
            let place = format!("invalid:{reason}");
            match record.get("event").and_then(|e| e["messageId"].as_str()) {
                Some(id) => places.add((source, id.to_owned()), place),
                None => {
                    let request = record["requestId"].as_str().unwrap_or_default().to_owned();
                    places
                        .records
                        .entry(request.clone())
                        .or_default()
                        .push(record.clone());
                    places.payloads.entry(request).or_default().push(place);
                }
            }
        }
        for (headers, body) in &self.mongo_dlq {
            if headers.get(LAST_ERROR).is_none_or(|e| e.is_empty()) {
                places.faults.push(format!(
                    "kept without a reason in the mongo DLQ: {headers:?} {body}"
                ));
            }
            let events = match body {
                Value::Array(events) => events.clone(),
                record => vec![record.get("event").cloned().unwrap_or_default()],
            };
            for event in events {
                let source = event["source"].as_str().unwrap_or_default().to_owned();
                if let Some(id) = event["messageId"].as_str() {
                    places.add((source, id.to_owned()), "mongo-dlq".into());
                }
            }
        }
        for (headers, body) in &self.raw_dlq {
            let why = headers.get("x-first-death-reason").map(String::as_str);
            if why != Some("delivery_limit") {
                places.faults.push(format!(
                    "in the raw DLQ, not for its delivery limit ({why:?}): {headers:?}"
                ));
            }
            places.raw_dlq += 1;
            if let Some(marker) = headers.get(HOSTILE_HEADER) {
                places
                    .payloads
                    .entry(marker.clone())
                    .or_default()
                    .push("raw-dlq".into());
                continue;
            }
            match raw_events(headers, body) {
                Some(keys) => {
                    for key in keys {
                        places.add(key, "raw-dlq".into());
                    }
                }
                None => places.faults.push(format!(
                    "in the raw DLQ, a payload that names no events: {headers:?}, {} bytes",
                    body.len()
                )),
            }
        }
        places
    }
}

/// The (source, messageId) of every event of a payload the collector published; `None` if it
/// does not read as a batch whose every event has a messageId.
fn raw_events(headers: &BTreeMap<String, String>, body: &[u8]) -> Option<Vec<Key>> {
    let source = headers.get(ingest_pipeline::headers::SOURCE)?;
    let json: Value = serde_json::from_slice(&gunzip_if_gzip(body).ok()?).ok()?;
    let events = match json.get("batch") {
        Some(Value::Array(events)) => events.clone(),
        _ => vec![json],
    };
    events
        .iter()
        .map(|e| Some((source.clone(), e.get("messageId")?.as_str()?.to_owned())))
        .collect::<Option<Vec<Key>>>()
        .filter(|keys| !keys.is_empty())
}

#[derive(Default)]
struct Places {
    /// (source, messageId) → where it was kept: `invalid:<reason>`, `mongo-dlq`, `raw-dlq`.
    events: HashMap<Key, Vec<String>>,
    /// Request id (or hostile marker) → where the payload was kept whole.
    payloads: HashMap<String, Vec<String>>,
    /// Request id → its invalid records.
    records: HashMap<String, Vec<Value>>,
    raw_dlq: usize,
    faults: Vec<String>,
}

impl Places {
    fn add(&mut self, key: Key, place: String) {
        self.events.entry(key).or_default().push(place);
    }

    fn of(&self, key: &Key) -> &[String] {
        self.events.get(key).map_or(&[], Vec::as_slice)
    }
}

/// What became of one hostile event: `Ok(label)` if that is what it should have become.
fn judge(
    kind: Kind,
    expect: &Expect,
    stored: usize,
    kept: &[String],
) -> Result<&'static str, String> {
    let invalid: Vec<&String> = kept.iter().filter(|p| p.starts_with("invalid:")).collect();
    match expect {
        Expect::Stored(_) => match (stored, invalid.is_empty(), kept.is_empty()) {
            (1, true, _) => Ok("stored"),
            (0, true, false) if kind != Kind::SameIds => Ok("dead-lettered"),
            (0, true, true) => Err("lost: not in MongoDB and not kept".into()),
            _ => Err(format!(
                "{stored} documents, kept at {kept:?}; expected stored once"
            )),
        },
        Expect::Invalid(reason) => {
            let wanted = format!("invalid:{reason}");
            if stored > 0 {
                Err(format!("{stored} documents; expected {wanted}"))
            } else if kept.is_empty() {
                Err("lost: not in MongoDB and not kept".into())
            } else if kept.iter().all(|p| *p == wanted || p == "raw-dlq") {
                Ok(if invalid.is_empty() {
                    "dead-lettered"
                } else {
                    "invalid"
                })
            } else {
                Err(format!("kept at {kept:?}; expected {wanted}"))
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_random_sigkills_of_every_part_each_2xxd_event_lands_exactly_once() {
    chaos(false).await;
}

/// The same with the collector's spool on: the broker's deaths cost no 503, and the collector
/// is SIGKILLed with its spool mid-write and restarted on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_spool_on_random_sigkills_cost_no_503_and_each_2xxd_event_lands_exactly_once() {
    chaos(true).await;
}

async fn chaos(spool: bool) {
    let secs: f64 = std::env::var("CHAOS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30.0);
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    // CHAOS_PARTS=mongo,broker kills only those (to find which fault a failure needs).
    let victims: Vec<Part> = match std::env::var("CHAOS_PARTS") {
        Ok(list) => PARTS
            .into_iter()
            .filter(|p| list.contains(&format!("{p:?}").to_lowercase()))
            .collect(),
        Err(_) => PARTS.to_vec(),
    };
    let test_started = Instant::now();
    let mut s = settings("chaos");
    let broker = RabbitNode::start();
    let dir = work_dir().join(format!("secantus-{}", s.broker.prefix));
    let mongo = Secantus::on_disk(&dir);
    s.broker.url = ingest_pipeline::settings::Secret::new(broker.url());
    s.mongo.uri = ingest_pipeline::settings::Secret::new(mongo.uri());
    s.collector.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // Outages here last seconds; no batch should run out of attempts and be dead-lettered
    // (one that did would still be accounted for below).
    s.sinks.retry_delays_ms = vec![1000, 5000];
    s.sinks.max_attempts = 50;
    // Every invalid event is accounted for one by one below, so none is folded into a summary
    // (the hostile client repeats its invalid events more than keep_whole times a window).
    s.worker.invalid.window_ms = 0;
    if spool {
        spool_on(&mut s);
    }
    let url = format!("http://{}", s.collector.listen);
    let mut parts = Parts {
        collector: Process::spawn("collector", &s),
        worker: Process::spawn("worker", &s),
        settings: s.clone(),
        broker,
        mongo,
    };
    let client = http();
    let ready = || async {
        client
            .get(format!("{url}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    };
    assert!(
        eventually(Duration::from_secs(60), ready).await,
        "collector never ready"
    );
    let url_amqp = s.broker.url.expose().to_owned();
    let topology = Topology::new(s.broker.prefix.clone());
    // A publish to a queue not yet declared would be returned, not kept.
    let raw_queue = topology.raw();
    assert!(
        eventually(Duration::from_secs(60), || lapin_queue_exists(
            &url_amqp, &raw_queue
        ))
        .await,
        "the raw queue was never declared"
    );

    let recorder = Recorder::new(true);
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let hostile = tokio::spawn(hostile_client(
        url.clone(),
        url_amqp.clone(),
        topology.raw(),
        secs + 5.0,
    ));
    let mut watch = Watch::default();
    let (report, faults) = tokio::join!(
        steady_load(&url, secs + 5.0, seed, &recorder),
        inject(&mut parts, &victims, until, seed, &mut watch),
    );
    let log = hostile.await.unwrap();
    let faults_total: u32 = faults.values().sum();
    eprintln!(
        "chaos seed {seed}: {faults_total} faults {faults:?}\n{}",
        report.text()
    );
    for part in &victims {
        assert!(faults.contains_key(part), "{part:?} was never killed");
    }
    assert!(report.accepted_events > 0, "{}", report.text());

    // Everything is up again: the pipeline recovers by itself and takes a short load whole.
    assert!(
        eventually(Duration::from_secs(90), ready).await,
        "collector not ready after the chaos"
    );
    let after = Recorder::new(true);
    let after_report = steady_load(&url, 3.0, seed ^ 1, &after).await;
    assert!(
        after_report.refused.is_empty(),
        "after the chaos: {}",
        after_report.text()
    );

    let accepted: Vec<Key> = recorder
        .accepted_ids()
        .into_iter()
        .chain(after.accepted_ids())
        .map(|id| ("shop-ios".to_owned(), id_string(id)))
        .collect();
    let hostile_accepted: Vec<&Key> = log
        .sent
        .iter()
        .filter(|s| s.accepted())
        .flat_map(|s| s.events.iter().map(|(key, _)| key))
        .collect();
    let confirmed: Vec<&String> = log
        .published
        .iter()
        .filter(|p| p.outcome.is_ok())
        .map(|p| &p.marker)
        .collect();
    let collection = events(&s).await;

    // Settled: the raw queue is empty and every 2xx'd event and confirmed payload is stored or
    // kept. The kept queues are drained as the poll goes, so that nothing is read twice.
    let mut kept = Kept::default();
    let deadline = Instant::now() + Duration::from_secs(120);
    let (settled, stored, places) = loop {
        watch.look(&mut parts, None);
        let raw_empty = depth(&url_amqp, &topology.raw()).await == 0;
        kept.take(&url_amqp, &topology).await;
        let places = kept.places();
        let stored = stored_keys(&collection).await;
        let found = |key: &Key| stored.contains_key(key) || places.events.contains_key(key);
        let settled = raw_empty
            && accepted.iter().all(&found)
            && hostile_accepted.iter().all(|key| found(key))
            && confirmed.iter().all(|m| places.payloads.contains_key(*m));
        if settled || Instant::now() >= deadline {
            break (settled, stored, places);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    watch.look(&mut parts, None);
    let mut failures: Vec<String> = places.faults.clone();

    // The steady load: exactly once, or kept.
    let duplicates: Vec<(&Key, usize)> = accepted
        .iter()
        .filter_map(|key| stored.get(key).filter(|n| **n > 1).map(|n| (key, *n)))
        .collect();
    let missing: Vec<&Key> = accepted
        .iter()
        .filter(|key| !stored.contains_key(*key))
        .collect();
    let lost: Vec<&&Key> = missing
        .iter()
        .filter(|key| !places.events.contains_key(**key))
        .collect();
    let steady_kept = |prefix: &str| {
        missing
            .iter()
            .filter(|key| places.of(key).iter().any(|p| p.starts_with(prefix)))
            .count()
    };
    eprintln!(
        "chaos result: settled {settled}; {} events 2xx'd, {} of them in MongoDB, {} duplicated, {} kept as invalid, {} in the mongo DLQ, {} in the raw DLQ, {} lost; {} requests answered 503; not accepted {:?}",
        accepted.len(),
        accepted.len() - missing.len(),
        duplicates.len(),
        steady_kept("invalid:"),
        steady_kept("mongo-dlq"),
        steady_kept("raw-dlq"),
        lost.len(),
        report.refused.get("503").copied().unwrap_or(0),
        report.refused
    );
    if !lost.is_empty() || !settled {
        eprintln!("queues (name, ready, unacked, consumers):");
        parts.broker.ctl(&[
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ]);
        eprintln!("lost, first few: {:?}", &lost[..lost.len().min(5)]);
    }
    if !duplicates.is_empty() {
        failures.push(format!("stored more than once: {duplicates:?}"));
    }
    if !lost.is_empty() {
        failures.push(format!(
            "{} 2xx'd, not in MongoDB and not kept, first few: {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        ));
    }
    // With the spool on, a broker away is no reason for a 503: only a full spool would be.
    let answered_503 = report.refused.get("503").copied().unwrap_or(0);
    if spool && answered_503 > 0 {
        failures.push(format!(
            "{answered_503} requests answered 503 with the spool on"
        ));
    }
    // Exactly once per (source, messageId), whatever sent it.
    let doubled: Vec<(&Key, &usize)> = stored.iter().filter(|(_, n)| **n > 1).collect();
    if !doubled.is_empty() {
        failures.push(format!(
            "{} (source, messageId) stored more than once, first few: {:?}",
            doubled.len(),
            &doubled[..doubled.len().min(5)]
        ));
    }

    // The hostile client's requests: each event what it should be.
    let mut requests: BTreeMap<Kind, BTreeMap<String, usize>> = BTreeMap::new();
    let mut verdicts: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut checks: Vec<(&Key, &Check)> = Vec::new();
    let tried: HashSet<&Key> = log
        .sent
        .iter()
        .flat_map(|s| s.events.iter().map(|(key, _)| key))
        .collect();
    for sent in &log.sent {
        *requests
            .entry(sent.kind)
            .or_default()
            .entry(sent.outcome.clone())
            .or_insert(0) += 1;
        if sent.kind == Kind::Amplifier {
            let refused =
                sent.outcome == "413" && sent.code.as_deref() == Some("batch_expands_too_large");
            if sent.accepted() || (sent.outcome == "413" && !refused) {
                failures.push(format!(
                    "an amplifying batch got {} {:?}; expected 413 batch_expands_too_large",
                    sent.outcome, sent.code
                ));
            }
        }
        for (key, expect) in &sent.events {
            let n = stored.get(key).copied().unwrap_or(0);
            let at = places.of(key);
            if !sent.accepted() && n == 0 && at.is_empty() {
                *verdicts.entry("not persisted").or_insert(0) += 1;
                continue;
            }
            match judge(sent.kind, expect, n, at) {
                Ok(verdict) => {
                    *verdicts.entry(verdict).or_insert(0) += 1;
                    if let (Expect::Stored(check), "stored") = (expect, verdict) {
                        checks.push((key, check));
                    }
                }
                Err(why) => failures.push(format!(
                    "{:?} event {key:?} (request {}): {why}",
                    sent.kind, sent.outcome
                )),
            }
        }
    }
    // Each stored hostile document is the event its source sent.
    let wanted: Vec<&str> = checks
        .iter()
        .filter(|(_, c)| **c != Check::Nothing)
        .map(|(key, _)| key.1.as_str())
        .collect();
    let documents = find(&s, mongodb::bson::doc! {"messageId": {"$in": wanted}}).await;
    for (key, check) in &checks {
        let document = documents.iter().find(|d| {
            d.get_str("source") == Ok(key.0.as_str())
                && d.get_str("messageId") == Ok(key.1.as_str())
        });
        let right = match (check, document) {
            (Check::Nothing, _) => true,
            (Check::Total(total), Some(d)) => {
                d.get_document("properties")
                    .ok()
                    .and_then(|p| p.get_f64("total").ok())
                    == Some(*total)
            }
            (Check::Absent(field), Some(d)) => !d.contains_key(field),
            (_, None) => false,
        };
        if !right {
            failures.push(format!(
                "{key:?} stored, but not as sent ({check:?}): {document:?}"
            ));
        }
    }
    // The raw DLQ names only what was sent.
    for (key, at) in &places.events {
        let steady = key.0 == "shop-ios" && uuid::Uuid::parse_str(&key.1).is_ok();
        if at.iter().any(|p| p == "raw-dlq") && !steady && !tried.contains(key) {
            failures.push(format!("in the raw DLQ, an event nobody sent: {key:?}"));
        }
    }
    let markers: HashSet<&String> = log.published.iter().map(|p| &p.marker).collect();
    for marker in places.payloads.keys() {
        let known = markers.contains(marker);
        if !known && places.payloads[marker].iter().any(|p| p == "raw-dlq") {
            failures.push(format!("in the raw DLQ, a payload nobody sent: {marker}"));
        }
    }

    // The payloads published straight to the raw queue: each kept whole with its reason.
    let mut published: BTreeMap<Kind, BTreeMap<&str, usize>> = BTreeMap::new();
    for p in &log.published {
        let label = if p.outcome.is_ok() {
            "confirmed"
        } else {
            "unconfirmed"
        };
        *published
            .entry(p.kind)
            .or_default()
            .entry(label)
            .or_insert(0) += 1;
        let wanted = format!("invalid:{}", p.reason);
        let at = places
            .payloads
            .get(&p.marker)
            .map_or(&[][..], Vec::as_slice);
        if at.is_empty() && p.outcome.is_ok() {
            failures.push(format!(
                "{:?} payload {} confirmed, never kept",
                p.kind, p.marker
            ));
        }
        if at
            .iter()
            .any(|place| *place != wanted && place != "raw-dlq")
        {
            failures.push(format!(
                "{:?} payload {} kept at {at:?}; expected {wanted}",
                p.kind, p.marker
            ));
        }
        for record in places.records.get(&p.marker).into_iter().flatten() {
            let raw = record["rawBase64"]
                .as_str()
                .and_then(|text| STANDARD.decode(text).ok());
            let good = raw.as_ref().is_some_and(|raw| {
                let text = String::from_utf8_lossy(raw);
                !text.contains(IOS_KEY) && (p.kind == Kind::Poison || text.contains(&p.marker))
            });
            if !good {
                failures.push(format!(
                    "{:?} payload {} kept without its raw body, or with its writeKey: {}",
                    p.kind,
                    p.marker,
                    raw.map(|r| String::from_utf8_lossy(&r[..r.len().min(200)]).into_owned())
                        .unwrap_or_default()
                ));
            }
        }
    }
    // Every kind was tried and got through (or, for the amplifier, was refused) at least once.
    for kind in KINDS {
        let answered = if kind.raw() {
            published
                .get(&kind)
                .and_then(|o| o.get("confirmed"))
                .copied()
        } else if kind == Kind::Amplifier {
            requests.get(&kind).and_then(|o| o.get("413")).copied()
        } else {
            requests.get(&kind).map(|o| {
                o.iter()
                    .filter(|(s, _)| s.starts_with('2'))
                    .map(|(_, n)| n)
                    .sum::<usize>()
            })
        };
        if answered.unwrap_or(0) == 0 {
            failures.push(format!("no {kind:?} request got through"));
        }
    }

    let peak_mib = watch.worker_peak_kib / 1024;
    if peak_mib >= MAX_WORKER_RSS_MIB {
        failures.push(format!(
            "a worker reached {peak_mib} MiB resident, bound {MAX_WORKER_RSS_MIB} MiB"
        ));
    }
    for exited in &watch.exited {
        failures.push(format!("{exited} exited without being killed"));
    }
    let by_kind = |m: &BTreeMap<Kind, BTreeMap<String, usize>>| {
        m.iter()
            .map(|(kind, outcomes)| {
                let outcomes: Vec<String> =
                    outcomes.iter().map(|(o, n)| format!("{o}×{n}")).collect();
                format!("{kind:?} {}", outcomes.join(" "))
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let published: BTreeMap<Kind, BTreeMap<String, usize>> = published
        .into_iter()
        .map(|(k, o)| (k, o.into_iter().map(|(l, n)| (l.to_owned(), n)).collect()))
        .collect();
    eprintln!(
        "chaos hostile (seed {seed}): {}; raw queue: {}; events {verdicts:?}; worker peak RSS {peak_mib} MiB (bound {MAX_WORKER_RSS_MIB} MiB, {} samples); raw DLQ {} messages; {:.0} s",
        by_kind(&requests),
        by_kind(&published),
        watch.samples,
        places.raw_dlq,
        test_started.elapsed().as_secs_f64(),
    );
    assert!(
        failures.is_empty(),
        "{} failures (seed {seed}):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
