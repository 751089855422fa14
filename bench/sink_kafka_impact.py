#!/usr/bin/python3
"""sink_kafka_impact.py: what a Kafka sink costs `walpipe run` (issue 11, "Benchmarks").

Two measurements against librdkafka's mock cluster (tools/kafka-mock, its own process on the same
machine, so its CPU competes with walpipe's: see mock_cpu_s in the JSON):

  staging  Staging throughput of workload (a) of bench.py (pgbench: one INSERT + one UPDATE of the
           orders table per transaction), generated once as a WAL backlog behind one slot per run
           (copies at the same position, bench.Bench.make_slots), then drained by `walpipe run`
           (workers off) alternately ALONE (no [sink]: no sink index either, which is what a
           configuration without sinks gets) and WITH a [sink k] plugin = kafka, --repeat times
           each.  Each run is timed by bench.Bench.run_contender, from process start until the slot
           confirms the workload's marker; with the sink, the time until the sink's position has
           passed every staged event is recorded too (sink_done_s).  Each kafka run writes topics
           of its own prefix (r<k>), so the plugin's exactly-once tail read finds nothing to skip.
           Reports the ratio of the medians (target >= 0.9).
  outage   `walpipe run` with a kafka sink under a steady pgbench write load (--rate transactions/s
           of workload (a)): 10 s steady, then every broker of the mock `down` for --down-seconds
           (60 s), then `up`.  VmHWM/VmRSS of the walpipe process is sampled every 0.2 s.  Reports
           peak RSS (target <= 32 MB), the catch-up time (from `up` until the sink's position passes
           the newest event staged at `up`, the load still running) and the drain time (from
           stopping the load until `walpipe status --json` shows the sink's backlog_events = 0),
           --outage-repeat times.

Prints a table; writes bench/latest/sink_kafka_impact.json (--json).  Not a test: nothing fails on
speed.  Usage (built tree in build/, or WALPIPE_BIN set):
  bench/sink_kafka_impact.py [--scale 0.5] [--repeat 3] [--only staging,outage]
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(HERE))
os.environ.setdefault("WALPIPE_BIN", str(REPO / "build" / "walpipe"))
import bench  # noqa: E402
import wptest  # noqa: E402
from kafkamock import KafkaMock  # noqa: E402

PARTITIONS = 8
SINK = "k"


def log(msg):
    bench.log(msg)


class ImpactBench(bench.Bench):
    """bench.Bench whose walpipe runs get a [sink k] kafka section while self.sink_prefix is set.

    The perf hooks of run_contender (start_perf just before its clock starts, called when
    args.perf == "system"; stop_perf once the target is reached, before walpipe is stopped) are
    borrowed to time the sink: perf itself is never started here."""

    def __init__(self, args, mock):
        super().__init__(args)
        self.mock = mock
        self.sink_prefix = None
        self.sink_extra = {}
        self.cur_db = None
        self.t_start = None
        self.sink_done_s = None
        self.run_no = 0
        self.cur_wp = None
        self.thread_cpu = {}
        self.sink_backend_cpu = None

    def walpipe_for(self, stg_db, src_db, slot, name, plugin="wal2json"):
        self.run_no += 1
        wp = super().walpipe_for(stg_db, src_db, slot, f"{name}_{self.run_no}", plugin)
        self.cur_db = stg_db
        self.cur_wp = wp
        if self.sink_prefix:
            self.mock.create(f"{self.sink_prefix}.public.orders", PARTITIONS)
            with open(wp.config_path, "a") as f:
                f.write(f"\n[sink {SINK}]\nplugin = kafka\nbrokers = {self.mock.bootstrap}\n"
                        f"topic_prefix = {self.sink_prefix}\n")
                for k, v in self.sink_extra.items():
                    f.write(f"{k} = {v}\n")
            r = wp.init()  # the index sinks read by, before the clock starts
            if r.returncode != 0:
                raise RuntimeError(f"walpipe init failed: {r.stdout}{r.stderr}")
        return wp

    def start_perf(self, name, contender, pid):
        self.t_start = time.monotonic()
        self.sink_done_s = None
        return None

    def stop_perf(self, p):
        if sys.exc_info()[0] is not None:
            return
        if self.sink_prefix:
            total = self.stg.scalar("SELECT count(*) FROM walpipe.raw_events", dbname=self.cur_db)
            wptest.wait_until(lambda: delivered(self.stg, self.cur_db) >= total, timeout=600, interval=0.02,
                              what="the kafka sink to deliver every staged event")
            self.sink_done_s = time.monotonic() - self.t_start
        # where walpipe's CPU went, by thread name, and the sink's staging backend's CPU
        self.thread_cpu = thread_cpu(self.cur_wp.pid)
        pids = [r[0] for r in self.stg.sql("SELECT pid FROM pg_stat_activity WHERE datname = %s AND "
                                           "application_name LIKE 'walpipe_sink%%'", (self.cur_db,))]
        self.sink_backend_cpu = sum(bench.proc_cpu(pid) or 0 for pid in pids) if pids else None


def thread_cpu(pid):
    """CPU seconds of a process's threads, summed by thread name (comm)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[comm] = round(out.get(comm, 0) + (int(fields[11]) + int(fields[12])) / bench.CLK_TCK, 2)
    return out


def delivered(stg, db):
    return int(stg.scalar("SELECT coalesce(sum(events_delivered), 0) FROM walpipe.sink_positions WHERE sink = %s",
                          (SINK,), dbname=db))


def sink_pos(stg, db):
    rows = stg.sql("SELECT lsn::text, seq FROM walpipe.sink_positions WHERE sink = %s", (SINK,), dbname=db)
    return (bench.lsn_int(rows[0][0]), rows[0][1]) if rows else (0, -1)


def spread(vals):
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "all": vals}


# --------------------------------------------------------------------------

def run_staging(b, args):
    """Workload (a) drained alternately alone and with the kafka sink; returns the JSON part."""
    reps = args.repeat
    labels = [(mode, k) for k in range(reps) for mode in ("alone", "kafka")]
    b.src.sql("TRUNCATE orders, wide", dbname="bench")
    b.checkpoint()
    slots, start_lsn = b.make_slots("bench", "ki", [f"{m}_{k}" for m, k in labels])
    log("generating workload (a)")
    facts, expected = b.generate("oltp")
    target = b.marker("bench")
    facts["wal_bytes"] = target - start_lsn
    log(f"  {expected} changes, {facts['wal_bytes'] / 1e6:.0f} MB of WAL in {facts['generate_seconds']:.1f}s")
    runs = []
    for mode, k in labels:
        b.sink_prefix = f"r{k}" if mode == "kafka" else None
        mock_cpu0 = bench.proc_cpu(b.mock.proc.pid)
        res, stg_db = b.run_contender("oltp", "walpipe", "bench", slots[f"{mode}_{k}"], target, start_lsn, expected)
        b.finish_result(res, expected)
        res.pop("series", None)
        res["mode"] = mode
        res["repetition"] = k + 1
        res["sink_done_s"] = b.sink_done_s
        res["thread_cpu_s"] = b.thread_cpu
        res["sink_backend_cpu_s"] = b.sink_backend_cpu
        res["mock_cpu_s"] = bench.proc_cpu(b.mock.proc.pid) - mock_cpu0
        if mode == "kafka":
            res["sink_delivered"] = delivered(b.stg, stg_db)
        runs.append(res)
        b.stg.sql(f'DROP DATABASE "{stg_db}"')
        wptest.drop_slot(b.src, "bench", slots[f"{mode}_{k}"])
        extra = (f", sink done at {res['sink_done_s']:.2f}s, mock cpu {res['mock_cpu_s']:.2f}s, "
                 f"sink backend cpu {res['sink_backend_cpu_s'] or 0:.2f}s" if mode == "kafka" else "")
        extra += f"; threads {res['thread_cpu_s']}"
        log(f"  {mode:>5} #{k + 1}: " + b.describe(res) + extra)
        if not res["rows_ok"] or res.get("exit_code"):
            raise RuntimeError(f"run {mode} #{k + 1} staged wrong rows or exited {res.get('exit_code')}")
    b.sink_prefix = None
    b.src.sql("TRUNCATE orders, wide", dbname="bench")
    rate = {m: spread([r["changes_per_s"] for r in runs if r["mode"] == m]) for m in ("alone", "kafka")}
    out = {"workload": "oltp", "changes": expected, "facts": facts, "repeat": reps,
           "alone_changes_per_s": rate["alone"], "kafka_changes_per_s": rate["kafka"],
           "ratio_of_medians": rate["kafka"]["median"] / rate["alone"]["median"],
           # each kafka run against the alone run just before it: the pairing shows the noise
           "pair_ratios": [runs[i + 1]["changes_per_s"] / runs[i]["changes_per_s"] for i in range(0, len(runs), 2)],
           "sink_done_s": spread([r["sink_done_s"] for r in runs if r["mode"] == "kafka"]),
           "cpu_walpipe_s": {m: spread([r["cpu_proc_s"] for r in runs if r["mode"] == m]) for m in ("alone", "kafka")},
           "mock_cpu_s": spread([r["mock_cpu_s"] for r in runs if r["mode"] == "kafka"]),
           "sink_backend_cpu_s": spread([r["sink_backend_cpu_s"] or 0 for r in runs if r["mode"] == "kafka"]),
           "other_load_cores": spread([r["other_load_cores"] for r in runs]),
           "runs": runs}
    return out


class RssSampler(threading.Thread):
    def __init__(self, pid, interval=0.2):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.halt = threading.Event()
        self.series = []  # (t, VmRSS kB, VmHWM kB)
        self.t0 = time.monotonic()

    def run(self):
        while not self.halt.wait(self.interval):
            rss = bench.proc_status_kb(self.pid, "VmRSS")
            hwm = bench.proc_status_kb(self.pid, "VmHWM")
            if rss is not None:
                self.series.append((round(time.monotonic() - self.t0, 2), rss, hwm))


def status_sink(wp):
    r = subprocess.run([str(wp.binary), "status", "--config", str(wp.config_path), "--json"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError("walpipe status --json: " + r.stdout + r.stderr)
    doc = json.loads(r.stdout)
    sinks = doc.get("sinks")
    if sinks is None:
        sinks = [s for src in doc.get("sources", []) for s in src.get("sinks", [])]
    mine = [s for s in sinks if s.get("name") == SINK]
    if not mine:
        raise RuntimeError("walpipe status --json shows no sink " + SINK + ": " + r.stdout[:2000])
    return mine[0]


def run_outage(b, args, k):
    """One outage run; returns its JSON part."""
    slot = f"ko_{k}"
    wptest.create_slot(b.src, "bench", slot)
    stg_db = b.new_staging(f"outage_{k}")
    b.sink_prefix = f"o{k}"
    wp = b.walpipe_for(stg_db, "bench", slot, "outage")
    b.sink_prefix = None
    script = b.work / "oltp1.sql"
    script.write_text(bench.oltp_script(1))
    env = {k2: v for k2, v in os.environ.items() if not k2.startswith("PG")}
    load = None
    res = {"run": k + 1, "rate_tps": args.rate, "down_seconds": args.down_seconds}
    try:
        wp.start()
        sampler = RssSampler(wp.pid)
        sampler.start()
        load = subprocess.Popen([str(bench.PG_BIN / "pgbench"), "-n", "-M", "prepared", "-f", str(script), "-c", "2",
                                 "-j", "1", "-R", str(args.rate), "-T", "100000", "-h", str(b.src.socket_dir),
                                 "-p", str(b.src.port), "-U", "postgres", "bench"],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, preexec_fn=wptest._set_pdeathsig)
        wptest.wait_until(lambda: delivered(b.stg, stg_db) > 0, timeout=120, what="the sink's first delivery",
                          walpipe=wp)
        time.sleep(10)  # steady state before the outage (a measurement, not a test)
        res["rss_before_down_kb"] = bench.proc_status_kb(wp.pid, "VmRSS")
        res["hwm_before_down_kb"] = bench.proc_status_kb(wp.pid, "VmHWM")
        staged0 = b.stg.scalar("SELECT count(*) FROM walpipe.raw_events", dbname=stg_db)
        log(f"  outage #{k + 1}: brokers down for {args.down_seconds}s under {args.rate} tps")
        t_down = time.monotonic()
        for broker in range(1, b.mock.brokers + 1):
            b.mock.down(broker)
        sampler_mark_down = t_down - sampler.t0
        pos_at_down = sink_pos(b.stg, stg_db)
        time.sleep(args.down_seconds)
        pos_at_up = sink_pos(b.stg, stg_db)
        row = b.stg.sql("SELECT lsn::text, seq FROM walpipe.raw_events WHERE source = %s ORDER BY lsn DESC, seq DESC "
                        "LIMIT 1", (bench.SOURCE_NAME,), dbname=stg_db)[0]
        newest = (bench.lsn_int(row[0]), row[1])
        staged1 = b.stg.scalar("SELECT count(*) FROM walpipe.raw_events", dbname=stg_db)
        backlog_at_up = status_sink(wp)
        t_up = time.monotonic()
        for broker in range(1, b.mock.brokers + 1):
            b.mock.up(broker)
        res["staged_during_down"] = staged1 - staged0
        res["position_moved_while_down"] = pos_at_up != pos_at_down
        res["backlog_events_at_up"] = backlog_at_up.get("backlog_events")
        res["hwm_at_up_kb"] = bench.proc_status_kb(wp.pid, "VmHWM")
        wptest.wait_until(lambda: sink_pos(b.stg, stg_db) >= newest, timeout=600, interval=0.05,
                          what="the sink to pass what was staged at `up`", walpipe=wp)
        res["catch_up_s"] = time.monotonic() - t_up
        log(f"    staged {res['staged_during_down']} events while down (sink backlog {res['backlog_events_at_up']}), "
            f"position moved while down: {res['position_moved_while_down']}; caught up {res['catch_up_s']:.1f}s after up")
        time.sleep(5)  # the load runs on after the catch-up
        load.send_signal(signal.SIGINT)
        load.wait(60)
        t_stop = time.monotonic()
        wptest.wait_until(lambda: status_sink(wp).get("backlog_events") == 0 and
                          b.stg.scalar("SELECT count(*) FROM walpipe.raw_events", dbname=stg_db) ==
                          delivered(b.stg, stg_db) and
                          bench.lsn_int(b.src.scalar("SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                                                     "WHERE slot_name = %s", (slot,))) >=
                          bench.lsn_int(b.src.scalar("SELECT pg_current_wal_flush_lsn()::text")) - 4096,
                          timeout=600, interval=0.2, what="status --json to show backlog 0", walpipe=wp)
        res["drain_after_load_s"] = time.monotonic() - t_stop
        res["final_status"] = status_sink(wp)
        res["peak_rss_kb"] = bench.proc_status_kb(wp.pid, "VmHWM")
        sampler.halt.set()
        sampler.join()
        res["series"] = sampler.series
        res["down_at_s"] = round(sampler_mark_down, 2)
        res["up_at_s"] = round(t_up - sampler.t0, 2)
        res["max_rss_while_down_kb"] = max((r for t, r, _ in sampler.series
                                            if sampler_mark_down <= t <= res["up_at_s"]), default=None)
        res["events_delivered"] = delivered(b.stg, stg_db)
        res["exit_code"] = wp.stop(timeout=120)
        log(f"    peak RSS {res['peak_rss_kb'] / 1024:.1f} MB (before down {res['hwm_before_down_kb'] / 1024:.1f}, "
            f"max while down {res['max_rss_while_down_kb'] / 1024:.1f}); backlog 0 in status "
            f"{res['drain_after_load_s']:.1f}s after the load stopped; exit {res['exit_code']}")
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        for broker in range(1, b.mock.brokers + 1):
            try:
                b.mock.up(broker)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        if wp.running:
            wp.stop(timeout=120)
        wp.close()
        b.stg.sql(f'DROP DATABASE "{stg_db}"')
        wptest.drop_slot(b.src, "bench", slot)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=0.5, help="workload (a) size as in bench.py (1 = 200 000 txns)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each mode, alternated")
    ap.add_argument("--only", default="staging,outage")
    ap.add_argument("--rate", type=int, default=500, help="outage: pgbench transactions/s (2 changes each)")
    ap.add_argument("--down-seconds", type=int, default=60)
    ap.add_argument("--outage-repeat", type=int, default=2)
    ap.add_argument("--schemas", action="store_true", help="schemas_enable = true (default: false, bare payloads)")
    ap.add_argument("--sink-option", action="append", default=[], metavar="KEY=VALUE",
                    help="another key of the [sink k] section, e.g. kafka.reconnect.backoff.max.ms=1000")
    ap.add_argument("--json", default=str(HERE / "latest" / "sink_kafka_impact.json"))
    args = ap.parse_args()
    only = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="wp-kafkaimpact-"))
    bargs = argparse.Namespace(scale=args.scale, out=str(work / "out"), perf="system",  # see ImpactBench
                               wait_quiet=0,
                               contenders=["walpipe"], repeat=args.repeat)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip(),
              "machine": {"nproc": os.cpu_count(), "platform": platform.platform(),
                          "loadavg_start": os.getloadavg()},
              "mock": "tools/kafka-mock, 3 brokers, same machine", "partitions": PARTITIONS,
              "schemas_enable": args.schemas, "sink_options": args.sink_option}
    with KafkaMock(3, log_path=work / "mock.log") as mock:
        b = ImpactBench(bargs, mock)
        if not args.schemas:
            b.sink_extra["schemas_enable"] = "false"
        for kv in args.sink_option:
            key, _, value = kv.partition("=")
            b.sink_extra[key.strip()] = value.strip()
        try:
            b.start_clusters()
            if "staging" in only:
                result["staging"] = run_staging(b, args)
            if "outage" in only:
                result["outage"] = [run_outage(b, args, k) for k in range(args.outage_repeat)]
        finally:
            b.stop_clusters()
    result["machine"]["loadavg_end"] = os.getloadavg()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")

    print()
    print(f"walpipe {result['commit']}, {os.cpu_count()} cores, load average {result['machine']['loadavg_start'][0]:.1f} "
          f"at start; kafka-mock (3 brokers) on the same machine; schemas_enable = {str(args.schemas).lower()}")
    if "staging" in result:
        s = result["staging"]
        a, k = s["alone_changes_per_s"], s["kafka_changes_per_s"]
        print(f"| staging, workload (a), {s['changes']} changes, {s['repeat']} runs each, alternated | median | min | max |")
        print("|---|---|---|---|")
        print(f"| alone (changes/s) | {a['median']:,.0f} | {a['min']:,.0f} | {a['max']:,.0f} |")
        print(f"| with kafka sink (changes/s) | {k['median']:,.0f} | {k['min']:,.0f} | {k['max']:,.0f} |")
        pr = s["pair_ratios"]
        print(f"| ratio (target >= 0.9) | {s['ratio_of_medians']:.2f} | {min(pr):.2f} | {max(pr):.2f} |")
        d = s["sink_done_s"]
        print(f"| sink done (s from start) | {d['median']:.2f} | {d['min']:.2f} | {d['max']:.2f} |")
        for key, title in (("cpu_walpipe_s", "walpipe CPU alone (s)"), ("cpu_walpipe_s", "walpipe CPU with sink (s)"),
                           ("sink_backend_cpu_s", "sink's staging backend CPU (s)"), ("mock_cpu_s", "kafka-mock CPU (s)")):
            m = s[key]["kafka" if "with sink" in title else "alone"] if key == "cpu_walpipe_s" else s[key]
            print(f"| {title} | {m['median']:.2f} | {m['min']:.2f} | {m['max']:.2f} |")
    if "outage" in result:
        o = result["outage"]
        print(f"| outage: {args.down_seconds}s all brokers down, {args.rate} tps | " +
              " | ".join(f"run {r['run']}" for r in o) + " |")
        print("|---|" + "---|" * len(o))
        print("| peak RSS, MB (target <= 32) | " + " | ".join(f"{r['peak_rss_kb'] / 1024:.1f}" for r in o) + " |")
        print("| RSS before down, MB | " + " | ".join(f"{r['rss_before_down_kb'] / 1024:.1f}" for r in o) + " |")
        print("| events staged while down | " + " | ".join(str(r["staged_during_down"]) for r in o) + " |")
        print("| catch-up after up, s | " + " | ".join(f"{r['catch_up_s']:.1f}" for r in o) + " |")
        print("| backlog 0 after load stop, s | " + " | ".join(f"{r['drain_after_load_s']:.1f}" for r in o) + " |")
    print(f"JSON: {args.json}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
