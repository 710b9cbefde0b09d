//! Memory and CPU time of a process as Linux reports them (`/proc/PID/status`,
//! `/proc/PID/stat`), and many idle keep-alive connections to measure what they cost the
//! collector.

use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Memory {
    /// Resident set size now, KiB.
    pub rss_kb: u64,
    /// Peak resident set size, KiB.
    pub hwm_kb: u64,
}

/// `VmRSS` and `VmHWM` of a process; `None` if it is gone.
pub fn memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(Memory {
        rss_kb: field("VmRSS:")?,
        hwm_kb: field("VmHWM:")?,
    })
}

/// CPU time a process has used so far (all its threads), in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CpuTime {
    pub user_s: f64,
    pub system_s: f64,
}

impl CpuTime {
    pub fn total_s(self) -> f64 {
        self.user_s + self.system_s
    }

    /// The CPU time used between `earlier` and `self`.
    pub fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user_s: (self.user_s - earlier.user_s).max(0.0),
            system_s: (self.system_s - earlier.system_s).max(0.0),
        }
    }
}

/// `utime` and `stime` (clock ticks) from the text of `/proc/PID/stat`. The command name
/// (field 2) is in parentheses and may hold spaces or parentheses itself, so the fields are
/// counted from after its last `)`: the state is field 3, `utime` 14, `stime` 15.
pub fn parse_stat_ticks(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(14 - 3);
    let utime = fields.next()?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 if that cannot be run).
pub fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse::<f64>().ok())
            .filter(|ticks| *ticks > 0.0)
            .unwrap_or(100.0)
    })
}

/// User and system CPU time of a process so far; `None` if it is gone.
pub fn cpu(pid: u32) -> Option<CpuTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (utime, stime) = parse_stat_ticks(&stat)?;
    let ticks = clock_ticks();
    Some(CpuTime {
        user_s: utime as f64 / ticks,
        system_s: stime as f64 / ticks,
    })
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Connections {
    pub wanted: usize,
    /// Connections that answered `GET /healthz` and were held open.
    pub open: usize,
    pub failed: usize,
    /// Of the process named by `pid`, while they were all open.
    pub memory: Option<Memory>,
}

/// Opens `count` keep-alive connections to `addr`, sends one `GET /healthz` on each, holds
/// them `hold`, and reads the memory of `pid` meanwhile.
pub async fn hold_connections(
    addr: std::net::SocketAddr,
    count: usize,
    hold: Duration,
    pid: Option<u32>,
    header_bytes: usize,
) -> Connections {
    // With `header_bytes`, each connection then starts a request whose head never ends: one
    // header line of that many bytes, which the collector must hold until its header timeout.
    let unfinished_head = (header_bytes > 0).then(|| {
        let mut head = b"POST /v1/batch HTTP/1.1\r\nHost: collector\r\nX-Padding: ".to_vec();
        head.resize(head.len() + header_bytes, b'a');
        std::sync::Arc::new(head)
    });
    let open = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let open = open.clone();
        let unfinished_head = unfinished_head.clone();
        tasks.spawn(async move {
            let permit = open.acquire_owned().await.ok()?;
            let mut stream = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            .ok()?
            .ok()?;
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: collector\r\n\r\n")
                .await
                .ok()?;
            let mut buffer = [0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
                .await
                .ok()?
                .ok()?;
            drop(permit);
            if !buffer[..n].starts_with(b"HTTP/1.1 200") {
                return None;
            }
            if let Some(head) = unfinished_head {
                stream.write_all(&head).await.ok()?;
            }
            Some(stream)
        });
    }
    let mut streams = Vec::with_capacity(count);
    let mut failed = 0;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Some(stream)) => streams.push(stream),
            _ => failed += 1,
        }
    }
    tokio::time::sleep(hold).await;
    let memory = pid.and_then(memory);
    Connections {
        wanted: count,
        open: streams.len(),
        failed,
        memory,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utime_and_stime_are_read_after_the_command_name() {
        let stat = "4242 (tokio (rt) w) S 1 4242 4242 0 -1 4194560 9000 0 0 0 1234 567 0 0 20 0 9 0 100 0 0";
        assert_eq!(super::parse_stat_ticks(stat), Some((1234, 567)));
        assert_eq!(super::parse_stat_ticks("4242 (worker) S 1 2"), None);
    }

    #[test]
    fn the_own_process_is_read_and_a_gone_one_is_none() {
        assert!(super::cpu(std::process::id()).is_some());
        assert!(super::cpu(u32::MAX).is_none());
        let (earlier, later) = (
            super::CpuTime {
                user_s: 1.0,
                system_s: 0.5,
            },
            super::CpuTime {
                user_s: 3.0,
                system_s: 0.75,
            },
        );
        assert_eq!(later.since(earlier).total_s(), 2.25);
    }
}
