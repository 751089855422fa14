#!/usr/bin/python3
"""walpipe demo: stream a sample workload from one PostgreSQL into another and
check that every change arrived exactly once.

Run it through scripts/demo, which installs the dependencies and builds
walpipe first.  What it does:

  1. starts two throwaway PostgreSQL 15 clusters: a source (database app) and
     staging (database staging);
  2. creates a sample schema on the source (customers, orders; sql/demo/);
  3. creates walpipe's replication slot, and a copy of it (demo_truth) that
     nobody but this script reads: the ground truth for the check at the end;
  4. starts the Kafka leg's broker, librdkafka's mock cluster (tools/kafka-mock;
     --no-kafka leaves it out), and runs `walpipe init`, then `walpipe run` in
     the background with a [sink kafka] (plugin = kafka);
  5. runs a pgbench workload for --seconds, with a 100 000-row import
     transaction in the middle and a few logical messages, showing progress;
  6. waits until walpipe has caught up, stops it with SIGTERM and compares
     walpipe.raw_events with what the demo_truth slot decodes, change by
     change; and reads the Kafka topics back with kcat: every source change
     once, by the (lsn, seq) walpipe puts in each record's headers;
  7. removes the clusters (unless --keep).

Exit status: 0 if every change is in staging exactly once and walpipe exited
cleanly, 1 otherwise.
"""

import argparse
import atexit
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
import wptest  # noqa: E402  (throwaway clusters, walpipe wrapper, wal2json ground truth)

SQL_DIR = REPO / "sql" / "demo"
PGBENCH = wptest.PG_BIN / "pgbench"
SOURCE_DB, STAGING_DB = "app", "staging"
SOURCE_NAME = "app"                 # the [source app] section
SLOT = "walpipe_app"                # walpipe's slot
TRUTH_SLOT = "demo_truth"           # a copy of it that only this script reads
CATCH_UP_TIMEOUT = 60               # seconds walpipe may take to catch up after the workload
TRUTH_CHUNK = 8 << 20               # decode the ground truth 8 MB of WAL at a time (bounds memory)
EVENT_TYPES = ("insert", "update", "delete", "truncate", "message")
WAL2JSON_TYPE = {"I": "insert", "U": "update", "D": "delete", "T": "truncate", "M": "message"}


# --------------------------------------------------------------------------
# output

IS_TTY = sys.stdout.isatty()


def say(msg=""):
    print(msg, flush=True)


def step(msg):
    say(f"==> {msg}")


def num(n):
    return f"{n:,}"


def size(nbytes):
    if nbytes is None:
        return "-"
    for unit, factor in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if abs(nbytes) >= factor:
            return f"{nbytes / factor:.1f} {unit}"
    return f"{nbytes} B"


class Progress:
    """One status line a second: rewritten in place on a terminal, else one line each."""

    def __init__(self):
        self.width = 0

    def show(self, text):
        if IS_TTY:
            pad = max(0, self.width - len(text))
            sys.stdout.write("\r" + text + " " * pad)
            self.width = len(text)
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def done(self):
        if IS_TTY and self.width:
            sys.stdout.write("\n")
            sys.stdout.flush()
        self.width = 0


# --------------------------------------------------------------------------
# small helpers

def lsn_int(text):
    """'16/B374D848' -> int (PostgreSQL and wal2json print LSNs the same way)."""
    hi, lo = str(text).split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def lsn_text(n):
    return f"{n >> 32:X}/{n & 0xFFFFFFFF:X}"


def proc_status_kb(pid, field):
    """A kB field (VmRSS, VmHWM) of /proc/PID/status, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def pg_env():
    """The environment for PostgreSQL client programs: no stray PG* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class Sampler:
    """The numbers of the progress line, from persistent connections."""

    def __init__(self, source, staging, walpipe):
        self.src = source.connect(SOURCE_DB)
        self.stg = staging.connect(STAGING_DB)
        self.walpipe = walpipe
        self.last = (time.monotonic(), self.staged())  # (time, staged) of the previous line

    def staged(self):
        with self.stg.cursor() as cur:
            cur.execute("SELECT count(*) FROM walpipe.raw_events")
            return cur.fetchone()[0]

    def slot(self):
        """(lag in bytes, confirmed_flush_lsn as int) of walpipe's slot."""
        with self.src.cursor() as cur:
            cur.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, "
                        "confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s", (SLOT,))
            lag, flush = cur.fetchone()
            return lag, lsn_int(flush)

    def line(self, elapsed, phase):
        now, staged = time.monotonic(), self.staged()
        rate = (staged - self.last[1]) / max(now - self.last[0], 1e-3)
        self.last = (now, staged)
        lag, _ = self.slot()
        rss = proc_status_kb(self.walpipe.pid, "VmRSS")
        rss_text = size(rss * 1024) if rss is not None else "(exited)"
        return (f"  {elapsed:5.1f}s  staged {staged:>9,} events {rate:>9,.0f}/s   "
                f"slot lag {size(lag):>9}   walpipe RSS {rss_text:>8}   {phase}").rstrip()

    def close(self):
        self.src.close()
        self.stg.close()


# --------------------------------------------------------------------------
# the steps

def start_clusters():
    step("starting two throwaway PostgreSQL 15 clusters")
    source = wptest.PgCluster("demo-source")
    source.start()
    source.createdb(SOURCE_DB)
    staging = wptest.PgCluster("demo-staging")
    staging.start()
    staging.createdb(STAGING_DB)
    for role, c, db in (("source ", source, SOURCE_DB), ("staging", staging, STAGING_DB)):
        say(f"    {role}  {c.conninfo(db)}")
        say(f"             data {c.data_dir}, server log {c.log_path}")
    return source, staging


def create_sample_schema(source):
    source.sql((SQL_DIR / "schema.sql").read_text(), dbname=SOURCE_DB)
    customers = source.scalar("SELECT count(*) FROM customers", dbname=SOURCE_DB)
    orders = source.scalar("SELECT count(*) FROM orders", dbname=SOURCE_DB)
    step(f"sample schema on the source: customers ({num(customers)} rows), orders ({num(orders)} rows)")


def create_slots(source):
    lsn = wptest.create_slot(source, SOURCE_DB, SLOT)
    wptest.copy_slot(source, SOURCE_DB, SLOT, TRUTH_SLOT)
    step(f"slot {SLOT} (wal2json) created at {lsn}, and its copy {TRUTH_SLOT} for the final check")


def start_kafka():
    """The Kafka leg's broker: librdkafka's mock cluster (tools/kafka-mock) in its own process.
    Returns (KafkaMock, the [sink kafka] section) or (None, why not)."""
    try:
        import kafkamock
    except ImportError as e:
        return None, f"python3-confluent-kafka missing ({e})"
    if not kafkamock.mock_bin().exists() or not (kafkamock.plugin_dir() / "walpipe_sink_kafka.so").exists():
        return None, "tools/kafka-mock or the kafka plugin is not built (librdkafka-dev missing?)"
    mock = kafkamock.KafkaMock(3)
    # the mock keeps the last 5 MB of each partition: enough partitions for the whole demo
    for topic, parts in ((f"{SOURCE_NAME}.public.customers", 64), (f"{SOURCE_NAME}.public.orders", 64),
                         (f"{SOURCE_NAME}.message", 8)):
        mock.create(topic, parts)
    step(f"Kafka: mock cluster of 3 brokers at {mock.bootstrap} (tools/kafka-mock)")
    return mock, f"\n[sink kafka]\nplugin = kafka\nbrokers = {mock.bootstrap}\nschemas_enable = false\n"


def kafka_caught_up(staging, timeout=120):
    """Waits until the kafka sink's position reaches the last staged event; True if it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = staging.sql("SELECT (SELECT (lsn, seq) FROM walpipe.sink_positions WHERE sink = 'kafka' AND source = %s)"
                           " >= (SELECT (lsn, seq) FROM walpipe.raw_events WHERE source = %s AND seq >= 0"
                           "     ORDER BY lsn DESC, seq DESC LIMIT 1)", (SOURCE_NAME, SOURCE_NAME), dbname=STAGING_DB)
        if rows and rows[0][0]:
            return True
        time.sleep(0.2)
    return False


def kafka_read_back(mock):
    """Counter of (lsn, seq) of the events kcat reads from the source's topics (record 1 of each
    event: a delete's tombstone is record 2), and the number of records read."""
    from kafkamock import identity
    ids = collections.Counter()
    records = 0
    for topic in mock.topics():
        if not topic.startswith(SOURCE_NAME + "."):
            continue
        for r in mock.read_kcat(topic):
            records += 1
            _, lsn, seq, rec = identity(r)
            if rec == 1:
                ids[(lsn_int(lsn), seq)] += 1
    return ids, records


def start_walpipe(binary, source, staging, workdir, extra=""):
    config = wptest.write_config(workdir / "walpipe.conf", staging.conninfo(STAGING_DB),
                                 {SOURCE_NAME: {"conninfo": source.conninfo(SOURCE_DB), "slot": SLOT}})
    if extra:
        with open(config, "a") as f:
            f.write(extra)
    wp = wptest.Walpipe(config, workdir, binary=binary)
    r = wp.init()
    if r.returncode != 0:
        raise DemoError(f"walpipe init failed (exit code {r.returncode}):\n{r.stdout}{r.stderr}")
    wp.start()
    step(f"walpipe init done; walpipe run started (pid {wp.pid})")
    say(f"    config {config}")
    say(f"    log    {wp.log_path}")
    return wp


def emit_message(source, transactional, content):
    source.sql("SELECT pg_logical_emit_message(%s, 'walpipe-demo', %s)", (transactional, content),
               dbname=SOURCE_DB)


def run_workload(source, sampler, wp, seconds):
    """pgbench for `seconds`, with the bulk import half way through and a
    progress line a second.  Returns ({transactions, tps} of pgbench, the
    monotonic time the workload started)."""
    clients, threads = 4, 2
    step(f"workload for {seconds}s: pgbench -c {clients} -j {threads} ({SQL_DIR.relative_to(REPO)}/workload.sql), "
         f"bulk import of 100,000 orders at {seconds / 2:g}s, logical messages")
    emit_message(source, False, "workload starting")
    cmd = [str(PGBENCH), "-n", "-f", str(SQL_DIR / "workload.sql"), "-c", str(clients), "-j", str(threads),
           "-T", str(seconds), "-h", str(source.socket_dir), "-p", str(source.port), "-U", wptest.PG_DB_USER,
           SOURCE_DB]
    out = tempfile.TemporaryFile(mode="w+")
    pgbench = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=pg_env())

    bulk_error = []

    def bulk_import():
        try:
            source.sql((SQL_DIR / "bulk_import.sql").read_text(), dbname=SOURCE_DB)
        except Exception as e:  # reported by the main thread
            bulk_error.append(e)

    bulk = threading.Thread(target=bulk_import, name="bulk-import", daemon=True)
    progress = Progress()
    started = time.monotonic()
    next_tick = started + 1
    try:
        while pgbench.poll() is None or bulk.is_alive():
            elapsed = time.monotonic() - started
            if bulk.ident is None and elapsed >= seconds / 2:
                bulk.start()
            if not wp.running:
                break
            time.sleep(max(0.0, next_tick - time.monotonic()))
            next_tick += 1
            phase = "bulk import running" if bulk.is_alive() else ""
            if pgbench.poll() is not None and bulk.is_alive():
                phase = "pgbench done, bulk import still running"
            progress.show(sampler.line(time.monotonic() - started, phase))
    finally:
        progress.done()
        if pgbench.poll() is None:
            pgbench.terminate()
            pgbench.wait()
    if not wp.running:
        raise DemoError(f"walpipe exited during the workload (exit code {wp.returncode})")
    out.seek(0)
    output = out.read()
    if pgbench.returncode != 0:
        raise DemoError(f"pgbench failed (exit code {pgbench.returncode}):\n{output}")
    bulk.join()
    emit_message(source, False, "workload finished")
    if bulk_error:
        raise DemoError(f"the bulk import failed: {bulk_error[0]}")
    summary = {}
    for line in output.splitlines():
        if line.startswith("number of transactions actually processed:"):
            summary["transactions"] = int(line.split(":")[1].split()[0])
        elif line.startswith("tps =") and "tps" not in summary:
            summary["tps"] = float(line.split()[2])
    return summary, started


def wait_caught_up(sampler, wp, end_lsn, started):
    """Until walpipe's slot has confirmed end_lsn (all of the workload is
    staged and acknowledged).  Returns True, or False on timeout."""
    progress = Progress()
    deadline = time.monotonic() + CATCH_UP_TIMEOUT
    try:
        while True:
            _, flush = sampler.slot()
            if flush >= end_lsn:
                return True
            if not wp.running or time.monotonic() > deadline:
                return False
            time.sleep(0.25)
            if time.monotonic() - sampler.last[0] >= 1:
                progress.show(sampler.line(time.monotonic() - started, "catching up"))
    finally:
        progress.done()


def wal2json_what(ch):
    """(table, row id or message content) of a wal2json change: what it is
    about, so that a change staged in the wrong place does not pass."""
    if ch["action"] == "M":
        return None, ch.get("content")
    table = sys.intern(f'{ch["schema"]}.{ch["table"]}')  # one copy of each name: keeps the Counters small
    cols = ch.get("identity") if ch["action"] == "D" else ch.get("columns")
    ids = [c["value"] for c in cols or () if c["name"] == "id"]
    return table, str(ids[0]) if ids else None


def ground_truth(source):
    """Decodes the demo_truth slot (a copy of walpipe's slot made before
    walpipe started) with wal2json format 2, and returns
    (Counter of change keys, Counter of types).

    A change's key is (lsn, seq, type, table, row id): lsn and seq say where
    walpipe must record it: lsn = the end LSN of its transaction's commit
    record (wal2json's "nextlsn" on B), seq = its ordinal in the transaction
    from 1.  A non-transactional message stands alone: lsn = its own LSN,
    seq = 0.  For messages the last two are (None, content)."""
    keys = collections.Counter()
    types = collections.Counter()
    txn_end, seq = None, 0
    pos = lsn_int(wptest.slot_info(source, TRUTH_SLOT)["confirmed_flush_lsn"])
    end = lsn_int(source.scalar("SELECT pg_current_wal_lsn()"))
    while True:
        # slot_changes_v2 consumes the slot; read it in slices of WAL so that
        # only one slice of parsed changes is held in memory at a time
        upto = pos + TRUTH_CHUNK if pos + TRUTH_CHUNK < end else None
        for ch in wptest.slot_changes_v2(source, SOURCE_DB, TRUTH_SLOT,
                                         upto_lsn=lsn_text(upto) if upto else None):
            action = ch["action"]
            if action == "B":
                txn_end, seq = lsn_int(ch["nextlsn"]), 0
            elif action == "C":
                txn_end = None
            elif action in WAL2JSON_TYPE:
                kind = WAL2JSON_TYPE[action]
                types[kind] += 1
                if action == "M" and not ch.get("transactional"):
                    keys[(lsn_int(ch["lsn"]), 0, kind, *wal2json_what(ch))] += 1
                elif txn_end is None:
                    raise DemoError(f"ground truth: change outside a transaction: {ch}")
                else:
                    seq += 1
                    keys[(txn_end, seq, kind, *wal2json_what(ch))] += 1
        if upto is None:
            break
        pos = upto
    return keys, types


def staged_events(staging):
    """(Counter of change keys, Counter of types) of walpipe.raw_events; keys as in ground_truth()."""
    keys = collections.Counter()
    types = collections.Counter()
    conn = staging.connect(STAGING_DB, autocommit=False)
    try:
        with conn.cursor(name="raw_events") as cur:  # server-side cursor: streams the rows
            cur.itersize = 50000
            cur.execute("SELECT lsn::text, seq, event_type, schema_name || '.' || table_name, "
                        "       coalesce(payload->'after'->>'id', payload->'key'->>'id', "
                        "                payload->'before'->>'id', payload->>'content') "
                        "FROM walpipe.raw_events WHERE source = %s", (SOURCE_NAME,))
            for lsn, seq, kind, table, what in cur:
                kind, table = sys.intern(kind), table and sys.intern(table)
                keys[(lsn_int(lsn) if lsn else None, seq, kind, table, what)] += 1
                types[kind] += 1
    finally:
        conn.close()
    return keys, types


def staging_stats(staging):
    one = lambda q: staging.sql(q, (SOURCE_NAME,), dbname=STAGING_DB)[0]  # noqa: E731
    pct = ("SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY ms), "
           "percentile_disc(0.99) WITHIN GROUP (ORDER BY ms), max(ms) FROM ({}) l")
    # every event counts once ...
    per_event = one(pct.format("SELECT extract(epoch FROM received_at - commit_ts) * 1000 AS ms "
                               "FROM walpipe.raw_events WHERE source = %s AND commit_ts IS NOT NULL"))
    # ... or every transaction: its commit until its last event was staged
    per_txn = one(pct.format("SELECT extract(epoch FROM max(received_at) - min(commit_ts)) * 1000 AS ms "
                             "FROM walpipe.raw_events WHERE source = %s AND commit_ts IS NOT NULL GROUP BY lsn"))
    dead = one("SELECT count(*) FROM walpipe.dead_letters WHERE source = %s")[0]
    examples = staging.sql("SELECT DISTINCT ON (event_type) event_type, schema_name, table_name, lsn, seq, "
                           "payload::text FROM walpipe.raw_events WHERE source = %s "
                           "ORDER BY event_type, id", (SOURCE_NAME,), dbname=STAGING_DB)
    return (per_event, per_txn), dead, {row[0]: row[1:] for row in examples}


def describe_keys(diff, limit=5):
    items = sorted(diff.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1] or 0))
    out = []
    for (lsn, seq, kind, table, what), n in items[:limit]:
        about = f"{table} id {what}" if table else repr(what)
        out.append(f"      lsn {lsn_text(lsn) if lsn is not None else '?'} seq {seq}: {kind} {about}"
                   + (f" (x{n})" if n > 1 else ""))
    if len(items) > limit:
        out.append(f"      ... and {len(items) - limit} more")
    return out


def report(r):
    """Prints the summary; returns True if the run passed."""
    truth, staged = r["truth"], r["staged"]
    missing = truth - staged                          # in the source, not (often enough) in staging
    extra = staged - truth                            # in staging more often than in the source
    doubled = collections.Counter({k: n for k, n in extra.items() if k in truth})
    unexpected = collections.Counter({k: n for k, n in extra.items() if k not in truth})
    n_missing, n_doubled, n_unexpected = (sum(c.values()) for c in (missing, doubled, unexpected))

    say()
    say("Summary")
    say("-------")
    say(f"  source = decoded from slot {TRUTH_SLOT}, a copy of walpipe's slot that only this demo read;")
    say("  staged = walpipe.raw_events.  Each change is matched by its transaction's commit LSN, its")
    say("  position in the transaction, its type, table and row id.")
    say()
    say(f"  {'':26}{'source':>12}{'staged':>12}")
    for kind in EVENT_TYPES:
        say(f"  {kind + 's':26}{num(r['truth_types'][kind]):>12}{num(r['staged_types'][kind]):>12}")
    say(f"  {'total':26}{num(sum(truth.values())):>12}{num(sum(staged.values())):>12}")
    say()
    rows = [
        ("missing", num(n_missing)),
        ("doubled", num(n_doubled)),
        ("unexpected", num(n_unexpected)),
        ("dead letters", num(r["dead"])),
    ]
    total = sum(staged.values())
    if r["elapsed"]:
        rows.append(("walpipe throughput", f"{num(round(total / r['elapsed']))} events/s "
                                   f"({num(total)} events in {r['elapsed']:.1f}s, workload start to caught up)"))
    if r.get("pgbench"):
        pb = r["pgbench"]
        rows.append(("source workload", f"pgbench {num(pb.get('transactions', 0))} transactions "
                                        f"({num(round(pb.get('tps', 0)))} tps) + bulk import of 100,000 rows"))
    rows.append(("walpipe peak RSS", size(r["hwm_kb"] * 1024) if r["hwm_kb"] is not None else "-"))
    label = "commit->staged latency"
    for what, (p50, p99, pmax) in zip(("event", "transaction"), r["latency"]):
        if p50 is not None:
            rows.append((label, f"{'per ' + what + ':':17}p50 {float(p50):,.0f} ms, p99 {float(p99):,.0f} ms, "
                                f"max {float(pmax):,.0f} ms"))
            label = ""
    kafka = r.get("kafka")
    k_missing = k_doubled = 0
    if kafka is not None:
        if isinstance(kafka, str):
            rows.append(("kafka leg", f"skipped: {kafka}"))
        else:
            want = collections.Counter({(lsn, seq): 1 for (lsn, seq, *_rest) in truth})
            got, records = kafka["ids"], kafka["records"]
            k_missing = sum((want - got).values())
            k_doubled = sum(n - 1 for k, n in got.items() if n > 1)
            rows.append(("kafka (kcat read back)", f"{num(sum(got.values()))} events in {num(records)} records: "
                                                   f"{num(k_missing)} missing, {num(k_doubled)} doubled"
                                                   + ("" if kafka["caught_up"] else "; sink did NOT catch up")))
    code = r["exit_code"]
    rows.append(("walpipe exit code", "none: did not stop within 30s of SIGTERM, killed" if code is None
                 else f"{code} (killed by signal {-code})" if code < 0
                 else f"{code} (stopped with SIGTERM)"))
    if not r["caught_up"]:
        rows.append(("caught up", f"NO: slot did not reach {lsn_text(r['end_lsn'])} within {CATCH_UP_TIMEOUT}s"))
    for name, value in rows:
        say(f"  {name:26}{value}")
    for title, diff in (("missing", missing), ("doubled", doubled), ("unexpected", unexpected)):
        if diff:
            say(f"\n  {title} (lsn = commit end LSN, seq = position in the transaction):")
            for line in describe_keys(diff):
                say(line)

    say()
    say("Example payloads (walpipe.raw_events.payload)")
    say("---------------------------------------------")
    for kind in EVENT_TYPES:
        ex = r["examples"].get(kind)
        if ex is None:
            continue
        schema, table, lsn, seq, payload = ex
        where = f"{schema}.{table}" if table else ""
        say(f"  {kind:9} {where:18} lsn {lsn} seq {seq}")
        say(f"            {payload}")

    ok = (n_missing == 0 and n_doubled == 0 and n_unexpected == 0 and r["exit_code"] == 0
          and r["caught_up"] and sum(truth.values()) > 0 and k_missing == 0 and k_doubled == 0)
    say()
    if ok:
        say(f"PASS: all {num(sum(truth.values()))} source changes are in staging exactly once"
            + (" and in Kafka exactly once" if isinstance(kafka, dict) else "") + ", and walpipe stopped cleanly.")
    else:
        why = []
        if n_missing or n_doubled or n_unexpected:
            why.append(f"{num(n_missing)} missing, {num(n_doubled)} doubled, {num(n_unexpected)} unexpected")
        if k_missing or k_doubled:
            why.append(f"kafka: {num(k_missing)} missing, {num(k_doubled)} doubled")
        if r["exit_code"] is None:
            why.append("walpipe did not stop on SIGTERM")
        elif r["exit_code"] != 0:
            why.append(f"walpipe exit code {r['exit_code']}")
        if not r["caught_up"]:
            why.append("walpipe did not catch up")
        if not sum(truth.values()):
            why.append("the source produced no changes")
        say(f"FAIL: {'; '.join(why)}.")
    return ok


class DemoError(Exception):
    pass


# --------------------------------------------------------------------------

def keep_clusters(clusters, workdir):
    """Leaves the clusters running, out of reach of wptest's cleanup, and
    says how to use and remove them."""
    atexit.unregister(wptest.cleanup_all)
    for c in clusters:
        # wptest sweeps clusters whose owner process is gone; mark these as not its own
        (c.base_dir / wptest.OWNER_FILE).write_text("kept by scripts/demo --keep\n")
    source, staging = clusters
    pg_ctl = wptest.PG_BIN / "pg_ctl"
    as_pg = "runuser -u postgres -- " if os.geteuid() == 0 else ""
    say()
    say("Clusters kept running (--keep):")
    say(f"  psql \"{source.conninfo(SOURCE_DB)}\"")
    say(f"  psql \"{staging.conninfo(STAGING_DB)}\"")
    say(f"  walpipe config and log: {workdir}")
    say("  to remove them:")
    for c in clusters:
        say(f"    {as_pg}{pg_ctl} -D {c.data_dir} -m fast stop; rm -rf {c.base_dir}")
    say(f"    rm -rf {workdir}")


def on_sigterm(signum, frame):
    # SIGTERM (a CI timeout, say) cleans up just like Ctrl-C
    raise KeyboardInterrupt


def main():
    ap = argparse.ArgumentParser(description="Stream a sample PostgreSQL workload through walpipe and check "
                                             "that every change is staged exactly once.")
    ap.add_argument("--seconds", type=int, default=15, help="how long the workload runs (default 15)")
    ap.add_argument("--keep", action="store_true", help="keep the clusters running afterwards; print how to "
                                                        "connect")
    ap.add_argument("--walpipe", default=str(REPO / "build-demo" / "walpipe"), help="the walpipe binary")
    ap.add_argument("--no-kafka", action="store_true", help="leave out the Kafka leg (mock broker, kafka sink)")
    args = ap.parse_args()
    if args.seconds < 2:
        ap.error("--seconds must be at least 2")
    binary = Path(args.walpipe).resolve()
    if not os.access(binary, os.X_OK):
        ap.error(f"no walpipe binary at {binary}; build it (scripts/demo does)")

    signal.signal(signal.SIGTERM, on_sigterm)

    workdir = Path(tempfile.mkdtemp(prefix="walpipe-demo-"))
    os.environ.setdefault("WALPIPE_BIN", str(binary))  # kafkamock finds the mock and plugins beside it
    clusters, wp, sampler, ok = [], None, None, False
    mock, kafka = None, None
    try:
        source, staging = start_clusters()
        clusters = [source, staging]
        create_sample_schema(source)
        create_slots(source)
        sink = ""
        if not args.no_kafka:
            mock, sink = start_kafka()
            if mock is None:
                kafka, sink = sink, ""
        wp = start_walpipe(binary, source, staging, workdir, sink)
        sampler = Sampler(source, staging, wp)

        pgbench, started = run_workload(source, sampler, wp, args.seconds)
        end_lsn = lsn_int(source.scalar("SELECT pg_current_wal_lsn()"))
        step(f"workload done (source WAL at {lsn_text(end_lsn)}); waiting for walpipe to catch up")
        caught_up = wait_caught_up(sampler, wp, end_lsn, started)
        elapsed = time.monotonic() - started

        if mock is not None:
            step("waiting for the kafka sink to deliver every staged event")
            kafka = {"caught_up": kafka_caught_up(staging)}
        hwm = proc_status_kb(wp.pid, "VmHWM") if wp.running else None
        step("stopping walpipe (SIGTERM)")
        try:
            exit_code = wp.stop(timeout=30)
            say(f"    walpipe exited with code {exit_code}")
        except AssertionError:
            exit_code = None
            say("    walpipe did not exit within 30s of SIGTERM; killed it")
        sampler.close()
        sampler = None

        step(f"decoding the ground truth from slot {TRUTH_SLOT} and comparing it with walpipe.raw_events")
        truth, truth_types = ground_truth(source)
        wptest.drop_slot(source, SOURCE_DB, TRUTH_SLOT)
        staged, staged_types = staged_events(staging)
        latency, dead, examples = staging_stats(staging)
        if mock is not None:
            step("reading the Kafka topics back with kcat (a client walpipe did not write)")
            kafka["ids"], kafka["records"] = kafka_read_back(mock)
        ok = report(dict(truth=truth, truth_types=truth_types, staged=staged, staged_types=staged_types,
                         latency=latency, dead=dead, examples=examples, elapsed=elapsed, pgbench=pgbench,
                         hwm_kb=hwm, exit_code=exit_code, caught_up=caught_up, end_lsn=end_lsn, kafka=kafka))
        if not ok and wp is not None:
            say()
            say(wp.log_tail(30))
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130
    except (DemoError, wptest.PgError) as e:
        say(f"\nFAIL: {e}")
        if wp is not None:
            say(wp.log_tail(30))
    except Exception:
        say()
        traceback.print_exc()
        say("FAIL: the demo itself failed (above)")
        if wp is not None:
            say(wp.log_tail(30))
    finally:
        if sampler is not None:
            sampler.close()
        if wp is not None:
            wp.close()
        if mock is not None:
            mock.stop()
        if args.keep and len(clusters) == 2:
            keep_clusters(clusters, workdir)
        else:
            for c in clusters:
                c.destroy()
            shutil.rmtree(workdir, ignore_errors=True)
            if clusters:
                say("clusters removed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
