#!/usr/bin/python3
"""staging_replay.py: what a raw_events row costs the staging backend, by batch size and schema.

walpipe stages N rows of workload (b) once; the harness then copies those exact COPY
rows out and replays them into fresh staging databases the way walpipe's stager
does (SET LOCAL batch_id, COPY, checkpoint upsert, COMMIT per batch), varying the
rows per commit and the schema.  It prints the staging backend's CPU (from /proc)
per 100 000 rows.  Used for README "Where the time goes".

Usage (after bench/run has built build-bench/walpipe): bench/staging_replay.py [ROWS]
"""

import io
import os
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


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    os.environ.setdefault("WALPIPE_BIN", str(HERE.parent / "build-bench" / "walpipe"))
    work = Path(tempfile.mkdtemp(prefix="wp-replay-"))
    src = wptest.PgCluster("replay-src", **bench.SOURCE_SETTINGS).start()
    stg = wptest.PgCluster("replay-stg", **bench.STAGING_SETTINGS).start()
    try:
        src.createdb("bench")
        src.sql(bench.ORDERS_DDL, dbname="bench")
        wptest.create_slot(src, "bench", "replay")
        src.sql(f"INSERT INTO orders ({bench.ORDERS_COLS}) " + bench.ORDERS_SELECT.format(lo=1, hi=n),
                dbname="bench")
        stg.createdb("seed")
        cfg = wptest.write_config(work / "w.conf", stg.conninfo("seed"),
                                  {"bench": {"conninfo": src.conninfo("bench"), "slot": "replay"}})
        wp = wptest.Walpipe(cfg, work / "wp")
        wp.init()
        wp.start()
        wptest.wait_until(lambda: stg.scalar("SELECT count(*) FROM walpipe.raw_events", dbname="seed") >= n,
                          timeout=600, what="walpipe staged the seed rows", walpipe=wp)
        wp.stop()
        conn = stg.connect("seed")
        buf = io.StringIO()
        conn.cursor().copy_expert(f"COPY (SELECT {COLS} FROM walpipe.raw_events ORDER BY id) TO STDOUT", buf)
        conn.close()
        lines = buf.getvalue().splitlines(keepends=True)
        print(f"{len(lines)} rows, {sum(map(len, lines)) / len(lines):.0f} bytes per COPY row")

        def trial(name, per, prep=()):
            db = f"replay_{name}"
            stg.createdb(db)
            w = wptest.Walpipe(cfg.read_text().replace("dbname=seed", f"dbname={db}"), work / db)
            w.init()
            c = stg.connect(db, autocommit=False)
            k = c.cursor()
            k.execute("SELECT walpipe.ensure_partitions(1)")
            for q in prep:
                k.execute(q)
            k.execute("SELECT pg_backend_pid()")
            pid = k.fetchone()[0]
            c.commit()
            stg.sql("CHECKPOINT")
            c0, t0 = bench.proc_cpu(pid), time.monotonic()
            for i in range(0, len(lines), per):
                k.execute("SET LOCAL walpipe.batch_id = %s", (str(uuid.uuid4()),))
                k.copy_expert(f"COPY walpipe.raw_events ({COLS}) FROM STDIN",
                              io.StringIO("".join(lines[i:i + per])), size=1 << 18)
                k.execute("INSERT INTO walpipe.checkpoints (source, slot, systemid, lsn) "
                          "VALUES ('replay', 'replay', '1', '0/1') ON CONFLICT (source) DO UPDATE "
                          "SET lsn = excluded.lsn, updated_at = now()")
                c.commit()
            used, wall = bench.proc_cpu(pid) - c0, time.monotonic() - t0
            print(f"{name:24} {per:6} rows/commit: staging backend {used * 1e5 / len(lines):.2f} CPU s/100k rows "
                  f"(wall {wall:.1f}s)", flush=True)
            c.close()
            stg.sql(f'DROP DATABASE "{db}"')

        trial("schema_as_is", 150)
        trial("schema_as_is", 2000)
        trial("schema_as_is", 10000)
        trial("no_secondary_indexes", 10000, [f"DROP INDEX walpipe.{i}" for i in SECONDARY_INDEXES])
        trial("payload_json", 10000, ["ALTER TABLE walpipe.raw_events ALTER payload TYPE json"])
        trial("payload_gin_index", 10000, ["CREATE INDEX raw_events_payload_gin ON walpipe.raw_events "
                                           "USING gin (payload jsonb_path_ops)"])
    finally:
        wptest.cleanup_all()


if __name__ == "__main__":
    main()
