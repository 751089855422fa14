"""Initial and requested snapshots: the rows that existed before streaming, copied under the
slot's exported snapshot, so that snapshot + stream reproduce the source exactly."""

import threading
import time

import pytest

import truth
import wptest
from test_core import staged_count, start_walpipe, wait_caught_up
from wptest import wait_until

SCHEMA = """
CREATE TABLE big (id int PRIMARY KEY, n int, v text);
CREATE TABLE small (id int PRIMARY KEY, price numeric(10,2), at timestamptz, tags text[], raw bytea, ok bool);
CREATE SCHEMA "Other";
CREATE TABLE "Other"."Mixed" (id int PRIMARY KEY, "Val" text);
INSERT INTO small VALUES (1, 10.50, '2024-02-29 11:14:15+00', '{a,b}', '\\x00ff', true),
                         (2, NULL, NULL, NULL, NULL, NULL);
INSERT INTO "Other"."Mixed" VALUES (1, 'x');
"""


def fill_big(source_pg, rows, width=100):
    source_pg.sql(f"INSERT INTO big SELECT g, g, repeat('x', {width}) FROM generate_series(1, {rows}) g",
                  dbname="app")


def churn(source_pg, stop, top):
    """Updates, deletes and inserts on big while the snapshot runs."""
    conn = source_pg.connect("app")
    cur = conn.cursor()
    i = 0
    while not stop.is_set():
        i += 1
        cur.execute("UPDATE big SET n = n + 1 WHERE id = %s", ((i * 7919) % top + 1,))
        cur.execute("DELETE FROM big WHERE id = %s", ((i * 104729) % top + 1,))
        cur.execute("INSERT INTO big VALUES (%s, 0, 'new') ON CONFLICT (id) DO UPDATE SET v = 'again'", (top + i,))
    conn.close()


def source_state(source_pg):
    rows = source_pg.sql("SELECT id, n, v FROM big", dbname="app")
    return {r[0]: {"id": r[0], "n": r[1], "v": r[2]} for r in rows}


def mirror_of_big(staging_pg):
    state = truth.reconstruct(truth.read_staged(staging_pg, "staging"))
    return {int(k): {"id": int(v["id"]), "n": int(v["n"]), "v": v["v"]}
            for k, v in state[("public", "big")].items()}


def test_initial_snapshot_under_write_load(source_pg, staging_pg, walpipe_factory):
    source_pg.createdb("app")
    source_pg.sql(SCHEMA, dbname="app")
    # about 60 MB: several 16 MB chunks, copied by 2 workers; wide rows keep the row count (and
    # the Python that checks every row) small for the same number of chunks
    fill_big(source_pg, 40000, width=1500)
    stop = threading.Event()
    t = threading.Thread(target=churn, args=(source_pg, stop, 40000))
    t.start()
    try:
        w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}})
        wait_until(lambda: "initial snapshot done" in w.log(since_start=True), timeout=300, what="snapshot done",
                   walpipe=w)
        time.sleep(1)
    finally:
        stop.set()
        t.join()
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    snap = staging_pg.sql("SELECT kind, state, rows, lsn::text FROM walpipe.snapshots", dbname="staging")
    assert len(snap) == 1 and snap[0][:2] == ("initial", "done"), snap
    chunks = staging_pg.scalar("SELECT count(*) FROM walpipe.snapshot_chunks WHERE table_name = 'big'",
                               dbname="staging")
    assert chunks >= 3, chunks
    ck = staging_pg.sql("SELECT snapshot_state, snapshot_lsn::text FROM walpipe.checkpoints", dbname="staging")[0]
    assert ck == ("done", snap[0][3])
    # snapshot rows carry the slot's consistent point; every streamed change committed after it
    assert staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE event_type <> 'snapshot' "
                             "AND lsn <= %s::pg_lsn", (snap[0][3],), dbname="staging") == 0
    assert staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE event_type = 'snapshot'",
                             dbname="staging") == snap[0][2]
    assert mirror_of_big(staging_pg) == source_state(source_pg)
    # values follow the same rules as streamed rows
    rows = staging_pg.sql("SELECT payload FROM walpipe.raw_events WHERE table_name = 'small' ORDER BY "
                          "payload->'after'->>'id'", dbname="staging")
    assert rows[0][0]["after"] == {"id": 1, "price": "10.50", "at": "2024-02-29 11:14:15+00", "tags": "{a,b}",
                                   "raw": "\\x00ff", "ok": True}
    assert rows[1][0]["after"] == {"id": 2, "price": None, "at": None, "tags": None, "raw": None, "ok": None}
    mixed = staging_pg.sql("SELECT schema_name, table_name, payload FROM walpipe.raw_events "
                           "WHERE table_name = 'Mixed'", dbname="staging")
    assert mixed == [("Other", "Mixed", {"after": {"id": 1, "Val": "x"}})]


def test_snapshot_interrupted_starts_over_cleanly(source_pg, staging_pg, walpipe_factory):
    source_pg.createdb("app")
    source_pg.sql(SCHEMA, dbname="app")
    fill_big(source_pg, 60000, width=1500)   # about 90 MB: six 16 MB chunks
    sources = {"app": {"conninfo": source_pg.conninfo("app"), "snapshot_workers": 1}}
    w = walpipe_factory("[placeholder]\n")
    wptest.write_config(w.config_path, staging_pg.conninfo("staging"), sources)
    staging_pg.createdb("staging")
    r = w.init()
    assert r.returncode == 0, r.stderr
    # The kill must land after big's first chunk committed and before its last: a trigger makes
    # every chunk of big after its first wait for an advisory lock this test holds, so the copy is
    # stopped in the middle by a condition, not by the test being quicker than the copy.
    staging_pg.sql("""
        CREATE FUNCTION public.hold_second_chunk() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF (SELECT count(*) FROM walpipe.snapshot_chunks WHERE table_name = 'big') > 1 THEN
            PERFORM pg_advisory_xact_lock(7745);
          END IF;
          RETURN NULL;
        END $$;
        CREATE TRIGGER hold_second_chunk AFTER INSERT ON walpipe.snapshot_chunks
          FOR EACH ROW EXECUTE FUNCTION public.hold_second_chunk();""", dbname="staging")
    holder = staging_pg.connect("staging")
    holder.autocommit = True
    holder.cursor().execute("SELECT pg_advisory_lock(7745)")
    try:
        w.start()
        wait_until(lambda: staging_pg.scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 7745 AND NOT granted",
            dbname="staging") == 1, timeout=300, interval=0.05, what="the second chunk waiting", walpipe=w)
        assert staging_pg.scalar("SELECT count(*) FROM walpipe.snapshot_chunks WHERE table_name = 'big'",
                                 dbname="staging") == 1
        # the worker has applied the first chunk to the mirror before the kill
        wait_until(lambda: staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE NOT processed",
                                             dbname="staging") == 0
                   and staging_pg.scalar("SELECT to_regclass('analytics.public_big') IS NOT NULL",
                                         dbname="staging")
                   and staging_pg.scalar("SELECT count(*) FROM analytics.public_big WHERE id <= 5",
                                         dbname="staging") == 5,
                   timeout=120, what="the first chunk applied to the mirror", walpipe=w)
        w.kill()
        # the killed walpipe's waiting chunk must not commit when the lock goes: end its session
        staging_pg.sql("SELECT pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' "
                       "AND l.objid = 7745 AND NOT l.granted", dbname="staging")
        wait_until(lambda: staging_pg.scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 7745 AND NOT granted",
            dbname="staging") == 0, what="the waiting chunk's session gone")
    finally:
        holder.cursor().execute("SELECT pg_advisory_unlock(7745)")
        holder.close()
    staging_pg.sql("DROP TRIGGER hold_second_chunk ON walpipe.snapshot_chunks; "
                   "DROP FUNCTION public.hold_second_chunk()", dbname="staging")
    partial = staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events", dbname="staging")
    assert 0 < partial < 60000
    source_pg.sql("UPDATE big SET n = -1 WHERE id <= 10", dbname="app")
    # rows the discarded attempt copied (and the worker mirrored) that the source deletes before
    # the new attempt: in neither the new snapshot nor the stream
    source_pg.sql("DELETE FROM big WHERE id <= 5", dbname="app")
    w.start()
    wait_until(lambda: "initial snapshot done" in w.log(since_start=True), timeout=300, what="snapshot done",
               walpipe=w)
    wait_caught_up(source_pg, w)
    wait_until(lambda: staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE NOT processed",
                                         dbname="staging") == 0, timeout=120, what="every event applied", walpipe=w)
    assert w.stop() == 0
    assert "starting it over" in w.log()
    states = staging_pg.sql("SELECT state FROM walpipe.snapshots ORDER BY id", dbname="staging")
    assert states == [("superseded",), ("done",)]
    # only the second attempt's rows are left, each row once
    n = staging_pg.sql("SELECT count(*), count(DISTINCT payload->'after'->>'id'), count(DISTINCT lsn) "
                       "FROM walpipe.raw_events WHERE table_name = 'big' AND event_type = 'snapshot'",
                       dbname="staging")[0]
    assert n == (59995, 59995, 1)
    # the new attempt truncates at its consistent point, before its rows
    assert staging_pg.sql("SELECT event_type, seq FROM walpipe.raw_events WHERE table_name = 'big' "
                          "AND event_type <> 'snapshot'", dbname="staging") == [("truncate", -1)]
    assert mirror_of_big(staging_pg) == source_state(source_pg)
    # and the mirror the worker keeps no longer holds the deleted rows of the discarded attempt
    mirror = staging_pg.sql("SELECT id, n, v FROM analytics.public_big", dbname="staging")
    assert {r[0]: {"id": r[0], "n": r[1], "v": r[2]} for r in mirror} == source_state(source_pg)


@pytest.mark.parametrize("plugin", ["wal2json", "pgoutput"])
def test_requested_snapshot_while_streaming(source_pg, staging_pg, walpipe_factory, plugin):
    source_pg.createdb("app")
    source_pg.sql(SCHEMA, dbname="app")
    fill_big(source_pg, 50000)
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app"),
                                                            "snapshot": "never", "plugin": plugin}})
    wait_until(lambda: "streaming from slot" in w.log(since_start=True), what="streaming", walpipe=w)
    assert staged_count(staging_pg) == 0   # snapshot = never: existing rows are not copied
    stop = threading.Event()
    t = threading.Thread(target=churn, args=(source_pg, stop, 50000))
    t.start()
    try:
        time.sleep(1)
        r = w.command("snapshot", "--source", "app", "--table", "public.big", timeout=300)
        assert r.returncode == 0, r.stderr
        time.sleep(1)
    finally:
        stop.set()
        t.join()
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    snap = staging_pg.sql("SELECT kind, state, tables FROM walpipe.snapshots", dbname="staging")
    assert snap == [("requested", "done", ["public.big"])]
    assert staging_pg.scalar("SELECT count(DISTINCT table_name) FROM walpipe.raw_events WHERE event_type = "
                             "'snapshot'", dbname="staging") == 1
    # the temporary slot is gone with the command
    assert [r[0] for r in source_pg.sql("SELECT slot_name FROM pg_replication_slots")] == ["walpipe_app"]
    assert mirror_of_big(staging_pg) == source_state(source_pg)


def test_snapshot_command_errors(source_pg, staging_pg, walpipe_factory, tmp_path):
    source_pg.createdb("app")
    staging_pg.createdb("staging")
    cfg = wptest.write_config(tmp_path / "w.conf", staging_pg.conninfo("staging"),
                              {"app": {"conninfo": source_pg.conninfo("app")}})
    w = walpipe_factory(str(cfg))
    assert w.init().returncode == 0
    r = w.command("snapshot", "--source", "nosuch")
    assert r.returncode == 2 and 'no source "nosuch"' in r.stderr
    r = w.command("snapshot", "--source", "app", "--table", "nodot")
    assert r.returncode == 2 and "schema.table" in r.stderr, r.stderr
    r = w.command("snapshot", "--source", "app", "--table", "public.nosuch")
    assert r.returncode == 1 and "none of the tables named exists" in r.stdout + r.stderr


def test_initial_snapshot_of_tables_not_created_yet(source_pg, staging_pg, walpipe_factory):
    """`tables` may name tables that do not exist yet: the initial snapshot copies nothing, says
    so, and streaming captures them once they exist (it used to fail, drop the slot and start
    over, forever)."""
    source_pg.createdb("app")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app"),
                                                            "tables": "public.later"}})
    wait_until(lambda: "streaming from slot" in w.log(since_start=True), what="streaming", walpipe=w)
    assert "nothing to copy" in w.log()
    assert staging_pg.sql("SELECT kind, state, rows FROM walpipe.snapshots", dbname="staging") == [
        ("initial", "done", 0)]
    source_pg.sql("CREATE TABLE later (id int PRIMARY KEY); INSERT INTO later SELECT generate_series(1, 10)",
                  dbname="app")
    wait_caught_up(source_pg, w)
    assert staged_count(staging_pg) == 10
    assert w.stop() == 0
    assert w.log().count("created slot") == 1
