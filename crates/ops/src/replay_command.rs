//! `ingestctl replay`: the dry run's table, a replay with its progress (a bar on a terminal, a
//! line per interval otherwise), `--resume` and `--status`.

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use ingest_pipeline::message::STATSD_SINK;
use ingest_pipeline::{Settings, Topology};
use ingestctl::queue_states;
use ingestctl::replay::run::{self, Ended, Run};
use ingestctl::replay::state::{Plan, State};
use ingestctl::replay::{self, parse_time};
use tokio_util::sync::CancellationToken;

use crate::cli::ReplayArgs;

/// How long the archive may give nothing before a read ends: its end is reached.
const QUIET: Duration = Duration::from_secs(2);

pub async fn replay(settings: &Settings, args: ReplayArgs) -> ExitCode {
    let answer = if args.status {
        status(settings, &args).await.map(|()| ExitCode::SUCCESS)
    } else if args.dry_run {
        dry_run(settings, &args).await.map(|()| ExitCode::SUCCESS)
    } else {
        send(settings, &args).await
    };
    answer.unwrap_or_else(|error| {
        eprintln!("ingestctl: {error:#}");
        ExitCode::from(3)
    })
}

/// `--from` and `--to` read against now; `--from` after `--to` is refused.
fn range(args: &ReplayArgs) -> anyhow::Result<(DateTime<Utc>, DateTime<Utc>)> {
    let now = Utc::now();
    let from = args.from.as_deref().unwrap_or("now");
    let from = parse_time(from, now).map_err(anyhow::Error::msg)?;
    let to = parse_time(&args.to, now).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(from <= to, "--from is after --to");
    // A range into the future would follow the archive and send live traffic a second time.
    anyhow::ensure!(
        to <= now,
        "--to is in the future: a replay ends at now at the latest"
    );
    Ok((from, to))
}

/// `--grace` in seconds.
fn grace_secs(args: &ReplayArgs) -> anyhow::Result<u64> {
    let grace = replay::parse_span(&args.grace)
        .map_err(|e| anyhow::anyhow!("--grace `{}`: {e}", args.grace))?;
    Ok(u64::try_from(grace.num_seconds()).unwrap_or(0))
}

/// Every name of `given` must be one of `known` (the configuration's sources or sinks).
/// Sources are known from `collector.write_keys`: where this configuration holds none (the
/// keys stay with the collectors), `--source` is taken as given, with a warning.
fn check_names(what: &str, given: &[String], known: &[String]) -> anyhow::Result<()> {
    if what == "source" && known.is_empty() && !given.is_empty() {
        eprintln!("ingestctl: this configuration names no sources (collector.write_keys): --source is not checked");
        return Ok(());
    }
    if let Some(unknown) = given.iter().find(|name| !known.contains(name)) {
        anyhow::bail!(
            "unknown {what} `{unknown}`: the configured {what}s are {}",
            known.join(", ")
        );
    }
    Ok(())
}

fn sources(settings: &Settings) -> Vec<String> {
    settings.collector.write_keys.keys().cloned().collect()
}

/// Closes the connection, waiting for the broker's answer a few seconds at most: what was sent
/// is confirmed already, and a close that hangs must not keep the command from ending.
async fn close(connection: &lapin::Connection) {
    let closing = connection.close(200, "".into());
    let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
}

async fn connect(settings: &Settings) -> anyhow::Result<lapin::Connection> {
    ingest_pipeline::broker::connect(&settings.broker, "ingestctl-replay")
        .await
        .context("cannot connect to the broker")
}

/// The archived requests of the range, per source and hour.
async fn dry_run(settings: &Settings, args: &ReplayArgs) -> anyhow::Result<()> {
    let (from, to) = range(args)?;
    check_names("source", &args.sources, &sources(settings))?;
    let stream = Topology::new(settings.broker.prefix.clone()).archive();
    let connection = connect(settings).await?;
    let grace = chrono::TimeDelta::seconds(i64::try_from(grace_secs(args)?).unwrap_or(i64::MAX));
    let counted =
        replay::dry_run(&connection, &stream, from, to, grace, &args.sources, QUIET).await;
    close(&connection).await;
    let replay::DryRun {
        counts,
        archive_starts,
    } = counted?;
    if let Some(oldest) = archive_starts {
        eprintln!("ingestctl: the archive starts at {oldest}: nothing older is kept");
    }
    let total = counts
        .values()
        .fold((0, 0), |(r, b), t| (r + t.requests, b + t.bytes));
    if args.json {
        let rows: Vec<serde_json::Value> = counts
            .iter()
            .map(|((source, hour), t)| {
                serde_json::json!({"source": source, "hour": hour, "requests": t.requests, "bytes": t.bytes})
            })
            .collect();
        let answer = serde_json::json!({"from": from, "to": to, "would_replay": rows,
            "requests": total.0, "bytes": total.1, "archive_starts": archive_starts});
        println!("{answer}");
        return Ok(());
    }
    println!("would replay, from {from} to {to}:");
    println!(
        "{:<24} {:<18} {:>10} {:>14}",
        "source", "hour", "requests", "bytes"
    );
    for ((source, hour), t) in &counts {
        println!("{source:<24} {hour:<18} {:>10} {:>14}", t.requests, t.bytes);
    }
    println!("{:<24} {:<18} {:>10} {:>14}", "total", "", total.0, total.1);
    Ok(())
}

/// A new replay, or with `--resume` the state file's; ends 0 when every request of the range
/// is in the replay lane, 130 when stopped by Ctrl-C.
async fn send(settings: &Settings, args: &ReplayArgs) -> anyhow::Result<ExitCode> {
    let mut state = match args.resume {
        true => {
            let mut state = State::load(&args.state).map_err(anyhow::Error::msg)?;
            anyhow::ensure!(
                !state.finished,
                "the replay of {} is finished: nothing to resume",
                args.state.display()
            );
            if args.rate.is_some() {
                state.plan.rate = args.rate;
            }
            state
        }
        false => State::new(plan(settings, args)?, Utc::now()),
    };
    if !args.resume {
        if let Ok(earlier) = State::load(&args.state) {
            anyhow::ensure!(
                earlier.finished,
                "{} holds a replay that did not finish: --resume it, or name another --state",
                args.state.display()
            );
        }
    } else {
        anyhow::ensure!(
            !state.running(Utc::now()),
            "the replay of {} is running (process {}): one process sends it at a time",
            args.state.display(),
            state.pid.unwrap_or_default()
        );
    }
    if let Some(rate) = state.plan.rate {
        anyhow::ensure!(
            (0.01..=1e9).contains(&rate),
            "--rate is events per second, from 0.01 to 1e9"
        );
    }
    say_plan(settings, &state.plan, args.resume);

    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\ningestctl: stopping: waiting for the confirms of what was sent (Ctrl-C again to quit at once; --resume sends the unconfirmed again)");
            on_signal.cancel();
        }
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
        }
    });
    let connection = Arc::new(connect(settings).await?);
    let topology = Topology::from_settings(&settings.broker);
    let lane = topology.replay();
    if let Ok(states) = queue_states(&settings.broker, std::slice::from_ref(&lane)).await {
        if states.first().is_some_and(|q| q.consumers == 0) {
            eprintln!("ingestctl: no worker consumes {lane} now (workers with worker.replay_prefetch = 0 take no replays): what is sent waits there");
        }
    }
    let terminal = std::io::stderr().is_terminal();
    let report_every = match terminal {
        true => Duration::from_millis(250),
        false => Duration::from_secs(args.progress_every.max(1)),
    };
    let run = Run {
        connection: connection.clone(),
        topology: &topology,
        path: &args.state,
        quiet: QUIET,
        report_every,
    };
    let (started, fraction_at_start) = (Instant::now(), state.fraction());
    let sent = run::send(&run, &mut state, &stop, |state, per_second| {
        let pace = (state.fraction() - fraction_at_start) / started.elapsed().as_secs_f64();
        let line = progress(state, Some(per_second), state.eta(pace));
        match terminal {
            true => {
                eprint!("\r{line}\x1b[K");
                let _ = std::io::stderr().flush();
            }
            false => eprintln!("{line}"),
        }
    })
    .await;
    if terminal {
        eprintln!();
    }
    close(&connection).await;
    match sent? {
        Ended::Finished => {
            println!(
                "replayed {} requests ({} events) into {}; the workers take them at their replay share (ingestctl replay --status)",
                state.requests,
                state.events,
                topology.replay()
            );
            Ok(ExitCode::SUCCESS)
        }
        Ended::Stopped => {
            println!(
                "stopped after {} requests ({} events); go on with: ingestctl replay --resume --state {}",
                state.requests,
                state.events,
                args.state.display()
            );
            Ok(ExitCode::from(130))
        }
    }
}

/// The plan of a new replay, its sources and sinks checked against the configuration.
fn plan(settings: &Settings, args: &ReplayArgs) -> anyhow::Result<Plan> {
    let (from, to) = range(args)?;
    check_names("source", &args.sources, &sources(settings))?;
    check_names("sink", &args.sinks, &settings.sinks.names())?;
    Ok(Plan {
        from,
        to,
        sources: args.sources.clone(),
        sinks: (!args.sinks.is_empty()).then(|| args.sinks.clone()),
        rate: args.rate,
        grace_secs: grace_secs(args)?,
    })
}

/// Says what the replay sends where, and that statsd is left out unless named.
fn say_plan(settings: &Settings, plan: &Plan, resuming: bool) {
    let sinks = match &plan.sinks {
        Some(sinks) => sinks.clone(),
        None => settings
            .sinks
            .names()
            .into_iter()
            .filter(|s| s != STATSD_SINK)
            .collect(),
    };
    let sources = match plan.sources.is_empty() {
        true => "every source".to_owned(),
        false => plan.sources.join(", "),
    };
    eprintln!(
        "ingestctl: {} the requests of {sources} received from {} to {}, to {}",
        if resuming {
            "going on replaying"
        } else {
            "replaying"
        },
        plan.from.to_rfc3339_opts(SecondsFormat::Secs, true),
        plan.to.to_rfc3339_opts(SecondsFormat::Secs, true),
        sinks.join(", ")
    );
    if plan.sinks.is_none() && settings.sinks.statsd.is_some() {
        eprintln!("ingestctl: statsd is left out: its counters would count these events a second time (--sink statsd sends to it too)");
    }
}

/// One progress line: a bar of the range read by time, requests, events, rate and ETA.
fn progress(state: &State, per_second: Option<f64>, eta: Option<Duration>) -> String {
    const WIDTH: usize = 24;
    let fraction = state.fraction();
    let filled = (fraction * WIDTH as f64).round() as usize;
    let bar: String = (0..WIDTH)
        .map(|i| if i < filled { '#' } else { '.' })
        .collect();
    let at = state
        .reached
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| "-".to_owned());
    let eta = eta
        .map(|d| format!("{}s", d.as_secs()))
        .unwrap_or_else(|| "-".to_owned());
    let pace = per_second
        .map(|n| format!("  {n:.0} events/s  ETA {eta}"))
        .unwrap_or_default();
    format!(
        "[{bar}] {:>3.0}%  {} requests  {} events{pace}  at {at}",
        fraction * 100.0,
        state.requests,
        state.events
    )
}

/// Where the replay of the state file stands, and what the replay lane holds.
async fn status(settings: &Settings, args: &ReplayArgs) -> anyhow::Result<()> {
    let state = State::load(&args.state).map_err(anyhow::Error::msg)?;
    let standing = match (state.finished, state.running(Utc::now())) {
        (true, _) => "finished",
        (false, true) => "running",
        (false, false) => "stopped (--resume goes on)",
    };
    let lane = Topology::new(settings.broker.prefix.clone()).replay();
    let (depth, consumers) = match queue_states(&settings.broker, std::slice::from_ref(&lane)).await
    {
        Ok(states) => states
            .first()
            .map(|q| (Some(q.depth), Some(q.consumers)))
            .unwrap_or((None, None)),
        Err(_) => (None, None),
    };
    if args.json {
        let answer = serde_json::json!({
            "state": standing, "progress": state.fraction(), "requests": state.requests,
            "events": state.events, "reached": state.reached, "plan": state.plan,
            "lane": lane, "lane_depth": depth, "lane_consumers": consumers,
            "updated_at": state.updated_at,
        });
        println!("{answer}");
        return Ok(());
    }
    println!("replay of {}: {standing}", args.state.display());
    println!("{}", progress(&state, None, None));
    match (depth, consumers) {
        (Some(depth), Some(consumers)) => {
            println!("{lane}: {depth} requests waiting for the workers, {consumers} consuming")
        }
        _ => println!("{lane}: the broker cannot be asked"),
    }
    Ok(())
}
