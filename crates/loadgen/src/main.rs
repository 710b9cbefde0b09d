//! `ingest-loadgen`: drives the collector, measures the bare broker and MongoDB ceilings, and
//! draws the plots. `scripts/bench` runs it; every subcommand prints text, or JSON with `--json`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use ingest_loadgen::amqp::{self, DepthProbe, PublishTarget};
use ingest_loadgen::drive::{closed_loop, open_loop, HttpTarget, Schedule, Target};
use ingest_loadgen::payload::{Generator, Shape};
use ingest_loadgen::record::{Recorder, Report};
use ingest_loadgen::{mongo, plot, proc, receiver, stages, stages_enrich};

mod cli;
mod drain;

use cli::{Cli, Command, LoadArgs, PlotCommand};
use drain::{account, drain, DrainArgs};

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse().command).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("ingest-loadgen: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn print<T: serde::Serialize>(json: bool, value: &T, text: impl FnOnce() -> String) {
    if json {
        println!("{}", serde_json::to_string(value).unwrap_or_default());
    } else {
        print!("{}", text());
    }
}

async fn drive<T: Target>(target: Arc<T>, load: &LoadArgs) -> anyhow::Result<Report> {
    let generator = Generator::new(&Shape {
        seed: load.seed,
        ..Shape::default()
    });
    let recorder = Recorder::new(load.ids_out.is_some());
    let sampler = (load.depth_queue.is_some() || load.pid.is_some()).then(|| {
        tokio::spawn(sample(
            recorder.clone(),
            load.depth_amqp.clone(),
            load.depth_queue.clone(),
            load.pid,
        ))
    });
    let length = Duration::from_secs_f64(load.duration.max(0.1));
    if let Some(concurrency) = load.concurrency {
        closed_loop(target, generator, concurrency, length, &recorder).await;
    } else {
        let schedule = match (&load.schedule, load.rate) {
            (Some(schedule), _) => schedule.clone(),
            (None, Some(rate)) => Schedule::constant(rate, length),
            (None, None) => anyhow::bail!("give --rate, --schedule or --concurrency"),
        };
        open_loop(
            target,
            generator,
            &schedule,
            &recorder,
            load.max_outstanding,
            Duration::from_secs(120),
        )
        .await;
    }
    if let Some(sampler) = sampler {
        sampler.abort();
    }
    if let Some(path) = &load.ids_out {
        recorder
            .write_ids(path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let report = recorder.report(&load.name);
    if let Some(path) = &load.report_out {
        std::fs::write(path, serde_json::to_vec(&report)?)?;
    }
    Ok(report)
}

/// Every second: the queue's depth and the process's memory, into the series.
async fn sample(recorder: Recorder, amqp: Option<String>, queue: Option<String>, pid: Option<u32>) {
    let mut probe = amqp.as_deref().map(DepthProbe::new);
    let mut tick = tokio::time::interval(Duration::from_millis(1000));
    loop {
        tick.tick().await;
        let depth = match (&mut probe, &queue) {
            (Some(probe), Some(queue)) => probe.depth(queue).await,
            _ => None,
        };
        let rss = pid.and_then(proc::memory).map(|m| m.rss_kb);
        recorder.sample(depth, rss);
    }
}

fn report_text(report: &Report) -> String {
    report.text()
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Http {
            url,
            write_key,
            load,
        } => {
            let target = Arc::new(HttpTarget::new(&url, &write_key, Duration::from_secs(60))?);
            let report = drive(target, &load).await?;
            print(load.json, &report, || report_text(&report));
        }
        Command::Publish {
            amqp: url,
            queue,
            channels,
            keep,
            load,
        } => {
            amqp::declare_quorum(&url, &queue).await?;
            let target = Arc::new(PublishTarget::open(&url, &queue, channels).await?);
            let report = drive(target, &load).await;
            if !keep {
                amqp::delete_queue(&url, &queue).await?;
            }
            let report = report?;
            print(load.json, &report, || report_text(&report));
        }
        Command::Prefill {
            amqp: url,
            queue,
            requests,
            concurrency,
            ids_out,
            client_ips,
            json,
            seed,
        } => {
            amqp::declare_quorum(&url, &queue).await?;
            let clients = match client_ips {
                Some(path) => std::fs::read_to_string(&path)?
                    .lines()
                    .map(|line| line.trim().to_owned())
                    .filter(|line| !line.is_empty())
                    .collect(),
                None => Vec::new(),
            };
            let recorder = Recorder::new(true);
            let generator = Generator::new(&Shape {
                seed,
                ..Shape::default()
            });
            let mut report = amqp::prefill(
                &url,
                &queue,
                generator,
                requests,
                concurrency,
                &recorder,
                clients,
            )
            .await?;
            report.series.clear();
            if let Some(path) = ids_out {
                recorder.write_ids(&path)?;
            }
            print(json, &report, || report_text(&report));
        }
        Command::Consume {
            amqp: url,
            queue,
            expect,
            prefetch,
            ack_every,
            events_per_message,
            timeout,
            json,
        } => {
            let drain = amqp::consume(
                &url,
                &queue,
                prefetch,
                ack_every,
                expect,
                events_per_message,
                Duration::from_secs(timeout),
            )
            .await?;
            print(json, &drain, || {
                format!(
                    "bare consumer: {} messages in {:.2} s: {:.0} msg/s, {:.0} events/s\n",
                    drain.messages, drain.seconds, drain.messages_per_s, drain.events_per_s
                )
            });
        }
        Command::Drain {
            amqp: url,
            queue,
            expect_events,
            messages,
            mongo: mongo_uri,
            db,
            collection,
            receiver: receiver_url,
            metrics,
            sink,
            pid,
            watch,
            ready_file,
            timeout,
            json,
        } => {
            let result = drain(DrainArgs {
                watch,
                ready_file,
                metrics,
                sink,
                url,
                queue,
                expect_events,
                messages,
                mongo: mongo_uri,
                db,
                collection,
                receiver: receiver_url,
                pid,
                timeout: Duration::from_secs(timeout),
            })
            .await?;
            print(json, &result, || {
                let cpu = match (result.cpu, result.events_per_cpu_s) {
                    (Some(cpu), Some(rate)) => format!(
                        "; worker CPU {:.2} s (user {:.2}, system {:.2}): {rate:.0} events per CPU-second",
                        cpu.total_s(), cpu.user_s, cpu.system_s
                    ),
                    _ => String::new(),
                };
                format!(
                    "worker drain: {} events ({} messages) in {:.2} s: {:.0} events/s, {:.0} msg/s{cpu}; worker RSS {} KiB, peak {} KiB; complete: {}\n",
                    result.events, result.messages, result.seconds, result.events_per_s,
                    result.messages_per_s, result.memory.rss_kb, result.memory.hwm_kb, result.complete
                )
            });
            if !result.complete {
                return Ok(ExitCode::from(1));
            }
        }
        Command::MongoInsert {
            target,
            requests,
            batch,
            concurrency,
            schemas,
            seed,
            json,
        } => {
            let generator = Generator::new(&Shape {
                seed,
                ..Shape::default()
            });
            let documents = mongo::worker_documents(&schemas, generator, requests)?;
            let target = target.open().await?;
            worker::sinks::mongo::ensure_indexes(&target).await?;
            let report = mongo::insert_many(&target, documents, batch, concurrency).await?;
            print(json, &report, || {
                format!(
                    "bare insert_many: {} documents in {:.2} s ({} per batch, {} at once): {:.0} docs/s\n",
                    report.documents, report.seconds, report.batch, report.concurrency, report.documents_per_s
                )
            });
        }
        Command::Verify { ids, target, json } => {
            let ids: Vec<String> = std::fs::read_to_string(&ids)
                .with_context(|| format!("reading {}", ids.display()))?
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
            let target = target.open().await?;
            let result = mongo::verify(&target, &ids).await?;
            print(json, &result, || {
                format!(
                    "{} accepted events: {} in MongoDB, {} missing, {} duplicated {:?}\n",
                    result.expected,
                    result.found,
                    result.missing,
                    result.duplicates,
                    result.missing_examples
                )
            });
            if result.missing > 0 || result.duplicates > 0 {
                return Ok(ExitCode::from(1));
            }
        }
        Command::BareCollector {
            listen,
            amqp,
            queue,
            channels,
        } => {
            ingest_loadgen::bare::serve(listen, &amqp, &queue, channels).await?;
        }
        Command::Receiver {
            http,
            udp,
            delay_ms,
            status,
            record_ids,
            record_lag,
        } => {
            let behaviour = receiver::Behaviour {
                delay: Duration::from_millis(delay_ms),
                status: axum::http::StatusCode::from_u16(status)
                    .with_context(|| format!("--status {status}"))?,
                record_ids,
                record_lag,
            };
            receiver::serve(http, udp, behaviour).await?;
        }
        Command::Account {
            amqp: url,
            queues,
            ids,
            delivered,
            name,
            json,
        } => {
            let result = account(&url, &queues, &ids, delivered.as_deref(), name).await?;
            print(json, &result, || {
                let held: Vec<String> = result
                    .held
                    .iter()
                    .map(|h| format!("{} {} messages / {} events", h.queue, h.messages, h.events))
                    .collect();
                format!(
                    "sink {}: {} events expected, {} delivered, {} held in its queues ({}), {} missing {:?}\n",
                    result.sink, result.expected, result.delivered, result.held_events,
                    held.join(", "), result.missing, result.missing_examples
                )
            });
            if result.missing > 0 {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Connections {
            addr,
            count,
            hold_secs,
            pid,
            header_bytes,
            json,
        } => {
            let hold = Duration::from_secs(hold_secs);
            let result = proc::hold_connections(addr, count, hold, pid, header_bytes).await;
            print(json, &result, || format!("{result:?}\n"));
        }
        Command::Memory { pid } => {
            let memory = proc::memory(pid).context("no such process")?;
            print(true, &memory, String::new);
        }
        Command::Sample { out, seed, index } => {
            let mut generator = Generator::new(&Shape {
                seed,
                gzip_share: 0.0,
                ..Shape::default()
            });
            let mut payload = generator.next_payload();
            for _ in 0..index {
                payload = generator.next_payload();
            }
            std::fs::write(&out, &payload.body)?;
            println!("{} events, {} bytes", payload.events(), payload.body.len());
        }
        Command::Stages {
            schemas,
            requests,
            rounds,
            seed,
            geo_database,
            addresses,
            json,
        } => {
            let generator = Generator::new(&Shape {
                seed,
                ..Shape::default()
            });
            let report = match (geo_database, addresses) {
                (Some(geo), Some(addresses)) => {
                    let addresses = std::fs::read_to_string(&addresses)?
                        .lines()
                        .filter_map(|line| line.trim().parse().ok())
                        .collect::<Vec<std::net::IpAddr>>();
                    stages_enrich::run(&schemas, generator, requests, rounds, &geo, &addresses)?
                }
                _ => stages::run(&schemas, generator, requests, rounds)?,
            };
            print(json, &report, || {
                let mut text = format!(
                    "{} requests, {} events, fastest of {} rounds\n",
                    report.requests, report.events, report.rounds
                );
                for stage in &report.stages {
                    text.push_str(&format!(
                        "{:>8.2} µs/event {:>10.0} events/CPU-s  {}\n",
                        stage.us_per_event, stage.events_per_cpu_s, stage.stage
                    ));
                }
                text
            });
        }
        Command::Plot { what } => match what {
            PlotCommand::Peak { report, out } => {
                let report: Report = serde_json::from_slice(&std::fs::read(&report)?)?;
                plot::peak(&report, &out)?;
            }
            PlotCommand::Latency { points, out } => {
                let points: Vec<plot::LatencyPoint> =
                    serde_json::from_slice(&std::fs::read(&points)?)?;
                plot::latency(&points, &out)?;
            }
            PlotCommand::Bars { title, bars, out } => {
                let bars: Vec<plot::Bar> = serde_json::from_slice(&std::fs::read(&bars)?)?;
                plot::bars(&title, &bars, &out)?;
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}
