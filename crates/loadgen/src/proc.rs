//! Memory of a process as Linux reports it (`/proc/PID/status`), and many idle keep-alive
//! connections to measure what they cost the collector.

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
) -> Connections {
    let open = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let open = open.clone();
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
            buffer[..n].starts_with(b"HTTP/1.1 200").then_some(stream)
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
