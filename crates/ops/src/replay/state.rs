//! What a replay sends and how far it got, in its state file: written as it goes (a new file
//! renamed over the old, so a kill leaves one or the other whole), read by `--resume` and
//! `--status`.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What a replay sends, as the command line gave it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Only these sources; empty: every source.
    pub sources: Vec<String>,
    /// Only these sinks; `None`: every sink but statsd.
    pub sinks: Option<Vec<String>>,
    /// Events per second at most; `None`: as fast as the broker confirms.
    pub rate: Option<f64>,
    /// How long past `to` the read goes on for requests received in the range but archived
    /// later (spooled while the broker was away, or from a collector behind): it stops at the
    /// first request received after `to` plus this.
    #[serde(default = "default_grace_secs")]
    pub grace_secs: u64,
}

/// The default of `--grace`.
pub const DEFAULT_GRACE_SECS: u64 = 600;

fn default_grace_secs() -> u64 {
    DEFAULT_GRACE_SECS
}

impl Plan {
    pub fn grace(&self) -> chrono::TimeDelta {
        chrono::TimeDelta::try_seconds(i64::try_from(self.grace_secs).unwrap_or(i64::MAX))
            .unwrap_or(chrono::TimeDelta::MAX)
    }

    /// Whether an archived request of `source` received at `time` is part of the replay.
    pub fn takes(&self, time: DateTime<Utc>, source: &str) -> bool {
        time >= self.from
            && time <= self.to
            && (self.sources.is_empty() || self.sources.iter().any(|s| s == source))
    }
}

/// Where a replay stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub plan: Plan,
    /// The archive offset to read from next: every archived request before it was confirmed
    /// into the replay lane or is not part of the plan. `None`: from `plan.from`.
    pub next_offset: Option<u64>,
    /// Requests and their events confirmed into the replay lane.
    pub requests: u64,
    pub events: u64,
    /// The receive time of the last request read, sent or not.
    pub reached: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The read went past `plan.to`, or to the archive's end.
    pub finished: bool,
    /// The process sending it, while it runs.
    #[serde(default)]
    pub pid: Option<u32>,
}

impl State {
    pub fn new(plan: Plan, now: DateTime<Utc>) -> Self {
        Self {
            plan,
            next_offset: None,
            requests: 0,
            events: 0,
            reached: None,
            started_at: now,
            updated_at: now,
            finished: false,
            pid: None,
        }
    }

    /// Whether the process named in the state still runs (read from /proc; where there is
    /// none, whether the state was written in the last five seconds).
    pub fn running(&self, now: DateTime<Utc>) -> bool {
        let Some(pid) = self.pid else {
            return false;
        };
        let proc = Path::new("/proc");
        match proc.is_dir() {
            true => proc.join(pid.to_string()).is_dir(),
            false => (now - self.updated_at).num_seconds() < 5,
        }
    }

    /// The share of the range read so far, by time (0 to 1).
    pub fn fraction(&self) -> f64 {
        if self.finished {
            return 1.0;
        }
        let span = (self.plan.to - self.plan.from).num_milliseconds();
        let done = self
            .reached
            .map(|t| (t - self.plan.from).num_milliseconds())
            .unwrap_or(0);
        match span {
            ..=0 => 0.0,
            span => (done as f64 / span as f64).clamp(0.0, 1.0),
        }
    }

    /// The time left at the pace of `fraction_per_second` (share of the range read per second).
    pub fn eta(&self, fraction_per_second: f64) -> Option<Duration> {
        let left = 1.0 - self.fraction();
        (fraction_per_second > 0.0 && left.is_finite())
            .then(|| Duration::from_secs_f64((left / fraction_per_second).min(1e9)))
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read(path).map_err(|e| {
            format!(
                "cannot read the replay state {}: {e} (a replay writes it as it goes; --state names another)",
                path.display()
            )
        })?;
        serde_json::from_slice(&text)
            .map_err(|e| format!("{} is not a replay state: {e}", path.display()))
    }

    /// Writes the state to a new file beside `path`, then renames it over `path`.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut next = path.as_os_str().to_owned();
        next.push(".new");
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&next, text)?;
        std::fs::rename(&next, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::test_time as at;

    fn plan() -> Plan {
        Plan {
            from: at("2026-12-06T10:00:00Z"),
            to: at("2026-12-06T12:00:00Z"),
            sources: vec!["shop-web".into()],
            sinks: Some(vec!["crm".into()]),
            rate: Some(500.0),
            grace_secs: DEFAULT_GRACE_SECS,
        }
    }

    #[test]
    fn a_plan_takes_its_range_and_sources_only() {
        let plan = plan();
        assert!(plan.takes(at("2026-12-06T10:00:00Z"), "shop-web"));
        assert!(plan.takes(at("2026-12-06T12:00:00Z"), "shop-web"));
        assert!(!plan.takes(at("2026-12-06T09:59:59.999Z"), "shop-web"));
        assert!(!plan.takes(at("2026-12-06T12:00:00.001Z"), "shop-web"));
        assert!(!plan.takes(at("2026-12-06T11:00:00Z"), "shop-ios"));
        let every = Plan {
            sources: vec![],
            ..plan
        };
        assert!(every.takes(at("2026-12-06T11:00:00Z"), "shop-ios"));
    }

    #[test]
    fn progress_is_the_share_of_the_range_read() {
        let mut state = State::new(plan(), at("2026-12-06T13:00:00Z"));
        assert_eq!(state.fraction(), 0.0);
        state.reached = Some(at("2026-12-06T10:30:00Z"));
        assert_eq!(state.fraction(), 0.25);
        // A quarter per minute: the three quarters left take three minutes.
        assert_eq!(state.eta(0.25 / 60.0), Some(Duration::from_secs(180)));
        assert_eq!(state.eta(0.0), None);
        state.finished = true;
        assert_eq!(state.fraction(), 1.0);
    }

    #[test]
    fn a_saved_state_reads_back_and_a_bad_file_is_named() {
        let dir = std::env::temp_dir().join(format!("replay-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state.json");
        let mut state = State::new(plan(), at("2026-12-06T13:00:00Z"));
        state.next_offset = Some(42);
        state.events = 7;
        state.save(&path).expect("saved");
        assert_eq!(State::load(&path), Ok(state));
        std::fs::write(&path, b"{").expect("written");
        let error = State::load(&path).expect_err("refused");
        assert!(error.contains("is not a replay state"), "{error}");
        let missing = State::load(&dir.join("none.json")).expect_err("refused");
        assert!(
            missing.contains("cannot read the replay state"),
            "{missing}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
