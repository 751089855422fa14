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
import urllib.request
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


def read_files(path, read):
    """read(f) of each of the sink's files in order.  A running sink may rotate path (rename it to
    path.N, then create path again on its next write) between the listing and an open: then the
    files are listed again."""
    while True:
        try:
            return [read(f) for f in jsonl_files(path)]
        except FileNotFoundError:
            continue


def read_jsonl(path):
    def lines(f):
        out = []
        with open(f) as fh:
            for line in fh:
                assert line.endswith("\n"), f"torn line in {f}: {line!r}"
                out.append(json.loads(line))
        return out
    return [e for part in read_files(path, lines) for e in part]


def count_lines(path):
    """Lines written so far (a listing that misses a file being rotated counts fewer: callers wait
    for counts to grow, so a low count only makes them look again)."""
    def count(f):
        with open(f, "rb") as fh:
            return fh.read().count(b"\n")
    return sum(read_files(path, count))


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


def start(walpipe_factory, staging_pg, source_pg, sinks, workers=0, run=True, tables=None, plugin=None):
    """walpipe with one source "app" and the given sinks ({name: keys}); init done; run started.
    plugin: the source's input (unset: wal2json)."""
    w = walpipe_factory("[placeholder]\n")
    src = {"conninfo": source_pg.conninfo("app"), "slot": "walpipe_app"}
    if tables:
        src["tables"] = tables
    if plugin:
        src["plugin"] = plugin
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

def slot_plugin(source_pg, slot="walpipe_app"):
    return source_pg.scalar("SELECT plugin FROM pg_replication_slots WHERE slot_name = %s", (slot,))


@pytest.mark.parametrize("plugin", ["wal2json", "pgoutput"])
def test_jsonl_exactly_once_in_order_across_sigkills(source_pg, staging_pg, walpipe_factory, tmp_path, plugin):
    setup_source(source_pg, schema=SCHEMA, plugin=plugin)
    out = tmp_path / "out" / "events.jsonl"
    out.parent.mkdir()
    w = start(walpipe_factory, staging_pg, source_pg,
              {"j": {"path": out, "rotate_bytes": 300000, "batch_events": 100}}, plugin=plugin)
    writers = Writers(source_pg).start()
    rnd = random.Random(11)
    try:
        for kill in range(4):
            seen = count_lines(out)
            wait_until(lambda: count_lines(out) > seen + 500, timeout=120, what="the sink to write more events",
                       walpipe=w)
            time.sleep(rnd.uniform(0, 0.3))  # at a moment the sink did not choose
            w.kill()
            w.start()
    finally:
        writers.stop()
    wait_caught_up(source_pg, w)
    assert slot_plugin(source_pg) == plugin  # walpipe really read with it
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


# --------------------------------------------------------------------------
# the jsonl plugin's tail: redelivered events are skipped, a torn line is cut; the initial snapshot

def test_jsonl_skips_what_its_file_holds_and_sees_the_initial_snapshot(source_pg, staging_pg, walpipe_factory,
                                                                       tmp_path):
    source_pg.createdb("app")
    source_pg.sql(SCHEMA + "INSERT INTO t1 (v) SELECT 'old' || g FROM generate_series(1, 250) g;"
                  "INSERT INTO t2 (w) SELECT 'old' FROM generate_series(1, 30) g;", dbname="app")
    out = tmp_path / "events.jsonl"
    # walpipe creates the slot: the rows above come as the initial snapshot
    w = start(walpipe_factory, staging_pg, source_pg, {"j": {"path": out, "batch_events": 64,
                                                             "rotate_bytes": 8000}})
    wait_until(lambda: staging_pg.scalar("SELECT snapshot_state = 'done' FROM walpipe.checkpoints",
                                         dbname="staging"), timeout=120, what="the initial snapshot", walpipe=w)
    for i in range(20):
        source_pg.sql(f"INSERT INTO t1 (v) VALUES ('new{i}'); UPDATE t2 SET w = 'u' WHERE id = {i + 1}", dbname="app")
    wait_caught_up(source_pg, w)
    total = len(staged(staging_pg))
    assert total == 250 + 30 + 40
    wait_until(lambda: count_lines(out) >= total, timeout=120, what=f"{total} events in the file", walpipe=w)
    assert w.stop() == 0
    lines = read_jsonl(out)
    assert as_rows(lines) == staged(staging_pg)
    snap = [e for e in lines if e["op"] == "snapshot"]
    assert len(snap) == 280 and [e["seq"] for e in snap] == list(range(1, 281))
    assert len({e["lsn"] for e in snap}) == 1 and lines[:280] == snap  # one transaction, before the stream

    # a requested snapshot (a resync) while the sink streams: staged, but not delivered (README "Sinks")
    w.start()
    r = w.command("snapshot", "--source", "app", "--table", "public.t2", timeout=120)
    assert r.returncode == 0, r.stderr
    source_pg.sql("INSERT INTO t1 (v) VALUES ('after the resync')", dbname="app")
    wait_caught_up(source_pg, w)
    assert staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE event_type = 'snapshot' AND lsn > %s",
                             (snap[0]["lsn"],), dbname="staging") == 30
    assert staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE seq = -1", dbname="staging") == 1
    total = len(staged(staging_pg))
    wait_until(lambda: count_lines(out) >= total, timeout=120, what=f"{total} events in the file", walpipe=w)
    assert w.stop() == 0
    lines = read_jsonl(out)
    assert as_rows(lines) == staged(staging_pg)
    assert lines[-1]["payload"]["after"]["v"] == "after the resync"
    assert sum(1 for e in lines if e["op"] == "snapshot") == 280
    files = jsonl_files(out)
    assert len(files) > 5  # so the search for the tail below may cross rotated files
    before = b"".join(f.read_bytes() for f in files)

    # the position forgotten: everything is delivered again, and all of it is already in the file;
    # a crash's torn last line is cut off first
    staging_pg.sql("UPDATE walpipe.sink_positions SET lsn = '0/0', seq = -2147483648, event_id = 0",
                   dbname="staging")
    with open(out, "a") as f:
        f.write('{"source":"app","lsn":"0/')
    w.start(subcommand="sink")
    last = lines[-1]["lsn"]
    wait_until(lambda: staging_pg.scalar("SELECT lsn::text FROM walpipe.sink_positions WHERE sink = 'j'",
                                         dbname="staging") == last,
               timeout=120, what="the position to come back to the end", walpipe=w)
    assert w.stop() == 0
    assert b"".join(f.read_bytes() for f in jsonl_files(out)) == before
    assert "cut a torn last line" in w.log(since_start=True)


# --------------------------------------------------------------------------
# (d) a plugin that is not there, a key nobody knows

def test_missing_plugin_and_unknown_key_are_refused_clearly(source_pg, staging_pg, walpipe_factory, tmp_path):
    setup_source(source_pg, schema=SCHEMA)
    w = start(walpipe_factory, staging_pg, source_pg, {"k": {"plugin": "nosuch"}}, run=False)
    for cmd in ("run", "sink"):
        w.start(subcommand=cmd)
        assert w.wait_exit(60) == 2
        log = w.log(since_start=True)
        assert 'no plugin "nosuch" (walpipe_sink_nosuch.so) in ' in log, log
        assert "build it (plugins/nosuch/" in log
    conf = w.config_path.read_text().replace("plugin = nosuch", f"plugin = jsonl\npath = {tmp_path}/x.jsonl\n"
                                             "rotate_byte = 10")
    w.config_path.write_text(conf)
    w.start(subcommand="sink")
    assert w.wait_exit(60) == 2
    log = w.log(since_start=True)
    assert 'unknown key "rotate_byte" in [sink k] (plugin jsonl); valid keys are: ' in log, log
    assert "rotate_bytes" in log
    assert not (tmp_path / "x.jsonl").exists()


# --------------------------------------------------------------------------
# (b) a sink down while staging and the mirrors go on

def metric(port, series):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
    return 0.0


def sink_status(w):
    r = w.command("status", "--json")
    doc = json.loads(r.stdout)
    return {(s["name"], s["source"]): s for s in doc["sinks"]}


def test_sink_down_then_catches_up_while_staging_and_mirrors_go_on(source_pg, staging_pg, walpipe_factory, tmp_path):
    down_s = 60 if LONG else 20
    setup_source(source_pg, schema=SCHEMA)
    out = tmp_path / "later" / "events.jsonl"  # the directory does not exist yet: the sink is down
    w = start(walpipe_factory, staging_pg, source_pg, {"j": {"path": out}}, workers=1, run=False)
    port = wptest.free_port()
    with open(w.config_path, "a") as f:
        f.write(f"\n[metrics]\nlisten = {port}\n")
    w.start()
    writers = Writers(source_pg).start()
    try:
        wait_until(lambda: "does not exist; create it" in w.log(), timeout=60, what="the sink to say it is down",
                   walpipe=w)
        wait_until(lambda: metric(port, 'walpipe_sink_lag_events{sink="j",source="app"}') > 0, timeout=60,
                   what="the sink's backlog gauge", walpipe=w)
        t0 = time.monotonic()
        staged0 = staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events", dbname="staging")
        mirror0 = staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE processed", dbname="staging")
        backlogs = []
        while time.monotonic() - t0 < down_s:
            st = sink_status(w)[("j", "app")]
            assert st["position_lsn"] is None and st["events_delivered"] == 0
            backlogs.append(st["backlog_events"])
            time.sleep(2)
        staged1 = staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events", dbname="staging")
        mirror1 = staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE processed", dbname="staging")
        # staging and the mirror went on the whole time, and the backlog grew
        assert staged1 > staged0 + 100 and mirror1 > mirror0 + 100, (staged0, staged1, mirror0, mirror1)
        assert backlogs[-1] > backlogs[0] > 0, backlogs
        assert w.running
        out.parent.mkdir()
        wait_until(lambda: sink_status(w)[("j", "app")]["events_delivered"] > 0, timeout=90,
                   what="the sink to deliver once its directory is there", walpipe=w)
    finally:
        writers.stop()
    wait_caught_up(source_pg, w)
    wait_until(lambda: sink_status(w)[("j", "app")]["backlog_events"] == 0, timeout=120,
               what="the sink's backlog to drain", walpipe=w)
    assert metric(port, 'walpipe_sink_lag_events{sink="j",source="app"}') >= 0
    assert metric(port, 'walpipe_sink_up{sink="j"}') == 1
    assert metric(port, 'walpipe_sink_events_total{sink="j",source="app"}') > 0
    assert w.stop() == 0
    assert as_rows(read_jsonl(out)) == staged(staging_pg)
    text = w.log()
    assert "sink j" in text and "delivering again" not in text  # down at open: it never delivered half


# --------------------------------------------------------------------------
# (c) replay

def test_replay_delivers_exactly_the_range_in_order(source_pg, staging_pg, walpipe_factory, tmp_path):
    setup_source(source_pg, schema=SCHEMA)
    out = tmp_path / "events.jsonl"
    w = start(walpipe_factory, staging_pg, source_pg, {"j": {"path": out, "batch_events": 50}})
    writers = Writers(source_pg).start()
    try:
        wait_until(lambda: count_lines(out) > 600, timeout=120, what="600 events in the file", walpipe=w)
        events = staged(staging_pg)
        lo, hi = events[100][1], events[400][1]
        # while `run` goes on streaming into the same file
        r = w.command("replay", "--sink", "j", "--source", "app", "--from", lo, "--to", hi)
        assert r.returncode == 0, r.stderr
        assert "replay done: " in r.stderr
        # a time: the first event committed at or after it
        ts = staging_pg.scalar("SELECT commit_ts::text FROM walpipe.raw_events WHERE lsn = %s::pg_lsn LIMIT 1",
                               (events[500][1],), dbname="staging")
        r = w.command("replay", "--sink", "j", "--source", "app", "--from-time", ts, "--to", events[550][1],
                      "--table", "public.t2")
        assert r.returncode == 0, r.stderr
    finally:
        writers.stop()
    wait_caught_up(source_pg, w)
    total = len(staged(staging_pg))
    lines = read_jsonl(out)
    wait_until(lambda: sum(1 for e in read_jsonl(out) if not e.get("replay")) >= total, timeout=120,
               what="the stream to be delivered", walpipe=w)
    lines = read_jsonl(out)
    stream = [e for e in lines if not e.get("replay")]
    replayed = [e for e in lines if e.get("replay")]
    assert as_rows(stream) == staged(staging_pg)  # the replay moved nothing of the stream
    want1 = staged(staging_pg, f"AND r.lsn BETWEEN '{lo}' AND '{hi}'")
    want2 = staged(staging_pg, f"AND r.lsn >= (SELECT min(lsn) FROM walpipe.raw_events WHERE commit_ts >= '{ts}') "
                               f"AND r.lsn <= '{events[550][1]}' AND r.table_name = 't2'")
    assert len(want1) >= 300 and want1[0][1] == lo and want1[-1][1] == hi
    assert want2 and all(e[5] == "t2" for e in want2)
    assert as_rows(replayed) == want1 + want2

    # the replay did not move the position, and a range staging no longer holds is refused
    assert w.stop() == 0
    pos = staging_pg.sql("SELECT * FROM walpipe.sink_positions", dbname="staging")
    r = w.command("replay", "--sink", "j", "--source", "app", "--from", "0/1", "--to", hi)
    assert r.returncode == 1
    oldest = staged(staging_pg)[0][1]
    assert f"--from 0/1 is older than what staging still holds of source \"app\": its oldest event is at lsn " \
           f"{oldest}, committed " in r.stderr, r.stderr
    r = w.command("replay", "--sink", "j", "--source", "app", "--from-time", "2000-01-01 00:00:00+00")
    assert r.returncode == 1 and "older than what staging still holds" in r.stderr, r.stderr
    r = w.command("replay", "--sink", "j", "--source", "app", "--from", lo)
    assert r.returncode == 0, r.stderr
    assert staging_pg.sql("SELECT * FROM walpipe.sink_positions", dbname="staging") == pos


# --------------------------------------------------------------------------
# the ordered read walks the index (made by `walpipe init` for a configuration with sinks), also before the
# day's partition has statistics

@pytest.mark.staging_settings(autovacuum="off")
def test_sink_reads_walk_the_index_without_statistics(source_pg, staging_pg, walpipe_factory, tmp_path):
    setup_source(source_pg, schema=SCHEMA)
    w = start(walpipe_factory, staging_pg, source_pg, {})
    source_pg.sql("INSERT INTO t1 (v) SELECT 'r' || g FROM generate_series(1, 20000) g", dbname="app")
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    n = staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events", dbname="staging")
    assert n == 20000
    assert not staging_pg.scalar("SELECT bool_or(last_analyze IS NOT NULL OR last_autoanalyze IS NOT NULL) FROM "
                                 "pg_stat_user_tables WHERE relname LIKE 'raw_events%'", dbname="staging")
    out = tmp_path / "events.jsonl"
    sink_config(w, "j", path=out, batch_events=100)
    # staging initialized without sinks has no index for them: the sink waits for `walpipe init`
    w.start(subcommand="sink")
    wait_until(lambda: "staging has no index for sinks to read by" in w.log(since_start=True), timeout=60,
               what="the sink to ask for walpipe init", walpipe=w)
    r = w.init()
    assert r.returncode == 0, r.stderr
    assert "creating the index sinks read by" in r.stderr
    wait_until(lambda: staging_pg.scalar("SELECT events_delivered FROM walpipe.sink_positions", dbname="staging")
               == n, timeout=300, what="the sink to drain 20 000 events", walpipe=w)
    assert w.stop() == 0
    # every batch reads its 100 entries of the index (and the count of the backlog walks it now and then);
    # a bitmap scan and sort of everything after the position would read ~n * n / 200 = 2 000 000
    read = staging_pg.scalar("SELECT sum(idx_tup_read) FROM pg_stat_user_indexes "
                             "WHERE indexrelname LIKE 'raw_events%source_lsn_seq_id_idx'", dbname="staging")
    assert read < 10 * n, read
    assert count_lines(out) == n


def test_fatal_plugin_error_stops_that_sink_only(source_pg, staging_pg, walpipe_factory, tmp_path):
    setup_source(source_pg, schema=SCHEMA)
    good = tmp_path / "good.jsonl"
    w = start(walpipe_factory, staging_pg, source_pg,
              {"bad": {"path": tmp_path / "bad.jsonl", "fsync": "sometimes"}, "good": {"path": good}})
    wait_until(lambda: 'sink "bad" stopped: fsync of [sink bad] must be on or off' in w.log(), timeout=60,
               what="the bad sink to stop with its reason", walpipe=w)
    source_pg.sql("INSERT INTO t1 (v) SELECT 'x' FROM generate_series(1, 50)", dbname="app")
    wait_caught_up(source_pg, w)
    wait_until(lambda: count_lines(good) == 50, timeout=60, what="the good sink to deliver", walpipe=w)
    assert w.running
    assert w.stop() == 1  # `run` says one of its parts ended on an error ... after finishing everything else
    assert not (tmp_path / "bad.jsonl").exists()
