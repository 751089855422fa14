#!/usr/bin/python3
"""Mirror apply rate: how fast `walpipe work` drains a staged backlog into mirror tables.

A benchmark, not a test: it prints numbers and fails only if the mirror ends up
different from the source.  Usage (from a build tree):

    WALPIPE_BIN=$PWD/build/walpipe /usr/bin/python3 bench/mirror_apply.py [--changes N] [--workers 1,2,4]
        [--claims rows,batch] [--backlogs bulk,trickle] [--claim-size N] [--repeat R]

It starts a source and a staging cluster (the test harness, tests/integration/wptest.py)
and stages a backlog on a simple table with `walpipe run` (no workers): "bulk" is N
changes in two big transactions (half inserts, half updates of those rows), staged in
batches of hundreds of rows; "trickle" is --trickle-changes single-row transactions,
0.5 ms apart, which the stager commits one or a few at a time: the batches of a lightly
loaded source, left as a backlog (workers stopped, or slower than the source for a while).
Then for each claim mode and worker count (interleaved, --repeat times) it resets the
mirror, marks every event unprocessed, runs `walpipe work --workers K` and times the
drain.  Claim modes: rows = the shipped one (claim_size events in id order); batch = one
staging batch per claim (WALPIPE_BENCH_CLAIM=batch, with an index on batch_id that this
script creates).
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
import wptest  # noqa: E402


def wait(pred, timeout, what, interval=0.02):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(interval)


def write_config(w, staging, source, batch_rows, claim_size):
    wptest.write_config(w.config_path, staging.conninfo("staging"),
                        {"app": {"conninfo": source.conninfo("app"), "slot": "walpipe_app"}},
                        staging_extra={"batch_rows": batch_rows})
    with open(w.config_path, "a") as f:
        f.write(f"\n[workers]\ncount = 0\nclaim_size = {claim_size}\n")


def stage(source, staging, workdir, backlog, changes):
    """Stages the backlog on table bench; returns the walpipe (stopped) and the number of changes."""
    source.sql("DROP TABLE IF EXISTS bench; CREATE TABLE bench (id int PRIMARY KEY, v int, t text)", dbname="app")
    staging.sql("DROP SCHEMA IF EXISTS analytics CASCADE; DROP SCHEMA IF EXISTS walpipe CASCADE", dbname="staging")
    if wptest.slot_info(source, "walpipe_app"):
        wptest.drop_slot(source, "app", "walpipe_app")
    wptest.create_slot(source, "app", "walpipe_app")
    w = wptest.Walpipe("[x]\n", workdir, name=f"stage-{backlog}")
    write_config(w, staging, source, 10000, 1000)
    assert w.init().returncode == 0
    w.start()
    t0 = time.monotonic()
    if backlog == "bulk":
        half = changes // 2
        source.sql(f"INSERT INTO bench SELECT g, g, md5(g::text) FROM generate_series(1, {half}) g", dbname="app")
        source.sql(f"UPDATE bench SET v = v + 1, t = t || 'x' WHERE id <= {changes - half}", dbname="app")
    else:
        conn = source.connect("app")
        with conn.cursor() as cur:
            for g in range(1, changes + 1):
                cur.execute("INSERT INTO bench VALUES (%s, %s, md5(%s::text))", (g, g, g))
                time.sleep(0.0005)  # slower than a staging commit: batches of one or a few rows
        conn.close()
    target = source.scalar("SELECT pg_current_wal_lsn()::text", dbname="app")
    wait(lambda: source.scalar("SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots "
                               "WHERE slot_name = 'walpipe_app'", (target,), dbname="app"), 600, "staging")
    staged_s = time.monotonic() - t0
    assert w.stop() == 0
    batches = staging.scalar("SELECT count(DISTINCT batch_id) FROM walpipe.raw_events", dbname="staging")
    print(f"{backlog} backlog: {changes} changes staged in {batches} staging batches "
          f"({changes / batches:.0f} rows per batch) in {staged_s:.1f} s", flush=True)
    return w


def reset(staging):
    staging.sql("""
        DO $$ DECLARE r record; BEGIN
          FOR r IN SELECT tombstones FROM walpipe.mirrors LOOP
            EXECUTE format('DROP TABLE walpipe.%I', r.tombstones);
          END LOOP;
        END $$;
        DROP SCHEMA IF EXISTS analytics CASCADE;
        TRUNCATE walpipe.mirrors, walpipe.dead_letters;
        UPDATE walpipe.raw_events SET processed = false""", dbname="staging")
    staging.sql("VACUUM ANALYZE walpipe.raw_events", dbname="staging")


def drain(staging, w, workers, claim, changes, workdir):
    reset(staging)
    env = {"WALPIPE_BENCH_CLAIM": "batch"} if claim == "batch" else {}
    work = wptest.Walpipe(w.config_path, workdir, name=f"work-{claim}-{workers}")
    t0 = time.monotonic()
    work.start(extra_env=env, subcommand="work", args=["--workers", workers])
    # polled gently: a count over the backlog every few ms would take CPU from the workers
    wait(lambda: not staging.scalar("SELECT EXISTS (SELECT 1 FROM walpipe.raw_events WHERE NOT processed)",
                                    dbname="staging"), 900, "the drain", interval=0.1)
    secs = time.monotonic() - t0
    assert work.stop() == 0
    rows = staging.sql("SELECT count(*), sum(v), md5(string_agg(t, '' ORDER BY id)) FROM analytics.public_bench",
                       dbname="staging")[0]
    return changes / secs, secs, rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--changes", type=int, default=200000, help="changes in the bulk backlog")
    ap.add_argument("--trickle-changes", type=int, default=20000, help="changes in the trickle backlog")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--claims", default="rows,batch")
    ap.add_argument("--backlogs", default="bulk,trickle")
    ap.add_argument("--claim-size", type=int, default=1000, help="claim_size of the rows mode")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each mode, interleaved; the median is reported")
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    claims = args.claims.split(",")
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"wp-mirror-bench-{os.getpid()}"
    source = wptest.PgCluster("bsource").start()
    staging = wptest.PgCluster("bstaging").start()
    results = {}
    failed = False
    try:
        source.createdb("app")
        staging.createdb("staging")
        for backlog in args.backlogs.split(","):
            changes = args.changes if backlog == "bulk" else args.trickle_changes
            w = stage(source, staging, workdir / f"stage-{backlog}", backlog, changes)
            if any(c == "batch" for c in claims):
                staging.sql("CREATE INDEX raw_events_batch ON walpipe.raw_events (batch_id) WHERE NOT processed",
                            dbname="staging")
            expect = source.sql("SELECT count(*), sum(v), md5(string_agg(t, '' ORDER BY id)) FROM bench",
                                dbname="app")[0]
            for _ in range(args.repeat):
                for claim in claims:
                    write_config(w, staging, source, 10000, 10000 if claim == "batch" else args.claim_size)
                    for n in counts:
                        rate, secs, rows = drain(staging, w, n, claim, changes, workdir)
                        ok = rows == expect
                        failed |= not ok
                        results.setdefault((backlog, claim, n), []).append(rate)
                        print(f"{backlog:7} claim {claim:5} workers {n}: {changes} changes in {secs:6.2f} s = "
                              f"{rate:8.0f} changes/s{'' if ok else '  MIRROR DIFFERS'}", flush=True)
    finally:
        source.destroy()
        staging.destroy()
    print(f"\nmedian of {args.repeat} run(s), load average now {os.getloadavg()[0]:.1f}")
    print("backlog  claim  workers  changes/s")
    for (backlog, claim, n), rates in results.items():
        print(f"{backlog:8} {claim:6} {n:7}  {statistics.median(rates):9.0f}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
