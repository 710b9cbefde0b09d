//! `ingestctl dlq`: list the dead-letter queues, show what one holds, and replay it.

use std::process::ExitCode;

use anyhow::Context as _;
use ingest_pipeline::{Settings, Topology};
use ingest_schema::Registry;
use ingestctl::dlq::{self as dead, DeadQueue};
use ingestctl::queue_states;

use crate::cli::DlqCommand;
use crate::full_name;

pub async fn dlq(settings: &Settings, command: DlqCommand) -> anyhow::Result<ExitCode> {
    let topology = Topology::new(settings.broker.prefix.clone());
    match command {
        DlqCommand::List => {
            let mut names = vec![topology.invalid(), topology.raw_dlq()];
            names.extend(settings.sinks.names().iter().map(|s| topology.sink_dlq(s)));
            for state in queue_states(&settings.broker, &names).await? {
                println!("{:<50} {:>10}", state.name, state.depth);
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show {
            queue,
            limit,
            max_body,
        } => {
            let queue = full_name(settings, &queue);
            let connection =
                ingest_pipeline::broker::connect(&settings.broker, "ingestctl-dlq").await?;
            let channel = connection.create_channel().await?;
            let messages = dead::take(&channel, &queue, limit).await?;
            for message in &messages {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&dead::describe(message, max_body))?
                );
            }
            eprintln!("{} message(s) shown; they stay in {queue}", messages.len());
            // Closing returns every unacknowledged message to the queue.
            let _ = connection.close(200, "".into()).await;
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Replay {
            queue,
            limit,
            dry_run,
        } => {
            let queue = full_name(settings, &queue);
            let kind = DeadQueue::parse(&topology, &queue).with_context(|| {
                format!("{queue} is neither the invalid queue, the raw DLQ nor a sink's DLQ")
            })?;
            let registry =
                Registry::load(&settings.worker.schemas_dir, settings.worker.unknown_events)
                    .with_context(|| {
                        format!("loading {}", settings.worker.schemas_dir.display())
                    })?;
            let connection = std::sync::Arc::new(
                ingest_pipeline::broker::connect(&settings.broker, "ingestctl-replay").await?,
            );
            if matches!(kind, DeadQueue::Raw) && !dry_run {
                // What came from the replay lane goes back there.
                Topology::from_settings(&settings.broker)
                    .declare_replay(&connection)
                    .await?;
            }
            let channel = connection.create_channel().await?;
            let publisher = ingest_pipeline::broker::Publisher::open(connection.clone()).await?;
            let messages = dead::take(&channel, &queue, limit).await?;
            let seen = messages.len();
            let outcome =
                dead::replay(&kind, &topology, &registry, messages, &publisher, dry_run).await;
            let _ = connection.close(200, "".into()).await;
            let outcome = outcome?;
            let verb = if dry_run { "would replay" } else { "replayed" };
            println!("{queue}: looked at {seen}, {verb} {}", outcome.replayed);
            for (why, n) in &outcome.kept {
                println!("  kept {n}: {why}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
