//! `ingestctl schema check`: validate a file of events against the tracking plan, as the
//! worker would.

use std::path::PathBuf;
use std::process::ExitCode;

use ingest_pipeline::Settings;
use ingest_schema::{Registry, UnknownEventPolicy};

pub fn schema_check(settings: &Settings, file: &PathBuf, reject_unknown: bool) -> ExitCode {
    let policy = if reject_unknown {
        UnknownEventPolicy::Reject
    } else {
        settings.worker.unknown_events
    };
    let registry = match Registry::load(&settings.worker.schemas_dir, policy) {
        Ok(registry) => registry,
        Err(error) => {
            eprintln!("ingestctl: {error}");
            return ExitCode::from(3);
        }
    };
    let payload: serde_json::Value = match std::fs::read(file)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
    {
        Ok(payload) => payload,
        Err(error) => {
            eprintln!("ingestctl: {}: {error}", file.display());
            return ExitCode::from(3);
        }
    };
    let events = match payload.get("batch").and_then(|b| b.as_array()) {
        Some(batch) => batch.clone(),
        None => vec![payload],
    };
    let mut invalid = 0;
    for (index, event) in events.into_iter().enumerate() {
        let Some(mut event) = event.as_object().cloned() else {
            println!("event {index}: not a JSON object");
            invalid += 1;
            continue;
        };
        // The worker adds a messageId when an SDK sends none.
        event
            .entry("messageId")
            .or_insert_with(|| serde_json::Value::String(format!("schema-check-{index}")));
        match registry.validate(event) {
            Ok(_) => println!("event {index}: valid"),
            Err(rejected) => {
                invalid += 1;
                println!("event {index}: {} error(s)", rejected.errors.len());
                for issue in rejected.errors {
                    println!(
                        "  {} [{}] {}",
                        display_pointer(&issue.pointer),
                        issue.schema,
                        issue.message
                    );
                }
            }
        }
    }
    if invalid == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn display_pointer(pointer: &str) -> &str {
    if pointer.is_empty() {
        "(root)"
    } else {
        pointer
    }
}
