"""Awkward input from a real source lands intact or goes to dead_letters with the reason.

Never a crash, never a silent drop: what the decoder cannot take is kept whole.
"""

import hashlib

import truth
import wptest
from test_core import setup_source, start_walpipe, wait_caught_up
from test_mirror import assert_mirror_equals
from test_workers import dead_letters, unprocessed
from wptest import wait_until

AWKWARD = '''
CREATE SCHEMA "My Schema";
CREATE TABLE "My Schema"."select" ("Id" int PRIMARY KEY, "col ""quoted""" text, "ünïcödé" text, "order" int,
                                   "Mixed Case" text, "a.b,c" text);
CREATE TABLE public."Weird, Table.name" (id int PRIMARY KEY, v text);
CREATE TABLE public.excluded (id int PRIMARY KEY);
CREATE TABLE public."UPPER" (id int PRIMARY KEY);
'''


def test_awkward_identifiers_and_table_filter(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, schema=AWKWARD)
    tables = '"My Schema"."select", public."Weird, Table.name", public.UPPER'
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app"),
                                                            "tables": tables}})
    source_pg.sql('''INSERT INTO "My Schema"."select" VALUES (1, 'q"uote', 'ü', 2, 'MiXeD', 'dots')''', dbname="app")
    source_pg.sql('''UPDATE "My Schema"."select" SET "order" = 3 WHERE "Id" = 1''', dbname="app")
    source_pg.sql('''INSERT INTO public."Weird, Table.name" VALUES (1, 'w')''', dbname="app")
    source_pg.sql("INSERT INTO public.excluded VALUES (1)", dbname="app")
    source_pg.sql('INSERT INTO public."UPPER" VALUES (1)', dbname="app")
    source_pg.sql('INSERT INTO public."Weird, Table.name" VALUES (2, \'x\'); '
                  'DELETE FROM public."Weird, Table.name" WHERE id = 1', dbname="app")
    wait_caught_up(source_pg, w)
    # the workers mirror every awkward name exactly, and nothing of the excluded table
    wait_until(lambda: unprocessed(staging_pg) == 0, timeout=120, what="every raw event processed", walpipe=w)
    assert dead_letters(staging_pg) == []
    assert assert_mirror_equals(source_pg, staging_pg, "My Schema", "select", ["Id"])[0] == 1
    assert assert_mirror_equals(source_pg, staging_pg, "public", "Weird, Table.name", ["id"])[0] == 1
    assert assert_mirror_equals(source_pg, staging_pg, "public", "UPPER", ["id"])[0] == 1
    assert staging_pg.scalar("SELECT count(*) FROM walpipe.mirrors WHERE table_name = 'excluded'",
                             dbname="staging") == 0
    assert w.stop() == 0
    staged = truth.read_staged(staging_pg, "staging")
    got = [(s["schema"], s["table"], s["type"]) for s in staged]
    assert got == [("My Schema", "select", "insert"), ("My Schema", "select", "update"),
                   ("public", "Weird, Table.name", "insert"), ("public", "UPPER", "insert"),
                   ("public", "Weird, Table.name", "insert"), ("public", "Weird, Table.name", "delete")]
    after = staged[0]["payload"]["after"]
    assert after == {"Id": 1, 'col "quoted"': 'q"uote', "ünïcödé": "ü", "order": 2, "Mixed Case": "MiXeD",
                     "a.b,c": "dots"}
    assert staged[1]["payload"]["key"] == {"Id": 1}
    # ground truth without the filter: everything walpipe staged, and exactly what the filter let through
    expected = [e for e in truth.read_truth(source_pg, "app", "truth") if e["table"] != "excluded"]
    truth.assert_exactly_once(expected, staged)


def test_hundred_megabyte_value_lands_intact(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, schema="CREATE TABLE big (id int PRIMARY KEY, v text)")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}})
    # 100 MB of text with characters that need escaping in JSON and in COPY
    # 41-character units x 1 250 000 = 51 MB, doubled by the update to 102 MB
    source_pg.sql("INSERT INTO big SELECT 1, repeat(E'ab\\\\c\"d\\te\\n' || md5(g::text), 1250000) "
                  "FROM generate_series(1, 1) g", dbname="app")
    source_pg.sql("UPDATE big SET v = v || v WHERE id = 1", dbname="app")
    source_pg.sql("INSERT INTO big VALUES (2, 'after')", dbname="app")
    wait_caught_up(source_pg, w, timeout=300)
    assert w.stop() == 0
    src = source_pg.sql("SELECT id, length(v), md5(v) FROM big ORDER BY id", dbname="app")
    rows = staging_pg.sql("SELECT event_type, length(payload->'after'->>'v'), md5(payload->'after'->>'v') "
                          "FROM walpipe.raw_events ORDER BY id", dbname="staging")
    assert len(rows) == 3, rows
    assert src[0][1] >= 100 * 1000 * 1000
    assert rows[1] == ("update", src[0][1], src[0][2])
    assert rows[0][0] == "insert" and rows[0][1] * 2 == src[0][1]
    assert rows[2] == ("insert", 5, hashlib.md5(b"after").hexdigest())
    assert staging_pg.scalar("SELECT count(*) FROM walpipe.dead_letters", dbname="staging") == 0


JSONB_MAX = (1 << 28) - 1  # jsonb's limit on one string and on one object's contents


def test_value_over_jsonb_limit_goes_to_dead_letters(source_pg, staging_pg, walpipe_factory):
    """A value one byte over jsonb's limit cannot be staged; it must not stop the source.

    Its change goes to dead_letters with its identity and reason, and raw holds the message
    whole; the next change of the same transaction, and the next transaction, are staged."""
    setup_source(source_pg, schema="CREATE TABLE big (id int PRIMARY KEY, v text)")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}})
    before = source_pg.scalar("SELECT pg_current_wal_insert_lsn()::text", dbname="app")
    source_pg.sql(f"INSERT INTO big VALUES (1, repeat('x', {JSONB_MAX + 1})), (3, 'same transaction')",
                  dbname="app")
    after = source_pg.scalar("SELECT pg_current_wal_insert_lsn()::text", dbname="app")
    source_pg.sql("INSERT INTO big VALUES (2, 'next transaction')", dbname="app")
    wait_caught_up(source_pg, w, timeout=600)
    assert w.stop() == 0
    dead = staging_pg.sql("SELECT kind, lsn > %s::pg_lsn AND lsn <= %s::pg_lsn, seq, schema_name, table_name, "
                          "length(raw), reason FROM walpipe.dead_letters", (before, after), dbname="staging")
    assert len(dead) == 1, dead
    kind, lsn_in_txn, seq, schema, table, raw_len, reason = dead[0]
    assert (kind, lsn_in_txn, seq, schema, table) == ("decode", True, 1, "public", "big")
    assert raw_len > JSONB_MAX + 1 and "jsonb" in reason and '"v"' in reason, reason
    rows = staging_pg.sql("SELECT event_type, seq, payload->'after' FROM walpipe.raw_events ORDER BY id",
                          dbname="staging")
    assert rows == [("insert", 2, {"id": 3, "v": "same transaction"}),
                    ("insert", 1, {"id": 2, "v": "next transaction"})]
    assert "string too long" not in w.log(since_start=True)


def test_invalid_utf8_non_transactional_message(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, schema="CREATE TABLE t (id int PRIMARY KEY)")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}})
    source_pg.sql("SELECT pg_logical_emit_message(false, 'bin', '\\x41ff42'::bytea)", dbname="app")
    source_pg.sql("SELECT pg_logical_emit_message(false, 'txt', 'fine')", dbname="app")
    source_pg.sql("INSERT INTO t VALUES (1)", dbname="app")
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    dead = staging_pg.sql("SELECT raw, reason, seq FROM walpipe.dead_letters", dbname="staging")
    assert len(dead) == 1 and dead[0][2] == 0
    assert b"A\xffB" in bytes(dead[0][0]) and "UTF-8" in dead[0][1]
    rows = staging_pg.sql("SELECT event_type, payload->>'content' FROM walpipe.raw_events ORDER BY id",
                          dbname="staging")
    assert rows == [("message", "fine"), ("insert", None)]
