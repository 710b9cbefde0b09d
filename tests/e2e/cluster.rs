//! A three-node RabbitMQ cluster under a steady open-loop load, with the services given every
//! node (`broker.urls`). In turn: SIGKILL the node that leads `<prefix>.raw` (asked of the
//! broker), SIGKILL a follower, SIGSTOP a node for longer than two heartbeats and SIGCONT it
//! (in turn each node, and then the node the collector is connected to), SIGKILL the
//! collector, SIGKILL the worker; each node restarted on its data. The invariant is
//! the single node's: every 2xx'd event in MongoDB exactly once. Reported per fault: the time
//! from the fault to the first 2xx of a request sent after it, and the requests refused in
//! between. The short form (one round) runs in CI; `CLUSTER_ROUNDS=5 scripts/test e2e::cluster::` is a
//! long form.

use std::time::{Duration, Instant};

use ingest_e2e::*;
use ingest_loadgen::payload::id_string;
use ingest_loadgen::{recovery, Recorder};
use ingest_pipeline::settings::{Secret, Settings};
use ingest_pipeline::Topology;

/// Requests per second of the steady load (about 25 events each on average).
const RATE: f64 = 20.0;
/// The AMQP heartbeat the services ask for: a frozen node is given up after about two.
const HEARTBEAT_SECS: u16 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillLeader,
    KillFollower,
    FreezeNode,
    FreezeCollectorsNode,
    KillCollector,
    KillWorker,
}

const FAULTS: [Fault; 6] = [
    Fault::KillLeader,
    Fault::KillFollower,
    Fault::FreezeNode,
    Fault::FreezeCollectorsNode,
    Fault::KillCollector,
    Fault::KillWorker,
];

struct Parts {
    settings: Settings,
    cluster: RabbitCluster,
    collector: Process,
    worker: Process,
}

impl Parts {
    /// Applies `fault` (the `round`-th of its kind), waits out its outage, and restores; returns
    /// when the fault took effect and what it hit.
    async fn inflict(&mut self, fault: Fault, round: usize, raw: &str) -> (Instant, String) {
        let nodes = self.cluster.nodes.len();
        let leader = self.cluster.leader_and_members(raw).map(|(l, _)| l);
        let collectors = self.cluster.node_serving("collector");
        // When the fault has taken effect (the signal sent).
        let started;
        let victim = match fault {
            Fault::KillLeader
            | Fault::KillFollower
            | Fault::FreezeNode
            | Fault::FreezeCollectorsNode => {
                let leader = leader.unwrap_or(0);
                let node = match fault {
                    Fault::KillLeader => leader,
                    Fault::KillFollower => (leader + 1 + round % (nodes - 1)) % nodes,
                    Fault::FreezeCollectorsNode => collectors.unwrap_or(round % nodes),
                    _ => round % nodes,
                };
                let frozen = matches!(fault, Fault::FreezeNode | Fault::FreezeCollectorsNode);
                let victim = &mut self.cluster.nodes[node];
                let name = victim.name.clone();
                if frozen {
                    victim.freeze();
                    started = Instant::now();
                    let pause = Duration::from_secs(u64::from(HEARTBEAT_SECS) * 2 + 2);
                    tokio::time::sleep(pause).await;
                    victim.thaw();
                } else {
                    tokio::task::block_in_place(|| victim.kill9());
                    started = Instant::now();
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    tokio::task::block_in_place(|| victim.resume());
                }
                let role = if node == leader { "leader" } else { "follower" };
                let serving = if collectors == Some(node) {
                    ", the collector's"
                } else {
                    ""
                };
                format!("{name} ({role}{serving})")
            }
            Fault::KillCollector => {
                self.collector.kill9();
                started = Instant::now();
                tokio::time::sleep(Duration::from_millis(500)).await;
                self.collector = Process::spawn("collector", &self.settings);
                "collector".into()
            }
            Fault::KillWorker => {
                self.worker.kill9();
                started = Instant::now();
                tokio::time::sleep(Duration::from_millis(500)).await;
                self.worker = Process::spawn("worker", &self.settings);
                "worker".into()
            }
        };
        (started, victim)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_three_node_cluster_lost_and_frozen_nodes_lose_no_2xxd_event() {
    let rounds: usize = std::env::var("CLUSTER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let cluster = tokio::task::block_in_place(RabbitCluster::start);
    let mut s = settings("cluster");
    s.broker.urls = cluster
        .urls(HEARTBEAT_SECS)
        .into_iter()
        .map(Secret::new)
        .collect();
    s.collector.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // Outages here last seconds; no batch should run out of attempts.
    s.sinks.retry_delays_ms = vec![1000, 5000];
    s.sinks.max_attempts = 50;
    let url = format!("http://{}", s.collector.listen);
    let mut parts = Parts {
        collector: Process::spawn("collector", &s),
        worker: Process::spawn("worker", &s),
        settings: s.clone(),
        cluster,
    };
    assert!(
        status_becomes(&http(), format!("{url}/readyz"), 200).await,
        "collector never ready"
    );
    let topology = Topology::new(s.broker.prefix.clone());
    let raw = topology.raw();
    let first_node = parts.cluster.nodes[0].url();
    assert!(
        eventually(Duration::from_secs(60), || lapin_queue_exists(
            &first_node,
            &raw
        ))
        .await,
        "the raw queue was never declared"
    );
    // Declared without a group size, the quorum queue has a member on every node.
    let (_, members) = parts.cluster.leader_and_members(&raw).expect("raw queue");
    assert_eq!(members.len(), 3, "members of {raw}: {members:?}");

    let faults: Vec<Fault> = (0..rounds).flat_map(|_| FAULTS).collect();
    let recorder = Recorder::new(true).keep_timeline();
    // Longer than the faults take: the load is stopped 10 s after the last one.
    let load = start_open_loop(&url, RATE, &recorder);
    let mut inflicted = Vec::new();
    let load_started = Instant::now();
    for (i, fault) in faults.iter().enumerate() {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (at, victim) = parts.inflict(*fault, i / FAULTS.len(), &raw).await;
        eprintln!(
            "cluster: {fault:?} on {victim} at {:.1} s",
            at.duration_since(load_started).as_secs_f64()
        );
        inflicted.push((*fault, victim, at));
        // Room to recover before the next fault, so that each is measured alone.
        let recovered_by = Instant::now() + Duration::from_secs(30);
        while Instant::now() < recovered_by && recovery(&recorder.timeline(), at).is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop_open_loop(load, &recorder).await;
    let report = recorder.report("cluster");
    eprintln!("{}", report.text());

    let timeline = recorder.timeline();
    let mut failures = Vec::new();
    for (fault, victim, at) in &inflicted {
        match recovery(&timeline, *at) {
            Some((took, refused)) => eprintln!(
                "cluster fault {fault:?} ({victim}): first 2xx after {} ms, {refused} requests refused in between",
                took.as_millis()
            ),
            None => failures.push(format!("{fault:?} ({victim}): no 2xx after it")),
        }
    }

    // Settled: every 2xx'd event is in MongoDB exactly once and the raw queue is empty.
    let accepted: Vec<(String, String)> = recorder
        .accepted_ids()
        .into_iter()
        .map(|id| ("shop-ios".to_owned(), id_string(id)))
        .collect();
    assert!(!accepted.is_empty(), "{}", report.text());
    let settled = settle_accepted(&s, &first_node, &accepted).await;
    eprintln!(
        "cluster result: {} events 2xx'd, {} missing from MongoDB, {} stored more than once; {} requests refused {:?}",
        settled.accepted,
        settled.missing,
        settled.duplicated,
        report.refused.values().sum::<u64>(),
        report.refused
    );
    failures.extend(settled.failures());
    assert!(failures.is_empty(), "{failures:#?}");
}
