use anyhow::Context;
use ingest_pipeline::{shutdown, telemetry, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load().context("loading configuration")?;
    telemetry::init(&settings.log);
    settings.validate_worker()?;
    let listener = tokio::net::TcpListener::bind(settings.worker.listen)
        .await
        .with_context(|| format!("binding {}", settings.worker.listen))?;
    worker::serve(settings, listener, shutdown::signal()).await
}
