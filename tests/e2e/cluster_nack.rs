//! A channel whose first publish to a quorum queue comes while the queue's leader has just died
//! is nacked, and RabbitMQ 3.10 goes on nacking every publish on that channel to that queue
//! until the dead node is back, although the queue has a new leader within a second (see
//! `ingest_pipeline::publish`). A collector that reconnects to a live node at that moment had
//! its fresh channels refuse a share of the requests for the whole outage. The pipeline's
//! publisher replaces a channel that is nacked and publishes again on the new one: this test
//! shows the broker's behaviour on a bare channel beside it, and that the publisher's
//! publishes are all taken once the new leader is elected.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ingest_e2e::*;
use ingest_pipeline::broker;
use ingest_pipeline::Topology;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Confirmation, ConnectionProperties};

/// The collector's default number of publishing channels.
const PUBLISHERS: usize = 4;
/// Long after a new leader is elected (about 250 ms on this machine).
const ELECTED: Duration = Duration::from_secs(3);

async fn bare_answer(channel: &lapin::Channel, queue: &str) -> Option<Confirmation> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            options,
            b"{}",
            BasicProperties::default(),
        )
        .await
        .ok()?;
    tokio::time::timeout(Duration::from_secs(10), confirm)
        .await
        .ok()?
        .ok()
}

async fn answer(publisher: &broker::Publisher, queue: &str) -> Result<(), String> {
    let patience = Duration::from_secs(10);
    let properties = BasicProperties::default();
    let publish = publisher.publish_and_wait("", queue, b"{}", &properties, patience);
    match tokio::time::timeout(Duration::from_secs(30), publish).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("no answer in 30 s".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_first_used_while_the_leader_dies_are_replaced_and_publishes_taken() {
    let mut cluster = tokio::task::block_in_place(RabbitCluster::start);
    let topology = Topology::new(unique("nack"));
    let queue = topology.raw();
    let declaring =
        lapin::Connection::connect(&cluster.nodes[0].url(), ConnectionProperties::default())
            .await
            .unwrap();
    topology.declare(&declaring).await.unwrap();
    let _ = declaring.close(200, "".into()).await;
    let (leader, members) = cluster.leader_and_members(&queue).expect("the raw queue");
    assert_eq!(members.len(), 3, "{members:?}");
    let follower = (leader + 1) % cluster.nodes.len();
    let connection = Arc::new(
        lapin::Connection::connect(
            &cluster.nodes[follower].url(),
            ConnectionProperties::default(),
        )
        .await
        .unwrap(),
    );

    let victim = &mut cluster.nodes[leader];
    tokio::task::block_in_place(|| victim.kill9());
    let killed = Instant::now();
    // Opened and first used at once, as a collector that just reconnected does.
    let bare = broker::confirm_channel(&connection).await.unwrap();
    let first_bare = bare_answer(&bare, &queue).await;
    let first_at = killed.elapsed();
    let mut publishers = Vec::new();
    for _ in 0..PUBLISHERS {
        let publisher = broker::Publisher::open(connection.clone()).await.unwrap();
        let first = answer(&publisher, &queue).await;
        publishers.push((publisher, first));
    }
    eprintln!(
        "cluster nack: first publishes {} ms after the kill: bare channel {first_bare:?}, publishers {:?}",
        killed.elapsed().as_millis(),
        publishers.iter().map(|(_, a)| a).collect::<Vec<_>>()
    );
    tokio::time::sleep(ELECTED.saturating_sub(killed.elapsed())).await;

    // The broker's behaviour, which the publisher works around: without it this test shows
    // nothing. A RabbitMQ that answers this with an ack no longer needs the renewal.
    let bare_later = bare_answer(&bare, &queue).await;
    assert!(
        matches!(first_bare, Some(Confirmation::Nack(None)))
            && matches!(bare_later, Some(Confirmation::Nack(None))),
        "a bare channel first used {} ms after the leader died was answered {first_bare:?}, and \
         {} ms after it {bare_later:?}: the broker did not keep nacking it, so this run cannot show \
         the fix",
        first_at.as_millis(),
        killed.elapsed().as_millis()
    );

    let mut failures = Vec::new();
    for (i, (publisher, _)) in publishers.iter().enumerate() {
        for attempt in 0..3 {
            let got = answer(publisher, &queue).await;
            if got.is_err() {
                failures.push(format!("publisher {i}, publish {attempt}: {got:?}"));
            }
        }
    }
    eprintln!(
        "cluster nack: {} publishes {} ms after the kill; channels renewed: {:?}",
        PUBLISHERS * 3,
        killed.elapsed().as_millis(),
        publishers
            .iter()
            .map(|(p, _)| p.renewals())
            .collect::<Vec<_>>()
    );
    assert!(failures.is_empty(), "{failures:#?}");
}
