#!/usr/bin/env python3
"""Writes BENCHMARKS.md (to stdout) and bars.json from the JSON results of scripts/bench."""
import datetime
import json
import os
import platform
import subprocess
import sys
import tomllib

r = sys.argv[1]
env = os.environ

# Targets (issue #11 for the worker's, issue #12 for the collector beside the bare stack).
T_COLLECTOR = 0.8
T_BARE_RATE = 1.0        # collector / bare stack (axum + lapin), requests/s at each one's best
T_BARE_CPU = 1.2         # collector CPU per request / the bare stack's
T_FANOUT = 0.5           # worker statsd + HTTP / bare consumer
T_MONGO = 0.9            # worker MongoDB / bare insert_many
T_CPU = 100_000          # events per worker CPU-second, statsd + HTTP
T_SLOW = 0.9             # MongoDB's rate beside a slow and a failing sink / its rate alone
T_P99 = 1.5

# Every figure comes from this run's results directory: a file older than the run's start
# (left from another run) is refused rather than mixed in.
STARTED = float(open(os.path.join(r, "started")).read().strip())


def path(name):
    p = os.path.join(r, name)
    if os.path.getmtime(p) + 1 < STARTED:
        sys.exit(f"bench-report: {p} is older than the run that started at {STARTED:.0f}")
    return p


def load(name):
    with open(path(name)) as f:
        return json.load(f)


def maybe(name):
    """A check's JSON, or {} if the check failed before writing it."""
    try:
        return load(name)
    except (OSError, ValueError):
        return {}


def text(name):
    with open(path(name)) as f:
        return f.read().strip()


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "?"


def best(files):
    return max((load(f) for f in files), key=lambda d: d["events_per_s"])


def cpu_cols(d):
    """The worker's CPU seconds during a drain, and events per CPU-second."""
    if not d.get("cpu") or not d.get("events_per_cpu_s"):
        return "- | -"
    return f"{d['cpu']['user_s'] + d['cpu']['system_s']:.2f} | {d['events_per_cpu_s']:.0f}"


def cpu_us(name):
    """CPU microseconds per accepted request of the service over the point NAME."""
    cpu = maybe(f"{name}.cpu.json").get("cpu_s")
    d = load(f"{name}.json")
    return cpu * 1e6 / d["accepted_requests"] if cpu is not None and d["accepted_requests"] else None


def us(v):
    return "-" if v is None else f"{v:.0f}"


def ratio_of(a, b):
    return a / b if a is not None and b else None


def ratio_cell(v):
    return "-" if v is None else f"{v:.2f}"


def histogram(lines, name, labels=""):
    """A Prometheus histogram from /metrics text: ({le: cumulative count}, sum, count)."""
    buckets, total, count = {}, 0.0, 0
    for line in lines:
        if not line.startswith(name) or labels not in line:
            continue
        key, value = line.rsplit(" ", 1)
        if key.startswith(name + "_bucket"):
            le = key.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(le)] = float(value)
        elif key.startswith(name + "_sum"):
            total = float(value)
        elif key.startswith(name + "_count"):
            count = int(float(value))
    return buckets, total, count


def histogram_between(name, labels=""):
    """The histogram NAME over the 50% run: the reading after it minus the one before."""
    readings = []
    for f in ("lat-metrics-before.txt", "lat-metrics-after.txt"):
        try:
            readings.append(histogram(text(f).splitlines(), name, labels))
        except OSError:
            return None
    (b0, s0, c0), (b1, s1, c1) = readings
    return {le: n - b0.get(le, 0) for le, n in b1.items()}, s1 - s0, c1 - c0


def bucket_quantile(buckets, count, q):
    """q's value estimated from cumulative buckets, linearly within its bucket (as Prometheus'
    histogram_quantile does); a string, "> x" when it lies past the last finite bound."""
    rank, lower, below = q * count, 0.0, 0.0
    for le in sorted(buckets):
        if buckets[le] >= rank:
            if le == float("inf"):
                return f"> {lower * 1000:g}"
            inside = buckets[le] - below
            return f"{1000 * (lower + (le - lower) * ((rank - below) / inside if inside else 1)):.2f}"
        lower, below = le, buckets[le]
    return "?"


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
bares = {c: load(f"barehttp-c{c}.json") for c in http_sweep}
coll_best_c = max(http_sweep, key=lambda c: https[c]["requests_per_s"])
bare_best_c = max(http_sweep, key=lambda c: bares[c]["requests_per_s"])
r_bare = https[coll_best_c]["requests_per_s"] / bares[bare_best_c]["requests_per_s"]
coll_cpu = {c: cpu_us(f"http-c{c}") for c in http_sweep}
bare_cpu = {c: cpu_us(f"barehttp-c{c}") for c in http_sweep}
r_bare_cpu = ratio_of(coll_cpu[coll_best_c], bare_cpu[bare_best_c])
r_bare_cpu_128 = ratio_of(coll_cpu.get("128"), bare_cpu.get("128"))
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
fanout_cpu = fanout.get("events_per_cpu_s") or 0.0

slow = load("worker-slow.json")
r_slow = slow["events_per_s"] / wmongo["events_per_s"]
verify_slow = maybe("verify-slow.json")
accounts = {s: maybe(f"account-{s}.json") for s in ("slow", "failing")}
slow_checks = [verify_slow.get("missing")] + [a.get("missing") for a in accounts.values()]
slow_verified = all(c is not None for c in slow_checks)
slow_lost = sum(slow_checks) if slow_verified else None
slow_complete = slow["complete"] and slow_lost == 0
slow_settled = text("slow-raw-settled.txt")
queues_slow_stopped = text("queues-slow-stopped.txt")
slow_metrics = text("slow-metrics.txt")
recv_slow_end = load("receiver-slow-end.json")
recv_slow = load("receiver-slow.json")
recv_failing = load("receiver-failing.json")

lat = {p: (load(f"lat-http-{p}.json"), load(f"lat-pub-{p}.json")) for p in (25, 50, 75)}
lat_bare = {p: load(f"lat-barehttp-{p}.json") for p in (25, 50, 75)}
confirm_50 = histogram_between("collector_publish_confirm_seconds", 'outcome="ack"')
own_50 = histogram_between("collector_request_own_seconds")
r4 = lat[50][0]["latency_ms"]["p99"] / max(lat[50][1]["latency_ms"]["p99"], 1e-9)

peak = load("peak.json")
verify = load("verify.json")
mem_idle = load("mem-idle.json")
mem_conn = load("mem-connections.json")
mem_peak = load("mem-peak.json")
drain_after = text("drain-after-load.txt")
queues_after = text("queues-after-peak.txt")
peak_rss = max((p.get("rss_kb") or 0) for p in peak["series"]) if peak["series"] else 0
max_depth = max((p.get("depth") or 0) for p in peak["series"]) if peak["series"] else 0
peak_503 = peak["refused"].get("503", 0)
with open(os.path.join(os.getcwd(), "config", "default.toml"), "rb") as f:
    collector_defaults = tomllib.load(f)["collector"]

json.dump(
    [
        {"label": "collector / bare publish", "value": coll["events_per_s"], "ceiling": bare_pub["events_per_s"]},
        {"label": "worker statsd+http / bare consume", "value": fanout["events_per_s"], "ceiling": consume["events_per_s"]},
        {"label": "worker mongo / bare insert_many", "value": wmongo["events_per_s"], "ceiling": bare_ins["documents_per_s"]},
        {"label": "mongo beside slow+failing / alone", "value": slow["events_per_s"], "ceiling": wmongo["events_per_s"]},
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
w("")
w(f"Every figure in the generated sections is from one run (results in `{os.path.relpath(r)}`); each ratio")
w("divides two measurements of that run.")
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
w("addresses, prefix and write key (`broker.publish_channels` = 4, `worker.prefetch` = 64). The collector's")
w(f"in-flight work is bounded by body bytes, `collector.max_in_flight_bytes` = {collector_defaults['max_in_flight_bytes'] / 2**20:.0f} MiB, beside")
w(f"`collector.max_in_flight` = {collector_defaults['max_in_flight']} requests; the largest concurrency swept is {max(int(c) for c in http_sweep)}.")
w("Bare stack: `ingest-loadgen bare-collector` (`crates/loadgen/src/bare.rs`), axum reading the body and lapin")
w("publishing it persistent and mandatory to a quorum queue on 4 confirm channels, 200 after the ack, nothing else.")
w("Payloads: Segment-style mobile batches from `ingest-loadgen` (1-50 events, ~0.4-20 KB of JSON, 20% gzip;")
w("track/screen/identify from the sample tracking plan; every event valid, every `messageId` unique).")
w("")
w("## Summary")
w("")
w("| what | measured | ceiling | ratio | target | |")
w("|---|---|---|---|---|---|")
w(f"| 1. collector vs bare publisher with confirms (events/s) | {coll['events_per_s']:.0f} | {bare_pub['events_per_s']:.0f} | {r1:.2f} | >= {T_COLLECTOR} | {verdict(r1, T_COLLECTOR)} |")
at_128 = f" (at c=128: {r_bare_cpu_128:.2f})" if r_bare_cpu_128 is not None else ""
w(f"| 1. collector vs bare stack (axum + lapin), each at its best concurrency (req/s) | {https[coll_best_c]['requests_per_s']:.0f} (c={coll_best_c}) | {bares[bare_best_c]['requests_per_s']:.0f} (c={bare_best_c}) | {r_bare:.2f} | >= {T_BARE_RATE} | {verdict(r_bare, T_BARE_RATE)} |")
bare_cpu_verdict = verdict(r_bare_cpu, T_BARE_CPU, higher=False) if r_bare_cpu is not None else "not measured"
w(f"| 1. collector vs bare stack: CPU µs per request (user + system), each at its best concurrency | {us(coll_cpu[coll_best_c])} | {us(bare_cpu[bare_best_c])} | {ratio_cell(r_bare_cpu)}{at_128} | <= {T_BARE_CPU} | {bare_cpu_verdict} |")
w(f"| 2a. worker (statsd + HTTP) vs bare consumer with acks (events/s) | {fanout['events_per_s']:.0f} | {consume['events_per_s']:.0f} | {r2:.2f} | >= {T_FANOUT} | {verdict(r2, T_FANOUT)} |")
w(f"| 2b. worker (MongoDB) vs bare insert_many (events/s) | {wmongo['events_per_s']:.0f} | {bare_ins['documents_per_s']:.0f} | {r3:.2f} | >= {T_MONGO} | {verdict(r3, T_MONGO)} |")
cpu_verdict = verdict(fanout_cpu, T_CPU) if fanout_cpu else "not measured"
w(f"| 2c. worker (statsd + HTTP): events per worker CPU-second (user + system) | {fanout_cpu:.0f} | | | >= {T_CPU:,} | {cpu_verdict} |")
w(f"| 3. collector p99 at 50% of max vs bare publish-to-confirm p99 (ms) | {lat[50][0]['latency_ms']['p99']:.1f} | {lat[50][1]['latency_ms']['p99']:.1f} | {r4:.2f}x | <= {T_P99}x | {verdict(r4, T_P99, higher=False)} |")
ok = verify["missing"] == 0 and verify["duplicates"] == 0
drained = all(l.split()[1:3] == ["0", "0"] for l in queues_after.splitlines() if l.startswith("b6.raw"))
w(f"| 4. peak run: 2xx'd events missing from MongoDB / duplicated | {verify['missing']} / {verify['duplicates']} of {verify['expected']} | | | 0 | {'**met**' if ok else '**missed**'} |")
w(f"| 4. peak run: requests refused (503) | {peak_503} of {peak['sent']} | | | 0 | {'**met**' if peak_503 == 0 else '**missed**'} |")
w(f"| 4. backlog drained after the peak (raw queue empty, every 2xx'd event in MongoDB) | {'yes' if drained else 'no'}, {drain_after} s after the load ended | | | drains | {'**met**' if drained else '**missed**'} |")
w(f"| 6. MongoDB's drain beside a slow ({env['BENCH_SLOW_MS']} ms) and a failing (503) HTTP sink vs MongoDB alone (events/s) | {slow['events_per_s']:.0f} | {wmongo['events_per_s']:.0f} | {r_slow:.2f} | >= {T_SLOW} | {verdict(r_slow, T_SLOW)} |")
lost_cell = (f"MongoDB {slow_checks[0]}, slow {slow_checks[1]}, failing {slow_checks[2]}, of {slow['events']} each"
             if slow_verified else "not verified")
w(f"| 6. events lost in that run (MongoDB, and each HTTP sink: neither delivered nor in its own queues) | {lost_cell} | | | 0 | {'**met**' if slow_complete else '**missed**'} |")
cl_one, cl_three = maybe("cluster-one-c128.json"), maybe("cluster-three-c128.json")
if cl_one and cl_three:
    w(f"| 7. collector on a three-node cluster vs one node, c=128 (req/s; the nodes share 2 cores) | {cl_three['requests_per_s']:.0f} | {cl_one['requests_per_s']:.0f} | {cl_three['requests_per_s'] / cl_one['requests_per_s']:.2f} | | measured |")
cl_status = text("cluster-chaos-status.txt") if os.path.exists(os.path.join(r, "cluster-chaos-status.txt")) else "not run"
w(f"| 8. cluster failover (leader, follower, frozen node, collector, worker): every 2xx'd event in MongoDB once; a killed node costs at most 1.5 s of refusals and 5 s without a worker ack | test {cl_status} | | | passes | {'**met**' if cl_status == 'passed' else '**missed**'} |")
sp_up, sp_down = maybe("spool-up-c128.json"), maybe("spool-down-c128.json")
if sp_up and sp_down:
    sp_refused = sum((sp_down.get("refused") or {}).values())
    w(f"| 9. collector spooling every request (no broker) vs the broker up, c=128 (req/s; non-2xx while spooling: {sp_refused}) | {sp_down['requests_per_s']:.0f} | {sp_up['requests_per_s']:.0f} | {sp_down['requests_per_s'] / sp_up['requests_per_s']:.2f} | | measured |")
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
w("### Collector vs the bare stack")
w("")
w("The same sweep, client and bodies against the bare stack (axum + lapin, above), right after the collector's,")
w("each on its own queue, purged after every point. CPU is the service process's user + system time")
w("(`/proc/<pid>/stat` fields 14 and 15 over `getconf CLK_TCK`), read just before and just after each point,")
w("divided by the requests it accepted.")
w("")
w("| concurrency | collector req/s | p99 ms | CPU µs/request | bare stack req/s | p99 ms | CPU µs/request | req/s collector / bare | CPU collector / bare |")
w("|---|---|---|---|---|---|---|---|---|")
for c in sorted(http_sweep, key=int):
    h, b = https[c], bares[c]
    cpu_r = ratio_of(coll_cpu[c], bare_cpu[c])
    w(f"| {c} | {h['requests_per_s']:.0f} | {h['latency_ms']['p99']:.1f} | {us(coll_cpu[c])} | {b['requests_per_s']:.0f} | {b['latency_ms']['p99']:.1f} | {us(bare_cpu[c])} | {h['requests_per_s'] / b['requests_per_s']:.2f} | {ratio_cell(cpu_r)} |")
w("")
w(f"Best points: collector {https[coll_best_c]['requests_per_s']:.0f} req/s (c={coll_best_c}) / bare stack {bares[bare_best_c]['requests_per_s']:.0f} req/s (c={bare_best_c}) = **{r_bare:.2f}** (target >= {T_BARE_RATE});")
w(f"CPU per request there {us(coll_cpu[coll_best_c])} µs / {us(bare_cpu[bare_best_c])} µs = **{ratio_cell(r_bare_cpu)}** (target <= {T_BARE_CPU})"
  + (f", at c=128 **{r_bare_cpu_128:.2f}**." if r_bare_cpu_128 is not None else "."))
w("")
w("## 2. Consumer ceilings: bare consumer vs worker, bare insert_many vs worker")
w("")
w("The raw queue is pre-filled (bare publisher, collector headers) while the worker is stopped; the clock")
w("starts when the queue first shrinks and stops when the last event has arrived at the sink watched (the")
w("HTTP receiver's event count, or the worker's own `sink_events_total{sink=\"mongo\",outcome=\"delivered\"}`,")
w("read from its `/metrics`, so the clock never queries the one-process database under test; MongoDB's")
w("count is checked once, after the clock stopped).")
w("")
w("The worker's CPU time is its user + system time from `/proc/<pid>/stat` (`utime` + `stime`, all")
w("threads, over the clock ticks per second), read when the clock starts and when it stops.")
w("")
w("| | messages | events | seconds | msg/s | events/s | worker CPU s | events per worker CPU-second |")
w("|---|---|---|---|---|---|---|---|")
w(f"| bare consumer, acks (`multiple` every 16), prefetch 64 | {consume['messages']} | {consume['events']} | {consume['seconds']:.2f} | {consume['messages_per_s']:.0f} | {consume['events_per_s']:.0f} | | |")
w(f"| worker, sinks statsd (UDP) + HTTP (local receiver) | {fanout['messages']} | {fanout['events']} | {fanout['seconds']:.2f} | {fanout['messages_per_s']:.0f} | {fanout['events_per_s']:.0f} | {cpu_cols(fanout)} |")
w(f"| worker, sink MongoDB | {wmongo['messages']} | {wmongo['events']} | {wmongo['seconds']:.2f} | {wmongo['messages_per_s']:.0f} | {wmongo['events_per_s']:.0f} | {cpu_cols(wmongo)} |")
for c, d in inserts.items():
    w(f"| bare `insert_many` of the worker's own documents, 1000 per batch, unordered, {c} at once | | {d['documents']} | {d['seconds']:.2f} | | {d['documents_per_s']:.0f} | | |")
w("")
w(f"Ratios: worker statsd+HTTP / bare consumer = **{r2:.2f}** (target >= {T_FANOUT}); worker MongoDB / best bare insert_many = **{r3:.2f}** (target >= {T_MONGO}).")
w(f"Events per worker CPU-second with statsd + HTTP: **{fanout_cpu:.0f}** (issue #11's target: >= {T_CPU:,}; the figure on")
w("record before the worker delivered to its sinks in-process was about 13,000: 76,198 events in 5.9 s of worker CPU).")
late = [n for n, d in (("statsd + HTTP", fanout), ("MongoDB", wmongo), ("MongoDB beside slow sinks", slow)) if d.get("late_start")]
if late:
    w(f"The worker had taken messages before the drain's first look in: {', '.join(late)}; those clocks started late.")
w("The bare insert_many documents are made by the worker's own decode/enrich/validate/convert code before")
w("the clock starts, so the ceiling holds only the database's share of the work.")
w("")
stages = maybe("stages.json")
if stages:
    w("### The worker's CPU per event, stage by stage")
    w("")
    w(f"`ingest-loadgen stages`: the worker's own code on {stages['requests']} generated requests ({stages['events']} events, the")
    w("payloads of the drains above), one thread, no I/O; each stage's input is made before its clock starts, and")
    w(f"each figure is the fastest of {stages['rounds']} rounds. The broker's share (consuming, acking) is not in it: the")
    w("drain's events per worker CPU-second above are the whole process.")
    w("")
    w("| stage | µs per event | events per CPU-second, this stage alone |")
    w("|---|---|---|")
    for st in stages["stages"]:
        w(f"| {st['stage']} | {st['us_per_event']:.2f} | {st['events_per_cpu_s']:,.0f} |")
    w("")
w("## 3. Latency at 25/50/75% of the collector's maximum rate")
w("")
w(f"Open loop at a constant arrival rate, {env['BENCH_LAT_SECS']} s each, latency from each request's intended send time")
w("(coordinated-omission safe, HdrHistogram). The bare publisher (no HTTP) and the bare stack (axum + lapin, over")
w("HTTP with the collector's client) run at the same rates with the same bodies, one after the other. Milliseconds.")
w("")
w("| load | rate req/s | collector p50 | p90 | p99 | p99.9 | bare stack p50 | p99 | bare publish p50 | p90 | p99 | p99.9 | collector non-2xx | bare stack non-2xx |")
w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for p, (h, b) in lat.items():
    hl, bl, sl = h["latency_ms"], b["latency_ms"], lat_bare[p]["latency_ms"]
    w(f"| {p}% | {h['sent'] / h['seconds']:.0f} | {hl['p50']:.2f} | {hl['p90']:.2f} | {hl['p99']:.2f} | {hl['p999']:.2f} | {sl['p50']:.2f} | {sl['p99']:.2f} | {bl['p50']:.2f} | {bl['p90']:.2f} | {bl['p99']:.2f} | {bl['p999']:.2f} | {h['refused'] or 'none'} | {lat_bare[p]['refused'] or 'none'} |")
w("")
w("CPU per accepted request of each service over its run (user + system, as in section 1):")
w("")
w("| load | collector CPU µs/request | bare stack CPU µs/request | collector / bare |")
w("|---|---|---|---|")
for p in lat:
    a, b = cpu_us(f"lat-http-{p}"), cpu_us(f"lat-barehttp-{p}")
    cpu_r = ratio_of(a, b)
    w(f"| {p}% | {us(a)} | {us(b)} | {ratio_cell(cpu_r)} |")
w("")
w("Where the collector's time went in the 50% run: the broker's confirm wait (`collector_publish_confirm_seconds`,")
w("outcome ack) beside the collector's own time per request (`collector_request_own_seconds`: the request's time")
w("less its confirm wait), from its `/metrics` read before and after the run (the difference, since the histograms")
w("add up over the process's life). p50 and p99 are estimates from the histogram buckets (linear within a bucket;")
w("bounds 0.5, 1, 2.5, 5, 10, 25 ms...), so they are only as fine as the buckets; the mean is exact.")
w("")
w("| | observations | mean ms | p50 ms (bucket estimate) | p99 ms (bucket estimate) |")
w("|---|---|---|---|---|")
for label, hist in (("confirm wait (broker)", confirm_50), ("collector's own time", own_50)):
    if not hist or not hist[2]:
        w(f"| {label} | not read | | | |")
        continue
    buckets, total, count = hist
    w(f"| {label} | {count} | {1000 * total / count:.2f} | {bucket_quantile(buckets, count, 0.5)} | {bucket_quantile(buckets, count, 0.99)} |")
w("")
w(f"At 50%: collector p99 / bare publish p99 = **{r4:.2f}x** (target <= 1.5x).")
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
w(f"- refused (503): {peak_503} of {peak['sent']} requests; the collector's in-flight budget is `collector.max_in_flight_bytes` ="
  f" {collector_defaults['max_in_flight_bytes'] / 2**20:.0f} MiB of bodies awaiting their confirm (past it, 503)")
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
w(f"| worker | MongoDB drain beside the slow and the failing HTTP sink | {mb(slow['memory']['rss_kb'])} (max sampled {mb(slow['rss_max_kb'])}) | {mb(slow['memory']['hwm_kb'])} |")
w("")
w(f"## 6. A slow and a failing HTTP sink beside MongoDB")
w("")
w(f"The worker drains {slow['messages']} pre-filled requests ({slow['events']} events) from the same generator and seed as section 2")
w(f"(the pre-fill publishes concurrently, so the exact set differs a little: {wmongo['events']} events for MongoDB alone) into")
w(f"MongoDB and two HTTP sinks: `slow`, a receiver that answers 200 after {env['BENCH_SLOW_MS']} ms, and `failing`, one that")
w("answers 503 to everything. Both HTTP sinks have the default delivery settings (`DeliverySettings::default()`")
w("in `crates/worker/src/delivery.rs`: `max_in_flight`, `spill_after_ms`, `timeout_ms`, `inline_attempts`,")
w("`breaker_failures`, `batch_max_events`...) and the default retry delays (`sinks.retry_delays_ms`).")
if env.get("BENCH_SLOW_DELIVERY"):
    w(f"This run set both HTTP sinks' `delivery` to `{env['BENCH_SLOW_DELIVERY']}` (`BENCH_SLOW_DELIVERY`).")
w("MongoDB's drain is timed as in section 2, on a fresh SecantusDB.")
w("")
w("| | seconds | events/s | msg/s | worker CPU s | events per worker CPU-second | complete |")
w("|---|---|---|---|---|---|---|")
w(f"| MongoDB alone (section 2) | {wmongo['seconds']:.2f} | {wmongo['events_per_s']:.0f} | {wmongo['messages_per_s']:.0f} | {cpu_cols(wmongo)} | {wmongo['complete']} |")
w(f"| MongoDB beside `slow` and `failing` | {slow['seconds']:.2f} | {slow['events_per_s']:.0f} | {slow['messages_per_s']:.0f} | {cpu_cols(slow)} | {slow['complete']} |")
w("")
w(f"MongoDB beside them / alone = **{r_slow:.2f}** (target >= {T_SLOW}, within 10%).")
w("")
w("Nothing lost (each event by its `messageId`):")
w("")
if verify_slow:
    w(f"- MongoDB: expected {verify_slow.get('expected')}, found {verify_slow.get('found')}, missing {verify_slow.get('missing')}, duplicates {verify_slow.get('duplicates')}")
else:
    w("- MongoDB: not verified (the check failed)")
for name, a in accounts.items():
    if not a:
        w(f"- `{name}`: not accounted (the check failed)")
        continue
    held = "; ".join(f"`{h['queue']}` {h['messages']} messages / {h['events']} events" for h in a["held"] if h["messages"])
    w(f"- `{name}`: of {a['expected']} events, {a['delivered']} delivered (answered 200), {a['held_events']} in its own queues"
      f" ({held or 'none'}), {a['delivered_and_held']} both, **{a['missing']} missing** {a['missing_examples'] or ''}")
w("")
w("The HTTP sinks' queues were read with the worker stopped (each message read and left there). The raw queue")
w(f"showed nothing ready or unacked {slow_settled} s after MongoDB had the last event (RabbitMQ's figures, refreshed every few")
w("seconds); then the worker was stopped (SIGTERM).")
w(f"The `slow` receiver had answered {recv_slow_end.get('http_requests', '?')} requests ({recv_slow_end.get('http_events', '?')} events) when MongoDB had the last event,")
w(f"{recv_slow.get('http_requests', '?')} ({recv_slow.get('http_events', '?')} events) by the end; `failing` answered 503 to {recv_failing.get('http_refused_requests', '?')} requests ({recv_failing.get('http_refused_events', '?')} events).")
w("")
w("Where the backlog sits while MongoDB drains: ready messages of the raw queue and of the HTTP sinks' own")
w(f"queues, read twice a second (AMQP passive declare). Messages the worker holds unacked are not in these: at most")
w("`worker.prefetch` (64) raw deliveries, and each sink runner's `delivery.prefetch` (128) of its own queue.")
w("")
w("| queue | highest | when MongoDB had the last event |")
w("|---|---|---|")
for q in slow.get("watched", []):
    if q["max_ready"] or q["end_ready"]:
        w(f"| `{q['queue']}` | {q['max_ready']} | {q['end_ready'] if q['end_ready'] is not None else '?'} |")
quiet = [q["queue"] for q in slow.get("watched", []) if not q["max_ready"] and not q["end_ready"]]
if quiet:
    w(f"| every other (`{'`, `'.join(quiet)}`) | 0 | 0 |")
w("")
w("Queues (name, ready, unacked) after the worker stopped, once RabbitMQ's figures (refreshed every few")
w("seconds for a quorum queue) showed nothing held by a consumer, or after 30 s; every other `b7.` queue was empty:")
w("")
w("```")
w("\n".join(l for l in queues_slow_stopped.splitlines() if l.split()[1:3] != ["0", "0"]) or "(all empty)")
w("```")
w("")
w("The worker's `sink_events_total` when MongoDB had the last event:")
w("")
w("```")
w(slow_metrics)
w("```")
w("")
w("## 7. One node vs a three-node cluster")
w("")
w("The collector against this run's one RabbitMQ node and against three nodes joined in a cluster")
w("(`scripts/rabbit-cluster`; the collector given every node in `broker.urls`), same client and bodies: closed loop at")
w(f"128 concurrent requests for {env['BENCH_SWEEP_SECS']} s, then open loop at 50% of the collector's best rate for {env['BENCH_LAT_SECS']} s.")
w("Each quorum queue on the cluster has three members, and the broker confirms a message once two have written it.")
w("**On this machine the three nodes run on the same 2 cores** as the collector and the load generator: the")
w("cluster's figures show the cost of replication on shared CPU, not what three machines would do.")
w("")
w("| broker | req/s at c=128 | p99 ms at c=128 | collector CPU µs/request | open loop rate | p50 ms | p99 ms | non-2xx |")
w("|---|---|---|---|---|---|---|---|")
for where, label in (("one", "one node"), ("three", "three-node cluster")):
    c128, half = maybe(f"cluster-{where}-c128.json"), maybe(f"cluster-{where}-half.json")
    if not c128 or not half:
        w(f"| {label} | not measured | | | | | | |")
        continue
    refused = sum((c128.get("refused") or {}).values()) + sum((half.get("refused") or {}).values())
    w(f"| {label} | {c128['requests_per_s']:.0f} | {c128['latency_ms']['p99']:.1f} | {us(cpu_us(f'cluster-{where}-c128'))} | "
      f"{half['sent'] / half['seconds']:.0f} req/s | {half['latency_ms']['p50']:.1f} | {half['latency_ms']['p99']:.1f} | {refused} |")
one, three = maybe("cluster-one-c128.json"), maybe("cluster-three-c128.json")
if one and three:
    w("")
    w(f"Three nodes / one node, closed loop: **{three['requests_per_s'] / one['requests_per_s']:.2f}** of the throughput.")
w("")
w("## 8. Failover on the cluster")
w("")
w("The cluster chaos test (`tests/e2e/cluster.rs`, run here by `scripts/test` with `CLUSTER_ROUNDS`) under a steady")
w("load of 20 requests/s: in each round it SIGKILLs the node that leads the raw queue (asked of the broker) and")
w("restarts it 10 s later, SIGKILLs a follower (at random) likewise, SIGSTOPs a random node and then the collector's")
w("node for 12 s each (past two 5 s heartbeats) and SIGCONTs it, SIGKILLs the collector and the worker and starts them")
w("again. Per fault: the time from the fault to the first 2xx of a request sent after it; the requests refused during")
w("the whole outage (those that ended after the fault and were sent before the node was back, or the process")
w("restarted), also in seconds of the load; and the raw deliveries the worker acked meanwhile, with its longest")
w("spell without an ack. The test fails if a 2xx'd event is missing from MongoDB or stored twice, or if losing one")
w("node cost more than 1.5 s of refusals or left the worker 5 s without an ack.")
w("")
status = text("cluster-chaos-status.txt") if os.path.exists(os.path.join(r, "cluster-chaos-status.txt")) else "not run"
lines = text("cluster-chaos.txt").splitlines() if os.path.exists(os.path.join(r, "cluster-chaos.txt")) else []
faults = [l for l in lines if l.startswith("cluster fault ")]


def fault_row(line):
    """cluster fault KIND (VICTIM): first 2xx after N ms, M requests refused in between; outage O ms:
    R of T requests refused (S s of the load); worker acked A deliveries against B requests 2xx'd,
    longest without an ack G ms"""
    head, _, rest = line[len("cluster fault "):].partition(": first 2xx after ")
    kind, _, victim = head.partition(" (")
    num = lambda text, after, until: text.split(after, 1)[1].split(until, 1)[0] if after in text else ""
    return {
        "kind": kind,
        "victim": victim[:-1] if victim.endswith(")") else victim,
        "took": rest.split(" ms", 1)[0],
        "before": num(rest, " ms, ", " requests refused in between"),
        "outage": num(rest, "outage ", " ms:"),
        "refused": num(rest, " ms: ", " of "),
        "requests": num(rest, " of ", " requests refused ("),
        "secs": num(rest, "refused (", " s of the load"),
        "acked": num(rest, "worker acked ", " deliveries"),
        "accepted": num(rest, "against ", " requests 2xx'd"),
        "gap": num(rest, "without an ack ", " ms"),
    }


if faults:
    w("| fault | node or process | first 2xx after (ms) | refused before it | outage (ms) | refused during the outage | in seconds of load | worker acks during the outage / requests 2xx'd | worker's longest spell without an ack (ms) |")
    w("|---|---|---|---|---|---|---|---|---|")
    rows = [fault_row(l) for l in faults]
    for f in rows:
        w(f"| {f['kind']} | {f['victim']} | {f['took']} | {f['before']} | {f['outage']} | {f['refused']} of {f['requests']} | {f['secs']} | {f['acked']} / {f['accepted']} | {f['gap']} |")
    by_kind = {}
    for f in rows:
        by_kind.setdefault(f["kind"], []).append(f)
    w("")
    w("Per kind over the runs: refused during the outage (sum of refused / sum of requests), worst single fault, and the worker's longest spell without an ack.")
    w("")
    w("| fault | runs | refused during the outage | worst (s of load) | worst first 2xx (ms) | worker's worst spell (ms) |")
    w("|---|---|---|---|---|---|")
    as_int = lambda v: int(v) if v.isdigit() else 0
    as_float = lambda v: float(v) if v.replace(".", "", 1).isdigit() else 0.0
    for kind, fs in by_kind.items():
        refused, requests = sum(as_int(f["refused"]) for f in fs), sum(as_int(f["requests"]) for f in fs)
        w(f"| {kind} | {len(fs)} | {refused} of {requests} | {max(as_float(f['secs']) for f in fs):.2f} | "
          f"{max(as_int(f['took']) for f in fs)} | {max(as_int(f['gap']) for f in fs)} |")
w("")
for l in lines:
    if l.startswith("cluster result"):
        w(f"Test **{status}**. {l[len('cluster result: '):]}")
if not lines:
    w(f"Test {status}; no figures (see the run's `cluster-chaos.log`).")
w("")
w("## 9. The spool: accepting while the broker is away")
w("")
w("The collector with `collector.spool` on, same client and bodies as section 7: closed loop at 128 concurrent")
w(f"requests for {env['BENCH_SWEEP_SECS']} s, then open loop at 50% of the collector's best rate for {env['BENCH_LAT_SECS']} s. First with the")
w("broker up (the spool unused), then with no broker at all, so that every request is fsync'd to the spool (group")
w("commit) and answered 200. Then a collector started on the same spool with the broker up: how long its")
w("forwarder took to publish everything spooled, with confirms. The spool is on this machine's disk, shared")
w("with everything else.")
w("")
w("| broker | req/s at c=128 | p99 ms at c=128 | collector CPU µs/request | open loop rate | p50 ms | p99 ms | non-2xx |")
w("|---|---|---|---|---|---|---|---|")
for mode, label in (("up", "up (spool unused)"), ("down", "away (every request spooled)")):
    c128, half = maybe(f"spool-{mode}-c128.json"), maybe(f"spool-{mode}-half.json")
    if not c128 or not half:
        w(f"| {label} | not measured | | | | | | |")
        continue
    refused = sum((c128.get("refused") or {}).values()) + sum((half.get("refused") or {}).values())
    w(f"| {label} | {c128['requests_per_s']:.0f} | {c128['latency_ms']['p99']:.1f} | {us(cpu_us(f'spool-{mode}-c128'))} | "
      f"{half['sent'] / half['seconds']:.0f} req/s | {half['latency_ms']['p50']:.1f} | {half['latency_ms']['p99']:.1f} | {refused} |")
up, down = maybe("spool-up-c128.json"), maybe("spool-down-c128.json")
if up and down:
    w("")
    w(f"Spooling / broker up, closed loop: **{down['requests_per_s'] / up['requests_per_s']:.2f}** of the throughput.")
if os.path.exists(os.path.join(r, "spool-down-metrics.txt")):
    lines = text("spool-down-metrics.txt").splitlines()
    buckets, total, count = histogram(lines, "collector_spool_sync_seconds")
    appended = next((float(l.split()[1]) for l in lines if l.startswith("collector_spool_appended_total")), None)
    if count and appended:
        p99_text = f", p99 {bucket_quantile(buckets, count, 0.99)} ms (bucket estimate)" if buckets else ""
        w(f"While spooling: {appended:.0f} requests in {count} writes with one fsync each, **{appended / count:.1f} requests per fsync** "
          f"on average (group commit); a write and its fsync took {total / count * 1000:.2f} ms on average{p99_text}.")
forward = maybe("spool-forward.json")
if forward:
    w("")
    w(f"Forward: {forward['spooled']} spooled requests ({forward['bytes'] / 1e6:.0f} MB on disk) published with confirms in "
      f"**{forward['seconds']} s** ({forward['per_s']} requests/s) from the collector's start on the broker's return; "
      f"{forward['left']} left in the spool, {forward['raw_depth']} messages in the raw queue after it (no worker ran"
      + ("; read once RabbitMQ's figures had settled)." if forward.get("settled") else
         "; read once, right after: RabbitMQ's figures for a quorum queue lag by seconds, see the notes)."))
w("")
w("## 10. Replay beside live traffic")
w("")
w("A collector and a worker with two HTTP sinks, `live` and `backfill`, each answered by its own receiver; `live`")
w("records each event's end-to-end lag (its arrival minus its `receivedAt`). Ten seconds of requests at 1,000/s are")
w("archived (and worked off live). Then live traffic at 500 requests/s for the latency phase's length, alone, and")
w("again while `ingestctl replay --sink backfill` sends the archived range. Then the worker's drain of generated")
w("requests from the raw queue, and of the archived range replayed to both sinks from the replay lane, each from a")
w("gated start (the replay lane at `worker.replay_prefetch` 8, alone).")
w("")
alone, beside = maybe("replay-lag-alone.json"), maybe("replay-lag-beside.json")
if alone and beside:
    w("| live traffic | events | p50 ms | p99 ms | max ms | replay lane depth at the end |")
    w("|---|---|---|---|---|---|")
    for label, d, m in (("alone", alone, "alone"), ("beside a replay", beside, "beside")):
        left = text(f"replay-lane-{m}.txt") if os.path.exists(os.path.join(r, f"replay-lane-{m}.txt")) else "?"
        w(f"| {label} | {d['events']} | {d['p50_ms']:.1f} | {d['p99_ms']:.1f} | {d['max_ms']:.0f} | {left} |")
    ratio = beside["p99_ms"] / alone["p99_ms"] if alone["p99_ms"] else float("nan")
    w("")
    w(f"Live p99 beside a replay / alone: **{ratio:.2f}** (target at most 1.5: {verdict(ratio, 1.5, higher=False)}).")
else:
    w("Not measured (the phase failed; see the run's log).")
live_drain, replay_drain, send = maybe("replay-drain-live.json"), maybe("replay-drain.json"), maybe("replay-send.json")
if live_drain and replay_drain:
    w("")
    w("| drain | events | events/s | events per worker CPU-second |")
    w("|---|---|---|---|")
    for label, d in (("raw queue (live)", live_drain), ("replay lane", replay_drain)):
        w(f"| {label} | {d['events']} | {d['events_per_s']:.0f} | {d['events_per_cpu_s'] or 0:.0f} |")
if send:
    w("")
    w(f"`ingestctl replay` sent {send['events']} events ({send['requests']} requests) into the lane in {send['seconds']} s "
      f"({send['events_per_s']:.0f} events/s).")
w("")
w("## 11. Enrichment's cost in the worker")
w("")
w("Each step alone, on the benchmark's payloads from client addresses inside a MaxMind-format database of")
w("50,000 networks (`bench/make-geo-db.py`), each request with one of ten user agents; one thread, no I/O,")
w("fastest of 5 rounds (`ingest-loadgen stages --geo-database`). The rules: IP truncated, `context.device.id`")
w("hashed, `context.network.carrier` dropped.")
w("")
stages_enrich, cost = maybe("stages-enrich.json"), maybe("enrich-cost.json")
if stages_enrich:
    w("| step | µs per event |")
    w("|---|---|")
    for st in stages_enrich["stages"]:
        w(f"| {st['stage']} | {st['us_per_event']:.2f} |")
    w("")
if cost:
    off, on = (sum(cost[m]) / len(cost[m]) for m in ("off", "on"))
    w("The worker's drain of the same requests (statsd + HTTP sinks, as in section 2), all enrichment off then on,")
    w(f"{len(cost['off'])} times alternating, in events per worker CPU-second: off {', '.join(f'{v:.0f}' for v in cost['off'])};")
    w(f"on {', '.join(f'{v:.0f}' for v in cost['on'])}. On the means, all of it adds **{cost['cost'] * 100:.1f} %** to the")
    pairs = ", ".join(f"{p * 100:.1f} %" for p in cost.get("pairs", []) if p is not None)
    w(f"worker's CPU per event (target under 15 %: {verdict(cost['cost'], 0.15, higher=False)}); pair by pair: {pairs}.")
else:
    w("The drains were not measured (the phase failed; see the run's log).")
viewer = maybe("viewer-cost.json")
if viewer:
    w("")
    w("### A viewer of the live feed on a flood")
    w("")
    w("The same drain (enrichment off) without and with `ingestctl tail --json` attached, three times alternating, in")
    w(f"events per worker CPU-second: without {', '.join(f'{v:.0f}' for v in viewer['without'])}; with {', '.join(f'{v:.0f}' for v in viewer['with'])}.")
    pairs = ", ".join(f"{p * 100:.1f} %" for p in viewer.get("pairs", []) if p is not None)
    w(f"A viewer adds **{viewer['cost'] * 100:.1f} %** to the worker's CPU per event on the means (target under 5 %:")
    w(f"{verdict(viewer['cost'], 0.05, higher=False)}); pair by pair: {pairs}.")
w("")
notes = os.path.join(os.getcwd(), "bench", "notes.md")
if os.path.exists(notes):
    w(open(notes).read().strip())
    w("")
print("\n".join(out))
