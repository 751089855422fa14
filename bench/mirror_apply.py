#!/usr/bin/python3
"""Mirror apply rate by claim mode and backlog shape: a thin wrapper around the
mirror functions of bench/bench.py, whose "mirror" phase (part of bench/run)
measures the shipped mode with 1, 2 and 4 workers.  This script adds the
comparison behind claiming rows: claiming one staging batch per claim, and a
backlog of small staging batches.

A benchmark, not a test: it prints numbers and fails only if the mirror ends up
different from the source.  Usage (from a build tree):

    WALPIPE_BIN=$PWD/build/walpipe /usr/bin/python3 bench/mirror_apply.py [--changes N] [--workers 1,2,4]
        [--claims rows,batch] [--backlogs bulk,trickle] [--claim-size N] [--repeat R]

Backlogs: "bulk" is N changes in two big transactions, staged in batches of
hundreds of rows; "trickle" is --trickle-changes single-row transactions, 0.5 ms
apart, which the stager commits one or a few at a time (see bench.mirror_stage).
Claim modes: rows = the shipped one (claim_size events in id order); batch = one
staging batch per claim (WALPIPE_BENCH_CLAIM=batch, with an index on batch_id
that bench.mirror_runs creates).
"""

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from bench import wptest  # noqa: E402


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
    source = wptest.PgCluster("bsource").start()
    staging = wptest.PgCluster("bstaging", track_commit_timestamp=True).start()
    results = {}
    failed = False
    try:
        staging.createdb("staging")
        with tempfile.TemporaryDirectory(prefix="wp-mirror-bench-") as workdir:
            for backlog in args.backlogs.split(","):
                changes = args.changes if backlog == "bulk" else args.trickle_changes
                facts = bench.mirror_stage(source, staging, "staging", Path(workdir) / backlog, backlog, changes)
                print(f"{backlog} backlog: {changes} changes staged in {facts['batches']} staging batches "
                      f"({changes / facts['batches']:.0f} rows per batch) in {facts['stage_seconds']:.1f} s",
                      flush=True)

                def report(r):
                    print(f"{backlog:7} claim {r['claim']:5} workers {r['workers']}: {changes} changes in "
                          f"{r['seconds']:6.2f} s = {r['changes_per_s']:8.0f} changes/s"
                          f"{'' if r['rows_ok'] else '  MIRROR DIFFERS'}", flush=True)
                for r in bench.mirror_runs(source, staging, "staging", facts, counts, claims, args.repeat,
                                           args.claim_size, Path(workdir) / backlog, report=report):
                    failed |= not r["rows_ok"]
                    results.setdefault((backlog, r["claim"], r["workers"]), []).append(r["changes_per_s"])
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
