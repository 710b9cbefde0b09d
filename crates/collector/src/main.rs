use anyhow::Context;
use ingest_pipeline::{shutdown, telemetry, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load().context("loading configuration")?;
    telemetry::init(&settings.log);
    settings.validate_collector()?;
    let listener = tokio::net::TcpListener::bind(settings.collector.listen)
        .await
        .with_context(|| format!("binding {}", settings.collector.listen))?;
    collector::serve(settings, listener, shutdown::signal()).await
}
