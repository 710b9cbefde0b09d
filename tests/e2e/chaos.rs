//! Chaos: a steady open-loop load from the load generator while a collector, a worker, the
//! MongoDB-wire server and a test-owned RabbitMQ node are SIGKILLed and restarted at random
//! moments. At the end, judged from the load generator's own record of what got a 2xx: every such
//! event is in MongoDB exactly once, or else in the invalid or the dead-letter queue with its
//! reason; nothing is missing. The short form runs in CI; `CHAOS_SECS=600 scripts/test chaos`
//! is the long form. `CHAOS_SEED` replays a run's choice of victims and moments.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ingest_e2e::*;
use ingest_loadgen::payload::id_string;
use ingest_loadgen::{open_loop, Generator, HttpTarget, Recorder, Report, Schedule, Shape};
use ingest_pipeline::settings::Settings;
use ingest_pipeline::Topology;

/// Requests per second of the steady load (about 25 events each on average).
const RATE: f64 = 15.0;

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

/// Kills a part at a random moment, restarts it after a random outage, and goes on until
/// `until` has passed and every kind of part has been killed at least once.
async fn inject(
    parts: &mut Parts,
    victims: &[Part],
    until: Instant,
    seed: u64,
) -> BTreeMap<Part, u32> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut faults: BTreeMap<Part, u32> = BTreeMap::new();
    let mut round: Vec<Part> = Vec::new();
    let started = Instant::now();
    while Instant::now() < until || faults.len() < victims.len() {
        tokio::time::sleep(Duration::from_millis(rng.u64(500..3000))).await;
        if round.is_empty() {
            round = victims.to_vec();
            rng.shuffle(&mut round);
        }
        let Some(part) = round.pop() else { continue };
        tokio::task::block_in_place(|| parts.kill(part));
        *faults.entry(part).or_insert(0) += 1;
        eprintln!(
            "chaos: {part:?} killed at {:.1} s",
            started.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_millis(rng.u64(100..2500))).await;
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

/// The messageIds in a queue of kept events, each message checked for the reason it was kept.
async fn kept_ids(
    url: &str,
    queue: &str,
    reason: impl Fn(&BTreeMap<String, String>, &serde_json::Value) -> bool,
) -> Vec<String> {
    let mut ids = Vec::new();
    for (headers, body) in drain_with_headers(url, queue).await {
        assert!(
            reason(&headers, &body),
            "kept without a reason in {queue}: {headers:?} {body}"
        );
        let events = match &body {
            serde_json::Value::Array(events) => events.clone(),
            record => vec![record.get("event").cloned().unwrap_or_default()],
        };
        ids.extend(
            events
                .iter()
                .filter_map(|e| e.get("messageId").and_then(|v| v.as_str()))
                .map(str::to_owned),
        );
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_random_sigkills_of_every_part_each_2xxd_event_lands_exactly_once() {
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
    let mut s = settings("chaos");
    let broker = RabbitNode::start();
    let dir = std::env::var("TEST_WORK_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir())
        .join(format!("secantus-{}", s.broker.prefix));
    let mongo = Secantus::on_disk(&dir);
    s.broker.url = ingest_pipeline::settings::Secret::new(broker.url());
    s.mongo.uri = ingest_pipeline::settings::Secret::new(mongo.uri());
    s.collector.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // Outages here last seconds; no batch should run out of attempts and be dead-lettered
    // (one that did would still be accounted for below).
    s.sinks.retry_delays_ms = vec![1000, 5000];
    s.sinks.max_attempts = 50;
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

    let recorder = Recorder::new(true);
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let (report, faults) = tokio::join!(
        steady_load(&url, secs + 5.0, seed, &recorder),
        inject(&mut parts, &victims, until, seed),
    );
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

    let accepted: Vec<String> = recorder
        .accepted_ids()
        .into_iter()
        .chain(after.accepted_ids())
        .map(id_string)
        .collect();
    let url_amqp = s.broker.url.expose().to_owned();
    let topology = Topology::new(s.broker.prefix.clone());
    let collection = events(&s).await;
    let settled = eventually(Duration::from_secs(120), || async {
        depth(&url_amqp, &topology.raw()).await == 0
            && ingest_loadgen::mongo::verify(&collection, &accepted)
                .await
                .is_ok_and(|v| v.missing == 0)
    })
    .await;

    let invalid = kept_ids(&url_amqp, &topology.invalid(), |_, record| {
        record.get("reason").and_then(|r| r.as_str()).is_some()
    })
    .await;
    let dead = kept_ids(&url_amqp, &topology.sink_dlq("mongo"), |headers, _| {
        headers.get("x-last-error").is_some_and(|e| !e.is_empty())
    })
    .await;
    let kept: HashSet<&String> = invalid.iter().chain(&dead).collect();
    let stored = stored_ids(&collection).await;
    let duplicates: Vec<(&String, usize)> = accepted
        .iter()
        .filter_map(|id| stored.get(id).filter(|n| **n > 1).map(|n| (id, *n)))
        .collect();
    let missing: Vec<&String> = accepted
        .iter()
        .filter(|id| !stored.contains_key(*id))
        .collect();
    let lost: Vec<&&String> = missing.iter().filter(|id| !kept.contains(**id)).collect();
    eprintln!(
        "chaos result: settled {settled}; {} events 2xx'd, {} of them in MongoDB, {} duplicated, {} kept as invalid, {} dead-lettered, {} lost; {} requests answered 503; not accepted {:?}",
        accepted.len(),
        accepted.len() - missing.len(),
        duplicates.len(),
        invalid.len(),
        dead.len(),
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
    assert!(
        duplicates.is_empty(),
        "stored more than once: {duplicates:?}"
    );
    assert!(
        lost.is_empty(),
        "2xx'd, not in MongoDB and not kept: {lost:?}"
    );
}

/// How many documents hold each messageId.
async fn stored_ids(
    collection: &mongodb::Collection<mongodb::bson::Document>,
) -> std::collections::HashMap<String, usize> {
    use futures_util::TryStreamExt;
    let mut stored = std::collections::HashMap::new();
    let mut cursor = collection
        .find(mongodb::bson::doc! {})
        .projection(mongodb::bson::doc! {"messageId": 1, "_id": 0})
        .await
        .unwrap();
    while let Some(document) = cursor.try_next().await.unwrap() {
        if let Ok(id) = document.get_str("messageId") {
            *stored.entry(id.to_owned()).or_insert(0) += 1;
        }
    }
    stored
}
