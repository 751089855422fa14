"""`walpipe status`: every field of --json checked against what the test's workload made, while
`walpipe run` runs and after it stopped; an unreachable source is shown as such (exit 1); the
table and --watch."""

import json
import re
import signal
import subprocess
import time
from datetime import datetime, timezone

import wptest
from test_core import wait_caught_up
from wptest import wait_until

SCHEMA = """
CREATE TABLE t (id int PRIMARY KEY, v text);
CREATE TABLE nothing (id int PRIMARY KEY, v text);
ALTER TABLE nothing REPLICA IDENTITY NOTHING;
INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 400) g;
INSERT INTO nothing VALUES (1, 'a'), (2, 'b');
ANALYZE t;
ANALYZE nothing;
"""


def status(w, *args, config=None):
    cmd = [str(w.binary), "status", "--config", str(config or w.config_path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def status_json(w, config=None):
    r = status(w, "--json", config=config)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def make_walpipe(source_pg, staging_pg, walpipe_factory, workers=0):
    source_pg.createdb("app")
    source_pg.sql(SCHEMA, dbname="app")
    staging_pg.createdb("staging")
    w = walpipe_factory("[placeholder]\n")
    wptest.write_config(w.config_path, staging_pg.conninfo("staging"),
                        {"app": {"conninfo": source_pg.conninfo("app"), "slot": "walpipe_app"}})
    with open(w.config_path, "a") as f:
        f.write(f"\n[workers]\ncount = {workers}\nresync = off\n")
    assert w.init().returncode == 0
    return w


def iso(ts):
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_status_json_fields(source_pg, staging_pg, walpipe_factory):
    w = make_walpipe(source_pg, staging_pg, walpipe_factory)
    # before walpipe ever ran: the slot does not exist, staging has nothing; status still answers
    rc, s = status_json(w)
    assert rc == 0, s
    src = s["sources"][0]
    assert src["slot"] == {"name": "walpipe_app", "exists": False, "active": None, "wal_status": None,
                           "safe_wal_size": None, "current_wal_lsn": src["slot"]["current_wal_lsn"],
                           "confirmed_flush_lsn": None, "restart_lsn": None}
    assert src["lag_bytes"] is None and src["snapshot"] is None and src["staged"]["events"] == 0

    w.start()
    # the initial snapshot copies t's 400 and nothing's 2 rows (estimates: reltuples after ANALYZE)
    wait_until(lambda: staging_pg.scalar("SELECT count(*) FROM walpipe.snapshots WHERE state = 'done'",
                                         dbname="staging") == 1, what="initial snapshot", walpipe=w)
    # streamed: 50 inserts, 20 updates and 5 deletes of t in 3 transactions; two UPDATEs of the
    # REPLICA IDENTITY NOTHING table that wal2json drops: two open divergences of one mirror
    source_pg.sql("INSERT INTO t SELECT g, 'n' || g FROM generate_series(401, 450) g", dbname="app")
    source_pg.sql("UPDATE t SET v = 'u' WHERE id <= 20", dbname="app")
    source_pg.sql("DELETE FROM t WHERE id > 445", dbname="app")
    source_pg.sql("UPDATE nothing SET v = 'x' WHERE id = 1", dbname="app")
    source_pg.sql("UPDATE nothing SET v = 'y' WHERE id = 2", dbname="app")
    wait_caught_up(source_pg, w)
    wait_until(lambda: staging_pg.scalar("SELECT count(*) FROM walpipe.divergences WHERE resolved_at IS NULL",
                                         dbname="staging") == 2, what="two divergences", walpipe=w)

    rc, s = status_json(w)
    assert rc == 0, s
    assert s["format"] == 1 and s["version"]
    src = s["sources"][0]
    assert src["name"] == "app" and src["reachable"] is True and src["error"] is None
    assert src["slot"]["name"] == "walpipe_app" and src["slot"]["exists"] is True
    assert src["slot"]["active"] is True
    assert src["slot"]["wal_status"] == "reserved"
    assert src["slot"]["safe_wal_size"] is None  # max_slot_wal_keep_size = -1
    staged = src["staged"]
    assert staged["events"] == 75  # streamed events only; snapshot rows are the snapshot's
    assert staged["rate_per_second"] * 60 == staging_pg.scalar(
        "SELECT count(*) FROM walpipe.raw_events WHERE event_type <> 'snapshot' "
        "AND received_at > now() - interval '60 seconds'", dbname="staging") == 75
    newest = staging_pg.scalar("SELECT max(commit_ts) FROM walpipe.raw_events", dbname="staging")
    assert staged["last_commit_time"] == iso(newest)
    assert staged["checkpoint_lsn"] == staging_pg.scalar("SELECT lsn::text FROM walpipe.checkpoints",
                                                         dbname="staging")
    snap = src["snapshot"]
    assert snap["kind"] == "initial" and snap["state"] == "done"
    assert snap["rows_copied"] == 402 and snap["rows_estimated"] == 402 and snap["progress"] == 1.0
    assert snap["id"] == staging_pg.scalar("SELECT id FROM walpipe.snapshots", dbname="staging")
    assert snap["seconds"] >= 0 and snap["rows_per_second"] >= 0

    # no worker runs: every staged event (snapshot rows and truncates included) is backlog
    c = s["consumers"]
    assert [x["name"] for x in c] == ["mirror"]
    total, first = staging_pg.sql("SELECT count(*), min(id) FROM walpipe.raw_events", dbname="staging")[0]
    assert c[0]["backlog_events"] == total and c[0]["position"] == first
    assert c[0]["lag_seconds"] > 0 and c[0]["last_error"] is None and c[0]["last_error_time"] is None
    assert s["dead_letters"] == {"waiting": 0, "parked": 0, "undecodable": 0}
    assert s["divergences"] == {"diverged_mirrors": 1, "open": 2}
    st = s["staging"]
    assert st["reachable"] is True and st["error"] is None
    assert st["raw_events_partitions"] == staging_pg.scalar(
        "SELECT count(*) FROM pg_partition_tree('walpipe.raw_events') WHERE isleaf", dbname="staging")
    assert st["raw_events_bytes"] > 0
    assert 0 < st["cache_hit_ratio"] <= 1

    # stopped: the slot is inactive, and lag is what the source wrote past confirmed_flush_lsn
    assert w.stop() == 0
    rc, s = status_json(w)
    assert rc == 0
    src = s["sources"][0]
    assert src["slot"]["active"] is False
    confirmed = source_pg.scalar("SELECT confirmed_flush_lsn::text FROM pg_replication_slots", dbname="app")
    assert src["slot"]["confirmed_flush_lsn"] == confirmed
    assert src["lag_bytes"] == source_pg.scalar("SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)::bigint",
                                                (src["slot"]["current_wal_lsn"], confirmed), dbname="app")
    assert src["retained_wal_bytes"] >= src["lag_bytes"]
    if src["lag_bytes"] == 0:
        assert src["lag_seconds"] == 0
    else:
        assert src["lag_seconds"] >= 0

    # the source writes while walpipe is down: lag bytes and seconds grow
    source_pg.sql("INSERT INTO t SELECT g, repeat('z', 500) FROM generate_series(1000, 1999) g", dbname="app")
    time.sleep(0)  # (no wait needed: the write has committed)
    rc, s = status_json(w)
    src = s["sources"][0]
    assert src["lag_bytes"] > 500 * 1000
    assert src["lag_seconds"] > 0
    assert src["staged"]["events"] == 75


def test_status_unreachable_source_and_table(source_pg, staging_pg, walpipe_factory, tmp_path):
    w = make_walpipe(source_pg, staging_pg, walpipe_factory, workers=1)
    w.start()
    # streaming, so the slot is active (it is not while the initial snapshot copies) and the insert
    # is streamed, not copied
    wait_until(lambda: "streaming from slot" in w.log(since_start=True), what="streaming", walpipe=w)
    source_pg.sql("INSERT INTO t VALUES (1000, 'x')", dbname="app")
    wait_caught_up(source_pg, w)
    # a second source nobody listens for: status shows it unreachable, prints the rest, exits 1
    port = wptest.free_port()
    cfg = tmp_path / "two.conf"
    wptest.write_config(cfg, staging_pg.conninfo("staging"),
                        {"app": {"conninfo": source_pg.conninfo("app"), "slot": "walpipe_app"},
                         "gone": {"conninfo": f"host=127.0.0.1 port={port} dbname=x password=s3cret-pw"}})
    rc, s = status_json(w, config=cfg)
    assert rc == 1
    gone = s["sources"][1]
    assert gone["name"] == "gone" and gone["reachable"] is False and gone["slot"]["name"] == "walpipe_gone"
    assert gone["error"] and "s3cret" not in gone["error"]
    assert gone["lag_bytes"] is None and gone["slot"]["exists"] is None
    assert s["sources"][0]["reachable"] is True and s["staging"]["reachable"] is True

    r = status(w, config=cfg)
    assert r.returncode == 1
    assert "s3cret" not in r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any(ln.split()[:3] == ["app", "walpipe_app", "yes"] for ln in lines), r.stdout
    assert any(ln.split()[:3] == ["gone", "walpipe_gone", "unreachable:"] for ln in lines), r.stdout
    assert any(ln.startswith("mirror ") for ln in lines), r.stdout
    assert "dead letters: 0 waiting, 0 parked, 0 undecodable" in r.stdout
    assert "diverged mirrors: 0 (0 open divergences)" in r.stdout

    # staging unreachable too: still a status, exit 1
    staging_pg.stop()
    rc, s = status_json(w)
    assert rc == 1
    assert s["staging"]["reachable"] is False and s["staging"]["error"]
    assert s["consumers"] == [] and s["dead_letters"] is None
    assert s["sources"][0]["reachable"] is True and s["sources"][0]["slot"]["exists"] is True
    staging_pg.start()
    assert w.stop() == 0


def test_status_watch(source_pg, staging_pg, walpipe_factory):
    w = make_walpipe(source_pg, staging_pg, walpipe_factory)
    p = subprocess.Popen([str(w.binary), "status", "--config", str(w.config_path), "--json", "--watch", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        docs, buf = [], ""
        dec = json.JSONDecoder()
        while len(docs) < 2:
            line = p.stdout.readline()
            assert line, p.stderr.read()
            buf += line
            try:
                doc, end = dec.raw_decode(buf.strip())
            except json.JSONDecodeError:
                continue
            docs.append(doc)
            buf = ""
        assert all(d["sources"][0]["name"] == "app" for d in docs)
        assert datetime.fromisoformat(docs[1]["time"].replace("Z", "+00:00")) >= \
            datetime.fromisoformat(docs[0]["time"].replace("Z", "+00:00"))
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_snapshot_progress_in_log_and_status(source_pg, staging_pg, walpipe_factory):
    """A snapshot of three 16 MB chunks, copied by one worker: the log reports its progress
    (rows copied of the estimate, share, rows/s, time left) as it passes each quarter."""
    source_pg.createdb("app")
    source_pg.sql("CREATE TABLE big (id int PRIMARY KEY, v text); "
                  "INSERT INTO big SELECT g, repeat('x', 1500) FROM generate_series(1, 25000) g; ANALYZE big",
                  dbname="app")
    estimate = source_pg.scalar("SELECT reltuples::bigint FROM pg_class WHERE relname = 'big'", dbname="app")
    staging_pg.createdb("staging")
    w = walpipe_factory("[placeholder]\n")
    wptest.write_config(w.config_path, staging_pg.conninfo("staging"),
                        {"app": {"conninfo": source_pg.conninfo("app"), "slot": "walpipe_app",
                                 "snapshot_workers": 1}})
    with open(w.config_path, "a") as f:
        f.write("\n[workers]\ncount = 0\n")
    assert w.init().returncode == 0
    w.start()
    wait_until(lambda: "initial snapshot done: 25000 rows" in w.log(), what="snapshot done", walpipe=w)
    lines = [ln for ln in w.log().splitlines() if "snapshot progress:" in ln]
    assert lines, w.log()
    for ln in lines:
        m = re.search(r"snapshot progress: (\d+) of ~(\d+) rows copied \((\d+) %\), (\d+) rows/s, about (\d+) s left",
                      ln)
        assert m, ln
        copied, est, pct = int(m[1]), int(m[2]), int(m[3])
        assert est == estimate and 0 < copied < 25000 and pct == round(100 * copied / est)
    rc, s = status_json(w)
    snap = s["sources"][0]["snapshot"]
    assert (snap["state"], snap["rows_copied"], snap["rows_estimated"], snap["progress"]) == \
        ("done", 25000, estimate, 1.0)
    assert w.stop() == 0
