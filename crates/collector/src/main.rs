use anyhow::Context;
use ingest_pipeline::{shutdown, telemetry, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load().context("loading configuration")?;
    telemetry::init(&settings.log);
    settings.validate_collector()?;
    raise_open_files_limit(settings.collector.max_connections);
    let listener = tokio::net::TcpListener::bind(settings.collector.listen)
        .await
        .with_context(|| format!("binding {}", settings.collector.listen))?;
    collector::serve(settings, listener, shutdown::signal()).await
}

/// Every connection is a file descriptor: below `max_connections` (plus some for the broker,
/// logs and the listener) the cap would never be reached and accept would fail instead. Raises
/// the soft limit as far as the hard limit allows; the rest is the operator's to raise.
fn raise_open_files_limit(max_connections: usize) {
    let wanted = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(256);
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, _)) if soft >= wanted => {}
        Ok((soft, hard)) => match rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard) {
            Ok(()) if hard >= wanted => {
                tracing::info!(from = soft, to = hard, "raised the open-files limit");
            }
            Ok(()) => tracing::warn!(
                limit = hard,
                max_connections,
                "the open-files hard limit leaves no room for collector.max_connections plus 256 other files; raise it (ulimit -n) or lower max_connections"
            ),
            Err(error) => tracing::warn!(%error, soft, "could not raise the open-files limit"),
        },
        Err(error) => tracing::warn!(%error, "could not read the open-files limit"),
    }
}
