#!/usr/bin/python3
"""staging_replay.py: what a raw_events row costs the staging backend, by batch size and schema.

walpipe stages N rows of workload (b) once; the harness then copies those exact COPY
rows out and replays them into fresh staging databases the way walpipe's stager
does (BEGIN + SET LOCAL batch_id, COPY, checkpoint upsert, NOTIFY, COMMIT per batch),
varying the rows per commit and the schema.  It prints the staging backend's CPU
(/proc/PID/schedstat) per 100 000 rows.  Used for README "Where the time goes".

Usage (after bench/run has built build-bench/walpipe, or with WALPIPE_BIN set):
  bench/staging_replay.py [ROWS]                 the batch-size and GIN trials
  bench/staging_replay.py --levers [ROWS]        every schema lever (sequence cache, each
                                                 index, defaults, CHECK, partition routing,
                                                 jsonb), best of --repeat (3) runs each,
                                                 interleaved, at --per (300) rows per commit
  bench/staging_replay.py --levers --perf DIR [--perf-levers baseline,...]
                                                 also perf-records the staging backend
                                                 (cpu-clock, -g) during one replay of each
"""

import argparse
import io
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
sys.path.insert(0, str(HERE))
import bench  # noqa: E402
import wptest  # noqa: E402

COLS = "source, event_type, payload, lsn, xid, commit_ts, seq, schema_name, table_name, shape_id"
SECONDARY_INDEXES = ["raw_events_unprocessed", "raw_events_received_brin", "raw_events_source_lsn"]


def backend_cpu(pid):
    """CPU seconds the backend has run: /proc/PID/schedstat (nanoseconds, exact), else utime + stime
    (10 ms ticks, which are coarse next to the 1-2 % differences measured here)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        return bench.proc_cpu(pid)


def today_partition():
    return "walpipe.raw_events_" + time.strftime("%Y%m%d", time.gmtime())


# name -> (prep statements run after `walpipe init`, COPY target or None for walpipe.raw_events)
LEVERS = {
    "baseline": ([], None),
    "seq_cache_100": (["ALTER SEQUENCE walpipe.raw_events_id_seq CACHE 100"], None),
    "seq_cache_1000": (["ALTER SEQUENCE walpipe.raw_events_id_seq CACHE 1000"], None),
    "no_pk": (["ALTER TABLE walpipe.raw_events DROP CONSTRAINT raw_events_pkey"], None),
    "no_unprocessed_idx": (["DROP INDEX walpipe.raw_events_unprocessed"], None),
    "no_received_brin": (["DROP INDEX walpipe.raw_events_received_brin"], None),
    "no_source_lsn_brin": (["DROP INDEX walpipe.raw_events_source_lsn"], None),
    "no_both_brins": (["DROP INDEX walpipe.raw_events_received_brin", "DROP INDEX walpipe.raw_events_source_lsn"],
                      None),
    "no_secondary_indexes": ([f"DROP INDEX walpipe.{i}" for i in SECONDARY_INDEXES], None),
    # the btree sinks read each source's events in order with (`walpipe init` makes it when the configuration
    # has a [sink]; sql/012_sinks.sql): its cost on staging; and a narrower one, (source, lsn), for the same read
    "sink_order_idx": (["CREATE INDEX raw_events_source_order ON walpipe.raw_events (source, lsn, seq, id)"], None),
    "sink_idx_narrow": (["CREATE INDEX raw_events_source_order ON walpipe.raw_events (source, lsn)"], None),
    # one BRIN over the three columns instead of two BRINs: a multi-column minmax BRIN answers a condition on
    # any of its columns, and costs one revmap lookup per row instead of two
    "one_brin": (["DROP INDEX walpipe.raw_events_received_brin", "DROP INDEX walpipe.raw_events_source_lsn",
                  "CREATE INDEX raw_events_brin ON walpipe.raw_events USING brin (received_at, source, lsn)"], None),
    "received_at_now": (["ALTER TABLE walpipe.raw_events ALTER received_at SET DEFAULT now()"], None),
    # clock_timestamp() is volatile, and a volatile column default makes COPY insert row by row
    # (CopyFrom: CIM_SINGLE); the same C function declared STABLE keeps the per-row time and lets
    # COPY use heap_multi_insert (LANGUAGE internal: needs a superuser)
    "received_at_stable_clock": (["CREATE FUNCTION walpipe.row_clock() RETURNS timestamptz LANGUAGE internal STABLE "
                                  "PARALLEL SAFE AS 'clock_timestamp'",
                                  "ALTER TABLE walpipe.raw_events ALTER received_at SET DEFAULT walpipe.row_clock()"],
                                 None),
    # the same as a SQL function (any role may create it): not inlined (STABLE body calling a volatile
    # function), so it runs through the SQL function executor for every row
    "received_at_sql_stable": (["CREATE FUNCTION walpipe.row_clock() RETURNS timestamptz LANGUAGE sql STABLE "
                                "PARALLEL SAFE AS 'SELECT clock_timestamp()'",
                                "ALTER TABLE walpipe.raw_events ALTER received_at SET DEFAULT walpipe.row_clock()"],
                               None),
    "no_batch_id_default": (["ALTER TABLE walpipe.raw_events ALTER batch_id DROP DEFAULT"], None),
    "no_check": (["ALTER TABLE walpipe.raw_events DROP CONSTRAINT raw_events_event_type_check"], None),
    "copy_into_partition": ([], "partition"),
    # COPY (FORMAT binary) of the same rows: no text line splitting and unescaping, binary input for
    # timestamptz/pg_lsn/ints; jsonb's binary input still parses the JSON text.  Needs walpipe to encode
    # binary COPY, so this measures what a stager/encoder change would save, not a schema change.
    "copy_binary": ([], "binary"),
    "payload_json": (["ALTER TABLE walpipe.raw_events ALTER payload TYPE json"], None),
}


BINARY_HEADER = b"PGCOPY\n\xff\r\n\0" + struct.pack("!ii", 0, 0)
BINARY_TRAILER = struct.pack("!h", -1)


def split_binary_copy(data):
    """The tuples of a binary COPY stream (header and trailer cut off), one bytes each."""
    assert data.startswith(b"PGCOPY\n\xff\r\n\0"), "not a binary COPY stream"
    pos = 11 + 4
    (ext,) = struct.unpack_from("!i", data, pos)
    pos += 4 + ext
    rows = []
    while True:
        (nf,) = struct.unpack_from("!h", data, pos)
        if nf == -1:
            break
        start = pos
        pos += 2
        for _ in range(nf):
            (ln,) = struct.unpack_from("!i", data, pos)
            pos += 4 + max(ln, 0)
        rows.append(data[start:pos])
    return rows


class Replay:
    def __init__(self, n):
        self.n = n
        os.environ.setdefault("WALPIPE_BIN", str(HERE.parent / "build-bench" / "walpipe"))
        self.work = Path(tempfile.mkdtemp(prefix="wp-replay-"))
        self.trials = 0

    def seed(self):
        n = self.n
        src = wptest.PgCluster("replay-src", **bench.SOURCE_SETTINGS).start()
        self.stg = stg = wptest.PgCluster("replay-stg", **bench.STAGING_SETTINGS).start()
        src.createdb("bench")
        src.sql(bench.ORDERS_DDL, dbname="bench")
        wptest.create_slot(src, "bench", "replay")
        src.sql(f"INSERT INTO orders ({bench.ORDERS_COLS}) " + bench.ORDERS_SELECT.format(lo=1, hi=n),
                dbname="bench")
        stg.createdb("seed")
        self.cfg = wptest.write_config(self.work / "w.conf", stg.conninfo("seed"),
                                       {"bench": {"conninfo": src.conninfo("bench"), "slot": "replay"}})
        wp = wptest.Walpipe(self.cfg, self.work / "wp")
        wp.init()
        wp.start()
        wptest.wait_until(lambda: stg.scalar("SELECT count(*) FROM walpipe.raw_events", dbname="seed") >= n,
                          timeout=600, what="walpipe staged the seed rows", walpipe=wp)
        wp.stop()
        src.stop()
        conn = stg.connect("seed")
        buf = io.StringIO()
        conn.cursor().copy_expert(f"COPY (SELECT {COLS} FROM walpipe.raw_events ORDER BY id) TO STDOUT", buf)
        conn.close()
        buf_bin = io.BytesIO()
        conn = stg.connect("seed")
        conn.cursor().copy_expert(f"COPY (SELECT {COLS} FROM walpipe.raw_events ORDER BY id) TO STDOUT "
                                  "(FORMAT binary)", buf_bin)
        conn.close()
        self.bin_rows = split_binary_copy(buf_bin.getvalue())
        stg.sql('DROP DATABASE "seed"')
        self.lines = buf.getvalue().splitlines(keepends=True)
        print(f"{len(self.lines)} rows, {sum(map(len, self.lines)) / len(self.lines):.0f} bytes per COPY row",
              flush=True)

    def trial(self, name, per, prep=(), target=None, perf_out=None, quiet=False):
        """Replays every row into a fresh database; returns the staging backend's CPU s per 100k rows."""
        stg, lines = self.stg, self.lines
        self.trials += 1
        db = f"replay_{self.trials}"
        stg.createdb(db)
        w = wptest.Walpipe(self.cfg.read_text().replace("dbname=seed", f"dbname={db}"), self.work / db)
        w.init()
        c = stg.connect(db, autocommit=False)
        k = c.cursor()
        k.execute("SELECT walpipe.ensure_partitions(1)")
        for q in prep:
            k.execute(q)
        k.execute("SELECT pg_backend_pid()")
        pid = k.fetchone()[0]
        c.commit()
        table = today_partition() if target == "partition" else "walpipe.raw_events"
        stg.sql("CHECKPOINT")
        perf = None
        if perf_out:
            perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4000", "-g", "-p", str(pid),
                                     "-o", str(perf_out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        c0, t0 = backend_cpu(pid), time.monotonic()
        for i in range(0, len(lines), per):
            k.execute("SET LOCAL walpipe.batch_id = %s", (str(uuid.uuid4()),))
            if target == "binary":
                k.copy_expert(f"COPY {table} ({COLS}) FROM STDIN (FORMAT binary)",
                              io.BytesIO(BINARY_HEADER + b"".join(self.bin_rows[i:i + per]) + BINARY_TRAILER),
                              size=1 << 18)
            else:
                k.copy_expert(f"COPY {table} ({COLS}) FROM STDIN", io.StringIO("".join(lines[i:i + per])),
                              size=1 << 18)
            k.execute("INSERT INTO walpipe.checkpoints (source, slot, systemid, lsn) "
                      "VALUES ('replay', 'replay', '1', '0/1') ON CONFLICT (source) DO UPDATE "
                      "SET lsn = excluded.lsn, updated_at = now(); NOTIFY walpipe_raw_events")
            c.commit()
        used, wall = backend_cpu(pid) - c0, time.monotonic() - t0
        if perf:
            perf.send_signal(signal.SIGINT)
            perf.wait()
        per100k = used * 1e5 / len(lines)
        if not quiet:
            print(f"{name:24} {per:6} rows/commit: staging backend {per100k:.3f} CPU s/100k rows "
                  f"(wall {wall:.1f}s)", flush=True)
        got = stg.scalar("SELECT count(*) FROM walpipe.raw_events", dbname=db)
        assert got == len(lines), f"{name}: {got} rows staged, expected {len(lines)}"
        c.close()
        stg.sql(f'DROP DATABASE "{db}"')
        return per100k


def levers(r, per, repeat, names, perf_dir, perf_levers):
    results = {name: [] for name in names}
    for rnd in range(repeat):
        # a different order each round, so that drift on the shared machine does not favour one lever
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            prep, target = LEVERS[name]
            results[name].append(r.trial(name, per, prep, target))
    for name in perf_levers:
        perf_dir.mkdir(parents=True, exist_ok=True)
        prep, target = LEVERS[name]
        r.trial(f"{name} (perf)", per, prep, target, perf_out=perf_dir / f"{name}.perf.data")
    base = min(results["baseline"])
    print(f"\nbest of {repeat}, {per} rows per commit, {len(r.lines)} rows (CPU s per 100k rows of the staging "
          "backend; saving = baseline - variant)\n")
    mbase = statistics.median(results["baseline"])
    print("| variant | best | runs | saving vs baseline (best) | saving (medians) |")
    print("|---|---:|---|---:|---:|")
    for name in names:
        best, med = min(results[name]), statistics.median(results[name])
        runs = ", ".join(f"{x:.3f}" for x in results[name])
        saving = "" if name == "baseline" else f"{(base - best) / base * 100:+.1f} %"
        msaving = "" if name == "baseline" else f"{(mbase - med) / mbase * 100:+.1f} %"
        print(f"| {name} | {best:.3f} | {runs} | {saving} | {msaving} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", type=int, nargs="?", default=200_000)
    ap.add_argument("--levers", action="store_true", help="measure the schema levers (see LEVERS)")
    ap.add_argument("--only", help="comma-separated levers (baseline is always included)")
    ap.add_argument("--per", type=int, default=300, help="rows per commit for --levers (walpipe commits ~300 on (a))")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--perf", type=Path, help="directory for LEVER.perf.data of one profiled replay per --perf-levers")
    ap.add_argument("--perf-levers", default="baseline", help="comma-separated levers to profile (default baseline)")
    args = ap.parse_args()
    r = Replay(args.rows)
    try:
        r.seed()
        if args.levers:
            names = list(LEVERS)
            if args.only:
                names = ["baseline"] + [x for x in args.only.split(",") if x != "baseline"]
                for x in names:
                    if x not in LEVERS:
                        sys.exit(f"unknown lever \"{x}\"; known: {', '.join(LEVERS)}")
            perf_levers = args.perf_levers.split(",") if args.perf else []
            for x in perf_levers:
                if x not in LEVERS:
                    sys.exit(f"unknown lever \"{x}\"; known: {', '.join(LEVERS)}")
            levers(r, args.per, args.repeat, names, args.perf, perf_levers)
        else:
            r.trial("schema_as_is", 150)
            r.trial("schema_as_is", 2000)
            r.trial("schema_as_is", 10000)
            r.trial("no_secondary_indexes", 10000, LEVERS["no_secondary_indexes"][0])
            r.trial("payload_json", 10000, LEVERS["payload_json"][0])
            r.trial("payload_gin_index", 10000, ["CREATE INDEX raw_events_payload_gin ON walpipe.raw_events "
                                                 "USING gin (payload jsonb_path_ops)"])
    finally:
        wptest.cleanup_all()
        shutil.rmtree(r.work, ignore_errors=True)


if __name__ == "__main__":
    main()
