//! `ingestctl` against a three-node RabbitMQ cluster with the management API on node 1: the
//! queue listing shows each quorum queue's leader and members, `check --cluster` reports the
//! nodes, and `check --queue` turns WARNING when a member is offline and CRITICAL when a
//! majority is. Nodes 3 and then 2 are stopped cleanly; node 1 answers the management API, so
//! it stays up.

use std::time::{Duration, Instant};

use ingest_e2e::*;
use ingest_pipeline::{Secret, Settings, Topology};

/// Runs `ingestctl args` until `done(status, stdout)` holds (the management API's statistics
/// take a few seconds to follow a node), for up to a minute; the last status and output come
/// back either way.
async fn ingestctl_until(
    s: &Settings,
    args: &[&str],
    done: impl Fn(i32, &str) -> bool,
) -> (bool, i32, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, out) = ingestctl_async(s, args).await;
        if done(status, &out) {
            return (true, status, out);
        }
        if Instant::now() >= deadline {
            return (false, status, out);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One plugin line: text without `|`, then perfdata after ` | `.
fn assert_one_plugin_line(out: &str) {
    assert_eq!(out.lines().count(), 1, "{out}");
    let (text, perf) = out.trim_end().split_once(" | ").expect("perfdata");
    assert!(!text.contains('|') && !perf.contains('|'), "{out}");
}

fn node_name(node: &RabbitNode) -> String {
    format!("{}@localhost", node.name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_check_and_queue_members_follow_nodes_going_down() {
    let mut cluster = tokio::task::block_in_place(RabbitCluster::start_with_management);
    let mut s = settings("opscluster");
    s.broker.url = Secret::new(cluster.nodes[0].url());
    s.broker.urls = cluster.urls(5).into_iter().map(Secret::new).collect();
    s.broker.management_url = cluster.management_url().map(Secret::new);
    let (connection, _channel) = channel(&cluster.nodes[0].url()).await;
    Topology::from_settings(&s.broker)
        .declare(&connection)
        .await
        .unwrap();
    let _ = connection.close(200, "".into()).await;
    let raw = format!("{}.raw", s.broker.prefix);
    let names: Vec<String> = cluster.nodes.iter().map(node_name).collect();

    // A fresh cluster: OK, and each queue has a member on every node, all online.
    let (ok, status, out) = ingestctl_until(&s, &["check", "--cluster"], |status, out| {
        status == 0 && out.starts_with("CLUSTER OK - 3/3 nodes running, no partitions, no alarms")
    })
    .await;
    assert!(ok, "status {status}: {out}");
    assert!(
        out.contains(" | nodes_running=3;;;0;3 partitions=0;;;0; alarms=0;;;0;"),
        "{out}"
    );
    assert_one_plugin_line(&out);

    let (status, out) = ingestctl_async(&s, &["queues", "--json"]).await;
    assert_eq!(status, 0, "{out}");
    let queues: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let queue = queues
        .iter()
        .find(|q| q["name"] == raw)
        .expect("raw listed");
    let mut members: Vec<&str> = queue["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    members.sort_unstable();
    assert_eq!(members, names, "{queue}");
    assert_eq!(queue["online"].as_array().map(Vec::len), Some(3), "{queue}");
    let leader = queue["leader"].as_str().expect("a leader");
    assert!(names.iter().any(|n| n == leader), "{queue}");
    let (status, out) = ingestctl_async(&s, &["queues"]).await;
    assert_eq!(status, 0, "{out}");
    let header = out.lines().next().unwrap();
    assert!(
        header.contains("  leader ") && header.ends_with("  members"),
        "{out}"
    );
    let row = out
        .lines()
        .find(|l| l.starts_with(&format!("{raw} ")))
        .expect("raw row");
    assert!(row.contains("3/3 online: "), "{row}");

    let (status, out) = ingestctl_async(&s, &["check", "--queue", "raw"]).await;
    assert_eq!(status, 0, "{out}");
    assert!(out.contains(" members online 3/3 | "), "{out}");
    assert!(out.trim_end().ends_with(" members_online=3;;;0;3"), "{out}");
    assert_one_plugin_line(&out);

    // Node 3 down: the cluster is CRITICAL, naming it; the queue keeps a majority: WARNING.
    tokio::task::block_in_place(|| cluster.nodes[2].stop());
    let (ok, status, out) =
        ingestctl_until(&s, &["check", "--cluster"], |status, _| status == 2).await;
    assert!(ok, "status {status}: {out}");
    assert!(
        out.starts_with(&format!(
            "CLUSTER CRITICAL - 2/3 nodes running (not running: {})",
            names[2]
        )),
        "{out}"
    );
    assert!(out.contains(" | nodes_running=2;;;0;3 "), "{out}");
    assert_one_plugin_line(&out);
    let (ok, status, out) =
        ingestctl_until(&s, &["check", "--queue", "raw"], |status, _| status == 1).await;
    assert!(ok, "status {status}: {out}");
    assert!(
        out.starts_with(&format!(
            "QUEUE WARNING - {raw} depth=0 consumers=0 members online 2/3 (offline: {})",
            names[2]
        )),
        "{out}"
    );
    assert!(out.trim_end().ends_with(" members_online=2;;;0;3"), "{out}");
    assert_one_plugin_line(&out);
    let (status, out) = ingestctl_async(&s, &["queues"]).await;
    assert_eq!(status, 0, "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with(&format!("{raw} ")))
        .expect("raw row");
    assert!(
        row.contains("2/3 online: ") && row.ends_with(&format!("; offline: {}", names[2])),
        "{row}"
    );

    // Node 2 down as well: one member of three, no majority: CRITICAL.
    tokio::task::block_in_place(|| cluster.nodes[1].stop());
    let (ok, status, out) = ingestctl_until(&s, &["check", "--queue", "raw"], |status, out| {
        status == 2 && out.contains("members online 1/3")
    })
    .await;
    assert!(ok, "status {status}: {out}");
    assert!(
        out.starts_with(&format!("QUEUE CRITICAL - {raw} ")),
        "{out}"
    );
    for name in &names[1..] {
        assert!(out.contains(name.as_str()), "{name} not named: {out}");
    }
    assert!(out.trim_end().ends_with(" members_online=1;;;0;3"), "{out}");
    assert_one_plugin_line(&out);
    let (status, out) = ingestctl_async(&s, &["check", "--cluster"]).await;
    assert_eq!(status, 2, "{out}");
    assert!(
        out.starts_with("CLUSTER CRITICAL - 1/3 nodes running"),
        "{out}"
    );
}
