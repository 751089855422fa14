"""Keys, tables that disappear, rewrites and parked events (issue 10), against real clusters.

- Tables dropped on the source before walpipe read their keys: workers never livelock; their
  events are parked with the true reason, every other mirror equals its source.
- Key choice: the mirror's key is the replica identity index, else the primary key, else any
  unique index over NOT NULL columns, whatever the identity; an event is judged by the key
  values it carries.
- Rewrites (no row changes in the WAL) are recorded as open "rewrite" divergences (these tests
  run with resync = off, so what is recorded stays open; test_diverge.py repairs them); a TRUNCATE
  (in the stream) is not.
- A parked event marks its mirror diverged, and `walpipe dlq list` shows it.
"""

import re

import pytest

import wptest
from test_core import setup_source, wait_caught_up
from test_workers import assert_mirrored, dead_letters, start, start_work, unprocessed, retrying
from wptest import wait_until


def dl_rows(staging_pg):
    return staging_pg.sql("SELECT table_name, event_type, reason, next_attempt_at IS NULL "
                          "FROM walpipe.dead_letters WHERE kind = 'apply' ORDER BY id", dbname="staging")


def open_divergences(staging_pg):
    return staging_pg.sql("SELECT table_name, kind, lsn::text, reason FROM walpipe.divergences "
                          "WHERE resolved_at IS NULL ORDER BY id", dbname="staging")


# --------------------------------------------------------------------------
# tables dropped before walpipe read their keys

KEEP_SCHEMA = "CREATE TABLE keep (id int PRIMARY KEY, v text)"
NGONE = 12


def gone_table_statements(i):
    """A table created, written (8 changes, all in the stream) and dropped. An even one in one
    transaction: no other session ever sees it in the catalog. An odd one in three: it is in the
    catalog for a while, but walpipe reads a new table's key only when a worker asks for it."""
    t = f"gone_{i}"
    create = f"CREATE TABLE {t} (id int PRIMARY KEY, v text)"
    write = (f"INSERT INTO {t} SELECT g, 'v' || g FROM generate_series(1, 5) g; "
             f"UPDATE {t} SET v = 'u' WHERE id <= 2; DELETE FROM {t} WHERE id = 5")
    drop = f"DROP TABLE {t}"
    if i % 2 == 0:
        return [f"BEGIN; {create}; {write}; {drop}; COMMIT"]
    return [create, write, drop]


def wait_keys_read(staging_pg, w):
    """Waits for `walpipe run`'s first reading of the source's catalog (keep is in it)."""
    wait_until(lambda: staging_pg.scalar("SELECT count(*) FROM walpipe.source_tables WHERE table_name = 'keep'",
                                         dbname="staging") == 1, timeout=30, what="keep's key read", walpipe=w)


@pytest.mark.parametrize("claim_size", [1000, 7])
def test_dropped_tables_never_livelock(source_pg, staging_pg, walpipe_factory, claim_size):
    setup_source(source_pg, schema=KEEP_SCHEMA)
    # `walpipe run` stages (and discovers keys) with no workers of its own
    w = start(walpipe_factory, staging_pg, source_pg, workers=0, workers_extra={"claim_size": claim_size, "resync": "off"})
    # after `run`'s first reading of the catalog, a new table's key is read only when a worker asks for it
    wait_keys_read(staging_pg, w)
    for i in range(NGONE):
        for stmt in gone_table_statements(i):
            source_pg.sql(stmt, dbname="app")
        source_pg.sql(f"INSERT INTO keep SELECT g, 'k' || g FROM generate_series({i * 10 + 1}, {i * 10 + 10}) g",
                      dbname="app")
        source_pg.sql(f"UPDATE keep SET v = v || '!' WHERE id % 3 = {i % 3}", dbname="app")
    wait_caught_up(source_pg, w)
    gone_events = staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE table_name LIKE 'gone_%'",
                                    dbname="staging")
    assert gone_events == NGONE * 8

    # several workers in another process; `run` answers their requests for keys
    work = start_work(walpipe_factory, w, 3)
    wait_until(lambda: unprocessed(staging_pg) == 0 and retrying(staging_pg) == 0, timeout=60, interval=0.2,
               what="every event applied or parked", walpipe=work)
    dl = dl_rows(staging_pg)
    assert len(dl) == gone_events, dl
    for table, _, reason, parked in dl:
        assert table.startswith("gone_") and parked, (table, reason)
        assert f'table "public"."{table}" of source "app" cannot be mirrored: it no longer exists on the source' \
            in reason, reason
        assert "walpipe dlq drop" in reason and "make sure `walpipe run` is running" not in reason, reason
    assert_mirrored(source_pg, staging_pg, "keep", ["id"])
    # no mirror for a table that cannot be one, and so no divergence
    assert staging_pg.scalar("SELECT count(*) FROM walpipe.mirrors WHERE table_name LIKE 'gone_%'",
                             dbname="staging") == 0
    assert open_divergences(staging_pg) == []
    assert work.stop() == 0
    assert w.stop() == 0


def test_work_alone_does_not_livelock(source_pg, staging_pg, walpipe_factory):
    """`walpipe work` with no `walpipe run` to read keys: the events wait as deferred dead letters
    that say so; once `run` is back, they are parked with the true reason."""
    setup_source(source_pg, schema=KEEP_SCHEMA)
    w = start(walpipe_factory, staging_pg, source_pg, workers=0, workers_extra={"claim_size": 7, "resync": "off"})
    wait_keys_read(staging_pg, w)
    for i in range(4):
        for stmt in gone_table_statements(i):
            source_pg.sql(stmt, dbname="app")
    source_pg.sql("INSERT INTO keep SELECT g, 'k' || g FROM generate_series(1, 20) g", dbname="app")
    wait_caught_up(source_pg, w)
    assert w.stop() == 0

    work = start_work(walpipe_factory, w, 2)
    wait_until(lambda: unprocessed(staging_pg) == 0, timeout=30, interval=0.2, what="every event claimed",
               walpipe=work)
    dl = dl_rows(staging_pg)
    assert len(dl) == 4 * 8, dl
    for table, _, reason, parked in dl:
        assert not parked, (table, reason)
        assert f'no key is recorded for table "public"."{table}" of source "app"' in reason, reason
        assert "`walpipe run` reads each table's key" in reason, reason
    assert_mirrored(source_pg, staging_pg, "keep", ["id"])

    # `run` is back: the deferred retries ask it, and it finds the tables gone
    w.start()
    wait_until(lambda: retrying(staging_pg) == 0, timeout=60, interval=0.2, what="dead letters parked",
               walpipe=work)
    for table, _, reason, parked in dl_rows(staging_pg):
        assert parked and "it no longer exists on the source" in reason, (table, reason)
    assert work.stop() == 0
    assert w.stop() == 0


# --------------------------------------------------------------------------
# key choice: judged by what each event carries

IDENTITY_SCHEMA = """
CREATE TABLE byidx (code text NOT NULL, v text);
CREATE UNIQUE INDEX byidx_code ON byidx (code);
ALTER TABLE byidx REPLICA IDENTITY USING INDEX byidx_code;
CREATE TABLE byidx_pk (id int PRIMARY KEY, code text NOT NULL, v text);
CREATE UNIQUE INDEX byidx_pk_code ON byidx_pk (code);
ALTER TABLE byidx_pk REPLICA IDENTITY USING INDEX byidx_pk_code;
CREATE TABLE nothing_pk (id int PRIMARY KEY, v text);
ALTER TABLE nothing_pk REPLICA IDENTITY NOTHING;
"""


def test_identity_using_index_then_default_and_nothing_with_a_key(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, schema=IDENTITY_SCHEMA)
    # the changes are made (and reach the slot) while the identity is USING INDEX ...
    for stmt in [
        "INSERT INTO byidx SELECT 'c' || g, 'v' || g FROM generate_series(1, 20) g",
        "UPDATE byidx SET v = 'changed' WHERE code IN ('c1', 'c2', 'c3')",
        "UPDATE byidx SET code = code || 'x' WHERE code IN ('c4', 'c5')",
        "DELETE FROM byidx WHERE code = 'c6'",
        "INSERT INTO byidx_pk SELECT g, 'c' || g, 'v' || g FROM generate_series(1, 20) g",
        "UPDATE byidx_pk SET v = 'changed' WHERE id = 3",
        "DELETE FROM byidx_pk WHERE id = 6",
        "INSERT INTO nothing_pk SELECT g, 'v' || g FROM generate_series(1, 20) g",
    ]:
        source_pg.sql(stmt, dbname="app")
    # ... and walpipe reads the catalog only after it became DEFAULT
    source_pg.sql("ALTER TABLE byidx REPLICA IDENTITY DEFAULT; ALTER TABLE byidx_pk REPLICA IDENTITY DEFAULT",
                  dbname="app")
    w = start(walpipe_factory, staging_pg, source_pg, workers=2, workers_extra={"resync": "off"})
    wait_caught_up(source_pg, w)
    wait_until(lambda: unprocessed(staging_pg) == 0 and retrying(staging_pg) == 0, timeout=60, interval=0.2,
               what="every event applied or parked", walpipe=w)

    # no primary key, but a unique index over NOT NULL columns: the key, whatever the identity
    keys = dict(staging_pg.sql("SELECT table_name, key_columns::text FROM walpipe.source_tables WHERE problem IS NULL",
                               dbname="staging"))
    assert set(keys) == {"byidx", "byidx_pk", "nothing_pk"}, keys
    assert '"name": "code"' in keys["byidx"] and '"name": "id"' in keys["byidx_pk"], keys
    assert_mirrored(source_pg, staging_pg, "byidx", ["code"])
    # REPLICA IDENTITY NOTHING with a key: its inserts are mirrored
    assert_mirrored(source_pg, staging_pg, "nothing_pk", ["id"])
    assert "cannot be mirrored" not in w.log()

    # byidx_pk's key is its primary key; its UPDATE and DELETE carry only "code": each dead letter
    # says what that event lacks, and nothing about the table that is false for it
    dl = dl_rows(staging_pg)
    assert sorted((t, e) for t, e, _, _ in dl) == [("byidx_pk", "delete"), ("byidx_pk", "update")], dl
    for _, ev_type, reason, parked in dl:
        assert parked, reason
        assert reason.startswith(f'this {ev_type} identifies its old row by "code" (the replica identity of '
                                 f'"public"."byidx_pk" when the change was made), without key column "id"'), reason
    # the parked events mark the mirror diverged, at their positions ...
    div = open_divergences(staging_pg)
    dl_lsns = sorted(r[0] for r in staging_pg.sql("SELECT lsn::text FROM walpipe.dead_letters", dbname="staging"))
    assert sorted(d[2] for d in div) == dl_lsns and {(d[0], d[1]) for d in div} == {("byidx_pk", "parked")}, div
    # ... and `walpipe dlq list` shows it: one line per diverged mirror, and the count
    r = w.command("dlq", "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[3] == "diverged\tsource\ttable\tkinds\toldest_lsn\treason", lines
    assert re.fullmatch(r"diverged\tapp\tpublic\.byidx_pk\tparked\t" + re.escape(min(dl_lsns, key=wptest_lsn)) +
                        r"\tthis \w+ identifies its old row by .*", lines[4]), lines
    assert lines[-1] == "-- 2 dead letters: 0 waiting for retry, 2 parked, 0 undecodable; 1 diverged mirror", lines
    assert w.stop() == 0


def wptest_lsn(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


# --------------------------------------------------------------------------
# rewrites: no row changes in the WAL, noticed from the catalog

REWRITE_SCHEMA = """
CREATE TABLE typed (id int PRIMARY KEY, n int);
CREATE TABLE vol (id int PRIMARY KEY, v text);
CREATE TABLE trunc (id int PRIMARY KEY, v text);
CREATE TABLE again (id int PRIMARY KEY, v text);
"""
REWRITE_TABLES = ["typed", "vol", "trunc", "again"]


def storage(source_pg, table):
    return source_pg.sql("SELECT oid::int8, relfilenode::int8 FROM pg_class WHERE oid = %s::regclass", (table,),
                         dbname="app")[0]


def recorded_storage(staging_pg, table):
    rows = staging_pg.sql("SELECT relid::int8, relfilenode::int8 FROM walpipe.source_tables WHERE table_name = %s",
                          (table,), dbname="staging")
    return rows[0] if rows else None


def test_rewrites_are_recorded_and_truncates_are_not(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, schema=REWRITE_SCHEMA)
    w = start(walpipe_factory, staging_pg, source_pg, workers=1, workers_extra={"resync": "off"})
    for t in REWRITE_TABLES:
        source_pg.sql(f"INSERT INTO {t} SELECT g, g FROM generate_series(1, 50) g", dbname="app")
    wait_caught_up(source_pg, w)
    wait_until(lambda: all(recorded_storage(staging_pg, t) == storage(source_pg, t) for t in REWRITE_TABLES),
               timeout=30, interval=0.2, what="every table's storage recorded", walpipe=w)

    def insert_lsn():
        return source_pg.scalar("SELECT pg_current_wal_insert_lsn()::text", dbname="app")
    before = {}
    for table, stmt in [("typed", "ALTER TABLE typed ALTER COLUMN n TYPE bigint USING n * 10"),
                        ("vol", "ALTER TABLE vol ADD COLUMN r float8 DEFAULT random()"),
                        ("trunc", "TRUNCATE trunc; INSERT INTO trunc VALUES (1, 'after')"),
                        ("again", "DROP TABLE again; CREATE TABLE again (id int PRIMARY KEY, v text); "
                                  "INSERT INTO again VALUES (7, 'new')")]:
        before[table] = insert_lsn()
        source_pg.sql(stmt, dbname="app")

    def rewrites():
        return {d[0]: d for d in open_divergences(staging_pg) if d[1] == "rewrite"}
    wait_until(lambda: set(rewrites()) == {"typed", "vol", "again"}, timeout=30, interval=0.2,
               what="the rewrites recorded", walpipe=w)
    # the TRUNCATE (in the stream) is judged too, and is no rewrite
    wait_until(lambda: recorded_storage(staging_pg, "trunc") == storage(source_pg, "trunc"), timeout=30,
               interval=0.2, what="the truncate judged", walpipe=w)
    seen = insert_lsn()
    div = rewrites()
    assert set(div) == {"typed", "vol", "again"}, div
    for table, d in div.items():
        # recorded at a position after the change (and not after the source was asked)
        assert staging_pg.scalar("SELECT %s::pg_lsn > %s::pg_lsn AND %s::pg_lsn <= %s::pg_lsn",
                                 (d[2], before[table], d[2], seen), dbname="staging"), (table, d, before, seen)
    assert "the source rewrote the table without row changes in the WAL" in div["typed"][3], div
    assert "the source rewrote the table without row changes in the WAL" in div["vol"][3], div
    assert "dropped and created again" in div["again"][3], div
    assert_mirrored(source_pg, staging_pg, "trunc", ["id"])

    # each is recorded once: a later poll (the one that judges another TRUNCATE) adds nothing
    n = staging_pg.scalar("SELECT count(*) FROM walpipe.divergences", dbname="staging")
    source_pg.sql("TRUNCATE trunc; INSERT INTO trunc VALUES (2, 'more')", dbname="app")
    wait_until(lambda: recorded_storage(staging_pg, "trunc") == storage(source_pg, "trunc"), timeout=30,
               interval=0.2, what="the second truncate judged", walpipe=w)
    wait_applied_rows(source_pg, staging_pg, w)
    assert staging_pg.scalar("SELECT count(*) FROM walpipe.divergences", dbname="staging") == n
    assert_mirrored(source_pg, staging_pg, "trunc", ["id"])
    assert w.stop() == 0


def wait_applied_rows(source_pg, staging_pg, w):
    wait_caught_up(source_pg, w)
    wait_until(lambda: unprocessed(staging_pg) == 0, timeout=30, interval=0.2, what="every event applied", walpipe=w)
