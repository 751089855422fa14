"""Sinks (src/sink/, include/walpipe/sink.h) and the jsonl plugin, against real clusters.

What a sink must do (README "Sinks"): deliver every staged event of its sources
exactly once in (lsn, seq) order per source, advance its position only over what
its plugin made durable, never hold up staging or the mirrors, catch up after an
outage, and replay a staged range on request.  The jsonl file is compared line by
line with walpipe.raw_events (the staged truth, in the order a sink must follow)
and with what the writers committed on the source.
"""

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import psycopg2
import pytest

import wptest
from test_core import setup_source, wait_caught_up
from wptest import wait_until

SCHEMA = """
CREATE TABLE t1 (id bigserial PRIMARY KEY, v text NOT NULL, n int NOT NULL DEFAULT 0);
CREATE TABLE t2 (id bigserial PRIMARY KEY, w text);
"""

LONG = os.environ.get("WALPIPE_LONG") == "1"

# what a sink is delivered, in its order: the filter and numbering of src/sink/feed.c, in SQL
STAGED_SQL = """
SELECT r.source, r.lsn::text,
       CASE WHEN r.event_type = 'snapshot'
            THEN row_number() OVER (PARTITION BY r.source, r.lsn, r.event_type ORDER BY r.id)::int
            ELSE r.seq END AS seq,
       r.event_type, r.schema_name, r.table_name, r.payload::text
  FROM walpipe.raw_events r LEFT JOIN walpipe.checkpoints c ON c.source = r.source
 WHERE r.seq >= 0 AND (r.event_type <> 'snapshot' OR (c.snapshot_state = 'done' AND r.lsn = c.snapshot_lsn))
   {extra}
 ORDER BY r.source, r.lsn, r.seq, r.id
"""


def lsn_key(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def jsonl_files(path):
    """path.1 .. path.N, then path: the order the lines were written in."""
    path = Path(path)
    rotated = []
    k = 1
    while Path(f"{path}.{k}").exists():
        rotated.append(Path(f"{path}.{k}"))
        k += 1
    return rotated + ([path] if path.exists() else [])


def read_jsonl(path):
    out = []
    for f in jsonl_files(path):
        with open(f) as fh:
            for line in fh:
                assert line.endswith("\n"), f"torn line in {f}: {line!r}"
                out.append(json.loads(line))
    return out


def count_lines(path):
    n = 0
    for f in jsonl_files(path):
        with open(f, "rb") as fh:
            n += fh.read().count(b"\n")
    return n


def staged(staging_pg, extra=""):
    rows = staging_pg.sql(STAGED_SQL.format(extra=extra), dbname="staging")
    return [(s, lsn, seq, op, sch, tab, json.loads(p)) for (s, lsn, seq, op, sch, tab, p) in rows]


def as_rows(lines):
    return [(e["source"], e["lsn"], e["seq"], e["op"], e["schema"], e["table"], e["payload"]) for e in lines]


def assert_in_order_once(lines):
    """Per source, strictly increasing (lsn, seq): in order and nothing twice."""
    last = {}
    for i, e in enumerate(lines):
        key = (lsn_key(e["lsn"]), e["seq"])
        prev = last.get(e["source"])
        assert prev is None or key > prev, f"line {i + 1}: {e['source']} {e['lsn']}/{e['seq']} after {prev}"
        last[e["source"]] = key


def sink_config(w, name="j", **keys):
    keys.setdefault("plugin", "jsonl")
    with open(w.config_path, "a") as f:
        f.write(f"\n[sink {name}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))


def start(walpipe_factory, staging_pg, source_pg, sinks, workers=0, run=True, tables=None):
    """walpipe with one source "app" and the given sinks ({name: keys}); init done; run started."""
    w = walpipe_factory("[placeholder]\n")
    src = {"conninfo": source_pg.conninfo("app"), "slot": "walpipe_app"}
    if tables:
        src["tables"] = tables
    wptest.write_config(w.config_path, staging_pg.conninfo("staging"), {"app": src},
                        staging_extra={"batch_ms": 20})
    with open(w.config_path, "a") as f:
        f.write(f"\n[workers]\ncount = {workers}\n")
    for name, keys in sinks.items():
        sink_config(w, name, **keys)
    staging_pg.createdb("staging")
    r = w.init()
    assert r.returncode == 0, r.stderr
    if run:
        w.start()
    return w


class Writers:
    """Threads committing small transactions on the source until stopped; they remember what committed."""

    def __init__(self, source_pg, n=2, seed=1):
        self.source_pg = source_pg
        self.stop_flag = threading.Event()
        self.committed = []  # (table, id) of committed inserts
        self.errors = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(random.Random(seed + i),), daemon=True)
                        for i in range(n)]

    def _run(self, rnd):
        try:
            conn = self.source_pg.connect("app", autocommit=False)
            cur = conn.cursor()
            while not self.stop_flag.is_set():
                ids = []
                for _ in range(rnd.randint(1, 8)):
                    if rnd.random() < 0.7:
                        cur.execute("INSERT INTO t1 (v) VALUES (%s) RETURNING id", ("x" * rnd.randint(1, 300),))
                        ids.append(("t1", cur.fetchone()[0]))
                    elif rnd.random() < 0.5:
                        cur.execute("INSERT INTO t2 (w) VALUES ('y') RETURNING id")
                        ids.append(("t2", cur.fetchone()[0]))
                    else:
                        cur.execute("UPDATE t1 SET n = n + 1 WHERE id = (SELECT max(id) FROM t1)")
                conn.commit()
                with self.lock:
                    self.committed += ids
                time.sleep(0.002)
            conn.close()
        except Exception as e:  # noqa: BLE001 - reported by stop()
            self.errors.append(e)

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors


# --------------------------------------------------------------------------
# (a) exactly once, in order, across SIGKILLs

def test_jsonl_exactly_once_in_order_across_sigkills(source_pg, staging_pg, walpipe_factory, tmp_path):
    setup_source(source_pg, schema=SCHEMA)
    out = tmp_path / "out" / "events.jsonl"
    out.parent.mkdir()
    w = start(walpipe_factory, staging_pg, source_pg,
              {"j": {"path": out, "rotate_bytes": 300000, "batch_events": 100}})
    writers = Writers(source_pg).start()
    try:
        for kill in range(3):
            seen = count_lines(out)
            wait_until(lambda: count_lines(out) > seen + 300, timeout=120, what="the sink to write more events",
                       walpipe=w)
            w.kill()
            w.start()
    finally:
        writers.stop()
    wait_caught_up(source_pg, w)
    total = len(staged(staging_pg))
    wait_until(lambda: count_lines(out) >= total, timeout=120, what=f"{total} events in the jsonl file", walpipe=w)
    assert w.stop() == 0

    lines = read_jsonl(out)
    assert_in_order_once(lines)
    assert as_rows(lines) == staged(staging_pg)
    assert len(jsonl_files(out)) > 1, "rotation never happened"
    # and the source: every committed insert exactly once
    inserted = sorted((e["table"], e["payload"]["after"]["id"]) for e in lines if e["op"] == "insert")
    assert inserted == sorted(writers.committed)
    # the position is the last event
    pos = staging_pg.sql("SELECT lsn::text, events_delivered FROM walpipe.sink_positions WHERE sink = 'j' "
                         "AND source = 'app'", dbname="staging")
    assert pos[0][0] == lines[-1]["lsn"]
