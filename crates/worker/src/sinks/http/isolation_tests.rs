//! A bad event costs only itself in an HTTP sink: batches within `batch_max_events` and
//! `batch_max_bytes`, a refused batch bisected down to its refused events, every part under a
//! stable key of its own. Through the in-process path (`Fanout`), against a real server that
//! answers by the events it is sent.

use std::collections::BTreeMap;
use std::sync::Mutex;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap as AxumHeaders;
use axum::Router;
use ingest_pipeline::broker::header_str;
use ingest_pipeline::message::{read_attempts, read_batch_key};
use ingest_pipeline::settings::DeliverySettings;
use ingest_pipeline::Topology;
use lapin::types::FieldTable;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::delivery::fanout::Fanout;
use crate::delivery::{Durable, SinkRunner};

const NAME: &str = "vendor";

/// One POST the vendor got.
#[derive(Debug, Clone, PartialEq)]
struct Post {
    key: String,
    ids: Vec<String>,
    bytes: usize,
    status: u16,
}

type Answer = fn(&[Value]) -> (StatusCode, String);

#[derive(Clone)]
struct VendorState {
    posts: Arc<Mutex<Vec<Post>>>,
    answer: Answer,
}

/// A vendor on an ephemeral port that answers each POST from its events; aborted on drop.
struct Vendor {
    url: String,
    posts: Arc<Mutex<Vec<Post>>>,
    task: JoinHandle<()>,
}

impl Vendor {
    async fn start(answer: Answer) -> Self {
        let posts = Arc::new(Mutex::new(Vec::new()));
        let state = VendorState {
            posts: posts.clone(),
            answer,
        };
        let app = Router::new().fallback(receive).with_state(state);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}/hook"),
            posts,
            task,
        }
    }

    fn posts(&self) -> Vec<Post> {
        self.posts.lock().expect("lock").clone()
    }

    /// messageId → how many POSTs answered 2xx carried it.
    fn accepted(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for post in self.posts().iter().filter(|p| p.status < 300) {
            for id in &post.ids {
                *out.entry(id.clone()).or_default() += 1;
            }
        }
        out
    }
}

impl Drop for Vendor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    State(state): State<VendorState>,
    headers: AxumHeaders,
    body: Bytes,
) -> (StatusCode, String) {
    let events: Vec<Value> = serde_json::from_slice(&body).unwrap_or_default();
    let (status, text) = (state.answer)(&events);
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let ids = events.iter().map(|e| id_of(e).to_owned()).collect();
    state.posts.lock().expect("lock").push(Post {
        key,
        ids,
        bytes: body.len(),
        status: status.as_u16(),
    });
    (status, text)
}

fn id_of(event: &Value) -> &str {
    event["messageId"].as_str().unwrap_or_default()
}

/// 400 naming the first event marked `bad`; else 503 if one is marked `flaky`; else 200.
fn by_content(events: &[Value]) -> (StatusCode, String) {
    if let Some(bad) = events.iter().find(|e| e["bad"] == json!(true)) {
        let reason = format!("event {} is refused", id_of(bad));
        return (StatusCode::BAD_REQUEST, reason);
    }
    if events.iter().any(|e| e["flaky"] == json!(true)) {
        return (StatusCode::SERVICE_UNAVAILABLE, "later".to_owned());
    }
    (StatusCode::OK, String::new())
}

/// One batch the [`Queues`] took.
#[derive(Debug, Clone)]
struct Stored {
    queue: String,
    key: String,
    attempts: u32,
    reason: String,
    ids: Vec<String>,
}

/// The sink's queues: keeps what it is given, with the reason.
#[derive(Default)]
struct Queues(Mutex<Vec<Stored>>);

impl Queues {
    fn stored(&self) -> Vec<Stored> {
        self.0.lock().expect("lock").clone()
    }

    fn in_queue(&self, queue: &str) -> Vec<Stored> {
        self.stored()
            .into_iter()
            .filter(|s| s.queue == queue)
            .collect()
    }
}

#[async_trait::async_trait]
impl Durable for Queues {
    async fn store(&self, queue: &str, body: &[u8], headers: FieldTable) -> Result<(), String> {
        let events: Vec<Value> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let headers = Some(&headers);
        self.0.lock().map_err(|e| e.to_string())?.push(Stored {
            queue: queue.to_owned(),
            key: read_batch_key(headers).unwrap_or_default().to_owned(),
            attempts: read_attempts(headers),
            reason: header_str(headers, "x-last-error")
                .unwrap_or_default()
                .to_owned(),
            ids: events.iter().map(|e| id_of(e).to_owned()).collect(),
        });
        Ok(())
    }
}

fn events(n: usize, mark: &[(usize, &str)]) -> Vec<Arc<Event>> {
    (0..n)
        .map(|i| {
            let mut v = json!({"type": "track", "event": "Viewed", "messageId": format!("m{i}"),
                               "source": "shop-ios", "properties": {"n": i}});
            for (at, flag) in mark {
                if *at == i {
                    v[*flag] = json!(true);
                }
            }
            match v {
                Value::Object(map) => Arc::new(Event::from(map)),
                _ => Arc::new(Event::default()),
            }
        })
        .collect()
}

fn ids(range: impl IntoIterator<Item = usize>) -> Vec<String> {
    range.into_iter().map(|i| format!("m{i}")).collect()
}

fn quick(delivery: DeliverySettings) -> DeliverySettings {
    DeliverySettings {
        inline_attempts: 1,
        breaker_failures: 0,
        ..delivery
    }
}

/// Delivers `jobs` (one raw delivery each) in process to an HTTP sink pointing at `url`, and
/// returns what went to the sink's queues.
async fn deliver(url: &str, delivery: DeliverySettings, jobs: Vec<Vec<Arc<Event>>>) -> Arc<Queues> {
    let settings = HttpSinkSettings {
        name: NAME.to_owned(),
        url: url.to_owned(),
        headers: BTreeMap::new(),
        format: BodyFormat::Json,
        connect_timeout_ms: 2_000,
        request_timeout_ms: 5_000,
        delivery: delivery.clone(),
    };
    let sink = Arc::new(HttpSink::new(settings).expect("valid settings"));
    let runner = Arc::new(SinkRunner::new(
        sink,
        delivery,
        vec![Duration::from_secs(1)],
        3,
    ));
    let queues = Arc::new(Queues::default());
    let out: Arc<dyn Durable> = queues.clone();
    let stop = CancellationToken::new();
    let (fanout, _lanes) = Fanout::start(&[runner], &Topology::new("t"), out, &stop);
    let answers = futures_util::future::join_all(jobs.iter().map(|job| fanout.deliver(job))).await;
    for answer in answers {
        assert_eq!(answer, Ok(()), "every event is delivered or in a queue");
    }
    queues
}

const DLQ: &str = "t.sink.vendor.dlq";

#[tokio::test]
async fn a_batch_refused_for_one_event_dead_letters_that_event_alone_with_the_vendors_answer() {
    let vendor = Vendor::start(by_content).await;
    let queues = deliver(
        &vendor.url,
        quick(DeliverySettings::default()),
        vec![events(100, &[(37, "bad")])],
    )
    .await;

    let accepted = vendor.accepted();
    let good: Vec<String> = ids((0..100).filter(|i| *i != 37));
    assert_eq!(accepted.keys().cloned().collect::<Vec<_>>().len(), 99);
    for id in &good {
        assert_eq!(
            accepted.get(id),
            Some(&1),
            "{id} not delivered exactly once"
        );
    }
    let dead = queues.in_queue(DLQ);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].ids, ids([37]));
    assert!(dead[0].reason.contains("400"), "{}", dead[0].reason);
    assert!(
        dead[0].reason.contains("event m37 is refused"),
        "the vendor's answer is kept: {}",
        dead[0].reason
    );
    assert_eq!(dead[0].attempts, 1);
    assert_eq!(
        queues.stored().len(),
        1,
        "nothing else in the sink's queues"
    );
    // One refused event in 100: two POSTs per level of the bisection, seven levels.
    let posts = vendor.posts().len();
    assert!(posts <= 1 + 2 * 7, "{posts} POSTs");
}

#[tokio::test]
async fn no_post_exceeds_batch_max_events_or_batch_max_bytes_even_for_one_large_delivery() {
    let vendor = Vendor::start(by_content).await;
    let bounds = DeliverySettings {
        batch_max_events: 50,
        batch_max_bytes: 4_096,
        max_in_flight: 1,
        ..DeliverySettings::default()
    };
    let jobs = vec![events(1_000, &[]), events(3, &[]), events(120, &[])];
    let queues = deliver(&vendor.url, quick(bounds), jobs).await;

    let posts = vendor.posts();
    assert!(posts.iter().all(|p| p.status == 200), "{posts:?}");
    for post in &posts {
        assert!(post.ids.len() <= 50, "a POST of {} events", post.ids.len());
        assert!(post.bytes <= 4_096, "a POST of {} bytes", post.bytes);
    }
    let delivered: usize = posts.iter().map(|p| p.ids.len()).sum();
    assert_eq!(delivered, 1_123);
    assert!(queues.stored().is_empty(), "{:?}", queues.stored());
}

#[tokio::test]
async fn bisection_makes_at_most_two_posts_per_level_for_each_refused_event() {
    let vendor = Vendor::start(by_content).await;
    let bad = [3, 130, 254];
    let marks: Vec<(usize, &str)> = bad.iter().map(|i| (*i, "bad")).collect();
    let bounds = DeliverySettings {
        batch_max_events: 256,
        ..DeliverySettings::default()
    };
    let queues = deliver(&vendor.url, quick(bounds), vec![events(256, &marks)]).await;

    // 256 events: eight levels; one refusal costs at most two POSTs a level.
    let posts = vendor.posts().len();
    assert!(posts <= 1 + 2 * 8 * bad.len(), "{posts} POSTs");
    assert_eq!(vendor.accepted().len(), 256 - bad.len());
    assert!(vendor.accepted().values().all(|n| *n == 1));
    let mut dead: Vec<String> = queues
        .in_queue(DLQ)
        .into_iter()
        .flat_map(|s| s.ids)
        .collect();
    dead.sort();
    let mut expected = ids(bad);
    expected.sort();
    assert_eq!(dead, expected);
}

#[tokio::test]
async fn a_retryable_answer_during_bisection_sends_only_that_part_to_the_retry_path() {
    let vendor = Vendor::start(by_content).await;
    let queues = deliver(
        &vendor.url,
        quick(DeliverySettings::default()),
        vec![events(8, &[(1, "bad"), (6, "flaky")])],
    )
    .await;

    // The first half is bisected down to its refused event; the second half answers 503 and
    // waits in the retry path whole, under its own key, like any batch that failed once.
    assert_eq!(
        vendor.accepted().keys().cloned().collect::<Vec<_>>(),
        ids([0, 2, 3])
    );
    let dead = queues.in_queue(DLQ);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].ids, ids([1]));
    let waiting = queues.in_queue("t.sink.vendor.retry.1000ms");
    assert_eq!(waiting.len(), 1, "{:?}", queues.stored());
    assert_eq!(waiting[0].ids, ids(4..8));
    assert_eq!(waiting[0].attempts, 1);
    assert!(waiting[0].reason.contains("503"), "{}", waiting[0].reason);
    let refused_key = vendor.posts()[0].key.clone();
    assert_ne!(waiting[0].key, refused_key, "a part has a key of its own");
}

#[tokio::test]
async fn every_part_keeps_its_own_idempotency_key_when_the_same_batch_comes_again() {
    let vendor = Vendor::start(by_content).await;
    let run = |vendor: &Vendor| {
        let url = vendor.url.clone();
        async move {
            deliver(
                &url,
                quick(DeliverySettings::default()),
                vec![events(40, &[(9, "bad")])],
            )
            .await
        }
    };
    run(&vendor).await;
    let first = vendor.posts();
    vendor.posts.lock().expect("lock").clear();
    run(&vendor).await;
    let second = vendor.posts();

    assert_eq!(
        first, second,
        "the same batch is cut into the same parts, same keys"
    );
    let mut keys: Vec<&str> = first.iter().map(|p| p.key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), first.len(), "each part has a key of its own");
}

#[tokio::test]
async fn a_refusal_of_the_request_itself_is_not_bisected() {
    let vendor = Vendor::start(|_| (StatusCode::UNAUTHORIZED, "bad token".to_owned())).await;
    let queues = deliver(
        &vendor.url,
        quick(DeliverySettings::default()),
        vec![events(100, &[])],
    )
    .await;

    assert_eq!(
        vendor.posts().len(),
        1,
        "every part would get the same answer"
    );
    let dead = queues.in_queue(DLQ);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].ids, ids(0..100));
    assert!(dead[0].reason.contains("401"), "{}", dead[0].reason);
    assert!(dead[0].reason.len() < 500, "one reason, not one per event");
}
