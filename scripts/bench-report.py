#!/usr/bin/env python3
"""Writes BENCHMARKS.md (to stdout) and bars.json from the JSON results of scripts/bench."""
import datetime
import json
import os
import platform
import subprocess
import sys

r = sys.argv[1]
env = os.environ


def load(name):
    with open(os.path.join(r, name)) as f:
        return json.load(f)


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "?"


def best(files):
    return max((load(f) for f in files), key=lambda d: d["events_per_s"])


def verdict(ratio, target, higher=True):
    met = ratio >= target if higher else ratio <= target
    if met:
        return "**met**"
    if higher:
        return f"**missed** by {100 * (target - ratio) / target:.0f}% (needs {target / ratio:.2f}x)"
    return f"**missed** by {100 * (ratio - target) / target:.0f}%"


http_sweep = env["BENCH_HTTP_SWEEP"].split()
pub_sweep = env["BENCH_PUB_SWEEP"].split()
pubs = {c: load(f"publish-c{c}.json") for c in pub_sweep}
https = {c: load(f"http-c{c}.json") for c in http_sweep}
bare_pub = max(pubs.values(), key=lambda d: d["events_per_s"])
coll = max(https.values(), key=lambda d: d["events_per_s"])
r1 = coll["events_per_s"] / bare_pub["events_per_s"]

consume = load("consume.json")
fanout = load("worker-fanout.json")
r2 = fanout["events_per_s"] / consume["events_per_s"]
inserts = {c: load(f"mongo-insert-c{c}.json") for c in ("1", "4")}
bare_ins = max(inserts.values(), key=lambda d: d["documents_per_s"])
wmongo = load("worker-mongo.json")
r3 = wmongo["events_per_s"] / bare_ins["documents_per_s"]

lat = {p: (load(f"lat-http-{p}.json"), load(f"lat-pub-{p}.json")) for p in (25, 50, 75)}
r4 = lat[50][0]["latency_ms"]["p99"] / max(lat[50][1]["latency_ms"]["p99"], 1e-9)

peak = load("peak.json")
verify = load("verify.json")
mem_idle = load("mem-idle.json")
mem_conn = load("mem-connections.json")
mem_peak = load("mem-peak.json")
drain_after = open(os.path.join(r, "drain-after-load.txt")).read().strip()
queues_after = open(os.path.join(r, "queues-after-peak.txt")).read().strip()
peak_rss = max((p.get("rss_kb") or 0) for p in peak["series"]) if peak["series"] else 0
max_depth = max((p.get("depth") or 0) for p in peak["series"]) if peak["series"] else 0

json.dump(
    [
        {"label": "collector / bare publish", "value": coll["events_per_s"], "ceiling": bare_pub["events_per_s"]},
        {"label": "worker statsd+http / bare consume", "value": fanout["events_per_s"], "ceiling": consume["events_per_s"]},
        {"label": "worker mongo / bare insert_many", "value": wmongo["events_per_s"], "ceiling": bare_ins["documents_per_s"]},
    ],
    open(os.path.join(r, "bars.json"), "w"),
)

mb = lambda kb: f"{kb / 1024:.0f} MiB"
out = []
w = out.append
w("# Benchmarks")
w("")
w("Written by `scripts/bench` (do not edit by hand; hand-written findings live in `bench/notes.md`,")
w("which is appended at the end). Every service figure stands beside the bare ceiling measured in the")
w("same run, on the same machine, with the same payloads.")
if env.get("BENCH_QUICK") == "1":
    w("")
    w("> **Quick run** (`--quick`): phases shortened; the numbers are rough.")
w("")
w("## Machine and versions")
w("")
w(f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; commit `{sh('git rev-parse --short HEAD')}`")
cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
rabbit = sh("dpkg-query -W -f='${Version}' rabbitmq-server")
w(f"- `nproc`: {sh('nproc')}; kernel {platform.release()}; {cpu}")
w("- `free -g`:")
w("")
w("```")
w(sh("free -g"))
w("```")
w("")
w(f"- {sh('rustc --version')}; RabbitMQ {rabbit} (Debian package, own node, "
  f"quorum queues); SecantusDB {env['BENCH_SECANTUS']} (on disk, a fresh one before each MongoDB measurement; writes with j: true)")
w("- The machine is shared: another build may have been running during the run. The load generator,")
w("  RabbitMQ, SecantusDB and the service under test all share the same 2 cores, for the ceilings too.")
w("")
w(f"Command: `{env['BENCH_COMMAND']}`")
w("")
w("Services: `target/release/{collector,worker}` with `config/default.toml` and nothing changed but")
w("addresses, prefix and write key (`collector.max_in_flight` stays 1024: the largest concurrency swept")
w(f"is {max(int(c) for c in http_sweep)}, so it never limited; `broker.publish_channels` = 4, `worker.prefetch` = 64).")
w("Payloads: Segment-style mobile batches from `ingest-loadgen` (1-50 events, ~0.4-20 KB of JSON, 20% gzip;")
w("track/screen/identify from the sample tracking plan; every event valid, every `messageId` unique).")
w("")
w("## Summary")
w("")
w("| what | measured | ceiling | ratio | target | |")
w("|---|---|---|---|---|---|")
w(f"| 1. collector vs bare publisher with confirms (events/s) | {coll['events_per_s']:.0f} | {bare_pub['events_per_s']:.0f} | {r1:.2f} | >= 0.8 | {verdict(r1, 0.8)} |")
w(f"| 2a. worker (statsd + HTTP) vs bare consumer with acks (events/s) | {fanout['events_per_s']:.0f} | {consume['events_per_s']:.0f} | {r2:.2f} | >= 0.7 | {verdict(r2, 0.7)} |")
w(f"| 2b. worker (MongoDB) vs bare insert_many (events/s) | {wmongo['events_per_s']:.0f} | {bare_ins['documents_per_s']:.0f} | {r3:.2f} | >= 0.8 | {verdict(r3, 0.8)} |")
w(f"| 3. collector p99 at 50% of max vs bare publish-to-confirm p99 (ms) | {lat[50][0]['latency_ms']['p99']:.1f} | {lat[50][1]['latency_ms']['p99']:.1f} | {r4:.2f}x | <= 1.5x | {verdict(r4, 1.5, higher=False)} |")
ok = verify["missing"] == 0 and verify["duplicates"] == 0
drained = all(l.split()[1:3] == ["0", "0"] for l in queues_after.splitlines() if l.startswith("b6.raw"))
w(f"| 4. peak run: 2xx'd events missing from MongoDB / duplicated | {verify['missing']} / {verify['duplicates']} of {verify['expected']} | | | 0 | {'**met**' if ok else '**missed**'} |")
w(f"| 4. backlog drained after the peak (raw queue empty, every 2xx'd event in MongoDB) | {'yes' if drained else 'no'}, {drain_after} s after the load ended | | | drains | {'**met**' if drained else '**missed**'} |")
w("")
w("![throughput](bench/plots/throughput.png)")
w("")
w("## 1. Broker ceiling: bare publisher vs collector")
w("")
w(f"Closed loop, {env['BENCH_SWEEP_SECS']} s per point. Bare publisher: lapin, one connection, 4 confirm channels, each")
w("publish persistent + mandatory with the collector's headers to a durable quorum queue, awaiting its confirm")
w("(the concurrency is the in-flight window). Collector: `POST /v1/batch` over HTTP/1.1 keep-alive, same bodies.")
w("")
w("| concurrency | bare req/s | bare events/s | bare p99 ms | collector req/s | collector events/s | collector p99 ms | collector non-2xx |")
w("|---|---|---|---|---|---|---|---|")
for c in sorted(set(pub_sweep) | set(http_sweep), key=int):
    p, h = pubs.get(c), https.get(c)
    ps = f"{p['requests_per_s']:.0f} | {p['events_per_s']:.0f} | {p['latency_ms']['p99']:.1f}" if p else "- | - | -"
    hs = f"{h['requests_per_s']:.0f} | {h['events_per_s']:.0f} | {h['latency_ms']['p99']:.1f} | {h['refused'] or 'none'}" if h else "- | - | - | -"
    w(f"| {c} | {ps} | {hs} |")
w("")
w(f"Best: collector {coll['events_per_s']:.0f} events/s ({coll['name']}) / bare {bare_pub['events_per_s']:.0f} events/s ({bare_pub['name']}) = **{r1:.2f}**.")
w("")
w("## 2. Consumer ceilings: bare consumer vs worker, bare insert_many vs worker")
w("")
w("The raw queue is pre-filled (bare publisher, collector headers) while the worker is stopped; the clock")
w("starts when the queue first shrinks and stops when the last event has arrived at the sink watched (the")
w("HTTP receiver's event count, or the worker's own `sink_events_total{sink=\"mongo\",outcome=\"delivered\"}`,")
w("read from its `/metrics`, so the clock never queries the one-process database under test; MongoDB's")
w("count is checked once, after the clock stopped).")
w("")
w("| | messages | events | seconds | msg/s | events/s |")
w("|---|---|---|---|---|---|")
w(f"| bare consumer, acks (`multiple` every 16), prefetch 64 | {consume['messages']} | {consume['events']} | {consume['seconds']:.2f} | {consume['messages_per_s']:.0f} | {consume['events_per_s']:.0f} |")
w(f"| worker, sinks statsd (UDP) + HTTP (local receiver) | {fanout['messages']} | {fanout['events']} | {fanout['seconds']:.2f} | {fanout['messages_per_s']:.0f} | {fanout['events_per_s']:.0f} |")
w(f"| worker, sink MongoDB | {wmongo['messages']} | {wmongo['events']} | {wmongo['seconds']:.2f} | {wmongo['messages_per_s']:.0f} | {wmongo['events_per_s']:.0f} |")
for c, d in inserts.items():
    w(f"| bare `insert_many` of the worker's own documents, 1000 per batch, unordered, {c} at once | | {d['documents']} | {d['seconds']:.2f} | | {d['documents_per_s']:.0f} |")
w("")
w(f"Ratios: worker statsd+HTTP / bare consumer = **{r2:.2f}**; worker MongoDB / best bare insert_many = **{r3:.2f}**.")
w("The bare insert_many documents are made by the worker's own decode/enrich/validate/convert code before")
w("the clock starts, so the ceiling holds only the database's share of the work.")
w("")
w("## 3. Latency at 25/50/75% of the collector's maximum rate")
w("")
w(f"Open loop at a constant arrival rate, {env['BENCH_LAT_SECS']} s each, latency from each request's intended send time")
w("(coordinated-omission safe, HdrHistogram). The bare publisher runs at the same rates with the same bodies.")
w("")
w("| load | rate req/s | collector p50 | p90 | p99 | p99.9 | bare p50 | p90 | p99 | p99.9 | non-2xx |")
w("|---|---|---|---|---|---|---|---|---|---|---|")
for p, (h, b) in lat.items():
    hl, bl = h["latency_ms"], b["latency_ms"]
    w(f"| {p}% | {h['sent'] / h['seconds']:.0f} | {hl['p50']:.2f} | {hl['p90']:.2f} | {hl['p99']:.2f} | {hl['p999']:.2f} | {bl['p50']:.2f} | {bl['p90']:.2f} | {bl['p99']:.2f} | {bl['p999']:.2f} | {h['refused'] or 'none'} |")
w("")
w(f"At 50%: collector p99 / bare p99 = **{r4:.2f}x** (target <= 1.5x).")
w("")
w("![latency](bench/plots/latency.png)")
w("")
w("## 4. Peak run")
steady_s, peak_s, back_s = env["BENCH_PHASES"].split()
w("")
w(f"One collector, one worker (MongoDB sink). {steady_s} s at {env['BENCH_STEADY']} req/s (30% of the worker's measured")
w(f"MongoDB drain rate, at most 1/12 of the collector's maximum), then **10x = {env['BENCH_PEAK']} req/s for {peak_s} s**, then")
w(f"{back_s} s at {env['BENCH_STEADY']} req/s; then the script waits until the raw, sink and retry queues are empty and MongoDB holds every accepted event.")
w("")
w("```")
w(open(os.path.join(r, "peak.txt")).read().strip())
w("```")
w("")
w(f"- highest backlog sampled (raw + sink.mongo, messages ready, once a second): {max_depth} messages; drained {drain_after} s after the load ended")
w("- the backlog of a peak sits in the sink queue when MongoDB is the slower stage: the worker moves requests from the raw queue to the sink queues faster than one MongoDB takes them (section 2)")
w(f"- every 2xx'd event in MongoDB exactly once: expected {verify['expected']}, found {verify['found']}, missing {verify['missing']}, duplicates {verify['duplicates']}")
w("- queues after the run (name, ready, unacked):")
w("")
w("```")
w("\n".join(l for l in queues_after.splitlines() if l.startswith("b6.")))
w("```")
w("")
w("![peak](bench/plots/peak.png)")
w("")
w("## 5. Memory")
w("")
w("| process | when | VmRSS | VmHWM (peak) |")
w("|---|---|---|---|")
w(f"| collector | idle, after start | {mb(mem_idle['rss_kb'])} | {mb(mem_idle['hwm_kb'])} |")
cm = mem_conn.get("memory") or {"rss_kb": 0, "hwm_kb": 0}
w(f"| collector | {mem_conn['open']} open keep-alive connections ({mem_conn['failed']} failed of {mem_conn['wanted']}) | {mb(cm['rss_kb'])} | {mb(cm['hwm_kb'])} |")
w(f"| collector | peak run (highest sampled / at the end) | {mb(peak_rss)} | {mb(mem_peak['hwm_kb'])} |")
w(f"| worker | statsd + HTTP drain at its best rate | {mb(fanout['memory']['rss_kb'])} (max sampled {mb(fanout['rss_max_kb'])}) | {mb(fanout['memory']['hwm_kb'])} |")
w(f"| worker | MongoDB drain at its best rate | {mb(wmongo['memory']['rss_kb'])} (max sampled {mb(wmongo['rss_max_kb'])}) | {mb(wmongo['memory']['hwm_kb'])} |")
w("")
notes = os.path.join(os.getcwd(), "bench", "notes.md")
if os.path.exists(notes):
    w(open(notes).read().strip())
    w("")
print("\n".join(out))
