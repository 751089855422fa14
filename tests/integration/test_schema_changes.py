"""Schema changes on the source, followed by the mirror by column identity (attnum), not by name.

wal2json sends each new-tuple column's attnum (include-column-positions); shapes record it, and the
mirror keeps each column's attnum.  So a RENAME COLUMN (of a key column too) renames the mirror
column and events from before the rename still apply, by position (their identity by the table's
shape history); a DROP COLUMN x + ADD COLUMN x is two columns, not a rename; ADD COLUMN ... DEFAULT
<constant> gives the mirror column the value the rows that existed read on the source
(pg_attribute.attmissingval, read into walpipe.source_columns by `walpipe run`).

Events are staged first (`walpipe run` with no workers), then applied by `walpipe work` with several
workers and claims of 3 events, newest chunk first: every older event is applied after the mirror
already follows the newest shape.  Then the mirror is dropped and rebuilt from the same events in
stream order, under the same claims: the mirror is created from the oldest shape while key
discovery names the key columns as the source does now.

Every test runs with resync = off: an automatic resync would copy the tables again after a
recorded divergence (a retyping's rewrite, a default not known), so the mirror would match the
source whatever the schema-change logic did, and the divergence checked would be resolved.
"""

import time

from test_core import wait_caught_up
from test_workers import (assert_mirrored, dead_letters, stage_only, start, start_work, unprocessed,
                          wait_applied)
from wptest import wait_until

SCHEMA = """
CREATE TABLE ren (id int PRIMARY KEY, a int, b text, c numeric(8,2));
CREATE TABLE readd (id int PRIMARY KEY, x text, y int);
CREATE TABLE defs (id int PRIMARY KEY, v text);
"""

STEPS = [
    "INSERT INTO ren SELECT g, g, 'b' || g, g / 4.0 FROM generate_series(1, 12) g",
    "UPDATE ren SET b = b || '+', a = -a WHERE id % 3 = 0",
    "DELETE FROM ren WHERE id = 2",
    "INSERT INTO readd SELECT g, 'x' || g, g FROM generate_series(1, 8) g",
    "INSERT INTO defs SELECT g, 'v' || g FROM generate_series(1, 10) g",
    # a non-key column renamed, with changes before and after
    "ALTER TABLE ren RENAME COLUMN b TO bee",
    "INSERT INTO ren SELECT g, g, 'after ' || g, 1 FROM generate_series(13, 16) g",
    "UPDATE ren SET bee = bee || '!' WHERE id IN (1, 5, 13)",
    "DELETE FROM ren WHERE id IN (4, 14)",
    # the key column renamed
    "ALTER TABLE ren RENAME COLUMN id TO rid",
    "DELETE FROM ren WHERE rid = 6",  # before any shape shows the new name
    "INSERT INTO ren SELECT g, g, 'key renamed ' || g, 2 FROM generate_series(17, 20) g",
    "UPDATE ren SET a = a + 1000 WHERE rid IN (3, 7, 17)",
    "DELETE FROM ren WHERE rid IN (11, 18)",
    "UPDATE ren SET rid = rid + 100 WHERE rid IN (8, 19)",
    # names swapped in one transaction
    "BEGIN; ALTER TABLE ren RENAME COLUMN a TO tmp; ALTER TABLE ren RENAME COLUMN c TO a; "
    "ALTER TABLE ren RENAME COLUMN tmp TO c; COMMIT",
    "INSERT INTO ren (rid, a, bee, c) VALUES (30, 3.5, 'swapped', 30)",
    "UPDATE ren SET c = c * 2 WHERE rid IN (1, 9)",
    # the same name dropped and added again: another column, whose old values must not come back
    "UPDATE readd SET x = 'old x ' || id WHERE id < 4",
    "ALTER TABLE readd DROP COLUMN x",
    "ALTER TABLE readd ADD COLUMN x text",
    "INSERT INTO readd VALUES (9, 9, 'new x 9')",
    "UPDATE readd SET y = -y WHERE id IN (2, 5)",
    "UPDATE readd SET x = 'new x' WHERE id = 6",
    # constant defaults: the rows that exist read them, and no row change is in the WAL
    "ALTER TABLE defs ADD COLUMN t text DEFAULT 'it''s \"new\"'",
    "ALTER TABLE defs ADD COLUMN n numeric(12,3) DEFAULT 12.5",
    "ALTER TABLE defs ADD COLUMN ts timestamptz DEFAULT '2024-02-29 12:34:56.789+02'",
    "INSERT INTO defs (id, v) VALUES (11, 'v11')",
    "INSERT INTO defs VALUES (12, 'v12', 'own t', 1, '2000-01-01 00:00:00+00')",
    "UPDATE defs SET v = v || '!' WHERE id IN (2, 3)",
    "DELETE FROM defs WHERE id = 4",
    # type changes without USING (the source converts each value with the cast, the mirror too)
    "ALTER TABLE defs ALTER COLUMN n TYPE numeric(20,3)",  # no rewrite: the missing value stays
    "INSERT INTO defs (id, v, n) VALUES (13, 'v13', 123456789.125)",
    "ALTER TABLE ren ALTER COLUMN c TYPE bigint",
    "ALTER TABLE readd ALTER COLUMN y TYPE bigint",
    "INSERT INTO readd VALUES (10, 1099511627776, 'big y')",
    "ALTER TABLE ren ALTER COLUMN bee TYPE varchar(40)",
    "UPDATE ren SET bee = 'short' WHERE rid = 10",
]

# A retyping with USING of a column the mirror gave a default: text has no assignment cast to int,
# so the mirror must not ask PostgreSQL to convert its default (the source drops it first, the
# mirror too).  USING rewrites the source table, which changes rows without row changes in the WAL
# and clears its missing values: making the rows equal again is a resync's business (README), so
# only the mirror's columns and the rows written after are compared here.
REWRITE_STEPS = [
    "ALTER TABLE defs ADD COLUMN code text DEFAULT '7'",
    "INSERT INTO defs (id, v) VALUES (20, 'v20')",
    "ALTER TABLE defs ALTER COLUMN code DROP DEFAULT, ALTER COLUMN code TYPE int USING code::int, "
    "ALTER COLUMN code SET DEFAULT 7",
    "INSERT INTO defs (id, v, code) VALUES (21, 'v21', 8)",
]

KEYS = {"ren": ["rid"], "readd": ["id"], "defs": ["id"]}
CHUNK = 5


def rediscover(staging_pg, w):
    """Makes `walpipe run` read the source's catalog again and waits until it recorded the keys."""
    before = staging_pg.scalar("SELECT max(discovered_at) FROM walpipe.source_tables", dbname="staging")
    staging_pg.sql("NOTIFY walpipe_discover", dbname="staging")
    wait_until(lambda: staging_pg.scalar("SELECT count(*) FROM walpipe.source_tables WHERE discovered_at > %s",
                                         (before,), dbname="staging") > 0,
               timeout=60, what="the source's catalog read again", walpipe=w)


def column_types(cluster, dbname, table):
    return cluster.sql("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                       "%s::regclass AND attnum > 0 AND NOT attisdropped AND attname NOT LIKE '\\_walpipe%%' "
                       "ORDER BY attname", (table,), dbname=dbname)


def missing_divergences(staging_pg):
    """Open divergences recorded because a column's missing value was not known (a table rewrite,
    which other detectors record too, is no such divergence)."""
    return staging_pg.sql("SELECT table_name, kind, reason FROM walpipe.divergences WHERE resolved_at IS NULL "
                          "AND reason LIKE '%%attmissingval%%'", dbname="staging")


def assert_all_mirrored(source_pg, staging_pg):
    for table, keys in KEYS.items():
        assert_mirrored(source_pg, staging_pg, table, keys)


def apply_newest_first(source_pg, staging_pg, walpipe_factory, w):
    """`walpipe work` (3 workers) applies the staged events, newest chunk first."""
    ids = [r[0] for r in staging_pg.sql("SELECT id FROM walpipe.raw_events WHERE NOT processed ORDER BY id",
                                        dbname="staging")]
    chunks = [ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK)]
    holders = []
    for chunk in chunks:
        c = staging_pg.connect("staging", autocommit=False)
        c.cursor().execute("SELECT 1 FROM walpipe.raw_events WHERE id = ANY(%s) FOR UPDATE", (chunk,))
        holders.append(c)
    work = start_work(walpipe_factory, w, 3)
    try:
        for chunk, c in reversed(list(zip(chunks, holders))):
            c.commit()
            staging_pg.sql("NOTIFY walpipe_raw_events", dbname="staging")
            wait_until(lambda: staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE id = ANY(%s) "
                                                 "AND NOT processed", (chunk,), dbname="staging") == 0,
                       timeout=60, what="a released chunk processed", walpipe=work)
    finally:
        for c in holders:
            c.close()
    wait_applied(source_pg, staging_pg, w, workers=work)
    return work


def test_renames_readds_defaults_and_types_keep_every_row(source_pg, staging_pg, walpipe_factory):
    w = stage_only(source_pg, staging_pg, walpipe_factory, SCHEMA, STEPS,
                   workers_extra={"claim_size": 3, "resync": "off"})
    rediscover(staging_pg, w)  # key discovery now names the key "rid", as the source does
    assert staging_pg.scalar("SELECT key_columns::text FROM walpipe.source_tables WHERE table_name = 'ren'",
                             dbname="staging").count('"rid"') == 1

    # 1. newest first: the mirror is made from the newest shapes, the older events follow by position
    work = apply_newest_first(source_pg, staging_pg, walpipe_factory, w)
    assert dead_letters(staging_pg) == []
    assert_all_mirrored(source_pg, staging_pg)
    assert missing_divergences(staging_pg) == []

    # 2. the mirrors dropped and rebuilt from the same events in stream order
    assert work.stop() == 0
    staging_pg.sql("DO $$ DECLARE r record; BEGIN FOR r IN SELECT * FROM walpipe.mirrors LOOP "
                   "EXECUTE format('DROP TABLE %I.%I, walpipe.%I', r.mirror_schema, r.mirror_table, r.tombstones); "
                   "END LOOP; DELETE FROM walpipe.mirrors; END $$; "
                   "UPDATE walpipe.raw_events SET processed = false", dbname="staging")
    work = start_work(walpipe_factory, w, 3, name="work2")
    wait_applied(source_pg, staging_pg, w, workers=work)
    assert dead_letters(staging_pg) == []
    assert_all_mirrored(source_pg, staging_pg)

    # the mirror's columns are the source's, named and typed alike, the key included
    for table in KEYS:
        assert column_types(staging_pg, "staging", f"analytics.public_{table}") == \
            column_types(source_pg, "app", f"public.{table}"), table
    assert staging_pg.sql("SELECT key_columns FROM walpipe.mirrors WHERE table_name = 'ren'",
                          dbname="staging") == [(["rid"],)]

    # 3. replayed once more on the rebuilt mirrors: nothing changes
    staging_pg.sql("UPDATE walpipe.raw_events SET processed = false; NOTIFY walpipe_raw_events", dbname="staging")
    wait_applied(source_pg, staging_pg, w, workers=work)
    assert dead_letters(staging_pg) == []
    assert_all_mirrored(source_pg, staging_pg)
    assert missing_divergences(staging_pg) == []
    assert work.stop() == 0
    assert w.stop() == 0


def test_live_renames_under_several_workers(source_pg, staging_pg, walpipe_factory):
    """The same changes while `walpipe run` applies them as they come (3 workers, claims of 3)."""
    from test_core import setup_source
    setup_source(source_pg, schema=SCHEMA)
    w = start(walpipe_factory, staging_pg, source_pg, workers=3, workers_extra={"claim_size": 3, "resync": "off"})
    for stmt in STEPS:
        source_pg.sql(stmt, dbname="app")
    wait_applied(source_pg, staging_pg, w)
    assert dead_letters(staging_pg) == []
    assert_all_mirrored(source_pg, staging_pg)
    r = w.command("verify", timeout=300)   # walpipe verify agrees, column by column under the new names
    assert r.returncode == 0, r.stdout + r.stderr

    for stmt in REWRITE_STEPS:
        source_pg.sql(stmt, dbname="app")
    wait_applied(source_pg, staging_pg, w)
    assert dead_letters(staging_pg) == []
    assert column_types(staging_pg, "staging", "analytics.public_defs") == \
        column_types(source_pg, "app", "public.defs")
    row21 = "SELECT id, v, code FROM {} WHERE id = 21"
    assert staging_pg.sql(row21.format("analytics.public_defs"), dbname="staging") == \
        source_pg.sql(row21.format("public.defs"), dbname="app") == [(21, "v21", 8)]
    assert w.stop() == 0


def test_default_not_known_is_a_recorded_divergence(source_pg, staging_pg, walpipe_factory):
    """The catalog never says (the column is dropped before walpipe reads it): the mirror adds the
    column without a default and records the divergence, never silently.  The column lives and dies
    inside one source transaction, so no catalog read of `walpipe run` can see it, however the
    machine schedules them (as separate statements a loaded run once read the catalog between
    the ADD and the DROP and learnt the default)."""
    w = stage_only(source_pg, staging_pg, walpipe_factory, "CREATE TABLE gone (id int PRIMARY KEY, v text)",
                   ["INSERT INTO gone SELECT g, 'v' || g FROM generate_series(1, 5) g",
                    "BEGIN; ALTER TABLE gone ADD COLUMN d text DEFAULT 'dflt'; "
                    "INSERT INTO gone VALUES (6, 'v6', 'own'); "
                    "ALTER TABLE gone DROP COLUMN d; COMMIT"],
                   workers_extra={"claim_size": 3, "resync": "off"})
    work = start_work(walpipe_factory, w, 1)
    wait_applied(source_pg, staging_pg, w, workers=work)
    rows = missing_divergences(staging_pg)
    assert len(rows) == 1 and rows[0][:2] == ("gone", "rewrite") and '"d"' in rows[0][2], rows
    assert dead_letters(staging_pg) == []
    assert work.stop() == 0
    assert w.stop() == 0


def test_snapshot_rows_applied_after_a_rename(source_pg, staging_pg, walpipe_factory):
    """Rows of the initial snapshot carry positions too: applied after the mirror followed a rename
    of the key and of another column, they land in the renamed columns."""
    source_pg.createdb("app")
    source_pg.sql("CREATE TABLE snap (id int PRIMARY KEY, a text, b int); "
                  "INSERT INTO snap SELECT g, 'a' || g, g FROM generate_series(1, 30) g", dbname="app")
    # no slot yet: walpipe creates it and copies the rows; no workers, so nothing is applied yet
    w = start(walpipe_factory, staging_pg, source_pg, workers=0, workers_extra={"claim_size": 3, "resync": "off"})
    wait_until(lambda: "initial snapshot done" in w.log(), timeout=120, what="snapshot done", walpipe=w)
    for stmt in ["ALTER TABLE snap RENAME COLUMN id TO sid",
                 "ALTER TABLE snap RENAME COLUMN a TO aa",
                 "UPDATE snap SET aa = aa || '!' WHERE sid % 4 = 0",
                 "DELETE FROM snap WHERE sid IN (5, 6)",
                 "INSERT INTO snap VALUES (31, 'a31', 31)"]:
        source_pg.sql(stmt, dbname="app")
    wait_caught_up(source_pg, w)
    work = apply_newest_first(source_pg, staging_pg, walpipe_factory, w)
    assert dead_letters(staging_pg) == []
    assert_mirrored(source_pg, staging_pg, "snap", ["sid"])
    assert work.stop() == 0
    assert w.stop() == 0


def test_one_wait_for_a_key_and_a_column_catalog(source_pg, staging_pg, walpipe_factory):
    """A claim that meets a table whose key is not read yet and a column added with a constant
    DEFAULT since the catalog was read waits once, for both together: the key is recorded, the
    mirror's older rows read the default, nothing is dead-lettered or marked diverged."""
    w = stage_only(source_pg, staging_pg, walpipe_factory, "CREATE TABLE old (id int PRIMARY KEY, v text)",
                   ["INSERT INTO old SELECT g, 'v' || g FROM generate_series(1, 5) g"],
                   workers_extra={"claim_size": 100, "resync": "off"})
    # `run` read the catalog at start; after that, a new table or column is read only when a worker asks
    wait_until(lambda: staging_pg.scalar("SELECT count(*) FROM walpipe.source_tables WHERE table_name = 'old'",
                                         dbname="staging") == 1 and
               staging_pg.scalar("SELECT count(*) FROM walpipe.source_columns WHERE table_name = 'old'",
                                 dbname="staging") == 2,
               timeout=60, what="old's key and columns read", walpipe=w)
    for stmt in ["CREATE TABLE late (id int PRIMARY KEY, w text)",
                 "INSERT INTO late VALUES (1, 'w1')",
                 "ALTER TABLE old ADD COLUMN d text DEFAULT 'dflt'",
                 "INSERT INTO old VALUES (6, 'v6', 'own')"]:
        source_pg.sql(stmt, dbname="app")
    wait_caught_up(source_pg, w)
    work = start_work(walpipe_factory, w, 1)  # one claim holds every event
    wait_applied(source_pg, staging_pg, w, workers=work)
    assert dead_letters(staging_pg) == []
    assert missing_divergences(staging_pg) == []
    assert_mirrored(source_pg, staging_pg, "old", ["id"])
    assert_mirrored(source_pg, staging_pg, "late", ["id"])
    log = work.log()
    assert log.count('to read the columns of table "public"."old"') == 1, log
    assert log.count('to record the key of table "public"."late"') <= 1, log
    assert "has not read the columns" not in log, log
    assert work.stop() == 0
    assert w.stop() == 0
