//! A RabbitMQ cluster as ops see it through the management API: each quorum queue's members
//! (`ingestctl queues`, `check --queue`) and the nodes' health (`check --cluster`). Parsing
//! takes every field of the API's answers as possibly missing: what is missing is unknown,
//! never fine.

use std::collections::BTreeSet;

use serde::Serialize;
use serde_json::Value;

use crate::Status;

/// A quorum queue's replicas: `leader`, `members` and `online` of the management API's queue
/// object, each `None` when the API did not give it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Members {
    pub leader: Option<String>,
    pub members: Option<Vec<String>>,
    /// The members that are up.
    pub online: Option<Vec<String>>,
}

fn strings(value: Option<&Value>) -> Option<Vec<String>> {
    let items = value?.as_array()?;
    Some(
        items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
    )
}

/// The replicas of a management API queue object; `None` for a queue that is not a quorum
/// queue (classic, stream). An object without a `type` is taken as a quorum queue whose
/// members are unknown, since every pipeline queue is one.
pub fn parse_members(queue: &Value) -> Option<Members> {
    match queue.get("type").and_then(Value::as_str) {
        Some("quorum") | None => {}
        Some(_) => return None,
    }
    Some(Members {
        leader: queue
            .get("leader")
            .and_then(Value::as_str)
            .map(str::to_owned),
        members: strings(queue.get("members")),
        online: strings(queue.get("online")),
    })
}

impl Members {
    /// (online members, members), when both are known.
    pub fn counts(&self) -> Option<(usize, usize)> {
        let members = self.members.as_ref().filter(|m| !m.is_empty())?;
        let online = self.online.as_ref()?;
        let up = members.iter().filter(|m| online.contains(m)).count();
        Some((up, members.len()))
    }

    /// Members not online (every member while `online` is unknown).
    pub fn offline(&self) -> Vec<&str> {
        let online = self.online.as_deref().unwrap_or_default();
        self.members
            .iter()
            .flatten()
            .filter(|m| !online.contains(m))
            .map(String::as_str)
            .collect()
    }

    /// The `members` column of `ingestctl queues`: `2/3 online: a, b; offline: c`.
    pub fn describe(&self) -> String {
        let Some(members) = self.members.as_ref().filter(|m| !m.is_empty()) else {
            return "unknown".to_owned();
        };
        let Some((up, total)) = self.counts() else {
            return format!(
                "{} members, online unknown: {}",
                members.len(),
                members.join(", ")
            );
        };
        let offline = self.offline();
        let online: Vec<&str> = members
            .iter()
            .map(String::as_str)
            .filter(|m| !offline.contains(m))
            .collect();
        let mut text = format!("{up}/{total} online: {}", online.join(", "));
        if up < total {
            text.push_str(&format!("; offline: {}", offline.join(", ")));
        }
        text
    }
}

/// Nagios states by how bad they are: CRITICAL, WARNING, UNKNOWN, OK (the monitoring-plugins'
/// `max_state_alt`), so that what can be told wins over what cannot.
pub fn worst(a: Status, b: Status) -> Status {
    let rank = |s: Status| match s {
        Status::Ok => 0,
        Status::Unknown => 1,
        Status::Warning => 2,
        Status::Critical => 3,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

/// A quorum queue's state from its members: CRITICAL with fewer than a majority online (it
/// can neither take publishes nor confirm them), WARNING with some member offline, UNKNOWN
/// when the API did not say; the text and the `members_online` perfdata.
pub fn member_status(members: &Members) -> (Status, String, String) {
    let total = members.members.as_ref().map_or(0, Vec::len);
    let max = if total > 0 {
        total.to_string()
    } else {
        String::new()
    };
    let Some((up, total)) = members.counts() else {
        let what = if total == 0 {
            "members unknown"
        } else {
            "members online unknown"
        };
        return (
            Status::Unknown,
            what.to_owned(),
            format!("members_online=U;;;0;{max}"),
        );
    };
    let perf = format!("members_online={up};;;0;{total}");
    let offline = members.offline().join(", ");
    if up == total {
        (Status::Ok, format!("members online {up}/{total}"), perf)
    } else if up > total / 2 {
        (
            Status::Warning,
            format!("members online {up}/{total} (offline: {offline})"),
            perf,
        )
    } else {
        (
            Status::Critical,
            format!(
                "members online {up}/{total} (offline: {offline}; no majority: publishes are not confirmed)"
            ),
            perf,
        )
    }
}

/// A queue check's result (`QUEUE STATE - text | perfdata`) with the queue's members added:
/// the worse of the two states, their text after the check's, `members_online` after its
/// perfdata. `Err` is why the members could not be read.
pub fn with_members(
    status: Status,
    line: &str,
    members: Result<&Members, &str>,
) -> (Status, String) {
    let (member, text, perf) = match members {
        Ok(members) => member_status(members),
        Err(why) => (
            Status::Unknown,
            format!("members unknown ({})", why.replace('|', "/")),
            "members_online=U;;;0;".to_owned(),
        ),
    };
    let status = worst(status, member);
    let (head, perfdata) = match line.split_once(" | ") {
        Some((head, perfdata)) => (head, Some(perfdata)),
        None => (line, None),
    };
    // `QUEUE OK - rest`: the state label is the head's second word.
    let rest = head.split_once(" - ").map_or(head, |(_, rest)| rest);
    let service = head.split(' ').next().unwrap_or("QUEUE");
    let perfdata = match perfdata {
        Some(existing) => format!("{existing} {perf}"),
        None => perf,
    };
    let line = format!("{service} {} - {rest} {text} | {perfdata}", status.label());
    (status, line)
}

/// One node of `GET /api/nodes`. A node without the management agent (or not running) gives
/// only its name and `running`: the other fields are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub running: Option<bool>,
    /// The nodes this one cannot reach although they are in the cluster.
    pub partitions: Option<Vec<String>>,
    pub mem_alarm: Option<bool>,
    pub disk_free_alarm: Option<bool>,
}

/// The nodes of a `GET /api/nodes` answer; `None` when it is not a list.
pub fn parse_nodes(answer: &Value) -> Option<Vec<Node>> {
    let nodes = answer.as_array()?;
    Some(
        nodes
            .iter()
            .map(|node| Node {
                name: node
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("(unnamed node)")
                    .to_owned(),
                running: node.get("running").and_then(Value::as_bool),
                partitions: strings(node.get("partitions")),
                mem_alarm: node.get("mem_alarm").and_then(Value::as_bool),
                disk_free_alarm: node.get("disk_free_alarm").and_then(Value::as_bool),
            })
            .collect(),
    )
}

/// A resource alarm in effect: `memory` or `disk` on a node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Alarm {
    pub resource: String,
    pub node: String,
}

/// The alarms of a `GET /api/health/checks/alarms` answer (`{"status":"ok"}`, or `failed`
/// with `alarms`); `None` when it says neither (a failed check without a list: unknown).
pub fn parse_alarms(answer: &Value) -> Option<Vec<Alarm>> {
    match answer.get("status").and_then(Value::as_str)? {
        "ok" => Some(Vec::new()),
        "failed" => Some(
            answer
                .get("alarms")?
                .as_array()?
                .iter()
                .map(|alarm| Alarm {
                    resource: alarm
                        .get("resource")
                        .and_then(Value::as_str)
                        .unwrap_or("resource")
                        .to_owned(),
                    node: alarm
                        .get("node")
                        .and_then(Value::as_str)
                        .unwrap_or("(unnamed node)")
                        .to_owned(),
                })
                .collect(),
        ),
        _ => None,
    }
}

/// `check --cluster`: CRITICAL for a node not running, a network partition seen by any node or
/// a resource alarm (publishing is blocked in the whole cluster); UNKNOWN when the API leaves
/// any of these untold; OK otherwise. `cluster_alarms` is the cluster-wide alarm list when the
/// API has it: it covers nodes that give no statistics of their own.
pub fn check_cluster(nodes: &[Node], cluster_alarms: Option<&[Alarm]>) -> (Status, String) {
    if nodes.is_empty() {
        return (
            Status::Unknown,
            "CLUSTER UNKNOWN - the management API lists no nodes".to_owned(),
        );
    }
    let names = |filter: &dyn Fn(&Node) -> bool| -> Vec<&str> {
        nodes
            .iter()
            .filter(|n| filter(n))
            .map(|n| n.name.as_str())
            .collect()
    };
    let running: Vec<&Node> = nodes.iter().filter(|n| n.running == Some(true)).collect();
    let stopped = names(&|n| n.running == Some(false));
    let state_unknown = names(&|n| n.running.is_none());
    // Partitions, as each running node with statistics sees them.
    let seen: Vec<(&str, &Vec<String>)> = running
        .iter()
        .filter_map(|n| n.partitions.as_ref().map(|p| (n.name.as_str(), p)))
        .collect();
    let partitioned: Vec<String> = seen
        .iter()
        .filter(|(_, p)| !p.is_empty())
        .map(|(node, p)| format!("{node} cannot reach {}", p.join(", ")))
        .collect();
    let without_statistics: Vec<&str> = running
        .iter()
        .filter(|n| n.partitions.is_none())
        .map(|n| n.name.as_str())
        .collect();
    let mut alarms: BTreeSet<Alarm> = cluster_alarms.unwrap_or_default().iter().cloned().collect();
    for node in &running {
        for (raised, resource) in [(node.mem_alarm, "memory"), (node.disk_free_alarm, "disk")] {
            if raised == Some(true) {
                alarms.insert(Alarm {
                    resource: resource.to_owned(),
                    node: node.name.clone(),
                });
            }
        }
    }
    let alarms_known = cluster_alarms.is_some()
        || running
            .iter()
            .all(|n| n.mem_alarm.is_some() && n.disk_free_alarm.is_some());
    let partitions_known = !seen.is_empty() || running.is_empty();

    let mut status = Status::Ok;
    if !state_unknown.is_empty() || !partitions_known || !alarms_known {
        status = Status::Unknown;
    }
    if !stopped.is_empty() || !partitioned.is_empty() || !alarms.is_empty() {
        status = Status::Critical;
    }

    let mut text = format!("{}/{} nodes running", running.len(), nodes.len());
    if !stopped.is_empty() {
        text.push_str(&format!(" (not running: {})", stopped.join(", ")));
    }
    if !state_unknown.is_empty() {
        text.push_str(&format!(" (state unknown: {})", state_unknown.join(", ")));
    }
    text.push_str(&if !partitioned.is_empty() {
        format!(", network partition: {}", partitioned.join("; "))
    } else if partitions_known {
        ", no partitions".to_owned()
    } else {
        ", partitions unknown".to_owned()
    });
    text.push_str(&if !alarms.is_empty() {
        let list: Vec<String> = alarms
            .iter()
            .map(|a| format!("{} on {}", a.resource, a.node))
            .collect();
        format!(", alarms: {} (publishing is blocked)", list.join(", "))
    } else if alarms_known {
        ", no alarms".to_owned()
    } else {
        ", alarms unknown".to_owned()
    });
    if partitions_known && !without_statistics.is_empty() {
        text.push_str(&format!(
            " (no statistics from {}: partitions as the other nodes see them)",
            without_statistics.join(", ")
        ));
    }
    let count = |known: bool, n: usize| if known { n.to_string() } else { "U".into() };
    let line = format!(
        "CLUSTER {} - {text} | nodes_running={};;;0;{} partitions={};;;0; alarms={};;;0;",
        status.label(),
        running.len(),
        nodes.len(),
        count(partitions_known, partitioned.len()),
        count(alarms_known || !alarms.is_empty(), alarms.len()),
    );
    (status, line)
}

#[cfg(test)]
mod tests;
