"""Divergences walpipe learns of from the capture side, and resyncs that repair them.

- wal2json drops the UPDATEs and DELETEs of a table without a replica identity
  (REPLICA IDENTITY NOTHING, or no key under DEFAULT) and sends only a WARNING
  notice: walpipe records an open "dropped_change" divergence for the table at
  the commit LSN of the transaction, in the staging transaction of its
  checkpoint (a SIGKILL after it is staged keeps it, a re-decode adds none).
- A resync (`walpipe snapshot --table`, or `walpipe run` by itself with
  [workers] resync = auto) stages a truncate at its consistent point before
  the copied rows, so the mirror ends exactly equal to the source, rows the
  source no longer has included, while streaming goes on.

Mirrors are compared with their sources by the ordered checksum of test_workers.py.
"""

import signal
import threading
import time

import pytest

import wptest
from test_core import wait_caught_up
from test_workers import assert_mirrored, checksum, columns, ident, start, wait_applied
from wptest import wait_until


def open_divergences(staging_pg, kind=None):
    return staging_pg.sql(
        "SELECT schema_name, table_name, kind, lsn::text, reason FROM walpipe.divergences "
        "WHERE resolved_at IS NULL AND (%s::text IS NULL OR kind = %s) ORDER BY id", (kind, kind), dbname="staging")


def commit_end_of(source_pg, slot, xid):
    """The commit end LSN (nextlsn of its B message) of transaction xid, as a wal2json slot decodes it."""
    for change in wptest.slot_changes_v2(source_pg, "app", slot, peek=True):
        if change.get("action") == "B" and change.get("xid") == xid:
            return change["nextlsn"]
    raise AssertionError(f"transaction {xid} not in slot {slot}")


def in_one_txn(source_pg, statements):
    """Runs statements in one source transaction; returns its xid."""
    conn = source_pg.connect("app", autocommit=False)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT txid_current()")
            xid = cur.fetchone()[0]
            for s in statements:
                cur.execute(s)
        conn.commit()
        return xid
    finally:
        conn.close()


def setup_app(source_pg, schema_sql, plugin="wal2json"):
    source_pg.createdb("app")
    source_pg.sql(schema_sql, dbname="app")
    if plugin == "pgoutput":  # the publication walpipe would create, older than the slot
        source_pg.sql('CREATE PUBLICATION "walpipe_app" FOR ALL TABLES', dbname="app")
    wptest.create_slot(source_pg, "app", "walpipe_app", plugin=plugin)
    wptest.create_slot(source_pg, "app", "truth")


# A schema and table whose names hold a dot, a quote and a non-ASCII letter (the notice
# prints them unescaped: "we.ird"."t"x.ü"), and a pair whose notice "x"."y"."z" splits
# two ways: walpipe finds which table staging knows.
WEIRD = 'we.ird', 't"x.ü'
AMBIGUOUS = 'x"."y', 'z'
DROPPED_SCHEMA = f"""
CREATE SCHEMA {ident(WEIRD[0])};
CREATE TABLE {ident(WEIRD[0])}.{ident(WEIRD[1])} (id int PRIMARY KEY, v text);
ALTER TABLE {ident(WEIRD[0])}.{ident(WEIRD[1])} REPLICA IDENTITY NOTHING;
CREATE SCHEMA {ident(AMBIGUOUS[0])};
CREATE TABLE {ident(AMBIGUOUS[0])}.{ident(AMBIGUOUS[1])} (id int PRIMARY KEY, v text);
ALTER TABLE {ident(AMBIGUOUS[0])}.{ident(AMBIGUOUS[1])} REPLICA IDENTITY NOTHING;
"""


def test_dropped_changes_recorded_and_kept_over_a_crash(source_pg, staging_pg, walpipe_factory):
    setup_app(source_pg, DROPPED_SCHEMA)
    weird = f"{ident(WEIRD[0])}.{ident(WEIRD[1])}"
    amb = f"{ident(AMBIGUOUS[0])}.{ident(AMBIGUOUS[1])}"
    w = start(walpipe_factory, staging_pg, source_pg, workers_extra={"resync": "off"})
    in_one_txn(source_pg, [f"INSERT INTO {weird} SELECT g, 'v' || g FROM generate_series(1, 5) g",
                           f"INSERT INTO {amb} SELECT g, 'v' || g FROM generate_series(1, 5) g"])
    wait_caught_up(source_pg, w)
    # wal2json drops all of these; it emits an empty B/C pair and WARNING notices
    x1 = in_one_txn(source_pg, [f"UPDATE {weird} SET v = 'changed' WHERE id <= 2",
                                f"DELETE FROM {weird} WHERE id = 5"])
    x2 = in_one_txn(source_pg, [f"DELETE FROM {amb} WHERE id = 1"])
    end1 = commit_end_of(source_pg, "truth", x1)
    end2 = commit_end_of(source_pg, "truth", x2)
    wait_until(lambda: len(open_divergences(staging_pg, "dropped_change")) == 2, timeout=60,
               what="two dropped_change divergences", walpipe=w)
    rows = open_divergences(staging_pg, "dropped_change")
    assert [(r[0], r[1], r[3]) for r in rows] == [(WEIRD[0], WEIRD[1], end1), (AMBIGUOUS[0], AMBIGUOUS[1], end2)]
    assert "UPDATEs and DELETEs" in rows[0][4] and "REPLICA IDENTITY" in rows[0][4], rows[0][4]
    assert "DELETEs" in rows[1][4] and "UPDATE" not in rows[1][4], rows[1][4]
    # named by the workers' progress line and a warning
    wait_until(lambda: "2 diverged mirror(s)" in w.log(since_start=True), timeout=30,
               what="the progress line to count the diverged mirrors", walpipe=w)
    assert "2 mirror(s) diverged from their source" in w.log(since_start=True)

    # a crash once the transactions are staged and acknowledged keeps the record, and
    # decoding them again (the slot may resend them) adds none
    wait_caught_up(source_pg, w)
    w.kill()
    w.start()
    in_one_txn(source_pg, [f"INSERT INTO {weird} VALUES (100, 'after')"])
    wait_caught_up(source_pg, w)
    assert [(r[0], r[1], r[3]) for r in open_divergences(staging_pg)] == [
        (WEIRD[0], WEIRD[1], end1), (AMBIGUOUS[0], AMBIGUOUS[1], end2)]
    assert staging_pg.scalar("SELECT count(*) FROM walpipe.divergences", dbname="staging") == 2
    assert w.stop() == 0


def test_resync_after_identity_fixed(source_pg, staging_pg, walpipe_factory):
    """REPLICA IDENTITY NOTHING with a primary key: the mirror misses UPDATEs and DELETEs and is
    marked diverged; after ALTER TABLE ... REPLICA IDENTITY DEFAULT, `walpipe run` with
    resync = auto makes it exactly equal to the source and resolves the divergence."""
    setup_app(source_pg, "CREATE TABLE nothing_t (id int PRIMARY KEY, v text, n int);"
                         "ALTER TABLE nothing_t REPLICA IDENTITY NOTHING;"
                         "CREATE TABLE nokey (a int, b text); INSERT INTO nokey VALUES (1, 'x');")
    w = start(walpipe_factory, staging_pg, source_pg, workers_extra={"resync": "off"})
    source_pg.sql("INSERT INTO nothing_t SELECT g, 'v' || g, g FROM generate_series(1, 200) g", dbname="app")
    wait_applied(source_pg, staging_pg, w)
    assert_mirrored(source_pg, staging_pg, "nothing_t", ["id"])
    x = in_one_txn(source_pg, ["UPDATE nothing_t SET v = 'changed', n = -n WHERE id % 7 = 0",
                               "DELETE FROM nothing_t WHERE id % 11 = 0"])
    end = commit_end_of(source_pg, "truth", x)
    wait_until(lambda: len(open_divergences(staging_pg)) == 1, timeout=60, what="a dropped_change divergence",
               walpipe=w)
    assert [(r[0], r[1], r[2], r[3]) for r in open_divergences(staging_pg)] == [
        ("public", "nothing_t", "dropped_change", end)]
    wait_applied(source_pg, staging_pg, w)
    cols = columns(source_pg, "app", "public", "nothing_t")
    assert checksum(source_pg, "app", "nothing_t", cols, ["id"]) != \
        checksum(staging_pg, "staging", "analytics.public_nothing_t", cols, ["id"])
    # walpipe verify agrees: the mirror differs
    r = w.command("verify", "--table", "public.nothing_t", timeout=300)
    assert r.returncode == 1 and "differs" in r.stdout, r.stdout + r.stderr

    source_pg.sql("ALTER TABLE nothing_t REPLICA IDENTITY DEFAULT", dbname="app")
    source_pg.sql("UPDATE nothing_t SET n = n + 1000 WHERE id % 5 = 0; DELETE FROM nothing_t WHERE id % 13 = 0",
                  dbname="app")
    assert w.stop() == 0
    with open(w.config_path) as f:
        text = f.read()
    with open(w.config_path, "w") as f:
        f.write(text.replace("resync = off", "resync = auto"))
    w.start()
    source_pg.sql("INSERT INTO nothing_t VALUES (1000, 'late', 1)", dbname="app")
    # a table that cannot be mirrored (no key) stays diverged: named, not resynced
    source_pg.sql("UPDATE nokey SET b = 'y'", dbname="app")
    wait_until(lambda: [(r[1], r[2]) for r in open_divergences(staging_pg)] == [("nokey", "dropped_change")],
               timeout=90, what="the divergence of nothing_t resolved, that of nokey open", walpipe=w)
    wait_until(lambda: 'not resyncing the diverged mirror of "public"."nokey" of source "app": it has no usable '
                       'primary key' in w.log(since_start=True), timeout=30, what="nokey named", walpipe=w)
    assert all("public.nokey" not in r[0] for r in staging_pg.sql("SELECT tables FROM walpipe.snapshots",
                                                                   dbname="staging"))
    wait_applied(source_pg, staging_pg, w)
    assert_mirrored(source_pg, staging_pg, "nothing_t", ["id"])
    by = staging_pg.scalar("SELECT resolved_by FROM walpipe.divergences WHERE table_name = 'nothing_t'",
                           dbname="staging")
    assert by.startswith("resync snapshot "), by
    log = w.log(since_start=True)
    assert "resync snapshot" in log and "rows in" in log, w.log_tail()
    # and agrees that the resynced mirror is equal
    r = w.command("verify", "--table", "public.nothing_t", timeout=300)
    assert r.returncode == 0 and "equal" in r.stdout, r.stdout + r.stderr
    assert w.stop() == 0


@pytest.mark.parametrize("plugin", ["wal2json", "pgoutput"])
def test_snapshot_table_removes_rows_the_source_lacks(source_pg, staging_pg, walpipe_factory, plugin):
    """`walpipe snapshot --table` of a mirrored table, under concurrent writes, leaves the
    mirror exactly equal to the source: a row only the mirror has (put there by hand) goes.
    Under pgoutput the resync's consistent point meets the stream's held transactions."""
    setup_app(source_pg, "CREATE TABLE items (id int PRIMARY KEY, v int, note text)", plugin=plugin)
    source_pg.sql("INSERT INTO items SELECT g, g, 'n' || g FROM generate_series(1, 2000) g", dbname="app")
    w = start(walpipe_factory, staging_pg, source_pg, workers=2, workers_extra={"resync": "off"}, plugin=plugin)
    wait_applied(source_pg, staging_pg, w)
    assert_mirrored(source_pg, staging_pg, "items", ["id"])
    staging_pg.sql("INSERT INTO analytics.public_items (id, v, note, _walpipe_lsn, _walpipe_seq) "
                   "VALUES (-1, 0, 'only in the mirror', '0/1', 1)", dbname="staging")

    stop = threading.Event()
    errors = []

    def writer():
        conn = source_pg.connect("app")
        i = 3000
        try:
            with conn.cursor() as cur:
                while not stop.is_set():
                    cur.execute("INSERT INTO items VALUES (%s, 0, 'new')", (i,))
                    cur.execute("UPDATE items SET v = v + 1 WHERE id = %s", (i % 2000 + 1,))
                    cur.execute("DELETE FROM items WHERE id = %s", ((i * 7) % 2000 + 1,))
                    i += 1
                    time.sleep(0.002)
        except Exception as e:  # reported by the test
            errors.append(e)
        finally:
            conn.close()

    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_until(lambda: source_pg.scalar("SELECT count(*) FROM items WHERE note = 'new'", dbname="app") >= 50,
                   timeout=60, what="concurrent writes under way")
        r = w.command("snapshot", "--source", "app", "--table", "public.items", timeout=120)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: source_pg.scalar("SELECT count(*) FROM items WHERE note = 'new'", dbname="app") >= 100,
                   timeout=60, what="writes after the snapshot")
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    wait_applied(source_pg, staging_pg, w)
    assert_mirrored(source_pg, staging_pg, "items", ["id"])
    # the truncate is the resync's, marked as such, ordered before the copied rows
    snap, cp = staging_pg.sql("SELECT id, lsn::text FROM walpipe.snapshots WHERE kind = 'requested'",
                              dbname="staging")[0]
    trunc = staging_pg.sql("SELECT payload, lsn::text, seq, id FROM walpipe.raw_events WHERE event_type = 'truncate'",
                           dbname="staging")
    assert [(p, l, s) for p, l, s, _ in trunc] == [({"snapshot": snap}, cp, -1)]
    first_row = staging_pg.scalar("SELECT min(id) FROM walpipe.raw_events WHERE event_type = 'snapshot'",
                                  dbname="staging")
    assert trunc[0][3] < first_row
    assert source_pg.scalar("SELECT plugin FROM pg_replication_slots WHERE slot_name = 'walpipe_app'") == plugin
    assert w.stop() == 0


def test_interrupted_resync_leaves_the_table_marked(source_pg, staging_pg, walpipe_factory):
    """A resync stopped after a table's truncate committed (with its first chunk) but before its
    last chunk: the mirror misses rows, so the table gets an open "manual" divergence at the
    resync's consistent point; the next resync resolves it."""
    source_pg.createdb("app")
    source_pg.sql("CREATE TABLE big (id int PRIMARY KEY, n int, v text)", dbname="app")
    # about 60 MB of 1.5 kB rows: 4 chunks of 16 MB, copied one after the other by one worker
    source_pg.sql("INSERT INTO big SELECT g, g, repeat('x', 1500) FROM generate_series(1, 40000) g", dbname="app")
    w = walpipe_factory("[placeholder]\n")
    wptest.write_config(w.config_path, staging_pg.conninfo("staging"),
                        {"app": {"conninfo": source_pg.conninfo("app"), "slot": "walpipe_app",
                                 "snapshot_workers": 1}})
    staging_pg.createdb("staging")
    assert w.init().returncode == 0
    w.start(subcommand="snapshot", args=("--source", "app", "--table", "public.big"))
    wait_until(lambda: staging_pg.scalar("SELECT count(*) FROM walpipe.snapshot_chunks", dbname="staging") >= 1,
               timeout=120, interval=0.02, what="the first chunk committed", walpipe=w)
    w.signal(signal.SIGINT)
    assert w.wait_exit(60) == 1
    snap, cp, state = staging_pg.sql("SELECT id, lsn::text, state FROM walpipe.snapshots", dbname="staging")[0]
    assert state == "failed"
    assert staging_pg.scalar("SELECT count(*) FROM walpipe.snapshot_chunks", dbname="staging") < 4
    assert [(r[0], r[1], r[2], r[3]) for r in open_divergences(staging_pg)] == [("public", "big", "manual", cp)]
    assert f"resync snapshot {snap} failed" in open_divergences(staging_pg)[0][4]

    r = w.command("snapshot", "--source", "app", "--table", "public.big", timeout=120)
    assert r.returncode == 0, r.stderr
    assert open_divergences(staging_pg) == []
    by = staging_pg.scalar("SELECT resolved_by FROM walpipe.divergences", dbname="staging")
    assert by.startswith(f"resync snapshot {snap + 1} at "), by
