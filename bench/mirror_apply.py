#!/usr/bin/python3
"""Mirror apply rate: how fast `walpipe work` drains a staged backlog into mirror tables.

A benchmark, not a test: it prints numbers and fails only if the mirror ends up
different from the source.  Usage (from a build tree):

    WALPIPE_BIN=build/walpipe /usr/bin/python3 bench/mirror_apply.py [--changes N] [--workers 1,2,4]
                                                                    [--claims rows,batch,batch50]

It starts a source and a staging cluster (the test harness, tests/integration/wptest.py),
stages N changes on a simple table (`walpipe run` with no workers: half inserts, half
updates of those rows), then for each claim mode and worker count: resets the mirror,
marks every event unprocessed, runs `walpipe work --workers K` and times the drain.

Claim modes: rows = the shipped one (claim_size events in id order); batch = one staging
batch per claim (WALPIPE_BENCH_CLAIM=batch, with an index on batch_id that this script
creates), on the backlog's own batches (up to batch_rows = 10000); batch50 = the same on
a backlog staged with batch_rows = 50, like the small batches of a lightly loaded source.
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


def stage(source, staging, workdir, changes, batch_rows):
    """Stages `changes` changes of table bench; returns the walpipe (stopped)."""
    source.sql("DROP TABLE IF EXISTS bench; CREATE TABLE bench (id int PRIMARY KEY, v int, t text)", dbname="app")
    staging.sql("DROP SCHEMA IF EXISTS analytics CASCADE; DROP SCHEMA IF EXISTS walpipe CASCADE", dbname="staging")
    if wptest.slot_info(source, "walpipe_app"):
        wptest.drop_slot(source, "app", "walpipe_app")
    wptest.create_slot(source, "app", "walpipe_app")
    w = wptest.Walpipe("[x]\n", workdir, name=f"stage{batch_rows}")
    write_config(w, staging, source, batch_rows, 1000)
    assert w.init().returncode == 0
    w.start()
    half = changes // 2
    source.sql(f"INSERT INTO bench SELECT g, g, md5(g::text) FROM generate_series(1, {half}) g", dbname="app")
    source.sql(f"UPDATE bench SET v = v + 1, t = t || 'x' WHERE id <= {changes - half}", dbname="app")
    target = source.scalar("SELECT pg_current_wal_lsn()::text", dbname="app")
    t0 = time.monotonic()
    wait(lambda: source.scalar("SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots "
                               "WHERE slot_name = 'walpipe_app'", (target,), dbname="app"), 600, "staging")
    staged_s = time.monotonic() - t0
    assert w.stop() == 0
    batches = staging.scalar("SELECT count(DISTINCT batch_id) FROM walpipe.raw_events", dbname="staging")
    print(f"staged {changes} changes in {batches} staging batches (batch_rows = {batch_rows}) in {staged_s:.1f} s")
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
    env = {"WALPIPE_BENCH_CLAIM": "batch"} if claim.startswith("batch") else {}
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
    ap.add_argument("--changes", type=int, default=200000)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--claims", default="rows,batch,batch50")
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
        # one backlog per batch size; the modes that share it run interleaved
        for batch_rows in sorted({50 if c == "batch50" else 10000 for c in claims}, reverse=True):
            modes = [c for c in claims if (50 if c == "batch50" else 10000) == batch_rows]
            w = stage(source, staging, workdir / f"stage{batch_rows}", args.changes, batch_rows)
            if any(m.startswith("batch") for m in modes):
                staging.sql("CREATE INDEX raw_events_batch ON walpipe.raw_events (batch_id) WHERE NOT processed",
                            dbname="staging")
            expect = source.sql("SELECT count(*), sum(v), md5(string_agg(t, '' ORDER BY id)) FROM bench",
                                dbname="app")[0]
            for _ in range(args.repeat):
                for claim in modes:
                    write_config(w, staging, source, batch_rows,
                                 10000 if claim.startswith("batch") else args.claim_size)
                    for n in counts:
                        rate, secs, rows = drain(staging, w, n, claim, args.changes, workdir)
                        ok = rows == expect
                        failed |= not ok
                        results.setdefault((claim, n), []).append(rate)
                        print(f"claim {claim:8} workers {n}: {args.changes} changes in {secs:6.2f} s = "
                              f"{rate:8.0f} changes/s{'' if ok else '  MIRROR DIFFERS'}", flush=True)
    finally:
        source.destroy()
        staging.destroy()
    print(f"\nmedian of {args.repeat} run(s), load average now {os.getloadavg()[0]:.1f}")
    print("claim     workers  changes/s")
    for (claim, n), rates in results.items():
        print(f"{claim:9} {n:7}  {statistics.median(rates):9.0f}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
