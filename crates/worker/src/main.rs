use anyhow::Context;
use ingest_pipeline::{shutdown, telemetry, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load().context("loading configuration")?;
    telemetry::init(&settings.log);
    settings.validate_worker()?;
    worker::run(settings, shutdown::signal()).await
}
