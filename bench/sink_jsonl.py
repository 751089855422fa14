#!/usr/bin/python3
"""sink_jsonl.py: how fast a sink drains a staged backlog into the jsonl plugin.

walpipe stages N inserts (100 per transaction) into workload (a)'s orders table (no sink configured), then `walpipe init` with a sink (the index sinks read by), then
`walpipe sink` drains that backlog into a jsonl file, once with fsync on and once off (each into a
fresh file from a reset position), timed from process start until the sink's position reaches the
last event.  Prints events/s and the sink process's CPU.

Usage (WALPIPE_BIN set, or bench/run has built build-bench/walpipe):
  bench/sink_jsonl.py [N] [--batch-events B]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
sys.path.insert(0, str(HERE))
import bench  # noqa: E402
import wptest  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", type=int, nargs="?", default=200_000)
    ap.add_argument("--batch-events", type=int, default=1000)
    a = ap.parse_args()
    os.environ.setdefault("WALPIPE_BIN", str(HERE.parent / "build-bench" / "walpipe"))
    work = Path(tempfile.mkdtemp(prefix="wp-sinkbench-"))
    src = wptest.PgCluster("sinkb-src", **bench.SOURCE_SETTINGS).start()
    stg = wptest.PgCluster("sinkb-stg", **bench.STAGING_SETTINGS).start()
    try:
        src.createdb("bench")
        src.sql(bench.ORDERS_DDL, dbname="bench")
        wptest.create_slot(src, "bench", "walpipe_bench")
        # transactions of 100 inserts (the sink's cost is per event; this stages quickly)
        for lo in range(1, a.n + 1, 100):
            src.sql(f"INSERT INTO orders ({bench.ORDERS_COLS}) " +
                    bench.ORDERS_SELECT.format(lo=lo, hi=min(lo + 99, a.n)), dbname="bench")
        stg.createdb("staging")
        cfg = wptest.write_config(work / "w.conf", stg.conninfo("staging"),
                                  {"bench": {"conninfo": src.conninfo("bench"), "slot": "walpipe_bench"}})
        base = cfg.read_text() + "\n[workers]\ncount = 0\n"
        cfg.write_text(base)
        wp = wptest.Walpipe(cfg, work / "wp")
        wp.init()
        wp.start()
        wptest.wait_until(lambda: stg.scalar("SELECT count(*) FROM walpipe.raw_events", dbname="staging") >= a.n,
                          timeout=1200, what="the backlog staged", walpipe=wp)
        wp.stop()
        src.stop()
        total = stg.scalar("SELECT count(*) FROM walpipe.raw_events", dbname="staging")
        for fsync in ("on", "off"):
            stg.sql("TRUNCATE walpipe.sink_positions", dbname="staging")
            out = work / f"out-{fsync}.jsonl"
            cfg.write_text(base + f"\n[sink j]\nplugin = jsonl\npath = {out}\nfsync = {fsync}\n"
                           f"batch_events = {a.batch_events}\n")
            wp.init()  # creates the index sinks read by (before the clock starts)
            t0 = time.monotonic()
            wp.start(subcommand="sink")
            wptest.wait_until(lambda: stg.scalar("SELECT coalesce(sum(events_delivered), 0) FROM "
                                                 "walpipe.sink_positions", dbname="staging") >= total,
                              timeout=1200, interval=0.02, what="the sink to drain", walpipe=wp)
            wall = time.monotonic() - t0
            cpu = bench.proc_cpu(wp.pid)
            wp.stop()
            size = out.stat().st_size
            print(f"jsonl fsync={fsync}: {total} events in {wall:.2f} s = {total / wall:.0f} events/s, "
                  f"{size / wall / 1e6:.1f} MB/s, walpipe sink CPU {cpu:.2f} s, batch_events {a.batch_events}",
                  flush=True)
    finally:
        src.destroy()
        stg.destroy()


if __name__ == "__main__":
    main()
