"""The mirror against awkward tables: composite text keys, long and quoted names, user-defined
types, apply errors whose text is cut.  Each test compares mirror and source by the ordered
checksum of test_workers.py, or says exactly what must be in walpipe.dead_letters.
"""

import wptest
from test_core import setup_source, wait_caught_up
from test_workers import (assert_mirrored, checksum, columns, dead_letters, ident, stage_only, start, start_work,
                          unprocessed, wait_applied, wait_dead)
from wptest import wait_until


def mirror_table(staging_pg, schema, table):
    """The mirror table's (schema, name) as walpipe.mirrors records it."""
    rows = staging_pg.sql("SELECT mirror_schema, mirror_table FROM walpipe.mirrors "
                          "WHERE source = 'app' AND schema_name = %s AND table_name = %s", (schema, table),
                          dbname="staging")
    assert len(rows) == 1, rows
    return rows[0]


def assert_mirror_equals(source_pg, staging_pg, schema, table, keys):
    """Like test_workers.assert_mirrored, for any table name: the mirror is found through
    walpipe.mirrors, not by the default naming pattern.  Returns (row count, md5)."""
    mschema, mtable = mirror_table(staging_pg, schema, table)
    cols = columns(source_pg, "app", schema, table)
    src = checksum(source_pg, "app", f"{ident(schema)}.{ident(table)}", cols, keys, text_order=True)
    mir = checksum(staging_pg, "staging", f"{ident(mschema)}.{ident(mtable)}", cols, keys, text_order=True)
    if src != mir:
        a = source_pg.sql(f"SELECT t::text FROM {ident(schema)}.{ident(table)} t", dbname="app")
        sel = ", ".join(ident(c) for c in cols)
        b = staging_pg.sql(f"SELECT ({sel})::text FROM {ident(mschema)}.{ident(mtable)}", dbname="staging")
        raise AssertionError(f"mirror {mschema}.{mtable} of {schema}.{table} differs: source {src}, mirror {mir}\n"
                             f"source: {sorted(r[0] for r in a)[:5]}\nmirror: {sorted(r[0] for r in b)[:5]}")
    return src


# --------------------------------------------------------------------------
# composite text keys

def test_composite_keys_that_join_alike_stay_apart(source_pg, staging_pg, walpipe_factory):
    """Keys ('a<US>b','c') and ('a','b<US>c') in one claim are two rows, not one (US = byte 0x1F)."""
    w = stage_only(source_pg, staging_pg, walpipe_factory,
                   "CREATE TABLE pairs (a text, b text, v int, PRIMARY KEY (a, b))",
                   ["INSERT INTO pairs VALUES (E'a\\x1fb', 'c', 1)",
                    "INSERT INTO pairs VALUES ('a', E'b\\x1fc', 2)",
                    # and ones that a separator other than 0x1F would confuse
                    "INSERT INTO pairs VALUES ('x,y', 'z', 3), ('x', 'y,z', 4), ('1:x', '', 5), ('1', ':x', 6)",
                    "UPDATE pairs SET v = v + 10"],
                   workers_extra={"claim_size": 1000})
    # one worker, one claim: every change of the table is applied together
    work = start_work(walpipe_factory, w, 1)
    wait_applied(source_pg, staging_pg, w, workers=work)
    assert dead_letters(staging_pg) == []
    count, _ = assert_mirrored(source_pg, staging_pg, "pairs", ["a", "b"])
    assert count == 6
    assert work.stop() == 0
    assert w.stop() == 0


# --------------------------------------------------------------------------
# apply errors cut mid-character

WIDE_COLS = 12


def test_cut_multibyte_error_lands_in_dead_letters(source_pg, staging_pg, walpipe_factory):
    """An apply error longer than the reason's limit, cut inside a multibyte character, is still
    recorded (valid UTF-8) instead of failing the dead-letter insert and looping on the claim."""
    cols = ", ".join(f"c{i} text" for i in range(WIDE_COLS))
    setup = f"CREATE TABLE wide (id int PRIMARY KEY, {cols})"
    setup_source(source_pg, schema=setup)
    # (the CHECK makes the events apply_failed: the mirror is marked diverged, not resynced)
    w = start(walpipe_factory, staging_pg, source_pg, workers=1,
              workers_extra={"max_attempts": 1, "retry_backoff_ms": 100})
    source_pg.sql("INSERT INTO wide (id) VALUES (1)", dbname="app")
    wait_applied(source_pg, staging_pg, w)
    # the mirror refuses what the source takes; PostgreSQL's DETAIL quotes the row, each value cut to
    # 64 bytes on a character boundary, so a dozen columns of 3-byte characters make it far longer
    # than the reason's limit, and prefixes of 0, 1, 2 ASCII bytes put the cut inside a character
    staging_pg.sql("ALTER TABLE analytics.public_wide ADD CONSTRAINT short CHECK (length(c0) < 10)",
                   dbname="staging")
    vals = ", ".join(["repeat('\u20ac', 100)"] * (WIDE_COLS - 1))
    for i, prefix in enumerate(["", "x", "xy"]):
        source_pg.sql(f"INSERT INTO wide VALUES ({10 + i}, '{prefix}' || repeat('\u20ac', 100), {vals})",
                      dbname="app")
    wait_caught_up(source_pg, w)
    wait_dead(staging_pg, 3, walpipe=w)
    wait_until(lambda: unprocessed(staging_pg) == 0, timeout=60, what="the failing claim processed", walpipe=w)
    reasons = [r[0] for r in staging_pg.sql("SELECT reason FROM walpipe.dead_letters ORDER BY event_id",
                                            dbname="staging")]
    assert len(reasons) == 3
    for r in reasons:
        assert 'violates check constraint "short"' in r, r
        assert len(r.encode()) <= 399 and "\u20ac" in r, r
    # the reasons were cut (a DETAIL this long does not fit), at three different byte offsets
    assert min(len(r.encode()) for r in reasons) >= 396, [len(r.encode()) for r in reasons]
    assert "could not record a dead letter" not in w.log()
    assert w.stop() == 0


# --------------------------------------------------------------------------
# names over 63 bytes

LONG = "t" * 58  # "public_" + LONG + a suffix is longer than PostgreSQL's 63-byte names
LONG_COL = "c" * 63
UMLAUT = "\u00fc" * 31  # 62 bytes: the cut must not split a character

LONG_SCHEMA = f"""
CREATE TABLE "{LONG}_one" (id int PRIMARY KEY, "{LONG_COL}" text);
CREATE TABLE "{LONG}_two" (id int PRIMARY KEY, "{LONG_COL}" text);
CREATE TABLE "{UMLAUT}" ("{UMLAUT}" text PRIMARY KEY, v int);
"""


def test_names_over_63_bytes_get_distinct_mirrors(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, schema=LONG_SCHEMA)
    w = start(walpipe_factory, staging_pg, source_pg, workers=2)
    for t in ("one", "two"):
        source_pg.sql(f'INSERT INTO "{LONG}_{t}" SELECT g, \'{t}\' || g FROM generate_series(1, 20) g', dbname="app")
        source_pg.sql(f'UPDATE "{LONG}_{t}" SET "{LONG_COL}" = "{LONG_COL}" || \'!\' WHERE id % 3 = 0', dbname="app")
        source_pg.sql(f'DELETE FROM "{LONG}_{t}" WHERE id % 5 = 0', dbname="app")
    source_pg.sql(f'INSERT INTO "{UMLAUT}" SELECT \'k\u00e9\' || g, g FROM generate_series(1, 10) g', dbname="app")
    source_pg.sql(f'UPDATE "{UMLAUT}" SET "{UMLAUT}" = "{UMLAUT}" || \'\u2713\' WHERE v < 4', dbname="app")
    wait_applied(source_pg, staging_pg, w)
    assert dead_letters(staging_pg) == []
    names = set()
    for table, key, rows in ((f"{LONG}_one", "id", 16), (f"{LONG}_two", "id", 16), (UMLAUT, UMLAUT, 10)):
        mschema, mtable = mirror_table(staging_pg, "public", table)
        assert len(mtable.encode()) <= 63, mtable
        mtable.encode().decode("utf-8")  # never cut inside a character
        names.add(mtable)
        assert assert_mirror_equals(source_pg, staging_pg, "public", table, [key])[0] == rows
    assert len(names) == 3, names
    assert w.stop() == 0


# --------------------------------------------------------------------------
# user-defined types: enum, domain, composite type, arrays of them (mirrored as text)

# The types live in a schema whose name needs no quotes: wal2json 2.5 writes a type name that
# format_type() quotes into "type" without escaping it, so its message is not JSON and is
# dead-lettered as undecodable (a capture-side matter; the table's schema may be odd).
UDT_SCHEMA = r"""
CREATE SCHEMA "Odd Types";
CREATE SCHEMA udt;
CREATE TYPE udt.mood AS ENUM ('sad', 'ok', 'it''s "quoted"', 'with, comma');
CREATE DOMAIN udt.short_text AS text CHECK (length(VALUE) < 40);
CREATE DOMAIN udt.pos AS numeric(8,3) CHECK (VALUE > 0);
CREATE TYPE udt.pair AS (a int, "B b" text);
CREATE TABLE "Odd Types".things (
    k udt.mood, n udt.pos, id int,
    st udt.short_text, p udt.pair, moods udt.mood[], pairs udt.pair[],
    PRIMARY KEY (k, id)
);
"""


def test_user_defined_types_mirror_as_text(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, schema=UDT_SCHEMA)
    w = start(walpipe_factory, staging_pg, source_pg, workers=1)
    t = '"Odd Types".things'
    for stmt in [
        f"""INSERT INTO {t} VALUES ('sad', 1.5, 1, 'x', ROW(1, 'a b'), '{{sad,ok}}', ARRAY[ROW(1,'x')::udt.pair])""",
        f"""INSERT INTO {t} VALUES ('it''s "quoted"', 12.125, 2, '', ROW(NULL, 'q"uote, (paren)'),
            ARRAY['with, comma', 'it''s "quoted"']::udt.mood[], '{{}}')""",
        f"INSERT INTO {t} (k, id) VALUES ('with, comma', 3), ('ok', 3)",
        f"UPDATE {t} SET p = ROW(7, E'tab\there'), n = 0.001 WHERE id = 1",
        f"UPDATE {t} SET k = 'ok', st = 'moved' WHERE id = 2",
        f"DELETE FROM {t} WHERE k = 'ok' AND id = 3",
    ]:
        source_pg.sql(stmt, dbname="app")
    wait_applied(source_pg, staging_pg, w)
    assert dead_letters(staging_pg) == []
    count, _ = assert_mirror_equals(source_pg, staging_pg, "Odd Types", "things", ["k", "id"])
    assert count == 3
    mschema, mtable = mirror_table(staging_pg, "Odd Types", "things")
    types = dict(staging_pg.sql("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                                "WHERE attrelid = format('%%I.%%I', %s::text, %s::text)::regclass AND attnum > 0",
                                (mschema, mtable), dbname="staging"))
    assert [types[c] for c in ("k", "n", "st", "p", "moods", "pairs")] == ["text"] * 6, types
    assert types["id"] == "integer"
    assert w.stop() == 0


# --------------------------------------------------------------------------
# key discovery from a source whose database is not UTF-8

def test_keys_of_a_latin1_source_are_recorded_as_utf8(source_pg, staging_pg, walpipe_factory):
    """Names read from a LATIN1 source's catalog reach walpipe.source_tables as UTF-8 (staging
    refuses anything else, and then no key of that source would ever be recorded)."""
    source_pg.sql("CREATE DATABASE app ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    source_pg.sql('CREATE TABLE "t\u00ebst" ("k\u00e9y" int PRIMARY KEY, v text)', dbname="app")
    wptest.create_slot(source_pg, "app", "walpipe_app")
    w = start(walpipe_factory, staging_pg, source_pg, workers=0)
    wait_until(lambda: staging_pg.sql("SELECT table_name, key_columns->0->>'name' FROM walpipe.source_tables",
                                      dbname="staging") == [("t\u00ebst", "k\u00e9y")],
               timeout=60, what="the LATIN1 table's key recorded", walpipe=w)
    assert "could not record the key" not in w.log()
    assert w.stop() == 0
