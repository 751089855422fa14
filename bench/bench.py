#!/usr/bin/python3
"""bench.py: walpipe's benchmark harness (issue #5).  Run it through bench/run.

One run on one machine: starts a source and a staging PostgreSQL 15 cluster
(tests/integration/wptest.py), generates each workload BEFORE any consumer
streams (WAL piles up behind the slots), then lets each contender drain the
same backlog, one after another, and times it from process start until it has
consumed up to the target LSN.

Contenders, each on its own slot copied from one base slot at the same
position (pg_copy_logical_replication_slot), all with the same wal2json
options (format-version 2, include-xids, include-timestamp, include-lsn,
include-type-oids, -column-positions) and the same session settings; pg_recvlogical_pgoutput
and walpipe_pgoutput are the first two on a copy made with pgoutput
(proto_version 1, a FOR ALL TABLES publication, messages):
  pg_recvlogical  to /dev/null with --endpos: the decode ceiling
  walpipe         end to end into a fresh staging database's raw_events,
                  committed and checkpointed; done when its slot's
                  confirmed_flush_lsn reaches the target, then SIGTERM
  python          bench/python_consumer.py (psycopg2 -> COPY -> commit ->
                  feedback), fresh staging database, same end condition

Workloads: (a) oltp   pgbench, N transactions of one INSERT + one UPDATE on
                      a 7-column orders table
           (b) bulk   one N-row INSERT transaction into orders
           (c) wide   N rows of a 40-column table with a 2 kB text, 1000 per
                      transaction
           (d) idle   the slots sit in an idle database while another
                      database of the same cluster runs (a): how fast each
                      contender moves its idle slot past that WAL
Then walpipe alone: latency (commit on the source -> staged row visible) at a
steady 50% of measured capacity, and the drain of a large backlog with its RSS
sampled over time.  Last, the mirror apply rate (phase "mirror"): `walpipe run`
(no workers) stages a backlog of inserts and updates of a 3-column table, then
`walpipe work --workers N` drains it into the mirror table with 1, 2 and 4
workers, each from a reset mirror, timed from process start to the commit of
the last claim, and the mirror is compared with the source after each drain.

The target LSN is exact: the workload ends with a marker transaction (one
transactional logical message), and pg_walinspect gives the end of its commit
record, which is what a consumer confirms after staging it.

Outputs (--out, default bench/results/): results.json, results.csv,
latency.csv, backlog.csv, table.md and the PNG plots (gnuplot): throughput,
cpu, latency, backlog, mirror.
"""

import argparse
import csv
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
import wptest  # noqa: E402

PG_BIN = wptest.PG_BIN
CLK_TCK = os.sysconf("SC_CLK_TCK")
SOURCE_NAME = "bench"
MARKER_PREFIX = "wpbench"
WAL2JSON_OPTIONS = ["format-version=2", "include-xids=1", "include-timestamp=1", "include-lsn=1",
                    "include-type-oids=1", "include-column-positions=1"]  # what walpipe's reader asks
# walpipe pins these on its replication connection; the other contenders get them too.
SOURCE_PGOPTIONS = ("-c datestyle=ISO,MDY -c timezone=UTC -c intervalstyle=postgres "
                    "-c bytea_output=hex -c extra_float_digits=3")
CONTENDERS = ("pg_recvlogical", "walpipe", "python", "pg_recvlogical_pgoutput", "walpipe_pgoutput")
# The *_pgoutput contenders read a copy of the same slot made with pgoutput, through this publication
# (FOR ALL TABLES, created before the slots: pgoutput reads it as of each change's position).
PUBLICATION = "wpbench_pub"
PGOUTPUT_OPTIONS = ["proto_version=1", f"publication_names={PUBLICATION}", "messages=true"]


def kind_of(contender):
    """The program a contender runs: pg_recvlogical, walpipe or python."""
    return contender[:-len("_pgoutput")] if contender.endswith("_pgoutput") else contender


def plugin_of(contender):
    return "pgoutput" if contender.endswith("_pgoutput") else "wal2json"
WORKLOADS = ("oltp", "bulk", "wide", "idle")
PHASES = WORKLOADS + ("latency", "backlog", "mirror")
WORKLOAD_TITLES = {"oltp": "(a) OLTP", "bulk": "(b) bulk", "wide": "(c) wide rows",
                   "idle": "(d) idle source"}

# Sizes at --scale 1 (the sizes; the wide and idle sizes are ours).
SIZES = {
    "oltp_txns": 200_000,        # x 2 changes
    "bulk_rows": 1_000_000,      # one transaction
    "wide_rows": 100_000,        # 1000 rows per transaction
    "idle_busy_txns": 100_000,   # OLTP transactions in the busy database
    "backlog_changes": 5_000_000,  # 10 000 rows per transaction
    "latency_seconds": 30,
    "mirror_changes": 200_000,   # staged, then applied by 1, 2 and 4 workers
}
MIN_SIZES = {"latency_seconds": 10, "wide_rows": 1000, "oltp_txns": 1000, "bulk_rows": 1000,
             "idle_busy_txns": 1000, "backlog_changes": 10_000,
             "mirror_changes": 10_000}

SOURCE_SETTINGS = dict(fsync=True, autovacuum=False, max_wal_size="32GB", checkpoint_timeout="1h",
                       shared_buffers="512MB", max_replication_slots=20, max_wal_senders=20,
                       wal_sender_timeout="120s")
STAGING_SETTINGS = dict(fsync=True, autovacuum=False, max_wal_size="32GB", checkpoint_timeout="1h",
                        shared_buffers="1GB", track_commit_timestamp=True)

ORDERS_DDL = """
CREATE TABLE orders (
    id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    customer_id int NOT NULL,
    status      text NOT NULL,
    amount      numeric(12,2) NOT NULL,
    note        text,
    attrs       jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
)"""

def oltp_script(pairs=1):
    """The pgbench script of workload (a): per transaction, `pairs` x (one INSERT + one UPDATE)."""
    lines = ["\\set cid random(1, 100000)", "\\set cents random(100, 99999999)", "BEGIN;"]
    for k in range(1, pairs + 1):
        lines.append("INSERT INTO orders (customer_id, status, amount, note, attrs, created_at) VALUES "
                     "(:cid, 'new', :cents / 100.0, 'order for customer ' || :cid, jsonb_build_object("
                     f"'channel', 'web', 'items', :cid % 7 + 1, 'gift', false), now()) RETURNING id \\gset p{k}_")
        lines.append(f"UPDATE orders SET status = 'paid', amount = amount + 1.00 WHERE id = :p{k}_id;")
    lines.append("END;")
    return "\n".join(lines) + "\n"


ORDERS_SELECT = ("SELECT g % 100000, 'new', (g % 9999999) / 100.0, 'bulk order ' || g, "
                 "jsonb_build_object('channel', 'batch', 'items', g % 7 + 1, 'gift', false), now() "
                 "FROM generate_series({lo}, {hi}) g")
ORDERS_COLS = "customer_id, status, amount, note, attrs, created_at"


def wide_columns():
    """40 columns: id, 10 int, 10 text, 6 numeric, 4 boolean, 4 timestamptz, 3 jsonb, 1 date, 1 2 kB text."""
    cols = [("id", "bigint PRIMARY KEY", "g")]
    cols += [(f"i{k:02}", "int", f"g + {k}") for k in range(1, 11)]
    cols += [(f"t{k:02}", "text", f"'text value {k} ' || g") for k in range(1, 11)]
    cols += [(f"n{k:02}", "numeric(14,2)", f"(g * {k}) / 100.0") for k in range(1, 7)]
    cols += [(f"b{k:02}", "boolean", f"(g + {k}) % 2 = 0") for k in range(1, 5)]
    cols += [(f"ts{k:02}", "timestamptz", f"now() + interval '{k} hours'") for k in range(1, 5)]
    cols += [(f"j{k:02}", "jsonb", f"jsonb_build_object('k', {k}, 'g', g)") for k in range(1, 4)]
    cols += [("d01", "date", "current_date")]
    cols += [("big", "text", "repeat(md5(g::text), 64)")]  # 2048 characters
    assert len(cols) == 40
    return cols


# --------------------------------------------------------------------------
# /proc readings

def proc_cpu(pid):
    """utime + stime of a process (all its threads) in seconds, or None if it is gone."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def proc_status_kb(pid, key):
    """A kB value (VmHWM, VmRSS) from /proc/PID/status, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def machine_busy_s():
    """CPU seconds the whole machine has spent busy since boot (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK


def lsn_int(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def lsn_text(v):
    return f"{v >> 32:X}/{v & 0xFFFFFFFF:X}"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------
# the sampler: watches one contender while it drains

class Sampler(threading.Thread):
    """Polls the contender's slot (confirmed_flush_lsn, walsender pid), the
    staging backend's pid (by application_name), and /proc for CPU and RSS.
    Sets `reached` when the slot has confirmed the target; `final` then holds
    the readings taken at that moment."""

    def __init__(self, src, slot, target, pid, staging=None, stg_db=None, stg_appname=None,
                 interval=0.02, start_lsn=None):
        super().__init__(daemon=True)
        self.src, self.slot, self.target, self.pid = src, slot, target, pid
        self.staging, self.stg_db, self.stg_appname = staging, stg_db, stg_appname
        self.interval = interval
        self.start_lsn = start_lsn
        self.t0 = time.monotonic()
        self.reached = threading.Event()
        self.halt = threading.Event()
        self.final = None
        self.walsender_pid = None
        self.staging_pid = None
        self.tids = set()
        self.last = {"walsender": None, "staging": None, "proc": None}
        self.series = []  # (t, rss_kb, confirmed_lsn, proc_cpu)
        self.error = None

    def run(self):
        try:
            self._run()
        except Exception as e:  # reported by the caller
            self.error = e
            self.reached.set()

    def _run(self):
        sconn = self.src.connect("postgres")
        gconn = self.staging.connect(self.stg_db) if self.staging else None
        try:
            scur = sconn.cursor()
            gcur = gconn.cursor() if gconn else None
            while not self.halt.is_set():
                now = time.monotonic()
                scur.execute("SELECT confirmed_flush_lsn::text, active_pid FROM pg_replication_slots "
                             "WHERE slot_name = %s", (self.slot,))
                row = scur.fetchone()
                confirmed = lsn_int(row[0]) if row and row[0] else 0
                if row and row[1]:
                    self.walsender_pid = row[1]
                if gcur is not None and self.staging_pid is None:
                    gcur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                                 "AND datname = %s", (self.stg_appname, self.stg_db))
                    r = gcur.fetchone()
                    self.staging_pid = r[0] if r else None
                for key, pid in (("walsender", self.walsender_pid), ("staging", self.staging_pid),
                                 ("proc", self.pid)):
                    v = proc_cpu(pid)
                    if v is not None:
                        self.last[key] = v
                try:
                    self.tids.update(int(t) for t in os.listdir(f"/proc/{self.pid}/task"))
                except OSError:
                    pass
                rss = proc_status_kb(self.pid, "VmRSS")
                self.series.append((now - self.t0, rss, confirmed, self.last["proc"]))
                if confirmed >= self.target and not self.reached.is_set():
                    self.final = {"t": now, "cpu": dict(self.last),
                                  "hwm_kb": proc_status_kb(self.pid, "VmHWM")}
                    self.reached.set()
                self.halt.wait(self.interval)
        finally:
            sconn.close()
            if gconn:
                gconn.close()


# --------------------------------------------------------------------------
# mirror apply: `walpipe work` draining a staged backlog into a mirror table.
# The bench's "mirror" phase runs it with the shipped claim mode; bench/mirror_apply.py
# (a thin wrapper) also compares claiming by staging batch and a backlog of small batches.

MIRROR_WORKERS = (1, 2, 4)
MIRROR_SOURCE = "mirror"            # walpipe's source name and the source database
MIRROR_SLOT = "walpipe_mirror"
MIRROR_CHECK = "SELECT count(*), sum(v), md5(string_agg(t, '' ORDER BY id)) FROM {}"


def mirror_config(path, source, staging, stg_db, claim_size):
    """walpipe's config for the mirror phase: no workers in `walpipe run` (staging only)."""
    cfg = wptest.write_config(path, staging.conninfo(stg_db),
                              {MIRROR_SOURCE: {"conninfo": source.conninfo(MIRROR_SOURCE), "slot": MIRROR_SLOT}},
                              staging_extra={"batch_rows": 10000})
    with open(cfg, "a") as f:
        f.write(f"\n[workers]\ncount = 0\nclaim_size = {claim_size}\n")
    return cfg


def mirror_stage(source, staging, stg_db, workdir, backlog, changes, binary=None):
    """Stages a backlog on table `bench` of the source database MIRROR_SOURCE (created if
    missing) into staging database stg_db (emptied) with `walpipe run`, then stops it.
    bulk: `changes` changes in two big transactions (half inserts, half updates of those
    rows), staged in batches of hundreds of rows.  trickle: single-row transactions 0.5 ms
    apart, which the stager commits one or a few at a time.  Returns the facts."""
    if not source.scalar("SELECT count(*) FROM pg_database WHERE datname = %s", (MIRROR_SOURCE,)):
        source.createdb(MIRROR_SOURCE)
    db = MIRROR_SOURCE
    source.sql("DROP TABLE IF EXISTS bench; CREATE TABLE bench (id int PRIMARY KEY, v int, t text)", dbname=db)
    staging.sql("DROP SCHEMA IF EXISTS analytics CASCADE; DROP SCHEMA IF EXISTS walpipe CASCADE", dbname=stg_db)
    if wptest.slot_info(source, MIRROR_SLOT):
        wptest.drop_slot(source, db, MIRROR_SLOT)
    wptest.create_slot(source, db, MIRROR_SLOT)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = mirror_config(workdir / f"stage-{backlog}.conf", source, staging, stg_db, 1000)
    w = wptest.Walpipe(cfg, workdir / f"stage-{backlog}", binary=binary, name=f"stage-{backlog}")
    try:
        r = w.init()
        if r.returncode != 0:
            raise RuntimeError(f"walpipe init failed: {r.stdout}{r.stderr}")
        w.start()
        t0 = time.monotonic()
        if backlog == "bulk":
            half = changes // 2
            source.sql(f"INSERT INTO bench SELECT g, g, md5(g::text) FROM generate_series(1, {half}) g", dbname=db)
            source.sql(f"UPDATE bench SET v = v + 1, t = t || 'x' WHERE id <= {changes - half}", dbname=db)
        else:
            conn = source.connect(db)
            with conn.cursor() as cur:
                for g in range(1, changes + 1):
                    cur.execute("INSERT INTO bench VALUES (%s, %s, md5(%s::text))", (g, g, g))
                    time.sleep(0.0005)  # slower than a staging commit: batches of one or a few rows
            conn.close()
        target = source.scalar("SELECT pg_current_wal_lsn()::text", dbname=db)
        wptest.wait_until(lambda: source.scalar(
            "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
            (target, MIRROR_SLOT), dbname=db), timeout=1800, what="the backlog staged", walpipe=w)
        staged_s = time.monotonic() - t0
        code = w.stop(timeout=120)
        if code != 0:
            raise RuntimeError(f"walpipe run exited {code} after staging; see {w.log_path}")
    finally:
        w.close()
    wptest.drop_slot(source, db, MIRROR_SLOT)  # staged: the slot would only hold WAL from now on
    batches = staging.scalar("SELECT count(DISTINCT batch_id) FROM walpipe.raw_events", dbname=stg_db)
    return {"backlog": backlog, "changes": changes, "batches": batches, "stage_seconds": staged_s,
            "config": cfg, "expect": source.sql(MIRROR_CHECK.format("bench"), dbname=db)[0]}


def mirror_reset(staging, stg_db):
    """Drops the mirror tables and marks every staged event unprocessed again."""
    staging.sql("""
        DO $$ DECLARE r record; BEGIN
          FOR r IN SELECT tombstones FROM walpipe.mirrors LOOP
            EXECUTE format('DROP TABLE walpipe.%I', r.tombstones);
          END LOOP;
        END $$;
        DROP SCHEMA IF EXISTS analytics CASCADE;
        TRUNCATE walpipe.mirrors, walpipe.dead_letters;
        UPDATE walpipe.raw_events SET processed = false""", dbname=stg_db)
    staging.sql("VACUUM ANALYZE walpipe.raw_events", dbname=stg_db)


def mirror_drain(staging, stg_db, facts, workers, claim, workdir, binary=None):
    """One timed drain: reset, `walpipe work --workers N` until nothing is unprocessed.
    Time runs from process start to the commit of the last claim (the newest commit
    timestamp on raw_events: staging needs track_commit_timestamp).  CPU is read from /proc
    for walpipe and for its workers' staging backends (application_name walpipe_worker_N)."""
    mirror_reset(staging, stg_db)
    env = {"WALPIPE_BENCH_CLAIM": "batch"} if claim == "batch" else {}
    work = wptest.Walpipe(facts["config"], Path(workdir) / f"work-{facts['backlog']}-{claim}-{workers}",
                          binary=binary, name=f"work-{claim}-{workers}")
    res = {"workers": workers, "claim": claim, "changes": facts["changes"]}
    try:
        t0 = time.time()
        work.start(extra_env=env, subcommand="work", args=["--workers", workers])
        # polled gently: a query every few ms would take CPU from the workers; the time
        # itself comes from the commit timestamps, not from this loop
        wptest.wait_until(lambda: not staging.scalar(
            "SELECT EXISTS (SELECT 1 FROM walpipe.raw_events WHERE NOT processed)", dbname=stg_db),
            timeout=1800, interval=0.1, what="the mirror drain", walpipe=work)
        pids = [r[0] for r in staging.sql("SELECT pid FROM pg_stat_activity WHERE datname = %s AND "
                                          "application_name LIKE 'walpipe\\_worker\\_%%'", (stg_db,))]
        res["cpu_proc_s"] = proc_cpu(work.pid)
        res["cpu_staging_s"] = sum(proc_cpu(p) or 0 for p in pids) if pids else None
        res["peak_rss_kb"] = proc_status_kb(work.pid, "VmHWM")
        code = work.stop(timeout=120)
        if code != 0:
            raise RuntimeError(f"walpipe work exited {code}; see {work.log_path}")
    finally:
        work.close()
    t_end = staging.scalar("SELECT extract(epoch FROM max(pg_xact_commit_timestamp(xmin))) FROM walpipe.raw_events",
                           dbname=stg_db)
    res["seconds"] = float(t_end) - t0
    res["changes_per_s"] = facts["changes"] / res["seconds"]
    got = staging.sql(MIRROR_CHECK.format("analytics.public_bench"), dbname=stg_db)[0]
    res["rows_ok"] = got == facts["expect"]
    res["dead_letters"] = staging.scalar("SELECT count(*) FROM walpipe.dead_letters", dbname=stg_db)
    return res


def mirror_runs(source, staging, stg_db, facts, workers, claims, repeat, claim_size, workdir, binary=None,
                before=None, report=None):
    """Drains the staged backlog `repeat` times with each claim mode and worker count,
    interleaved; returns every run.  before(): called before each run; report(run): after."""
    if "batch" in claims:
        staging.sql("CREATE INDEX IF NOT EXISTS raw_events_batch ON walpipe.raw_events (batch_id) "
                    "WHERE NOT processed", dbname=stg_db)
    runs = []
    for k in range(repeat):
        for claim in claims:
            mirror_config(facts["config"], source, staging, stg_db,
                          10000 if claim == "batch" else claim_size)
            for n in workers:
                if before:
                    before()
                r = mirror_drain(staging, stg_db, facts, n, claim, workdir, binary)
                r["repetition"] = k + 1
                runs.append(r)
                if report:
                    report(r)
    return runs


# --------------------------------------------------------------------------
# the bench

class Bench:
    def __init__(self, args):
        self.args = args
        self.scale = args.scale
        self.sizes = {k: max(MIN_SIZES.get(k, 1), int(round(v * args.scale))) for k, v in SIZES.items()}
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = self.out / "work"
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir()
        self.results = []        # one dict per (workload, contender)
        self.workload_info = {}  # workload -> generation facts
        self.latency = None
        self.backlog = None
        self.mirror = None       # the mirror phase: the staged backlog and one result per worker count
        self.src = self.stg = None
        self.walpipe_bin = wptest.walpipe_bin()

    # -- clusters

    def start_clusters(self):
        log("starting source and staging clusters")
        self.src = wptest.PgCluster("bench-source", **SOURCE_SETTINGS).start()
        self.stg = wptest.PgCluster("bench-staging", **STAGING_SETTINGS).start()
        for db in ("bench", "idle"):
            self.src.createdb(db)
            self.src.sql("CREATE EXTENSION pg_walinspect", dbname=db)
        self.src.sql(ORDERS_DDL, dbname="bench")
        self.src.sql("CREATE TABLE idle_t (id int PRIMARY KEY, v text)", dbname="idle")
        cols = wide_columns()
        self.src.sql("CREATE TABLE wide (" + ", ".join(f"{n} {t}" for n, t, _ in cols) + ")",
                     dbname="bench")

    def stop_clusters(self):
        for c in (self.src, self.stg):
            if c is not None:
                c.destroy()

    def checkpoint(self):
        self.src.sql("CHECKPOINT")
        self.stg.sql("CHECKPOINT")

    # -- workload generation

    def pgbench(self, db, txns=None, rate=None, seconds=None, clients=4, pairs=1):
        script = self.work / f"oltp{pairs}.sql"
        script.write_text(oltp_script(pairs))
        cmd = [str(PG_BIN / "pgbench"), "-n", "-M", "prepared", "-f", str(script), "-c", str(clients),
               "-j", "2", "-h", str(self.src.socket_dir), "-p", str(self.src.port), "-U", "postgres"]
        if txns is not None:
            cmd += ["-t", str(max(1, txns // clients))]
        if rate is not None:
            cmd += ["-R", f"{rate:.1f}"]
        if seconds is not None:
            cmd += ["-T", str(seconds)]
        cmd.append(db)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        elapsed = time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError(f"pgbench failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        m = re.search(r"number of transactions actually processed: (\d+)", r.stdout)
        tps = re.search(r"tps = ([\d.]+)", r.stdout)
        lat = re.search(r"latency average = ([\d.]+) ms", r.stdout)
        failed = re.search(r"number of failed transactions: (\d+)", r.stdout)
        return {"txns": int(m.group(1)), "tps": float(tps.group(1)) if tps else None,
                "seconds": elapsed, "latency_avg_ms": float(lat.group(1)) if lat else None,
                "failed": int(failed.group(1)) if failed else 0, "stdout": r.stdout}

    def marker(self, db="bench"):
        """Commits a marker transaction; returns the end LSN of its commit record."""
        conn = self.src.connect(db, autocommit=False)
        try:
            cur = conn.cursor()
            cur.execute("SELECT pg_current_wal_insert_lsn()::text, pg_current_xact_id()::text::bigint")
            start, xid = cur.fetchone()
            cur.execute("SELECT pg_logical_emit_message(true, %s, 'end')", (MARKER_PREFIX,))
            conn.commit()
            conn.autocommit = True
            cur.execute("SELECT end_lsn::text FROM pg_get_wal_records_info(%s, pg_current_wal_flush_lsn()) "
                        "WHERE xid::text = %s AND resource_manager = 'Transaction' "
                        "AND record_type LIKE 'COMMIT%%'", (start, str(xid & 0xFFFFFFFF)))
            row = cur.fetchone()
            if not row:
                raise RuntimeError("could not find the marker's commit record with pg_walinspect")
            return lsn_int(row[0])
        finally:
            conn.close()

    def make_slots(self, db, prefix, contenders):
        """One base slot, copied once per contender at the same position; the base is dropped."""
        base = f"{prefix}_base"
        if not self.src.scalar("SELECT count(*) FROM pg_publication WHERE pubname = %s", (PUBLICATION,),
                               dbname=db):
            self.src.sql(f"CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES", dbname=db)
        wptest.create_slot(self.src, db, base)
        slots = {}
        for c in contenders:
            slots[c] = f"{prefix}_{c}"
            self.src.sql("SELECT pg_copy_logical_replication_slot(%s, %s, false, %s)",
                         (base, slots[c], "pgoutput" if "_pgoutput" in c else "wal2json"), dbname=db)
        wptest.drop_slot(self.src, db, base)
        pos = {r[0]: r[1] for r in self.src.sql(
            "SELECT slot_name, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = ANY(%s)",
            (list(slots.values()),))}
        assert len(set(pos.values())) == 1, f"slot copies disagree: {pos}"
        return slots, lsn_int(next(iter(pos.values())))

    def drop_slots(self, db, slots):
        for s in slots.values():
            if wptest.slot_info(self.src, s):
                wptest.drop_slot(self.src, db, s)

    def generate(self, workload):
        """Runs the workload; returns (facts dict, expected staged rows, db of the slots)."""
        s = self.sizes
        t0 = time.monotonic()
        if workload == "oltp":
            r = self.pgbench("bench", txns=s["oltp_txns"])
            facts = {"transactions": r["txns"], "source_tps": r["tps"]}
            expected = 2 * r["txns"]
        elif workload == "bulk":
            n = s["bulk_rows"]
            self.src.sql(f"INSERT INTO orders ({ORDERS_COLS}) " + ORDERS_SELECT.format(lo=1, hi=n),
                         dbname="bench")
            facts = {"transactions": 1}
            expected = n
        elif workload == "wide":
            n, per = s["wide_rows"], 1000
            cols = wide_columns()
            ins = (f"INSERT INTO wide ({', '.join(c[0] for c in cols)}) SELECT "
                   f"{', '.join(c[2] for c in cols)} FROM generate_series(lo, hi) g")
            self.src.sql(f"""DO $$ DECLARE lo bigint; hi bigint; BEGIN
                FOR i IN 0..{(n + per - 1) // per - 1} LOOP
                    lo := i * {per} + 1; hi := least((i + 1) * {per}, {n});
                    {ins}; COMMIT;
                END LOOP; END $$""", dbname="bench")
            facts = {"transactions": (n + per - 1) // per}
            expected = n
        elif workload == "idle":
            r = self.pgbench("bench", txns=s["idle_busy_txns"])
            facts = {"busy_transactions": r["txns"], "busy_changes": 2 * r["txns"]}
            expected = 0
        else:
            raise ValueError(workload)
        facts["generate_seconds"] = time.monotonic() - t0
        return facts, expected

    # -- contenders

    def new_staging(self, name):
        """A fresh staging database with walpipe's schema (walpipe init); returns (db, Walpipe)."""
        db = f"stg_{name}"
        self.stg.sql(f'DROP DATABASE IF EXISTS "{db}"')
        self.stg.createdb(db)
        return db

    def walpipe_for(self, stg_db, src_db, slot, name, plugin="wal2json"):
        src = {"conninfo": self.src.conninfo(src_db), "slot": slot}
        if plugin == "pgoutput":
            src.update(plugin="pgoutput", publication=PUBLICATION)
        cfg = wptest.write_config(self.work / f"{name}.conf", self.stg.conninfo(stg_db), {SOURCE_NAME: src})
        with open(cfg, "a") as f:
            f.write("\n[workers]\ncount = 0\n")  # staging only: transform workers would share the CPU
        wp = wptest.Walpipe(cfg, self.work / name, binary=self.walpipe_bin, name=name)
        r = wp.init()
        if r.returncode != 0:
            raise RuntimeError(f"walpipe init failed: {r.stdout}{r.stderr}")
        return wp

    def wait_quiet(self):
        """--wait-quiet S: wait up to S seconds for the rest of the machine to use < 0.35 cores."""
        limit = self.args.wait_quiet
        if not limit:
            return None
        deadline = time.monotonic() + limit
        while True:
            b0 = machine_busy_s()
            time.sleep(2)
            load = (machine_busy_s() - b0) / 2
            if load < 0.35 or time.monotonic() > deadline:
                return load
            log(f"  waiting for a quieter machine (others use {load:.2f} cores)")

    def run_contender(self, workload, contender, src_db, slot, target, start_lsn, expected,
                      timeout=3600):
        name = f"{workload}_{contender}"
        self.checkpoint()
        self.wait_quiet()
        res = {"workload": workload, "contender": contender, "expected_rows": expected}
        stg_db = wp = proc = None
        plugin = plugin_of(contender)
        contender = kind_of(contender)  # the program; res keeps the full name
        if contender != "pg_recvlogical":
            stg_db = self.new_staging(name)
            # init gives python the same schema too
            wp = self.walpipe_for(stg_db, src_db, slot, name, plugin=plugin)
        perf = self.start_perf(name, contender, None) if self.args.perf == "system" else None
        t0 = time.monotonic()
        if contender == "pg_recvlogical":
            env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
            env["PGOPTIONS"] = SOURCE_PGOPTIONS
            cmd = [str(PG_BIN / "pg_recvlogical"), "-d", self.src.conninfo(src_db), "-S", slot,
                   "--start", "-f", "/dev/null", "-E", lsn_text(target), "--no-loop"]
            for o in PGOUTPUT_OPTIONS if plugin == "pgoutput" else WAL2JSON_OPTIONS:
                cmd += ["-o", o]
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    preexec_fn=wptest._set_pdeathsig)
            pid = proc.pid
            appname = None
        elif contender == "walpipe":
            wp.start()
            pid = wp.pid
            appname = f"walpipe_stager_{SOURCE_NAME}"
        else:
            logf = open(self.work / f"{name}.log", "ab")
            cmd = ["/usr/bin/python3", str(REPO / "bench" / "python_consumer.py"),
                   "--source", self.src.conninfo(src_db), "--staging", self.stg.conninfo(stg_db),
                   "--slot", slot, "--name", SOURCE_NAME]
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    preexec_fn=wptest._set_pdeathsig)
            logf.close()
            pid = proc.pid
            appname = f"pyconsumer_stager_{SOURCE_NAME}"
        busy0 = machine_busy_s()
        if self.args.perf == "walpipe":
            perf = self.start_perf(name, contender, pid)
        sampler = Sampler(self.src, slot, target, pid, self.stg if stg_db else None, stg_db, appname,
                          start_lsn=start_lsn)
        sampler.t0 = t0
        sampler.start()
        try:
            if contender == "pg_recvlogical":
                _, status, ru = os.wait4(pid, 0)
                t_end = time.monotonic()
                proc.returncode = os.waitstatus_to_exitcode(status)
                err = proc.stderr.read().decode(errors="replace")
                if proc.returncode != 0:
                    raise RuntimeError(f"pg_recvlogical exited {proc.returncode}: {err}")
                time.sleep(2 * sampler.interval)
                res.update(seconds=t_end - t0, cpu_proc_s=ru.ru_utime + ru.ru_stime,
                           peak_rss_kb=ru.ru_maxrss, cpu_walsender_s=sampler.last["walsender"],
                           cpu_staging_s=None)
                busy = machine_busy_s() - busy0
            else:
                deadline = t0 + timeout
                while not sampler.reached.wait(0.05):
                    alive = wp.running if contender == "walpipe" else proc.poll() is None
                    if not alive:
                        raise RuntimeError(f"{name} exited before reaching the target LSN; see "
                                           f"{self.work / name}")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name} did not reach the target LSN in {timeout}s")
                if sampler.error:
                    raise sampler.error
                busy = machine_busy_s() - busy0
                f = sampler.final
                res.update(seconds=f["t"] - t0, cpu_proc_s=f["cpu"]["proc"],
                           cpu_walsender_s=f["cpu"]["walsender"], cpu_staging_s=f["cpu"]["staging"],
                           peak_rss_kb=f["hwm_kb"])
        finally:
            self.stop_perf(perf)
            sampler.halt.set()
            sampler.join()
            if contender == "walpipe":
                code = wp.stop(timeout=120)
                res["exit_code"] = code
            elif contender == "python":
                proc.send_signal(signal.SIGTERM)
                res["exit_code"] = proc.wait(120)
            if wp is not None:
                wp.close()
        res["series"] = sampler.series
        res["pids"] = {"process": pid, "walsender": sampler.walsender_pid, "staging": sampler.staging_pid}
        res["tids"] = sorted(sampler.tids)
        ours = sum(res.get(k) or 0 for k in ("cpu_proc_s", "cpu_walsender_s", "cpu_staging_s"))
        # CPU the rest of the machine used meanwhile (other sessions, our own sampler and
        # the source's other backends), in cores: a shared machine shows up here
        res["other_load_cores"] = max(0.0, busy - ours) / res["seconds"]
        if stg_db:
            rows = self.stg.sql("SELECT event_type, count(*) FROM walpipe.raw_events GROUP BY 1",
                                dbname=stg_db)
            counts = dict(rows)
            res["staged_rows"] = sum(counts.values())
            res["staged_by_type"] = counts
            # the marker message is one more row; it is not counted as a workload change
            res["rows_ok"] = (counts.get("message", 0) == (1 if workload != "idle" else 0) and
                              res["staged_rows"] - counts.get("message", 0) == expected)
            # order-independent checksum of what was staged (not id/received_at/batch_id, which
            # differ by design): walpipe and the Python consumer must stage the same rows
            res["content_checksum"] = self.stg.scalar(
                "SELECT sum(hashtext(concat_ws('|', event_type, payload::text, lsn, xid, commit_ts, seq, "
                "schema_name, table_name, shape_id))::bigint)::text FROM walpipe.raw_events", dbname=stg_db)
            res["batches"] = self.stg.scalar("SELECT count(DISTINCT batch_id) FROM walpipe.raw_events",
                                             dbname=stg_db)
            res["dead_letters"] = self.stg.scalar("SELECT count(*) FROM walpipe.dead_letters",
                                                  dbname=stg_db)
        return res, stg_db

    def start_perf(self, name, contender, pid):
        """--perf system: perf record -a (every process, flat); --perf walpipe: the walpipe process
        only, with DWARF call graphs.  Profiles land in OUT/perf/NAME.data."""
        mode = self.args.perf
        if not mode or kind_of(contender) != "walpipe":
            return None
        d = self.out / "perf"
        d.mkdir(exist_ok=True)
        data = d / f"{name}-{mode}.data"
        if mode == "system":
            cmd = ["perf", "record", "-e", "cpu-clock", "-F", "2000", "-a", "-o", str(data)]
        else:
            cmd = ["perf", "record", "-e", "cpu-clock", "-F", "1000", "--call-graph", "dwarf,32768",
                   "-p", str(pid), "-o", str(data)]
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=open(d / f"{name}-{mode}.log", "wb"))
        if mode == "system":
            time.sleep(0.5)  # let perf set up before the timed run starts
        return p

    def stop_perf(self, p):
        if p is not None:
            p.send_signal(signal.SIGINT)
            p.wait(120)

    def finish_result(self, res, changes):
        res["changes"] = changes
        secs = res["seconds"]
        res["changes_per_s"] = changes / secs if changes and secs else None
        for k in ("cpu_proc_s", "cpu_walsender_s", "cpu_staging_s"):
            v = res.get(k)
            res[k[:-2] + "_per_100k"] = (v * 100_000 / changes) if v is not None and changes else None

    # -- phases

    def run_workload(self, workload):
        contenders = [c for c in CONTENDERS if c in self.args.contenders]
        reps = self.args.repeat
        db = "idle" if workload == "idle" else "bench"
        log(f"{WORKLOAD_TITLES[workload]}: creating slots, generating the workload")
        self.src.sql("TRUNCATE orders, wide", dbname="bench")
        self.checkpoint()
        runs = [(c, k) for k in range(reps) for c in contenders]  # round robin over repetitions
        slots, start_lsn = self.make_slots(db, f"b_{workload}", [f"{c}_{k}" for c, k in runs])
        facts, expected = self.generate(workload)
        if workload == "idle":
            target = lsn_int(self.src.scalar("SELECT pg_current_wal_flush_lsn()::text"))
            changes = 0
        else:
            target = self.marker(db)
            changes = expected
        facts["wal_bytes"] = target - start_lsn
        facts["changes"] = changes
        self.workload_info[workload] = facts
        log(f"  {changes} changes, {facts['wal_bytes'] / 1e6:.0f} MB of WAL in "
            f"{facts['generate_seconds']:.1f}s; target LSN {lsn_text(target)}")
        every = {c: [] for c in contenders}
        for c, k in runs:
            slot = slots[f"{c}_{k}"]
            res, stg_db = self.run_contender(workload, c, db, slot, target, start_lsn, expected)
            self.finish_result(res, changes)
            res["wal_bytes"] = facts["wal_bytes"]
            res["repetition"] = k + 1
            res.pop("series")
            every[c].append(res)
            if stg_db:
                self.stg.sql(f'DROP DATABASE "{stg_db}"')
            wptest.drop_slot(self.src, db, slot)
            log("  " + self.describe(res))
        for c in contenders:
            # the median run by time stands for the contender; every run is kept in results.json
            rs = sorted(every[c], key=lambda r: r["seconds"])
            med = dict(rs[(len(rs) - 1) // 2])
            med["all_seconds"] = [r["seconds"] for r in every[c]]
            if reps > 1:
                med["runs"] = every[c]
            self.results.append(med)
        self.src.sql("TRUNCATE orders, wide", dbname="bench")

    def describe(self, r):
        parts = [f"{r['contender']:>14}: {r['seconds']:7.2f}s"]
        if r.get("changes_per_s"):
            parts.append(f"{r['changes_per_s']:>9,.0f} changes/s")
        parts.append(f"cpu {r['cpu_proc_s'] or 0:.2f}s")
        if r.get("cpu_walsender_s") is not None:
            parts.append(f"walsender {r['cpu_walsender_s']:.2f}s")
        if r.get("cpu_staging_s") is not None:
            parts.append(f"staging {r['cpu_staging_s']:.2f}s")
        if r.get("peak_rss_kb"):
            parts.append(f"peak RSS {r['peak_rss_kb'] / 1024:.1f} MB")
        parts.append(f"others {r['other_load_cores']:.2f} cores")
        if r.get("batches"):
            parts.append(f"{r['batches']} batches")
        if "staged_rows" in r:
            parts.append(f"staged {r['staged_rows']} ({'ok' if r['rows_ok'] else 'MISMATCH'})")
        return ", ".join(parts)

    def run_latency(self):
        """walpipe live while pgbench writes (a)-shaped transactions.  First the live capacity:
        pgbench unthrottled, capacity = changes staged per second inside that window (source,
        walsender, walpipe and staging share the 2 cores, as they would in production on one
        box).  Then latency at a steady 50% of it (pgbench -R): source commit time (commit_ts)
        -> staging commit time of the row (track_commit_timestamp), i.e. when it became visible."""
        secs = self.sizes["latency_seconds"]
        cap_secs = max(10, secs // 2)
        self.src.sql("TRUNCATE orders", dbname="bench")
        self.checkpoint()
        slot = "b_latency_walpipe"
        wptest.create_slot(self.src, "bench", slot)
        stg_db = self.new_staging("latency")
        wp = self.walpipe_for(stg_db, "bench", slot, "latency_walpipe")
        wp.start()

        def caught_up(target):
            wptest.wait_until(lambda: lsn_int(self.src.scalar(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                (slot,))) >= target, timeout=600, what="walpipe caught up", walpipe=wp)

        def now():
            return self.src.scalar("SELECT clock_timestamp()")
        try:
            wptest.wait_until(lambda: "streaming from slot" in wp.log(since_start=True), timeout=60,
                              what="walpipe streaming", walpipe=wp)
            time.sleep(1)
            if self.args.latency_rate:
                rate, cap = self.args.latency_rate, None
            else:
                log(f"latency: walpipe live; capacity first: pgbench unthrottled for {cap_secs}s")
                c0 = now()
                cap_gen = self.pgbench("bench", seconds=cap_secs)
                c1 = now()
                caught_up(self.marker("bench"))
                staged_in_window = self.stg.scalar(
                    "SELECT count(*) FROM walpipe.raw_events WHERE event_type <> 'message' "
                    "AND pg_xact_commit_timestamp(xmin) BETWEEN %s AND %s", (c0, c1), dbname=stg_db)
                window = (c1 - c0).total_seconds()
                cap = {"changes_per_s": staged_in_window / window, "source_tps": cap_gen["tps"],
                       "seconds": window}
                rate = 0.5 * cap["changes_per_s"]
                log(f"  live capacity {cap['changes_per_s']:,.0f} changes/s staged "
                    f"(source committed {2 * cap_gen['tps']:,.0f}/s)")
            log(f"latency: pgbench -R {rate / 2:,.0f} tps ({rate:,.0f} changes/s) for {secs}s")
            t0 = now()
            gen = self.pgbench("bench", rate=rate / 2, seconds=secs)
            caught_up(self.marker("bench"))
            hwm = wp.rss_peak_kb()
        finally:
            wp.stop(timeout=120)
            wp.close()
        rows = self.stg.sql(
            "SELECT extract(epoch FROM commit_ts), "
            "1000 * extract(epoch FROM pg_xact_commit_timestamp(xmin) - commit_ts), "
            "1000 * extract(epoch FROM received_at - commit_ts) "
            "FROM walpipe.raw_events WHERE event_type <> 'message' AND commit_ts >= %s "
            "ORDER BY commit_ts, seq", (t0,), dbname=stg_db)
        self.stg.sql(f'DROP DATABASE "{stg_db}"')
        wptest.drop_slot(self.src, "bench", slot)
        t_first = float(rows[0][0])
        vis = sorted(float(r[1]) for r in rows)
        recv = sorted(float(r[2]) for r in rows)
        span = float(rows[-1][0]) - t_first
        self.latency = {
            "target_changes_per_s": rate, "capacity": cap, "seconds": secs,
            "changes": len(rows), "achieved_changes_per_s": len(rows) / span if span > 0 else None,
            "pgbench_tps": gen["tps"], "peak_rss_kb": hwm,
            "visible_ms": {"p50": pct(vis, 50), "p90": pct(vis, 90), "p99": pct(vis, 99), "max": vis[-1]},
            "received_ms": {"p50": pct(recv, 50), "p99": pct(recv, 99), "max": recv[-1]},
        }
        with open(self.out / "latency.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["t_s", "commit_to_visible_ms", "commit_to_received_at_ms"])
            for r in rows:
                w.writerow([f"{float(r[0]) - t_first:.6f}", f"{float(r[1]):.3f}", f"{float(r[2]):.3f}"])
        v = self.latency["visible_ms"]
        log(f"  {len(rows)} changes at {self.latency['achieved_changes_per_s']:,.0f}/s: commit -> visible "
            f"p50 {v['p50']:.1f} ms, p99 {v['p99']:.1f} ms, max {v['max']:.1f} ms")

    def run_backlog(self):
        n = self.sizes["backlog_changes"]
        per = 10_000
        log(f"backlog: generating {n:,} changes behind walpipe's slot")
        self.src.sql("TRUNCATE orders", dbname="bench")
        self.checkpoint()
        slots, start_lsn = self.make_slots("bench", "b_backlog", ["walpipe"])
        slot = slots["walpipe"]
        t0 = time.monotonic()
        sel = ORDERS_SELECT.format(lo="lo", hi="hi")
        self.src.sql(f"""DO $$ DECLARE lo bigint; hi bigint; BEGIN
            FOR i IN 0..{(n + per - 1) // per - 1} LOOP
                lo := i * {per} + 1; hi := least((i + 1) * {per}, {n});
                INSERT INTO orders ({ORDERS_COLS}) {sel}; COMMIT;
            END LOOP; END $$""", dbname="bench")
        gen_s = time.monotonic() - t0
        target = self.marker("bench")
        log(f"  {(target - start_lsn) / 1e6:.0f} MB of WAL in {gen_s:.1f}s; draining")
        res, stg_db = self.run_contender("backlog", "walpipe", "bench", slot, target, start_lsn, n,
                                         timeout=7200)
        self.finish_result(res, n)
        series = res.pop("series")
        self.stg.sql(f'DROP DATABASE "{stg_db}"')
        wptest.drop_slot(self.src, "bench", slot)
        self.src.sql("TRUNCATE orders", dbname="bench")
        res["wal_bytes"] = target - start_lsn
        self.backlog = res
        with open(self.out / "backlog.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["t_s", "rss_mb", "drained_pct", "cpu_s"])
            for t, rss, confirmed, cpu in series:
                if rss is None:
                    continue
                done = max(0.0, min(100.0, 100.0 * (confirmed - start_lsn) / (target - start_lsn)))
                w.writerow([f"{t:.3f}", f"{rss / 1024:.2f}", f"{done:.2f}", cpu])
        rss = [s[1] for s in series if s[1]]
        res["rss_min_kb"] = min(rss) if rss else None
        res["rss_max_kb"] = max(rss) if rss else None
        log("  " + self.describe(res))

    def run_mirror(self):
        """Mirror apply rate: a backlog staged by `walpipe run` (no workers), then drained by
        `walpipe work --workers N` for N in MIRROR_WORKERS, round robin over --repeat, the
        mirror table checked against the source after each drain."""
        n = self.sizes["mirror_changes"]
        stg_db = self.new_staging("mirror")
        log(f"mirror apply: staging {n:,} changes (bulk), then `walpipe work` with "
            f"{', '.join(map(str, MIRROR_WORKERS))} workers")
        self.checkpoint()
        facts = mirror_stage(self.src, self.stg, stg_db, self.work / "mirror", "bulk", n, self.walpipe_bin)
        log(f"  {n:,} changes staged in {facts['batches']} batches in {facts['stage_seconds']:.1f}s")

        def before():
            self.checkpoint()
            self.wait_quiet()

        def report(r):
            log(f"  {r['workers']} worker(s): {r['seconds']:.2f}s, {r['changes_per_s']:,.0f} changes/s, "
                f"mirror {'= source' if r['rows_ok'] else 'DIFFERS from the source'}")
        runs = mirror_runs(self.src, self.stg, stg_db, facts, MIRROR_WORKERS, ["rows"], self.args.repeat, 1000,
                           self.work / "mirror", self.walpipe_bin, before, report)
        self.stg.sql(f'DROP DATABASE "{stg_db}"')
        self.src.sql("DROP TABLE bench", dbname=MIRROR_SOURCE)
        results = []
        for k in MIRROR_WORKERS:
            every = sorted((r for r in runs if r["workers"] == k), key=lambda r: r["seconds"])
            med = dict(every[(len(every) - 1) // 2])  # the median run by time, as for the workloads
            med.update(workload="mirror", contender="walpipe work", all_seconds=[r["seconds"] for r in every],
                       batches=facts["batches"])
            self.finish_result(med, n)
            if len(every) > 1:
                med["runs"] = every
            results.append(med)
        self.mirror = {"changes": n, "batches": facts["batches"], "stage_seconds": facts["stage_seconds"],
                       "claim_size": 1000, "results": results}

    def mirror_rate(self, workers):
        r = next((r for r in (self.mirror or {}).get("results", []) if r["workers"] == workers), None)
        return r["changes_per_s"] if r else None

    # -- output

    def machine(self):
        model = ""
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        mem_kb = proc_status_kb_file("/proc/meminfo", "MemTotal")

        def git(*a):
            r = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
            return r.stdout.strip()
        wal2json = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "postgresql-15-wal2json"],
                                  capture_output=True, text=True).stdout.strip()
        return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "commit": git("rev-parse", "--short=12", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
                "nproc": os.cpu_count(), "cpu_model": model,
                "ram_gb": round(mem_kb / 1024 / 1024, 1) if mem_kb else None,
                "kernel": platform.release(),
                "postgresql": self.src.scalar("SHOW server_version") if self.src else None,
                "wal2json": wal2json, "scale": self.scale, "sizes": self.sizes}

    def targets(self):
        def get(w, c):
            return next((r for r in self.results if r["workload"] == w and r["contender"] == c), None)

        def ratio(w, a, b):
            ra, rb = get(w, a), get(w, b)
            if ra and rb and ra.get("changes_per_s") and rb.get("changes_per_s"):
                return ra["changes_per_s"] / rb["changes_per_s"]
            return None
        out = []

        def add(what, goal, value, ok, fmt):
            out.append({"target": what, "goal": goal,
                        "measured": fmt.format(value) if value is not None else "not run",
                        "met": None if value is None else bool(ok(value))})
        add("walpipe / pg_recvlogical on (a)", ">= 0.9", ratio("oltp", "walpipe", "pg_recvlogical"),
            lambda v: v >= 0.9, "{:.2f}x")
        add("walpipe / pg_recvlogical on (b)", ">= 0.9", ratio("bulk", "walpipe", "pg_recvlogical"),
            lambda v: v >= 0.9, "{:.2f}x")
        add("walpipe with pgoutput / pg_recvlogical with wal2json on (a)", ">= 1.0",
            ratio("oltp", "walpipe_pgoutput", "pg_recvlogical"), lambda v: v >= 1.0, "{:.2f}x")
        add("walpipe with pgoutput / pg_recvlogical with wal2json on (b)", ">= 1.0",
            ratio("bulk", "walpipe_pgoutput", "pg_recvlogical"), lambda v: v >= 1.0, "{:.2f}x")
        add("walpipe with pgoutput / pg_recvlogical with pgoutput on (a)", "(ceiling)",
            ratio("oltp", "walpipe_pgoutput", "pg_recvlogical_pgoutput"), lambda v: True, "{:.2f}x")
        add("walpipe with pgoutput / pg_recvlogical with pgoutput on (b)", "(ceiling)",
            ratio("bulk", "walpipe_pgoutput", "pg_recvlogical_pgoutput"), lambda v: True, "{:.2f}x")
        add("walpipe / Python on (a)", ">= 5", ratio("oltp", "walpipe", "python"),
            lambda v: v >= 5, "{:.2f}x")
        lat = self.latency["visible_ms"] if self.latency else {}
        add("p99 commit -> staged at 50% capacity", "<= 50 ms", lat.get("p99"), lambda v: v <= 50,
            "{:.1f} ms")
        add("p50 commit -> staged at 50% capacity", "<= 10 ms", lat.get("p50"), lambda v: v <= 10,
            "{:.1f} ms")
        b = get("bulk", "walpipe")
        add("walpipe peak RSS on (b)", "<= 64 MB", b["peak_rss_kb"] / 1024 if b else None,
            lambda v: v <= 64, "{:.1f} MB")
        bl = self.backlog
        add("walpipe peak RSS draining the backlog", "<= 64 MB",
            bl["peak_rss_kb"] / 1024 if bl else None, lambda v: v <= 64, "{:.1f} MB")
        add("mirror apply, 2 workers", ">= 30 000 changes/s", self.mirror_rate(2), lambda v: v >= 30_000,
            "{:,.0f}/s")
        return out

    def table_md(self, machine, targets):
        L = []
        L.append(f"Run {machine['date']}, commit `{machine['commit']}`"
                 f"{' (dirty)' if machine['dirty'] else ''}, scale {machine['scale']}; "
                 f"{machine['nproc']} × {machine['cpu_model']}, {machine['ram_gb']} GB RAM, "
                 f"PostgreSQL {machine['postgresql']}, wal2json {machine['wal2json']}.")
        L.append("")
        L.append("| workload | contender | changes | seconds | changes/s | × pg_recvlogical | "
                 "CPU s/100k: process | walsender | staging backend | peak RSS MB | rows/commit | "
                 "others' load (cores) | staged |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for w in WORKLOADS + ("backlog",):
            rows = [r for r in self.results if r["workload"] == w]
            if w == "backlog" and self.backlog:
                rows = [self.backlog]
            base = next((r for r in rows if r["contender"] == "pg_recvlogical"), None)
            for r in rows:
                if w == "idle":
                    continue
                ratio = (r["changes_per_s"] / base["changes_per_s"]) if base and r.get("changes_per_s") \
                    and base.get("changes_per_s") else None
                staged = "" if "staged_rows" not in r else \
                    f"{r['staged_rows']:,} {'ok' if r['rows_ok'] else '**MISMATCH**'}"
                title = WORKLOAD_TITLES.get(w, "backlog drain")
                L.append(f"| {title} | {r['contender']} | {r['changes']:,} | {r['seconds']:.2f} | "
                         f"{fmt(r.get('changes_per_s'), '{:,.0f}')} | {fmt(ratio, '{:.2f}')} | "
                         f"{fmt(r.get('cpu_proc_per_100k'), '{:.2f}')} | "
                         f"{fmt(r.get('cpu_walsender_per_100k'), '{:.2f}')} | "
                         f"{fmt(r.get('cpu_staging_per_100k'), '{:.2f}')} | "
                         f"{fmt(r['peak_rss_kb'] / 1024 if r.get('peak_rss_kb') else None, '{:.1f}')} | "
                         f"{fmt(r['changes'] / r['batches'] if r.get('batches') else None, '{:,.0f}')} | "
                         f"{r['other_load_cores']:.2f} | {staged} |")
        idle = [r for r in self.results if r["workload"] == "idle"]
        if idle:
            info = self.workload_info["idle"]
            L.append("")
            L.append(f"(d) idle source next to a busy database: {info['busy_changes']:,} changes "
                     f"({info['wal_bytes'] / 1e6:.0f} MB of WAL) in the busy database; time until each "
                     f"contender's slot in the idle database has passed that WAL:")
            L.append("")
            L.append("| contender | seconds | WAL MB/s | CPU s: process | walsender | staging backend | "
                     "peak RSS MB | others' load (cores) | rows staged |")
            L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for r in idle:
                L.append(f"| {r['contender']} | {r['seconds']:.2f} | "
                         f"{r['wal_bytes'] / 1e6 / r['seconds']:.0f} | {fmt(r.get('cpu_proc_s'), '{:.2f}')} | "
                         f"{fmt(r.get('cpu_walsender_s'), '{:.2f}')} | {fmt(r.get('cpu_staging_s'), '{:.2f}')} | "
                         f"{fmt(r['peak_rss_kb'] / 1024 if r.get('peak_rss_kb') else None, '{:.1f}')} | "
                         f"{r['other_load_cores']:.2f} | {r.get('staged_rows', '')} |")
        same = []
        for w in WORKLOADS:
            a = next((r for r in self.results if r["workload"] == w and r["contender"] == "walpipe"), None)
            b = next((r for r in self.results if r["workload"] == w and r["contender"] == "python"), None)
            if a and b and a.get("content_checksum") is not None:
                same.append(f"{WORKLOAD_TITLES[w]} {'yes' if a['content_checksum'] == b['content_checksum'] else '**NO**'}")
        if same:
            L.append("")
            L.append("The Python consumer staged exactly the rows walpipe staged (checksum over event type, "
                     "payload, lsn, xid, commit_ts, seq, table and shape id): " + ", ".join(same) + ".")
        if self.latency:
            lat = self.latency
            v, rc = lat["visible_ms"], lat["received_ms"]
            L.append("")
            cap = lat["capacity"]
            how = (f"50% of the live capacity: with pgbench unthrottled on the same machine, walpipe staged "
                   f"{cap['changes_per_s']:,.0f} changes/s" if cap else "given with --latency-rate")
            L.append(f"Latency, walpipe live: {lat['changes']:,} changes at "
                     f"{lat['achieved_changes_per_s']:,.0f} changes/s (asked {lat['target_changes_per_s']:,.0f} = "
                     f"{how}): source commit → staged row visible (staging "
                     f"commit time) p50 {v['p50']:.1f} ms, p90 {v['p90']:.1f} ms, p99 {v['p99']:.1f} ms, "
                     f"max {v['max']:.1f} ms; source commit → received_at p50 {rc['p50']:.1f} ms, "
                     f"p99 {rc['p99']:.1f} ms.")
        if self.backlog:
            b = self.backlog
            L.append("")
            L.append(f"Backlog drain: {b['changes']:,} changes ({b['wal_bytes'] / 1e6:.0f} MB WAL) in "
                     f"{b['seconds']:.1f}s = {b['changes_per_s']:,.0f} changes/s; walpipe RSS between "
                     f"{b['rss_min_kb'] / 1024:.1f} and {b['rss_max_kb'] / 1024:.1f} MB while sampled, "
                     f"peak (VmHWM) {b['peak_rss_kb'] / 1024:.1f} MB.")
        if self.mirror:
            m = self.mirror
            one = self.mirror_rate(1)
            L.append("")
            L.append(f"Mirror apply: `walpipe work --workers N` draining {m['changes']:,} staged changes "
                     f"(inserts, then updates of those rows, of a 3-column table; {m['batches']} staging "
                     f"batches) into its mirror table, `claim_size` {m['claim_size']}, from process start "
                     f"to the last claim's commit:")
            L.append("")
            L.append("| workers | seconds | changes/s | × 1 worker | CPU s/100k: walpipe work | staging backends | "
                     "peak RSS MB | mirror |")
            L.append("|---:|---:|---:|---:|---:|---:|---:|---|")
            for r in m["results"]:
                L.append(f"| {r['workers']} | {r['seconds']:.2f} | {r['changes_per_s']:,.0f} | "
                         f"{fmt(r['changes_per_s'] / one if one else None, '{:.2f}')} | "
                         f"{fmt(r.get('cpu_proc_per_100k'), '{:.2f}')} | "
                         f"{fmt(r.get('cpu_staging_per_100k'), '{:.2f}')} | "
                         f"{fmt(r['peak_rss_kb'] / 1024 if r.get('peak_rss_kb') else None, '{:.1f}')} | "
                         f"{'= source' if r['rows_ok'] else '**DIFFERS**'} |")
            two = self.mirror_rate(2)
            L.append("")
            L.append(f"Mirror apply rate with 1, 2 and 4 workers: "
                     f"{', '.join(fmt(self.mirror_rate(k), '{:,.0f}') for k in MIRROR_WORKERS)} changes/s; "
                     f"2 workers / 1 worker: {fmt(two / one if one and two else None, '{:.2f}×')}.")
        L.append("")
        L.append("| target | goal | measured | met |")
        L.append("|---|---|---|---|")
        for t in targets:
            met = {True: "yes", False: "**no**", None: "—"}[t["met"]]
            L.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {met} |")
        return "\n".join(L) + "\n"

    def write_outputs(self):
        machine = self.machine()
        targets = self.targets()
        doc = {"machine": machine, "workloads": self.workload_info, "results": self.results,
               "latency": self.latency, "backlog": self.backlog, "mirror": self.mirror, "targets": targets}
        (self.out / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        keys = ["workload", "contender", "workers", "changes", "seconds", "changes_per_s", "cpu_proc_s",
                "cpu_walsender_s", "cpu_staging_s", "cpu_proc_per_100k", "cpu_walsender_per_100k",
                "cpu_staging_per_100k", "peak_rss_kb", "wal_bytes", "staged_rows", "rows_ok"]
        rows = list(self.results) + ([self.backlog] if self.backlog else []) + \
            (self.mirror["results"] if self.mirror else [])
        with open(self.out / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
        table = self.table_md(machine, targets)
        (self.out / "table.md").write_text(table)
        print()
        print(table)
        plots(self.out, self.results, self.latency is not None, self.backlog is not None, self.mirror)


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def fmt(v, f):
    return "" if v is None else f.format(v)


def proc_status_kb_file(path, key):
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


# --------------------------------------------------------------------------
# plots (gnuplot)

def gnuplot(out, name, script):
    path = out / f"{name}.gp"
    path.write_text(script)
    r = subprocess.run(["gnuplot", str(path)], cwd=out, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"gnuplot {name} failed: {r.stderr}", file=sys.stderr)


TERM = "set terminal pngcairo size 1000,560 font 'DejaVu Sans,11' noenhanced\n"


def plots(out, results, have_latency, have_backlog, mirror=None):
    wl = [w for w in ("oltp", "bulk", "wide") if any(r["workload"] == w for r in results)]
    if wl:
        with open(out / "throughput.dat", "w") as f:
            f.write("workload " + " ".join(CONTENDERS) + "\n")
            for w in wl:
                vals = []
                for c in CONTENDERS:
                    r = next((r for r in results if r["workload"] == w and r["contender"] == c), None)
                    vals.append(f"{r['changes_per_s']:.0f}" if r and r.get("changes_per_s") else "0")
                f.write(f"\"{WORKLOAD_TITLES[w]}\" " + " ".join(vals) + "\n")
        gnuplot(out, "throughput", TERM + f"XMAX = {len(wl) - 0.5}\n" + """set output 'throughput.png'
set title 'Draining the same WAL backlog: changes per second (higher is better)'
set style data histogram
set style histogram cluster gap 1
set style fill solid 0.8 border -1
set boxwidth 0.9
set ylabel 'changes/s'
set yrange [0:*]
set grid ytics
set key top right
set format y '%.0f'
set xrange [-0.5:XMAX]
set key autotitle columnheader
plot for [i=2:4] 'throughput.dat' using i:xtic(1), \\
     for [i=2:4] '' using ($0 + (i - 3) * 0.25):i:(sprintf('%.0f', column(i))) with labels offset 0,0.7 font ',9' notitle
""")
        nbars = 0
        with open(out / "cpu.dat", "w") as f:
            f.write("run process walsender staging\n")
            for w in wl:
                for c in CONTENDERS:
                    r = next((r for r in results if r["workload"] == w and r["contender"] == c), None)
                    if not r:
                        continue
                    vals = [r.get(k) or 0 for k in ("cpu_proc_per_100k", "cpu_walsender_per_100k",
                                                      "cpu_staging_per_100k")]
                    f.write(f"\"{WORKLOAD_TITLES[w].split()[0]} {c}\" " + " ".join(f"{v:.3f}" for v in vals) + "\n")
                    nbars += 1
        gnuplot(out, "cpu", TERM + f"XMAX = {nbars - 0.4}\n" + """set output 'cpu.png'
set title 'CPU seconds per 100 000 changes (lower is better)'
set style data histogram
set style histogram rowstacked
set style fill solid 0.8 border -1
set boxwidth 0.7
set ylabel 'CPU s / 100k changes'
set grid ytics
set xtics rotate by -30
set key top left
set xrange [-0.6:XMAX]
set key autotitle columnheader
plot 'cpu.dat' using 2:xtic(1) title 'consumer process', '' using 3 title 'walsender (source)', \\
     '' using 4 title 'staging backend'
""")
    if have_latency:
        gnuplot(out, "latency", TERM.replace("1000,560", "1100,520") + """set output 'latency.png'
set datafile separator ','
set multiplot layout 1,2 title 'walpipe live at 50% of capacity: source commit -> staged row visible'
set xlabel 'seconds into the run'
set ylabel 'ms'
set logscale y
set grid
plot 'latency.csv' every ::1 using 1:2 with dots lc rgb '#1f77b4' title 'commit -> visible'
unset logscale y
set logscale x
set xlabel 'ms (log)'
set ylabel 'percentile'
set yrange [0:100]
set key bottom right
stats 'latency.csv' every ::1 using 2 nooutput
n = STATS_records
plot '< tail -n +2 latency.csv | cut -d, -f2 | sort -g' using 1:(100.0 * $0 / n) with lines lw 2 title 'CDF'
unset multiplot
""")
    if have_backlog:
        gnuplot(out, "backlog", TERM + """set output 'backlog.png'
set datafile separator ','
set title 'walpipe draining the backlog: resident memory stays flat'
set xlabel 'seconds since walpipe started'
set ylabel 'RSS (MB)'
set y2label 'backlog drained (%)'
set yrange [0:*]
set y2range [0:100]
set ytics nomirror
set y2tics
set grid
set key bottom right
plot 'backlog.csv' every ::1 using 1:2 with lines lw 2 title 'walpipe RSS (MB)', \\
     '' every ::1 using 1:3 axes x1y2 with lines lw 2 dt 2 title 'drained (% of WAL)'
""")
    if mirror:
        with open(out / "mirror.dat", "w") as f:
            f.write("# workers changes_per_s\n")
            for r in mirror["results"]:
                f.write(f"\"{r['workers']}\" {r['changes_per_s']:.0f}\n")
        gnuplot(out, "mirror", TERM.replace("1000,560", "700,480") + f"XMAX = {len(mirror['results']) - 0.5}\n" + f"""set output 'mirror.png'
set title 'Mirror apply: walpipe work draining {mirror["changes"]:,} staged changes (higher is better)'
set style data histogram
set style fill solid 0.8 border -1
set boxwidth 0.6
set xlabel 'workers'
set ylabel 'changes/s'
set yrange [0:*]
set grid ytics
set format y '%.0f'
set xrange [-0.5:XMAX]
unset key
plot 'mirror.dat' using 2:xtic(1) lc rgb '#1f77b4', '' using 0:2:(sprintf('%.0f', $2)) with labels offset 0,0.7 font ',10'
""")


# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description="walpipe benchmark harness (see bench/bench.py)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="size factor for every workload (0.1 for a quick run; default 1 = the issue's sizes)")
    ap.add_argument("--only", default=",".join(PHASES),
                    help=f"comma-separated phases to run, from {','.join(PHASES)}")
    ap.add_argument("--skip", default="", help="comma-separated phases not to run (applied after --only)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help=f"comma-separated, from {','.join(CONTENDERS)}")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each contender this many times per workload, round robin; the median "
                         "run is reported (all runs are in results.json)")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="before each timed run wait up to S seconds until the rest of the machine "
                         "uses less than a third of a core (shared machines)")
    ap.add_argument("--latency-rate", type=float, default=None,
                    help="changes/s for the latency run (default: 50%% of the live capacity, measured first)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="output directory")
    ap.add_argument("--perf", choices=("system", "walpipe"), default=None,
                    help="profile walpipe's runs with perf record into OUT/perf/ (system: every process, "
                         "flat; walpipe: the walpipe process with call graphs).  Timings are then not comparable")
    ap.add_argument("--publish", metavar="DIR", default=None,
                    help="also copy table.md, results.csv/.json and the plots to DIR (the README "
                         "shows bench/latest)")
    ap.add_argument("--keep-work", action="store_true", help="keep the walpipe logs and configs in OUT/work")
    args = ap.parse_args()
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    args.skip = [p.strip() for p in args.skip.split(",") if p.strip()]
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    bad = [p for p in args.only + args.skip if p not in PHASES] + \
        [c for c in args.contenders if c not in CONTENDERS]
    if bad:
        ap.error(f"unknown phase or contender: {', '.join(bad)}")
    args.only = [p for p in args.only if p not in args.skip]
    b = wptest.walpipe_bin()
    if not (b.is_file() and os.access(b, os.X_OK)):
        ap.error(f"walpipe binary not found at {b}; build it (bench/run does) or set WALPIPE_BIN")

    def on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")
    signal.signal(signal.SIGTERM, on_term)

    bench = Bench(args)
    t0 = time.monotonic()
    log(f"scale {args.scale}: {bench.sizes}")
    try:
        bench.start_clusters()
        for w in WORKLOADS:
            if w in args.only:
                bench.run_workload(w)
        if "latency" in args.only:
            bench.run_latency()
        if "backlog" in args.only:
            bench.run_backlog()
        if "mirror" in args.only:
            bench.run_mirror()
        bench.write_outputs()
        if args.publish:
            pub = Path(args.publish)
            pub.mkdir(parents=True, exist_ok=True)
            for f in ["table.md", "results.csv", "results.json"] + [p.name for p in bench.out.glob("*.png")]:
                shutil.copy2(bench.out / f, pub / f)
            log(f"published to {pub}")
    finally:
        bench.stop_clusters()
        if not args.keep_work:
            shutil.rmtree(bench.work, ignore_errors=True)
    log(f"done in {time.monotonic() - t0:.0f}s; results in {bench.out}")


if __name__ == "__main__":
    main()
