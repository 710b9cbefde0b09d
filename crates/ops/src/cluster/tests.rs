use serde_json::json;

use super::*;

const N1: &str = "rabbit@n1";
const N2: &str = "rabbit@n2";
const N3: &str = "rabbit@n3";

fn members(online: &[&str]) -> Members {
    Members {
        leader: Some(N1.to_owned()),
        members: Some(vec![N1.into(), N2.into(), N3.into()]),
        online: Some(online.iter().map(|s| (*s).to_owned()).collect()),
    }
}

#[test]
fn members_are_read_from_a_quorum_queue_object_and_classic_queues_have_none() {
    // as RabbitMQ 3.10 answers GET /api/queues/%2f/q (abridged)
    let queue = json!({
        "name": "q", "type": "quorum", "vhost": "/",
        "leader": N2,
        "members": [N3, N2, N1],
        "online": [N2, N1]
    });
    let m = parse_members(&queue).expect("a quorum queue");
    assert_eq!(m.leader.as_deref(), Some(N2));
    assert_eq!(m.counts(), Some((2, 3)));
    assert_eq!(m.offline(), vec![N3]);
    assert_eq!(
        m.describe(),
        "2/3 online: rabbit@n2, rabbit@n1; offline: rabbit@n3"
    );
    assert_eq!(
        parse_members(&json!({"name": "c", "type": "classic", "node": N1})),
        None
    );
    // A quorum queue without a leader (no majority) and with a member that is not a string.
    let leaderless = json!({"type": "quorum", "members": [N1, 7, N2], "online": [N1]});
    let m = parse_members(&leaderless).expect("quorum");
    assert_eq!(m.leader, None);
    assert_eq!(m.counts(), Some((1, 2)));
}

#[test]
fn missing_member_fields_are_unknown_not_fine() {
    let no_online =
        parse_members(&json!({"type": "quorum", "members": [N1, N2, N3]})).expect("quorum");
    assert_eq!(no_online.counts(), None);
    assert_eq!(
        no_online.describe(),
        "3 members, online unknown: rabbit@n1, rabbit@n2, rabbit@n3"
    );
    let (status, text, perf) = member_status(&no_online);
    assert_eq!(status, Status::Unknown);
    assert_eq!(text, "members online unknown");
    assert_eq!(perf, "members_online=U;;;0;3");

    let bare = parse_members(&json!({"name": "q"})).expect("untyped: taken as quorum");
    assert_eq!(bare.describe(), "unknown");
    let (status, _, perf) = member_status(&bare);
    assert_eq!(status, Status::Unknown);
    assert_eq!(perf, "members_online=U;;;0;");
    let wrong_types = json!({"type": "quorum", "members": "n1", "online": {"n1": true}});
    assert_eq!(
        member_status(&parse_members(&wrong_types).expect("quorum")).0,
        Status::Unknown
    );
}

#[test]
fn a_queue_is_critical_without_a_majority_and_warning_with_any_member_offline() {
    let (status, text, perf) = member_status(&members(&[N1, N2, N3]));
    assert_eq!((status, text.as_str()), (Status::Ok, "members online 3/3"));
    assert_eq!(perf, "members_online=3;;;0;3");

    let (status, text, perf) = member_status(&members(&[N1, N2]));
    assert_eq!(status, Status::Warning);
    assert_eq!(text, "members online 2/3 (offline: rabbit@n3)");
    assert_eq!(perf, "members_online=2;;;0;3");

    let (status, text, perf) = member_status(&members(&[N1]));
    assert_eq!(status, Status::Critical);
    assert!(
        text.starts_with("members online 1/3 (offline: rabbit@n2, rabbit@n3; no majority"),
        "{text}"
    );
    assert_eq!(perf, "members_online=1;;;0;3");
    assert_eq!(member_status(&members(&[])).0, Status::Critical);

    // Two of four is not a majority; five of five members with three up is.
    let four = Members {
        leader: None,
        members: Some(vec!["a".into(), "b".into(), "c".into(), "d".into()]),
        online: Some(vec!["a".into(), "b".into()]),
    };
    assert_eq!(member_status(&four).0, Status::Critical);
    let five = Members {
        leader: None,
        members: Some(["a", "b", "c", "d", "e"].map(String::from).to_vec()),
        online: Some(["a", "b", "c"].map(String::from).to_vec()),
    };
    assert_eq!(member_status(&five).0, Status::Warning);
    // An online node that is not a member does not count.
    assert_eq!(
        member_status(&members(&[N1, "rabbit@n9"])).0,
        Status::Critical
    );
}

#[test]
fn members_join_a_queue_check_with_the_worse_state_and_their_perfdata() {
    let depth_ok = "QUEUE OK - a.raw depth=3 consumers=1 | depth=3;5;10;0; consumers=1;;;0;";
    let (status, line) = with_members(Status::Ok, depth_ok, Ok(&members(&[N1, N2])));
    assert_eq!(status, Status::Warning);
    assert_eq!(
        line,
        "QUEUE WARNING - a.raw depth=3 consumers=1 members online 2/3 (offline: rabbit@n3) | depth=3;5;10;0; consumers=1;;;0; members_online=2;;;0;3"
    );
    let (status, line) = with_members(Status::Ok, depth_ok, Ok(&members(&[N1, N2, N3])));
    assert_eq!(status, Status::Ok);
    assert!(
        line.starts_with("QUEUE OK - a.raw depth=3 consumers=1 members online 3/3 | "),
        "{line}"
    );

    // A critical depth stays critical with a member offline; a lost majority is critical
    // whatever the depth.
    let depth_critical = depth_ok.replace("QUEUE OK", "QUEUE CRITICAL");
    assert_eq!(
        with_members(Status::Critical, &depth_critical, Ok(&members(&[N1, N2]))).0,
        Status::Critical
    );
    let (status, line) = with_members(Status::Ok, depth_ok, Ok(&members(&[N3])));
    assert_eq!(status, Status::Critical);
    assert!(
        line.starts_with("QUEUE CRITICAL - a.raw depth=3 "),
        "{line}"
    );

    // Members that cannot be read make an OK check UNKNOWN, not a WARNING one.
    let (status, line) = with_members(Status::Ok, depth_ok, Err("management API: 401 | x"));
    assert_eq!(status, Status::Unknown);
    assert_eq!(
        line,
        "QUEUE UNKNOWN - a.raw depth=3 consumers=1 members unknown (management API: 401 / x) | depth=3;5;10;0; consumers=1;;;0; members_online=U;;;0;"
    );
    let depth_warning = depth_ok.replace("QUEUE OK", "QUEUE WARNING");
    assert_eq!(
        with_members(Status::Warning, &depth_warning, Err("down")).0,
        Status::Warning
    );

    // A check line without perfdata (a drain time not known yet) gets it.
    let (status, line) = with_members(
        Status::Unknown,
        "QUEUE UNKNOWN - a.raw: no rates from the broker yet",
        Ok(&members(&[N1])),
    );
    assert_eq!(status, Status::Critical);
    assert!(
        line.starts_with("QUEUE CRITICAL - a.raw: no rates from the broker yet members online 1/3"),
        "{line}"
    );
    assert!(line.ends_with(" | members_online=1;;;0;3"), "{line}");
}

#[test]
fn worst_ranks_critical_warning_unknown_ok() {
    use Status::*;
    assert_eq!(worst(Ok, Unknown), Unknown);
    assert_eq!(worst(Unknown, Warning), Warning);
    assert_eq!(worst(Critical, Unknown), Critical);
    assert_eq!(worst(Warning, Ok), Warning);
}

/// A node as RabbitMQ 3.10's GET /api/nodes gives it with its management agent (abridged).
fn full_node(name: &str) -> Value {
    json!({
        "name": name, "type": "disc", "running": true,
        "partitions": [], "mem_alarm": false, "disk_free_alarm": false,
        "mem_used": 123456, "cluster_links": []
    })
}

fn check(nodes: Value, alarms: Option<Value>) -> (Status, String) {
    let nodes = parse_nodes(&nodes).expect("a list");
    let alarms = alarms.map(|a| parse_alarms(&a).expect("an alarm answer"));
    check_cluster(&nodes, alarms.as_deref())
}

#[test]
fn a_healthy_cluster_is_ok_with_the_documented_line() {
    let (status, line) = check(json!([full_node(N1), full_node(N2), full_node(N3)]), None);
    assert_eq!(status, Status::Ok);
    assert_eq!(
        line,
        "CLUSTER OK - 3/3 nodes running, no partitions, no alarms | nodes_running=3;;;0;3 partitions=0;;;0; alarms=0;;;0;"
    );
}

#[test]
fn a_stopped_node_a_partition_or_an_alarm_is_critical() {
    let stopped =
        json!([full_node(N1), full_node(N2), {"name": N3, "type": "disc", "running": false}]);
    let (status, line) = check(stopped, None);
    assert_eq!(status, Status::Critical);
    assert_eq!(
        line,
        "CLUSTER CRITICAL - 2/3 nodes running (not running: rabbit@n3), no partitions, no alarms | nodes_running=2;;;0;3 partitions=0;;;0; alarms=0;;;0;"
    );

    let mut n1 = full_node(N1);
    n1["partitions"] = json!([N2]);
    let mut n2 = full_node(N2);
    n2["partitions"] = json!([N1]);
    let (status, line) = check(json!([n1, n2, full_node(N3)]), None);
    assert_eq!(status, Status::Critical);
    assert!(
        line.contains(", network partition: rabbit@n1 cannot reach rabbit@n2; rabbit@n2 cannot reach rabbit@n1, no alarms |"),
        "{line}"
    );
    assert!(line.contains(" partitions=2;;;0; "), "{line}");

    let mut n2 = full_node(N2);
    n2["mem_alarm"] = json!(true);
    let mut n3 = full_node(N3);
    n3["disk_free_alarm"] = json!(true);
    let (status, line) = check(json!([full_node(N1), n2, n3]), None);
    assert_eq!(status, Status::Critical);
    assert!(
        line.contains(", alarms: disk on rabbit@n3, memory on rabbit@n2 (publishing is blocked) |"),
        "{line}"
    );
    assert!(line.ends_with(" alarms=2;;;0;"), "{line}");
}

#[test]
fn nodes_without_statistics_rely_on_the_cluster_wide_alarm_check() {
    // Only n1 runs the management agent: n2 and n3 give their name and `running` only.
    let partial = json!([
        full_node(N1),
        {"name": N2, "type": "disc", "running": true},
        {"name": N3, "type": "disc", "running": true}
    ]);
    let (status, line) = check(partial.clone(), Some(json!({"status": "ok"})));
    assert_eq!(status, Status::Ok, "{line}");
    assert_eq!(
        line,
        "CLUSTER OK - 3/3 nodes running, no partitions, no alarms (no statistics from rabbit@n2, rabbit@n3: partitions as the other nodes see them) | nodes_running=3;;;0;3 partitions=0;;;0; alarms=0;;;0;"
    );
    let alarm = json!({
        "status": "failed",
        "reason": "There are alarms in effect in the cluster",
        "alarms": [{"node": N3, "resource": "memory"}]
    });
    let (status, line) = check(partial.clone(), Some(alarm));
    assert_eq!(status, Status::Critical);
    assert!(
        line.contains("alarms: memory on rabbit@n3 (publishing is blocked)"),
        "{line}"
    );
    // Without the cluster-wide check, their alarms are unknown.
    let (status, line) = check(partial, None);
    assert_eq!(status, Status::Unknown);
    assert!(
        line.contains(", alarms unknown") && line.ends_with(" alarms=U;;;0;"),
        "{line}"
    );
}

#[test]
fn what_the_api_leaves_out_is_unknown() {
    let (status, line) = check(json!([]), None);
    assert_eq!(status, Status::Unknown);
    assert!(line.starts_with("CLUSTER UNKNOWN - "), "{line}");
    assert_eq!(parse_nodes(&json!({"error": "not_authorised"})), None);

    // No node gives statistics: partitions cannot be told.
    let bare = json!([{"name": N1, "running": true}, {"name": N2}]);
    let (status, line) = check(bare, Some(json!({"status": "ok"})));
    assert_eq!(status, Status::Unknown);
    assert!(
        line.contains(
            "1/2 nodes running (state unknown: rabbit@n2), partitions unknown, no alarms"
        ),
        "{line}"
    );
    assert!(line.contains(" partitions=U;;;0; "), "{line}");
    // ... but a stopped node is critical even so.
    let (status, _) = check(
        json!([{"name": N1, "running": true}, {"name": N2, "running": false}]),
        None,
    );
    assert_eq!(status, Status::Critical);

    assert_eq!(
        parse_alarms(&json!({"status": "failed", "reason": "timeout"})),
        None
    );
    assert_eq!(parse_alarms(&json!({"error": "Object Not Found"})), None);
    let odd = parse_alarms(&json!({"status": "failed", "alarms": [{}]})).expect("a list");
    assert_eq!(
        odd,
        vec![Alarm {
            resource: "resource".into(),
            node: "(unnamed node)".into()
        }]
    );
}

#[test]
fn queues_json_gives_leader_members_and_online_beside_depth() {
    let state = crate::QueueState {
        name: "a.raw".into(),
        depth: 0,
        consumers: 1,
        rates: None,
        members: Some(members(&[N1, N2])),
    };
    assert_eq!(
        serde_json::to_value(&state).expect("json"),
        json!({
            "name": "a.raw", "depth": 0, "consumers": 1,
            "leader": N1, "members": [N1, N2, N3], "online": [N1, N2]
        })
    );
    let classic = crate::QueueState {
        members: None,
        ..state
    };
    assert_eq!(
        serde_json::to_value(&classic).expect("json"),
        json!({"name": "a.raw", "depth": 0, "consumers": 1})
    );
}
