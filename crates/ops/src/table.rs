//! The text table of `ingestctl queues`.

use crate::QueueState;

/// One line per queue: depth, consumers, rates (`-` without the management API's figures),
/// and, only when the management API gave any queue's members, its leader and members.
pub fn render(states: &[QueueState]) -> String {
    let width = states
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let replicas: Vec<Option<(String, String)>> = states
        .iter()
        .map(|s| {
            s.members.as_ref().map(|m| {
                let leader = m.leader.clone().unwrap_or_else(|| "-".into());
                (leader, m.describe())
            })
        })
        .collect();
    let leader_width = replicas
        .iter()
        .flatten()
        .map(|(leader, _)| leader.len())
        .max();
    let columns = |leader: &str, members: &str| match leader_width {
        Some(w) => format!("  {leader:<w$}  {members}", w = w.max(6)),
        None => String::new(),
    };
    let mut out = format!(
        "{:<width$}  {:>10}  {:>9}  {:>10}  {:>10}  {:>10}{}\n",
        "queue",
        "depth",
        "consumers",
        "publish/s",
        "deliver/s",
        "ack/s",
        columns("leader", "members")
    );
    for (s, replicas) in states.iter().zip(replicas) {
        let [publish, deliver, ack] = match s.rates {
            Some(r) => [r.publish, r.deliver, r.ack].map(|v| format!("{v:.1}")),
            None => ["-", "-", "-"].map(str::to_owned),
        };
        let (leader, members) = replicas.unwrap_or_else(|| ("-".into(), "-".into()));
        out.push_str(&format!(
            "{:<width$}  {:>10}  {:>9}  {:>10}  {:>10}  {:>10}{}\n",
            s.name,
            s.depth,
            s.consumers,
            publish,
            deliver,
            ack,
            columns(&leader, &members)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Members;
    use crate::Rates;

    fn state(name: &str, members: Option<Members>) -> QueueState {
        QueueState {
            name: name.into(),
            depth: 12,
            consumers: 2,
            rates: None,
            members,
        }
    }

    #[test]
    fn without_members_the_table_is_as_before() {
        let mut raw = state("a.raw", None);
        raw.rates = Some(Rates {
            publish: 1.0,
            deliver: 2.0,
            ack: 3.0,
        });
        assert_eq!(
            render(&[raw, state("a.invalid", None)]),
            "queue           depth  consumers   publish/s   deliver/s       ack/s\n\
             a.raw              12          2         1.0         2.0         3.0\n\
             a.invalid          12          2           -           -           -\n"
        );
    }

    #[test]
    fn quorum_queues_show_leader_and_members_online_or_not() {
        let members = |online: &[&str]| Members {
            leader: Some("rabbit@n1".into()),
            members: Some(vec!["rabbit@n1".into(), "rabbit@n2".into()]),
            online: Some(online.iter().map(|s| (*s).to_owned()).collect()),
        };
        let table = render(&[
            state("a.raw", Some(members(&["rabbit@n1", "rabbit@n2"]))),
            state("a.invalid", Some(members(&["rabbit@n1"]))),
            state("a.classic", None),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].ends_with("ack/s  leader     members"), "{table}");
        assert!(
            lines[1].ends_with("  rabbit@n1  2/2 online: rabbit@n1, rabbit@n2"),
            "{table}"
        );
        assert!(
            lines[2].ends_with("  rabbit@n1  1/2 online: rabbit@n1; offline: rabbit@n2"),
            "{table}"
        );
        assert!(lines[3].ends_with("  -          -"), "{table}");
    }
}
